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
//!   processor was recently serving, and a `Retry-After` holds it there (no growth) until that
//!   time has passed. 503s and timeouts decrease it the same way once they are
//!   more than [`OVERLOAD_SHARE`] of a window's calls: an overloaded processor
//!   fails many calls, while a few scattered ones are failures for the retries
//!   and the circuit breaker, not a reason to slow down;
//! - *pacing*: below one call in flight (a fast processor with a low rate limit,
//!   where a single call at a time already exceeds it) the same limit becomes a
//!   rate, one call per round trip divided by the limit.
//!
//! The ceiling is `processing.max_in_flight`; token buckets stay ceilings too.
//! [`AccountLimiter`] applies the limit to calls: fresh requests go before
//! follow-mode re-checks when the window is full, and re-checks may use at most
//! `follow.share` of it while fresh requests wait.

use std::collections::VecDeque;
use std::sync::Mutex;
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

    /// True while slow start lasts.
    pub fn in_slow_start(&self) -> bool {
        self.slow_start
    }

    /// Calls in flight at most now.
    pub fn concurrency(&self) -> usize {
        (self.limit.floor() as usize).max(1)
    }

    /// Below one call in flight: the time between two call starts.
    pub fn spacing(&self) -> Option<Duration> {
        (self.limit < 1.0).then(|| self.rtt().div_f64(self.limit.max(MIN_LIMIT)))
    }

    /// A call starts with `in_flight` calls (itself included) running.
    pub fn started(&mut self, in_flight: usize, now: Instant) {
        self.roll(now);
        if in_flight >= self.concurrency() {
            self.window_full = true;
        }
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
                if let Some(after) = after {
                    let until = now + after;
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
        // A zero-length window (a round trip measured as zero) has no rate.
        if !elapsed.is_zero() {
            let sample = f64::from(self.window_answered) / elapsed.as_secs_f64();
            self.answered_rate = Some(match self.answered_rate {
                None => sample,
                Some(r) => r * (1.0 - RATE_WEIGHT) + sample * RATE_WEIGHT,
            });
        }
        let held = self.hold_until.is_some_and(|h| now < h);
        if self.window_full && !self.window_decreased && !held {
            self.limit = if self.slow_start {
                self.limit * 2.0
            } else if self.limit < 1.0 {
                // Pacing: grow by a round trip's worth of calls, as the
                // concurrency would.
                (self.limit * 1.25).min(1.0)
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
    in_flight: usize,
    rechecks_in_flight: usize,
    /// Waiting calls; a slot is handed to a waiter (counted in `in_flight`
    /// before it wakes) together with when it may start (pacing).
    fresh: VecDeque<oneshot::Sender<Instant>>,
    rechecks: VecDeque<oneshot::Sender<Instant>>,
    /// Pacing: when the next call may start.
    next_start: Instant,
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
}

/// What an attempt to start a call came to.
enum Next {
    /// A slot (already counted), usable from then on (pacing).
    Go(Instant),
    /// Queued: a slot will be handed over.
    Queue(oneshot::Receiver<Instant>),
}

/// A queued call: if it is dropped after a slot was handed to it, the slot goes
/// back.
struct Waiting<'a> {
    limiter: &'a AccountLimiter,
    priority: Priority,
    rx: oneshot::Receiver<Instant>,
    received: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.received && self.rx.try_recv().is_ok() {
            self.limiter
                .release(self.priority, Signal::Unknown, Duration::ZERO);
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
pub struct Permit<'a> {
    limiter: &'a AccountLimiter,
    priority: Priority,
    started: Instant,
    done: bool,
}

impl Permit<'_> {
    /// The call ended with `signal`.
    pub fn finish(mut self, signal: Signal) {
        self.done = true;
        self.limiter
            .release(self.priority, signal, self.started.elapsed());
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.limiter
                .release(self.priority, Signal::Unknown, self.started.elapsed());
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
                next_start: now,
            }),
            share: share.clamp(0.0, 1.0),
            on_limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current limit.
    pub fn limit(&self) -> f64 {
        let s = self.lock();
        s.fixed.map_or(s.law.limit(), |n| n as f64)
    }

    /// Waits for room in the account's window (and, below one call in flight,
    /// for the pacing interval).
    pub async fn acquire(&self, priority: Priority) -> Permit<'_> {
        let start_at = match self.try_acquire(priority) {
            Next::Go(at) => at,
            Next::Queue(rx) => {
                let mut waiting = Waiting {
                    limiter: self,
                    priority,
                    rx,
                    received: false,
                };
                let at = (&mut waiting.rx).await;
                waiting.received = true;
                // The sender never drops unanswered (a waiter is only ever
                // removed to be handed a slot).
                at.unwrap_or_else(|_| Instant::now())
            }
        };
        // The slot is counted: a permit owns it from here, even while it waits
        // for its pacing interval.
        let mut permit = Permit {
            limiter: self,
            priority,
            started: Instant::now(),
            done: false,
        };
        tokio::time::sleep_until(start_at).await;
        permit.started = Instant::now();
        permit
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

    /// Counts a call in and returns when it may start.
    fn take(&self, s: &mut State, priority: Priority, now: Instant) -> Instant {
        s.in_flight += 1;
        if priority == Priority::Recheck {
            s.rechecks_in_flight += 1;
        }
        let in_flight = s.in_flight;
        s.law.started(in_flight, now);
        match s.law.spacing().filter(|_| s.fixed.is_none()) {
            Some(spacing) => {
                let at = s.next_start.max(now);
                s.next_start = at + spacing;
                at
            }
            None => now,
        }
    }

    fn release(&self, priority: Priority, signal: Signal, latency: Duration) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if priority == Priority::Recheck {
            s.rechecks_in_flight = s.rechecks_in_flight.saturating_sub(1);
        }
        let before = s.law.limit();
        s.law.ended(signal, latency, Instant::now());
        let after = s.law.limit();
        if s.fixed.is_none() && (after - before).abs() > f64::EPSILON {
            (self.on_limit)(after);
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
            let at = self.take(s, priority, Instant::now());
            if tx.send(at).is_err() {
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
        let mut now = Instant::now();
        let mut law = Aimd::new(500.0, now);
        let seen = run(&mut law, 10.0, 60, &mut now);
        assert!(!law.in_slow_start());
        // After the first overshoot it saws around the capacity: one increase per
        // window, one decrease (to DECREASE of it) per overshoot.
        for l in &seen[10..] {
            assert!((12.0 * DECREASE..12.0).contains(l), "{seen:?}");
        }
        let mean = seen[10..].iter().sum::<f64>() / 50.0;
        assert!(
            mean > 8.5,
            "mean limit {mean} of a capacity of 10: {seen:?}"
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
        let limiter = std::sync::Arc::new(AccountLimiter::new(
            Concurrency::Fixed(10),
            100,
            0.3,
            Box::new(|_| {}),
        ));
        // The window full of re-checks.
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(limiter.acquire(Priority::Recheck).await);
        }
        // Waiting: re-checks first in time, then fresh requests.
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
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
        let limiter = std::sync::Arc::new(AccountLimiter::new(
            Concurrency::Fixed(3),
            100,
            0.3,
            Box::new(|_| {}),
        ));
        let running = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
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
}
