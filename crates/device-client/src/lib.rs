//! Pushgate device client: what an app embeds to receive Pushgate messages over XMPP.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pushgate_device::ClientError> {
//! use pushgate_device::{Client, ClientConfig, DeviceEvent, TlsMode};
//! let client = Client::connect(ClientConfig {
//!     jid: "d0123…@push.example.com".into(),
//!     password: "…".into(),
//!     host: "push.example.com".into(),
//!     port: 5222,
//!     tls: TlsMode::Starttls,
//!     ca_pem_file: None,
//!     resource: None,
//!     store_path: "messages.redb".into(),
//! })
//! .await?;
//! loop {
//!     match client.next_event().await? {
//!         DeviceEvent::Message { id, text, .. } => {
//!             println!("{text}");
//!             client.ack(&id).await?;
//!         }
//!         DeviceEvent::Retracted { id } => println!("withdrawn: {id}"),
//!         DeviceEvent::Reconnected => {}
//!     }
//! }
//! # }
//! ```
//!
//! What it does for the app:
//!
//! - **Connection**: STARTTLS (port 5222) or direct TLS (5223), trusting the given CA file or
//!   else the Mozilla roots; the certificate must name the JID's domain. SCRAM-SHA-256 login,
//!   verifying the server's signature too. Resource binding, XEP-0198 stream management.
//! - **Keeping it up**: server pings are answered, the server is pinged after a long silence,
//!   and after a network drop the client reconnects with exponential backoff and jitter, logs in
//!   again and reports [`DeviceEvent::Reconnected`]. It first tries to **resume** the dropped
//!   session (XEP-0198 `<resume/>`, within the edge's resume window): the server then counts the
//!   messages the app had taken as delivered, and our stanzas it had not received (receipts,
//!   markers, replies) are sent again. When resumption is refused (window over, server
//!   restarted, an edge without it) a **new session is bound** instead: the server's pending
//!   queue re-sends every message the device had not confirmed, the local store drops the
//!   copies the app already saw, and every stanza of ours the server had not acknowledged is
//!   sent again.
//! - **Exactly once for the app**: [`Client::next_event`] never returns a message id twice, also
//!   across restarts and when the app showed the message from a native push first
//!   ([`Client::note_native_push`]). The store is a redb file at
//!   [`ClientConfig::store_path`]; see [`MessageState`] for what it keeps.
//! - **Honest acknowledgements**: XEP-0198 `<a h/>` (which the server counts as delivery) only
//!   covers messages the app has taken from [`Client::next_event`], never ones still queued
//!   in memory, so a crash cannot make the server believe a message was delivered.
//!
//! The public surface uses plain types only (strings, integers, a path, enums, records), so it
//! can be exported to Swift and Kotlin with UniFFI-style bindings; every method takes `&self`,
//! so one `Client` can be shared between tasks (`Arc<Client>`). It needs a Tokio runtime.

mod actor;
mod conn;
mod scram;
mod store;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use store::MessageState;

use crate::actor::{Cmd, Inbound, Pending, Shared};
use crate::conn::Target;
use crate::store::Store;

/// How the TLS connection is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP upgraded with STARTTLS (XMPP's usual port 5222). Never falls back to
    /// plaintext: a server that does not offer STARTTLS is refused.
    Starttls,
    /// TLS from the first byte (port 5223), for networks that block or tamper with STARTTLS.
    DirectTls,
}

/// Everything [`Client::connect`] needs.
#[derive(Clone)]
pub struct ClientConfig {
    /// The device's bare JID from registration (`local@domain`).
    pub jid: String,
    /// The device's XMPP password from registration.
    pub password: String,
    /// Host name or address to dial (the certificate is checked against the JID's domain).
    pub host: String,
    /// TCP port (5222 for STARTTLS, 5223 for direct TLS by default on the edge).
    pub port: u16,
    /// STARTTLS or direct TLS.
    pub tls: TlsMode,
    /// A PEM file with the CA(s) to trust instead of the built-in Mozilla roots (private or
    /// test deployments).
    pub ca_pem_file: Option<PathBuf>,
    /// The resource to bind; the server picks one when `None`.
    pub resource: Option<String>,
    /// The local message store (created with its directory when missing).
    pub store_path: PathBuf,
}

impl std::fmt::Debug for ClientConfig {
    /// Leaves the password out, so a logged configuration does not leak it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("jid", &self.jid)
            .field("password", &"<redacted>")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("ca_pem_file", &self.ca_pem_file)
            .field("resource", &self.resource)
            .field("store_path", &self.store_path)
            .finish()
    }
}

/// What [`Client::next_event`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// A message the app has not seen before.
    Message {
        /// The Pushgate message id (what `ack`, `mark_read` and `reply` take).
        id: String,
        /// The title, if the message has one.
        title: Option<String>,
        /// The text.
        text: String,
        /// The message's `data` object as JSON text, if any.
        data_json: Option<String>,
        /// When the app first saw it (Unix milliseconds).
        received_at: u64,
    },
    /// The sender withdrew a message (cancelled or expired before it was confirmed): remove it
    /// from view if it is shown (it may also have come by native push).
    Retracted {
        /// The withdrawn message's id.
        id: String,
    },
    /// The connection dropped and a new session is up. Nothing is lost: unconfirmed messages
    /// arrive again (and copies the app saw are dropped).
    Reconnected,
}

/// Why a call failed. Plain strings, so bindings can map it to a native error type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// A bad configuration value or argument; nothing was sent.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The network failed (connect, read, write, timeout).
    #[error("network: {0}")]
    Network(String),
    /// TLS could not be set up (certificate not trusted, no STARTTLS offered, …).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server refused the credentials (or could not prove it knows them). Not retried:
    /// the device may have been deregistered or moved to another user.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server answered a request with an error (the XMPP error condition).
    #[error("refused by the server: {0}")]
    Refused(String),
    /// The server ended the session with a stream error (the condition), e.g. `conflict`
    /// when another login of this device replaced it.
    #[error("session ended by the server: {0}")]
    Stream(String),
    /// The local store failed.
    #[error("local store: {0}")]
    Store(String),
    /// The client was closed (or stopped after a fatal error).
    #[error("the client is closed")]
    Closed,
}

impl ClientError {
    /// Errors a reconnect cannot fix: stop and tell the app instead of retrying forever.
    fn is_fatal(&self) -> bool {
        matches!(
            self,
            ClientError::Auth(_) | ClientError::Invalid(_) | ClientError::Store(_)
        )
    }
}

/// Native push services [`Client::enable_push`] accepts.
const PUSH_SERVICES: [&str; 3] = ["apns", "fcm", "hms"];
/// Store key of the service last enabled, which `disable_push` must name again.
const META_PUSH_SERVICE: &str = "push_service";
/// Longest message id accepted from anyone (Pushgate's ids are far shorter).
pub(crate) const MAX_ID_BYTES: usize = 256;
/// Longest reply text: the API's message text limit.
const MAX_REPLY_BYTES: usize = 4096;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A message id we are willing to store and echo: bounded and free of control characters.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control)
}

fn check_id(id: &str) -> Result<(), ClientError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ClientError::Invalid(format!(
            "message id must be 1-{MAX_ID_BYTES} bytes without control characters"
        )))
    }
}

/// Runs a store operation off the async threads (redb commits wait for the disk).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClientError::Store(format!("store task failed: {e}")))?
}

fn load_roots(ca: Option<&PathBuf>) -> Result<rustls::RootCertStore, ClientError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| ClientError::Invalid(format!("CA file {}: {e}", path.display())))?;
            for c in certs {
                let c = c.map_err(|e| {
                    ClientError::Invalid(format!("CA file {}: {e}", path.display()))
                })?;
                roots.add(c).map_err(|e| {
                    ClientError::Invalid(format!("CA file {}: {e}", path.display()))
                })?;
            }
            if roots.is_empty() {
                return Err(ClientError::Invalid(format!(
                    "CA file {} holds no certificate",
                    path.display()
                )));
            }
        }
        None => {
            // compiled-in Mozilla roots: the same trust on every platform, including mobile
            // ones where rustls cannot read the system store
            roots.add_parsable_certificates(
                webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned(),
            );
        }
    }
    Ok(roots)
}

fn target(config: &ClientConfig) -> Result<Target, ClientError> {
    let (local, domain) = config
        .jid
        .split_once('@')
        .ok_or_else(|| ClientError::Invalid("jid must be local@domain".into()))?;
    let bad = |s: &str| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control());
    if bad(local) || bad(domain) || domain.contains(['/', '@']) {
        return Err(ClientError::Invalid(format!(
            "jid {:?} is not a bare local@domain JID",
            config.jid
        )));
    }
    if config.password.is_empty() {
        return Err(ClientError::Invalid("password is empty".into()));
    }
    if config.host.trim().is_empty() || config.port == 0 {
        return Err(ClientError::Invalid("host and port are required".into()));
    }
    if let Some(r) = &config.resource {
        if r.is_empty() || r.len() > 256 || r.chars().any(char::is_control) {
            return Err(ClientError::Invalid(
                "resource must be 1-256 bytes without control characters".into(),
            ));
        }
    }
    let roots = load_roots(config.ca_pem_file.as_ref())?;
    // an explicit provider instead of the process-wide default, so embedding apps that use
    // another rustls provider are not disturbed
    let tls_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Target {
        local: local.to_string(),
        domain: domain.to_ascii_lowercase(),
        password: config.password.clone(),
        host: config.host.clone(),
        port: config.port,
        tls: config.tls,
        resource: config.resource.clone(),
        tls_config: Arc::new(tls_config),
        scram_keys: std::sync::Mutex::new(None),
    })
}

/// Records that the app saw message `id` through a native push, without a connection: for a
/// separate process such as an iOS notification service extension, which may open the same
/// store file while the app runs. Returns `true` when the id is new (show it), `false` when the
/// app already saw it (over XMPP or an earlier push: do not show it again).
pub fn note_native_push_in_store(store_path: PathBuf, id: String) -> Result<bool, ClientError> {
    check_id(&id)?;
    let now = now_ms();
    let store = Store::open(&store_path, now)?;
    let (before, _) = store.update(&id, now, |r| r.native_push = true)?;
    Ok(before.is_none())
}

/// A connected device. Cheap to share (`Arc<Client>`): every method takes `&self`.
pub struct Client {
    cmds: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    store: Store,
    domain: String,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Client {
    /// Opens the store, connects, logs in and binds. Errors here are returned as they are (a
    /// wrong password is [`ClientError::Auth`]); only later drops are retried automatically.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let target = Arc::new(target(&config)?);
        let path = config.store_path.clone();
        let store = blocking(move || Store::open(&path, now_ms())).await?;
        let session = conn::establish(&target, None).await?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel(64);
        let domain = target.domain.clone();
        let actor = actor::Actor::new(target, store.clone(), shared.clone(), rx);
        let task = tokio::spawn(actor.run(session));
        Ok(Client {
            cmds: tx,
            shared,
            store,
            domain,
            task: Mutex::new(Some(task)),
        })
    }

    /// The next event: a new message, a retraction, or a reconnect notice. Waits until there
    /// is one. After a fatal error (e.g. the credentials stopped working) or [`Client::close`],
    /// returns that error (or [`ClientError::Closed`]) once queued events are taken.
    pub async fn next_event(&self) -> Result<DeviceEvent, ClientError> {
        loop {
            let notified = self.shared.arrived.notified();
            tokio::pin!(notified);
            // registered before looking, so an event pushed in between still wakes us
            notified.as_mut().enable();
            let item = {
                let mut inbox = self.shared.lock();
                match inbox.items.pop_front() {
                    Some(item) => Some(item),
                    None => match &inbox.end {
                        Some(e) => return Err(e.clone()),
                        None => None,
                    },
                }
            };
            let Some(Inbound { event, .. }) = item else {
                notified.await;
                continue;
            };
            self.shared.space.notify_one();
            match event {
                Pending::Reconnected => return Ok(DeviceEvent::Reconnected),
                Pending::Retracted { id } => {
                    let store = self.store.clone();
                    let key = id.clone();
                    blocking(move || store.update(&key, now_ms(), |r| r.retracted = true)).await?;
                    return Ok(DeviceEvent::Retracted { id });
                }
                Pending::Message {
                    id,
                    title,
                    text,
                    data_json,
                } => {
                    let store = self.store.clone();
                    let key = id.clone();
                    // the atomic check-and-record is the dedupe: a copy already shown (or noted
                    // from a native push, here or in another process) is skipped
                    if let Some(first_seen) = blocking(move || store.claim(&key, now_ms())).await? {
                        return Ok(DeviceEvent::Message {
                            id,
                            title,
                            text,
                            data_json,
                            received_at: first_seen,
                        });
                    }
                }
            }
        }
    }

    async fn command(&self, cmd: Cmd) -> Result<(), ClientError> {
        self.cmds.send(cmd).await.map_err(|_| self.ended())
    }

    /// The error to report once the background task is gone.
    fn ended(&self) -> ClientError {
        self.shared
            .lock()
            .end
            .clone()
            .unwrap_or(ClientError::Closed)
    }

    async fn send_stanza(&self, xml: String, wait: bool) -> Result<(), ClientError> {
        if !wait {
            return self.command(Cmd::Stanza { xml, done: None }).await;
        }
        let (tx, rx) = oneshot::channel();
        self.command(Cmd::Stanza {
            xml,
            done: Some(tx),
        })
        .await?;
        rx.await.map_err(|_| self.ended())?
    }

    async fn iq(&self, payload: String) -> Result<(), ClientError> {
        let id = format!("iq-{}", uuid::Uuid::new_v4().simple());
        let xml = format!("<iq type='set' id='{id}'>{payload}</iq>");
        let (tx, rx) = oneshot::channel();
        self.command(Cmd::Iq { id, xml, done: tx }).await?;
        rx.await.map_err(|_| self.ended())?
    }

    fn stanza_id() -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }

    /// Confirms a message (XEP-0184 receipt → status `delivered`) and records it locally, so
    /// a later copy of it is confirmed again automatically. Returns once the receipt is
    /// queued; it is sent as soon as the connection allows and re-sent after a drop until the
    /// server acknowledges it.
    pub async fn ack(&self, id: &str) -> Result<(), ClientError> {
        check_id(id)?;
        let store = self.store.clone();
        let key = id.to_string();
        blocking(move || store.update(&key, now_ms(), |r| r.acked = true)).await?;
        self.send_stanza(actor::receipt(&self.domain, id), false)
            .await
    }

    /// Marks a message read (XEP-0333 displayed → status `read`) and records it locally.
    /// Queued like [`Client::ack`].
    pub async fn mark_read(&self, id: &str) -> Result<(), ClientError> {
        check_id(id)?;
        let store = self.store.clone();
        let key = id.to_string();
        blocking(move || store.update(&key, now_ms(), |r| r.read = true)).await?;
        self.send_stanza(actor::displayed(&self.domain, id), false)
            .await
    }

    /// Answers a message (XEP-0461 reply; the app's backend gets a `reply` event). Returns
    /// once the server acknowledged it (XEP-0198), so `Ok` means Pushgate has it; across a
    /// drop it is sent again, so in rare cases the backend sees the reply twice.
    pub async fn reply(&self, id: &str, text: &str) -> Result<(), ClientError> {
        check_id(id)?;
        if text.trim().is_empty() || text.len() > MAX_REPLY_BYTES {
            return Err(ClientError::Invalid(format!(
                "reply text must be 1-{MAX_REPLY_BYTES} bytes and not blank"
            )));
        }
        let xml = format!(
            "<message type='chat' to='{domain}' id='{sid}'><body>{text}</body><reply xmlns='urn:xmpp:reply:0' to='{domain}' id='{id}'/></message>",
            domain = pushgate_xmpp::escape(&self.domain),
            sid = Self::stanza_id(),
            text = pushgate_xmpp::escape(text),
            id = pushgate_xmpp::escape(id),
        );
        self.send_stanza(xml, true).await
    }

    /// Registers a native push token over XMPP (XEP-0357 style): `service` is `apns`, `fcm` or
    /// `hms` and must match the device's platform. Pushgate then uses native push while the
    /// device is offline. A refusal is [`ClientError::Refused`] with the XMPP condition.
    pub async fn enable_push(&self, service: &str, token: &str) -> Result<(), ClientError> {
        if !PUSH_SERVICES.contains(&service) {
            return Err(ClientError::Invalid(format!(
                "push service must be one of {PUSH_SERVICES:?}"
            )));
        }
        if token.is_empty() || token.len() > 4096 || token.chars().any(char::is_control) {
            return Err(ClientError::Invalid(
                "push token must be 1-4096 bytes without control characters".into(),
            ));
        }
        self.iq(format!(
            "<enable xmlns='urn:xmpp:push:0' jid='{}' node='{}'/>",
            pushgate_xmpp::escape(service),
            pushgate_xmpp::escape(token)
        ))
        .await?;
        // disabling must name the service again, also after a restart
        let store = self.store.clone();
        let service = service.to_string();
        blocking(move || store.set_meta(META_PUSH_SERVICE, Some(&service))).await
    }

    /// Unregisters the native push token enabled earlier with this store (XEP-0357 disable).
    pub async fn disable_push(&self) -> Result<(), ClientError> {
        let store = self.store.clone();
        let service = blocking(move || store.meta(META_PUSH_SERVICE))
            .await?
            .ok_or_else(|| {
                ClientError::Invalid("push was not enabled through this store".into())
            })?;
        self.iq(format!(
            "<disable xmlns='urn:xmpp:push:0' jid='{}'/>",
            pushgate_xmpp::escape(&service)
        ))
        .await?;
        let store = self.store.clone();
        blocking(move || store.set_meta(META_PUSH_SERVICE, None)).await
    }

    /// Records that the app showed message `id` from a native push, so its XMPP copy is not
    /// returned by [`Client::next_event`] (it is still confirmed to the server). Returns `true`
    /// when the id is new, `false` when the app already saw it (do not show it twice).
    pub async fn note_native_push(&self, id: &str) -> Result<bool, ClientError> {
        check_id(id)?;
        let store = self.store.clone();
        let key = id.to_string();
        let (before, _) =
            blocking(move || store.update(&key, now_ms(), |r| r.native_push = true)).await?;
        Ok(before.is_none())
    }

    /// What the local store knows about a message.
    pub async fn message_state(&self, id: &str) -> Result<Option<MessageState>, ClientError> {
        let store = self.store.clone();
        let key = id.to_string();
        blocking(move || store.get(&key)).await
    }

    /// Closes the session politely: flushes queued receipts (waiting briefly for the server's
    /// acknowledgement), tells the server which messages the app took, and ends the stream.
    /// Idempotent.
    pub async fn close(&self) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Close { done: tx }).await.is_ok() {
            let _ = rx.await;
        }
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
        Ok(())
    }

    /// Test hook: drops the TCP connection without a goodbye, as a network failure would, so
    /// tests can watch the client reconnect. With `resumable: false` the client also forgets
    /// the session, as when the server's resume window has passed, so it binds a new one.
    #[cfg(any(test, feature = "test-hooks"))]
    pub async fn drop_connection_for_test(&self, resumable: bool) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.command(Cmd::DropConnection {
            resumable,
            done: tx,
        })
        .await?;
        rx.await.map_err(|_| self.ended())
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}
