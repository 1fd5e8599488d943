//! The bridge's reaction logic against the real NATS (nats://127.0.0.1:4222) and Redis
//! (redis://127.0.0.1:6379), with a scripted [`Provider`] standing in for a protocol client;
//! and the real protocol clients against the local stand-ins of APNs, FCM, HMS and Web Push
//! ([`providers`]). Every test runs in its own namespace and deletes it.

mod providers;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use native_push_bridge::{
    AppCredentials, BridgeSettings, Notification, NotificationKind, Provider, ProviderAccepted,
    ProviderError, Providers, Service,
};
use pushgate_bus::payloads::PushRequest;
use pushgate_bus::Bus;
use pushgate_core::event::{BusEvent, Event, EventKind};
use pushgate_core::time::{now_ms, rfc3339};
use pushgate_core::{
    credentials, App, AppId, Device, Message, MessageId, MessageState, Platform, ScramCredentials,
    Status, TokenState,
};
use pushgate_runtime::metrics::ResultLabel;
use pushgate_runtime::{CancellationToken, Metrics};
use pushgate_store::{redis, Store};
use serde_json::{json, Value};

const NATS: &str = "nats://127.0.0.1:4222";
const REDIS: &str = "redis://127.0.0.1:6379";

/// How long a test waits for something that should happen within milliseconds; only hit when
/// the behaviour is broken.
const PATIENCE: Duration = Duration::from_secs(30);

type Answer = Result<ProviderAccepted, ProviderError>;

/// One call the scripted provider received.
#[derive(Debug, Clone)]
struct Call {
    app_id: String,
    creds: Value,
    device_id: String,
    notification: Notification,
}

/// Which calls of the scripted provider wait.
#[derive(Debug, Clone, Default, PartialEq)]
enum Hold {
    #[default]
    Nothing,
    All,
    App(String),
}

/// A provider answering from a script (success with reference `fcm-<n>` once it runs out).
/// While held, answers wait (a slow provider: lets a test overlap two attempts).
#[derive(Default)]
struct Scripted {
    answers: Mutex<VecDeque<Answer>>,
    calls: Mutex<Vec<Call>>,
    held: tokio::sync::watch::Sender<Hold>,
}

impl Scripted {
    fn hold(&self, held: bool) {
        self.held
            .send_replace(if held { Hold::All } else { Hold::Nothing });
    }

    /// Holds only the calls of one app (a slow provider for that app alone).
    fn hold_app(&self, app_id: &str) {
        self.held.send_replace(Hold::App(app_id.to_string()));
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Provider for Scripted {
    fn send<'a>(
        &'a self,
        app: AppCredentials<'a>,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, Answer> {
        Box::pin(async move {
            let mut held = self.held.subscribe();
            let _ = held
                .wait_for(|h| match h {
                    Hold::Nothing => true,
                    Hold::All => false,
                    Hold::App(a) => a != app.app_id,
                })
                .await;
            let n = match self.calls.lock() {
                Ok(mut c) => {
                    c.push(Call {
                        app_id: app.app_id.to_string(),
                        creds: app.creds.clone(),
                        device_id: device.device_id.clone(),
                        notification: notification.clone(),
                    });
                    c.len()
                }
                Err(_) => 0,
            };
            let scripted = self.answers.lock().ok().and_then(|mut a| a.pop_front());
            scripted.unwrap_or_else(|| {
                Ok(ProviderAccepted {
                    reference: Some(format!("fcm-{n}")),
                })
            })
        })
    }
}

#[derive(Clone)]
struct Env {
    bus: Bus,
    store: Store,
    metrics: Arc<Metrics>,
    provider: Arc<Scripted>,
}

/// The providers a test bridge gets.
enum Build {
    /// The scripted provider, registered for `fcm`, with its answers.
    Scripted(Vec<Answer>),
    /// No provider at all.
    Empty,
    /// The real clients, as [`Service::build`] makes them (settings point at stand-ins).
    Real,
}

/// Settings for test bridges: quick retries.
fn test_settings() -> BridgeSettings {
    BridgeSettings {
        ops_listen: "127.0.0.1:0".into(),
        send_timeout_ms: 5_000,
        retry_base_ms: 20,
        retry_max_ms: 200,
        ..BridgeSettings::default()
    }
}

/// Starts a bridge in a fresh namespace (with the scripted provider registered for `fcm`
/// when `with_provider`, else without any provider), runs `body`, then stops everything and
/// deletes the namespace (also when `body` panics, whose panic is then passed on).
async fn with_env<F, Fut>(with_provider: bool, answers: Vec<Answer>, body: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let build = if with_provider {
        Build::Scripted(answers)
    } else {
        Build::Empty
    };
    with_bridge(test_settings(), build, body).await
}

/// [`with_env`] with the settings and providers given.
async fn with_bridge<F, Fut>(settings: BridgeSettings, build: Build, body: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let ns = format!("b{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let bus = Bus::connect(NATS, &ns)
        .await
        .expect("NATS at 127.0.0.1:4222");
    let store = Store::connect(REDIS, &ns)
        .await
        .expect("Redis at 127.0.0.1:6379");
    let metrics = Metrics::new();
    let (answers, registry) = match build {
        Build::Scripted(answers) => (answers, Some(true)),
        Build::Empty => (vec![], Some(false)),
        Build::Real => (vec![], None),
    };
    let provider = Arc::new(Scripted {
        answers: Mutex::new(answers.into()),
        ..Scripted::default()
    });
    let svc = match registry {
        Some(with_scripted) => {
            let mut providers = Providers::new();
            if with_scripted {
                providers.insert("fcm", provider.clone() as Arc<dyn Provider>);
            }
            Service::build_with_providers(
                settings,
                bus.clone(),
                store.clone(),
                metrics.clone(),
                providers,
            )
            .await
        }
        None => Service::build(settings, bus.clone(), store.clone(), metrics.clone()).await,
    }
    .expect("build bridge");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(svc.run_until(shutdown.clone()));
    let env = Env {
        bus: bus.clone(),
        store: store.clone(),
        metrics,
        provider,
    };
    let outcome = tokio::spawn(body(env)).await;
    shutdown.cancel();
    let _ = running.await;
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
    async fn app(&self, providers: Value) -> String {
        self.app_record(providers).await.app_id
    }

    /// Creates an app and returns it whole (to update it later).
    async fn app_record(&self, providers: Value) -> App {
        let now = now_ms();
        let app = App {
            app_id: AppId::generate().0,
            name: "bridge test".into(),
            webhook: None,
            providers: providers.as_object().cloned().unwrap_or_default(),
            sms: None,
            api_key_hash: hex_id(),
            created_at: now,
            updated_at: now,
        };
        self.store.create_app(&app).await.expect("create app");
        app
    }

    /// Replaces the app's provider settings, as the admin API does (new `updated_at`).
    async fn update_providers(&self, app: &mut App, providers: Value) {
        app.providers = providers.as_object().cloned().unwrap_or_default();
        app.updated_at = app.updated_at.max(now_ms()) + 1;
        self.store.put_app(app).await.expect("update app");
    }

    async fn fcm_app(&self) -> String {
        self.app(json!({"fcm": {"project_id": "pushgate-test"}}))
            .await
    }

    async fn device(&self, app_id: &str, device_id: &str) -> Device {
        self.device_on(
            app_id,
            device_id,
            Platform::Android,
            Some(format!("token-{device_id}")),
            None,
        )
        .await
    }

    /// Registers a device of `platform` with a push token or a Web Push subscription.
    async fn device_on(
        &self,
        app_id: &str,
        device_id: &str,
        platform: Platform,
        push_token: Option<String>,
        webpush: Option<pushgate_core::WebPushSubscription>,
    ) -> Device {
        let now = now_ms();
        let d = Device {
            app_id: app_id.into(),
            device_id: device_id.into(),
            user_id: "user-1".into(),
            platform,
            push_token,
            webpush,
            phone: None,
            locale: None,
            jid_local: credentials::jid_local(app_id, device_id),
            generation: 0,
            token_state: TokenState::Valid,
            scram: ScramCredentials {
                salt: String::new(),
                iterations: 4096,
                stored_key: String::new(),
                server_key: String::new(),
            },
            created_at: now,
            updated_at: now,
        };
        self.store
            .put_device(&d, None)
            .await
            .expect("register device");
        d
    }

    /// Stores an enqueued message for `user-1` targeted at `devices`, as ingress and router do.
    async fn message(&self, app_id: &str, devices: &[&str], ttl_ms: i64) -> String {
        self.message_with(app_id, devices, ttl_ms, |_| {}).await
    }

    /// [`Env::message`], changed by `edit` before it is stored.
    async fn message_with(
        &self,
        app_id: &str,
        devices: &[&str],
        ttl_ms: i64,
        edit: impl FnOnce(&mut Message),
    ) -> String {
        let now = now_ms();
        let mut m = Message {
            id: MessageId::generate().0,
            app_id: app_id.into(),
            user_id: Some("user-1".into()),
            device_id: None,
            phone: None,
            foreign_id: None,
            text: "Your parcel is here".into(),
            title: Some("Parcel".into()),
            data: Some(json!({"parcel": 7})),
            priority: Default::default(),
            collapse_key: None,
            sms_fallback: None,
            send_at: None,
            created_at: now,
            pos: 0,
            expires_at: now + ttl_ms,
        };
        edit(&mut m);
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
        let targets: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
        self.store
            .target_devices(&m, &targets)
            .await
            .expect("target devices");
        m.id
    }

    async fn push(
        &self,
        app_id: &str,
        message_id: &str,
        device_id: &str,
        kind: &str,
        msg_id: &str,
    ) {
        let req = PushRequest {
            app_id: app_id.into(),
            device_id: device_id.into(),
            message_id: message_id.into(),
            kind: kind.into(),
        };
        self.bus
            .publish_json(self.bus.names().push(), msg_id, &req)
            .await
            .expect("publish push request");
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
            .native_push
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .get()
    }

    /// Waits until `native_push{result}` reaches `at_least`: the bridge counts a request after
    /// everything it does for it, so afterwards its effects can be checked.
    async fn wait_count(&self, result: &str, at_least: u64) {
        self.wait_counts(&[result], at_least).await;
    }

    /// Waits until the `native_push{result=…}` counters of `results` add up to `at_least`.
    async fn wait_counts(&self, results: &[&str], at_least: u64) {
        let give_up = tokio::time::Instant::now() + PATIENCE;
        while results.iter().map(|r| self.count(r)).sum::<u64>() < at_least {
            assert!(
                tokio::time::Instant::now() < give_up,
                "metrics native_push{results:?} stayed below {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn token_state(&self, app_id: &str, device_id: &str) -> TokenState {
        self.store
            .device(app_id, device_id)
            .await
            .expect("read device")
            .expect("device exists")
            .token_state
    }
}

fn hex_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn last(s: &MessageState) -> &pushgate_core::HistoryEntry {
    s.history.last().expect("history has entries")
}

fn sent_count(s: &MessageState) -> usize {
    s.history
        .iter()
        .filter(|h| h.status == Status::Sent)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_push_success_marks_the_message_sent() {
    with_env(true, vec![], |env| async move {
        let app = env.fcm_app().await;
        env.device(&app, "phone-1").await;
        let id = env.message(&app, &["phone-1"], 3_600_000).await;
        env.push(
            &app,
            &id,
            "phone-1",
            "channel",
            &format!("{id}.phone-1.push"),
        )
        .await;
        let s = env.wait_status(&id, Status::Sent).await;
        let h = last(&s);
        assert_eq!(
            (h.channel.as_deref(), h.device_id.as_deref()),
            (Some("fcm"), Some("phone-1"))
        );
        assert_eq!(h.detail.as_deref(), Some("ref fcm-1"));
        let calls = env.provider.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].creds, json!({"project_id": "pushgate-test"}));
        assert_eq!(calls[0].device_id, "phone-1");
        let n = &calls[0].notification;
        assert_eq!(n.kind, NotificationKind::Channel);
        assert_eq!(
            (n.message_id.as_str(), n.title.as_deref(), n.text.as_str()),
            (id.as_str(), Some("Parcel"), "Your parcel is here")
        );
        assert_eq!(n.data, Some(json!({"parcel": 7})));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_token_marks_the_device_and_fails_the_message() {
    let answers = vec![Err(ProviderError::InvalidToken {
        detail: "UNREGISTERED".into(),
    })];
    with_env(true, answers, |env| async move {
        let app = env.fcm_app().await;
        env.device(&app, "phone-1").await;
        let id = env.message(&app, &["phone-1"], 3_600_000).await;
        env.push(
            &app,
            &id,
            "phone-1",
            "channel",
            &format!("{id}.phone-1.push"),
        )
        .await;
        let s = env.wait_status(&id, Status::Failed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("fcm rejected the push token: UNREGISTERED")
        );
        assert_eq!(last(&s).channel.as_deref(), Some("fcm"));
        assert_eq!(env.token_state(&app, "phone-1").await, TokenState::Invalid);
        assert_eq!(env.count("invalid_token"), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_answers_are_retried_and_sent_once() {
    let answers = vec![
        Err(ProviderError::Retryable {
            retry_after: None,
            detail: "HTTP 503".into(),
        }),
        Err(ProviderError::Retryable {
            retry_after: Some(Duration::from_millis(30)),
            detail: "HTTP 429".into(),
        }),
    ];
    with_env(true, answers, |env| async move {
        let app = env.fcm_app().await;
        env.device(&app, "phone-1").await;
        let id = env.message(&app, &["phone-1"], 3_600_000).await;
        env.push(
            &app,
            &id,
            "phone-1",
            "channel",
            &format!("{id}.phone-1.push"),
        )
        .await;
        let s = env.wait_status(&id, Status::Sent).await;
        assert_eq!(env.provider.calls().len(), 3);
        assert_eq!(env.count("retry"), 2);
        assert_eq!(sent_count(&s), 1);
        assert_eq!(last(&s).detail.as_deref(), Some("ref fcm-3"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_request_calls_the_provider_once() {
    with_env(true, vec![], |env| async move {
        let app = env.fcm_app().await;
        env.device(&app, "phone-1").await;
        let id = env.message(&app, &["phone-1"], 3_600_000).await;
        // two different Nats-Msg-Ids, so JetStream's duplicate window does not merge them;
        // the provider holds the first call until the second request has met its claim
        env.provider.hold(true);
        env.push(&app, &id, "phone-1", "channel", &format!("{id}.phone-1.a"))
            .await;
        env.push(&app, &id, "phone-1", "channel", &format!("{id}.phone-1.b"))
            .await;
        env.wait_count("in_flight", 1).await;
        env.provider.hold(false);
        env.wait_status(&id, Status::Sent).await;
        env.wait_count("duplicate", 1).await;
        assert_eq!(env.provider.calls().len(), 1);
        assert_eq!(sent_count(&env.state(&id).await), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeup_success_is_counted_not_a_status_change() {
    with_env(true, vec![], |env| async move {
        let app = env.fcm_app().await;
        env.device(&app, "phone-1").await;
        let id = env.message(&app, &["phone-1"], 3_600_000).await;
        env.push(
            &app,
            &id,
            "phone-1",
            "wakeup",
            &format!("{id}.phone-1.push"),
        )
        .await;
        env.wait_count("ok", 1).await;
        assert_eq!(env.state(&id).await.status, Status::Enqueued);
        let calls = env.provider.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].notification.kind, NotificationKind::Wakeup);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_provider_channel_messages_fail_and_wakeups_are_counted() {
    // a registry without a client for the device's channel
    with_env(false, vec![], |env| async move {
        let app = env.fcm_app().await;
        env.device(&app, "phone-1").await;
        let wake = env.message(&app, &["phone-1"], 3_600_000).await;
        env.push(
            &app,
            &wake,
            "phone-1",
            "wakeup",
            &format!("{wake}.phone-1.push"),
        )
        .await;
        env.wait_count("no_provider", 1).await;
        assert_eq!(env.state(&wake).await.status, Status::Enqueued);
        let chan = env.message(&app, &["phone-1"], 3_600_000).await;
        env.push(
            &app,
            &chan,
            "phone-1",
            "channel",
            &format!("{chan}.phone-1.push"),
        )
        .await;
        let s = env.wait_status(&chan, Status::Failed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("no fcm provider configured for this app")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_without_credentials_for_the_channel_fails_the_message() {
    with_env(true, vec![], |env| async move {
        let app = env.app(json!({"apns": {"team_id": "T"}})).await;
        env.device(&app, "phone-1").await;
        let id = env.message(&app, &["phone-1"], 3_600_000).await;
        env.push(
            &app,
            &id,
            "phone-1",
            "channel",
            &format!("{id}.phone-1.push"),
        )
        .await;
        let s = env.wait_status(&id, Status::Failed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("no fcm provider configured for this app")
        );
        assert!(env.provider.calls().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_refusals_and_rejected_credentials() {
    let answers = vec![
        Err(ProviderError::Permanent {
            detail: "payload too large".into(),
        }),
        Err(ProviderError::Credentials {
            detail: "invalid service account key".into(),
        }),
        Err(ProviderError::Permanent {
            detail: "payload too large".into(),
        }),
    ];
    with_env(true, answers, |env| async move {
        let app = env.fcm_app().await;
        env.device(&app, "phone-1").await;
        let big = env.message(&app, &["phone-1"], 3_600_000).await;
        env.push(
            &app,
            &big,
            "phone-1",
            "channel",
            &format!("{big}.phone-1.push"),
        )
        .await;
        let s = env.wait_status(&big, Status::Failed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("fcm refused the notification: payload too large")
        );

        let creds = env.message(&app, &["phone-1"], 3_600_000).await;
        env.push(
            &app,
            &creds,
            "phone-1",
            "channel",
            &format!("{creds}.phone-1.push"),
        )
        .await;
        let s = env.wait_status(&creds, Status::Failed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("provider credentials rejected: invalid service account key")
        );
        assert_eq!(env.count("credentials"), 1);

        // a refused wakeup leaves the message waiting for XMPP or its expiry
        let wake = env.message(&app, &["phone-1"], 3_600_000).await;
        env.push(
            &app,
            &wake,
            "phone-1",
            "wakeup",
            &format!("{wake}.phone-1.push"),
        )
        .await;
        env.wait_count("permanent", 2).await;
        assert_eq!(env.state(&wake).await.status, Status::Enqueued);
        assert_eq!(env.token_state(&app, "phone-1").await, TokenState::Valid);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_token_among_several_devices_leaves_the_message_open() {
    let answers = vec![Err(ProviderError::InvalidToken {
        detail: "UNREGISTERED".into(),
    })];
    with_env(true, answers, |env| async move {
        let app = env.fcm_app().await;
        env.device(&app, "phone-1").await;
        env.device(&app, "tablet-2").await;
        let id = env.message(&app, &["phone-1", "tablet-2"], 3_600_000).await;
        env.push(
            &app,
            &id,
            "phone-1",
            "channel",
            &format!("{id}.phone-1.push"),
        )
        .await;
        env.wait_count("invalid_token", 1).await;
        assert_eq!(env.token_state(&app, "phone-1").await, TokenState::Invalid);
        assert_eq!(env.state(&id).await.status, Status::Enqueued);
        // the other device still gets it
        env.push(
            &app,
            &id,
            "tablet-2",
            "channel",
            &format!("{id}.tablet-2.push"),
        )
        .await;
        let s = env.wait_status(&id, Status::Sent).await;
        assert_eq!(last(&s).device_id.as_deref(), Some("tablet-2"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_message_expiry() {
    let answers = (0..1000)
        .map(|_| {
            Err(ProviderError::Retryable {
                retry_after: None,
                detail: "HTTP 503".into(),
            })
        })
        .collect();
    with_env(true, answers, |env| async move {
        let app = env.fcm_app().await;
        env.device(&app, "phone-1").await;
        let id = env.message(&app, &["phone-1"], 1_500).await;
        env.push(
            &app,
            &id,
            "phone-1",
            "channel",
            &format!("{id}.phone-1.push"),
        )
        .await;
        // settled either right after a failed attempt at the expiry, or by the redelivery
        // that the last retry wait brought up to the expiry
        env.wait_counts(&["gave_up", "expired"], 1).await;
        // the message's expiry (owned by the router) decides its status, not the bridge
        assert_eq!(env.state(&id).await.status, Status::Enqueued);
        assert!(env.count("retry") >= 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_interrupted_mid_call_is_not_repeated() {
    with_env(true, vec![], |env| async move {
        let app = env.fcm_app().await;
        env.device(&app, "phone-1").await;
        let id = env.message(&app, &["phone-1"], 3_600_000).await;
        let key = env.store.keys().push_record(&id, "phone-1");
        let dead = format!("sending:bridge-dead:{}", now_ms() - 120_000);
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(&dead)
            .query_async(&mut env.store.conn())
            .await
            .expect("set record");
        env.push(
            &app,
            &id,
            "phone-1",
            "channel",
            &format!("{id}.phone-1.push"),
        )
        .await;
        env.wait_count("unknown", 1).await;
        assert!(env.provider.calls().is_empty());
        let rec: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut env.store.conn())
            .await
            .expect("get record");
        assert!(
            rec.as_deref().is_some_and(|r| r.starts_with("unknown:")),
            "{rec:?}"
        );
        assert_eq!(env.state(&id).await.status, Status::Enqueued);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_app_does_not_starve_the_others() {
    // two handler slots in all, one provider call in flight per app: while the provider holds
    // every call of app A, A's further requests go back to the bus instead of taking the
    // second slot, so app B's push goes through
    let settings = BridgeSettings {
        concurrency: 2,
        max_in_flight_per_app: 1,
        ..test_settings()
    };
    with_bridge(settings, Build::Scripted(vec![]), |env| async move {
        let slow = env.fcm_app().await;
        let other = env.fcm_app().await;
        env.device(&slow, "phone-a").await;
        env.device(&other, "phone-b").await;
        env.provider.hold_app(&slow);
        let mut slow_ids = Vec::new();
        for _ in 0..3 {
            let id = env.message(&slow, &["phone-a"], 3_600_000).await;
            env.push(
                &slow,
                &id,
                "phone-a",
                "channel",
                &format!("{id}.phone-a.push"),
            )
            .await;
            slow_ids.push(id);
        }
        env.wait_count("app_busy", 1).await;
        let quick = env.message(&other, &["phone-b"], 3_600_000).await;
        env.push(
            &other,
            &quick,
            "phone-b",
            "channel",
            &format!("{quick}.phone-b.push"),
        )
        .await;
        env.wait_status(&quick, Status::Sent).await;
        // A's one call is still held: nothing of A is sent
        for id in &slow_ids {
            assert_eq!(env.state(id).await.status, Status::Enqueued);
        }
        env.provider.hold(false);
        for id in &slow_ids {
            env.wait_status(id, Status::Sent).await;
        }
        let calls = env.provider.calls();
        assert_eq!(calls.iter().filter(|c| c.app_id == slow).count(), 3);
        assert_eq!(calls.iter().filter(|c| c.app_id == other).count(), 1);
    })
    .await;
}
