//! The bench's webhook receiver: plain HTTP on loopback, checks each batch's signature, counts
//! events by kind and records when each message's `delivered` event arrived.
//!
//! It answers 2xx to everything it can read, even a batch with a bad signature (counted as an
//! error): a non-2xx answer would make the service retry the batch for a day and the run would
//! measure retries instead of throughput.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::tracker::{key, Errors, Tracker};

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    events: Vec<Event<'a>>,
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    message_id: Option<Cow<'a, str>>,
}

struct Hook {
    secret: String,
    tracker: Arc<Tracker>,
    errors: Arc<Errors>,
    kinds: Mutex<BTreeMap<String, u64>>,
    batches: AtomicU64,
}

/// The running receiver.
pub struct Receiver {
    pub url: String,
    hook: Arc<Hook>,
    stop: CancellationToken,
}

async fn receive(State(hook): State<Arc<Hook>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let at = Instant::now();
    hook.batches.fetch_add(1, Ordering::Relaxed);
    let signature = headers
        .get("pushgate-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !pushgate_testkit::webhook::verify_signature(signature, &hook.secret, &body) {
        hook.errors.add("webhook-bad-signature");
    }
    let batch: Batch<'_> = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(_) => {
            hook.errors.add("webhook-malformed-batch");
            return StatusCode::NO_CONTENT;
        }
    };
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for ev in &batch.events {
        *counts.entry(ev.event.as_ref()).or_default() += 1;
        if ev.event == "delivered" {
            match ev.message_id.as_deref().and_then(key) {
                Some(id) => {
                    hook.tracker.confirmed(id, at);
                }
                None => hook.errors.add("webhook-event-without-message-id"),
            }
        }
    }
    if let Ok(mut k) = hook.kinds.lock() {
        for (kind, n) in counts {
            *k.entry(kind.to_string()).or_default() += n;
        }
    }
    StatusCode::NO_CONTENT
}

impl Receiver {
    /// Starts listening on `listen` (e.g. `127.0.0.1:0`).
    pub async fn start(
        listen: &str,
        secret: String,
        tracker: Arc<Tracker>,
        errors: Arc<Errors>,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("webhook receiver cannot listen on {listen}"))?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let hook = Arc::new(Hook {
            secret,
            tracker,
            errors,
            kinds: Mutex::new(BTreeMap::new()),
            batches: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(hook.clone());
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        Ok(Receiver { url, hook, stop })
    }

    /// Events received so far, by kind (duplicates included).
    pub fn kinds(&self) -> BTreeMap<String, u64> {
        self.hook
            .kinds
            .lock()
            .map(|k| k.clone())
            .unwrap_or_default()
    }

    /// Batches received so far.
    pub fn batches(&self) -> u64 {
        self.hook.batches.load(Ordering::Relaxed)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
