//! The simulated Stripe: `GET /v1/payment_intents/{id}` with a test secret
//! key, answering by the scenario of the PaymentIntent id (after its `pi_`) in
//! Stripe's shapes (lower-case currency, smallest-unit amounts, the expanded
//! `latest_charge`, `{"error": {...}}` errors). Its rate limit is the
//! simulator's per-credential one (429, as Stripe's 25 reads a second).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::{Answer, Scenario, SimState};

/// The secret key the simulator accepts.
pub const SIM_SECRET_KEY: &str = "sk_test_paysyncSimulatorKey000000000";

/// The endpoint secret the demo signs its Stripe webhook with.
pub const SIM_WEBHOOK_SECRET: &str = "whsec_paysyncSimulatorSecret";

/// The account the simulator accepts.
pub const ACCOUNT: &str = "api_key = \"sk_test_paysyncSimulatorKey000000000\"\n";

/// Retrieve a PaymentIntent.
pub fn routes() -> Router<Arc<SimState>> {
    Router::new().route("/v1/payment_intents/{id}", get(intent))
}

fn error(status: StatusCode, code: Option<&str>, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"type": "invalid_request_error", "code": code, "message": message}})),
    )
        .into_response()
}

fn body(id: &str, status: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "object": "payment_intent",
        "amount": 1200,
        "amount_received": 0,
        "currency": "eur",
        "created": 1_763_719_200,
        "livemode": false,
        "metadata": {"order_id": "paysync-demo"},
        "status": status,
        "last_payment_error": null,
        "next_action": null,
        "latest_charge": null
    })
}

fn charge(refunded: i64) -> serde_json::Value {
    serde_json::json!({"id": "ch_sim", "object": "charge", "amount": 1200, "amount_refunded": refunded,
                       "payment_method_details": {"type": "card", "card": {}}})
}

async fn intent(
    State(state): State<Arc<SimState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !super::bearer_is(&headers, SIM_SECRET_KEY) {
        return error(StatusCode::UNAUTHORIZED, None, "Invalid API Key provided");
    }
    let scenario = match state.answer(&id, "stripe").await {
        Answer::Response(r) => return r,
        Answer::Body(s) => s,
    };
    let json = |status: &str| Json(body(&id, status)).into_response();
    let with = |status: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut b = body(&id, status);
        f(&mut b);
        Json(b).into_response()
    };
    match scenario {
        Scenario::OpenWithRedirect => with("requires_action", &|b| {
            b["next_action"] = serde_json::json!({"type": "redirect_to_url",
                "redirect_to_url": {"url": format!("https://hooks.stripe.com/redirect/authenticate/{id}"), "return_url": "https://shop.example/return"}});
        }),
        Scenario::Open => json("requires_payment_method"),
        Scenario::Pending => json("processing"),
        Scenario::Authorized => with("requires_capture", &|b| b["latest_charge"] = charge(0)),
        Scenario::Paid | Scenario::Flaky | Scenario::RateLimited => with("succeeded", &|b| {
            b["amount_received"] = 1200.into();
            b["latest_charge"] = charge(200);
        }),
        Scenario::Cancelled => with("canceled", &|b| {
            b["cancellation_reason"] = "requested_by_customer".into();
        }),
        Scenario::Expired => with("canceled", &|b| b["cancellation_reason"] = "expired".into()),
        Scenario::Failed => with("requires_payment_method", &|b| {
            b["last_payment_error"] = serde_json::json!({"type": "card_error", "code": "card_declined",
                "decline_code": "insufficient_funds", "message": "Your card has insufficient funds."});
        }),
        Scenario::Unknown => json("requires_source"),
        Scenario::NotFound => error(
            StatusCode::NOT_FOUND,
            Some("resource_missing"),
            "No such payment_intent",
        ),
        Scenario::Malformed => (
            StatusCode::OK,
            "{\"object\":\"payment_intent\",\"status\":\"su",
        )
            .into_response(),
    }
}
