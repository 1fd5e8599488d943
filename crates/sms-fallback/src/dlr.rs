//! Delivery reports from the SMS providers, one route per provider:
//!
//! | route | provider | authenticated by |
//! |-------|----------|------------------|
//! | `POST /v1/sms/dlr/{message_id}` | generic webhook | `Pushgate-Signature` with the app's SMS secret |
//! | `POST /v1/sms/twilio/{message_id}` | Twilio status callback | `X-Twilio-Signature` with the app's auth token |
//! | `GET /v1/sms/kannel/{message_id}/{token}?type=…&status=…` | Kannel `dlr-url` | the path token ([`crate::kannel::dlr_token`]) |
//!
//! Served on its own listener (`sms.dlr_listen`), never on the operations listener: the ops
//! port is internal-only and unauthenticated, while these routes are meant to be reachable by
//! the providers. A report that fails authentication is answered 401 before its content is
//! looked at. Answers are RFC 9457 `application/problem+json` on error.
//!
//! Webhook body: `{"status": "delivered" | "failed", "detail"?: "…"}` → `sms_delivered` /
//! `sms_failed`. Twilio: `MessageStatus` `delivered` → `sms_delivered`, `undelivered`/`failed`
//! → `sms_failed` with the `ErrorCode`, anything else (`queued`, `sent`, …) changes nothing.
//! Kannel: `type` 1 → `sms_delivered`, 2 or 16 → `sms_failed`, 4 or 8 (buffered, submitted)
//! change nothing. Progress reports that change nothing are answered 200 without touching the
//! history. A report that changes nothing because the SMS already reached its final status (a
//! provider repeating itself) is answered 200 so the provider stops retrying; a report for a
//! message whose SMS was never handed to the provider is answered 409. A report that overtakes
//! the send's own `sms_sent` (the send record exists, the transition is not applied yet) is
//! kept: `sms_sent` is recorded first, then the report.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pushgate_core::time::now_ms;
use pushgate_core::{MessageId, Status};
use pushgate_runtime::metrics::HttpLabels;
use pushgate_store::{StoredMessage, Transition};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::kannel::{self, DlrOutcome};
use crate::provider::{parse_config, ProviderConfig, SmsConfig};
use crate::record::SendRecord;
use crate::signature;
use crate::twilio::{self, CallbackOutcome};
use crate::worker::{self, transition};
use crate::Ctx;

/// The webhook provider's route, as registered and as labelled in
/// `pushgate_http_requests_total`.
pub const ROUTE: &str = "/v1/sms/dlr/{message_id}";

/// Twilio's status callback route.
pub const TWILIO_ROUTE: &str = "/v1/sms/twilio/{message_id}";

/// Kannel's `dlr-url` route.
pub const KANNEL_ROUTE: &str = "/v1/sms/kannel/{message_id}/{token}";

/// Base of problem `type` URIs; the same as the public API's.
const PROBLEM_BASE: &str = "urn:pushgate:problem:";

/// A report is a few dozen bytes (a Twilio callback a few hundred); anything much bigger is
/// not a report.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// How much of the provider's `detail` is kept in the event.
const MAX_DETAIL_CHARS: usize = 200;

#[derive(Debug, Deserialize)]
struct Report {
    status: ReportStatus,
    #[serde(default)]
    detail: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ReportStatus {
    Delivered,
    Failed,
}

/// What an authenticated report asks for.
enum Verdict {
    Delivered(String),
    Failed(String),
    /// Progress that changes nothing.
    Progress,
}

/// Why a report was not taken.
#[derive(Debug, thiserror::Error)]
enum DlrError {
    #[error("message not found")]
    NotFound,
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("state store unavailable")]
    Unavailable(#[from] pushgate_store::StoreError),
    #[error("state store unavailable")]
    Internal(#[from] crate::SmsError),
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    type_: String,
    title: &'a str,
    status: u16,
    detail: String,
}

impl IntoResponse for DlrError {
    fn into_response(self) -> Response {
        let (status, slug, title) = match &self {
            DlrError::NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            DlrError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            DlrError::Invalid(_) => (
                StatusCode::BAD_REQUEST,
                "malformed-report",
                "Malformed report",
            ),
            DlrError::Conflict(_) => (StatusCode::CONFLICT, "not-awaiting-report", "Conflict"),
            DlrError::Unavailable(e) => {
                tracing::warn!(error = %e, "delivery report: state store unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "Service unavailable",
                )
            }
            DlrError::Internal(e) => {
                tracing::warn!(error = %e, "delivery report: cannot apply");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "Service unavailable",
                )
            }
        };
        let body = Problem {
            type_: format!("{PROBLEM_BASE}{slug}"),
            title,
            status: status.as_u16(),
            detail: self.to_string(),
        };
        let mut resp = (status, serde_json::to_vec(&body).unwrap_or_default()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        resp
    }
}

/// The delivery report routes.
pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route(ROUTE, post(webhook_report))
        .route(TWILIO_ROUTE, post(twilio_report))
        .route(KANNEL_ROUTE, get(kannel_report))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(ctx)
}

/// Turns a handler's result into the answer and counts it under its route.
fn counted(ctx: &Ctx, route: &str, res: Result<Response, DlrError>) -> Response {
    let resp = res.unwrap_or_else(IntoResponse::into_response);
    ctx.metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route: route.into(),
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

async fn webhook_report(
    State(ctx): State<Arc<Ctx>>,
    Path(message_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let res = handle_webhook(&ctx, &message_id, &headers, &body).await;
    counted(&ctx, ROUTE, res)
}

async fn twilio_report(
    State(ctx): State<Arc<Ctx>>,
    Path(message_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let res = handle_twilio(&ctx, &message_id, query.as_deref(), &headers, &body).await;
    counted(&ctx, TWILIO_ROUTE, res)
}

async fn kannel_report(
    State(ctx): State<Arc<Ctx>>,
    Path((message_id, token)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let res = handle_kannel(&ctx, &message_id, &token, query.as_deref()).await;
    counted(&ctx, KANNEL_ROUTE, res)
}

/// Printable, bounded text from the provider.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_DETAIL_CHARS)
        .collect::<String>()
        .trim()
        .to_string()
}

/// The message and its app's SMS settings. Without usable settings there is no key, so
/// nothing can be authentic.
async fn load(ctx: &Ctx, message_id: &str) -> Result<(StoredMessage, SmsConfig), DlrError> {
    if !MessageId::is_well_formed(message_id) {
        return Err(DlrError::NotFound);
    }
    let m = ctx
        .store
        .message(message_id)
        .await?
        .ok_or(DlrError::NotFound)?;
    let app = ctx.store.app(&m.message.app_id).await?;
    let cfg = parse_config(
        app.as_ref().and_then(|a| a.sms.as_ref()),
        ctx.settings.allow_http_providers,
    )
    .map_err(|e| DlrError::Unauthorized(e.to_string()))?;
    Ok((m, cfg))
}

/// The refusal for a report that came to another provider's route.
fn wrong_provider(cfg: &SmsConfig, route_provider: &str) -> DlrError {
    DlrError::Unauthorized(format!(
        "the app's SMS provider is {}, not {route_provider}",
        cfg.provider.name()
    ))
}

async fn handle_webhook(
    ctx: &Ctx,
    message_id: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, DlrError> {
    let (m, cfg) = load(ctx, message_id).await?;
    let ProviderConfig::Webhook(w) = &cfg.provider else {
        return Err(wrong_provider(&cfg, "webhook"));
    };
    let sig = headers.get(signature::HEADER).and_then(|v| v.to_str().ok());
    signature::verify(&w.secret, sig, body, now_ms() / 1000)
        .map_err(|e| DlrError::Unauthorized(e.to_string()))?;
    let report: Report =
        serde_json::from_slice(body).map_err(|e| DlrError::Invalid(e.to_string()))?;
    let provider_detail = report
        .detail
        .as_deref()
        .map(clean)
        .filter(|d| !d.is_empty());
    let verdict = match report.status {
        ReportStatus::Delivered => Verdict::Delivered(provider_detail.unwrap_or_default()),
        ReportStatus::Failed => Verdict::Failed(match provider_detail {
            Some(d) => format!("SMS provider reported failure: {d}"),
            None => "SMS provider reported failure".into(),
        }),
    };
    settle(ctx, &m, verdict, None).await
}

async fn handle_twilio(
    ctx: &Ctx,
    message_id: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, DlrError> {
    let (m, cfg) = load(ctx, message_id).await?;
    let ProviderConfig::Twilio(t) = &cfg.provider else {
        return Err(wrong_provider(&cfg, "twilio"));
    };
    // Twilio signs the URL it called, which is the StatusCallback Pushgate gave it: built
    // from the public base, never from the Host header a proxy may have rewritten
    let Some(base) = ctx.settings.dlr_base() else {
        return Err(DlrError::Unauthorized(
            "sms.public_dlr_base_url is not set, so status callbacks cannot be verified".into(),
        ));
    };
    let mut path = twilio::callback_path(message_id);
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    let params: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let sig = headers
        .get(twilio::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok());
    if !twilio::verify(
        &t.auth_token,
        &twilio::signed_urls(base, &path),
        &params,
        sig,
    ) {
        return Err(DlrError::Unauthorized(
            "missing or wrong X-Twilio-Signature".into(),
        ));
    }
    let outcome = twilio::callback_outcome(&params)
        .ok_or_else(|| DlrError::Invalid("MessageStatus is missing".into()))?;
    let sid = params
        .iter()
        .find(|(k, _)| k == "MessageSid")
        .map(|(_, v)| v.as_str());
    let verdict = match outcome {
        CallbackOutcome::Delivered => Verdict::Delivered(String::new()),
        CallbackOutcome::Failed { status, error_code } => Verdict::Failed(match error_code {
            Some(code) => format!(
                "SMS provider reported failure: {status} (Twilio error {})",
                clean(&code)
            ),
            None => format!("SMS provider reported failure: {status}"),
        }),
        CallbackOutcome::Progress => Verdict::Progress,
    };
    settle(ctx, &m, verdict, sid).await
}

async fn handle_kannel(
    ctx: &Ctx,
    message_id: &str,
    token: &str,
    query: Option<&str>,
) -> Result<Response, DlrError> {
    let (m, cfg) = load(ctx, message_id).await?;
    let ProviderConfig::Kannel(k) = &cfg.provider else {
        return Err(wrong_provider(&cfg, "kannel"));
    };
    if !kannel::verify_token(&k.dlr_secret, message_id, token) {
        return Err(DlrError::Unauthorized("wrong delivery report token".into()));
    }
    let params: Vec<(String, String)> =
        form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let kind = get("type")
        .and_then(|t| t.trim().parse::<u32>().ok())
        .ok_or_else(|| DlrError::Invalid("type must be a Kannel DLR type".into()))?;
    let outcome = kannel::dlr_outcome(kind)
        .ok_or_else(|| DlrError::Invalid(format!("unknown Kannel DLR type {kind}")))?;
    let smsc_text = get("status").map(clean).filter(|s| !s.is_empty());
    let verdict = match outcome {
        DlrOutcome::Delivered => Verdict::Delivered(String::new()),
        DlrOutcome::Failed(what) => Verdict::Failed(match smsc_text {
            Some(s) => format!("SMS provider reported failure: {what} ({s})"),
            None => format!("SMS provider reported failure: {what}"),
        }),
        DlrOutcome::Progress => Verdict::Progress,
    };
    settle(ctx, &m, verdict, None).await
}

/// Applies an authenticated report. `provider_ref` is the provider's id of the SMS when the
/// report names one: it must be the one the send recorded.
async fn settle(
    ctx: &Ctx,
    m: &StoredMessage,
    verdict: Verdict,
    provider_ref: Option<&str>,
) -> Result<Response, DlrError> {
    let message_id = m.message.id.as_str();
    let (to, detail) = match verdict {
        Verdict::Progress => return Ok(answer(message_id, m.status)),
        Verdict::Delivered(d) => (Status::SmsDelivered, d),
        Verdict::Failed(d) => (Status::SmsFailed, d),
    };
    // only an SMS that was handed to the provider can have a delivery report; without this,
    // a report could fail a message that never had an SMS (`enqueued → sms_failed` is legal)
    let record = ctx
        .records
        .read(message_id)
        .await?
        .map(|r| SendRecord::parse(&r));
    match (&record, provider_ref) {
        (Some(SendRecord::Sent { reference }), Some(given))
            if !reference.is_empty() && reference != given =>
        {
            return Err(DlrError::Conflict(
                "the report is about another SMS of the provider".into(),
            ));
        }
        (Some(SendRecord::Sent { .. } | SendRecord::Sending { .. }), _) => {}
        _ => {
            return Err(DlrError::Conflict(
                "no SMS was sent for this message".into(),
            ))
        }
    }
    let mut outcome = transition(ctx, message_id, to, &detail).await?;
    if let Transition::Refused(Some(Status::Enqueued | Status::Expired)) = outcome {
        // The report overtook the send's own `sms_sent`: the provider reported before its
        // answer to the send reached the worker (a fast SMSC), or the worker stopped between
        // its send record and the transition. The report proves the SMS was handed over, so
        // `sms_sent` is recorded first and the report after it; answering 409 instead would
        // lose the report, as providers do not send it again. The worker's own `sms_sent`
        // is then refused as a repeat.
        let reference = match &record {
            Some(SendRecord::Sent { reference }) => reference.as_str(),
            _ => "",
        };
        let shape = crate::encoding::shape(worker::sms_text(m));
        transition(
            ctx,
            message_id,
            Status::SmsSent,
            &worker::sent_detail(&shape, reference),
        )
        .await?;
        outcome = transition(ctx, message_id, to, &detail).await?;
    }
    match outcome {
        Transition::Applied(_) | Transition::Noted => Ok(answer(message_id, to)),
        Transition::Refused(Some(cur))
            if matches!(cur, Status::SmsDelivered | Status::SmsFailed) =>
        {
            // the SMS reached its final status already: a repeat or a late report
            Ok(answer(message_id, cur))
        }
        Transition::Refused(cur) => Err(DlrError::Conflict(format!(
            "message is not waiting for an SMS delivery report (status {})",
            cur.map(|s| s.as_str()).unwrap_or("unknown")
        ))),
    }
}

fn answer(message_id: &str, status: Status) -> Response {
    (
        StatusCode::OK,
        Json(json!({"message_id": message_id, "status": status})),
    )
        .into_response()
}
