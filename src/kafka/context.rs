//! The consumer side of an engine that runs inside librdkafka's callbacks: the
//! rebalance callbacks (a revoked partition's running work is finished or
//! abandoned, what is done is committed, in a transaction under exactly once,
//! before the partition moves), commit results, statistics and client errors.
//! It also creates and subscribes the consumer.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::sync::Notify;

use super::commits::CommitBoard;
use super::engine::EngineSettings;
use crate::pipeline::ledger::{Ledger, Position};
use crate::pipeline::txn::Transactions;
use crate::telemetry::Metrics;

/// What a callback tells the engine loop.
pub(super) enum Note {
    /// Partitions assigned (their queues are split off).
    Assigned(Vec<i32>),
    /// Partitions revoked (their queued work is dropped).
    Revoked(Vec<i32>),
}

/// The consumer context: rebalance callbacks, commit results, statistics.
pub struct EngineContext {
    /// Commits of every topic this process consumes (follow mode's gate).
    pub(super) board: Arc<CommitBoard>,
    input_topic: String,
    recheck: bool,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    drain_timeout: Duration,
    /// Exactly once: the engine's transactions (set once the producer exists).
    pub(crate) txn: OnceLock<Arc<Transactions>>,
    pub(super) notes: Mutex<Vec<Note>>,
    pub(super) assigned: Mutex<BTreeSet<i32>>,
    joined: AtomicBool,
    /// Woken by librdkafka when the consumer queue or a partition queue becomes
    /// non-empty.
    pub(super) wake: Arc<Notify>,
    /// The consumer queue became non-empty since it was last served.
    pub(super) main_ready: Arc<AtomicBool>,
    /// Callbacks run by polls of the consumer queue: a poll that returns nothing
    /// but ran a callback consumed an event, and the queue may hold more.
    pub(super) served: AtomicU64,
}

impl EngineContext {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.input_topic)
            .map(|e| e.partition())
            .collect()
    }

    fn served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    fn note(&self, note: Note) {
        self.notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(note);
    }

    /// True once the consumer has joined its group.
    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Acquire)
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        if partitions.is_empty() {
            return;
        }
        let deadline = self.drain_timeout;
        let committed = match self.txn.get() {
            None => {
                let positions = blocking(|| self.ledger.revoke(partitions, deadline, deadline));
                commit_positions(consumer, &self.input_topic, &positions, CommitMode::Sync)
            }
            Some(txn) => {
                // Exactly once: finish what runs, commit it in a transaction with
                // its positions (fenced by this generation), then let go.
                let abandoned = blocking(|| self.ledger.freeze(partitions, deadline));
                if abandoned > 0 {
                    tracing::warn!(
                        abandoned,
                        "revocation deadline passed; unfinished work will be redone by the next owner"
                    );
                }
                let settled = blocking(|| txn.commit());
                self.ledger
                    .revoke(partitions, Duration::ZERO, Duration::ZERO);
                txn.forget(partitions);
                match settled {
                    crate::pipeline::txn::Settled::Committed(p) => p,
                    _ => Vec::new(),
                }
            }
        };
        for p in partitions {
            self.metrics.forget_partition(&self.input_topic, *p);
        }
        tracing::info!(?partitions, committed = ?committed, "partitions revoked");
    }
}

/// Runs blocking code from inside the runtime (rebalance callbacks run inside the
/// consumer poll): on a multi-threaded runtime other tasks keep running meanwhile.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

pub(super) fn commit_positions<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    positions: &[Position],
    mode: CommitMode,
) -> Vec<(i32, i64)> {
    let todo: Vec<_> = positions
        .iter()
        .filter(|p| p.committed.is_none_or(|c| p.watermark > c))
        .collect();
    if todo.is_empty() {
        return Vec::new();
    }
    let mut tpl = TopicPartitionList::new();
    for p in &todo {
        if let Err(e) = tpl.add_partition_offset(topic, p.partition, Offset::Offset(p.watermark)) {
            tracing::error!(error = %e, "cannot build commit list");
            return Vec::new();
        }
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => todo.iter().map(|p| (p.partition, p.watermark)).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "commit failed; will retry");
            Vec::new()
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
        let Some(topic) = statistics.topics.get(&self.input_topic) else {
            return;
        };
        let assigned = self
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (partition, p) in &topic.partitions {
            if assigned.contains(partition) {
                // A re-check engine measures its lag itself (`report_pending`).
                if let Some(lag) = lag(p).filter(|_| !self.recheck) {
                    self.metrics.set_lag(&self.input_topic, *partition, lag);
                }
                self.metrics
                    .set_prefetched(&self.input_topic, *partition, p.fetchq_cnt.max(0));
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.served();
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for EngineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions = self.partitions(tpl);
            self.revoke(consumer, &partitions);
            self.assigned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|p| !partitions.contains(p));
            self.note(Note::Revoked(partitions));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.served();
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = self.partitions(tpl);
                tracing::info!(?partitions, "partitions assigned");
                self.assigned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(partitions.iter().copied());
                self.note(Note::Assigned(partitions));
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
                for e in offsets.elements() {
                    // A commit can succeed as a whole and fail for one partition.
                    if e.topic() != self.input_topic || e.error().is_err() {
                        continue;
                    }
                    if let Offset::Offset(o) = e.offset() {
                        self.ledger.committed(e.partition(), o);
                        self.board.post(&self.input_topic, e.partition(), o);
                    }
                }
                for p in self.ledger.positions() {
                    self.metrics.set_commit(
                        &self.input_topic,
                        p.partition,
                        p.committed.unwrap_or(p.watermark),
                        p.gap,
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "offset commit failed"),
        }
    }
}

/// The consumer type of the engine.
pub type EngineConsumer = BaseConsumer<EngineContext>;

/// True once the consumer has joined its group (received an assignment, possibly empty).
pub fn has_joined(consumer: &EngineConsumer) -> bool {
    consumer.context().joined()
}

/// Creates and subscribes the consumer.
pub fn create_consumer(
    config: &rdkafka::ClientConfig,
    settings: &EngineSettings,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    board: Arc<CommitBoard>,
) -> Result<EngineConsumer, rdkafka::error::KafkaError> {
    let context = EngineContext {
        txn: OnceLock::new(),
        board,
        input_topic: settings.input_topic.clone(),
        recheck: settings.recheck,
        ledger,
        metrics,
        drain_timeout: settings.drain_timeout,
        notes: Mutex::new(Vec::new()),
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
    consumer.subscribe(&[&settings.input_topic])?;
    Ok(consumer)
}
