//! A static API key sent as `Authorization: Bearer <key>` (Mollie): no
//! refresh, so a 401 is final.

use std::sync::Arc;

use futures::future::BoxFuture;
use secrecy::SecretString;

use super::{
    bearer_key, digest, required, AccountFields, AuthContext, AuthScheme, Authorized, Credential,
    FieldError, MASK,
};
use crate::connectors::CallError;

/// The scheme.
pub struct BearerApiKey;

/// The one instance connectors name.
pub static BEARER_API_KEY: BearerApiKey = BearerApiKey;

impl AuthScheme for BearerApiKey {
    fn name(&self) -> &'static str {
        "bearer API key"
    }

    fn fields(&self) -> &'static [&'static str] {
        &["api_key"]
    }

    fn example(&self) -> &'static [(&'static str, &'static str)] {
        &[("api_key", "test_dHar4XY7LxsDOtmnkVtjNVWXLSlXsM")]
    }

    fn credential(
        &self,
        fields: &mut dyn AccountFields,
    ) -> Result<Arc<dyn Credential>, FieldError> {
        Ok(Arc::new(ApiKey {
            api_key: required("api_key", fields.secret("api_key")?)?,
        }))
    }
}

struct ApiKey {
    api_key: SecretString,
}

impl Credential for ApiKey {
    fn authorize<'a>(
        &'a self,
        _: &'a AuthContext<'a>,
    ) -> BoxFuture<'a, Result<Authorized, CallError>> {
        bearer_key(&self.api_key, Vec::new())
    }

    fn limit_key(&self) -> String {
        digest(&self.api_key)
    }

    fn masked(&self) -> serde_json::Map<String, serde_json::Value> {
        [("api_key".to_owned(), MASK.into())].into_iter().collect()
    }
}
