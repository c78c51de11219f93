//! The simulated CM.com: OAuth2 token endpoint and Get Transaction for every
//! payment method, answering by the scenario of the transaction id.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{Answer, Scenario, SimState, SIM_CLIENT_ID, SIM_CLIENT_SECRET};

/// The account the simulator accepts.
pub const ACCOUNT: &str = "client_id = \"demo-client\"\nclient_secret = \"demo-secret\"\n";

/// Token and Get Transaction.
pub fn routes() -> Router<Arc<SimState>> {
    Router::new()
        .route("/api/v1/authorization/oauth2/token", post(token))
        .route(
            "/api/v1/paymentmethods/{method}/v1/transactions/{id}",
            get(transaction),
        )
}

async fn token(State(state): State<Arc<SimState>>, body: String) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let ok = form.get("grant_type").map(String::as_str) == Some("client_credentials")
        && form.get("client_id").map(String::as_str) == Some(SIM_CLIENT_ID)
        && form.get("client_secret").map(String::as_str) == Some(SIM_CLIENT_SECRET);
    if !ok {
        state.refuse_token();
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    Json(serde_json::json!({
        "access_token": state.issue_token(),
        "token_type": "Bearer",
        "expires_in": state.token_ttl_secs(),
    }))
    .into_response()
}

fn body(id: &str, status: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "orderId": id,
        "reference": format!("order-{id}"),
        "amount": 1200,
        "currency": "EUR",
        "description": "paysync demo order",
        "status": status,
        "createdAt": "2026-11-21T10:00:00Z",
        "refunds": {"refundedAmount": 0, "refundedPendingAmount": 0},
        "returnUrls": {"success": "https://shop.example/ok"}
    })
}

async fn transaction(
    State(state): State<Arc<SimState>>,
    Path((method, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer sim-token-"));
    if !authorized {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if ![
        "google-pay",
        "apple-pay",
        "creditcard",
        "ideal",
        "bancontact",
        "checkout",
    ]
    .contains(&method.as_str())
    {
        return StatusCode::NOT_FOUND.into_response();
    }
    let scenario = match state.answer(&id, "cm").await {
        Answer::Response(r) => return r,
        Answer::Body(s) => s,
    };
    let json = |status: &str| Json(body(&id, status)).into_response();
    match scenario {
        Scenario::OpenWithRedirect => {
            let mut b = body(&id, "OPEN");
            b["action"] = serde_json::json!({"redirect": {"url": format!("https://3ds.example/challenge/{id}")}});
            Json(b).into_response()
        }
        // CM.com has no pending status: a payment waiting for the customer is OPEN.
        Scenario::Open | Scenario::Pending => json("OPEN"),
        Scenario::Authorized => json("AUTHORIZED"),
        Scenario::Paid | Scenario::Flaky | Scenario::RateLimited => {
            let mut b = body(&id, "SUCCESS");
            b["refunds"] = serde_json::json!({"refundedAmount": 200, "refundedPendingAmount": 100});
            Json(b).into_response()
        }
        Scenario::Cancelled => json("CANCELLED"),
        Scenario::Expired => json("EXPIRED"),
        Scenario::Failed => json("FAILURE"),
        Scenario::Unknown => json("PENDING_REVIEW"),
        Scenario::NotFound => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"message": "Transaction not found"})),
        )
            .into_response(),
        Scenario::Malformed => (StatusCode::OK, "{\"id\":\"x\",\"status\":\"SUC").into_response(),
    }
}
