//! Exactly once on rdkafka: the transactional producer of one engine (one
//! consumer group) and the consumer as the transactions see it. The bookkeeping
//! (what goes into which transaction, what an abort rewinds) is
//! [`crate::pipeline::txn`]'s; this is only the client.
//!
//! Each engine has its own producer, `<transactional_id_prefix>-<instance_id>`
//! for the input engine and `…-<instance_id>.recheck.<seconds>s` for a re-check
//! engine: its transactions hold that engine's records and the positions of its
//! own consumer group, fenced by the group's metadata (KIP-447), and a
//! rebalance in one group never waits for another group's transaction. A member
//! that restarts with its instance id fences its predecessor's producers and
//! aborts their open transactions at once (`init_transactions`).

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use super::context::EngineConsumer;
use super::producer::{classify, ErrorKind};
use crate::pipeline::process::{Destination, Outgoing};
use crate::pipeline::txn::{RecordSource, RecordTag, Refusal, SendError, TxnError, TxnProducer};

/// How long a transactional call may block before it counts as timed out.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The producer's context: records the broker refused permanently, by the input
/// record they answer.
struct TxnContext {
    refusals: Arc<Mutex<Vec<Refusal>>>,
}

impl ClientContext for TxnContext {}

impl ProducerContext for TxnContext {
    type DeliveryOpaque = Box<RecordTag>;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: Box<RecordTag>) {
        if let Err((e, _)) = result {
            let permanent = matches!(e, KafkaError::MessageProduction(code) if classify(*code) == ErrorKind::Permanent);
            if permanent {
                let too_large = matches!(
                    e,
                    KafkaError::MessageProduction(
                        RDKafkaErrorCode::MessageSizeTooLarge
                            | RDKafkaErrorCode::InvalidMessageSize
                    )
                );
                self.refusals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Refusal {
                        tag: *tag,
                        reason: e.to_string(),
                        too_large,
                    });
            }
        }
    }
}

type Inner = ThreadedProducer<TxnContext>;

/// The transactional producer of one engine.
pub struct KafkaTxnProducer {
    id: String,
    config: ClientConfig,
    producer: RwLock<Arc<Inner>>,
    refusals: Arc<Mutex<Vec<Refusal>>>,
    consumer: Weak<EngineConsumer>,
    topic: String,
    events_topic: String,
    dead_letter_topic: String,
}

impl std::fmt::Debug for KafkaTxnProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTxnProducer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn create(config: &ClientConfig, refusals: &Arc<Mutex<Vec<Refusal>>>) -> Result<Inner, KafkaError> {
    config.create_with_context(TxnContext {
        refusals: refusals.clone(),
    })
}

/// What a transactional call's error asks for.
fn txn_error(e: KafkaError) -> TxnError {
    let text = e.to_string();
    match &e {
        KafkaError::Transaction(r) if r.txn_requires_abort() => TxnError::Abortable(text),
        KafkaError::Transaction(r) if r.is_fatal() => TxnError::Fatal(text),
        KafkaError::Transaction(r) if r.is_retriable() => TxnError::Retriable(text),
        KafkaError::Transaction(r) if r.code() == RDKafkaErrorCode::OperationTimedOut => {
            TxnError::Retriable(text)
        }
        // Anything else (a state error): the producer cannot be trusted.
        _ => TxnError::Fatal(text),
    }
}

impl KafkaTxnProducer {
    /// Creates the producer with `transactional.id = id` and initializes its
    /// transactions (fencing an older producer with the same id). Fails when
    /// the broker has no transaction coordinator for it within `init_timeout`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        base: &ClientConfig,
        id: &str,
        consumer: Weak<EngineConsumer>,
        topic: &str,
        events_topic: &str,
        dead_letter_topic: &str,
        init_timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let mut config = base.clone();
        config.set("transactional.id", id);
        if config.get("transaction.timeout.ms").is_none() {
            // A member that never comes back blocks read_committed readers of its
            // partitions for at most this long (README, exactly once).
            config.set("transaction.timeout.ms", "10000");
        }
        if config.get("retry.backoff.ms").is_none() {
            // A transaction that follows a commit at once finds the coordinator
            // still writing the commit's markers (CONCURRENT_TRANSACTIONS) and
            // retries after this backoff: librdkafka's 100 ms put 100 ms into
            // every commit cycle on Apache Kafka (the Java client waits 20 ms).
            config.set("retry.backoff.ms", "10");
        }
        // librdkafka requires a record's delivery timeout within the transaction's.
        let txn_ms: u64 = config
            .get("transaction.timeout.ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000);
        let msg_ms: u64 = config
            .get("message.timeout.ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300_000);
        if msg_ms > txn_ms {
            config.set("message.timeout.ms", txn_ms.to_string());
        }
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let producer = create(&config, &refusals)?;
        producer.init_transactions(init_timeout)?;
        Ok(KafkaTxnProducer {
            id: id.to_owned(),
            config,
            producer: RwLock::new(Arc::new(producer)),
            refusals,
            consumer,
            topic: topic.to_owned(),
            events_topic: events_topic.to_owned(),
            dead_letter_topic: dead_letter_topic.to_owned(),
        })
    }

    fn current(&self) -> Arc<Inner> {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for queued records to be delivered (shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.current().flush(timeout);
    }
}

impl TxnProducer for KafkaTxnProducer {
    fn begin(&self) -> Result<(), TxnError> {
        self.current().begin_transaction().map_err(txn_error)
    }

    fn send(&self, out: &Outgoing, tag: RecordTag) -> Result<(), SendError> {
        let topic: &str = match &out.destination {
            Destination::Events => &self.events_topic,
            Destination::DeadLetters => &self.dead_letter_topic,
            Destination::Recheck(t) => t,
        };
        let headers = super::headers::build(
            out.headers
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_deref())),
        );
        let mut record: BaseRecord<'_, [u8], [u8], Box<RecordTag>> =
            BaseRecord::with_opaque_to(topic, Box::new(tag)).headers(headers);
        if let Some(k) = &out.key {
            record = record.key(k);
        }
        if let Some(v) = &out.value {
            record = record.payload(v);
        }
        match self.current().send(record) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::QueueFull)
            }
            Err((e @ KafkaError::MessageProduction(code), _)) => match classify(code) {
                ErrorKind::Fatal => Err(SendError::Fatal(e.to_string())),
                ErrorKind::Permanent => Err(SendError::Refused(e.to_string())),
                ErrorKind::Retriable => Err(SendError::QueueFull),
            },
            Err((e, _)) => Err(SendError::Fatal(e.to_string())),
        }
    }

    fn commit(&self, positions: &[(i32, i64)]) -> Result<(), TxnError> {
        let producer = self.current();
        if !positions.is_empty() {
            let consumer = self
                .consumer
                .upgrade()
                .ok_or_else(|| TxnError::Fatal("the consumer is gone".into()))?;
            let metadata = consumer
                .group_metadata()
                .ok_or_else(|| TxnError::Abortable("no consumer group metadata yet".into()))?;
            let mut tpl = TopicPartitionList::new();
            for (p, o) in positions {
                tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o))
                    .map_err(|e| TxnError::Fatal(e.to_string()))?;
            }
            producer
                .send_offsets_to_transaction(&tpl, &metadata, CALL_TIMEOUT)
                .map_err(txn_error)?;
        }
        producer.commit_transaction(CALL_TIMEOUT).map_err(txn_error)
    }

    fn abort(&self) -> Result<(), TxnError> {
        self.current()
            .abort_transaction(CALL_TIMEOUT)
            .map_err(txn_error)
    }

    fn rebuild(&self) -> Result<(), TxnError> {
        tracing::warn!(transactional_id = %self.id, "rebuilding the transactional producer");
        let producer =
            create(&self.config, &self.refusals).map_err(|e| TxnError::Fatal(e.to_string()))?;
        producer
            .init_transactions(CALL_TIMEOUT)
            .map_err(|e| TxnError::Fatal(e.to_string()))?;
        *self.producer.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(producer);
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }

    fn take_refusals(&self) -> Vec<Refusal> {
        std::mem::take(&mut *self.refusals.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The engine's consumer, as the transactions need it (weak: the consumer owns
/// the transactions through its context).
pub struct ConsumerHandle {
    /// The consumer.
    pub consumer: Weak<EngineConsumer>,
    /// The topic it consumes.
    pub topic: String,
}

impl RecordSource for ConsumerHandle {
    fn seek(&self, partition: i32, offset: i64) {
        let Some(consumer) = self.consumer.upgrade() else {
            return;
        };
        if let Err(e) = consumer.seek(
            &self.topic,
            partition,
            Offset::Offset(offset),
            Duration::ZERO,
        ) {
            tracing::warn!(partition, offset, error = %e, "seek after a rewind failed");
        }
    }

    fn committed(&self, partitions: &[i32]) -> Result<Vec<(i32, i64)>, String> {
        let consumer = self.consumer.upgrade().ok_or("the consumer is gone")?;
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, *p);
        }
        let committed = consumer
            .committed_offsets(tpl, CALL_TIMEOUT)
            .map_err(|e| e.to_string())?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect())
    }
}
