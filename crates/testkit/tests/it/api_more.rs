//! More of the API contract: device reports over HTTP, moving a device between users, key
//! rotation, rate limits, cancellation, listing and user deletion.

use base64::Engine;
use pushgate_testkit::device::TestDevice;
use pushgate_testkit::{TestEnv, ADMIN_TOKEN};
use serde_json::{json, Value};

#[tokio::test]
async fn devices_without_xmpp_report_delivery_and_reads_over_http() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, password) = env
        .register_device(&key, "wendy", "browser", json!({"platform": "web"}))
        .await?;
    let (_, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "wendy"}], "text": "hi"}),
        )
        .await?;
    let id = b["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let url = format!("{}/v1/device/events", env.api);
    // wait until the router targeted the device, then report
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{jid}:{password}"));
        let r = env
            .http
            .post(&url)
            .header("authorization", format!("Basic {basic}"))
            .json(&json!({"events": [{"message_id": id, "kind": "clicked"}]}))
            .send()
            .await?;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await?;
        if v["events"][0]["outcome"] == "applied" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "report never applied: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let v = env.wait_status(&key, &id, "read").await?;
    let hist: Vec<&str> = v["history"]
        .as_array()
        .map(|h| h.iter().filter_map(|e| e["status"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(hist, ["enqueued", "delivered", "read"]);
    assert_eq!(v["history"][2]["detail"], "clicked");
    // wrong password
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{jid}:nope"));
    let r = env
        .http
        .post(&url)
        .header("authorization", format!("Basic {basic}"))
        .json(&json!({"events": [{"message_id": id, "kind": "read"}]}))
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_device_moved_to_another_user_stops_receiving_for_the_first() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, old_password) = env
        .register_device(&key, "ann", "shared-phone", json!({"platform": "xmpp"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &old_password).await?;
    let (jid2, new_password) = env
        .register_device(&key, "ben", "shared-phone", json!({"platform": "xmpp"}))
        .await?;
    assert_eq!(jid, jid2);
    assert_ne!(
        old_password, new_password,
        "moving a device must change its password"
    );
    // the old session is closed with a stream error
    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match dev.next_stanza().await {
                Ok(e) if e.name == "error" => return true,
                Ok(_) => continue,
                Err(_) => return true,
            }
        }
    })
    .await?;
    assert!(closed);
    assert!(
        TestDevice::connect(env.xmpp_addr(), &jid, &old_password)
            .await
            .is_err(),
        "old credentials must fail"
    );
    // ann has no device any more; ben receives on it
    let (s, _) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "ann"}], "text": "for ann"}),
        )
        .await?;
    assert_eq!(s, 422);
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &new_password).await?;
    let (_, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "ben"}], "text": "for ben"}),
        )
        .await?;
    let m = dev.next_message().await?;
    assert_eq!(m.id, b["messages"][0]["id"].as_str().unwrap_or_default());
    assert_eq!(m.body, "for ben");
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn rotated_keys_keep_working_for_the_grace_period_and_rates_are_limited() -> anyhow::Result<()>
{
    let env = TestEnv::start_with(|s| s.ingress.rate_limit_per_app = 5).await?;
    let (app, old_key) = env.create_app(None).await?;
    let r = env
        .http
        .post(format!("{}/v1/apps/{app}/keys", env.api))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await?;
    let new_key = v["api_key"].as_str().unwrap_or_default().to_string();
    assert!(v["previous_key_valid_until"].as_str().is_some());
    let url = format!("{}/v1/users/x/devices", env.api);
    assert_eq!(
        env.http
            .get(&url)
            .bearer_auth(&old_key)
            .send()
            .await?
            .status(),
        200
    );
    assert_eq!(
        env.http
            .get(&url)
            .bearer_auth(&new_key)
            .send()
            .await?
            .status(),
        200
    );
    // the operator's view never shows secrets
    let r = env
        .http
        .get(format!("{}/v1/apps/{app}", env.api))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    let body = r.text().await?;
    assert!(!body.contains(&new_key) && !body.contains("test-webhook-secret"));
    // 5 requests per second: a burst gets 429 with Retry-After
    let mut limited = None;
    for _ in 0..20 {
        let r = env.http.get(&url).bearer_auth(&new_key).send().await?;
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.ok_or_else(|| anyhow::anyhow!("never rate limited"))?;
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let p: Value = r.json().await?;
    assert_eq!(p["type"], "urn:pushgate:problem:rate-limited");
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn cancel_list_and_delete_user() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    env.register_device(&key, "cal", "d", json!({"platform": "xmpp"}))
        .await?;
    let (_, b) = env
        .send(&key, json!({"recipients": [{"user_id": "cal", "foreign_id": "f-1"}, {"user_id": "cal", "foreign_id": "f-1"}], "text": "x"}))
        .await?;
    let a = b["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let c = b["messages"][1]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let r = env
        .http
        .delete(format!("{}/v1/messages/{a}", env.api))
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await?["status"], "cancelled");
    let r = env
        .http
        .delete(format!("{}/v1/messages/{a}", env.api))
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(r.status(), 409);
    // list by foreign id, one per page
    let r = env
        .http
        .get(format!("{}/v1/messages?foreign_id=f-1&limit=1", env.api))
        .bearer_auth(&key)
        .send()
        .await?;
    let page: Value = r.json().await?;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1));
    let cursor = page["next_cursor"].as_str().unwrap_or_default().to_string();
    assert!(!cursor.is_empty(), "{page}");
    let r = env
        .http
        .get(format!(
            "{}/v1/messages?foreign_id=f-1&limit=1&cursor={cursor}",
            env.api
        ))
        .bearer_auth(&key)
        .send()
        .await?;
    let page2: Value = r.json().await?;
    let ids: Vec<String> = [&page, &page2]
        .iter()
        .filter_map(|p| p["messages"][0]["id"].as_str().map(str::to_string))
        .collect();
    assert!(ids.contains(&a) && ids.contains(&c), "{ids:?}");
    // deleting the user erases devices and undelivered messages
    let r = env
        .http
        .delete(format!("{}/v1/users/cal", env.api))
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(r.status(), 204);
    let (s, _) = env.message(&key, &c).await?;
    assert_eq!(s, 404);
    let r = env
        .http
        .get(format!("{}/v1/users/cal/devices", env.api))
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(r.json::<Value>().await?["devices"], json!([]));
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn webhook_batches_that_keep_failing_are_dead_lettered_and_can_be_replayed(
) -> anyhow::Result<()> {
    let env = TestEnv::start_with(|s| {
        s.webhook.max_retry_secs = 1;
        s.webhook.initial_backoff_ms = 100;
        s.webhook.max_backoff_ms = 200;
    })
    .await?;
    // a port nobody listens on
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?;
    let dead_url = format!("http://{}/hook", dead.local_addr()?);
    drop(dead);
    let (app, key) = env.create_app(Some(&dead_url)).await?;
    env.register_device(&key, "dl", "d", json!({"platform": "xmpp"}))
        .await?;
    let (_, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "dl"}], "text": "x"}),
        )
        .await?;
    let id = b["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let list_url = format!("{}/v1/apps/{app}/dead-letters", env.api);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let batch_id = loop {
        let v: Value = env
            .http
            .get(&list_url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?
            .json()
            .await?;
        if let Some(d) = v["dead_letters"].as_array().and_then(|a| a.first()) {
            assert!(
                d["events"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e["message_id"] == id.as_str())),
                "{v}"
            );
            break d["batch_id"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing dead-lettered: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    // the endpoint comes back; the operator replays
    let hook = pushgate_testkit::webhook::Receiver::start().await?;
    let r = env
        .http
        .patch(format!("{}/v1/apps/{app}", env.api))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"webhook": {"url": hook.url, "secret": "test-webhook-secret-123"}}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let r = env
        .http
        .post(format!("{list_url}/{batch_id}/replay"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    assert_eq!(r.status(), 202);
    hook.wait_for("the replayed enqueued event", |ev| {
        ev.iter().any(|e| {
            e["message_id"] == id.as_str()
                && e["event"] == "enqueued"
                && e["id"] == format!("{id}.1").as_str()
        })
    })
    .await?;
    let r = env
        .http
        .post(format!("{list_url}/{batch_id}/replay"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    assert_eq!(r.status(), 404, "a replayed batch leaves the list");
    env.stop().await;
    Ok(())
}
