//! The consumer as the engine sees it: one topic's partitions of one consumer
//! group, read partition by partition, sought, committed. `kafka::source` is the
//! rdkafka implementation; the deterministic simulation has an in-memory one
//! (rust-arroyo's local backend is the model), so the engine, its partition
//! queues and its commits run without a broker.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::Notify;

use super::record::Incoming;

/// What happened on the consumer since the engine last looked, in order.
#[derive(Debug)]
pub enum SourceEvent {
    /// A record of a partition whose queue was not split off yet.
    Record(Incoming),
    /// Partitions assigned to this member: their records can be read.
    Assigned(Vec<i32>),
    /// Partitions the group takes away: the engine finishes and commits their
    /// work (the committer's `revoke`), then calls [`Source::release`].
    Revoking(Vec<i32>),
    /// Partitions the client already let go of, after the committer's `revoke`
    /// ran inside its own callback (rdkafka): their queued work is dropped.
    Revoked(Vec<i32>),
    /// Asynchronous commits the broker confirmed: (partition, position).
    Committed(Vec<(i32, i64)>),
}

/// One consumer-group member's view of one topic.
pub trait Source: Send + Sync + 'static {
    /// The topic.
    fn topic(&self) -> &Arc<str>;
    /// Serves the consumer (rebalances, commit results, client events) and
    /// returns what happened since the last call.
    fn poll(&self) -> Vec<SourceEvent>;
    /// The next record of an assigned partition, if one is ready now.
    fn read(&self, partition: i32) -> Option<Incoming>;
    /// Partitions announced by [`SourceEvent::Revoking`] are done with.
    fn release(&self, partitions: &[i32]);
    /// Fetch `partition` again from `offset`.
    fn seek(&self, partition: i32, offset: i64);
    /// Commits positions (next offset to read) without waiting; confirmations
    /// come back as [`SourceEvent::Committed`].
    fn commit(&self, positions: &[(i32, i64)]);
    /// Commits positions and waits for the broker's answer.
    fn commit_sync<'a>(&'a self, positions: &'a [(i32, i64)]) -> BoxFuture<'a, Result<(), String>>;
    /// The positions the broker has committed for these partitions in this
    /// member's group.
    fn committed<'a>(
        &'a self,
        partitions: &'a [i32],
    ) -> BoxFuture<'a, Result<Vec<(i32, i64)>, String>>;
    /// A partition's low and high watermarks.
    fn watermarks(&self, partition: i32) -> BoxFuture<'_, Result<(i64, i64), String>>;
    /// Notified when something may be ready to read or serve.
    fn wake(&self) -> Arc<Notify>;
    /// The partitions assigned now.
    fn assigned(&self) -> Vec<i32>;
    /// True once the member joined its group (received an assignment, possibly empty).
    fn joined(&self) -> bool;
    /// A backstop: look at every partition again, whether or not it signalled
    /// that it holds records.
    fn refresh(&self) {}
}
