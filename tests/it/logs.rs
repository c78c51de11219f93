//! Logs: one span per message with request id, connector, transaction id,
//! partition and offset; and no secret or token in any log line at any level.

use std::time::Duration;

use paysync::demo::simulator::{SimOptions, SIM_CLIENT_SECRET};
use paysync::kafka::tools::RawProducer;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_carry_message_spans_and_never_secrets() {
    let broker = Broker::new();
    let t = broker.topics("logs", 1).await;
    let sim = simulator(SimOptions::default()).await;
    let extra = "[kafka.common]\n\"sasl.password\" = \"kafka-pw-never-logged\"\n";
    let process = Process::spawn_full(
        broker.bootstrap(),
        &t,
        &sim.base_url(),
        extra,
        &[
            ("PAYSYNC_LOG__LEVEL", "trace"),
            ("PAYSYNC_EVENTS__INCLUDE_METADATA", "false"),
        ],
    );
    process.wait_ready(Duration::from_secs(90)).await;
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    for (key, value) in [
        (
            "a",
            r#"{"connector_transaction_id":"success-log-1","request_id":"req-log-1","metadata":"meta-secret-xyz"}"#,
        ),
        ("b", r#"{"connector_transaction_id":"notfound-log-2"}"#),
        ("c", "not json"),
    ] {
        producer
            .send(
                &t.input,
                None,
                Some(key.as_bytes()),
                Some(value.as_bytes()),
                &[],
            )
            .await
            .unwrap();
    }
    let records = read_outputs(broker.bootstrap(), &t, 3, Duration::from_secs(60)).await;
    assert_eq!(records.len(), 3);
    let log = process.log();
    assert!(log.lines().count() > 20, "trace logging produced output");
    for secret in [
        SIM_CLIENT_SECRET,
        "kafka-pw-never-logged",
        "sim-token-",
        "meta-secret-xyz",
        "Bearer ",
    ] {
        let hit = log.lines().find(|l| l.contains(secret));
        assert!(
            hit.is_none(),
            "`{secret}` appears in the log: {}",
            hit.unwrap_or_default()
        );
    }
    // Every line is JSON; the processed message carries its span fields.
    let mut processed = None;
    for line in log.lines() {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if json["message"] == "processed" && json["span"]["transaction_id"] == "success-log-1" {
            processed = Some(json);
        }
    }
    let processed = processed.expect("a `processed` line for success-log-1");
    let span = &processed["span"];
    assert_eq!(span["request_id"], "req-log-1");
    assert_eq!(span["connector"], "cm");
    assert_eq!(span["partition"], 0);
    assert!(span["offset"].is_number());
}

/// At `warn`, the level an operator picks to quiet a busy instance, a failed check
/// still says which request it was: the per-message span is enabled at every
/// level, not only at `info`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_carry_the_message_span_at_warn_level() {
    let broker = Broker::new();
    let t = broker.topics("logs-warn", 1).await;
    let sim = simulator(SimOptions::default()).await;
    let process = Process::spawn_full(
        broker.bootstrap(),
        &t,
        &sim.base_url(),
        "",
        &[("PAYSYNC_LOG__LEVEL", "warn")],
    );
    process.wait_ready(Duration::from_secs(90)).await;
    send_request(
        broker.bootstrap(),
        &t.input,
        "w",
        r#"{"connector_transaction_id":"notfound-warn-1","request_id":"req-warn-1"}"#,
    )
    .await;
    read_outputs(broker.bootstrap(), &t, 1, Duration::from_secs(60)).await;
    let log = process.log();
    let failed = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|j| j["level"] == "WARN" && j["span"]["transaction_id"] == "notfound-warn-1")
        .unwrap_or_else(|| panic!("no WARN line with the request's span:\n{log}"));
    assert_eq!(failed["span"]["request_id"], "req-warn-1");
    assert!(failed["span"]["offset"].is_number());
    assert!(
        !log.contains("\"level\":\"INFO\""),
        "nothing below warn is logged:\n{log}"
    );
}
