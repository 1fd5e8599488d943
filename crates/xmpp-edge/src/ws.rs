//! XMPP over WebSocket (RFC 7395), for browser apps.
//!
//! The session logic in [`crate::session`] speaks RFC 6120 over a byte stream that is already
//! past TLS. [`WsStream`] is such a byte stream over a WebSocket connection, translating the
//! framing both ways, so the session runs unchanged (SASL, binding, stream management,
//! delivery, pings, limits):
//!
//! - **Inbound**, every text message must carry exactly one complete element ([`scan_frame`]).
//!   `<open/>` becomes a `<stream:stream>` header for the parser, `<close/>` becomes
//!   `</stream:stream>`, anything else is handed on as it came. Violations the parser cannot
//!   see, because it never sees the message boundaries (two elements in one message, a missing
//!   or misplaced `<open/>`, binary or oversized messages), are answered here with the stream
//!   error, then `<close/>`.
//! - **Outbound**, [`Framer`] cuts what the session writes into top-level elements and sends
//!   one text message each: the stream header becomes `<open/>`, `</stream:stream>` becomes
//!   `<close/>`, `stream:`-prefixed elements get their namespace declared and unqualified ones
//!   `xmlns='jabber:client'`, because every message must be a standalone document
//!   (RFC 7395 §3.3).
//! - **Closing**: when the session is done, the connection comes back here (a oneshot sent on
//!   drop) so the WebSocket closes properly whatever ended the session: `<close/>` if it was
//!   not sent, a Close frame, a short wait for the client's, then TLS close_notify.
//!
//! The RFC 6455 part (the upgrade and the frames) is our own, a server-only subset with no
//! extensions: it is small, and it keeps to the edge's memory rule that an idle session holds
//! no buffers. Received bytes are kept only until the frame they belong to is complete, output
//! only until the socket took it.
//!
//! Only `wss://` is served (TLS is the WebSocket layer's, RFC 7395 §3.9: there is no STARTTLS,
//! so the SASL mechanisms are offered at once, exactly as on direct TLS).

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, Bytes};
use rustls::ServerConfig;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::session::{self, SessionError};
use crate::xml::escape;
use crate::Edge;

/// The only path upgraded. One fixed, documented URL (the one Prosody uses too) rather than
/// "any path", so a misconfigured client gets a clear 404 instead of a half-working stream.
pub const PATH: &str = "/xmpp-websocket";
/// The WebSocket subprotocol (RFC 7395 §3.1); an upgrade without it is refused.
pub const SUBPROTOCOL: &str = "xmpp";
/// ALPN of the WebSocket listener: browsers offer `http/1.1` for `wss://`, and rustls refuses
/// a handshake whose offered protocols share none with ours (the XMPP listeners' `xmpp-client`).
pub const ALPN: &[u8] = b"http/1.1";

const NS_FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const CLOSE: &str = "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>";
/// What an inbound `<open/>` becomes for the parser (its attributes follow).
const STREAM_HEADER: &[u8] =
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'";
/// What an inbound `<close/>` becomes for the parser.
const STREAM_END: &[u8] = b"</stream:stream>";
/// How long closing the WebSocket may take once the session is over.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Largest single read from the socket, through a stack buffer (nothing kept while idle).
const READ_CHUNK: usize = 2048;
/// Largest upgrade request accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Headers in an upgrade request (browsers send 10-20).
const MAX_HEADERS: usize = 48;
/// Scratch space kept for the next element after one was sent; more is freed.
const KEEP: usize = 512;

/// Why a WebSocket connection ended before or during its session.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("TLS handshake: {0}")]
    Tls(String),
    #[error("WebSocket upgrade refused with HTTP {0}: {1}")]
    Refused(u16, &'static str),
    #[error("WebSocket upgrade: {0}")]
    Handshake(String),
    #[error("timed out: TLS and WebSocket handshake")]
    Timeout,
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// A framing violation in an inbound message; each maps to an RFC 6120 stream error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    NotWellFormed(&'static str),
    #[error("{0}")]
    Restricted(&'static str),
}

impl FrameError {
    /// The stream error condition to send.
    pub fn condition(&self) -> &'static str {
        match self {
            FrameError::NotWellFormed(_) => "not-well-formed",
            FrameError::Restricted(_) => "restricted-xml",
        }
    }
}

/// Output of the session the framer cannot cut into elements (a bug, never input-derived).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    #[error("text outside of any element in the session's output")]
    TextOutsideElements,
    #[error("malformed start tag in the session's output")]
    Tag,
}

// ------------------------------------------------------------------ the element scanner

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Between top-level elements.
    #[default]
    Between,
    /// After `<` at the top level.
    TopLt,
    /// In `<?…?>` at the top level (the XML declaration).
    TopPi,
    /// In `</…>` at the top level (only the stream's end tag can be one).
    TopEnd,
    /// In `<!…>` at the top level.
    TopBang,
    /// In a start tag.
    StartTag,
    /// Character data inside an element.
    Content,
    /// After `<` inside an element.
    Lt,
    /// In an end tag.
    EndTag,
    /// After `<!` inside an element, having matched this much of `[CDATA[`.
    Bang(u8),
    /// After `<!-` inside an element.
    BangDash,
    CData,
    Comment,
    /// In `<?…?>` inside an element.
    Pi,
    /// In some other `<!…>` inside an element (a DTD construct).
    Decl,
}

/// What a byte completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    None,
    /// A top-level construct starts with this `<`.
    TopStart,
    /// Non-whitespace text at the top level.
    TopText,
    /// A top-level `<?…?>` ended.
    TopPiEnd,
    /// A top-level `<!…>` ended.
    TopBangEnd,
    /// A top-level end tag ended (`</stream:stream>` in the session's output).
    TopEndTag,
    /// The start tag of a top-level element ended.
    TopTag {
        self_closing: bool,
    },
    /// A top-level element ended with its end tag.
    TopDone,
    /// A comment, processing instruction or DTD construct begins (not allowed in XMPP).
    Restricted(&'static str),
}

/// Finds top-level element boundaries in a byte stream, byte by byte, keeping only a few bytes
/// of state: it tracks tags, quoted attribute values, `/>`, end tags, CDATA sections and
/// comments. It does not validate: inbound elements are checked by the real parser afterwards;
/// on well-formed input it finds exactly the boundaries the parser would, so a message the
/// scanner takes for one element can never reach the parser as two.
#[derive(Debug, Default)]
struct Scanner {
    state: State,
    depth: u32,
    /// The quote that opened the attribute value we are in, or 0.
    quote: u8,
    /// The previous byte of a tag outside quotes (to see `/>`), or of a PI.
    prev: u8,
    /// Consecutive `]` (in CDATA) or `-` (in a comment), at most 2.
    run: u8,
}

impl Scanner {
    /// The stream header opens no element: what follows it is top-level.
    fn reset(&mut self) {
        *self = Scanner::default();
    }

    fn step(&mut self, b: u8) -> Ev {
        match self.state {
            State::Between => match b {
                b'<' => {
                    self.state = State::TopLt;
                    Ev::TopStart
                }
                b if is_ws(b) => Ev::None,
                _ => Ev::TopText,
            },
            State::TopLt => match b {
                b'?' => {
                    self.state = State::TopPi;
                    self.prev = 0;
                    Ev::None
                }
                b'/' => {
                    self.state = State::TopEnd;
                    Ev::None
                }
                b'!' => {
                    self.state = State::TopBang;
                    Ev::Restricted("DTDs and comments are not allowed")
                }
                _ => self.tag_byte(b),
            },
            State::TopPi => {
                let end = b == b'>' && self.prev == b'?';
                self.prev = b;
                if end {
                    self.state = State::Between;
                    Ev::TopPiEnd
                } else {
                    Ev::None
                }
            }
            State::TopEnd => {
                if b == b'>' {
                    self.state = State::Between;
                    Ev::TopEndTag
                } else {
                    Ev::None
                }
            }
            State::TopBang => {
                if b == b'>' {
                    self.state = State::Between;
                    Ev::TopBangEnd
                } else {
                    Ev::None
                }
            }
            State::StartTag => self.tag_byte(b),
            State::Content => {
                if b == b'<' {
                    self.state = State::Lt;
                }
                Ev::None
            }
            State::Lt => match b {
                b'/' => {
                    self.state = State::EndTag;
                    Ev::None
                }
                b'!' => {
                    self.state = State::Bang(0);
                    Ev::None
                }
                b'?' => {
                    self.state = State::Pi;
                    self.prev = 0;
                    Ev::Restricted("processing instructions are not allowed")
                }
                _ => self.tag_byte(b),
            },
            State::EndTag => {
                if b != b'>' {
                    return Ev::None;
                }
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 0 {
                    self.state = State::Between;
                    Ev::TopDone
                } else {
                    self.state = State::Content;
                    Ev::None
                }
            }
            State::Bang(n) => {
                const CDATA: &[u8] = b"[CDATA[";
                if n == 0 && b == b'-' {
                    self.state = State::BangDash;
                    return Ev::None;
                }
                if CDATA.get(usize::from(n)) == Some(&b) {
                    self.run = 0;
                    self.state = if usize::from(n) + 1 == CDATA.len() {
                        State::CData
                    } else {
                        State::Bang(n + 1)
                    };
                    return Ev::None;
                }
                self.state = if b == b'>' {
                    State::Content
                } else {
                    State::Decl
                };
                Ev::Restricted("DTDs are not allowed")
            }
            State::BangDash => {
                self.run = 0;
                if b == b'-' {
                    self.state = State::Comment;
                    Ev::Restricted("comments are not allowed")
                } else {
                    self.state = if b == b'>' {
                        State::Content
                    } else {
                        State::Decl
                    };
                    Ev::Restricted("DTDs are not allowed")
                }
            }
            State::CData => {
                self.close_run(b, b']');
                Ev::None
            }
            State::Comment => {
                self.close_run(b, b'-');
                Ev::None
            }
            State::Pi => {
                if b == b'>' && self.prev == b'?' {
                    self.state = State::Content;
                }
                self.prev = b;
                Ev::None
            }
            State::Decl => {
                if b == b'>' {
                    self.state = State::Content;
                }
                Ev::None
            }
        }
    }

    /// `]]>` ends CDATA, `-->` a comment.
    fn close_run(&mut self, b: u8, mark: u8) {
        if b == mark {
            self.run = (self.run + 1).min(2);
        } else if b == b'>' && self.run == 2 {
            self.state = State::Content;
        } else {
            self.run = 0;
        }
    }

    /// A byte of a start tag (the first one is the name's first character).
    fn tag_byte(&mut self, b: u8) -> Ev {
        if self.state != State::StartTag {
            self.state = State::StartTag;
            self.quote = 0;
            self.prev = b;
            return Ev::None;
        }
        if self.quote != 0 {
            if b == self.quote {
                self.quote = 0;
                self.prev = b;
            }
            return Ev::None;
        }
        match b {
            b'\'' | b'"' => self.quote = b,
            b'>' => {
                let self_closing = self.prev == b'/';
                let top = self.depth == 0;
                if !self_closing {
                    self.depth = self.depth.saturating_add(1);
                }
                self.state = if self.depth == 0 {
                    State::Between
                } else {
                    State::Content
                };
                return if top {
                    Ev::TopTag { self_closing }
                } else {
                    Ev::None
                };
            }
            _ => {}
        }
        self.prev = b;
        Ev::None
    }
}

/// The qualified name of a start tag (`tag` starts with `<`).
fn qname(tag: &[u8]) -> &[u8] {
    let rest = tag.get(1..).unwrap_or_default();
    let n = rest
        .iter()
        .position(|&c| is_ws(c) || c == b'/' || c == b'>')
        .unwrap_or(rest.len());
    &rest[..n]
}

/// Calls `f(name, value, quote)` for each attribute of a complete start tag (`<name …>` or
/// `<name …/>`); values stay escaped as written, so they can be copied with their quote.
fn attributes<'a>(
    tag: &'a [u8],
    mut f: impl FnMut(&'a [u8], &'a [u8], u8),
) -> Result<(), FrameError> {
    const BAD: FrameError = FrameError::NotWellFormed("malformed attribute");
    let from = 1 + qname(tag).len();
    let mut s = tag
        .get(from..tag.len().saturating_sub(1))
        .unwrap_or_default();
    if let [rest @ .., b'/'] = s {
        s = rest;
    }
    let skip_ws = |mut i: usize| {
        while s.get(i).is_some_and(|&c| is_ws(c)) {
            i += 1;
        }
        i
    };
    let mut i = 0;
    loop {
        i = skip_ws(i);
        if i >= s.len() {
            return Ok(());
        }
        let start = i;
        while s.get(i).is_some_and(|&c| !is_ws(c) && c != b'=') {
            i += 1;
        }
        let name = &s[start..i];
        i = skip_ws(i);
        if name.is_empty() || s.get(i) != Some(&b'=') {
            return Err(BAD);
        }
        i = skip_ws(i + 1);
        let quote = match s.get(i) {
            Some(&q) if q == b'\'' || q == b'"' => q,
            _ => return Err(BAD),
        };
        let value_start = i + 1;
        let rest = s.get(value_start..).unwrap_or_default();
        let Some(len) = rest.iter().position(|&c| c == quote) else {
            return Err(BAD);
        };
        f(name, &rest[..len], quote);
        i = value_start + len + 1;
    }
}

/// The namespace a start tag puts its element in, when the tag itself declares it.
fn declared_ns(tag: &[u8]) -> Result<Option<&[u8]>, FrameError> {
    let name = qname(tag);
    let prefix = name.iter().position(|&c| c == b':').map(|i| &name[..i]);
    let mut ns = None;
    attributes(tag, |n, v, _| {
        let declares = match prefix {
            None => n == b"xmlns",
            Some(p) => n.strip_prefix(b"xmlns:") == Some(p),
        };
        if declares {
            ns = Some(v);
        }
    })?;
    Ok(ns)
}

fn local_name(name: &[u8]) -> &[u8] {
    match name.iter().position(|&c| c == b':') {
        Some(i) => &name[i + 1..],
        None => name,
    }
}

fn is_namespace_declaration(name: &[u8]) -> bool {
    name == b"xmlns" || name.starts_with(b"xmlns:")
}

/// Where the one element of an inbound message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Its first byte (`<`).
    pub start: usize,
    /// Just after its start tag.
    pub tag_end: usize,
    /// Just after the element.
    pub end: usize,
}

/// Checks that an inbound message is exactly one complete element (RFC 7395 §3.3.3), allowing
/// whitespace around it and an XML declaration before it. `None`: whitespace only (a
/// keep-alive, ignored).
pub fn scan_frame(frame: &[u8]) -> Result<Option<Span>, FrameError> {
    const ONE: FrameError =
        FrameError::NotWellFormed("a WebSocket message must carry exactly one element");
    let mut sc = Scanner::default();
    let mut construct = 0;
    let mut tag_end = None;
    let mut end = None;
    let mut declared = false;
    for (i, &b) in frame.iter().enumerate() {
        match sc.step(b) {
            Ev::None => {}
            Ev::TopStart => {
                if end.is_some() {
                    return Err(ONE);
                }
                construct = i;
            }
            Ev::TopText => return Err(FrameError::NotWellFormed("text outside of the element")),
            Ev::TopPiEnd => {
                let decl = frame.get(construct..).is_some_and(|d| {
                    d.starts_with(b"<?xml") && d.get(5).is_some_and(|&c| is_ws(c))
                });
                if declared || !decl {
                    return Err(FrameError::Restricted(
                        "processing instructions are not allowed",
                    ));
                }
                declared = true;
            }
            Ev::TopEndTag => {
                return Err(FrameError::NotWellFormed(
                    "an end tag without its start tag",
                ))
            }
            Ev::TopBangEnd => {}
            Ev::Restricted(why) => return Err(FrameError::Restricted(why)),
            Ev::TopTag { self_closing } => {
                tag_end = Some(i + 1);
                if self_closing {
                    end = Some(i + 1);
                }
            }
            Ev::TopDone => end = Some(i + 1),
        }
    }
    match (tag_end, end) {
        (Some(tag_end), Some(end)) => Ok(Some(Span {
            start: construct,
            tag_end,
            end,
        })),
        (None, None) if sc.state == State::Between => Ok(None),
        _ => Err(FrameError::NotWellFormed(
            "incomplete element: a WebSocket message must carry one complete element",
        )),
    }
}

/// What an inbound element is, as far as framing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `<open/>` in the framing namespace.
    Open,
    /// `<close/>` in the framing namespace.
    Close,
    /// An `open` element in another namespace.
    MisplacedOpen,
    Other,
}

fn kind(tag: &[u8]) -> Result<Kind, FrameError> {
    let local = local_name(qname(tag));
    if local != b"open" && local != b"close" {
        return Ok(Kind::Other);
    }
    let framing = declared_ns(tag)? == Some(NS_FRAMING.as_bytes());
    Ok(match (local == b"open", framing) {
        (true, true) => Kind::Open,
        (true, false) => Kind::MisplacedOpen,
        (false, true) => Kind::Close,
        (false, false) => Kind::Other,
    })
}

/// The `<stream:stream>` header the parser gets for an inbound `<open/>`: the same attributes
/// (`to`, `version`, `xml:lang`, …) copied as written, namespace declarations replaced.
fn stream_header_for(open_tag: &[u8]) -> Result<Bytes, FrameError> {
    let mut out = Vec::with_capacity(STREAM_HEADER.len() + open_tag.len());
    out.extend_from_slice(STREAM_HEADER);
    attributes(open_tag, |n, v, q| {
        if !is_namespace_declaration(n) {
            out.push(b' ');
            out.extend_from_slice(n);
            out.push(b'=');
            out.push(q);
            out.extend_from_slice(v);
            out.push(q);
        }
    })?;
    out.push(b'>');
    Ok(Bytes::from(out))
}

/// The `<open/>` the server sends when a stream error comes before it answered the client's
/// (RFC 7395 §3.5: the open response first, then the error).
fn synthetic_open(domain: &str) -> String {
    format!(
        "<open xmlns='{NS_FRAMING}' from='{}' id='{}' version='1.0' xml:lang='en'/>",
        escape(domain),
        uuid::Uuid::new_v4().simple()
    )
}

fn stream_error_frame(condition: &str, text: &str) -> String {
    format!(
        "<stream:error xmlns:stream='{NS_STREAMS}'><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>{}</text></stream:error>",
        escape(text)
    )
}

// ------------------------------------------------------------------ outbound framing

/// Where the framer puts what it cuts: the payload of one text message, given in parts (so a
/// namespace declaration is inserted without copying the element first).
pub trait FrameSink {
    fn text(&mut self, parts: &[&[u8]]);
}

/// A top-level start tag of the session's output, as the framer sees it.
enum Top {
    /// The stream header, as the `<open/>` to send.
    Header(Vec<u8>),
    Element {
        /// Namespace declaration to insert after the element's name.
        insert: &'static [u8],
        /// SASL `<success/>`: the client opens a new stream next.
        success: bool,
        stream_error: bool,
    },
}

fn top_element(tag: &[u8]) -> Result<Top, OutboundError> {
    let name = qname(tag);
    if name == b"stream:stream" {
        // the stream header becomes <open/> with the same attributes (from, id, version, …)
        let mut open = Vec::with_capacity(tag.len());
        open.extend_from_slice(b"<open xmlns='");
        open.extend_from_slice(NS_FRAMING.as_bytes());
        open.push(b'\'');
        attributes(tag, |n, v, q| {
            if !is_namespace_declaration(n) {
                open.push(b' ');
                open.extend_from_slice(n);
                open.push(b'=');
                open.push(q);
                open.extend_from_slice(v);
                open.push(q);
            }
        })
        .map_err(|_| OutboundError::Tag)?;
        open.extend_from_slice(b"/>");
        return Ok(Top::Header(open));
    }
    let mut default_ns: Option<&[u8]> = None;
    let mut declares_stream = false;
    attributes(tag, |n, v, _| {
        if n == b"xmlns" {
            default_ns = Some(v);
        }
        declares_stream |= n == b"xmlns:stream";
    })
    .map_err(|_| OutboundError::Tag)?;
    let insert: &'static [u8] = if name.starts_with(b"stream:") {
        if declares_stream {
            b""
        } else {
            b" xmlns:stream='http://etherx.jabber.org/streams'"
        }
    } else if default_ns.is_none() && !name.contains(&b':') {
        b" xmlns='jabber:client'"
    } else {
        b""
    };
    Ok(Top::Element {
        insert,
        success: name == b"success" && default_ns == Some(NS_SASL.as_bytes()),
        stream_error: name == b"stream:error",
    })
}

/// Cuts the session's output into top-level elements and rewrites RFC 6120 stream framing into
/// RFC 7395's, one WebSocket text message per element. The session's output is well-formed
/// (it escapes everything it writes); an element may span writes, a write may hold several.
/// An element within one write goes out straight from that write; only one split across
/// writes is collected, and between elements nothing is held but a few bytes of state.
#[derive(Debug, Default)]
pub struct Framer {
    sc: Scanner,
    /// The bytes so far of a top-level construct that began in an earlier write.
    elem: Vec<u8>,
    /// A top-level construct is in progress.
    active: bool,
    /// It began in an earlier write: its bytes so far are in `elem`.
    spanning: bool,
    /// Namespace declaration to insert into the current element, and where.
    insert: &'static [u8],
    insert_at: usize,
    /// An `<open/>` answered the client's current stream.
    opened: bool,
    /// `<close/>` was sent: nothing more may follow.
    closed: bool,
    /// A SASL `<success/>` went out: the client must open a new stream next.
    restart: bool,
}

impl Framer {
    /// Frames `input` into `out`. `domain` names the server in an `<open/>` the framer has to
    /// add before a stream error.
    pub fn feed(
        &mut self,
        input: &[u8],
        domain: &str,
        out: &mut impl FrameSink,
    ) -> Result<(), OutboundError> {
        // where the current construct starts in `input` (unless spanning), and how much of
        // `input` is already in `elem` (when spanning)
        let mut start = 0;
        let mut copied = 0;
        for (i, &b) in input.iter().enumerate() {
            if self.closed {
                return Ok(());
            }
            match self.sc.step(b) {
                Ev::TopStart => {
                    self.active = true;
                    self.spanning = false;
                    start = i;
                }
                Ev::TopText => return Err(OutboundError::TextOutsideElements),
                // the XML declaration: RFC 7395 messages go without
                Ev::TopPiEnd | Ev::TopBangEnd => self.reset_construct(),
                Ev::TopEndTag => {
                    self.reset_construct();
                    out.text(&[CLOSE.as_bytes()]);
                    self.closed = true;
                }
                Ev::TopTag { self_closing } => {
                    if self.spanning {
                        self.elem.extend_from_slice(&input[copied..=i]);
                        copied = i + 1;
                    }
                    let tag = if self.spanning {
                        &self.elem[..]
                    } else {
                        &input[start..=i]
                    };
                    let name_len = qname(tag).len();
                    match top_element(tag)? {
                        Top::Header(open) => {
                            out.text(&[&open]);
                            self.reset_construct();
                            // its children are the stream's top-level elements
                            self.sc.reset();
                            self.opened = true;
                        }
                        Top::Element {
                            insert,
                            success,
                            stream_error,
                        } => {
                            if stream_error && !self.opened {
                                out.text(&[synthetic_open(domain).as_bytes()]);
                                self.opened = true;
                            }
                            if success {
                                // the client's next <open/> starts a stream we answer anew
                                self.restart = true;
                                self.opened = false;
                            }
                            self.insert = insert;
                            self.insert_at = 1 + name_len;
                            if self_closing {
                                self.emit(input, start, &mut copied, i, out);
                            }
                        }
                    }
                }
                Ev::TopDone => self.emit(input, start, &mut copied, i, out),
                Ev::None | Ev::Restricted(_) => {}
            }
        }
        if self.active && !self.closed {
            if self.spanning {
                self.elem.extend_from_slice(&input[copied..]);
            } else {
                self.elem.clear();
                self.elem.extend_from_slice(&input[start..]);
                self.spanning = true;
            }
        }
        Ok(())
    }

    /// Whether `<close/>` was sent.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Whether a SASL success went out since the last call (the client opens a new stream).
    pub fn take_restart(&mut self) -> bool {
        std::mem::take(&mut self.restart)
    }

    /// The current element ended at `input[i]`: send it.
    fn emit(
        &mut self,
        input: &[u8],
        start: usize,
        copied: &mut usize,
        i: usize,
        out: &mut impl FrameSink,
    ) {
        if self.spanning {
            self.elem.extend_from_slice(&input[*copied..=i]);
            *copied = i + 1;
        }
        let whole = if self.spanning {
            &self.elem[..]
        } else {
            &input[start..=i]
        };
        let at = self.insert_at.min(whole.len());
        out.text(&[&whole[..at], self.insert, &whole[at..]]);
        self.reset_construct();
    }

    fn reset_construct(&mut self) {
        self.active = false;
        self.spanning = false;
        self.insert = b"";
        self.elem.clear();
        if self.elem.capacity() > KEEP {
            self.elem = Vec::new();
        }
    }
}

// ------------------------------------------------------------------ RFC 6455 frames

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
/// Close codes (RFC 6455 §7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL: u16 = 1002;
/// Output not taken by the socket beyond which reading waits (pongs of a client that pings
/// without reading must not pile up).
const MAX_BACKLOG: usize = 64 * 1024;

/// Appends one unmasked (server) frame whose payload is `parts`, concatenated.
fn put_frame(out: &mut Vec<u8>, opcode: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(len + 10);
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(n) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Text messages into a connection's output.
struct TextFrames<'a>(&'a mut Vec<u8>);

impl FrameSink for TextFrames<'_> {
    fn text(&mut self, parts: &[&[u8]]) {
        put_frame(self.0, OP_TEXT, parts);
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    fin: bool,
    opcode: u8,
    len: usize,
    mask: [u8; 4],
    /// Bytes of the header itself.
    size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Protocol(&'static str),
    TooBig,
}

/// Parses a client frame header at the start of `b` (`None`: not all of it arrived yet).
/// Sizes are checked here, before any of the payload is buffered.
fn parse_head(b: &[u8], limit: usize) -> Result<Option<Head>, Fault> {
    let (Some(&b0), Some(&b1)) = (b.first(), b.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(Fault::Protocol(
            "reserved bits set: no extension was negotiated",
        ));
    }
    if b1 & 0x80 == 0 {
        return Err(Fault::Protocol("client frames must be masked"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let (len, at) = match b1 & 0x7F {
        126 => match b.get(2..4) {
            Some(&[x, y]) => (u64::from(u16::from_be_bytes([x, y])), 4),
            _ => return Ok(None),
        },
        127 => match b.get(2..10).and_then(|x| <[u8; 8]>::try_from(x).ok()) {
            Some(x) => (u64::from_be_bytes(x), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let Some(&[m0, m1, m2, m3]) = b.get(at..at + 4) else {
        return Ok(None);
    };
    match opcode {
        OP_CLOSE | OP_PING | OP_PONG if !fin || len > 125 => {
            return Err(Fault::Protocol(
                "control frames must be unfragmented and at most 125 bytes",
            ))
        }
        OP_CLOSE | OP_PING | OP_PONG => {}
        OP_CONT | OP_TEXT | OP_BINARY if len > limit as u64 => return Err(Fault::TooBig),
        OP_CONT | OP_TEXT | OP_BINARY => {}
        _ => return Err(Fault::Protocol("unknown opcode")),
    }
    Ok(Some(Head {
        fin,
        opcode,
        len: len as usize,
        mask: [m0, m1, m2, m3],
        size: at + 4,
    }))
}

/// What the client sent, message by message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Received {
    /// A complete text message (UTF-8 checked).
    Text(Bytes),
    Binary,
    BadUtf8,
    TooBig,
    Protocol(&'static str),
    /// The client sent Close (answered) or the connection ended.
    End,
}

/// The RFC 6455 side of one connection (server role, no extensions).
pub struct Conn<S> {
    io: S,
    /// Received bytes not decoded yet: at most one frame and the start of the next. Between
    /// frames it is empty and holds no heap.
    raw: Vec<u8>,
    /// The data message being assembled from fragments, and its opcode.
    msg: Vec<u8>,
    msg_op: Option<u8>,
    /// Frames the socket has not taken yet (no heap once it took them).
    out: Vec<u8>,
    out_pos: usize,
    /// Largest message (and frame) accepted: one stanza.
    limit: usize,
    close_sent: bool,
    peer_closed: bool,
    /// The input cannot be trusted any more (oversized or broken frames): close without
    /// waiting for the client.
    broken: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// A connection past the upgrade; `early` is what the client sent after its request.
    pub fn new(io: S, early: Vec<u8>, limit: usize) -> Self {
        Conn {
            io,
            raw: early,
            msg: Vec::new(),
            msg_op: None,
            out: Vec::new(),
            out_pos: 0,
            limit,
            close_sent: false,
            peer_closed: false,
            broken: false,
        }
    }

    fn send_close(&mut self, code: u16) {
        if !self.close_sent {
            put_frame(&mut self.out, OP_CLOSE, &[&code.to_be_bytes()]);
            self.close_sent = true;
        }
    }

    /// Writes what is pending; frees the output buffer once the socket took it all.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out = Vec::new();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_out(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// The next message (pings are answered on the way).
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Received>> {
        loop {
            if self.peer_closed || self.broken {
                return Poll::Ready(Ok(Received::End));
            }
            let got = self.decode();
            // pongs and Close replies that decoding queued go out now, before we wait for
            // more input, as far as the socket takes them
            if self.out_pos < self.out.len() {
                match self.poll_flush_all(cx) {
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending
                        if got.is_none() && self.out.len() - self.out_pos > MAX_BACKLOG =>
                    {
                        return Poll::Pending
                    }
                    _ => {}
                }
            }
            if let Some(r) = got {
                return Poll::Ready(Ok(r));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                self.peer_closed = true;
                return Poll::Ready(Ok(Received::End));
            }
            self.raw.extend_from_slice(rb.filled());
        }
    }

    /// Decodes the complete frames in `raw` until one finishes a message (`None`: more bytes
    /// are needed).
    fn decode(&mut self) -> Option<Received> {
        loop {
            let head = match parse_head(&self.raw, self.limit) {
                Ok(Some(h)) => h,
                Ok(None) => return None,
                Err(f) => return Some(self.fault(f)),
            };
            let data = matches!(head.opcode, OP_CONT | OP_TEXT | OP_BINARY);
            if data && self.msg.len() + head.len > self.limit {
                return Some(self.fault(Fault::TooBig));
            }
            let total = head.size + head.len;
            if self.raw.len() < total {
                self.raw.reserve(total - self.raw.len());
                return None;
            }
            let payload = &mut self.raw[head.size..total];
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= head.mask[i % 4];
            }
            let payload = &self.raw[head.size..total];
            let got = match (head.opcode, self.msg_op) {
                (OP_PING, _) => {
                    put_frame(&mut self.out, OP_PONG, &[payload]);
                    None
                }
                (OP_PONG, _) => None,
                (OP_CLOSE, _) => {
                    self.peer_closed = true;
                    // echo the status code (RFC 6455 §5.5.1)
                    let code = payload.get(..2).unwrap_or_default();
                    if !self.close_sent {
                        put_frame(&mut self.out, OP_CLOSE, &[code]);
                        self.close_sent = true;
                    }
                    Some(Received::End)
                }
                (OP_TEXT | OP_BINARY, Some(_)) => Some(self.fault(Fault::Protocol(
                    "a new message began before the previous one ended",
                ))),
                (OP_CONT, None) => Some(self.fault(Fault::Protocol(
                    "a continuation frame without a message to continue",
                ))),
                (op, pending) => {
                    let op = pending.unwrap_or(op);
                    if head.fin && self.msg.is_empty() {
                        Some(complete(op, Bytes::copy_from_slice(payload)))
                    } else {
                        self.msg.extend_from_slice(payload);
                        if head.fin {
                            self.msg_op = None;
                            Some(complete(op, Bytes::from(std::mem::take(&mut self.msg))))
                        } else {
                            self.msg_op = Some(op);
                            None
                        }
                    }
                }
            };
            if self.broken {
                return got;
            }
            // drop the frame's bytes; nothing kept when nothing follows
            if self.raw.len() == total {
                self.raw = Vec::new();
            } else {
                self.raw.drain(..total);
            }
            if got.is_some() {
                return got;
            }
        }
    }

    fn fault(&mut self, f: Fault) -> Received {
        self.broken = true;
        self.raw = Vec::new();
        self.msg = Vec::new();
        match f {
            Fault::TooBig => Received::TooBig,
            Fault::Protocol(why) => {
                self.send_close(CLOSE_PROTOCOL);
                Received::Protocol(why)
            }
        }
    }

    /// Closes the XMPP stream if nobody did, then the WebSocket (RFC 7395 §3.6, RFC 6455
    /// §7.1.1: Close, wait for the client's Close, then end the TLS connection and wait for
    /// the client to end it too). Bounded by [`CLOSE_GRACE`].
    pub async fn finish(mut self, xmpp_closed: bool) {
        let work = async {
            if !xmpp_closed && !self.close_sent && !self.broken {
                TextFrames(&mut self.out).text(&[CLOSE.as_bytes()]);
            }
            self.send_close(CLOSE_NORMAL);
            if std::future::poll_fn(|cx| self.poll_flush_all(cx))
                .await
                .is_ok()
            {
                while !self.peer_closed && !self.broken {
                    match std::future::poll_fn(|cx| self.poll_recv(cx)).await {
                        Ok(Received::Text(_) | Received::Binary | Received::BadUtf8) => {}
                        _ => break,
                    }
                }
            }
            let _ = self.io.shutdown().await;
            // lingering close: read what the client still sends until it closes too, so that
            // unread bytes do not make the kernel reset the connection (which can drop the
            // last frames, the stream error among them, before the client read them)
            let mut sink = [0u8; 1024];
            while let Ok(n) = self.io.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, work).await;
    }
}

fn complete(opcode: u8, payload: Bytes) -> Received {
    if opcode == OP_BINARY {
        Received::Binary
    } else if std::str::from_utf8(&payload).is_err() {
        Received::BadUtf8
    } else {
        Received::Text(payload)
    }
}

// ------------------------------------------------------------------ the byte stream adapter

#[derive(Debug)]
enum Input {
    Open,
    /// The client closed the stream: end of input once `inbuf` is read.
    Ended,
    /// A framing violation was answered, or the WebSocket failed.
    Failed(String),
}

/// What the session left of a connection, to close it properly.
pub struct Leftover<S> {
    conn: Conn<S>,
    xmpp_closed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Leftover<S> {
    /// See [`Conn::finish`].
    pub async fn finish(self) {
        self.conn.finish(self.xmpp_closed).await
    }
}

/// A WebSocket connection as the byte stream the session logic expects (see the module docs).
pub struct WsStream<S: AsyncRead + AsyncWrite + Unpin> {
    /// `None` only once dropped.
    conn: Option<Conn<S>>,
    domain: Arc<str>,
    framer: Framer,
    /// Inbound bytes not yet read by the parser: the rest of one message.
    inbuf: Bytes,
    input: Input,
    /// The next inbound element must be `<open/>`: at the start, and after SASL success.
    expect_open: bool,
    /// Where the connection goes when the session drops it.
    done: Option<oneshot::Sender<Leftover<S>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Wraps an upgraded connection; `done` receives it back when the session drops it.
    pub fn new(
        conn: Conn<S>,
        domain: Arc<str>,
        done: Option<oneshot::Sender<Leftover<S>>>,
    ) -> Self {
        WsStream {
            conn: Some(conn),
            domain,
            framer: Framer::default(),
            inbuf: Bytes::new(),
            input: Input::Open,
            expect_open: true,
            done,
        }
    }

    /// Answers a framing violation: `<open/>` if none was sent for this stream, the stream
    /// error, `<close/>`; the session then sees its input fail and ends (the output goes out
    /// when it drops the connection, see [`Leftover::finish`]).
    fn violation(&mut self, condition: &'static str, text: &str) {
        if let Some(conn) = self.conn.as_mut() {
            if !self.framer.closed && !conn.close_sent {
                let mut out = TextFrames(&mut conn.out);
                if !self.framer.opened {
                    out.text(&[synthetic_open(&self.domain).as_bytes()]);
                    self.framer.opened = true;
                }
                out.text(&[stream_error_frame(condition, text).as_bytes()]);
                out.text(&[CLOSE.as_bytes()]);
                self.framer.closed = true;
            }
        }
        self.input = Input::Failed(format!("stream error {condition}: {text}"));
    }

    fn on_text(&mut self, frame: Bytes) {
        let span = match scan_frame(&frame) {
            Ok(Some(span)) => span,
            Ok(None) => return,
            Err(e) => return self.violation(e.condition(), &e.to_string()),
        };
        let tag = &frame[span.start..span.tag_end];
        let kind = match kind(tag) {
            Ok(k) => k,
            Err(e) => return self.violation(e.condition(), &e.to_string()),
        };
        match (kind, self.expect_open) {
            (Kind::Open, true) => match stream_header_for(tag) {
                Ok(header) => {
                    self.inbuf = header;
                    self.expect_open = false;
                }
                Err(e) => self.violation(e.condition(), &e.to_string()),
            },
            (Kind::Open, false) => self.violation(
                "invalid-xml",
                "<open/> only starts a stream (and restarts it after authentication)",
            ),
            (Kind::MisplacedOpen, true) => self.violation(
                "invalid-namespace",
                "<open/> must be in the urn:ietf:params:xml:ns:xmpp-framing namespace",
            ),
            (Kind::Other, true) => self.violation(
                "invalid-xml",
                "the stream must start with <open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>",
            ),
            // no stream is open for the parser, so nothing to end there; the client's
            // <close/> is answered when the connection closes
            (Kind::Close, true) => self.input = Input::Ended,
            (Kind::Close, false) => {
                self.inbuf = Bytes::from_static(STREAM_END);
                self.input = Input::Ended;
            }
            (Kind::MisplacedOpen | Kind::Other, false) => {
                self.inbuf = frame.slice(span.start..span.end);
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.inbuf.is_empty() {
                let n = this.inbuf.len().min(buf.remaining());
                buf.put_slice(&this.inbuf[..n]);
                this.inbuf.advance(n);
                if this.inbuf.is_empty() {
                    // an empty slice would still hold the whole message's buffer
                    this.inbuf = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            match &this.input {
                Input::Open => {}
                Input::Ended => return Poll::Ready(Ok(())),
                Input::Failed(why) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        why.clone(),
                    )))
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let limit = conn.limit;
            match ready!(conn.poll_recv(cx))? {
                Received::Text(t) => this.on_text(t),
                Received::Binary => this.violation(
                    "unsupported-encoding",
                    "XMPP over WebSocket uses text messages only",
                ),
                Received::BadUtf8 => {
                    this.violation("unsupported-encoding", "text messages must be UTF-8")
                }
                Received::TooBig => this.violation(
                    "policy-violation",
                    &format!("a WebSocket message may carry at most {limit} bytes"),
                ),
                Received::Protocol(why) => {
                    this.input = Input::Failed(format!("WebSocket protocol violation: {why}"))
                }
                Received::End => this.input = Input::Ended,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "the XMPP stream is closed");
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(Err(closed()));
        };
        if this.framer.closed || conn.close_sent {
            return Poll::Ready(Err(closed()));
        }
        // what an earlier write framed goes first, which bounds what we hold
        ready!(conn.poll_write_out(cx))?;
        this.framer
            .feed(data, &this.domain, &mut TextFrames(&mut conn.out))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if this.framer.take_restart() {
            this.expect_open = true;
        }
        // start sending now; what the socket does not take goes with the next write or flush
        if let Poll::Ready(Err(e)) = conn.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().conn.as_mut() {
            Some(conn) => conn.poll_flush_all(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Flushes only: the WebSocket close handshake runs in [`Leftover::finish`] once the
    /// session is over, so that it also happens when the session ends without shutting down.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Drop for WsStream<S> {
    fn drop(&mut self) {
        if let (Some(conn), Some(done)) = (self.conn.take(), self.done.take()) {
            let _ = done.send(Leftover {
                conn,
                xmpp_closed: self.framer.closed,
            });
        }
    }
}

// ------------------------------------------------------------------ upgrade and listener

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

fn header_values<'r, 'b: 'r>(
    headers: &'r [httparse::Header<'b>],
    name: &'static str,
) -> impl Iterator<Item = &'b str> + 'r {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
}

fn has_token(headers: &[httparse::Header<'_>], name: &'static str, token: &str) -> bool {
    header_values(headers, name)
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks an upgrade request (RFC 6455 §4.2.1, RFC 7395 §3.1): a GET of [`PATH`] asking for
/// WebSocket version 13 with the `xmpp` subprotocol. Returns the `Sec-WebSocket-Accept` value,
/// or the HTTP status and text to refuse with.
fn answer_upgrade(req: &httparse::Request<'_, '_>) -> Result<String, (u16, &'static str)> {
    if req.method != Some("GET") {
        return Err((405, "only GET upgrades to a WebSocket\n"));
    }
    if req.version != Some(1) {
        return Err((400, "HTTP/1.1 is required\n"));
    }
    let path = req.path.unwrap_or("");
    if path.split('?').next() != Some(PATH) {
        return Err((404, "XMPP over WebSocket is served on /xmpp-websocket\n"));
    }
    let headers = &*req.headers;
    if !has_token(headers, "upgrade", "websocket") || !has_token(headers, "connection", "upgrade") {
        return Err((426, "a WebSocket upgrade is expected here\n"));
    }
    if !header_values(headers, "sec-websocket-version").any(|v| v.trim() == "13") {
        return Err((426, "WebSocket version 13 is required\n"));
    }
    let key = header_values(headers, "sec-websocket-key")
        .next()
        .map(str::trim)
        .unwrap_or("");
    let decoded = base64::engine::general_purpose::STANDARD.decode(key);
    if !matches!(decoded, Ok(k) if k.len() == 16) {
        return Err((400, "missing or malformed Sec-WebSocket-Key\n"));
    }
    let xmpp = header_values(headers, "sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if !xmpp {
        return Err((
            400,
            "the WebSocket subprotocol \"xmpp\" (RFC 7395) is required\n",
        ));
    }
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID);
    Ok(base64::engine::general_purpose::STANDARD.encode(sha.finalize()))
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

/// Reads the HTTP upgrade request (at most [`MAX_REQUEST`] bytes) and answers it. Returns what
/// the client sent after the request (normally nothing).
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> Result<Vec<u8>, WsError> {
    let mut buf = Vec::with_capacity(1024);
    let (head_len, answer) = loop {
        let mut chunk = [0u8; 1024];
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| WsError::Handshake(e.to_string()))?;
        if n == 0 {
            return Err(WsError::Handshake(
                "connection closed before the upgrade request was complete".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => break (len, answer_upgrade(&req)),
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => continue,
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                break (0, Err((431, "the upgrade request is too large\n")))
            }
            Err(_) => break (0, Err((400, "malformed HTTP request\n"))),
        }
    };
    let io_err = |e: io::Error| WsError::Handshake(e.to_string());
    match answer {
        Ok(accept) => {
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
            );
            io.write_all(response.as_bytes()).await.map_err(io_err)?;
            io.flush().await.map_err(io_err)?;
            Ok(buf.split_off(head_len))
        }
        Err((status, text)) => {
            let extra = if status == 426 {
                "Sec-WebSocket-Version: 13\r\n"
            } else {
                ""
            };
            let response = format!(
                "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{text}",
                reason(status),
                text.len()
            );
            let _ = io.write_all(response.as_bytes()).await;
            let _ = io.shutdown().await;
            Err(WsError::Refused(status, text.trim_end()))
        }
    }
}

/// What the WebSocket accept loop keeps between connections.
pub(crate) struct WsListener {
    domain: Arc<str>,
    /// The edge's TLS config and the one derived from it with our ALPN, re-derived when a
    /// certificate reload replaces the former.
    tls: Option<(Arc<ServerConfig>, Arc<ServerConfig>)>,
}

impl WsListener {
    pub(crate) fn new(domain: &str) -> Self {
        WsListener {
            domain: Arc::from(domain),
            tls: None,
        }
    }

    /// The edge's reloadable TLS config with [`ALPN`] instead of `xmpp-client`.
    pub(crate) fn tls_config(&mut self, base: Arc<ServerConfig>) -> Arc<ServerConfig> {
        if let Some((b, derived)) = &self.tls {
            if Arc::ptr_eq(b, &base) {
                return derived.clone();
            }
        }
        let mut cfg = (*base).clone();
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        let derived = Arc::new(cfg);
        self.tls = Some((base, derived.clone()));
        derived
    }

    pub(crate) fn domain(&self) -> Arc<str> {
        self.domain.clone()
    }
}

/// Serves one connection of the WebSocket listener: TLS, the upgrade, the session, the close.
pub(crate) async fn serve(
    edge: Arc<Edge>,
    tcp: TcpStream,
    peer: IpAddr,
    tls: Arc<ServerConfig>,
    domain: Arc<str>,
) -> Result<(), WsError> {
    let limit = edge.settings.max_stanza_bytes;
    let (done, back) = oneshot::channel();
    let session = {
        let handshake = async {
            let mut tls = tokio_rustls::TlsAcceptor::from(tls)
                .accept(tcp)
                .await
                .map_err(|e| WsError::Tls(e.to_string()))?;
            let early = upgrade(&mut tls).await?;
            Ok::<_, WsError>(Conn::new(tls, early, limit))
        };
        // boxed: the handshake's state is large and needed only for a moment (see
        // session::serve_tls); the connection moves into the session inside the block, so no room
        // for it stays in this (long-lived) future
        let conn = tokio::time::timeout(edge.settings.handshake_timeout(), Box::pin(handshake))
            .await
            .map_err(|_| WsError::Timeout)??;
        session::serve_tls(edge, WsStream::new(conn, domain, Some(done)), peer)
    };
    let res = session.await;
    // the session dropped its halves: close the WebSocket properly (boxed, for the same reason
    // as the handshake: the connection handed back must not size this future)
    let closing = match tokio::time::timeout(CLOSE_GRACE, back).await {
        Ok(Ok(left)) => Some(Box::pin(left.finish())),
        _ => None,
    };
    if let Some(closing) = closing {
        closing.await;
    }
    res.map_err(WsError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::{Limits, StanzaReader, XmlEvent};
    use futures::{SinkExt, StreamExt};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    const DOMAIN: &str = "pushgate.test";

    impl FrameSink for Vec<String> {
        fn text(&mut self, parts: &[&[u8]]) {
            self.push(String::from_utf8_lossy(&parts.concat()).into_owned());
        }
    }

    fn frames(chunks: &[&str]) -> (Vec<String>, Framer) {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c.as_bytes(), DOMAIN, &mut out).expect("frames");
        }
        (out, f)
    }

    #[test]
    fn the_stream_header_becomes_open_and_features_declare_their_prefix() {
        let (out, f) = frames(&[
            "<?xml version='1.0'?><stream:stream from='pushgate.test' id='abc' version='1.0' xml:lang='en' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
            "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>PLAIN</mechanism></mechanisms></stream:features>",
        ]);
        assert_eq!(
            out,
            [
                "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' from='pushgate.test' id='abc' version='1.0' xml:lang='en'/>",
                "<stream:features xmlns:stream='http://etherx.jabber.org/streams'><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-256</mechanism><mechanism>PLAIN</mechanism></mechanisms></stream:features>",
            ]
        );
        assert!(f.opened && !f.closed());
        assert!(f.elem.capacity() == 0, "nothing held between elements");
    }

    #[test]
    fn several_elements_in_one_write_become_one_message_each() {
        let (out, _) = frames(&[
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' id='x'>",
            "<iq type='result' id='1'/><a xmlns='urn:xmpp:sm:3' h='1'/>\n<message id='m' to='a@b/c'><body>x &lt;y/&gt; 'q' \"z\"</body><request xmlns='urn:xmpp:receipts'/></message>",
        ]);
        assert_eq!(
            out[1..],
            [
                "<iq xmlns='jabber:client' type='result' id='1'/>",
                "<a xmlns='urn:xmpp:sm:3' h='1'/>",
                "<message xmlns='jabber:client' id='m' to='a@b/c'><body>x &lt;y/&gt; 'q' \"z\"</body><request xmlns='urn:xmpp:receipts'/></message>",
            ]
        );
    }

    #[test]
    fn an_element_may_span_writes() {
        let whole = "<message id='1' data-x=\"a>b/>c\"><body>one</body><message><x/></message><![CDATA[ </message> <b/> ]]]><y a='/>'/></message>";
        let want = whole.replacen("<message", "<message xmlns='jabber:client'", 1);
        for cut in 1..whole.len() {
            let (a, b) = whole.split_at(cut);
            for c in 0..=b.len() {
                let (b1, b2) = b.split_at(c);
                let (out, f) = frames(&[
                    "<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
                    a,
                    b1,
                    b2,
                    "<r/>",
                ]);
                assert_eq!(out.len(), 3, "cut at {cut}/{c}: {out:?}");
                assert_eq!(out[1], want, "cut at {cut}/{c}");
                assert_eq!(out[2], "<r xmlns='jabber:client'/>");
                assert!(!f.active && f.elem.capacity() <= KEEP);
            }
        }
    }

    #[test]
    fn the_stream_end_becomes_close_and_nothing_follows() {
        let (out, f) = frames(&[
            "<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
            "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>replaced</text></stream:error></stream:stream><iq/>",
        ]);
        assert_eq!(
            out[1..],
            [
                "<stream:error xmlns:stream='http://etherx.jabber.org/streams'><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>replaced</text></stream:error>",
                CLOSE,
            ]
        );
        assert!(f.closed());
    }

    #[test]
    fn a_stream_error_before_any_header_gets_an_open_first() {
        let (out, _) = frames(&["<stream:error><connection-timeout xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>"]);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out[0].starts_with(
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' from='pushgate.test' id='"
        ));
        assert!(out[1].starts_with("<stream:error xmlns:stream="));
        assert_eq!(out[2], CLOSE);
    }

    #[test]
    fn sasl_success_asks_for_a_new_open() {
        let (out, mut f) = frames(&[
            "<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
            "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>dj1x</success>",
        ]);
        assert_eq!(
            out[1],
            "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>dj1x</success>"
        );
        assert!(f.take_restart());
        assert!(!f.take_restart());
        assert!(!f.opened, "the restarted stream is answered anew");
        let mut again = Vec::new();
        f.feed(
            b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' id='2'>",
            DOMAIN,
            &mut again,
        )
        .expect("feeds");
        assert!(f.opened && again.len() == 1);
    }

    #[test]
    fn text_between_elements_is_refused() {
        let mut f = Framer::default();
        let mut out = Vec::new();
        assert_eq!(
            f.feed(b"<a/>oops", DOMAIN, &mut out),
            Err(OutboundError::TextOutsideElements)
        );
    }

    #[test]
    fn inbound_messages_must_be_one_element() {
        let one = |s: &str| scan_frame(s.as_bytes());
        let span = one("  <message to='x'><body>a</body></message>\n")
            .expect("one element")
            .expect("not blank");
        assert_eq!((span.start, span.tag_end, span.end), (2, 18, 42));
        assert!(
            one("<?xml version='1.0'?><open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>")
                .is_ok_and(|s| s.is_some())
        );
        assert_eq!(one(" \r\n"), Ok(None));
        assert_eq!(one(""), Ok(None));
        assert!(
            one("<message><body><![CDATA[</message><x/>]]></body></message>")
                .is_ok_and(|s| s.is_some())
        );
        assert!(one("<iq a='>' b=\"/>\"/>").is_ok_and(|s| s.is_some()));
        for (bad, cond) in [
            ("<message/><message/>", "not-well-formed"),
            ("<message/> <iq/>", "not-well-formed"),
            ("<message>", "not-well-formed"),
            ("<message><body>x</body>", "not-well-formed"),
            ("<message/>x", "not-well-formed"),
            ("x<message/>", "not-well-formed"),
            ("</stream:stream>", "not-well-formed"),
            ("<message/><?xml version='1.0'?>", "not-well-formed"),
            ("<?pi x?><message/>", "restricted-xml"),
            (
                "<?xml version='1.0'?><?xml version='1.0'?><message/>",
                "restricted-xml",
            ),
            ("<!-- hi --><message/>", "restricted-xml"),
            ("<!DOCTYPE x><message/>", "restricted-xml"),
            ("<message><!-- hi --></message>", "restricted-xml"),
            ("<message><?pi?></message>", "restricted-xml"),
            ("<message><!ENTITY x 'y'></message>", "restricted-xml"),
        ] {
            assert_eq!(one(bad).map_err(|e| e.condition()), Err(cond), "{bad}");
        }
    }

    #[test]
    fn open_and_close_are_recognised_by_namespace() {
        let k = |s: &str| kind(s.as_bytes());
        assert_eq!(
            k("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='x'/>"),
            Ok(Kind::Open)
        );
        assert_eq!(
            k("<f:open xmlns:f=\"urn:ietf:params:xml:ns:xmpp-framing\"/>"),
            Ok(Kind::Open)
        );
        assert_eq!(k("<open to='x'/>"), Ok(Kind::MisplacedOpen));
        assert_eq!(
            k("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing' />"),
            Ok(Kind::Close)
        );
        assert_eq!(k("<close/>"), Ok(Kind::Other));
        assert_eq!(k("<message>"), Ok(Kind::Other));
        assert_eq!(
            k("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to=x/>")
                .map_err(|e| e.condition()),
            Err("not-well-formed")
        );
    }

    #[test]
    fn open_becomes_a_stream_header_with_the_same_attributes() {
        let h = stream_header_for(
            b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to=\"it's.test\" version='1.0' xml:lang='de'/>",
        )
        .expect("header");
        assert_eq!(
            &h[..],
            &b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to=\"it's.test\" version='1.0' xml:lang='de'>"[..]
        );
    }

    // ---- RFC 6455 frames, sent raw by the test as a client would

    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn conn(limit: usize) -> (Conn<DuplexStream>, DuplexStream) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        (Conn::new(a, Vec::new(), limit), b)
    }

    async fn recv(c: &mut Conn<DuplexStream>) -> Received {
        let next = std::future::poll_fn(|cx| c.poll_recv(cx));
        tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("a message in time")
            .expect("no i/o error")
    }

    async fn read_exact(peer: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut v))
            .await
            .expect("the bytes in time")
            .expect("read");
        v
    }

    #[tokio::test]
    async fn fragments_are_joined_and_pings_answered_in_between() {
        let (mut c, mut peer) = conn(1024);
        let mut input = masked(false, OP_TEXT, b"<mess");
        input.extend(masked(true, OP_PING, b"p"));
        input.extend(masked(false, OP_CONT, "age>é".as_bytes()));
        input.extend(masked(true, OP_CONT, b"</message>"));
        input.extend(masked(true, OP_TEXT, b"<iq/>"));
        peer.write_all(&input).await.expect("write");
        assert_eq!(
            recv(&mut c).await,
            Received::Text(Bytes::from("<message>é</message>"))
        );
        assert_eq!(recv(&mut c).await, Received::Text(Bytes::from("<iq/>")));
        assert_eq!(read_exact(&mut peer, 3).await, [0x8A, 1, b'p']);
        assert!(c.raw.capacity() == 0 && c.msg.capacity() == 0 && c.out.capacity() == 0);
    }

    #[tokio::test]
    async fn sizes_are_checked_on_the_header_before_buffering() {
        let (mut c, mut peer) = conn(1024);
        // only the header of a 100 kB frame: refused without waiting for its payload
        peer.write_all(&masked(true, OP_TEXT, &[b'x'; 100_000])[..14])
            .await
            .expect("write");
        assert_eq!(recv(&mut c).await, Received::TooBig);
        // a message over the limit in fragments below it
        let (mut c, mut peer) = conn(1024);
        peer.write_all(&masked(false, OP_TEXT, &[b'x'; 800]))
            .await
            .expect("write");
        peer.write_all(&masked(true, OP_CONT, &[b'x'; 800]))
            .await
            .expect("write");
        assert_eq!(recv(&mut c).await, Received::TooBig);
    }

    #[tokio::test]
    async fn protocol_violations_and_closes() {
        for (frame, want) in [
            (masked(true, OP_PING, &[0; 126]), "control frames"),
            (masked(false, OP_PING, b""), "control frames"),
            (masked(true, 0x3, b""), "unknown opcode"),
            (masked(true, OP_CONT, b"x"), "continuation"),
            (vec![0x81, 0x01, b'x'], "masked"),
            (vec![0xC1, 0x81, 0, 0, 0, 0, b'x'], "reserved bits"),
        ] {
            let (mut c, mut peer) = conn(1024);
            peer.write_all(&frame).await.expect("write");
            match recv(&mut c).await {
                Received::Protocol(why) => assert!(why.contains(want), "{why}"),
                other => panic!("{other:?} for {frame:?}"),
            }
            assert_eq!(read_exact(&mut peer, 4).await, [0x88, 2, 0x03, 0xEA]);
        }
        let (mut c, mut peer) = conn(1024);
        peer.write_all(&masked(true, OP_BINARY, b"<iq/>"))
            .await
            .expect("write");
        peer.write_all(&masked(true, OP_TEXT, &[0xff, 0xfe]))
            .await
            .expect("write");
        peer.write_all(&masked(true, OP_CLOSE, &[0x03, 0xE8]))
            .await
            .expect("write");
        assert_eq!(recv(&mut c).await, Received::Binary);
        assert_eq!(recv(&mut c).await, Received::BadUtf8);
        assert_eq!(recv(&mut c).await, Received::End);
        assert_eq!(recv(&mut c).await, Received::End);
        assert_eq!(read_exact(&mut peer, 4).await, [0x88, 2, 0x03, 0xE8]);
    }

    // ---- the upgrade

    async fn raw_upgrade(request: &str) -> (Result<Vec<u8>, WsError>, String) {
        let (mut server, mut client) = tokio::io::duplex(16 * 1024);
        client.write_all(request.as_bytes()).await.expect("write");
        let res = upgrade(&mut server).await;
        drop(server);
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.expect("read");
        (res, answer)
    }

    const REQUEST: &str = "GET /xmpp-websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, xmpp\r\n\r\n";

    #[tokio::test]
    async fn the_upgrade_needs_the_path_and_the_subprotocol() {
        let (res, answer) = raw_upgrade(&format!("{REQUEST}early")).await;
        assert_eq!(res.expect("accepted"), b"early");
        assert!(answer.starts_with("HTTP/1.1 101 "), "{answer}");
        // RFC 6455 §1.3's example key and accept value
        assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(answer.contains("Sec-WebSocket-Protocol: xmpp\r\n"));
        for (request, status) in [
            (REQUEST.replace("chat, xmpp", "chat"), 400),
            (
                REQUEST.replace("Sec-WebSocket-Protocol: chat, xmpp\r\n", ""),
                400,
            ),
            (REQUEST.replace("/xmpp-websocket", "/"), 404),
            (REQUEST.replace("GET", "POST"), 405),
            (REQUEST.replace("Version: 13", "Version: 8"), 426),
            (REQUEST.replace("Upgrade: websocket\r\n", ""), 426),
            (REQUEST.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"), 400),
            (
                format!(
                    "GET /xmpp-websocket HTTP/1.1\r\nX: {}\r\n\r\n",
                    "y".repeat(9000)
                ),
                431,
            ),
        ] {
            let (res, answer) = raw_upgrade(&request).await;
            assert!(
                matches!(res, Err(WsError::Refused(s, _)) if s == status),
                "{res:?}"
            );
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{answer}"
            );
        }
    }

    #[tokio::test]
    async fn a_standard_client_completes_the_upgrade() {
        let (mut server, client) = tokio::io::duplex(16 * 1024);
        let mut req = "ws://localhost/xmpp-websocket"
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "xmpp".parse().expect("header"));
        let (server_side, client_side) = tokio::join!(
            upgrade(&mut server),
            tokio_tungstenite::client_async(req, client)
        );
        assert!(server_side.expect("upgraded").is_empty());
        let (_ws, resp) = client_side.expect("client accepted the answer");
        assert_eq!(
            resp.headers()
                .get("Sec-WebSocket-Protocol")
                .map(|v| v.as_bytes()),
            Some(&b"xmpp"[..])
        );
    }

    // ---- the adapter with a standard client

    type Client = WebSocketStream<DuplexStream>;

    async fn pair(limit: usize) -> (WsStream<DuplexStream>, Client) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        (
            WsStream::new(Conn::new(a, Vec::new(), limit), Arc::from(DOMAIN), None),
            client,
        )
    }

    async fn text(c: &mut Client) -> String {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), c.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return t.as_str().to_string(),
                Ok(Some(Ok(_))) => continue,
                other => panic!("no text message: {other:?}"),
            }
        }
    }

    const LIMITS: Limits = Limits {
        max_stanza_bytes: 4096,
        max_depth: 16,
        max_attributes: 32,
    };
    const OPEN: &str =
        "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='pushgate.test' version='1.0'/>";

    #[tokio::test]
    async fn the_adapter_carries_a_stream_both_ways() {
        let (server, mut client) = pair(4096).await;
        let (rd, mut wr) = tokio::io::split(server);
        let mut r = StanzaReader::new(rd, LIMITS);
        client.send(Message::text(OPEN)).await.expect("send");
        let Ok(XmlEvent::StreamOpen(attrs)) = r.next().await else {
            panic!("no header")
        };
        assert!(attrs.contains(&("to".into(), "pushgate.test".into())));
        wr.write_all(b"<?xml version='1.0'?><stream:stream from='pushgate.test' id='s1' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
            .await
            .expect("write");
        wr.write_all(b"<stream:features/>").await.expect("write");
        wr.flush().await.expect("flush");
        assert!(text(&mut client).await.starts_with(
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' from='pushgate.test' id='s1'"
        ));
        assert_eq!(
            text(&mut client).await,
            "<stream:features xmlns:stream='http://etherx.jabber.org/streams'/>"
        );
        // a keep-alive, a ping, then a stanza without its namespace: the stream's default applies
        client.send(Message::text(" ")).await.expect("send");
        client
            .send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .expect("ping");
        client
            .send(Message::text(
                "<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
            ))
            .await
            .expect("send");
        let Ok(XmlEvent::Stanza(iq)) = r.next().await else {
            panic!("no stanza")
        };
        assert!(iq.is("iq", "jabber:client"));
        wr.write_all(b"<iq type='result' id='1'/>")
            .await
            .expect("write");
        wr.flush().await.expect("flush");
        match tokio::time::timeout(Duration::from_secs(5), client.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], b"p"),
            other => panic!("no pong: {other:?}"),
        }
        assert_eq!(
            text(&mut client).await,
            "<iq xmlns='jabber:client' type='result' id='1'/>"
        );
        client.send(Message::text(CLOSE)).await.expect("send");
        assert_eq!(r.next().await.ok(), Some(XmlEvent::StreamClose));
        wr.write_all(b"</stream:stream>").await.expect("write");
        wr.flush().await.expect("flush");
        assert_eq!(text(&mut client).await, CLOSE);
        assert!(
            wr.write_all(b"<iq/>").await.is_err(),
            "nothing follows <close/>"
        );
    }

    /// Sends `first`, reads until the input fails, drops the adapter (as the session would)
    /// and returns the text messages the client then receives, and whether a Close came.
    async fn refused(limit: usize, first: &[Message]) -> (Vec<String>, bool) {
        let (mut server, mut client) = pair(limit).await;
        let (done, back) = oneshot::channel();
        server.done = Some(done);
        for m in first {
            client.send(m.clone()).await.expect("send");
        }
        let mut r = StanzaReader::new(server, LIMITS);
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(5), r.next()).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => break e,
                Err(_) => panic!("the input did not fail"),
            }
        };
        assert_eq!(
            err.condition(),
            None,
            "the session must not answer again: {err}"
        );
        drop(r);
        let finish = tokio::spawn(back.await.expect("the connection comes back").finish());
        let (mut got, mut closed) = (vec![], false);
        while let Ok(Some(Ok(m))) =
            tokio::time::timeout(Duration::from_secs(5), client.next()).await
        {
            match m {
                Message::Text(t) => got.push(t.as_str().to_string()),
                Message::Close(_) => closed = true,
                _ => {}
            }
        }
        // the client goes away as a browser does after the close handshake
        drop(client);
        finish.await.expect("finish");
        (got, closed)
    }

    fn condition_of(frames: &[String]) -> Option<String> {
        let e = frames.iter().find(|f| f.starts_with("<stream:error"))?;
        let start = e.find("><")? + 2;
        let len = e[start..].find([' ', '/'])?;
        Some(e[start..start + len].to_string())
    }

    #[tokio::test]
    async fn framing_violations_get_their_stream_error_then_close() {
        let open = Message::text(OPEN);
        let big = format!("<message><body>{}</body></message>", "x".repeat(5000));
        for (msgs, want) in [
            (vec![Message::text("<message/>")], "invalid-xml"),
            (
                vec![Message::text("<open to='pushgate.test'/>")],
                "invalid-namespace",
            ),
            (
                vec![open.clone(), Message::text("<iq id='1'/><iq id='2'/>")],
                "not-well-formed",
            ),
            (
                vec![open.clone(), Message::text("<iq id='1'>")],
                "not-well-formed",
            ),
            (vec![open.clone(), Message::text(OPEN)], "invalid-xml"),
            (
                vec![open.clone(), Message::Binary(Bytes::from_static(b"<iq/>"))],
                "unsupported-encoding",
            ),
            (vec![open.clone(), Message::text(big)], "policy-violation"),
        ] {
            let (got, closed) = refused(4096, &msgs).await;
            assert_eq!(condition_of(&got).as_deref(), Some(want), "{got:?}");
            assert!(
                got[0].starts_with("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'"),
                "{got:?}"
            );
            assert_eq!(got.last().map(String::as_str), Some(CLOSE), "{got:?}");
            assert!(closed, "no WebSocket Close after {want}");
        }
    }

    #[tokio::test]
    async fn a_client_close_is_answered_even_when_the_session_says_nothing() {
        let (got, closed) = refused(4096, &[Message::text(OPEN), Message::text(CLOSE)]).await;
        assert_eq!(got, [CLOSE], "{got:?}");
        assert!(closed);
    }
}
