//! Reads a live XMPP session makes per handed-over message, shaped to cost one round trip.
//!
//! The edge receives each message in the router's hand-over, with its body. What it still has
//! to ask Redis before writing the stanza is whether the message still waits for the device
//! (it may have been confirmed, expired or cancelled meanwhile), its status, and whether older
//! messages wait that the session has not written yet (acceptance order). One script
//! (`scripts::pending_check_send_many`, for one session or several) answers all three at
//! once and, when the message is simply the next one to write, records `sent` in the same
//! step.

use std::sync::LazyLock;

use pushgate_core::Status;
use redis::{Script, Value};

use crate::ingress::{server_error, unexpected};
use crate::{scripts, Store, StoreError};

/// The script, hashed once per process (the `Store` struct holds the scripts every service
/// uses; this one only the edge needs).
static PENDING_CHECK_SEND_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(&scripts::pending_check_send_many()));

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

/// One session's check for [`Store::pending_check_send_many`]: the arguments of
/// [`Store::pending_check_send`].
#[derive(Debug, Clone, PartialEq)]
pub struct CheckRequest {
    pub app: String,
    pub device: String,
    pub id: String,
    pub after: Option<f64>,
    pub limit: usize,
    pub expires_at: i64,
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
        // one check is a batch of one: a single script serves both
        let check = CheckRequest {
            app: app.to_string(),
            device: device.to_string(),
            id: id.to_string(),
            after,
            limit,
            expires_at,
        };
        self.pending_check_send_many(std::slice::from_ref(&check), now_ms)
            .await?
            .pop()
            .unwrap_or_else(|| Err(unexpected("pending_check_send")))
    }

    /// Several sessions' [`Store::pending_check_send`] at `now_ms` in one round trip: entry
    /// `i` is what that call answers for `checks[i]`, its error included. The outer error is
    /// one every check met (Redis unreachable). An empty list costs nothing.
    pub async fn pending_check_send_many(
        &self,
        checks: &[CheckRequest],
        now_ms: i64,
    ) -> Result<Vec<Result<Option<PendingCheck>, StoreError>>, StoreError> {
        if checks.is_empty() {
            return Ok(vec![]);
        }
        let mut inv = PENDING_CHECK_SEND_MANY.prepare_invoke();
        inv.key(self.keys.outbox_evt())
            .key(self.keys.expiry())
            .key(self.keys.outbox_cmd())
            .arg(self.keys.pending_root())
            .arg(now_ms)
            .arg(pushgate_core::time::rfc3339(now_ms))
            .arg("xmpp")
            .arg(OPEN.as_str());
        for c in checks {
            inv.key(self.keys.pending(&c.app, &c.device))
                .key(self.keys.msg(&c.id))
                .key(self.keys.history(&c.id))
                .arg(&c.id)
                .arg(match c.after {
                    None => "-inf".to_string(),
                    Some(a) => a.to_string(),
                })
                .arg(c.limit)
                .arg(&c.device)
                .arg(c.expires_at);
        }
        let replies: Vec<(String, Value)> = inv.invoke_async(&mut self.conn.clone()).await?;
        if replies.len() != checks.len() {
            return Err(unexpected("pending_check_send_many"));
        }
        Ok(checks
            .iter()
            .zip(replies)
            .map(|(c, (code, reply))| match (code.as_str(), reply) {
                ("1", reply) => {
                    let raw: Vec<String> =
                        redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
                    parse_check(
                        &self.keys.msg(&c.id),
                        &self.keys.pending(&c.app, &c.device),
                        raw,
                    )
                }
                ("-1", Value::BulkString(text)) => Err(server_error(&text)),
                _ => Err(unexpected("pending_check_send_many entry")),
            })
            .collect())
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

    /// Score, status, older ids' positions, what happened to `sent`.
    type Shape = (f64, Option<Status>, Vec<usize>, String);

    /// What a check says, with ids replaced by their position in `ids`, an applied `sent`'s
    /// event by its kind and an error by its text without the script's name (which a failing
    /// `redis.call` adds to the one-check script's error): twins on two devices compare equal.
    fn shape(
        r: &Result<Option<PendingCheck>, StoreError>,
        ids: &[&str],
    ) -> Result<Option<Shape>, String> {
        match r {
            Err(e) => Err(e
                .to_string()
                .split(" script:")
                .next()
                .unwrap_or_default()
                .to_string()),
            Ok(None) => Ok(None),
            Ok(Some(c)) => Ok(Some((
                c.score,
                c.status,
                c.older
                    .iter()
                    .map(|o| ids.iter().position(|i| i == o).unwrap_or(usize::MAX))
                    .collect(),
                match &c.sent {
                    None => "none".into(),
                    Some(Sent::Already) => "already".into(),
                    Some(Sent::Applied(ev)) => serde_json::from_str::<pushgate_core::BusEvent>(ev)
                        .map(|e| format!("applied {:?}", e.event.event))
                        .unwrap_or_else(|e| e.to_string()),
                },
            ))),
        }
    }

    #[tokio::test]
    async fn many_checks_answer_as_one_check_each() -> Result<(), Box<dyn std::error::Error>> {
        let s = store().await?;
        let t = pushgate_core::time::now_ms();
        let later = t + 3_600_000;
        // twins: the same acceptance times, one set queued for "d", one for "e"
        let on_d: Vec<Message> = (0..3).map(|i| message(t + i, 1)).collect();
        let on_e: Vec<Message> = (0..3).map(|i| message(t + i, 1)).collect();
        accept(&s, &on_d, "d").await?;
        accept(&s, &on_e, "e").await?;
        let _: () =
            redis::AsyncCommands::set(&mut s.conn(), s.keys().pending(APP, "w"), "x").await?;
        let key = |m: &Message| m.order_key() as f64;
        // (message index or none, device, mark): older ones wait; the next one; a wrong-type
        // queue; above a mark; an unknown id; the first again (already sent)
        let plan: [(Option<usize>, Option<&str>, Option<usize>); 6] = [
            (Some(2), None, None),
            (Some(0), None, None),
            (Some(1), Some("w"), None),
            (Some(1), None, Some(0)),
            (None, None, None),
            (Some(0), None, None),
        ];
        let asked = |msgs: &[Message], dev: &str| -> Vec<CheckRequest> {
            plan.iter()
                .map(|(i, other, mark)| CheckRequest {
                    app: APP.into(),
                    device: other.unwrap_or(dev).into(),
                    id: i.map_or_else(|| "nope".to_string(), |i| msgs[i].id.clone()),
                    after: mark.map(|m| key(&msgs[m])),
                    limit: 10,
                    expires_at: later,
                })
                .collect()
        };
        let mut one_each = Vec::new();
        for c in asked(&on_d, "d") {
            one_each.push(
                s.pending_check_send(&c.app, &c.device, &c.id, c.after, c.limit, c.expires_at, t)
                    .await,
            );
        }
        let many = s.pending_check_send_many(&asked(&on_e, "e"), t).await?;
        let d_ids: Vec<&str> = on_d.iter().map(|m| m.id.as_str()).collect();
        let e_ids: Vec<&str> = on_e.iter().map(|m| m.id.as_str()).collect();
        let one_each: Vec<_> = one_each.iter().map(|r| shape(r, &d_ids)).collect();
        let many: Vec<_> = many.iter().map(|r| shape(r, &e_ids)).collect();
        assert_eq!(many, one_each);
        // and what that is
        assert_eq!(
            many[0]
                .as_ref()
                .ok()
                .and_then(|c| c.as_ref())
                .map(|c| c.2.clone()),
            Some(vec![0, 1])
        );
        assert!(many[1]
            .as_ref()
            .is_ok_and(|c| c.as_ref().is_some_and(|c| c.3.starts_with("applied"))));
        assert!(
            many[2].as_ref().is_err_and(|e| e.contains("WRONGTYPE")),
            "{:?}",
            many[2]
        );
        assert!(many[3]
            .as_ref()
            .is_ok_and(|c| c.as_ref().is_some_and(|c| c.3.starts_with("applied"))));
        assert_eq!(many[4], Ok(None));
        assert!(many[5]
            .as_ref()
            .is_ok_and(|c| c.as_ref().is_some_and(|c| c.3 == "already")));
        assert!(s.pending_check_send_many(&[], t).await?.is_empty());
        s.delete_namespace().await?;
        Ok(())
    }
}
