//! The edge's side of a hand-over, with the test playing the router: it queues messages on
//! the device and hands them over (or, to play a lost or late hand-over, does not). The device
//! must see every open message once, in acceptance order wherever the order is still
//! knowable, however the hand-overs arrive; and a device confirming a message twice (stream
//! management ack, then receipt) records one delivery.

use std::time::Duration;

use pushgate_bus::payloads::{EdgeDeliver, EdgeDeliverReply};
use pushgate_core::Message;
use pushgate_testkit::device::TestDevice;
use pushgate_testkit::TestEnv;
use serde_json::{json, Value};

/// The test's router: the device it serves.
struct Router<'a> {
    env: &'a TestEnv,
    app: String,
    device: String,
}

impl<'a> Router<'a> {
    /// Registers an XMPP device `d` of `user` and plays the router for it; also returns the
    /// device's JID and password.
    async fn for_new_device(
        env: &'a TestEnv,
        app: &str,
        key: &str,
        user: &str,
    ) -> anyhow::Result<(Self, String, String)> {
        let (jid, pw) = env
            .register_device(key, user, "d", json!({"platform": "xmpp"}))
            .await?;
        let router = Router {
            env,
            app: app.to_string(),
            device: "d".into(),
        };
        Ok((router, jid, pw))
    }

    /// Accepts one request with `n` recipients (all the same user): one acceptance time,
    /// consecutive positions, so the acceptance order is the order of the returned messages.
    async fn accept(&self, key: &str, user: &str, n: usize) -> anyhow::Result<Vec<Message>> {
        let recipients: Vec<Value> = (0..n).map(|_| json!({"user_id": user})).collect();
        let (s, b) = self
            .env
            .send(key, json!({"recipients": recipients, "text": "m"}))
            .await?;
        anyhow::ensure!(s == 202, "send: {b}");
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let id = b["messages"][i]["id"].as_str().unwrap_or_default();
            let m = self
                .env
                .store
                .message(id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("message {id} not stored"))?;
            out.push(m.message);
        }
        Ok(out)
    }

    /// What the router does first: the message waits in the device's pending queue.
    async fn queue(&self, m: &Message) -> anyhow::Result<()> {
        self.env
            .store
            .target_devices(m, std::slice::from_ref(&self.device))
            .await?;
        Ok(())
    }

    /// The hand-over to the device's live session.
    async fn hand_over(&self, m: &Message) -> anyhow::Result<()> {
        let (edge, session) = self.live_session().await?;
        let req = EdgeDeliver {
            session_id: session,
            device_id: self.device.clone(),
            message: m.clone(),
        };
        let reply = self
            .env
            .bus
            .request_json(
                self.env.bus.names().edge_deliver(&edge),
                &req,
                Duration::from_secs(5),
            )
            .await?;
        let reply: EdgeDeliverReply = serde_json::from_slice(&reply)?;
        anyhow::ensure!(reply == EdgeDeliverReply::Accepted, "edge said {reply:?}");
        Ok(())
    }

    async fn live_session(&self) -> anyhow::Result<(String, String)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(p) = self.env.store.presence(&self.app, &self.device).await? {
                return Ok(p);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the device's session never showed up in presence"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until the edge has handled everything the device sent before (a ping round trip);
/// fails if a message stanza arrives meanwhile (nothing is expected then).
async fn barrier(dev: &mut TestDevice, id: &str) -> anyhow::Result<()> {
    dev.send_raw(&format!(
        "<iq type='get' id='{id}'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await?;
    loop {
        let e = dev.next_stanza().await?;
        anyhow::ensure!(e.name != "message", "unexpected message: {e:?}");
        if e.attr("id") == Some(id) {
            return Ok(());
        }
    }
}

fn count(v: &Value, status: &str) -> usize {
    v["history"]
        .as_array()
        .map(|h| h.iter().filter(|e| e["status"] == status).count())
        .unwrap_or(0)
}

#[tokio::test]
async fn lost_late_and_repeated_hand_overs_lose_nothing_double_nothing_and_keep_order(
) -> anyhow::Result<()> {
    let env = TestEnv::start_with(|s| s.without_router = true).await?;
    let (app, key) = env.create_app(None).await?;
    let (router, jid, pw) = Router::for_new_device(&env, &app, &key, "ho").await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    // initial presence: the (empty) backlog is drained now, not after the grace period
    dev.send_raw("<presence/>").await?;
    barrier(&mut dev, "b0").await?;
    let m = router.accept(&key, "ho", 7).await?;
    let mut shown = vec![];

    // the plain case: queued, handed over, written
    router.queue(&m[0]).await?;
    router.hand_over(&m[0]).await?;
    shown.push(dev.next_message().await?.id);

    // m3's hand-over is lost; m4's brings it along, first
    router.queue(&m[3]).await?;
    router.queue(&m[4]).await?;
    router.hand_over(&m[4]).await?;
    shown.push(dev.next_message().await?.id);
    shown.push(dev.next_message().await?.id);

    // late routing: m1 and m2 are queued after the session read past them; m1's hand-over
    // goes astray, m2's brings both, in order
    router.queue(&m[1]).await?;
    router.queue(&m[2]).await?;
    router.hand_over(&m[2]).await?;
    shown.push(dev.next_message().await?.id);
    shown.push(dev.next_message().await?.id);

    // repeated hand-overs (a router's retry) of written messages write nothing; nor does one
    // of a message the device has confirmed
    router.hand_over(&m[4]).await?;
    router.hand_over(&m[1]).await?;
    dev.ack_received(&m[0].id).await?;
    env.wait_status(&key, &m[0].id, "delivered").await?;
    router.hand_over(&m[0]).await?;

    // the common case again, with unconfirmed messages below it: only m5 is written
    router.queue(&m[5]).await?;
    router.hand_over(&m[5]).await?;
    shown.push(dev.next_message().await?.id);
    router.queue(&m[6]).await?;
    router.hand_over(&m[6]).await?;
    shown.push(dev.next_message().await?.id);

    let expected: Vec<String> = [0, 3, 4, 1, 2, 5, 6]
        .iter()
        .map(|&i| m[i].id.clone())
        .collect();
    assert_eq!(shown, expected, "order or duplicates");
    for msg in &m[1..] {
        dev.ack_received(&msg.id).await?;
    }
    for msg in &m {
        let v = env.wait_status(&key, &msg.id, "delivered").await?;
        assert_eq!((count(&v, "sent"), count(&v, "delivered")), (1, 1), "{v}");
    }
    // nothing else was written meanwhile
    barrier(&mut dev, "b1").await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn messages_held_while_inactive_go_out_in_acceptance_order() -> anyhow::Result<()> {
    let env = TestEnv::start_with(|s| {
        s.without_router = true;
        s.edge.csi_batch_secs = 600;
    })
    .await?;
    let (app, key) = env.create_app(None).await?;
    let (router, jid, pw) = Router::for_new_device(&env, &app, &key, "hold").await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    dev.send_raw("<presence/>").await?;
    dev.send_raw("<inactive xmlns='urn:xmpp:csi:0'/>").await?;
    barrier(&mut dev, "b0").await?;
    let m = router.accept(&key, "hold", 3).await?;
    for msg in &m {
        router.queue(msg).await?;
    }
    // hand-overs out of order, all held
    for i in [2, 0, 1] {
        router.hand_over(&m[i]).await?;
    }
    barrier(&mut dev, "b1").await?;
    dev.send_raw("<active xmlns='urn:xmpp:csi:0'/>").await?;
    let mut shown = vec![];
    for _ in 0..3 {
        shown.push(dev.next_message().await?.id);
    }
    let expected: Vec<String> = m.iter().map(|x| x.id.clone()).collect();
    assert_eq!(shown, expected);
    barrier(&mut dev, "b2").await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_ack_then_a_receipt_for_one_message_record_one_delivery() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "twice", "d", json!({"platform": "xmpp"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    dev.enable_sm().await?;
    let id = env.send_text(&key, "twice", "once").await?;
    assert_eq!(dev.next_message().await?.id, id);
    // the stream-management ack confirms it first, the receipt comes after
    dev.sm_ack().await?;
    env.wait_status(&key, &id, "delivered").await?;
    dev.ack_received(&id).await?;
    dev.mark_displayed(&id).await?;
    dev.mark_displayed(&id).await?;
    barrier(&mut dev, "b0").await?;
    let v = env.wait_status(&key, &id, "read").await?;
    let history = v["history"].as_array().cloned().unwrap_or_default();
    assert_eq!((count(&v, "delivered"), count(&v, "read")), (1, 1), "{v}");
    assert!(
        history.iter().all(|e| e["detail"].is_null()),
        "no per-device note for the device's own repeat: {v}"
    );
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_backlog_with_ties_across_a_page_boundary_is_drained_whole() -> anyhow::Result<()> {
    const N: usize = 210;
    let env = TestEnv::start_with(|s| s.without_router = true).await?;
    let (app, key) = env.create_app(None).await?;
    let (router, jid, pw) = Router::for_new_device(&env, &app, &key, "tie").await?;
    // queued while the device is offline: no hand-overs, only the drain brings them
    let m = router.accept(&key, "tie", N).await?;
    for msg in &m {
        router.queue(msg).await?;
    }
    // ids 190..210 share one score, as requests accepted in the same millisecond do: the tie
    // straddles the drain's page boundary (200)
    let pending = env.store.keys().pending(&app, "d");
    let mut c = env.store.conn();
    let tied = m[190].order_key();
    for msg in &m[190..] {
        let _: i64 = pushgate_store::redis::cmd("ZADD")
            .arg(&pending)
            .arg("XX")
            .arg("CH")
            .arg(tied)
            .arg(&msg.id)
            .query_async(&mut c)
            .await?;
    }
    let expected: Vec<String> = pushgate_store::redis::cmd("ZRANGE")
        .arg(&pending)
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await?;
    assert_eq!(expected.len(), N);
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    dev.send_raw("<presence/>").await?;
    let mut shown = Vec::with_capacity(N);
    for _ in 0..N {
        shown.push(dev.next_message().await?.id);
    }
    assert_eq!(shown, expected, "the drain missed, doubled or reordered");
    // after the drain, a hand-over writes just its own message
    let later = router.accept(&key, "tie", 1).await?;
    router.queue(&later[0]).await?;
    router.hand_over(&later[0]).await?;
    assert_eq!(dev.next_message().await?.id, later[0].id);
    barrier(&mut dev, "b0").await?;
    env.stop().await;
    Ok(())
}

/// A message another device of the user confirmed is not shown on the second device when it
/// connects, and leaves its pending queue then instead of being read again at every drain.
#[tokio::test]
async fn a_message_confirmed_on_one_device_leaves_the_others_queue() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (app, key) = env.create_app(None).await?;
    let (phone_jid, phone_pw) = env
        .register_device(&key, "both", "phone", json!({"platform": "xmpp"}))
        .await?;
    let (tablet_jid, tablet_pw) = env
        .register_device(&key, "both", "tablet", json!({"platform": "xmpp"}))
        .await?;
    let mut phone = TestDevice::connect(env.xmpp_addr(), &phone_jid, &phone_pw).await?;
    phone.enable_sm().await?;
    let id = env.send_text(&key, "both", "once").await?;
    assert_eq!(phone.next_message().await?.id, id);
    phone.ack_received(&id).await?;
    env.wait_status(&key, &id, "delivered").await?;
    // routing queued it for the tablet too
    assert_eq!(
        env.store.pending(&app, "tablet", 10).await?,
        vec![id.clone()]
    );

    let mut tablet = TestDevice::connect(env.xmpp_addr(), &tablet_jid, &tablet_pw).await?;
    tablet.enable_sm().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !env.store.pending(&app, "tablet", 10).await?.is_empty() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the tablet's queue still holds the delivered message"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // and it was never shown there
    barrier(&mut tablet, "t0").await?;
    env.stop().await;
    Ok(())
}
