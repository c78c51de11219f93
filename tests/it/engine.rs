//! The concurrency engine end to end: per-key order under concurrency, a hot key
//! that does not starve other partitions, the in-flight bound, shutdown with work
//! in flight, and a consumer group that loses a member mid-stream.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use paysync::codec::avro::decode_event_json;
use paysync::demo::simulator::{Latency, SimOptions};
use paysync::kafka::tools::{committed_offsets, RawProducer, RawRecord};
use paysync::telemetry::sum_metric;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(90);

fn event(r: &RawRecord) -> serde_json::Value {
    decode_event_json(r.value.as_deref().unwrap()).unwrap()
}

/// The source offset of an event, from its default request id `<topic>:<p>:<o>`.
fn source(json: &serde_json::Value) -> (i32, i64) {
    let rid = json["request_id"].as_str().unwrap();
    let mut parts = rid.rsplitn(3, ':');
    let o = parts.next().unwrap().parse().unwrap();
    let p = parts.next().unwrap().parse().unwrap();
    (p, o)
}

async fn send_to(producer: &RawProducer, topic: &str, partition: i32, id: &str) -> (i32, i64) {
    let value = format!(r#"{{"connector_transaction_id":"{id}"}}"#);
    producer
        .send(
            topic,
            Some(partition),
            Some(id.as_bytes()),
            Some(value.as_bytes()),
            &[],
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_one_payment_are_published_in_offset_order_under_concurrency() {
    let broker = Broker::new();
    let t = broker.topics("order", 1).await;
    // Latency varies per call, so later requests often finish first if allowed to.
    let latency = Latency::Normal {
        mean: Duration::from_millis(8),
        stddev: Duration::from_millis(6),
    };
    let sim = simulator(SimOptions {
        latency,
        ..Default::default()
    })
    .await;
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    let ids: Vec<String> = (0..10).map(|i| format!("success-order-{i}")).collect();
    let n = 300;
    for i in 0..n {
        send_to(&producer, &t.input, 0, &ids[i % ids.len()]).await;
    }
    let extra =
        "[processing]\nmax_in_flight = 64\nmax_queued_per_key = 64\nshutdown_timeout = \"10s\"\n";
    let s = paysync::config::Settings::from_toml(
        &settings_toml(
            broker.bootstrap(),
            &t,
            &sim.base_url(),
            "127.0.0.1:0".parse().unwrap(),
            "",
        )
        .replace("[processing]\nshutdown_timeout = \"10s\"\n", extra),
    )
    .unwrap();
    assert_eq!(s.processing.max_in_flight, 64);
    let app = paysync::app::start(s).await.unwrap();
    let records = read_outputs(broker.bootstrap(), &t, n, WAIT).await;
    assert_eq!(records.len(), n);
    // Events of one payment share an output partition; read order is publish order.
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in &records {
        let json = event(r);
        let id = json["connector_transaction_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (_, offset) = source(&json);
        if let Some(prev) = last.insert(id.clone(), offset) {
            assert!(
                prev < offset,
                "{id}: offset {offset} published after {prev}"
            );
        }
    }
    assert!(
        sim.max_concurrency() > 1,
        "requests for different payments ran concurrently"
    );
    assert!(
        sim.max_concurrency() <= ids.len() as u64,
        "never two calls for one payment at once"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_payment_does_not_starve_other_partitions() {
    let broker = Broker::new();
    let t = broker.topics("hot", 2).await;
    let sim = simulator(SimOptions {
        latency: Latency::Fixed(Duration::from_millis(20)),
        ..Default::default()
    })
    .await;
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    // 150 requests for one payment in partition 0 (about 3 s when served one by one)...
    for _ in 0..150 {
        send_to(&producer, &t.input, 0, "success-hot").await;
    }
    // ...and 100 different payments in partition 1.
    for i in 0..100 {
        send_to(&producer, &t.input, 1, &format!("success-cold-{i}")).await;
    }
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), ""))
        .await
        .unwrap();
    let records = read_outputs(broker.bootstrap(), &t, 250, WAIT).await;
    assert_eq!(records.len(), 250);
    let mut hot = Vec::new();
    let mut cold = Vec::new();
    for r in &records {
        let json = event(r);
        let at = json["observed_at"].as_i64().unwrap();
        if json["connector_transaction_id"] == "success-hot" {
            hot.push(at);
        } else {
            cold.push(at);
        }
    }
    let cold_done = *cold.iter().max().unwrap();
    let hot_before = hot.iter().filter(|at| **at <= cold_done).count();
    assert!(
        hot_before < 75,
        "all other payments finished while the hot one was at {hot_before}/150"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_bound_is_never_exceeded() {
    let broker = Broker::new();
    let t = broker.topics("bound", 3).await;
    let sim = simulator(SimOptions {
        latency: Latency::Fixed(Duration::from_millis(15)),
        ..Default::default()
    })
    .await;
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    let n = 300;
    for i in 0..n {
        send_to(
            &producer,
            &t.input,
            (i % 3) as i32,
            &format!("success-bound-{i}"),
        )
        .await;
    }
    let mut s = settings(broker.bootstrap(), &t, &sim.base_url(), "");
    s.processing.max_in_flight = 5;
    let app = paysync::app::start(s).await.unwrap();
    // Watch the gauge while the backlog drains.
    let metrics = app.metrics();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(metrics.in_flight());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            max
        })
    };
    let records = read_outputs(broker.bootstrap(), &t, n, WAIT).await;
    stop.store(true, Ordering::Relaxed);
    let max_gauge = watcher.await.unwrap();
    assert_eq!(records.len(), n);
    assert!(max_gauge <= 5, "paysync_in_flight reached {max_gauge}");
    assert_eq!(
        max_gauge, 5,
        "the bound was reached (so the check means something)"
    );
    assert!(
        sim.max_concurrency() <= 5,
        "the connector saw {} concurrent calls",
        sim.max_concurrency()
    );
    app.stop().await;
}

/// Backpressure: with a slow connector and a small in-flight bound, a backlog of
/// 20,000 requests stays in the broker. The client's per-partition queue holds at
/// most its configured bound plus one fetch; the consumer stays in its group.
///
/// Needs a broker that honours the fetch size limits (`max.partition.fetch.bytes`,
/// `fetch.max.bytes`): Apache Kafka and the mock cluster do (tansu 0.6.0 answered
/// one fetch with the whole backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_stays_in_the_broker() {
    let broker = Broker::new();
    let t = broker.topics("backlog", 1).await;
    let sim = simulator(SimOptions {
        latency: Latency::Fixed(Duration::from_millis(100)),
        ..Default::default()
    })
    .await;
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    let n = 20_000;
    let ids: Vec<String> = (0..n).map(|i| format!("success-backlog-{i}")).collect();
    for chunk in ids.chunks(1000) {
        let sends = chunk.iter().map(|id| send_to(&producer, &t.input, 0, id));
        futures::future::join_all(sends).await;
    }
    let mut s = settings(broker.bootstrap(), &t, &sim.base_url(), "");
    s.processing.max_in_flight = 4;
    for (k, v) in [
        ("queued.min.messages", "100"),
        ("queued.max.messages.kbytes", "64"),
        ("max.partition.fetch.bytes", "16384"),
        ("statistics.interval.ms", "1000"),
    ] {
        s.kafka.consumer.0.insert(k.to_owned(), v.to_owned());
    }
    let app = paysync::app::start(s).await.unwrap();
    let metrics = app.metrics();
    let deadline = std::time::Instant::now() + WAIT;
    let mut samples = Vec::new();
    while samples.len() < 5 {
        assert!(std::time::Instant::now() < deadline, "no statistics");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let text = metrics.render();
        let lag = sum_metric(&text, "paysync_consumer_lag", &[]);
        if lag > 0.0 {
            let prefetched = sum_metric(&text, "paysync_consumer_prefetched_messages", &[]);
            samples.push((prefetched, lag, metrics.in_flight()));
        }
    }
    for (prefetched, lag, in_flight) in &samples {
        assert!(*in_flight <= 4);
        assert!(
            *lag > 15_000.0,
            "the backlog is still in the broker: lag {lag}"
        );
        // 100 messages or 64 KiB queued, plus one fetch; a fetch returns whole
        // producer batches, and the requests were produced 1,000 at a time, so a
        // fetch can bring up to about 1,000 at once (seen: 968).
        assert!(
            *prefetched <= 2_000.0,
            "the client queue stays bounded: {prefetched} prefetched"
        );
    }
    assert!(
        samples.iter().any(|(p, _, _)| *p > 0.0),
        "the client did prefetch (the gauge is live): {samples:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_work_and_commits_it() {
    let broker = Broker::new();
    let t = broker.topics("drain", 2).await;
    let sim = simulator(SimOptions {
        latency: Latency::Fixed(Duration::from_millis(400)),
        ..Default::default()
    })
    .await;
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    let n = 40;
    let mut ends = [0i64; 2];
    for i in 0..n {
        let (p, o) = send_to(
            &producer,
            &t.input,
            (i % 2) as i32,
            &format!("success-drain-{i}"),
        )
        .await;
        ends[p as usize] = ends[p as usize].max(o + 1);
    }
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), ""))
        .await
        .unwrap();
    let metrics = app.metrics();
    let deadline = std::time::Instant::now() + WAIT;
    while metrics.in_flight() < n as i64 {
        assert!(
            std::time::Instant::now() < deadline,
            "work never got in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Everything is in flight (each call takes 400 ms): stop now.
    app.stop().await;
    let records = read_outputs(broker.bootstrap(), &t, n, Duration::from_secs(10)).await;
    assert_eq!(records.len(), n, "in-flight work was finished, not dropped");
    let committed = committed_offsets(broker.bootstrap(), &t.group, &t.input, 2).unwrap();
    assert_eq!(committed, ends.to_vec(), "and committed before leaving");
}

/// Loads `n` requests for distinct payments round-robin over 4 partitions; returns
/// their (partition, offset).
async fn load_spread(broker: &Broker, t: &Topics, n: usize, tag: &str) -> HashSet<(i32, i64)> {
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    let mut inputs = HashSet::new();
    for i in 0..n {
        inputs.insert(
            send_to(
                &producer,
                &t.input,
                (i % 4) as i32,
                &format!("success-{tag}-{i}"),
            )
            .await,
        );
    }
    inputs
}

/// Two paysync processes in one group over 4 partitions with 400 queued requests,
/// each with an in-flight bound of 2, both already processing.
struct TwoMembers {
    t: Topics,
    inputs: HashSet<(i32, i64)>,
    n: usize,
    a: Process,
    b: Process,
    _sim: paysync::demo::simulator::Simulator,
}

impl TwoMembers {
    async fn start(broker: &Broker, tag: &str) -> TwoMembers {
        let t = broker.topics(tag, 4).await;
        let sim = simulator(SimOptions {
            latency: Latency::Fixed(Duration::from_millis(10)),
            ..Default::default()
        })
        .await;
        let n = 400;
        let inputs = load_spread(broker, &t, n, tag).await;
        let slow = [("PAYSYNC_PROCESSING__MAX_IN_FLIGHT", "2")];
        let a = Process::spawn_env(broker.bootstrap(), &t, &sim.base_url(), &slow);
        let b = Process::spawn_env(broker.bootstrap(), &t, &sim.base_url(), &slow);
        a.wait_ready(WAIT).await;
        b.wait_ready(WAIT).await;
        // Both members must own partitions and be working before one goes.
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let done = |m: &str| sum_metric(m, "paysync_requests_total", &[]);
            if done(&a.metrics().await) > 0.0 && done(&b.metrics().await) > 0.0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "both members never got work"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        TwoMembers {
            t,
            inputs,
            n,
            a,
            b,
            _sim: sim,
        }
    }
}

/// The takeover after a hard kill depends on the broker expiring the dead member's
/// session: Apache Kafka and the mock cluster do (tansu 0.6.0 kept a SIGKILLed
/// member in the group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_one_killed_mid_stream_nothing_is_lost() {
    let broker = Broker::new();
    let group = TwoMembers::start(&broker, "group").await;
    let TwoMembers {
        t,
        inputs,
        n,
        mut a,
        b,
        _sim,
    } = group;
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10));
    let records =
        read_outputs_settled(broker.bootstrap(), &t, n, WAIT, Duration::from_secs(2)).await;
    let mut ids: HashMap<(i32, i64), HashSet<String>> = HashMap::new();
    for r in &records {
        let json = event(r);
        ids.entry(source(&json))
            .or_default()
            .insert(json["event_id"].as_str().unwrap().to_owned());
    }
    let covered: HashSet<(i32, i64)> = ids.keys().copied().collect();
    if covered != inputs {
        let missing: Vec<_> = inputs.difference(&covered).collect();
        let log = b.log();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!(
            "{} inputs have no event (e.g. {:?}); survivor log tail:\n{}",
            missing.len(),
            &missing[..missing.len().min(5)],
            tail.join("\n")
        );
    }
    assert!(
        ids.values().all(|s| s.len() == 1),
        "repeats carry the same event_id"
    );
    eprintln!(
        "group test: {} records for {n} inputs ({} repeated)",
        records.len(),
        records.len() - n
    );
}

/// On a broker that accepts commits during a rebalance (Kafka, tansu) a graceful
/// handover repeats nothing; on the mock cluster see the comment below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_one_stopped_mid_stream_hands_over_without_loss_or_repeats() {
    let broker = Broker::new();
    let group = TwoMembers::start(&broker, "handover").await;
    let TwoMembers {
        t,
        inputs,
        n,
        mut a,
        b: _b,
        _sim,
    } = group;
    a.signal("TERM");
    assert_eq!(
        a.wait_exit(Duration::from_secs(30)).code(),
        Some(0),
        "log:\n{}",
        a.log()
    );
    let records =
        read_outputs_settled(broker.bootstrap(), &t, n, WAIT, Duration::from_secs(2)).await;
    let sources: Vec<(i32, i64)> = records.iter().map(|r| source(&event(r))).collect();
    let covered: HashSet<(i32, i64)> = sources.iter().copied().collect();
    assert_eq!(
        covered, inputs,
        "every input has an event after the handover"
    );
    if broker.is_mock() {
        // librdkafka's mock cluster rejects the surviving member's commit inside its
        // revocation callback with REBALANCE_IN_PROGRESS (Kafka and tansu accept
        // commits from the current generation while a rebalance is prepared), so
        // the survivor's last uncommitted work is redone: the same events again.
        let mut ids: HashMap<(i32, i64), HashSet<String>> = HashMap::new();
        for r in &records {
            let json = event(r);
            ids.entry(source(&json))
                .or_default()
                .insert(json["event_id"].as_str().unwrap().to_owned());
        }
        assert!(
            ids.values().all(|s| s.len() == 1),
            "repeats carry the same event_id"
        );
    } else {
        assert_eq!(
            sources.len(),
            n,
            "a graceful handover repeats nothing: done work was committed before the partitions moved"
        );
    }
}

/// Hot payments under a saturated in-flight bound: half of 2,000 requests go to
/// three payments, so their per-key queues fill and their partitions wait for
/// admission again and again while other partitions keep going. Every offset must
/// yield exactly one event, and each payment's events must follow offset order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_payments_under_saturation_lose_repeat_and_reorder_nothing() {
    let broker = Broker::new();
    let t = broker.topics("hotsat", 4).await;
    let sim = simulator(SimOptions {
        latency: Latency::Normal {
            mean: Duration::from_millis(3),
            stddev: Duration::from_millis(2),
        },
        ..Default::default()
    })
    .await;
    let n = 2000;
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let ids: Vec<String> = (0..n)
        .map(|i| match rng.u8(0..6) {
            0 => "success-hot-a".to_owned(),
            1 => "success-hot-b".to_owned(),
            2 => "success-hot-c".to_owned(),
            _ => format!("success-cold-{i}"),
        })
        .collect();
    let mut inputs = HashSet::new();
    // Each payment lives in one partition, as when producers key by payment id.
    let partition_of = |i: usize, id: &str| match id {
        "success-hot-a" => 0,
        "success-hot-b" | "success-hot-c" => 1,
        _ => (i % 4) as i32,
    };
    let numbered: Vec<(usize, &String)> = ids.iter().enumerate().collect();
    for chunk in numbered.chunks(200) {
        let sends = chunk
            .iter()
            .map(|(i, id)| send_to(&producer, &t.input, partition_of(*i, id), id));
        inputs.extend(futures::future::join_all(sends).await);
    }
    assert_eq!(inputs.len(), n);
    let mut s = settings(broker.bootstrap(), &t, &sim.base_url(), "");
    s.processing.max_in_flight = 16;
    s.processing.max_queued_per_key = 4;
    let app = paysync::app::start(s).await.unwrap();
    let records =
        read_outputs_settled(broker.bootstrap(), &t, n, WAIT, Duration::from_secs(2)).await;
    let events: Vec<serde_json::Value> = records.iter().map(event).collect();
    let sources: Vec<(i32, i64)> = events.iter().map(source).collect();
    let covered: HashSet<(i32, i64)> = sources.iter().copied().collect();
    let missing: Vec<_> = inputs.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "{} offsets never produced an event, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(sources.len(), n, "no offset repeated");
    // The output topic has one partition per payment key's hash; events of one
    // payment share a key, so their order in the output is their publish order.
    let mut last: HashMap<String, (i32, i64)> = HashMap::new();
    for (json, src) in events.iter().zip(&sources) {
        let id = json["connector_transaction_id"]
            .as_str()
            .unwrap()
            .to_owned();
        if let Some(prev) = last.insert(id.clone(), *src) {
            assert!(prev < *src, "{id}: {src:?} published after {prev:?}");
        }
    }
    assert!(
        sim.max_concurrency() <= 16,
        "the connector saw {} concurrent calls",
        sim.max_concurrency()
    );
    app.stop().await;
}
