//! Fakes of the Kafka seams for broker-free tests: a transactional producer that
//! records what it is asked and fails as scripted, and a record source that
//! records seeks.

use std::sync::Mutex;

use super::process::Outgoing;
use super::txn::{RecordSource, RecordTag, Refusal, SendError, TxnError, TxnProducer};

/// A producer that records what it is asked and fails as scripted.
#[derive(Default)]
pub struct FakeProducer {
    pub log: Mutex<Vec<String>>,
    /// Results of the next commits (Ok when empty).
    pub commits: Mutex<Vec<Result<(), TxnError>>>,
    pub refusals: Mutex<Vec<Refusal>>,
    /// Records in the open transaction (cleared on commit/abort).
    pub open: Mutex<Vec<RecordTag>>,
    /// Records of committed transactions, in order.
    pub committed: Mutex<Vec<RecordTag>>,
    pub positions: Mutex<Vec<Vec<(i32, i64)>>>,
}

impl TxnProducer for FakeProducer {
    fn begin(&self) -> Result<(), TxnError> {
        self.log.lock().unwrap().push("begin".into());
        Ok(())
    }
    fn send(&self, _out: &Outgoing, tag: RecordTag) -> Result<(), SendError> {
        self.open.lock().unwrap().push(tag);
        Ok(())
    }
    fn commit(&self, positions: &[(i32, i64)]) -> Result<(), TxnError> {
        self.log.lock().unwrap().push("commit".into());
        let next = {
            let mut c = self.commits.lock().unwrap();
            if c.is_empty() {
                Ok(())
            } else {
                c.remove(0)
            }
        };
        if next.is_ok() {
            let mut open = self.open.lock().unwrap();
            self.committed.lock().unwrap().append(&mut open);
            self.positions.lock().unwrap().push(positions.to_vec());
        }
        next
    }
    fn abort(&self) -> Result<(), TxnError> {
        self.log.lock().unwrap().push("abort".into());
        self.open.lock().unwrap().clear();
        Ok(())
    }
    fn rebuild(&self) -> Result<(), TxnError> {
        self.log.lock().unwrap().push("rebuild".into());
        self.open.lock().unwrap().clear();
        Ok(())
    }
    fn take_refusals(&self) -> Vec<Refusal> {
        std::mem::take(&mut *self.refusals.lock().unwrap())
    }
}

#[derive(Default)]
pub struct FakeSource {
    pub seeks: Mutex<Vec<(i32, i64)>>,
    pub committed: Mutex<Vec<(i32, i64)>>,
}

impl RecordSource for FakeSource {
    fn seek(&self, partition: i32, offset: i64) {
        self.seeks.lock().unwrap().push((partition, offset));
    }
    fn committed(&self, partitions: &[i32]) -> Result<Vec<(i32, i64)>, String> {
        Ok(self
            .committed
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| partitions.contains(p))
            .copied()
            .collect())
    }
}
