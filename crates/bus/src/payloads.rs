//! Payloads carried on the bus besides events (which are `pushgate_core::BusEvent`) and
//! router commands (`pushgate_runtime::outbox::RouteCommand`).

use std::collections::HashMap;

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

/// One item of a batched hand-over: router → edge (core NATS request on
/// `{ns}.edge.{edge}.deliver_batch`, payload `Vec<EdgeDeliverItem>`; the answer is a
/// `Vec<EdgeDeliverReply>`, one per item, in the same order). Routers batch the hand-overs
/// bound for one edge to save a NATS round trip and a task wake-up per message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeDeliverItem {
    pub deliver: EdgeDeliver,
    /// W3C trace context (`traceparent`, `tracestate`) of the router span that handed this
    /// item over: one request carries many messages, so the request's own headers cannot say
    /// which trace each belongs to.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub trace: HashMap<String, String>,
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
