//! Routing a message to a user's devices in one Redis round trip.
//!
//! The router's common case (a user recipient, no collapse key) used to cost five or more
//! round trips before the first hand-over: the user's device set, the device records, the
//! targets/pending write, and two reads per device for its presence. Each one sits on the
//! delivery latency of every message, so [`Store::target_user_devices`] does the same reads and
//! writes in one Lua script. It is a faster spelling of
//! [`Store::user_devices`] → device filter → [`Store::target_devices`] → [`Store::presence`]
//! per device, and must keep answering exactly what that sequence answers; the tests below
//! hold the two side by side.

use std::sync::LazyLock;

use pushgate_core::{Device, Message};
use redis::{Script, Value};

use crate::ingress::{server_error, unexpected};
use crate::scripts::{ERR_TEXT, MGET_PREFIXED};
use crate::{decode, Store, StoreError};

/// A device the router targets for a message, with where it is live.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteTarget {
    pub device: Device,
    /// `(edge, session)` when the device has a presence record and that edge still holds its
    /// lease: what [`Store::presence`] answers, read after the targets were written.
    pub presence: Option<(String, String)>,
}

/// Reads a user's devices, targets them and reads their presence, atomically: the Lua
/// function `target`, shared by the one-message script and the batched one.
///
/// `target(setkey, mkey, devp, pendp, presp, edgep, user, id, score, one, only)`: the user's
/// device set, the message hash; the device key, pending queue and presence prefixes (all three
/// end in `{app}:`), the edge lease prefix, the user id, the message id, its pending score, `1`
/// when the message names one device (else `0`), that device id.
///
/// The device, pending, presence and lease keys depend on the set's members, so they cannot
/// be declared up front; like the other scripts, this one builds them from prefixes (Redis
/// Cluster is not supported).
///
/// Returns `{1, rows}` with one row per stored device record, ordered by device id byte by
/// byte as `user_devices` orders them: `{member id, record JSON, targeted, live, edge,
/// session}` (flags are `'1'`/`'0'`). Every record is returned, not only targeted ones, so the
/// caller decodes all of them as `user_devices` does and a corrupt record fails the call as it
/// always did. Returns `{0, {}}` without writing anything when a record is not JSON with
/// string `user_id` and `device_id`: the script cannot tell whether to target it, and the
/// caller takes the step-by-step path, which reports the corruption exactly as before.
const TARGET_LUA: &str = r#"
-- Lua compares strings with strcoll, and Redis sets LC_COLLATE from its environment: compare
-- bytes, as Rust's String ordering does, so the order (and the targets field) never depends
-- on the server's locale.
local function byte_less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

local function target(setkey, mkey, devp, pendp, presp, edgep, user, id, score, one, only)
  local ids = redis.call('SMEMBERS', setkey)
  if #ids == 0 then return {1, {}} end
  table.sort(ids, byte_less)

  local raws = mget_prefixed(devp, ids)

  local rows = {}
  local targets = {}
  for i = 1, #ids do
    local raw = raws[i]
    if raw then
      local ok, d = pcall(cjson.decode, raw)
      if not ok or type(d) ~= 'table' or type(d.user_id) ~= 'string' or type(d.device_id) ~= 'string' then
        return {0, {}}
      end
      local row = {ids[i], raw, '0', '0', '', ''}
      if d.user_id == user and (one ~= '1' or d.device_id == only) then
        row[3] = '1'
        table.insert(targets, {d.device_id, row})
      end
      table.insert(rows, row)
    end
  end
  if #targets == 0 then return {1, rows} end

  local names = {}
  for i, t in ipairs(targets) do names[i] = t[1] end
  redis.call('HSET', mkey, 'targets', table.concat(names, ','))
  for _, t in ipairs(targets) do
    redis.call('ZADD', pendp .. t[1], score, id)
  end

  for _, t in ipairs(targets) do
    local p = redis.call('GET', presp .. t[1])
    if p then
      local slash = string.find(p, '/', 1, true)
      if slash then
        local edge = string.sub(p, 1, slash - 1)
        if redis.call('EXISTS', edgep .. edge) == 1 then
          t[2][4] = '1'
          t[2][5] = edge
          t[2][6] = string.sub(p, slash + 1)
        end
      end
    end
  end
  return {1, rows}
end
"#;

/// One message: [`TARGET_LUA`]'s `target` on the script's keys and arguments.
///
/// KEYS: the user's device set, the message hash.
/// ARGV: device key prefix, pending queue prefix, presence prefix, edge lease prefix, user
/// id, message id, pending score, one-device flag, that device id.
const TARGET_USER_DEVICES_LUA: &str = r#"
return target(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
"#;

/// Several messages at once (a router's batch of route commands): one request and one script
/// run instead of one each. Each message is first checked to be still open (`enqueued` or
/// `sent`), in the same step as its targeting: the router no longer reads the message before
/// routing it when its route command carries it, and a message cancelled, expired or erased
/// meanwhile must get no targets (an erased message must not get its hash back).
///
/// KEYS: two per message: the user's device set, the message hash.
/// ARGV: device key root, pending queue root, presence root (each `{ns}:{family}:`, to which
/// the script appends `{app}:`), edge lease prefix, then six per message: app id, user id,
/// message id, pending score, one-device flag, that device id.
/// Returns one entry per message: `{2, {}}` when it is gone or not open (nothing written),
/// what `target` returns, or `{-1, error text}` when a command of that message failed (a key
/// of the wrong type): that message alone fails, as it would have in its own call.
const TARGET_MANY_LUA: &str = r#"
local function target_open(setkey, mkey, devp, pendp, presp, edgep, user, id, score, one, only)
  local st = redis.call('HGET', mkey, 'status')
  if st ~= 'enqueued' and st ~= 'sent' then return {2, {}} end
  return target(setkey, mkey, devp, pendp, presp, edgep, user, id, score, one, only)
end
local out = {}
local n = (#ARGV - 4) / 6
for i = 0, n - 1 do
  local a = 4 + i * 6
  local app = ARGV[a + 1] .. ':'
  local ok, r = pcall(target_open, KEYS[1 + i * 2], KEYS[2 + i * 2], ARGV[1] .. app, ARGV[2] .. app, ARGV[3] .. app, ARGV[4], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6])
  if ok then out[i + 1] = r else out[i + 1] = {-1, err_text(r)} end
end
return out
"#;

/// Loaded once per process; `invoke_async` sends EVALSHA and loads the script on NOSCRIPT,
/// like the store's other scripts. A static rather than a `Store` field keeps this module
/// self-contained.
static TARGET_USER_DEVICES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{MGET_PREFIXED}{TARGET_LUA}{TARGET_USER_DEVICES_LUA}"
    ))
});
/// As [`TARGET_USER_DEVICES`].
static TARGET_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{MGET_PREFIXED}{ERR_TEXT}{TARGET_LUA}{TARGET_MANY_LUA}"
    ))
});

/// One row of the script's answer: member id, record JSON, targeted, live, edge, session.
type Row = (String, String, String, String, String, String);

/// What [`Store::target_many`] found for one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Targeted {
    /// The message is gone, or no longer `enqueued` or `sent`: nothing was written, and
    /// there is nothing to route.
    Closed,
    /// Targeted: what [`Store::target_user_devices`] answers.
    Devices(Vec<RouteTarget>),
    /// A device record the script cannot judge: nothing was written. The caller takes the
    /// step-by-step path ([`Store::target_user_devices`]), which reports it.
    Unjudged,
}

/// One message for [`Store::target_many`]: what targeting needs of it, without its content
/// (a batch is queued across tasks, and a message's text and data need not travel with it).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetRequest {
    pub app_id: String,
    pub message_id: String,
    /// The user the message goes to.
    pub user_id: String,
    /// Its score in the pending queues ([`Message::order_key`]).
    pub score: i64,
    /// The one device the message names, if it names one.
    pub device_id: Option<String>,
}

impl TargetRequest {
    /// The request for `m`, sent to `user`.
    pub fn new(m: &Message, user: &str) -> Self {
        TargetRequest {
            app_id: m.app_id.clone(),
            message_id: m.id.clone(),
            user_id: user.to_string(),
            score: m.order_key(),
            device_id: m.device_id.clone(),
        }
    }
}

impl Store {
    /// Targets the message at its user's devices (all of them, or the one it names) and
    /// returns them with their presence, in one round trip.
    ///
    /// Same result and the same writes as [`Store::user_devices`], keeping the named device,
    /// [`Store::target_devices`] when any device is left, then [`Store::presence`] per device:
    /// devices in id order, records that are missing or belong to another user skipped, the
    /// `targets` field and pending queue entries as `target_devices` writes them (so repeating
    /// it changes nothing). One difference remains: a record that is JSON but not a valid
    /// device still fails the call with `Corrupt`, but only after the other devices were
    /// targeted (checking every field would mean a device schema in Lua). Those entries are
    /// what routing writes anyway once the record is fixed, and `targets` lists them, so
    /// expiry and cancellation remove them.
    pub async fn target_user_devices(
        &self,
        m: &Message,
        user: &str,
    ) -> Result<Vec<RouteTarget>, StoreError> {
        match self.target_user_devices_in_one_step(m, user).await? {
            Some(targets) => Ok(targets),
            None => self.target_user_devices_step_by_step(m, user).await,
        }
    }

    /// The script; `None` when it found a record it cannot judge and wrote nothing.
    async fn target_user_devices_in_one_step(
        &self,
        m: &Message,
        user: &str,
    ) -> Result<Option<Vec<RouteTarget>>, StoreError> {
        let app = m.app_id.as_str();
        let (code, rows): (i64, Vec<Row>) = TARGET_USER_DEVICES
            .key(self.keys.user_devices(app, user))
            .key(self.keys.msg(&m.id))
            // a key family's prefix is its key for the empty id: built by the same `Keys`
            // function as the full keys, the script's keys cannot drift from the store's
            .arg(self.keys.device(app, ""))
            .arg(self.keys.pending(app, ""))
            .arg(self.keys.presence(app, ""))
            .arg(self.keys.edge(""))
            .arg(user)
            .arg(&m.id)
            .arg(m.order_key())
            .arg(if m.device_id.is_some() { "1" } else { "0" })
            .arg(m.device_id.as_deref().unwrap_or(""))
            .invoke_async(&mut self.conn.clone())
            .await?;
        if code != 1 {
            return Ok(None);
        }
        self.targets_from(app, rows).map(Some)
    }

    /// The targeted devices of the script's rows, every record decoded as `user_devices`
    /// decodes them (it fails on any corrupt one, targeted or not).
    fn targets_from(&self, app: &str, rows: Vec<Row>) -> Result<Vec<RouteTarget>, StoreError> {
        let mut out = Vec::new();
        for (id, raw, targeted, live, edge, session) in rows {
            let device: Device = decode(&self.keys.device(app, &id), &raw)?;
            if targeted == "1" {
                out.push(RouteTarget {
                    device,
                    presence: (live == "1").then_some((edge, session)),
                });
            }
        }
        Ok(out)
    }

    /// Targets several messages in one round trip, each only if it is still open
    /// (`enqueued` or `sent`): entry `i` is [`Targeted::Closed`], or what
    /// [`Store::target_user_devices`]`(messages[i])` would have answered, its error included
    /// ([`Targeted::Unjudged`] where that call would have taken its step-by-step path). The
    /// outer error is one every message met (Redis unreachable). An empty list costs nothing.
    pub async fn target_many(
        &self,
        messages: &[TargetRequest],
    ) -> Result<Vec<Result<Targeted, StoreError>>, StoreError> {
        if messages.is_empty() {
            return Ok(vec![]);
        }
        let mut inv = TARGET_MANY.prepare_invoke();
        inv.arg(self.keys.device_root())
            .arg(self.keys.pending_root())
            .arg(self.keys.presence_root())
            // a key family's prefix is its key for the empty id, built by the same function
            .arg(self.keys.edge(""));
        for r in messages {
            inv.key(self.keys.user_devices(&r.app_id, &r.user_id))
                .key(self.keys.msg(&r.message_id))
                .arg(&r.app_id)
                .arg(&r.user_id)
                .arg(&r.message_id)
                .arg(r.score)
                .arg(if r.device_id.is_some() { "1" } else { "0" })
                .arg(r.device_id.as_deref().unwrap_or(""));
        }
        let replies: Vec<(i64, Value)> = inv.invoke_async(&mut self.conn.clone()).await?;
        if replies.len() != messages.len() {
            return Err(unexpected("target_many"));
        }
        Ok(messages
            .iter()
            .zip(replies)
            .map(|(r, (code, reply))| match code {
                2 => Ok(Targeted::Closed),
                0 => Ok(Targeted::Unjudged),
                1 => {
                    let rows: Vec<Row> =
                        redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
                    self.targets_from(&r.app_id, rows).map(Targeted::Devices)
                }
                -1 => match reply {
                    Value::BulkString(text) => Err(server_error(&text)),
                    _ => Err(unexpected("target_many error")),
                },
                _ => Err(unexpected("target_many code")),
            })
            .collect())
    }

    /// The original sequence, for records the script cannot judge (see
    /// [`TARGET_USER_DEVICES_LUA`]): it reports corrupt records as it always did.
    async fn target_user_devices_step_by_step(
        &self,
        m: &Message,
        user: &str,
    ) -> Result<Vec<RouteTarget>, StoreError> {
        let mut devices = self.user_devices(&m.app_id, user).await?;
        if let Some(only) = &m.device_id {
            devices.retain(|d| &d.device_id == only);
        }
        if devices.is_empty() {
            return Ok(vec![]);
        }
        let ids: Vec<String> = devices.iter().map(|d| d.device_id.clone()).collect();
        self.target_devices(m, &ids).await?;
        let mut out = Vec::with_capacity(devices.len());
        for device in devices {
            let presence = self.presence(&m.app_id, &device.device_id).await?;
            out.push(RouteTarget { device, presence });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redis::AsyncCommands;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    use crate::test_support::{device, APP};

    async fn store() -> Result<Store, StoreError> {
        crate::test_support::store("rt").await
    }

    fn message(user: &str, only: Option<&str>, pos: u32) -> Message {
        Message {
            device_id: only.map(str::to_string),
            ..crate::test_support::message(user, 1_700_000_000_000, pos)
        }
    }

    /// What the store holds about a routed message: its `targets` field and, per device of
    /// interest, its score in that device's pending queue.
    async fn written(
        s: &Store,
        m: &Message,
        devices: &[&str],
    ) -> Result<(Option<String>, Vec<Option<f64>>), StoreError> {
        let mut c = s.conn();
        let targets: Option<String> = c.hget(s.keys().msg(&m.id), "targets").await?;
        let mut scores = Vec::new();
        for d in devices {
            scores.push(s.pending_score(APP, d, &m.id).await?);
        }
        Ok((targets, scores))
    }

    /// The script alone; failing when it handed over to the step-by-step path, which would
    /// give the same answers and so hide a script that never takes the fast path.
    async fn one_step(s: &Store, m: &Message, user: &str) -> Result<Vec<RouteTarget>, String> {
        match s.target_user_devices_in_one_step(m, user).await {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err("the script declined to judge the records".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The sequence the script replaces, as the router ran it.
    async fn old_path(s: &Store, m: &Message, user: &str) -> Result<Vec<RouteTarget>, StoreError> {
        s.target_user_devices_step_by_step(m, user).await
    }

    #[tokio::test]
    async fn matches_the_step_by_step_sequence() -> TestResult {
        let s = store().await?;
        // ids whose byte order differs from a case-insensitive (locale) order
        let ids = ["b:2", "B.1", "a@3", "live"];
        for id in ids {
            s.put_device(&device(id, "u"), None).await?;
        }
        // a device that moved to another user but is still in u's set, and a member whose
        // record is gone: both skipped
        s.put_device(&device("moved", "other"), None).await?;
        let mut c = s.conn();
        let _: () = c.sadd(s.keys().user_devices(APP, "u"), "moved").await?;
        let _: () = c.sadd(s.keys().user_devices(APP, "u"), "ghost").await?;
        // live: presence on an edge with a lease; "b:2": presence on an edge whose lease
        // expired; "B.1": presence without a slash; "a@3": no presence at all
        s.set_presence(APP, "live", "edge-1/sess/with/slashes", 5)
            .await?;
        s.renew_edge_lease("edge-1", Duration::from_secs(30))
            .await?;
        s.set_presence(APP, "b:2", "edge-2/sess-2", 5).await?;
        s.renew_edge_lease("edge-2", Duration::from_millis(20))
            .await?;
        let _: () = c.set(s.keys().presence(APP, "B.1"), "garbled").await?;
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!c.exists::<_, bool>(s.keys().edge("edge-2")).await?);

        let all = ["B.1", "a@3", "b:2", "live", "moved", "ghost"];
        let new_m = message("u", None, 1);
        let old_m = message("u", None, 2);
        let new = one_step(&s, &new_m, "u").await?;
        let old = old_path(&s, &old_m, "u").await?;
        assert_eq!(new, old);
        let got: Vec<(&str, Option<(&str, &str)>)> = new
            .iter()
            .map(|t| {
                (
                    t.device.device_id.as_str(),
                    t.presence.as_ref().map(|(e, s)| (e.as_str(), s.as_str())),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("B.1", None),
                ("a@3", None),
                ("b:2", None),
                ("live", Some(("edge-1", "sess/with/slashes"))),
            ]
        );
        let (new_targets, new_scores) = written(&s, &new_m, &all).await?;
        let (old_targets, old_scores) = written(&s, &old_m, &all).await?;
        assert_eq!(new_targets.as_deref(), Some("B.1,a@3,b:2,live"));
        assert_eq!(old_targets, new_targets);
        let score = new_m.order_key() as f64;
        assert_eq!(
            new_scores,
            vec![
                Some(score),
                Some(score),
                Some(score),
                Some(score),
                None,
                None
            ]
        );
        assert_eq!(
            old_scores.iter().map(Option::is_some).collect::<Vec<_>>(),
            new_scores.iter().map(Option::is_some).collect::<Vec<_>>()
        );

        // repeating it (a redelivered command) changes nothing
        let again = one_step(&s, &new_m, "u").await?;
        assert_eq!(again, new);
        assert_eq!(written(&s, &new_m, &all).await?, (new_targets, new_scores));
        for id in ["B.1", "a@3", "b:2", "live"] {
            assert_eq!(s.pending(APP, id, 100).await?.len(), 2, "{id}");
        }
        s.delete_namespace().await?;
        Ok(())
    }

    #[tokio::test]
    async fn device_filter_targets_only_the_named_device() -> TestResult {
        let s = store().await?;
        for id in ["d1", "d2", "d3"] {
            s.put_device(&device(id, "u"), None).await?;
        }
        s.put_device(&device("x", "other"), None).await?;
        s.set_presence(APP, "d2", "e/s", 5).await?;
        s.renew_edge_lease("e", Duration::from_secs(30)).await?;

        let m = message("u", Some("d2"), 0);
        let got = one_step(&s, &m, "u").await?;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].device, device("d2", "u"));
        assert_eq!(got[0].presence, Some(("e".into(), "s".into())));
        let (targets, scores) = written(&s, &m, &["d1", "d2", "d3"]).await?;
        assert_eq!(targets.as_deref(), Some("d2"));
        assert_eq!(scores, vec![None, Some(m.order_key() as f64), None]);

        // a device of another user, or none at all: nothing targeted, nothing written
        for only in ["x", "nope"] {
            let m = message("u", Some(only), 0);
            assert!(one_step(&s, &m, "u").await?.is_empty());
            assert_eq!(
                written(&s, &m, &["d1", "x"]).await?,
                (None, vec![None, None])
            );
        }
        // a user without devices
        let m = message("nobody", None, 0);
        assert!(one_step(&s, &m, "nobody").await?.is_empty());
        assert_eq!(written(&s, &m, &[]).await?.0, None);
        s.delete_namespace().await?;
        Ok(())
    }

    #[tokio::test]
    async fn corrupt_records_fail_as_before() -> TestResult {
        let s = store().await?;
        s.put_device(&device("ok", "u"), None).await?;
        let mut c = s.conn();
        // not JSON: the script writes nothing and the step-by-step path reports it
        let _: () = c.sadd(s.keys().user_devices(APP, "u"), "bad").await?;
        let _: () = c.set(s.keys().device(APP, "bad"), "{not json").await?;
        let m = message("u", None, 0);
        assert_eq!(s.target_user_devices_in_one_step(&m, "u").await?, None);
        let err = s.target_user_devices(&m, "u").await;
        assert!(
            matches!(&err, Err(StoreError::Corrupt { key, .. }) if key == &s.keys().device(APP, "bad")),
            "{err:?}"
        );
        assert_eq!(written(&s, &m, &["ok"]).await?, (None, vec![None]));

        // JSON but not a device, of another user: still an error, as in `user_devices`
        let _: () = c
            .set(
                s.keys().device(APP, "bad"),
                r#"{"user_id":"other","device_id":"bad"}"#,
            )
            .await?;
        let err = s.target_user_devices(&m, "u").await;
        assert!(matches!(err, Err(StoreError::Corrupt { .. })), "{err:?}");
        assert!(s.user_devices(APP, "u").await.is_err());
        // the one documented difference: here the error comes after "ok" was targeted
        assert_eq!(
            written(&s, &m, &["ok"]).await?,
            (Some("ok".into()), vec![Some(m.order_key() as f64)])
        );
        s.delete_namespace().await?;
        Ok(())
    }

    /// Marks a message's hash as holding `status`, as acceptance and later changes leave it.
    async fn with_status(s: &Store, m: &Message, status: &str) -> Result<(), StoreError> {
        let _: () = s.conn().hset(s.keys().msg(&m.id), "status", status).await?;
        Ok(())
    }

    #[tokio::test]
    async fn target_many_answers_each_message_as_target_user_devices() -> TestResult {
        let s = store().await?;
        const OTHER: &str = "app_fedcba9876543210fedcba9876";
        for id in ["d1", "d2"] {
            s.put_device(&device(id, "u"), None).await?;
        }
        s.put_device(&device("v1", "v"), None).await?;
        let elsewhere = Device {
            app_id: OTHER.into(),
            ..device("o1", "u")
        };
        s.put_device(&elsewhere, None).await?;
        s.set_presence(APP, "d2", "e/s", 5).await?;
        s.renew_edge_lease("e", Duration::from_secs(30)).await?;
        let mut c = s.conn();

        // a pair of each case: one through `target_many`, its twin through the single call
        let open = [message("u", None, 0), message("u", None, 1)];
        let sent = [message("u", Some("d2"), 2), message("u", Some("d2"), 3)];
        let nobody = [message("nobody", None, 4), message("nobody", None, 5)];
        let other_app = [
            Message {
                app_id: OTHER.into(),
                ..message("u", None, 6)
            },
            Message {
                app_id: OTHER.into(),
                ..message("u", None, 7)
            },
        ];
        for m in open.iter().chain(&nobody).chain(&other_app) {
            with_status(&s, m, "enqueued").await?;
        }
        for m in &sent {
            with_status(&s, m, "sent").await?;
        }
        // closed: cancelled, and erased (no hash at all)
        let cancelled = message("u", None, 8);
        with_status(&s, &cancelled, "cancelled").await?;
        let erased = message("u", None, 9);
        // a wrong-type device set fails its message alone
        let broken = message("w", None, 10);
        with_status(&s, &broken, "enqueued").await?;
        let _: () = c.set(s.keys().user_devices(APP, "w"), "x").await?;
        // a record the script cannot judge
        let unjudged = message("v", None, 11);
        with_status(&s, &unjudged, "enqueued").await?;
        let _: () = c.sadd(s.keys().user_devices(APP, "v"), "bad").await?;
        let _: () = c.set(s.keys().device(APP, "bad"), "{not json").await?;

        let asked: Vec<TargetRequest> = [
            (&open[0], "u"),
            (&cancelled, "u"),
            (&sent[0], "u"),
            (&broken, "w"),
            (&nobody[0], "nobody"),
            (&erased, "u"),
            (&other_app[0], "u"),
            (&unjudged, "v"),
        ]
        .into_iter()
        .map(|(m, user)| TargetRequest::new(m, user))
        .collect();
        let got = s.target_many(&asked).await?;
        assert_eq!(got.len(), asked.len());
        for (i, twins) in [(0, &open), (2, &sent), (4, &nobody), (6, &other_app)] {
            let Ok(Targeted::Devices(many)) = &got[i] else {
                panic!("entry {i}: {:?}", got[i]);
            };
            let user = twins[1].user_id.as_deref().unwrap_or_default();
            let single = s.target_user_devices(&twins[1], user).await?;
            assert_eq!(many, &single, "entry {i}");
            let devices = ["d1", "d2", "o1"];
            let (t_many, scores_many) = written(&s, &twins[0], &devices).await?;
            let (t_single, scores_single) = written(&s, &twins[1], &devices).await?;
            assert_eq!(t_many, t_single, "entry {i}");
            assert_eq!(
                scores_many.iter().map(Option::is_some).collect::<Vec<_>>(),
                scores_single
                    .iter()
                    .map(Option::is_some)
                    .collect::<Vec<_>>(),
                "entry {i}"
            );
        }
        let Ok(Targeted::Devices(o)) = &got[0] else {
            unreachable!()
        };
        assert_eq!(
            o.iter()
                .map(|t| (t.device.device_id.as_str(), t.presence.is_some()))
                .collect::<Vec<_>>(),
            vec![("d1", false), ("d2", true)]
        );
        let Ok(Targeted::Devices(o)) = &got[6] else {
            unreachable!()
        };
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].device.app_id, OTHER);
        assert_eq!(got[1].as_ref().ok(), Some(&Targeted::Closed));
        assert_eq!(got[5].as_ref().ok(), Some(&Targeted::Closed));
        assert_eq!(got[7].as_ref().ok(), Some(&Targeted::Unjudged));
        let err = got[3].as_ref().err().map(ToString::to_string);
        assert!(
            err.as_deref().is_some_and(|e| e.contains("WRONGTYPE")),
            "{err:?}"
        );
        // closed, erased and unjudged messages got nothing written; the erased one no hash
        for m in [&cancelled, &unjudged] {
            assert_eq!(
                written(&s, m, &["d1", "d2"]).await?,
                (None, vec![None, None])
            );
        }
        assert!(!c.exists::<_, bool>(s.keys().msg(&erased.id)).await?);
        assert_eq!(s.pending(APP, "d1", 100).await?.len(), 2);

        // an empty batch costs nothing
        assert!(s.target_many(&[]).await?.is_empty());
        s.delete_namespace().await?;
        Ok(())
    }
}
