//! FCM HTTP v1: the service-account grant, the message, every documented answer.

use std::sync::{Arc, LazyLock};

use native_push_bridge::testing::{Answer, FcmStandIn};
use native_push_bridge::BridgeSettings;
use pushgate_core::TokenState;
use rsa::pkcs1::EncodeRsaPublicKey;
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::{json, Value};

use super::{pki, settings};
use crate::{with_bridge, Build};

const PROJECT: &str = "pushgate-test";
const ACCOUNT: &str = "bridge@pushgate-test.iam.gserviceaccount.com";

/// The service account's RSA key (PKCS#8 PEM, as in Google's JSON) and its public half
/// (PKCS#1 DER, for the stand-in), made once per test process: 2048-bit key generation is
/// slow.
static KEY: LazyLock<(String, Vec<u8>)> = LazyLock::new(|| {
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("RSA key");
    let pem = key.to_pkcs8_pem(LineEnding::LF).expect("PEM").to_string();
    let public = key
        .to_public_key()
        .to_pkcs1_der()
        .expect("DER")
        .as_bytes()
        .to_vec();
    (pem, public)
});

/// The service-account JSON Google hands out.
fn service_account(standin: &FcmStandIn, email: &str) -> Value {
    json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123456789abcdef",
        "private_key": KEY.0,
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": standin.token_url,
    })
}

async fn setup() -> (Arc<FcmStandIn>, BridgeSettings, Value) {
    let standin = Arc::new(FcmStandIn::start(pki()).await.expect("FCM stand-in"));
    standin.add_service_account(PROJECT, ACCOUNT, KEY.1.clone());
    let creds = json!({"service_account": service_account(&standin, ACCOUNT)});
    let settings = BridgeSettings {
        fcm_url: standin.url.clone(),
        ..settings()
    };
    (standin, settings, creds)
}

fn fcm_error(
    status: u16,
    canonical: &str,
    code: Option<&str>,
    message: &str,
    field: Option<&str>,
) -> Answer {
    let mut details = vec![];
    if let Some(c) = code {
        details.push(
            json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": c}),
        );
    }
    if let Some(f) = field {
        details.push(json!({"@type": "type.googleapis.com/google.rpc.BadRequest",
                            "fieldViolations": [{"field": f, "description": message}]}));
    }
    Answer::json(
        status,
        json!({"error": {"code": status, "message": message, "status": canonical, "details": details}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_push_is_sent_with_a_verified_access_token() {
    let (standin, settings, creds) = setup().await;
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"fcm": creds})).await;
        env.device(&app, "phone-1").await;
        let id = env.channel_push(&app, "phone-1").await;
        let reference = env.expect_sent(&id, "fcm").await;
        assert!(
            reference.starts_with(&format!("projects/{PROJECT}/messages/")),
            "{reference}"
        );
        let got = standin.received_for("token-phone-1");
        assert_eq!(got.len(), 1);
        let r = &got[0];
        assert_eq!(
            (r.rejected.as_deref(), r.auth.as_str()),
            (None, "bearer pushgate-test")
        );
        assert!(r.http2);
        let m = &r.body["message"];
        assert_eq!(
            m["notification"],
            json!({"title": "Parcel", "body": "Your parcel is here"})
        );
        assert_eq!(
            m["data"],
            json!({"parcel": "7", "message_id": id, "kind": "channel"})
        );
        assert_eq!(m["android"]["priority"], json!("NORMAL"));
        assert_eq!(m["android"]["notification"], json!({"tag": id}));
        let ttl: u64 = m["android"]["ttl"]
            .as_str()
            .and_then(|t| t.strip_suffix('s'))
            .and_then(|t| t.parse().ok())
            .expect("ttl in seconds");
        assert!((3500..=3600).contains(&ttl), "{ttl}");
        // the service-account JSON pasted as the settings themselves works the same, and the
        // first app's access token is not asked for again
        let plain = env
            .app(json!({"fcm": service_account(&standin, ACCOUNT)}))
            .await;
        env.device(&plain, "phone-2").await;
        let second = env.channel_push(&plain, "phone-2").await;
        env.expect_sent(&second, "fcm").await;
        let third = env.channel_push(&app, "phone-1").await;
        env.expect_sent(&third, "fcm").await;
        assert_eq!(standin.token_requests(), 2, "one token per app");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_dead_tokens_mark_the_device_invalid() {
    let (standin, settings, creds) = setup().await;
    standin.script(
        "token-gone",
        [fcm_error(
            404,
            "NOT_FOUND",
            Some("UNREGISTERED"),
            "Requested entity was not found.",
            None,
        )],
    );
    standin.script(
        "token-bad",
        [fcm_error(
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            "The registration token is not a valid FCM registration token",
            Some("message.token"),
        )],
    );
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"fcm": creds})).await;
        for (device, detail) in [
            ("gone", "UNREGISTERED: Requested entity was not found."),
            (
                "bad",
                "INVALID_ARGUMENT: The registration token is not a valid FCM registration token",
            ),
        ] {
            env.device(&app, device).await;
            let id = env.channel_push(&app, device).await;
            env.expect_failed(
                &id,
                "fcm",
                &format!("fcm rejected the push token: {detail}"),
            )
            .await;
            assert_eq!(env.token_state(&app, device).await, TokenState::Invalid);
        }
        assert_eq!(env.count("invalid_token"), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_invalid_arguments_fail_the_message() {
    let (standin, settings, creds) = setup().await;
    standin.script(
        "token-phone-1",
        [fcm_error(
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            "Message is too big",
            Some("message"),
        )],
    );
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"fcm": creds})).await;
        env.device(&app, "phone-1").await;
        let id = env.channel_push(&app, "phone-1").await;
        env.expect_failed(
            &id,
            "fcm",
            "fcm refused the notification: INVALID_ARGUMENT: Message is too big",
        )
        .await;
        assert_eq!(env.token_state(&app, "phone-1").await, TokenState::Valid);
        assert_eq!(env.count("permanent"), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_rejected_credentials_fail_with_detail_and_metric() {
    let (standin, settings, creds) = setup().await;
    standin.script(
        "token-a",
        [fcm_error(
            401,
            "UNAUTHENTICATED",
            Some("THIRD_PARTY_AUTH_ERROR"),
            "APNs certificate rejected",
            None,
        )],
    );
    standin.script(
        "token-b",
        [fcm_error(
            403,
            "PERMISSION_DENIED",
            None,
            "Permission denied",
            None,
        )],
    );
    standin.script(
        "token-c",
        [fcm_error(
            403,
            "PERMISSION_DENIED",
            Some("SENDER_ID_MISMATCH"),
            "SenderId mismatch",
            None,
        )],
    );
    let stranger = json!({"service_account": service_account(&standin, "stranger@elsewhere.iam.gserviceaccount.com")});
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"fcm": creds})).await;
        for (device, detail) in [
            ("a", "THIRD_PARTY_AUTH_ERROR: APNs certificate rejected"),
            ("b", "PERMISSION_DENIED: Permission denied"),
            ("c", "SENDER_ID_MISMATCH: SenderId mismatch"),
        ] {
            env.device(&app, device).await;
            let id = env.channel_push(&app, device).await;
            env.expect_failed(&id, "fcm", &format!("provider credentials rejected: {detail}"))
                .await;
        }
        // an account the token endpoint does not know: its assertion is refused
        let other = env.app(json!({"fcm": stranger})).await;
        env.device(&other, "d").await;
        let id = env.channel_push(&other, "d").await;
        env.expect_failed(
            &id,
            "fcm",
            "provider credentials rejected: fcm OAuth token request refused: invalid_grant: Invalid grant: account not found",
        )
        .await;
        assert_eq!(env.count("credentials"), 4);
        assert_eq!(env.token_state(&other, "d").await, TokenState::Valid);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_busy_answers_are_retried_then_sent_once() {
    let (standin, settings, creds) = setup().await;
    standin.script(
        "token-q",
        [fcm_error(
            429,
            "RESOURCE_EXHAUSTED",
            Some("QUOTA_EXCEEDED"),
            "Quota exceeded",
            None,
        )
        .retry_after(1)],
    );
    standin.script(
        "token-i",
        [fcm_error(
            500,
            "INTERNAL",
            Some("INTERNAL"),
            "Internal error",
            None,
        )],
    );
    standin.script(
        "token-u",
        [fcm_error(
            503,
            "UNAVAILABLE",
            Some("UNAVAILABLE"),
            "Unavailable",
            None,
        )],
    );
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"fcm": creds})).await;
        let mut ids = Vec::new();
        for device in ["q", "i", "u"] {
            env.device(&app, device).await;
            ids.push((device, env.channel_push(&app, device).await));
        }
        for (device, id) in ids {
            env.expect_sent(&id, "fcm").await;
            assert_eq!(standin.received_for(&format!("token-{device}")).len(), 2);
        }
        assert_eq!(env.count("retry"), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_revoked_access_token_is_replaced_once() {
    let (standin, settings, creds) = setup().await;
    with_bridge(settings, Build::Real, |env| async move {
        let app = env.app(json!({"fcm": creds})).await;
        env.device(&app, "phone-1").await;
        let first = env.channel_push(&app, "phone-1").await;
        env.expect_sent(&first, "fcm").await;
        standin.revoke_access_tokens();
        let second = env.channel_push(&app, "phone-1").await;
        env.expect_sent(&second, "fcm").await;
        assert_eq!(standin.token_requests(), 2);
        let got = standin.received_for("token-phone-1");
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].rejected.as_deref(), Some("UNAUTHENTICATED"));
        assert_eq!(env.count("credentials"), 0);
    })
    .await;
}
