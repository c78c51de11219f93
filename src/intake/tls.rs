//! Optional TLS on the intake's listener (`webhooks.tls_cert`,
//! `webhooks.tls_key`) for deployments without a TLS-terminating ingress:
//! rustls, HTTP/1.1, the certificate reloaded when its files change (a
//! renewed certificate is picked up within [`RELOAD_EVERY`] without a
//! restart; a pair that does not load keeps the one in use, with a warning
//! and a count).

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::config::TlsFiles;

/// How often the files are looked at.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// Why a certificate pair cannot be used (names the file, never its bytes).
#[derive(Debug, thiserror::Error)]
#[error("{key} ({path}): {why}")]
pub struct TlsError {
    /// `webhooks.tls_cert` or `webhooks.tls_key`.
    pub key: &'static str,
    /// The file.
    pub path: String,
    /// What is wrong.
    pub why: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a pair: a chain, a key, and the key matching the chain's
/// first certificate.
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let err = |key, path: &Path, why: String| TlsError {
        key,
        path: path.display().to_string(),
        why,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| err("webhooks.tls_cert", &files.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("webhooks.tls_cert", &files.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(err(
            "webhooks.tls_cert",
            &files.cert,
            "no PEM certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        err(
            "webhooks.tls_key",
            &files.key,
            format!("no usable PEM private key ({e})"),
        )
    })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        err(
            "webhooks.tls_key",
            &files.key,
            format!("the key does not fit the certificate: {e}"),
        )
    })
}

/// The certificate in use, swapped when the files change.
#[derive(Debug)]
pub struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// The listener's TLS: an acceptor over a reloading certificate.
pub struct Tls {
    files: TlsFiles,
    resolver: Arc<Reloading>,
    /// For the acceptor.
    pub acceptor: tokio_rustls::TlsAcceptor,
}

/// What says the files changed: each one's modification time and length.
type Stamp = (SystemTime, u64, SystemTime, u64);

fn stamp(files: &TlsFiles) -> Option<Stamp> {
    let c = std::fs::metadata(&files.cert).ok()?;
    let k = std::fs::metadata(&files.key).ok()?;
    Some((c.modified().ok()?, c.len(), k.modified().ok()?, k.len()))
}

impl Tls {
    /// Loads the pair (a start-up error when it does not load).
    pub fn new(files: &TlsFiles) -> Result<Self, TlsError> {
        let first = load(files)?;
        let resolver = Arc::new(Reloading {
            current: RwLock::new(Arc::new(first)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError {
                key: "webhooks.tls_cert",
                path: files.cert.display().to_string(),
                why: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            files: files.clone(),
            resolver,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Loads the files again when they changed since `seen`; returns what was
    /// seen now, and `Some(result)` when a load was tried.
    fn reload_if_changed(
        &self,
        seen: Option<Stamp>,
    ) -> (Option<Stamp>, Option<Result<(), TlsError>>) {
        let now = stamp(&self.files);
        if now == seen || now.is_none() {
            return (seen, None);
        }
        let result = load(&self.files).map(|key| {
            *self
                .resolver
                .current
                .write()
                .unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        });
        (now, Some(result))
    }

    /// Watches the files until `stop`, reloading them when they change;
    /// `counted` hears each try (`true`: loaded).
    pub async fn watch(self: Arc<Self>, stop: CancellationToken, counted: impl Fn(bool)) {
        let mut seen = stamp(&self.files);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let (now, tried) = self.reload_if_changed(seen);
            seen = now;
            match tried {
                Some(Ok(())) => {
                    counted(true);
                    tracing::info!(cert = %self.files.cert.display(), "webhook intake: TLS certificate reloaded");
                }
                Some(Err(e)) => {
                    counted(false);
                    tracing::warn!(error = %e, "webhook intake: the changed TLS files do not load; the certificate in use stays");
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    #[test]
    fn a_pair_loads_and_mismatches_are_named() {
        let files = TlsFiles {
            cert: fixture("cert.pem"),
            key: fixture("key.pem"),
        };
        load(&files).unwrap();
        // The key file given as the certificate: no certificate in it.
        let e = load(&TlsFiles {
            cert: fixture("key.pem"),
            key: fixture("key.pem"),
        })
        .unwrap_err();
        assert_eq!(e.key, "webhooks.tls_cert", "{e}");
        // A certificate given as the key.
        let e = load(&TlsFiles {
            cert: fixture("cert.pem"),
            key: fixture("cert.pem"),
        })
        .unwrap_err();
        assert_eq!(e.key, "webhooks.tls_key", "{e}");
        // A missing file.
        let e = load(&TlsFiles {
            cert: fixture("nope.pem"),
            key: fixture("key.pem"),
        })
        .unwrap_err();
        assert!(e.to_string().contains("nope.pem"), "{e}");
    }

    #[test]
    fn a_changed_pair_is_picked_up_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        std::fs::copy(fixture("cert.pem"), &files.cert).unwrap();
        std::fs::copy(fixture("key.pem"), &files.key).unwrap();
        let tls = Tls::new(&files).unwrap();
        let before = tls.resolver.current.read().unwrap().clone();
        let seen = stamp(&files);
        // Unchanged: nothing tried.
        assert!(tls.reload_if_changed(seen).1.is_none());
        // A broken key: tried, refused, the old pair stays.
        std::fs::write(&files.key, "not a key\n").unwrap();
        let (seen, tried) = tls.reload_if_changed(seen);
        assert!(tried.unwrap().is_err());
        assert!(Arc::ptr_eq(
            &before,
            &tls.resolver.current.read().unwrap().clone()
        ));
        // Fixed again: loaded, a new pair in use.
        std::fs::copy(fixture("key.pem"), &files.key).unwrap();
        let (_, tried) = tls.reload_if_changed(seen);
        tried.unwrap().unwrap();
        assert!(!Arc::ptr_eq(
            &before,
            &tls.resolver.current.read().unwrap().clone()
        ));
    }
}
