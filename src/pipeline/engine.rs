//! The engine: one consumer-group member that reads its partitions
//! ([`Queues`] over a [`Source`]) into the [`Dispatcher`] (bounded in-flight,
//! per-key order, the job life cycle), serves the consumer all the time
//! (rebalances, commit results), and ticks its [`Committer`], which commits for
//! either guarantee. A commit that is due runs beside the loop, so reading goes
//! on meanwhile.
//!
//! One engine consumes one topic. paysync runs one for the input topic and, in
//! follow mode, one per re-check topic (each in its own consumer group,
//! `<group_id>.recheck.<seconds>s`). Nothing here knows Kafka: the rdkafka
//! source is `kafka::source`, and the deterministic simulation drives the same
//! engine over an in-memory one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::committer::Committer;
use super::dispatch::{Arrived, Dispatcher};
use super::queues::Queues;
use super::source::{Source, SourceEvent};
use super::txn::Settled;
use crate::clock::{now_ms, Instant};
use crate::telemetry::Metrics;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The topic this engine consumes.
    pub input_topic: String,
    /// It is a re-check topic: hold each partition's head until it is due.
    pub recheck: bool,
    /// How long shutdown waits for in-flight work.
    pub drain_timeout: Duration,
}

/// Why an engine stopped before shutdown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EngineStopped(pub String);

/// How often a re-check engine measures its pending re-checks.
const PENDING_EVERY: Duration = Duration::from_secs(5);

/// The running engine.
pub struct Engine {
    source: Arc<dyn Source>,
    queues: Queues,
    dispatcher: Dispatcher,
    committer: Arc<Committer>,
    /// A commit under way beside the loop.
    committing: Option<JoinHandle<Settled>>,
    metrics: Arc<Metrics>,
    settings: EngineSettings,
    /// Re-check engines: a pending measurement is under way.
    measuring: Arc<AtomicBool>,
}

impl Engine {
    /// An engine over a subscribed source.
    pub fn new(
        source: Arc<dyn Source>,
        queues: Queues,
        dispatcher: Dispatcher,
        committer: Arc<Committer>,
        metrics: Arc<Metrics>,
        settings: EngineSettings,
    ) -> Self {
        Engine {
            source,
            queues,
            dispatcher,
            committer,
            committing: None,
            metrics,
            settings,
            measuring: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Consumes until `shutdown` is cancelled, then drains in-flight work within
    /// the drain timeout, commits and returns. Returns early with an error when
    /// the committer cannot go on (exactly once: another instance holds the
    /// transactional id).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), EngineStopped> {
        let mut commit_tick = tokio::time::interval(self.committer.tick_every());
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending_tick = tokio::time::interval(PENDING_EVERY);
        pending_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let wake = self.source.wake();
        loop {
            self.serve().await;
            if let Some(why) = self.committer.stopped() {
                self.dispatcher.abort_tasks().await;
                return Err(EngineStopped(why));
            }
            self.dispatcher.reap();
            self.apply_rewinds();
            let (more, seeks) = self.queues.read(self.source.as_ref(), &mut self.dispatcher);
            for (p, o) in seeks {
                self.source.seek(p, o);
            }
            self.metrics
                .set_in_flight(&self.settings.input_topic, self.dispatcher.in_flight());
            let next_due = self.queues.next_due();
            let committing = self.committing.is_some();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(done) = self.dispatcher.next_done() => self.dispatcher.on_done(done),
                settled = settled(&mut self.committing), if committing => {
                    self.committing = None;
                    if let Ok(Settled::Stopped(why)) = settled {
                        self.dispatcher.abort_tasks().await;
                        return Err(EngineStopped(why));
                    }
                }
                _ = commit_tick.tick() => {
                    // Also a backstop for a partition that holds something
                    // without having signalled it.
                    self.source.refresh();
                    self.tick();
                    self.report_health();
                }
                _ = pending_tick.tick(), if self.settings.recheck => self.report_pending(),
                () = wake.notified() => {}
                () = tokio::time::sleep(until(next_due)), if next_due.is_some() => {}
                () = tokio::task::yield_now(), if more => {}
            }
        }
        self.drain().await;
        Ok(())
    }

    /// The committer's tick; a commit that is due runs beside the loop.
    fn tick(&mut self) {
        if self.committing.is_some() {
            if let Some(txn) = self.committer.transactions() {
                txn.pump_now();
            }
            return;
        }
        if let Some(commit) = self.committer.tick() {
            self.committing = Some(tokio::spawn(commit));
        }
        self.apply_rewinds();
    }

    /// Partitions the committer rewound (after an abort) lose their queued jobs
    /// and held heads; the source was already sought back.
    fn apply_rewinds(&mut self) {
        for p in self.committer.take_rewound() {
            self.dispatcher.forget_partition(p);
            self.queues.drop_held(p);
        }
    }

    /// Serves the source: records of partitions not split off yet,
    /// assignments, revocations, commit confirmations.
    async fn serve(&mut self) {
        for event in self.source.poll() {
            match event {
                SourceEvent::Record(incoming) => {
                    let p = incoming.partition;
                    if let Arrived::Seek(to) = self.dispatcher.on_record(incoming) {
                        self.source.seek(p, to);
                    }
                }
                SourceEvent::Assigned(partitions) => {
                    for p in partitions {
                        self.queues.add(p);
                    }
                }
                SourceEvent::Revoking(partitions) => {
                    self.committer.revoke(&partitions).await;
                    self.forget(&partitions);
                    self.source.release(&partitions);
                }
                SourceEvent::Revoked(partitions) => self.forget(&partitions),
                SourceEvent::Committed(positions) => self.committer.committed(&positions),
            }
        }
    }

    fn forget(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.queues.remove(*p);
            self.dispatcher.forget_partition(*p);
        }
    }

    /// Re-check engines: pending re-checks per owned partition (high watermark
    /// minus the first re-check not yet done), measured against the broker. The
    /// client's own lag statistic stays at its last fetch while a partition is
    /// not fetched, and a partition whose head is not due is not fetched for as
    /// long as it waits. Asked in a task of its own; one round at a time.
    fn report_pending(&self) {
        if self.measuring.swap(true, Ordering::AcqRel) {
            return;
        }
        let positions = self.dispatcher.ledger().positions();
        let parts: Vec<(i32, Option<i64>)> = self
            .source
            .assigned()
            .into_iter()
            .map(|partition| {
                let from = self.queues.held_offset(partition).or_else(|| {
                    positions
                        .iter()
                        .find(|p| p.partition == partition)
                        .map(|p| p.watermark)
                });
                (partition, from)
            })
            .collect();
        let source = self.source.clone();
        let metrics = self.metrics.clone();
        let measuring = self.measuring.clone();
        tokio::spawn(async move {
            let topic = source.topic().clone();
            let mut pending = 0;
            for (partition, from) in parts {
                // Nothing read yet: the consumer starts at the log start; and
                // what retention deleted is no longer pending.
                if let Ok((low, high)) = source.watermarks(partition).await {
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
        let health = self.dispatcher.ledger().health(Instant::now());
        self.metrics
            .set_stalled_partitions(health.iter().filter(|h| h.stalled.is_some()).count());
        for h in &health {
            self.metrics
                .set_watermark_stuck(&self.settings.input_topic, h.partition, h.stuck_for);
        }
    }

    async fn drain(mut self) {
        if let Some(c) = self.committing.take() {
            let _ = c.await;
        }
        let deadline = Instant::now()
            .checked_add(self.settings.drain_timeout)
            .unwrap_or_else(Instant::now);
        self.committer.finish(&mut self.dispatcher, deadline).await;
        self.metrics
            .set_in_flight(&self.settings.input_topic, self.dispatcher.in_flight());
    }
}

/// The commit under way, once it ends (never, when none runs).
async fn settled(
    committing: &mut Option<JoinHandle<Settled>>,
) -> Result<Settled, tokio::task::JoinError> {
    match committing {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

/// How long until `due_ms` (ms since the epoch); zero when it has passed.
fn until(due_ms: Option<i64>) -> Duration {
    let wait = due_ms.map_or(0, |d| d.saturating_sub(now_ms()));
    Duration::from_millis(u64::try_from(wait).unwrap_or(0))
}
