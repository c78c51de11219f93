//! Exactly-once bookkeeping, free of Kafka types: what goes into which
//! transaction, which input positions a transaction may commit, and what an
//! abort rewinds. The Kafka side is two small traits: a [`TxnProducer`] (begin,
//! send, commit with the input positions, abort, rebuild) and a [`RecordSource`]
//! (seek, the broker's committed positions); tests drive this module with fakes
//! of both.
//!
//! The rule: a transaction holds the records of finished work *and* the input
//! positions they answer, and nothing past a partition's contiguous watermark.
//! Work finishes out of order (different payments run concurrently), so a
//! finished job's records wait in its partition's buffer until every earlier
//! offset has finished; then they are handed to the producer in offset order and
//! the partition's position moves past them. After a crash the group restarts
//! exactly where the last committed transaction left it: work finished beyond
//! the watermark was never in a committed transaction, so it is neither lost nor
//! repeated. (The alternative, recording finished offsets in the commit's
//! metadata and skipping them after a restart, avoids the wait behind a slow
//! offset; the README gives the measurements behind the choice.)
//!
//! A finished job leaves its `max_in_flight` slot as soon as its records are in
//! the buffer; buffered and uncommitted records together are bounded by
//! `processing.max_pending_records` (the engine stops reading and commits early
//! at the bound).
//!
//! Failures:
//! - an *abortable* error aborts the transaction and rewinds every partition it
//!   held work for to its last committed position (a new ledger epoch, so jobs
//!   still running for it cannot finish into the next transaction; the engine
//!   drops their queued jobs and refetches);
//! - a record the broker refused permanently is remembered by the input record it
//!   answers: when that work is redone, a refused event becomes a
//!   `publish_refused` dead letter, and a refused dead letter or re-check record
//!   stalls its partition (loudly, as in at-least-once) and is retried alone in
//!   a transaction of its own, with a doubling backoff, so the other partitions'
//!   transactions never abort for it again;
//! - a *fatal* error (fenced, a commit that timed out) rebuilds the producer
//!   (which aborts or completes whatever the old one left open) and rewinds every
//!   partition to the position the broker has committed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::ledger::{Epoch, Ledger};
use super::process::{Destination, Milestone, Outgoing, PipelineJob};
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
    /// The producer refuses it outright (too large for `message.max.bytes`, ...).
    Refused(String),
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
    /// The producer is unusable (fenced, or a commit whose outcome is unknown):
    /// rebuild it.
    Fatal(String),
}

impl std::fmt::Display for TxnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxnError::Retriable(e) => write!(f, "retriable: {e}"),
            TxnError::Abortable(e) => write!(f, "abortable: {e}"),
            TxnError::Fatal(e) => write!(f, "fatal: {e}"),
        }
    }
}

/// A transactional producer (the Kafka side implements it on rdkafka).
pub trait TxnProducer: Send + Sync {
    /// Opens a transaction.
    fn begin(&self) -> Result<(), TxnError>;
    /// Queues a record into the open transaction.
    fn send(&self, out: &Outgoing, tag: RecordTag) -> Result<(), SendError>;
    /// Adds the input positions (partition, next offset to read) to the open
    /// transaction, fenced by the consumer group's metadata, and commits it.
    /// Blocking.
    fn commit(&self, positions: &[(i32, i64)]) -> Result<(), TxnError>;
    /// Aborts the open transaction. Blocking.
    fn abort(&self) -> Result<(), TxnError>;
    /// Replaces an unusable producer by a new one with the same transactional id
    /// (which fences the old one and settles whatever it left open). Blocking.
    fn rebuild(&self) -> Result<(), TxnError>;
    /// Records the broker refused permanently since the last call.
    fn take_refusals(&self) -> Vec<Refusal>;
}

/// The consumer, as transactions need it.
pub trait RecordSource: Send + Sync {
    /// Fetch `partition` again from `offset`.
    fn seek(&self, partition: i32, offset: i64);
    /// The positions the broker has committed for these partitions (after a
    /// producer rebuild, the only ones known for sure).
    fn committed(&self, partitions: &[i32]) -> Result<Vec<(i32, i64)>, String>;
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
    received: Instant,
    /// The request's outcome (none for work that publishes nothing).
    outcome: Option<Outcome>,
}

#[derive(Default)]
struct Part {
    epoch: Option<Epoch>,
    buffer: BTreeMap<i64, Finished>,
    stall: Option<Stall>,
}

/// What the open transaction holds, for the commit and its metrics.
#[derive(Default)]
struct Open {
    began: Option<Instant>,
    records: usize,
    /// Partitions with records or progress in it.
    partitions: HashSet<i32>,
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

/// A refused record of one input: its role, the broker's reason, and whether
/// it was refused for its size.
type Refused = (Role, String, bool);

struct Inner {
    phase: Phase,
    parts: HashMap<i32, Part>,
    open: Open,
    /// Refused records by the input record they answer: (partition, offset) ->
    /// roles refused, with the broker's reason and whether it was the size.
    refusals: HashMap<(i32, i64), Vec<Refused>>,
    /// Partitions rewound since the engine last looked.
    rewound: Vec<i32>,
    /// Records buffered (not yet handed over).
    buffered: usize,
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
}

/// The transactions of one engine (one consumer group, one transactional
/// producer). Shared by the engine, the jobs' tasks and the revocation callback;
/// the lock is never held across producer I/O other than queueing a record.
pub struct Transactions {
    producer: Arc<dyn TxnProducer>,
    source: Arc<dyn RecordSource>,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    topic: String,
    max_pending: usize,
    interval: Duration,
    inner: Mutex<Inner>,
    /// Signalled when a commit ends.
    settled: Condvar,
    /// First and longest wait before a stalled record is tried again.
    stall_backoff: (Duration, Duration),
}

/// The first wait before a stalled record is tried again; it doubles up to
/// [`STALL_MAX_BACKOFF`].
const STALL_FIRST_BACKOFF: Duration = Duration::from_secs(2);
const STALL_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Retries of a commit that failed with a retriable error before the producer
/// is rebuilt.
const COMMIT_RETRIES: u32 = 3;
/// Refusals remembered at most (each is one input record awaiting its redo).
const MAX_REFUSALS: usize = 100_000;

impl Transactions {
    /// Bookkeeping for the engine of `topic`.
    pub fn new(
        producer: Arc<dyn TxnProducer>,
        source: Arc<dyn RecordSource>,
        ledger: Arc<Ledger>,
        metrics: Arc<Metrics>,
        topic: &str,
        interval: Duration,
        max_pending: usize,
    ) -> Self {
        Transactions {
            producer,
            source,
            ledger,
            metrics,
            topic: topic.to_owned(),
            max_pending: max_pending.max(1),
            interval,
            inner: Mutex::new(Inner {
                phase: Phase::Idle,
                parts: HashMap::new(),
                open: Open::default(),
                refusals: HashMap::new(),
                rewound: Vec::new(),
                buffered: 0,
            }),
            settled: Condvar::new(),
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
        let mut stall = None;
        if let Some(refused) = inner.refusals.get(&(p, offset)) {
            let event = refused.iter().find(|(r, ..)| *r == Role::Event);
            if let Some((_, reason, _)) = event {
                // The broker will never take this event: keep the request (and
                // end its chain here), as at-least-once does.
                records = vec![dead_letter(
                    RejectCode::PublishRefused,
                    &format!("the event could not be published: {reason}"),
                )];
            }
            let recheck_too_large = refused
                .iter()
                .find(|(r, _, too_large)| *r == Role::Recheck && *too_large);
            if let Some((_, reason, _)) = recheck_too_large {
                // A re-check record too large for its topic ends the chain: the
                // request is kept as a dead letter instead of the re-check.
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
            if let Some((role, reason, _)) = blocked {
                stall = Some(format!(
                    "the broker refuses the {} record of offset {offset}: {reason}",
                    match role {
                        Role::DeadLetter => "dead-letter",
                        _ => "re-check",
                    }
                ));
            }
        }
        let n = records.len();
        let outcome = records.first().map(|r| r.outcome);
        let part = inner.parts.entry(p).or_default();
        part.epoch = Some(job.epoch);
        part.buffer.insert(
            offset,
            Finished {
                records,
                received: job.incoming.received,
                outcome,
            },
        );
        inner.buffered += n;
        match stall {
            Some(reason) => {
                let part = inner.parts.entry(p).or_default();
                let backoff = part
                    .stall
                    .as_ref()
                    .filter(|s| s.offset == offset)
                    .map_or(self.stall_backoff.0, |s| s.backoff);
                tracing::error!(
                    topic = %self.topic,
                    partition = p,
                    offset,
                    reason = %reason,
                    retry_in_s = backoff.as_secs(),
                    "partition stalled: a record cannot be published; its offset stays uncommitted until the broker accepts it"
                );
                part.stall = Some(Stall {
                    offset,
                    reason: reason.clone(),
                    retry_at: Instant::now() + backoff,
                    backoff,
                });
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
    /// Stops at a full producer queue (the next call goes on).
    fn pump(&self, inner: &mut Inner) {
        if inner.phase == Phase::Committing {
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
                            let out = finished.records.remove(0);
                            inner.open.records += 1;
                            inner.buffered = inner.buffered.saturating_sub(1);
                            inner
                                .open
                                .published
                                .push((tag.role, out.label, out.milestone));
                        }
                        Err(SendError::QueueFull) => return,
                        Err(SendError::Refused(reason) | SendError::Fatal(reason)) => {
                            // Refused before it reached the transaction: as if the
                            // broker had refused it (the transaction is still
                            // good), remembered for the redo.
                            inner
                                .refusals
                                .entry((p, offset))
                                .or_default()
                                .push((tag.role, reason, false));
                            self.rewind(inner, &[p], None);
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

    /// Hands over what became ready (the engine calls this after a queue-full
    /// stop, and on its tick).
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

    /// True when the open transaction should be committed now: it is
    /// `transaction_interval` old or holds half the pending-record bound, or a
    /// stalled record is due for a retry.
    pub fn due(&self) -> bool {
        let inner = self.lock();
        if inner.phase == Phase::Committing {
            return false;
        }
        let now = Instant::now();
        let stall_due = inner
            .parts
            .values()
            .any(|p| p.stall.as_ref().is_some_and(|s| s.retry_at <= now));
        let something = inner.phase == Phase::Open || inner.parts.keys().any(|p| self.moved(*p));
        let old = inner
            .open
            .began
            .is_none_or(|b| now.duration_since(b) >= self.interval);
        stall_due || something && (old || inner.open.records >= self.max_pending / 2)
    }

    /// True while a commit is under way.
    pub fn committing(&self) -> bool {
        self.lock().phase == Phase::Committing
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

    /// Commits the open transaction with the positions its work reached (waiting
    /// for a commit already under way first), then retries a stalled record
    /// whose time has come. Blocking: call from a blocking thread or the
    /// revocation callback.
    pub fn commit(&self) -> Settled {
        let mut inner = self.lock();
        while inner.phase == Phase::Committing {
            inner = self.settled.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        self.pump(&mut inner);
        // The positions: every partition whose watermark moved past its last
        // commit, up to the first record still buffered.
        let mut positions: Vec<(i32, i64)> = Vec::new();
        let owned: Vec<i32> = inner
            .parts
            .keys()
            .copied()
            .chain(inner.open.partitions.iter().copied())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for p in owned {
            let (Some(w), Some(c)) = (self.ledger.watermark(p), self.ledger.restart_position(p))
            else {
                continue;
            };
            let first_buffered = inner
                .parts
                .get(&p)
                .and_then(|part| part.buffer.keys().next().copied());
            let position = first_buffered.map_or(w, |b| b.min(w));
            if position > c {
                positions.push((p, position));
            }
        }
        positions.sort_unstable();
        let settled = if positions.is_empty() && inner.phase != Phase::Open {
            Settled::Nothing
        } else {
            if inner.phase == Phase::Idle {
                // Progress without records (skipped or empty work): a transaction
                // of positions only.
                if let Err(e) = self.producer.begin() {
                    tracing::error!(topic = %self.topic, error = %e, "cannot begin a transaction");
                    return Settled::Nothing;
                }
            }
            inner.phase = Phase::Committing;
            let open = std::mem::take(&mut inner.open);
            drop(inner);
            let started = Instant::now();
            let result = self.commit_with_retries(&positions);
            self.metrics
                .transaction_commit(&self.topic, started.elapsed());
            let mut inner = self.lock();
            let settled = match result {
                Ok(()) => {
                    for (p, o) in &positions {
                        self.ledger.committed(*p, *o);
                    }
                    self.account(&open);
                    self.metrics.transaction(&self.topic, "committed");
                    Settled::Committed(positions)
                }
                Err(TxnError::Abortable(e)) => {
                    tracing::warn!(topic = %self.topic, error = %e, "transaction aborted; its partitions are rewound to their last commit");
                    if let Err(e) = self.producer.abort() {
                        tracing::warn!(topic = %self.topic, error = %e, "aborting failed; rebuilding the producer");
                        return self.rebuild(inner);
                    }
                    self.note_refusals(&mut inner);
                    let mut rewound: Vec<i32> = open.partitions.iter().copied().collect();
                    rewound.extend(positions.iter().map(|(p, _)| *p));
                    rewound.sort_unstable();
                    rewound.dedup();
                    self.rewind(&mut inner, &rewound, None);
                    self.metrics.transaction(&self.topic, "aborted");
                    Settled::Aborted(rewound)
                }
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "the transactional producer must be rebuilt");
                    return self.rebuild(inner);
                }
            };
            inner.phase = Phase::Idle;
            self.retry_stall(&mut inner);
            self.pump(&mut inner);
            drop(inner);
            self.settled.notify_all();
            return settled;
        };
        drop(inner);
        let mut inner = self.lock();
        self.retry_stall(&mut inner);
        self.pump(&mut inner);
        settled
    }

    fn commit_with_retries(&self, positions: &[(i32, i64)]) -> Result<(), TxnError> {
        let mut tries = 0;
        loop {
            match self.producer.commit(positions) {
                Err(TxnError::Retriable(e)) if tries < COMMIT_RETRIES => {
                    tries += 1;
                    tracing::warn!(topic = %self.topic, error = %e, tries, "commit failed; retrying");
                }
                // A commit whose outcome stays unknown: only a new producer
                // (which settles the old one's transaction) tells.
                Err(TxnError::Retriable(e)) => return Err(TxnError::Fatal(e)),
                other => return other,
            }
        }
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
            if inner.refusals.len() >= MAX_REFUSALS {
                break;
            }
            let tag = r.tag;
            tracing::warn!(topic = %self.topic, partition = tag.partition, offset = tag.offset, role = ?tag.role, reason = %r.reason, "the broker refused a record permanently; the work is redone without it");
            self.metrics.publish_refused(match tag.role {
                Role::Event => "events",
                Role::DeadLetter => "dead_letters",
                Role::Recheck => "rechecks",
            });
            inner
                .refusals
                .entry((tag.partition, tag.offset))
                .or_default()
                .push((tag.role, r.reason, r.too_large));
        }
    }

    /// After a fatal error: a new producer, and every partition back to what the
    /// broker has committed.
    fn rebuild(&self, mut inner: MutexGuard<'_, Inner>) -> Settled {
        inner.phase = Phase::Committing;
        drop(inner);
        let mut delay = Duration::from_millis(200);
        while let Err(e) = self.producer.rebuild() {
            tracing::error!(topic = %self.topic, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot rebuild the transactional producer");
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        let mut inner = self.lock();
        inner.open = Open::default();
        let owned: Vec<i32> = inner.parts.keys().copied().collect();
        let committed = match self.source.committed(&owned) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "cannot read the committed positions; rewinding to the last known ones");
                None
            }
        };
        self.rewind(&mut inner, &owned, committed.as_deref());
        self.metrics.transaction(&self.topic, "rebuilt");
        inner.phase = Phase::Idle;
        drop(inner);
        self.settled.notify_all();
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
            }
            let known = self.ledger.rewind(p);
            let target = to
                .and_then(|t| t.iter().find(|(q, _)| *q == p).map(|(_, o)| *o))
                .or(known);
            if let Some(offset) = target {
                self.source.seek(p, offset);
            }
            inner.rewound.push(p);
        }
        inner.open.partitions.retain(|p| !partitions.contains(p));
    }

    /// A stalled record whose time has come is tried alone: a transaction with
    /// just its records and its partition's position. Success resumes the
    /// partition; failure doubles the wait.
    fn retry_stall(&self, inner: &mut MutexGuard<'_, Inner>) {
        let now = Instant::now();
        let due: Vec<(i32, i64)> = inner
            .parts
            .iter()
            .filter_map(|(p, part)| {
                let s = part.stall.as_ref()?;
                (s.retry_at <= now).then_some((*p, s.offset))
            })
            .collect();
        for (p, offset) in due {
            let Some(epoch) = inner.parts.get(&p).and_then(|part| part.epoch) else {
                continue;
            };
            let records: Vec<Outgoing> = inner
                .parts
                .get(&p)
                .and_then(|part| part.buffer.get(&offset))
                .map(|f| f.records.clone())
                .unwrap_or_default();
            let probe = (|| {
                self.producer.begin()?;
                for out in &records {
                    let tag = RecordTag {
                        partition: p,
                        offset,
                        role: Role::of(&out.destination),
                    };
                    if let Err(e) = self.producer.send(out, tag) {
                        return Err(TxnError::Abortable(format!("{e:?}")));
                    }
                }
                self.producer.commit(&[(p, offset + 1)])
            })();
            match probe {
                Ok(()) => {
                    tracing::warn!(topic = %self.topic, partition = p, offset, "the refused record was accepted; partition resumed");
                    let part = inner.parts.entry(p).or_default();
                    part.stall = None;
                    let n = part.buffer.remove(&offset).map_or(0, |f| f.records.len());
                    inner.buffered = inner.buffered.saturating_sub(n);
                    inner.refusals.remove(&(p, offset));
                    self.ledger.complete(p, epoch, offset);
                    self.ledger.committed(p, offset + 1);
                    self.ledger.set_stalled(p, epoch, None);
                }
                Err(e) => {
                    let _ = self.producer.abort();
                    let _ = self.producer.take_refusals();
                    let part = inner.parts.entry(p).or_default();
                    if let Some(s) = part.stall.as_mut() {
                        s.backoff = (s.backoff * 2).min(self.stall_backoff.1);
                        s.retry_at = Instant::now() + s.backoff;
                        tracing::error!(topic = %self.topic, partition = p, offset, reason = %s.reason, error = %e, retry_in_s = s.backoff.as_secs(), "partition still stalled: the record is refused");
                    }
                }
            }
        }
    }

    /// Forgets revoked partitions (after their work was committed).
    pub fn forget(&self, partitions: &[i32]) {
        let mut inner = self.lock();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Rejection;
    use crate::pipeline::process::{Incoming, Work};
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
            "in",
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

    #[test]
    fn finished_work_is_handed_over_in_offset_order_and_committed_at_the_watermark() {
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
        assert_eq!(f.txn.commit(), Settled::Committed(vec![(0, 13)]));
        assert_eq!(f.ledger.restart_position(0), Some(13));
        assert_eq!(f.txn.pending_records(), 0);
        assert_eq!(f.txn.commit(), Settled::Nothing, "nothing new");
        finish(&f, &jobs[3], Vec::new());
        assert_eq!(
            f.txn.commit(),
            Settled::Committed(vec![(0, 14)]),
            "work without records moves the position too"
        );
    }

    #[test]
    fn work_finished_beyond_the_watermark_is_never_in_a_committed_transaction() {
        let f = fixture(1000);
        let a = job(&f, 0, 0);
        let b = job(&f, 0, 1);
        finish(&f, &b, vec![out(Destination::Events)]);
        assert_eq!(
            f.txn.commit(),
            Settled::Nothing,
            "nothing below the watermark"
        );
        assert!(f.producer.committed.lock().unwrap().is_empty());
        assert_eq!(f.txn.pending_records(), 1, "buffered");
        finish(&f, &a, vec![out(Destination::Events)]);
        assert_eq!(f.txn.commit(), Settled::Committed(vec![(0, 2)]));
        assert_eq!(f.producer.committed.lock().unwrap().len(), 2);
    }

    #[test]
    fn an_abort_rewinds_the_partitions_it_held_and_their_running_work_goes_stale() {
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
        assert_eq!(f.txn.commit(), Settled::Aborted(vec![0, 1]));
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
        assert_eq!(f.txn.commit(), Settled::Committed(vec![(0, 6)]));
        assert_eq!(f.producer.committed.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_refused_event_becomes_a_dead_letter_after_one_abort_not_a_loop() {
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
        assert_eq!(f.txn.commit(), Settled::Aborted(vec![0]));
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
        assert_eq!(f.txn.commit(), Settled::Committed(vec![(0, 1)]));
        let log = f.producer.log.lock().unwrap().clone();
        assert_eq!(log.iter().filter(|l| *l == "abort").count(), 1);
    }

    #[test]
    fn a_recheck_record_refused_for_its_size_ends_the_chain_with_a_dead_letter() {
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
        assert_eq!(f.txn.commit(), Settled::Aborted(vec![0]));
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
        assert_eq!(f.txn.commit(), Settled::Committed(vec![(0, 1)]));
    }

    #[test]
    fn a_refused_dead_letter_stalls_its_partition_only_and_is_retried_alone() {
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
        assert_eq!(f.txn.commit(), Settled::Aborted(vec![0]));
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
        assert_eq!(f.txn.commit(), Settled::Committed(vec![(1, 1)]));
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
            f.txn.commit(),
            Settled::Nothing,
            "the retry runs in its own transaction"
        );
        assert!(!f.ledger.is_stalled(0), "accepted at the next retry");
        assert_eq!(f.ledger.restart_position(0), Some(1));
        assert_eq!(
            f.txn.commit(),
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

    #[test]
    fn a_fatal_error_rebuilds_the_producer_and_rewinds_to_what_the_broker_committed() {
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
        assert_eq!(f.txn.commit(), Settled::Rebuilt(vec![0]));
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

    #[test]
    fn pending_records_are_bounded_and_a_commit_is_due_early() {
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
        f.txn.commit();
        assert!(!f.txn.full());
    }
}
