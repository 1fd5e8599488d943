//! Local stand-ins of the four push providers (feature `stand-ins`), for tests and the bench.
//!
//! Each speaks its provider's real protocol over TLS with a development CA (the bridge trusts
//! it through `extra_ca_files`), checks what the real service would refuse (signatures of
//! provider tokens and OAuth assertions, required headers, the Web Push encryption, which it
//! decrypts), records what it received, and answers either as the service does on success
//! or with answers a test scripted per device token. A stand-in stops when dropped.

mod apns;
mod fcm;
mod hms;
mod webpush;

pub use apns::ApnsStandIn;
pub use fcm::FcmStandIn;
pub use hms::HmsStandIn;
pub use webpush::WebPushStandIn;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls::server::danger::ClientCertVerifier;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::clients::lock;

/// Why a stand-in could not start.
#[derive(Debug, thiserror::Error)]
pub enum StandInError {
    #[error("stand-in TLS material: {0}")]
    Tls(String),
    #[error("stand-in listener: {0}")]
    Io(#[from] std::io::Error),
}

/// The development CA and a server certificate for `localhost` and `127.0.0.1` that every
/// stand-in serves.
pub struct Pki {
    /// The CA's PEM file: put it into `BridgeSettings::extra_ca_files`.
    pub ca_file: String,
    chain: Vec<CertificateDer<'static>>,
    key_pem: Vec<u8>,
}

impl Pki {
    /// Creates (or reuses) the files in `dir` with [`pushgate_runtime::tls::dev_certs`].
    pub fn create(dir: &Path) -> Result<Pki, StandInError> {
        let certs = pushgate_runtime::tls::dev_certs(dir, &["localhost", "127.0.0.1"])
            .map_err(|e| StandInError::Tls(e.to_string()))?;
        let chain = CertificateDer::pem_file_iter(&certs.cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| StandInError::Tls(format!("server certificate: {e}")))?;
        let key_pem = std::fs::read(&certs.key)?;
        Ok(Pki {
            ca_file: certs.ca.display().to_string(),
            chain,
            key_pem,
        })
    }

    fn server_config(
        &self,
        alpn: &[&[u8]],
        client_auth: Option<Arc<dyn ClientCertVerifier>>,
    ) -> Result<Arc<ServerConfig>, StandInError> {
        pushgate_runtime::tls::install_crypto_provider();
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| StandInError::Tls(format!("server key: {e}")))?;
        let builder = ServerConfig::builder();
        let builder = match client_auth {
            Some(v) => builder.with_client_cert_verifier(v),
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder
            .with_single_cert(self.chain.clone(), key)
            .map_err(|e| StandInError::Tls(e.to_string()))?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

/// An answer for a stand-in to give instead of its own.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    /// A JSON answer.
    pub fn json(status: u16, body: Value) -> Answer {
        Answer {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    /// An answer without a body.
    pub fn empty(status: u16) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds `Retry-After: secs`.
    pub fn retry_after(mut self, secs: u64) -> Answer {
        self.headers.push(("retry-after".into(), secs.to_string()));
        self
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut headers = HeaderMap::new();
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::try_from(k.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                headers.append(k, v);
            }
        }
        (status, headers, self.body).into_response()
    }
}

/// One request a stand-in received, with what its checks found.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request path.
    pub path: String,
    /// Request headers (lowercase names; the last value of repeated ones).
    pub headers: BTreeMap<String, String>,
    /// The JSON body; for Web Push the decrypted payload.
    pub body: Value,
    /// Who the stand-in verified the request came from (`token TEAM/KEY`, `certificate
    /// BUNDLE`, `bearer PROJECT`, `vapid AUD`); empty when verification failed.
    pub auth: String,
    /// Whether it came over HTTP/2.
    pub http2: bool,
    /// The stand-in's verdict: `None` when the request passed every check, else the error it
    /// answered with.
    pub rejected: Option<String>,
}

impl Received {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

fn header_map(h: &HeaderMap) -> BTreeMap<String, String> {
    h.iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// Scripted answers by key (device token or subscription), and what was received.
#[derive(Default)]
struct Log {
    scripts: Mutex<HashMap<String, VecDeque<Answer>>>,
    received: Mutex<Vec<Received>>,
    /// Off for the bench: a stand-in then only counts.
    quiet: std::sync::atomic::AtomicBool,
    accepted: std::sync::atomic::AtomicU64,
}

impl Log {
    fn script(&self, key: &str, answers: impl IntoIterator<Item = Answer>) {
        lock(&self.scripts)
            .entry(key.to_string())
            .or_default()
            .extend(answers);
    }

    fn next(&self, key: &str) -> Option<Answer> {
        lock(&self.scripts)
            .get_mut(key)
            .and_then(VecDeque::pop_front)
    }

    /// Whether received requests are kept (building a [`Received`] costs more than the
    /// checks; the bench turns it off).
    fn recording(&self) -> bool {
        !self.quiet.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn record(&self, r: Received) {
        if self.recording() {
            lock(&self.received).push(r);
        }
    }

    fn accepted(&self) {
        self.accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn received(&self) -> Vec<Received> {
        lock(&self.received).clone()
    }
}

/// The client certificate of the connection a request came on (DER), for APNs certificate
/// authentication.
#[derive(Clone, Default)]
struct PeerCert(Option<Vec<u8>>);

/// A running stand-in server.
struct Served {
    url: String,
    _stop: DropGuard,
}

/// Serves `router` over TLS on a free loopback port until dropped.
async fn serve(config: Arc<ServerConfig>, router: Router) -> Result<Served, StandInError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
    let stop = CancellationToken::new();
    let shutdown = stop.clone();
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let router = router.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = PeerCert(
                    tls.get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec()),
                );
                let service = TowerToHyperService::new(router.layer(Extension(peer)));
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // like APNs, which allows up to 1000 concurrent streams per connection
                builder.http2().max_concurrent_streams(1000);
                let conn = builder.serve_connection(TokioIo::new(tls), service);
                tokio::select! {
                    _ = conn => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    });
    Ok(Served {
        url,
        _stop: stop.drop_guard(),
    })
}

/// Seconds since the epoch.
fn unix_now() -> i64 {
    crate::clients::unix_now()
}

/// The bearer token of an `Authorization` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}
