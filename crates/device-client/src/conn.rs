//! Opening one XMPP session: TCP, STARTTLS or direct TLS, SCRAM-SHA-256, resource binding.
//!
//! Negotiation is a straight sequence (nothing else can use the socket before binding); every
//! step has a deadline so a silent server cannot hold a (re)connect attempt forever.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use pushgate_xmpp::{escape, Element, Limits, StanzaReader, XmlError, XmlEvent, NS_STREAM};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::scram::{Keys, ScramClient};
use crate::{ClientError, TlsMode};

pub(crate) const NS_CLIENT: &str = "jabber:client";
const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub(crate) const NS_SM: &str = "urn:xmpp:sm:3";
pub(crate) const NS_STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";

/// What we accept from the server. Its messages are small (text ≤ 4 KiB, data ≤ 4 KiB JSON,
/// even fully escaped well under this), so anything bigger is a broken or hostile peer.
pub(crate) const LIMITS: Limits = Limits {
    max_stanza_bytes: 256 * 1024,
    max_depth: 16,
    max_attributes: 32,
};

/// Deadline of each negotiation step (TCP connect, TLS handshake, each server answer).
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Everything needed to (re)open a session, resolved once from the configuration.
pub(crate) struct Target {
    pub local: String,
    pub domain: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub resource: Option<String>,
    pub tls_config: Arc<rustls::ClientConfig>,
    /// SCRAM keys from the last successful login, so reconnects skip PBKDF2 (see
    /// [`crate::scram::Keys`]).
    pub scram_keys: std::sync::Mutex<Option<crate::scram::Keys>>,
}

/// A session ready for stanzas.
pub(crate) struct Session {
    pub reader: StanzaReader<ReadHalf<Tls>>,
    pub writer: WriteHalf<Tls>,
    /// How it came to be.
    pub bound: Bound,
    /// The server offered XEP-0198.
    pub sm_offered: bool,
}

/// A new session, or the previous one resumed.
pub(crate) enum Bound {
    /// A new session with the full JID the server bound.
    New { full_jid: String },
    /// XEP-0198 resumption: the previous stream goes on; `h` is how many of our stanzas the
    /// server had received.
    Resumed { h: u32 },
}

/// A stream-management session to resume: its id and how many stanzas we handled.
pub(crate) struct Resume {
    pub previd: String,
    pub h: u32,
}

fn io_err(e: std::io::Error) -> ClientError {
    ClientError::Network(e.to_string())
}

fn xml_err(e: XmlError) -> ClientError {
    match e {
        XmlError::Eof => ClientError::Network("the server closed the connection".into()),
        XmlError::Io(e) => io_err(e),
        other => ClientError::Protocol(other.to_string()),
    }
}

fn header(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{}' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
        escape(domain)
    )
}

/// The condition of a `<stream:error>` or SASL `<failure>`: its first child's name.
pub(crate) fn condition(el: &Element) -> String {
    el.children
        .iter()
        .find(|c| c.name != "text")
        .map(|c| c.name.clone())
        .unwrap_or_else(|| "undefined-condition".into())
}

async fn next<R: AsyncRead + Unpin>(r: &mut StanzaReader<R>) -> Result<XmlEvent, ClientError> {
    match tokio::time::timeout(STEP_TIMEOUT, r.next()).await {
        Err(_) => Err(ClientError::Network(
            "the server did not answer in time".into(),
        )),
        Ok(res) => res.map_err(xml_err),
    }
}

/// The next stanza; a stream error or stream end becomes the matching error.
async fn stanza<R: AsyncRead + Unpin>(r: &mut StanzaReader<R>) -> Result<Element, ClientError> {
    match next(r).await? {
        XmlEvent::Stanza(el) if el.is("error", NS_STREAM) => {
            let cond = condition(&el);
            // the edge ends a login that failed too often with a policy violation
            Err(if cond == "not-authorized" {
                ClientError::Auth(cond)
            } else {
                ClientError::Stream(cond)
            })
        }
        XmlEvent::Stanza(el) => Ok(el),
        XmlEvent::StreamClose => Err(ClientError::Network("the server closed the stream".into())),
        XmlEvent::StreamOpen(_) => Err(ClientError::Protocol("unexpected stream header".into())),
    }
}

/// Opens the stream and returns the features element.
async fn open<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut StanzaReader<R>,
    w: &mut W,
    domain: &str,
) -> Result<Element, ClientError> {
    send(w, &header(domain)).await?;
    match next(r).await? {
        XmlEvent::StreamOpen(_) => {}
        _ => return Err(ClientError::Protocol("expected a stream header".into())),
    }
    let features = stanza(r).await?;
    if !features.is("features", NS_STREAM) {
        return Err(ClientError::Protocol(format!(
            "expected stream features, got <{}>",
            features.name
        )));
    }
    Ok(features)
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, s: &str) -> Result<(), ClientError> {
    let fut = async {
        w.write_all(s.as_bytes()).await?;
        w.flush().await
    };
    match tokio::time::timeout(STEP_TIMEOUT, fut).await {
        Err(_) => Err(ClientError::Network("write timed out".into())),
        Ok(r) => r.map_err(io_err),
    }
}

async fn tls_handshake(t: &Target, tcp: TcpStream) -> Result<Tls, ClientError> {
    // XMPP authenticates the server by its domain (RFC 6120 §13.7.2), not by the host we
    // happened to dial, so a load balancer or IP address in `host` still verifies properly
    let name = rustls_pki_types::ServerName::try_from(t.domain.clone())
        .map_err(|e| ClientError::Invalid(format!("domain {:?}: {e}", t.domain)))?;
    let connector = tokio_rustls::TlsConnector::from(t.tls_config.clone());
    match tokio::time::timeout(STEP_TIMEOUT, connector.connect(name, tcp)).await {
        Err(_) => Err(ClientError::Network("TLS handshake timed out".into())),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(ClientError::Tls(e.to_string()))
        }
        Ok(r) => r.map_err(io_err),
    }
}

/// Connects, secures, authenticates, then resumes the previous session when `resume` is given
/// and the server still has it, else binds a new one.
pub(crate) async fn establish(t: &Target, resume: Option<Resume>) -> Result<Session, ClientError> {
    let addr = (t.host.as_str(), t.port);
    let mut tcp = match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await {
        Err(_) => return Err(ClientError::Network("TCP connect timed out".into())),
        Ok(r) => r.map_err(|e| ClientError::Network(format!("{}:{}: {e}", t.host, t.port)))?,
    };
    let _ = tcp.set_nodelay(true);
    if t.tls == TlsMode::Starttls {
        let (rd, mut wr) = tcp.split();
        let mut r = StanzaReader::new(rd, LIMITS);
        let features = open(&mut r, &mut wr, &t.domain).await?;
        if features.child("starttls", NS_TLS).is_none() {
            // never fall back to plaintext: the password and messages must not travel in clear
            return Err(ClientError::Tls(
                "the server does not offer STARTTLS".into(),
            ));
        }
        send(
            &mut wr,
            "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        )
        .await?;
        let proceed = stanza(&mut r).await?;
        if !proceed.is("proceed", NS_TLS) {
            return Err(ClientError::Tls(format!(
                "STARTTLS refused: <{}>",
                proceed.name
            )));
        }
    }
    let tls = tls_handshake(t, tcp).await?;
    let (rd, mut wr) = tokio::io::split(tls);
    let mut r = StanzaReader::new(rd, LIMITS);
    let features = open(&mut r, &mut wr, &t.domain).await?;
    let offers_scram = features
        .child("mechanisms", NS_SASL)
        .is_some_and(|m| m.children.iter().any(|c| c.text.trim() == "SCRAM-SHA-256"));
    if !offers_scram {
        return Err(ClientError::Protocol(
            "the server does not offer SCRAM-SHA-256".into(),
        ));
    }
    authenticate(t, &mut r, &mut wr).await?;
    let mut r = r.restart();
    let features = open(&mut r, &mut wr, &t.domain).await?;
    if features.child("bind", NS_BIND).is_none() {
        return Err(ClientError::Protocol(
            "the server offers no resource binding".into(),
        ));
    }
    let sm_offered = features.child("sm", NS_SM).is_some();
    if let Some(res) = resume.filter(|_| sm_offered) {
        send(
            &mut wr,
            &format!(
                "<resume xmlns='urn:xmpp:sm:3' previd='{}' h='{}'/>",
                escape(&res.previd),
                res.h
            ),
        )
        .await?;
        let answer = stanza(&mut r).await?;
        if answer.is("resumed", NS_SM) {
            let h = answer
                .attr("h")
                .and_then(|h| h.parse::<u32>().ok())
                .ok_or_else(|| ClientError::Protocol("<resumed/> without a numeric h".into()))?;
            return Ok(Session {
                reader: r,
                writer: wr,
                bound: Bound::Resumed { h },
                sm_offered,
            });
        }
        if !answer.is("failed", NS_SM) {
            return Err(ClientError::Protocol(format!(
                "expected <resumed/> or <failed/>, got <{}>",
                answer.name
            )));
        }
        // expired or unknown: bind a new session; nothing is lost, the server's pending queue
        // sends every unconfirmed message again
        tracing::debug!("stream resumption refused; binding a new session");
    }
    let resource = t
        .resource
        .as_deref()
        .map(|r| format!("<resource>{}</resource>", escape(r)))
        .unwrap_or_default();
    send(
        &mut wr,
        &format!("<iq type='set' id='bind-1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>{resource}</bind></iq>"),
    )
    .await?;
    let bound = stanza(&mut r).await?;
    if bound.attr("type") == Some("error") {
        return Err(ClientError::Refused(format!(
            "resource binding: {}",
            bound
                .child("error", NS_CLIENT)
                .map(condition)
                .unwrap_or_else(|| "error".into())
        )));
    }
    let full_jid = bound
        .child("bind", NS_BIND)
        .and_then(|b| b.child("jid", NS_BIND))
        .map(|j| j.text.trim().to_string())
        .filter(|j| !j.is_empty())
        .ok_or_else(|| ClientError::Protocol("bind result without a JID".into()))?;
    Ok(Session {
        reader: r,
        writer: wr,
        bound: Bound::New { full_jid },
        sm_offered,
    })
}

/// SCRAM-SHA-256 exchange. A `<failure/>` is an authentication error (not retried by the
/// reconnect loop: the credentials will not get better by themselves).
async fn authenticate<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    t: &Target,
    r: &mut StanzaReader<R>,
    w: &mut W,
) -> Result<(), ClientError> {
    let scram = ScramClient::new(&t.local);
    send(
        w,
        &format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{}</auth>",
            STANDARD.encode(scram.client_first())
        ),
    )
    .await?;
    let challenge = sasl_step(r).await?;
    if !challenge.is("challenge", NS_SASL) {
        return Err(ClientError::Protocol(format!(
            "expected a SASL challenge, got <{}>",
            challenge.name
        )));
    }
    let server_first = scram.server_first(&decode_sasl(&challenge.text)?)?;
    let kept = match t.scram_keys.lock() {
        Ok(k) => k.as_ref().filter(|k| k.fit(&server_first)).cloned(),
        Err(_) => None,
    };
    let keys = match kept {
        Some(k) => k,
        None => {
            let password = t.password.clone();
            let (salt, iterations) = (server_first.salt.clone(), server_first.iterations);
            // PBKDF2 is deliberately slow: keep it off the I/O threads
            tokio::task::spawn_blocking(move || Keys::derive(&password, &salt, iterations))
                .await
                .map_err(|e| ClientError::Protocol(format!("SCRAM computation failed: {e}")))?
        }
    };
    let fin = scram.client_final_with(&keys, &server_first);
    send(
        w,
        &format!(
            "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
            STANDARD.encode(&fin.message)
        ),
    )
    .await?;
    let outcome = sasl_step(r).await?;
    if !outcome.is("success", NS_SASL) {
        return Err(ClientError::Protocol(format!(
            "expected SASL success, got <{}>",
            outcome.name
        )));
    }
    fin.verify_server_final(&decode_sasl(&outcome.text)?)?;
    // kept only once the server proved it knows the verifier these keys belong to
    if let Ok(mut k) = t.scram_keys.lock() {
        *k = Some(keys);
    }
    Ok(())
}

/// The next SASL element; `<failure/>` becomes [`ClientError::Auth`].
async fn sasl_step<R: AsyncRead + Unpin>(r: &mut StanzaReader<R>) -> Result<Element, ClientError> {
    let el = stanza(r).await?;
    if el.is("failure", NS_SASL) {
        return Err(ClientError::Auth(condition(&el)));
    }
    Ok(el)
}

fn decode_sasl(text: &str) -> Result<String, ClientError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| ClientError::Protocol("SASL payload is not base64".into()))?;
    String::from_utf8(bytes).map_err(|_| ClientError::Protocol("SASL payload is not UTF-8".into()))
}
