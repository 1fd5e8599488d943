//! The XMPP stream parser (used by the edge as a server and by the device client): turns the byte stream into stream headers and complete stanzas,
//! with hard limits, because everything here is input from the internet.
//!
//! - Memory: the socket is read through [`Budget`], which refuses more than
//!   `max_stanza_bytes` (+ one read buffer) between two stanza boundaries, so a peer can never
//!   make us buffer an unbounded element or text.
//! - Shape: element depth and attributes per element are bounded.
//! - Restricted XML (RFC 6120 §11.1): DTDs, comments, processing instructions and entity
//!   references other than the five predefined ones end the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

/// XML namespace of the stream element.
pub const NS_STREAM: &str = "http://etherx.jabber.org/streams";

/// Limits applied to every stream.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_stanza_bytes: usize,
    pub max_depth: usize,
    pub max_attributes: usize,
}

/// A parsed element.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Element {
    pub name: String,
    pub ns: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    /// An attribute's value.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first child with this name and namespace.
    pub fn child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name && c.ns == ns)
    }

    /// Whether this is `name` in `ns`.
    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }
}

/// What the parser yields.
#[derive(Debug, Clone, PartialEq)]
pub enum XmlEvent {
    /// `<stream:stream …>` with its attributes.
    StreamOpen(Vec<(String, String)>),
    /// A complete top-level element.
    Stanza(Element),
    /// `</stream:stream>`.
    StreamClose,
}

/// Why the stream must end; each maps to an RFC 6120 stream error condition.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("connection closed")]
    Eof,
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("not well-formed: {0}")]
    NotWellFormed(String),
    #[error("restricted XML: {0}")]
    Restricted(&'static str),
    #[error("policy violation: {0}")]
    Policy(String),
    #[error("invalid namespace: {0}")]
    InvalidNamespace(String),
}

impl XmlError {
    /// The stream error condition to send (none when the connection is already gone).
    pub fn condition(&self) -> Option<&'static str> {
        match self {
            XmlError::Eof | XmlError::Io(_) => None,
            XmlError::NotWellFormed(_) => Some("not-well-formed"),
            XmlError::Restricted(_) => Some("restricted-xml"),
            XmlError::Policy(_) => Some("policy-violation"),
            XmlError::InvalidNamespace(_) => Some("invalid-namespace"),
        }
    }
}

/// An `AsyncRead` that refuses to deliver more than `limit` bytes between resets.
pub struct Budget<R> {
    inner: R,
    used: usize,
    limit: usize,
}

impl<R> Budget<R> {
    pub fn new(inner: R, limit: usize) -> Self {
        Budget {
            inner,
            used: 0,
            limit,
        }
    }
    /// Called at each stanza boundary.
    pub fn reset(&mut self) {
        self.used = 0;
    }
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Budget<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.used >= self.limit {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "stanza size limit exceeded",
            )));
        }
        let room = self.limit - self.used;
        if buf.remaining() <= room {
            let before = buf.filled().len();
            let res = Pin::new(&mut self.inner).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            self.used += n;
            return res;
        }
        // near the limit: read no more than the budget allows, through a small stack buffer
        let mut tmp = [0u8; READ_BUF];
        let take = room.min(READ_BUF);
        let mut rb = ReadBuf::new(&mut tmp[..take]);
        let res = Pin::new(&mut self.inner).poll_read(cx, &mut rb);
        if let Poll::Ready(Ok(())) = res {
            let n = rb.filled().len();
            buf.put_slice(rb.filled());
            self.used += n;
        }
        res
    }
}

/// Largest single read from the socket. Reads go through a stack buffer of this size, so it
/// costs nothing per idle connection.
const READ_BUF: usize = 2048;

/// A buffered reader that holds heap memory only while it has unconsumed bytes.
///
/// `tokio::io::BufReader` keeps its buffer for the connection's whole life, which for an
/// edge holding tens of thousands of idle sessions is kilobytes per device doing nothing. Here
/// each read lands in a stack buffer first; only what actually arrived is copied to the heap,
/// and that copy is freed as soon as the parser has consumed it. A session waiting for input
/// therefore holds no read buffer at all.
pub struct LazyBuf<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

impl<R> LazyBuf<R> {
    fn new(inner: R) -> Self {
        LazyBuf {
            inner,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Bytes received and not yet parsed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for LazyBuf<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.buffered() == 0 {
            return Pin::new(&mut self.inner).poll_read(cx, out);
        }
        let n = self.buffered().min(out.remaining());
        let start = self.pos;
        out.put_slice(&self.buf[start..start + n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl<R: AsyncRead + Unpin> AsyncBufRead for LazyBuf<R> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.pos >= this.buf.len() {
            let mut tmp = [0u8; READ_BUF];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    this.buf = rb.filled().to_vec();
                    this.pos = 0;
                }
            }
        }
        Poll::Ready(Ok(&this.buf[this.pos..]))
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        self.pos = (self.pos + amt).min(self.buf.len());
        if self.pos >= self.buf.len() {
            // everything parsed: give the memory back while the peer is quiet
            self.buf = Vec::new();
            self.pos = 0;
        }
    }
}

/// Stanza reader over one XML stream (a stream restart makes a new one from `into_inner`).
pub struct StanzaReader<R> {
    reader: NsReader<LazyBuf<Budget<R>>>,
    limits: Limits,
    buf: Vec<u8>,
    stack: Vec<Element>,
    opened: bool,
}

fn ns_of(r: &ResolveResult<'_>) -> Result<String, XmlError> {
    match r {
        ResolveResult::Bound(ns) => Ok(String::from_utf8_lossy(ns.as_ref()).into_owned()),
        ResolveResult::Unbound => Ok(String::new()),
        ResolveResult::Unknown(p) => Err(XmlError::InvalidNamespace(format!(
            "undeclared prefix {:?}",
            String::from_utf8_lossy(p)
        ))),
    }
}

impl<R: AsyncRead + Unpin> StanzaReader<R> {
    /// A reader at the start of a stream.
    pub fn new(inner: R, limits: Limits) -> Self {
        let budget = Budget::new(inner, limits.max_stanza_bytes + READ_BUF);
        Self::from_buffered(LazyBuf::new(budget), limits)
    }

    fn from_buffered(b: LazyBuf<Budget<R>>, limits: Limits) -> Self {
        let mut reader = NsReader::from_reader(b);
        let cfg = reader.config_mut();
        cfg.trim_text(false);
        cfg.check_end_names = true;
        cfg.expand_empty_elements = false;
        StanzaReader {
            reader,
            limits,
            buf: Vec::new(),
            stack: Vec::new(),
            opened: false,
        }
    }

    /// A fresh parser for a restarted stream over the same connection, keeping bytes the
    /// peer already sent.
    pub fn restart(self) -> Self {
        let mut b = self.reader.into_inner();
        b.get_mut().reset();
        Self::from_buffered(b, self.limits)
    }

    /// Gives back the connection (before a TLS upgrade; nothing may be buffered then).
    pub fn into_inner(self) -> R {
        self.reader.into_inner().into_inner().into_inner()
    }

    fn element(limits: &Limits, e: &BytesStart<'_>, ns: String) -> Result<Element, XmlError> {
        let mut attrs = Vec::new();
        for a in e.attributes() {
            let a = a.map_err(|e| XmlError::NotWellFormed(e.to_string()))?;
            if attrs.len() >= limits.max_attributes {
                return Err(XmlError::Policy(format!(
                    "more than {} attributes",
                    limits.max_attributes
                )));
            }
            let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
            let value = a
                .unescape_value()
                .map_err(|e| XmlError::NotWellFormed(e.to_string()))?
                .into_owned();
            attrs.push((key, value));
        }
        Ok(Element {
            name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
            ns,
            attrs,
            children: Vec::new(),
            text: String::new(),
        })
    }

    fn finish(&mut self, el: Element) -> Option<XmlEvent> {
        match self.stack.last_mut() {
            Some(parent) => {
                parent.children.push(el);
                None
            }
            None => {
                self.reader.get_mut().get_mut().reset();
                // no scratch space is kept between stanzas: an idle session holds none, and
                // regrowing it for the next stanza costs a few small allocations
                self.buf = Vec::new();
                self.stack = Vec::new();
                Some(XmlEvent::Stanza(el))
            }
        }
    }

    /// The next stream header, stanza or stream end.
    pub async fn next(&mut self) -> Result<XmlEvent, XmlError> {
        let limits = self.limits;
        loop {
            self.buf.clear();
            let (res, ev) = self
                .reader
                .read_resolved_event_into_async(&mut self.buf)
                .await
                .map_err(|e| match e {
                    quick_xml::Error::Io(io) if io.kind() == io::ErrorKind::InvalidData => {
                        XmlError::Policy(format!(
                            "stanza larger than {} bytes",
                            self.limits.max_stanza_bytes
                        ))
                    }
                    quick_xml::Error::Io(io) => {
                        XmlError::Io(io::Error::new(io.kind(), io.to_string()))
                    }
                    other => XmlError::NotWellFormed(other.to_string()),
                })?;
            let ns = match &ev {
                Event::Start(_) | Event::Empty(_) => Some(ns_of(&res)?),
                _ => None,
            };
            match ev {
                Event::Decl(_) => continue,
                Event::DocType(_) => return Err(XmlError::Restricted("DTDs are not allowed")),
                Event::Comment(_) => return Err(XmlError::Restricted("comments are not allowed")),
                Event::PI(_) => {
                    return Err(XmlError::Restricted(
                        "processing instructions are not allowed",
                    ))
                }
                Event::Eof => return Err(XmlError::Eof),
                Event::Start(e) => {
                    let ns = ns.unwrap_or_default();
                    let el = Self::element(&limits, &e, ns)?;
                    if !self.opened {
                        if el.name != "stream" || el.ns != NS_STREAM {
                            return Err(XmlError::InvalidNamespace(
                                "the stream must start with <stream:stream>".into(),
                            ));
                        }
                        self.opened = true;
                        return Ok(XmlEvent::StreamOpen(el.attrs));
                    }
                    if self.stack.len() + 1 >= self.limits.max_depth {
                        return Err(XmlError::Policy(format!(
                            "elements nested deeper than {}",
                            self.limits.max_depth
                        )));
                    }
                    self.stack.push(el);
                }
                Event::Empty(e) => {
                    let el = Self::element(&limits, &e, ns.unwrap_or_default())?;
                    if !self.opened {
                        return Err(XmlError::InvalidNamespace(
                            "the stream must start with <stream:stream>".into(),
                        ));
                    }
                    if let Some(done) = self.finish(el) {
                        return Ok(done);
                    }
                }
                Event::End(_) => match self.stack.pop() {
                    Some(el) => {
                        if let Some(done) = self.finish(el) {
                            return Ok(done);
                        }
                    }
                    None => return Ok(XmlEvent::StreamClose),
                },
                Event::Text(t) => {
                    let s = t
                        .unescape()
                        .map_err(|e| XmlError::NotWellFormed(e.to_string()))?;
                    match self.stack.last_mut() {
                        Some(el) => el.text.push_str(&s),
                        None if s.trim().is_empty() => {}
                        None => {
                            return Err(XmlError::NotWellFormed("text outside of a stanza".into()))
                        }
                    }
                }
                Event::CData(c) => {
                    let s = String::from_utf8_lossy(&c.into_inner()).into_owned();
                    match self.stack.last_mut() {
                        Some(el) => el.text.push_str(&s),
                        None => {
                            return Err(XmlError::NotWellFormed("text outside of a stanza".into()))
                        }
                    }
                }
            }
        }
    }
}

/// Escapes text and attribute values for output.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            // characters XML 1.0 cannot carry are dropped rather than corrupting the stream
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_stanza_bytes: 1024,
        max_depth: 8,
        max_attributes: 8,
    };
    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='x' version='1.0'>";

    async fn events(input: String) -> (Vec<XmlEvent>, Option<XmlError>) {
        let mut r = StanzaReader::new(std::io::Cursor::new(input.into_bytes()), LIMITS);
        let mut out = vec![];
        loop {
            match r.next().await {
                Ok(e) => out.push(e),
                Err(XmlError::Eof) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn parses_header_and_stanzas() {
        let (ev, err) = events(format!(
            "{HEADER}<message id='a&amp;b'><body>hi &lt;3</body><request xmlns='urn:xmpp:receipts'/></message></stream:stream>"
        ))
        .await;
        assert!(err.is_none(), "{err:?}");
        assert!(matches!(ev[0], XmlEvent::StreamOpen(_)));
        let XmlEvent::Stanza(m) = &ev[1] else {
            panic!("{ev:?}")
        };
        assert!(m.is("message", "jabber:client"));
        assert_eq!(m.attr("id"), Some("a&b"));
        assert_eq!(
            m.child("body", "jabber:client").map(|b| b.text.as_str()),
            Some("hi <3")
        );
        assert!(m.child("request", "urn:xmpp:receipts").is_some());
        assert_eq!(ev[2], XmlEvent::StreamClose);
    }

    #[tokio::test]
    async fn refuses_dtd_and_entities() {
        let (_, err) = events(format!("<!DOCTYPE x [<!ENTITY a 'b'>]>{HEADER}")).await;
        assert!(matches!(err, Some(XmlError::Restricted(_))), "{err:?}");
        let (_, err) = events(format!("{HEADER}<message><body>&xxe;</body></message>")).await;
        assert_eq!(err.and_then(|e| e.condition()), Some("not-well-formed"));
        let (_, err) = events(format!("{HEADER}<!-- hi --><message/>")).await;
        assert_eq!(err.and_then(|e| e.condition()), Some("restricted-xml"));
    }

    #[tokio::test]
    async fn enforces_limits() {
        let big = "x".repeat(10_000);
        let (_, err) = events(format!("{HEADER}<message><body>{big}</body></message>")).await;
        assert_eq!(err.and_then(|e| e.condition()), Some("policy-violation"));
        let deep = "<a>".repeat(20);
        let (_, err) = events(format!("{HEADER}{deep}")).await;
        assert_eq!(err.and_then(|e| e.condition()), Some("policy-violation"));
        let attrs: String = (0..20).map(|i| format!(" a{i}='1'")).collect();
        let (_, err) = events(format!("{HEADER}<message{attrs}/>")).await;
        assert_eq!(err.and_then(|e| e.condition()), Some("policy-violation"));
    }

    #[tokio::test]
    async fn many_small_stanzas_are_fine() {
        let body: String = (0..200)
            .map(|i| {
                format!(
                    "<message id='{i}'><body>{}</body></message>",
                    "y".repeat(500)
                )
            })
            .collect();
        let (ev, err) = events(format!("{HEADER}{body}")).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(ev.len(), 201);
    }

    #[tokio::test]
    async fn must_open_a_stream() {
        let (_, err) = events("<message/>".into()).await;
        assert_eq!(err.and_then(|e| e.condition()), Some("invalid-namespace"));
    }

    #[tokio::test]
    async fn stanzas_split_over_many_reads_and_no_memory_kept_between_them() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let input = format!(
            "{HEADER}<message id='1'><body>{}</body></message><iq id='2' type='get'/>",
            "z".repeat(700)
        );
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in input.as_bytes().chunks(7) {
                tx.write_all(chunk).await.expect("write");
            }
            tx
        });
        let mut r = StanzaReader::new(rx, LIMITS);
        assert!(matches!(r.next().await, Ok(XmlEvent::StreamOpen(_))));
        let Ok(XmlEvent::Stanza(m)) = r.next().await else {
            panic!("no message")
        };
        assert_eq!(m.attr("id"), Some("1"));
        assert_eq!(m.children[0].text.len(), 700);
        let Ok(XmlEvent::Stanza(iq)) = r.next().await else {
            panic!("no iq")
        };
        assert_eq!(iq.attr("id"), Some("2"));
        // everything parsed: the read buffer and the large scratch space are gone
        assert_eq!(r.reader.get_ref().buffered(), 0);
        assert_eq!(r.reader.get_ref().buf.capacity(), 0);
        assert_eq!(r.buf.capacity(), 0);
        assert_eq!(r.stack.capacity(), 0);
        drop(writer.await);
    }

    #[test]
    fn escapes() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&apos;"
        );
        assert_eq!(escape("a\u{1}b"), "ab");
    }
}
