//! Wiring: builds the connectors, the producer, the consumer and the HTTP server
//! from [`Settings`], runs the engine, and shuts everything down in order (stop
//! fetching, drain in-flight work, commit, flush the producer, leave the group).
//! Shutdown is injected, so tests and the demo can stop the service.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::codec::{AcceptedSchemaIds, DecodeOptions, EventEncoder, WireFormat};
use crate::config::{ConfigError, Settings};
use crate::connectors::gateway::{Gateway, GatewayError};
use crate::connectors::registry;
use crate::connectors::token::system_clock;
use crate::kafka::commits::CommitBoard;
use crate::kafka::engine::{create_consumer, Engine, EngineConsumer, EngineSettings};
use crate::kafka::producer::Publisher;
use crate::kafka::{admin, consumer_config, producer_config};
use crate::pipeline::ledger::Ledger;
use crate::pipeline::process::{FollowPlan, Processor};
use crate::schema_registry::{RegistryClient, RegistryError};
use crate::server::{self, HttpState, Probe};
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
    /// The HTTP server could not listen.
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Listen {
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

/// A running paysync instance.
pub struct RunningApp {
    shutdown: CancellationToken,
    /// The input engine first, then one per re-check topic.
    engines: Vec<JoinHandle<()>>,
    server: JoinHandle<()>,
    topic_check: JoinHandle<()>,
    registry_refresh: Option<JoinHandle<()>>,
    publisher: Arc<Publisher>,
    consumers: Vec<Arc<EngineConsumer>>,
    metrics: Arc<Metrics>,
    http_addr: SocketAddr,
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

    /// True once the consumer joined its group and the topics were found, while
    /// no partition is stalled or stuck.
    pub fn is_ready(&self) -> bool {
        (self.ready)().is_ok()
    }

    /// Stops the input consumer loop as a crash would (tests of `/healthz`).
    #[doc(hidden)]
    pub fn abort_consumer_loop(&self) {
        if let Some(engine) = self.engines.first() {
            engine.abort();
        }
    }

    /// Stops fetching, drains, commits, flushes and leaves the groups.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for engine in self.engines {
            match engine.await {
                Err(e) if e.is_panic() => {
                    tracing::error!(error = %e, "a consumer loop panicked")
                }
                _ => {}
            }
        }
        self.topic_check.abort();
        if let Some(task) = &self.registry_refresh {
            task.abort();
        }
        let publisher = self.publisher.clone();
        match tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(30))).await {
            Ok(Err(e)) => tracing::warn!(error = %e, "producer flush incomplete"),
            Err(e) => tracing::warn!(error = %e, "producer flush task failed"),
            Ok(Ok(())) => {}
        }
        // Dropping the last handles closes the consumers and leaves the groups.
        drop(self.consumers);
        let _ = self.server.await;
        tracing::info!("stopped");
    }
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

/// Starts paysync.
pub async fn start(settings: Settings) -> Result<RunningApp, StartupError> {
    let metrics = Arc::new(Metrics::new());
    let gateways = gateways(&settings, &metrics)?;
    start_with(settings, metrics, gateways).await
}

/// Starts paysync with these gateways (by connector name) reporting to `metrics`:
/// the seam for embedding paysync with a connector of one's own, and for tests.
pub async fn start_with(
    settings: Settings,
    metrics: Arc<Metrics>,
    gateways: HashMap<String, Arc<Gateway>>,
) -> Result<RunningApp, StartupError> {
    let accepted_schema_ids =
        AcceptedSchemaIds::new(settings.processing.accepted_schema_ids.iter().copied());
    let mut registry_refresh = None;
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
            registry_refresh = Some(tokio::spawn(refresh_request_ids(
                client,
                request_subject,
                accepted_schema_ids.clone(),
            )));
            tracing::info!(subject = %r.subject, schema_id = id, "event schema registered; using the Confluent wire format");
            WireFormat::Confluent { schema_id: id }
        }
    };
    let processor = Arc::new(
        Processor::new(
            gateways,
            DecodeOptions {
                default_connector: settings.processing.default_connector.clone(),
                default_merchant: settings.processing.default_merchant.clone(),
                max_request_bytes: settings.processing.max_request_bytes,
                accepted_schema_ids,
                default_follow: settings.processing.follow,
            },
            EventEncoder::new(format),
            settings.secret_fields(),
            metrics.clone(),
            settings.kafka.max_record_bytes,
        )
        .with_follow(follow_plan(&settings)),
    );
    let k = &settings.kafka;
    let publisher = Arc::new(
        Publisher::new(
            &producer_config(k),
            &k.output_topic,
            &k.dead_letter_topic,
            metrics.clone(),
        )
        .map_err(|source| StartupError::Kafka {
            client: "producer",
            source,
        })?,
    );
    // One engine for the input topic, and one per re-check topic (follow mode),
    // each with its own consumer, ledger and in-flight bound.
    let mut topics = vec![(k.input_topic.clone(), k.group_id.clone(), false)];
    for (delay, topic) in settings.recheck_topics() {
        topics.push((
            topic,
            format!("{}.recheck.{}s", k.group_id, delay.as_secs()),
            true,
        ));
    }
    let mut engines = Vec::with_capacity(topics.len());
    let board = CommitBoard::new();
    for (topic, group, recheck) in topics {
        let ledger = Arc::new(Ledger::new());
        let engine_settings = EngineSettings {
            input_topic: topic,
            recheck,
            max_in_flight: settings.processing.max_in_flight,
            max_queued_per_key: settings.processing.max_queued_per_key,
            commit_interval: k.commit_interval,
            drain_timeout: settings.processing.shutdown_timeout,
        };
        let mut config = consumer_config(k);
        config.set("group.id", &group);
        let consumer = Arc::new(
            create_consumer(
                &config,
                &engine_settings,
                ledger.clone(),
                metrics.clone(),
                board.clone(),
            )
            .map_err(|source| StartupError::Kafka {
                client: "consumer",
                source,
            })?,
        );
        board.register(&engine_settings.input_topic, &consumer);
        engines.push((consumer, ledger, engine_settings));
    }
    let addr = settings.http.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Listen { addr, source })?;
    let http_addr = listener
        .local_addr()
        .map_err(|source| StartupError::Listen { addr, source })?;

    let topics_ok = Arc::new(AtomicBool::new(false));
    let loops_alive: Vec<Arc<AtomicBool>> = engines
        .iter()
        .map(|_| Arc::new(AtomicBool::new(true)))
        .collect();
    let alive: Probe = {
        let loops_alive = loops_alive.clone();
        let publisher = publisher.clone();
        Arc::new(move || {
            if loops_alive.iter().any(|a| !a.load(Ordering::Acquire)) {
                return Err("a consumer loop has stopped".into());
            }
            if !publisher.is_healthy() {
                return Err("the producer hit a fatal error".into());
            }
            Ok(())
        })
    };
    let ready: Probe = {
        let consumers: Vec<_> = engines.iter().map(|(c, _, _)| c.clone()).collect();
        let ledgers: Vec<_> = engines
            .iter()
            .map(|(_, l, s)| (l.clone(), s.input_topic.clone()))
            .collect();
        let topics_ok = topics_ok.clone();
        let stuck_after = settings.processing.stuck_after;
        let alive = alive.clone();
        Arc::new(move || {
            alive()?;
            if !topics_ok.load(Ordering::Acquire) {
                return Err("waiting for the topics to exist".into());
            }
            if !consumers
                .iter()
                .all(|c| crate::kafka::engine::has_joined(c))
            {
                return Err("waiting to join the consumer groups".into());
            }
            let now = std::time::Instant::now();
            for (ledger, topic) in &ledgers {
                readiness(&ledger.health(now), stuck_after).map_err(|e| format!("{topic}: {e}"))?;
            }
            Ok(())
        })
    };
    let topic_check = tokio::spawn(check_topics(
        publisher.clone(),
        settings.topics(),
        topics_ok,
    ));
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(server::serve(
        listener,
        HttpState {
            metrics: metrics.clone(),
            alive,
            ready: ready.clone(),
        },
        shutdown.clone(),
    ));
    let consumers: Vec<_> = engines.iter().map(|(c, _, _)| c.clone()).collect();
    let engines: Vec<JoinHandle<()>> = engines
        .into_iter()
        .zip(loops_alive)
        .map(|((consumer, ledger, engine_settings), alive)| {
            let engine = Engine::new(
                consumer,
                processor.clone(),
                publisher.clone(),
                ledger,
                metrics.clone(),
                engine_settings,
            );
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                // Flips liveness off however the loop ends: returned, panicked or aborted.
                let _alive = AliveGuard(alive);
                engine.run(shutdown).await;
            })
        })
        .collect();
    tracing::info!(
        brokers = %k.brokers,
        group_id = %k.group_id,
        input = %k.input_topic,
        output = %k.output_topic,
        dead_letters = %k.dead_letter_topic,
        http = %http_addr,
        "paysync started"
    );
    Ok(RunningApp {
        shutdown,
        engines,
        server,
        topic_check,
        registry_refresh,
        publisher,
        consumers,
        metrics,
        http_addr,
        ready,
    })
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
async fn refresh_request_ids(client: RegistryClient, subject: String, ids: AcceptedSchemaIds) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        match client.subject_ids(&subject).await {
            Ok(found) => ids.extend(found),
            Err(e) => tracing::warn!(error = %e, %subject, "cannot list the request schema ids"),
        }
    }
}

/// Waits until the topics exist (readiness); logs what is missing meanwhile.
async fn check_topics(publisher: Arc<Publisher>, topics: Vec<String>, ok: Arc<AtomicBool>) {
    let mut delay = Duration::from_millis(200);
    loop {
        let p = publisher.clone();
        let t = topics.clone();
        let result = tokio::task::spawn_blocking(move || {
            let names: Vec<&str> = t.iter().map(String::as_str).collect();
            admin::missing_topics(p.producer(), &names, Duration::from_secs(5))
        })
        .await;
        match result {
            Ok(Ok(missing)) if missing.is_empty() => {
                ok.store(true, Ordering::Release);
                return;
            }
            Ok(Ok(missing)) => tracing::error!(
                ?missing,
                "topics do not exist; create them (paysync does not auto-create)"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "waiting for the Kafka cluster"),
            Err(e) => tracing::warn!(error = %e, "topic check failed"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Runs until `shutdown` completes, then stops cleanly.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let app = start(settings).await?;
    shutdown.await;
    tracing::info!("shutdown requested");
    app.stop().await;
    Ok(())
}
