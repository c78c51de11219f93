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

use tokio::sync::watch;
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
pub enum Permit {
    /// The circuit is closed.
    Normal,
    /// The single probe of a half-open circuit.
    Probe,
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
    changed: watch::Sender<u64>,
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
            changed: watch::Sender::new(0),
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
        self.changed.send_modify(|g| *g += 1);
    }

    /// True unless the circuit is closed.
    pub fn is_open(&self) -> bool {
        !matches!(*self.lock(), Phase::Closed { .. })
    }

    /// Waits until a call may be made.
    pub async fn acquire(&self, metrics: &Metrics) -> Permit {
        let mut changes = self.changed.subscribe();
        loop {
            let wait_until = {
                let mut phase = self.lock();
                match *phase {
                    Phase::Closed { .. } => return Permit::Normal,
                    Phase::Open { until, cooldown } if Instant::now() >= until => {
                        self.set(&mut phase, Phase::HalfOpen { cooldown }, metrics);
                        return Permit::Probe;
                    }
                    Phase::Open { until, .. } => Some(until),
                    Phase::HalfOpen { .. } => None,
                }
            };
            match wait_until {
                Some(until) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {}
                        _ = changes.changed() => {}
                    }
                }
                None => {
                    let _ = changes.changed().await;
                }
            }
        }
    }

    /// Records how a permitted call ended.
    pub fn record(&self, permit: Permit, verdict: Verdict, metrics: &Metrics) {
        let mut phase = self.lock();
        let now = Instant::now();
        match (*phase, permit, verdict) {
            (Phase::HalfOpen { .. }, Permit::Probe, Verdict::Throttled)
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
            (Phase::HalfOpen { cooldown }, Permit::Probe, Verdict::Failed) => {
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
            let p = b.acquire(&m).await;
            b.record(p, Verdict::Failed, &m);
        }
        assert!(!b.is_open());
        // A success resets the run.
        b.record(Permit::Normal, Verdict::Answered, &m);
        for _ in 0..3 {
            let p = b.acquire(&m).await;
            b.record(p, Verdict::Failed, &m);
        }
        assert!(b.is_open());
        assert!(m
            .render()
            .contains("paysync_circuit_open{connector=\"cm\"} 1"));
        let started = Instant::now();
        let probe = b.acquire(&m).await;
        assert_eq!(probe, Permit::Probe);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(10),
            "waited out the cool-down"
        );
        // Others wait while the probe is out; a failed probe doubles the cool-down.
        b.record(probe, Verdict::Failed, &m);
        let started = Instant::now();
        let probe = b.acquire(&m).await;
        assert_eq!(started.elapsed(), Duration::from_secs(20));
        b.record(probe, Verdict::Answered, &m);
        assert!(!b.is_open());
        assert!(m
            .render()
            .contains("paysync_circuit_open{connector=\"cm\"} 0"));
        assert_eq!(b.acquire(&m).await, Permit::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_released_when_the_probe_succeeds() {
        let m = std::sync::Arc::new(Metrics::new());
        let b = std::sync::Arc::new(breaker());
        for _ in 0..3 {
            b.record(Permit::Normal, Verdict::Failed, &m);
        }
        let probe = b.acquire(&m).await;
        assert_eq!(probe, Permit::Probe);
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let (b, m) = (b.clone(), m.clone());
                tokio::spawn(async move { b.acquire(&m).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            waiters.iter().all(|w| !w.is_finished()),
            "nobody passes while the probe is out"
        );
        b.record(probe, Verdict::Answered, &m);
        for w in waiters {
            assert_eq!(w.await.unwrap(), Permit::Normal);
        }
    }
}
