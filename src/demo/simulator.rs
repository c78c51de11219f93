//! A CM.com simulator: the token endpoint and Get Transaction for every payment
//! method, answering by transaction-id prefix. Used by the demo, the tests, the
//! benchmark and `paysync simulate-cm`.
//!
//! | id prefix | answer |
//! |---|---|
//! | `open-3ds-` | OPEN with `action.redirect.url` |
//! | `open-` | OPEN |
//! | `authorized-` | AUTHORIZED |
//! | `success-` | SUCCESS with refunds |
//! | `cancelled-`, `expired-`, `failure-` | that status |
//! | `unknown-` | an undocumented status (`PENDING_REVIEW`) |
//! | `notfound-` | 404 |
//! | `flaky-` | 500 on the first call for that id, then SUCCESS |
//! | `ratelimited-` | 429 with `Retry-After: 1` on the first call, then SUCCESS |
//! | `malformed-` | 200 with a truncated body |
//! | anything else | SUCCESS |
//!
//! Every transaction is 1200 EUR. Optional latency (fixed, or normal, or long
//! tail) and a random 5xx rate make it a load target.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The client id the simulator accepts.
pub const SIM_CLIENT_ID: &str = "demo-client";
/// The client secret the simulator accepts.
pub const SIM_CLIENT_SECRET: &str = "demo-secret";

/// Response latency model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// Answer at once.
    None,
    /// Always this long.
    Fixed(Duration),
    /// Normal around a mean with a standard deviation (never negative).
    Normal {
        /// Mean.
        mean: Duration,
        /// Standard deviation.
        stddev: Duration,
    },
    /// Mostly `base`, with a fraction `tail_ratio` of answers taking `tail`.
    LongTail {
        /// Typical latency.
        base: Duration,
        /// Tail latency.
        tail: Duration,
        /// Fraction of answers in the tail, 0..1.
        tail_ratio: f64,
    },
}

impl Latency {
    fn sample(&self) -> Duration {
        match *self {
            Latency::None => Duration::ZERO,
            Latency::Fixed(d) => d,
            Latency::Normal { mean, stddev } => {
                // Box-Muller.
                let (u1, u2) = (fastrand::f64().max(1e-12), fastrand::f64());
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                Duration::from_secs_f64((mean.as_secs_f64() + z * stddev.as_secs_f64()).max(0.0))
            }
            Latency::LongTail {
                base,
                tail,
                tail_ratio,
            } => {
                if fastrand::f64() < tail_ratio {
                    tail
                } else {
                    base
                }
            }
        }
    }
}

/// Simulator behaviour.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    /// Latency of Get Transaction.
    pub latency: Latency,
    /// Fraction of Get Transaction calls answered with 503 (0..1).
    pub error_rate: f64,
    /// Lifetime of issued tokens, seconds.
    pub token_ttl_secs: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            latency: Latency::None,
            error_rate: 0.0,
            token_ttl_secs: 3600,
        }
    }
}

#[derive(Default)]
struct Counters {
    token_requests: AtomicU64,
    status_requests: AtomicU64,
    /// Get Transaction calls being served right now, and the most ever seen.
    concurrent: AtomicU64,
    max_concurrent: AtomicU64,
}

/// Counts a call as concurrent for as long as it lives.
struct Concurrent<'a>(&'a Counters);

impl<'a> Concurrent<'a> {
    fn enter(c: &'a Counters) -> Self {
        let now = c.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_concurrent.fetch_max(now, Ordering::SeqCst);
        Concurrent(c)
    }
}

impl Drop for Concurrent<'_> {
    fn drop(&mut self) {
        self.0.concurrent.fetch_sub(1, Ordering::SeqCst);
    }
}

struct SimState {
    options: SimOptions,
    counters: Counters,
    /// Calls per id, only for the prefixes whose answer depends on it.
    calls: Mutex<HashMap<String, u32>>,
    next_token: AtomicU64,
}

/// A running simulator.
pub struct Simulator {
    addr: SocketAddr,
    state: Arc<SimState>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Simulator {
    /// Starts on `addr` (port 0 for any free port).
    pub async fn start(addr: SocketAddr, options: SimOptions) -> Result<Simulator, String> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("simulator cannot listen on {addr}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let state = Arc::new(SimState {
            options,
            counters: Counters::default(),
            calls: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
        });
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/api/v1/authorization/oauth2/token", post(token))
            .route(
                "/api/v1/paymentmethods/{method}/v1/transactions/{id}",
                get(transaction),
            )
            .with_state(state.clone());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(Simulator {
            addr,
            state,
            shutdown,
            task,
        })
    }

    /// Base URL, for `connectors.cm.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Token requests served.
    pub fn token_requests(&self) -> u64 {
        self.state.counters.token_requests.load(Ordering::Relaxed)
    }

    /// Get Transaction requests served.
    pub fn status_requests(&self) -> u64 {
        self.state.counters.status_requests.load(Ordering::Relaxed)
    }

    /// The most Get Transaction calls ever served at the same time.
    pub fn max_concurrency(&self) -> u64 {
        self.state.counters.max_concurrent.load(Ordering::SeqCst)
    }

    /// Stops the server.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

async fn token(State(state): State<Arc<SimState>>, body: String) -> Response {
    state
        .counters
        .token_requests
        .fetch_add(1, Ordering::Relaxed);
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let ok = form.get("grant_type").map(String::as_str) == Some("client_credentials")
        && form.get("client_id").map(String::as_str) == Some(SIM_CLIENT_ID)
        && form.get("client_secret").map(String::as_str) == Some(SIM_CLIENT_SECRET);
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let n = state.next_token.fetch_add(1, Ordering::Relaxed);
    Json(serde_json::json!({
        "access_token": format!("sim-token-{n}"),
        "token_type": "Bearer",
        "expires_in": state.options.token_ttl_secs,
    }))
    .into_response()
}

fn body(id: &str, status: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "orderId": id,
        "reference": format!("order-{id}"),
        "amount": 1200,
        "currency": "EUR",
        "description": "paysync demo order",
        "status": status,
        "createdAt": "2026-11-21T10:00:00Z",
        "refunds": {"refundedAmount": 0, "refundedPendingAmount": 0},
        "returnUrls": {"success": "https://shop.example/ok"}
    })
}

async fn transaction(
    State(state): State<Arc<SimState>>,
    Path((method, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    state
        .counters
        .status_requests
        .fetch_add(1, Ordering::Relaxed);
    let _concurrent = Concurrent::enter(&state.counters);
    let delay = state.options.latency.sample();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer sim-token-"));
    if !authorized {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if ![
        "google-pay",
        "apple-pay",
        "creditcard",
        "ideal",
        "bancontact",
        "checkout",
    ]
    .contains(&method.as_str())
    {
        return StatusCode::NOT_FOUND.into_response();
    }
    if state.options.error_rate > 0.0 && fastrand::f64() < state.options.error_rate {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
    }
    let first_call = |state: &SimState| {
        let mut calls = state.calls.lock().unwrap_or_else(|p| p.into_inner());
        let n = calls.entry(id.clone()).or_insert(0);
        *n += 1;
        *n == 1
    };
    let json = |status: &str| Json(body(&id, status)).into_response();
    match id.as_str() {
        s if s.starts_with("open-3ds-") => {
            let mut b = body(&id, "OPEN");
            b["action"] = serde_json::json!({"redirect": {"url": format!("https://3ds.example/challenge/{id}")}});
            Json(b).into_response()
        }
        s if s.starts_with("open-") => json("OPEN"),
        s if s.starts_with("authorized-") => json("AUTHORIZED"),
        s if s.starts_with("success-") => {
            let mut b = body(&id, "SUCCESS");
            b["refunds"] = serde_json::json!({"refundedAmount": 200, "refundedPendingAmount": 100});
            Json(b).into_response()
        }
        s if s.starts_with("cancelled-") => json("CANCELLED"),
        s if s.starts_with("expired-") => json("EXPIRED"),
        s if s.starts_with("failure-") => json("FAILURE"),
        s if s.starts_with("unknown-") => json("PENDING_REVIEW"),
        s if s.starts_with("notfound-") => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"message": "Transaction not found"})),
        )
            .into_response(),
        s if s.starts_with("flaky-") => {
            if first_call(&state) {
                (StatusCode::INTERNAL_SERVER_ERROR, "temporary failure").into_response()
            } else {
                json("SUCCESS")
            }
        }
        s if s.starts_with("ratelimited-") => {
            if first_call(&state) {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "1")],
                    "slow down",
                )
                    .into_response()
            } else {
                json("SUCCESS")
            }
        }
        s if s.starts_with("malformed-") => {
            (StatusCode::OK, "{\"id\":\"x\",\"status\":\"SUC").into_response()
        }
        _ => json("SUCCESS"),
    }
}
