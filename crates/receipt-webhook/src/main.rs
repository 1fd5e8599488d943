//! The receipt-webhook binary: loads settings, connects to NATS and Redis, serves the
//! operations endpoints and delivers webhook batches until SIGTERM/ctrl-c.

use anyhow::Context;
use pushgate_runtime::ops::{self, Readiness};
use pushgate_runtime::{service, telemetry, Metrics};
use receipt_webhook::{Service, Settings};
use tokio::net::TcpListener;

pushgate_runtime::global_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings: Settings = pushgate_runtime::load(service::config_path().as_deref())?;
    settings.validate()?;
    let _telemetry = telemetry::init(&settings.common.telemetry)?;
    let common = &settings.common;
    let metrics = Metrics::new();
    let (bus, store) = service::connect_backends(common).await?;
    let listener = TcpListener::bind(&settings.webhook.ops_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on webhook.ops_listen {}",
                settings.webhook.ops_listen
            )
        })?;
    let shutdown = service::shutdown_on_signal();
    let readiness = Readiness {
        bus: bus.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
    };
    let ops_task = tokio::spawn(ops::serve(listener, readiness, shutdown.clone()));
    tracing::info!(namespace = %common.namespace, ops = %settings.webhook.ops_listen, "receipt-webhook starting");
    let service = Service::build(settings, metrics, bus, store).await?;
    let result = service.run_until(shutdown.clone()).await;
    // run_until only returns on shutdown; make sure the ops listener stops with it either way
    shutdown.cancel();
    ops_task
        .await
        .context("operations listener task")?
        .context("operations listener")?;
    result?;
    tracing::info!("receipt-webhook stopped");
    Ok(())
}
