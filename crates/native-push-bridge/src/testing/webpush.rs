//! Web Push stand-in: a push service with subscriptions it creates itself (so it holds each
//! browser's private key and auth secret), which checks the VAPID token (signature by `k`,
//! `k` matching the subscription's application server key, `aud` = its origin, `exp` at
//! most 24 h ahead), the RFC 8030 headers, and decrypts the RFC 8291 body.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use p256::ecdsa::VerifyingKey;
use p256::SecretKey;
use pushgate_core::WebPushSubscription;
use serde_json::Value;

use super::{header_map, serve, unix_now, Answer, Log, Pki, Received, Served, StandInError};
use crate::clients::{ece, jwt, lock};

/// The Web Push stand-in.
pub struct WebPushStandIn {
    /// Origin of the subscription endpoints.
    pub url: String,
    state: Arc<WebPushState>,
    _served: Served,
}

struct Subscription {
    key: SecretKey,
    auth: [u8; 16],
    /// The application server key (VAPID public key, raw) the subscription was made for.
    server_key: Vec<u8>,
}

struct WebPushState {
    origin: std::sync::OnceLock<String>,
    subscriptions: Mutex<HashMap<String, Subscription>>,
    log: Log,
}

impl WebPushStandIn {
    /// Starts the stand-in.
    pub async fn start(pki: &Pki) -> Result<WebPushStandIn, StandInError> {
        let state = Arc::new(WebPushState {
            origin: std::sync::OnceLock::new(),
            subscriptions: Mutex::new(HashMap::new()),
            log: Log::default(),
        });
        let router = Router::new()
            .route("/push/{id}", post(push))
            .with_state(state.clone());
        let served = serve(pki.server_config(&[b"h2", b"http/1.1"], None)?, router).await?;
        let _ = state.origin.set(served.url.clone());
        Ok(WebPushStandIn {
            url: served.url.clone(),
            state,
            _served: served,
        })
    }

    /// A new subscription for the app whose VAPID public key is `application_server_key`
    /// (base64url, as the web app passes it to `pushManager.subscribe`), as the browser would
    /// hand it to the app server.
    pub fn subscribe(&self, application_server_key: &str) -> WebPushSubscription {
        let key = SecretKey::random(&mut rand::rngs::OsRng);
        let mut auth = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut auth);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let sub = WebPushSubscription {
            endpoint: format!("{}/push/{id}", self.url),
            p256dh: jwt::b64url(&key.public_key().to_sec1_bytes()),
            auth: jwt::b64url(&auth),
        };
        lock(&self.state.subscriptions).insert(
            id,
            Subscription {
                key,
                auth,
                server_key: jwt::b64url_decode(application_server_key).unwrap_or_default(),
            },
        );
        sub
    }

    /// Ends a subscription (the user revoked the permission): pushes to it get 410.
    pub fn unsubscribe(&self, sub: &WebPushSubscription) {
        lock(&self.state.subscriptions).remove(id_of(sub));
    }

    /// Answers the next pushes to `sub` with `answers`, in order (after the checks).
    pub fn script(&self, sub: &WebPushSubscription, answers: impl IntoIterator<Item = Answer>) {
        self.state.log.script(id_of(sub), answers);
    }

    /// Pushes received so far (bodies decrypted).
    pub fn received(&self) -> Vec<Received> {
        self.state.log.received()
    }

    /// Pushes received for one subscription.
    pub fn received_for(&self, sub: &WebPushSubscription) -> Vec<Received> {
        let path = format!("/push/{}", id_of(sub));
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

fn id_of(sub: &WebPushSubscription) -> &str {
    sub.endpoint.rsplit('/').next().unwrap_or_default()
}

async fn push(
    State(st): State<Arc<WebPushState>>,
    Path(id): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut rec = Received {
        path: format!("/push/{id}"),
        headers: header_map(&headers),
        body: Value::Null,
        auth: String::new(),
        http2: version == Version::HTTP_2,
        rejected: None,
    };
    let verdict = check(&st, &id, &headers, &body, &mut rec);
    if let Err((status, why)) = verdict {
        rec.rejected = Some(why.to_string());
        rec.auth.clear();
        st.log.record(rec);
        return (
            axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::BAD_REQUEST),
            why,
        )
            .into_response();
    }
    st.log.record(rec);
    if let Some(a) = st.log.next(&id) {
        return a.into_response();
    }
    st.log.accepted();
    let origin = st.origin.get().cloned().unwrap_or_default();
    let mut a = Answer::empty(201);
    a.headers.push((
        "location".into(),
        format!("{origin}/message/{}", uuid::Uuid::new_v4().simple()),
    ));
    a.into_response()
}

/// The push service's checks; the first failure is the answer.
fn check(
    st: &WebPushState,
    id: &str,
    headers: &HeaderMap,
    body: &[u8],
    rec: &mut Received,
) -> Result<(), (u16, &'static str)> {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let subs = lock(&st.subscriptions);
    let Some(sub) = subs.get(id) else {
        return Err((410, "subscription expired or unsubscribed"));
    };
    // Authorization: vapid t=<jwt>, k=<key>
    let params = h("authorization")
        .and_then(|a| a.strip_prefix("vapid "))
        .ok_or((401, "missing VAPID authorization"))?;
    let (mut t, mut k) = (None, None);
    for part in params.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.trim()),
            Some(("k", v)) => k = Some(v.trim()),
            _ => {}
        }
    }
    let (t, k) = t.zip(k).ok_or((401, "VAPID authorization needs t and k"))?;
    let k = jwt::b64url_decode(k).map_err(|_| (401, "VAPID k is not base64url"))?;
    if k != sub.server_key {
        return Err((403, "VAPID key does not match the subscription"));
    }
    let key = VerifyingKey::from_sec1_bytes(&k).map_err(|_| (401, "VAPID k is not a P-256 key"))?;
    let (_, claims) = jwt::verify_es256(t, &key).ok_or((403, "VAPID signature invalid"))?;
    let origin = st.origin.get().map(String::as_str).unwrap_or_default();
    let aud = claims["aud"].as_str().unwrap_or_default();
    if aud != origin {
        return Err((403, "VAPID aud is not this push service"));
    }
    let exp = claims["exp"].as_i64().unwrap_or(0);
    let now = unix_now();
    if exp <= now || exp > now + 24 * 3600 {
        return Err((403, "VAPID exp must be within 24 hours"));
    }
    let sub_claim = claims["sub"].as_str().unwrap_or_default();
    if !(sub_claim.starts_with("mailto:") || sub_claim.starts_with("https:")) {
        return Err((403, "VAPID sub must be a mailto: or https: URI"));
    }
    rec.auth = format!("vapid {aud} {sub_claim}");
    if h("ttl").is_none_or(|t| t.parse::<u64>().is_err()) {
        return Err((400, "TTL header required"));
    }
    if let Some(u) = h("urgency") {
        if !matches!(u, "very-low" | "low" | "normal" | "high") {
            return Err((400, "bad Urgency"));
        }
    }
    if let Some(topic) = h("topic") {
        let ok = topic.len() <= 32
            && topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err((400, "bad Topic"));
        }
    }
    if h("content-encoding") != Some("aes128gcm") {
        return Err((415, "Content-Encoding must be aes128gcm"));
    }
    if body.len() > ece::MAX_BODY {
        return Err((413, "payload too large"));
    }
    let plain =
        ece::decrypt(body, &sub.key, &sub.auth).map_err(|_| (400, "cannot decrypt the payload"))?;
    rec.body = serde_json::from_slice(&plain).map_err(|_| (400, "payload is not JSON"))?;
    Ok(())
}
