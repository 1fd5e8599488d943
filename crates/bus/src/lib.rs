//! The bus: every NATS JetStream stream, subject and consumer Pushgate uses, declared here and
//! nowhere else, plus publishing and consuming with trace context in NATS headers.
//!
//! Layout (`{ns}` is the deployment's namespace, `{NS}` the same in upper case; tests use a
//! unique namespace each so they never see each other's traffic):
//!
//! | stream          | subjects             | retention  | consumer (durable) | purpose                             |
//! |-----------------|----------------------|------------|--------------------|-------------------------------------|
//! | `{NS}_MESSAGES` | `{ns}.msg.route`     | work queue | `router`           | "look at this message" for routers  |
//! | `{NS}_EVENTS`   | `{ns}.evt.{app_id}`  | limits 7 d | `webhook`          | status and reply events, replayable |
//! | `{NS}_PUSH`     | `{ns}.push.send`     | work queue | `bridge`           | native push requests                |
//! | `{NS}_SMS`      | `{ns}.sms.send`      | work queue | `sms`              | SMS send requests                   |
//!
//! Core NATS (not persisted; every use has a durable fallback in Redis, see docs/architecture.md):
//! `{ns}.edge.{edge_id}.deliver_batch` (router → edge request/reply hand-overs, batched per
//! edge), `{ns}.edge.{edge_id}.deliver` (the same, one per request: routers that predate
//! batching) and
//! `{ns}.edge.control` (broadcast: close a device's session).
//!
//! Every JetStream publish carries `Nats-Msg-Id`, so a republish of the same fact within the
//! duplicate window (2 min) is dropped by the server; consumers are idempotent beyond that.
//! Events and route commands go as group-committed batches ([`batch`]): one stream message
//! may carry many of them, and their consumers read every message with [`batch::items`].

pub mod batch;
pub mod consume;
pub mod keyed;
pub mod names;
pub mod payloads;
pub mod trace;

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Serialize;

pub use async_nats;
pub use consume::{consume, jitter, retry_delay, settle, sleep_or_cancel, Settle};
pub use names::{ConsumerName, Names, StreamKind};

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("JetStream stream {stream}: {detail}")]
    Stream { stream: String, detail: String },
    #[error("JetStream consumer {consumer}: {detail}")]
    Consumer { consumer: String, detail: String },
    #[error("publish to {subject} was not acknowledged: {detail}")]
    Publish { subject: String, detail: String },
    #[error("NATS request to {subject} failed: {detail}")]
    Request { subject: String, detail: String },
    #[error("cannot encode bus payload: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A connection to NATS with JetStream, bound to one namespace.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    replicas: usize,
    /// Per-subject group commit for [`Bus::enqueue_batched`].
    batcher: std::sync::Arc<batch::Batcher>,
    /// How long a busy group commit holds a batch open ([`keyed::Linger`]).
    batch_linger: std::time::Duration,
}

/// The batch linger a bus gets unless told otherwise (`common.batch_linger_us`). Two
/// milliseconds per batched hop: next to a device's network round trip it is nothing, and at
/// a few thousand messages per second it makes batches several items large
/// (docs/benchmarks.md, fourth session: batch linger).
pub const DEFAULT_BATCH_LINGER: std::time::Duration = std::time::Duration::from_millis(2);

impl Bus {
    /// Connects (retrying the first connection, then reconnecting forever) and makes sure every
    /// stream and consumer exists, with one replica per stream. Safe to call from many
    /// processes at once.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, BusError> {
        Self::connect_with(url, namespace, 1).await
    }

    /// Like [`Bus::connect`]; `url` may list several servers of a cluster separated by commas,
    /// and new streams get `replicas` copies (1, 3 or 5 on a JetStream cluster). Existing
    /// streams keep their replica count (change it with `nats stream edit`).
    pub async fn connect_with(
        url: &str,
        namespace: &str,
        replicas: usize,
    ) -> Result<Self, BusError> {
        let addrs: Vec<async_nats::ServerAddr> = url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<_, _>>()
            .map_err(|e| BusError::Stream {
                stream: "-".into(),
                detail: format!("invalid NATS URL {url:?}: {e}"),
            })?;
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .name(format!("pushgate-{namespace}"))
            .event_callback(|ev| async move {
                tracing::info!(event = %ev, "nats connection event");
            })
            .connect(addrs)
            .await
            .map_err(|source| BusError::Connect {
                url: url.to_string(),
                source,
            })?;
        let js = jetstream::new(client.clone());
        let bus = Bus {
            client,
            batcher: std::sync::Arc::new(batch::Batcher::new(js.clone(), DEFAULT_BATCH_LINGER)),
            batch_linger: DEFAULT_BATCH_LINGER,
            js,
            names: Names::new(namespace),
            replicas: replicas.max(1),
        };
        bus.ensure_topology().await?;
        Ok(bus)
    }

    /// The same bus with another batch linger (`Duration::ZERO`: batches hold only what
    /// queued during the previous send). Set it before the first batched publish: publishes
    /// already queued keep the linger they were queued under.
    pub fn with_batch_linger(mut self, linger: std::time::Duration) -> Self {
        self.batcher = std::sync::Arc::new(batch::Batcher::new(self.js.clone(), linger));
        self.batch_linger = linger;
        self
    }

    /// How long a busy group commit holds a batch open: this bus's own, the router's per-edge
    /// hand-overs and the edge's confirmations.
    pub fn batch_linger(&self) -> std::time::Duration {
        self.batch_linger
    }

    /// The names of this bus's streams and subjects.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The core NATS client (request/reply and broadcast subjects).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Whether the NATS connection is up (for `/readyz`).
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Creates every stream and durable consumer if missing. Idempotent.
    pub async fn ensure_topology(&self) -> Result<(), BusError> {
        for kind in StreamKind::ALL {
            let name = self.names.stream(kind);
            let (retention, max_age) = match kind {
                StreamKind::Events => (
                    stream::RetentionPolicy::Limits,
                    Duration::from_secs(7 * 86400),
                ),
                _ => (stream::RetentionPolicy::WorkQueue, Duration::ZERO),
            };
            let cfg = stream::Config {
                name: name.clone(),
                subjects: vec![self.names.stream_subjects(kind)],
                retention,
                max_age,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                num_replicas: self.replicas,
                ..Default::default()
            };
            let st = self
                .js
                .get_or_create_stream(cfg)
                .await
                .map_err(|e| BusError::Stream {
                    stream: name.clone(),
                    detail: e.to_string(),
                })?;
            for consumer in ConsumerName::for_stream(kind) {
                let durable = consumer.as_str().to_string();
                let cfg = pull::Config {
                    durable_name: Some(durable.clone()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: consumer.ack_wait(),
                    max_ack_pending: consumer.max_ack_pending(),
                    max_deliver: -1,
                    ..Default::default()
                };
                st.get_or_create_consumer::<pull::Config>(&durable, cfg)
                    .await
                    .map_err(|e| BusError::Consumer {
                        consumer: durable.clone(),
                        detail: e.to_string(),
                    })?;
            }
        }
        Ok(())
    }

    /// Publishes a JSON payload to a JetStream subject and waits for the stream's ack.
    /// `msg_id` makes the publish idempotent within the duplicate window.
    pub async fn publish_json<T: Serialize>(
        &self,
        subject: String,
        msg_id: &str,
        payload: &T,
    ) -> Result<(), BusError> {
        let body = serde_json::to_vec(payload)?;
        self.publish_bytes(subject, msg_id, Bytes::from(body)).await
    }

    /// Like [`Bus::publish_json`] with a pre-encoded body.
    pub async fn publish_bytes(
        &self,
        subject: String,
        msg_id: &str,
        body: Bytes,
    ) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        trace::inject_current(&mut headers);
        let publish = jetstream::message::PublishMessage::build()
            .payload(body)
            .headers(headers)
            .message_id(msg_id);
        let ack = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| BusError::Publish {
                subject: subject.clone(),
                detail: e.to_string(),
            })?;
        ack.await.map_err(|e| BusError::Publish {
            subject,
            detail: e.to_string(),
        })?;
        Ok(())
    }

    /// Queues a pre-encoded item for a JetStream subject's next batch ([`batch`]: items
    /// queued while the subject's previous publish was in flight go as one stream message)
    /// and returns a future for the stream's ack of it. Queueing happens at once, so a caller
    /// with several items queues them all (in order) before waiting. For facts whose
    /// consumers read them with [`batch::items`]: events and router commands.
    pub fn enqueue_batched(
        &self,
        subject: String,
        msg_id: &str,
        body: Bytes,
    ) -> impl std::future::Future<Output = Result<(), BusError>> + Send + 'static {
        let rx = self.batcher.enqueue(&subject, msg_id, body);
        async move {
            match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(detail)) => Err(batch::publish_error(&subject, detail)),
                Err(_) => Err(batch::publish_error(
                    &subject,
                    "the subject's publish task stopped".into(),
                )),
            }
        }
    }

    /// The durable pull consumer `name`.
    pub async fn consumer(
        &self,
        name: ConsumerName,
    ) -> Result<jetstream::consumer::PullConsumer, BusError> {
        let stream_name = self.names.stream(name.stream());
        let st = self
            .js
            .get_stream(&stream_name)
            .await
            .map_err(|e| BusError::Stream {
                stream: stream_name,
                detail: e.to_string(),
            })?;
        st.get_consumer(name.as_str())
            .await
            .map_err(|e| BusError::Consumer {
                consumer: name.as_str().into(),
                detail: e.to_string(),
            })
    }

    /// The JetStream context, for stream-level operations (replay, tests, cleanup).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Sends a core NATS request with trace headers and waits up to `timeout` for the reply.
    pub async fn request_json<T: Serialize>(
        &self,
        subject: String,
        payload: &T,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        let body = Bytes::from(serde_json::to_vec(payload)?);
        let mut headers = HeaderMap::new();
        trace::inject_current(&mut headers);
        let req = async_nats::Request::new()
            .payload(body)
            .headers(headers)
            .timeout(Some(timeout));
        let reply = self
            .client
            .send_request(subject.clone(), req)
            .await
            .map_err(|e| BusError::Request {
                subject,
                detail: e.to_string(),
            })?;
        Ok(reply.payload)
    }

    /// Publishes on a core (non-persisted) subject. Used only for signals whose loss is covered
    /// by durable state elsewhere.
    pub async fn signal_json<T: Serialize>(
        &self,
        subject: String,
        payload: &T,
    ) -> Result<(), BusError> {
        let body = Bytes::from(serde_json::to_vec(payload)?);
        let mut headers = HeaderMap::new();
        trace::inject_current(&mut headers);
        self.client
            .publish_with_headers(subject.clone(), headers, body)
            .await
            .map_err(|e| BusError::Publish {
                subject,
                detail: e.to_string(),
            })
    }

    /// Deletes every stream of this namespace (test cleanup and `pushgate purge`; never called
    /// by services).
    pub async fn delete_namespace(&self) -> Result<(), BusError> {
        for kind in StreamKind::ALL {
            let name = self.names.stream(kind);
            if let Err(e) = self.js.delete_stream(&name).await {
                tracing::debug!(stream = %name, error = %e, "delete stream");
            }
        }
        Ok(())
    }
}

/// How many times a JetStream message has been delivered (1 on first delivery).
pub fn delivery_count(msg: &jetstream::Message) -> u64 {
    msg.info().map(|i| i.delivered as u64).unwrap_or(1)
}
