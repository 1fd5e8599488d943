//! Batched hand-overs: the router sends the hand-overs bound for one edge together. However
//! many are in flight at once, every device must see each of its messages exactly once, in
//! acceptance order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pushgate_bus::payloads::EdgeDeliverItem;
use pushgate_testkit::device::TestDevice;
use pushgate_testkit::TestEnv;
use serde_json::{json, Value};

const DEVICES: usize = 8;
const PER_DEVICE: usize = 30;

/// Reads `n` messages, then checks with a ping round trip that nothing more is on its way.
async fn receive(mut dev: TestDevice, n: usize, tag: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), dev.next_message())
            .await
            .map_err(|_| anyhow::anyhow!("device {tag} got only {} messages", ids.len()))??;
        ids.push(m.id);
    }
    // anything sent twice would be written before the answer to this ping
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ping = format!("batch-end-{tag}");
    dev.send_raw(&format!(
        "<iq type='get' id='{ping}'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await?;
    loop {
        let e = dev.next_stanza().await?;
        anyhow::ensure!(
            e.name != "message",
            "device {tag}: unexpected message {:?}",
            e.attr("id")
        );
        if e.attr("id") == Some(ping.as_str()) {
            break;
        }
    }
    Ok(ids)
}

#[tokio::test]
async fn many_concurrent_hand_overs_to_one_edge_arrive_once_and_in_order() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (app, key) = env.create_app(None).await?;

    // watch the batch subject: how many requests, how many hand-overs in them
    let requests = Arc::new(AtomicUsize::new(0));
    let items = Arc::new(AtomicUsize::new(0));
    let mut watch = env
        .bus
        .client()
        .subscribe(format!("{}.edge.*.deliver_batch", env.namespace))
        .await?;
    env.bus.client().flush().await?;
    let watcher = {
        let (requests, items) = (requests.clone(), items.clone());
        tokio::spawn(async move {
            while let Some(m) = watch.next().await {
                if let Ok(batch) = serde_json::from_slice::<Vec<EdgeDeliverItem>>(&m.payload) {
                    requests.fetch_add(1, Ordering::Relaxed);
                    items.fetch_add(batch.len(), Ordering::Relaxed);
                }
            }
        })
    };

    let mut devices = Vec::with_capacity(DEVICES);
    for i in 0..DEVICES {
        let (jid, pw) = env
            .register_device(
                &key,
                &format!("bu{i}"),
                &format!("d{i}"),
                json!({"platform": "xmpp"}),
            )
            .await?;
        let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
        // initial presence: the (empty) backlog is drained now, not after the grace period
        dev.send_raw("<presence/>").await?;
        devices.push(dev);
    }
    // every session in presence before sending, so every message is a hand-over
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for i in 0..DEVICES {
        while env.store.presence(&app, &format!("d{i}")).await?.is_none() {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "no presence");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // one request: round-robin over the users, so each user's messages are accepted in the
    // order of their positions, and all of them are routed at once
    let recipients: Vec<Value> = (0..PER_DEVICE)
        .flat_map(|_| (0..DEVICES).map(|i| json!({"user_id": format!("bu{i}")})))
        .collect();
    let (s, b) = env
        .send(&key, json!({"recipients": recipients, "text": "burst"}))
        .await?;
    anyhow::ensure!(s == 202, "send: {b}");
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); DEVICES];
    for (pos, m) in b["messages"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no messages in {b}"))?
        .iter()
        .enumerate()
    {
        let id = m["id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no id in {m}"))?;
        expected[pos % DEVICES].push(id.to_string());
    }

    let got = futures::future::try_join_all(
        devices
            .into_iter()
            .enumerate()
            .map(|(i, dev)| receive(dev, PER_DEVICE, i)),
    )
    .await?;
    for (i, (got, want)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            got, want,
            "device {i}: messages missing, doubled or out of order"
        );
    }

    let (requests, items) = (
        requests.load(Ordering::Relaxed),
        items.load(Ordering::Relaxed),
    );
    assert!(
        items >= DEVICES * PER_DEVICE,
        "only {items} hand-overs went through batches"
    );
    assert!(
        requests < items,
        "{items} hand-overs in {requests} requests: nothing was batched"
    );
    watcher.abort();
    env.stop().await;
    Ok(())
}

/// An edge that predates batching answers only on the single hand-over subject: the router's
/// batch request finds no responder there and hands the message over one by one instead.
#[tokio::test]
async fn an_edge_without_the_batch_subject_gets_single_hand_overs() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (app, key) = env.create_app(None).await?;
    env.register_device(&key, "old", "od", json!({"platform": "xmpp"}))
        .await?;
    // an "old" edge: a live lease and a presence record naming it, and a responder on the
    // single subject only
    let edge = "oldedge1";
    env.store
        .renew_edge_lease(edge, Duration::from_secs(60))
        .await?;
    env.store
        .set_presence(
            &app,
            "od",
            &format!("{edge}/s1"),
            pushgate_core::time::now_ms(),
        )
        .await?;
    let mut single = env
        .bus
        .client()
        .subscribe(env.bus.names().edge_deliver(edge))
        .await?;
    let client = env.bus.client().clone();
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = single.next().await {
            if let Ok(d) =
                serde_json::from_slice::<pushgate_bus::payloads::EdgeDeliver>(&msg.payload)
            {
                let _ = got_tx.send(d.message.id.clone());
            }
            if let Some(reply) = msg.reply {
                let answer =
                    serde_json::to_vec(&pushgate_bus::payloads::EdgeDeliverReply::Accepted)
                        .unwrap_or_default();
                let _ = client.publish(reply, answer.into()).await;
            }
        }
    });
    env.bus.client().flush().await?;

    let id = env.send_text(&key, "old", "to an old edge").await?;
    let handed = tokio::time::timeout(Duration::from_secs(30), got.recv())
        .await
        .map_err(|_| anyhow::anyhow!("no single hand-over reached the old edge"))?;
    assert_eq!(handed.as_deref(), Some(id.as_str()));
    // the (fake) session took it: it waits for the device's receipt, nothing else happened
    let (status, body) = env.message(&key, &id).await?;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "enqueued", "{body}");
    env.stop().await;
    Ok(())
}
