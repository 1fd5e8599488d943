//! The operations listener: `/healthz` (the process runs), `/readyz` (NATS and Redis answer),
//! `/metrics` (Prometheus). Plain HTTP on an internal port: it is for the orchestrator and the
//! metrics scraper, never exposed outside the cluster.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use pushgate_bus::Bus;
use pushgate_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Metrics;

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub bus: Bus,
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(r): State<Readiness>) -> impl IntoResponse {
    let nats = r.bus.is_connected();
    let redis = tokio::time::timeout(std::time::Duration::from_secs(2), r.store.ping())
        .await
        .map(|res| res.is_ok())
        .unwrap_or(false);
    let body = format!(
        "nats: {}\nredis: {}\n",
        if nats { "ok" } else { "down" },
        if redis { "ok" } else { "down" }
    );
    let code = if nats && redis {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

async fn metrics(State(r): State<Readiness>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        r.metrics.encode(),
    )
}

/// The operations routes.
pub fn router(r: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(r)
}

/// Serves the operations routes until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    r: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(r))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Serves a service's operations routes in the background until `shutdown`.
pub fn spawn(
    listener: TcpListener,
    bus: &Bus,
    store: &Store,
    metrics: &Arc<Metrics>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let ready = Readiness {
        bus: bus.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
    };
    tokio::spawn(serve(listener, ready, shutdown))
}

/// A bound listener's address for reporting (`0.0.0.0:0` in the unlikely case the OS cannot
/// tell).
pub fn local_addr(listener: &TcpListener) -> std::net::SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
}
