//! Per-partition state shared by the engine, its in-flight tasks and the
//! rebalance callback: the offset tracker, how many jobs are running and
//! publishing, and whether the partition was revoked. A task may publish only
//! while its partition is still owned under the same *epoch* (assignment
//! generation), so no event is published for a partition after it was handed over.
//!
//! It is a `std::sync::Mutex`, never held across an `.await`, plus a `Notify`
//! that revocation and shutdown wait on (asynchronously, on tokio's clock, so a
//! simulation can run them in virtual time).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::clock::Instant;

use super::tracker::OffsetTracker;

#[derive(Debug)]
struct Part {
    epoch: u64,
    tracker: OffsetTracker,
    running: usize,
    publishing: usize,
    revoked: bool,
    committed: Option<i64>,
    /// Why the partition is stopped (a dead letter the broker refuses), if it is.
    stalled: Option<String>,
    /// When the watermark last moved, or work arrived at an idle partition.
    moved_at: Instant,
    /// The first offset accepted under this epoch: where consumption started, so
    /// where a rewind goes back to when nothing was committed since.
    first: Option<i64>,
}

#[derive(Debug, Default)]
struct Inner {
    parts: HashMap<i32, Part>,
    next_epoch: u64,
}

impl Inner {
    /// The state of `partition`, created under a fresh epoch on first use.
    fn part(&mut self, partition: i32) -> &mut Part {
        let next_epoch = &mut self.next_epoch;
        self.parts.entry(partition).or_insert_with(|| {
            let part = Part {
                epoch: *next_epoch,
                tracker: OffsetTracker::new(),
                running: 0,
                publishing: 0,
                revoked: false,
                committed: None,
                stalled: None,
                moved_at: Instant::now(),
                first: None,
            };
            *next_epoch += 1;
            part
        })
    }
}

/// A ticket identifying a partition ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(pub u64);

/// How a consumed offset fits its partition's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Tracked under this epoch: process it.
    Accepted(Epoch),
    /// Past the next expected offset: offsets in between were not delivered.
    Gap {
        /// The current epoch.
        epoch: Epoch,
        /// The offset that should have come next.
        expected: i64,
    },
    /// Already seen, or the partition is being handed over: skip it.
    Skip,
}

/// Progress of one partition, for commits and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Partition.
    pub partition: i32,
    /// Position to commit (next offset to read).
    pub watermark: i64,
    /// Work finished but not committable yet.
    pub gap: i64,
    /// Last committed position, if known.
    pub committed: Option<i64>,
}

/// Seeks back to the same expected offset before a gap is taken as a real hole in
/// the log (compaction, transaction markers, retention) rather than a client skip.
pub const GAP_SEEKS: u32 = 3;

/// What to do when offsets arrive past the one expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapDecision {
    /// Seek the partition back to this offset and refetch.
    Seek(i64),
    /// Take the gap as a real hole in the log and accept the offset.
    Accept,
}

/// The gap policy, per partition. Offsets must arrive contiguously: a jump would
/// let the watermark pass offsets that were never processed, so the engine seeks
/// back; only a gap still there after [`GAP_SEEKS`] seeks to the same offset is
/// accepted. Pure: the engine performs the seek.
#[derive(Debug, Default)]
pub struct GapPolicy {
    /// Partition -> (expected offset, seeks so far).
    seeks: HashMap<i32, (i64, u32)>,
}

impl GapPolicy {
    /// Offsets arrived past `expected` on `partition`.
    pub fn on_gap(&mut self, partition: i32, expected: i64) -> GapDecision {
        let tries = self.seeks.entry(partition).or_insert((expected, 0));
        if tries.0 != expected {
            *tries = (expected, 0);
        }
        if tries.1 < GAP_SEEKS {
            tries.1 += 1;
            GapDecision::Seek(expected)
        } else {
            GapDecision::Accept
        }
    }

    /// The partition is contiguous again (or gone): forget its seeks.
    pub fn clear(&mut self, partition: i32) {
        self.seeks.remove(&partition);
    }
}

/// Whether a partition is making progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionHealth {
    /// Partition.
    pub partition: i32,
    /// Why it is stopped, if it is.
    pub stalled: Option<String>,
    /// How long its watermark has not moved while work is pending.
    pub stuck_for: Duration,
}

/// The right to publish for one partition ownership: a job's handle on the
/// ledger. The producer sees only this (see `PublishGate`).
#[derive(Debug, Clone)]
pub struct Ticket {
    /// The ledger.
    pub ledger: std::sync::Arc<Ledger>,
    /// Partition.
    pub partition: i32,
    /// Ownership epoch.
    pub epoch: Epoch,
}

impl super::PublishGate for Ticket {
    fn begin(&self) -> bool {
        self.ledger.begin_publish(self.partition, self.epoch)
    }
    fn end(&self) {
        self.ledger.end_publish(self.partition, self.epoch);
    }
    fn stalled(&self, reason: Option<String>) {
        self.ledger.set_stalled(self.partition, self.epoch, reason);
    }
    fn partition(&self) -> i32 {
        self.partition
    }
}

/// The shared per-partition state.
#[derive(Debug, Default)]
pub struct Ledger {
    inner: Mutex<Inner>,
    changed: Notify,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters behind; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current epoch of a partition, creating its state on first use.
    pub fn epoch(&self, partition: i32) -> Epoch {
        Epoch(Inner::part(&mut self.lock(), partition).epoch)
    }

    /// Takes in a consumed offset with one lock: creates the partition's state on
    /// first use, and accepts the offset unless it repeats one already seen or
    /// jumps past the next expected offset (the caller decides about gaps, then
    /// calls [`Ledger::accept`]).
    pub fn arrive(&self, partition: i32, offset: i64) -> Arrival {
        let mut inner = self.lock();
        let part = Inner::part(&mut inner, partition);
        let epoch = Epoch(part.epoch);
        if part.revoked {
            return Arrival::Skip;
        }
        let idle = part.tracker.pending() == 0;
        match part.tracker.next() {
            Some(expected) if offset > expected => Arrival::Gap { epoch, expected },
            _ if part.tracker.push(offset) => {
                if idle {
                    part.moved_at = Instant::now();
                }
                part.first.get_or_insert(offset);
                Arrival::Accepted(epoch)
            }
            _ => Arrival::Skip,
        }
    }

    /// Records an accepted offset. Returns false for a stale epoch or an offset
    /// already seen (a re-delivery within the same ownership), which must be skipped.
    pub fn accept(&self, partition: i32, epoch: Epoch, offset: i64) -> bool {
        let mut inner = self.lock();
        match inner.parts.get_mut(&partition) {
            Some(p) if p.epoch == epoch.0 && !p.revoked => {
                let idle = p.tracker.pending() == 0;
                let pushed = p.tracker.push(offset);
                if pushed && idle {
                    p.moved_at = Instant::now();
                }
                if pushed {
                    p.first.get_or_insert(offset);
                }
                pushed
            }
            _ => false,
        }
    }

    /// A job is starting. False when the partition is gone or revoked: drop the job.
    pub fn start(&self, partition: i32, epoch: Epoch) -> bool {
        let mut inner = self.lock();
        match inner.parts.get_mut(&partition) {
            Some(p) if p.epoch == epoch.0 && !p.revoked => {
                p.running += 1;
                true
            }
            _ => false,
        }
    }

    /// A running job is about to publish. False when the partition was revoked in
    /// the meantime: the job must not publish.
    pub fn begin_publish(&self, partition: i32, epoch: Epoch) -> bool {
        let mut inner = self.lock();
        match inner.parts.get_mut(&partition) {
            Some(p) if p.epoch == epoch.0 && !p.revoked => {
                p.publishing += 1;
                true
            }
            _ => false,
        }
    }

    /// A publish that `begin_publish` allowed has ended (acknowledged or failed).
    pub fn end_publish(&self, partition: i32, epoch: Epoch) {
        let mut inner = self.lock();
        if let Some(p) = inner.parts.get_mut(&partition) {
            if p.epoch == epoch.0 {
                p.publishing = p.publishing.saturating_sub(1);
            }
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    /// A running job ended: `published` when its event or dead letter was
    /// acknowledged (its offset is then done), false when it was abandoned.
    pub fn finish(&self, partition: i32, epoch: Epoch, offset: i64, published: bool) {
        let mut inner = self.lock();
        if let Some(p) = inner.parts.get_mut(&partition) {
            if p.epoch == epoch.0 {
                p.running = p.running.saturating_sub(1);
                if published {
                    let before = p.tracker.watermark();
                    p.tracker.complete(offset);
                    if p.tracker.watermark() != before {
                        p.moved_at = Instant::now();
                    }
                }
            }
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Marks an offset finished without ending its job (exactly once: the
    /// transaction bookkeeping completes offsets as their records are taken in;
    /// the job's guard then ends it with `finish(.., false)`). False for a stale
    /// epoch or a revoked partition: the records must be dropped.
    pub fn complete(&self, partition: i32, epoch: Epoch, offset: i64) -> bool {
        let mut inner = self.lock();
        match inner.parts.get_mut(&partition) {
            Some(p) if p.epoch == epoch.0 && !p.revoked => {
                let before = p.tracker.watermark();
                p.tracker.complete(offset);
                if p.tracker.watermark() != before {
                    p.moved_at = Instant::now();
                }
                true
            }
            _ => false,
        }
    }

    /// True while `partition` is owned under `epoch` (not revoked, not rewound).
    pub fn owns(&self, partition: i32, epoch: Epoch) -> bool {
        self.lock()
            .parts
            .get(&partition)
            .is_some_and(|p| p.epoch == epoch.0 && !p.revoked)
    }

    /// The position a partition's finished work reaches (the next offset to read
    /// past its contiguous finished offsets), revoked or not; `None` before any
    /// offset arrived.
    pub fn watermark(&self, partition: i32) -> Option<i64> {
        self.lock()
            .parts
            .get(&partition)
            .and_then(|p| p.tracker.watermark())
    }

    /// The last position committed for a partition, or where its consumption
    /// started under this epoch when nothing was committed since: what a
    /// rewind goes back to.
    pub fn restart_position(&self, partition: i32) -> Option<i64> {
        self.lock()
            .parts
            .get(&partition)
            .and_then(|p| p.committed.or(p.first))
    }

    /// Exactly once, after an aborted transaction: forgets the partition's
    /// progress since its last commit and starts a new epoch, so that jobs still
    /// running for it can neither finish nor publish. Returns the position to
    /// seek to (see [`Ledger::restart_position`]), or `None` for a partition
    /// not tracked (nothing to rewind).
    pub fn rewind(&self, partition: i32) -> Option<i64> {
        let mut inner = self.lock();
        let old = inner.parts.remove(&partition)?;
        let to = old.committed.or(old.first);
        let part = Inner::part(&mut inner, partition);
        part.committed = old.committed;
        part.revoked = old.revoked;
        drop(inner);
        self.changed.notify_waiters();
        to
    }

    /// Marks partitions revoked (no job may start, finish or publish for them any
    /// more) but keeps their state readable, after waiting up to `deadline` for
    /// their running jobs: exactly once commits their finished work before they
    /// go. Returns how many jobs were still running (abandoned).
    pub async fn freeze(&self, partitions: &[i32], deadline: Duration) -> usize {
        let running = |inner: &Inner| {
            partitions
                .iter()
                .filter_map(|p| inner.parts.get(p))
                .map(|p| p.running)
                .sum::<usize>()
        };
        self.wait_until(deadline_after(deadline), &|inner| running(inner) == 0)
            .await;
        let mut guard = self.lock();
        let abandoned = running(&guard);
        for p in partitions {
            if let Some(part) = guard.parts.get_mut(p) {
                part.revoked = true;
            }
        }
        abandoned
    }

    /// Marks a partition stopped (`Some(reason)`) or running again (`None`), for
    /// the job that owns it under `epoch`.
    pub fn set_stalled(&self, partition: i32, epoch: Epoch, reason: Option<String>) {
        let mut inner = self.lock();
        if let Some(p) = inner.parts.get_mut(&partition) {
            if p.epoch == epoch.0 {
                p.stalled = reason;
            }
        }
    }

    /// True while a partition is stopped by a refused dead letter.
    pub fn is_stalled(&self, partition: i32) -> bool {
        self.lock()
            .parts
            .get(&partition)
            .is_some_and(|p| p.stalled.is_some())
    }

    /// Offsets a partition holds in memory (see [`OffsetTracker::held`]).
    pub fn held(&self, partition: i32) -> usize {
        self.lock()
            .parts
            .get(&partition)
            .map_or(0, |p| p.tracker.held())
    }

    /// True when the engine should not read more of a partition: it is stalled,
    /// or holds `max_held` offsets already (one lock for both questions).
    pub fn held_back(&self, partition: i32, max_held: usize) -> bool {
        self.lock()
            .parts
            .get(&partition)
            .is_some_and(|p| p.stalled.is_some() || p.tracker.held() >= max_held)
    }

    /// The health of every owned partition at `now`: stalled ones with their
    /// reason, and how long each watermark has been stuck with work pending.
    pub fn health(&self, now: Instant) -> Vec<PartitionHealth> {
        let inner = self.lock();
        let mut v: Vec<PartitionHealth> = inner
            .parts
            .iter()
            .filter(|(_, p)| !p.revoked)
            .map(|(partition, p)| PartitionHealth {
                partition: *partition,
                stalled: p.stalled.clone(),
                stuck_for: if p.tracker.pending() > 0 {
                    now.saturating_duration_since(p.moved_at)
                } else {
                    Duration::ZERO
                },
            })
            .collect();
        v.sort_by_key(|h| h.partition);
        v
    }

    /// Marks every partition revoked without waiting (shutdown after its deadline),
    /// so nothing may publish any more, and returns their positions to commit.
    pub fn revoke_all(&self) -> Vec<Position> {
        let positions = self.positions();
        let mut inner = self.lock();
        for p in inner.parts.values_mut() {
            p.revoked = true;
        }
        positions
    }

    /// Positions of every owned partition.
    pub fn positions(&self) -> Vec<Position> {
        let inner = self.lock();
        let mut v: Vec<Position> = inner
            .parts
            .iter()
            .filter(|(_, p)| !p.revoked)
            .filter_map(|(partition, p)| {
                Some(Position {
                    partition: *partition,
                    watermark: p.tracker.watermark()?,
                    gap: p.tracker.gap(),
                    committed: p.committed,
                })
            })
            .collect();
        v.sort_by_key(|p| p.partition);
        v
    }

    /// Positions that moved past the last commit.
    pub fn to_commit(&self) -> Vec<Position> {
        self.positions()
            .into_iter()
            .filter(|p| p.committed.is_none_or(|c| p.watermark > c))
            .collect()
    }

    /// The broker confirmed a commit.
    pub fn committed(&self, partition: i32, offset: i64) {
        let mut inner = self.lock();
        if let Some(p) = inner.parts.get_mut(&partition) {
            if p.committed.is_none_or(|c| offset > c) {
                p.committed = Some(offset);
            }
        }
    }

    /// Hands over `partitions`: waits until their running jobs finish (or
    /// `finish_deadline` passes), then marks them revoked so that abandoned jobs
    /// cannot publish, waits for publishes already under way (up to
    /// `publish_deadline`), and returns the positions to commit before the
    /// partitions move.
    pub async fn revoke(
        &self,
        partitions: &[i32],
        finish_deadline: Duration,
        publish_deadline: Duration,
    ) -> Vec<Position> {
        let owned = |inner: &Inner, f: &(dyn Fn(&Part) -> usize + Sync)| {
            partitions
                .iter()
                .filter_map(|p| inner.parts.get(p))
                .map(f)
                .sum::<usize>()
        };
        self.wait_until(deadline_after(finish_deadline), &|inner| {
            owned(inner, &|p| p.running) == 0
        })
        .await;
        {
            let mut guard = self.lock();
            let abandoned = owned(&guard, &|p| p.running);
            if abandoned > 0 {
                tracing::warn!(
                    abandoned,
                    "revocation deadline passed; unfinished work will be redone by the next owner"
                );
            }
            for p in partitions {
                if let Some(part) = guard.parts.get_mut(p) {
                    part.revoked = true;
                }
            }
        }
        self.wait_until(deadline_after(publish_deadline), &|inner| {
            owned(inner, &|p| p.publishing) == 0
        })
        .await;
        let mut guard = self.lock();
        let mut positions = Vec::new();
        for p in partitions {
            if let Some(part) = guard.parts.remove(p) {
                if let Some(watermark) = part.tracker.watermark() {
                    positions.push(Position {
                        partition: *p,
                        watermark,
                        gap: part.tracker.gap(),
                        committed: part.committed,
                    });
                }
            }
        }
        positions
    }

    /// Waits until `done` holds or `deadline` passes.
    async fn wait_until(&self, deadline: Instant, done: &(dyn Fn(&Inner) -> bool + Sync)) {
        loop {
            // Registered before looking, so a change in between is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.lock()) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }
}

/// `now + wait`, saturating (a deadline from configuration never overflows).
fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn arrivals_are_accepted_in_order_and_gaps_and_repeats_reported() {
        let l = Ledger::new();
        let Arrival::Accepted(e) = l.arrive(0, 10) else {
            panic!("first offset")
        };
        assert_eq!(l.arrive(0, 11), Arrival::Accepted(e));
        assert_eq!(l.arrive(0, 11), Arrival::Skip, "a repeat");
        assert_eq!(
            l.arrive(0, 15),
            Arrival::Gap {
                epoch: e,
                expected: 12
            }
        );
        assert_eq!(
            l.arrive(0, 16),
            Arrival::Gap {
                epoch: e,
                expected: 12
            },
            "a gap is not tracked by arrive"
        );
        assert!(l.accept(0, e, 15), "the caller may accept a real gap");
        assert_eq!(l.arrive(0, 16), Arrival::Accepted(e));
        assert!(matches!(l.arrive(1, 40), Arrival::Accepted(_)));
    }

    #[tokio::test]
    async fn stale_epochs_cannot_accept_start_or_publish() {
        let l = Ledger::new();
        let e = l.epoch(0);
        assert!(l.accept(0, e, 5));
        assert!(!l.accept(0, e, 5), "re-delivery of a tracked offset");
        assert!(l.start(0, e));
        l.revoke(&[0], Duration::ZERO, Duration::ZERO).await;
        assert!(!l.begin_publish(0, e));
        let e2 = l.epoch(0);
        assert_ne!(e, e2);
        assert!(!l.start(0, e));
        assert!(l.accept(0, e2, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn revoke_waits_for_running_work_and_returns_its_position() {
        let l = Arc::new(Ledger::new());
        let e = l.epoch(3);
        for o in 0..3 {
            l.accept(3, e, o);
        }
        l.start(3, e);
        l.start(3, e);
        let worker = {
            let l = l.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert!(l.begin_publish(3, e));
                l.end_publish(3, e);
                l.finish(3, e, 0, true);
                assert!(l.begin_publish(3, e));
                l.end_publish(3, e);
                l.finish(3, e, 1, true);
            })
        };
        let started = Instant::now();
        // Offset 2 was accepted but never started (queued): not waited for.
        let positions = l
            .revoke(&[3], Duration::from_secs(5), Duration::from_secs(5))
            .await;
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(50),
            "woken at once"
        );
        worker.await.unwrap();
        assert_eq!(positions.len(), 1);
        assert_eq!(positions[0].watermark, 2);
        assert!(l.positions().is_empty());
    }

    #[test]
    fn a_gap_is_refetched_three_times_before_it_is_accepted() {
        let mut g = GapPolicy::default();
        for _ in 0..GAP_SEEKS {
            assert_eq!(g.on_gap(0, 10), GapDecision::Seek(10));
        }
        assert_eq!(g.on_gap(0, 10), GapDecision::Accept);
        assert_eq!(g.on_gap(0, 10), GapDecision::Accept, "until cleared");
        // Another partition, and another expected offset, start over.
        assert_eq!(g.on_gap(1, 10), GapDecision::Seek(10));
        assert_eq!(g.on_gap(0, 20), GapDecision::Seek(20));
        g.clear(0);
        assert_eq!(g.on_gap(0, 20), GapDecision::Seek(20));
    }

    #[test]
    fn the_stuck_clock_runs_only_while_work_is_pending() {
        let l = Ledger::new();
        let e = l.epoch(0);
        let later = |d| Instant::now() + Duration::from_secs(d);
        assert_eq!(l.health(later(100))[0].stuck_for, Duration::ZERO, "idle");
        l.accept(0, e, 1);
        l.accept(0, e, 2);
        l.start(0, e);
        assert!(l.health(later(100))[0].stuck_for >= Duration::from_secs(99));
        l.finish(0, e, 2, true); // not the watermark's offset: still stuck
        assert!(l.health(later(100))[0].stuck_for >= Duration::from_secs(99));
        l.finish(0, e, 1, true);
        assert_eq!(l.health(later(100))[0].stuck_for, Duration::ZERO);
        l.set_stalled(0, e, Some("dead letter refused".into()));
        assert!(l.is_stalled(0));
        assert_eq!(
            l.health(Instant::now())[0].stalled.as_deref(),
            Some("dead letter refused")
        );
        l.set_stalled(0, Epoch(e.0 + 99), None);
        assert!(l.is_stalled(0), "only the owning epoch clears it");
        l.set_stalled(0, e, None);
        assert!(!l.is_stalled(0));
    }

    #[tokio::test(start_paused = true)]
    async fn revoke_abandons_work_after_the_deadline() {
        let l = Ledger::new();
        let e = l.epoch(0);
        l.accept(0, e, 10);
        l.accept(0, e, 11);
        l.start(0, e);
        l.start(0, e);
        l.begin_publish(0, e);
        l.end_publish(0, e);
        l.finish(0, e, 11, true);
        let positions = l
            .revoke(&[0], Duration::from_millis(10), Duration::from_millis(10))
            .await;
        assert_eq!(
            positions[0].watermark, 10,
            "10 is unfinished: commit stays before it"
        );
        assert_eq!(positions[0].gap, 2);
    }
}
