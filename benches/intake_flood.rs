//! The intake under attack: genuine signed webhooks at a steady rate beside
//! forgeries, clients that never read, idle connections and one-byte-a-second
//! bodies, against the release binary (`paysync run --role webhooks`) on
//! Apache Kafka (`tests/kafka/broker.sh`, or `PAYSYNC_BENCH_BROKERS`).
//!
//! One run, two phases on one paysync process: the baseline (the genuine
//! webhooks alone), then the attack (the same number of genuine webhooks while
//! the attackers run). Every genuine webhook is a signed Mollie event on a
//! connection of its own (as processors send them), open loop: webhook `i` is
//! due at `start + i / rate` and its latency counts from then. Every attacker
//! comes from the same address as the genuine sender (127.0.0.1): a
//! per-address limit could not tell them apart.
//!
//! - forgeries: Mollie events with a wrong signature to the genuine account's
//!   route, paced at `--forged-per-s` over keep-alive connections;
//! - deaf clients: connections that pipeline requests and never read an
//!   answer (reconnecting when dropped);
//! - idle clients: connections that send nothing (reconnecting when closed);
//! - slow bodies: a request head, then one body byte a second.
//!
//! Reported: the share of genuine webhooks answered 200 within 1 s, their
//! latency against the baseline's, paysync's peak RSS and open files, that
//! every genuine webhook's request is in Kafka, and the forgeries refused per
//! CPU-second of paysync (everything it did in the attack phase counted).
//!
//! `cargo bench --bench intake_flood -- [--genuine 3000] [--rate 100]
//! [--forged-per-s 2000] [--deaf 200] [--idle 2000] [--slow 100] [--out DIR]`
//! writes `flood.json` and `flood.md` (default `bench/results/intake-flood/`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use paysync::connectors::webhook::hmac_sha256_header;
use paysync::demo::simulator::{SimOptions, Simulator};
use paysync::demo::stack::{
    free_addr, proc_usage, KafkaProcess, PaysyncProcess, StackSettings, Topics,
};
use paysync::kafka::admin::create_topics;
use paysync::telemetry::sum_metric;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "whsec_flood_secret";
const PARTITIONS: i32 = 4;
const ROUTE: &str = "/webhooks/mollie/signed";

/// The `[webhooks]` section of the run (printed in the report).
fn webhooks_toml(listen: SocketAddr) -> String {
    format!(
        "[webhooks]\nlisten = \"{listen}\"\nmax_connections = 4096\n\
         # the genuine sender's 100/s with room; forgeries are refused before it\n\
         requests_per_second = 200\n"
    )
}

#[derive(Debug, Clone)]
struct Args {
    genuine: usize,
    rate: f64,
    forged_per_s: f64,
    deaf: usize,
    idle: usize,
    slow: usize,
    out: PathBuf,
}

fn args() -> Args {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let num = |flag: &str, default: f64| value(flag).map_or(default, |v| v.parse().expect(flag));
    Args {
        genuine: num("--genuine", 3000.0) as usize,
        rate: num("--rate", 100.0),
        forged_per_s: num("--forged-per-s", 2000.0),
        deaf: num("--deaf", 200.0) as usize,
        idle: num("--idle", 2000.0) as usize,
        slow: num("--slow", 100.0) as usize,
        out: value("--out").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/results/intake-flood"),
            PathBuf::from,
        ),
    }
}

/// A genuine webhook's request: a signed Mollie event for a new payment.
fn genuine_request(intake: SocketAddr, phase: &str, i: usize) -> Vec<u8> {
    let body = format!(
        r#"{{"resource":"event","id":"event_{phase}_{i}","type":"payment-link.paid","entityId":"tr_success-{phase}-{i}","createdAt":"2026-12-07T09:00:00+00:00"}}"#
    );
    let signature = hmac_sha256_header(SECRET, body.as_bytes());
    request(intake, &[("x-mollie-signature", &signature)], &body)
}

/// A forgery: the same shape, signed with a guess.
fn forged_request(intake: SocketAddr, n: u64) -> Vec<u8> {
    let body = format!(
        r#"{{"resource":"event","id":"event_forged_{n}","type":"payment-link.paid","entityId":"tr_forged-{n}","createdAt":"2026-12-07T09:00:00+00:00"}}"#
    );
    let signature = hmac_sha256_header("whsec_a_guess", body.as_bytes());
    request(intake, &[("x-mollie-signature", &signature)], &body)
}

fn request(intake: SocketAddr, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut head = format!(
        "POST {ROUTE} HTTP/1.1\r\nhost: {intake}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head.push_str(body);
    head.into_bytes()
}

/// Reads one answer: (status, the server closes after it).
async fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, bool)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head.get(9..12)?.parse().ok()?;
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let close = head.contains("connection: close");
            while buf.len() < end + 4 + length {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + length);
            return Some((status, close));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One genuine webhook on a connection of its own: (status, 0 when none).
async fn send_genuine(intake: SocketAddr, bytes: Vec<u8>) -> u16 {
    let exchange = async {
        let mut s = TcpStream::connect(intake).await.ok()?;
        s.set_nodelay(true).ok()?;
        s.write_all(&bytes).await.ok()?;
        read_answer(&mut s, &mut Vec::new()).await.map(|(st, _)| st)
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

#[derive(Debug, Serialize)]
struct Phase {
    name: &'static str,
    sent: usize,
    accepted: usize,
    /// Answered 200 within 1 s of its due time.
    within_1s: usize,
    /// Answers other than 200 (0: none, a transport error).
    other: Vec<(u16, usize)>,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    seconds: f64,
    /// paysync's CPU seconds over the phase.
    paysync_cpu_s: f64,
}

/// The genuine webhooks of one phase, open loop.
async fn genuine_phase(
    name: &'static str,
    intake: SocketAddr,
    n: usize,
    rate: f64,
    pid: u32,
) -> Phase {
    let requests: Vec<Vec<u8>> = (0..n).map(|i| genuine_request(intake, name, i)).collect();
    let cpu_before = proc_usage(pid).1;
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, bytes) in requests.into_iter().enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        tasks.spawn(async move {
            let status = send_genuine(intake, bytes).await;
            (status, due.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let mut answers = Vec::with_capacity(n);
    while let Some(a) = tasks.join_next().await {
        answers.push(a.unwrap());
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut other = std::collections::BTreeMap::<u16, usize>::new();
    for (s, _) in answers.iter().filter(|(s, _)| *s != 200) {
        *other.entry(*s).or_default() += 1;
    }
    let mut ms: Vec<f64> = answers.iter().map(|(_, m)| *m).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    Phase {
        name,
        sent: n,
        accepted: answers.iter().filter(|(s, _)| *s == 200).count(),
        within_1s: answers
            .iter()
            .filter(|(s, m)| *s == 200 && *m <= 1000.0)
            .count(),
        other: other.into_iter().collect(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        max_ms: *ms.last().unwrap(),
        seconds,
        paysync_cpu_s: proc_usage(pid).1 - cpu_before,
    }
}

/// What the attackers did.
#[derive(Debug, Default, Serialize)]
struct Attack {
    forged_sent: u64,
    /// Answered 401 (bad signature).
    forged_refused: u64,
    /// Answered anything else (none expected; 503 when over the verification
    /// budget).
    forged_other: u64,
    forged_per_s: f64,
    deaf_connections: u64,
    idle_connections: u64,
    slow_connections: u64,
}

#[derive(Default)]
struct Counters {
    forged_sent: AtomicU64,
    forged_refused: AtomicU64,
    forged_other: AtomicU64,
    deaf: AtomicU64,
    idle: AtomicU64,
    slow: AtomicU64,
}

/// Starts the attackers; they run until `stop`.
fn attack(
    intake: SocketAddr,
    args: &Args,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    // Forgeries: 16 keep-alive senders, each paced at its share of the rate.
    let senders = 16;
    let per_sender = args.forged_per_s / senders as f64;
    for k in 0..senders {
        let (stop, c) = (stop.clone(), counters.clone());
        set.spawn(async move {
            let mut n = k as u64 * 1_000_000_000;
            let start = tokio::time::Instant::now();
            let mut i = 0u64;
            'connect: while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(intake).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = s.set_nodelay(true);
                let mut buf = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep_until(
                        start + Duration::from_secs_f64(i as f64 / per_sender),
                    )
                    .await;
                    i += 1;
                    n += 1;
                    c.forged_sent.fetch_add(1, Ordering::Relaxed);
                    if s.write_all(&forged_request(intake, n)).await.is_err() {
                        continue 'connect;
                    }
                    match read_answer(&mut s, &mut buf).await {
                        Some((401, close)) => {
                            c.forged_refused.fetch_add(1, Ordering::Relaxed);
                            if close {
                                continue 'connect;
                            }
                        }
                        Some((_, close)) => {
                            c.forged_other.fetch_add(1, Ordering::Relaxed);
                            if close {
                                continue 'connect;
                            }
                        }
                        None => continue 'connect,
                    }
                }
            }
        });
    }
    // Deaf clients: a burst of 16 pipelined forgeries, then one a second,
    // never reading an answer; reconnect when dropped. (A client that also
    // sends as fast as it can is a forgery flood: past
    // `max_verifications_per_second` it is answered 503, genuine webhooks
    // included, and the processors retry.)
    for _ in 0..args.deaf {
        let (stop, c) = (stop.clone(), counters.clone());
        set.spawn(async move {
            let burst = forged_request(intake, 0).repeat(16);
            let one = forged_request(intake, 1);
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(intake).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                c.deaf.fetch_add(1, Ordering::Relaxed);
                let mut next: &[u8] = &burst;
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(500), s.write_all(next)).await
                    {
                        Ok(Ok(())) => {
                            next = &one;
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Ok(Err(_)) => break,
                        Err(_) => {} // blocked: keep trying, never read
                    }
                }
            }
        });
    }
    // Idle clients: connect, send nothing; reconnect when closed.
    for _ in 0..args.idle {
        let (stop, c) = (stop.clone(), counters.clone());
        set.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(intake).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                c.idle.fetch_add(1, Ordering::Relaxed);
                let mut b = [0u8; 64];
                loop {
                    tokio::select! {
                        r = s.read(&mut b) => if matches!(r, Ok(0) | Err(_)) { break },
                        () = tokio::time::sleep(Duration::from_millis(500)) => {
                            if stop.load(Ordering::Relaxed) { return; }
                        }
                    }
                }
            }
        });
    }
    // Slow bodies: a head, then a byte a second.
    for _ in 0..args.slow {
        let (stop, c) = (stop.clone(), counters.clone());
        set.spawn(async move {
            let head = format!(
                "POST {ROUTE} HTTP/1.1\r\nhost: {intake}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\nx-mollie-signature: sha256=00\r\n\r\n{{"
            );
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(intake).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                c.slow.fetch_add(1, Ordering::Relaxed);
                if s.write_all(head.as_bytes()).await.is_err() {
                    continue;
                }
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if s.write_all(b" ").await.is_err() {
                        break;
                    }
                }
            }
        });
    }
    set
}

/// Webhooks refused so far (every outcome but accepted, duplicate, ignored).
async fn refused(http: SocketAddr) -> f64 {
    let text = match reqwest::get(format!("http://{http}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    paysync::intake::admission::Outcome::ALL
        .iter()
        .filter(|o| !matches!(o.label(), "accepted" | "duplicate" | "ignored"))
        .map(|o| sum_metric(&text, "paysync_webhooks_total", &[("outcome", o.label())]))
        .sum()
}

/// Open files of `pid`.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The genuine webhooks' payments found in the input topic.
fn payments_in_kafka(brokers: &str, topic: &str) -> BTreeSet<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "intake-flood-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut keys = BTreeSet::new();
    let mut eof = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while eof.len() < PARTITIONS as usize && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                if let Some(k) = m.key() {
                    keys.insert(String::from_utf8_lossy(k).into_owned());
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                eof.insert(p);
            }
            _ => {}
        }
    }
    keys
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    broker: String,
    config: String,
    baseline: Phase,
    attacked: Phase,
    attack: Attack,
    /// Share of the attacked phase's genuine webhooks answered 200 within 1 s.
    share_within_1s: f64,
    /// paysync's peak resident memory over the run (VmHWM), MiB.
    peak_rss_mib: f64,
    /// Open files of paysync, at most (sampled every 250 ms).
    peak_open_files: usize,
    /// The genuine webhooks (both phases) whose request is in Kafka.
    genuine_in_kafka: usize,
    genuine_accepted: usize,
    /// Requests refused (every outcome but accepted, duplicate, ignored) per
    /// CPU-second of paysync in the attack phase; the idle and slow
    /// connections' cost counted in.
    refusals_per_cpu_second: f64,
    connections_closed: Vec<(String, f64)>,
    /// `paysync_webhooks_total` by outcome over the run.
    outcomes: Vec<(String, f64)>,
}

fn machine() -> String {
    format!(
        "{}; attackers, broker and paysync on the same cores",
        paysync::demo::stack::cores_and_model()
    )
}

/// Raises this process's open-file limit: the attackers hold thousands.
fn raise_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        },
    );
}

fn markdown(r: &Report) -> String {
    let row = |p: &Phase| {
        let other = if p.other.is_empty() {
            "none".to_owned()
        } else {
            p.other
                .iter()
                .map(|(s, n)| format!("{n}× {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
            p.name,
            p.sent,
            p.accepted,
            p.within_1s,
            other,
            p.p50_ms,
            p.p99_ms,
            p.p999_ms,
            p.max_ms,
            p.paysync_cpu_s / p.seconds
        )
    };
    let a = &r.attack;
    format!(
        "Intake flood ({}; broker: {}). Genuine webhooks: signed Mollie events, one connection each, open loop; latency from each one's due time to paysync's 200 (after the broker's ack).\n\n\
         | phase | genuine sent | 200 | 200 within 1 s | other | p50 ms | p99 ms | p99.9 ms | max ms | paysync cores busy |\n\
         |---|---:|---:|---:|---|---:|---:|---:|---:|---:|\n{}{}\n\
         Attack: {} forgeries sent ({:.0}/s), {} refused 401, {} answered otherwise; {} deaf, {} idle and {} slow-body connections opened (reconnecting when closed).\n\n\
         - genuine answered 200 within 1 s under attack: {:.2}%\n\
         - peak RSS {:.1} MiB; open files at most {}\n\
         - genuine requests in Kafka: {} of {} accepted\n\
         - requests refused per paysync CPU-second (idle and slow connections' cost counted in): {:.0}\n\
         - connections closed by the intake: {}\n\
         - webhooks by outcome (paysync_webhooks_total, whole run): {}\n\n\
         Configuration:\n\n```toml\n{}```\n",
        r.machine,
        r.broker,
        row(&r.baseline),
        row(&r.attacked),
        a.forged_sent,
        a.forged_per_s,
        a.forged_refused,
        a.forged_other,
        a.deaf_connections,
        a.idle_connections,
        a.slow_connections,
        r.share_within_1s * 100.0,
        r.peak_rss_mib,
        r.peak_open_files,
        r.genuine_in_kafka,
        r.genuine_accepted,
        r.refusals_per_cpu_second,
        r.connections_closed
            .iter()
            .map(|(k, v)| format!("{v:.0} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        r.outcomes
            .iter()
            .map(|(k, v)| format!("{v:.0} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        r.config
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    raise_limit();
    let (kafka, brokers, broker_name) = match std::env::var("PAYSYNC_BENCH_BROKERS") {
        Ok(b) => (None, b.clone(), format!("PAYSYNC_BENCH_BROKERS={b}")),
        Err(_) => {
            let k = KafkaProcess::start().expect("Apache Kafka starts (Java 17 and Maven)");
            let b = k.bootstrap().to_owned();
            (Some(k), b, "Apache Kafka 4.1.1, one KRaft node".to_owned())
        }
    };
    let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), SimOptions::default())
        .await
        .unwrap();
    let t = Topics::unique("bench-flood", PARTITIONS);
    create_topics(&brokers, &t.specs()).await.unwrap();
    let intake = free_addr();
    let http = free_addr();
    let mollie = paysync::demo::simulator::mollie::ACCOUNT;
    let config = webhooks_toml(intake);
    let extra = format!(
        "{config}[connectors.mollie.accounts.signed]\n{mollie}webhook_secret = \"{SECRET}\"\n"
    );
    let toml = StackSettings {
        brokers: &brokers,
        topics: &t,
        simulator: &sim.base_url(),
        listen: http,
        extra: &extra,
    }
    .toml();
    let env = [("PAYSYNC_LOG__LEVEL", "warn"), ("PAYSYNC_ROLE", "webhooks")];
    let mut paysync =
        PaysyncProcess::spawn(env!("CARGO_BIN_EXE_paysync").as_ref(), &toml, http, &env).unwrap();
    let pid = paysync.child.id();
    let ready = Instant::now() + Duration::from_secs(120);
    while !matches!(reqwest::get(format!("http://{http}/readyz/webhooks")).await, Ok(r) if r.status().is_success())
    {
        assert!(
            Instant::now() < ready,
            "paysync not ready:\n{}",
            paysync.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Open files, sampled through both phases.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(open_files(pid));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            peak
        })
    };
    // Warm-up, then the baseline.
    let _ = genuine_phase("warmup", intake, 200, args.rate, pid).await;
    let baseline = genuine_phase("baseline", intake, args.genuine, args.rate, pid).await;
    eprintln!("baseline: {baseline:?}");
    // The attack: the attackers ramp up for 5 s, then the genuine webhooks.
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let attack_started = Instant::now();
    let mut attackers = attack(intake, &args, stop.clone(), counters.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let forged_before = counters.forged_sent.load(Ordering::Relaxed);
    let refused_before = refused(http).await;
    let attacked = genuine_phase("attacked", intake, args.genuine, args.rate, pid).await;
    let forged_in_phase = counters.forged_sent.load(Ordering::Relaxed) - forged_before;
    let refused_in_phase = refused(http).await - refused_before;
    stop.store(true, Ordering::Relaxed);
    let attack_seconds = attack_started.elapsed().as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while attackers.join_next().await.is_some() {}
    })
    .await;
    attackers.abort_all();
    eprintln!("attacked: {attacked:?}");
    sampling.store(false, Ordering::Relaxed);
    let peak_open_files = sampler.await.unwrap();
    let peak_rss_mib = proc_usage(pid).0;
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let connections_closed = [
        "header_timeout",
        "idle_timeout",
        "write_timeout",
        "lifetime",
        "evicted",
    ]
    .iter()
    .map(|r| {
        (
            (*r).to_owned(),
            sum_metric(
                &metrics,
                "paysync_webhook_connections_closed_total",
                &[("reason", r)],
            ) + 0.0,
        )
    })
    .collect();
    let outcomes = paysync::intake::admission::Outcome::ALL
        .iter()
        .map(|o| {
            let n = sum_metric(
                &metrics,
                "paysync_webhooks_total",
                &[("outcome", o.label())],
            );
            (o.label().to_owned(), n + 0.0)
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    let keys = {
        let (b, topic) = (brokers.clone(), t.input.clone());
        tokio::task::spawn_blocking(move || payments_in_kafka(&b, &topic))
            .await
            .unwrap()
    };
    let genuine_in_kafka = ["baseline", "attacked"]
        .iter()
        .flat_map(|phase| (0..args.genuine).map(move |i| format!("tr_success-{phase}-{i}")))
        .filter(|k| keys.contains(k))
        .count();
    let c = &counters;
    let report = Report {
        machine: machine(),
        broker: broker_name,
        config,
        share_within_1s: attacked.within_1s as f64 / attacked.sent as f64,
        peak_rss_mib,
        peak_open_files,
        genuine_in_kafka,
        genuine_accepted: baseline.accepted + attacked.accepted,
        refusals_per_cpu_second: refused_in_phase / attacked.paysync_cpu_s,
        attack: Attack {
            forged_sent: c.forged_sent.load(Ordering::Relaxed),
            forged_refused: c.forged_refused.load(Ordering::Relaxed),
            forged_other: c.forged_other.load(Ordering::Relaxed),
            forged_per_s: forged_in_phase as f64 / attacked.seconds,
            deaf_connections: c.deaf.load(Ordering::Relaxed),
            idle_connections: c.idle.load(Ordering::Relaxed),
            slow_connections: c.slow.load(Ordering::Relaxed),
        },
        baseline,
        attacked,
        connections_closed,
        outcomes,
    };
    eprintln!("attack ran {attack_seconds:.1} s");
    paysync.signal("TERM");
    paysync.wait_exit(Duration::from_secs(60));
    sim.stop().await;
    drop(kafka);
    std::fs::create_dir_all(&args.out).unwrap();
    std::fs::write(
        args.out.join("flood.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    let md = markdown(&report);
    std::fs::write(args.out.join("flood.md"), &md).unwrap();
    println!("{md}");
}
