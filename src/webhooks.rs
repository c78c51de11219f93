//! The webhook intake (`[webhooks]`): processors' webhooks become status-check
//! requests on the input topic, acknowledged to the processor only once the
//! broker has them.
//!
//! `POST /webhooks/<connector>/<merchant_id>` (or `.../<webhook_path_token>` when
//! the account has one; the route without it is then 404), on a listener of its
//! own. Each connector's file reads its own webhook format
//! ([`crate::connectors::Connector::read_webhook`]); this module does the HTTP
//! and Kafka around it:
//!
//! 1. the route names a configured connector and account (else 404);
//! 2. the account's bucket has room (else 429 with `Retry-After`);
//! 3. the body arrives within `body_read_timeout` and fits `max_body_bytes`
//!    (else 408 / 413), the head within `header_read_timeout`;
//! 4. the connector reads it: a payment to check, an id to ignore (200, nothing
//!    produced), or a refusal (400, 401 for a bad signature);
//! 5. a repeat of a transaction acknowledged within `dedupe_window` is answered
//!    200 without a second request (per process, best effort: a duplicate only
//!    costs a check);
//! 6. the request (the input contract's JSON, `request_id` from the webhook's own
//!    id or a digest of connector, merchant and body, so a retried webhook maps
//!    to the same request; keyed by transaction id; header
//!    `x-request-source: webhook`) is produced by an idempotent producer of its
//!    own (never a transactional one, whose transaction could still abort), and
//!    200 is answered only once the broker acknowledged it; when that does not
//!    happen within `ack_timeout`, or the producer's queue is full, 503 with
//!    `Retry-After`, so the processor tries again.
//!
//! A webhook never carries a status into an event: the check asks the
//! connector's API, and a webhook-triggered check the connector answers 404
//! publishes nothing.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::codec::request::WEBHOOK_SOURCE;
use crate::config::{Settings, WebhookSettings};
use crate::connectors::webhook::{Webhook, WebhookCheck};
use crate::connectors::{registry, Connector};
use crate::telemetry::Metrics;

/// Transactions remembered for deduplication, at most.
const DEDUPE_MAX: usize = 100_000;

/// One account's webhook secrets.
struct AccountRoute {
    secret: Option<SecretString>,
    path_token: Option<SecretString>,
    bucket: DefaultDirectRateLimiter,
}

struct ConnectorRoute {
    connector: Arc<dyn Connector>,
    accounts: HashMap<String, AccountRoute>,
}

/// Acknowledged transactions, for `dedupe_window`.
#[derive(Default)]
struct Dedupe {
    seen: HashMap<(String, String, String), Instant>,
    order: VecDeque<((String, String, String), Instant)>,
}

impl Dedupe {
    fn seen_within(&mut self, key: &(String, String, String), window: Duration) -> bool {
        let now = Instant::now();
        while let Some((k, at)) = self.order.front() {
            if now.duration_since(*at) < window && self.order.len() <= DEDUPE_MAX {
                break;
            }
            if self.seen.get(k) == Some(at) {
                self.seen.remove(k);
            }
            self.order.pop_front();
        }
        self.seen
            .get(key)
            .is_some_and(|at| now.duration_since(*at) < window)
    }

    fn remember(&mut self, key: (String, String, String)) {
        let now = Instant::now();
        self.seen.insert(key.clone(), now);
        self.order.push_back((key, now));
    }
}

/// The intake's state, shared by its connections.
pub struct Intake {
    settings: WebhookSettings,
    input_topic: String,
    routes: HashMap<String, ConnectorRoute>,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    dedupe: Mutex<Dedupe>,
    broken: AtomicBool,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("listen", &self.settings.listen)
            .finish_non_exhaustive()
    }
}

impl Intake {
    /// The intake of `settings` (which has `[webhooks]`), with its own
    /// idempotent producer.
    pub fn new(
        settings: &Settings,
        webhooks: &WebhookSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KafkaError> {
        let mut config = super::kafka::producer_config(&settings.kafka);
        // librdkafka gives up on a record by the time the webhook is answered 503,
        // so a 503 rarely leaves a late copy behind (the retry maps to the same
        // request id either way).
        config.set(
            "message.timeout.ms",
            webhooks.ack_timeout.as_millis().max(1).to_string(),
        );
        let producer: FutureProducer = config.create()?;
        let mut routes = HashMap::new();
        for (name, c) in &settings.connectors {
            let Some(connector) = registry::get(name) else {
                continue;
            };
            let per_second =
                NonZeroU32::new(webhooks.requests_per_second).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(webhooks.burst).unwrap_or(per_second);
            let accounts = c
                .gateway
                .accounts
                .iter()
                .map(|(merchant, a)| {
                    (
                        merchant.clone(),
                        AccountRoute {
                            secret: a.webhook_secret.clone(),
                            path_token: a.webhook_path_token.clone(),
                            bucket: RateLimiter::direct(
                                Quota::per_second(per_second).allow_burst(burst),
                            ),
                        },
                    )
                })
                .collect();
            routes.insert(
                name.clone(),
                ConnectorRoute {
                    connector,
                    accounts,
                },
            );
        }
        Ok(Intake {
            settings: webhooks.clone(),
            input_topic: settings.kafka.input_topic.clone(),
            routes,
            producer,
            metrics,
            dedupe: Mutex::new(Dedupe::default()),
            broken: AtomicBool::new(false),
        })
    }

    /// Readiness: the producer works.
    pub fn ready(&self) -> Result<(), String> {
        if self.broken.load(Ordering::Acquire) {
            return Err("the webhook intake's producer hit a fatal error".into());
        }
        Ok(())
    }

    /// Waits for queued requests (shutdown).
    pub fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer;
        let _ = self.producer.flush(timeout);
    }
}

/// An answer: its status, a short body, and `Retry-After` when set.
fn answer(status: StatusCode, body: &str, retry_after: Option<u64>) -> Response {
    let mut r = (status, format!("{body}\n")).into_response();
    if let Some(s) = retry_after {
        if let Ok(v) = s.to_string().parse() {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
    }
    r
}

async fn webhook_route(
    State(intake): State<Arc<Intake>>,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let path: Vec<String> = path.split('/').map(str::to_owned).collect();
    let (label, outcome, response) = handle(&intake, &path, query.as_deref(), &headers, body).await;
    intake.metrics.webhook(label, outcome, started.elapsed());
    response
}

/// (connector label, outcome label, response).
async fn handle(
    intake: &Intake,
    path: &[String],
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> (&'static str, &'static str, Response) {
    let not_found = || {
        (
            "unknown",
            "not_found",
            answer(StatusCode::NOT_FOUND, "no such webhook route", None),
        )
    };
    let (connector, merchant, token) = match path {
        [c, m] => (c, m, None),
        [c, m, t] => (c, m, Some(t)),
        _ => return not_found(),
    };
    let Some(route) = intake.routes.get(connector.as_str()) else {
        return not_found();
    };
    let label = route.connector.name();
    let Some(account) = route.accounts.get(merchant.as_str()) else {
        return (
            label,
            "not_found",
            answer(StatusCode::NOT_FOUND, "no such webhook route", None),
        );
    };
    // An account with a path token has only the route that carries it.
    let token_ok = match (&account.path_token, token) {
        (None, None) => true,
        (Some(expected), Some(given)) => same_secret(expected.expose_secret(), given),
        _ => false,
    };
    if !token_ok {
        return (
            label,
            "not_found",
            answer(StatusCode::NOT_FOUND, "no such webhook route", None),
        );
    }
    if account.bucket.check().is_err() {
        return (
            label,
            "throttled",
            answer(
                StatusCode::TOO_MANY_REQUESTS,
                "too many webhooks for this account",
                Some(1),
            ),
        );
    }
    let limit = intake.settings.max_body_bytes;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|l| l > limit as u64) {
        return (
            label,
            "too_large",
            answer(StatusCode::PAYLOAD_TOO_LARGE, "body too large", None),
        );
    }
    let bytes = match tokio::time::timeout(
        intake.settings.body_read_timeout,
        axum::body::to_bytes(body, limit),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return (
                label,
                "too_large",
                answer(StatusCode::PAYLOAD_TOO_LARGE, "body too large", None),
            )
        }
        Err(_) => {
            return (
                label,
                "slow_body",
                answer(
                    StatusCode::REQUEST_TIMEOUT,
                    "body not received in time",
                    None,
                ),
            )
        }
    };
    let header_list: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_ascii_lowercase(), v.to_str().ok()?.to_owned())))
        .collect();
    let query_list: Vec<(String, String)> = query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let webhook = Webhook {
        body: &bytes,
        headers: &header_list,
        query: &query_list,
        secret: account.secret.as_ref(),
    };
    let (transaction_id, method, event_id) = match route.connector.read_webhook(&webhook) {
        Ok(WebhookCheck::Check {
            transaction_id,
            method,
            event_id,
        }) => (transaction_id, method, event_id),
        Ok(WebhookCheck::Ignore(why)) => {
            return (
                label,
                "ignored",
                answer(StatusCode::OK, &format!("ignored: {why}"), None),
            )
        }
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            // The message names fields, never echoes values (they may be secrets).
            return (label, e.label(), answer(status, &e.to_string(), None));
        }
    };
    let key = (
        label.to_owned(),
        merchant.clone(),
        transaction_id.as_str().to_owned(),
    );
    if intake
        .dedupe
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .seen_within(&key, intake.settings.dedupe_window)
    {
        return (
            label,
            "duplicate",
            answer(StatusCode::OK, "accepted (a repeat)", None),
        );
    }
    let request_id = match &event_id {
        Some(id) => format!("webhook:{label}:{id}"),
        None => format!("webhook:{label}:{}", digest(label, merchant, &bytes)),
    };
    let mut request = serde_json::json!({
        "connector_transaction_id": transaction_id.as_str(),
        "connector": label,
        "merchant_id": merchant,
        "request_id": request_id,
        "follow": intake.settings.follow,
    });
    if let Some(m) = &method {
        request["payment_method_type"] = serde_json::Value::from(m.as_str());
    }
    let value = request.to_string();
    let record: FutureRecord<'_, str, str> = FutureRecord::to(&intake.input_topic)
        .key(transaction_id.as_str())
        .payload(value.as_str())
        .headers(
            rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: WEBHOOK_SOURCE.0,
                value: Some(WEBHOOK_SOURCE.1),
            }),
        );
    let unavailable = |why: &str| {
        (
            label,
            "unavailable",
            answer(StatusCode::SERVICE_UNAVAILABLE, why, Some(5)),
        )
    };
    let delivery = match intake.producer.send_result(record) {
        Ok(d) => d,
        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
            return unavailable("busy: try again")
        }
        Err((e, _)) => {
            tracing::warn!(error = %e, "the webhook intake cannot queue a request");
            return unavailable("cannot take it now: try again");
        }
    };
    match tokio::time::timeout(intake.settings.ack_timeout, delivery).await {
        Ok(Ok(Ok(_))) => {
            intake
                .dedupe
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remember(key);
            (label, "accepted", answer(StatusCode::OK, "accepted", None))
        }
        Ok(Ok(Err((e, _)))) => {
            if matches!(e, KafkaError::MessageProduction(RDKafkaErrorCode::Fatal)) {
                intake.broken.store(true, Ordering::Release);
            }
            tracing::warn!(error = %e, "the broker did not take a webhook's request");
            unavailable("the request was not stored: try again")
        }
        Ok(Err(_)) => unavailable("the request was not stored: try again"),
        Err(_) => {
            tracing::warn!(
                timeout_s = intake.settings.ack_timeout.as_secs_f64(),
                "no acknowledgement of a webhook's request in time; answered 503"
            );
            (
                label,
                "timeout",
                answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not stored in time: try again",
                    Some(5),
                ),
            )
        }
    }
}

/// Compares a secret with a given value in time that does not depend on where
/// they differ (both are hashed first, so their lengths do not matter either).
fn same_secret(secret: &str, given: &str) -> bool {
    let a = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let b = ring::digest::digest(&ring::digest::SHA256, given.as_bytes());
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// A stable id for a webhook without one of its own: the first 16 bytes of the
/// SHA-256 of connector, merchant and body.
fn digest(connector: &str, merchant: &str, body: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(connector.as_bytes());
    ctx.update(&[0]);
    ctx.update(merchant.as_bytes());
    ctx.update(&[0]);
    ctx.update(body);
    ctx.finish().as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serves the intake on `listener` until `shutdown`: HTTP/1.1 with a timeout for
/// the request head (slow clients cannot hold connections open), each
/// connection in its own task; on shutdown, connections get a few seconds to
/// finish.
pub async fn serve(
    listener: TcpListener,
    intake: Arc<Intake>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let header_timeout = intake.settings.header_read_timeout;
    let app = Router::new()
        .route("/webhooks/{*path}", post(webhook_route))
        .with_state(intake);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause, then go on.
                    tracing::warn!(error = %e, "webhook intake: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(6), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}
