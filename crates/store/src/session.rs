//! Reads a live XMPP session makes per handed-over message, shaped to cost one round trip.
//!
//! The edge receives each message in the router's hand-over, with its body. What it still has
//! to ask Redis before writing the stanza is whether the message still waits for the device
//! (it may have been confirmed, expired or cancelled meanwhile), its status, and whether older
//! messages wait that the session has not written yet (acceptance order). One read-only
//! script ([`scripts::PENDING_CHECK`]) answers all three at once.

use std::sync::LazyLock;

use pushgate_core::Status;
use redis::Script;

use crate::{scripts, Store, StoreError};

/// The script, hashed once per process (the `Store` struct holds the scripts every service
/// uses; this one only the edge needs).
static PENDING_CHECK: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::PENDING_CHECK));

/// Which older pending ids [`Store::pending_check`] lists besides the message's own state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Older {
    /// None: the caller only needs the message's own state.
    Skip,
    /// Those with scores in `(after, score of the message)`; `None` means from the start.
    After(Option<f64>),
}

/// A message that still waits for a device, as [`Store::pending_check`] found it.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingCheck {
    /// Its score in the pending queue (`Message::order_key`).
    pub score: f64,
    /// Its status; `None` when the message record is gone (erased) while still queued.
    pub status: Option<Status>,
    /// The other ids waiting in the asked range up to its score (ties included), oldest
    /// first. Holding the asked limit or more means there may be more than listed.
    pub older: Vec<String>,
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

    /// Whether message `id` still waits for the device, with its status and (per `older`) the
    /// other ids queued up to its score, read atomically in one round trip. `None`: not
    /// pending (any more). About `limit` other ids are listed at most; `limit` or more means
    /// there may be more.
    pub async fn pending_check(
        &self,
        app: &str,
        device: &str,
        id: &str,
        older: Older,
        limit: usize,
    ) -> Result<Option<PendingCheck>, StoreError> {
        let pending = self.keys.pending(app, device);
        let after = match older {
            Older::Skip => String::new(),
            Older::After(None) => "-inf".to_string(),
            // f64's Display is the shortest exact decimal and never an exponent, which Redis
            // parses back to the same score
            Older::After(Some(a)) => a.to_string(),
        };
        let raw: Vec<String> = PENDING_CHECK
            .key(&pending)
            .key(self.keys.msg(id))
            .arg(id)
            .arg(after)
            .arg(limit)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let mut it = raw.into_iter();
        let (Some(score), Some(status)) = (it.next(), it.next()) else {
            return Ok(None);
        };
        let corrupt = |key: String, what: String| StoreError::Corrupt {
            key,
            source: serde::de::Error::custom(what),
        };
        let score = score
            .parse::<f64>()
            .map_err(|e| corrupt(pending.clone(), format!("score {score:?}: {e}")))?;
        let status = if status.is_empty() {
            None
        } else {
            Some(
                status
                    .parse::<Status>()
                    .map_err(|e| corrupt(self.keys.msg(id), e.to_string()))?,
            )
        };
        Ok(Some(PendingCheck {
            score,
            status,
            older: it.collect(),
        }))
    }
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

        let c = s
            .pending_check(APP, "d", &ms[3].id, Older::After(None), 10)
            .await?
            .ok_or("pending")?;
        assert_eq!(c.score, key(&ms[3]));
        assert_eq!(c.status, Some(Status::Enqueued));
        assert_eq!(c.older, [ms[0].id.as_str(), &ms[1].id, &ms[2].id]);

        // strictly above the mark, up to the message itself
        let c = s
            .pending_check(APP, "d", &ms[3].id, Older::After(Some(key(&ms[1]))), 10)
            .await?
            .ok_or("pending")?;
        assert_eq!(c.older, [ms[2].id.as_str()]);
        let c = s
            .pending_check(APP, "d", &ms[3].id, Older::After(Some(key(&ms[2]))), 10)
            .await?
            .ok_or("pending")?;
        assert!(c.older.is_empty());
        // at or below the mark (a late-routed message): nothing older is listed
        let c = s
            .pending_check(APP, "d", &ms[1].id, Older::After(Some(key(&ms[2]))), 10)
            .await?
            .ok_or("pending")?;
        assert_eq!(c.score, key(&ms[1]));
        assert!(c.older.is_empty());
        // the limit (the message itself does not take a place), and skipping the list
        let c = s
            .pending_check(APP, "d", &ms[3].id, Older::After(None), 2)
            .await?
            .ok_or("pending")?;
        assert_eq!(c.older, [ms[0].id.as_str(), &ms[1].id, &ms[2].id]);
        let c = s
            .pending_check(APP, "d", &ms[2].id, Older::After(None), 1)
            .await?
            .ok_or("pending")?;
        assert_eq!(c.older, [ms[0].id.as_str(), &ms[1].id]);
        let c = s
            .pending_check(APP, "d", &ms[3].id, Older::Skip, 10)
            .await?
            .ok_or("pending")?;
        assert!(c.older.is_empty());

        // a tie (another request accepted in the same millisecond) is listed both ways
        let mut tie = message(t + 3, 3);
        tie.id = uuid::Uuid::now_v7().to_string();
        accept(&s, std::slice::from_ref(&tie), "d").await?;
        for (me, other) in [(&ms[3], &tie), (&tie, &ms[3])] {
            let c = s
                .pending_check(APP, "d", &me.id, Older::After(Some(key(&ms[2]))), 10)
                .await?
                .ok_or("pending")?;
            assert_eq!(c.score, key(&tie));
            assert_eq!(c.older, [other.id.as_str()]);
        }

        // a confirmed message no longer waits; another device never had it
        let ch = crate::Change {
            message_id: &ms[0].id,
            to: Some(Status::Delivered),
            device_id: Some("d"),
            ..Default::default()
        };
        s.change(&ch, t).await?;
        assert_eq!(
            s.pending_check(APP, "d", &ms[0].id, Older::Skip, 10)
                .await?,
            None
        );
        assert_eq!(
            s.pending_check(APP, "other", &ms[1].id, Older::Skip, 10)
                .await?,
            None
        );
        // a message erased while still queued has no status
        s.erase_message(&ms[1]).await?;
        let c = s
            .pending_check(APP, "d", &ms[1].id, Older::Skip, 10)
            .await?
            .ok_or("pending")?;
        assert_eq!(c.status, None);
        s.delete_namespace().await?;
        Ok(())
    }
}
