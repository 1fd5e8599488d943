//! Apps (tenants) as the store keeps them.

use serde::{Deserialize, Serialize};

/// Where and how an app's events are delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookConfig {
    pub url: String,
    /// HMAC-SHA256 key for `Pushgate-Signature`.
    pub secret: String,
    /// The secret being rotated out; while set (until `previous_until`), batches carry both
    /// signatures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_until: Option<i64>,
}

/// One app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct App {
    pub app_id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookConfig>,
    /// Native push credentials per provider (`apns`, `fcm`, `hms`, `webpush`), as configured.
    #[serde(default)]
    pub providers: serde_json::Map<String, serde_json::Value>,
    /// SMS account settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms: Option<serde_json::Value>,
    /// SHA-256 (hex) of the current API key.
    pub api_key_hash: String,
    pub created_at: i64,
    pub updated_at: i64,
}
