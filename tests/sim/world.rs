//! One simulated run: a cluster, members running paysync's real engines (the
//! input topic's and one per re-check topic, for either guarantee) over the
//! fake clients, a processor behind the gateways, a workload of requests, and
//! a fault schedule, all drawn from one seed, on one thread in virtual time.
//! Then faults stop, and the run must come to rest.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use paysync::app::{self, EngineEdges};
use paysync::clock::Instant;
use paysync::codec::{AcceptedSchemaIds, EventEncoder, WireFormat};
use paysync::config::Settings;
use paysync::connectors::gateway::Gateway;
use paysync::connectors::registry;
use paysync::pipeline::board::CommitBoard;
use paysync::pipeline::committer::{Committer, Mode};
use paysync::pipeline::engine::EngineStopped;
use paysync::pipeline::ledger::Ledger;
use paysync::pipeline::publish::Publisher;
use paysync::pipeline::record::RecordHeader;
use paysync::pipeline::source::Source;
use paysync::pipeline::txn::Transactions;
use paysync::telemetry::Metrics;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clients::{Env, SimProducer, SimSource, SimTxnProducer};
use crate::cluster::{Cluster, Rec};
use crate::connector::{Panicky, Payment, SimConnector};
use crate::faults::Faults;
use crate::model::{self, Request};

pub const INPUT: &str = "in";
pub const EVENTS: &str = "events";
pub const DLQ: &str = "dlq";
pub const GROUP: &str = "paysync";
/// A simulated wall clock's start: 2027-01-15T08:00:00Z.
pub const EPOCH_MS: i64 = 1_800_000_000_000;
/// Record limit of the simulated broker (and the producers' `message.max.bytes`).
const MAX_RECORD_BYTES: usize = 50_000;
/// Response limit of the connectors: a body near it makes an event with its
/// raw response larger than the record limit.
const MAX_RESPONSE_BYTES: usize = 60_000;
/// A limiter place held after a refusal comes back by then (the request
/// timeout, the longest round trip a hold can last, plus a margin).
const HOLDS_END_WITHIN: Duration = Duration::from_secs(3);

/// How long a dead member stays in its groups (the session timeout).
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Once faults stop, everything must be at rest within this.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(15 * 60);

/// What one run is.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub exactly_once: bool,
    pub partitions: usize,
    pub members: usize,
    pub requests: usize,
    pub include_raw: bool,
    pub max_in_flight: usize,
    pub transaction_interval_ms: u64,
    pub fault_rate: f64,
    pub faults_for: Duration,
}

impl Plan {
    pub fn draw(seed: u64, exactly_once: bool) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        Plan {
            seed,
            exactly_once,
            partitions: rng.usize(1..=3),
            members: rng.usize(1..=3),
            requests: rng.usize(10..=40),
            include_raw: rng.bool(),
            max_in_flight: [1, 4, 16][rng.usize(0..3)],
            transaction_interval_ms: [50, 200, 2_000][rng.usize(0..3)],
            fault_rate: [0.0, 0.05, 0.15, 0.3][rng.usize(0..4)],
            faults_for: Duration::from_secs(rng.u64(5..40)),
        }
    }
}

/// What a run came to.
pub struct Outcome {
    pub plan: Plan,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    pub counts: BTreeMap<(&'static str, &'static str), u64>,
    /// Virtual time from the end of faults to rest.
    pub settled_in: Option<Duration>,
    pub answered: usize,
    pub repeats: usize,
}

fn settings_toml(plan: &Plan, instance: &str) -> String {
    let guarantee = if plan.exactly_once {
        "exactly_once"
    } else {
        "at_least_once"
    };
    format!(
        r#"
[kafka]
brokers = "sim:9092"
group_id = "{GROUP}"
input_topic = "{INPUT}"
output_topic = "{EVENTS}"
dead_letter_topic = "{DLQ}"
recheck_topic_prefix = "{INPUT}.recheck"
instance_id = "{instance}"
commit_interval = "200ms"
[kafka.producer]
"message.max.bytes" = "{MAX_RECORD_BYTES}"
[processing]
guarantee = "{guarantee}"
max_in_flight = {in_flight}
max_request_bytes = 16384
transaction_interval = "{txn}ms"
shutdown_timeout = "1s"
recheck_gate_timeout = "20s"
[events]
include_raw_connector = {raw}
[connectors.mollie]
base_url = "http://mollie.sim"
request_timeout = "2s"
max_response_bytes = {MAX_RESPONSE_BYTES}
[connectors.mollie.retry]
max_attempts = 4
initial_backoff = "100ms"
max_backoff = "1s"
max_elapsed = "10s"
max_retry_after = "3s"
max_throttled = "30s"
[connectors.mollie.circuit]
failure_threshold = 4
cooldown = "1s"
max_cooldown = "4s"
[connectors.mollie.follow]
schedule = [["2s", 2], ["5s", 1]]
[connectors.mollie.accounts.default]
api_key = "test_simulationKey000000000000000000"
[connectors.cm]
base_url = "http://cm.sim"
request_timeout = "2s"
max_response_bytes = {MAX_RESPONSE_BYTES}
[connectors.cm.retry]
max_attempts = 4
initial_backoff = "100ms"
max_backoff = "1s"
max_elapsed = "10s"
max_retry_after = "3s"
max_throttled = "30s"
[connectors.cm.circuit]
failure_threshold = 4
cooldown = "1s"
max_cooldown = "4s"
[connectors.cm.accounts.default]
client_id = "sim"
client_secret = "sim-secret"
"#,
        in_flight = plan.max_in_flight,
        txn = plan.transaction_interval_ms,
        raw = plan.include_raw,
    )
}

/// One running engine: its task, its source, its committer.
type Running = (
    JoinHandle<Result<(), EngineStopped>>,
    Arc<SimSource>,
    Arc<Committer>,
);

/// One paysync process.
struct Member {
    instance: String,
    dead: Arc<AtomicBool>,
    token: CancellationToken,
    engines: Vec<Running>,
    publisher: Option<Arc<Publisher>>,
    waker: JoinHandle<()>,
    metrics: Arc<Metrics>,
    gateways: Vec<Arc<Gateway>>,
}

pub struct World {
    plan: Plan,
    cluster: Cluster,
    faults: Arc<Faults>,
    connector: Arc<SimConnector>,
    recheck_topics: Vec<String>,
    members: Vec<Option<Member>>,
    requests: Vec<Request>,
    restarts: AtomicU64,
    /// Request ids whose events' refusal was injected.
    refused: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl World {
    pub fn new(plan: Plan) -> Self {
        let faults = Arc::new(Faults::new(plan.seed, plan.fault_rate));
        let cluster = Cluster::new(MAX_RECORD_BYTES, Duration::from_secs(10));
        let settings = Settings::from_toml(&settings_toml(&plan, "m0")).expect("settings");
        let recheck_topics: Vec<String> = settings.recheck_topics().into_values().collect();
        cluster.create_topic(INPUT, plan.partitions);
        cluster.create_topic(EVENTS, 2);
        cluster.create_topic(DLQ, 2);
        for t in &recheck_topics {
            cluster.create_topic(t, plan.partitions);
        }
        let connector = Arc::new(SimConnector::new(
            faults.clone(),
            Duration::from_secs(2),
            MAX_RESPONSE_BYTES,
        ));
        *connector.cluster.lock().unwrap() = Some(cluster.clone());
        World {
            members: (0..plan.members).map(|_| None).collect(),
            plan,
            cluster,
            faults,
            connector,
            recheck_topics,
            requests: Vec::new(),
            restarts: AtomicU64::new(0),
            refused: Arc::default(),
        }
    }

    fn settings(&self, instance: &str) -> Settings {
        Settings::from_toml(&settings_toml(&self.plan, instance)).expect("settings")
    }

    /// Starts member `i` (again, after a crash: the same instance id).
    fn start(&mut self, i: usize) {
        let instance = format!("m{i}");
        let settings = self.settings(&instance);
        let metrics = Arc::new(Metrics::new());
        let dead = Arc::new(AtomicBool::new(false));
        let env = Env {
            refused: self.refused.clone(),
            cluster: self.cluster.clone(),
            faults: self.faults.clone(),
            dead: dead.clone(),
            events_topic: EVENTS.into(),
            dlq_topic: DLQ.into(),
        };
        let anchor = (std::time::Instant::now(), Instant::now());
        let clock: paysync::connectors::token::Clock =
            Arc::new(move || anchor.0 + Instant::now().saturating_duration_since(anchor.1));
        let mut gateways = std::collections::HashMap::new();
        for (name, cs) in &settings.connectors {
            let connector = Arc::new(Panicky(registry::get(name).expect("connector")));
            let gateway = Gateway::with_transport(
                connector,
                cs.gateway.clone(),
                metrics.clone(),
                clock.clone(),
                self.connector.clone(),
            )
            .expect("gateway");
            gateways.insert(name.clone(), Arc::new(gateway));
        }
        let gateway_list: Vec<Arc<Gateway>> = gateways.values().cloned().collect();
        let processor = Arc::new(app::processor(
            &settings,
            gateways,
            EventEncoder::new(WireFormat::SingleObject),
            AcceptedSchemaIds::new(std::iter::empty()),
            metrics.clone(),
        ));
        let board = CommitBoard::new();
        let publisher = (!self.plan.exactly_once).then(|| {
            Arc::new(Publisher::new(
                Arc::new(SimProducer::new(env.clone())),
                EVENTS,
                DLQ,
                metrics.clone(),
            ))
        });
        let token = CancellationToken::new();
        let mut engines = Vec::new();
        let topics: Vec<(String, bool)> = std::iter::once((INPUT.to_owned(), false))
            .chain(self.recheck_topics.iter().map(|t| (t.clone(), true)))
            .collect();
        for (topic, recheck) in topics {
            let suffix = topic.strip_prefix(INPUT).unwrap_or(&topic).to_owned();
            let group = format!("{GROUP}{suffix}");
            let source = SimSource::new(env.clone(), &topic, &group, recheck);
            let dyn_source: Arc<dyn Source> = source.clone();
            board.register(&dyn_source);
            let ledger = Arc::new(Ledger::new());
            let (mode, interval) = match &publisher {
                Some(p) => (Mode::AtLeastOnce(p.clone()), settings.kafka.commit_interval),
                None => {
                    let id = format!("{GROUP}-{instance}{suffix}");
                    let producer = Arc::new(SimTxnProducer::new(
                        env.clone(),
                        &id,
                        &topic,
                        source.clone(),
                    ));
                    let txn = Arc::new(Transactions::new(
                        producer,
                        dyn_source.clone(),
                        ledger.clone(),
                        metrics.clone(),
                        settings.processing.transaction_interval,
                        settings.processing.max_pending_records,
                    ));
                    (
                        Mode::ExactlyOnce(txn),
                        settings.processing.transaction_interval,
                    )
                }
            };
            let (engine, committer) = app::engine(
                &settings,
                EngineEdges {
                    topic: &topic,
                    recheck,
                    source: dyn_source,
                    mode,
                    interval,
                    ledger,
                },
                &processor,
                &metrics,
                &board,
            );
            let handle = tokio::spawn(engine.run(token.child_token()));
            engines.push((handle, source, committer));
        }
        let sources: Vec<Arc<SimSource>> = engines.iter().map(|(_, s, _)| s.clone()).collect();
        let changed = self.cluster.changed.clone();
        let waker = tokio::spawn(async move {
            loop {
                changed.notified().await;
                for s in &sources {
                    s.notify();
                }
            }
        });
        self.cluster.trace(format!("start member {instance}"));
        self.members[i] = Some(Member {
            instance,
            dead,
            token,
            engines,
            publisher,
            waker,
            metrics,
            gateways: gateway_list,
        });
    }

    /// Member `i` dies at once (kill -9): nothing of it answers any more; its
    /// groups expel it after the session timeout.
    fn kill(&mut self, i: usize) -> Option<Vec<(String, u64)>> {
        let member = self.members[i].take()?;
        member.dead.store(true, Ordering::Relaxed);
        for (handle, _, _) in &member.engines {
            handle.abort();
        }
        member.waker.abort();
        self.cluster
            .trace(format!("kill member {}", member.instance));
        Some(
            member
                .engines
                .iter()
                .filter_map(|(_, s, _)| s.member().map(|m| (s.group().to_owned(), m)))
                .collect(),
        )
    }

    fn expel_later(&self, groups: Vec<(String, u64)>) {
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SESSION_TIMEOUT).await;
            for (group, member) in groups {
                cluster.expel(&group, member);
            }
        });
    }

    /// The workload: requests written to the input topic over a while.
    fn workload(&mut self) -> Vec<(Duration, Request)> {
        let rng = &self.faults;
        let mut out = Vec::new();
        for n in 0..self.plan.requests {
            let at = Duration::from_millis(rng.range(0..20_000));
            let kind = rng.range(0..100);
            let mollie = rng.range(0..10) < 7;
            let id = if mollie {
                format!("tr_sim{n}")
            } else {
                format!("cm-sim-{n}")
            };
            let connector = if mollie { "mollie" } else { "cm" };
            let follow = mollie && (20..55).contains(&kind);
            let webhook = (55..65).contains(&kind);
            let poison = kind >= 85;
            let progression: &[&[&'static str]] = if mollie {
                &[
                    &["open", "pending", "paid"],
                    &["paid"],
                    &["open", "failed"],
                    &["open", "open", "expired"],
                    &["authorized", "paid"],
                ]
            } else {
                &[
                    &["OPEN", "SUCCESS"],
                    &["SUCCESS"],
                    &["AUTHORIZED", "CANCELLED"],
                ]
            };
            let statuses = progression[rng.range(0..progression.len() as u64) as usize].to_vec();
            let mut payment = Payment {
                statuses,
                forever_429: false,
                not_found: webhook && rng.chance(0.5),
                panic: false,
                big: false,
            };
            if rng.on() && rng.chance(self.plan.fault_rate) {
                payment.forever_429 = true;
                rng.count("connector", "429_forever");
            } else if rng.on() && rng.chance(self.plan.fault_rate) {
                payment.panic = true;
                rng.count("connector", "panic_in_translation");
            }
            // A body near the response limit is a payment's shape, not a fault.
            if rng.chance(0.05) {
                payment.big = true;
                rng.count("connector", "body_near_limit");
            }
            if payment.not_found {
                rng.count("connector", "404");
            }
            self.connector.add(&id, payment.clone());
            let (value, headers): (Vec<u8>, Vec<RecordHeader>) = if poison {
                match rng.range(0..4) {
                    0 => (b"{not json".to_vec(), Vec::new()),
                    1 => (br#"{"connector":"mollie"}"#.to_vec(), Vec::new()),
                    2 => (
                        format!(r#"{{"connector_transaction_id":"{id}","connector":"{connector}","merchant_id":"nobody"}}"#).into_bytes(),
                        Vec::new(),
                    ),
                    _ => (
                        format!(r#"{{"connector_transaction_id":"{id}","connector":"{connector}"}}"#).into_bytes(),
                        vec![(b"\xff\xfe".to_vec(), None), (b"x-merchant-id".to_vec(), Some(b"\xff".to_vec()))],
                    ),
                }
            } else {
                let mut headers = Vec::new();
                if webhook {
                    headers.push((b"x-request-source".to_vec(), Some(b"webhook".to_vec())));
                }
                (
                    format!(r#"{{"connector_transaction_id":"{id}","connector":"{connector}","follow":{follow}}}"#)
                        .into_bytes(),
                    headers,
                )
            };
            out.push((
                at,
                Request {
                    key: id.clone().into_bytes(),
                    value,
                    headers,
                    id,
                    follow,
                    webhook,
                    poison,
                    not_found: payment.not_found,
                    big: payment.big,
                    partition: -1,
                    offset: -1,
                },
            ));
        }
        out.sort_by_key(|(at, _)| *at);
        out
    }

    /// The whole run.
    pub async fn run(mut self) -> Outcome {
        let started = Instant::now();
        for i in 0..self.plan.members {
            self.start(i);
        }
        // The coordinator expires transactions that outlive their timeout.
        let cluster = self.cluster.clone();
        let expiry = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                cluster.expire_transactions();
            }
        });
        let mut load = self.workload().into_iter().peekable();
        let faults_end = started + self.plan.faults_for;
        let mut next_fault = started + Duration::from_millis(self.faults.range(300..3_000));
        let mut restarts: Vec<(Instant, usize)> = Vec::new();
        // Faults and load, until both are over.
        loop {
            let now = Instant::now();
            while let Some((at, _)) = load.peek() {
                if started + *at > now {
                    break;
                }
                let (_, mut r) = load.next().unwrap();
                let p = self.cluster.partition_for(INPUT, Some(&r.key));
                let o = self
                    .cluster
                    .append(
                        INPUT,
                        p,
                        Rec {
                            key: Some(r.key.clone()),
                            value: Some(r.value.clone()),
                            headers: r.headers.clone(),
                        },
                    )
                    .unwrap();
                r.partition = p;
                r.offset = o;
                self.requests.push(r);
            }
            if now >= faults_end && self.faults.on() {
                self.faults.stop();
                self.cluster.trace("faults stop".into());
            }
            if self.faults.on() && now >= next_fault {
                self.inject(&mut restarts);
                next_fault = now + Duration::from_millis(self.faults.range(300..3_000));
            }
            self.supervise(&mut restarts);
            let due: Vec<usize> = restarts
                .iter()
                .filter(|(at, _)| *at <= now)
                .map(|(_, i)| *i)
                .collect();
            for i in due {
                if self.members[i].is_none() {
                    self.start(i);
                }
            }
            restarts.retain(|(at, _)| *at > now);
            if load.peek().is_none() && !self.faults.on() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Liveness: everything down is restarted, and the run must come to rest.
        for i in 0..self.plan.members {
            if self.members[i].is_none() {
                self.start(i);
            }
        }
        let quiet_from = Instant::now();
        let mut settled_in = None;
        while Instant::now().saturating_duration_since(quiet_from) < LIVENESS_BOUND {
            self.supervise(&mut restarts);
            for (at, i) in std::mem::take(&mut restarts) {
                let _ = at;
                if self.members[i].is_none() {
                    self.start(i);
                }
            }
            if self.at_rest() {
                settled_in = Some(Instant::now().saturating_duration_since(quiet_from));
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // A place held after a refusal comes back one round trip after its
        // call started (at most the request timeout, 2 s here): give the last
        // refusals that long before asking for every place back.
        if settled_in.is_some() {
            tokio::time::sleep(HOLDS_END_WITHIN).await;
        }
        let (in_flight, limiters) = self.leftovers();
        // Shutdown.
        for m in self.members.iter().flatten() {
            m.token.cancel();
        }
        for m in self.members.iter_mut().flatten() {
            for (handle, _, _) in &mut m.engines {
                let _ = tokio::time::timeout(Duration::from_secs(30), handle).await;
            }
            m.waker.abort();
        }
        expiry.abort();
        let mut violations = self.cluster.violations();
        if settled_in.is_none() {
            violations.push(format!(
                "liveness: not at rest {}s after faults stopped: {}",
                LIVENESS_BOUND.as_secs(),
                self.unrest()
            ));
        }
        if in_flight > 0 {
            violations.push(format!("liveness: {in_flight} requests still in flight"));
        }
        violations.extend(limiters);
        let refused = self.refused.lock().unwrap().clone();
        let report = model::check(
            &self.cluster,
            &self.requests,
            &self.recheck_topics,
            self.plan.exactly_once,
            &self.faults,
            &refused,
        );
        violations.extend(report.violations);
        if std::env::var_os("PAYSYNC_SIM_DUMP").is_some() {
            self.dump();
        }
        let mut trace = self.faults.log();
        trace.extend(self.cluster.lock().trace.clone());
        Outcome {
            plan: self.plan.clone(),
            violations,
            trace,
            counts: self.faults.counts(),
            settled_in,
            answered: report.answered,
            repeats: report.repeats,
        }
    }

    /// Prints what a read_committed reader sees (replays, to find a fault).
    fn dump(&self) {
        let topics: Vec<String> = [EVENTS, DLQ]
            .iter()
            .map(|t| (*t).to_owned())
            .chain(self.recheck_topics.iter().cloned())
            .collect();
        for topic in topics {
            for (p, o, rec) in self.cluster.committed_records(&topic) {
                let h = |name: &str| {
                    rec.headers
                        .iter()
                        .rev()
                        .find(|(k, _)| k == name.as_bytes())
                        .and_then(|(_, v)| v.as_deref())
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default()
                };
                let detail = if topic == EVENTS {
                    let j = paysync::codec::avro::decode_event_json(
                        rec.value.as_deref().unwrap_or_default(),
                    )
                    .unwrap_or_default();
                    format!(
                        "origin {} check {} status {} next {}",
                        j["request_id"], j["check_number"], j["status"], j["next_check_at"]
                    )
                } else if topic == DLQ {
                    format!(
                        "from {}:{}:{} code {} origin {}",
                        h("paysync-source-topic"),
                        h("paysync-source-partition"),
                        h("paysync-source-offset"),
                        h("paysync-error-code"),
                        h("paysync-follow-origin")
                    )
                } else {
                    format!(
                        "origin {} check {} scheduled-by {}",
                        h("paysync-follow-origin"),
                        h("paysync-follow-check"),
                        h("paysync-follow-scheduled-by")
                    )
                };
                println!(
                    "dump {topic}:{p}:{o} key {} {detail}",
                    String::from_utf8_lossy(rec.key.as_deref().unwrap_or_default())
                );
            }
        }
    }

    /// One fault of the group or the members.
    fn inject(&mut self, restarts: &mut Vec<(Instant, usize)>) {
        let i = self.faults.range(0..self.plan.members as u64) as usize;
        let groups: Vec<String> = std::iter::once(GROUP.to_owned())
            .chain(
                self.recheck_topics
                    .iter()
                    .map(|t| format!("{GROUP}{}", t.strip_prefix(INPUT).unwrap_or(t))),
            )
            .collect();
        let g = groups[self.faults.range(0..groups.len() as u64) as usize].clone();
        match self.faults.range(0..10) {
            0..=3 => {
                self.faults.count("group", "rebalance");
                self.cluster.rebalance(&g);
            }
            4..=5 => {
                // A session timeout: the group moves on without the member,
                // which finds out later (a zombie until then).
                let member = self.members[i]
                    .as_ref()
                    .and_then(|m| m.engines.iter().find(|(_, s, _)| s.group() == g))
                    .and_then(|(_, s, _)| s.member());
                if let Some(member) = member {
                    self.faults.count("group", "lost");
                    self.cluster.lose(&g, member);
                }
            }
            6..=7 => {
                if let Some(groups) = self.kill(i) {
                    self.faults.count("member", "crash");
                    self.expel_later(groups);
                    let back =
                        Instant::now() + Duration::from_millis(self.faults.range(1_000..15_000));
                    restarts.push((back, i));
                }
            }
            _ => {}
        }
    }

    /// A member whose engine stopped, or whose producer failed for good, is
    /// restarted, as an orchestrator would after its liveness probe failed.
    fn supervise(&mut self, restarts: &mut Vec<(Instant, usize)>) {
        for i in 0..self.members.len() {
            let Some(m) = &self.members[i] else { continue };
            let stopped = m.engines.iter().any(|(h, _, _)| h.is_finished());
            let unhealthy = m.publisher.as_ref().is_some_and(|p| !p.is_healthy());
            if stopped || unhealthy {
                self.restarts.fetch_add(1, Ordering::Relaxed);
                self.cluster.trace(format!(
                    "member m{i} {}; restarted",
                    if stopped { "stopped" } else { "unhealthy" }
                ));
                if let Some(groups) = self.kill(i) {
                    self.expel_later(groups);
                    restarts.push((Instant::now() + Duration::from_secs(2), i));
                }
            }
        }
    }

    /// Every request answered and every chain ended, every group's position at
    /// the end of its partitions, nothing in flight or stalled.
    fn at_rest(&self) -> bool {
        self.unrest().is_empty()
    }

    /// What keeps the run from rest (empty at rest).
    fn unrest(&self) -> String {
        let mut why = Vec::new();
        let topics: Vec<(String, String)> = std::iter::once((INPUT.to_owned(), GROUP.to_owned()))
            .chain(self.recheck_topics.iter().map(|t| {
                (
                    t.clone(),
                    format!("{GROUP}{}", t.strip_prefix(INPUT).unwrap_or(t)),
                )
            }))
            .collect();
        for (topic, group) in topics {
            let committed = self.cluster.committed(&group);
            for p in 0..self.cluster.partitions(&topic) as i32 {
                let end = self.cluster.stable_end(&topic, p);
                let c = committed.get(&p).copied().unwrap_or(0);
                // Past the end only by markers a reader skips.
                if c < end && self.cluster.has_record_from(&topic, p, c) {
                    why.push(format!("{group} {topic}:{p} committed {c} of {end}"));
                }
            }
        }
        for m in self.members.iter().flatten() {
            let n = m.metrics.in_flight();
            if n > 0 {
                why.push(format!("{}: {n} in flight", m.instance));
            }
        }
        let open = self.cluster.open_transactions();
        if !open.is_empty() {
            why.push(format!("open transactions: {}", open.join(", ")));
        }
        why.join("; ")
    }

    /// Requests in flight and limiter places still taken, at rest.
    fn leftovers(&self) -> (i64, Vec<String>) {
        let mut in_flight = 0;
        let mut closed = Vec::new();
        for m in self.members.iter().flatten() {
            in_flight += m.metrics.in_flight();
            for g in &m.gateways {
                let taken = g.places_taken();
                if taken > 0 {
                    closed.push(format!(
                        "liveness: {}'s {} limiter still holds {taken} places",
                        m.instance,
                        g.name()
                    ));
                }
            }
        }
        (in_flight, closed)
    }
}
