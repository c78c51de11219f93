//! The one place that performs HTTP for connectors: a pooled hyper client
//! (rustls with Mozilla's roots, connection reuse, HTTP/2 by ALPN or prior
//! knowledge, connect and whole-request timeouts) that executes the
//! [`HttpRequest`]s connectors describe, with a bounded response body.
//!
//! It is hyper's own pooled client with nothing between it and the connector: no
//! redirect, proxy or cookie layers, and the request built once from the URL the
//! connector made (one parse). Measured against `reqwest` in the benchmark: see
//! the README's "CPU per request" section.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, USER_AGENT};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use secrecy::ExposeSecret;

use super::auth::Authorization;
use super::{HttpRequest, HttpResponse, Method};

/// A call that produced no HTTP response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No complete answer within the request timeout.
    #[error("timed out")]
    Timeout,
    /// Connection could not be made or broke (DNS, refused, reset, TLS).
    #[error("transport error: {0}")]
    Connect(String),
    /// A success's body exceeded the configured maximum (an error answer's body
    /// that does is dropped; its status code still counts).
    #[error("response body larger than {0} bytes")]
    TooLarge(usize),
}

impl TransportError {
    /// Metric label for `paysync_connector_requests_total{code}`.
    pub fn label(&self) -> &'static str {
        match self {
            TransportError::Timeout => "timeout",
            TransportError::Connect(_) | TransportError::TooLarge(_) => "transport",
        }
    }
}

/// Response headers kept (lower case): those published on events, and `retry-after`.
const KEPT_HEADERS: &[&str] = &[
    "content-type",
    "date",
    "x-request-id",
    "x-correlation-id",
    "request-id",
    "retry-after",
    // Stripe: whether a retry can succeed.
    "stripe-should-retry",
];

/// What performs a connector's HTTP calls: the pooled client ([`HttpExecutor`])
/// in paysync, an in-memory processor in the deterministic simulation.
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` (with `authorization`, when given) and returns the answer.
    fn send<'a>(
        &'a self,
        request: &'a HttpRequest,
        authorization: Option<&'a Authorization>,
    ) -> futures::future::BoxFuture<'a, Result<HttpResponse, TransportError>>;
}

impl Transport for HttpExecutor {
    fn send<'a>(
        &'a self,
        request: &'a HttpRequest,
        authorization: Option<&'a Authorization>,
    ) -> futures::future::BoxFuture<'a, Result<HttpResponse, TransportError>> {
        Box::pin(HttpExecutor::send(self, request, authorization))
    }
}

/// When to speak HTTP/2 (`connectors.<name>.http2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Http2 {
    /// When the server offers it in the TLS handshake (ALPN); HTTP/1.1 otherwise
    /// and over plain HTTP.
    Auto,
    /// HTTP/1.1 only.
    Never,
    /// HTTP/2 without negotiation, also over plain HTTP (h2c): for a server known
    /// to speak it.
    PriorKnowledge,
}

type Pool = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientBuildError(String);

/// Executes described requests.
#[derive(Debug, Clone)]
pub struct HttpExecutor {
    client: Pool,
    request_timeout: Duration,
    max_response_bytes: usize,
}

impl HttpExecutor {
    /// A pooled client with these timeouts.
    pub fn new(
        connect_timeout: Duration,
        request_timeout: Duration,
        max_response_bytes: usize,
        http2: Http2,
    ) -> Result<Self, ClientBuildError> {
        let mut tcp = HttpConnector::new();
        // The TLS layer above takes https: URLs; plain http stays allowed (for a
        // local simulator or a sidecar).
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        // rustls with the ring provider, safe default protocol versions and
        // Mozilla's root certificates (the trust reqwest's `rustls-tls` had).
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| ClientBuildError(e.to_string()))?
            .https_or_http();
        // ALPN offers exactly what the mode allows.
        let connector = match http2 {
            Http2::Auto => tls.enable_all_versions().wrap_connector(tcp),
            Http2::Never => tls.enable_http1().wrap_connector(tcp),
            Http2::PriorKnowledge => tls.enable_http2().wrap_connector(tcp),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(http2 == Http2::PriorKnowledge)
            .build(connector);
        Ok(HttpExecutor {
            client,
            request_timeout,
            max_response_bytes,
        })
    }

    /// Sends `request`, with the `Authorization` header when one is given.
    pub async fn send(
        &self,
        request: &HttpRequest,
        authorization: Option<&Authorization>,
    ) -> Result<HttpResponse, TransportError> {
        let request = self.build(request, authorization)?;
        match tokio::time::timeout(self.request_timeout, self.exchange(request)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout),
        }
    }

    fn build(
        &self,
        request: &HttpRequest,
        authorization: Option<&Authorization>,
    ) -> Result<http::Request<Full<Bytes>>, TransportError> {
        let method = match request.method {
            Method::Get => http::Method::GET,
            Method::Post => http::Method::POST,
        };
        let uri: http::Uri =
            request.url.as_str().parse().map_err(|_| {
                TransportError::Connect("the URL is not a valid request URI".into())
            })?;
        let invalid = |what: &str| TransportError::Connect(format!("invalid request: {what}"));
        let mut headers = http::HeaderMap::with_capacity(request.headers.len() + 3);
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        for (name, value) in &request.headers {
            // A header a connector built wrongly: no request is sent.
            let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid(name))?;
            let value = HeaderValue::from_str(value).map_err(|_| invalid(name.as_str()))?;
            headers.append(name, value);
        }
        if let Some(authorization) = authorization {
            let mut value = HeaderValue::from_str(authorization.value()).map_err(|_| {
                TransportError::Connect("credentials are not a valid header value".into())
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let body = match &request.body {
            Some(body) => {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(body.content_type));
                Full::new(Bytes::from(body.body.expose_secret().as_bytes().to_vec()))
            }
            None => Full::new(Bytes::new()),
        };
        // Assembled in place: the builder moves its parts on every call.
        let mut built = http::Request::new(body);
        *built.method_mut() = method;
        *built.uri_mut() = uri;
        *built.headers_mut() = headers;
        Ok(built)
    }

    async fn exchange(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<HttpResponse, TransportError> {
        let response = self.client.request(request).await.map_err(classify)?;
        let status = response.status().as_u16();
        // Only the headers anything reads (the published allow-list and
        // Retry-After).
        let headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .filter(|(k, _)| KEPT_HEADERS.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let declared = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        // An answer that is not a success is classified by its status code; its
        // body only adds details. One too large to read is dropped rather than
        // turned into a transport error: a proxy's 502 page of any size is still a
        // failing connector (retried, counted by the circuit breaker), never an
        // unparseable success.
        let too_large = |body: Vec<u8>| {
            if (200..300).contains(&status) {
                Err(TransportError::TooLarge(self.max_response_bytes))
            } else {
                drop(body);
                Ok(HttpResponse {
                    status,
                    headers: headers.clone(),
                    body: Vec::new(),
                })
            }
        };
        if declared.is_some_and(|l| l > self.max_response_bytes as u64) {
            return too_large(Vec::new());
        }
        let mut incoming = response.into_body();
        let mut body = Vec::with_capacity(declared.map_or(0, |l| l as usize));
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| classify_source(&e))?;
            if let Some(chunk) = frame.data_ref() {
                if body.len() + chunk.len() > self.max_response_bytes {
                    return too_large(body);
                }
                body.extend_from_slice(chunk);
            }
        }
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}

const USER_AGENT_VALUE: &str = concat!("paysync/", env!("CARGO_PKG_VERSION"));

fn classify(e: hyper_util::client::legacy::Error) -> TransportError {
    classify_source(&e)
}

/// The error's text with its causes (ids only, never credentials: headers are
/// not part of any of them); a connect timeout counts as a timeout.
fn classify_source(e: &(dyn std::error::Error + 'static)) -> TransportError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return TransportError::Timeout;
        }
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    TransportError::Connect(super::sanitize(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_headers_cover_every_header_read() {
        for name in super::super::PUBLISHED_HEADERS
            .iter()
            .chain(&["retry-after"])
        {
            assert!(KEPT_HEADERS.contains(name), "{name} is dropped");
        }
    }
}
