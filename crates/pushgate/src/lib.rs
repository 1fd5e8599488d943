//! The whole suite in one process.
//!
//! Production runs each service as its own deployment (see helm/); a laptop, a CI job or an
//! integration test runs them together with [`Suite::start`], sharing one NATS connection and
//! one Redis connection. The services do not know the difference: they only talk through NATS
//! and Redis, exactly as they do when deployed apart.

use std::net::SocketAddr;
use std::sync::Arc;

use pushgate_bus::Bus;
use pushgate_runtime::{CommonSettings, Metrics};
use pushgate_store::Store;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// One settings file for every service (each section is what that service's own binary reads).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SuiteSettings {
    pub common: CommonSettings,
    pub ingress: ingress_api::IngressSettings,
    pub router: router::RouterSettings,
    pub edge: xmpp_edge::EdgeSettings,
    pub bridge: native_push_bridge::BridgeSettings,
    pub sms: sms_fallback::SmsSettings,
    pub webhook: receipt_webhook::WebhookSettings,
    /// Leave the router out (tests that run and kill routers themselves). Not a setting.
    #[serde(skip)]
    pub without_router: bool,
}

/// Errors starting the suite.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error(transparent)]
    Config(#[from] pushgate_runtime::ConfigError),
    #[error("ingress-api: {0}")]
    Ingress(#[from] ingress_api::IngressError),
    #[error("router: {0}")]
    Router(#[from] router::RouterError),
    #[error("xmpp-edge: {0}")]
    Edge(#[from] xmpp_edge::EdgeError),
    #[error("native-push-bridge: {0}")]
    Bridge(#[from] native_push_bridge::BridgeError),
    #[error("sms-fallback: {0}")]
    Sms(#[from] sms_fallback::SmsError),
    #[error("receipt-webhook: {0}")]
    Webhook(#[from] receipt_webhook::WebhookError),
}

/// Where the running suite listens.
#[derive(Debug, Clone)]
pub struct Addresses {
    pub api: SocketAddr,
    pub xmpp_starttls: SocketAddr,
    pub xmpp_direct_tls: Option<SocketAddr>,
    /// XMPP over WebSocket (RFC 7395), `wss://{addr}/xmpp-websocket`.
    pub xmpp_websocket: Option<SocketAddr>,
    pub edge_id: String,
}

/// A running suite.
pub struct Suite {
    pub addresses: Addresses,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Suite {
    /// Validates every section, builds every service (binding its listeners) and starts them.
    pub async fn start(
        settings: SuiteSettings,
        bus: Bus,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Suite, SuiteError> {
        settings.common.validate()?;
        let shutdown = CancellationToken::new();
        let ingress = ingress_api::Service::build(
            settings.common.clone(),
            settings.ingress.clone(),
            bus.clone(),
            store.clone(),
            metrics.clone(),
        )
        .await?;
        let router = router::Service::build(
            settings.router.clone(),
            bus.clone(),
            store.clone(),
            metrics.clone(),
        )
        .await?;
        let edge = xmpp_edge::Service::build(
            &settings.common,
            settings.edge.clone(),
            bus.clone(),
            store.clone(),
            metrics.clone(),
        )
        .await?;
        let bridge = native_push_bridge::Service::build(
            settings.bridge.clone(),
            bus.clone(),
            store.clone(),
            metrics.clone(),
        )
        .await?;
        let sms = sms_fallback::Service::build(
            settings.sms.clone(),
            bus.clone(),
            store.clone(),
            metrics.clone(),
        )
        .await?;
        let webhook = receipt_webhook::Service::build(
            receipt_webhook::Settings {
                common: settings.common.clone(),
                webhook: settings.webhook.clone(),
            },
            metrics.clone(),
            bus.clone(),
            store.clone(),
        )
        .await?;
        let addresses = Addresses {
            api: ingress.api_addr(),
            xmpp_starttls: edge.starttls_addr(),
            xmpp_direct_tls: edge.direct_tls_addr(),
            xmpp_websocket: edge.websocket_addr(),
            edge_id: edge.edge_id().to_string(),
        };
        let mut tasks = JoinSet::new();
        let sd = shutdown.clone();
        tasks.spawn(async move { ingress.run_until(sd).await });
        if !settings.without_router {
            let sd = shutdown.clone();
            tasks.spawn(async move { router.run_until(sd).await });
        }
        let sd = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = edge.run_until(sd).await {
                tracing::error!(error = %e, "xmpp-edge stopped");
            }
        });
        let sd = shutdown.clone();
        tasks.spawn(async move { bridge.run_until(sd).await });
        let sd = shutdown.clone();
        tasks.spawn(async move { sms.run_until(sd).await });
        let sd = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = webhook.run_until(sd).await {
                tracing::error!(error = %e, "receipt-webhook stopped");
            }
        });
        Ok(Suite {
            addresses,
            shutdown,
            tasks,
        })
    }

    /// A token that stops the suite when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops every service and waits for them to drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Waits until the suite stops (after its shutdown token is cancelled).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}
