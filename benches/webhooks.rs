//! The webhook intake benchmark: an open-loop load at fixed offered rates
//! against the real `paysync` binary (release build) with `[webhooks]` on,
//! Apache Kafka (`tests/kafka/broker.sh`, or `PAYSYNC_BENCH_BROKERS`) and the
//! connector simulator. Every webhook is a new payment: a third CM.com JSON
//! webhooks, a third Mollie classic form webhooks, a third signed Mollie events
//! (an HMAC-SHA256 each). Two scenarios: `full`, where paysync checks each
//! webhook it accepts and publishes its event while the load runs (the intake
//! competes with the whole pipeline), and `intake`, where the checks are parked
//! (the simulator answers after 60 s, one check in flight), which measures the
//! intake's own path as when a connector is slow or down.
//!
//! Open loop: request `i` is due at `start + i / rate` and its latency counts
//! from then, not from when it was sent, so a stalled generator or server shows
//! up in the figures instead of hiding (no coordinated omission). The latency is
//! from the request to paysync's 200, which comes only after the broker
//! acknowledged the request record (`acks=all`).
//!
//! The load generator, the simulator, the broker (a JVM) and paysync share this
//! machine's cores; the figures are for that, not for paysync alone.
//!
//! `cargo bench --bench webhooks -- [--rates 1000,2500,5000,7500] [--seconds 10]
//! [--rounds 3] [--scenarios intake,full] [--out DIR]`: the rates in turn, `rounds` times over (one row
//! per run, a rate is held when every run held it); writes `webhooks.json` and
//! `webhooks.md` (default `bench/results/webhooks/`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paysync::connectors::webhook::hmac_sha256_header;
use paysync::demo::simulator::{Latency, SimOptions, Simulator};
use paysync::demo::stack::{free_addr, KafkaProcess, PaysyncProcess, StackSettings, Topics};
use paysync::kafka::admin::create_topics;
use paysync::telemetry::sum_metric;
use serde::Serialize;

const SECRET: &str = "whsec_bench_secret";
const PARTITIONS: i32 = 8;

/// One rate's figures.
#[derive(Debug, Serialize)]
struct RateResult {
    scenario: Scenario,
    round: usize,
    offered_per_s: f64,
    seconds: f64,
    sent: usize,
    /// Answered 200 `accepted` (a request produced and acknowledged).
    ok: usize,
    /// Answered 200 as a repeat (none expected: every webhook is a new payment).
    duplicates: usize,
    /// Answers other than 200, by status (0: no answer, a transport error).
    other: Vec<(u16, usize)>,
    /// 200s per second over the run.
    accepted_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// paysync's CPU milliseconds per webhook (intake and the checks they start).
    paysync_cpu_ms_per_webhook: f64,
    /// Cores busy on average during the run: paysync, the broker (when this
    /// benchmark started it), and this process (load generator and simulator).
    cores_paysync: f64,
    cores_broker: Option<f64>,
    cores_generator_and_simulator: f64,
    /// How long after the last webhook the last of their events was published
    /// (the full scenario).
    events_drained_after_s: Option<f64>,
    /// Every webhook accepted, p99 under 50 ms.
    held: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    broker: String,
    results: Vec<RateResult>,
}

type Args = (Vec<f64>, f64, usize, Vec<Scenario>, PathBuf);

fn args() -> Args {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let rates = value("--rates")
        .unwrap_or_else(|| "1000,2500,5000,7500".into())
        .split(',')
        .map(|r| r.trim().parse().expect("--rates R,R,..."))
        .collect();
    let seconds = value("--seconds").map_or(10.0, |s| s.parse().expect("--seconds S"));
    let rounds = value("--rounds").map_or(3, |s| s.parse().expect("--rounds R"));
    let scenarios = value("--scenarios")
        .unwrap_or_else(|| "intake,full".into())
        .split(',')
        .map(|s| Scenario::parse(s.trim()))
        .collect();
    let out = value("--out").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/results/webhooks"),
        PathBuf::from,
    );
    (rates, seconds, rounds, scenarios, out)
}

/// A webhook: (path and query, content type, extra header, body).
fn webhook(i: usize, tag: &str) -> (String, &'static str, Option<String>, String) {
    match i % 3 {
        0 => (
            "cm/default?method=IDEAL".into(),
            "application/json",
            None,
            format!(
                r#"{{"createdAt":"2026-12-02T09:00:00Z","event":"StatusChanged","transaction":"success-{tag}-{i}","reference":"order-{i}","payment":"pay-{i}"}}"#
            ),
        ),
        1 => (
            "mollie/default".into(),
            "application/x-www-form-urlencoded",
            None,
            format!("id=tr_success-{tag}-{i}"),
        ),
        _ => {
            let body = format!(
                r#"{{"resource":"event","id":"event_{tag}_{i}","type":"payment-link.paid","entityId":"tr_success-{tag}-{i}","createdAt":"2026-12-02T09:00:00+00:00"}}"#
            );
            let signature = hmac_sha256_header(SECRET, body.as_bytes());
            (
                "mollie/signed".into(),
                "application/json",
                Some(signature),
                body,
            )
        }
    }
}

async fn published(http: SocketAddr) -> f64 {
    let Ok(r) = reqwest::get(format!("http://{http}/metrics")).await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    sum_metric(&text, "paysync_events_published_total", &[])
}

/// CPU seconds of this process (load generator and simulator).
fn own_cpu() -> f64 {
    paysync::demo::stack::proc_usage(std::process::id()).1
}

/// The load generator against one running stack.
struct Load<'a> {
    broker_pid: Option<u32>,
    client: &'a reqwest::Client,
    intake: SocketAddr,
    paysync: &'a PaysyncProcess,
    wait_for_events: bool,
}

impl Load<'_> {
    /// One open-loop run at `rate` for `seconds`; `tag` makes its payments new.
    async fn run(&self, tag: &str, rate: f64, seconds: f64) -> RateResult {
        let Load {
            broker_pid,
            client,
            intake,
            paysync,
            wait_for_events,
        } = *self;
        let published_before = published(paysync.http).await;
        run_rate(
            broker_pid,
            client,
            intake,
            paysync,
            wait_for_events,
            tag,
            rate,
            seconds,
            published_before,
        )
        .await
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_rate(
    broker_pid: Option<u32>,
    client: &reqwest::Client,
    intake: SocketAddr,
    paysync: &PaysyncProcess,
    wait_for_events: bool,
    tag: &str,
    rate: f64,
    seconds: f64,
    published_before: f64,
) -> RateResult {
    let n = (rate * seconds).round() as usize;
    // Bodies are made before the clock starts.
    let requests: Vec<_> = (0..n).map(|i| webhook(i, tag)).collect();
    // (latency ms, status, a repeat)
    let answers: Arc<Mutex<Vec<(f64, u16, bool)>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let cpu_before = paysync.usage().1;
    let broker_before = broker_pid.map(|p| paysync::demo::stack::proc_usage(p).1);
    let own_before = own_cpu();
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (path, content_type, signature, body)) in requests.into_iter().enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        let mut request = client
            .post(format!("http://{intake}/webhooks/{path}"))
            .header("content-type", content_type)
            .body(body);
        if let Some(s) = signature {
            request = request.header("x-mollie-signature", s);
        }
        let answers = answers.clone();
        tasks.spawn(async move {
            let (status, repeat) = match request.send().await {
                Ok(r) => {
                    let s = r.status().as_u16();
                    let body = r.bytes().await.unwrap_or_default();
                    (s, body.starts_with(b"accepted (a repeat)"))
                }
                Err(_) => (0, false),
            };
            let ms = due.elapsed().as_secs_f64() * 1000.0;
            answers.lock().unwrap().push((ms, status, repeat));
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let sent_all = start.elapsed().as_secs_f64();
    let cpu = paysync.usage().1 - cpu_before;
    let broker_cpu = broker_pid
        .zip(broker_before)
        .map(|(p, b)| paysync::demo::stack::proc_usage(p).1 - b);
    let own = own_cpu() - own_before;
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let ok = answers.iter().filter(|(_, s, r)| *s == 200 && !r).count();
    let duplicates = answers.iter().filter(|(_, s, r)| *s == 200 && *r).count();
    let mut other: std::collections::BTreeMap<u16, usize> = Default::default();
    for (_, s, _) in answers.iter().filter(|(_, s, _)| *s != 200) {
        *other.entry(*s).or_default() += 1;
    }
    let mut ms: Vec<f64> = answers.iter().map(|(m, _, _)| *m).collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    // The events of the accepted webhooks.
    let drained = if wait_for_events {
        let last_sent = Instant::now();
        let deadline = last_sent + Duration::from_secs(120);
        while published(paysync.http).await < published_before + ok as f64
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(last_sent.elapsed().as_secs_f64())
    } else {
        None
    };
    let p99 = at(0.99);
    RateResult {
        scenario: Scenario::Full,
        round: 0,
        offered_per_s: rate,
        seconds: sent_all,
        sent: n,
        ok,
        duplicates,
        other: other.into_iter().collect(),
        accepted_per_s: ok as f64 / sent_all,
        p50_ms: at(0.5),
        p90_ms: at(0.9),
        p99_ms: p99,
        p999_ms: at(0.999),
        max_ms: *ms.last().unwrap(),
        paysync_cpu_ms_per_webhook: cpu * 1000.0 / n as f64,
        cores_paysync: cpu / sent_all,
        cores_broker: broker_cpu.map(|b| b / sent_all),
        cores_generator_and_simulator: own / sent_all,
        events_drained_after_s: drained,
        held: ok == n && p99 < 50.0,
    }
}

fn markdown(report: &Report) -> String {
    let mut out = format!(
        "Webhook intake, open loop ({}; broker: {}). Latency from each webhook's due time to paysync's 200 (after the broker's ack).\n\n\
         | scenario | offered /s | run | sent | accepted | other | accepted /s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | paysync CPU ms / webhook | cores busy: paysync / broker / generator+simulator | events drained after | held |\n\
         |---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|\n",
        report.machine, report.broker
    );
    for r in &report.results {
        let mut other: Vec<String> = r.other.iter().map(|(s, n)| format!("{n}× {s}")).collect();
        if r.duplicates > 0 {
            other.push(format!("{}× 200 repeat", r.duplicates));
        }
        let other = if other.is_empty() {
            "none".to_owned()
        } else {
            other.join(", ")
        };
        out.push_str(&format!(
            "| {:?} | {:.0} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.2} / {} / {:.2} | {} | {} |\n",
            r.scenario,
            r.offered_per_s,
            r.round,
            r.sent,
            r.ok,
            other,
            r.accepted_per_s,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.p999_ms,
            r.max_ms,
            r.paysync_cpu_ms_per_webhook,
            r.cores_paysync,
            r.cores_broker.map_or("?".to_owned(), |c| format!("{c:.2}")),
            r.cores_generator_and_simulator,
            r.events_drained_after_s.map_or("n/a".to_owned(), |d| format!("{d:.1} s")),
            if r.held { "yes" } else { "no" }
        ));
    }
    for scenario in [Scenario::Intake, Scenario::Full] {
        let runs: Vec<&RateResult> = report
            .results
            .iter()
            .filter(|r| r.scenario == scenario)
            .collect();
        if runs.is_empty() {
            continue;
        }
        // The highest rate below which every rate was held in every run.
        let mut rates: Vec<f64> = runs.iter().map(|r| r.offered_per_s).collect();
        rates.sort_by(f64::total_cmp);
        rates.dedup();
        let held = rates
            .iter()
            .take_while(|rate| {
                runs.iter()
                    .filter(|r| r.offered_per_s == **rate)
                    .all(|r| r.held)
            })
            .last()
            .copied();
        out.push_str(&match held {
            Some(r) => format!("\n{scenario:?}: every offered rate up to {r:.0}/s held in every run (every webhook accepted, p99 under 50 ms)."),
            None => format!("\n{scenario:?}: no offered rate was held in every run."),
        });
    }
    out.push('\n');
    out
}

fn machine() -> String {
    format!(
        "{}; generator, simulator, broker and paysync on the same cores",
        paysync::demo::stack::cores_and_model()
    )
}

/// What runs behind the intake.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
enum Scenario {
    /// Every accepted webhook is checked and its event published while the
    /// load runs: the intake competes with the whole pipeline for the cores.
    Full,
    /// The checks are parked (the connector answers after 60 s, one check in
    /// flight, so the engine soon fetches nothing more): the intake's own cost,
    /// as when a connector is slow or down and webhooks keep coming.
    Intake,
}

impl Scenario {
    fn parse(s: &str) -> Scenario {
        match s {
            "full" => Scenario::Full,
            "intake" => Scenario::Intake,
            other => panic!("--scenarios full,intake (not {other})"),
        }
    }
}

struct Stack {
    paysync: PaysyncProcess,
    sim: Simulator,
    intake: SocketAddr,
}

async fn start_stack(brokers: &str, scenario: Scenario) -> Stack {
    let options = match scenario {
        Scenario::Full => SimOptions::default(),
        Scenario::Intake => SimOptions {
            latency: Latency::Fixed(Duration::from_secs(60)),
            ..SimOptions::default()
        },
    };
    let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let t = Topics::unique("bench-webhooks", PARTITIONS);
    create_topics(brokers, &t.specs()).await.unwrap();
    let intake = free_addr();
    let http = free_addr();
    let mollie = paysync::demo::simulator::mollie::ACCOUNT;
    // The per-account rate limit is raised: the load comes from three accounts.
    let extra = format!(
        "[webhooks]\nlisten = \"{intake}\"\nrequests_per_second = 1000000\n\
         [connectors.mollie.accounts.signed]\n{mollie}webhook_secret = \"{SECRET}\"\n"
    );
    let toml = StackSettings {
        brokers,
        topics: &t,
        simulator: &sim.base_url(),
        listen: http,
        extra: &extra,
    }
    .toml();
    let mut env = vec![("PAYSYNC_LOG__LEVEL", "warn")];
    if scenario == Scenario::Intake {
        env.extend([
            ("PAYSYNC_PROCESSING__MAX_IN_FLIGHT", "1"),
            ("PAYSYNC_CONNECTORS__CM__REQUEST_TIMEOUT", "120s"),
            ("PAYSYNC_CONNECTORS__MOLLIE__REQUEST_TIMEOUT", "120s"),
            ("PAYSYNC_PROCESSING__SHUTDOWN_TIMEOUT", "1s"),
        ]);
    }
    let paysync =
        PaysyncProcess::spawn(env!("CARGO_BIN_EXE_paysync").as_ref(), &toml, http, &env).unwrap();
    let ready = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = reqwest::get(format!("http://{http}/readyz")).await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(
            Instant::now() < ready,
            "paysync not ready:\n{}",
            paysync.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Stack {
        paysync,
        sim,
        intake,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (rates, seconds, rounds, scenarios, out) = args();
    let (kafka, brokers, broker_name) = match std::env::var("PAYSYNC_BENCH_BROKERS") {
        Ok(b) => (None, b.clone(), format!("PAYSYNC_BENCH_BROKERS={b}")),
        Err(_) => {
            let k = KafkaProcess::start().expect("Apache Kafka starts (Java 17 and Maven)");
            let b = k.bootstrap().to_owned();
            (Some(k), b, "Apache Kafka 4.1.1, one KRaft node".to_owned())
        }
    };
    let broker_pid = kafka.as_ref().and_then(KafkaProcess::pid);
    // Idle connections are dropped before the intake would close them (its
    // header_read_timeout also bounds an idle keep-alive connection), so a
    // request never races a server-side close.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut results = Vec::new();
    for scenario in scenarios {
        let mut stack = start_stack(&brokers, scenario).await;
        let load = Load {
            broker_pid,
            client: &client,
            intake: stack.intake,
            paysync: &stack.paysync,
            wait_for_events: scenario == Scenario::Full,
        };
        // Warm-up: connections, the token, the broker's JIT.
        let _ = load.run("warm", 500.0, 2.0).await;
        for round in 1..=rounds {
            for &rate in &rates {
                // Each run's payments are new ones (no deduplication).
                let mut r = load
                    .run(
                        &format!("{scenario:?}{round}r{}", rate as u64),
                        rate,
                        seconds,
                    )
                    .await;
                r.round = round;
                r.scenario = scenario;
                eprintln!(
                    "{scenario:?} round {round}, {:>6.0}/s: {} of {} accepted, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms{}",
                    r.offered_per_s,
                    r.ok,
                    r.sent,
                    r.p50_ms,
                    r.p99_ms,
                    r.p999_ms,
                    r.max_ms,
                    if r.held { "" } else { " (not held)" }
                );
                results.push(r);
            }
        }
        stack.paysync.signal("TERM");
        stack.paysync.wait_exit(Duration::from_secs(60));
        stack.sim.stop().await;
    }
    results.sort_by(|a, b| {
        (a.scenario as u8)
            .cmp(&(b.scenario as u8))
            .then(a.offered_per_s.total_cmp(&b.offered_per_s))
            .then(a.round.cmp(&b.round))
    });
    let report = Report {
        machine: machine(),
        broker: broker_name,
        results,
    };
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("webhooks.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    let md = markdown(&report);
    std::fs::write(out.join("webhooks.md"), &md).unwrap();
    println!("{md}");
}
