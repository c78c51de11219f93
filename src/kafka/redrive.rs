//! `paysync redrive`: sends dead letters back to the input topic after their
//! cause was fixed (an account added, a connector back). Each letter goes back
//! with its original key, value and headers (the `paysync-*` headers removed,
//! `paysync-redriven-from: <topic>:<partition>:<offset>` added), once: the
//! position is kept in a consumer group of its own (`<group_id>.redrive`, plus
//! `.<reasons>` when filtered by reason), committed only for what the broker
//! acknowledged. A letter whose value was cut to fit (`paysync-value-truncated`)
//! cannot be sent back as it was; it is counted and listed instead.
//!
//! The run reads up to the dead-letter topic's end as it was at the start, so it
//! always finishes.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use super::headers::{self, OwnedHeader};
use super::{consumer_config, producer_config};
use crate::config::Settings;

/// The header naming the dead letter a redriven request came from.
pub const REDRIVEN_FROM: &str = "paysync-redriven-from";

/// What to send back.
#[derive(Debug, Clone, Default)]
pub struct RedriveOptions {
    /// Only letters with one of these `paysync-error-code`s (all when empty).
    pub reasons: Vec<String>,
    /// Send at most this many.
    pub max: Option<u64>,
    /// Count and list only.
    pub dry_run: bool,
}

/// Letters seen, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sent back (or, in a dry run, would be).
    pub redriven: u64,
    /// Left alone: another reason than asked for.
    pub filtered: u64,
    /// Not sent back: the value was truncated.
    pub truncated: u64,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RedriveReport {
    /// The consumer group holding the position.
    pub group: String,
    /// A dry run.
    pub dry_run: bool,
    /// Per `paysync-error-code`.
    pub by_reason: BTreeMap<String, Counts>,
    /// `<topic>:<partition>:<offset>` of each truncated letter seen.
    pub truncated: Vec<String>,
    /// Offset ranges the broker did not return (retention, compaction).
    pub gaps: Vec<String>,
    /// Stopped at `--max`.
    pub hit_max: bool,
    /// Why the run stopped early (a letter the broker did not take).
    pub failed: Option<String>,
}

impl RedriveReport {
    /// Letters sent back.
    pub fn redriven(&self) -> u64 {
        self.by_reason.values().map(|c| c.redriven).sum()
    }
}

impl fmt::Display for RedriveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would redrive"
        } else {
            "redriven"
        };
        writeln!(
            f,
            "group {}{}",
            self.group,
            if self.dry_run {
                " (dry run: nothing sent, nothing committed)"
            } else {
                ""
            }
        )?;
        for (reason, c) in &self.by_reason {
            writeln!(
                f,
                "{reason}: {verb} {}, filtered out {}, truncated (not redriven) {}",
                c.redriven, c.filtered, c.truncated
            )?;
        }
        writeln!(f, "total {verb}: {}", self.redriven())?;
        for t in &self.truncated {
            writeln!(f, "truncated, not redriven: {t}")?;
        }
        for g in &self.gaps {
            writeln!(
                f,
                "not returned by the broker (retention or compaction): {g}"
            )?;
        }
        if self.hit_max {
            writeln!(f, "stopped at --max; run again for the rest")?;
        }
        if let Some(why) = &self.failed {
            writeln!(f, "stopped: {why}")?;
        }
        Ok(())
    }
}

/// Why a run could not start or read.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// A Kafka client error.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The dead-letter topic does not exist.
    #[error("topic `{0}` does not exist")]
    NoTopic(String),
}

impl RedriveError {
    /// Process exit code.
    pub fn exit_code(&self) -> u8 {
        1
    }
}

/// The consumer group for a reason filter.
pub fn group_for(group_id: &str, reasons: &[String]) -> String {
    let mut reasons = reasons.to_vec();
    reasons.sort();
    reasons.dedup();
    if reasons.is_empty() {
        format!("{group_id}.redrive")
    } else {
        format!("{group_id}.redrive.{}", reasons.join("+"))
    }
}

/// The headers a redriven letter carries: its own minus `paysync-*`, plus where
/// it came from.
pub fn redriven_headers(letter: &[OwnedHeader], from: &str) -> Vec<OwnedHeader> {
    let mut out: Vec<OwnedHeader> = letter
        .iter()
        .filter(|(k, _)| !k.starts_with(b"paysync-"))
        .cloned()
        .collect();
    out.push((
        REDRIVEN_FROM.as_bytes().to_vec(),
        Some(from.as_bytes().to_vec()),
    ));
    out
}

fn header<'a>(hs: &'a [OwnedHeader], name: &str) -> Option<&'a [u8]> {
    hs.iter()
        .find(|(k, _)| k == name.as_bytes())
        .and_then(|(_, v)| v.as_deref())
}

/// Runs a redrive (blocking Kafka calls on a blocking thread).
pub async fn run(
    settings: &Settings,
    options: &RedriveOptions,
) -> Result<RedriveReport, RedriveError> {
    let settings = settings.clone();
    let options = options.clone();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || run_blocking(&settings, &options, &handle))
        .await
        .unwrap_or_else(|e| {
            Ok(RedriveReport {
                failed: Some(format!("the redrive task failed: {e}")),
                ..Default::default()
            })
        })
}

fn run_blocking(
    settings: &Settings,
    options: &RedriveOptions,
    handle: &tokio::runtime::Handle,
) -> Result<RedriveReport, RedriveError> {
    let k = &settings.kafka;
    let dlq = k.dead_letter_topic.as_str();
    let group = group_for(&k.group_id, &options.reasons);
    let mut config = consumer_config(k);
    config.set("group.id", &group);
    config.set("enable.partition.eof", "false");
    let consumer: BaseConsumer = config.create()?;
    let producer: FutureProducer = producer_config(k).create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(dlq), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(RedriveError::NoTopic(dlq.to_owned()));
    }
    // Where to start (the group's position) and where to stop (the end now).
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition(dlq, *p);
    }
    let committed = consumer.committed_offsets(wanted, timeout)?;
    let mut start = TopicPartitionList::new();
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut end: BTreeMap<i32, i64> = BTreeMap::new();
    for p in &partitions {
        let (low, high) = consumer.fetch_watermarks(dlq, *p, timeout)?;
        let from = match committed.find_partition(dlq, *p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        next.insert(*p, from);
        end.insert(*p, high);
        if from < high {
            start.add_partition_offset(dlq, *p, Offset::Offset(from))?;
        }
    }
    let mut report = RedriveReport {
        group: group.clone(),
        dry_run: options.dry_run,
        ..Default::default()
    };
    let done = |next: &BTreeMap<i32, i64>| next.iter().all(|(p, o)| *o >= end[p]);
    if start.count() > 0 {
        consumer.assign(&start)?;
    }
    let mut idle = 0;
    'read: while !done(&next) {
        let Some(result) = consumer.poll(Duration::from_millis(500)) else {
            idle += 1;
            if idle > 60 {
                report.failed = Some("no progress reading the dead-letter topic for 30 s".into());
                break;
            }
            continue;
        };
        idle = 0;
        let m = match result {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "reading dead letters");
                continue;
            }
        };
        let (p, o) = (m.partition(), m.offset());
        if o < next[&p] || o >= end[&p] {
            continue;
        }
        if o > next[&p] {
            // Offsets the broker did not return (retention, compaction).
            report
                .gaps
                .push(format!("{dlq}:{p}:{}..{}", next[&p], o - 1));
        }
        let hs = m.headers().map(headers::read).unwrap_or_default();
        let reason = header(&hs, "paysync-error-code")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let from = format!("{dlq}:{p}:{o}");
        if !options.reasons.is_empty() && !options.reasons.contains(&reason) {
            report.by_reason.entry(reason).or_default().filtered += 1;
        } else if header(&hs, "paysync-value-truncated").is_some() {
            report
                .by_reason
                .entry(reason.clone())
                .or_default()
                .truncated += 1;
            report.truncated.push(format!("{from} ({reason})"));
        } else {
            if options.max.is_some_and(|max| report.redriven() >= max) {
                report.hit_max = true;
                break 'read;
            }
            if !options.dry_run {
                let out = redriven_headers(&hs, &from);
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&k.input_topic)
                    .headers(headers::build(
                        out.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
                    ));
                if let Some(key) = m.key() {
                    record = record.key(key);
                }
                if let Some(value) = m.payload() {
                    record = record.payload(value);
                }
                let delivery =
                    handle.block_on(producer.send(record, Timeout::After(Duration::from_secs(30))));
                if let Err((e, _)) = delivery {
                    report.failed = Some(format!("{from} was not accepted by the broker: {e}"));
                    break 'read;
                }
            }
            report.by_reason.entry(reason).or_default().redriven += 1;
        }
        next.insert(p, o + 1);
    }
    if !options.dry_run {
        let mut positions = TopicPartitionList::new();
        for (p, o) in &next {
            positions.add_partition_offset(dlq, *p, Offset::Offset(*o))?;
        }
        consumer.commit(&positions, CommitMode::Sync)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_per_reason_filter() {
        assert_eq!(group_for("paysync", &[]), "paysync.redrive");
        let r = vec!["unknown_merchant".to_owned(), "invalid_json".to_owned()];
        assert_eq!(
            group_for("paysync", &r),
            "paysync.redrive.invalid_json+unknown_merchant"
        );
    }

    #[test]
    fn redriven_headers_drop_paysync_ones_and_say_where_from() {
        let letter: Vec<OwnedHeader> = vec![
            (b"x-request-id".to_vec(), Some(b"r-1".to_vec())),
            (
                b"paysync-error-code".to_vec(),
                Some(b"unknown_merchant".to_vec()),
            ),
            (b"\xff\xfe".to_vec(), None),
            (b"paysync-source-offset".to_vec(), Some(b"7".to_vec())),
        ];
        let out = redriven_headers(&letter, "dlq:0:3");
        assert_eq!(
            out,
            vec![
                (b"x-request-id".to_vec(), Some(b"r-1".to_vec())),
                (b"\xff\xfe".to_vec(), None),
                (REDRIVEN_FROM.as_bytes().to_vec(), Some(b"dlq:0:3".to_vec())),
            ]
        );
    }
}
