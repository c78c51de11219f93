//! Bytes to domain and back: status-check requests from JSON or Avro with their
//! Kafka headers, and `PaymentStatusEvent`s to Avro (single-object or Confluent
//! wire format). Pure functions; no I/O.

pub mod avro;
pub mod bounds;
pub mod canonical;
pub mod request;

pub use avro::{EventEncoder, Schemas, WireFormat};
pub use request::{
    decode_request, AcceptedSchemaIds, DecodeOptions, RawHeader, RejectCode, Rejection,
    SourcePosition,
};
