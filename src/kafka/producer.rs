//! Publishing events and dead letters: an idempotent, `acks=all` producer. A
//! record counts as published only when the broker acknowledged it.
//!
//! Errors are told apart. A retriable one (broker unreachable, timed out, leader
//! moving) is retried with backoff for as long as the partition is still owned,
//! so a broker outage becomes lag, never loss. A permanent one (record too large,
//! unknown topic or partition, authorization failed, invalid record) will not go
//! away by retrying the same record: for an event the caller dead-letters the
//! request instead; for a dead letter or a follow chain's re-check record there is
//! nowhere else to put it, so the partition stops loudly (the offset stays uncommitted, the partition is marked
//! stalled, an error is logged at each slow retry) and resumes by itself once the
//! broker accepts the record (the topic was created, the ACL granted).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;

use crate::pipeline::process::{Destination, Outgoing};
use crate::pipeline::PublishGate;
use crate::telemetry::Metrics;

pub use crate::pipeline::dispatch::Delivery;

/// How a produce error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Retrying the same record can succeed.
    Retriable,
    /// Retrying the same record cannot succeed until something outside changes.
    Permanent,
    /// The idempotent producer is unusable: the process must be restarted.
    Fatal,
}

/// Classifies a produce error code.
pub fn classify(code: RDKafkaErrorCode) -> ErrorKind {
    use RDKafkaErrorCode as C;
    match code {
        C::Fatal => ErrorKind::Fatal,
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::InvalidRecord
        | C::InvalidMessage
        | C::PolicyViolation
        | C::InvalidArgument => ErrorKind::Permanent,
        _ => ErrorKind::Retriable,
    }
}

/// The first wait after a dead letter is refused permanently; it doubles up to
/// [`STALL_MAX_BACKOFF`]. Each refusal logs one error line, so these also bound
/// how often a stalled partition logs.
const STALL_FIRST_BACKOFF: Duration = Duration::from_secs(2);
const STALL_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The producer plus topic names.
pub struct Publisher {
    producer: FutureProducer,
    events_topic: String,
    dead_letter_topic: String,
    metrics: Arc<Metrics>,
    fatal: AtomicBool,
}

impl Publisher {
    /// Creates the producer.
    pub fn new(
        config: &ClientConfig,
        events_topic: &str,
        dead_letter_topic: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KafkaError> {
        let producer: FutureProducer = config.create()?;
        Ok(Publisher {
            producer,
            events_topic: events_topic.to_owned(),
            dead_letter_topic: dead_letter_topic.to_owned(),
            metrics,
            fatal: AtomicBool::new(false),
        })
    }

    /// The underlying producer (readiness checks).
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
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
            let headers = super::headers::build(
                out.headers
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_deref())),
            );
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
            if let Some(k) = &out.key {
                record = record.key(k);
            }
            if let Some(v) = &out.value {
                record = record.payload(v);
            }
            let result = self.producer.send(record, Timeout::Never).await;
            gate.end();
            let error = match result {
                Ok(_) => {
                    if stalled {
                        gate.stalled(None);
                        tracing::warn!(
                            partition = gate.partition(),
                            "dead letter accepted; partition resumed"
                        );
                    }
                    return Delivery::Published;
                }
                Err((e, _)) => e,
            };
            let kind = match &error {
                KafkaError::MessageProduction(code) => classify(*code),
                _ => ErrorKind::Retriable,
            };
            if kind == ErrorKind::Fatal || self.producer.client().fatal_error().is_some() {
                if !self.fatal.swap(true, Ordering::AcqRel) {
                    tracing::error!(error = %error, "the producer hit a fatal error; /healthz fails so that the process is restarted");
                }
            } else if kind == ErrorKind::Permanent {
                self.metrics.publish_refused(role);
                let too_large = matches!(
                    &error,
                    KafkaError::MessageProduction(
                        RDKafkaErrorCode::MessageSizeTooLarge
                            | RDKafkaErrorCode::InvalidMessageSize
                    )
                );
                match out.destination {
                    Destination::Events => return Delivery::Refused(error.to_string()),
                    // A re-check record too large for the topic ends its chain
                    // (the caller dead-letters the request): never retried forever.
                    Destination::Recheck(_) if too_large => {
                        return Delivery::Refused(error.to_string())
                    }
                    // Nowhere else to put a dead letter or a chain's next check: stop.
                    Destination::DeadLetters | Destination::Recheck(_) => {
                        let reason = format!("topic `{topic}` refuses the {role} record: {error}");
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
            self.metrics.publish_retry(role);
            tracing::warn!(topic = %topic, error = %error, retry_in_ms = backoff.as_millis() as u64, "publish failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Waits for queued records to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), String> {
        self.producer
            .flush(timeout)
            .map_err(|e| format!("producer flush: {e}"))
    }
}

impl crate::pipeline::dispatch::Publish for Publisher {
    fn publish<'a>(
        &'a self,
        out: &'a Outgoing,
        gate: &'a dyn PublishGate,
    ) -> futures::future::BoxFuture<'a, Delivery> {
        Box::pin(Publisher::publish(self, out, gate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn produce_errors_are_classified() {
        use RDKafkaErrorCode as C;
        for permanent in [
            C::MessageSizeTooLarge,
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
            C::TopicAuthorizationFailed,
            C::InvalidRecord,
        ] {
            assert_eq!(classify(permanent), ErrorKind::Permanent, "{permanent:?}");
        }
        for retriable in [
            C::MessageTimedOut,
            C::NotLeaderForPartition,
            C::RequestTimedOut,
            C::AllBrokersDown,
            C::NotEnoughReplicas,
            C::BrokerTransportFailure,
        ] {
            assert_eq!(classify(retriable), ErrorKind::Retriable, "{retriable:?}");
        }
        assert_eq!(classify(C::Fatal), ErrorKind::Fatal);
    }
}
