//! The real protocol clients: APNs ([`apns`]), FCM HTTP v1 ([`fcm`]), HMS Push Kit ([`hms`])
//! and Web Push ([`webpush`]), plus what they share: the HTTP client setup (extra CAs for
//! private deployments and tests), the per-app cache of parsed credentials, tokens and
//! connections, and the mapping of transport failures and `Retry-After` onto
//! [`ProviderError`].

pub mod apns;
pub(crate) mod ece;
pub mod fcm;
pub mod hms;
pub(crate) mod jwt;
pub mod webpush;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::provider::{AppCredentials, ProviderError, Providers};
use crate::{BridgeError, BridgeSettings};

/// The most of a provider's answer that is read. Every documented answer is a small JSON
/// object (an error reason, a token, a message name); the Web Push endpoint is whatever URL the
/// app registered for a browser, so its answer is not trusted to be small, and reading it whole
/// could hold any amount in memory.
pub(crate) const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// At most [`MAX_ANSWER_BYTES`] of a provider's answer
/// ([`pushgate_runtime::answers::read_bounded`]).
pub(crate) async fn read_answer(mut resp: reqwest::Response) -> Vec<u8> {
    pushgate_runtime::answers::read_bounded(&mut resp, MAX_ANSWER_BYTES).await
}

/// Sent as `User-Agent` on every provider request, so the providers' logs name us.
const USER_AGENT: &str = concat!("pushgate-native-push-bridge/", env!("CARGO_PKG_VERSION"));

/// An app whose client has not been used for this long is dropped from a cache (its idle
/// connections with it); the next push builds it again.
const IDLE_EVICT: Duration = Duration::from_secs(3600);

/// How often a cache looks for idle apps: a sweep walks every entry, so not on every push.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Builds the four real clients from the settings, keyed by channel name.
pub async fn providers(settings: &BridgeSettings) -> Result<Providers, BridgeError> {
    let http = HttpConfig::load(settings).await?;
    let mut providers = Providers::new();
    providers.insert(
        "apns",
        Arc::new(apns::ApnsProvider::new(
            http.clone(),
            &settings.apns_url,
            &settings.apns_sandbox_url,
        )) as _,
    );
    providers.insert(
        "fcm",
        Arc::new(fcm::FcmProvider::new(http.clone(), &settings.fcm_url)) as _,
    );
    providers.insert(
        "hms",
        Arc::new(hms::HmsProvider::new(
            http.clone(),
            &settings.hms_url,
            &settings.hms_token_url,
        )) as _,
    );
    providers.insert(
        "webpush",
        Arc::new(webpush::WebPushProvider::new(http)) as _,
    );
    Ok(providers)
}

/// What every provider's HTTP clients are built with.
#[derive(Clone)]
pub struct HttpConfig {
    /// Roots trusted besides the system's (`extra_ca_files`): a private push gateway, or the
    /// stand-ins' development CA in tests.
    roots: Vec<reqwest::Certificate>,
    /// Longest TCP+TLS connect. A connect failure is certain not to have pushed anything, so it
    /// is retryable; it must end well inside `send_timeout_ms`, whose expiry is not.
    connect_timeout: Duration,
}

impl HttpConfig {
    /// Reads `extra_ca_files` and derives the timeouts from the settings.
    pub async fn load(settings: &BridgeSettings) -> Result<Self, BridgeError> {
        pushgate_runtime::tls::install_crypto_provider();
        let mut roots = Vec::new();
        for path in &settings.extra_ca_files {
            let err = |reason: String| BridgeError::CaFile {
                path: path.clone(),
                reason,
            };
            let pem = tokio::fs::read(path)
                .await
                .map_err(|e| err(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?;
            if certs.is_empty() {
                return Err(err("no certificate in file".into()));
            }
            roots.extend(certs);
        }
        Ok(HttpConfig {
            roots,
            connect_timeout: Duration::from_millis(settings.send_timeout_ms / 2),
        })
    }

    /// A client builder with the shared settings. Redirects are not followed: every provider
    /// answers its send endpoint directly, and a 3xx would mean a misconfigured base URL,
    /// which must show up as an error rather than be chased with the credentials attached.
    pub(crate) fn builder(&self) -> reqwest::ClientBuilder {
        let mut b = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(self.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(600))
            .http2_keep_alive_interval(Duration::from_secs(60))
            .http2_keep_alive_while_idle(true);
        if !self.roots.is_empty() {
            b = b.tls_certs_merge(self.roots.clone());
        }
        b
    }
}

/// Locks a mutex even if a panicking holder poisoned it: every value guarded here (caches,
/// tokens) stays consistent across a panic, because each is replaced whole.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Per-app state a client derives from the app's credentials (parsed keys, token caches, an
/// HTTP client and with it the app's connections), rebuilt when the app's `updated_at`
/// changes so edited credentials apply on the next push.
pub(crate) struct AppCache<T> {
    inner: Mutex<CacheInner<T>>,
}

struct CacheInner<T> {
    entries: HashMap<String, Cached<T>>,
    last_sweep: Instant,
}

struct Cached<T> {
    version: i64,
    value: Arc<T>,
    used: Instant,
}

impl<T> Default for AppCache<T> {
    fn default() -> Self {
        AppCache {
            inner: Mutex::new(CacheInner {
                entries: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        }
    }
}

impl<T> AppCache<T> {
    /// The app's state for this version of its settings, built by `build` when missing or
    /// outdated. `build` runs outside the lock (building an HTTP client reads the system's
    /// roots), so two pushes of a new app may both build; the first to finish is kept.
    pub(crate) fn get_or_build(
        &self,
        app: AppCredentials<'_>,
        build: impl FnOnce() -> Result<T, ProviderError>,
    ) -> Result<Arc<T>, ProviderError> {
        {
            let mut g = lock(&self.inner);
            if let Some(e) = g.entries.get_mut(app.app_id) {
                if e.version == app.version {
                    e.used = Instant::now();
                    return Ok(e.value.clone());
                }
            }
        }
        let built = Arc::new(build()?);
        let mut g = lock(&self.inner);
        let now = Instant::now();
        if now.duration_since(g.last_sweep) >= SWEEP_EVERY {
            g.entries
                .retain(|_, e| now.duration_since(e.used) < IDLE_EVICT);
            g.last_sweep = now;
        }
        match g.entries.get_mut(app.app_id) {
            Some(e) if e.version == app.version => {
                e.used = now;
                Ok(e.value.clone())
            }
            _ => {
                g.entries.insert(
                    app.app_id.to_string(),
                    Cached {
                        version: app.version,
                        value: built.clone(),
                        used: now,
                    },
                );
                Ok(built)
            }
        }
    }
}

/// The provider's `Retry-After`: delay-seconds or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// A request that failed without an HTTP answer. A failed connect certainly pushed nothing,
/// so it may be retried; anything later (a reset or timeout after the request was written)
/// may have been accepted, and a repeated notification is worse than a missing one.
pub(crate) fn transport_error(what: &str, e: &reqwest::Error) -> ProviderError {
    let detail = format!("{what}: {}", error_chain(e));
    if e.is_connect() {
        ProviderError::Retryable {
            retry_after: None,
            detail,
        }
    } else {
        ProviderError::Unknown { detail }
    }
}

/// A failed request to an OAuth token endpoint. Nothing was pushed yet, so every failure
/// without an answer is retryable.
pub(crate) fn token_transport_error(what: &str, e: &reqwest::Error) -> ProviderError {
    ProviderError::Retryable {
        retry_after: None,
        detail: format!("{what}: {}", error_chain(e)),
    }
}

/// reqwest's own message is often just "error sending request"; the cause names the problem
/// (connection refused, certificate unknown).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Seconds from `now_ms` until `expires_at_ms` (epoch ms), never negative: the provider-side
/// expiry of a notification (`TTL`, FCM/HMS `ttl`).
pub(crate) fn seconds_left(expires_at_ms: i64, now_ms: i64) -> u64 {
    u64::try_from(expires_at_ms.saturating_sub(now_ms)).unwrap_or(0) / 1000
}

/// Wall-clock seconds since the epoch, for JWT `iat`/`exp` (the providers check them against
/// their clocks, so a monotonic clock would not do).
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A required string field of the app's provider settings.
pub(crate) fn setting<'a>(
    creds: &'a serde_json::Value,
    provider: &str,
    key: &str,
) -> Result<&'a str, ProviderError> {
    creds
        .get(key)
        .and_then(|v| v.as_str())
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ProviderError::Credentials {
            detail: format!("{provider} settings lack \"{key}\""),
        })
}

/// An optional string field of the app's provider settings.
pub(crate) fn optional_setting<'a>(creds: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    creds
        .get(key)
        .and_then(|v| v.as_str())
        .filter(|s| !s.trim().is_empty())
}

/// Settings that cannot work (a key that does not parse, a client that cannot be built).
pub(crate) fn bad_settings(provider: &str, what: impl std::fmt::Display) -> ProviderError {
    ProviderError::Credentials {
        detail: format!("{provider} settings: {what}"),
    }
}

/// The common tail of every provider's status mapping: 429 and 5xx are the provider asking
/// for a later retry; any other answer without a specific mapping is a refusal of this
/// notification, except informational and redirect answers, which say nothing certain.
pub(crate) fn by_status(status: u16, headers: &HeaderMap, detail: String) -> ProviderError {
    match status {
        429 | 500..=599 => ProviderError::Retryable {
            retry_after: retry_after(headers),
            detail,
        },
        400..=499 => ProviderError::Permanent { detail },
        _ => ProviderError::Unknown { detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(3600);
        let date = httpdate::fmt_http_date(later);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&date).expect("header value"),
        );
        let d = retry_after(&h).expect("a date parses");
        assert!(d > Duration::from_secs(3500) && d <= Duration::from_secs(3600));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn seconds_left_is_never_negative() {
        assert_eq!(seconds_left(10_000, 0), 10);
        assert_eq!(seconds_left(10_999, 0), 10);
        assert_eq!(seconds_left(0, 10_000), 0);
        assert_eq!(seconds_left(i64::MIN, i64::MAX), 0);
    }

    #[test]
    fn status_tail_mapping() {
        let h = HeaderMap::new();
        assert!(matches!(
            by_status(503, &h, "x".into()),
            ProviderError::Retryable { .. }
        ));
        assert!(matches!(
            by_status(429, &h, "x".into()),
            ProviderError::Retryable { .. }
        ));
        assert!(matches!(
            by_status(404, &h, "x".into()),
            ProviderError::Permanent { .. }
        ));
        assert!(matches!(
            by_status(302, &h, "x".into()),
            ProviderError::Unknown { .. }
        ));
    }

    #[test]
    fn cache_rebuilds_when_the_app_changes() {
        let cache: AppCache<i64> = AppCache::default();
        let creds = serde_json::json!({});
        let app = |version| AppCredentials {
            app_id: "a",
            version,
            creds: &creds,
        };
        let mut builds = 0;
        let mut get = |version: i64| {
            *cache
                .get_or_build(app(version), || {
                    builds += 1;
                    Ok(version * 10)
                })
                .expect("built")
        };
        assert_eq!(get(1), 10);
        assert_eq!(get(1), 10);
        assert_eq!(get(2), 20);
        assert_eq!(builds, 2);
        let failed = cache.get_or_build(app(3), || {
            Err(ProviderError::Credentials {
                detail: "bad".into(),
            })
        });
        assert!(failed.is_err());
        // a failed build keeps nothing: the next push tries again
        assert_eq!(*cache.get_or_build(app(3), || Ok(30)).expect("built"), 30);
    }

    #[test]
    fn settings_fields_name_what_is_missing() {
        let creds = serde_json::json!({"a": "x", "b": " ", "c": 1});
        assert_eq!(setting(&creds, "apns", "a").ok(), Some("x"));
        for key in ["b", "c", "d"] {
            let e = setting(&creds, "apns", key).err().map(|e| e.to_string());
            assert_eq!(
                e,
                Some(format!(
                    "provider credentials rejected: apns settings lack \"{key}\""
                ))
            );
        }
        assert_eq!(optional_setting(&creds, "b"), None);
    }
}
