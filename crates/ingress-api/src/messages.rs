//! Messages (backend endpoints).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pushgate_core::credentials::sha256_hex;
use pushgate_core::event::{BusEvent, Event, EventKind};
use pushgate_core::ids::validate_external_id;
use pushgate_core::message::MessageState;
use pushgate_core::time::{now_ms, parse_rfc3339, rfc3339};
use pushgate_core::{Message, MessageId, Priority, SmsFallback, Status};
use pushgate_runtime::outbox::RouteCommand;
use pushgate_store::{Change, Transition};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::devices::check_phone;
use crate::error::ApiError;
use crate::extract::{parse_json, AppAuth};
use crate::Ctx;

/// Most recipients in one request.
pub const MAX_RECIPIENTS: usize = 1000;
/// Longest text (bytes, UTF-8).
pub const MAX_TEXT_BYTES: usize = 4096;
/// Longest title (bytes).
pub const MAX_TITLE_BYTES: usize = 256;
/// Largest `data` object, serialised.
pub const MAX_DATA_BYTES: usize = 4096;
/// Longest SMS fallback text (bytes).
pub const MAX_SMS_TEXT_BYTES: usize = 1600;
/// TTL bounds (seconds).
pub const MAX_TTL: u64 = 2_592_000;
pub const DEFAULT_TTL: u64 = 86_400;

/// One recipient: a user (all of their devices, or the one `device_id` named), or a phone
/// number only (sent by SMS).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Recipient {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign_id: Option<String>,
}

/// `POST /v1/messages` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// 1 to 1000 recipients; one message id each.
    pub recipients: Vec<Recipient>,
    /// At most 4096 bytes.
    pub text: String,
    /// At most 256 bytes.
    #[serde(default)]
    pub title: Option<String>,
    /// A JSON object of at most 4 KiB, delivered with the message.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    #[serde(default)]
    pub priority: Option<Priority>,
    /// Seconds, 1 to 2592000 (default 86400).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2592000)]
    pub ttl: Option<u64>,
    #[serde(default)]
    pub collapse_key: Option<String>,
    #[serde(default)]
    pub sms_fallback: Option<SmsFallback>,
    /// RFC 3339; the message is `scheduled` until then.
    #[serde(default)]
    pub send_at: Option<String>,
}

/// One accepted message in the answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub id: String,
    #[serde(flatten)]
    pub recipient: Recipient,
    pub status: Status,
}

/// `POST /v1/messages` answer, in recipient order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SendResponse {
    pub messages: Vec<Accepted>,
}

/// What an idempotency key remembers: the request's hash and, once done, the answer.
#[derive(Debug, Serialize, Deserialize)]
struct IdemRecord {
    body_hash: String,
    #[serde(default)]
    response: Option<SendResponse>,
}

fn check_len(field: &str, v: &str, max: usize) -> Result<(), ApiError> {
    if v.len() > max {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {max} bytes, got {}", v.len()),
        ));
    }
    Ok(())
}

fn check_ext(field: String, v: &str) -> Result<(), ApiError> {
    validate_external_id(v).map_err(|e| ApiError::invalid(field.clone(), format!("{field} {e}")))
}

/// Validates everything that does not need the store.
fn validate(req: &SendRequest, now: i64) -> Result<(i64, i64), ApiError> {
    if req.recipients.is_empty() || req.recipients.len() > MAX_RECIPIENTS {
        return Err(ApiError::invalid(
            "recipients",
            format!(
                "must hold 1 to {MAX_RECIPIENTS} recipients, got {}",
                req.recipients.len()
            ),
        ));
    }
    for (i, r) in req.recipients.iter().enumerate() {
        if r.user_id.is_none() && r.phone.is_none() {
            return Err(ApiError::invalid(
                format!("recipients[{i}]"),
                "needs a user_id or a phone",
            ));
        }
        if let Some(u) = &r.user_id {
            check_ext(format!("recipients[{i}].user_id"), u)?;
        }
        if let Some(d) = &r.device_id {
            if r.user_id.is_none() {
                return Err(ApiError::invalid(
                    format!("recipients[{i}].device_id"),
                    "needs the user_id it belongs to",
                ));
            }
            check_ext(format!("recipients[{i}].device_id"), d)?;
        }
        if let Some(p) = &r.phone {
            check_phone(&format!("recipients[{i}].phone"), p)?;
        }
        if let Some(f) = &r.foreign_id {
            check_ext(format!("recipients[{i}].foreign_id"), f)?;
        }
    }
    if req.text.is_empty() {
        return Err(ApiError::invalid("text", "must not be empty"));
    }
    check_len("text", &req.text, MAX_TEXT_BYTES)?;
    if let Some(t) = &req.title {
        check_len("title", t, MAX_TITLE_BYTES)?;
    }
    if let Some(d) = &req.data {
        if !d.is_object() {
            return Err(ApiError::invalid("data", "must be a JSON object"));
        }
        let n = serde_json::to_vec(d).map(|v| v.len()).unwrap_or(usize::MAX);
        if n > MAX_DATA_BYTES {
            return Err(ApiError::invalid(
                "data",
                format!("must be at most {MAX_DATA_BYTES} bytes as JSON, got {n}"),
            ));
        }
    }
    let ttl = req.ttl.unwrap_or(DEFAULT_TTL);
    if ttl == 0 || ttl > MAX_TTL {
        return Err(ApiError::invalid(
            "ttl",
            format!("must be 1 to {MAX_TTL} seconds, got {ttl}"),
        ));
    }
    if let Some(k) = &req.collapse_key {
        check_ext("collapse_key".into(), k)?;
    }
    if let Some(f) = &req.sms_fallback {
        if let Some(t) = &f.text {
            if t.is_empty() {
                return Err(ApiError::invalid("sms_fallback.text", "must not be empty"));
            }
            check_len("sms_fallback.text", t, MAX_SMS_TEXT_BYTES)?;
        }
    }
    let start = match &req.send_at {
        None => now,
        Some(s) => {
            let t = parse_rfc3339(s).map_err(|e| {
                ApiError::invalid("send_at", format!("must be an RFC 3339 timestamp: {e}"))
            })?;
            if t > now + (MAX_TTL as i64) * 1000 {
                return Err(ApiError::invalid(
                    "send_at",
                    "must be at most 30 days ahead",
                ));
            }
            t.max(now)
        }
    };
    Ok((start, start + (ttl as i64) * 1000))
}

/// Checks that named users and devices exist in the app.
///
/// All distinct users are read in one round trip ([`pushgate_store::Store::users_devices`]),
/// each with its own result; [`judge_recipients`] then judges the recipients in order.
async fn check_recipients(ctx: &Ctx, app: &str, req: &SendRequest) -> Result<(), ApiError> {
    let mut seen = HashSet::new();
    let users: Vec<&str> = req
        .recipients
        .iter()
        .filter_map(|r| r.user_id.as_deref())
        .filter(|u| seen.insert(*u))
        .collect();
    let read = ctx.store.users_devices(app, &users).await?;
    let read = users
        .into_iter()
        .zip(read)
        .map(|(u, devs)| {
            (
                u,
                devs.map(|d| d.into_iter().map(|d| d.device_id).collect()),
            )
        })
        .collect();
    judge_recipients(&req.recipients, read)
}

/// Judges the recipients in order against each named user's device ids as read (`read` holds
/// every user named), answering as when each user was read at its first mention: the first
/// failing recipient is reported, whether its user or device is unknown or its user's devices
/// could not be read.
fn judge_recipients<'a>(
    recipients: &'a [Recipient],
    mut read: HashMap<&'a str, Result<Vec<String>, pushgate_store::StoreError>>,
) -> Result<(), ApiError> {
    let mut users: HashMap<&str, Vec<String>> = HashMap::new();
    for (i, r) in recipients.iter().enumerate() {
        let Some(u) = r.user_id.as_deref() else {
            continue;
        };
        if !users.contains_key(u) {
            // first mention, where the user used to be read: its read error surfaces here
            let devs = read
                .remove(u)
                .ok_or_else(|| ApiError::Internal(format!("user {u:?} was not read")))??;
            users.insert(u, devs);
        }
        let devs = users.get(u).map(Vec::as_slice).unwrap_or(&[]);
        if devs.is_empty() {
            return Err(ApiError::UnknownUser {
                field: format!("recipients[{i}].user_id"),
                detail: format!("user {u:?} has no registered device in this app"),
            });
        }
        if let Some(d) = &r.device_id {
            if !devs.contains(d) {
                return Err(ApiError::UnknownUser {
                    field: format!("recipients[{i}].device_id"),
                    detail: format!("device {d:?} is not registered to user {u:?}"),
                });
            }
        }
    }
    Ok(())
}

/// The first event of a message.
fn first_event(m: &Message, status: Status) -> Result<String, ApiError> {
    let ev = BusEvent {
        app_id: m.app_id.clone(),
        seq: 1,
        event: Event {
            id: format!("{}.1", m.id),
            event: EventKind::Status(status),
            message_id: Some(m.id.clone()),
            foreign_id: m.foreign_id.clone(),
            user_id: m.user_id.clone(),
            device_id: None,
            channel: None,
            at: rfc3339(m.created_at),
            detail: None,
            text: None,
            data: None,
        },
    };
    serde_json::to_string(&ev).map_err(|e| ApiError::Internal(e.to_string()))
}

/// `POST /v1/messages`
#[utoipa::path(post, path = "/v1/messages", tag = "messages", security(("api_key" = [])), request_body = SendRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Same key and body within 24 h: same answer, no new messages")),
    responses((status = 202, description = "Accepted and durable; one message per recipient", body = SendResponse), crate::openapi::Problems))]
pub async fn send(
    auth: AppAuth,
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    // body limit and content type are enforced by ApiJson for other routes; here the raw
    // bytes are also needed for the idempotency hash
    let ct = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("application/json")
    {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body = crate::extract::read_body(body, ctx.settings.max_body_bytes).await?;
    let req: SendRequest = parse_json(&body)?;
    let idem = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .map_err(|_| ApiError::invalid("Idempotency-Key", "must be visible ASCII"))?;
            Some(Idempotency::new("Idempotency-Key", k, sha256_hex(&body))?)
        }
    };
    let resp = send_message(&ctx, &auth.app_id, req, idem).await?;
    Ok((StatusCode::ACCEPTED, Json(resp)).into_response())
}

/// An idempotency key of a send, hashed, with the hash of the request it came with. The
/// request hash is whatever the protocol sees as "the same request" (REST: the raw body bytes;
/// gRPC: the encoded message without its key), so a key replayed with another request is
/// refused rather than silently answered with the first request's messages.
pub(crate) struct Idempotency {
    key_hash: String,
    body_hash: String,
}

impl Idempotency {
    /// Checks the key (1-255 bytes; `field` names where it came from) and keeps only its hash,
    /// so keys never reach Redis in clear.
    pub(crate) fn new(field: &str, key: &str, body_hash: String) -> Result<Self, ApiError> {
        if key.is_empty() || key.len() > 255 {
            return Err(ApiError::invalid(field, "must be 1-255 characters"));
        }
        Ok(Idempotency {
            key_hash: sha256_hex(key.as_bytes()),
            body_hash,
        })
    }
}

/// Accepts a parsed send request for `app`, honouring an idempotency key: the same key
/// with the same request answers the first answer again without creating messages; with
/// another request it is a conflict. Shared by REST and gRPC so both accept the same way.
pub(crate) async fn send_message(
    ctx: &Ctx,
    app: &str,
    req: SendRequest,
    idem: Option<Idempotency>,
) -> Result<SendResponse, ApiError> {
    if let Some(Idempotency {
        key_hash: key,
        body_hash,
    }) = &idem
    {
        let claim = serde_json::to_string(&IdemRecord {
            body_hash: body_hash.clone(),
            response: None,
        })
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        if !ctx.store.claim_idempotency(app, key, &claim).await? {
            let rec = ctx.store.idempotency(app, key).await?.unwrap_or_default();
            let rec: IdemRecord =
                serde_json::from_str(&rec).map_err(|e| ApiError::Internal(e.to_string()))?;
            if rec.body_hash != *body_hash {
                return Err(ApiError::Conflict {
                    kind: "idempotency-key-reused",
                    detail: "this Idempotency-Key was used with a different request body".into(),
                });
            }
            return match rec.response {
                Some(r) => Ok(r),
                None => Err(ApiError::Conflict {
                    kind: "idempotency-key-in-progress",
                    detail: "a request with this Idempotency-Key is still being processed; retry shortly".into(),
                }),
            };
        }
    }
    let span = tracing::info_span!(
        pushgate_runtime::telemetry::spans::INGRESS_ACCEPT,
        app_id = app
    );
    let result = tracing::Instrument::instrument(accept(ctx, app, req), span).await;
    if let Some(Idempotency {
        key_hash: key,
        body_hash,
    }) = idem
    {
        match &result {
            Ok(resp) => {
                let rec = serde_json::to_string(&IdemRecord {
                    body_hash,
                    response: Some(resp.clone()),
                })
                .map_err(|e| ApiError::Internal(e.to_string()))?;
                ctx.store.finish_idempotency(app, &key, &rec).await?;
            }
            Err(_) => ctx.store.release_idempotency(app, &key).await?,
        }
    }
    result
}

async fn accept(ctx: &Ctx, app: &str, req: SendRequest) -> Result<SendResponse, ApiError> {
    let now = now_ms();
    let (start, expires_at) = validate(&req, now)?;
    check_recipients(ctx, app, &req).await?;
    let status = if start > now {
        Status::Scheduled
    } else {
        Status::Enqueued
    };
    let mut records = Vec::with_capacity(req.recipients.len());
    let mut answer = Vec::with_capacity(req.recipients.len());
    for (pos, r) in req.recipients.iter().enumerate() {
        let m = Message {
            id: MessageId::generate().0,
            app_id: app.to_string(),
            user_id: r.user_id.clone(),
            device_id: r.device_id.clone(),
            phone: r.phone.clone(),
            foreign_id: r.foreign_id.clone(),
            text: req.text.clone(),
            title: req.title.clone(),
            data: req.data.clone(),
            priority: req.priority.unwrap_or_default(),
            collapse_key: req.collapse_key.clone(),
            sms_fallback: req.sms_fallback.clone(),
            send_at: (status == Status::Scheduled).then_some(start),
            created_at: now,
            pos: pos as u32,
            expires_at,
        };
        let ev = first_event(&m, status)?;
        answer.push(Accepted {
            id: m.id.clone(),
            recipient: r.clone(),
            status,
        });
        records.push((m, status, ev));
    }
    // the commit point: after this MULTI the messages are accepted, whatever happens next
    // with the acceptance span's context, so the receipt and webhook spans join this trace
    let trace = pushgate_runtime::telemetry::current_traceparent();
    ctx.store
        .create_messages_traced(&records, trace.as_deref())
        .await?;
    ctx.metrics
        .accepted
        .get_or_create(&pushgate_runtime::metrics::AppLabel {
            app: app.to_string(),
        })
        .inc_by(records.len() as u64);
    let mut events = Vec::with_capacity(records.len());
    let mut cmds = Vec::with_capacity(records.len());
    for (m, status, ev) in records {
        events.push(ev);
        if status == Status::Enqueued {
            cmds.push(RouteCommand {
                message_id: m.id.clone(),
                purpose: "route".into(),
                message: Some(Box::new(m)),
            });
        }
    }
    // events first, so `enqueued` is on the stream before anything a router does with it
    if let Err(e) = ctx.outbox.publish_events(&events).await {
        tracing::warn!(error = %e, "event publish deferred to the outbox sweeper");
    } else if let Err(e) = ctx.outbox.publish_commands(&cmds).await {
        tracing::warn!(error = %e, "route publish deferred to the outbox sweeper");
    }
    Ok(SendResponse { messages: answer })
}

/// One history line.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HistoryView {
    pub status: Status,
    /// RFC 3339.
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A message with its status and history.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MessageView {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign_id: Option<String>,
    pub status: Status,
    /// The channel of the latest status (`xmpp`, `apns`, `fcm`, `hms`, `webpush`, `sms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    pub created_at: String,
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at: Option<String>,
    pub history: Vec<HistoryView>,
}

/// A page of messages.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MessageList {
    pub messages: Vec<MessageView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Answer of a cancellation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Cancelled {
    pub status: Status,
}

/// A message as the API shows it.
pub fn view(s: &MessageState) -> MessageView {
    let m = &s.message;
    MessageView {
        id: m.id.clone(),
        user_id: m.user_id.clone(),
        device_id: m.device_id.clone(),
        phone: m.phone.clone(),
        foreign_id: m.foreign_id.clone(),
        status: s.status,
        channel: s.channel.clone(),
        created_at: rfc3339(m.created_at),
        expires_at: rfc3339(m.expires_at),
        send_at: m.send_at.map(rfc3339),
        history: s
            .history
            .iter()
            .map(|h| HistoryView {
                status: h.status,
                at: rfc3339(h.at),
                channel: h.channel.clone(),
                device_id: h.device_id.clone(),
                detail: h.detail.clone(),
            })
            .collect(),
    }
}

/// Loads one of `app`'s messages; anything else (malformed id, missing, another app's) is
/// the same 404, so ids of other apps cannot be probed.
pub(crate) async fn load(ctx: &Ctx, app: &str, id: &str) -> Result<MessageState, ApiError> {
    if !MessageId::is_well_formed(id) {
        return Err(ApiError::NotFound("message"));
    }
    match ctx.store.message_state(id).await? {
        Some(s) if s.message.app_id == app => Ok(s),
        // another app's message is indistinguishable from a missing one
        _ => Err(ApiError::NotFound("message")),
    }
}

/// `GET /v1/messages/{id}`
#[utoipa::path(get, path = "/v1/messages/{id}", tag = "messages", security(("api_key" = [])),
    params(("id" = String, Path, description = "Message id")),
    responses((status = 200, description = "The message", body = MessageView), crate::openapi::Problems))]
pub async fn get(
    auth: AppAuth,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
) -> Result<Json<MessageView>, ApiError> {
    Ok(Json(view(&load(&ctx, &auth.app_id, &id).await?)))
}

/// `GET /v1/messages` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    pub foreign_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub cursor: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `GET /v1/messages?foreign_id=…|user_id=…[&cursor=…][&limit=…]`, newest first. The cursor is
/// opaque (`next_cursor` of the previous page).
#[utoipa::path(get, path = "/v1/messages", tag = "messages", security(("api_key" = [])), params(ListQuery),
    responses((status = 200, description = "A page of messages, newest first", body = MessageList), crate::openapi::Problems))]
pub async fn list(
    auth: AppAuth,
    State(ctx): State<Arc<Ctx>>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MessageList>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    Ok(Json(list_messages(&ctx, &auth.app_id, q).await?))
}

/// One page of `app`'s messages by foreign id or user, newest first (shared by REST and gRPC).
pub(crate) async fn list_messages(
    ctx: &Ctx,
    app: &str,
    q: ListQuery,
) -> Result<MessageList, ApiError> {
    let index = match (&q.foreign_id, &q.user_id) {
        (Some(f), None) => {
            check_ext("foreign_id".into(), f)?;
            ctx.store.keys().foreign_messages(app, f)
        }
        (None, Some(u)) => {
            check_ext("user_id".into(), u)?;
            ctx.store.keys().user_messages(app, u)
        }
        _ => {
            return Err(ApiError::invalid(
                "query",
                "give exactly one of foreign_id or user_id",
            ))
        }
    };
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > 200 {
        return Err(ApiError::invalid("limit", "must be 1 to 200"));
    }
    let before = match &q.cursor {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| ApiError::invalid("cursor", "is not a cursor this API issued"))?,
        ),
    };
    let ids = ctx.store.list_messages(&index, before, limit + 1).await?;
    let more = ids.len() > limit;
    let mut out = Vec::new();
    let mut last_score = None;
    for (id, score) in ids.into_iter().take(limit) {
        if let Some(s) = ctx.store.message_state(&id).await? {
            if s.message.app_id == app {
                out.push(view(&s));
            }
        }
        last_score = Some(score);
    }
    let next = if more {
        last_score.map(|s| s.to_string())
    } else {
        None
    };
    Ok(MessageList {
        messages: out,
        next_cursor: next,
    })
}

/// `DELETE /v1/messages/{id}`: cancels a message that is not delivered yet.
#[utoipa::path(delete, path = "/v1/messages/{id}", tag = "messages", security(("api_key" = [])),
    params(("id" = String, Path, description = "Message id")),
    responses((status = 200, description = "Cancelled", body = Cancelled), crate::openapi::Problems))]
pub async fn cancel(
    auth: AppAuth,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
) -> Result<Json<Cancelled>, ApiError> {
    Ok(Json(cancel_message(&ctx, &auth.app_id, &id).await?))
}

/// Cancels one of `app`'s messages if its status still allows it; a settled message is a
/// `not-cancellable` conflict naming its current status (shared by REST and gRPC).
pub(crate) async fn cancel_message(ctx: &Ctx, app: &str, id: &str) -> Result<Cancelled, ApiError> {
    let s = load(ctx, app, id).await?;
    let change = Change {
        message_id: id,
        to: Some(Status::Cancelled),
        detail: Some("cancelled by the backend"),
        command: Some("cancelled"),
        ..Default::default()
    };
    match ctx.store.change(&change, now_ms()).await? {
        Transition::Applied(ev) => {
            if let Err(e) = ctx.outbox.publish_events(&[ev]).await {
                tracing::warn!(error = %e, "event publish deferred to the outbox sweeper");
            }
            let cmd = RouteCommand::new(id, "cancelled");
            if let Err(e) = ctx.outbox.publish_commands(&[cmd]).await {
                tracing::warn!(error = %e, "command publish deferred to the outbox sweeper");
            }
            Ok(Cancelled {
                status: Status::Cancelled,
            })
        }
        Transition::Noted | Transition::Refused(_) => {
            let cur = ctx
                .store
                .message(id)
                .await?
                .map(|m| m.status)
                .unwrap_or(s.status);
            Err(ApiError::Conflict {
                kind: "not-cancellable",
                detail: format!("message is already {cur} and can no longer be cancelled"),
            })
        }
    }
}

/// Cancels and erases a user's undelivered messages (user deletion).
pub async fn erase_undelivered(ctx: &Ctx, app: &str, user: &str) -> Result<(), ApiError> {
    let ids = ctx.store.user_message_ids(app, user, 100_000).await?;
    for id in ids {
        let Some(m) = ctx.store.message(&id).await? else {
            continue;
        };
        if m.message.app_id != app || !m.status.is_open() {
            continue;
        }
        let change = Change {
            message_id: &id,
            to: Some(Status::Cancelled),
            detail: Some("user deleted"),
            ..Default::default()
        };
        if let Transition::Applied(ev) = ctx.store.change(&change, now_ms()).await? {
            if let Err(e) = ctx.outbox.publish_events(&[ev]).await {
                tracing::warn!(error = %e, "event publish deferred to the outbox sweeper");
            }
            ctx.store.erase_message(&m.message).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use pushgate_store::StoreError;

    use super::*;

    fn to(user: &str, device: Option<&str>) -> Recipient {
        Recipient {
            user_id: Some(user.into()),
            device_id: device.map(str::to_string),
            phone: None,
            foreign_id: None,
        }
    }

    fn sms() -> Recipient {
        Recipient {
            user_id: None,
            device_id: None,
            phone: Some("+15550100".into()),
            foreign_id: None,
        }
    }

    /// u1 has d1, u2 none, u3's devices could not be read.
    fn read() -> HashMap<&'static str, Result<Vec<String>, StoreError>> {
        HashMap::from([
            ("u1", Ok(vec!["d1".to_string()])),
            ("u2", Ok(vec![])),
            ("u3", Err(StoreError::Conflict("dev".into()))),
        ])
    }

    /// The answer as the API gives it: kind and field.
    fn verdict(rs: &[Recipient]) -> Option<(String, Option<String>)> {
        judge_recipients(rs, read()).err().map(|e| match e {
            ApiError::UnknownUser { field, .. } => ("unknown-user".into(), Some(field)),
            ApiError::Unavailable(_) => ("unavailable".into(), None),
            other => (format!("unexpected: {other}"), None),
        })
    }

    #[test]
    fn the_first_failing_recipient_is_reported() {
        assert_eq!(
            verdict(&[to("u1", None), sms(), to("u1", Some("d1"))]),
            None
        );
        let unknown = |f: &str| Some(("unknown-user".to_string(), Some(f.to_string())));
        // a user without devices before an unreadable one, and the other way round
        assert_eq!(
            verdict(&[to("u1", None), to("u2", None), to("u3", None)]),
            unknown("recipients[1].user_id")
        );
        assert_eq!(
            verdict(&[sms(), to("u3", None), to("u2", None)]),
            Some(("unavailable".to_string(), None))
        );
        // an unknown device of a known user, before anything else
        assert_eq!(
            verdict(&[to("u1", None), to("u1", Some("d9")), to("u3", None)]),
            unknown("recipients[1].device_id")
        );
        // a user mentioned again is judged on the same read
        assert_eq!(
            verdict(&[to("u1", Some("d1")), to("u2", Some("d1"))]),
            unknown("recipients[1].user_id")
        );
    }
}
