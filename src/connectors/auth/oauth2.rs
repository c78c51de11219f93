//! OAuth2 client credentials (CM.com): the account's `client_id` and
//! `client_secret` buy an access token at the connector's token endpoint
//! (the connector describes the request and parses the answer:
//! [`TokenEndpoint`]); the token is cached per account, fetched by one caller
//! at a time, refreshed before it expires, and once after a 401.

use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::{
    digest, required, AccountFields, AuthContext, AuthScheme, Authorization, Authorized,
    Credential, FieldError, MASK,
};
use crate::connectors::{AccessToken, CallError, HttpRequest, HttpResponse};
use crate::domain::event::CheckFailure;

/// The token half of an OAuth2 client-credentials connector (pure).
pub trait TokenEndpoint: Send + Sync {
    /// The request that obtains an access token with these credentials.
    fn token_request(&self, base_url: &Url, credentials: &ClientCredentials) -> HttpRequest;
    /// Parses a 2xx token response. The body is never quoted in errors.
    fn parse_token(&self, response: &HttpResponse) -> Result<AccessToken, CheckFailure>;
}

/// The scheme, bound to a connector's token endpoint.
pub struct OAuth2ClientCredentials {
    /// Where tokens come from.
    pub endpoint: &'static dyn TokenEndpoint,
}

impl AuthScheme for OAuth2ClientCredentials {
    fn name(&self) -> &'static str {
        "OAuth2 client credentials"
    }

    fn fields(&self) -> &'static [&'static str] {
        &["client_id", "client_secret"]
    }

    fn example(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("client_id", "my-client-id"),
            ("client_secret", "my-client-secret"),
        ]
    }

    fn credential(
        &self,
        fields: &mut dyn AccountFields,
    ) -> Result<Arc<dyn Credential>, FieldError> {
        let client_id = required("client_id", fields.text("client_id")?)?;
        if client_id.trim().is_empty() {
            return Err(FieldError {
                field: "client_id",
                why: "must not be empty".into(),
            });
        }
        Ok(Arc::new(OAuth2Credential {
            endpoint: self.endpoint,
            credentials: ClientCredentials {
                client_id,
                client_secret: required("client_secret", fields.secret("client_secret")?)?,
            },
        }))
    }
}

/// OAuth2 client credentials.
#[derive(Clone)]
pub struct ClientCredentials {
    /// Client id.
    pub client_id: String,
    /// Client secret.
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

struct OAuth2Credential {
    endpoint: &'static dyn TokenEndpoint,
    credentials: ClientCredentials,
}

impl Credential for OAuth2Credential {
    fn authorize<'a>(
        &'a self,
        cx: &'a AuthContext<'a>,
    ) -> BoxFuture<'a, Result<Authorized, CallError>> {
        Box::pin(async move {
            let endpoint = self.endpoint;
            let lease = cx
                .tokens
                .get(cx.merchant_id, || {
                    (cx.fetch_token)(
                        endpoint.token_request(cx.base_url, &self.credentials),
                        Box::new(move |r: &HttpResponse| endpoint.parse_token(r)),
                    )
                })
                .await?;
            Ok(Authorized {
                authorization: Authorization::bearer(&lease.token.token),
                headers: Vec::new(),
                generation: lease.generation,
            })
        })
    }

    fn refreshes(&self) -> bool {
        true
    }

    fn limit_key(&self) -> String {
        digest(&SecretString::from(format!(
            "{}\n{}",
            self.credentials.client_id,
            self.credentials.secret()
        )))
    }

    fn masked(&self) -> serde_json::Map<String, serde_json::Value> {
        [
            (
                "client_id".to_owned(),
                self.credentials.client_id.clone().into(),
            ),
            ("client_secret".to_owned(), MASK.into()),
        ]
        .into_iter()
        .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    struct NoEndpoint;

    impl TokenEndpoint for NoEndpoint {
        fn token_request(&self, base_url: &Url, _: &ClientCredentials) -> HttpRequest {
            HttpRequest {
                method: crate::connectors::Method::Post,
                url: base_url.clone(),
                headers: Vec::new(),
                body: None,
            }
        }
        fn parse_token(&self, _: &HttpResponse) -> Result<AccessToken, CheckFailure> {
            Err(CheckFailure::new(
                crate::domain::event::FailureCode::ResponseDeserializationFailed,
                "none",
            ))
        }
    }

    /// A scheme for tests of what every account owes.
    pub static TEST_SCHEME: OAuth2ClientCredentials = OAuth2ClientCredentials {
        endpoint: &NoEndpoint,
    };
}
