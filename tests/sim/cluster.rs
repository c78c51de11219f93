//! An in-memory Kafka cluster, as the delivery core sees one: partition logs
//! with transactional records and their markers, `read_committed` visibility
//! (the last stable offset, aborted records skipped), consumer groups with
//! generations, assignments and committed positions, and a transaction
//! coordinator with producer epochs (fencing), transaction timeouts and
//! offsets that commit with their transaction only while the member's
//! generation is current (KIP-447).
//!
//! It behaves like Apache Kafka where the guarantees depend on it; the
//! conformance test (`tests/it/conformance.rs`) runs the same scripts against
//! this and a real broker and compares what a `read_committed` reader sees.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use paysync::clock::Instant;
use paysync::pipeline::record::RecordHeader;
use tokio::sync::Notify;

/// A record as the log stores it.
#[derive(Debug, Clone)]
pub struct Rec {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<RecordHeader>,
}

/// One log entry: a record (maybe of a transaction), or a transaction marker.
#[derive(Debug, Clone)]
pub enum Entry {
    Record { rec: Rec, txn: Option<u64> },
    Marker,
}

/// A transaction's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnState {
    Open,
    Committed,
    Aborted,
}

/// What a transaction holds.
#[derive(Debug, Clone)]
pub struct Txn {
    pub id: String,
    pub state: TxnState,
    pub opened: Instant,
    /// Partitions it wrote to.
    pub written: BTreeSet<(String, i32)>,
    /// Offsets it commits: (group, topic, partition) -> position.
    pub offsets: BTreeMap<(String, String, i32), i64>,
    /// Inputs its records answer: (input topic, partition, offset).
    pub answers: Vec<(String, i32, i64)>,
    /// A record of it failed delivery: it can only abort.
    pub failed: bool,
}

/// A consumer group.
#[derive(Debug, Default)]
pub struct Group {
    pub topic: String,
    pub generation: u64,
    /// Live members, by member id, with what each owns in this generation.
    pub members: BTreeMap<u64, Vec<i32>>,
    /// Members asked to revoke whose release is awaited.
    pub revoking: BTreeSet<u64>,
    /// A rebalance is under way (revocations awaited).
    pub rebalancing: bool,
    pub committed: BTreeMap<i32, i64>,
}

/// What a member's source hears from its group.
#[derive(Debug, Clone)]
pub enum Note {
    Assigned(u64, Vec<i32>),
    Revoking(Vec<i32>),
}

/// A member's mailbox.
#[derive(Default)]
pub struct Mailbox {
    pub notes: Vec<Note>,
}

pub struct Inner {
    pub topics: BTreeMap<String, Vec<Vec<Entry>>>,
    pub txns: Vec<Txn>,
    /// Transactional id -> (epoch, open transaction).
    pub producers: BTreeMap<String, (u32, Option<u64>)>,
    pub groups: BTreeMap<String, Group>,
    pub mailboxes: BTreeMap<u64, Mailbox>,
    /// Members a group expelled that have not found out yet.
    pub lost: BTreeSet<(String, u64)>,
    pub next_member: u64,
    /// Record size limit (`message.max.bytes`).
    pub max_record_bytes: usize,
    /// What the model flags: a transaction that committed offsets its records
    /// do not match, and the like.
    pub violations: Vec<String>,
    /// The trace of broker-side happenings (for replay comparisons).
    pub trace: Vec<String>,
}

impl Inner {
    /// A line of the trace (printed as it happens when PAYSYNC_SIM_LIVE is set).
    pub fn note(&mut self, line: String) {
        if std::env::var_os("PAYSYNC_SIM_LIVE").is_some() {
            tracing::info!(target: "sim", "{line}");
        }
        self.trace.push(line);
    }
}

/// The cluster, shared by every fake client.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Mutex<Inner>>,
    /// Woken when anything is appended or a note is sent.
    pub changed: Arc<Notify>,
    pub txn_timeout: Duration,
}

impl Cluster {
    pub fn new(max_record_bytes: usize, txn_timeout: Duration) -> Self {
        Cluster {
            inner: Arc::new(Mutex::new(Inner {
                topics: BTreeMap::new(),
                txns: Vec::new(),
                producers: BTreeMap::new(),
                groups: BTreeMap::new(),
                mailboxes: BTreeMap::new(),
                lost: BTreeSet::new(),
                next_member: 1,
                max_record_bytes,
                violations: Vec::new(),
                trace: Vec::new(),
            })),
            changed: Arc::new(Notify::new()),
            txn_timeout,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn create_topic(&self, name: &str, partitions: usize) {
        self.lock()
            .topics
            .insert(name.to_owned(), vec![Vec::new(); partitions]);
    }

    pub fn partitions(&self, topic: &str) -> usize {
        self.lock().topics.get(topic).map_or(0, Vec::len)
    }

    pub fn trace(&self, line: String) {
        self.lock().note(line);
    }

    /// Appends a plain (non-transactional) record; its offset.
    pub fn append(&self, topic: &str, partition: i32, rec: Rec) -> Option<i64> {
        let offset = {
            let mut inner = self.lock();
            let log = inner.topics.get_mut(topic)?.get_mut(partition as usize)?;
            log.push(Entry::Record { rec, txn: None });
            let o = log.len() as i64 - 1;
            inner.note(format!("append {topic}:{partition}:{o}"));
            o
        };
        self.changed.notify_waiters();
        Some(offset)
    }

    /// The partition a key goes to (a stable hash, like a default partitioner).
    pub fn partition_for(&self, topic: &str, key: Option<&[u8]>) -> i32 {
        let n = self.partitions(topic).max(1) as u64;
        let h = key.map_or(0, |k| {
            k.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
            })
        });
        (h % n) as i32
    }

    /// The next record a `read_committed` reader at `position` sees, with its
    /// offset, and the position after it; `None` at the last stable offset.
    pub fn read_committed(&self, topic: &str, partition: i32, position: i64) -> Read {
        let inner = self.lock();
        let Some(log) = inner
            .topics
            .get(topic)
            .and_then(|t| t.get(partition as usize))
        else {
            return Read::Nothing(position);
        };
        let mut o = position.max(0);
        while (o as usize) < log.len() {
            match &log[o as usize] {
                Entry::Marker => o += 1,
                Entry::Record { rec, txn: None } => return Read::Record(o, rec.clone()),
                Entry::Record { rec, txn: Some(t) } => match inner.txns[*t as usize].state {
                    TxnState::Open => return Read::Nothing(o),
                    TxnState::Aborted => o += 1,
                    TxnState::Committed => return Read::Record(o, rec.clone()),
                },
            }
        }
        Read::Nothing(o)
    }

    /// Every record a `read_committed` reader of `topic` sees, with its position.
    pub fn committed_records(&self, topic: &str) -> Vec<(i32, i64, Rec)> {
        let parts = self.partitions(topic);
        let mut out = Vec::new();
        for p in 0..parts as i32 {
            let mut o = 0;
            while let Read::Record(at, rec) = self.read_committed(topic, p, o) {
                out.push((p, at, rec));
                o = at + 1;
            }
        }
        out
    }

    /// The log end of a partition.
    pub fn end(&self, topic: &str, partition: i32) -> i64 {
        self.lock()
            .topics
            .get(topic)
            .and_then(|t| t.get(partition as usize))
            .map_or(0, |l| l.len() as i64)
    }

    /// The last stable offset of a partition (first open transaction's record,
    /// or the end).
    pub fn stable_end(&self, topic: &str, partition: i32) -> i64 {
        match self.read_committed_end(topic, partition) {
            Some(o) => o,
            None => self.end(topic, partition),
        }
    }

    fn read_committed_end(&self, topic: &str, partition: i32) -> Option<i64> {
        let inner = self.lock();
        let log = inner.topics.get(topic)?.get(partition as usize)?;
        log.iter().position(|e| {
            matches!(e, Entry::Record { txn: Some(t), .. } if inner.txns[*t as usize].state == TxnState::Open)
        })
        .map(|i| i as i64)
    }

    // ---- transactions ----

    /// `init_transactions`: a new epoch for `id`; its open transaction is aborted.
    pub fn init_producer(&self, id: &str) -> u32 {
        let epoch = {
            let mut inner = self.lock();
            let (epoch, open) = inner.producers.get(id).cloned().unwrap_or((0, None));
            if let Some(t) = open {
                abort_txn(&mut inner, t, "fenced by a new producer");
            }
            inner.producers.insert(id.to_owned(), (epoch + 1, None));
            inner.note(format!("init {id} epoch {}", epoch + 1));
            epoch + 1
        };
        self.changed.notify_waiters();
        epoch
    }

    /// True while `epoch` is `id`'s current one.
    pub fn current(&self, id: &str, epoch: u32) -> bool {
        self.lock()
            .producers
            .get(id)
            .is_some_and(|(e, _)| *e == epoch)
    }

    /// The open transaction of `id` at `epoch`, opened on first use.
    pub fn txn_for(&self, id: &str, epoch: u32) -> Result<u64, String> {
        let mut inner = self.lock();
        let (current, open) = inner.producers.get(id).cloned().unwrap_or((0, None));
        if current != epoch {
            return Err(format!(
                "producer {id} epoch {epoch} fenced (current {current})"
            ));
        }
        if let Some(t) = open {
            return Ok(t);
        }
        let t = inner.txns.len() as u64;
        inner.txns.push(Txn {
            id: id.to_owned(),
            state: TxnState::Open,
            opened: Instant::now(),
            written: BTreeSet::new(),
            offsets: BTreeMap::new(),
            answers: Vec::new(),
            failed: false,
        });
        inner.producers.insert(id.to_owned(), (epoch, Some(t)));
        Ok(t)
    }

    pub fn txn_state(&self, txn: u64) -> TxnState {
        self.lock().txns[txn as usize].state
    }

    /// Appends a transactional record.
    pub fn append_txn(
        &self,
        txn: u64,
        topic: &str,
        rec: Rec,
        answers: (String, i32, i64),
    ) -> Result<(), String> {
        let key = rec.key.clone();
        let partition = self.partition_for(topic, key.as_deref());
        {
            let mut inner = self.lock();
            if inner.txns[txn as usize].state != TxnState::Open {
                return Err("the transaction is not open".into());
            }
            let log = inner
                .topics
                .get_mut(topic)
                .and_then(|t| t.get_mut(partition as usize))
                .ok_or_else(|| format!("unknown topic {topic}"))?;
            log.push(Entry::Record {
                rec,
                txn: Some(txn),
            });
            let t = &mut inner.txns[txn as usize];
            t.written.insert((topic.to_owned(), partition));
            t.answers.push(answers);
        }
        Ok(())
    }

    /// A record of the transaction failed delivery.
    pub fn fail_txn(&self, txn: u64) {
        self.lock().txns[txn as usize].failed = true;
    }

    /// Adds offsets to the transaction, when `member` holds the current
    /// generation of `group` and owns the partitions.
    pub fn txn_offsets(
        &self,
        txn: u64,
        group: &str,
        member: u64,
        generation: u64,
        positions: &[(i32, i64)],
    ) -> Result<(), String> {
        let mut inner = self.lock();
        let Some(g) = inner.groups.get(group) else {
            return Err("unknown group".into());
        };
        if g.generation != generation || !g.members.contains_key(&member) {
            return Err(format!(
                "ILLEGAL_GENERATION: member {member} generation {generation}, group at {}",
                g.generation
            ));
        }
        let owned = &g.members[&member];
        if let Some((p, _)) = positions.iter().find(|(p, _)| !owned.contains(p)) {
            return Err(format!("member {member} does not own partition {p}"));
        }
        let topic = g.topic.clone();
        let t = &mut inner.txns[txn as usize];
        for (p, o) in positions {
            t.offsets.insert((group.to_owned(), topic.clone(), *p), *o);
        }
        Ok(())
    }

    /// Commits the transaction: its records become visible, its offsets
    /// committed. Checks that its records answer inputs below the positions it
    /// commits and at or above the positions committed before.
    pub fn commit_txn(&self, txn: u64) -> Result<(), String> {
        {
            let mut inner = self.lock();
            let state = inner.txns[txn as usize].state;
            match state {
                TxnState::Committed => return Ok(()),
                TxnState::Aborted => return Err("the transaction was aborted".into()),
                TxnState::Open => {}
            }
            if inner.txns[txn as usize].failed {
                return Err("a record of the transaction failed".into());
            }
            let t = inner.txns[txn as usize].clone();
            // The exactly-once core: every answered input lies between the
            // position committed before and the one committed now.
            for (topic, p, o) in &t.answers {
                let Some(((group, _, _), pos)) = t
                    .offsets
                    .iter()
                    .find(|((_, tp, tpart), _)| tp == topic && tpart == p)
                else {
                    inner.violations.push(format!(
                        "transaction {txn} ({}) commits an answer to {topic}:{p}:{o} without that partition's position",
                        t.id
                    ));
                    continue;
                };
                let before = inner
                    .groups
                    .get(group)
                    .and_then(|g| g.committed.get(p).copied())
                    .unwrap_or(0);
                if *o >= *pos || *o < before {
                    inner.violations.push(format!(
                        "transaction {txn} ({}) answers {topic}:{p}:{o} but moves the position from {before} to {pos}",
                        t.id
                    ));
                }
            }
            let mut back = Vec::new();
            for ((group, _, p), o) in &t.offsets {
                if let Some(g) = inner.groups.get_mut(group) {
                    let c = g.committed.entry(*p).or_insert(0);
                    if *o < *c {
                        back.push(format!(
                            "transaction {txn} moves {group}:{p} back from {c} to {o}"
                        ));
                    }
                    *c = *o;
                }
            }
            inner.violations.extend(back);
            inner.txns[txn as usize].state = TxnState::Committed;
            for (topic, p) in &t.written {
                if let Some(log) = inner
                    .topics
                    .get_mut(topic)
                    .and_then(|l| l.get_mut(*p as usize))
                {
                    log.push(Entry::Marker);
                }
            }
            if let Some((_, open)) = inner.producers.get_mut(&t.id) {
                if *open == Some(txn) {
                    *open = None;
                }
            }
            inner.note(format!(
                "commit {} txn {txn}: answers {:?}, offsets {:?}",
                t.id,
                t.answers
                    .iter()
                    .map(|(_, p, o)| (*p, *o))
                    .collect::<Vec<_>>(),
                t.offsets.values().collect::<Vec<_>>()
            ));
        }
        self.changed.notify_waiters();
        Ok(())
    }

    pub fn abort(&self, txn: u64, why: &str) {
        abort_txn(&mut self.lock(), txn, why);
        self.changed.notify_waiters();
    }

    /// The coordinator aborts transactions open longer than the timeout and
    /// bumps their producer's epoch (its next call is fenced).
    pub fn expire_transactions(&self) {
        let now = Instant::now();
        let mut expired = false;
        {
            let mut inner = self.lock();
            let open: Vec<u64> = inner
                .txns
                .iter()
                .enumerate()
                .filter(|(_, t)| {
                    t.state == TxnState::Open
                        && now.saturating_duration_since(t.opened) > self.txn_timeout
                })
                .map(|(i, _)| i as u64)
                .collect();
            for t in open {
                let id = inner.txns[t as usize].id.clone();
                abort_txn(&mut inner, t, "transaction timed out");
                if let Some((epoch, _)) = inner.producers.get_mut(&id) {
                    *epoch += 1;
                }
                expired = true;
            }
        }
        if expired {
            self.changed.notify_waiters();
        }
    }

    // ---- groups ----

    pub fn join(&self, group: &str, topic: &str) -> u64 {
        let member = {
            let mut inner = self.lock();
            let member = inner.next_member;
            inner.next_member += 1;
            inner.mailboxes.insert(member, Mailbox::default());
            let g = inner.groups.entry(group.to_owned()).or_default();
            g.topic = topic.to_owned();
            g.members.insert(member, Vec::new());
            inner.note(format!("join {group} member {member}"));
            member
        };
        self.rebalance(group);
        member
    }

    /// Starts a rebalance: members that own partitions are asked to revoke them;
    /// once all released (or were expelled), partitions are assigned anew.
    pub fn rebalance(&self, group: &str) {
        {
            let mut inner = self.lock();
            let Some(g) = inner.groups.get_mut(group) else {
                return;
            };
            g.rebalancing = true;
            let asks: Vec<(u64, Vec<i32>)> = g
                .members
                .iter()
                .filter(|(m, parts)| !parts.is_empty() && !g.revoking.contains(m))
                .map(|(m, parts)| (*m, parts.clone()))
                .collect();
            for (m, _) in &asks {
                g.revoking.insert(*m);
            }
            for (m, parts) in asks {
                if let Some(mb) = inner.mailboxes.get_mut(&m) {
                    mb.notes.push(Note::Revoking(parts));
                }
            }
            inner.note(format!("rebalance {group}"));
        }
        self.settle(group);
    }

    /// A member let go of what it was asked to revoke. A member the group
    /// expelled finds out now and joins again under a new member id (its
    /// old id fences what it still had under way): that id is returned.
    pub fn released(&self, group: &str, member: u64) -> Option<u64> {
        {
            let mut inner = self.lock();
            if inner.lost.remove(&(group.to_owned(), member)) {
                let id = inner.next_member;
                inner.next_member += 1;
                inner.mailboxes.insert(id, Mailbox::default());
                inner.note(format!("rejoin {group} member {member} as {id}"));
                if let Some(g) = inner.groups.get_mut(group) {
                    g.members.insert(id, Vec::new());
                }
                drop(inner);
                self.rebalance(group);
                return Some(id);
            }
            if let Some(g) = inner.groups.get_mut(group) {
                g.revoking.remove(&member);
                if let Some(parts) = g.members.get_mut(&member) {
                    parts.clear();
                }
            }
        }
        self.settle(group);
        None
    }

    /// A member is expelled (dead, or a session timeout): its partitions are
    /// reassigned without waiting for it.
    pub fn expel(&self, group: &str, member: u64) {
        {
            let mut inner = self.lock();
            if let Some(g) = inner.groups.get_mut(group) {
                g.members.remove(&member);
                g.revoking.remove(&member);
                g.rebalancing = true;
            }
            inner.note(format!("expel {group} member {member}"));
        }
        self.rebalance(group);
    }

    /// A session timeout: the group expels `member` and reassigns its
    /// partitions at once; the member finds out later (a zombie meanwhile,
    /// whose commits are fenced by the group's generation), revokes, and joins
    /// again.
    pub fn lose(&self, group: &str, member: u64) {
        {
            let mut inner = self.lock();
            let Some(g) = inner.groups.get_mut(group) else {
                return;
            };
            // A member that owns nothing just joins again at once.
            if g.members.get(&member).is_none_or(Vec::is_empty) {
                return;
            }
            let Some(parts) = g.members.remove(&member) else {
                return;
            };
            g.revoking.remove(&member);
            inner.lost.insert((group.to_owned(), member));
            if let Some(mb) = inner.mailboxes.get_mut(&member) {
                mb.notes.push(Note::Revoking(parts));
            }
            inner.note(format!("lose {group} member {member}"));
        }
        self.rebalance(group);
    }

    /// True while an open transaction holds offsets of `group` for
    /// `partition`: its committed position is not stable yet, and a
    /// `read_committed` consumer that takes the partition over waits for it
    /// (KIP-447: OffsetFetch with RequireStable).
    pub fn unstable(&self, group: &str, partition: i32) -> bool {
        self.lock().txns.iter().any(|t| {
            t.state == TxnState::Open
                && t.offsets
                    .keys()
                    .any(|(g, _, p)| g == group && *p == partition)
        })
    }

    /// True when a `read_committed` reader at `position` finds a record.
    pub fn has_record_from(&self, topic: &str, partition: i32, position: i64) -> bool {
        matches!(
            self.read_committed(topic, partition, position),
            Read::Record(..)
        )
    }

    /// Transactions still open.
    pub fn open_transactions(&self) -> Vec<String> {
        self.lock()
            .txns
            .iter()
            .enumerate()
            .filter(|(_, t)| t.state == TxnState::Open)
            .map(|(i, t)| format!("{} txn {i}", t.id))
            .collect()
    }

    /// Assigns once no revocation is awaited.
    fn settle(&self, group: &str) {
        {
            let mut inner = self.lock();
            let topic_parts = {
                let Some(g) = inner.groups.get(group) else {
                    return;
                };
                if !g.rebalancing || !g.revoking.is_empty() {
                    return;
                }
                inner.topics.get(&g.topic).map_or(0, Vec::len)
            };
            let Some(g) = inner.groups.get_mut(group) else {
                return;
            };
            g.generation += 1;
            g.rebalancing = false;
            let members: Vec<u64> = g.members.keys().copied().collect();
            for parts in g.members.values_mut() {
                parts.clear();
            }
            if !members.is_empty() {
                for p in 0..topic_parts as i32 {
                    let m = members[p as usize % members.len()];
                    if let Some(parts) = g.members.get_mut(&m) {
                        parts.push(p);
                    }
                }
            }
            let generation = g.generation;
            let assignments: Vec<(u64, Vec<i32>)> =
                g.members.iter().map(|(m, p)| (*m, p.clone())).collect();
            for (m, parts) in assignments {
                if let Some(mb) = inner.mailboxes.get_mut(&m) {
                    mb.notes.push(Note::Assigned(generation, parts));
                }
            }
            inner
                .trace
                .push(format!("assign {group} generation {generation}"));
        }
        self.changed.notify_waiters();
    }

    pub fn take_notes(&self, member: u64) -> Vec<Note> {
        self.lock()
            .mailboxes
            .get_mut(&member)
            .map(|m| std::mem::take(&mut m.notes))
            .unwrap_or_default()
    }

    /// Commits a group's positions for `member` (at least once), when it holds
    /// the current generation and owns the partitions.
    pub fn commit_offsets(
        &self,
        group: &str,
        member: u64,
        generation: u64,
        positions: &[(i32, i64)],
    ) -> Result<(), String> {
        let mut inner = self.lock();
        let Some(g) = inner.groups.get_mut(group) else {
            return Err("unknown group".into());
        };
        if g.generation != generation || !g.members.contains_key(&member) {
            return Err("ILLEGAL_GENERATION".into());
        }
        let owned = g.members[&member].clone();
        if let Some((p, _)) = positions.iter().find(|(p, _)| !owned.contains(p)) {
            return Err(format!("not the owner of partition {p}"));
        }
        let mut back = Vec::new();
        for (p, o) in positions {
            let c = g.committed.entry(*p).or_insert(0);
            if *o < *c {
                back.push(format!("a commit moves {group}:{p} back from {c} to {o}"));
            }
            *c = *o;
        }
        inner.violations.extend(back);
        Ok(())
    }

    pub fn committed(&self, group: &str) -> BTreeMap<i32, i64> {
        self.lock()
            .groups
            .get(group)
            .map(|g| g.committed.clone())
            .unwrap_or_default()
    }

    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }
}

fn abort_txn(inner: &mut Inner, txn: u64, why: &str) {
    let t = &mut inner.txns[txn as usize];
    if t.state != TxnState::Open {
        return;
    }
    t.state = TxnState::Aborted;
    let written = t.written.clone();
    let id = t.id.clone();
    for (topic, p) in &written {
        if let Some(log) = inner
            .topics
            .get_mut(topic)
            .and_then(|l| l.get_mut(*p as usize))
        {
            log.push(Entry::Marker);
        }
    }
    if let Some((_, open)) = inner.producers.get_mut(&id) {
        if *open == Some(txn) {
            *open = None;
        }
    }
    inner.note(format!("abort {id} txn {txn}: {why}"));
}

/// What a reader finds at a position.
#[derive(Debug)]
pub enum Read {
    /// A record at this offset.
    Record(i64, Rec),
    /// Nothing readable now; the position to read from next.
    Nothing(i64),
}
