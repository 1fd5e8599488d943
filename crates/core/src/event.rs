//! Events reported to backends (webhook batches and `WatchEvents`).

use serde::{Deserialize, Serialize};

use crate::Status;

/// What happened: a status change, or a device's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventKind {
    Status(Status),
    Reply(ReplyTag),
}

/// The literal `"reply"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyTag {
    Reply,
}

impl EventKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Status(s) => s.as_str(),
            EventKind::Reply(_) => "reply",
        }
    }
}

/// One event as the backend receives it. Field names are the public contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Stable id: receivers dedupe by it.
    pub id: String,
    pub event: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// RFC 3339.
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// An event on the bus: the public event plus what routing it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BusEvent {
    pub app_id: String,
    /// Position of a status event in its message's history (1-based); 0 for replies.
    /// Receivers of the bus use it to keep a message's events in status order.
    pub seq: u32,
    pub event: Event,
}

/// A webhook batch that was not accepted within the retry limit, kept for the operator to
/// inspect and replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The `Pushgate-Delivery` id the batch was sent with.
    pub batch_id: String,
    pub app_id: String,
    /// When it was given up (epoch ms).
    pub failed_at: i64,
    /// Why (the last attempt's outcome).
    pub reason: String,
    pub events: Vec<Event>,
}

impl Event {
    /// The position of a status event in its message's history (from its id
    /// `{message_id}.{seq}`); 0 for replies.
    pub fn seq(&self) -> u32 {
        match self.event {
            EventKind::Reply(_) => 0,
            EventKind::Status(_) => self
                .id
                .rsplit_once('.')
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_serialises_flat() {
        let k = EventKind::Status(Status::SmsSent);
        assert_eq!(
            serde_json::to_string(&k).ok().as_deref(),
            Some("\"sms_sent\"")
        );
        let r = EventKind::Reply(ReplyTag::Reply);
        assert_eq!(serde_json::to_string(&r).ok().as_deref(), Some("\"reply\""));
        let back: Option<EventKind> = serde_json::from_str("\"reply\"").ok();
        assert_eq!(back, Some(r));
    }
}
