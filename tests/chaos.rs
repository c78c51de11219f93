//! The chaos run: the real `paysync` binary against librdkafka's mock cluster,
//! hosted by this test process (so killing paysync leaves the broker up), with
//! broker errors injected (produce, fetch and commit errors, the broker going down
//! and up), a connector that answers 5xx, 429, slowly and with garbage at random,
//! poison records mixed into the input, and one kill -9 and restart mid-run.
//!
//! One request in ten asks to be followed (a 1 s schedule of three re-checks),
//! some for payments whose status moves from OPEN to SUCCESS on the third call.
//!
//! Afterwards: every input offset has exactly one event or dead letter (more than
//! one only for offsets re-delivered after the kill, all with the same
//! `event_id`); every followed request's chain ended exactly once (one last
//! event per origin offset, repeats with the same `event_id`); no FAILURE the
//! connector did not send; and every partition, re-check topic included,
//! committed to its end.
//!
//! paysync's producer keeps one request in flight here: the mock cluster does not check
//! idempotent sequence numbers, which with more in flight lets librdkafka report
//! a record delivered that the mock never wrote (shown by the last test here).
//!
//! Not part of CI's time budget:
//! `PAYSYNC_CHAOS_REQUESTS=100000 cargo test --release --test chaos -- --ignored --nocapture`

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paysync::codec::avro::decode_event_json;
use paysync::kafka::tools::{committed_offsets, MockBroker, RawProducer, TopicReader};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const PARTITIONS: i32 = 16;
/// The dead letters keep the poison records (a hundred of them 70 kB each):
/// spread so that no partition reaches the mock cluster's 5 MB retention, which
/// would delete dead letters before the reader saw them.
const DLQ_PARTITIONS: i32 = 4;
const STATUSES: &[(&str, &str)] = &[
    ("success", "SUCCESS"),
    ("open", "OPEN"),
    ("authorized", "AUTHORIZED"),
    ("cancelled", "CANCELLED"),
    ("expired", "EXPIRED"),
    ("failure", "FAILURE"),
];

/// A CM.com that misbehaves at random: 8% 503, 4% 429 with Retry-After, 2% slower
/// than the request timeout, 2% a 200 with a body that is not JSON. A `moving-`
/// payment is OPEN for its first two calls, then SUCCESS.
struct Chaotic {
    calls: AtomicU64,
    moving: Mutex<std::collections::HashMap<String, u32>>,
}

impl Respond for Chaotic {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let path = request.url.path();
        if path.ends_with("/token") {
            return ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"access_token": "t", "expires_in": 3600}));
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let id = path.rsplit('/').next().unwrap_or_default();
        let status = if id.starts_with("moving-") {
            let mut moving = self.moving.lock().unwrap();
            let calls = moving.entry(id.to_owned()).or_default();
            *calls += 1;
            if *calls <= 2 {
                "OPEN"
            } else {
                "SUCCESS"
            }
        } else {
            STATUSES
                .iter()
                .find(|(prefix, _)| id.starts_with(prefix))
                .map_or("SUCCESS", |(_, s)| *s)
        };
        let roll = fastrand::u32(0..100);
        match roll {
            0..=7 => ResponseTemplate::new(503).set_body_string("busy"),
            8..=11 => ResponseTemplate::new(429).insert_header("retry-after", "1"),
            12..=13 => ResponseTemplate::new(200)
                .set_delay(Duration::from_millis(1500))
                .set_body_json(
                    serde_json::json!({"status": status, "amount": 1200, "currency": "EUR"}),
                ),
            14..=15 => ResponseTemplate::new(200).set_body_string("<html>gateway</html>"),
            _ => ResponseTemplate::new(200).set_body_json(
                serde_json::json!({"status": status, "amount": 1200, "currency": "EUR"}),
            ),
        }
    }
}

/// The high watermark of each partition of `topic`.
fn high_watermarks(bootstrap: &str, topic: &str, partitions: i32) -> Vec<i64> {
    watermarks(bootstrap, topic, partitions)
        .into_iter()
        .map(|(_, high)| high)
        .collect()
}

/// (low, high) per partition: a low watermark above 0 means the mock cluster
/// deleted records (it keeps about 5 MB per partition).
fn watermarks(bootstrap: &str, topic: &str, partitions: i32) -> Vec<(i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
        })
        .collect()
}

/// The input (partition, offset) an event answers: its generated `request_id` is
/// `topic:partition:offset`.
fn event_input(json: &serde_json::Value) -> Option<(i32, i64)> {
    let mut parts = json["request_id"].as_str()?.rsplitn(3, ':');
    let o = parts.next()?.parse().ok()?;
    let p = parts.next()?.parse().ok()?;
    Some((p, o))
}

/// The input (partition, offset) a dead letter keeps, from its source headers.
fn dead_letter_input(r: &paysync::kafka::tools::RawRecord) -> Option<(i32, i64)> {
    let p = r.header("paysync-source-partition")?.parse().ok()?;
    let o = r.header("paysync-source-offset")?.parse().ok()?;
    Some((p, o))
}

/// Reads the events and dead-letter topics again from the start and returns where
/// the answers to `inputs` (partition, offset of chaos.requests) are.
fn find_answers(bootstrap: &str, inputs: &[(i32, i64)]) -> Vec<String> {
    let mut reader = TopicReader::new(
        bootstrap,
        &[
            ("chaos.events", PARTITIONS),
            ("chaos.requests.dlq", DLQ_PARTITIONS),
        ],
    )
    .unwrap();
    let mut found = Vec::new();
    for r in reader.read(usize::MAX, Duration::from_secs(20)) {
        let input = if r.topic == "chaos.events" {
            r.value
                .as_deref()
                .and_then(|v| decode_event_json(v).ok())
                .and_then(|json| event_input(&json))
        } else {
            dead_letter_input(&r)
        };
        if let Some(input) = input.filter(|i| inputs.contains(i)) {
            found.push(format!(
                "{input:?} at {}:{}:{}",
                r.topic, r.partition, r.offset
            ));
        }
    }
    found.extend(
        reader
            .gaps
            .iter()
            .map(|(t, p, e, g)| format!("fresh read of {t}:{p} jumped from {e} to {g}")),
    );
    found
}

fn spawn_paysync(config: &std::path::Path, log: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_paysync"))
        .args(["run", "--config"])
        .arg(config)
        .env("PAYSYNC_LOG__FORMAT", "json")
        // PAYSYNC_CHAOS_LOG_LEVEL, e.g. "warn,paysync::kafka::engine=debug", logs
        // each request's outcome with its span, to trace a single offset.
        .env(
            "PAYSYNC_LOG__LEVEL",
            std::env::var("PAYSYNC_CHAOS_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap()
}

/// What one input offset produced.
#[derive(Default, Debug)]
struct Outputs {
    /// Events of the first check (the only check of a request not followed).
    event_ids: Vec<String>,
    statuses: Vec<String>,
    dead: Vec<String>,
    /// Events of a followed request's later checks: (check number, event_id).
    later: Vec<(i64, String)>,
    /// Events that end a chain (`next_check_at` null): (check number, event_id).
    last: Vec<(i64, String)>,
    /// When each of those was observed (ms since the epoch).
    last_observed: Vec<i64>,
    /// Where each first-check event or dead letter was read (partition, offset)
    /// and a hash of its bytes: tells a record written twice from a repeated
    /// check.
    copies: Vec<(i32, i64, u64)>,
}

/// A hash of a record's value and timestamp, to compare copies: a retried
/// produce request resends the same bytes and timestamp, a repeated check or
/// dead letter is a new record with its own timestamp.
fn value_hash(r: &paysync::kafka::tools::RawRecord) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    r.value.hash(&mut h);
    r.timestamp.hash(&mut h);
    h.finish()
}

const RECHECK_TOPIC: &str = "chaos.requests.recheck.1s";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos run, minutes long: PAYSYNC_CHAOS_REQUESTS=100000 cargo test --release --test chaos -- --ignored --nocapture"]
async fn chaos_loses_nothing_and_invents_no_failure() {
    let n: usize = std::env::var("PAYSYNC_CHAOS_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let started = Instant::now();
    let broker = MockBroker::start(&[
        ("chaos.requests", PARTITIONS),
        ("chaos.events", PARTITIONS),
        ("chaos.requests.dlq", DLQ_PARTITIONS),
        (RECHECK_TOPIC, PARTITIONS),
    ])
    .unwrap();
    let bootstrap = broker.bootstrap();
    let connector = Arc::new(Chaotic {
        calls: AtomicU64::new(0),
        moving: Mutex::default(),
    });
    let cm = MockServer::builder()
        .disable_request_recording()
        .start()
        .await;
    struct Shared(Arc<Chaotic>);
    impl Respond for Shared {
        fn respond(&self, r: &Request) -> ResponseTemplate {
            self.0.respond(r)
        }
    }
    Mock::given(wiremock::matchers::any())
        .respond_with(Shared(connector.clone()))
        .mount(&cm)
        .await;

    // Inputs: ~97% status checks, ~3% poison of every kind.
    let producer = RawProducer::new(&bootstrap).unwrap();
    let mut poison = 0usize;
    let mut followed = std::collections::BTreeSet::new();
    let schemas = paysync::codec::avro::Schemas::get();
    let mut single_object_cut = vec![0xC3, 0x01];
    single_object_cut.extend_from_slice(&schemas.request_fingerprint.to_le_bytes());
    single_object_cut.push(0x80);
    for i in 0..n {
        let valid;
        type Headers<'a> = Vec<(&'a [u8], Option<&'a [u8]>)>;
        let (value, headers): (Option<&[u8]>, Headers) = match (i % 100, i % 1000) {
            (0, _) => (Some(b"not json"), vec![]),
            (2, _) => (Some(&[0, 0, 0, 0, 1, 0x08, b'a', b'b', b'c', b'd']), vec![]),
            (_, 3) => (None, vec![(&b"why"[..], None)]),
            (_, 4) => (Some(&[b' '; 70_000]), vec![]),
            (_, 5) => (Some(&single_object_cut), vec![]),
            (_, 6) => (Some(br#"{"connector_transaction_id":"../x"}"#), vec![]),
            (1, _) => (
                // A valid request whose header name is not UTF-8.
                Some(br#"{"connector_transaction_id":"success-h"}"#),
                vec![(&b"\xff\xfe"[..], Some(&b"x"[..]))],
            ),
            (r, _) if r % 10 == 7 => {
                let prefix = ["moving", "open", "success"][(i / 10) % 3];
                valid = format!(r#"{{"connector_transaction_id":"{prefix}-c{i}","follow":true}}"#);
                let p = (i % PARTITIONS as usize) as i32;
                followed.insert((p, (i / PARTITIONS as usize) as i64));
                (Some(valid.as_bytes()), vec![])
            }
            _ => {
                let (prefix, _) = STATUSES[i % STATUSES.len()];
                valid = format!(r#"{{"connector_transaction_id":"{prefix}-c{i}"}}"#);
                (Some(valid.as_bytes()), vec![])
            }
        };
        let is_poison = matches!(i % 100, 0 | 2) || (i % 100 != 1 && matches!(i % 1000, 3..=6));
        poison += usize::from(is_poison);
        let key = format!("k{i}");
        producer
            .enqueue_raw(
                "chaos.requests",
                Some((i % PARTITIONS as usize) as i32),
                Some(key.as_bytes()),
                value,
                &headers,
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    eprintln!(
        "chaos: produced {n} requests ({poison} poison) in {:?}",
        started.elapsed()
    );
    let ends: Vec<i64> = {
        let mut e = vec![0i64; PARTITIONS as usize];
        for i in 0..n {
            e[i % PARTITIONS as usize] += 1;
        }
        e
    };

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("paysync.toml");
    // Outside the temporary directory, so that it outlives a failed run.
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-paysync.log");
    let _ = std::fs::remove_file(&log);
    eprintln!("chaos: paysync's log (warn and above): {}", log.display());
    std::fs::write(
        &config,
        format!(
            r#"
[kafka]
brokers = "{bootstrap}"
group_id = "chaos"
input_topic = "chaos.requests"
output_topic = "chaos.events"
dead_letter_topic = "chaos.requests.dlq"
commit_interval = "500ms"
[kafka.consumer]
"session.timeout.ms" = "10000"
"heartbeat.interval.ms" = "1000"
[kafka.producer]
# The mock cluster does not check idempotent sequences; see
# mock_cluster_acks_records_it_never_wrote_unless_one_request_is_in_flight.
"max.in.flight.requests.per.connection" = "1"
{producer}
[http]
listen = "127.0.0.1:0"
[processing]
max_in_flight = 256
shutdown_timeout = "10s"
[connectors.cm]
base_url = "{cm}"
request_timeout = "1s"
[connectors.cm.retry]
max_attempts = 6
initial_backoff = "20ms"
max_backoff = "500ms"
max_elapsed = "20s"
max_retry_after = "2s"
[connectors.cm.circuit]
failure_threshold = 6
cooldown = "500ms"
max_cooldown = "2s"
[connectors.cm.accounts.default]
client_id = "c"
client_secret = "s"
[connectors.cm.follow]
schedule = [["1s", 3]]
publish = "changes"
"#,
            cm = cm.uri(),
            // PAYSYNC_CHAOS_PRODUCER, e.g. `"debug" = "eos"`: extra producer settings.
            producer = std::env::var("PAYSYNC_CHAOS_PRODUCER").unwrap_or_default(),
        ),
    )
    .unwrap();

    // A reader that collects every output as it arrives.
    let outputs: Arc<Mutex<BTreeMap<(i32, i64), Outputs>>> = Arc::default();
    let total_outputs = Arc::new(AtomicU64::new(0));
    let stop_reader = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The reader's offset jumps and consumer errors, for a failure's diagnosis.
    let reader_notes: Arc<Mutex<Vec<String>>> = Arc::default();
    let reader = {
        let (outputs, total, stop, bootstrap, notes) = (
            outputs.clone(),
            total_outputs.clone(),
            stop_reader.clone(),
            bootstrap.clone(),
            reader_notes.clone(),
        );
        std::thread::spawn(move || {
            let mut reader = TopicReader::new(
                &bootstrap,
                &[
                    ("chaos.events", PARTITIONS),
                    ("chaos.requests.dlq", DLQ_PARTITIONS),
                ],
            )
            .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let records = reader.read(usize::MAX, Duration::from_millis(500));
                {
                    let mut notes = notes.lock().unwrap();
                    for (t, p, expected, got) in reader.gaps.drain(..) {
                        notes.push(format!("{t}:{p} jumped from {expected} to {got}"));
                    }
                    notes.extend(reader.errors.drain(..));
                }
                for r in records {
                    total.fetch_add(1, Ordering::Relaxed);
                    let mut map = outputs.lock().unwrap();
                    if r.topic == "chaos.events" {
                        let json = decode_event_json(r.value.as_deref().unwrap()).unwrap();
                        let input = event_input(&json)
                            .unwrap_or_else(|| panic!("an event without its input: {json}"));
                        let out = map.entry(input).or_default();
                        let event_id = json["event_id"].as_str().unwrap().to_owned();
                        let check = json["check_number"].as_i64().unwrap();
                        if json["next_check_at"].is_null() {
                            out.last.push((check, event_id.clone()));
                            out.last_observed
                                .push(json["observed_at"].as_i64().unwrap_or(0));
                        }
                        let status = json["status"].as_str().unwrap().to_owned();
                        if check > 1 {
                            out.later.push((check, event_id));
                            continue;
                        }
                        out.event_ids.push(event_id);
                        out.copies.push((r.partition, r.offset, value_hash(&r)));
                        if status == "FAILURE" {
                            let tx = json["connector_transaction_id"].as_str().unwrap();
                            assert!(
                                tx.starts_with("failure-"),
                                "FAILURE published for {tx}, which the connector never failed"
                            );
                        }
                        out.statuses.push(status);
                    } else {
                        let input = dead_letter_input(&r).unwrap_or_else(|| {
                            panic!("a dead letter without its source: {:?}", r.headers)
                        });
                        let out = map.entry(input).or_default();
                        out.dead.push(r.header("paysync-error-code").unwrap());
                        out.copies.push((r.partition, r.offset, value_hash(&r)));
                    }
                }
            }
        })
    };

    let mut child = spawn_paysync(&config, &log);
    let progress = |target: usize| {
        let outputs = outputs.clone();
        let bootstrap = bootstrap.clone();
        let reader_notes = reader_notes.clone();
        let log = log.clone();
        async move {
            // No new answer for 120 s: stuck (or records the reader never saw).
            let (mut seen, mut since) = (0, Instant::now());
            loop {
                let now = outputs.lock().unwrap().len();
                if now >= target {
                    break;
                }
                if now > seen {
                    (seen, since) = (now, Instant::now());
                }
                if since.elapsed() > Duration::from_secs(120) {
                    let b = bootstrap.clone();
                    let (events, dlq) = tokio::task::spawn_blocking(move || {
                        (
                            watermarks(&b, "chaos.events", PARTITIONS),
                            watermarks(&b, "chaos.requests.dlq", DLQ_PARTITIONS),
                        )
                    })
                    .await
                    .unwrap();
                    let missing: Vec<(i32, i64)> = {
                        let answered = outputs.lock().unwrap();
                        (0..target)
                            .map(|i| {
                                (
                                    (i % PARTITIONS as usize) as i32,
                                    (i / PARTITIONS as usize) as i64,
                                )
                            })
                            .filter(|k| !answered.contains_key(k))
                            .take(10)
                            .collect()
                    };
                    let b = bootstrap.clone();
                    let wanted = missing.clone();
                    let found = tokio::task::spawn_blocking(move || find_answers(&b, &wanted))
                        .await
                        .unwrap();
                    let notes = reader_notes.lock().unwrap();
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let mut messages: BTreeMap<String, usize> = BTreeMap::new();
                    for line in text.lines() {
                        let m = serde_json::from_str::<serde_json::Value>(line)
                            .ok()
                            .and_then(|v| v["message"].as_str().map(str::to_owned))
                            .unwrap_or_else(|| line.chars().take(120).collect());
                        *messages.entry(m).or_default() += 1;
                    }
                    eprintln!("chaos: paysync's log messages by count: {messages:#?}");
                    panic!("no progress: {now} of {target} inputs answered (first missing {missing:?}; a fresh read of the topics finds {found:?}); (low, high) watermarks of chaos.events {events:?}, of the dead letters {dlq:?}; the reader's jumps and errors: {notes:?}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    // Broker faults while the backlog drains.
    progress(n / 10).await;
    broker.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 20],
    );
    broker.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 20],
    );
    broker.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 5],
    );
    eprintln!(
        "chaos: produce, fetch and commit errors injected at {:?}",
        started.elapsed()
    );
    progress(n / 4).await;
    broker.broker_down().unwrap();
    eprintln!("chaos: broker down at {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.broker_up().unwrap();
    eprintln!("chaos: broker up at {:?}", started.elapsed());
    broker.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 10],
    );

    // kill -9 mid-run, then restart.
    progress(n / 2).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let (b, killed_at) = (bootstrap.clone(), started.elapsed());
    eprintln!(
        "chaos: killed at {} ms since the epoch",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let committed_at_kill = tokio::task::spawn_blocking(move || {
        committed_offsets(&b, "chaos", "chaos.requests", PARTITIONS).unwrap()
    })
    .await
    .unwrap();
    eprintln!(
        "chaos: kill -9 at {killed_at:?} with {} inputs answered; committed {committed_at_kill:?}",
        outputs.lock().unwrap().len()
    );
    let mut child = spawn_paysync(&config, &log);

    // Until every offset is answered and committed.
    progress(n).await;
    let b = bootstrap.clone();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let b = b.clone();
        let committed = tokio::task::spawn_blocking(move || {
            committed_offsets(&b, "chaos", "chaos.requests", PARTITIONS).unwrap()
        })
        .await
        .unwrap();
        if committed == ends {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed {committed:?}, ends {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Until every chain has ended and every re-check is committed.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ended = {
            let outputs = outputs.lock().unwrap();
            followed
                .iter()
                .filter(|k| outputs.get(k).is_some_and(|o| !o.last.is_empty()))
                .count()
        };
        let b = b.clone();
        let (committed, high) = tokio::task::spawn_blocking(move || {
            let committed =
                committed_offsets(&b, "chaos.recheck.1s", RECHECK_TOPIC, PARTITIONS).unwrap();
            let high = high_watermarks(&b, RECHECK_TOPIC, PARTITIONS);
            (committed, high)
        })
        .await
        .unwrap();
        if ended == followed.len() && committed == high {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ended} of {} chains ended; re-checks committed {committed:?}, ends {high:?}",
            followed.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed();
    // Stop, and give a late duplicate the chance to show up.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_reader.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let notes = reader_notes.lock().unwrap().clone();
    eprintln!("chaos: the reader's offset jumps and errors: {notes:?}");
    assert!(
        !notes.iter().any(|n| n.contains(" jumped from ")),
        "the reader skipped records, so the checks below would be unsound: {notes:?}"
    );

    let outputs = outputs.lock().unwrap();
    // For a chain that ended more than once: its re-check records, to see how.
    let forked: Vec<(i32, i64)> = followed
        .iter()
        .filter(|k| {
            let mut l: Vec<_> = outputs[k].last.clone();
            l.dedup();
            l.len() > 1
        })
        .copied()
        .collect();
    for k in &forked {
        eprintln!("chaos: fork {k:?}: {:?}", outputs[k]);
    }
    if !forked.is_empty() {
        let mut reader = TopicReader::new(&bootstrap, &[(RECHECK_TOPIC, PARTITIONS)]).unwrap();
        for r in reader.read(usize::MAX, Duration::from_secs(5)) {
            let origin = r.header("paysync-follow-origin").unwrap_or_default();
            if forked
                .iter()
                .any(|(p, o)| origin == format!("chaos.requests:{p}:{o}"))
            {
                eprintln!(
                    "chaos: fork {origin}: re-check {}:{} check {:?} scheduled by {:?} due {:?}",
                    r.partition,
                    r.offset,
                    r.header("paysync-follow-check"),
                    r.header("paysync-follow-scheduled-by"),
                    r.header("paysync-follow-due")
                );
            }
        }
    }
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    let mut repeated = 0usize;
    let mut repeated_outputs = 0usize;
    let mut rewritten = 0usize;
    let mut rewritten_notes: Vec<String> = Vec::new();
    let mut chain_ends: BTreeMap<i64, usize> = BTreeMap::new();
    let mut chain_repeats = 0usize;
    for p in 0..PARTITIONS {
        for o in 0..ends[p as usize] {
            let out = outputs
                .get(&(p, o))
                .unwrap_or_else(|| panic!("input {p}:{o} has no output"));
            if followed.contains(&(p, o)) {
                // One last event per origin; a check repeated carries its event_id.
                let mut lasts: Vec<&(i64, String)> = out.last.iter().collect();
                lasts.dedup();
                assert_eq!(
                    lasts.len(),
                    1,
                    "{p}:{o}: the chain ended {} times: {out:?}",
                    lasts.len()
                );
                let end = lasts[0].0;
                let mut by_check: BTreeMap<i64, Vec<&String>> = BTreeMap::new();
                for id in &out.event_ids {
                    by_check.entry(1).or_default().push(id);
                }
                for (k, id) in &out.later {
                    by_check.entry(*k).or_default().push(id);
                }
                for (k, ids) in &by_check {
                    assert!(
                        *k <= end,
                        "{p}:{o}: check {k} after the chain's end at {end}"
                    );
                    assert!(
                        ids.windows(2).all(|w| w[0] == w[1]),
                        "{p}:{o} check {k}: {ids:?}"
                    );
                    chain_repeats += ids.len() - 1;
                }
                assert!(out.dead.is_empty(), "{p}:{o}: {out:?}");
                *chain_ends.entry(end).or_default() += 1;
                continue;
            }
            let count = out.event_ids.len() + out.dead.len();
            assert!(
                out.event_ids.is_empty() || out.dead.is_empty(),
                "{p}:{o} has both an event and a dead letter: {out:?}"
            );
            let hash = out.copies.first().map(|c| c.2);
            let positions: BTreeSet<(i32, i64)> = out.copies.iter().map(|c| (c.0, c.1)).collect();
            if count > 1
                && out.copies.iter().all(|c| Some(c.2) == hash)
                && positions.len() == out.copies.len()
            {
                // The same record written more than once, not a check repeated
                // (a repeated check has its own observed_at): a produce request
                // the mock cluster had appended when the connection dropped, which
                // librdkafka then retried. The mock checks idempotent sequence
                // numbers only for transactional producers; a broker would have
                // discarded the retry. Allowed by at-least-once, counted apart.
                rewritten += 1;
                if rewritten_notes.len() < 5 {
                    rewritten_notes.push(format!("{p}:{o} at {:?}", out.copies));
                }
            } else if count > 1 {
                repeated += 1;
                repeated_outputs += count - 1;
                assert!(
                    o >= committed_at_kill[p as usize].max(0),
                    "{p}:{o} was repeated but was committed before the kill: {out:?}"
                );
                assert!(
                    out.event_ids.windows(2).all(|w| w[0] == w[1]),
                    "{p}:{o} repeated with different event ids: {out:?}"
                );
            }
            if let Some(s) = out.statuses.first() {
                *by_status.entry(s.clone()).or_default() += 1;
            }
            if let Some(d) = out.dead.first() {
                *by_reason.entry(d.clone()).or_default() += 1;
            }
        }
    }
    let total = total_outputs.load(Ordering::Relaxed);
    eprintln!(
        "chaos: {n} requests in {elapsed:?} ({:.0}/s); paysync exit after SIGTERM: {status}",
        n as f64 / elapsed.as_secs_f64()
    );
    eprintln!(
        "chaos: connector calls {} (with retries)",
        connector.calls.load(Ordering::Relaxed)
    );
    eprintln!("chaos: events by status {by_status:?}");
    eprintln!("chaos: dead letters by reason {by_reason:?}");
    eprintln!(
        "chaos: {} chains, each ended once, by check number {chain_ends:?}; {chain_repeats} repeated events of a chain (same event_id)",
        followed.len()
    );
    eprintln!("chaos: {total} outputs; {repeated} inputs answered more than once ({repeated_outputs} extra outputs), all re-delivered after the kill with the same event_id");
    eprintln!("chaos: {rewritten} records written twice byte for byte by a retried produce request (the mock cluster does not deduplicate): {rewritten_notes:?}");
    assert!(status.success(), "SIGTERM exit: {status}");
    assert_eq!(
        by_reason.values().sum::<usize>() + by_status.values().sum::<usize>() + followed.len(),
        n
    );
    assert!(
        by_reason.values().sum::<usize>() >= poison,
        "every poison record dead-lettered"
    );
}

/// Why the chaos run's producer keeps one request in flight: librdkafka's mock
/// cluster checks idempotent sequence numbers only for transactional producers
/// (`rd_kafka_mock_validate_records` returns early without a transactional id),
/// while librdkafka's idempotent producer takes a later request's success as proof
/// that an earlier request with an uncertain outcome (a timeout, a lost
/// connection) was written, and reports its records delivered ("implicit ack").
/// A real broker refuses the later request as out of order; the mock writes it,
/// so the earlier records are reported delivered and are not in the log. With one
/// request in flight there is no later request to ack them.
///
/// If the first assertion fails after a librdkafka upgrade, the mock checks
/// sequences now and the chaos run's limit can go.
#[tokio::test]
#[ignore = "runs with the chaos run: cargo test --release --test chaos -- --ignored"]
async fn mock_cluster_acks_records_it_never_wrote_unless_one_request_is_in_flight() {
    let five = mock_acked_but_absent("5").await;
    assert!(
        five.iter().any(|&(acked, written)| written < acked),
        "no round lost an acknowledged record: {five:?}"
    );
    let one = mock_acked_but_absent("1").await;
    assert!(
        one.iter()
            .all(|&(acked, written)| acked == 201 && written == acked),
        "{one:?}"
    );
}

/// Ten rounds of 201 records to a mock cluster (50 ms round trip, the first
/// request after a warm-up answered REQUEST_TIMED_OUT without being written) with
/// `in_flight` requests per connection: (acknowledged, in the log) per round.
async fn mock_acked_but_absent(in_flight: &str) -> Vec<(i64, i64)> {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    let mut rounds = Vec::new();
    for _ in 0..10 {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        cluster
            .broker_round_trip_time(1, Duration::from_millis(50))
            .unwrap();
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .set("max.in.flight.requests.per.connection", in_flight)
            .create()
            .unwrap();
        // Connected, with a producer id, before the error is armed.
        producer
            .send(
                FutureRecord::<(), _>::to("t").payload("warm-up"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT],
        );
        let sends: Vec<_> = (0..200)
            .map(|i| {
                producer
                    .send_result(FutureRecord::<(), _>::to("t").payload(&format!("r{i}")))
                    .unwrap()
            })
            .collect();
        let mut acked = 1;
        for s in sends {
            if matches!(s.await, Ok(Ok(_))) {
                acked += 1;
            }
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        let (_, written) = tokio::task::spawn_blocking(move || watermarks(&bootstrap, "t", 1)[0])
            .await
            .unwrap();
        rounds.push((acked, written));
    }
    rounds
}
