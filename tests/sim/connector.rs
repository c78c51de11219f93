//! The processor behind the gateway's transport: Mollie and CM.com answers in
//! their shapes, a status progression per payment (so that follow chains see
//! changes), and the connector's fault classes: throttling with every form of
//! `Retry-After`, server errors, timeouts, broken connections, bodies near and
//! over the response limit, a body the connector's translation panics on, and
//! payments it does not know.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use paysync::clock::system_now;
use paysync::codec::Rejection;
use paysync::connectors::auth::Authorization;
use paysync::connectors::http::{Transport, TransportError};
use paysync::connectors::{AuthScheme, Connector, ErrorBody, HttpRequest, HttpResponse};
use paysync::domain::event::CheckFailure;
use paysync::domain::{PaymentStatus, StatusCheckRequest, StatusReport};
use url::Url;

use crate::faults::Faults;

/// What a payment does at the processor.
#[derive(Debug, Clone)]
pub struct Payment {
    /// Statuses its successive checks see (the last one stays).
    pub statuses: Vec<&'static str>,
    /// Throttled (429) whatever happens.
    pub forever_429: bool,
    /// Unknown to the processor (404).
    pub not_found: bool,
    /// The connector's translation panics on its body.
    pub panic: bool,
    /// Its body is padded to near the response limit.
    pub big: bool,
}

/// The marker in a body that the panicking translation reacts to.
pub const PANIC_MARKER: &str = "PANIC-IN-TRANSLATION";

pub struct SimConnector {
    faults: Arc<Faults>,
    /// Where calls are traced.
    pub cluster: Mutex<Option<crate::cluster::Cluster>>,
    /// An outage: every call fails until then.
    outage_until: Mutex<Option<paysync::clock::Instant>>,
    payments: Mutex<BTreeMap<String, (Payment, usize)>>,
    request_timeout: Duration,
    max_response_bytes: usize,
}

impl SimConnector {
    pub fn new(faults: Arc<Faults>, request_timeout: Duration, max_response_bytes: usize) -> Self {
        SimConnector {
            faults,
            cluster: Mutex::new(None),
            outage_until: Mutex::new(None),
            payments: Mutex::new(BTreeMap::new()),
            request_timeout,
            max_response_bytes,
        }
    }

    pub fn add(&self, id: &str, payment: Payment) {
        self.payments
            .lock()
            .unwrap()
            .insert(id.to_owned(), (payment, 0));
    }

    fn answer(status: u16, headers: &[(&str, String)], body: Vec<u8>) -> HttpResponse {
        HttpResponse {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            body,
        }
    }

    async fn respond(&self, request: &HttpRequest) -> Result<HttpResponse, TransportError> {
        if let Some(cluster) = self.cluster.lock().unwrap().as_ref() {
            cluster.trace(format!("call {}", request.url.path()));
        }
        tokio::time::sleep(Duration::from_millis(2 + self.faults.range(0..40))).await;
        let path = request.url.path().to_owned();
        if path.ends_with("/oauth2/token") {
            let body = br#"{"access_token":"sim-token","token_type":"Bearer","expires_in":3600}"#;
            return Ok(Self::answer(200, &[], body.to_vec()));
        }
        let id = path.rsplit('/').next().unwrap_or_default().to_owned();
        // An outage: for a few seconds every call fails (the circuit opens,
        // requests wait for it, and its probe may be any of them).
        let now = paysync::clock::Instant::now();
        let down = self.outage_until.lock().unwrap().is_some_and(|u| now < u);
        if down {
            return Ok(Self::answer(503, &[], Vec::new()));
        }
        if self
            .faults
            .draw("connector", 0.02, &[("outage", 1.0)])
            .is_some()
        {
            let lasts = Duration::from_millis(self.faults.range(1_000..8_000));
            *self.outage_until.lock().unwrap() = Some(now + lasts);
            return Ok(Self::answer(503, &[], Vec::new()));
        }
        let fault = self.faults.draw(
            "connector",
            1.0,
            &[
                ("429", 3.0),
                ("429_absurd_retry_after", 1.0),
                ("429_malformed_retry_after", 1.0),
                ("429_http_date", 1.0),
                ("503", 2.0),
                ("500", 2.0),
                ("timeout", 1.0),
                ("transport", 1.0),
                ("body_over_limit", 0.5),
            ],
        );
        let throttled = |retry_after: Option<String>| {
            let headers: Vec<(&str, String)> = retry_after
                .map(|v| ("retry-after", v))
                .into_iter()
                .collect();
            Ok(Self::answer(429, &headers, Vec::new()))
        };
        match fault {
            Some("429") => return throttled(Some("1".into())),
            Some("429_absurd_retry_after") => {
                return throttled(Some("10000000000000000000".into()))
            }
            Some("429_malformed_retry_after") => return throttled(Some("soon-ish".into())),
            Some("429_http_date") => {
                let at = system_now() + Duration::from_secs(2);
                return throttled(Some(httpdate::fmt_http_date(at)));
            }
            Some("503") => {
                return Ok(Self::answer(
                    503,
                    &[("retry-after", "1".into())],
                    Vec::new(),
                ))
            }
            Some("500") => return Ok(Self::answer(500, &[], b"<html>oops</html>".to_vec())),
            Some("timeout") => {
                tokio::time::sleep(self.request_timeout).await;
                return Err(TransportError::Timeout);
            }
            Some("transport") => {
                return Err(TransportError::Connect(
                    "connection reset (injected)".into(),
                ))
            }
            Some(_) => return Err(TransportError::TooLarge(self.max_response_bytes)),
            None => {}
        }
        let payment = {
            let mut payments = self.payments.lock().unwrap();
            match payments.get_mut(&id) {
                Some((p, calls)) => {
                    let status = p.statuses[(*calls).min(p.statuses.len() - 1)];
                    *calls += 1;
                    Some((p.clone(), status))
                }
                None => None,
            }
        };
        let Some((payment, status)) = payment else {
            return Ok(Self::answer(404, &[], b"{}".to_vec()));
        };
        if payment.forever_429 {
            return throttled(Some("1".into()));
        }
        if payment.not_found {
            return Ok(Self::answer(404, &[], b"{}".to_vec()));
        }
        let mut description = "paysync simulation order".to_owned();
        if payment.panic {
            description.push_str(PANIC_MARKER);
        }
        if payment.big {
            // Near the response limit: the event's raw response then exceeds
            // the record limit.
            description.push_str(&"x".repeat(self.max_response_bytes.saturating_sub(900)));
        }
        let body = if path.starts_with("/v2/payments/") {
            serde_json::json!({
                "resource": "payment",
                "id": id,
                "mode": "test",
                "createdAt": "2026-11-21T10:00:00+00:00",
                "amount": {"value": "12.00", "currency": "EUR"},
                "description": description,
                "method": "ideal",
                "status": status,
            })
        } else {
            serde_json::json!({
                "id": id,
                "orderId": id,
                "reference": format!("order-{id}"),
                "amount": 1200,
                "currency": "EUR",
                "description": description,
                "status": status,
                "createdAt": "2026-11-21T10:00:00Z",
            })
        };
        Ok(Self::answer(
            200,
            &[("content-type", "application/json".into())],
            serde_json::to_vec(&body).unwrap(),
        ))
    }
}

impl Transport for SimConnector {
    fn send<'a>(
        &'a self,
        request: &'a HttpRequest,
        _authorization: Option<&'a Authorization>,
    ) -> BoxFuture<'a, Result<HttpResponse, TransportError>> {
        Box::pin(self.respond(request))
    }
}

/// A connector whose translation panics on a marked body (a bug in
/// translation, contained by the processor).
pub struct Panicky(pub Arc<dyn Connector>);

impl Connector for Panicky {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn default_base_url(&self) -> &'static str {
        self.0.default_base_url()
    }
    fn auth(&self) -> &'static dyn AuthScheme {
        self.0.auth()
    }
    fn default_payment_method(&self) -> &'static str {
        self.0.default_payment_method()
    }
    fn status_request(
        &self,
        base_url: &Url,
        request: &StatusCheckRequest,
    ) -> Result<HttpRequest, Rejection> {
        self.0.status_request(base_url, request)
    }
    fn parse_status(
        &self,
        request: &StatusCheckRequest,
        response: &HttpResponse,
    ) -> Result<StatusReport, CheckFailure> {
        if response
            .body
            .windows(PANIC_MARKER.len())
            .any(|w| w == PANIC_MARKER.as_bytes())
        {
            panic!("translation bug (injected)");
        }
        self.0.parse_status(request, response)
    }
    fn parse_error(&self, body: &[u8]) -> ErrorBody {
        self.0.parse_error(body)
    }
    fn is_final(&self, status: PaymentStatus) -> bool {
        self.0.is_final(status)
    }
}
