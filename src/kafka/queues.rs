//! Partition queues: each assigned partition's messages are split into their own
//! librdkafka queue, read round robin while the dispatcher has room for that
//! partition. A queue that is not read fills up to librdkafka's prefetch bound
//! (`queued.min.messages` / `queued.max.messages.kbytes` per partition) and
//! librdkafka then stops fetching it, so flow control never pauses a partition
//! and nothing is discarded and refetched: offsets reach the engine contiguously
//! and in order.
//!
//! A re-check engine holds the head of each partition until it is due (its
//! `paysync-follow-due` header) and reads nothing past it meanwhile: records in
//! one re-check topic share one delay, so a partition's records come due in
//! order. At least once, a due head also waits for the record that scheduled it
//! to be committed in its group (the [`Gate`]; exactly once needs no gate: a
//! `read_committed` consumer sees a re-check only once the transaction that
//! scheduled it committed), for at most `processing.recheck_gate_timeout`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};

use super::commits::CommitBoard;
use super::context::{EngineConsumer, EngineContext};
use crate::pipeline::dispatch::{Arrived, Dispatcher};
use crate::pipeline::follow;
use crate::pipeline::process::{now_ms, Incoming};
use crate::telemetry::Metrics;

/// Messages read from one partition's queue before the next partition's turn.
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

/// One assigned partition's own message queue, split from the consumer queue.
struct Source {
    partition: i32,
    queue: PartitionQueue<EngineContext>,
    /// The queue may hold messages: set by librdkafka when it becomes non-empty,
    /// and by the engine when it stops reading before the queue ran dry.
    ready: Arc<AtomicBool>,
    /// Re-check engines: the partition's head, read but not yet due, with its due
    /// time (ms since the epoch). Nothing past it is read until it is taken.
    held: Option<(Incoming, i64)>,
}

/// The partition queues of one engine.
pub struct Queues {
    topic: Arc<str>,
    recheck: bool,
    sources: Vec<Source>,
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
            sources: Vec::new(),
            rotate: 0,
            next_due: None,
            gate,
        }
    }

    /// The topic.
    pub(super) fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    /// When the earliest held head comes due, if one is held.
    pub(super) fn next_due(&self) -> Option<i64> {
        self.next_due
    }

    /// The offset of a partition's held head (pending re-checks start there).
    pub(super) fn held_offset(&self, partition: i32) -> Option<i64> {
        self.sources
            .iter()
            .find(|s| s.partition == partition)
            .and_then(|s| s.held.as_ref().map(|(m, _)| m.offset))
    }

    /// Splits `partition`'s queue off the consumer queue (at every assignment:
    /// an assignment re-forwards partitions to the consumer queue).
    pub(super) fn split(&mut self, consumer: &Arc<EngineConsumer>, partition: i32) {
        // Dropping an old handle of this partition's queue would switch off the
        // new handle's wake-up callback: drop it first.
        self.sources.retain(|s| s.partition != partition);
        let Some(mut queue) = consumer.split_partition_queue(&self.topic, partition) else {
            tracing::error!(partition, "cannot split the partition queue");
            return;
        };
        let ready = Arc::new(AtomicBool::new(true));
        let wake = consumer.context().wake.clone();
        let flag = ready.clone();
        queue.set_nonempty_callback(move || {
            flag.store(true, Ordering::Release);
            wake.notify_one();
        });
        self.sources.push(Source {
            partition,
            queue,
            ready,
            held: None,
        });
    }

    /// A revoked partition's queue goes.
    pub(super) fn remove(&mut self, partition: i32) {
        self.sources.retain(|s| s.partition != partition);
    }

    /// A rewound partition is fetched again: its held head goes too.
    pub(super) fn drop_held(&mut self, partition: i32) {
        if let Some(s) = self.sources.iter_mut().find(|s| s.partition == partition) {
            s.held = None;
            s.ready.store(true, Ordering::Release);
        }
    }

    /// A backstop for a queue that holds something without having signalled it.
    pub(super) fn mark_all_ready(&self) {
        for source in &self.sources {
            source.ready.store(true, Ordering::Release);
        }
    }

    /// Reads records the dispatcher has room for, round robin, and hands them to
    /// it. Returns whether it stopped with records left that could be taken now
    /// (batch limit), and the seeks the dispatcher asked for (gaps).
    pub(super) fn read(&mut self, dispatcher: &mut Dispatcher) -> (bool, Vec<(i32, i64)>) {
        self.next_due = None;
        let mut seeks = Vec::new();
        if self.sources.is_empty() || dispatcher.saturated() {
            return (false, seeks);
        }
        let count = self.sources.len();
        self.rotate = (self.rotate + 1) % count;
        let first = self.rotate;
        let mut more = false;
        for i in (0..count).map(|i| (first + i) % count) {
            let p = self.sources[i].partition;
            if !dispatcher.readable(p) {
                continue;
            }
            // A re-check partition's head that may not be taken yet holds the partition.
            if let Some((incoming, due)) = &self.sources[i].held {
                let due = *due;
                if let Some(wait) = self.wait_until(incoming, due) {
                    self.note_due(wait);
                    continue;
                }
                if let Some((incoming, due)) = self.sources[i].held.take() {
                    self.take_due(dispatcher, incoming, due, &mut seeks);
                }
                self.sources[i].ready.store(true, Ordering::Release);
            }
            if !self.sources[i].ready.swap(false, Ordering::AcqRel) {
                continue;
            }
            let mut taken = 0;
            loop {
                if !dispatcher.readable(p) {
                    // Stopped before the queue ran dry: read it again later.
                    self.sources[i].ready.store(true, Ordering::Release);
                    break;
                }
                if taken == READ_BATCH {
                    self.sources[i].ready.store(true, Ordering::Release);
                    more = true;
                    break;
                }
                match self.sources[i].queue.poll(Duration::ZERO) {
                    Some(Ok(m)) => {
                        let incoming = incoming(&m, &self.topic, self.recheck);
                        drop(m);
                        taken += 1;
                        if self.recheck {
                            let due = follow::due_ms(&incoming.headers).unwrap_or(0);
                            if let Some(wait) = self.wait_until(&incoming, due) {
                                self.sources[i].held = Some((incoming, due));
                                self.note_due(wait);
                                break;
                            }
                            self.take_due(dispatcher, incoming, due, &mut seeks);
                        } else if let Arrived::Seek(to) = dispatcher.on_record(incoming) {
                            seeks.push((p, to));
                            break;
                        }
                    }
                    Some(Err(e)) => tracing::warn!(partition = p, error = %e, "consume error"),
                    None => break,
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
        Some(now + GATE_POLL_MS)
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

/// A consumed message, detached from the consumer.
pub(super) fn incoming(message: &BorrowedMessage<'_>, topic: &Arc<str>, recheck: bool) -> Incoming {
    // As bytes: rdkafka's own reader panics on a header name that is not UTF-8.
    let headers = message
        .headers()
        .map(super::headers::read)
        .unwrap_or_default();
    Incoming {
        topic: topic.clone(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers,
        received: Instant::now(),
        recheck,
    }
}
