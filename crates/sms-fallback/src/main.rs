//! The sms-fallback binary: configuration and signals around [`sms_fallback::Service`].

use pushgate_runtime::{service, telemetry, Metrics};
use sms_fallback::{Service, Settings};

pushgate_runtime::global_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings: Settings = pushgate_runtime::load(service::config_path().as_deref())?;
    settings.common.validate()?;
    settings.sms.validate()?;
    let _guard = telemetry::init(&settings.common.telemetry)?;
    let c = &settings.common;
    let (bus, store) = service::connect_backends(c).await?;
    let svc = Service::build(settings.sms.clone(), bus, store, Metrics::new()).await?;
    tracing::info!(ops = %svc.ops_addr(), dlr = %svc.dlr_addr(), "sms-fallback listening");
    svc.run_until(service::shutdown_on_signal()).await;
    Ok(())
}
