//! The intake's admission step (pure: no sockets, no Kafka, time passed in):
//! what a webhook gets, decided in an order that keeps forged requests from
//! spending a genuine account's budget.
//!
//! 1. the route names a configured connector and account, with the account's
//!    path token when it has one (else 404, nothing read);
//! 2. the declared body fits `max_body_bytes` (else 413, nothing read);
//! 3. the intake can afford to read and verify it: a budget of
//!    `max_verifications_per_second` across the intake (else 503 with
//!    `Retry-After`, nothing read);
//! 4. the connector reads the body: its signature under the account's
//!    `webhook_secret` (401 when it does not verify, or when a signed account
//!    gets an unsigned delivery), then the payment to check (400 when
//!    malformed; 200 and nothing produced when it names no payment);
//! 5. a repeat of a transaction stored within `dedupe_window` is answered 200
//!    and produces nothing (it costs nothing, so it spends no budget);
//! 6. the account's bucket has room (else 503 with `Retry-After`: processors
//!    retry a 503, and a 429 would read as the processor's own fault);
//! 7. the request to write, with an id of its own.
//!
//! Only a request that verified reaches the account's bucket, so forged
//! requests (from any address, the genuine sender's included) never get a
//! genuine one refused; an unsigned route has nothing to verify, and its bucket
//! is open to anyone who knows the route (hence the path token, and a warning
//! at start when an unsigned route has none).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use secrecy::{ExposeSecret, SecretString};

use crate::codec::request::WebhookRequest;
use crate::config::{Settings, WebhookSettings};
use crate::connectors::webhook::{Webhook, WebhookCheck};
use crate::connectors::{registry, Connector};

/// Transactions remembered for deduplication, at most.
const DEDUPE_MAX: usize = 100_000;

/// What became of a webhook (`paysync_webhooks_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Stored in Kafka; 200.
    Accepted,
    /// A repeat within the window; 200, nothing produced.
    Duplicate,
    /// Not a payment; 200, nothing produced.
    Ignored,
    /// The signature did not verify; 401.
    BadSignature,
    /// A signed account got an unsigned delivery; 401.
    Unsigned,
    /// Not this connector's webhook; 400.
    Malformed,
    /// No such route (connector, account or path token); 404.
    NotFound,
    /// The connector takes no webhooks; 404.
    Unsupported,
    /// Over `max_body_bytes`; 413.
    TooLarge,
    /// The body did not arrive within `body_read_timeout`; 408.
    SlowBody,
    /// Over the intake's verification budget; 503.
    Overloaded,
    /// Over the account's bucket; 503.
    Throttled,
    /// The broker could not take the request; 503.
    Unavailable,
    /// The broker did not acknowledge within `ack_timeout`; 503.
    Timeout,
    /// Not a POST; 405.
    MethodNotAllowed,
    /// An event for the other mode (live or test) than the account's key; 400.
    WrongMode,
}

impl Outcome {
    /// Every outcome (metric pre-registration, documentation).
    pub const ALL: &'static [Outcome] = &[
        Outcome::Accepted,
        Outcome::Duplicate,
        Outcome::Ignored,
        Outcome::BadSignature,
        Outcome::Unsigned,
        Outcome::Malformed,
        Outcome::NotFound,
        Outcome::Unsupported,
        Outcome::TooLarge,
        Outcome::SlowBody,
        Outcome::Overloaded,
        Outcome::Throttled,
        Outcome::Unavailable,
        Outcome::Timeout,
        Outcome::MethodNotAllowed,
        Outcome::WrongMode,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored => "ignored",
            Outcome::BadSignature => "bad_signature",
            Outcome::Unsigned => "unsigned",
            Outcome::Malformed => "malformed",
            Outcome::NotFound => "not_found",
            Outcome::Unsupported => "unsupported",
            Outcome::TooLarge => "too_large",
            Outcome::SlowBody => "slow_body",
            Outcome::Overloaded => "overloaded",
            Outcome::Throttled => "throttled",
            Outcome::Unavailable => "unavailable",
            Outcome::Timeout => "timeout",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::WrongMode => "wrong_mode",
        }
    }
}

/// An answer without a request to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// For the metric.
    pub outcome: Outcome,
    /// The HTTP status.
    pub status: u16,
    /// A short body (never an echo of the caller's input or a secret).
    pub message: Cow<'static, str>,
    /// `Retry-After` in seconds, for a 503.
    pub retry_after: Option<u64>,
}

impl Answer {
    fn new(outcome: Outcome, status: u16, message: impl Into<Cow<'static, str>>) -> Self {
        Answer {
            outcome,
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 503 with `Retry-After` (whole seconds, at least 1).
    pub fn unavailable(outcome: Outcome, message: &'static str, retry_after_ms: u64) -> Self {
        Answer {
            retry_after: Some(retry_after_ms.div_ceil(1000).max(1)),
            ..Answer::new(outcome, 503, message)
        }
    }

    fn not_found() -> Self {
        Answer::new(Outcome::NotFound, 404, "no such webhook route")
    }
}

/// A token bucket on a millisecond clock passed in.
#[derive(Debug, Clone)]
pub struct Bucket {
    per_ms: f64,
    burst: f64,
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    /// `per_second` tokens a second, at most `burst` at once; starts full.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Bucket {
            per_ms: f64::from(per_second.max(1)) / 1000.0,
            burst,
            tokens: burst,
            at_ms: 0,
        }
    }

    /// Takes a token at `now_ms`, or says in how many milliseconds one comes.
    pub fn take(&mut self, now_ms: u64) -> Result<(), u64> {
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64;
        self.tokens = (self.tokens + elapsed * self.per_ms).min(self.burst);
        self.at_ms = self.at_ms.max(now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / self.per_ms).ceil().max(1.0) as u64)
        }
    }
}

/// A (connector, merchant, transaction) stored within the window.
type DedupeKey = (&'static str, String, String);

/// Transactions stored lately, oldest first, bounded.
#[derive(Default)]
struct Dedupe {
    seen: HashMap<DedupeKey, u64>,
    order: VecDeque<(DedupeKey, u64)>,
}

impl Dedupe {
    fn seen_within(&mut self, key: &DedupeKey, window_ms: u64, now_ms: u64) -> bool {
        while let Some((k, at)) = self.order.front() {
            if now_ms.saturating_sub(*at) < window_ms && self.order.len() <= DEDUPE_MAX {
                break;
            }
            if self.seen.get(k) == Some(at) {
                self.seen.remove(k);
            }
            self.order.pop_front();
        }
        self.seen
            .get(key)
            .is_some_and(|at| now_ms.saturating_sub(*at) < window_ms)
    }

    fn remember(&mut self, key: DedupeKey, now_ms: u64) {
        self.seen.insert(key.clone(), now_ms);
        self.order.push_back((key, now_ms));
    }
}

/// One account's route.
struct AccountRoute {
    secret: Option<SecretString>,
    mode: Option<crate::connectors::auth::Mode>,
    path_token: Option<SecretString>,
    bucket: Mutex<Bucket>,
}

struct ConnectorRoute {
    connector: Arc<dyn Connector>,
    tolerance: std::time::Duration,
    max_body_bytes: usize,
    accounts: HashMap<String, AccountRoute>,
}

/// A route that names an account: steps 1 and 2 passed.
pub struct Target<'a> {
    connector: &'a ConnectorRoute,
    merchant: &'a str,
    account: &'a AccountRoute,
}

impl Target<'_> {
    /// The connector's name (a bounded label).
    pub fn connector(&self) -> &'static str {
        self.connector.connector.name()
    }

    /// The body limit of this route (its connector's, where it needs more
    /// than `webhooks.max_body_bytes`).
    pub fn max_body_bytes(&self) -> usize {
        self.connector.max_body_bytes
    }
}

/// A webhook to store: the request, and what to remember once it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The request to write.
    pub request: WebhookRequest,
    key: DedupeKey,
}

/// What admission decided once the body was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer this; nothing to store.
    Answer(Answer),
    /// Store this request, then answer 200 (see [`Admission::stored`]).
    Store(Delivery),
}

/// A webhook as the HTTP side hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The raw body.
    pub body: &'a [u8],
    /// Headers, names in lower case.
    pub headers: &'a [(String, String)],
    /// Query parameters.
    pub query: &'a [(String, String)],
}

/// Makes request ids: one per accepted delivery.
pub type IdSource = Box<dyn Fn() -> String + Send + Sync>;

/// The admission step's configuration and state.
pub struct Admission {
    routes: HashMap<String, ConnectorRoute>,
    dedupe_window_ms: u64,
    follow: bool,
    verifications: Mutex<Bucket>,
    dedupe: Mutex<Dedupe>,
    ids: IdSource,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("connectors", &self.routes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// 16 random bytes in hex.
pub fn random_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // The system's generator failing is not worth refusing a webhook for:
        // fall back to a fast one (ids need uniqueness, not secrecy).
        bytes = fastrand::u128(..).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Admission {
    /// The routes of every configured connector that takes webhooks.
    pub fn new(settings: &Settings, webhooks: &WebhookSettings, ids: IdSource) -> Self {
        let mut routes = HashMap::new();
        for (name, c) in &settings.connectors {
            let Some(connector) = registry::get(name) else {
                continue;
            };
            let accounts = c
                .gateway
                .accounts
                .iter()
                .map(|(merchant, a)| {
                    (
                        merchant.clone(),
                        AccountRoute {
                            secret: a.webhook_secret.clone(),
                            mode: a.credential.mode(),
                            path_token: a.webhook_path_token.clone(),
                            bucket: Mutex::new(Bucket::new(
                                webhooks.requests_per_second,
                                webhooks.burst,
                            )),
                        },
                    )
                })
                .collect();
            routes.insert(
                name.clone(),
                ConnectorRoute {
                    connector,
                    tolerance: c.webhook_tolerance,
                    max_body_bytes: c
                        .webhook_max_body_bytes
                        .map_or(webhooks.max_body_bytes, |n| n.max(webhooks.max_body_bytes)),
                    accounts,
                },
            );
        }
        Admission {
            routes,
            dedupe_window_ms: webhooks.dedupe_window.as_millis() as u64,
            follow: webhooks.follow,
            verifications: Mutex::new(Bucket::new(
                webhooks.max_verifications_per_second,
                webhooks.max_verifications_per_second,
            )),
            dedupe: Mutex::new(Dedupe::default()),
            ids,
        }
    }

    /// Routes anyone can spend: accounts with neither a `webhook_secret` nor a
    /// `webhook_path_token`, as `connector/merchant` (warned about at start).
    pub fn open_routes(&self) -> Vec<String> {
        let mut open: Vec<String> = self
            .routes
            .iter()
            .filter(|(_, r)| webhook_capable(&*r.connector))
            .flat_map(|(name, r)| {
                r.accounts
                    .iter()
                    .filter(|(_, a)| a.secret.is_none() && a.path_token.is_none())
                    .map(move |(m, _)| format!("{name}/{m}"))
            })
            .collect();
        open.sort();
        open
    }

    /// Steps 1 and 2: the route (`<connector>/<merchant>[/<token>]`, the part
    /// after `/webhooks/`) and the declared body length.
    pub fn route(&self, path: &str, declared_length: Option<u64>) -> Result<Target<'_>, Answer> {
        let mut parts = path.split('/');
        let (Some(connector), Some(merchant), token, None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Answer::not_found());
        };
        let route = self.routes.get(connector).ok_or_else(Answer::not_found)?;
        let (merchant, account) = route
            .accounts
            .get_key_value(merchant)
            .ok_or_else(Answer::not_found)?;
        // An account with a path token has only the route that carries it.
        let token_ok = match (&account.path_token, token) {
            (None, None) => true,
            (Some(expected), Some(given)) => same_secret(expected.expose_secret(), given),
            _ => false,
        };
        if !token_ok {
            return Err(Answer::not_found());
        }
        if declared_length.is_some_and(|l| l > route.max_body_bytes as u64) {
            return Err(Answer::new(Outcome::TooLarge, 413, "body too large"));
        }
        Ok(Target {
            connector: route,
            merchant,
            account,
        })
    }

    /// Step 3: room to read and verify one more body, at `now_ms`.
    pub fn afford(&self, now_ms: u64) -> Result<(), Answer> {
        lock(&self.verifications).take(now_ms).map_err(|wait_ms| {
            Answer::unavailable(
                Outcome::Overloaded,
                "more webhooks than the intake can verify now: try again",
                wait_ms,
            )
        })
    }

    /// Steps 4 to 7, once the body is read.
    pub fn decide(&self, target: &Target<'_>, received: &Received<'_>, now_ms: u64) -> Decision {
        let webhook = Webhook {
            body: received.body,
            headers: received.headers,
            query: received.query,
            secret: target.account.secret.as_ref(),
            now: crate::clock::system_now(),
            tolerance: Some(target.connector.tolerance),
            mode: target.account.mode,
        };
        let (transaction_id, method, event_id, connected_account) =
            match target.connector.connector.read_webhook(&webhook) {
                Ok(WebhookCheck::Check {
                    transaction_id,
                    method,
                    event_id,
                    connected_account,
                }) => (transaction_id, method, event_id, connected_account),
                Ok(WebhookCheck::Ignore(why)) => {
                    return Decision::Answer(Answer::new(
                        Outcome::Ignored,
                        200,
                        format!("ignored: {why}"),
                    ))
                }
                Err(e) => {
                    use crate::connectors::webhook::WebhookError as E;
                    let outcome = match e {
                        E::Malformed(_) => Outcome::Malformed,
                        E::BadSignature => Outcome::BadSignature,
                        E::Unsigned => Outcome::Unsigned,
                        E::Unsupported => Outcome::Unsupported,
                        E::WrongMode => Outcome::WrongMode,
                    };
                    // The message names fields, never echoes values.
                    return Decision::Answer(Answer::new(outcome, e.status(), e.to_string()));
                }
            };
        let connector = target.connector();
        // A webhook with an event id of its own (Stripe's, Mollie's signed
        // events) is a repeat only of that event: another event for the same
        // payment is a change (3-D Secure done, then a refund). One without
        // (classic and CM.com webhooks) is a repeat of any webhook for the
        // payment within the window.
        let key: DedupeKey = (
            connector,
            target.merchant.to_owned(),
            match &event_id {
                Some(e) => format!("event {e}"),
                None => transaction_id.as_str().to_owned(),
            },
        );
        if self.dedupe_window_ms > 0
            && lock(&self.dedupe).seen_within(&key, self.dedupe_window_ms, now_ms)
        {
            return Decision::Answer(Answer::new(Outcome::Duplicate, 200, "accepted (a repeat)"));
        }
        if let Err(wait_ms) = lock(&target.account.bucket).take(now_ms) {
            return Decision::Answer(Answer::unavailable(
                Outcome::Throttled,
                "more webhooks for this account than it takes now: try again",
                wait_ms,
            ));
        }
        Decision::Store(Delivery {
            request: WebhookRequest {
                transaction_id,
                connector: connector.to_owned(),
                merchant_id: target.merchant.to_owned(),
                request_id: format!("webhook:{connector}:{}", (self.ids)()),
                follow: self.follow,
                payment_method_type: method,
                event_id,
                connected_account,
            },
            key,
        })
    }

    /// The broker acknowledged `delivery`'s request at `now_ms`: repeats
    /// within the window produce nothing more.
    pub fn stored(&self, delivery: Delivery, now_ms: u64) {
        if self.dedupe_window_ms > 0 {
            lock(&self.dedupe).remember(delivery.key, now_ms);
        }
    }

    /// Accounts per connector (for logs).
    pub fn accounts(&self) -> BTreeMap<&str, usize> {
        self.routes
            .iter()
            .map(|(k, r)| (k.as_str(), r.accounts.len()))
            .collect()
    }
}

/// True when the connector reads webhooks at all (its default refuses them).
fn webhook_capable(connector: &dyn Connector) -> bool {
    let probe = Webhook {
        body: b"",
        headers: &[],
        query: &[],
        secret: None,
        now: std::time::SystemTime::UNIX_EPOCH,
        tolerance: None,
        mode: None,
    };
    !matches!(
        connector.read_webhook(&probe),
        Err(crate::connectors::webhook::WebhookError::Unsupported)
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Compares a secret with a given value in time that does not depend on where
/// they differ (both are hashed first, so their lengths do not matter either).
fn same_secret(secret: &str, given: &str) -> bool {
    let a = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let b = ring::digest::digest(&ring::digest::SHA256, given.as_bytes());
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::connectors::webhook::hmac_sha256_header;

    const SECRET: &str = "whsec_genuine";

    fn admission(extra: &str) -> Admission {
        let toml = format!(
            r#"
[processing]
default_connector = "mollie"
[webhooks]
requests_per_second = 1
burst = 2
dedupe_window = "1s"
max_verifications_per_second = 1000
{extra}
[connectors.mollie.accounts.signed]
api_key = "test_abcdefghijklmnopqrstuvwxyz0123"
webhook_secret = "{SECRET}"
[connectors.mollie.accounts.open]
api_key = "test_abcdefghijklmnopqrstuvwxyz0123"
[connectors.mollie.accounts.hidden]
api_key = "test_abcdefghijklmnopqrstuvwxyz0123"
webhook_path_token = "pt_0123456789abcdef"
"#
        );
        let settings = Settings::from_toml(&toml).unwrap();
        let webhooks = settings.webhooks.clone().unwrap();
        let n = AtomicU64::new(0);
        Admission::new(
            &settings,
            &webhooks,
            Box::new(move || n.fetch_add(1, Ordering::Relaxed).to_string()),
        )
    }

    fn json() -> Vec<(String, String)> {
        vec![("content-type".into(), "application/json".into())]
    }

    fn event(payment: &str) -> Vec<u8> {
        format!(r#"{{"id":"event_{payment}","entityId":"{payment}","type":"payment-link.paid"}}"#)
            .into_bytes()
    }

    fn signed(body: &[u8], secret: &str) -> Vec<(String, String)> {
        let mut h = json();
        h.push((
            "x-mollie-signature".into(),
            hmac_sha256_header(secret, body),
        ));
        h
    }

    fn decide(
        a: &Admission,
        route: &str,
        body: &[u8],
        headers: &[(String, String)],
        now: u64,
    ) -> Decision {
        let target = a.route(route, Some(body.len() as u64)).unwrap();
        a.decide(
            &target,
            &Received {
                body,
                headers,
                query: &[],
            },
            now,
        )
    }

    fn outcome(d: &Decision) -> Outcome {
        match d {
            Decision::Answer(a) => a.outcome,
            Decision::Store(_) => Outcome::Accepted,
        }
    }

    #[test]
    fn forged_requests_never_spend_a_genuine_accounts_budget() {
        let a = admission("");
        // A flood of forgeries at one instant: every one refused 401, none
        // charged to the account (its bucket holds 2).
        for i in 0..500 {
            let body = event(&format!("tr_forged{i}"));
            let d = decide(
                &a,
                "mollie/signed",
                &body,
                &signed(&body, "whsec_guess"),
                1_000,
            );
            match d {
                Decision::Answer(ans) => {
                    assert_eq!((ans.outcome, ans.status), (Outcome::BadSignature, 401));
                }
                Decision::Store(_) => panic!("a forgery was accepted"),
            }
        }
        // Unsigned deliveries to the signed account: refused, not charged.
        let d = decide(&a, "mollie/signed", b"id=tr_classic", &[], 1_000);
        assert_eq!(outcome(&d), Outcome::Unsigned);
        // The genuine ones in the same instant: both stored.
        for p in ["tr_genuine1", "tr_genuine2"] {
            let body = event(p);
            let d = decide(&a, "mollie/signed", &body, &signed(&body, SECRET), 1_000);
            assert_eq!(outcome(&d), Outcome::Accepted, "{p}");
        }
        // The third exceeds the account's own burst: 503 with Retry-After,
        // never 429 (a processor retries a 503).
        let body = event("tr_genuine3");
        match decide(&a, "mollie/signed", &body, &signed(&body, SECRET), 1_000) {
            Decision::Answer(ans) => {
                assert_eq!((ans.outcome, ans.status), (Outcome::Throttled, 503));
                assert_eq!(ans.retry_after, Some(1));
            }
            Decision::Store(_) => panic!("over the bucket"),
        }
        // A second later a token came back.
        let d = decide(&a, "mollie/signed", &body, &signed(&body, SECRET), 2_000);
        assert_eq!(outcome(&d), Outcome::Accepted);
    }

    #[test]
    fn each_delivery_gets_its_own_request_id_and_repeats_within_the_window_nothing() {
        let a = admission("");
        let body = b"id=tr_WDqYK6vllg";
        let Decision::Store(first) = decide(&a, "mollie/open", body, &[], 10_000) else {
            panic!("the first delivery is stored")
        };
        assert_eq!(first.request.request_id, "webhook:mollie:0");
        assert_eq!(first.request.transaction_id.as_str(), "tr_WDqYK6vllg");
        // Before the broker acknowledged it, a repeat is not yet a repeat.
        let Decision::Store(again) = decide(&a, "mollie/open", body, &[], 10_100) else {
            panic!("not stored yet: no repeat")
        };
        a.stored(first, 10_200);
        drop(again);
        // Within the window: answered 200, nothing to store, no budget spent.
        for at in [10_300, 11_000, 11_199] {
            assert_eq!(
                outcome(&decide(&a, "mollie/open", body, &[], at)),
                Outcome::Duplicate,
                "at {at}"
            );
        }
        // 3 s later (a later status change): a new request with its own id.
        let Decision::Store(later) = decide(&a, "mollie/open", body, &[], 13_200) else {
            panic!("a delivery outside the window is stored")
        };
        assert_eq!(later.request.request_id, "webhook:mollie:2");
        // The processor's event id travels on its own, not as the request id.
        let ev = event("tr_abc");
        let Decision::Store(signed_one) =
            decide(&a, "mollie/signed", &ev, &signed(&ev, SECRET), 20_000)
        else {
            panic!("stored")
        };
        assert_eq!(signed_one.request.event_id.as_deref(), Some("event_tr_abc"));
        assert_ne!(signed_one.request.request_id, "webhook:mollie:event_tr_abc");
        a.stored(signed_one, 20_100);
        // The same event again: a repeat. Another event for the same payment
        // (a later change, say) is not, inside the window too.
        assert_eq!(
            outcome(&decide(
                &a,
                "mollie/signed",
                &ev,
                &signed(&ev, SECRET),
                20_200
            )),
            Outcome::Duplicate
        );
        let other = br#"{"id":"event_second","entityId":"tr_abc","type":"payment-link.paid"}"#;
        assert!(matches!(
            decide(&a, "mollie/signed", other, &signed(other, SECRET), 20_300),
            Decision::Store(_)
        ));
    }

    #[test]
    fn routes_tokens_and_sizes_are_checked_before_anything_is_read() {
        let a = admission("max_body_bytes = 1024\n");
        for path in [
            "cm/open",
            "mollie/nobody",
            "mollie",
            "mollie/open/extra",
            "mollie/hidden",
            "mollie/hidden/pt_wrong_token_000",
            "mollie/signed/pt_0123456789abcdef",
        ] {
            let e = a.route(path, Some(10)).err().unwrap();
            assert_eq!((e.outcome, e.status), (Outcome::NotFound, 404), "{path}");
        }
        assert!(a
            .route("mollie/hidden/pt_0123456789abcdef", Some(10))
            .is_ok());
        let e = a.route("mollie/open", Some(1025)).err().unwrap();
        assert_eq!((e.outcome, e.status), (Outcome::TooLarge, 413));
        assert!(a.route("mollie/open", None).is_ok());
        // Routes anyone can spend are named for the start-up warning.
        assert_eq!(a.open_routes(), vec!["mollie/open".to_owned()]);
    }

    #[test]
    fn beyond_the_verification_budget_the_answer_is_503_before_reading() {
        let a = admission("");
        let mut refused = 0;
        for _ in 0..1_500 {
            if let Err(ans) = a.afford(5_000) {
                assert_eq!((ans.outcome, ans.status), (Outcome::Overloaded, 503));
                assert_eq!(ans.retry_after, Some(1));
                refused += 1;
            }
        }
        assert_eq!(refused, 500, "1,000 a second, all in one instant");
        assert!(
            a.afford(5_001).is_ok(),
            "one token a millisecond comes back"
        );
    }

    #[test]
    fn a_bucket_refills_at_its_rate_and_says_when() {
        let mut b = Bucket::new(10, 2);
        assert!(b.take(0).is_ok());
        assert!(b.take(0).is_ok());
        assert_eq!(b.take(0), Err(100));
        assert_eq!(b.take(50), Err(50));
        assert!(b.take(100).is_ok());
        // A clock that goes back does not mint tokens.
        assert!(b.take(10).is_err());
    }
}
