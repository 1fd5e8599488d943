//! Serving an axum router over TLS (HTTP/1.1 and HTTP/2 by ALPN, so REST and gRPC share one
//! port), with graceful shutdown that lets in-flight requests finish.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls::ReloadableTls;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Header bytes the protocol layer accepts (the API enforces its own, smaller limit).
const MAX_PROTOCOL_HEADER_BYTES: usize = 256 * 1024;
/// How long shutdown waits for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves `app` on `listener` until `shutdown`, then drains open connections.
pub async fn serve(
    listener: TcpListener,
    tls: ReloadableTls,
    app: Router,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, _peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // out of file descriptors and the like: back off instead of spinning
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.config());
        let app = app.clone();
        let sd = shutdown.clone();
        tracker.spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // generous protocol-level header limits, so oversized headers reach the API's own
            // check and get a problem+json answer instead of a bare connection-level refusal
            builder.http1().max_buf_size(MAX_PROTOCOL_HEADER_BYTES);
            builder
                .http2()
                .max_header_list_size(MAX_PROTOCOL_HEADER_BYTES as u32);
            let conn = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(app),
            );
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = sd.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait()).await;
}
