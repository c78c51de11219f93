//! Follow mode end to end: chains to a final status, chains that run out, failed
//! checks inside a chain, re-checks never taken before they are due, a kill -9
//! with re-checks pending, and memory with 100,000 pending re-checks.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use paysync::codec::avro::decode_event_json;
use paysync::demo::simulator::SimOptions;
use paysync::domain::event::check_event_id;
use paysync::kafka::tools::{committed_offsets, RawProducer, RawRecord};
use paysync::telemetry::sum_metric;
use serde_json::Value;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(90);

/// Unique topics plus the re-check topic of each delay (seconds) in `delays`.
async fn follow_topics(broker: &Broker, test: &str, delays: &[u64]) -> Topics {
    let t = broker.topics(test, 2).await;
    let names: Vec<String> = delays
        .iter()
        .map(|d| format!("{}.recheck.{d}s", t.input))
        .collect();
    let specs: Vec<(&str, i32)> = names.iter().map(|n| (n.as_str(), 2)).collect();
    broker.create(&specs).await;
    t
}

fn follow_table(schedule: &str, publish: &str) -> String {
    format!("[connectors.cm.follow]\nschedule = {schedule}\npublish = \"{publish}\"\n")
}

async fn send(broker: &Broker, t: &Topics, id: &str, follow: bool) -> (i32, i64) {
    let value = format!(r#"{{"connector_transaction_id":"{id}","follow":{follow}}}"#);
    send_request(broker.bootstrap(), &t.input, id, &value).await
}

/// The events of one transaction, in the order published.
fn events_of(records: &[RawRecord], t: &Topics, id: &str) -> Vec<Value> {
    let mut events: Vec<Value> = records
        .iter()
        .filter(|r| r.topic == t.output)
        .map(|r| decode_event_json(r.value.as_deref().unwrap()).unwrap())
        .filter(|e| e["connector_transaction_id"] == id)
        .collect();
    events.sort_by_key(|e| e["check_number"].as_i64().unwrap());
    events
}

fn summary(events: &[Value]) -> Vec<(i64, String, bool, bool)> {
    events
        .iter()
        .map(|e| {
            (
                e["check_number"].as_i64().unwrap(),
                e["status"].as_str().unwrap().to_owned(),
                e["is_final"].as_bool().unwrap(),
                !e["next_check_at"].is_null(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_follows_a_payment_to_its_final_status() {
    let broker = Broker::new();
    let t = follow_topics(&broker, "follow-final", &[1]).await;
    let sim = simulator(SimOptions {
        progress_step: Duration::from_millis(2500),
        ..Default::default()
    })
    .await;
    let extra = follow_table(r#"[["1s", 20]]"#, "changes");
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), &extra))
        .await
        .unwrap();
    let (p, o) = send(&broker, &t, "progress-f1", true).await;
    // OPEN, then AUTHORIZED after 2.5 s, then SUCCESS after 5 s: three changes.
    let records = read_outputs(broker.bootstrap(), &t, 3, WAIT).await;
    let events = events_of(&records, &t, "progress-f1");
    let s = summary(&events);
    assert_eq!(s.len(), 3, "{s:?}");
    assert_eq!(
        (s[0].0, s[0].1.as_str(), s[0].2, s[0].3),
        (1, "STARTED", false, true)
    );
    assert_eq!(
        (s[1].1.as_str(), s[1].2, s[1].3),
        ("AUTHORIZED", false, true)
    );
    assert_eq!(
        (s[2].1.as_str(), s[2].2, s[2].3),
        ("CHARGED", true, false),
        "final ends the chain"
    );
    assert!(s[0].0 < s[1].0 && s[1].0 < s[2].0);
    for e in &events {
        let k = e["check_number"].as_i64().unwrap() as u32;
        assert_eq!(e["event_id"], check_event_id(&t.input, p, o, k).as_str());
        assert_eq!(
            e["request_id"],
            format!("{}:{p}:{o}", t.input).as_str(),
            "the chain keeps its request id"
        );
    }
    // Nothing after the final status.
    let later = read_outputs_settled(broker.bootstrap(), &t, 3, WAIT, Duration::from_secs(3)).await;
    assert_eq!(events_of(&later, &t, "progress-f1").len(), 3);
    let text = app.metrics().render();
    assert_eq!(
        sum_metric(
            &text,
            "paysync_chains_ended_total",
            &[("connector", "cm"), ("outcome", "final")]
        ),
        1.0
    );
    assert!(
        sum_metric(
            &text,
            "paysync_rechecks_scheduled_total",
            &[("delay", "1s")]
        ) >= 4.0
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_that_runs_out_ends_with_its_last_check_published() {
    let broker = Broker::new();
    let sim = simulator(SimOptions::default()).await;
    for (publish, want) in [("changes", 2), ("every_check", 3)] {
        let t = follow_topics(&broker, "follow-out", &[1]).await;
        let extra = follow_table(r#"[["1s", 2]]"#, publish);
        let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), &extra))
            .await
            .unwrap();
        let id = format!("open-out-{publish}");
        send(&broker, &t, &id, true).await;
        let records = read_outputs_settled(
            broker.bootstrap(),
            &t,
            usize::MAX,
            Duration::from_secs(8),
            Duration::ZERO,
        )
        .await;
        let s = summary(&events_of(&records, &t, &id));
        assert_eq!(s.len(), want, "{publish}: {s:?}");
        let last = s.last().unwrap();
        assert_eq!(
            (last.0, last.1.as_str(), last.2, last.3),
            (3, "STARTED", false, false),
            "{publish}: gave up, not final"
        );
        if publish == "changes" {
            assert_eq!(s[0].0, 1, "the first check is published");
        }
        let text = app.metrics().render();
        assert_eq!(
            sum_metric(
                &text,
                "paysync_chains_ended_total",
                &[("outcome", "exhausted")]
            ),
            1.0,
            "{text}"
        );
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_checks_inside_a_chain_publish_nothing_and_a_failed_last_check_is_published() {
    let broker = Broker::new();
    let t = follow_topics(&broker, "follow-fail", &[1]).await;
    let sim = simulator(SimOptions {
        progress_step: Duration::from_millis(1500),
        ..Default::default()
    })
    .await;
    let extra = follow_table(r#"[["1s", 3]]"#, "every_check");
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), &extra))
        .await
        .unwrap();
    // 404 for 1.5 s, then paid: the first checks fail silently, then CHARGED.
    send(&broker, &t, "notyet-f1", true).await;
    // 404 forever: silent until the last slot, which publishes the failure.
    send(&broker, &t, "notfound-f2", true).await;
    let records =
        read_outputs_settled(broker.bootstrap(), &t, 2, WAIT, Duration::from_secs(2)).await;
    let notyet = summary(&events_of(&records, &t, "notyet-f1"));
    assert_eq!(notyet.len(), 1, "{notyet:?}");
    assert_eq!(
        (notyet[0].1.as_str(), notyet[0].2, notyet[0].3),
        ("CHARGED", true, false)
    );
    assert!(notyet[0].0 >= 2, "the failed first check published nothing");
    let notfound = events_of(&records, &t, "notfound-f2");
    let s = summary(&notfound);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(
        (s[0].0, s[0].1.as_str(), s[0].2, s[0].3),
        (4, "PAYMENT_STATUS_UNSPECIFIED", false, false)
    );
    assert_eq!(
        notfound[0]["error"]["unified_details"]["code"],
        "TRANSACTION_NOT_FOUND"
    );
    assert!(
        records.iter().all(|r| r.topic != t.output
            || decode_event_json(r.value.as_deref().unwrap()).unwrap()["status"] != "FAILURE"),
        "a technical failure never becomes FAILURE"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recheck_is_never_taken_before_it_is_due_and_a_request_without_follow_is_checked_once() {
    let broker = Broker::new();
    let t = follow_topics(&broker, "follow-due", &[2]).await;
    let sim = simulator(SimOptions {
        progress_step: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    let extra = follow_table(r#"[["2s", 3]]"#, "every_check");
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), &extra))
        .await
        .unwrap();
    send(&broker, &t, "progress-due", true).await;
    send(&broker, &t, "progress-once", false).await;
    let records =
        read_outputs_settled(broker.bootstrap(), &t, 5, WAIT, Duration::from_secs(3)).await;
    let events = events_of(&records, &t, "progress-due");
    assert_eq!(events.len(), 4, "{:?}", summary(&events));
    // Every call of the chain came no earlier than the due time the previous
    // check announced (next_check_at).
    let calls = sim.timeline("progress-due");
    assert_eq!(calls.len(), 4);
    for (k, pair) in events.windows(2).enumerate() {
        let due = pair[0]["next_check_at"].as_i64().unwrap();
        let called = calls[k + 1]
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!(
            called >= due,
            "check {} called {} ms before due",
            k + 2,
            due - called
        );
    }
    let once = summary(&events_of(&records, &t, "progress-once"));
    assert_eq!(
        once,
        vec![(1, "STARTED".to_owned(), false, false)],
        "not followed"
    );
    let text = app.metrics().render();
    assert_eq!(
        sum_metric(&text, "paysync_recheck_lateness_seconds_count", &[]),
        3.0,
        "three re-checks taken"
    );
    app.stop().await;
}

/// Needs a broker that expires a killed member's session (Apache Kafka, the mock
/// cluster; tansu 0.6.0 kept a killed member in its group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_rechecks_pending_loses_no_chain() {
    let broker = Broker::new();
    let t = follow_topics(&broker, "follow-kill", &[1]).await;
    let sim = simulator(SimOptions {
        progress_step: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    let extra = follow_table(r#"[["1s", 12]]"#, "changes");
    let mut first = Process::spawn(broker.bootstrap(), &t, &sim.base_url(), &extra);
    first.wait_ready(WAIT).await;
    let n = 20;
    let mut origins = BTreeMap::new();
    for i in 0..n {
        let id = format!("progress-k{i}");
        origins.insert(send(&broker, &t, &id, true).await, id);
    }
    // Every chain has published its first check: re-checks are pending in Kafka.
    read_outputs(broker.bootstrap(), &t, n, WAIT).await;
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10));
    let second = Process::spawn(broker.bootstrap(), &t, &sim.base_url(), &extra);
    // Each chain ends exactly once: one final event per origin.
    let deadline = std::time::Instant::now() + WAIT;
    let records = loop {
        let records = read_outputs_settled(
            broker.bootstrap(),
            &t,
            usize::MAX,
            Duration::from_secs(3),
            Duration::ZERO,
        )
        .await;
        let finals = records
            .iter()
            .filter(|r| r.topic == t.output)
            .map(|r| decode_event_json(r.value.as_deref().unwrap()).unwrap())
            .filter(|e| e["next_check_at"].is_null())
            .count();
        if finals >= n || std::time::Instant::now() > deadline {
            break records;
        }
    };
    let mut last_events: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    let mut by_id: BTreeMap<(String, i64), std::collections::BTreeSet<String>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.topic == t.output) {
        let e = decode_event_json(r.value.as_deref().unwrap()).unwrap();
        let id = e["connector_transaction_id"].as_str().unwrap().to_owned();
        by_id
            .entry((id.clone(), e["check_number"].as_i64().unwrap()))
            .or_default()
            .insert(e["event_id"].as_str().unwrap().to_owned());
        if e["next_check_at"].is_null() {
            assert_eq!(e["status"], "CHARGED", "{id} ended final");
            last_events
                .entry(id)
                .or_default()
                .insert(e["event_id"].as_str().unwrap().to_owned());
        }
    }
    let text = second.metrics().await;
    eprintln!(
        "after the kill: {} repeated checks skipped",
        sum_metric(&text, "paysync_follow_checks_skipped_total", &[])
    );
    assert_eq!(last_events.len(), n, "every chain ended");
    assert!(
        last_events.values().all(|ids| ids.len() == 1),
        "one last event per chain (a repeat carries the same event_id)"
    );
    assert!(
        by_id.values().all(|ids| ids.len() == 1),
        "a check repeated after the kill carries the same event_id"
    );
    drop(second);
    let committed =
        committed_offsets(broker.bootstrap(), &t.group, &t.input, t.partitions).unwrap();
    assert!(committed.iter().all(|c| *c >= 0));
    assert_eq!(origins.len(), n);
}

/// 100,000 re-checks pending (due in an hour; eight partitions, since the mock
/// cluster keeps about 5 MB per partition; the broker must honour the fetch size
/// limits, see `engine::a_large_backlog_stays_in_the_broker`):
/// they stay in the broker, the process stays small, nothing is taken early, and
/// waiting is not stalling: new requests are served and `/readyz` stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_with_100_000_pending_rechecks() {
    let broker = Broker::new();
    // Eight partitions: the mock cluster keeps about 5 MB per partition.
    let t = broker.topics("follow-mem", 2).await;
    let recheck = format!("{}.recheck.3600s", t.input);
    broker.create(&[(&recheck, 8)]).await;
    let sim = simulator(SimOptions::default()).await;
    let extra = follow_table(r#"[["3600s", 1]]"#, "changes");
    let env = [
        ("PAYSYNC_PROCESSING__STUCK_AFTER", "2s"),
        ("PAYSYNC_KAFKA__CONSUMER__STATISTICS_INTERVAL_MS", "1000"),
    ];
    // A baseline: the same process with nothing pending.
    let baseline = Process::spawn_full(broker.bootstrap(), &t, &sim.base_url(), &extra, &env);
    baseline.wait_ready(WAIT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (baseline_rss, _) = baseline.usage();
    drop(baseline);

    let n: usize = 100_000;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (first_seen, due) = (now.to_string(), (now + 3_600_000).to_string());
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    for i in 0..n {
        let id = format!("progress-mem-{i}");
        let value = format!(r#"{{"connector_transaction_id":"{id}","follow":true}}"#);
        let origin = format!("{}:{}:{i}", t.input, i % 2);
        let headers: [(&[u8], Option<&[u8]>); 4] = [
            (b"paysync-follow-origin", Some(origin.as_bytes())),
            (b"paysync-follow-check", Some(b"2")),
            (b"paysync-follow-first-seen", Some(first_seen.as_bytes())),
            (b"paysync-follow-due", Some(due.as_bytes())),
        ];
        producer
            .enqueue_raw(
                &recheck,
                None,
                Some(id.as_bytes()),
                Some(value.as_bytes()),
                &headers,
            )
            .unwrap();
    }
    producer.flush(WAIT).unwrap();

    let paysync = Process::spawn_full(broker.bootstrap(), &t, &sim.base_url(), &extra, &env);
    paysync.wait_ready(WAIT).await;
    let deadline = std::time::Instant::now() + WAIT;
    let pending = loop {
        let text = paysync.metrics().await;
        let pending = sum_metric(&text, "paysync_pending_rechecks", &[("topic", &recheck)]);
        if pending >= n as f64 || std::time::Instant::now() > deadline {
            break pending;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(pending, n as f64, "every re-check counted as pending");
    // A new request is served while the re-checks wait, past `stuck_after`.
    tokio::time::sleep(Duration::from_secs(3)).await;
    send(&broker, &t, "paid-mem", false).await;
    let records = read_outputs(broker.bootstrap(), &t, 1, WAIT).await;
    assert_eq!(events_of(&records, &t, "paid-mem").len(), 1);
    let ready = reqwest::get(format!("http://{}/readyz", paysync.http))
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "waiting for a due time is not stalling"
    );
    let text = paysync.metrics().await;
    let prefetched = sum_metric(
        &text,
        "paysync_consumer_prefetched_messages",
        &[("topic", &recheck)],
    );
    let stuck = sum_metric(
        &text,
        "paysync_commit_watermark_stuck_seconds",
        &[("topic", &recheck)],
    );
    let (rss, _) = paysync.usage();
    eprintln!(
        "{n} pending re-checks: peak RSS {rss:.1} MiB (idle {baseline_rss:.1} MiB), {prefetched} prefetched"
    );
    assert_eq!(
        stuck, 0.0,
        "a head that is not due is not a stuck watermark"
    );
    assert_eq!(
        sim.status_requests(),
        1,
        "no re-check taken before it is due"
    );
    // The client queue holds at most about 1.25 MiB per partition (1 MiB queued
    // plus one 256 KiB fetch: some 4,400 re-check records of ~300 bytes), not
    // the 100,000. Seen: 17,121 over 8 partitions, peak RSS +10 MiB.
    assert!(
        prefetched <= 8.0 * 4_400.0,
        "{prefetched} re-checks prefetched"
    );
    assert!(
        rss < baseline_rss + 32.0,
        "peak RSS {rss:.1} MiB with {n} pending vs {baseline_rss:.1} MiB idle"
    );
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Writes a re-check record the way any client could: raw bytes and headers.
async fn write_recheck(
    broker: &Broker,
    topic: &str,
    id: &str,
    origin: &str,
    check: u32,
    extra: &[(&str, String)],
) {
    let value = format!(r#"{{"connector_transaction_id":"{id}","follow":true}}"#);
    let now = now_ms().to_string();
    let mut headers: Vec<(String, String)> = vec![
        ("paysync-follow-origin".into(), origin.to_owned()),
        ("paysync-follow-check".into(), check.to_string()),
        ("paysync-follow-first-seen".into(), now.clone()),
        ("paysync-follow-due".into(), now),
    ];
    headers.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let raw: Vec<(&[u8], Option<&[u8]>)> = headers
        .iter()
        .map(|(k, v)| (k.as_bytes(), Some(v.as_bytes())))
        .collect();
    RawProducer::new(broker.bootstrap())
        .unwrap()
        .send_raw(
            topic,
            Some(0),
            Some(id.as_bytes()),
            Some(value.as_bytes()),
            &raw,
        )
        .await
        .unwrap();
}

/// The gate: a due re-check is not taken before the record that scheduled it is
/// committed (until then that record may be redone and end the chain itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recheck_waits_for_the_record_that_scheduled_it_to_be_committed() {
    let broker = Broker::new();
    let t = follow_topics(&broker, "follow-gate", &[1]).await;
    let recheck = format!("{}.recheck.1s", t.input);
    // Every connector call takes 1.5 s and one runs at a time: the last of four
    // input records is done after 6 s, well after the re-check group has formed.
    let sim = simulator(SimOptions {
        latency: paysync::demo::simulator::Latency::Fixed(Duration::from_millis(1500)),
        progress_step: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    let producer = RawProducer::new(broker.bootstrap()).unwrap();
    let mut input = Vec::new();
    let ids = ["open-gate-0", "open-gate-1", "open-gate-2", "open-gate-3"];
    for id in ids {
        let value = format!(r#"{{"connector_transaction_id":"{id}"}}"#);
        input.push(
            producer
                .send(
                    &t.input,
                    Some(0),
                    Some(id.as_bytes()),
                    Some(value.as_bytes()),
                    &[],
                )
                .await
                .unwrap(),
        );
    }
    // A re-check, already due, scheduled by the last input record.
    let by = format!("{}:0:{}", t.input, input[3].1);
    let origin = by.clone();
    write_recheck(
        &broker,
        &recheck,
        "progress-gate",
        &origin,
        2,
        &[("paysync-follow-scheduled-by", by)],
    )
    .await;
    let extra = follow_table(r#"[["1s", 1]]"#, "every_check");
    let mut s = settings(broker.bootstrap(), &t, &sim.base_url(), &extra);
    s.processing.max_in_flight = 1;
    let app = paysync::app::start(s).await.unwrap();
    let records = read_outputs(broker.bootstrap(), &t, 5, WAIT).await;
    let observed = |id: &str| {
        events_of(&records, &t, id)[0]["observed_at"]
            .as_i64()
            .unwrap()
    };
    let input_done = observed("open-gate-3");
    let called = sim.timeline("progress-gate")[0]
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        called >= input_done,
        "the re-check was checked {} ms before the record that scheduled it was even done",
        input_done - called
    );
    let s = summary(&events_of(&records, &t, "progress-gate"));
    assert_eq!(
        s,
        vec![(2, "STARTED".to_owned(), false, false)],
        "its chain's last check"
    );
    app.stop().await;
}

/// An end marker (written where a chain's next check would have gone when it
/// ended at a final status) stops a re-check behind it that a repeated check
/// scheduled: the chain does not end twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_marker_stops_a_recheck_scheduled_by_a_repeat() {
    let broker = Broker::new();
    let t = follow_topics(&broker, "follow-marker", &[1]).await;
    let recheck = format!("{}.recheck.1s", t.input);
    let sim = simulator(SimOptions::default()).await;
    let origin = format!("{}:0:7", t.input);
    write_recheck(
        &broker,
        &recheck,
        "success-marker",
        &origin,
        3,
        &[("paysync-follow-ended", "2".into())],
    )
    .await;
    write_recheck(&broker, &recheck, "success-marker", &origin, 3, &[]).await;
    // Another chain's re-check after them, to know when the partition was read.
    write_recheck(
        &broker,
        &recheck,
        "success-after",
        &format!("{}:0:8", t.input),
        2,
        &[],
    )
    .await;
    let extra = follow_table(r#"[["1s", 3]]"#, "changes");
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), &extra))
        .await
        .unwrap();
    let records =
        read_outputs_settled(broker.bootstrap(), &t, 1, WAIT, Duration::from_secs(2)).await;
    assert_eq!(summary(&events_of(&records, &t, "success-after")).len(), 1);
    assert!(
        events_of(&records, &t, "success-marker").is_empty(),
        "the chain had ended"
    );
    assert_eq!(sim.status_requests(), 1, "only the other chain was checked");
    let text = app.metrics().render();
    assert_eq!(
        sum_metric(&text, "paysync_follow_checks_skipped_total", &[]),
        1.0
    );
    app.stop().await;
}

/// Audit: a followed request whose headers brought its re-check record just over
/// the producer's 1,000,000-byte limit froze its partition for good (refused at
/// every retry and after every restart). Now the input's largest headers are
/// left off the re-check record; a record that cannot fit even without them
/// (its key alone is too large) ends the chain at that check, published as the
/// last, and the request is dead-lettered as `recheck_too_large`. Either way the
/// partition goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recheck_record_too_large_never_freezes_a_partition() {
    let broker = Broker::new();
    let t = follow_topics(&broker, "follow-big", &[1]).await;
    let sim = simulator(SimOptions::default()).await;
    let producer =
        RawProducer::with(broker.bootstrap(), &[("message.max.bytes", "3000000")]).unwrap();
    let big = vec![b'h'; 400_000];
    let value = |id: &str| format!(r#"{{"connector_transaction_id":"{id}","follow":true}}"#);
    // Headers of 1,000,000 bytes: with the chain's own headers the re-check record would
    // be just over 1,000,000 bytes.
    let (p1, _) = producer
        .send(
            &t.input,
            Some(0),
            Some(b"open-big-headers"),
            Some(value("open-big-headers").as_bytes()),
            &[
                ("trace", b"t-1"),
                ("blob-a", &big),
                ("blob-b", &big),
                ("blob-c", &big[..200_000]),
            ],
        )
        .await
        .unwrap();
    // A key of 999,990 bytes: no re-check record can hold it.
    let key = vec![b'k'; 999_990];
    producer
        .send(
            &t.input,
            Some(0),
            Some(&key),
            Some(value("open-big-key").as_bytes()),
            &[],
        )
        .await
        .unwrap();
    let (_, last) = producer
        .send(
            &t.input,
            Some(0),
            Some(b"after"),
            Some(value("success-after").as_bytes()),
            &[],
        )
        .await
        .unwrap();
    let extra = follow_table(r#"[["1s", 3]]"#, "changes");
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), &extra))
        .await
        .unwrap();
    let out = read_outputs_settled(broker.bootstrap(), &t, 4, WAIT, Duration::from_secs(3)).await;
    let first = events_of(&out, &t, "open-big-headers");
    assert!(!first.is_empty());
    assert!(!first[0]["next_check_at"].is_null(), "its chain goes on");
    let second = events_of(&out, &t, "open-big-key");
    assert_eq!(
        summary(&second),
        vec![(1, "STARTED".into(), false, false)],
        "published as the last"
    );
    let letters: Vec<&RawRecord> = out.iter().filter(|r| r.topic == t.dlq).collect();
    assert_eq!(letters.len(), 1, "one dead letter");
    assert_eq!(
        letters[0].header("paysync-error-code").as_deref(),
        Some("recheck_too_large")
    );
    assert_eq!(
        letters[0].header("paysync-key-truncated").as_deref(),
        Some("true")
    );
    assert!(letters[0].key.as_ref().unwrap().len() < 999_990);
    assert_eq!(
        events_of(&out, &t, "success-after").len(),
        1,
        "the partition went on"
    );
    // Its offsets are committed past all three: nothing freezes.
    let mut committed = Vec::new();
    for _ in 0..100 {
        committed =
            committed_offsets(broker.bootstrap(), &t.group, &t.input, t.partitions).unwrap();
        if committed[0] > last {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        committed[0] > last,
        "committed {committed:?}, last offset {last} (partition {p1})"
    );
    let metrics = app.metrics().render();
    assert_eq!(
        sum_metric(&metrics, "paysync_recheck_headers_dropped_total", &[]),
        1.0,
        "one 400 KB header was left off"
    );
    // The chain with its headers dropped goes on to its next check.
    let recheck = format!("{}.recheck.1s", t.input);
    let records = tokio::task::spawn_blocking({
        let b = broker.bootstrap().to_owned();
        move || {
            paysync::kafka::tools::TopicReader::new(&b, &[(&recheck, 2)])
                .unwrap()
                .read(2, WAIT)
        }
    })
    .await
    .unwrap();
    // The other record there is the end marker of `success-after` (final at once).
    let records: Vec<_> = records
        .into_iter()
        .filter(|r| r.key.as_deref() == Some(&b"open-big-headers"[..]))
        .collect();
    assert_eq!(records.len(), 1);
    let names: Vec<String> = records[0]
        .headers
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(
        records[0].header("trace").as_deref(),
        Some("t-1"),
        "small headers stay: {names:?} (key {} bytes)",
        records[0].key.as_ref().map_or(0, Vec::len)
    );
    app.stop().await;
}

/// Audit: twenty chains waiting in `<input>.recheck.3s`, then a restart whose
/// schedule uses 4 s instead: no chain ever ended (nobody read the 3 s topic any
/// more). Now every re-check topic under the prefix is consumed: each waiting
/// re-check runs at the due time it was written with and its chain goes on with
/// the current schedule, here to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_change_never_orphans_a_chain() {
    let broker = Broker::new();
    let t = follow_topics(&broker, "follow-schedule", &[3, 4]).await;
    let sim = simulator(SimOptions::default()).await;
    let n = 20;
    for i in 0..n {
        send(&broker, &t, &format!("open-sched-{i}"), true).await;
    }
    let first = paysync::app::start(settings(
        broker.bootstrap(),
        &t,
        &sim.base_url(),
        &follow_table(r#"[["3s", 3]]"#, "every_check"),
    ))
    .await
    .unwrap();
    let checks = read_outputs(broker.bootstrap(), &t, n, WAIT).await;
    assert_eq!(checks.len(), n, "every first check published");
    first.stop().await;
    // The new schedule names only 4 s; the 3 s topic still holds 20 re-checks.
    let app = paysync::app::start(settings(
        broker.bootstrap(),
        &t,
        &sim.base_url(),
        &follow_table(r#"[["4s", 2]]"#, "every_check"),
    ))
    .await
    .unwrap();
    let recheck_3s = format!("{}.recheck.3s", t.input);
    assert!(
        app.consumed_topics().contains(&recheck_3s),
        "the 3 s topic is consumed: {:?}",
        app.consumed_topics()
    );
    // Checks 2 (from the 3 s topic) and 3 (4 s later, the last slot of the new
    // schedule) for each chain.
    let out =
        read_outputs_settled(broker.bootstrap(), &t, 3 * n, WAIT, Duration::from_secs(2)).await;
    for i in 0..n {
        let id = format!("open-sched-{i}");
        let events = summary(&events_of(&out, &t, &id));
        assert_eq!(
            events,
            vec![
                (1, "STARTED".into(), false, true),
                (2, "STARTED".into(), false, true),
                (3, "STARTED".into(), false, false),
            ],
            "{id}: the chain went on with the current schedule and ended"
        );
    }
    let metrics = app.metrics().render();
    assert_eq!(
        sum_metric(
            &metrics,
            "paysync_chains_ended_total",
            &[("outcome", "exhausted")]
        ),
        n as f64
    );
    assert!(metrics.contains(&format!(
        "paysync_pending_rechecks{{topic=\"{recheck_3s}\"}}"
    )));
    app.stop().await;
}

/// A chain whose connector has no follow table any more (the table was removed)
/// ends at its next check, published as the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_whose_connector_lost_its_follow_table_ends_published_as_last() {
    let broker = Broker::new();
    let t = follow_topics(&broker, "follow-gone", &[2]).await;
    let sim = simulator(SimOptions::default()).await;
    send(&broker, &t, "open-gone", true).await;
    let first = paysync::app::start(settings(
        broker.bootstrap(),
        &t,
        &sim.base_url(),
        &follow_table(r#"[["2s", 5]]"#, "changes"),
    ))
    .await
    .unwrap();
    assert_eq!(read_outputs(broker.bootstrap(), &t, 1, WAIT).await.len(), 1);
    first.stop().await;
    let app = paysync::app::start(settings(broker.bootstrap(), &t, &sim.base_url(), ""))
        .await
        .unwrap();
    let out = read_outputs_settled(broker.bootstrap(), &t, 2, WAIT, Duration::from_secs(4)).await;
    assert_eq!(
        summary(&events_of(&out, &t, "open-gone")),
        vec![
            (1, "STARTED".into(), false, true),
            (2, "STARTED".into(), false, false)
        ],
        "ended at check 2, published although unchanged"
    );
    app.stop().await;
}

/// Audit: a due re-check waited for the record that scheduled it to be
/// committed, forever and silently. The wait is now bounded
/// (`processing.recheck_gate_timeout`); past it the re-check runs, and the wait is
/// logged and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recheck_waiting_for_a_commit_that_never_comes_runs_after_the_gate_timeout() {
    let broker = Broker::new();
    let t = follow_topics(&broker, "follow-gate", &[1]).await;
    let sim = simulator(SimOptions::default()).await;
    let recheck = format!("{}.recheck.1s", t.input);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    // A re-check scheduled by an input offset that will never be committed.
    let origin = format!("{}:0:7", t.input);
    let never = format!("{}:0:999999", t.input);
    let (now, first_seen) = (now.to_string(), (now - 1000).to_string());
    RawProducer::new(broker.bootstrap())
        .unwrap()
        .send(
            &recheck,
            Some(0),
            Some(b"open-gate"),
            Some(br#"{"connector_transaction_id":"open-gate","follow":true}"#),
            &[
                ("paysync-follow-origin", origin.as_bytes()),
                ("paysync-follow-scheduled-by", never.as_bytes()),
                ("paysync-follow-check", b"2"),
                ("paysync-follow-first-seen", first_seen.as_bytes()),
                ("paysync-follow-due", now.as_bytes()),
            ],
        )
        .await
        .unwrap();
    let mut s = settings(
        broker.bootstrap(),
        &t,
        &sim.base_url(),
        &follow_table(r#"[["1s", 1]]"#, "changes"),
    );
    s.processing.recheck_gate_timeout = Duration::from_secs(2);
    let started = std::time::Instant::now();
    let app = paysync::app::start(s).await.unwrap();
    let out = read_outputs(broker.bootstrap(), &t, 1, WAIT).await;
    assert_eq!(
        summary(&events_of(&out, &t, "open-gate")),
        vec![(2, "STARTED".into(), false, false)],
        "the re-check ran (and, the schedule used up, ended its chain)"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "not before the gate timeout"
    );
    let metrics = app.metrics().render();
    assert_eq!(
        sum_metric(
            &metrics,
            "paysync_recheck_gate_timeouts_total",
            &[("topic", recheck.as_str())]
        ),
        1.0
    );
    app.stop().await;
}
