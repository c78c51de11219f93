//! Webhooks, as a connector reads them (pure): the request a processor sent, what
//! it asks paysync to check, and the helpers the connectors share (the HMAC
//! signature check, form bodies). Each connector's file owns how its own webhook
//! body is read, next to its status mapping; the intake (`crate::webhooks`) does
//! the HTTP, the routing and Kafka. A webhook never carries a status into an
//! event: it only says which payment to check.

use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};

use super::auth::Mode;
use crate::domain::{PaymentMethodType, TransactionId};

/// A webhook as received.
#[derive(Debug, Clone, Copy)]
pub struct Webhook<'a> {
    /// The raw body (signatures are over these bytes).
    pub body: &'a [u8],
    /// Headers, names in lower case, in order (a name may repeat).
    pub headers: &'a [(String, String)],
    /// The URL's query parameters.
    pub query: &'a [(String, String)],
    /// The account's `webhook_secret`, when it has one.
    pub secret: Option<&'a SecretString>,
    /// Now (signatures with a timestamp are checked against it).
    pub now: SystemTime,
    /// How far a signature's timestamp may be from `now`, where the
    /// connector's signatures carry one (`connectors.<c>.webhook_tolerance`).
    pub tolerance: Option<Duration>,
    /// The account's key mode, where its key says one (events for the other
    /// mode are refused).
    pub mode: Option<Mode>,
}

impl Webhook<'_> {
    /// Every value of a header (lower-case name).
    pub fn header_values(&self, name: &str) -> impl Iterator<Item = &str> {
        let name = name.to_owned();
        self.headers
            .iter()
            .filter(move |(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A query parameter.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when the body is JSON by its content type (or, without one, by its
    /// first byte).
    pub fn is_json(&self) -> bool {
        match self.header_values("content-type").next() {
            Some(ct) => ct.to_ascii_lowercase().contains("json"),
            None => self.body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
        }
    }
}

/// Reads a webhook's JSON body as `T`; the error names what was expected and
/// where parsing stopped, never the bytes found (a caller's input is not echoed).
pub fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, WebhookError> {
    serde_json::from_slice(body).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Io | serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "JSON of the wrong shape",
            serde_json::error::Category::Eof => "cut short",
        };
        WebhookError::Malformed(format!(
            "the body is not {what}: {kind} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

/// What a webhook asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookCheck {
    /// Check this payment's status.
    Check {
        /// The transaction to check.
        transaction_id: TransactionId,
        /// The payment method, when the connector's status path needs one.
        method: Option<PaymentMethodType>,
        /// The webhook's own id (an event id), when it has one: it travels
        /// in `x-webhook-event-id`.
        event_id: Option<String>,
        /// A connected account to read the payment through (Stripe Connect).
        connected_account: Option<String>,
    },
    /// Nothing to check (not a payment: an order, a refund, a chargeback...).
    Ignore(&'static str),
}

/// Why a webhook cannot be used (answered with a 4xx, nothing produced).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The body is not this connector's webhook (400).
    #[error("malformed webhook: {0}")]
    Malformed(String),
    /// A signature is required and missing or wrong (401).
    #[error("the webhook signature is missing or does not match")]
    BadSignature,
    /// The account has a `webhook_secret`, and this delivery is of a kind that
    /// carries no signature (401): a signed account takes signed deliveries
    /// only, or the secret would protect nothing.
    #[error("this account takes signed webhooks only")]
    Unsigned,
    /// The connector takes no webhooks (404).
    #[error("this connector takes no webhooks")]
    Unsupported,
    /// The event is for the other mode (live or test) than the account's key
    /// (400).
    #[error("the event's livemode does not match the account's key")]
    WrongMode,
}

impl WebhookError {
    /// The HTTP status to answer.
    pub fn status(&self) -> u16 {
        match self {
            WebhookError::Malformed(_) | WebhookError::WrongMode => 400,
            WebhookError::BadSignature | WebhookError::Unsigned => 401,
            WebhookError::Unsupported => 404,
        }
    }

    /// Bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            WebhookError::Malformed(_) => "malformed",
            WebhookError::BadSignature => "bad_signature",
            WebhookError::Unsigned => "unsigned",
            WebhookError::Unsupported => "unsupported",
            WebhookError::WrongMode => "wrong_mode",
        }
    }
}

/// Signature values looked at, at most: a secret being rotated sends two;
/// more cost nothing (the HMAC is computed once) but are not read.
pub const MAX_SIGNATURES: usize = 4;

/// True when one of `signatures` (each `sha256=<hex>` or bare hex) is the
/// HMAC-SHA256 of `body` under `secret`. The HMAC is computed once, whatever
/// the number of values (the first [`MAX_SIGNATURES`]), and compared in
/// constant time; several values are allowed because a secret being rotated
/// sends the header twice.
pub fn hmac_sha256_matches<'a>(
    secret: &SecretString,
    body: &[u8],
    signatures: impl IntoIterator<Item = &'a str>,
) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.expose_secret().as_bytes());
    let mut expected: Option<ring::hmac::Tag> = None;
    signatures
        .into_iter()
        .take(MAX_SIGNATURES)
        .filter_map(|value| {
            let hex = value.trim();
            decode_hex(hex.strip_prefix("sha256=").unwrap_or(hex))
        })
        .fold(false, |matched, tag| {
            let expected = expected.get_or_insert_with(|| ring::hmac::sign(&key, body));
            let equal =
                tag.len() == expected.as_ref().len() && constant_time_eq(&tag, expected.as_ref());
            matched | equal
        })
}

/// Compares equal-length byte strings without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The HMAC-SHA256 of `body` under `secret`, as `sha256=<hex>` (tests, the demo
/// and the benchmark sign webhooks with it).
pub fn hmac_sha256_header(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Hex to bytes (even length, at most 128 bytes); `None` when it is not hex.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 256 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The fields of an `application/x-www-form-urlencoded` body.
pub fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

/// A transaction id from a webhook, by the input contract's rule (nothing
/// stricter).
pub fn transaction_id(raw: &str) -> Result<TransactionId, WebhookError> {
    TransactionId::parse(raw)
        .map_err(|e| WebhookError::Malformed(format!("the transaction id: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked_in_any_of_the_forms_a_rotation_sends() {
        let secret = SecretString::from("whsec_test".to_owned());
        let body = br#"{"entityId":"tr_1"}"#;
        let good = hmac_sha256_header("whsec_test", body);
        // Python's hmac module computes the same tag (an independent check).
        assert_eq!(
            hmac_sha256_header("key", b"The quick brown fox jumps over the lazy dog"),
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        assert!(hmac_sha256_matches(&secret, body, [good.as_str()]));
        assert!(hmac_sha256_matches(
            &secret,
            body,
            [&good["sha256=".len()..]]
        ));
        let other = hmac_sha256_header("old_secret", body);
        assert!(
            hmac_sha256_matches(&secret, body, [other.as_str(), good.as_str()]),
            "either of two"
        );
        assert!(!hmac_sha256_matches(&secret, body, [other.as_str()]));
        assert!(!hmac_sha256_matches(&secret, b"tampered", [good.as_str()]));
        assert!(!hmac_sha256_matches(
            &secret,
            body,
            ["sha256=zz", "", "sha256="]
        ));
        assert!(!hmac_sha256_matches(&secret, body, std::iter::empty()));
        // Many values: only the first MAX_SIGNATURES are read (the HMAC is
        // computed once whatever their number).
        let mut many = vec!["sha256=00"; MAX_SIGNATURES - 1];
        many.push(good.as_str());
        assert!(hmac_sha256_matches(&secret, body, many.clone()));
        many.insert(0, "00");
        assert!(!hmac_sha256_matches(&secret, body, many));
    }
}
