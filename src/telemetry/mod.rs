//! Observability: [`Metrics`] owns its own Prometheus registry with one method per
//! observable event (no global statics), and [`init_tracing`] sets up `tracing`
//! output (human text on a terminal, JSON otherwise or when configured; span
//! fields in JSON by [`span_json`]).

use std::io::IsTerminal;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::LogFormat;

mod intake;
pub mod span_json;

pub use intake::IntakeMetrics;

/// Every paysync metric. Label values are bounded: outcomes, statuses, reject
/// codes, connector names, HTTP codes, partitions.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    events_published: IntCounterVec,
    dead_letters: IntCounterVec,
    connector_requests: IntCounterVec,
    connector_duration: HistogramVec,
    connector_retries: IntCounterVec,
    token_refreshes: IntCounterVec,
    unknown_statuses: IntCounterVec,
    in_flight: IntGauge,
    processing_duration: Histogram,
    consumer_lag: IntGaugeVec,
    prefetched: IntGaugeVec,
    committed_offset: IntGaugeVec,
    commit_gap: IntGaugeVec,
    publish_retries: IntCounterVec,
    publish_refusals: IntCounterVec,
    circuit_open: IntGaugeVec,
    rate_limit_wait: HistogramVec,
    redirects_dropped: IntCounterVec,
    internal_errors: IntCounter,
    stalled_partitions: IntGauge,
    watermark_stuck: IntGaugeVec,
    token_refusals: IntCounterVec,
    follow_unavailable: IntCounterVec,
    rechecks_scheduled: IntCounterVec,
    chains_ended: IntCounterVec,
    follow_checks_skipped: IntCounterVec,
    ready: IntGauge,
    recheck_lateness: HistogramVec,
    transaction_commit: HistogramVec,
    pending_rechecks: IntGaugeVec,
    transactions: IntCounterVec,
    pending_records: IntGaugeVec,
    recheck_gate_timeouts: IntCounterVec,
    recheck_headers_dropped: IntCounterVec,
    recheck_topics: IntGauge,
    tasks_ended: IntCounterVec,
    concurrency_limit: prometheus::GaugeVec,
    throttled: IntCounterVec,
    throttled_too_long: IntCounterVec,
    /// Requests in flight per engine, summed into `in_flight`.
    in_flight_by_topic: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
    raw_connector_dropped: IntCounterVec,
    webhook_not_found: IntCounterVec,
    intake: IntakeMetrics,
}

/// Outcome of one request (`paysync_requests_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An event with a status.
    Synced,
    /// An event for a failed check.
    ConnectorError,
    /// A dead letter.
    Invalid,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Synced => "synced",
            Outcome::ConnectorError => "connector_error",
            Outcome::Invalid => "invalid",
        }
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    c
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    g
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered. Metric definitions are
    /// static, so a failure here is a programming error caught by the tests.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let connector_duration = HistogramVec::new(
            HistogramOpts::new(
                "paysync_connector_request_duration_seconds",
                "Duration of one connector HTTP call (status or token), seconds.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["connector"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(connector_duration.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let processing_duration = Histogram::with_opts(
            HistogramOpts::new(
                "paysync_processing_duration_seconds",
                "From consuming a request to the broker acknowledging its event or dead letter, seconds.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(processing_duration.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let rate_limit_wait = HistogramVec::new(
            HistogramOpts::new(
                "paysync_rate_limit_wait_seconds",
                "Time spent waiting for a client-side rate-limit permit, seconds.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["connector"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(rate_limit_wait.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let in_flight = IntGauge::new(
            "paysync_in_flight",
            "Requests accepted and not yet finished.",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(in_flight.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let ready = IntGauge::new(
            "paysync_ready",
            "1 when /readyz would answer 200 (evaluated at each scrape), 0 otherwise.",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(ready.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let recheck_lateness = HistogramVec::new(
            HistogramOpts::new(
                "paysync_recheck_lateness_seconds",
                "How long after its due time a re-check was taken, seconds.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["topic"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(recheck_lateness.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let transaction_commit = HistogramVec::new(
            HistogramOpts::new(
                "paysync_transaction_commit_seconds",
                "Exactly once: how long a transaction's commit took (its offsets and the commit itself, retries included), seconds.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["topic"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(transaction_commit.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let internal_errors = IntCounter::new(
            "paysync_internal_errors_total",
            "Requests whose processing panicked (a bug); each was dead-lettered as internal_error.",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(internal_errors.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let stalled_partitions = IntGauge::new(
            "paysync_stalled_partitions",
            "Partitions stopped by a dead letter the broker refuses permanently (uncommitted until the cause clears).",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(stalled_partitions.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let m = Metrics {
            requests: counter(r, "paysync_requests_total", "Requests processed, by outcome.", &["outcome"]),
            events_published: counter(
                r,
                "paysync_events_published_total",
                "Events acknowledged by the broker, by status.",
                &["status"],
            ),
            dead_letters: counter(
                r,
                "paysync_dead_letters_total",
                "Dead letters acknowledged by the broker, by reason.",
                &["reason"],
            ),
            connector_requests: counter(
                r,
                "paysync_connector_requests_total",
                "Connector HTTP calls, by HTTP status or timeout/transport.",
                &["connector", "code"],
            ),
            connector_duration,
            connector_retries: counter(
                r,
                "paysync_connector_retries_total",
                "Connector calls retried, by reason.",
                &["connector", "reason"],
            ),
            token_refreshes: counter(
                r,
                "paysync_token_refreshes_total",
                "Access-token requests made.",
                &["connector"],
            ),
            unknown_statuses: counter(
                r,
                "paysync_unknown_connector_status_total",
                "Connector answers with an undocumented status (published as UNRESOLVED).",
                &["connector"],
            ),
            in_flight,
            processing_duration,
            consumer_lag: gauge_vec(r, "paysync_consumer_lag", "Messages behind the high watermark (for a re-check topic: pending re-checks, waiting by design).", &["topic", "partition"]),
            prefetched: gauge_vec(
                r,
                "paysync_consumer_prefetched_messages",
                "Messages fetched from the broker and waiting in the client's bounded queue (from librdkafka statistics).",
                &["topic", "partition"],
            ),
            committed_offset: gauge_vec(
                r,
                "paysync_committed_offset",
                "Last offset committed.",
                &["topic", "partition"],
            ),
            commit_gap: gauge_vec(
                r,
                "paysync_commit_gap",
                "Highest finished offset + 1 minus the committed offset: work done but not committable yet.",
                &["topic", "partition"],
            ),
            publish_retries: counter(
                r,
                "paysync_publish_retries_total",
                "Event or dead-letter publishes retried after a delivery error.",
                &["topic"],
            ),
            publish_refusals: counter(
                r,
                "paysync_publish_refusals_total",
                "Publishes the broker refused permanently (too large, unknown topic, not authorized, invalid).",
                &["topic"],
            ),
            circuit_open: gauge_vec(r, "paysync_circuit_open", "1 while the connector's circuit is open.", &["connector"]),
            rate_limit_wait,
            redirects_dropped: counter(
                r,
                "paysync_redirects_dropped_total",
                "Redirect URLs from a connector that were not http(s) and were not published.",
                &["connector"],
            ),
            internal_errors,
            stalled_partitions,
            watermark_stuck: gauge_vec(
                r,
                "paysync_commit_watermark_stuck_seconds",
                "Seconds the partition's commit watermark has not moved while work is pending (0 when idle, moving, or waiting for a re-check to be due).",
                &["topic", "partition"],
            ),
            token_refusals: counter(
                r,
                "paysync_token_refusals_total",
                "Token requests refused by the connector's token endpoint (credentials), by account.",
                &["connector", "account"],
            ),
            follow_unavailable: counter(
                r,
                "paysync_follow_unavailable_total",
                "Requests that asked to follow a connector without follow mode (checked once).",
                &["connector"],
            ),
            rechecks_scheduled: counter(
                r,
                "paysync_rechecks_scheduled_total",
                "Re-checks scheduled (re-check records acknowledged by the broker).",
                &["connector", "delay"],
            ),
            chains_ended: counter(
                r,
                "paysync_chains_ended_total",
                "Follow chains ended: at a final status, or with the schedule used up.",
                &["connector", "outcome"],
            ),
            ready,
            follow_checks_skipped: counter(
                r,
                "paysync_follow_checks_skipped_total",
                "Repeated checks of a chain skipped because the chain had moved past them (after a restart or a rebalance).",
                &["connector"],
            ),
            recheck_lateness,
            transaction_commit,
            pending_rechecks: gauge_vec(
                r,
                "paysync_pending_rechecks",
                "Re-checks waiting in a re-check topic (its lag on the partitions this member owns).",
                &["topic"],
            ),
            transactions: counter(
                r,
                "paysync_transactions_total",
                "Kafka transactions ended (exactly once), by outcome: committed, aborted (the work is redone), rebuilt (the producer was replaced).",
                &["topic", "outcome"],
            ),
            pending_records: gauge_vec(
                r,
                "paysync_pending_records",
                "Exactly once: records of finished work buffered or in the open transaction, waiting for a commit.",
                &["topic"],
            ),
            recheck_gate_timeouts: counter(
                r,
                "paysync_recheck_gate_timeouts_total",
                "Re-checks taken although the record that scheduled them was still not committed after processing.recheck_gate_timeout.",
                &["topic"],
            ),
            recheck_headers_dropped: counter(
                r,
                "paysync_recheck_headers_dropped_total",
                "Input headers left off a re-check record so that it fits the producer's record limit.",
                &["connector"],
            ),
            recheck_topics: IntGauge::new(
                "paysync_recheck_topics",
                "Re-check topics consumed (those the schedules name and any other found under the prefix).",
            )
            .and_then(|g| r.register(Box::new(g.clone())).map(|()| g))
            .unwrap_or_else(|e| panic!("metric paysync_recheck_topics: {e}")),
            tasks_ended: counter(
                r,
                "paysync_tasks_ended_total",
                "Supervised tasks that ended on their own (a consumer loop, the HTTP server, a background loop): paysync then stops.",
                &["task"],
            ),
            concurrency_limit: prometheus::GaugeVec::new(
                Opts::new(
                    "paysync_connector_concurrency_limit",
                    "Status calls an account may have in flight: learned (AIMD) or fixed; below 1, a fraction of one call per round trip.",
                ),
                &["connector", "account"],
            )
            .and_then(|g| r.register(Box::new(g.clone())).map(|()| g))
            .unwrap_or_else(|e| panic!("metric paysync_connector_concurrency_limit: {e}")),
            webhook_not_found: counter(
                r,
                "paysync_webhook_checks_not_found_total",
                "Webhook-triggered checks the connector answered 404: nothing published.",
                &["connector"],
            ),
            throttled: counter(
                r,
                "paysync_connector_throttled_total",
                "Status calls the connector answered 429 (throttling: waited out, not failures).",
                &["connector", "account"],
            ),
            raw_connector_dropped: counter(
                r,
                "paysync_raw_connector_dropped_total",
                "Events published without their raw connector fields, which would not fit the producer's record limit.",
                &["connector"],
            ),
            in_flight_by_topic: std::sync::Mutex::default(),
            throttled_too_long: counter(
                r,
                "paysync_connector_throttled_too_long_total",
                "Requests throttled (429) for longer than retry.max_throttled, ended as failed checks.",
                &["connector"],
            ),
            intake: IntakeMetrics::new(r),
            registry,
        };
        for o in [Outcome::Synced, Outcome::ConnectorError, Outcome::Invalid] {
            m.requests.with_label_values(&[o.label()]);
        }
        m
    }

    /// Pre-creates per-connector series so dashboards show zeros, not gaps.
    pub fn register_connector(&self, connector: &str) {
        self.circuit_open.with_label_values(&[connector]).set(0);
        self.token_refreshes.with_label_values(&[connector]);
    }

    /// A request finished with this outcome.
    pub fn request_done(&self, outcome: Outcome, started: crate::clock::Instant) {
        self.requests.with_label_values(&[outcome.label()]).inc();
        self.processing_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// An event with `status` was acknowledged.
    pub fn event_published(&self, status: &str) {
        self.events_published.with_label_values(&[status]).inc();
    }

    /// A dead letter with `reason` was acknowledged.
    pub fn dead_lettered(&self, reason: &str) {
        self.dead_letters.with_label_values(&[reason]).inc();
    }

    /// One connector HTTP call finished with `code` (status or timeout/transport).
    pub fn connector_call(&self, connector: &str, code: &str, took: Duration) {
        self.connector_requests
            .with_label_values(&[connector, code])
            .inc();
        self.connector_duration
            .with_label_values(&[connector])
            .observe(took.as_secs_f64());
    }

    /// A connector call is being retried.
    pub fn connector_retry(&self, connector: &str, reason: &str) {
        self.connector_retries
            .with_label_values(&[connector, reason])
            .inc();
    }

    /// A token was requested.
    pub fn token_refresh(&self, connector: &str) {
        self.token_refreshes.with_label_values(&[connector]).inc();
    }

    /// An undocumented connector status was seen.
    pub fn unknown_status(&self, connector: &str) {
        self.unknown_statuses.with_label_values(&[connector]).inc();
    }

    /// A transaction of `topic`'s engine ended with `outcome`.
    pub fn transaction(&self, topic: &str, outcome: &str) {
        self.transactions.with_label_values(&[topic, outcome]).inc();
    }

    /// Records of `topic`'s engine waiting for a commit.
    pub fn set_pending_records(&self, topic: &str, n: usize) {
        self.pending_records
            .with_label_values(&[topic])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A re-check was taken although its scheduling record was not committed in time.
    pub fn recheck_gate_timeout(&self, topic: &str) {
        self.recheck_gate_timeouts.with_label_values(&[topic]).inc();
    }

    /// `n` input headers were left off a re-check record to fit.
    pub fn recheck_headers_dropped(&self, connector: &str, n: usize) {
        self.recheck_headers_dropped
            .with_label_values(&[connector])
            .inc_by(n as u64);
    }

    /// How many re-check topics are consumed.
    pub fn set_recheck_topics(&self, n: usize) {
        self.recheck_topics
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An account's concurrency limit changed.
    pub fn set_concurrency_limit(&self, connector: &str, account: &str, limit: f64) {
        self.concurrency_limit
            .with_label_values(&[connector, account])
            .set(limit);
    }

    /// The webhook intake's metrics.
    pub fn intake(&self) -> IntakeMetrics {
        self.intake.clone()
    }

    /// A webhook-triggered check found no such transaction.
    pub fn webhook_check_not_found(&self, connector: &str) {
        self.webhook_not_found.with_label_values(&[connector]).inc();
    }

    /// A status call was answered 429.
    pub fn throttled(&self, connector: &str, account: &str) {
        self.throttled
            .with_label_values(&[connector, account])
            .inc();
    }

    /// An event's raw connector fields were left off to fit the record limit.
    pub fn raw_connector_dropped(&self, connector: &str) {
        self.raw_connector_dropped
            .with_label_values(&[connector])
            .inc();
    }

    /// A request was throttled longer than `retry.max_throttled`.
    pub fn throttled_too_long(&self, connector: &str) {
        self.throttled_too_long
            .with_label_values(&[connector])
            .inc();
    }

    /// A supervised task ended on its own.
    pub fn task_ended(&self, task: &str) {
        self.tasks_ended.with_label_values(&[task]).inc();
    }

    /// The number of requests in flight in the engine of `topic`; the gauge
    /// is the sum over the engines (the input's and the re-check topics').
    pub fn set_in_flight(&self, topic: &str, n: usize) {
        let mut by_topic = self
            .in_flight_by_topic
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        by_topic.insert(topic.to_owned(), n);
        let total: usize = by_topic.values().sum();
        self.in_flight.set(i64::try_from(total).unwrap_or(i64::MAX));
    }

    /// Consumer lag of a partition.
    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.consumer_lag
            .with_label_values(&[topic, &partition.to_string()])
            .set(lag);
    }

    /// Messages fetched and not yet taken by the engine, for a partition.
    pub fn set_prefetched(&self, topic: &str, partition: i32, messages: i64) {
        self.prefetched
            .with_label_values(&[topic, &partition.to_string()])
            .set(messages);
    }

    /// Commit progress of a partition.
    pub fn set_commit(&self, topic: &str, partition: i32, committed: i64, gap: i64) {
        let p = partition.to_string();
        self.committed_offset
            .with_label_values(&[topic, &p])
            .set(committed);
        self.commit_gap.with_label_values(&[topic, &p]).set(gap);
    }

    /// Drops the per-partition series of a partition this member no longer owns.
    pub fn forget_partition(&self, topic: &str, partition: i32) {
        let p = partition.to_string();
        let labels = [topic, p.as_str()];
        let _ = self.consumer_lag.remove_label_values(&labels);
        let _ = self.prefetched.remove_label_values(&labels);
        let _ = self.committed_offset.remove_label_values(&labels);
        let _ = self.commit_gap.remove_label_values(&labels);
        let _ = self.watermark_stuck.remove_label_values(&labels);
    }

    /// A request asked to follow a connector without follow mode (checked once).
    pub fn follow_unavailable(&self, connector: &str) {
        self.follow_unavailable
            .with_label_values(&[connector])
            .inc();
    }

    /// A re-check was scheduled (its record acknowledged).
    pub fn recheck_scheduled(&self, connector: &str, delay_secs: u64) {
        self.rechecks_scheduled
            .with_label_values(&[connector, &format!("{delay_secs}s")])
            .inc();
    }

    /// A follow chain ended.
    pub fn chain_ended(&self, connector: &str, outcome: &str) {
        self.chains_ended
            .with_label_values(&[connector, outcome])
            .inc();
    }

    /// Readiness as /readyz would answer now.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// A repeated check of a chain was skipped (the chain had moved past it).
    pub fn follow_check_skipped(&self, connector: &str) {
        self.follow_checks_skipped
            .with_label_values(&[connector])
            .inc();
    }

    /// A transaction's commit of `topic`'s engine took this long.
    pub fn transaction_commit(&self, topic: &str, took: Duration) {
        self.transaction_commit
            .with_label_values(&[topic])
            .observe(took.as_secs_f64());
    }

    /// A re-check was taken this long after it was due.
    pub fn recheck_lateness(&self, topic: &str, late: Duration) {
        self.recheck_lateness
            .with_label_values(&[topic])
            .observe(late.as_secs_f64());
    }

    /// Re-checks waiting in a re-check topic (the lag of the topic's partitions
    /// this member owns).
    pub fn set_pending_rechecks(&self, topic: &str, pending: i64) {
        self.pending_rechecks
            .with_label_values(&[topic])
            .set(pending);
    }

    /// A publish is retried.
    pub fn publish_retry(&self, topic_role: &str) {
        self.publish_retries.with_label_values(&[topic_role]).inc();
    }

    /// A publish was refused permanently.
    pub fn publish_refused(&self, topic_role: &str) {
        self.publish_refusals.with_label_values(&[topic_role]).inc();
    }

    /// Circuit state of a connector.
    pub fn set_circuit_open(&self, connector: &str, open: bool) {
        self.circuit_open
            .with_label_values(&[connector])
            .set(i64::from(open));
    }

    /// Time waited for a rate-limit permit.
    pub fn rate_limit_waited(&self, connector: &str, waited: Duration) {
        self.rate_limit_wait
            .with_label_values(&[connector])
            .observe(waited.as_secs_f64());
    }

    /// A connector's redirect URL was dropped (not http/https).
    pub fn redirect_dropped(&self, connector: &str) {
        self.redirects_dropped.with_label_values(&[connector]).inc();
    }

    /// A job panicked and its record was dead-lettered.
    pub fn internal_error(&self) {
        self.internal_errors.inc();
    }

    /// Partitions currently stalled by a permanently refused dead letter.
    pub fn set_stalled_partitions(&self, n: usize) {
        self.stalled_partitions
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// How long a partition's watermark has been stuck with work pending.
    pub fn set_watermark_stuck(&self, topic: &str, partition: i32, stuck: Duration) {
        self.watermark_stuck
            .with_label_values(&[topic, &partition.to_string()])
            .set(i64::try_from(stuck.as_secs()).unwrap_or(i64::MAX));
    }

    /// The token endpoint refused an account's credentials.
    pub fn token_refused(&self, connector: &str, account: &str) {
        self.token_refusals
            .with_label_values(&[connector, account])
            .inc();
    }

    /// Current value of `paysync_in_flight`.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Sums the samples of a metric in Prometheus text whose labels include every
/// (name, value) in `labels`. Histograms are not summed (use their `_count`).
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let ok = labels.iter().all(|(k, v)| {
                label_text
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            });
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Installs the global `tracing` subscriber. Returns false when one was already
/// installed (tests, the demo after `run`).
pub fn init_tracing(format: LogFormat, level: &str) -> bool {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(span_json::SpanFieldsJson)
            .try_init()
            .is_ok()
    } else {
        builder.compact().try_init().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_contract_metric() {
        let m = Metrics::new();
        m.register_connector("cm");
        m.event_published("CHARGED");
        m.dead_lettered("invalid_json");
        m.connector_call("cm", "200", Duration::from_millis(5));
        m.connector_retry("cm", "5xx");
        m.token_refresh("cm");
        m.set_in_flight("in", 2);
        m.set_in_flight("in.recheck.60s", 1);
        // Found by the simulation: each engine set the one gauge, so the last
        // to report hid the others' requests; it is their sum.
        assert_eq!(m.in_flight(), 3);
        m.set_in_flight("in", 2);
        m.request_done(Outcome::Synced, crate::clock::Instant::now());
        m.set_lag("in", 0, 10);
        m.set_commit("in", 0, 5, 1);
        let text = m.render();
        for name in [
            "paysync_requests_total",
            "paysync_events_published_total",
            "paysync_dead_letters_total",
            "paysync_connector_requests_total",
            "paysync_connector_request_duration_seconds",
            "paysync_connector_retries_total",
            "paysync_token_refreshes_total",
            "paysync_in_flight",
            "paysync_processing_duration_seconds",
            "paysync_consumer_lag",
            "paysync_circuit_open",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains("paysync_in_flight 3"));
        assert!(text.contains("paysync_requests_total{outcome=\"synced\"} 1"));
    }
}
