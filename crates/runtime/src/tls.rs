//! TLS for external listeners: certificates from PEM files, reloaded without a restart when the
//! files change or on SIGHUP (live connections keep their session; new ones get the new
//! certificate), and a development CA for quickstarts and tests.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate chain {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("certificate and key do not form a valid TLS config: {0}")]
    Config(String),
    #[error("cannot write development certificates to {path}: {reason}")]
    DevCerts { path: String, reason: String },
}

/// Installs ring as the process-wide rustls provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Loads a server config from PEM files, advertising `alpn` protocols.
pub fn load_server_config(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    install_crypto_provider();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            reason: "no certificate in file".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut cfg = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// A server config that can be swapped while the listener runs.
#[derive(Clone)]
pub struct ReloadableTls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
    cert: PathBuf,
    key: PathBuf,
    alpn: Vec<Vec<u8>>,
}

impl ReloadableTls {
    /// Loads the files once; fails if they are unusable.
    pub fn load(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let cfg = load_server_config(cert, key, alpn)?;
        Ok(ReloadableTls {
            current: Arc::new(RwLock::new(Arc::new(cfg))),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            alpn: alpn.iter().map(|a| a.to_vec()).collect(),
        })
    }

    /// The config for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Re-reads the files; keeps the old config when the new files are unusable.
    pub fn reload(&self) -> Result<(), TlsError> {
        let alpn: Vec<&[u8]> = self.alpn.iter().map(|a| a.as_slice()).collect();
        let cfg = Arc::new(load_server_config(&self.cert, &self.key, &alpn)?);
        match self.current.write() {
            Ok(mut g) => *g = cfg,
            Err(p) => *p.into_inner() = cfg,
        }
        Ok(())
    }

    fn mtimes(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (m(&self.cert), m(&self.key))
    }

    /// Reloads on SIGHUP and when the files' modification times change, until `shutdown`.
    pub fn spawn_watcher(&self, shutdown: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut last = me.mtimes();
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let hup_fut = async {
                    match hup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(not(unix))]
                let hup_fut = std::future::pending::<()>();
                let forced = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => false,
                    _ = hup_fut => true,
                };
                let now = me.mtimes();
                if forced || now != last {
                    last = now;
                    match me.reload() {
                        Ok(()) => {
                            tracing::info!(cert = %me.cert.display(), "TLS certificate reloaded")
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "TLS certificate reload failed; keeping the old one")
                        }
                    }
                }
            }
        });
    }
}

/// Paths of a development CA and a server certificate signed by it.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates (or reuses) a development CA and a server certificate for `names` under `dir`.
/// For quickstarts and tests only: production certificates come from files the operator
/// provides (or cert-manager).
pub fn dev_certs(dir: &Path, names: &[&str]) -> Result<DevCerts, TlsError> {
    let out = DevCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    if out.ca.exists() && out.cert.exists() && out.key.exists() {
        return Ok(out);
    }
    let err = |e: String| TlsError::DevCerts {
        path: dir.display().to_string(),
        reason: e,
    };
    // several processes (parallel tests) may get here at once: each writes a complete set into
    // its own folder and renames it into place; the first rename wins and the others use it,
    // so a CA and a certificate from different processes are never mixed
    let parent = dir.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
    let tmp = parent.join(format!(
        ".{}.{}.{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("certs"),
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&tmp).map_err(|e| err(e.to_string()))?;
    let ca_key = rcgen::KeyPair::generate().map_err(|e| err(e.to_string()))?;
    let mut ca_params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| err(e.to_string()))?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Pushgate development CA");
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(|e| err(e.to_string()))?;
    let key = rcgen::KeyPair::generate().map_err(|e| err(e.to_string()))?;
    let params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .map_err(|e| err(e.to_string()))?;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| err(e.to_string()))?;
    std::fs::write(tmp.join("ca.pem"), ca.pem()).map_err(|e| err(e.to_string()))?;
    std::fs::write(tmp.join("server.pem"), cert.pem()).map_err(|e| err(e.to_string()))?;
    std::fs::write(tmp.join("server.key"), key.serialize_pem()).map_err(|e| err(e.to_string()))?;
    // rename(2) replaces a missing or empty folder atomically and fails on a non-empty one
    if std::fs::rename(&tmp, dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        for _ in 0..100 {
            if out.ca.exists() && out.cert.exists() && out.key.exists() {
                return Ok(out);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        return Err(err(
            "another process left an incomplete certificate folder".into()
        ));
    }
    Ok(out)
}
