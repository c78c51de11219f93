//! Fakes of the Kafka seams for broker-free unit tests: a transactional
//! producer that records what it is asked and fails as scripted, and a source
//! that records seeks and answers committed positions.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::sync::Notify;

use super::record::{Incoming, Outgoing};
use super::source::{Source, SourceEvent};
use super::txn::{RecordTag, Refusal, SendError, TxnError, TxnProducer};

/// A producer that records what it is asked and fails as scripted.
#[derive(Default)]
pub struct FakeProducer {
    pub log: Mutex<Vec<String>>,
    /// Results of the next commits (Ok when empty).
    pub commits: Mutex<Vec<Result<(), TxnError>>>,
    /// Results of the next sends (Ok when empty).
    pub sends: Mutex<Vec<Result<(), SendError>>>,
    /// Results of the next rebuilds (Ok when empty).
    pub rebuilds: Mutex<Vec<Result<(), TxnError>>>,
    pub refusals: Mutex<Vec<Refusal>>,
    /// Records in the open transaction (cleared on commit/abort).
    pub open: Mutex<Vec<RecordTag>>,
    /// Records of committed transactions, in order.
    pub committed: Mutex<Vec<RecordTag>>,
    /// Positions of the open transaction.
    pub offsets: Mutex<Vec<(i32, i64)>>,
    /// Positions of committed transactions.
    pub positions: Mutex<Vec<Vec<(i32, i64)>>>,
}

fn next<T>(script: &Mutex<Vec<Result<(), T>>>) -> Result<(), T> {
    let mut s = script.lock().unwrap();
    if s.is_empty() {
        Ok(())
    } else {
        s.remove(0)
    }
}

impl TxnProducer for FakeProducer {
    fn id(&self) -> &str {
        "fake"
    }
    fn begin(&self) -> Result<(), TxnError> {
        self.log.lock().unwrap().push("begin".into());
        Ok(())
    }
    fn send(&self, _out: &Outgoing, tag: RecordTag) -> Result<(), SendError> {
        next(&self.sends)?;
        self.open.lock().unwrap().push(tag);
        Ok(())
    }
    fn send_offsets<'a>(
        &'a self,
        positions: &'a [(i32, i64)],
    ) -> BoxFuture<'a, Result<(), TxnError>> {
        self.log.lock().unwrap().push("offsets".into());
        self.offsets.lock().unwrap().extend_from_slice(positions);
        Box::pin(async { Ok(()) })
    }
    fn commit(&self) -> BoxFuture<'_, Result<(), TxnError>> {
        self.log.lock().unwrap().push("commit".into());
        let result = next(&self.commits);
        if result.is_ok() {
            let mut open = self.open.lock().unwrap();
            self.committed.lock().unwrap().append(&mut open);
            let offsets = std::mem::take(&mut *self.offsets.lock().unwrap());
            self.positions.lock().unwrap().push(offsets);
        }
        Box::pin(async move { result })
    }
    fn abort(&self) -> BoxFuture<'_, Result<(), TxnError>> {
        self.log.lock().unwrap().push("abort".into());
        self.open.lock().unwrap().clear();
        self.offsets.lock().unwrap().clear();
        Box::pin(async { Ok(()) })
    }
    fn rebuild(&self) -> BoxFuture<'_, Result<(), TxnError>> {
        self.log.lock().unwrap().push("rebuild".into());
        let result = next(&self.rebuilds);
        if result.is_ok() {
            self.open.lock().unwrap().clear();
            self.offsets.lock().unwrap().clear();
        }
        Box::pin(async move { result })
    }
    fn take_refusals(&self) -> Vec<Refusal> {
        std::mem::take(&mut *self.refusals.lock().unwrap())
    }
}

impl FakeProducer {
    /// How many times `call` was made.
    pub fn calls(&self, call: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == call)
            .count()
    }
}

/// A source that records seeks and answers committed positions (failing the
/// first `fail_committed` asks).
pub struct FakeSource {
    pub topic: Arc<str>,
    pub seeks: Mutex<Vec<(i32, i64)>>,
    pub committed: Mutex<Vec<(i32, i64)>>,
    pub fail_committed: Mutex<usize>,
    pub asked: Mutex<usize>,
}

impl Default for FakeSource {
    fn default() -> Self {
        FakeSource {
            topic: Arc::from("in"),
            seeks: Mutex::default(),
            committed: Mutex::default(),
            fail_committed: Mutex::default(),
            asked: Mutex::default(),
        }
    }
}

impl Source for FakeSource {
    fn topic(&self) -> &Arc<str> {
        &self.topic
    }
    fn poll(&self) -> Vec<SourceEvent> {
        Vec::new()
    }
    fn read(&self, _partition: i32) -> Option<Incoming> {
        None
    }
    fn release(&self, _partitions: &[i32]) {}
    fn seek(&self, partition: i32, offset: i64) {
        self.seeks.lock().unwrap().push((partition, offset));
    }
    fn commit(&self, _positions: &[(i32, i64)]) {}
    fn commit_sync<'a>(
        &'a self,
        _positions: &'a [(i32, i64)],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn committed<'a>(
        &'a self,
        partitions: &'a [i32],
    ) -> BoxFuture<'a, Result<Vec<(i32, i64)>, String>> {
        *self.asked.lock().unwrap() += 1;
        let mut fail = self.fail_committed.lock().unwrap();
        let result = if *fail > 0 {
            *fail -= 1;
            Err("the coordinator is loading".to_owned())
        } else {
            Ok(self
                .committed
                .lock()
                .unwrap()
                .iter()
                .filter(|(p, _)| partitions.contains(p))
                .copied()
                .collect())
        };
        Box::pin(async move { result })
    }
    fn watermarks(&self, _partition: i32) -> BoxFuture<'_, Result<(i64, i64), String>> {
        Box::pin(async { Ok((0, 0)) })
    }
    fn wake(&self) -> Arc<Notify> {
        Arc::new(Notify::new())
    }
    fn assigned(&self) -> Vec<i32> {
        Vec::new()
    }
    fn joined(&self) -> bool {
        true
    }
}
