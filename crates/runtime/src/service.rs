//! The shape every service binary shares: find the config file, start telemetry, run until
//! SIGTERM/ctrl-c, then shut down gracefully.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

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
