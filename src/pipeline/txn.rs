//! Exactly-once bookkeeping, free of Kafka types: what goes into which
//! transaction, which input positions a transaction may commit, and what an
//! abort rewinds. The Kafka side is the [`TxnProducer`] trait (begin, send,
//! the input positions, commit, abort, rebuild) and the engine's
//! [`Source`] (seek, the broker's committed positions); tests and the
//! deterministic simulation drive this module with fakes of both.
//!
//! The rule: a transaction holds the records of finished work *and* the input
//! positions they answer, and nothing past a partition's contiguous watermark.
//! Work finishes out of order (different payments run concurrently), so a
//! finished job's records wait in its partition's buffer until every earlier
//! offset has finished; then they are handed to the producer in offset order and
//! the partition's position moves past them. After a crash the group restarts
//! exactly where the last committed transaction left it: work finished beyond
//! the watermark was never in a committed transaction, so it is neither lost nor
//! repeated.
//!
//! A finished job leaves its `max_in_flight` slot as soon as its records are in
//! the buffer; buffered and uncommitted records together are bounded by
//! `processing.max_pending_records` (the engine stops reading and commits early
//! at the bound).
//!
//! Nothing here blocks a thread: the lock is held only to buffer records and to
//! queue them into the open transaction (`begin` and `send`, which librdkafka
//! applies locally without a network round trip); the broker calls (the
//! positions, commit, abort, a new producer, the committed positions) are
//! awaited with the lock released, one settlement at a time.
//!
//! Failures:
//! - a record refused, whether by the broker after the fact or by the client
//!   when it is queued (too large, unknown topic), dooms the open transaction:
//!   it is aborted as a whole and every partition it held is rewound to its last
//!   committed position (a new ledger epoch, so jobs still running for it cannot
//!   finish into the next transaction; the engine drops their queued jobs and
//!   refetches). The refusal is remembered by the input record it answers: when
//!   that work is redone, a refused event becomes a `publish_refused` dead
//!   letter, and a refused dead letter or re-check record stalls its partition
//!   (loudly, as in at-least-once) and is retried alone in a transaction of its
//!   own, with a doubling backoff, so the other partitions' transactions never
//!   abort for it again;
//! - a call that timed out is retried alone: the positions again, or the commit
//!   again (never the positions while the commit is under way); a commit that
//!   still has no answer has an unknown outcome;
//! - a fatal error (an unknown outcome, an unusable producer, a fence) rebuilds
//!   the producer, which aborts or completes whatever the old one left open, and
//!   rewinds every partition to the position the broker has committed, asked
//!   until it answers. A fence can follow a transaction that outlived its
//!   timeout, so one rebuild is allowed; a rebuilt producer fenced again before
//!   it committed means another instance holds the transactional id, and the
//!   engine stops (the process exits naming the id). Rebuilds in a row without
//!   a commit are bounded too.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;

use super::ledger::{Epoch, Ledger};
use super::record::{Destination, Milestone, Outgoing, PipelineJob};
use super::source::Source;
use crate::clock::Instant;
use crate::codec::RejectCode;
use crate::telemetry::{Metrics, Outcome};

/// Which input record a produced record answers (the producer reports
/// refusals with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordTag {
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
    /// What kind of record it is.
    pub role: Role,
}

/// The kind of a produced record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// An event.
    Event,
    /// A dead letter.
    DeadLetter,
    /// A follow-mode re-check record.
    Recheck,
}

impl Role {
    /// The role of a record by its destination.
    pub fn of(destination: &Destination) -> Role {
        match destination {
            Destination::Events => Role::Event,
            Destination::DeadLetters => Role::DeadLetter,
            Destination::Recheck(_) => Role::Recheck,
        }
    }

    /// The metric label of its topic's role.
    pub fn label(self) -> &'static str {
        match self {
            Role::Event => "events",
            Role::DeadLetter => "dead_letters",
            Role::Recheck => "rechecks",
        }
    }
}

/// A record the broker refused permanently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The record.
    pub tag: RecordTag,
    /// The broker's reason.
    pub reason: String,
    /// Refused for its size (a re-check record then ends its chain).
    pub too_large: bool,
}

/// Why a record was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The producer's queue is full: try again later.
    QueueFull,
    /// The producer refuses it outright (too large for `message.max.bytes`, an
    /// unknown topic, ...).
    Refused {
        /// Why.
        reason: String,
        /// Refused for its size.
        too_large: bool,
    },
    /// The producer is unusable: rebuild it.
    Fatal(String),
}

/// How a transactional call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnError {
    /// Try the same call again (a timeout the broker may still answer).
    Retriable(String),
    /// Abort the transaction; the producer stays usable.
    Abortable(String),
    /// Another producer with the same transactional id took over.
    Fenced(String),
    /// The producer is unusable: rebuild it.
    Fatal(String),
}

impl std::fmt::Display for TxnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxnError::Retriable(e) => write!(f, "retriable: {e}"),
            TxnError::Abortable(e) => write!(f, "abortable: {e}"),
            TxnError::Fenced(e) => write!(f, "fenced: {e}"),
            TxnError::Fatal(e) => write!(f, "fatal: {e}"),
        }
    }
}

/// A transactional producer (the Kafka side implements it on rdkafka, running
/// its blocking calls off the runtime's workers).
pub trait TxnProducer: Send + Sync {
    /// The transactional id.
    fn id(&self) -> &str;
    /// Opens a transaction (a local state change: no network round trip).
    fn begin(&self) -> Result<(), TxnError>;
    /// Queues a record into the open transaction (never waits).
    fn send(&self, out: &Outgoing, tag: RecordTag) -> Result<(), SendError>;
    /// Adds the input positions (partition, next offset to read) to the open
    /// transaction, fenced by the consumer group's metadata.
    fn send_offsets<'a>(
        &'a self,
        positions: &'a [(i32, i64)],
    ) -> BoxFuture<'a, Result<(), TxnError>>;
    /// Commits the open transaction.
    fn commit(&self) -> BoxFuture<'_, Result<(), TxnError>>;
    /// Aborts the open transaction.
    fn abort(&self) -> BoxFuture<'_, Result<(), TxnError>>;
    /// Replaces an unusable producer by a new one with the same transactional
    /// id (which fences the old one and settles whatever it left open).
    fn rebuild(&self) -> BoxFuture<'_, Result<(), TxnError>>;
    /// Records the broker refused permanently since the last call.
    fn take_refusals(&self) -> Vec<Refusal>;
}

/// A refused record's partition waits; its record is retried alone.
#[derive(Debug, Clone)]
struct Stall {
    offset: i64,
    reason: String,
    retry_at: Instant,
    backoff: Duration,
}

/// Records of one finished job, waiting for its partition's watermark.
struct Finished {
    records: Vec<Outgoing>,
    /// Some of its records are in the open transaction already (the producer's
    /// queue took no more): the transaction cannot commit until the rest are.
    partial: bool,
    received: Instant,
    /// The request's outcome (none for work that publishes nothing).
    outcome: Option<Outcome>,
}

#[derive(Default)]
struct Part {
    epoch: Option<Epoch>,
    buffer: BTreeMap<i64, Finished>,
    /// Refused records waiting for a lone retry, by offset: the lowest is
    /// retried once everything before it is committed, then the next.
    stalls: BTreeMap<i64, Stall>,
}

/// What the open transaction holds, for the commit and its metrics.
#[derive(Default)]
struct Open {
    began: Option<Instant>,
    records: usize,
    /// Partitions with records or progress in it.
    partitions: BTreeSet<i32>,
    /// (outcome, consumed at) of each job whose records it holds.
    jobs: Vec<(Option<Outcome>, Instant)>,
    /// (role, label, milestone) of each record.
    published: Vec<(Role, &'static str, Option<Milestone>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No transaction is open.
    Idle,
    /// A transaction is open.
    Open,
    /// A commit (or abort, or rebuild) is under way; hand-overs wait.
    Committing,
}

/// Why the open transaction cannot commit.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Doom {
    /// A record was refused when queued: abort it.
    Abort(String),
    /// The producer failed when queueing: rebuild it.
    Rebuild(String),
}

/// A refused record of one input: its role, the broker's reason, and whether
/// it was refused for its size.
type Refused = (Role, String, bool);

struct Inner {
    phase: Phase,
    parts: BTreeMap<i32, Part>,
    open: Open,
    doomed: Option<Doom>,
    /// Refused records by the input record they answer.
    refusals: BTreeMap<(i32, i64), Vec<Refused>>,
    /// Partitions rewound since the engine last looked.
    rewound: Vec<i32>,
    /// Records buffered (not yet handed over).
    buffered: usize,
    /// Producers rebuilt since the last commit.
    rebuilds: u32,
}

/// What a commit came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Nothing was open.
    Nothing,
    /// Committed these positions.
    Committed(Vec<(i32, i64)>),
    /// Aborted; these partitions were rewound.
    Aborted(Vec<i32>),
    /// The producer was rebuilt; these partitions were rewound.
    Rebuilt(Vec<i32>),
    /// The engine must stop (another instance holds the transactional id, or
    /// the producer cannot be rebuilt): why.
    Stopped(String),
}

/// The transactions of one engine (one consumer group, one transactional
/// producer). Shared by the engine, the jobs' tasks and the revocation.
pub struct Transactions {
    producer: Arc<dyn TxnProducer>,
    source: Arc<dyn Source>,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    topic: String,
    max_pending: usize,
    interval: Duration,
    inner: Mutex<Inner>,
    /// One settlement (commit, abort, rebuild) at a time.
    turn: tokio::sync::Mutex<()>,
    /// A rebuild is under way (readiness fails meanwhile).
    rebuilding: AtomicBool,
    /// Why the engine must stop, once it must.
    stopped: Mutex<Option<String>>,
    /// First and longest wait before a stalled record is tried again.
    stall_backoff: (Duration, Duration),
}

/// The first wait before a stalled record is tried again; it doubles up to
/// [`STALL_MAX_BACKOFF`].
const STALL_FIRST_BACKOFF: Duration = Duration::from_secs(2);
const STALL_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Retries of a call that timed out before its outcome counts as unknown.
const CALL_RETRIES: u32 = 3;
/// Producers rebuilt in a row without a commit before the engine stops.
pub const MAX_REBUILDS: u32 = 5;
/// Attempts to create one new producer before the engine stops.
const REBUILD_ATTEMPTS: u32 = 8;
/// How long a commit waits for the producer's queue to take the rest of a job
/// whose records are partly in the transaction, before it aborts instead.
const PARTIAL_WAIT: Duration = Duration::from_secs(10);
/// Refusals remembered at most (each is one input record awaiting its redo).
const MAX_REFUSALS: usize = 100_000;

impl Transactions {
    /// Bookkeeping for the engine of `topic`.
    pub fn new(
        producer: Arc<dyn TxnProducer>,
        source: Arc<dyn Source>,
        ledger: Arc<Ledger>,
        metrics: Arc<Metrics>,
        interval: Duration,
        max_pending: usize,
    ) -> Self {
        Transactions {
            producer,
            topic: source.topic().to_string(),
            source,
            ledger,
            metrics,
            max_pending: max_pending.max(1),
            interval,
            inner: Mutex::new(Inner {
                phase: Phase::Idle,
                parts: BTreeMap::new(),
                open: Open::default(),
                doomed: None,
                refusals: BTreeMap::new(),
                rewound: Vec::new(),
                buffered: 0,
                rebuilds: 0,
            }),
            turn: tokio::sync::Mutex::new(()),
            rebuilding: AtomicBool::new(false),
            stopped: Mutex::new(None),
            stall_backoff: (STALL_FIRST_BACKOFF, STALL_MAX_BACKOFF),
        }
    }

    /// The same with other stall backoffs (tests).
    pub fn with_stall_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.stall_backoff = (first, max);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The transactional id.
    pub fn id(&self) -> &str {
        self.producer.id()
    }

    /// A job finished with `records` (in publish order). They wait for the
    /// partition's watermark and are then handed to the open transaction. A
    /// record refused before for this input is replaced (an event by the
    /// `publish_refused` dead letter `dead_letter` builds) or stalls the
    /// partition. Returns false when the job is stale (its partition was
    /// rewound or revoked): its records are dropped.
    pub fn finished(
        &self,
        job: &PipelineJob,
        mut records: Vec<Outgoing>,
        dead_letter: &dyn Fn(RejectCode, &str) -> Outgoing,
    ) -> bool {
        let (p, offset) = (job.incoming.partition, job.incoming.offset);
        let mut inner = self.lock();
        if !self.ledger.owns(p, job.epoch) {
            return false;
        }
        let stall = inner
            .refusals
            .get(&(p, offset))
            .and_then(|refused| redo_refused(refused, &mut records, offset, dead_letter));
        let n = records.len();
        let outcome = records.first().map(|r| r.outcome);
        let part = inner.parts.entry(p).or_default();
        part.epoch = Some(job.epoch);
        part.buffer.insert(
            offset,
            Finished {
                records,
                partial: false,
                received: job.incoming.received,
                outcome,
            },
        );
        inner.buffered += n;
        match stall {
            Some(reason) => {
                let part = inner.parts.entry(p).or_default();
                #[cfg(feature = "mutations")]
                if crate::mutation::on("second_stall_replaces_first") {
                    part.stalls.clear();
                }
                let backoff = part
                    .stalls
                    .get(&offset)
                    .map_or(self.stall_backoff.0, |s| s.backoff);
                tracing::error!(
                    topic = %self.topic,
                    partition = p,
                    offset,
                    reason = %reason,
                    retry_in_s = backoff.as_secs(),
                    "partition stalled: a record cannot be published; its offset stays uncommitted until the broker accepts it"
                );
                part.stalls.insert(
                    offset,
                    Stall {
                        offset,
                        reason: reason.clone(),
                        retry_at: Instant::now() + backoff,
                        backoff,
                    },
                );
                self.ledger.set_stalled(p, job.epoch, Some(reason));
            }
            None => {
                self.ledger.complete(p, job.epoch, offset);
            }
        }
        self.pump(&mut inner);
        true
    }

    /// Hands every buffered record below its partition's watermark to the open
    /// transaction, in offset order (a new transaction is begun as needed).
    /// Stops at a full producer queue (the next call goes on) and at a doomed
    /// transaction.
    fn pump(&self, inner: &mut Inner) {
        if inner.phase == Phase::Committing || inner.doomed.is_some() {
            return;
        }
        let partitions: Vec<i32> = inner
            .parts
            .iter()
            .filter(|(_, part)| !part.buffer.is_empty())
            .map(|(p, _)| *p)
            .collect();
        for p in partitions {
            let Some(watermark) = self.ledger.watermark(p) else {
                continue;
            };
            while let Some(part) = inner.parts.get_mut(&p) {
                let Some(mut entry) = part.buffer.first_entry() else {
                    break;
                };
                let offset = *entry.key();
                if offset >= watermark {
                    break;
                }
                if inner.phase == Phase::Idle {
                    if let Err(e) = self.producer.begin() {
                        tracing::error!(topic = %self.topic, error = %e, "cannot begin a transaction");
                        inner.doomed = Some(Doom::Rebuild(e.to_string()));
                        return;
                    }
                    inner.phase = Phase::Open;
                    inner.open.began = Some(Instant::now());
                }
                // Records are sent in order; one the queue cannot take yet stays,
                // with those after it.
                let finished = entry.get_mut();
                while let Some(out) = finished.records.first() {
                    let tag = RecordTag {
                        partition: p,
                        offset,
                        role: Role::of(&out.destination),
                    };
                    match self.producer.send(out, tag) {
                        Ok(()) => {
                            finished.partial = true;
                            let out = finished.records.remove(0);
                            inner.open.records += 1;
                            inner.buffered = inner.buffered.saturating_sub(1);
                            inner.open.partitions.insert(p);
                            inner
                                .open
                                .published
                                .push((tag.role, out.label, out.milestone));
                        }
                        Err(SendError::QueueFull) => return,
                        Err(SendError::Refused { reason, too_large }) => {
                            #[cfg(feature = "mutations")]
                            if crate::mutation::on("refusal_rewinds_one_partition") {
                                remember(inner, tag, reason, too_large);
                                self.rewind(inner, &[p], None);
                                return;
                            }
                            // As if the broker had refused it: the transaction
                            // may already hold this partition's earlier records,
                            // which must not commit without their position.
                            tracing::warn!(topic = %self.topic, partition = p, offset, role = ?tag.role, reason = %reason, "the producer refused a record; the transaction is aborted and the work redone without it");
                            self.metrics.publish_refused(tag.role.label());
                            remember(inner, tag, reason.clone(), too_large);
                            inner.open.partitions.insert(p);
                            inner.doomed = Some(Doom::Abort(reason));
                            return;
                        }
                        Err(SendError::Fatal(reason)) => {
                            inner.open.partitions.insert(p);
                            inner.doomed = Some(Doom::Rebuild(reason));
                            return;
                        }
                    }
                }
                let finished = entry.remove();
                inner.open.jobs.push((finished.outcome, finished.received));
                inner.open.partitions.insert(p);
                if inner.phase == Phase::Idle {
                    inner.phase = Phase::Open;
                    inner.open.began = Some(Instant::now());
                }
            }
        }
        self.metrics
            .set_pending_records(&self.topic, inner.buffered + inner.open.records);
    }

    /// Hands over what became ready (the engine calls this on its tick).
    pub fn pump_now(&self) {
        let mut inner = self.lock();
        self.pump(&mut inner);
    }

    /// Records buffered or in the open transaction.
    pub fn pending_records(&self) -> usize {
        let inner = self.lock();
        inner.buffered + inner.open.records
    }

    /// At the bound on pending records: the engine reads nothing more until a
    /// commit (or the work a buffer waits for) brings them down.
    pub fn full(&self) -> bool {
        self.pending_records() >= self.max_pending
    }

    /// True when the open transaction should be settled now: it is
    /// `transaction_interval` old, holds half the pending-record bound, or is
    /// doomed; or a stalled record is due for a retry.
    pub fn due(&self) -> bool {
        let inner = self.lock();
        if inner.phase == Phase::Committing {
            return false;
        }
        if inner.doomed.is_some() {
            return true;
        }
        let now = Instant::now();
        let stall_due = inner
            .parts
            .values()
            .any(|p| p.stalls.values().next().is_some_and(|s| s.retry_at <= now));
        let something = inner.phase == Phase::Open || inner.parts.keys().any(|p| self.moved(*p));
        let old = inner
            .open
            .began
            .is_none_or(|b| now.saturating_duration_since(b) >= self.interval);
        stall_due || something && (old || inner.open.records >= self.max_pending / 2)
    }

    /// True while a rebuild of the producer is under way.
    pub fn rebuilding(&self) -> bool {
        self.rebuilding.load(Ordering::Acquire)
    }

    /// Why the engine must stop, once it must.
    pub fn stopped(&self) -> Option<String> {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A partition's position moved past its last commit.
    fn moved(&self, p: i32) -> bool {
        match (self.ledger.watermark(p), self.ledger.restart_position(p)) {
            (Some(w), Some(c)) => w > c,
            _ => false,
        }
    }

    /// Partitions rewound since the last call: the engine drops their queued
    /// jobs and held heads (the consumer was already sought back).
    pub fn take_rewound(&self) -> Vec<i32> {
        std::mem::take(&mut self.lock().rewound)
    }

    /// The positions a commit now may reach: every partition whose watermark
    /// moved past its last commit, up to the first record still buffered.
    fn positions(&self, inner: &Inner) -> Vec<(i32, i64)> {
        let owned: BTreeSet<i32> = inner
            .parts
            .keys()
            .chain(inner.open.partitions.iter())
            .copied()
            .collect();
        owned
            .into_iter()
            .filter_map(|p| {
                let w = self.ledger.watermark(p)?;
                let c = self.ledger.restart_position(p)?;
                let first_buffered = inner
                    .parts
                    .get(&p)
                    .and_then(|part| part.buffer.keys().next().copied());
                let position = first_buffered.map_or(w, |b| b.min(w));
                (position > c).then_some((p, position))
            })
            .collect()
    }

    /// Settles the open transaction (waiting for a settlement already under way
    /// first): commits it with the positions its work reached, or aborts it, or
    /// rebuilds the producer; then retries a stalled record whose time has come.
    pub async fn commit(&self) -> Settled {
        let _turn = self.turn.lock().await;
        if let Some(why) = self.stopped() {
            return Settled::Stopped(why);
        }
        self.complete_partial_jobs().await;
        let prepared = {
            let mut inner = self.lock();
            self.pump(&mut inner);
            let positions = self.positions(&inner);
            if positions.is_empty() && inner.phase != Phase::Open && inner.doomed.is_none() {
                // Hand-overs wait while a stalled record is retried alone.
                inner.phase = Phase::Committing;
                None
            } else {
                let mut doomed = inner.doomed.take();
                if inner.phase == Phase::Idle && doomed.is_none() {
                    // Progress without records (skipped or empty work): a
                    // transaction of positions only.
                    if let Err(e) = self.producer.begin() {
                        doomed = Some(Doom::Rebuild(e.to_string()));
                    }
                }
                inner.phase = Phase::Committing;
                Some((positions, std::mem::take(&mut inner.open), doomed))
            }
        };
        let settled = match prepared {
            None => Settled::Nothing,
            Some((positions, open, doomed)) => {
                tracing::debug!(topic = %self.topic, ?positions, records = open.records, ?doomed, "settling the transaction");
                self.settle(positions, open, doomed).await
            }
        };
        if matches!(settled, Settled::Stopped(_)) {
            return settled;
        }
        // Still settling: nothing is handed over while a stalled record is
        // retried in a transaction of its own.
        #[cfg(feature = "mutations")]
        if crate::mutation::on("stall_retry_with_handovers") {
            self.lock().phase = Phase::Idle;
        }
        if let Some(stop) = self.retry_stalls().await {
            return stop;
        }
        let mut inner = self.lock();
        inner.phase = Phase::Idle;
        self.pump(&mut inner);
        drop(inner);
        settled
    }

    /// A job's records commit together or not at all: while the producer's
    /// queue holds back the rest of a job whose first records are in the open
    /// transaction, the commit waits (the queue drains as records are
    /// delivered), and dooms the transaction if it waits too long. Committing
    /// half a job without its position would repeat the half when it is redone.
    async fn complete_partial_jobs(&self) {
        #[cfg(feature = "mutations")]
        if crate::mutation::on("commit_partial_job") {
            return;
        }
        let started = Instant::now();
        loop {
            {
                let mut inner = self.lock();
                self.pump(&mut inner);
                let partial = inner
                    .parts
                    .values()
                    .any(|p| p.buffer.values().next().is_some_and(|f| f.partial));
                if !partial || inner.doomed.is_some() {
                    return;
                }
                if started.elapsed() >= PARTIAL_WAIT {
                    tracing::warn!(topic = %self.topic, "the producer's queue did not take the rest of a job's records; the transaction is aborted");
                    inner.doomed = Some(Doom::Abort("the producer's queue stayed full".into()));
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn settle(
        &self,
        positions: Vec<(i32, i64)>,
        open: Open,
        doomed: Option<Doom>,
    ) -> Settled {
        let started = Instant::now();
        let result = match doomed {
            Some(Doom::Abort(reason)) => Err(TxnError::Abortable(reason)),
            Some(Doom::Rebuild(reason)) => Err(TxnError::Fatal(reason)),
            None => self.commit_open(&positions).await,
        };
        self.metrics
            .transaction_commit(&self.topic, started.elapsed());
        match result {
            Ok(()) => {
                for (p, o) in &positions {
                    self.ledger.committed(*p, *o);
                }
                self.lock().rebuilds = 0;
                self.account(&open);
                self.metrics.transaction(&self.topic, "committed");
                Settled::Committed(positions)
            }
            Err(TxnError::Abortable(e)) => {
                tracing::warn!(topic = %self.topic, error = %e, "transaction aborted; its partitions are rewound to their last commit");
                if let Err(e) = retrying(|| self.producer.abort()).await {
                    tracing::warn!(topic = %self.topic, error = %e, "aborting failed; rebuilding the producer");
                    return self.rebuild(e).await;
                }
                let mut inner = self.lock();
                self.note_refusals(&mut inner);
                let rewound: Vec<i32> = open
                    .partitions
                    .iter()
                    .copied()
                    .chain(positions.iter().map(|(p, _)| *p))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                self.rewind(&mut inner, &rewound, None);
                self.metrics.transaction(&self.topic, "aborted");
                Settled::Aborted(rewound)
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "the transactional producer must be rebuilt");
                self.rebuild(e).await
            }
        }
    }

    /// The positions, then the commit; each retried alone while it times out.
    /// A commit that never answers has an unknown outcome: only a new producer
    /// (which settles the old one's transaction) tells.
    async fn commit_open(&self, positions: &[(i32, i64)]) -> Result<(), TxnError> {
        #[cfg(feature = "mutations")]
        if crate::mutation::on("commit_retry_resends_offsets") {
            return retrying(|| {
                Box::pin(async move {
                    if !positions.is_empty() {
                        match self.producer.send_offsets(positions).await {
                            // A state error: the producer cannot be trusted.
                            Err(TxnError::Fenced(e)) => return Err(TxnError::Fatal(e)),
                            other => other?,
                        }
                    }
                    self.producer.commit().await
                })
            })
            .await;
        }
        if !positions.is_empty() {
            retrying(|| self.producer.send_offsets(positions)).await?;
        }
        retrying(|| self.producer.commit()).await
    }

    /// Metrics of a committed transaction: its records are published, its jobs done.
    fn account(&self, open: &Open) {
        for (role, label, milestone) in &open.published {
            match role {
                Role::Event => self.metrics.event_published(label),
                Role::DeadLetter => self.metrics.dead_lettered(label),
                Role::Recheck => {}
            }
            match milestone {
                Some(Milestone::RecheckScheduled {
                    connector,
                    delay_secs,
                }) => self.metrics.recheck_scheduled(connector, *delay_secs),
                Some(Milestone::ChainEnded { connector, end }) => {
                    self.metrics.chain_ended(connector, end.label())
                }
                None => {}
            }
        }
        for (outcome, received) in &open.jobs {
            if let Some(outcome) = outcome {
                self.metrics.request_done(*outcome, *received);
            }
        }
    }

    fn note_refusals(&self, inner: &mut Inner) {
        for r in self.producer.take_refusals() {
            let tag = r.tag;
            tracing::warn!(topic = %self.topic, partition = tag.partition, offset = tag.offset, role = ?tag.role, reason = %r.reason, "the broker refused a record permanently; the work is redone without it");
            self.metrics.publish_refused(tag.role.label());
            remember(inner, tag, r.reason, r.too_large);
        }
    }

    fn stop(&self, why: String) -> Settled {
        tracing::error!(topic = %self.topic, transactional_id = %self.id(), reason = %why, "exactly once cannot go on: the engine stops");
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
        self.rebuilding.store(false, Ordering::Release);
        Settled::Stopped(why)
    }

    /// After a fatal error: a new producer, and every partition back to what the
    /// broker has committed.
    async fn rebuild(&self, cause: TxnError) -> Settled {
        {
            let mut inner = self.lock();
            inner.phase = Phase::Committing;
            inner.doomed = None;
            let fenced_again = matches!(cause, TxnError::Fenced(_)) && inner.rebuilds > 0;
            if fenced_again {
                return self.stop(format!(
                    "the transactional producer `{}` was fenced again after it was rebuilt: another instance uses the same transactional id (kafka.instance_id must differ between instances); {cause}",
                    self.id()
                ));
            }
            inner.rebuilds += 1;
            if inner.rebuilds > MAX_REBUILDS {
                return self.stop(format!(
                    "the transactional producer `{}` was rebuilt {MAX_REBUILDS} times without a commit; {cause}",
                    self.id()
                ));
            }
        }
        self.rebuilding.store(true, Ordering::Release);
        self.metrics.transaction(&self.topic, "rebuilt");
        tracing::warn!(topic = %self.topic, transactional_id = %self.id(), cause = %cause, "rebuilding the transactional producer");
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            match self.producer.rebuild().await {
                Ok(()) => break,
                Err(e @ TxnError::Fenced(_)) => {
                    return self.stop(format!(
                        "the transactional producer `{}` was fenced while it was rebuilt: another instance uses the same transactional id; {e}",
                        self.id()
                    ))
                }
                Err(e) => {
                    attempt += 1;
                    if attempt >= REBUILD_ATTEMPTS {
                        return self.stop(format!(
                            "cannot rebuild the transactional producer `{}` ({attempt} attempts): {e}",
                            self.id()
                        ));
                    }
                    tracing::error!(topic = %self.topic, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot rebuild the transactional producer");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        let owned: Vec<i32> = self.lock().parts.keys().copied().collect();
        // Whether the last transaction landed is known only to the broker: its
        // committed positions, asked until it answers (never the ledger's own).
        let mut delay = Duration::from_millis(100);
        let committed = loop {
            match self.source.committed(&owned).await {
                Ok(c) => break c,
                #[cfg(feature = "mutations")]
                Err(_) if crate::mutation::on("rebuild_falls_back_to_ledger") => {
                    let mut inner = self.lock();
                    inner.open = Open::default();
                    self.rewind(&mut inner, &owned, None);
                    drop(inner);
                    self.rebuilding.store(false, Ordering::Release);
                    return Settled::Rebuilt(owned);
                }
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot read the committed positions after a rebuild; asking again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        let mut inner = self.lock();
        inner.open = Open::default();
        // The new producer starts clean: records refused by the old one were
        // aborted with its transaction and are redone.
        let _ = self.producer.take_refusals();
        self.rewind(&mut inner, &owned, Some(&committed));
        drop(inner);
        self.rebuilding.store(false, Ordering::Release);
        Settled::Rebuilt(owned)
    }

    /// Forgets `partitions`' uncommitted work and fetches them again from their
    /// committed position (`to`, when the broker was asked; else the ledger's).
    fn rewind(&self, inner: &mut Inner, partitions: &[i32], to: Option<&[(i32, i64)]>) {
        for &p in partitions {
            if let Some(part) = inner.parts.get_mut(&p) {
                let dropped: usize = part.buffer.values().map(|f| f.records.len()).sum();
                inner.buffered = inner.buffered.saturating_sub(dropped);
                part.buffer.clear();
                // Redone from the committed position: a refused record
                // stalls again when it is redone.
                part.stalls.clear();
            }
            let known = self.ledger.rewind(p);
            let asked = to.and_then(|t| t.iter().find(|(q, _)| *q == p).map(|(_, o)| *o));
            if let Some(offset) = asked {
                self.ledger.committed(p, offset);
            }
            if let Some(offset) = asked.or(known) {
                self.source.seek(p, offset);
            }
            inner.rewound.push(p);
        }
        inner.open.partitions.retain(|p| !partitions.contains(p));
    }

    /// A stalled record whose time has come is tried alone: a transaction with
    /// just its records and its partition's position. Success resumes the
    /// partition; failure doubles the wait. Returns a stop, if it came to that.
    async fn retry_stalls(&self) -> Option<Settled> {
        let now = Instant::now();
        let due: Vec<(i32, i64, Epoch, Vec<Outgoing>)> = {
            let inner = self.lock();
            inner
                .parts
                .iter()
                .filter_map(|(p, part)| {
                    let s = part.stalls.values().next().filter(|s| s.retry_at <= now)?;
                    // Only at the head of what is committed: its transaction
                    // commits the position past it, which must not pass work
                    // before it that is still running or uncommitted.
                    #[cfg(feature = "mutations")]
                    let anytime = crate::mutation::on("stall_retry_anytime");
                    #[cfg(not(feature = "mutations"))]
                    let anytime = false;
                    if !anytime && self.ledger.restart_position(*p) != Some(s.offset) {
                        return None;
                    }
                    let records = part.buffer.get(&s.offset)?.records.clone();
                    Some((*p, s.offset, part.epoch?, records))
                })
                .collect()
        };
        for (p, offset, epoch, records) in due {
            let _ = self.producer.take_refusals();
            let probe = async {
                self.producer.begin()?;
                for out in &records {
                    let tag = RecordTag {
                        partition: p,
                        offset,
                        role: Role::of(&out.destination),
                    };
                    if let Err(e) = self.producer.send(out, tag) {
                        return Err(match e {
                            SendError::Fatal(e) => TxnError::Fatal(e),
                            other => TxnError::Abortable(format!("{other:?}")),
                        });
                    }
                }
                let position = [(p, offset + 1)];
                retrying(|| self.producer.send_offsets(&position)).await?;
                retrying(|| self.producer.commit()).await
            };
            match probe.await {
                Ok(()) => {
                    tracing::warn!(topic = %self.topic, partition = p, offset, "the refused record was accepted; partition resumed");
                    let mut inner = self.lock();
                    let part = inner.parts.entry(p).or_default();
                    part.stalls.remove(&offset);
                    let next = part.stalls.values().next().map(|s| s.reason.clone());
                    let n = part.buffer.remove(&offset).map_or(0, |f| f.records.len());
                    inner.buffered = inner.buffered.saturating_sub(n);
                    inner.refusals.remove(&(p, offset));
                    inner.rebuilds = 0;
                    self.ledger.complete(p, epoch, offset);
                    self.ledger.committed(p, offset + 1);
                    self.ledger.set_stalled(p, epoch, next);
                }
                Err(TxnError::Abortable(e)) | Err(TxnError::Retriable(e)) => {
                    let aborted = retrying(|| self.producer.abort()).await;
                    let _ = self.producer.take_refusals();
                    self.stall_again(p, offset, &e);
                    if let Err(e) = aborted {
                        let settled = self.rebuild(e).await;
                        return matches!(settled, Settled::Stopped(_)).then_some(settled);
                    }
                }
                Err(e) => {
                    let settled = self.rebuild(e).await;
                    return matches!(settled, Settled::Stopped(_)).then_some(settled);
                }
            }
        }
        None
    }

    /// A stalled record was refused again: the wait doubles.
    fn stall_again(&self, p: i32, offset: i64, error: &str) {
        let mut inner = self.lock();
        let part = inner.parts.entry(p).or_default();
        if let Some(s) = part.stalls.get_mut(&offset) {
            s.backoff = (s.backoff * 2).min(self.stall_backoff.1);
            s.retry_at = Instant::now() + s.backoff;
            tracing::error!(topic = %self.topic, partition = p, offset, reason = %s.reason, error = %error, retry_in_s = s.backoff.as_secs(), "partition still stalled: the record is refused");
        }
    }

    /// True while work of `partitions` waits in a buffer or sits in the open
    /// transaction.
    pub fn holds(&self, partitions: &[i32]) -> bool {
        let inner = self.lock();
        partitions.iter().any(|p| {
            inner.open.partitions.contains(p)
                || inner
                    .parts
                    .get(p)
                    .is_some_and(|part| !part.buffer.is_empty())
        })
    }

    /// Forgets revoked partitions (after their work was committed). Should
    /// the open transaction still hold records of theirs, it is doomed: those
    /// records must not commit without their positions, which the partitions'
    /// next owner now moves.
    pub fn forget(&self, partitions: &[i32]) {
        let mut inner = self.lock();
        #[cfg(feature = "mutations")]
        let keep = crate::mutation::on("revoke_keeps_open_records");
        #[cfg(not(feature = "mutations"))]
        let keep = false;
        if !keep && partitions.iter().any(|p| inner.open.partitions.contains(p)) {
            tracing::warn!(topic = %self.topic, ?partitions, "revoked partitions left records in the open transaction; it is aborted");
            inner.doomed = Some(Doom::Abort(
                "revoked partitions left records in the open transaction".into(),
            ));
        }
        for p in partitions {
            if let Some(part) = inner.parts.remove(p) {
                let n: usize = part.buffer.values().map(|f| f.records.len()).sum();
                inner.buffered = inner.buffered.saturating_sub(n);
            }
            inner.refusals.retain(|(q, _), _| q != p);
            inner.open.partitions.remove(p);
        }
    }
}

/// Remembers a refused record for the redo of the input it answers (bounded).
fn remember(inner: &mut Inner, tag: RecordTag, reason: String, too_large: bool) {
    if inner.refusals.len() >= MAX_REFUSALS
        && !inner.refusals.contains_key(&(tag.partition, tag.offset))
    {
        return;
    }
    inner
        .refusals
        .entry((tag.partition, tag.offset))
        .or_default()
        .push((tag.role, reason, too_large));
}

/// The redo of an input whose records were refused before: a refused event
/// becomes the `publish_refused` dead letter (its chain ends there), a re-check
/// record refused for its size ends the chain with a `recheck_too_large` dead
/// letter. Returns why the partition must stall, when a dead letter or re-check
/// record the broker refuses for another reason is among the records.
fn redo_refused(
    refused: &[Refused],
    records: &mut Vec<Outgoing>,
    offset: i64,
    dead_letter: &dyn Fn(RejectCode, &str) -> Outgoing,
) -> Option<String> {
    if let Some((_, reason, _)) = refused.iter().find(|(r, ..)| *r == Role::Event) {
        *records = vec![dead_letter(
            RejectCode::PublishRefused,
            &format!("the event could not be published: {reason}"),
        )];
    }
    let recheck_too_large = refused
        .iter()
        .find(|(r, _, too_large)| *r == Role::Recheck && *too_large);
    if let Some((_, reason, _)) = recheck_too_large {
        if records
            .iter()
            .any(|o| Role::of(&o.destination) == Role::Recheck)
        {
            records.retain(|o| Role::of(&o.destination) != Role::Recheck);
            records.push(dead_letter(
                RejectCode::RecheckTooLarge,
                &format!("the re-check record could not be published: {reason}"),
            ));
        }
    }
    let blocked = refused.iter().find(|(role, _, too_large)| {
        records
            .iter()
            .any(|out| Role::of(&out.destination) == *role)
            && *role != Role::Event
            && !(*role == Role::Recheck && *too_large)
    });
    blocked.map(|(role, reason, _)| {
        format!(
            "the broker refuses the {} record of offset {offset}: {reason}",
            match role {
                Role::DeadLetter => "dead-letter",
                _ => "re-check",
            }
        )
    })
}

/// Runs a transactional call, again while it times out (up to
/// [`CALL_RETRIES`] times); a call that never answers is fatal (its outcome is
/// unknown).
async fn retrying<'a>(
    mut call: impl FnMut() -> BoxFuture<'a, Result<(), TxnError>>,
) -> Result<(), TxnError> {
    let mut tries = 0;
    loop {
        match call().await {
            Err(TxnError::Retriable(e)) if tries < CALL_RETRIES => {
                tries += 1;
                tracing::warn!(error = %e, tries, "a transactional call timed out; calling it again");
            }
            Err(TxnError::Retriable(e)) => {
                return Err(TxnError::Fatal(format!(
                    "no answer after {tries} retries: {e}"
                )))
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Rejection;
    use crate::pipeline::record::{Incoming, Work};
    use std::borrow::Cow;

    use crate::pipeline::fakes::{FakeProducer, FakeSource};

    struct Fixture {
        producer: Arc<FakeProducer>,
        source: Arc<FakeSource>,
        ledger: Arc<Ledger>,
        txn: Transactions,
    }

    fn fixture(max_pending: usize) -> Fixture {
        let producer = Arc::new(FakeProducer::default());
        let source = Arc::new(FakeSource::default());
        let ledger = Arc::new(Ledger::new());
        let txn = Transactions::new(
            producer.clone(),
            source.clone(),
            ledger.clone(),
            Arc::new(Metrics::new()),
            Duration::from_millis(100),
            max_pending,
        )
        .with_stall_backoff(Duration::ZERO, Duration::ZERO);
        Fixture {
            producer,
            source,
            ledger,
            txn,
        }
    }

    fn out(destination: Destination) -> Outgoing {
        Outgoing {
            destination,
            key: Some(b"k".to_vec()),
            value: Some(b"v".to_vec()),
            headers: Vec::new(),
            label: "CHARGED",
            outcome: Outcome::Synced,
            summary: Cow::Borrowed(""),
            milestone: None,
        }
    }

    fn job(f: &Fixture, partition: i32, offset: i64) -> PipelineJob {
        let epoch = match f.ledger.arrive(partition, offset) {
            crate::pipeline::ledger::Arrival::Accepted(e) => e,
            other => panic!("{other:?}"),
        };
        assert!(f.ledger.start(partition, epoch));
        PipelineJob {
            incoming: Incoming {
                topic: Arc::from("in"),
                partition,
                offset,
                key: None,
                value: None,
                headers: Vec::new(),
                received: Instant::now(),
                recheck: false,
            },
            epoch,
            key: None,
            work: Work::Reject(Rejection::new(RejectCode::InvalidJson, "x")),
        }
    }

    fn finish(f: &Fixture, j: &PipelineJob, records: Vec<Outgoing>) -> bool {
        let done = f.txn.finished(j, records, &|code, m| {
            let mut d = out(Destination::DeadLetters);
            d.label = code.as_str();
            d.summary = Cow::Owned(m.to_owned());
            d
        });
        f.ledger
            .finish(j.incoming.partition, j.epoch, j.incoming.offset, false);
        done
    }

    fn sent(f: &Fixture) -> Vec<(i64, Role)> {
        let open = f.producer.open.lock().unwrap();
        open.iter().map(|t| (t.offset, t.role)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn finished_work_is_handed_over_in_offset_order_and_committed_at_the_watermark() {
        let f = fixture(1000);
        let jobs: Vec<_> = (10..14).map(|o| job(&f, 0, o)).collect();
        finish(
            &f,
            &jobs[2],
            vec![
                out(Destination::Events),
                out(Destination::Recheck(Arc::from("r"))),
            ],
        );
        assert!(sent(&f).is_empty(), "12 waits for 10 and 11");
        finish(&f, &jobs[0], vec![out(Destination::Events)]);
        assert_eq!(sent(&f), vec![(10, Role::Event)]);
        finish(&f, &jobs[1], vec![out(Destination::DeadLetters)]);
        assert_eq!(
            sent(&f),
            vec![
                (10, Role::Event),
                (11, Role::DeadLetter),
                (12, Role::Event),
                (12, Role::Recheck)
            ]
        );
        assert_eq!(f.txn.pending_records(), 4);
        // 13 is still running: the position stops before it.
        assert_eq!(f.txn.commit().await, Settled::Committed(vec![(0, 13)]));
        assert_eq!(f.ledger.restart_position(0), Some(13));
        assert_eq!(f.txn.pending_records(), 0);
        assert_eq!(f.txn.commit().await, Settled::Nothing, "nothing new");
        finish(&f, &jobs[3], Vec::new());
        assert_eq!(
            f.txn.commit().await,
            Settled::Committed(vec![(0, 14)]),
            "work without records moves the position too"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn work_finished_beyond_the_watermark_is_never_in_a_committed_transaction() {
        let f = fixture(1000);
        let a = job(&f, 0, 0);
        let b = job(&f, 0, 1);
        finish(&f, &b, vec![out(Destination::Events)]);
        assert_eq!(
            f.txn.commit().await,
            Settled::Nothing,
            "nothing below the watermark"
        );
        assert!(f.producer.committed.lock().unwrap().is_empty());
        assert_eq!(f.txn.pending_records(), 1, "buffered");
        finish(&f, &a, vec![out(Destination::Events)]);
        assert_eq!(f.txn.commit().await, Settled::Committed(vec![(0, 2)]));
        assert_eq!(f.producer.committed.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_rewinds_the_partitions_it_held_and_their_running_work_goes_stale() {
        let f = fixture(1000);
        let a = job(&f, 0, 5);
        let b = job(&f, 1, 7);
        let late = job(&f, 0, 6);
        finish(&f, &a, vec![out(Destination::Events)]);
        finish(&f, &b, vec![out(Destination::Events)]);
        f.producer
            .commits
            .lock()
            .unwrap()
            .push(Err(TxnError::Abortable("broker said no".into())));
        assert_eq!(f.txn.commit().await, Settled::Aborted(vec![0, 1]));
        assert!(f.producer.committed.lock().unwrap().is_empty());
        let seeks = f.source.seeks.lock().unwrap().clone();
        assert_eq!(
            seeks,
            vec![(0, 5), (1, 7)],
            "back to where consumption started"
        );
        let mut rewound = f.txn.take_rewound();
        rewound.sort_unstable();
        assert_eq!(rewound, vec![0, 1]);
        assert!(
            !finish(&f, &late, vec![out(Destination::Events)]),
            "a job of the old epoch cannot finish into the next transaction"
        );
        // Redone from 5: committed once.
        let again = job(&f, 0, 5);
        finish(&f, &again, vec![out(Destination::Events)]);
        assert_eq!(f.txn.commit().await, Settled::Committed(vec![(0, 6)]));
        assert_eq!(f.producer.committed.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_event_becomes_a_dead_letter_after_one_abort_not_a_loop() {
        let f = fixture(1000);
        let a = job(&f, 0, 0);
        finish(
            &f,
            &a,
            vec![
                out(Destination::Events),
                out(Destination::Recheck(Arc::from("r"))),
            ],
        );
        let tag = RecordTag {
            partition: 0,
            offset: 0,
            role: Role::Event,
        };
        f.producer.refusals.lock().unwrap().push(Refusal {
            tag,
            reason: "MSG_SIZE_TOO_LARGE".into(),
            too_large: true,
        });
        f.producer
            .commits
            .lock()
            .unwrap()
            .push(Err(TxnError::Abortable("a record failed".into())));
        assert_eq!(f.txn.commit().await, Settled::Aborted(vec![0]));
        let redo = job(&f, 0, 0);
        finish(
            &f,
            &redo,
            vec![
                out(Destination::Events),
                out(Destination::Recheck(Arc::from("r"))),
            ],
        );
        assert_eq!(
            sent(&f),
            vec![(0, Role::DeadLetter)],
            "the event's request is dead-lettered, its chain ends"
        );
        assert_eq!(f.txn.commit().await, Settled::Committed(vec![(0, 1)]));
        let log = f.producer.log.lock().unwrap().clone();
        assert_eq!(log.iter().filter(|l| *l == "abort").count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_recheck_record_refused_for_its_size_ends_the_chain_with_a_dead_letter() {
        let f = fixture(1000);
        let a = job(&f, 0, 0);
        finish(
            &f,
            &a,
            vec![
                out(Destination::Events),
                out(Destination::Recheck(Arc::from("r"))),
            ],
        );
        let tag = RecordTag {
            partition: 0,
            offset: 0,
            role: Role::Recheck,
        };
        f.producer.refusals.lock().unwrap().push(Refusal {
            tag,
            reason: "MSG_SIZE_TOO_LARGE".into(),
            too_large: true,
        });
        f.producer
            .commits
            .lock()
            .unwrap()
            .push(Err(TxnError::Abortable("a record failed".into())));
        assert_eq!(f.txn.commit().await, Settled::Aborted(vec![0]));
        let redo = job(&f, 0, 0);
        finish(
            &f,
            &redo,
            vec![
                out(Destination::Events),
                out(Destination::Recheck(Arc::from("r"))),
            ],
        );
        assert_eq!(
            sent(&f),
            vec![(0, Role::Event), (0, Role::DeadLetter)],
            "the event stays, the chain ends"
        );
        assert!(!f.ledger.is_stalled(0));
        assert_eq!(f.txn.commit().await, Settled::Committed(vec![(0, 1)]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_dead_letter_stalls_its_partition_only_and_is_retried_alone() {
        let f = fixture(1000);
        let a = job(&f, 0, 0);
        finish(&f, &a, vec![out(Destination::DeadLetters)]);
        let tag = RecordTag {
            partition: 0,
            offset: 0,
            role: Role::DeadLetter,
        };
        f.producer.refusals.lock().unwrap().push(Refusal {
            tag,
            reason: "TOPIC_AUTHORIZATION_FAILED".into(),
            too_large: false,
        });
        f.producer
            .commits
            .lock()
            .unwrap()
            .push(Err(TxnError::Abortable("a record failed".into())));
        assert_eq!(f.txn.commit().await, Settled::Aborted(vec![0]));
        // Redone: it stalls; partition 1 goes on.
        let redo = job(&f, 0, 0);
        let next = job(&f, 0, 1);
        let other = job(&f, 1, 0);
        // The retry (backoff zero here) is refused once more, then accepted.
        f.producer.commits.lock().unwrap().push(Ok(()));
        f.producer
            .commits
            .lock()
            .unwrap()
            .push(Err(TxnError::Abortable("still refused".into())));
        finish(&f, &redo, vec![out(Destination::DeadLetters)]);
        assert!(f.ledger.is_stalled(0));
        finish(&f, &next, vec![out(Destination::Events)]);
        finish(&f, &other, vec![out(Destination::Events)]);
        assert_eq!(
            sent(&f),
            vec![(0, Role::Event)],
            "partition 1's event; partition 0 waits"
        );
        assert_eq!(f.txn.commit().await, Settled::Committed(vec![(1, 1)]));
        assert!(f.ledger.is_stalled(0), "the retry alone was refused");
        let aborts = |f: &Fixture| {
            f.producer
                .log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| *l == "abort")
                .count()
        };
        assert_eq!(
            aborts(&f),
            2,
            "the first refusal and the retry's, nothing of partition 1's"
        );
        assert_eq!(
            f.txn.commit().await,
            Settled::Nothing,
            "the retry runs in its own transaction"
        );
        assert!(!f.ledger.is_stalled(0), "accepted at the next retry");
        assert_eq!(f.ledger.restart_position(0), Some(1));
        assert_eq!(
            f.txn.commit().await,
            Settled::Committed(vec![(0, 2)]),
            "then the rest"
        );
        let committed: Vec<(i32, i64, Role)> = f
            .producer
            .committed
            .lock()
            .unwrap()
            .iter()
            .map(|t| (t.partition, t.offset, t.role))
            .collect();
        assert_eq!(
            committed,
            vec![
                (1, 0, Role::Event),
                (0, 0, Role::DeadLetter),
                (0, 1, Role::Event)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_error_rebuilds_the_producer_and_rewinds_to_what_the_broker_committed() {
        let f = fixture(1000);
        let a = job(&f, 0, 3);
        finish(&f, &a, vec![out(Destination::Events)]);
        f.source.committed.lock().unwrap().push((0, 2));
        f.producer.commits.lock().unwrap().extend([
            Err(TxnError::Retriable("timed out".into())),
            Err(TxnError::Retriable("timed out".into())),
            Err(TxnError::Retriable("timed out".into())),
            Err(TxnError::Retriable("timed out".into())),
        ]);
        assert_eq!(f.txn.commit().await, Settled::Rebuilt(vec![0]));
        assert!(f
            .producer
            .log
            .lock()
            .unwrap()
            .contains(&"rebuild".to_owned()));
        assert_eq!(
            f.source.seeks.lock().unwrap().clone(),
            vec![(0, 2)],
            "the broker's committed position, not the ledger's"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pending_records_are_bounded_and_a_commit_is_due_early() {
        let f = fixture(4);
        for o in 0..2 {
            let j = job(&f, 0, o);
            finish(&f, &j, vec![out(Destination::Events)]);
        }
        assert!(!f.txn.full());
        assert!(f.txn.due(), "half the bound is in the open transaction");
        for o in 2..4 {
            let j = job(&f, 0, o);
            finish(&f, &j, vec![out(Destination::Events)]);
        }
        assert!(f.txn.full());
        f.txn.commit().await;
        assert!(!f.txn.full());
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_refused_when_queued_aborts_the_whole_transaction_and_rewinds_every_partition_it_held(
    ) {
        // The hole: the refused record's partition was rewound alone, while its
        // earlier records stayed in the transaction and committed without the
        // partition's position; the redo produced them again.
        let f = fixture(1000);
        let a = job(&f, 0, 0);
        let b = job(&f, 0, 1);
        let other = job(&f, 1, 0);
        finish(&f, &a, vec![out(Destination::Events)]);
        finish(&f, &other, vec![out(Destination::Events)]);
        f.producer
            .sends
            .lock()
            .unwrap()
            .push(Err(SendError::Refused {
                reason: "MSG_SIZE_TOO_LARGE".into(),
                too_large: true,
            }));
        finish(&f, &b, vec![out(Destination::Events)]);
        assert!(f.txn.due(), "a doomed transaction is settled at once");
        assert_eq!(f.txn.commit().await, Settled::Aborted(vec![0, 1]));
        assert!(f.producer.committed.lock().unwrap().is_empty());
        assert_eq!(f.producer.calls("commit"), 0, "never committed");
        assert_eq!(f.source.seeks.lock().unwrap().clone(), vec![(0, 0), (1, 0)]);
        // Redone: 0's event and 1's dead letter (the event that can never be
        // produced), partition 1's event; each committed once.
        let a = job(&f, 0, 0);
        let b = job(&f, 0, 1);
        let other = job(&f, 1, 0);
        finish(&f, &a, vec![out(Destination::Events)]);
        finish(&f, &b, vec![out(Destination::Events)]);
        finish(&f, &other, vec![out(Destination::Events)]);
        assert_eq!(
            f.txn.commit().await,
            Settled::Committed(vec![(0, 2), (1, 1)])
        );
        let committed: Vec<(i32, i64, Role)> = f
            .producer
            .committed
            .lock()
            .unwrap()
            .iter()
            .map(|t| (t.partition, t.offset, t.role))
            .collect();
        assert_eq!(
            committed,
            vec![
                (0, 0, Role::Event),
                (0, 1, Role::DeadLetter),
                (1, 0, Role::Event)
            ]
        );
    }

    /// Found by the simulation: a second refused dead letter in a stalled
    /// partition replaced the first's stall, which was then never retried:
    /// the partition stayed stuck after the cause was fixed.
    #[tokio::test(start_paused = true)]
    async fn two_refused_dead_letters_in_one_partition_are_retried_in_order() {
        let f = fixture(1000);
        let refuse = |f: &Fixture, offset| {
            f.producer.refusals.lock().unwrap().push(Refusal {
                tag: RecordTag {
                    partition: 0,
                    offset,
                    role: Role::DeadLetter,
                },
                reason: "TOPIC_AUTHORIZATION_FAILED".into(),
                too_large: false,
            });
        };
        let jobs: Vec<_> = (0..3).map(|o| job(&f, 0, o)).collect();
        finish(&f, &jobs[0], vec![out(Destination::DeadLetters)]);
        finish(&f, &jobs[1], vec![out(Destination::Events)]);
        finish(&f, &jobs[2], vec![out(Destination::DeadLetters)]);
        refuse(&f, 0);
        refuse(&f, 2);
        f.producer
            .commits
            .lock()
            .unwrap()
            .push(Err(TxnError::Abortable("records failed".into())));
        assert_eq!(f.txn.commit().await, Settled::Aborted(vec![0]));
        // Redone: both dead letters stall, the event between them waits.
        let jobs: Vec<_> = (0..3).map(|o| job(&f, 0, o)).collect();
        finish(&f, &jobs[0], vec![out(Destination::DeadLetters)]);
        finish(&f, &jobs[1], vec![out(Destination::Events)]);
        finish(&f, &jobs[2], vec![out(Destination::DeadLetters)]);
        assert!(f.ledger.is_stalled(0));
        // The broker takes them now: 0 alone, then 1 in a normal commit, then 2 alone.
        for _ in 0..4 {
            f.txn.commit().await;
        }
        assert!(!f.ledger.is_stalled(0), "both were retried");
        assert_eq!(f.ledger.restart_position(0), Some(3));
        let committed: Vec<(i64, Role)> = f
            .producer
            .committed
            .lock()
            .unwrap()
            .iter()
            .map(|t| (t.offset, t.role))
            .collect();
        assert_eq!(
            committed,
            vec![
                (0, Role::DeadLetter),
                (1, Role::Event),
                (2, Role::DeadLetter)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_that_times_out_is_retried_alone() {
        let f = fixture(1000);
        let a = job(&f, 0, 0);
        finish(&f, &a, vec![out(Destination::Events)]);
        f.producer
            .commits
            .lock()
            .unwrap()
            .push(Err(TxnError::Retriable("timed out".into())));
        assert_eq!(f.txn.commit().await, Settled::Committed(vec![(0, 1)]));
        assert_eq!(
            f.producer.log.lock().unwrap().clone(),
            vec!["begin", "offsets", "commit", "commit"],
            "the positions are sent once, the commit again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_commit_outcome_asks_the_broker_until_it_answers() {
        let f = fixture(1000);
        let a = job(&f, 0, 3);
        finish(&f, &a, vec![out(Destination::Events)]);
        // The commit landed (the broker says 4), but its answer never came.
        f.source.committed.lock().unwrap().push((0, 4));
        *f.source.fail_committed.lock().unwrap() = 3;
        f.producer
            .commits
            .lock()
            .unwrap()
            .extend((0..4).map(|_| Err(TxnError::Retriable("timed out".into()))));
        assert_eq!(f.txn.commit().await, Settled::Rebuilt(vec![0]));
        assert_eq!(*f.source.asked.lock().unwrap(), 4, "asked until answered");
        assert_eq!(f.source.seeks.lock().unwrap().clone(), vec![(0, 4)]);
        assert_eq!(f.ledger.restart_position(0), Some(4), "not redone");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rebuilt_producer_fenced_again_stops_the_engine_naming_the_id() {
        let f = fixture(1000);
        let a = job(&f, 0, 0);
        finish(&f, &a, vec![out(Destination::Events)]);
        f.producer
            .commits
            .lock()
            .unwrap()
            .push(Err(TxnError::Fenced("PRODUCER_FENCED".into())));
        assert_eq!(f.txn.commit().await, Settled::Rebuilt(vec![0]));
        assert!(f.txn.stopped().is_none(), "one fence is forgiven");
        let a = job(&f, 0, 0);
        finish(&f, &a, vec![out(Destination::Events)]);
        f.producer
            .commits
            .lock()
            .unwrap()
            .push(Err(TxnError::Fenced("PRODUCER_FENCED".into())));
        let Settled::Stopped(why) = f.txn.commit().await else {
            panic!("a second fence before any commit stops")
        };
        assert!(
            why.contains("`fake`") && why.contains("another instance"),
            "{why}"
        );
        assert_eq!(f.txn.stopped(), Some(why));
        assert_eq!(f.producer.calls("rebuild"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fence_after_a_commit_is_forgiven_again() {
        let f = fixture(1000);
        for round in 0..3 {
            let a = job(&f, 0, round);
            finish(&f, &a, vec![out(Destination::Events)]);
            f.producer
                .commits
                .lock()
                .unwrap()
                .push(Err(TxnError::Fenced("PRODUCER_FENCED".into())));
            f.source.committed.lock().unwrap().clear();
            f.source.committed.lock().unwrap().push((0, round));
            assert_eq!(f.txn.commit().await, Settled::Rebuilt(vec![0]));
            let a = job(&f, 0, round);
            finish(&f, &a, vec![out(Destination::Events)]);
            assert_eq!(
                f.txn.commit().await,
                Settled::Committed(vec![(0, round + 1)])
            );
        }
        assert!(f.txn.stopped().is_none());
    }
}
