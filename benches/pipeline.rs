//! The paysync benchmark: throughput, latency, memory and CPU of the real `paysync`
//! binary against a real Kafka broker (Apache Kafka) and the CM.com simulator,
//! compared with the limit (the simulator's own capacity, the broker's
//! produce-plus-consume capacity) and with a naive sequential consumer.
//!
//! `cargo bench --bench pipeline -- [--quick] [--only NAME,NAME] [--backlog-only] [--out DIR]`
//! (normally through `bench/run.sh`, which also draws the charts). Writes
//! `results.json` and `results.md` to `bench/results/` unless `--out` says otherwise.
//!
//! `-- --ab VARIANT [--ab VARIANT ...] [--rounds R] [--quick]` runs the CPU A/B
//! instead: the 0 ms scenario (50,000 requests, 256 in flight; `--latency-ms MS`,
//! `--in-flight N` and `--requests N` change it) for each variant,
//! alternating, R rounds (default 5), and reports the median and range of
//! throughput and CPU per request. A variant is `NAME=self` (this build),
//! `NAME=/path/to/paysync` (another build, e.g. the main this branch started
//! from), either followed by `:ENV=VALUE,...` for the process, or `NAME=python`
//! (the Python processor in `bench/python_processor/`, run with
//! `PAYSYNC_BENCH_PYTHON`, default `bench/python_processor/.venv/bin/python`).
//! Writes `ab.json` and `ab.md`.
//!
//! `-- --follow [--quick]` runs the follow-mode benchmark instead (throughput with
//! follow off and on, re-check lateness at paced re-check rates) and writes
//! `follow.json` and `follow.md`.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use paysync::demo::simulator::{Latency, SimOptions, Simulator, SIM_CLIENT_ID, SIM_CLIENT_SECRET};
use paysync::demo::stack::{
    free_addr, proc_usage, KafkaProcess, PaysyncProcess, StackSettings, Topics,
};
use paysync::kafka::admin::create_topics;
use paysync::kafka::tools::RawProducer;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize)]
enum Keys {
    /// Every request a different payment.
    Uniform,
    /// Payment ids drawn from a Zipf distribution over 10,000 ids (s = 0.7).
    Zipf,
}

#[derive(Clone, Debug)]
struct Scenario {
    name: &'static str,
    what: &'static str,
    n: usize,
    latency: Latency,
    latency_text: &'static str,
    error_rate: f64,
    keys: Keys,
    max_in_flight: usize,
    /// Also measure latency with a paced load at half the throughput.
    paced: bool,
    /// Compare with the naive sequential consumer.
    baseline: bool,
    /// Run against librdkafka's mock cluster hosted in the benchmark process instead
    /// of tansu (backlog run only): a broker that honours the fetch size limits, so
    /// paysync's own memory bound shows.
    mock_broker: bool,
}

#[derive(Debug, Default, Serialize)]
struct ScenarioResult {
    name: String,
    what: String,
    n: usize,
    max_in_flight: usize,
    latency: String,
    error_rate: f64,
    keys: String,
    throughput_rps: f64,
    little_limit_rps: Option<f64>,
    sim_capacity_rps: f64,
    broker_capacity_rps: f64,
    ratio_to_limit: f64,
    baseline_rps: Option<f64>,
    ratio_to_baseline: Option<f64>,
    paced_rate_rps: Option<f64>,
    e2e_ms: Option<Percentiles>,
    overhead_ms: Option<Percentiles>,
    relay_floor_ms: Option<Percentiles>,
    peak_rss_mb: f64,
    cpu_s_per_1k: f64,
    wall_s: f64,
}

#[derive(Debug, Default, Serialize, Clone, Copy)]
struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Percentiles {
        p50: at(0.5),
        p95: at(0.95),
        p99: at(0.99),
        max: *v.last().unwrap_or(&0.0),
    }
}

// ---- broker -------------------------------------------------------------------------

/// The broker: `PAYSYNC_BENCH_BROKERS`, or Apache Kafka started for the run
/// (`tests/kafka/broker.sh`).
struct Broker {
    _kafka: Option<KafkaProcess>,
    bootstrap: String,
}

impl Broker {
    fn start() -> Broker {
        if let Ok(b) = std::env::var("PAYSYNC_BENCH_BROKERS") {
            return Broker {
                _kafka: None,
                bootstrap: b,
            };
        }
        let kafka = KafkaProcess::start().expect("Apache Kafka starts (Java 17 and Maven)");
        Broker {
            bootstrap: kafka.bootstrap().to_owned(),
            _kafka: Some(kafka),
        }
    }
}

// ---- load -------------------------------------------------------------------------

struct Ids {
    keys: Keys,
    cdf: Vec<f64>,
    rng: fastrand::Rng,
    next: usize,
}

impl Ids {
    fn new(keys: Keys) -> Ids {
        let k = 10_000;
        let s = 0.7;
        let weights: Vec<f64> = (1..=k).map(|i| 1.0 / (i as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights.iter().map(|w| {
            acc += w / total;
            acc
        });
        Ids {
            keys,
            cdf: cdf.collect(),
            rng: fastrand::Rng::with_seed(42),
            next: 0,
        }
    }

    fn next(&mut self) -> String {
        match self.keys {
            Keys::Uniform => {
                self.next += 1;
                format!("success-u{}", self.next)
            }
            Keys::Zipf => {
                let x = self.rng.f64();
                let i = self.cdf.partition_point(|c| *c < x);
                format!("success-z{i}")
            }
        }
    }
}

fn request_value(id: &str) -> String {
    format!(r#"{{"connector_transaction_id":"{id}","payment_method_type":"GOOGLE_PAY"}}"#)
}

/// Loads a backlog of `n` requests.
fn load_backlog(brokers: &str, topic: &str, n: usize, keys: Keys) {
    let producer = RawProducer::new(brokers).unwrap();
    let mut ids = Ids::new(keys);
    for _ in 0..n {
        let id = ids.next();
        producer
            .enqueue_blocking(topic, id.as_bytes(), request_value(&id).as_bytes())
            .unwrap();
    }
    producer.flush(Duration::from_secs(300)).unwrap();
}

// ---- paysync process ----------------------------------------------------------------

fn topics(name: &str) -> Topics {
    Topics::unique(&format!("bench-{name}"), PARTITIONS)
}

const PARTITIONS: i32 = 8;
const MOCK_PARTITIONS: i32 = 32;

/// The local-stack settings with the bench's engine bounds and JSON logs.
fn config(
    brokers: &str,
    t: &Topics,
    base_url: &str,
    http: SocketAddr,
    max_in_flight: usize,
    extra: &str,
) -> String {
    let engine =
        format!("[processing]\nmax_in_flight = {max_in_flight}\nmax_queued_per_key = 64\n");
    // The shared settings already have [processing] (shutdown_timeout): merge by
    // appending keys to that table instead of repeating it.
    let toml = StackSettings {
        brokers,
        topics: t,
        simulator: base_url,
        listen: http,
        extra,
    }
    .toml();
    toml.replacen("[processing]\n", &engine, 1)
}

struct Paysync(PaysyncProcess);

impl Paysync {
    fn spawn(brokers: &str, t: &Topics, base_url: &str, max_in_flight: usize) -> Paysync {
        Self::spawn_with(brokers, t, base_url, max_in_flight, "")
    }

    fn spawn_with(
        brokers: &str,
        t: &Topics,
        base_url: &str,
        max_in_flight: usize,
        extra: &str,
    ) -> Paysync {
        // PAYSYNC_BENCH_BIN runs the scenarios with another build.
        let bin = std::env::var("PAYSYNC_BENCH_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_paysync").to_owned());
        Self::spawn_bin(
            bin.as_ref(),
            brokers,
            t,
            base_url,
            max_in_flight,
            extra,
            &[],
        )
    }

    /// Any paysync binary, at the default log level (`info`), with `env` set.
    fn spawn_bin(
        bin: &std::path::Path,
        brokers: &str,
        t: &Topics,
        base_url: &str,
        max_in_flight: usize,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Paysync {
        let http = free_addr();
        let toml = config(brokers, t, base_url, http, max_in_flight, extra);
        let mut all = vec![("PAYSYNC_LOG__LEVEL", "info")];
        all.extend_from_slice(env);
        Paysync(PaysyncProcess::spawn(bin, &toml, http, &all).unwrap())
    }

    /// (peak RSS in MiB, CPU seconds) from /proc.
    fn usage(&self) -> (f64, f64) {
        self.0.usage()
    }

    fn stop(mut self) {
        self.0.signal("TERM");
        self.0.wait_exit(Duration::from_secs(60));
    }
}

/// Reads the output topic until `n` records arrived; returns (receive instant,
/// record timestamp in ms, key) in arrival order.
fn read_n(brokers: &str, topic: &str, n: usize, timeout: Duration) -> Vec<(Instant, i64, Vec<u8>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    let partitions = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap()
        .topics()
        .first()
        .map_or(PARTITIONS, |t| t.partitions().len() as i32);
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            out.push((
                Instant::now(),
                m.timestamp().to_millis().unwrap_or(0),
                m.key().unwrap_or_default().to_vec(),
            ));
        }
    }
    out
}

// ---- limits and baseline ---------------------------------------------------------------

/// The simulator's capacity at `concurrency` with a plain HTTP load loop.
async fn sim_capacity(base_url: &str, concurrency: usize, duration: Duration) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let token: serde_json::Value = client
        .post(format!("{base_url}/api/v1/authorization/oauth2/token"))
        .form(&[
            ("client_id", SIM_CLIENT_ID),
            ("client_secret", SIM_CLIENT_SECRET),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = format!("Bearer {}", token["access_token"].as_str().unwrap());
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let client = client.clone();
        let bearer = bearer.clone();
        let base = base_url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let url = format!(
                    "{base}/api/v1/paymentmethods/google-pay/v1/transactions/success-cap-{w}-{n}"
                );
                if let Ok(r) = client
                    .get(url)
                    .header("authorization", &bearer)
                    .send()
                    .await
                {
                    let _ = r.bytes().await;
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// The broker's produce-plus-consume capacity for these record sizes: produce
/// `m` event-sized records (idempotent, acks=all, like paysync) and consume `m`
/// request-sized records; both loads together, per request.
async fn broker_capacity(brokers: &str, m: usize) -> f64 {
    let t = topics("cap");
    create_topics(brokers, &[(&t.input, PARTITIONS), (&t.output, PARTITIONS)])
        .await
        .unwrap();
    let request = request_value("success-cap-000000");
    let event = vec![b'e'; 640];
    let b = brokers.to_owned();
    let input = t.input.clone();
    tokio::task::spawn_blocking(move || load_backlog(&b, &input, m, Keys::Uniform))
        .await
        .unwrap();
    let _ = request;
    let b = brokers.to_owned();
    let input = t.input.clone();
    let started = Instant::now();
    let consume =
        tokio::task::spawn_blocking(move || read_n(&b, &input, m, Duration::from_secs(300)).len());
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut pending = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    for i in 0..m {
        let key = format!("k{i}");
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&t.output)
            .key(key.as_bytes())
            .payload(&event[..]);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((_, back)) => {
                    record = back;
                    pending.next().await;
                }
            }
        }
        if pending.len() >= 10_000 {
            pending.next().await;
        }
    }
    while pending.next().await.is_some() {}
    let consumed = consume.await.unwrap();
    assert_eq!(consumed, m);
    m as f64 / started.elapsed().as_secs_f64()
}

/// A naive sequential consumer doing the same work: consume one request, call the
/// connector, publish the event, wait for the acknowledgement, commit, repeat.
async fn baseline(
    brokers: &str,
    base_url: &str,
    s: &Scenario,
    limit: usize,
    budget: Duration,
) -> f64 {
    let t = topics("base");
    create_topics(
        brokers,
        &[(&t.input, PARTITIONS), (&t.output, PARTITIONS), (&t.dlq, 1)],
    )
    .await
    .unwrap();
    let b = brokers.to_owned();
    let input = t.input.clone();
    let keys = s.keys;
    tokio::task::spawn_blocking(move || load_backlog(&b, &input, limit, keys))
        .await
        .unwrap();
    let settings = paysync::config::Settings::from_toml(&config(
        brokers,
        &t,
        base_url,
        free_addr(),
        s.max_in_flight,
        "",
    ))
    .unwrap();
    let metrics = Arc::new(paysync::telemetry::Metrics::new());
    let processor = paysync::pipeline::process::Processor::new(
        paysync::app::gateways(&settings, &metrics).unwrap(),
        paysync::codec::DecodeOptions::new("cm", "default"),
        paysync::codec::EventEncoder::new(paysync::codec::WireFormat::SingleObject),
        settings.secret_fields(),
        metrics,
        settings.kafka.max_record_bytes,
    );
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &t.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&t.input]).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    let topic: Arc<str> = Arc::from(t.input.as_str());
    let ledger = paysync::pipeline::ledger::Ledger::new();
    let mut done = 0usize;
    let mut started: Option<Instant> = None;
    while done < limit && started.is_none_or(|s| s.elapsed() < budget) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        started.get_or_insert_with(Instant::now);
        let incoming = paysync::pipeline::record::Incoming {
            topic: topic.clone(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: Vec::new(),
            received: paysync::clock::Instant::now(),
            recheck: false,
        };
        let epoch = ledger.epoch(m.partition());
        let job = processor.prepare(incoming, epoch);
        for out in processor.process(&job).await {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&t.output);
            if let Some(k) = &out.key {
                record = record.key(k);
            }
            if let Some(v) = &out.value {
                record = record.payload(v);
            }
            producer.send(record, Timeout::Never).await.unwrap();
        }
        consumer.commit_message(&m, CommitMode::Sync).unwrap();
        done += 1;
    }
    done as f64 / started.map_or(1.0, |s| s.elapsed().as_secs_f64())
}

/// Sends a warm-up request, waits for the consumer under test to be running, then
/// sends `count` requests at `rate` per second (librdkafka's default 5 ms linger)
/// and reads the output topic. Returns each request's end-to-end latency in ms:
/// from handing it to the producer to reading its event.
async fn paced_latencies(brokers: &str, t: &Topics, rate: f64, count: usize) -> Vec<f64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let warm = request_value("success-warm");
    producer
        .send(
            FutureRecord::to(&t.input)
                .key(&b"warm"[..])
                .payload(warm.as_bytes()),
            Timeout::Never,
        )
        .await
        .unwrap();
    let (b, output) = (brokers.to_owned(), t.output.clone());
    let reader =
        std::thread::spawn(move || read_n(&b, &output, count + 1, Duration::from_secs(600)));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut sent: HashMap<Vec<u8>, Instant> = HashMap::with_capacity(count);
    let mut ids = Ids::new(Keys::Uniform);
    let mut deliveries = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let id = format!("{}-p{i}", ids.next());
        let value = request_value(&id);
        sent.insert(id.clone().into_bytes(), Instant::now());
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&t.input)
            .key(id.as_bytes())
            .payload(value.as_bytes());
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    futures::future::join_all(deliveries).await;
    let got = reader.join().unwrap();
    got.iter()
        .filter_map(|(at, _, key)| sent.get(key).map(|s| (*at - *s).as_secs_f64() * 1000.0))
        .collect()
}

/// A plain relay with paysync's own client settings and no work in between:
/// consume a request, produce it unchanged to the output topic. Its latency is the
/// floor set by the broker and the two client hops.
fn spawn_relay(
    brokers: &str,
    t: &Topics,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let settings = paysync::config::Settings::from_toml(&config(
        brokers,
        t,
        "http://127.0.0.1:9",
        free_addr(),
        1000,
        "",
    ))
    .unwrap();
    let consumer: BaseConsumer = paysync::kafka::consumer_config(&settings.kafka)
        .create()
        .unwrap();
    consumer.subscribe(&[&t.input]).unwrap();
    let producer: BaseProducer = paysync::kafka::producer_config(&settings.kafka)
        .create()
        .unwrap();
    let output = t.output.clone();
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            producer.poll(Duration::ZERO);
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(5)) else {
                continue;
            };
            let key = m.key().unwrap_or_default().to_vec();
            let value = m.payload().unwrap_or_default().to_vec();
            while producer
                .send(
                    BaseRecord::<[u8], [u8]>::to(&output)
                        .key(&key)
                        .payload(&value),
                )
                .is_err()
            {
                producer.poll(Duration::from_millis(1));
            }
        }
        let _ = producer.flush(Duration::from_secs(10));
    })
}

// ---- one scenario -----------------------------------------------------------------

async fn run(broker: &Broker, s: &Scenario, backlog_only: bool) -> ScenarioResult {
    eprintln!("== {} ({})", s.name, s.what);
    let mock = s
        .mock_broker
        .then(|| paysync::kafka::tools::MockBroker::start(&[]).unwrap());
    let bootstrap = mock
        .as_ref()
        .map_or_else(|| broker.bootstrap.clone(), |m| m.bootstrap());
    let brokers = bootstrap.as_str();
    let sim = Simulator::start(
        "127.0.0.1:0".parse().unwrap(),
        SimOptions {
            latency: s.latency,
            error_rate: s.error_rate,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let base_url = sim.base_url();

    // Throughput with a backlog.
    let t = topics(s.name);
    match &mock {
        Some(m) => {
            // The mock cluster keeps only 5 MiB per partition (older data is deleted
            // as if by retention): spread a large backlog so that none is lost.
            for (topic, partitions) in [
                (&t.input, MOCK_PARTITIONS),
                (&t.output, MOCK_PARTITIONS),
                (&t.dlq, 1),
            ] {
                m.create_topic(topic, partitions).unwrap();
            }
        }
        None => create_topics(
            brokers,
            &[(&t.input, PARTITIONS), (&t.output, PARTITIONS), (&t.dlq, 1)],
        )
        .await
        .unwrap(),
    }
    let (b, input, n, keys) = (brokers.to_owned(), t.input.clone(), s.n, s.keys);
    tokio::task::spawn_blocking(move || load_backlog(&b, &input, n, keys))
        .await
        .unwrap();
    let wall = Instant::now();
    let paysync = Paysync::spawn(brokers, &t, &base_url, s.max_in_flight);
    // PAYSYNC_BENCH_PROFILE=DIR samples paysync's stacks during the backlog run
    // (PAYSYNC_BENCH_PROFILE_HZ samples per second, default 199).
    let profiler = std::env::var("PAYSYNC_BENCH_PROFILE").ok().map(|dir| {
        let hz = std::env::var("PAYSYNC_BENCH_PROFILE_HZ").unwrap_or_else(|_| "199".into());
        Command::new("perf")
            .args([
                "record",
                "-F",
                &hz,
                "--call-graph",
                "dwarf,16384",
                "-p",
                &paysync.0.child.id().to_string(),
                "-o",
            ])
            .arg(PathBuf::from(dir).join(format!("{}.perf.data", s.name)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf is installed")
    });
    let (b, output) = (brokers.to_owned(), t.output.clone());
    let received =
        tokio::task::spawn_blocking(move || read_n(&b, &output, n, Duration::from_secs(1800)))
            .await
            .unwrap();
    assert_eq!(
        received.len(),
        s.n,
        "{}: every request produced an event",
        s.name
    );
    let (rss, cpu) = paysync.usage();
    if let Some(p) = profiler {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(p.id().to_string())
            .status();
        let _ = p.wait_with_output();
    }
    paysync.stop();
    // From the first to the last publish, by the events' own timestamps (the
    // reader may lag, so its receive times are not the clock to use).
    let first = received.iter().map(|r| r.1).min().unwrap();
    let last = received.iter().map(|r| r.1).max().unwrap();
    let throughput = (s.n - 1) as f64 / ((last - first) as f64 / 1000.0).max(1e-3);
    let wall_s = wall.elapsed().as_secs_f64();
    eprintln!(
        "   throughput {throughput:.0}/s, peak RSS {rss:.1} MiB, CPU {cpu:.2}s, connector concurrency max {}",
        sim.max_concurrency()
    );

    // Latency with a paced load at half that throughput, and the same load through a
    // plain relay with paysync's client settings (the floor Kafka itself sets).
    let (mut e2e, mut overhead, mut floor, mut paced_rate) = (None, None, None, None);
    if s.paced && !backlog_only && !s.mock_broker {
        let rate = throughput / 2.0;
        let count = ((rate * 5.0) as usize).clamp(200, 20_000);
        let t = topics(&format!("{}-paced", s.name));
        create_topics(
            brokers,
            &[(&t.input, PARTITIONS), (&t.output, PARTITIONS), (&t.dlq, 1)],
        )
        .await
        .unwrap();
        let paysync = Paysync::spawn(brokers, &t, &base_url, s.max_in_flight);
        let lat = paced_latencies(brokers, &t, rate, count).await;
        if let Ok(text) = reqwest::get(format!("http://{}/metrics", paysync.0.http)).await {
            if let Ok(text) = text.text().await {
                let sum = paysync::telemetry::sum_metric(
                    &text,
                    "paysync_processing_duration_seconds_sum",
                    &[],
                );
                let count = paysync::telemetry::sum_metric(
                    &text,
                    "paysync_processing_duration_seconds_count",
                    &[],
                );
                eprintln!(
                    "   paysync consume-to-ack mean {:.1} ms over {count} requests",
                    sum / count.max(1.0) * 1000.0
                );
            }
        }
        paysync.stop();
        let connector_ms = match s.latency {
            Latency::Fixed(d) => d.as_secs_f64() * 1000.0,
            _ => 0.0,
        };
        if !lat.is_empty() {
            overhead = Some(percentiles(
                lat.iter().map(|l| (l - connector_ms).max(0.0)).collect(),
            ));
            e2e = Some(percentiles(lat));
            paced_rate = Some(rate);
        }
        let t = topics(&format!("{}-relay", s.name));
        create_topics(brokers, &[(&t.input, PARTITIONS), (&t.output, PARTITIONS)])
            .await
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let relay = spawn_relay(brokers, &t, stop.clone());
        let lat = paced_latencies(brokers, &t, rate, count).await;
        stop.store(true, std::sync::atomic::Ordering::Release);
        relay.join().unwrap();
        if !lat.is_empty() {
            floor = Some(percentiles(lat));
        }
        if let (Some(o), Some(f)) = (overhead, floor) {
            eprintln!(
                "   overhead p50 {:.1} ms p99 {:.1} ms; relay floor p50 {:.1} ms p99 {:.1} ms",
                o.p50, o.p99, f.p50, f.p99
            );
        }
    }

    if backlog_only || s.mock_broker {
        sim.stop().await;
        return ScenarioResult {
            name: s.name.to_owned(),
            what: s.what.to_owned(),
            n: s.n,
            max_in_flight: s.max_in_flight,
            latency: s.latency_text.to_owned(),
            keys: format!("{:?}", s.keys),
            throughput_rps: throughput,
            peak_rss_mb: rss,
            cpu_s_per_1k: cpu / s.n as f64 * 1000.0,
            wall_s,
            ..Default::default()
        };
    }
    let sim_cap = sim_capacity(&base_url, s.max_in_flight.min(1000), Duration::from_secs(3)).await;
    let broker_cap = broker_capacity(brokers, 50_000.min(s.n.max(20_000))).await;
    let limit = sim_cap.min(broker_cap);
    let base = if s.baseline {
        let per_call = match s.latency {
            Latency::Fixed(d) if !d.is_zero() => d.as_secs_f64(),
            Latency::LongTail { base, .. } => base.as_secs_f64(),
            _ => 0.0005,
        };
        let count = ((5.0 / per_call) as usize).clamp(50, 5000);
        Some(baseline(brokers, &base_url, s, count, Duration::from_secs(10)).await)
    } else {
        None
    };
    let little = match s.latency {
        Latency::Fixed(d) if !d.is_zero() => Some(s.max_in_flight as f64 / d.as_secs_f64()),
        _ => None,
    };
    sim.stop().await;
    ScenarioResult {
        name: s.name.to_owned(),
        what: s.what.to_owned(),
        n: s.n,
        max_in_flight: s.max_in_flight,
        latency: s.latency_text.to_owned(),
        error_rate: s.error_rate,
        keys: format!("{:?}", s.keys),
        throughput_rps: throughput,
        little_limit_rps: little,
        sim_capacity_rps: sim_cap,
        broker_capacity_rps: broker_cap,
        ratio_to_limit: throughput / limit,
        baseline_rps: base,
        ratio_to_baseline: base.map(|b| throughput / b),
        paced_rate_rps: paced_rate,
        e2e_ms: e2e,
        overhead_ms: overhead,
        relay_floor_ms: floor,
        peak_rss_mb: rss,
        cpu_s_per_1k: cpu / s.n as f64 * 1000.0,
        wall_s,
    }
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let scale = |n: usize| if quick { n / 10 } else { n };
    let ms = Duration::from_millis;
    let mut v = vec![
        Scenario {
            name: "cpu-0ms",
            what: "0 ms connector: CPU bound",
            n: scale(50_000),
            latency: Latency::None,
            latency_text: "0 ms",
            error_rate: 0.0,
            keys: Keys::Uniform,
            max_in_flight: 256,
            paced: true,
            baseline: true,
            mock_broker: false,
        },
        Scenario {
            name: "latency-50ms",
            what: "50 ms connector, max_in_flight 1000",
            n: scale(100_000),
            latency: Latency::Fixed(ms(50)),
            latency_text: "50 ms fixed",
            error_rate: 0.0,
            keys: Keys::Uniform,
            max_in_flight: 1000,
            paced: true,
            baseline: true,
            mock_broker: false,
        },
        Scenario {
            name: "tail-200ms-zipf",
            what: "200 ms with a long tail (1% at 2 s), Zipf keys",
            n: scale(20_000),
            latency: Latency::LongTail {
                base: ms(200),
                tail: ms(2000),
                tail_ratio: 0.01,
            },
            latency_text: "200 ms, 1% 2 s",
            error_rate: 0.0,
            keys: Keys::Zipf,
            max_in_flight: 1000,
            paced: false,
            baseline: false,
            mock_broker: false,
        },
        Scenario {
            name: "errors-5pct",
            what: "50 ms connector, 5% 503 answers (retried)",
            n: scale(50_000),
            latency: Latency::Fixed(ms(50)),
            latency_text: "50 ms fixed",
            error_rate: 0.05,
            keys: Keys::Uniform,
            max_in_flight: 1000,
            paced: false,
            baseline: false,
            mock_broker: false,
        },
    ];
    v.push(Scenario {
        name: "latency-50ms-mock",
        what: "50 ms connector, max_in_flight 1000, mock-cluster broker: memory at the bound",
        n: scale(100_000),
        latency: Latency::Fixed(ms(50)),
        latency_text: "50 ms fixed",
        error_rate: 0.0,
        keys: Keys::Uniform,
        max_in_flight: 1000,
        paced: false,
        baseline: false,
        mock_broker: true,
    });
    let growth = "0 ms connector, max_in_flight 1000: memory and CPU growth";
    let bound = "0 ms connector, max_in_flight 1000, mock-cluster broker: memory bound";
    for (n, name, what, mock_broker) in [
        (10_000, "growth-10k", growth, false),
        (100_000, "growth-100k", growth, false),
        (1_000_000, "growth-1m", growth, false),
        (10_000, "backlog-10k-mock", bound, true),
        (100_000, "backlog-100k-mock", bound, true),
        (1_000_000, "backlog-1m-mock", bound, true),
    ] {
        v.push(Scenario {
            name,
            what,
            n: scale(n),
            latency: Latency::None,
            latency_text: "0 ms",
            error_rate: 0.0,
            keys: Keys::Uniform,
            max_in_flight: 1000,
            paced: false,
            baseline: false,
            mock_broker,
        });
    }
    for m in [50, 100, 250, 500, 1000, 2000] {
        v.push(Scenario {
            name: Box::leak(format!("sweep-{m}").into_boxed_str()),
            what: "50 ms connector: throughput against max_in_flight",
            n: scale((m * 20 * 4).max(5_000)),
            latency: Latency::Fixed(ms(50)),
            latency_text: "50 ms fixed",
            error_rate: 0.0,
            keys: Keys::Uniform,
            max_in_flight: m,
            paced: false,
            baseline: false,
            mock_broker: false,
        });
    }
    v
}

// ---- CPU A/B ------------------------------------------------------------------------

/// One side of the A/B.
#[derive(Debug, Clone)]
enum Runner {
    Paysync {
        bin: PathBuf,
        env: Vec<(String, String)>,
    },
    Python,
}

#[derive(Debug, Clone)]
struct Variant {
    name: String,
    runner: Runner,
}

fn parse_variant(spec: &str) -> Variant {
    let (name, rest) = spec
        .split_once('=')
        .expect("--ab NAME=self|PATH|python[:ENV=V,...]");
    let (what, env) = rest.split_once(':').unwrap_or((rest, ""));
    let env: Vec<(String, String)> = env
        .split(',')
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (k, v) = e.split_once('=').expect("ENV=VALUE");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let runner = match what {
        "python" => Runner::Python,
        "self" => Runner::Paysync {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_paysync")),
            env,
        },
        path => Runner::Paysync {
            bin: PathBuf::from(path),
            env,
        },
    };
    Variant {
        name: name.to_owned(),
        runner,
    }
}

/// The A/B's load: connector latency, paysync's `max_in_flight`, requests per round,
/// and (`--paced RATE`) a paced run per round for end-to-end latency.
#[derive(Debug, Clone, Copy, Serialize)]
struct AbLoad {
    latency_ms: u64,
    in_flight: usize,
    n: usize,
    paced_rate: Option<f64>,
}

impl AbLoad {
    /// Little's law: the most `in_flight` calls of `latency_ms` can do per second.
    fn littles_law(&self) -> Option<f64> {
        (self.latency_ms > 0).then(|| self.in_flight as f64 * 1000.0 / self.latency_ms as f64)
    }
}

#[derive(Debug, Default, Serialize)]
struct AbResult {
    variant: String,
    rounds: usize,
    n: usize,
    throughput_rps: Vec<f64>,
    cpu_us_per_request: Vec<f64>,
    peak_rss_mb: Vec<f64>,
    /// Paced runs: end-to-end latency (request produced to event read), ms.
    e2e_p50_ms: Vec<f64>,
    e2e_p99_ms: Vec<f64>,
}

/// One paced run of a variant (paysync only): `rate` requests per second for
/// ten seconds; end-to-end latency percentiles (ms).
async fn ab_paced(
    brokers: &str,
    base_url: &str,
    v: &Variant,
    round: usize,
    load: AbLoad,
    rate: f64,
) -> Option<Percentiles> {
    let Runner::Paysync { bin, env } = &v.runner else {
        return None;
    };
    let t = topics(&format!("abp-{}-{round}", v.name));
    create_topics(
        brokers,
        &[(&t.input, PARTITIONS), (&t.output, PARTITIONS), (&t.dlq, 1)],
    )
    .await
    .unwrap();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let p = Paysync::spawn_bin(bin, brokers, &t, base_url, load.in_flight, "", &env);
    let count = (rate * 10.0) as usize;
    let latencies = paced_latencies(brokers, &t, rate, count).await;
    p.stop();
    let pct = percentiles(latencies);
    eprintln!(
        "   {} round {round}: paced {rate:.0} req/s, end to end p50 {:.1} ms p99 {:.1} ms",
        v.name, pct.p50, pct.p99
    );
    Some(pct)
}

/// One backlog run of a variant: (throughput, CPU µs per request, peak RSS MiB).
async fn ab_once(
    brokers: &str,
    base_url: &str,
    v: &Variant,
    round: usize,
    load: AbLoad,
) -> (f64, f64, f64) {
    let n = load.n;
    let t = topics(&format!("ab-{}-{round}", v.name));
    create_topics(
        brokers,
        &[(&t.input, PARTITIONS), (&t.output, PARTITIONS), (&t.dlq, 1)],
    )
    .await
    .unwrap();
    let (b, input) = (brokers.to_owned(), t.input.clone());
    tokio::task::spawn_blocking(move || load_backlog(&b, &input, n, Keys::Uniform))
        .await
        .unwrap();
    let (b, output) = (brokers.to_owned(), t.output.clone());
    let reader =
        tokio::task::spawn_blocking(move || read_n(&b, &output, n, Duration::from_secs(1800)));
    let mut metrics_at = None;
    let (pid, stop): (u32, Box<dyn FnOnce()>) = match &v.runner {
        Runner::Paysync { bin, env } => {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let p = Paysync::spawn_bin(bin, brokers, &t, base_url, load.in_flight, "", &env);
            metrics_at = Some(format!("http://{}/metrics", p.0.http));
            (p.0.child.id(), Box::new(move || p.stop()))
        }
        Runner::Python => {
            let python = std::env::var("PAYSYNC_BENCH_PYTHON").unwrap_or_else(|_| {
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/bench/python_processor/.venv/bin/python"
                )
                .to_owned()
            });
            let mut child = Command::new(python)
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/bench/python_processor/processor.py"
                ))
                .args([
                    "--brokers",
                    brokers,
                    "--input",
                    &t.input,
                    "--output",
                    &t.output,
                ])
                .args(["--group", &t.group, "--cm-url", base_url])
                .args([
                    "--client-id",
                    SIM_CLIENT_ID,
                    "--client-secret",
                    SIM_CLIENT_SECRET,
                ])
                .args(["--batch", "1000", "--schema"])
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/schemas/payment_status_event.avsc"
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("the Python processor runs (bench/run.sh installs it)");
            (
                child.id(),
                Box::new(move || {
                    let _ = child.kill();
                    let _ = child.wait();
                }),
            )
        }
    };
    let received = reader.await.unwrap();
    let (rss, cpu) = proc_usage(pid);
    // Where a request's time went (paysync only): the connector call, and consume
    // to acknowledged event.
    if let Some(url) = metrics_at {
        if let Ok(text) = reqwest::get(url).await.and_then(|r| r.error_for_status()) {
            let text = text.text().await.unwrap_or_default();
            let mean = |name: &str| {
                let sum = paysync::telemetry::sum_metric(&text, &format!("{name}_sum"), &[]);
                let count = paysync::telemetry::sum_metric(&text, &format!("{name}_count"), &[]);
                sum / count.max(1.0) * 1000.0
            };
            eprintln!(
                "   {} round {round}: connector call mean {:.2} ms, consume to acknowledged mean {:.2} ms",
                v.name,
                mean("paysync_connector_request_duration_seconds"),
                mean("paysync_processing_duration_seconds"),
            );
            let commits = paysync::telemetry::sum_metric(
                &text,
                "paysync_transaction_commit_seconds_count",
                &[],
            );
            if commits > 0.0 {
                eprintln!(
                    "   {} round {round}: {commits} transactions, commit mean {:.2} ms",
                    v.name,
                    mean("paysync_transaction_commit_seconds"),
                );
            }
        }
    }
    stop();
    assert_eq!(
        received.len(),
        n,
        "{}: every request produced an event",
        v.name
    );
    let first = received.iter().map(|r| r.1).min().unwrap();
    let last = received.iter().map(|r| r.1).max().unwrap();
    let throughput = (n - 1) as f64 / ((last - first) as f64 / 1000.0).max(1e-3);
    let us = cpu / n as f64 * 1e6;
    eprintln!(
        "   {} round {round}: {throughput:.0} req/s, {us:.1} µs CPU/request, peak RSS {rss:.1} MiB",
        v.name
    );
    (throughput, us, rss)
}

async fn ab(broker: &Broker, variants: &[Variant], rounds: usize, load: AbLoad) -> Vec<AbResult> {
    let latency = match load.latency_ms {
        0 => Latency::None,
        ms => Latency::Fixed(Duration::from_millis(ms)),
    };
    let options = SimOptions {
        latency,
        ..Default::default()
    };
    let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let n = load.n;
    if let Some(limit) = load.littles_law() {
        // What a plain HTTP load loop gets from the simulator at this concurrency:
        // timer rounding and a busy machine already cost some of Little's law.
        let plain = sim_capacity(&sim.base_url(), load.in_flight, Duration::from_secs(5)).await;
        eprintln!(
            "   plain load loop against the simulator at {} in flight: {plain:.0} req/s ({:.2} of Little's law)",
            load.in_flight,
            plain / limit
        );
    }
    let mut out: Vec<AbResult> = variants
        .iter()
        .map(|v| AbResult {
            variant: v.name.clone(),
            rounds,
            n,
            ..Default::default()
        })
        .collect();
    for round in 0..rounds {
        // Alternate the order so neither side always runs on a warmer machine.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..variants.len()).collect()
        } else {
            (0..variants.len()).rev().collect()
        };
        for i in order {
            let (rps, us, rss) = ab_once(
                &broker.bootstrap,
                &sim.base_url(),
                &variants[i],
                round,
                load,
            )
            .await;
            out[i].throughput_rps.push(rps);
            out[i].cpu_us_per_request.push(us);
            out[i].peak_rss_mb.push(rss);
            if let Some(rate) = load.paced_rate {
                if let Some(p) = ab_paced(
                    &broker.bootstrap,
                    &sim.base_url(),
                    &variants[i],
                    round,
                    load,
                    rate,
                )
                .await
                {
                    out[i].e2e_p50_ms.push(p.p50);
                    out[i].e2e_p99_ms.push(p.p99);
                }
            }
        }
    }
    sim.stop().await;
    out
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn range(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.1}–{max:.1}")
}

fn ab_markdown(machine: &str, load: AbLoad, results: &[AbResult]) -> String {
    let mut md = String::new();
    md.push_str("# paysync CPU A/B\n\n");
    md.push_str(&format!("Machine: {machine}. {} ms connector, {} in flight (batches of 1,000 for the Python processor), default log level, alternating rounds; CPU of the whole process from `/proc` (start-up included).\n\n", load.latency_ms, load.in_flight));
    let limit = load.littles_law();
    if let Some(l) = limit {
        md.push_str(&format!(
            "Little's law limit: {} in flight / {} ms = {l:.0} req/s.\n\n",
            load.in_flight, load.latency_ms
        ));
    }
    md.push_str("| variant | rounds × requests | throughput median (range) | of Little's law (median) | CPU µs/request median (range) | peak RSS MiB median | e2e p50 ms median (range) | e2e p99 ms median (range) |\n|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let ratio = limit.map_or(String::new(), |l| {
            format!("{:.2}", median(&r.throughput_rps) / l)
        });
        let latency = |v: &[f64]| {
            if v.is_empty() {
                "".to_owned()
            } else {
                format!("{:.1} ({})", median(v), range(v))
            }
        };
        md.push_str(&format!(
            "| {} | {} × {} | {:.0} ({}) | {ratio} | {:.1} ({}) | {:.1} | {} | {} |\n",
            r.variant,
            r.rounds,
            r.n,
            median(&r.throughput_rps),
            range(&r.throughput_rps).replace(".0", ""),
            median(&r.cpu_us_per_request),
            range(&r.cpu_us_per_request),
            median(&r.peak_rss_mb),
            latency(&r.e2e_p50_ms),
            latency(&r.e2e_p99_ms),
        ));
    }
    md
}

// ---- adaptive concurrency ------------------------------------------------------------

/// One run against a processor that rate-limits its credential.
#[derive(Debug, Default, Serialize)]
struct AdaptiveResult {
    /// The processor's limit (calls per second per credential) for the first
    /// half; half of it for the second.
    limit: f64,
    variant: String,
    /// Answered (not throttled) calls per second, from paysync's start.
    answered_per_s: Vec<u64>,
    /// Calls answered 429 per second.
    throttled_per_s: Vec<u64>,
    /// The first second at which answered calls reached 0.9 of the limit.
    reached_90_at_s: Option<usize>,
    /// Mean answered calls per second over seconds 10 to 20 (at the limit).
    mean_at_limit: f64,
    /// Calls answered 429 over the whole run, as a share of all calls.
    share_429: f64,
    /// Mean answered calls per second over seconds 30 to 40 (at half the limit).
    mean_after_halving: f64,
    /// Seconds after the halving until 429s stayed under 5% of the calls of a
    /// second (three seconds in a row).
    followed_after_s: Option<usize>,
    /// Requests that ended as failed checks (`connector_error`): none may come
    /// from throttling.
    error_events: u64,
    /// The account's concurrency limit at the end (paysync's gauge).
    final_limit: f64,
}

const ADAPTIVE_HALF: u64 = 20;

/// Seconds `[from, to)` of a per-second series, averaged.
fn mean_of(series: &[u64], from: usize, to: usize) -> f64 {
    let slice: Vec<u64> = series.iter().skip(from).take(to - from).copied().collect();
    slice.iter().sum::<u64>() as f64 / slice.len().max(1) as f64
}

async fn adaptive_once(
    broker: &Broker,
    limit: f64,
    variant: &str,
    concurrency: Option<usize>,
) -> AdaptiveResult {
    let sim = Simulator::start(
        "127.0.0.1:0".parse().unwrap(),
        SimOptions {
            latency: Latency::Fixed(Duration::from_millis(50)),
            rate_limit: Some(limit),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let t = topics(&format!("adaptive-{variant}-{limit}"));
    create_topics(
        &broker.bootstrap,
        &[(&t.input, PARTITIONS), (&t.output, PARTITIONS), (&t.dlq, 1)],
    )
    .await
    .unwrap();
    // More than the processor allows over the whole run.
    let n = (limit * 2.0 * ADAPTIVE_HALF as f64 * 1.2) as usize;
    let (b, input) = (broker.bootstrap.clone(), t.input.clone());
    tokio::task::spawn_blocking(move || load_backlog(&b, &input, n, Keys::Uniform))
        .await
        .unwrap();
    let fixed = concurrency.map(|c| c.to_string());
    let mut env = vec![("PAYSYNC_LOG__LEVEL", "warn")];
    if let Some(c) = &fixed {
        env.push(("PAYSYNC_CONNECTORS__CM__CONCURRENCY", c.as_str()));
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_paysync"));
    let p = Paysync::spawn_bin(&bin, &broker.bootstrap, &t, &sim.base_url(), 500, "", &env);
    let offset = sim.answered_by_second().len();
    tokio::time::sleep(Duration::from_secs(ADAPTIVE_HALF)).await;
    sim.set_rate_limit(Some(limit / 2.0));
    tokio::time::sleep(Duration::from_secs(ADAPTIVE_HALF)).await;
    let metrics = reqwest::get(format!("http://{}/metrics", p.0.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap_or_default();
    p.stop();
    let end = offset + 2 * ADAPTIVE_HALF as usize;
    let cut = |v: Vec<u64>| -> Vec<u64> {
        let mut v: Vec<u64> = v.into_iter().skip(offset).take(end - offset).collect();
        v.resize(end - offset, 0);
        v
    };
    let answered = cut(sim.answered_by_second());
    let throttled = cut(sim.throttled_by_second());
    sim.stop().await;
    let half = ADAPTIVE_HALF as usize;
    let share_429 = throttled.iter().sum::<u64>() as f64
        / (throttled.iter().sum::<u64>() + answered.iter().sum::<u64>()).max(1) as f64;
    let followed_after_s = (half..2 * half)
        .find(|&s| {
            (s..(s + 3).min(2 * half)).all(|i| {
                let calls = answered[i] + throttled[i];
                (throttled[i] as f64) < 0.05 * calls.max(1) as f64
            })
        })
        .map(|s| s - half);
    let result = AdaptiveResult {
        limit,
        variant: variant.to_owned(),
        reached_90_at_s: answered.iter().position(|a| *a as f64 >= 0.9 * limit),
        mean_at_limit: mean_of(&answered, 10, half),
        mean_after_halving: mean_of(&answered, half + 10, 2 * half),
        share_429,
        followed_after_s,
        error_events: paysync::telemetry::sum_metric(
            &metrics,
            "paysync_requests_total",
            &[("outcome", "connector_error")],
        ) as u64,
        final_limit: paysync::telemetry::sum_metric(
            &metrics,
            "paysync_connector_concurrency_limit",
            &[("connector", "cm")],
        ),
        answered_per_s: answered,
        throttled_per_s: throttled,
    };
    eprintln!(
        "   N={limit} {variant}: reached 0.9 N at {:?} s, mean {:.0}/s at N, {:.1}% 429, mean {:.0}/s at N/2 (followed after {:?} s), {} error events, limit {:.1}",
        result.reached_90_at_s,
        result.mean_at_limit,
        result.share_429 * 100.0,
        result.mean_after_halving,
        result.followed_after_s,
        result.error_events,
        result.final_limit
    );
    result
}

/// For processors that allow 50, 200 and 1,000 calls per second per credential
/// (50 ms each), adaptive concurrency against fixed limits twice too high and
/// twice too low; the limit halves half-way through.
async fn adaptive_bench(broker: &Broker, quick: bool) -> Vec<AdaptiveResult> {
    let limits: &[f64] = if quick {
        &[200.0]
    } else {
        &[50.0, 200.0, 1000.0]
    };
    let mut out = Vec::new();
    for &limit in limits {
        // Little's law: limit × 50 ms calls in flight fit the first half.
        let right = (limit * 0.05).max(1.0);
        for (variant, concurrency) in [
            ("adaptive", None),
            ("fixed-2x-too-high", Some((right * 2.0).ceil() as usize)),
            (
                "fixed-2x-too-low",
                Some(((right / 2.0).floor() as usize).max(1)),
            ),
        ] {
            out.push(adaptive_once(broker, limit, variant, concurrency).await);
        }
    }
    out
}

fn adaptive_markdown(machine: &str, results: &[AdaptiveResult]) -> String {
    let mut md = String::from("# Adaptive concurrency against a rate-limited processor\n\n");
    md.push_str(&format!("Machine: {machine}. The simulator allows N calls per second per credential (token bucket, burst N/10, 429 with `Retry-After: 1` beyond it), 50 ms per call; a backlog larger than it can serve; N halves after {ADAPTIVE_HALF} s. paysync with `max_in_flight = 500`.\n\n"));
    md.push_str("| N/s | concurrency | reached 0.9 N after | answered/s at N (s 10–20) | 429 share | answered/s at N/2 (s 30–40) | 429s under 5% again after the halving | error events | limit at the end |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        md.push_str(&format!(
            "| {:.0} | {} | {} | {:.0} ({:.2} N) | {:.1}% | {:.0} ({:.2} N/2) | {} | {} | {:.1} |\n",
            r.limit,
            r.variant,
            r.reached_90_at_s.map_or("never".into(), |s| format!("{s} s")),
            r.mean_at_limit,
            r.mean_at_limit / r.limit,
            r.share_429 * 100.0,
            r.mean_after_halving,
            r.mean_after_halving / (r.limit / 2.0),
            r.followed_after_s.map_or("not within 20 s".into(), |s| format!("{s} s")),
            r.error_events,
            r.final_limit,
        ));
    }
    md
}

// ---- follow mode -------------------------------------------------------------------

#[derive(Debug, Default, Serialize)]
struct FollowResult {
    name: String,
    what: String,
    requests: usize,
    /// Checks per second (first checks and re-checks), by the events' own clocks.
    checks_per_s: f64,
    /// Paced runs: the rate at which re-checks came due, and how late they were taken.
    recheck_rate: Option<f64>,
    lateness_ms: Option<Percentiles>,
    peak_rss_mb: f64,
}

const FOLLOW_DELAY: u64 = 1;

fn follow_table(schedule: &str) -> String {
    format!("[connectors.cm.follow]\nschedule = {schedule}\npublish = \"changes\"\n")
}

/// Topics for a follow run, the re-check topic of `FOLLOW_DELAY` included.
async fn follow_topics(brokers: &str, name: &str) -> Topics {
    let t = topics(name);
    let recheck = format!("{}.recheck.{FOLLOW_DELAY}s", t.input);
    create_topics(
        brokers,
        &[
            (&t.input, PARTITIONS),
            (&t.output, PARTITIONS),
            (&t.dlq, 1),
            (&recheck, PARTITIONS),
        ],
    )
    .await
    .unwrap();
    t
}

/// Reads `n` events and decodes them.
fn read_events(brokers: &str, topic: &str, n: usize) -> Vec<serde_json::Value> {
    let mut reader =
        paysync::kafka::tools::TopicReader::new(brokers, &[(topic, PARTITIONS)]).unwrap();
    reader
        .read(n, Duration::from_secs(1800))
        .iter()
        .filter_map(|r| paysync::codec::avro::decode_event_json(r.value.as_deref()?).ok())
        .collect()
}

fn span_per_s(events: &[serde_json::Value]) -> f64 {
    let at: Vec<i64> = events
        .iter()
        .filter_map(|e| e["observed_at"].as_i64())
        .collect();
    let (first, last) = (at.iter().min().copied(), at.iter().max().copied());
    match (first, last) {
        (Some(f), Some(l)) if l > f => (at.len() - 1) as f64 / ((l - f) as f64 / 1000.0),
        _ => 0.0,
    }
}

/// Throughput of a backlog of `n` requests: `follow` off or on, for payments
/// that are paid at once (`success-`: one check, then an end marker) or never
/// final (`open-`: one re-check after 1 s, which ends the chain).
async fn follow_throughput(
    brokers: &str,
    base_url: &str,
    name: &'static str,
    what: &'static str,
    n: usize,
    prefix: &str,
    follow: bool,
) -> FollowResult {
    eprintln!("== {name} ({what})");
    let t = follow_topics(brokers, name).await;
    let producer = RawProducer::new(brokers).unwrap();
    for i in 0..n {
        let id = format!("{prefix}{name}-{i}");
        let value = format!(r#"{{"connector_transaction_id":"{id}","follow":{follow}}}"#);
        producer
            .enqueue_blocking(&t.input, id.as_bytes(), value.as_bytes())
            .unwrap();
    }
    producer.flush(Duration::from_secs(300)).unwrap();
    let extra = follow_table(&format!(r#"[["{FOLLOW_DELAY}s", 1]]"#));
    let paysync = Paysync::spawn_with(brokers, &t, base_url, 1000, &extra);
    let checks = if follow && prefix == "open-" {
        2 * n
    } else {
        n
    };
    let (b, output) = (brokers.to_owned(), t.output.clone());
    let events = tokio::task::spawn_blocking(move || read_events(&b, &output, checks))
        .await
        .unwrap();
    assert_eq!(events.len(), checks, "{name}: every check published");
    let (rss, _) = paysync.usage();
    paysync.stop();
    let rate = span_per_s(&events);
    eprintln!("   {rate:.0} checks/s, peak RSS {rss:.1} MiB");
    FollowResult {
        name: name.to_owned(),
        what: what.to_owned(),
        requests: n,
        checks_per_s: rate,
        peak_rss_mb: rss,
        ..Default::default()
    }
}

/// Lateness of re-checks coming due at `rate` per second: followed `open-`
/// requests sent at that rate for `seconds`, each re-checked once after 1 s. The
/// lateness of a chain is its second check's `observed_at` minus the
/// `next_check_at` its first check announced (both from the events, not from
/// paysync's own histogram).
async fn follow_lateness(brokers: &str, base_url: &str, rate: f64, seconds: f64) -> FollowResult {
    let name: &'static str = Box::leak(format!("follow-lateness-{rate:.0}").into_boxed_str());
    eprintln!("== {name} (re-checks due at {rate:.0}/s)");
    let t = follow_topics(brokers, name).await;
    let extra = follow_table(&format!(r#"[["{FOLLOW_DELAY}s", 1]]"#));
    let paysync = Paysync::spawn_with(brokers, &t, base_url, 1000, &extra);
    let ready = format!("http://{}/readyz", paysync.0.http);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reqwest::get(&ready)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "paysync not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let count = (rate * seconds) as usize;
    let (b, output) = (brokers.to_owned(), t.output.clone());
    let reader = std::thread::spawn(move || read_events(&b, &output, 2 * count));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let start = Instant::now();
    let mut deliveries = Vec::with_capacity(count);
    for i in 0..count {
        tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let id = format!("open-{name}-{i}");
        let value = format!(r#"{{"connector_transaction_id":"{id}","follow":true}}"#);
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&t.input)
            .key(id.as_bytes())
            .payload(value.as_bytes());
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    futures::future::join_all(deliveries).await;
    let events = reader.join().unwrap();
    let (rss, _) = paysync.usage();
    paysync.stop();
    let mut due: HashMap<String, i64> = HashMap::new();
    let mut taken: HashMap<String, i64> = HashMap::new();
    for e in &events {
        let id = e["connector_transaction_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match e["check_number"].as_i64() {
            Some(1) => {
                due.insert(id, e["next_check_at"].as_i64().unwrap_or(0));
            }
            Some(2) => {
                taken.insert(id, e["observed_at"].as_i64().unwrap_or(0));
            }
            _ => {}
        }
    }
    let late: Vec<f64> = taken
        .iter()
        .filter_map(|(id, at)| due.get(id).map(|d| (at - d) as f64))
        .collect();
    assert!(
        late.iter().all(|l| *l >= 0.0),
        "a re-check taken before it was due"
    );
    let rechecks: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| e["check_number"] == 2)
        .cloned()
        .collect();
    let achieved = span_per_s(&rechecks);
    let p = percentiles(late.clone());
    eprintln!(
        "   {} of {count} re-checks at {achieved:.0}/s; lateness p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
        late.len(),
        p.p50,
        p.p99,
        p.max
    );
    FollowResult {
        name: name.to_owned(),
        what: format!(
            "requests paced at {rate:.0}/s (target) for {seconds:.0} s: first checks, and re-checks 1 s later"
        ),
        requests: count,
        checks_per_s: span_per_s(&events),
        recheck_rate: Some(achieved),
        lateness_ms: Some(p),
        peak_rss_mb: rss,
    }
}

async fn follow_bench(broker: &Broker, quick: bool) -> Vec<FollowResult> {
    let brokers = broker.bootstrap.as_str();
    let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), SimOptions::default())
        .await
        .unwrap();
    let base_url = sim.base_url();
    let n = if quick { 2_000 } else { 20_000 };
    let mut out = vec![
        follow_throughput(
            brokers,
            &base_url,
            "follow-off",
            "follow off: one check each",
            n,
            "success-",
            false,
        )
        .await,
        follow_throughput(
            brokers,
            &base_url,
            "follow-on-final",
            "follow on, paid at once: one check and an end marker each",
            n,
            "success-",
            true,
        )
        .await,
        follow_throughput(
            brokers,
            &base_url,
            "follow-on-recheck",
            "follow on, never final: a first check and one re-check after 1 s each",
            n,
            "open-",
            true,
        )
        .await,
    ];
    let seconds = if quick { 5.0 } else { 20.0 };
    for rate in [500.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0] {
        out.push(follow_lateness(brokers, &base_url, rate, seconds).await);
    }
    sim.stop().await;
    out
}

fn follow_markdown(machine: &str, results: &[FollowResult]) -> String {
    let mut md = String::new();
    md.push_str("# paysync follow-mode benchmark\n\n");
    md.push_str(&format!(
        "Machine: {machine}. 0 ms connector, max_in_flight 1000, schedule `[[\"1s\", 1]]`.\n\n"
    ));
    md.push_str("| run | what | requests | checks/s | re-checks/s | lateness p50 | p95 | p99 | max | peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let (rate, l) = match (r.recheck_rate, r.lateness_ms) {
            (Some(rate), Some(l)) => (
                format!("{rate:.0}"),
                format!(
                    "{:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms",
                    l.p50, l.p95, l.p99, l.max
                ),
            ),
            _ => (String::new(), " | | | ".to_owned()),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} | {:.1} |\n",
            r.name, r.what, r.requests, r.checks_per_s, rate, l, r.peak_rss_mb
        ));
    }
    md.push_str("\nLateness: a chain's second check's `observed_at` minus the `next_check_at` its first check announced, from the events (the connector answers in 0 ms, so `observed_at` is when the re-check was taken).\n");
    md
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
            })
        })
        .unwrap_or(0.0)
        / 1024.0
        / 1024.0;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem:.0} GiB RAM, Linux {}; broker Apache Kafka (one KRaft node, tests/kafka/broker.sh), simulator and paysync on the same machine", kernel.trim())
}

fn markdown(machine: &str, results: &[ScenarioResult]) -> String {
    let mut md = String::new();
    md.push_str("# paysync benchmark results\n\n");
    md.push_str(&format!("Machine: {machine}.\n\n"));
    md.push_str("| scenario | n | max_in_flight | connector | throughput (req/s) | limit (req/s) | ratio to limit | Little's law | baseline (req/s) | ratio to baseline | peak RSS (MiB) | CPU s / 1k req |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let limit = r.sim_capacity_rps.min(r.broker_capacity_rps);
        md.push_str(&format!(
            "| {} | {} | {} | {}{} | {:.0} | {} | {} | {} | {} | {} | {:.1} | {:.3} |\n",
            r.name,
            r.n,
            r.max_in_flight,
            r.latency,
            if r.error_rate > 0.0 {
                format!(", {:.0}% errors", r.error_rate * 100.0)
            } else {
                String::new()
            },
            r.throughput_rps,
            if limit > 0.0 {
                format!("{limit:.0}")
            } else {
                String::new()
            },
            if limit > 0.0 {
                format!("{:.2}", r.ratio_to_limit)
            } else {
                String::new()
            },
            r.little_limit_rps.map_or("".into(), |l| format!(
                "{:.0} ({:.0}%)",
                l,
                r.throughput_rps / l * 100.0
            )),
            r.baseline_rps.map_or("".into(), |b| format!("{b:.1}")),
            r.ratio_to_baseline
                .map_or("".into(), |x| format!("{x:.0}×")),
            r.peak_rss_mb,
            r.cpu_s_per_1k,
        ));
    }
    md.push_str("\nLatency with a paced load at half the measured throughput (end to end: request handed to the producer to event read by a consumer; overhead: end to end minus the connector's fixed latency; relay floor: the same load through a plain consume-and-produce relay with paysync's client settings, no work in between):\n\n");
    md.push_str("| scenario | paced rate (req/s) | e2e p50 | p95 | p99 | max | overhead p50 | overhead p99 | relay floor p50 | relay floor p99 |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        if let (Some(e), Some(o), Some(rate)) = (r.e2e_ms, r.overhead_ms, r.paced_rate_rps) {
            let f = r.relay_floor_ms.unwrap_or_default();
            md.push_str(&format!(
                "| {} | {:.0} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |\n",
                r.name, rate, e.p50, e.p95, e.p99, e.max, o.p50, o.p99, f.p50, f.p99
            ));
        }
    }
    md.push_str("\nLimit: the lower of the simulator's own capacity at the same concurrency (a plain HTTP load loop) and the broker's produce-plus-consume capacity for the same record sizes. Baseline: a sequential consumer doing the same work one request at a time with a synchronous commit after each.\n");
    md
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // Only the backlog run of each scenario (throughput, RSS, CPU): for tuning.
    let backlog_only = args.iter().any(|a| a == "--backlog-only");
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(str::to_owned).collect());
    let out: PathBuf = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/results")));
    if args.iter().any(|a| a == "--list") {
        for s in scenarios(quick) {
            println!("{}: {}", s.name, s.what);
        }
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let broker = Broker::start();
    let machine = machine();
    let variants: Vec<Variant> = args
        .windows(2)
        .filter(|w| w[0] == "--ab")
        .map(|w| parse_variant(&w[1]))
        .collect();
    if !variants.is_empty() {
        let rounds = args
            .iter()
            .position(|a| a == "--rounds")
            .and_then(|i| args.get(i + 1))
            .and_then(|r| r.parse().ok())
            .unwrap_or(5);
        let number = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .map(|v| {
                    v.parse::<u64>()
                        .unwrap_or_else(|_| panic!("{flag} takes a number"))
                })
        };
        let load = AbLoad {
            latency_ms: number("--latency-ms").unwrap_or(0),
            in_flight: number("--in-flight").map_or(256, |v| v as usize),
            n: number("--requests").map_or(if quick { 10_000 } else { 50_000 }, |v| v as usize),
            paced_rate: number("--paced").map(|r| r as f64),
        };
        let results = rt.block_on(ab(&broker, &variants, rounds, load));
        std::fs::create_dir_all(&out).unwrap();
        let json = serde_json::json!({"machine": machine, "load": load, "results": results});
        std::fs::write(
            out.join("ab.json"),
            serde_json::to_string_pretty(&json).unwrap(),
        )
        .unwrap();
        let md = ab_markdown(&machine, load, &results);
        std::fs::write(out.join("ab.md"), &md).unwrap();
        let _ = std::io::stdout().write_all(md.as_bytes());
        return;
    }
    if args.iter().any(|a| a == "--adaptive") {
        let results = rt.block_on(adaptive_bench(&broker, quick));
        std::fs::create_dir_all(&out).unwrap();
        let json = serde_json::json!({"machine": machine, "quick": quick, "results": results});
        std::fs::write(
            out.join("adaptive.json"),
            serde_json::to_string_pretty(&json).unwrap(),
        )
        .unwrap();
        let md = adaptive_markdown(&machine, &results);
        std::fs::write(out.join("adaptive.md"), &md).unwrap();
        let _ = std::io::stdout().write_all(md.as_bytes());
        return;
    }
    if args.iter().any(|a| a == "--follow") {
        let results = rt.block_on(follow_bench(&broker, quick));
        std::fs::create_dir_all(&out).unwrap();
        let json = serde_json::json!({"machine": machine, "quick": quick, "results": results});
        std::fs::write(
            out.join("follow.json"),
            serde_json::to_string_pretty(&json).unwrap(),
        )
        .unwrap();
        let md = follow_markdown(&machine, &results);
        std::fs::write(out.join("follow.md"), &md).unwrap();
        let _ = std::io::stdout().write_all(md.as_bytes());
        return;
    }
    let mut results = Vec::new();
    for s in scenarios(quick) {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == s.name))
        {
            continue;
        }
        results.push(rt.block_on(run(&broker, &s, backlog_only)));
    }
    std::fs::create_dir_all(&out).unwrap();
    let json = serde_json::json!({"machine": machine, "quick": quick, "results": results});
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let md = markdown(&machine, &results);
    std::fs::write(out.join("results.md"), &md).unwrap();
    let _ = std::io::stdout().write_all(md.as_bytes());
}
