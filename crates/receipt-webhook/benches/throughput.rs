//! Events per second from the event stream to a local webhook receiver, through the real
//! service (NATS JetStream consumer, per-app workers, signing, HTTP). Not a test: it prints
//! figures for docs/benchmarks.md.
//!
//! `cargo bench -p receipt-webhook --bench throughput` (env: BENCH_EVENTS, default 200000;
//! BENCH_APPS, default 20; BENCH_BATCH, default 100; NATS/Redis from PUSHGATE_TEST_NATS_URL /
//! PUSHGATE_TEST_REDIS_URL or the local defaults).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pushgate_bus::Bus;
use pushgate_core::event::{BusEvent, Event, EventKind};
use pushgate_core::{App, Status, WebhookConfig};
use pushgate_runtime::Metrics;
use pushgate_store::Store;
use receipt_webhook::{Service, Settings, WebhookSettings};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let events = env_num("BENCH_EVENTS", 200_000);
    let apps = env_num("BENCH_APPS", 20).max(1);
    let batch = env_num("BENCH_BATCH", 100);
    let nats =
        std::env::var("PUSHGATE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let redis = std::env::var("PUSHGATE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let ns = format!("wb{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let bus = Bus::connect(&nats, &ns).await?;
    let store = Store::connect(&redis, &ns).await?;

    // the receiver: counts events, answers 204
    let received = Arc::new(AtomicU64::new(0));
    let r2 = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let r2 = r2.clone();
            async move {
                let n = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["events"].as_array().map(|a| a.len()))
                    .unwrap_or(0);
                r2.fetch_add(n as u64, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let now = pushgate_core::time::now_ms();
    let app_ids: Vec<String> = (0..apps)
        .map(|_| pushgate_core::AppId::generate().0)
        .collect();
    for id in &app_ids {
        store
            .create_app(&App {
                app_id: id.clone(),
                name: "bench".into(),
                webhook: Some(WebhookConfig {
                    url: url.clone(),
                    secret: "bench-secret-0123456789".into(),
                    previous_secret: None,
                    previous_until: None,
                }),
                providers: Default::default(),
                sms: None,
                api_key_hash: format!("bench-{id}"),
                created_at: now,
                updated_at: now,
            })
            .await?;
    }

    // the backlog: `events` status events spread over the apps, published with many acks in flight
    let t_pub = Instant::now();
    let js = bus.jetstream().clone();
    let mut acks = Vec::with_capacity(1024);
    for i in 0..events {
        let app = &app_ids[i % apps];
        let msg = format!("{:08x}-0000-7000-8000-{:012x}", i / 3, i);
        let seq = (i % 3) as u32 + 1;
        let ev = BusEvent {
            app_id: app.clone(),
            seq,
            event: Event {
                id: format!("{msg}.{seq}"),
                event: EventKind::Status(
                    [Status::Enqueued, Status::Sent, Status::Delivered][seq as usize - 1],
                ),
                message_id: Some(msg),
                foreign_id: None,
                user_id: Some("bench-user".into()),
                device_id: Some("bench-device".into()),
                channel: Some("xmpp".into()),
                at: pushgate_core::time::rfc3339(now),
                detail: None,
                text: None,
                data: None,
            },
        };
        let body = serde_json::to_vec(&ev)?;
        acks.push(js.publish(bus.names().events(app), body.into()).await?);
        if acks.len() >= 1024 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks.drain(..) {
        a.await?;
    }
    let pub_secs = t_pub.elapsed().as_secs_f64();

    // deliver the backlog
    let settings = Settings {
        common: Default::default(),
        webhook: WebhookSettings {
            max_batch: batch,
            max_delay_ms: 50,
            ..Default::default()
        },
    };
    let svc = Service::build(settings, Metrics::new(), bus.clone(), store.clone()).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let sd = stop.clone();
    let t0 = Instant::now();
    let run = tokio::spawn(async move { svc.run_until(sd).await });
    let deadline = t0 + Duration::from_secs(600);
    while (received.load(Ordering::Relaxed) as usize) < events && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    stop.cancel();
    let _ = run.await;
    println!(
        "receipt-webhook: {got}/{events} events to a local receiver in {secs:.2} s = {:.0} events/s \
         ({apps} apps, max_batch {batch}); backlog published at {:.0} events/s",
        got as f64 / secs,
        events as f64 / pub_secs
    );
    bus.delete_namespace().await?;
    store.delete_namespace().await?;
    Ok(())
}
