//! Mollie (api.mollie.com): `GET /v2/payments/{id}` with a static API key
//! (`Authorization: Bearer live_…` or `test_…`), and Mollie's payment statuses
//! mapped to UCS. Amounts arrive as decimal strings (`{"value": "10.00",
//! "currency": "EUR"}`) and are converted to minor units with the currency's
//! ISO 4217 exponent, exactly: more decimals than the currency has is a failed
//! check, never a rounded amount. Pure translation; the gateway does the I/O.

use serde::Deserialize;
use url::Url;

use super::webhook::{self, Webhook, WebhookCheck, WebhookError};
use super::{
    deserialization_failure, raw_status, url_with_segments, AuthScheme, Connector, ErrorBody,
    HttpRequest, HttpResponse, Method,
};
use crate::codec::Rejection;
use crate::domain::event::{CheckFailure, ConnectorErrorDetails, ErrorInfo};
use crate::domain::{Money, PaymentStatus, RedirectForm, StatusCheckRequest, StatusReport};

/// The Mollie connector.
#[derive(Debug, Clone, Copy, Default)]
pub struct MollieConnector;

/// Mollie's payment status, as documented; anything else is [`MollieStatus::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MollieStatus {
    /// Created; the customer has not completed it.
    Open,
    /// Started, the result is not known yet (for example a bank transfer).
    Pending,
    /// Authorized, to be captured.
    Authorized,
    /// Paid.
    Paid,
    /// Canceled.
    Canceled,
    /// Expired.
    Expired,
    /// Failed.
    Failed,
    /// Not a documented status: never guessed (UNRESOLVED, counted).
    #[serde(other)]
    Unknown,
}

impl MollieStatus {
    /// Parses Mollie's status string (exact, lower case as documented).
    pub fn parse(s: &str) -> MollieStatus {
        super::parse_status_enum(s, MollieStatus::Unknown)
    }
}

/// The normalized status. Exhaustive: a new Mollie status is a compile error here.
/// `expired` stays EXPIRED, as for CM.com (UCS and Hyperswitch map it to Failure;
/// paysync keeps "the customer never paid" apart from "the payment failed").
pub fn map_status(status: MollieStatus, has_checkout: bool) -> PaymentStatus {
    match status {
        MollieStatus::Open if has_checkout => PaymentStatus::AUTHENTICATION_PENDING,
        MollieStatus::Open => PaymentStatus::STARTED,
        MollieStatus::Pending => PaymentStatus::PENDING,
        MollieStatus::Authorized => PaymentStatus::AUTHORIZED,
        MollieStatus::Paid => PaymentStatus::CHARGED,
        MollieStatus::Canceled => PaymentStatus::VOIDED,
        MollieStatus::Expired => PaymentStatus::EXPIRED,
        MollieStatus::Failed => PaymentStatus::FAILURE,
        MollieStatus::Unknown => PaymentStatus::UNRESOLVED,
    }
}

/// Mollie payment methods and their UCS `PaymentMethodType` names.
pub const PAYMENT_METHODS: &[(&str, &str)] = &[
    ("creditcard", "CARD"),
    ("ideal", "IDEAL"),
    ("bancontact", "BANCONTACT_CARD"),
    ("applepay", "APPLE_PAY"),
    ("googlepay", "GOOGLE_PAY"),
    ("paypal", "PAYPAL"),
    ("sofort", "SOFORT"),
    ("eps", "EPS"),
    ("giropay", "GIROPAY"),
    ("przelewy24", "PRZELEWY24"),
    ("banktransfer", "BANK_TRANSFER"),
    ("directdebit", "SEPA_DIRECT_DEBIT"),
];

#[derive(Debug, Deserialize)]
struct WireAmount {
    value: String,
    currency: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WirePayment {
    #[serde(default, deserialize_with = "super::lenient")]
    status: Option<String>,
    // Amounts are not lenient: a malformed amount fails the check.
    #[serde(default)]
    amount: Option<WireAmount>,
    #[serde(default)]
    amount_captured: Option<WireAmount>,
    #[serde(default)]
    amount_refunded: Option<WireAmount>,
    #[serde(default, deserialize_with = "super::lenient")]
    method: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    created_at: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    authorized_at: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    paid_at: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    details: Option<WireDetails>,
    #[serde(rename = "_links", default, deserialize_with = "super::lenient")]
    links: Option<WireLinks>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireDetails {
    #[serde(default, deserialize_with = "super::lenient")]
    failure_reason: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    failure_message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireLinks {
    #[serde(default, deserialize_with = "super::lenient")]
    checkout: Option<WireLink>,
}

#[derive(Debug, Deserialize)]
struct WireLink {
    #[serde(default, deserialize_with = "super::lenient")]
    href: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireError {
    #[serde(default, deserialize_with = "super::lenient")]
    status: Option<u16>,
    #[serde(default, deserialize_with = "super::lenient")]
    title: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    detail: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    field: Option<String>,
}

fn money(
    status: u16,
    what: &str,
    amount: Option<WireAmount>,
) -> Result<Option<Money>, CheckFailure> {
    amount
        .map(|a| {
            Money::from_decimal(&a.value, &a.currency)
                .map_err(|e| deserialization_failure(status, format!("payment `{what}`: {e}")))
        })
        .transpose()
}

fn unix(s: Option<String>) -> Option<i64> {
    s.as_deref().and_then(super::rfc3339_to_unix)
}

impl Connector for MollieConnector {
    fn name(&self) -> &'static str {
        "mollie"
    }

    fn default_base_url(&self) -> &'static str {
        "https://api.mollie.com"
    }

    fn auth(&self) -> &'static dyn AuthScheme {
        &crate::connectors::auth::bearer::BEARER_API_KEY
    }

    /// Mollie's path does not depend on the method; this only names one.
    fn default_payment_method(&self) -> &'static str {
        "CARD"
    }

    fn status_request(
        &self,
        base_url: &Url,
        request: &StatusCheckRequest,
    ) -> Result<HttpRequest, Rejection> {
        Ok(HttpRequest {
            method: Method::Get,
            url: url_with_segments(
                base_url,
                &["v2", "payments", request.connector_transaction_id.as_str()],
            ),
            headers: vec![("accept", "application/hal+json".into())],
            body: None,
        })
    }

    fn parse_status(
        &self,
        request: &StatusCheckRequest,
        response: &HttpResponse,
    ) -> Result<StatusReport, CheckFailure> {
        let code = response.status;
        let wire: WirePayment = serde_json::from_slice(&response.body).map_err(|e| {
            deserialization_failure(code, format!("payment body is not a Mollie payment: {e}"))
        })?;
        let raw = wire
            .status
            .ok_or_else(|| deserialization_failure(code, "payment body has no `status` string"))?;
        let checkout = wire
            .links
            .and_then(|l| l.checkout)
            .and_then(|c| c.href)
            .filter(|h| !h.is_empty());
        let mollie_status = MollieStatus::parse(&raw);
        let amount = money(code, "amount", wire.amount)?;
        let captured = money(code, "amountCaptured", wire.amount_captured)?;
        let refunded = money(code, "amountRefunded", wire.amount_refunded)?;
        let mut report = StatusReport::new(map_status(mollie_status, checkout.is_some()), code);
        report.connector_status = Some(raw_status(&raw));
        report.response_headers = super::published_headers(response);
        report.created_at = unix(wire.created_at);
        report.authorized_at = unix(wire.authorized_at);
        report.captured_at = unix(wire.paid_at);
        report.payment_method_type = wire
            .method
            .as_deref()
            .and_then(|m| PAYMENT_METHODS.iter().find(|(mollie, _)| *mollie == m))
            .map(|(_, ucs)| (*ucs).to_owned())
            .or_else(|| {
                request
                    .payment_method_type
                    .as_ref()
                    .map(|m| m.as_str().to_owned())
            });
        report.captured_amount = match mollie_status {
            MollieStatus::Paid => captured
                .as_ref()
                .or(amount.as_ref())
                .map(|m| m.minor_amount),
            _ => None,
        };
        report.refunded_amount = refunded.map(|m| m.minor_amount);
        report.amount = amount;
        if mollie_status == MollieStatus::Open {
            report.redirection_data = checkout.map(|uri| RedirectForm::Uri { uri });
        }
        if mollie_status == MollieStatus::Failed {
            let details = wire.details;
            report.error = Some(ErrorInfo {
                unified_details: None,
                issuer_details: None,
                connector_details: Some(ConnectorErrorDetails {
                    code: Some("failed".into()),
                    message: details
                        .as_ref()
                        .and_then(|d| d.failure_message.as_deref())
                        .map(super::sanitize),
                    reason: details
                        .as_ref()
                        .and_then(|d| d.failure_reason.as_deref())
                        .map(super::sanitize),
                    connector_transaction_id: Some(
                        request.connector_transaction_id.as_str().to_owned(),
                    ),
                }),
            });
        }
        report.raw_response = Some(String::from_utf8_lossy(&response.body).into_owned());
        Ok(report)
    }

    fn parse_error(&self, body: &[u8]) -> ErrorBody {
        // Mollie's error body: {status, title, detail, field, _links}.
        match serde_json::from_slice::<WireError>(body) {
            Ok(e) => ErrorBody {
                code: e.title.or(e.status.map(|s| s.to_string())),
                message: e.detail,
                reason: e.field,
            },
            Err(_) => ErrorBody::default(),
        }
    }

    fn is_final(&self, status: PaymentStatus) -> bool {
        // paid, canceled, expired, failed.
        matches!(
            status,
            PaymentStatus::CHARGED
                | PaymentStatus::VOIDED
                | PaymentStatus::EXPIRED
                | PaymentStatus::FAILURE
        )
    }

    /// Signed events carry `X-Mollie-Signature`.
    fn signs_webhooks(&self) -> bool {
        true
    }

    /// Mollie's two webhooks. Classic: a form body `id=tr_...`, unsigned (it
    /// only triggers a check), taken only by accounts without a
    /// `webhook_secret`. Signed events (next-gen): JSON with `entityId`,
    /// signed with `X-Mollie-Signature: sha256=<hex HMAC-SHA256 of the raw body>`
    /// under the account's `webhook_secret`; with a secret configured, a bad or
    /// missing signature is refused (while a secret rotates the header may come
    /// twice, and either may match), and so is a classic form (it cannot be
    /// signed). Ids that are not payments (`ord_`, `re_`, `chb_`, ...) are
    /// ignored.
    fn read_webhook(&self, webhook: &Webhook<'_>) -> Result<WebhookCheck, WebhookError> {
        let payment = |id: &str, event_id: Option<String>| {
            if !id.starts_with("tr_") {
                return Ok(WebhookCheck::Ignore("not a payment"));
            }
            Ok(WebhookCheck::Check {
                transaction_id: webhook::transaction_id(id)?,
                method: None,
                event_id,
                connected_account: None,
            })
        };
        if !webhook.is_json() {
            if webhook.secret.is_some() {
                return Err(WebhookError::Unsigned);
            }
            let fields = webhook::form_fields(webhook.body);
            let id = fields
                .iter()
                .find(|(k, _)| k == "id")
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| WebhookError::Malformed("a classic webhook needs `id=`".into()))?;
            return payment(id, None);
        }
        if let Some(secret) = webhook.secret {
            let mut signatures = webhook.header_values("x-mollie-signature").peekable();
            if signatures.peek().is_none() {
                return Err(WebhookError::Unsigned);
            }
            if !webhook::hmac_sha256_matches(secret, webhook.body, signatures) {
                return Err(WebhookError::BadSignature);
            }
        }
        #[derive(Deserialize)]
        struct Event {
            id: Option<String>,
            #[serde(rename = "entityId")]
            entity_id: Option<String>,
        }
        let event: Event = webhook::json_body(webhook.body, "a Mollie event")?;
        let id = event
            .entity_id
            .ok_or_else(|| WebhookError::Malformed("an event needs `entityId`".into()))?;
        let event_id = event.id.filter(|i| {
            !i.is_empty()
                && i.len() <= 64
                && i.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
        payment(&id, event_id)
    }
}

#[cfg(test)]
mod tests {
    //! Mollie specifics. The fixture table every connector passes lives in
    //! `tests/it/connectors.rs` (fixtures in `tests/fixtures/mollie/`).
    use super::*;
    use crate::domain::TransactionId;

    #[test]
    fn status_table() {
        use PaymentStatus::*;
        let cases: &[(&str, bool, PaymentStatus)] = &[
            ("open", true, AUTHENTICATION_PENDING),
            ("open", false, STARTED),
            ("pending", false, PENDING),
            ("authorized", false, AUTHORIZED),
            ("paid", false, CHARGED),
            ("canceled", false, VOIDED),
            ("expired", false, EXPIRED),
            ("failed", false, FAILURE),
            ("failed", true, FAILURE),
            ("cancelled", false, UNRESOLVED),
            ("PAID", false, UNRESOLVED),
            ("refunded", false, UNRESOLVED),
            ("", false, UNRESOLVED),
        ];
        for (raw, checkout, want) in cases {
            assert_eq!(
                map_status(MollieStatus::parse(raw), *checkout),
                *want,
                "{raw} checkout={checkout}"
            );
        }
        for status in PaymentStatus::ALL {
            let expected = matches!(status, CHARGED | VOIDED | EXPIRED | FAILURE);
            assert_eq!(MollieConnector.is_final(*status), expected, "{status}");
        }
    }

    #[test]
    fn the_status_request_needs_no_method_and_encodes_the_id() {
        let base = Url::parse("https://api.mollie.com").unwrap();
        let r = StatusCheckRequest::new(
            TransactionId::parse("tr_WDqYK6vllg").unwrap(),
            "mollie",
            "default",
            "r",
        );
        let http = MollieConnector.status_request(&base, &r).unwrap();
        assert_eq!(
            http.url.as_str(),
            "https://api.mollie.com/v2/payments/tr_WDqYK6vllg"
        );
        assert_eq!(http.method, Method::Get);
        assert!(http.body.is_none());
        assert!(
            !format!("{http:?}")
                .to_ascii_lowercase()
                .contains("authorization"),
            "the gateway adds credentials"
        );
    }

    #[test]
    fn classic_and_signed_webhooks_and_ids_that_are_not_payments() {
        use secrecy::SecretString;
        let c = MollieConnector;
        let form: &[(String, String)] = &[];
        let w = |body: &'static [u8],
                 headers: Vec<(String, String)>,
                 secret: Option<&'static SecretString>| {
            let headers: &'static [(String, String)] = Box::leak(headers.into_boxed_slice());
            Webhook {
                body,
                headers,
                query: form,
                secret,
                now: std::time::SystemTime::now(),
                tolerance: None,
                mode: None,
            }
        };
        let json = || vec![("content-type".to_owned(), "application/json".to_owned())];
        let check = |r: Result<WebhookCheck, WebhookError>| match r {
            Ok(WebhookCheck::Check {
                transaction_id,
                event_id,
                ..
            }) => (transaction_id.as_str().to_owned(), event_id),
            other => panic!("{other:?}"),
        };
        // Classic, unsigned: taken by an account without a secret only (a
        // signed account would otherwise take forged classic forms).
        let secret: &'static SecretString =
            Box::leak(Box::new(SecretString::from("whsec_abc".to_owned())));
        assert_eq!(
            check(c.read_webhook(&w(b"id=tr_WDqYK6vllg", vec![], None))),
            ("tr_WDqYK6vllg".into(), None)
        );
        let unsigned = c
            .read_webhook(&w(b"id=tr_WDqYK6vllg", vec![], Some(secret)))
            .unwrap_err();
        assert_eq!(unsigned, WebhookError::Unsigned);
        assert_eq!((unsigned.status(), unsigned.label()), (401, "unsigned"));
        assert_eq!(
            c.read_webhook(&w(b"id=ord_kEn1PlbGa", vec![], None))
                .unwrap(),
            WebhookCheck::Ignore("not a payment")
        );
        assert_eq!(
            c.read_webhook(&w(b"nothing=here", vec![], None))
                .unwrap_err()
                .status(),
            400
        );
        // Signed events.
        let body: &'static [u8] = br#"{"resource":"event","id":"event_GvJ8WHrp5isUdRub9CJyH","type":"payment-link.paid","entityId":"tr_5B8cwPMGnU","createdAt":"2026-11-30T10:00:00+00:00"}"#;
        let signed = |sig: &str| {
            let mut h = json();
            h.push(("x-mollie-signature".to_owned(), sig.to_owned()));
            h
        };
        let good = webhook::hmac_sha256_header("whsec_abc", body);
        // The same signature from another implementation (Python's hmac module:
        // hmac.new(b"whsec_abc", body, hashlib.sha256).hexdigest()).
        let independent = "sha256=64f83fe25c93fc94fcc2030289c5328b6d457e543aec9abe4fab885aaad3cf91";
        assert_eq!(good, independent);
        check(c.read_webhook(&w(body, signed(independent), Some(secret))));
        // Upper-case hex is the same signature.
        check(
            c.read_webhook(&w(
                body,
                signed(
                    &independent
                        .to_ascii_uppercase()
                        .replace("SHA256=", "sha256="),
                ),
                Some(secret),
            )),
        );
        assert_eq!(
            check(c.read_webhook(&w(body, signed(&good), Some(secret)))),
            (
                "tr_5B8cwPMGnU".into(),
                Some("event_GvJ8WHrp5isUdRub9CJyH".into())
            )
        );
        let old = webhook::hmac_sha256_header("whsec_old", body);
        let mut both = signed(&old);
        both.push(("x-mollie-signature".to_owned(), good.clone()));
        check(c.read_webhook(&w(body, both, Some(secret))));
        assert_eq!(
            c.read_webhook(&w(body, signed(&old), Some(secret)))
                .unwrap_err(),
            WebhookError::BadSignature
        );
        assert_eq!(
            c.read_webhook(&w(body, json(), Some(secret))).unwrap_err(),
            WebhookError::Unsigned,
            "missing"
        );
        // Without a secret configured, an event only triggers a check.
        check(c.read_webhook(&w(body, json(), None)));
        let refund: &'static [u8] = br#"{"id":"event_1","entityId":"re_4qqhO89gsT"}"#;
        assert_eq!(
            c.read_webhook(&w(refund, json(), None)).unwrap(),
            WebhookCheck::Ignore("not a payment")
        );
        assert_eq!(
            c.read_webhook(&w(b"{\"id\":1}", json(), None))
                .unwrap_err()
                .status(),
            400
        );
    }
}
