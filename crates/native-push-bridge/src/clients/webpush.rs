//! Web Push: RFC 8030 `POST` to the subscription's endpoint, the body encrypted for the
//! browser (RFC 8291, [`super::ece`]), the sender identified by VAPID (RFC 8292).
//!
//! App settings (`App.providers.webpush`): `vapid_private_key` (P-256, PEM or the raw
//! base64url scalar web-push libraries print; its public half is the
//! `applicationServerKey` the web app subscribed with) and `subject` (`mailto:` or `https:`
//! contact the push services can reach the operator at).

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use p256::ecdsa::SigningKey;
use pushgate_core::time::now_ms;
use pushgate_core::{Device, Priority};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, LOCATION};
use serde_json::{json, Map, Value};

use super::ece::{self, EceError, Receiver};
use super::{
    bad_settings, jwt, lock, retry_after, seconds_left, setting, transport_error, unix_now,
    AppCache, HttpConfig,
};
use crate::provider::{
    AppCredentials, Notification, NotificationKind, Provider, ProviderAccepted, ProviderError,
};

/// VAPID tokens are made for 12 hours (RFC 8292 allows at most 24)…
const VAPID_LIFETIME: i64 = 12 * 3600;
/// …and replaced when less than an hour is left, so no token expires on its way.
const VAPID_RENEW_BEFORE: i64 = 3600;
/// Push service origins remembered per app; past this the memo starts afresh.
const MAX_ORIGINS: usize = 1024;
/// Longest RFC 8030 `Topic`.
const MAX_TOPIC: usize = 32;

const TTL: HeaderName = HeaderName::from_static("ttl");
const URGENCY: HeaderName = HeaderName::from_static("urgency");
const TOPIC: HeaderName = HeaderName::from_static("topic");
const CONTENT_ENCODING: HeaderName = HeaderName::from_static("content-encoding");

/// The Web Push client: one HTTP client per app (its connections go to the push services its
/// users' browsers subscribed with).
pub struct WebPushProvider {
    http: HttpConfig,
    apps: AppCache<WebPushApp>,
}

struct WebPushApp {
    key: SigningKey,
    /// base64url of the uncompressed public key, the `k` of the VAPID header.
    public_key: String,
    subject: String,
    client: reqwest::Client,
    /// VAPID token per push service origin (the token's `aud`) with its `exp`.
    tokens: Mutex<HashMap<String, (String, i64)>>,
}

impl WebPushApp {
    fn vapid(&self, origin: &str) -> String {
        let now = unix_now();
        let mut g = lock(&self.tokens);
        if let Some((t, exp)) = g.get(origin) {
            if exp - now > VAPID_RENEW_BEFORE {
                return format!("vapid t={t}, k={}", self.public_key);
            }
        }
        let exp = now + VAPID_LIFETIME;
        let t = jwt::es256(
            &json!({"typ": "JWT", "alg": "ES256"}),
            &json!({"aud": origin, "exp": exp, "sub": self.subject}),
            &self.key,
        );
        if g.len() >= MAX_ORIGINS {
            g.clear();
        }
        g.insert(origin.to_string(), (t.clone(), exp));
        format!("vapid t={t}, k={}", self.public_key)
    }
}

impl WebPushProvider {
    /// A client using `http` for every push service.
    pub fn new(http: HttpConfig) -> Self {
        WebPushProvider {
            http,
            apps: AppCache::default(),
        }
    }

    fn build(&self, creds: &Value) -> Result<WebPushApp, ProviderError> {
        let key = jwt::parse_ec_key(setting(creds, "webpush", "vapid_private_key")?)
            .map_err(|e| bad_settings("webpush", format!("vapid_private_key: {e}")))?;
        let subject = setting(creds, "webpush", "subject")?;
        if !(subject.starts_with("mailto:") || subject.starts_with("https://")) {
            return Err(bad_settings(
                "webpush",
                "subject must be a mailto: or https: URI (RFC 8292 §2.1)",
            ));
        }
        let public_key = jwt::b64url(key.verifying_key().to_encoded_point(false).as_bytes());
        let client =
            self.http.builder().build().map_err(|e| {
                bad_settings("webpush", format!("cannot build the HTTP client: {e}"))
            })?;
        Ok(WebPushApp {
            key,
            public_key,
            subject: subject.to_string(),
            client,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    async fn send_inner(
        &self,
        app: AppCredentials<'_>,
        device: &Device,
        n: &Notification,
    ) -> Result<ProviderAccepted, ProviderError> {
        let sub = device
            .webpush
            .as_ref()
            .ok_or_else(|| ProviderError::InvalidToken {
                detail: "device has no Web Push subscription".into(),
            })?;
        let invalid = |detail: String| ProviderError::InvalidToken { detail };
        let endpoint = url::Url::parse(&sub.endpoint)
            .map_err(|e| invalid(format!("subscription endpoint is not a URL: {e}")))?;
        // push services are HTTPS only (RFC 8030 §8); anything else is not a subscription
        if endpoint.scheme() != "https" || endpoint.host().is_none() {
            return Err(invalid("subscription endpoint is not an https URL".into()));
        }
        let p256dh = jwt::b64url_decode(&sub.p256dh)
            .map_err(|_| invalid("subscription key p256dh is not base64url".into()))?;
        let auth = jwt::b64url_decode(&sub.auth)
            .map_err(|_| invalid("subscription auth secret is not base64url".into()))?;
        let receiver = Receiver::from_raw(&p256dh, &auth).map_err(|e| invalid(e.to_string()))?;
        let body =
            ece::encrypt(plaintext(n).to_string().as_bytes(), &receiver).map_err(|e| match e {
                EceError::TooLarge(_) => ProviderError::Permanent {
                    detail: e.to_string(),
                },
                other => ProviderError::Unknown {
                    detail: other.to_string(),
                },
            })?;
        let a = self.apps.get_or_build(app, || self.build(app.creds))?;
        let origin = endpoint.origin().ascii_serialization();
        let mut headers = headers(n, now_ms());
        let vapid =
            HeaderValue::from_str(&a.vapid(&origin)).map_err(|_| ProviderError::Unknown {
                detail: "VAPID header is not a valid header value".into(),
            })?;
        headers.insert(AUTHORIZATION, vapid);
        let resp = a
            .client
            .post(endpoint)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error("Web Push request", &e))?;
        let status = resp.status().as_u16();
        let resp_headers = resp.headers().clone();
        let text = String::from_utf8_lossy(&super::read_answer(resp).await).into_owned();
        map_answer(status, &resp_headers, &text)
    }
}

impl Provider for WebPushProvider {
    fn send<'a>(
        &'a self,
        app: AppCredentials<'a>,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Result<ProviderAccepted, ProviderError>> {
        Box::pin(self.send_inner(app, device, notification))
    }
}

/// What the service worker receives (decrypted): the message's id, kind, title, text and
/// data; a retraction carries only the id and kind.
pub(crate) fn plaintext(n: &Notification) -> Value {
    let mut m = Map::new();
    m.insert("message_id".into(), Value::String(n.message_id.clone()));
    m.insert("kind".into(), Value::String(n.kind.as_str().into()));
    if n.kind != NotificationKind::Retract {
        if let Some(t) = &n.title {
            m.insert("title".into(), Value::String(t.clone()));
        }
        m.insert("body".into(), Value::String(n.text.clone()));
        if let Some(d) = &n.data {
            m.insert("data".into(), d.clone());
        }
    }
    Value::Object(m)
}

/// RFC 8030 `Topic`: the collapse key, else the message id without its hyphens (a UUID's 32
/// hex digits), so a retraction replaces its undelivered original at the push service. A
/// value that is not base64url or longer than 32 characters cannot be a topic and is left out.
pub(crate) fn topic(n: &Notification) -> Option<String> {
    let t = match &n.collapse_key {
        Some(c) => c.clone(),
        None => n.message_id.replace('-', ""),
    };
    let ok = !t.is_empty()
        && t.len() <= MAX_TOPIC
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(t)
}

/// Everything but the VAPID authorization.
pub(crate) fn headers(n: &Notification, now_ms: i64) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(6);
    h.insert(TTL, HeaderValue::from(seconds_left(n.expires_at, now_ms)));
    // `very-low`/`low` would let the browser hold the message back on battery; a message
    // is either urgent or normal here
    h.insert(
        URGENCY,
        HeaderValue::from_static(
            if n.priority == Priority::High && n.kind != NotificationKind::Retract {
                "high"
            } else {
                "normal"
            },
        ),
    );
    if let Some(t) = topic(n).and_then(|t| HeaderValue::from_str(&t).ok()) {
        h.insert(TOPIC, t);
    }
    h.insert(CONTENT_ENCODING, HeaderValue::from_static("aes128gcm"));
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h
}

/// The push service's answer onto the reaction table (RFC 8030 §5, RFC 8292 §4).
pub(crate) fn map_answer(
    status: u16,
    headers: &HeaderMap,
    body: &str,
) -> Result<ProviderAccepted, ProviderError> {
    let body = body.trim();
    let detail = if body.is_empty() || body.len() > 200 {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {body}")
    };
    match status {
        200..=202 => Ok(ProviderAccepted {
            reference: headers
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        }),
        404 | 410 => Err(ProviderError::InvalidToken { detail }),
        413 => Err(ProviderError::Permanent { detail }),
        400 | 401 | 403 => Err(ProviderError::Credentials { detail }),
        429 | 500..=599 => Err(ProviderError::Retryable {
            retry_after: retry_after(headers),
            detail,
        }),
        400..=499 => Err(ProviderError::Permanent { detail }),
        _ => Err(ProviderError::Unknown { detail }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn note(kind: NotificationKind) -> Notification {
        Notification {
            kind,
            message_id: "0190a0a0-0000-7000-8000-00000000abcd".into(),
            title: Some("Parcel".into()),
            text: "here".into(),
            data: Some(json!({"parcel": 7})),
            priority: Priority::High,
            collapse_key: None,
            expires_at: 30_000,
        }
    }

    fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn headers_carry_ttl_urgency_and_topic() {
        let h = headers(&note(NotificationKind::Channel), 0);
        assert_eq!(header(&h, "ttl"), Some("30"));
        assert_eq!(header(&h, "urgency"), Some("high"));
        assert_eq!(
            header(&h, "topic"),
            Some("0190a0a000007000800000000000abcd")
        );
        assert_eq!(header(&h, "content-encoding"), Some("aes128gcm"));
        let mut n = note(NotificationKind::Retract);
        n.collapse_key = Some("parcels".into());
        let h = headers(&n, 40_000);
        assert_eq!(header(&h, "ttl"), Some("0"));
        assert_eq!(header(&h, "urgency"), Some("normal"));
        assert_eq!(header(&h, "topic"), Some("parcels"));
    }

    #[test]
    fn topics_must_be_short_base64url() {
        let mut n = note(NotificationKind::Channel);
        assert_eq!(
            topic(&n).as_deref(),
            Some("0190a0a000007000800000000000abcd")
        );
        n.message_id = "not-a-uuid-but-much-longer-than-thirty-two".into();
        assert_eq!(topic(&n), None);
        n.collapse_key = Some("a b".into());
        assert_eq!(topic(&n), None);
        n.collapse_key = Some("x".repeat(33));
        assert_eq!(topic(&n), None);
        n.collapse_key = Some("x".repeat(32));
        assert_eq!(topic(&n).map(|t| t.len()), Some(32));
    }

    #[test]
    fn the_plaintext_is_what_the_service_worker_reads() {
        assert_eq!(
            plaintext(&note(NotificationKind::Channel)),
            json!({"message_id": "0190a0a0-0000-7000-8000-00000000abcd", "kind": "channel",
                   "title": "Parcel", "body": "here", "data": {"parcel": 7}})
        );
        assert_eq!(
            plaintext(&note(NotificationKind::Retract)),
            json!({"message_id": "0190a0a0-0000-7000-8000-00000000abcd", "kind": "retract"})
        );
    }

    #[test]
    fn every_documented_answer_maps_onto_the_reaction_table() {
        let mut h = HeaderMap::new();
        h.insert(
            LOCATION,
            HeaderValue::from_static("https://push.example/m/1"),
        );
        for s in [201, 202] {
            assert_eq!(
                map_answer(s, &h, ""),
                Ok(ProviderAccepted {
                    reference: Some("https://push.example/m/1".into())
                })
            );
        }
        for s in [404, 410] {
            assert!(matches!(
                map_answer(s, &h, ""),
                Err(ProviderError::InvalidToken { .. })
            ));
        }
        assert!(matches!(
            map_answer(413, &h, ""),
            Err(ProviderError::Permanent { .. })
        ));
        for s in [400, 401, 403] {
            assert!(matches!(
                map_answer(s, &h, ""),
                Err(ProviderError::Credentials { .. })
            ));
        }
        h.insert("retry-after", HeaderValue::from_static("4"));
        for s in [429, 500, 503] {
            assert_eq!(
                map_answer(s, &h, "busy"),
                Err(ProviderError::Retryable {
                    retry_after: Some(Duration::from_secs(4)),
                    detail: format!("HTTP {s}: busy")
                })
            );
        }
    }
}
