//! bridge-bench: notifications per second through the bridge's APNs client (token auth,
//! HTTP/2 over TLS, one multiplexed connection) to the in-process APNs stand-in, which checks
//! every request (provider token, headers, payload) as in the tests.
//!
//! `cargo run --release -p native-push-bridge --features stand-ins --bin bridge-bench -- [COUNT] [CONCURRENCY]`
//! (defaults 200000 and 256). Client and stand-in share the process and its cores, so the
//! figure is a lower bound for the client alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use native_push_bridge::clients::apns::ApnsProvider;
use native_push_bridge::clients::HttpConfig;
use native_push_bridge::testing::{ApnsStandIn, Pki};
use native_push_bridge::{
    AppCredentials, BridgeSettings, Notification, NotificationKind, Provider,
};
use pushgate_core::{Device, Platform, Priority, ScramCredentials, TokenState};
use serde_json::json;

/// Requests before the measurement: connection setup, first token, allocator warm-up.
const WARM_UP: u64 = 2_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let count: u64 = match args.next() {
        Some(a) => a.parse().context("COUNT must be a number")?,
        None => 200_000,
    };
    let concurrency: u64 = match args.next() {
        Some(a) => a.parse().context("CONCURRENCY must be a number")?,
        None => 256,
    };
    if count == 0 || concurrency == 0 {
        bail!("COUNT and CONCURRENCY must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("pushgate-bridge-bench-{}", std::process::id()));
    let outcome = run(&dir, count, concurrency).await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

async fn run(dir: &std::path::Path, count: u64, concurrency: u64) -> anyhow::Result<()> {
    let pki = Pki::create(dir)?;
    let standin = ApnsStandIn::start(&pki).await?;
    standin.quiet();
    let settings = BridgeSettings {
        apns_url: standin.url.clone(),
        extra_ca_files: vec![pki.ca_file.clone()],
        ..BridgeSettings::default()
    };
    let http = HttpConfig::load(&settings).await?;
    let provider = Arc::new(ApnsProvider::new(
        http,
        &settings.apns_url,
        &settings.apns_sandbox_url,
    ));
    let key = standin.new_team_key("TEAMBENCH1", "KEYBENCH01");
    let creds = Arc::new(json!({
        "bundle_id": "com.example.bench",
        "team_id": "TEAMBENCH1",
        "key_id": "KEYBENCH01",
        "private_key": key,
    }));
    let device = Arc::new(device());

    let failures = Arc::new(AtomicU64::new(0));
    blast(&provider, &creds, &device, WARM_UP, concurrency, &failures).await;
    let started = Instant::now();
    blast(&provider, &creds, &device, count, concurrency, &failures).await;
    let elapsed = started.elapsed();

    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} notifications were not accepted");
    }
    let accepted = standin.accepted();
    if accepted != count + WARM_UP {
        bail!(
            "the stand-in accepted {accepted}, expected {}",
            count + WARM_UP
        );
    }
    println!(
        "{count} notifications, {concurrency} in flight over one HTTP/2 connection, {:.2} s: {:.0} notifications/s",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

/// Sends `count` notifications with `concurrency` tasks taking the next number until none
/// is left.
async fn blast(
    provider: &Arc<ApnsProvider>,
    creds: &Arc<serde_json::Value>,
    device: &Arc<Device>,
    count: u64,
    concurrency: u64,
    failures: &Arc<AtomicU64>,
) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (provider, creds, device, next, failures) = (
            provider.clone(),
            creds.clone(),
            device.clone(),
            next.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let n = Notification {
                    kind: NotificationKind::Channel,
                    message_id: uuid::Uuid::now_v7().to_string(),
                    title: Some("Parcel".into()),
                    text: "Your parcel is here".into(),
                    data: Some(json!({"parcel": 7})),
                    priority: Priority::High,
                    collapse_key: None,
                    expires_at: pushgate_core::time::now_ms() + 3_600_000,
                };
                let app = AppCredentials {
                    app_id: "app_bench",
                    version: 1,
                    creds: &creds,
                };
                if let Err(e) = provider.send(app, &device, &n).await {
                    if failures.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("first failure: {e}");
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn device() -> Device {
    Device {
        app_id: "app_bench".into(),
        device_id: "bench-phone".into(),
        user_id: "bench-user".into(),
        platform: Platform::Ios,
        push_token: Some("a1".repeat(32)),
        webpush: None,
        phone: None,
        locale: None,
        jid_local: "bench".into(),
        generation: 0,
        token_state: TokenState::Valid,
        scram: ScramCredentials {
            salt: String::new(),
            iterations: 4096,
            stored_key: String::new(),
            server_key: String::new(),
        },
        created_at: 0,
        updated_at: 0,
    }
}
