//! Connectors: translators between a [`StatusCheckRequest`] and one payment
//! processor's API, and the one gateway that does their I/O.
//!
//! A connector ([`Connector`]) is pure: it names its auth scheme ([`AuthScheme`];
//! the scheme reads what an account configures), its default base
//! URL and payment method, builds the status request (and the token request when
//! its scheme has one), parses answers and error bodies, maps its status enum
//! exhaustively, and says which statuses are final. It never sees credentials
//! beyond what its token request needs, and never performs I/O.
//!
//! The [`gateway::Gateway`] does everything else for every connector: the HTTP
//! executor ([`http`], the only HTTP client code), the token cache ([`token`]:
//! single flight, one refresh on 401) that schemes ([`auth`]) borrow,
//! retries ([`retry`]), the circuit breaker ([`breaker`]), rate limits and
//! adaptive concurrency ([`limit`]). [`webhook`] holds what connectors share to
//! read their webhooks.
//!
//! Adding a connector: one file beside `cm.rs` implementing [`Connector`], and one
//! line in [`registry`].

pub mod auth;
pub mod breaker;
pub mod cm;
pub mod gateway;
pub mod http;
pub mod limit;
pub mod mollie;
pub mod registry;
pub mod retry;
pub mod stripe;
pub mod token;
pub mod webhook;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use url::Url;

use crate::codec::Rejection;
use crate::domain::event::{CheckFailure, FailureCode};
use crate::domain::{PaymentStatus, StatusCheckRequest, StatusReport};

pub use auth::oauth2::OAuth2ClientCredentials;
pub use auth::{AuthScheme, ClientCredentials, TokenEndpoint};

/// HTTP method of a described request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// POST.
    Post,
}

/// A request body that holds credentials: never printed.
#[derive(Clone)]
pub struct SecretBody {
    /// Content type.
    pub content_type: &'static str,
    /// The encoded body.
    pub body: SecretString,
}

impl fmt::Debug for SecretBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBody({}, ********)", self.content_type)
    }
}

/// An HTTP request described by a connector (pure data).
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// Method.
    pub method: Method,
    /// Full URL, built from the configured base URL.
    pub url: Url,
    /// Extra headers (never credentials: the client adds `Authorization`).
    pub headers: Vec<(&'static str, String)>,
    /// Body, if any.
    pub body: Option<SecretBody>,
}

impl HttpRequest {
    /// `METHOD URL`, safe to publish as `raw_connector_request`.
    pub fn describe(&self) -> String {
        let m = match self.method {
            Method::Get => "GET",
            Method::Post => "POST",
        };
        format!("{m} {}", self.url)
    }
}

/// A received HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, lower-case names.
    pub headers: Vec<(String, String)>,
    /// Body (bounded by `max_response_bytes`).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An OAuth2 access token (a secret).
#[derive(Clone)]
pub struct AccessToken {
    /// The bearer token.
    pub token: SecretString,
    /// Lifetime from issue.
    pub expires_in: Duration,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccessToken(********, expires_in={:?})", self.expires_in)
    }
}

/// Why a retryable call failed (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    /// No answer within the timeout.
    Timeout,
    /// Connection refused, reset, DNS, TLS.
    Transport,
    /// 408.
    RequestTimeout,
    /// 429.
    RateLimited,
    /// 5xx.
    ServerError,
}

impl RetryReason {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            RetryReason::Timeout => "timeout",
            RetryReason::Transport => "transport",
            RetryReason::RequestTimeout => "408",
            RetryReason::RateLimited => "429",
            RetryReason::ServerError => "5xx",
        }
    }
}

/// The classified failure of one connector call: what the caller should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Do not retry: report the failure on the event.
    Permanent(CheckFailure),
    /// Retry later (after `retry_after` if the server asked for it).
    Retryable {
        /// The failure to report if retries run out.
        failure: CheckFailure,
        /// Why, for metrics.
        reason: RetryReason,
        /// Delay the server requested (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// 401: refresh the token once and call again.
    Unauthorized(CheckFailure),
}

impl CallError {
    /// The failure to report.
    pub fn failure(&self) -> &CheckFailure {
        match self {
            CallError::Permanent(f)
            | CallError::Unauthorized(f)
            | CallError::Retryable { failure: f, .. } => f,
        }
    }
}

/// What a connector's error body says, when it has a known shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorBody {
    /// The connector's error code or title.
    pub code: Option<String>,
    /// Its message.
    pub message: Option<String>,
    /// Its reason (for example the field it objects to).
    pub reason: Option<String>,
}

/// A payment connector: a pure translator between paysync and one API.
pub trait Connector: Send + Sync + 'static {
    /// The connector's name, as used in requests and configuration.
    fn name(&self) -> &'static str;

    /// The API base URL used when the configuration names none.
    fn default_base_url(&self) -> &'static str;

    /// How requests are authenticated; the scheme reads what an account
    /// configures.
    fn auth(&self) -> &'static dyn AuthScheme;

    /// The UCS `PaymentMethodType` used when a request names none.
    fn default_payment_method(&self) -> &'static str;

    /// The status request for `request`; a rejection when the request cannot be
    /// served by this connector (for example an unsupported payment method). The
    /// gateway adds the credentials.
    fn status_request(
        &self,
        base_url: &Url,
        request: &StatusCheckRequest,
    ) -> Result<HttpRequest, Rejection>;

    /// Parses a 2xx status response into a normalized report.
    fn parse_status(
        &self,
        request: &StatusCheckRequest,
        response: &HttpResponse,
    ) -> Result<StatusReport, CheckFailure>;

    /// What an error body says, if it has a known shape.
    fn parse_error(&self, body: &[u8]) -> ErrorBody;

    /// True when `status` will not change any more for this connector (follow mode
    /// stops there).
    fn is_final(&self, status: PaymentStatus) -> bool;

    /// A header that pins the API version, and its default value (the
    /// configuration's `connectors.<c>.api_version` overrides the value).
    fn api_version(&self) -> Option<(&'static str, &'static str)> {
        None
    }

    /// The largest webhook body this connector's processor sends, when it is
    /// more than the intake's `max_body_bytes` (a processor that retries a
    /// 413 for days must fit).
    fn webhook_max_body_bytes(&self) -> Option<usize> {
        None
    }

    /// True when a 404 with this error body means the payment is unknown
    /// (`TRANSACTION_NOT_FOUND`); otherwise it is an error answer. The
    /// default reads every 404 so.
    fn is_not_found(&self, body: &ErrorBody) -> bool {
        let _ = body;
        true
    }

    /// True when this connector's webhook signatures carry a timestamp (the
    /// `webhook_tolerance` setting applies).
    fn signs_with_timestamp(&self) -> bool {
        false
    }

    /// False when the processor's answer says a retry cannot succeed (Stripe's
    /// `Stripe-Should-Retry: false`): a retryable answer is then final.
    fn may_retry(&self, response: &HttpResponse) -> bool {
        let _ = response;
        true
    }

    /// True when this connector signs its webhooks, so that an account's
    /// `webhook_secret` means something; a secret on a connector that signs
    /// nothing is a configuration error. The default signs nothing.
    fn signs_webhooks(&self) -> bool {
        false
    }

    /// Reads a webhook this connector sends (pure): the payment to check, or why
    /// it is ignored or refused. The default takes none.
    fn read_webhook(
        &self,
        webhook: &webhook::Webhook<'_>,
    ) -> Result<webhook::WebhookCheck, webhook::WebhookError> {
        let _ = webhook;
        Err(webhook::WebhookError::Unsupported)
    }
}

/// A wire field kept when it has the documented type and dropped otherwise
/// (`#[serde(default, deserialize_with = "lenient")]` on optional fields).
pub(crate) fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::Deserialize;
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// A connector's status string as its serde enum, `unknown` when it is not
/// one of the documented values (exact, case included).
pub(crate) fn parse_status_enum<T: serde::de::DeserializeOwned>(s: &str, unknown: T) -> T {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).unwrap_or(unknown)
}

/// `base` with `segments` appended, each percent-encoded as one path segment.
pub fn url_with_segments(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// Unix seconds of an RFC 3339 / ISO 8601 time with offset (how connectors write times).
pub fn rfc3339_to_unix(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// A report's error-free parse failure: a 2xx body that cannot be understood.
pub fn deserialization_failure(status: u16, message: impl Into<String>) -> CheckFailure {
    CheckFailure::new(FailureCode::ResponseDeserializationFailed, message).with_status(status)
}

/// The longest `Retry-After` taken as given: a processor's header is outside
/// input, and a wait of more than a day is a typo or an attack, not advice.
/// (`retry.max_retry_after` caps it further.)
pub const RETRY_AFTER_CEILING: Duration = Duration::from_secs(86_400);

/// Parses `Retry-After` (delay-seconds or HTTP-date) relative to `now`, at
/// most [`RETRY_AFTER_CEILING`]; `None` when it is neither form.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    #[cfg(feature = "mutations")]
    if crate::mutation::on("retry_after_unchecked") {
        if let Ok(secs) = value.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
    }
    let after = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Any number of digits: more than fit in a u64 is "very long", not malformed.
        value
            .parse::<u64>()
            .map_or(RETRY_AFTER_CEILING, Duration::from_secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(after.min(RETRY_AFTER_CEILING))
}

/// [`classify_error_status`] with what `connector` adds: a 404 it does not
/// read as an unknown payment is an error answer, and a retryable answer it
/// says cannot succeed is final.
pub fn classify_for(
    connector: &dyn Connector,
    response: &HttpResponse,
    body: ErrorBody,
    now: SystemTime,
) -> CallError {
    let not_found = response.status != 404 || connector.is_not_found(&body);
    match classify_error_status(response, body, now) {
        CallError::Permanent(mut f) if !not_found => {
            f.code = FailureCode::ConnectorErrorResponse;
            f.message = "connector answered 404 for something other than the payment".into();
            CallError::Permanent(f)
        }
        CallError::Retryable { failure, .. } if !connector.may_retry(response) => {
            CallError::Permanent(failure)
        }
        other => other,
    }
}

/// Classifies a non-2xx answer of the status endpoint. `body` is what the
/// connector's error body says (sanitized by the caller).
pub fn classify_error_status(
    response: &HttpResponse,
    body: ErrorBody,
    now: SystemTime,
) -> CallError {
    let status = response.status;
    let failure = |code: FailureCode, text: String| CheckFailure {
        code,
        message: text,
        status_code: Some(status),
        connector_code: Some(body.code.clone().unwrap_or_else(|| status.to_string())),
        connector_message: body.message.clone(),
        connector_reason: body.reason.clone(),
    };
    let retryable = |reason: RetryReason, text: String| CallError::Retryable {
        failure: failure(FailureCode::ConnectorErrorResponse, text),
        reason,
        retry_after: response
            .header("retry-after")
            .and_then(|v| parse_retry_after(v, now)),
    };
    match status {
        401 => CallError::Unauthorized(failure(
            FailureCode::AuthenticationFailed,
            "connector refused the access token (401)".into(),
        )),
        403 => CallError::Permanent(failure(
            FailureCode::AuthenticationFailed,
            "connector refused access to the transaction (403)".into(),
        )),
        404 => CallError::Permanent(failure(
            FailureCode::TransactionNotFound,
            "connector does not know the transaction (404)".into(),
        )),
        408 => retryable(
            RetryReason::RequestTimeout,
            "connector answered 408 Request Timeout".into(),
        ),
        429 => retryable(
            RetryReason::RateLimited,
            "connector answered 429 Too Many Requests".into(),
        ),
        500..=599 => retryable(
            RetryReason::ServerError,
            format!("connector answered {status}"),
        ),
        _ => CallError::Permanent(failure(
            FailureCode::ConnectorErrorResponse,
            format!("connector answered {status}"),
        )),
    }
}

/// Keeps a connector-supplied text safe to publish: no control characters, at most
/// 200 characters.
pub fn sanitize(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// The most characters of a connector's own status string kept on an event.
pub const CONNECTOR_STATUS_MAX_CHARS: usize = 256;

/// A connector's status string exactly as received (control characters and all),
/// cut to [`CONNECTOR_STATUS_MAX_CHARS`] characters.
pub fn raw_status(text: &str) -> String {
    text.chars().take(CONNECTOR_STATUS_MAX_CHARS).collect()
}

/// True for a redirect URL a customer may safely be sent to: absolute `http` or
/// `https`. Anything else (`javascript:`, `data:`, relative) is never published.
pub fn is_safe_redirect(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
}

/// Response headers published on events: an allow-list of non-sensitive names
/// (`http.rs` keeps only these and `retry-after` from a response).
pub const PUBLISHED_HEADERS: &[&str] = &[
    "content-type",
    "date",
    "x-request-id",
    "x-correlation-id",
    "request-id",
];

/// The allow-listed response headers.
pub fn published_headers(response: &HttpResponse) -> BTreeMap<String, String> {
    response
        .headers
        .iter()
        .filter(|(k, _)| PUBLISHED_HEADERS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), sanitize(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, headers: &[(&str, &str)]) -> HttpResponse {
        HttpResponse {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: vec![],
        }
    }

    #[test]
    fn retry_after_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("", now), None);
        for absurd in [
            "10000000000000000000",
            "99999999999999999999999999",
            "86401",
        ] {
            assert_eq!(
                parse_retry_after(absurd, now),
                Some(RETRY_AFTER_CEILING),
                "{absurd}"
            );
        }
    }

    #[test]
    fn status_classification_table() {
        let now = SystemTime::now();
        let cases: &[(u16, &str)] = &[
            (400, "permanent:CONNECTOR_ERROR_RESPONSE"),
            (401, "unauthorized"),
            (403, "permanent:AUTHENTICATION_FAILED"),
            (404, "permanent:TRANSACTION_NOT_FOUND"),
            (408, "retry:408"),
            (409, "permanent:CONNECTOR_ERROR_RESPONSE"),
            (422, "permanent:CONNECTOR_ERROR_RESPONSE"),
            (429, "retry:429"),
            (500, "retry:5xx"),
            (502, "retry:5xx"),
            (503, "retry:5xx"),
            (599, "retry:5xx"),
        ];
        for (status, want) in cases {
            let got = match classify_error_status(&resp(*status, &[]), ErrorBody::default(), now) {
                CallError::Permanent(f) => format!("permanent:{}", f.code.as_str()),
                CallError::Unauthorized(_) => "unauthorized".into(),
                CallError::Retryable { reason, .. } => format!("retry:{}", reason.label()),
            };
            assert_eq!(&got, want, "status {status}");
        }
        match classify_error_status(
            &resp(429, &[("retry-after", "3")]),
            ErrorBody::default(),
            now,
        ) {
            CallError::Retryable {
                retry_after,
                failure,
                ..
            } => {
                assert_eq!(retry_after, Some(Duration::from_secs(3)));
                assert_eq!(failure.status_code, Some(429));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn redirects_must_be_http_or_https() {
        for ok in ["https://3ds.example/c?x=1", "http://localhost:8080/x"] {
            assert!(is_safe_redirect(ok), "{ok}");
        }
        for bad in [
            "javascript:alert(1)",
            "JAVASCRIPT:alert(1)",
            "data:text/html,<script>",
            "/relative/path",
            "ftp://x.example/",
            "",
        ] {
            assert!(!is_safe_redirect(bad), "{bad}");
        }
    }

    #[test]
    fn raw_status_keeps_the_bytes_and_bounds_the_length() {
        assert_eq!(raw_status("SUCCESS\n"), "SUCCESS\n");
        assert_eq!(raw_status(&"é".repeat(1000)).chars().count(), 256);
    }

    #[test]
    fn only_allow_listed_headers_are_published() {
        let r = resp(
            200,
            &[
                ("content-type", "application/json"),
                ("set-cookie", "s=1"),
                ("authorization", "x"),
            ],
        );
        let h = published_headers(&r);
        assert_eq!(h.len(), 1);
        assert_eq!(h["content-type"], "application/json");
    }
}
