//! The HTTP endpoints: `GET /metrics` (Prometheus text format), `GET /healthz`
//! (the consumer loop and producer are alive), `GET /readyz` (connected,
//! consuming, no partition stalled or stuck) and `GET /readyz/webhooks` (the
//! webhook intake can store requests: its readiness alone, for the ingress
//! that routes webhooks). A failing probe answers 503 with the reason in the
//! body.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// A probe: `Ok`, or what is wrong (shown in the response body).
pub type Probe = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the endpoints read.
#[derive(Clone)]
pub struct HttpState {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// Liveness: fails when the consumer loop or the producer is dead, so that an
    /// orchestrator restarts the process.
    pub alive: Probe,
    /// Readiness: connected, consuming, and no partition stalled or stuck
    /// (under `--role webhooks`, the intake's).
    pub ready: Probe,
    /// The webhook intake's own readiness (`/readyz/webhooks`), when it runs
    /// in this process.
    pub webhooks_ready: Option<Probe>,
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    // `paysync_ready` is what /readyz would answer now (alerts see it too).
    state.metrics.set_ready((state.ready)().is_ok());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

fn answer(result: Result<(), String>, ok: &str) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, format!("{ok}\n")),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    answer((state.alive)(), "ok")
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    answer((state.ready)(), "ready")
}

async fn readyz_webhooks(State(state): State<HttpState>) -> impl IntoResponse {
    match &state.webhooks_ready {
        Some(probe) => answer(probe(), "ready"),
        None => (
            StatusCode::NOT_FOUND,
            "the webhook intake does not run in this process\n".to_owned(),
        ),
    }
}

/// The probe URL on a listen address: an unspecified address (`0.0.0.0`, `::`)
/// is asked on loopback.
pub fn probe_url(listen: SocketAddr, ready: bool) -> url::Url {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        }
        ip => ip,
    };
    let path = if ready { "readyz" } else { "healthz" };
    let text = format!("http://{}/{path}", SocketAddr::new(ip, listen.port()));
    #[allow(clippy::expect_used)]
    url::Url::parse(&text).expect("an address and a fixed path form a URL")
}

/// Asks a probe endpoint: `Ok(body)` on 200, `Err(reason)` otherwise (another
/// status with its body, a refused connection, a timeout).
pub async fn probe(url: &url::Url, timeout: std::time::Duration) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| format!("no answer: {}", e.without_url()))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let body = body.trim().to_owned();
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/readyz/webhooks", get(readyz_webhooks))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|e| format!("the HTTP server failed: {e}"))
}
