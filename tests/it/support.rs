//! Shared helpers for the integration tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paysync::config::{Account, ConnectorSettings, RetrySettings};
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
