//! Shared helpers for the integration tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paysync::config::{Account, CircuitSettings, ConnectorSettings, RetrySettings};
use paysync::connectors::client::ConnectorClient;
use paysync::connectors::registry;
use paysync::connectors::token::Clock;
use paysync::telemetry::Metrics;
use url::Url;

pub const CLIENT_ID: &str = "shop-client";
pub const CLIENT_SECRET: &str = "cs_live_DO_NOT_LEAK_42";

pub fn connector_settings(base: &str) -> ConnectorSettings {
    let mut accounts = BTreeMap::new();
    accounts.insert(
        "default".to_string(),
        Account::new(CLIENT_ID, CLIENT_SECRET),
    );
    ConnectorSettings {
        base_url: Url::parse(base).unwrap(),
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_millis(500),
        token_refresh_margin: Duration::from_secs(60),
        max_response_bytes: 64 * 1024,
        retry: RetrySettings {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            max_elapsed: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(2),
        },
        circuit: CircuitSettings {
            failure_threshold: 4,
            cooldown: Duration::from_millis(100),
            max_cooldown: Duration::from_millis(400),
        },
        rate_limit: None,
        accounts,
    }
}

/// A clock the test moves by hand.
#[derive(Clone)]
pub struct ManualClock(pub Arc<Mutex<Instant>>);

impl ManualClock {
    pub fn new() -> Self {
        ManualClock(Arc::new(Mutex::new(Instant::now())))
    }
    pub fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
    pub fn clock(&self) -> Clock {
        let inner = self.0.clone();
        Arc::new(move || *inner.lock().unwrap())
    }
}

pub fn cm_client(
    settings: ConnectorSettings,
    metrics: Arc<Metrics>,
    clock: Clock,
) -> ConnectorClient {
    ConnectorClient::new(registry::get("cm").unwrap(), settings, metrics, clock).unwrap()
}

// ---- end-to-end harness ------------------------------------------------------------

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use paysync::config::Settings;
use paysync::demo::simulator::{SimOptions, Simulator, SIM_CLIENT_ID, SIM_CLIENT_SECRET};
use paysync::kafka::admin::create_topics;
use paysync::kafka::tools::{MockBroker, RawRecord, TopicReader};

/// A Kafka-protocol broker: the one named by `PAYSYNC_TEST_BROKERS` (CI starts
/// tansu), or librdkafka's in-process mock cluster.
pub struct Broker {
    bootstrap: String,
    mock: Option<MockBroker>,
}

/// Topic names unique to one test.
#[derive(Clone, Debug)]
pub struct Topics {
    pub input: String,
    pub output: String,
    pub dlq: String,
    pub group: String,
    pub partitions: i32,
}

impl Broker {
    pub fn new() -> Broker {
        match std::env::var("PAYSYNC_TEST_BROKERS") {
            Ok(b) if !b.is_empty() => Broker {
                bootstrap: b,
                mock: None,
            },
            _ => {
                let mock = MockBroker::start(&[]).unwrap();
                Broker {
                    bootstrap: mock.bootstrap(),
                    mock: Some(mock),
                }
            }
        }
    }

    /// Always librdkafka's in-process mock cluster (fault tests).
    pub fn mock() -> Broker {
        let mock = MockBroker::start(&[]).unwrap();
        Broker {
            bootstrap: mock.bootstrap(),
            mock: Some(mock),
        }
    }

    /// The mock cluster, for fault injection.
    pub fn mock_cluster(&self) -> Option<&MockBroker> {
        self.mock.as_ref()
    }

    /// True on librdkafka's mock cluster.
    pub fn is_mock(&self) -> bool {
        self.mock.is_some()
    }

    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    pub async fn topics(&self, test: &str, partitions: i32) -> Topics {
        let tag = format!("{test}-{}", fastrand::u32(..));
        let t = Topics {
            input: format!("{tag}.requests"),
            output: format!("{tag}.events"),
            dlq: format!("{tag}.requests.dlq"),
            group: format!("{tag}.group"),
            partitions,
        };
        let list = [
            (t.input.as_str(), partitions),
            (t.output.as_str(), partitions),
            (t.dlq.as_str(), 1),
        ];
        match &self.mock {
            Some(m) => {
                for (name, p) in list {
                    m.create_topic(name, p).unwrap();
                }
            }
            None => create_topics(&self.bootstrap, &list).await.unwrap(),
        }
        t
    }
}

pub async fn simulator(options: SimOptions) -> Simulator {
    Simulator::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap()
}

pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Settings TOML for a test instance.
pub fn settings_toml(
    brokers: &str,
    t: &Topics,
    base_url: &str,
    listen: SocketAddr,
    extra: &str,
) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
input_topic = "{input}"
output_topic = "{output}"
dead_letter_topic = "{dlq}"
commit_interval = "200ms"
[kafka.consumer]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
[http]
listen = "{listen}"
[log]
level = "warn"
[processing]
shutdown_timeout = "10s"
[connectors.cm]
base_url = "{base_url}"
request_timeout = "2s"
[connectors.cm.retry]
initial_backoff = "20ms"
max_backoff = "200ms"
[connectors.cm.accounts.default]
client_id = "{SIM_CLIENT_ID}"
client_secret = "{SIM_CLIENT_SECRET}"
{extra}
"#,
        group = t.group,
        input = t.input,
        output = t.output,
        dlq = t.dlq,
    )
}

pub fn settings(brokers: &str, t: &Topics, base_url: &str, extra: &str) -> Settings {
    Settings::from_toml(&settings_toml(
        brokers,
        t,
        base_url,
        "127.0.0.1:0".parse().unwrap(),
        extra,
    ))
    .unwrap()
}

/// Reads output and dead-letter records until `want` arrived (or the timeout).
pub async fn read_outputs(
    brokers: &str,
    t: &Topics,
    want: usize,
    timeout: Duration,
) -> Vec<RawRecord> {
    read_outputs_settled(brokers, t, want, timeout, Duration::ZERO).await
}

/// Reads outputs for a while after `want` arrived, to catch extra records.
pub async fn read_outputs_settled(
    brokers: &str,
    t: &Topics,
    want: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<RawRecord> {
    let brokers = brokers.to_owned();
    let t = t.clone();
    tokio::task::spawn_blocking(move || {
        let mut reader =
            TopicReader::new(&brokers, &[(&t.output, t.partitions), (&t.dlq, 1)]).unwrap();
        let mut out = reader.read(want, timeout);
        out.extend(reader.read(usize::MAX, settle));
        out
    })
    .await
    .unwrap()
}

/// The paysync binary as a child process.
pub struct Process {
    pub child: Child,
    pub http: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Process {
    pub fn spawn(brokers: &str, t: &Topics, base_url: &str, extra: &str) -> Process {
        Self::spawn_full(brokers, t, base_url, extra, &[])
    }

    pub fn spawn_env(brokers: &str, t: &Topics, base_url: &str, env: &[(&str, &str)]) -> Process {
        Self::spawn_full(brokers, t, base_url, "", env)
    }

    pub fn spawn_full(
        brokers: &str,
        t: &Topics,
        base_url: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let http = free_addr();
        let path = dir.path().join("paysync.toml");
        std::fs::write(&path, settings_toml(brokers, t, base_url, http, extra)).unwrap();
        let log = std::fs::File::create(dir.path().join("paysync.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_paysync"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("PAYSYNC_LOG__FORMAT", "json")
            .env("PAYSYNC_LOG__LEVEL", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Process {
            child,
            http,
            _dir: dir,
        }
    }

    /// The settings file the process runs with.
    pub fn config(&self) -> std::path::PathBuf {
        self._dir.path().join("paysync.toml")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("paysync.log")).unwrap_or_default()
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let url = format!("http://{}/readyz", self.http);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("paysync not ready within {timeout:?}; log:\n{}", self.log());
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the exit status (blocking, bounded).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "paysync did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks that Prometheus text parses: every sample line is `name[{labels}] value`.
pub fn assert_prometheus_text(text: &str) {
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
        let name = series.split('{').next().unwrap();
        assert!(name.starts_with("paysync_"), "unexpected metric {name}");
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name {name}"
        );
        if let Some(labels) = series.split_once('{').map(|(_, l)| l) {
            assert!(labels.ends_with('}'), "bad labels in {line}");
        }
    }
}
