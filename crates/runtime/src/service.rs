//! The shape every service binary shares: find the config file, start telemetry, run until
//! SIGTERM/ctrl-c, then shut down gracefully.

use std::path::PathBuf;

use pushgate_bus::{Bus, BusError};
use pushgate_store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

use crate::CommonSettings;

/// Why a binary could not reach its shared backends at start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("connecting to NATS")]
    Nats(#[source] BusError),
    #[error("connecting to Redis")]
    Redis(#[source] StoreError),
}

/// Connects to NATS (streams created as the settings say) and Redis, in the namespace of
/// `common`: the first thing every binary does after reading its settings.
pub async fn connect_backends(common: &CommonSettings) -> Result<(Bus, Store), BackendError> {
    let bus = Bus::connect_with(&common.nats_url, &common.namespace, common.nats_replicas)
        .await
        .map_err(BackendError::Nats)?
        .with_batch_linger(common.batch_linger());
    let store = Store::connect(&common.redis_url, &common.namespace)
        .await
        .map_err(BackendError::Redis)?;
    Ok((bus, store))
}

/// The config file: `--config PATH` argument, else `PUSHGATE_CONFIG`, else none (defaults and
/// environment only).
pub fn config_path() -> Option<PathBuf> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--config" || a == "-c" {
            return args.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("PUSHGATE_CONFIG").map(PathBuf::from)
}

/// A token cancelled on SIGTERM or ctrl-c.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested; draining");
        t.cancel();
    });
    token
}
