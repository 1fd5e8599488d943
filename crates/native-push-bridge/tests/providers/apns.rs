//! APNs: token and certificate authentication, production and sandbox, every documented
//! answer.

use std::sync::Arc;

use native_push_bridge::testing::{Answer, ApnsStandIn};
use native_push_bridge::BridgeSettings;
use p256::pkcs8::EncodePrivateKey;
use pushgate_core::{Platform, Status, TokenState};
use serde_json::{json, Value};

use super::{pki, settings};
use crate::{with_bridge, Build, Env};

const TEAM: &str = "TEAM123456";
const BUNDLE: &str = "com.example.parcels";

/// A stand-in, bridge settings pointing at it, and token-auth settings for an app.
async fn setup() -> (Arc<ApnsStandIn>, BridgeSettings, Value) {
    let standin = Arc::new(ApnsStandIn::start(pki()).await.expect("APNs stand-in"));
    let key = standin.new_team_key(TEAM, "KEY1234567");
    let creds =
        json!({"bundle_id": BUNDLE, "team_id": TEAM, "key_id": "KEY1234567", "private_key": key});
    let settings = BridgeSettings {
        apns_url: standin.url.clone(),
        ..settings()
    };
    (standin, settings, creds)
}

/// A device token (64 hex digits) per case.
fn token(i: u32) -> String {
    format!("{i:064x}")
}

impl Env {
    async fn ios_device(&self, app_id: &str, device_id: &str, token: &str) {
        self.device_on(app_id, device_id, Platform::Ios, Some(token.into()), None)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_push_with_token_auth_is_sent_as_apple_expects() {
    let (standin, settings, creds) = setup().await;
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"apns": creds})).await;
        env.ios_device(&app, "iphone", &token(1)).await;
        let id = env.channel_push(&app, "iphone").await;
        assert_eq!(env.expect_sent(&id, "apns").await, id, "apns-id is the message id");
        let got = standin.received_for(&token(1));
        assert_eq!(got.len(), 1);
        let r = &got[0];
        assert_eq!(r.rejected, None);
        assert!(r.http2);
        assert_eq!(r.auth, format!("token {TEAM}/KEY1234567"));
        let expires = env.state(&id).await.message.expires_at;
        assert_eq!(r.header("apns-push-type"), Some("alert"));
        assert_eq!(r.header("apns-priority"), Some("5"));
        assert_eq!(r.header("apns-topic"), Some(BUNDLE));
        assert_eq!(r.header("apns-id"), Some(id.as_str()));
        assert_eq!(r.header("apns-collapse-id"), Some(id.as_str()));
        assert_eq!(
            r.header("apns-expiration"),
            Some((expires / 1000).to_string().as_str())
        );
        assert_eq!(
            r.body,
            json!({
                "aps": {"alert": {"title": "Parcel", "body": "Your parcel is here"}, "mutable-content": 1},
                "message_id": id,
                "kind": "channel",
                "data": {"parcel": 7}
            })
        );
        // a high-priority message with a collapse key
        let urgent = env
            .message_with(&app, &["iphone"], 3_600_000, |m| {
                m.priority = pushgate_core::Priority::High;
                m.collapse_key = Some("parcels".into());
            })
            .await;
        env.push(&app, &urgent, "iphone", "channel", &format!("{urgent}.push"))
            .await;
        env.expect_sent(&urgent, "apns").await;
        let got = standin.received_for(&token(1));
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].header("apns-priority"), Some("10"));
        assert_eq!(got[1].header("apns-collapse-id"), Some("parcels"));
        // the provider token was made once and reused
        assert_eq!(got[0].header("authorization"), got[1].header("authorization"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_certificate_auth_goes_to_the_sandbox_when_configured() {
    let (standin, settings, _) = setup().await;
    let (cert, key) = standin
        .issue_client_certificate(BUNDLE)
        .expect("client certificate");
    // production points nowhere: only the sandbox URL can succeed
    let settings = BridgeSettings {
        apns_url: "https://127.0.0.1:9".into(),
        apns_sandbox_url: standin.url.clone(),
        ..settings
    };
    with_bridge(settings, Build::Real, |env| async move {
        let creds = json!({"bundle_id": BUNDLE, "environment": "sandbox",
                           "certificate": cert, "certificate_key": key});
        let app = env.app(json!({"apns": creds})).await;
        env.ios_device(&app, "iphone", &token(2)).await;
        let id = env.channel_push(&app, "iphone").await;
        env.expect_sent(&id, "apns").await;
        let got = standin.received_for(&token(2));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].auth, format!("certificate {BUNDLE}"));
        assert_eq!(got[0].header("authorization"), None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_dead_tokens_mark_the_device_invalid() {
    let (standin, settings, creds) = setup().await;
    let cases = [
        (410, "Unregistered"),
        (400, "BadDeviceToken"),
        (400, "DeviceTokenNotForTopic"),
    ];
    for (i, (status, reason)) in cases.iter().enumerate() {
        standin.script(
            &token(10 + i as u32),
            [Answer::json(*status, json!({"reason": reason}))],
        );
    }
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"apns": creds})).await;
        for (i, (_, reason)) in cases.iter().enumerate() {
            let device = format!("iphone-{i}");
            env.ios_device(&app, &device, &token(10 + i as u32)).await;
            let id = env.channel_push(&app, &device).await;
            env.expect_failed(
                &id,
                "apns",
                &format!("apns rejected the push token: {reason}"),
            )
            .await;
            assert_eq!(env.token_state(&app, &device).await, TokenState::Invalid);
        }
        assert_eq!(env.count("invalid_token"), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_refusals_fail_the_message_with_the_reason() {
    let (standin, settings, creds) = setup().await;
    let cases = [
        (413, "PayloadTooLarge"),
        (400, "BadTopic"),
        (400, "MissingTopic"),
        (400, "TopicDisallowed"),
    ];
    for (i, (status, reason)) in cases.iter().enumerate() {
        standin.script(
            &token(20 + i as u32),
            [Answer::json(*status, json!({"reason": reason}))],
        );
    }
    let standin2 = standin.clone();
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"apns": creds})).await;
        for (i, (_, reason)) in cases.iter().enumerate() {
            let device = format!("iphone-{i}");
            env.ios_device(&app, &device, &token(20 + i as u32)).await;
            let id = env.channel_push(&app, &device).await;
            env.expect_failed(
                &id,
                "apns",
                &format!("apns refused the notification: {reason}"),
            )
            .await;
            assert_eq!(env.token_state(&app, &device).await, TokenState::Valid);
        }
        // a payload over 4096 bytes is refused before it is sent
        env.ios_device(&app, "iphone-big", &token(29)).await;
        let big = env
            .message_with(&app, &["iphone-big"], 3_600_000, |m| {
                m.text = "x".repeat(5000)
            })
            .await;
        env.push(&app, &big, "iphone-big", "channel", &format!("{big}.push"))
            .await;
        let s = env.wait_status(&big, Status::Failed).await;
        let detail = crate::last(&s).detail.clone().unwrap_or_default();
        assert!(
            detail.starts_with("apns refused the notification: payload too large ("),
            "{detail}"
        );
        assert!(standin2.received_for(&token(29)).is_empty());
        assert_eq!(env.count("permanent"), 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_rejected_credentials_fail_with_detail_and_metric() {
    let (standin, settings, creds) = setup().await;
    let expired = Answer::json(403, json!({"reason": "ExpiredProviderToken"}));
    standin.script(
        &token(30),
        [Answer::json(403, json!({"reason": "InvalidProviderToken"}))],
    );
    standin.script(
        &token(31),
        [Answer::json(403, json!({"reason": "BadCertificate"}))],
    );
    // still expired after the one renewal
    standin.script(&token(32), [expired.clone(), expired]);
    let standin2 = standin.clone();
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"apns": creds})).await;
        let cases = [
            (30, "InvalidProviderToken"),
            (31, "BadCertificate"),
            (32, "ExpiredProviderToken"),
        ];
        for (t, reason) in cases {
            let device = format!("iphone-{t}");
            env.ios_device(&app, &device, &token(t)).await;
            let id = env.channel_push(&app, &device).await;
            env.expect_failed(
                &id,
                "apns",
                &format!("provider credentials rejected: {reason}"),
            )
            .await;
        }
        assert_eq!(standin2.received_for(&token(32)).len(), 2);
        // a key the stand-in does not know: its own signature check refuses the token
        let stray = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng)
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .expect("PEM")
            .to_string();
        let unknown = json!({"bundle_id": BUNDLE, "team_id": TEAM, "key_id": "UNKNOWNKEY",
                             "private_key": stray});
        let other = env.app(json!({"apns": unknown})).await;
        env.ios_device(&other, "iphone-x", &token(33)).await;
        let id = env.channel_push(&other, "iphone-x").await;
        env.expect_failed(
            &id,
            "apns",
            "provider credentials rejected: InvalidProviderToken",
        )
        .await;
        assert_eq!(
            standin2.received_for(&token(33))[0].rejected.as_deref(),
            Some("InvalidProviderToken")
        );
        assert_eq!(env.count("credentials"), 4);
        assert_eq!(env.token_state(&other, "iphone-x").await, TokenState::Valid);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_expired_provider_token_is_renewed_once_and_sent() {
    let (standin, settings, creds) = setup().await;
    standin.script(
        &token(40),
        [Answer::json(403, json!({"reason": "ExpiredProviderToken"}))],
    );
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"apns": creds})).await;
        env.ios_device(&app, "iphone", &token(40)).await;
        let id = env.channel_push(&app, "iphone").await;
        env.expect_sent(&id, "apns").await;
        assert_eq!(standin.received_for(&token(40)).len(), 2);
        assert_eq!(env.count("credentials"), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_busy_answers_are_retried_then_sent_once() {
    let (standin, settings, creds) = setup().await;
    standin.script(
        &token(50),
        [Answer::json(429, json!({"reason": "TooManyRequests"})).retry_after(1)],
    );
    standin.script(
        &token(51),
        [Answer::json(500, json!({"reason": "InternalServerError"}))],
    );
    standin.script(
        &token(52),
        [Answer::json(503, json!({"reason": "ServiceUnavailable"}))],
    );
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"apns": creds})).await;
        let mut ids = Vec::new();
        for t in [50, 51, 52] {
            let device = format!("iphone-{t}");
            env.ios_device(&app, &device, &token(t)).await;
            ids.push((t, env.channel_push(&app, &device).await));
        }
        for (t, id) in ids {
            env.expect_sent(&id, "apns").await;
            let got = standin.received_for(&token(t));
            assert_eq!(got.len(), 2, "one refused attempt, one accepted");
            assert_eq!(got[0].header("apns-id"), got[1].header("apns-id"));
        }
        assert_eq!(env.count("retry"), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_credential_updates_apply_without_restart() {
    let (standin, settings, creds) = setup().await;
    let new_key = standin.new_team_key(TEAM, "KEYNEW0001");
    with_bridge(settings, Build::Real, |env| async move {
        let mut app = env.app_record(json!({"apns": creds})).await;
        env.ios_device(&app.app_id, "iphone", &token(60)).await;
        let first = env.channel_push(&app.app_id, "iphone").await;
        env.expect_sent(&first, "apns").await;
        // the key is rotated in the app's settings; the old one is revoked at Apple
        standin.revoke_key("KEY1234567");
        env.update_providers(
            &mut app,
            json!({"apns": {"bundle_id": BUNDLE, "team_id": TEAM, "key_id": "KEYNEW0001", "private_key": new_key}}),
        )
        .await;
        let second = env.channel_push(&app.app_id, "iphone").await;
        env.expect_sent(&second, "apns").await;
        let got = standin.received_for(&token(60));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].auth, format!("token {TEAM}/KEY1234567"));
        assert_eq!(got[1].auth, format!("token {TEAM}/KEYNEW0001"));
    })
    .await;
}
