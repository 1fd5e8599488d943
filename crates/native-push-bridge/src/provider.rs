//! The frame native push protocol clients (APNs, FCM, HMS, Web Push) plug into.
//!
//! A client implements [`Provider`]: given the app's credentials for its channel, the device
//! and a [`Notification`], it makes one attempt and classifies the answer into a
//! [`ProviderError`] variant. Everything that follows from the answer (token invalidation,
//! status transitions, retries, metrics) is the bridge's job, in one place for all providers
//! ([`crate::worker`]), so each client only has to map its protocol's answers onto the table:
//!
//! | answer                          | bridge reaction                                                   |
//! |---------------------------------|-------------------------------------------------------------------|
//! | `Ok(ProviderAccepted)`          | `channel`: `sent` on the native channel; `wakeup`: metric only      |
//! | [`ProviderError::InvalidToken`] | device `token_state` → `invalid`; `channel`: `failed`               |
//! | [`ProviderError::Retryable`]    | retried with backoff (at least `retry_after`) until `expires_at`    |
//! | [`ProviderError::Permanent`]    | `channel`: `failed`; `wakeup`: log and metric (XMPP/expiry remain)  |
//! | [`ProviderError::Credentials`]  | error log, metric `credentials`; `channel`: `failed`                |
//! | [`ProviderError::Unknown`]      | not repeated (the push may be out); log and metric                  |

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use pushgate_core::{Device, Message, Priority};
use serde::{Deserialize, Serialize};

/// What the router asks for (`PushRequest.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotificationKind {
    /// The device also uses XMPP: a silent push that makes the app connect and fetch the
    /// message there. Its success is not a status change (the message is `sent` when the edge
    /// writes it to the session).
    Wakeup,
    /// The native push is the device's channel: a visible notification carrying the message.
    Channel,
    /// Remove an earlier notification of this message from the device (it was cancelled or
    /// read elsewhere).
    Retract,
}

impl NotificationKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::Wakeup => "wakeup",
            NotificationKind::Channel => "channel",
            NotificationKind::Retract => "retract",
        }
    }

    /// Parses `PushRequest.kind`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "wakeup" => Some(NotificationKind::Wakeup),
            "channel" => Some(NotificationKind::Channel),
            "retract" => Some(NotificationKind::Retract),
            _ => None,
        }
    }
}

/// One notification, provider-neutral. Clients map it onto their protocol.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notification {
    pub kind: NotificationKind,
    /// Also the notification's identity on the device: clients use it as the replace/collapse
    /// identifier (`apns-collapse-id`, FCM/HMS `tag`, Web Push `Topic`) when `collapse_key` is
    /// absent, and a `retract` names the notification to remove by it.
    pub message_id: String,
    pub title: Option<String>,
    pub text: String,
    pub data: Option<serde_json::Value>,
    pub priority: Priority,
    pub collapse_key: Option<String>,
    /// Epoch ms; clients pass it on as the provider-side expiry (`apns-expiration`, FCM `ttl`,
    /// Web Push `TTL`) so a device that comes back late is not shown a dead message.
    pub expires_at: i64,
}

impl Notification {
    /// The notification for a message.
    pub fn from_message(m: &Message, kind: NotificationKind) -> Self {
        Notification {
            kind,
            message_id: m.id.clone(),
            title: m.title.clone(),
            text: m.text.clone(),
            data: m.data.clone(),
            priority: m.priority,
            collapse_key: m.collapse_key.clone(),
            expires_at: m.expires_at,
        }
    }
}

/// The provider took the notification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderAccepted {
    /// The provider's id for it (`apns-id`, FCM message name, …), for logs and the event detail.
    pub reference: Option<String>,
}

/// Why an attempt did not succeed, in the terms of the bridge's reaction table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The token or subscription is dead (APNs `BadDeviceToken`/`Unregistered`, FCM
    /// `UNREGISTERED`, Web Push 404/410). It is not used again until the device registers anew.
    #[error("push token rejected: {detail}")]
    InvalidToken { detail: String },
    /// The notification was certainly not accepted and may be sent again (connection refused,
    /// 429, 5xx). `retry_after` is the provider's own hint.
    #[error("provider temporarily unavailable: {detail}")]
    Retryable {
        retry_after: Option<Duration>,
        detail: String,
    },
    /// This notification can never be sent as it is (payload too large, bad topic).
    #[error("provider refused the notification: {detail}")]
    Permanent { detail: String },
    /// The app's credentials for this provider were refused (expired key, wrong team/project).
    #[error("provider credentials rejected: {detail}")]
    Credentials { detail: String },
    /// The request may or may not have been accepted (it was written, no answer came). The
    /// bridge does not send it again: a repeated push is worse than a missing one here, the
    /// message itself still has XMPP, expiry and the SMS fallback.
    #[error("provider outcome unknown: {detail}")]
    Unknown { detail: String },
}

/// The app's credentials for one provider, with what a client needs to cache what it derives
/// from them (parsed keys, signed tokens, OAuth access tokens, HTTP connections) per app.
#[derive(Debug, Clone, Copy)]
pub struct AppCredentials<'a> {
    pub app_id: &'a str,
    /// `App.updated_at`: it changes whenever the operator edits the app, so a client that keys
    /// its per-app cache by it picks up new credentials on the next push, without a restart.
    pub version: i64,
    /// `App.providers[channel]`, as the operator configured it.
    pub creds: &'a serde_json::Value,
}

/// A native push protocol client.
///
/// `send` returns a boxed future rather than being an `async fn` so that providers can live in
/// one registry as `Arc<dyn Provider>`: native `async fn` in traits is not object safe.
/// A client must answer within the bridge's `send_timeout_ms` (the bridge treats a timeout
/// as [`ProviderError::Unknown`]).
pub trait Provider: Send + Sync + 'static {
    /// One attempt to hand `notification` to the provider for `device`, with the app's
    /// credentials for this provider.
    fn send<'a>(
        &'a self,
        app: AppCredentials<'a>,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Result<ProviderAccepted, ProviderError>>;
}

/// The providers of a bridge, by channel name (`apns`, `fcm`, `hms`, `webpush`: the names of
/// [`pushgate_core::Platform::native_channel`] and the keys of `App.providers`).
pub type Providers = HashMap<&'static str, Arc<dyn Provider>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_from_the_wire() {
        for k in [
            NotificationKind::Wakeup,
            NotificationKind::Channel,
            NotificationKind::Retract,
        ] {
            assert_eq!(NotificationKind::parse(k.as_str()), Some(k));
            assert_eq!(
                serde_json::to_string(&k).ok(),
                Some(format!("\"{}\"", k.as_str()))
            );
        }
        assert_eq!(NotificationKind::parse("Wakeup"), None);
        assert_eq!(NotificationKind::parse(""), None);
    }

    #[test]
    fn notification_carries_the_message() {
        let m = Message {
            id: "0190a0a0-0000-7000-8000-000000000000".into(),
            app_id: "app_0123456789abcdef0123456789".into(),
            user_id: Some("u".into()),
            device_id: None,
            phone: None,
            foreign_id: None,
            text: "hello".into(),
            title: Some("Title".into()),
            data: Some(serde_json::json!({"k": 1})),
            priority: Priority::High,
            collapse_key: Some("c".into()),
            sms_fallback: None,
            send_at: None,
            created_at: 1,
            pos: 0,
            expires_at: 99,
        };
        let n = Notification::from_message(&m, NotificationKind::Channel);
        assert_eq!(n.kind, NotificationKind::Channel);
        assert_eq!(n.message_id, m.id);
        assert_eq!(
            (n.title.as_deref(), n.text.as_str()),
            (Some("Title"), "hello")
        );
        assert_eq!(n.data, m.data);
        assert_eq!(
            (n.priority, n.collapse_key.as_deref(), n.expires_at),
            (Priority::High, Some("c"), 99)
        );
    }
}
