//! The delivery engine's promises: multi-device, collapse, scheduling, retraction, SMS as a
//! channel and as fallback, and a router killed in the middle of a burst.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use pushgate_runtime::Metrics;
use pushgate_testkit::device::TestDevice;
use pushgate_testkit::{TestEnv, ADMIN_TOKEN};
use serde_json::{json, Value};

fn id_of(v: &Value, i: usize) -> String {
    v["messages"][i]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn statuses(v: &Value) -> Vec<String> {
    v["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|e| e["status"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn every_device_of_the_user_receives_and_the_first_receipt_decides() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (j1, p1) = env
        .register_device(&key, "multi", "phone", json!({"platform": "xmpp"}))
        .await?;
    let (j2, p2) = env
        .register_device(&key, "multi", "tablet", json!({"platform": "xmpp"}))
        .await?;
    let mut phone = TestDevice::connect(env.xmpp_addr(), &j1, &p1).await?;
    let mut tablet = TestDevice::connect(env.xmpp_addr(), &j2, &p2).await?;
    phone.enable_sm().await?;
    tablet.enable_sm().await?;
    let (_, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "multi"}], "text": "both"}),
        )
        .await?;
    let id = id_of(&b, 0);
    assert_eq!(phone.next_message().await?.id, id);
    assert_eq!(tablet.next_message().await?.id, id);
    tablet.ack_received(&id).await?;
    let v = env.wait_status(&key, &id, "delivered").await?;
    assert_eq!(
        v["history"]
            .as_array()
            .and_then(|h| h.iter().find(|e| e["status"] == "delivered"))
            .map(|e| e["device_id"].clone()),
        Some(json!("tablet"))
    );
    phone.ack_received(&id).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = env.message(&key, &id).await?;
        if v["history"].as_array().is_some_and(|h| {
            h.iter()
                .any(|e| e["device_id"] == "phone" && e["status"] == "delivered")
        }) {
            assert_eq!(v["status"], "delivered");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "second device's receipt not recorded: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_newer_message_with_the_same_collapse_key_replaces_the_older() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "col", "d", json!({"platform": "xmpp"}))
        .await?;
    let (_, a) = env.send(&key, json!({"recipients": [{"user_id": "col"}], "text": "score 1:0", "collapse_key": "match-7"})).await?;
    let (_, b) = env.send(&key, json!({"recipients": [{"user_id": "col"}], "text": "score 2:0", "collapse_key": "match-7"})).await?;
    let (older, newer) = (id_of(&a, 0), id_of(&b, 0));
    let v = env.wait_status(&key, &older, "cancelled").await?;
    let detail = v["history"]
        .as_array()
        .and_then(|h| h.last())
        .map(|e| e["detail"].to_string())
        .unwrap_or_default();
    assert!(
        detail.contains("replaced") && detail.contains(&newer),
        "{detail}"
    );
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    let m = dev.next_message().await?;
    assert_eq!(
        m.id, newer,
        "only the newest of a collapse key is delivered"
    );
    dev.ack_received(&newer).await?;
    env.wait_status(&key, &newer, "delivered").await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn scheduled_messages_wait_for_send_at() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "sch", "d", json!({"platform": "xmpp"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    let at = pushgate_core::time::rfc3339(pushgate_core::time::now_ms() + 1500);
    let (s, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "sch"}], "text": "later", "send_at": at}),
        )
        .await?;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["messages"][0]["status"], "scheduled");
    let id = id_of(&b, 0);
    let m = dev.next_message().await?;
    assert_eq!(m.id, id);
    let (_, v) = env.message(&key, &id).await?;
    let sent_at = v["history"]
        .as_array()
        .and_then(|h| h.iter().find(|e| e["status"] == "enqueued"))
        .map(|e| e["at"].as_str().unwrap_or("").to_string())
        .unwrap_or_default();
    assert!(
        sent_at.as_str() >= at.as_str(),
        "released at {sent_at}, before send_at {at}"
    );
    dev.ack_received(&id).await?;
    let v = env.wait_status(&key, &id, "delivered").await?;
    assert_eq!(statuses(&v), ["scheduled", "enqueued", "sent", "delivered"]);
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn cancelling_a_shown_message_retracts_it_on_the_device() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "ret", "d", json!({"platform": "xmpp"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    let (_, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "ret"}], "text": "oops"}),
        )
        .await?;
    let id = id_of(&b, 0);
    assert_eq!(dev.next_message().await?.id, id);
    env.wait_status(&key, &id, "sent").await?;
    let r = env
        .http
        .delete(format!("{}/v1/messages/{id}", env.api))
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let retracted = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = dev.next_stanza().await?;
            if let Some(r) = e.child("retract", "urn:xmpp:message-retract:1") {
                return anyhow::Ok(r.attr("id").unwrap_or_default().to_string());
            }
        }
    })
    .await??;
    assert_eq!(retracted, id);
    // a late receipt changes nothing
    dev.ack_received(&id).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, v) = env.message(&key, &id).await?;
    assert_eq!(v["status"], "cancelled");
    env.stop().await;
    Ok(())
}

/// A generic-JSON SMS provider stand-in: records each SMS and accepts it.
async fn sms_stand_in() -> anyhow::Result<(String, Arc<Mutex<Vec<Value>>>)> {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/send",
        post(move |body: axum::Json<Value>| {
            let g = g.clone();
            async move {
                let n = {
                    let mut v = g
                        .lock()
                        .map_err(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR)?;
                    v.push(body.0);
                    v.len()
                };
                Ok::<_, axum::http::StatusCode>(axum::Json(json!({"id": format!("ref-{n}")})))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/send", l.local_addr()?);
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok((url, got))
}

async fn app_with_sms(env: &TestEnv, url: &str) -> anyhow::Result<(String, String)> {
    let (app, key) = env.create_app(None).await?;
    let r = env
        .http
        .patch(format!("{}/v1/apps/{app}", env.api))
        .bearer_auth(ADMIN_TOKEN)
        .json(
            &json!({"sms": {"provider": "webhook", "url": url, "secret": "sms-secret-0123456789"}}),
        )
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "patch app: {}", r.status());
    Ok((app, key))
}

#[tokio::test]
async fn phone_only_recipients_get_an_sms() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (url, got) = sms_stand_in().await?;
    let (_app, key) = app_with_sms(&env, &url).await?;
    let (_, b) = env
        .send(
            &key,
            json!({"recipients": [{"phone": "+41791234567"}], "text": "Your code is 1234"}),
        )
        .await?;
    let id = id_of(&b, 0);
    let v = env.wait_status(&key, &id, "sms_sent").await?;
    assert_eq!(v["channel"], "sms");
    let sms = got.lock().map(|g| g.clone()).unwrap_or_default();
    assert_eq!(sms.len(), 1);
    assert_eq!(sms[0]["to"], "+41791234567");
    assert_eq!(sms[0]["text"], "Your code is 1234");
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn expiry_sends_exactly_one_fallback_sms_and_the_late_device_gets_nothing(
) -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (url, got) = sms_stand_in().await?;
    let (_app, key) = app_with_sms(&env, &url).await?;
    let (jid, pw) = env
        .register_device(&key, "fb", "d", json!({"platform": "xmpp"}))
        .await?;
    let (_, b) = env
        .send(&key, json!({"recipients": [{"user_id": "fb", "phone": "+41791234568"}], "text": "Card blocked?", "ttl": 1, "sms_fallback": {"text": "Card blocked? Call us."}}))
        .await?;
    let id = id_of(&b, 0);
    let v = env.wait_status(&key, &id, "sms_sent").await?;
    assert_eq!(statuses(&v), ["enqueued", "expired", "sms_sent"]);
    let (_, b2) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "fb"}], "text": "later one"}),
        )
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    assert_eq!(
        dev.next_message().await?.id,
        id_of(&b2, 0),
        "the expired message must not reach the device"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sms = got.lock().map(|g| g.clone()).unwrap_or_default();
    assert_eq!(sms.len(), 1, "exactly one SMS: {sms:?}");
    assert_eq!(sms[0]["text"], "Card blocked? Call us.");
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn routers_side_by_side_one_killed_mid_burst_lose_nothing_and_double_nothing(
) -> anyhow::Result<()> {
    const N: usize = 1000;
    let env = TestEnv::start_with(|s| s.without_router = true).await?;
    // each router runs in its own runtime with its own NATS and Redis connections, like a
    // process; killing it drops the runtime with every task and connection at once (kill -9)
    let start_router = |env: &TestEnv| -> anyhow::Result<tokio::runtime::Runtime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let mut rs = env.settings.router.clone();
        rs.ops_listen = "127.0.0.1:0".into();
        let c = env.settings.common.clone();
        rt.spawn(async move {
            let bus = pushgate_bus::Bus::connect(&c.nats_url, &c.namespace).await?;
            let store = pushgate_store::Store::connect(&c.redis_url, &c.namespace).await?;
            let r = router::Service::build(rs, bus, store, Metrics::new()).await?;
            r.run_until(tokio_util::sync::CancellationToken::new())
                .await;
            anyhow::Ok(())
        });
        Ok(rt)
    };
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "burst", "d", json!({"platform": "xmpp"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    dev.enable_sm().await?;
    // two routers side by side from the start (competing consumers), a third joins later
    let mut first = Some(start_router(&env)?);
    let side_by_side = start_router(&env)?;
    let mut second = None;
    // the device counts every message it is shown and confirms each
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    let device = tokio::spawn(async move {
        while let Ok(m) = dev.next_message().await {
            if let Ok(mut s) = s2.lock() {
                s.push(m.id.clone());
            }
            if dev.ack_received(&m.id).await.is_err() {
                break;
            }
        }
    });
    let mut ids = Vec::with_capacity(N);
    for chunk in 0..(N / 100) {
        let recipients: Vec<Value> = (0..100).map(|_| json!({"user_id": "burst"})).collect();
        let (s, b) = env
            .send(
                &key,
                json!({"recipients": recipients, "text": format!("burst {chunk}")}),
            )
            .await?;
        anyhow::ensure!(s == 202, "send: {b}");
        for i in 0..100 {
            ids.push(id_of(&b, i));
        }
        if chunk == 3 {
            // kill -9 mid-burst: no graceful shutdown; its unacked commands go back to the
            // stream after ack_wait and the second router finishes them
            if let Some(rt) = first.take() {
                rt.shutdown_background();
            }
        }
        if chunk == 5 {
            second = Some(start_router(&env)?);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let n = seen.lock().map(|s| s.len()).unwrap_or(0);
        if n >= N {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {n} of {N} messages reached the device"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let shown = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let unique: HashSet<&String> = shown.iter().collect();
    assert_eq!(unique.len(), shown.len(), "a message was shown twice");
    assert_eq!(unique.len(), N);
    for id in &ids {
        assert!(unique.contains(id), "{id} never reached the device");
        env.wait_status(&key, id, "delivered").await?;
    }
    device.abort();
    if let Some(rt) = second {
        rt.shutdown_background();
    }
    side_by_side.shutdown_background();
    env.stop().await;
    Ok(())
}
