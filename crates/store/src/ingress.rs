//! The ingress's reads before a message is accepted, in as few Redis round trips as possible.
//!
//! Every `POST /v1/messages` authenticates its API key, counts the request against its app's
//! rate limit and checks that the named users have devices. Step by step that is
//! [`Store::app_for_key`], then [`Store::count_request`], then [`Store::user_devices`] per
//! distinct user (two round trips each, one user after the other): each sits on the latency of
//! every accepted message. The two scripts here do the same reads and writes in one round trip
//! each, and must keep answering exactly what that sequence answers, errors included; the
//! tests below hold the two side by side.

use std::sync::LazyLock;

use pushgate_core::Device;
use redis::{Script, Value};

use crate::scripts::MGET_PREFIXED;
use crate::{Store, StoreError};

/// An API key that names an app, and what counting the request gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUse {
    /// The app the key belongs to (the key record's value).
    pub app_id: String,
    /// The app's request count in the asked second, including this request; `None` when no
    /// second was asked (rate limit off), so nothing was counted.
    pub count: Option<u64>,
}

/// Reads an API key record and counts the request of the app it names.
///
/// KEYS: the API key record. ARGV: `1` to count (else `0`), the rate key before the app id,
/// the rate key after it (see [`crate::Keys::rate_parts`]).
///
/// The rate key depends on the record's value, so it cannot be declared up front; like the
/// store's other scripts this one builds it (Redis Cluster is not supported).
///
/// Returns `{0, '', 0}` for an unknown key, `{1, app, 0}` when the key is known but the
/// request was not counted, `{2, app, count}` when it was. The request is not counted when
/// counting is off, nor when the app id holds a non-ASCII byte: only Rust can tell whether it
/// is valid UTF-8, and an app id that is not used to fail before anything was counted, so the
/// caller converts it first and counts with [`Store::count_request`] as before. Errors of
/// `GET` and `INCRBY` are returned as they are (`redis.pcall`, not `redis.call`, which would
/// add the script's name to the message), and `EXPIRE` runs even when `INCRBY` failed, as it
/// did in `count_request`'s pipeline. (That pipeline's client wrapped an `INCRBY` error as a
/// "pipeline failure"; the script's is the bare server error, the same 503 to the caller.)
const USE_API_KEY_LUA: &str = r#"
local app = redis.pcall('GET', KEYS[1])
if type(app) == 'table' and app.err then return app end
if not app then return {0, '', 0} end
if ARGV[1] ~= '1' or string.find(app, '[\128-\255]') then return {1, app, 0} end
local key = ARGV[2] .. app .. ARGV[3]
local n = redis.pcall('INCRBY', key, 1)
redis.call('EXPIRE', key, 2)
if type(n) == 'table' and n.err then return n end
return {2, app, n}
"#;

/// Reads the device ids and records of several users of one app.
///
/// KEYS: the users' device sets. ARGV: the app's device key prefix.
///
/// Returns one entry per key, in order: `{1, members, records}` with the set's members as
/// `SMEMBERS` answered them and each member's record (nil when missing) in the same order, or
/// `{0, error}` with the text of the error `SMEMBERS` answered (a key of the wrong type), for
/// that user alone. (The text, not the error itself: the client fails a whole reply holding an
/// error anywhere.) Sorting, decoding and filtering stay in Rust, where
/// [`Store::user_devices`] does them, so the results and errors cannot differ. Read-only.
const USERS_DEVICES_LUA: &str = r#"
local out = {}
for u = 1, #KEYS do
  local ids = redis.pcall('SMEMBERS', KEYS[u])
  if type(ids) == 'table' and ids.err then
    out[u] = {0, ids.err}
  else
    out[u] = {1, ids, mget_prefixed(ARGV[1], ids)}
  end
end
return out
"#;

/// Loaded once per process; `invoke_async` sends EVALSHA and loads the script on NOSCRIPT.
static USE_API_KEY: LazyLock<Script> = LazyLock::new(|| Script::new(USE_API_KEY_LUA));
/// As [`USE_API_KEY`].
static USERS_DEVICES: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{MGET_PREFIXED}{USERS_DEVICES_LUA}")));

/// A reply shape the scripts never produce (a script of another version loaded under the same
/// SHA is impossible; this guards against reading garbage as an answer).
pub(crate) fn unexpected(what: &str) -> StoreError {
    StoreError::Redis(redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected script reply",
        what.to_string(),
    )))
}

/// The error Redis answered with `text` (`WRONGTYPE Operation against …`), as the client
/// makes it of an error reply: parsed from the same wire form, so it reads the same.
pub(crate) fn server_error(text: &[u8]) -> StoreError {
    // an error line cannot hold a line break; Redis never puts one in
    let line: Vec<u8> = text
        .iter()
        .map(|b| if matches!(b, b'\r' | b'\n') { b' ' } else { *b })
        .collect();
    let mut wire = Vec::with_capacity(line.len() + 3);
    wire.push(b'-');
    wire.extend_from_slice(&line);
    wire.extend_from_slice(b"\r\n");
    match redis::parse_redis_value(&wire).and_then(Value::extract_error) {
        Err(e) => StoreError::Redis(e),
        Ok(_) => unexpected("users_devices error"),
    }
}

impl Store {
    /// Authenticates an API key (by SHA-256 hex) and, when `second` is given, counts one
    /// request of its app in that second, in one round trip. `None`: the key is unknown and
    /// nothing was counted.
    ///
    /// Same answers and the same writes as [`Store::app_for_key`] followed, for a known key,
    /// by [`Store::count_request`]`(app, second, 1)`: the same rate key and TTL, nothing
    /// counted for an unknown key or a record that is not a UTF-8 string, and the same errors
    /// (but for the wording of a corrupt rate counter's, see `USE_API_KEY_LUA`).
    pub async fn use_api_key(
        &self,
        key_hash: &str,
        second: Option<i64>,
    ) -> Result<Option<KeyUse>, StoreError> {
        let (before, after) = self.keys.rate_parts(second.unwrap_or(0));
        let (code, app, count): (i64, Value, Value) = USE_API_KEY
            .key(self.keys.api_key(key_hash))
            .arg(if second.is_some() { "1" } else { "0" })
            .arg(before)
            .arg(after)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if code == 0 {
            return Ok(None);
        }
        // the conversion `app_for_key` made, with its error for a value that is not UTF-8
        let app_id: String = redis::from_redis_value(app).map_err(redis::RedisError::from)?;
        let count = match (code, second) {
            (2, Some(_)) => Some(redis::from_redis_value(count).map_err(redis::RedisError::from)?),
            (1, Some(second)) => Some(self.count_request(&app_id, second, 1).await?),
            (1, None) => None,
            _ => return Err(unexpected("use_api_key")),
        };
        Ok(Some(KeyUse { app_id, count }))
    }

    /// The devices of each of `users` of `app`, in one round trip: entry `i` is what
    /// [`Store::user_devices`]`(app, users[i])` answers, error included, so a caller checking
    /// users in order meets the same result at the same user as it would calling it per user.
    /// The outer error is one that the first of those calls would have met as well (Redis
    /// unreachable). An empty `users` costs nothing.
    pub async fn users_devices(
        &self,
        app: &str,
        users: &[&str],
    ) -> Result<Vec<Result<Vec<Device>, StoreError>>, StoreError> {
        if users.is_empty() {
            return Ok(vec![]);
        }
        let mut inv = USERS_DEVICES.prepare_invoke();
        for u in users {
            inv.key(self.keys.user_devices(app, u));
        }
        // a key family's prefix is its key for the empty id, built by the same `Keys` function
        inv.arg(self.keys.device(app, ""));
        let entries: Vec<Value> = inv.invoke_async(&mut self.conn.clone()).await?;
        if entries.len() != users.len() {
            return Err(unexpected("users_devices"));
        }
        Ok(users
            .iter()
            .zip(entries)
            .map(|(user, entry)| self.user_devices_from(app, user, entry))
            .collect())
    }

    /// One user's entry of [`USERS_DEVICES_LUA`], turned into what `user_devices` answers by
    /// the same steps: members converted, sorted, records converted in that order, decoded,
    /// those of another user dropped.
    fn user_devices_from(
        &self,
        app: &str,
        user: &str,
        entry: Value,
    ) -> Result<Vec<Device>, StoreError> {
        let mut parts = match entry {
            Value::Array(parts) => parts.into_iter(),
            _ => return Err(unexpected("users_devices entry")),
        };
        let (members, raws) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Value::Int(1)), Some(Value::Array(m)), Some(Value::Array(r)), None)
                if m.len() == r.len() =>
            {
                (m, r)
            }
            (Some(Value::Int(0)), Some(Value::BulkString(text)), None, None) => {
                return Err(server_error(&text));
            }
            _ => return Err(unexpected("users_devices entry")),
        };
        let ids: Vec<String> =
            redis::from_redis_value(Value::Array(members)).map_err(redis::RedisError::from)?;
        let mut rows: Vec<(String, Value)> = ids.into_iter().zip(raws).collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let (ids, raws): (Vec<String>, Vec<Value>) = rows.into_iter().unzip();
        let raws: Vec<Option<String>> =
            redis::from_redis_value(Value::Array(raws)).map_err(redis::RedisError::from)?;
        self.decode_user_devices(app, user, &ids, raws)
    }
}

#[cfg(test)]
mod tests {
    use redis::AsyncCommands;

    use super::*;
    use crate::Keys;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    use crate::test_support::{device, APP};

    const SECOND: i64 = 1_700_000_000;

    /// A store in a namespace of its own.
    async fn store() -> Result<Store, StoreError> {
        crate::test_support::store("in").await
    }

    /// Every rate counter of the store's namespace, with its value and TTL.
    async fn rate_keys(s: &Store) -> Result<Vec<(String, String, i64)>, StoreError> {
        let mut c = s.conn();
        let (before, _) = s.keys().rate_parts(0);
        let mut keys: Vec<String> = c.keys(format!("{before}*")).await?;
        keys.sort();
        let mut out = Vec::new();
        for k in keys {
            let v: String = c.get(&k).await?;
            let ttl: i64 = c.ttl(&k).await?;
            out.push((k, v, ttl));
        }
        Ok(out)
    }

    /// Stores an API key record (as `create_app` does) and returns its hash.
    async fn key_for(s: &Store, app: &str) -> Result<String, StoreError> {
        let hash = format!("h-{app}");
        let _: () = s.conn().set(s.keys().api_key(&hash), app).await?;
        Ok(hash)
    }

    #[test]
    fn rate_parts_spell_the_rate_key() {
        let k = Keys::new("ns");
        let (before, after) = k.rate_parts(SECOND);
        for app in ["", APP, "a:b", "äpp"] {
            assert_eq!(format!("{before}{app}{after}"), k.rate(app, SECOND));
        }
    }

    #[tokio::test]
    async fn unknown_key_counts_nothing() -> TestResult {
        let s = store().await?;
        assert_eq!(s.use_api_key("nope", Some(SECOND)).await?, None);
        assert_eq!(s.use_api_key("nope", None).await?, None);
        assert_eq!(s.app_for_key("nope").await?, None);
        assert!(rate_keys(&s).await?.is_empty());
        s.delete_namespace().await?;
        Ok(())
    }

    #[tokio::test]
    async fn known_key_counts_as_count_request_does() -> TestResult {
        let s = store().await?;
        let new = key_for(&s, "app_new").await?;
        let old = key_for(&s, "app_old").await?;
        for n in 1..=3u64 {
            let got = s.use_api_key(&new, Some(SECOND)).await?;
            assert_eq!(
                got,
                Some(KeyUse {
                    app_id: "app_new".into(),
                    count: Some(n)
                })
            );
            // the sequence it replaces, for another app in the same second
            let app = s.app_for_key(&old).await?.ok_or("old key unknown")?;
            assert_eq!(s.count_request(&app, SECOND, 1).await?, n);
        }
        // the same keys, values and TTLs, whichever way the request was counted
        let keys = rate_keys(&s).await?;
        assert_eq!(
            keys,
            vec![
                (s.keys().rate("app_new", SECOND), "3".into(), 2),
                (s.keys().rate("app_old", SECOND), "3".into(), 2),
            ]
        );
        // the next second is a new window, and the first window's key expires
        let next = s.use_api_key(&new, Some(SECOND + 1)).await?;
        assert_eq!(next.and_then(|k| k.count), Some(1));
        assert_eq!(s.count_request("app_old", SECOND + 1, 1).await?, 1);
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        let left = rate_keys(&s).await?;
        assert!(
            left.iter()
                .all(|(k, _, _)| !k.ends_with(&format!(":{SECOND}"))),
            "{left:?}"
        );
        s.delete_namespace().await?;
        Ok(())
    }

    #[tokio::test]
    async fn rate_limit_off_counts_nothing() -> TestResult {
        let s = store().await?;
        let hash = key_for(&s, APP).await?;
        for _ in 0..2 {
            assert_eq!(
                s.use_api_key(&hash, None).await?,
                Some(KeyUse {
                    app_id: APP.into(),
                    count: None
                })
            );
        }
        assert!(rate_keys(&s).await?.is_empty());
        s.delete_namespace().await?;
        Ok(())
    }

    #[tokio::test]
    async fn odd_key_records_answer_as_before() -> TestResult {
        let s = store().await?;
        let mut c = s.conn();
        // not a string: the same error as the GET, nothing counted
        let _: () = c.hset(s.keys().api_key("hash"), "a", "b").await?;
        let new = s.use_api_key("hash", Some(SECOND)).await;
        let old = s.app_for_key("hash").await;
        assert!(new.is_err(), "{new:?}");
        assert_eq!(
            new.err().map(|e| e.to_string()),
            old.err().map(|e| e.to_string())
        );
        // not UTF-8: the same conversion error, nothing counted
        let _: () = c.set(s.keys().api_key("bytes"), &b"app\xff"[..]).await?;
        let new = s.use_api_key("bytes", Some(SECOND)).await;
        let old = s.app_for_key("bytes").await;
        assert!(new.is_err(), "{new:?}");
        assert_eq!(
            new.err().map(|e| e.to_string()),
            old.err().map(|e| e.to_string())
        );
        assert!(rate_keys(&s).await?.is_empty());
        // UTF-8 but not ASCII, and empty: counted under the same key as count_request would
        for app in ["äpp", ""] {
            let hash = key_for(&s, app).await?;
            let got = s.use_api_key(&hash, Some(SECOND)).await?;
            assert_eq!(
                got,
                Some(KeyUse {
                    app_id: app.into(),
                    count: Some(1)
                })
            );
        }
        let keys = rate_keys(&s).await?;
        let mut want = vec![
            (s.keys().rate("", SECOND), "1".to_string(), 2),
            (s.keys().rate("äpp", SECOND), "1".to_string(), 2),
        ];
        want.sort();
        assert_eq!(keys, want);
        // a rate counter that is not a number: count_request's error, EXPIRE run all the same
        let hash = key_for(&s, "app_bad").await?;
        let _: () = c.set(s.keys().rate("app_bad", SECOND), "x").await?;
        let new = s.use_api_key(&hash, Some(SECOND)).await;
        assert!(new.is_err(), "{new:?}");
        // the one difference: the old pipeline wrapped it as a pipeline failure
        let old = s.count_request("app_bad", SECOND, 1).await;
        let text = "value is not an integer or out of range";
        for r in [new.err(), old.err()] {
            assert!(r.is_some_and(|e| e.to_string().contains(text)));
        }
        assert_eq!(c.ttl::<_, i64>(s.keys().rate("app_bad", SECOND)).await?, 2);
        s.delete_namespace().await?;
        Ok(())
    }

    /// Entry by entry, what `user_devices` answers for the same user (errors by their text).
    async fn per_user(
        s: &Store,
        users: &[&str],
    ) -> Result<Vec<Result<Vec<Device>, String>>, StoreError> {
        let mut out = Vec::new();
        for u in users {
            out.push(s.user_devices(APP, u).await.map_err(|e| e.to_string()));
        }
        Ok(out)
    }

    #[tokio::test]
    async fn users_devices_matches_user_devices_per_user() -> TestResult {
        let s = store().await?;
        let mut c = s.conn();
        for (id, user) in [("b:2", "u1"), ("B.1", "u1"), ("a@3", "u1"), ("d", "u2")] {
            s.put_device(&device(id, user), None).await?;
        }
        // u1: a device that moved to another user, and a member whose record is gone
        s.put_device(&device("moved", "u2"), None).await?;
        let _: () = c.sadd(s.keys().user_devices(APP, "u1"), "moved").await?;
        let _: () = c.sadd(s.keys().user_devices(APP, "u1"), "ghost").await?;
        // u3: a corrupt record; u4: a set of the wrong type; u5: a member that is not UTF-8
        let _: () = c.sadd(s.keys().user_devices(APP, "u3"), "bad").await?;
        let _: () = c.set(s.keys().device(APP, "bad"), "{not json").await?;
        let _: () = c.set(s.keys().user_devices(APP, "u4"), "x").await?;
        let _: () = c
            .sadd(s.keys().user_devices(APP, "u5"), &b"\xff"[..])
            .await?;
        // "nobody" has no devices at all
        let users = ["u1", "nobody", "u2", "u3", "u4", "u5"];
        let got: Vec<Result<Vec<Device>, String>> = s
            .users_devices(APP, &users)
            .await?
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();
        assert_eq!(got, per_user(&s, &users).await?);
        let ids = |r: &Result<Vec<Device>, String>| -> Vec<String> {
            r.as_ref()
                .map(|d| d.iter().map(|d| d.device_id.clone()).collect())
                .unwrap_or_default()
        };
        assert_eq!(ids(&got[0]), ["B.1", "a@3", "b:2"]);
        assert!(ids(&got[1]).is_empty() && got[1].is_ok());
        assert_eq!(ids(&got[2]), ["d", "moved"]);
        assert!(got[3]
            .as_ref()
            .is_err_and(|e| e.contains(&s.keys().device(APP, "bad"))));
        assert!(got[4].is_err() && got[5].is_err());
        assert!(s.users_devices(APP, &[]).await?.is_empty());
        s.delete_namespace().await?;
        Ok(())
    }

    #[tokio::test]
    async fn users_devices_reads_large_sets() -> TestResult {
        let s = store().await?;
        let mut c = s.conn();
        // more members than one MGET slice of the script
        for i in 0..600 {
            let id = format!("d{i:04}");
            let _: () = c.sadd(s.keys().user_devices(APP, "big"), &id).await?;
            let _: () = c
                .set(
                    s.keys().device(APP, &id),
                    serde_json::to_string(&device(&id, "big"))?,
                )
                .await?;
        }
        let got = s.users_devices(APP, &["big"]).await?;
        let want = s.user_devices(APP, "big").await?;
        assert_eq!(want.len(), 600);
        assert_eq!(got.into_iter().next().ok_or("no entry")??, want);
        s.delete_namespace().await?;
        Ok(())
    }
}
