//! CM.com (api.pay.cm.com): OAuth2 client-credentials token, "Get Transaction" for
//! every payment method that shares its shape, and the status table of
//! PRODUCT.md §4. Pure translation; the gateway does the I/O.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use super::webhook::{self, Webhook, WebhookCheck, WebhookError};
use super::{
    deserialization_failure, raw_status, rfc3339_to_unix, url_with_segments, AccessToken,
    AuthScheme, ClientCredentials, Connector, ErrorBody, HttpRequest, HttpResponse, Method,
    OAuth2ClientCredentials, SecretBody, TokenEndpoint,
};
use crate::codec::{RejectCode, Rejection};
use crate::domain::event::{CheckFailure, ConnectorErrorDetails, ErrorInfo, FailureCode};
use crate::domain::{
    Money, PaymentMethodType, PaymentStatus, RedirectForm, StatusCheckRequest, StatusReport,
};

/// The CM.com connector.
#[derive(Debug, Clone, Copy, Default)]
pub struct CmConnector;

/// CM.com's transaction status, as documented; anything else is [`CmStatus::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum CmStatus {
    /// Created; the initial status.
    #[serde(rename = "OPEN")]
    Open,
    /// Authorized.
    #[serde(rename = "AUTHORIZED")]
    Authorized,
    /// Paid.
    #[serde(rename = "SUCCESS")]
    Success,
    /// Cancelled by the customer.
    #[serde(rename = "CANCELLED")]
    Cancelled,
    /// Expired without success.
    #[serde(rename = "EXPIRED")]
    Expired,
    /// Failed, reason unknown.
    #[serde(rename = "FAILURE")]
    Failure,
    /// Not a documented status: never guessed (UNRESOLVED, counted; the raw string
    /// is published as `connector_status`).
    #[serde(other)]
    Unknown,
}

impl CmStatus {
    /// Parses CM.com's status string (exact, upper case as documented).
    pub fn parse(s: &str) -> CmStatus {
        super::parse_status_enum(s, CmStatus::Unknown)
    }
}

/// PRODUCT.md §4: the normalized status. Exhaustive: a new CM.com status is a
/// compile error here, not a silent guess.
pub fn map_status(status: CmStatus, has_redirect: bool) -> PaymentStatus {
    match status {
        CmStatus::Open if has_redirect => PaymentStatus::AUTHENTICATION_PENDING,
        CmStatus::Open => PaymentStatus::STARTED,
        CmStatus::Authorized => PaymentStatus::AUTHORIZED,
        CmStatus::Success => PaymentStatus::CHARGED,
        CmStatus::Cancelled => PaymentStatus::VOIDED,
        CmStatus::Expired => PaymentStatus::EXPIRED,
        CmStatus::Failure => PaymentStatus::FAILURE,
        CmStatus::Unknown => PaymentStatus::UNRESOLVED,
    }
}

/// The payment method used when a request names none (the seed's Google Pay).
pub const DEFAULT_PAYMENT_METHOD: &str = "GOOGLE_PAY";

/// UCS payment methods and their Get Transaction path segments.
pub const PAYMENT_METHODS: &[(&str, &str)] = &[
    ("GOOGLE_PAY", "google-pay"),
    ("APPLE_PAY", "apple-pay"),
    ("CREDIT", "creditcard"),
    ("CARD", "creditcard"),
    ("IDEAL", "ideal"),
    ("BANCONTACT_CARD", "bancontact"),
    ("CHECKOUT", "checkout"),
];

/// The path segment of a UCS payment method, or `None` when CM.com has no such
/// Get Transaction endpoint.
pub fn method_segment(payment_method_type: &str) -> Option<&'static str> {
    PAYMENT_METHODS
        .iter()
        .find(|(ucs, _)| *ucs == payment_method_type)
        .map(|(_, segment)| *segment)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireTransaction {
    #[serde(default, deserialize_with = "super::lenient")]
    status: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    reference: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    amount: Option<i64>,
    #[serde(default, deserialize_with = "super::lenient")]
    currency: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    created_at: Option<String>,
    #[serde(default, deserialize_with = "super::lenient")]
    action: Option<WireAction>,
    #[serde(default, deserialize_with = "super::lenient")]
    refunds: Option<WireRefunds>,
}

#[derive(Debug, Deserialize)]
struct WireAction {
    #[serde(default, deserialize_with = "super::lenient")]
    redirect: Option<WireRedirect>,
}

#[derive(Debug, Deserialize)]
struct WireRedirect {
    #[serde(default, deserialize_with = "super::lenient")]
    url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireRefunds {
    #[serde(default, deserialize_with = "super::lenient")]
    refunded_amount: Option<i64>,
    #[serde(default, deserialize_with = "super::lenient")]
    refunded_pending_amount: Option<i64>,
}

#[derive(Deserialize)]
struct WireToken {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// CM.com's OAuth2 token endpoint.
pub struct CmToken;

/// CM.com's scheme: OAuth2 client credentials at its token endpoint.
pub static CM_AUTH: OAuth2ClientCredentials = OAuth2ClientCredentials { endpoint: &CmToken };

impl TokenEndpoint for CmToken {
    fn token_request(&self, base_url: &Url, credentials: &ClientCredentials) -> HttpRequest {
        let url = url_with_segments(base_url, &["api", "v1", "authorization", "oauth2", "token"]);
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", &credentials.client_id)
            .append_pair("client_secret", credentials.secret())
            .append_pair("grant_type", "client_credentials")
            .finish();
        HttpRequest {
            method: Method::Post,
            url,
            headers: vec![("accept", "application/json".into())],
            body: Some(SecretBody {
                content_type: "application/x-www-form-urlencoded",
                body: SecretString::from(body),
            }),
        }
    }

    fn parse_token(&self, response: &HttpResponse) -> Result<AccessToken, CheckFailure> {
        // The body is never quoted in errors: a token endpoint may echo credentials.
        let refused = || {
            CheckFailure::new(
                FailureCode::AuthenticationFailed,
                "token endpoint answered with a body that is not a token",
            )
            .with_status(response.status)
        };
        let wire: WireToken = serde_json::from_slice(&response.body).map_err(|_| refused())?;
        if wire.access_token.is_empty() {
            return Err(refused());
        }
        Ok(AccessToken {
            token: SecretString::from(wire.access_token),
            // No expiry given: assume a short life and refresh early rather than late.
            expires_in: Duration::from_secs(wire.expires_in.unwrap_or(300)),
        })
    }
}

impl Connector for CmConnector {
    fn name(&self) -> &'static str {
        "cm"
    }

    fn default_base_url(&self) -> &'static str {
        "https://api.pay.cm.com"
    }

    fn auth(&self) -> &'static dyn AuthScheme {
        &CM_AUTH
    }

    fn default_payment_method(&self) -> &'static str {
        DEFAULT_PAYMENT_METHOD
    }

    fn status_request(
        &self,
        base_url: &Url,
        request: &StatusCheckRequest,
    ) -> Result<HttpRequest, Rejection> {
        let method = request
            .payment_method_type
            .as_ref()
            .map_or(DEFAULT_PAYMENT_METHOD, |m| m.as_str());
        let segment = method_segment(method).ok_or_else(|| {
            Rejection::new(
                RejectCode::UnsupportedPaymentMethod,
                format!(
                    "payment_method_type `{method}` is not supported by cm (GOOGLE_PAY, APPLE_PAY, CREDIT, CARD, IDEAL, BANCONTACT_CARD, CHECKOUT)"
                ),
            )
        })?;
        let url = url_with_segments(
            base_url,
            &[
                "api",
                "v1",
                "paymentmethods",
                segment,
                "v1",
                "transactions",
                request.connector_transaction_id.as_str(),
            ],
        );
        Ok(HttpRequest {
            method: Method::Get,
            url,
            headers: vec![("accept", "application/json".into())],
            body: None,
        })
    }

    fn parse_status(
        &self,
        request: &StatusCheckRequest,
        response: &HttpResponse,
    ) -> Result<StatusReport, CheckFailure> {
        let wire: WireTransaction = serde_json::from_slice(&response.body).map_err(|e| {
            deserialization_failure(
                response.status,
                format!("transaction body is not valid JSON: {e}"),
            )
        })?;
        let raw = wire.status.ok_or_else(|| {
            deserialization_failure(response.status, "transaction body has no `status` string")
        })?;
        let redirect_url = wire
            .action
            .and_then(|a| a.redirect)
            .and_then(|r| r.url)
            .filter(|u| !u.is_empty());
        let cm_status = CmStatus::parse(&raw);
        let mut report = StatusReport::new(
            map_status(cm_status, redirect_url.is_some()),
            response.status,
        );
        report.connector_status = Some(raw_status(&raw));
        report.response_headers = super::published_headers(response);
        report.created_at = wire.created_at.as_deref().and_then(rfc3339_to_unix);
        report.merchant_order_id = wire.reference;
        report.payment_method_type = Some(
            request
                .payment_method_type
                .as_ref()
                .map_or(DEFAULT_PAYMENT_METHOD, |m| m.as_str())
                .to_owned(),
        );
        let amount = match (wire.amount, wire.currency) {
            (Some(minor_amount), Some(currency)) => Some(Money {
                minor_amount,
                currency,
            }),
            _ => None,
        };
        report.captured_amount = match cm_status {
            CmStatus::Success => amount.as_ref().map(|m| m.minor_amount),
            _ => None,
        };
        report.amount = amount;
        report.redirection_data = redirect_url.map(|uri| RedirectForm::Uri { uri });
        if let Some(refunds) = wire.refunds {
            report.refunded_amount = refunds.refunded_amount;
            report.refund_pending_amount = refunds.refunded_pending_amount;
        }
        if cm_status == CmStatus::Failure {
            report.error = Some(ErrorInfo {
                unified_details: None,
                issuer_details: None,
                connector_details: Some(ConnectorErrorDetails {
                    code: Some("FAILURE".into()),
                    message: Some("Transaction has not succeeded; unknown reason".into()),
                    reason: None,
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
        // The error shape is undocumented; these are the shapes seen in practice.
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return ErrorBody::default();
        };
        let message = v
            .get("message")
            .and_then(|m| m.as_str())
            .or_else(|| v.pointer("/messages/0/message").and_then(|m| m.as_str()))
            .or_else(|| v.get("error").and_then(|m| m.as_str()))
            .map(str::to_owned);
        ErrorBody {
            code: None,
            message,
            reason: None,
        }
    }

    fn is_final(&self, status: PaymentStatus) -> bool {
        // SUCCESS, CANCELLED, EXPIRED, FAILURE (SOURCES.md §3).
        matches!(
            status,
            PaymentStatus::CHARGED
                | PaymentStatus::VOIDED
                | PaymentStatus::EXPIRED
                | PaymentStatus::FAILURE
        )
    }

    /// CM.com's webhook: JSON `{"createdAt", "event", "transaction", "reference",
    /// "payment"}`, `transaction` being the id to check. It carries no signature
    /// (CM.com documents none) and no payment method, which its Get Transaction
    /// path needs: the URL the merchant gives CM.com names it
    /// (`?method=<UCS PaymentMethodType>`), and a webhook without it is refused.
    fn read_webhook(&self, webhook: &Webhook<'_>) -> Result<WebhookCheck, WebhookError> {
        #[derive(Deserialize)]
        struct Wire {
            transaction: Option<serde_json::Value>,
        }
        let wire: Wire = webhook::json_body(webhook.body, "CM.com's webhook JSON")?;
        let id = match wire.transaction {
            Some(serde_json::Value::String(id)) => id,
            Some(_) => {
                return Err(WebhookError::Malformed(
                    "`transaction` is not a string".into(),
                ))
            }
            None => return Err(WebhookError::Malformed("no `transaction`".into())),
        };
        let method = webhook.query("method").ok_or_else(|| {
            WebhookError::Malformed(
                "CM.com webhooks need the payment method in the URL: ?method=<UCS PaymentMethodType>, e.g. ?method=IDEAL".into(),
            )
        })?;
        let method = PaymentMethodType::parse(method)
            .filter(|m| method_segment(m.as_str()).is_some())
            .ok_or_else(|| {
                WebhookError::Malformed(format!(
                    "`method` is not a payment method CM.com has a Get Transaction endpoint for (one of {})",
                    PAYMENT_METHODS.iter().map(|(m, _)| *m).collect::<Vec<_>>().join(", ")
                ))
            })?;
        Ok(WebhookCheck::Check {
            transaction_id: webhook::transaction_id(&id)?,
            method: Some(method),
            event_id: None,
            connected_account: None,
        })
    }
}

#[cfg(test)]
mod tests {
    //! CM.com specifics. The fixture tables every connector passes live in
    //! `tests/it/connectors.rs` (fixtures in `tests/fixtures/cm/`).
    use super::*;
    use crate::domain::{PaymentMethodType, TransactionId};

    fn req(id: &str, method: Option<&str>) -> StatusCheckRequest {
        let mut r =
            StatusCheckRequest::new(TransactionId::parse(id).unwrap(), "cm", "default", "r");
        r.payment_method_type = method.map(|m| PaymentMethodType::parse(m).unwrap());
        r
    }

    fn credentials(id: &str, secret: &str) -> ClientCredentials {
        ClientCredentials {
            client_id: id.into(),
            client_secret: SecretString::from(secret.to_owned()),
        }
    }

    #[test]
    fn status_table() {
        use PaymentStatus::*;
        let cases: &[(&str, bool, PaymentStatus)] = &[
            ("OPEN", true, AUTHENTICATION_PENDING),
            ("OPEN", false, STARTED),
            ("AUTHORIZED", false, AUTHORIZED),
            ("AUTHORIZED", true, AUTHORIZED),
            ("SUCCESS", false, CHARGED),
            ("CANCELLED", false, VOIDED),
            ("EXPIRED", false, EXPIRED),
            ("FAILURE", false, FAILURE),
            ("FAILURE", true, FAILURE),
            ("PENDING_REVIEW", false, UNRESOLVED),
            ("open", false, UNRESOLVED),
            ("SUCCESS\n", false, UNRESOLVED),
            ("", false, UNRESOLVED),
        ];
        for (raw, redirect, want) in cases {
            assert_eq!(
                map_status(CmStatus::parse(raw), *redirect),
                *want,
                "{raw} redirect={redirect}"
            );
        }
        for status in PaymentStatus::ALL {
            let expected = matches!(status, CHARGED | VOIDED | EXPIRED | FAILURE);
            assert_eq!(CmConnector.is_final(*status), expected, "{status}");
        }
    }

    #[test]
    fn method_segments_and_the_default_method() {
        let base = Url::parse("https://api.pay.cm.com").unwrap();
        for (method, segment) in PAYMENT_METHODS {
            let r = CmConnector
                .status_request(&base, &req("tx-1", Some(method)))
                .unwrap();
            assert_eq!(
                r.url.as_str(),
                format!(
                    "https://api.pay.cm.com/api/v1/paymentmethods/{segment}/v1/transactions/tx-1"
                )
            );
            assert_eq!(r.method, Method::Get);
        }
        let r = CmConnector
            .status_request(&base, &req("tx-1", None))
            .unwrap();
        assert!(r.url.path().contains("/google-pay/"), "{}", r.url);
        let err = CmConnector
            .status_request(&base, &req("tx-1", Some("PAYPAL")))
            .unwrap_err();
        assert_eq!(err.code, RejectCode::UnsupportedPaymentMethod);
    }

    #[test]
    fn base_url_with_a_path_prefix() {
        let base = Url::parse("http://127.0.0.1:8080/cm/").unwrap();
        let r = CmConnector
            .status_request(&base, &req("a.b_c-1", Some("GOOGLE_PAY")))
            .unwrap();
        assert_eq!(
            r.url.path(),
            "/cm/api/v1/paymentmethods/google-pay/v1/transactions/a.b_c-1"
        );
        let t = CmToken.token_request(&base, &credentials("id", "sec"));
        assert_eq!(t.url.path(), "/cm/api/v1/authorization/oauth2/token");
    }

    #[test]
    fn token_request_is_form_encoded_and_never_printed() {
        let base = Url::parse("https://api.pay.cm.com").unwrap();
        let t = CmToken.token_request(&base, &credentials("shop id", "p@ss&word"));
        assert_eq!(t.method, Method::Post);
        let body = t.body.as_ref().unwrap();
        assert_eq!(body.content_type, "application/x-www-form-urlencoded");
        use secrecy::ExposeSecret;
        assert_eq!(
            body.body.expose_secret(),
            "client_id=shop+id&client_secret=p%40ss%26word&grant_type=client_credentials"
        );
        assert!(!format!("{t:?}").contains("p@ss"));
        let ok = |body: &[u8]| HttpResponse {
            status: 200,
            headers: vec![],
            body: body.to_vec(),
        };
        let token = CmToken
            .parse_token(&ok(include_bytes!("../../tests/fixtures/cm/token.json")))
            .unwrap();
        assert_eq!(token.expires_in, Duration::from_secs(3600));
        assert!(!format!("{token:?}").contains("eyJ"));
        assert_eq!(token.token.expose_secret(), "eyJ-test-token");
        let bad = CmToken
            .parse_token(&ok(
                b"{\"error\":\"invalid_client\",\"client_secret\":\"echo\"}",
            ))
            .unwrap_err();
        assert_eq!(bad.code, FailureCode::AuthenticationFailed);
        assert!(!bad.message.contains("echo"));
    }

    #[test]
    fn webhooks_name_the_transaction_and_the_url_names_the_method() {
        let c = CmConnector;
        let body = br#"{"createdAt":"2026-11-30T10:00:00Z","event":"payment.updated","transaction":"9f3c2a1e-7b","reference":"order-1","payment":"p-1"}"#;
        let q = |m: &str| vec![("method".to_owned(), m.to_owned())];
        let w = |body: &'static [u8], query: &'static [(String, String)]| Webhook {
            body,
            headers: &[],
            query,
            secret: None,
            now: std::time::SystemTime::now(),
            tolerance: None,
            mode: None,
        };
        let ideal: &'static [(String, String)] = Box::leak(q("IDEAL").into_boxed_slice());
        match c.read_webhook(&w(body, ideal)).unwrap() {
            WebhookCheck::Check {
                transaction_id,
                method,
                event_id,
                connected_account,
            } => {
                assert_eq!(connected_account, None);
                assert_eq!(transaction_id.as_str(), "9f3c2a1e-7b");
                assert_eq!(method.unwrap().as_str(), "IDEAL");
                assert_eq!(event_id, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.read_webhook(&w(body, &[])).unwrap_err().status(),
            400,
            "no method"
        );
        let paypal: &'static [(String, String)] = Box::leak(q("PAYPAL").into_boxed_slice());
        assert_eq!(c.read_webhook(&w(body, paypal)).unwrap_err().status(), 400);
        for bad in [
            &b"not json"[..],
            br#"{"event":"x"}"#,
            br#"{"transaction":7}"#,
            br#"{"transaction":"../etc"}"#,
        ] {
            assert_eq!(
                c.read_webhook(&w(bad, ideal)).unwrap_err().status(),
                400,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
