//! What Pushgate's integration tests share.
//!
//! - [`TestEnv`]: the whole suite started in-process against the real NATS and Redis
//!   (`PUSHGATE_TEST_NATS_URL`, `PUSHGATE_TEST_REDIS_URL`, defaulting to the local servers),
//!   in a namespace of its own so tests run in parallel without seeing each other.
//! - [`device::TestDevice`]: a real XMPP client over TCP (STARTTLS, SCRAM-SHA-256, bind).
//! - [`webhook::Receiver`]: a local webhook endpoint that records what it receives.

pub mod device;
pub mod webhook;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use pushgate::{Suite, SuiteSettings};
use pushgate_bus::Bus;
use pushgate_runtime::tls::DevCerts;
use pushgate_runtime::Metrics;
use pushgate_store::Store;
use serde_json::{json, Value};

/// The admin token of test suites.
pub const ADMIN_TOKEN: &str = "adm_test_token_0123456789abcdef";

/// NATS URL for tests.
pub fn nats_url() -> String {
    std::env::var("PUSHGATE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Redis URL for tests.
pub fn redis_url() -> String {
    std::env::var("PUSHGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A fresh namespace: `t` + 10 hex characters.
pub fn unique_namespace() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// Development certificates shared by the tests of one process.
pub fn certs() -> anyhow::Result<DevCerts> {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        std::env::temp_dir().join(format!("pushgate-test-certs-{}", std::process::id()))
    });
    Ok(pushgate_runtime::tls::dev_certs(
        dir,
        &["localhost", "127.0.0.1", "pushgate.test"],
    )?)
}

/// Settings for an in-process suite on ephemeral ports.
pub fn suite_settings(namespace: &str, nats: &str) -> anyhow::Result<SuiteSettings> {
    let c = certs()?;
    let mut s = SuiteSettings::default();
    s.common.nats_url = nats.to_string();
    s.common.redis_url = redis_url();
    s.common.namespace = namespace.to_string();
    s.common.xmpp_domain = "pushgate.test".into();
    s.common.device_secret = "test-device-secret-0123456789abcdef".into();
    s.ingress.listen = "127.0.0.1:0".into();
    s.ingress.ops_listen = "127.0.0.1:0".into();
    s.ingress.tls_cert = c.cert.clone();
    s.ingress.tls_key = c.key.clone();
    s.ingress.admin_token = ADMIN_TOKEN.into();
    s.router.ops_listen = "127.0.0.1:0".into();
    s.router.clock_tick_ms = 50;
    s.edge.starttls_listen = "127.0.0.1:0".into();
    s.edge.direct_tls_listen = "127.0.0.1:0".into();
    s.edge.websocket_listen = "127.0.0.1:0".into();
    s.edge.ops_listen = "127.0.0.1:0".into();
    s.edge.tls_cert = c.cert.clone();
    s.edge.tls_key = c.key;
    s.bridge.ops_listen = "127.0.0.1:0".into();
    s.sms.ops_listen = "127.0.0.1:0".into();
    s.sms.dlr_listen = "127.0.0.1:0".into();
    s.sms.allow_http_providers = true;
    s.webhook.max_delay_ms = 50;
    s.webhook.initial_backoff_ms = 100;
    Ok(s)
}

/// An HTTP client that trusts the test CA.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    pushgate_runtime::tls::install_crypto_provider();
    let pem = std::fs::read(certs()?.ca)?;
    let ca = reqwest::Certificate::from_pem(&pem)?;
    Ok(reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(20))
        .build()?)
}

/// The suite running in-process against real NATS and Redis.
pub struct TestEnv {
    pub namespace: String,
    pub bus: Bus,
    pub store: Store,
    pub suite: Option<Suite>,
    pub settings: SuiteSettings,
    pub http: reqwest::Client,
    pub api: String,
}

impl TestEnv {
    /// Starts the suite in a fresh namespace.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Starts the suite after letting the test adjust the settings.
    pub async fn start_with(adjust: impl FnOnce(&mut SuiteSettings)) -> anyhow::Result<Self> {
        Self::start_on(&nats_url(), adjust).await
    }

    /// Starts the suite against a given NATS server.
    pub async fn start_on(
        nats: &str,
        adjust: impl FnOnce(&mut SuiteSettings),
    ) -> anyhow::Result<Self> {
        let namespace = unique_namespace();
        let mut settings = suite_settings(&namespace, nats)?;
        adjust(&mut settings);
        let bus = Bus::connect(nats, &namespace)
            .await
            .context("NATS for tests")?
            .with_batch_linger(settings.common.batch_linger());
        let store = Store::connect(&settings.common.redis_url, &namespace)
            .await
            .context("Redis for tests")?;
        let suite =
            Suite::start(settings.clone(), bus.clone(), store.clone(), Metrics::new()).await?;
        let api = format!("https://localhost:{}", suite.addresses.api.port());
        Ok(TestEnv {
            namespace,
            bus,
            store,
            suite: Some(suite),
            settings,
            http: http_client()?,
            api,
        })
    }

    /// The XMPP STARTTLS address.
    pub fn xmpp_addr(&self) -> std::net::SocketAddr {
        self.suite
            .as_ref()
            .map(|s| s.addresses.xmpp_starttls)
            .unwrap_or_else(|| ([127, 0, 0, 1], 0).into())
    }

    /// The XMPP over WebSocket (RFC 7395) address.
    pub fn websocket_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.suite
            .as_ref()
            .and_then(|s| s.addresses.xmpp_websocket)
            .context("the WebSocket listener is not running")
    }

    /// Creates an app; returns `(app_id, api_key)`.
    pub async fn create_app(&self, webhook_url: Option<&str>) -> anyhow::Result<(String, String)> {
        let mut body = json!({"name": "test app"});
        if let Some(u) = webhook_url {
            body["webhook"] = json!({"url": u, "secret": "test-webhook-secret-123"});
        }
        let r = self
            .http
            .post(format!("{}/v1/apps", self.api))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await?;
        if r.status() != 201 {
            bail!(
                "create app: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        let v: Value = r.json().await?;
        Ok((str_field(&v, "app_id")?, str_field(&v, "api_key")?))
    }

    /// Registers a device; returns `(jid, password)`.
    pub async fn register_device(
        &self,
        key: &str,
        user: &str,
        device: &str,
        body: Value,
    ) -> anyhow::Result<(String, String)> {
        let r = self
            .http
            .put(format!("{}/v1/users/{user}/devices/{device}", self.api))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "register device: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        let v: Value = r.json().await?;
        Ok((
            str_field(&v["xmpp"], "jid")?,
            str_field(&v["xmpp"], "password")?,
        ))
    }

    /// `POST /v1/messages`; returns status and JSON body.
    pub async fn send(&self, key: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}/v1/messages", self.api))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Sends one text to a user's devices; returns the message id (fails unless 202).
    pub async fn send_text(&self, key: &str, user: &str, text: &str) -> anyhow::Result<String> {
        let (status, body) = self
            .send(
                key,
                serde_json::json!({"recipients": [{"user_id": user}], "text": text}),
            )
            .await?;
        anyhow::ensure!(status == 202, "send: {status} {body}");
        body["messages"][0]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("no message id in {body}"))
    }

    /// `GET /v1/messages/{id}`.
    pub async fn message(&self, key: &str, id: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .get(format!("{}/v1/messages/{id}", self.api))
            .bearer_auth(key)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Polls a message until its status is `want` (or the deadline passes).
    pub async fn wait_status(&self, key: &str, id: &str, want: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = self.message(key, id).await?;
            if v["status"] == want {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("message {id} did not reach {want}: {v}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the suite and deletes the namespace's streams and keys.
    pub async fn stop(mut self) {
        if let Some(s) = self.suite.take() {
            s.stop().await;
        }
        let _ = self.bus.delete_namespace().await;
        let _ = self.store.delete_namespace().await;
    }
}

fn str_field(v: &Value, k: &str) -> anyhow::Result<String> {
    v[k].as_str()
        .map(str::to_string)
        .with_context(|| format!("missing {k} in {v}"))
}

/// Reads the test CA as a rustls root store.
pub fn root_store() -> anyhow::Result<Arc<rustls::RootCertStore>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(certs()?.ca)? {
        roots.add(c?)?;
    }
    Ok(Arc::new(roots))
}
