//! The SMS send record `{ns}:sms:{message}`: what makes "never two SMS for one message" hold
//! with redelivered requests, duplicate requests and several instances.
//!
//! Before calling the provider an attempt claims the record with `SET NX`
//! (`sending:<instance>:<ms>`); whoever holds the claim is the only one talking to the
//! provider about that message. The claim ends as `sent:<reference>` (the provider took it:
//! later requests only re-apply `sms_sent`), `rejected:<detail>` (the provider refused it:
//! later requests only re-apply `sms_failed`), or is deleted after a temporary failure so the
//! retry can claim it again. A claim older than [`STALE_CLAIM_MS`] belongs to an attempt that
//! died in the middle of the call; see [`crate::worker`] for how that is resolved.

use pushgate_store::redis::{self, Script};
use pushgate_store::{Store, StoreError};

/// How long the record lives: longer than any message's fallback deadline, so a late
/// duplicate request still finds it.
pub const RECORD_TTL_SECS: u64 = 7 * 86_400;

/// Age after which a `sending:` claim is presumed dead. Far above the provider timeout (at
/// most 12 s), so a live attempt is never mistaken for a dead one.
pub const STALE_CLAIM_MS: i64 = 60_000;

/// Replaces the record only if it still holds the expected value, keeping its TTL: exactly one
/// of several instances finding the same dead claim takes it over.
const TAKE_OVER: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"#;

/// A decoded send record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendRecord {
    /// An attempt holds the claim since `at_ms`.
    Sending { instance: String, at_ms: i64 },
    /// The provider took the SMS; the reference may be empty (provider gave none).
    Sent { reference: String },
    /// The provider refused the SMS.
    Rejected { detail: String },
    /// A value this version does not understand (written by a newer one, or damaged).
    Unreadable(String),
}

impl SendRecord {
    /// Decodes a stored value.
    pub fn parse(raw: &str) -> SendRecord {
        if let Some(reference) = raw.strip_prefix("sent:") {
            return SendRecord::Sent {
                reference: reference.to_string(),
            };
        }
        if let Some(detail) = raw.strip_prefix("rejected:") {
            return SendRecord::Rejected {
                detail: detail.to_string(),
            };
        }
        if let Some(rest) = raw.strip_prefix("sending:") {
            // the instance id has no ':'; the time is the last field
            if let Some((instance, at)) = rest.rsplit_once(':') {
                if let Ok(at_ms) = at.parse() {
                    return SendRecord::Sending {
                        instance: instance.to_string(),
                        at_ms,
                    };
                }
            }
        }
        SendRecord::Unreadable(raw.to_string())
    }

    /// The stored form.
    pub fn encode(&self) -> String {
        match self {
            SendRecord::Sending { instance, at_ms } => format!("sending:{instance}:{at_ms}"),
            SendRecord::Sent { reference } => format!("sent:{reference}"),
            SendRecord::Rejected { detail } => format!("rejected:{detail}"),
            SendRecord::Unreadable(raw) => raw.clone(),
        }
    }
}

/// Redis access to the send records.
#[derive(Clone)]
pub struct Records {
    store: Store,
    take_over: Script,
    compare_and_delete: Script,
}

impl Records {
    pub fn new(store: Store) -> Self {
        Records {
            store,
            take_over: Script::new(TAKE_OVER),
            compare_and_delete: Script::new(pushgate_store::scripts::COMPARE_AND_DELETE),
        }
    }

    fn key(&self, message_id: &str) -> String {
        self.store.keys().sms_record(message_id)
    }

    /// The raw record, if any.
    pub async fn read(&self, message_id: &str) -> Result<Option<String>, StoreError> {
        let v: Option<String> = redis::cmd("GET")
            .arg(self.key(message_id))
            .query_async(&mut self.store.conn())
            .await?;
        Ok(v)
    }

    /// Claims the record; false when it exists already.
    pub async fn claim(&self, message_id: &str, value: &str) -> Result<bool, StoreError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key(message_id))
            .arg(value)
            .arg("NX")
            .arg("EX")
            .arg(RECORD_TTL_SECS)
            .query_async(&mut self.store.conn())
            .await?;
        Ok(set.is_some())
    }

    /// Takes over a dead claim (`expected` is its exact raw value); false when another attempt
    /// changed it first.
    pub async fn take_over(
        &self,
        message_id: &str,
        expected: &str,
        value: &str,
    ) -> Result<bool, StoreError> {
        let n: i64 = self
            .take_over
            .key(self.key(message_id))
            .arg(expected)
            .arg(value)
            .invoke_async(&mut self.store.conn())
            .await?;
        Ok(n == 1)
    }

    /// Writes the final record of an attempt.
    pub async fn finish(&self, message_id: &str, record: &SendRecord) -> Result<(), StoreError> {
        let _: () = redis::cmd("SET")
            .arg(self.key(message_id))
            .arg(record.encode())
            .arg("EX")
            .arg(RECORD_TTL_SECS)
            .query_async(&mut self.store.conn())
            .await?;
        Ok(())
    }

    /// Drops this attempt's claim (only if it is still ours) so a retry can claim again.
    pub async fn release(&self, message_id: &str, own: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .compare_and_delete
            .key(self.key(message_id))
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
            SendRecord::Sending {
                instance: "sms-abc".into(),
                at_ms: 1_700_000_000_000,
            },
            SendRecord::Sent {
                reference: "SM:1:2".into(),
            },
            SendRecord::Sent {
                reference: String::new(),
            },
            SendRecord::Rejected {
                detail: "provider refused the SMS: HTTP 400".into(),
            },
        ] {
            assert_eq!(SendRecord::parse(&r.encode()), r);
        }
    }

    #[test]
    fn unknown_values_are_unreadable_not_guessed() {
        assert_eq!(
            SendRecord::parse("sending:x:notatime"),
            SendRecord::Unreadable("sending:x:notatime".into())
        );
        assert_eq!(
            SendRecord::parse("whatever"),
            SendRecord::Unreadable("whatever".into())
        );
        assert_eq!(SendRecord::parse("whatever").encode(), "whatever");
    }
}
