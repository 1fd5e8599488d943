//! Huawei Push Kit (HMS): `POST {base}/v1/{app_id}/messages:send` with an OAuth 2.0 access
//! token from the client-credentials grant.
//!
//! App settings (`App.providers.hms`): `app_id` (the AppGallery Connect app id),
//! `client_secret` (the app secret), and `client_id` when it differs from `app_id` (OAuth
//! clients created separately in AppGallery Connect).

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use pushgate_core::time::now_ms;
use pushgate_core::{Device, Priority};
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Map, Value};

use super::fcm::oauth_token;
use super::{
    bad_settings, by_status, optional_setting, retry_after, seconds_left, setting, transport_error,
    AppCache, HttpConfig,
};
use crate::provider::{
    AppCredentials, Notification, NotificationKind, Provider, ProviderAccepted, ProviderError,
};

/// Replace an access token this long before it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// Push Kit result codes (`code` in the answer body).
const SUCCESS: &str = "80000000";
const PARTIAL: &str = "80100000";
const OAUTH_FAILED: &str = "80200001";
const OAUTH_EXPIRED: &str = "80200003";
const NO_PERMISSION: &str = "80300002";
const ALL_TOKENS_INVALID: &str = "80300007";
const TOO_LARGE: &str = "80300008";
const INTERNAL: &str = "81000001";

/// The HMS client: one HTTP client per app.
pub struct HmsProvider {
    http: HttpConfig,
    base: String,
    token_url: String,
    apps: AppCache<HmsApp>,
}

struct HmsApp {
    app_id: String,
    client_id: String,
    client_secret: String,
    client: reqwest::Client,
    /// The access token and when to replace it; held across a token request so concurrent
    /// pushes share one.
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl HmsApp {
    async fn access_token(&self, token_url: &str) -> Result<String, ProviderError> {
        let mut g = self.token.lock().await;
        if let Some((t, refresh_at)) = &*g {
            if Instant::now() < *refresh_at {
                return Ok(t.clone());
            }
        }
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &self.client_id)
            .append_pair("client_secret", &self.client_secret)
            .finish();
        let (t, lifetime) = oauth_token(&self.client, token_url, form, "hms").await?;
        *g = Some((
            t.clone(),
            Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN),
        ));
        Ok(t)
    }

    async fn forget(&self, rejected: &str) {
        let mut g = self.token.lock().await;
        if g.as_ref().is_some_and(|(t, _)| t == rejected) {
            *g = None;
        }
    }
}

impl HmsProvider {
    /// A client for the given Push Kit and OAuth token URLs.
    pub fn new(http: HttpConfig, base: &str, token_url: &str) -> Self {
        HmsProvider {
            http,
            base: base.trim_end_matches('/').to_string(),
            token_url: token_url.to_string(),
            apps: AppCache::default(),
        }
    }

    fn build(&self, creds: &Value) -> Result<HmsApp, ProviderError> {
        let app_id = setting(creds, "hms", "app_id")?;
        if !app_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad_settings("hms", "app_id must be alphanumeric"));
        }
        let client = self
            .http
            .builder()
            .build()
            .map_err(|e| bad_settings("hms", format!("cannot build the HTTP client: {e}")))?;
        Ok(HmsApp {
            app_id: app_id.to_string(),
            client_id: optional_setting(creds, "client_id")
                .unwrap_or(app_id)
                .to_string(),
            client_secret: setting(creds, "hms", "client_secret")?.to_string(),
            client,
            token: tokio::sync::Mutex::new(None),
        })
    }

    async fn send_inner(
        &self,
        app: AppCredentials<'_>,
        device: &Device,
        n: &Notification,
    ) -> Result<ProviderAccepted, ProviderError> {
        let token = device
            .push_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ProviderError::InvalidToken {
                detail: "device has no HMS push token".into(),
            })?;
        let a = self.apps.get_or_build(app, || self.build(app.creds))?;
        let url = format!("{}/v1/{}/messages:send", self.base, a.app_id);
        let body = message(token, n, now_ms()).to_string();
        let bearer = a.access_token(&self.token_url).await?;
        match post(&a.client, &url, &body, &bearer, token).await {
            Err(ProviderError::Credentials { detail })
                if detail.starts_with(OAUTH_FAILED) || detail.starts_with(OAUTH_EXPIRED) =>
            {
                // Push Kit refused the token, not the message: once more with a fresh one
                a.forget(&bearer).await;
                let bearer = a.access_token(&self.token_url).await?;
                post(&a.client, &url, &body, &bearer, token).await
            }
            other => other,
        }
    }
}

impl Provider for HmsProvider {
    fn send<'a>(
        &'a self,
        app: AppCredentials<'a>,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Result<ProviderAccepted, ProviderError>> {
        Box::pin(self.send_inner(app, device, notification))
    }
}

/// Push Kit's `collapse_key` is a number: -1 keeps every offline message, 0–100 keep only the
/// latest of that group. A numeric collapse key in range is passed on; any other one cannot be
/// mapped without merging unrelated groups, so it only becomes the notification `tag` (which
/// replaces a shown notification) and offline messages are all kept.
pub(crate) fn collapse_key(n: &Notification) -> i64 {
    n.collapse_key
        .as_deref()
        .and_then(|c| c.parse::<i64>().ok())
        .filter(|c| (0..=100).contains(c))
        .unwrap_or(-1)
}

/// The `messages:send` body. `data` is a JSON string (Push Kit passes it to the app as is)
/// with `message_id`, `kind` and the message's data; a retraction is data-only.
pub(crate) fn message(token: &str, n: &Notification, now_ms: i64) -> Value {
    let mut data = Map::new();
    data.insert("message_id".into(), Value::String(n.message_id.clone()));
    data.insert("kind".into(), Value::String(n.kind.as_str().into()));
    if n.kind != NotificationKind::Retract {
        if let Some(d) = &n.data {
            data.insert("data".into(), d.clone());
        }
    }
    let mut android = json!({
        "urgency": if n.priority == Priority::High { "HIGH" } else { "NORMAL" },
        "ttl": seconds_left(n.expires_at, now_ms).to_string(),
        "collapse_key": collapse_key(n),
    });
    let mut msg = json!({
        "token": [token],
        "data": Value::Object(data).to_string(),
    });
    if n.kind != NotificationKind::Retract {
        let mut notification = Map::new();
        if let Some(t) = &n.title {
            notification.insert("title".into(), Value::String(t.clone()));
        }
        notification.insert("body".into(), Value::String(n.text.clone()));
        msg["notification"] = Value::Object(notification);
        // click_action is mandatory for notification messages; type 3 opens the app
        android["notification"] = json!({
            "tag": n.collapse_key.as_deref().unwrap_or(&n.message_id),
            "click_action": {"type": 3},
        });
    }
    msg["android"] = android;
    json!({"validate_only": false, "message": msg})
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &str,
    bearer: &str,
    token: &str,
) -> Result<ProviderAccepted, ProviderError> {
    let resp = client
        .post(url)
        .header(AUTHORIZATION, format!("Bearer {bearer}"))
        .header(CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| transport_error("HMS request", &e))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = super::read_answer(resp).await;
    map_answer(status, &headers, &bytes, token)
}

/// Push Kit's answer onto the reaction table, by the result `code` (the HTTP status only when
/// the body has none). Illegal tokens are listed in `msg` (a JSON text) for partial results.
pub(crate) fn map_answer(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    token: &str,
) -> Result<ProviderAccepted, ProviderError> {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let code = match v.get("code") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let msg = v.get("msg").and_then(Value::as_str).unwrap_or("");
    let detail = match (code.is_empty(), msg.is_empty()) {
        (true, _) => format!("HTTP {status}"),
        (false, true) => code.clone(),
        (false, false) => format!("{code} {msg}"),
    };
    match code.as_str() {
        SUCCESS => Ok(ProviderAccepted {
            reference: v
                .get("requestId")
                .and_then(Value::as_str)
                .map(str::to_string),
        }),
        ALL_TOKENS_INVALID => Err(ProviderError::InvalidToken { detail }),
        PARTIAL => {
            let illegal = serde_json::from_str::<Value>(msg)
                .ok()
                .and_then(|m| m.get("illegal_tokens").and_then(Value::as_array).cloned())
                .unwrap_or_default();
            if illegal.is_empty() || illegal.iter().any(|t| t.as_str() == Some(token)) {
                // one token per request: a partial result is this token failing
                Err(ProviderError::InvalidToken {
                    detail: format!("{PARTIAL} illegal token"),
                })
            } else {
                Err(ProviderError::Permanent { detail })
            }
        }
        OAUTH_FAILED | OAUTH_EXPIRED | NO_PERMISSION => Err(ProviderError::Credentials { detail }),
        TOO_LARGE => Err(ProviderError::Permanent { detail }),
        INTERNAL => Err(ProviderError::Retryable {
            retry_after: retry_after(headers),
            detail,
        }),
        _ if status == 401 || status == 403 => Err(ProviderError::Credentials { detail }),
        // other result codes with a 200 are refusals of the message's content or options
        _ if (200..300).contains(&status) => Err(ProviderError::Permanent { detail }),
        _ => Err(by_status(status, headers, detail)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(kind: NotificationKind, collapse: Option<&str>) -> Notification {
        Notification {
            kind,
            message_id: "m-1".into(),
            title: None,
            text: "here".into(),
            data: Some(json!({"parcel": 7})),
            priority: Priority::Normal,
            collapse_key: collapse.map(str::to_string),
            expires_at: 60_000,
        }
    }

    #[test]
    fn a_channel_message_has_notification_data_text_and_android_options() {
        let v = message("tok", &note(NotificationKind::Channel, Some("7")), 0);
        let data: Value =
            serde_json::from_str(v["message"]["data"].as_str().expect("data is text"))
                .expect("data is JSON");
        assert_eq!(
            data,
            json!({"message_id": "m-1", "kind": "channel", "data": {"parcel": 7}})
        );
        assert_eq!(v["validate_only"], json!(false));
        assert_eq!(v["message"]["token"], json!(["tok"]));
        assert_eq!(v["message"]["notification"], json!({"body": "here"}));
        assert_eq!(
            v["message"]["android"],
            json!({"urgency": "NORMAL", "ttl": "60", "collapse_key": 7,
                   "notification": {"tag": "7", "click_action": {"type": 3}}})
        );
    }

    #[test]
    fn retractions_are_data_only() {
        let v = message("tok", &note(NotificationKind::Retract, None), 0);
        assert_eq!(v["message"].get("notification"), None);
        assert_eq!(v["message"]["android"].get("notification"), None);
        assert_eq!(v["message"]["android"]["collapse_key"], json!(-1));
    }

    #[test]
    fn only_numeric_collapse_keys_in_range_are_passed_on() {
        for (c, want) in [
            (None, -1),
            (Some("0"), 0),
            (Some("100"), 100),
            (Some("101"), -1),
            (Some("-5"), -1),
            (Some("parcels"), -1),
        ] {
            assert_eq!(
                collapse_key(&note(NotificationKind::Channel, c)),
                want,
                "{c:?}"
            );
        }
    }

    fn answer(status: u16, code: &str, msg: &str) -> Result<ProviderAccepted, ProviderError> {
        let body = json!({"code": code, "msg": msg, "requestId": "r-1"}).to_string();
        map_answer(status, &HeaderMap::new(), body.as_bytes(), "tok")
    }

    #[test]
    fn every_documented_answer_maps_onto_the_reaction_table() {
        assert_eq!(
            answer(200, SUCCESS, "Success"),
            Ok(ProviderAccepted {
                reference: Some("r-1".into())
            })
        );
        assert!(matches!(
            answer(400, ALL_TOKENS_INVALID, "All the tokens are invalid"),
            Err(ProviderError::InvalidToken { .. })
        ));
        let partial = json!({"success": 0, "failure": 1, "illegal_tokens": ["tok"]}).to_string();
        assert!(matches!(
            answer(200, PARTIAL, &partial),
            Err(ProviderError::InvalidToken { .. })
        ));
        let other = json!({"success": 0, "failure": 1, "illegal_tokens": ["else"]}).to_string();
        assert!(matches!(
            answer(200, PARTIAL, &other),
            Err(ProviderError::Permanent { .. })
        ));
        for c in [OAUTH_FAILED, OAUTH_EXPIRED, NO_PERMISSION] {
            assert!(matches!(
                answer(401, c, "x"),
                Err(ProviderError::Credentials { .. })
            ));
        }
        assert!(matches!(
            answer(200, TOO_LARGE, "too big"),
            Err(ProviderError::Permanent { .. })
        ));
        assert!(matches!(
            answer(500, INTERNAL, "x"),
            Err(ProviderError::Retryable { .. })
        ));
        assert!(matches!(
            map_answer(503, &HeaderMap::new(), b"", "tok"),
            Err(ProviderError::Retryable { .. })
        ));
        assert!(matches!(
            answer(200, "80100003", "Incorrect message structure"),
            Err(ProviderError::Permanent { .. })
        ));
    }
}
