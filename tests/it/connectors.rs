//! The same table-driven tests for every registered connector: its conformance
//! table (`tests/fixtures/<name>/cases.json`: recorded bodies and the report they
//! must give, error answers and the failure they must give, unreadable bodies),
//! and the same HTTP behaviour through the gateway against a local mock server
//! (auth header, 404, 401, 429 with `Retry-After`, the integrity check). A new
//! connector brings its fixtures and passes these unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use paysync::connectors::gateway::Gateway;
use paysync::connectors::{registry, CallError, Connector, HttpResponse};
use paysync::domain::event::FailureCode;
use paysync::domain::{
    Money, PaymentMethodType, PaymentStatus, RedirectForm, StatusCheckRequest, TransactionId,
};
use paysync::telemetry::Metrics;
use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::*;

fn fixtures_dir(connector: &str) -> String {
    format!("{}/tests/fixtures/{connector}", env!("CARGO_MANIFEST_DIR"))
}

fn cases(connector: &str) -> Value {
    let text = std::fs::read_to_string(format!("{}/cases.json", fixtures_dir(connector)))
        .unwrap_or_else(|e| panic!("{connector} has no conformance table: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn fixture(connector: &str, name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{name}", fixtures_dir(connector))).unwrap()
}

fn request(connector: &str, spec: &Value) -> StatusCheckRequest {
    let mut r = StatusCheckRequest::new(
        // A PaymentIntent id: Stripe checks only those, the others any id.
        TransactionId::parse("pi_conf-1").unwrap(),
        connector,
        "default",
        "r",
    );
    r.payment_method_type = spec["payment_method_type"]
        .as_str()
        .map(|m| PaymentMethodType::parse(m).unwrap());
    r
}

fn ok(body: Vec<u8>) -> HttpResponse {
    HttpResponse {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body,
    }
}

fn connectors() -> Vec<Arc<dyn Connector>> {
    registry::names()
        .into_iter()
        .map(|n| registry::get(n).unwrap())
        .collect()
}

/// Checks `expect[field]` when present: null means "must be empty".
fn check<T: PartialEq + std::fmt::Debug>(
    what: &str,
    expect: &Value,
    field: &str,
    got: Option<T>,
    want: impl Fn(&Value) -> T,
) {
    match expect.get(field) {
        None => {}
        Some(Value::Null) => assert_eq!(got, None, "{what}: {field} must be empty"),
        Some(v) => assert_eq!(got, Some(want(v)), "{what}: {field}"),
    }
}

#[test]
fn every_connector_passes_its_conformance_table() {
    let mut checked = BTreeMap::new();
    for connector in connectors() {
        let name = connector.name();
        let table = cases(name);
        let mut n = 0;
        for case in table["status"].as_array().unwrap() {
            let file = case["fixture"].as_str().unwrap();
            let what = format!("{name}/{file}");
            let report = connector
                .parse_status(&request(name, &case["request"]), &ok(fixture(name, file)))
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            let e = &case["expect"];
            assert_eq!(
                report.status.as_str(),
                e["status"].as_str().unwrap(),
                "{what}"
            );
            assert_eq!(report.status_code, 200, "{what}");
            check(
                &what,
                e,
                "connector_status",
                report.connector_status.clone(),
                |v| v.as_str().unwrap().to_owned(),
            );
            let redirect = match &report.redirection_data {
                Some(RedirectForm::Uri { uri }) => Some(uri.clone()),
                _ => None,
            };
            check(&what, e, "redirect", redirect, |v| {
                v.as_str().unwrap().to_owned()
            });
            check(&what, e, "amount", report.amount.clone(), |v| Money {
                minor_amount: v[0].as_i64().unwrap(),
                currency: v[1].as_str().unwrap().to_owned(),
            });
            check(&what, e, "captured_amount", report.captured_amount, |v| {
                v.as_i64().unwrap()
            });
            check(&what, e, "refunded_amount", report.refunded_amount, |v| {
                v.as_i64().unwrap()
            });
            check(
                &what,
                e,
                "refund_pending_amount",
                report.refund_pending_amount,
                |v| v.as_i64().unwrap(),
            );
            check(&what, e, "created_at", report.created_at, |v| {
                v.as_i64().unwrap()
            });
            check(&what, e, "authorized_at", report.authorized_at, |v| {
                v.as_i64().unwrap()
            });
            check(&what, e, "captured_at", report.captured_at, |v| {
                v.as_i64().unwrap()
            });
            check(
                &what,
                e,
                "merchant_order_id",
                report.merchant_order_id.clone(),
                |v| v.as_str().unwrap().to_owned(),
            );
            check(
                &what,
                e,
                "payment_method_type",
                report.payment_method_type.clone(),
                |v| v.as_str().unwrap().to_owned(),
            );
            let details = report
                .error
                .as_ref()
                .and_then(|err| err.connector_details.clone());
            check(
                &what,
                e,
                "connector_error_code",
                details.as_ref().and_then(|d| d.code.clone()),
                |v| v.as_str().unwrap().to_owned(),
            );
            check(
                &what,
                e,
                "connector_error_reason",
                details.as_ref().and_then(|d| d.reason.clone()),
                |v| v.as_str().unwrap().to_owned(),
            );
            if let Some(f) = e.get("final") {
                assert_eq!(
                    connector.is_final(report.status),
                    f.as_bool().unwrap(),
                    "{what}: final"
                );
            }
            // A FAILURE only when the connector said so.
            if report.status == PaymentStatus::FAILURE {
                let said = report.connector_status.clone().unwrap();
                assert!(
                    table["failure_status"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|s| s == &Value::String(said.clone())),
                    "{what}"
                );
            }
            n += 1;
        }
        for case in table["errors"].as_array().unwrap() {
            let status = case["http_status"].as_u64().unwrap() as u16;
            let body = match (case["fixture"].as_str(), case["body"].as_str()) {
                (Some(f), _) => fixture(name, f),
                (None, Some(b)) => b.as_bytes().to_vec(),
                _ => Vec::new(),
            };
            let headers = case["headers"]
                .as_object()
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let response = HttpResponse {
                status,
                headers,
                body: body.clone(),
            };
            let what = format!("{name}/{status}");
            let e = &case["expect"];
            match paysync::connectors::classify_for(
                connector.as_ref(),
                &response,
                connector.parse_error(&body),
                SystemTime::now(),
            ) {
                CallError::Permanent(f) => {
                    assert_eq!(Some(f.code.as_str()), e["failure"].as_str(), "{what}");
                    check(
                        &what,
                        e,
                        "connector_message",
                        f.connector_message.clone(),
                        |v| v.as_str().unwrap().to_owned(),
                    );
                    check(
                        &what,
                        e,
                        "connector_error_code",
                        f.connector_code.clone(),
                        |v| v.as_str().unwrap().to_owned(),
                    );
                    check(
                        &what,
                        e,
                        "connector_error_reason",
                        f.connector_reason.clone(),
                        |v| v.as_str().unwrap().to_owned(),
                    );
                }
                CallError::Unauthorized(_) => assert_eq!(e["unauthorized"], true, "{what}"),
                CallError::Retryable {
                    reason,
                    retry_after,
                    ..
                } => {
                    assert_eq!(Some(reason.label()), e["retry"].as_str(), "{what}");
                    check(&what, e, "retry_after_s", retry_after, |v| {
                        Duration::from_secs(v.as_u64().unwrap())
                    });
                }
            }
            n += 1;
        }
        for file in table["unreadable"].as_array().unwrap() {
            let file = file.as_str().unwrap();
            let err = connector
                .parse_status(&request(name, &Value::Null), &ok(fixture(name, file)))
                .unwrap_err();
            assert_eq!(
                err.code,
                FailureCode::ResponseDeserializationFailed,
                "{name}/{file}"
            );
            assert_eq!(err.status_code, Some(200));
            n += 1;
        }
        // Every recorded fixture is in the table (a fixture nobody checks proves nothing).
        let listed = serde_json::to_string(&table).unwrap();
        for entry in std::fs::read_dir(fixtures_dir(name)).unwrap() {
            let file = entry.unwrap().file_name().into_string().unwrap();
            // Token answers and webhook events are checked elsewhere.
            let status_body = file.ends_with(".json")
                && file != "cases.json"
                && !file.starts_with("token")
                && !file.starts_with("event_");
            if status_body {
                assert!(
                    listed.contains(&format!("\"{file}\"")),
                    "{name}/{file} is not in cases.json"
                );
            }
        }
        checked.insert(name, n);
    }
    assert!(checked.values().all(|n| *n >= 10), "{checked:?}");
}

/// The gateway of `connector` against a mock server whose status endpoint is
/// answered by `respond` (the token endpoint, when the scheme has one, answers a
/// fixed token).
async fn gateway_for(
    connector: &Arc<dyn Connector>,
    server: &MockServer,
) -> (Gateway, Arc<Metrics>, String) {
    let metrics = Arc::new(Metrics::new());
    let gateway = Gateway::new(
        connector.clone(),
        gateway_settings(connector.name(), &server.uri()),
        metrics.clone(),
        ManualClock::new().clock(),
    )
    .unwrap();
    let account = test_account(connector.auth());
    let (authorization, token_request) =
        expected_authorization(&account, &server.uri(), "tok-conf").await;
    if let Some(token_request) = token_request {
        Mock::given(method("POST"))
            .and(path(token_request.url.path()))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(
                    serde_json::json!({"access_token": "tok-conf", "expires_in": 3600}),
                ),
            )
            .mount(server)
            .await;
    }
    (gateway, metrics, authorization)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connector_behaves_the_same_over_http() {
    for connector in connectors() {
        let name = connector.name();
        let table = cases(name);
        let charged = table["status"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["expect"]["status"] == "CHARGED" && c["expect"].get("amount").is_some())
            .unwrap_or_else(|| panic!("{name}: a CHARGED fixture with an amount"));
        let body = fixture(name, charged["fixture"].as_str().unwrap());
        let amount = &charged["expect"]["amount"];
        let server = MockServer::start().await;
        let (gateway, metrics, authorization) = gateway_for(&connector, &server).await;
        let req = request(name, &charged["request"]);
        let http = gateway.prepare(&req).unwrap();
        let status_path = http.url.path().to_owned();

        // 1. The connector's credentials on the call, the answer normalized.
        Mock::given(method("GET"))
            .and(path(status_path.clone()))
            .and(wiremock::matchers::header(
                "authorization",
                authorization.as_str(),
            ))
            .respond_with(ResponseTemplate::new(200).set_body_raw(body.clone(), "application/json"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        let result = gateway.check(&req, &http).await;
        assert_eq!(
            result.outcome.as_ref().unwrap().status,
            PaymentStatus::CHARGED,
            "{name}"
        );
        assert_eq!(result.attempts, 1, "{name}");

        // 2. The integrity check, once in the pipeline, the same for every connector.
        Mock::given(method("GET"))
            .and(path(status_path.clone()))
            .respond_with(ResponseTemplate::new(200).set_body_raw(body.clone(), "application/json"))
            .up_to_n_times(2)
            .mount(&server)
            .await;
        let mut exact = req.clone();
        exact.amount = Some(Money {
            minor_amount: amount[0].as_i64().unwrap(),
            currency: amount[1].as_str().unwrap().to_owned(),
        });
        let result = paysync::pipeline::process::check(&gateway, &exact, &http, None).await;
        assert!(result.outcome.is_ok(), "{name}: {:?}", result.outcome);
        let mut wrong = exact.clone();
        wrong.amount.as_mut().unwrap().minor_amount += 1;
        let result = paysync::pipeline::process::check(&gateway, &wrong, &http, None).await;
        assert_eq!(
            result.outcome.unwrap_err().code,
            FailureCode::IntegrityCheckFailed,
            "{name}"
        );

        // 3. 429 with Retry-After: waited for, then answered.
        Mock::given(method("GET"))
            .and(path(status_path.clone()))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(status_path.clone()))
            .respond_with(ResponseTemplate::new(200).set_body_raw(body.clone(), "application/json"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        let started = Instant::now();
        let result = gateway.check(&req, &http).await;
        assert_eq!(
            result.outcome.unwrap().status,
            PaymentStatus::CHARGED,
            "{name}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(990),
            "{name}: Retry-After honoured"
        );
        assert_eq!(result.attempts, 2);

        // 4. 404 (with the connector's own 404 body, where it has one): the
        // transaction is unknown, not failed.
        let not_found_body = table["errors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["http_status"] == 404)
            .and_then(|c| c["fixture"].as_str())
            .map(|f| fixture(name, f))
            .unwrap_or_default();
        Mock::given(method("GET"))
            .and(path(status_path.clone()))
            .respond_with(ResponseTemplate::new(404).set_body_bytes(not_found_body))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        let result = gateway.check(&req, &http).await;
        assert_eq!(
            result.outcome.unwrap_err().code,
            FailureCode::TransactionNotFound,
            "{name}"
        );

        // 5. 401: an OAuth2 scheme refreshes once and calls once more; a static key
        // gets no second call. Either way the check fails as AUTHENTICATION_FAILED.
        Mock::given(method("GET"))
            .and(path(status_path.clone()))
            .respond_with(ResponseTemplate::new(401))
            .mount(&server)
            .await;
        let result = gateway.check(&req, &http).await;
        assert_eq!(
            result.outcome.unwrap_err().code,
            FailureCode::AuthenticationFailed,
            "{name}"
        );
        // A scheme with a token refreshes it once after a 401.
        let expected_calls = if test_account(connector.auth()).credential.refreshes() {
            2
        } else {
            1
        };
        assert_eq!(result.attempts, expected_calls, "{name}");
        assert!(
            !metrics.render().contains(CLIENT_SECRET) && !metrics.render().contains(API_KEY),
            "{name}: no secret in metrics"
        );
    }
}

/// End to end, for every simulated connector: one request per simulator scenario
/// (`simulator` in its conformance table) through the real pipeline and broker;
/// each event's status (and error code) is what the table says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_simulated_connector_maps_every_scenario_end_to_end() {
    use paysync::codec::avro::decode_event_json;
    use paysync::demo::simulator::{SimOptions, SIMULATED};
    use paysync::kafka::tools::RawProducer;

    let broker = Broker::new();
    let t = broker.topics("conformance-e2e", 2).await;
    let sim = simulator(SimOptions::default()).await;
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), ""))
        .await
        .unwrap();
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    let mut expected = BTreeMap::new();
    for connector in SIMULATED {
        let table = cases(connector.name);
        for (i, (prefix, want)) in table["simulator"].as_object().unwrap().iter().enumerate() {
            let id = format!("{}{prefix}{}-{i}", connector.id_prefix, connector.name);
            let value = format!(
                r#"{{"connector_transaction_id":"{id}","connector":"{}"}}"#,
                connector.name
            );
            producer
                .send(
                    &t.input,
                    None,
                    Some(id.as_bytes()),
                    Some(value.as_bytes()),
                    &[],
                )
                .await
                .unwrap();
            expected.insert(
                (connector.name.to_owned(), id),
                want.as_str().unwrap().to_owned(),
            );
        }
    }
    let records = read_outputs(
        broker.bootstrap(),
        &t,
        expected.len(),
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(records.len(), expected.len(), "one event per request");
    let mut seen = BTreeMap::new();
    for r in &records {
        assert_eq!(r.topic, t.output, "no dead letters");
        let json = decode_event_json(r.value.as_deref().unwrap()).unwrap();
        let got = match json["error"]["unified_details"]["code"].as_str() {
            Some(code) if json["status"] == "PAYMENT_STATUS_UNSPECIFIED" => {
                format!("PAYMENT_STATUS_UNSPECIFIED/{code}")
            }
            _ => json["status"].as_str().unwrap().to_owned(),
        };
        let key = (
            json["connector"].as_str().unwrap().to_owned(),
            json["connector_transaction_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        seen.insert(key, got);
    }
    assert_eq!(seen, expected);
    app.stop().await;
}

/// `http2 = "prior_knowledge"` speaks HTTP/2 without negotiation (h2c) to a
/// server that does (the simulator serves both on one port); `never` and `auto`
/// (ALPN, which plain HTTP does not have) stay on HTTP/1.1. Statuses come through
/// the same either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_speaks_h2c_and_the_others_http1() {
    use paysync::connectors::http::Http2;
    let broker = Broker::new();
    let sim = simulator(paysync::demo::simulator::SimOptions::default()).await;
    for (mode, over_h2) in [
        (Http2::PriorKnowledge, true),
        (Http2::Never, false),
        (Http2::Auto, false),
    ] {
        let t = broker.topics("h2c", 1).await;
        let mut s = settings(broker.bootstrap(), &t, &sim.base_url(), "");
        s.connectors.get_mut("cm").unwrap().gateway.http2 = mode;
        let app = paysync::app::start(s).await.unwrap();
        let before = sim.http2_requests();
        let id = format!("success-h2-{mode:?}");
        let value = format!(r#"{{"connector_transaction_id":"{id}"}}"#);
        send_request(broker.bootstrap(), &t.input, &id, &value).await;
        let records = read_outputs(broker.bootstrap(), &t, 1, Duration::from_secs(60)).await;
        let event =
            paysync::codec::avro::decode_event_json(records[0].value.as_deref().unwrap()).unwrap();
        assert_eq!(event["status"], "CHARGED", "{mode:?}");
        let h2 = sim.http2_requests() - before;
        if over_h2 {
            assert!(h2 >= 2, "{mode:?}: token and status over HTTP/2, saw {h2}");
        } else {
            assert_eq!(h2, 0, "{mode:?}");
        }
        app.stop().await;
    }
}

/// Stripe over HTTP: the pinned `Stripe-Version` (or the configured one), the
/// account's `Stripe-Account`, a request's connected account winning over it,
/// the key's bearer header; a 429 with `Stripe-Should-Retry: false` is final
/// after one call; accounts that share a key share one limiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_sends_its_version_and_connected_account() {
    use paysync::connectors::auth::Account;
    use wiremock::matchers::{header, query_param};
    let server = MockServer::start().await;
    let connector = registry::get("stripe").unwrap();
    let body = fixture("stripe", "succeeded_card.json");
    let mut settings = gateway_settings("stripe", &server.uri());
    settings.accounts.insert(
        "platform".into(),
        Account::of(
            connector.auth(),
            &[
                ("api_key", STRIPE_KEY),
                ("stripe_account", "acct_1ConnectedA"),
            ],
        ),
    );
    settings.api_version = Some("2023-10-16".into());
    settings.retry.max_throttled = Duration::from_secs(2);
    let gateway = Gateway::new(
        connector.clone(),
        settings,
        Arc::new(Metrics::new()),
        ManualClock::new().clock(),
    )
    .unwrap();
    Mock::given(method("GET"))
        .and(path("/v1/payment_intents/pi_a"))
        .and(query_param("expand[]", "latest_charge"))
        .and(header(
            "authorization",
            format!("Bearer {STRIPE_KEY}").as_str(),
        ))
        .and(header("stripe-version", "2023-10-16"))
        .and(header("stripe-account", "acct_1ConnectedA"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(body.clone()))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/payment_intents/pi_b"))
        .and(header("stripe-account", "acct_1FromTheEvent"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(body.clone()))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/payment_intents/pi_c"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("stripe-should-retry", "false")
                .set_body_bytes(fixture("stripe", "error_429.json")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let check = |id: &str, account: Option<&str>| {
        let mut r =
            StatusCheckRequest::new(TransactionId::parse(id).unwrap(), "stripe", "platform", "r");
        r.connected_account = account.map(str::to_owned);
        r
    };
    for (id, account) in [("pi_a", None), ("pi_b", Some("acct_1FromTheEvent"))] {
        let req = check(id, account);
        let http = connector
            .status_request(&url::Url::parse(&server.uri()).unwrap(), &req)
            .unwrap();
        let result = gateway.check(&req, &http).await;
        assert_eq!(
            result.outcome.unwrap().status,
            PaymentStatus::CHARGED,
            "{id}"
        );
    }
    let req = check("pi_c", None);
    let http = connector
        .status_request(&url::Url::parse(&server.uri()).unwrap(), &req)
        .unwrap();
    let result = gateway.check(&req, &http).await;
    assert!(result.outcome.is_err(), "{:?}", result.outcome);
    assert_eq!(
        result.attempts, 1,
        "Stripe-Should-Retry: false is final: {:?}",
        result.outcome
    );
    server.verify().await;
}
