//! The records the engine moves: a consumed message ([`Incoming`]), the job
//! it becomes ([`PipelineJob`], what it does: [`Work`]), the records a job
//! publishes ([`Outgoing`], where to: [`Destination`]), and the [`Handler`]
//! that turns one into the other (the `Processor` in paysync, fakes in tests).
//! Shared by the dispatcher, the processor and the transactions, and owned by
//! none of them.

use std::borrow::Cow;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::clock::Instant;
use crate::codec::{RejectCode, Rejection};
use crate::connectors::gateway::Gateway;
use crate::connectors::HttpRequest;
use crate::domain::StatusCheckRequest;
use crate::pipeline::follow::{Chain, ChainEnd, Position};
use crate::pipeline::ledger::Epoch;
use crate::pipeline::scheduler::Job;
use crate::telemetry::Outcome;

/// A consumed message, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Source topic.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Kafka key.
    pub key: Option<Vec<u8>>,
    /// Kafka value.
    pub value: Option<Vec<u8>>,
    /// Kafka headers in order, as bytes (names may not be UTF-8, values may be null).
    pub headers: Vec<RecordHeader>,
    /// When it was consumed.
    pub received: Instant,
    /// It comes from a re-check topic (its chain state is in its headers).
    pub recheck: bool,
}

impl Incoming {
    /// Where it sits in Kafka.
    pub fn position(&self) -> Position {
        Position {
            topic: self.topic.to_string(),
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// A Kafka header as bytes: name, and value (null when the producer sent none).
pub type RecordHeader = (Vec<u8>, Option<Vec<u8>>);

/// What a job does.
pub enum Work {
    /// Check the status of a payment.
    Check {
        /// The request.
        request: Box<StatusCheckRequest>,
        /// The prepared connector request.
        http: Box<HttpRequest>,
        /// The connector's gateway.
        connector: Arc<Gateway>,
        /// The follow chain this check belongs to, when followed.
        chain: Option<Chain>,
    },
    /// Dead-letter the message.
    Reject(Rejection),
}

/// One consumed message on its way through the engine.
pub struct PipelineJob {
    /// The message.
    pub incoming: Incoming,
    /// Ownership epoch of its partition.
    pub epoch: Epoch,
    /// Ordering key: connector and transaction id.
    pub key: Option<String>,
    /// What to do.
    pub work: Work,
}

impl Job for PipelineJob {
    fn partition(&self) -> i32 {
        self.incoming.partition
    }
    fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

/// Which output a record goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The event topic.
    Events,
    /// The dead-letter topic.
    DeadLetters,
    /// A re-check topic (follow mode): the chain's next check.
    Recheck(Arc<str>),
}

/// What a record means once the broker has it (for metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Milestone {
    /// A re-check was scheduled for `connector` after `delay_secs`.
    RecheckScheduled {
        /// Connector.
        connector: String,
        /// Delay in seconds.
        delay_secs: u64,
    },
    /// A chain of `connector` ended.
    ChainEnded {
        /// Connector.
        connector: String,
        /// How.
        end: ChainEnd,
    },
}

/// A record to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Where to.
    pub destination: Destination,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Headers, written byte for byte.
    pub headers: Vec<RecordHeader>,
    /// Bounded label: the status or the dead-letter reason.
    pub label: &'static str,
    /// Request outcome for metrics.
    pub outcome: Outcome,
    /// For logs: status or reason, with the message for dead letters.
    pub summary: Cow<'static, str>,
    /// What it means for a follow chain, if anything.
    pub milestone: Option<Milestone>,
}

/// What the dispatcher asks of message processing: the `Processor` in paysync,
/// fakes in tests.
pub trait Handler: Send + Sync + 'static {
    /// Decodes and routes a record (no I/O).
    fn prepare(&self, incoming: Incoming, epoch: Epoch) -> PipelineJob;
    /// Runs a job to the records it publishes, in order.
    fn process<'a>(&'a self, job: &'a PipelineJob) -> BoxFuture<'a, Vec<Outgoing>>;
    /// The dead letter of a record (for an event the broker refuses).
    fn dead_letter(&self, incoming: &Incoming, code: RejectCode, message: &str) -> Outgoing;
    /// Every record of a job was delivered.
    fn done(&self, job: &PipelineJob);
}
