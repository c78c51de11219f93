//! CM.com (api.pay.cm.com): OAuth2 client-credentials token, "Get Transaction" for
//! every payment method that shares its shape, and the status table of
//! PRODUCT.md §4. Pure translation; the HTTP calls happen in `http.rs`.

use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};
use url::Url;

use super::{sanitize, AccessToken, Connector, HttpRequest, HttpResponse, Method, SecretBody};
use crate::codec::{RejectCode, Rejection};
use crate::config::Account;
use crate::domain::event::{CheckFailure, ConnectorErrorDetails, ErrorInfo, FailureCode};
use crate::domain::{Money, PaymentStatus, RedirectForm, StatusCheckRequest, StatusReport};

/// The CM.com connector.
#[derive(Debug, Clone, Copy, Default)]
pub struct CmConnector;

/// CM.com's transaction status, as documented; anything else is kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmStatus {
    /// Created; the initial status.
    Open,
    /// Authorized.
    Authorized,
    /// Paid.
    Success,
    /// Cancelled by the customer.
    Cancelled,
    /// Expired without success.
    Expired,
    /// Failed, reason unknown.
    Failure,
    /// Not a documented status: never guessed.
    Unknown(String),
}

impl CmStatus {
    /// Parses CM.com's status string (exact, upper case as documented).
    pub fn parse(s: &str) -> CmStatus {
        match s {
            "OPEN" => CmStatus::Open,
            "AUTHORIZED" => CmStatus::Authorized,
            "SUCCESS" => CmStatus::Success,
            "CANCELLED" => CmStatus::Cancelled,
            "EXPIRED" => CmStatus::Expired,
            "FAILURE" => CmStatus::Failure,
            other => CmStatus::Unknown(other.to_owned()),
        }
    }
}

/// PRODUCT.md §4: the normalized status. Exhaustive: a new CM.com status is a
/// compile error here, not a silent guess.
pub fn map_status(status: &CmStatus, has_redirect: bool) -> PaymentStatus {
    match status {
        CmStatus::Open if has_redirect => PaymentStatus::AUTHENTICATION_PENDING,
        CmStatus::Open => PaymentStatus::STARTED,
        CmStatus::Authorized => PaymentStatus::AUTHORIZED,
        CmStatus::Success => PaymentStatus::CHARGED,
        CmStatus::Cancelled => PaymentStatus::VOIDED,
        CmStatus::Expired => PaymentStatus::EXPIRED,
        CmStatus::Failure => PaymentStatus::FAILURE,
        CmStatus::Unknown(_) => PaymentStatus::UNRESOLVED,
    }
}

/// The path segment of a UCS payment method, or `None` when CM.com has no such
/// Get Transaction endpoint.
pub fn method_segment(payment_method_type: &str) -> Option<&'static str> {
    Some(match payment_method_type {
        "GOOGLE_PAY" => "google-pay",
        "APPLE_PAY" => "apple-pay",
        "CREDIT" | "CARD" => "creditcard",
        "IDEAL" => "ideal",
        "BANCONTACT_CARD" => "bancontact",
        "CHECKOUT" => "checkout",
        _ => return None,
    })
}

/// A field that is kept when it has the documented type and dropped otherwise:
/// bodies differ by payment method and may change, and an odd optional field must
/// not cost us the status.
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireTransaction {
    #[serde(default, deserialize_with = "lenient")]
    status: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    reference: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    amount: Option<i64>,
    #[serde(default, deserialize_with = "lenient")]
    currency: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    created_at: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    action: Option<WireAction>,
    #[serde(default, deserialize_with = "lenient")]
    refunds: Option<WireRefunds>,
}

#[derive(Debug, Deserialize)]
struct WireAction {
    #[serde(default, deserialize_with = "lenient")]
    redirect: Option<WireRedirect>,
}

#[derive(Debug, Deserialize)]
struct WireRedirect {
    #[serde(default, deserialize_with = "lenient")]
    url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireRefunds {
    #[serde(default, deserialize_with = "lenient")]
    refunded_amount: Option<i64>,
    #[serde(default, deserialize_with = "lenient")]
    refunded_pending_amount: Option<i64>,
}

#[derive(Deserialize)]
struct WireToken {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

fn rfc3339_to_unix(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

fn deserialization_failure(status: u16, message: &str) -> CheckFailure {
    CheckFailure {
        code: FailureCode::ResponseDeserializationFailed,
        message: message.to_owned(),
        status_code: Some(status),
        connector_code: None,
        connector_message: None,
    }
}

impl Connector for CmConnector {
    fn name(&self) -> &'static str {
        "cm"
    }

    fn token_request(&self, base_url: &Url, account: &Account) -> HttpRequest {
        let mut url = base_url.clone();
        extend_path(&mut url, &["api", "v1", "authorization", "oauth2", "token"]);
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", &account.client_id)
            .append_pair("client_secret", account.secret())
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
        let wire: WireToken = serde_json::from_slice(&response.body).map_err(|_| CheckFailure {
            code: FailureCode::AuthenticationFailed,
            message: "token endpoint answered with a body that is not a token".into(),
            status_code: Some(response.status),
            connector_code: None,
            connector_message: None,
        })?;
        if wire.access_token.is_empty() {
            return Err(CheckFailure::new(
                FailureCode::AuthenticationFailed,
                "token endpoint returned an empty token",
            ));
        }
        Ok(AccessToken {
            token: SecretString::from(wire.access_token),
            // No expiry given: assume a short life and refresh early rather than late.
            expires_in: Duration::from_secs(wire.expires_in.unwrap_or(300)),
        })
    }

    fn status_request(
        &self,
        base_url: &Url,
        request: &StatusCheckRequest,
    ) -> Result<HttpRequest, Rejection> {
        let method = method_segment(request.payment_method_type.as_str()).ok_or_else(|| {
            Rejection::new(
                RejectCode::UnsupportedPaymentMethod,
                format!(
                    "payment_method_type `{}` is not supported by cm (GOOGLE_PAY, APPLE_PAY, CREDIT, CARD, IDEAL, BANCONTACT_CARD, CHECKOUT)",
                    request.payment_method_type.as_str()
                ),
            )
        })?;
        let mut url = base_url.clone();
        extend_path(
            &mut url,
            &[
                "api",
                "v1",
                "paymentmethods",
                method,
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
                &format!("transaction body is not valid JSON: {e}"),
            )
        })?;
        let raw_status = wire.status.ok_or_else(|| {
            deserialization_failure(response.status, "transaction body has no `status` string")
        })?;
        let redirect_url = wire
            .action
            .and_then(|a| a.redirect)
            .and_then(|r| r.url)
            .filter(|u| !u.is_empty());
        let cm_status = CmStatus::parse(&raw_status);
        let status = map_status(&cm_status, redirect_url.is_some());

        let amount = match (wire.amount, wire.currency) {
            (Some(minor_amount), Some(currency)) => Some(Money {
                minor_amount,
                currency,
            }),
            _ => None,
        };
        if let Some(expected) = &request.amount {
            let matches = amount.as_ref() == Some(expected);
            if !matches {
                let got = amount.as_ref().map_or_else(
                    || "no amount".to_owned(),
                    |m| format!("{} {}", m.minor_amount, m.currency),
                );
                return Err(CheckFailure {
                    code: FailureCode::IntegrityCheckFailed,
                    message: format!(
                        "connector reports {got}, request expected {} {}",
                        expected.minor_amount, expected.currency
                    ),
                    status_code: Some(response.status),
                    connector_code: None,
                    connector_message: None,
                });
            }
        }

        let mut report = StatusReport::new(status, response.status);
        report.connector_status = Some(super::raw_status(&raw_status));
        report.response_headers = super::published_headers(response);
        report.created_at = wire.created_at.as_deref().and_then(rfc3339_to_unix);
        report.merchant_order_id = wire.reference;
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

    fn error_message(&self, body: &[u8]) -> Option<String> {
        // The error shape is undocumented; these are the shapes seen in practice.
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let text = v
            .get("message")
            .and_then(|m| m.as_str())
            .or_else(|| v.pointer("/messages/0/message").and_then(|m| m.as_str()))
            .or_else(|| v.get("error").and_then(|m| m.as_str()))?;
        Some(sanitize(text))
    }
}

/// Appends path segments, percent-encoding each one as a segment.
fn extend_path(url: &mut Url, segments: &[&str]) {
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{PaymentMethodType, TransactionId};

    fn req(id: &str, method: &str) -> StatusCheckRequest {
        let mut r =
            StatusCheckRequest::new(TransactionId::parse(id).unwrap(), "cm", "default", "r");
        r.payment_method_type = PaymentMethodType::parse(method).unwrap();
        r
    }

    fn ok(body: &[u8]) -> HttpResponse {
        HttpResponse {
            status: 200,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("set-cookie".into(), "x".into()),
            ],
            body: body.to_vec(),
        }
    }

    macro_rules! fixture {
        ($name:literal) => {
            include_bytes!(concat!("../../tests/fixtures/cm/", $name))
        };
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
            ("", false, UNRESOLVED),
        ];
        for (raw, redirect, want) in cases {
            assert_eq!(
                map_status(&CmStatus::parse(raw), *redirect),
                *want,
                "{raw} redirect={redirect}"
            );
        }
    }

    #[test]
    fn method_segments() {
        let base = Url::parse("https://api.pay.cm.com").unwrap();
        for (method, segment) in [
            ("GOOGLE_PAY", "google-pay"),
            ("APPLE_PAY", "apple-pay"),
            ("CREDIT", "creditcard"),
            ("CARD", "creditcard"),
            ("IDEAL", "ideal"),
            ("BANCONTACT_CARD", "bancontact"),
            ("CHECKOUT", "checkout"),
        ] {
            let r = CmConnector
                .status_request(&base, &req("tx-1", method))
                .unwrap();
            assert_eq!(
                r.url.as_str(),
                format!(
                    "https://api.pay.cm.com/api/v1/paymentmethods/{segment}/v1/transactions/tx-1"
                )
            );
            assert_eq!(r.method, Method::Get);
        }
        let err = CmConnector
            .status_request(&base, &req("tx-1", "PAYPAL"))
            .unwrap_err();
        assert_eq!(err.code, RejectCode::UnsupportedPaymentMethod);
    }

    #[test]
    fn base_url_with_a_path_prefix() {
        let base = Url::parse("http://127.0.0.1:8080/cm/").unwrap();
        let r = CmConnector
            .status_request(&base, &req("a.b_c-1", "GOOGLE_PAY"))
            .unwrap();
        assert_eq!(
            r.url.path(),
            "/cm/api/v1/paymentmethods/google-pay/v1/transactions/a.b_c-1"
        );
        let t = CmConnector.token_request(&base, &Account::new("id", "sec"));
        assert_eq!(t.url.path(), "/cm/api/v1/authorization/oauth2/token");
    }

    #[test]
    fn token_request_is_form_encoded_and_never_printed() {
        let base = Url::parse("https://api.pay.cm.com").unwrap();
        let t = CmConnector.token_request(&base, &Account::new("shop id", "p@ss&word"));
        assert_eq!(t.method, Method::Post);
        let body = t.body.as_ref().unwrap();
        assert_eq!(body.content_type, "application/x-www-form-urlencoded");
        use secrecy::ExposeSecret;
        assert_eq!(
            body.body.expose_secret(),
            "client_id=shop+id&client_secret=p%40ss%26word&grant_type=client_credentials"
        );
        assert!(!format!("{t:?}").contains("p@ss"));
        let token = CmConnector
            .parse_token(&ok(fixture!("token.json")))
            .unwrap();
        assert_eq!(token.expires_in, Duration::from_secs(3600));
        assert!(!format!("{token:?}").contains("eyJ"));
        assert_eq!(token.bearer(), "Bearer eyJ-test-token");
        let bad = CmConnector
            .parse_token(&ok(
                b"{\"error\":\"invalid_client\",\"client_secret\":\"echo\"}",
            ))
            .unwrap_err();
        assert_eq!(bad.code, FailureCode::AuthenticationFailed);
        assert!(!bad.message.contains("echo"));
    }

    #[test]
    fn seed_example_open_with_redirect() {
        let r = CmConnector
            .parse_status(
                &req("8db1e7fa-ba8a-4189-92fd-67a20217443d", "GOOGLE_PAY"),
                &ok(fixture!("google_pay_open_redirect.json")),
            )
            .unwrap();
        assert_eq!(r.status, PaymentStatus::AUTHENTICATION_PENDING);
        assert_eq!(
            r.redirection_data,
            Some(RedirectForm::Uri {
                uri: "https://checkout.tld/3ds/v2/creditcard/123".into()
            })
        );
        assert_eq!(
            r.amount,
            Some(Money {
                minor_amount: 1200,
                currency: "EUR".into()
            })
        );
        assert_eq!(r.created_at, Some(1_136_214_245));
        assert_eq!(r.merchant_order_id.as_deref(), Some("20210623130413"));
        assert_eq!(r.refunded_amount, Some(300));
        assert_eq!(r.refund_pending_amount, Some(100));
        assert_eq!(r.captured_amount, None);
        assert_eq!(r.status_code, 200);
        assert_eq!(r.connector_status.as_deref(), Some("OPEN"));
        assert_eq!(
            r.response_headers.keys().collect::<Vec<_>>(),
            vec!["content-type"]
        );
    }

    #[test]
    fn fixtures_for_every_status_and_method_shape() {
        let cases: &[(&[u8], &str, PaymentStatus)] = &[
            (
                fixture!("google_pay_success.json"),
                "GOOGLE_PAY",
                PaymentStatus::CHARGED,
            ),
            (
                fixture!("apple_pay_authorized.json"),
                "APPLE_PAY",
                PaymentStatus::AUTHORIZED,
            ),
            (
                fixture!("creditcard_cancelled.json"),
                "CREDIT",
                PaymentStatus::VOIDED,
            ),
            (
                fixture!("ideal_expired.json"),
                "IDEAL",
                PaymentStatus::EXPIRED,
            ),
            (
                fixture!("bancontact_failure.json"),
                "BANCONTACT_CARD",
                PaymentStatus::FAILURE,
            ),
            (
                fixture!("checkout_open_no_action.json"),
                "CHECKOUT",
                PaymentStatus::STARTED,
            ),
            (
                fixture!("unknown_status.json"),
                "GOOGLE_PAY",
                PaymentStatus::UNRESOLVED,
            ),
        ];
        for (body, method, want) in cases {
            let r = CmConnector
                .parse_status(&req("tx", method), &ok(body))
                .unwrap();
            assert_eq!(r.status, *want, "{method}");
        }
    }

    #[test]
    fn charged_sets_captured_amount_and_failure_sets_connector_code() {
        let r = CmConnector
            .parse_status(
                &req("tx", "GOOGLE_PAY"),
                &ok(fixture!("google_pay_success.json")),
            )
            .unwrap();
        assert_eq!(r.captured_amount, Some(2599));
        assert_eq!(r.redirection_data, None);
        let r = CmConnector
            .parse_status(
                &req("tx", "BANCONTACT_CARD"),
                &ok(fixture!("bancontact_failure.json")),
            )
            .unwrap();
        let details = r.error.unwrap().connector_details.unwrap();
        assert_eq!(details.code.as_deref(), Some("FAILURE"));
        let r = CmConnector
            .parse_status(
                &req("tx", "APPLE_PAY"),
                &ok(fixture!("apple_pay_authorized.json")),
            )
            .unwrap();
        assert_eq!(r.created_at, Some(1_714_550_400), "offset +02:00 honoured");
    }

    #[test]
    fn missing_optional_fields_and_unknown_extra_fields_are_tolerated() {
        let r = CmConnector
            .parse_status(&req("tx", "IDEAL"), &ok(fixture!("ideal_expired.json")))
            .unwrap();
        assert_eq!(
            (r.created_at, r.merchant_order_id.clone(), r.refunded_amount),
            (None, None, None)
        );
        let r = CmConnector
            .parse_status(
                &req("tx", "GOOGLE_PAY"),
                &ok(fixture!("extra_and_odd_fields.json")),
            )
            .unwrap();
        assert_eq!(r.status, PaymentStatus::CHARGED);
        assert_eq!(r.created_at, None);
        assert_eq!(r.merchant_order_id, None);
        assert_eq!(r.refunded_amount, None);
        assert_eq!(r.redirection_data, None);
    }

    #[test]
    fn malformed_or_statusless_bodies_fail_the_check_not_the_payment() {
        for body in [
            &fixture!("malformed.json")[..],
            fixture!("missing_status.json"),
            b"",
            b"[]",
            b"<html>oops</html>",
        ] {
            let err = CmConnector
                .parse_status(&req("tx", "GOOGLE_PAY"), &ok(body))
                .unwrap_err();
            assert_eq!(
                err.code,
                FailureCode::ResponseDeserializationFailed,
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(err.status_code, Some(200));
        }
    }

    #[test]
    fn amount_and_currency_integrity() {
        let mut r = req("tx", "GOOGLE_PAY");
        r.amount = Some(Money {
            minor_amount: 2599,
            currency: "EUR".into(),
        });
        assert!(CmConnector
            .parse_status(&r, &ok(fixture!("google_pay_success.json")))
            .is_ok());
        for (amount, currency) in [(2598, "EUR"), (2599, "USD")] {
            r.amount = Some(Money {
                minor_amount: amount,
                currency: currency.into(),
            });
            let err = CmConnector
                .parse_status(&r, &ok(fixture!("google_pay_success.json")))
                .unwrap_err();
            assert_eq!(err.code, FailureCode::IntegrityCheckFailed);
        }
        r.amount = Some(Money {
            minor_amount: 1,
            currency: "EUR".into(),
        });
        let no_amount = br#"{"status":"SUCCESS"}"#;
        assert_eq!(
            CmConnector
                .parse_status(&r, &ok(no_amount))
                .unwrap_err()
                .code,
            FailureCode::IntegrityCheckFailed
        );
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            CmConnector
                .error_message(fixture!("error_400.json"))
                .as_deref(),
            Some("transactionId has an invalid format")
        );
        assert_eq!(
            CmConnector
                .error_message(fixture!("error_404.json"))
                .as_deref(),
            Some("Transaction not found")
        );
        assert_eq!(CmConnector.error_message(b"<html>502</html>"), None);
    }
}
