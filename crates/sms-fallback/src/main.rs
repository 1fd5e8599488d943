//! The sms-fallback binary: configuration and signals around [`sms_fallback::Service`].

use anyhow::Context;
use pushgate_bus::Bus;
use pushgate_runtime::{service, telemetry, Metrics};
use pushgate_store::Store;
use sms_fallback::{Service, Settings};

pushgate_runtime::global_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings: Settings = pushgate_runtime::load(service::config_path().as_deref())?;
    settings.common.validate()?;
    settings.sms.validate()?;
    let _guard = telemetry::init(&settings.common.telemetry)?;
    let c = &settings.common;
    let bus = Bus::connect_with(&c.nats_url, &c.namespace, c.nats_replicas)
        .await
        .context("connecting to NATS")?;
    let store = Store::connect(&c.redis_url, &c.namespace)
        .await
        .context("connecting to Redis")?;
    let svc = Service::build(settings.sms.clone(), bus, store, Metrics::new()).await?;
    tracing::info!(ops = %svc.ops_addr(), dlr = %svc.dlr_addr(), "sms-fallback listening");
    svc.run_until(service::shutdown_on_signal()).await;
    Ok(())
}
