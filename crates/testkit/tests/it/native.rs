//! The native push paths of the delivery engine, end to end against a local APNs stand-in
//! that speaks HTTP/2 + TLS and verifies the ES256 provider token: a native-only device
//! (push is the channel, the device confirms over HTTP), a wake-up push for an XMPP device that
//! is offline, and the retraction of a pushed message that expires.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use native_push_bridge::testing::{ApnsStandIn, Pki};
use pushgate_testkit::device::TestDevice;
use pushgate_testkit::{TestEnv, ADMIN_TOKEN};
use serde_json::{json, Value};

const TEAM: &str = "TEAM123456";
const KEY_ID: &str = "KEY1234567";
const BUNDLE: &str = "com.example.bank";

fn pki() -> anyhow::Result<&'static Pki> {
    static PKI: OnceLock<Result<Pki, String>> = OnceLock::new();
    PKI.get_or_init(|| {
        Pki::create(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("testkit-apns-pki"))
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("stand-in PKI: {e}"))
}

/// The suite with its bridge pointed at a fresh APNs stand-in, and an app using it.
async fn setup() -> anyhow::Result<(TestEnv, ApnsStandIn, String)> {
    let pki = pki()?;
    let standin = ApnsStandIn::start(pki).await?;
    let key = standin.new_team_key(TEAM, KEY_ID);
    let (url, ca) = (standin.url.clone(), pki.ca_file.clone());
    let env = TestEnv::start_with(|s| {
        s.bridge.apns_url = url;
        s.bridge.extra_ca_files = vec![ca];
    })
    .await?;
    let (app, key_api) = env.create_app(None).await?;
    let r = env
        .http
        .patch(format!("{}/v1/apps/{app}", env.api))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"providers": {"apns": {"bundle_id": BUNDLE, "team_id": TEAM, "key_id": KEY_ID, "private_key": key}}}))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "patch app: {}", r.status());
    Ok((env, standin, key_api))
}

async fn wait_pushes(standin: &ApnsStandIn, token: &str, n: usize) -> anyhow::Result<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = standin.received_for(token);
        if got.len() >= n {
            for r in &got {
                anyhow::ensure!(
                    r.rejected.is_none(),
                    "the stand-in rejected a push: {:?}",
                    r.rejected
                );
            }
            return Ok(got
                .iter()
                .map(|r| json!({"body": r.body, "type": r.header("apns-push-type"), "id": r.header("apns-id")}))
                .collect());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} pushes arrived",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn token(i: u32) -> String {
    format!("{i:064x}")
}

#[tokio::test]
async fn native_only_devices_get_the_push_as_channel_and_confirm_over_http() -> anyhow::Result<()> {
    let (env, standin, key) = setup().await?;
    let (jid, pw) = env
        .register_device(
            &key,
            "ios-user",
            "iphone",
            json!({"platform": "ios", "push_token": token(1)}),
        )
        .await?;
    let (_, b) = env.send(&key, json!({"recipients": [{"user_id": "ios-user"}], "text": "Your parcel is here", "title": "Parcels"})).await?;
    let id = b["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let v = env.wait_status(&key, &id, "sent").await?;
    assert_eq!(v["channel"], "apns");
    let pushes = wait_pushes(&standin, &token(1), 1).await?;
    assert_eq!(
        pushes[0]["body"]["aps"]["alert"]["body"],
        "Your parcel is here"
    );
    assert_eq!(pushes[0]["body"]["message_id"], id.as_str());
    // the app reports the notification was delivered
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{jid}:{pw}"));
    let r = env
        .http
        .post(format!("{}/v1/device/events", env.api))
        .header("authorization", format!("Basic {basic}"))
        .json(&json!({"events": [{"message_id": id, "kind": "delivered"}]}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let v = env.wait_status(&key, &id, "delivered").await?;
    let hist: Vec<&str> = v["history"]
        .as_array()
        .map(|h| h.iter().filter_map(|e| e["status"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(hist, ["enqueued", "sent", "delivered"]);
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_offline_xmpp_device_is_woken_by_push_then_confirms_over_xmpp() -> anyhow::Result<()> {
    let (env, standin, key) = setup().await?;
    let (jid, pw) = env
        .register_device(
            &key,
            "wake",
            "iphone",
            json!({"platform": "ios", "push_token": token(2)}),
        )
        .await?;
    // the app has used XMPP before, so a push is only a wake-up
    TestDevice::connect(env.xmpp_addr(), &jid, &pw)
        .await?
        .close()
        .await?;
    let (_, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "wake"}], "text": "Login from a new device?"}),
        )
        .await?;
    let id = b["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pushes = wait_pushes(&standin, &token(2), 1).await?;
    assert_eq!(
        pushes[0]["body"]["message_id"],
        id.as_str(),
        "the wake-up carries the message"
    );
    let (_, v) = env.message(&key, &id).await?;
    assert_eq!(
        v["status"], "enqueued",
        "a wake-up push does not count as sent"
    );
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    let m = dev.next_message().await?;
    assert_eq!(m.id, id);
    dev.ack_received(&id).await?;
    let v = env.wait_status(&key, &id, "delivered").await?;
    assert_eq!(v["channel"], "xmpp");
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_expired_pushed_message_is_retracted_natively() -> anyhow::Result<()> {
    let (env, standin, key) = setup().await?;
    let (jid, pw) = env
        .register_device(
            &key,
            "ret",
            "iphone",
            json!({"platform": "ios", "push_token": token(3)}),
        )
        .await?;
    TestDevice::connect(env.xmpp_addr(), &jid, &pw)
        .await?
        .close()
        .await?;
    let (_, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "ret"}], "text": "one-time code 123456", "ttl": 2}),
        )
        .await?;
    let id = b["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    env.wait_status(&key, &id, "expired").await?;
    let pushes = wait_pushes(&standin, &token(3), 2).await?;
    assert_eq!(pushes[0]["type"], "alert");
    assert_eq!(
        pushes[1]["type"], "background",
        "the retraction is a data-only push: {pushes:?}"
    );
    // and the device, when it connects, gets the XEP-0424 retraction instead of the message
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &pw).await?;
    dev.send_raw("<presence/>").await?;
    let retracted = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = dev.next_stanza().await?;
            if e.child("body", "jabber:client").is_some()
                && e.child("retract", "urn:xmpp:message-retract:1").is_none()
            {
                anyhow::bail!("the expired message itself was delivered: {e:?}");
            }
            if let Some(r) = e.child("retract", "urn:xmpp:message-retract:1") {
                return anyhow::Ok(r.attr("id").unwrap_or_default().to_string());
            }
        }
    })
    .await??;
    assert_eq!(retracted, id);
    env.stop().await;
    Ok(())
}
