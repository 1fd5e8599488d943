//! Lua scripts for the state changes that must be atomic.
//!
//! Every status change goes through `apply`, defined once in [`PRELUDE`]: it checks the move
//! against the transition table generated from [`pushgate_core::Status::next`], writes the
//! status, appends the history entry, and puts the resulting event into the event outbox — all
//! in one Redis step. That is what makes "delivered or expired, never both" hold with any
//! number of routers and edges racing: whichever script runs first wins, the other is refused
//! and reports nothing.

use pushgate_core::Status;

/// Builds the Lua transition check `allowed(from, to)` from the core status machine.
///
/// The moves are one string constant (`,from>to,` for each), looked up with a plain
/// `string.find`: a script's top level runs on every call, and a table of tables would be
/// built anew each time (about 1.5 µs per call, measured with redis-benchmark), while a
/// constant string is made once, when the script is compiled.
fn transition_table_lua() -> String {
    let mut moves = String::from(",");
    for (from, tos) in Status::transition_table() {
        for to in tos {
            moves.push_str(&format!("{from}>{to},"));
        }
    }
    format!(
        "local TT = '{moves}'\nlocal function allowed(from, to) return string.find(TT, ',' .. from .. '>' .. to .. ',', 1, true) ~= nil end\n"
    )
}

/// Shared Lua: transition table and the `apply` function.
///
/// `apply(mkey, hkey, evtkey, expkey, cmdkey, pending_root, id, to, at_ms, at_txt, channel,
/// device, detail, purpose)` returns `{code, current_status, event_json}` where code is
/// 0 refused, 1 applied, 2 noted (a second device confirmed an already delivered message;
/// a device repeating its own confirmation is refused, so each device is noted at most once
/// per status). `apply_read(f, …)` is the same with the message's fields already read by
/// `read_state(mkey)` in the same script call (the hand-over check reads them for its own
/// decision first).
const PRELUDE_BODY: &str = r#"
-- every field a change may need, in one call: a status change is the hottest script (two per
-- delivered message), and each redis.call costs about as much as the work it does (argument
-- conversion, command lookup, checks), so the scripts keep their calls few
local function read_state(mkey)
  return redis.call('HMGET', mkey, 'status', 'app', 'foreign', 'user', 'targets', 'seq')
end

-- `f`: what `read_state(mkey)` answered, read in this same script call
local function apply_read(f, mkey, hkey, evtkey, expkey, cmdkey, pending_root, id, to, at_ms, at_txt, channel, device, detail, purpose)
  local cur = f[1]
  if not cur then return {0, '', ''} end
  local app = f[2]
  if not allowed(cur, to) then
    if device ~= '' and (to == 'delivered' or to == 'read') and (cur == 'delivered' or cur == 'read') then
      -- another device of the user got it too: keep the per-device detail, report nothing.
      -- But only news once per device: a device confirms one message more than once (an
      -- XEP-0198 ack and an XEP-0184 receipt, a receipt and a marker, a retried HTTP report).
      -- A device's first confirmation takes the message out of its pending queue, so a
      -- `delivered` from a device that no longer has it pending says nothing new (that
      -- device, or one that was never a target, already counted). A `read` says something new
      -- after the device's own `delivered`, so it is refused only when this device's read is
      -- already in the history, or when the device has no confirmation in it at all.
      local was_pending = redis.call('ZREM', pending_root .. app .. ':' .. device, id)
      if was_pending == 0 then
        if to == 'delivered' then return {0, cur, ''} end
        local confirmed = false
        for _, raw in ipairs(redis.call('LRANGE', hkey, 0, -1)) do
          local ok, e = pcall(cjson.decode, raw)
          if ok and type(e) == 'table' and e.device_id == device then
            if e.status == 'read' then return {0, cur, ''} end
            if e.status == 'delivered' then confirmed = true end
          end
        end
        if not confirmed then return {0, cur, ''} end
      end
      local h = {status = to, at = tonumber(at_ms), device_id = device}
      if channel ~= '' then h.channel = channel end
      h.detail = 'also ' .. to .. ' on this device'
      redis.call('RPUSH', hkey, cjson.encode(h))
      return {2, cur, ''}
    end
    return {0, cur, ''}
  end
  -- what HINCRBY would do (a missing field counts from 0), written with the status
  local seq = (tonumber(f[6]) or 0) + 1
  if channel ~= '' then
    redis.call('HSET', mkey, 'status', to, 'seq', seq, 'channel', channel)
  else
    redis.call('HSET', mkey, 'status', to, 'seq', seq)
  end
  local h = {status = to, at = tonumber(at_ms)}
  if channel ~= '' then h.channel = channel end
  if device ~= '' then h.device_id = device end
  if detail ~= '' then h.detail = detail end
  redis.call('RPUSH', hkey, cjson.encode(h))
  if to == 'delivered' or to == 'read' or to == 'expired' or to == 'cancelled' or to == 'failed' then
    redis.call('ZREM', expkey, id)
  end
  if to == 'expired' or to == 'cancelled' or to == 'failed' then
    local targets = f[5]
    if targets then
      for dev in string.gmatch(targets, '[^,]+') do
        redis.call('ZREM', pending_root .. app .. ':' .. dev, id)
      end
    end
  end
  if (to == 'delivered' or to == 'read') and device ~= '' then
    redis.call('ZREM', pending_root .. app .. ':' .. device, id)
  end
  local ev = {id = id .. '.' .. seq, event = to, message_id = id, at = at_txt}
  local foreign = f[3]
  if foreign and foreign ~= '' then ev.foreign_id = foreign end
  local user = f[4]
  if user and user ~= '' then ev.user_id = user end
  if device ~= '' then ev.device_id = device end
  if channel ~= '' then ev.channel = channel end
  if detail ~= '' then ev.detail = detail end
  local evj = cjson.encode({app_id = app, seq = seq, event = ev})
  redis.call('ZADD', evtkey, at_ms, evj)
  if purpose ~= '' then redis.call('ZADD', cmdkey, at_ms, id .. '|' .. purpose) end
  return {1, to, evj}
end

local function apply(mkey, hkey, evtkey, expkey, cmdkey, pending_root, id, to, at_ms, at_txt, channel, device, detail, purpose)
  return apply_read(read_state(mkey), mkey, hkey, evtkey, expkey, cmdkey, pending_root, id, to, at_ms, at_txt, channel, device, detail, purpose)
end
"#;

/// One status change of one message.
///
/// KEYS: msg, history, outbox:evt, expiry, outbox:cmd.
/// ARGV: pending_root, id, to, at_ms, at_txt, channel, device, detail, purpose.
const TRANSITION_BODY: &str = r#"
return apply(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9])
"#;

/// Several status changes at one instant, in order, each exactly as [`TRANSITION_BODY`] would
/// apply it: a busy edge confirms many messages at once, and one script call for all of them
/// costs Redis one request and one script run instead of one each (docs/benchmarks.md).
///
/// KEYS: outbox:evt, expiry, outbox:cmd, then msg and history of each change.
/// ARGV: pending_root, at_ms, at_txt, then six per change: id, to, channel, device, detail,
/// purpose.
/// Returns one entry per change: what `apply` returns, or `{-1, error text, ''}` when a
/// command of that change failed (a key of the wrong type): that change alone fails, as it
/// would have in its own call, and the others are applied.
const CHANGE_MANY_BODY: &str = r#"
local out = {}
local n = (#ARGV - 3) / 6
for i = 0, n - 1 do
  local a = 3 + i * 6
  local ok, r = pcall(apply, KEYS[4 + i * 2], KEYS[5 + i * 2], KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[a + 1], ARGV[a + 2], ARGV[2], ARGV[3], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6])
  if ok then out[i + 1] = r else out[i + 1] = {-1, err_text(r), ''} end
end
return out
"#;

/// Expires due messages, at most `limit` per call.
///
/// KEYS: expiry, outbox:evt, outbox:cmd.
/// ARGV: now_ms, now_txt, limit, msg_prefix, history_prefix, pending_root.
/// Returns a flat list of event JSON for the messages it expired.
const EXPIRE_DUE_BODY: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local r = apply(ARGV[4] .. id, ARGV[5] .. id, KEYS[2], KEYS[1], KEYS[3], ARGV[6], id, 'expired', ARGV[1], ARGV[2], '', '', 'time to live elapsed', 'expired')
  if r[1] == 1 then table.insert(out, r[3]) end
end
return out
"#;

/// Moves due scheduled messages to `enqueued`, at most `limit` per call.
///
/// KEYS: schedule, outbox:evt, outbox:cmd, expiry.
/// ARGV: now_ms, now_txt, limit, msg_prefix, history_prefix, pending_root.
/// Returns a flat list of event JSON; each released message also gets a `route` command in
/// the command outbox.
const RELEASE_DUE_BODY: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local r = apply(ARGV[4] .. id, ARGV[5] .. id, KEYS[2], KEYS[4], KEYS[3], ARGV[6], id, 'enqueued', ARGV[1], ARGV[2], '', '', '', 'route')
  if r[1] == 1 then table.insert(out, r[3]) end
end
return out
"#;

/// What a live XMPP session needs to decide about one handed-over message, in one round
/// trip: whether the message still waits for the device, its status, and which ids wait
/// before it above the session's mark. "Older" includes ties: two requests accepted in the
/// same millisecond give their first recipients the same score, and a tie must not be passed
/// over as if it had been seen. The score stays the string Redis formats it as (shortest exact
/// form): Lua 5.1 would print a number with 14 digits, but order keys have 16
/// (`Message::order_key`), so turning it into a Lua number and back would move the range bound.
///
/// The common outcome is done in the same step: when the handed-over message is the next one
/// the session has to write (it waits in the queue above the mark, nothing else waits in
/// `(mark, score]`, its status is open and it has not expired), the `sent` transition is
/// applied right away and the caller writes the stanza. That saves the live session's second
/// script per message, and a message cannot expire or be cancelled between the check and
/// `sent`. Otherwise nothing is written and the caller decides from what was read.
///
/// `check_send(pending queue, msg, history, outbox:evt, expiry, outbox:cmd, id, after
/// (`'-inf'` or the mark), limit, pending_root, now_ms, now_txt, channel, device,
/// expires_at_ms, open statuses (`,a,b,`))`, run by [`PENDING_CHECK_SEND_MANY_BODY`].
/// Returns `{}` when not pending, else `{score, status, sent, event, older ids…}` where `sent`
/// is `''` (not decided: the caller decides), `'1'` (`sent` applied; `event` is its event
/// JSON) or `'0'` (write it, but `sent` was already recorded: no event).
const PENDING_CHECK_SEND_FN: &str = r#"
local function check_send(pkey, mkey, hkey, evtkey, expkey, cmdkey, id, after, limit, pending_root, now_ms, now_txt, channel, device, expires, open)
  local s = redis.call('ZSCORE', pkey, id)
  if not s then return {} end
  -- the message's state is read once, for this decision and for `sent` below
  local f = read_state(mkey)
  local status = f[1] or ''
  local min = after
  if min ~= '-inf' then min = '(' .. min end
  -- one more than the limit: the message itself may be among them
  local older = redis.call('ZRANGE', pkey, min, s, 'BYSCORE', 'LIMIT', 0, tonumber(limit) + 1)
  local out = {s, status, '', ''}
  local itself = false
  for _, o in ipairs(older) do
    if o == id then itself = true else out[#out + 1] = o end
  end
  -- `itself`: the message lies above the mark (a late one does not fall in (mark, s])
  if itself and #out == 4 and status ~= ''
      and string.find(open, ',' .. status .. ',', 1, true)
      and tonumber(expires) > tonumber(now_ms) then
    local r = apply_read(f, mkey, hkey, evtkey, expkey, cmdkey, pending_root, id, 'sent', now_ms, now_txt, channel, device, '', '')
    if r[1] == 1 then
      out[3] = '1'
      out[4] = r[3]
    else
      out[3] = '0'
    end
  end
  return out
end
"#;

/// Several sessions' checks at one instant (one check is a batch of one), each `check_send`
/// in order, as separate calls one after the other would run them: a busy edge gets many hand-overs at once (the router batches them per edge), and
/// one script call for all of their checks costs Redis one request and one script run
/// instead of one each.
///
/// KEYS: outbox:evt, expiry, outbox:cmd, then pending queue, msg and history of each check.
/// ARGV: pending_root, now_ms, now_txt, channel, open statuses, then five per check: id,
/// after, limit, device, expires_at_ms.
/// Returns one entry per check: `{'1', what check_send returns}`, or `{'-1', error text}`
/// when a command of that check failed (a key of the wrong type): that check alone fails.
const PENDING_CHECK_SEND_MANY_BODY: &str = r#"
local out = {}
local n = (#ARGV - 5) / 5
for i = 0, n - 1 do
  local a = 5 + i * 5
  local k = 3 + i * 3
  local ok, r = pcall(check_send, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[1], KEYS[2], KEYS[3], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[a + 4], ARGV[a + 5], ARGV[5])
  if ok then out[i + 1] = {'1', r} else out[i + 1] = {'-1', err_text(r)} end
end
return out
"#;

/// The text of what a failed `pcall` raised: a batched script's item fails alone, with the
/// error its own call would have answered (a failed `redis.call` raises `{err = text}`).
pub const ERR_TEXT: &str = r#"
local function err_text(r)
  if type(r) == 'table' and r.err then return r.err end
  return tostring(r)
end
"#;

/// `prefix .. id` for every id, in order (false where missing). MGET in slices, because
/// `unpack()` of a long list would overflow Lua's C stack.
pub const MGET_PREFIXED: &str = r#"
local function mget_prefixed(prefix, ids)
  local raws = {}
  local slice = 256
  for first = 1, #ids, slice do
    local keys = {}
    for i = first, math.min(first + slice - 1, #ids) do
      table.insert(keys, prefix .. ids[i])
    end
    local got = redis.call('MGET', unpack(keys))
    for j = 1, #keys do raws[first + j - 1] = got[j] end
  end
  return raws
end
"#;

/// Deletes a key only if it still holds the given value (presence hand-over, locks).
pub const COMPARE_AND_DELETE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Sets a key only if it holds the expected value ('' = absent). Returns 1 when set.
pub const COMPARE_AND_SET: &str = r#"
local cur = redis.call('GET', KEYS[1])
if (cur or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"#;

/// Records `ARGV[1]` as the newest message of a collapse key unless a newer one is there.
/// Message ids are UUIDv7, so text order is acceptance order. Returns the id that must give
/// way: the previous holder, or `ARGV[1]` itself when it is the older one ('' when none).
/// KEYS: collapse key. ARGV: message id, TTL ms.
pub const COLLAPSE_CLAIM: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return '' end
if (not cur) or cur < ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return cur or ''
end
return ARGV[1]
"#;

/// The full source of the status transition script.
pub fn transition() -> String {
    format!("{}{PRELUDE_BODY}{TRANSITION_BODY}", transition_table_lua())
}

/// The full source of the batched status change script.
pub fn change_many() -> String {
    format!(
        "{}{PRELUDE_BODY}{ERR_TEXT}{CHANGE_MANY_BODY}",
        transition_table_lua()
    )
}

/// The full source of the batched hand-over check.
pub fn pending_check_send_many() -> String {
    format!(
        "{}{PRELUDE_BODY}{PENDING_CHECK_SEND_FN}{ERR_TEXT}{PENDING_CHECK_SEND_MANY_BODY}",
        transition_table_lua()
    )
}

/// The full source of the expiry script.
pub fn expire_due() -> String {
    format!("{}{PRELUDE_BODY}{EXPIRE_DUE_BODY}", transition_table_lua())
}

/// The full source of the schedule release script.
pub fn release_due() -> String {
    format!("{}{PRELUDE_BODY}{RELEASE_DUE_BODY}", transition_table_lua())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_every_move_and_nothing_else() {
        let t = transition_table_lua();
        for s in Status::ALL {
            for to in Status::ALL {
                let listed = t.contains(&format!(",{}>{},", s.as_str(), to.as_str()));
                assert_eq!(listed, s.next().contains(&to), "{s} -> {to}");
            }
        }
        assert!(t.contains(",delivered>read,"));
    }

    /// `apply`'s per-device notes against a real Redis: a second device of the user is noted
    /// once per status; a device repeating its own confirmation (an XEP-0198 ack before its
    /// XEP-0184 receipt) writes nothing.
    #[tokio::test]
    async fn a_device_is_noted_once_and_a_repeated_confirmation_writes_nothing(
    ) -> Result<(), Box<dyn std::error::Error>> {
        use crate::{Change, Transition};
        use pushgate_core::HistoryEntry;

        let store = crate::test_support::store("n").await?;
        let now = pushgate_core::time::now_ms();
        let m = crate::test_support::message("u", now, 0);
        let ev = format!("{}|ev", m.id);
        store
            .create_messages(&[(m.clone(), Status::Enqueued, ev)])
            .await?;
        store
            .target_devices(&m, &["phone".into(), "tablet".into(), "watch".into()])
            .await?;
        let change = |device: &'static str, to: Status| {
            let (store, id) = (store.clone(), m.id.clone());
            async move {
                let ch = Change {
                    message_id: &id,
                    to: Some(to),
                    channel: Some("xmpp"),
                    device_id: Some(device),
                    ..Default::default()
                };
                store.change(&ch, pushgate_core::time::now_ms()).await
            }
        };
        let notes = || {
            let store = store.clone();
            let id = m.id.clone();
            async move {
                let st = store.message_state(&id).await?.ok_or("message gone")?;
                let h: Vec<HistoryEntry> = st.history;
                Ok::<_, Box<dyn std::error::Error>>(
                    h.into_iter()
                        .filter(|e| e.status != Status::Enqueued)
                        .map(|e| {
                            (
                                e.device_id.unwrap_or_default(),
                                e.status,
                                e.detail.is_some(),
                            )
                        })
                        .collect::<Vec<_>>(),
                )
            }
        };

        // each applied change numbers its event one past the last (`enqueued` was 1), and a
        // refused or noted one takes no number
        let seq_of = |t: Transition| -> Result<(u64, String), Box<dyn std::error::Error>> {
            let Transition::Applied(ev) = t else {
                return Err(format!("not applied: {t:?}").into());
            };
            let v: serde_json::Value = serde_json::from_str(&ev)?;
            Ok((
                v["seq"].as_u64().ok_or("no seq")?,
                v["event"]["id"].as_str().ok_or("no event id")?.to_string(),
            ))
        };
        assert_eq!(
            seq_of(change("phone", Status::Sent).await?)?,
            (2, format!("{}.2", m.id))
        );
        assert_eq!(
            seq_of(change("phone", Status::Delivered).await?)?,
            (3, format!("{}.3", m.id))
        );
        // the phone's receipt after its stream-management ack: nothing new
        assert_eq!(
            change("phone", Status::Delivered).await?,
            Transition::Refused(Some(Status::Delivered))
        );
        // the tablet got it too: noted once, its repeat refused
        assert_eq!(
            change("tablet", Status::Delivered).await?,
            Transition::Noted
        );
        assert_eq!(
            change("tablet", Status::Delivered).await?,
            Transition::Refused(Some(Status::Delivered))
        );
        // a device that never had it says nothing either
        assert_eq!(
            change("laptop", Status::Delivered).await?,
            Transition::Refused(Some(Status::Delivered))
        );
        assert_eq!(
            seq_of(change("phone", Status::Read).await?)?,
            (4, format!("{}.4", m.id))
        );
        // after the read: the phone's late ack, the tablet's read (news: once), the watch's
        // first confirmation being a read
        assert_eq!(
            change("phone", Status::Delivered).await?,
            Transition::Refused(Some(Status::Read))
        );
        assert_eq!(
            change("phone", Status::Read).await?,
            Transition::Refused(Some(Status::Read))
        );
        assert_eq!(change("tablet", Status::Read).await?, Transition::Noted);
        assert_eq!(
            change("tablet", Status::Read).await?,
            Transition::Refused(Some(Status::Read))
        );
        assert_eq!(change("watch", Status::Read).await?, Transition::Noted);
        assert_eq!(
            change("watch", Status::Delivered).await?,
            Transition::Refused(Some(Status::Read))
        );
        assert_eq!(
            change("laptop", Status::Read).await?,
            Transition::Refused(Some(Status::Read))
        );
        assert_eq!(
            notes().await?,
            [
                ("phone".to_string(), Status::Sent, false),
                ("phone".to_string(), Status::Delivered, false),
                ("tablet".to_string(), Status::Delivered, true),
                ("phone".to_string(), Status::Read, false),
                ("tablet".to_string(), Status::Read, true),
                ("watch".to_string(), Status::Read, true),
            ]
        );
        store.delete_namespace().await?;
        Ok(())
    }

    /// `change_many` answers and writes what one `change` per item does, run on two copies of
    /// the same messages: applied changes numbered in order (two of one message in the same
    /// batch), a second device noted, moves refused (message gone, no status asked, not
    /// allowed after a `read` earlier in the batch), and a message key of the wrong type
    /// failing alone.
    #[tokio::test]
    async fn change_many_is_one_change_per_item() -> Result<(), Box<dyn std::error::Error>> {
        use crate::{Change, StoreError, Transition};
        use redis::AsyncCommands;

        let store = crate::test_support::store("cm").await?;
        let now = pushgate_core::time::now_ms();
        // one world per path: its messages, then its steps by message index
        let mut worlds = vec![];
        for _ in 0..2 {
            let ms: Vec<_> = (0..2)
                .map(|i| crate::test_support::message("u", now, i))
                .collect();
            for m in &ms {
                store
                    .create_messages(&[(m.clone(), Status::Enqueued, format!("{}|ev", m.id))])
                    .await?;
                store
                    .target_devices(m, &["phone".into(), "tablet".into()])
                    .await?;
            }
            let bad = uuid::Uuid::now_v7().to_string();
            let _: () = store
                .conn()
                .set(store.keys().msg(&bad), "not a hash")
                .await?;
            worlds.push((ms, bad));
        }
        let steps = |ms: &[pushgate_core::Message],
                     bad: &str|
         -> Vec<(String, Option<Status>, &'static str)> {
            vec![
                (ms[0].id.clone(), Some(Status::Sent), "phone"),
                (ms[0].id.clone(), Some(Status::Delivered), "phone"),
                (ms[0].id.clone(), Some(Status::Delivered), "tablet"),
                (bad.to_string(), Some(Status::Delivered), "phone"),
                (ms[1].id.clone(), Some(Status::Read), "phone"),
                ("gone".to_string(), Some(Status::Delivered), "phone"),
                (ms[1].id.clone(), None, "phone"),
                (ms[1].id.clone(), Some(Status::Cancelled), ""),
            ]
        };
        let outcome = |r: Result<Transition, StoreError>| -> String {
            match r {
                Ok(Transition::Applied(ev)) => {
                    let v: serde_json::Value = serde_json::from_str(&ev).unwrap_or_default();
                    format!("applied {} {}", v["seq"], v["event"]["event"])
                }
                Ok(t) => format!("{t:?}"),
                Err(e) => format!("error {}", e.to_string().contains("WRONGTYPE")),
            }
        };
        let at = now + 5;
        let mut answers = vec![];
        for (w, (ms, bad)) in worlds.iter().enumerate() {
            let steps = steps(ms, bad);
            let changes: Vec<Change<'_>> = steps
                .iter()
                .map(|(id, to, dev)| Change {
                    message_id: id,
                    to: *to,
                    channel: Some("xmpp"),
                    device_id: (!dev.is_empty()).then_some(*dev),
                    ..Default::default()
                })
                .collect();
            let got: Vec<String> = if w == 0 {
                let mut got = vec![];
                for ch in &changes {
                    got.push(outcome(store.change(ch, at).await));
                }
                got
            } else {
                store
                    .change_many(&changes, at)
                    .await?
                    .into_iter()
                    .map(outcome)
                    .collect()
            };
            let mut states = vec![];
            for m in ms {
                let st = store.message_state(&m.id).await?.ok_or("message gone")?;
                let h: Vec<_> = st
                    .history
                    .iter()
                    .map(|e| (e.status, e.at, e.device_id.clone(), e.detail.clone()))
                    .collect();
                states.push((st.status, h));
            }
            answers.push((got, states));
        }
        assert_eq!(answers[0], answers[1]);
        assert_eq!(
            answers[1].0,
            [
                "applied 2 \"sent\"",
                "applied 3 \"delivered\"",
                "Noted",
                "error true",
                "applied 2 \"read\"",
                "Refused(None)",
                "Refused(None)",
                "Refused(Some(Read))",
            ]
        );
        assert!(store.change_many(&[], at).await?.is_empty());
        store.delete_namespace().await?;
        Ok(())
    }
}
