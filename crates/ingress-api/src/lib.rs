//! ingress-api: the outside of Pushgate for backends (messages, devices) and operators (apps).
//!
//! Layout: [`error`] (problem+json), [`extract`] (JSON bodies, credentials), one module per
//! resource ([`apps`], [`devices`], [`messages`]). A message is accepted when one Redis MULTI
//! has stored it together with its first event and its routing command (the outbox); the
//! NATS publish that follows is the fast path, and the routers' outbox sweeper the safety net.
//! See docs/architecture.md.

pub mod apps;
pub mod dead_letters;
pub mod device_events;
pub mod devices;
pub mod error;
pub mod extract;
pub mod grpc;
pub mod messages;
pub mod openapi;
pub mod sse;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::routing::{get, post, put};
use axum::Router;
use pushgate_bus::Bus;
use pushgate_runtime::outbox::Outbox;
use pushgate_runtime::tls::ReloadableTls;
use pushgate_runtime::{CommonSettings, ConfigError, Metrics};
use pushgate_store::Store;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Settings of the ingress (`[ingress]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct IngressSettings {
    /// HTTPS listen address of the API (REST and gRPC).
    pub listen: String,
    /// Plain-HTTP operations listener (`/healthz`, `/readyz`, `/metrics`).
    pub ops_listen: String,
    /// PEM certificate chain of the API listener.
    pub tls_cert: PathBuf,
    /// PEM private key of the API listener.
    pub tls_key: PathBuf,
    /// Bearer token of the operator endpoints (`/v1/apps…`); at least 24 characters.
    pub admin_token: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Largest accepted total of request header names and values.
    pub max_header_bytes: usize,
    /// Requests per second allowed per app (0 = unlimited).
    pub rate_limit_per_app: u64,
    /// How long a rotated-out API key keeps working.
    pub key_grace_secs: u64,
    /// XMPP host name devices are told to connect to.
    pub public_xmpp_host: String,
    /// XMPP port devices are told to connect to (STARTTLS).
    pub public_xmpp_port: u16,
    /// Live event watches (SSE streams and gRPC `WatchEvents`) one app may hold open on one
    /// ingress instance. Each is a NATS consumer and a task, so without a bound one app's key
    /// could load NATS for every app.
    pub max_watches_per_app: u32,
}

impl Default for IngressSettings {
    fn default() -> Self {
        IngressSettings {
            listen: "127.0.0.1:8443".into(),
            ops_listen: "127.0.0.1:9101".into(),
            tls_cert: PathBuf::from("tls/server.pem"),
            tls_key: PathBuf::from("tls/server.key"),
            admin_token: String::new(),
            max_body_bytes: 1024 * 1024,
            max_header_bytes: 16 * 1024,
            rate_limit_per_app: 1000,
            key_grace_secs: 86_400,
            public_xmpp_host: "localhost".into(),
            public_xmpp_port: 5222,
            max_watches_per_app: 16,
        }
    }
}

impl IngressSettings {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.admin_token.len() < 24 {
            return Err(ConfigError::invalid(
                "ingress.admin_token",
                "must be at least 24 characters (set PUSHGATE__INGRESS__ADMIN_TOKEN)",
            ));
        }
        self.listen.parse::<SocketAddr>().map_err(|e| {
            ConfigError::invalid("ingress.listen", format!("{:?}: {e}", self.listen))
        })?;
        self.ops_listen.parse::<SocketAddr>().map_err(|e| {
            ConfigError::invalid("ingress.ops_listen", format!("{:?}: {e}", self.ops_listen))
        })?;
        if self.max_body_bytes < 16 * 1024 {
            return Err(ConfigError::invalid(
                "ingress.max_body_bytes",
                "must be at least 16384",
            ));
        }
        if self.max_watches_per_app == 0 {
            return Err(ConfigError::invalid(
                "ingress.max_watches_per_app",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Settings file of the ingress binary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub common: CommonSettings,
    pub ingress: IngressSettings,
}

/// Errors starting or running the ingress.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] pushgate_runtime::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// What handlers share.
pub struct Ctx {
    pub settings: IngressSettings,
    pub common: CommonSettings,
    pub store: Store,
    pub bus: Bus,
    pub outbox: Outbox,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the ingress shuts down; ends live event streams.
    pub shutdown: CancellationToken,
    /// Live event watches per app on this instance ([`sse::WatchSlot`]).
    pub watches: sse::WatchCounts,
}

impl Ctx {
    /// Per-app fixed-window rate limit (shared by all ingress instances through Redis).
    pub async fn check_rate(&self, app_id: &str) -> Result<(), ApiError> {
        let limit = self.settings.rate_limit_per_app;
        if limit == 0 {
            return Ok(());
        }
        let n = self
            .store
            .count_request(app_id, Self::rate_second(), 1)
            .await?;
        self.judge_rate(n)
    }

    /// The current window of the per-app rate limit: the current second.
    pub(crate) fn rate_second() -> i64 {
        pushgate_core::time::now_ms() / 1000
    }

    /// Refuses a request that made its app's count in the current window exceed the limit
    /// (shared by [`Ctx::check_rate`] and the API key check, which counts as it authenticates).
    pub(crate) fn judge_rate(&self, count: u64) -> Result<(), ApiError> {
        let limit = self.settings.rate_limit_per_app;
        if limit != 0 && count > limit {
            return Err(ApiError::RateLimited {
                limit,
                retry_after_secs: 1,
            });
        }
        Ok(())
    }
}

/// Refuses requests whose headers are larger than `ingress.max_header_bytes` with a
/// problem+json answer naming the largest header.
async fn limit_headers(
    axum::extract::State(ctx): axum::extract::State<Arc<Ctx>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let limit = ctx.settings.max_header_bytes;
    let total: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if total > limit {
        let largest = req
            .headers()
            .iter()
            .max_by_key(|(k, v)| k.as_str().len() + v.len())
            .map(|(k, _)| k.as_str().to_string())
            .unwrap_or_default();
        return axum::response::IntoResponse::into_response(ApiError::HeadersTooLarge {
            limit,
            largest,
        });
    }
    next.run(req).await
}

/// The API routes (without TLS), for embedding and tests.
pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/v1/apps", post(apps::create))
        .route("/v1/apps/{app_id}", get(apps::get).patch(apps::patch))
        .route("/v1/apps/{app_id}/keys", post(apps::rotate_key))
        .route("/v1/users/{user_id}/devices", get(devices::list))
        .route(
            "/v1/users/{user_id}/devices/{device_id}",
            put(devices::register).delete(devices::deregister),
        )
        .route(
            "/v1/users/{user_id}",
            axum::routing::delete(devices::delete_user),
        )
        .route("/v1/messages", post(messages::send).get(messages::list))
        .route(
            "/v1/messages/{id}",
            get(messages::get).delete(messages::cancel),
        )
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/v1/events/stream", get(sse::stream))
        .merge(grpc::routes(ctx.clone()))
        .route("/v1/device/events", post(device_events::report))
        .route("/v1/apps/{app_id}/dead-letters", get(dead_letters::list))
        .route(
            "/v1/apps/{app_id}/dead-letters/replay",
            post(dead_letters::replay_all),
        )
        .route(
            "/v1/apps/{app_id}/dead-letters/{batch_id}/replay",
            post(dead_letters::replay),
        )
        // one span per request, continuing the caller's `traceparent`; request metrics
        .route_layer(axum::middleware::from_fn_with_state(
            ctx.metrics.clone(),
            pushgate_runtime::telemetry::http_span,
        ))
        .fallback(|| async { ApiError::NotFound("route") })
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            limit_headers,
        ))
        .with_state(ctx)
}

/// A built ingress: listeners bound, ready to run.
pub struct Service {
    ctx: Arc<Ctx>,
    api: TcpListener,
    ops: TcpListener,
    tls: ReloadableTls,
}

impl Service {
    /// Validates settings, loads TLS material and binds both listeners.
    pub async fn build(
        common: CommonSettings,
        settings: IngressSettings,
        bus: Bus,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Self, IngressError> {
        settings.validate()?;
        let tls =
            ReloadableTls::load(&settings.tls_cert, &settings.tls_key, &[b"h2", b"http/1.1"])?;
        let bind = |addr: String| async move {
            TcpListener::bind(&addr)
                .await
                .map_err(|source| IngressError::Bind { addr, source })
        };
        let api = bind(settings.listen.clone()).await?;
        let ops = bind(settings.ops_listen.clone()).await?;
        let outbox = Outbox::new(bus.clone(), store.clone(), metrics.clone());
        let ctx = Arc::new(Ctx {
            settings,
            common,
            store,
            bus,
            outbox,
            metrics,
            shutdown: CancellationToken::new(),
            watches: Default::default(),
        });
        Ok(Service { ctx, api, ops, tls })
    }

    /// The bound API address.
    pub fn api_addr(&self) -> SocketAddr {
        pushgate_runtime::ops::local_addr(&self.api)
    }

    /// The bound operations address.
    pub fn ops_addr(&self) -> SocketAddr {
        pushgate_runtime::ops::local_addr(&self.ops)
    }

    /// Serves until `shutdown`, then drains in-flight requests.
    pub async fn run_until(self, shutdown: CancellationToken) {
        self.tls.spawn_watcher(shutdown.clone());
        let streams = self.ctx.shutdown.clone();
        let outer = shutdown.clone();
        tokio::spawn(async move {
            outer.cancelled().await;
            streams.cancel();
        });
        let ops = pushgate_runtime::ops::spawn(
            self.ops,
            &self.ctx.bus,
            &self.ctx.store,
            &self.ctx.metrics,
            shutdown.clone(),
        );
        tracing::info!(addr = %self.api.local_addr().map(|a| a.to_string()).unwrap_or_default(), "ingress-api listening (HTTPS)");
        pushgate_runtime::https::serve(self.api, self.tls, router(self.ctx.clone()), shutdown)
            .await;
        let _ = ops.await;
    }
}
