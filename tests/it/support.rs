//! Shared helpers for the integration tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paysync::connectors::auth::Account;
use paysync::connectors::breaker::BreakerSettings;
use paysync::connectors::gateway::{Gateway, GatewaySettings};
use paysync::connectors::registry;
use paysync::connectors::retry::RetrySettings;
use paysync::connectors::token::Clock;
use paysync::telemetry::Metrics;
use url::Url;

pub const CLIENT_ID: &str = "shop-client";
pub const CLIENT_SECRET: &str = "cs_live_DO_NOT_LEAK_42";
pub const API_KEY: &str = "live_DO_NOT_LEAK_api_key_42";
/// A Stripe secret key (its prefix gives the test mode).
pub const STRIPE_KEY: &str = "sk_test_DO_NOT_LEAK_stripe_42";

/// An account of `scheme` with the test credentials.
pub fn test_account(scheme: &dyn paysync::connectors::AuthScheme) -> Account {
    let fields: Vec<(&'static str, &str)> = scheme
        .fields()
        .iter()
        .filter_map(|f| {
            let v = match *f {
                "client_id" => CLIENT_ID,
                "client_secret" => CLIENT_SECRET,
                "api_key" if scheme.name().starts_with("Stripe") => STRIPE_KEY,
                "api_key" => API_KEY,
                _ => return None,
            };
            Some((*f, v))
        })
        .collect();
    Account::of(scheme, &fields)
}

/// What `account`'s calls to `base` carry as `Authorization`, given a token
/// endpoint that answers `token` (for the schemes that have one), and that
/// endpoint's request (None for the schemes without).
pub async fn expected_authorization(
    account: &Account,
    base: &str,
    token: &str,
) -> (String, Option<paysync::connectors::HttpRequest>) {
    use paysync::connectors::auth::{AuthContext, TokenParser};
    use paysync::connectors::{AccessToken, HttpRequest};
    let seen: std::sync::Mutex<Option<HttpRequest>> = std::sync::Mutex::new(None);
    let fetch = |request: HttpRequest, _: TokenParser| {
        *seen.lock().unwrap() = Some(request);
        let token = token.to_owned();
        let f: futures::future::BoxFuture<'_, _> = Box::pin(async move {
            Ok(AccessToken {
                token: token.into(),
                expires_in: Duration::from_secs(3600),
            })
        });
        f
    };
    let tokens = paysync::connectors::token::TokenCache::new(
        [&"default".to_owned()],
        Duration::from_secs(60),
        paysync::connectors::token::system_clock(),
    );
    let base = url::Url::parse(base).unwrap();
    let cx = AuthContext {
        merchant_id: "default",
        base_url: &base,
        tokens: &tokens,
        fetch_token: &fetch,
    };
    let authorized = account.credential.authorize(&cx).await.unwrap();
    let request = seen.lock().unwrap().take();
    (authorized.authorization.value().to_owned(), request)
}

/// Gateway settings for a connector at `base` with one `default` account of its
/// scheme, short timeouts and quick retries.
pub fn gateway_settings(connector: &str, base: &str) -> GatewaySettings {
    let mut accounts = BTreeMap::new();
    let account = test_account(registry::get(connector).unwrap().auth());
    accounts.insert("default".to_string(), account);
    GatewaySettings {
        base_url: Url::parse(base).unwrap(),
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_millis(500),
        token_refresh_margin: Duration::from_secs(60),
        max_response_bytes: 64 * 1024,
        http2: paysync::connectors::http::Http2::Never,
        retry: RetrySettings {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            max_elapsed: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(2),
            max_throttled: Duration::from_secs(600),
        },
        circuit: BreakerSettings {
            failure_threshold: 4,
            cooldown: Duration::from_millis(100),
            max_cooldown: Duration::from_millis(400),
        },
        rate_limit: None,
        concurrency: paysync::connectors::limit::Concurrency::Adaptive,
        concurrency_ceiling: 256,
        recheck_share: 0.3,
        accounts,
        api_version: registry::get(connector)
            .unwrap()
            .api_version()
            .map(|(_, v)| v.to_owned()),
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

pub fn cm_client(settings: GatewaySettings, metrics: Arc<Metrics>, clock: Clock) -> Gateway {
    Gateway::new(registry::get("cm").unwrap(), settings, metrics, clock).unwrap()
}

// ---- end-to-end harness ------------------------------------------------------------

use std::net::SocketAddr;

use paysync::config::Settings;
use paysync::demo::simulator::{SimOptions, Simulator};
pub use paysync::demo::stack::{free_addr, Topics};
use paysync::demo::stack::{PaysyncProcess, StackSettings};
use paysync::kafka::admin::create_topics;
use paysync::kafka::tools::{MockBroker, RawRecord, TopicReader};

/// A Kafka-protocol broker: the one named by `PAYSYNC_TEST_BROKERS` (CI starts
/// Apache Kafka with `tests/kafka/broker.sh`), or librdkafka's in-process mock
/// cluster.
pub struct Broker {
    bootstrap: String,
    mock: Option<MockBroker>,
}

impl Broker {
    pub fn new() -> Broker {
        match std::env::var("PAYSYNC_TEST_BROKERS") {
            Ok(b) if !b.is_empty() => Broker {
                bootstrap: b,
                mock: None,
            },
            _ => Broker::mock(),
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

    /// Creates more topics (re-check topics, say).
    pub async fn create(&self, topics: &[(&str, i32)]) {
        match &self.mock {
            Some(m) => {
                for (name, p) in topics {
                    m.create_topic(name, *p).unwrap();
                }
            }
            None => create_topics(&self.bootstrap, topics).await.unwrap(),
        }
    }

    /// Unique topics for one test, created on the broker.
    pub async fn topics(&self, test: &str, partitions: i32) -> Topics {
        let t = Topics::unique(test, partitions);
        match &self.mock {
            Some(m) => {
                for (name, p) in t.specs() {
                    m.create_topic(name, p).unwrap();
                }
            }
            None => create_topics(&self.bootstrap, &t.specs()).await.unwrap(),
        }
        t
    }
}

/// Writes one request (key = its id, value = `json`, no headers) to `topic`;
/// returns (partition, offset).
pub async fn send_request(brokers: &str, topic: &str, id: &str, json: &str) -> (i32, i64) {
    paysync::kafka::tools::RawProducer::new(brokers)
        .unwrap()
        .send(topic, None, Some(id.as_bytes()), Some(json.as_bytes()), &[])
        .await
        .unwrap()
}

pub async fn simulator(options: SimOptions) -> Simulator {
    Simulator::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap()
}

/// Settings TOML for a test instance (the shared local-stack settings).
pub fn settings_toml(
    brokers: &str,
    t: &Topics,
    base_url: &str,
    listen: SocketAddr,
    extra: &str,
) -> String {
    StackSettings {
        brokers,
        topics: t,
        simulator: base_url,
        listen,
        extra,
    }
    .toml()
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

/// The paysync binary as a child process (the shared [`PaysyncProcess`]).
pub struct Process(PaysyncProcess);

impl std::ops::Deref for Process {
    type Target = PaysyncProcess;
    fn deref(&self) -> &PaysyncProcess {
        &self.0
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut PaysyncProcess {
        &mut self.0
    }
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
        let http = free_addr();
        let toml = settings_toml(brokers, t, base_url, http, extra);
        Process(
            PaysyncProcess::spawn(env!("CARGO_BIN_EXE_paysync").as_ref(), &toml, http, env)
                .unwrap(),
        )
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        self.wait_path("readyz", timeout).await;
    }

    /// Waits until `GET /<path>` answers 2xx.
    pub async fn wait_path(&self, path: &str, timeout: Duration) {
        let url = format!("http://{}/{path}", self.http);
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
        assert!(self.0.signal(signal), "kill -{signal} failed");
    }

    /// Waits for the exit status (blocking, bounded).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        match self.0.wait_exit(timeout) {
            Some(status) => status,
            None => panic!(
                "paysync did not exit within {timeout:?}; log:\n{}",
                self.log()
            ),
        }
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
