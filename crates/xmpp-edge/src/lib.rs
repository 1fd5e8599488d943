//! xmpp-edge: the XMPP c2s endpoint devices stay connected to.
//!
//! Layout: [`xml`] (bounded stream parser), [`sasl`] (SCRAM-SHA-256, PLAIN), [`session`] (one
//! connection's life), [`ws`] (XMPP over WebSocket, RFC 7395, for browsers). This module holds
//! the instance: listeners, the session registry, the edge lease in Redis, and the NATS subjects
//! routers use to hand messages over.
//!
//! Durability: a message handed to a session stays in the device's pending queue in Redis
//! until the device confirms it (XEP-0184 receipt or XEP-0198 ack). A dropped connection or a
//! crashed edge therefore loses nothing: the next session drains the pending queue.

mod check;
mod confirm;
pub mod mailbox;
pub mod sasl;
pub mod session;
pub mod ws;
/// The bounded stream parser (crate `pushgate-xmpp`).
pub use pushgate_xmpp as xml;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use pushgate_bus::payloads::{EdgeControl, EdgeDeliver, EdgeDeliverItem, EdgeDeliverReply};
use pushgate_bus::Bus;
use pushgate_core::event::{BusEvent, Event, EventKind, ReplyTag};
use pushgate_core::{Device, EventId, Message};
use pushgate_runtime::outbox::Outbox;
use pushgate_runtime::tls::ReloadableTls;
use pushgate_runtime::{CommonSettings, ConfigError, Metrics};
use pushgate_store::Store;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Settings of the edge (`[edge]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EdgeSettings {
    /// STARTTLS listener (RFC 6120 c2s).
    pub starttls_listen: String,
    /// Direct-TLS listener (XEP-0368); empty disables it.
    pub direct_tls_listen: String,
    /// XMPP over WebSocket (RFC 7395) for browser apps: `wss://` only (the edge's certificate),
    /// path `/xmpp-websocket`, subprotocol `xmpp`; empty disables it.
    pub websocket_listen: String,
    /// Plain-HTTP operations listener.
    pub ops_listen: String,
    /// PEM certificate chain.
    pub tls_cert: PathBuf,
    /// PEM private key.
    pub tls_key: PathBuf,
    /// Instance id (defaults to a random one); names this edge in presence records.
    pub instance_id: Option<String>,
    /// Largest stanza accepted.
    pub max_stanza_bytes: usize,
    /// Deepest element nesting accepted.
    pub max_depth: usize,
    /// Most attributes on one element.
    pub max_attributes: usize,
    /// Stanzas per second a session may send.
    pub max_stanzas_per_sec: u32,
    /// Failed authentications before the connection is closed.
    pub max_auth_failures: u32,
    /// Idle time after which the edge pings the device.
    pub ping_interval_secs: u64,
    /// Time the device has to answer a ping before the session is dropped.
    pub ping_timeout_secs: u64,
    /// Lease of this instance in Redis; sessions of a crashed edge count as offline after it.
    pub lease_secs: u64,
    /// Messages queued per session before further ones wait in Redis.
    pub session_queue: usize,
    /// Time allowed for TLS, authentication and binding.
    pub handshake_timeout_secs: u64,
    /// Time a write may take before the device counts as not reading.
    pub write_timeout_secs: u64,
    /// Failed logins from one IP address within `auth_lockout_secs` before it is locked out.
    pub max_auth_failures_per_ip: u64,
    /// Failed logins of one account within `auth_lockout_secs` before it is locked out.
    pub max_auth_failures_per_account: u64,
    /// Length of the failed-login window, and so of a lockout.
    pub auth_lockout_secs: u64,
    /// How long a dropped session can be resumed (XEP-0198), on any edge.
    pub resume_window_secs: u64,
    /// While a device is inactive (XEP-0352), normal-priority messages are held at most this
    /// long before they go out in one batch; high-priority ones go out at once.
    pub csi_batch_secs: u64,
}

impl Default for EdgeSettings {
    fn default() -> Self {
        EdgeSettings {
            starttls_listen: "127.0.0.1:5222".into(),
            direct_tls_listen: "127.0.0.1:5223".into(),
            websocket_listen: "127.0.0.1:5443".into(),
            ops_listen: "127.0.0.1:9103".into(),
            tls_cert: PathBuf::from("tls/server.pem"),
            tls_key: PathBuf::from("tls/server.key"),
            instance_id: None,
            max_stanza_bytes: 64 * 1024,
            max_depth: 16,
            max_attributes: 32,
            max_stanzas_per_sec: 1000,
            max_auth_failures: 3,
            ping_interval_secs: 120,
            ping_timeout_secs: 30,
            lease_secs: 15,
            session_queue: 64,
            handshake_timeout_secs: 20,
            write_timeout_secs: 30,
            max_auth_failures_per_ip: 30,
            max_auth_failures_per_account: 10,
            auth_lockout_secs: 600,
            resume_window_secs: 300,
            csi_batch_secs: 30,
        }
    }
}

impl EdgeSettings {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v, optional) in [
            ("edge.starttls_listen", &self.starttls_listen, false),
            ("edge.direct_tls_listen", &self.direct_tls_listen, true),
            ("edge.websocket_listen", &self.websocket_listen, true),
            ("edge.ops_listen", &self.ops_listen, false),
        ] {
            if optional && v.is_empty() {
                continue;
            }
            v.parse::<SocketAddr>()
                .map_err(|e| ConfigError::invalid(key, format!("{v:?}: {e}")))?;
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_stanza_bytes) {
            return Err(ConfigError::invalid(
                "edge.max_stanza_bytes",
                "must be 1 KiB to 16 MiB",
            ));
        }
        if !(4..=256).contains(&self.max_depth) {
            return Err(ConfigError::invalid("edge.max_depth", "must be 4-256"));
        }
        if self.lease_secs < 3 {
            return Err(ConfigError::invalid(
                "edge.lease_secs",
                "must be at least 3",
            ));
        }
        if self.session_queue == 0 {
            return Err(ConfigError::invalid(
                "edge.session_queue",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs)
    }
    fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs.max(1))
    }
    fn resume_window(&self) -> Duration {
        Duration::from_secs(self.resume_window_secs.max(1))
    }
    fn csi_batch(&self) -> Duration {
        Duration::from_secs(self.csi_batch_secs.max(1))
    }
    fn ping_timeout(&self) -> Duration {
        Duration::from_secs(self.ping_timeout_secs.max(1))
    }
}

/// Settings file of the edge binary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub common: CommonSettings,
    pub edge: EdgeSettings,
}

/// Errors starting the edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] pushgate_runtime::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] pushgate_store::StoreError),
    #[error("cannot subscribe to {subject}: {detail}")]
    Subscribe { subject: String, detail: String },
}

/// Commands to a live session.
pub enum SessionCmd {
    Deliver(Box<Message>),
    /// Take back a message the device may show (XEP-0424).
    Retract(String),
    Close(&'static str, String),
}

/// A live session as the registry knows it.
pub struct SessionHandle {
    session_id: String,
    tx: mailbox::Sender<SessionCmd>,
    /// Set when a hand-over did not fit the session's queue: the session re-reads its
    /// pending queue when it has room again.
    needs_drain: Arc<AtomicBool>,
}

impl SessionHandle {
    fn new(session_id: &str, tx: mailbox::Sender<SessionCmd>) -> Self {
        SessionHandle {
            session_id: session_id.to_string(),
            tx,
            needs_drain: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Live sessions by app and device: normally one per device, two for the moment a new login
/// replaces an old one. Keyed by device so that hand-overs, retractions and replacements find
/// their session directly however many sessions the edge holds; nested by app so that a
/// lookup (once per hand-over) borrows the ids instead of building a key.
#[derive(Default)]
struct Registry(HashMap<String, HashMap<String, Vec<SessionHandle>>>);

impl Registry {
    fn get(&self, app: &str, device: &str) -> Option<&Vec<SessionHandle>> {
        self.0.get(app)?.get(device)
    }

    fn insert(&mut self, app: &str, device: &str, h: SessionHandle) {
        self.0
            .entry(app.to_string())
            .or_default()
            .entry(device.to_string())
            .or_default()
            .push(h);
    }

    fn remove(&mut self, app: &str, device: &str, session_id: &str) {
        let Some(devices) = self.0.get_mut(app) else {
            return;
        };
        if let Some(list) = devices.get_mut(device) {
            list.retain(|h| h.session_id != session_id);
            if list.is_empty() {
                devices.remove(device);
            }
        }
        if devices.is_empty() {
            self.0.remove(app);
        }
    }

    fn all(&self) -> impl Iterator<Item = &SessionHandle> {
        self.0.values().flat_map(|d| d.values()).flatten()
    }
}

/// One edge instance.
pub struct Edge {
    settings: EdgeSettings,
    domain: String,
    edge_id: String,
    store: Store,
    bus: Bus,
    outbox: Outbox,
    metrics: Arc<Metrics>,
    tls: ReloadableTls,
    sessions: Mutex<Registry>,
    /// Sessions' status changes (devices' confirmations), applied in batches ([`confirm`]).
    confirmations: confirm::Confirmations,
    /// Sessions' hand-over checks, run in batches ([`check`]).
    checks: check::Checks,
}

impl Edge {
    fn limits(&self) -> xml::Limits {
        xml::Limits {
            max_stanza_bytes: self.settings.max_stanza_bytes,
            max_depth: self.settings.max_depth,
            max_attributes: self.settings.max_attributes,
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Registry> {
        match self.sessions.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn register(&self, d: &Device, h: SessionHandle) {
        self.sessions().insert(&d.app_id, &d.device_id, h);
    }

    fn unregister(&self, d: &Device, session_id: &str) {
        self.sessions().remove(&d.app_id, &d.device_id, session_id);
    }

    /// Whether this edge still runs a session of the device (a resume may race the old
    /// session noticing its connection is gone).
    fn has_session(&self, app: &str, device: &str) -> bool {
        self.sessions().get(app, device).is_some()
    }

    /// Closes other sessions of the device: here directly, elsewhere by broadcast.
    async fn replace_elsewhere(&self, d: &Device, keep: &str, previous: &str) {
        self.close_local(
            &d.app_id,
            &d.device_id,
            Some(keep),
            "conflict",
            "replaced by a new login",
        );
        if !previous.starts_with(&format!("{}/", self.edge_id)) {
            let ctl = EdgeControl {
                app_id: d.app_id.clone(),
                device_id: d.device_id.clone(),
                except_session: Some(keep.to_string()),
                reason: "replaced by a new login".into(),
            };
            if let Err(e) = self
                .bus
                .signal_json(self.bus.names().edge_control(), &ctl)
                .await
            {
                tracing::warn!(error = %e, "cannot ask other edges to close the replaced session");
            }
        }
    }

    fn close_local(
        &self,
        app: &str,
        device: &str,
        except: Option<&str>,
        cond: &'static str,
        text: &str,
    ) {
        if let Some(list) = self.sessions().get(app, device) {
            for h in list {
                if Some(h.session_id.as_str()) != except {
                    let _ = h.tx.try_send(SessionCmd::Close(cond, text.to_string()));
                }
            }
        }
    }

    /// Publishes a device's reply as a `reply` event.
    async fn publish_reply(
        &self,
        d: &Device,
        message_id: Option<String>,
        text: String,
    ) -> Result<(), session::SessionError> {
        let mut foreign_id = None;
        if let Some(id) = &message_id {
            match self.store.message(id).await? {
                Some(m) if m.message.app_id == d.app_id => foreign_id = m.message.foreign_id,
                _ => {}
            }
        }
        let ev = BusEvent {
            app_id: d.app_id.clone(),
            seq: 0,
            event: Event {
                id: EventId::generate().0,
                event: EventKind::Reply(ReplyTag::Reply),
                message_id,
                foreign_id,
                user_id: Some(d.user_id.clone()),
                device_id: Some(d.device_id.clone()),
                channel: Some("xmpp".into()),
                at: pushgate_core::time::rfc3339(pushgate_core::time::now_ms()),
                detail: None,
                text: Some(text),
                data: None,
            },
        };
        // published before the next stanza is read, so the device's stream-management ack
        // never covers a reply that is not on the bus yet
        if let Err(e) = self
            .bus
            .publish_json(self.bus.names().events(&d.app_id), &ev.event.id, &ev)
            .await
        {
            return Err(session::SessionError::Stream(
                "internal-server-error",
                format!("cannot record reply: {e}"),
            ));
        }
        Ok(())
    }
}

/// A built edge: listeners bound.
pub struct Service {
    edge: Arc<Edge>,
    starttls: TcpListener,
    direct: Option<TcpListener>,
    websocket: Option<TcpListener>,
    ops: TcpListener,
}

async fn bind(addr: &str) -> Result<TcpListener, EdgeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| EdgeError::Bind {
            addr: addr.to_string(),
            source,
        })
}

impl Service {
    /// Validates settings, loads TLS material and binds the listeners.
    pub async fn build(
        common: &CommonSettings,
        settings: EdgeSettings,
        bus: Bus,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EdgeError> {
        settings.validate()?;
        let tls = ReloadableTls::load(&settings.tls_cert, &settings.tls_key, &[b"xmpp-client"])?;
        let starttls = bind(&settings.starttls_listen).await?;
        let direct = if settings.direct_tls_listen.is_empty() {
            None
        } else {
            Some(bind(&settings.direct_tls_listen).await?)
        };
        let websocket = if settings.websocket_listen.is_empty() {
            None
        } else {
            Some(bind(&settings.websocket_listen).await?)
        };
        let ops = bind(&settings.ops_listen).await?;
        let edge_id = settings
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("e{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
        let outbox = Outbox::new(bus.clone(), store.clone(), metrics.clone());
        let confirmations = confirm::Confirmations::new(store.clone(), bus.batch_linger());
        let checks = check::Checks::new(store.clone());
        let edge = Arc::new(Edge {
            settings,
            domain: common.xmpp_domain.clone(),
            edge_id,
            store,
            bus,
            outbox,
            metrics,
            tls,
            sessions: Mutex::new(Registry::default()),
            confirmations,
            checks,
        });
        Ok(Service {
            edge,
            starttls,
            direct,
            websocket,
            ops,
        })
    }

    /// The STARTTLS address.
    pub fn starttls_addr(&self) -> SocketAddr {
        pushgate_runtime::ops::local_addr(&self.starttls)
    }

    /// The direct-TLS address, if enabled.
    pub fn direct_tls_addr(&self) -> Option<SocketAddr> {
        self.direct.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The WebSocket (RFC 7395) address, if enabled.
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.websocket.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The operations address.
    pub fn ops_addr(&self) -> SocketAddr {
        pushgate_runtime::ops::local_addr(&self.ops)
    }

    /// This instance's id.
    pub fn edge_id(&self) -> &str {
        &self.edge.edge_id
    }

    /// Serves until `shutdown`. Open sessions are closed with `system-shutdown`; their
    /// unconfirmed messages stay pending and go out on the device's next connection.
    pub async fn run_until(self, shutdown: CancellationToken) -> Result<(), EdgeError> {
        let edge = self.edge;
        let lease = Duration::from_secs(edge.settings.lease_secs);
        edge.store.renew_edge_lease(&edge.edge_id, lease).await?;
        let deliver_subject = edge.bus.names().edge_deliver(&edge.edge_id);
        let deliveries = edge
            .bus
            .client()
            .subscribe(deliver_subject.clone())
            .await
            .map_err(|e| EdgeError::Subscribe {
                subject: deliver_subject,
                detail: e.to_string(),
            })?;
        // routers that batch their hand-overs use this one; the single subject above stays
        // for routers that do not (a rolling upgrade runs both)
        let batch_subject = edge.bus.names().edge_deliver_batch(&edge.edge_id);
        let batches = edge
            .bus
            .client()
            .subscribe(batch_subject.clone())
            .await
            .map_err(|e| EdgeError::Subscribe {
                subject: batch_subject,
                detail: e.to_string(),
            })?;
        let control_subject = edge.bus.names().edge_control();
        let control = edge
            .bus
            .client()
            .subscribe(control_subject.clone())
            .await
            .map_err(|e| EdgeError::Subscribe {
                subject: control_subject,
                detail: e.to_string(),
            })?;
        let retract_subject = edge.bus.names().edge_retract(&edge.edge_id);
        let retracts = edge
            .bus
            .client()
            .subscribe(retract_subject.clone())
            .await
            .map_err(|e| EdgeError::Subscribe {
                subject: retract_subject,
                detail: e.to_string(),
            })?;
        let tracker = TaskTracker::new();
        tracker.spawn(retract_loop(edge.clone(), retracts, shutdown.clone()));
        tracker.spawn(lease_loop(edge.clone(), shutdown.clone()));
        tracker.spawn(deliver_loop(edge.clone(), deliveries, shutdown.clone()));
        tracker.spawn(deliver_batch_loop(edge.clone(), batches, shutdown.clone()));
        tracker.spawn(control_loop(edge.clone(), control, shutdown.clone()));
        edge.tls.spawn_watcher(shutdown.clone());
        let ready = pushgate_runtime::ops::Readiness {
            bus: edge.bus.clone(),
            store: edge.store.clone(),
            metrics: edge.metrics.clone(),
        };
        tracker.spawn(pushgate_runtime::ops::serve(
            self.ops,
            ready,
            shutdown.clone(),
        ));
        let sessions = TaskTracker::new();
        if let Some(direct) = self.direct {
            tracker.spawn(accept_loop(
                edge.clone(),
                direct,
                Listener::DirectTls,
                sessions.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(websocket) = self.websocket {
            tracker.spawn(accept_loop(
                edge.clone(),
                websocket,
                Listener::WebSocket,
                sessions.clone(),
                shutdown.clone(),
            ));
        }
        tracing::info!(edge = %edge.edge_id, "xmpp-edge listening");
        accept_loop(
            edge.clone(),
            self.starttls,
            Listener::StartTls,
            sessions.clone(),
            shutdown.clone(),
        )
        .await;
        for h in edge.sessions().all() {
            let _ = h.tx.try_send(SessionCmd::Close(
                "system-shutdown",
                "server shutting down".into(),
            ));
        }
        sessions.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), sessions.wait()).await;
        tracker.close();
        tracker.wait().await;
        let _ = edge.store.drop_edge_lease(&edge.edge_id).await;
        Ok(())
    }
}

/// The client listeners; all run the same session logic once past TLS (and WebSocket framing).
#[derive(Debug, Clone, Copy)]
enum Listener {
    /// RFC 6120 on 5222: STARTTLS first.
    StartTls,
    /// XEP-0368 on 5223: TLS from the first byte.
    DirectTls,
    /// RFC 7395 on 5443: TLS, the HTTP upgrade, then framed XML.
    WebSocket,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::StartTls => "starttls",
            Listener::DirectTls => "direct-tls",
            Listener::WebSocket => "websocket",
        }
    }
}

async fn accept_loop(
    edge: Arc<Edge>,
    l: TcpListener,
    kind: Listener,
    sessions: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut websocket =
        matches!(kind, Listener::WebSocket).then(|| ws::WsListener::new(&edge.domain));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, listener = kind.name(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let edge = edge.clone();
        // the WebSocket listener's TLS config (its own ALPN) follows certificate reloads
        let ws_setup = websocket
            .as_mut()
            .map(|w| (w.tls_config(edge.tls.config()), w.domain()));
        sessions.spawn(async move {
            match ws_setup {
                Some((tls, domain)) => {
                    let res = Box::pin(ws::serve(edge, tcp, peer.ip(), tls, domain)).await;
                    log_end(peer, kind, res);
                }
                None if matches!(kind, Listener::DirectTls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(edge.tls.config());
                    // boxed: a TLS handshake's state is large and short-lived; an unboxed one
                    // would size this task for the session's whole life (see session::serve_tls).
                    // The stream moves into the session's future before that is awaited, so no
                    // room for it stays in this task either.
                    let session = match tokio::time::timeout(
                        edge.settings.handshake_timeout(),
                        Box::pin(acceptor.accept(tcp)),
                    )
                    .await
                    {
                        Ok(Ok(tls)) => Ok(session::serve_tls(edge, tls, peer.ip())),
                        Ok(Err(e)) => Err(session::SessionError::Tls(e.to_string())),
                        Err(_) => Err(session::SessionError::Timeout("TLS handshake")),
                    };
                    let res = match session {
                        Ok(s) => s.await,
                        Err(e) => Err(e),
                    };
                    log_end(peer, kind, res);
                }
                None => log_end(
                    peer,
                    kind,
                    session::serve_starttls(edge, tcp, peer.ip()).await,
                ),
            }
        });
    }
}

fn log_end<E: std::fmt::Display>(peer: SocketAddr, kind: Listener, res: Result<(), E>) {
    match res {
        Ok(()) => tracing::debug!(%peer, listener = kind.name(), "session closed"),
        Err(e) => tracing::info!(%peer, listener = kind.name(), reason = %e, "session ended"),
    }
}

async fn lease_loop(edge: Arc<Edge>, shutdown: CancellationToken) {
    let ttl = Duration::from_secs(edge.settings.lease_secs);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        if let Err(e) = edge.store.renew_edge_lease(&edge.edge_id, ttl).await {
            tracing::warn!(error = %e, "cannot renew the edge lease");
        }
    }
}

/// Hands one message to the named session, if it is here. A full session queue still
/// accepts: the message is in the pending queue and the session reads it when it has room.
fn deliver_one(sessions: &Registry, d: EdgeDeliver) -> EdgeDeliverReply {
    let session = sessions
        .get(&d.message.app_id, &d.device_id)
        .and_then(|list| list.iter().find(|h| h.session_id == d.session_id));
    let Some(h) = session else {
        return EdgeDeliverReply::NoSession;
    };
    match h.tx.try_send(SessionCmd::Deliver(Box::new(d.message))) {
        Ok(()) => EdgeDeliverReply::Accepted,
        Err(mailbox::TrySendError::Full) => {
            h.needs_drain
                .store(true, std::sync::atomic::Ordering::Release);
            EdgeDeliverReply::Accepted
        }
        Err(_) => EdgeDeliverReply::NoSession,
    }
}

/// Answers a hand-over request; a lost answer is a timeout for the router, which retries.
async fn answer<T: Serialize>(
    edge: &Edge,
    to: Option<pushgate_bus::async_nats::Subject>,
    reply: &T,
) {
    let Some(to) = to else {
        return;
    };
    match serde_json::to_vec(reply) {
        Ok(body) => {
            if let Err(e) = edge.bus.client().publish(to, body.into()).await {
                tracing::debug!(error = %e, "cannot answer a hand-over");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode a hand-over answer"),
    }
}

/// The next message of `sub`, or `None` once the edge shuts down or the subscription ends.
async fn next_or_shutdown(
    sub: &mut pushgate_bus::async_nats::Subscriber,
    shutdown: &CancellationToken,
) -> Option<pushgate_bus::async_nats::Message> {
    tokio::select! {
        _ = shutdown.cancelled() => None,
        m = sub.next() => m,
    }
}

/// One hand-over in its message's trace: `set_parent` puts the span under the router's
/// context (a single request's headers, or the map a batch item carries).
fn deliver_traced(
    sessions: &Registry,
    d: EdgeDeliver,
    set_parent: impl FnOnce(&tracing::Span),
) -> EdgeDeliverReply {
    let span = tracing::info_span!(
        pushgate_runtime::telemetry::spans::EDGE_DELIVER,
        result = tracing::field::Empty
    );
    set_parent(&span);
    let reply = deliver_one(sessions, d);
    span.record("result", tracing::field::debug(reply));
    reply
}

/// Single hand-overs (`{ns}.edge.{edge}.deliver`), from routers that do not batch.
async fn deliver_loop(
    edge: Arc<Edge>,
    mut sub: pushgate_bus::async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    while let Some(msg) = next_or_shutdown(&mut sub, &shutdown).await {
        let reply = match serde_json::from_slice::<EdgeDeliver>(&msg.payload) {
            Err(e) => {
                tracing::warn!(error = %e, "unreadable hand-over");
                EdgeDeliverReply::NoSession
            }
            Ok(d) => deliver_traced(&edge.sessions(), d, |span| {
                pushgate_bus::trace::set_parent_from(span, msg.headers.as_ref())
            }),
        };
        answer(&edge, msg.reply, &reply).await;
    }
}

/// Batched hand-overs (`{ns}.edge.{edge}.deliver_batch`): every item is handled under one
/// registry lock, and the answer holds one reply per item, in order. An unreadable batch is
/// answered with no replies, which the router reads as "sessions gone" for each item (as it
/// reads an unreadable single hand-over).
async fn deliver_batch_loop(
    edge: Arc<Edge>,
    mut sub: pushgate_bus::async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    while let Some(msg) = next_or_shutdown(&mut sub, &shutdown).await {
        let replies = match serde_json::from_slice::<Vec<EdgeDeliverItem>>(&msg.payload) {
            Err(e) => {
                tracing::warn!(error = %e, "unreadable batch hand-over");
                Vec::new()
            }
            Ok(items) => {
                let sessions = edge.sessions();
                items
                    .into_iter()
                    .map(|item| {
                        // each hand-over in its own message's trace, carried in the item
                        deliver_traced(&sessions, item.deliver, |span| {
                            pushgate_bus::trace::set_parent_from_map(span, &item.trace)
                        })
                    })
                    .collect()
            }
        };
        answer(&edge, msg.reply, &replies).await;
    }
}

async fn retract_loop(
    edge: Arc<Edge>,
    mut sub: pushgate_bus::async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    while let Some(msg) = next_or_shutdown(&mut sub, &shutdown).await {
        let Ok(r) = serde_json::from_slice::<pushgate_bus::payloads::EdgeRetract>(&msg.payload)
        else {
            continue;
        };
        if let Some(list) = edge.sessions().get(&r.app_id, &r.device_id) {
            for h in list {
                // a full queue is fine: the retraction stays queued in Redis for the next session
                let _ = h.tx.try_send(SessionCmd::Retract(r.message_id.clone()));
            }
        }
    }
}

async fn control_loop(
    edge: Arc<Edge>,
    mut sub: pushgate_bus::async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    while let Some(msg) = next_or_shutdown(&mut sub, &shutdown).await {
        let Ok(ctl) = serde_json::from_slice::<EdgeControl>(&msg.payload) else {
            continue;
        };
        let cond = if ctl.except_session.is_some() {
            "conflict"
        } else {
            "not-authorized"
        };
        edge.close_local(
            &ctl.app_id,
            &ctl.device_id,
            ctl.except_session.as_deref(),
            cond,
            &ctl.reason,
        );
    }
}
