//! Auth schemes and credentials. A connector declares its [`AuthScheme`]; the
//! scheme defines the credential type an account configures ([`Credentials`]:
//! secrets held as [`SecretString`]) and how the gateway authenticates a call:
//!
//! | scheme | account fields | each call | on 401 |
//! |---|---|---|---|
//! | OAuth2 client credentials | `client_id`, `client_secret` | `Authorization: Bearer <token>` from a cached token, fetched by one caller at a time and refreshed before expiry | refresh once, call once more |
//! | bearer API key | `api_key` | `Authorization: Bearer <key>` | final (`AUTHENTICATION_FAILED`) |
//!
//! A connector never sees an `Authorization` header; for OAuth2 it only describes
//! the token request ([`TokenEndpoint`]) and parses the answer.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Serialize, Serializer};
use url::Url;

use super::{AccessToken, HttpRequest, HttpResponse};
use crate::domain::event::CheckFailure;

/// The token half of an OAuth2 client-credentials connector (pure).
pub trait TokenEndpoint: Send + Sync {
    /// The request that obtains an access token with these credentials.
    fn token_request(&self, base_url: &Url, credentials: &ClientCredentials) -> HttpRequest;
    /// Parses a 2xx token response. The body is never quoted in errors.
    fn parse_token(&self, response: &HttpResponse) -> Result<AccessToken, CheckFailure>;
}

/// How a connector authenticates.
#[derive(Clone, Copy)]
pub enum AuthScheme {
    /// OAuth2 client credentials with this token endpoint.
    OAuth2ClientCredentials(&'static dyn TokenEndpoint),
    /// A static API key sent as `Authorization: Bearer <key>`, no refresh.
    BearerApiKey,
}

impl AuthScheme {
    /// The credential fields an account of this scheme configures.
    pub fn account_fields(&self) -> &'static [&'static str] {
        match self {
            AuthScheme::OAuth2ClientCredentials(_) => &["client_id", "client_secret"],
            AuthScheme::BearerApiKey => &["api_key"],
        }
    }
}

impl fmt::Debug for AuthScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthScheme::OAuth2ClientCredentials(_) => "OAuth2ClientCredentials",
            AuthScheme::BearerApiKey => "BearerApiKey",
        })
    }
}

const MASK: &str = "********";

fn masked<S: Serializer>(_: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(MASK)
}

/// OAuth2 client credentials.
#[derive(Clone, Serialize)]
pub struct ClientCredentials {
    /// Client id.
    pub client_id: String,
    /// Client secret.
    #[serde(serialize_with = "masked")]
    pub client_secret: SecretString,
}

impl ClientCredentials {
    /// The secret, for building the token request only.
    pub fn secret(&self) -> &str {
        self.client_secret.expose_secret()
    }
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &MASK)
            .finish()
    }
}

/// The credentials of one merchant account, of its connector's scheme.
#[derive(Clone, Serialize)]
#[serde(untagged)]
pub enum Credentials {
    /// For [`AuthScheme::OAuth2ClientCredentials`].
    ClientCredentials(ClientCredentials),
    /// For [`AuthScheme::BearerApiKey`].
    ApiKey {
        /// The key.
        #[serde(serialize_with = "masked")]
        api_key: SecretString,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::ClientCredentials(c) => c.fmt(f),
            Credentials::ApiKey { .. } => f.write_str("ApiKey(********)"),
        }
    }
}

/// One merchant account of a connector.
#[derive(Debug, Clone, Serialize)]
pub struct Account {
    /// Its credentials.
    #[serde(flatten)]
    pub credentials: Credentials,
    /// Optional rate limit for this account's calls (besides the connector's).
    pub requests_per_second: Option<u32>,
    /// Webhook intake: the secret its signed webhooks are verified with.
    #[serde(serialize_with = "masked_opt")]
    pub webhook_secret: Option<SecretString>,
    /// Webhook intake: a secret path segment its webhook route must carry
    /// (`/webhooks/<connector>/<merchant_id>/<token>`).
    #[serde(serialize_with = "masked_opt")]
    pub webhook_path_token: Option<SecretString>,
}

fn masked_opt<S: serde::Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("********"),
        None => s.serialize_none(),
    }
}

impl Account {
    /// OAuth2 client credentials (tests and the demo).
    pub fn client_credentials(client_id: &str, client_secret: &str) -> Self {
        Account {
            credentials: Credentials::ClientCredentials(ClientCredentials {
                client_id: client_id.to_owned(),
                client_secret: SecretString::from(client_secret.to_owned()),
            }),
            requests_per_second: None,
            webhook_secret: None,
            webhook_path_token: None,
        }
    }

    /// A static API key (tests and the demo).
    pub fn api_key(key: &str) -> Self {
        Account {
            credentials: Credentials::ApiKey {
                api_key: SecretString::from(key.to_owned()),
            },
            requests_per_second: None,
            webhook_secret: None,
            webhook_path_token: None,
        }
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
mod tests {
    use super::*;

    #[test]
    fn credentials_never_print() {
        let a = Account::client_credentials("id-1", "very-secret");
        let mut b = Account::api_key("live_secret_key");
        b.webhook_secret = Some(SecretString::from("whsec-do-not-print".to_owned()));
        b.webhook_path_token = Some(SecretString::from("path-do-not-print".to_owned()));
        for shown in [
            format!("{a:?}"),
            format!("{b:?}"),
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap(),
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
            ] {
                assert!(!shown.contains(secret), "{shown}");
            }
        }
        assert!(serde_json::to_string(&a).unwrap().contains("id-1"));
    }
}
