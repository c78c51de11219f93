//! The retry policy over classified call outcomes: exponential backoff with full
//! jitter, `Retry-After` honoured up to a cap, bounded attempts and bounded total
//! time, with the connector's [`CircuitBreaker`] in front of every call. After the
//! budget is spent the last failure is reported (an error event), never a payment
//! status, unless the circuit is open: then the connector is down, not this
//! request, and the request waits for the circuit instead (an outage becomes lag).
//!
//! Throttling (429) is lag too, not failure: a throttled request waits the
//! processor's `Retry-After` without spending its retry budget, but not forever:
//! after `retry.max_throttled` of it the request ends as a failed check (the
//! 429), while its account goes on serving the others.

use std::time::Duration;

use crate::clock::Instant;

use super::breaker::{BreakerSettings, CircuitBreaker, Verdict};
use super::gateway::Gateway;
use super::limit::Priority;
use super::{CallError, HttpRequest, RetryReason};
use crate::domain::event::CheckFailure;
use crate::domain::{StatusCheckRequest, StatusReport};

/// Retry settings of one connector (`connectors.<name>.retry`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RetrySettings {
    /// Connector calls per request, at most (the first call included).
    pub max_attempts: u32,
    /// Backoff before the first retry (full jitter up to this).
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Upper bound of one backoff.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Total time a request may spend retrying.
    #[serde(with = "humantime_serde")]
    pub max_elapsed: Duration,
    /// Upper bound honoured for a server's `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// How long one request may be throttled (429) in all before it ends as a
    /// failed check.
    #[serde(with = "humantime_serde")]
    pub max_throttled: Duration,
}

/// How a status check ended after retries.
#[derive(Debug)]
pub struct CheckResult {
    /// The report, or the failure to publish.
    pub outcome: Result<StatusReport, CheckFailure>,
    /// Status calls made in total.
    pub attempts: u32,
}

/// Backoff parameters and the connector's circuit breaker.
pub struct RetryPolicy {
    settings: RetrySettings,
    breaker: CircuitBreaker,
}

impl RetryPolicy {
    /// A policy from settings, with a breaker for the connector `name`.
    pub fn new(name: &'static str, settings: RetrySettings, circuit: BreakerSettings) -> Self {
        RetryPolicy {
            settings,
            breaker: CircuitBreaker::new(name, circuit),
        }
    }

    /// The connector's breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The delay before retry number `retry` (1-based): full jitter over
    /// `min(max_backoff, initial * 2^(retry-1))`, or the server's `Retry-After`
    /// (capped at `max_retry_after`) when it asked for longer.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let exp = self
            .settings
            .initial_backoff
            .saturating_mul(
                1u32.checked_shl(retry.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.settings.max_backoff);
        let jittered = exp.mul_f64(jitter.clamp(0.0, 1.0));
        match retry_after {
            Some(server) => server.min(self.settings.max_retry_after).max(jittered),
            None => jittered,
        }
    }

    /// Runs a status check through `client` with retries. With a `deadline`
    /// (one-off checks) it ends by then whatever happens, waiting on an open
    /// circuit included: a check that runs out reports `CONNECTOR_TIMEOUT` with
    /// the calls it made.
    pub async fn run(
        &self,
        client: &Gateway,
        request: &StatusCheckRequest,
        http_request: &HttpRequest,
        priority: Priority,
        deadline: Option<tokio::time::Instant>,
    ) -> CheckResult {
        let mut attempts = 0;
        let Some(deadline) = deadline else {
            return self
                .attempt(client, request, http_request, priority, &mut attempts)
                .await;
        };
        let started = Instant::now();
        let attempt = self.attempt(client, request, http_request, priority, &mut attempts);
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(result) => result,
            Err(_) => CheckResult {
                outcome: Err(CheckFailure::new(
                    crate::domain::event::FailureCode::ConnectorTimeout,
                    format!(
                        "no status within the deadline ({:.1}s, {attempts} call{} made{})",
                        started.elapsed().as_secs_f64(),
                        if attempts == 1 { "" } else { "s" },
                        if self.breaker.is_open() {
                            "; the circuit is open: the connector is failing"
                        } else {
                            ""
                        }
                    ),
                )),
                attempts,
            },
        }
    }

    async fn attempt(
        &self,
        client: &Gateway,
        request: &StatusCheckRequest,
        http_request: &HttpRequest,
        priority: Priority,
        attempts: &mut u32,
    ) -> CheckResult {
        let metrics = client.metrics();
        let mut started = Instant::now();
        // Retries in the current budget (reset after waiting out an open circuit).
        let mut retries = 0;
        // When this request was first throttled.
        let mut throttled_since: Option<Instant> = None;
        loop {
            let permit = self.breaker.acquire(metrics).await;
            let record = client.call_once(request, http_request, priority).await;
            *attempts += record.calls;
            let attempts = *attempts;
            let (failure, reason, retry_after) = match record.outcome {
                Ok(report) => {
                    permit.record(Verdict::Answered);
                    return CheckResult {
                        outcome: Ok(report),
                        attempts,
                    };
                }
                Err(CallError::Permanent(f) | CallError::Unauthorized(f)) => {
                    permit.record(Verdict::Answered);
                    return CheckResult {
                        outcome: Err(f),
                        attempts,
                    };
                }
                Err(CallError::Retryable {
                    reason: RetryReason::RateLimited,
                    retry_after,
                    failure,
                }) => {
                    // Throttling, not failure: the request waits for the
                    // Retry-After (jittered, so throttled requests do not all
                    // come back together) without spending its retry budget, and
                    // the circuit breaker, which is for outages, does not count it.
                    permit.record(Verdict::Throttled);
                    let wait = retry_after
                        .unwrap_or(self.settings.initial_backoff)
                        .min(self.settings.max_retry_after)
                        .mul_f64(1.0 + fastrand::f64() * 0.25);
                    let since = *throttled_since.get_or_insert_with(Instant::now);
                    #[cfg(feature = "mutations")]
                    let unbounded = crate::mutation::on("throttled_forever");
                    #[cfg(not(feature = "mutations"))]
                    let unbounded = false;
                    if !unbounded
                        && since.elapsed().saturating_add(wait) > self.settings.max_throttled
                    {
                        let mut failure = failure;
                        failure.message = format!(
                            "{} for {:.0}s, longer than retry.max_throttled ({}s): given up after {attempts} attempt{}",
                            failure.message,
                            since.elapsed().as_secs_f64(),
                            self.settings.max_throttled.as_secs(),
                            if attempts == 1 { "" } else { "s" },
                        );
                        metrics.throttled_too_long(client.name());
                        return CheckResult {
                            outcome: Err(failure),
                            attempts,
                        };
                    }
                    metrics.connector_retry(client.name(), RetryReason::RateLimited.label());
                    tracing::debug!(
                        wait_ms = wait.as_millis() as u64,
                        "throttled by the connector; waiting"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(CallError::Retryable {
                    failure,
                    reason,
                    retry_after,
                }) => {
                    permit.record(Verdict::Failed);
                    (failure, reason, retry_after)
                }
            };
            retries += 1;
            let delay = self.delay(retries, retry_after, fastrand::f64());
            let spent = retries >= self.settings.max_attempts
                || started.elapsed() + delay > self.settings.max_elapsed;
            if spent && self.breaker.is_open() {
                // The connector is down, not this request: wait for the circuit
                // (acquire blocks) with a fresh budget instead of reporting a failure.
                tracing::debug!(
                    attempts,
                    "retry budget spent during an outage; waiting for the circuit"
                );
                retries = 0;
                started = Instant::now();
                metrics.connector_retry(client.name(), reason.label());
                continue;
            }
            if spent {
                let mut failure = failure;
                failure.message = format!(
                    "{} (gave up after {attempts} attempt{} in {:.1}s)",
                    failure.message,
                    if attempts == 1 { "" } else { "s" },
                    started.elapsed().as_secs_f64()
                );
                return CheckResult {
                    outcome: Err(failure),
                    attempts,
                };
            }
            metrics.connector_retry(client.name(), reason.label());
            tracing::debug!(
                reason = reason.label(),
                delay_ms = delay.as_millis() as u64,
                "retrying connector call"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(
            "cm",
            RetrySettings {
                max_attempts: 5,
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                max_elapsed: Duration::from_secs(30),
                max_retry_after: Duration::from_secs(10),
                max_throttled: Duration::from_secs(600),
            },
            BreakerSettings {
                failure_threshold: 5,
                cooldown: Duration::from_secs(1),
                max_cooldown: Duration::from_secs(5),
            },
        )
    }

    #[test]
    fn exponential_with_full_jitter_and_cap() {
        let p = policy();
        assert_eq!(p.delay(1, None, 1.0), Duration::from_millis(100));
        assert_eq!(p.delay(2, None, 1.0), Duration::from_millis(200));
        assert_eq!(p.delay(4, None, 1.0), Duration::from_millis(800));
        assert_eq!(p.delay(10, None, 1.0), Duration::from_secs(2));
        assert_eq!(p.delay(60, None, 1.0), Duration::from_secs(2));
        assert_eq!(p.delay(3, None, 0.0), Duration::ZERO);
        assert_eq!(p.delay(3, None, 0.5), Duration::from_millis(200));
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let p = policy();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3)), 1.0),
            Duration::from_secs(3)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600)), 1.0),
            Duration::from_secs(10)
        );
        // A Retry-After shorter than the backoff does not shorten it.
        assert_eq!(
            p.delay(4, Some(Duration::ZERO), 1.0),
            Duration::from_millis(800)
        );
    }
}
