//! native-push-bridge: sends native pushes (APNs, FCM, HMS, Web Push) for the router and turns
//! the providers' answers into status changes, token invalidations, retries and metrics.
//!
//! The **consumer** takes [`PushRequest`](pushgate_bus::payloads::PushRequest)s from the
//! durable JetStream consumer `bridge` (explicit ack; a killed instance's unacked work is
//! redelivered to another). Handling is in [`worker`], the push record that keeps it to one
//! push per message and device in [`record`], and the frame protocol clients implement in
//! [`provider`].
//!
//! [`Service::build`] registers the real protocol clients ([`clients`]): APNs, FCM HTTP v1,
//! HMS Push Kit and Web Push, each with per-app credentials from `App.providers` (cached per
//! app until the app's `updated_at` changes) and every upstream URL a setting.
//! [`Service::build_with_providers`] takes any other registry (tests, or a build without some
//! providers); a channel without a client answers "no provider configured".
//!
//! With the `stand-ins` feature, [`testing`] has local servers that speak the four protocols
//! (and check signatures, headers and encryption) for tests and the bench.

pub mod clients;
mod limits;
pub mod provider;
pub mod record;
#[cfg(feature = "stand-ins")]
pub mod testing;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use pushgate_bus::{Bus, ConsumerName};
use pushgate_runtime::outbox::Outbox;
use pushgate_runtime::{CommonSettings, ConfigError, Metrics};
use pushgate_store::Store;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use tokio_util::sync::CancellationToken;

pub use provider::{
    AppCredentials, Notification, NotificationKind, Provider, ProviderAccepted, ProviderError,
    Providers,
};

use crate::limits::AppLimits;
use crate::record::Records;

/// Longest send timeout allowed: the consumer's ack wait is 15 s, and an attempt must end well
/// before JetStream hands the same request to another instance.
const MAX_SEND_TIMEOUT_MS: u64 = 12_000;

/// Settings of the bridge (`[bridge]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct BridgeSettings {
    /// Plain-HTTP operations listener (internal only).
    pub ops_listen: String,
    /// Push requests handled at once by this instance.
    pub concurrency: usize,
    /// How long one provider call may take; past it the outcome counts as unknown and the push
    /// is not repeated.
    pub send_timeout_ms: u64,
    /// First retry delay after a retryable provider answer; doubles per attempt (with jitter).
    pub retry_base_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
    /// Provider calls in flight for one app at most; further requests of that app go back to
    /// the bus for a moment, so one slow or bursting app cannot take every `concurrency` slot.
    pub max_in_flight_per_app: usize,
    /// APNs production base URL.
    pub apns_url: String,
    /// APNs sandbox base URL, for apps whose APNs settings say `"environment": "sandbox"`.
    pub apns_sandbox_url: String,
    /// FCM HTTP v1 base URL (the OAuth token URL is the service account's `token_uri`).
    pub fcm_url: String,
    /// HMS Push Kit base URL.
    pub hms_url: String,
    /// HMS OAuth 2.0 token URL.
    pub hms_token_url: String,
    /// PEM files of CAs trusted besides the system's, for every provider connection (a
    /// private gateway in front of the providers, or the stand-ins' dev CA in tests).
    pub extra_ca_files: Vec<String>,
}

impl Default for BridgeSettings {
    fn default() -> Self {
        BridgeSettings {
            ops_listen: "127.0.0.1:9104".into(),
            concurrency: 256,
            send_timeout_ms: 10_000,
            retry_base_ms: 1_000,
            retry_max_ms: 300_000,
            max_in_flight_per_app: 100,
            apns_url: "https://api.push.apple.com".into(),
            apns_sandbox_url: "https://api.sandbox.push.apple.com".into(),
            fcm_url: "https://fcm.googleapis.com".into(),
            hms_url: "https://push-api.cloud.huawei.com".into(),
            hms_token_url: "https://oauth-login.cloud.huawei.com/oauth2/v3/token".into(),
            extra_ca_files: Vec::new(),
        }
    }
}

impl BridgeSettings {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.ops_listen.parse::<SocketAddr>().map_err(|e| {
            ConfigError::invalid("bridge.ops_listen", format!("{:?}: {e}", self.ops_listen))
        })?;
        if self.concurrency == 0 {
            return Err(ConfigError::invalid(
                "bridge.concurrency",
                "must be at least 1",
            ));
        }
        if !(100..=MAX_SEND_TIMEOUT_MS).contains(&self.send_timeout_ms) {
            return Err(ConfigError::invalid(
                "bridge.send_timeout_ms",
                format!("must be 100-{MAX_SEND_TIMEOUT_MS} (an attempt must end before the bus redelivers it)"),
            ));
        }
        if self.retry_base_ms == 0 {
            return Err(ConfigError::invalid(
                "bridge.retry_base_ms",
                "must be at least 1",
            ));
        }
        if self.retry_max_ms < self.retry_base_ms {
            return Err(ConfigError::invalid(
                "bridge.retry_max_ms",
                "must be at least bridge.retry_base_ms",
            ));
        }
        if self.max_in_flight_per_app == 0 {
            return Err(ConfigError::invalid(
                "bridge.max_in_flight_per_app",
                "must be at least 1",
            ));
        }
        for (key, value) in [
            ("bridge.apns_url", &self.apns_url),
            ("bridge.apns_sandbox_url", &self.apns_sandbox_url),
            ("bridge.fcm_url", &self.fcm_url),
            ("bridge.hms_url", &self.hms_url),
            ("bridge.hms_token_url", &self.hms_token_url),
        ] {
            check_url(key, value)?;
        }
        if let Some(empty) = self.extra_ca_files.iter().position(|p| p.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "bridge.extra_ca_files",
                format!("entry {empty} is empty"),
            ));
        }
        Ok(())
    }
}

/// A provider URL: absolute http(s), no query or fragment (paths are appended to it).
/// Plain http is allowed for a local gateway; production URLs are https.
fn check_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let u =
        url::Url::parse(value).map_err(|e| ConfigError::invalid(key, format!("{value:?}: {e}")))?;
    if !matches!(u.scheme(), "https" | "http") || u.host().is_none() {
        return Err(ConfigError::invalid(
            key,
            format!("{value:?}: must be an http(s) URL with a host"),
        ));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(ConfigError::invalid(
            key,
            format!("{value:?}: must not have a query or fragment"),
        ));
    }
    Ok(())
}

/// Settings file of the bridge binary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub common: CommonSettings,
    pub bridge: BridgeSettings,
}

/// Errors of the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] pushgate_store::StoreError),
    #[error("device record {0} keeps changing; cannot mark its token invalid yet")]
    DeviceContended(String),
    #[error("cannot use CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
}

/// What every handler shares.
pub(crate) struct Ctx {
    pub settings: BridgeSettings,
    pub bus: Bus,
    pub store: Store,
    pub outbox: Outbox,
    pub metrics: Arc<Metrics>,
    pub providers: Providers,
    pub records: Records,
    /// Bound of provider calls in flight per app.
    pub app_limits: AppLimits,
    /// Names this instance in push claims (for logs when another instance finds one).
    pub instance: String,
}

/// A built bridge.
pub struct Service {
    ctx: Arc<Ctx>,
    ops: TcpListener,
}

impl Service {
    /// Validates settings, builds the real protocol clients (APNs, FCM, HMS, Web Push) and
    /// binds the operations listener.
    pub async fn build(
        settings: BridgeSettings,
        bus: Bus,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Service, BridgeError> {
        settings.validate()?;
        let providers = clients::providers(&settings).await?;
        Self::build_with_providers(settings, bus, store, metrics, providers).await
    }

    /// Like [`Service::build`], with protocol clients keyed by channel name.
    pub async fn build_with_providers(
        settings: BridgeSettings,
        bus: Bus,
        store: Store,
        metrics: Arc<Metrics>,
        providers: Providers,
    ) -> Result<Service, BridgeError> {
        settings.validate()?;
        let ops = TcpListener::bind(&settings.ops_listen)
            .await
            .map_err(|source| BridgeError::Bind {
                addr: settings.ops_listen.clone(),
                source,
            })?;
        if providers.is_empty() {
            tracing::warn!("no native push providers in this build; push requests are answered as unconfigured");
        }
        let outbox = Outbox::new(bus.clone(), store.clone(), metrics.clone());
        let records = Records::new(store.clone());
        let app_limits = AppLimits::new(settings.max_in_flight_per_app);
        let instance = format!("bridge-{}", uuid::Uuid::new_v4().simple());
        Ok(Service {
            ctx: Arc::new(Ctx {
                settings,
                bus,
                store,
                outbox,
                metrics,
                providers,
                records,
                app_limits,
                instance,
            }),
            ops,
        })
    }

    /// The bound operations address.
    pub fn ops_addr(&self) -> SocketAddr {
        pushgate_runtime::ops::local_addr(&self.ops)
    }

    /// Runs the consumer and the operations listener until `shutdown`; in-flight requests
    /// finish (or stay unacked and are redelivered), nothing is acked that was not handled.
    pub async fn run_until(self, shutdown: CancellationToken) {
        let ops = pushgate_runtime::ops::spawn(
            self.ops,
            &self.ctx.bus,
            &self.ctx.store,
            &self.ctx.metrics,
            shutdown.clone(),
        );
        consume_loop(self.ctx.clone(), shutdown.clone()).await;
        match ops.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "operations listener failed"),
            Err(e) => tracing::error!(error = %e, "operations listener task failed"),
        }
    }
}

/// Takes requests from the durable consumer; when NATS goes away (restart, network) it asks
/// for the consumer again until it is back.
async fn consume_loop(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let concurrency = ctx.settings.concurrency;
    let bus = ctx.bus.clone();
    pushgate_bus::consume(
        &bus,
        ConsumerName::Bridge,
        concurrency,
        shutdown,
        move |msg| {
            let ctx = ctx.clone();
            async move { worker::handle_delivery(&ctx, msg).await }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(s: &BridgeSettings) -> String {
        s.validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn defaults_are_valid() {
        let s = BridgeSettings::default();
        assert!(s.validate().is_ok());
        assert_eq!(s.ops_listen, "127.0.0.1:9104");
    }

    #[test]
    fn validation_names_the_setting() {
        let ok = BridgeSettings::default();
        assert!(err_of(&BridgeSettings {
            ops_listen: "x".into(),
            ..ok.clone()
        })
        .contains("bridge.ops_listen"));
        assert!(err_of(&BridgeSettings {
            concurrency: 0,
            ..ok.clone()
        })
        .contains("bridge.concurrency"));
        assert!(err_of(&BridgeSettings {
            send_timeout_ms: 15_000,
            ..ok.clone()
        })
        .contains("bridge.send_timeout_ms"));
        assert!(err_of(&BridgeSettings {
            retry_base_ms: 0,
            ..ok.clone()
        })
        .contains("bridge.retry_base_ms"));
        assert!(err_of(&BridgeSettings {
            retry_max_ms: 1,
            retry_base_ms: 2,
            ..ok.clone()
        })
        .contains("bridge.retry_max_ms"));
        assert!(err_of(&BridgeSettings {
            max_in_flight_per_app: 0,
            ..ok.clone()
        })
        .contains("bridge.max_in_flight_per_app"));
        for bad in [
            "api.push.apple.com",
            "ftp://x",
            "https://x/?a=1",
            "https://x/#f",
        ] {
            assert!(err_of(&BridgeSettings {
                apns_url: bad.into(),
                ..ok.clone()
            })
            .contains("bridge.apns_url"));
        }
        assert!(err_of(&BridgeSettings {
            hms_token_url: "".into(),
            ..ok.clone()
        })
        .contains("bridge.hms_token_url"));
        assert!(err_of(&BridgeSettings {
            extra_ca_files: vec![" ".into()],
            ..ok
        })
        .contains("bridge.extra_ca_files"));
    }

    #[test]
    fn production_urls_are_the_defaults() {
        let s = BridgeSettings::default();
        assert_eq!(s.apns_url, "https://api.push.apple.com");
        assert_eq!(s.apns_sandbox_url, "https://api.sandbox.push.apple.com");
        assert_eq!(s.fcm_url, "https://fcm.googleapis.com");
        assert_eq!(s.hms_url, "https://push-api.cloud.huawei.com");
        assert_eq!(
            s.hms_token_url,
            "https://oauth-login.cloud.huawei.com/oauth2/v3/token"
        );
        assert_eq!(s.max_in_flight_per_app, 100);
    }
}
