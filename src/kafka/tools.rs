//! Kafka tooling for the demo, the tests and the benchmark: an in-process mock
//! cluster, a raw producer of request records, and an independent reader of the
//! output topics. Not used by `paysync run`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;

/// librdkafka's in-process mock cluster (one broker).
pub struct MockBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl MockBroker {
    /// Starts a mock cluster and creates `topics` (name, partitions).
    pub fn start(topics: &[(&str, i32)]) -> Result<Self, String> {
        let cluster = MockCluster::new(1).map_err(|e| format!("mock cluster: {e}"))?;
        for (name, partitions) in topics {
            cluster
                .create_topic(name, *partitions, 1)
                .map_err(|e| format!("mock topic {name}: {e}"))?;
        }
        Ok(MockBroker { cluster })
    }

    /// Creates a topic.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), String> {
        self.cluster
            .create_topic(name, partitions, 1)
            .map_err(|e| format!("mock topic {name}: {e}"))
    }

    /// Takes the (only) broker down: connections are refused until [`MockBroker::broker_up`].
    pub fn broker_down(&self) -> Result<(), String> {
        self.cluster.broker_down(1).map_err(|e| e.to_string())
    }

    /// Brings the broker back.
    pub fn broker_up(&self) -> Result<(), String> {
        self.cluster.broker_up(1).map_err(|e| e.to_string())
    }

    /// Makes the broker answer metadata for `topic` with `error` (for example
    /// `TopicAuthorizationFailed`), until cleared with `NoError`.
    pub fn topic_error(
        &self,
        topic: &str,
        error: rdkafka::types::RDKafkaRespErr,
    ) -> Result<(), String> {
        self.cluster
            .topic_error(topic, error)
            .map_err(|e| e.to_string())
    }

    /// Makes the next requests of `api` fail with `errors`, one error per request.
    pub fn request_errors(
        &self,
        api: rdkafka::types::RDKafkaApiKey,
        errors: &[rdkafka::types::RDKafkaRespErr],
    ) {
        self.cluster.request_errors(api, errors);
    }

    /// The bootstrap servers.
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

/// A record as read from a topic.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// The record's timestamp (ms since the epoch), when it has one.
    pub timestamp: Option<i64>,
    /// Headers as bytes (names may not be UTF-8, values may be null).
    pub headers: Vec<super::headers::OwnedHeader>,
}

impl RawRecord {
    /// The first header with this name, as (lossy) UTF-8; a null value reads as "".
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned())
    }
}

/// A plain producer for request records.
pub struct RawProducer {
    producer: FutureProducer,
}

impl RawProducer {
    /// Connects to `brokers`.
    pub fn new(brokers: &str) -> Result<Self, String> {
        Self::with(brokers, &[])
    }

    /// Connects to `brokers` with extra librdkafka properties (for example a larger
    /// `message.max.bytes`, as another client might use).
    pub fn with(brokers: &str, properties: &[(&str, &str)]) -> Result<Self, String> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000");
        for (k, v) in properties {
            config.set(*k, *v);
        }
        let producer = config.create().map_err(|e| format!("producer: {e}"))?;
        Ok(RawProducer { producer })
    }

    /// Sends one record and waits for the acknowledgement; returns (partition, offset).
    pub async fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Result<(i32, i64), String> {
        let raw: Vec<(&[u8], Option<&[u8]>)> = headers
            .iter()
            .map(|(k, v)| (k.as_bytes(), Some(*v)))
            .collect();
        self.send_raw(topic, partition, key, value, &raw).await
    }

    /// Sends one record with headers given as bytes (names that are not UTF-8,
    /// null values), as other clients can write them.
    pub async fn send_raw(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&[u8], Option<&[u8]>)],
    ) -> Result<(i32, i64), String> {
        let h = super::headers::build(headers.iter().copied());
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(h);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        self.producer
            .send(record, Timeout::Never)
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| e.to_string())
    }

    /// Queues a record without waiting (bulk loads); call [`RawProducer::flush`] after.
    pub fn enqueue(&self, topic: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).key(key).payload(value);
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| e.to_string())?;
        drop(delivery);
        Ok(())
    }

    /// Queues a record, waiting for queue space when the local queue is full.
    pub fn enqueue_blocking(&self, topic: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
        self.enqueue_raw(topic, None, Some(key), Some(value), &[])
    }

    /// Queues a record with headers as bytes and an optional partition, waiting for
    /// queue space when the local queue is full; call [`RawProducer::flush`] after.
    pub fn enqueue_raw(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&[u8], Option<&[u8]>)],
    ) -> Result<(), String> {
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(topic).headers(super::headers::build(headers.iter().copied()));
            if let Some(p) = partition {
                record = record.partition(p);
            }
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(v) = value {
                record = record.payload(v);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    drop(delivery);
                    return Ok(());
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => {
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.to_string()),
            }
        }
    }

    /// Waits for all queued records.
    pub fn flush(&self, timeout: Duration) -> Result<(), String> {
        self.producer.flush(timeout).map_err(|e| e.to_string())
    }
}

/// An independent reader of whole topics (no consumer group: partitions are
/// assigned from the beginning).
pub struct TopicReader {
    consumer: BaseConsumer,
    seen: HashMap<(String, i32), i64>,
    /// Where offsets jumped: (topic, partition, expected, got). A producer without
    /// transactions writes contiguous offsets, so a jump is a record not read (a
    /// retention purge or an offset reset).
    pub gaps: Vec<(String, i32, i64, i64)>,
    /// Errors the consumer reported while reading.
    pub errors: Vec<String>,
}

impl TopicReader {
    /// Reads `topics` from offset 0. `partitions` gives each topic's partition count.
    pub fn new(brokers: &str, topics: &[(&str, i32)]) -> Result<Self, String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "paysync-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(|e| format!("reader: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        for (topic, partitions) in topics {
            for p in 0..*partitions {
                tpl.add_partition_offset(topic, p, Offset::Beginning)
                    .map_err(|e| e.to_string())?;
            }
        }
        consumer.assign(&tpl).map_err(|e| format!("assign: {e}"))?;
        Ok(TopicReader {
            consumer,
            seen: HashMap::new(),
            gaps: Vec::new(),
            errors: Vec::new(),
        })
    }

    /// Reads until `want` new records arrived or `timeout` passed (blocking).
    pub fn read(&mut self, want: usize, timeout: Duration) -> Vec<RawRecord> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < want && Instant::now() < deadline {
            let Some(result) = self.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = match result {
                Ok(m) => m,
                Err(e) => {
                    self.errors.push(e.to_string());
                    continue;
                }
            };
            let headers = m.headers().map(super::headers::read).unwrap_or_default();
            let expected = self
                .seen
                .insert((m.topic().to_owned(), m.partition()), m.offset())
                .map_or(0, |o| o + 1);
            if m.offset() != expected {
                self.gaps
                    .push((m.topic().to_owned(), m.partition(), expected, m.offset()));
            }
            out.push(RawRecord {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                timestamp: m.timestamp().to_millis(),
                headers,
            });
        }
        out
    }
}

/// Committed offsets of `group` for `topic` partitions `0..partitions` (-1: none).
pub fn committed_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<Vec<i64>, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    Ok((0..partitions)
        .map(
            |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            },
        )
        .collect())
}
