//! The xmpp-edge binary: configuration and signals around [`xmpp_edge::Service`].

use pushgate_runtime::{service, telemetry, Metrics};
use xmpp_edge::{Service, Settings};

pushgate_runtime::global_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings: Settings = pushgate_runtime::load(service::config_path().as_deref())?;
    settings.common.validate()?;
    settings.edge.validate()?;
    let _guard = telemetry::init(&settings.common.telemetry)?;
    let c = &settings.common;
    let (bus, store) = service::connect_backends(c).await?;
    let svc = Service::build(c, settings.edge.clone(), bus, store, Metrics::new()).await?;
    svc.run_until(service::shutdown_on_signal()).await?;
    Ok(())
}
