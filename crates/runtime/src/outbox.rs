//! The outbox publisher: moves events and router commands that the store wrote (in the same
//! atomic step as the state change they describe) onto NATS JetStream.
//!
//! The writer publishes right after its Redis write and then removes the outbox entry; if it
//! dies in between, [`Outbox::sweep`] (run by routers) republishes entries older than a few
//! seconds. Each publish carries a deterministic `Nats-Msg-Id` (event id, or
//! `{message}.{purpose}` for commands), so a republish of something that did reach the stream
//! is dropped by JetStream's duplicate window; consumers are idempotent beyond it. This is why
//! no status event and no follow-up command is lost when any one process crashes.

use std::sync::Arc;

use pushgate_bus::Bus;
use pushgate_core::BusEvent;
use pushgate_store::{Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::metrics::{Metrics, OutboxLabel};

/// Age after which an outbox entry is presumed orphaned and republished.
pub const ORPHAN_AFTER_MS: i64 = 5_000;

/// A router command on `{ns}.msg.route`: look at this message for this purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCommand {
    pub message_id: String,
    /// `route` (first routing) or `expired`, `cancelled` (follow-ups: SMS fallback, retraction).
    pub purpose: String,
}

impl RouteCommand {
    /// Parses an outbox member `{id}|{purpose}`.
    pub fn from_member(member: &str) -> Option<Self> {
        let (id, purpose) = member.split_once('|')?;
        Some(RouteCommand {
            message_id: id.to_string(),
            purpose: purpose.to_string(),
        })
    }

    /// The outbox member for this command.
    pub fn member(&self) -> String {
        format!("{}|{}", self.message_id, self.purpose)
    }
}

/// Errors of the outbox publisher.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] pushgate_bus::BusError),
    #[error("outbox entry is not valid: {0}")]
    Corrupt(String),
}

/// Publishes outbox entries.
#[derive(Clone)]
pub struct Outbox {
    bus: Bus,
    store: Store,
    metrics: Arc<Metrics>,
}

impl Outbox {
    pub fn new(bus: Bus, store: Store, metrics: Arc<Metrics>) -> Self {
        Outbox {
            bus,
            store,
            metrics,
        }
    }

    /// Publishes events (as returned by the store) and removes them from the outbox.
    /// Events are published one after the other, in the order given, so the events of one
    /// message written by one caller reach the stream in status order.
    pub async fn publish_events(&self, events: &[String]) -> Result<(), OutboxError> {
        for raw in events {
            let ev: BusEvent =
                serde_json::from_str(raw).map_err(|e| OutboxError::Corrupt(e.to_string()))?;
            self.metrics.event_published(&ev);
            self.bus
                .publish_bytes(
                    self.bus.names().events(&ev.app_id),
                    &ev.event.id,
                    raw.clone().into_bytes().into(),
                )
                .await?;
        }
        self.store.outbox_done(true, events).await?;
        Ok(())
    }

    /// Publishes router commands and removes them from the outbox.
    pub async fn publish_commands(&self, cmds: &[RouteCommand]) -> Result<(), OutboxError> {
        let subject = self.bus.names().route();
        for c in cmds {
            let msg_id = format!("{}.{}", c.message_id, c.purpose);
            self.bus.publish_json(subject.clone(), &msg_id, c).await?;
        }
        let members: Vec<String> = cmds.iter().map(|c| c.member()).collect();
        self.store.outbox_done(false, &members).await?;
        Ok(())
    }

    /// Republishes orphaned entries of both outboxes; returns how many.
    pub async fn sweep(&self, now_ms: i64) -> Result<usize, OutboxError> {
        let cutoff = now_ms - ORPHAN_AFTER_MS;
        let events = self.store.stale_outbox(true, cutoff, 500).await?;
        let n_events = events.len();
        if !events.is_empty() {
            self.metrics
                .outbox_republished
                .get_or_create(&OutboxLabel {
                    outbox: "events".into(),
                })
                .inc_by(events.len() as u64);
            self.publish_events(&events).await?;
        }
        let cmds = self.store.stale_outbox(false, cutoff, 500).await?;
        let n_cmds = cmds.len();
        let parsed: Vec<RouteCommand> = cmds
            .iter()
            .filter_map(|m| RouteCommand::from_member(m))
            .collect();
        if !parsed.is_empty() {
            self.metrics
                .outbox_republished
                .get_or_create(&OutboxLabel {
                    outbox: "commands".into(),
                })
                .inc_by(parsed.len() as u64);
            self.publish_commands(&parsed).await?;
        }
        Ok(n_events + n_cmds)
    }
}
