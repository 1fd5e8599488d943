//! `Pushgate-Signature`: how a receiver knows a batch comes from Pushgate and was not replayed
//! from long ago.
//!
//! The signed text is `"<t>.<body>"` where `t` is the Unix time in seconds of the attempt, so a
//! receiver can refuse old timestamps (replays) and still verify the exact bytes it received.
//! During a secret rotation the header carries one `v1=` per valid secret, so receivers can
//! switch secrets at their own pace without rejecting batches.

use hmac::{Hmac, Mac};
use pushgate_core::WebhookConfig;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Hex HMAC-SHA256 of `"<t>.<body>"` under `secret`.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length (long keys are hashed, short ones padded), so this never
    // fails; the fallback keeps the function total without a panic path. An empty signature
    // never verifies, so the fallback fails closed.
    let Ok(mut mac) = HmacSha256::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The `Pushgate-Signature` value for `body` sent at `t` (Unix seconds):
/// `t=<t>,v1=<hex>` with the current secret, plus a second `,v1=<hex>` with the previous
/// secret while a rotation is in progress (`previous_until`, epoch ms, is after `now_ms`).
pub fn signature_header(webhook: &WebhookConfig, t: i64, now_ms: i64, body: &[u8]) -> String {
    let mut header = format!("t={t},v1={}", sign(&webhook.secret, t, body));
    if let (Some(previous), Some(until)) = (&webhook.previous_secret, webhook.previous_until) {
        if until > now_ms {
            header.push_str(",v1=");
            header.push_str(&sign(previous, t, body));
        }
    }
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(previous: Option<(&str, i64)>) -> WebhookConfig {
        WebhookConfig {
            url: "http://127.0.0.1:1/hook".into(),
            secret: "current-secret".into(),
            previous_secret: previous.map(|(s, _)| s.to_string()),
            previous_until: previous.map(|(_, u)| u),
        }
    }

    #[test]
    fn sign_matches_an_independent_implementation() {
        // computed with Python's hmac module:
        // hmac.new(b"whsec_test", b'1700000000.{"events":[]}', hashlib.sha256).hexdigest()
        assert_eq!(
            sign("whsec_test", 1_700_000_000, b"{\"events\":[]}"),
            "4f6f9b7a41398ad124e52a1320534f978e522923f3f2b2724e31d7a9dbf78a7f"
        );
    }

    #[test]
    fn signature_depends_on_time_secret_and_body() {
        let base = sign("s", 1, b"body");
        assert_eq!(base.len(), 64);
        assert!(base
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(base, sign("s", 2, b"body"));
        assert_ne!(base, sign("t", 1, b"body"));
        assert_ne!(base, sign("s", 1, b"bodY"));
    }

    #[test]
    fn header_has_one_v1_without_rotation() {
        let h = signature_header(&hook(None), 1_700_000_000, 1_700_000_000_000, b"x");
        assert_eq!(
            h,
            format!(
                "t=1700000000,v1={}",
                sign("current-secret", 1_700_000_000, b"x")
            )
        );
    }

    #[test]
    fn header_has_two_v1_during_rotation() {
        let now_ms = 1_700_000_000_000;
        let h = signature_header(
            &hook(Some(("old-secret", now_ms + 1))),
            1_700_000_000,
            now_ms,
            b"x",
        );
        let parts: Vec<&str> = h.split(',').collect();
        assert_eq!(parts.len(), 3, "{h}");
        assert_eq!(parts[0], "t=1700000000");
        assert_eq!(
            parts[1],
            format!("v1={}", sign("current-secret", 1_700_000_000, b"x"))
        );
        assert_eq!(
            parts[2],
            format!("v1={}", sign("old-secret", 1_700_000_000, b"x"))
        );
    }

    #[test]
    fn expired_rotation_is_not_signed() {
        let now_ms = 1_700_000_000_000;
        let h = signature_header(
            &hook(Some(("old-secret", now_ms))),
            1_700_000_000,
            now_ms,
            b"x",
        );
        assert_eq!(h.matches("v1=").count(), 1, "{h}");
        // a previous secret without an end date is not used either
        let mut open_ended = hook(None);
        open_ended.previous_secret = Some("old-secret".into());
        let h = signature_header(&open_ended, 1_700_000_000, now_ms, b"x");
        assert_eq!(h.matches("v1=").count(), 1, "{h}");
    }
}
