//! One message through all services: accept → route → XMPP → receipt → webhook → API.

use pushgate_testkit::device::TestDevice;
use pushgate_testkit::webhook::{verify_signature, Receiver};
use pushgate_testkit::TestEnv;
use serde_json::{json, Value};

fn kinds_for(events: &[Value], id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["message_id"] == id && e["event"] != "reply")
        .map(|e| e["event"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn message_is_delivered_read_and_answered_end_to_end() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let hook = Receiver::start().await?;
    let (_app, key) = env.create_app(Some(&hook.url)).await?;
    let (jid, password) = env
        .register_device(&key, "alice", "phone-1", json!({"platform": "xmpp"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &password).await?;
    dev.enable_sm().await?;

    let (status, body) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "alice", "foreign_id": "order-42"}], "text": "Your card <was> used", "title": "Bank", "data": {"amount": 12}}),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    let id = body["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(body["messages"][0]["status"], "enqueued");
    assert_eq!(body["messages"][0]["foreign_id"], "order-42");

    let m = dev.next_message().await?;
    assert_eq!(m.id, id);
    assert_eq!(m.body, "Your card <was> used");
    assert_eq!(m.subject.as_deref(), Some("Bank"));
    assert!(m.requests_receipt);
    let data: Value = serde_json::from_str(m.data.as_deref().unwrap_or("null"))?;
    assert_eq!(data["amount"], 12);

    env.wait_status(&key, &id, "sent").await?;
    dev.ack_received(&id).await?;
    let v = env.wait_status(&key, &id, "delivered").await?;
    assert_eq!(v["channel"], "xmpp");
    let hist: Vec<&str> = v["history"]
        .as_array()
        .map(|h| h.iter().filter_map(|e| e["status"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(hist, ["enqueued", "sent", "delivered"]);
    assert!(v["history"][2]["at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(v["history"][2]["device_id"], "phone-1");

    let events = hook
        .wait_for("enqueued, sent, delivered", |ev| {
            kinds_for(ev, &id) == ["enqueued", "sent", "delivered"]
        })
        .await?;
    assert!(events
        .iter()
        .filter(|e| e["message_id"] == id)
        .all(|e| e["foreign_id"] == "order-42"));
    for b in hook.batches() {
        assert!(
            verify_signature(&b.signature, "test-webhook-secret-123", &b.body),
            "bad signature {}",
            b.signature
        );
        assert!(!b.delivery.is_empty());
    }

    dev.mark_displayed(&id).await?;
    env.wait_status(&key, &id, "read").await?;
    dev.reply(&id, "That was me").await?;
    let events = hook
        .wait_for("a reply", |ev| {
            ev.iter()
                .any(|e| e["event"] == "reply" && e["message_id"] == id)
        })
        .await?;
    let reply = events
        .iter()
        .find(|e| e["event"] == "reply")
        .cloned()
        .unwrap_or_default();
    assert_eq!(reply["text"], "That was me");
    assert_eq!(reply["user_id"], "alice");
    assert_eq!(reply["device_id"], "phone-1");
    hook.wait_for("read", |ev| {
        kinds_for(ev, &id) == ["enqueued", "sent", "delivered", "read"]
    })
    .await?;

    dev.close().await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn pending_messages_arrive_in_order_when_the_device_connects_and_sm_ack_delivers(
) -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, password) = env
        .register_device(&key, "bob", "tablet", json!({"platform": "xmpp"}))
        .await?;
    let mut ids = vec![];
    for i in 0..5 {
        let (s, b) = env
            .send(
                &key,
                json!({"recipients": [{"user_id": "bob"}], "text": format!("m{i}")}),
            )
            .await?;
        assert_eq!(s, 202, "{b}");
        ids.push(
            b["messages"][0]["id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &password).await?;
    dev.enable_sm().await?;
    let mut got = vec![];
    for _ in 0..5 {
        got.push(dev.next_message().await?.id);
    }
    assert_eq!(got, ids, "pending messages must arrive in acceptance order");
    // a stream-management ack covering the stanzas counts as delivery
    dev.sm_ack().await?;
    for id in &ids {
        env.wait_status(&key, id, "delivered").await?;
    }
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn expiry_wins_over_a_late_device_and_the_device_never_sees_it() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, password) = env
        .register_device(&key, "carol", "p", json!({"platform": "xmpp"}))
        .await?;
    let (s, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "carol"}], "text": "short-lived", "ttl": 1}),
        )
        .await?;
    assert_eq!(s, 202, "{b}");
    let expired = b["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let v = env.wait_status(&key, &expired, "expired").await?;
    assert!(v["history"]
        .as_array()
        .is_some_and(|h| h.iter().all(|e| e["status"] != "delivered")));
    let (_, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "carol"}], "text": "fresh"}),
        )
        .await?;
    let fresh = b["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &password).await?;
    let m = dev.next_message().await?;
    assert_eq!(m.id, fresh, "an expired message must never reach a device");
    // a late receipt for the expired message is refused
    dev.ack_received(&expired).await?;
    dev.ack_received(&fresh).await?;
    env.wait_status(&key, &fresh, "delivered").await?;
    let (_, v) = env.message(&key, &expired).await?;
    assert_eq!(v["status"], "expired");
    env.stop().await;
    Ok(())
}
