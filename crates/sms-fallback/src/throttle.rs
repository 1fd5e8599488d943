//! The per-app send rate limit (`max_per_second` in the app's `sms` settings).
//!
//! SMS accounts have a send rate (Twilio queues or refuses beyond it, a Kannel SMSC link has a
//! throughput); a burst of expiries must not turn into a burst of refusals. The limit is a
//! fixed one-second window counted in Redis with the store's `count_request`, so it holds over
//! all sms-fallback instances together. The counter is named [`window_name`], which puts it at
//! `{ns}:rate:sms.{app}:{second}`: in the store's rate-counter family, beside and never equal
//! to the public API's `{ns}:rate:{app}:{second}` (app ids start with `app_`).
//!
//! A request over the limit is not a failure: it goes back to JetStream with a delay that
//! ends in the next window ([`delay_to_next_window`]).

use std::time::Duration;

use pushgate_store::{Store, StoreError};

/// Longest extra delay on top of the wait for the next window: spreads the requests that were
/// held back together over the next window instead of sending them back all at once.
pub const MAX_SPREAD_MS: u64 = 250;

/// The name the app's window counter is kept under.
pub fn window_name(app_id: &str) -> String {
    format!("sms.{app_id}")
}

/// The delay that ends `0..=MAX_SPREAD_MS` ms (scaled by `jitter` ∈ [0, 1]) into the next
/// one-second window.
pub fn delay_to_next_window(now_ms: i64, jitter: f64) -> Duration {
    let into = u64::try_from(now_ms.rem_euclid(1000)).unwrap_or(0);
    let spread = (MAX_SPREAD_MS as f64 * jitter.clamp(0.0, 1.0)) as u64;
    Duration::from_millis(1000 - into + spread)
}

/// Takes one send slot of the app in the current second: `None` to go ahead, or the delay
/// after which to try again.
pub async fn admit(
    store: &Store,
    app_id: &str,
    max_per_second: u32,
    now_ms: i64,
    jitter: f64,
) -> Result<Option<Duration>, StoreError> {
    let second = now_ms.div_euclid(1000);
    let n = store.count_request(&window_name(app_id), second, 1).await?;
    if n <= u64::from(max_per_second) {
        Ok(None)
    } else {
        Ok(Some(delay_to_next_window(now_ms, jitter)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_ends_in_the_next_window() {
        assert_eq!(
            delay_to_next_window(1_700_000_000_000, 0.0),
            Duration::from_millis(1000)
        );
        assert_eq!(
            delay_to_next_window(1_700_000_000_999, 0.0),
            Duration::from_millis(1)
        );
        assert_eq!(
            delay_to_next_window(1_700_000_000_400, 1.0),
            Duration::from_millis(600 + MAX_SPREAD_MS)
        );
        assert_eq!(
            delay_to_next_window(1_700_000_000_400, 7.0),
            Duration::from_millis(600 + MAX_SPREAD_MS)
        );
    }

    #[test]
    fn the_window_never_shares_the_public_apis_counter() {
        let app = "app_0123456789abcdef0123456789";
        assert_eq!(window_name(app), "sms.app_0123456789abcdef0123456789");
        assert_ne!(window_name(app), app);
    }
}
