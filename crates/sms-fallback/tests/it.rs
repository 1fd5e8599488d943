//! sms-fallback against the real NATS (nats://127.0.0.1:4222) and Redis
//! (redis://127.0.0.1:6379), with a local SMS provider stand-in that checks every request's
//! signature and answers from a script. Every test runs in its own namespace and deletes it.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use pushgate_bus::payloads::SmsRequest;
use pushgate_bus::Bus;
use pushgate_core::credentials::hmac_sha256;
use pushgate_core::event::{BusEvent, Event, EventKind};
use pushgate_core::time::{now_ms, rfc3339};
use pushgate_core::{App, AppId, Message, MessageId, MessageState, SmsFallback, Status};
use pushgate_runtime::metrics::ResultLabel;
use pushgate_runtime::{CancellationToken, Metrics};
use pushgate_store::redis;
use pushgate_store::{Change, Store};
use serde_json::{json, Value};
use sms_fallback::{Service, SmsSettings};

const NATS: &str = "nats://127.0.0.1:4222";
const REDIS: &str = "redis://127.0.0.1:6379";
const SECRET: &str = "sms-secret-for-tests";

/// How long a test waits for something that should happen within milliseconds; only hit when
/// the behaviour is broken.
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- provider stand-in

/// One request the stand-in received.
#[derive(Debug, Clone)]
struct Received {
    body: Value,
    answered: u16,
}

/// A scripted SMS provider: answers with the queued status codes (200 when the script is
/// empty) and records what it got. Requests with a bad signature are answered 401 and counted.
/// While `held`, answers wait (a slow provider: lets a test overlap two attempts).
#[derive(Clone, Default)]
struct StandIn {
    script: Arc<Mutex<VecDeque<u16>>>,
    received: Arc<Mutex<Vec<Received>>>,
    bad_signatures: Arc<Mutex<usize>>,
    held: Arc<tokio::sync::watch::Sender<bool>>,
}

impl StandIn {
    fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    fn script(&self, codes: &[u16]) {
        if let Ok(mut s) = self.script.lock() {
            s.extend(codes.iter().copied());
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn accepted(&self) -> usize {
        self.received().iter().filter(|r| r.answered == 200).count()
    }

    fn bad_signatures(&self) -> usize {
        self.bad_signatures.lock().map(|n| *n).unwrap_or(usize::MAX)
    }
}

/// Checks the signature independently of the crate's own verifier.
fn signature_ok(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(h) = headers
        .get("pushgate-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut t = None;
    let mut v1 = None;
    for part in h.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x.to_string()),
            Some(("v1", x)) => v1 = Some(x.to_string()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    let fresh = t
        .parse::<i64>()
        .map(|t| (now_ms() / 1000 - t).abs() <= 300)
        .unwrap_or(false);
    fresh && hex::encode(hmac_sha256(SECRET.as_bytes(), &signed)) == v1
}

async fn provider(State(s): State<StandIn>, headers: HeaderMap, body: Bytes) -> Response {
    if !signature_ok(&headers, &body) {
        if let Ok(mut n) = s.bad_signatures.lock() {
            *n += 1;
        }
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut held = s.held.subscribe();
    let _ = held.wait_for(|h| !*h).await;
    let code = s
        .script
        .lock()
        .ok()
        .and_then(|mut q| q.pop_front())
        .unwrap_or(200);
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let n = match s.received.lock() {
        Ok(mut r) => {
            r.push(Received {
                body,
                answered: code,
            });
            r.len()
        }
        Err(_) => 0,
    };
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_success() {
        (status, Json(json!({"id": format!("ref-{n}")}))).into_response()
    } else {
        (status, Json(json!({"error": format!("scripted {code}")}))).into_response()
    }
}

async fn start_stand_in() -> (StandIn, SocketAddr, CancellationToken) {
    let s = StandIn::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind stand-in");
    let addr = listener.local_addr().expect("stand-in address");
    let stop = CancellationToken::new();
    let app = Router::new()
        .route("/sms", post(provider))
        .with_state(s.clone());
    let token = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await;
    });
    (s, addr, stop)
}

// ---------------------------------------------------------------- environment

#[derive(Clone)]
struct Env {
    bus: Bus,
    store: Store,
    metrics: Arc<Metrics>,
    dlr: SocketAddr,
    provider: StandIn,
    provider_addr: SocketAddr,
}

/// A loopback port that was free a moment ago. For listeners whose address must be known
/// before they are bound (the public DLR base URL is a setting of the service it points to,
/// Kannel's ports go into its configuration file).
fn free_port() -> u16 {
    let [port] = free_ports::<1>();
    port
}

/// `N` distinct loopback ports that were free a moment ago (all held at once while picking, so
/// none is handed out twice).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port"))
        .collect();
    std::array::from_fn(|i| {
        held[i]
            .local_addr()
            .map(|a| a.port())
            .expect("bound loopback address")
    })
}

/// Starts a service in a fresh namespace, runs `body`, then stops everything and deletes the
/// namespace (also when `body` panics, whose panic is then passed on).
async fn with_env<F, Fut>(body: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    with_env_using(|_| {}, body).await
}

/// [`with_env`] with settings changed by `adjust` first. The delivery report listener is
/// reachable at its `public_dlr_base_url` (`http://127.0.0.1:<port>`).
async fn with_env_using<A, F, Fut>(adjust: A, body: F)
where
    A: FnOnce(&mut SmsSettings),
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let ns = format!("s{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let bus = Bus::connect(NATS, &ns)
        .await
        .expect("NATS at 127.0.0.1:4222");
    let store = Store::connect(REDIS, &ns)
        .await
        .expect("Redis at 127.0.0.1:6379");
    let metrics = Metrics::new();
    let (provider, provider_addr, stop_provider) = start_stand_in().await;
    let dlr_port = free_port();
    let mut settings = SmsSettings {
        ops_listen: "127.0.0.1:0".into(),
        dlr_listen: format!("127.0.0.1:{dlr_port}"),
        provider_timeout_ms: 5_000,
        retry_base_ms: 20,
        retry_max_ms: 200,
        allow_http_providers: true,
        public_dlr_base_url: Some(format!("http://127.0.0.1:{dlr_port}")),
        ..SmsSettings::default()
    };
    adjust(&mut settings);
    let svc = Service::build(settings, bus.clone(), store.clone(), metrics.clone())
        .await
        .expect("build service");
    let dlr = svc.dlr_addr();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(svc.run_until(shutdown.clone()));
    let env = Env {
        bus: bus.clone(),
        store: store.clone(),
        metrics,
        dlr,
        provider,
        provider_addr,
    };
    let outcome = tokio::spawn(body(env)).await;
    shutdown.cancel();
    let _ = running.await;
    stop_provider.cancel();
    let _ = bus.delete_namespace().await;
    let _ = store.delete_namespace().await;
    if let Err(e) = outcome {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("test body did not finish: {e}");
    }
}

impl Env {
    /// An app whose SMS provider is the stand-in (or whatever `sms` says).
    async fn app(&self, sms: Option<Value>) -> String {
        let now = now_ms();
        let app = App {
            app_id: AppId::generate().0,
            name: "sms test".into(),
            webhook: None,
            providers: Default::default(),
            sms,
            api_key_hash: hex::encode(uuid::Uuid::new_v4().as_bytes()),
            created_at: now,
            updated_at: now,
        };
        self.store.create_app(&app).await.expect("create app");
        app.app_id
    }

    async fn stand_in_app(&self) -> String {
        let url = format!("http://{}/sms", self.provider_addr);
        self.app(Some(
            json!({"provider": "webhook", "url": url, "secret": SECRET}),
        ))
        .await
    }

    /// Stores an enqueued message the way the ingress does.
    async fn message(
        &self,
        app_id: &str,
        user: Option<&str>,
        phone: &str,
        ttl_ms: i64,
        fallback: Option<&str>,
    ) -> String {
        let now = now_ms();
        let m = Message {
            id: MessageId::generate().0,
            app_id: app_id.into(),
            user_id: user.map(str::to_string),
            device_id: None,
            phone: Some(phone.into()),
            foreign_id: None,
            text: "Your code is 1234".into(),
            title: None,
            data: None,
            priority: Default::default(),
            collapse_key: None,
            sms_fallback: fallback.map(|t| SmsFallback {
                text: Some(t.into()),
            }),
            send_at: None,
            created_at: now,
            pos: 0,
            expires_at: now + ttl_ms,
        };
        let ev = BusEvent {
            app_id: app_id.into(),
            seq: 1,
            event: Event {
                id: format!("{}.1", m.id),
                event: EventKind::Status(Status::Enqueued),
                message_id: Some(m.id.clone()),
                foreign_id: None,
                user_id: m.user_id.clone(),
                device_id: None,
                channel: None,
                at: rfc3339(now),
                detail: None,
                text: None,
                data: None,
            },
        };
        let ev = serde_json::to_string(&ev).expect("event json");
        self.store
            .create_messages(&[(m.clone(), Status::Enqueued, ev)])
            .await
            .expect("create message");
        m.id
    }

    async fn request(&self, app_id: &str, message_id: &str, msg_id: &str) {
        let req = SmsRequest {
            app_id: app_id.into(),
            message_id: message_id.into(),
        };
        self.bus
            .publish_json(self.bus.names().sms(), msg_id, &req)
            .await
            .expect("publish SMS request");
    }

    async fn state(&self, id: &str) -> MessageState {
        self.store
            .message_state(id)
            .await
            .expect("read message")
            .expect("message exists")
    }

    async fn wait_status(&self, id: &str, want: Status) -> MessageState {
        let give_up = tokio::time::Instant::now() + PATIENCE;
        loop {
            let s = self.state(id).await;
            if s.status == want {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "status stayed {} (wanted {want}): {:?}",
                s.status,
                s.history
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn count(&self, result: &str) -> u64 {
        self.metrics
            .sms
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .get()
    }

    /// Waits until the `sms{result=…}` counters of `results` add up to `at_least`.
    async fn wait_count(&self, results: &[&str], at_least: u64) {
        let give_up = tokio::time::Instant::now() + PATIENCE;
        while results.iter().map(|r| self.count(r)).sum::<u64>() < at_least {
            assert!(
                tokio::time::Instant::now() < give_up,
                "metrics sms{results:?} stayed below {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn record(&self, id: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(self.store.keys().sms_record(id))
            .query_async(&mut self.store.conn())
            .await
            .expect("read send record")
    }

    async fn set_record(&self, id: &str, value: &str) {
        let _: () = redis::cmd("SET")
            .arg(self.store.keys().sms_record(id))
            .arg(value)
            .query_async(&mut self.store.conn())
            .await
            .expect("write send record");
    }

    async fn dlr(&self, id: &str, body: &Value, signature: Option<String>) -> (u16, String, Value) {
        pushgate_runtime::tls::install_crypto_provider();
        let body = serde_json::to_vec(body).expect("json");
        let mut req = reqwest::Client::new()
            .post(format!("http://{}/v1/sms/dlr/{id}", self.dlr))
            .header("content-type", "application/json")
            .body(body);
        if let Some(sig) = signature {
            req = req.header("Pushgate-Signature", sig);
        }
        let resp = req.send().await.expect("DLR request");
        answer_parts(resp).await
    }

    /// A delivery report signed now with the provider's secret.
    async fn signed_dlr(&self, id: &str, body: &Value) -> (u16, String, Value) {
        self.dlr(id, body, Some(sign(body, now_ms() / 1000, SECRET)))
            .await
    }
}

/// Status, content type and JSON body (null when it is not JSON) of an answer.
async fn answer_parts(resp: reqwest::Response) -> (u16, String, Value) {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let json = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, ct, json)
}

/// Serves `app` on a loopback port until the token is cancelled.
async fn spawn_server(app: Router) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound address");
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await;
    });
    (addr, stop)
}

/// The statuses of a message's history, oldest first.
fn statuses(s: &MessageState) -> Vec<Status> {
    s.history.iter().map(|h| h.status).collect()
}

fn sign(body: &Value, t: i64, secret: &str) -> String {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&body);
    format!(
        "t={t},v1={}",
        hex::encode(hmac_sha256(secret.as_bytes(), &signed))
    )
}

fn last(s: &MessageState) -> &pushgate_core::HistoryEntry {
    s.history.last().expect("history has entries")
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_requests_send_one_sms() {
    with_env(|env| async move {
        let app = env.stand_in_app().await;
        let id = env.message(&app, None, "+41791234567", 3_600_000, None).await;
        // two different Nats-Msg-Ids, so JetStream's duplicate window does not merge them;
        // the provider holds the first call until the second request has met its claim
        env.provider.hold(true);
        env.request(&app, &id, &format!("{id}.sms.a")).await;
        env.request(&app, &id, &format!("{id}.sms.b")).await;
        env.wait_count(&["in_flight"], 1).await;
        env.provider.hold(false);
        let s = env.wait_status(&id, Status::SmsSent).await;
        // the second request is settled once it has found the first one's record (or, when
        // it came late, the message already past sms_sent)
        env.wait_count(&["already_sent", "skipped"], 1).await;
        let got = env.provider.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            got[0].body,
            json!({"message_id": id, "to": "+41791234567", "text": "Your code is 1234", "segments": 1, "encoding": "GSM-7"})
        );
        assert_eq!(env.provider.bad_signatures(), 0);
        let h = last(&s);
        assert_eq!(h.channel.as_deref(), Some("sms"));
        assert_eq!(h.detail.as_deref(), Some("1 segment, GSM-7, ref ref-1"));
        assert_eq!(s.history.iter().filter(|h| h.status == Status::SmsSent).count(), 1);
        assert_eq!(env.record(&id).await.as_deref(), Some("sent:ref-1"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_are_retried_until_accepted() {
    with_env(|env| async move {
        env.provider.script(&[500, 500, 200]);
        let app = env.stand_in_app().await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        let s = env.wait_status(&id, Status::SmsSent).await;
        let got = env.provider.received();
        assert_eq!(
            got.iter().map(|r| r.answered).collect::<Vec<_>>(),
            vec![500, 500, 200]
        );
        assert_eq!(env.provider.accepted(), 1);
        // every retry is the same SMS: same body, so the provider can deduplicate
        assert!(got.iter().all(|r| r.body == got[0].body));
        assert_eq!(env.count("retry"), 2);
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("1 segment, GSM-7, ref ref-3")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_down_until_deadline_fails_the_sms() {
    with_env(|env| async move {
        env.provider.script(&[503; 1000]);
        let app = env.stand_in_app().await;
        // phone-only: the deadline is the message's own expiry, two seconds away
        let id = env.message(&app, None, "+41791234567", 2_000, None).await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        let s = env.wait_status(&id, Status::SmsFailed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("provider unavailable until deadline")
        );
        assert!(!env.provider.received().is_empty());
        assert_eq!(env.provider.accepted(), 0);
        assert_eq!(
            env.record(&id).await,
            None,
            "a failed attempt must not leave a claim behind"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_number_fails_without_calling_the_provider() {
    with_env(|env| async move {
        let app = env.stand_in_app().await;
        let id = env.message(&app, None, "0791234567", 3_600_000, None).await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        let s = env.wait_status(&id, Status::SmsFailed).await;
        assert_eq!(last(&s).detail.as_deref(), Some("invalid phone number"));
        assert_eq!(last(&s).channel.as_deref(), Some("sms"));
        assert!(env.provider.received().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_refusal_fails_the_sms_once() {
    with_env(|env| async move {
        env.provider.script(&[400]);
        let app = env.stand_in_app().await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms.a")).await;
        let s = env.wait_status(&id, Status::SmsFailed).await;
        let detail = last(&s).detail.clone().unwrap_or_default();
        assert!(
            detail.starts_with("provider refused the SMS: HTTP 400"),
            "{detail}"
        );
        // a later request for the same message does not try again
        env.request(&app, &id, &format!("{id}.sms.b")).await;
        env.wait_count(&["skipped"], 1).await;
        assert_eq!(env.provider.received().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_without_provider_fails_the_sms() {
    with_env(|env| async move {
        let bare = env.app(None).await;
        let id = env
            .message(&bare, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&bare, &id, &format!("{id}.sms")).await;
        let s = env.wait_status(&id, Status::SmsFailed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("no SMS provider configured for this app")
        );

        let odd = env.app(Some(json!({"provider": "carrier-pigeon"}))).await;
        let id = env
            .message(&odd, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&odd, &id, &format!("{id}.sms")).await;
        let s = env.wait_status(&id, Status::SmsFailed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("no SMS provider configured for this app")
        );
        assert!(env.provider.received().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_after_expiry_uses_the_fallback_text() {
    with_env(|env| async move {
        let app = env.stand_in_app().await;
        let id = env
            .message(
                &app,
                Some("user-1"),
                "+41791234567",
                3_600_000,
                Some("Grüße: 1234 €"),
            )
            .await;
        // while the message is open, its user may still get it: no SMS
        env.request(&app, &id, &format!("{id}.sms.early")).await;
        env.wait_count(&["skipped"], 1).await;
        assert!(env.provider.received().is_empty());
        let expired = Change {
            message_id: &id,
            to: Some(Status::Expired),
            ..Default::default()
        };
        env.store.change(&expired, now_ms()).await.expect("expire");
        env.request(&app, &id, &format!("{id}.sms")).await;
        env.wait_status(&id, Status::SmsSent).await;
        let got = env.provider.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body["text"], "Grüße: 1234 €");
        assert_eq!(got[0].body["encoding"], "GSM-7");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_send_is_not_repeated() {
    with_env(|env| async move {
        let app = env.stand_in_app().await;
        // the SMS went out, but its instance died before applying the transition
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.set_record(&id, "sent:ref-earlier").await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        let s = env.wait_status(&id, Status::SmsSent).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("1 segment, GSM-7, ref ref-earlier")
        );
        assert!(env.provider.received().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_attempts_claim_is_taken_over() {
    with_env(|env| async move {
        let app = env.stand_in_app().await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.set_record(&id, &format!("sending:sms-dead:{}", now_ms() - 120_000))
            .await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        env.wait_status(&id, Status::SmsSent).await;
        assert_eq!(env.provider.accepted(), 1);
        assert_eq!(env.record(&id).await.as_deref(), Some("sent:ref-1"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_delivery_report_marks_the_sms_delivered() {
    with_env(|env| async move {
        let app = env.stand_in_app().await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;

        // before any SMS went out there is nothing to report on
        let report = json!({"status": "delivered"});
        let (code, _, _) = env.signed_dlr(&id, &report).await;
        assert_eq!(code, 409);

        env.request(&app, &id, &format!("{id}.sms")).await;
        env.wait_status(&id, Status::SmsSent).await;
        let (code, _, body) = env.signed_dlr(&id, &report).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "sms_delivered");
        let s = env.wait_status(&id, Status::SmsDelivered).await;
        assert_eq!(last(&s).channel.as_deref(), Some("sms"));
        // the provider repeating itself changes nothing and is not an error
        let (code, _, body) = env.signed_dlr(&id, &report).await;
        assert_eq!(
            (code, body["status"].as_str()),
            (200, Some("sms_delivered"))
        );
        assert_eq!(
            env.state(&id)
                .await
                .history
                .iter()
                .filter(|h| h.status == Status::SmsDelivered)
                .count(),
            1
        );
    })
    .await;
}

/// A report that arrives before the send's own `sms_sent` was recorded (a fast SMSC reports
/// before the provider's answer to the send reaches the worker; or the worker stopped between
/// its send record and the transition) is kept: `sms_sent` is recorded first, then the
/// report. Providers do not send a report again, so answering 409 here would lose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_that_overtakes_the_send_is_kept() {
    with_env(|env| async move {
        let app = env.stand_in_app().await;
        let report = json!({"status": "delivered"});
        // the worker is talking to the provider; then: the send recorded, not yet applied
        for record in [
            format!("sending:sms-1:{}", now_ms()),
            "sent:ref-7".to_string(),
        ] {
            let id = env
                .message(&app, None, "+41791234567", 3_600_000, None)
                .await;
            env.set_record(&id, &record).await;
            let (code, _, body) = env.signed_dlr(&id, &report).await;
            assert_eq!(code, 200, "{body}");
            assert_eq!(body["status"], "sms_delivered");
            let s = env.wait_status(&id, Status::SmsDelivered).await;
            let moves: Vec<Status> = s.history.iter().map(|h| h.status).collect();
            assert_eq!(
                moves,
                [Status::Enqueued, Status::SmsSent, Status::SmsDelivered]
            );
            let sent = s.history.get(1).and_then(|h| h.detail.clone());
            if record.starts_with("sent:") {
                assert_eq!(sent.as_deref(), Some("1 segment, GSM-7, ref ref-7"));
            } else {
                assert_eq!(sent.as_deref(), Some("1 segment, GSM-7"));
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_delivery_report_marks_the_sms_failed() {
    with_env(|env| async move {
        let app = env.stand_in_app().await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        env.wait_status(&id, Status::SmsSent).await;
        let report = json!({"status": "failed", "detail": "handset unreachable"});
        let (code, _, _) = env.signed_dlr(&id, &report).await;
        assert_eq!(code, 200);
        let s = env.wait_status(&id, Status::SmsFailed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("SMS provider reported failure: handset unreachable")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_or_stale_delivery_reports_are_refused() {
    with_env(|env| async move {
        let app = env.stand_in_app().await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        env.wait_status(&id, Status::SmsSent).await;
        let report = json!({"status": "delivered"});
        let now = now_ms() / 1000;
        for sig in [
            None,
            Some(sign(&report, now, "not-the-secret")),
            Some(sign(&report, now - 301, SECRET)),
            Some("t=abc,v1=00".to_string()),
        ] {
            let (code, ct, body) = env.dlr(&id, &report, sig.clone()).await;
            assert_eq!(code, 401, "{sig:?}: {body}");
            assert_eq!(ct, "application/problem+json");
            assert_eq!(body["type"], "urn:pushgate:problem:unauthorized");
            assert_eq!(body["status"], 401);
        }
        // signed for another body: the signature covers the exact bytes
        let other = json!({"status": "failed"});
        let (code, _, _) = env.dlr(&id, &report, Some(sign(&other, now, SECRET))).await;
        assert_eq!(code, 401);
        assert_eq!(env.state(&id).await.status, Status::SmsSent);
        // unknown message ids are not found
        let (code, ct, _) = env
            .dlr(
                &MessageId::generate().0,
                &report,
                Some(sign(&report, now, SECRET)),
            )
            .await;
        assert_eq!((code, ct.as_str()), (404, "application/problem+json"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_send_rate_holds_requests_back_without_failing_them() {
    with_env(|env| async move {
        let url = format!("http://{}/sms", env.provider_addr);
        let app = env
            .app(Some(
                json!({"provider": "webhook", "url": url, "secret": SECRET, "max_per_second": 2}),
            ))
            .await;
        // this second and the next one are used up already (by other instances, say)
        let now = now_ms() / 1000;
        for second in now..now + 2 {
            let _: () = redis::cmd("SET")
                .arg(
                    env.store
                        .keys()
                        .rate(&sms_fallback::throttle::window_name(&app), second),
                )
                .arg(2)
                .arg("EX")
                .arg(10)
                .query_async(&mut env.store.conn())
                .await
                .expect("fill the rate window");
        }
        let mut ids = Vec::new();
        for _ in 0..3 {
            let id = env
                .message(&app, None, "+41791234567", 3_600_000, None)
                .await;
            env.request(&app, &id, &format!("{id}.sms")).await;
            ids.push(id);
        }
        env.wait_count(&["throttled"], 1).await;
        for id in &ids {
            let s = env.wait_status(id, Status::SmsSent).await;
            assert_eq!(statuses(&s), vec![Status::Enqueued, Status::SmsSent]);
        }
        assert_eq!(env.provider.accepted(), 3);
        assert_eq!(env.count("sent"), 3);
        assert_eq!(env.count("error") + env.count("gave_up"), 0);
    })
    .await;
}

#[path = "it/twilio.rs"]
mod twilio;

#[path = "it/kannel.rs"]
mod kannel;
