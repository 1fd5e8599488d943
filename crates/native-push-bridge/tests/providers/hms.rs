//! HMS Push Kit: client-credentials token, the message, every documented result code.

use std::sync::Arc;

use native_push_bridge::testing::{Answer, HmsStandIn};
use native_push_bridge::BridgeSettings;
use pushgate_core::{Platform, TokenState};
use serde_json::{json, Value};

use super::{pki, settings};
use crate::{with_bridge, Build, Env};

const APP_ID: &str = "101234567";
const SECRET: &str = "s3cr3t-of-the-app";

async fn setup() -> (Arc<HmsStandIn>, BridgeSettings, Value) {
    let standin = Arc::new(HmsStandIn::start(pki()).await.expect("HMS stand-in"));
    standin.add_app(APP_ID, SECRET);
    let settings = BridgeSettings {
        hms_url: standin.url.clone(),
        hms_token_url: standin.token_url.clone(),
        ..settings()
    };
    (
        standin,
        settings,
        json!({"app_id": APP_ID, "client_secret": SECRET}),
    )
}

fn result(status: u16, code: &str, msg: &str) -> Answer {
    Answer::json(
        status,
        json!({"code": code, "msg": msg, "requestId": "1234"}),
    )
}

impl Env {
    async fn huawei(&self, app_id: &str, device_id: &str) {
        self.device_on(
            app_id,
            device_id,
            Platform::Huawei,
            Some(format!("hms-{device_id}")),
            None,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hms_push_is_sent_with_a_client_credentials_token() {
    let (standin, settings, creds) = setup().await;
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"hms": creds})).await;
        env.huawei(&app, "mate").await;
        let id = env.channel_push(&app, "mate").await;
        assert!(!env.expect_sent(&id, "hms").await.is_empty());
        let got = standin.received_for("hms-mate");
        assert_eq!(got.len(), 1);
        let r = &got[0];
        assert_eq!(
            (r.rejected.as_deref(), r.auth.as_str()),
            (None, "bearer 101234567")
        );
        assert_eq!(r.path, format!("/v1/{APP_ID}/messages:send"));
        assert_eq!(r.body["validate_only"], json!(false));
        let m = &r.body["message"];
        assert_eq!(m["token"], json!(["hms-mate"]));
        assert_eq!(
            m["notification"],
            json!({"title": "Parcel", "body": "Your parcel is here"})
        );
        let data: Value = serde_json::from_str(m["data"].as_str().expect("data is a string"))
            .expect("data is JSON text");
        assert_eq!(
            data,
            json!({"message_id": id, "kind": "channel", "data": {"parcel": 7}})
        );
        assert_eq!(m["android"]["urgency"], json!("NORMAL"));
        assert_eq!(m["android"]["collapse_key"], json!(-1));
        let ttl: u64 = m["android"]["ttl"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .expect("ttl in seconds");
        assert!((3500..=3600).contains(&ttl), "{ttl}");
        let second = env.channel_push(&app, "mate").await;
        env.expect_sent(&second, "hms").await;
        assert_eq!(standin.token_requests(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hms_invalid_tokens_mark_the_device_invalid() {
    let (standin, settings, creds) = setup().await;
    standin.script(
        "hms-all",
        [result(400, "80300007", "All the tokens are invalid")],
    );
    let partial =
        json!({"success": 0, "failure": 1, "illegal_tokens": ["hms-partial"]}).to_string();
    standin.script("hms-partial", [result(200, "80100000", &partial)]);
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"hms": creds})).await;
        for (device, detail) in [
            ("all", "80300007 All the tokens are invalid"),
            ("partial", "80100000 illegal token"),
        ] {
            env.huawei(&app, device).await;
            let id = env.channel_push(&app, device).await;
            env.expect_failed(
                &id,
                "hms",
                &format!("hms rejected the push token: {detail}"),
            )
            .await;
            assert_eq!(env.token_state(&app, device).await, TokenState::Invalid);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hms_oversized_message_fails() {
    let (standin, settings, creds) = setup().await;
    standin.script(
        "hms-mate",
        [result(
            400,
            "80300008",
            "The message body size exceeds the default value",
        )],
    );
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"hms": creds})).await;
        env.huawei(&app, "mate").await;
        let id = env.channel_push(&app, "mate").await;
        env.expect_failed(
            &id,
            "hms",
            "hms refused the notification: 80300008 The message body size exceeds the default value",
        )
        .await;
        assert_eq!(env.token_state(&app, "mate").await, TokenState::Valid);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hms_rejected_credentials_fail_with_detail_and_metric() {
    let (standin, settings, creds) = setup().await;
    // refused again after the one token refresh
    let oauth = result(401, "80200001", "OAuth authentication error");
    standin.script("hms-mate", [oauth.clone(), oauth]);
    let standin2 = standin.clone();
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"hms": creds})).await;
        env.huawei(&app, "mate").await;
        let id = env.channel_push(&app, "mate").await;
        env.expect_failed(
            &id,
            "hms",
            "provider credentials rejected: 80200001 OAuth authentication error",
        )
        .await;
        assert_eq!(standin2.received_for("hms-mate").len(), 2);
        assert_eq!(standin2.token_requests(), 2);
        // a wrong app secret: the token endpoint refuses it
        let wrong = env
            .app(json!({"hms": {"app_id": APP_ID, "client_secret": "wrong"}}))
            .await;
        env.huawei(&wrong, "p").await;
        let id = env.channel_push(&wrong, "p").await;
        env.expect_failed(
            &id,
            "hms",
            "provider credentials rejected: hms OAuth token request refused: 1101: invalid client",
        )
        .await;
        assert_eq!(env.count("credentials"), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hms_expired_access_token_is_replaced_once() {
    let (standin, settings, creds) = setup().await;
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"hms": creds})).await;
        env.huawei(&app, "mate").await;
        let first = env.channel_push(&app, "mate").await;
        env.expect_sent(&first, "hms").await;
        standin.expire_access_tokens();
        let second = env.channel_push(&app, "mate").await;
        env.expect_sent(&second, "hms").await;
        assert_eq!(standin.token_requests(), 2);
        let got = standin.received_for("hms-mate");
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].rejected.as_deref(), Some("80200003"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hms_busy_answers_are_retried_then_sent_once() {
    let (standin, settings, creds) = setup().await;
    standin.script(
        "hms-internal",
        [result(500, "81000001", "System inner error")],
    );
    standin.script("hms-busy", [Answer::empty(503).retry_after(1)]);
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"hms": creds})).await;
        let mut ids = Vec::new();
        for device in ["internal", "busy"] {
            env.huawei(&app, device).await;
            ids.push((device, env.channel_push(&app, device).await));
        }
        for (device, id) in ids {
            env.expect_sent(&id, "hms").await;
            assert_eq!(standin.received_for(&format!("hms-{device}")).len(), 2);
        }
        assert_eq!(env.count("retry"), 2);
    })
    .await;
}
