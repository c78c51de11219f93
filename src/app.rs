//! Wiring: builds the connectors, the producer, the consumer and the HTTP server
//! from [`Settings`], runs the engine, and shuts everything down in order (stop
//! fetching, drain in-flight work, commit, flush the producer, leave the group).
//! Shutdown is injected, so tests and the demo can stop the service.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::codec::{AcceptedSchemaIds, DecodeOptions, EventEncoder, WireFormat};
use crate::config::{ConfigError, Guarantee, Settings};
use crate::connectors::gateway::{Gateway, GatewayError};
use crate::connectors::registry;
use crate::connectors::token::system_clock;
use crate::intake::admission::{random_id, Admission};
use crate::intake::server::{self as intake_server, Limits};
use crate::intake::tls::Tls;
use crate::intake::{Intake, Store};
use crate::kafka::intake_producer::IntakeProducer;
use crate::kafka::producer::KafkaProducer;
use crate::kafka::source::KafkaSource;
use crate::kafka::transactions::KafkaTxnProducer;
use crate::kafka::{admin, consumer_config, producer_config};
use crate::pipeline::board::CommitBoard;
use crate::pipeline::committer::{Committer, Mode};
use crate::pipeline::dispatch::{DispatchSettings, Dispatcher};
use crate::pipeline::engine::{Engine, EngineSettings};
use crate::pipeline::ledger::Ledger;
use crate::pipeline::process::{FollowPlan, Processor};
use crate::pipeline::publish::Publisher;
use crate::pipeline::queues::{Gate, Queues};
use crate::pipeline::source::Source;
use crate::pipeline::txn::Transactions;
use crate::schema_registry::{RegistryClient, RegistryError};
use crate::server::{self, HttpState, Probe};
use crate::supervisor::{Ended, Failures, Lifetime, Supervisor};
use crate::telemetry::Metrics;

/// Why paysync could not start. `main` maps the kind to the exit code: 2 for a
/// configuration that cannot work, 1 for everything else.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration is invalid (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A connector's gateway could not be built.
    #[error("connector `{name}`: {source}")]
    Connector {
        /// The connector.
        name: String,
        /// Why.
        #[source]
        source: GatewayError,
    },
    /// The Schema Registry refused or could not be reached.
    #[error(transparent)]
    SchemaRegistry(#[from] RegistryError),
    /// A Kafka client could not be created.
    #[error("cannot create the Kafka {client}: {source}")]
    Kafka {
        /// `producer` or `consumer`.
        client: &'static str,
        /// Why.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// Exactly once: the transactional producer could not start.
    #[error("cannot start the transactional producer `{id}`: {reason}; processing.guarantee = \"exactly_once\" needs a broker with transactions (Apache Kafka 0.11 or later with a transaction coordinator: transaction.state.log.* must be satisfiable)")]
    Transactions {
        /// The transactional id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A supervised task ended while paysync ran.
    #[error("paysync stopped: {0}")]
    Stopped(Ended),
    /// The HTTP server could not listen.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Listen {
        /// The setting that names the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl StartupError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartupError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// One engine the app runs: what the probes look at.
struct EngineEntry {
    topic: String,
    source: Arc<KafkaSource>,
    committer: Arc<Committer>,
    ledger: Arc<Ledger>,
    alive: Arc<AtomicBool>,
    /// Exactly once: its transactional producer (flushed at shutdown).
    txn_producer: Option<Arc<KafkaTxnProducer>>,
    abort: AbortHandle,
}

/// The engines running, shared by the probes, the discovery of re-check topics
/// and shutdown.
type Engines = Arc<Mutex<Vec<EngineEntry>>>;

/// A running paysync instance.
pub struct RunningApp {
    supervisor: Supervisor,
    failures: Failures,
    engines: Engines,
    /// The processor's producer (none when only the intake runs).
    producer: Option<Arc<KafkaProducer>>,
    metrics: Arc<Metrics>,
    http_addr: SocketAddr,
    /// The webhook intake's address, when `[webhooks]` is on.
    webhook_addr: Option<SocketAddr>,
    intake: Option<Arc<Intake>>,
    ready: Probe,
}

impl RunningApp {
    /// The metrics registry.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The address the HTTP server listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The address the webhook intake listens on, when `[webhooks]` is on.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook_addr
    }

    /// True once the consumer joined its group and the topics were found, while
    /// no partition is stalled or stuck.
    pub fn is_ready(&self) -> bool {
        (self.ready)().is_ok()
    }

    /// The topics consumed (the input, then the re-check topics).
    pub fn consumed_topics(&self) -> Vec<String> {
        lock(&self.engines)
            .iter()
            .map(|e| e.topic.clone())
            .collect()
    }

    /// Stops the input consumer loop as a crash would (tests of `/healthz` and of
    /// the supervisor).
    #[doc(hidden)]
    pub fn abort_consumer_loop(&self) {
        if let Some(engine) = lock(&self.engines).first() {
            engine.abort.abort();
        }
    }

    /// Waits until a supervised task ends unexpectedly; returns it.
    pub async fn failed(&mut self) -> Option<Ended> {
        let ended = self.failures.next().await;
        if let Some(e) = &ended {
            self.metrics.task_ended(&e.task);
        }
        ended
    }

    /// Stops fetching, drains, commits, flushes and leaves the groups.
    pub async fn stop(self) {
        self.supervisor.stop().await;
        let producer = self.producer.clone();
        let txn_producers: Vec<_> = lock(&self.engines)
            .iter()
            .filter_map(|e| e.txn_producer.clone())
            .collect();
        let intake = self.intake.clone();
        let flushed = tokio::task::spawn_blocking(move || {
            // Webhooks already answered were acknowledged by the broker; this
            // only waits for the ones cut off by shutdown.
            if let Some(intake) = intake {
                intake.flush(Duration::from_secs(5));
            }
            for p in txn_producers {
                p.flush(Duration::from_secs(10));
            }
            match producer {
                Some(p) => p
                    .flush(Duration::from_secs(30))
                    .map_err(|e| format!("producer flush: {e}")),
                None => Ok(()),
            }
        })
        .await;
        match flushed {
            Ok(Err(e)) => tracing::warn!(error = %e, "producer flush incomplete"),
            Err(e) => tracing::warn!(error = %e, "producer flush task failed"),
            Ok(Ok(())) => {}
        }
        // Dropping the last handles closes the consumers and leaves the groups.
        lock(&self.engines).clear();
        tracing::info!("stopped");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds the gateway of every configured connector.
pub fn gateways(
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<HashMap<String, Arc<Gateway>>, StartupError> {
    let mut out = HashMap::new();
    for (name, cs) in &settings.connectors {
        let connector = registry::get(name)
            .ok_or_else(|| ConfigError::new(format!("connectors.{name}"), "unknown connector"))?;
        let gateway = Gateway::new(
            connector,
            cs.gateway.clone(),
            metrics.clone(),
            system_clock(),
        )
        .map_err(|source| StartupError::Connector {
            name: name.clone(),
            source,
        })?;
        out.insert(name.clone(), Arc::new(gateway));
    }
    Ok(out)
}

/// What a process runs (`paysync run --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// The processor, and the webhook intake when `[webhooks]` exists.
    #[default]
    All,
    /// The processor only (`[webhooks]` is ignored).
    Processor,
    /// The webhook intake only (`[webhooks]` required): no consumer, no
    /// connector calls; `/readyz` is the intake's readiness.
    Webhooks,
}

/// Starts paysync (every part).
pub async fn start(settings: Settings) -> Result<RunningApp, StartupError> {
    start_as(settings, Role::All).await
}

/// Starts the parts of paysync `role` names.
pub async fn start_as(settings: Settings, role: Role) -> Result<RunningApp, StartupError> {
    let metrics = Arc::new(Metrics::new());
    if role == Role::Webhooks {
        return start_webhooks(settings, metrics).await;
    }
    let gateways = gateways(&settings, &metrics)?;
    start_with_role(settings, metrics, gateways, role).await
}

/// What it takes to start an engine (at start-up, and for re-check topics found
/// later).
#[derive(Clone)]
struct EngineFactory {
    settings: Arc<Settings>,
    processor: Arc<Processor>,
    publisher: Arc<Publisher>,
    producer: Arc<KafkaProducer>,
    metrics: Arc<Metrics>,
    board: Arc<CommitBoard>,
    supervisor: Supervisor,
    engines: Engines,
}

impl EngineFactory {
    /// Creates the consumer (and, exactly once, the transactional producer) of
    /// one engine, and runs it under the supervisor.
    async fn start(&self, topic: &str, recheck: bool) -> Result<(), StartupError> {
        let s = &self.settings;
        let k = &s.kafka;
        let exactly_once = s.processing.guarantee == Guarantee::ExactlyOnce;
        let suffix = recheck.then(|| recheck_suffix(&k.recheck_topic_prefix, topic));
        let group = match &suffix {
            Some(suffix) => format!("{}.{suffix}", k.group_id),
            None => k.group_id.clone(),
        };
        let ledger = Arc::new(Ledger::new());
        let mut config = consumer_config(k);
        config.set("group.id", &group);
        let source = Arc::new(
            KafkaSource::new(&config, topic, recheck, self.metrics.clone()).map_err(|source| {
                StartupError::Kafka {
                    client: "consumer",
                    source,
                }
            })?,
        );
        let dyn_source: Arc<dyn Source> = source.clone();
        self.board.register(&dyn_source);
        let (mode, interval, txn_producer) = if exactly_once {
            let id = match &suffix {
                Some(suffix) => format!("{}-{}.{suffix}", k.transactional_id_prefix, k.instance_id),
                None => format!("{}-{}", k.transactional_id_prefix, k.instance_id),
            };
            let producer = Arc::new(self.transactional_producer(&id, &source, topic).await?);
            let txn = Arc::new(Transactions::new(
                producer.clone(),
                dyn_source.clone(),
                ledger.clone(),
                self.metrics.clone(),
                s.processing.transaction_interval,
                s.processing.max_pending_records,
            ));
            tracing::info!(transactional_id = %id, topic, "exactly once: transactions initialized");
            (
                Mode::ExactlyOnce(txn),
                s.processing.transaction_interval,
                Some(producer),
            )
        } else {
            (
                Mode::AtLeastOnce(self.publisher.clone()),
                k.commit_interval,
                None,
            )
        };
        let (engine, committer) = engine(
            s,
            EngineEdges {
                topic,
                recheck,
                source: dyn_source,
                mode,
                interval,
                ledger: ledger.clone(),
            },
            &self.processor,
            &self.metrics,
            &self.board,
        );
        source.attach(&committer);
        let alive = Arc::new(AtomicBool::new(true));
        let flag = alive.clone();
        let shutdown = self.supervisor.token();
        let abort = self.supervisor.spawn(
            format!("engine {topic}"),
            Lifetime::UntilShutdown,
            async move {
                // Flips liveness off however the loop ends: returned, panicked or aborted.
                let _alive = AliveGuard(flag);
                engine.run(shutdown).await.map_err(|e| e.to_string())
            },
        );
        lock(&self.engines).push(EngineEntry {
            topic: topic.to_owned(),
            source,
            committer,
            ledger,
            alive,
            txn_producer,
            abort,
        });
        self.metrics.set_recheck_topics(
            lock(&self.engines)
                .iter()
                .filter(|e| e.topic != k.input_topic)
                .count(),
        );
        Ok(())
    }

    /// Exactly once: the transactional producer `id` of the engine reading
    /// `source` (initializing it fences an older producer with the same id).
    async fn transactional_producer(
        &self,
        id: &str,
        source: &Arc<KafkaSource>,
        topic: &str,
    ) -> Result<KafkaTxnProducer, StartupError> {
        let k = &self.settings.kafka;
        let weak = Arc::downgrade(source.consumer());
        let (config, topic, id2) = (producer_config(k), topic.to_owned(), id.to_owned());
        let (events, dlq) = (k.output_topic.clone(), k.dead_letter_topic.clone());
        let fail = |reason: String| StartupError::Transactions {
            id: id.to_owned(),
            reason,
        };
        tokio::task::spawn_blocking(move || {
            KafkaTxnProducer::start(&config, &id2, weak, &topic, &events, &dlq, TXN_INIT_TIMEOUT)
        })
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(e.to_string()))
    }
}

/// What one engine reads from and delivers through.
pub struct EngineEdges<'a> {
    /// The topic.
    pub topic: &'a str,
    /// It is a re-check topic.
    pub recheck: bool,
    /// Its consumer.
    pub source: Arc<dyn Source>,
    /// How it delivers (at least once through a publisher, exactly once
    /// through transactions).
    pub mode: Mode,
    /// `kafka.commit_interval` or `processing.transaction_interval`.
    pub interval: Duration,
    /// Its partitions' state.
    pub ledger: Arc<Ledger>,
}

/// Assembles one engine (its committer, dispatcher and partition queues) over
/// its edges: the seam where `paysync run` plugs in rdkafka and the
/// deterministic simulation its in-memory clients.
pub fn engine(
    s: &Settings,
    edges: EngineEdges<'_>,
    processor: &Arc<Processor>,
    metrics: &Arc<Metrics>,
    board: &Arc<CommitBoard>,
) -> (Engine, Arc<Committer>) {
    let exactly_once = matches!(edges.mode, Mode::ExactlyOnce(_));
    let committer = Arc::new(Committer::new(
        edges.source.clone(),
        edges.ledger.clone(),
        metrics.clone(),
        board.clone(),
        edges.mode,
        edges.interval,
        s.processing.shutdown_timeout,
    ));
    let dispatcher = Dispatcher::new(
        processor.clone(),
        committer.sink(),
        edges.ledger,
        metrics.clone(),
        DispatchSettings {
            max_in_flight: s.processing.max_in_flight,
            max_queued_per_key: s.processing.max_queued_per_key,
            max_held: s.processing.max_in_flight.saturating_mul(10).max(10_000),
            // Transactional topics carry a commit marker after every
            // transaction's records: gaps are normal there.
            accept_gaps: exactly_once,
        },
    );
    let gate = (edges.recheck && !exactly_once).then(|| Gate {
        board: board.clone(),
        timeout: s.processing.recheck_gate_timeout,
    });
    let queues = Queues::new(edges.topic, edges.recheck, metrics.clone(), gate);
    let engine = Engine::new(
        edges.source,
        queues,
        dispatcher,
        committer.clone(),
        metrics.clone(),
        EngineSettings {
            input_topic: edges.topic.to_owned(),
            recheck: edges.recheck,
            drain_timeout: s.processing.shutdown_timeout,
        },
    );
    (engine, committer)
}

/// The message processor of `settings` over these gateways (by connector
/// name), encoding events with `encoder`.
pub fn processor(
    settings: &Settings,
    gateways: HashMap<String, Arc<Gateway>>,
    encoder: EventEncoder,
    accepted_schema_ids: AcceptedSchemaIds,
    metrics: Arc<Metrics>,
) -> Processor {
    let exactly_once = settings.processing.guarantee == Guarantee::ExactlyOnce;
    Processor::new(
        gateways,
        DecodeOptions {
            default_connector: settings.processing.default_connector.clone(),
            default_merchant: settings.processing.default_merchant.clone(),
            max_request_bytes: settings.processing.max_request_bytes,
            accepted_schema_ids,
            default_follow: settings.processing.follow,
        },
        encoder,
        settings.secret_fields(),
        metrics,
        settings.kafka.max_record_bytes,
    )
    .with_follow(follow_plan(settings))
    // Exactly once, a check is never repeated with visible effects, so the
    // follow-mode guards against repeats (end markers, chain marks) go.
    .with_repeat_guards(!exactly_once)
}

/// How long start-up waits for a transaction coordinator.
const TXN_INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// `recheck.<seconds>s` of a re-check topic (its group and transactional id
/// suffix).
fn recheck_suffix(prefix: &str, topic: &str) -> String {
    let delay = topic
        .strip_prefix(prefix)
        .unwrap_or(topic)
        .trim_start_matches('.');
    format!("recheck.{delay}")
}

/// Starts paysync with these gateways (by connector name) reporting to `metrics`:
/// the seam for embedding paysync with a connector of one's own, and for tests.
pub async fn start_with(
    settings: Settings,
    metrics: Arc<Metrics>,
    gateways: HashMap<String, Arc<Gateway>>,
) -> Result<RunningApp, StartupError> {
    start_with_role(settings, metrics, gateways, Role::All).await
}

async fn start_with_role(
    settings: Settings,
    metrics: Arc<Metrics>,
    gateways: HashMap<String, Arc<Gateway>>,
    role: Role,
) -> Result<RunningApp, StartupError> {
    let accepted_schema_ids =
        AcceptedSchemaIds::new(settings.processing.accepted_schema_ids.iter().copied());
    let (supervisor, failures) = Supervisor::new();
    let format = match &settings.schema_registry {
        None => WireFormat::SingleObject,
        Some(r) => {
            let client = RegistryClient::new(r.clone())?;
            let id = client
                .schema_id_with_retries(&r.subject, crate::codec::avro::EVENT_SCHEMA_JSON, 5)
                .await?;
            let request_subject = format!("{}-value", settings.kafka.input_topic);
            match client.subject_ids(&request_subject).await {
                Ok(ids) => accepted_schema_ids.extend(ids),
                Err(e) => {
                    tracing::warn!(error = %e, subject = %request_subject, "cannot list the request schema ids")
                }
            }
            let token = supervisor.token();
            supervisor.spawn(
                "schema registry refresh",
                Lifetime::UntilShutdown,
                refresh_request_ids(client, request_subject, accepted_schema_ids.clone(), token),
            );
            tracing::info!(subject = %r.subject, schema_id = id, "event schema registered; using the Confluent wire format");
            WireFormat::Confluent { schema_id: id }
        }
    };
    let processor = Arc::new(processor(
        &settings,
        gateways,
        EventEncoder::new(format),
        accepted_schema_ids,
        metrics.clone(),
    ));
    let producer = Arc::new(
        KafkaProducer::new(&producer_config(&settings.kafka)).map_err(|source| {
            StartupError::Kafka {
                client: "producer",
                source,
            }
        })?,
    );
    let publisher = Arc::new(Publisher::new(
        producer.clone(),
        &settings.kafka.output_topic,
        &settings.kafka.dead_letter_topic,
        metrics.clone(),
    ));
    let (listener, http_addr) = bind("http.listen", settings.http.listen).await?;
    // The webhook intake binds before anything consumes, so a port in use stops
    // start-up instead of leaving a half-running instance.
    let intake = match (&settings.webhooks, role) {
        (Some(w), Role::All) => Some(prepare_intake(&settings, w, &metrics, role).await?),
        _ => None,
    };
    let settings = Arc::new(settings);
    let engines: Engines = Arc::new(Mutex::new(Vec::new()));
    let factory = EngineFactory {
        settings: settings.clone(),
        processor,
        publisher: publisher.clone(),
        producer: producer.clone(),
        metrics: metrics.clone(),
        board: CommitBoard::new(),
        supervisor: supervisor.clone(),
        engines: engines.clone(),
    };
    // One engine for the input topic, and one per re-check topic (follow mode),
    // each with its own consumer, ledger and in-flight bound.
    let started = async {
        factory.start(&settings.kafka.input_topic, false).await?;
        let mut rechecks: Vec<String> = settings.recheck_topics().into_values().collect();
        // Re-check topics the schedules no longer name still hold chains.
        match existing_recheck_topics(&factory).await {
            Ok(found) => {
                for topic in found {
                    if !rechecks.contains(&topic) {
                        tracing::warn!(topic = %topic, "consuming a re-check topic the schedules no longer name (a schedule change); its chains go on with the connector's current schedule");
                        rechecks.push(topic);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the re-check topics yet; looking again later")
            }
        }
        for topic in rechecks {
            factory.start(&topic, true).await?;
        }
        Ok::<(), StartupError>(())
    };
    if let Err(e) = started.await {
        supervisor.stop().await;
        return Err(e);
    }
    let topics_ok = Arc::new(AtomicBool::new(false));
    let intake_alive = intake.as_ref().map(|p| p.intake.clone());
    let alive: Probe = {
        let engines = engines.clone();
        let publisher = publisher.clone();
        let supervisor = supervisor.clone();
        Arc::new(move || {
            if let Some(ended) = supervisor.failure() {
                return Err(ended.to_string());
            }
            if lock(&engines)
                .iter()
                .any(|e| !e.alive.load(Ordering::Acquire))
            {
                return Err("a consumer loop has stopped".into());
            }
            if !publisher.is_healthy() {
                return Err("the producer hit a fatal error".into());
            }
            if let Some(intake) = &intake_alive {
                intake.health().alive?;
            }
            Ok(())
        })
    };
    let intake_ready = intake.as_ref().map(|p| p.intake.clone());
    let ready: Probe = {
        let engines = engines.clone();
        let topics_ok = topics_ok.clone();
        let stuck_after = settings.processing.stuck_after;
        let alive = alive.clone();
        Arc::new(move || {
            alive()?;
            if !topics_ok.load(Ordering::Acquire) {
                return Err("waiting for the topics to exist".into());
            }
            let engines = lock(&engines);
            if !engines.iter().all(|e| e.source.joined()) {
                return Err("waiting to join the consumer groups".into());
            }
            if let Some(intake) = &intake_ready {
                intake.health().ready?;
            }
            let now = crate::clock::Instant::now();
            for e in engines.iter() {
                e.committer
                    .ready()
                    .map_err(|why| format!("{}: {why}", e.topic))?;
                readiness(&e.ledger.health(now), stuck_after)
                    .map_err(|why| format!("{}: {why}", e.topic))?;
            }
            Ok(())
        })
    };
    supervisor.spawn(
        "topic check",
        Lifetime::MayFinish,
        check_topics(
            producer.clone(),
            settings.topics(),
            topics_ok,
            supervisor.token(),
        ),
    );
    if !settings.recheck_topics().is_empty() || lock(&engines).len() > 1 {
        let factory = factory.clone();
        let token = supervisor.token();
        supervisor.spawn(
            "re-check topic discovery",
            Lifetime::UntilShutdown,
            async move { discover_recheck_topics(factory, token).await },
        );
    }
    let token = supervisor.token();
    let state = HttpState {
        metrics: metrics.clone(),
        alive,
        ready: ready.clone(),
        webhooks_ready: intake.as_ref().map(|p| intake_probe(&p.intake)),
    };
    supervisor.spawn("http server", Lifetime::UntilShutdown, async move {
        server::serve(listener, state, token).await
    });
    let webhook_addr = intake.as_ref().map(|p| p.addr);
    let intake = intake.map(|p| p.spawn(&supervisor));
    let k = &settings.kafka;
    tracing::info!(
        brokers = %k.brokers,
        group_id = %k.group_id,
        input = %k.input_topic,
        output = %k.output_topic,
        dead_letters = %k.dead_letter_topic,
        guarantee = ?settings.processing.guarantee,
        http = %http_addr,
        "paysync started"
    );
    Ok(RunningApp {
        supervisor,
        failures,
        engines,
        producer: Some(producer),
        metrics,
        http_addr,
        webhook_addr,
        intake,
        ready,
    })
}

/// The webhook intake, bound and built, not yet serving.
struct PreparedIntake {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    intake: Arc<Intake>,
    limits: Limits,
    tls: Option<Arc<Tls>>,
}

impl PreparedIntake {
    /// Serves it (and watches its TLS files) under `supervisor`.
    fn spawn(self, supervisor: &Supervisor) -> Arc<Intake> {
        let PreparedIntake {
            listener,
            addr,
            intake,
            limits,
            tls,
        } = self;
        if let Some(tls) = &tls {
            let (tls, token, metrics) = (tls.clone(), supervisor.token(), intake.metrics().clone());
            supervisor.spawn("webhook TLS reload", Lifetime::UntilShutdown, async move {
                tls.watch(token, move |ok| metrics.tls_reloaded(ok)).await;
                Ok(())
            });
        }
        tracing::info!(
            listen = %addr,
            tls = tls.is_some(),
            max_connections = limits.max_connections,
            "webhook intake listening"
        );
        let (serving, token) = (intake.clone(), supervisor.token());
        supervisor.spawn("webhook intake", Lifetime::UntilShutdown, async move {
            intake_server::serve(listener, serving, limits, tls, token).await
        });
        intake
    }
}

/// Binds the intake's listener and builds it: its connection bound from the
/// open-file limit, its TLS, its own producer, its admission step. The
/// listener binds before anything consumes, so a port in use stops start-up
/// instead of leaving a half-running instance.
async fn prepare_intake(
    settings: &Settings,
    w: &crate::config::WebhookSettings,
    metrics: &Arc<Metrics>,
    role: Role,
) -> Result<PreparedIntake, StartupError> {
    // The processor's connector calls hold a socket each.
    let reserved = intake_server::RESERVED_FILES
        + if role == Role::All {
            settings.processing.max_in_flight as u64
        } else {
            0
        };
    let open_files = intake_server::raise_open_file_limit();
    let (max_connections, warning) =
        intake_server::connection_bound(w.max_connections, open_files, reserved)?;
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    // A backlog as deep as the connection bound (the kernel caps it at
    // net.core.somaxconn): a burst of connections beyond the default 1,024
    // waits there instead of having its SYNs dropped (a 1 s retransmit each).
    let backlog = u32::try_from(max_connections.max(1024)).unwrap_or(u32::MAX);
    let (listener, addr) = bind_with_backlog("webhooks.listen", w.listen, backlog)?;
    let tls = w
        .tls
        .as_ref()
        .map(|files| Tls::new(files).map(Arc::new))
        .transpose()
        .map_err(|e| ConfigError::new(e.key, e.to_string()))?;
    let mut config = producer_config(&settings.kafka);
    // librdkafka gives up on a record by the time the webhook is answered 503,
    // so a 503 rarely leaves a late copy behind.
    config.set(
        "message.timeout.ms",
        w.ack_timeout.as_millis().max(1).to_string(),
    );
    let intake_metrics = metrics.intake();
    let counted = intake_metrics.clone();
    let store: Arc<dyn Store> = Arc::new(
        IntakeProducer::new(config, Box::new(move || counted.producer_rebuilt())).map_err(
            |source| StartupError::Kafka {
                client: "webhook producer",
                source,
            },
        )?,
    );
    let admission = Admission::new(settings, w, Box::new(random_id));
    let intake = Arc::new(Intake::new(
        w.clone(),
        &settings.kafka.input_topic,
        admission,
        store,
        intake_metrics,
    ));
    Ok(PreparedIntake {
        listener,
        addr,
        intake,
        limits: Limits::new(w, max_connections),
        tls,
    })
}

/// The intake's readiness: its producer can store (its listener is up while
/// the process serves).
fn intake_probe(intake: &Arc<Intake>) -> Probe {
    let intake = intake.clone();
    Arc::new(move || intake.health().ready)
}

/// `paysync run --role webhooks`: the intake alone, with the HTTP server's
/// probes answering for it.
async fn start_webhooks(
    settings: Settings,
    metrics: Arc<Metrics>,
) -> Result<RunningApp, StartupError> {
    let Some(w) = settings.webhooks.clone() else {
        return Err(ConfigError::new(
            "webhooks",
            "--role webhooks runs the webhook intake alone, and there is no [webhooks] table",
        )
        .into());
    };
    let (supervisor, failures) = Supervisor::new();
    let (listener, http_addr) = bind("http.listen", settings.http.listen).await?;
    let prepared = prepare_intake(&settings, &w, &metrics, Role::Webhooks).await?;
    let webhook_addr = Some(prepared.addr);
    let intake = prepared.intake.clone();
    let alive: Probe = {
        let (intake, supervisor) = (intake.clone(), supervisor.clone());
        Arc::new(move || {
            if let Some(ended) = supervisor.failure() {
                return Err(ended.to_string());
            }
            intake.health().alive
        })
    };
    let ready = intake_probe(&intake);
    let state = HttpState {
        metrics: metrics.clone(),
        alive,
        ready: ready.clone(),
        webhooks_ready: Some(ready.clone()),
    };
    let token = supervisor.token();
    supervisor.spawn("http server", Lifetime::UntilShutdown, async move {
        server::serve(listener, state, token).await
    });
    let intake = prepared.spawn(&supervisor);
    tracing::info!(
        brokers = %settings.kafka.brokers,
        input = %settings.kafka.input_topic,
        http = %http_addr,
        "paysync started (webhook intake only)"
    );
    Ok(RunningApp {
        supervisor,
        failures,
        engines: Arc::new(Mutex::new(Vec::new())),
        producer: None,
        metrics,
        http_addr,
        webhook_addr,
        intake: Some(intake),
        ready,
    })
}

/// Binds a listener for the setting `key`; returns it with its address (the
/// port the system chose for port 0).
async fn bind(
    key: &'static str,
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), StartupError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Listen { key, addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| StartupError::Listen { key, addr, source })?;
    Ok((listener, local))
}

/// [`bind`] with a listen backlog of `backlog`.
fn bind_with_backlog(
    key: &'static str,
    addr: SocketAddr,
    backlog: u32,
) -> Result<(tokio::net::TcpListener, SocketAddr), StartupError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(backlog)?;
        let local = listener.local_addr()?;
        Ok((listener, local))
    };
    listen().map_err(|source| StartupError::Listen { key, addr, source })
}

struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Readiness from partition health: no partition stalled by a refused dead
/// letter, and no commit watermark stuck for `stuck_after` while work is pending.
pub fn readiness(
    health: &[crate::pipeline::ledger::PartitionHealth],
    stuck_after: Duration,
) -> Result<(), String> {
    if let Some(h) = health.iter().find(|h| h.stalled.is_some()) {
        return Err(format!(
            "partition {} is stalled: {}",
            h.partition,
            h.stalled.as_deref().unwrap_or_default()
        ));
    }
    if let Some(h) = health.iter().find(|h| h.stuck_for >= stuck_after) {
        return Err(format!(
            "partition {}'s commit watermark has not moved for {}s with work pending",
            h.partition,
            h.stuck_for.as_secs()
        ));
    }
    Ok(())
}

/// Follow mode of every connector that has it, with the re-check topics.
pub fn follow_plan(settings: &Settings) -> FollowPlan {
    FollowPlan {
        by_connector: settings
            .connectors
            .iter()
            .filter_map(|(name, c)| c.follow.clone().map(|f| (name.clone(), Arc::new(f))))
            .collect(),
        topics: settings
            .recheck_topics()
            .into_iter()
            .map(|(d, t)| (d, Arc::from(t.as_str())))
            .collect(),
    }
}

/// Keeps the accepted Confluent schema ids of Avro requests up to date with the
/// versions registered under the input topic's subject.
async fn refresh_request_ids(
    client: RegistryClient,
    subject: String,
    ids: AcceptedSchemaIds,
    shutdown: CancellationToken,
) -> Result<(), String> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        match client.subject_ids(&subject).await {
            Ok(found) => ids.extend(found),
            Err(e) => tracing::warn!(error = %e, %subject, "cannot list the request schema ids"),
        }
    }
}

/// Waits until the topics exist (readiness); logs what is missing meanwhile.
async fn check_topics(
    producer: Arc<KafkaProducer>,
    topics: Vec<String>,
    ok: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let mut delay = Duration::from_millis(200);
    loop {
        let p = producer.clone();
        let t = topics.clone();
        let result = tokio::task::spawn_blocking(move || {
            let names: Vec<&str> = t.iter().map(String::as_str).collect();
            admin::missing_topics(p.client(), &names, Duration::from_secs(5))
        })
        .await;
        match result {
            Ok(Ok(missing)) if missing.is_empty() => {
                ok.store(true, Ordering::Release);
                return Ok(());
            }
            Ok(Ok(missing)) => tracing::error!(
                ?missing,
                "topics do not exist; create them (paysync does not auto-create)"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "waiting for the Kafka cluster"),
            Err(e) => return Err(format!("the topic check thread failed: {e}")),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Re-check topics under the prefix that exist in the cluster (a schedule
/// change can leave records in topics the schedules no longer name).
async fn existing_recheck_topics(factory: &EngineFactory) -> Result<Vec<String>, String> {
    let producer = factory.producer.clone();
    let prefix = factory.settings.kafka.recheck_topic_prefix.clone();
    factory
        .supervisor
        .blocking("re-check topic discovery", move || {
            admin::topics_with_prefix(producer.client(), &prefix, Duration::from_secs(10))
        })
        .await
        .unwrap_or_else(|| Err("the discovery thread failed".into()))
}

/// Consumes every re-check topic found under the prefix, at start-up and every
/// `processing.recheck_discovery_interval`: a re-check written under an old
/// schedule still runs (at the due time it was written with) and its chain goes
/// on with the connector's current schedule, or ends.
async fn discover_recheck_topics(
    factory: EngineFactory,
    shutdown: CancellationToken,
) -> Result<(), String> {
    loop {
        match existing_recheck_topics(&factory).await {
            Ok(found) => {
                let consumed: Vec<String> = lock(&factory.engines)
                    .iter()
                    .map(|e| e.topic.clone())
                    .collect();
                for topic in found.into_iter().filter(|t| !consumed.contains(t)) {
                    tracing::warn!(
                        topic = %topic,
                        "consuming a re-check topic the schedules no longer name (a schedule change); its chains go on with the connector's current schedule"
                    );
                    if let Err(e) = factory.start(&topic, true).await {
                        tracing::error!(topic = %topic, error = %e, "cannot consume a re-check topic; trying again later");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list the re-check topics"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(factory.settings.processing.recheck_discovery_interval) => {}
        }
    }
}

/// Runs until `shutdown` completes (or a supervised task ends), then stops
/// cleanly. A task that ended is an error naming it (exit code 1).
pub async fn run(
    settings: Settings,
    role: Role,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    serve_until(start_as(settings, role).await?, shutdown).await
}

/// Serves a started app until `shutdown` completes or a supervised task ends,
/// then stops it cleanly (draining what it can). A task that ended is an error
/// naming it.
pub async fn serve_until(
    mut app: RunningApp,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let failed = tokio::select! {
        () = shutdown => {
            tracing::info!("shutdown requested");
            None
        }
        ended = app.failed() => ended,
    };
    app.stop().await;
    match failed {
        None => Ok(()),
        Some(ended) => Err(StartupError::Stopped(ended)),
    }
}
