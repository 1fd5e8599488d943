//! Dead-lettered webhook batches (operator endpoints): batches an app's endpoint did not
//! accept within the retry limit. Listing shows them; replaying puts their events back on the
//! event stream with their original ids, so the receiver can dedupe, and removes them from the list.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use pushgate_core::{BusEvent, DeadLetter};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::ApiError;
use crate::extract::Admin;
use crate::Ctx;

/// One dead-lettered batch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterView {
    /// The `Pushgate-Delivery` id it was sent with.
    pub batch_id: String,
    /// RFC 3339.
    pub failed_at: String,
    pub reason: String,
    /// The events, as the webhook would have received them.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<pushgate_core::Event>,
}

/// `GET /v1/apps/{app_id}/dead-letters` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterList {
    pub dead_letters: Vec<DeadLetterView>,
}

/// Listing query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterQuery {
    /// At most this many, oldest first (1-500, default 100).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Replay answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Replayed {
    /// Batches replayed.
    pub batches: usize,
    /// Events put back on the stream.
    pub events: usize,
}

fn view(d: DeadLetter) -> DeadLetterView {
    DeadLetterView {
        batch_id: d.batch_id,
        failed_at: pushgate_core::time::rfc3339(d.failed_at),
        reason: d.reason,
        events: d.events,
    }
}

async fn check_app(ctx: &Ctx, app_id: &str) -> Result<(), ApiError> {
    if !pushgate_core::AppId::is_well_formed(app_id) || ctx.store.app(app_id).await?.is_none() {
        return Err(ApiError::NotFound("app"));
    }
    Ok(())
}

/// `GET /v1/apps/{app_id}/dead-letters`
#[utoipa::path(get, path = "/v1/apps/{app_id}/dead-letters", tag = "apps", security(("admin_token" = [])),
    params(("app_id" = String, Path), DeadLetterQuery),
    responses((status = 200, description = "Dead-lettered batches, oldest first", body = DeadLetterList), crate::openapi::Problems))]
pub async fn list(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    Path(app_id): Path<String>,
    q: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 500 {
        return Err(ApiError::invalid("limit", "must be 1 to 500"));
    }
    check_app(&ctx, &app_id).await?;
    let items = ctx.store.dead_letters(&app_id, limit).await?;
    Ok(Json(DeadLetterList {
        dead_letters: items.into_iter().map(view).collect(),
    }))
}

/// Puts a dead letter's events back on the stream. Each republish gets its own `Nats-Msg-Id`
/// (`{event}.replay.{batch}`) so JetStream does not drop it as a duplicate of the original,
/// while the event id inside stays the same for receivers to dedupe.
async fn replay_one(ctx: &Ctx, d: &DeadLetter) -> Result<usize, ApiError> {
    let subject = ctx.bus.names().events(&d.app_id);
    for e in &d.events {
        let ev = BusEvent {
            app_id: d.app_id.clone(),
            seq: e.seq(),
            event: e.clone(),
        };
        let msg_id = format!("{}.replay.{}", e.id, d.batch_id);
        if let Err(err) = ctx.bus.publish_json(subject.clone(), &msg_id, &ev).await {
            // put it back so nothing is lost, then report the outage
            ctx.store.put_dead_letter(d).await?;
            return Err(ApiError::Unavailable(format!("event stream: {err}")));
        }
    }
    Ok(d.events.len())
}

/// `POST /v1/apps/{app_id}/dead-letters/{batch_id}/replay`
#[utoipa::path(post, path = "/v1/apps/{app_id}/dead-letters/{batch_id}/replay", tag = "apps", security(("admin_token" = [])),
    params(("app_id" = String, Path), ("batch_id" = String, Path)),
    responses((status = 202, description = "Events put back for delivery", body = Replayed), crate::openapi::Problems))]
pub async fn replay(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    Path((app_id, batch_id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Replayed>), ApiError> {
    check_app(&ctx, &app_id).await?;
    if batch_id.is_empty() || batch_id.len() > 64 {
        return Err(ApiError::NotFound("dead letter"));
    }
    let d = ctx
        .store
        .take_dead_letter(&app_id, &batch_id)
        .await?
        .ok_or(ApiError::NotFound("dead letter"))?;
    let events = replay_one(&ctx, &d).await?;
    Ok((StatusCode::ACCEPTED, Json(Replayed { batches: 1, events })))
}

/// `POST /v1/apps/{app_id}/dead-letters/replay`: replays every dead letter of the app.
#[utoipa::path(post, path = "/v1/apps/{app_id}/dead-letters/replay", tag = "apps", security(("admin_token" = [])),
    params(("app_id" = String, Path)),
    responses((status = 202, description = "Events put back for delivery", body = Replayed), crate::openapi::Problems))]
pub async fn replay_all(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    Path(app_id): Path<String>,
) -> Result<(StatusCode, Json<Replayed>), ApiError> {
    check_app(&ctx, &app_id).await?;
    let mut out = Replayed {
        batches: 0,
        events: 0,
    };
    loop {
        let page = ctx.store.dead_letters(&app_id, 100).await?;
        if page.is_empty() {
            break;
        }
        for d in page {
            if let Some(d) = ctx.store.take_dead_letter(&app_id, &d.batch_id).await? {
                out.events += replay_one(&ctx, &d).await?;
                out.batches += 1;
            }
        }
    }
    Ok((StatusCode::ACCEPTED, Json(out)))
}
