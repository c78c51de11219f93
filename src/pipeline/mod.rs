//! The processing engine's logic, free of Kafka types: which offsets may be
//! committed ([`tracker`]), which request may start now and which must wait
//! ([`scheduler`]), the per-partition state shared with in-flight tasks and the
//! rebalance callback ([`ledger`]), what one message turns into ([`process`]), and
//! which dead letters a redrive sends ([`letters`]).
//! `kafka::engine` drives these with a real consumer and producer.

pub mod dispatch;
#[cfg(test)]
pub(crate) mod fakes;
pub mod follow;
pub mod ledger;
pub mod letters;
pub mod process;
pub mod scheduler;
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
