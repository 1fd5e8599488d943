//! The message status machine.
//!
//! Statuses only move forward. The table below is the single definition of what "forward"
//! means; the store turns it into a Lua table so the check and the write happen in one atomic
//! Redis step. Two promises follow from it and are unit-tested here:
//! `delivered` and `expired` can never both happen to one message, and every terminal status
//! has no way out except the SMS follow-ups of an expiry.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a message stands. Serialised in `snake_case` exactly as the public API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted with `send_at` in the future; enters routing at that time.
    Scheduled,
    /// Accepted and durable; waiting for a channel.
    Enqueued,
    /// Handed to a channel (written to the device's XMPP session, or accepted by APNs/FCM/HMS/Web Push).
    Sent,
    /// The device confirmed reception (XEP-0184, XEP-0198 ack or HTTP device event).
    Delivered,
    /// The user displayed the message (XEP-0333 or HTTP device event).
    Read,
    /// The time to live ran out before any device confirmed reception.
    Expired,
    /// It can never be delivered (for example the only channel rejected it permanently).
    Failed,
    /// Cancelled by the backend, or replaced by a newer message with the same collapse key.
    Cancelled,
    /// An SMS was accepted by the SMS provider (phone-only recipient or fallback after expiry).
    SmsSent,
    /// The SMS provider reported the SMS delivered.
    SmsDelivered,
    /// The SMS could not be sent or the provider reported it failed.
    SmsFailed,
}

impl Status {
    /// Every status, in the order the API documents them.
    pub const ALL: [Status; 11] = [
        Status::Scheduled,
        Status::Enqueued,
        Status::Sent,
        Status::Delivered,
        Status::Read,
        Status::Expired,
        Status::Failed,
        Status::Cancelled,
        Status::SmsSent,
        Status::SmsDelivered,
        Status::SmsFailed,
    ];

    /// The wire name (`"sms_sent"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Enqueued => "enqueued",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Read => "read",
            Status::Expired => "expired",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::SmsSent => "sms_sent",
            Status::SmsDelivered => "sms_delivered",
            Status::SmsFailed => "sms_failed",
        }
    }

    /// The statuses this one may move to. This is the whole status machine.
    pub fn next(self) -> &'static [Status] {
        use Status::*;
        match self {
            Scheduled => &[Enqueued, Expired, Failed, Cancelled],
            Enqueued => &[
                Sent, Delivered, Read, Expired, Failed, Cancelled, SmsSent, SmsFailed,
            ],
            Sent => &[Delivered, Read, Expired, Failed, Cancelled],
            Delivered => &[Read],
            Read => &[],
            // An expiry may be followed by the SMS fallback, and only by it.
            Expired => &[SmsSent, SmsFailed],
            Failed => &[],
            Cancelled => &[],
            SmsSent => &[SmsDelivered, SmsFailed],
            SmsDelivered => &[],
            SmsFailed => &[],
        }
    }

    /// Whether `self → to` is a legal move.
    pub fn can_move_to(self, to: Status) -> bool {
        self.next().contains(&to)
    }

    /// No further status can follow, except the SMS fallback after `expired`.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Read
                | Status::Expired
                | Status::Failed
                | Status::Cancelled
                | Status::SmsSent
                | Status::SmsDelivered
                | Status::SmsFailed
        )
    }

    /// The message reached a device (or its user): it must never expire or be cancelled now.
    pub fn is_delivered(self) -> bool {
        matches!(self, Status::Delivered | Status::Read)
    }

    /// Still waiting for a channel to confirm: expiry and cancellation apply.
    pub fn is_open(self) -> bool {
        matches!(self, Status::Scheduled | Status::Enqueued | Status::Sent)
    }

    /// The transition table as `(from, [to…])` pairs of wire names, for code generators
    /// (the store's Lua scripts).
    pub fn transition_table() -> Vec<(&'static str, Vec<&'static str>)> {
        Status::ALL
            .iter()
            .map(|s| (s.as_str(), s.next().iter().map(|n| n.as_str()).collect()))
            .collect()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The given text is not a status name.
#[derive(Debug, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .iter()
            .copied()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All statuses reachable from `from` (excluding `from` itself unless via a cycle).
    fn reachable(from: Status) -> Vec<Status> {
        let mut seen = vec![];
        let mut todo = vec![from];
        while let Some(s) = todo.pop() {
            for n in s.next() {
                if !seen.contains(n) {
                    seen.push(*n);
                    todo.push(*n);
                }
            }
        }
        seen
    }

    #[test]
    fn delivered_and_expired_exclude_each_other() {
        assert!(!reachable(Status::Delivered).contains(&Status::Expired));
        assert!(!reachable(Status::Read).contains(&Status::Expired));
        assert!(!reachable(Status::Expired).contains(&Status::Delivered));
        assert!(!reachable(Status::Expired).contains(&Status::Read));
    }

    #[test]
    fn machine_has_no_cycles() {
        for s in Status::ALL {
            assert!(!reachable(s).contains(&s), "{s} can come back to itself");
        }
    }

    #[test]
    fn terminal_statuses_only_lead_to_sms_follow_ups() {
        for s in Status::ALL.into_iter().filter(|s| s.is_terminal()) {
            for n in s.next() {
                assert!(
                    matches!(
                        n,
                        Status::SmsSent | Status::SmsDelivered | Status::SmsFailed
                    ),
                    "{s} -> {n}"
                );
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().ok(), Some(s));
            assert_eq!(
                serde_json::to_string(&s).ok(),
                Some(format!("\"{}\"", s.as_str()))
            );
        }
        assert!("delivered ".parse::<Status>().is_err());
    }

    #[test]
    fn cancelled_only_while_open() {
        for s in Status::ALL {
            assert_eq!(s.can_move_to(Status::Cancelled), s.is_open(), "{s}");
        }
    }
}
