//! At least once: publishing one record and waiting for the broker's
//! acknowledgement, with errors told apart. The client is the [`Produce`]
//! trait (rdkafka's idempotent, `acks=all` producer in `kafka::producer`, a
//! fake in the deterministic simulation).
//!
//! A retriable error (broker unreachable, timed out, leader moving) is retried
//! with backoff for as long as the partition is still owned, so a broker outage
//! becomes lag, never loss. A permanent one (record too large, unknown topic or
//! partition, authorization failed, invalid record) will not go away by
//! retrying the same record: for an event the caller dead-letters the request
//! instead; for a dead letter or a follow chain's re-check record there is
//! nowhere else to put it, so the partition stops loudly (the offset stays
//! uncommitted, the partition is marked stalled, an error is logged at each slow
//! retry) and resumes by itself once the broker accepts the record (the topic
//! was created, the ACL granted).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::dispatch::{Delivery, Publish};
use super::record::{Destination, Outgoing};
use super::PublishGate;
use crate::telemetry::Metrics;

/// How one produce attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProduceError {
    /// Retrying the same record can succeed.
    Retriable(String),
    /// Retrying the same record cannot succeed until something outside changes.
    Permanent {
        /// Why.
        reason: String,
        /// Refused for its size.
        too_large: bool,
    },
    /// The producer is unusable: the process must be restarted.
    Fatal(String),
}

impl std::fmt::Display for ProduceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProduceError::Retriable(e) | ProduceError::Fatal(e) => f.write_str(e),
            ProduceError::Permanent { reason, .. } => f.write_str(reason),
        }
    }
}

/// An idempotent producer: one record, acknowledged or not.
pub trait Produce: Send + Sync + 'static {
    /// Sends `out` to `topic` and waits for the broker's acknowledgement.
    fn produce<'a>(
        &'a self,
        topic: &'a str,
        out: &'a Outgoing,
    ) -> BoxFuture<'a, Result<(), ProduceError>>;
}

/// The first wait after a dead letter is refused permanently; it doubles up to
/// [`STALL_MAX_BACKOFF`]. Each refusal logs one error line, so these also bound
/// how often a stalled partition logs.
const STALL_FIRST_BACKOFF: Duration = Duration::from_secs(2);
const STALL_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Publishes records through a [`Produce`], with the topics they go to.
pub struct Publisher {
    producer: Arc<dyn Produce>,
    events_topic: String,
    dead_letter_topic: String,
    metrics: Arc<Metrics>,
    fatal: AtomicBool,
}

impl Publisher {
    /// A publisher to these topics.
    pub fn new(
        producer: Arc<dyn Produce>,
        events_topic: &str,
        dead_letter_topic: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        Publisher {
            producer,
            events_topic: events_topic.to_owned(),
            dead_letter_topic: dead_letter_topic.to_owned(),
            metrics,
            fatal: AtomicBool::new(false),
        }
    }

    /// False once the producer hit a fatal error (`/healthz` then fails, so the
    /// orchestrator restarts the process; uncommitted work is redone).
    pub fn is_healthy(&self) -> bool {
        !self.fatal.load(Ordering::Acquire)
    }

    /// Publishes `out` while `gate` says its partition is owned: acknowledged,
    /// abandoned (the partition went), or refused (an event the broker will never
    /// take). Retriable errors are retried with backoff; a dead letter or a
    /// re-check record the broker refuses stalls the partition until it is taken.
    pub async fn publish(&self, out: &Outgoing, gate: &dyn PublishGate) -> Delivery {
        let (topic, role): (&str, &str) = match &out.destination {
            Destination::Events => (&self.events_topic, "events"),
            Destination::DeadLetters => (&self.dead_letter_topic, "dead_letters"),
            Destination::Recheck(topic) => (topic, "rechecks"),
        };
        let mut backoff = Duration::from_millis(100);
        let mut stall_backoff = STALL_FIRST_BACKOFF;
        let mut stalled = false;
        loop {
            if !gate.begin() {
                if stalled {
                    gate.stalled(None);
                }
                return Delivery::Abandoned;
            }
            let result = self.producer.produce(topic, out).await;
            gate.end();
            let error = match result {
                Ok(()) => {
                    if stalled {
                        gate.stalled(None);
                        tracing::warn!(
                            partition = gate.partition(),
                            "dead letter accepted; partition resumed"
                        );
                    }
                    return Delivery::Published;
                }
                Err(e) => e,
            };
            match &error {
                ProduceError::Fatal(_) => {
                    if !self.fatal.swap(true, Ordering::AcqRel) {
                        tracing::error!(error = %error, "the producer hit a fatal error; /healthz fails so that the process is restarted");
                    }
                }
                ProduceError::Permanent { too_large, .. } => {
                    self.metrics.publish_refused(role);
                    match out.destination {
                        Destination::Events => return Delivery::Refused(error.to_string()),
                        // A re-check record too large for the topic ends its chain
                        // (the caller dead-letters the request): never retried forever.
                        Destination::Recheck(_) if *too_large => {
                            return Delivery::Refused(error.to_string())
                        }
                        // Nowhere else to put a dead letter or a chain's next check: stop.
                        Destination::DeadLetters | Destination::Recheck(_) => {
                            let reason =
                                format!("topic `{topic}` refuses the {role} record: {error}");
                            tracing::error!(
                                partition = gate.partition(),
                                reason = %reason,
                                retry_in_s = stall_backoff.as_secs(),
                                "partition stalled: a record cannot be published; its offset stays uncommitted until the broker accepts it"
                            );
                            gate.stalled(Some(reason));
                            stalled = true;
                            tokio::time::sleep(stall_backoff).await;
                            stall_backoff = (stall_backoff * 2).min(STALL_MAX_BACKOFF);
                            continue;
                        }
                    }
                }
                ProduceError::Retriable(_) => {}
            }
            self.metrics.publish_retry(role);
            tracing::warn!(topic = %topic, error = %error, retry_in_ms = backoff.as_millis() as u64, "publish failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

impl Publish for Publisher {
    fn publish<'a>(
        &'a self,
        out: &'a Outgoing,
        gate: &'a dyn PublishGate,
    ) -> BoxFuture<'a, Delivery> {
        Box::pin(Publisher::publish(self, out, gate))
    }
}
