//! Integration tests, one binary: connector HTTP behaviour against a local mock
//! server, and the pipeline end to end against a Kafka-protocol broker.

mod connector_http;
mod connectors;
mod container;
mod e2e;
mod engine;
mod exactly_once;
mod follow;
mod hang;
mod http_client;
mod intake;
mod logs;
mod ops;
mod poison;
mod registry;
mod resilience;
mod support;
mod webhooks;
