//! What one consumed message becomes. [`Processor::prepare`] decodes and routes it
//! (pure): a status check for a known connector and account, or a rejection.
//! [`Processor::run`] performs the check (with retries) and builds the record to
//! publish: an Avro event keyed by transaction id, or a dead letter that keeps the
//! original key, value and headers and adds the `paysync-*` headers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::codec::{
    decode_request, DecodeOptions, EventEncoder, RawHeader, RejectCode, Rejection, SourcePosition,
};
use crate::connectors::client::ConnectorClient;
use crate::connectors::retry::RetryPolicy;
use crate::connectors::HttpRequest;
use crate::domain::event::{event_id, Envelope, SecretFields};
use crate::domain::{PaymentStatus, PaymentStatusEvent, StatusCheckRequest};
use crate::pipeline::ledger::Epoch;
use crate::pipeline::scheduler::Job;
use crate::telemetry::{Metrics, Outcome};

/// A consumed message, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Source topic.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Kafka key.
    pub key: Option<Vec<u8>>,
    /// Kafka value.
    pub value: Option<Vec<u8>>,
    /// Kafka headers in order, as bytes (names may not be UTF-8, values may be null).
    pub headers: Vec<RecordHeader>,
    /// When it was consumed.
    pub received: Instant,
}

/// A Kafka header as bytes: name, and value (null when the producer sent none).
pub type RecordHeader = (Vec<u8>, Option<Vec<u8>>);

/// A connector ready for use: client plus retry policy.
pub struct ConnectorRuntime {
    /// The client.
    pub client: ConnectorClient,
    /// Its retry policy.
    pub policy: RetryPolicy,
}

/// What a job does.
pub enum Work {
    /// Check the status of a payment.
    Check {
        /// The request.
        request: Box<StatusCheckRequest>,
        /// The prepared connector request.
        http: Box<HttpRequest>,
        /// The connector.
        connector: Arc<ConnectorRuntime>,
    },
    /// Dead-letter the message.
    Reject(Rejection),
}

/// One consumed message on its way through the engine.
pub struct PipelineJob {
    /// The message.
    pub incoming: Incoming,
    /// Ownership epoch of its partition.
    pub epoch: Epoch,
    /// Ordering key: connector and transaction id.
    pub key: Option<String>,
    /// What to do.
    pub work: Work,
}

impl Job for PipelineJob {
    fn partition(&self) -> i32 {
        self.incoming.partition
    }
    fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

/// Which output a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The event topic.
    Events,
    /// The dead-letter topic.
    DeadLetters,
}

/// A record to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Where to.
    pub destination: Destination,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Headers, written byte for byte.
    pub headers: Vec<RecordHeader>,
    /// Bounded label: the status or the dead-letter reason.
    pub label: &'static str,
    /// Request outcome for metrics.
    pub outcome: Outcome,
    /// For logs: status or reason, with the message for dead letters.
    pub summary: String,
}

/// Content type of events.
pub const EVENT_CONTENT_TYPE: &str = "application/avro";

/// Turns messages into records.
pub struct Processor {
    connectors: HashMap<String, Arc<ConnectorRuntime>>,
    decode: DecodeOptions,
    encoder: EventEncoder,
    secrets: SecretFields,
    metrics: Arc<Metrics>,
}

impl Processor {
    /// A processor over these connectors.
    pub fn new(
        connectors: HashMap<String, Arc<ConnectorRuntime>>,
        decode: DecodeOptions,
        encoder: EventEncoder,
        secrets: SecretFields,
        metrics: Arc<Metrics>,
    ) -> Self {
        Processor {
            connectors,
            decode,
            encoder,
            secrets,
            metrics,
        }
    }

    /// Decodes and routes a message (no I/O).
    pub fn prepare(&self, incoming: Incoming, epoch: Epoch) -> PipelineJob {
        let headers: Vec<RawHeader<'_>> = incoming
            .headers
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_deref()))
            .collect();
        let position = SourcePosition {
            topic: &incoming.topic,
            partition: incoming.partition,
            offset: incoming.offset,
        };
        let routed = decode_request(incoming.value.as_deref(), &headers, position, &self.decode)
            .and_then(|request| {
                let connector = self.connectors.get(&request.connector).ok_or_else(|| {
                    Rejection::new(
                        RejectCode::UnknownConnector,
                        format!("connector `{}` is not configured", request.connector),
                    )
                })?;
                let http = connector.client.prepare(&request)?;
                Ok((request, http, connector.clone()))
            });
        let (key, work) = match routed {
            Ok((request, http, connector)) => (
                Some(format!(
                    "{}/{}",
                    request.connector, request.connector_transaction_id
                )),
                Work::Check {
                    request: Box::new(request),
                    http: Box::new(http),
                    connector,
                },
            ),
            Err(rejection) => (None, Work::Reject(rejection)),
        };
        PipelineJob {
            incoming,
            epoch,
            key,
            work,
        }
    }

    /// Runs a job to the record it publishes.
    pub async fn run(&self, job: &PipelineJob) -> Outgoing {
        match &job.work {
            Work::Reject(rejection) => {
                dead_letter(&job.incoming, rejection.code.as_str(), &rejection.message)
            }
            Work::Check {
                request,
                http,
                connector,
            } => {
                let result = connector
                    .policy
                    .run(&connector.client, &self.metrics, request, http)
                    .await;
                let outcome = if result.outcome.is_ok() {
                    Outcome::Synced
                } else {
                    Outcome::ConnectorError
                };
                if let Err(failure) = &result.outcome {
                    tracing::warn!(code = failure.code.as_str(), message = %failure.message, "status check failed");
                }
                let envelope = Envelope {
                    event_id: event_id(
                        &job.incoming.topic,
                        job.incoming.partition,
                        job.incoming.offset,
                    ),
                    observed_at_ms: now_ms(),
                    attempts: result.attempts,
                    raw_request: Some(http.describe()),
                };
                let event =
                    PaymentStatusEvent::build(request, envelope, result.outcome, self.secrets);
                match self.encoder.encode(&event) {
                    Ok(bytes) => Outgoing {
                        destination: Destination::Events,
                        key: Some(event.connector_transaction_id.clone().into_bytes()),
                        value: Some(bytes),
                        headers: vec![
                            header("x-request-id", &event.request_id),
                            header("x-connector", &event.connector),
                            header("x-merchant-id", &event.merchant_id),
                            header("content-type", EVENT_CONTENT_TYPE),
                        ],
                        label: event.status.as_str(),
                        outcome,
                        summary: status_summary(&event),
                    },
                    // A schema/value mismatch is a bug; keep the request rather than lose it.
                    Err(e) => dead_letter(
                        &job.incoming,
                        "internal_error",
                        &format!("event could not be encoded: {e}"),
                    ),
                }
            }
        }
    }
}

fn header(name: &str, value: &str) -> RecordHeader {
    (name.as_bytes().to_vec(), Some(value.as_bytes().to_vec()))
}

fn status_summary(event: &PaymentStatusEvent) -> String {
    match (&event.status, &event.error) {
        (PaymentStatus::PAYMENT_STATUS_UNSPECIFIED, Some(e)) => format!(
            "check failed: {}",
            e.unified_details
                .as_ref()
                .and_then(|u| u.code.as_deref())
                .unwrap_or("unknown")
        ),
        (status, _) => status.as_str().to_owned(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The dead letter for a message: original key, value and headers, plus the
/// `paysync-*` headers of PRODUCT.md §2.
pub fn dead_letter(incoming: &Incoming, code: &'static str, message: &str) -> Outgoing {
    let mut headers: Vec<RecordHeader> = incoming.headers.clone();
    headers.push(header("paysync-error-code", code));
    headers.push(header("paysync-error-message", message));
    headers.push(header("paysync-source-topic", &incoming.topic));
    headers.push(header(
        "paysync-source-partition",
        &incoming.partition.to_string(),
    ));
    headers.push(header(
        "paysync-source-offset",
        &incoming.offset.to_string(),
    ));
    headers.push(header("paysync-failed-at", &rfc3339_now()));
    Outgoing {
        destination: Destination::DeadLetters,
        key: incoming.key.clone(),
        value: incoming.value.clone(),
        headers,
        label: code,
        outcome: Outcome::Invalid,
        summary: format!("{code}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_keeps_the_original_and_adds_headers() {
        let incoming = Incoming {
            topic: Arc::from("in"),
            partition: 2,
            offset: 17,
            key: Some(b"k".to_vec()),
            value: Some(b"\xff not json".to_vec()),
            headers: vec![
                (b"trace".to_vec(), Some(b"abc".to_vec())),
                (b"\xff\xfe".to_vec(), None),
            ],
            received: Instant::now(),
        };
        let out = dead_letter(&incoming, "invalid_json", "value is not JSON");
        assert_eq!(out.destination, Destination::DeadLetters);
        assert_eq!(out.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(out.value.as_deref(), Some(&b"\xff not json"[..]));
        assert_eq!(
            &out.headers[..2],
            &incoming.headers[..],
            "original headers first, byte for byte, null kept"
        );
        let h: HashMap<_, _> = out
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        assert_eq!(h["trace"], "abc");
        assert_eq!(h.get("\u{fffd}\u{fffd}").map(String::as_str), Some(""));
        assert_eq!(h["paysync-error-code"], "invalid_json");
        assert_eq!(h["paysync-source-topic"], "in");
        assert_eq!(h["paysync-source-partition"], "2");
        assert_eq!(h["paysync-source-offset"], "17");
        assert!(time::OffsetDateTime::parse(
            &h["paysync-failed-at"],
            &time::format_description::well_known::Rfc3339
        )
        .is_ok());
    }
}
