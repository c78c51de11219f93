//! The delivery strategy of one engine, for either guarantee: how finished
//! work reaches the broker (the dispatcher's [`Sink`]), and when and how input
//! positions are committed: on the engine's tick, when partitions are revoked,
//! and at shutdown. The one owner of `kafka.commit_interval` /
//! `processing.transaction_interval` (rust-arroyo's `ProcessingStrategy` is the
//! model: one object with poll, submit and join for every backend).
//!
//! - at least once: each record is acknowledged before its offset is done; the
//!   contiguous watermarks are committed every `kafka.commit_interval`
//!   (asynchronously, confirmations come back from the [`Source`]), and
//!   synchronously on revocation and at shutdown;
//! - exactly once: records and positions commit in Kafka transactions
//!   ([`Transactions`]), every `processing.transaction_interval` (or sooner when
//!   many records wait), on revocation and at shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::board::CommitBoard;
use super::dispatch::{Dispatcher, Publish, Sink};
use super::ledger::{Ledger, Position};
use super::source::Source;
use super::txn::{Settled, Transactions};
use crate::clock::Instant;
use crate::telemetry::Metrics;

/// Commits a revocation tries at most before the partitions go (work still
/// in the open transaction then dooms it: it is redone by the next owner).
const REVOKE_ROUNDS: usize = 3;

/// How the committer delivers.
pub enum Mode {
    /// At least once: this publisher acknowledges every record.
    AtLeastOnce(Arc<dyn Publish>),
    /// Exactly once: these transactions.
    ExactlyOnce(Arc<Transactions>),
}

/// The commit side of one engine.
pub struct Committer {
    source: Arc<dyn Source>,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    board: Arc<CommitBoard>,
    mode: Mode,
    /// `kafka.commit_interval` or `processing.transaction_interval`.
    interval: Duration,
    /// How long revocation waits for in-flight work.
    drain_timeout: Duration,
}

impl Committer {
    /// A committer for the engine reading `source`.
    pub fn new(
        source: Arc<dyn Source>,
        ledger: Arc<Ledger>,
        metrics: Arc<Metrics>,
        board: Arc<CommitBoard>,
        mode: Mode,
        interval: Duration,
        drain_timeout: Duration,
    ) -> Self {
        Committer {
            source,
            ledger,
            metrics,
            board,
            mode,
            interval,
            drain_timeout,
        }
    }

    /// How jobs deliver their records.
    pub fn sink(&self) -> Sink {
        match &self.mode {
            Mode::AtLeastOnce(p) => Sink::Acks(p.clone()),
            Mode::ExactlyOnce(t) => Sink::Transactions(t.clone()),
        }
    }

    /// The transactions, exactly once.
    pub fn transactions(&self) -> Option<&Arc<Transactions>> {
        match &self.mode {
            Mode::ExactlyOnce(t) => Some(t),
            Mode::AtLeastOnce(_) => None,
        }
    }

    /// How often the engine ticks. Exactly once, a transaction is due
    /// `transaction_interval` after it opened, and a tick of that same period
    /// would find it a hair short and commit only at the next one (every record
    /// would wait up to twice the interval); ticking at a quarter of it bounds
    /// the overshoot.
    pub fn tick_every(&self) -> Duration {
        match &self.mode {
            Mode::AtLeastOnce(_) => self.interval,
            Mode::ExactlyOnce(_) => (self.interval / 4).max(Duration::from_millis(1)),
        }
    }

    /// The engine's tick. At least once: commits the watermarks that moved,
    /// without waiting. Exactly once: hands over what became ready and, when a
    /// commit is due, returns it for the engine to run beside its loop.
    pub fn tick(self: &Arc<Self>) -> Option<BoxFuture<'static, Settled>> {
        match &self.mode {
            Mode::AtLeastOnce(_) => {
                let positions: Vec<(i32, i64)> = self
                    .ledger
                    .to_commit()
                    .iter()
                    .map(|p| (p.partition, p.watermark))
                    .collect();
                if !positions.is_empty() {
                    self.source.commit(&positions);
                }
                None
            }
            Mode::ExactlyOnce(txn) => {
                txn.pump_now();
                if !txn.due() {
                    return None;
                }
                let txn = txn.clone();
                Some(Box::pin(async move { txn.commit().await }))
            }
        }
    }

    /// At least once: the broker confirmed these positions.
    pub fn committed(&self, positions: &[(i32, i64)]) {
        let topic = self.source.topic();
        for (p, o) in positions {
            self.ledger.committed(*p, *o);
            self.board.post(topic, *p, *o);
        }
        self.report_positions();
    }

    fn report_positions(&self) {
        let topic = self.source.topic();
        for p in self.ledger.positions() {
            self.metrics.set_commit(
                topic,
                p.partition,
                p.committed.unwrap_or(p.watermark),
                p.gap,
            );
        }
    }

    /// Exactly once: partitions an abort or a rebuild rewound since the last
    /// call (the engine drops their queued jobs and held heads).
    pub fn take_rewound(&self) -> Vec<i32> {
        self.transactions()
            .map(|t| t.take_rewound())
            .unwrap_or_default()
    }

    /// Why the engine must stop, once it must.
    pub fn stopped(&self) -> Option<String> {
        self.transactions().and_then(|t| t.stopped())
    }

    /// Not ready while the transactional producer is being rebuilt.
    pub fn ready(&self) -> Result<(), String> {
        match self.transactions() {
            Some(t) if t.rebuilding() => Err(format!(
                "the transactional producer `{}` is being rebuilt",
                t.id()
            )),
            _ => Ok(()),
        }
    }

    /// Partitions are taken away: their running work is finished (or abandoned
    /// after the drain timeout) and committed, then they are let go.
    pub async fn revoke(&self, partitions: &[i32]) {
        if partitions.is_empty() {
            return;
        }
        let deadline = self.drain_timeout;
        let committed = match &self.mode {
            Mode::AtLeastOnce(_) => {
                let positions = self.ledger.revoke(partitions, deadline, deadline).await;
                self.commit_now(&positions).await
            }
            Mode::ExactlyOnce(txn) => {
                // Finish what runs, commit it in a transaction with its
                // positions (fenced by this generation), then let go.
                let abandoned = self.ledger.freeze(partitions, deadline).await;
                if abandoned > 0 {
                    tracing::warn!(
                        abandoned,
                        "revocation deadline passed; unfinished work will be redone by the next owner"
                    );
                }
                let mut settled = txn.commit().await;
                // An abort or a rebuild leaves finished work of the other
                // partitions buffered: commit again, a few times at most.
                #[cfg(feature = "mutations")]
                let rounds = if crate::mutation::on("revoke_keeps_open_records") {
                    0
                } else {
                    REVOKE_ROUNDS
                };
                #[cfg(not(feature = "mutations"))]
                let rounds = REVOKE_ROUNDS;
                for _ in 0..rounds {
                    if !txn.holds(partitions) || matches!(settled, Settled::Stopped(_)) {
                        break;
                    }
                    settled = txn.commit().await;
                }
                self.ledger
                    .revoke(partitions, Duration::ZERO, Duration::ZERO)
                    .await;
                txn.forget(partitions);
                match settled {
                    Settled::Committed(p) => p,
                    _ => Vec::new(),
                }
            }
        };
        for p in partitions {
            self.metrics.forget_partition(self.source.topic(), *p);
        }
        tracing::info!(?partitions, committed = ?committed, "partitions revoked");
    }

    /// At least once: commits `positions` that moved and waits for the broker;
    /// returns what it committed.
    async fn commit_now(&self, positions: &[Position]) -> Vec<(i32, i64)> {
        let todo: Vec<(i32, i64)> = positions
            .iter()
            .filter(|p| p.committed.is_none_or(|c| p.watermark > c))
            .map(|p| (p.partition, p.watermark))
            .collect();
        if todo.is_empty() {
            return todo;
        }
        match self.source.commit_sync(&todo).await {
            Ok(()) => {
                let topic = self.source.topic();
                for (p, o) in &todo {
                    self.ledger.committed(*p, *o);
                    self.board.post(topic, *p, *o);
                }
                todo
            }
            Err(e) => {
                // Typically the group expelled this member (a broker outage longer
                // than the session timeout): its commits are refused, and the
                // partitions' next owner repeats the work since the last commit.
                tracing::warn!(error = %e, positions = ?todo, "commit refused; work since the last commit will be repeated");
                Vec::new()
            }
        }
    }

    /// Shutdown: waits for in-flight work until `deadline`, stops what did not
    /// finish (its partitions are marked revoked first, so nothing more can
    /// publish or finish into a commit; it is redone after a restart), and
    /// commits for the last time.
    pub async fn finish(&self, dispatcher: &mut Dispatcher, deadline: Instant) {
        let unfinished = dispatcher.drain(deadline).await;
        let positions = if unfinished > 0 {
            tracing::warn!(
                abandoned = unfinished,
                "shutdown deadline passed; unfinished requests will be redone after restart"
            );
            self.ledger.revoke_all()
        } else {
            Vec::new()
        };
        dispatcher.abort_tasks().await;
        match &self.mode {
            Mode::ExactlyOnce(txn) => {
                let settled = txn.commit().await;
                tracing::info!(?settled, "final transaction");
            }
            Mode::AtLeastOnce(_) => {
                let positions = if unfinished > 0 {
                    positions
                } else {
                    self.ledger.positions()
                };
                let committed = self.commit_now(&positions).await;
                tracing::info!(?committed, "final commit");
                self.report_positions();
            }
        }
    }
}
