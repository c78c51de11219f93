//! Everything that talks to Kafka (the only module that uses rdkafka): client
//! configuration, the engine's consumer ([`source`], the rdkafka
//! implementation of `pipeline::source::Source`), the idempotent [`producer`]
//! (at least once) and the transactional one ([`transactions`], exactly once),
//! [`redrive`], [`headers`] as bytes, and [`admin`] helpers for topics.

pub mod admin;
pub mod headers;
pub mod intake_producer;
pub mod producer;
pub mod redrive;
pub mod source;
pub mod tools;
pub mod transactions;

use rdkafka::ClientConfig;

use crate::config::{KafkaProperties, KafkaSettings};

/// Consumer settings paysync depends on for at-least-once delivery; a user value
/// for these keys is overridden (with a warning).
const CONSUMER_FORCED: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
];

/// Consumer defaults a user may override.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("auto.offset.reset", "earliest"),
    // librdkafka's default, written out: records of aborted transactions are
    // never read (re-check records of an aborted transaction must not run).
    ("isolation.level", "read_committed"),
    ("statistics.interval.ms", "5000"),
    // Bounded prefetch: memory stays flat whatever the backlog. The engine reads
    // each partition from its own queue, so these bounds apply per partition: at
    // most 1,000 messages or ~1 MiB queued, plus one fetch (256 KiB) each. 1,000
    // instead of 2,000: 7–11 MiB less peak RSS for a 100,000 backlog over 32
    // partitions at the same throughput and CPU; 500 cost a third of the
    // throughput on the mock cluster (README, benchmarks).
    ("queued.max.messages.kbytes", "1024"),
    ("queued.min.messages", "1000"),
    ("max.partition.fetch.bytes", "262144"),
    ("fetch.max.bytes", "4194304"),
    ("fetch.wait.max.ms", "10"),
    ("partition.assignment.strategy", "range,roundrobin"),
];

/// Producer defaults a user may override.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // A slot in flight is freed when its event is acknowledged: librdkafka's 5 ms
    // took 50 ms calls at 500 in flight from 0.90 to 0.86 of Little's law (see the
    // README's benchmarks); 2 ms costs some batching.
    ("linger.ms", "2"),
    // A broker that is briefly unreachable is waited out: librdkafka retries for
    // this long, then paysync retries the publish itself.
    ("message.timeout.ms", "60000"),
];

fn build(
    settings: &KafkaSettings,
    defaults: &[(&str, &str)],
    own: &KafkaProperties,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (k, v) in defaults {
        config.set(*k, *v);
    }
    for (k, v) in settings.common.iter().chain(own.iter()) {
        config.set(k, v);
    }
    config
}

/// The consumer's configuration.
pub fn consumer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = build(settings, CONSUMER_DEFAULTS, &settings.consumer);
    config.set("group.id", &settings.group_id);
    for (k, v) in CONSUMER_FORCED {
        if config.get(k).is_some_and(|user| user != *v) {
            tracing::warn!(
                property = k,
                "overriding a consumer property that would break at-least-once delivery"
            );
        }
        config.set(*k, *v);
    }
    config
}

/// The producer's configuration.
pub fn producer_config(settings: &KafkaSettings) -> ClientConfig {
    build(settings, PRODUCER_DEFAULTS, &settings.producer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn layering_and_forced_properties() {
        let s = Settings::from_toml(
            r#"
[kafka.common]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "PLAIN"
[kafka.consumer]
"enable.auto.commit" = "true"
"session.timeout.ms" = "6000"
[kafka.producer]
"linger.ms" = "20"
[connectors.cm.accounts.default]
client_id = "a"
client_secret = "b"
"#,
        )
        .unwrap();
        let c = consumer_config(&s.kafka);
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("session.timeout.ms"), Some("6000"));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("group.id"), Some("paysync"));
        let p = producer_config(&s.kafka);
        assert_eq!(p.get("linger.ms"), Some("20"));
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(p.get("session.timeout.ms"), None);
    }

    #[test]
    fn sasl_and_ssl_settings_are_accepted_by_librdkafka() {
        // librdkafka validates security settings when a client is created (no broker
        // needed): this fails if it was built without SSL or SASL/SCRAM support.
        let s = Settings::from_toml(
            r#"
[kafka]
brokers = "127.0.0.1:1"
[kafka.common]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "paysync"
"sasl.password" = "secret"
"ssl.endpoint.identification.algorithm" = "https"
[connectors.cm.accounts.default]
client_id = "a"
client_secret = "b"
"#,
        )
        .unwrap();
        let producer: Result<rdkafka::producer::BaseProducer, _> =
            producer_config(&s.kafka).create();
        assert!(producer.is_ok(), "{:?}", producer.err());
        let consumer: Result<rdkafka::consumer::BaseConsumer, _> =
            consumer_config(&s.kafka).create();
        assert!(consumer.is_ok(), "{:?}", consumer.err());
        for mechanism in ["PLAIN", "SCRAM-SHA-256", "OAUTHBEARER"] {
            let mut c = producer_config(&s.kafka);
            c.set("sasl.mechanism", mechanism);
            let p: Result<rdkafka::producer::BaseProducer, _> = c.create();
            assert!(p.is_ok(), "{mechanism}: {:?}", p.err());
        }
    }
}
