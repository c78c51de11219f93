//! `processing.guarantee = "exactly_once"` end to end: each input answered once
//! (one event or one dead letter) for a `read_committed` reader, through a
//! kill -9, a rebalance and a killed redrive; a broker without transactions
//! stops start-up; settings that break it are refused.
//!
//! The tests that kill a process need Apache Kafka (the mock cluster shows
//! `read_committed` readers the records of aborted transactions): they are
//! `#[ignore]`d for a plain `cargo test` and CI runs them against Kafka with
//! `--ignored`.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use paysync::config::Guarantee;
use paysync::demo::simulator::{Latency, SimOptions};
use paysync::kafka::tools::{committed_offsets, RawProducer, RawRecord, TopicReader};
use paysync::telemetry::sum_metric;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(120);
const EXACTLY_ONCE: &[(&str, &str)] = &[("PAYSYNC_PROCESSING__GUARANTEE", "exactly_once")];

/// The input record an output answers: an event's default request id, or a
/// dead letter's source headers.
fn answers(r: &RawRecord, input: &str) -> (i32, i64) {
    if let Some(offset) = r.header("paysync-source-offset") {
        let p = r.header("paysync-source-partition").unwrap();
        return (p.parse().unwrap(), offset.parse().unwrap());
    }
    let id = r.header("x-request-id").unwrap();
    let rest = id
        .strip_prefix(&format!("{input}:"))
        .unwrap_or_else(|| panic!("request id {id}"));
    let (p, o) = rest.split_once(':').unwrap();
    (p.parse().unwrap(), o.parse().unwrap())
}

/// How often each input was answered, by a read_committed reader (librdkafka's
/// default isolation level).
fn answered(records: &[RawRecord], input: &str) -> HashMap<(i32, i64), usize> {
    let mut count = HashMap::new();
    for r in records {
        *count.entry(answers(r, input)).or_default() += 1;
    }
    count
}

/// `n` requests for payments that succeed, with an invalid one every tenth.
async fn load(brokers: &str, topic: &str, n: usize) -> Vec<(i32, i64)> {
    let producer = RawProducer::new(brokers).unwrap();
    let mut positions = Vec::with_capacity(n);
    for i in 0..n {
        let value = if i % 10 == 9 {
            "not json".to_owned()
        } else {
            format!(r#"{{"connector_transaction_id":"success-eos-{i}"}}"#)
        };
        for _ in 0..100 {
            if producer
                .enqueue_raw(
                    topic,
                    None,
                    Some(format!("k{i}").as_bytes()),
                    Some(value.as_bytes()),
                    &[],
                )
                .is_ok()
            {
                break;
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let mut reader = TopicReader::new(brokers, &[(topic, 4)]).unwrap();
    for r in reader.read(n, WAIT) {
        positions.push((r.partition, r.offset));
    }
    positions
}

fn assert_each_once(count: &HashMap<(i32, i64), usize>, inputs: &[(i32, i64)], what: &str) {
    let missing: Vec<_> = inputs.iter().filter(|p| !count.contains_key(p)).collect();
    let repeated: Vec<_> = count.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        missing.is_empty() && repeated.is_empty(),
        "{what}: {} inputs, {} missing (first {:?}), {} answered more than once (first {:?})",
        inputs.len(),
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        repeated.len(),
        repeated.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(count.len(), inputs.len(), "{what}: nothing else answered");
}

/// Runs on any broker (no aborts): every input answered once, the outputs and
/// the input positions committed by transactions, the follow guards off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_answers_each_input_once_and_commits_positions_in_transactions() {
    let broker = Broker::new();
    let t = broker.topics("eos", 4).await;
    let sim = simulator(SimOptions::default()).await;
    let inputs = load(broker.bootstrap(), &t.input, 400).await;
    let mut s = settings(broker.bootstrap(), &t, &sim.base_url(), "");
    s.processing.guarantee = Guarantee::ExactlyOnce;
    s.kafka.instance_id = "eos-a".into();
    let app = paysync::app::start(s).await.unwrap();
    let out = read_outputs_settled(broker.bootstrap(), &t, 400, WAIT, Duration::from_secs(2)).await;
    assert_each_once(&answered(&out, &t.input), &inputs, "one member, no faults");
    let metrics = reqwest::get(format!("http://{}/metrics", app.http_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        sum_metric(
            &metrics,
            "paysync_transactions_total",
            &[("outcome", "committed")]
        ) >= 1.0
    );
    assert_eq!(
        sum_metric(
            &metrics,
            "paysync_transactions_total",
            &[("outcome", "aborted")]
        ),
        0.0
    );
    assert_eq!(
        sum_metric(&metrics, "paysync_events_published_total", &[]),
        360.0
    );
    assert_eq!(
        sum_metric(&metrics, "paysync_dead_letters_total", &[]),
        40.0
    );
    app.stop().await;
    if broker.is_mock() {
        // The mock cluster answers TxnOffsetCommit without storing the offsets
        // in the group; Apache Kafka stores them (CI runs this there).
        return;
    }
    // The positions went with the transactions: the group is at the end.
    let committed = committed_offsets(broker.bootstrap(), &t.group, &t.input, 4).unwrap();
    let mut ends = [0i64; 4];
    for (p, o) in &inputs {
        ends[*p as usize] = ends[*p as usize].max(o + 1);
    }
    assert_eq!(committed, ends.to_vec());
}

/// A member killed with SIGKILL while 50 ms checks are in flight: its open
/// transaction is aborted when it restarts with its instance id, and the
/// restarted member redoes exactly what was not committed. A read_committed
/// reader sees every input answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Apache Kafka (PAYSYNC_TEST_BROKERS); CI runs it with --ignored"]
async fn exactly_once_kill_9_mid_stream_repeats_nothing() {
    let broker = Broker::new();
    assert!(
        !broker.is_mock(),
        "set PAYSYNC_TEST_BROKERS to an Apache Kafka broker"
    );
    let t = broker.topics("eos-kill", 4).await;
    let sim = simulator(SimOptions {
        latency: Latency::Fixed(Duration::from_millis(50)),
        ..Default::default()
    })
    .await;
    let n = 3000;
    let inputs = load(broker.bootstrap(), &t.input, n).await;
    let env: Vec<(&str, &str)> = [
        EXACTLY_ONCE,
        &[("PAYSYNC_KAFKA__INSTANCE_ID", "eos-kill-1")],
    ]
    .concat();
    let mut first = Process::spawn_env(broker.bootstrap(), &t, &sim.base_url(), &env);
    first.wait_ready(WAIT).await;
    let before = read_outputs(broker.bootstrap(), &t, n / 3, WAIT).await;
    assert!(before.len() >= n / 3);
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    let second = Process::spawn_env(broker.bootstrap(), &t, &sim.base_url(), &env);
    second.wait_ready(WAIT).await;
    let out = read_outputs_settled(broker.bootstrap(), &t, n, WAIT, Duration::from_secs(5)).await;
    assert_each_once(&answered(&out, &t.input), &inputs, "kill -9 and restart");
    let log = first.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// Two members (distinct instance ids) share the partitions; one joins mid-run
/// and later leaves with SIGTERM: revocations commit their work in a
/// transaction before the partitions move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Apache Kafka (PAYSYNC_TEST_BROKERS); CI runs it with --ignored"]
async fn exactly_once_rebalances_repeat_nothing() {
    let broker = Broker::new();
    assert!(
        !broker.is_mock(),
        "set PAYSYNC_TEST_BROKERS to an Apache Kafka broker"
    );
    let t = broker.topics("eos-rebalance", 4).await;
    let sim = simulator(SimOptions {
        latency: Latency::Fixed(Duration::from_millis(50)),
        ..Default::default()
    })
    .await;
    let n = 3000;
    let inputs = load(broker.bootstrap(), &t.input, n).await;
    let a_env: Vec<(&str, &str)> =
        [EXACTLY_ONCE, &[("PAYSYNC_KAFKA__INSTANCE_ID", "member-a")]].concat();
    let b_env: Vec<(&str, &str)> =
        [EXACTLY_ONCE, &[("PAYSYNC_KAFKA__INSTANCE_ID", "member-b")]].concat();
    let a = Process::spawn_env(broker.bootstrap(), &t, &sim.base_url(), &a_env);
    a.wait_ready(WAIT).await;
    read_outputs(broker.bootstrap(), &t, n / 4, WAIT).await;
    let mut b = Process::spawn_env(broker.bootstrap(), &t, &sim.base_url(), &b_env);
    b.wait_ready(WAIT).await;
    read_outputs(broker.bootstrap(), &t, n / 2, WAIT).await;
    b.signal("TERM");
    assert_eq!(
        b.wait_exit(Duration::from_secs(60)).code(),
        Some(0),
        "{}",
        b.log()
    );
    let out = read_outputs_settled(broker.bootstrap(), &t, n, WAIT, Duration::from_secs(5)).await;
    assert_each_once(
        &answered(&out, &t.input),
        &inputs,
        "a member joins, then leaves",
    );
}

/// Settings that break exactly once are refused before anything starts.
#[tokio::test]
async fn check_config_refuses_what_breaks_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let t = paysync::demo::stack::Topics::unique("eos-config", 1);
    for (env, key) in [
        (
            (
                "PAYSYNC_KAFKA__CONSUMER__ISOLATION_LEVEL",
                "read_uncommitted",
            ),
            "kafka.consumer.\"isolation.level\"",
        ),
        (
            ("PAYSYNC_KAFKA__PRODUCER__TRANSACTIONAL_ID", "mine"),
            "kafka.producer.\"transactional.id\"",
        ),
        (
            ("PAYSYNC_KAFKA__PRODUCER__TRANSACTION_TIMEOUT_MS", "150"),
            "kafka.producer.\"transaction.timeout.ms\"",
        ),
    ] {
        let path = dir.path().join("paysync.toml");
        std::fs::write(
            &path,
            settings_toml(
                "127.0.0.1:1",
                &t,
                "http://127.0.0.1:1",
                "127.0.0.1:0".parse().unwrap(),
                "",
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_paysync"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env("PAYSYNC_PROCESSING__GUARANTEE", "exactly_once")
            .env(env.0, env.1)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}={}: {stderr}", env.0, env.1);
        assert!(stderr.contains(key), "names {key}: {stderr}");
        // The same setting is fine at least once (isolation aside, it is theirs).
        let out = Command::new(env!("CARGO_BIN_EXE_paysync"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env(env.0, env.1)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A broker whose transaction coordinator refuses paysync's transactional id:
/// `run` stops at start-up with exit 1 and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_transactions_stops_start_up_with_exit_1() {
    let broker = Broker::mock();
    let t = broker.topics("eos-none", 1).await;
    // Every InitProducerId answered with an authorization failure, as a broker
    // that grants no transactional ids does.
    broker.mock_cluster().unwrap().request_errors(
        rdkafka::types::RDKafkaApiKey::InitProducerId,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED;
            50],
    );
    let sim = simulator(SimOptions::default()).await;
    let mut p = Process::spawn_env(broker.bootstrap(), &t, &sim.base_url(), EXACTLY_ONCE);
    let status = p.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", p.log());
    let log = p.log();
    assert!(log.contains("needs a broker with transactions"), "{log}");
}

/// Exactly once, a redrive killed with SIGKILL mid-run and run again sends every
/// letter once: each batch and its position commit in one transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Apache Kafka (PAYSYNC_TEST_BROKERS); CI runs it with --ignored"]
async fn exactly_once_redrive_killed_and_run_again_sends_each_letter_once() {
    let broker = Broker::new();
    assert!(
        !broker.is_mock(),
        "set PAYSYNC_TEST_BROKERS to an Apache Kafka broker"
    );
    let t = broker.topics("eos-redrive", 1).await;
    let n = 20_000usize;
    let raw = RawProducer::new(broker.bootstrap()).unwrap();
    for i in 0..n {
        raw.enqueue_raw(
            &t.dlq,
            Some(0),
            Some(format!("k{i}").as_bytes()),
            Some(br#"{"connector_transaction_id":"x-1","merchant_id":"nobody"}"#),
            &[(b"paysync-error-code", Some(b"unknown_merchant"))],
        )
        .unwrap();
    }
    raw.flush(Duration::from_secs(30)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("paysync.toml");
    std::fs::write(
        &config,
        settings_toml(
            broker.bootstrap(),
            &t,
            "http://127.0.0.1:1",
            "127.0.0.1:0".parse().unwrap(),
            "",
        ),
    )
    .unwrap();
    let redrive = move || {
        Command::new(env!("CARGO_BIN_EXE_paysync"))
            .args(["redrive", "--config"])
            .arg(&config)
            .env("PAYSYNC_PROCESSING__GUARANTEE", "exactly_once")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = redrive();
    let brokers = broker.bootstrap().to_owned();
    let input = t.input.clone();
    tokio::task::spawn_blocking(move || {
        let mut reader = TopicReader::new(&brokers, &[(&input, 1)]).unwrap();
        assert!(
            !reader.read(1, Duration::from_secs(60)).is_empty(),
            "nothing redriven"
        );
    })
    .await
    .unwrap();
    Command::new("kill")
        .args(["-KILL", &first.id().to_string()])
        .status()
        .unwrap();
    let _ = first.wait();
    let second = tokio::task::spawn_blocking(move || redrive().wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        second.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let brokers = broker.bootstrap().to_owned();
    let input = t.input.clone();
    let records = tokio::task::spawn_blocking(move || {
        TopicReader::new(&brokers, &[(&input, 1)])
            .unwrap()
            .read(n + 100, Duration::from_secs(15))
    })
    .await
    .unwrap();
    let mut from: Vec<String> = records
        .iter()
        .map(|r| r.header("paysync-redriven-from").unwrap())
        .collect();
    from.sort();
    from.dedup();
    assert_eq!(
        records.len(),
        n,
        "{}",
        String::from_utf8_lossy(&second.stdout)
    );
    assert_eq!(from.len(), n, "each letter once");
}
