//! XMPP over WebSocket (RFC 7395): a browser-style client (wss://, ALPN http/1.1, subprotocol
//! `xmpp`, one element per message) against the suite, through login, delivery and receipt,
//! and the ways a client can get the framing wrong.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use pushgate_testkit::device::Scram;
use pushgate_testkit::TestEnv;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use xmpp_edge::xml::{Element, Limits, StanzaReader, XmlEvent};

const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
const STREAMS: &str = "http://etherx.jabber.org/streams";
const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const SM: &str = "urn:xmpp:sm:3";
const CLIENT: &str = "jabber:client";
const OPEN: &str =
    "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='pushgate.test' version='1.0'/>";
const CLOSE: &str = "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>";

const LIMITS: Limits = Limits {
    max_stanza_bytes: 1 << 20,
    max_depth: 64,
    max_attributes: 64,
};

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// TLS as a browser opens it for wss://: the test CA, ALPN `http/1.1`.
async fn tls(addr: SocketAddr) -> anyhow::Result<TlsStream<TcpStream>> {
    pushgate_runtime::tls::install_crypto_provider();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(pushgate_testkit::root_store()?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let name = rustls_pki_types::ServerName::try_from("localhost")?.to_owned();
    Ok(connector
        .connect(name, TcpStream::connect(addr).await?)
        .await?)
}

/// The upgrade; the inner error is the server's refusal.
async fn upgrade(
    addr: SocketAddr,
    path: &str,
    protocol: Option<&str>,
) -> anyhow::Result<Result<Ws, tungstenite::Error>> {
    let tls = tls(addr).await?;
    let mut req = format!("wss://localhost:{}{path}", addr.port()).into_client_request()?;
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse()?);
    }
    Ok(tokio_tungstenite::client_async(req, tls)
        .await
        .map(|(ws, _)| ws))
}

/// An element as a standalone document, parsed without any namespace in scope: what a
/// browser's DOMParser sees of one message.
async fn parse(frame: &str) -> anyhow::Result<Element> {
    let doc = format!("<stream:stream xmlns:stream='{STREAMS}'>{frame}");
    let mut r = StanzaReader::new(std::io::Cursor::new(doc.into_bytes()), LIMITS);
    r.next().await?;
    match r.next().await? {
        XmlEvent::Stanza(e) => Ok(e),
        other => bail!("not one element: {frame:?} ({other:?})"),
    }
}

struct WsClient {
    ws: Ws,
}

impl WsClient {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let ws = upgrade(addr, "/xmpp-websocket", Some("xmpp")).await??;
        Ok(WsClient { ws })
    }

    async fn send(&mut self, xml: &str) -> anyhow::Result<()> {
        self.ws.send(Message::text(xml)).await?;
        Ok(())
    }

    /// The next WebSocket message of any kind.
    async fn raw(&mut self) -> anyhow::Result<Option<Message>> {
        match tokio::time::timeout(Duration::from_secs(20), self.ws.next()).await {
            Err(_) => bail!("nothing from the server for 20 s"),
            Ok(None) => Ok(None),
            Ok(Some(m)) => Ok(Some(m?)),
        }
    }

    /// The next text message.
    async fn text(&mut self) -> anyhow::Result<String> {
        loop {
            match self.raw().await? {
                Some(Message::Text(t)) => return Ok(t.as_str().to_string()),
                Some(Message::Close(c)) => bail!("WebSocket closed: {c:?}"),
                Some(_) => continue,
                None => bail!("connection ended"),
            }
        }
    }

    /// The next element.
    async fn next(&mut self) -> anyhow::Result<Element> {
        parse(&self.text().await?).await
    }

    /// `<open/>` and the features that follow it.
    async fn open(&mut self) -> anyhow::Result<(Element, Element)> {
        self.send(OPEN).await?;
        let open = self.next().await?;
        if !open.is("open", FRAMING) {
            bail!("expected <open/>, got {open:?}");
        }
        let features = self.next().await?;
        if !features.is("features", STREAMS) {
            bail!("expected stream features, got {features:?}");
        }
        Ok((open, features))
    }

    /// What ends a refused stream: the stream error (after an `<open/>`: the server sends
    /// one first if it had not answered the client's yet), `<close/>`, then the WebSocket
    /// Close. Returns the error's condition.
    async fn stream_error(&mut self, answered: bool) -> anyhow::Result<String> {
        let mut opened = answered;
        let mut condition = None;
        loop {
            match self.raw().await? {
                Some(Message::Text(t)) => {
                    let e = parse(t.as_str()).await?;
                    if e.is("open", FRAMING) {
                        opened = true;
                    } else if e.is("error", STREAMS) {
                        assert!(
                            opened,
                            "a stream error must follow an <open/> (RFC 7395 §3.5)"
                        );
                        condition = e
                            .children
                            .iter()
                            .find(|c| c.ns == STREAM_ERRORS && c.name != "text")
                            .map(|c| c.name.clone());
                    } else if e.is("close", FRAMING) {
                        break;
                    }
                }
                Some(Message::Close(_)) | None => bail!("closed without <close/>"),
                Some(_) => {}
            }
        }
        match self.raw().await {
            Ok(Some(Message::Close(_))) | Ok(None) | Err(_) => {}
            Ok(Some(other)) => bail!("expected the WebSocket Close, got {other:?}"),
        }
        condition.context("no stream error before <close/>")
    }
}

#[tokio::test]
async fn a_browser_client_logs_in_receives_and_confirms_over_websocket() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "web", "browser", json!({"platform": "xmpp"}))
        .await?;
    let local = jid.split_once('@').context("jid without @")?.0.to_string();
    let mut c = WsClient::connect(env.websocket_addr()?).await?;

    let (open, features) = c.open().await?;
    assert_eq!(open.attr("from"), Some("pushgate.test"), "{open:?}");
    assert_eq!(open.attr("version"), Some("1.0"));
    assert!(open.attr("id").is_some_and(|id| !id.is_empty()));
    let mechs: Vec<&str> = features
        .child("mechanisms", SASL)
        .context("no SASL offered")?
        .children
        .iter()
        .map(|m| m.text.as_str())
        .collect();
    assert_eq!(mechs, ["SCRAM-SHA-256", "PLAIN"]);
    assert!(
        features.children.len() == 1,
        "no STARTTLS over WebSocket (RFC 7395 §3.9): {features:?}"
    );

    // SCRAM-SHA-256, one element per message
    let mut scram = Scram::new(&local);
    c.send(&format!(
        "<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>{}</auth>",
        scram.client_first()
    ))
    .await?;
    let challenge = c.next().await?;
    assert!(challenge.is("challenge", SASL), "{challenge:?}");
    c.send(&format!(
        "<response xmlns='{SASL}'>{}</response>",
        scram.client_final(&challenge.text, &pw)?
    ))
    .await?;
    let success = c.next().await?;
    assert!(success.is("success", SASL), "{success:?}");
    scram.verify_success(&success.text)?;

    // the restart is a new <open/>
    let (_, features) = c.open().await?;
    assert!(features.child("bind", BIND).is_some(), "{features:?}");
    assert!(features.child("sm", SM).is_some(), "{features:?}");
    c.send(&format!(
        "<iq xmlns='{CLIENT}' type='set' id='b1'><bind xmlns='{BIND}'><resource>tab</resource></bind></iq>"
    ))
    .await?;
    let bound = c.next().await?;
    assert!(
        bound.is("iq", CLIENT),
        "stanzas carry jabber:client: {bound:?}"
    );
    assert_eq!(bound.attr("type"), Some("result"));
    let full = bound
        .child("bind", BIND)
        .and_then(|b| b.child("jid", BIND))
        .map(|j| j.text.clone());
    assert_eq!(full, Some(format!("{jid}/tab")));
    c.send("<enable xmlns='urn:xmpp:sm:3'/>").await?;
    assert!(c.next().await?.is("enabled", SM));

    // XEP-0199 pings keep working as stanzas; WebSocket pings are answered with pongs
    c.send(&format!(
        "<iq xmlns='{CLIENT}' type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await?;
    let pong = c.next().await?;
    assert_eq!(
        (pong.attr("id"), pong.attr("type")),
        (Some("p1"), Some("result"))
    );
    c.ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await?;
    loop {
        match c.raw().await? {
            Some(Message::Pong(p)) => {
                assert_eq!(&p[..], b"are you there");
                break;
            }
            Some(Message::Text(_)) => continue,
            other => bail!("expected a pong, got {other:?}"),
        }
    }

    // a message sent through the API arrives as one message, is confirmed with a receipt
    let (status, body) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "web"}], "text": "hello <browser> & co"}),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    let id = body["messages"][0]["id"]
        .as_str()
        .context("no message id")?
        .to_string();
    let m = loop {
        let e = c.next().await?;
        if e.name == "message" {
            break e;
        }
    };
    assert!(m.is("message", CLIENT), "{m:?}");
    assert_eq!(m.attr("id"), Some(id.as_str()));
    assert_eq!(
        m.child("body", CLIENT).map(|b| b.text.as_str()),
        Some("hello <browser> & co")
    );
    assert!(m.child("request", "urn:xmpp:receipts").is_some());
    env.wait_status(&key, &id, "sent").await?;
    c.send(&format!(
        "<message xmlns='{CLIENT}' to='pushgate.test' id='r1'><received xmlns='urn:xmpp:receipts' id='{id}'/></message>"
    ))
    .await?;
    env.wait_status(&key, &id, "delivered").await?;

    // <close/> is answered with <close/>, then the WebSocket closes
    c.send(CLOSE).await?;
    loop {
        let e = c.next().await?;
        if e.is("close", FRAMING) {
            break;
        }
    }
    match c.raw().await {
        Ok(Some(Message::Close(_))) | Ok(None) | Err(_) => {}
        Ok(Some(other)) => bail!("expected the WebSocket Close, got {other:?}"),
    }
    // and goes away, as a browser does after the closing handshake
    drop(c);
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_upgrade_without_the_xmpp_subprotocol_is_refused() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let addr = env.websocket_addr()?;
    let status = |r: Result<Ws, tungstenite::Error>| match r {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("neither upgraded nor refused over HTTP: {e}"),
    };
    assert_eq!(status(upgrade(addr, "/xmpp-websocket", None).await?), 400);
    assert_eq!(
        status(upgrade(addr, "/xmpp-websocket", Some("xmpp-framing")).await?),
        400
    );
    assert_eq!(status(upgrade(addr, "/", Some("xmpp")).await?), 404);
    assert_eq!(
        status(upgrade(addr, "/xmpp-websocket", Some("chat, xmpp")).await?),
        101
    );
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn framing_violations_end_the_stream_with_the_right_error() -> anyhow::Result<()> {
    let env = TestEnv::start_with(|s| s.edge.max_stanza_bytes = 4096).await?;
    let addr = env.websocket_addr()?;

    // the first message must be <open/>
    let mut c = WsClient::connect(addr).await?;
    c.send(&format!("<iq xmlns='{CLIENT}' type='get' id='x'/>"))
        .await?;
    assert_eq!(c.stream_error(false).await?, "invalid-xml");
    drop(c);

    // <open/> must be in the framing namespace
    let mut c = WsClient::connect(addr).await?;
    c.send("<open to='pushgate.test' version='1.0'/>").await?;
    assert_eq!(c.stream_error(false).await?, "invalid-namespace");
    drop(c);

    // one element per message
    let mut c = WsClient::connect(addr).await?;
    c.open().await?;
    c.send(&format!(
        "<auth xmlns='{SASL}' mechanism='PLAIN'>AGEAYg==</auth><auth xmlns='{SASL}' mechanism='PLAIN'>AGEAYg==</auth>"
    ))
    .await?;
    assert_eq!(c.stream_error(true).await?, "not-well-formed");
    drop(c);

    // no more than edge.max_stanza_bytes in a message
    let mut c = WsClient::connect(addr).await?;
    c.open().await?;
    c.send(&format!(
        "<message xmlns='{CLIENT}'><body>{}</body></message>",
        "x".repeat(20_000)
    ))
    .await?;
    assert_eq!(c.stream_error(true).await?, "policy-violation");
    drop(c);

    // what the parser finds is answered the same way (after the real <open/>)
    let mut c = WsClient::connect(addr).await?;
    c.open().await?;
    c.send("<message><!-- no comments --></message>").await?;
    assert_eq!(c.stream_error(true).await?, "restricted-xml");
    drop(c);
    env.stop().await;
    Ok(())
}
