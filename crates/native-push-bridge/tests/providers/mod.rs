//! The real protocol clients, registered by `Service::build`, against the stand-ins: what
//! reaches the stand-in (verified signatures, headers, decrypted payloads) and how each
//! documented answer of each provider ends (status, detail, token state, metrics).

mod apns;
mod fcm;
mod hms;
mod webpush;

use std::path::Path;
use std::sync::OnceLock;

use native_push_bridge::testing::Pki;
use native_push_bridge::BridgeSettings;
use pushgate_core::Status;

use crate::{last, test_settings, Env};

/// The stand-ins' development CA and server certificate, made once per test process.
fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        Pki::create(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("bridge-stand-in-pki"))
            .expect("stand-in PKI")
    })
}

/// Test settings whose provider connections trust the stand-ins' CA.
fn settings() -> BridgeSettings {
    BridgeSettings {
        extra_ca_files: vec![pki().ca_file.clone()],
        ..test_settings()
    }
}

impl Env {
    /// Stores a message for `device_id` and asks the bridge for its `channel` push.
    async fn channel_push(&self, app_id: &str, device_id: &str) -> String {
        let id = self.message(app_id, &[device_id], 3_600_000).await;
        self.push(
            app_id,
            &id,
            device_id,
            "channel",
            &format!("{id}.{device_id}.push"),
        )
        .await;
        id
    }

    /// Waits until the message failed on `channel` and checks the detail.
    async fn expect_failed(&self, id: &str, channel: &str, detail: &str) {
        let s = self.wait_status(id, Status::Failed).await;
        assert_eq!(last(&s).channel.as_deref(), Some(channel));
        assert_eq!(last(&s).detail.as_deref(), Some(detail), "{id}");
    }

    /// Waits until the message was sent on `channel` and returns the reference in the detail.
    async fn expect_sent(&self, id: &str, channel: &str) -> String {
        let s = self.wait_status(id, Status::Sent).await;
        assert_eq!(last(&s).channel.as_deref(), Some(channel));
        assert_eq!(crate::sent_count(&s), 1);
        let detail = last(&s).detail.clone().unwrap_or_default();
        detail
            .strip_prefix("ref ")
            .map(str::to_string)
            .unwrap_or_else(|| panic!("sent without a reference: {detail:?}"))
    }
}
