//! Resilience against scripted mock connectors: transient 5xx, timeouts, 429
//! storms with Retry-After, token expiry and revocation with many calls in flight,
//! an outage longer than the retry budget, slow answers, the rate limiter, and
//! adaptive concurrency against the simulator's per-credential rate limit.
//! Every check must end with exactly one result, and no transient fault that
//! recovers may become an error or a FAILURE.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paysync::connectors::gateway::Gateway;
use paysync::connectors::gateway::{GatewaySettings, RateLimit};
use paysync::connectors::retry::CheckResult;
use paysync::domain::{PaymentStatus, StatusCheckRequest, TransactionId};
use paysync::telemetry::{sum_metric, Metrics};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::support::*;

const TOKEN_PATH: &str = "/api/v1/authorization/oauth2/token";

fn success(id: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(
        serde_json::json!({"id": id, "amount": 1200, "currency": "EUR", "status": "SUCCESS"}),
    )
}

fn id_of(request: &Request) -> String {
    request
        .url
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

type Answer = Box<dyn Fn(&str, usize) -> ResponseTemplate + Send + Sync>;

/// Answers each transaction by a script of (call number for that id -> response).
struct Script {
    calls: Mutex<HashMap<String, Vec<Instant>>>,
    script: Answer,
}

impl Script {
    fn new(f: impl Fn(&str, usize) -> ResponseTemplate + Send + Sync + 'static) -> Arc<Script> {
        Arc::new(Script {
            calls: Mutex::new(HashMap::new()),
            script: Box::new(f),
        })
    }
    fn calls(&self, id: &str) -> Vec<Instant> {
        self.calls
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }
    fn total(&self) -> usize {
        self.calls.lock().unwrap().values().map(Vec::len).sum()
    }
}

struct Shared(Arc<Script>);

impl Respond for Shared {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id = id_of(request);
        let n = {
            let mut calls = self.0.calls.lock().unwrap();
            let v = calls.entry(id.clone()).or_default();
            v.push(Instant::now());
            v.len() - 1
        };
        (self.0.script)(&id, n)
    }
}

struct TokenCounter(AtomicU64);

impl Respond for TokenCounter {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        ResponseTemplate::new(200).set_body_json(
            serde_json::json!({"access_token": format!("tok-{n}"), "expires_in": 3600}),
        )
    }
}

struct Rig {
    server: MockServer,
    metrics: Arc<Metrics>,
    client: Arc<Gateway>,
    tokens: Arc<TokenCounter>,
    clock: ManualClock,
}

async fn rig(script: Arc<Script>, tune: impl FnOnce(&mut GatewaySettings)) -> Rig {
    let server = MockServer::start().await;
    let tokens = Arc::new(TokenCounter(AtomicU64::new(0)));
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(TokenRef(tokens.clone()))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path_regex(
            r"^/api/v1/paymentmethods/google-pay/v1/transactions/[^/]+$",
        ))
        .respond_with(Shared(script))
        .mount(&server)
        .await;
    let mut settings = gateway_settings("cm", &server.uri());
    settings.retry.max_attempts = 5;
    settings.circuit.failure_threshold = 5;
    tune(&mut settings);
    let metrics = Arc::new(Metrics::new());
    let clock = ManualClock::new();
    let client = Arc::new(cm_client(settings, metrics.clone(), clock.clock()));
    Rig {
        server,
        metrics,
        client,
        tokens,
        clock,
    }
}

struct TokenRef(Arc<TokenCounter>);

impl Respond for TokenRef {
    fn respond(&self, r: &Request) -> ResponseTemplate {
        self.0.respond(r)
    }
}

impl Rig {
    /// Runs one check per id, all concurrently.
    async fn check_all(&self, ids: &[String]) -> Vec<CheckResult> {
        check_all(&self.client, ids).await
    }

    fn token_requests(&self) -> u64 {
        self.tokens.0.load(Ordering::SeqCst)
    }

    /// `paysync_connector_retries_total`, for one reason or (None) all of them.
    fn retries(&self, reason: Option<&str>) -> f64 {
        let labels: Vec<(&str, &str)> = reason.map(|r| ("reason", r)).into_iter().collect();
        sum_metric(
            &self.metrics.render(),
            "paysync_connector_retries_total",
            &labels,
        )
    }
}

/// Runs one check per id through `client`, all concurrently.
async fn check_all(client: &Arc<Gateway>, ids: &[String]) -> Vec<CheckResult> {
    let futures = ids.iter().map(|id| {
        let client = client.clone();
        let req = StatusCheckRequest::new(TransactionId::parse(id).unwrap(), "cm", "default", id);
        async move {
            let http = client.prepare(&req).unwrap();
            client.check(&req, &http).await
        }
    });
    futures::future::join_all(futures).await
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn assert_all_charged(results: &[CheckResult], n: usize) {
    assert_eq!(results.len(), n, "one result per check");
    for r in results {
        match &r.outcome {
            Ok(report) => assert_eq!(report.status, PaymentStatus::CHARGED),
            Err(f) => panic!("a transient fault became an error: {f:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_5xx_are_retried_and_never_become_errors() {
    // 3 in 10 transactions fail twice with a 5xx before answering.
    let script = Script::new(|id, n| {
        let k: usize = id.rsplit('-').next().unwrap().parse().unwrap();
        if k % 10 < 3 && n < 2 {
            ResponseTemplate::new(if n == 0 { 500 } else { 502 })
        } else {
            success(id)
        }
    });
    let r = rig(script.clone(), |_| {}).await;
    let ids = ids("tx", 200);
    let results = r.check_all(&ids).await;
    assert_all_charged(&results, 200);
    for (id, result) in ids.iter().zip(&results) {
        assert_eq!(
            result.attempts as usize,
            script.calls(id).len(),
            "attempts on the event = calls made"
        );
    }
    let failed_calls = ids
        .iter()
        .map(|id| script.calls(id).len() - 1)
        .sum::<usize>();
    assert_eq!(failed_calls, 120);
    assert_eq!(r.retries(Some("5xx")) as usize, failed_calls);
    assert_eq!(r.token_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_retried() {
    let script = Script::new(|id, n| {
        if id.ends_with("-0") && n == 0 {
            success(id).set_delay(Duration::from_secs(3)) // longer than request_timeout (500 ms)
        } else {
            success(id)
        }
    });
    let r = rig(script.clone(), |_| {}).await;
    let results = r.check_all(&ids("slow", 3)).await;
    assert_all_charged(&results, 3);
    assert_eq!(results[0].attempts, 2);
    assert_eq!(r.retries(Some("timeout")), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_with_retry_after_is_honoured() {
    let script = Script::new(|id, n| {
        if n == 0 {
            ResponseTemplate::new(429).insert_header("retry-after", "1")
        } else {
            success(id)
        }
    });
    // Every request's first call is refused, whatever the rate: to the adaptive
    // limit that is a processor refusing everything, and it slows to a call a
    // second (its unit tests cover that). This test is about each request's
    // retry, so the concurrency is fixed.
    let r = rig(script.clone(), |s| {
        s.retry.initial_backoff = Duration::from_millis(1);
        s.concurrency = paysync::connectors::limit::Concurrency::Fixed(64);
    })
    .await;
    let ids = ids("busy", 50);
    let results = r.check_all(&ids).await;
    assert_all_charged(&results, 50);
    for id in &ids {
        let calls = script.calls(id);
        assert_eq!(calls.len(), 2);
        assert!(
            calls[1] - calls[0] >= Duration::from_millis(990),
            "{id}: retried after {:?}",
            calls[1] - calls[0]
        );
    }
    assert_eq!(r.retries(Some("429")), 50.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_mid_run_costs_one_token_request_not_one_per_call() {
    let r = rig(
        Script::new(|id, _| success(id).set_delay(Duration::from_millis(20))),
        |_| {},
    )
    .await;
    assert_all_charged(&r.check_all(&ids("w1", 100)).await, 100);
    assert_eq!(r.token_requests(), 1);
    // The token reaches its refresh point while the next wave of 100 calls starts.
    r.clock.advance(Duration::from_secs(3600));
    assert_all_charged(&r.check_all(&ids("w2", 100)).await, 100);
    assert_eq!(
        r.token_requests(),
        2,
        "one refresh for 100 concurrent calls"
    );
    assert_eq!(
        sum_metric(&r.metrics.render(), "paysync_token_refreshes_total", &[]),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_with_many_calls_in_flight_is_refreshed_once() {
    let revoked = Arc::new(AtomicBool::new(false));
    let flag = revoked.clone();
    let server = MockServer::start().await;
    let tokens = Arc::new(TokenCounter(AtomicU64::new(0)));
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(TokenRef(tokens.clone()))
        .mount(&server)
        .await;
    struct Auth(Arc<AtomicBool>);
    impl Respond for Auth {
        fn respond(&self, r: &Request) -> ResponseTemplate {
            let auth = r
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if self.0.load(Ordering::SeqCst) && auth == "Bearer tok-1" {
                ResponseTemplate::new(401)
            } else {
                success(&id_of(r)).set_delay(Duration::from_millis(10))
            }
        }
    }
    Mock::given(method("GET"))
        .respond_with(Auth(flag))
        .mount(&server)
        .await;
    let settings = gateway_settings("cm", &server.uri());
    let metrics = Arc::new(Metrics::new());
    let client = Arc::new(cm_client(
        settings,
        metrics.clone(),
        ManualClock::new().clock(),
    ));
    let rig = Rig {
        server,
        metrics,
        client,
        tokens,
        clock: ManualClock::new(),
    };
    assert_all_charged(&rig.check_all(&ids("a", 10)).await, 10);
    revoked.store(true, Ordering::SeqCst);
    let results = rig.check_all(&ids("b", 100)).await;
    assert_all_charged(&results, 100);
    assert_eq!(
        rig.token_requests(),
        2,
        "one refresh for 100 calls that all saw a 401"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_retry_budget_produces_no_error_results() {
    let outage_ends = Arc::new(Mutex::new(None::<Instant>));
    let ends = outage_ends.clone();
    let script = Script::new(move |id, _| {
        let mut end = ends.lock().unwrap();
        let end = *end.get_or_insert_with(|| Instant::now() + Duration::from_millis(1500));
        if Instant::now() < end {
            ResponseTemplate::new(503)
        } else {
            success(id)
        }
    });
    // Retry budget: 4 calls within 300 ms, far shorter than the 1.5 s outage.
    let r = rig(script.clone(), |s| {
        s.retry.max_attempts = 4;
        s.retry.max_elapsed = Duration::from_millis(300);
        s.retry.initial_backoff = Duration::from_millis(10);
        s.circuit.failure_threshold = 4;
        s.circuit.cooldown = Duration::from_millis(100);
        s.circuit.max_cooldown = Duration::from_millis(200);
    })
    .await;
    let metrics = r.metrics.clone();
    let watch = tokio::spawn(async move {
        let mut seen_open = false;
        for _ in 0..400 {
            seen_open |= metrics
                .render()
                .contains("paysync_circuit_open{connector=\"cm\"} 1");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen_open
    });
    let started = Instant::now();
    let results = r.check_all(&ids("down", 30)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "nothing succeeded before the connector recovered"
    );
    assert_all_charged(&results, 30);
    assert!(watch.await.unwrap(), "the circuit opened during the outage");
    assert!(!r.client.breaker().is_open(), "and closed after it");
    // While open, calls were held back: far fewer than 30 requests retrying freely.
    let during = script.total() - 30;
    assert!(
        during < 30 * 4,
        "{during} failed calls: the breaker held calls back"
    );
    assert!(r
        .metrics
        .render()
        .contains("paysync_circuit_open{connector=\"cm\"} 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_within_the_timeout_are_not_retried() {
    let r = rig(
        Script::new(|id, _| success(id).set_delay(Duration::from_millis(300))),
        |_| {},
    )
    .await;
    let results = r.check_all(&ids("slowok", 20)).await;
    assert_all_charged(&results, 20);
    assert!(results.iter().all(|r| r.attempts == 1));
    assert_eq!(r.retries(None), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_spaces_calls_and_waiting_is_measured_not_an_error() {
    let r = rig(Script::new(|id, _| success(id)), |s| {
        s.rate_limit = Some(RateLimit {
            requests_per_second: 20,
            burst: 1,
        });
    })
    .await;
    let started = Instant::now();
    let results = r.check_all(&ids("limited", 11)).await;
    assert_all_charged(&results, 11);
    // 11 calls at 20/s with a burst of 1 cannot finish in under 0.5 s.
    assert!(
        started.elapsed() >= Duration::from_millis(480),
        "{:?}",
        started.elapsed()
    );
    let text = r.metrics.render();
    assert_eq!(
        sum_metric(&text, "paysync_rate_limit_wait_seconds_count", &[]),
        11.0
    );
    assert!(
        sum_metric(&text, "paysync_rate_limit_wait_seconds_sum", &[]) >= 2.0,
        "waits add up (0 + 50 ms + … + 500 ms)"
    );
    let _ = &r.server;
}

/// A backlog of `n` checks at once through a gateway with `concurrency`
/// against the simulator limiting its credential to `per_second` calls a
/// second (429 with `Retry-After: 1` beyond it), 50 ms a call. Returns the
/// results, the simulator's (429s, status calls) and the account's limit.
async fn against_a_rate_limit(
    concurrency: paysync::connectors::limit::Concurrency,
    per_second: f64,
    n: usize,
) -> (Vec<CheckResult>, (u64, u64), f64) {
    let sim = simulator(paysync::demo::simulator::SimOptions {
        latency: paysync::demo::simulator::Latency::Fixed(Duration::from_millis(50)),
        rate_limit: Some(per_second),
        ..Default::default()
    })
    .await;
    let mut settings = gateway_settings("cm", &sim.base_url());
    settings.accounts.insert(
        "default".to_string(),
        paysync::connectors::auth::Account::of(
            &paysync::connectors::cm::CM_AUTH,
            &[
                ("client_id", paysync::demo::simulator::SIM_CLIENT_ID),
                ("client_secret", paysync::demo::simulator::SIM_CLIENT_SECRET),
            ],
        ),
    );
    settings.concurrency = concurrency;
    settings.request_timeout = Duration::from_secs(2);
    let client = Arc::new(cm_client(
        settings,
        Arc::new(Metrics::new()),
        ManualClock::new().clock(),
    ));
    let results = check_all(&client, &ids("success", n)).await;
    let limit = client.concurrency_limit("default").unwrap();
    let calls = (sim.throttled(), sim.status_requests());
    sim.stop().await;
    (results, calls, limit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_concurrency_learns_a_rate_limit_and_no_check_fails_for_throttling() {
    use paysync::connectors::limit::Concurrency;
    // 100 calls a second of 50 ms: 5 in flight fit. A backlog of 300 at once.
    let (results, (throttled, calls), limit) =
        against_a_rate_limit(Concurrency::Adaptive, 100.0, 300).await;
    // Every check ends with its real status: throttling is waited out, never an error.
    assert_eq!(results.len(), 300);
    for r in &results {
        match &r.outcome {
            Ok(report) => assert_eq!(report.status, PaymentStatus::CHARGED),
            Err(f) => panic!("throttling became an error: {f:?}"),
        }
    }
    // It learned: well under the ceiling of 256, near the 5 that fit.
    assert!((1.0..=12.0).contains(&limit), "limit {limit}");
    let share = throttled as f64 / calls as f64;
    // The same backlog with a fixed concurrency four times too high: most of
    // its calls are refused.
    let (fixed_results, (fixed_throttled, fixed_calls), _) =
        against_a_rate_limit(Concurrency::Fixed(20), 100.0, 300).await;
    assert!(fixed_results.iter().all(|r| r.outcome.is_ok()));
    let fixed_share = fixed_throttled as f64 / fixed_calls as f64;
    eprintln!(
        "429s: adaptive {throttled} of {calls} calls (limit {limit:.1}), fixed 20 {fixed_throttled} of {fixed_calls}"
    );
    assert!(
        share <= 0.15 && fixed_share > 3.0 * share,
        "429s: adaptive {throttled} of {calls} calls, fixed 20 {fixed_throttled} of {fixed_calls}"
    );
}
