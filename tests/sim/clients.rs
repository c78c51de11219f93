//! The fake clients of one member, over the in-memory cluster: its consumer
//! of one topic (paysync's `Source`), its transactional producer
//! (`TxnProducer`) and its idempotent producer (`Produce`). Each call can be
//! made to fail as the seed's fault schedule says; a dead member's calls never
//! answer (kill -9 at any await point).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use paysync::clock::Instant;
use paysync::pipeline::process::record_size;
use paysync::pipeline::publish::{Produce, ProduceError};
use paysync::pipeline::record::{Destination, Incoming, Outgoing};
use paysync::pipeline::source::{Source, SourceEvent};
use paysync::pipeline::txn::{RecordTag, Refusal, Role, SendError, TxnError, TxnProducer};
use tokio::sync::Notify;

use crate::cluster::{Cluster, Note, Read, Rec, TxnState};
use crate::faults::Faults;

/// What every client of one member shares.
#[derive(Clone)]
pub struct Env {
    /// `x-request-id`s of events whose refusal was injected.
    pub refused: Arc<Mutex<std::collections::BTreeSet<String>>>,
    pub cluster: Cluster,
    pub faults: Arc<Faults>,
    pub dead: Arc<AtomicBool>,
    pub events_topic: String,
    pub dlq_topic: String,
}

impl Env {
    fn dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    /// A network round trip: a few virtual milliseconds.
    async fn round_trip(&self) {
        let ms = 1 + self.faults.range(0..4);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// A transaction coordinator's answer: it writes markers or offsets
    /// first, so it takes longer and varies more.
    async fn coordinator(&self) {
        let ms = 2 + self.faults.range(0..40);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Never answers once the member died.
    async fn alive(&self) {
        if self.dead() {
            std::future::pending::<()>().await;
        }
    }

    fn rec(out: &Outgoing) -> Rec {
        Rec {
            key: out.key.clone(),
            value: out.value.clone(),
            headers: out.headers.clone(),
        }
    }

    fn topic_of(&self, out: &Outgoing) -> String {
        match &out.destination {
            Destination::Events => self.events_topic.clone(),
            Destination::DeadLetters => self.dlq_topic.clone(),
            Destination::Recheck(t) => t.to_string(),
        }
    }

    /// An injected refusal of `out`: remembered by its request id, so the
    /// model knows a dead letter of its request was caused, not a bug.
    fn refuse(&self, out: &Outgoing) {
        if let Some((_, Some(v))) = out.headers.iter().find(|(k, _)| k == b"x-request-id") {
            self.refused
                .lock()
                .unwrap()
                .insert(String::from_utf8_lossy(v).into_owned());
        }
    }

    fn too_large(&self, out: &Outgoing) -> bool {
        record_size(out.key.as_deref(), out.value.as_deref(), &out.headers)
            > self.cluster.lock().max_record_bytes
    }
}

struct SourceState {
    member: Option<u64>,
    generation: u64,
    positions: BTreeMap<i32, i64>,
    /// Partitions the engine was asked to revoke and has not released yet.
    revoking: std::collections::BTreeSet<i32>,
    /// Assigned partitions whose committed position an open transaction may
    /// still move: reading starts once it is stable.
    unstable: std::collections::BTreeSet<i32>,
    events: Vec<SourceEvent>,
}

/// One member's consumer of one topic, in one group.
pub struct SimSource {
    env: Env,
    topic: Arc<str>,
    group: String,
    recheck: bool,
    state: Mutex<SourceState>,
    wake: Arc<Notify>,
}

impl SimSource {
    pub fn new(env: Env, topic: &str, group: &str, recheck: bool) -> Arc<Self> {
        let source = Arc::new(SimSource {
            env,
            topic: Arc::from(topic),
            group: group.to_owned(),
            recheck,
            state: Mutex::new(SourceState {
                member: None,
                generation: 0,
                positions: BTreeMap::new(),
                revoking: std::collections::BTreeSet::new(),
                unstable: std::collections::BTreeSet::new(),
                events: Vec::new(),
            }),
            wake: Arc::new(Notify::new()),
        });
        let member = source.env.cluster.join(group, topic);
        source.state.lock().unwrap().member = Some(member);
        source
    }

    pub fn member(&self) -> Option<u64> {
        self.state.lock().unwrap().member
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Wakes the engine (the cluster changed).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    fn generation(&self) -> (u64, u64) {
        let s = self.state.lock().unwrap();
        (s.member.unwrap_or(0), s.generation)
    }
}

impl Source for SimSource {
    fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    fn poll(&self) -> Vec<SourceEvent> {
        if self.env.dead() {
            return Vec::new();
        }
        let Some(member) = self.member() else {
            return Vec::new();
        };
        let notes = self.env.cluster.take_notes(member);
        let mut s = self.state.lock().unwrap();
        let mut out = std::mem::take(&mut s.events);
        for note in notes {
            match note {
                // A stale assignment (the group moved on since) is not applied.
                Note::Assigned(generation, _) if generation <= s.generation => {}
                Note::Assigned(generation, parts) => {
                    s.generation = generation;
                    let committed = self.env.cluster.committed(&self.group);
                    s.positions = parts
                        .iter()
                        .map(|p| (*p, committed.get(p).copied().unwrap_or(0)))
                        .collect();
                    s.unstable = parts.iter().copied().collect();
                    out.push(SourceEvent::Assigned(parts));
                }
                // What it owns and was not already asked to revoke (a session
                // timeout during a rebalance asks twice).
                Note::Revoking(parts) => {
                    let parts: Vec<i32> = parts
                        .into_iter()
                        .filter(|p| s.positions.contains_key(p) && !s.revoking.contains(p))
                        .collect();
                    if !parts.is_empty() {
                        s.revoking.extend(parts.iter().copied());
                        out.push(SourceEvent::Revoking(parts));
                    }
                }
            }
        }
        out
    }

    fn read(&self, partition: i32) -> Option<Incoming> {
        if self.env.dead() {
            return None;
        }
        {
            let mut s = self.state.lock().unwrap();
            if s.unstable.contains(&partition) {
                if self.env.cluster.unstable(&self.group, partition) {
                    return None;
                }
                s.unstable.remove(&partition);
                let committed = self.env.cluster.committed(&self.group);
                s.positions
                    .insert(partition, committed.get(&partition).copied().unwrap_or(0));
            }
        }
        let position = *self.state.lock().unwrap().positions.get(&partition)?;
        match self
            .env
            .cluster
            .read_committed(&self.topic, partition, position)
        {
            Read::Record(offset, rec) => {
                self.state
                    .lock()
                    .unwrap()
                    .positions
                    .insert(partition, offset + 1);
                Some(Incoming {
                    topic: self.topic.clone(),
                    partition,
                    offset,
                    key: rec.key,
                    value: rec.value,
                    headers: rec.headers,
                    received: Instant::now(),
                    recheck: self.recheck,
                })
            }
            Read::Nothing(next) => {
                self.state.lock().unwrap().positions.insert(partition, next);
                None
            }
        }
    }

    fn release(&self, partitions: &[i32]) {
        if self.env.dead() {
            return;
        }
        let member = {
            let mut s = self.state.lock().unwrap();
            for p in partitions {
                s.positions.remove(p);
                s.revoking.remove(p);
            }
            s.member
        };
        if let Some(member) = member {
            if let Some(id) = self.env.cluster.released(&self.group, member) {
                self.state.lock().unwrap().member = Some(id);
            }
        }
    }

    fn seek(&self, partition: i32, offset: i64) {
        self.env
            .cluster
            .trace(format!("seek {}:{partition} to {offset}", self.topic));
        let mut s = self.state.lock().unwrap();
        if s.positions.contains_key(&partition) {
            s.positions.insert(partition, offset);
        }
    }

    fn commit(&self, positions: &[(i32, i64)]) {
        if self.env.dead() {
            return;
        }
        if self
            .env
            .faults
            .draw("consumer.commit", 0.5, &[("refused", 1.0)])
            .is_some()
        {
            return;
        }
        let (member, generation) = self.generation();
        if self
            .env
            .cluster
            .commit_offsets(&self.group, member, generation, positions)
            .is_ok()
        {
            self.state
                .lock()
                .unwrap()
                .events
                .push(SourceEvent::Committed(positions.to_vec()));
            self.wake.notify_one();
        }
    }

    fn commit_sync<'a>(&'a self, positions: &'a [(i32, i64)]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.env.alive().await;
            self.env.round_trip().await;
            self.env.alive().await;
            if self
                .env
                .faults
                .draw("consumer.commit", 0.5, &[("refused", 1.0)])
                .is_some()
            {
                return Err("REBALANCE_IN_PROGRESS (injected)".into());
            }
            let (member, generation) = self.generation();
            self.env
                .cluster
                .commit_offsets(&self.group, member, generation, positions)
        })
    }

    fn committed<'a>(
        &'a self,
        partitions: &'a [i32],
    ) -> BoxFuture<'a, Result<Vec<(i32, i64)>, String>> {
        Box::pin(async move {
            self.env.alive().await;
            self.env.round_trip().await;
            if self
                .env
                .faults
                .draw("consumer.committed", 1.0, &[("unavailable", 1.0)])
                .is_some()
            {
                return Err("COORDINATOR_LOAD_IN_PROGRESS (injected)".into());
            }
            // A read_committed consumer asks for stable positions (KIP-447).
            if partitions
                .iter()
                .any(|p| self.env.cluster.unstable(&self.group, *p))
            {
                return Err("UNSTABLE_OFFSET_COMMIT".into());
            }
            let committed = self.env.cluster.committed(&self.group);
            Ok(partitions
                .iter()
                .filter_map(|p| committed.get(p).map(|o| (*p, *o)))
                .collect())
        })
    }

    fn watermarks(&self, partition: i32) -> BoxFuture<'_, Result<(i64, i64), String>> {
        let end = self.env.cluster.end(&self.topic, partition);
        Box::pin(async move { Ok((0, end)) })
    }

    fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    fn assigned(&self) -> Vec<i32> {
        self.state
            .lock()
            .unwrap()
            .positions
            .keys()
            .copied()
            .collect()
    }

    fn joined(&self) -> bool {
        self.state.lock().unwrap().generation > 0
    }
}

/// One engine's transactional producer.
pub struct SimTxnProducer {
    env: Env,
    id: String,
    /// The input topic of its engine (what its records answer).
    input: String,
    source: Arc<SimSource>,
    epoch: Mutex<u32>,
    /// The transaction `begin` opened, until it is committed or aborted.
    current: Mutex<Option<u64>>,
    /// The client's queue is full until then (it drains as records are
    /// delivered).
    full_until: Mutex<Option<Instant>>,
    refusals: Mutex<Vec<Refusal>>,
}

impl SimTxnProducer {
    pub fn new(env: Env, id: &str, input: &str, source: Arc<SimSource>) -> Self {
        let epoch = env.cluster.init_producer(id);
        SimTxnProducer {
            env,
            id: id.to_owned(),
            input: input.to_owned(),
            source,
            epoch: Mutex::new(epoch),
            current: Mutex::new(None),
            full_until: Mutex::new(None),
            refusals: Mutex::new(Vec::new()),
        }
    }

    fn epoch(&self) -> u32 {
        *self.epoch.lock().unwrap()
    }

    /// The transaction `begin` opened; fenced when the coordinator moved on.
    fn txn(&self) -> Result<u64, TxnError> {
        self.current
            .lock()
            .unwrap()
            .ok_or_else(|| TxnError::Fenced("PRODUCER_FENCED: no transaction".into()))
    }

    /// Another producer took the id: the coordinator bumps the epoch (and
    /// aborts what was open).
    fn fence(&self) -> TxnError {
        self.env.cluster.init_producer(&self.id);
        TxnError::Fenced("PRODUCER_FENCED (injected)".into())
    }
}

impl TxnProducer for SimTxnProducer {
    fn id(&self) -> &str {
        &self.id
    }

    fn begin(&self) -> Result<(), TxnError> {
        if self.env.dead() {
            return Err(TxnError::Fatal("dead".into()));
        }
        // Local: a producer the coordinator fenced finds out at its next
        // broker call.
        let txn = self.env.cluster.txn_for(&self.id, self.epoch()).ok();
        self.env
            .cluster
            .trace(format!("begin {} txn {txn:?}", self.id));
        *self.current.lock().unwrap() = txn;
        Ok(())
    }

    fn send(&self, out: &Outgoing, tag: RecordTag) -> Result<(), SendError> {
        if self.env.dead() {
            return Err(SendError::Fatal("dead".into()));
        }
        if self.env.too_large(out) {
            return Err(SendError::Refused {
                reason: "MSG_SIZE_TOO_LARGE".into(),
                too_large: true,
            });
        }
        if self
            .full_until
            .lock()
            .unwrap()
            .is_some_and(|until| Instant::now() < until)
        {
            return Err(SendError::QueueFull);
        }
        match self.env.faults.draw(
            "txn.send",
            0.3,
            &[
                ("queue_full", 4.0),
                ("refused_too_large", 1.0),
                ("refused_unknown_topic", 1.0),
                ("refused_not_authorized", 0.5),
                ("fatal", 0.5),
            ],
        ) {
            Some("queue_full") => {
                let drains = Duration::from_millis(self.env.faults.range(5..300));
                *self.full_until.lock().unwrap() = Some(Instant::now() + drains);
                return Err(SendError::QueueFull);
            }
            // The client's own size check (its framing differs from paysync's
            // estimate at the margin).
            Some("refused_too_large") => {
                self.env.refuse(out);
                return Err(SendError::Refused {
                    reason: "MSG_SIZE_TOO_LARGE (injected)".into(),
                    too_large: true,
                });
            }
            Some("refused_unknown_topic") => {
                self.env.refuse(out);
                return Err(SendError::Refused {
                    reason: "UNKNOWN_TOPIC_OR_PART (injected)".into(),
                    too_large: false,
                });
            }
            Some("refused_not_authorized") => {
                self.env.refuse(out);
                return Err(SendError::Refused {
                    reason: "TOPIC_AUTHORIZATION_FAILED (injected)".into(),
                    too_large: false,
                });
            }
            Some(_) => return Err(SendError::Fatal("fatal error (injected)".into())),
            None => {}
        }
        let txn = match self.txn() {
            Ok(t) => t,
            // Fenced: queued locally; the commit will say so.
            Err(_) => return Ok(()),
        };
        if self.env.cluster.txn_state(txn) != TxnState::Open {
            // Aborted by the coordinator meanwhile: the commit will say so.
            return Ok(());
        }
        let topic = self.env.topic_of(out);
        self.env.cluster.trace(format!(
            "send {} txn {txn} answers {}:{} {:?}",
            self.id, tag.partition, tag.offset, tag.role
        ));
        if let Err(e) = self.env.cluster.append_txn(
            txn,
            &topic,
            Env::rec(out),
            (self.input.clone(), tag.partition, tag.offset),
        ) {
            return Err(SendError::Fatal(e));
        }
        // The broker refuses it after the fact: a policy, or a topic whose
        // max.message.bytes is below the producer's.
        let scale = if tag.role == Role::Event { 0.1 } else { 1.0 };
        if let Some(fault) = self.env.faults.draw(
            "txn.delivery",
            scale,
            &[("refused", 1.0), ("refused_too_large", 1.0)],
        ) {
            self.env.cluster.fail_txn(txn);
            self.env.refuse(out);
            let too_large = fault == "refused_too_large";
            self.refusals.lock().unwrap().push(Refusal {
                tag,
                reason: if too_large {
                    "MSG_SIZE_TOO_LARGE (injected)".into()
                } else {
                    "POLICY_VIOLATION (injected)".into()
                },
                too_large,
            });
        }
        Ok(())
    }

    fn send_offsets<'a>(
        &'a self,
        positions: &'a [(i32, i64)],
    ) -> BoxFuture<'a, Result<(), TxnError>> {
        Box::pin(async move {
            self.env.alive().await;
            self.env.coordinator().await;
            self.env.alive().await;
            let fault = self.env.faults.draw(
                "txn.send_offsets",
                1.0,
                &[("timeout", 2.0), ("abortable", 1.0), ("fenced", 0.3)],
            );
            if fault == Some("fenced") {
                return Err(self.fence());
            }
            if fault == Some("abortable") {
                return Err(TxnError::Abortable(
                    "COORDINATOR_NOT_AVAILABLE (injected)".into(),
                ));
            }
            let txn = self.txn()?;
            if self.env.cluster.txn_state(txn) != TxnState::Open
                || !self.env.cluster.current(&self.id, self.epoch())
            {
                return Err(TxnError::Fenced("PRODUCER_FENCED".into()));
            }
            let (member, generation) = self.source.generation();
            let landed = self
                .env
                .cluster
                .txn_offsets(txn, self.source.group(), member, generation, positions)
                .map_err(TxnError::Abortable);
            if fault == Some("timeout") {
                // Landed or not, the answer was lost.
                return Err(TxnError::Retriable("timed out (injected)".into()));
            }
            landed
        })
    }

    fn commit(&self) -> BoxFuture<'_, Result<(), TxnError>> {
        Box::pin(async move {
            self.env.alive().await;
            self.env.coordinator().await;
            self.env.alive().await;
            let fault = self.env.faults.draw(
                "txn.commit",
                1.0,
                &[
                    ("timeout_not_landed", 2.0),
                    ("timeout_landed", 2.0),
                    ("abortable", 1.0),
                    ("fatal_landed", 1.0),
                    ("fatal_not_landed", 1.0),
                    ("fenced", 0.3),
                    ("hang", 0.3),
                ],
            );
            if fault == Some("hang") {
                // Longer than the transaction timeout: the coordinator aborts it
                // and bumps the epoch meanwhile.
                tokio::time::sleep(self.env.cluster.txn_timeout + Duration::from_secs(2)).await;
                self.env.alive().await;
                return Err(TxnError::Retriable(
                    "timed out after 30 s (injected)".into(),
                ));
            }
            if fault == Some("fenced") {
                return Err(self.fence());
            }
            let txn = self.txn()?;
            match self.env.cluster.txn_state(txn) {
                // Landed before (its answer was lost): a retry learns it.
                TxnState::Committed => {
                    *self.current.lock().unwrap() = None;
                    return Ok(());
                }
                // The coordinator aborted it (a timeout, a fence).
                TxnState::Aborted => return Err(TxnError::Fenced("PRODUCER_FENCED".into())),
                TxnState::Open => {}
            }
            if !self.env.cluster.current(&self.id, self.epoch()) {
                return Err(TxnError::Fenced("PRODUCER_FENCED".into()));
            }
            let landed = matches!(fault, Some("timeout_landed" | "fatal_landed") | None);
            let result = if landed {
                self.env
                    .cluster
                    .commit_txn(txn)
                    .map_err(TxnError::Abortable)
            } else {
                Ok(())
            };
            if landed && result.is_ok() && fault.is_none() {
                *self.current.lock().unwrap() = None;
            }
            match fault {
                Some("timeout_not_landed" | "timeout_landed") => {
                    Err(TxnError::Retriable("timed out (injected)".into()))
                }
                Some("abortable") => Err(TxnError::Abortable("injected".into())),
                Some("fatal_landed" | "fatal_not_landed") => {
                    Err(TxnError::Fatal("broker connection lost (injected)".into()))
                }
                _ => result,
            }
        })
    }

    fn abort(&self) -> BoxFuture<'_, Result<(), TxnError>> {
        Box::pin(async move {
            self.env.alive().await;
            self.env.round_trip().await;
            self.env.alive().await;
            match self
                .env
                .faults
                .draw("txn.abort", 0.3, &[("timeout", 2.0), ("fatal", 1.0)])
            {
                Some("timeout") => return Err(TxnError::Retriable("timed out (injected)".into())),
                Some(_) => return Err(TxnError::Fatal("fatal (injected)".into())),
                None => {}
            }
            if !self.env.cluster.current(&self.id, self.epoch()) {
                return Err(TxnError::Fenced("PRODUCER_FENCED".into()));
            }
            if let Some(txn) = self.current.lock().unwrap().take() {
                self.env.cluster.abort(txn, "aborted by the producer");
            }
            Ok(())
        })
    }

    fn rebuild(&self) -> BoxFuture<'_, Result<(), TxnError>> {
        Box::pin(async move {
            self.env.alive().await;
            self.env.round_trip().await;
            self.env.alive().await;
            if self
                .env
                .faults
                .draw("txn.rebuild", 0.5, &[("fail", 1.0)])
                .is_some()
            {
                return Err(TxnError::Fatal("cannot connect (injected)".into()));
            }
            *self.epoch.lock().unwrap() = self.env.cluster.init_producer(&self.id);
            *self.current.lock().unwrap() = None;
            self.refusals.lock().unwrap().clear();
            Ok(())
        })
    }

    fn take_refusals(&self) -> Vec<Refusal> {
        std::mem::take(&mut *self.refusals.lock().unwrap())
    }
}

/// One member's idempotent producer (at least once).
pub struct SimProducer {
    env: Env,
    fatal: AtomicBool,
}

impl SimProducer {
    pub fn new(env: Env) -> Self {
        SimProducer {
            env,
            fatal: AtomicBool::new(false),
        }
    }
}

impl Produce for SimProducer {
    fn produce<'a>(
        &'a self,
        topic: &'a str,
        out: &'a Outgoing,
    ) -> BoxFuture<'a, Result<(), ProduceError>> {
        Box::pin(async move {
            self.env.cluster.trace(format!(
                "produce {topic} {}",
                out.headers
                    .iter()
                    .find(|(k, _)| k == b"x-request-id" || k == b"paysync-source-offset")
                    .and_then(|(_, v)| v.as_deref())
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
            ));
            self.env.alive().await;
            self.env.round_trip().await;
            self.env.alive().await;
            if self.fatal.load(Ordering::Relaxed) {
                return Err(ProduceError::Fatal("fatal error".into()));
            }
            if self.env.too_large(out) {
                return Err(ProduceError::Permanent {
                    reason: "MSG_SIZE_TOO_LARGE".into(),
                    too_large: true,
                });
            }
            let fault = self.env.faults.draw(
                "produce",
                0.3,
                &[
                    ("retriable_not_landed", 3.0),
                    ("retriable_landed", 3.0),
                    ("refused_too_large", 1.0),
                    ("refused_not_authorized", 0.5),
                    ("refused_unknown_topic", 1.0),
                    ("fatal", 0.2),
                ],
            );
            match fault {
                // A topic whose max.message.bytes is below the producer's.
                Some("refused_too_large") => {
                    self.env.refuse(out);
                    return Err(ProduceError::Permanent {
                        reason: "MSG_SIZE_TOO_LARGE (injected)".into(),
                        too_large: true,
                    });
                }
                Some("retriable_not_landed") => {
                    return Err(ProduceError::Retriable(
                        "REQUEST_TIMED_OUT (injected)".into(),
                    ))
                }
                Some("refused_not_authorized") => {
                    self.env.refuse(out);
                    return Err(ProduceError::Permanent {
                        reason: "TOPIC_AUTHORIZATION_FAILED (injected)".into(),
                        too_large: false,
                    });
                }
                Some("refused_unknown_topic") => {
                    self.env.refuse(out);
                    return Err(ProduceError::Permanent {
                        reason: "UNKNOWN_TOPIC_OR_PART (injected)".into(),
                        too_large: false,
                    });
                }
                Some("fatal") => {
                    self.fatal.store(true, Ordering::Relaxed);
                    return Err(ProduceError::Fatal("fatal error (injected)".into()));
                }
                _ => {}
            }
            let partition = self.env.cluster.partition_for(topic, out.key.as_deref());
            self.env.cluster.append(topic, partition, Env::rec(out));
            if fault == Some("retriable_landed") {
                return Err(ProduceError::Retriable(
                    "REQUEST_TIMED_OUT (injected)".into(),
                ));
            }
            Ok(())
        })
    }
}
