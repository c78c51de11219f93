//! The engine's [`Source`] on rdkafka: a subscribed `BaseConsumer` whose
//! assigned partitions are split into queues of their own (read one by one,
//! woken by librdkafka when a queue becomes non-empty), and its callbacks.
//!
//! librdkafka hands a revocation to the rebalance callback, inside the
//! consumer's poll, and the partitions go when the callback returns: the
//! callback runs the engine's [`Committer::revoke`] to completion there (on a
//! multi-threaded runtime, with the worker handed over to the others while it
//! waits), then tells the engine to drop the partitions' queued work.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::sync::Notify;

use crate::clock::Instant;
use crate::pipeline::committer::Committer;
use crate::pipeline::record::Incoming;
use crate::pipeline::source::{Source, SourceEvent};
use crate::telemetry::Metrics;

/// How long a blocking consumer call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The consumer context: rebalance callbacks, commit results, statistics.
pub struct EngineContext {
    topic: Arc<str>,
    recheck: bool,
    metrics: Arc<Metrics>,
    /// The engine's committer (weak: the committer owns the source, which owns
    /// the consumer and this context).
    committer: OnceLock<Weak<Committer>>,
    events: Mutex<Vec<SourceEvent>>,
    assigned: Mutex<BTreeSet<i32>>,
    joined: AtomicBool,
    /// Woken by librdkafka when the consumer queue or a partition queue becomes
    /// non-empty.
    wake: Arc<Notify>,
    /// The consumer queue became non-empty since it was last served.
    main_ready: Arc<AtomicBool>,
    /// Callbacks run by polls of the consumer queue: a poll that returns nothing
    /// but ran a callback consumed an event, and the queue may hold more.
    served: AtomicU64,
}

impl EngineContext {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == &*self.topic)
            .map(|e| e.partition())
            .collect()
    }

    fn served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    fn event(&self, event: SourceEvent) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    fn assigned(&self) -> std::sync::MutexGuard<'_, BTreeSet<i32>> {
        self.assigned.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs the committer's revocation to completion inside the rebalance
/// callback: on a multi-threaded runtime the worker is handed to the others
/// while it waits, so running jobs finish meanwhile.
fn revoke_in_callback(committer: &Committer, partitions: &[i32]) {
    let revoke = committer.revoke(partitions);
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(revoke));
        }
        _ => {
            tracing::warn!(
                "a revocation outside a multi-threaded runtime cannot wait for in-flight work"
            );
            futures::executor::block_on(revoke);
        }
    }
}

/// A partition's lag from librdkafka statistics. librdkafka reports it against
/// the committed offset only (-1 before the group's first commit there); until
/// then the consumer starts at the log start (`auto.offset.reset = earliest`),
/// so the lag is everything from the log start to the high watermark. A re-check
/// partition whose head is not due has nothing committed for as long as it waits.
fn lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    if p.consumer_lag >= 0 {
        Some(p.consumer_lag)
    } else if p.committed_offset < 0 && p.hi_offset >= 0 && p.lo_offset >= 0 {
        Some(p.hi_offset - p.lo_offset)
    } else {
        None
    }
}

impl ClientContext for EngineContext {
    fn stats(&self, statistics: Statistics) {
        self.served();
        let Some(topic) = statistics.topics.get(&*self.topic) else {
            return;
        };
        let assigned = self.assigned().clone();
        for (partition, p) in &topic.partitions {
            if assigned.contains(partition) {
                // A re-check engine measures its lag itself (`report_pending`).
                if let Some(lag) = lag(p).filter(|_| !self.recheck) {
                    self.metrics.set_lag(&self.topic, *partition, lag);
                }
                self.metrics
                    .set_prefetched(&self.topic, *partition, p.fetchq_cnt.max(0));
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.served();
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for EngineContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions = self.partitions(tpl);
            if let Some(committer) = self.committer.get().and_then(Weak::upgrade) {
                revoke_in_callback(&committer, &partitions);
            }
            self.assigned().retain(|p| !partitions.contains(p));
            self.event(SourceEvent::Revoked(partitions));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.served();
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = self.partitions(tpl);
                tracing::info!(?partitions, "partitions assigned");
                self.assigned().extend(partitions.iter().copied());
                self.event(SourceEvent::Assigned(partitions));
                self.joined.store(true, Ordering::Release);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        self.served();
        match result {
            Ok(()) => {
                // A commit can succeed as a whole and fail for one partition.
                let done: Vec<(i32, i64)> = offsets
                    .elements()
                    .iter()
                    .filter(|e| e.topic() == &*self.topic && e.error().is_ok())
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some((e.partition(), o)),
                        _ => None,
                    })
                    .collect();
                self.event(SourceEvent::Committed(done));
            }
            Err(e) => tracing::warn!(error = %e, "offset commit failed"),
        }
    }
}

/// The consumer type of an engine.
pub type EngineConsumer = BaseConsumer<EngineContext>;

/// One assigned partition's own message queue, split from the consumer queue.
struct Split {
    queue: PartitionQueue<EngineContext>,
    /// The queue may hold messages: set by librdkafka when it becomes non-empty.
    ready: Arc<AtomicBool>,
}

/// An engine's consumer.
pub struct KafkaSource {
    consumer: Arc<EngineConsumer>,
    topic: Arc<str>,
    recheck: bool,
    splits: Mutex<HashMap<i32, Split>>,
}

impl KafkaSource {
    /// Creates and subscribes a consumer of `topic` (a re-check topic when
    /// `recheck`).
    pub fn new(
        config: &rdkafka::ClientConfig,
        topic: &str,
        recheck: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let context = EngineContext {
            topic: Arc::from(topic),
            recheck,
            metrics,
            committer: OnceLock::new(),
            events: Mutex::new(Vec::new()),
            assigned: Mutex::new(BTreeSet::new()),
            joined: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
            main_ready: Arc::new(AtomicBool::new(true)),
            served: AtomicU64::new(0),
        };
        let wake = context.wake.clone();
        let main_ready = context.main_ready.clone();
        let mut consumer: EngineConsumer = config.create_with_context(context)?;
        consumer.set_nonempty_callback(move || {
            main_ready.store(true, Ordering::Release);
            wake.notify_one();
        });
        consumer.subscribe(&[topic])?;
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            topic: Arc::from(topic),
            recheck,
            splits: Mutex::new(HashMap::new()),
        })
    }

    /// The consumer (the transactional producer reads its group metadata).
    pub fn consumer(&self) -> &Arc<EngineConsumer> {
        &self.consumer
    }

    /// Revocations run the engine's committer (set once it exists).
    pub fn attach(&self, committer: &Arc<Committer>) {
        let _ = self
            .consumer
            .context()
            .committer
            .set(Arc::downgrade(committer));
    }

    fn splits(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Split>> {
        self.splits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Splits `partition`'s queue off the consumer queue (at every assignment:
    /// an assignment re-forwards partitions to the consumer queue).
    fn split(&self, partition: i32) {
        let mut splits = self.splits();
        // Dropping an old handle of this partition's queue would switch off the
        // new handle's wake-up callback: drop it first.
        splits.remove(&partition);
        let Some(mut queue) = self.consumer.split_partition_queue(&self.topic, partition) else {
            tracing::error!(partition, "cannot split the partition queue");
            return;
        };
        let ready = Arc::new(AtomicBool::new(true));
        let wake = self.consumer.context().wake.clone();
        let flag = ready.clone();
        queue.set_nonempty_callback(move || {
            flag.store(true, Ordering::Release);
            wake.notify_one();
        });
        splits.insert(partition, Split { queue, ready });
    }

    fn take_events(&self) -> Vec<SourceEvent> {
        std::mem::take(
            &mut *self
                .consumer
                .context()
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Callback events in order, splitting the queues of assigned partitions
    /// before anything is read from them.
    fn drain_events(&self, out: &mut Vec<SourceEvent>) {
        for event in self.take_events() {
            match &event {
                SourceEvent::Assigned(partitions) => {
                    for p in partitions {
                        self.split(*p);
                    }
                }
                SourceEvent::Revoked(partitions) => {
                    let mut splits = self.splits();
                    for p in partitions {
                        splits.remove(p);
                    }
                }
                _ => {}
            }
            out.push(event);
        }
    }
}

impl Source for KafkaSource {
    fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    fn poll(&self) -> Vec<SourceEvent> {
        let context = self.consumer.context();
        let mut out = Vec::new();
        if !context.main_ready.swap(false, Ordering::AcqRel) {
            self.drain_events(&mut out);
            return out;
        }
        loop {
            let served = context.served.load(Ordering::Relaxed);
            match self.consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    let incoming = incoming(&m, &self.topic, self.recheck);
                    drop(m);
                    self.drain_events(&mut out);
                    out.push(SourceEvent::Record(incoming));
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consume error"),
                None if context.served.load(Ordering::Relaxed) != served => {
                    self.drain_events(&mut out)
                }
                None => break,
            }
        }
        self.drain_events(&mut out);
        out
    }

    fn read(&self, partition: i32) -> Option<Incoming> {
        let splits = self.splits();
        let split = splits.get(&partition)?;
        // Cleared before polling: a message that arrives meanwhile sets it again.
        if !split.ready.swap(false, Ordering::AcqRel) {
            return None;
        }
        loop {
            match split.queue.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    split.ready.store(true, Ordering::Release);
                    return Some(incoming(&m, &self.topic, self.recheck));
                }
                Some(Err(e)) => tracing::warn!(partition, error = %e, "consume error"),
                None => return None,
            }
        }
    }

    fn release(&self, _partitions: &[i32]) {
        // librdkafka lets go when the rebalance callback returns.
    }

    fn seek(&self, partition: i32, offset: i64) {
        if let Err(e) = self.consumer.seek(
            &self.topic,
            partition,
            Offset::Offset(offset),
            Duration::ZERO,
        ) {
            tracing::warn!(partition, offset, error = %e, "seek failed");
        }
        if let Some(split) = self.splits().get(&partition) {
            split.ready.store(true, Ordering::Release);
        }
    }

    fn commit(&self, positions: &[(i32, i64)]) {
        if let Some(tpl) = self.list(positions) {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::warn!(error = %e, "commit failed; will retry");
            }
        }
    }

    fn commit_sync<'a>(&'a self, positions: &'a [(i32, i64)]) -> BoxFuture<'a, Result<(), String>> {
        let tpl = self.list(positions);
        let consumer = self.consumer.clone();
        Box::pin(async move {
            let tpl = tpl.ok_or("cannot build the commit list")?;
            blocking(move || consumer.commit(&tpl, CommitMode::Sync))
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn committed<'a>(
        &'a self,
        partitions: &'a [i32],
    ) -> BoxFuture<'a, Result<Vec<(i32, i64)>, String>> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, *p);
        }
        let consumer = self.consumer.clone();
        Box::pin(async move {
            let list = blocking(move || consumer.committed_offsets(tpl, CALL_TIMEOUT))
                .await
                .map_err(|e| e.to_string())?;
            Ok(list
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect())
        })
    }

    fn watermarks(&self, partition: i32) -> BoxFuture<'_, Result<(i64, i64), String>> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        Box::pin(async move {
            blocking(move || consumer.fetch_watermarks(&topic, partition, Duration::from_secs(5)))
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn wake(&self) -> Arc<Notify> {
        self.consumer.context().wake.clone()
    }

    fn assigned(&self) -> Vec<i32> {
        self.consumer.context().assigned().iter().copied().collect()
    }

    fn joined(&self) -> bool {
        self.consumer.context().joined.load(Ordering::Acquire)
    }

    fn refresh(&self) {
        self.consumer
            .context()
            .main_ready
            .store(true, Ordering::Release);
        for split in self.splits().values() {
            split.ready.store(true, Ordering::Release);
        }
    }
}

impl KafkaSource {
    fn list(&self, positions: &[(i32, i64)]) -> Option<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in positions {
            if let Err(e) = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o)) {
                tracing::error!(error = %e, "cannot build a commit list");
                return None;
            }
        }
        Some(tpl)
    }
}

/// A blocking client call, off the runtime's workers (inside a rebalance
/// callback, where the worker was already handed over, it runs in place).
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> KafkaResult<T> + Send + 'static,
) -> KafkaResult<T> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result,
        Err(e) => Err(rdkafka::error::KafkaError::Canceled).inspect_err(|_| {
            tracing::error!(error = %e, "a consumer call's thread failed");
        }),
    }
}

/// A consumed message, detached from the consumer.
fn incoming(message: &BorrowedMessage<'_>, topic: &Arc<str>, recheck: bool) -> Incoming {
    // As bytes: rdkafka's own reader panics on a header name that is not UTF-8.
    let headers = message
        .headers()
        .map(super::headers::read)
        .unwrap_or_default();
    Incoming {
        topic: topic.clone(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers,
        received: Instant::now(),
        recheck,
    }
}
