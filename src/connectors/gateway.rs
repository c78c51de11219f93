//! The [`Gateway`]: one per configured connector, and the only place that does a
//! connector's I/O. It applies the connector's auth scheme (an OAuth2 token from
//! the cache, fetched by one caller at a time and refreshed once on a 401; or a
//! static key), the client-side rate limits, the HTTP call, the classification of
//! the answer, and the retry policy with its circuit breaker. The connector it
//! wraps only builds requests and parses answers.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Instant;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use url::Url;

use super::auth::{Account, AuthContext, Authorized, TokenParser};
use super::breaker::{BreakerSettings, CircuitBreaker};
use super::http::{Http2, HttpExecutor, Transport, TransportError};
use super::limit::{AccountLimiter, Concurrency, Priority, Signal};
use super::retry::{CheckResult, RetryPolicy, RetrySettings};
use super::token::{Clock, TokenCache};
use super::{
    classify_error_status, sanitize, AccessToken, CallError, Connector, ErrorBody, HttpRequest,
    RetryReason,
};
use crate::codec::{RejectCode, Rejection};
use crate::domain::event::{CheckFailure, FailureCode};
use crate::domain::{PaymentStatus, RedirectForm, StatusCheckRequest, StatusReport};
use crate::telemetry::Metrics;
use futures::future::BoxFuture;

/// A token-bucket rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    /// Sustained calls per second.
    pub requests_per_second: u32,
    /// Calls allowed at once after a quiet period.
    pub burst: u32,
}

/// Everything the gateway needs for one connector (`[connectors.<name>]`).
#[derive(Debug, Clone, Serialize)]
pub struct GatewaySettings {
    /// API base URL (from configuration only, never from a message).
    pub base_url: Url,
    /// TCP/TLS connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Whole-request timeout (one call).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// OAuth2 tokens are refreshed this long before they expire.
    #[serde(with = "humantime_serde")]
    pub token_refresh_margin: Duration,
    /// Response bodies larger than this are refused.
    pub max_response_bytes: usize,
    /// When to speak HTTP/2 to the connector.
    pub http2: Http2,
    /// Retry policy.
    pub retry: RetrySettings,
    /// Circuit breaker.
    pub circuit: BreakerSettings,
    /// Client-side rate limit for the whole connector.
    pub rate_limit: Option<RateLimit>,
    /// Calls each account may have in flight: learned (AIMD) or fixed.
    pub concurrency: Concurrency,
    /// The ceiling of a learned limit (`processing.max_in_flight`).
    pub concurrency_ceiling: usize,
    /// Re-checks' share of an account's window while fresh requests wait
    /// (`follow.share`).
    pub recheck_share: f64,
    /// Merchant accounts by `merchant_id`.
    pub accounts: BTreeMap<String, Account>,
    /// The API version sent in the connector's version header (where it
    /// pins one: [`super::Connector::api_version`]).
    pub api_version: Option<String>,
}

/// Why a gateway cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The HTTP client could not be built (TLS backend).
    #[error("cannot build the HTTP client: {0}")]
    Http(#[source] super::http::ClientBuildError),
}

/// The result of one `call_once`: the outcome and how many status calls it took.
#[derive(Debug)]
pub struct CallRecord {
    /// Outcome of the last call.
    pub outcome: Result<StatusReport, CallError>,
    /// Status calls made: 1, or 2 after a 401 refresh.
    pub calls: u32,
}

/// A connector ready to call.
pub struct Gateway {
    connector: Arc<dyn Connector>,
    settings: GatewaySettings,
    http: Arc<dyn Transport>,
    /// The OAuth2 token cache (`None` for static-key schemes).
    tokens: TokenCache,
    metrics: Arc<Metrics>,
    limiter: Option<DefaultDirectRateLimiter>,
    /// By merchant; accounts that share a key share one.
    account_limiters: HashMap<String, Arc<DefaultDirectRateLimiter>>,
    /// Calls in flight per account (adaptive or fixed).
    concurrency: HashMap<String, Arc<AccountLimiter>>,
    policy: RetryPolicy,
}

fn token_bucket(rate: RateLimit) -> DefaultDirectRateLimiter {
    let per_second = NonZeroU32::new(rate.requests_per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
    RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
}

impl Gateway {
    /// Builds the gateway of `connector` with its settings, calling over HTTP.
    pub fn new(
        connector: Arc<dyn Connector>,
        settings: GatewaySettings,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Result<Self, GatewayError> {
        let http = HttpExecutor::new(
            settings.connect_timeout,
            settings.request_timeout,
            settings.max_response_bytes,
            settings.http2,
        )
        .map_err(GatewayError::Http)?;
        Self::with_transport(connector, settings, metrics, clock, Arc::new(http))
    }

    /// Builds the gateway of `connector`, calling through `http` (the
    /// deterministic simulation's in-memory processor, for one).
    pub fn with_transport(
        connector: Arc<dyn Connector>,
        settings: GatewaySettings,
        metrics: Arc<Metrics>,
        clock: Clock,
        http: Arc<dyn Transport>,
    ) -> Result<Self, GatewayError> {
        let tokens = TokenCache::new(
            settings.accounts.keys(),
            settings.token_refresh_margin,
            clock,
        );
        metrics.register_connector(connector.name());
        let limiter = settings.rate_limit.map(token_bucket);
        // Accounts that share a key share the processor's limits (Stripe's
        // are per key): one bucket at the lowest rate any of them sets, and
        // one concurrency window, labelled with the first account's name.
        let mut by_key: BTreeMap<String, Vec<&String>> = BTreeMap::new();
        for (name, a) in &settings.accounts {
            by_key
                .entry(a.credential.limit_key())
                .or_default()
                .push(name);
        }
        let mut account_limiters = HashMap::new();
        let mut concurrency = HashMap::new();
        for names in by_key.values() {
            let rps = names
                .iter()
                .filter_map(|n| settings.accounts[*n].requests_per_second)
                .min();
            if let Some(rps) = rps {
                let bucket = Arc::new(token_bucket(RateLimit {
                    requests_per_second: rps,
                    burst: rps,
                }));
                for n in names {
                    account_limiters.insert((*n).clone(), bucket.clone());
                }
            }
            let (m, name) = (metrics.clone(), connector.name());
            let labels: Vec<String> = names.iter().map(|n| (*n).clone()).collect();
            let window = Arc::new(AccountLimiter::new(
                settings.concurrency,
                settings.concurrency_ceiling,
                settings.recheck_share,
                Box::new(move |limit| {
                    for label in &labels {
                        m.set_concurrency_limit(name, label, limit);
                    }
                }),
            ));
            for n in names {
                concurrency.insert((*n).clone(), window.clone());
            }
        }
        let policy = RetryPolicy::new(connector.name(), settings.retry.clone(), settings.circuit);
        Ok(Gateway {
            concurrency,
            connector,
            settings,
            http,
            tokens,
            metrics,
            limiter,
            account_limiters,
            policy,
        })
    }

    /// The connector's name.
    pub fn name(&self) -> &'static str {
        self.connector.name()
    }

    /// The connector this gateway calls.
    pub fn connector(&self) -> &dyn Connector {
        self.connector.as_ref()
    }

    /// The settings.
    pub fn settings(&self) -> &GatewaySettings {
        &self.settings
    }

    /// The metrics this gateway reports to.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The connector's circuit breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        self.policy.breaker()
    }

    /// Checks that this gateway can serve `request` (account known, method
    /// supported) and returns the status request to send.
    pub fn prepare(&self, request: &StatusCheckRequest) -> Result<HttpRequest, Rejection> {
        if !self.settings.accounts.contains_key(&request.merchant_id) {
            return Err(Rejection::new(
                RejectCode::UnknownMerchant,
                format!(
                    "merchant account `{}` is not configured for connector `{}`",
                    request.merchant_id,
                    self.name()
                ),
            ));
        }
        self.connector
            .status_request(&self.settings.base_url, request)
    }

    /// A status check with retries, the circuit breaker and rate limits: the
    /// connector's report, or the failure to publish.
    pub async fn check(&self, request: &StatusCheckRequest, http: &HttpRequest) -> CheckResult {
        self.check_with(request, http, Priority::Fresh, None).await
    }

    /// [`Gateway::check`] as `priority` (a follow-mode re-check yields to fresh
    /// requests in its account's window), ending by `deadline` when given.
    pub async fn check_with(
        &self,
        request: &StatusCheckRequest,
        http: &HttpRequest,
        priority: Priority,
        deadline: Option<tokio::time::Instant>,
    ) -> CheckResult {
        self.policy
            .run(self, request, http, priority, deadline)
            .await
    }

    /// Places taken in the accounts' windows (calls in flight, waiting for
    /// their pacing, or held after a refusal): zero once every call is over
    /// and every hold has run out.
    pub fn places_taken(&self) -> usize {
        // A window shared by accounts with one key counts once.
        let mut seen = std::collections::HashSet::new();
        self.concurrency
            .values()
            .filter(|l| seen.insert(Arc::as_ptr(l)))
            .map(|l| l.taken())
            .sum()
    }

    /// The learned (or fixed) concurrency limit of an account.
    pub fn concurrency_limit(&self, account: &str) -> Option<f64> {
        self.concurrency.get(account).map(|l| l.limit())
    }

    /// [`Gateway::check`] that ends by `deadline` whatever happens (an open
    /// circuit included): `paysync check` always finishes.
    pub async fn check_until(
        &self,
        request: &StatusCheckRequest,
        http: &HttpRequest,
        deadline: tokio::time::Instant,
    ) -> CheckResult {
        self.check_with(request, http, Priority::Fresh, Some(deadline))
            .await
    }

    /// Sends a token request and parses its 2xx answer with `parse`; a busy
    /// token endpoint is retried like the API, a refusal is counted.
    async fn fetch_token(
        &self,
        merchant_id: &str,
        request: HttpRequest,
        parse: TokenParser,
    ) -> Result<AccessToken, CallError> {
        self.metrics.token_refresh(self.name());
        let started = Instant::now();
        let response = self.http.send(&request, None).await;
        let code = response
            .as_ref()
            .map_or_else(|e| e.label().to_owned(), |r| r.status.to_string());
        self.metrics
            .connector_call(self.name(), &code, started.elapsed());
        let response = response.map_err(|e| transport_failure(&e, "token request"))?;
        match response.status {
            200..=299 => parse(&response).map_err(CallError::Permanent),
            status @ (408 | 429 | 500..=599) => {
                // The token endpoint is down or busy: retry like the API, never a status.
                match self.capped(classify_error_status(
                    &response,
                    ErrorBody::default(),
                    crate::clock::system_now(),
                )) {
                    CallError::Retryable {
                        reason,
                        retry_after,
                        ..
                    } => Err(CallError::Retryable {
                        failure: CheckFailure {
                            code: FailureCode::ConnectorErrorResponse,
                            message: format!("token endpoint answered {status}"),
                            status_code: Some(status),
                            connector_code: Some(status.to_string()),
                            connector_message: None,
                            connector_reason: None,
                        },
                        reason,
                        retry_after,
                    }),
                    other => Err(other),
                }
            }
            status => {
                self.metrics.token_refused(self.name(), merchant_id);
                tracing::warn!(
                    connector = self.name(),
                    account = merchant_id,
                    status,
                    "token endpoint refused the credentials; asking again after a backoff"
                );
                Err(CallError::Permanent(CheckFailure {
                    code: FailureCode::AuthenticationFailed,
                    message: format!("token endpoint refused the credentials ({status})"),
                    status_code: Some(status),
                    connector_code: Some(status.to_string()),
                    connector_message: None,
                    connector_reason: None,
                }))
            }
        }
    }

    /// The account's authorization for one call (its credential decides how).
    async fn authorization(&self, merchant_id: &str) -> Result<(Authorized, bool), CallError> {
        let account = self.settings.accounts.get(merchant_id).ok_or_else(|| {
            CallError::Permanent(CheckFailure::new(
                FailureCode::AuthenticationFailed,
                "no credentials for this merchant account",
            ))
        })?;
        let fetch = |request: HttpRequest, parse: TokenParser| {
            let f: BoxFuture<'_, Result<AccessToken, CallError>> =
                Box::pin(self.fetch_token(merchant_id, request, parse));
            f
        };
        let cx = AuthContext {
            merchant_id,
            base_url: &self.settings.base_url,
            tokens: &self.tokens,
            fetch_token: &fetch,
        };
        let authorized = account.credential.authorize(&cx).await?;
        Ok((authorized, account.credential.refreshes()))
    }

    /// Waits for the connector's and the account's rate-limit permits. Waiting is
    /// not an error; it is measured in `paysync_rate_limit_wait_seconds`.
    async fn wait_for_permit(&self, merchant_id: &str) {
        if self.limiter.is_none() && self.account_limiters.is_empty() {
            return;
        }
        let started = Instant::now();
        if let Some(l) = &self.limiter {
            l.until_ready().await;
        }
        if let Some(l) = self.account_limiters.get(merchant_id) {
            l.until_ready().await;
        }
        self.metrics
            .rate_limit_waited(self.name(), started.elapsed());
    }

    /// One status check for a prepared request: authenticates, calls, and for an
    /// OAuth2 scheme refreshes the token once after a 401 and calls once more.
    pub async fn call_once(
        &self,
        request: &StatusCheckRequest,
        http_request: &HttpRequest,
        priority: Priority,
    ) -> CallRecord {
        let mut calls = 0;
        let mut refreshed = false;
        loop {
            let (mut authorized, refreshes) = match self.authorization(&request.merchant_id).await {
                Ok(a) => a,
                Err(e) => {
                    return CallRecord {
                        outcome: Err(e),
                        calls,
                    }
                }
            };
            self.wait_for_permit(&request.merchant_id).await;
            // A place in the account's window (token requests do not count).
            let window = match self.concurrency.get(&request.merchant_id) {
                Some(l) => Some(l.acquire(priority).await),
                None => None,
            };
            calls += 1;
            let started = Instant::now();
            let mut extra = std::mem::take(&mut authorized.headers);
            if let (Some((name, _)), Some(version)) =
                (self.connector.api_version(), &self.settings.api_version)
            {
                extra.push((name, version.clone()));
            }
            let response = if extra.is_empty() {
                self.http
                    .send(http_request, Some(&authorized.authorization))
                    .await
            } else {
                // The scheme's headers and the pinned version, where the
                // request has none of that name (a request's own
                // Stripe-Account wins, say).
                let mut with = http_request.clone();
                for (name, value) in &extra {
                    if !with
                        .headers
                        .iter()
                        .any(|(n, _)| n.eq_ignore_ascii_case(name))
                    {
                        with.headers.push((name, value.clone()));
                    }
                }
                self.http.send(&with, Some(&authorized.authorization)).await
            };
            let signal = match &response {
                Ok(r) if r.status == 429 => {
                    self.metrics.throttled(self.name(), &request.merchant_id);
                    Signal::Throttled(
                        r.header("retry-after")
                            .and_then(|v| super::parse_retry_after(v, crate::clock::system_now()))
                            .map(|after| self.cap(after)),
                    )
                }
                Ok(r) if r.status == 503 => Signal::Overloaded,
                Ok(_) => Signal::Answered,
                Err(TransportError::Timeout) => Signal::Overloaded,
                Err(_) => Signal::Unknown,
            };
            if let Some(w) = window {
                w.finish(signal);
            }
            let code = response
                .as_ref()
                .map_or_else(|e| e.label().to_owned(), |r| r.status.to_string());
            self.metrics
                .connector_call(self.name(), &code, started.elapsed());
            let response = match response {
                Ok(r) => r,
                Err(e) => {
                    return CallRecord {
                        outcome: Err(transport_failure(&e, "status request")),
                        calls,
                    }
                }
            };
            if (200..300).contains(&response.status) {
                let outcome = self
                    .connector
                    .parse_status(request, &response)
                    .map(|report| self.vet(report))
                    .map_err(CallError::Permanent);
                return CallRecord { outcome, calls };
            }
            let body = self.connector.parse_error(&response.body);
            let body = ErrorBody {
                code: body.code.map(|c| sanitize(&c)),
                message: body.message.map(|m| sanitize(&m)),
                reason: body.reason.map(|r| sanitize(&r)),
            };
            let classified = super::classify_for(
                self.connector.as_ref(),
                &response,
                body,
                crate::clock::system_now(),
            );
            match self.capped(classified) {
                CallError::Unauthorized(failure) => {
                    if !refreshes || refreshed {
                        // A static key gets no second chance, nor does a fresh token.
                        return CallRecord {
                            outcome: Err(CallError::Permanent(failure)),
                            calls,
                        };
                    }
                    refreshed = true;
                    self.tokens
                        .invalidate(&request.merchant_id, authorized.generation)
                        .await;
                }
                other => {
                    return CallRecord {
                        outcome: Err(other),
                        calls,
                    }
                }
            }
        }
    }

    /// A wait a processor asked for, capped by `retry.max_retry_after`.
    fn cap(&self, after: Duration) -> Duration {
        #[cfg(feature = "mutations")]
        if crate::mutation::on("retry_after_unchecked") {
            return after;
        }
        after.min(self.settings.retry.max_retry_after)
    }

    /// A processor's `Retry-After`, capped by `retry.max_retry_after`.
    fn capped(&self, error: CallError) -> CallError {
        match error {
            CallError::Retryable {
                failure,
                reason,
                retry_after,
            } => CallError::Retryable {
                failure,
                reason,
                retry_after: retry_after.map(|a| self.cap(a)),
            },
            other => other,
        }
    }

    /// What every connector's report goes through: undocumented statuses are
    /// counted and logged, redirect URLs that are not http(s) are dropped.
    fn vet(&self, mut report: StatusReport) -> StatusReport {
        if report.status == PaymentStatus::UNRESOLVED {
            self.metrics.unknown_status(self.name());
            tracing::warn!(
                connector = self.name(),
                connector_status = report.connector_status.as_deref().unwrap_or(""),
                "undocumented connector status; published as UNRESOLVED"
            );
        }
        if let Some(RedirectForm::Uri { uri }) = &report.redirection_data {
            if !super::is_safe_redirect(uri) {
                self.metrics.redirect_dropped(self.name());
                tracing::warn!(
                    connector = self.name(),
                    "redirect URL is not http(s); not published"
                );
                report.redirection_data = None;
            }
        }
        report
    }
}

fn transport_failure(e: &TransportError, what: &str) -> CallError {
    match e {
        TransportError::Timeout => CallError::Retryable {
            failure: CheckFailure::new(FailureCode::ConnectorTimeout, format!("{what} timed out")),
            reason: RetryReason::Timeout,
            retry_after: None,
        },
        TransportError::Connect(text) => CallError::Retryable {
            failure: CheckFailure::new(
                FailureCode::ConnectorUnreachable,
                format!("{what} failed: {text}"),
            ),
            reason: RetryReason::Transport,
            retry_after: None,
        },
        TransportError::TooLarge(limit) => CallError::Permanent(CheckFailure::new(
            FailureCode::ResponseDeserializationFailed,
            format!("{what}: response body larger than {limit} bytes"),
        )),
    }
}
