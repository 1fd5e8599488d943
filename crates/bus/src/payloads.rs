//! Payloads carried on the bus besides events (which are `pushgate_core::BusEvent`) and
//! router commands (`pushgate_runtime::outbox::RouteCommand`).

use pushgate_core::Message;
use serde::{Deserialize, Serialize};

/// Router → edge (core NATS request): write this message to that device's session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeDeliver {
    /// Session the router found in the presence record.
    pub session_id: String,
    pub device_id: String,
    pub message: Message,
}

/// Edge's answer to [`EdgeDeliver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeDeliverReply {
    /// Queued on the live session (it stays pending in Redis until the device confirms).
    Accepted,
    /// That session is not here (it ended); treat the device as offline.
    NoSession,
}

/// Broadcast to every edge: close the device's session (deregistered, moved, or replaced).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeControl {
    pub app_id: String,
    pub device_id: String,
    /// Keep this session (the one that replaced the others), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except_session: Option<String>,
    /// Why, for logs and the stream error text.
    pub reason: String,
}

/// Router → native-push-bridge (JetStream): send a native push for a message to a device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushRequest {
    pub app_id: String,
    pub device_id: String,
    pub message_id: String,
    /// `wakeup` (device also uses XMPP), `channel` (native-only device) or `retract`.
    pub kind: String,
}

/// Router → sms-fallback (JetStream): send the SMS for a message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmsRequest {
    pub app_id: String,
    pub message_id: String,
}

/// Router → edge (core NATS): the message was cancelled or expired; retract it on the
/// device's live session (XEP-0424).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeRetract {
    pub app_id: String,
    pub device_id: String,
    pub message_id: String,
}
