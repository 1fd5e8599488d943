//! The server under test: the Pushgate suite started in this process (fresh namespace, removed
//! afterwards), a running suite reached by its API and XMPP addresses, or a Prosody the bench
//! starts for comparison (`--target prosody`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use pushgate::{Suite, SuiteSettings};
use pushgate_bus::Bus;
use pushgate_runtime::Metrics;
use pushgate_store::Store;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::api::Api;
use crate::cli::{Args, TargetKind};
use crate::prosody;

/// Timeout of one HTTP request; a send that takes longer counts as an error.
const HTTP_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the server is and how to talk to it.
pub struct Target {
    pub xmpp: SocketAddr,
    pub tls: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    /// Process whose RSS counts as the edge's (`None`: this process): `--edge-pid`, or
    /// Prosody.
    pub edge_pid: Option<u32>,
    pub description: String,
    pub backend: Backend,
}

/// What is behind the XMPP address.
pub enum Backend {
    /// The Pushgate suite: messages go in through its HTTP API.
    Pushgate {
        api: Arc<Api>,
        admin_token: String,
        local: Option<Box<Local>>,
    },
    /// A Prosody started for this run: messages go in through XMPP sender sessions.
    Prosody(Box<prosody::Server>),
}

/// An in-process suite and its namespace's connections (to remove the namespace afterwards).
pub struct Local {
    suite: Suite,
    bus: Bus,
    store: Store,
}

fn client_config(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl Target {
    /// Starts or reaches the server, as the arguments say.
    pub async fn open(args: &Args) -> anyhow::Result<Self> {
        pushgate_runtime::tls::install_crypto_provider();
        match (args.target, &args.api) {
            (TargetKind::Prosody, _) => Self::start_prosody(args).await,
            (TargetKind::Pushgate, None) => Self::start_local(args).await,
            (TargetKind::Pushgate, Some(api)) => Self::remote(args, api).await,
        }
    }

    async fn start_prosody(args: &Args) -> anyhow::Result<Self> {
        let server = prosody::Server::start(
            args.prosody_bin.as_deref(),
            args.prosody_auth(),
            args.devices,
            args.senders(),
            args.prosody_nodelay,
            args.prosody_keep_dir,
        )
        .await?;
        let roots = match read_roots(&server.ca) {
            Ok(r) => r,
            Err(e) => {
                server.stop().await;
                return Err(e);
            }
        };
        Ok(Target {
            xmpp: server.addr,
            tls: client_config(roots),
            server_name: ServerName::try_from(prosody::DOMAIN)?,
            edge_pid: Some(server.pid),
            description: format!(
                "Prosody {} (pid {}) on {}, {}{}, files in {}",
                server.version.as_deref().unwrap_or("?"),
                server.pid,
                server.addr,
                server.auth.provider(),
                if server.nodelay { ", Nagle off" } else { "" },
                server.dir().display()
            ),
            backend: Backend::Prosody(Box::new(server)),
        })
    }

    async fn start_local(args: &Args) -> anyhow::Result<Self> {
        let namespace = pushgate_testkit::unique_namespace();
        let nats = args.nats.clone().unwrap_or_else(pushgate_testkit::nats_url);
        let mut s = pushgate_testkit::suite_settings(&namespace, &nats)?;
        if let Some(redis) = &args.redis {
            s.common.redis_url = redis.clone();
        }
        if let Some(linger) = args.batch_linger_us {
            s.common.batch_linger_us = linger;
        }
        // the bench sets the pace; the per-app request limit would cap it at 1000 requests/s
        s.ingress.rate_limit_per_app = 0;
        // the test settings shorten webhook batching and the router clock for fast tests;
        // measure with the production defaults instead
        let defaults = SuiteSettings::default();
        s.webhook.max_delay_ms = defaults.webhook.max_delay_ms;
        s.webhook.initial_backoff_ms = defaults.webhook.initial_backoff_ms;
        s.router.clock_tick_ms = defaults.router.clock_tick_ms;
        let bus = Bus::connect(&nats, &namespace)
            .await
            .with_context(|| format!("NATS at {nats} (start it with scripts/up.sh)"))?
            .with_batch_linger(s.common.batch_linger());
        let store = Store::connect(&s.common.redis_url, &namespace)
            .await
            .with_context(|| format!("Redis at {}", s.common.redis_url))?;
        let suite = Suite::start(s.clone(), bus.clone(), store.clone(), Metrics::new())
            .await
            .context("starting the suite in-process")?;
        let pem = std::fs::read(pushgate_testkit::certs()?.ca)?;
        let api = Arc::new(Api::new(
            http_client(&pem, args.http1)?,
            &format!("https://localhost:{}", suite.addresses.api.port()),
        ));
        let roots = Arc::unwrap_or_clone(pushgate_testkit::root_store()?);
        let name = args.tls_name.clone().unwrap_or_else(|| "localhost".into());
        Ok(Target {
            xmpp: suite.addresses.xmpp_starttls,
            tls: client_config(roots),
            server_name: ServerName::try_from(name.clone())
                .with_context(|| format!("{name:?} is not a TLS server name"))?,
            edge_pid: None,
            description: format!(
                "in-process suite, namespace {namespace}, NATS {nats}, batch linger {} µs, {}, {}",
                s.common.batch_linger_us,
                http_version(args.http1),
                clients(args.client_threads)
            ),
            backend: Backend::Pushgate {
                api,
                admin_token: pushgate_testkit::ADMIN_TOKEN.to_string(),
                local: Some(Box::new(Local { suite, bus, store })),
            },
        })
    }

    async fn remote(args: &Args, api: &str) -> anyhow::Result<Self> {
        let (Some(token), Some(ca), Some(xmpp)) = (&args.admin_token, &args.ca, &args.xmpp) else {
            bail!("--api needs --admin-token, --ca and --xmpp");
        };
        let roots = read_roots(ca)?;
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        let http = http_client(&pem, args.http1)?;
        let addr = tokio::net::lookup_host(xmpp.as_str())
            .await
            .with_context(|| format!("resolving {xmpp}"))?
            .next()
            .with_context(|| format!("{xmpp} resolves to nothing"))?;
        let host = match xmpp.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
            None => bail!("--xmpp must be HOST:PORT"),
        };
        let name = args.tls_name.clone().unwrap_or(host);
        Ok(Target {
            xmpp: addr,
            tls: client_config(roots),
            server_name: ServerName::try_from(name.clone())
                .with_context(|| format!("{name:?} is not a TLS server name"))?,
            edge_pid: args.edge_pid,
            description: format!(
                "running suite at {api}, XMPP {addr}, {}",
                http_version(args.http1)
            ),
            backend: Backend::Pushgate {
                api: Arc::new(Api::new(http, api)),
                admin_token: token.clone(),
                local: None,
            },
        })
    }

    /// Whether the suite runs in this process.
    pub fn in_process(&self) -> bool {
        matches!(self.backend, Backend::Pushgate { local: Some(_), .. })
    }

    /// `pushgate` or `prosody`.
    pub fn kind(&self) -> TargetKind {
        match self.backend {
            Backend::Pushgate { .. } => TargetKind::Pushgate,
            Backend::Prosody(_) => TargetKind::Prosody,
        }
    }

    /// Stops an in-process suite and removes its namespace's streams and keys, or stops
    /// Prosody and removes its directory; a running suite is left as it is (the bench's app
    /// and devices stay in it).
    pub async fn close(self) {
        match self.backend {
            Backend::Pushgate { local: Some(l), .. } => {
                l.suite.stop().await;
                if let Err(e) = l.bus.delete_namespace().await {
                    eprintln!("warning: cannot delete the bench's NATS streams: {e}");
                }
                if let Err(e) = l.store.delete_namespace().await {
                    eprintln!("warning: cannot delete the bench's Redis keys: {e}");
                }
            }
            Backend::Pushgate { local: None, .. } => {}
            Backend::Prosody(server) => server.stop().await,
        }
    }
}

/// The certificates of a PEM file as trust anchors.
fn read_roots(ca: &std::path::Path) -> anyhow::Result<rustls::RootCertStore> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(c.with_context(|| format!("{} is not PEM certificates", ca.display()))?)
            .context("adding the CA")?;
    }
    Ok(roots)
}

/// The API client: trusting the CA in `pem`; HTTP/1.1 only with `http1`, else HTTP/2 when
/// the server offers it.
fn http_client(pem: &[u8], http1: bool) -> anyhow::Result<reqwest::Client> {
    pushgate_runtime::tls::install_crypto_provider();
    let b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pem)?])
        .timeout(HTTP_TIMEOUT);
    let b = if http1 { b.http1_only() } else { b };
    Ok(b.build()?)
}

/// How the API client talks, for the report.
fn http_version(http1: bool) -> &'static str {
    if http1 {
        "HTTP/1.1 (one connection per request in flight)"
    } else {
        "HTTP/2 (requests as streams of one connection)"
    }
}

/// Where the bench's clients run, for the report.
fn clients(threads: usize) -> String {
    match threads {
        0 => "clients on the suite's runtime".into(),
        1 => "clients on a thread of their own".into(),
        n => format!("clients on {n} threads of their own"),
    }
}
