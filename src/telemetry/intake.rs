//! The webhook intake's metrics (`paysync_webhook*`), registered in the
//! process's one registry by [`super::Metrics::new`].

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

use super::{counter, LATENCY_BUCKETS};

/// The intake's metrics; cheap to clone (the collectors are shared).
#[derive(Clone)]
pub struct IntakeMetrics {
    webhooks: IntCounterVec,
    duration: HistogramVec,
    connections: IntGauge,
    closed: IntCounterVec,
    producer_rebuilds: IntCounter,
    tls_reloads: IntCounterVec,
}

impl IntakeMetrics {
    pub(super) fn new(r: &Registry) -> Self {
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "paysync_webhook_duration_seconds",
                "From a webhook's arrival to its answer (the broker's acknowledgement of its request included).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["connector"],
        )
        .and_then(|h| r.register(Box::new(h.clone())).map(|()| h))
        .unwrap_or_else(|e| panic!("metric paysync_webhook_duration_seconds: {e}"));
        let connections = IntGauge::new(
            "paysync_webhook_connections",
            "Connections open to the webhook intake.",
        )
        .and_then(|g| r.register(Box::new(g.clone())).map(|()| g))
        .unwrap_or_else(|e| panic!("metric paysync_webhook_connections: {e}"));
        let producer_rebuilds = IntCounter::new(
            "paysync_webhook_producer_rebuilds_total",
            "Times the intake's producer was rebuilt after a fatal error (5 within 10 minutes, and the next fatal error fails liveness).",
        )
        .and_then(|c| r.register(Box::new(c.clone())).map(|()| c))
        .unwrap_or_else(|e| panic!("metric paysync_webhook_producer_rebuilds_total: {e}"));
        IntakeMetrics {
            webhooks: counter(
                r,
                "paysync_webhooks_total",
                "Webhooks received, by connector and outcome (accepted, duplicate, ignored, bad_signature, unsigned, malformed, not_found, unsupported, too_large, slow_body, overloaded, throttled, unavailable, timeout, method_not_allowed).",
                &["connector", "outcome"],
            ),
            duration,
            connections,
            closed: counter(
                r,
                "paysync_webhook_connections_closed_total",
                "Connections the intake closed, by reason (header_timeout, idle_timeout, write_timeout, lifetime, evicted to make room at max_connections, overloaded: a TLS handshake over the verification budget).",
                &["reason"],
            ),
            producer_rebuilds,
            tls_reloads: counter(
                r,
                "paysync_webhook_tls_reloads_total",
                "Changed TLS files loaded (outcome ok) or refused (outcome error: the certificate in use stays).",
                &["outcome"],
            ),
        }
    }

    /// A webhook was answered with `outcome` after `took`.
    pub fn webhook(&self, connector: &str, outcome: &str, took: Duration) {
        self.webhooks.with_label_values(&[connector, outcome]).inc();
        self.duration
            .with_label_values(&[connector])
            .observe(took.as_secs_f64());
    }

    /// Connections open now.
    pub fn set_connections(&self, n: usize) {
        self.connections.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The intake closed a connection for `reason`.
    pub fn connection_closed(&self, reason: &str) {
        self.closed.with_label_values(&[reason]).inc();
    }

    /// The producer was rebuilt.
    pub fn producer_rebuilt(&self) {
        self.producer_rebuilds.inc();
    }

    /// Changed TLS files were tried.
    pub fn tls_reloaded(&self, ok: bool) {
        self.tls_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }
}
