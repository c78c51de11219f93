//! The Confluent Schema Registry client: at start-up the event schema is
//! registered (or, with `auto_register = false`, looked up) under the subject
//! `<output_topic>-value`, and the id it gets is used for the Confluent wire format
//! (`00`, 4-byte big-endian id, Avro binary). Unreachable is retried a few times;
//! an incompatible schema fails start-up with the registry's message.

use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::config::RegistrySettings;

/// Why the event schema id could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry refused the schema as incompatible with the subject's history.
    #[error("schema registry rejected the event schema as incompatible for subject `{subject}`: {message}")]
    Incompatible {
        /// Subject.
        subject: String,
        /// The registry's explanation.
        message: String,
    },
    /// The schema is not registered and auto-registration is off.
    #[error("event schema is not registered under subject `{subject}` and schema_registry.auto_register is false")]
    NotRegistered {
        /// Subject.
        subject: String,
    },
    /// Credentials refused.
    #[error("schema registry refused the credentials ({0})")]
    Unauthorized(u16),
    /// Any other answer.
    #[error("schema registry answered {status}: {message}")]
    Unexpected {
        /// HTTP status.
        status: u16,
        /// Message.
        message: String,
    },
    /// The HTTP client could not be built (TLS backend).
    #[error("cannot build the schema registry client: {0}")]
    Client(String),
    /// Not reachable (after retries).
    #[error("schema registry at {url} is unreachable: {message}")]
    Unreachable {
        /// Base URL.
        url: String,
        /// Cause.
        message: String,
    },
}

impl RegistryError {
    fn retryable(&self) -> bool {
        matches!(self, RegistryError::Unreachable { .. })
            || matches!(self, RegistryError::Unexpected { status, .. } if *status >= 500)
    }
}

#[derive(Deserialize)]
struct IdAnswer {
    id: u32,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    error_code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A small client for the registry's REST API.
pub struct RegistryClient {
    http: reqwest::Client,
    settings: RegistrySettings,
}

impl RegistryClient {
    /// A client for these settings.
    pub fn new(settings: RegistrySettings) -> Result<Self, RegistryError> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| RegistryError::Client(e.to_string()))?;
        Ok(RegistryClient { http, settings })
    }

    fn url(&self, segments: &[&str]) -> url::Url {
        let mut url = self.settings.url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// A request with the registry's accept header and basic auth when configured.
    fn request(&self, method: reqwest::Method, url: url::Url) -> reqwest::RequestBuilder {
        let req = self
            .http
            .request(method, url)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        match &self.settings.username {
            Some(user) => req.basic_auth(
                user,
                self.settings
                    .password
                    .as_ref()
                    .map(|p| p.expose_secret().to_owned()),
            ),
            None => req,
        }
    }

    async fn post(&self, url: url::Url, schema: &str) -> Result<u32, (u16, ErrorAnswer)> {
        let req = self
            .request(reqwest::Method::POST, url)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&serde_json::json!({ "schema": schema }));
        let response = req.send().await.map_err(|e| {
            (
                0,
                ErrorAnswer {
                    error_code: None,
                    message: Some(crate::connectors::sanitize(&e.without_url().to_string())),
                },
            )
        })?;
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap_or_default();
        if (200..300).contains(&status) {
            return serde_json::from_slice::<IdAnswer>(&body)
                .map(|a| a.id)
                .map_err(|_| {
                    (
                        status,
                        ErrorAnswer {
                            error_code: None,
                            message: Some("answer has no schema id".into()),
                        },
                    )
                });
        }
        let err = serde_json::from_slice::<ErrorAnswer>(&body).unwrap_or(ErrorAnswer {
            error_code: None,
            message: None,
        });
        Err((status, err))
    }

    /// Registers (or looks up) `schema` under `subject`; returns its id.
    pub async fn schema_id(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let result = if self.settings.auto_register {
            self.post(self.url(&["subjects", subject, "versions"]), schema)
                .await
        } else {
            self.post(self.url(&["subjects", subject]), schema).await
        };
        result.map_err(|(status, e)| {
            let message = e
                .message
                .map(|m| crate::connectors::sanitize(&m))
                .unwrap_or_default();
            match status {
                0 => RegistryError::Unreachable {
                    url: self.settings.url.to_string(),
                    message,
                },
                409 => RegistryError::Incompatible {
                    subject: subject.to_owned(),
                    message,
                },
                401 | 403 => RegistryError::Unauthorized(status),
                404 if !self.settings.auto_register || e.error_code == Some(40403) => {
                    RegistryError::NotRegistered {
                        subject: subject.to_owned(),
                    }
                }
                _ => RegistryError::Unexpected { status, message },
            }
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: url::Url,
    ) -> Result<Option<T>, RegistryError> {
        let req = self.request(reqwest::Method::GET, url);
        let response = req.send().await.map_err(|e| RegistryError::Unreachable {
            url: self.settings.url.to_string(),
            message: crate::connectors::sanitize(&e.without_url().to_string()),
        })?;
        let status = response.status().as_u16();
        let body = response.bytes().await.unwrap_or_default();
        match status {
            200..=299 => {
                serde_json::from_slice(&body)
                    .map(Some)
                    .map_err(|_| RegistryError::Unexpected {
                        status,
                        message: "answer is not the expected JSON".into(),
                    })
            }
            404 => Ok(None),
            401 | 403 => Err(RegistryError::Unauthorized(status)),
            _ => Err(RegistryError::Unexpected {
                status,
                message: serde_json::from_slice::<ErrorAnswer>(&body)
                    .ok()
                    .and_then(|e| e.message)
                    .map(|m| crate::connectors::sanitize(&m))
                    .unwrap_or_default(),
            }),
        }
    }

    /// The ids of every schema version registered under `subject` (empty when the
    /// subject does not exist). Avro requests framed with one of them are accepted.
    pub async fn subject_ids(&self, subject: &str) -> Result<Vec<u32>, RegistryError> {
        let Some(versions) = self
            .get_json::<Vec<i64>>(self.url(&["subjects", subject, "versions"]))
            .await?
        else {
            return Ok(Vec::new());
        };
        let mut ids = Vec::with_capacity(versions.len());
        for version in versions {
            let v = version.to_string();
            if let Some(answer) = self
                .get_json::<IdAnswer>(self.url(&["subjects", subject, "versions", &v]))
                .await?
            {
                ids.push(answer.id);
            }
        }
        Ok(ids)
    }

    /// [`Self::schema_id`] with a few retries for an unreachable or failing registry.
    pub async fn schema_id_with_retries(
        &self,
        subject: &str,
        schema: &str,
        attempts: u32,
    ) -> Result<u32, RegistryError> {
        let mut delay = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            match self.schema_id(subject, schema).await {
                Err(e) if e.retryable() && attempt < attempts => {
                    tracing::warn!(error = %e, attempt, "schema registry not available yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(8));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}
