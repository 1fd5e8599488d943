//! APNs stand-in: HTTP/2 only (ALPN `h2`), `POST /3/device/{token}`, provider tokens verified
//! against the teams' public keys, client certificates against its own client CA, and the
//! request headers and payload checked as APNs documents them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Extension, Router};
use p256::ecdsa::{SigningKey, VerifyingKey};
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use serde_json::{json, Value};

use super::{
    header_map, serve, unix_now, Answer, Log, PeerCert, Pki, Received, Served, StandInError,
};
use crate::clients::{jwt, lock};

/// The APNs stand-in.
pub struct ApnsStandIn {
    /// Base URL (`https://127.0.0.1:PORT`): `BridgeSettings::apns_url` or `apns_sandbox_url`.
    pub url: String,
    state: Arc<ApnsState>,
    _served: Served,
}

struct ApnsState {
    /// key id → (team id, public key)
    keys: Mutex<HashMap<String, (String, VerifyingKey)>>,
    /// provider tokens whose signature was verified → (team, key id, iat)
    verified: Mutex<HashMap<String, (String, String, i64)>>,
    client_ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// client certificate (DER) → bundle id it was issued for
    client_certs: Mutex<HashMap<Vec<u8>, String>>,
    log: Log,
}

impl ApnsStandIn {
    /// Starts the stand-in with its own client CA for certificate authentication.
    pub async fn start(pki: &Pki) -> Result<ApnsStandIn, StandInError> {
        let tls = |e: rcgen::Error| StandInError::Tls(e.to_string());
        let ca_key = rcgen::KeyPair::generate().map_err(tls)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "APNs stand-in client CA");
        let ca_cert = params.self_signed(&ca_key).map_err(tls)?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca_cert.der().clone())
            .map_err(|e| StandInError::Tls(e.to_string()))?;
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
            .allow_unauthenticated()
            .build()
            .map_err(|e| StandInError::Tls(e.to_string()))?;
        let state = Arc::new(ApnsState {
            keys: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
            client_ca: rcgen::Issuer::new(params, ca_key),
            client_certs: Mutex::new(HashMap::new()),
            log: Log::default(),
        });
        let router = Router::new()
            .route("/3/device/{token}", any(push))
            .fallback(|| async { apns_error(404, "BadPath", None) })
            .with_state(state.clone());
        let served = serve(pki.server_config(&[b"h2"], Some(verifier))?, router).await?;
        Ok(ApnsStandIn {
            url: served.url.clone(),
            state,
            _served: served,
        })
    }

    /// Makes a signing key for `team_id`/`key_id`, trusts its public half, and returns the
    /// private key as the `.p8` PEM Apple hands out.
    pub fn new_team_key(&self, team_id: &str, key_id: &str) -> String {
        let key = SigningKey::random(&mut rand::rngs::OsRng);
        lock(&self.state.keys).insert(
            key_id.to_string(),
            (team_id.to_string(), *key.verifying_key()),
        );
        key.to_pkcs8_pem(LineEnding::LF)
            .map(|p| p.to_string())
            .unwrap_or_default()
    }

    /// Stops trusting a key (as when it is revoked in the developer account).
    pub fn revoke_key(&self, key_id: &str) {
        lock(&self.state.keys).remove(key_id);
        lock(&self.state.verified).retain(|_, (_, kid, _)| kid != key_id);
    }

    /// Issues a client certificate for `bundle_id`: `(certificate PEM, key PEM)`.
    pub fn issue_client_certificate(
        &self,
        bundle_id: &str,
    ) -> Result<(String, String), StandInError> {
        let tls = |e: rcgen::Error| StandInError::Tls(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(tls)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("Apple Push Services: {bundle_id}"),
        );
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.state.client_ca).map_err(tls)?;
        lock(&self.state.client_certs).insert(cert.der().to_vec(), bundle_id.to_string());
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Answers the next requests for `token` with `answers`, in order (after the checks).
    pub fn script(&self, token: &str, answers: impl IntoIterator<Item = Answer>) {
        self.state.log.script(token, answers);
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.log.received()
    }

    /// What was received for one device token.
    pub fn received_for(&self, token: &str) -> Vec<Received> {
        let path = format!("/3/device/{token}");
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Stops recording requests (they are still checked and counted): for the bench.
    pub fn quiet(&self) {
        self.state.log.quiet.store(true, Ordering::Relaxed);
    }

    /// Notifications accepted (answered 200 by the stand-in itself).
    pub fn accepted(&self) -> u64 {
        self.state.log.accepted.load(Ordering::Relaxed)
    }
}

/// An APNs error answer: status and `{"reason": …}`, echoing the request's `apns-id`.
fn apns_error(status: u16, reason: &str, apns_id: Option<&str>) -> Response {
    let mut a = Answer::json(status, json!({"reason": reason}));
    if let Some(id) = apns_id {
        a.headers.push(("apns-id".into(), id.to_string()));
    }
    a.into_response()
}

async fn push(
    State(st): State<Arc<ApnsState>>,
    Path(token): Path<String>,
    Extension(peer): Extension<PeerCert>,
    method: Method,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let apns_id = headers
        .get("apns-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let payload: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut auth = String::new();
    let verdict = check(
        &st, &token, &peer, &method, version, &headers, &body, &payload, &mut auth,
    );
    if st.log.recording() {
        st.log.record(Received {
            path: format!("/3/device/{token}"),
            headers: header_map(&headers),
            body: payload,
            auth: if verdict.is_ok() { auth } else { String::new() },
            http2: version == Version::HTTP_2,
            rejected: verdict.err().map(|(_, reason)| reason.to_string()),
        });
    }
    if let Err((status, reason)) = verdict {
        return apns_error(status, reason, apns_id.as_deref());
    }
    if let Some(mut a) = st.log.next(&token) {
        if let Some(id) = &apns_id {
            a.headers.push(("apns-id".into(), id.clone()));
        }
        return a.into_response();
    }
    st.log.accepted();
    let id = apns_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut a = Answer::empty(200);
    a.headers.push(("apns-id".into(), id));
    a.into_response()
}

/// APNs' checks, in the order it reports them; the first failure is the answer.
#[allow(clippy::too_many_arguments)]
fn check(
    st: &ApnsState,
    token: &str,
    peer: &PeerCert,
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    body: &[u8],
    payload: &Value,
    verified: &mut String,
) -> Result<(), (u16, &'static str)> {
    if version != Version::HTTP_2 {
        return Err((505, "HTTPVersionNotSupported"));
    }
    if method != Method::POST {
        return Err((405, "MethodNotAllowed"));
    }
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let topic = h("apns-topic");
    match h("authorization") {
        Some(auth) => {
            let Some(jwt) = auth.strip_prefix("bearer ") else {
                return Err((403, "InvalidProviderToken"));
            };
            let (team, kid, iat) =
                verify_provider_token(st, jwt).ok_or((403, "InvalidProviderToken"))?;
            let now = unix_now();
            if now - iat > 3600 {
                return Err((403, "ExpiredProviderToken"));
            }
            if iat > now + 300 {
                return Err((403, "InvalidProviderToken"));
            }
            *verified = format!("token {team}/{kid}");
        }
        None => {
            let issued = peer
                .0
                .as_ref()
                .and_then(|der| lock(&st.client_certs).get(der).cloned());
            let Some(bundle) = issued else {
                return Err((403, "MissingProviderToken"));
            };
            if topic.is_some_and(|t| t != bundle) {
                return Err((400, "TopicDisallowed"));
            }
            *verified = format!("certificate {bundle}");
        }
    }
    if topic.is_none_or(str::is_empty) {
        return Err((400, "MissingTopic"));
    }
    let push_type = h("apns-push-type");
    if !matches!(push_type, Some("alert" | "background")) {
        return Err((400, "InvalidPushType"));
    }
    match (h("apns-priority"), push_type) {
        (Some("5") | None, _) | (Some("10"), Some("alert")) => {}
        _ => return Err((400, "BadPriority")),
    }
    if let Some(id) = h("apns-id") {
        if uuid::Uuid::parse_str(id).is_err() || id.len() != 36 {
            return Err((400, "BadMessageId"));
        }
    }
    if let Some(exp) = h("apns-expiration") {
        if exp.parse::<u64>().is_err() {
            return Err((400, "BadExpirationDate"));
        }
    }
    if h("apns-collapse-id").is_some_and(|c| c.len() > 64) {
        return Err((400, "BadCollapseId"));
    }
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err((400, "BadDeviceToken"));
    }
    if body.len() > 4096 {
        return Err((413, "PayloadTooLarge"));
    }
    if body.is_empty() {
        return Err((400, "PayloadEmpty"));
    }
    if !payload.get("aps").is_some_and(Value::is_object) {
        return Err((400, "BadPayload"));
    }
    Ok(())
}

/// Verifies an ES256 provider token (once per distinct token, as the real service caches
/// them): `kid` names a registered key, `iss` its team.
fn verify_provider_token(st: &ApnsState, token: &str) -> Option<(String, String, i64)> {
    if let Some(v) = lock(&st.verified).get(token) {
        return Some(v.clone());
    }
    let (header, _, _, _) = jwt::decode_unverified(token)?;
    let kid = header.get("kid")?.as_str()?.to_string();
    let (team, key) = lock(&st.keys).get(&kid).cloned()?;
    let (_, claims) = jwt::verify_es256(token, &key)?;
    if claims.get("iss")?.as_str()? != team {
        return None;
    }
    let iat = claims.get("iat")?.as_i64()?;
    let v = (team, kid, iat);
    lock(&st.verified).insert(token.to_string(), v.clone());
    Some(v)
}
