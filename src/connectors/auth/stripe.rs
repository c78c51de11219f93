//! Stripe's secret key: `Authorization: Bearer <key>`, and `Stripe-Account`
//! when the account reads a Connect platform's connected account. The key's
//! prefix gives its mode (`sk_test_`/`rk_test_` test, `sk_live_`/`rk_live_`
//! live). Stripe's rate limits are per key, so accounts that share a key share
//! one limiter (their [`Credential::limit_key`] is the key's digest).

use std::sync::Arc;

use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};

use super::{
    bearer_key, digest, required, AccountFields, AuthContext, AuthScheme, Authorized, Credential,
    FieldError, Mode, MASK,
};
use crate::connectors::CallError;

/// The header naming a connected account.
pub const STRIPE_ACCOUNT: &str = "stripe-account";

/// The scheme.
pub struct StripeSecretKey;

/// The one instance the Stripe connector names.
pub static STRIPE_SECRET_KEY: StripeSecretKey = StripeSecretKey;

/// The mode of a Stripe key, from its prefix; `None` when it is not one.
pub fn key_mode(key: &str) -> Option<Mode> {
    match key.get(..8)? {
        "sk_test_" | "rk_test_" => Some(Mode::Test),
        "sk_live_" | "rk_live_" => Some(Mode::Live),
        _ => None,
    }
}

/// True for a connected account id (`acct_` and 1 to 64 letters or digits).
pub use crate::codec::request::is_connected_account as is_account_id;

impl AuthScheme for StripeSecretKey {
    fn name(&self) -> &'static str {
        "Stripe secret key"
    }

    fn fields(&self) -> &'static [&'static str] {
        &["api_key", "stripe_account"]
    }

    fn example(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("api_key", "sk_test_4eC39HqLyjWDarjtT1zdp7dc"),
            ("stripe_account", "acct_1032D82eZvKYlo2C"),
        ]
    }

    fn credential(
        &self,
        fields: &mut dyn AccountFields,
    ) -> Result<Arc<dyn Credential>, FieldError> {
        let api_key = required("api_key", fields.secret("api_key")?)?;
        let key = api_key.expose_secret();
        if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || key.len() > 256 {
            return Err(FieldError {
                field: "api_key",
                why: "must be letters, digits and _ only (a stray newline or space from a file or variable?)".into(),
            });
        }
        let mode = key_mode(key).ok_or_else(|| FieldError {
            field: "api_key",
            why: "must be a Stripe secret or restricted key (sk_test_, sk_live_, rk_test_ or rk_live_)".into(),
        })?;
        let stripe_account = fields.text("stripe_account")?;
        if let Some(a) = &stripe_account {
            if !is_account_id(a) {
                return Err(FieldError {
                    field: "stripe_account",
                    why: "must be a connected account id (acct_ and letters or digits)".into(),
                });
            }
        }
        Ok(Arc::new(StripeKey {
            api_key,
            mode,
            stripe_account,
        }))
    }
}

struct StripeKey {
    api_key: SecretString,
    mode: Mode,
    stripe_account: Option<String>,
}

impl Credential for StripeKey {
    fn authorize<'a>(
        &'a self,
        _: &'a AuthContext<'a>,
    ) -> BoxFuture<'a, Result<Authorized, CallError>> {
        let headers = self
            .stripe_account
            .iter()
            .map(|a| (STRIPE_ACCOUNT, a.clone()))
            .collect();
        bearer_key(&self.api_key, headers)
    }

    fn limit_key(&self) -> String {
        digest(&self.api_key)
    }

    fn mode(&self) -> Option<Mode> {
        Some(self.mode)
    }

    fn masked(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m: serde_json::Map<String, serde_json::Value> =
            [("api_key".to_owned(), MASK.into())].into_iter().collect();
        m.insert(
            "mode".into(),
            serde_json::to_value(self.mode).unwrap_or_default(),
        );
        if let Some(a) = &self.stripe_account {
            m.insert("stripe_account".into(), a.clone().into());
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_prefix_gives_the_mode() {
        assert_eq!(key_mode("sk_test_abc"), Some(Mode::Test));
        assert_eq!(key_mode("rk_test_abc"), Some(Mode::Test));
        assert_eq!(key_mode("sk_live_abc"), Some(Mode::Live));
        assert_eq!(key_mode("rk_live_abc"), Some(Mode::Live));
        assert_eq!(
            key_mode("pk_live_abc"),
            None,
            "a publishable key reads nothing"
        );
        assert_eq!(key_mode("sk_"), None);
        assert!(is_account_id("acct_1032D82eZvKYlo2C"));
        assert!(!is_account_id("acct_"));
        assert!(!is_account_id("acct_../x"));
    }
}
