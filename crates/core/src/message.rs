//! Messages as the store keeps them.

use serde::{Deserialize, Serialize};

use crate::Status;

/// Delivery priority, passed on to native push services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Normal,
}

/// SMS fallback request of a message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SmsFallback {
    /// Text of the SMS; the message text when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// One message: one recipient of one `POST /v1/messages`. The parts that never change after
/// acceptance are stored as one JSON document; the status lives beside it so the store's
/// scripts can change it atomically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: String,
    pub app_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign_id: Option<String>,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collapse_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms_fallback: Option<SmsFallback>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at: Option<i64>,
    /// Acceptance time, epoch ms.
    pub created_at: i64,
    /// Position among the recipients of its request (0-based).
    #[serde(default)]
    pub pos: u32,
    /// `created_at + ttl`, epoch ms.
    pub expires_at: i64,
}

impl Message {
    /// Where the message sorts among a device's pending messages and in listings: acceptance
    /// time, then position in its request. Unique per request and exact in an f64 (2^53)
    /// until the year 2255.
    pub fn order_key(&self) -> i64 {
        self.created_at * 1000 + i64::from(self.pos.min(999))
    }
}

/// A message with its current state, as read back from the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageState {
    pub message: Message,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    pub history: Vec<HistoryEntry>,
}

/// One line of a message's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub status: Status,
    /// Epoch ms.
    pub at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}
