//! The processing engine's logic, free of Kafka types: which offsets may be
//! committed ([`tracker`]), which request may start now and which must wait
//! ([`scheduler`]), the per-partition state shared with in-flight tasks and the
//! rebalance callback ([`ledger`]), and what one message turns into ([`process`]).
//! `kafka::engine` drives these with a real consumer and producer.

pub mod ledger;
pub mod process;
pub mod scheduler;
pub mod tracker;
