//! What every Pushgate service needs at run time, written once: layered configuration,
//! telemetry (tracing, OpenTelemetry, Prometheus metrics), the operations listener
//! (`/healthz`, `/readyz`, `/metrics`), TLS for external listeners, HTTPS serving, and the
//! outbox publisher that moves events and commands from Redis onto NATS.

pub mod config;
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
