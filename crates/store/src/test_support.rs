//! What the store's unit tests share: a store in a namespace of its own on the test Redis, and
//! a message to route or settle.

use pushgate_core::{Device, Message, Platform, ScramCredentials, TokenState};

use crate::{Store, StoreError};

/// The app every unit test's data belongs to (a valid app id).
pub const APP: &str = "app_0123456789abcdef0123456789";

/// The test Redis: `PUSHGATE_TEST_REDIS_URL`, or the local server.
pub fn redis_url() -> String {
    std::env::var("PUSHGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A store in a fresh namespace starting with `prefix`, so tests running in parallel never see
/// each other's keys.
pub async fn store(prefix: &str) -> Result<Store, StoreError> {
    let ns = format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    Store::connect(&redis_url(), &ns).await
}

/// A text message of [`APP`] to `user`'s devices, accepted at `created_at` as the request's
/// `pos`-th recipient, expiring an hour later.
pub fn message(user: &str, created_at: i64, pos: u32) -> Message {
    Message {
        id: uuid::Uuid::now_v7().to_string(),
        app_id: APP.into(),
        user_id: Some(user.into()),
        device_id: None,
        phone: None,
        foreign_id: None,
        text: "t".into(),
        title: None,
        data: None,
        priority: Default::default(),
        collapse_key: None,
        sms_fallback: None,
        send_at: None,
        created_at,
        pos,
        expires_at: created_at + 3_600_000,
    }
}

/// An Android device `id` of [`APP`]'s `user`, with a valid token.
pub fn device(id: &str, user: &str) -> Device {
    Device {
        app_id: APP.into(),
        device_id: id.into(),
        user_id: user.into(),
        platform: Platform::Android,
        push_token: Some(format!("tok-{id}")),
        webpush: None,
        phone: None,
        locale: None,
        jid_local: format!("j-{id}"),
        generation: 1,
        token_state: TokenState::Valid,
        scram: ScramCredentials {
            salt: "c2FsdA==".into(),
            iterations: 4096,
            stored_key: "c2s=".into(),
            server_key: "c2s=".into(),
        },
        created_at: 1,
        updated_at: 1,
    }
}
