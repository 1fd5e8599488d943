//! sms-fallback: sends the SMS of phone-only messages and the SMS fallback of expired
//! messages through each app's SMS provider, at most once per message, and takes the
//! provider's delivery reports.
//!
//! - The **consumer** takes [`SmsRequest`](pushgate_bus::payloads::SmsRequest)s from the
//!   durable JetStream consumer `sms` (explicit ack; a killed instance's unacked work is
//!   redelivered to another). Handling is in [`worker`]; the send record that keeps it to one
//!   SMS per message is in [`record`]; the per-app send rate in [`throttle`]; the provider call
//!   in [`provider`] (generic webhook), [`twilio`] and [`kannel`]; encoding and segment
//!   counting in [`encoding`].
//! - The **delivery report listener** ([`dlr`], `sms.dlr_listen`) takes authenticated reports
//!   from providers. It serves plain HTTP for now: put it behind a TLS-terminating proxy until
//!   it gets its own TLS, and set `sms.public_dlr_base_url` to the URL the providers reach it
//!   at (Twilio and Kannel are only asked for reports when it is set).
//! - The **operations listener** (`sms.ops_listen`) serves `/healthz`, `/readyz`, `/metrics`.

pub mod dlr;
pub mod encoding;
pub mod kannel;
pub mod provider;
pub mod record;
pub mod signature;
pub mod throttle;
pub mod twilio;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pushgate_bus::{Bus, ConsumerName};
use pushgate_runtime::outbox::Outbox;
use pushgate_runtime::{CommonSettings, ConfigError, Metrics};
use pushgate_store::Store;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use tokio_util::sync::CancellationToken;

use crate::record::Records;

/// Longest provider timeout allowed: the consumer's ack wait is 15 s, and an attempt must end
/// well before JetStream hands the same request to another instance.
const MAX_PROVIDER_TIMEOUT_MS: u64 = 12_000;

/// Settings of sms-fallback (`[sms]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SmsSettings {
    /// Plain-HTTP operations listener (internal only).
    pub ops_listen: String,
    /// Delivery report listener; reachable by SMS providers (reports are signed).
    pub dlr_listen: String,
    /// SMS requests handled at once by this instance.
    pub concurrency: usize,
    /// How long one provider call may take (connect and answer).
    pub provider_timeout_ms: u64,
    /// First retry delay after a provider failure; doubles per attempt (with jitter).
    pub retry_base_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
    /// Admit `http://` provider URLs. Only for local stand-ins and tests: the request carries
    /// the text and the phone number.
    pub allow_http_providers: bool,
    /// The URL at which providers reach the delivery report listener from outside (through
    /// the TLS-terminating proxy), e.g. `https://sms-dlr.example.com`. Twilio's
    /// `StatusCallback` and Kannel's `dlr-url` are built from it, and Twilio's signatures are
    /// checked against it, so it must be exactly what the provider calls. Unset: Twilio and
    /// Kannel are not asked for delivery reports.
    pub public_dlr_base_url: Option<String>,
}

impl Default for SmsSettings {
    fn default() -> Self {
        SmsSettings {
            ops_listen: "127.0.0.1:9106".into(),
            dlr_listen: "127.0.0.1:9107".into(),
            concurrency: 64,
            provider_timeout_ms: 10_000,
            retry_base_ms: 1_000,
            retry_max_ms: 300_000,
            allow_http_providers: false,
            public_dlr_base_url: None,
        }
    }
}

impl SmsSettings {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("sms.ops_listen", &self.ops_listen),
            ("sms.dlr_listen", &self.dlr_listen),
        ] {
            v.parse::<SocketAddr>()
                .map_err(|e| ConfigError::invalid(key, format!("{v:?}: {e}")))?;
        }
        if self.concurrency == 0 {
            return Err(ConfigError::invalid(
                "sms.concurrency",
                "must be at least 1",
            ));
        }
        if !(100..=MAX_PROVIDER_TIMEOUT_MS).contains(&self.provider_timeout_ms) {
            return Err(ConfigError::invalid(
                "sms.provider_timeout_ms",
                format!("must be 100-{MAX_PROVIDER_TIMEOUT_MS} (an attempt must end before the bus redelivers it)"),
            ));
        }
        if self.retry_base_ms == 0 {
            return Err(ConfigError::invalid(
                "sms.retry_base_ms",
                "must be at least 1",
            ));
        }
        if self.retry_max_ms < self.retry_base_ms {
            return Err(ConfigError::invalid(
                "sms.retry_max_ms",
                "must be at least sms.retry_base_ms",
            ));
        }
        if let Some(base) = &self.public_dlr_base_url {
            check_public_base(base).map_err(|why| {
                ConfigError::invalid("sms.public_dlr_base_url", format!("{base:?}: {why}"))
            })?;
        }
        Ok(())
    }

    /// [`public_dlr_base_url`](Self::public_dlr_base_url) without a trailing `/`, ready to
    /// have a route path appended.
    pub fn dlr_base(&self) -> Option<&str> {
        self.public_dlr_base_url
            .as_deref()
            .map(|b| b.trim_end_matches('/'))
    }
}

/// An absolute `http(s)://` URL with a host and nothing a provider could mangle or leak: no
/// user info, query or fragment (a route path and, for Kannel, a query are appended to it).
fn check_public_base(base: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(base).map_err(|e| e.to_string())?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("must be an http:// or https:// URL with a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    if url.query().is_some() || url.fragment().is_some() || base.contains('?') {
        return Err("must not have a query or fragment".into());
    }
    Ok(())
}

/// Settings file of the sms-fallback binary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub common: CommonSettings,
    pub sms: SmsSettings,
}

/// Errors of sms-fallback.
#[derive(Debug, thiserror::Error)]
pub enum SmsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error(transparent)]
    Store(#[from] pushgate_store::StoreError),
    #[error(transparent)]
    Bus(#[from] pushgate_bus::BusError),
}

/// What every handler shares.
pub(crate) struct Ctx {
    pub settings: SmsSettings,
    pub bus: Bus,
    pub store: Store,
    pub outbox: Outbox,
    pub metrics: Arc<Metrics>,
    pub client: reqwest::Client,
    pub records: Records,
    /// Names this instance in send claims (for logs when another instance finds one).
    pub instance: String,
}

/// A built sms-fallback service.
pub struct Service {
    ctx: Arc<Ctx>,
    ops: TcpListener,
    dlr: TcpListener,
}

async fn bind(addr: &str) -> Result<TcpListener, SmsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SmsError::Bind {
            addr: addr.to_string(),
            source,
        })
}

impl Service {
    /// Validates settings, builds the provider HTTP client and binds both listeners.
    pub async fn build(
        settings: SmsSettings,
        bus: Bus,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Service, SmsError> {
        settings.validate()?;
        let ops = bind(&settings.ops_listen).await?;
        let dlr = bind(&settings.dlr_listen).await?;
        pushgate_runtime::tls::install_crypto_provider();
        let timeout = Duration::from_millis(settings.provider_timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            // the signed POST goes to the configured URL or nowhere
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pushgate-sms/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(SmsError::Client)?;
        let outbox = Outbox::new(bus.clone(), store.clone(), metrics.clone());
        let records = Records::new(store.clone());
        let instance = format!("sms-{}", uuid::Uuid::new_v4().simple());
        Ok(Service {
            ctx: Arc::new(Ctx {
                settings,
                bus,
                store,
                outbox,
                metrics,
                client,
                records,
                instance,
            }),
            ops,
            dlr,
        })
    }

    /// The bound operations address.
    pub fn ops_addr(&self) -> SocketAddr {
        pushgate_runtime::ops::local_addr(&self.ops)
    }

    /// The bound delivery report address.
    pub fn dlr_addr(&self) -> SocketAddr {
        pushgate_runtime::ops::local_addr(&self.dlr)
    }

    /// Runs the consumer and both listeners until `shutdown`; in-flight requests finish (or
    /// stay unacked and are redelivered), nothing is acked that was not handled.
    pub async fn run_until(self, shutdown: CancellationToken) {
        let ops = pushgate_runtime::ops::spawn(
            self.ops,
            &self.ctx.bus,
            &self.ctx.store,
            &self.ctx.metrics,
            shutdown.clone(),
        );
        let dlr_shutdown = shutdown.clone();
        let dlr_routes = dlr::router(self.ctx.clone());
        let dlr = tokio::spawn(async move {
            axum::serve(self.dlr, dlr_routes)
                .with_graceful_shutdown(async move { dlr_shutdown.cancelled().await })
                .await
        });
        consume_loop(self.ctx.clone(), shutdown.clone()).await;
        let (ops, dlr) = tokio::join!(ops, dlr);
        for (name, res) in [("operations", ops), ("delivery report", dlr)] {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(listener = name, error = %e, "listener failed"),
                Err(e) => tracing::error!(listener = name, error = %e, "listener task failed"),
            }
        }
    }
}

/// Takes requests from the durable consumer; when NATS goes away (restart, network) it asks
/// for the consumer again until it is back.
async fn consume_loop(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let concurrency = ctx.settings.concurrency;
    let bus = ctx.bus.clone();
    pushgate_bus::consume(&bus, ConsumerName::Sms, concurrency, shutdown, move |msg| {
        let ctx = ctx.clone();
        async move { worker::handle_delivery(&ctx, msg).await }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(s: &SmsSettings) -> String {
        s.validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn defaults_are_valid_and_do_not_clash() {
        let s = SmsSettings::default();
        assert!(s.validate().is_ok());
        assert_eq!(s.ops_listen, "127.0.0.1:9106");
        assert_eq!(s.dlr_listen, "127.0.0.1:9107");
        assert!(!s.allow_http_providers);
    }

    #[test]
    fn validation_names_the_setting() {
        let ok = SmsSettings::default();
        assert!(err_of(&SmsSettings {
            dlr_listen: "nope".into(),
            ..ok.clone()
        })
        .contains("sms.dlr_listen"));
        assert!(err_of(&SmsSettings {
            ops_listen: "".into(),
            ..ok.clone()
        })
        .contains("sms.ops_listen"));
        assert!(err_of(&SmsSettings {
            concurrency: 0,
            ..ok.clone()
        })
        .contains("sms.concurrency"));
        assert!(err_of(&SmsSettings {
            provider_timeout_ms: 15_000,
            ..ok.clone()
        })
        .contains("sms.provider_timeout_ms"));
        assert!(err_of(&SmsSettings {
            retry_base_ms: 0,
            ..ok.clone()
        })
        .contains("sms.retry_base_ms"));
        assert!(err_of(&SmsSettings {
            retry_max_ms: 10,
            retry_base_ms: 100,
            ..ok.clone()
        })
        .contains("sms.retry_max_ms"));
        for bad in [
            "sms-dlr.example.com",
            "ftp://sms-dlr.example.com",
            "https://u:p@sms-dlr.example.com",
            "https://sms-dlr.example.com/?a=1",
            "https://sms-dlr.example.com/#x",
        ] {
            assert!(
                err_of(&SmsSettings {
                    public_dlr_base_url: Some(bad.into()),
                    ..ok.clone()
                })
                .contains("sms.public_dlr_base_url"),
                "{bad}"
            );
        }
    }

    #[test]
    fn public_base_loses_its_trailing_slash() {
        let s = SmsSettings {
            public_dlr_base_url: Some("https://sms-dlr.example.com/pushgate/".into()),
            ..SmsSettings::default()
        };
        assert!(s.validate().is_ok());
        assert_eq!(s.dlr_base(), Some("https://sms-dlr.example.com/pushgate"));
        assert_eq!(SmsSettings::default().dlr_base(), None);
    }
}
