//! CM.com connector HTTP behaviour against a local mock server: token handling,
//! error classification, timeouts, integrity, and URL safety.

use std::sync::Arc;
use std::time::Duration;

use paysync::codec::{decode_request, DecodeOptions, RejectCode, SourcePosition};
use paysync::connectors::{CallError, RetryReason};
use paysync::domain::event::FailureCode;
use paysync::domain::{Money, PaymentStatus, StatusCheckRequest, TransactionId};
use paysync::telemetry::Metrics;
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::*;

const TX_PATH: &str = "/api/v1/paymentmethods/google-pay/v1/transactions/tx-1";
const TOKEN_PATH: &str = "/api/v1/authorization/oauth2/token";

fn request() -> StatusCheckRequest {
    StatusCheckRequest::new(
        TransactionId::parse("tx-1").unwrap(),
        "cm",
        "default",
        "req-1",
    )
}

fn token_body(token: &str, expires_in: u64) -> serde_json::Value {
    serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in})
}

fn success_body() -> serde_json::Value {
    serde_json::json!({"id": "tx-1", "amount": 1200, "currency": "EUR", "status": "SUCCESS", "reference": "o-1"})
}

async fn mount_token(server: &MockServer, token: &str, expires_in: u64) {
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(body_string_contains("grant_type=client_credentials"))
        .and(body_string_contains(format!("client_id={CLIENT_ID}")))
        .and(body_string_contains(format!(
            "client_secret={CLIENT_SECRET}"
        )))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(token, expires_in)))
        .mount(server)
        .await;
}

async fn requests_to(server: &MockServer, p: &str) -> usize {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == p)
        .count()
}

struct Fixture {
    server: MockServer,
    metrics: Arc<Metrics>,
    clock: ManualClock,
    client: paysync::connectors::gateway::Gateway,
}

async fn fixture() -> Fixture {
    let server = MockServer::start().await;
    let metrics = Arc::new(Metrics::new());
    let clock = ManualClock::new();
    let client = cm_client(
        gateway_settings("cm", &server.uri()),
        metrics.clone(),
        clock.clock(),
    );
    Fixture {
        server,
        metrics,
        clock,
        client,
    }
}

impl Fixture {
    async fn call(&self, req: &StatusCheckRequest) -> paysync::connectors::gateway::CallRecord {
        let http = self.client.prepare(req).unwrap();
        self.client
            .call_once(req, &http, paysync::connectors::limit::Priority::Fresh)
            .await
    }
}

#[tokio::test]
async fn token_is_fetched_with_client_credentials_and_sent_as_bearer() {
    let f = fixture().await;
    mount_token(&f.server, "tok-A", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .and(header("authorization", "Bearer tok-A"))
        .respond_with(ResponseTemplate::new(200).set_body_json(success_body()))
        .expect(1)
        .mount(&f.server)
        .await;
    let record = f.call(&request()).await;
    let report = record.outcome.unwrap();
    assert_eq!(report.status, PaymentStatus::CHARGED);
    assert_eq!(report.captured_amount, Some(1200));
    assert_eq!(record.calls, 1);
}

#[tokio::test]
async fn token_is_reused_across_calls_and_refreshed_at_expiry() {
    let f = fixture().await;
    mount_token(&f.server, "tok-A", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(success_body()))
        .mount(&f.server)
        .await;
    for _ in 0..3 {
        assert!(f.call(&request()).await.outcome.is_ok());
    }
    assert_eq!(
        requests_to(&f.server, TOKEN_PATH).await,
        1,
        "one token for three calls"
    );
    f.clock.advance(Duration::from_secs(3600 - 59));
    assert!(f.call(&request()).await.outcome.is_ok());
    assert_eq!(
        requests_to(&f.server, TOKEN_PATH).await,
        2,
        "refreshed inside the safety margin"
    );
    assert!(f
        .metrics
        .render()
        .contains("paysync_token_refreshes_total{connector=\"cm\"} 2"));
}

#[tokio::test]
async fn concurrent_calls_share_one_token_request() {
    let f = fixture().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(token_body("tok", 3600))
                .set_delay(Duration::from_millis(100)),
        )
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(success_body()))
        .mount(&f.server)
        .await;
    let req = request();
    let http = f.client.prepare(&req).unwrap();
    let calls = (0..20).map(|_| {
        f.client
            .call_once(&req, &http, paysync::connectors::limit::Priority::Fresh)
    });
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(|r| r.outcome.is_ok()));
    assert_eq!(requests_to(&f.server, TOKEN_PATH).await, 1);
}

#[tokio::test]
async fn a_401_refreshes_the_token_once_and_retries_once() {
    let f = fixture().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body("tok-old", 3600)))
        .up_to_n_times(1)
        .mount(&f.server)
        .await;
    mount_token(&f.server, "tok-new", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .and(header("authorization", "Bearer tok-old"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .and(header("authorization", "Bearer tok-new"))
        .respond_with(ResponseTemplate::new(200).set_body_json(success_body()))
        .mount(&f.server)
        .await;
    let record = f.call(&request()).await;
    assert_eq!(record.outcome.unwrap().status, PaymentStatus::CHARGED);
    assert_eq!(record.calls, 2);
    assert_eq!(requests_to(&f.server, TOKEN_PATH).await, 2);
}

#[tokio::test]
async fn a_second_401_is_an_authentication_failure() {
    let f = fixture().await;
    mount_token(&f.server, "tok", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(401))
        .mount(&f.server)
        .await;
    let record = f.call(&request()).await;
    match record.outcome {
        Err(CallError::Permanent(failure)) => {
            assert_eq!(failure.code, FailureCode::AuthenticationFailed);
            assert_eq!(failure.status_code, Some(401));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        record.calls, 2,
        "refreshed once, retried once, then stopped"
    );
    assert_eq!(requests_to(&f.server, TOKEN_PATH).await, 2);
}

async fn failure_for(status: u16, body: &str) -> CallError {
    let f = fixture().await;
    mount_token(&f.server, "tok", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(
            ResponseTemplate::new(status)
                .set_body_string(body)
                .insert_header("retry-after", "3"),
        )
        .mount(&f.server)
        .await;
    f.call(&request()).await.outcome.unwrap_err()
}

#[tokio::test]
async fn error_statuses_are_classified() {
    match failure_for(403, "").await {
        CallError::Permanent(f) => assert_eq!(f.code, FailureCode::AuthenticationFailed),
        other => panic!("403: {other:?}"),
    }
    match failure_for(404, r#"{"message":"Transaction not found"}"#).await {
        CallError::Permanent(f) => {
            assert_eq!(f.code, FailureCode::TransactionNotFound);
            assert_eq!(
                f.connector_message.as_deref(),
                Some("Transaction not found")
            );
            assert_eq!(f.status_code, Some(404));
        }
        other => panic!("404: {other:?}"),
    }
    match failure_for(400, r#"{"messages":[{"message":"bad id"}]}"#).await {
        CallError::Permanent(f) => assert_eq!(f.code, FailureCode::ConnectorErrorResponse),
        other => panic!("400: {other:?}"),
    }
    match failure_for(500, "<html>oops</html>").await {
        CallError::Retryable {
            reason, failure, ..
        } => {
            assert_eq!(reason, RetryReason::ServerError);
            assert_eq!(failure.code, FailureCode::ConnectorErrorResponse);
        }
        other => panic!("500: {other:?}"),
    }
    match failure_for(429, "").await {
        CallError::Retryable {
            reason,
            retry_after,
            ..
        } => {
            assert_eq!(reason, RetryReason::RateLimited);
            assert_eq!(
                retry_after,
                Some(Duration::from_secs(2)),
                "the processor's 3 s, capped by retry.max_retry_after"
            );
        }
        other => panic!("429: {other:?}"),
    }
}

#[tokio::test]
async fn a_slow_answer_is_a_retryable_timeout() {
    let f = fixture().await;
    mount_token(&f.server, "tok", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(success_body())
                .set_delay(Duration::from_secs(2)),
        )
        .mount(&f.server)
        .await;
    match f.call(&request()).await.outcome {
        Err(CallError::Retryable {
            reason: RetryReason::Timeout,
            failure,
            ..
        }) => {
            assert_eq!(failure.code, FailureCode::ConnectorTimeout)
        }
        other => panic!("{other:?}"),
    }
    assert!(f.metrics.render().contains("code=\"timeout\""));
}

#[tokio::test]
async fn a_malformed_2xx_is_a_permanent_deserialization_failure() {
    let f = fixture().await;
    mount_token(&f.server, "tok", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_string("{\"status\": \"SUCC"))
        .mount(&f.server)
        .await;
    match f.call(&request()).await.outcome {
        Err(CallError::Permanent(failure)) => {
            assert_eq!(failure.code, FailureCode::ResponseDeserializationFailed)
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_amount_mismatch_fails_the_integrity_check() {
    let f = fixture().await;
    mount_token(&f.server, "tok", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(success_body()))
        .mount(&f.server)
        .await;
    let mut req = request();
    req.amount = Some(Money {
        minor_amount: 999,
        currency: "EUR".into(),
    });
    // The connector reports what it was told; the pipeline checks the amount.
    assert!(f.call(&req).await.outcome.is_ok());
    let http = f.client.prepare(&req).unwrap();
    let result = paysync::pipeline::process::check(&f.client, &req, &http, None).await;
    assert_eq!(
        result.outcome.unwrap_err().code,
        FailureCode::IntegrityCheckFailed
    );
}

#[tokio::test]
async fn token_endpoint_failures_are_classified_and_never_leak_credentials() {
    let f = fixture().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&f.server)
        .await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_string(format!("bad client_secret={CLIENT_SECRET}")),
        )
        .mount(&f.server)
        .await;
    let first = f.call(&request()).await.outcome.unwrap_err();
    assert!(
        matches!(
            first,
            CallError::Retryable {
                reason: RetryReason::ServerError,
                ..
            }
        ),
        "{first:?}"
    );
    let second = f.call(&request()).await.outcome.unwrap_err();
    match &second {
        CallError::Permanent(failure) => {
            assert_eq!(failure.code, FailureCode::AuthenticationFailed)
        }
        other => panic!("{other:?}"),
    }
    for e in [first, second] {
        let shown = format!("{e:?}");
        assert!(!shown.contains(CLIENT_SECRET), "{shown}");
    }
    assert_eq!(
        requests_to(&f.server, TX_PATH).await,
        0,
        "no status call without a token"
    );
}

#[tokio::test]
async fn unsafe_ids_never_reach_a_url() {
    let f = fixture().await;
    mount_token(&f.server, "tok", 3600).await;
    for id in ["../x", "a/b", "..", "%2e%2e", "a?b=c", "a#b"] {
        let value = serde_json::json!({"connector_transaction_id": id}).to_string();
        let err = decode_request(
            Some(value.as_bytes()),
            &[],
            SourcePosition {
                topic: "in",
                partition: 0,
                offset: 0,
            },
            &DecodeOptions::new("cm", "default"),
        )
        .unwrap_err();
        assert_eq!(err.code, RejectCode::InvalidTransactionId, "{id}");
    }
    assert!(f.server.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn retry_policy_rides_out_transient_errors_and_reports_exhaustion() {
    let f = fixture().await;
    mount_token(&f.server, "tok", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(success_body()))
        .mount(&f.server)
        .await;
    // The breaker is set above the retry budget so that exhaustion itself is
    // tested; with the breaker in play a connector failing every call is an
    // outage and requests wait (see the resilience tests).
    let mut settings = f.client.settings().clone();
    settings.circuit.failure_threshold = 100;
    let client = cm_client(settings, f.metrics.clone(), f.clock.clock());
    let req = request();
    let http = client.prepare(&req).unwrap();
    let result = client.check(&req, &http).await;
    assert_eq!(result.outcome.unwrap().status, PaymentStatus::CHARGED);
    assert_eq!(result.attempts, 3);
    assert!(f
        .metrics
        .render()
        .contains("paysync_connector_retries_total{connector=\"cm\",reason=\"5xx\"} 2"));

    f.server.reset().await;
    mount_token(&f.server, "tok", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(502))
        .mount(&f.server)
        .await;
    let result = client.check(&req, &http).await;
    let failure = result.outcome.unwrap_err();
    assert_eq!(failure.code, FailureCode::ConnectorErrorResponse);
    assert_eq!(result.attempts, 4, "max_attempts");
    assert_eq!(failure.status_code, Some(502));
}

/// Audit: a 5xx larger than `max_response_bytes` counted as an answer for the
/// circuit breaker. It is a failure: retried, and the circuit opens.
#[tokio::test]
async fn an_oversized_error_answer_is_a_failure_that_opens_the_circuit() {
    let f = fixture().await;
    mount_token(&f.server, "tok", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(502).set_body_string("x".repeat(200 * 1024)))
        .mount(&f.server)
        .await;
    let mut settings = f.client.settings().clone();
    settings.circuit.failure_threshold = 3;
    settings.retry.max_attempts = 3;
    let client = cm_client(settings, f.metrics.clone(), f.clock.clock());
    let req = request();
    let http = client.prepare(&req).unwrap();
    let check = tokio::time::timeout(Duration::from_secs(2), client.check(&req, &http)).await;
    assert!(
        check.is_err(),
        "a lone request keeps waiting on the open circuit: {check:?}"
    );
    assert!(client.breaker().is_open(), "three failures in a row");
    let text = f.metrics.render();
    let retries: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("paysync_connector_retries_total{connector=\"cm\",reason=\"5xx\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(retries >= 3.0, "retried as 5xx: {retries}");
}

#[tokio::test]
async fn an_absurd_token_lifetime_is_clamped_not_a_panic() {
    // Issue c: `expires_in` 2^64-1 overflowed `Instant` in the token cache.
    let f = fixture().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_string(r#"{"access_token":"tok-X","expires_in":18446744073709551615}"#),
        )
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(success_body()))
        .mount(&f.server)
        .await;
    assert_eq!(
        f.call(&request()).await.outcome.unwrap().status,
        PaymentStatus::CHARGED
    );
    f.call(&request()).await.outcome.unwrap();
    assert_eq!(requests_to(&f.server, TOKEN_PATH).await, 1);
    // Trusted for at most a day, not forever.
    f.clock.advance(Duration::from_secs(24 * 3600));
    f.call(&request()).await.outcome.unwrap();
    assert_eq!(requests_to(&f.server, TOKEN_PATH).await, 2);
}

#[tokio::test]
async fn connector_status_is_kept_as_received_and_unsafe_redirects_are_dropped() {
    // Issue f: "SUCCESS\n" was published as connector_status "SUCCESS" (cleaned),
    // and a `javascript:` redirect was published as redirection_data.
    let f = fixture().await;
    mount_token(&f.server, "tok", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            serde_json::json!({"id": "tx-1", "amount": 1200, "currency": "EUR", "status": "SUCCESS\n"}),
        ))
        .mount(&f.server)
        .await;
    let report = f.call(&request()).await.outcome.unwrap();
    assert_eq!(report.status, PaymentStatus::UNRESOLVED);
    assert_eq!(report.connector_status.as_deref(), Some("SUCCESS\n"));

    let f = fixture().await;
    mount_token(&f.server, "tok", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "id": "tx-1", "amount": 1200, "currency": "EUR", "status": "OPEN",
            "action": {"redirect": {"url": "javascript:alert(1)"}}
        })))
        .mount(&f.server)
        .await;
    let report = f.call(&request()).await.outcome.unwrap();
    assert_eq!(report.status, PaymentStatus::AUTHENTICATION_PENDING);
    assert_eq!(report.redirection_data, None, "not published");
    assert_eq!(
        paysync::telemetry::sum_metric(
            &f.metrics.render(),
            "paysync_redirects_dropped_total",
            &[("connector", "cm")]
        ),
        1.0
    );
}

#[tokio::test]
async fn refused_credentials_are_not_asked_again_during_the_backoff() {
    let f = fixture().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(serde_json::json!({"error": "invalid_client"})),
        )
        .mount(&f.server)
        .await;
    for _ in 0..20 {
        let record = f.call(&request()).await;
        match record.outcome {
            Err(CallError::Permanent(failure)) => {
                assert_eq!(failure.code, FailureCode::AuthenticationFailed)
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        requests_to(&f.server, TOKEN_PATH).await,
        1,
        "one token request per backoff interval"
    );
    // After the first backoff (1 s) the endpoint is asked once more.
    f.clock.advance(Duration::from_millis(1001));
    for _ in 0..5 {
        f.call(&request()).await.outcome.unwrap_err();
    }
    assert_eq!(requests_to(&f.server, TOKEN_PATH).await, 2);
    assert_eq!(
        paysync::telemetry::sum_metric(
            &f.metrics.render(),
            "paysync_token_refusals_total",
            &[("connector", "cm"), ("account", "default")]
        ),
        2.0
    );
}

/// A processor that throttles one payment forever (429 with an absurd
/// `Retry-After` of 10^19 seconds, which overflowed `now + after` and
/// panicked the limiter): that request ends as a failed check once it was
/// throttled for `retry.max_throttled`, each wait capped by
/// `retry.max_retry_after`; the account goes on serving another payment.
#[tokio::test]
async fn a_payment_throttled_forever_ends_as_a_failed_check_and_the_account_goes_on() {
    let f = fixture().await;
    mount_token(&f.server, "tok", 3600).await;
    Mock::given(method("GET"))
        .and(path(TX_PATH))
        .respond_with(
            ResponseTemplate::new(429).insert_header("Retry-After", "10000000000000000000"),
        )
        .mount(&f.server)
        .await;
    Mock::given(method("GET"))
        .and(path(
            "/api/v1/paymentmethods/google-pay/v1/transactions/tx-2",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(success_body()))
        .mount(&f.server)
        .await;
    let mut settings = f.client.settings().clone();
    settings.retry.max_retry_after = Duration::from_millis(200);
    settings.retry.max_throttled = Duration::from_secs(1);
    let client = Arc::new(cm_client(settings, f.metrics.clone(), f.clock.clock()));
    let throttled = request();
    let fine =
        StatusCheckRequest::new(TransactionId::parse("tx-2").unwrap(), "cm", "default", "r2");
    let (a, b) = tokio::join!(
        async {
            let http = client.prepare(&throttled).unwrap();
            client.check(&throttled, &http).await
        },
        async {
            let http = client.prepare(&fine).unwrap();
            client.check(&fine, &http).await
        }
    );
    let failure = a.outcome.unwrap_err();
    assert_eq!(failure.code, FailureCode::ConnectorErrorResponse);
    assert_eq!(failure.status_code, Some(429));
    assert!(
        failure.message.contains("retry.max_throttled"),
        "{}",
        failure.message
    );
    // Waits of at most 0.25 s (the cap plus jitter) over a second: a handful of
    // calls, not one (the absurd header was not taken as given).
    assert!(a.attempts >= 3, "{}", a.attempts);
    assert_eq!(b.outcome.unwrap().status, PaymentStatus::CHARGED);
    assert_eq!(
        paysync::telemetry::sum_metric(
            &f.metrics.render(),
            "paysync_connector_throttled_too_long_total",
            &[("connector", "cm")]
        ),
        1.0
    );
}
