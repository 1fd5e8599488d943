//! Stream, subject and consumer names. The only place they are spelled out.

use std::time::Duration;

/// The JetStream streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Work for routers: a message id that needs routing or a follow-up.
    Messages,
    /// Status and reply events for backends.
    Events,
    /// Native push requests for the bridge.
    Push,
    /// SMS requests for sms-fallback.
    Sms,
}

impl StreamKind {
    pub const ALL: [StreamKind; 4] = [
        StreamKind::Messages,
        StreamKind::Events,
        StreamKind::Push,
        StreamKind::Sms,
    ];

    fn suffix(self) -> &'static str {
        match self {
            StreamKind::Messages => "MESSAGES",
            StreamKind::Events => "EVENTS",
            StreamKind::Push => "PUSH",
            StreamKind::Sms => "SMS",
        }
    }

    fn subject_root(self) -> &'static str {
        match self {
            StreamKind::Messages => "msg",
            StreamKind::Events => "evt",
            StreamKind::Push => "push",
            StreamKind::Sms => "sms",
        }
    }
}

/// The durable consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerName {
    Router,
    Webhook,
    Bridge,
    Sms,
}

impl ConsumerName {
    /// The durable name on the server.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerName::Router => "router",
            ConsumerName::Webhook => "webhook",
            ConsumerName::Bridge => "bridge",
            ConsumerName::Sms => "sms",
        }
    }

    /// The stream the consumer reads.
    pub fn stream(self) -> StreamKind {
        match self {
            ConsumerName::Router => StreamKind::Messages,
            ConsumerName::Webhook => StreamKind::Events,
            ConsumerName::Bridge => StreamKind::Push,
            ConsumerName::Sms => StreamKind::Sms,
        }
    }

    /// The consumers of a stream.
    pub fn for_stream(kind: StreamKind) -> &'static [ConsumerName] {
        match kind {
            StreamKind::Messages => &[ConsumerName::Router],
            StreamKind::Events => &[ConsumerName::Webhook],
            StreamKind::Push => &[ConsumerName::Bridge],
            StreamKind::Sms => &[ConsumerName::Sms],
        }
    }

    /// How long a delivered, unacknowledged message waits before the server redelivers it.
    /// Long enough for one slow handling (a webhook POST has a 10 s timeout), short enough that
    /// a crashed worker's messages come back quickly.
    pub fn ack_wait(self) -> Duration {
        match self {
            ConsumerName::Webhook => Duration::from_secs(30),
            _ => Duration::from_secs(15),
        }
    }

    /// Bound on messages handed out and not yet acknowledged, across all instances.
    pub fn max_ack_pending(self) -> i64 {
        match self {
            ConsumerName::Webhook => 20_000,
            _ => 10_000,
        }
    }
}

/// Names for one namespace.
#[derive(Debug, Clone)]
pub struct Names {
    ns: String,
}

impl Names {
    /// `namespace` must be lowercase alphanumeric (checked by configuration validation).
    pub fn new(namespace: &str) -> Self {
        Names {
            ns: namespace.to_string(),
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// `{NS}_MESSAGES`, …
    pub fn stream(&self, kind: StreamKind) -> String {
        format!("{}_{}", self.ns.to_uppercase(), kind.suffix())
    }

    /// The subject filter a stream captures.
    pub fn stream_subjects(&self, kind: StreamKind) -> String {
        format!("{}.{}.>", self.ns, kind.subject_root())
    }

    /// Router work.
    pub fn route(&self) -> String {
        format!("{}.msg.route", self.ns)
    }

    /// Events of one app.
    pub fn events(&self, app_id: &str) -> String {
        format!("{}.evt.{app_id}", self.ns)
    }

    /// Native push requests.
    pub fn push(&self) -> String {
        format!("{}.push.send", self.ns)
    }

    /// SMS requests.
    pub fn sms(&self) -> String {
        format!("{}.sms.send", self.ns)
    }

    /// Hand-over of a message to one edge instance (core NATS request/reply).
    pub fn edge_deliver(&self, edge_id: &str) -> String {
        format!("{}.edge.{edge_id}.deliver", self.ns)
    }

    /// Batched hand-over of messages to one edge instance (core NATS request/reply; see
    /// [`crate::payloads::EdgeDeliverItem`]). Edges also keep answering [`Names::edge_deliver`]
    /// so routers of either kind work during a rolling upgrade.
    pub fn edge_deliver_batch(&self, edge_id: &str) -> String {
        format!("{}.edge.{edge_id}.deliver_batch", self.ns)
    }

    /// To one edge: retract a message on a device's live session (core NATS; the durable
    /// copy is the device's retraction queue in Redis).
    pub fn edge_retract(&self, edge_id: &str) -> String {
        format!("{}.edge.{edge_id}.retract", self.ns)
    }

    /// Broadcast to all edges: close a device's session.
    pub fn edge_control(&self) -> String {
        format!("{}.edge.control", self.ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_fall_in_their_streams() {
        let n = Names::new("t1");
        assert_eq!(n.stream(StreamKind::Messages), "T1_MESSAGES");
        assert!(n.route().starts_with("t1.msg."));
        assert!(n.events("app_x").starts_with("t1.evt."));
        assert!(n.push().starts_with("t1.push."));
        assert!(n.sms().starts_with("t1.sms."));
        // edge subjects are core NATS and must not be captured by any stream
        for k in StreamKind::ALL {
            let root = n.stream_subjects(k);
            let root = root.trim_end_matches('>');
            assert!(!n.edge_deliver("e1").starts_with(root));
            assert!(!n.edge_deliver_batch("e1").starts_with(root));
            assert!(!n.edge_control().starts_with(root));
        }
    }
}
