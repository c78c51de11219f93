//! The operator's commands end to end: `paysync check` (one-off status checks,
//! no Kafka) against the simulator, and `paysync redrive` (dead letters back to
//! the input topic, each once) on a real broker.

use std::process::{Command, Output};
use std::time::Duration;

use paysync::demo::simulator::{SimOptions, SIM_CLIENT_SECRET};
use paysync::demo::stack::Topics;
use paysync::kafka::tools::{committed_offsets, RawProducer, TopicReader};
use serde_json::Value;

use crate::support::*;

fn paysync(config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_paysync"))
        .arg(args[0])
        .arg("--config")
        .arg(config)
        .args(&args[1..])
        .output()
        .unwrap()
}

/// `paysync` off the async runtime (it blocks until the process exits).
async fn paysync_async(config: &std::path::Path, args: &[&str]) -> Output {
    let config = config.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        paysync(&config, &args)
    })
    .await
    .unwrap()
}

/// The exit code, with stderr shown when it differs.
fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_config(
    dir: &tempfile::TempDir,
    brokers: &str,
    t: &Topics,
    base_url: &str,
) -> std::path::PathBuf {
    let path = dir.path().join("paysync.toml");
    let toml = settings_toml(brokers, t, base_url, "127.0.0.1:0".parse().unwrap(), "");
    std::fs::write(&path, toml).unwrap();
    path
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_one_event_per_id_and_exits_by_outcome() {
    let sim = simulator(SimOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // No broker at all: `check` does not touch Kafka.
    let config = write_config(
        &dir,
        "127.0.0.1:1",
        &Topics::unique("check", 1),
        &sim.base_url(),
    );
    let ids = ["success-c1", "failure-c2", "open-3ds-c3"];
    let out = paysync_async(&config, &["check", ids[0], ids[1], ids[2]]).await;
    assert_exit(&out, 0, "three ids");
    let events = lines(&out);
    let got: Vec<(&str, &str, bool)> = events
        .iter()
        .map(|e| {
            (
                e["connector_transaction_id"].as_str().unwrap(),
                e["status"].as_str().unwrap(),
                e["is_final"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("success-c1", "CHARGED", true),
            ("failure-c2", "FAILURE", true),
            ("open-3ds-c3", "AUTHENTICATION_PENDING", false),
        ],
        "FAILURE is the payment's status, not a failed check"
    );
    for e in &events {
        assert_eq!(e["check_number"], 1);
        assert!(e["event_id"].as_str().unwrap().len() == 36);
        assert!(e["next_check_at"].is_null());
    }

    // A failed check (404), an amount that does not match, and another connector.
    let out = paysync_async(
        &config,
        &[
            "check",
            "--amount",
            "999",
            "--currency",
            "EUR",
            "notfound-c4",
            "success-c5",
        ],
    )
    .await;
    assert_exit(&out, 1, "not found, amount mismatch");
    let events = lines(&out);
    assert_eq!(events[0]["status"], "PAYMENT_STATUS_UNSPECIFIED");
    assert_eq!(
        events[0]["error"]["unified_details"]["code"],
        "TRANSACTION_NOT_FOUND"
    );
    assert_eq!(
        events[1]["error"]["unified_details"]["code"],
        "INTEGRITY_CHECK_FAILED"
    );
    let out = paysync_async(
        &config,
        &[
            "check",
            "--connector",
            "mollie",
            "--amount",
            "1200",
            "--currency",
            "EUR",
            "success-m6",
        ],
    )
    .await;
    assert_exit(&out, 0, "mollie");
    assert_eq!(lines(&out)[0]["status"], "CHARGED");
    assert_eq!(lines(&out)[0]["connector"], "mollie");

    // Bad arguments or configuration: exit 2, nothing on stdout.
    for args in [
        vec!["check", "--connector", "adyen", "x-1"],
        vec!["check", "../etc/passwd"],
        vec!["check", "--amount", "5", "x-2"],
        vec!["check", "--method", "PAYPAL", "x-3"],
    ] {
        let shown = args.join(" ");
        let out = paysync_async(&config, &args).await;
        assert_exit(&out, 2, &shown);
        assert!(out.stdout.is_empty(), "{shown}");
    }
    assert!(sim.token_requests() >= 1, "a real token was used");
    // No secret in anything printed.
    let out = paysync_async(&config, &["check", "success-c7"]).await;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in [SIM_CLIENT_SECRET, "sim-token-", "Bearer "] {
        assert!(!printed.contains(secret), "`{secret}` printed");
    }
}

/// Audit: `paysync check` against a connector that is down never returned (the
/// retry path waited on the open circuit with a fresh budget, forever). Each id
/// now has an overall deadline; ids checked are printed even when a later
/// argument is invalid; a negative amount is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_always_ends() {
    let down = simulator(SimOptions {
        error_rate: 1.0,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        "127.0.0.1:1",
        &Topics::unique("check-down", 1),
        &down.base_url(),
    );
    let started = std::time::Instant::now();
    let out = paysync_async(
        &config,
        &["check", "--timeout", "3s", "success-d1", "success-d2"],
    )
    .await;
    let took = started.elapsed();
    assert_exit(&out, 1, "a connector that is down");
    let events = lines(&out);
    assert_eq!(events.len(), 2, "one failed-check line per id");
    for e in &events {
        assert_eq!(e["status"], "PAYMENT_STATUS_UNSPECIFIED");
        assert_eq!(e["error"]["unified_details"]["code"], "CONNECTOR_TIMEOUT");
        assert!(e["attempts"].as_i64().unwrap() >= 1, "{e}");
    }
    assert!(
        took < Duration::from_secs(20),
        "two ids with a 3 s deadline each took {took:?}"
    );

    let sim = simulator(SimOptions::default()).await;
    let config = write_config(
        &dir,
        "127.0.0.1:1",
        &Topics::unique("check-args", 1),
        &sim.base_url(),
    );
    let out = paysync_async(&config, &["check", "success-e1", "../bad", "success-e2"]).await;
    assert_exit(&out, 2, "an invalid id among valid ones");
    let ids: Vec<String> = lines(&out)
        .iter()
        .map(|e| e["connector_transaction_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        ["success-e1", "success-e2"],
        "the valid ids are checked and printed"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("../bad"));

    let out = paysync_async(
        &config,
        &["check", "--amount", "-5", "--currency", "EUR", "success-e3"],
    )
    .await;
    assert_exit(&out, 2, "a negative amount");
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--amount -5"));
}

/// The dead letters of `t` so far.
fn dead_letters(brokers: &str, t: &Topics, want: usize) -> Vec<paysync::kafka::tools::RawRecord> {
    TopicReader::new(brokers, &[(&t.dlq, 1)])
        .unwrap()
        .read(want, Duration::from_secs(30))
}

fn inputs(
    brokers: &str,
    t: &Topics,
    want: usize,
    wait: Duration,
) -> Vec<paysync::kafka::tools::RawRecord> {
    TopicReader::new(brokers, &[(&t.input, t.partitions)])
        .unwrap()
        .read(want, wait)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_sends_dead_letters_back_once_with_their_headers() {
    let broker = Broker::new();
    let t = broker.topics("redrive", 1).await;
    let sim = simulator(SimOptions::default()).await;
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    type Request<'a> = (&'a str, &'a [u8], &'a [(&'a str, &'a [u8])]);
    let requests: [Request; 5] = [
        (
            "k1",
            br#"{"connector_transaction_id":"x-1","merchant_id":"nobody"}"#,
            &[("x-request-id", b"r-1")],
        ),
        (
            "k2",
            br#"{"connector_transaction_id":"x-2","merchant_id":"nobody"}"#,
            &[],
        ),
        (
            "k3",
            br#"{"connector_transaction_id":"x-3","connector":"adyen"}"#,
            &[],
        ),
        ("k4", b"not json", &[]),
        // Audit: an input that carries its own `paysync-error-code` header was
        // selected by `--reason unknown_merchant` (the filter read the first one).
        (
            "k5",
            b"not json either",
            &[("paysync-error-code", b"unknown_merchant")],
        ),
    ];
    for (key, value, headers) in requests {
        producer
            .send(
                &t.input,
                Some(0),
                Some(key.as_bytes()),
                Some(value),
                headers,
            )
            .await
            .unwrap();
    }
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), ""))
        .await
        .unwrap();
    let letters = dead_letters(broker.bootstrap(), &t, 5);
    assert_eq!(letters.len(), 5);
    app.stop().await;
    // Two letters written the way a dead letter looks: one whose value was cut
    // to fit, one redriven three times already.
    let raw = RawProducer::new(broker.bootstrap()).unwrap();
    raw.send_raw(
        &t.dlq,
        Some(0),
        Some(b"k6"),
        Some(b"{\"connector_transaction_id\":"),
        &[
            (b"paysync-error-code", Some(b"oversize")),
            (b"paysync-value-truncated", Some(b"true")),
        ],
    )
    .await
    .unwrap();
    raw.send_raw(
        &t.dlq,
        Some(0),
        Some(b"k7"),
        Some(br#"{"connector_transaction_id":"x-7","merchant_id":"nobody"}"#),
        &[
            (b"paysync-redriven-from", Some(b"elsewhere:0:1")),
            (b"paysync-redrive-count", Some(b"3")),
            (b"paysync-error-code", Some(b"unknown_merchant")),
            (b"paysync-redrive-count", Some(b"3")),
        ],
    )
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, broker.bootstrap(), &t, &sim.base_url());
    let run = |args: Vec<&'static str>| {
        let config = config.clone();
        async move {
            let mut all = vec!["redrive"];
            all.extend(args);
            paysync_async(&config, &all).await
        }
    };
    let text = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let count_inputs = |want| inputs(broker.bootstrap(), &t, want, Duration::from_secs(3)).len();

    // A dry run lists both groups, sends and commits nothing.
    let out = run(vec!["--dry-run"]).await;
    assert_exit(&out, 0, "dry run");
    // Reaching the end of a partition is how a run ends, not an error.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ERROR") && !stderr.contains("PartitionEOF"),
        "{stderr}"
    );
    let report = text(&out);
    for line in [
        "letters that can succeed once the cause is fixed (sent without --reason):",
        "  unknown_connector: would redrive 1\n",
        "  unknown_merchant: would redrive 2, redriven too often, not redriven 1\n",
        "letters whose bytes cannot be processed as they are (sent only when --reason names them):",
        "  invalid_json: would redrive 0, not selected 2\n",
        "  oversize: would redrive 0, not selected 1\n",
        "total would redrive: 3\n",
    ] {
        assert!(report.contains(line), "`{line}` in\n{report}");
    }
    assert!(
        report.contains(&format!(
            "not redriven: {}:0:6 (unknown_merchant, redriven too often)",
            t.dlq
        )),
        "{report}"
    );
    assert_eq!(count_inputs(10), 5, "nothing sent");

    // One reason, paysync's own: the two letters paysync rejected as
    // unknown_merchant, not the one whose input carried that header.
    let out = run(vec!["--reason", "unknown_merchant"]).await;
    let report = text(&out);
    assert!(
        report.contains("  unknown_merchant: redriven 2, redriven too often, not redriven 1\n"),
        "{report}"
    );
    assert!(report.contains("total redriven: 2"), "{report}");
    let again = run(vec!["--reason", "unknown_merchant"]).await;
    assert!(
        text(&again).contains("total redriven: 0"),
        "it starts where the last run of that reason ended: {}",
        text(&again)
    );
    let mut input = inputs(broker.bootstrap(), &t, 10, Duration::from_secs(5));
    assert_eq!(input.len(), 7);
    // Dead letters of different payments are written in the order their checks
    // ended, not by offset.
    input[5..].sort_by_key(|r| r.key.clone());
    for (r, (key, value, _)) in input[5..].iter().zip(&requests[..2]) {
        assert_eq!(r.key.as_deref(), Some(key.as_bytes()));
        assert_eq!(r.value.as_deref(), Some(*value), "the value, byte for byte");
        assert!(r
            .headers
            .iter()
            .all(|(k, _)| !k.starts_with(b"paysync-error") && !k.starts_with(b"paysync-source")));
        assert!(r
            .header("paysync-redriven-from")
            .unwrap()
            .starts_with(&format!("{}:0:", t.dlq)));
        assert_eq!(r.header("paysync-redrive-count").as_deref(), Some("1"));
    }
    assert_eq!(
        input[5].header("x-request-id").as_deref(),
        Some("r-1"),
        "the request's own headers stay"
    );

    // Audit: an unfiltered run after a filtered one sent those letters again.
    let out = run(vec![]).await;
    let report = text(&out);
    assert!(
        report.contains("  unknown_merchant: redriven 0, handled by an earlier run 3\n"),
        "{report}"
    );
    assert!(
        report.contains("  unknown_connector: redriven 1\n"),
        "{report}"
    );
    assert!(report.contains("total redriven: 1"), "{report}");
    assert!(text(&run(vec![]).await).contains("total redriven: 0"));
    assert_eq!(count_inputs(20), 8);

    // Letters that cannot be processed as they are go only when named; a
    // truncated one never.
    let out = run(vec![
        "--reason",
        "invalid_json",
        "--reason",
        "oversize",
        "--max",
        "1",
    ])
    .await;
    assert!(text(&out).contains("total redriven: 1"), "{}", text(&out));
    assert!(text(&out).contains("stopped at --max"), "{}", text(&out));
    let out = run(vec!["--reason", "invalid_json", "--reason", "oversize"]).await;
    let report = text(&out);
    assert!(report.contains("  invalid_json: redriven 1\n"), "{report}");
    assert!(
        report.contains("  oversize: redriven 0, truncated, not redriven 1\n"),
        "{report}"
    );
    assert_eq!(count_inputs(20), 10);

    // --force sends again on purpose; the letters themselves are unchanged, so
    // the redriven requests carry count 1 again.
    let out = run(vec!["--force", "--reason", "unknown_connector"]).await;
    assert!(text(&out).contains("total redriven: 1"), "{}", text(&out));
    let input = inputs(broker.bootstrap(), &t, 20, Duration::from_secs(3));
    assert_eq!(input.len(), 11);
    assert_eq!(input[10].key.as_deref(), Some(&b"k3"[..]));

    // One position for every filter, with each reason's place in its metadata.
    let committed = committed_offsets(
        broker.bootstrap(),
        &format!("{}.redrive", t.group),
        &t.dlq,
        1,
    )
    .unwrap();
    assert_eq!(
        committed,
        vec![0],
        "letters of other reasons (empty_value, ...) were never covered"
    );
    let bad = run(vec!["--reason", "nonsense"]).await;
    assert_exit(&bad, 2, "an unknown reason");
}

/// Audit: an interrupted redrive, run again, sent all 40,000 letters twice (it
/// committed its position only at the end and had no signal handling). Now it
/// stops after the batch under way on SIGINT, committed, and the next run sends
/// the rest: each letter exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_redrive_run_again_sends_nothing_twice() {
    let broker = Broker::new();
    let t = broker.topics("redrive-int", 1).await;
    let sim = simulator(SimOptions::default()).await;
    let n = 20_000usize;
    let raw = RawProducer::new(broker.bootstrap()).unwrap();
    for i in 0..n {
        let key = format!("k{i}");
        raw.enqueue_raw(
            &t.dlq,
            Some(0),
            Some(key.as_bytes()),
            Some(br#"{"connector_transaction_id":"x-1","merchant_id":"nobody"}"#),
            &[(b"paysync-error-code", Some(b"unknown_merchant"))],
        )
        .unwrap();
    }
    raw.flush(Duration::from_secs(30)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, broker.bootstrap(), &t, &sim.base_url());
    let mut child = Command::new(env!("CARGO_BIN_EXE_paysync"))
        .args(["redrive", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the first batch is in the input topic.
    let brokers = broker.bootstrap().to_owned();
    let t2 = t.clone();
    tokio::task::spawn_blocking(move || {
        let mut reader = TopicReader::new(&brokers, &[(&t2.input, t2.partitions)]).unwrap();
        assert!(
            !reader.read(1, Duration::from_secs(30)).is_empty(),
            "nothing redriven"
        );
    })
    .await
    .unwrap();
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        let _ = child.wait();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let first = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(130), "interrupted: {first}");
    assert!(first.contains("interrupted"), "{first}");
    let second = paysync_async(&config, &["redrive"]).await;
    assert_exit(&second, 0, "the rest");
    let input = inputs(broker.bootstrap(), &t, n + 10, Duration::from_secs(10));
    let mut from: Vec<String> = input
        .iter()
        .map(|r| r.header("paysync-redriven-from").unwrap())
        .collect();
    from.sort();
    from.dedup();
    assert_eq!(
        input.len(),
        n,
        "every letter once:\n{first}\n{}",
        String::from_utf8_lossy(&second.stdout)
    );
    assert_eq!(from.len(), n);
}

/// Durations from outside, out of range: a usage or configuration error (exit
/// 2) that names the flag or the key, never a panic (exit 101, as
/// `--timeout 10000000000000000000s` was: it overflowed the deadline).
#[test]
fn absurd_durations_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        "127.0.0.1:1",
        &Topics::unique("absurd", 1),
        "http://127.0.0.1:1",
    );
    for timeout in ["10000000000000000000s", "8days", "0s"] {
        let out = paysync(&config, &["check", "--timeout", timeout, "tx-1"]);
        assert_exit(&out, 2, timeout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--timeout"), "{timeout}: {stderr}");
    }
    let toml = std::fs::read_to_string(&config).unwrap().replace(
        "[connectors.cm.retry]\n",
        "[connectors.cm.retry]\nmax_throttled = \"30days\"\n",
    );
    std::fs::write(&config, toml).unwrap();
    let out = paysync(&config, &["check-config"]);
    assert_exit(&out, 2, "an out-of-range key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("connectors.cm.retry.max_throttled"),
        "{stderr}"
    );
}

/// A key that would protect nothing is refused by name: CM.com signs no
/// webhooks, so a `webhook_secret` on a CM.com account is a configuration
/// error (exit 2), as is `--role webhooks` without `[webhooks]`.
#[test]
fn a_webhook_secret_on_a_connector_that_signs_nothing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        "127.0.0.1:1",
        &Topics::unique("cm-secret", 1),
        "http://127.0.0.1:1",
    );
    let base = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{base}\n[connectors.cm.accounts.shop]\nclient_id = \"a\"\nclient_secret = \"b\"\nwebhook_secret = \"whsec_never_used\"\n"),
    )
    .unwrap();
    let out = paysync(&config, &["check-config"]);
    assert_exit(&out, 2, "a CM.com webhook_secret");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("connectors.cm.accounts.shop.webhook_secret"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("whsec_never_used"),
        "the secret echoed: {stderr}"
    );

    std::fs::write(&config, &base).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_paysync"))
        .args(["run", "--role", "webhooks", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_exit(&out, 2, "--role webhooks without [webhooks]");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[webhooks]"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
