//! What every Pushgate service needs at run time, written once: layered configuration,
//! telemetry (tracing, OpenTelemetry, Prometheus metrics), the operations listener
//! (`/healthz`, `/readyz`, `/metrics`), TLS for external listeners, HTTPS serving, and the
//! outbox publisher that moves events and commands from Redis onto NATS.

pub mod config;

/// The allocator every Pushgate binary uses; see [`global_allocator!`].
pub use tikv_jemallocator::Jemalloc;

/// Makes jemalloc the binary's allocator.
///
/// Why: under load glibc's malloc showed up as a fifth of the suite's CPU (`perf`: `_int_malloc`,
/// `malloc_consolidate`, `cfree` across the worker threads). With jemalloc the same benchmark
/// used 10–25% less CPU per message and its p99 latency fell several-fold, and an idle edge
/// session was no larger (docs/benchmarks.md, "Where the CPU goes"). A library cannot choose
/// this for the binaries that link it, hence a macro each `main.rs` invokes once.
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::Jemalloc = $crate::Jemalloc;
    };
}
pub mod answers;
pub mod https;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod service;
pub mod telemetry;
pub mod tls;

pub use config::{load, CommonSettings, ConfigError};
pub use metrics::Metrics;
pub use tokio_util::sync::CancellationToken;
