//! The webhook intake (`[webhooks]`): processors' webhooks become status-check
//! requests on the input topic, answered 200 only once the broker has them.
//!
//! `POST /webhooks/<connector>/<merchant_id>` (or `.../<webhook_path_token>`
//! when the account has one; the route without it is then 404), on a listener
//! of its own. The parts:
//!
//! - [`admission`] (pure): route, path token, body limits, the verification
//!   budget, the signature (each connector's file reads its own webhook),
//!   dedupe and the account's bucket, in that order: a decision;
//! - this module: one HTTP request through admission to the store, timed and
//!   counted;
//! - [`server`]: the connections (bounded in number, idle time, lifetime,
//!   requests, header size, and a write timeout for peers that read nothing);
//! - [`tls`]: optional TLS, reloaded when its files change;
//! - [`forwarded`]: the source address behind trusted proxies.
//!
//! Requests are written through [`Store`] (`kafka::intake_producer`: an
//! idempotent producer of the intake's own, rebuilt after a fatal error). A
//! webhook never carries a status into an event: the check asks the
//! connector's API, and a webhook-triggered check the connector answers 404
//! publishes nothing.

pub mod admission;
pub mod forwarded;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use crate::clock::Instant;
use crate::codec::request::EncodedRecord;
use crate::config::WebhookSettings;
use crate::telemetry::IntakeMetrics;

use admission::{Admission, Answer, Decision, Outcome, Received};

/// Why a request was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The producer's queue is full.
    Busy,
    /// The broker refused it, or the producer failed.
    NotStored(String),
    /// No acknowledgement in time.
    TimedOut,
}

/// The intake's producer, as the intake sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHealth {
    /// Liveness: `Err` when the producer is beyond repair.
    pub alive: Result<(), String>,
    /// Readiness: `Err` while it cannot store.
    pub ready: Result<(), String>,
}

/// Where accepted webhooks' requests go.
pub trait Store: Send + Sync + 'static {
    /// Writes `record` to `topic`; `Ok` once the broker acknowledged it.
    fn store<'a>(
        &'a self,
        topic: &'a str,
        record: &'a EncodedRecord,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Alive and ready.
    fn health(&self) -> StoreHealth;

    /// Waits for records in flight (shutdown).
    fn flush(&self, timeout: Duration);
}

/// Milliseconds on the intake's monotonic clock (tokio's: virtual in tests).
pub fn mono_ms() -> u64 {
    static ANCHOR: OnceLock<std::time::Instant> = OnceLock::new();
    let now = Instant::now().into_std();
    let anchor = *ANCHOR.get_or_init(|| now);
    now.saturating_duration_since(anchor).as_millis() as u64
}

/// The intake's state, shared by its connections.
pub struct Intake {
    settings: WebhookSettings,
    input_topic: String,
    admission: Admission,
    store: Arc<dyn Store>,
    metrics: IntakeMetrics,
    /// Bytes of bodies being read, at most [`BODY_BYTES_IN_FLIGHT`].
    bodies: Arc<tokio::sync::Semaphore>,
}

/// Body bytes the intake holds while reading, across connections: each body
/// reserves its declared length (or its route's limit) before it is read, and
/// past this the intake answers 503 (a thousand connections sending 1 MiB
/// bodies slowly would otherwise hold a gigabyte).
pub const BODY_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("listen", &self.settings.listen)
            .finish_non_exhaustive()
    }
}

/// A response with a short text body and `Retry-After` when set.
fn respond(status: u16, body: &str, retry_after: Option<u64>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(s) = retry_after {
        r.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from(s),
        );
    }
    r
}

impl Intake {
    /// The intake of `settings.webhooks`, writing through `store`.
    pub fn new(
        settings: WebhookSettings,
        input_topic: &str,
        admission: Admission,
        store: Arc<dyn Store>,
        metrics: IntakeMetrics,
    ) -> Self {
        for route in admission.open_routes() {
            tracing::warn!(
                route = %route,
                "this webhook route has no webhook_secret and no webhook_path_token: anyone who guesses /webhooks/{route} can spend the account's processor budget; set a webhook_path_token"
            );
        }
        Intake {
            settings,
            input_topic: input_topic.to_owned(),
            admission,
            store,
            metrics,
            bodies: Arc::new(tokio::sync::Semaphore::new(BODY_BYTES_IN_FLIGHT)),
        }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &WebhookSettings {
        &self.settings
    }

    /// Its metrics.
    pub fn metrics(&self) -> &IntakeMetrics {
        &self.metrics
    }

    /// Liveness and readiness of its producer.
    pub fn health(&self) -> StoreHealth {
        self.store.health()
    }

    /// Spends one unit of the verification budget at `now_ms` (a TLS
    /// handshake); false when it is spent.
    pub fn afford(&self, now_ms: u64) -> bool {
        self.admission.afford(now_ms).is_ok()
    }

    /// Waits for requests in flight to the broker (shutdown).
    pub fn flush(&self, timeout: Duration) {
        self.store.flush(timeout);
    }

    /// Answers one HTTP request from `peer`; `body_read` hears when its body
    /// is read (or given up on), for the connection's clocks.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        body_read: &(dyn Fn() + Send + Sync),
    ) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let (connector, answer) = self.answer(request, peer, body_read).await;
        self.metrics
            .webhook(connector, answer.outcome.label(), started.elapsed());
        respond(answer.status, &answer.message, answer.retry_after)
    }

    /// (connector label, answer).
    async fn answer(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        body_read: &(dyn Fn() + Send + Sync),
    ) -> (&'static str, Answer) {
        if request.method() != hyper::Method::POST {
            return (
                "unknown",
                Answer {
                    outcome: Outcome::MethodNotAllowed,
                    status: 405,
                    message: "webhooks are POSTed".into(),
                    retry_after: None,
                },
            );
        }
        let (parts, body) = request.into_parts();
        let Some(path) = parts.uri.path().strip_prefix("/webhooks/") else {
            return (
                "unknown",
                Answer {
                    outcome: Outcome::NotFound,
                    status: 404,
                    message: "no such webhook route".into(),
                    retry_after: None,
                },
            );
        };
        let declared = parts
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let target = match self.admission.route(path, declared) {
            Ok(t) => t,
            Err(answer) => return ("unknown", answer),
        };
        let connector = target.connector();
        if let Err(answer) = self.admission.afford(mono_ms()) {
            return (connector, answer);
        }
        let limit = target.max_body_bytes();
        let reserve = declared
            .map_or(limit, |d| d.min(limit as u64) as usize)
            .max(1);
        let Ok(_reserved) = self
            .bodies
            .clone()
            .try_acquire_many_owned(u32::try_from(reserve).unwrap_or(u32::MAX))
        else {
            body_read();
            return (
                connector,
                Answer::unavailable(
                    Outcome::Overloaded,
                    "more bodies in flight than the intake holds: try again",
                    1_000,
                ),
            );
        };
        let read = tokio::time::timeout(
            self.settings.body_read_timeout,
            read_body(body, declared, limit),
        )
        .await;
        body_read();
        let bytes = match read {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(BodyError::TooLarge)) => {
                return (connector, answer(Outcome::TooLarge, 413, "body too large"))
            }
            Ok(Err(BodyError::CutShort)) => {
                return (
                    connector,
                    answer(Outcome::Malformed, 400, "the body was cut short"),
                )
            }
            Err(_) => {
                return (
                    connector,
                    answer(Outcome::SlowBody, 408, "body not received in time"),
                )
            }
        };
        let headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let query: Vec<(String, String)> = parts
            .uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        let received = Received {
            body: &bytes,
            headers: &headers,
            query: &query,
        };
        let delivery = match self.admission.decide(&target, &received, mono_ms()) {
            Decision::Answer(answer) => {
                if matches!(answer.outcome, Outcome::BadSignature | Outcome::Unsigned) {
                    let source =
                        forwarded::source(peer.ip(), &headers, &self.settings.trusted_proxies);
                    tracing::debug!(connector, source = %source, outcome = answer.outcome.label(), "webhook refused");
                }
                return (connector, answer);
            }
            Decision::Store(d) => d,
        };
        let record = delivery.request.encode();
        let unavailable = |outcome, message| Answer::unavailable(outcome, message, 5_000);
        match self
            .store
            .store(&self.input_topic, &record, self.settings.ack_timeout)
            .await
        {
            Ok(()) => {
                self.admission.stored(delivery, mono_ms());
                (connector, answer(Outcome::Accepted, 200, "accepted"))
            }
            Err(StoreError::Busy) => (
                connector,
                unavailable(Outcome::Unavailable, "busy: try again"),
            ),
            Err(StoreError::NotStored(why)) => {
                tracing::warn!(error = %why, "the broker did not take a webhook's request; answered 503");
                (
                    connector,
                    unavailable(
                        Outcome::Unavailable,
                        "the request was not stored: try again",
                    ),
                )
            }
            Err(StoreError::TimedOut) => {
                tracing::warn!(
                    timeout_s = self.settings.ack_timeout.as_secs_f64(),
                    "no acknowledgement of a webhook's request in time; answered 503"
                );
                (
                    connector,
                    unavailable(Outcome::Timeout, "not stored in time: try again"),
                )
            }
        }
    }
}

enum BodyError {
    TooLarge,
    CutShort,
}

/// Reads a body of at most `limit` bytes into one buffer (frames are copied,
/// so a body sent in many small chunks costs its bytes, not a buffer each).
async fn read_body(
    mut body: Incoming,
    declared: Option<u64>,
    limit: usize,
) -> Result<Bytes, BodyError> {
    // Grown as bytes arrive: a declared length is a claim, not bytes.
    let capacity = declared.map_or(8 * 1024, |d| d.min(limit as u64).min(64 * 1024) as usize);
    let mut buf = bytes::BytesMut::with_capacity(capacity);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyError::CutShort)?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > limit {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(buf.freeze())
}

fn answer(outcome: Outcome, status: u16, message: &'static str) -> Answer {
    Answer {
        outcome,
        status,
        message: message.into(),
        retry_after: None,
    }
}
