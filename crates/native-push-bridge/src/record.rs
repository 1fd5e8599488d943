//! The push record `{ns}:push:{message}:{device}`: what keeps a redelivered or duplicated
//! [`PushRequest`](pushgate_bus::payloads::PushRequest) from pushing twice.
//!
//! An attempt claims the record with `SET NX` (`sending:<instance>:<ms>`) before calling the
//! provider, and ends it with the outcome: `sent:<ref>`, `invalid:<detail>` (dead token),
//! `failed:<detail>` (permanent refusal or rejected credentials), `unknown:<detail>` (the push
//! may be out). A later request for the same push finds the outcome and only re-applies its
//! consequences. After a retryable failure the claim is deleted so the retry can claim again.
//! The record lives until a day after the message expires, longer than any redelivery.

use pushgate_store::redis;
use pushgate_store::redis::Script;
use pushgate_store::{Store, StoreError};

/// Age after which a `sending:` claim is presumed dead: far above the send timeout (at most
/// 12 s), so a live attempt is never mistaken for a dead one.
pub const STALE_CLAIM_MS: i64 = 60_000;

/// How long after the message's expiry the record is kept.
pub const KEEP_AFTER_EXPIRY_MS: i64 = 86_400_000;

/// A decoded push record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushRecord {
    Sending {
        instance: String,
        at_ms: i64,
    },
    Sent {
        reference: String,
    },
    /// The provider said the token is dead.
    Invalid {
        detail: String,
    },
    /// Refused for good (the `failed` detail is kept to re-apply it).
    Failed {
        detail: String,
    },
    /// The attempt's outcome could not be learnt; never repeated.
    Unknown {
        detail: String,
    },
    /// A value this version does not understand.
    Unreadable(String),
}

impl PushRecord {
    /// Decodes a stored value.
    pub fn parse(raw: &str) -> PushRecord {
        let Some((tag, rest)) = raw.split_once(':') else {
            return PushRecord::Unreadable(raw.to_string());
        };
        match tag {
            "sent" => PushRecord::Sent {
                reference: rest.to_string(),
            },
            "invalid" => PushRecord::Invalid {
                detail: rest.to_string(),
            },
            "failed" => PushRecord::Failed {
                detail: rest.to_string(),
            },
            "unknown" => PushRecord::Unknown {
                detail: rest.to_string(),
            },
            "sending" => match rest
                .rsplit_once(':')
                .and_then(|(i, at)| at.parse().ok().map(|at| (i, at)))
            {
                Some((instance, at_ms)) => PushRecord::Sending {
                    instance: instance.to_string(),
                    at_ms,
                },
                None => PushRecord::Unreadable(raw.to_string()),
            },
            _ => PushRecord::Unreadable(raw.to_string()),
        }
    }

    /// The stored form.
    pub fn encode(&self) -> String {
        match self {
            PushRecord::Sending { instance, at_ms } => format!("sending:{instance}:{at_ms}"),
            PushRecord::Sent { reference } => format!("sent:{reference}"),
            PushRecord::Invalid { detail } => format!("invalid:{detail}"),
            PushRecord::Failed { detail } => format!("failed:{detail}"),
            PushRecord::Unknown { detail } => format!("unknown:{detail}"),
            PushRecord::Unreadable(raw) => raw.clone(),
        }
    }
}

/// Upper bound of the record's life; Redis refuses expiry times that overflow its clock, and
/// no message lives anywhere near this long.
const MAX_TTL_SECS: u64 = 366 * 86_400;

/// Seconds the record must live: until a day after `expires_at`, at least a minute, at most
/// [`MAX_TTL_SECS`].
pub fn ttl_secs(expires_at: i64, now_ms: i64) -> u64 {
    let until = expires_at.saturating_add(KEEP_AFTER_EXPIRY_MS);
    u64::try_from(until.saturating_sub(now_ms) / 1000)
        .unwrap_or(0)
        .clamp(60, MAX_TTL_SECS)
}

/// Redis access to push records.
#[derive(Clone)]
pub struct Records {
    store: Store,
    compare_and_delete: Script,
}

impl Records {
    pub fn new(store: Store) -> Self {
        Records {
            store,
            compare_and_delete: Script::new(pushgate_store::scripts::COMPARE_AND_DELETE),
        }
    }

    /// The raw record.
    pub async fn read(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.store.conn())
            .await?)
    }

    /// Claims the record for `ttl` seconds; false when it exists.
    pub async fn claim(&self, key: &str, value: &str, ttl: u64) -> Result<bool, StoreError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .arg("EX")
            .arg(ttl)
            .query_async(&mut self.store.conn())
            .await?;
        Ok(set.is_some())
    }

    /// Writes an attempt's outcome.
    pub async fn finish(&self, key: &str, record: &PushRecord, ttl: u64) -> Result<(), StoreError> {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(record.encode())
            .arg("EX")
            .arg(ttl)
            .query_async(&mut self.store.conn())
            .await?;
        Ok(())
    }

    /// Drops this attempt's claim, if it is still ours.
    pub async fn release(&self, key: &str, own: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .compare_and_delete
            .key(key)
            .arg(own)
            .invoke_async(&mut self.store.conn())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        for r in [
            PushRecord::Sending {
                instance: "bridge-1".into(),
                at_ms: 5,
            },
            PushRecord::Sent {
                reference: "projects/x/messages/1:2".into(),
            },
            PushRecord::Sent {
                reference: String::new(),
            },
            PushRecord::Invalid {
                detail: "Unregistered".into(),
            },
            PushRecord::Failed {
                detail: "payload too large: 5000 bytes".into(),
            },
            PushRecord::Unknown {
                detail: "timed out".into(),
            },
        ] {
            assert_eq!(PushRecord::parse(&r.encode()), r);
        }
        assert_eq!(
            PushRecord::parse("sending:x:y"),
            PushRecord::Unreadable("sending:x:y".into())
        );
        assert_eq!(
            PushRecord::parse("bogus"),
            PushRecord::Unreadable("bogus".into())
        );
    }

    #[test]
    fn ttl_covers_a_day_past_expiry() {
        assert_eq!(ttl_secs(10_000, 0), 86_410);
        // an expired message still keeps its record for the rest of the day
        assert_eq!(ttl_secs(0, 3_600_000), 82_800);
        assert_eq!(ttl_secs(0, 10 * 86_400_000), 60);
        assert_eq!(ttl_secs(i64::MAX, 0), MAX_TTL_SECS);
    }
}
