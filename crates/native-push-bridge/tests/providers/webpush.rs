//! Web Push: encryption the stand-in decrypts, VAPID it verifies, every documented answer.

use std::sync::Arc;

use native_push_bridge::testing::{Answer, WebPushStandIn};
use p256::ecdsa::SigningKey;
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use pushgate_core::{Platform, Status, TokenState, WebPushSubscription};
use serde_json::{json, Value};

use super::{pki, settings};
use crate::{last, with_bridge, Build, Env};

const SUBJECT: &str = "mailto:ops@example.com";

/// An app's VAPID key pair: the settings (raw scalar or PEM) and the public key the web app
/// subscribes with.
struct Vapid {
    raw: String,
    pem: String,
    public: String,
}

fn vapid() -> Vapid {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let key = SigningKey::random(&mut rand::rngs::OsRng);
    Vapid {
        raw: b64(&key.to_bytes()),
        pem: key.to_pkcs8_pem(LineEnding::LF).expect("PEM").to_string(),
        public: b64(key.verifying_key().to_encoded_point(false).as_bytes()),
    }
}

async fn setup() -> (Arc<WebPushStandIn>, Vapid, Value) {
    let standin = Arc::new(
        WebPushStandIn::start(pki())
            .await
            .expect("Web Push stand-in"),
    );
    let v = vapid();
    let creds = json!({"vapid_private_key": v.raw, "subject": SUBJECT});
    (standin, v, creds)
}

impl Env {
    async fn browser(&self, app_id: &str, device_id: &str, sub: &WebPushSubscription) {
        self.device_on(app_id, device_id, Platform::Web, None, Some(sub.clone()))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webpush_message_is_encrypted_and_vapid_signed() {
    let (standin, v, creds) = setup().await;
    let sub = standin.subscribe(&v.public);
    with_bridge(settings(), Build::Real, |env| async move {
        let app = env.app(json!({"webpush": creds})).await;
        env.browser(&app, "firefox", &sub).await;
        let id = env.channel_push(&app, "firefox").await;
        let reference = env.expect_sent(&id, "webpush").await;
        assert!(
            reference.starts_with(&format!("{}/message/", standin.url)),
            "{reference}"
        );
        let got = standin.received_for(&sub);
        assert_eq!(got.len(), 1);
        let r = &got[0];
        assert_eq!(r.rejected, None);
        assert_eq!(r.auth, format!("vapid {} {SUBJECT}", standin.url));
        assert_eq!(
            r.body,
            json!({"message_id": id, "kind": "channel", "title": "Parcel",
                   "body": "Your parcel is here", "data": {"parcel": 7}})
        );
        let ttl: u64 = r.header("ttl").and_then(|t| t.parse().ok()).expect("TTL");
        assert!((3500..=3600).contains(&ttl), "{ttl}");
        assert_eq!(r.header("urgency"), Some("normal"));
        assert_eq!(r.header("topic"), Some(id.replace('-', "").as_str()));
        assert_eq!(r.header("content-encoding"), Some("aes128gcm"));
        // the key as PEM works the same; a high-priority message is urgent
        let pem_app = env
            .app(json!({"webpush": {"vapid_private_key": v.pem, "subject": SUBJECT}}))
            .await;
        env.browser(&pem_app, "chrome", &sub).await;
        let urgent = env
            .message_with(&pem_app, &["chrome"], 3_600_000, |m| {
                m.priority = pushgate_core::Priority::High;
                m.collapse_key = Some("parcels".into());
            })
            .await;
        env.push(
            &pem_app,
            &urgent,
            "chrome",
            "channel",
            &format!("{urgent}.push"),
        )
        .await;
        env.expect_sent(&urgent, "webpush").await;
        let got = standin.received_for(&sub);
        assert_eq!(got[1].header("urgency"), Some("high"));
        assert_eq!(got[1].header("topic"), Some("parcels"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webpush_gone_subscriptions_mark_the_device_invalid() {
    let (standin, v, creds) = setup().await;
    let not_found = standin.subscribe(&v.public);
    standin.script(&not_found, [Answer::empty(404)]);
    let unsubscribed = standin.subscribe(&v.public);
    standin.unsubscribe(&unsubscribed);
    with_bridge(settings(), Build::Real, |env| async move {
        let app = env.app(json!({"webpush": creds})).await;
        for (device, sub, detail) in [
            ("a", &not_found, "HTTP 404"),
            (
                "b",
                &unsubscribed,
                "HTTP 410: subscription expired or unsubscribed",
            ),
        ] {
            env.browser(&app, device, sub).await;
            let id = env.channel_push(&app, device).await;
            env.expect_failed(
                &id,
                "webpush",
                &format!("webpush rejected the push token: {detail}"),
            )
            .await;
            assert_eq!(env.token_state(&app, device).await, TokenState::Invalid);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webpush_too_large_fails_the_message() {
    let (standin, v, creds) = setup().await;
    let sub = standin.subscribe(&v.public);
    standin.script(&sub, [Answer::empty(413)]);
    let big_sub = standin.subscribe(&v.public);
    let standin2 = standin.clone();
    with_bridge(settings(), Build::Real, |env| async move {
        let app = env.app(json!({"webpush": creds})).await;
        env.browser(&app, "a", &sub).await;
        let id = env.channel_push(&app, "a").await;
        env.expect_failed(&id, "webpush", "webpush refused the notification: HTTP 413")
            .await;
        // more than one record can hold is refused before sending
        env.browser(&app, "big", &big_sub).await;
        let big = env
            .message_with(&app, &["big"], 3_600_000, |m| m.text = "x".repeat(5000))
            .await;
        env.push(&app, &big, "big", "channel", &format!("{big}.push"))
            .await;
        let s = env.wait_status(&big, Status::Failed).await;
        let detail = last(&s).detail.clone().unwrap_or_default();
        assert!(
            detail.starts_with("webpush refused the notification: payload too large ("),
            "{detail}"
        );
        assert!(standin2.received_for(&big_sub).is_empty());
        assert_eq!(env.count("permanent"), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webpush_refused_vapid_fails_with_detail_and_metric() {
    let (standin, v, creds) = setup().await;
    let subs: Vec<_> = [400, 401, 403]
        .iter()
        .map(|s| {
            let sub = standin.subscribe(&v.public);
            standin.script(&sub, [Answer::empty(*s)]);
            sub
        })
        .collect();
    // subscribed with another application server key: the push service refuses ours
    let foreign = standin.subscribe(&vapid().public);
    let standin2 = standin.clone();
    with_bridge(settings(), Build::Real, |env| async move {
        let app = env.app(json!({"webpush": creds})).await;
        for (i, (sub, status)) in subs.iter().zip([400, 401, 403]).enumerate() {
            let device = format!("d{i}");
            env.browser(&app, &device, sub).await;
            let id = env.channel_push(&app, &device).await;
            env.expect_failed(
                &id,
                "webpush",
                &format!("provider credentials rejected: HTTP {status}"),
            )
            .await;
        }
        env.browser(&app, "foreign", &foreign).await;
        let id = env.channel_push(&app, "foreign").await;
        env.expect_failed(
            &id,
            "webpush",
            "provider credentials rejected: HTTP 403: VAPID key does not match the subscription",
        )
        .await;
        assert_eq!(
            standin2.received_for(&foreign)[0].rejected.as_deref(),
            Some("VAPID key does not match the subscription")
        );
        assert_eq!(env.count("credentials"), 4);
        assert_eq!(env.token_state(&app, "foreign").await, TokenState::Valid);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webpush_busy_answers_are_retried_then_sent_once() {
    let (standin, v, creds) = setup().await;
    let subs: Vec<_> = [
        Answer::empty(429).retry_after(1),
        Answer::empty(500),
        Answer::empty(503),
    ]
    .into_iter()
    .map(|a| {
        let sub = standin.subscribe(&v.public);
        standin.script(&sub, [a]);
        sub
    })
    .collect();
    with_bridge(settings(), Build::Real, |env| async move {
        let app = env.app(json!({"webpush": creds})).await;
        let mut ids = Vec::new();
        for (i, sub) in subs.iter().enumerate() {
            let device = format!("d{i}");
            env.browser(&app, &device, sub).await;
            ids.push((sub, env.channel_push(&app, &device).await));
        }
        for (sub, id) in ids {
            env.expect_sent(&id, "webpush").await;
            let got = standin.received_for(sub);
            assert_eq!(got.len(), 2);
            // the same message, encrypted afresh each time
            assert_eq!(got[0].body, got[1].body);
        }
        assert_eq!(env.count("retry"), 3);
    })
    .await;
}
