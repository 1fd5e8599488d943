//! Configuration: defaults → TOML file → environment (`PUSHGATE__SECTION__KEY`), validated at
//! start so a bad setting stops the process with a message that names it.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// A configuration problem, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(String),
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    /// Shorthand for a validation failure.
    pub fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// Loads `T` from defaults, the optional file, then the environment.
pub fn load<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
) -> Result<T, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(f) = file {
        if !f.exists() {
            return Err(ConfigError::MissingFile(f.display().to_string()));
        }
        fig = fig.merge(Toml::file(f));
    }
    fig = fig.merge(Env::prefixed("PUSHGATE__").split("__").lowercase(true));
    fig.extract().map_err(|e| ConfigError::Parse(e.to_string()))
}

/// Settings shared by every service (`[common]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CommonSettings {
    /// NATS server URL (JetStream enabled); several servers of a cluster separated by commas.
    pub nats_url: String,
    /// Copies of each JetStream stream when it is created (1 for a single server, 3 on a
    /// three-node cluster).
    pub nats_replicas: usize,
    /// Microseconds a busy batch (status events, router commands, hand-overs to an edge,
    /// devices' confirmations at an edge) is held open for more items; 0 sends only what
    /// queued during the previous send. Adds at most this much latency per batched hop, and
    /// only under load. At most 100000.
    pub batch_linger_us: u64,
    /// Redis URL.
    pub redis_url: String,
    /// Prefix of every stream, subject and key: lets several deployments (or tests) share one
    /// NATS and one Redis. Lowercase letters and digits, 1–16 characters.
    pub namespace: String,
    /// The XMPP domain devices log in to (`device@domain`).
    pub xmpp_domain: String,
    /// Secret from which device XMPP passwords are derived (at least 32 characters).
    pub device_secret: String,
    /// Telemetry.
    pub telemetry: TelemetrySettings,
}

impl Default for CommonSettings {
    fn default() -> Self {
        CommonSettings {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_replicas: 1,
            batch_linger_us: pushgate_bus::DEFAULT_BATCH_LINGER.as_micros() as u64,
            redis_url: "redis://127.0.0.1:6379".into(),
            namespace: "pg".into(),
            xmpp_domain: "pushgate.local".into(),
            device_secret: String::new(),
            telemetry: TelemetrySettings::default(),
        }
    }
}

/// Upper bound of `common.batch_linger_us`: a linger is latency on every batched hop.
const MAX_BATCH_LINGER_US: u64 = 100_000;

impl CommonSettings {
    /// `batch_linger_us` as a duration.
    pub fn batch_linger(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.batch_linger_us)
    }

    /// Checks the shared settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ns = &self.namespace;
        if ns.is_empty()
            || ns.len() > 16
            || !ns
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(ConfigError::invalid(
                "common.namespace",
                format!("{ns:?} must be 1-16 lowercase letters or digits"),
            ));
        }
        if !self.nats_url.starts_with("nats://") && !self.nats_url.starts_with("tls://") {
            return Err(ConfigError::invalid(
                "common.nats_url",
                "must start with nats:// or tls://",
            ));
        }
        if !self.redis_url.starts_with("redis://") && !self.redis_url.starts_with("rediss://") {
            return Err(ConfigError::invalid(
                "common.redis_url",
                "must start with redis:// or rediss://",
            ));
        }
        if self.batch_linger_us > MAX_BATCH_LINGER_US {
            return Err(ConfigError::invalid(
                "common.batch_linger_us",
                format!(
                    "{} is more than {MAX_BATCH_LINGER_US} (a tenth of a second per hop)",
                    self.batch_linger_us
                ),
            ));
        }
        if self.device_secret.len() < 32 {
            return Err(ConfigError::invalid(
                "common.device_secret",
                "must be at least 32 characters (set PUSHGATE__COMMON__DEVICE_SECRET)",
            ));
        }
        if self.xmpp_domain.is_empty() || self.xmpp_domain.contains(['@', '/', ' ']) {
            return Err(ConfigError::invalid(
                "common.xmpp_domain",
                "must be a plain domain name",
            ));
        }
        Ok(())
    }
}

/// Logging and tracing (`[common.telemetry]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TelemetrySettings {
    /// `EnvFilter` directive, e.g. `info,router=debug`. `RUST_LOG` wins when set.
    pub log: String,
    /// `json` (default, for log shippers) or `text`.
    pub log_format: String,
    /// OTLP/gRPC endpoint for traces (e.g. `http://otel-collector:4317`); none = no export.
    pub otlp_endpoint: Option<String>,
    /// Service name reported in traces when running all services in one process.
    pub service_name: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            log: "info".into(),
            log_format: "json".into(),
            otlp_endpoint: None,
            service_name: "pushgate".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_setting() {
        let error = |c: &CommonSettings| {
            c.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let mut c = CommonSettings {
            device_secret: "x".repeat(32),
            ..Default::default()
        };
        assert!(c.validate().is_ok());
        c.namespace = "Bad-NS".into();
        let e = error(&c);
        assert!(e.contains("common.namespace"), "{e}");
        c.namespace = "ok".into();
        c.device_secret = "short".into();
        let e = error(&c);
        assert!(e.contains("common.device_secret"), "{e}");
        c.device_secret = "x".repeat(32);
        c.batch_linger_us = 100_001;
        let e = error(&c);
        assert!(e.contains("common.batch_linger_us"), "{e}");
    }
}
