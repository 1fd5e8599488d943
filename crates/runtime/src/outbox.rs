//! The outbox publisher: moves events and router commands that the store wrote (in the same
//! atomic step as the state change they describe) onto NATS JetStream.
//!
//! The writer publishes right after its Redis write and then removes the outbox entry; if it
//! dies in between, [`Outbox::sweep`] (run by routers) republishes entries older than a few
//! seconds. Each publish carries a deterministic `Nats-Msg-Id` (event id, or
//! `{message}.{purpose}` for commands), so a republish of something that did reach the stream
//! is dropped by JetStream's duplicate window; consumers are idempotent beyond it. This is why
//! no status event and no follow-up command is lost when any one process crashes.
//!
//! The removal is not awaited by the publisher: a per-process task removes published entries
//! in batches (one `ZREM` for everything published meanwhile), which saves a Redis round trip
//! per event and per command on the hot path. An entry whose removal is still queued when the
//! process dies is one the sweeper republishes, as above.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use pushgate_bus::Bus;
use pushgate_core::{EventKind, Message};
use pushgate_store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::metrics::{Metrics, OutboxLabel};

/// Age after which an outbox entry is presumed orphaned and republished.
pub const ORPHAN_AFTER_MS: i64 = 5_000;

/// A router command on `{ns}.msg.route`: look at this message for this purpose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteCommand {
    pub message_id: String,
    /// `route` (first routing) or `expired`, `cancelled` (follow-ups: SMS fallback, retraction).
    pub purpose: String,
    /// The message itself, as accepted: the ingress sends it with a message's first `route`
    /// so the router need not read it back from Redis (one round trip per message fewer; the
    /// router checks the stored status in its targeting step). A message's content never
    /// changes after acceptance, so this copy is the stored one. Commands from the outbox
    /// sweeper, the clock and cancellations carry none, and the router reads the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Box<Message>>,
}

impl RouteCommand {
    /// A command without the message (the router reads it).
    pub fn new(message_id: impl Into<String>, purpose: impl Into<String>) -> Self {
        RouteCommand {
            message_id: message_id.into(),
            purpose: purpose.into(),
            message: None,
        }
    }

    /// Parses an outbox member `{id}|{purpose}`.
    pub fn from_member(member: &str) -> Option<Self> {
        let (id, purpose) = member.split_once('|')?;
        Some(RouteCommand::new(id, purpose))
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

/// What publishing an event needs of it (subject, id, metric labels), read without copying
/// its texts and data: every status change of every service passes through here.
#[derive(Deserialize)]
struct EventHead<'a> {
    #[serde(borrow)]
    app_id: Cow<'a, str>,
    #[serde(borrow)]
    event: EventHeadInner<'a>,
}

#[derive(Deserialize)]
struct EventHeadInner<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    event: EventKind,
    #[serde(borrow, default)]
    message_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
}

/// Most entries one batched removal takes out of the outboxes.
const REMOVE_BATCH: usize = 1024;

/// Published entries waiting for removal: `true` for the event outbox, else the command one.
type Published = (bool, Vec<String>);

/// Publishes outbox entries.
#[derive(Clone)]
pub struct Outbox {
    bus: Bus,
    store: Store,
    metrics: Arc<Metrics>,
    /// The removal task's queue, started on first use (inside the runtime).
    remover: Arc<OnceLock<mpsc::UnboundedSender<Published>>>,
}

impl Outbox {
    pub fn new(bus: Bus, store: Store, metrics: Arc<Metrics>) -> Self {
        Outbox {
            bus,
            store,
            metrics,
            remover: Arc::new(OnceLock::new()),
        }
    }

    /// Hands published entries to the removal task.
    fn published(&self, evt: bool, members: Vec<String>) {
        if members.is_empty() {
            return;
        }
        let tx = self.remover.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(remove_published(self.store.clone(), rx));
            tx
        });
        // the task is gone only when the runtime is shutting down: the sweeper republishes
        // these entries, and JetStream drops them as duplicates
        let _ = tx.send((evt, members));
    }

    /// Publishes events (as returned by the store) and removes them from the outbox.
    /// Events go into their app subject's next batch ([`pushgate_bus::batch`]), all queued
    /// before any is awaited and in the order given, so the events of one message written by
    /// one caller reach the stream in status order.
    pub async fn publish_events(&self, events: &[String]) -> Result<(), OutboxError> {
        let mut acks = Vec::with_capacity(events.len());
        for raw in events {
            let ev: EventHead =
                serde_json::from_str(raw).map_err(|e| OutboxError::Corrupt(e.to_string()))?;
            let e = &ev.event;
            self.metrics
                .event_published(e.event, e.channel.as_deref(), e.message_id.as_deref());
            acks.push(self.bus.enqueue_batched(
                self.bus.names().events(&ev.app_id),
                &e.id,
                raw.clone().into_bytes().into(),
            ));
        }
        self.settle(true, events.iter().cloned(), acks).await
    }

    /// Publishes router commands (batched like events) and removes them from the outbox.
    pub async fn publish_commands(&self, cmds: &[RouteCommand]) -> Result<(), OutboxError> {
        let subject = self.bus.names().route();
        let mut acks = Vec::with_capacity(cmds.len());
        for c in cmds {
            let msg_id = format!("{}.{}", c.message_id, c.purpose);
            let body = serde_json::to_vec(c).map_err(pushgate_bus::BusError::from)?;
            acks.push(
                self.bus
                    .enqueue_batched(subject.clone(), &msg_id, body.into()),
            );
        }
        self.settle(false, cmds.iter().map(RouteCommand::member), acks)
            .await
    }

    /// Waits for every queued publish; the published entries go to the removal task, the
    /// others stay in the outbox for the sweeper, and the first failure is returned. (Stopping
    /// at the first failure would leave entries that did reach the stream in the outbox too,
    /// and the sweeper's republish of them, in another grouping, would store them twice.)
    async fn settle(
        &self,
        evt: bool,
        members: impl Iterator<Item = String>,
        acks: Vec<impl std::future::Future<Output = Result<(), pushgate_bus::BusError>>>,
    ) -> Result<(), OutboxError> {
        let results = futures::future::join_all(acks).await;
        let mut done = Vec::with_capacity(results.len());
        let mut first_error = None;
        for (member, res) in members.zip(results) {
            match res {
                Ok(()) => done.push(member),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.published(evt, done);
        first_error.map_or(Ok(()), |e| Err(e.into()))
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

/// Removes published entries from the outboxes, batching whatever was published while the
/// previous removal ran. A failed removal is logged and left to the sweeper: the entries stay
/// in the outbox and are republished (and dropped by JetStream as duplicates).
async fn remove_published(store: Store, mut rx: mpsc::UnboundedReceiver<Published>) {
    let (mut events, mut commands) = (Vec::new(), Vec::new());
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some((evt, members)) = next.take() {
            if evt {
                events.extend(members);
            } else {
                commands.extend(members);
            }
            if events.len() + commands.len() < REMOVE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        for (evt, members) in [(true, &mut events), (false, &mut commands)] {
            if let Err(e) = store.outbox_done(evt, members).await {
                tracing::warn!(error = %e, entries = members.len(), "outbox removal failed; the sweeper will republish");
            }
            members.clear();
        }
    }
}
