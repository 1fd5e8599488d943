//! Group-committed JetStream publishes: many small facts, one stream message.
//!
//! Every accepted message produces several status events (`enqueued`, `sent`, `delivered`, …)
//! and a router command. Published one by one, each costs a JetStream publish and ack, a
//! stored stream message, and a delivery and ack to its consumer; on a small machine those
//! per-message server costs are a large share of all the work (docs/benchmarks.md). So
//! publishers that produce many small facts for the same subject hand them to a per-subject
//! queue, and one task per subject publishes whatever queued while its previous publish was
//! in flight as **one** stream message (a group commit): an idle publisher still sends a batch
//! of one at once (no timer, no added latency), a busy one sends fewer, larger messages.
//!
//! Wire format. A batch of two or more items carries the header [`BATCH_HEADER`] (its item
//! count) and its payload is the items joined by `\n`; items are compact JSON, which never
//! contains a raw newline. A message without the header is a single item, exactly as before
//! batching existed, so consumers read old and new stream content alike and singles
//! (dead-letter replays, replies) need no batch framing. Each item's W3C trace context, when
//! there is one, travels in an [`ITEM_TRACE_HEADER`] value `"{index} {traceparent}"`, so a
//! batched event still continues its own message's trace.
//!
//! Durability is the single publish's: a caller returns only when the stream acknowledged the
//! message holding its item, and learns a failure as its own. `Nats-Msg-Id` is the item's id
//! for a batch of one (as before), and for a larger batch a digest of all its item ids, so a
//! republish of exactly that batch is dropped by the duplicate window while a batch with
//! different contents can never be mistaken for it. An item republished later in a different
//! grouping (the outbox sweeper after a crash between publish and outbox removal) is not
//! recognised by the server; consumers are idempotent for commands, and events carry ids that
//! the webhook dedupes within a batch and receivers dedupe across batches (docs/webhooks.md).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::keyed::{KeyedQueues, Linger, Queue};
use crate::BusError;

/// Header of a batched stream message: how many items its payload holds.
pub const BATCH_HEADER: &str = "Pushgate-Batch";

/// Header (repeated) with one batched item's trace context: `"{index} {traceparent}"`.
pub const ITEM_TRACE_HEADER: &str = "Pushgate-Item-Trace";

/// Most items in one batch: bounds a consumer's work per stream message, and so how much is
/// redelivered together when one item of it fails.
pub const MAX_ITEMS: usize = 128;

/// Most payload bytes in one batch, well under NATS's default 1 MiB `max_payload`.
pub const MAX_BYTES: usize = 256 * 1024;

/// How long a subject's task waits for work before it ends (its queue goes with it; the next
/// publish to that subject starts a new one). Subjects are per app, so tasks must not pile up.
const IDLE: Duration = Duration::from_secs(10);

/// One item of a stream message, as a consumer sees it.
pub struct Item<'a> {
    /// The item's bytes (a JSON document).
    pub payload: &'a [u8],
    trace: TraceSource<'a>,
}

enum TraceSource<'a> {
    /// A single item: the message's own headers.
    Headers(Option<&'a HeaderMap>),
    /// A batched item: its traceparent, if it had one.
    Parent(Option<&'a str>),
}

impl Item<'_> {
    /// The item's trace context (empty when it has none).
    pub fn trace(&self) -> opentelemetry::Context {
        match self.trace {
            TraceSource::Headers(h) => crate::trace::extract(h),
            TraceSource::Parent(Some(tp)) => {
                let mut map = HashMap::with_capacity(1);
                map.insert("traceparent".to_string(), tp.to_string());
                crate::trace::context_from_map(&map)
            }
            TraceSource::Parent(None) => opentelemetry::Context::new(),
        }
    }

    /// Makes `span` a child of the item's trace context, if it has one.
    pub fn set_parent_of(&self, span: &tracing::Span) {
        match self.trace {
            TraceSource::Headers(None) | TraceSource::Parent(None) => {}
            _ => {
                let _ = span.set_parent(self.trace());
            }
        }
    }
}

/// Whether a stream message is a batch, and of how many items.
pub fn batch_len(headers: Option<&HeaderMap>) -> Option<usize> {
    headers?.get(BATCH_HEADER)?.as_str().parse().ok()
}

/// The items of a stream message: a batch's lines, or the whole payload as one item.
pub fn items<'a>(headers: Option<&'a HeaderMap>, payload: &'a [u8]) -> Vec<Item<'a>> {
    if batch_len(headers).is_none() {
        return vec![Item {
            payload,
            trace: TraceSource::Headers(headers),
        }];
    }
    let mut parents: HashMap<usize, &str> = HashMap::new();
    if let Some(h) = headers {
        for v in h.get_all(ITEM_TRACE_HEADER) {
            if let Some((i, tp)) = v.as_str().split_once(' ') {
                if let Ok(i) = i.parse() {
                    parents.insert(i, tp);
                }
            }
        }
    }
    payload
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .enumerate()
        .map(|(i, line)| Item {
            payload: line,
            trace: TraceSource::Parent(parents.get(&i).copied()),
        })
        .collect()
}

/// One item waiting in a subject's queue.
struct Queued {
    msg_id: String,
    body: Bytes,
    traceparent: Option<String>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The per-subject queues of one process's bus connection.
pub(crate) struct Batcher {
    js: jetstream::Context,
    linger: Duration,
    subjects: KeyedQueues<Queued>,
}

impl Batcher {
    pub(crate) fn new(js: jetstream::Context, linger: Duration) -> Self {
        Batcher {
            js,
            linger,
            subjects: KeyedQueues::new(),
        }
    }

    /// Queues an item for `subject`; the receiver answers once the message holding it was
    /// acknowledged by the stream (or with why not).
    pub(crate) fn enqueue(
        &self,
        subject: &str,
        msg_id: &str,
        body: Bytes,
    ) -> oneshot::Receiver<Result<(), String>> {
        let (done, rx) = oneshot::channel();
        let item = Queued {
            msg_id: msg_id.to_string(),
            body,
            traceparent: crate::trace::current_map().remove("traceparent"),
            done,
        };
        let (js, linger) = (self.js.clone(), self.linger);
        self.subjects
            .push(subject, item, move |queue| subject_task(js, linger, queue));
        rx
    }
}

/// Publishes the subject's queued items, one batch at a time, until idle for [`IDLE`].
async fn subject_task(js: jetstream::Context, linger: Duration, mut queue: Queue<Queued>) {
    let mut linger = Linger::new(linger);
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_ITEMS);
    // an item that did not fit the previous batch opens the next one
    let mut carry: Option<Queued> = None;
    loop {
        let first = match carry.take() {
            Some(item) => item,
            None => match queue.next(IDLE).await {
                Some(item) => item,
                None => return,
            },
        };
        let until = linger.until(tokio::time::Instant::now());
        let mut bytes = first.body.len();
        batch.push(first);
        while batch.len() < MAX_ITEMS {
            match queue.next_in_batch(until).await {
                Some(item) if bytes + 1 + item.body.len() > MAX_BYTES => {
                    carry = Some(item);
                    break;
                }
                Some(item) => {
                    bytes += 1 + item.body.len();
                    batch.push(item);
                }
                None => break,
            }
        }
        let result = match publish(&js, queue.key(), &batch).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        linger.settled(tokio::time::Instant::now());
        for item in batch.drain(..) {
            // the caller may have gone (cancelled): nothing to tell
            let _ = item.done.send(result.clone());
        }
    }
}

/// Sends one batch (or a single item as a plain message).
async fn publish(
    js: &jetstream::Context,
    subject: &str,
    batch: &[Queued],
) -> Result<PublishAckFuture, String> {
    let mut headers = HeaderMap::new();
    let (msg_id, payload) = match batch {
        [one] => {
            if let Some(tp) = &one.traceparent {
                headers.insert("traceparent", tp.as_str());
            }
            (one.msg_id.clone(), one.body.clone())
        }
        _ => {
            headers.insert(BATCH_HEADER, batch.len().to_string().as_str());
            let size = batch.iter().map(|q| q.body.len() + 1).sum();
            let mut payload = BytesMut::with_capacity(size);
            for (i, q) in batch.iter().enumerate() {
                if i > 0 {
                    payload.extend_from_slice(b"\n");
                }
                payload.extend_from_slice(&q.body);
                if let Some(tp) = &q.traceparent {
                    headers.append(ITEM_TRACE_HEADER, format!("{i} {tp}").as_str());
                }
            }
            (
                batch_id(batch.iter().map(|q| q.msg_id.as_str())),
                payload.freeze(),
            )
        }
    };
    let publish = jetstream::message::PublishMessage::build()
        .payload(payload)
        .headers(headers)
        .message_id(msg_id);
    js.send_publish(subject.to_string(), publish)
        .await
        .map_err(|e| e.to_string())
}

/// The `Nats-Msg-Id` of a batch: a digest of its item ids in order, so only the very same
/// batch is ever dropped as a duplicate of it.
pub fn batch_id<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    let digest = h.finalize();
    let mut out = String::with_capacity(2 + 32);
    out.push_str("b-");
    for b in &digest[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Maps a batch publish's failure to the caller's error.
pub(crate) fn publish_error(subject: &str, detail: String) -> BusError {
    BusError::Publish {
        subject: subject.to_string(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_message_is_one_item_with_its_headers_trace() {
        let items = items(None, b"{\"a\":1}");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].payload, b"{\"a\":1}");
    }

    #[test]
    fn a_batch_splits_into_its_lines_with_their_traces() {
        let mut h = HeaderMap::new();
        h.insert(BATCH_HEADER, "3");
        h.append(
            ITEM_TRACE_HEADER,
            "2 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let items = items(Some(&h), b"{\"a\":1}\n{\"b\":2}\n{\"c\":3}");
        let payloads: Vec<&[u8]> = items.iter().map(|i| i.payload).collect();
        assert_eq!(
            payloads,
            [&b"{\"a\":1}"[..], &b"{\"b\":2}"[..], &b"{\"c\":3}"[..]]
        );
        assert!(matches!(items[0].trace, TraceSource::Parent(None)));
        assert!(matches!(
            items[2].trace,
            TraceSource::Parent(Some(tp)) if tp.starts_with("00-0af7")
        ));
    }

    #[test]
    fn batch_ids_differ_with_contents_and_order() {
        let a = batch_id(["m1.1", "m2.1"].into_iter());
        assert_eq!(a, batch_id(["m1.1", "m2.1"].into_iter()));
        assert_ne!(a, batch_id(["m2.1", "m1.1"].into_iter()));
        assert_ne!(a, batch_id(["m1.1", "m2.1", "m3.1"].into_iter()));
        // the separator keeps ids from running into each other
        assert_ne!(
            batch_id(["ab", "c"].into_iter()),
            batch_id(["a", "bc"].into_iter())
        );
        assert_eq!(a.len(), 34);
    }
}
