//! Topic helpers: check that the topics exist (start-up readiness) and create
//! them (the demo and tests).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::ClientConfig;

/// Topics from `wanted` that the cluster does not have (empty: all exist).
pub fn missing_topics(
    producer: &FutureProducer,
    wanted: &[&str],
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let metadata = producer
        .client()
        .fetch_metadata(None, timeout)
        .map_err(|e| format!("cannot reach the Kafka cluster: {e}"))?;
    Ok(wanted
        .iter()
        .filter(|t| {
            !metadata
                .topics()
                .iter()
                .any(|m| m.name() == **t && m.error().is_none() && !m.partitions().is_empty())
        })
        .map(|t| (*t).to_owned())
        .collect())
}

/// Topics named `<prefix>.<seconds>s` (re-check topics) in the cluster.
pub fn topics_with_prefix(
    producer: &FutureProducer,
    prefix: &str,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let metadata = producer
        .client()
        .fetch_metadata(None, timeout)
        .map_err(|e| format!("cannot reach the Kafka cluster: {e}"))?;
    let mut found: Vec<String> = metadata
        .topics()
        .iter()
        .filter(|m| m.error().is_none() && !m.partitions().is_empty())
        .map(|m| m.name().to_owned())
        .filter(|name| crate::pipeline::follow::recheck_delay(prefix, name).is_some())
        .collect();
    found.sort();
    Ok(found)
}

/// Creates topics (ignoring "already exists").
pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| format!("admin client: {e}"))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, p)| NewTopic::new(name, *p, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| format!("create topics: {e}"))?;
    for r in results {
        if let Err((topic, code)) = r {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                return Err(format!("create topic {topic}: {code}"));
            }
        }
    }
    Ok(())
}
