//! Identifiers.
//!
//! Ids that Pushgate mints (apps, messages, events) are UUIDs: message ids are UUIDv7, so
//! they sort by acceptance time, which the per-device pending queues rely on for ordering ties.
//! Ids that backends choose (users, devices, foreign ids) are validated strings: bounded length
//! and a conservative alphabet, because they end up in Redis keys, NATS headers and logs.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest backend-chosen id accepted (user, device, foreign id, idempotency key).
pub const MAX_EXTERNAL_ID_LEN: usize = 128;

/// Why a backend-chosen id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_EXTERNAL_ID_LEN} bytes, got {0}")]
    TooLong(usize),
    #[error("may only contain letters, digits and . _ - @ + : (found {0:?})")]
    BadChar(char),
}

/// Checks a backend-chosen id: 1..=128 bytes of `[A-Za-z0-9._\-@+:]`.
pub fn validate_external_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_EXTERNAL_ID_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+' | ':')))
    {
        return Err(IdError::BadChar(c));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
    };
}

string_id!(
    /// An app (a tenant): `app_` followed by 26 lowercase hex characters.
    AppId
);
string_id!(
    /// A message, one per recipient: a UUIDv7, time-ordered.
    MessageId
);
string_id!(
    /// A user, chosen by the backend.
    UserId
);
string_id!(
    /// A device, chosen by the backend; unique within an app.
    DeviceId
);
string_id!(
    /// A status or reply event. Status events have the deterministic id
    /// `{message_id}.{seq}` so a republished event is recognisably the same event.
    EventId
);

impl AppId {
    /// A fresh random app id.
    pub fn generate() -> Self {
        let u = uuid::Uuid::new_v4().simple().to_string();
        Self(format!("app_{}", &u[..26]))
    }

    /// Whether the text has the shape of an app id (guards key construction).
    pub fn is_well_formed(s: &str) -> bool {
        s.len() == 30
            && s.starts_with("app_")
            && s[4..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

impl MessageId {
    /// A fresh message id (UUIDv7).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// Whether the text is a UUID in canonical form (guards key construction and lookups).
    pub fn is_well_formed(s: &str) -> bool {
        s.len() == 36 && uuid::Uuid::parse_str(s).is_ok()
    }
}

impl EventId {
    /// The id of the `seq`-th status event of a message.
    pub fn for_status(message: &MessageId, seq: u32) -> Self {
        Self(format!("{message}.{seq}"))
    }

    /// A fresh id for an event that is not a status change (a device reply).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_ids() {
        assert!(validate_external_id("user-42@example.com").is_ok());
        assert_eq!(validate_external_id(""), Err(IdError::Empty));
        assert_eq!(validate_external_id("a b"), Err(IdError::BadChar(' ')));
        assert_eq!(validate_external_id("a{b"), Err(IdError::BadChar('{')));
        assert_eq!(
            validate_external_id(&"x".repeat(129)),
            Err(IdError::TooLong(129))
        );
    }

    #[test]
    fn minted_ids_are_well_formed() {
        assert!(AppId::is_well_formed(AppId::generate().as_str()));
        assert!(MessageId::is_well_formed(MessageId::generate().as_str()));
        assert!(!AppId::is_well_formed("app_../../etc"));
        assert!(!MessageId::is_well_formed("not-a-uuid"));
    }

    #[test]
    fn message_ids_sort_by_time() {
        let a = MessageId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = MessageId::generate();
        assert!(a < b);
    }
}
