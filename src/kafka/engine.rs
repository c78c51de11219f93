//! The processing engine: a consumer-group member that feeds messages through the
//! [`Scheduler`] (bounded in-flight, per-key order), runs each admitted job as a
//! task, commits each partition's contiguous watermark on an interval, on
//! revocation and on shutdown, and hands partitions over cleanly on a rebalance
//! (finish or abandon their work, commit what is done, and make sure nothing more
//! is published for them).
//!
//! Flow control never pauses a partition. Each assigned partition's messages are
//! split into their own librdkafka queue; the engine reads a partition's queue only
//! while the in-flight bound has room and the partition has no message waiting for
//! admission. A queue that is not read fills up to librdkafka's prefetch bound
//! (`queued.min.messages` / `queued.max.messages.kbytes` per partition), and
//! librdkafka then stops fetching that partition. The consumer's own queue
//! (rebalances, commit results, statistics, errors) is served all the time, so the
//! member stays in its group during a long stall. Nothing is discarded and
//! refetched, so offsets reach the engine contiguously and in order.
//!
//! One engine consumes one topic. paysync runs one for the input topic and, in
//! follow mode, one per re-check topic (each in its own consumer group,
//! `<group_id>.recheck.<seconds>s`). A re-check engine holds the head of each
//! partition until it is due (its `paysync-follow-due` header) and reads nothing
//! past it meanwhile: re-check records of one topic share one delay, so a
//! partition's records come due in order. The held head is one record per
//! partition; what waits behind it stays in the broker (or in librdkafka's bounded
//! prefetch), so memory does not grow with the number of pending re-checks.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    base_consumer::PartitionQueue, BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::commits::CommitBoard;
use super::producer::{Delivery, Publisher};
use crate::codec::RejectCode;
use crate::pipeline::follow;
use crate::pipeline::ledger::{Arrival, Epoch, GapDecision, GapPolicy, Ledger, Position, Ticket};
use crate::pipeline::process::{
    now_ms, Destination, Incoming, Milestone, PipelineJob, Processor, Work,
};
use crate::pipeline::scheduler::{Admission, Scheduler};
use crate::telemetry::Metrics;

/// Messages read from one partition's queue before the next partition's turn.
const READ_BATCH: usize = 64;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The topic this engine consumes.
    pub input_topic: String,
    /// It is a re-check topic: hold each partition's head until it is due.
    pub recheck: bool,
    /// In-flight bound.
    pub max_in_flight: usize,
    /// Per-key bound.
    pub max_queued_per_key: usize,
    /// Commit interval.
    pub commit_interval: Duration,
    /// How long shutdown and revocation wait for in-flight work.
    pub drain_timeout: Duration,
}

enum Note {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// The consumer context: rebalance callbacks, commit results, statistics.
pub struct EngineContext {
    /// Commits of every topic this process consumes (follow mode's gate).
    board: Arc<CommitBoard>,
    input_topic: String,
    recheck: bool,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    drain_timeout: Duration,
    notes: Mutex<Vec<Note>>,
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
        let positions = blocking(|| self.ledger.revoke(partitions, deadline, deadline));
        let committed = commit_positions(consumer, &self.input_topic, &positions, CommitMode::Sync);
        for p in partitions {
            self.metrics.forget_partition(&self.input_topic, *p);
        }
        tracing::info!(?partitions, committed = ?committed, "partitions revoked");
    }
}

/// Runs blocking code from inside the runtime (rebalance callbacks run inside the
/// consumer poll): on a multi-threaded runtime other tasks keep running meanwhile.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn commit_positions<C: ConsumerContext>(
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

/// What a job's task tells the engine.
enum Done {
    /// Its records are built; only the broker's acknowledgement is left, so its
    /// in-flight slot may go to the next request (see `Scheduler::release`).
    Built { serial: u64 },
    /// It is over: acknowledged, abandoned or failed.
    Finished { serial: u64, key: Option<String> },
}

/// Publishes a job's records in order (an event, then the chain's re-check
/// record; or a dead letter). True when all were acknowledged: only then is the
/// job's offset done, so a re-check record is acknowledged before the offset that
/// produced it can be committed. An event the broker refuses turns the job into a
/// `publish_refused` dead letter (and its chain, if any, ends there).
async fn publish_all(
    processor: &Processor,
    publisher: &Publisher,
    metrics: &Metrics,
    job: &PipelineJob,
    records: Vec<crate::pipeline::process::Outgoing>,
    ticket: &Ticket,
) -> bool {
    let mut records = records.into_iter();
    let mut outcome = crate::telemetry::Outcome::Invalid;
    let mut summary = std::borrow::Cow::Borrowed("");
    while let Some(out) = records.next() {
        let (mut out, delivery) = match publisher.publish(&out, ticket).await {
            Delivery::Refused(reason) => {
                // The broker will never take this event: keep the request instead.
                tracing::warn!(%reason, "the broker refuses the event; dead-lettering the request");
                records = Vec::new().into_iter();
                let dead = processor.dead_letter(
                    &job.incoming,
                    RejectCode::PublishRefused,
                    &format!("the event could not be published: {reason}"),
                );
                let delivery = publisher.publish(&dead, ticket).await;
                (dead, delivery)
            }
            delivery => (out, delivery),
        };
        match delivery {
            Delivery::Published => {
                match &out.destination {
                    Destination::Events => metrics.event_published(out.label),
                    Destination::DeadLetters => metrics.dead_lettered(out.label),
                    Destination::Recheck(_) => {}
                }
                match &out.milestone {
                    Some(Milestone::RecheckScheduled {
                        connector,
                        delay_secs,
                    }) => metrics.recheck_scheduled(connector, *delay_secs),
                    Some(Milestone::ChainEnded { connector, end }) => {
                        metrics.chain_ended(connector, end.label())
                    }
                    None => {}
                }
                if summary.is_empty() {
                    outcome = out.outcome;
                    summary = std::mem::take(&mut out.summary);
                }
            }
            Delivery::Abandoned => {
                tracing::info!("abandoned: partition no longer owned");
                return false;
            }
            Delivery::Refused(reason) => {
                tracing::error!(%reason, "a dead letter was refused; the offset stays uncommitted");
                return false;
            }
        }
    }
    processor.done(job);
    if !summary.is_empty() {
        metrics.request_done(outcome, job.incoming.received);
        // A status synced is the normal case: debug. Connector errors and dead
        // letters stay at info (their causes were logged at warn).
        if outcome == crate::telemetry::Outcome::Synced {
            tracing::debug!(result = %summary, "processed");
        } else {
            tracing::info!(result = %summary, "processed");
        }
    }
    true
}

/// How long until `due_ms` (ms since the epoch); zero when it has passed.
fn until(due_ms: Option<i64>) -> Duration {
    let wait = due_ms.map_or(0, |d| d.saturating_sub(now_ms()));
    Duration::from_millis(u64::try_from(wait).unwrap_or(0))
}

/// Releases a job's accounting however its task ends (even by panic).
struct JobGuard {
    serial: u64,
    key: Option<String>,
    partition: i32,
    epoch: Epoch,
    offset: i64,
    published: bool,
    ledger: Arc<Ledger>,
    done: mpsc::UnboundedSender<Done>,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.ledger
            .finish(self.partition, self.epoch, self.offset, self.published);
        let _ = self.done.send(Done::Finished {
            serial: self.serial,
            key: self.key.take(),
        });
    }
}

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

/// One assigned partition's own message queue, split from the consumer queue.
struct Source {
    partition: i32,
    queue: PartitionQueue<EngineContext>,
    /// The queue may hold messages: set by librdkafka when it becomes non-empty,
    /// and by the engine when it stops reading before the queue ran dry.
    ready: Arc<AtomicBool>,
    /// Re-check engines: the partition's head, read but not yet due, with its due
    /// time (ms since the epoch). Nothing past it is read until it is taken.
    held: Option<(Incoming, i64)>,
}

/// The running engine.
pub struct Engine {
    consumer: Arc<EngineConsumer>,
    processor: Arc<Processor>,
    publisher: Arc<Publisher>,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    settings: EngineSettings,
    scheduler: Scheduler<PipelineJob>,
    sources: Vec<Source>,
    /// Round-robin start for reading partitions, so none is always first.
    rotate: usize,
    /// Partitions sought back after a gap: (expected offset, seeks so far).
    gaps: GapPolicy,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Serial of the next job started.
    next_serial: u64,
    /// Jobs released by the scheduler (waiting for their acknowledgement).
    released: HashSet<u64>,
    topic: Arc<str>,
    /// Per-message tasks: reaped as they finish, awaited on shutdown and aborted
    /// after the drain deadline.
    tasks: JoinSet<()>,
    /// Offsets one partition may hold in memory (unfinished, or finished behind an
    /// unfinished one) before the engine stops reading it.
    max_held: usize,
    /// Re-check engines: when the earliest held head comes due (ms since the epoch).
    next_due: Option<i64>,
    /// Re-check engines: a pending measurement is under way.
    measuring: Arc<AtomicBool>,
}

/// How often a held re-check whose scheduling record is not yet committed is
/// looked at again, ms.
const GATE_POLL_MS: i64 = 50;

/// How often a re-check engine measures its pending re-checks.
const PENDING_EVERY: Duration = Duration::from_secs(5);

impl Engine {
    /// An engine over a subscribed consumer.
    pub fn new(
        consumer: Arc<EngineConsumer>,
        processor: Arc<Processor>,
        publisher: Arc<Publisher>,
        ledger: Arc<Ledger>,
        metrics: Arc<Metrics>,
        settings: EngineSettings,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let max_held = settings.max_in_flight.saturating_mul(10).max(10_000);
        Engine {
            scheduler: Scheduler::new(settings.max_in_flight, settings.max_queued_per_key),
            topic: Arc::from(settings.input_topic.as_str()),
            consumer,
            processor,
            publisher,
            ledger,
            metrics,
            settings,
            sources: Vec::new(),
            rotate: 0,
            gaps: GapPolicy::default(),
            done_tx,
            done_rx,
            next_serial: 0,
            released: HashSet::new(),
            tasks: JoinSet::new(),
            max_held,
            next_due: None,
            measuring: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Consumes until `shutdown` is cancelled, then drains in-flight work within
    /// the drain timeout, commits and returns.
    ///
    /// Backpressure: at the in-flight bound, or while a partition's next message
    /// waits for admission, the engine does not read that partition's queue; the
    /// consumer queue is still served, so rebalances and liveness are handled
    /// during long stalls.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut commit_tick = tokio::time::interval(self.settings.commit_interval);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending_tick = tokio::time::interval(PENDING_EVERY);
        pending_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let context = self.consumer.context().clone();
        loop {
            if context.main_ready.swap(false, Ordering::AcqRel) {
                self.serve_consumer_queue();
            }
            self.reap();
            let more = self.read_partitions();
            self.metrics.set_in_flight(self.scheduler.in_flight());
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(done) = self.done_rx.recv() => {
                    self.on_done(done);
                    while let Ok(done) = self.done_rx.try_recv() {
                        self.on_done(done);
                    }
                }
                _ = commit_tick.tick() => {
                    // Also a backstop for a queue that holds something without
                    // having signalled it: serve the consumer queue and look at
                    // every partition queue once.
                    self.serve_consumer_queue();
                    for source in &self.sources {
                        source.ready.store(true, Ordering::Release);
                    }
                    self.commit(CommitMode::Async);
                    self.report_health();
                }
                _ = pending_tick.tick(), if self.settings.recheck => self.report_pending(),
                () = context.wake.notified() => {}
                () = tokio::time::sleep(until(self.next_due)), if self.next_due.is_some() => {}
                () = tokio::task::yield_now(), if more => {}
            }
        }
        self.drain().await;
    }

    /// Collects finished tasks. A task whose job panicked outside the processor's
    /// own containment is logged; its guard already released its accounting.
    fn reap(&mut self) {
        while let Some(result) = self.tasks.try_join_next() {
            if let Err(e) = result {
                if e.is_panic() {
                    self.metrics.internal_error();
                    tracing::error!(error = %e, "a message task panicked; its offset stays uncommitted");
                }
            }
        }
    }

    /// Re-check engines: pending re-checks per owned partition (high watermark
    /// minus the first re-check not yet done), measured against the broker.
    /// librdkafka's own lag statistic stays at its last fetch while a partition is
    /// not fetched, and a partition whose head is not due is not fetched for as
    /// long as it waits. Asked off the engine task; one round at a time.
    fn report_pending(&self) {
        if self.measuring.swap(true, Ordering::AcqRel) {
            return;
        }
        let positions = self.ledger.positions();
        let parts: Vec<(i32, Option<i64>)> = self
            .consumer
            .context()
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|&partition| {
                let held = self.sources.iter().find(|s| s.partition == partition);
                let from = held
                    .and_then(|s| s.held.as_ref().map(|(m, _)| m.offset))
                    .or_else(|| {
                        positions
                            .iter()
                            .find(|p| p.partition == partition)
                            .map(|p| p.watermark)
                    });
                (partition, from)
            })
            .collect();
        let consumer = self.consumer.clone();
        let metrics = self.metrics.clone();
        let measuring = self.measuring.clone();
        let topic = self.settings.input_topic.clone();
        tokio::task::spawn_blocking(move || {
            let mut pending = 0;
            for (partition, from) in parts {
                // Nothing read yet: the consumer starts at the log start; and
                // what retention deleted is no longer pending.
                if let Ok((low, high)) =
                    consumer.fetch_watermarks(&topic, partition, Duration::from_secs(5))
                {
                    let lag = (high - from.unwrap_or(low).max(low)).max(0);
                    metrics.set_lag(&topic, partition, lag);
                    pending += lag;
                }
            }
            metrics.set_pending_rechecks(&topic, pending);
            measuring.store(false, Ordering::Release);
        });
    }

    /// Publishes per-partition health: stalled partitions and stuck watermarks.
    fn report_health(&self) {
        let health = self.ledger.health(Instant::now());
        self.metrics
            .set_stalled_partitions(health.iter().filter(|h| h.stalled.is_some()).count());
        for h in &health {
            self.metrics
                .set_watermark_stuck(&self.settings.input_topic, h.partition, h.stuck_for);
        }
    }

    /// Serves the consumer queue until it is empty: rebalance callbacks, commit
    /// results, statistics and errors, plus messages fetched for a partition
    /// before its queue was split off.
    fn serve_consumer_queue(&mut self) {
        let consumer = self.consumer.clone();
        let context = consumer.context().clone();
        loop {
            let served = context.served.load(Ordering::Relaxed);
            match consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    let incoming = incoming(&m, &self.topic, self.settings.recheck);
                    drop(m);
                    self.apply_notes();
                    self.on_message(incoming);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consume error"),
                None if context.served.load(Ordering::Relaxed) != served => self.apply_notes(),
                None => break,
            }
        }
        self.apply_notes();
    }

    /// Reads admitted-able messages from partition queues, round robin, while the
    /// in-flight bound has room. Returns true when it stopped with messages left
    /// that could be taken now (batch limit), so the loop comes back at once.
    fn read_partitions(&mut self) -> bool {
        self.next_due = None;
        if self.sources.is_empty() || self.scheduler.saturated() {
            return false;
        }
        let count = self.sources.len();
        self.rotate = (self.rotate + 1) % count;
        let first = self.rotate;
        let mut more = false;
        for i in (0..count).map(|i| (first + i) % count) {
            let p = self.sources[i].partition;
            if self.scheduler.parked_in(p) > 0 || self.held_back(p) {
                continue;
            }
            // A re-check partition's head that may not be taken yet holds the partition.
            if let Some((incoming, due)) = &self.sources[i].held {
                let due = *due;
                if let Some(wait) = self.wait_until(incoming, due) {
                    self.note_due(wait);
                    continue;
                }
                if let Some((incoming, due)) = self.sources[i].held.take() {
                    self.take_due(incoming, due);
                }
                self.sources[i].ready.store(true, Ordering::Release);
            }
            if !self.sources[i].ready.swap(false, Ordering::AcqRel) {
                continue;
            }
            let mut taken = 0;
            loop {
                if self.scheduler.saturated() || self.scheduler.parked_in(p) > 0 {
                    // Stopped before the queue ran dry: read it again later.
                    self.sources[i].ready.store(true, Ordering::Release);
                    break;
                }
                if taken == READ_BATCH {
                    self.sources[i].ready.store(true, Ordering::Release);
                    more = true;
                    break;
                }
                match self.sources[i].queue.poll(Duration::ZERO) {
                    Some(Ok(m)) => {
                        let incoming = incoming(&m, &self.topic, self.settings.recheck);
                        drop(m);
                        taken += 1;
                        if self.settings.recheck {
                            let due = follow::due_ms(&incoming.headers).unwrap_or(0);
                            if let Some(wait) = self.wait_until(&incoming, due) {
                                self.sources[i].held = Some((incoming, due));
                                self.note_due(wait);
                                break;
                            }
                            self.take_due(incoming, due);
                        } else {
                            self.on_message(incoming);
                        }
                    }
                    Some(Err(e)) => tracing::warn!(partition = p, error = %e, "consume error"),
                    None => break,
                }
            }
            if self.scheduler.saturated() {
                break;
            }
        }
        more
    }

    /// When a re-check record may be taken, if not now: not before it is due,
    /// and not before the record that scheduled it is committed in its group
    /// (see [`CommitBoard`]); that wait is looked at again every [`GATE_POLL_MS`].
    fn wait_until(&self, incoming: &Incoming, due: i64) -> Option<i64> {
        let now = now_ms();
        if due > now {
            return Some(due);
        }
        let by = follow::scheduled_by(&incoming.headers)?;
        let board = &self.consumer.context().board;
        (!board.is_committed(&by)).then_some(now + GATE_POLL_MS)
    }

    /// The earliest time a held re-check comes due.
    fn note_due(&mut self, due_ms: i64) {
        self.next_due = Some(self.next_due.map_or(due_ms, |d| d.min(due_ms)));
    }

    /// A re-check whose due time has come: how late it is taken is measured.
    fn take_due(&mut self, incoming: Incoming, due_ms: i64) {
        if due_ms > 0 {
            let late = u64::try_from(now_ms().saturating_sub(due_ms)).unwrap_or(0);
            self.metrics
                .recheck_lateness(&self.settings.input_topic, Duration::from_millis(late));
        }
        self.on_message(incoming);
    }

    /// A partition stopped by a refused dead letter is not read (it resumes by
    /// itself once the dead letter is accepted), nor is one that already holds
    /// `max_held` offsets in memory: memory stays bounded behind a slow offset.
    /// Their queues stay marked ready, and the commit tick looks again.
    fn held_back(&self, partition: i32) -> bool {
        self.ledger.held_back(partition, self.max_held)
    }

    fn apply_notes(&mut self) {
        let notes = std::mem::take(
            &mut *self
                .consumer
                .context()
                .notes
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for note in notes {
            match note {
                Note::Revoked(partitions) => {
                    for p in partitions {
                        self.gaps.clear(p);
                        self.sources.retain(|s| s.partition != p);
                        let dropped = self.scheduler.drop_partition(p);
                        if dropped > 0 {
                            tracing::debug!(
                                partition = p,
                                dropped,
                                "dropped queued work of a revoked partition"
                            );
                        }
                    }
                }
                // An assignment re-forwards partitions to the consumer queue: split
                // every assigned partition off again, before fetching starts.
                Note::Assigned(partitions) => {
                    for p in partitions {
                        self.split(p);
                    }
                }
            }
        }
    }

    fn split(&mut self, partition: i32) {
        // Dropping an old handle of this partition's queue would switch off the
        // new handle's wake-up callback: drop it first.
        self.sources.retain(|s| s.partition != partition);
        let Some(mut queue) = self
            .consumer
            .split_partition_queue(&self.settings.input_topic, partition)
        else {
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
        self.sources.push(Source {
            partition,
            queue,
            ready,
            held: None,
        });
    }

    fn on_message(&mut self, incoming: Incoming) {
        let partition = incoming.partition;
        let offset = incoming.offset;
        let epoch = match self.ledger.arrive(partition, offset) {
            Arrival::Accepted(epoch) => epoch,
            Arrival::Skip => {
                tracing::debug!(partition, offset, "skipping a message already in flight");
                return;
            }
            Arrival::Gap { epoch, expected } => match self.gaps.on_gap(partition, expected) {
                GapDecision::Seek(to) => {
                    tracing::warn!(
                        partition,
                        offset,
                        expected,
                        "offsets arrived with a gap; seeking back to refetch them"
                    );
                    self.seek(partition, to);
                    return;
                }
                GapDecision::Accept => {
                    tracing::warn!(
                        partition,
                        offset,
                        expected,
                        "offsets absent from the log (compaction, transaction markers, or deleted by retention before they were consumed)"
                    );
                    if !self.ledger.accept(partition, epoch, offset) {
                        return;
                    }
                    epoch
                }
            },
        };
        self.gaps.clear(partition);
        let job = self.processor.prepare(incoming, epoch);
        if let Admission::Start(job) = self.scheduler.offer(job) {
            self.start(job);
        }
    }

    fn seek(&self, partition: i32, offset: i64) {
        if let Err(e) = self.consumer.seek(
            &self.settings.input_topic,
            partition,
            rdkafka::Offset::Offset(offset),
            Duration::ZERO,
        ) {
            tracing::error!(partition, offset, error = %e, "seek failed");
        }
    }

    fn on_done(&mut self, done: Done) {
        let mut ready = match done {
            Done::Built { serial } => {
                let (granted, ready) = self.scheduler.release();
                if granted {
                    self.released.insert(serial);
                }
                ready
            }
            Done::Finished { serial, key } => {
                if self.released.remove(&serial) {
                    self.scheduler.complete_released(key.as_deref())
                } else {
                    self.scheduler.complete(key.as_deref())
                }
            }
        };
        while let Some(job) = ready.pop() {
            ready.extend(self.start(job));
        }
    }

    /// Spawns a job; returns jobs that became startable because this one was stale.
    fn start(&mut self, job: PipelineJob) -> Vec<PipelineJob> {
        let partition = job.incoming.partition;
        if !self.ledger.start(partition, job.epoch) {
            // Its partition was revoked while it waited: the next owner redoes it.
            return self.scheduler.complete(job.key.as_deref());
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let guard = JobGuard {
            serial,
            key: job.key.clone(),
            partition,
            epoch: job.epoch,
            offset: job.incoming.offset,
            published: false,
            ledger: self.ledger.clone(),
            done: self.done_tx.clone(),
        };
        let processor = self.processor.clone();
        let publisher = self.publisher.clone();
        let metrics = self.metrics.clone();
        let built = self.done_tx.clone();
        // At ERROR level, so it is enabled whatever the log level: a warning or an
        // error inside it always says which request it was about.
        let span = match &job.work {
            Work::Check { request, .. } => tracing::error_span!(
                "message",
                partition,
                offset = job.incoming.offset,
                // As &str: recorded without formatting them first.
                request_id = request.request_id.as_str(),
                connector = request.connector.as_str(),
                transaction_id = request.connector_transaction_id.as_str(),
            ),
            Work::Reject(_) => {
                tracing::error_span!("message", partition, offset = job.incoming.offset)
            }
        };
        let ticket = Ticket {
            ledger: self.ledger.clone(),
            partition,
            epoch: job.epoch,
        };
        self.tasks.spawn(
            async move {
                let mut guard = guard;
                let records = processor.process(&job).await;
                let _ = built.send(Done::Built { serial });
                guard.published =
                    publish_all(&processor, &publisher, &metrics, &job, records, &ticket).await;
            }
            .instrument(span),
        );
        Vec::new()
    }

    fn commit(&self, mode: CommitMode) {
        let positions = self.ledger.to_commit();
        let done = commit_positions(
            self.consumer.as_ref(),
            &self.settings.input_topic,
            &positions,
            mode,
        );
        if matches!(mode, CommitMode::Sync) {
            let board = &self.consumer.context().board;
            for (p, o) in done {
                self.ledger.committed(p, o);
                board.post(&self.settings.input_topic, p, o);
            }
        }
        for p in self.ledger.positions() {
            self.metrics.set_commit(
                &self.settings.input_topic,
                p.partition,
                p.committed.unwrap_or(p.watermark),
                p.gap,
            );
        }
    }

    async fn drain(mut self) {
        let parked = self.scheduler.drop_parked();
        tracing::info!(
            in_flight = self.scheduler.unfinished(),
            parked,
            "shutting down: draining in-flight work"
        );
        let deadline = tokio::time::Instant::now() + self.settings.drain_timeout;
        while self.scheduler.unfinished() > 0 {
            match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                Ok(Some(done)) => self.on_done(done),
                Ok(None) | Err(_) => break,
            }
            self.metrics.set_in_flight(self.scheduler.in_flight());
        }
        let positions = if self.scheduler.unfinished() > 0 {
            tracing::warn!(
                abandoned = self.scheduler.unfinished(),
                "shutdown deadline passed; unfinished requests will be redone after restart"
            );
            let positions = self.ledger.revoke_all();
            // Nothing may publish any more; stop the tasks that are still running.
            self.tasks.abort_all();
            positions
        } else {
            self.ledger.positions()
        };
        while self.tasks.join_next().await.is_some() {}
        let committed = commit_positions(
            self.consumer.as_ref(),
            &self.settings.input_topic,
            &positions,
            CommitMode::Sync,
        );
        for (p, o) in &committed {
            self.ledger.committed(*p, *o);
        }
        let wanted = positions
            .iter()
            .filter(|p| p.committed.is_none_or(|c| p.watermark > c))
            .count();
        if committed.len() < wanted {
            // Typically the group expelled this member (a broker outage longer than
            // the session timeout): its commits are refused, and the partitions'
            // next owner repeats the work since the last commit that landed.
            tracing::warn!(
                ?positions,
                "final commit refused; work since the last commit will be repeated"
            );
        }
        tracing::info!(?committed, "final commit");
        self.metrics.set_in_flight(self.scheduler.in_flight());
    }
}
