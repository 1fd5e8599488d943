//! `Pushgate-Signature` for SMS provider calls and delivery reports.
//!
//! The scheme is the one backends already know from webhooks: `t=<unix seconds>,v1=<hex>`
//! where the hex is `HMAC-SHA256(secret, "<t>.<body>")`. Signing the timestamp with the exact
//! body bytes lets the receiver verify what it received and refuse replays from long ago.
//! Both directions use the app's SMS secret: Pushgate signs the requests it sends to the
//! provider, and the provider signs the delivery reports it sends back.

use pushgate_core::credentials::hmac_sha256;
use subtle::ConstantTimeEq;

/// The header name.
pub const HEADER: &str = "Pushgate-Signature";

/// How far a signed timestamp may be from now (either way) and still be accepted. Bounds the
/// window in which a captured request can be replayed.
pub const MAX_SKEW_SECS: i64 = 300;

/// Hex HMAC-SHA256 of `"<t>.<body>"` under `secret`.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let mut signed = Vec::with_capacity(body.len() + 21);
    signed.extend_from_slice(t.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    hex::encode(hmac_sha256(secret.as_bytes(), &signed))
}

/// The header value for `body` signed at `t`.
pub fn header_value(secret: &str, t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", sign(secret, t, body))
}

/// Why a signature was not accepted. The text is safe to show the caller: it says which rule
/// failed, never anything about the expected value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing Pushgate-Signature header")]
    Missing,
    #[error("malformed Pushgate-Signature header")]
    Malformed,
    #[error("signature timestamp is more than 5 minutes away from now")]
    Stale,
    #[error("signature does not match")]
    Mismatch,
}

/// Checks a `Pushgate-Signature` value against `body` at `now_secs`. Any of several `v1=`
/// values may match (a sender rotating its secret sends one per secret).
pub fn verify(
    secret: &str,
    header: Option<&str>,
    body: &[u8],
    now_secs: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut t: Option<i64> = None;
    let mut candidates: Vec<&str> = Vec::new();
    for part in header.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match k {
            "t" => t = Some(v.parse().map_err(|_| SignatureError::Malformed)?),
            "v1" => candidates.push(v),
            // unknown schemes are ignored so a sender can add a new one before receivers know it
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if candidates.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now_secs - t).abs() > MAX_SKEW_SECS {
        return Err(SignatureError::Stale);
    }
    let expected = sign(secret, t, body);
    // constant-time, so response timing does not reveal how many leading characters matched
    let ok = candidates.iter().fold(false, |acc, c| {
        acc | bool::from(c.as_bytes().ct_eq(expected.as_bytes()))
    });
    if ok {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_matches_an_independent_implementation() {
        // Python: hmac.new(b"whsec_test", b'1700000000.{"events":[]}', hashlib.sha256).hexdigest()
        assert_eq!(
            sign("whsec_test", 1_700_000_000, b"{\"events\":[]}"),
            "4f6f9b7a41398ad124e52a1320534f978e522923f3f2b2724e31d7a9dbf78a7f"
        );
    }

    #[test]
    fn a_fresh_correct_signature_verifies() {
        let h = header_value("s3cret", 1_700_000_000, b"body");
        assert_eq!(verify("s3cret", Some(&h), b"body", 1_700_000_000), Ok(()));
        assert_eq!(
            verify("s3cret", Some(&h), b"body", 1_700_000_000 + MAX_SKEW_SECS),
            Ok(())
        );
    }

    #[test]
    fn wrong_secret_body_or_signature_is_a_mismatch() {
        let h = header_value("s3cret", 1_700_000_000, b"body");
        assert_eq!(
            verify("other", Some(&h), b"body", 1_700_000_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("s3cret", Some(&h), b"bodY", 1_700_000_000),
            Err(SignatureError::Mismatch)
        );
        let forged = format!("t=1700000000,v1={}", "0".repeat(64));
        assert_eq!(
            verify("s3cret", Some(&forged), b"body", 1_700_000_000),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn old_and_future_timestamps_are_refused() {
        let h = header_value("s3cret", 1_700_000_000, b"body");
        let late = 1_700_000_000 + MAX_SKEW_SECS + 1;
        assert_eq!(
            verify("s3cret", Some(&h), b"body", late),
            Err(SignatureError::Stale)
        );
        let early = 1_700_000_000 - MAX_SKEW_SECS - 1;
        assert_eq!(
            verify("s3cret", Some(&h), b"body", early),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn any_of_several_v1_values_may_match() {
        let good = sign("s3cret", 1_700_000_000, b"body");
        let h = format!("t=1700000000,v1={},v1={good}", "f".repeat(64));
        assert_eq!(verify("s3cret", Some(&h), b"body", 1_700_000_000), Ok(()));
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert_eq!(verify("s", None, b"", 0), Err(SignatureError::Missing));
        for h in ["", "garbage", "t=abc,v1=00", "v1=00", "t=5", "t=5;v1=00"] {
            assert_eq!(
                verify("s", Some(h), b"", 5),
                Err(SignatureError::Malformed),
                "{h:?}"
            );
        }
    }
}
