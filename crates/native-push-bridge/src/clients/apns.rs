//! Apple Push Notification service: HTTP/2 `POST /3/device/{token}` with token (`.p8` key,
//! ES256 provider JWT) or certificate (TLS client certificate) authentication.
//!
//! App settings (`App.providers.apns`):
//!
//! | key                  | meaning                                                            |
//! |----------------------|--------------------------------------------------------------------|
//! | `bundle_id`          | the app's bundle id, sent as `apns-topic` (required)               |
//! | `environment`        | `production` (default) or `sandbox` (development builds)           |
//! | `team_id`, `key_id`, `private_key` | token auth: team, key id and the `.p8` PEM           |
//! | `certificate`, `certificate_key`   | certificate auth: PEM certificate and its PEM key (the key may also follow the certificate in `certificate`) |
//!
//! The payload JSON is built here rather than with `a2`'s payload types: `a2` 0.10 always
//! brings its own client stack (hyper-rustls 0.26 on rustls 0.22, with webpki roots), a
//! second TLS stack the bridge would compile and ship only to serialise four fields.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use p256::ecdsa::SigningKey;
use pushgate_core::time::now_ms;
use pushgate_core::{Device, Priority};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Map, Value};

use super::{
    bad_settings, by_status, jwt, lock, optional_setting, setting, transport_error, unix_now,
    AppCache, HttpConfig,
};
use crate::provider::{
    AppCredentials, Notification, NotificationKind, Provider, ProviderAccepted, ProviderError,
};

/// Apple accepts a provider token for an hour and refuses new ones more often than every
/// 20 minutes (`TooManyProviderTokenUpdates`); 50 minutes sits inside that window.
pub const TOKEN_REFRESH: Duration = Duration::from_secs(50 * 60);
/// Largest payload of a regular (non-VoIP) notification.
pub const MAX_PAYLOAD: usize = 4096;
/// Longest `apns-collapse-id`.
const MAX_COLLAPSE_ID: usize = 64;

const APNS_ID: HeaderName = HeaderName::from_static("apns-id");
const APNS_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
const APNS_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
const APNS_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
const APNS_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
const APNS_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");

/// The APNs client: one HTTP/2 client (so one multiplexed connection per APNs host) per app.
pub struct ApnsProvider {
    http: HttpConfig,
    production: String,
    sandbox: String,
    apps: AppCache<ApnsApp>,
}

/// What an app's settings turn into.
struct ApnsApp {
    /// Production or sandbox base URL, by the app's `environment`.
    base: String,
    topic: HeaderValue,
    auth: Auth,
    client: reqwest::Client,
}

enum Auth {
    Token(Box<ProviderToken>),
    /// The client certificate is in the app's HTTP client; requests carry no token.
    Certificate,
}

/// The app's provider JWT, shared by all its requests and renewed every [`TOKEN_REFRESH`].
/// Kept as the ready `authorization` value (`bearer <jwt>`): cloning it per request is a
/// reference count, not a formatted string.
struct ProviderToken {
    team_id: String,
    key_id: String,
    key: SigningKey,
    current: Mutex<Option<(HeaderValue, Instant)>>,
}

impl ProviderToken {
    fn get(&self) -> Result<HeaderValue, ProviderError> {
        let mut g = lock(&self.current);
        match &*g {
            Some((t, at)) if at.elapsed() < TOKEN_REFRESH => Ok(t.clone()),
            _ => {
                let t = self.mint()?;
                *g = Some((t.clone(), Instant::now()));
                Ok(t)
            }
        }
    }

    /// A new token after APNs called `rejected` expired, unless a concurrent request already
    /// renewed it (many requests of a busy app hit the expiry together; one renewal is enough
    /// and keeps clear of `TooManyProviderTokenUpdates`).
    fn renew(&self, rejected: &HeaderValue) -> Result<HeaderValue, ProviderError> {
        let mut g = lock(&self.current);
        if let Some((t, _)) = &*g {
            if t != rejected {
                return Ok(t.clone());
            }
        }
        let t = self.mint()?;
        *g = Some((t.clone(), Instant::now()));
        Ok(t)
    }

    fn mint(&self) -> Result<HeaderValue, ProviderError> {
        let jwt = jwt::es256(
            &json!({"alg": "ES256", "kid": self.key_id}),
            &json!({"iss": self.team_id, "iat": unix_now()}),
            &self.key,
        );
        HeaderValue::from_str(&format!("bearer {jwt}"))
            .map_err(|_| bad_settings("apns", "key_id makes an invalid provider token"))
    }
}

impl ApnsProvider {
    /// A client for the given production and sandbox base URLs.
    pub fn new(http: HttpConfig, production: &str, sandbox: &str) -> Self {
        ApnsProvider {
            http,
            production: production.trim_end_matches('/').to_string(),
            sandbox: sandbox.trim_end_matches('/').to_string(),
            apps: AppCache::default(),
        }
    }

    fn build(&self, creds: &Value) -> Result<ApnsApp, ProviderError> {
        let topic = HeaderValue::from_str(setting(creds, "apns", "bundle_id")?)
            .map_err(|_| bad_settings("apns", "bundle_id is not a valid header value"))?;
        let base = match optional_setting(creds, "environment").unwrap_or("production") {
            "production" => self.production.clone(),
            "sandbox" => self.sandbox.clone(),
            other => {
                return Err(bad_settings(
                    "apns",
                    format!("environment must be \"production\" or \"sandbox\", not {other:?}"),
                ))
            }
        };
        // APNs speaks only HTTP/2
        let mut builder = self.http.builder().http2_prior_knowledge();
        let auth = if let Some(cert) = optional_setting(creds, "certificate") {
            let mut pem = cert.to_string();
            if let Some(key) = optional_setting(creds, "certificate_key") {
                pem.push('\n');
                pem.push_str(key);
            }
            let identity = reqwest::Identity::from_pem(pem.as_bytes())
                .map_err(|e| bad_settings("apns", format!("certificate or its key: {e}")))?;
            builder = builder.identity(identity);
            Auth::Certificate
        } else {
            let key = jwt::parse_ec_key(setting(creds, "apns", "private_key")?)
                .map_err(|e| bad_settings("apns", format!("private_key: {e}")))?;
            Auth::Token(Box::new(ProviderToken {
                team_id: setting(creds, "apns", "team_id")?.to_string(),
                key_id: setting(creds, "apns", "key_id")?.to_string(),
                key,
                current: Mutex::new(None),
            }))
        };
        let client = builder
            .build()
            .map_err(|e| bad_settings("apns", format!("cannot build the HTTP client: {e}")))?;
        Ok(ApnsApp {
            base,
            topic,
            auth,
            client,
        })
    }

    async fn send_inner(
        &self,
        app: AppCredentials<'_>,
        device: &Device,
        n: &Notification,
    ) -> Result<ProviderAccepted, ProviderError> {
        let token = device_token(device)?;
        let a = self.apps.get_or_build(app, || self.build(app.creds))?;
        let (mut headers, body) = request(&a.topic, n, now_ms())?;
        let url = format!("{}/3/device/{token}", a.base);
        let Auth::Token(t) = &a.auth else {
            return post(&a.client, &url, headers, body).await;
        };
        let bearer = t.get()?;
        headers.insert(AUTHORIZATION, bearer.clone());
        match post(&a.client, &url, headers, body).await {
            Err(ProviderError::Credentials { detail }) if detail == "ExpiredProviderToken" => {
                // the notification was refused, not delivered: safe to send again
                tracing::info!(
                    app_id = app.app_id,
                    "APNs provider token expired; renewing it once"
                );
                let (mut headers, body) = request(&a.topic, n, now_ms())?;
                headers.insert(AUTHORIZATION, t.renew(&bearer)?);
                post(&a.client, &url, headers, body).await
            }
            other => other,
        }
    }
}

impl Provider for ApnsProvider {
    fn send<'a>(
        &'a self,
        app: AppCredentials<'a>,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Result<ProviderAccepted, ProviderError>> {
        Box::pin(self.send_inner(app, device, notification))
    }
}

/// The device token, which goes into the URL path: hex only, so nothing in it can change the
/// request's path.
fn device_token(device: &Device) -> Result<&str, ProviderError> {
    let token = device.push_token.as_deref().unwrap_or_default();
    if !pushgate_core::Platform::Ios.accepts_push_token(token) {
        return Err(ProviderError::InvalidToken {
            detail: "malformed APNs device token".into(),
        });
    }
    Ok(token)
}

/// Whether a notification shows something: a `retract` and a message without title and text
/// are background (silent) pushes that only wake the app.
fn is_alert(n: &Notification) -> bool {
    n.kind != NotificationKind::Retract && (n.title.is_some() || !n.text.is_empty())
}

/// The JSON payload. An alert sets `mutable-content` so the app's notification service
/// extension can run (fetch the message over XMPP, or drop a stale one) before it shows.
pub(crate) fn payload(n: &Notification) -> Value {
    let aps = if is_alert(n) {
        let mut alert = Map::new();
        if let Some(t) = &n.title {
            alert.insert("title".into(), Value::String(t.clone()));
        }
        alert.insert("body".into(), Value::String(n.text.clone()));
        json!({"alert": alert, "mutable-content": 1})
    } else {
        json!({"content-available": 1})
    };
    let mut root = Map::new();
    root.insert("aps".into(), aps);
    root.insert("message_id".into(), Value::String(n.message_id.clone()));
    root.insert("kind".into(), Value::String(n.kind.as_str().into()));
    if n.kind != NotificationKind::Retract {
        if let Some(d) = &n.data {
            root.insert("data".into(), d.clone());
        }
    }
    Value::Object(root)
}

/// Headers and body of one notification.
pub(crate) fn request(
    topic: &HeaderValue,
    n: &Notification,
    now_ms: i64,
) -> Result<(HeaderMap, Vec<u8>), ProviderError> {
    let body = payload(n).to_string().into_bytes();
    if body.len() > MAX_PAYLOAD {
        return Err(ProviderError::Permanent {
            detail: format!("payload too large ({} bytes > {MAX_PAYLOAD})", body.len()),
        });
    }
    let alert = is_alert(n);
    let collapse = n.collapse_key.as_deref().unwrap_or(&n.message_id);
    if collapse.len() > MAX_COLLAPSE_ID {
        return Err(ProviderError::Permanent {
            detail: format!("collapse key longer than {MAX_COLLAPSE_ID} bytes"),
        });
    }
    let collapse = HeaderValue::from_str(collapse).map_err(|_| ProviderError::Permanent {
        detail: "collapse key is not a valid apns-collapse-id".into(),
    })?;
    let mut h = HeaderMap::with_capacity(8);
    h.insert(
        APNS_PUSH_TYPE,
        HeaderValue::from_static(if alert { "alert" } else { "background" }),
    );
    h.insert(APNS_ID, apns_id(n));
    // Apple stores an undeliverable notification until this time (0: try once, keep nothing);
    // past the message's expiry it must not show up any more
    let expiration = (n.expires_at.max(now_ms) / 1000).max(0);
    h.insert(APNS_EXPIRATION, HeaderValue::from(expiration));
    let high = alert && n.priority == Priority::High;
    // background pushes must use 5; 10 is immediate delivery, which Apple reserves for alerts
    h.insert(
        APNS_PRIORITY,
        HeaderValue::from_static(if high { "10" } else { "5" }),
    );
    h.insert(APNS_TOPIC, topic.clone());
    h.insert(APNS_COLLAPSE_ID, collapse);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok((h, body))
}

/// `apns-id`: the message id when it is a UUID (so Apple's feedback names our message), a
/// fresh one for a retraction (a different notification of the same message) or when it is
/// not.
fn apns_id(n: &Notification) -> HeaderValue {
    let id = match uuid::Uuid::parse_str(&n.message_id) {
        Ok(u) if n.kind != NotificationKind::Retract => u,
        _ => uuid::Uuid::new_v4(),
    };
    let mut buf = uuid::Uuid::encode_buffer();
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-0000-0000-000000000000"))
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    headers: HeaderMap,
    body: Vec<u8>,
) -> Result<ProviderAccepted, ProviderError> {
    let sent_id = headers
        .get(APNS_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let resp = client
        .post(url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .map_err(|e| transport_error("APNs request", &e))?;
    let status = resp.status().as_u16();
    let resp_headers = resp.headers().clone();
    // an unreadable error body leaves the status to decide
    let bytes = super::read_answer(resp).await;
    map_answer(status, &resp_headers, &bytes, sent_id)
}

/// APNs' answer onto the reaction table. `reason` in the body names the error; see Apple's
/// "Handling notification responses from APNs".
pub(crate) fn map_answer(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    sent_id: Option<String>,
) -> Result<ProviderAccepted, ProviderError> {
    if status == 200 {
        let reference = headers
            .get(APNS_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or(sent_id);
        return Ok(ProviderAccepted { reference });
    }
    let reason = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();
    let detail = if reason.is_empty() {
        format!("HTTP {status}")
    } else {
        reason.clone()
    };
    match (status, reason.as_str()) {
        (410, _) | (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => {
            Err(ProviderError::InvalidToken { detail })
        }
        (403, _) => Err(ProviderError::Credentials { detail }),
        (413, _) => Err(ProviderError::Permanent { detail }),
        (429 | 500..=599, _) => Err(by_status(
            status,
            headers,
            format!("HTTP {status} {reason}").trim_end().to_string(),
        )),
        _ => Err(by_status(status, headers, detail)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(kind: NotificationKind) -> Notification {
        Notification {
            kind,
            message_id: "0190a0a0-0000-7000-8000-00000000abcd".into(),
            title: Some("Parcel".into()),
            text: "Your parcel is here".into(),
            data: Some(json!({"parcel": 7})),
            priority: Priority::High,
            collapse_key: None,
            expires_at: 1_700_000_123_456,
        }
    }

    fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn a_channel_push_is_a_high_priority_alert() {
        let topic = HeaderValue::from_static("com.example.app");
        let (h, body) = request(&topic, &note(NotificationKind::Channel), 0).expect("request");
        assert_eq!(header(&h, "apns-push-type"), Some("alert"));
        assert_eq!(header(&h, "apns-priority"), Some("10"));
        assert_eq!(header(&h, "apns-topic"), Some("com.example.app"));
        assert_eq!(header(&h, "apns-expiration"), Some("1700000123"));
        assert_eq!(
            header(&h, "apns-id"),
            Some("0190a0a0-0000-7000-8000-00000000abcd")
        );
        assert_eq!(
            header(&h, "apns-collapse-id"),
            Some("0190a0a0-0000-7000-8000-00000000abcd")
        );
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v,
            json!({
                "aps": {"alert": {"title": "Parcel", "body": "Your parcel is here"}, "mutable-content": 1},
                "message_id": "0190a0a0-0000-7000-8000-00000000abcd",
                "kind": "channel",
                "data": {"parcel": 7}
            })
        );
    }

    #[test]
    fn retractions_and_data_only_pushes_are_background_at_priority_5() {
        let topic = HeaderValue::from_static("t");
        let (h, body) = request(&topic, &note(NotificationKind::Retract), 0).expect("request");
        assert_eq!(header(&h, "apns-push-type"), Some("background"));
        assert_eq!(header(&h, "apns-priority"), Some("5"));
        assert_ne!(
            header(&h, "apns-id"),
            Some("0190a0a0-0000-7000-8000-00000000abcd")
        );
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["aps"], json!({"content-available": 1}));
        assert_eq!(v.get("data"), None);
        let mut silent = note(NotificationKind::Wakeup);
        silent.title = None;
        silent.text.clear();
        silent.priority = Priority::High;
        let (h, _) = request(&topic, &silent, 0).expect("request");
        assert_eq!(header(&h, "apns-push-type"), Some("background"));
        assert_eq!(header(&h, "apns-priority"), Some("5"));
        let mut normal = note(NotificationKind::Wakeup);
        normal.priority = Priority::Normal;
        normal.collapse_key = Some("parcels".into());
        let (h, _) = request(&topic, &normal, 0).expect("request");
        assert_eq!(header(&h, "apns-push-type"), Some("alert"));
        assert_eq!(header(&h, "apns-priority"), Some("5"));
        assert_eq!(header(&h, "apns-collapse-id"), Some("parcels"));
    }

    #[test]
    fn oversized_payloads_and_collapse_ids_are_refused_locally() {
        let topic = HeaderValue::from_static("t");
        let mut big = note(NotificationKind::Channel);
        big.text = "x".repeat(MAX_PAYLOAD);
        let e = request(&topic, &big, 0).err();
        assert!(
            matches!(&e, Some(ProviderError::Permanent { detail }) if detail.starts_with("payload too large")),
            "{e:?}"
        );
        let mut long = note(NotificationKind::Channel);
        long.collapse_key = Some("c".repeat(65));
        assert!(matches!(
            request(&topic, &long, 0),
            Err(ProviderError::Permanent { .. })
        ));
    }

    #[test]
    fn expiry_in_the_past_means_deliver_now_or_never() {
        let topic = HeaderValue::from_static("t");
        let mut n = note(NotificationKind::Channel);
        n.expires_at = 1_000;
        let (h, _) = request(&topic, &n, 5_000_000).expect("request");
        assert_eq!(header(&h, "apns-expiration"), Some("5000"));
    }

    fn answer(status: u16, reason: &str) -> Result<ProviderAccepted, ProviderError> {
        let body = json!({"reason": reason}).to_string();
        map_answer(status, &HeaderMap::new(), body.as_bytes(), None)
    }

    #[test]
    fn every_documented_answer_maps_onto_the_reaction_table() {
        for (s, r) in [
            (410, "Unregistered"),
            (400, "BadDeviceToken"),
            (400, "DeviceTokenNotForTopic"),
        ] {
            assert_eq!(
                answer(s, r),
                Err(ProviderError::InvalidToken { detail: r.into() })
            );
        }
        for (s, r) in [
            (413, "PayloadTooLarge"),
            (400, "BadTopic"),
            (400, "MissingTopic"),
            (400, "TopicDisallowed"),
            (400, "BadCollapseId"),
            (405, "MethodNotAllowed"),
        ] {
            assert_eq!(
                answer(s, r),
                Err(ProviderError::Permanent { detail: r.into() })
            );
        }
        for r in [
            "InvalidProviderToken",
            "ExpiredProviderToken",
            "BadCertificate",
            "BadCertificateEnvironment",
            "MissingProviderToken",
        ] {
            assert_eq!(
                answer(403, r),
                Err(ProviderError::Credentials { detail: r.into() })
            );
        }
        for (s, r) in [
            (429, "TooManyRequests"),
            (500, "InternalServerError"),
            (503, "ServiceUnavailable"),
        ] {
            assert_eq!(
                answer(s, r),
                Err(ProviderError::Retryable {
                    retry_after: None,
                    detail: format!("HTTP {s} {r}")
                })
            );
        }
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(
            map_answer(503, &h, b"", None),
            Err(ProviderError::Retryable {
                retry_after: Some(Duration::from_secs(3)),
                detail: "HTTP 503".into()
            })
        );
        h.insert("apns-id", HeaderValue::from_static("abc"));
        assert_eq!(
            map_answer(200, &h, b"", Some("sent".into())),
            Ok(ProviderAccepted {
                reference: Some("abc".into())
            })
        );
        assert_eq!(
            map_answer(200, &HeaderMap::new(), b"", Some("sent".into())),
            Ok(ProviderAccepted {
                reference: Some("sent".into())
            })
        );
    }

    #[test]
    fn device_tokens_must_be_hex() {
        let mut d = Device {
            app_id: "a".into(),
            device_id: "d".into(),
            user_id: "u".into(),
            platform: pushgate_core::Platform::Ios,
            push_token: Some("00ffAB".into()),
            webpush: None,
            phone: None,
            locale: None,
            jid_local: "j".into(),
            generation: 0,
            token_state: pushgate_core::TokenState::Valid,
            scram: pushgate_core::ScramCredentials {
                salt: String::new(),
                iterations: 1,
                stored_key: String::new(),
                server_key: String::new(),
            },
            created_at: 0,
            updated_at: 0,
        };
        assert_eq!(device_token(&d).ok(), Some("00ffAB"));
        for bad in ["", "00/../x", "zz"] {
            d.push_token = Some(bad.into());
            assert!(matches!(
                device_token(&d),
                Err(ProviderError::InvalidToken { .. })
            ));
        }
    }

    #[test]
    fn provider_tokens_are_reused_and_renewed_once() {
        let t = ProviderToken {
            team_id: "TEAM".into(),
            key_id: "KEY".into(),
            key: SigningKey::random(&mut rand::rngs::OsRng),
            current: Mutex::new(None),
        };
        let first = t.get().expect("token");
        assert_eq!(t.get().ok(), Some(first.clone()));
        let jwt = first
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("bearer "))
            .expect("bearer value");
        let (h, c) = jwt::verify_es256(jwt, t.key.verifying_key()).expect("valid");
        assert_eq!(
            (h["kid"].as_str(), c["iss"].as_str()),
            (Some("KEY"), Some("TEAM"))
        );
        assert!(c["iat"]
            .as_i64()
            .is_some_and(|iat| (iat - unix_now()).abs() < 60));
        // two requests rejected with the same token: one renewal
        let renewed = t.renew(&first).expect("renewed");
        assert_eq!(t.renew(&first).ok(), Some(renewed.clone()));
        assert_eq!(t.get().ok(), Some(renewed));
    }
}
