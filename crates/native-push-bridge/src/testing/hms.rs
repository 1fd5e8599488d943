//! HMS Push Kit stand-in: the OAuth client-credentials token endpoint and
//! `POST /v1/{app_id}/messages:send` (access token, app and message shape checked).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

use super::{bearer, header_map, serve, Answer, Log, Pki, Received, Served, StandInError};
use crate::clients::lock;

/// The HMS stand-in.
pub struct HmsStandIn {
    /// Base URL: `BridgeSettings::hms_url`.
    pub url: String,
    /// Token endpoint: `BridgeSettings::hms_token_url`.
    pub token_url: String,
    state: Arc<HmsState>,
    _served: Served,
}

#[derive(Default)]
struct HmsState {
    /// client id (app id) → client secret
    apps: Mutex<HashMap<String, String>>,
    /// access token → app id
    tokens: Mutex<HashMap<String, String>>,
    token_script: Mutex<Vec<Answer>>,
    token_requests: AtomicU64,
    log: Log,
}

impl HmsStandIn {
    /// Starts the stand-in.
    pub async fn start(pki: &Pki) -> Result<HmsStandIn, StandInError> {
        let state = Arc::new(HmsState::default());
        let router = Router::new()
            .route("/oauth2/v3/token", post(token))
            .route("/v1/{app_id}/messages:send", post(send))
            .with_state(state.clone());
        let served = serve(pki.server_config(&[b"h2", b"http/1.1"], None)?, router).await?;
        Ok(HmsStandIn {
            url: served.url.clone(),
            token_url: format!("{}/oauth2/v3/token", served.url),
            state,
            _served: served,
        })
    }

    /// Registers an app (its OAuth client id is the app id).
    pub fn add_app(&self, app_id: &str, client_secret: &str) {
        lock(&self.state.apps).insert(app_id.to_string(), client_secret.to_string());
    }

    /// Answers the next sends to `token` with `answers`, in order (after the checks).
    pub fn script(&self, token: &str, answers: impl IntoIterator<Item = Answer>) {
        self.state.log.script(token, answers);
    }

    /// Answers the next token requests with `answers` (instead of a token).
    pub fn script_token_endpoint(&self, answers: impl IntoIterator<Item = Answer>) {
        lock(&self.state.token_script).extend(answers);
    }

    /// Expires every access token issued so far (the next send with one gets 80200003).
    pub fn expire_access_tokens(&self) {
        lock(&self.state.tokens).clear();
    }

    /// Token requests received.
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::Relaxed)
    }

    /// Sends received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.log.received()
    }

    /// Sends received for one push token.
    pub fn received_for(&self, token: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.body["message"]["token"][0].as_str() == Some(token))
            .collect()
    }
}

async fn token(State(st): State<Arc<HmsState>>, body: Bytes) -> Response {
    st.token_requests.fetch_add(1, Ordering::Relaxed);
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let refuse = |code: u64, d: &str| {
        Answer::json(
            400,
            json!({"error": code, "sub_error": 20000, "error_description": d}),
        )
        .into_response()
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return refuse(1102, "grant_type is invalid");
    }
    let (Some(id), Some(secret)) = (form.get("client_id"), form.get("client_secret")) else {
        return refuse(1102, "missing required param");
    };
    if lock(&st.apps).get(id) != Some(secret) {
        return refuse(1101, "invalid client");
    }
    let scripted = {
        let mut s = lock(&st.token_script);
        (!s.is_empty()).then(|| s.remove(0))
    };
    if let Some(a) = scripted {
        return a.into_response();
    }
    let access = format!("CgB6e3x9{}", uuid::Uuid::new_v4().simple());
    lock(&st.tokens).insert(access.clone(), id.clone());
    Answer::json(
        200,
        json!({"access_token": access, "expires_in": 3600, "token_type": "Bearer"}),
    )
    .into_response()
}

fn hms_answer(status: u16, code: &str, msg: &str) -> Response {
    Answer::json(
        status,
        json!({"code": code, "msg": msg, "requestId": uuid::Uuid::new_v4().simple().to_string()}),
    )
    .into_response()
}

async fn send(
    State(st): State<Arc<HmsState>>,
    Path(app_id): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut rec = Received {
        path: format!("/v1/{app_id}/messages:send"),
        headers: header_map(&headers),
        body: v.clone(),
        auth: String::new(),
        http2: version == Version::HTTP_2,
        rejected: None,
    };
    let issued_for = bearer(&headers).and_then(|t| lock(&st.tokens).get(t).cloned());
    if issued_for.as_deref() != Some(app_id.as_str()) {
        rec.rejected = Some("80200003".into());
        st.log.record(rec);
        return hms_answer(401, "80200003", "OAuth token expired");
    }
    rec.auth = format!("bearer {app_id}");
    if let Err(why) = check_message(&v) {
        rec.rejected = Some(why.to_string());
        st.log.record(rec);
        return hms_answer(
            400,
            "80100003",
            &format!("Incorrect message structure: {why}"),
        );
    }
    st.log.record(rec);
    let token = v["message"]["token"][0].as_str().unwrap_or_default();
    if let Some(a) = st.log.next(token) {
        return a.into_response();
    }
    st.log.accepted();
    hms_answer(200, "80000000", "Success")
}

/// The parts of the Push Kit message schema the bridge uses.
fn check_message(v: &Value) -> Result<(), &'static str> {
    if !v["validate_only"].is_boolean() {
        return Err("validate_only");
    }
    let m = &v["message"];
    let one_token = m["token"]
        .as_array()
        .is_some_and(|t| t.len() == 1 && t[0].as_str().is_some_and(|s| !s.is_empty()));
    if !one_token {
        return Err("token");
    }
    if let Some(d) = m.get("data") {
        let json_text = d
            .as_str()
            .is_some_and(|s| serde_json::from_str::<Value>(s).is_ok());
        if !json_text {
            return Err("data must be a JSON string");
        }
    }
    let a = &m["android"];
    if !matches!(a["urgency"].as_str(), Some("HIGH" | "NORMAL")) {
        return Err("android.urgency");
    }
    if !a["ttl"]
        .as_str()
        .is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("android.ttl");
    }
    if !a["collapse_key"]
        .as_i64()
        .is_some_and(|c| (-1..=100).contains(&c))
    {
        return Err("android.collapse_key");
    }
    if m.get("notification").is_some() && !a["notification"]["click_action"]["type"].is_i64() {
        return Err("android.notification.click_action");
    }
    Ok(())
}
