//! Settings: one TOML file plus `PAYSYNC_<SECTION>__<KEY>` environment overrides,
//! loaded and validated once at start-up into typed values (`Duration`, `Url`,
//! `SocketAddr`, `SecretString`). The rest of the crate never reads the
//! environment. Every validation error names the key it is about.
//!
//! Secrets (`client_secret`, registry `password`) may be written inline, as
//! `{ env = "VAR" }` or as `{ file = "/path" }`; they are held as
//! [`SecretString`] and print as `********` everywhere.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

/// Exit code for an invalid configuration.
pub const EXIT_CONFIG: i32 = 2;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "PAYSYNC_";

const MASK: &str = "********";

/// The longest duration any setting accepts.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

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
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

// ---- raw (as written) ------------------------------------------------------------

/// Accepts strings, numbers and booleans as a string: environment overrides are
/// parsed like TOML, so `PAYSYNC_KAFKA__GROUP_ID=123` arrives as a number.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

fn lenient_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    struct V(#[serde(deserialize_with = "lenient_string")] String);
    let m = BTreeMap::<String, V>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, V(v))| (k, v)).collect())
}

/// A secret as written in the file.
#[derive(Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SecretSource {
    /// Read from an environment variable at start-up.
    Env {
        /// Variable name.
        env: String,
    },
    /// Read from a file at start-up (trailing newline trimmed).
    File {
        /// File path.
        file: PathBuf,
    },
    /// Written inline (or given as an environment override).
    Inline(#[serde(deserialize_with = "lenient_string")] String),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env { env } => write!(f, "Env({env})"),
            SecretSource::File { file } => write!(f, "File({})", file.display()),
            SecretSource::Inline(_) => f.write_str(MASK),
        }
    }
}

impl SecretSource {
    fn resolve(&self, key: &str) -> Result<SecretString, ConfigError> {
        let value = match self {
            SecretSource::Inline(s) => s.clone(),
            SecretSource::Env { env } => std::env::var(env).map_err(|_| {
                ConfigError::new(
                    key,
                    format!("environment variable `{env}` is not set or not UTF-8"),
                )
            })?,
            SecretSource::File { file } => std::fs::read_to_string(file)
                .map_err(|e| {
                    ConfigError::new(key, format!("cannot read `{}`: {e}", file.display()))
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        };
        if value.is_empty() {
            return Err(ConfigError::new(key, "is empty"));
        }
        Ok(SecretString::from(value))
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    kafka: RawKafka,
    #[serde(default)]
    schema_registry: Option<RawRegistry>,
    processing: RawProcessing,
    http: RawHttp,
    #[serde(default)]
    events: RawEvents,
    log: RawLog,
    #[serde(default)]
    connectors: BTreeMap<String, RawConnector>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    #[serde(deserialize_with = "lenient_string")]
    brokers: String,
    #[serde(deserialize_with = "lenient_string")]
    group_id: String,
    #[serde(deserialize_with = "lenient_string")]
    input_topic: String,
    #[serde(deserialize_with = "lenient_string")]
    output_topic: String,
    #[serde(deserialize_with = "lenient_string")]
    dead_letter_topic: String,
    #[serde(deserialize_with = "lenient_string")]
    commit_interval: String,
    #[serde(default, deserialize_with = "lenient_map")]
    common: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "lenient_map")]
    consumer: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "lenient_map")]
    producer: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    #[serde(deserialize_with = "lenient_string")]
    url: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<SecretSource>,
    #[serde(default = "d_true")]
    auto_register: bool,
    #[serde(default)]
    subject: Option<String>,
}

fn d_true() -> bool {
    true
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawProcessing {
    max_in_flight: i64,
    max_queued_per_key: i64,
    max_request_bytes: i64,
    #[serde(default)]
    accepted_schema_ids: Vec<i64>,
    #[serde(deserialize_with = "lenient_string")]
    default_connector: String,
    #[serde(deserialize_with = "lenient_string")]
    default_merchant: String,
    #[serde(deserialize_with = "lenient_string")]
    shutdown_timeout: String,
    #[serde(deserialize_with = "lenient_string")]
    stuck_after: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(deserialize_with = "lenient_string")]
    listen: String,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    #[serde(default)]
    include_metadata: bool,
    #[serde(default)]
    include_raw_connector: bool,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(deserialize_with = "lenient_string")]
    format: String,
    #[serde(deserialize_with = "lenient_string")]
    level: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConnector {
    #[serde(default, deserialize_with = "opt_lenient_string")]
    base_url: Option<String>,
    #[serde(default = "d_connect_timeout", deserialize_with = "lenient_string")]
    connect_timeout: String,
    #[serde(default = "d_request_timeout", deserialize_with = "lenient_string")]
    request_timeout: String,
    #[serde(default = "d_token_margin", deserialize_with = "lenient_string")]
    token_refresh_margin: String,
    #[serde(default = "d_max_response_bytes")]
    max_response_bytes: i64,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    circuit: RawCircuit,
    #[serde(default)]
    rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    accounts: BTreeMap<String, RawAccount>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawCircuit {
    #[serde(default = "d_failure_threshold")]
    failure_threshold: i64,
    #[serde(default = "d_cooldown", deserialize_with = "lenient_string")]
    cooldown: String,
    #[serde(default = "d_max_cooldown", deserialize_with = "lenient_string")]
    max_cooldown: String,
}

impl Default for RawCircuit {
    fn default() -> Self {
        RawCircuit {
            failure_threshold: d_failure_threshold(),
            cooldown: d_cooldown(),
            max_cooldown: d_max_cooldown(),
        }
    }
}

fn d_failure_threshold() -> i64 {
    5
}
fn d_cooldown() -> String {
    "5s".into()
}
fn d_max_cooldown() -> String {
    "60s".into()
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    requests_per_second: i64,
    #[serde(default)]
    burst: Option<i64>,
}

fn opt_lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    lenient_string(d).map(Some)
}

fn d_connect_timeout() -> String {
    "2s".into()
}
fn d_request_timeout() -> String {
    "10s".into()
}
fn d_token_margin() -> String {
    "60s".into()
}
fn d_max_response_bytes() -> i64 {
    1024 * 1024
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default = "d_max_attempts")]
    max_attempts: i64,
    #[serde(default = "d_initial_backoff", deserialize_with = "lenient_string")]
    initial_backoff: String,
    #[serde(default = "d_max_backoff", deserialize_with = "lenient_string")]
    max_backoff: String,
    #[serde(default = "d_max_elapsed", deserialize_with = "lenient_string")]
    max_elapsed: String,
    #[serde(default = "d_max_retry_after", deserialize_with = "lenient_string")]
    max_retry_after: String,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            max_attempts: d_max_attempts(),
            initial_backoff: d_initial_backoff(),
            max_backoff: d_max_backoff(),
            max_elapsed: d_max_elapsed(),
            max_retry_after: d_max_retry_after(),
        }
    }
}

fn d_max_attempts() -> i64 {
    5
}
fn d_initial_backoff() -> String {
    "200ms".into()
}
fn d_max_backoff() -> String {
    "5s".into()
}
fn d_max_elapsed() -> String {
    "30s".into()
}
fn d_max_retry_after() -> String {
    "30s".into()
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    #[serde(deserialize_with = "lenient_string")]
    client_id: String,
    client_secret: SecretSource,
    #[serde(default)]
    requests_per_second: Option<i64>,
}

/// The built-in defaults, as TOML (also the reference shown in the README).
pub const DEFAULTS_TOML: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "paysync"
input_topic = "payment-status-requests"
output_topic = "payment-status-events"
dead_letter_topic = "payment-status-requests.dlq"
commit_interval = "1s"

[processing]
max_in_flight = 256
max_queued_per_key = 16
max_request_bytes = 65536
default_connector = "cm"
default_merchant = "default"
shutdown_timeout = "30s"
stuck_after = "5m"

[http]
listen = "0.0.0.0:9464"

[events]
include_metadata = false
include_raw_connector = false

[log]
format = "auto"
level = "info"

[connectors.cm]
base_url = "https://api.pay.cm.com"
"#;

// ---- validated -------------------------------------------------------------------

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_secret<S: Serializer>(_: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(MASK)
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
                (
                    k.as_str(),
                    if is_secret_property(k) {
                        MASK
                    } else {
                        v.as_str()
                    },
                )
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
    /// How often the commit watermark is committed.
    #[serde(serialize_with = "ser_duration")]
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

/// The producer settings that at-least-once delivery depends on: a value that
/// voids it is refused at start-up (exit 2), naming where it was set.
fn check_producer_guarantees(kafka: &KafkaSettings) -> Result<usize, ConfigError> {
    // The producer section wins over the common one, as when the clients are built.
    let find = |name: &str| {
        kafka
            .producer
            .0
            .get(name)
            .map(|v| (format!("kafka.producer.\"{name}\""), v))
            .or_else(|| {
                kafka
                    .common
                    .0
                    .get(name)
                    .map(|v| (format!("kafka.common.\"{name}\""), v))
            })
    };
    for name in [
        "acks",
        "request.required.acks",
        "topic.request.required.acks",
    ] {
        if let Some((key, v)) = find(name) {
            if !matches!(v.trim().to_ascii_lowercase().as_str(), "all" | "-1") {
                return Err(ConfigError::new(
                    key,
                    format!("`{v}` voids at-least-once delivery: an input offset is committed once its event is acknowledged, which means something only with acks=all (or -1)"),
                ));
            }
        }
    }
    if let Some((key, v)) = find("enable.idempotence") {
        if !matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1") {
            return Err(ConfigError::new(
                key,
                format!("`{v}`: the idempotent producer is required (without it a retried publish can duplicate or reorder events)"),
            ));
        }
    }
    match find("message.max.bytes") {
        None => Ok(1_000_000),
        Some((key, v)) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1000..=1_000_000_000).contains(n))
            .ok_or_else(|| {
                ConfigError::new(
                    key,
                    format!("`{v}` is not a size between 1000 and 1000000000 bytes"),
                )
            }),
    }
}

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
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_timeout: Duration,
    /// `/readyz` fails when a partition's commit watermark has not moved for this
    /// long while work is pending.
    #[serde(serialize_with = "ser_duration")]
    pub stuck_after: Duration,
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

/// Retry policy for one connector.
#[derive(Debug, Clone, Serialize)]
pub struct RetrySettings {
    /// Connector calls per request, at most (the first call included).
    pub max_attempts: u32,
    /// Backoff before the first retry (full jitter up to this).
    #[serde(serialize_with = "ser_duration")]
    pub initial_backoff: Duration,
    /// Upper bound of one backoff.
    #[serde(serialize_with = "ser_duration")]
    pub max_backoff: Duration,
    /// Total time a request may spend retrying.
    #[serde(serialize_with = "ser_duration")]
    pub max_elapsed: Duration,
    /// Upper bound honoured for a server's `Retry-After`.
    #[serde(serialize_with = "ser_duration")]
    pub max_retry_after: Duration,
}

/// Circuit-breaker settings of one connector.
#[derive(Debug, Clone, Serialize)]
pub struct CircuitSettings {
    /// Consecutive retryable failures that open the circuit (at most `retry.max_attempts`).
    pub failure_threshold: u32,
    /// Wait before the first probe.
    #[serde(serialize_with = "ser_duration")]
    pub cooldown: Duration,
    /// Longest wait between probes.
    #[serde(serialize_with = "ser_duration")]
    pub max_cooldown: Duration,
}

/// A token-bucket rate limit.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RateLimit {
    /// Sustained calls per second.
    pub requests_per_second: u32,
    /// Calls allowed at once after a quiet period.
    pub burst: u32,
}

/// Credentials of one merchant account.
#[derive(Clone, Serialize)]
pub struct Account {
    /// OAuth2 client id.
    pub client_id: String,
    /// OAuth2 client secret.
    #[serde(serialize_with = "ser_secret")]
    pub client_secret: SecretString,
    /// Optional rate limit for this account's calls (in addition to the connector's).
    pub requests_per_second: Option<u32>,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("client_id", &self.client_id)
            .field("client_secret", &MASK)
            .finish()
    }
}

impl Account {
    /// An account from plain strings (tests and the demo).
    pub fn new(client_id: &str, client_secret: &str) -> Self {
        Account {
            client_id: client_id.into(),
            client_secret: SecretString::from(client_secret.to_owned()),
            requests_per_second: None,
        }
    }

    /// The secret, for building the token request only.
    pub fn secret(&self) -> &str {
        self.client_secret.expose_secret()
    }
}

/// Settings of one connector.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectorSettings {
    /// API base URL (from configuration only, never from a message).
    pub base_url: Url,
    /// TCP/TLS connect timeout.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Whole-request timeout (one call).
    #[serde(serialize_with = "ser_duration")]
    pub request_timeout: Duration,
    /// Tokens are refreshed this long before they expire.
    #[serde(serialize_with = "ser_duration")]
    pub token_refresh_margin: Duration,
    /// Response bodies larger than this are refused.
    pub max_response_bytes: usize,
    /// Retry policy.
    pub retry: RetrySettings,
    /// Circuit breaker.
    pub circuit: CircuitSettings,
    /// Client-side rate limit for the whole connector.
    pub rate_limit: Option<RateLimit>,
    /// Merchant accounts by `merchant_id`.
    pub accounts: BTreeMap<String, Account>,
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
    /// Connectors by name.
    pub connectors: BTreeMap<String, ConnectorSettings>,
}

/// Where settings come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// Environment variables (name, value); normally `std::env::vars()`.
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
    /// Loads defaults, then the file, then `PAYSYNC_*__*` variables, and validates.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS_TOML));
        if let Some(file) = &sources.file {
            if !file.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("`{}` is not a readable file", file.display()),
                ));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(env_provider(&sources.env));
        let raw: RawSettings = figment.extract().map_err(figment_error)?;
        raw.validate(sources)
    }

    /// Settings from a TOML string plus defaults (tests and the demo).
    pub fn from_toml(toml: &str) -> Result<Settings, ConfigError> {
        let raw: RawSettings = Figment::from(Toml::string(DEFAULTS_TOML))
            .merge(Toml::string(toml))
            .extract()
            .map_err(figment_error)?;
        raw.validate(&Sources::default())
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render settings: {e}\n"))
    }

    /// Every topic this configuration reads or writes (paysync creates none).
    pub fn topics(&self) -> Vec<String> {
        vec![
            self.kafka.input_topic.clone(),
            self.kafka.output_topic.clone(),
            self.kafka.dead_letter_topic.clone(),
        ]
    }

    /// Which secret fields events carry.
    pub fn secret_fields(&self) -> crate::domain::event::SecretFields {
        crate::domain::event::SecretFields {
            metadata: self.events.include_metadata,
            raw_connector: self.events.include_raw_connector,
        }
    }
}

/// Environment overrides: `PAYSYNC_SECTION__KEY`, `__` between levels. Values are
/// taken from `vars` (not the live environment) so that loading is testable.
fn env_provider(vars: &[(String, String)]) -> Serialized<figment::value::Dict> {
    use figment::value::{Dict, Value};
    let mut root = Dict::new();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            continue; // PAYSYNC_CONFIG and friends are not settings.
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        // librdkafka property names use dots; in a variable name they are written as '_'.
        let passthrough = path.len() == 3
            && path[0] == "kafka"
            && matches!(path[1].as_str(), "common" | "consumer" | "producer");
        let leaf = if passthrough {
            path[2].replace('_', ".")
        } else {
            path[path.len() - 1].clone()
        };
        let parsed: Value = if passthrough {
            Value::from(value.clone())
        } else {
            value
                .parse::<Value>()
                .unwrap_or_else(|_| Value::from(value.clone()))
        };
        let mut dict = &mut root;
        for part in &path[..path.len() - 1] {
            let entry = dict
                .entry(part.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            let Value::Dict(_, inner) = entry else {
                unreachable!("just made a dict")
            };
            dict = inner;
        }
        dict.insert(leaf, parsed);
    }
    Serialized::defaults(root)
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

fn duration(key: &str, raw: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(raw.trim()).map_err(|e| {
        ConfigError::new(
            key,
            format!("`{raw}` is not a duration like 10s or 500ms: {e}"),
        )
    })?;
    if d.is_zero() {
        return Err(ConfigError::new(key, "must be greater than zero"));
    }
    // Durations are added to `Instant`s; a bound keeps that arithmetic far from
    // overflow whatever a configuration says.
    if d > MAX_DURATION {
        return Err(ConfigError::new(key, "must be at most 7 days"));
    }
    Ok(d)
}

fn bounded(key: &str, v: i64, min: i64, max: i64) -> Result<usize, ConfigError> {
    if v < min || v > max {
        return Err(ConfigError::new(
            key,
            format!("must be between {min} and {max}, got {v}"),
        ));
    }
    usize::try_from(v).map_err(|_| ConfigError::new(key, "out of range"))
}

fn topic(key: &str, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(ConfigError::new(
            key,
            format!("`{name}` is not a valid Kafka topic name"),
        ));
    }
    Ok(name.to_owned())
}

fn non_empty(key: &str, v: &str) -> Result<String, ConfigError> {
    if v.trim().is_empty() {
        return Err(ConfigError::new(key, "must not be empty"));
    }
    Ok(v.to_owned())
}

fn http_url(key: &str, raw: &str) -> Result<Url, ConfigError> {
    let url =
        Url::parse(raw).map_err(|e| ConfigError::new(key, format!("`{raw}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::new(key, "must be an http or https URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            key,
            "must not contain credentials; use the account settings",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::new(key, "must not have a query or fragment"));
    }
    Ok(url)
}

impl RawSettings {
    fn validate(self, _sources: &Sources) -> Result<Settings, ConfigError> {
        let k = self.kafka;
        let kafka = KafkaSettings {
            brokers: non_empty("kafka.brokers", &k.brokers)?,
            group_id: non_empty("kafka.group_id", &k.group_id)?,
            input_topic: topic("kafka.input_topic", &k.input_topic)?,
            output_topic: topic("kafka.output_topic", &k.output_topic)?,
            dead_letter_topic: topic("kafka.dead_letter_topic", &k.dead_letter_topic)?,
            commit_interval: duration("kafka.commit_interval", &k.commit_interval)?,
            common: KafkaProperties(k.common),
            consumer: KafkaProperties(k.consumer),
            producer: KafkaProperties(k.producer),
            max_record_bytes: 0,
        };
        let mut kafka = kafka;
        kafka.max_record_bytes = check_producer_guarantees(&kafka)?;
        if kafka.output_topic == kafka.input_topic || kafka.dead_letter_topic == kafka.input_topic {
            return Err(ConfigError::new(
                "kafka.output_topic",
                "the output and dead-letter topics must differ from the input topic",
            ));
        }
        let schema_registry = match self.schema_registry {
            None => None,
            Some(r) => Some(RegistrySettings {
                url: http_url("schema_registry.url", &r.url)?,
                username: r.username,
                password: r
                    .password
                    .map(|p| p.resolve("schema_registry.password"))
                    .transpose()?,
                auto_register: r.auto_register,
                subject: r
                    .subject
                    .unwrap_or_else(|| format!("{}-value", kafka.output_topic)),
            }),
        };
        let p = self.processing;
        let processing = ProcessingSettings {
            max_in_flight: bounded("processing.max_in_flight", p.max_in_flight, 1, 100_000)?,
            max_queued_per_key: bounded(
                "processing.max_queued_per_key",
                p.max_queued_per_key,
                1,
                100_000,
            )?,
            max_request_bytes: bounded(
                "processing.max_request_bytes",
                p.max_request_bytes,
                64,
                16 * 1024 * 1024,
            )?,
            accepted_schema_ids: p
                .accepted_schema_ids
                .iter()
                .map(|id| {
                    bounded(
                        "processing.accepted_schema_ids",
                        *id,
                        0,
                        i64::from(i32::MAX),
                    )
                    .map(|id| id as u32)
                })
                .collect::<Result<_, _>>()?,
            default_connector: non_empty("processing.default_connector", &p.default_connector)?,
            default_merchant: non_empty("processing.default_merchant", &p.default_merchant)?,
            shutdown_timeout: duration("processing.shutdown_timeout", &p.shutdown_timeout)?,
            stuck_after: duration("processing.stuck_after", &p.stuck_after)?,
        };
        if processing.max_request_bytes + DEAD_LETTER_RESERVE > kafka.max_record_bytes {
            return Err(ConfigError::new(
                "processing.max_request_bytes",
                format!(
                    "{} bytes plus {DEAD_LETTER_RESERVE} for a dead letter's key and headers exceed the producer's message.max.bytes ({}): a rejected request could not be dead-lettered whole",
                    processing.max_request_bytes, kafka.max_record_bytes
                ),
            ));
        }
        let http = HttpSettings {
            listen: self.http.listen.parse().map_err(|_| {
                ConfigError::new(
                    "http.listen",
                    format!("`{}` is not an address like 0.0.0.0:9464", self.http.listen),
                )
            })?,
        };
        let log = LogSettings {
            format: match self.log.format.as_str() {
                "auto" => LogFormat::Auto,
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(ConfigError::new(
                        "log.format",
                        format!("`{other}` is not one of auto, text, json"),
                    ))
                }
            },
            level: {
                tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
                    ConfigError::new("log.level", format!("`{}`: {e}", self.log.level))
                })?;
                self.log.level
            },
        };
        let mut connectors = BTreeMap::new();
        for (name, c) in self.connectors {
            let key = |k: &str| format!("connectors.{name}.{k}");
            if !crate::connectors::registry::is_known(&name) {
                return Err(ConfigError::new(
                    format!("connectors.{name}"),
                    format!(
                        "unknown connector; known: {}",
                        crate::connectors::registry::names().join(", ")
                    ),
                ));
            }
            let base_url = http_url(&key("base_url"), c.base_url.as_deref().unwrap_or_default())?;
            let mut accounts = BTreeMap::new();
            for (merchant, a) in c.accounts {
                let akey = |k: &str| format!("connectors.{name}.accounts.{merchant}.{k}");
                accounts.insert(
                    merchant.clone(),
                    Account {
                        client_id: non_empty(&akey("client_id"), &a.client_id)?,
                        client_secret: a.client_secret.resolve(&akey("client_secret"))?,
                        requests_per_second: a
                            .requests_per_second
                            .map(|r| {
                                bounded(&akey("requests_per_second"), r, 1, 1_000_000)
                                    .map(|r| r as u32)
                            })
                            .transpose()?,
                    },
                );
            }
            let r = c.retry;
            let retry = RetrySettings {
                max_attempts: bounded(&key("retry.max_attempts"), r.max_attempts, 1, 100)? as u32,
                initial_backoff: duration(&key("retry.initial_backoff"), &r.initial_backoff)?,
                max_backoff: duration(&key("retry.max_backoff"), &r.max_backoff)?,
                max_elapsed: duration(&key("retry.max_elapsed"), &r.max_elapsed)?,
                max_retry_after: duration(&key("retry.max_retry_after"), &r.max_retry_after)?,
            };
            let circuit = CircuitSettings {
                failure_threshold: bounded(
                    &key("circuit.failure_threshold"),
                    c.circuit.failure_threshold,
                    1,
                    1000,
                )? as u32,
                cooldown: duration(&key("circuit.cooldown"), &c.circuit.cooldown)?,
                max_cooldown: duration(&key("circuit.max_cooldown"), &c.circuit.max_cooldown)?,
            };
            if circuit.failure_threshold > retry.max_attempts {
                return Err(ConfigError::new(
                    key("circuit.failure_threshold"),
                    format!(
                        "must be at most retry.max_attempts ({}): otherwise a lone request could exhaust its retries during an outage before the circuit opens, and publish an error event",
                        retry.max_attempts
                    ),
                ));
            }
            let rate_limit = match c.rate_limit {
                None => None,
                Some(r) => {
                    let rps = bounded(
                        &key("rate_limit.requests_per_second"),
                        r.requests_per_second,
                        1,
                        1_000_000,
                    )? as u32;
                    let burst = bounded(
                        &key("rate_limit.burst"),
                        r.burst.unwrap_or(i64::from(rps)),
                        1,
                        1_000_000,
                    )? as u32;
                    Some(RateLimit {
                        requests_per_second: rps,
                        burst,
                    })
                }
            };
            connectors.insert(
                name.clone(),
                ConnectorSettings {
                    circuit,
                    rate_limit,
                    base_url,
                    connect_timeout: duration(&key("connect_timeout"), &c.connect_timeout)?,
                    request_timeout: duration(&key("request_timeout"), &c.request_timeout)?,
                    token_refresh_margin: duration(
                        &key("token_refresh_margin"),
                        &c.token_refresh_margin,
                    )?,
                    max_response_bytes: bounded(
                        &key("max_response_bytes"),
                        c.max_response_bytes,
                        1024,
                        64 * 1024 * 1024,
                    )?,
                    retry,
                    accounts,
                },
            );
        }
        match connectors.get(&processing.default_connector) {
            None => {
                return Err(ConfigError::new(
                    "processing.default_connector",
                    format!("`{}` has no [connectors.{}] section", processing.default_connector, processing.default_connector),
                ))
            }
            Some(c) if c.accounts.is_empty() => {
                return Err(ConfigError::new(
                    format!("connectors.{}.accounts", processing.default_connector),
                    "at least one account is required, e.g. [connectors.cm.accounts.default] with client_id and client_secret",
                ))
            }
            Some(_) => {}
        }
        Ok(Settings {
            kafka,
            schema_registry,
            processing,
            http,
            events: EventSettings {
                include_metadata: self.events.include_metadata,
                include_raw_connector: self.events.include_raw_connector,
            },
            log,
            connectors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[connectors.cm.accounts.default]
client_id = "shop"
client_secret = "s3cr3t-inline"
"#;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paysync.toml");
        std::fs::write(&path, toml).unwrap();
        Settings::load(&Sources {
            file: Some(path),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    #[test]
    fn defaults_apply() {
        let s = load(MINIMAL, &[]).unwrap();
        assert_eq!(s.kafka.input_topic, "payment-status-requests");
        assert_eq!(s.kafka.output_topic, "payment-status-events");
        assert_eq!(s.kafka.dead_letter_topic, "payment-status-requests.dlq");
        assert_eq!(s.processing.max_in_flight, 256);
        assert_eq!(s.http.listen.port(), 9464);
        let cm = &s.connectors["cm"];
        assert_eq!(cm.base_url.as_str(), "https://api.pay.cm.com/");
        assert_eq!(cm.request_timeout, Duration::from_secs(10));
        assert_eq!(cm.accounts["default"].client_id, "shop");
        assert!(s.schema_registry.is_none());
    }

    #[test]
    fn env_overrides_win_and_nest() {
        let s = load(
            MINIMAL,
            &[
                ("PAYSYNC_KAFKA__BROKERS", "b1:9092,b2:9092"),
                ("PAYSYNC_KAFKA__GROUP_ID", "123"),
                ("PAYSYNC_PROCESSING__MAX_IN_FLIGHT", "1000"),
                ("PAYSYNC_CONNECTORS__CM__REQUEST_TIMEOUT", "250ms"),
                ("PAYSYNC_CONNECTORS__CM__ACCOUNTS__SHOP2__CLIENT_ID", "id2"),
                (
                    "PAYSYNC_CONNECTORS__CM__ACCOUNTS__SHOP2__CLIENT_SECRET",
                    "sec2",
                ),
                ("PAYSYNC_KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000"),
                ("PAYSYNC_CONFIG", "/ignored"),
                ("OTHER__VAR", "x"),
            ],
        )
        .unwrap();
        assert_eq!(s.kafka.brokers, "b1:9092,b2:9092");
        assert_eq!(s.kafka.group_id, "123");
        assert_eq!(s.processing.max_in_flight, 1000);
        assert_eq!(
            s.connectors["cm"].request_timeout,
            Duration::from_millis(250)
        );
        assert_eq!(s.connectors["cm"].accounts["shop2"].secret(), "sec2");
        assert_eq!(s.kafka.consumer.0["session.timeout.ms"], "6000");
    }

    #[test]
    fn secrets_from_env_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, "from-file\n").unwrap();
        // The variable is set for this process only; its name is unique to this test.
        std::env::set_var("PAYSYNC_TEST_SECRET_FROM_ENV", "from-env");
        let toml = format!(
            r#"
[connectors.cm.accounts.a]
client_id = "a"
client_secret = {{ env = "PAYSYNC_TEST_SECRET_FROM_ENV" }}
[connectors.cm.accounts.b]
client_id = "b"
client_secret = {{ file = "{}" }}
"#,
            secret_file.display()
        );
        let s = Settings::from_toml(&toml).unwrap();
        assert_eq!(s.connectors["cm"].accounts["a"].secret(), "from-env");
        assert_eq!(s.connectors["cm"].accounts["b"].secret(), "from-file");
        let missing = Settings::from_toml(
            "[connectors.cm.accounts.a]\nclient_id = \"a\"\nclient_secret = { env = \"PAYSYNC_TEST_SURELY_UNSET_VAR\" }\n",
        )
        .unwrap_err();
        assert_eq!(missing.key, "connectors.cm.accounts.a.client_secret");
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            (
                "[processing]\nmax_in_flight = 0\n",
                "processing.max_in_flight",
            ),
            (
                "[processing]\nmax_in_flight = \"many\"\n",
                "processing.max_in_flight",
            ),
            (
                "[kafka]\ncommit_interval = \"soon\"\n",
                "kafka.commit_interval",
            ),
            (
                "[kafka]\noutput_topic = \"bad topic\"\n",
                "kafka.output_topic",
            ),
            ("[kafka]\nbrokrs = \"x\"\n", "kafka"),
            ("[http]\nlisten = \"nowhere\"\n", "http.listen"),
            (
                "[connectors.cm]\nbase_url = \"ftp://x\"\n",
                "connectors.cm.base_url",
            ),
            (
                "[connectors.cm]\nbase_url = \"https://user:pw@x\"\n",
                "connectors.cm.base_url",
            ),
            (
                "[connectors.cm]\nrequest_timeout = \"0s\"\n",
                "connectors.cm.request_timeout",
            ),
            (
                "[connectors.cm.circuit]\nfailure_threshold = 6\n",
                "connectors.cm.circuit.failure_threshold",
            ),
            (
                "[connectors.cm.rate_limit]\nrequests_per_second = 0\n",
                "connectors.cm.rate_limit.requests_per_second",
            ),
            (
                "[connectors.cm.accounts.x]\nclient_id = \"a\"\nclient_secret = \"b\"\nrequests_per_second = -1\n",
                "connectors.cm.accounts.x.requests_per_second",
            ),
            (
                "[connectors.nope]\nbase_url = \"https://x\"\n",
                "connectors.nope",
            ),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            (
                "[schema_registry]\nurl = \"not a url\"\n",
                "schema_registry.url",
            ),
            (
                "[kafka.producer]\nacks = \"0\"\n",
                "kafka.producer.\"acks\"",
            ),
            (
                "[kafka.producer]\n\"request.required.acks\" = \"1\"\n",
                "kafka.producer.\"request.required.acks\"",
            ),
            (
                "[kafka.common]\nacks = \"1\"\n",
                "kafka.common.\"acks\"",
            ),
            (
                "[kafka.producer]\n\"enable.idempotence\" = \"false\"\n",
                "kafka.producer.\"enable.idempotence\"",
            ),
            (
                "[kafka.producer]\n\"message.max.bytes\" = \"lots\"\n",
                "kafka.producer.\"message.max.bytes\"",
            ),
            (
                "[kafka.producer]\n\"message.max.bytes\" = \"70000\"\n",
                "processing.max_request_bytes",
            ),
            (
                "[processing]\nmax_request_bytes = 990000\n",
                "processing.max_request_bytes",
            ),
            (
                "[processing]\nshutdown_timeout = \"30d\"\n",
                "processing.shutdown_timeout",
            ),
            (
                "[processing]\naccepted_schema_ids = [-1]\n",
                "processing.accepted_schema_ids",
            ),
        ];
        for (extra, key) in cases {
            let err = load(&format!("{MINIMAL}\n{extra}"), &[]).unwrap_err();
            assert!(
                err.key.starts_with(key),
                "{extra:?}: got key {:?} ({})",
                err.key,
                err.message
            );
        }
        let err = load("", &[]).unwrap_err();
        assert_eq!(err.key, "connectors.cm.accounts");
        // The producer section wins over the common one; all and -1 are fine.
        let ok = load(
            &format!("{MINIMAL}\n[kafka.common]\nacks = \"1\"\n[kafka.producer]\nacks = \"-1\"\n\"message.max.bytes\" = \"2000000\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(ok.kafka.max_record_bytes, 2_000_000);
        let err = load(MINIMAL, &[("PAYSYNC_PROCESSING__MAX_IN_FLIGHT", "-5")]).unwrap_err();
        assert_eq!(err.key, "processing.max_in_flight");
    }

    #[test]
    fn secrets_never_print() {
        let s = load(
            &format!(
                "{MINIMAL}\n[kafka.common]\n\"sasl.password\" = \"kafka-pw\"\n[schema_registry]\nurl = \"http://r:8081\"\nusername = \"u\"\npassword = \"reg-pw\"\n"
            ),
            &[],
        )
        .unwrap();
        let shown = format!("{s:?}\n{}", s.to_masked_toml());
        for secret in ["s3cr3t-inline", "kafka-pw", "reg-pw"] {
            assert!(!shown.contains(secret), "{secret} leaked:\n{shown}");
        }
        assert!(s.to_masked_toml().contains("client_secret = \"********\""));
        assert!(s
            .to_masked_toml()
            .contains("\"sasl.password\" = \"********\""));
    }
}
