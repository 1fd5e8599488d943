//! Reads a live XMPP session makes per handed-over message, shaped to cost one round trip.
//!
//! The edge receives each message in the router's hand-over, with its body. What it still has
//! to ask Redis before writing the stanza is whether the message still waits for the device
//! (it may have been confirmed, expired or cancelled meanwhile), its status, and whether older
//! messages wait that the session has not written yet (acceptance order). One script
//! (`scripts::pending_check_send`) answers all three at once and, when the message is simply
//! the next one to write, records `sent` in the same step.

use std::sync::LazyLock;

use pushgate_core::Status;
use redis::Script;

use crate::{scripts, Store, StoreError};

/// The script, hashed once per process (the `Store` struct holds the scripts every service
/// uses; this one only the edge needs).
static PENDING_CHECK_SEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(&scripts::pending_check_send()));

/// The open statuses as the send script matches them (`,a,b,`).
static OPEN: LazyLock<String> = LazyLock::new(|| {
    let mut s = String::from(",");
    for st in Status::ALL.iter().filter(|s| s.is_open()) {
        s.push_str(st.as_str());
        s.push(',');
    }
    s
});

/// A message that still waits for a device, as [`Store::pending_check_send`] found it.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingCheck {
    /// Its score in the pending queue (`Message::order_key`).
    pub score: f64,
    /// Its status; `None` when the message record is gone (erased) while still queued.
    pub status: Option<Status>,
    /// The other ids waiting in the asked range up to its score (ties included), oldest
    /// first. Holding the asked limit or more means there may be more than listed.
    pub older: Vec<String>,
    /// Set when the check found the message to be the session's next one and recorded `sent`: the caller writes the stanza and publishes the event, if any.
    pub sent: Option<Sent>,
}

/// `sent` recorded by [`Store::pending_check_send`].
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    /// Applied now; the event JSON (already in the event outbox) to publish.
    Applied(String),
    /// The message was already `sent` (written to an earlier session): nothing to report.
    Already,
}

impl Store {
    /// Takes ids out of a device's pending queue that no longer wait for anything (settled,
    /// or confirmed on another device of the user): a closed status never opens again.
    pub async fn pending_forget(
        &self,
        app: &str,
        device: &str,
        ids: &[String],
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: () =
            redis::AsyncCommands::zrem(&mut self.conn.clone(), self.keys.pending(app, device), ids)
                .await?;
        Ok(())
    }

    /// Whether message `id` still waits for the device, with its status and the other ids
    /// queued after the mark `after` (`None`: from the start) up to its score, read atomically
    /// in one round trip; `None`: not pending (any more). About `limit` other ids are listed
    /// at most; `limit` or more means there may be more.
    ///
    /// When the message is the session's next one to write (it waits above the mark, nothing
    /// else waits between the mark and it, its status is open and `expires_at` is after
    /// `now_ms`), the same step records `sent` and [`PendingCheck::sent`] says so: the caller
    /// writes the stanza. Otherwise nothing was written and the caller decides.
    #[allow(clippy::too_many_arguments)]
    pub async fn pending_check_send(
        &self,
        app: &str,
        device: &str,
        id: &str,
        after: Option<f64>,
        limit: usize,
        expires_at: i64,
        now_ms: i64,
    ) -> Result<Option<PendingCheck>, StoreError> {
        let pending = self.keys.pending(app, device);
        let after = match after {
            None => "-inf".to_string(),
            Some(a) => a.to_string(),
        };
        let raw: Vec<String> = PENDING_CHECK_SEND
            .key(&pending)
            .key(self.keys.msg(id))
            .key(self.keys.history(id))
            .key(self.keys.outbox_evt())
            .key(self.keys.expiry())
            .key(self.keys.outbox_cmd())
            .arg(id)
            .arg(after)
            .arg(limit)
            .arg(self.keys.pending_root())
            .arg(now_ms)
            .arg(pushgate_core::time::rfc3339(now_ms))
            .arg("xmpp")
            .arg(device)
            .arg(expires_at)
            .arg(OPEN.as_str())
            .invoke_async(&mut self.conn.clone())
            .await?;
        parse_check(&self.keys.msg(id), &pending, raw)
    }
}

/// Reads the check script's answer: `{}`, or score, status, sent flag, event, older ids.
fn parse_check(
    msg_key: &str,
    pending: &str,
    raw: Vec<String>,
) -> Result<Option<PendingCheck>, StoreError> {
    let mut it = raw.into_iter();
    let (Some(score), Some(status)) = (it.next(), it.next()) else {
        return Ok(None);
    };
    let sent = match (it.next().as_deref(), it.next()) {
        (Some("1"), Some(ev)) => Some(Sent::Applied(ev)),
        (Some("0"), _) => Some(Sent::Already),
        _ => None,
    };
    let corrupt = |key: String, what: String| StoreError::Corrupt {
        key,
        source: serde::de::Error::custom(what),
    };
    let score = score
        .parse::<f64>()
        .map_err(|e| corrupt(pending.to_string(), format!("score {score:?}: {e}")))?;
    let status = if status.is_empty() {
        None
    } else {
        Some(
            status
                .parse::<Status>()
                .map_err(|e| corrupt(msg_key.to_string(), e.to_string()))?,
        )
    };
    Ok(Some(PendingCheck {
        score,
        status,
        older: it.collect(),
        sent,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushgate_core::Message;

    use crate::test_support::APP;

    fn message(created_at: i64, pos: u32) -> Message {
        crate::test_support::message("u", created_at, pos)
    }

    async fn store() -> Result<Store, StoreError> {
        crate::test_support::store("s").await
    }

    async fn accept(s: &Store, msgs: &[Message], device: &str) -> Result<(), StoreError> {
        let recs: Vec<(Message, Status, String)> = msgs
            .iter()
            .map(|m| (m.clone(), Status::Enqueued, format!("{}|ev", m.id)))
            .collect();
        s.create_messages(&recs).await?;
        for m in msgs {
            s.target_devices(m, &[device.to_string()]).await?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn one_round_trip_tells_score_status_and_what_waits_before(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let s = store().await?;
        // real acceptance times: 16-digit scores, the size that Lua would round
        let t = pushgate_core::time::now_ms();
        let ms: Vec<Message> = (0..4).map(|i| message(t + i, 3)).collect();
        accept(&s, &ms, "d").await?;
        let key = |m: &Message| m.order_key() as f64;
        let later = t + 3_600_000;
        let check = |m: &Message, after: Option<f64>, limit: usize, expires: i64| {
            let (s, id) = (s.clone(), m.id.clone());
            async move {
                s.pending_check_send(APP, "d", &id, after, limit, expires, t)
                    .await
            }
        };

        let c = check(&ms[3], None, 10, later).await?.ok_or("pending")?;
        assert_eq!(c.score, key(&ms[3]));
        assert_eq!(c.status, Some(Status::Enqueued));
        assert_eq!(c.older, [ms[0].id.as_str(), &ms[1].id, &ms[2].id]);
        assert_eq!(c.sent, None, "older messages wait: the caller decides");

        // strictly above the mark, up to the message itself
        let c = check(&ms[3], Some(key(&ms[1])), 10, later)
            .await?
            .ok_or("pending")?;
        assert_eq!(c.older, [ms[2].id.as_str()]);
        assert_eq!(c.sent, None);
        // at or below the mark (a late-routed message): nothing older is listed, nothing sent
        let c = check(&ms[1], Some(key(&ms[2])), 10, later)
            .await?
            .ok_or("pending")?;
        assert_eq!(c.score, key(&ms[1]));
        assert!(c.older.is_empty());
        assert_eq!(c.sent, None);
        // the limit (the message itself does not take a place)
        let c = check(&ms[3], None, 2, later).await?.ok_or("pending")?;
        assert_eq!(c.older, [ms[0].id.as_str(), &ms[1].id, &ms[2].id]);
        let c = check(&ms[2], None, 1, later).await?.ok_or("pending")?;
        assert_eq!(c.older, [ms[0].id.as_str(), &ms[1].id]);

        // a tie (another request accepted in the same millisecond) is listed both ways
        let mut tie = message(t + 3, 3);
        tie.id = uuid::Uuid::now_v7().to_string();
        accept(&s, std::slice::from_ref(&tie), "d").await?;
        for (me, other) in [(&ms[3], &tie), (&tie, &ms[3])] {
            let c = check(me, Some(key(&ms[2])), 10, later)
                .await?
                .ok_or("pending")?;
            assert_eq!(c.score, key(&tie));
            assert_eq!(c.older, [other.id.as_str()]);
            assert_eq!(c.sent, None);
        }

        // the next message to write: `sent` is recorded in the same step, once; not when the
        // message has expired by the clock
        let c = check(&ms[0], None, 10, t).await?.ok_or("pending")?;
        assert_eq!((c.status, c.sent), (Some(Status::Enqueued), None));
        let c = check(&ms[0], None, 10, later).await?.ok_or("pending")?;
        assert_eq!(c.status, Some(Status::Enqueued));
        let Some(Sent::Applied(ev)) = c.sent else {
            return Err(format!("sent not applied: {:?}", c.sent).into());
        };
        let ev: pushgate_core::BusEvent = serde_json::from_str(&ev)?;
        assert_eq!(
            ev.event.event,
            pushgate_core::EventKind::Status(Status::Sent)
        );
        assert_eq!(ev.event.device_id.as_deref(), Some("d"));
        assert_eq!(ev.event.channel.as_deref(), Some("xmpp"));
        let c = check(&ms[0], None, 10, later).await?.ok_or("pending")?;
        assert_eq!(
            (c.status, c.sent),
            (Some(Status::Sent), Some(Sent::Already))
        );

        // a confirmed message no longer waits; another device never had it
        let ch = crate::Change {
            message_id: &ms[0].id,
            to: Some(Status::Delivered),
            device_id: Some("d"),
            ..Default::default()
        };
        s.change(&ch, t).await?;
        assert_eq!(check(&ms[0], None, 10, later).await?, None);
        assert_eq!(
            s.pending_check_send(APP, "other", &ms[1].id, None, 10, later, t)
                .await?,
            None
        );
        // a message erased while still queued has no status, and nothing is sent
        s.erase_message(&ms[1]).await?;
        let c = check(&ms[1], Some(key(&ms[2])), 10, later)
            .await?
            .ok_or("pending")?;
        assert_eq!((c.status, c.sent), (None, None));
        s.delete_namespace().await?;
        Ok(())
    }
}
