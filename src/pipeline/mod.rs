//! The processing engine, free of Kafka types: the [`engine`] loop over a
//! consumer [`source`], reading its partitions ([`queues`]) into the job life
//! cycle ([`dispatch`]: which request may start now and which must wait,
//! [`scheduler`]), the per-partition state shared with in-flight tasks and
//! revocation ([`ledger`], its watermarks: [`tracker`]), what one message turns
//! into ([`process`], over the shared [`record`] types), how records and
//! positions reach the broker for either guarantee ([`committer`]: at least once
//! through [`publish`], exactly once through [`txn`]), follow mode's chains
//! ([`follow`]) and commit gate ([`board`]), and which dead letters a redrive
//! sends ([`letters`]). `kafka` implements the source and the producers on
//! rdkafka; the deterministic simulation implements them in memory.

pub mod board;
pub mod committer;
pub mod dispatch;
pub mod engine;
#[cfg(test)]
pub(crate) mod fakes;
pub mod follow;
pub mod ledger;
pub mod letters;
pub mod process;
pub mod publish;
pub mod queues;
pub mod record;
pub mod scheduler;
pub mod source;
pub mod tracker;
pub mod txn;

/// What the producer needs from the engine to publish for one partition: whether
/// the partition is still owned (so nothing is published after a handover), and
/// a place to say that the partition is stopped. The Kafka module sees only this.
pub trait PublishGate: Send + Sync {
    /// A publish is starting; false when the partition is no longer owned.
    fn begin(&self) -> bool;
    /// The publish `begin` allowed has ended.
    fn end(&self);
    /// The partition is stopped (`Some(reason)`) or running again (`None`).
    fn stalled(&self, reason: Option<String>);
    /// The partition (for logs).
    fn partition(&self) -> i32;
}
