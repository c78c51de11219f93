//! Never stop, never go silent: records other clients can write (header names
//! that are not UTF-8, null header values, values near the record limit), a check
//! that panics, events and dead letters the broker refuses, and what `/healthz`
//! and `/readyz` say meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use paysync::codec::avro::decode_event_json;
use paysync::connectors::cm::CmConnector;
use paysync::connectors::gateway::Gateway;
use paysync::connectors::token::system_clock;
use paysync::connectors::{AuthScheme, Connector, ErrorBody, HttpRequest, HttpResponse};
use paysync::demo::simulator::{Latency, SimOptions};
use paysync::domain::event::CheckFailure;
use paysync::domain::{PaymentStatus, StatusCheckRequest, StatusReport};
use paysync::kafka::tools::{committed_offsets, RawProducer, RawRecord};
use paysync::pipeline::process::record_size;
use paysync::telemetry::{sum_metric, Metrics};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(90);

fn header<'a>(r: &'a RawRecord, name: &str) -> Option<&'a [u8]> {
    r.headers
        .iter()
        .find(|(k, _)| k == name.as_bytes())
        .and_then(|(_, v)| v.as_deref())
}

async fn get(addr: std::net::SocketAddr, what: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}/{what}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Polls until `check` holds (or panics with `what` after `timeout`).
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn committed_to(broker: &Broker, t: &Topics, want: &[i64]) {
    let (b, g, i, n) = (
        broker.bootstrap().to_owned(),
        t.group.clone(),
        t.input.clone(),
        t.partitions,
    );
    eventually(WAIT, "committed offsets reach the end", || {
        let (b, g, i) = (b.clone(), g.clone(), i.clone());
        let want = want.to_vec();
        async move {
            tokio::task::spawn_blocking(move || committed_offsets(&b, &g, &i, n).unwrap())
                .await
                .unwrap()
                == want
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_other_clients_write_neither_panic_nor_freeze_a_partition() {
    // Issue a: a header name that is not UTF-8 panicked the consumer loop (rdkafka's
    // header reader unwraps `to_str`); nothing after it was processed or committed.
    let broker = Broker::new();
    let t = broker.topics("odd-headers", 1).await;
    let sim = simulator(SimOptions::default()).await;
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), ""))
        .await
        .unwrap();
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    let odd: Vec<(&[u8], Option<&[u8]>)> = vec![(b"\xff\xfe", Some(b"x")), (b"plain", None)];
    let dead_headers: Vec<(&[u8], Option<&[u8]>)> = vec![
        (b"\xff", None),
        (b"dup", Some(b"1")),
        (b"dup", Some(b"2")),
        (b"bin", Some(b"\x00\xff\x00")),
    ];
    type Headers<'a> = Vec<(&'a [u8], Option<&'a [u8]>)>;
    let sends: Vec<(&[u8], Headers)> = vec![
        (br#"{"connector_transaction_id":"success-odd-1"}"#, odd),
        (b"not json", dead_headers.clone()),
        (
            br#"{"connector_transaction_id":"success-odd-3"}"#,
            vec![(b"x-merchant-id", Some(b"\xff\xff"))],
        ),
        (br#"{"connector_transaction_id":"success-odd-4"}"#, vec![]),
    ];
    for (value, headers) in &sends {
        producer
            .send_raw(&t.input, Some(0), Some(b"k"), Some(value), headers)
            .await
            .unwrap();
    }
    let records = read_outputs(broker.bootstrap(), &t, 4, WAIT).await;
    assert_eq!(records.len(), 4);
    let events: Vec<_> = records.iter().filter(|r| r.topic == t.output).collect();
    let dead: Vec<_> = records.iter().filter(|r| r.topic == t.dlq).collect();
    assert_eq!(events.len(), 2);
    for e in &events {
        assert_eq!(
            decode_event_json(e.value.as_deref().unwrap()).unwrap()["status"],
            "CHARGED"
        );
    }
    assert_eq!(dead.len(), 2);
    let json = dead
        .iter()
        .find(|r| header(r, "paysync-error-code") == Some(b"invalid_json"))
        .unwrap();
    let originals: Vec<(Vec<u8>, Option<Vec<u8>>)> = dead_headers
        .iter()
        .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(
        &json.headers[..originals.len()],
        &originals[..],
        "original headers first, byte for byte, null values kept"
    );
    assert!(dead
        .iter()
        .any(|r| header(r, "paysync-error-code") == Some(b"invalid_header")));
    committed_to(&broker, &t, &[4]).await;
    assert_eq!(get(app.http_addr(), "healthz").await.0, 200);
    assert_eq!(get(app.http_addr(), "readyz").await.0, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_value_is_dead_lettered_cut_to_fit_and_the_partition_moves_on() {
    // Issue b: a value near the record limit was dead-lettered whole plus the
    // paysync-* headers, larger than the producer's message.max.bytes, and retried
    // forever; the partition's commits froze.
    let broker = Broker::new();
    let t = broker.topics("oversize", 1).await;
    let sim = simulator(SimOptions::default()).await;
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), ""))
        .await
        .unwrap();
    // The issue's record: a 1,000,000-byte value, written by a client whose record
    // limit is larger than paysync's.
    let producer =
        RawProducer::with(broker.bootstrap(), &[("message.max.bytes", "2000000")]).unwrap();
    let value = vec![b'x'; 1_000_000];
    let pad = vec![b'h'; 1000];
    let headers: Vec<(&[u8], Option<&[u8]>)> =
        (0..3).map(|_| (&b"pad"[..], Some(&pad[..]))).collect();
    producer
        .send_raw(&t.input, Some(0), Some(b"big"), Some(&value), &headers)
        .await
        .unwrap();
    producer
        .send(
            &t.input,
            Some(0),
            Some(b"after"),
            Some(br#"{"connector_transaction_id":"success-after-big"}"#),
            &[],
        )
        .await
        .unwrap();
    let records = read_outputs(broker.bootstrap(), &t, 2, WAIT).await;
    for r in &records {
        eprintln!(
            "REC {} {:?} {:?}",
            r.topic,
            r.key,
            r.headers.iter().map(|h| h.0.clone()).collect::<Vec<_>>()
        );
    }
    let dead = records
        .iter()
        .find(|r| r.topic == t.dlq)
        .expect("the dead letter");
    assert_eq!(header(dead, "paysync-error-code"), Some(&b"oversize"[..]));
    assert_eq!(header(dead, "paysync-value-truncated"), Some(&b"true"[..]));
    assert_eq!(header(dead, "paysync-original-size"), Some(&b"1000000"[..]));
    assert_eq!(header(dead, "pad"), Some(&pad[..]), "original headers kept");
    assert_eq!(header(dead, "paysync-source-offset"), Some(&b"0"[..]));
    let cut = dead.value.as_deref().unwrap();
    assert!(
        cut.len() < value.len() && cut.len() > 900_000,
        "{}",
        cut.len()
    );
    assert!(cut.iter().all(|b| *b == b'x'), "a prefix of the original");
    assert!(record_size(dead.key.as_deref(), Some(cut), &dead.headers) <= 1_000_000);
    assert!(records.iter().any(|r| r.topic == t.output));
    committed_to(&broker, &t, &[2]).await;
    app.stop().await;
}

/// CM.com's translator, except that parsing a transaction whose id starts with
/// `panic-` panics: a stand-in for a bug nobody knows about yet.
struct PanickyCm;

impl Connector for PanickyCm {
    fn name(&self) -> &'static str {
        "cm"
    }
    fn default_base_url(&self) -> &'static str {
        CmConnector.default_base_url()
    }
    fn auth(&self) -> &'static dyn AuthScheme {
        CmConnector.auth()
    }
    fn default_payment_method(&self) -> &'static str {
        CmConnector.default_payment_method()
    }
    fn status_request(
        &self,
        base_url: &url::Url,
        request: &StatusCheckRequest,
    ) -> Result<HttpRequest, paysync::codec::Rejection> {
        CmConnector.status_request(base_url, request)
    }
    fn parse_status(
        &self,
        request: &StatusCheckRequest,
        response: &HttpResponse,
    ) -> Result<StatusReport, CheckFailure> {
        if request
            .connector_transaction_id
            .as_str()
            .starts_with("panic-")
        {
            panic!("index out of bounds: the len is 0 but the index is 7");
        }
        CmConnector.parse_status(request, response)
    }
    fn parse_error(&self, body: &[u8]) -> ErrorBody {
        CmConnector.parse_error(body)
    }
    fn is_final(&self, status: PaymentStatus) -> bool {
        CmConnector.is_final(status)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_panics_is_dead_lettered_as_internal_error_and_the_partition_moves_on() {
    let broker = Broker::new();
    let t = broker.topics("panic", 1).await;
    let sim = simulator(SimOptions::default()).await;
    let s = settings(broker.bootstrap(), &t, &sim.base_url(), "");
    // paysync as `app::start` wires it, with the panicking translator as `cm`.
    let metrics = Arc::new(Metrics::new());
    let gateway = Gateway::new(
        Arc::new(PanickyCm),
        s.connectors["cm"].gateway.clone(),
        metrics.clone(),
        system_clock(),
    )
    .unwrap();
    let mut gateways = std::collections::HashMap::new();
    gateways.insert("cm".to_owned(), Arc::new(gateway));
    let app = paysync::app::start_with(s, metrics.clone(), gateways)
        .await
        .unwrap();

    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    for id in ["success-p-1", "panic-p-2", "success-p-3"] {
        let value = format!(r#"{{"connector_transaction_id":"{id}"}}"#);
        producer
            .send(
                &t.input,
                Some(0),
                Some(id.as_bytes()),
                Some(value.as_bytes()),
                &[("trace", b"t")],
            )
            .await
            .unwrap();
    }
    let records = read_outputs(broker.bootstrap(), &t, 3, WAIT).await;
    assert_eq!(records.len(), 3);
    let dead: Vec<_> = records.iter().filter(|r| r.topic == t.dlq).collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(dead[0], "paysync-error-code"),
        Some(&b"internal_error"[..])
    );
    let message = String::from_utf8_lossy(header(dead[0], "paysync-error-message").unwrap());
    assert!(message.contains("index out of bounds"), "{message}");
    assert_eq!(
        dead[0].value.as_deref(),
        Some(&br#"{"connector_transaction_id":"panic-p-2"}"#[..]),
        "the original bytes"
    );
    assert_eq!(header(dead[0], "trace"), Some(&b"t"[..]));
    committed_to(&broker, &t, &[3]).await;
    assert_eq!(
        sum_metric(&metrics.render(), "paysync_internal_errors_total", &[]),
        1.0
    );
    app.stop().await;
}

/// A CM.com mock whose `huge-*` transactions carry a `description_bytes`
/// description and whose `small-*` ones are ordinary.
async fn cm_with_a_huge_answer(description_bytes: usize, delay: Duration) -> MockServer {
    let cm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/authorization/oauth2/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"access_token": "t", "expires_in": 3600})),
        )
        .mount(&cm)
        .await;
    Mock::given(method("GET"))
        .and(path_regex("/transactions/huge-.*"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({
                    "status": "SUCCESS", "amount": 1200, "currency": "EUR",
                    "description": "d".repeat(description_bytes)
                }))
                .set_delay(delay),
        )
        .mount(&cm)
        .await;
    Mock::given(method("GET"))
        .and(path_regex("/transactions/small-.*"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            serde_json::json!({"status": "SUCCESS", "amount": 1200, "currency": "EUR"}),
        ))
        .mount(&cm)
        .await;
    cm
}

async fn send_ids(broker: &Broker, topic: &str, ids: &[&str]) {
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    for id in ids {
        let value = format!(r#"{{"connector_transaction_id":"{id}"}}"#);
        producer
            .send(
                topic,
                Some(0),
                Some(id.as_bytes()),
                Some(value.as_bytes()),
                &[],
            )
            .await
            .unwrap();
    }
}

fn raw_settings(broker: &Broker, t: &Topics, cm: &MockServer) -> paysync::config::Settings {
    let extra = "[events]\ninclude_raw_connector = true\n";
    let mut s = settings(broker.bootstrap(), t, &cm.uri(), extra);
    s.connectors
        .get_mut("cm")
        .unwrap()
        .gateway
        .max_response_bytes = 4 * 1024 * 1024;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_record_limit_is_published_without_its_raw_fields() {
    // With raw connector responses enabled, a 1.2 MB answer would make an event
    // larger than the producer's record limit: the raw fields are left off, and
    // the event says how many bytes they held.
    let broker = Broker::new();
    let t = broker.topics("raw-dropped", 1).await;
    let cm = cm_with_a_huge_answer(1_200_000, Duration::ZERO).await;
    let app = paysync::app::start(raw_settings(&broker, &t, &cm))
        .await
        .unwrap();
    send_ids(&broker, &t.input, &["huge-1", "small-2"]).await;
    let records = read_outputs(broker.bootstrap(), &t, 2, WAIT).await;
    assert!(
        records.iter().all(|r| r.topic == t.output),
        "both are events, none a dead letter"
    );
    let huge = records
        .iter()
        .find(|r| r.key.as_deref() == Some(&b"huge-1"[..]))
        .expect("the huge answer's event");
    assert!(huge.value.as_ref().unwrap().len() < 1_000_000);
    let dropped: usize =
        std::str::from_utf8(header(huge, "paysync-raw-connector-dropped").expect("the header"))
            .unwrap()
            .parse()
            .unwrap();
    assert!(dropped > 1_200_000, "{dropped} bytes dropped");
    let small = records
        .iter()
        .find(|r| r.key.as_deref() == Some(&b"small-2"[..]))
        .expect("the next request's event");
    assert_eq!(header(small, "paysync-raw-connector-dropped"), None);
    committed_to(&broker, &t, &[2]).await;
    let text = app.metrics().render();
    assert_eq!(
        sum_metric(
            &text,
            "paysync_raw_connector_dropped_total",
            &[("connector", "cm")]
        ),
        1.0
    );
    assert_eq!(sum_metric(&text, "paysync_dead_letters_total", &[]), 0.0);
    app.stop().await;
}

/// On Apache Kafka the events topic takes at most 8,000-byte records
/// (`max.message.bytes`, altered through the admin API), so the broker itself
/// refuses the event; on librdkafka's mock cluster the broker is told to
/// refuse the next produce request as too large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_broker_refuses_is_dead_lettered_as_publish_refused() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    // The event fits the producer's limit, and the broker refuses it as too
    // large (a topic whose max.message.bytes is lower): a permanent error, not
    // a retry loop.
    let broker = Broker::new();
    let t = broker.topics("refused-event", 1).await;
    if !broker.is_mock() {
        use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .create()
            .unwrap();
        let altered = admin
            .alter_configs(
                &[AlterConfig::new(ResourceSpecifier::Topic(&t.output))
                    .set("max.message.bytes", "8000")],
                &AdminOptions::new(),
            )
            .await
            .unwrap();
        assert!(altered.iter().all(Result::is_ok), "{altered:?}");
    }
    let cm = cm_with_a_huge_answer(20_000, Duration::from_secs(1)).await;
    let app = paysync::app::start(raw_settings(&broker, &t, &cm))
        .await
        .unwrap();
    // The answer takes a second: on the mock cluster the broker's refusal is
    // armed after the request is written and before its event is produced.
    send_ids(&broker, &t.input, &["huge-1"]).await;
    if let Some(mock) = broker.mock_cluster() {
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        );
    }
    let records = read_outputs(broker.bootstrap(), &t, 1, WAIT).await;
    let dead = records
        .iter()
        .find(|r| r.topic == t.dlq)
        .expect("dead letter");
    assert_eq!(
        header(dead, "paysync-error-code"),
        Some(&b"publish_refused"[..])
    );
    assert_eq!(
        dead.value.as_deref(),
        Some(&br#"{"connector_transaction_id":"huge-1"}"#[..])
    );
    send_ids(&broker, &t.input, &["small-2"]).await;
    let records = read_outputs(broker.bootstrap(), &t, 2, WAIT).await;
    assert!(
        records.iter().any(|r| r.topic == t.output),
        "the next request's event"
    );
    committed_to(&broker, &t, &[2]).await;
    let text = app.metrics().render();
    assert_eq!(
        sum_metric(
            &text,
            "paysync_publish_refusals_total",
            &[("topic", "events")]
        ),
        1.0
    );
    assert_eq!(
        sum_metric(
            &text,
            "paysync_dead_letters_total",
            &[("reason", "publish_refused")]
        ),
        1.0
    );
    app.stop().await;
}

/// Runs on librdkafka's mock cluster, whose broker can be told to refuse requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dead_letter_stalls_its_partition_loudly_until_the_cause_clears() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let broker = Broker::mock();
    let t = broker.topics("stall", 1).await;
    let sim = simulator(SimOptions::default()).await;
    RawProducer::new(broker.bootstrap())
        .unwrap()
        .send(&t.input, Some(0), Some(b"bad"), Some(b"not json"), &[])
        .await
        .unwrap();
    // The broker refuses the next three produce requests as not authorized: the
    // dead letter is refused, and accepted once the refusals stop.
    let mock = broker.mock_cluster().unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
    );
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), ""))
        .await
        .unwrap();
    let addr = app.http_addr();
    let metrics = app.metrics();
    eventually(WAIT, "the partition is reported stalled", || async {
        sum_metric(&metrics.render(), "paysync_stalled_partitions", &[]) == 1.0
    })
    .await;
    let (status, body) = get(addr, "readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("partition 0 is stalled"), "{body}");
    assert_eq!(get(addr, "healthz").await.0, 200, "stalled is not dead");
    // Nothing is committed past the refused dead letter.
    let (b, g, i) = (
        broker.bootstrap().to_owned(),
        t.group.clone(),
        t.input.clone(),
    );
    let committed = tokio::task::spawn_blocking(move || committed_offsets(&b, &g, &i, 1).unwrap())
        .await
        .unwrap();
    assert!(
        committed[0] <= 0,
        "committed {committed:?} past the stalled offset"
    );
    // The refusals stop (the ACL was granted): the partition resumes by itself.
    let records = read_outputs(broker.bootstrap(), &t, 1, WAIT).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].topic, t.dlq);
    committed_to(&broker, &t, &[1]).await;
    eventually(WAIT, "ready again", || async {
        get(addr, "readyz").await.0 == 200
    })
    .await;
    let text = metrics.render();
    assert_eq!(sum_metric(&text, "paysync_stalled_partitions", &[]), 0.0);
    assert!(
        sum_metric(
            &text,
            "paysync_publish_refusals_total",
            &[("topic", "dead_letters")]
        ) >= 1.0
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_when_the_consumer_loop_dies() {
    let broker = Broker::new();
    let t = broker.topics("health", 1).await;
    let sim = simulator(SimOptions::default()).await;
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), ""))
        .await
        .unwrap();
    let addr = app.http_addr();
    assert_eq!(get(addr, "healthz").await.0, 200);
    app.abort_consumer_loop();
    eventually(WAIT, "healthz fails", || async {
        get(addr, "healthz").await.0 == 503
    })
    .await;
    let (_, body) = get(addr, "healthz").await;
    assert!(
        body.contains(&format!("task `engine {}` ended: aborted", t.input)),
        "the body names the task: {body}"
    );
    assert_eq!(get(addr, "readyz").await.0, 503);
    // The supervisor stops the app with an error naming the task (`paysync
    // run` exits 1 with it).
    let metrics = app.metrics();
    let result = paysync::app::serve_until(app, std::future::pending()).await;
    assert_eq!(
        paysync::telemetry::sum_metric(&metrics.render(), "paysync_tasks_ended_total", &[]),
        1.0
    );
    let err = result.expect_err("a task ended");
    assert_eq!(err.exit_code(), 1);
    assert!(
        err.to_string().contains(&format!(
            "paysync stopped: task `engine {}` ended: aborted",
            t.input
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_a_commit_watermark_is_stuck() {
    let broker = Broker::new();
    let t = broker.topics("stuck", 1).await;
    let sim = simulator(SimOptions {
        latency: Latency::Fixed(Duration::from_secs(4)),
        ..Default::default()
    })
    .await;
    let mut s = settings(broker.bootstrap(), &t, &sim.base_url(), "");
    s.processing.stuck_after = Duration::from_secs(1);
    s.connectors.get_mut("cm").unwrap().gateway.request_timeout = Duration::from_secs(10);
    let app = paysync::app::start(s).await.unwrap();
    let addr = app.http_addr();
    eventually(WAIT, "ready", || async {
        get(addr, "readyz").await.0 == 200
    })
    .await;
    RawProducer::new(broker.bootstrap())
        .unwrap()
        .send(
            &t.input,
            Some(0),
            Some(b"slow"),
            Some(br#"{"connector_transaction_id":"success-slow"}"#),
            &[],
        )
        .await
        .unwrap();
    eventually(WAIT, "readyz reports the stuck watermark", || async {
        let (status, body) = get(addr, "readyz").await;
        status == 503 && body.contains("has not moved")
    })
    .await;
    // Scraped over HTTP, `paysync_ready` is what /readyz answers (the alert's input).
    let scraped = get(addr, "metrics").await.1;
    assert_eq!(
        sum_metric(&scraped, "paysync_ready", &[]),
        0.0,
        "not ready while stuck"
    );
    let metrics = app.metrics();
    eventually(WAIT, "the stuck-watermark gauge", || async {
        sum_metric(
            &metrics.render(),
            "paysync_commit_watermark_stuck_seconds",
            &[("partition", "0")],
        ) >= 1.0
    })
    .await;
    read_outputs(broker.bootstrap(), &t, 1, WAIT).await;
    eventually(WAIT, "ready once the answer came", || async {
        get(addr, "readyz").await.0 == 200
    })
    .await;
    let scraped = get(addr, "metrics").await.1;
    assert_eq!(sum_metric(&scraped, "paysync_ready", &[]), 1.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_settings_that_void_at_least_once_are_refused_at_start_up() {
    // Issue e: acks=0 or idempotence off were accepted silently.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("paysync.toml");
    std::fs::write(
        &config,
        "[connectors.cm.accounts.default]\nclient_id = \"a\"\nclient_secret = \"b\"\n",
    )
    .unwrap();
    for (var, value, key) in [
        (
            "PAYSYNC_KAFKA__PRODUCER__ACKS",
            "0",
            "kafka.producer.\"acks\"",
        ),
        (
            "PAYSYNC_KAFKA__PRODUCER__ACKS",
            "1",
            "kafka.producer.\"acks\"",
        ),
        ("PAYSYNC_KAFKA__COMMON__ACKS", "0", "kafka.common.\"acks\""),
        (
            "PAYSYNC_KAFKA__PRODUCER__ENABLE_IDEMPOTENCE",
            "false",
            "kafka.producer.\"enable.idempotence\"",
        ),
    ] {
        for command in ["check-config", "run"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_paysync"))
                .args([command, "--config"])
                .arg(&config)
                .env(var, value)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{command} {var}={value}: {stderr}"
            );
            assert!(stderr.contains(key), "{command}: {stderr}");
        }
    }
    // acks=all and -1 are fine.
    for value in ["all", "-1"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_paysync"))
            .args(["check-config", "--config"])
            .arg(&config)
            .env("PAYSYNC_KAFKA__PRODUCER__ACKS", value)
            .output()
            .unwrap();
        assert!(out.status.success(), "{value}");
    }
}
