//! The engine: one consumer-group member that reads its partition queues
//! ([`super::queues`]) into the broker-free [`Dispatcher`] (bounded in-flight,
//! per-key order, the job life cycle), serves the consumer queue all the time
//! (rebalances, commit results and statistics, see [`super::context`]), and
//! commits:
//!
//! - at least once: each partition's contiguous watermark, every
//!   `kafka.commit_interval`, on revocation and on shutdown;
//! - exactly once: a transaction with the records of finished work and the
//!   positions they reach ([`crate::pipeline::txn`]), every
//!   `processing.transaction_interval` (or sooner when many records wait), on
//!   revocation and on shutdown; the commit runs on a blocking thread while the
//!   engine goes on reading.
//!
//! One engine consumes one topic. paysync runs one for the input topic and, in
//! follow mode, one per re-check topic (each in its own consumer group,
//! `<group_id>.recheck.<seconds>s`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::context::{commit_positions, Note};
use super::queues::{incoming, Queues};
use crate::pipeline::dispatch::{Arrived, Dispatcher};
use crate::pipeline::ledger::Ledger;
use crate::pipeline::process::now_ms;
use crate::pipeline::txn::Transactions;
use crate::telemetry::Metrics;

pub use super::context::{create_consumer, has_joined, EngineConsumer, EngineContext};

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
    /// Commit interval (at least once) or transaction interval (exactly once).
    pub commit_interval: Duration,
    /// How long shutdown and revocation wait for in-flight work.
    pub drain_timeout: Duration,
}

/// How often a re-check engine measures its pending re-checks.
const PENDING_EVERY: Duration = Duration::from_secs(5);

/// The running engine.
pub struct Engine {
    consumer: Arc<EngineConsumer>,
    queues: Queues,
    dispatcher: Dispatcher,
    /// Exactly once: the engine's transactions.
    txn: Option<Arc<Transactions>>,
    /// Exactly once: the commit under way on a blocking thread.
    committing: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    settings: EngineSettings,
    /// Re-check engines: a pending measurement is under way.
    measuring: Arc<AtomicBool>,
}

impl Engine {
    /// An engine over a subscribed consumer.
    pub(crate) fn new(
        consumer: Arc<EngineConsumer>,
        queues: Queues,
        dispatcher: Dispatcher,
        txn: Option<Arc<Transactions>>,
        metrics: Arc<Metrics>,
        settings: EngineSettings,
    ) -> Self {
        Engine {
            consumer,
            queues,
            dispatcher,
            txn,
            committing: None,
            metrics,
            settings,
            measuring: Arc::new(AtomicBool::new(false)),
        }
    }

    fn ledger(&self) -> &Arc<Ledger> {
        self.dispatcher.ledger()
    }

    /// Consumes until `shutdown` is cancelled, then drains in-flight work within
    /// the drain timeout, commits and returns.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Exactly once: a transaction is due `transaction_interval` after it
        // opened, and a tick of that same period would find it a hair short and
        // commit only at the next one (every record would wait up to twice the
        // interval); ticking at a quarter of it bounds the overshoot.
        let tick_every = if self.txn.is_some() {
            (self.settings.commit_interval / 4).max(Duration::from_millis(1))
        } else {
            self.settings.commit_interval
        };
        let mut commit_tick = tokio::time::interval(tick_every);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending_tick = tokio::time::interval(PENDING_EVERY);
        pending_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let context = self.consumer.context().clone();
        loop {
            if context.main_ready.swap(false, Ordering::AcqRel) {
                self.serve_consumer_queue();
            }
            self.dispatcher.reap();
            self.apply_rewinds();
            let (more, seeks) = self.queues.read(&mut self.dispatcher);
            for (p, o) in seeks {
                self.seek(p, o);
            }
            self.metrics.set_in_flight(self.dispatcher.in_flight());
            let next_due = self.queues.next_due();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(done) = self.dispatcher.next_done() => self.dispatcher.on_done(done),
                _ = commit_tick.tick() => {
                    // Also a backstop for a queue that holds something without
                    // having signalled it: serve the consumer queue and look at
                    // every partition queue once.
                    self.serve_consumer_queue();
                    self.queues.mark_all_ready();
                    self.commit_tick();
                    self.report_health();
                }
                _ = pending_tick.tick(), if self.settings.recheck => self.report_pending(),
                () = context.wake.notified() => {}
                () = tokio::time::sleep(until(next_due)), if next_due.is_some() => {}
                () = tokio::task::yield_now(), if more => {}
            }
        }
        self.drain().await;
    }

    /// At least once: commit the watermarks. Exactly once: hand over what
    /// became ready, and start a commit when one is due and none runs.
    fn commit_tick(&mut self) {
        let Some(txn) = &self.txn else {
            self.commit(CommitMode::Async);
            return;
        };
        txn.pump_now();
        if self
            .committing
            .as_ref()
            .is_some_and(JoinHandle::is_finished)
        {
            self.committing = None;
        }
        if self.committing.is_none() && txn.due() {
            let txn = txn.clone();
            self.committing = Some(tokio::task::spawn_blocking(move || {
                txn.commit();
            }));
        }
        self.apply_rewinds();
    }

    /// Exactly once: partitions the transactions rewound (after an abort) lose
    /// their queued jobs and held heads; the consumer was already sought back.
    fn apply_rewinds(&mut self) {
        let Some(txn) = &self.txn else { return };
        for p in txn.take_rewound() {
            self.dispatcher.forget_partition(p);
            self.queues.drop_held(p);
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
        let positions = self.ledger().positions();
        let parts: Vec<(i32, Option<i64>)> = self
            .consumer
            .context()
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|&partition| {
                let from = self.queues.held_offset(partition).or_else(|| {
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
        let health = self.ledger().health(Instant::now());
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
                    let incoming = incoming(&m, self.queues.topic(), self.settings.recheck);
                    drop(m);
                    self.apply_notes();
                    let p = incoming.partition;
                    if let Arrived::Seek(to) = self.dispatcher.on_record(incoming) {
                        self.seek(p, to);
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consume error"),
                None if context.served.load(Ordering::Relaxed) != served => self.apply_notes(),
                None => break,
            }
        }
        self.apply_notes();
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
                        self.queues.remove(p);
                        self.dispatcher.forget_partition(p);
                    }
                }
                // An assignment re-forwards partitions to the consumer queue: split
                // every assigned partition off again, before fetching starts.
                Note::Assigned(partitions) => {
                    for p in partitions {
                        self.queues.split(&self.consumer, p);
                    }
                }
            }
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

    /// At least once: commits every partition's watermark that moved.
    fn commit(&self, mode: CommitMode) {
        let positions = self.ledger().to_commit();
        let done = commit_positions(
            self.consumer.as_ref(),
            &self.settings.input_topic,
            &positions,
            mode,
        );
        if matches!(mode, CommitMode::Sync) {
            let board = &self.consumer.context().board;
            for (p, o) in done {
                self.ledger().committed(p, o);
                board.post(&self.settings.input_topic, p, o);
            }
        }
        for p in self.ledger().positions() {
            self.metrics.set_commit(
                &self.settings.input_topic,
                p.partition,
                p.committed.unwrap_or(p.watermark),
                p.gap,
            );
        }
    }

    async fn drain(mut self) {
        let deadline = tokio::time::Instant::now() + self.settings.drain_timeout;
        let unfinished = self.dispatcher.drain(deadline).await;
        let positions = if unfinished > 0 {
            tracing::warn!(
                abandoned = unfinished,
                "shutdown deadline passed; unfinished requests will be redone after restart"
            );
            // Nothing may publish (or finish into a transaction) any more.
            let positions = self.ledger().revoke_all();
            self.dispatcher.abort_tasks().await;
            positions
        } else {
            self.dispatcher.abort_tasks().await;
            self.ledger().positions()
        };
        if let Some(txn) = self.txn.clone() {
            if let Some(c) = self.committing.take() {
                let _ = c.await;
            }
            let settled = tokio::task::spawn_blocking(move || txn.commit()).await;
            tracing::info!(settled = ?settled.ok(), "final transaction");
            return;
        }
        let committed = commit_positions(
            self.consumer.as_ref(),
            &self.settings.input_topic,
            &positions,
            CommitMode::Sync,
        );
        for (p, o) in &committed {
            self.ledger().committed(*p, *o);
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
        self.metrics.set_in_flight(self.dispatcher.in_flight());
    }
}

/// How long until `due_ms` (ms since the epoch); zero when it has passed.
fn until(due_ms: Option<i64>) -> Duration {
    let wait = due_ms.map_or(0, |d| d.saturating_sub(now_ms()));
    Duration::from_millis(u64::try_from(wait).unwrap_or(0))
}
