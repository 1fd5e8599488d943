//! One device connection, from TCP accept to close.
//!
//! Negotiation (STARTTLS, SASL, bind) runs as a straight sequence: the device cannot receive
//! messages before it is bound, so nothing else competes for the socket. Once bound, a reader
//! task parses input into a channel and the session task multiplexes that channel, messages
//! handed over by routers, and the keep-alive timer.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pushgate_core::time::now_ms;
use pushgate_core::{Device, Message, Status};
use pushgate_store::session::Sent;
use pushgate_store::CheckRequest;
use pushgate_store::Transition;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::sasl::{self, SaslError};
use crate::xml::{escape, Element, StanzaReader, XmlError, XmlEvent};
use crate::{mailbox, Edge, SessionCmd, SessionHandle};

const NS_CLIENT: &str = "jabber:client";
const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const NS_SM: &str = "urn:xmpp:sm:3";
const NS_PING: &str = "urn:xmpp:ping";
const NS_RECEIPTS: &str = "urn:xmpp:receipts";
const NS_MARKERS: &str = "urn:xmpp:chat-markers:0";
const NS_REPLY: &str = "urn:xmpp:reply:0";
const NS_ROSTER: &str = "jabber:iq:roster";
const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const NS_CSI: &str = "urn:xmpp:csi:0";
const NS_PUSH: &str = "urn:xmpp:push:0";

/// Pending messages read from Redis at a time.
const PENDING_PAGE: usize = 200;

/// How long after binding the backlog waits for SM enable or initial presence.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Xml(#[from] XmlError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake: {0}")]
    Tls(String),
    #[error("stream error {0}: {1}")]
    Stream(&'static str, String),
    #[error("store: {0}")]
    Store(#[from] pushgate_store::StoreError),
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

fn stream_header(domain: &str, id: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream from='{}' id='{id}' version='1.0' xml:lang='en' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
        escape(domain)
    )
}

fn stream_error(condition: &str, text: &str) -> String {
    format!(
        "<stream:error><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>{}</text></stream:error></stream:stream>",
        escape(text)
    )
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Sends a stream error and closes, ignoring write failures (the peer may be gone).
async fn fail<W: AsyncWrite + Unpin>(
    w: &mut W,
    condition: &'static str,
    text: &str,
) -> SessionError {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = w.write_all(stream_error(condition, text).as_bytes()).await;
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    })
    .await;
    SessionError::Stream(condition, text.to_string())
}

/// Reads the next event, answering limit and syntax violations with the right stream error.
async fn next_event<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut StanzaReader<R>,
    w: &mut W,
    timeout: Duration,
) -> Result<XmlEvent, SessionError> {
    match tokio::time::timeout(timeout, r.next()).await {
        Err(_) => Err(fail(w, "connection-timeout", "no data in time").await),
        Ok(Ok(ev)) => Ok(ev),
        Ok(Err(e)) => match e.condition() {
            Some(cond) => Err(fail(w, cond, &e.to_string()).await),
            None => Err(e.into()),
        },
    }
}

/// Expects a stream header addressed to our domain, answers it and sends `features`.
async fn open_stream<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    edge: &Edge,
    r: &mut StanzaReader<R>,
    w: &mut W,
    features: &str,
) -> Result<(), SessionError> {
    let timeout = edge.settings.handshake_timeout();
    match next_event(r, w, timeout).await? {
        XmlEvent::StreamOpen(attrs) => {
            let to = attrs
                .iter()
                .find(|(k, _)| k == "to")
                .map(|(_, v)| v.as_str());
            let header = stream_header(&edge.domain, &new_id());
            w.write_all(header.as_bytes()).await?;
            if let Some(to) = to {
                if !to.eq_ignore_ascii_case(&edge.domain) {
                    return Err(
                        fail(w, "host-unknown", "this server does not serve that domain").await,
                    );
                }
            }
            w.write_all(format!("<stream:features>{features}</stream:features>").as_bytes())
                .await?;
            w.flush().await?;
            Ok(())
        }
        _ => Err(fail(w, "invalid-xml", "expected a stream header").await),
    }
}

/// The first byte of a TLS handshake record (RFC 8446 §5.1, `ContentType.handshake`).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A session's future, boxed (see [`serve_tls`]).
pub type SessionFuture = Pin<Box<dyn Future<Output = Result<(), SessionError>> + Send>>;

/// Serves one STARTTLS connection (port 5222).
pub async fn serve_starttls(
    edge: Arc<Edge>,
    tcp: TcpStream,
    peer: IpAddr,
) -> Result<(), SessionError> {
    // The stream moves into the session's boxed future inside this block, so its storage
    // ends before the session is awaited: a binding (or a temporary) that lived across that
    // await would keep 1.2 KB of dead room in this task for the session's whole life.
    let session = {
        let tls = Box::pin(starttls_handshake(&edge, tcp)).await?;
        serve_tls(edge.clone(), tls, peer)
    };
    session.await
}

/// The plain-text stream up to `<proceed/>`, then the TLS handshake.
async fn starttls_handshake(
    edge: &Edge,
    mut tcp: TcpStream,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, SessionError> {
    // A client that starts TLS at once on this port (direct TLS belongs on the direct-TLS
    // port; some clients try it first everywhere, slixmpp among them) sends a TLS record,
    // which holds no `<`: the XML reader would wait for one until the handshake timeout, and
    // the client with it before it falls back to STARTTLS. A TLS handshake record starts with
    // 0x16; nothing in XML can, so close at once: the client's handshake fails right away.
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(edge.settings.handshake_timeout(), tcp.peek(&mut first))
        .await
        .map_err(|_| SessionError::Timeout("stream header"))??;
    if peeked == 1 && first[0] == TLS_HANDSHAKE_RECORD {
        return Err(SessionError::Tls(
            "a TLS handshake on the STARTTLS port (direct TLS has its own port)".into(),
        ));
    }
    {
        let (rd, mut wr) = tcp.split();
        let mut r = StanzaReader::new(rd, edge.limits());
        let starttls = "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>";
        open_stream(edge, &mut r, &mut wr, starttls).await?;
        match next_event(&mut r, &mut wr, edge.settings.handshake_timeout()).await? {
            XmlEvent::Stanza(el) if el.is("starttls", NS_TLS) => {
                wr.write_all(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                    .await?;
                wr.flush().await?;
            }
            XmlEvent::Stanza(_) => {
                return Err(fail(&mut wr, "policy-violation", "STARTTLS is required").await)
            }
            _ => return Err(fail(&mut wr, "invalid-xml", "expected <starttls/>").await),
        }
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(edge.tls.config());
    tokio::time::timeout(edge.settings.handshake_timeout(), acceptor.accept(tcp))
        .await
        .map_err(|_| SessionError::Timeout("TLS handshake"))?
        .map_err(|e| SessionError::Tls(e.to_string()))
}

/// Serves a connection that is already TLS (direct TLS on 5223, after STARTTLS, or a
/// WebSocket carrying the framing of RFC 7395).
///
/// Why the phases are boxed: a task's future is allocated once, at the size of its largest
/// state, for the connection's whole life. Negotiation (SASL, binding) and each handler of the
/// live session need kilobytes of state for a moment, an idle session only what waiting
/// needs. So negotiation runs in its own boxed future, freed before the session starts, and
/// the live session boxes each handler while it runs: an idle session's task then holds
/// about 2 KiB instead of 13 KiB (docs/architecture.md, "What an idle session costs").
/// This is a plain function so that the stream itself is moved into the split halves at once
/// and is not kept a second time as an argument of the returned future.
pub fn serve_tls<S>(edge: Arc<Edge>, tls: S, peer: IpAddr) -> SessionFuture
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(tls);
    Box::pin(async move {
        let started = Box::pin(negotiate(&edge, rd, wr, peer)).await?;
        run_session(edge, started).await
    })
}

/// A session that has authenticated and bound (or resumed), ready to run.
struct Started<S> {
    device: Device,
    bound: Bound,
    reader: Box<StanzaReader<ReadHalf<S>>>,
    w: WriteHalf<S>,
}

/// Stream header, SASL, stream restart, binding or resumption.
async fn negotiate<S>(
    edge: &Edge,
    rd: ReadHalf<S>,
    mut wr: WriteHalf<S>,
    peer: IpAddr,
) -> Result<Box<Started<S>>, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut r = StanzaReader::new(rd, edge.limits());
    let mechs = "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>PLAIN</mechanism></mechanisms>";
    open_stream(edge, &mut r, &mut wr, mechs).await?;
    let device = authenticate(edge, &mut r, &mut wr, peer).await?;
    let mut r = r.restart();
    let post_auth = "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session><sm xmlns='urn:xmpp:sm:3'/><csi xmlns='urn:xmpp:csi:0'/><ver xmlns='urn:xmpp:features:rosterver'/>";
    open_stream(edge, &mut r, &mut wr, post_auth).await?;
    let bound = bind(edge, &device, &mut r, &mut wr).await?;
    Ok(Box::new(Started {
        device,
        bound,
        reader: Box::new(r),
        w: wr,
    }))
}

async fn sasl_failure<W: AsyncWrite + Unpin>(w: &mut W, e: &SaslError) -> Result<(), SessionError> {
    w.write_all(
        format!(
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><{}/></failure>",
            e.condition()
        )
        .as_bytes(),
    )
    .await?;
    w.flush().await?;
    Ok(())
}

async fn lookup(edge: &Edge, username: &str) -> Result<Option<Device>, SessionError> {
    let local = sasl::username_local(username);
    if local.is_empty() || local.len() > 64 {
        return Ok(None);
    }
    Ok(edge.store.device_by_jid(local).await?)
}

/// Runs SASL until success; refuses after too many failures.
async fn authenticate<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    edge: &Edge,
    r: &mut StanzaReader<R>,
    w: &mut W,
    peer: IpAddr,
) -> Result<Device, SessionError> {
    let ip = peer.to_string();
    let window = Duration::from_secs(edge.settings.auth_lockout_secs.max(1));
    let timeout = edge.settings.handshake_timeout();
    let mut failures = 0;
    loop {
        if failures >= edge.settings.max_auth_failures {
            return Err(fail(
                w,
                "policy-violation",
                "too many failed authentication attempts",
            )
            .await);
        }
        let el = match next_event(r, w, timeout).await? {
            XmlEvent::Stanza(el) => el,
            XmlEvent::StreamClose => {
                return Err(SessionError::Stream(
                    "closed",
                    "peer closed the stream".into(),
                ))
            }
            XmlEvent::StreamOpen(_) => {
                return Err(fail(w, "invalid-xml", "unexpected stream header").await)
            }
        };
        if !el.is("auth", NS_SASL) {
            return Err(fail(w, "not-authorized", "authenticate first").await);
        }
        if edge.store.auth_failures("ip", &ip).await? >= edge.settings.max_auth_failures_per_ip {
            w.write_all(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><temporary-auth-failure/><text>too many failed logins from this address; try again later</text></failure>").await?;
            w.flush().await?;
            tracing::warn!(%ip, "login refused: address locked out after failed logins");
            return Err(fail(w, "policy-violation", "too many failed logins").await);
        }
        let mech = el.attr("mechanism").unwrap_or("");
        let data = match sasl::payload(&el.text) {
            Ok(d) => d,
            Err(e) => {
                sasl_failure(w, &e).await?;
                failures += 1;
                continue;
            }
        };
        // who the attempt was for, to count failures per account
        let attempted_user: Option<String> = match mech {
            "PLAIN" => sasl::plain_parse(&data).ok().map(|(u, _)| u),
            "SCRAM-SHA-256" => sasl::scram_client_first(&data).ok().map(|s| s.username),
            _ => None,
        }
        .filter(|u| !u.is_empty() && u.len() <= 128);
        let outcome = match mech {
            "PLAIN" => plain(edge, &data).await?,
            "SCRAM-SHA-256" => scram(edge, r, w, &data).await?,
            _ => Err(SaslError::Malformed("unsupported mechanism")),
        };
        // a locked account is refused even with the right password, so guessing stops paying off
        let outcome = match outcome {
            Ok((device, data)) => {
                if edge.store.auth_failures("acct", &device.jid_local).await?
                    >= edge.settings.max_auth_failures_per_account
                {
                    tracing::warn!(account = %device.jid_local, "login refused: account locked out after failed logins");
                    Err(SaslError::Locked)
                } else {
                    Ok((device, data))
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok((device, success_data)) => {
                let body = success_data
                    .map(|d| base64_encode(d.as_bytes()))
                    .unwrap_or_default();
                w.write_all(
                    format!("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{body}</success>")
                        .as_bytes(),
                )
                .await?;
                w.flush().await?;
                return Ok(device);
            }
            Err(e) => {
                if !matches!(e, SaslError::Locked) {
                    edge.store.note_auth_failure("ip", &ip, window).await?;
                    if let Some(user) = attempted_user.as_deref() {
                        edge.store
                            .note_auth_failure("acct", sasl::username_local(user), window)
                            .await?;
                    }
                }
                if mech == "PLAIN" || mech == "SCRAM-SHA-256" {
                    sasl_failure(w, &e).await?;
                } else {
                    w.write_all(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><invalid-mechanism/></failure>").await?;
                    w.flush().await?;
                }
                failures += 1;
            }
        }
    }
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

async fn plain(
    edge: &Edge,
    data: &[u8],
) -> Result<Result<(Device, Option<String>), SaslError>, SessionError> {
    let (user, pass) = match sasl::plain_parse(data) {
        Ok(x) => x,
        Err(e) => return Ok(Err(e)),
    };
    let Some(device) = lookup(edge, &user).await? else {
        return Ok(Err(SaslError::NotAuthorized));
    };
    // PBKDF2 is deliberately slow: keep it off the I/O threads
    let creds = device.scram.clone();
    let ok = tokio::task::spawn_blocking(move || sasl::plain_verify(&creds, &pass))
        .await
        .unwrap_or(Err(SaslError::NotAuthorized));
    Ok(ok.map(|()| (device, None)))
}

async fn scram<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    edge: &Edge,
    r: &mut StanzaReader<R>,
    w: &mut W,
    first: &[u8],
) -> Result<Result<(Device, Option<String>), SaslError>, SessionError> {
    let start = match sasl::scram_client_first(first) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let device = lookup(edge, &start.username).await?;
    // unknown users get a challenge too (with throwaway credentials), so the exchange does
    // not reveal which accounts exist
    let creds = match &device {
        Some(d) => d.scram.clone(),
        None => pushgate_core::credentials::scram_credentials(&new_id(), new_id().as_bytes(), 4096),
    };
    let (server_first, pending) = sasl::scram_server_first(&start, &creds);
    w.write_all(
        format!(
            "<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</challenge>",
            base64_encode(server_first.as_bytes())
        )
        .as_bytes(),
    )
    .await?;
    w.flush().await?;
    let el = match next_event(r, w, edge.settings.handshake_timeout()).await? {
        XmlEvent::Stanza(el) => el,
        _ => return Err(fail(w, "invalid-xml", "expected a SASL response").await),
    };
    if el.is("abort", NS_SASL) {
        return Ok(Err(SaslError::Malformed("aborted")));
    }
    if !el.is("response", NS_SASL) {
        return Err(fail(w, "not-authorized", "expected a SASL response").await);
    }
    let data = match sasl::payload(&el.text) {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    Ok(match (sasl::scram_client_final(&pending, &data), device) {
        (Ok(v), Some(d)) => Ok((d, Some(v))),
        (Ok(_), None) => Err(SaslError::NotAuthorized),
        (Err(e), _) => Err(e),
    })
}

fn iq_result(id: &str, payload: &str) -> String {
    format!("<iq type='result' id='{}'>{payload}</iq>", escape(id))
}

fn iq_error(id: &str, kind: &str, condition: &str) -> String {
    format!(
        "<iq type='error' id='{}'><error type='{kind}'><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        escape(id)
    )
}

/// What XEP-0198 resumption keeps of a dropped session (in Redis, so any edge can resume it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ResumeState {
    app_id: String,
    device_id: String,
    resource: String,
    /// Stanzas we had received from the client.
    h_in: u32,
    /// Message stanzas sent and not acknowledged: (sequence number, message id).
    unacked: Vec<(u32, String)>,
}

/// How a session came to be bound.
enum Bound {
    /// A new session with this resource.
    New(String),
    /// A resumed session: its stored state and how many stanzas the client says it received.
    Resumed {
        id: String,
        state: ResumeState,
        client_h: u32,
    },
}

/// Waits for resource binding (or a resumption), answering what may come before it.
async fn bind<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    edge: &Edge,
    device: &Device,
    r: &mut StanzaReader<R>,
    w: &mut W,
) -> Result<Bound, SessionError> {
    loop {
        let el = match next_event(r, w, edge.settings.handshake_timeout()).await? {
            XmlEvent::Stanza(el) => el,
            _ => return Err(fail(w, "invalid-xml", "expected resource binding").await),
        };
        if el.is("resume", NS_SM) {
            if let Some(b) = resume(edge, device, &el, w).await? {
                return Ok(b);
            }
            continue;
        }
        if !el.is("iq", NS_CLIENT) {
            return Err(fail(w, "not-authorized", "bind a resource first").await);
        }
        let id = el.attr("id").unwrap_or("").to_string();
        if let Some(b) = el.child("bind", NS_BIND) {
            let resource = b
                .child("resource", NS_BIND)
                .map(|r| r.text.trim().to_string())
                .filter(|r| !r.is_empty() && r.len() <= 256)
                .unwrap_or_else(new_id);
            let jid = format!("{}@{}/{}", device.jid_local, edge.domain, resource);
            let payload = format!(
                "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>{}</jid></bind>",
                escape(&jid)
            );
            w.write_all(iq_result(&id, &payload).as_bytes()).await?;
            w.flush().await?;
            return Ok(Bound::New(resource));
        }
        w.write_all(iq_error(&id, "auth", "not-authorized").as_bytes())
            .await?;
        w.flush().await?;
    }
}

/// Answers `<resume previd h/>`: `Some` when the state was found (and `<resumed/>` sent),
/// `None` after `<failed/>` (the client then binds a new session; nothing is lost either way:
/// unconfirmed messages are still in the device's pending queue).
async fn resume<W: AsyncWrite + Unpin>(
    edge: &Edge,
    device: &Device,
    el: &Element,
    w: &mut W,
) -> Result<Option<Bound>, SessionError> {
    let previd = el.attr("previd").unwrap_or("").to_string();
    let client_h = el.attr("h").and_then(|h| h.parse::<u32>().ok());
    let (Some(client_h), false) = (client_h, previd.is_empty() || previd.len() > 64) else {
        w.write_all(b"<failed xmlns='urn:xmpp:sm:3'><bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>").await?;
        w.flush().await?;
        return Ok(None);
    };
    // the old session may not have noticed its connection is gone yet; give it a moment to
    // end and save its state
    for _ in 0..100 {
        if !edge.has_session(&device.app_id, &device.device_id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let state = edge
        .store
        .take_resume_state(&previd)
        .await?
        .and_then(|raw| serde_json::from_str::<ResumeState>(&raw).ok())
        .filter(|st| st.app_id == device.app_id && st.device_id == device.device_id);
    let Some(state) = state else {
        w.write_all(b"<failed xmlns='urn:xmpp:sm:3'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>").await?;
        w.flush().await?;
        return Ok(None);
    };
    let resumed = format!(
        "<resumed xmlns='urn:xmpp:sm:3' previd='{}' h='{}'/>",
        escape(&previd),
        state.h_in
    );
    w.write_all(resumed.as_bytes()).await?;
    w.flush().await?;
    Ok(Some(Bound::Resumed {
        id: previd,
        state,
        client_h,
    }))
}

/// Live session state.
struct Live<W> {
    edge: Arc<Edge>,
    device: Device,
    session_id: String,
    full_jid: String,
    w: WriteHalf<W>,
    /// Stream management enabled.
    sm: bool,
    /// Stanzas received from the client (XEP-0198 `h` we report).
    h_in: u32,
    /// Stanzas sent since SM was enabled.
    out_count: u32,
    /// Sent stanzas not yet acknowledged by the client, with the message they carried.
    unacked: VecDeque<(u32, Option<String>)>,
    /// Message ids written in this session and not yet confirmed.
    inflight: HashSet<String>,
    /// The pending queue's scores up to here have been read by this session (`-inf`: none
    /// yet): every id that waited with such a score when its range was read has been written,
    /// held, or found no longer open. A hand-over then needs only the range above it, not
    /// the whole queue, whose unconfirmed head every hand-over used to read again (cost
    /// growing with the backlog). An id queued later with a score at or below the mark (a
    /// late-routed message) is not covered: its own hand-over brings it (see `deliver`).
    scanned_to: f64,
    window_start: Instant,
    window_count: u32,
    /// XEP-0198 resumption id, when the client asked for resumption.
    sm_id: Option<String>,
    /// XEP-0352: the client said it is inactive; normal-priority messages are held.
    inactive: bool,
    /// Messages held while inactive, and since when.
    held: Vec<Message>,
    held_since: Option<Instant>,
    /// The session ended in a way that must not be resumed (clean close, replaced, moved).
    final_end: bool,
    /// Whether the pending queue was delivered. That waits for stream management or initial
    /// presence (or a short grace period), so the backlog is covered by XEP-0198 acks when
    /// the client uses them.
    drained: bool,
}

fn message_stanza(m: &Message, domain: &str, to: &str) -> String {
    let mut s = format!(
        "<message type='chat' id='{}' from='{}' to='{}'>",
        escape(&m.id),
        escape(domain),
        escape(to)
    );
    if let Some(t) = &m.title {
        s.push_str(&format!("<subject>{}</subject>", escape(t)));
    }
    s.push_str(&format!("<body>{}</body>", escape(&m.text)));
    if let Some(d) = &m.data {
        s.push_str(&format!(
            "<data xmlns='urn:pushgate:data:0'>{}</data>",
            escape(&d.to_string())
        ));
    }
    s.push_str(
        "<request xmlns='urn:xmpp:receipts'/><markable xmlns='urn:xmpp:chat-markers:0'/></message>",
    );
    s
}

impl<W: AsyncRead + AsyncWrite + Unpin> Live<W> {
    async fn write(&mut self, s: &str) -> Result<(), SessionError> {
        let fut = async {
            self.w.write_all(s.as_bytes()).await?;
            self.w.flush().await
        };
        // a reader that does not drain its socket must not pin us forever
        tokio::time::timeout(self.edge.settings.write_timeout(), fut)
            .await
            .map_err(|_| SessionError::Timeout("slow reader"))??;
        Ok(())
    }

    /// Writes a stanza that counts for stream management.
    async fn send_counted(&mut self, s: &str, message: Option<String>) -> Result<(), SessionError> {
        self.write(s).await?;
        if self.sm {
            self.out_count = self.out_count.wrapping_add(1);
            self.unacked.push_back((self.out_count, message));
        }
        Ok(())
    }

    /// Delivers a message handed over by a router, and first any older pending ones the
    /// session has not written yet, so the device sees its messages in acceptance order.
    async fn deliver(&mut self, m: Message) -> Result<(), SessionError> {
        if self.inflight.contains(&m.id) {
            return Ok(());
        }
        if self.inactive && m.priority == pushgate_core::Priority::Normal {
            // XEP-0352: batch non-urgent messages while the app is in the background
            if !self.held.iter().any(|h| h.id == m.id) {
                self.held_since.get_or_insert_with(Instant::now);
                self.held.push(m);
            }
            return Ok(());
        }
        self.deliver_now(m, true).await
    }

    /// Writes `m` (a hand-over, or a message held while the client was inactive) unless it
    /// no longer waits for the device, after any older pending message the session has not
    /// considered yet.
    ///
    /// One script tells whether `m` still waits, its status, and the ids queued between the
    /// session's mark and `m` ([`pushgate_store::Store::pending_check_send`], run in a batch
    /// with other sessions' checks by [`crate::check`]). When none are queued there, `m` is
    /// the only message to write, and its body is the one in hand (a message's body never
    /// changes after acceptance), so the script records `sent` at once and the stanza is
    /// written: one script run for the check and the transition, where the whole-queue scan
    /// took three round trips or more and a separate `sent` one more. When the ids listed
    /// are all in flight on this session, the message is written and `sent` recorded after.
    /// Everything else falls back to the page-by-page scan, which reads each message's status
    /// just before writing it:
    /// - ids below `m` that the session has not considered (a hand-over that has not arrived
    ///   yet, was lost, or did not fit the session's queue): they go out first, in order;
    /// - `m` at or below the mark, i.e. queued after the range it belongs to was read (a
    ///   late-routed message). For a hand-over the scan starts from the beginning, as every
    ///   hand-over's did before the mark existed, so another late message whose own hand-over
    ///   went astray goes out with it. A held message at or below the mark was considered when
    ///   it was held (a scan read its range, or its own late hand-over brought it); it is
    ///   written on its own check, without a scan per held message.
    ///
    /// Checking the status in the same step as the queue keeps the window in which a
    /// cancellation can slip between check and write as short as before; a cancellation
    /// inside it is retracted like one that comes after the write.
    async fn deliver_now(&mut self, m: Message, handed_over: bool) -> Result<(), SessionError> {
        let mark = self.mark();
        // the common case (the message is the next one to write) records `sent` in the same
        // round trip; anything else is decided below from what the check read
        let ask = CheckRequest {
            app: self.device.app_id.clone(),
            device: self.device.device_id.clone(),
            id: m.id.clone(),
            after: mark,
            limit: PENDING_PAGE,
            expires_at: m.expires_at,
        };
        let Some(mut check) = self.edge.checks.check(ask).await? else {
            // delivered, expired or cancelled meanwhile: never show it
            return Ok(());
        };
        if let Some(sent) = check.sent.take() {
            self.write_message(m, Some(sent)).await?;
            self.scanned_to = self.scanned_to.max(check.score);
            return Ok(());
        }
        let late = check.score <= self.scanned_to;
        if late && handed_over {
            return self.write_pending(None, Some(check.score)).await;
        }
        // the script lists nothing for a late message (its range ends below the mark)
        let unseen_older = check.older.len() >= PENDING_PAGE
            || check.older.iter().any(|id| !self.inflight.contains(id));
        if unseen_older {
            return self.write_pending(mark, Some(check.score)).await;
        }
        if check.status.is_some_and(Status::is_open) && m.expires_at > now_ms() {
            self.write_message(m, None).await?;
        }
        // everything queued in (mark, score] when the script ran has now been considered
        self.scanned_to = self.scanned_to.max(check.score);
        Ok(())
    }

    /// The mark as the store's range bound (`None`: from the start).
    fn mark(&self) -> Option<f64> {
        (self.scanned_to > f64::NEG_INFINITY).then_some(self.scanned_to)
    }

    /// Writes every pending message with an acceptance time in `(after, until]` that this
    /// session has not written yet, oldest first, page by page; then moves the mark over the
    /// range read. `after` must be `None` or the mark, so that the ranges read stay
    /// contiguous and the mark means what it says.
    async fn write_pending(
        &mut self,
        mut after: Option<f64>,
        until: Option<f64>,
    ) -> Result<(), SessionError> {
        debug_assert!(after.is_none_or(|a| a <= self.scanned_to));
        let (app, dev) = (self.device.app_id.clone(), self.device.device_id.clone());
        // the highest score read, and whether every id up to it was
        let mut top = None;
        let mut whole = true;
        loop {
            let page = self
                .edge
                .store
                .pending_page(&app, &dev, after, until, PENDING_PAGE)
                .await?;
            let full = page.len() == PENDING_PAGE;
            let first = page.first().map(|(_, score)| *score);
            let mut last = after;
            // ids that wait for nothing any more: another device of the user confirmed them,
            // or they were settled or erased without this queue being told
            let mut settled = Vec::new();
            for (id, score) in page {
                last = Some(score);
                top = Some(score);
                if self.inflight.contains(&id) {
                    continue;
                }
                let Some(m) = self.edge.store.message(&id).await? else {
                    settled.push(id);
                    continue;
                };
                if !m.status.is_open() {
                    settled.push(id);
                    continue;
                }
                if m.message.expires_at <= now_ms() {
                    // expiring: the clock settles it and clears the queues
                    continue;
                }
                if self.inactive && m.message.priority == pushgate_core::Priority::Normal {
                    // XEP-0352: held until the client is active or the batch is due
                    if !self.held.iter().any(|h| h.id == m.message.id) {
                        self.held_since.get_or_insert_with(Instant::now);
                        self.held.push(m.message);
                    }
                    continue;
                }
                self.write_message(m.message, None).await?;
            }
            // a closed status never opens again, so these would only be read at every drain
            // from now on (a second device's queue grew by every message the first confirmed)
            self.edge.store.pending_forget(&app, &dev, &settled).await?;
            if !full || last == after {
                // read up to `until`, or (to the end) up to the last id there was
                if let Some(covered) = until.or(top).filter(|_| whole) {
                    self.scanned_to = self.scanned_to.max(covered);
                }
                return Ok(());
            }
            // Scores are unique within a request (`Message::order_key`) but not across
            // requests accepted in the same millisecond, so more ids may share the last
            // score than this page held: the next page starts at that score again (scores are
            // whole numbers, exact in an f64, so "above last - 1" is "from last"). Ids read
            // twice are skipped (in flight, or already held) or found closed again. Only a
            // page that is one score throughout (that many requests in one millisecond)
            // cannot move that way; it moves past it, and the mark stays where it was, so the
            // ids it passed over are still looked for by the next hand-over.
            after = match last {
                Some(l) if first != last => Some(l - 1.0),
                _ => {
                    whole = false;
                    last
                }
            };
        }
    }

    /// Writes a message stanza and records `sent`, unless `sent` says the store already did
    /// (then only its event, if any, is published).
    async fn write_message(&mut self, m: Message, sent: Option<Sent>) -> Result<(), SessionError> {
        // in the message's trace: its acceptance context is stored with it
        let span = tracing::info_span!(
            pushgate_runtime::telemetry::spans::EDGE_WRITE,
            message_id = %m.id
        );
        pushgate_runtime::telemetry::continue_message_trace(&span, &self.edge.store, &m.id).await;
        let write = async {
            let stanza = message_stanza(&m, &self.edge.domain, &self.full_jid);
            self.send_counted(&stanza, Some(m.id.clone())).await?;
            self.edge.metrics.xmpp_stanzas_out.inc();
            self.inflight.insert(m.id.clone());
            match sent {
                None => self.change(&m.id, Status::Sent).await,
                Some(Sent::Applied(ev)) => {
                    publish_event(&self.edge, ev).await;
                    Ok(())
                }
                Some(Sent::Already) => Ok(()),
            }
        };
        tracing::Instrument::instrument(write, span).await
    }

    /// Sends the messages held while the client was inactive, oldest first (they were held
    /// in the order they came, and hand-overs can come out of order).
    async fn flush_held(&mut self) -> Result<(), SessionError> {
        self.held_since = None;
        // a due batch goes out even while the client stays inactive: the scan that may run
        // for it must write, not hold again
        let was_inactive = std::mem::replace(&mut self.inactive, false);
        let mut held = std::mem::take(&mut self.held);
        held.sort_by_key(Message::order_key);
        let mut result = Ok(());
        for m in held {
            if !self.inflight.contains(&m.id) {
                result = self.deliver_now(m, false).await;
                if result.is_err() {
                    break;
                }
            }
        }
        self.inactive = was_inactive;
        result
    }

    /// The first drain of the session.
    async fn drain_once(&mut self) -> Result<(), SessionError> {
        if self.drained {
            return Ok(());
        }
        self.drained = true;
        self.drain_pending().await?;
        let ids = self
            .edge
            .store
            .retractions(&self.device.app_id, &self.device.device_id, 500)
            .await?;
        for id in ids {
            self.retract(&id).await?;
        }
        Ok(())
    }

    /// XEP-0424: takes back a cancelled or expired message the device may be showing (it came
    /// by native push, or over XMPP without a receipt).
    async fn retract(&mut self, id: &str) -> Result<(), SessionError> {
        self.inflight.remove(id);
        let stanza = format!(
            "<message type='chat' id='retract-{id}' from='{}' to='{}'><retract xmlns='urn:xmpp:message-retract:1' id='{id}'/><fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:message-retract:1'/><body>This message was withdrawn.</body><store xmlns='urn:xmpp:hints'/></message>",
            escape(&self.edge.domain),
            escape(&self.full_jid),
            id = escape(id),
        );
        self.send_counted(&stanza, None).await?;
        self.edge
            .store
            .retraction_done(&self.device.app_id, &self.device.device_id, id)
            .await?;
        Ok(())
    }

    /// Everything still pending for the device, oldest first.
    async fn drain_pending(&mut self) -> Result<(), SessionError> {
        self.write_pending(None, None).await
    }

    /// Records a status change this session saw (over XMPP, by this device), through the
    /// edge's batched queue ([`crate::confirm`]).
    async fn change(&mut self, id: &str, to: Status) -> Result<(), SessionError> {
        let outcome = self
            .edge
            .confirmations
            .apply(id, to, &self.device.device_id)
            .await?;
        if let Transition::Applied(ev) = outcome {
            if to == Status::Delivered {
                // message ids are UUIDv7: the acceptance time is in the id, so the metric
                // costs no read (the same source as `accept_to_webhook_delivered`)
                if let Some(at) = pushgate_runtime::metrics::accepted_at_ms(id) {
                    let secs = (now_ms() - at).max(0) as f64 / 1000.0;
                    self.edge.metrics.accept_to_delivered.observe(secs);
                }
            }
            publish_event(&self.edge, ev).await;
        }
        Ok(())
    }

    /// The client acknowledged every stanza up to `h`; message stanzas among them are delivered.
    async fn ack_up_to(&mut self, h: u32) -> Result<(), SessionError> {
        let mut confirmed = vec![];
        while let Some((seq, _)) = self.unacked.front() {
            if seq.wrapping_sub(h) as i32 > 0 {
                break;
            }
            if let Some((_, Some(id))) = self.unacked.pop_front() {
                confirmed.push(id);
            }
        }
        for id in confirmed {
            self.confirmed(&id).await?;
        }
        Ok(())
    }

    /// XEP-0357 (Pushgate's reading): `<enable xmlns='urn:xmpp:push:0' jid='{apns|fcm|hms}'
    /// node='{token}'/>` registers the device's native push token over XMPP instead of HTTP;
    /// `<disable/>` forgets it. The service must match the device's platform.
    async fn push_registration(
        &mut self,
        el: &Element,
    ) -> Result<Result<(), &'static str>, SessionError> {
        let (enable, child) = match (el.child("enable", NS_PUSH), el.child("disable", NS_PUSH)) {
            (Some(e), _) => (true, e),
            (None, Some(d)) => (false, d),
            (None, None) => return Ok(Err("bad-request")),
        };
        let service = child.attr("jid").unwrap_or("");
        if Some(service) != self.device.platform.native_channel() || service == "webpush" {
            return Ok(Err("not-acceptable"));
        }
        let token = child.attr("node").map(str::to_string);
        let platform = self.device.platform;
        if enable
            && token
                .as_ref()
                .is_none_or(|t| t.is_empty() || t.len() > 4096 || !platform.accepts_push_token(t))
        {
            return Ok(Err("bad-request"));
        }
        for _ in 0..5 {
            let Some(current) = self
                .edge
                .store
                .device(&self.device.app_id, &self.device.device_id)
                .await?
            else {
                return Ok(Err("item-not-found"));
            };
            let mut next = current.clone();
            if enable {
                next.token_state = if next.push_token == token {
                    next.token_state
                } else {
                    pushgate_core::TokenState::Valid
                };
                next.push_token = token.clone();
            } else {
                next.push_token = None;
                next.token_state = pushgate_core::TokenState::None;
            }
            next.updated_at = now_ms();
            match self.edge.store.put_device(&next, Some(&current)).await {
                Ok(()) => {
                    self.device = session_device(next);
                    return Ok(Ok(()));
                }
                Err(pushgate_store::StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Err("resource-constraint"))
    }

    /// Stores what a later `<resume/>` needs (on any edge).
    async fn save_resume_state(&mut self) -> Result<(), SessionError> {
        let Some(id) = &self.sm_id else { return Ok(()) };
        let resource = self
            .full_jid
            .rsplit_once('/')
            .map(|(_, r)| r.to_string())
            .unwrap_or_default();
        let state = ResumeState {
            app_id: self.device.app_id.clone(),
            device_id: self.device.device_id.clone(),
            resource,
            h_in: self.h_in,
            unacked: self
                .unacked
                .iter()
                .filter_map(|(seq, m)| m.clone().map(|m| (*seq, m)))
                .collect(),
        };
        let json = serde_json::to_string(&state)
            .map_err(|e| SessionError::Stream("internal-server-error", e.to_string()))?;
        self.edge
            .store
            .put_resume_state(id, &json, self.edge.settings.resume_window())
            .await?;
        Ok(())
    }

    /// A message the device confirmed (receipt or stream-management ack).
    async fn confirmed(&mut self, id: &str) -> Result<(), SessionError> {
        self.inflight.remove(id);
        // a receipt settles the message: stream management need not track it any longer
        // (entries without a message carry nothing, so they can go)
        self.unacked
            .retain(|(_, m)| m.is_some() && m.as_deref() != Some(id));
        // the receipt, and the `delivered` event it publishes, join the message's trace
        let span = tracing::info_span!(
            pushgate_runtime::telemetry::spans::EDGE_RECEIPT,
            message_id = %id
        );
        pushgate_runtime::telemetry::continue_message_trace(&span, &self.edge.store, id).await;
        tracing::Instrument::instrument(self.change(id, Status::Delivered), span).await
    }

    fn rate_ok(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.window_count = 0;
        }
        self.window_count += 1;
        self.window_count <= self.edge.settings.max_stanzas_per_sec
    }

    /// Handles one stanza from the device. `Ok(false)` ends the session cleanly.
    async fn on_stanza(&mut self, el: Element) -> Result<bool, SessionError> {
        if !self.rate_ok() {
            return Err(fail(
                &mut self.w,
                "policy-violation",
                "too many stanzas per second",
            )
            .await);
        }
        if el.ns == NS_SM {
            return self.on_sm(&el).await.map(|()| true);
        }
        if el.ns == NS_CSI {
            match el.name.as_str() {
                "inactive" => self.inactive = true,
                "active" => {
                    self.inactive = false;
                    self.flush_held().await?;
                }
                _ => {
                    return Err(fail(
                        &mut self.w,
                        "unsupported-stanza-type",
                        "unknown CSI element",
                    )
                    .await)
                }
            }
            return Ok(true);
        }
        if el.ns != NS_CLIENT {
            return Err(fail(
                &mut self.w,
                "unsupported-stanza-type",
                "unknown top-level element",
            )
            .await);
        }
        if self.sm {
            self.h_in = self.h_in.wrapping_add(1);
        }
        match el.name.as_str() {
            "message" => self.on_message(&el).await?,
            "iq" => self.on_iq(&el).await?,
            "presence" => self.drain_once().await?,
            _ => return Err(fail(&mut self.w, "unsupported-stanza-type", "unknown stanza").await),
        }
        Ok(true)
    }

    async fn on_sm(&mut self, el: &Element) -> Result<(), SessionError> {
        match el.name.as_str() {
            "enable" if !self.sm => {
                self.sm = true;
                let wants_resume = matches!(el.attr("resume"), Some("true") | Some("1"));
                if wants_resume {
                    let id = new_id();
                    self.sm_id = Some(id.clone());
                    self.save_resume_state().await?;
                    let window = self.edge.settings.resume_window().as_secs();
                    self.write(&format!("<enabled xmlns='urn:xmpp:sm:3' id='{id}' resume='true' max='{window}'/>")).await?;
                } else {
                    self.write("<enabled xmlns='urn:xmpp:sm:3'/>").await?;
                }
                self.drain_once().await
            }
            "enable" => self.write("<failed xmlns='urn:xmpp:sm:3'><unexpected-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>").await,
            "r" if self.sm => {
                let a = format!("<a xmlns='urn:xmpp:sm:3' h='{}'/>", self.h_in);
                self.write(&a).await
            }
            "a" if self.sm => {
                let Some(h) = el.attr("h").and_then(|h| h.parse::<u32>().ok()) else {
                    return Err(fail(&mut self.w, "invalid-xml", "<a/> needs a numeric h").await);
                };
                self.ack_up_to(h).await
            }
            _ => Err(fail(&mut self.w, "unsupported-stanza-type", "stream management is not enabled").await),
        }
    }

    async fn on_message(&mut self, el: &Element) -> Result<(), SessionError> {
        if let Some(r) = el.child("received", NS_RECEIPTS) {
            if let Some(id) = r.attr("id") {
                let id = id.to_string();
                if pushgate_core::MessageId::is_well_formed(&id) {
                    self.confirmed(&id).await?;
                }
            }
        }
        if let Some(d) = el.child("displayed", NS_MARKERS) {
            if let Some(id) = d.attr("id") {
                if pushgate_core::MessageId::is_well_formed(id) {
                    self.inflight.remove(id);
                    self.change(id, Status::Read).await?;
                }
            }
        }
        let body = el.child("body", NS_CLIENT).map(|b| b.text.clone());
        if let Some(text) = body.filter(|t| !t.trim().is_empty()) {
            let replied = el
                .child("reply", NS_REPLY)
                .and_then(|r| r.attr("id"))
                .map(str::to_string);
            self.edge.publish_reply(&self.device, replied, text).await?;
        }
        Ok(())
    }

    async fn on_iq(&mut self, el: &Element) -> Result<(), SessionError> {
        let id = el.attr("id").unwrap_or("").to_string();
        let kind = el.attr("type").unwrap_or("");
        match kind {
            "result" | "error" => Ok(()),
            "set"
                if el.child("enable", NS_PUSH).is_some()
                    || el.child("disable", NS_PUSH).is_some() =>
            {
                let reply = match self.push_registration(el).await? {
                    Ok(()) => iq_result(&id, ""),
                    Err(cond) => iq_error(&id, "modify", cond),
                };
                self.send_counted(&reply, None).await
            }
            "get" | "set" => {
                let reply = if el.child("ping", NS_PING).is_some()
                    || el.child("session", NS_SESSION).is_some()
                {
                    iq_result(&id, "")
                } else if kind == "get" && el.child("query", NS_ROSTER).is_some() {
                    // devices have no roster; an empty one keeps standard clients happy
                    iq_result(&id, "<query xmlns='jabber:iq:roster'/>")
                } else if el.child("bind", NS_BIND).is_some() {
                    iq_error(&id, "cancel", "not-allowed")
                } else {
                    iq_error(&id, "cancel", "service-unavailable")
                };
                self.send_counted(&reply, None).await
            }
            _ => {
                let e = format!(
                    "<iq type='error' id='{}'><error type='modify'><bad-request xmlns='{NS_STANZAS}'/></error></iq>",
                    escape(&id)
                );
                self.send_counted(&e, None).await
            }
        }
    }
}

/// The bound session: presence, pending messages, then live traffic until the end.
///
/// Everything that waits across the loop's turns lives in this future and is kept small;
/// every handler is boxed while it runs (see [`serve_tls`]).
async fn run_session<S>(edge: Arc<Edge>, started: Box<Started<S>>) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Built by a plain function: values that an async fn binds and then moves on keep their
    // room in its future for good (1 KB here: the device, the binding, the handle).
    let Begun {
        mut live,
        bound,
        reader,
        mut rx,
        needs_drain,
        presence_value,
    } = begin(&edge, started);
    edge.metrics.xmpp_sessions.inc();
    let result = match Box::pin(live.start(&presence_value, bound)).await {
        Ok(()) => live.serve(&mut rx, reader, &needs_drain).await,
        Err(e) => Err(e),
    };
    Box::pin(live.end(&presence_value)).await;
    edge.metrics.xmpp_sessions.dec();
    result
}

/// What a live session keeps of its device: what it uses (ids, user, platform). The SCRAM
/// verifier, push tokens, phone number and locale are dropped after login: an edge holding
/// 100,000 sessions would otherwise keep about 0.3 KiB of them per session for nothing.
fn session_device(mut d: Device) -> Device {
    d.scram.salt = String::new();
    d.scram.stored_key = String::new();
    d.scram.server_key = String::new();
    d.push_token = None;
    d.webpush = None;
    d.phone = None;
    d.locale = None;
    d
}

/// A session registered and ready to start.
struct Begun<S> {
    live: Live<S>,
    bound: Box<Bound>,
    reader: Box<StanzaReader<ReadHalf<S>>>,
    rx: mailbox::Receiver<SessionCmd>,
    needs_drain: Arc<std::sync::atomic::AtomicBool>,
    presence_value: String,
}

/// Registers the session with the edge and builds its state.
fn begin<S>(edge: &Arc<Edge>, started: Box<Started<S>>) -> Begun<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Started {
        device,
        bound,
        reader,
        w,
    } = *started;
    let session_id = new_id();
    let presence_value = format!("{}/{}", edge.edge_id, session_id);
    let (tx, rx) = mailbox::bounded::<SessionCmd>(edge.settings.session_queue);
    let handle = SessionHandle::new(&session_id, tx);
    let needs_drain = handle.needs_drain.clone();
    edge.register(&device, handle);
    let resource = match &bound {
        Bound::New(r) => r.clone(),
        Bound::Resumed { state, .. } => state.resource.clone(),
    };
    let full_jid = format!("{}@{}/{}", device.jid_local, edge.domain, resource);
    Begun {
        live: Live {
            edge: edge.clone(),
            device: session_device(device),
            session_id,
            full_jid,
            w,
            sm: false,
            h_in: 0,
            out_count: 0,
            unacked: VecDeque::new(),
            inflight: HashSet::new(),
            scanned_to: f64::NEG_INFINITY,
            window_start: Instant::now(),
            window_count: 0,
            sm_id: None,
            inactive: false,
            held: Vec::new(),
            held_since: None,
            final_end: false,
            drained: false,
        },
        bound: Box::new(bound),
        reader,
        rx,
        needs_drain,
        presence_value,
    }
}

/// Reads the next event, giving the reader back with it. Owning the reader makes waiting for
/// input cancel-safe inside `select!` without a task and a channel of its own per session
/// (the future lives across loop turns and is only replaced once it has finished).
/// The reader is boxed so that the future (and the session's state) holds a pointer to it
/// rather than a copy of it.
async fn read_next<R: AsyncRead + Unpin>(
    mut reader: Box<StanzaReader<R>>,
) -> (Box<StanzaReader<R>>, Result<XmlEvent, XmlError>) {
    let ev = reader.next().await;
    (reader, ev)
}

impl<W: AsyncRead + AsyncWrite + Unpin> Live<W> {
    /// Announces the session (presence, replacing an older one), and for a resumption picks
    /// up the old stream's state.
    async fn start(&mut self, presence_value: &str, bound: Box<Bound>) -> Result<(), SessionError> {
        let (app, dev) = (self.device.app_id.clone(), self.device.device_id.clone());
        let previous = self
            .edge
            .store
            .set_presence(&app, &dev, presence_value, now_ms())
            .await?;
        if let Some(prev) = previous.filter(|p| p != presence_value) {
            self.edge
                .replace_elsewhere(&self.device, &self.session_id, &prev)
                .await;
        }
        if let Bound::Resumed {
            id,
            state,
            client_h,
        } = *bound
        {
            // continue the old stream: our count of the client's stanzas, its count of ours;
            // what it received before the drop counts as delivered, the rest goes out again
            // from the pending queue
            self.sm = true;
            self.sm_id = Some(id);
            self.h_in = state.h_in;
            self.unacked = state
                .unacked
                .into_iter()
                .map(|(seq, m)| (seq, Some(m)))
                .collect();
            self.ack_up_to(client_h).await?;
            self.unacked.clear();
            self.out_count = client_h;
            self.save_resume_state().await?;
            self.drain_once().await?;
        }
        Ok(())
    }

    /// Keeps what a resumption needs (unless the stream ended for good) before the session
    /// stops counting as live, so a quick resume finds it; then leaves the registry and
    /// clears presence.
    async fn end(&mut self, presence_value: &str) {
        if self.sm_id.is_some() {
            let kept = if self.final_end {
                match &self.sm_id {
                    Some(id) => self.edge.store.drop_resume_state(id).await,
                    None => Ok(()),
                }
            } else {
                self.save_resume_state()
                    .await
                    .map_err(|e| pushgate_store::StoreError::Conflict(e.to_string()))
            };
            if let Err(e) = kept {
                tracing::warn!(error = %e, "cannot update stream resumption state");
            }
        }
        self.edge.unregister(&self.device, &self.session_id);
        if let Err(e) = self
            .edge
            .store
            .clear_presence(
                &self.device.app_id,
                &self.device.device_id,
                presence_value,
                now_ms(),
            )
            .await
        {
            tracing::warn!(error = %e, "cannot clear presence; it expires with the edge lease");
        }
    }

    /// Periodic duties: the first drain, a drain after a hand-over that did not fit, asking
    /// for acks, the CSI batch, keep-alive. `Err` ends the session.
    async fn on_timer(
        &mut self,
        bound_at: Instant,
        last_input: Instant,
        ping_sent: &mut Option<Instant>,
        needs_drain: &std::sync::atomic::AtomicBool,
    ) -> Result<(), SessionError> {
        if !self.drained && bound_at.elapsed() >= DRAIN_GRACE {
            self.drain_once().await?;
        }
        if needs_drain.swap(false, Ordering::AcqRel) {
            self.drain_pending().await?;
        }
        // ask for an ack of what is still unconfirmed, so the unacked list stays short
        // and a resumption knows what the client has
        if self.sm && self.unacked.iter().any(|(_, m)| m.is_some()) {
            self.write("<r xmlns='urn:xmpp:sm:3'/>").await?;
        }
        if self
            .held_since
            .is_some_and(|t| t.elapsed() >= self.edge.settings.csi_batch())
        {
            self.flush_held().await?;
        }
        let ping_every = self.edge.settings.ping_interval();
        match *ping_sent {
            Some(at) if at.elapsed() >= self.edge.settings.ping_timeout() => {
                return Err(SessionError::Timeout("device did not answer ping"));
            }
            None if last_input.elapsed() >= ping_every => {
                let ping = format!(
                    "<iq type='get' id='ping-{}' from='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
                    new_id(),
                    escape(&self.edge.domain)
                );
                self.send_counted(&ping, None).await?;
                *ping_sent = Some(Instant::now());
            }
            _ => {}
        }
        Ok(())
    }

    /// One event from the device. `Ok(false)` ends the session cleanly.
    async fn on_input(&mut self, ev: Result<XmlEvent, XmlError>) -> Result<bool, SessionError> {
        match ev {
            Ok(XmlEvent::Stanza(el)) => self.on_stanza(el).await,
            Ok(XmlEvent::StreamClose) => {
                self.final_end = true;
                let _ = self.write("</stream:stream>").await;
                Ok(false)
            }
            Ok(XmlEvent::StreamOpen(_)) => {
                Err(fail(&mut self.w, "invalid-xml", "unexpected stream header").await)
            }
            Err(e) => Err(match e.condition() {
                Some(c) => fail(&mut self.w, c, &e.to_string()).await,
                None => e.into(),
            }),
        }
    }

    /// One command from the registry (router hand-over, retraction, close).
    async fn on_command(&mut self, cmd: SessionCmd) -> Result<(), SessionError> {
        match cmd {
            SessionCmd::Deliver(m) => self.deliver(*m).await,
            SessionCmd::Retract(id) => self.retract(&id).await,
            SessionCmd::Close(cond, text) => {
                // replaced by a new login, or the device left its user: never resumable;
                // a server shutdown is (on another edge)
                self.final_end = cond != "system-shutdown";
                Err(fail(&mut self.w, cond, &text).await)
            }
        }
    }

    /// The live session: input, commands and timers until the stream ends.
    async fn serve<R: AsyncRead + Unpin>(
        &mut self,
        rx: &mut mailbox::Receiver<SessionCmd>,
        reader: Box<StanzaReader<R>>,
        needs_drain: &std::sync::atomic::AtomicBool,
    ) -> Result<(), SessionError> {
        let bound_at = Instant::now();
        let ping_every = self.edge.settings.ping_interval();
        let mut last_input = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        let mut reading = std::pin::pin!(read_next(reader));
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        loop {
            // An idle session sleeps until its next keep-alive ping is due; only a session
            // with work in progress (backlog not drained yet, messages awaiting acks, a CSI
            // batch, a ping awaiting its answer, a hand-over that did not fit) looks again
            // every second. With 100,000 sessions per edge a fixed one-second tick alone would
            // be 100,000 wake-ups per second doing nothing.
            let busy = !self.drained
                || ping_sent.is_some()
                || self.held_since.is_some()
                || needs_drain.load(Ordering::Acquire)
                || (self.sm && self.unacked.iter().any(|(_, m)| m.is_some()));
            let wake = if busy {
                Instant::now() + Duration::from_secs(1).min(ping_every)
            } else {
                last_input + ping_every
            };
            timer.as_mut().reset(wake.into());
            tokio::select! {
                (r, ev) = &mut reading => {
                    reading.set(read_next(r));
                    last_input = Instant::now();
                    ping_sent = None;
                    if !Box::pin(self.on_input(ev)).await? {
                        return Ok(());
                    }
                }
                cmd = rx.recv() => Box::pin(self.on_command(cmd)).await?,
                _ = &mut timer => {
                    Box::pin(self.on_timer(bound_at, last_input, &mut ping_sent, needs_drain)).await?;
                }
            }
        }
    }
}

/// Publishes an event the store put in the outbox; a failure leaves it to the sweeper.
async fn publish_event(edge: &Edge, ev: String) {
    if let Err(e) = edge.outbox.publish_events(&[ev]).await {
        tracing::warn!(error = %e, "event publish deferred to the outbox sweeper");
    }
}
