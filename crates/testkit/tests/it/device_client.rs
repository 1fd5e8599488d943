//! The device client library (`pushgate-device`) against the real suite: receiving,
//! confirming, reading, dedupe with native pushes, surviving a dropped connection, replies,
//! retractions, push registration over XMPP and refused credentials.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use pushgate_device::{Client, ClientConfig, ClientError, DeviceEvent, TlsMode};
use pushgate_testkit::webhook::Receiver;
use pushgate_testkit::TestEnv;
use serde_json::{json, Value};

/// A store directory removed when the test ends.
struct StoreDir(PathBuf);

impl StoreDir {
    fn new() -> Self {
        StoreDir(std::env::temp_dir().join(format!(
            "pushgate-device-it-{}",
            uuid::Uuid::new_v4().simple()
        )))
    }

    fn file(&self) -> PathBuf {
        self.0.join("device.redb")
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(
    env: &TestEnv,
    jid: &str,
    password: &str,
    store: &StoreDir,
) -> anyhow::Result<ClientConfig> {
    Ok(ClientConfig {
        jid: jid.to_string(),
        password: password.to_string(),
        host: "127.0.0.1".into(),
        port: env.xmpp_addr().port(),
        tls: TlsMode::Starttls,
        ca_pem_file: Some(pushgate_testkit::certs()?.ca),
        resource: Some("it".into()),
        store_path: store.file(),
    })
}

/// The next event, with a generous guard so a broken client fails the test instead of
/// hanging it (not a timing claim).
async fn next(client: &Client) -> anyhow::Result<DeviceEvent> {
    Ok(
        tokio::time::timeout(Duration::from_secs(30), client.next_event())
            .await
            .context("no event from the device client")??,
    )
}

/// The next event, which must be a message; returns its id.
async fn next_message_id(client: &Client) -> anyhow::Result<String> {
    match next(client).await? {
        DeviceEvent::Message { id, .. } => Ok(id),
        other => bail!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn receives_acks_and_reads_with_a_local_record() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "ann", "phone", json!({"platform": "xmpp"}))
        .await?;
    let dir = StoreDir::new();
    let client = Client::connect(config(&env, &jid, &pw, &dir)?).await?;
    let (_, body) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "ann"}], "title": "Order <42>", "text": "on its way & soon",
                   "data": {"order": 42, "tags": ["a\"b"]}}),
        )
        .await?;
    let id = body["messages"][0]["id"]
        .as_str()
        .context("id")?
        .to_string();
    let DeviceEvent::Message {
        id: got,
        title,
        text,
        data_json,
        received_at,
    } = next(&client).await?
    else {
        bail!("expected a message");
    };
    assert_eq!(got, id);
    assert_eq!(title.as_deref(), Some("Order <42>"));
    assert_eq!(text, "on its way & soon");
    let data: Value = serde_json::from_str(data_json.as_deref().context("data")?)?;
    assert_eq!(data, json!({"order": 42, "tags": ["a\"b"]}));
    let state = client
        .message_state(&id)
        .await?
        .context("no local record")?;
    assert_eq!(state.first_seen_ms, received_at);
    assert!(!state.acked && !state.read);

    client.ack(&id).await?;
    env.wait_status(&key, &id, "delivered").await?;
    client.mark_read(&id).await?;
    env.wait_status(&key, &id, "read").await?;
    let state = client
        .message_state(&id)
        .await?
        .context("no local record")?;
    assert!(state.acked && state.read, "{state:?}");
    // the app already saw it: a native push of the same message must not be shown again
    assert!(!client.note_native_push(&id).await?);
    client.close().await?;
    assert_eq!(client.next_event().await, Err(ClientError::Closed));
    assert_eq!(client.ack(&id).await, Err(ClientError::Closed));
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_message_seen_by_native_push_is_confirmed_but_not_shown_again() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "ben", "phone", json!({"platform": "xmpp"}))
        .await?;
    let dir = StoreDir::new();
    // sent while the device is offline; the app shows it from a native push first, e.g. in
    // a notification extension that opens the store without connecting
    let pushed = env.send_text(&key, "ben", "seen natively").await?;
    assert!(pushgate_device::note_native_push_in_store(
        dir.file(),
        pushed.clone()
    )?);
    let client = Client::connect(config(&env, &jid, &pw, &dir)?).await?;
    // the pending queue delivers oldest first, so the pushed copy comes (and is dropped)
    // before this one
    let fresh = env.send_text(&key, "ben", "only over xmpp").await?;
    assert_eq!(next_message_id(&client).await?, fresh);
    // the XMPP copy of the pushed message was still confirmed, by the client on its own
    env.wait_status(&key, &pushed, "delivered").await?;
    let state = client.message_state(&pushed).await?.context("record")?;
    assert!(state.native_push && state.acked, "{state:?}");
    assert!(!client.note_native_push(&pushed).await?);
    client.ack(&fresh).await?;
    env.wait_status(&key, &fresh, "delivered").await?;
    client.close().await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn resumes_after_a_dropped_connection() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "cy", "phone", json!({"platform": "xmpp"}))
        .await?;
    let dir = StoreDir::new();
    let client = Client::connect(config(&env, &jid, &pw, &dir)?).await?;
    let taken = env.send_text(&key, "cy", "before the drop").await?;
    assert_eq!(next_message_id(&client).await?, taken);

    client.drop_connection_for_test(true).await?;
    let while_away = env.send_text(&key, "cy", "while away").await?;
    assert_eq!(next(&client).await?, DeviceEvent::Reconnected);
    assert_eq!(next_message_id(&client).await?, while_away);
    // the resumption told the server which messages the app had taken: `taken` counts as
    // delivered although the app never sent a receipt (only a resumed stream does that)
    env.wait_status(&key, &taken, "delivered").await?;
    // stanzas written on the resumed stream are acknowledged like before the drop
    client.ack(&while_away).await?;
    env.wait_status(&key, &while_away, "delivered").await?;
    let after = env.send_text(&key, "cy", "after").await?;
    assert_eq!(next_message_id(&client).await?, after);
    client.close().await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_new_session_after_a_drop_shows_nothing_twice() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "di", "phone", json!({"platform": "xmpp"}))
        .await?;
    let dir = StoreDir::new();
    let client = Client::connect(config(&env, &jid, &pw, &dir)?).await?;
    // taken by the app but not confirmed: the server sends it again on a new session
    let first = env.send_text(&key, "di", "before the drop").await?;
    assert_eq!(next_message_id(&client).await?, first);

    // as if the resume window had passed: the client binds a new session
    client.drop_connection_for_test(false).await?;
    let while_away = env.send_text(&key, "di", "while away").await?;
    assert_eq!(next(&client).await?, DeviceEvent::Reconnected);
    // the re-sent copy of `first` comes before this one (oldest first) and is dropped
    assert_eq!(next_message_id(&client).await?, while_away);
    client.ack(&first).await?;
    client.ack(&while_away).await?;
    env.wait_status(&key, &first, "delivered").await?;
    env.wait_status(&key, &while_away, "delivered").await?;
    // nothing else was queued: the next event is the next message
    let after = env.send_text(&key, "di", "after").await?;
    assert_eq!(next_message_id(&client).await?, after);

    // and across a restart of the app: the process dies without a goodbye (closing while
    // disconnected sends nothing), a new client opens the same store
    client.drop_connection_for_test(false).await?;
    client.close().await?;
    let unconfirmed = env.send_text(&key, "di", "offline").await?;
    let again = Client::connect(config(&env, &jid, &pw, &dir)?).await?;
    // `after` was taken but never confirmed: sent again, and dropped by the store before
    // `unconfirmed` arrives
    assert_eq!(next_message_id(&again).await?, unconfirmed);
    again.close().await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn reply_over_direct_tls_reaches_the_webhook() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let hook = Receiver::start().await?;
    let (_app, key) = env.create_app(Some(&hook.url)).await?;
    let (jid, pw) = env
        .register_device(&key, "dee", "phone", json!({"platform": "xmpp"}))
        .await?;
    let dir = StoreDir::new();
    let direct = env
        .suite
        .as_ref()
        .and_then(|s| s.addresses.xmpp_direct_tls)
        .context("direct TLS listener")?;
    let mut cfg = config(&env, &jid, &pw, &dir)?;
    cfg.tls = TlsMode::DirectTls;
    cfg.port = direct.port();
    let client = Client::connect(cfg).await?;
    let id = env.send_text(&key, "dee", "lunch?").await?;
    assert_eq!(next_message_id(&client).await?, id);
    // returns once the server acknowledged the reply
    client.reply(&id, "yes <please> & thanks").await?;
    let events = hook
        .wait_for("a reply event", |ev| {
            ev.iter().any(|e| e["event"] == "reply")
        })
        .await?;
    let reply = events
        .iter()
        .find(|e| e["event"] == "reply")
        .context("reply")?;
    assert_eq!(reply["message_id"], json!(id));
    assert_eq!(reply["text"], json!("yes <please> & thanks"));
    assert_eq!(
        client.reply(&id, "   ").await,
        Err(ClientError::Invalid(
            "reply text must be 1-4096 bytes and not blank".into()
        ))
    );
    client.close().await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_cancelled_message_is_retracted() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "eve", "phone", json!({"platform": "xmpp"}))
        .await?;
    let dir = StoreDir::new();
    let client = Client::connect(config(&env, &jid, &pw, &dir)?).await?;
    let id = env.send_text(&key, "eve", "never mind").await?;
    assert_eq!(next_message_id(&client).await?, id);
    let r = env
        .http
        .delete(format!("{}/v1/messages/{id}", env.api))
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(
        next(&client).await?,
        DeviceEvent::Retracted { id: id.clone() }
    );
    let state = client.message_state(&id).await?.context("record")?;
    assert!(state.retracted, "{state:?}");
    client.close().await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn registers_a_native_push_token_over_xmpp() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "fay", "phone", json!({"platform": "android"}))
        .await?;
    let token_state = || async {
        let v: Value = env
            .http
            .get(format!("{}/v1/users/fay/devices", env.api))
            .bearer_auth(&key)
            .send()
            .await?
            .json()
            .await?;
        anyhow::Ok(v["devices"][0]["token_state"].clone())
    };
    let dir = StoreDir::new();
    let client = Client::connect(config(&env, &jid, &pw, &dir)?).await?;
    assert!(matches!(
        client.disable_push().await,
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(
        client.enable_push("gcm", "t").await,
        Err(ClientError::Invalid(_))
    ));
    client.enable_push("fcm", "fcm-token-xyz").await?;
    assert_eq!(token_state().await?, json!("valid"));
    // the service must match the platform; the server's refusal comes back as such
    assert_eq!(
        client.enable_push("apns", "x").await,
        Err(ClientError::Refused("not-acceptable".into()))
    );
    client.disable_push().await?;
    assert_eq!(token_state().await?, json!("none"));
    client.close().await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn refused_credentials_are_an_auth_error() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, _pw) = env
        .register_device(&key, "gus", "phone", json!({"platform": "xmpp"}))
        .await?;
    let dir = StoreDir::new();
    let err = Client::connect(config(&env, &jid, "wrong-password", &dir)?)
        .await
        .err()
        .context("a wrong password was accepted")?;
    assert!(matches!(err, ClientError::Auth(_)), "{err:?}");
    // a CA that did not sign the server's certificate is a TLS error, not a silent downgrade
    let mut cfg = config(&env, &jid, "whatever", &dir)?;
    cfg.ca_pem_file = None;
    let err = Client::connect(cfg)
        .await
        .err()
        .context("untrusted certificate accepted")?;
    assert!(matches!(err, ClientError::Tls(_)), "{err:?}");
    env.stop().await;
    Ok(())
}
