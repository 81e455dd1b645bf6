//! TLS to the proxy (`--tls-listen`): the same proxy behind a TLS handshake
//! (rustls with the ring provider; TLS 1.2 and 1.3, ALPN `http/1.1`), so
//! credentials and targets never cross the network in clear. The
//! certificate and key are re-read on SIGHUP and `rotor reload`; a pair
//! that does not load keeps the one in use, and the log says why.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// The certificate chain and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The pair in use, swapped whole on a reload.
pub struct Tls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

/// Reads the pair and makes a server configuration of it.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("tls-cert {}: {e}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls-cert {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls-cert {}: no PEM certificate in it",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("tls-key {}: {e}", files.key.display()))?;
    let provider = Arc::new(provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[
            &tokio_rustls::rustls::version::TLS13,
            &tokio_rustls::rustls::version::TLS12,
        ])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "tls-cert {} and tls-key {} do not make a pair: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The server's order: AES-128-GCM first (see `provider`).
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// ring's suites with AES-128-GCM before AES-256-GCM. Most clients (curl,
/// Python, OpenSSL's default) ask for AES-256-GCM-SHA384 first, whose
/// handshake hashes with SHA-384: ring has no hardware path for it on
/// x86-64, and with a handshake per connection its software SHA-512 was
/// 7.6 % of a worker's samples (SHA-256, on the CPU's SHA extensions,
/// 2.6 %; −12 to −21 % user CPU per new TLS connection, README). Both are
/// TLS 1.3's standard suites (AES-128-GCM the one every client must have);
/// clients of a forward proxy run on hosts with AES in hardware, so
/// ChaCha20 stays last as in ring's list (a client offering only it gets
/// it).
fn provider() -> tokio_rustls::rustls::crypto::CryptoProvider {
    use tokio_rustls::rustls::crypto::ring::cipher_suite as cs;
    let mut provider = tokio_rustls::rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    provider
}

impl Tls {
    pub fn new(files: TlsFiles) -> Result<Arc<Tls>, String> {
        let config = load(&files)?;
        Ok(Arc::new(Tls {
            files,
            config: RwLock::new(config),
        }))
    }

    /// An acceptor with the pair in use.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.config
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    /// Reads the files again; a pair that does not load keeps the old one.
    pub fn reload(&self) {
        if self.swap() {
            info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
        }
    }

    /// Reads the files once more when the worker's SIGHUP handler is in
    /// place: a SIGHUP between the first read and then was ignored (it
    /// must not kill the worker), and a pair it was to bring in would wait
    /// for the next one. Said at debug only: nothing was asked.
    pub fn reload_at_start(&self) {
        if self.swap() {
            tracing::debug!(cert = %self.files.cert.display(), "TLS certificate read again at start");
        }
    }

    /// Loads the pair and puts it in use; whether it loaded.
    fn swap(&self) -> bool {
        match load(&self.files) {
            Ok(c) => {
                *self.config.write().unwrap_or_else(|e| e.into_inner()) = c;
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot reload the TLS certificate; serving the previous one");
                false
            }
        }
    }
}
