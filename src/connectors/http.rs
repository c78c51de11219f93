//! The one place that performs HTTP for connectors: a pooled `reqwest` client
//! (rustls, connection reuse, connect and whole-request timeouts) that executes the
//! [`HttpRequest`]s connectors describe, with a bounded response body.

use std::time::Duration;

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
    /// The body exceeded the configured maximum.
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
];

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

/// Executes described requests.
#[derive(Debug, Clone)]
pub struct HttpExecutor {
    client: reqwest::Client,
    max_response_bytes: usize,
}

impl HttpExecutor {
    /// A pooled client with these timeouts.
    pub fn new(
        connect_timeout: Duration,
        request_timeout: Duration,
        max_response_bytes: usize,
        http2: Http2,
    ) -> Result<Self, reqwest::Error> {
        let builder = reqwest::Client::builder();
        let builder = match http2 {
            Http2::Auto => builder,
            Http2::Never => builder.http1_only(),
            Http2::PriorKnowledge => builder.http2_prior_knowledge(),
        };
        let client = builder
            .use_rustls_tls()
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("paysync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpExecutor {
            client,
            max_response_bytes,
        })
    }

    /// Sends `request`, with the `Authorization` header when one is given.
    pub async fn send(
        &self,
        request: &HttpRequest,
        authorization: Option<&Authorization>,
    ) -> Result<HttpResponse, TransportError> {
        let method = match request.method {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
        };
        let mut builder = self.client.request(method, request.url.clone());
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        if let Some(authorization) = authorization {
            let mut value =
                reqwest::header::HeaderValue::from_str(authorization.value()).map_err(|_| {
                    TransportError::Connect("credentials are not a valid header value".into())
                })?;
            value.set_sensitive(true);
            builder = builder.header(reqwest::header::AUTHORIZATION, value);
        }
        if let Some(body) = &request.body {
            builder = builder
                .header(reqwest::header::CONTENT_TYPE, body.content_type)
                .body(body.body.expose_secret().to_owned());
        }
        let mut response = builder.send().await.map_err(classify)?;
        let status = response.status().as_u16();
        // Only the headers anything reads (the published allow-list and
        // Retry-After): copying every header cost two allocations each.
        let headers = response
            .headers()
            .iter()
            .filter(|(k, _)| KEPT_HEADERS.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        if response
            .content_length()
            .is_some_and(|l| l > self.max_response_bytes as u64)
        {
            return Err(TransportError::TooLarge(self.max_response_bytes));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(TransportError::TooLarge(self.max_response_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}

fn classify(e: reqwest::Error) -> TransportError {
    if e.is_timeout() {
        return TransportError::Timeout;
    }
    // reqwest's text names the URL (ids only, no credentials) and the cause.
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
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
