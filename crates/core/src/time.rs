//! Time as Pushgate stores and shows it: milliseconds since the Unix epoch inside, RFC 3339
//! (UTC, millisecond precision) on the wire.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let now = OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Formats epoch milliseconds as RFC 3339 in UTC, e.g. `2026-11-22T20:09:04.123Z`.
pub fn rfc3339(ms: i64) -> String {
    const FMT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(FMT).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Parses an RFC 3339 timestamp into epoch milliseconds.
pub fn parse_rfc3339(s: &str) -> Result<i64, time::error::Parse> {
    let t = OffsetDateTime::parse(s, &Rfc3339)?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let ms = 1_795_000_000_123;
        let s = rfc3339(ms);
        assert!(s.ends_with(".123Z"), "{s}");
        assert_eq!(parse_rfc3339(&s).ok(), Some(ms));
        assert!(parse_rfc3339("yesterday").is_err());
    }
}
