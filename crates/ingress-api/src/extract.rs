//! Request extractors: JSON bodies with field-level errors, and the two kinds of bearer
//! credentials (operator admin token, app API key).

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::Ctx;

/// A JSON body. Malformed JSON and schema violations name the offending field
/// (`recipients[2].user_id`); oversized bodies are refused with 413, never truncated.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<Ctx>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<Ctx>) -> Result<Self, Self::Rejection> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mime != "application/json"
            && !(mime.starts_with("application/") && mime.ends_with("+json"))
        {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = read_body(req.into_body(), state.settings.max_body_bytes).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Reads a request body up to `limit` bytes and no further: the router disables axum's own
/// limit, so a larger body is refused (413) without being received whole.
pub async fn read_body(
    body: axum::body::Body,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge { limit })
}

/// Parses JSON, reporting the path of the first offending field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." || path.is_empty() {
            None
        } else {
            Some(path)
        };
        ApiError::MalformedJson {
            field,
            detail: inner.to_string(),
        }
    })
}

fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The operator, authenticated by the admin token from the configuration.
pub struct Admin;

impl FromRequestParts<Arc<Ctx>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<Ctx>,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        let want = state.settings.admin_token.as_bytes();
        if !want.is_empty() && bool::from(token.as_bytes().ct_eq(want)) {
            Ok(Admin)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// A backend, authenticated by its app's API key; everything it does is scoped to `app_id`.
pub struct AppAuth {
    pub app_id: String,
}

impl FromRequestParts<Arc<Ctx>> for AppAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<Ctx>,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        if token.len() > 200 {
            return Err(ApiError::Unauthorized);
        }
        let hash = pushgate_core::credentials::sha256_hex(token.as_bytes());
        // the key lookup and the app's rate count in one round trip (one script); with the
        // rate limit off nothing is counted, as `Ctx::check_rate` does
        let second = (state.settings.rate_limit_per_app != 0).then(Ctx::rate_second);
        match state.store.use_api_key(&hash, second).await? {
            Some(key) => {
                if let Some(count) = key.count {
                    state.judge_rate(count)?;
                }
                Ok(AppAuth { app_id: key.app_id })
            }
            None => Err(ApiError::Unauthorized),
        }
    }
}
