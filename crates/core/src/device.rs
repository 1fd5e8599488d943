//! Devices as the store keeps them.

use serde::{Deserialize, Serialize};

/// What kind of app runs on the device; decides which native push service can wake it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Ios,
    Android,
    Huawei,
    Web,
    Xmpp,
}

impl Platform {
    /// The native channel for this platform, if it has one.
    pub fn native_channel(self) -> Option<&'static str> {
        match self {
            Platform::Ios => Some("apns"),
            Platform::Android => Some("fcm"),
            Platform::Huawei => Some("hms"),
            Platform::Web => Some("webpush"),
            Platform::Xmpp => None,
        }
    }

    /// Whether `token` can be this platform's native push token, as far as its shape tells.
    /// Only APNs has one: a device token is hex (the bytes Apple gave the app), at most 200
    /// characters (Apple does not fix the length), and it goes into the request path, so the
    /// bridge sends nothing else. FCM and HMS tokens have no published shape beyond their
    /// length, which callers bound themselves.
    pub fn accepts_push_token(self, token: &str) -> bool {
        match self {
            Platform::Ios => {
                !token.is_empty()
                    && token.len() <= 200
                    && token.bytes().all(|b| b.is_ascii_hexdigit())
            }
            _ => true,
        }
    }
}

/// Whether the device's native push token can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TokenState {
    /// No token registered (XMPP-only device).
    None,
    /// Registered and not refused by the provider so far.
    Valid,
    /// The provider said the token is dead; it is not used until the device registers a new one.
    Invalid,
}

/// A Web Push subscription (RFC 8030 endpoint with RFC 8291 keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebPushSubscription {
    pub endpoint: String,
    pub p256dh: String,
    pub auth: String,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub app_id: String,
    pub device_id: String,
    pub user_id: String,
    pub platform: Platform,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webpush: Option<WebPushSubscription>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// Local part of the device's XMPP address; opaque, derived from app and device id.
    pub jid_local: String,
    /// Bumped whenever the device changes hands; part of the XMPP password derivation, so a
    /// moved device's old credentials stop working.
    pub generation: u32,
    pub token_state: TokenState,
    /// SCRAM-SHA-256 verifier of the device's XMPP password (the password itself is never
    /// stored; it is derived from a server secret and shown on registration).
    pub scram: ScramCredentials,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Device {
    /// Whether a native push can be sent to this device now.
    pub fn has_usable_token(&self) -> bool {
        self.token_state == TokenState::Valid
            && (self.push_token.is_some() || self.webpush.is_some())
            && self.platform.native_channel().is_some()
    }
}

/// What a server keeps to check a SCRAM-SHA-256 login (RFC 5802/7677), base64-encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramCredentials {
    pub salt: String,
    pub iterations: u32,
    pub stored_key: String,
    pub server_key: String,
}
