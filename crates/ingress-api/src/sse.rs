//! An app's live events, read from JetStream: `GET /v1/events/stream` (server-sent events, for
//! browsers and simple clients) here, and gRPC `WatchEvents` in [`crate::grpc`]. Both use
//! [`watch_events`], so they start, resume and end the same way.
//!
//! Every watch is an ordered (ephemeral, unacknowledged, memory-backed) consumer on
//! `{NS}_EVENTS` filtered to `{ns}.evt.{app_id}`. It costs the server nothing once the watcher
//! is gone: dropping the stream stops the pulls and the server removes the consumer after its
//! inactivity threshold (30 s). Delivery is at least once, like webhooks: an event republished
//! by the outbox sweeper after the duplicate window, or replayed from a dead letter, appears
//! again with the same id, so watchers dedupe by id.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::stream::{self, BoxStream, Stream, StreamExt};
use pushgate_bus::async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use pushgate_bus::async_nats::jetstream::Message;
use pushgate_bus::StreamKind;
use pushgate_core::event::{BusEvent, Event};
use pushgate_core::ids::validate_external_id;
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::IntoParams;

use crate::error::ApiError;
use crate::extract::AppAuth;
use crate::Ctx;

/// How often an idle event stream sends a comment, so proxies do not time it out and a
/// vanished client is noticed (the write fails) within one interval.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Where a watch of an app's events starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchStart {
    /// Only events published after the watch began (the default).
    New,
    /// Every retained event the stream stored at or after this instant (the NATS server's
    /// clock decides, not the event's `at`).
    Since(OffsetDateTime),
    /// Every event after the one with this id, which must still be retained (7 days).
    AfterEventId(String),
}

impl WatchStart {
    /// A resume point; `field` names where the id came from in errors (`after_event_id`,
    /// `Last-Event-ID`). Event ids are ids Pushgate minted, so the external-id alphabet and
    /// length bound every valid one and keep anything else out of logs and SSE headers.
    pub fn after(field: &str, id: &str) -> Result<Self, ApiError> {
        validate_external_id(id).map_err(|e| ApiError::invalid(field, format!("{field} {e}")))?;
        Ok(WatchStart::AfterEventId(id.to_string()))
    }

    /// A start time, RFC 3339; `field` names it in errors.
    pub fn since(field: &str, s: &str) -> Result<Self, ApiError> {
        OffsetDateTime::parse(s, &Rfc3339)
            .map(WatchStart::Since)
            .map_err(|e| ApiError::invalid(field, format!("must be an RFC 3339 timestamp: {e}")))
    }
}

/// An app's events as they arrive; an error item (the bus failed) is always the last item.
pub type EventStream = BoxStream<'static, Result<Event, ApiError>>;

/// Open live event watches per app on this instance (`Ctx::watches`).
pub type WatchCounts = Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>;

/// One of an app's live event watches on this instance (at most
/// `ingress.max_watches_per_app`); the slot is given back when the watch's stream is dropped.
pub struct WatchSlot {
    watches: WatchCounts,
    app: String,
}

impl WatchSlot {
    /// Takes a slot of `app`, or answers `TooManyWatches` when all are in use.
    pub fn take(ctx: &Ctx, app: &str) -> Result<WatchSlot, ApiError> {
        let limit = ctx.settings.max_watches_per_app;
        // a poisoned lock still holds consistent counts: each change is one statement
        let mut open = ctx.watches.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(app.to_string()).or_insert(0);
        if *n >= limit {
            return Err(ApiError::TooManyWatches { limit });
        }
        *n += 1;
        Ok(WatchSlot {
            watches: ctx.watches.clone(),
            app: app.to_string(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.app) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.app);
            }
        }
    }
}

/// Opens a watch of `app`'s events from `start`.
///
/// Resuming after an event id has a cost: JetStream cannot look a message up by its content,
/// so the watch reads the app's retained events from the oldest, decoding each, until it
/// finds the id (its first occurrence, so a replayed copy never makes the watcher skip
/// events), and only then starts answering. That is linear in the app's events of the last
/// 7 days; clients that resume often should prefer `since` with a small overlap. The id
/// is looked for only among the events retained when the watch opens (the consumer's
/// pending count then), so an unknown or expired id is a prompt 404 rather than a stream
/// that never starts.
pub async fn watch_events(
    ctx: &Ctx,
    app: &str,
    start: WatchStart,
) -> Result<EventStream, ApiError> {
    // taken first, so a refused watch creates no consumer; held by the stream below
    let slot = WatchSlot::take(ctx, app)?;
    let names = ctx.bus.names();
    let stream_name = names.stream(StreamKind::Events);
    let unavailable =
        |what: &str, e: &dyn std::fmt::Display| ApiError::Unavailable(format!("{what}: {e}"));
    let js_stream = ctx
        .bus
        .jetstream()
        .get_stream(&stream_name)
        .await
        .map_err(|e| unavailable("event stream", &e))?;
    let deliver_policy = match &start {
        WatchStart::New => DeliverPolicy::New,
        WatchStart::Since(t) => DeliverPolicy::ByStartTime { start_time: *t },
        WatchStart::AfterEventId(_) => DeliverPolicy::All,
    };
    let consumer = js_stream
        .create_consumer(OrderedConfig {
            filter_subject: names.events(app),
            deliver_policy,
            description: Some(format!("event watch of {app}")),
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable("event consumer", &e))?;
    let retained = consumer.cached_info().num_pending;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable("event consumer", &e))?;
    // events of a batched bus message not yet handed out
    let mut ready = std::collections::VecDeque::new();
    if let WatchStart::AfterEventId(id) = &start {
        let mut scanned = 0u64;
        loop {
            if scanned >= retained {
                return Err(ApiError::NotFound("event"));
            }
            let msg = match messages.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(unavailable("event consumer", &e)),
                None => return Err(ApiError::Unavailable("event consumer ended".into())),
            };
            scanned += 1;
            let mut events = decode(&msg, app);
            if let Some(at) = events.iter().position(|ev| ev.id == *id) {
                ready.extend(events.drain(at + 1..));
                break;
            }
        }
        tracing::debug!(scanned, "event watch resumed after {id}");
    }
    let app = app.to_string();
    let shutdown = ctx.shutdown.clone();
    let events = stream::unfold(Some((messages, ready)), move |state| {
        // the slot lives as long as this closure, i.e. the stream
        let _slot = &slot;
        let app = app.clone();
        let shutdown = shutdown.clone();
        async move {
            let (mut messages, mut ready) = state?;
            loop {
                if let Some(ev) = ready.pop_front() {
                    return Some((Ok(ev), Some((messages, ready))));
                }
                // a shutting-down ingress ends live streams so draining does not wait on them;
                // clients resume with the last event id
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    n = messages.next() => n,
                };
                match next {
                    Some(Ok(msg)) => ready.extend(decode(&msg, &app)),
                    Some(Err(e)) => {
                        let err = ApiError::Unavailable(format!("event consumer: {e}"));
                        return Some((Err(err), None));
                    }
                    None => return None,
                }
            }
        }
    });
    Ok(events.boxed())
}

/// The public events inside a bus message (one, or a batch: [`pushgate_bus::batch`]).
/// Undecodable events and events of another app (which the subject filter should make
/// impossible) are skipped with a warning rather than ending every watch of the app.
fn decode(msg: &Message, app: &str) -> Vec<Event> {
    let mut out = Vec::new();
    for item in pushgate_bus::batch::items(msg.headers.as_ref(), &msg.payload) {
        match serde_json::from_slice::<BusEvent>(item.payload) {
            Ok(ev) if ev.app_id == app => out.push(ev.event),
            Ok(ev) => {
                tracing::warn!(subject = %msg.subject, app_id = %ev.app_id, "event of another app on the app's subject skipped");
            }
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "undecodable event skipped");
            }
        }
    }
    out
}

/// `GET /v1/events/stream` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Resume after this retained event id.
    #[serde(default)]
    pub after_event_id: Option<String>,
    /// Start at this RFC 3339 time (retained events from then on).
    #[serde(default)]
    pub since: Option<String>,
}

/// `GET /v1/events/stream`: the app's events as server-sent events, one per event, with
/// `id: <event id>` and `data: <event JSON>` (the webhook's event objects). Starts with new
/// events unless `after_event_id` or `since` is given; a `Last-Event-ID` header (sent by
/// `EventSource` when it reconnects) wins over both, so a reconnect resumes where the
/// connection broke. Authenticates with the API key in `Authorization`, as every backend
/// call: the key is never accepted in the URL, where logs and browser history would keep it.
#[utoipa::path(get, path = "/v1/events/stream", tag = "messages", security(("api_key" = [])),
    params(StreamQuery, ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id; overrides the query")),
    responses((status = 200, description = "Server-sent events: `id: <event id>`, `data: <event JSON>`; a comment every 15 s when idle", content_type = "text/event-stream", body = String), crate::openapi::Problems))]
pub async fn stream(
    auth: AppAuth,
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    q: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let start = match (headers.get("last-event-id"), &q.after_event_id, &q.since) {
        (Some(v), _, _) => {
            let id = v
                .to_str()
                .map_err(|_| ApiError::invalid("Last-Event-ID", "must be visible ASCII"))?;
            WatchStart::after("Last-Event-ID", id)?
        }
        (None, Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "query",
                "give at most one of after_event_id or since",
            ))
        }
        (None, Some(id), None) => WatchStart::after("after_event_id", id)?,
        (None, None, Some(t)) => WatchStart::since("since", t)?,
        (None, None, None) => WatchStart::New,
    };
    let events = watch_events(&ctx, &auth.app_id, start).await?;
    let frames = events.filter_map(|item| async move {
        match item {
            Ok(ev) => frame(&ev).map(Ok),
            Err(e) => {
                // the stream ends here; the client reconnects with Last-Event-ID
                tracing::warn!(error = %e, "event stream ended");
                None
            }
        }
    });
    Ok(Sse::new(frames).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// One SSE frame. An id that could break the framing (line breaks) is impossible for ids
/// Pushgate mints, but it comes from the bus, so it is checked instead of trusted.
fn frame(ev: &Event) -> Option<SseEvent> {
    if ev.id.contains(['\n', '\r', '\0']) {
        tracing::warn!(id = ?ev.id, "event with an unusable id skipped");
        return None;
    }
    match SseEvent::default().id(&ev.id).json_data(ev) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(id = %ev.id, error = %e, "event not encodable; skipped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_as_an_event_stream_with_last_event_id() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(crate::openapi::ApiDoc::openapi()).unwrap_or_default();
        let op = &doc["paths"]["/v1/events/stream"]["get"];
        assert!(
            op["responses"]["200"]["content"]["text/event-stream"].is_object(),
            "{op}"
        );
        assert!(op["responses"]["401"].is_object(), "{op}");
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        for (name, place) in [
            ("Last-Event-ID", "header"),
            ("after_event_id", "query"),
            ("since", "query"),
        ] {
            assert!(
                params.iter().any(|p| p["name"] == name && p["in"] == place),
                "{name} missing: {op}"
            );
        }
    }

    #[test]
    fn starts_are_checked_and_name_their_field() {
        assert_eq!(
            WatchStart::after("after_event_id", "0190a1b2-c3d4.1").ok(),
            Some(WatchStart::AfterEventId("0190a1b2-c3d4.1".into()))
        );
        for bad in ["", "a\nb", "a b"] {
            assert!(matches!(
                WatchStart::after("Last-Event-ID", bad),
                Err(ApiError::Invalid { field, .. }) if field == "Last-Event-ID"
            ));
        }
        assert!(matches!(
            WatchStart::since("since", "2026-11-22T20:09:04.123Z"),
            Ok(WatchStart::Since(t)) if t.unix_timestamp() == 1_795_378_144
        ));
        assert!(matches!(
            WatchStart::since("since", "yesterday"),
            Err(ApiError::Invalid { field, .. }) if field == "since"
        ));
    }
}
