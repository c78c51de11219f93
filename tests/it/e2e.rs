//! End to end: the real app (in-process via `app::start`, or the binary) against a
//! Kafka-protocol broker and the CM.com simulator, checked by an independent reader
//! that decodes events with the schema file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use apache_avro::Schema;
use paysync::demo::simulator::{Latency, SimOptions};
use paysync::domain::event::event_id;
use paysync::kafka::tools::{committed_offsets, RawProducer, RawRecord};
use paysync::telemetry::sum_metric;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(90);

/// Decodes an event with the schema *file* (not the embedded copy), checking the
/// single-object header by hand.
fn decode_with_schema_file(bytes: &[u8]) -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/payment_status_event.avsc"
    ))
    .unwrap();
    let schema = Schema::parse_str(&text).unwrap();
    assert_eq!(&bytes[..2], &[0xC3, 0x01], "single-object marker");
    assert_eq!(
        &bytes[2..10],
        &independent_event_fingerprint()[..],
        "fingerprint fastavro and Java compute from the schema file"
    );
    let value = apache_avro::from_avro_datum(&schema, &mut &bytes[10..], None).unwrap();
    paysync::codec::avro::avro_to_json(value).unwrap()
}

/// The event schema's fingerprint in wire order, as fastavro and Java's
/// `SchemaNormalization` computed it (tests/fixtures/avro/vectors.json).
fn independent_event_fingerprint() -> Vec<u8> {
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/avro/vectors.json")).unwrap();
    let wire = vectors["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["file"] == "schemas/payment_status_event.avsc")
        .unwrap()["wire"]
        .as_str()
        .unwrap()
        .to_owned();
    (0..8)
        .map(|i| u8::from_str_radix(&wire[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

struct Input {
    value: String,
    headers: Vec<(&'static str, &'static str)>,
    key: String,
    /// Expected: Ok(status[, failure code]) or Err(dead-letter reason).
    expect: Result<(&'static str, Option<&'static str>), &'static str>,
}

fn inputs() -> Vec<Input> {
    let ok = |id: &str, extra: &str, status: &'static str, code: Option<&'static str>| Input {
        value: format!(r#"{{"connector_transaction_id":"{id}"{extra}}}"#),
        headers: vec![],
        key: id.to_owned(),
        expect: Ok((status, code)),
    };
    let bad = |value: &str, reason: &'static str| Input {
        value: value.to_owned(),
        headers: vec![("trace-id", "t-123")],
        key: format!("bad-{reason}"),
        expect: Err(reason),
    };
    vec![
        ok(
            "open-3ds-1",
            r#","payment_method_type":"GOOGLE_PAY""#,
            "AUTHENTICATION_PENDING",
            None,
        ),
        ok(
            "open-2",
            r#","payment_method_type":"APPLE_PAY""#,
            "STARTED",
            None,
        ),
        ok(
            "authorized-3",
            r#","payment_method_type":"CARD""#,
            "AUTHORIZED",
            None,
        ),
        ok(
            "success-4",
            r#","payment_method_type":"IDEAL","amount":{"minor_amount":1200,"currency":"EUR"}"#,
            "CHARGED",
            None,
        ),
        ok(
            "cancelled-5",
            r#","payment_method_type":"BANCONTACT_CARD""#,
            "VOIDED",
            None,
        ),
        ok(
            "expired-6",
            r#","payment_method_type":"CHECKOUT""#,
            "EXPIRED",
            None,
        ),
        ok("failure-7", "", "FAILURE", None),
        ok("unknown-8", "", "UNRESOLVED", None),
        ok("flaky-9", "", "CHARGED", None),
        ok(
            "notfound-10",
            "",
            "PAYMENT_STATUS_UNSPECIFIED",
            Some("TRANSACTION_NOT_FOUND"),
        ),
        ok(
            "malformed-11",
            "",
            "PAYMENT_STATUS_UNSPECIFIED",
            Some("RESPONSE_DESERIALIZATION_FAILED"),
        ),
        ok(
            "success-12",
            r#","amount":{"minor_amount":1,"currency":"EUR"}"#,
            "PAYMENT_STATUS_UNSPECIFIED",
            Some("INTEGRITY_CHECK_FAILED"),
        ),
        Input {
            value: r#"{"connector_transaction_id":"success-13"}"#.into(),
            headers: vec![("x-request-id", "hdr-req-13"), ("x-merchant-id", "default")],
            key: "success-13".into(),
            expect: Ok(("CHARGED", None)),
        },
        bad("not json at all", "invalid_json"),
        bad(r#"{"merchant_id":"default"}"#, "missing_transaction_id"),
        bad(
            r#"{"connector_transaction_id":"../x"}"#,
            "invalid_transaction_id",
        ),
        bad(
            r#"{"connector_transaction_id":"a/b"}"#,
            "invalid_transaction_id",
        ),
        bad(
            r#"{"connector_transaction_id":"x","connector":"adyen"}"#,
            "unknown_connector",
        ),
        bad(
            r#"{"connector_transaction_id":"x","merchant_id":"ghost"}"#,
            "unknown_merchant",
        ),
        bad(
            r#"{"connector_transaction_id":"x","payment_method_type":"PAYPAL"}"#,
            "unsupported_payment_method",
        ),
        bad(
            r#"{"connector_transaction_id":"x","test_mode":"yes"}"#,
            "invalid_field",
        ),
        bad(
            &format!(
                r#"{{"connector_transaction_id":"x","pad":"{}"}}"#,
                "p".repeat(70_000)
            ),
            "oversize",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mapping_and_rejection_arrives_once_with_matching_metrics() {
    let broker = Broker::new();
    let t = broker.topics("mapping", 3).await;
    let sim = simulator(SimOptions::default()).await;
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), ""))
        .await
        .unwrap();

    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    let inputs = inputs();
    // source position -> input index
    let mut by_position: HashMap<(i32, i64), usize> = HashMap::new();
    for (i, input) in inputs.iter().enumerate() {
        let headers: Vec<(&str, &[u8])> = input
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_bytes()))
            .collect();
        let pos = producer
            .send(
                &t.input,
                None,
                Some(input.key.as_bytes()),
                Some(input.value.as_bytes()),
                &headers,
            )
            .await
            .unwrap();
        by_position.insert(pos, i);
    }

    let records = read_outputs_settled(
        broker.bootstrap(),
        &t,
        inputs.len(),
        WAIT,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(records.len(), inputs.len(), "one record per input, no more");

    let mut seen_positions = HashSet::new();
    let mut synced = 0;
    let mut failed = 0;
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        if r.topic == t.output {
            let json = decode_with_schema_file(r.value.as_deref().unwrap());
            let id = json["connector_transaction_id"]
                .as_str()
                .unwrap()
                .to_owned();
            assert_eq!(
                r.key.as_deref(),
                Some(id.as_bytes()),
                "keyed by transaction id"
            );
            assert_eq!(
                r.header("content-type").as_deref(),
                Some("application/avro")
            );
            assert_eq!(r.header("x-connector").as_deref(), Some("cm"));
            assert_eq!(r.header("x-merchant-id").as_deref(), Some("default"));
            assert_eq!(
                r.header("x-request-id").as_deref(),
                json["request_id"].as_str()
            );
            // Find the input by its event id (deterministic from the source position).
            let (pos, idx) = by_position
                .iter()
                .find(|((p, o), _)| {
                    event_id(&t.input, *p, *o) == json["event_id"].as_str().unwrap()
                })
                .map(|(pos, idx)| (*pos, *idx))
                .unwrap_or_else(|| panic!("event {json} matches no input"));
            assert!(seen_positions.insert(pos), "two records for one input");
            let input = &inputs[idx];
            let (status, code) = input.expect.expect("an event for a valid request");
            assert_eq!(json["status"], status, "{}", input.value);
            assert_eq!(
                json["error"]["unified_details"]["code"].as_str(),
                code,
                "{}",
                input.value
            );
            if status == "FAILURE" {
                assert_eq!(json["error"]["connector_details"]["code"], "FAILURE");
            }
            if status == "AUTHENTICATION_PENDING" {
                assert!(json["redirection_data"]["uri"]
                    .as_str()
                    .unwrap()
                    .starts_with("https://3ds.example/"));
            }
            if status == "CHARGED" {
                assert_eq!(json["captured_amount"], 1200);
            }
            if id == "success-13" {
                assert_eq!(json["request_id"], "hdr-req-13");
            } else if id != "success-13" && !input.value.contains("request_id") {
                assert_eq!(
                    json["request_id"],
                    format!("{}:{}:{}", t.input, pos.0, pos.1)
                );
            }
            if id.starts_with("flaky-") {
                assert_eq!(json["attempts"], 2, "the 500 was retried");
            }
            if code.is_some() {
                failed += 1;
            } else {
                synced += 1;
            }
            *statuses.entry(status.to_owned()).or_default() += 1;
        } else {
            assert_eq!(r.topic, t.dlq);
            let partition: i32 = r
                .header("paysync-source-partition")
                .unwrap()
                .parse()
                .unwrap();
            let offset: i64 = r.header("paysync-source-offset").unwrap().parse().unwrap();
            let idx = by_position[&(partition, offset)];
            assert!(
                seen_positions.insert((partition, offset)),
                "two records for one input"
            );
            let input = &inputs[idx];
            let reason = input
                .expect
                .expect_err("a dead letter for an invalid request");
            assert_eq!(
                r.header("paysync-error-code").as_deref(),
                Some(reason),
                "{}",
                &input.value[..input.value.len().min(80)]
            );
            assert!(!r.header("paysync-error-message").unwrap().is_empty());
            assert_eq!(
                r.header("paysync-source-topic").as_deref(),
                Some(t.input.as_str())
            );
            let failed_at = r.header("paysync-failed-at").unwrap();
            assert!(time::OffsetDateTime::parse(
                &failed_at,
                &time::format_description::well_known::Rfc3339
            )
            .is_ok());
            assert_eq!(r.key.as_deref(), Some(input.key.as_bytes()), "original key");
            assert_eq!(
                r.value.as_deref(),
                Some(input.value.as_bytes()),
                "original value, byte for byte"
            );
            assert_eq!(
                r.header("trace-id").as_deref(),
                Some("t-123"),
                "original headers kept"
            );
            *reasons.entry(reason.to_owned()).or_default() += 1;
        }
    }
    assert_eq!(
        seen_positions.len(),
        inputs.len(),
        "every input offset yielded a record"
    );

    // Metrics: scraped over HTTP, parse, and count what was processed.
    let text = reqwest::get(format!("http://{}/metrics", app.http_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_prometheus_text(&text);
    assert_eq!(
        sum_metric(&text, "paysync_requests_total", &[("outcome", "synced")]) as usize,
        synced
    );
    assert_eq!(
        sum_metric(
            &text,
            "paysync_requests_total",
            &[("outcome", "connector_error")]
        ) as usize,
        failed
    );
    assert_eq!(
        sum_metric(&text, "paysync_requests_total", &[("outcome", "invalid")]) as usize,
        reasons.values().sum::<usize>()
    );
    for (status, n) in &statuses {
        assert_eq!(
            sum_metric(
                &text,
                "paysync_events_published_total",
                &[("status", status)]
            ) as usize,
            *n,
            "{status}"
        );
    }
    for (reason, n) in &reasons {
        assert_eq!(
            sum_metric(&text, "paysync_dead_letters_total", &[("reason", reason)]) as usize,
            *n,
            "{reason}"
        );
    }
    assert_eq!(
        sum_metric(
            &text,
            "paysync_connector_retries_total",
            &[("reason", "5xx")]
        ) as u64,
        1
    );
    assert_eq!(
        sum_metric(&text, "paysync_token_refreshes_total", &[]) as u64,
        1
    );
    assert_eq!(
        sum_metric(&text, "paysync_processing_duration_seconds_count", &[]) as usize,
        inputs.len()
    );
    assert_eq!(sum_metric(&text, "paysync_in_flight", &[]) as u64, 0);
    let status_calls = sum_metric(&text, "paysync_connector_requests_total", &[]) as u64 - 1;
    assert_eq!(status_calls, sim.status_requests());
    app.stop().await;
}

fn bulk_inputs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!(r#"{{"connector_transaction_id":"success-bulk-{i}"}}"#))
        .collect()
}

async fn produce_all(brokers: &str, topic: &str, values: &[String]) -> HashSet<(i32, i64)> {
    let producer = RawProducer::new(brokers).unwrap();
    let mut positions = HashSet::new();
    for (i, v) in values.iter().enumerate() {
        let key = format!("k{i}");
        positions.insert(
            producer
                .send(topic, None, Some(key.as_bytes()), Some(v.as_bytes()), &[])
                .await
                .unwrap(),
        );
    }
    positions
}

/// One past the highest produced offset of each partition.
fn end_offsets(positions: &HashSet<(i32, i64)>, partitions: i32) -> Vec<i64> {
    let mut ends = vec![0i64; partitions as usize];
    for (p, o) in positions {
        ends[*p as usize] = ends[*p as usize].max(o + 1);
    }
    ends
}

/// (partition, offset) of the input an event came from, via its request_id default.
fn source_of(r: &RawRecord, input_topic: &str) -> ((i32, i64), String) {
    let json = decode_with_schema_file(r.value.as_deref().unwrap());
    let request_id = json["request_id"].as_str().unwrap();
    let rest = request_id.strip_prefix(&format!("{input_topic}:")).unwrap();
    let (p, o) = rest.split_once(':').unwrap();
    (
        (p.parse().unwrap(), o.parse().unwrap()),
        json["event_id"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_stream_loses_nothing_and_repeats_only_uncommitted_work() {
    let broker = Broker::new();
    let t = broker.topics("kill", 2).await;
    let sim = simulator(SimOptions {
        latency: Latency::Fixed(Duration::from_millis(20)),
        ..Default::default()
    })
    .await;
    let n = 300;
    let positions = produce_all(broker.bootstrap(), &t.input, &bulk_inputs(n)).await;
    // A small in-flight bound so the kill lands mid-stream, and a commit interval
    // longer than the test so that work done before the kill is uncommitted.
    let mut first = Process::spawn_env(
        broker.bootstrap(),
        &t,
        &sim.base_url(),
        &[
            ("PAYSYNC_PROCESSING__MAX_IN_FLIGHT", "4"),
            ("PAYSYNC_KAFKA__COMMIT_INTERVAL", "10m"),
        ],
    );
    first.wait_ready(WAIT).await;
    // Let it get part of the way, then kill it without warning.
    let partial = read_outputs(broker.bootstrap(), &t, n / 3, WAIT).await;
    assert!(partial.len() >= n / 3);
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    let committed =
        committed_offsets(broker.bootstrap(), &t.group, &t.input, t.partitions).unwrap();
    let before = read_outputs_settled(
        broker.bootstrap(),
        &t,
        usize::MAX,
        Duration::from_millis(1),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        before.len() < n,
        "killed before finishing ({} of {n})",
        before.len()
    );

    let second = Process::spawn(broker.bootstrap(), &t, &sim.base_url(), "");
    second.wait_ready(WAIT).await;
    let all = read_outputs_settled(broker.bootstrap(), &t, n, WAIT, Duration::from_secs(3)).await;

    let mut ids: HashMap<(i32, i64), HashSet<String>> = HashMap::new();
    let mut count: HashMap<(i32, i64), usize> = HashMap::new();
    for r in &all {
        let (pos, id) = source_of(r, &t.input);
        ids.entry(pos).or_default().insert(id);
        *count.entry(pos).or_default() += 1;
    }
    let covered: HashSet<_> = count.keys().copied().collect();
    assert_eq!(
        covered, positions,
        "every input offset has an event: nothing lost"
    );
    for (pos, set) in &ids {
        assert_eq!(
            set.len(),
            1,
            "a repeated request has the same event_id ({pos:?})"
        );
    }
    // The restarted member starts at the committed offsets: exactly the work that
    // was published but not committed before the kill is repeated, nothing else.
    let published_before: HashSet<(i32, i64)> =
        before.iter().map(|r| source_of(r, &t.input).0).collect();
    let expected_repeats: HashSet<(i32, i64)> = published_before
        .iter()
        .copied()
        .filter(|(p, o)| *o >= committed[*p as usize])
        .collect();
    let repeats: HashSet<(i32, i64)> = count
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(pos, _)| *pos)
        .collect();
    assert_eq!(
        repeats, expected_repeats,
        "repeated work is exactly the uncommitted work"
    );
    assert!(count.values().all(|c| *c <= 2));
    assert!(
        !repeats.is_empty(),
        "the kill left uncommitted work to redo (committed at kill: {committed:?})"
    );
    let repeated = repeats.len();
    eprintln!("kill test: {} events before the kill, {repeated} repeated after restart, committed at kill {committed:?}", before.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_a_restart_repeats_nothing() {
    let broker = Broker::new();
    let t = broker.topics("term", 2).await;
    let sim = simulator(SimOptions::default()).await;
    let n = 100;
    let positions = produce_all(broker.bootstrap(), &t.input, &bulk_inputs(n)).await;
    let mut first = Process::spawn(broker.bootstrap(), &t, &sim.base_url(), "");
    first.wait_ready(WAIT).await;
    let outputs = read_outputs(broker.bootstrap(), &t, n, WAIT).await;
    assert_eq!(outputs.len(), n);
    let metrics = first.metrics().await;
    assert_prometheus_text(&metrics);
    assert_eq!(
        sum_metric(&metrics, "paysync_requests_total", &[("outcome", "synced")]) as usize,
        n
    );

    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exits 0; log:\n{}",
        first.log()
    );
    let committed =
        committed_offsets(broker.bootstrap(), &t.group, &t.input, t.partitions).unwrap();
    let ends = end_offsets(&positions, t.partitions);
    assert_eq!(committed, ends, "everything committed on shutdown");

    let second = Process::spawn(broker.bootstrap(), &t, &sim.base_url(), "");
    second.wait_ready(WAIT).await;
    let marker = RawProducer::new(broker.bootstrap()).unwrap();
    marker
        .send(
            &t.input,
            None,
            Some(b"marker"),
            Some(br#"{"connector_transaction_id":"success-marker"}"#),
            &[],
        )
        .await
        .unwrap();
    let all =
        read_outputs_settled(broker.bootstrap(), &t, n + 1, WAIT, Duration::from_secs(3)).await;
    assert_eq!(
        all.len(),
        n + 1,
        "only the new request was processed after the restart"
    );
}

/// Fault injection (mock cluster): the broker goes away while events are being
/// published, longer than the producer's own delivery timeout. paysync retries the
/// publish, does not commit what was not acknowledged, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_briefly_unreachable_broker_is_waited_out() {
    let broker = Broker::mock();
    let t = broker.topics("outage", 2).await;
    let sim = simulator(SimOptions {
        latency: Latency::Fixed(Duration::from_millis(20)),
        ..Default::default()
    })
    .await;
    let n = 200;
    let positions = produce_all(broker.bootstrap(), &t.input, &bulk_inputs(n)).await;
    let extra = "[kafka.producer]\n\"message.timeout.ms\" = \"1000\"\n";
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), extra))
        .await
        .unwrap();
    let metrics = app.metrics();
    let deadline = std::time::Instant::now() + WAIT;
    while sum_metric(&metrics.render(), "paysync_requests_total", &[]) < 20.0 {
        assert!(std::time::Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mock = broker.mock_cluster().unwrap();
    mock.broker_down().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    mock.broker_up().unwrap();
    let all = read_outputs_settled(broker.bootstrap(), &t, n, WAIT, Duration::from_secs(2)).await;
    let mut ids: HashMap<(i32, i64), HashSet<String>> = HashMap::new();
    for r in &all {
        let (position, event_id) = source_of(r, &t.input);
        ids.entry(position).or_default().insert(event_id);
    }
    let covered: HashSet<(i32, i64)> = ids.keys().copied().collect();
    assert_eq!(
        covered, positions,
        "every request has an event after the outage"
    );
    // At least once: when the outage (plus the client's reconnect backoff) outlasts
    // the session timeout, the coordinator expels the member, and the partitions'
    // next owner (this member, after rejoining) redoes the uncommitted work. A
    // repeat carries the same event_id.
    assert!(
        ids.values().all(|ids| ids.len() == 1),
        "repeats carry the same event_id"
    );
    let text = metrics.render();
    assert!(
        sum_metric(&text, "paysync_publish_retries_total", &[]) > 0.0,
        "publishes failed and were retried"
    );
    assert!(
        sum_metric(&text, "paysync_requests_total", &[]) as usize >= n,
        "every request finished at least once"
    );
    app.stop().await;
    // Commits never pass unprocessed work. They need not reach the end: when the
    // outage (plus the client's reconnect backoff) outlasts the session timeout, the
    // coordinator expels the member and refuses its final commit with
    // UNKNOWN_MEMBER_ID (seen in about half of the runs on the mock cluster), so a
    // restart repeats the work since the last commit that landed (at least once).
    let committed =
        committed_offsets(broker.bootstrap(), &t.group, &t.input, t.partitions).unwrap();
    let ends = end_offsets(&positions, t.partitions);
    for (c, e) in committed.iter().zip(&ends) {
        assert!(*c <= *e, "committed {committed:?} past the ends {ends:?}");
    }
}
