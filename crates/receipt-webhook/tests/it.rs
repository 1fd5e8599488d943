//! Integration tests against the NATS (JetStream) and Redis running on this machine.
//!
//! Each test uses its own namespace, so tests run in parallel without seeing each other's
//! streams or keys, and deletes it at the end. Receivers are local axum servers; signatures
//! are verified here with an HMAC written independently of the crate's `sign`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use futures::FutureExt;
use hmac::{Hmac, Mac};
use pushgate_bus::{Bus, ConsumerName};
use pushgate_core::{App, AppId, BusEvent, Event, EventKind, Status, WebhookConfig};
use pushgate_runtime::tls::{dev_certs, ReloadableTls};
use pushgate_runtime::{CancellationToken, Metrics};
use pushgate_store::Store;
use receipt_webhook::{Service, Settings, WebhookError, WebhookSettings};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

type Error = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), Error>;

const NATS: &str = "nats://127.0.0.1:4222";
const REDIS: &str = "redis://127.0.0.1:6379";

/// Generous upper bound for "eventually": only reached when something is broken.
const DEADLINE: Duration = Duration::from_secs(45);

fn fail(msg: impl Into<String>) -> Error {
    msg.into().into()
}

// ------------------------------------------------------------------------------ harness

/// A started service instance: its stop token and its task.
type Running = (CancellationToken, JoinHandle<Result<(), WebhookError>>);

/// One test's namespace, connections, services and receivers.
struct Harness {
    ns: String,
    bus: Bus,
    store: Store,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    services: Mutex<Vec<Running>>,
}

impl Harness {
    async fn new() -> Result<Self, Error> {
        let ns = format!("w{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let bus = Bus::connect(NATS, &ns).await?;
        let store = Store::connect(REDIS, &ns).await?;
        Ok(Harness {
            ns,
            bus,
            store,
            metrics: Metrics::new(),
            stop: CancellationToken::new(),
            services: Mutex::new(Vec::new()),
        })
    }

    /// Settings with quick retries, so failures are retried within the test's patience.
    fn settings(&self) -> WebhookSettings {
        WebhookSettings {
            initial_backoff_ms: 50,
            max_backoff_ms: 400,
            timeout_ms: 5_000,
            ..WebhookSettings::default()
        }
    }

    /// Starts a service instance; returns the token that stops it.
    async fn start(&self, webhook: WebhookSettings) -> Result<CancellationToken, Error> {
        let mut settings = Settings {
            webhook,
            ..Settings::default()
        };
        settings.common.namespace = self.ns.clone();
        let service = Service::build(
            settings,
            self.metrics.clone(),
            self.bus.clone(),
            self.store.clone(),
        )
        .await?;
        let token = self.stop.child_token();
        let handle = tokio::spawn(service.run_until(token.clone()));
        self.services
            .lock()
            .map_err(|_| fail("poisoned"))?
            .push((token.clone(), handle));
        Ok(token)
    }

    /// Stops one service instance and waits until it returned.
    async fn stop_service(&self, token: &CancellationToken) -> TestResult {
        token.cancel();
        let handle = {
            let mut services = self.services.lock().map_err(|_| fail("poisoned"))?;
            let i = services
                .iter()
                .position(|(t, _)| t.is_cancelled())
                .ok_or_else(|| fail("no such service"))?;
            services.remove(i).1
        };
        handle.await??;
        Ok(())
    }

    async fn create_app(&self, webhook: Option<WebhookConfig>) -> Result<App, Error> {
        let now = pushgate_core::time::now_ms();
        let app_id = AppId::generate().0;
        let app = App {
            api_key_hash: format!("hash-{app_id}"),
            app_id,
            name: "webhook test".into(),
            webhook,
            providers: Default::default(),
            sms: None,
            created_at: now,
            updated_at: now,
        };
        self.store.create_app(&app).await?;
        Ok(app)
    }

    async fn publish(&self, events: &[BusEvent]) -> TestResult {
        for e in events {
            self.bus
                .publish_json(self.bus.names().events(&e.app_id), &e.event.id, e)
                .await?;
        }
        Ok(())
    }

    /// `(num_ack_pending, num_pending, deliveries so far)` of the webhook consumer.
    async fn consumer_state(&self) -> Result<(usize, u64, u64), Error> {
        let info = self
            .bus
            .consumer(ConsumerName::Webhook)
            .await?
            .get_info()
            .await?;
        Ok((
            info.num_ack_pending,
            info.num_pending,
            info.delivered.consumer_sequence,
        ))
    }

    /// Waits until the webhook consumer has nothing pending or unacknowledged; returns how
    /// many deliveries it made in all.
    async fn wait_all_acked(&self) -> Result<u64, Error> {
        wait_until("every message acknowledged", || async {
            let (ack_pending, pending, _) = self.consumer_state().await?;
            Ok(ack_pending == 0 && pending == 0)
        })
        .await?;
        Ok(self.consumer_state().await?.2)
    }

    /// A value from the Prometheus exposition, by its full series name.
    fn metric(&self, series: &str) -> f64 {
        self.metrics
            .encode()
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Stops everything and deletes the namespace.
    async fn cleanup(self) {
        self.stop.cancel();
        let services = match self.services.lock() {
            Ok(mut s) => std::mem::take(&mut *s),
            Err(_) => Vec::new(),
        };
        for (_, h) in services {
            let _ = h.await;
        }
        let _ = self.bus.delete_namespace().await;
        let _ = self.store.delete_namespace().await;
        let _ = std::fs::remove_dir_all(cert_dir(&self.ns));
    }
}

/// Runs a test body with a fresh harness and always cleans up, also when an assertion in the
/// body panics (the panic is resumed after the namespace is deleted).
async fn with_harness<F, Fut>(body: F) -> TestResult
where
    F: FnOnce(Arc<Harness>) -> Fut,
    Fut: Future<Output = TestResult>,
{
    let h = Arc::new(Harness::new().await?);
    let outcome = AssertUnwindSafe(body(h.clone())).catch_unwind().await;
    match Arc::try_unwrap(h) {
        Ok(h) => h.cleanup().await,
        Err(_) => return Err(fail("harness still shared at the end of the test")),
    }
    match outcome {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Polls `check` until it is true; fails after [`DEADLINE`].
async fn wait_until<F, Fut>(what: &str, mut check: F) -> TestResult
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, Error>>,
{
    let end = Instant::now() + DEADLINE;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(fail(format!("timed out waiting for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cert_dir(ns: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("pushgate-webhook-it-{ns}"))
}

// ------------------------------------------------------------------------------ receiver

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Hit {
    delivery: String,
    signature: String,
    content_type: String,
    user_agent: String,
    body: Bytes,
    answered: u16,
}

impl Hit {
    fn event_ids(&self) -> Result<Vec<String>, Error> {
        let v: serde_json::Value = serde_json::from_slice(&self.body)?;
        let events = v["events"]
            .as_array()
            .ok_or_else(|| fail("body has no events array"))?;
        events
            .iter()
            .map(|e| {
                e["id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| fail("event without id"))
            })
            .collect()
    }
}

/// How the receiver answers.
#[derive(Clone, Copy)]
enum Behaviour {
    /// 500 for the first `n` requests, then 200.
    FailFirst(usize),
    /// 500 for every request until `d` after the first one, then 200.
    FailFor(Duration),
}

#[derive(Clone)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    count: Arc<AtomicUsize>,
    first: Arc<Mutex<Option<Instant>>>,
    behaviour: Behaviour,
}

impl Receiver {
    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Ids of every event in a batch that was answered 2xx.
    fn accepted_ids(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for h in self.hits().iter().filter(|h| h.answered == 200) {
            out.extend(h.event_ids()?);
        }
        Ok(out)
    }
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let n = r.count.fetch_add(1, Ordering::SeqCst);
    let first = {
        let mut f = match r.first.lock() {
            Ok(f) => f,
            Err(_) => return StatusCode::INTERNAL_SERVER_ERROR,
        };
        *f.get_or_insert_with(Instant::now)
    };
    let status = match r.behaviour {
        Behaviour::FailFirst(k) if n < k => StatusCode::INTERNAL_SERVER_ERROR,
        Behaviour::FailFor(d) if first.elapsed() < d => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::OK,
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let hit = Hit {
        delivery: header("pushgate-delivery"),
        signature: header("pushgate-signature"),
        content_type: header("content-type"),
        user_agent: header("user-agent"),
        body,
        answered: status.as_u16(),
    };
    if let Ok(mut h) = r.hits.lock() {
        h.push(hit);
    }
    status
}

/// Starts a receiver on 127.0.0.1; returns its webhook URL. With `tls`, it serves HTTPS with
/// a certificate from a development CA whose file is returned too.
async fn receiver(
    h: &Harness,
    behaviour: Behaviour,
    tls: bool,
) -> Result<(String, Receiver, Option<String>), Error> {
    let r = Receiver {
        hits: Arc::default(),
        count: Arc::default(),
        first: Arc::default(),
        behaviour,
    };
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(r.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let stop = h.stop.clone();
    if tls {
        let certs = dev_certs(&cert_dir(&h.ns), &["127.0.0.1", "localhost"])?;
        let server_tls = ReloadableTls::load(&certs.cert, &certs.key, &[b"h2", b"http/1.1"])?;
        tokio::spawn(pushgate_runtime::https::serve(
            listener, server_tls, app, stop,
        ));
        Ok((
            format!("https://127.0.0.1:{port}/hook"),
            r,
            Some(certs.ca.display().to_string()),
        ))
    } else {
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok((format!("http://127.0.0.1:{port}/hook"), r, None))
    }
}

/// A URL on which nothing listens: connections are refused.
async fn dead_url() -> Result<String, Error> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    drop(l);
    Ok(format!("http://127.0.0.1:{port}/hook"))
}

fn webhook(url: &str, secret: &str) -> WebhookConfig {
    WebhookConfig {
        url: url.into(),
        secret: secret.into(),
        previous_secret: None,
        previous_until: None,
    }
}

fn event(app: &App, message: &str, seq: u32, status: Status) -> BusEvent {
    BusEvent {
        app_id: app.app_id.clone(),
        seq,
        event: Event {
            id: format!("{message}.{seq}"),
            event: EventKind::Status(status),
            message_id: Some(message.into()),
            foreign_id: None,
            user_id: Some("user-1".into()),
            device_id: None,
            channel: None,
            at: pushgate_core::time::rfc3339(pushgate_core::time::now_ms()),
            detail: None,
            text: None,
            data: None,
        },
    }
}

/// Verifies a `Pushgate-Signature` value against `secrets` (all must have a matching `v1`),
/// written from the header's specification rather than with the crate's code.
fn verify_signature(header: &str, body: &[u8], secrets: &[&str]) -> TestResult {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_string()),
            Some(("v1", v)) => v1.push(v.to_string()),
            _ => return Err(fail(format!("unexpected signature part {part:?}"))),
        }
    }
    let t = t.ok_or_else(|| fail("signature without t"))?;
    let ts: i64 = t.parse()?;
    let now = pushgate_core::time::now_ms() / 1000;
    if (now - ts).abs() > 300 {
        return Err(fail(format!("signature time {ts} is not current ({now})")));
    }
    if v1.len() != secrets.len() {
        return Err(fail(format!(
            "expected {} v1 values in {header}",
            secrets.len()
        )));
    }
    for (secret, got) in secrets.iter().zip(&v1) {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())?;
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        let want = hex::encode(mac.finalize().into_bytes());
        if &want != got {
            return Err(fail(format!("v1 for secret {secret:?} does not verify")));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------ tests

/// One app's events arrive as one signed batch (both secrets during a rotation), over HTTPS
/// with a development CA, each message's events in `seq` order; every JetStream message is
/// acknowledged afterwards, including those of an app without a webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_signed_ordered_and_acked() -> TestResult {
    with_harness(|h| async move {
        let (url, rx, ca) = receiver(&h, Behaviour::FailFirst(0), true).await?;
        let mut hook = webhook(&url, "current-secret-0123456");
        hook.previous_secret = Some("previous-secret-0123456".into());
        hook.previous_until = Some(pushgate_core::time::now_ms() + 3_600_000);
        let app = h.create_app(Some(hook)).await?;
        let silent = h.create_app(None).await?;

        // published before the service starts, so they reach it together and form one batch
        let events = vec![
            event(&app, "m1", 3, Status::Delivered),
            event(&app, "m1", 1, Status::Enqueued),
            event(&silent, "m9", 1, Status::Enqueued),
            event(&app, "m1", 2, Status::Sent),
            event(&app, "m2", 2, Status::Sent),
            event(&silent, "m9", 2, Status::Sent),
            event(&app, "m2", 1, Status::Enqueued),
        ];
        h.publish(&events).await?;
        let settings = WebhookSettings {
            max_batch: 5,
            max_delay_ms: 10_000,
            extra_ca_files: ca.into_iter().collect(),
            ..h.settings()
        };
        h.start(settings).await?;

        wait_until("the batch", || async { Ok(!rx.hits().is_empty()) }).await?;
        let hits = rx.hits();
        assert_eq!(hits.len(), 1, "one batch expected: {hits:?}");
        let hit = &hits[0];
        assert_eq!(hit.event_ids()?, ["m1.1", "m1.2", "m1.3", "m2.1", "m2.2"]);
        assert_eq!(hit.content_type, "application/json");
        assert_eq!(hit.user_agent, "Pushgate-Webhook/0.1");
        assert!(
            uuid::Uuid::parse_str(&hit.delivery).is_ok(),
            "delivery id {:?}",
            hit.delivery
        );
        verify_signature(
            &hit.signature,
            &hit.body,
            &["current-secret-0123456", "previous-secret-0123456"],
        )?;
        let body: serde_json::Value = serde_json::from_slice(&hit.body)?;
        assert_eq!(
            body.as_object().map(|o| o.len()),
            Some(1),
            "only `events` at the top: {body}"
        );
        assert_eq!(body["events"][0]["event"], "enqueued");
        assert!(
            body["events"][0].get("seq").is_none(),
            "the bus envelope must not leak"
        );

        let delivered = h.wait_all_acked().await?;
        assert_eq!(
            delivered,
            events.len() as u64,
            "each message delivered once"
        );
        assert_eq!(h.metric("pushgate_webhook_events_total"), 5.0);
        assert_eq!(
            h.metric("pushgate_webhook_batches_total{result=\"ok\"}"),
            1.0
        );
        Ok(())
    })
    .await
}

/// A receiver answering 500 twice, then 200, gets the same batch (same delivery id, same
/// body) three times and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_are_retried_unchanged() -> TestResult {
    with_harness(|h| async move {
        let (url, rx, _) = receiver(&h, Behaviour::FailFirst(2), false).await?;
        let app = h
            .create_app(Some(webhook(&url, "retry-secret-0123456")))
            .await?;
        let events: Vec<BusEvent> = (1..=4)
            .map(|i| event(&app, &format!("r{i}"), 1, Status::Enqueued))
            .collect();
        h.publish(&events).await?;
        h.start(h.settings()).await?;

        let mut want: Vec<String> = events.iter().map(|e| e.event.id.clone()).collect();
        want.sort();
        wait_until("all events accepted", || async {
            let mut got = rx.accepted_ids()?;
            got.sort();
            got.dedup();
            Ok(got == want)
        })
        .await?;
        let hits = rx.hits();
        let first = &hits[0];
        let same: Vec<&Hit> = hits
            .iter()
            .filter(|x| x.delivery == first.delivery)
            .collect();
        let answers: Vec<u16> = same.iter().map(|x| x.answered).collect();
        assert_eq!(
            answers,
            [500, 500, 200],
            "attempts of delivery {}",
            first.delivery
        );
        for x in &same {
            assert_eq!(x.body, first.body, "retries must resend the same body");
            verify_signature(&x.signature, &x.body, &["retry-secret-0123456"])?;
        }
        h.wait_all_acked().await?;
        assert_eq!(
            h.metric("pushgate_webhook_batches_total{result=\"http_error\"}"),
            2.0
        );
        Ok(())
    })
    .await
}

/// An app whose endpoint refuses connections does not hold back another app's events; its
/// own events stay un-acked until its settings point to a working receiver, which the
/// service picks up without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_does_not_delay_other_apps() -> TestResult {
    with_harness(|h| async move {
        let dead = h
            .create_app(Some(webhook(&dead_url().await?, "dead-secret-0123456")))
            .await?;
        let (url, healthy_rx, _) = receiver(&h, Behaviour::FailFirst(0), false).await?;
        let healthy = h
            .create_app(Some(webhook(&url, "live-secret-0123456")))
            .await?;
        // the dead app's events come first on the bus
        let dead_events: Vec<BusEvent> = (1..=3)
            .map(|i| event(&dead, &format!("d{i}"), 1, Status::Enqueued))
            .collect();
        let live_events: Vec<BusEvent> = (1..=3)
            .map(|i| event(&healthy, &format!("l{i}"), 1, Status::Enqueued))
            .collect();
        h.publish(&dead_events).await?;
        h.publish(&live_events).await?;
        // retries slow enough that the dead app stays in backoff for most of the test
        h.start(WebhookSettings {
            initial_backoff_ms: 1_000,
            max_backoff_ms: 2_000,
            ..h.settings()
        })
        .await?;

        wait_until("the healthy app's events", || async {
            Ok(healthy_rx.accepted_ids()?.len() == 3)
        })
        .await?;
        wait_until(
            "the healthy app's messages acked, the dead app's held",
            || async {
                let (ack_pending, pending, _) = h.consumer_state().await?;
                Ok(ack_pending == dead_events.len() && pending == 0)
            },
        )
        .await?;
        // the dead app's first attempt may come after the healthy app was served (each app's
        // batch waits out its own delay first): wait for it rather than expect it already
        wait_until("a refused connection to the dead endpoint", || async {
            Ok(h.metric("pushgate_webhook_batches_total{result=\"connect_error\"}") >= 1.0)
        })
        .await?;

        // the dead app gets a working endpoint: its held events are delivered, nothing lost
        let (url, revived_rx, _) = receiver(&h, Behaviour::FailFirst(0), false).await?;
        let mut fixed = dead.clone();
        fixed.webhook = Some(webhook(&url, "dead-secret-0123456"));
        h.store.put_app(&fixed).await?;
        wait_until("the revived app's events", || async {
            Ok(revived_rx.accepted_ids()?.len() == 3)
        })
        .await?;
        h.wait_all_acked().await?;
        Ok(())
    })
    .await
}

/// A batch retried for longer than the consumer's ack_wait (30 s) is not redelivered by
/// JetStream meanwhile: progress acks keep its messages alive, so the server delivers each
/// message exactly once and the receiver sees a single delivery id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_retries_keep_messages_alive() -> TestResult {
    with_harness(|h| async move {
        let outage = ConsumerName::Webhook.ack_wait() + Duration::from_secs(8);
        let (url, rx, _) = receiver(&h, Behaviour::FailFor(outage), false).await?;
        let app = h
            .create_app(Some(webhook(&url, "alive-secret-0123456")))
            .await?;
        let events = vec![
            event(&app, "k1", 1, Status::Enqueued),
            event(&app, "k2", 1, Status::Enqueued),
        ];
        h.publish(&events).await?;
        h.start(WebhookSettings {
            initial_backoff_ms: 200,
            max_backoff_ms: 1_000,
            ..h.settings()
        })
        .await?;

        let patience = DEADLINE + outage;
        let end = Instant::now() + patience;
        while rx.accepted_ids()?.len() < events.len() {
            if Instant::now() > end {
                return Err(fail("events not accepted after the outage"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        h.wait_all_acked().await?;
        let (_, _, delivered) = h.consumer_state().await?;
        assert_eq!(
            delivered,
            events.len() as u64,
            "JetStream redelivered held messages"
        );
        let hits = rx.hits();
        assert!(
            hits.iter().all(|x| x.delivery == hits[0].delivery),
            "more than one batch: {hits:?}"
        );
        assert!(hits.len() > 2, "the outage should have caused retries");
        Ok(())
    })
    .await
}

/// Shutdown does not acknowledge events that were not accepted: a later instance delivers
/// them once the endpoint works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_unaccepted_events_for_redelivery() -> TestResult {
    with_harness(|h| async move {
        let app = h
            .create_app(Some(webhook(&dead_url().await?, "stop-secret-0123456")))
            .await?;
        let events: Vec<BusEvent> = (1..=3)
            .map(|i| event(&app, &format!("s{i}"), 1, Status::Enqueued))
            .collect();
        h.publish(&events).await?;
        let first = h.start(h.settings()).await?;
        wait_until("a failed attempt", || async {
            Ok(h.metric("pushgate_webhook_batches_total{result=\"connect_error\"}") >= 1.0)
        })
        .await?;
        h.stop_service(&first).await?;

        let (url, rx, _) = receiver(&h, Behaviour::FailFirst(0), false).await?;
        let mut fixed = app.clone();
        fixed.webhook = Some(webhook(&url, "stop-secret-0123456"));
        h.store.put_app(&fixed).await?;
        h.start(h.settings()).await?;
        wait_until("the events after restart", || async {
            let mut got = rx.accepted_ids()?;
            got.sort();
            got.dedup();
            Ok(got == ["s1.1", "s2.1", "s3.1"])
        })
        .await?;
        Ok(())
    })
    .await
}

/// Publishes `events` as one batched stream message, written out by hand in the bus's batch
/// format (`pushgate_bus::batch`) so the consumer is checked against the format itself, not
/// against the publisher's timing.
async fn publish_as_one_batch(h: &Harness, events: &[BusEvent]) -> TestResult {
    let subject = h.bus.names().events(&events[0].app_id);
    let mut payload = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            payload.push(b'\n');
        }
        payload.extend(serde_json::to_vec(e)?);
    }
    let mut headers = pushgate_bus::async_nats::HeaderMap::new();
    headers.insert(
        pushgate_bus::batch::BATCH_HEADER,
        events.len().to_string().as_str(),
    );
    h.bus
        .jetstream()
        .publish_with_headers(subject, headers, payload.into())
        .await?
        .await?;
    Ok(())
}

/// One stream message carrying five events, posted in batches of two while the receiver
/// refuses for a while: the message stays unacknowledged until its last event is accepted,
/// is acknowledged once then, and no event is posted to an accepting receiver twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_stream_message_is_acked_after_its_last_event() -> TestResult {
    with_harness(|h| async move {
        let (url, rx, _) =
            receiver(&h, Behaviour::FailFor(Duration::from_millis(1500)), false).await?;
        let app = h
            .create_app(Some(webhook(&url, "batch-secret-0123456")))
            .await?;
        let events: Vec<BusEvent> = (1..=5)
            .map(|i| event(&app, &format!("b{i}"), 1, Status::Enqueued))
            .collect();
        publish_as_one_batch(&h, &events).await?;
        let settings = WebhookSettings {
            max_batch: 2,
            max_delay_ms: 20,
            ..h.settings()
        };
        h.start(settings).await?;
        wait_until("a refused attempt", || async {
            Ok(h.metric("pushgate_webhook_batches_total{result=\"http_error\"}") >= 1.0)
        })
        .await?;
        let (ack_pending, _, _) = h.consumer_state().await?;
        assert_eq!(ack_pending, 1, "held while its events are not accepted");

        wait_until("every event accepted", || async {
            Ok(rx.accepted_ids()?.len() == 5)
        })
        .await?;
        assert_eq!(h.wait_all_acked().await?, 1, "the message delivered once");
        let mut got = rx.accepted_ids()?;
        got.sort();
        assert_eq!(got, ["b1.1", "b2.1", "b3.1", "b4.1", "b5.1"]);
        assert_eq!(
            h.metric("pushgate_webhook_batches_total{result=\"ok\"}"),
            3.0
        );
        Ok(())
    })
    .await
}

/// With `max_held_events` reached (a receiver refusing everything), the instance takes no
/// more events from the bus: the batch being retried holds only what was taken before, and
/// the rest follow once the receiver accepts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_events_are_bounded() -> TestResult {
    with_harness(|h| async move {
        let (url, rx, _) =
            receiver(&h, Behaviour::FailFor(Duration::from_millis(1500)), false).await?;
        let app = h
            .create_app(Some(webhook(&url, "held-secret-0123456")))
            .await?;
        let events: Vec<BusEvent> = (1..=6)
            .map(|i| event(&app, &format!("h{i}"), 1, Status::Enqueued))
            .collect();
        h.publish(&events).await?;
        let settings = WebhookSettings {
            max_held_events: 2,
            max_delay_ms: 300,
            ..h.settings()
        };
        h.start(settings).await?;
        wait_until("every event accepted", || async {
            let mut got = rx.accepted_ids()?;
            got.sort();
            got.dedup();
            Ok(got.len() == 6)
        })
        .await?;
        for hit in rx.hits() {
            let n = hit.event_ids()?.len();
            assert!(n <= 2, "a batch of {n} events while at most 2 may be held");
        }
        assert!(
            rx.hits().iter().any(|h| h.answered != 200),
            "the receiver refused at first"
        );
        h.wait_all_acked().await?;
        Ok(())
    })
    .await
}
