//! A test device: a real XMPP client over TCP. It negotiates STARTTLS (trusting the test CA),
//! authenticates with SCRAM-SHA-256 (computing the proof itself, RFC 5802), binds a resource
//! and can enable stream management. It parses the server's stream with the edge's own
//! bounded parser; interop with a client we did not write is covered by the slixmpp test.

use std::time::Duration;

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use xmpp_edge::xml::{Element, Limits, StanzaReader, XmlEvent};

const LIMITS: Limits = Limits {
    max_stanza_bytes: 1 << 20,
    max_depth: 64,
    max_attributes: 64,
};

type Tls = TlsStream<TcpStream>;

/// A received chat message.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub body: String,
    pub subject: Option<String>,
    pub data: Option<String>,
    pub requests_receipt: bool,
}

/// SCRAM-SHA-256, client side (RFC 5802, RFC 7677), computing the proof itself; payloads in
/// and out are base64 as SASL carries them in XMPP.
pub struct Scram {
    first_bare: String,
    cnonce: String,
    /// Set by [`Scram::client_final`]: what the server signature must match.
    expected_signature: Option<String>,
}

impl Scram {
    /// A fresh exchange for the jid's local part.
    pub fn new(local: &str) -> Self {
        let mut nonce_bytes = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut nonce_bytes);
        let cnonce = STANDARD.encode(nonce_bytes);
        Scram {
            first_bare: format!("n={local},r={cnonce}"),
            cnonce,
            expected_signature: None,
        }
    }

    /// The client-first message, for `<auth mechanism='SCRAM-SHA-256'>`.
    pub fn client_first(&self) -> String {
        STANDARD.encode(format!("n,,{}", self.first_bare))
    }

    /// The client-final message answering the server's `<challenge>` payload.
    pub fn client_final(&mut self, challenge: &str, password: &str) -> anyhow::Result<String> {
        let server_first = String::from_utf8(STANDARD.decode(challenge.trim())?)?;
        let mut nonce = "";
        let mut salt = vec![];
        let mut iters = 0u32;
        for a in server_first.split(',') {
            if let Some(v) = a.strip_prefix("r=") {
                nonce = v;
            } else if let Some(v) = a.strip_prefix("s=") {
                salt = STANDARD.decode(v)?;
            } else if let Some(v) = a.strip_prefix("i=") {
                iters = v.parse()?;
            }
        }
        if !nonce.starts_with(&self.cnonce) {
            bail!("server nonce does not extend ours");
        }
        let salted = pushgate_core::credentials::salted_password(password.as_bytes(), &salt, iters);
        let client_key = hmac(&salted, b"Client Key")?;
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth_msg = format!("{},{server_first},{without_proof}", self.first_bare);
        let sig = hmac(&stored, auth_msg.as_bytes())?;
        let proof: Vec<u8> = client_key
            .iter()
            .zip(sig.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac(&salted, b"Server Key")?;
        self.expected_signature = Some(format!(
            "v={}",
            STANDARD.encode(hmac(&server_key, auth_msg.as_bytes())?)
        ));
        Ok(STANDARD.encode(format!("{without_proof},p={}", STANDARD.encode(proof))))
    }

    /// Checks the server signature in the `<success>` payload (the server knew the verifier).
    pub fn verify_success(&self, success: &str) -> anyhow::Result<()> {
        let got = String::from_utf8(STANDARD.decode(success.trim())?)?;
        if Some(&got) != self.expected_signature.as_ref() {
            bail!("server signature does not verify");
        }
        Ok(())
    }
}

/// A connected, bound device.
pub struct TestDevice {
    reader: StanzaReader<ReadHalf<Tls>>,
    writer: WriteHalf<Tls>,
    pub jid: String,
    /// Stanzas received since stream management was enabled.
    h_in: u32,
    sm: bool,
}

fn hmac(key: &[u8], data: &[u8]) -> anyhow::Result<[u8; 32]> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).map_err(|e| anyhow::anyhow!("{e}"))?;
    m.update(data);
    Ok(m.finalize().into_bytes().into())
}

async fn expect_stanza<R: tokio::io::AsyncRead + Unpin>(
    r: &mut StanzaReader<R>,
) -> anyhow::Result<Element> {
    match tokio::time::timeout(Duration::from_secs(20), r.next()).await?? {
        XmlEvent::Stanza(e) => Ok(e),
        other => bail!("expected a stanza, got {other:?}"),
    }
}

async fn expect_open<R: tokio::io::AsyncRead + Unpin>(
    r: &mut StanzaReader<R>,
) -> anyhow::Result<Element> {
    match tokio::time::timeout(Duration::from_secs(20), r.next()).await?? {
        XmlEvent::StreamOpen(_) => expect_stanza(r).await,
        other => bail!("expected a stream header, got {other:?}"),
    }
}

fn header(domain: &str) -> String {
    format!("<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
}

impl TestDevice {
    /// Connects with STARTTLS, logs in with SCRAM-SHA-256 and binds.
    pub async fn connect(
        addr: std::net::SocketAddr,
        jid: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        let (mut r, mut wr) = Self::login(addr, jid, password).await?;
        wr.write_all(b"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>test</resource></bind></iq>")
            .await?;
        let bound = expect_stanza(&mut r).await?;
        let full = bound
            .child("bind", "urn:ietf:params:xml:ns:xmpp-bind")
            .and_then(|b| b.child("jid", "urn:ietf:params:xml:ns:xmpp-bind"))
            .map(|j| j.text.clone())
            .context("bind result without jid")?;
        Ok(TestDevice {
            reader: r,
            writer: wr,
            jid: full,
            h_in: 0,
            sm: false,
        })
    }

    /// Connects, logs in and asks to resume stream `previd` having received `h` stanzas.
    /// Returns the device (stream management on) and the server's `<resumed/>` or `<failed/>`.
    pub async fn resume(
        addr: std::net::SocketAddr,
        jid: &str,
        password: &str,
        previd: &str,
        h: u32,
    ) -> anyhow::Result<(Self, Element)> {
        let (mut r, mut wr) = Self::login(addr, jid, password).await?;
        wr.write_all(
            format!("<resume xmlns='urn:xmpp:sm:3' previd='{previd}' h='{h}'/>").as_bytes(),
        )
        .await?;
        let answer = expect_stanza(&mut r).await?;
        let resumed = answer.name == "resumed";
        Ok((
            TestDevice {
                reader: r,
                writer: wr,
                jid: jid.to_string(),
                h_in: 0,
                sm: resumed,
            },
            answer,
        ))
    }

    /// Stanzas received since stream management was enabled (the `h` to resume with).
    pub fn received_count(&self) -> u32 {
        self.h_in
    }

    /// Drops the TCP connection without closing the stream (a network failure).
    pub fn drop_connection(self) {
        drop(self);
    }

    /// Enables stream management with resumption; returns the resumption id.
    pub async fn enable_sm_resumable(&mut self) -> anyhow::Result<String> {
        self.send_raw("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
            .await?;
        loop {
            let e = self.next_stanza().await?;
            if e.name == "enabled" {
                self.sm = true;
                return e
                    .attr("id")
                    .map(str::to_string)
                    .context("<enabled/> without an id");
            }
            if e.name == "failed" {
                bail!("stream management refused");
            }
        }
    }

    /// STARTTLS, SCRAM-SHA-256 and the post-authentication stream header.
    async fn login(
        addr: std::net::SocketAddr,
        jid: &str,
        password: &str,
    ) -> anyhow::Result<(StanzaReader<ReadHalf<Tls>>, WriteHalf<Tls>)> {
        let (local, domain) = jid.split_once('@').context("jid without @")?;
        let mut tcp = TcpStream::connect(addr).await?;
        {
            let (rd, mut wr) = tcp.split();
            let mut r = StanzaReader::new(rd, LIMITS);
            wr.write_all(header(domain).as_bytes()).await?;
            let features = expect_open(&mut r).await?;
            if features
                .child("starttls", "urn:ietf:params:xml:ns:xmpp-tls")
                .is_none()
            {
                bail!("no STARTTLS offered: {features:?}");
            }
            wr.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                .await?;
            let proceed = expect_stanza(&mut r).await?;
            if proceed.name != "proceed" {
                bail!("STARTTLS refused: {proceed:?}");
            }
        }
        pushgate_runtime::tls::install_crypto_provider();
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(crate::root_store()?)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        let name = rustls_pki_types::ServerName::try_from("localhost")?.to_owned();
        let tls = connector.connect(name, tcp).await?;
        let (rd, mut wr) = tokio::io::split(tls);
        let mut r = StanzaReader::new(rd, LIMITS);
        wr.write_all(header(domain).as_bytes()).await?;
        let features = expect_open(&mut r).await?;
        let mechs = features
            .child("mechanisms", "urn:ietf:params:xml:ns:xmpp-sasl")
            .context("no SASL")?;
        if !mechs.children.iter().any(|m| m.text == "SCRAM-SHA-256") {
            bail!("SCRAM-SHA-256 not offered");
        }
        let mut scram = Scram::new(local);
        wr.write_all(
            format!(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{}</auth>",
                scram.client_first()
            )
            .as_bytes(),
        )
        .await?;
        let ch = expect_stanza(&mut r).await?;
        if ch.name != "challenge" {
            bail!("expected a challenge: {ch:?}");
        }
        let fin = scram.client_final(&ch.text, password)?;
        wr.write_all(
            format!("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{fin}</response>")
                .as_bytes(),
        )
        .await?;
        let outcome = expect_stanza(&mut r).await?;
        if outcome.name != "success" {
            bail!("authentication failed: {outcome:?}");
        }
        scram.verify_success(&outcome.text)?;
        let mut r = r.restart();
        wr.write_all(header(domain).as_bytes()).await?;
        let features = expect_open(&mut r).await?;
        features
            .child("bind", "urn:ietf:params:xml:ns:xmpp-bind")
            .context("no bind offered")?;
        Ok((r, wr))
    }

    /// Sends raw XML.
    pub async fn send_raw(&mut self, xml: &str) -> anyhow::Result<()> {
        self.writer.write_all(xml.as_bytes()).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Enables XEP-0198 stream management.
    pub async fn enable_sm(&mut self) -> anyhow::Result<()> {
        self.send_raw("<enable xmlns='urn:xmpp:sm:3'/>").await?;
        loop {
            let e = self.next_stanza().await?;
            if e.name == "enabled" {
                self.sm = true;
                return Ok(());
            }
            if e.name == "failed" {
                bail!("stream management refused");
            }
        }
    }

    /// The next top-level element from the server.
    pub async fn next_stanza(&mut self) -> anyhow::Result<Element> {
        let e = expect_stanza(&mut self.reader).await?;
        if self.sm && matches!(e.name.as_str(), "message" | "iq" | "presence") {
            self.h_in += 1;
        }
        Ok(e)
    }

    /// The next chat message (answering pings meanwhile).
    pub async fn next_message(&mut self) -> anyhow::Result<Received> {
        loop {
            let e = self.next_stanza().await?;
            if e.name == "iq" && e.attr("type") == Some("get") {
                let id = e.attr("id").unwrap_or("").to_string();
                self.send_raw(&format!("<iq type='result' id='{id}'/>"))
                    .await?;
                continue;
            }
            if e.name == "message" {
                return Ok(Received {
                    id: e.attr("id").unwrap_or("").to_string(),
                    body: e
                        .child("body", "jabber:client")
                        .map(|b| b.text.clone())
                        .unwrap_or_default(),
                    subject: e.child("subject", "jabber:client").map(|b| b.text.clone()),
                    data: e
                        .child("data", "urn:pushgate:data:0")
                        .map(|b| b.text.clone()),
                    requests_receipt: e.child("request", "urn:xmpp:receipts").is_some(),
                });
            }
        }
    }

    /// XEP-0184 receipt.
    pub async fn ack_received(&mut self, id: &str) -> anyhow::Result<()> {
        self.send_raw(&format!("<message to='pushgate.test' id='r-{id}'><received xmlns='urn:xmpp:receipts' id='{id}'/></message>"))
            .await
    }

    /// XEP-0333 displayed marker.
    pub async fn mark_displayed(&mut self, id: &str) -> anyhow::Result<()> {
        self.send_raw(&format!(
            "<message to='pushgate.test' id='d-{id}'><displayed xmlns='urn:xmpp:chat-markers:0' id='{id}'/></message>"
        ))
        .await
    }

    /// A reply (XEP-0461) to a message.
    pub async fn reply(&mut self, id: &str, text: &str) -> anyhow::Result<()> {
        self.send_raw(&format!(
            "<message type='chat' to='pushgate.test' id='re-{id}'><body>{}</body><reply xmlns='urn:xmpp:reply:0' id='{id}'/></message>",
            xmpp_edge::xml::escape(text)
        ))
        .await
    }

    /// XEP-0198 ack of everything received so far.
    pub async fn sm_ack(&mut self) -> anyhow::Result<()> {
        let h = self.h_in;
        self.send_raw(&format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>"))
            .await
    }

    /// Closes the stream politely.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.send_raw("</stream:stream>").await?;
        let _ = self.writer.shutdown().await;
        Ok(())
    }
}
