//! [`ConnectorClient`]: one connector with its configuration, credentials, token
//! cache and HTTP executor. [`ConnectorClient::call_once`] makes one status check
//! (token, GET, one refresh-and-retry on 401) and returns a classified outcome;
//! the retry policy in `retry.rs` decides what happens next.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::http::{HttpExecutor, TransportError};
use super::token::{Clock, TokenCache};
use super::{classify_error_status, AccessToken, CallError, Connector, HttpRequest, RetryReason};
use crate::codec::{RejectCode, Rejection};
use crate::config::{ConnectorSettings, RateLimit};
use crate::domain::event::{CheckFailure, FailureCode};
use crate::domain::{PaymentStatus, RedirectForm, StatusCheckRequest, StatusReport};
use crate::telemetry::Metrics;

/// The result of one `call_once`: the outcome and how many status calls it took.
#[derive(Debug)]
pub struct CallRecord {
    /// Outcome of the last call.
    pub outcome: Result<StatusReport, CallError>,
    /// Status (Get Transaction) calls made: 1, or 2 after a 401 refresh.
    pub calls: u32,
}

/// A connector ready to call.
pub struct ConnectorClient {
    connector: Arc<dyn Connector>,
    settings: ConnectorSettings,
    http: HttpExecutor,
    tokens: TokenCache,
    metrics: Arc<Metrics>,
    /// Client-side rate limit of the whole connector.
    limiter: Option<DefaultDirectRateLimiter>,
    /// Per-account rate limits.
    account_limiters: HashMap<String, DefaultDirectRateLimiter>,
}

fn token_bucket(rate: RateLimit) -> DefaultDirectRateLimiter {
    let per_second = NonZeroU32::new(rate.requests_per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
    RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
}

impl ConnectorClient {
    /// Builds the client for `connector` with its settings.
    pub fn new(
        connector: Arc<dyn Connector>,
        settings: ConnectorSettings,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Result<Self, String> {
        let http = HttpExecutor::new(
            settings.connect_timeout,
            settings.request_timeout,
            settings.max_response_bytes,
        )?;
        let tokens = TokenCache::new(
            settings.accounts.keys(),
            settings.token_refresh_margin,
            clock,
        );
        metrics.register_connector(connector.name());
        let limiter = settings.rate_limit.map(token_bucket);
        let account_limiters = settings
            .accounts
            .iter()
            .filter_map(|(name, a)| {
                a.requests_per_second.map(|rps| {
                    (
                        name.clone(),
                        token_bucket(RateLimit {
                            requests_per_second: rps,
                            burst: rps,
                        }),
                    )
                })
            })
            .collect();
        Ok(ConnectorClient {
            connector,
            settings,
            http,
            tokens,
            metrics,
            limiter,
            account_limiters,
        })
    }

    /// The connector's name.
    pub fn name(&self) -> &'static str {
        self.connector.name()
    }

    /// The connector's settings.
    pub fn settings(&self) -> &ConnectorSettings {
        &self.settings
    }

    /// Checks that this client can serve `request` (account known, method
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

    async fn fetch_token(&self, merchant_id: &str) -> Result<AccessToken, CallError> {
        let Some(account) = self.settings.accounts.get(merchant_id) else {
            return Err(CallError::Permanent(CheckFailure::new(
                FailureCode::AuthenticationFailed,
                "no credentials for this merchant account",
            )));
        };
        let request = self
            .connector
            .token_request(&self.settings.base_url, account);
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
            200..=299 => self
                .connector
                .parse_token(&response)
                .map_err(CallError::Permanent),
            status @ (408 | 429 | 500..=599) => {
                // The token endpoint is down or busy: retry like the API, never a status.
                match classify_error_status(&response, None, SystemTime::now()) {
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
                }))
            }
        }
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

    /// One status check for a prepared request: obtains a token, calls, and on a
    /// 401 refreshes the token once and calls once more.
    pub async fn call_once(
        &self,
        request: &StatusCheckRequest,
        http_request: &HttpRequest,
    ) -> CallRecord {
        let mut calls = 0;
        let mut refreshed = false;
        loop {
            let lease = match self
                .tokens
                .get(&request.merchant_id, || {
                    self.fetch_token(&request.merchant_id)
                })
                .await
            {
                Ok(lease) => lease,
                Err(e) => {
                    return CallRecord {
                        outcome: Err(e),
                        calls,
                    }
                }
            };
            self.wait_for_permit(&request.merchant_id).await;
            calls += 1;
            let started = Instant::now();
            let response = self.http.send(http_request, Some(&lease.token)).await;
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
                let mut outcome = self
                    .connector
                    .parse_status(request, &response)
                    .map_err(CallError::Permanent);
                if let Ok(report) = &mut outcome {
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
                    if report.status == PaymentStatus::UNRESOLVED {
                        self.metrics.unknown_status(self.name());
                        tracing::warn!(
                            connector = self.name(),
                            connector_status = report.connector_status.as_deref().unwrap_or(""),
                            "undocumented connector status; published as UNRESOLVED"
                        );
                    }
                }
                return CallRecord { outcome, calls };
            }
            let message = self.connector.error_message(&response.body);
            match classify_error_status(&response, message, SystemTime::now()) {
                CallError::Unauthorized(failure) => {
                    if refreshed {
                        return CallRecord {
                            outcome: Err(CallError::Permanent(failure)),
                            calls,
                        };
                    }
                    refreshed = true;
                    self.tokens
                        .invalidate(&request.merchant_id, lease.generation)
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
