//! The fakes behave like Apache Kafka where the guarantees depend on it: the
//! same scripts of transactional calls (a record refused when queued, an
//! abort, a fence, a rebuild) run through paysync's `TxnProducer` against the
//! in-memory cluster and against a real broker, and each call's outcome, what
//! a `read_committed` reader sees, and the committed position must agree.

use std::borrow::Cow;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use paysync::pipeline::record::{Destination, Outgoing};
use paysync::pipeline::source::Source;
use paysync::pipeline::txn::{RecordTag, Role, SendError, TxnError, TxnProducer};
use paysync::telemetry::Outcome;

use crate::clients::{Env, SimSource, SimTxnProducer};
use crate::cluster::Cluster;
use crate::faults::Faults;

/// The record limit both sides use (`message.max.bytes`).
const LIMIT: usize = 65_536;

/// One call of a script, on producer 0 or 1 (same transactional id).
#[derive(Debug, Clone, Copy)]
enum Step {
    /// A (new) producer with the script's transactional id.
    Init(usize),
    Begin(usize),
    /// A record with this key and value size.
    Send(usize, &'static str, usize),
    Offsets(usize, i64),
    Commit(usize),
    Abort(usize),
    Rebuild(usize),
}

/// What one call came to, named the same for both sides.
fn name<T>(r: &Result<T, TxnError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(TxnError::Retriable(_)) => "retriable".into(),
        Err(TxnError::Abortable(_)) => "abortable".into(),
        Err(TxnError::Fenced(_)) => "fenced".into(),
        Err(TxnError::Fatal(_)) => "fatal".into(),
    }
}

fn send_name(r: &Result<(), SendError>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(SendError::QueueFull) => "queue full".into(),
        Err(SendError::Refused { too_large, .. }) => format!("refused (too large: {too_large})"),
        Err(SendError::Fatal(_)) => "fatal".into(),
    }
}

fn record(key: &str, size: usize) -> Outgoing {
    Outgoing {
        destination: Destination::Events,
        key: Some(key.as_bytes().to_vec()),
        value: Some(vec![b'v'; size]),
        headers: Vec::new(),
        label: "CHARGED",
        outcome: Outcome::Synced,
        summary: Cow::Borrowed(""),
        milestone: None,
    }
}

fn tag(offset: i64) -> RecordTag {
    RecordTag {
        partition: 0,
        offset,
        role: Role::Event,
    }
}

/// The scripts, each with what a `read_committed` reader then sees (keys)
/// and the committed position.
fn scripts() -> Vec<(&'static str, Vec<Step>)> {
    use Step::*;
    vec![
        (
            "a record refused when queued, an abort, the work redone",
            vec![
                Init(0),
                Begin(0),
                Send(0, "a", 10),
                Send(0, "b", LIMIT + 10_000),
                Abort(0),
                Begin(0),
                Send(0, "c", 10),
                Offsets(0, 3),
                Commit(0),
            ],
        ),
        (
            "an abort keeps the committed position",
            vec![
                Init(0),
                Begin(0),
                Send(0, "a", 10),
                Offsets(0, 2),
                Commit(0),
                Begin(0),
                Send(0, "b", 10),
                Offsets(0, 4),
                Abort(0),
            ],
        ),
        (
            "a fence: another producer with the id takes over",
            vec![
                Init(0),
                Begin(0),
                Send(0, "a", 10),
                Offsets(0, 1),
                Init(1),
                Commit(0),
                Begin(1),
                Send(1, "b", 10),
                Offsets(1, 5),
                Commit(1),
            ],
        ),
        (
            "a rebuild settles what the old producer left open",
            vec![
                Init(0),
                Begin(0),
                Send(0, "a", 10),
                Offsets(0, 1),
                Commit(0),
                Begin(0),
                Send(0, "b", 10),
                Offsets(0, 7),
                Rebuild(0),
                Begin(0),
                Send(0, "c", 10),
                Offsets(0, 2),
                Commit(0),
            ],
        ),
    ]
}

/// What a side did: each call's outcome, the keys read, the position.
type Run = (Vec<String>, Vec<String>, Option<i64>);

async fn play(
    steps: &[Step],
    mut init: impl FnMut(usize) -> Arc<dyn TxnProducer>,
) -> (Vec<String>, Vec<Arc<dyn TxnProducer>>) {
    let mut producers: Vec<Option<Arc<dyn TxnProducer>>> = vec![None, None];
    let mut outcomes = Vec::new();
    let mut offset = 0;
    for step in steps {
        let p = |i: usize, producers: &[Option<Arc<dyn TxnProducer>>]| {
            producers[i].clone().expect("initialized")
        };
        let outcome = match *step {
            Step::Init(i) => {
                producers[i] = Some(init(i));
                "ok".to_owned()
            }
            Step::Begin(i) => name(&p(i, &producers).begin()),
            Step::Send(i, key, size) => {
                offset += 1;
                send_name(&p(i, &producers).send(&record(key, size), tag(offset)))
            }
            Step::Offsets(i, o) => name(&p(i, &producers).send_offsets(&[(0, o)]).await),
            Step::Commit(i) => name(&p(i, &producers).commit().await),
            Step::Abort(i) => name(&p(i, &producers).abort().await),
            Step::Rebuild(i) => name(&p(i, &producers).rebuild().await),
        };
        outcomes.push(format!("{step:?}: {outcome}"));
    }
    (outcomes, producers.into_iter().flatten().collect())
}

/// The scripts against the in-memory cluster.
async fn fake(steps: &[Step], script: usize) -> Run {
    let cluster = Cluster::new(LIMIT, Duration::from_secs(10));
    let input = format!("conf-in-{script}");
    cluster.create_topic(&input, 1);
    cluster.create_topic("events", 1);
    let faults = Arc::new(Faults::new(0, 0.0));
    faults.stop();
    let env = Env {
        refused: Arc::default(),
        cluster: cluster.clone(),
        faults,
        dead: Arc::new(AtomicBool::new(false)),
        events_topic: "events".into(),
        dlq_topic: "dlq".into(),
    };
    let group = format!("conf-{script}");
    let source = SimSource::new(env.clone(), &input, &group, false);
    source.poll();
    let id = format!("conf-{script}");
    let (outcomes, _) = play(steps, |_| {
        Arc::new(SimTxnProducer::new(
            env.clone(),
            &id,
            &input,
            source.clone(),
        ))
    })
    .await;
    let keys = cluster
        .committed_records("events")
        .into_iter()
        .map(|(_, _, r)| String::from_utf8(r.key.unwrap_or_default()).unwrap())
        .collect();
    let position = cluster.committed(&group).get(&0).copied();
    (outcomes, keys, position)
}

/// The scripts against Apache Kafka, through paysync's rdkafka clients.
async fn real(steps: &[Step], script: usize, brokers: &str) -> Run {
    use paysync::kafka::source::KafkaSource;
    use paysync::kafka::transactions::KafkaTxnProducer;
    let run = std::process::id();
    let input = format!("conf-in-{run}-{script}");
    let events = format!("conf-events-{run}-{script}");
    paysync::kafka::admin::create_topics(brokers, &[(&input, 1), (&events, 1)])
        .await
        .expect("topics");
    let group = format!("conf-{run}-{script}");
    let mut consumer = rdkafka::ClientConfig::new();
    consumer
        .set("bootstrap.servers", brokers)
        .set("group.id", &group);
    let source = Arc::new(
        KafkaSource::new(
            &consumer,
            &input,
            false,
            Arc::new(paysync::telemetry::Metrics::new()),
        )
        .expect("consumer"),
    );
    // A member of its group, as paysync's consumer always is when it commits:
    // the positions are fenced by the group's generation.
    let joined = std::time::Instant::now();
    while !source.joined() {
        source.poll();
        assert!(
            joined.elapsed() < Duration::from_secs(60),
            "the consumer did not join"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut producer = rdkafka::ClientConfig::new();
    producer
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", LIMIT.to_string());
    let id = format!("conf-{run}-{script}");
    let make = |_: usize| -> Arc<dyn TxnProducer> {
        let (producer, id, input, events) =
            (producer.clone(), id.clone(), input.clone(), events.clone());
        let weak = Arc::downgrade(source.consumer());
        Arc::new(
            std::thread::spawn(move || {
                KafkaTxnProducer::start(
                    &producer,
                    &id,
                    weak,
                    &input,
                    &events,
                    "unused-dlq",
                    Duration::from_secs(30),
                )
            })
            .join()
            .unwrap()
            .expect("transactional producer"),
        )
    };
    let (outcomes, _producers) = play(steps, make).await;
    let expected = steps.iter().filter(|s| matches!(s, Step::Send(..))).count();
    let brokers = brokers.to_owned();
    let keys = tokio::task::spawn_blocking(move || {
        let mut reader =
            paysync::kafka::tools::TopicReader::new(&brokers, &[(events.as_str(), 1)]).unwrap();
        reader
            .read(expected, Duration::from_secs(5))
            .into_iter()
            .map(|r| String::from_utf8(r.key.unwrap_or_default()).unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let position = source
        .committed(&[0])
        .await
        .expect("committed")
        .first()
        .map(|(_, o)| *o);
    (outcomes, keys, position)
}

/// Each script's expected reader view and position.
fn expected(script: usize) -> (Vec<&'static str>, Option<i64>) {
    match script {
        0 => (vec!["c"], Some(3)),
        1 => (vec!["a"], Some(2)),
        2 => (vec!["b"], Some(5)),
        _ => (vec!["a", "c"], Some(2)),
    }
}

#[test]
fn the_fake_cluster_keeps_the_scripts_promises() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    for (i, (what, steps)) in scripts().iter().enumerate() {
        let (outcomes, keys, position) = runtime.block_on(fake(steps, i));
        let (want_keys, want_position) = expected(i);
        assert_eq!(keys, want_keys, "{what}: {outcomes:#?}");
        assert_eq!(position, want_position, "{what}: {outcomes:#?}");
    }
}

#[test]
#[ignore = "needs Apache Kafka (PAYSYNC_TEST_BROKERS); CI runs it with --ignored"]
fn the_fake_cluster_and_apache_kafka_agree() {
    let brokers = std::env::var("PAYSYNC_TEST_BROKERS").expect("PAYSYNC_TEST_BROKERS");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let paused = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    for (i, (what, steps)) in scripts().iter().enumerate() {
        let on_kafka = runtime.block_on(real(steps, i, &brokers));
        let in_memory = paused.block_on(fake(steps, i));
        assert_eq!(
            in_memory, on_kafka,
            "{what}: the fake differs from Apache Kafka"
        );
        let (want_keys, want_position) = expected(i);
        assert_eq!(on_kafka.1, want_keys, "{what}");
        assert_eq!(on_kafka.2, want_position, "{what}");
    }
}
