//! The simulated Mollie: `GET /v2/payments/{id}` with a static test API key,
//! answering by the scenario of the payment id in Mollie's shapes (HAL links,
//! decimal-string amounts, `{status, title, detail}` errors).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::{Answer, Scenario, SimState};

/// The API key the simulator accepts.
pub const SIM_API_KEY: &str = "test_paysyncSimulatorKey00000000000";

/// The account the simulator accepts.
pub const ACCOUNT: &str = "api_key = \"test_paysyncSimulatorKey00000000000\"\n";

/// Get payment.
pub fn routes() -> Router<Arc<SimState>> {
    Router::new().route("/v2/payments/{id}", get(payment))
}

fn error(status: StatusCode, title: &str, detail: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"status": status.as_u16(), "title": title, "detail": detail})),
    )
        .into_response()
}

fn body(id: &str, status: &str) -> serde_json::Value {
    serde_json::json!({
        "resource": "payment",
        "id": id,
        "mode": "test",
        "createdAt": "2026-11-21T10:00:00+00:00",
        "amount": {"value": "12.00", "currency": "EUR"},
        "description": "paysync demo order",
        "method": "ideal",
        "status": status,
        "_links": {"self": {"href": format!("https://api.mollie.com/v2/payments/{id}"), "type": "application/hal+json"}}
    })
}

async fn payment(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !super::bearer_is(&headers, SIM_API_KEY) {
        return error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized Request",
            "Missing authentication, or failed to authenticate",
        );
    }
    let scenario = match state.answer(&id, "mollie").await {
        Answer::Response(r) => return r,
        Answer::Body(s) => s,
    };
    let json = |status: &str| Json(body(&id, status)).into_response();
    match scenario {
        Scenario::OpenWithRedirect => {
            let mut b = body(&id, "open");
            b["_links"]["checkout"] = serde_json::json!({
                "href": format!("https://www.mollie.com/checkout/select-issuer/ideal/{id}"),
                "type": "text/html"
            });
            Json(b).into_response()
        }
        Scenario::Open => json("open"),
        Scenario::Pending => json("pending"),
        Scenario::Authorized => {
            let mut b = body(&id, "authorized");
            b["authorizedAt"] = "2026-11-21T10:01:00+00:00".into();
            Json(b).into_response()
        }
        Scenario::Paid | Scenario::Flaky | Scenario::RateLimited => {
            let mut b = body(&id, "paid");
            b["paidAt"] = "2026-11-21T10:02:00+00:00".into();
            b["amountRefunded"] = serde_json::json!({"value": "2.00", "currency": "EUR"});
            Json(b).into_response()
        }
        Scenario::Cancelled => json("canceled"),
        Scenario::Expired => json("expired"),
        Scenario::Failed => {
            let mut b = body(&id, "failed");
            b["details"] = serde_json::json!({"failureReason": "authentication_failed"});
            Json(b).into_response()
        }
        Scenario::Unknown => json("chargeback_pending"),
        Scenario::NotFound => error(
            StatusCode::NOT_FOUND,
            "Not Found",
            "No payment exists with this token.",
        ),
        Scenario::Malformed => {
            (StatusCode::OK, "{\"resource\":\"payment\",\"status\":\"pa").into_response()
        }
    }
}
