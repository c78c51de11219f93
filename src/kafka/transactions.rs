//! Exactly once on rdkafka: the transactional producer of one engine (one
//! consumer group). The bookkeeping (what goes into which transaction, what an
//! abort rewinds) is [`crate::pipeline::txn`]'s; this is only the client.
//!
//! Each engine has its own producer, `<transactional_id_prefix>-<instance_id>`
//! for the input engine and `…-<instance_id>.recheck.<seconds>s` for a re-check
//! engine: its transactions hold that engine's records and the positions of its
//! own consumer group, fenced by the group's metadata (KIP-447), and a
//! rebalance in one group never waits for another group's transaction. A member
//! that restarts with its instance id fences its predecessor's producers and
//! aborts their open transactions at once (`init_transactions`).
//!
//! librdkafka's transactional calls block for up to [`CALL_TIMEOUT`]: they run
//! on tokio's blocking threads, never on a runtime worker (which also serves
//! the probes and the webhook intake), and never under a lock.

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use super::producer::{classify, too_large, ErrorKind};
use super::source::EngineConsumer;
use crate::pipeline::record::{Destination, Outgoing};
use crate::pipeline::txn::{RecordTag, Refusal, SendError, TxnError, TxnProducer};

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
        if let Err((KafkaError::MessageProduction(code), _)) = result {
            if classify(*code) == ErrorKind::Permanent {
                self.refusals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Refusal {
                        tag: *tag,
                        reason: KafkaError::MessageProduction(*code).to_string(),
                        too_large: too_large(*code),
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
pub fn txn_error(e: KafkaError) -> TxnError {
    let text = e.to_string();
    match &e {
        KafkaError::Transaction(r)
            if matches!(
                r.code(),
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            ) =>
        {
            TxnError::Fenced(text)
        }
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

/// Runs a blocking client call on a blocking thread.
async fn off_runtime<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, TxnError> + Send + 'static,
) -> Result<T, TxnError> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or_else(|e| Err(TxnError::Fatal(format!("the client call failed: {e}"))))
}

impl KafkaTxnProducer {
    /// Creates the producer with `transactional.id = id` and initializes its
    /// transactions (fencing an older producer with the same id). Blocking: fails
    /// when the broker has no transaction coordinator for it within
    /// `init_timeout`.
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
        let config = transactional_config(base, id);
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

/// A producer configuration for `transactional.id = id`, with paysync's
/// transactional defaults.
pub fn transactional_config(base: &ClientConfig, id: &str) -> ClientConfig {
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
    config
}

impl TxnProducer for KafkaTxnProducer {
    fn id(&self) -> &str {
        &self.id
    }

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
                ErrorKind::Permanent => Err(SendError::Refused {
                    reason: e.to_string(),
                    too_large: too_large(code),
                }),
                ErrorKind::Retriable => Err(SendError::QueueFull),
            },
            Err((e, _)) => Err(SendError::Fatal(e.to_string())),
        }
    }

    fn send_offsets<'a>(
        &'a self,
        positions: &'a [(i32, i64)],
    ) -> BoxFuture<'a, Result<(), TxnError>> {
        let producer = self.current();
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let positions = positions.to_vec();
        Box::pin(off_runtime(move || {
            let consumer = consumer
                .upgrade()
                .ok_or_else(|| TxnError::Fatal("the consumer is gone".into()))?;
            let metadata = consumer
                .group_metadata()
                .ok_or_else(|| TxnError::Abortable("no consumer group metadata yet".into()))?;
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &positions {
                tpl.add_partition_offset(&topic, *p, Offset::Offset(*o))
                    .map_err(|e| TxnError::Fatal(e.to_string()))?;
            }
            producer
                .send_offsets_to_transaction(&tpl, &metadata, CALL_TIMEOUT)
                .map_err(txn_error)
        }))
    }

    fn commit(&self) -> BoxFuture<'_, Result<(), TxnError>> {
        let producer = self.current();
        Box::pin(off_runtime(move || {
            producer.commit_transaction(CALL_TIMEOUT).map_err(txn_error)
        }))
    }

    fn abort(&self) -> BoxFuture<'_, Result<(), TxnError>> {
        let producer = self.current();
        Box::pin(off_runtime(move || {
            producer.abort_transaction(CALL_TIMEOUT).map_err(txn_error)
        }))
    }

    fn rebuild(&self) -> BoxFuture<'_, Result<(), TxnError>> {
        let config = self.config.clone();
        let refusals = self.refusals.clone();
        Box::pin(async move {
            let producer = off_runtime(move || {
                let producer =
                    create(&config, &refusals).map_err(|e| TxnError::Fatal(e.to_string()))?;
                producer
                    .init_transactions(CALL_TIMEOUT)
                    .map_err(txn_error)?;
                Ok(producer)
            })
            .await?;
            *self.producer.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(producer);
            Ok(())
        })
    }

    fn take_refusals(&self) -> Vec<Refusal> {
        std::mem::take(&mut *self.refusals.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
