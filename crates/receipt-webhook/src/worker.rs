//! One app's delivery loop: its own queue, at most one batch in flight, retries with backoff.
//!
//! Each app gets its own task so that one app's dead endpoint only ever holds that app's events
//! back. Every JetStream message the worker holds (queued or in the batch being retried) is
//! kept alive with progress acks, because the consumer would otherwise redeliver it after
//! `ack_wait` and the queue would fill with duplicates while a receiver is down.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use pushgate_core::{BusEvent, WebhookConfig};
use pushgate_runtime::metrics::ResultLabel;
use pushgate_runtime::Metrics;
use pushgate_store::Store;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use crate::batch::{backoff_delay, encode_body, order_events};
use crate::signing::signature_header;
use crate::Tuning;

/// How long an app's settings are reused before they are read again: short enough that a
/// changed URL or secret is picked up within seconds, long enough that a busy app does not
/// read Redis for every batch.
const APP_CACHE_TTL: Duration = Duration::from_secs(5);

/// How much of a failed response's body is kept for the log line.
const ERROR_SNIPPET_BYTES: usize = 256;

/// How much of a response body is read at most; reading it lets the connection be reused,
/// but a receiver streaming an endless body must not hold the worker.
const MAX_DRAIN_BYTES: usize = 64 * 1024;

/// The body of a batch, read back for dead-lettering.
#[derive(serde::Deserialize)]
struct EventsBody {
    events: Vec<pushgate_core::Event>,
}

/// A JetStream message and the events it carried ([`pushgate_bus::batch`]: one, or a batch of
/// one app's events). Each event is settled on its own; the message is settled when its last
/// event is: acked if every event was accepted (or dead-lettered), otherwise handed back
/// whole, so an event is never acked before it was delivered. A handed-back batch brings its
/// accepted events again too; receivers dedupe by id (docs/webhooks.md).
pub(crate) struct Carrier {
    msg: jetstream::Message,
    /// Events of the message not settled yet.
    open: AtomicUsize,
    /// How the message goes back if any of its events was not accepted (the first such kind).
    back: std::sync::Mutex<Option<AckKind>>,
}

impl Carrier {
    pub(crate) fn new(msg: jetstream::Message, events: usize) -> Arc<Self> {
        Arc::new(Carrier {
            msg,
            open: AtomicUsize::new(events),
            back: std::sync::Mutex::new(None),
        })
    }

    /// Settles one of the message's events; settles the message when it was the last.
    pub(crate) async fn settle_one(&self, kind: AckKind) {
        if !matches!(kind, AckKind::Ack) {
            let mut back = self.back.lock().unwrap_or_else(|p| p.into_inner());
            back.get_or_insert(kind);
        }
        if self.open.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let back = *self.back.lock().unwrap_or_else(|p| p.into_inner());
        let res = match back {
            None => self.msg.ack().await,
            Some(k) => self.msg.ack_with(k).await,
        };
        if let Err(e) = res {
            // the server redelivers after ack_wait; receivers dedupe by event id
            tracing::warn!(error = %e, "cannot settle JetStream message");
        }
    }

    /// Whether the message still has events to settle (and so must be kept alive).
    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire) > 0
    }
}

/// One event taken from the bus, with the JetStream message that must be settled for it.
pub(crate) struct Delivery {
    pub carrier: Arc<Carrier>,
    pub event: BusEvent,
    /// The event's own trace context (a batch carries one per event).
    pub trace: opentelemetry::Context,
    pub arrived: Instant,
}

/// What the process shares between all workers.
pub(crate) struct Shared {
    pub tuning: Tuning,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub client: reqwest::Client,
    /// Events held by all workers together (bounded by `tuning.max_held`).
    pub held_total: AtomicUsize,
}

/// A batch being delivered. The id and body are fixed at creation, so every retry is
/// byte-for-byte the same request (only the signature's timestamp changes).
struct Batch {
    id: String,
    body: Bytes,
    carriers: Vec<Arc<Carrier>>,
    traces: Vec<opentelemetry::Context>,
    events: usize,
    started: Instant,
}

/// The result of one POST.
enum Attempt {
    Accepted,
    HttpError {
        status: reqwest::StatusCode,
        snippet: String,
    },
    Timeout,
    ConnectError(String),
}

impl Attempt {
    /// The `result` label of `pushgate_webhook_batches_total`.
    fn label(&self) -> &'static str {
        match self {
            Attempt::Accepted => "ok",
            Attempt::HttpError { .. } => "http_error",
            Attempt::Timeout => "timeout",
            Attempt::ConnectError(_) => "connect_error",
        }
    }
}

/// Whether the worker goes on after a step.
enum Flow {
    Continue,
    Stop,
}

/// What ended a wait for the next batch.
enum Due {
    Batch,
    Closed,
    Stop,
}

/// An app's webhook settings and when they were read.
struct CachedApp {
    read_at: Instant,
    webhook: Option<WebhookConfig>,
}

/// The per-app worker.
pub(crate) struct Worker {
    app_id: String,
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Delivery>,
    rx_open: bool,
    queue: VecDeque<Delivery>,
    inflight: Option<Batch>,
    /// Messages handed to this worker and not yet settled; the dispatcher reads it to know
    /// when the worker can be retired without losing anything.
    held: Arc<AtomicUsize>,
    progress: Interval,
    cache: Option<CachedApp>,
    shutdown: CancellationToken,
    stopping: bool,
}

impl Worker {
    pub(crate) fn new(
        app_id: String,
        shared: Arc<Shared>,
        rx: mpsc::UnboundedReceiver<Delivery>,
        held: Arc<AtomicUsize>,
        shutdown: CancellationToken,
    ) -> Self {
        let every = shared.tuning.progress_every;
        let mut progress = tokio::time::interval_at(Instant::now() + every, every);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Worker {
            app_id,
            shared,
            rx,
            rx_open: true,
            queue: VecDeque::new(),
            inflight: None,
            held,
            progress,
            cache: None,
            shutdown,
            stopping: false,
        }
    }

    /// Runs until shutdown, or until the dispatcher closes the channel and nothing is left.
    pub(crate) async fn run(mut self) {
        loop {
            match self.wait_for_batch().await {
                Due::Batch => {}
                Due::Closed => return,
                Due::Stop => break,
            }
            self.start_batch().await;
            if let Flow::Stop = self.deliver().await {
                break;
            }
        }
        self.release_all().await;
    }

    /// Waits until a batch is due: `max_batch` events queued, or the oldest queued event has
    /// waited `max_delay`.
    async fn wait_for_batch(&mut self) -> Due {
        loop {
            if self.queue.len() >= self.shared.tuning.max_batch {
                return Due::Batch;
            }
            let deadline = self
                .queue
                .front()
                .map(|d| d.arrived + self.shared.tuning.max_delay);
            if !self.rx_open && deadline.is_none() {
                return Due::Closed;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Due::Stop,
                d = self.rx.recv(), if self.rx_open => self.accept(d),
                _ = self.progress.tick() => self.keep_alive().await,
                _ = sleep_until(deadline) => return Due::Batch,
            }
        }
    }

    /// Takes a channel item into the queue.
    fn accept(&mut self, d: Option<Delivery>) {
        match d {
            Some(d) => self.queue.push_back(d),
            None => self.rx_open = false,
        }
    }

    /// Moves up to `max_batch` queued events into the in-flight batch.
    async fn start_batch(&mut self) {
        let n = self.queue.len().min(self.shared.tuning.max_batch);
        let mut carriers = Vec::with_capacity(n);
        let mut traces = Vec::with_capacity(n);
        let mut events = Vec::with_capacity(n);
        for d in self.queue.drain(..n) {
            carriers.push(d.carrier);
            traces.push(d.trace);
            events.push(d.event);
        }
        let ordered = order_events(events);
        match encode_body(&ordered) {
            Ok(body) => {
                self.inflight = Some(Batch {
                    id: uuid::Uuid::now_v7().to_string(),
                    body: Bytes::from(body),
                    carriers,
                    traces,
                    events: ordered.len(),
                    started: Instant::now(),
                });
            }
            Err(e) => {
                // Events decoded from JSON always encode again; should that ever break, the
                // messages come back later instead of being dropped.
                tracing::error!(app = %self.app_id, error = %e, "cannot encode webhook batch");
                self.settle(carriers, AckKind::Nak(Some(self.shared.tuning.max_backoff)))
                    .await;
            }
        }
    }

    /// Delivers the in-flight batch, retrying until it is accepted, the app no longer has a
    /// webhook, the retry budget is spent, or the service shuts down.
    async fn deliver(&mut self) -> Flow {
        let mut attempt_no: u32 = 0;
        while let Some(batch) = &self.inflight {
            let (id, body, started, events) = (
                batch.id.clone(),
                batch.body.clone(),
                batch.started,
                batch.events,
            );
            let outcome = match self.webhook().await {
                Ok(None) => {
                    tracing::debug!(app = %self.app_id, events, "app has no webhook; events acknowledged");
                    self.finish_inflight(AckKind::Ack).await;
                    return Flow::Continue;
                }
                Ok(Some(hook)) => {
                    // one span per POST: part of the first event's trace, linked to the others'
                    let span = tracing::info_span!(
                        pushgate_runtime::telemetry::spans::WEBHOOK_DELIVER,
                        otel.kind = "client",
                        app_id = %self.app_id,
                        delivery = %id,
                        events,
                        attempt = attempt_no + 1,
                        result = tracing::field::Empty,
                    );
                    if let Some(b) = &self.inflight {
                        pushgate_runtime::telemetry::parent_and_links(
                            &span,
                            b.traces.iter().cloned(),
                        );
                    }
                    let shared = self.shared.clone();
                    let post = tracing::Instrument::instrument(
                        post(&shared, &hook, &id, body),
                        span.clone(),
                    );
                    match self.wait_while(post, true).await {
                        Some(a) => {
                            span.record("result", a.label());
                            Some(a)
                        }
                        None => return Flow::Stop,
                    }
                }
                Err(e) => {
                    tracing::warn!(app = %self.app_id, error = %e, "cannot read app settings; will retry");
                    None
                }
            };
            if let Some(outcome) = &outcome {
                self.count(outcome.label());
            }
            match outcome {
                Some(Attempt::Accepted) => {
                    self.shared.metrics.webhook_events.inc_by(events as u64);
                    if let Some(b) = &self.inflight {
                        self.shared.metrics.webhook_batch_accepted(&b.body);
                    }
                    tracing::debug!(app = %self.app_id, delivery = %id, events, attempts = attempt_no + 1, "webhook batch accepted");
                    self.finish_inflight(AckKind::Ack).await;
                    return if self.stopping {
                        Flow::Stop
                    } else {
                        Flow::Continue
                    };
                }
                Some(failure) if self.stopping => {
                    tracing::info!(app = %self.app_id, delivery = %id, result = failure.label(), "shutting down; batch left for redelivery");
                    return Flow::Stop;
                }
                failure => {
                    // a failing endpoint may have been fixed in the app's settings: read them
                    // again for the next attempt instead of trusting the cache
                    self.cache = None;
                    if started.elapsed() >= self.shared.tuning.max_retry {
                        self.give_up(&id, events).await;
                        return Flow::Continue;
                    }
                    let delay = backoff_delay(
                        attempt_no,
                        self.shared.tuning.initial_backoff,
                        self.shared.tuning.max_backoff,
                    );
                    match &failure {
                        Some(Attempt::HttpError { status, snippet }) => tracing::warn!(
                            app = %self.app_id, delivery = %id, attempt = attempt_no + 1, status = status.as_u16(),
                            response = %snippet, retry_in_ms = delay.as_millis() as u64, "webhook receiver refused batch"
                        ),
                        Some(Attempt::ConnectError(e)) => tracing::warn!(
                            app = %self.app_id, delivery = %id, attempt = attempt_no + 1, error = %e,
                            retry_in_ms = delay.as_millis() as u64, "webhook receiver unreachable"
                        ),
                        Some(Attempt::Timeout) => tracing::warn!(
                            app = %self.app_id, delivery = %id, attempt = attempt_no + 1,
                            retry_in_ms = delay.as_millis() as u64, "webhook receiver did not answer in time"
                        ),
                        Some(Attempt::Accepted) | None => {}
                    }
                    attempt_no = attempt_no.saturating_add(1);
                    if self
                        .wait_while(tokio::time::sleep(delay), false)
                        .await
                        .is_none()
                    {
                        return Flow::Stop;
                    }
                }
            }
        }
        Flow::Continue
    }

    /// After `max_retry` without acceptance: the batch goes to the app's dead-letter list in
    /// Redis (the operator lists and replays it through the API) and its messages are
    /// acknowledged, so a dead endpoint cannot fill the consumer's ack window forever. If the
    /// dead-letter write fails, the batch goes back to JetStream with a long delay instead:
    /// nothing is dropped either way.
    async fn give_up(&mut self, id: &str, events: usize) {
        self.count("gave_up");
        let Some(batch) = self.inflight.as_ref() else {
            return;
        };
        let body: Result<EventsBody, _> = serde_json::from_slice(&batch.body);
        let stored = match body {
            Ok(b) => {
                let dl = pushgate_core::DeadLetter {
                    batch_id: id.to_string(),
                    app_id: self.app_id.clone(),
                    failed_at: pushgate_core::time::now_ms(),
                    reason: format!(
                        "not accepted within {} s of retries",
                        self.shared.tuning.max_retry.as_secs()
                    ),
                    events: b.events,
                };
                self.shared
                    .store
                    .put_dead_letter(&dl)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(()) => {
                tracing::error!(
                    app = %self.app_id, delivery = %id, events,
                    "webhook batch not accepted within the retry limit; moved to the dead-letter list"
                );
                self.shared.metrics.webhook_dead_letter(&self.app_id);
                self.finish_inflight(AckKind::Ack).await;
            }
            Err(e) => {
                tracing::error!(
                    app = %self.app_id, delivery = %id, events, error = %e,
                    "webhook batch not accepted within the retry limit and cannot be dead-lettered; returned to the stream"
                );
                self.finish_inflight(AckKind::Nak(Some(self.shared.tuning.max_backoff)))
                    .await;
            }
        }
    }

    /// Runs `fut` while still taking in new events and keeping every held message alive.
    /// On shutdown, an in-flight POST (`grace`) gets a few more seconds to finish; anything
    /// else is abandoned. `None` means the shutdown came first and `fut` did not finish.
    async fn wait_while<F: Future>(&mut self, fut: F, grace: bool) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                _ = self.shutdown.cancelled(), if !self.stopping => {
                    self.stopping = true;
                    if !grace {
                        return None;
                    }
                    return tokio::time::timeout(self.shared.tuning.shutdown_grace, &mut fut).await.ok();
                }
                d = self.rx.recv(), if self.rx_open => self.accept(d),
                _ = self.progress.tick() => self.keep_alive().await,
            }
        }
    }

    /// The app's webhook, from the cache when fresh. When Redis cannot be read, stale settings
    /// are used rather than stalling delivery.
    async fn webhook(&mut self) -> Result<Option<WebhookConfig>, pushgate_store::StoreError> {
        if let Some(c) = &self.cache {
            if c.read_at.elapsed() < APP_CACHE_TTL {
                return Ok(c.webhook.clone());
            }
        }
        match self.shared.store.app(&self.app_id).await {
            Ok(app) => {
                let webhook = app.and_then(|a| a.webhook);
                self.cache = Some(CachedApp {
                    read_at: Instant::now(),
                    webhook: webhook.clone(),
                });
                Ok(webhook)
            }
            Err(e) => match &self.cache {
                Some(c) => {
                    tracing::warn!(app = %self.app_id, error = %e, "cannot refresh app settings; using the last ones read");
                    Ok(c.webhook.clone())
                }
                None => Err(e),
            },
        }
    }

    /// Extends the ack deadline of every held message (once each, however many of its events
    /// are held).
    async fn keep_alive(&self) {
        let batch = self.inflight.iter().flat_map(|b| b.carriers.iter());
        let mut seen = std::collections::HashSet::new();
        for c in batch.chain(self.queue.iter().map(|d| &d.carrier)) {
            if !seen.insert(Arc::as_ptr(c) as usize) || !c.is_open() {
                continue;
            }
            if let Err(e) = c.msg.ack_with(AckKind::Progress).await {
                tracing::debug!(app = %self.app_id, error = %e, "progress ack failed");
            }
        }
    }

    /// Settles the in-flight batch's messages.
    async fn finish_inflight(&mut self, kind: AckKind) {
        if let Some(b) = self.inflight.take() {
            self.settle(b.carriers, kind).await;
        }
    }

    /// Hands every message still held back to JetStream for prompt redelivery (possibly to
    /// another instance). Used at shutdown: nothing unaccepted is acknowledged.
    async fn release_all(&mut self) {
        self.finish_inflight(AckKind::Nak(None)).await;
        while let Ok(d) = self.rx.try_recv() {
            self.queue.push_back(d);
        }
        let queued: Vec<_> = self.queue.drain(..).map(|d| d.carrier).collect();
        self.settle(queued, AckKind::Nak(None)).await;
    }

    /// Acks or naks events (their messages once all their events are settled) and stops
    /// counting them as held.
    async fn settle(&self, carriers: Vec<Arc<Carrier>>, kind: AckKind) {
        let n = carriers.len();
        for c in carriers {
            c.settle_one(kind).await;
        }
        self.held.fetch_sub(n, Ordering::AcqRel);
        self.shared.held_total.fetch_sub(n, Ordering::AcqRel);
    }

    fn count(&self, result: &str) {
        self.shared
            .metrics
            .webhook_batches
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One POST of a batch.
async fn post(shared: &Shared, hook: &WebhookConfig, delivery: &str, body: Bytes) -> Attempt {
    let now_ms = pushgate_core::time::now_ms();
    let signature = signature_header(hook, now_ms.div_euclid(1000), now_ms, &body);
    let (Ok(signature), Ok(delivery)) = (
        HeaderValue::from_str(&signature),
        HeaderValue::from_str(delivery),
    ) else {
        // hex, digits and a UUID are always valid header values
        return Attempt::ConnectError("cannot build request headers".into());
    };
    let sent = shared
        .client
        .post(&hook.url)
        .timeout(shared.tuning.timeout)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header("Pushgate-Signature", signature)
        .header("Pushgate-Delivery", delivery)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let status = resp.status();
            let snippet = drain(resp).await;
            if status.is_success() {
                Attempt::Accepted
            } else {
                Attempt::HttpError { status, snippet }
            }
        }
        Err(e) if e.is_timeout() => Attempt::Timeout,
        Err(e) => Attempt::ConnectError(error_chain(&e)),
    }
}

/// Reads (a bounded part of) the response so the connection can be reused; returns its start
/// for log lines.
async fn drain(mut resp: reqwest::Response) -> String {
    let mut head = Vec::new();
    let mut read = 0usize;
    while read < MAX_DRAIN_BYTES {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                let room = ERROR_SNIPPET_BYTES.saturating_sub(head.len());
                head.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// An error with its causes, because reqwest's top-level message ("error sending request")
/// hides whether DNS, TCP or TLS failed.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
