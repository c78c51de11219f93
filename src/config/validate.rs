//! From the file as written to typed, checked settings, section by section. Every
//! error names its key.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use super::raw::{
    RawConcurrency, RawConnector, RawFollow, RawKafka, RawProcessing, RawRegistry, RawSettings,
    RawWebhooks, SecretSource,
};
use super::{
    ConfigError, ConnectorSettings, EventSettings, FollowSettings, Guarantee, HttpSettings,
    KafkaProperties, KafkaSettings, LogFormat, LogSettings, ProcessingSettings, PublishMode,
    RegistrySettings, Settings, TlsFiles, WebhookSettings, DEAD_LETTER_RESERVE,
};
use crate::connectors::auth::{Account, AccountFields, AuthScheme, FieldError};
use crate::connectors::breaker::BreakerSettings;
use crate::connectors::gateway::{GatewaySettings, RateLimit};
use crate::connectors::http::Http2;
use crate::connectors::limit::Concurrency;
use crate::connectors::registry;
use crate::connectors::retry::RetrySettings;

/// The longest duration any setting accepts: durations are added to `Instant`s,
/// and a bound keeps that arithmetic far from overflow whatever a file says.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

type Env<'a> = &'a [(String, String)];

fn duration(key: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(key, "must be greater than zero"));
    }
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

fn bounded_u32(key: &str, v: i64, min: u32, max: u32) -> Result<u32, ConfigError> {
    bounded(key, v, i64::from(min), i64::from(max)).map(|n| n as u32)
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

fn secret(key: &str, source: &SecretSource, env: Env<'_>) -> Result<SecretString, ConfigError> {
    let value = match source {
        SecretSource::Inline(s) => s.clone(),
        SecretSource::Env { env: var } => env
            .iter()
            .find(|(k, _)| k == var)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                ConfigError::new(key, format!("environment variable `{var}` is not set"))
            })?,
        SecretSource::File { file } => std::fs::read_to_string(file)
            .map_err(|e| ConfigError::new(key, format!("cannot read `{}`: {e}", file.display())))?
            .trim_end_matches(['\r', '\n'])
            .to_owned(),
    };
    if value.is_empty() {
        return Err(ConfigError::new(key, "is empty"));
    }
    Ok(SecretString::from(value))
}

/// The producer settings at-least-once delivery depends on: a value that voids
/// it is refused, naming where it was set. Returns the record size limit.
fn producer_guarantees(kafka: &KafkaSettings) -> Result<usize, ConfigError> {
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

/// A name that goes into transactional ids and consumer group ids: printable
/// ASCII without spaces, at most 200 characters.
fn id_part(key: &str, v: &str) -> Result<String, ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 200
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(ConfigError::new(
            key,
            format!("`{v}`: 1 to 200 characters of [A-Za-z0-9._-]"),
        ));
    }
    Ok(v.to_owned())
}

/// This machine's host name (the default `kafka.instance_id`): `HOSTNAME` from
/// the environment given, else the kernel's.
fn host_name(env: Env<'_>) -> Option<String> {
    env.iter()
        .find(|(k, _)| k == "HOSTNAME")
        .map(|(_, v)| v.trim().to_owned())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
}

/// The client settings exactly-once depends on, refused with the key that breaks
/// it: paysync's consumers must read only committed records (re-check records of
/// aborted transactions must never be checked), the transactional ids are
/// paysync's own, and a transaction must be able to stay open for one interval.
fn exactly_once_properties(
    kafka: &KafkaSettings,
    transaction_interval: Duration,
) -> Result<(), ConfigError> {
    let find = |section: &str, props: &KafkaProperties, name: &str| {
        props
            .0
            .get(name)
            .map(|v| (format!("kafka.{section}.\"{name}\""), v.trim().to_owned()))
    };
    let consumer = |name: &str| {
        find("consumer", &kafka.consumer, name).or_else(|| find("common", &kafka.common, name))
    };
    let producer = |name: &str| {
        find("producer", &kafka.producer, name).or_else(|| find("common", &kafka.common, name))
    };
    if let Some((key, v)) = consumer("isolation.level") {
        if v != "read_committed" {
            return Err(ConfigError::new(
                key,
                format!("`{v}` breaks processing.guarantee = \"exactly_once\": paysync's consumers must read only committed records (re-check records of an aborted transaction would be checked)"),
            ));
        }
    }
    if let Some((key, _)) = producer("transactional.id") {
        return Err(ConfigError::new(
            key,
            "paysync names its transactional producers (kafka.transactional_id_prefix, kafka.instance_id); remove this property",
        ));
    }
    if let Some((key, v)) = producer("transaction.timeout.ms") {
        let ms = v.parse::<u64>().ok().filter(|ms| *ms >= 1000);
        let Some(ms) = ms else {
            return Err(ConfigError::new(
                key,
                format!("`{v}` is not a number of milliseconds of at least 1000"),
            ));
        };
        if Duration::from_millis(ms) < transaction_interval * 2 {
            return Err(ConfigError::new(
                key,
                format!("{ms} ms is less than twice processing.transaction_interval ({} ms): a transaction could time out before it is committed", transaction_interval.as_millis()),
            ));
        }
    }
    Ok(())
}

fn kafka(k: RawKafka, env: Env<'_>) -> Result<KafkaSettings, ConfigError> {
    let instance_id = match k.instance_id {
        Some(id) => id_part("kafka.instance_id", &id)?,
        None => {
            let host = host_name(env).unwrap_or_else(|| "paysync".into());
            // A host name may hold characters a transactional id should not.
            host.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                        c
                    } else {
                        '_'
                    }
                })
                .take(200)
                .collect()
        }
    };
    if instance_id == "redrive" {
        return Err(ConfigError::new(
            "kafka.instance_id",
            "`redrive` is the transactional id suffix of `paysync redrive`; choose another name",
        ));
    }
    let mut kafka = KafkaSettings {
        transactional_id_prefix: id_part(
            "kafka.transactional_id_prefix",
            k.transactional_id_prefix.as_deref().unwrap_or(&k.group_id),
        )?,
        instance_id,
        brokers: non_empty("kafka.brokers", &k.brokers)?,
        group_id: non_empty("kafka.group_id", &k.group_id)?,
        input_topic: topic("kafka.input_topic", &k.input_topic)?,
        output_topic: topic("kafka.output_topic", &k.output_topic)?,
        dead_letter_topic: topic("kafka.dead_letter_topic", &k.dead_letter_topic)?,
        recheck_topic_prefix: topic(
            "kafka.recheck_topic_prefix",
            &k.recheck_topic_prefix
                .unwrap_or_else(|| format!("{}.recheck", k.input_topic)),
        )?,
        commit_interval: duration("kafka.commit_interval", k.commit_interval)?,
        common: KafkaProperties(k.common),
        consumer: KafkaProperties(k.consumer),
        producer: KafkaProperties(k.producer),
        max_record_bytes: 0,
    };
    if kafka.output_topic == kafka.input_topic || kafka.dead_letter_topic == kafka.input_topic {
        return Err(ConfigError::new(
            "kafka.output_topic",
            "the output and dead-letter topics must differ from the input topic",
        ));
    }
    kafka.max_record_bytes = producer_guarantees(&kafka)?;
    Ok(kafka)
}

fn schema_registry(
    r: RawRegistry,
    output_topic: &str,
    env: Env<'_>,
) -> Result<RegistrySettings, ConfigError> {
    Ok(RegistrySettings {
        url: http_url("schema_registry.url", &r.url)?,
        username: r.username,
        password: r
            .password
            .map(|p| secret("schema_registry.password", &p, env))
            .transpose()?,
        auto_register: r.auto_register,
        subject: r.subject.unwrap_or_else(|| format!("{output_topic}-value")),
    })
}

fn processing(p: RawProcessing, kafka: &KafkaSettings) -> Result<ProcessingSettings, ConfigError> {
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
            .map(|id| bounded_u32("processing.accepted_schema_ids", *id, 0, i32::MAX as u32))
            .collect::<Result<_, _>>()?,
        default_connector: non_empty("processing.default_connector", &p.default_connector)?,
        default_merchant: non_empty("processing.default_merchant", &p.default_merchant)?,
        shutdown_timeout: duration("processing.shutdown_timeout", p.shutdown_timeout)?,
        stuck_after: duration("processing.stuck_after", p.stuck_after)?,
        follow: p.follow,
        guarantee: match p.guarantee.as_str() {
            "at_least_once" => Guarantee::AtLeastOnce,
            "exactly_once" => Guarantee::ExactlyOnce,
            other => {
                return Err(ConfigError::new(
                    "processing.guarantee",
                    format!("`{other}` is not one of at_least_once, exactly_once"),
                ))
            }
        },
        transaction_interval: duration("processing.transaction_interval", p.transaction_interval)?,
        max_pending_records: bounded(
            "processing.max_pending_records",
            p.max_pending_records,
            1,
            10_000_000,
        )?,
        recheck_gate_timeout: duration("processing.recheck_gate_timeout", p.recheck_gate_timeout)?,
        recheck_discovery_interval: duration(
            "processing.recheck_discovery_interval",
            p.recheck_discovery_interval,
        )?,
    };
    if processing.guarantee == Guarantee::ExactlyOnce {
        exactly_once_properties(kafka, processing.transaction_interval)?;
    }
    if processing.max_request_bytes + DEAD_LETTER_RESERVE > kafka.max_record_bytes {
        return Err(ConfigError::new(
            "processing.max_request_bytes",
            format!(
                "{} bytes plus {DEAD_LETTER_RESERVE} for a dead letter's key and headers exceed the producer's message.max.bytes ({}): a rejected request could not be dead-lettered whole",
                processing.max_request_bytes, kafka.max_record_bytes
            ),
        ));
    }
    Ok(processing)
}

/// One account: the fields every account has (`requests_per_second`,
/// `webhook_secret`, `webhook_path_token`), then its scheme's own; anything
/// else is an unknown field.
fn account(
    key: &str,
    scheme: &dyn AuthScheme,
    raw: serde_json::Value,
    env: Env<'_>,
) -> Result<Account, ConfigError> {
    let serde_json::Value::Object(mut table) = raw else {
        return Err(ConfigError::new(
            key,
            format!("must be a table of {}", scheme.fields().join(", ")),
        ));
    };
    let requests_per_second = match table.remove("requests_per_second") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => {
            let k = format!("{key}.requests_per_second");
            let n = v
                .as_i64()
                .ok_or_else(|| ConfigError::new(&k, "must be a whole number"))?;
            Some(bounded_u32(&k, n, 1, 1_000_000)?)
        }
    };
    let mut fields = TableFields {
        key,
        table: &mut table,
        env,
    };
    let webhook_secret = fields
        .secret("webhook_secret")
        .map_err(|e| field_error(key, scheme, e))?;
    let webhook_path_token = fields
        .secret("webhook_path_token")
        .map_err(|e| field_error(key, scheme, e))?;
    if let Some(t) = &webhook_path_token {
        use secrecy::ExposeSecret;
        let v = t.expose_secret();
        if v.len() < 16
            || v.len() > 128
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::new(
                format!("{key}.webhook_path_token"),
                "must be 16 to 128 characters of [A-Za-z0-9_-] (it is a path segment and a secret)",
            ));
        }
    }
    let credential = scheme
        .credential(&mut fields)
        .map_err(|e| field_error(key, scheme, e))?;
    if let Some(unknown) = table.keys().next() {
        return Err(ConfigError::new(
            format!("{key}.{unknown}"),
            format!(
                "unknown field: this connector's accounts ({}) take {}, requests_per_second, webhook_secret and webhook_path_token",
                scheme.name(),
                scheme.fields().join(", ")
            ),
        ));
    }
    Ok(Account {
        credential,
        requests_per_second,
        webhook_secret,
        webhook_path_token,
    })
}

fn field_error(key: &str, scheme: &dyn AuthScheme, e: FieldError) -> ConfigError {
    ConfigError::new(
        format!("{key}.{}", e.field),
        format!(
            "{} (this connector's accounts take {})",
            e.why,
            scheme.fields().join(", ")
        ),
    )
}

/// An account's table as its scheme reads it: each field read is taken out
/// (what is left is unknown); secrets resolved from files and the
/// environment.
struct TableFields<'a> {
    key: &'a str,
    table: &'a mut serde_json::Map<String, serde_json::Value>,
    env: Env<'a>,
}

impl AccountFields for TableFields<'_> {
    fn text(&mut self, name: &'static str) -> Result<Option<String>, FieldError> {
        Ok(match self.table.remove(name) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                Some(v.to_string())
            }
            Some(_) => {
                return Err(FieldError {
                    field: name,
                    why: "must be a string".into(),
                })
            }
        })
    }

    fn secret(&mut self, name: &'static str) -> Result<Option<SecretString>, FieldError> {
        let Some(v) = self.table.remove(name).filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let source: SecretSource = serde_json::from_value(v).map_err(|_| FieldError {
            field: name,
            why: "must be a string, { env = \"VAR\" } or { file = \"/path\" }".into(),
        })?;
        secret(&format!("{}.{name}", self.key), &source, self.env)
            .map(Some)
            .map_err(|e| FieldError {
                field: name,
                why: e.message,
            })
    }
}

fn connector(
    name: &str,
    c: RawConnector,
    env: Env<'_>,
    max_in_flight: usize,
) -> Result<ConnectorSettings, ConfigError> {
    let key = |k: &str| format!("connectors.{name}.{k}");
    let Some(translator) = registry::get(name) else {
        return Err(ConfigError::new(
            format!("connectors.{name}"),
            format!("unknown connector; known: {}", registry::names().join(", ")),
        ));
    };
    let base_url = http_url(
        &key("base_url"),
        c.base_url
            .as_deref()
            .unwrap_or(translator.default_base_url()),
    )?;
    let scheme = translator.auth();
    let mut accounts = BTreeMap::new();
    for (merchant, raw) in c.accounts {
        let a = account(&key(&format!("accounts.{merchant}")), scheme, raw, env)?;
        if a.webhook_secret.is_some() && !translator.signs_webhooks() {
            return Err(ConfigError::new(
                key(&format!("accounts.{merchant}.webhook_secret")),
                format!("{name} signs no webhooks, so this secret would protect nothing; remove it (a webhook_path_token keeps the route private)"),
            ));
        }
        accounts.insert(merchant, a);
    }
    if accounts.is_empty() {
        return Err(ConfigError::new(
            key("accounts"),
            format!(
                "at least one account is required, e.g. [connectors.{name}.accounts.default] with {}",
                scheme.fields().join(" and ")
            ),
        ));
    }
    let r = c.retry;
    let retry = RetrySettings {
        max_attempts: bounded_u32(&key("retry.max_attempts"), r.max_attempts, 1, 100)?,
        initial_backoff: duration(&key("retry.initial_backoff"), r.initial_backoff)?,
        max_backoff: duration(&key("retry.max_backoff"), r.max_backoff)?,
        max_elapsed: duration(&key("retry.max_elapsed"), r.max_elapsed)?,
        max_retry_after: duration(&key("retry.max_retry_after"), r.max_retry_after)?,
        max_throttled: duration(&key("retry.max_throttled"), r.max_throttled)?,
    };
    let circuit = BreakerSettings {
        failure_threshold: bounded_u32(
            &key("circuit.failure_threshold"),
            c.circuit.failure_threshold,
            1,
            1000,
        )?,
        cooldown: duration(&key("circuit.cooldown"), c.circuit.cooldown)?,
        max_cooldown: duration(&key("circuit.max_cooldown"), c.circuit.max_cooldown)?,
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
            let rps = bounded_u32(
                &key("rate_limit.requests_per_second"),
                r.requests_per_second,
                1,
                1_000_000,
            )?;
            let burst = bounded_u32(
                &key("rate_limit.burst"),
                r.burst.unwrap_or(i64::from(rps)),
                1,
                1_000_000,
            )?;
            Some(RateLimit {
                requests_per_second: rps,
                burst,
            })
        }
    };
    let follow = c.follow.map(|f| follow(&key("follow"), f)).transpose()?;
    let api_version = match (c.api_version, translator.api_version()) {
        (None, pinned) => pinned.map(|(_, v)| v.to_owned()),
        (Some(_), None) => {
            return Err(ConfigError::new(
                key("api_version"),
                format!("{name} pins no API version"),
            ))
        }
        (Some(v), Some(_)) => {
            if v.is_empty()
                || v.len() > 64
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            {
                return Err(ConfigError::new(
                    key("api_version"),
                    "must be a version such as 2022-11-15",
                ));
            }
            Some(v)
        }
    };
    if c.webhook_tolerance.is_some() && !translator.signs_with_timestamp() {
        return Err(ConfigError::new(
            key("webhook_tolerance"),
            format!("{name}'s webhook signatures carry no timestamp"),
        ));
    }
    let webhook_tolerance = match c.webhook_tolerance {
        Some(t)
            if t < std::time::Duration::from_secs(1)
                || t > std::time::Duration::from_secs(86_400) =>
        {
            return Err(ConfigError::new(
                key("webhook_tolerance"),
                "must be between 1s and 24h",
            ))
        }
        Some(t) => t,
        None => std::time::Duration::from_secs(300),
    };
    let webhook_max_body_bytes = match c.webhook_max_body_bytes {
        Some(n) => Some(bounded(
            &key("webhook_max_body_bytes"),
            n,
            1024,
            16 * 1024 * 1024,
        )?),
        None => translator.webhook_max_body_bytes(),
    };
    let concurrency = match c.concurrency {
        RawConcurrency::Word(w) if w == "adaptive" => Concurrency::Adaptive,
        RawConcurrency::Fixed(n) => {
            Concurrency::Fixed(bounded_u32(&key("concurrency"), n, 1, 100_000)?)
        }
        RawConcurrency::Word(w) => {
            return Err(ConfigError::new(
                key("concurrency"),
                format!("`{w}` is neither \"adaptive\" nor a number of calls in flight"),
            ))
        }
    };
    Ok(ConnectorSettings {
        gateway: GatewaySettings {
            concurrency,
            concurrency_ceiling: max_in_flight,
            recheck_share: follow.as_ref().map_or(0.3, |f| f.share),
            base_url,
            connect_timeout: duration(&key("connect_timeout"), c.connect_timeout)?,
            request_timeout: duration(&key("request_timeout"), c.request_timeout)?,
            token_refresh_margin: duration(&key("token_refresh_margin"), c.token_refresh_margin)?,
            max_response_bytes: bounded(
                &key("max_response_bytes"),
                c.max_response_bytes,
                1024,
                64 * 1024 * 1024,
            )?,
            http2: match c.http2.as_str() {
                "auto" => Http2::Auto,
                "never" => Http2::Never,
                "prior_knowledge" => Http2::PriorKnowledge,
                other => {
                    return Err(ConfigError::new(
                        key("http2"),
                        format!("`{other}` is not one of auto, never, prior_knowledge"),
                    ))
                }
            },
            retry,
            circuit,
            rate_limit,
            accounts,
            api_version,
        },
        follow,
        webhook_tolerance,
        webhook_max_body_bytes,
    })
}

fn follow(key: &str, f: RawFollow) -> Result<FollowSettings, ConfigError> {
    let schedule_key = format!("{key}.schedule");
    let mut schedule = Vec::with_capacity(f.schedule.len());
    for (delay, count) in &f.schedule {
        let d = humantime::parse_duration(delay.trim()).map_err(|e| {
            ConfigError::new(
                &schedule_key,
                format!("`{delay}` is not a duration like 60s: {e}"),
            )
        })?;
        if d < Duration::from_secs(1) || d.subsec_nanos() != 0 {
            return Err(ConfigError::new(
                &schedule_key,
                format!("`{delay}`: delays are whole seconds, at least 1s"),
            ));
        }
        let d = duration(&schedule_key, d)?;
        schedule.push((d, bounded_u32(&schedule_key, *count, 1, 1000)?));
    }
    if schedule.is_empty() {
        return Err(ConfigError::new(
            &schedule_key,
            "needs at least one (delay, count) tier",
        ));
    }
    let publish = match f.publish.as_str() {
        "changes" => PublishMode::Changes,
        "every_check" => PublishMode::EveryCheck,
        other => {
            return Err(ConfigError::new(
                format!("{key}.publish"),
                format!("`{other}` is not one of changes, every_check"),
            ))
        }
    };
    if !(0.0..=1.0).contains(&f.share) {
        return Err(ConfigError::new(
            format!("{key}.share"),
            format!("{} is not a share between 0 and 1", f.share),
        ));
    }
    Ok(FollowSettings {
        schedule,
        publish,
        share: f.share,
    })
}

fn webhooks(w: RawWebhooks) -> Result<WebhookSettings, ConfigError> {
    let rps = bounded_u32(
        "webhooks.requests_per_second",
        w.requests_per_second,
        1,
        1_000_000,
    )?;
    Ok(WebhookSettings {
        listen: w.listen.parse().map_err(|_| {
            ConfigError::new(
                "webhooks.listen",
                format!("`{}` is not an address like 0.0.0.0:9465", w.listen),
            )
        })?,
        follow: w.follow,
        max_body_bytes: bounded(
            "webhooks.max_body_bytes",
            w.max_body_bytes,
            64,
            16 * 1024 * 1024,
        )?,
        ack_timeout: duration("webhooks.ack_timeout", w.ack_timeout)?,
        requests_per_second: rps,
        burst: bounded_u32(
            "webhooks.burst",
            w.burst.unwrap_or(i64::from(rps) * 2),
            1,
            10_000_000,
        )?,
        // Zero turns deduplication off.
        dedupe_window: if w.dedupe_window.is_zero() {
            Duration::ZERO
        } else {
            duration("webhooks.dedupe_window", w.dedupe_window)?
        },
        header_read_timeout: duration("webhooks.header_read_timeout", w.header_read_timeout)?,
        body_read_timeout: duration("webhooks.body_read_timeout", w.body_read_timeout)?,
        max_connections: w
            .max_connections
            .map(|n| bounded("webhooks.max_connections", n, 1, 1_000_000))
            .transpose()?,
        idle_timeout: duration("webhooks.idle_timeout", w.idle_timeout)?,
        connection_lifetime: duration("webhooks.connection_lifetime", w.connection_lifetime)?,
        max_requests_per_connection: bounded_u32(
            "webhooks.max_requests_per_connection",
            w.max_requests_per_connection,
            1,
            1_000_000,
        )?,
        write_timeout: duration("webhooks.write_timeout", w.write_timeout)?,
        max_headers: bounded("webhooks.max_headers", w.max_headers, 8, 1000)?,
        max_header_bytes: bounded(
            "webhooks.max_header_bytes",
            w.max_header_bytes,
            1024,
            1024 * 1024,
        )?,
        max_verifications_per_second: bounded_u32(
            "webhooks.max_verifications_per_second",
            w.max_verifications_per_second,
            1,
            10_000_000,
        )?,
        trusted_proxies: w
            .trusted_proxies
            .iter()
            .map(|n| trusted_proxy(n))
            .collect::<Result<_, _>>()?,
        tls: match (w.tls_cert, w.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: non_empty("webhooks.tls_cert", &cert)?.into(),
                key: non_empty("webhooks.tls_key", &key)?.into(),
            }),
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "webhooks.tls_key",
                    "tls_cert needs its private key in tls_key",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "webhooks.tls_cert",
                    "tls_key needs its certificate chain in tls_cert",
                ))
            }
        },
    })
}

/// A trusted proxy network: `10.0.0.0/8`, `2001:db8::/32`, or one address.
fn trusted_proxy(text: &str) -> Result<ipnet::IpNet, ConfigError> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            ConfigError::new(
                "webhooks.trusted_proxies",
                format!("`{text}` is not a network like 10.0.0.0/8 or an address"),
            )
        })
}

impl RawSettings {
    pub(super) fn validate(self, env: Env<'_>) -> Result<Settings, ConfigError> {
        let kafka = kafka(self.kafka, env)?;
        let schema_registry = self
            .schema_registry
            .map(|r| schema_registry(r, &kafka.output_topic, env))
            .transpose()?;
        let processing = processing(self.processing, &kafka)?;
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
            let settings = connector(&name, c, env, processing.max_in_flight)?;
            connectors.insert(name, settings);
        }
        if !connectors.contains_key(&processing.default_connector) {
            let name = &processing.default_connector;
            return Err(if connectors.is_empty() {
                ConfigError::new(
                    format!("connectors.{name}"),
                    format!("no connector is configured; add [connectors.{name}] with at least one account (or another connector and processing.default_connector)"),
                )
            } else {
                ConfigError::new(
                    "processing.default_connector",
                    format!("`{name}` has no [connectors.{name}] table; configure it or name one of: {}", connectors.keys().cloned().collect::<Vec<_>>().join(", ")),
                )
            });
        }
        let webhooks = self.webhooks.map(webhooks).transpose()?;
        if let Some(w) = &webhooks {
            if w.listen == http.listen && w.listen.port() != 0 {
                return Err(ConfigError::new(
                    "webhooks.listen",
                    "must differ from http.listen (the intake has its own listener)",
                ));
            }
        }
        Ok(Settings {
            webhooks,
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
