//! The native-push-bridge binary: configuration and signals around
//! [`native_push_bridge::Service`].

use native_push_bridge::{Service, Settings};
use pushgate_runtime::{service, telemetry, Metrics};

pushgate_runtime::global_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings: Settings = pushgate_runtime::load(service::config_path().as_deref())?;
    settings.common.validate()?;
    settings.bridge.validate()?;
    let _guard = telemetry::init(&settings.common.telemetry)?;
    let c = &settings.common;
    let (bus, store) = service::connect_backends(c).await?;
    let svc = Service::build(settings.bridge.clone(), bus, store, Metrics::new()).await?;
    tracing::info!(ops = %svc.ops_addr(), "native-push-bridge running");
    svc.run_until(service::shutdown_on_signal()).await;
    Ok(())
}
