//! Publishing events and dead letters: an idempotent, `acks=all` producer. A
//! record counts as published only when the broker acknowledged it; a delivery
//! error is retried with backoff for as long as the partition is still owned, so a
//! broker outage becomes lag, never loss.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;

use crate::pipeline::ledger::{Epoch, Ledger};
use crate::pipeline::process::{Destination, Outgoing};
use crate::telemetry::Metrics;

/// Whether a record reached the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Acknowledged by the broker.
    Published,
    /// Not published: the partition was revoked or the process is stopping.
    Abandoned,
}

/// The producer plus topic names.
pub struct Publisher {
    producer: FutureProducer,
    events_topic: String,
    dead_letter_topic: String,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// Creates the producer.
    pub fn new(
        config: &ClientConfig,
        events_topic: &str,
        dead_letter_topic: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let producer: FutureProducer = config
            .create()
            .map_err(|e| format!("cannot create Kafka producer: {e}"))?;
        Ok(Publisher {
            producer,
            events_topic: events_topic.to_owned(),
            dead_letter_topic: dead_letter_topic.to_owned(),
            metrics,
        })
    }

    /// The underlying producer (readiness checks).
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Publishes `out` for the message at `partition`/`epoch`, retrying delivery
    /// errors while the partition is owned.
    pub async fn publish(
        &self,
        out: &Outgoing,
        ledger: &Ledger,
        partition: i32,
        epoch: Epoch,
    ) -> Delivery {
        let (topic, role) = match out.destination {
            Destination::Events => (&self.events_topic, "events"),
            Destination::DeadLetters => (&self.dead_letter_topic, "dead_letters"),
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            if !ledger.begin_publish(partition, epoch) {
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
            ledger.end_publish(partition, epoch);
            match result {
                Ok(_) => return Delivery::Published,
                Err((e, _)) => {
                    self.metrics.publish_retry(role);
                    tracing::warn!(topic = %topic, error = %e, retry_in_ms = backoff.as_millis() as u64, "publish failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Waits for queued records to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), String> {
        self.producer
            .flush(timeout)
            .map_err(|e| format!("producer flush: {e}"))
    }
}
