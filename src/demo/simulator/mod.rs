//! A simulator of the connectors' APIs on one HTTP server, used by the demo, the
//! tests, the benchmark and `paysync simulate`: each simulated connector is one
//! file here ([`cm`]) with its routes, and one line in [`SIMULATED`]. Every
//! connector answers by transaction-id prefix, the same scenarios for all:
//!
//! | id prefix | answer |
//! |---|---|
//! | `open-3ds-` | open, with a redirect URL for the customer |
//! | `open-` | open |
//! | `pending-` | pending (where the connector has that status) |
//! | `authorized-` | authorized |
//! | `success-` | paid, with a partial refund |
//! | `cancelled-`, `expired-`, `failure-` | that status |
//! | `unknown-` | an undocumented status |
//! | `notfound-` | 404 |
//! | `flaky-` | 500 on the first call for that id, then paid |
//! | `ratelimited-` | 429 with `Retry-After: 1` on the first call, then paid |
//! | `malformed-` | 200 with a truncated body |
//! | `progress-` | moves with time (from its first call): open, then authorized after one `progress_step`, then paid after two |
//! | `notyet-` | 404 until one `progress_step` after its first call, then paid (a payment the connector does not show yet) |
//! | anything else | paid |
//!
//! A leading `tr_` (Mollie's payment ids) or `pi_` (Stripe's PaymentIntents) is
//! ignored: `tr_success-1` and `pi_success-1` are paid.
//!
//! Every transaction is 12.00 EUR. Optional latency (fixed, or normal, or long
//! tail) and a random 5xx rate make it a load target.

pub mod cm;
pub mod mollie;
pub mod stripe;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The OAuth2 client id the simulator accepts.
pub const SIM_CLIENT_ID: &str = "demo-client";
/// The OAuth2 client secret the simulator accepts.
pub const SIM_CLIENT_SECRET: &str = "demo-secret";

/// A connector the simulator serves.
pub struct SimulatedConnector {
    /// The connector's name (`[connectors.<name>]`).
    pub name: &'static str,
    /// The account table the simulator accepts (TOML, for `[connectors.<name>.accounts.<id>]`).
    pub account: &'static str,
    /// Its routes.
    pub routes: fn() -> Router<Arc<SimState>>,
    /// What its transaction ids begin with (`pi_` for Stripe's
    /// PaymentIntents); the scenario prefix follows.
    pub id_prefix: &'static str,
}

/// Every connector the simulator serves, on the same server and base URL.
#[rustfmt::skip]
pub const SIMULATED: &[SimulatedConnector] = &[
    SimulatedConnector { name: "cm", account: cm::ACCOUNT, routes: cm::routes, id_prefix: "" },
    SimulatedConnector { name: "mollie", account: mollie::ACCOUNT, routes: mollie::routes, id_prefix: "" },
    SimulatedConnector { name: "stripe", account: stripe::ACCOUNT, routes: stripe::routes, id_prefix: "pi_" },
];

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
    /// How fast `progress-` and `notyet-` transactions move.
    pub progress_step: Duration,
    /// Get Transaction calls per second per credential (token bucket, burst a
    /// tenth; 429 with `Retry-After: 1` beyond it); `None`: no limit.
    pub rate_limit: Option<f64>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            latency: Latency::None,
            error_rate: 0.0,
            token_ttl_secs: 3600,
            progress_step: Duration::from_secs(2),
            rate_limit: None,
        }
    }
}

#[derive(Default)]
struct Counters {
    token_requests: AtomicU64,
    status_requests: AtomicU64,
    /// Requests of any kind that came over HTTP/2 (h2c: the simulator serves
    /// HTTP/1.1 and HTTP/2 with prior knowledge on the same port).
    http2_requests: AtomicU64,
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

/// A per-credential rate limit: a token bucket of `per_second` calls a second
/// with a burst of a tenth of that; beyond it, 429 with `Retry-After: 1`, as a
/// processor's API gateway answers.
struct RateLimits {
    /// Calls per second per credential (f64 bits; 0: no limit). Changeable while
    /// running, to see a client follow.
    per_second: AtomicU64,
    buckets: Mutex<HashMap<String, (f64, std::time::Instant)>>,
    throttled: AtomicU64,
    /// Answered (not throttled) Get Transaction calls, by second since start.
    answered_by_second: Mutex<Vec<u64>>,
    /// Calls answered 429, by second since start.
    throttled_by_second: Mutex<Vec<u64>>,
    started: std::time::Instant,
}

impl RateLimits {
    /// True when `credential` may make a call now.
    fn admit(&self, credential: &str) -> bool {
        let rate = f64::from_bits(self.per_second.load(Ordering::Relaxed));
        if rate <= 0.0 {
            return true;
        }
        let burst = (rate / 10.0).max(1.0);
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, at) = buckets.entry(credential.to_owned()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn answered(&self) {
        self.count(&self.answered_by_second);
    }

    fn count(&self, series: &Mutex<Vec<u64>>) {
        let second = self.started.elapsed().as_secs() as usize;
        let mut v = series.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() <= second {
            v.resize(second + 1, 0);
        }
        v[second] += 1;
    }
}

/// What the simulated connectors share: options, counters, per-id call counts.
pub struct SimState {
    options: SimOptions,
    counters: Counters,
    limits: RateLimits,
    /// Calls per id, only for the prefixes whose answer depends on it.
    calls: Mutex<HashMap<String, u32>>,
    /// When each call of a time-dependent id came (`progress-`, `notyet-`).
    timeline: Mutex<HashMap<String, Vec<SystemTime>>>,
    next_token: AtomicU64,
}

/// A transaction-id scenario (see the table above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Open with a customer redirect.
    OpenWithRedirect,
    /// Open.
    Open,
    /// Pending.
    Pending,
    /// Authorized.
    Authorized,
    /// Paid.
    Paid,
    /// Cancelled.
    Cancelled,
    /// Expired.
    Expired,
    /// Failed.
    Failed,
    /// An undocumented status.
    Unknown,
    /// 404.
    NotFound,
    /// 500 first, then paid.
    Flaky,
    /// 429 first, then paid.
    RateLimited,
    /// A truncated 200 body.
    Malformed,
}

impl Scenario {
    /// The scenario of a transaction id.
    pub fn of(id: &str) -> Scenario {
        const PREFIXES: &[(&str, Scenario)] = &[
            ("open-3ds-", Scenario::OpenWithRedirect),
            ("open-", Scenario::Open),
            ("pending-", Scenario::Pending),
            ("authorized-", Scenario::Authorized),
            ("success-", Scenario::Paid),
            ("cancelled-", Scenario::Cancelled),
            ("expired-", Scenario::Expired),
            ("failure-", Scenario::Failed),
            ("unknown-", Scenario::Unknown),
            ("notfound-", Scenario::NotFound),
            ("flaky-", Scenario::Flaky),
            ("ratelimited-", Scenario::RateLimited),
            ("malformed-", Scenario::Malformed),
        ];
        // Mollie's and Stripe's ids (`tr_success-1`, `pi_success-1`) answer
        // by what follows their prefix.
        let id = unprefixed(id);
        PREFIXES
            .iter()
            .find(|(p, _)| id.starts_with(p))
            .map_or(Scenario::Paid, |(_, s)| *s)
    }
}

/// True when `headers` carry `Authorization: Bearer <key>`.
pub fn bearer_is(headers: &axum::http::HeaderMap, key: &str) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|v| v == key)
}

/// An id without Mollie's `tr_` or Stripe's `pi_`.
fn unprefixed(id: &str) -> &str {
    id.strip_prefix("tr_")
        .or_else(|| id.strip_prefix("pi_"))
        .unwrap_or(id)
}

/// What a status call answers before its connector-specific body.
pub enum Answer {
    /// This scenario's body.
    Body(Scenario),
    /// A ready response (an injected error, a first-call failure).
    Response(Response),
}

impl SimState {
    /// Counts a status call of `credential`, applies its rate limit, latency and
    /// the random error rate, and resolves first-call scenarios. Connectors then
    /// render `Answer::Body`.
    pub async fn answer(&self, id: &str, credential: &str) -> Answer {
        self.counters
            .status_requests
            .fetch_add(1, Ordering::Relaxed);
        if !self.limits.admit(credential) {
            self.limits.throttled.fetch_add(1, Ordering::Relaxed);
            self.limits.count(&self.limits.throttled_by_second);
            return Answer::Response(
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "1")],
                    "rate limit exceeded",
                )
                    .into_response(),
            );
        }
        let _concurrent = Concurrent::enter(&self.counters);
        let delay = self.options.latency.sample();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.options.error_rate > 0.0 && fastrand::f64() < self.options.error_rate {
            return Answer::Response((StatusCode::SERVICE_UNAVAILABLE, "busy").into_response());
        }
        self.limits.answered();
        let scenario = match unprefixed(id) {
            i if i.starts_with("progress-") || i.starts_with("notyet-") => self.moving(id),
            _ => Scenario::of(id),
        };
        match scenario {
            Scenario::Flaky if self.first_call(id) => Answer::Response(
                (StatusCode::INTERNAL_SERVER_ERROR, "temporary failure").into_response(),
            ),
            Scenario::RateLimited if self.first_call(id) => Answer::Response(
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "1")],
                    "slow down",
                )
                    .into_response(),
            ),
            Scenario::Flaky | Scenario::RateLimited => Answer::Body(Scenario::Paid),
            other => Answer::Body(other),
        }
    }

    /// The scenario of a transaction whose status moves with time.
    fn moving(&self, id: &str) -> Scenario {
        let now = SystemTime::now();
        let mut timeline = self.timeline.lock().unwrap_or_else(|p| p.into_inner());
        let calls = timeline.entry(id.to_owned()).or_default();
        calls.push(now);
        let age = now.duration_since(calls[0]).unwrap_or_default();
        let step = self.options.progress_step;
        match (unprefixed(id).starts_with("notyet-"), age) {
            (true, a) if a < step => Scenario::NotFound,
            (true, _) => Scenario::Paid,
            (false, a) if a < step => Scenario::Open,
            (false, a) if a < step * 2 => Scenario::Authorized,
            (false, _) => Scenario::Paid,
        }
    }

    fn first_call(&self, id: &str) -> bool {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let n = calls.entry(id.to_owned()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Counts a token request and issues the next token.
    pub fn issue_token(&self) -> String {
        self.counters.token_requests.fetch_add(1, Ordering::Relaxed);
        format!(
            "sim-token-{}",
            self.next_token.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Counts a refused token request.
    pub fn refuse_token(&self) {
        self.counters.token_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Lifetime of issued tokens, seconds.
    pub fn token_ttl_secs(&self) -> u64 {
        self.options.token_ttl_secs
    }
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
            timeline: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            limits: RateLimits {
                per_second: AtomicU64::new(options.rate_limit.unwrap_or(0.0).to_bits()),
                buckets: Mutex::new(HashMap::new()),
                throttled: AtomicU64::new(0),
                answered_by_second: Mutex::new(Vec::new()),
                throttled_by_second: Mutex::new(Vec::new()),
                started: std::time::Instant::now(),
            },
        });
        let mut app = Router::new().route("/healthz", get(|| async { "ok\n" }));
        for connector in SIMULATED {
            app = app.merge((connector.routes)());
        }
        let counted = state.clone();
        let app = app
            .with_state(state.clone())
            .layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| {
                    if request.version() == axum::http::Version::HTTP_2 {
                        counted
                            .counters
                            .http2_requests
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    next.run(request)
                },
            ));
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

    /// Base URL, for `connectors.<name>.base_url` of every simulated connector.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests that came over HTTP/2.
    pub fn http2_requests(&self) -> u64 {
        self.state.counters.http2_requests.load(Ordering::Relaxed)
    }

    /// Token requests served.
    pub fn token_requests(&self) -> u64 {
        self.state.counters.token_requests.load(Ordering::Relaxed)
    }

    /// Get Transaction requests served.
    pub fn status_requests(&self) -> u64 {
        self.state.counters.status_requests.load(Ordering::Relaxed)
    }

    /// When each status call of a `progress-` or `notyet-` transaction came.
    pub fn timeline(&self, id: &str) -> Vec<SystemTime> {
        self.state
            .timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Changes the per-credential rate limit while running (`None`: no limit).
    pub fn set_rate_limit(&self, per_second: Option<f64>) {
        self.state
            .limits
            .per_second
            .store(per_second.unwrap_or(0.0).to_bits(), Ordering::Relaxed);
    }

    /// Calls answered 429 by the rate limit.
    pub fn throttled(&self) -> u64 {
        self.state.limits.throttled.load(Ordering::Relaxed)
    }

    /// Get Transaction calls answered (not throttled), per second since the start.
    pub fn answered_by_second(&self) -> Vec<u64> {
        self.state
            .limits
            .answered_by_second
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Calls answered 429, per second since the start.
    pub fn throttled_by_second(&self) -> Vec<u64> {
        self.state
            .limits
            .throttled_by_second
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
