//! Adaptive concurrency per (connector, account): how many status calls one
//! credential may have in flight, learned from the processor's own signals.
//!
//! A processor's rate limit belongs to the API key, is shared with the
//! merchant's own traffic and is rarely documented, so a fixed number is either
//! too high (429s, retries, a circuit that opens on a processor that is merely
//! busy) or too low (lag). [`Aimd`] is the control law, pure and driven by the
//! time it is given:
//!
//! - *slow start*: the limit starts at [`INITIAL_LIMIT`] and doubles after every
//!   round-trip window in which it was fully used, until the first back-pressure;
//! - *additive increase*: then it grows by one per window in which it was fully
//!   used;
//! - *multiplicative decrease*: a 429 multiplies it by [`DECREASE`], at most
//!   once per window (the calls already in flight when the limit was exceeded
//!   answer together), but not below [`SERVED_SHARE`] of the concurrency the
//!   processor was recently serving, and a `Retry-After` holds it there (no
//!   growth) until that time has passed. 503s and timeouts decrease it the
//!   same way once they are more than [`OVERLOAD_SHARE`] of a window's calls:
//!   an overloaded processor fails many calls, while a few scattered ones are
//!   failures for the retries and the circuit breaker, not a reason to slow
//!   down;
//! - *pacing*: after back-pressure and below [`PACE_BELOW`] the limit is kept as
//!   a rate too, a round trip divided by the limit between call starts, with
//!   the limit rounded up as the bound on calls in flight. Whole calls are too
//!   coarse there (against 50 calls a second of 50 ms, 2 calls in flight make
//!   40 a second and 3 make 60), and below one call in flight (a fast
//!   processor with a low rate limit) a rate is all that is left, though never
//!   slower than one call per [`MAX_SPACING`]. While paced a fully used window
//!   grows the limit by [`PACED_GROWTH`] of itself per round trip it lasted
//!   (calls can be many round trips apart; at most a doubling at once), and
//!   after a decrease the next start is one new spacing after the last call's:
//!   calls given a start at the old rate take new ones;
//! - *turned-away calls keep their place for a round trip*: a 429 or 503 that
//!   comes back in a millisecond does not free its place before a round trip
//!   has passed since the call started (its caller goes on at once, to wait out
//!   the `Retry-After`), so a throttling processor sees at most the limit's
//!   calls per round trip instead of a flood of retries. This holds for a fixed
//!   concurrency too; held places do not count as use of the window.
//!
//! The ceiling is `processing.max_in_flight`; token buckets stay ceilings too.
//! [`AccountLimiter`] applies the limit to calls: fresh requests go before
//! follow-mode re-checks when the window is full, and re-checks may use at most
//! `follow.share` of it while fresh requests wait.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// Where a limit starts.
pub const INITIAL_LIMIT: f64 = 4.0;
/// The factor a back-pressure signal multiplies the limit by.
pub const DECREASE: f64 = 0.7;
/// The share of a window's calls answered 503 or timing out above which the
/// processor counts as overloaded.
pub const OVERLOAD_SHARE: f64 = 0.2;
/// After back-pressure the limit stays at least this share of the concurrency
/// the processor was recently serving.
pub const SERVED_SHARE: f64 = 0.9;
/// The weight of one window's answered rate in the smoothed rate.
const RATE_WEIGHT: f64 = 0.1;
/// Below this limit (once back-pressure was seen) the limit is kept as a rate
/// too: whole calls in flight are too coarse a step there (2 or 3 calls of
/// 50 ms are 40 or 60 a second against a processor that allows 50).
pub const PACE_BELOW: f64 = 16.0;
/// While paced, a fully used window grows the limit by this share of itself
/// (at most one call).
pub const PACED_GROWTH: f64 = 0.1;
/// Pacing never goes slower than one call per this, whatever the limit: a
/// processor that refuses even that is for the retries (each refused request
/// waits its `Retry-After`), and the limit must still hear answers to recover.
pub const MAX_SPACING: Duration = Duration::from_secs(1);
/// The lowest limit: one call per 50 round trips.
pub const MIN_LIMIT: f64 = 0.02;
/// The round trip assumed before one was measured.
const FIRST_RTT: Duration = Duration::from_millis(100);

/// How a call went, for the control law.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The processor answered (whatever the status): no pressure.
    Answered,
    /// 503 or a timeout: it is overloaded.
    Overloaded,
    /// 429: it throttles this credential, maybe saying until when.
    Throttled(Option<Duration>),
    /// The call did not tell (cancelled, a transport error).
    Unknown,
}

/// The AIMD control law of one account.
#[derive(Debug, Clone)]
pub struct Aimd {
    limit: f64,
    max: f64,
    slow_start: bool,
    window_start: Instant,
    /// The limit was reached (all of it in use) during this window.
    window_full: bool,
    /// A decrease happened during this window.
    window_decreased: bool,
    /// Calls that ended in this window, and how many of them were overloaded.
    window_calls: u32,
    window_overloaded: u32,
    /// Calls answered in this window (any status but 429, 503 or a timeout).
    window_answered: u32,
    /// Smoothed answered calls per second over recent windows.
    answered_rate: Option<f64>,
    /// Smoothed round trip of answered calls.
    rtt: Option<Duration>,
    /// No growth before this (a `Retry-After`).
    hold_until: Option<Instant>,
    /// Decreases so far.
    decreases: u64,
}

impl Aimd {
    /// A law with `max` as its ceiling, starting at `now`.
    pub fn new(max: f64, now: Instant) -> Self {
        Aimd {
            limit: INITIAL_LIMIT.min(max),
            max: max.max(MIN_LIMIT),
            slow_start: true,
            window_start: now,
            window_full: false,
            window_decreased: false,
            window_calls: 0,
            window_overloaded: 0,
            window_answered: 0,
            answered_rate: None,
            rtt: None,
            hold_until: None,
            decreases: 0,
        }
    }

    /// The current limit (calls in flight; below 1, a fraction of one per round trip).
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// The smoothed round trip.
    pub fn rtt(&self) -> Duration {
        self.rtt.unwrap_or(FIRST_RTT)
    }

    /// Back-pressure decreases so far.
    pub fn decreases(&self) -> u64 {
        self.decreases
    }

    /// True while slow start lasts.
    pub fn in_slow_start(&self) -> bool {
        self.slow_start
    }

    /// True when the limit is kept as a rate too: after back-pressure, while
    /// one call is a large step of it.
    fn paced(&self) -> bool {
        !self.slow_start && self.limit < PACE_BELOW
    }

    /// Calls in flight at most now: the limit, rounded up while paced (the
    /// pacing keeps the rate to the fraction), down otherwise.
    pub fn concurrency(&self) -> usize {
        let calls = if self.paced() {
            self.limit.ceil()
        } else {
            self.limit.floor()
        };
        (calls as usize).max(1)
    }

    /// While paced: the time between two call starts, a round trip divided
    /// by the limit.
    pub fn spacing(&self) -> Option<Duration> {
        self.paced().then(|| {
            self.rtt()
                .div_f64(self.limit.max(MIN_LIMIT))
                .min(MAX_SPACING)
        })
    }

    /// A call starts with `in_flight` calls (itself included) running.
    pub fn started(&mut self, in_flight: usize, now: Instant) {
        self.roll(now);
        if in_flight >= self.concurrency() {
            self.window_full = true;
        }
    }

    /// A call had to wait for its pacing interval: the limit, as a rate, is
    /// fully used.
    pub fn saturated(&mut self, now: Instant) {
        self.roll(now);
        self.window_full = true;
    }

    /// A call ended after `latency` with `signal`.
    pub fn ended(&mut self, signal: Signal, latency: Duration, now: Instant) {
        self.roll(now);
        self.window_calls += 1;
        let pressure = match signal {
            Signal::Answered => {
                self.window_answered += 1;
                self.rtt = Some(match self.rtt {
                    None => latency,
                    Some(r) => r.mul_f64(0.8) + latency.mul_f64(0.2),
                });
                false
            }
            Signal::Throttled(after) => {
                #[cfg(feature = "mutations")]
                if crate::mutation::on("retry_after_unchecked") {
                    if let Some(after) = after {
                        let until = now + after;
                        self.hold_until = Some(until);
                    }
                }
                // Checked: the wait comes from a processor's header.
                if let Some(until) = after.and_then(|after| now.checked_add(after)) {
                    self.hold_until = Some(self.hold_until.map_or(until, |h| h.max(until)));
                }
                true
            }
            Signal::Overloaded => {
                self.window_overloaded += 1;
                let calls = f64::from(self.window_calls).max(self.limit);
                f64::from(self.window_overloaded) > OVERLOAD_SHARE * calls
            }
            Signal::Unknown => false,
        };
        if pressure {
            if !self.window_decreased {
                self.limit = self.decreased();
                self.window_decreased = true;
                self.decreases += 1;
            }
            self.slow_start = false;
        }
    }

    /// The limit after a back-pressure signal: `DECREASE` of it, or, when
    /// higher, just under what the processor has recently been answering (its
    /// answered rate times the round trip), since that much it did serve. A
    /// 429's `Retry-After` holds the limit for a while, so a cut far below the
    /// served rate would leave capacity unused for all of that time.
    fn decreased(&self) -> f64 {
        let served = self
            .answered_rate
            .map_or(0.0, |r| r * self.rtt().as_secs_f64() * SERVED_SHARE);
        (self.limit * DECREASE)
            .max(served.min(self.limit * SERVED_SHARE))
            .max(MIN_LIMIT)
    }

    /// Ends the window when a round trip has passed: grows the limit if it was
    /// fully used without back-pressure (and nothing holds it).
    fn roll(&mut self, now: Instant) {
        if now.saturating_duration_since(self.window_start) < self.rtt() {
            return;
        }
        let elapsed = now.saturating_duration_since(self.window_start);
        // The window's answered rate, weighted by the round trips it lasted: a
        // window that ends at a call many round trips later (calls are rare
        // when refused or paced) stands for all of them. A zero-length window
        // (a round trip measured as zero) has no rate.
        let windows = (elapsed.as_secs_f64() / self.rtt().as_secs_f64()).max(1.0);
        if !elapsed.is_zero() {
            let sample = f64::from(self.window_answered) / elapsed.as_secs_f64();
            let weight = 1.0 - (1.0 - RATE_WEIGHT).powf(windows);
            self.answered_rate = Some(match self.answered_rate {
                None => sample,
                Some(r) => r * (1.0 - weight) + sample * weight,
            });
        }
        let held = self.hold_until.is_some_and(|h| now < h);
        if self.window_full && !self.window_decreased && !held {
            self.limit = if self.slow_start {
                self.limit * 2.0
            } else if self.paced() {
                // A tenth of itself per round trip: one whole call would be a
                // step of a quarter or more of the rate at four calls or fewer.
                // A paced window ends at a call, and at a low limit calls are
                // many round trips apart: every round trip since counts (all
                // of them had calls waiting), at most a doubling at once.
                let windows = windows.floor().min(64.0);
                let grown = self.limit * (1.0 + PACED_GROWTH).powf(windows).min(2.0);
                grown.min(self.limit + windows)
            } else {
                self.limit + 1.0
            }
            .min(self.max);
        }
        self.window_start = now;
        self.window_full = false;
        self.window_decreased = false;
        self.window_calls = 0;
        self.window_overloaded = 0;
        self.window_answered = 0;
    }
}

/// Whose call it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A request from the input topic (or a one-off check).
    Fresh,
    /// A follow-mode re-check.
    Recheck,
}

/// How an account's concurrency is set.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Concurrency {
    /// Learned (AIMD), up to the ceiling.
    Adaptive,
    /// This many calls in flight, always.
    Fixed(u32),
}

struct State {
    law: Aimd,
    fixed: Option<usize>,
    /// Places taken: calls in flight, waiting for their pacing interval, or
    /// held after a refusal.
    in_flight: usize,
    rechecks_in_flight: usize,
    /// Of `in_flight`, places held after a refusal (not use of the window).
    held: usize,
    /// Waiting calls; a slot is handed to a waiter (counted in `in_flight`
    /// before it wakes) together with when it may start, if paced.
    fresh: VecDeque<oneshot::Sender<Option<PacedStart>>>,
    rechecks: VecDeque<oneshot::Sender<Option<PacedStart>>>,
    /// Pacing: when the next call may start, and when the last one did.
    next_start: Instant,
    last_start: Instant,
}

impl State {
    fn concurrency(&self) -> usize {
        self.fixed.unwrap_or_else(|| self.law.concurrency())
    }

    /// Re-checks may take at most `share` of the window while fresh requests wait.
    fn recheck_room(&self, share: f64) -> bool {
        let fresh_waiting = self.fresh.iter().any(|w| !w.is_closed());
        !fresh_waiting || (self.rechecks_in_flight as f64) < share * self.concurrency() as f64
    }

    fn room(&self) -> bool {
        self.in_flight < self.concurrency()
    }

    /// The time between two call starts, while the (adaptive) law paces.
    fn spacing(&self) -> Option<Duration> {
        self.law.spacing().filter(|_| self.fixed.is_none())
    }
}

/// When a paced call may start, and how many decreases the limit had had
/// when that was given (a decrease since means a new, later start).
#[derive(Debug, Clone, Copy)]
struct PacedStart {
    at: Instant,
    decreases: u64,
}

/// What an attempt to start a call came to.
enum Next {
    /// A slot (already counted), usable at once or, if paced, from then on.
    Go(Option<PacedStart>),
    /// Queued: a slot will be handed over.
    Queue(oneshot::Receiver<Option<PacedStart>>),
}

/// A queued call: if it is dropped after a slot was handed to it, the slot goes
/// back.
struct Waiting<'a> {
    limiter: &'a AccountLimiter,
    priority: Priority,
    rx: oneshot::Receiver<Option<PacedStart>>,
    received: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.received && self.rx.try_recv().is_ok() {
            self.limiter.free(self.priority, false);
        }
    }
}

/// The limit of one (connector, account), applied to its calls.
pub struct AccountLimiter {
    state: Mutex<State>,
    share: f64,
    on_limit: Box<dyn Fn(f64) + Send + Sync>,
}

/// A call's place in its account's window; give it back with [`Permit::finish`].
pub struct Permit {
    limiter: Arc<AccountLimiter>,
    priority: Priority,
    started: Instant,
    done: bool,
}

impl Permit {
    /// The call ended with `signal`. The law hears it at once, and the caller
    /// goes on at once; but the place of a call the processor turned away
    /// (429, 503) faster than a round trip stays taken until a round trip has
    /// passed since the call started, so that refusals that come back in a
    /// millisecond do not free places a thousand times faster than real calls
    /// would: a throttling processor sees at most the limit's calls per round
    /// trip, not a flood.
    pub fn finish(mut self, signal: Signal) {
        let latency = self.started.elapsed();
        // Only a refusal can be held, on a timer of the runtime.
        let runtime = matches!(signal, Signal::Throttled(_) | Signal::Overloaded)
            .then(tokio::runtime::Handle::try_current)
            .and_then(Result::ok);
        // Should the law fail, the permit's drop still gives the place back.
        let hold = self.limiter.record(signal, latency, runtime.is_some());
        self.done = true;
        match (hold, runtime) {
            (Some(hold), Some(runtime)) => {
                // The place comes back when the timer fires, or when the timer
                // is dropped unfired (the runtime shutting down).
                let held = Held {
                    limiter: self.limiter.clone(),
                    priority: self.priority,
                };
                let until = self.started.checked_add(hold).unwrap_or(self.started);
                runtime.spawn(async move {
                    tokio::time::sleep_until(until).await;
                    drop(held);
                });
            }
            _ => self.limiter.free(self.priority, false),
        }
    }
}

/// A place held after a refusal; given back when dropped.
struct Held {
    limiter: Arc<AccountLimiter>,
    priority: Priority,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.limiter.free(self.priority, true);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            // Cancelled: whatever the call heard is unknown.
            self.limiter.free(self.priority, false);
        }
    }
}

impl AccountLimiter {
    /// A limiter with `concurrency` (adaptive up to `ceiling`, or fixed),
    /// re-checks limited to `share` of the window while fresh requests wait;
    /// `on_limit` hears every change of the limit (the metric).
    pub fn new(
        concurrency: Concurrency,
        ceiling: usize,
        share: f64,
        on_limit: Box<dyn Fn(f64) + Send + Sync>,
    ) -> Self {
        let now = Instant::now();
        let fixed = match concurrency {
            Concurrency::Adaptive => None,
            Concurrency::Fixed(n) => Some((n as usize).max(1)),
        };
        let law = Aimd::new(ceiling as f64, now);
        on_limit(fixed.map_or(law.limit(), |n| n as f64));
        AccountLimiter {
            state: Mutex::new(State {
                law,
                fixed,
                in_flight: 0,
                rechecks_in_flight: 0,
                fresh: VecDeque::new(),
                rechecks: VecDeque::new(),
                held: 0,
                next_start: now,
                last_start: now,
            }),
            share: share.clamp(0.0, 1.0),
            on_limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Places taken: calls in flight, waiting for their pacing interval, or
    /// held after a refusal.
    pub fn taken(&self) -> usize {
        self.lock().in_flight
    }

    /// The current limit.
    pub fn limit(&self) -> f64 {
        let s = self.lock();
        s.fixed.map_or(s.law.limit(), |n| n as f64)
    }

    /// Waits for room in the account's window (and, while paced, for the
    /// pacing interval).
    pub async fn acquire(self: &Arc<Self>, priority: Priority) -> Permit {
        let start = match self.try_acquire(priority) {
            Next::Go(at) => at,
            Next::Queue(rx) => {
                let mut waiting = Waiting {
                    limiter: self.as_ref(),
                    priority,
                    rx,
                    received: false,
                };
                let at = (&mut waiting.rx).await;
                waiting.received = true;
                // The sender never drops unanswered (a waiter is only ever
                // removed to be handed a slot).
                at.unwrap_or(None)
            }
        };
        // The slot is counted: a permit owns it from here, even while it waits
        // for its pacing interval.
        let mut permit = Permit {
            limiter: self.clone(),
            priority,
            started: Instant::now(),
            done: false,
        };
        let mut paced = start;
        while let Some(start) = paced {
            tokio::time::sleep_until(start.at).await;
            paced = self.repace(start);
        }
        permit.started = Instant::now();
        permit
    }

    /// A paced call whose start has come: it starts now (`None`), unless the
    /// limit has been decreased since the start was given; then it takes a
    /// new one at the new, slower rate.
    fn repace(&self, start: PacedStart) -> Option<PacedStart> {
        let mut s = self.lock();
        match s.spacing() {
            Some(spacing) if s.law.decreases() != start.decreases => {
                let at = s.next_start.max(Instant::now());
                s.next_start = at + spacing;
                Some(PacedStart {
                    at,
                    decreases: s.law.decreases(),
                })
            }
            _ => {
                s.last_start = s.last_start.max(start.at);
                None
            }
        }
    }

    fn try_acquire(&self, priority: Priority) -> Next {
        let mut s = self.lock();
        let now = Instant::now();
        let allowed = s.room()
            && match priority {
                Priority::Fresh => s.fresh.is_empty(),
                Priority::Recheck => s.rechecks.is_empty() && s.recheck_room(self.share),
            };
        if !allowed {
            let (tx, rx) = oneshot::channel();
            match priority {
                Priority::Fresh => s.fresh.push_back(tx),
                Priority::Recheck => s.rechecks.push_back(tx),
            }
            return Next::Queue(rx);
        }
        Next::Go(self.take(&mut s, priority, now))
    }

    /// Counts a call in; if paced, returns when it may start.
    fn take(&self, s: &mut State, priority: Priority, now: Instant) -> Option<PacedStart> {
        s.in_flight += 1;
        if priority == Priority::Recheck {
            s.rechecks_in_flight += 1;
        }
        let using = s.in_flight - s.held;
        s.law.started(using, now);
        let Some(spacing) = s.spacing() else {
            s.last_start = now;
            return None;
        };
        let at = s.next_start.max(now);
        s.next_start = at + spacing;
        if at > now {
            s.law.saturated(now);
        }
        Some(PacedStart {
            at,
            decreases: s.law.decreases(),
        })
    }

    /// Tells the law how a call ended. A call that `can_hold` (the processor
    /// turned it away, and a timer can give its place back) and ended within a
    /// round trip is counted as held from here; returns how long after its
    /// start it keeps its place.
    fn record(&self, signal: Signal, latency: Duration, can_hold: bool) -> Option<Duration> {
        let mut s = self.lock();
        let before = s.law.limit();
        let decreases = s.law.decreases();
        s.law.ended(signal, latency, Instant::now());
        let after = s.law.limit();
        if s.fixed.is_none() && (after - before).abs() > f64::EPSILON {
            (self.on_limit)(after);
        }
        if s.law.decreases() != decreases {
            // Calls given a start at the old rate take new ones (see
            // `repace`): the next start is a new spacing after the last one.
            if let Some(spacing) = s.spacing() {
                s.next_start = s.last_start.checked_add(spacing).unwrap_or(s.last_start);
            }
        }
        // The limit may have shrunk: nothing to wake, only fewer places.
        let rtt = s.law.rtt();
        let hold = (can_hold && latency < rtt).then_some(rtt);
        if hold.is_some() {
            s.held += 1;
        }
        hold
    }

    /// Gives a call's place back (`held`: one held after a refusal) and hands
    /// free places to waiters.
    fn free(&self, priority: Priority, held: bool) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if held {
            s.held = s.held.saturating_sub(1);
        }
        if priority == Priority::Recheck {
            s.rechecks_in_flight = s.rechecks_in_flight.saturating_sub(1);
        }
        self.wake(&mut s);
    }

    /// Hands slots the window has room for to waiters: fresh ones first;
    /// re-checks while no fresh one waits, or within their share.
    fn wake(&self, s: &mut State) {
        loop {
            if !s.room() {
                return;
            }
            let priority = if let Some(front) = s.fresh.front() {
                if front.is_closed() {
                    s.fresh.pop_front();
                    continue;
                }
                Priority::Fresh
            } else if !s.rechecks.is_empty() && s.recheck_room(self.share) {
                if s.rechecks.front().is_some_and(oneshot::Sender::is_closed) {
                    s.rechecks.pop_front();
                    continue;
                }
                Priority::Recheck
            } else {
                return;
            };
            let tx = match priority {
                Priority::Fresh => s.fresh.pop_front(),
                Priority::Recheck => s.rechecks.pop_front(),
            };
            let Some(tx) = tx else { return };
            let start = self.take(s, priority, Instant::now());
            if tx.send(start).is_err() {
                // Gone since: the slot goes back.
                s.in_flight = s.in_flight.saturating_sub(1);
                if priority == Priority::Recheck {
                    s.rechecks_in_flight = s.rechecks_in_flight.saturating_sub(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A processor that takes `rtt` and allows `capacity` calls in flight:
    /// returns (limit per window) over `windows` windows of a fully used law.
    fn run(law: &mut Aimd, capacity: f64, windows: usize, now: &mut Instant) -> Vec<f64> {
        let mut seen = Vec::new();
        for _ in 0..windows {
            let n = law.concurrency();
            for i in 1..=n {
                law.started(i, *now);
            }
            *now += ms(50);
            for _ in 0..n {
                let signal = if n as f64 > capacity {
                    Signal::Throttled(None)
                } else {
                    Signal::Answered
                };
                law.ended(signal, ms(50), *now);
            }
            seen.push(law.limit());
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_doubles_to_the_ceiling_without_back_pressure() {
        let mut now = Instant::now();
        let mut law = Aimd::new(500.0, now);
        let seen = run(&mut law, f64::INFINITY, 10, &mut now);
        // The first window ends once a round trip was measured.
        assert_eq!(seen[..7], [8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 500.0]);
        assert!(law.in_slow_start());
    }

    #[tokio::test(start_paused = true)]
    async fn back_pressure_halts_slow_start_then_the_limit_saws_just_under_capacity() {
        // Capacity above PACE_BELOW: whole calls in flight, no pacing.
        let mut now = Instant::now();
        let mut law = Aimd::new(500.0, now);
        let seen = run(&mut law, 40.0, 80, &mut now);
        assert!(!law.in_slow_start());
        assert!(law.spacing().is_none(), "{} is not paced", law.limit());
        // After the first overshoot it saws around the capacity: one increase per
        // window, one decrease (to DECREASE of it at most) per overshoot.
        for l in &seen[20..] {
            assert!((42.0 * DECREASE..42.0).contains(l), "{seen:?}");
        }
        let mean = seen[20..].iter().sum::<f64>() / 60.0;
        assert!(
            mean > 34.0,
            "mean limit {mean} of a capacity of 40: {seen:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_cuts_to_just_under_the_served_rate_not_below_it() {
        let mut now = Instant::now();
        let mut law = Aimd::new(500.0, now);
        // Capacity 20 in flight: after the first overshoot the law saws there,
        // and the processor has been answering about 20 calls per 50 ms window.
        run(&mut law, 20.0, 40, &mut now);
        let before = law.limit();
        // A window that fills 21 calls: the processor throttles.
        now += ms(50);
        for i in 1..=21 {
            law.started(i, now);
        }
        law.ended(Signal::Throttled(Some(Duration::from_secs(1))), ms(50), now);
        let after = law.limit();
        // In this model a window over capacity is answered with 429s only, so
        // the answered rate averages below 20 per window: the cut lands between
        // DECREASE of the limit and the limit, at SERVED_SHARE of that rate.
        assert!(
            after > before * DECREASE + 1.0 && after < before,
            "{before} -> {after}: a cut to DECREASE alone would be {}",
            before * DECREASE
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_decrease_per_window_and_retry_after_holds_growth() {
        let now = Instant::now();
        let mut law = Aimd::new(100.0, now);
        law.ended(Signal::Answered, ms(50), now);
        let l0 = law.limit();
        for _ in 0..10 {
            law.ended(Signal::Overloaded, ms(50), now);
        }
        assert_eq!(
            law.limit(),
            l0 * DECREASE,
            "ten 503s of one window: one decrease"
        );
        // A few 503s among many answers are failures, not overload.
        let mut busy = Aimd::new(100.0, now);
        for i in 0..40u64 {
            let signal = if i % 20 == 10 {
                Signal::Overloaded
            } else {
                Signal::Answered
            };
            busy.ended(signal, ms(50), now + ms(i));
        }
        assert_eq!(busy.limit(), INITIAL_LIMIT, "5% of 503s: no decrease");
        law.ended(
            Signal::Throttled(Some(Duration::from_secs(1))),
            ms(50),
            now + ms(60),
        );
        let held = law.limit();
        // Fully used windows for the next second: no growth while held.
        for i in 1..=15u64 {
            let at = now + ms(60 + 60 * i);
            law.started(law.concurrency(), at);
            law.ended(Signal::Answered, ms(50), at);
        }
        assert_eq!(law.limit(), held, "held by Retry-After");
        for i in 16..=20u64 {
            let at = now + ms(60 + 60 * i);
            law.started(law.concurrency(), at);
            law.ended(Signal::Answered, ms(50), at);
        }
        assert!(law.limit() > held, "growing again after it");
    }

    #[tokio::test(start_paused = true)]
    async fn below_one_call_in_flight_the_limit_paces_calls() {
        let mut now = Instant::now();
        let mut law = Aimd::new(100.0, now);
        for _ in 0..10 {
            now += ms(100);
            law.ended(Signal::Throttled(None), ms(10), now);
        }
        assert!(law.limit() < 1.0);
        let spacing = law.spacing().unwrap();
        assert!(
            spacing > law.rtt(),
            "{spacing:?} against a round trip of {:?}",
            law.rtt()
        );
        assert!(law.limit() >= MIN_LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_requests_go_first_and_rechecks_keep_to_their_share() {
        let limiter = limiter(Concurrency::Fixed(10), 100);
        // The window full of re-checks.
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(limiter.acquire(Priority::Recheck).await);
        }
        // Waiting: re-checks first in time, then fresh requests.
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, p) in [
            Priority::Recheck,
            Priority::Recheck,
            Priority::Fresh,
            Priority::Fresh,
        ]
        .into_iter()
        .enumerate()
        {
            let (l, o) = (limiter.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let permit = l.acquire(p).await;
                o.lock().unwrap().push(i);
                tokio::time::sleep(ms(1000)).await;
                permit.finish(Signal::Answered);
            }));
            tokio::task::yield_now().await;
        }
        for p in held.drain(..2) {
            p.finish(Signal::Answered);
        }
        tokio::time::sleep(ms(10)).await;
        assert_eq!(
            *order.lock().unwrap(),
            vec![2, 3],
            "two slots: the fresh requests"
        );
        // Eight re-checks still hold slots: more than 30% of ten, so a re-check
        // waits while a fresh request waits; with none waiting, they get the rest.
        for p in held.drain(..) {
            p.finish(Signal::Answered);
        }
        tokio::time::sleep(ms(10)).await;
        let mut order = order.lock().unwrap().clone();
        order[2..].sort_unstable();
        assert_eq!(order, vec![2, 3, 0, 1]);
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_leak_no_slot_and_the_bound_always_holds() {
        let limiter = limiter(Concurrency::Fixed(3), 100);
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let (l, r, m) = (limiter.clone(), running.clone(), most.clone());
            let p = if i % 3 == 0 {
                Priority::Recheck
            } else {
                Priority::Fresh
            };
            tasks.push(tokio::spawn(async move {
                let permit = l.acquire(p).await;
                let now = r.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                m.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(ms(5 + i % 7)).await;
                r.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                permit.finish(Signal::Answered);
            }));
        }
        // Cancel a third of them, wherever they are (waiting, or holding a slot).
        tokio::time::sleep(ms(20)).await;
        for t in tasks.iter().step_by(3) {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        assert!(most.load(std::sync::atomic::Ordering::SeqCst) <= 3);
        let s = limiter.lock();
        assert_eq!(
            (s.in_flight, s.rechecks_in_flight),
            (0, 0),
            "every slot came back"
        );
    }

    /// A processor's rate limit as its API gateway keeps it: a token bucket of
    /// `rate` calls a second, burst a tenth; beyond it an immediate 429 with
    /// `Retry-After: 1`. Answered calls take 50 ms.
    struct Bucket {
        rate: f64,
        tokens: f64,
        at: Instant,
    }

    impl Bucket {
        fn admit(&mut self, now: Instant) -> bool {
            let burst = (self.rate / 10.0).max(1.0);
            self.tokens = (self.tokens + (now - self.at).as_secs_f64() * self.rate).min(burst);
            self.at = now;
            let ok = self.tokens >= 1.0;
            if ok {
                self.tokens -= 1.0;
            }
            ok
        }
    }

    fn limiter(concurrency: Concurrency, ceiling: usize) -> Arc<AccountLimiter> {
        Arc::new(AccountLimiter::new(
            concurrency,
            ceiling,
            0.3,
            Box::new(|_| {}),
        ))
    }

    /// `workers` requests always waiting on `limiter` until `end`, as the
    /// retry loop runs them: a call `admit` lets in is answered in 50 ms; any
    /// other is refused at once with `Retry-After: 1`, and its request waits
    /// that (with up to 25% jitter) before it tries again. Returns when each
    /// call started and whether it was admitted.
    async fn backlog(
        limiter: Arc<AccountLimiter>,
        workers: u64,
        end: Instant,
        admit: impl Fn(Instant) -> bool + Send + Sync + 'static,
    ) -> Vec<(Instant, bool)> {
        let admit = Arc::new(admit);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (l, admit, calls) = (limiter.clone(), admit.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(w);
                loop {
                    let permit = l.acquire(Priority::Fresh).await;
                    let now = Instant::now();
                    if now >= end {
                        return;
                    }
                    let admitted = admit(now);
                    calls.lock().unwrap().push((now, admitted));
                    if admitted {
                        tokio::time::sleep(ms(50)).await;
                        permit.finish(Signal::Answered);
                    } else {
                        permit.finish(Signal::Throttled(Some(Duration::from_secs(1))));
                        let wait = Duration::from_secs(1).mul_f64(1.0 + rng.f64() * 0.25);
                        tokio::time::sleep(wait).await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let calls = calls.lock().unwrap().clone();
        calls
    }

    /// Per-second (answered, throttled) calls of a backlog of 500 through an
    /// adaptive limiter against a processor that allows `rate` calls a second,
    /// halved after `halve_after` seconds.
    async fn against_a_bucket(rate: f64, seconds: u64, halve_after: u64) -> Vec<(u64, u64)> {
        let start = Instant::now();
        let bucket = Mutex::new(Bucket {
            rate,
            tokens: rate / 10.0,
            at: start,
        });
        let halving = start + Duration::from_secs(halve_after);
        let end = start + Duration::from_secs(seconds);
        let calls = backlog(limiter(Concurrency::Adaptive, 500), 500, end, move |now| {
            let mut b = bucket.lock().unwrap();
            if now >= halving && b.rate == rate {
                b.rate = rate / 2.0;
            }
            b.admit(now)
        })
        .await;
        let mut series = vec![(0u64, 0u64); seconds as usize];
        for (at, admitted) in calls {
            let second = &mut series[(at - start).as_secs() as usize];
            if admitted {
                second.0 += 1;
            } else {
                second.1 += 1;
            }
        }
        series
    }

    #[tokio::test(start_paused = true)]
    async fn against_a_rate_limit_the_limit_finds_it_keeps_429s_rare_and_follows_a_halving() {
        // The goals, against the simulator's own model: for 50, 200
        // and 1,000 calls a second (one call of 50 ms already makes 20 a
        // second), a backlog of 500, the rate halving after 20 s.
        for rate in [50.0, 200.0, 1000.0] {
            let s = against_a_bucket(rate, 40, 20).await;
            let per_s = |from: usize, to: usize| {
                s[from..to].iter().map(|x| x.0).sum::<u64>() as f64 / (to - from) as f64
            };
            let throttled: u64 = s.iter().map(|x| x.1).sum();
            let calls: u64 = s.iter().map(|x| x.0 + x.1).sum();
            let share = throttled as f64 / calls as f64;
            assert!(per_s(10, 20) >= 0.9 * rate, "N={rate}: {s:?}");
            assert!(share <= 0.05, "N={rate}: {:.1}% 429s: {s:?}", share * 100.0);
            // Within 10 s of the halving: at least 0.9 of the new rate, 429s
            // under 5% of a second's calls.
            assert!(per_s(30, 40) >= 0.9 * rate / 2.0, "N={rate}: {s:?}");
            for (second, (answered, throttled)) in s.iter().enumerate().skip(30) {
                assert!(
                    (*throttled as f64) < 0.05 * (answered + throttled) as f64 + 1.0,
                    "N={rate}, second {second}: {s:?}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_turned_away_call_keeps_its_place_for_a_round_trip_but_its_caller_goes_on() {
        let limiter = limiter(Concurrency::Fixed(1), 100);
        let permit = limiter.acquire(Priority::Fresh).await;
        tokio::time::sleep(ms(40)).await;
        permit.finish(Signal::Answered);
        // A 429 in a millisecond: its caller goes on at once (to wait out the
        // Retry-After), while the place comes back a round trip (40 ms) after
        // the call started, not at once.
        let start = Instant::now();
        let permit = limiter.acquire(Priority::Fresh).await;
        tokio::time::sleep(ms(1)).await;
        permit.finish(Signal::Throttled(None));
        assert_eq!(Instant::now() - start, ms(1), "finish does not wait");
        let next = tokio::spawn({
            let l = limiter.clone();
            async move {
                let _p = l.acquire(Priority::Fresh).await;
                Instant::now()
            }
        });
        assert_eq!(next.await.unwrap() - start, ms(40));
        // A call that was answered frees its place at once.
        let permit = limiter.acquire(Priority::Fresh).await;
        let at = Instant::now();
        permit.finish(Signal::Answered);
        let _p = limiter.acquire(Priority::Fresh).await;
        assert_eq!(Instant::now(), at);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_call_given_its_start_before_a_cut_takes_one_at_the_new_rate() {
        let limiter = limiter(Concurrency::Adaptive, 100);
        // Back-pressure once (a round trip of 100 ms): paced from now on, at a
        // limit of a few calls.
        let permit = limiter.acquire(Priority::Fresh).await;
        tokio::time::sleep(ms(100)).await;
        permit.finish(Signal::Throttled(None));
        let limit = limiter.limit();
        assert!(limit < PACE_BELOW);
        let spacing = ms(100).div_f64(limit);
        // Into the next window (one decrease per window).
        tokio::time::sleep(ms(200)).await;
        let start = Instant::now();
        let first = limiter.acquire(Priority::Fresh).await;
        // The second is given a start one (old) spacing later; a 429 of the
        // first decreases the limit meanwhile, so it starts one new spacing
        // after the first instead.
        let waiter = tokio::spawn({
            let l = limiter.clone();
            async move {
                let _p = l.acquire(Priority::Fresh).await;
                Instant::now()
            }
        });
        tokio::time::sleep(spacing / 2).await;
        first.finish(Signal::Throttled(None));
        let cut = limiter.limit();
        assert!(cut < limit);
        let new_spacing = ms(100).div_f64(cut);
        let started = waiter.await.unwrap() - start;
        assert!(
            started.abs_diff(new_spacing) <= ms(1),
            "started {started:?} after the first; the new spacing is {new_spacing:?}, the old {spacing:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_seconds_of_refusing_everything_the_limit_recovers_within_seconds() {
        // A processor that answers every call in 50 ms, except from 2 s to 5 s,
        // when it refuses every call at once (429, `Retry-After: 1`): the limit
        // falls to its floor, then, once answers come again (after the last
        // Retry-After), grows back. 100 requests always waiting.
        let limiter = limiter(Concurrency::Adaptive, 500);
        let start = Instant::now();
        let storm = start + Duration::from_secs(2)..start + Duration::from_secs(5);
        let refusals = storm.clone();
        let run = tokio::spawn(backlog(
            limiter.clone(),
            100,
            start + Duration::from_secs(12),
            move |now| !refusals.contains(&now),
        ));
        tokio::time::sleep_until(storm.end).await;
        let floor = limiter.limit();
        assert!(floor < 0.5, "the limit fell during the refusals: {floor}");
        // Refusals end at 5 s, the last Retry-After up to 1.25 s later; growth
        // counts every round trip between the (paced, rare) calls. Counting
        // only one per call, 8 is reached after 4.4 s; here after 3.1 s.
        tokio::time::sleep_until(storm.end + ms(3500)).await;
        let recovered = limiter.limit();
        assert!(
            recovered >= 8.0,
            "3.5 s after the refusals ended the limit is {recovered} (from {floor})"
        );
        run.await.unwrap();
    }
}
