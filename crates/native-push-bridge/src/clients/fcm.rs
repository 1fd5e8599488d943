//! Firebase Cloud Messaging, HTTP v1 API: `POST {base}/v1/projects/{project}/messages:send`
//! with an OAuth 2.0 access token obtained from the app's service account (JWT bearer grant,
//! RFC 7523, signed RS256 with the account's key).
//!
//! App settings (`App.providers.fcm`): the service-account JSON as Google hands it out
//! (`project_id`, `private_key_id`, `private_key`, `client_email`, `token_uri`), either as
//! the object itself or under `service_account` (object or JSON text), with an optional
//! `project_id` beside it that overrides the account's.
//!
//! The grant is implemented here rather than with `gcp_auth`, which reads credentials from
//! files or the environment per process, not per app, and signs with `aws-lc-rs` or `ring`
//! through its own feature set; the grant itself is one signed JWT and one form POST.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use pushgate_core::time::now_ms;
use pushgate_core::{Device, Priority};
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    bad_settings, by_status, jwt, optional_setting, retry_after, seconds_left, setting,
    token_transport_error, transport_error, unix_now, AppCache, HttpConfig,
};
use crate::provider::{
    AppCredentials, Notification, NotificationKind, Provider, ProviderAccepted, ProviderError,
};

/// The scope FCM's send endpoint requires.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// RFC 7523 grant type.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Where service-account files without `token_uri` get tokens.
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// An access token is replaced this long before Google says it expires, so a request never
/// reaches FCM with a token that died on the way.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// The FCM client: one HTTP client per app.
pub struct FcmProvider {
    http: HttpConfig,
    base: String,
    apps: AppCache<FcmApp>,
}

struct FcmApp {
    project_id: String,
    client_email: String,
    key_id: Option<String>,
    key: ring::signature::RsaKeyPair,
    token_uri: String,
    client: reqwest::Client,
    /// The access token and when to replace it. An async mutex: a token request holds it, so
    /// concurrent pushes of the app wait for one request instead of each making their own.
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl FcmApp {
    async fn access_token(&self) -> Result<String, ProviderError> {
        let mut g = self.token.lock().await;
        if let Some((t, refresh_at)) = &*g {
            if Instant::now() < *refresh_at {
                return Ok(t.clone());
            }
        }
        let (t, lifetime) = self.fetch_token().await?;
        *g = Some((
            t.clone(),
            Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN),
        ));
        Ok(t)
    }

    /// Drops `rejected` so the next [`FcmApp::access_token`] fetches a new one (unless a
    /// concurrent push already did).
    async fn forget(&self, rejected: &str) {
        let mut g = self.token.lock().await;
        if g.as_ref().is_some_and(|(t, _)| t == rejected) {
            *g = None;
        }
    }

    async fn fetch_token(&self) -> Result<(String, Duration), ProviderError> {
        let iat = unix_now();
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = Value::String(kid.clone());
        }
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + 3600,
        });
        let assertion = jwt::rs256(&header, &claims, &self.key)
            .map_err(|e| bad_settings("fcm", format!("private_key: {e}")))?;
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", JWT_BEARER_GRANT)
            .append_pair("assertion", &assertion)
            .finish();
        oauth_token(&self.client, &self.token_uri, form, "fcm").await
    }
}

/// Posts an OAuth token request and reads `access_token`/`expires_in`. Shared with HMS.
pub(crate) async fn oauth_token(
    client: &reqwest::Client,
    url: &str,
    form: String,
    provider: &str,
) -> Result<(String, Duration), ProviderError> {
    let resp = client
        .post(url)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .map_err(|e| token_transport_error(&format!("{provider} OAuth token request"), &e))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = super::read_answer(resp).await;
    if (200..300).contains(&status) {
        return match serde_json::from_slice::<TokenAnswer>(&body) {
            Ok(t) if !t.access_token.is_empty() => Ok((
                t.access_token,
                Duration::from_secs(t.expires_in.unwrap_or(3600)),
            )),
            _ => Err(ProviderError::Retryable {
                retry_after: None,
                detail: format!("{provider} token endpoint answered without an access token"),
            }),
        };
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let error = match (v.get("error"), v.get("error_description")) {
        (Some(e), Some(d)) => format!("{}: {}", text_of(e), text_of(d)),
        (Some(e), None) => text_of(e),
        _ => format!("HTTP {status}"),
    };
    let detail = format!("{provider} OAuth token request refused: {error}");
    match status {
        429 | 500..=599 => Err(ProviderError::Retryable {
            retry_after: retry_after(&headers),
            detail,
        }),
        // the endpoint refused these credentials (invalid_grant, invalid_client, ...)
        _ => Err(ProviderError::Credentials { detail }),
    }
}

/// A JSON value as text, without quotes for strings (HMS sends numeric error codes).
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl FcmProvider {
    /// A client for the given FCM base URL.
    pub fn new(http: HttpConfig, base: &str) -> Self {
        FcmProvider {
            http,
            base: base.trim_end_matches('/').to_string(),
            apps: AppCache::default(),
        }
    }

    fn build(&self, creds: &Value) -> Result<FcmApp, ProviderError> {
        let parsed_text;
        let account = match creds.get("service_account") {
            Some(Value::String(text)) => {
                parsed_text = serde_json::from_str::<Value>(text).map_err(|e| {
                    bad_settings("fcm", format!("service_account is not JSON: {e}"))
                })?;
                &parsed_text
            }
            Some(v @ Value::Object(_)) => v,
            Some(_) => return Err(bad_settings("fcm", "service_account must be an object")),
            None => creds,
        };
        let project_id = optional_setting(creds, "project_id")
            .or_else(|| optional_setting(account, "project_id"))
            .ok_or_else(|| bad_settings("fcm", "no project_id"))?;
        if !project_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':')
        {
            return Err(bad_settings(
                "fcm",
                "project_id has characters a project id cannot have",
            ));
        }
        let key = jwt::parse_rsa_key(setting(account, "fcm", "private_key")?)
            .map_err(|e| bad_settings("fcm", e))?;
        let token_uri = optional_setting(account, "token_uri").unwrap_or(DEFAULT_TOKEN_URI);
        let client = self
            .http
            .builder()
            .build()
            .map_err(|e| bad_settings("fcm", format!("cannot build the HTTP client: {e}")))?;
        Ok(FcmApp {
            project_id: project_id.to_string(),
            client_email: setting(account, "fcm", "client_email")?.to_string(),
            key_id: optional_setting(account, "private_key_id").map(str::to_string),
            key,
            token_uri: token_uri.to_string(),
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
                detail: "device has no FCM registration token".into(),
            })?;
        let a = self.apps.get_or_build(app, || self.build(app.creds))?;
        let url = format!("{}/v1/projects/{}/messages:send", self.base, a.project_id);
        let body = message(token, n, now_ms()).to_string();
        let bearer = a.access_token().await?;
        match post(&a.client, &url, &body, &bearer).await {
            Err(ProviderError::Credentials { detail }) if detail.starts_with("UNAUTHENTICATED") => {
                // the access token died early (revoked, clock skew): FCM refused the message,
                // so it can be sent once more with a new token
                a.forget(&bearer).await;
                let bearer = a.access_token().await?;
                post(&a.client, &url, &body, &bearer).await
            }
            other => other,
        }
    }
}

impl Provider for FcmProvider {
    fn send<'a>(
        &'a self,
        app: AppCredentials<'a>,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Result<ProviderAccepted, ProviderError>> {
        Box::pin(self.send_inner(app, device, notification))
    }
}

/// FCM `data` is a map of strings: the message's data object is flattened into it (strings
/// as they are, other values as JSON text), any other data value goes under `data` as JSON
/// text; `message_id` and `kind` are always there and win over same-named data keys.
pub(crate) fn data_map(n: &Notification) -> Map<String, Value> {
    let mut m = Map::new();
    if n.kind != NotificationKind::Retract {
        match &n.data {
            Some(Value::Object(o)) => {
                for (k, v) in o {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    m.insert(k.clone(), Value::String(s));
                }
            }
            Some(other) => {
                m.insert("data".into(), Value::String(other.to_string()));
            }
            None => {}
        }
    }
    m.insert("message_id".into(), Value::String(n.message_id.clone()));
    m.insert("kind".into(), Value::String(n.kind.as_str().into()));
    m
}

/// The v1 `messages:send` body. A retraction is data-only (the app removes the notification
/// whose tag is the message id or collapse key); everything else shows a notification.
pub(crate) fn message(token: &str, n: &Notification, now_ms: i64) -> Value {
    let tag = n.collapse_key.as_deref().unwrap_or(&n.message_id);
    let mut android = json!({
        "priority": if n.priority == Priority::High { "HIGH" } else { "NORMAL" },
        "ttl": format!("{}s", seconds_left(n.expires_at, now_ms)),
    });
    if let Some(c) = &n.collapse_key {
        android["collapse_key"] = Value::String(c.clone());
    }
    let mut msg = json!({"token": token, "data": data_map(n)});
    if n.kind != NotificationKind::Retract {
        let mut notification = Map::new();
        if let Some(t) = &n.title {
            notification.insert("title".into(), Value::String(t.clone()));
        }
        notification.insert("body".into(), Value::String(n.text.clone()));
        msg["notification"] = Value::Object(notification);
        android["notification"] = json!({"tag": tag});
    }
    msg["android"] = android;
    json!({"message": msg})
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &str,
    bearer: &str,
) -> Result<ProviderAccepted, ProviderError> {
    let resp = client
        .post(url)
        .header(AUTHORIZATION, format!("Bearer {bearer}"))
        .header(CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| transport_error("FCM request", &e))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = super::read_answer(resp).await;
    map_answer(status, &headers, &bytes)
}

/// FCM's answer onto the reaction table, by the `FcmError` code in `error.details` where
/// there is one, else by the canonical `error.status`.
pub(crate) fn map_answer(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<ProviderAccepted, ProviderError> {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if (200..300).contains(&status) {
        return Ok(ProviderAccepted {
            reference: v.get("name").and_then(Value::as_str).map(str::to_string),
        });
    }
    let err = v.get("error").cloned().unwrap_or(Value::Null);
    let canonical = err.get("status").and_then(Value::as_str).unwrap_or("");
    let message = err.get("message").and_then(Value::as_str).unwrap_or("");
    let details = err
        .get("details")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let fcm_code = details
        .iter()
        .find_map(|d| d.get("errorCode").and_then(Value::as_str))
        .unwrap_or("");
    let about_token = details.iter().any(|d| {
        d.get("fieldViolations")
            .and_then(Value::as_array)
            .is_some_and(|fv| {
                fv.iter()
                    .any(|f| f.get("field").and_then(Value::as_str) == Some("message.token"))
            })
    }) || message.contains("registration token");
    let code = if fcm_code.is_empty() {
        canonical
    } else {
        fcm_code
    };
    let detail = match (code.is_empty(), message.is_empty()) {
        (true, _) => format!("HTTP {status}"),
        (false, true) => code.to_string(),
        (false, false) => format!("{code}: {message}"),
    };
    match code {
        "UNREGISTERED" => Err(ProviderError::InvalidToken { detail }),
        "INVALID_ARGUMENT" if about_token => Err(ProviderError::InvalidToken { detail }),
        "INVALID_ARGUMENT" => Err(ProviderError::Permanent { detail }),
        "THIRD_PARTY_AUTH_ERROR"
        | "SENDER_ID_MISMATCH"
        | "PERMISSION_DENIED"
        | "UNAUTHENTICATED" => Err(ProviderError::Credentials { detail }),
        "QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL" => Err(ProviderError::Retryable {
            retry_after: retry_after(headers),
            detail,
        }),
        _ if status == 401 || status == 403 => Err(ProviderError::Credentials { detail }),
        _ => Err(by_status(status, headers, detail)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn note(kind: NotificationKind) -> Notification {
        Notification {
            kind,
            message_id: "m-1".into(),
            title: Some("Parcel".into()),
            text: "here".into(),
            data: Some(json!({"parcel": 7, "where": "door"})),
            priority: Priority::High,
            collapse_key: None,
            expires_at: 90_500,
        }
    }

    #[test]
    fn a_channel_message_has_notification_data_and_android_options() {
        let v = message("tok", &note(NotificationKind::Channel), 0);
        assert_eq!(
            v,
            json!({"message": {
                "token": "tok",
                "notification": {"title": "Parcel", "body": "here"},
                "data": {"parcel": "7", "where": "door", "message_id": "m-1", "kind": "channel"},
                "android": {"priority": "HIGH", "ttl": "90s", "notification": {"tag": "m-1"}}
            }})
        );
    }

    #[test]
    fn a_retraction_is_data_only_and_keeps_the_collapse_key() {
        let mut n = note(NotificationKind::Retract);
        n.priority = Priority::Normal;
        n.collapse_key = Some("parcels".into());
        let v = message("tok", &n, 100_000);
        assert_eq!(
            v,
            json!({"message": {
                "token": "tok",
                "data": {"message_id": "m-1", "kind": "retract"},
                "android": {"priority": "NORMAL", "ttl": "0s", "collapse_key": "parcels"}
            }})
        );
    }

    #[test]
    fn non_object_data_goes_under_data_and_ids_win() {
        let mut n = note(NotificationKind::Channel);
        n.data = Some(json!([1, 2]));
        assert_eq!(data_map(&n)["data"], json!("[1,2]"));
        n.data = Some(json!({"message_id": "spoof"}));
        assert_eq!(data_map(&n)["message_id"], json!("m-1"));
    }

    fn error(status: u16, canonical: &str, code: Option<&str>, field: Option<&str>) -> Vec<u8> {
        let mut details = vec![];
        if let Some(c) = code {
            details.push(json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": c}));
        }
        if let Some(f) = field {
            details.push(json!({"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": f, "description": "bad"}]}));
        }
        json!({"error": {"code": status, "message": "m", "status": canonical, "details": details}})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn every_documented_answer_maps_onto_the_reaction_table() {
        let h = HeaderMap::new();
        let m = |s, c, code, f| map_answer(s, &h, &error(s, c, code, f));
        assert!(matches!(
            m(404, "NOT_FOUND", Some("UNREGISTERED"), None),
            Err(ProviderError::InvalidToken { .. })
        ));
        assert!(matches!(
            m(
                400,
                "INVALID_ARGUMENT",
                Some("INVALID_ARGUMENT"),
                Some("message.token")
            ),
            Err(ProviderError::InvalidToken { .. })
        ));
        assert!(matches!(
            m(
                400,
                "INVALID_ARGUMENT",
                Some("INVALID_ARGUMENT"),
                Some("message.android.ttl")
            ),
            Err(ProviderError::Permanent { .. })
        ));
        for (s, c, code) in [
            (401, "UNAUTHENTICATED", Some("THIRD_PARTY_AUTH_ERROR")),
            (403, "PERMISSION_DENIED", Some("SENDER_ID_MISMATCH")),
            (403, "PERMISSION_DENIED", None),
            (401, "UNAUTHENTICATED", None),
        ] {
            assert!(
                matches!(m(s, c, code, None), Err(ProviderError::Credentials { .. })),
                "{s} {c}"
            );
        }
        for (s, c, code) in [
            (429, "RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED")),
            (500, "INTERNAL", Some("INTERNAL")),
            (503, "UNAVAILABLE", Some("UNAVAILABLE")),
            (502, "", None),
        ] {
            assert!(
                matches!(m(s, c, code, None), Err(ProviderError::Retryable { .. })),
                "{s} {c}"
            );
        }
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("9"));
        assert_eq!(
            map_answer(
                429,
                &h,
                &error(429, "RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED"), None)
            ),
            Err(ProviderError::Retryable {
                retry_after: Some(Duration::from_secs(9)),
                detail: "QUOTA_EXCEEDED: m".into()
            })
        );
        assert_eq!(
            map_answer(200, &h, br#"{"name": "projects/p/messages/1"}"#),
            Ok(ProviderAccepted {
                reference: Some("projects/p/messages/1".into())
            })
        );
    }
}
