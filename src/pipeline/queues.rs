//! Reading the assigned partitions: round robin, each while the dispatcher has
//! room for it. A partition that is not read fills up to the client's prefetch
//! bound and is then not fetched (rdkafka: `queued.min.messages` /
//! `queued.max.messages.kbytes` per partition), so flow control never pauses a
//! partition and nothing is discarded and refetched: offsets reach the engine
//! contiguously and in order.
//!
//! A re-check engine holds the head of each partition until it is due (its
//! `paysync-follow-due` header) and reads nothing past it meanwhile: records in
//! one re-check topic share one delay, so a partition's records come due in
//! order. At least once, a due head also waits for the record that scheduled it
//! to be committed in its group (the [`Gate`]; exactly once needs no gate: a
//! `read_committed` consumer sees a re-check only once the transaction that
//! scheduled it committed), for at most `processing.recheck_gate_timeout`.

use std::sync::Arc;
use std::time::Duration;

use super::board::CommitBoard;
use super::dispatch::{Arrived, Dispatcher};
use super::follow;
use super::record::Incoming;
use super::source::Source;
use crate::clock::now_ms;
use crate::telemetry::Metrics;

/// Records read from one partition before the next partition's turn.
const READ_BATCH: usize = 64;

/// How often a held re-check whose scheduling record is not yet committed is
/// looked at again, ms.
const GATE_POLL_MS: i64 = 50;

/// At least once: a due re-check waits for the record that scheduled it to be
/// committed (see [`CommitBoard`]), at most `timeout` past its due time.
pub struct Gate {
    /// Commits of the topics this process consumes.
    pub board: Arc<CommitBoard>,
    /// `processing.recheck_gate_timeout`.
    pub timeout: Duration,
}

/// One assigned partition.
struct Slot {
    partition: i32,
    /// Re-check engines: the partition's head, read but not yet due, with its due
    /// time (ms since the epoch). Nothing past it is read until it is taken.
    held: Option<(Incoming, i64)>,
}

/// The assigned partitions of one engine.
pub struct Queues {
    topic: Arc<str>,
    recheck: bool,
    slots: Vec<Slot>,
    /// Round-robin start, so no partition is always first.
    rotate: usize,
    /// Re-check engines: when the earliest held head comes due (ms since the epoch).
    next_due: Option<i64>,
    /// At-least-once re-check engines: the commit gate.
    gate: Option<Gate>,
    metrics: Arc<Metrics>,
}

impl Queues {
    /// Queues of `topic` (a re-check topic when `recheck`), with the gate of an
    /// at-least-once re-check engine.
    pub fn new(topic: &str, recheck: bool, metrics: Arc<Metrics>, gate: Option<Gate>) -> Self {
        Queues {
            metrics,
            topic: Arc::from(topic),
            recheck,
            slots: Vec::new(),
            rotate: 0,
            next_due: None,
            gate,
        }
    }

    /// When the earliest held head comes due, if one is held.
    pub fn next_due(&self) -> Option<i64> {
        self.next_due
    }

    /// The offset of a partition's held head (pending re-checks start there).
    pub fn held_offset(&self, partition: i32) -> Option<i64> {
        self.slots
            .iter()
            .find(|s| s.partition == partition)
            .and_then(|s| s.held.as_ref().map(|(m, _)| m.offset))
    }

    /// A partition was assigned (again: anything held for it goes).
    pub fn add(&mut self, partition: i32) {
        self.slots.retain(|s| s.partition != partition);
        self.slots.push(Slot {
            partition,
            held: None,
        });
    }

    /// A revoked partition goes.
    pub fn remove(&mut self, partition: i32) {
        self.slots.retain(|s| s.partition != partition);
    }

    /// A rewound partition is fetched again: its held head goes.
    pub fn drop_held(&mut self, partition: i32) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.partition == partition) {
            s.held = None;
        }
    }

    /// Reads records the dispatcher has room for, round robin, and hands them to
    /// it. Returns whether it stopped with records left that could be taken now
    /// (batch limit), and the seeks the dispatcher asked for (gaps).
    pub fn read(
        &mut self,
        source: &dyn Source,
        dispatcher: &mut Dispatcher,
    ) -> (bool, Vec<(i32, i64)>) {
        self.next_due = None;
        let mut seeks = Vec::new();
        if self.slots.is_empty() || dispatcher.saturated() {
            return (false, seeks);
        }
        let count = self.slots.len();
        self.rotate = (self.rotate + 1) % count;
        let first = self.rotate;
        let mut more = false;
        for i in (0..count).map(|i| (first + i) % count) {
            let p = self.slots[i].partition;
            if !dispatcher.readable(p) {
                continue;
            }
            // A re-check partition's head that may not be taken yet holds the partition.
            if let Some((incoming, due)) = &self.slots[i].held {
                let due = *due;
                if let Some(wait) = self.wait_until(incoming, due) {
                    self.note_due(wait);
                    continue;
                }
                if let Some((incoming, due)) = self.slots[i].held.take() {
                    self.take_due(dispatcher, incoming, due, &mut seeks);
                }
            }
            let mut taken = 0;
            loop {
                if !dispatcher.readable(p) {
                    break;
                }
                if taken == READ_BATCH {
                    more = true;
                    break;
                }
                let Some(incoming) = source.read(p) else {
                    break;
                };
                taken += 1;
                if self.recheck {
                    let due = follow::due_ms(&incoming.headers).unwrap_or(0);
                    if let Some(wait) = self.wait_until(&incoming, due) {
                        self.slots[i].held = Some((incoming, due));
                        self.note_due(wait);
                        break;
                    }
                    self.take_due(dispatcher, incoming, due, &mut seeks);
                } else if let Arrived::Seek(to) = dispatcher.on_record(incoming) {
                    seeks.push((p, to));
                    break;
                }
            }
            if dispatcher.saturated() {
                break;
            }
        }
        (more, seeks)
    }

    /// When a re-check record may be taken, if not now: not before it is due,
    /// and (at least once) not before the record that scheduled it is committed
    /// in its group, looked at again every [`GATE_POLL_MS`], for at most the
    /// gate's timeout past the due time.
    fn wait_until(&self, incoming: &Incoming, due: i64) -> Option<i64> {
        let now = now_ms();
        if due > now {
            return Some(due);
        }
        let gate = self.gate.as_ref()?;
        let by = follow::scheduled_by(&incoming.headers)?;
        if gate.board.is_committed(&by) {
            return None;
        }
        let limit = i64::try_from(gate.timeout.as_millis()).unwrap_or(i64::MAX);
        if now.saturating_sub(due) >= limit {
            self.metrics.recheck_gate_timeout(&self.topic);
            tracing::warn!(
                partition = incoming.partition,
                offset = incoming.offset,
                scheduled_by = %format!("{}:{}:{}", by.topic, by.partition, by.offset),
                waited_s = gate.timeout.as_secs(),
                "the record that scheduled this re-check is still not committed; taking the re-check anyway (processing.recheck_gate_timeout)"
            );
            return None;
        }
        Some(now.saturating_add(GATE_POLL_MS))
    }

    fn note_due(&mut self, due_ms: i64) {
        self.next_due = Some(self.next_due.map_or(due_ms, |d| d.min(due_ms)));
    }

    /// A re-check whose due time has come: how late it is taken is measured.
    fn take_due(
        &self,
        dispatcher: &mut Dispatcher,
        incoming: Incoming,
        due_ms: i64,
        seeks: &mut Vec<(i32, i64)>,
    ) {
        if due_ms > 0 {
            let late = u64::try_from(now_ms().saturating_sub(due_ms)).unwrap_or(0);
            self.metrics
                .recheck_lateness(&self.topic, Duration::from_millis(late));
        }
        let p = incoming.partition;
        if let Arrived::Seek(to) = dispatcher.on_record(incoming) {
            seeks.push((p, to));
        }
    }
}
