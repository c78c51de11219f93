//! paysync: a Kafka-driven payment status synchronizer.
//!
//! It consumes status-check requests, asks the payment connector (CM.com, Mollie)
//! for each payment's current state, normalizes the answer into the UCS
//! `PaymentStatus` model and publishes an Avro `PaymentStatusEvent`.
//!
//! # Layout
//!
//! A pure core with I/O at the edges:
//!
//! | module | owns | I/O |
//! |---|---|---|
//! | [`domain`] | `PaymentStatus`, `StatusCheckRequest`, `PaymentStatusEvent` | none |
//! | [`codec`] | request decoding (JSON/Avro + headers), Avro event encoding | none |
//! | [`connectors`] | pure translators (`Connector`, one file each: CM.com, Mollie, Stripe) and their registry; authentication schemes (`auth/`, one file each); the one `Gateway` that does their I/O (authorization, retries, circuit breaker, rate limits; `http.rs` is the only HTTP client code) | HTTP |
//! | [`config`] | settings from TOML + environment, validation, secrets | reads files/env at start-up |
//! | [`telemetry`] | Prometheus metrics, tracing | none |
//! | [`clock`] | the clocks the delivery core reads (tokio's, and a wall clock a simulation can fix) | none |
//! | [`pipeline`] | the engine loop over a consumer `Source`, partition queues, offset watermarks, per-key scheduling, the partition ledger, message processing, the job life cycle (`dispatch`), the delivery strategy of each guarantee (`committer`, `publish`, exactly-once bookkeeping `txn`), dead letters for redrive (`letters`) | connector calls |
//! | [`kafka`] | the rdkafka `Source` and its callbacks, the producers (idempotent and transactional), redrive, topics; the only rdkafka code | Kafka |
//! | [`schema_registry`] | Confluent Schema Registry client (event schema id at start-up, accepted request schema ids) | HTTP |
//! | [`server`] | `/metrics`, `/healthz`, `/readyz`, `/readyz/webhooks` | HTTP server |
//! | [`intake`] | the webhook intake: a pure admission step (route, token, limits, signature, buckets, dedupe), bounded connections, optional TLS; requests stored through `kafka` before 200 | HTTP server |
//! | [`supervisor`] | the long-running tasks and helper threads: one `JoinSet`, one cancellation, a failure named and the process stopped | none |
//! | [`app`] | wiring and ordered shutdown | all of the above |
//! | [`demo`] | `paysync demo`, the connector simulator, the local stack for tests and the benchmark | in-process |
// The one exception is `kafka::headers` (FFI for header names that are not UTF-8).
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod app;
pub mod check;
pub mod clock;
pub mod codec;
pub mod config;
pub mod connectors;
pub mod demo;
pub mod domain;
pub mod intake;
pub mod kafka;
#[cfg(feature = "mutations")]
pub mod mutation;
pub mod pipeline;
pub mod schema_registry;
pub mod server;
pub mod supervisor;
pub mod telemetry;
