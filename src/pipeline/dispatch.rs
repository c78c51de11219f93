//! The job life cycle, free of Kafka types. A consumed record arrives (the
//! ledger accepts it, or reports a gap or a repeat), becomes a job (the
//! [`Handler`] decodes and routes it), waits for admission (the [`Scheduler`]:
//! in-flight bound, per-key order), runs as a task in a `JoinSet`, and delivers
//! its records through the engine's [`Sink`]:
//!
//! - at least once ([`Sink::Acks`]): the task publishes each record and waits for
//!   the broker's acknowledgement ([`Publish`]); its offset is done only then.
//!   Once its records are built, a job may give its in-flight slot to the next
//!   one (the scheduler's publishing allowance);
//! - exactly once ([`Sink::Transactions`]): the task hands its records to the
//!   transactions ([`super::txn`]), which take them into the open transaction in
//!   offset order; the job is over at once, its slot free.
//!
//! The Kafka engine feeds it records and reads a partition only while
//! [`Dispatcher::readable`] says so; tests feed it records in memory with paused
//! time and fakes of the handler and the sink.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::ledger::{Arrival, Epoch, GapDecision, GapPolicy, Ledger, Ticket};
use super::process::{Destination, Incoming, Milestone, Outgoing, PipelineJob, Work};
use super::scheduler::{Admission, Scheduler};
use super::txn::Transactions;
use super::PublishGate;
use crate::codec::RejectCode;
use crate::telemetry::{Metrics, Outcome};

/// What the dispatcher asks of message processing: the `Processor` in paysync,
/// fakes in tests.
pub trait Handler: Send + Sync + 'static {
    /// Decodes and routes a record (no I/O).
    fn prepare(&self, incoming: Incoming, epoch: Epoch) -> PipelineJob;
    /// Runs a job to the records it publishes, in order.
    fn process<'a>(&'a self, job: &'a PipelineJob) -> BoxFuture<'a, Vec<Outgoing>>;
    /// The dead letter of a record (for an event the broker refuses).
    fn dead_letter(&self, incoming: &Incoming, code: RejectCode, message: &str) -> Outgoing;
    /// Every record of a job was delivered.
    fn done(&self, job: &PipelineJob);
}

/// Whether a record reached the broker (at least once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Acknowledged by the broker.
    Published,
    /// Not published: the partition was revoked or the process is stopping.
    Abandoned,
    /// An event the broker refuses permanently, with the reason: dead-letter the
    /// request instead. (Dead letters are never refused to the caller; their
    /// partition stalls until the broker takes them.)
    Refused(String),
}

/// Publishes one record and waits for its acknowledgement (at least once): the
/// Kafka producer in paysync, a fake in tests.
pub trait Publish: Send + Sync + 'static {
    /// Publishes `out` while `gate` says its partition is owned.
    fn publish<'a>(&'a self, out: &'a Outgoing, gate: &'a dyn PublishGate)
        -> BoxFuture<'a, Delivery>;
}

/// How finished jobs deliver their records.
#[derive(Clone)]
pub enum Sink {
    /// At least once: each record acknowledged before the offset is done.
    Acks(Arc<dyn Publish>),
    /// Exactly once: records and offsets commit in Kafka transactions.
    Transactions(Arc<Transactions>),
}

/// What a job's task tells the dispatcher.
#[derive(Debug)]
pub enum Done {
    /// Its records are built; only the broker's acknowledgement is left, so its
    /// in-flight slot may go to the next request (see `Scheduler::release`).
    Built {
        /// The job.
        serial: u64,
    },
    /// It is over: delivered, handed to a transaction, abandoned or failed.
    Finished {
        /// The job.
        serial: u64,
        /// Its ordering key.
        key: Option<String>,
    },
}

/// What to do after a record arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrived {
    /// Taken (started, queued behind its key, parked) or skipped as a repeat.
    Taken,
    /// Offsets before it were not delivered: fetch the partition again from here.
    Seek(i64),
}

/// The dispatcher's settings.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Requests accepted and not yet past their connector call, at most.
    pub max_in_flight: usize,
    /// Requests for one payment waiting or running, at most.
    pub max_queued_per_key: usize,
    /// Offsets one partition may hold in memory before it is not read.
    pub max_held: usize,
    /// Take a gap in the offsets as a hole in the log at once (transactional
    /// topics have them at every commit marker) instead of fetching again first.
    pub accept_gaps: bool,
}

/// The job life cycle of one engine.
pub struct Dispatcher {
    handler: Arc<dyn Handler>,
    sink: Sink,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    settings: DispatchSettings,
    scheduler: Scheduler<PipelineJob>,
    /// Per-message tasks: reaped as they finish, awaited on shutdown and aborted
    /// after the drain deadline.
    tasks: JoinSet<()>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    next_serial: u64,
    /// Jobs released by the scheduler (waiting for their acknowledgement).
    released: HashSet<u64>,
    gaps: GapPolicy,
}

impl Dispatcher {
    /// A dispatcher over `ledger`, delivering through `sink`.
    pub fn new(
        handler: Arc<dyn Handler>,
        sink: Sink,
        ledger: Arc<Ledger>,
        metrics: Arc<Metrics>,
        settings: DispatchSettings,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Dispatcher {
            scheduler: Scheduler::new(settings.max_in_flight, settings.max_queued_per_key),
            handler,
            sink,
            ledger,
            metrics,
            settings,
            tasks: JoinSet::new(),
            done_tx,
            done_rx,
            next_serial: 0,
            released: HashSet::new(),
            gaps: GapPolicy::default(),
        }
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Requests holding an in-flight slot.
    pub fn in_flight(&self) -> usize {
        self.scheduler.in_flight()
    }

    /// Requests accepted and not finished.
    pub fn unfinished(&self) -> usize {
        self.scheduler.unfinished()
    }

    /// True at the in-flight bound (or, exactly once, at the bound on records
    /// waiting for a commit): nothing more is read.
    pub fn saturated(&self) -> bool {
        self.scheduler.saturated()
            || matches!(&self.sink, Sink::Transactions(t) if t.full())
    }

    /// True when the engine may read `partition` now: room in flight, nothing
    /// parked for it, not stalled, not holding `max_held` offsets.
    pub fn readable(&self, partition: i32) -> bool {
        !self.saturated()
            && self.scheduler.parked_in(partition) == 0
            && !self.ledger.held_back(partition, self.settings.max_held)
    }

    /// True when something is parked for `partition` (it is not read until the
    /// parked job is admitted).
    pub fn parked_in(&self, partition: i32) -> bool {
        self.scheduler.parked_in(partition) > 0
    }

    /// A consumed record.
    pub fn on_record(&mut self, incoming: Incoming) -> Arrived {
        let partition = incoming.partition;
        let offset = incoming.offset;
        let epoch = match self.ledger.arrive(partition, offset) {
            Arrival::Accepted(epoch) => epoch,
            Arrival::Skip => {
                tracing::debug!(partition, offset, "skipping a message already in flight");
                return Arrived::Taken;
            }
            Arrival::Gap { epoch, expected } => {
                let decision = if self.settings.accept_gaps {
                    GapDecision::Accept
                } else {
                    self.gaps.on_gap(partition, expected)
                };
                match decision {
                    GapDecision::Seek(to) => {
                        tracing::warn!(
                            partition,
                            offset,
                            expected,
                            "offsets arrived with a gap; seeking back to refetch them"
                        );
                        return Arrived::Seek(to);
                    }
                    GapDecision::Accept => {
                        if !self.settings.accept_gaps {
                            tracing::warn!(
                                partition,
                                offset,
                                expected,
                                "offsets absent from the log (compaction, transaction markers, or deleted by retention before they were consumed)"
                            );
                        }
                        if !self.ledger.accept(partition, epoch, offset) {
                            return Arrived::Taken;
                        }
                        epoch
                    }
                }
            }
        };
        self.gaps.clear(partition);
        let job = self.handler.prepare(incoming, epoch);
        if let Admission::Start(job) = self.scheduler.offer(job) {
            let mut ready = self.start(job);
            while let Some(job) = ready.pop() {
                ready.extend(self.start(job));
            }
        }
        Arrived::Taken
    }

    /// Waits for the next word from a task (cancel-safe, for `select!`).
    pub async fn next_done(&mut self) -> Option<Done> {
        self.done_rx.recv().await
    }

    /// A task's word, and every other already waiting.
    pub fn on_done(&mut self, done: Done) {
        self.apply(done);
        while let Ok(done) = self.done_rx.try_recv() {
            self.apply(done);
        }
    }

    fn apply(&mut self, done: Done) {
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

    /// A partition was revoked or rewound: its queued and parked jobs go (they
    /// will be consumed again); its running jobs are already stale in the ledger.
    pub fn forget_partition(&mut self, partition: i32) {
        self.gaps.clear(partition);
        let dropped = self.scheduler.drop_partition(partition);
        if dropped > 0 {
            tracing::debug!(partition, dropped, "dropped queued work of a partition");
        }
    }

    /// Collects finished tasks. A task whose job panicked outside the handler's
    /// own containment is logged; its guard already released its accounting.
    pub fn reap(&mut self) {
        while let Some(result) = self.tasks.try_join_next() {
            if let Err(e) = result {
                if e.is_panic() {
                    self.metrics.internal_error();
                    tracing::error!(error = %e, "a message task panicked; its offset stays uncommitted");
                }
            }
        }
    }

    /// Spawns a job; returns jobs that became startable because this one was stale.
    fn start(&mut self, job: PipelineJob) -> Vec<PipelineJob> {
        let partition = job.incoming.partition;
        if !self.ledger.start(partition, job.epoch) {
            // Its partition was revoked or rewound while it waited: it is redone.
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
        let handler = self.handler.clone();
        let sink = self.sink.clone();
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
                let records = handler.process(&job).await;
                match sink {
                    Sink::Acks(publisher) => {
                        let _ = built.send(Done::Built { serial });
                        guard.published = publish_all(
                            handler.as_ref(),
                            publisher.as_ref(),
                            &metrics,
                            &job,
                            records,
                            &ticket,
                        )
                        .await;
                    }
                    Sink::Transactions(txn) => {
                        let summary = summarize(&records);
                        let taken = txn.finished(&job, records, &|code, message| {
                            handler.dead_letter(&job.incoming, code, message)
                        });
                        if taken {
                            handler.done(&job);
                            log_processed(summary);
                        } else {
                            tracing::info!("abandoned: partition no longer owned or rewound");
                        }
                    }
                }
            }
            .instrument(span),
        );
        Vec::new()
    }

    /// Shutdown: drops parked work, then waits until `deadline` for the rest.
    /// Returns how many jobs did not finish (they are redone after a restart).
    pub async fn drain(&mut self, deadline: tokio::time::Instant) -> usize {
        let parked = self.scheduler.drop_parked();
        tracing::info!(
            in_flight = self.scheduler.unfinished(),
            parked,
            "shutting down: draining in-flight work"
        );
        while self.scheduler.unfinished() > 0 {
            match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                Ok(Some(done)) => self.on_done(done),
                Ok(None) | Err(_) => break,
            }
            self.metrics.set_in_flight(self.scheduler.in_flight());
        }
        self.scheduler.unfinished()
    }

    /// Stops every task that is still running (after the drain deadline) and
    /// waits for them to go.
    pub async fn abort_tasks(&mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
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

/// The first record's outcome and summary (a request's result for logs).
fn summarize(records: &[Outgoing]) -> Option<(Outcome, std::borrow::Cow<'static, str>)> {
    records
        .iter()
        .find(|r| !r.summary.is_empty())
        .map(|r| (r.outcome, r.summary.clone()))
}

fn log_processed(summary: Option<(Outcome, std::borrow::Cow<'static, str>)>) {
    if let Some((outcome, summary)) = summary {
        // A status synced is the normal case: debug. Connector errors and dead
        // letters stay at info (their causes were logged at warn).
        if outcome == Outcome::Synced {
            tracing::debug!(result = %summary, "processed");
        } else {
            tracing::info!(result = %summary, "processed");
        }
    }
}

/// Publishes a job's records in order (an event, then the chain's re-check
/// record; or a dead letter), each acknowledged before the next. True when all
/// were acknowledged: only then is the job's offset done, so a re-check record is
/// acknowledged before the offset that produced it can be committed. An event
/// the broker refuses turns the job into a `publish_refused` dead letter (and its
/// chain, if any, ends there).
async fn publish_all(
    handler: &dyn Handler,
    publisher: &dyn Publish,
    metrics: &Metrics,
    job: &PipelineJob,
    records: Vec<Outgoing>,
    ticket: &Ticket,
) -> bool {
    let started: Instant = job.incoming.received;
    let mut records = records.into_iter();
    let mut outcome = Outcome::Invalid;
    let mut summary = std::borrow::Cow::Borrowed("");
    while let Some(out) = records.next() {
        let (mut out, delivery) = match publisher.publish(&out, ticket).await {
            Delivery::Refused(reason) => {
                // The broker will never take this event: keep the request instead.
                tracing::warn!(%reason, "the broker refuses the event; dead-lettering the request");
                records = Vec::new().into_iter();
                let dead = handler.dead_letter(
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
    handler.done(job);
    if !summary.is_empty() {
        metrics.request_done(outcome, started);
        log_processed(Some((outcome, summary)));
    }
    true
}
