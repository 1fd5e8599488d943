//! The local message store: one small record per message id, in a redb file.
//!
//! It is what makes delivery exactly-once for the app although the network is at-least-once:
//! the server re-sends every unconfirmed message on each new session, and the same message may
//! already have been shown from a native push. A record is created the first time the app sees
//! an id (from [`crate::Client::next_event`] or [`crate::Client::note_native_push`]) and then
//! remembers whether the app acknowledged and read it, so a late duplicate can be confirmed
//! again without being shown again — across process restarts too, since the file survives them.
//!
//! The file is opened in redb's multi-writer mode: an app and its notification extension (or
//! the CLI's `listen` and `reply`) are separate processes that may use one store at once.
//! Records older than [`RETENTION_MS`] are pruned on open: the server never delivers a message
//! past its TTL (at most 30 days), so an older record can no longer dedupe anything.

use std::path::Path;
use std::sync::Arc;

use redb::{ConcurrencyMode, Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::ClientError;

/// Message id → encoded [`Record`].
const MESSAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("messages");
/// Small settings that must survive restarts (the push service last enabled).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// 31 days: the longest message TTL (30 days) plus a day of clock skew.
pub(crate) const RETENTION_MS: u64 = 31 * 24 * 3600 * 1000;

/// Record encoding version (first byte), so the layout can grow.
const RECORD_V1: u8 = 1;

const FLAG_ACKED: u8 = 1;
const FLAG_READ: u8 = 2;
const FLAG_NATIVE: u8 = 4;
const FLAG_RETRACTED: u8 = 8;

/// What the store knows about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageState {
    /// When the app first saw the message (Unix milliseconds).
    pub first_seen_ms: u64,
    /// The app acknowledged it (XEP-0184 receipt sent).
    pub acked: bool,
    /// The app marked it read (XEP-0333 displayed sent).
    pub read: bool,
    /// The app saw it through a native push first.
    pub native_push: bool,
    /// The server withdrew it (XEP-0424).
    pub retracted: bool,
}

impl MessageState {
    fn encode(&self) -> [u8; 10] {
        let mut out = [0u8; 10];
        out[0] = RECORD_V1;
        out[1..9].copy_from_slice(&self.first_seen_ms.to_le_bytes());
        let mut flags = 0;
        for (on, bit) in [
            (self.acked, FLAG_ACKED),
            (self.read, FLAG_READ),
            (self.native_push, FLAG_NATIVE),
            (self.retracted, FLAG_RETRACTED),
        ] {
            if on {
                flags |= bit;
            }
        }
        out[9] = flags;
        out
    }

    fn decode(b: &[u8]) -> Result<Self, ClientError> {
        let (Some(&RECORD_V1), Some(ts), Some(&flags)) = (b.first(), b.get(1..9), b.get(9)) else {
            return Err(ClientError::Store("unreadable message record".into()));
        };
        let mut first = [0u8; 8];
        first.copy_from_slice(ts);
        Ok(MessageState {
            first_seen_ms: u64::from_le_bytes(first),
            acked: flags & FLAG_ACKED != 0,
            read: flags & FLAG_READ != 0,
            native_push: flags & FLAG_NATIVE != 0,
            retracted: flags & FLAG_RETRACTED != 0,
        })
    }
}

fn store_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Store(e.to_string())
}

/// The store (cheap to clone; every clone is the same open file).
#[derive(Clone)]
pub(crate) struct Store {
    db: Arc<Database>,
}

impl Store {
    /// Opens (or creates) the store file and prunes expired records.
    pub fn open(path: &Path, now_ms: u64) -> Result<Self, ClientError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| ClientError::Store(format!("{}: {e}", dir.display())))?;
        }
        let db = Database::builder()
            .set_concurrency_mode(ConcurrencyMode::MultiWriter)
            .create(path)
            .map_err(|e| ClientError::Store(format!("{}: {e}", path.display())))?;
        let store = Store { db: Arc::new(db) };
        let cutoff = now_ms.saturating_sub(RETENTION_MS);
        store.write(|txn| {
            let mut t = txn.open_table(MESSAGES).map_err(store_err)?;
            t.retain(|_, v| {
                // unreadable records are dropped too: they cannot dedupe anything
                MessageState::decode(v).is_ok_and(|r| r.first_seen_ms >= cutoff)
            })
            .map_err(store_err)?;
            txn.open_table(META).map_err(store_err)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let txn = self.db.begin_write().map_err(store_err)?;
        let out = f(&txn)?;
        txn.commit().map_err(store_err)?;
        Ok(out)
    }

    /// The record of a message, if any.
    pub fn get(&self, id: &str) -> Result<Option<MessageState>, ClientError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let t = txn.open_table(MESSAGES).map_err(store_err)?;
        match t.get(id).map_err(store_err)? {
            Some(v) => MessageState::decode(v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Records that the app is being shown `id` now, unless it saw it before: `Some(first
    /// seen)` for a new id, `None` for a duplicate. Atomic, also across processes.
    pub fn claim(&self, id: &str, now_ms: u64) -> Result<Option<u64>, ClientError> {
        self.write(|txn| {
            let mut t = txn.open_table(MESSAGES).map_err(store_err)?;
            if t.get(id).map_err(store_err)?.is_some() {
                return Ok(None);
            }
            let rec = MessageState {
                first_seen_ms: now_ms,
                ..Default::default()
            };
            t.insert(id, rec.encode().as_slice()).map_err(store_err)?;
            Ok(Some(now_ms))
        })
    }

    /// Changes a record, creating it (first seen now) when the id is new. Returns the record
    /// as it was before (`None` when new) and after.
    pub fn update(
        &self,
        id: &str,
        now_ms: u64,
        change: impl FnOnce(&mut MessageState),
    ) -> Result<(Option<MessageState>, MessageState), ClientError> {
        self.write(|txn| {
            let mut t = txn.open_table(MESSAGES).map_err(store_err)?;
            let before = match t.get(id).map_err(store_err)? {
                Some(v) => Some(MessageState::decode(v.value())?),
                None => None,
            };
            let mut after = before.unwrap_or(MessageState {
                first_seen_ms: now_ms,
                ..Default::default()
            });
            change(&mut after);
            t.insert(id, after.encode().as_slice()).map_err(store_err)?;
            Ok((before, after))
        })
    }

    /// A stored setting.
    pub fn meta(&self, key: &str) -> Result<Option<String>, ClientError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let t = txn.open_table(META).map_err(store_err)?;
        Ok(t.get(key)
            .map_err(store_err)?
            .map(|v| v.value().to_string()))
    }

    /// Sets (`Some`) or removes (`None`) a setting.
    pub fn set_meta(&self, key: &str, value: Option<&str>) -> Result<(), ClientError> {
        self.write(|txn| {
            let mut t = txn.open_table(META).map_err(store_err)?;
            match value {
                Some(v) => t.insert(key, v).map_err(store_err)?,
                None => t.remove(key).map_err(store_err)?,
            };
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory removed when the test ends.
    pub(crate) struct TempDir(pub std::path::PathBuf);

    impl TempDir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "pushgate-device-store-{}",
                uuid::Uuid::new_v4().simple()
            ));
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn dedupe_survives_reopen() -> Result<(), ClientError> {
        let dir = TempDir::new();
        let path = dir.0.join("nested/store.redb");
        {
            let s = Store::open(&path, NOW)?;
            assert_eq!(s.claim("m1", NOW)?, Some(NOW));
            assert_eq!(s.claim("m1", NOW + 1)?, None, "same process duplicate");
            s.update("m1", NOW + 2, |r| r.acked = true)?;
            let (before, after) = s.update("m2", NOW + 3, |r| r.native_push = true)?;
            assert_eq!(before, None);
            assert_eq!(after.first_seen_ms, NOW + 3);
            s.set_meta("push_service", Some("fcm"))?;
        }
        let s = Store::open(&path, NOW + 10)?;
        assert_eq!(s.claim("m1", NOW + 10)?, None, "seen before the restart");
        assert_eq!(s.claim("m2", NOW + 10)?, None, "noted from a native push");
        assert_eq!(s.claim("m3", NOW + 10)?, Some(NOW + 10));
        let m1 = s.get("m1")?.ok_or(ClientError::Closed)?;
        assert_eq!(
            m1,
            MessageState {
                first_seen_ms: NOW,
                acked: true,
                ..Default::default()
            }
        );
        assert_eq!(s.meta("push_service")?.as_deref(), Some("fcm"));
        s.set_meta("push_service", None)?;
        assert_eq!(s.meta("push_service")?, None);
        Ok(())
    }

    #[test]
    fn old_records_are_pruned_on_open() -> Result<(), ClientError> {
        let dir = TempDir::new();
        let path = dir.0.join("s.redb");
        {
            let s = Store::open(&path, NOW)?;
            s.claim("old", NOW)?;
            s.claim("recent", NOW + RETENTION_MS)?;
        }
        let s = Store::open(&path, NOW + RETENTION_MS + 1)?;
        assert_eq!(s.get("old")?, None);
        assert!(s.get("recent")?.is_some());
        Ok(())
    }

    #[test]
    fn record_encoding_round_trips() -> Result<(), ClientError> {
        let r = MessageState {
            first_seen_ms: u64::MAX - 7,
            acked: true,
            read: false,
            native_push: true,
            retracted: true,
        };
        assert_eq!(MessageState::decode(&r.encode())?, r);
        assert!(MessageState::decode(&[2, 0, 0]).is_err());
        assert!(MessageState::decode(&[]).is_err());
        Ok(())
    }
}
