//! The store: Pushgate's shared state in Redis.
//!
//! Redis holds the truth about apps, devices and messages; NATS JetStream carries the work.
//! Multi-step changes are single Lua scripts or MULTI blocks (see [`scripts`]), so no reader
//! ever sees half a change and racing writers (receipt vs. expiry) have exactly one winner.
//! Every key layout is in [`keys`].

mod ingress;
pub mod keys;
mod route;
pub mod scripts;
pub mod session;
#[cfg(test)]
mod test_support;

use std::time::Duration;

use pushgate_core::message::MessageState;
use pushgate_core::{App, Device, HistoryEntry, Message, Status};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

pub use ingress::KeyUse;
pub use keys::Keys;
pub use redis;
pub use route::{RouteTarget, TargetRequest, Targeted};
pub use session::CheckRequest;

/// How long a finished message stays readable through the API.
pub const MESSAGE_RETENTION_MS: i64 = 7 * 86_400_000;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to Redis at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("stored record {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("concurrent update of {0}; retry")]
    Conflict(String),
}

impl StoreError {
    /// The same error for another caller: a store call made for several callers at once (a
    /// batch of status changes) fails each of them with it.
    pub fn for_another(&self) -> StoreError {
        match self {
            StoreError::Redis(e) => StoreError::Redis(e.clone()),
            StoreError::Connect { url, source } => StoreError::Connect {
                url: url.clone(),
                source: source.clone(),
            },
            other => StoreError::client(&other.to_string()),
        }
    }

    /// The answers of a batched store call for its `n` callers: each item's own outcome, or
    /// the call's error for every one of them.
    pub fn per_item<T>(
        outcome: Result<Vec<Result<T, StoreError>>, StoreError>,
        n: usize,
    ) -> Vec<Result<T, StoreError>> {
        match outcome {
            Ok(items) => items,
            Err(e) => (0..n).map(|_| Err(e.for_another())).collect(),
        }
    }

    /// A failure on this side of the connection, described by `detail`.
    pub fn client(detail: &str) -> StoreError {
        StoreError::Redis(redis::RedisError::from((
            redis::ErrorKind::Client,
            "store call failed",
            detail.to_string(),
        )))
    }
}

/// The outcome of a status change request.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Applied; the event (a `BusEvent` JSON) is in the outbox and must be published.
    Applied(String),
    /// Not a status change, but recorded (another device confirmed an already delivered message).
    Noted,
    /// Refused: the message is gone or already past that point (its current status, if any).
    Refused(Option<Status>),
}

impl Transition {
    /// What `apply` answered (`{code, current status, event JSON}`, see [`scripts`]).
    fn from_reply(code: i64, current: String, event: String) -> Self {
        match code {
            1 => Transition::Applied(event),
            2 => Transition::Noted,
            _ => Transition::Refused(current.parse().ok()),
        }
    }
}

/// A requested status change.
#[derive(Debug, Clone, Default)]
pub struct Change<'a> {
    pub message_id: &'a str,
    pub to: Option<Status>,
    pub channel: Option<&'a str>,
    pub device_id: Option<&'a str>,
    pub detail: Option<&'a str>,
    /// A router command to queue with the change (e.g. `expired` → SMS fallback check).
    pub command: Option<&'a str>,
}

/// A message with its mutable fields, without history.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub message: Message,
    pub status: Status,
    pub channel: Option<String>,
    /// Devices the router targeted.
    pub targets: Vec<String>,
}

/// Handle to the Redis store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    keys: Keys,
    transition: Script,
    change_many: Script,
    expire_due: Script,
    release_due: Script,
    compare_and_delete: Script,
    compare_and_set: Script,
    collapse_claim: Script,
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, raw: &str) -> Result<T, StoreError> {
    serde_json::from_str(raw).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

impl Store {
    /// Connects; the connection reconnects by itself after a Redis restart.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|source| StoreError::Connect {
            url: url.to_string(),
            source,
        })?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(6)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(|source| StoreError::Connect {
                url: url.to_string(),
                source,
            })?;
        Ok(Store {
            conn,
            keys: Keys::new(namespace),
            transition: Script::new(&scripts::transition()),
            change_many: Script::new(&scripts::change_many()),
            expire_due: Script::new(&scripts::expire_due()),
            release_due: Script::new(&scripts::release_due()),
            compare_and_delete: Script::new(scripts::COMPARE_AND_DELETE),
            compare_and_set: Script::new(scripts::COMPARE_AND_SET),
            collapse_claim: Script::new(scripts::COLLAPSE_CLAIM),
        })
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A connection for operations not covered here (tests, one-off commands).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Round trip to Redis (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    // ---------------------------------------------------------------- apps and keys

    /// Stores a new app and its API key hash.
    pub async fn create_app(&self, app: &App) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .set(self.keys.app(&app.app_id), serde_json::to_string(app)?)
            .sadd(self.keys.apps(), &app.app_id)
            .set(self.keys.api_key(&app.api_key_hash), &app.app_id)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Reads an app.
    pub async fn app(&self, app_id: &str) -> Result<Option<App>, StoreError> {
        let key = self.keys.app(app_id);
        let raw: Option<String> = self.conn.clone().get(&key).await?;
        raw.map(|r| decode(&key, &r)).transpose()
    }

    /// Overwrites an app's settings.
    pub async fn put_app(&self, app: &App) -> Result<(), StoreError> {
        let _: () = self
            .conn
            .clone()
            .set(self.keys.app(&app.app_id), serde_json::to_string(app)?)
            .await?;
        Ok(())
    }

    /// Stores `app` with a new key hash; the old key keeps working for `grace`.
    pub async fn rotate_key(
        &self,
        app: &App,
        old_hash: &str,
        grace: Duration,
    ) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .set(self.keys.app(&app.app_id), serde_json::to_string(app)?)
            .set(self.keys.api_key(&app.api_key_hash), &app.app_id)
            .pexpire(self.keys.api_key(old_hash), grace.as_millis() as i64)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// The app an API key (by SHA-256 hex) belongs to.
    pub async fn app_for_key(&self, key_hash: &str) -> Result<Option<String>, StoreError> {
        Ok(self.conn.clone().get(self.keys.api_key(key_hash)).await?)
    }

    // ---------------------------------------------------------------- devices

    /// Reads a device.
    pub async fn device(&self, app: &str, device: &str) -> Result<Option<Device>, StoreError> {
        let key = self.keys.device(app, device);
        let raw: Option<String> = self.conn.clone().get(&key).await?;
        raw.map(|r| decode(&key, &r)).transpose()
    }

    /// Writes `new` if the stored record is still `previous` (compare-and-set on the JSON), and
    /// keeps the user index and the XMPP login index in step. Returns `Conflict` when another
    /// writer got there first.
    pub async fn put_device(
        &self,
        new: &Device,
        previous: Option<&Device>,
    ) -> Result<(), StoreError> {
        let key = self.keys.device(&new.app_id, &new.device_id);
        let mut c = self.conn.clone();
        let expected: String = self
            .conn
            .clone()
            .get::<_, Option<String>>(&key)
            .await?
            .unwrap_or_default();
        // the caller's view must match what is stored, field for field
        let stored: Option<Device> = if expected.is_empty() {
            None
        } else {
            Some(decode(&key, &expected)?)
        };
        if stored.as_ref() != previous {
            return Err(StoreError::Conflict(key));
        }
        let set: i64 = self
            .compare_and_set
            .key(&key)
            .arg(&expected)
            .arg(serde_json::to_string(new)?)
            .invoke_async(&mut c)
            .await?;
        if set != 1 {
            return Err(StoreError::Conflict(key));
        }
        let mut p = redis::pipe();
        if let Some(prev) = previous {
            if prev.user_id != new.user_id {
                p.srem(
                    self.keys.user_devices(&prev.app_id, &prev.user_id),
                    &prev.device_id,
                );
            }
        }
        p.sadd(
            self.keys.user_devices(&new.app_id, &new.user_id),
            &new.device_id,
        )
        .set(
            self.keys.jid(&new.jid_local),
            format!("{} {}", new.app_id, new.device_id),
        );
        p.query_async::<()>(&mut c).await?;
        Ok(())
    }

    /// Forgets a device, its login, presence and pending queue.
    pub async fn delete_device(&self, d: &Device) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(self.keys.device(&d.app_id, &d.device_id))
            .srem(self.keys.user_devices(&d.app_id, &d.user_id), &d.device_id)
            .del(self.keys.jid(&d.jid_local))
            .del(self.keys.pending(&d.app_id, &d.device_id))
            .del(self.keys.seen(&d.app_id, &d.device_id))
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Drops a device's pending queue (the device moved to another user).
    pub async fn clear_pending(&self, app: &str, device: &str) -> Result<(), StoreError> {
        let _: () = self
            .conn
            .clone()
            .del(self.keys.pending(app, device))
            .await?;
        Ok(())
    }

    /// Message ids of a user (newest first, at most `limit`).
    pub async fn user_message_ids(
        &self,
        app: &str,
        user: &str,
        limit: isize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .conn
            .clone()
            .zrevrange(self.keys.user_messages(app, user), 0, limit - 1)
            .await?)
    }

    /// Deletes a message's records and index entries (user erasure).
    pub async fn erase_message(&self, m: &Message) -> Result<(), StoreError> {
        let mut p = redis::pipe();
        p.atomic()
            .del(self.keys.msg(&m.id))
            .del(self.keys.history(&m.id))
            .zrem(self.keys.expiry(), &m.id)
            .zrem(self.keys.schedule(), &m.id);
        if let Some(u) = &m.user_id {
            p.zrem(self.keys.user_messages(&m.app_id, u), &m.id);
        }
        if let Some(f) = &m.foreign_id {
            p.zrem(self.keys.foreign_messages(&m.app_id, f), &m.id);
        }
        p.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// The devices of a user.
    pub async fn user_devices(&self, app: &str, user: &str) -> Result<Vec<Device>, StoreError> {
        let mut c = self.conn.clone();
        let mut ids: Vec<String> = c.smembers(self.keys.user_devices(app, user)).await?;
        ids.sort();
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let keys: Vec<String> = ids.iter().map(|d| self.keys.device(app, d)).collect();
        let raws: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
        self.decode_user_devices(app, user, &ids, raws)
    }

    /// A user's device records as read for the sorted `ids` (`None` where missing): decoded,
    /// those that moved to another user left out. Any corrupt record fails the whole read.
    pub(crate) fn decode_user_devices(
        &self,
        app: &str,
        user: &str,
        ids: &[String],
        raws: Vec<Option<String>>,
    ) -> Result<Vec<Device>, StoreError> {
        let mut out = Vec::with_capacity(raws.len());
        for (id, raw) in ids.iter().zip(raws) {
            if let Some(r) = raw {
                let d: Device = decode(&self.keys.device(app, id), &r)?;
                if d.user_id == user {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    /// The device behind an XMPP login local part.
    pub async fn device_by_jid(&self, local: &str) -> Result<Option<Device>, StoreError> {
        let v: Option<String> = self.conn.clone().get(self.keys.jid(local)).await?;
        let Some(v) = v else { return Ok(None) };
        let Some((app, dev)) = v.split_once(' ') else {
            return Ok(None);
        };
        self.device(app, dev).await
    }

    /// When each device was last connected (epoch ms), in the order asked.
    pub async fn last_seen(
        &self,
        app: &str,
        devices: &[String],
    ) -> Result<Vec<Option<i64>>, StoreError> {
        if devices.is_empty() {
            return Ok(vec![]);
        }
        let keys: Vec<String> = devices.iter().map(|d| self.keys.seen(app, d)).collect();
        Ok(redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn.clone())
            .await?)
    }

    // ---------------------------------------------------------------- presence

    /// Records that the device is live on `edge`/`session`; returns the session it replaced.
    pub async fn set_presence(
        &self,
        app: &str,
        device: &str,
        value: &str,
        now_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        let mut c = self.conn.clone();
        let (prev, ()): (Option<String>, ()) = redis::pipe()
            .cmd("SET")
            .arg(self.keys.presence(app, device))
            .arg(value)
            .arg("GET")
            .set(self.keys.seen(app, device), now_ms)
            .query_async(&mut c)
            .await?;
        Ok(prev)
    }

    /// Removes the presence record if it still names this session.
    pub async fn clear_presence(
        &self,
        app: &str,
        device: &str,
        value: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: i64 = self
            .compare_and_delete
            .key(self.keys.presence(app, device))
            .arg(value)
            .invoke_async(&mut c)
            .await?;
        let _: () = c.set(self.keys.seen(app, device), now_ms).await?;
        Ok(())
    }

    /// Where the device is live: `(edge, session)` when its edge still holds its lease.
    pub async fn presence(
        &self,
        app: &str,
        device: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let mut c = self.conn.clone();
        let v: Option<String> = c.get(self.keys.presence(app, device)).await?;
        let Some(v) = v else { return Ok(None) };
        let Some((edge, session)) = v.split_once('/') else {
            return Ok(None);
        };
        let alive: bool = c.exists(self.keys.edge(edge)).await?;
        Ok(alive.then(|| (edge.to_string(), session.to_string())))
    }

    /// Renews an edge instance's lease.
    pub async fn renew_edge_lease(&self, edge: &str, ttl: Duration) -> Result<(), StoreError> {
        let _: () = self
            .conn
            .clone()
            .pset_ex(self.keys.edge(edge), "1", ttl.as_millis() as u64)
            .await?;
        Ok(())
    }

    /// Drops an edge instance's lease at clean shutdown.
    pub async fn drop_edge_lease(&self, edge: &str) -> Result<(), StoreError> {
        let _: () = self.conn.clone().del(self.keys.edge(edge)).await?;
        Ok(())
    }

    // ---------------------------------------------------------------- messages

    /// Stores newly accepted messages with their first status (`enqueued` or `scheduled`),
    /// their first event (in the event outbox) and a `route` command (in the command outbox),
    /// all in one MULTI: either the whole request is durable or none of it is.
    pub async fn create_messages(
        &self,
        msgs: &[(Message, Status, String)],
    ) -> Result<(), StoreError> {
        self.create_messages_traced(msgs, None).await
    }

    /// Like [`Store::create_messages`], also keeping the W3C `traceparent` of the accepting
    /// request in each message hash (`trace`), so work that happens later and outside any
    /// request (the stanza write, the device's receipt) can join the message's trace.
    pub async fn create_messages_traced(
        &self,
        msgs: &[(Message, Status, String)],
        traceparent: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut p = redis::pipe();
        p.atomic();
        for (m, status, event_json) in msgs {
            let mk = self.keys.msg(&m.id);
            let hk = self.keys.history(&m.id);
            let body = serde_json::to_string(m)?;
            let entry = serde_json::to_string(&HistoryEntry {
                status: *status,
                at: m.created_at,
                channel: None,
                device_id: None,
                detail: None,
            })?;
            p.hset_multiple(
                &mk,
                &[
                    ("body", body.as_str()),
                    ("status", status.as_str()),
                    ("app", m.app_id.as_str()),
                    ("user", m.user_id.as_deref().unwrap_or("")),
                    ("foreign", m.foreign_id.as_deref().unwrap_or("")),
                    ("seq", "1"),
                ],
            )
            .rpush(&hk, entry)
            .zadd(self.keys.expiry(), &m.id, m.expires_at)
            .zadd(self.keys.outbox_evt(), event_json, m.created_at);
            if let Some(tp) = traceparent {
                p.hset(&mk, "trace", tp).ignore();
            }
            let keep_until = m.expires_at + MESSAGE_RETENTION_MS;
            p.cmd("PEXPIREAT").arg(&mk).arg(keep_until).ignore();
            p.cmd("PEXPIREAT").arg(&hk).arg(keep_until).ignore();
            match status {
                Status::Scheduled => {
                    p.zadd(
                        self.keys.schedule(),
                        &m.id,
                        m.send_at.unwrap_or(m.created_at),
                    );
                }
                _ => {
                    p.zadd(
                        self.keys.outbox_cmd(),
                        format!("{}|route", m.id),
                        m.created_at,
                    );
                }
            }
            // index score: creation time × 1000 plus the recipient's position, unique within a
            // request, so cursors never skip messages accepted in the same millisecond (exact in
            // an f64 until the year 2255)
            let index_score = m.order_key();
            if let Some(u) = &m.user_id {
                p.zadd(self.keys.user_messages(&m.app_id, u), &m.id, index_score);
            }
            if let Some(f) = &m.foreign_id {
                p.zadd(self.keys.foreign_messages(&m.app_id, f), &m.id, index_score);
            }
        }
        p.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// The W3C `traceparent` the message was accepted under, if one was stored.
    pub async fn message_trace(&self, id: &str) -> Result<Option<String>, StoreError> {
        let tp: Option<String> = self.conn.clone().hget(self.keys.msg(id), "trace").await?;
        Ok(tp.filter(|t| !t.is_empty()))
    }

    /// Reads a message without its history.
    pub async fn message(&self, id: &str) -> Result<Option<StoredMessage>, StoreError> {
        let key = self.keys.msg(id);
        let (body, status, channel, targets): (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = redis::cmd("HMGET")
            .arg(&key)
            .arg(&["body", "status", "channel", "targets"])
            .query_async(&mut self.conn.clone())
            .await?;
        let (Some(body), Some(status)) = (body, status) else {
            return Ok(None);
        };
        let message: Message = decode(&key, &body)?;
        let status = status.parse::<Status>().map_err(|e| StoreError::Corrupt {
            key: key.clone(),
            source: serde::de::Error::custom(e),
        })?;
        Ok(Some(StoredMessage {
            message,
            status,
            channel,
            targets: targets
                .map(|t| {
                    t.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        }))
    }

    /// Reads a message with its history.
    pub async fn message_state(&self, id: &str) -> Result<Option<MessageState>, StoreError> {
        let Some(m) = self.message(id).await? else {
            return Ok(None);
        };
        let hk = self.keys.history(id);
        let raw: Vec<String> = self.conn.clone().lrange(&hk, 0, -1).await?;
        let history = raw
            .iter()
            .map(|r| decode(&hk, r))
            .collect::<Result<Vec<HistoryEntry>, _>>()?;
        Ok(Some(MessageState {
            message: m.message,
            status: m.status,
            channel: m.channel,
            history,
        }))
    }

    /// Records which devices the router sent the message to (expiry and cancel clean their
    /// pending queues) and queues it on each device, in one step.
    pub async fn target_devices(&self, m: &Message, devices: &[String]) -> Result<(), StoreError> {
        let mut p = redis::pipe();
        p.atomic()
            .hset(self.keys.msg(&m.id), "targets", devices.join(","));
        for d in devices {
            p.zadd(self.keys.pending(&m.app_id, d), &m.id, m.order_key());
        }
        p.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// The oldest `limit` pending message ids of a device.
    pub async fn pending(
        &self,
        app: &str,
        device: &str,
        limit: isize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .conn
            .clone()
            .zrange(self.keys.pending(app, device), 0, limit - 1)
            .await?)
    }

    /// A page of a device's pending queue: up to `limit` ids with scores in
    /// `(after, until]` (acceptance times), oldest first.
    pub async fn pending_page(
        &self,
        app: &str,
        device: &str,
        after: Option<f64>,
        until: Option<f64>,
        limit: usize,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        let min = after
            .map(|a| format!("({a}"))
            .unwrap_or_else(|| "-inf".into());
        let max = until
            .map(|u| u.to_string())
            .unwrap_or_else(|| "+inf".into());
        Ok(redis::cmd("ZRANGE")
            .arg(self.keys.pending(app, device))
            .arg(min)
            .arg(max)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES")
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// The acceptance time under which a message waits for a device, if it still does.
    pub async fn pending_score(
        &self,
        app: &str,
        device: &str,
        id: &str,
    ) -> Result<Option<f64>, StoreError> {
        Ok(self
            .conn
            .clone()
            .zscore(self.keys.pending(app, device), id)
            .await?)
    }

    /// Whether a message is still pending for a device.
    pub async fn is_pending(&self, app: &str, device: &str, id: &str) -> Result<bool, StoreError> {
        let s: Option<f64> = self
            .conn
            .clone()
            .zscore(self.keys.pending(app, device), id)
            .await?;
        Ok(s.is_some())
    }

    /// Applies a status change atomically (see [`scripts`]).
    pub async fn change(&self, ch: &Change<'_>, now_ms: i64) -> Result<Transition, StoreError> {
        let Some(to) = ch.to else {
            return Ok(Transition::Refused(None));
        };
        let (code, cur, ev): (i64, String, String) = self
            .transition
            .key(self.keys.msg(ch.message_id))
            .key(self.keys.history(ch.message_id))
            .key(self.keys.outbox_evt())
            .key(self.keys.expiry())
            .key(self.keys.outbox_cmd())
            .arg(self.keys.pending_root())
            .arg(ch.message_id)
            .arg(to.as_str())
            .arg(now_ms)
            .arg(pushgate_core::time::rfc3339(now_ms))
            .arg(ch.channel.unwrap_or(""))
            .arg(ch.device_id.unwrap_or(""))
            .arg(ch.detail.unwrap_or(""))
            .arg(ch.command.unwrap_or(""))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(Transition::from_reply(code, cur, ev))
    }

    /// Applies several status changes at `now_ms` in one script call, in order: entry `i` is
    /// what [`Store::change`]`(&changes[i], now_ms)` answers, error included (a change whose
    /// keys hold the wrong type fails alone). The outer error is one every change would have
    /// met (Redis unreachable); changes before it may have been applied, as with a single
    /// call whose answer was lost, and are refused when repeated. An empty list costs nothing.
    pub async fn change_many(
        &self,
        changes: &[Change<'_>],
        now_ms: i64,
    ) -> Result<Vec<Result<Transition, StoreError>>, StoreError> {
        let asked: Vec<(usize, Status)> = changes
            .iter()
            .enumerate()
            .filter_map(|(i, ch)| ch.to.map(|to| (i, to)))
            .collect();
        let mut out: Vec<Result<Transition, StoreError>> = changes
            .iter()
            .map(|_| Ok(Transition::Refused(None)))
            .collect();
        if asked.is_empty() {
            return Ok(out);
        }
        let mut inv = self.change_many.prepare_invoke();
        inv.key(self.keys.outbox_evt())
            .key(self.keys.expiry())
            .key(self.keys.outbox_cmd())
            .arg(self.keys.pending_root())
            .arg(now_ms)
            .arg(pushgate_core::time::rfc3339(now_ms));
        for &(i, to) in &asked {
            let ch = &changes[i];
            inv.key(self.keys.msg(ch.message_id))
                .key(self.keys.history(ch.message_id))
                .arg(ch.message_id)
                .arg(to.as_str())
                .arg(ch.channel.unwrap_or(""))
                .arg(ch.device_id.unwrap_or(""))
                .arg(ch.detail.unwrap_or(""))
                .arg(ch.command.unwrap_or(""));
        }
        let replies: Vec<(i64, String, String)> = inv.invoke_async(&mut self.conn.clone()).await?;
        if replies.len() != asked.len() {
            return Err(ingress::unexpected("change_many"));
        }
        for ((i, _), (code, cur, ev)) in asked.into_iter().zip(replies) {
            out[i] = match code {
                -1 => Err(ingress::server_error(cur.as_bytes())),
                _ => Ok(Transition::from_reply(code, cur, ev)),
            };
        }
        Ok(out)
    }

    /// Expires up to `limit` due messages; returns their events (already in the outbox).
    pub async fn expire_due(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.run_due(&self.expire_due, self.keys.expiry(), now_ms, limit)
            .await
    }

    /// Releases up to `limit` due scheduled messages; returns their events.
    pub async fn release_due(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.run_due(&self.release_due, self.keys.schedule(), now_ms, limit)
            .await
    }

    async fn run_due(
        &self,
        script: &Script,
        zset: String,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut inv = script.prepare_invoke();
        inv.key(&zset)
            .key(self.keys.outbox_evt())
            .key(self.keys.outbox_cmd());
        if zset == self.keys.schedule() {
            inv.key(self.keys.expiry());
        }
        inv.arg(now_ms)
            .arg(pushgate_core::time::rfc3339(now_ms))
            .arg(limit)
            .arg(self.keys.msg_prefix())
            .arg(self.keys.history_prefix())
            .arg(self.keys.pending_root());
        Ok(inv.invoke_async(&mut self.conn.clone()).await?)
    }

    /// Message ids of a user or with a foreign id, newest first, after the cursor (a message id).
    pub async fn list_messages(
        &self,
        index_key: &str,
        before_score: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let max = before_score
            .map(|s| format!("({s}"))
            .unwrap_or_else(|| "+inf".into());
        let v: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(index_key)
            .arg(&max)
            .arg("-inf")
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(v.into_iter().map(|(id, s)| (id, s as i64)).collect())
    }

    // ---------------------------------------------------------------- outboxes

    /// Events and commands older than `older_than_ms` (their publisher may have died).
    pub async fn stale_outbox(
        &self,
        evt: bool,
        older_than_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let key = if evt {
            self.keys.outbox_evt()
        } else {
            self.keys.outbox_cmd()
        };
        Ok(self
            .conn
            .clone()
            .zrangebyscore_limit(key, "-inf", older_than_ms, 0, limit as isize)
            .await?)
    }

    /// Removes published entries from an outbox.
    pub async fn outbox_done(&self, evt: bool, members: &[String]) -> Result<(), StoreError> {
        if members.is_empty() {
            return Ok(());
        }
        let key = if evt {
            self.keys.outbox_evt()
        } else {
            self.keys.outbox_cmd()
        };
        let _: () = self.conn.clone().zrem(key, members).await?;
        Ok(())
    }

    /// Pushes an outbox entry's time forward so the sweeper does not retry it at once.
    pub async fn outbox_touch(
        &self,
        evt: bool,
        member: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let key = if evt {
            self.keys.outbox_evt()
        } else {
            self.keys.outbox_cmd()
        };
        let _: () = redis::cmd("ZADD")
            .arg(key)
            .arg("XX")
            .arg(now_ms)
            .arg(member)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    // ---------------------------------------------------------------- collapse and retraction

    /// Makes `m` the newest message of its collapse key; returns the message that must be
    /// replaced (an older one, or `m` itself if a newer one is already there).
    pub async fn collapse_claim(
        &self,
        m: &Message,
        user: &str,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        let ttl = (m.expires_at - pushgate_core::time::now_ms()).max(1000);
        let victim: String = self
            .collapse_claim
            .key(self.keys.collapse(&m.app_id, user, key))
            .arg(&m.id)
            .arg(ttl)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((!victim.is_empty()).then_some(victim))
    }

    /// Whether a native push was attempted for the message on the device.
    pub async fn push_attempted(&self, message: &str, device: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .clone()
            .exists(self.keys.push_record(message, device))
            .await?)
    }

    /// Queues a retraction for the device's next session (kept 7 days).
    pub async fn add_retraction(
        &self,
        app: &str,
        device: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let key = self.keys.retractions(app, device);
        redis::pipe()
            .zadd(&key, message, now_ms)
            .pexpire(&key, MESSAGE_RETENTION_MS)
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// The device's queued retractions, oldest first.
    pub async fn retractions(
        &self,
        app: &str,
        device: &str,
        limit: isize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .conn
            .clone()
            .zrange(self.keys.retractions(app, device), 0, limit - 1)
            .await?)
    }

    /// Drops a retraction once written to the device.
    pub async fn retraction_done(
        &self,
        app: &str,
        device: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let _: () = self
            .conn
            .clone()
            .zrem(self.keys.retractions(app, device), message)
            .await?;
        Ok(())
    }

    // ---------------------------------------------------------------- login lockout

    /// Failed logins recorded for an IP (`kind` "ip") or an account ("acct") in the window.
    pub async fn auth_failures(&self, kind: &str, id: &str) -> Result<u64, StoreError> {
        let n: Option<u64> = self
            .conn
            .clone()
            .get(self.keys.auth_failures(kind, id))
            .await?;
        Ok(n.unwrap_or(0))
    }

    /// Records a failed login; the count expires `window` after the first failure.
    pub async fn note_auth_failure(
        &self,
        kind: &str,
        id: &str,
        window: Duration,
    ) -> Result<u64, StoreError> {
        let key = self.keys.auth_failures(kind, id);
        let (n, _): (u64, bool) = redis::pipe()
            .incr(&key, 1)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(window.as_millis() as u64)
            .arg("NX")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(n)
    }

    // ---------------------------------------------------------------- stream resumption

    /// Keeps a session's XEP-0198 state for `ttl` so the device can resume it on any edge.
    pub async fn put_resume_state(
        &self,
        id: &str,
        json: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let _: () = self
            .conn
            .clone()
            .pset_ex(self.keys.sm_resume(id), json, ttl.as_millis() as u64)
            .await?;
        Ok(())
    }

    /// Takes (reads and deletes) a session's resumption state: a state resumes at most once.
    pub async fn take_resume_state(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(redis::cmd("GETDEL")
            .arg(self.keys.sm_resume(id))
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// Forgets a session's resumption state (clean close, or replaced by a new login).
    pub async fn drop_resume_state(&self, id: &str) -> Result<(), StoreError> {
        let _: () = self.conn.clone().del(self.keys.sm_resume(id)).await?;
        Ok(())
    }

    // ---------------------------------------------------------------- dead letters

    /// Keeps a webhook batch that was not accepted in time.
    pub async fn put_dead_letter(&self, dl: &pushgate_core::DeadLetter) -> Result<(), StoreError> {
        let json = serde_json::to_string(dl)?;
        redis::pipe()
            .atomic()
            .hset(self.keys.dead_letter_bodies(&dl.app_id), &dl.batch_id, json)
            .zadd(
                self.keys.dead_letters(&dl.app_id),
                &dl.batch_id,
                dl.failed_at,
            )
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// An app's dead letters, oldest first, at most `limit`.
    pub async fn dead_letters(
        &self,
        app: &str,
        limit: usize,
    ) -> Result<Vec<pushgate_core::DeadLetter>, StoreError> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = c
            .zrange(self.keys.dead_letters(app), 0, limit as isize - 1)
            .await?;
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let key = self.keys.dead_letter_bodies(app);
        let raws: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&key)
            .arg(&ids)
            .query_async(&mut c)
            .await?;
        raws.into_iter()
            .flatten()
            .map(|r| decode(&key, &r))
            .collect()
    }

    /// Removes and returns one dead letter (for replay); `None` if it is not there (any more).
    pub async fn take_dead_letter(
        &self,
        app: &str,
        batch_id: &str,
    ) -> Result<Option<pushgate_core::DeadLetter>, StoreError> {
        let key = self.keys.dead_letter_bodies(app);
        let (raw, _, _): (Option<String>, i64, i64) = redis::pipe()
            .atomic()
            .hget(&key, batch_id)
            .hdel(&key, batch_id)
            .zrem(self.keys.dead_letters(app), batch_id)
            .query_async(&mut self.conn.clone())
            .await?;
        raw.map(|r| decode(&key, &r)).transpose()
    }

    // ---------------------------------------------------------------- misc

    /// Takes or renews a named lease held by `holder`; true when held.
    pub async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let key = self.keys.lock(name);
        let mut c = self.conn.clone();
        let got: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut c)
            .await?;
        if got.is_some() {
            return Ok(true);
        }
        let cur: Option<String> = c.get(&key).await?;
        if cur.as_deref() == Some(holder) {
            let _: () = c.pexpire(&key, ttl.as_millis() as i64).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Counts one request of an app in the current second; returns the count.
    pub async fn count_request(&self, app: &str, second: i64, n: u64) -> Result<u64, StoreError> {
        let key = self.keys.rate(app, second);
        let (count, ()): (u64, ()) = redis::pipe()
            .incr(&key, n)
            .expire(&key, 2)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(count)
    }

    /// Reads an idempotency record.
    pub async fn idempotency(
        &self,
        app: &str,
        key_hash: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .clone()
            .get(self.keys.idempotency(app, key_hash))
            .await?)
    }

    /// Claims an idempotency key (24 h); false if it exists already.
    pub async fn claim_idempotency(
        &self,
        app: &str,
        key_hash: &str,
        record: &str,
    ) -> Result<bool, StoreError> {
        let r: Option<String> = redis::cmd("SET")
            .arg(self.keys.idempotency(app, key_hash))
            .arg(record)
            .arg("NX")
            .arg("EX")
            .arg(86_400)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(r.is_some())
    }

    /// Replaces an idempotency record (claim → final answer), keeping its TTL.
    pub async fn finish_idempotency(
        &self,
        app: &str,
        key_hash: &str,
        record: &str,
    ) -> Result<(), StoreError> {
        let _: () = redis::cmd("SET")
            .arg(self.keys.idempotency(app, key_hash))
            .arg(record)
            .arg("KEEPTTL")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Drops an idempotency claim after a failed request, so a retry can proceed.
    pub async fn release_idempotency(&self, app: &str, key_hash: &str) -> Result<(), StoreError> {
        let _: () = self
            .conn
            .clone()
            .del(self.keys.idempotency(app, key_hash))
            .await?;
        Ok(())
    }

    /// Deletes every key of this namespace (test cleanup and `pushgate purge`; never called by
    /// services).
    pub async fn delete_namespace(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.keys.all_pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            if !keys.is_empty() {
                let _: () = c.del(keys).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(())
    }
}
