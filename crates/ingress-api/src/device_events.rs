//! `POST /v1/device/events`: delivery and read reports from devices that have no XMPP session
//! (web push service workers, native-only apps). Authenticated with the device's own XMPP
//! credentials over HTTP Basic, so a device can only report on messages sent to it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use pushgate_core::time::now_ms;
use pushgate_core::{Device, MessageId, Status};
use pushgate_store::{Change, Transition};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::Ctx;

/// Most events in one report.
pub const MAX_DEVICE_EVENTS: usize = 100;

/// What the device saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceEventKind {
    /// The notification reached the device (→ `delivered`).
    Delivered,
    /// The user opened the message (→ `read`).
    Read,
    /// The user tapped the notification (→ `read`, detail `clicked`).
    Clicked,
    /// The user dismissed the notification unread (→ `delivered`, detail `dismissed`).
    Dismissed,
}

/// One report.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceEvent {
    pub message_id: String,
    pub kind: DeviceEventKind,
}

/// `POST /v1/device/events` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceEvents {
    /// 1 to 100 reports.
    pub events: Vec<DeviceEvent>,
}

/// What became of one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The message's status changed.
    Applied,
    /// Recorded, but the status was already at or past that point (or the message expired).
    Unchanged,
    /// Not a message sent to this device.
    Unknown,
}

/// One result, in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceEventResult {
    pub message_id: String,
    pub outcome: Outcome,
}

/// `POST /v1/device/events` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceEventResults {
    pub events: Vec<DeviceEventResult>,
}

/// Authenticates the device from `Authorization: Basic base64(jid:password)`.
async fn device_from_basic(ctx: &Ctx, headers: &HeaderMap) -> Result<Device, ApiError> {
    let v = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::Unauthorized)?;
    let (scheme, b64) = v.split_once(' ').ok_or(ApiError::Unauthorized)?;
    if !scheme.eq_ignore_ascii_case("basic") || b64.len() > 512 {
        return Err(ApiError::Unauthorized);
    }
    let raw = STANDARD
        .decode(b64.trim())
        .map_err(|_| ApiError::Unauthorized)?;
    let text = String::from_utf8(raw).map_err(|_| ApiError::Unauthorized)?;
    let (jid, password) = text.split_once(':').ok_or(ApiError::Unauthorized)?;
    let local = jid.split('@').next().unwrap_or("");
    if local.is_empty() || local.len() > 64 {
        return Err(ApiError::Unauthorized);
    }
    let device = ctx
        .store
        .device_by_jid(local)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let creds = device.scram.clone();
    let password = password.to_string();
    // PBKDF2 is deliberately slow: keep it off the I/O threads
    let ok = tokio::task::spawn_blocking(move || {
        pushgate_core::credentials::verify_password(&creds, &password)
    })
    .await
    .unwrap_or(false);
    if ok {
        Ok(device)
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// `POST /v1/device/events`
#[utoipa::path(post, path = "/v1/device/events", tag = "devices", security(("device_basic" = [])), request_body = DeviceEvents,
    responses((status = 200, description = "One result per report, in order", body = DeviceEventResults), crate::openapi::Problems))]
pub async fn report(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<DeviceEvents>,
) -> Result<Json<DeviceEventResults>, ApiError> {
    let device = device_from_basic(&ctx, &headers).await?;
    ctx.check_rate(&device.app_id).await?;
    if body.events.is_empty() || body.events.len() > MAX_DEVICE_EVENTS {
        return Err(ApiError::invalid(
            "events",
            format!("must hold 1 to {MAX_DEVICE_EVENTS} events"),
        ));
    }
    let channel = device.platform.native_channel().unwrap_or("http");
    let mut out = Vec::with_capacity(body.events.len());
    for (i, ev) in body.events.iter().enumerate() {
        if !MessageId::is_well_formed(&ev.message_id) {
            return Err(ApiError::invalid(
                format!("events[{i}].message_id"),
                "is not a message id",
            ));
        }
        let outcome = apply(&ctx, &device, channel, ev).await?;
        out.push(DeviceEventResult {
            message_id: ev.message_id.clone(),
            outcome,
        });
    }
    Ok(Json(DeviceEventResults { events: out }))
}

async fn apply(
    ctx: &Ctx,
    device: &Device,
    channel: &str,
    ev: &DeviceEvent,
) -> Result<Outcome, ApiError> {
    let Some(m) = ctx.store.message(&ev.message_id).await? else {
        return Ok(Outcome::Unknown);
    };
    let for_device = m.message.app_id == device.app_id
        && m.message.user_id.as_deref() == Some(device.user_id.as_str())
        && (m.targets.iter().any(|t| t == &device.device_id)
            || m.message.device_id.as_deref() == Some(&device.device_id));
    if !for_device {
        return Ok(Outcome::Unknown);
    }
    let (to, detail) = match ev.kind {
        DeviceEventKind::Delivered => (Status::Delivered, None),
        DeviceEventKind::Dismissed => (Status::Delivered, Some("dismissed")),
        DeviceEventKind::Read => (Status::Read, None),
        DeviceEventKind::Clicked => (Status::Read, Some("clicked")),
    };
    // reading implies delivery: make sure `delivered` is reported first
    if to == Status::Read && matches!(m.status, Status::Enqueued | Status::Sent) {
        let first = Change {
            message_id: &ev.message_id,
            to: Some(Status::Delivered),
            channel: Some(channel),
            device_id: Some(&device.device_id),
            ..Default::default()
        };
        if let Transition::Applied(e) = ctx.store.change(&first, now_ms()).await? {
            publish(ctx, e).await;
        }
    }
    let change = Change {
        message_id: &ev.message_id,
        to: Some(to),
        channel: Some(channel),
        device_id: Some(&device.device_id),
        detail,
        command: None,
    };
    Ok(match ctx.store.change(&change, now_ms()).await? {
        Transition::Applied(e) => {
            publish(ctx, e).await;
            Outcome::Applied
        }
        Transition::Noted | Transition::Refused(_) => Outcome::Unchanged,
    })
}

async fn publish(ctx: &Ctx, event: String) {
    if let Err(e) = ctx.outbox.publish_events(&[event]).await {
        tracing::warn!(error = %e, "event publish deferred to the outbox sweeper");
    }
}
