//! API errors and their RFC 9457 `application/problem+json` form. The mapping from error to
//! status, type URI and title lives here and nowhere else.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Base of every problem `type` URI; the suffix is stable and documented in docs/api.md.
pub const PROBLEM_BASE: &str = "urn:pushgate:problem:";

/// Everything the API can answer with besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{detail}")]
    Invalid { field: String, detail: String },
    #[error("{detail}")]
    MalformedJson {
        field: Option<String>,
        detail: String,
    },
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("request headers exceed {limit} bytes (largest: {largest})")]
    HeadersTooLarge { limit: usize, largest: String },
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("{detail}")]
    UnknownUser { field: String, detail: String },
    #[error("{detail}")]
    Conflict { kind: &'static str, detail: String },
    #[error("rate limit of {limit} requests per second exceeded")]
    RateLimited { limit: u64, retry_after_secs: u64 },
    #[error(
        "this app already has {limit} live event watches open on this instance; close one first"
    )]
    TooManyWatches { limit: u32 },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    type_: String,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid-field", "Invalid field"),
            ApiError::MalformedJson { .. } => {
                (StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON")
            }
            ApiError::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
            ),
            ApiError::HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers-too-large",
                "Request header fields too large",
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            ApiError::UnknownUser { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown-user",
                "Unknown user",
            ),
            ApiError::Conflict { kind, .. } => (StatusCode::CONFLICT, kind, "Conflict"),
            ApiError::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
            ),
            ApiError::TooManyWatches { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-watches",
                "Too many event watches",
            ),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            ApiError::Invalid { field, .. } | ApiError::UnknownUser { field, .. } => Some(field),
            ApiError::MalformedJson { field, .. } => field.as_deref(),
            ApiError::HeadersTooLarge { largest, .. } => Some(largest),
            _ => None,
        }
    }

    /// A field-level validation error.
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            detail: detail.into(),
        }
    }
}

impl From<pushgate_store::StoreError> for ApiError {
    fn from(e: pushgate_store::StoreError) -> Self {
        ApiError::Unavailable(format!("state store: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title) = self.parts();
        let detail = match &self {
            // never leak internals; the log has them
            ApiError::Internal(d) => {
                tracing::error!(detail = %d, "internal error");
                "an internal error occurred; it has been logged".to_string()
            }
            ApiError::Unavailable(d) => {
                tracing::warn!(detail = %d, "dependency unavailable");
                self.to_string()
            }
            _ => self.to_string(),
        };
        let body = Problem {
            type_: format!("{PROBLEM_BASE}{slug}"),
            title,
            status: status.as_u16(),
            detail,
            field: self.field(),
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = (status, json).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            ApiError::Unauthorized => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited {
                retry_after_secs, ..
            } => {
                if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                    h.insert(header::RETRY_AFTER, v);
                }
            }
            _ => {}
        }
        resp
    }
}
