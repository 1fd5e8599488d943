//! FCM stand-in: the OAuth token endpoint (JWT bearer grant, assertion verified with the
//! service account's public key) and the HTTP v1 `messages:send` endpoint (access token,
//! project and message shape checked).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{HeaderMap, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

use super::{
    bearer, header_map, serve, unix_now, Answer, Log, Pki, Received, Served, StandInError,
};
use crate::clients::fcm::{JWT_BEARER_GRANT, SCOPE};
use crate::clients::{jwt, lock};

/// The FCM stand-in.
pub struct FcmStandIn {
    /// Base URL: `BridgeSettings::fcm_url`.
    pub url: String,
    /// The token endpoint: the service account's `token_uri`.
    pub token_url: String,
    state: Arc<FcmState>,
    _served: Served,
}

struct FcmState {
    token_url: String,
    /// client_email → (project id, PKCS#1 public key DER)
    accounts: Mutex<HashMap<String, (String, Vec<u8>)>>,
    /// access token → project id
    tokens: Mutex<HashMap<String, String>>,
    token_script: Mutex<Vec<Answer>>,
    token_requests: AtomicU64,
    log: Log,
}

impl FcmStandIn {
    /// Starts the stand-in.
    pub async fn start(pki: &Pki) -> Result<FcmStandIn, StandInError> {
        // the token URL (checked as the assertion's audience) contains the port, known only
        // once bound: the router's state is filled in right after `serve` binds
        let cell: Arc<std::sync::OnceLock<Arc<FcmState>>> = Arc::new(std::sync::OnceLock::new());
        let (c1, c2) = (cell.clone(), cell.clone());
        let router = Router::new()
            .route(
                "/token",
                post(move |body: Bytes| {
                    let cell = c1.clone();
                    async move {
                        match cell.get() {
                            Some(st) => token(st, &body),
                            None => Answer::empty(503).into_response(),
                        }
                    }
                }),
            )
            .route(
                "/v1/projects/{project}/messages:send",
                post(
                    move |Path(project): Path<String>,
                          version: Version,
                          headers: HeaderMap,
                          body: Bytes| {
                        let cell = c2.clone();
                        async move {
                            match cell.get() {
                                Some(st) => send(st, &project, version, &headers, &body),
                                None => Answer::empty(503).into_response(),
                            }
                        }
                    },
                ),
            );
        let served = serve(pki.server_config(&[b"h2", b"http/1.1"], None)?, router).await?;
        let token_url = format!("{}/token", served.url);
        let state = Arc::new(FcmState {
            token_url: token_url.clone(),
            accounts: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            token_script: Mutex::new(Vec::new()),
            token_requests: AtomicU64::new(0),
            log: Log::default(),
        });
        let _ = cell.set(state.clone());
        Ok(FcmStandIn {
            url: served.url.clone(),
            token_url,
            state,
            _served: served,
        })
    }

    /// Trusts a service account of `project_id` with its RSA public key (PKCS#1 DER).
    pub fn add_service_account(
        &self,
        project_id: &str,
        client_email: &str,
        public_pkcs1_der: Vec<u8>,
    ) {
        lock(&self.state.accounts).insert(
            client_email.to_string(),
            (project_id.to_string(), public_pkcs1_der),
        );
    }

    /// Answers the next sends to `token` with `answers`, in order (after the checks).
    pub fn script(&self, token: &str, answers: impl IntoIterator<Item = Answer>) {
        self.state.log.script(token, answers);
    }

    /// Answers the next token requests with `answers`, in order (instead of a token).
    pub fn script_token_endpoint(&self, answers: impl IntoIterator<Item = Answer>) {
        lock(&self.state.token_script).extend(answers);
    }

    /// Invalidates every access token issued so far (the next send with one gets 401).
    pub fn revoke_access_tokens(&self) {
        lock(&self.state.tokens).clear();
    }

    /// Token requests received (including refused ones).
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::Relaxed)
    }

    /// Sends received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.log.received()
    }

    /// Sends received for one registration token.
    pub fn received_for(&self, token: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.body["message"]["token"].as_str() == Some(token))
            .collect()
    }
}

fn oauth_error(error: &str, description: &str) -> Response {
    Answer::json(
        400,
        json!({"error": error, "error_description": description}),
    )
    .into_response()
}

fn token(st: &FcmState, body: &[u8]) -> Response {
    st.token_requests.fetch_add(1, Ordering::Relaxed);
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some(JWT_BEARER_GRANT) {
        return oauth_error("unsupported_grant_type", "Invalid grant_type");
    }
    let Some(assertion) = form.get("assertion") else {
        return oauth_error("invalid_request", "Missing assertion");
    };
    let Some((_, claims, _, _)) = jwt::decode_unverified(assertion) else {
        return oauth_error("invalid_grant", "Invalid JWT");
    };
    let iss = claims["iss"].as_str().unwrap_or_default().to_string();
    let Some((project, public)) = lock(&st.accounts).get(&iss).cloned() else {
        return oauth_error("invalid_grant", "Invalid grant: account not found");
    };
    let Some((_, claims)) = jwt::verify_rs256(assertion, &public) else {
        return oauth_error("invalid_grant", "Invalid JWT Signature.");
    };
    let now = unix_now();
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(0),
        claims["exp"].as_i64().unwrap_or(0),
    );
    if claims["aud"].as_str() != Some(st.token_url.as_str()) {
        return oauth_error("invalid_grant", "Invalid JWT: audience");
    }
    if claims["scope"].as_str() != Some(SCOPE) {
        return oauth_error("invalid_scope", "Invalid scope");
    }
    if exp <= now || exp - iat > 3600 || iat > now + 300 {
        return oauth_error(
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token",
        );
    }
    let scripted = {
        let mut s = lock(&st.token_script);
        (!s.is_empty()).then(|| s.remove(0))
    };
    if let Some(a) = scripted {
        return a.into_response();
    }
    let access = format!("ya29.{}", uuid::Uuid::new_v4().simple());
    lock(&st.tokens).insert(access.clone(), project);
    Answer::json(
        200,
        json!({"access_token": access, "expires_in": 3599, "token_type": "Bearer"}),
    )
    .into_response()
}

fn fcm_error(status: u16, canonical: &str, message: &str, field: Option<&str>) -> Response {
    let mut details = vec![];
    if let Some(f) = field {
        details.push(json!({"@type": "type.googleapis.com/google.rpc.BadRequest",
                            "fieldViolations": [{"field": f, "description": message}]}));
    }
    Answer::json(
        status,
        json!({"error": {"code": status, "message": message, "status": canonical, "details": details}}),
    )
    .into_response()
}

fn send(
    st: &FcmState,
    project: &str,
    version: Version,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut rec = Received {
        path: format!("/v1/projects/{project}/messages:send"),
        headers: header_map(headers),
        body: v.clone(),
        auth: String::new(),
        http2: version == Version::HTTP_2,
        rejected: None,
    };
    let issued_for = bearer(headers).and_then(|t| lock(&st.tokens).get(t).cloned());
    if issued_for.as_deref() != Some(project) {
        rec.rejected = Some("UNAUTHENTICATED".into());
        st.log.record(rec);
        return fcm_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
            None,
        );
    }
    rec.auth = format!("bearer {project}");
    if let Err((msg, field)) = check_message(&v) {
        rec.rejected = Some(msg.clone());
        st.log.record(rec);
        return fcm_error(400, "INVALID_ARGUMENT", &msg, Some(field));
    }
    st.log.record(rec);
    let token = v["message"]["token"].as_str().unwrap_or_default();
    if let Some(a) = st.log.next(token) {
        return a.into_response();
    }
    st.log.accepted();
    Answer::json(
        200,
        json!({"name": format!("projects/{project}/messages/{}", uuid::Uuid::new_v4().simple())}),
    )
    .into_response()
}

/// The parts of the v1 message schema the bridge uses.
fn check_message(v: &Value) -> Result<(), (String, &'static str)> {
    let m = &v["message"];
    if m["token"].as_str().is_none_or(str::is_empty) {
        return Err((
            "The registration token is not a valid FCM registration token".into(),
            "message.token",
        ));
    }
    if let Some(data) = m.get("data") {
        let all_strings = data
            .as_object()
            .is_some_and(|o| o.values().all(Value::is_string));
        if !all_strings {
            return Err(("data values must be strings".into(), "message.data"));
        }
    }
    let a = &m["android"];
    if !matches!(a["priority"].as_str(), Some("HIGH" | "NORMAL")) {
        return Err((
            "Invalid value at 'message.android.priority'".into(),
            "message.android.priority",
        ));
    }
    let ttl_ok = a["ttl"]
        .as_str()
        .and_then(|t| t.strip_suffix('s'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !ttl_ok {
        return Err((
            "Invalid value at 'message.android.ttl'".into(),
            "message.android.ttl",
        ));
    }
    Ok(())
}
