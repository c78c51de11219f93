//! The idempotent, `acks=all` producer of at-least-once delivery (and of the
//! webhook intake): one record, acknowledged by the broker or refused with an
//! error told apart ([`classify`]). The retry and stall policy over it is
//! `pipeline::publish`'s.

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;

use futures::future::BoxFuture;

use crate::pipeline::publish::{Produce, ProduceError};
use crate::pipeline::record::Outgoing;

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

/// True for an error that says the record is too large.
pub fn too_large(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize
    )
}

/// A produce error as the publisher handles it.
fn produce_error(error: &KafkaError, producer: &FutureProducer) -> ProduceError {
    let text = error.to_string();
    match error {
        _ if producer.client().fatal_error().is_some() => ProduceError::Fatal(text),
        KafkaError::MessageProduction(code) => match classify(*code) {
            ErrorKind::Fatal => ProduceError::Fatal(text),
            ErrorKind::Permanent => ProduceError::Permanent {
                reason: text,
                too_large: too_large(*code),
            },
            ErrorKind::Retriable => ProduceError::Retriable(text),
        },
        _ => ProduceError::Retriable(text),
    }
}

/// The idempotent producer.
pub struct KafkaProducer {
    producer: FutureProducer,
}

impl KafkaProducer {
    /// Creates the producer.
    pub fn new(config: &ClientConfig) -> Result<Self, KafkaError> {
        Ok(KafkaProducer {
            producer: config.create()?,
        })
    }

    /// The underlying producer (topic checks).
    pub fn client(&self) -> &FutureProducer {
        &self.producer
    }

    /// Waits for queued records to be delivered.
    pub fn flush(&self, timeout: std::time::Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

impl Produce for KafkaProducer {
    fn produce<'a>(
        &'a self,
        topic: &'a str,
        out: &'a Outgoing,
    ) -> BoxFuture<'a, Result<(), ProduceError>> {
        Box::pin(async move {
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
            match self.producer.send(record, Timeout::Never).await {
                Ok(_) => Ok(()),
                Err((e, _)) => Err(produce_error(&e, &self.producer)),
            }
        })
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
