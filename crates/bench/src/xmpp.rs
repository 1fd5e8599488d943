//! A lean XMPP device for load: one task per session, the edge's own bounded parser with a
//! small read buffer, no per-session timers. It does what a phone does on connect — STARTTLS,
//! SCRAM-SHA-256, bind, stream management — and then answers every message with an XEP-0184
//! receipt, pings with a result and `<r/>` with `<a/>`.
//!
//! The receive time of a message is taken when its stanza is parsed, before the receipt is
//! written, which is what the accept→delivered latency means from the device's point of view.
//!
//! The same login serves the XMPP senders of `--target prosody` (`crate::xload`), which take
//! the connection apart after it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use pushgate_xmpp::{escape, Element, Limits, StanzaReader, XmlError, XmlEvent, NS_STREAM};
use rand::RngCore;
use rustls_pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::tracker::{key, Tracker};

pub(crate) const NS_CLIENT: &str = "jabber:client";
const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub(crate) const NS_SM: &str = "urn:xmpp:sm:3";
pub(crate) const NS_RECEIPTS: &str = "urn:xmpp:receipts";
pub(crate) const NS_PING: &str = "urn:xmpp:ping";
/// The SASL mechanism every session logs in with (reported with the results).
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// The resource every session binds: the Prosody senders address devices by full JID
/// (`bu7@localhost/bench`), which needs no presence.
pub const RESOURCE: &str = "bench";
const NS_RETRACT: &str = "urn:xmpp:message-retract:1";

/// What the device accepts from the server: messages are small, and a server that sends more
/// is misbehaving, so the limits are tight to keep the per-session footprint small.
const LIMITS: Limits = Limits {
    max_stanza_bytes: 64 * 1024,
    max_depth: 16,
    max_attributes: 32,
};

/// Time allowed for each step of the login.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a write may take before the session counts as stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// PBKDF2 iterations a server may ask for; more is a misbehaving (or hostile) server.
const MAX_SCRAM_ITERATIONS: u32 = 1_000_000;

pub(crate) type Tls = TlsStream<TcpStream>;

/// Why a session could not log in or ended; [`SessionError::kind`] is the error-count key.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot bind the source address: {0}")]
    Bind(std::io::Error),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("stream: {0}")]
    Xml(#[from] XmlError),
    #[error("timed out during {0}")]
    Timeout(&'static str),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("stream error from the server: {0}")]
    Stream(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

impl SessionError {
    /// A short, stable name for error counts.
    pub fn kind(&self) -> String {
        match self {
            SessionError::Bind(_) => "xmpp-source-bind".into(),
            SessionError::Connect(e) => format!("xmpp-connect-{:?}", e.kind()).to_lowercase(),
            SessionError::Tls(_) => "xmpp-tls".into(),
            SessionError::Io(e) => format!("xmpp-io-{:?}", e.kind()).to_lowercase(),
            SessionError::Xml(XmlError::Eof) => "xmpp-connection-closed".into(),
            SessionError::Xml(_) => "xmpp-bad-stream".into(),
            SessionError::Timeout(step) => format!("xmpp-timeout-{step}"),
            SessionError::Auth(_) => "xmpp-auth-failed".into(),
            SessionError::Stream(cond) => format!("xmpp-stream-error-{cond}"),
            SessionError::Protocol(_) => "xmpp-protocol".into(),
        }
    }
}

/// What every session shares.
pub struct Shared {
    pub addr: SocketAddr,
    pub tls: TlsConnector,
    pub server_name: ServerName<'static>,
    pub tracker: Arc<Tracker>,
    pub stats: SessionStats,
    pub stop: CancellationToken,
    /// Fired once by `--relogin`: every session closes its stream and logs in again.
    pub relogin: CancellationToken,
}

/// Session counts and error kinds.
#[derive(Default)]
pub struct SessionStats {
    /// Sessions bound and not yet ended.
    pub live: AtomicU64,
    /// Sessions that ended on their own (not by the bench's stop).
    pub dropped: AtomicU64,
    /// Receipts written.
    pub receipts: AtomicU64,
    /// Messages that were not ordinary messages (retractions, no id, unknown id format).
    pub errors: Mutex<BTreeMap<String, u64>>,
}

impl SessionStats {
    fn error(&self, kind: String) {
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(kind).or_default() += 1;
        }
    }
}

/// One simulated device.
pub struct Device {
    /// Local index (0-based within this process).
    pub index: u32,
    pub jid: String,
    pub password: String,
    pub source: Option<IpAddr>,
    /// The SCRAM keys from the last login, reused while the server's salt and iteration
    /// count stay the same.
    pub keys: Option<Box<ScramKeys>>,
}

/// What a SCRAM client may keep between logins instead of the password's PBKDF2 result
/// (RFC 5802 §5.1: "the client can cache the ClientKey and ServerKey"), as device SDKs do:
/// without it every reconnect costs thousands of HMAC rounds on the phone — and here, on the
/// same two cores as the server under test.
pub struct ScramKeys {
    salt: Vec<u8>,
    iterations: u32,
    client_key: [u8; 32],
    server_key: [u8; 32],
}

/// How a login ended: time taken, or the error kind.
pub type LoginOutcome = (u32, Result<Duration, String>);

/// Runs one device: logs in (holding a permit of `logins` meanwhile, so logins in progress
/// are bounded), reports the outcome, then serves the session until the bench stops or the
/// server ends it.
///
/// With `relogin`, the device also closes its stream when [`Shared::relogin`] fires and logs
/// in again at once, reporting that second login there: a reconnect storm, as after an
/// edge's restart, measured separately from the first logins (which include PBKDF2).
pub async fn run(
    shared: Arc<Shared>,
    mut device: Device,
    logins: Arc<Semaphore>,
    outcome: mpsc::UnboundedSender<LoginOutcome>,
    mut relogin: Option<mpsc::UnboundedSender<LoginOutcome>>,
) {
    let Some(mut conn) = login_reporting(&shared, &mut device, &logins, &outcome).await else {
        return;
    };
    loop {
        shared.stats.live.fetch_add(1, Ordering::Relaxed);
        let end = conn.serve(&shared, device.index, relogin.is_some()).await;
        shared.stats.live.fetch_sub(1, Ordering::Relaxed);
        match end {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Relogin) => {
                let Some(again) = relogin.take() else { return };
                drop(conn);
                match login_reporting(&shared, &mut device, &logins, &again).await {
                    Some(c) => conn = c,
                    None => return,
                }
            }
            Err(e) => {
                shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                shared.stats.error(format!("session-ended-{}", e.kind()));
                return;
            }
        }
    }
}

/// One login under a permit of `logins`, its outcome sent to `outcome`.
async fn login_reporting(
    shared: &Shared,
    device: &mut Device,
    logins: &Arc<Semaphore>,
    outcome: &mpsc::UnboundedSender<LoginOutcome>,
) -> Option<Conn> {
    let permit = tokio::select! {
        p = logins.clone().acquire_owned() => p.ok(),
        _ = shared.stop.cancelled() => None,
    };
    let Some(permit) = permit else {
        let _ = outcome.send((device.index, Err("stopped".into())));
        return None;
    };
    let started = Instant::now();
    let index = device.index;
    // boxed: the login's state is large and only needed once; the task keeps only the
    // session's state afterwards
    let login = Box::pin(login(shared, device));
    let result = tokio::select! {
        r = login => Some(r),
        _ = shared.stop.cancelled() => None,
    };
    drop(permit);
    match result {
        Some(Ok(c)) => {
            let _ = outcome.send((index, Ok(started.elapsed())));
            Some(c)
        }
        Some(Err(e)) => {
            let _ = outcome.send((index, Err(e.kind())));
            None
        }
        None => {
            let _ = outcome.send((index, Err("stopped".into())));
            None
        }
    }
}

/// Why [`Conn::serve`] returned without an error.
enum Ended {
    /// The bench is stopping.
    Stopped,
    /// [`Shared::relogin`] fired: the stream was closed, log in again.
    Relogin,
}

fn header(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{}' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
        escape(domain)
    )
}

async fn next_stanza<R: tokio::io::AsyncRead + Unpin>(
    r: &mut StanzaReader<R>,
    step: &'static str,
) -> Result<Element, SessionError> {
    match tokio::time::timeout(STEP_TIMEOUT, r.next()).await {
        Err(_) => Err(SessionError::Timeout(step)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(XmlEvent::Stanza(e))) if e.is("error", NS_STREAM) => Err(stream_error(&e)),
        Ok(Ok(XmlEvent::Stanza(e))) => Ok(e),
        Ok(Ok(XmlEvent::StreamClose)) => Err(SessionError::Stream("closed".into())),
        Ok(Ok(XmlEvent::StreamOpen(_))) => Err(SessionError::Protocol(format!(
            "unexpected stream header during {step}"
        ))),
    }
}

/// The stream header, then the features.
async fn features<R: tokio::io::AsyncRead + Unpin>(
    r: &mut StanzaReader<R>,
    step: &'static str,
) -> Result<Element, SessionError> {
    match tokio::time::timeout(STEP_TIMEOUT, r.next()).await {
        Err(_) => return Err(SessionError::Timeout(step)),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(XmlEvent::StreamOpen(_))) => {}
        Ok(Ok(other)) => {
            return Err(SessionError::Protocol(format!(
                "expected a stream header during {step}, got {other:?}"
            )))
        }
    }
    let f = next_stanza(r, step).await?;
    if !f.is("features", NS_STREAM) {
        return Err(SessionError::Protocol(format!(
            "expected stream features during {step}"
        )));
    }
    Ok(f)
}

pub(crate) fn stream_error(e: &Element) -> SessionError {
    let cond = e
        .children
        .iter()
        .find(|c| c.name != "text")
        .map(|c| c.name.clone())
        .unwrap_or_else(|| "undefined-condition".into());
    SessionError::Stream(cond)
}

pub(crate) async fn write<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    s: &str,
) -> Result<(), SessionError> {
    let fut = async {
        w.write_all(s.as_bytes()).await?;
        w.flush().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, fut)
        .await
        .map_err(|_| SessionError::Timeout("write"))??;
    Ok(())
}

/// SCRAM-SHA-256 client (RFC 5802, RFC 7677) without channel binding.
struct Scram {
    client_nonce: String,
    first_bare: String,
}

/// SASL names escape `,` and `=` (RFC 5802 §5.1).
fn sasl_name(s: &str) -> String {
    s.replace('=', "=3D").replace(',', "=2C")
}

impl Scram {
    fn new(user: &str) -> Self {
        let mut nonce = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut nonce);
        let client_nonce = STANDARD.encode(nonce);
        let first_bare = format!("n={},r={client_nonce}", sasl_name(user));
        Scram {
            client_nonce,
            first_bare,
        }
    }

    /// The `client-first-message`.
    fn first(&self) -> String {
        format!("n,,{}", self.first_bare)
    }

    /// From the server's first message: the client's final message and the server signature
    /// to expect. The salted password costs `i` PBKDF2 iterations, so it runs on the blocking
    /// pool rather than stalling the runtime's few workers.
    async fn answer(
        &self,
        device: &mut Device,
        server_first: &str,
    ) -> Result<(String, [u8; 32]), SessionError> {
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = STANDARD.decode(v).ok();
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = v.parse::<u32>().ok();
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(SessionError::Auth("malformed server-first-message".into()));
        };
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(SessionError::Auth(
                "server nonce does not extend ours".into(),
            ));
        }
        if !(1..=MAX_SCRAM_ITERATIONS).contains(&iterations) {
            return Err(SessionError::Auth(format!(
                "iteration count {iterations} out of range"
            )));
        }
        let cached = device
            .keys
            .as_ref()
            .filter(|k| k.iterations == iterations && k.salt == salt);
        let fresh = cached.is_none();
        let (client_key, server_key) = match cached {
            Some(k) => (k.client_key, k.server_key),
            None => {
                let pw = device.password.clone();
                let salt = salt.clone();
                let salted = tokio::task::spawn_blocking(move || {
                    pushgate_core::credentials::salted_password(pw.as_bytes(), &salt, iterations)
                })
                .await
                .map_err(|e| SessionError::Protocol(format!("PBKDF2 task: {e}")))?;
                (
                    pushgate_core::credentials::hmac_sha256(&salted, b"Client Key"),
                    pushgate_core::credentials::hmac_sha256(&salted, b"Server Key"),
                )
            }
        };
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.first_bare);
        let signature = pushgate_core::credentials::hmac_sha256(&stored, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        let server_signature =
            pushgate_core::credentials::hmac_sha256(&server_key, auth_message.as_bytes());
        // the keys depend only on the password, salt and count, so a failed login leaves
        // nothing wrong behind
        if fresh {
            device.keys = Some(Box::new(ScramKeys {
                salt,
                iterations,
                client_key,
                server_key,
            }));
        }
        Ok((
            format!("{without_proof},p={}", STANDARD.encode(proof)),
            server_signature,
        ))
    }
}

/// The answer a client owes to an `iq` get/set from the server: a result to a ping, an error
/// to anything else; `None` for results and errors, which need no answer.
pub(crate) fn iq_answer(e: &Element) -> Option<String> {
    let kind = e.attr("type").unwrap_or("");
    if kind != "get" && kind != "set" {
        return None;
    }
    let id = escape(e.attr("id").unwrap_or(""));
    Some(if e.child("ping", NS_PING).is_some() {
        format!("<iq type='result' id='{id}'/>")
    } else {
        format!("<iq type='error' id='{id}'><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
    })
}

/// A bound session with stream management on.
pub(crate) struct Conn {
    reader: StanzaReader<ReadHalf<Tls>>,
    writer: WriteHalf<Tls>,
    domain: String,
    /// Stanzas received since stream management was enabled (the `h` of our `<a/>`).
    h_in: u32,
    /// Stanzas that arrived before `<enabled/>` (messages handed over as soon as presence
    /// was set), handled once serving starts.
    early: Vec<Element>,
}

/// A logged-in connection taken apart, for the Prosody senders.
pub(crate) struct Parts {
    pub reader: StanzaReader<ReadHalf<Tls>>,
    pub writer: WriteHalf<Tls>,
    /// Stanzas that arrived before `<enabled/>` (not counted by stream management).
    pub early: Vec<Element>,
}

impl Conn {
    pub(crate) fn into_parts(self) -> Parts {
        Parts {
            reader: self.reader,
            writer: self.writer,
            early: self.early,
        }
    }
}

/// Connects, STARTTLS, SCRAM-SHA-256, bind, stream management.
pub(crate) async fn login(shared: &Shared, device: &mut Device) -> Result<Conn, SessionError> {
    // owned: `device` is borrowed mutably below to keep its SCRAM keys
    let jid = device.jid.clone();
    let (local, domain) = jid
        .split_once('@')
        .ok_or_else(|| SessionError::Protocol(format!("jid without @: {}", device.jid)))?;
    let socket = match shared.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(SessionError::Connect)?;
    if let Some(ip) = device.source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(SessionError::Bind)?;
    }
    let mut tcp = tokio::time::timeout(STEP_TIMEOUT, socket.connect(shared.addr))
        .await
        .map_err(|_| SessionError::Timeout("connect"))?
        .map_err(SessionError::Connect)?;
    // receipts are tiny writes whose latency is measured: no Nagle delay
    tcp.set_nodelay(true)?;
    {
        let (rd, mut wr) = tcp.split();
        let mut r = StanzaReader::new(rd, LIMITS);
        write(&mut wr, &header(domain)).await?;
        let f = features(&mut r, "starttls").await?;
        if f.child("starttls", NS_TLS).is_none() {
            return Err(SessionError::Protocol("STARTTLS not offered".into()));
        }
        write(
            &mut wr,
            "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        )
        .await?;
        let p = next_stanza(&mut r, "starttls").await?;
        if !p.is("proceed", NS_TLS) {
            return Err(SessionError::Protocol("STARTTLS refused".into()));
        }
    }
    let tls = tokio::time::timeout(
        STEP_TIMEOUT,
        shared.tls.connect(shared.server_name.clone(), tcp),
    )
    .await
    .map_err(|_| SessionError::Timeout("tls"))?
    .map_err(SessionError::Tls)?;
    let (rd, mut wr) = tokio::io::split(tls);
    let mut r = StanzaReader::new(rd, LIMITS);
    write(&mut wr, &header(domain)).await?;
    let f = features(&mut r, "sasl").await?;
    let offered = f
        .child("mechanisms", NS_SASL)
        .is_some_and(|m| m.children.iter().any(|c| c.text == MECHANISM));
    if !offered {
        return Err(SessionError::Protocol(format!("{MECHANISM} not offered")));
    }
    let scram = Scram::new(local);
    write(
        &mut wr,
        &format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{}</auth>",
            STANDARD.encode(scram.first())
        ),
    )
    .await?;
    let challenge = next_stanza(&mut r, "sasl").await?;
    if !challenge.is("challenge", NS_SASL) {
        return Err(sasl_refusal(&challenge));
    }
    let server_first = STANDARD
        .decode(challenge.text.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| SessionError::Auth("challenge is not base64 UTF-8".into()))?;
    let (client_final, server_signature) = scram.answer(device, &server_first).await?;
    write(
        &mut wr,
        &format!(
            "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
            STANDARD.encode(client_final)
        ),
    )
    .await?;
    let outcome = next_stanza(&mut r, "sasl").await?;
    if !outcome.is("success", NS_SASL) {
        return Err(sasl_refusal(&outcome));
    }
    let want = format!("v={}", STANDARD.encode(server_signature));
    let got = STANDARD
        .decode(outcome.text.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    if got.as_deref() != Some(want.as_str()) {
        return Err(SessionError::Auth(
            "the server's signature does not verify".into(),
        ));
    }
    let mut r = r.restart();
    write(&mut wr, &header(domain)).await?;
    let f = features(&mut r, "bind").await?;
    if f.child("bind", NS_BIND).is_none() || f.child("sm", NS_SM).is_none() {
        return Err(SessionError::Protocol(
            "binding or stream management not offered".into(),
        ));
    }
    write(
        &mut wr,
        &format!("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{RESOURCE}</resource></bind></iq>"),
    )
    .await?;
    let bound = next_stanza(&mut r, "bind").await?;
    if bound.attr("type") != Some("result") {
        return Err(SessionError::Protocol("bind refused".into()));
    }
    write(&mut wr, "<enable xmlns='urn:xmpp:sm:3' resume='true'/>").await?;
    let mut early = Vec::new();
    loop {
        let e = next_stanza(&mut r, "sm").await?;
        if e.is("enabled", NS_SM) {
            break;
        }
        if e.is("failed", NS_SM) {
            return Err(SessionError::Protocol("stream management refused".into()));
        }
        if early.len() >= 1024 {
            return Err(SessionError::Protocol(
                "too many stanzas before <enabled/>".into(),
            ));
        }
        early.push(e);
    }
    Ok(Conn {
        reader: r,
        writer: wr,
        domain: domain.to_string(),
        h_in: 0,
        early,
    })
}

fn sasl_refusal(e: &Element) -> SessionError {
    if e.is("failure", NS_SASL) {
        let cond = e
            .children
            .iter()
            .find(|c| c.name != "text")
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "not-authorized".into());
        SessionError::Auth(cond)
    } else {
        SessionError::Protocol(format!("unexpected <{}/> during SASL", e.name))
    }
}

impl Conn {
    /// Serves the session until the bench stops, `relogin` is armed and fires (`Ok`), or the
    /// server ends it (`Err`).
    async fn serve(
        &mut self,
        shared: &Shared,
        index: u32,
        relogin: bool,
    ) -> Result<Ended, SessionError> {
        for e in std::mem::take(&mut self.early) {
            self.on_stanza(shared, index, e, false).await?;
        }
        loop {
            let ev = tokio::select! {
                biased;
                _ = shared.stop.cancelled() => {
                    let _ = write(&mut self.writer, "</stream:stream>").await;
                    let _ = self.writer.shutdown().await;
                    return Ok(Ended::Stopped);
                }
                _ = shared.relogin.cancelled(), if relogin => {
                    let _ = write(&mut self.writer, "</stream:stream>").await;
                    let _ = self.writer.shutdown().await;
                    return Ok(Ended::Relogin);
                }
                ev = self.reader.next() => ev,
            };
            match ev? {
                XmlEvent::Stanza(e) => self.on_stanza(shared, index, e, true).await?,
                XmlEvent::StreamClose => return Err(SessionError::Stream("closed".into())),
                XmlEvent::StreamOpen(_) => {
                    return Err(SessionError::Protocol("unexpected stream header".into()))
                }
            }
        }
    }

    async fn on_stanza(
        &mut self,
        shared: &Shared,
        index: u32,
        e: Element,
        counted: bool,
    ) -> Result<(), SessionError> {
        let at = Instant::now();
        if e.ns == NS_CLIENT && counted {
            self.h_in = self.h_in.wrapping_add(1);
        }
        match (e.name.as_str(), e.ns.as_str()) {
            ("message", NS_CLIENT) => {
                if e.child("retract", NS_RETRACT).is_some() {
                    shared.stats.error("device-got-retraction".into());
                    return Ok(());
                }
                let Some(id) = e.attr("id") else {
                    shared.stats.error("device-got-message-without-id".into());
                    return Ok(());
                };
                match key(id) {
                    Some(k) => shared.tracker.device_received(k, index, at),
                    None => shared.stats.error("device-got-unknown-message-id".into()),
                }
                if e.child("request", NS_RECEIPTS).is_some() {
                    // to the sender (XEP-0184): Pushgate's edge sends from its domain, a
                    // Prosody sender from its own JID
                    let to = e.attr("from").unwrap_or(&self.domain);
                    let receipt = format!(
                        "<message to='{d}' id='r-{id}'><received xmlns='urn:xmpp:receipts' id='{id}'/></message>",
                        d = escape(to),
                        id = escape(id)
                    );
                    write(&mut self.writer, &receipt).await?;
                    shared.stats.receipts.fetch_add(1, Ordering::Relaxed);
                }
            }
            ("iq", NS_CLIENT) => {
                if let Some(answer) = iq_answer(&e) {
                    write(&mut self.writer, &answer).await?;
                }
            }
            ("presence", NS_CLIENT) => {}
            ("r", NS_SM) => {
                let a = format!("<a xmlns='urn:xmpp:sm:3' h='{}'/>", self.h_in);
                write(&mut self.writer, &a).await?;
            }
            ("a", NS_SM) => {}
            ("error", NS_STREAM) => return Err(stream_error(&e)),
            (name, _) => shared.stats.error(format!("device-got-unexpected-{name}")),
        }
        Ok(())
    }
}
