//! A local webhook receiver that records every batch (headers and body) and can be told to
//! fail, so tests see exactly what a backend would.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// One POST as received.
#[derive(Debug, Clone)]
pub struct Batch {
    pub signature: String,
    pub delivery: String,
    pub body: Vec<u8>,
    pub json: Value,
}

#[derive(Default)]
struct Inner {
    batches: Vec<Batch>,
}

/// The receiver.
pub struct Receiver {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    stop: CancellationToken,
}

async fn hook(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Ok(mut g) = inner.lock() {
        g.batches.push(Batch {
            signature: h("pushgate-signature"),
            delivery: h("pushgate-delivery"),
            body: body.to_vec(),
            json,
        });
    }
    StatusCode::NO_CONTENT
}

impl Receiver {
    /// Starts on an ephemeral port.
    pub async fn start() -> anyhow::Result<Self> {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(inner.clone());
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        Ok(Receiver { url, inner, stop })
    }

    /// Every batch so far.
    pub fn batches(&self) -> Vec<Batch> {
        self.inner
            .lock()
            .map(|g| g.batches.clone())
            .unwrap_or_default()
    }

    /// Every event so far, in arrival order.
    pub fn events(&self) -> Vec<Value> {
        self.batches()
            .iter()
            .flat_map(|b| b.json["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Waits until `pred` holds for the events received (generous deadline; no timing claim).
    pub async fn wait_for(
        &self,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ev = self.events();
            if pred(&ev) {
                return Ok(ev);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("webhook never received {what}; got {ev:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Checks a `Pushgate-Signature` header against a secret: any `v1=` may match.
pub fn verify_signature(header: &str, secret: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut sigs = vec![];
    for part in header.split(',') {
        if let Some(v) = part.strip_prefix("t=") {
            t = Some(v);
        } else if let Some(v) = part.strip_prefix("v1=") {
            sigs.push(v);
        }
    }
    let Some(t) = t else { return false };
    let mut msg = Vec::with_capacity(t.len() + 1 + body.len());
    msg.extend_from_slice(t.as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(body);
    let want = hex::encode(pushgate_core::credentials::hmac_sha256(
        secret.as_bytes(),
        &msg,
    ));
    sigs.contains(&want.as_str())
}
