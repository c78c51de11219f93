//! Access tokens per account: cached, refreshed before expiry with a safety margin,
//! fetched by one caller at a time (single flight), and invalidated after a 401.
//! A failed fetch is shared with the callers that waited for it, so a token-endpoint
//! outage costs one request per wave of callers, not one per caller.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::{AccessToken, CallError};

/// The longest a token is trusted, whatever lifetime the token endpoint claims.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The shortest lifetime trusted, whatever the token endpoint says: an
/// `expires_in` of 0 (or 1) would otherwise fetch a token for every call. With
/// the half-life rule a token is then kept 5 s; a token that really expired
/// sooner is refused with a 401, refreshed once and the call retried.
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(10);

/// A source of monotonic time (injected so that expiry is testable).
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// The system's monotonic clock.
pub fn system_clock() -> Clock {
    Arc::new(Instant::now)
}

/// A token handed to a caller, with the generation needed to invalidate it.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The token.
    pub token: AccessToken,
    /// Which fetch produced it.
    pub generation: u64,
}

#[derive(Default)]
struct Slot {
    token: Option<(AccessToken, Instant, u64)>,
    /// The last failed fetch: its epoch and error.
    failure: Option<(u64, CallError)>,
    /// The token endpoint refused the credentials: no new token request before
    /// `until`; callers meanwhile get the refusal at once.
    refusal: Option<Refusal>,
}

struct Refusal {
    until: Instant,
    backoff: Duration,
    error: CallError,
}

/// The first wait after the token endpoint refuses an account's credentials; it
/// doubles with every further refusal up to [`MAX_REFUSAL_BACKOFF`].
pub const FIRST_REFUSAL_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between token requests of an account whose credentials are refused.
pub const MAX_REFUSAL_BACKOFF: Duration = Duration::from_secs(300);

/// True when the token endpoint refused the credentials (as opposed to being down).
fn is_refusal(e: &CallError) -> bool {
    matches!(e, CallError::Permanent(f) if f.code == crate::domain::event::FailureCode::AuthenticationFailed)
}

struct Account {
    slot: Mutex<Slot>,
    /// Incremented on every completed fetch (success or failure).
    epoch: AtomicU64,
}

/// Tokens of every account of one connector.
pub struct TokenCache {
    accounts: HashMap<String, Account>,
    margin: Duration,
    clock: Clock,
}

impl TokenCache {
    /// A cache for these account names.
    pub fn new<'a>(
        accounts: impl IntoIterator<Item = &'a String>,
        margin: Duration,
        clock: Clock,
    ) -> Self {
        TokenCache {
            accounts: accounts
                .into_iter()
                .map(|a| {
                    (
                        a.clone(),
                        Account {
                            slot: Mutex::new(Slot::default()),
                            epoch: AtomicU64::new(0),
                        },
                    )
                })
                .collect(),
            margin,
            clock,
        }
    }

    /// When a token with this lifetime should be replaced: `margin` before expiry,
    /// but never later than half its life (short-lived tokens). The lifetime comes
    /// from the token endpoint's answer, so it is clamped to [`MIN_TOKEN_LIFETIME`]
    /// and [`MAX_TOKEN_LIFETIME`] (an `expires_in` of 2^64-1 seconds would
    /// overflow `Instant`; one of 0 would fetch a token per call).
    fn refresh_at(&self, obtained: Instant, expires_in: Duration) -> Instant {
        let expires_in = expires_in.clamp(MIN_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME);
        let lead = self.margin.min(expires_in / 2);
        obtained.checked_add(expires_in - lead).unwrap_or(obtained)
    }

    /// A valid token for `account`, fetching one with `fetch` when there is none or
    /// it is due for refresh. Concurrent callers share one fetch.
    pub async fn get<F, Fut>(&self, account: &str, fetch: F) -> Result<Lease, CallError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<AccessToken, CallError>>,
    {
        let Some(acc) = self.accounts.get(account) else {
            return Err(CallError::Permanent(
                crate::domain::event::CheckFailure::new(
                    crate::domain::event::FailureCode::AuthenticationFailed,
                    "no credentials for this merchant account",
                ),
            ));
        };
        let seen_epoch = acc.epoch.load(Ordering::Acquire);
        let mut slot = acc.slot.lock().await;
        if let Some((token, refresh_at, generation)) = &slot.token {
            if (self.clock)() < *refresh_at {
                return Ok(Lease {
                    token: token.clone(),
                    generation: *generation,
                });
            }
        }
        // A fetch completed while we waited for the lock and failed: share its result.
        if let Some((epoch, err)) = &slot.failure {
            if *epoch > seen_epoch {
                return Err(err.clone());
            }
        }
        // Credentials refused recently: do not ask the token endpoint again yet.
        if let Some(refusal) = &slot.refusal {
            if (self.clock)() < refusal.until {
                return Err(refusal.error.clone());
            }
        }
        let result = fetch().await;
        let epoch = acc.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        match result {
            Ok(token) => {
                let refresh_at = self.refresh_at((self.clock)(), token.expires_in);
                slot.token = Some((token.clone(), refresh_at, epoch));
                slot.failure = None;
                slot.refusal = None;
                Ok(Lease {
                    token,
                    generation: epoch,
                })
            }
            Err(err) => {
                if is_refusal(&err) {
                    let backoff = slot.refusal.as_ref().map_or(FIRST_REFUSAL_BACKOFF, |r| {
                        (r.backoff * 2).min(MAX_REFUSAL_BACKOFF)
                    });
                    let now = (self.clock)();
                    slot.refusal = Some(Refusal {
                        until: now.checked_add(backoff).unwrap_or(now),
                        backoff,
                        error: err.clone(),
                    });
                }
                slot.failure = Some((epoch, err.clone()));
                Err(err)
            }
        }
    }

    /// Drops the token of that generation (after a 401), unless a newer one exists.
    pub async fn invalidate(&self, account: &str, generation: u64) {
        if let Some(acc) = self.accounts.get(account) {
            let mut slot = acc.slot.lock().await;
            if slot
                .token
                .as_ref()
                .is_some_and(|(_, _, g)| *g == generation)
            {
                slot.token = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex as StdMutex;

    fn token(s: &str, secs: u64) -> AccessToken {
        AccessToken {
            token: SecretString::from(s.to_owned()),
            expires_in: Duration::from_secs(secs),
        }
    }

    fn manual_clock() -> (Clock, Arc<StdMutex<Instant>>) {
        let now = Arc::new(StdMutex::new(Instant::now()));
        let n = now.clone();
        (Arc::new(move || *n.lock().unwrap()), now)
    }

    #[tokio::test]
    async fn cached_until_margin_then_refreshed() {
        let (clock, now) = manual_clock();
        let names = vec!["default".to_string()];
        let cache = TokenCache::new(&names, Duration::from_secs(60), clock);
        let fetches = AtomicUsize::new(0);
        let fetch = || async {
            let n = fetches.fetch_add(1, Ordering::SeqCst);
            Ok(token(&format!("t{n}"), 3600))
        };
        let a = cache.get("default", fetch).await.unwrap();
        let b = cache.get("default", fetch).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(a.generation, b.generation);
        *now.lock().unwrap() += Duration::from_secs(3539);
        cache.get("default", fetch).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "still 61s before expiry");
        *now.lock().unwrap() += Duration::from_secs(2);
        let c = cache.get("default", fetch).await.unwrap();
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            2,
            "within the margin: refreshed"
        );
        assert_ne!(c.generation, a.generation);
    }

    #[tokio::test]
    async fn short_lived_tokens_refresh_at_half_life() {
        let (clock, now) = manual_clock();
        let names = vec!["a".to_string()];
        let cache = TokenCache::new(&names, Duration::from_secs(60), clock);
        let fetches = AtomicUsize::new(0);
        let fetch = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            Ok(token("t", 10))
        };
        cache.get("a", fetch).await.unwrap();
        *now.lock().unwrap() += Duration::from_secs(4);
        cache.get("a", fetch).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        *now.lock().unwrap() += Duration::from_secs(2);
        cache.get("a", fetch).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn absurd_lifetimes_are_clamped_not_a_panic() {
        // Issue c: `expires_in` of u64::MAX seconds overflowed `Instant` and the job
        // panicked; the partition's commits froze without a word.
        let (clock, now) = manual_clock();
        let names = vec!["a".to_string()];
        let cache = TokenCache::new(&names, Duration::from_secs(60), clock);
        let fetches = AtomicUsize::new(0);
        let fetch = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            Ok(AccessToken {
                token: SecretString::from("t".to_owned()),
                expires_in: Duration::from_secs(u64::MAX),
            })
        };
        cache.get("a", fetch).await.unwrap();
        *now.lock().unwrap() += MAX_TOKEN_LIFETIME - Duration::from_secs(61);
        cache.get("a", fetch).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "trusted for up to a day");
        *now.lock().unwrap() += Duration::from_secs(2);
        cache.get("a", fetch).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 2, "refreshed within a day");
    }

    #[tokio::test]
    async fn a_zero_lifetime_does_not_fetch_a_token_per_call() {
        // Audit: `expires_in: 0` made every call fetch a token first.
        let (clock, now) = manual_clock();
        let names = vec!["a".to_string()];
        let cache = TokenCache::new(&names, Duration::from_secs(60), clock);
        let fetches = AtomicUsize::new(0);
        let fetch = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            Ok(token("t", 0))
        };
        for _ in 0..100 {
            cache.get("a", fetch).await.unwrap();
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "100 calls at once");
        *now.lock().unwrap() += Duration::from_millis(4_900);
        cache.get("a", fetch).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "kept for 5 s");
        *now.lock().unwrap() += Duration::from_millis(200);
        cache.get("a", fetch).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 2, "then refreshed");
    }

    #[tokio::test]
    async fn refused_credentials_are_asked_again_only_after_a_doubling_backoff() {
        use crate::domain::event::{CheckFailure, FailureCode};
        let (clock, now) = manual_clock();
        let names = vec!["a".to_string()];
        let cache = TokenCache::new(&names, Duration::from_secs(60), clock);
        let fetches = AtomicUsize::new(0);
        let refuse = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            Err(CallError::Permanent(CheckFailure::new(
                FailureCode::AuthenticationFailed,
                "token endpoint refused the credentials (401)",
            )))
        };
        let advance = |d: Duration| *now.lock().unwrap() += d;
        let mut expected_fetches = 0;
        for backoff_secs in [1u64, 2, 4, 8] {
            let err = cache.get("a", refuse).await.unwrap_err();
            expected_fetches += 1;
            assert_eq!(err.failure().code, FailureCode::AuthenticationFailed);
            // Callers during the backoff fail at once, without a token request.
            for _ in 0..5 {
                assert!(cache.get("a", refuse).await.is_err());
            }
            assert_eq!(fetches.load(Ordering::SeqCst), expected_fetches);
            advance(Duration::from_secs(backoff_secs) - Duration::from_millis(1));
            assert!(cache.get("a", refuse).await.is_err());
            assert_eq!(
                fetches.load(Ordering::SeqCst),
                expected_fetches,
                "still backing off"
            );
            advance(Duration::from_millis(1));
        }
        // The cap.
        for _ in 0..20 {
            cache.get("a", refuse).await.unwrap_err();
            advance(MAX_REFUSAL_BACKOFF);
        }
        let before = fetches.load(Ordering::SeqCst);
        advance(MAX_REFUSAL_BACKOFF);
        cache.get("a", refuse).await.unwrap_err();
        assert_eq!(fetches.load(Ordering::SeqCst), before + 1);
        // Credentials fixed: a success clears the backoff.
        advance(MAX_REFUSAL_BACKOFF);
        let ok = || async { Ok(token("t", 3600)) };
        cache.get("a", ok).await.unwrap();
        cache.invalidate("a", 0).await;
    }

    #[tokio::test]
    async fn invalidate_only_drops_the_named_generation() {
        let names = vec!["a".to_string()];
        let cache = TokenCache::new(&names, Duration::from_secs(60), system_clock());
        let fetches = AtomicUsize::new(0);
        let fetch = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            Ok(token("t", 3600))
        };
        let first = cache.get("a", fetch).await.unwrap();
        cache.invalidate("a", first.generation + 100).await;
        cache.get("a", fetch).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        cache.invalidate("a", first.generation).await;
        cache.get("a", fetch).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }
}
