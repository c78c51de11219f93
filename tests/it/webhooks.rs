//! The webhook intake (`[webhooks]`) through the binary with a real HTTP client:
//! each format becomes a check (and nothing else does), signatures with
//! rotation, path tokens, duplicates, oversize and malformed bodies, a 200 only
//! once the request is in the topic (a broker that is down gives 503), the
//! per-account rate, and slow clients.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use paysync::connectors::webhook::hmac_sha256_header;
use paysync::demo::simulator::SimOptions;
use paysync::demo::stack::free_addr;
use paysync::kafka::tools::{RawRecord, TopicReader};
use paysync::telemetry::sum_metric;

use crate::support::*;

pub const SECRET: &str = "whsec_paysync_it_secret";
pub const PATH_TOKEN: &str = "pt_0123456789abcdefXYZ";

/// `[webhooks]` on `listen` with `more` of its keys, and two more Mollie
/// accounts: `signed` (a webhook secret) and `guarded` (a path token).
pub fn webhook_settings(listen: SocketAddr, more: &str) -> String {
    let mollie = paysync::demo::simulator::mollie::ACCOUNT;
    format!(
        "[webhooks]\nlisten = \"{listen}\"\n{more}\n\
         [connectors.mollie.accounts.signed]\n{mollie}webhook_secret = \"{SECRET}\"\n\
         [connectors.mollie.accounts.guarded]\n{mollie}webhook_path_token = \"{PATH_TOKEN}\"\n\
         [connectors.stripe.accounts.shop]\napi_key = \"{STRIPE_KEY}\"\nwebhook_secret = \"{STRIPE_SECRET}\"\n"
    )
}

/// The Stripe account's endpoint secret.
pub const STRIPE_SECRET: &str = "whsec_stripe_it_secret";

/// paysync with `[webhooks]` (`more` of its keys) on `broker`, a CM.com and
/// Mollie simulator, fresh topics; ready to take webhooks.
pub struct Intake {
    pub brokers: String,
    pub t: Topics,
    pub sim: paysync::demo::simulator::Simulator,
    pub listen: SocketAddr,
    pub process: Process,
}

pub async fn intake(broker: &Broker, name: &str, partitions: i32, more: &str) -> Intake {
    intake_with(broker, name, partitions, more, SimOptions::default(), &[]).await
}

/// [`intake`] with simulator options and environment variables (`PAYSYNC_ROLE`,
/// overrides); ready by `/readyz/webhooks`.
pub async fn intake_with(
    broker: &Broker,
    name: &str,
    partitions: i32,
    more: &str,
    options: SimOptions,
    env: &[(&str, &str)],
) -> Intake {
    let brokers = broker.bootstrap().to_owned();
    let t = broker.topics(name, partitions).await;
    let sim = simulator(options).await;
    let listen = free_addr();
    let process = Process::spawn_full(
        &brokers,
        &t,
        &sim.base_url(),
        &webhook_settings(listen, more),
        env,
    );
    process
        .wait_path("readyz/webhooks", Duration::from_secs(60))
        .await;
    Intake {
        brokers,
        t,
        sim,
        listen,
        process,
    }
}

pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: String,
}

pub async fn post(url: &str, content_type: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut r = reqwest::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body.to_vec());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let response = r.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    Answer {
        status,
        retry_after,
        body: response.text().await.unwrap(),
    }
}

/// Reads the input topic from where it left off (blocking reads off the runtime).
pub struct InputReader(Option<TopicReader>);

impl InputReader {
    pub fn new(brokers: &str, t: &Topics) -> Self {
        InputReader(Some(
            TopicReader::new(brokers, &[(&t.input, t.partitions)]).unwrap(),
        ))
    }

    pub async fn read(&mut self, want: usize, timeout: Duration) -> Vec<RawRecord> {
        let mut reader = self.0.take().unwrap();
        let (reader, out) = tokio::task::spawn_blocking(move || {
            let out = reader.read(want, timeout);
            (reader, out)
        })
        .await
        .unwrap();
        self.0 = Some(reader);
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_of_every_format_become_checks_and_nothing_else_does() {
    let broker = Broker::new();
    let Intake {
        brokers,
        t,
        sim,
        listen,
        process,
    } = intake(&broker, "webhooks", 2, "max_body_bytes = 1024").await;
    let base = format!("http://{listen}/webhooks");
    let mut input = InputReader::new(&brokers, &t);
    const FORM: &str = "application/x-www-form-urlencoded";
    const JSON: &str = "application/json";

    // (what, url, content type, headers, body, answer, transaction produced)
    let signed_event = |event: &str, entity: &str| {
        format!(
            r#"{{"resource":"event","id":"{event}","type":"payment-link.paid","entityId":"{entity}","createdAt":"2026-12-02T09:00:00+00:00"}}"#
        )
    };
    let good_body = signed_event("event_wh4", "tr_success-wh-4");
    let good_sig = hmac_sha256_header(SECRET, good_body.as_bytes());
    let old_sig = hmac_sha256_header("whsec_the_previous_secret", good_body.as_bytes());
    let rotated_body = signed_event("event_wh5", "tr_success-wh-5");
    let rotated_new = hmac_sha256_header(SECRET, rotated_body.as_bytes());
    let rotated_old = hmac_sha256_header("whsec_the_previous_secret", rotated_body.as_bytes());
    let cm_body = |tx: &str| {
        format!(
            r#"{{"createdAt":"2026-12-02T09:00:00Z","event":"StatusChanged","transaction":"{tx}","reference":"order-1","payment":"pay-1"}}"#
        )
    };
    let big = format!("id=tr_success-{}", "x".repeat(2000));
    type Case<'a> = (
        &'a str,
        String,
        &'a str,
        Vec<(&'a str, &'a str)>,
        String,
        u16,
        Option<&'a str>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "cm",
            format!("{base}/cm/default?method=IDEAL"),
            JSON,
            vec![],
            cm_body("success-wh-1"),
            200,
            Some("success-wh-1"),
        ),
        (
            "cm repeated",
            format!("{base}/cm/default?method=IDEAL"),
            JSON,
            vec![],
            cm_body("success-wh-1"),
            200,
            None,
        ),
        (
            "cm without method",
            format!("{base}/cm/default"),
            JSON,
            vec![],
            cm_body("success-wh-x"),
            400,
            None,
        ),
        (
            "cm, method without a CM.com path",
            format!("{base}/cm/default?method=PAYPAL"),
            JSON,
            vec![],
            cm_body("success-wh-x"),
            400,
            None,
        ),
        (
            "cm, not json",
            format!("{base}/cm/default?method=IDEAL"),
            JSON,
            vec![],
            "not json".into(),
            400,
            None,
        ),
        (
            "cm, invalid id",
            format!("{base}/cm/default?method=IDEAL"),
            JSON,
            vec![],
            cm_body("../etc/passwd"),
            400,
            None,
        ),
        (
            "mollie classic",
            format!("{base}/mollie/default"),
            FORM,
            vec![],
            "id=tr_success-wh-2".into(),
            200,
            Some("tr_success-wh-2"),
        ),
        (
            "mollie classic to a signed account (it cannot be signed)",
            format!("{base}/mollie/signed"),
            FORM,
            vec![],
            "id=tr_success-wh-3".into(),
            401,
            None,
        ),
        (
            "mollie signed",
            format!("{base}/mollie/signed"),
            JSON,
            vec![("x-mollie-signature", good_sig.as_str())],
            good_body.clone(),
            200,
            Some("tr_success-wh-4"),
        ),
        (
            "mollie signed, wrong signature",
            format!("{base}/mollie/signed"),
            JSON,
            vec![("x-mollie-signature", old_sig.as_str())],
            good_body.clone(),
            401,
            None,
        ),
        (
            "mollie signed, no signature",
            format!("{base}/mollie/signed"),
            JSON,
            vec![],
            good_body.clone(),
            401,
            None,
        ),
        (
            "mollie signed during a rotation",
            format!("{base}/mollie/signed"),
            JSON,
            vec![
                ("x-mollie-signature", rotated_old.as_str()),
                ("x-mollie-signature", rotated_new.as_str()),
            ],
            rotated_body.clone(),
            200,
            Some("tr_success-wh-5"),
        ),
        (
            "mollie order",
            format!("{base}/mollie/default"),
            FORM,
            vec![],
            "id=ord_kEn1PlbGa".into(),
            200,
            None,
        ),
        (
            "mollie refund event",
            format!("{base}/mollie/default"),
            JSON,
            vec![],
            signed_event("event_re", "re_4qqhO89gsT"),
            200,
            None,
        ),
        (
            "guarded without its token",
            format!("{base}/mollie/guarded"),
            FORM,
            vec![],
            "id=tr_success-wh-x".into(),
            404,
            None,
        ),
        (
            "guarded with a wrong token",
            format!("{base}/mollie/guarded/pt_wrongwrongwrongwrong"),
            FORM,
            vec![],
            "id=tr_success-wh-x".into(),
            404,
            None,
        ),
        (
            "guarded with its token",
            format!("{base}/mollie/guarded/{PATH_TOKEN}"),
            FORM,
            vec![],
            "id=tr_success-wh-6".into(),
            200,
            Some("tr_success-wh-6"),
        ),
        (
            "token on an account without one",
            format!("{base}/mollie/default/{PATH_TOKEN}"),
            FORM,
            vec![],
            "id=tr_success-wh-x".into(),
            404,
            None,
        ),
        (
            "unknown connector",
            format!("{base}/adyen/default"),
            FORM,
            vec![],
            "id=tr_success-wh-x".into(),
            404,
            None,
        ),
        (
            "unknown merchant",
            format!("{base}/cm/nobody?method=IDEAL"),
            JSON,
            vec![],
            cm_body("success-wh-x"),
            404,
            None,
        ),
        (
            "no merchant",
            format!("{base}/cm"),
            JSON,
            vec![],
            cm_body("success-wh-x"),
            404,
            None,
        ),
        (
            "oversize",
            format!("{base}/mollie/default"),
            FORM,
            vec![],
            big,
            413,
            None,
        ),
        (
            "a payment mollie does not know",
            format!("{base}/mollie/default"),
            FORM,
            vec![],
            "id=tr_notfound-wh-7".into(),
            200,
            Some("tr_notfound-wh-7"),
        ),
    ];
    let mut produced = Vec::new();
    for (what, url, content_type, headers, body, want, tx) in &cases {
        let answer = post(url, content_type, headers, body.as_bytes()).await;
        assert_eq!(answer.status, *want, "{what}: {}", answer.body);
        // Nothing a caller sends comes back in an answer (the body, a secret).
        assert!(!answer.body.contains(SECRET) && !answer.body.contains(PATH_TOKEN));
        if body.len() > 12 {
            assert!(
                !answer.body.contains(body.as_str()),
                "{what}: the answer echoes the body"
            );
        }
        if let Some(tx) = tx {
            // Answered 200: the request is already in the topic.
            let records = input.read(1, Duration::from_secs(2)).await;
            assert_eq!(
                records.len(),
                1,
                "{what}: no request in the input topic after its 200"
            );
            let r = &records[0];
            assert_eq!(r.key.as_deref(), Some(tx.as_bytes()), "{what}");
            assert_eq!(r.header("x-request-source").as_deref(), Some("webhook"));
            let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
            assert_eq!(v["connector_transaction_id"], *tx);
            assert_eq!(v["follow"], true);
            assert!(v["request_id"].as_str().unwrap().starts_with("webhook:"));
            produced.push((v, r.header("x-webhook-event-id")));
        }
    }
    // Nothing else reached the input topic (the repeat, the refusals, the ignored ids).
    let extra = input.read(1, Duration::from_secs(2)).await;
    assert!(extra.is_empty(), "unexpected requests: {extra:?}");

    let by_tx = |tx: &str| {
        &produced
            .iter()
            .find(|(v, _)| v["connector_transaction_id"] == tx)
            .unwrap()
            .0
    };
    let event_id = |tx: &str| {
        produced
            .iter()
            .find(|(v, _)| v["connector_transaction_id"] == tx)
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(by_tx("success-wh-1")["connector"], "cm");
    assert_eq!(by_tx("success-wh-1")["payment_method_type"], "IDEAL");
    assert_eq!(by_tx("success-wh-1")["merchant_id"], "default");
    assert_eq!(by_tx("tr_success-wh-4")["merchant_id"], "signed");
    assert_eq!(by_tx("tr_success-wh-6")["merchant_id"], "guarded");
    // The processor's event id travels in its own header; every delivery has a
    // request id of its own (a processor resends one event id for days).
    assert_eq!(event_id("tr_success-wh-4").as_deref(), Some("event_wh4"));
    assert_eq!(event_id("tr_success-wh-5").as_deref(), Some("event_wh5"));
    assert_eq!(event_id("tr_success-wh-2"), None, "a classic form has none");
    let ids: std::collections::BTreeSet<&str> = produced
        .iter()
        .map(|(v, _)| v["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), produced.len(), "request ids repeat: {ids:?}");
    assert!(!ids.iter().any(|id| id.contains("event_wh")), "{ids:?}");

    // Each accepted webhook became one checked event; the payment Mollie does not
    // know published nothing (a forged id cannot put events on the topic).
    let outputs = read_outputs_settled(
        &brokers,
        &t,
        5,
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
    .await;
    let mut events: Vec<(String, String)> = outputs
        .iter()
        .map(|r| {
            assert_eq!(
                r.topic,
                t.output,
                "a dead letter: {:?}",
                r.header("paysync-error-code")
            );
            let e = paysync::codec::avro::decode_event_json(r.value.as_deref().unwrap()).unwrap();
            (
                e["connector_transaction_id"].as_str().unwrap().to_owned(),
                e["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    events.sort();
    let want: Vec<(String, String)> = [
        "success-wh-1",
        "tr_success-wh-2",
        "tr_success-wh-4",
        "tr_success-wh-5",
        "tr_success-wh-6",
    ]
    .iter()
    .map(|tx| (tx.to_string(), "CHARGED".to_owned()))
    .collect();
    assert_eq!(events, want);

    let metrics = process.metrics().await;
    let outcome =
        |o: &str| sum_metric(&metrics, "paysync_webhooks_total", &[("outcome", o)]) as u64;
    assert_eq!(outcome("accepted"), 6);
    assert_eq!(
        outcome("unsigned"),
        2,
        "a classic form, an event without its header"
    );
    assert_eq!(outcome("duplicate"), 1);
    assert_eq!(outcome("malformed"), 4);
    assert_eq!(outcome("bad_signature"), 1);
    assert_eq!(outcome("ignored"), 2);
    assert_eq!(outcome("not_found"), 6);
    assert_eq!(outcome("too_large"), 1);
    assert_eq!(
        sum_metric(&metrics, "paysync_webhook_checks_not_found_total", &[]),
        1.0
    );
    assert!(
        sum_metric(
            &metrics,
            "paysync_webhook_duration_seconds_count",
            &[("connector", "mollie")]
        ) >= 1.0
    );
    // The secrets never reach the log.
    let log = process.log();
    assert!(
        !log.contains(SECRET) && !log.contains(PATH_TOKEN),
        "a secret in the log"
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_is_answered_503_while_the_broker_is_down_and_200_once_it_is_back() {
    // Fault injection needs the mock cluster.
    let broker = Broker::mock();
    let Intake {
        brokers,
        t,
        sim,
        listen,
        process,
    } = intake(&broker, "webhooks-down", 1, "ack_timeout = \"1s\"").await;
    let url = format!("http://{listen}/webhooks/mollie/default");
    const FORM: &str = "application/x-www-form-urlencoded";
    let mut input = InputReader::new(&brokers, &t);

    broker.mock_cluster().unwrap().broker_down().unwrap();
    let started = Instant::now();
    let answer = post(&url, FORM, &[], b"id=tr_success-down-1").await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(answer.retry_after.is_some(), "503 without Retry-After");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    broker.mock_cluster().unwrap().broker_up().unwrap();
    // The processor retries: once the broker is back, 200 with the request stored.
    let deadline = Instant::now() + Duration::from_secs(30);
    let accepted = loop {
        let answer = post(&url, FORM, &[], b"id=tr_success-down-1").await;
        if answer.status == 200 {
            break true;
        }
        assert_eq!(answer.status, 503, "{}", answer.body);
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(accepted, "no 200 after the broker came back");
    let records = input.read(1, Duration::from_secs(5)).await;
    assert!(
        !records.is_empty(),
        "answered 200 without the request in the topic"
    );
    // An unacknowledged attempt may still have landed: a copy is one more check
    // of the same payment (consumers deduplicate events on event_id), never
    // another payment.
    let more = input.read(usize::MAX, Duration::from_secs(2)).await;
    for r in records.iter().chain(&more) {
        assert_eq!(r.key.as_deref(), Some(&b"tr_success-down-1"[..]));
    }
    let metrics = process.metrics().await;
    assert!(
        sum_metric(
            &metrics,
            "paysync_webhooks_total",
            &[("outcome", "timeout")]
        ) + sum_metric(
            &metrics,
            "paysync_webhooks_total",
            &[("outcome", "unavailable")]
        ) >= 1.0
    );
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intake_limits_each_account_and_slow_clients() {
    let broker = Broker::new();
    let settings = "requests_per_second = 1\nburst = 2\n\
                    header_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"";
    let Intake {
        sim,
        listen,
        process,
        ..
    } = intake(&broker, "webhooks-limits", 1, settings).await;
    const FORM: &str = "application/x-www-form-urlencoded";

    // Five at once for one account: the burst of two passes, the rest are 503
    // with Retry-After (processors retry a 503); another account has a bucket
    // of its own.
    let url = format!("http://{listen}/webhooks/mollie/default");
    let bodies: Vec<Vec<u8>> = (0..5)
        .map(|i| format!("id=tr_success-rate-{i}").into_bytes())
        .collect();
    let answers = futures::future::join_all(bodies.iter().map(|b| post(&url, FORM, &[], b))).await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let throttled: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    assert_eq!(ok + throttled.len(), 5);
    assert!(
        (2..=3).contains(&ok),
        "{ok} accepted of 5 with a burst of 2 at 1/s"
    );
    assert!(throttled.iter().all(|a| a.retry_after.is_some()));
    let other = post(
        &format!("http://{listen}/webhooks/mollie/guarded/{PATH_TOKEN}"),
        FORM,
        &[],
        b"id=tr_success-rate-other",
    )
    .await;
    assert_eq!(other.status, 200, "{}", other.body);

    // A client that never finishes its head is cut off after header_read_timeout.
    let started = Instant::now();
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"POST /webhooks/mollie/default HTTP/1.1\r\nhost: x\r\n")
            .unwrap();
        let mut buf = Vec::new();
        // EOF (or a reset) once the server gives up on the head.
        let _ = s.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
    .await
    .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "connection held {waited:?}: {closed:?}"
    );

    // A body that stops halfway is 408 after body_read_timeout.
    tokio::time::sleep(Duration::from_millis(1100)).await; // the bucket refills
    let started = Instant::now();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            b"POST /webhooks/mollie/default HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 100\r\n\r\nid=tr_",
        )
        .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .unwrap();
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    let metrics = process.metrics().await;
    assert!(
        sum_metric(
            &metrics,
            "paysync_webhooks_total",
            &[("outcome", "throttled")]
        ) >= 2.0
    );
    assert_eq!(
        sum_metric(
            &metrics,
            "paysync_webhooks_total",
            &[("outcome", "slow_body")]
        ),
        1.0
    );
    sim.stop().await;
}

/// Stripe's signed events through the binary (the intake alone): a
/// PaymentIntent event and a refund become checks of their PaymentIntent (a
/// connected account's through that account), other types are ignored, the
/// other mode is 400, a wrong or stale signature 401; each counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_events_become_checks_of_their_payment_intent() {
    use paysync::connectors::stripe::signature_header;
    let broker = Broker::new();
    let Intake {
        brokers,
        t,
        sim,
        listen,
        process,
    } = intake_with(
        &broker,
        "stripe-webhooks",
        1,
        "",
        SimOptions::default(),
        &[("PAYSYNC_ROLE", "webhooks")],
    )
    .await;
    let mut input = InputReader::new(&brokers, &t);
    let url = format!("http://{listen}/webhooks/stripe/shop");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let event = |id: &str,
                 kind: &str,
                 object: serde_json::Value,
                 live: bool,
                 account: Option<&str>| {
        let mut e = serde_json::json!({"id": id, "object": "event", "type": kind, "livemode": live,
                                       "created": now, "data": {"object": object}});
        if let Some(a) = account {
            e["account"] = a.into();
        }
        e.to_string().into_bytes()
    };
    let send = |body: Vec<u8>, t: u64, secret: &'static str| {
        let url = url.clone();
        async move {
            let signature = signature_header(secret, t, &body);
            post(
                &url,
                "application/json",
                &[("stripe-signature", signature.as_str())],
                &body,
            )
            .await
        }
    };
    let pi = serde_json::json!({"id": "pi_webhook1", "object": "payment_intent"});
    let cases = [
        (
            event(
                "evt_1",
                "payment_intent.succeeded",
                pi.clone(),
                false,
                Some("acct_1Connected"),
            ),
            now,
            STRIPE_SECRET,
            200,
        ),
        (
            event(
                "evt_2",
                "charge.refunded",
                serde_json::json!({"id": "ch_1", "payment_intent": "pi_webhook2"}),
                false,
                None,
            ),
            now,
            STRIPE_SECRET,
            200,
        ),
        (
            event(
                "evt_3",
                "customer.created",
                serde_json::json!({"id": "cus_1"}),
                false,
                None,
            ),
            now,
            STRIPE_SECRET,
            200,
        ),
        (
            event("evt_4", "payment_intent.succeeded", pi.clone(), true, None),
            now,
            STRIPE_SECRET,
            400,
        ),
        (
            event("evt_5", "payment_intent.succeeded", pi.clone(), false, None),
            now,
            "whsec_a_guess",
            401,
        ),
        (
            event("evt_6", "payment_intent.succeeded", pi.clone(), false, None),
            now - 3600,
            STRIPE_SECRET,
            401,
        ),
    ];
    for (i, (body, t, secret, want)) in cases.into_iter().enumerate() {
        let answer = send(body, t, secret).await;
        assert_eq!(answer.status, want, "case {i}: {}", answer.body);
    }
    let records = input.read(2, Duration::from_secs(20)).await;
    assert_eq!(records.len(), 2);
    let by_key = |k: &str| {
        records
            .iter()
            .find(|r| r.key.as_deref() == Some(k.as_bytes()))
            .unwrap_or_else(|| panic!("{k} in Kafka"))
    };
    let first = by_key("pi_webhook1");
    let json: serde_json::Value = serde_json::from_slice(first.value.as_deref().unwrap()).unwrap();
    assert_eq!(json["connector"], "stripe");
    assert_eq!(json["merchant_id"], "shop");
    assert_eq!(json["connected_account"], "acct_1Connected");
    let event_id = first
        .headers
        .iter()
        .find(|(k, _)| k.as_slice() == b"x-webhook-event-id")
        .and_then(|(_, v)| v.clone());
    assert_eq!(event_id.as_deref(), Some(&b"evt_1"[..]));
    let second = by_key("pi_webhook2");
    let json: serde_json::Value = serde_json::from_slice(second.value.as_deref().unwrap()).unwrap();
    assert!(json.get("connected_account").is_none());
    let metrics = process.metrics().await;
    let outcome = |o: &str| {
        sum_metric(
            &metrics,
            "paysync_webhooks_total",
            &[("connector", "stripe"), ("outcome", o)],
        )
    };
    assert_eq!(outcome("accepted"), 2.0);
    assert_eq!(outcome("ignored"), 1.0);
    assert_eq!(outcome("wrong_mode"), 1.0);
    assert_eq!(outcome("bad_signature"), 2.0);
    sim.stop().await;
}
