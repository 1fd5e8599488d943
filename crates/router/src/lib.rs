//! router: decides, for every message, how it reaches its user, and owns the time-based
//! promises (expiry, scheduled sends) and the outbox safety net.
//!
//! Three loops run in each router instance; any number of instances may run side by side:
//! - the **route consumer** takes [`RouteCommand`]s from the durable JetStream consumer
//!   `router` (explicit ack; a killed router's unacked work is redelivered to another);
//!   handling is idempotent: it reconciles the message's stored state with what should happen;
//! - the **clock** expires due messages and releases due scheduled ones through atomic Redis
//!   scripts (several routers can run it at once: a message is expired by exactly one);
//! - the **outbox sweeper** (one instance at a time, by lease) republishes events and commands
//!   whose writer died between its Redis write and its NATS publish.

mod handover;
mod targeting;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pushgate_bus::async_nats::jetstream::{self, AckKind};
use pushgate_bus::payloads::{EdgeDeliver, PushRequest, SmsRequest};
use pushgate_bus::{Bus, ConsumerName};
use pushgate_core::time::now_ms;
use pushgate_core::{BusEvent, Device, Message, Status};
use pushgate_runtime::outbox::{Outbox, RouteCommand};
use pushgate_runtime::{CommonSettings, ConfigError, Metrics};
use pushgate_store::{RouteTarget, Store, StoredMessage, Targeted};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Settings of the router (`[router]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterSettings {
    /// Plain-HTTP operations listener.
    pub ops_listen: String,
    /// Commands handled at once by this instance (also the most stream messages taken at
    /// once; a message may carry a batch of commands).
    pub concurrency: usize,
    /// How long to wait for an edge to take a message before retrying.
    pub edge_timeout_ms: u64,
    /// How often the clock looks for due expiries and scheduled messages.
    pub clock_tick_ms: u64,
    /// How often the outbox sweeper runs.
    pub sweep_interval_ms: u64,
}

impl Default for RouterSettings {
    fn default() -> Self {
        RouterSettings {
            ops_listen: "127.0.0.1:9102".into(),
            concurrency: 256,
            edge_timeout_ms: 2000,
            clock_tick_ms: 200,
            sweep_interval_ms: 1000,
        }
    }
}

impl RouterSettings {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.ops_listen.parse::<SocketAddr>().map_err(|e| {
            ConfigError::invalid("router.ops_listen", format!("{:?}: {e}", self.ops_listen))
        })?;
        if self.concurrency == 0 {
            return Err(ConfigError::invalid(
                "router.concurrency",
                "must be at least 1",
            ));
        }
        if !(10..=1000).contains(&self.clock_tick_ms) {
            return Err(ConfigError::invalid(
                "router.clock_tick_ms",
                "must be 10-1000 (expiry fires within one tick)",
            ));
        }
        Ok(())
    }
}

/// Settings file of the router binary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub common: CommonSettings,
    pub router: RouterSettings,
}

/// Errors of the router.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] pushgate_store::StoreError),
    #[error(transparent)]
    Bus(#[from] pushgate_bus::BusError),
    #[error(transparent)]
    Outbox(#[from] pushgate_runtime::outbox::OutboxError),
    #[error("edge {edge} did not take message {message}: {detail}")]
    EdgeBusy {
        edge: String,
        message: String,
        detail: String,
    },
}

struct Ctx {
    settings: RouterSettings,
    bus: Bus,
    store: Store,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    instance: String,
    /// Hand-overs to edges, batched per edge.
    handover: handover::Handover,
    /// First routings' targeting, batched for the router.
    targeting: targeting::Targeting,
    /// `concurrency` permits, one per command being handled: a stream message may carry a
    /// batch of commands, so counting messages alone would not bound the work in flight.
    commands: Arc<tokio::sync::Semaphore>,
}

/// A built router.
pub struct Service {
    ctx: Arc<Ctx>,
    ops: TcpListener,
}

impl Service {
    /// Validates settings and binds the operations listener.
    pub async fn build(
        settings: RouterSettings,
        bus: Bus,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RouterError> {
        settings.validate()?;
        let ops = TcpListener::bind(&settings.ops_listen)
            .await
            .map_err(|source| RouterError::Bind {
                addr: settings.ops_listen.clone(),
                source,
            })?;
        let outbox = Outbox::new(bus.clone(), store.clone(), metrics.clone());
        let instance = format!("router-{}", uuid::Uuid::new_v4().simple());
        let handover =
            handover::Handover::new(bus.clone(), Duration::from_millis(settings.edge_timeout_ms));
        let targeting = targeting::Targeting::new(store.clone());
        let concurrency = settings.concurrency;
        Ok(Service {
            ctx: Arc::new(Ctx {
                settings,
                bus,
                store,
                outbox,
                metrics,
                instance,
                handover,
                targeting,
                commands: Arc::new(tokio::sync::Semaphore::new(concurrency)),
            }),
            ops,
        })
    }

    /// The bound operations address.
    pub fn ops_addr(&self) -> SocketAddr {
        pushgate_runtime::ops::local_addr(&self.ops)
    }

    /// Runs the three loops until `shutdown`; in-flight commands finish (or stay unacked and
    /// are redelivered), nothing is acked that was not handled.
    pub async fn run_until(self, shutdown: CancellationToken) {
        let ops = pushgate_runtime::ops::spawn(
            self.ops,
            &self.ctx.bus,
            &self.ctx.store,
            &self.ctx.metrics,
            shutdown.clone(),
        );
        let clock = tokio::spawn(clock_loop(self.ctx.clone(), shutdown.clone()));
        let sweeper = tokio::spawn(sweep_loop(self.ctx.clone(), shutdown.clone()));
        // open messages, outboxes and consumer lag for /metrics (every router samples the same
        // shared numbers; dashboards take the max)
        let backlog = tokio::spawn(pushgate_runtime::metrics::backlog_loop(
            self.ctx.bus.clone(),
            self.ctx.store.clone(),
            self.ctx.metrics.clone(),
            shutdown.clone(),
        ));
        consume_loop(self.ctx.clone(), shutdown.clone()).await;
        let _ = tokio::join!(ops, clock, sweeper, backlog);
    }
}

async fn consume_loop(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let concurrency = ctx.settings.concurrency;
    let bus = ctx.bus.clone();
    pushgate_bus::consume(
        &bus,
        ConsumerName::Router,
        concurrency,
        shutdown,
        move |msg| {
            let ctx = ctx.clone();
            async move { handle_delivery(&ctx, msg).await }
        },
    )
    .await;
}

/// Handles one stream message: a single route command, or a batch of them
/// ([`pushgate_bus::batch`]), handled side by side. The message is acked when every command in
/// it succeeded; otherwise it is redelivered whole after a delay, and the commands that had
/// succeeded run again, which routing is safe for (see [`route`]).
async fn handle_delivery(ctx: &Ctx, msg: jetstream::Message) {
    let attempt = pushgate_bus::delivery_count(&msg);
    let items = pushgate_bus::batch::items(msg.headers.as_ref(), &msg.payload);
    let results =
        futures::future::join_all(items.iter().map(|item| handle_item(ctx, item, attempt))).await;
    let mut failed = false;
    for ok in results {
        let label = match ok {
            Some(true) => "ok",
            Some(false) => {
                failed = true;
                "retry"
            }
            None => continue,
        };
        ctx.metrics
            .router_handled
            .get_or_create(&pushgate_runtime::metrics::ResultLabel {
                result: label.into(),
            })
            .inc();
    }
    if failed {
        let delay = Duration::from_millis((250 * attempt.min(40)) as u64);
        let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
    } else {
        let _ = msg.ack().await;
    }
}

/// One command of a stream message: `Some(true)` done, `Some(false)` to be retried, `None`
/// unreadable (dropped loudly: it will never become readable).
async fn handle_item(
    ctx: &Ctx,
    item: &pushgate_bus::batch::Item<'_>,
    attempt: u64,
) -> Option<bool> {
    let span = tracing::info_span!(
        pushgate_runtime::telemetry::spans::ROUTER_HANDLE,
        message_id = tracing::field::Empty
    );
    item.set_parent_of(&span);
    let cmd: RouteCommand = match serde_json::from_slice(item.payload) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "unreadable route command; dropping it");
            return None;
        }
    };
    span.record("message_id", cmd.message_id.as_str());
    // the semaphore is never closed
    let Ok(_permit) = ctx.commands.acquire().await else {
        return Some(false);
    };
    match handle(ctx, &cmd, attempt).instrument(span).await {
        Ok(()) => Some(true),
        Err(e) => {
            tracing::warn!(message_id = %cmd.message_id, attempt, error = %e, "route command failed; will retry");
            Some(false)
        }
    }
}

async fn handle(ctx: &Ctx, cmd: &RouteCommand, attempt: u64) -> Result<(), RouterError> {
    if let Some(msg) = carried(cmd) {
        if let Some(user) = &msg.user_id {
            // the common case in one batched store step: still open? then targeted
            match ctx.targeting.target(msg, user).await? {
                Targeted::Closed => return Ok(()),
                Targeted::Devices(targets) => {
                    return reach_targets(ctx, msg, &targets, attempt).await
                }
                // a device record the script cannot judge: the full path reports it
                Targeted::Unjudged => {}
            }
        }
    }
    let Some(m) = ctx.store.message(&cmd.message_id).await? else {
        // erased (user deleted) or past retention: nothing left to do
        return Ok(());
    };
    match cmd.purpose.as_str() {
        "route" => route(ctx, &m, attempt).await,
        "expired" => {
            retract(ctx, &m).await?;
            after_expiry(ctx, &m).await
        }
        "cancelled" => retract(ctx, &m).await,
        other => {
            tracing::warn!(purpose = other, "unknown route command purpose; ignoring");
            Ok(())
        }
    }
}

/// The message a first `route` command carries, when the router can route it from that copy:
/// to a user, without a collapse key (the collapse claim comes before targeting, and reads
/// the user's devices on its own). Anything else is read from the store.
fn carried(cmd: &RouteCommand) -> Option<&Message> {
    let m = cmd.message.as_deref()?;
    (cmd.purpose == "route"
        && m.id == cmd.message_id
        && m.user_id.is_some()
        && m.collapse_key.is_none())
    .then_some(m)
}

/// First routing of a message. Safe to repeat: the pending queue is a set, edges ignore
/// messages a session already has, and push/SMS requests carry deterministic ids.
async fn route(ctx: &Ctx, m: &StoredMessage, attempt: u64) -> Result<(), RouterError> {
    if !matches!(m.status, Status::Enqueued | Status::Sent) {
        return Ok(());
    }
    let msg = &m.message;
    let Some(user) = &msg.user_id else {
        // phone-only recipient: SMS is the channel
        let req = SmsRequest {
            app_id: msg.app_id.clone(),
            message_id: msg.id.clone(),
        };
        ctx.bus
            .publish_json(ctx.bus.names().sms(), &format!("{}.sms", msg.id), &req)
            .await?;
        return Ok(());
    };
    if let Some(key) = &msg.collapse_key {
        // the claim decides whether this message is routed at all, so it comes before the
        // targets are written; a user with no device to route to claims nothing
        let mut devices = ctx.store.user_devices(&msg.app_id, user).await?;
        if let Some(only) = &msg.device_id {
            devices.retain(|d| &d.device_id == only);
        }
        if !devices.is_empty() && collapse(ctx, msg, user, key).await? {
            return Ok(());
        }
    }
    // targets, pending queues and presence in one store round trip
    let targets = ctx.store.target_user_devices(msg, user).await?;
    reach_targets(ctx, msg, &targets, attempt).await
}

/// Reaches every targeted device of a message (see [`reach_device`]).
async fn reach_targets(
    ctx: &Ctx,
    msg: &Message,
    targets: &[RouteTarget],
    attempt: u64,
) -> Result<(), RouterError> {
    if targets.is_empty() {
        tracing::info!(message_id = %msg.id, "no device to route to; the message waits for expiry");
        return Ok(());
    }
    let mut retry = None;
    for t in targets {
        if let Some(e) = reach_device(ctx, msg, &t.device, t.presence.as_ref(), attempt).await? {
            retry = Some(e);
        }
    }
    retry.map_or(Ok(()), Err)
}

/// Reaches one targeted device: through its live session when `presence` names one, else by
/// native push. `Ok(Some(e))`: the edge was too busy to answer on an early attempt; the
/// caller goes on with the other devices and then fails the command with `e`, so it is
/// redelivered and this device gets another chance at XMPP before falling back to a push.
async fn reach_device(
    ctx: &Ctx,
    msg: &Message,
    d: &Device,
    presence: Option<&(String, String)>,
    attempt: u64,
) -> Result<Option<RouterError>, RouterError> {
    if let Some((edge, session)) = presence {
        match hand_to_edge(ctx, edge, session, d, msg).await {
            Ok(true) => return Ok(None),
            Ok(false) => {}
            // an overloaded edge: try again a few times before falling back to a push
            Err(e) if attempt < 4 => return Ok(Some(e)),
            Err(e) => {
                tracing::warn!(error = %e, "edge unreachable; falling back to native push")
            }
        }
    }
    if d.has_usable_token() {
        // a device that has never held an XMPP session is native-only: the push is the
        // channel; otherwise it is a wake-up and delivery is confirmed over XMPP
        let ever_connected = ctx
            .store
            .last_seen(&msg.app_id, std::slice::from_ref(&d.device_id))
            .await?
            .first()
            .is_some_and(|s| s.is_some());
        let kind = if ever_connected { "wakeup" } else { "channel" };
        let req = PushRequest {
            app_id: msg.app_id.clone(),
            device_id: d.device_id.clone(),
            message_id: msg.id.clone(),
            kind: kind.into(),
        };
        ctx.bus
            .publish_json(
                ctx.bus.names().push(),
                &format!("{}.{}.push", msg.id, d.device_id),
                &req,
            )
            .await?;
    }
    Ok(None)
}

/// Asks the device's edge to write the message to the live session. `Ok(false)`: the
/// session is gone (treat as offline). The request goes out in a batch with the other
/// hand-overs to the same edge; this item's outcome is its own.
async fn hand_to_edge(
    ctx: &Ctx,
    edge: &str,
    session: &str,
    d: &Device,
    msg: &Message,
) -> Result<bool, RouterError> {
    let req = EdgeDeliver {
        session_id: session.into(),
        device_id: d.device_id.clone(),
        message: msg.clone(),
    };
    ctx.handover
        .hand_over(edge, req)
        .await
        .map_err(|e| RouterError::EdgeBusy {
            edge: edge.into(),
            message: msg.id.clone(),
            detail: e.detail,
        })
}

/// A newer message with the same collapse key replaces an older undelivered one of the same
/// user. Returns true when `msg` itself is the one replaced (a newer one was routed first).
async fn collapse(
    ctx: &Ctx,
    msg: &pushgate_core::Message,
    user: &str,
    key: &str,
) -> Result<bool, RouterError> {
    let Some(victim) = ctx.store.collapse_claim(msg, user, key).await? else {
        return Ok(false);
    };
    let newer = if victim == msg.id {
        "a newer message".to_string()
    } else {
        msg.id.clone()
    };
    let detail = format!("replaced by {newer} with the same collapse_key");
    let change = pushgate_store::Change {
        message_id: &victim,
        to: Some(Status::Cancelled),
        detail: Some(&detail),
        command: Some("cancelled"),
        ..Default::default()
    };
    if let pushgate_store::Transition::Applied(ev) = ctx.store.change(&change, now_ms()).await? {
        ctx.outbox.publish_events(&[ev]).await?;
        ctx.outbox
            .publish_commands(&[RouteCommand::new(victim.clone(), "cancelled")])
            .await?;
    }
    Ok(victim == msg.id)
}

/// After a cancellation or expiry: a notification the device may already show is taken back —
/// a data-only "retract" push where a native push went out, and XEP-0424 on XMPP (now, if the
/// device is connected, and in any case on its next session).
async fn retract(ctx: &Ctx, m: &StoredMessage) -> Result<(), RouterError> {
    let msg = &m.message;
    let reached_xmpp = ctx.store.message_state(&msg.id).await?.is_some_and(|s| {
        s.history
            .iter()
            .any(|h| h.status == Status::Sent && h.channel.as_deref() == Some("xmpp"))
    });
    for dev in &m.targets {
        let pushed = ctx.store.push_attempted(&msg.id, dev).await?;
        if pushed {
            let req = PushRequest {
                app_id: msg.app_id.clone(),
                device_id: dev.clone(),
                message_id: msg.id.clone(),
                kind: "retract".into(),
            };
            ctx.bus
                .publish_json(
                    ctx.bus.names().push(),
                    &format!("{}.{dev}.retract", msg.id),
                    &req,
                )
                .await?;
        }
        if pushed || reached_xmpp {
            ctx.store
                .add_retraction(&msg.app_id, dev, &msg.id, now_ms())
                .await?;
            if let Some((edge, _)) = ctx.store.presence(&msg.app_id, dev).await? {
                let r = pushgate_bus::payloads::EdgeRetract {
                    app_id: msg.app_id.clone(),
                    device_id: dev.clone(),
                    message_id: msg.id.clone(),
                };
                if let Err(e) = ctx
                    .bus
                    .signal_json(ctx.bus.names().edge_retract(&edge), &r)
                    .await
                {
                    tracing::debug!(error = %e, "live retraction not signalled; it goes out on the next session");
                }
            }
        }
    }
    Ok(())
}

/// After an expiry: the SMS fallback, when asked for and possible.
async fn after_expiry(ctx: &Ctx, m: &StoredMessage) -> Result<(), RouterError> {
    let msg = &m.message;
    if m.status == Status::Expired && msg.sms_fallback.is_some() && msg.phone.is_some() {
        let req = SmsRequest {
            app_id: msg.app_id.clone(),
            message_id: msg.id.clone(),
        };
        ctx.bus
            .publish_json(ctx.bus.names().sms(), &format!("{}.sms", msg.id), &req)
            .await?;
    }
    Ok(())
}

/// Expires due messages and releases due scheduled ones, every tick.
async fn clock_loop(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let tick = Duration::from_millis(ctx.settings.clock_tick_ms);
    while !shutdown.is_cancelled() {
        if let Err(e) = clock_once(&ctx).await {
            tracing::warn!(error = %e, "clock tick failed");
        }
        pushgate_bus::sleep_or_cancel(&shutdown, tick).await;
    }
}

async fn clock_once(ctx: &Ctx) -> Result<(), RouterError> {
    for (expire, purpose) in [(true, "expired"), (false, "route")] {
        loop {
            let now = now_ms();
            let events = if expire {
                ctx.store.expire_due(now, 200).await?
            } else {
                ctx.store.release_due(now, 200).await?
            };
            if events.is_empty() {
                break;
            }
            let cmds: Vec<RouteCommand> = events
                .iter()
                .filter_map(|e| serde_json::from_str::<BusEvent>(e).ok())
                .filter_map(|e| e.event.message_id)
                .map(|id| RouteCommand::new(id, purpose))
                .collect();
            let n = events.len();
            ctx.outbox.publish_events(&events).await?;
            ctx.outbox.publish_commands(&cmds).await?;
            if n < 200 {
                break;
            }
        }
    }
    Ok(())
}

/// Republishes orphaned outbox entries; one router at a time holds the sweeper lease.
async fn sweep_loop(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let every = Duration::from_millis(ctx.settings.sweep_interval_ms);
    while !shutdown.is_cancelled() {
        match ctx
            .store
            .lease("outbox-sweeper", &ctx.instance, every * 5)
            .await
        {
            Ok(true) => match ctx.outbox.sweep(now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    republished = n,
                    "outbox sweeper republished orphaned entries"
                ),
                Err(e) => tracing::warn!(error = %e, "outbox sweep failed"),
            },
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot take the sweeper lease"),
        }
        pushgate_bus::sleep_or_cancel(&shutdown, every).await;
    }
}
