//! The HTTP endpoints: `GET /metrics` (Prometheus text format), `GET /healthz`
//! (the consumer loop and producer are alive) and `GET /readyz` (connected,
//! consuming, no partition stalled or stuck). A failing probe answers 503 with
//! the reason in the body.

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
    /// Readiness: connected, consuming, and no partition stalled or stuck.
    pub ready: Probe,
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

fn probe(result: Result<(), String>, ok: &str) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, format!("{ok}\n")),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    probe((state.alive)(), "ok")
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    probe((state.ready)(), "ready")
}

/// Binds the listener (start-up fails on a bad or busy address).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (http.listen): {e}"))
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, state: HttpState, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "http server failed");
    }
}
