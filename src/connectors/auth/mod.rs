//! Authentication as behaviour. A connector names its [`AuthScheme`]; the
//! scheme reads its own fields from an account's table ([`AccountFields`])
//! into a [`Credential`], and the credential authorizes each call (the
//! `Authorization` header, other headers of its scheme, a token and its
//! refresh where the scheme has one). The gateway never knows which scheme it
//! holds.
//!
//! | scheme | account fields | each call | on 401 |
//! |---|---|---|---|
//! | [`oauth2`] client credentials | `client_id`, `client_secret` | `Authorization: Bearer <token>` from a cached token, fetched by one caller at a time and refreshed before expiry | refresh once, call once more |
//! | [`bearer`] API key | `api_key` | `Authorization: Bearer <key>` | final (`AUTHENTICATION_FAILED`) |
//! | [`stripe`] secret key | `api_key`, optional `stripe_account` | `Authorization: Bearer <key>`, `Stripe-Account` | final |
//!
//! A new scheme is one file here and its `pub mod` line; a connector names it
//! in [`crate::connectors::Connector::auth`].

pub mod bearer;
pub mod oauth2;
pub mod stripe;

use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use serde::{Serialize, Serializer};

use super::token::TokenCache;
use super::{AccessToken, CallError, HttpRequest, HttpResponse};
use crate::domain::event::CheckFailure;

pub use oauth2::{ClientCredentials, TokenEndpoint};

/// How a connector authenticates: reads an account's fields into a credential.
pub trait AuthScheme: Send + Sync {
    /// The scheme's name (logs, errors).
    fn name(&self) -> &'static str;
    /// The account fields it reads (required ones first; errors list them).
    fn fields(&self) -> &'static [&'static str];
    /// Example values of its fields (tests, the README's examples).
    fn example(&self) -> &'static [(&'static str, &'static str)];
    /// Reads its fields into a credential.
    fn credential(&self, fields: &mut dyn AccountFields)
        -> Result<Arc<dyn Credential>, FieldError>;
}

impl fmt::Debug for dyn AuthScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An account table's fields, as a scheme reads them (the configuration
/// resolves secrets from files and the environment).
pub trait AccountFields {
    /// A plain text field.
    fn text(&mut self, name: &'static str) -> Result<Option<String>, FieldError>;
    /// A secret field (a string, or `{ file = "..." }`).
    fn secret(&mut self, name: &'static str) -> Result<Option<SecretString>, FieldError>;
}

/// A field a scheme refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's name.
    pub field: &'static str,
    /// Why (never its value).
    pub why: String,
}

impl FieldError {
    /// A required field is missing.
    pub fn missing(field: &'static str) -> Self {
        FieldError {
            field,
            why: "is required".into(),
        }
    }
}

/// Reads a required field.
pub fn required<T>(field: &'static str, v: Option<T>) -> Result<T, FieldError> {
    v.ok_or_else(|| FieldError::missing(field))
}

/// Live or test mode, where a key says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Live payments.
    Live,
    /// Test payments.
    Test,
}

/// What the gateway lends a credential to authorize one call.
pub struct AuthContext<'a> {
    /// The account's name (`merchant_id`).
    pub merchant_id: &'a str,
    /// The connector's API base URL.
    pub base_url: &'a url::Url,
    /// The connector's token cache (single flight, refresh before expiry).
    pub tokens: &'a TokenCache,
    /// Sends a token request and parses its 2xx answer with `parse`: the
    /// gateway's transport, metrics and error classification.
    pub fetch_token: &'a TokenFetcher<'a>,
}

/// Sends a token request, parsing its 2xx answer.
pub type TokenFetcher<'a> = dyn Fn(HttpRequest, TokenParser) -> BoxFuture<'a, Result<AccessToken, CallError>>
    + Send
    + Sync
    + 'a;

/// Parses a 2xx token answer.
pub type TokenParser =
    Box<dyn Fn(&HttpResponse) -> Result<AccessToken, CheckFailure> + Send + Sync>;

/// One call's authorization.
pub struct Authorized {
    /// The `Authorization` header.
    pub authorization: Authorization,
    /// Other headers of the scheme (added where the request has none of
    /// that name).
    pub headers: Vec<(&'static str, String)>,
    /// The token generation it came from (to refresh after a 401).
    pub generation: u64,
}

/// One account's credential.
pub trait Credential: Send + Sync {
    /// Authorizes one call.
    fn authorize<'a>(
        &'a self,
        cx: &'a AuthContext<'a>,
    ) -> BoxFuture<'a, Result<Authorized, CallError>>;
    /// True when a 401 is worth one refresh and one more call.
    fn refreshes(&self) -> bool {
        false
    }
    /// Accounts with equal keys share the processor's limits (a digest of the
    /// key, never the key).
    fn limit_key(&self) -> String;
    /// The key's mode, where it says one.
    fn mode(&self) -> Option<Mode> {
        None
    }
    /// Its fields with secrets masked (`check-config`).
    fn masked(&self) -> serde_json::Map<String, serde_json::Value>;
}

/// A static key's authorization (`Bearer <key>` and the scheme's headers):
/// ready at once, nothing to refresh.
pub fn bearer_key<'a>(
    key: &SecretString,
    headers: Vec<(&'static str, String)>,
) -> BoxFuture<'a, Result<Authorized, CallError>> {
    Box::pin(std::future::ready(Ok(Authorized {
        authorization: Authorization::bearer(key),
        headers,
        generation: 0,
    })))
}

/// The mask shown for every secret.
pub const MASK: &str = "********";

/// A digest of a secret that names it in limits without revealing it.
pub fn digest(secret: &SecretString) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.expose_secret().as_bytes());
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// One merchant account of a connector.
#[derive(Clone)]
pub struct Account {
    /// Its credential, of its connector's scheme.
    pub credential: Arc<dyn Credential>,
    /// Optional rate limit for this account's calls (besides the connector's).
    pub requests_per_second: Option<u32>,
    /// Webhook intake: the secret its signed webhooks are verified with.
    pub webhook_secret: Option<SecretString>,
    /// Webhook intake: a secret path segment its webhook route must carry
    /// (`/webhooks/<connector>/<merchant_id>/<token>`).
    pub webhook_path_token: Option<SecretString>,
}

impl Account {
    /// An account of `scheme` from `fields` (tests and the demo); panics when
    /// the scheme refuses them.
    pub fn of(scheme: &dyn AuthScheme, fields: &[(&'static str, &str)]) -> Self {
        let mut fields = Given(fields.iter().map(|(k, v)| (*k, v.to_string())).collect());
        Account {
            credential: scheme
                .credential(&mut fields)
                .unwrap_or_else(|e| panic!("{}: {} {}", scheme.name(), e.field, e.why)),
            requests_per_second: None,
            webhook_secret: None,
            webhook_path_token: None,
        }
    }

    /// A static API key (tests and the demo).
    pub fn api_key(key: &str) -> Self {
        Account::of(&bearer::BEARER_API_KEY, &[("api_key", key)])
    }
}

/// Fields given as plain pairs (tests, the demo).
struct Given(Vec<(&'static str, String)>);

impl AccountFields for Given {
    fn text(&mut self, name: &'static str) -> Result<Option<String>, FieldError> {
        Ok(self
            .0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone()))
    }
    fn secret(&mut self, name: &'static str) -> Result<Option<SecretString>, FieldError> {
        Ok(self.text(name)?.map(SecretString::from))
    }
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("credential", &self.credential.masked())
            .field("requests_per_second", &self.requests_per_second)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| MASK),
            )
            .field(
                "webhook_path_token",
                &self.webhook_path_token.as_ref().map(|_| MASK),
            )
            .finish()
    }
}

impl Serialize for Account {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Unset fields are left out (TOML has no null).
        let mut map = self.credential.masked();
        if let Some(rps) = self.requests_per_second {
            map.insert("requests_per_second".into(), rps.into());
        }
        if self.webhook_secret.is_some() {
            map.insert("webhook_secret".into(), MASK.into());
        }
        if self.webhook_path_token.is_some() {
            map.insert("webhook_path_token".into(), MASK.into());
        }
        map.serialize(s)
    }
}

/// An `Authorization` header value (a secret: never logged).
#[derive(Clone)]
pub struct Authorization(pub SecretString);

impl Authorization {
    /// `Bearer <secret>`.
    pub fn bearer(secret: &SecretString) -> Self {
        Authorization(SecretString::from(format!(
            "Bearer {}",
            secret.expose_secret()
        )))
    }

    /// The header value, for the HTTP executor only.
    pub fn value(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authorization(********)")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn credentials_never_print() {
        let a = Account::of(
            &oauth2::tests::TEST_SCHEME,
            &[("client_id", "id-1"), ("client_secret", "very-secret")],
        );
        let mut b = Account::api_key("live_secret_key");
        b.webhook_secret = Some(SecretString::from("whsec-do-not-print".to_owned()));
        b.webhook_path_token = Some(SecretString::from("path-do-not-print".to_owned()));
        let c = Account::of(
            &stripe::STRIPE_SECRET_KEY,
            &[
                ("api_key", "sk_test_do_not_print"),
                ("stripe_account", "acct_1"),
            ],
        );
        for shown in [
            format!("{a:?}"),
            format!("{b:?}"),
            format!("{c:?}"),
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap(),
            serde_json::to_string(&c).unwrap(),
            format!(
                "{:?}",
                Authorization::bearer(&SecretString::from("bearer-do-not-print".to_owned()))
            ),
        ] {
            for secret in [
                "very-secret",
                "live_secret_key",
                "whsec-do-not-print",
                "path-do-not-print",
                "bearer-do-not-print",
                "sk_test_do_not_print",
            ] {
                assert!(!shown.contains(secret), "{shown}");
            }
        }
        assert!(serde_json::to_string(&a).unwrap().contains("id-1"));
        assert!(serde_json::to_string(&c).unwrap().contains("acct_1"));
    }

    /// What every scheme owes (run for each connector's scheme from the
    /// registry's tests).
    pub fn scheme_holds(scheme: &dyn AuthScheme) {
        let a = Account::of(scheme, scheme.example());
        assert!(!a.credential.limit_key().is_empty());
        let mut none = Given(Vec::new());
        let e = scheme.credential(&mut none).err().unwrap();
        assert_eq!(e.field, scheme.fields()[0], "{}", scheme.name());
        let shown = serde_json::to_string(&a).unwrap();
        for (field, value) in scheme.example() {
            if field.contains("secret") || field.contains("key") {
                assert!(!shown.contains(value), "{}: {shown}", scheme.name());
            }
        }
    }
}
