//! The gRPC API and the SSE event stream, on the same HTTPS port as REST: a tonic client over
//! TLS (h2 by ALPN) and reqwest reading `text/event-stream`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;
use pushgate_core::time::{now_ms, rfc3339};
use pushgate_proto::v1 as pb;
use pushgate_proto::v1::device_service_client::DeviceServiceClient;
use pushgate_proto::v1::messaging_service_client::MessagingServiceClient;
use pushgate_testkit::TestEnv;
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Streaming};

/// Bounds every wait for the server, so a broken stream fails the test instead of hanging it.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// A channel to the API port. TLS is done by this connector (test CA, ALPN h2) so that tonic
/// needs none of its TLS features, which would bring a second crypto stack.
async fn channel(env: &TestEnv) -> anyhow::Result<Channel> {
    pushgate_runtime::tls::install_crypto_provider();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(pushgate_testkit::root_store()?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let connector = tower::service_fn(move |uri: http::Uri| {
        let tls = tls.clone();
        async move {
            let host = uri.host().context("endpoint without host")?.to_string();
            let port = uri.port_u16().context("endpoint without port")?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let name = rustls_pki_types::ServerName::try_from(host)?;
            let stream = tls.connect(name, tcp).await?;
            Ok::<_, anyhow::Error>(TokioIo::new(stream))
        }
    });
    Ok(Endpoint::from_shared(env.api.clone())?
        .connect_with_connector(connector)
        .await?)
}

/// A request carrying the app's API key, as backends send it.
fn authed<T>(key: &str, msg: T) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse()?);
    Ok(req)
}

/// The status of a call that must fail.
fn refused<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
) -> anyhow::Result<tonic::Status> {
    match r {
        Ok(v) => bail!("expected an error, got {v:?}"),
        Err(s) => Ok(s),
    }
}

fn xmpp_device(user: &str, device: &str) -> pb::RegisterDeviceRequest {
    pb::RegisterDeviceRequest {
        user_id: user.into(),
        device_id: device.into(),
        platform: pb::Platform::Xmpp.into(),
        ..Default::default()
    }
}

fn to_user(user: &str, text: &str) -> pb::SendRequest {
    pb::SendRequest {
        recipients: vec![pb::Recipient {
            user_id: Some(user.into()),
            ..Default::default()
        }],
        text: text.into(),
        ..Default::default()
    }
}

/// Sends one message to `user` over gRPC; answers its id.
async fn send_one(
    msgs: &mut MessagingServiceClient<Channel>,
    key: &str,
    user: &str,
    text: &str,
) -> anyhow::Result<String> {
    msgs.send(authed(key, to_user(user, text))?)
        .await?
        .into_inner()
        .messages
        .first()
        .map(|m| m.id.clone())
        .context("no message accepted")
}

/// The next event of a watch.
async fn next_event(stream: &mut Streaming<pb::Event>) -> anyhow::Result<pb::Event> {
    tokio::time::timeout(HANG_GUARD, stream.message())
        .await
        .context("no event arrived")??
        .context("the event stream ended")
}

#[tokio::test]
async fn grpc_devices_and_messages_behave_like_rest() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let ch = channel(&env).await?;
    let mut devices = DeviceServiceClient::new(ch.clone());
    let mut msgs = MessagingServiceClient::new(ch);

    // register, then update: same login, created only the first time
    let first = devices
        .register_device(authed(&key, xmpp_device("alice", "phone"))?)
        .await?
        .into_inner();
    assert!(first.created);
    assert_eq!(first.platform, i32::from(pb::Platform::Xmpp));
    let login = first.xmpp.context("no XMPP login")?;
    assert!(login.jid.ends_with("@pushgate.test"), "{}", login.jid);
    let again = devices
        .register_device(authed(&key, xmpp_device("alice", "phone"))?)
        .await?
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.xmpp.map(|x| x.password), Some(login.password));
    let s = refused(
        devices
            .register_device(authed(
                &key,
                pb::RegisterDeviceRequest {
                    platform: pb::Platform::Unspecified.into(),
                    ..xmpp_device("alice", "tablet")
                },
            )?)
            .await,
    )?;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("platform: "), "{s:?}");

    let list = devices
        .list_devices(authed(
            &key,
            pb::ListDevicesRequest {
                user_id: "alice".into(),
            },
        )?)
        .await?
        .into_inner();
    assert_eq!(list.devices.len(), 1, "{list:?}");
    assert_eq!(list.devices[0].device_id, "phone");
    assert_eq!(list.devices[0].token_state, "none");
    assert!(!list.devices[0].online);

    // send and read back, over gRPC and over REST
    let sent = msgs
        .send(authed(
            &key,
            pb::SendRequest {
                data_json: Some(r#"{"order":42}"#.into()),
                ..to_user("alice", "hello")
            },
        )?)
        .await?
        .into_inner();
    assert_eq!(sent.messages.len(), 1);
    let id = sent.messages[0].id.clone();
    assert_eq!(sent.messages[0].status, i32::from(pb::Status::Enqueued));
    let got = msgs
        .get_message(authed(&key, pb::GetMessageRequest { id: id.clone() })?)
        .await?
        .into_inner();
    assert_eq!(got.id, id);
    // the device is offline and has no push token, so routing leaves it enqueued
    assert_eq!(got.status, i32::from(pb::Status::Enqueued), "{got:?}");
    assert_eq!(
        got.history.first().map(|h| h.status),
        Some(i32::from(pb::Status::Enqueued))
    );
    let (code, rest) = env.message(&key, &id).await?;
    assert_eq!((code, rest["status"].as_str()), (200, Some("enqueued")));
    let page = msgs
        .list_messages(authed(
            &key,
            pb::ListMessagesRequest {
                filter: Some(pb::list_messages_request::Filter::UserId("alice".into())),
                ..Default::default()
            },
        )?)
        .await?
        .into_inner();
    assert_eq!(
        page.messages
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        [id.as_str()]
    );
    let s = refused(
        msgs.list_messages(authed(&key, pb::ListMessagesRequest::default())?)
            .await,
    )?;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("filter: "), "{s:?}");

    // authentication
    let s = refused(msgs.send(authed("pk_nope", to_user("alice", "x"))?).await)?;
    assert_eq!(s.code(), Code::Unauthenticated);
    let s = refused(msgs.send(Request::new(to_user("alice", "x"))).await)?;
    assert_eq!(s.code(), Code::Unauthenticated);

    // validation names the field, like REST's problem `field`
    let s = refused(
        msgs.send(authed(
            &key,
            pb::SendRequest {
                ttl: Some(0),
                ..to_user("alice", "x")
            },
        )?)
        .await,
    )?;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("ttl: "), "{s:?}");
    let s = refused(
        msgs.send(authed(
            &key,
            pb::SendRequest {
                data_json: Some("[1]".into()),
                ..to_user("alice", "x")
            },
        )?)
        .await,
    )?;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("data_json: "), "{s:?}");
    let s = refused(msgs.send(authed(&key, to_user("ghost", "x"))?).await)?;
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().starts_with("recipients[0].user_id: "), "{s:?}");

    // idempotency: same key and request, same answer; same key, other request, refused
    let idem = |text: &str| pb::SendRequest {
        idempotency_key: Some("order-42-notice".into()),
        ..to_user("alice", text)
    };
    let a = msgs.send(authed(&key, idem("once"))?).await?.into_inner();
    let b = msgs.send(authed(&key, idem("once"))?).await?.into_inner();
    assert_eq!(a, b);
    let s = refused(msgs.send(authed(&key, idem("twice"))?).await)?;
    assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");

    // another app's message is not found, for reading and cancelling
    let (_app2, key2) = env.create_app(None).await?;
    env.register_device(&key2, "bob", "d", json!({"platform": "xmpp"}))
        .await?;
    let (code, body) = env
        .send(
            &key2,
            json!({"recipients": [{"user_id": "bob"}], "text": "x"}),
        )
        .await?;
    assert_eq!(code, 202, "{body}");
    let other = body["messages"][0]["id"]
        .as_str()
        .context("no id")?
        .to_string();
    let s = refused(
        msgs.get_message(authed(&key, pb::GetMessageRequest { id: other.clone() })?)
            .await,
    )?;
    assert_eq!(s.code(), Code::NotFound);
    let s = refused(
        msgs.cancel_message(authed(&key, pb::CancelMessageRequest { id: other })?)
            .await,
    )?;
    assert_eq!(s.code(), Code::NotFound);

    // cancel once; the second time the message is settled
    let c = msgs
        .cancel_message(authed(&key, pb::CancelMessageRequest { id: id.clone() })?)
        .await?
        .into_inner();
    assert_eq!(c.status, i32::from(pb::Status::Cancelled));
    let s = refused(
        msgs.cancel_message(authed(&key, pb::CancelMessageRequest { id: id.clone() })?)
            .await,
    )?;
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");

    // deregister one device, delete the user with the rest
    devices
        .register_device(authed(&key, xmpp_device("alice", "laptop"))?)
        .await?;
    let dereg = || pb::DeregisterDeviceRequest {
        user_id: "alice".into(),
        device_id: "laptop".into(),
    };
    devices.deregister_device(authed(&key, dereg())?).await?;
    let s = refused(devices.deregister_device(authed(&key, dereg())?).await)?;
    assert_eq!(s.code(), Code::NotFound);
    devices
        .delete_user(authed(
            &key,
            pb::DeleteUserRequest {
                user_id: "alice".into(),
            },
        )?)
        .await?;
    let list = devices
        .list_devices(authed(
            &key,
            pb::ListDevicesRequest {
                user_id: "alice".into(),
            },
        )?)
        .await?
        .into_inner();
    assert!(list.devices.is_empty(), "{list:?}");
    let s = refused(msgs.send(authed(&key, to_user("alice", "x"))?).await)?;
    assert_eq!(s.code(), Code::FailedPrecondition);

    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn grpc_watch_events_replays_resumes_and_follows() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    env.register_device(&key, "w", "d", json!({"platform": "xmpp"}))
        .await?;
    let mut msgs = MessagingServiceClient::new(channel(&env).await?);
    let before = rfc3339(now_ms() - 60_000);
    let id = send_one(&mut msgs, &key, "w", "one").await?;
    let id_b = send_one(&mut msgs, &key, "w", "two").await?;
    let watch = |start| pb::WatchEventsRequest { start: Some(start) };
    use pb::watch_events_request::Start;

    // from a time before the send: the retained `enqueued` event is replayed
    let mut since = msgs
        .watch_events(authed(&key, watch(Start::Since(before)))?)
        .await?
        .into_inner();
    let ev = next_event(&mut since).await?;
    assert_eq!(
        (ev.id.as_str(), ev.event.as_str(), ev.message_id.as_deref()),
        (format!("{id}.1").as_str(), "enqueued", Some(id.as_str()))
    );
    assert_eq!(ev.user_id.as_deref(), Some("w"));
    assert_eq!(next_event(&mut since).await?.id, format!("{id_b}.1"));

    // after the first event: the retained one that followed it, then live ones
    let mut after = msgs
        .watch_events(authed(&key, watch(Start::AfterEventId(format!("{id}.1"))))?)
        .await?
        .into_inner();
    assert_eq!(next_event(&mut after).await?.id, format!("{id_b}.1"));
    msgs.cancel_message(authed(&key, pb::CancelMessageRequest { id: id.clone() })?)
        .await?;
    let ev = next_event(&mut after).await?;
    assert_eq!(
        (ev.id.as_str(), ev.event.as_str()),
        (format!("{id}.2").as_str(), "cancelled")
    );
    // the `since` watch keeps following live events too
    let ev = next_event(&mut since).await?;
    assert_eq!(ev.id, format!("{id}.2"));

    // without a start: only events after the watch began
    let mut live = msgs
        .watch_events(authed(&key, pb::WatchEventsRequest { start: None })?)
        .await?
        .into_inner();
    let id_c = send_one(&mut msgs, &key, "w", "three").await?;
    let ev = next_event(&mut live).await?;
    assert_eq!(ev.id, format!("{id_c}.1"));

    // bad starts
    let s = refused(
        msgs.watch_events(authed(&key, watch(Start::AfterEventId("nope.1".into())))?)
            .await,
    )?;
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let s = refused(
        msgs.watch_events(authed(&key, watch(Start::Since("yesterday".into())))?)
            .await,
    )?;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("since: "), "{s:?}");
    let s = refused(
        msgs.watch_events(authed("pk_nope", pb::WatchEventsRequest { start: None })?)
            .await,
    )?;
    assert_eq!(s.code(), Code::Unauthenticated);

    // the client goes away; the server drops its consumers, so shutdown need not wait
    drop((since, after, live));
    env.stop().await;
    Ok(())
}

/// Reads server-sent events from a response body.
struct SseReader {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl SseReader {
    /// The next event with an id, as `(id, data JSON)`; comments (keep-alives) are skipped.
    async fn next(&mut self) -> anyhow::Result<(String, Value)> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
                let frame = String::from_utf8(frame)?;
                let mut id = None;
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim_start().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if let Some(id) = id {
                    return Ok((id, serde_json::from_str(&data)?));
                }
                continue;
            }
            let chunk = tokio::time::timeout(HANG_GUARD, self.resp.chunk())
                .await
                .context("no event arrived")??
                .context("the event stream ended")?;
            self.buf.extend_from_slice(&chunk);
        }
    }
}

#[tokio::test]
async fn sse_streams_events_and_resumes_after_last_event_id() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    env.register_device(&key, "s", "d", json!({"platform": "xmpp"}))
        .await?;
    let before = rfc3339(now_ms() - 60_000);
    let (code, body) = env
        .send(&key, json!({"recipients": [{"user_id": "s"}], "text": "x"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let id = body["messages"][0]["id"]
        .as_str()
        .context("no id")?
        .to_string();
    let url = format!("{}/v1/events/stream", env.api);

    let resp = env
        .http
        .get(format!("{url}?since={before}"))
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let mut sse = SseReader {
        resp,
        buf: Vec::new(),
    };
    let (ev_id, data) = sse.next().await?;
    assert_eq!(ev_id, format!("{id}.1"));
    assert_eq!(data["id"], ev_id.as_str());
    assert_eq!(data["event"], "enqueued");
    assert_eq!(data["message_id"], id.as_str());
    // the public event, not the bus envelope
    assert!(data.get("app_id").is_none(), "{data}");
    drop(sse);
    let (code, body) = env
        .send(&key, json!({"recipients": [{"user_id": "s"}], "text": "y"}))
        .await?;
    assert_eq!(code, 202, "{body}");
    let id_b = body["messages"][0]["id"].as_str().context("no id")?;

    // a reconnect with Last-Event-ID resumes right after it (the retained event that
    // followed, then live ones), whatever the query says
    let resp = env
        .http
        .get(format!("{url}?since={before}"))
        .bearer_auth(&key)
        .header("last-event-id", &ev_id)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let mut sse = SseReader {
        resp,
        buf: Vec::new(),
    };
    assert_eq!(sse.next().await?.0, format!("{id_b}.1"));
    let r = env
        .http
        .delete(format!("{}/v1/messages/{id}", env.api))
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let (ev_id, data) = sse.next().await?;
    assert_eq!(ev_id, format!("{id}.2"));
    assert_eq!(data["event"], "cancelled");

    // refused before streaming: no key, two starts, an unknown id
    let r = env.http.get(&url).send().await?;
    assert_eq!(r.status(), 401);
    let r = env
        .http
        .get(format!("{url}?since={before}&after_event_id={id}.1"))
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    let r = env
        .http
        .get(&url)
        .bearer_auth(&key)
        .header("last-event-id", "nope.1")
        .send()
        .await?;
    assert_eq!(r.status(), 404);

    drop(sse);
    env.stop().await;
    Ok(())
}

/// A watch reads every event of a batched stream message (`pushgate_bus::batch`), and resumes
/// right after an event in the middle of one. The batch is written out by hand in the bus's
/// format, so this checks the watch against the format rather than the publisher's timing.
#[tokio::test]
async fn grpc_watch_reads_and_resumes_inside_a_batched_stream_message() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (app, key) = env.create_app(None).await?;
    let before = rfc3339(now_ms() - 60_000);
    let line = |id: &str| {
        json!({"app_id": app, "seq": 1, "event": {"id": format!("{id}.1"), "event": "enqueued",
            "message_id": id, "at": rfc3339(now_ms())}})
        .to_string()
    };
    let payload = ["bx", "by", "bz"].map(line).join("\n");
    let mut headers = pushgate_bus::async_nats::HeaderMap::new();
    headers.insert(pushgate_bus::batch::BATCH_HEADER, "3");
    env.bus
        .jetstream()
        .publish_with_headers(env.bus.names().events(&app), headers, payload.into())
        .await?
        .await?;

    let mut msgs = MessagingServiceClient::new(channel(&env).await?);
    let watch = |start| pb::WatchEventsRequest { start: Some(start) };
    use pb::watch_events_request::Start;
    let mut since = msgs
        .watch_events(authed(&key, watch(Start::Since(before)))?)
        .await?
        .into_inner();
    for id in ["bx.1", "by.1", "bz.1"] {
        assert_eq!(next_event(&mut since).await?.id, id);
    }
    let mut after = msgs
        .watch_events(authed(&key, watch(Start::AfterEventId("by.1".into())))?)
        .await?
        .into_inner();
    assert_eq!(next_event(&mut after).await?.id, "bz.1");
    // and then live events, published by the suite itself
    env.register_device(&key, "w", "d", json!({"platform": "xmpp"}))
        .await?;
    let id = send_one(&mut msgs, &key, "w", "live").await?;
    assert_eq!(next_event(&mut after).await?.id, format!("{id}.1"));

    drop((since, after));
    env.stop().await;
    Ok(())
}

/// An app's live watches are bounded per ingress instance: over the limit a watch is refused
/// with a 429 problem and no consumer is made, another app's watches are not affected, and a
/// closed watch gives its slot back.
#[tokio::test]
async fn live_watches_are_bounded_per_app() -> anyhow::Result<()> {
    let env = TestEnv::start_with(|s| s.ingress.max_watches_per_app = 2).await?;
    let (_app, key) = env.create_app(None).await?;
    let (_other, other_key) = env.create_app(None).await?;
    let url = format!("{}/v1/events/stream", env.api);
    let open = |k: String| {
        let req = env.http.get(&url).bearer_auth(k);
        async move { anyhow::Ok(req.send().await?) }
    };
    let first = open(key.clone()).await?;
    let second = open(key.clone()).await?;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = open(key.clone()).await?;
    assert_eq!(third.status(), 429);
    let p: Value = third.json().await?;
    assert_eq!(p["type"], "urn:pushgate:problem:too-many-watches", "{p}");
    let theirs = open(other_key).await?;
    assert_eq!(theirs.status(), 200);

    // the server gives the slot back once it sees the stream closed
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let again = loop {
        let r = open(key.clone()).await?;
        if r.status() == 200 {
            break r;
        }
        assert_eq!(r.status(), 429);
        if std::time::Instant::now() > deadline {
            bail!("the closed watch's slot never came back");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop((second, again, theirs));
    env.stop().await;
    Ok(())
}
