//! Prometheus metrics. Every metric name Pushgate exports is declared here, once, so the
//! dashboard (deploy/grafana/pushgate.json) and docs/operations.md can rely on them.
//!
//! Counters are exported with the `_total` suffix. Gauges that describe shared state (open
//! messages, consumer lag) are sampled by every router; all routers report the same value, so
//! dashboards take `max` over instances rather than `sum`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use pushgate_bus::{Bus, ConsumerName};
use pushgate_core::event::EventKind;
use pushgate_core::Status;
use pushgate_store::Store;
use tokio_util::sync::CancellationToken;

/// Label: app id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabel {
    pub app: String,
}

/// Labels: status and channel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
    pub channel: String,
}

/// Label: outcome of an operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Labels of HTTP requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub status: u16,
}

/// Label: which outbox.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboxLabel {
    pub outbox: String,
}

/// Label: durable JetStream consumer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabel {
    pub consumer: String,
}

/// Labels of a native push provider error: the channel (`apns`, `fcm`, `hms`, `webpush`) and
/// the bridge's class of the answer (`invalid_token`, `retryable`, `permanent`,
/// `credentials`, `unknown`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderErrorLabels {
    pub provider: String,
    pub code: String,
}

/// How often routers sample the backlog gauges: often enough for a 30 s scrape interval to
/// see changes, rare enough that the JetStream API calls (two per consumer) cost nothing.
pub const BACKLOG_SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Buckets of the end-to-end latency histograms: 1 ms doubling to about 35 min, because a
/// connected device confirms within milliseconds while an offline one may take minutes.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 22)
}

/// The acceptance time (epoch ms) of a message, read from its id: message ids are UUIDv7,
/// whose first 48 bits are the creation time in ms. This lets any service measure
/// end-to-end latency from an event alone, without reading the message. `None` for anything
/// that is not a canonical UUIDv7.
pub fn accepted_at_ms(message_id: &str) -> Option<i64> {
    let b = message_id.as_bytes();
    let canonical = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    if !canonical || b[14] != b'7' {
        return None;
    }
    let hi = u64::from_str_radix(message_id.get(0..8)?, 16).ok()?;
    let lo = u64::from_str_radix(message_id.get(9..13)?, 16).ok()?;
    i64::try_from((hi << 16) | lo).ok()
}

/// Seconds from a message's acceptance to `now_ms`; clock skew between hosts is clamped to 0.
fn since_acceptance(message_id: &str, now_ms: i64) -> Option<f64> {
    accepted_at_ms(message_id).map(|t| (now_ms - t).max(0) as f64 / 1000.0)
}

/// All metrics of a process (one registry even when several services share the process).
pub struct Metrics {
    registry: Registry,
    /// `pushgate_messages_accepted_total{app}`
    pub accepted: Family<AppLabel, Counter>,
    /// `pushgate_status_transitions_total{status,channel}`
    pub transitions: Family<StatusLabels, Counter>,
    /// `pushgate_http_requests_total{route,status}`
    pub http_requests: Family<HttpLabels, Counter>,
    /// `pushgate_xmpp_sessions`
    pub xmpp_sessions: Gauge,
    /// `pushgate_xmpp_stanzas_out_total`
    pub xmpp_stanzas_out: Counter,
    /// `pushgate_router_handled_total{result}`
    pub router_handled: Family<ResultLabel, Counter>,
    /// `pushgate_webhook_batches_total{result}`
    pub webhook_batches: Family<ResultLabel, Counter>,
    /// `pushgate_webhook_events_total`
    pub webhook_events: Counter,
    /// `pushgate_webhook_dead_letters_total{app}`
    pub webhook_dead_letters: Family<AppLabel, Counter>,
    /// `pushgate_outbox_republished_total{outbox}`
    pub outbox_republished: Family<OutboxLabel, Counter>,
    /// `pushgate_outbox_entries{outbox}`
    pub outbox_entries: Family<OutboxLabel, Gauge>,
    /// `pushgate_accept_to_sent_seconds`
    pub accept_to_sent: Histogram,
    /// `pushgate_accept_to_delivered_seconds`
    pub accept_to_delivered: Histogram,
    /// `pushgate_accept_to_webhook_delivered_seconds`
    pub accept_to_webhook_delivered: Histogram,
    /// `pushgate_open_messages`
    pub open_messages: Gauge,
    /// `pushgate_scheduled_messages`
    pub scheduled_messages: Gauge,
    /// `pushgate_consumer_lag{consumer}`
    pub consumer_lag: Family<ConsumerLabel, Gauge>,
    /// `pushgate_consumer_ack_pending{consumer}`
    pub consumer_ack_pending: Family<ConsumerLabel, Gauge>,
    /// `pushgate_native_push_total{result}`
    pub native_push: Family<ResultLabel, Counter>,
    /// `pushgate_native_push_errors_total{provider,code}`
    pub native_push_errors: Family<ProviderErrorLabels, Counter>,
    /// `pushgate_sms_total{result}`
    pub sms: Family<ResultLabel, Counter>,
}

impl Metrics {
    /// Builds and registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("pushgate");
        let m = Metrics {
            accepted: Family::default(),
            transitions: Family::default(),
            http_requests: Family::default(),
            xmpp_sessions: Gauge::default(),
            xmpp_stanzas_out: Counter::default(),
            router_handled: Family::default(),
            webhook_batches: Family::default(),
            webhook_events: Counter::default(),
            webhook_dead_letters: Family::default(),
            outbox_republished: Family::default(),
            outbox_entries: Family::default(),
            accept_to_sent: Histogram::new(latency_buckets()),
            accept_to_delivered: Histogram::new(latency_buckets()),
            accept_to_webhook_delivered: Histogram::new(latency_buckets()),
            open_messages: Gauge::default(),
            scheduled_messages: Gauge::default(),
            consumer_lag: Family::default(),
            consumer_ack_pending: Family::default(),
            native_push: Family::default(),
            native_push_errors: Family::default(),
            sms: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "messages_accepted",
            "Messages accepted, by app",
            m.accepted.clone(),
        );
        registry.register(
            "status_transitions",
            "Status transitions, by status and channel",
            m.transitions.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP API requests, by route and status",
            m.http_requests.clone(),
        );
        registry.register(
            "xmpp_sessions",
            "Live XMPP sessions on this process",
            m.xmpp_sessions.clone(),
        );
        registry.register(
            "xmpp_stanzas_out",
            "Message stanzas written to devices",
            m.xmpp_stanzas_out.clone(),
        );
        registry.register(
            "router_handled",
            "Router commands handled, by result",
            m.router_handled.clone(),
        );
        registry.register(
            "webhook_batches",
            "Webhook batch attempts, by result",
            m.webhook_batches.clone(),
        );
        registry.register(
            "webhook_events",
            "Events accepted by webhook receivers",
            m.webhook_events.clone(),
        );
        registry.register(
            "webhook_dead_letters",
            "Webhook batches moved to the dead-letter list after the retry limit, by app",
            m.webhook_dead_letters.clone(),
        );
        registry.register(
            "outbox_republished",
            "Outbox entries republished by the sweeper",
            m.outbox_republished.clone(),
        );
        registry.register(
            "outbox_entries",
            "Entries in the Redis outboxes not yet confirmed on NATS (sampled by routers)",
            m.outbox_entries.clone(),
        );
        registry.register(
            "accept_to_sent_seconds",
            "Time from acceptance to the first sent transition (XMPP write or native push)",
            m.accept_to_sent.clone(),
        );
        registry.register(
            "accept_to_delivered_seconds",
            "Time from acceptance to the first delivery confirmation",
            m.accept_to_delivered.clone(),
        );
        registry.register(
            "accept_to_webhook_delivered_seconds",
            "Time from acceptance until the app's webhook accepted the delivered event",
            m.accept_to_webhook_delivered.clone(),
        );
        registry.register(
            "open_messages",
            "Messages not yet in a final status, scheduled ones included (sampled by routers)",
            m.open_messages.clone(),
        );
        registry.register(
            "scheduled_messages",
            "Messages waiting for their send_at (sampled by routers)",
            m.scheduled_messages.clone(),
        );
        registry.register(
            "consumer_lag",
            "JetStream messages not yet acknowledged by a durable consumer: pending plus ack-pending (sampled by routers)",
            m.consumer_lag.clone(),
        );
        registry.register(
            "consumer_ack_pending",
            "JetStream messages handed to a durable consumer's workers and not yet acknowledged (sampled by routers)",
            m.consumer_ack_pending.clone(),
        );
        registry.register(
            "native_push",
            "Native push attempts, by result",
            m.native_push.clone(),
        );
        registry.register(
            "native_push_errors",
            "Native push provider errors, by provider and class of answer",
            m.native_push_errors.clone(),
        );
        registry.register("sms", "SMS attempts, by result", m.sms.clone());
        Arc::new(Metrics { registry, ..m })
    }

    /// Counts one status transition.
    pub fn transition(&self, status: &str, channel: Option<&str>) {
        self.transitions
            .get_or_create(&StatusLabels {
                status: status.into(),
                channel: channel.unwrap_or("").into(),
            })
            .inc();
    }

    /// Accounts for an event on its way to the bus (the outbox calls it for every publish):
    /// counts the transition and, for `sent`, observes acceptance → sent. Every status change
    /// of every service passes through the outbox, so this sees all of them.
    pub fn event_published(
        &self,
        kind: EventKind,
        channel: Option<&str>,
        message_id: Option<&str>,
    ) {
        self.transition(kind.as_str(), channel);
        if kind == EventKind::Status(Status::Sent) {
            if let Some(secs) =
                message_id.and_then(|id| since_acceptance(id, pushgate_core::time::now_ms()))
            {
                self.accept_to_sent.observe(secs);
            }
        }
    }

    /// Accounts for a webhook batch the app's receiver accepted, given the body as POSTed
    /// (`{"events": [...]}`): for each `delivered` event, observes acceptance → the backend
    /// knowing it was delivered, the latency a backend actually experiences. Only the fields
    /// the metric needs are decoded, not texts and data.
    pub fn webhook_batch_accepted(&self, body: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Slim {
            event: EventKind,
            #[serde(default)]
            message_id: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Body {
            events: Vec<Slim>,
        }
        let Ok(b) = serde_json::from_slice::<Body>(body) else {
            return;
        };
        let now = pushgate_core::time::now_ms();
        for e in b.events {
            if e.event == EventKind::Status(Status::Delivered) {
                if let Some(secs) = e
                    .message_id
                    .as_deref()
                    .and_then(|id| since_acceptance(id, now))
                {
                    self.accept_to_webhook_delivered.observe(secs);
                }
            }
        }
    }

    /// Counts a provider's error answer to a native push.
    pub fn native_push_error(&self, provider: &str, code: &str) {
        self.native_push_errors
            .get_or_create(&ProviderErrorLabels {
                provider: provider.into(),
                code: code.into(),
            })
            .inc();
    }

    /// Counts a webhook batch moved to an app's dead-letter list.
    pub fn webhook_dead_letter(&self, app: &str) {
        self.webhook_dead_letters
            .get_or_create(&AppLabel { app: app.into() })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Why a backlog sample failed (logged; the gauges keep their last value).
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Redis(#[from] pushgate_store::redis::RedisError),
    #[error(transparent)]
    Bus(#[from] pushgate_bus::BusError),
}

/// Samples the shared backlog once: open and scheduled messages and the outboxes (one Redis
/// round trip of `ZCARD`s, O(1) each), and every durable consumer's lag from JetStream's
/// consumer info. These are the numbers that grow first when something downstream stalls.
pub async fn sample_backlog(bus: &Bus, store: &Store, m: &Metrics) -> Result<(), SampleError> {
    let k = store.keys();
    let (open, scheduled, evt, cmd): (i64, i64, i64, i64) = pushgate_store::redis::pipe()
        .zcard(k.expiry())
        .zcard(k.schedule())
        .zcard(k.outbox_evt())
        .zcard(k.outbox_cmd())
        .query_async(&mut store.conn())
        .await?;
    m.open_messages.set(open);
    m.scheduled_messages.set(scheduled);
    for (outbox, n) in [("events", evt), ("commands", cmd)] {
        m.outbox_entries
            .get_or_create(&OutboxLabel {
                outbox: outbox.into(),
            })
            .set(n);
    }
    for name in [
        ConsumerName::Router,
        ConsumerName::Bridge,
        ConsumerName::Sms,
        ConsumerName::Webhook,
    ] {
        // `Bus::consumer` fetches the consumer's info, so the cached copy is current
        let c = bus.consumer(name).await?;
        let info = c.cached_info();
        let label = ConsumerLabel {
            consumer: name.as_str().into(),
        };
        let ack_pending = i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX);
        let lag = i64::try_from(info.num_pending)
            .unwrap_or(i64::MAX)
            .saturating_add(ack_pending);
        m.consumer_lag.get_or_create(&label).set(lag);
        m.consumer_ack_pending
            .get_or_create(&label)
            .set(ack_pending);
    }
    Ok(())
}

/// Samples the backlog every [`BACKLOG_SAMPLE_EVERY`] until `shutdown` (run by routers).
pub async fn backlog_loop(bus: Bus, store: Store, m: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        if let Err(e) = sample_backlog(&bus, &store, &m).await {
            tracing::warn!(error = %e, "cannot sample the backlog gauges");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(BACKLOG_SAMPLE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushgate_core::event::Event;

    #[test]
    fn acceptance_time_comes_from_the_uuidv7() {
        let before = pushgate_core::time::now_ms();
        let id = pushgate_core::MessageId::generate();
        let after = pushgate_core::time::now_ms();
        let t = accepted_at_ms(id.as_str());
        assert!(
            t.is_some_and(|t| t >= before && t <= after),
            "{t:?} not in {before}..={after}"
        );
        // v4 ids, garbage and non-ASCII never yield a time
        assert_eq!(accepted_at_ms("6f1c2b4e-1d2a-4c3b-8e9f-0a1b2c3d4e5f"), None);
        assert_eq!(accepted_at_ms("not-a-uuid"), None);
        assert_eq!(accepted_at_ms("0190a1b2-c3d4-7é00-8000-00000000000"), None);
        assert_eq!(accepted_at_ms("0190a1b2-c3d4-7e00-8000-00000000000g"), None);
        assert_eq!(
            accepted_at_ms("0190a1b2-c3d4-7e00-8000-000000000000"),
            Some(0x0190_a1b2_c3d4)
        );
    }

    /// Every metric family [`Metrics::new`] registers, read from its `registry.register(` calls
    /// (an empty family encodes nothing, so the exposition cannot tell): `pushgate_` + name.
    fn declared() -> std::collections::BTreeSet<String> {
        let code = include_str!("metrics.rs")
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default();
        code.split("registry.register(")
            .skip(1)
            .filter_map(|call| call.split('"').nth(1))
            .map(|name| format!("pushgate_{name}"))
            .collect()
    }

    /// The metric families `text` names: each `pushgate_…` word, resolved to its family by
    /// dropping a sample suffix (`_total`, `_bucket`, `_count`, `_sum`) when needed.
    fn mentioned(
        text: &str,
        declared: &std::collections::BTreeSet<String>,
    ) -> Result<std::collections::BTreeSet<String>, String> {
        let mut out = std::collections::BTreeSet::new();
        for (i, _) in text.match_indices("pushgate_") {
            let word: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let family = ["", "_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| {
                    word.strip_suffix(suffix)
                        .filter(|base| declared.contains(*base))
                })
                .ok_or_else(|| format!("{word} is not a declared metric"))?;
            out.insert(family.to_string());
        }
        Ok(out)
    }

    fn repo_file(path: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(path);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn operations_doc_lists_exactly_the_declared_metrics() {
        let declared = declared();
        assert!(declared.len() >= 21, "{declared:?}");
        let doc = repo_file("docs/operations.md");
        let reference = doc
            .split("## Metrics reference")
            .nth(1)
            .unwrap_or_else(|| panic!("docs/operations.md has no metrics reference"));
        assert_eq!(mentioned(reference, &declared), Ok(declared.clone()));
        // and the rest of the document (alerts) names no metric that does not exist
        assert!(
            mentioned(&doc, &declared).is_ok(),
            "{:?}",
            mentioned(&doc, &declared)
        );
    }

    #[test]
    fn dashboard_is_json_and_queries_declared_metrics_only() {
        let declared = declared();
        let text = repo_file("deploy/grafana/pushgate.json");
        let dash: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON: {e}"));
        let exprs: Vec<&str> = dash["panels"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p["targets"].as_array())
                    .flatten()
                    .filter_map(|t| t["expr"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        assert!(exprs.len() > 20, "{exprs:?}");
        let used = mentioned(&exprs.join("\n"), &declared);
        assert!(used.is_ok(), "{used:?}");
        for must in [
            "pushgate_messages_accepted",
            "pushgate_status_transitions",
            "pushgate_accept_to_sent_seconds",
            "pushgate_accept_to_delivered_seconds",
            "pushgate_accept_to_webhook_delivered_seconds",
            "pushgate_open_messages",
            "pushgate_consumer_lag",
            "pushgate_xmpp_sessions",
            "pushgate_native_push_errors",
            "pushgate_webhook_batches",
            "pushgate_webhook_dead_letters",
        ] {
            assert!(
                used.as_ref().is_ok_and(|u| u.contains(must)),
                "no panel uses {must}"
            );
        }
    }

    #[test]
    fn sent_events_feed_the_transition_counter_and_the_latency_histogram() {
        let m = Metrics::new();
        let id = pushgate_core::MessageId::generate();
        let ev = |status: Status| pushgate_core::BusEvent {
            app_id: "app_x".into(),
            seq: 2,
            event: Event {
                id: format!("{id}.2"),
                event: EventKind::Status(status),
                message_id: Some(id.0.clone()),
                foreign_id: None,
                user_id: None,
                device_id: None,
                channel: Some("xmpp".into()),
                at: String::new(),
                detail: None,
                text: None,
                data: None,
            },
        };
        for st in [Status::Sent, Status::Delivered] {
            let e = ev(st).event;
            m.event_published(e.event, e.channel.as_deref(), e.message_id.as_deref());
        }
        let body =
            serde_json::json!({"events": [ev(Status::Sent).event, ev(Status::Delivered).event]});
        m.webhook_batch_accepted(body.to_string().as_bytes());
        m.webhook_batch_accepted(b"not json");
        m.native_push_error("apns", "invalid_token");
        m.webhook_dead_letter("app_x");
        let text = m.encode();
        for line in [
            "pushgate_status_transitions_total{status=\"sent\",channel=\"xmpp\"} 1",
            "pushgate_status_transitions_total{status=\"delivered\",channel=\"xmpp\"} 1",
            "pushgate_accept_to_sent_seconds_count 1",
            "pushgate_accept_to_webhook_delivered_seconds_count 1",
            "pushgate_native_push_errors_total{provider=\"apns\",code=\"invalid_token\"} 1",
            "pushgate_webhook_dead_letters_total{app=\"app_x\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
