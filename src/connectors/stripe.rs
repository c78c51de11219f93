//! Stripe (api.stripe.com): `GET /v1/payment_intents/{id}?expand[]=latest_charge`
//! with the account's secret key ([`crate::connectors::auth::stripe`]:
//! `Authorization: Bearer sk_…`, `Stripe-Account` for a connected account), a
//! pinned `Stripe-Version`, and a PaymentIntent's status mapped to UCS by
//! PRODUCT.md §4b: `requires_payment_method` is a failure only when
//! `last_payment_error` says an attempt failed. Amounts arrive in Stripe's
//! smallest unit of a lower-case currency and are published in ISO 4217 minor
//! units ([`iso_minor_units`]: ISK and MGA differ). Signed webhooks
//! (`Stripe-Signature`, [`verify_signature`]) become checks of the
//! PaymentIntent they name. Pure translation; the gateway does the I/O.

use std::time::{Duration, SystemTime};

use secrecy::ExposeSecret;
use serde::Deserialize;
use url::Url;

use super::auth::stripe::{is_account_id, STRIPE_ACCOUNT, STRIPE_SECRET_KEY};
use super::auth::Mode;
use super::webhook::{self, Webhook, WebhookCheck, WebhookError};
use super::{
    deserialization_failure, raw_status, url_with_segments, AuthScheme, Connector, ErrorBody,
    HttpRequest, HttpResponse, Method,
};
use crate::codec::{RejectCode, Rejection};
use crate::domain::event::{CheckFailure, ConnectorErrorDetails, ErrorInfo};
use crate::domain::money::currency_exponent;
use crate::domain::{Money, PaymentStatus, RedirectForm, StatusCheckRequest, StatusReport};

/// The Stripe connector.
#[derive(Debug, Clone, Copy, Default)]
pub struct StripeConnector;

/// The API version paysync reads (UCS pins the same: the version that
/// replaced `charges` with `latest_charge`).
pub const API_VERSION: &str = "2022-11-15";

/// The longest a webhook's timestamp may be away from now, by default.
pub const WEBHOOK_TOLERANCE: Duration = Duration::from_secs(300);

/// Stripe's events can be larger than the intake's default body limit, and
/// Stripe retries a 413 for days.
pub const WEBHOOK_MAX_BODY_BYTES: usize = 1024 * 1024;

/// A PaymentIntent's status, as documented; anything else is `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StripeStatus {
    /// Needs a payment method (fresh, or after a failed attempt).
    RequiresPaymentMethod,
    /// Needs confirming.
    RequiresConfirmation,
    /// Needs the customer (3-D Secure, a redirect).
    RequiresAction,
    /// Being processed.
    Processing,
    /// Authorized, to be captured.
    RequiresCapture,
    /// Paid.
    Succeeded,
    /// Canceled.
    Canceled,
    /// Not a documented status: never guessed (UNRESOLVED, counted).
    #[serde(other)]
    Unknown,
}

impl StripeStatus {
    /// Parses Stripe's status string (exact, as documented).
    pub fn parse(s: &str) -> StripeStatus {
        super::parse_status_enum(s, StripeStatus::Unknown)
    }
}

/// The normalized status (PRODUCT.md §4b). Exhaustive: a new Stripe status is
/// a compile error here.
pub fn map_status(status: StripeStatus, failed_attempt: bool) -> PaymentStatus {
    match status {
        StripeStatus::RequiresPaymentMethod if failed_attempt => PaymentStatus::FAILURE,
        StripeStatus::RequiresPaymentMethod => PaymentStatus::PAYMENT_METHOD_AWAITED,
        StripeStatus::RequiresConfirmation => PaymentStatus::CONFIRMATION_AWAITED,
        StripeStatus::RequiresAction => PaymentStatus::AUTHENTICATION_PENDING,
        StripeStatus::Processing => PaymentStatus::AUTHORIZING,
        StripeStatus::RequiresCapture => PaymentStatus::AUTHORIZED,
        StripeStatus::Succeeded => PaymentStatus::CHARGED,
        StripeStatus::Canceled => PaymentStatus::VOIDED,
        StripeStatus::Unknown => PaymentStatus::UNRESOLVED,
    }
}

/// Zero-decimal currencies at Stripe (its documented list).
pub const STRIPE_ZERO_DECIMAL: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV",
    "XAF", "XOF", "XPF",
];

/// Three-decimal currencies at Stripe (amounts end in 0).
pub const STRIPE_THREE_DECIMAL: &[&str] = &["BHD", "JOD", "KWD", "OMR", "TND"];

/// Decimals of `currency` (upper case) in Stripe's amounts: its zero- and
/// three-decimal lists, else two (ISK included: two-decimal at Stripe).
pub fn stripe_exponent(currency: &str) -> u32 {
    if STRIPE_ZERO_DECIMAL.contains(&currency) {
        0
    } else if STRIPE_THREE_DECIMAL.contains(&currency) {
        3
    } else {
        2
    }
}

/// A Stripe amount of `currency` (any case) in ISO 4217 minor units: scaled
/// by the difference of the exponents; an amount that does not divide
/// exactly, or a currency ISO 4217 does not know, is `None`.
pub fn iso_minor_units(amount: i64, currency: &str) -> Option<Money> {
    let currency = currency.to_ascii_uppercase();
    let iso = currency_exponent(&currency)?;
    let stripe = stripe_exponent(&currency);
    let minor = if iso >= stripe {
        amount.checked_mul(10i64.checked_pow(iso - stripe)?)?
    } else {
        let div = 10i64.checked_pow(stripe - iso)?;
        if amount % div != 0 {
            return None;
        }
        amount / div
    };
    Some(Money {
        minor_amount: minor,
        currency,
    })
}

#[derive(Debug, Deserialize)]
struct WireIntent {
    #[serde(default, deserialize_with = "super::lenient")]
    status: Option<String>,
    // Amounts are not lenient: a malformed amount fails the check.
    #[serde(default)]
    amount: Option<i64>,
    #[serde(default)]
    amount_received: Option<i64>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    last_payment_error: Option<WirePaymentError>,
    #[serde(default, deserialize_with = "super::lenient")]
    next_action: Option<WireNextAction>,
    #[serde(default, deserialize_with = "super::lenient")]
    latest_charge: Option<WireCharge>,
    #[serde(default, deserialize_with = "super::lenient")]
    cancellation_reason: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    created: Option<i64>,
    #[serde(default, deserialize_with = "super::lenient")]
    metadata: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
struct WirePaymentError {
    #[serde(default, deserialize_with = "super::lenient")]
    code: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    decline_code: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireNextAction {
    #[serde(default, deserialize_with = "super::lenient")]
    redirect_to_url: Option<WireRedirect>,
}

#[derive(Debug, Deserialize)]
struct WireRedirect {
    #[serde(default, deserialize_with = "super::lenient")]
    url: Option<String>,
}

/// The expanded Charge (an id string when not expanded: then dropped).
#[derive(Debug, Deserialize)]
struct WireCharge {
    #[serde(default)]
    amount_refunded: Option<i64>,
    #[serde(default, deserialize_with = "super::lenient")]
    payment_method_details: Option<WireMethodDetails>,
}

#[derive(Debug, Deserialize)]
struct WireMethodDetails {
    #[serde(rename = "type", default, deserialize_with = "super::lenient")]
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireErrorBody {
    error: Option<WireErrorDetail>,
}

#[derive(Debug, Deserialize)]
struct WireErrorDetail {
    #[serde(default, deserialize_with = "super::lenient")]
    code: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    message: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    param: Option<String>,
    #[serde(rename = "type", default, deserialize_with = "super::lenient")]
    kind: Option<String>,
}

/// Stripe's payment method types and their UCS `PaymentMethodType` names.
pub const PAYMENT_METHODS: &[(&str, &str)] = &[
    ("card", "CARD"),
    ("ideal", "IDEAL"),
    ("bancontact", "BANCONTACT_CARD"),
    ("sepa_debit", "SEPA_DIRECT_DEBIT"),
    ("sofort", "SOFORT"),
    ("eps", "EPS"),
    ("giropay", "GIROPAY"),
    ("p24", "PRZELEWY24"),
    ("klarna", "KLARNA"),
    ("paypal", "PAYPAL"),
];

impl Connector for StripeConnector {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn default_base_url(&self) -> &'static str {
        "https://api.stripe.com"
    }

    fn auth(&self) -> &'static dyn AuthScheme {
        &STRIPE_SECRET_KEY
    }

    /// Stripe's path does not depend on the method; this only names one.
    fn default_payment_method(&self) -> &'static str {
        "CARD"
    }

    fn api_version(&self) -> Option<(&'static str, &'static str)> {
        Some(("stripe-version", API_VERSION))
    }

    /// Only `resource_missing` is an unknown PaymentIntent (an unknown URL
    /// is a 404 too).
    fn is_not_found(&self, body: &ErrorBody) -> bool {
        body.code.as_deref() == Some("resource_missing")
    }

    fn signs_with_timestamp(&self) -> bool {
        true
    }

    fn may_retry(&self, response: &HttpResponse) -> bool {
        response.header("stripe-should-retry") != Some("false")
    }

    fn webhook_max_body_bytes(&self) -> Option<usize> {
        Some(WEBHOOK_MAX_BODY_BYTES)
    }

    /// Only PaymentIntents (`pi_…`); a connected account, when the request
    /// names one, in `Stripe-Account` (it wins over the account's own).
    fn status_request(
        &self,
        base_url: &Url,
        request: &StatusCheckRequest,
    ) -> Result<HttpRequest, Rejection> {
        let id = request.connector_transaction_id.as_str();
        if !id.starts_with("pi_") || id.len() < 4 {
            return Err(Rejection::new(
                RejectCode::InvalidTransactionId,
                "connector_transaction_id: Stripe checks PaymentIntents, whose ids begin with pi_",
            ));
        }
        let mut url = url_with_segments(base_url, &["v1", "payment_intents", id]);
        url.query_pairs_mut()
            .append_pair("expand[]", "latest_charge");
        let mut headers = vec![("accept", "application/json".to_owned())];
        if let Some(account) = &request.connected_account {
            headers.push((STRIPE_ACCOUNT, account.clone()));
        }
        Ok(HttpRequest {
            method: Method::Get,
            url,
            headers,
            body: None,
        })
    }

    fn parse_status(
        &self,
        request: &StatusCheckRequest,
        response: &HttpResponse,
    ) -> Result<StatusReport, CheckFailure> {
        let code = response.status;
        let wire: WireIntent = serde_json::from_slice(&response.body).map_err(|e| {
            deserialization_failure(code, format!("body is not a Stripe PaymentIntent: {e}"))
        })?;
        let raw = wire
            .status
            .ok_or_else(|| deserialization_failure(code, "PaymentIntent has no `status` string"))?;
        let status = StripeStatus::parse(&raw);
        let failed = wire.last_payment_error.as_ref();
        let mut report = StatusReport::new(map_status(status, failed.is_some()), code);
        report.connector_status = Some(raw_status(&raw));
        report.response_headers = super::published_headers(response);
        let currency = wire.currency.as_deref();
        let convert = |field: &str, v: Option<i64>| -> Result<Option<Money>, CheckFailure> {
            match (v, currency) {
                (None, _) => Ok(None),
                (Some(_), None) => Err(deserialization_failure(
                    code,
                    format!("`{field}` without a `currency`"),
                )),
                (Some(a), Some(c)) => iso_minor_units(a, c).map(Some).ok_or_else(|| {
                    deserialization_failure(
                        code,
                        format!("`{field}` is not an exact amount of an ISO 4217 currency"),
                    )
                }),
            }
        };
        let amount = convert("amount", wire.amount)?;
        let received = convert("amount_received", wire.amount_received)?;
        let charge = wire.latest_charge.as_ref();
        let refunded = convert(
            "latest_charge.amount_refunded",
            charge.and_then(|c| c.amount_refunded),
        )?;
        report.amount = amount;
        if status == StripeStatus::Succeeded {
            report.captured_amount = received.map(|m| m.minor_amount);
        }
        report.refunded_amount = refunded.map(|m| m.minor_amount);
        report.created_at = wire.created;
        report.merchant_order_id = wire
            .metadata
            .as_ref()
            .and_then(|m| m.get("order_id"))
            .and_then(|v| v.as_str())
            .map(super::sanitize);
        report.payment_method_type = charge
            .and_then(|c| c.payment_method_details.as_ref())
            .and_then(|d| d.kind.as_deref())
            .map(|kind| {
                PAYMENT_METHODS
                    .iter()
                    .find(|(stripe, _)| *stripe == kind)
                    .map_or_else(
                        || super::sanitize(&kind.to_ascii_uppercase()),
                        |(_, ucs)| (*ucs).to_owned(),
                    )
            })
            .or_else(|| {
                request
                    .payment_method_type
                    .as_ref()
                    .map(|m| m.as_str().to_owned())
            });
        if status == StripeStatus::RequiresAction {
            report.redirection_data = wire
                .next_action
                .as_ref()
                .and_then(|a| a.redirect_to_url.as_ref())
                .and_then(|r| r.url.clone())
                .filter(|u| !u.is_empty())
                .map(|uri| RedirectForm::Uri { uri });
        }
        let details = |code: Option<String>, message: Option<String>, reason: Option<String>| {
            Some(ErrorInfo {
                unified_details: None,
                issuer_details: None,
                connector_details: Some(ConnectorErrorDetails {
                    code,
                    message,
                    reason,
                    connector_transaction_id: Some(
                        request.connector_transaction_id.as_str().to_owned(),
                    ),
                }),
            })
        };
        match status {
            StripeStatus::RequiresPaymentMethod => {
                if let Some(e) = failed {
                    report.error = details(
                        e.decline_code
                            .as_deref()
                            .or(e.code.as_deref())
                            .map(super::sanitize),
                        e.message.as_deref().map(super::sanitize),
                        None,
                    );
                }
            }
            StripeStatus::Canceled => {
                report.error = details(
                    Some("canceled".into()),
                    None,
                    wire.cancellation_reason.as_deref().map(super::sanitize),
                );
            }
            _ => {}
        }
        report.raw_response = Some(String::from_utf8_lossy(&response.body).into_owned());
        Ok(report)
    }

    fn parse_error(&self, body: &[u8]) -> ErrorBody {
        // {"error": {"type", "code", "decline_code", "message", "param"}}
        match serde_json::from_slice::<WireErrorBody>(body) {
            Ok(WireErrorBody { error: Some(e) }) => ErrorBody {
                code: e.code.or(e.kind),
                message: e.message,
                reason: e.param,
            },
            _ => ErrorBody::default(),
        }
    }

    fn is_final(&self, status: PaymentStatus) -> bool {
        // succeeded and canceled. A failed attempt (requires_payment_method
        // with an error) can still be retried by the customer: followed on.
        matches!(status, PaymentStatus::CHARGED | PaymentStatus::VOIDED)
    }

    fn signs_webhooks(&self) -> bool {
        true
    }

    /// Stripe's events, signed with `Stripe-Signature` under the account's
    /// `webhook_secret` (required: an unsigned delivery is refused).
    /// `payment_intent.*` checks `data.object.id`; `charge.refunded` and
    /// `charge.refund.updated` check `data.object.payment_intent`; other
    /// types are ignored. `livemode` must match the account's key mode.
    fn read_webhook(&self, webhook: &Webhook<'_>) -> Result<WebhookCheck, WebhookError> {
        let Some(secret) = webhook.secret else {
            return Err(WebhookError::Malformed(
                "a Stripe account takes webhooks only with a webhook_secret".into(),
            ));
        };
        let header = webhook
            .header_values("stripe-signature")
            .next()
            .ok_or(WebhookError::Unsigned)?;
        let tolerance = webhook.tolerance.unwrap_or(WEBHOOK_TOLERANCE);
        if !verify_signature(
            header,
            webhook.body,
            secret.expose_secret(),
            webhook.now,
            tolerance,
        ) {
            return Err(WebhookError::BadSignature);
        }
        #[derive(Deserialize)]
        struct Event {
            id: Option<String>,
            #[serde(rename = "type")]
            kind: Option<String>,
            livemode: Option<bool>,
            account: Option<String>,
            data: Option<Data>,
        }
        #[derive(Deserialize)]
        struct Data {
            object: Option<Object>,
        }
        #[derive(Deserialize)]
        struct Object {
            id: Option<String>,
            payment_intent: Option<serde_json::Value>,
        }
        let event: Event = webhook::json_body(webhook.body, "a Stripe event")?;
        if let (Some(live), Some(mode)) = (event.livemode, webhook.mode) {
            if live != (mode == Mode::Live) {
                return Err(WebhookError::WrongMode);
            }
        }
        let kind = event.kind.unwrap_or_default();
        let object = event.data.and_then(|d| d.object);
        let intent = if kind.starts_with("payment_intent.") {
            object.and_then(|o| o.id)
        } else if kind == "charge.refunded" || kind == "charge.refund.updated" {
            // A charge made without a PaymentIntent (the Charges API) has
            // nothing paysync checks: ignored, not refused (Stripe would
            // retry a 4xx for days).
            match object
                .and_then(|o| o.payment_intent)
                .and_then(|v| v.as_str().map(str::to_owned))
            {
                Some(pi) => Some(pi),
                None => return Ok(WebhookCheck::Ignore("a charge without a PaymentIntent")),
            }
        } else {
            return Ok(WebhookCheck::Ignore("an event type paysync does not check"));
        };
        let intent = intent
            .ok_or_else(|| WebhookError::Malformed("the event names no PaymentIntent".into()))?;
        if !intent.starts_with("pi_") {
            return Err(WebhookError::Malformed(
                "the event's PaymentIntent id does not begin with pi_".into(),
            ));
        }
        let connected_account = match event.account {
            Some(a) if is_account_id(&a) => Some(a),
            Some(_) => {
                return Err(WebhookError::Malformed(
                    "`account` is not a connected account id".into(),
                ))
            }
            None => None,
        };
        Ok(WebhookCheck::Check {
            transaction_id: webhook::transaction_id(&intent)?,
            method: None,
            event_id: event.id.filter(|i| i.starts_with("evt_") && i.len() <= 255),
            connected_account,
        })
    }
}

/// True when `header` (`t=<unix>,v1=<hex>[,v1=…][,v0=…]`) signs `body` under
/// `secret` (the whole `whsec_…` string's bytes as the HMAC key) and its
/// timestamp is within `tolerance` of `now`, either way. Any `v1` may match
/// (a secret being rolled sends several; at most 8 are read); `v0` and
/// unknown schemes are ignored. One HMAC, compared in constant time. Pure:
/// the clock is an argument.
pub fn verify_signature(
    header: &str,
    body: &[u8],
    secret: &str,
    now: SystemTime,
    tolerance: Duration,
) -> bool {
    let mut timestamp: Option<&str> = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        match k {
            "t" if timestamp.is_none() => timestamp = Some(v),
            "v1" if signatures.len() < 8 => signatures.push(v),
            _ => {}
        }
    }
    let Some(t) = timestamp else {
        return false;
    };
    let Ok(unix) = t.parse::<u64>() else {
        return false;
    };
    let Ok(now) = now.duration_since(SystemTime::UNIX_EPOCH) else {
        return false;
    };
    if now.as_secs().abs_diff(unix) > tolerance.as_secs() {
        return false;
    }
    if signatures.is_empty() {
        return false;
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = Vec::with_capacity(t.len() + 1 + body.len());
    signed.extend_from_slice(t.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    let expected = ring::hmac::sign(&key, &signed);
    signatures.into_iter().fold(false, |matched, hex| {
        let equal = webhook::decode_hex(hex)
            .is_some_and(|tag| webhook::constant_time_eq(&tag, expected.as_ref()));
        matched | equal
    })
}

/// A `Stripe-Signature` header for `body` at `t` under `secret` (tests, the
/// demo and the simulator sign with it).
pub fn signature_header(secret: &str, t: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = t.to_string().into_bytes();
    signed.push(b'.');
    signed.extend_from_slice(body);
    let tag = ring::hmac::sign(&key, &signed);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

#[cfg(test)]
mod tests {
    //! Stripe specifics. The fixture table every connector passes lives in
    //! `tests/it/connectors.rs` (fixtures in `tests/fixtures/stripe/`).
    use super::*;
    use crate::domain::TransactionId;
    use secrecy::SecretString;

    #[test]
    fn status_table() {
        use PaymentStatus::*;
        let cases: &[(&str, bool, PaymentStatus)] = &[
            ("requires_payment_method", false, PAYMENT_METHOD_AWAITED),
            ("requires_payment_method", true, FAILURE),
            ("requires_confirmation", false, CONFIRMATION_AWAITED),
            ("requires_action", false, AUTHENTICATION_PENDING),
            ("processing", false, AUTHORIZING),
            ("requires_capture", false, AUTHORIZED),
            ("succeeded", false, CHARGED),
            ("canceled", false, VOIDED),
            ("requires_source", false, UNRESOLVED),
            ("Succeeded", false, UNRESOLVED),
            ("", false, UNRESOLVED),
        ];
        for (raw, failed, want) in cases {
            assert_eq!(
                map_status(StripeStatus::parse(raw), *failed),
                *want,
                "{raw}"
            );
        }
        for status in PaymentStatus::ALL {
            let expected = matches!(status, CHARGED | VOIDED);
            assert_eq!(StripeConnector.is_final(*status), expected, "{status}");
        }
    }

    #[test]
    fn amounts_are_published_in_iso_4217_minor_units() {
        // Every currency of Stripe's zero-decimal list, with the minor units
        // ISO 4217's table gives 1,234 of Stripe's units (written out from the
        // ISO list, not computed: all zero-decimal there too, but MGA, two).
        let expected: &[(&str, i64)] = &[
            ("BIF", 1234),
            ("CLP", 1234),
            ("DJF", 1234),
            ("GNF", 1234),
            ("JPY", 1234),
            ("KMF", 1234),
            ("KRW", 1234),
            ("MGA", 123_400),
            ("PYG", 1234),
            ("RWF", 1234),
            ("UGX", 1234),
            ("VND", 1234),
            ("VUV", 1234),
            ("XAF", 1234),
            ("XOF", 1234),
            ("XPF", 1234),
        ];
        assert_eq!(expected.len(), STRIPE_ZERO_DECIMAL.len());
        for (c, minor) in expected {
            assert!(STRIPE_ZERO_DECIMAL.contains(c), "{c}");
            let m = iso_minor_units(1234, &c.to_ascii_lowercase()).unwrap();
            assert_eq!((m.currency.as_str(), m.minor_amount), (*c, *minor));
        }
        assert_eq!(iso_minor_units(5000, "mga").unwrap().minor_amount, 500_000);
        // The three-decimal list agrees with ISO 4217 (three decimals each).
        for c in ["BHD", "JOD", "KWD", "OMR", "TND"] {
            assert!(STRIPE_THREE_DECIMAL.contains(&c), "{c}");
            assert_eq!(iso_minor_units(12340, c).unwrap().minor_amount, 12340);
        }
        // ISK: two decimals at Stripe, none in ISO 4217; only whole krónur.
        assert_eq!(iso_minor_units(150_000, "isk").unwrap().minor_amount, 1500);
        assert_eq!(iso_minor_units(150_050, "isk"), None);
        assert_eq!(iso_minor_units(2000, "eur").unwrap().minor_amount, 2000);
        assert_eq!(iso_minor_units(100, "xyz"), None, "not ISO 4217");
        assert_eq!(iso_minor_units(i64::MAX, "mga"), None, "overflow");
    }

    #[test]
    fn only_payment_intents_are_checked_and_a_connected_account_goes_in_its_header() {
        let base = Url::parse("https://api.stripe.com").unwrap();
        let mut r = StatusCheckRequest::new(
            TransactionId::parse("pi_3MtwBwLkdIwHu7ix28a3tqPa").unwrap(),
            "stripe",
            "default",
            "r",
        );
        let http = StripeConnector.status_request(&base, &r).unwrap();
        assert_eq!(
            http.url.as_str(),
            "https://api.stripe.com/v1/payment_intents/pi_3MtwBwLkdIwHu7ix28a3tqPa?expand%5B%5D=latest_charge"
        );
        assert!(!http.headers.iter().any(|(k, _)| *k == STRIPE_ACCOUNT));
        r.connected_account = Some("acct_1032D82eZvKYlo2C".into());
        let http = StripeConnector.status_request(&base, &r).unwrap();
        assert!(http
            .headers
            .contains(&(STRIPE_ACCOUNT, "acct_1032D82eZvKYlo2C".to_owned())));
        for id in ["ch_1", "pm_1", "tr_1", "pi_", "in_1"] {
            let r = StatusCheckRequest::new(TransactionId::parse(id).unwrap(), "stripe", "d", "r");
            let e = StripeConnector.status_request(&base, &r).unwrap_err();
            assert_eq!(e.code, RejectCode::InvalidTransactionId, "{id}");
        }
    }

    #[test]
    fn should_retry_false_is_final() {
        let r = |h: &[(&str, &str)]| HttpResponse {
            status: 429,
            headers: h
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: Vec::new(),
        };
        assert!(StripeConnector.may_retry(&r(&[])));
        assert!(StripeConnector.may_retry(&r(&[("stripe-should-retry", "true")])));
        assert!(!StripeConnector.may_retry(&r(&[("stripe-should-retry", "false")])));
    }

    fn vector() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/stripe/event_test_signature.json"
        ))
        .unwrap()
    }

    const VECTOR_SIG: &str = "2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7";

    fn at(unix: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix)
    }

    #[test]
    fn stripes_published_vector_verifies() {
        let body = vector();
        assert_eq!(body.len(), 484);
        let header = format!("t=1533204620,v1={VECTOR_SIG}");
        let now = at(1_533_204_620);
        assert!(verify_signature(
            &header,
            &body,
            "webhook_secret",
            now,
            WEBHOOK_TOLERANCE
        ));
        // Our signer agrees with the vector (an independent implementation:
        // stripe-dotnet; and `openssl sha256 -hmac`, see the fixture's README).
        assert_eq!(
            signature_header("webhook_secret", 1_533_204_620, &body),
            header
        );
        // One byte off, the final newline dropped, another secret: refused.
        assert!(!verify_signature(
            &header,
            &body[..483],
            "webhook_secret",
            now,
            WEBHOOK_TOLERANCE
        ));
        assert!(!verify_signature(
            &header,
            &body,
            "webhook_secreT",
            now,
            WEBHOOK_TOLERANCE
        ));
    }

    #[test]
    fn the_tolerance_holds_both_ways_and_any_v1_may_match() {
        let body = vector();
        let header = format!("t=1533204620,v1={VECTOR_SIG}");
        let t = 1_533_204_620;
        let tol = Duration::from_secs(300);
        assert!(verify_signature(
            &header,
            &body,
            "webhook_secret",
            at(t + 300),
            tol
        ));
        assert!(
            !verify_signature(&header, &body, "webhook_secret", at(t + 301), tol),
            "too old"
        );
        assert!(verify_signature(
            &header,
            &body,
            "webhook_secret",
            at(t - 300),
            tol
        ));
        assert!(
            !verify_signature(&header, &body, "webhook_secret", at(t - 301), tol),
            "from the future"
        );
        // A secret being rolled: several v1, any may match; v0 and unknown
        // schemes are ignored; spaces are tolerated.
        let rolled = format!(
            "t=1533204620, v1={}, v1={VECTOR_SIG}, v0=00ff",
            "ab".repeat(32)
        );
        assert!(verify_signature(
            &rolled,
            &body,
            "webhook_secret",
            at(t),
            tol
        ));
        let v0_only = format!("t=1533204620,v0={VECTOR_SIG}");
        assert!(!verify_signature(
            &v0_only,
            &body,
            "webhook_secret",
            at(t),
            tol
        ));
        for broken in [
            "",
            "t=",
            "v1=00",
            &format!("v1={VECTOR_SIG}"),
            "t=x,v1=00",
            "t=99999999999999999999,v1=00",
        ] {
            assert!(
                !verify_signature(broken, &body, "webhook_secret", at(t), tol),
                "{broken:?}"
            );
        }
    }

    fn event(kind: &str, object: serde_json::Value, live: bool, account: Option<&str>) -> Vec<u8> {
        let mut e = serde_json::json!({
            "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy", "object": "event", "api_version": API_VERSION,
            "created": 1_686_089_970, "type": kind, "livemode": live, "data": {"object": object}
        });
        if let Some(a) = account {
            e["account"] = a.into();
        }
        e.to_string().into_bytes()
    }

    fn read(body: &[u8], t: u64, now: u64, mode: Mode) -> Result<WebhookCheck, WebhookError> {
        let secret = SecretString::from("whsec_test_secret".to_owned());
        let headers = vec![(
            "stripe-signature".to_owned(),
            signature_header("whsec_test_secret", t, body),
        )];
        StripeConnector.read_webhook(&Webhook {
            body,
            headers: &headers,
            query: &[],
            secret: Some(&secret),
            now: at(now),
            tolerance: Some(WEBHOOK_TOLERANCE),
            mode: Some(mode),
        })
    }

    #[test]
    fn events_become_checks_of_their_payment_intent() {
        let now = 1_700_000_000;
        let pi = serde_json::json!({"id": "pi_3MtwBwLkdIwHu7ix28a3tqPa", "object": "payment_intent", "status": "succeeded"});
        match read(
            &event("payment_intent.succeeded", pi.clone(), false, None),
            now,
            now,
            Mode::Test,
        )
        .unwrap()
        {
            WebhookCheck::Check {
                transaction_id,
                event_id,
                connected_account,
                ..
            } => {
                assert_eq!(transaction_id.as_str(), "pi_3MtwBwLkdIwHu7ix28a3tqPa");
                assert_eq!(event_id.as_deref(), Some("evt_1NG8Du2eZvKYlo2CUI79vXWy"));
                assert_eq!(connected_account, None);
            }
            other => panic!("{other:?}"),
        }
        // A refund names the PaymentIntent of its charge.
        let charge =
            serde_json::json!({"id": "ch_1", "object": "charge", "payment_intent": "pi_refunded1"});
        for kind in ["charge.refunded", "charge.refund.updated"] {
            match read(
                &event(kind, charge.clone(), false, None),
                now,
                now,
                Mode::Test,
            )
            .unwrap()
            {
                WebhookCheck::Check { transaction_id, .. } => {
                    assert_eq!(transaction_id.as_str(), "pi_refunded1")
                }
                other => panic!("{kind}: {other:?}"),
            }
        }
        // A connected account's event is checked through that account.
        match read(
            &event(
                "payment_intent.processing",
                pi.clone(),
                false,
                Some("acct_1032D82eZvKYlo2C"),
            ),
            now,
            now,
            Mode::Test,
        )
        .unwrap()
        {
            WebhookCheck::Check {
                connected_account, ..
            } => {
                assert_eq!(connected_account.as_deref(), Some("acct_1032D82eZvKYlo2C"))
            }
            other => panic!("{other:?}"),
        }
        // Other types: ignored.
        let customer = serde_json::json!({"id": "cus_1", "object": "customer"});
        assert!(matches!(
            read(
                &event("customer.created", customer, false, None),
                now,
                now,
                Mode::Test
            )
            .unwrap(),
            WebhookCheck::Ignore(_)
        ));
        // The other mode: 400.
        assert_eq!(
            read(
                &event("payment_intent.succeeded", pi.clone(), true, None),
                now,
                now,
                Mode::Test
            )
            .unwrap_err(),
            WebhookError::WrongMode
        );
        assert_eq!(
            read(
                &event("payment_intent.succeeded", pi.clone(), false, None),
                now,
                now,
                Mode::Live
            )
            .unwrap_err(),
            WebhookError::WrongMode
        );
        // Old, or from the future: refused as a bad signature.
        let body = event("payment_intent.succeeded", pi.clone(), false, None);
        assert_eq!(
            read(&body, now - 301, now, Mode::Test).unwrap_err(),
            WebhookError::BadSignature
        );
        assert_eq!(
            read(&body, now + 301, now, Mode::Test).unwrap_err(),
            WebhookError::BadSignature
        );
        // Not a PaymentIntent, or a bad account id: malformed.
        let odd = serde_json::json!({"id": "ch_1"});
        assert!(matches!(
            read(
                &event("payment_intent.succeeded", odd, false, None),
                now,
                now,
                Mode::Test
            ),
            Err(WebhookError::Malformed(_))
        ));
        assert!(matches!(
            read(
                &event("payment_intent.succeeded", pi, false, Some("acct_../x")),
                now,
                now,
                Mode::Test
            ),
            Err(WebhookError::Malformed(_))
        ));
    }

    #[test]
    fn an_unsigned_delivery_is_refused() {
        let secret = SecretString::from("whsec_test_secret".to_owned());
        let w = |secret| Webhook {
            body: b"{}",
            headers: &[],
            query: &[],
            secret,
            now: SystemTime::now(),
            tolerance: None,
            mode: None,
        };
        assert_eq!(
            StripeConnector.read_webhook(&w(Some(&secret))).unwrap_err(),
            WebhookError::Unsigned
        );
        assert!(matches!(
            StripeConnector.read_webhook(&w(None)),
            Err(WebhookError::Malformed(_))
        ));
    }
}
