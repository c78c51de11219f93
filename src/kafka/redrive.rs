//! `paysync redrive`: sends dead letters back to the input topic after their
//! cause was fixed (an account added, a connector back). Which letters go, and
//! the headers they carry, are [`crate::pipeline::letters`]' (pure); this module
//! reads the dead-letter topic, sends, and keeps the position.
//!
//! One position for every run, whatever its filter: the consumer group
//! `<group_id>.redrive`, whose commit metadata holds where each reason's
//! redrive stands per partition ([`Coverage`]). A letter is therefore sent once
//! by redrive (`--force` sends again on purpose), and a letter a filtered run
//! left alone is still sent by a later run that selects it.
//!
//! It works in batches of at most [`BATCH`] letters, and commits its position
//! after each:
//! - `at_least_once`: a batch is sent, every letter in it acknowledged, then the
//!   position committed. SIGINT/SIGTERM end the run after the batch under way,
//!   so an interrupted run repeats nothing; a kill -9 repeats at most the batch
//!   under way (up to [`BATCH`] letters) when run again.
//! - `exactly_once`: the batch and the position commit in one Kafka transaction
//!   under a transactional id of its own, `<transactional_id_prefix>-redrive`
//!   (never one of `paysync run`'s, so it fences only an earlier redrive): even
//!   a kill -9 repeats nothing, since the open transaction is aborted.
//!
//! A run reads up to the end each partition had when it started, so it always
//! finishes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::headers;
use super::{consumer_config, producer_config};
use crate::config::{Guarantee, Settings};
use crate::pipeline::letters::{self, Coverage, Policy, Reason, Selection, Verdict};
use crate::pipeline::txn::TxnError;

pub use crate::pipeline::letters::headers::REDRIVEN_FROM;

/// Letters sent between two commits of the position, at most: what a kill -9
/// can repeat in `at_least_once`.
pub const BATCH: usize = 500;

/// Letters listed by offset in a report (truncated, redriven too often), at most.
const LISTED: usize = 100;

/// What to send back.
#[derive(Debug, Clone)]
pub struct RedriveOptions {
    /// `--reason`: only letters with one of these reasons (none: the recoverable
    /// reasons).
    pub reasons: Vec<String>,
    /// Send at most this many.
    pub max: Option<u64>,
    /// Count and list only.
    pub dry_run: bool,
    /// Send letters that an earlier run handled.
    pub force: bool,
    /// Skip letters redriven this many times already.
    pub max_redrives: u32,
}

impl Default for RedriveOptions {
    fn default() -> Self {
        RedriveOptions {
            reasons: Vec::new(),
            max: None,
            dry_run: false,
            force: false,
            max_redrives: 3,
        }
    }
}

/// Letters seen, by what became of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sent back (or, in a dry run, would be).
    pub sent: u64,
    /// Left alone: an earlier run handled them (sent, or left for good).
    pub handled: u64,
    /// Left alone: not a reason this run sends.
    pub not_selected: u64,
    /// Not sent back: the value was truncated.
    pub truncated: u64,
    /// Not sent back: redriven `--max-redrives` times already.
    pub too_many: u64,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RedriveReport {
    /// The consumer group holding the position.
    pub group: String,
    /// A dry run.
    pub dry_run: bool,
    /// In one transaction per batch.
    pub exactly_once: bool,
    /// Per reason.
    pub by_reason: BTreeMap<Reason, Counts>,
    /// `<topic>:<partition>:<offset> (reason)` of letters not sent for good
    /// (truncated, redriven too often), the first [`LISTED`].
    pub listed: Vec<String>,
    /// Stopped at `--max`.
    pub hit_max: bool,
    /// Stopped by SIGINT or SIGTERM (after committing what was sent).
    pub interrupted: bool,
    /// Why the run stopped early (a letter the broker did not take).
    pub failed: Option<String>,
}

impl RedriveReport {
    /// Letters sent back (or that would be, in a dry run).
    pub fn sent(&self) -> u64 {
        self.by_reason.values().map(|c| c.sent).sum()
    }

    fn count(&mut self, reason: Reason, verdict: Verdict, at: &str) {
        let c = self.by_reason.entry(reason).or_default();
        match verdict {
            Verdict::Send { .. } => c.sent += 1,
            Verdict::Handled => c.handled += 1,
            Verdict::NotSelected => c.not_selected += 1,
            Verdict::Truncated => c.truncated += 1,
            Verdict::TooManyRedrives { .. } => c.too_many += 1,
        }
        let why = match verdict {
            Verdict::Truncated => "value truncated",
            Verdict::TooManyRedrives { .. } => "redriven too often",
            _ => return,
        };
        if self.listed.len() < LISTED {
            self.listed.push(format!("{at} ({reason}, {why})"));
        }
    }
}

impl fmt::Display for RedriveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would redrive"
        } else {
            "redriven"
        };
        writeln!(
            f,
            "group {}{}{}",
            self.group,
            if self.exactly_once {
                " (exactly once: each batch and its position in one transaction)"
            } else {
                ""
            },
            if self.dry_run {
                " (dry run: nothing sent, nothing committed)"
            } else {
                ""
            }
        )?;
        for (title, recoverable) in [
            ("letters that can succeed once the cause is fixed (sent without --reason):", true),
            ("letters whose bytes cannot be processed as they are (sent only when --reason names them):", false),
        ] {
            let rows: Vec<_> = self
                .by_reason
                .iter()
                .filter(|(r, _)| r.recoverable() == recoverable)
                .collect();
            if rows.is_empty() {
                continue;
            }
            writeln!(f, "{title}")?;
            for (reason, c) in rows {
                write!(f, "  {reason}: {verb} {}", c.sent)?;
                for (n, what) in [
                    (c.handled, "handled by an earlier run"),
                    (c.not_selected, "not selected"),
                    (c.truncated, "truncated, not redriven"),
                    (c.too_many, "redriven too often, not redriven"),
                ] {
                    if n > 0 {
                        write!(f, ", {what} {n}")?;
                    }
                }
                writeln!(f)?;
            }
        }
        writeln!(f, "total {verb}: {}", self.sent())?;
        for l in &self.listed {
            writeln!(f, "not redriven: {l}")?;
        }
        if self.hit_max {
            writeln!(f, "stopped at --max; run again for the rest")?;
        }
        if self.interrupted {
            writeln!(
                f,
                "interrupted: what was sent is committed; run again for the rest"
            )?;
        }
        if let Some(why) = &self.failed {
            writeln!(f, "stopped: {why}")?;
        }
        Ok(())
    }
}

/// Why a run could not start or read.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// A Kafka client error.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The dead-letter topic does not exist.
    #[error("topic `{0}` does not exist")]
    NoTopic(String),
    /// An argument is invalid.
    #[error("{0}")]
    Usage(String),
    /// The group's position was not written by paysync redrive.
    #[error("the position of group `{group}` on partition {partition} cannot be read ({why}); was the group used by another tool? `--force` starts over from the log start")]
    Position {
        /// The redrive group.
        group: String,
        /// The partition.
        partition: i32,
        /// Why.
        why: String,
    },
    /// Exactly once: the transactional producer could not start.
    #[error("cannot start the transactional producer `{id}` (exactly_once needs a broker with transactions): {source}")]
    Transactions {
        /// The transactional id.
        id: String,
        /// Why.
        #[source]
        source: KafkaError,
    },
}

impl RedriveError {
    /// Process exit code: 2 for a bad argument, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RedriveError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// The redrive consumer's context: reaching the end of a partition is how a
/// run knows it is done, not an error (librdkafka reports it as one).
struct RedriveContext;

impl rdkafka::ClientContext for RedriveContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_))
            && !reason.contains("Partition EOF")
            && !matches!(&error, KafkaError::Global(code) if *code == rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for RedriveContext {}

/// The redrive group.
pub fn group_for(group_id: &str) -> String {
    format!("{group_id}.redrive")
}

/// The transactional id of `paysync redrive` (exactly once).
pub fn transactional_id(settings: &Settings) -> String {
    format!("{}-redrive", settings.kafka.transactional_id_prefix)
}

/// Runs a redrive (blocking Kafka calls on a blocking thread) until it is done,
/// fails, or `stop` is set (SIGINT/SIGTERM: the batch under way is finished and
/// committed first).
pub async fn run(
    settings: &Settings,
    options: &RedriveOptions,
    stop: Arc<AtomicBool>,
) -> Result<RedriveReport, RedriveError> {
    let settings = settings.clone();
    let options = options.clone();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || run_blocking(&settings, &options, &handle, &stop))
        .await
        .unwrap_or_else(|e| {
            Ok(RedriveReport {
                failed: Some(format!("the redrive task failed: {e}")),
                ..Default::default()
            })
        })
}

/// Where one partition stands during a run.
struct Part {
    coverage: Coverage,
    /// The next offset to read.
    next: i64,
    /// The end at the start of the run.
    end: i64,
    /// Read to its end.
    done: bool,
}

/// A letter on its way back.
struct Letter {
    /// `<topic>:<partition>:<offset>` of the letter.
    from: String,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<letters::Header>,
}

/// How a batch reaches the broker.
enum Sink {
    AtLeastOnce(FutureProducer),
    ExactlyOnce(FutureProducer),
}

fn run_blocking(
    settings: &Settings,
    options: &RedriveOptions,
    handle: &tokio::runtime::Handle,
    stop: &AtomicBool,
) -> Result<RedriveReport, RedriveError> {
    let k = &settings.kafka;
    let dlq = k.dead_letter_topic.as_str();
    let policy = Policy {
        selection: Selection::from_args(&options.reasons).map_err(RedriveError::Usage)?,
        force: options.force,
        max_redrives: options.max_redrives,
    };
    let group = group_for(&k.group_id);
    let mut config = consumer_config(k);
    config.set("group.id", &group);
    config.set("enable.partition.eof", "true");
    let consumer: BaseConsumer<RedriveContext> = config.create_with_context(RedriveContext)?;
    // Generous: a loaded broker can take its time for the first metadata.
    let timeout = Duration::from_secs(30);
    let metadata = consumer.fetch_metadata(Some(dlq), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(RedriveError::NoTopic(dlq.to_owned()));
    }
    let exactly_once = settings.processing.guarantee == Guarantee::ExactlyOnce;
    let mut report = RedriveReport {
        group: group.clone(),
        dry_run: options.dry_run,
        exactly_once,
        ..Default::default()
    };
    // Exactly once, the producer comes first: initializing its transactions
    // fences an earlier redrive and aborts the transaction it left open, whose
    // offset commit would otherwise keep the position unstable (a
    // read_committed position query waits until the transaction times out).
    let sink = if options.dry_run {
        None
    } else if exactly_once {
        let id = transactional_id(settings);
        let mut config = producer_config(k);
        config.set("transactional.id", &id);
        let producer: FutureProducer = config.create()?;
        producer
            .init_transactions(Duration::from_secs(30))
            .map_err(|source| RedriveError::Transactions {
                id: id.clone(),
                source,
            })?;
        Some(Sink::ExactlyOnce(producer))
    } else {
        Some(Sink::AtLeastOnce(producer_config(k).create()?))
    };
    // Where to start (each reason's position) and where to stop (the end now).
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition(dlq, *p);
    }
    let committed = consumer.committed_offsets(wanted, timeout)?;
    let mut parts: BTreeMap<i32, Part> = BTreeMap::new();
    let mut start = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(dlq, p, timeout)?;
        let elem = committed.find_partition(dlq, p);
        let coverage = match elem.as_ref().map(|e| Coverage::decode(e.metadata())) {
            Some(Ok(Some(c))) => c,
            // A position without metadata: written by a paysync before this one,
            // whose unfiltered runs sent every reason.
            Some(Ok(None)) => match elem.as_ref().map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Coverage::all_up_to(o),
                _ => Coverage::default(),
            },
            Some(Err(why)) if !options.force => {
                return Err(RedriveError::Position {
                    group,
                    partition: p,
                    why,
                })
            }
            _ => Coverage::default(),
        };
        let from = if options.force {
            low
        } else {
            coverage.start(&policy.selection).max(low)
        };
        let done = from >= high;
        if !done {
            start.add_partition_offset(dlq, p, Offset::Offset(from))?;
        }
        parts.insert(
            p,
            Part {
                coverage,
                next: from,
                end: high,
                done,
            },
        );
    }
    if start.count() > 0 {
        consumer.assign(&start)?;
    }
    let mut idle = 0;
    'run: while !parts.values().all(|p| p.done) {
        if stop.load(Ordering::Acquire) {
            report.interrupted = true;
            break;
        }
        // One batch: read and decide, send, then commit the position.
        let mut batch: Vec<Letter> = Vec::new();
        let mut moved: Vec<i32> = Vec::new();
        while batch.len() < BATCH && !parts.values().all(|p| p.done) {
            if stop.load(Ordering::Acquire) {
                break;
            }
            if options.max.is_some_and(|max| report.sent() >= max) {
                report.hit_max = true;
                break;
            }
            let Some(result) = consumer.poll(Duration::from_millis(200)) else {
                idle += 1;
                if idle > 150 {
                    report.failed =
                        Some("no progress reading the dead-letter topic for 30 s".into());
                    break 'run;
                }
                if !batch.is_empty() {
                    break;
                }
                continue;
            };
            idle = 0;
            let m = match result {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(p)) => {
                    if let Some(part) = parts.get_mut(&p) {
                        // Read to the end (past transaction markers too).
                        part.done = true;
                        part.next = part.next.max(part.end);
                        moved.push(p);
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading dead letters");
                    continue;
                }
            };
            let (p, o) = (m.partition(), m.offset());
            let Some(part) = parts.get_mut(&p) else {
                continue;
            };
            if part.done || o < part.next {
                continue;
            }
            if o >= part.end {
                part.done = true;
                part.next = part.next.max(part.end);
                moved.push(p);
                continue;
            }
            let hs = m.headers().map(headers::read).unwrap_or_default();
            let from = format!("{dlq}:{p}:{o}");
            let (reason, verdict) = policy.decide(&hs, o, &part.coverage);
            report.count(reason, verdict, &from);
            if let Verdict::Send { count } = verdict {
                batch.push(Letter {
                    headers: letters::redriven_headers(&hs, &from, count),
                    from,
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                });
            }
            part.next = o + 1;
            if part.next >= part.end {
                part.done = true;
            }
            moved.push(p);
        }
        if let Some(sink) = &sink {
            let batch = Batch {
                dlq,
                input: &k.input_topic,
                letters: &batch,
                moved: &moved,
            };
            if let Err(why) = batch.send(sink, &mut parts, &policy, &consumer, handle) {
                // Nothing of this batch is committed: in `at_least_once` the
                // letters sent in it go again in the next run; in `exactly_once`
                // they were aborted.
                report.failed = Some(why);
                break;
            }
        }
        if report.hit_max {
            break;
        }
    }
    Ok(report)
}

/// One batch: the letters to send and the partitions whose position moved.
struct Batch<'a> {
    dlq: &'a str,
    input: &'a str,
    letters: &'a [Letter],
    moved: &'a [i32],
}

impl Batch<'_> {
    /// Sends the letters and commits the position of every partition the batch
    /// moved: after every letter was acknowledged (`at_least_once`), or in the
    /// letters' transaction (`exactly_once`).
    fn send(
        &self,
        sink: &Sink,
        parts: &mut BTreeMap<i32, Part>,
        policy: &Policy,
        consumer: &BaseConsumer<RedriveContext>,
        handle: &tokio::runtime::Handle,
    ) -> Result<(), String> {
        if self.moved.is_empty() {
            return Ok(());
        }
        let (producer, transactional) = match sink {
            Sink::AtLeastOnce(p) => (p, false),
            Sink::ExactlyOnce(p) => (p, true),
        };
        if transactional {
            producer
                .begin_transaction()
                .map_err(|e| format!("cannot begin a transaction: {e}"))?;
        }
        let mut deliveries = Vec::with_capacity(self.letters.len());
        for letter in self.letters {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(self.input).headers(headers::build(
                    letter
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_slice(), v.as_deref())),
                ));
            if let Some(k) = &letter.key {
                record = record.key(k);
            }
            if let Some(v) = &letter.value {
                record = record.payload(v);
            }
            match producer.send_result(record) {
                Ok(d) => deliveries.push((&letter.from, d)),
                Err((e, _)) => {
                    abort(producer, transactional);
                    return Err(format!("{} could not be queued: {e}", letter.from));
                }
            }
        }
        // The new positions, each moved partition's coverage in the metadata.
        let mut positions = TopicPartitionList::new();
        let mut staged: Vec<(i32, Coverage)> = Vec::new();
        let moved: std::collections::BTreeSet<i32> = self.moved.iter().copied().collect();
        for p in moved {
            let Some(part) = parts.get(&p) else { continue };
            let mut coverage = part.coverage.clone();
            coverage.advance(&policy.selection, part.next);
            positions
                .add_partition_offset(self.dlq, p, Offset::Offset(coverage.base()))
                .map_err(|e| e.to_string())?;
            if let Some(mut elem) = positions.find_partition(self.dlq, p) {
                elem.set_metadata(coverage.encode());
            }
            staged.push((p, coverage));
        }
        if transactional {
            let cgm = consumer
                .group_metadata()
                .ok_or_else(|| "the consumer has no group metadata".to_owned())?;
            if let Err(e) =
                producer.send_offsets_to_transaction(&positions, &cgm, Duration::from_secs(30))
            {
                abort(producer, true);
                return Err(format!("the position could not join the transaction: {e}"));
            }
            commit_or_explain(producer, self.letters.len())?;
        } else {
            for (from, d) in deliveries {
                match handle.block_on(d) {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => {
                        return Err(format!("{from} was not accepted by the broker: {e}"))
                    }
                    Err(_) => return Err(format!("{from}: the producer went away")),
                }
            }
            consumer
                .commit(&positions, CommitMode::Sync)
                .map_err(|e| format!("the position could not be committed: {e}"))?;
        }
        for (p, coverage) in staged {
            if let Some(part) = parts.get_mut(&p) {
                part.coverage = coverage;
            }
        }
        Ok(())
    }
}

/// Retries of a commit that timed out (only the commit is sent again).
const COMMIT_RETRIES: u32 = 3;

/// Commits the batch's transaction. A commit that times out is retried alone;
/// one that never answers may have committed or not, and the message says so
/// and how to find out (a `--force` rerun would send its letters twice). A
/// commit refused outright is aborted: none of its letters went.
fn commit_or_explain(producer: &FutureProducer, letters: usize) -> Result<(), String> {
    explain_commit(
        || {
            producer
                .commit_transaction(Duration::from_secs(60))
                .map_err(super::transactions::txn_error)
        },
        || abort(producer, true),
        letters,
    )
}

/// The policy of [`commit_or_explain`], over any commit.
fn explain_commit(
    mut commit: impl FnMut() -> Result<(), TxnError>,
    abort: impl FnOnce(),
    letters: usize,
) -> Result<(), String> {
    let mut tries = 0;
    loop {
        match commit() {
            Ok(()) => return Ok(()),
            Err(TxnError::Retriable(e)) if tries < COMMIT_RETRIES => {
                tries += 1;
                tracing::warn!(error = %e, tries, "the redrive transaction's commit timed out; committing again");
            }
            Err(TxnError::Abortable(e)) => {
                abort();
                return Err(format!(
                    "the transaction did not commit ({e}); none of its {letters} letters were redriven"
                ));
            }
            Err(e) => {
                return Err(format!(
                    "the outcome of the last transaction ({letters} letters) is unknown: its commit did not answer ({e}); it may have committed. Run the same command with --dry-run to see whether its letters are still pending; a rerun without --force sends only those that are"
                ))
            }
        }
    }
}

fn abort(producer: &FutureProducer, transactional: bool) {
    if transactional {
        if let Err(e) = producer.abort_transaction(Duration::from_secs(30)) {
            tracing::warn!(error = %e, "aborting the redrive transaction failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_group_for_every_filter() {
        assert_eq!(group_for("paysync"), "paysync.redrive");
    }

    fn commits(script: Vec<Result<(), TxnError>>) -> (Result<(), String>, usize, bool) {
        let mut script = script.into_iter();
        let mut calls = 0;
        let mut aborted = false;
        let result = explain_commit(
            || {
                calls += 1;
                script.next().unwrap_or(Ok(()))
            },
            || aborted = true,
            7,
        );
        (result, calls, aborted)
    }

    #[test]
    fn a_commit_that_times_out_is_retried_alone_then_its_outcome_is_unknown() {
        let timeout = || Err(TxnError::Retriable("Operation timed out".into()));
        let (result, calls, aborted) = commits(vec![timeout(), Ok(())]);
        assert_eq!((result, calls, aborted), (Ok(()), 2, false));
        let (result, calls, aborted) = commits(vec![timeout(), timeout(), timeout(), timeout()]);
        let why = result.unwrap_err();
        assert_eq!(calls, 4);
        assert!(!aborted, "an unknown outcome is not aborted");
        assert!(
            why.contains("is unknown") && why.contains("may have committed"),
            "{why}"
        );
        assert!(
            why.contains("--dry-run") && !why.contains("none of its"),
            "{why}"
        );
        let (result, _, aborted) = commits(vec![Err(TxnError::Abortable("refused".into()))]);
        assert!(aborted);
        assert!(result
            .unwrap_err()
            .contains("none of its 7 letters were redriven"));
    }
}
