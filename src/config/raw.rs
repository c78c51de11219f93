//! The settings as written: one struct per TOML section, every field optional in
//! the file, and **every default in one place**: the `Default` impls below (the
//! README's configuration table lists the same values). `deny_unknown_fields`
//! everywhere, so a typo is an error, not a silently ignored key. Durations are
//! deserialized directly (`"10s"`, `"250ms"`); bounds are checked in `validate.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// The connector used when a request names none.
pub const DEFAULT_CONNECTOR: &str = "cm";

/// Accepts strings, numbers and booleans as a string: environment overrides are
/// parsed like TOML, so `PAYSYNC_KAFKA__GROUP_ID=123` arrives as a number.
pub(super) fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
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

fn opt_lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    lenient_string(d).map(Some)
}

/// A secret as written in the file: inline, `{ env = "VAR" }` or `{ file = "/path" }`.
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
            SecretSource::Inline(_) => f.write_str("********"),
        }
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSettings {
    pub kafka: RawKafka,
    pub schema_registry: Option<RawRegistry>,
    pub processing: RawProcessing,
    pub http: RawHttp,
    pub events: RawEvents,
    pub log: RawLog,
    pub webhooks: Option<RawWebhooks>,
    pub connectors: BTreeMap<String, RawConnector>,
}

/// `[webhooks]`: the intake is on when the table exists.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWebhooks {
    #[serde(deserialize_with = "lenient_string")]
    pub listen: String,
    pub follow: bool,
    pub max_body_bytes: i64,
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    pub requests_per_second: i64,
    pub burst: Option<i64>,
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Duration,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    pub max_connections: Option<i64>,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connection_lifetime: Duration,
    pub max_requests_per_connection: i64,
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    pub max_headers: i64,
    pub max_header_bytes: i64,
    pub max_verifications_per_second: i64,
    pub trusted_proxies: Vec<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
}

impl Default for RawWebhooks {
    fn default() -> Self {
        RawWebhooks {
            listen: "0.0.0.0:9465".into(),
            // A webhook says a payment changed: follow it until final.
            follow: true,
            max_body_bytes: 64 * 1024,
            ack_timeout: Duration::from_secs(10),
            // Per connector and merchant account: well above a processor's
            // webhook rate for one merchant, well below what would flood the
            // connector with checks.
            requests_per_second: 100,
            burst: None,
            dedupe_window: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(10),
            // Lowered at start when the open-file limit leaves less room.
            max_connections: None,
            idle_timeout: Duration::from_secs(60),
            connection_lifetime: Duration::from_secs(600),
            max_requests_per_connection: 1000,
            write_timeout: Duration::from_secs(30),
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            // Well under what one core verifies (see the README's flood
            // benchmark): beyond it the intake answers 503 before reading.
            max_verifications_per_second: 20_000,
            trusted_proxies: Vec::new(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawKafka {
    #[serde(deserialize_with = "lenient_string")]
    pub brokers: String,
    #[serde(deserialize_with = "lenient_string")]
    pub group_id: String,
    #[serde(deserialize_with = "lenient_string")]
    pub input_topic: String,
    #[serde(deserialize_with = "lenient_string")]
    pub output_topic: String,
    #[serde(deserialize_with = "lenient_string")]
    pub dead_letter_topic: String,
    #[serde(deserialize_with = "opt_lenient_string")]
    pub recheck_topic_prefix: Option<String>,
    #[serde(deserialize_with = "opt_lenient_string")]
    pub transactional_id_prefix: Option<String>,
    #[serde(deserialize_with = "opt_lenient_string")]
    pub instance_id: Option<String>,
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    #[serde(deserialize_with = "lenient_map")]
    pub common: BTreeMap<String, String>,
    #[serde(deserialize_with = "lenient_map")]
    pub consumer: BTreeMap<String, String>,
    #[serde(deserialize_with = "lenient_map")]
    pub producer: BTreeMap<String, String>,
}

impl Default for RawKafka {
    fn default() -> Self {
        RawKafka {
            brokers: "127.0.0.1:9092".into(),
            group_id: "paysync".into(),
            input_topic: "payment-status-requests".into(),
            output_topic: "payment-status-events".into(),
            dead_letter_topic: "payment-status-requests.dlq".into(),
            // `<input_topic>.recheck` (depends on the input topic; see validate.rs).
            recheck_topic_prefix: None,
            // The group id (see validate.rs).
            transactional_id_prefix: None,
            // The host name (see validate.rs).
            instance_id: None,
            commit_interval: Duration::from_secs(1),
            common: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegistry {
    #[serde(deserialize_with = "lenient_string")]
    pub url: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<SecretSource>,
    #[serde(default = "yes")]
    pub auto_register: bool,
    #[serde(default)]
    pub subject: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawProcessing {
    pub max_in_flight: i64,
    pub max_queued_per_key: i64,
    pub max_request_bytes: i64,
    pub accepted_schema_ids: Vec<i64>,
    #[serde(deserialize_with = "lenient_string")]
    pub default_connector: String,
    #[serde(deserialize_with = "lenient_string")]
    pub default_merchant: String,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub stuck_after: Duration,
    pub follow: bool,
    #[serde(deserialize_with = "lenient_string")]
    pub guarantee: String,
    #[serde(with = "humantime_serde")]
    pub transaction_interval: Duration,
    pub max_pending_records: i64,
    #[serde(with = "humantime_serde")]
    pub recheck_gate_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub recheck_discovery_interval: Duration,
}

impl Default for RawProcessing {
    fn default() -> Self {
        RawProcessing {
            max_in_flight: 256,
            max_queued_per_key: 16,
            max_request_bytes: 64 * 1024,
            accepted_schema_ids: Vec::new(),
            default_connector: DEFAULT_CONNECTOR.into(),
            default_merchant: "default".into(),
            shutdown_timeout: Duration::from_secs(30),
            stuck_after: Duration::from_secs(300),
            follow: false,
            guarantee: "at_least_once".into(),
            // The latency exactly-once adds at most, for about 10 commits a second
            // per consumer group (README, "Exactly once").
            transaction_interval: Duration::from_millis(100),
            max_pending_records: 10_000,
            // Commits land every kafka.commit_interval (1 s); a minute without
            // one is a partition stuck elsewhere, not a slow commit.
            recheck_gate_timeout: Duration::from_secs(60),
            recheck_discovery_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHttp {
    #[serde(deserialize_with = "lenient_string")]
    pub listen: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            listen: "0.0.0.0:9464".into(),
        }
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawEvents {
    pub include_metadata: bool,
    pub include_raw_connector: bool,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    #[serde(deserialize_with = "lenient_string")]
    pub format: String,
    #[serde(deserialize_with = "lenient_string")]
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "auto".into(),
            level: "info".into(),
        }
    }
}

/// One `[connectors.<name>]` table. Its accounts are parsed by the connector's
/// auth scheme (see `validate.rs`), so they stay untyped here.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConnector {
    #[serde(deserialize_with = "opt_lenient_string")]
    pub base_url: Option<String>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub token_refresh_margin: Duration,
    pub max_response_bytes: i64,
    pub http2: String,
    pub retry: RawRetry,
    pub circuit: RawCircuit,
    pub rate_limit: Option<RawRateLimit>,
    pub concurrency: RawConcurrency,
    pub accounts: BTreeMap<String, serde_json::Value>,
    pub follow: Option<RawFollow>,
    #[serde(deserialize_with = "opt_lenient_string")]
    pub api_version: Option<String>,
    #[serde(with = "humantime_serde")]
    pub webhook_tolerance: Option<Duration>,
    pub webhook_max_body_bytes: Option<i64>,
}

/// `"adaptive"` or a number of calls in flight.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub(super) enum RawConcurrency {
    Fixed(i64),
    Word(String),
}

impl Default for RawConnector {
    fn default() -> Self {
        RawConnector {
            base_url: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            token_refresh_margin: Duration::from_secs(60),
            max_response_bytes: 1024 * 1024,
            http2: "auto".into(),
            retry: RawRetry::default(),
            circuit: RawCircuit::default(),
            rate_limit: None,
            concurrency: RawConcurrency::Word("adaptive".into()),
            accounts: BTreeMap::new(),
            api_version: None,
            webhook_tolerance: None,
            webhook_max_body_bytes: None,
            follow: None,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRetry {
    pub max_attempts: i64,
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_elapsed: Duration,
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    #[serde(with = "humantime_serde")]
    pub max_throttled: Duration,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(30),
            max_throttled: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCircuit {
    pub failure_threshold: i64,
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    #[serde(with = "humantime_serde")]
    pub max_cooldown: Duration,
}

impl Default for RawCircuit {
    fn default() -> Self {
        RawCircuit {
            failure_threshold: 5,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(60),
        }
    }
}

/// `[connectors.<name>.follow]`: follow mode is on for the connector when it exists.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawFollow {
    /// `(delay, count)` tiers, delays in whole seconds.
    pub schedule: Vec<(String, i64)>,
    #[serde(deserialize_with = "lenient_string")]
    pub publish: String,
    pub share: f64,
}

impl Default for RawFollow {
    /// Hyperswitch's default: one re-check after 60 s, then five every 300 s.
    fn default() -> Self {
        RawFollow {
            schedule: vec![("60s".into(), 1), ("300s".into(), 5)],
            publish: "changes".into(),
            // Re-checks take at most 30% of an account's window while fresh
            // requests wait (all of it when none do).
            share: 0.3,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub requests_per_second: i64,
    #[serde(default)]
    pub burst: Option<i64>,
}
