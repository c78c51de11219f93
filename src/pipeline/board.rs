//! The commit board: which offsets of paysync's own consumed topics are
//! committed, for follow mode's gate. A re-check is taken only once the record
//! that scheduled it is committed in its group: until then that record can be
//! redone (after a crash or a rebalance), see a newer status and end the chain
//! while this re-check carries it on, and the chain would end twice.
//!
//! Engines in this process post their own commits; a partition owned elsewhere
//! is asked of the broker (through the [`Source`] of its group), at most every
//! [`ASK_EVERY`] per partition, in a task of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::follow::Position;
use super::source::Source;
use crate::clock::Instant;

/// How often one partition's committed offset is asked of the broker at most.
pub const ASK_EVERY: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Known {
    /// The committed position (next offset to read), if known.
    committed: Option<i64>,
    /// When the broker was last asked.
    asked: Option<Instant>,
    /// An ask is under way.
    asking: bool,
}

/// Committed positions of the topics paysync consumes, by topic and partition.
#[derive(Default)]
pub struct CommitBoard {
    known: Mutex<HashMap<(String, i32), Known>>,
    /// The source of each topic's group (weak: sources live with their engines).
    sources: Mutex<HashMap<String, Weak<dyn Source>>>,
}

impl std::fmt::Debug for CommitBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitBoard").finish_non_exhaustive()
    }
}

impl CommitBoard {
    /// An empty board.
    pub fn new() -> Arc<Self> {
        Arc::new(CommitBoard::default())
    }

    /// The source whose group commits `topic` (to ask for partitions owned elsewhere).
    pub fn register(&self, source: &Arc<dyn Source>) {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(source.topic().to_string(), Arc::downgrade(source));
    }

    /// A commit of `topic`/`partition` up to `committed` (the next offset to read).
    pub fn post(&self, topic: &str, partition: i32, committed: i64) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let k = known.entry((topic.to_owned(), partition)).or_default();
        k.committed = Some(k.committed.map_or(committed, |c| c.max(committed)));
    }

    /// True when the record at `at` is committed in its group (it will not be
    /// redone). Otherwise the broker is asked (at most every [`ASK_EVERY`]), and
    /// the caller looks again later.
    pub fn is_committed(self: &Arc<Self>, at: &Position) -> bool {
        let key = (at.topic.clone(), at.partition);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let k = known.entry(key.clone()).or_default();
        if k.committed.is_some_and(|c| at.offset < c) {
            return true;
        }
        if k.asking
            || k.asked
                .is_some_and(|t| Instant::now().saturating_duration_since(t) < ASK_EVERY)
        {
            return false;
        }
        let source = self
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&at.topic)
            .and_then(Weak::upgrade);
        let Some(source) = source else {
            // Not a topic this process consumes: nothing to wait for.
            return true;
        };
        k.asking = true;
        k.asked = Some(Instant::now());
        drop(known);
        let board = self.clone();
        tokio::spawn(async move {
            let committed = match source.committed(&[key.1]).await {
                Ok(list) => list.first().map(|(_, o)| *o),
                Err(e) => {
                    tracing::warn!(topic = %key.0, partition = key.1, error = %e, "asking for a committed offset failed");
                    None
                }
            };
            let mut known = board.known.lock().unwrap_or_else(|p| p.into_inner());
            let k = known.entry(key).or_default();
            k.asking = false;
            if let Some(c) = committed {
                k.committed = Some(k.committed.map_or(c, |old| old.max(c)));
            }
        });
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: i64) -> Position {
        Position {
            topic: "in".into(),
            partition: 3,
            offset,
        }
    }

    #[tokio::test]
    async fn commits_only_move_forward() {
        let board = CommitBoard::new();
        board.post("in", 3, 10);
        board.post("in", 3, 5); // an older commit never moves it back
        assert!(board.is_committed(&at(9)));
        let known = board.known.lock().unwrap();
        assert_eq!(known[&("in".to_owned(), 3)].committed, Some(10));
    }

    #[tokio::test]
    async fn an_unknown_topic_is_not_waited_for() {
        let board = CommitBoard::new();
        assert!(board.is_committed(&at(1)), "not consumed here");
    }
}
