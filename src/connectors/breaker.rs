//! A circuit breaker per connector. After `failure_threshold` retryable failures in
//! a row (timeouts, transport errors, 408, 429, 5xx, from any request) it *opens*:
//! calls wait instead of being made, so requests keep their place and their
//! attempts, in-flight slots fill up and consumption stops (lag, not errors).
//! After `cooldown` one probe call is let through (*half-open*): success closes the
//! circuit and everyone proceeds; failure opens it again with the cool-down
//! doubled, up to `max_cooldown`. Successes and permanent answers (the connector
//! is up and answering) reset the count.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::telemetry::Metrics;

/// Breaker settings (`connectors.<name>.circuit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BreakerSettings {
    /// Consecutive retryable failures that open the circuit (at most `retry.max_attempts`).
    pub failure_threshold: u32,
    /// First wait before a probe.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Longest wait before a probe.
    #[serde(with = "humantime_serde")]
    pub max_cooldown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed { failures: u32 },
    Open { until: Instant, cooldown: Duration },
    HalfOpen { cooldown: Duration },
}

/// What a call was allowed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The circuit is closed.
    Normal,
    /// The single probe of a half-open circuit.
    Probe,
}

/// The right to make one call; say how it ended with [`Permit::record`]. A
/// probe dropped unrecorded (its caller panicked or was cancelled) opens the
/// circuit again for another probe at once, so that the connector's other
/// calls never wait for an answer that cannot come.
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    metrics: &'a Metrics,
    kind: Kind,
    done: bool,
}

impl Permit<'_> {
    /// What the call was allowed as.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// How the call ended.
    pub fn record(mut self, verdict: Verdict) {
        self.done = true;
        self.breaker.record(self.kind, verdict, self.metrics);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        #[cfg(feature = "mutations")]
        if crate::mutation::on("probe_leak") {
            return;
        }
        if !self.done && self.kind == Kind::Probe {
            self.breaker.probe_lost(self.metrics);
        }
    }
}

/// How a permitted call ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The connector answered (a status, or a permanent error such as 404).
    Answered,
    /// A retryable failure (timeout, transport, 408, 5xx).
    Failed,
    /// 429: the processor throttles this credential. It is up and answering,
    /// so this neither counts as a failure nor resets the run of failures; a
    /// throttled probe shows it is up.
    Throttled,
}

/// The breaker of one connector.
pub struct CircuitBreaker {
    name: &'static str,
    settings: BreakerSettings,
    phase: Mutex<Phase>,
    /// Woken at every change of phase. A `Notify` wakes its waiters in the
    /// order they came (a watch channel spreads them over several at random,
    /// which a simulated run could not replay).
    changed: Notify,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(name: &'static str, settings: BreakerSettings) -> Self {
        CircuitBreaker {
            name,
            settings: BreakerSettings {
                failure_threshold: settings.failure_threshold.max(1),
                ..settings
            },
            phase: Mutex::new(Phase::Closed { failures: 0 }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, phase: &mut Phase, next: Phase, metrics: &Metrics) {
        let was_closed = matches!(phase, Phase::Closed { .. });
        *phase = next;
        let closed = matches!(next, Phase::Closed { .. });
        if was_closed != closed {
            metrics.set_circuit_open(self.name, !closed);
            if closed {
                tracing::info!(connector = self.name, "circuit closed: connector recovered");
            } else {
                tracing::warn!(
                    connector = self.name,
                    "circuit open: connector failing; new calls wait"
                );
            }
        }
        self.changed.notify_waiters();
    }

    /// True unless the circuit is closed.
    pub fn is_open(&self) -> bool {
        !matches!(*self.lock(), Phase::Closed { .. })
    }

    /// Waits until a call may be made.
    pub async fn acquire<'a>(&'a self, metrics: &'a Metrics) -> Permit<'a> {
        let permit = |kind| Permit {
            breaker: self,
            metrics,
            kind,
            done: false,
        };
        loop {
            // Registered before looking, so a change in between is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wait_until = {
                let mut phase = self.lock();
                match *phase {
                    Phase::Closed { .. } => return permit(Kind::Normal),
                    Phase::Open { until, cooldown } if Instant::now() >= until => {
                        self.set(&mut phase, Phase::HalfOpen { cooldown }, metrics);
                        return permit(Kind::Probe);
                    }
                    Phase::Open { until, .. } => Some(until),
                    Phase::HalfOpen { .. } => None,
                }
            };
            match wait_until {
                Some(until) => {
                    // Biased: the same branch first every time, so a simulated
                    // run replays exactly.
                    tokio::select! {
                        biased;
                        () = tokio::time::sleep_until(until) => {}
                        () = &mut changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// A probe ended without an answer: the circuit is open again, ready for
    /// another probe at once.
    fn probe_lost(&self, metrics: &Metrics) {
        let mut phase = self.lock();
        if let Phase::HalfOpen { cooldown } = *phase {
            let next = Phase::Open {
                until: Instant::now(),
                cooldown,
            };
            self.set(&mut phase, next, metrics);
        }
    }

    /// Records how a call permitted as `kind` ended (see [`Permit::record`]).
    fn record(&self, kind: Kind, verdict: Verdict, metrics: &Metrics) {
        let mut phase = self.lock();
        let now = Instant::now();
        match (*phase, kind, verdict) {
            (Phase::HalfOpen { .. }, Kind::Probe, Verdict::Throttled)
            | (_, _, Verdict::Answered) => {
                if !matches!(*phase, Phase::Closed { failures: 0 }) {
                    self.set(&mut phase, Phase::Closed { failures: 0 }, metrics);
                }
            }
            (Phase::Closed { failures }, _, Verdict::Failed) => {
                let failures = failures + 1;
                let next = if failures >= self.settings.failure_threshold {
                    Phase::Open {
                        until: now + self.settings.cooldown,
                        cooldown: self.settings.cooldown,
                    }
                } else {
                    Phase::Closed { failures }
                };
                self.set(&mut phase, next, metrics);
            }
            (Phase::HalfOpen { cooldown }, Kind::Probe, Verdict::Failed) => {
                let cooldown = (cooldown * 2).min(self.settings.max_cooldown);
                self.set(
                    &mut phase,
                    Phase::Open {
                        until: now + cooldown,
                        cooldown,
                    },
                    metrics,
                );
            }
            // A call that was already under way when the circuit opened.
            (Phase::Open { .. } | Phase::HalfOpen { .. }, _, Verdict::Failed) => {}
            (_, _, Verdict::Throttled) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(
            "cm",
            BreakerSettings {
                failure_threshold: 3,
                cooldown: Duration::from_secs(10),
                max_cooldown: Duration::from_secs(60),
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_a_run_of_failures_and_probes_after_the_cooldown() {
        let m = Metrics::new();
        let b = breaker();
        for _ in 0..2 {
            b.acquire(&m).await.record(Verdict::Failed);
        }
        assert!(!b.is_open());
        // A success resets the run.
        b.acquire(&m).await.record(Verdict::Answered);
        for _ in 0..3 {
            b.acquire(&m).await.record(Verdict::Failed);
        }
        assert!(b.is_open());
        assert!(m
            .render()
            .contains("paysync_circuit_open{connector=\"cm\"} 1"));
        let started = Instant::now();
        let probe = b.acquire(&m).await;
        assert_eq!(probe.kind(), Kind::Probe);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(10),
            "waited out the cool-down"
        );
        // Others wait while the probe is out; a failed probe doubles the cool-down.
        probe.record(Verdict::Failed);
        let started = Instant::now();
        let probe = b.acquire(&m).await;
        assert_eq!(started.elapsed(), Duration::from_secs(20));
        probe.record(Verdict::Answered);
        assert!(!b.is_open());
        assert!(m
            .render()
            .contains("paysync_circuit_open{connector=\"cm\"} 0"));
        assert_eq!(b.acquire(&m).await.kind(), Kind::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_released_when_the_probe_succeeds() {
        let m = std::sync::Arc::new(Metrics::new());
        let b = std::sync::Arc::new(breaker());
        for _ in 0..3 {
            b.acquire(&m).await.record(Verdict::Failed);
        }
        let probe = b.acquire(&m).await;
        assert_eq!(probe.kind(), Kind::Probe);
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let (b, m) = (b.clone(), m.clone());
                tokio::spawn(async move { b.acquire(&m).await.kind() })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            waiters.iter().all(|w| !w.is_finished()),
            "nobody passes while the probe is out"
        );
        probe.record(Verdict::Answered);
        for w in waiters {
            assert_eq!(w.await.unwrap(), Kind::Normal);
        }
    }

    /// Found by the simulation: a translation panic during the probe call
    /// dropped the probe unrecorded, and the circuit stayed half-open for good:
    /// every later call of the connector waited forever.
    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_unanswered_lets_another_probe_through() {
        let m = std::sync::Arc::new(Metrics::new());
        let b = std::sync::Arc::new(breaker());
        for _ in 0..3 {
            b.acquire(&m).await.record(Verdict::Failed);
        }
        let probe = b.acquire(&m).await;
        assert_eq!(probe.kind(), Kind::Probe);
        let waiter = {
            let (b, m) = (b.clone(), m.clone());
            tokio::spawn(async move { b.acquire(&m).await.kind() })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        drop(probe);
        assert_eq!(waiter.await.unwrap(), Kind::Probe, "the next caller probes");
    }
}
