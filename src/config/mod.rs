//! Settings: one TOML file plus `PAYSYNC_<SECTION>__<KEY>` environment overrides,
//! loaded and validated once at start-up into typed values (`Duration`, `Url`,
//! `SocketAddr`, `SecretString`). The rest of the crate never reads the
//! environment. Every validation error names the key it is about.
//!
//! Three steps, one file each: [`raw`] is the file as written, with every default
//! in one place; [`env`] turns variables into overrides; `validate.rs` checks each
//! section and builds the types below. Connector sections become the gateway's own
//! settings type ([`GatewaySettings`]); each account is parsed by the credential
//! shape of its connector's auth scheme.
//!
//! Secrets (`client_secret`, `api_key`, registry `password`) may be written inline,
//! as `{ env = "VAR" }` or as `{ file = "/path" }`; they are held as
//! [`SecretString`] and print as `********` everywhere.

mod env;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::Figment;
use secrecy::SecretString;
use serde::{Serialize, Serializer};
use url::Url;

pub use crate::connectors::gateway::GatewaySettings;
pub use crate::pipeline::follow::{FollowSettings, PublishMode};
pub use env::ENV_PREFIX;
pub use raw::{SecretSource, DEFAULT_CONNECTOR};

/// Exit code for an invalid configuration.
pub const EXIT_CONFIG: i32 = 2;

const MASK: &str = "********";

/// A configuration problem, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: `{key}`: {message}")]
pub struct ConfigError {
    /// Dotted key path, for example `kafka.brokers`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error about `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

fn ser_opt_secret<S: Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str(MASK),
        None => s.serialize_none(),
    }
}

/// librdkafka properties, passed through verbatim. `Debug` and `Serialize` mask the
/// values of credential properties (see [`is_secret_property`]).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(pub BTreeMap<String, String>);

impl KafkaProperties {
    fn masked(&self) -> BTreeMap<&str, &str> {
        self.0
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    MASK
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect()
    }

    /// The properties in order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.masked().fmt(f)
    }
}

impl Serialize for KafkaProperties {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.masked().serialize(s)
    }
}

/// True for librdkafka properties that hold credentials.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "key.pem",
        "sasl.oauthbearer.config",
        "token",
    ]
    .iter()
    .any(|needle| k.contains(needle))
}

/// Kafka settings.
#[derive(Debug, Clone, Serialize)]
pub struct KafkaSettings {
    /// Bootstrap servers.
    pub brokers: String,
    /// Consumer group.
    pub group_id: String,
    /// Input topic.
    pub input_topic: String,
    /// Output topic.
    pub output_topic: String,
    /// Dead-letter topic.
    pub dead_letter_topic: String,
    /// Re-check topics are `<prefix>.<seconds>s` (default `<input_topic>.recheck`).
    pub recheck_topic_prefix: String,
    /// Transactional ids are `<prefix>-<instance_id>[.<suffix>]` (exactly once;
    /// default prefix: the group id).
    pub transactional_id_prefix: String,
    /// This instance's stable name (default: the host name): its transactional
    /// ids derive from it, so a restarted instance fences its predecessor.
    pub instance_id: String,
    /// How often the commit watermark is committed (at-least-once).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// librdkafka properties for both clients (security settings go here).
    pub common: KafkaProperties,
    /// librdkafka properties for the consumer only.
    pub consumer: KafkaProperties,
    /// librdkafka properties for the producer only.
    pub producer: KafkaProperties,
    /// The producer's `message.max.bytes` (librdkafka's default 1,000,000): dead
    /// letters are cut to fit it.
    pub max_record_bytes: usize,
}

/// Room kept in a dead letter for its key and headers: `processing.max_request_bytes`
/// plus this must fit the producer's `message.max.bytes`, so that any value paysync
/// accepts can be dead-lettered whole.
pub const DEAD_LETTER_RESERVE: usize = 16 * 1024;

/// Schema Registry settings.
#[derive(Debug, Clone, Serialize)]
pub struct RegistrySettings {
    /// Base URL.
    pub url: Url,
    /// Basic-auth user.
    pub username: Option<String>,
    /// Basic-auth password.
    #[serde(serialize_with = "ser_opt_secret")]
    pub password: Option<SecretString>,
    /// Register the event schema at start-up (false: only look it up).
    pub auto_register: bool,
    /// Subject of the event schema (default `<output_topic>-value`).
    pub subject: String,
}

/// Processing engine settings.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessingSettings {
    /// Requests accepted and not yet finished, at most.
    pub max_in_flight: usize,
    /// Requests for one transaction id waiting or running, at most.
    pub max_queued_per_key: usize,
    /// Largest accepted request value.
    pub max_request_bytes: usize,
    /// Confluent schema ids accepted for Avro requests (besides those the registry
    /// has for `<input_topic>-value`).
    pub accepted_schema_ids: Vec<u32>,
    /// Connector for requests that name none.
    pub default_connector: String,
    /// Merchant account for requests that name none.
    pub default_merchant: String,
    /// How long shutdown waits for in-flight work.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// `/readyz` fails when a partition's commit watermark has not moved for this
    /// long while work is pending.
    #[serde(with = "humantime_serde")]
    pub stuck_after: Duration,
    /// Whether a request that says nothing about following is followed.
    pub follow: bool,
    /// At-least-once or exactly-once (Kafka transactions).
    pub guarantee: Guarantee,
    /// Exactly once: how often the open transaction is committed.
    #[serde(with = "humantime_serde")]
    pub transaction_interval: Duration,
    /// Exactly once: records written into the open transaction before it is
    /// committed early (bounds the memory of finished work waiting for a commit).
    pub max_pending_records: usize,
    /// At-least-once follow mode: the longest a due re-check waits for the record
    /// that scheduled it to be committed; past it the re-check runs (logged,
    /// counted).
    #[serde(with = "humantime_serde")]
    pub recheck_gate_timeout: Duration,
    /// How often the broker is asked for re-check topics under the prefix
    /// (schedule changes never orphan a chain).
    #[serde(with = "humantime_serde")]
    pub recheck_discovery_interval: Duration,
}

/// The delivery guarantee (`processing.guarantee`, after Kafka Streams'
/// `processing.guarantee`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Offsets are committed after their output is acknowledged; a crash
    /// repeats work since the last commit (with the same event ids).
    AtLeastOnce,
    /// Output and input offsets commit in one Kafka transaction: a
    /// `read_committed` consumer sees each check's output once.
    ExactlyOnce,
}

/// HTTP server settings.
#[derive(Debug, Clone, Serialize)]
pub struct HttpSettings {
    /// Listen address for /metrics, /healthz, /readyz.
    pub listen: SocketAddr,
}

/// Which secret-bearing event fields are published.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EventSettings {
    /// Echo `metadata`.
    pub include_metadata: bool,
    /// Publish `raw_connector_request`/`raw_connector_response`.
    pub include_raw_connector: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human on a terminal, JSON otherwise.
    Auto,
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` filter directive, for example `info` or `paysync=debug`.
    pub level: String,
}

/// One configured connector.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectorSettings {
    /// What its gateway needs: base URL, timeouts, retries, circuit, accounts.
    #[serde(flatten)]
    pub gateway: GatewaySettings,
    /// Follow mode, when `[connectors.<name>.follow]` exists.
    pub follow: Option<FollowSettings>,
    /// How far a webhook signature's timestamp may be from now (connectors
    /// whose signatures carry one: Stripe).
    #[serde(with = "humantime_serde")]
    pub webhook_tolerance: std::time::Duration,
    /// The largest webhook body, when the connector's events need more than
    /// `webhooks.max_body_bytes`.
    pub webhook_max_body_bytes: Option<usize>,
}

/// The validated settings of one paysync process.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Kafka.
    pub kafka: KafkaSettings,
    /// Schema Registry (absent: single-object encoding).
    pub schema_registry: Option<RegistrySettings>,
    /// Processing engine.
    pub processing: ProcessingSettings,
    /// HTTP server.
    pub http: HttpSettings,
    /// Event content.
    pub events: EventSettings,
    /// Logging.
    pub log: LogSettings,
    /// Webhook intake, when `[webhooks]` exists.
    pub webhooks: Option<WebhookSettings>,
    /// Connectors by name; a connector is on when its table exists.
    pub connectors: BTreeMap<String, ConnectorSettings>,
}

/// `[webhooks]`: processors' webhooks become status-check requests.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookSettings {
    /// Its own listener (not the metrics port).
    pub listen: SocketAddr,
    /// Webhook-triggered checks follow the payment (when the connector has a
    /// follow table).
    pub follow: bool,
    /// Larger bodies are answered 413.
    pub max_body_bytes: usize,
    /// How long a webhook waits for the broker's acknowledgement of its request
    /// before it is answered 503.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Accepted webhooks per connector and merchant, per second (token bucket).
    pub requests_per_second: u32,
    /// The bucket's burst.
    pub burst: u32,
    /// Repeated webhooks for one transaction within this produce one request.
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Duration,
    /// A client has this long to send the request head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client has this long to send the body.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Connections at most; `None`: 1,024, lowered at start when the
    /// open-file limit leaves less room.
    pub max_connections: Option<usize>,
    /// A connection between requests is closed after this.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A connection is closed after this (its request in progress answered
    /// first, with `Connection: close`).
    #[serde(with = "humantime_serde")]
    pub connection_lifetime: Duration,
    /// Requests one connection serves before it is closed.
    pub max_requests_per_connection: u32,
    /// A peer that reads nothing for this long while an answer waits is
    /// dropped.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Header lines in a request head, at most (431 beyond).
    pub max_headers: usize,
    /// Bytes in a request head, at most (431 beyond).
    pub max_header_bytes: usize,
    /// Requests whose bodies are read and verified, per second, across the
    /// intake; beyond it, 503 with `Retry-After` before the body is read.
    pub max_verifications_per_second: u32,
    /// Peers whose `X-Forwarded-For` / `Forwarded` name the source address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// TLS on the listener, when both files are set.
    pub tls: Option<TlsFiles>,
}

/// A certificate chain and its private key (PEM files), reloaded when they
/// change.
#[derive(Debug, Clone, Serialize)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Where settings come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// Environment variables (name, value); normally `std::env::vars()`. Overrides
    /// and `{ env = "VAR" }` secrets are read from here.
    pub env: Vec<(String, String)>,
}

impl Sources {
    /// The config file and the process environment.
    pub fn from_process(file: Option<PathBuf>) -> Self {
        Sources {
            file,
            env: std::env::vars().collect(),
        }
    }
}

impl Settings {
    /// Loads the file, then `PAYSYNC_*__*` variables, over the defaults, and validates.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let mut figment = Figment::new();
        if let Some(file) = &sources.file {
            if !file.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("`{}` is not a readable file", file.display()),
                ));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(env::provider(&sources.env));
        let raw: raw::RawSettings = figment.extract().map_err(figment_error)?;
        raw.validate(&sources.env)
    }

    /// Settings from a TOML string over the defaults (tests and the demo); `{ env }`
    /// secrets are read from the process environment.
    pub fn from_toml(toml: &str) -> Result<Settings, ConfigError> {
        let raw: raw::RawSettings = Figment::from(Toml::string(toml))
            .extract()
            .map_err(figment_error)?;
        raw.validate(&std::env::vars().collect::<Vec<_>>())
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render settings: {e}\n"))
    }

    /// Every topic this configuration reads or writes (paysync creates none).
    pub fn topics(&self) -> Vec<String> {
        let mut topics = vec![
            self.kafka.input_topic.clone(),
            self.kafka.output_topic.clone(),
            self.kafka.dead_letter_topic.clone(),
        ];
        topics.extend(self.recheck_topics().into_values());
        topics
    }

    /// A connector's account, if configured.
    pub fn account(
        &self,
        connector: &str,
        merchant: &str,
    ) -> Option<&crate::connectors::auth::Account> {
        self.connectors
            .get(connector)?
            .gateway
            .accounts
            .get(merchant)
    }

    /// The re-check topic of every delay a connector with follow mode uses.
    pub fn recheck_topics(&self) -> BTreeMap<Duration, String> {
        self.connectors
            .values()
            .filter_map(|c| c.follow.as_ref())
            .flat_map(|f| f.schedule.iter().map(|(d, _)| *d))
            .map(|d| {
                (
                    d,
                    crate::pipeline::follow::recheck_topic(&self.kafka.recheck_topic_prefix, d),
                )
            })
            .collect()
    }

    /// Which secret fields events carry.
    pub fn secret_fields(&self) -> crate::domain::event::SecretFields {
        crate::domain::event::SecretFields {
            metadata: self.events.include_metadata,
            raw_connector: self.events.include_raw_connector,
        }
    }
}

fn figment_error(e: figment::Error) -> ConfigError {
    let first = e.into_iter().next();
    match first {
        Some(err) => {
            let key = if err.path.is_empty() {
                "(root)".to_owned()
            } else {
                err.path.join(".")
            };
            let origin = err
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            ConfigError::new(key, format!("{}{origin}", err.kind))
        }
        None => ConfigError::new("(root)", "unknown error"),
    }
}

#[cfg(test)]
mod tests;
