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

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::ledger::{Arrival, Epoch, GapDecision, GapPolicy, Ledger, Ticket};
use super::record::{Destination, Handler, Incoming, Milestone, Outgoing, PipelineJob, Work};
use super::scheduler::{Admission, Scheduler};
use super::txn::Transactions;
use super::PublishGate;
use crate::clock::Instant;
use crate::codec::RejectCode;
use crate::telemetry::{Metrics, Outcome};

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
    fn publish<'a>(
        &'a self,
        out: &'a Outgoing,
        gate: &'a dyn PublishGate,
    ) -> BoxFuture<'a, Delivery>;
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
        self.scheduler.saturated() || matches!(&self.sink, Sink::Transactions(t) if t.full())
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
                // The broker will never take this record: keep the request
                // instead (a chain ends there).
                let (code, what) = match out.destination {
                    Destination::Recheck(_) => (RejectCode::RecheckTooLarge, "re-check record"),
                    _ => (RejectCode::PublishRefused, "event"),
                };
                tracing::warn!(%reason, "the broker refuses the {what}; dead-lettering the request");
                records = Vec::new().into_iter();
                let dead = handler.dead_letter(
                    &job.incoming,
                    code,
                    &format!("the {what} could not be published: {reason}"),
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

#[cfg(test)]
mod tests {
    //! The life cycle in memory, with paused time: a fake handler whose jobs take
    //! the time their value says, a fake publisher, the fake transactional
    //! producer.

    use std::borrow::Cow;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::codec::Rejection;
    use crate::pipeline::fakes::{FakeProducer, FakeSource};
    use crate::pipeline::txn::Role;

    /// Jobs sleep for the milliseconds in their value, keyed by their Kafka key.
    struct SleepyHandler {
        running: Mutex<usize>,
        max_running: Mutex<usize>,
    }

    impl SleepyHandler {
        fn new() -> Arc<Self> {
            Arc::new(SleepyHandler {
                running: Mutex::new(0),
                max_running: Mutex::new(0),
            })
        }
    }

    fn event(incoming: &Incoming) -> Outgoing {
        Outgoing {
            destination: Destination::Events,
            key: incoming.key.clone(),
            value: Some(incoming.offset.to_string().into_bytes()),
            headers: Vec::new(),
            label: "CHARGED",
            outcome: Outcome::Synced,
            summary: Cow::Borrowed("CHARGED"),
            milestone: None,
        }
    }

    impl Handler for SleepyHandler {
        fn prepare(&self, incoming: Incoming, epoch: Epoch) -> PipelineJob {
            let key = incoming
                .key
                .as_ref()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            PipelineJob {
                incoming,
                epoch,
                key,
                work: Work::Reject(Rejection::new(RejectCode::InternalError, "unused")),
            }
        }
        fn process<'a>(&'a self, job: &'a PipelineJob) -> BoxFuture<'a, Vec<Outgoing>> {
            Box::pin(async move {
                {
                    let mut r = self.running.lock().unwrap();
                    *r += 1;
                    let mut m = self.max_running.lock().unwrap();
                    *m = (*m).max(*r);
                }
                let ms: u64 = job
                    .incoming
                    .value
                    .as_deref()
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                *self.running.lock().unwrap() -= 1;
                vec![event(&job.incoming)]
            })
        }
        fn dead_letter(&self, incoming: &Incoming, code: RejectCode, _m: &str) -> Outgoing {
            let mut out = event(incoming);
            out.destination = Destination::DeadLetters;
            out.label = code.as_str();
            out
        }
        fn done(&self, _job: &PipelineJob) {}
    }

    /// Publishes at once; remembers (partition, offset) in publish order.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(i32, i64)>>);

    impl Publish for Recorder {
        fn publish<'a>(
            &'a self,
            out: &'a Outgoing,
            gate: &'a dyn PublishGate,
        ) -> BoxFuture<'a, Delivery> {
            Box::pin(async move {
                if !gate.begin() {
                    return Delivery::Abandoned;
                }
                gate.end();
                let offset = std::str::from_utf8(out.value.as_deref().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                self.0.lock().unwrap().push((gate.partition(), offset));
                Delivery::Published
            })
        }
    }

    fn record(partition: i32, offset: i64, key: &str, ms: u64) -> Incoming {
        Incoming {
            topic: Arc::from("in"),
            partition,
            offset,
            key: Some(key.as_bytes().to_vec()),
            value: Some(ms.to_string().into_bytes()),
            headers: Vec::new(),
            received: crate::clock::Instant::now(),
            recheck: false,
        }
    }

    fn dispatcher(
        sink: Sink,
        handler: Arc<SleepyHandler>,
        ledger: Arc<Ledger>,
        max_in_flight: usize,
    ) -> Dispatcher {
        Dispatcher::new(
            handler,
            sink,
            ledger,
            Arc::new(Metrics::new()),
            DispatchSettings {
                max_in_flight,
                max_queued_per_key: 16,
                max_held: 10_000,
                accept_gaps: false,
            },
        )
    }

    /// Runs the dispatcher until every job ended.
    async fn settle(d: &mut Dispatcher) {
        while d.unfinished() > 0 {
            let done = d.next_done().await.unwrap();
            d.on_done(done);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_payment_in_offset_order_different_payments_at_once() {
        let handler = SleepyHandler::new();
        let published = Arc::new(Recorder::default());
        let ledger = Arc::new(Ledger::new());
        let mut d = dispatcher(
            Sink::Acks(published.clone()),
            handler.clone(),
            ledger.clone(),
            8,
        );
        let started = tokio::time::Instant::now();
        // Payment a: 300 ms, then 10 ms; payment b: 100 ms, arriving last.
        for (o, key, ms) in [(0, "a", 300), (1, "a", 10), (2, "b", 100)] {
            assert_eq!(d.on_record(record(0, o, key, ms)), Arrived::Taken);
        }
        settle(&mut d).await;
        let order = published.0.lock().unwrap().clone();
        assert_eq!(
            order,
            vec![(0, 2), (0, 0), (0, 1)],
            "b did not wait for a; a's two in order"
        );
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(310),
            "a's second ran after its first"
        );
        assert_eq!(*handler.max_running.lock().unwrap(), 2);
        assert_eq!(ledger.watermark(0), Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_in_flight_bound_parks_a_partition_not_the_others() {
        let handler = SleepyHandler::new();
        let ledger = Arc::new(Ledger::new());
        let mut d = dispatcher(
            Sink::Acks(Arc::new(Recorder::default())),
            handler.clone(),
            ledger,
            2,
        );
        for o in 0..2 {
            d.on_record(record(0, o, &format!("k{o}"), 50));
        }
        assert!(d.saturated());
        assert!(
            !d.readable(0) && !d.readable(1),
            "at the bound nothing is read"
        );
        d.on_record(record(1, 0, "k9", 50));
        assert!(
            d.parked_in(1),
            "an arrival past the bound parks at its partition's head"
        );
        settle(&mut d).await;
        assert!(d.readable(0) && d.readable(1));
        assert!(*handler.max_running.lock().unwrap() <= 2);
    }

    #[tokio::test(start_paused = true)]
    async fn exactly_once_a_finished_job_leaves_its_slot_before_the_commit() {
        let handler = SleepyHandler::new();
        let ledger = Arc::new(Ledger::new());
        let producer = Arc::new(FakeProducer::default());
        let txn = Arc::new(Transactions::new(
            producer.clone(),
            Arc::new(FakeSource::default()),
            ledger.clone(),
            Arc::new(Metrics::new()),
            Duration::from_millis(100),
            1000,
        ));
        let mut d = dispatcher(
            Sink::Transactions(txn.clone()),
            handler.clone(),
            ledger.clone(),
            1,
        );
        // One slot: a slow head, then two quick ones behind it on the same
        // partition (different payments).
        d.on_record(record(0, 0, "slow", 500));
        d.on_record(record(0, 1, "x", 10));
        d.on_record(record(0, 2, "y", 10));
        settle(&mut d).await;
        // Each job left its slot as soon as its records were taken: the three ran
        // one after another with one slot and no commit in between.
        assert_eq!(*handler.max_running.lock().unwrap(), 1);
        let open: Vec<(i64, Role)> = producer
            .open
            .lock()
            .unwrap()
            .iter()
            .map(|t| (t.offset, t.role))
            .collect();
        assert_eq!(
            open,
            vec![(0, Role::Event), (1, Role::Event), (2, Role::Event)],
            "in offset order"
        );
        assert_eq!(
            txn.commit().await,
            crate::pipeline::txn::Settled::Committed(vec![(0, 3)])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn exactly_once_later_work_waits_for_a_slow_offset_and_an_abort_redoes_it_once() {
        let handler = SleepyHandler::new();
        let ledger = Arc::new(Ledger::new());
        let producer = Arc::new(FakeProducer::default());
        let source = Arc::new(FakeSource::default());
        let txn = Arc::new(Transactions::new(
            producer.clone(),
            source.clone(),
            ledger.clone(),
            Arc::new(Metrics::new()),
            Duration::from_millis(100),
            1000,
        ));
        let mut d = dispatcher(
            Sink::Transactions(txn.clone()),
            handler.clone(),
            ledger.clone(),
            8,
        );
        d.on_record(record(0, 0, "slow", 1000));
        d.on_record(record(0, 1, "quick", 10));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            producer.open.lock().unwrap().is_empty(),
            "1 finished but waits for 0"
        );
        assert_eq!(txn.commit().await, crate::pipeline::txn::Settled::Nothing);
        while let Ok(Some(done)) =
            tokio::time::timeout(Duration::from_millis(1), d.next_done()).await
        {
            d.on_done(done);
        }
        assert_eq!(d.unfinished(), 1, "1 left its slot already");
        settle(&mut d).await;
        producer
            .commits
            .lock()
            .unwrap()
            .push(Err(crate::pipeline::txn::TxnError::Abortable(
                "injected".into(),
            )));
        assert_eq!(
            txn.commit().await,
            crate::pipeline::txn::Settled::Aborted(vec![0])
        );
        assert_eq!(source.seeks.lock().unwrap().clone(), vec![(0, 0)]);
        for p in txn.take_rewound() {
            d.forget_partition(p);
        }
        // The consumer refetches from 0: both are redone and committed once.
        d.on_record(record(0, 0, "slow", 1000));
        d.on_record(record(0, 1, "quick", 10));
        settle(&mut d).await;
        assert_eq!(
            txn.commit().await,
            crate::pipeline::txn::Settled::Committed(vec![(0, 2)])
        );
        let committed: Vec<i64> = producer
            .committed
            .lock()
            .unwrap()
            .iter()
            .map(|t| t.offset)
            .collect();
        assert_eq!(committed, vec![0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_until_its_deadline_and_reports_what_did_not_finish() {
        let handler = SleepyHandler::new();
        let ledger = Arc::new(Ledger::new());
        let mut d = dispatcher(
            Sink::Acks(Arc::new(Recorder::default())),
            handler,
            ledger.clone(),
            8,
        );
        d.on_record(record(0, 0, "a", 100));
        d.on_record(record(0, 1, "b", 60_000));
        let left = d
            .drain(tokio::time::Instant::now() + Duration::from_secs(1))
            .await;
        assert_eq!(left, 1, "the minute-long job is abandoned");
        assert_eq!(
            ledger.watermark(0),
            Some(1),
            "the watermark stops before it"
        );
        d.abort_tasks().await;
    }
}
