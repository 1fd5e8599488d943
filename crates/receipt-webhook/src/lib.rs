//! receipt-webhook: reports status and reply events to each app's backend as signed, batched
//! HTTP POSTs.
//!
//! Events come from the JetStream stream `{NS}_EVENTS` through the durable pull consumer
//! `webhook`. A JetStream message is acknowledged only after the app's receiver answered 2xx
//! for a batch containing it (or the app has no webhook), so a crash at any point means
//! redelivery, never loss; receivers dedupe by event id.
//!
//! Each app has its own queue and worker task with at most one batch in flight, so a dead
//! endpoint holds back only its own app, and an app's batches stay in order. While a batch is
//! retried (exponential backoff with jitter, same delivery id and body every time), the worker
//! keeps all of the app's held messages alive with progress acks so JetStream does not
//! redeliver them meanwhile.

mod batch;
mod signing;
mod worker;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures::StreamExt;
use pushgate_bus::{Bus, BusError, ConsumerName};
use pushgate_core::{AppId, BusEvent};
use pushgate_runtime::{CommonSettings, ConfigError, Metrics};
use pushgate_store::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use batch::{backoff_delay, encode_body, order_events};
pub use signing::{sign, signature_header};

use worker::{Carrier, Delivery, Shared, Worker};

/// The `User-Agent` of every webhook request, so receivers can tell Pushgate's calls apart.
pub const USER_AGENT: &str = "Pushgate-Webhook/0.1";

/// How long shutdown lets an in-flight POST finish before its messages are handed back.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long the dispatcher waits before re-acquiring the consumer after the message stream
/// failed (NATS restart, consumer recreated), so a flapping server is not hammered.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// How often idle app workers are looked for.
const REAP_EVERY: Duration = Duration::from_secs(30);

/// An app worker with nothing held for this long is retired, so memory follows the set of
/// apps that are active now rather than every app ever seen.
const IDLE_AFTER: Duration = Duration::from_secs(120);

/// How often a dispatcher holding `max_held_events` looks again whether workers settled some.
const HELD_FULL_WAIT: Duration = Duration::from_millis(20);

/// Webhook delivery settings (`[webhook]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WebhookSettings {
    /// Most events in one POST; a full batch goes out at once.
    pub max_batch: usize,
    /// How long the first event of a batch may wait for more events (ms); bounds the latency
    /// that batching adds.
    pub max_delay_ms: u64,
    /// How long a receiver has to answer a POST (ms) before the attempt counts as a timeout.
    pub timeout_ms: u64,
    /// Delay before the first retry of a refused batch (ms); doubles on each further failure.
    pub initial_backoff_ms: u64,
    /// Longest delay between retries (ms); also how long a batch that ran out of retries waits
    /// before JetStream delivers it again.
    pub max_backoff_ms: u64,
    /// How long one batch is retried (s) before it is given up and returned to the stream.
    pub max_retry_secs: u64,
    /// Most events this instance holds at once (queued per app, or in a batch being retried),
    /// across all apps: while it holds that many, it takes nothing more from the bus. A
    /// stream message may carry many events (docs/architecture.md, "Batched stream
    /// messages"), so the consumer's own limit on unacknowledged messages does not bound
    /// memory by itself.
    pub max_held_events: usize,
    /// Extra PEM files of CA certificates to trust for `https://` receivers (private or
    /// development CAs), in addition to the system's roots.
    pub extra_ca_files: Vec<String>,
    /// Address of the operations listener (`/healthz`, `/readyz`, `/metrics`).
    pub ops_listen: String,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            max_batch: 100,
            max_delay_ms: 200,
            timeout_ms: 10_000,
            initial_backoff_ms: 500,
            max_backoff_ms: 300_000,
            max_retry_secs: 86_400,
            max_held_events: 20_000,
            extra_ca_files: Vec::new(),
            ops_listen: "127.0.0.1:9105".into(),
        }
    }
}

/// Largest accepted `max_batch`: a batch holds that many un-acked messages, which count
/// against the consumer's `max_ack_pending` shared by all apps.
const MAX_BATCH_LIMIT: usize = 1_000;

impl WebhookSettings {
    /// Checks the settings, naming the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch == 0 || self.max_batch > MAX_BATCH_LIMIT {
            return Err(ConfigError::invalid(
                "webhook.max_batch",
                format!(
                    "must be between 1 and {MAX_BATCH_LIMIT}, got {}",
                    self.max_batch
                ),
            ));
        }
        if self.max_delay_ms > 60_000 {
            return Err(ConfigError::invalid(
                "webhook.max_delay_ms",
                "must be at most 60000",
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > 300_000 {
            return Err(ConfigError::invalid(
                "webhook.timeout_ms",
                "must be between 1 and 300000",
            ));
        }
        if self.initial_backoff_ms == 0 {
            return Err(ConfigError::invalid(
                "webhook.initial_backoff_ms",
                "must be at least 1",
            ));
        }
        if self.max_backoff_ms < self.initial_backoff_ms {
            return Err(ConfigError::invalid(
                "webhook.max_backoff_ms",
                "must be at least webhook.initial_backoff_ms",
            ));
        }
        if self.max_retry_secs == 0 {
            return Err(ConfigError::invalid(
                "webhook.max_retry_secs",
                "must be at least 1",
            ));
        }
        if self.max_held_events == 0 || self.max_held_events > 1_000_000 {
            return Err(ConfigError::invalid(
                "webhook.max_held_events",
                format!(
                    "must be between 1 and 1000000, got {}",
                    self.max_held_events
                ),
            ));
        }
        if let Some(empty) = self.extra_ca_files.iter().position(|p| p.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "webhook.extra_ca_files",
                format!("entry {empty} is empty"),
            ));
        }
        if self.ops_listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "webhook.ops_listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:9105",
                    self.ops_listen
                ),
            ));
        }
        Ok(())
    }
}

/// Everything the receipt-webhook binary reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Shared settings (`[common]`).
    pub common: CommonSettings,
    /// Webhook delivery (`[webhook]`).
    pub webhook: WebhookSettings,
}

impl Settings {
    /// Checks the shared and the webhook settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.common.validate()?;
        self.webhook.validate()
    }
}

/// Errors of the webhook service.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot use CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Settings turned into the units the workers use.
pub(crate) struct Tuning {
    pub max_batch: usize,
    pub max_delay: Duration,
    pub timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub max_retry: Duration,
    pub max_held: usize,
    /// Interval of progress acks: a third of the consumer's `ack_wait`, so one late tick never
    /// lets a held message expire.
    pub progress_every: Duration,
    pub shutdown_grace: Duration,
}

impl Tuning {
    fn from_settings(s: &WebhookSettings) -> Self {
        Tuning {
            max_batch: s.max_batch,
            max_delay: Duration::from_millis(s.max_delay_ms),
            timeout: Duration::from_millis(s.timeout_ms),
            initial_backoff: Duration::from_millis(s.initial_backoff_ms),
            max_backoff: Duration::from_millis(s.max_backoff_ms),
            max_retry: Duration::from_secs(s.max_retry_secs),
            max_held: s.max_held_events,
            progress_every: ConsumerName::Webhook.ack_wait() / 3,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

/// The dispatcher's handle on one app worker.
struct WorkerHandle {
    tx: mpsc::UnboundedSender<Delivery>,
    /// Messages sent to the worker and not yet acked or naked by it.
    held: Arc<AtomicUsize>,
    last_used: Instant,
}

/// The webhook service: pulls events, hands them to per-app workers.
pub struct Service {
    bus: Bus,
    shared: Arc<Shared>,
}

impl Service {
    /// Validates the settings, builds the HTTP client and checks that the `webhook` consumer
    /// exists, so a misconfiguration stops the process at start rather than at the first
    /// event.
    pub async fn build(
        settings: Settings,
        metrics: Arc<Metrics>,
        bus: Bus,
        store: Store,
    ) -> Result<Service, WebhookError> {
        let s = settings.webhook;
        s.validate()?;
        let client = http_client(&s).await?;
        bus.consumer(ConsumerName::Webhook).await?;
        let shared = Arc::new(Shared {
            tuning: Tuning::from_settings(&s),
            metrics,
            store,
            client,
            held_total: AtomicUsize::new(0),
        });
        Ok(Service { bus, shared })
    }

    /// Delivers events until `shutdown`. Bus failures are logged and retried, never returned:
    /// the loop only ends on shutdown, after in-flight POSTs had a few seconds to finish and
    /// everything not accepted was handed back to JetStream.
    pub async fn run_until(self, shutdown: CancellationToken) -> Result<(), WebhookError> {
        let tracker = TaskTracker::new();
        let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
        let mut reap = tokio::time::interval_at(Instant::now() + REAP_EVERY, REAP_EVERY);
        'outer: loop {
            let mut messages = tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                m = self.messages() => m,
            };
            if let Some(stream) = messages.as_mut() {
                loop {
                    if self.shared.held_total.load(Ordering::Acquire) >= self.shared.tuning.max_held
                    {
                        // full: take nothing more from the bus until workers settle some
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => break 'outer,
                            _ = reap.tick() => reap_idle(&mut workers),
                            _ = tokio::time::sleep(HELD_FULL_WAIT) => {}
                        }
                        continue;
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break 'outer,
                        _ = reap.tick() => reap_idle(&mut workers),
                        next = stream.next() => match next {
                            Some(Ok(msg)) => self.dispatch(msg, &mut workers, &tracker, &shutdown).await,
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "webhook consumer stream failed; resubscribing");
                                break;
                            }
                            None => {
                                tracing::warn!("webhook consumer stream ended; resubscribing");
                                break;
                            }
                        },
                    }
                }
            }
            drop(messages);
            tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            }
        }
        tracker.close();
        if tokio::time::timeout(
            self.shared.tuning.shutdown_grace + Duration::from_secs(2),
            tracker.wait(),
        )
        .await
        .is_err()
        {
            tracing::warn!(
                "webhook workers did not stop in time; their messages will be redelivered"
            );
        }
        drop(workers);
        // acks and naks are buffered by the client; send them before the process exits
        if let Err(e) = self.bus.client().flush().await {
            tracing::warn!(error = %e, "cannot flush NATS acks at shutdown");
        }
        Ok(())
    }

    /// The consumer's message stream, or `None` (logged) when NATS cannot give it now. A
    /// missing consumer is recreated, since only the bus's topology declares it.
    async fn messages(&self) -> Option<pull::Stream> {
        let consumer = match self.bus.consumer(ConsumerName::Webhook).await {
            Ok(c) => c,
            Err(first) => {
                tracing::warn!(error = %first, "webhook consumer unavailable; re-declaring the bus topology");
                if let Err(e) = self.bus.ensure_topology().await {
                    tracing::warn!(error = %e, "cannot declare the bus topology");
                    return None;
                }
                match self.bus.consumer(ConsumerName::Webhook).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook consumer still unavailable");
                        return None;
                    }
                }
            }
        };
        match consumer.messages().await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to the webhook consumer");
                None
            }
        }
    }

    /// Hands the events of one JetStream message (one, or a batch of one app's events) to
    /// their app's worker, starting the worker if needed.
    async fn dispatch(
        &self,
        msg: jetstream::Message,
        workers: &mut HashMap<String, WorkerHandle>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let mut events = Vec::new();
        for item in pushgate_bus::batch::items(msg.headers.as_ref(), &msg.payload) {
            match serde_json::from_slice::<BusEvent>(item.payload) {
                // the app id becomes part of a Redis key; refuse anything that is not one of ours
                Ok(e) if !AppId::is_well_formed(&e.app_id) => {
                    tracing::error!(subject = %msg.subject, app = %e.app_id, "event with a malformed app id; dropped");
                }
                Ok(e) => events.push((e, item.trace())),
                // it can never be delivered; the stream keeps it
                Err(e) => {
                    tracing::error!(subject = %msg.subject, error = %e, "undecodable event on the bus; dropped");
                }
            }
        }
        if events.is_empty() {
            // terminating stops redelivery
            if let Err(e) = msg.ack_with(AckKind::Term).await {
                tracing::warn!(error = %e, "cannot terminate JetStream message");
            }
            return;
        }
        let carrier = Carrier::new(msg, events.len());
        for (event, trace) in events {
            let app_id = event.app_id.clone();
            if workers.get(&app_id).is_some_and(|w| w.tx.is_closed()) {
                // the worker is gone (it stops only on shutdown, or if it panicked): start afresh
                workers.remove(&app_id);
            }
            let handle = workers.entry(app_id.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let held = Arc::new(AtomicUsize::new(0));
                let worker = Worker::new(
                    app_id,
                    self.shared.clone(),
                    rx,
                    held.clone(),
                    shutdown.clone(),
                );
                tracker.spawn(worker.run());
                WorkerHandle {
                    tx,
                    held,
                    last_used: Instant::now(),
                }
            });
            handle.held.fetch_add(1, Ordering::AcqRel);
            self.shared.held_total.fetch_add(1, Ordering::AcqRel);
            handle.last_used = Instant::now();
            if let Err(mpsc::error::SendError(d)) = handle.tx.send(Delivery {
                carrier: carrier.clone(),
                event,
                trace,
                arrived: Instant::now(),
            }) {
                // only during shutdown: let JetStream redeliver it
                handle.held.fetch_sub(1, Ordering::AcqRel);
                self.shared.held_total.fetch_sub(1, Ordering::AcqRel);
                d.carrier.settle_one(AckKind::Nak(None)).await;
            }
        }
    }
}

/// Retires workers that hold nothing and got nothing for a while. `held` is only raised by
/// the dispatcher (this task), so zero here means the worker's queue and channel are empty
/// and dropping its sender cannot lose a message; the worker then sees its channel closed
/// and ends.
fn reap_idle(workers: &mut HashMap<String, WorkerHandle>) {
    workers.retain(|_, w| w.held.load(Ordering::Acquire) > 0 || w.last_used.elapsed() < IDLE_AFTER);
}

/// The HTTP client for all receivers. Redirects are not followed: a signed POST must reach
/// the URL the app configured, and a 3xx answer is a misconfiguration that should show up as
/// a failed batch, not be silently chased.
async fn http_client(s: &WebhookSettings) -> Result<reqwest::Client, WebhookError> {
    pushgate_runtime::tls::install_crypto_provider();
    let mut roots = Vec::new();
    for path in &s.extra_ca_files {
        let err = |reason: String| WebhookError::CaFile {
            path: path.clone(),
            reason,
        };
        let pem = tokio::fs::read(path)
            .await
            .map_err(|e| err(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no certificate in file".into()));
        }
        roots.extend(certs);
    }
    let timeout = Duration::from_millis(s.timeout_ms);
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(60));
    if !roots.is_empty() {
        builder = builder.tls_certs_merge(roots);
    }
    builder.build().map_err(WebhookError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(r: Result<(), ConfigError>) -> Option<String> {
        match r {
            Err(ConfigError::Invalid { key, .. }) => Some(key),
            _ => None,
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert!(WebhookSettings::default().validate().is_ok());
    }

    #[test]
    fn validation_names_the_setting() {
        let ok = WebhookSettings::default();
        let cases: Vec<(WebhookSettings, &str)> = vec![
            (
                WebhookSettings {
                    max_batch: 0,
                    ..ok.clone()
                },
                "webhook.max_batch",
            ),
            (
                WebhookSettings {
                    max_batch: MAX_BATCH_LIMIT + 1,
                    ..ok.clone()
                },
                "webhook.max_batch",
            ),
            (
                WebhookSettings {
                    max_delay_ms: 60_001,
                    ..ok.clone()
                },
                "webhook.max_delay_ms",
            ),
            (
                WebhookSettings {
                    timeout_ms: 0,
                    ..ok.clone()
                },
                "webhook.timeout_ms",
            ),
            (
                WebhookSettings {
                    initial_backoff_ms: 0,
                    ..ok.clone()
                },
                "webhook.initial_backoff_ms",
            ),
            (
                WebhookSettings {
                    initial_backoff_ms: 1000,
                    max_backoff_ms: 999,
                    ..ok.clone()
                },
                "webhook.max_backoff_ms",
            ),
            (
                WebhookSettings {
                    max_retry_secs: 0,
                    ..ok.clone()
                },
                "webhook.max_retry_secs",
            ),
            (
                WebhookSettings {
                    extra_ca_files: vec![" ".into()],
                    ..ok.clone()
                },
                "webhook.extra_ca_files",
            ),
            (
                WebhookSettings {
                    ops_listen: "localhost".into(),
                    ..ok.clone()
                },
                "webhook.ops_listen",
            ),
        ];
        for (s, key) in cases {
            assert_eq!(key_of(s.validate()).as_deref(), Some(key), "{s:?}");
        }
    }

    #[test]
    fn settings_deserialize_with_defaults() {
        let s: Settings = match serde_json::from_str(r#"{"webhook":{"max_batch":7}}"#) {
            Ok(s) => s,
            Err(e) => panic!("settings: {e}"),
        };
        assert_eq!(s.webhook.max_batch, 7);
        assert_eq!(s.webhook.max_delay_ms, 200);
        assert_eq!(s.webhook.ops_listen, "127.0.0.1:9105");
        assert_eq!(s.common.namespace, "pg");
    }

    #[test]
    fn progress_acks_come_well_within_ack_wait() {
        let t = Tuning::from_settings(&WebhookSettings::default());
        assert!(t.progress_every <= Duration::from_secs(10));
        assert!(t.progress_every * 2 < ConsumerName::Webhook.ack_wait());
    }
}
