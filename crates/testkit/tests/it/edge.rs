//! xmpp-edge behaviour beyond the happy path: stream resumption after a cut, client state
//! indication, push registration over XMPP, limits and session replacement.

use std::time::Duration;

use pushgate_testkit::device::TestDevice;
use pushgate_testkit::TestEnv;
use serde_json::{json, Value};

/// Sends an XEP-0357 `<enable/>` for `service` and `node` as iq `id`, and returns the answer.
async fn push_enable(
    dev: &mut TestDevice,
    id: &str,
    service: &str,
    node: &str,
) -> anyhow::Result<xmpp_edge::xml::Element> {
    dev.send_raw(&format!(
        "<iq type='set' id='{id}'><enable xmlns='urn:xmpp:push:0' jid='{service}' node='{node}'/></iq>"
    ))
    .await?;
    dev.next_stanza().await
}

fn id_of(v: &Value) -> String {
    v["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_cut_connection_resumes_without_loss_or_duplicates() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "res", "d", json!({"platform": "xmpp"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    let sm_id = dev.enable_sm_resumable().await?;
    let (_, b1) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "res"}], "text": "first"}),
        )
        .await?;
    let first = id_of(&b1);
    assert_eq!(dev.next_message().await?.id, first);
    let h = dev.received_count();
    // the network drops before the device could confirm anything
    dev.drop_connection();
    let (_, b2) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "res"}], "text": "second"}),
        )
        .await?;
    let second = id_of(&b2);
    let (mut dev, answer) = TestDevice::resume(env.xmpp_addr(), &jid, &pw, &sm_id, h).await?;
    assert_eq!(answer.name, "resumed", "{answer:?}");
    assert_eq!(answer.attr("previd"), Some(sm_id.as_str()));
    // what the device had received before the cut counts as delivered and is not sent again
    env.wait_status(&key, &first, "delivered").await?;
    let m = dev.next_message().await?;
    assert_eq!(
        m.id, second,
        "only the message the device had not received comes again"
    );
    dev.ack_received(&second).await?;
    env.wait_status(&key, &second, "delivered").await?;
    // a stream closed cleanly cannot be resumed
    dev.close().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, again) = TestDevice::resume(env.xmpp_addr(), &jid, &pw, &sm_id, 0).await?;
        if again.name == "failed" {
            break;
        }
        // the close may still be in flight; a resumed probe is itself closed again
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed stream stayed resumable"
        );
    }
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_unknown_resumption_fails_cleanly_and_the_device_can_bind() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "res2", "d", json!({"platform": "xmpp"}))
        .await?;
    let (mut dev, answer) = TestDevice::resume(env.xmpp_addr(), &jid, &pw, "nope", 3).await?;
    assert_eq!(answer.name, "failed");
    assert!(answer
        .child("item-not-found", "urn:ietf:params:xml:ns:xmpp-stanzas")
        .is_some());
    dev.send_raw("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
        .await?;
    let bound = dev.next_stanza().await?;
    assert_eq!(bound.attr("type"), Some("result"));
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn inactive_clients_get_urgent_messages_first_and_the_rest_when_active() -> anyhow::Result<()>
{
    let env = TestEnv::start_with(|s| s.edge.csi_batch_secs = 600).await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "csi", "d", json!({"platform": "xmpp"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    dev.enable_sm().await?;
    dev.send_raw("<inactive xmlns='urn:xmpp:csi:0'/>").await?;
    // make sure the edge processed <inactive/> before sending: a ping round trip
    dev.send_raw("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await?;
    while dev.next_stanza().await?.attr("id") != Some("p1") {}
    let (_, n) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "csi"}], "text": "newsletter"}),
        )
        .await?;
    env.wait_status(&key, &id_of(&n), "enqueued").await?;
    let (_, u) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "csi"}], "text": "fraud alert", "priority": "high"}),
        )
        .await?;
    let first = dev.next_message().await?;
    assert_eq!(
        first.id,
        id_of(&u),
        "the urgent message goes out while the normal one is held"
    );
    dev.send_raw("<active xmlns='urn:xmpp:csi:0'/>").await?;
    let second = dev.next_message().await?;
    assert_eq!(second.id, id_of(&n));
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn devices_can_register_their_push_token_over_xmpp() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "p", "phone", json!({"platform": "android"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    let token_state = |env: &TestEnv, key: String| {
        let (http, url) = (env.http.clone(), format!("{}/v1/users/p/devices", env.api));
        async move {
            let v: Value = http.get(url).bearer_auth(key).send().await?.json().await?;
            anyhow::Ok(
                v["devices"][0]["token_state"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
    };
    assert_eq!(token_state(&env, key.clone()).await?, "none");
    let r = push_enable(&mut dev, "e1", "fcm", "fcm-token-123").await?;
    assert_eq!(
        (r.attr("id"), r.attr("type")),
        (Some("e1"), Some("result")),
        "{r:?}"
    );
    assert_eq!(token_state(&env, key.clone()).await?, "valid");
    // the wrong service for the platform is refused
    let r = push_enable(&mut dev, "e2", "apns", "x").await?;
    assert_eq!(r.attr("type"), Some("error"));
    dev.send_raw("<iq type='set' id='e3'><disable xmlns='urn:xmpp:push:0' jid='fcm'/></iq>")
        .await?;
    let r = dev.next_stanza().await?;
    assert_eq!(r.attr("type"), Some("result"));
    assert_eq!(token_state(&env, key.clone()).await?, "none");

    // an iPhone's APNs token must be hex, as over HTTP: anything else is a bad request
    let (jid, pw) = env
        .register_device(&key, "i", "iphone", json!({"platform": "ios"}))
        .await?;
    let mut iphone = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    let r = push_enable(&mut iphone, "i1", "apns", "not-a-token").await?;
    assert_eq!(
        (r.attr("id"), r.attr("type")),
        (Some("i1"), Some("error")),
        "{r:?}"
    );
    assert!(format!("{r:?}").contains("bad-request"), "{r:?}");
    let hex = "a1".repeat(32);
    let r = push_enable(&mut iphone, "i2", "apns", &hex).await?;
    assert_eq!(
        (r.attr("id"), r.attr("type")),
        (Some("i2"), Some("result")),
        "{r:?}"
    );
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn limits_end_the_stream_with_the_right_error_and_a_second_login_replaces_the_first(
) -> anyhow::Result<()> {
    let env = TestEnv::start_with(|s| s.edge.max_stanza_bytes = 4096).await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "lim", "d", json!({"platform": "xmpp"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    let big = "x".repeat(20_000);
    dev.send_raw(&format!("<message><body>{big}</body></message>"))
        .await?;
    let err = tokio::time::timeout(Duration::from_secs(20), dev.next_stanza()).await??;
    assert_eq!(err.name, "error");
    assert!(
        err.child("policy-violation", "urn:ietf:params:xml:ns:xmpp-streams")
            .is_some(),
        "{err:?}"
    );

    let mut first = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    let _second = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    let err = tokio::time::timeout(Duration::from_secs(20), first.next_stanza()).await??;
    assert_eq!(err.name, "error");
    assert!(
        err.child("conflict", "urn:ietf:params:xml:ns:xmpp-streams")
            .is_some(),
        "{err:?}"
    );
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn repeated_failed_logins_lock_the_account_and_the_address() -> anyhow::Result<()> {
    let env = TestEnv::start_with(|s| {
        s.edge.max_auth_failures_per_account = 2;
        s.edge.max_auth_failures_per_ip = 4;
    })
    .await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "lock", "d", json!({"platform": "xmpp"}))
        .await?;
    let (other, other_pw) = env
        .register_device(&key, "lock2", "d2", json!({"platform": "xmpp"}))
        .await?;
    for _ in 0..2 {
        assert!(TestDevice::connect(env.xmpp_addr(), &jid, "wrong")
            .await
            .is_err());
    }
    // the account is locked: even the right password is refused for now
    assert!(
        TestDevice::connect(env.xmpp_addr(), &jid, &pw)
            .await
            .is_err(),
        "locked account let a login through"
    );
    // another account from the same address still works until the address limit
    TestDevice::connect(env.xmpp_addr(), &other, &other_pw).await?;
    for _ in 0..2 {
        assert!(TestDevice::connect(env.xmpp_addr(), &other, "wrong")
            .await
            .is_err());
    }
    assert!(
        TestDevice::connect(env.xmpp_addr(), &other, &other_pw)
            .await
            .is_err(),
        "locked address let a login through"
    );
    env.stop().await;
    Ok(())
}

/// A client that opens TLS straight away on the STARTTLS port (slixmpp tries that first) is
/// closed at once, so it can fall back to STARTTLS; the XML reader would otherwise wait for a
/// `<` until the handshake timeout. The timeout here is ten minutes, so without the check this
/// test would hang until its guard fails.
#[tokio::test]
async fn a_tls_hello_on_the_starttls_port_is_closed_at_once() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::start_with(|s| s.edge.handshake_timeout_secs = 600).await?;
    let mut tcp = tokio::net::TcpStream::connect(env.xmpp_addr()).await?;
    // the start of a TLS 1.2/1.3 ClientHello: handshake record, version, length, client_hello
    tcp.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0xf4, 0x01, 0x00, 0x00, 0xf0, 0x03, 0x03,
    ])
    .await?;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(std::time::Duration::from_secs(60), tcp.read(&mut buf))
        .await
        .map_err(|_| anyhow::anyhow!("the edge kept a TLS hello on its STARTTLS port open"))?
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer: {:?}", &buf[..n]);

    // a plain client on the same port still gets its stream
    let mut tcp = tokio::net::TcpStream::connect(env.xmpp_addr()).await?;
    tcp.write_all(b"<?xml version='1.0'?><stream:stream to='pushgate.test' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
        .await?;
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("starttls") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(60), tcp.read(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("no stream features"))??;
        anyhow::ensure!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(tcp);
    env.stop().await;
    Ok(())
}
