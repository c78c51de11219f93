//! The pure domain model: what a status-check request is, what a payment status is,
//! and what paysync publishes. Nothing here performs I/O or knows about Kafka, HTTP
//! or Avro; the codecs and connectors translate to and from these types.

pub mod event;
pub mod money;
pub mod request;
pub mod status;

pub use event::{
    ConnectorErrorDetails, ErrorInfo, PaymentStatusEvent, RedirectForm, StatusReport,
    UnifiedErrorDetails,
};
pub use money::{currency_exponent, AmountError};
pub use request::{
    AuthenticationType, CaptureMethod, FutureUsage, Money, PaymentExperience, PaymentMethodType,
    StatusCheckRequest, SyncType, TransactionId, TransactionIdError,
};
pub use status::PaymentStatus;
