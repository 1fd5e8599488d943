//! Batched hand-overs to edges.
//!
//! A router handles many route commands at once, so many hand-overs to the same edge are in
//! flight together. Sending each as its own core-NATS request costs one message each way and a
//! task wake-up per message on both sides; instead every hand-over to an edge goes into that
//! edge's queue, and one task per edge sends whatever is queued as one request on
//! `{ns}.edge.{edge}.deliver_batch`. While a batch is in flight the next one accumulates, and a
//! busy edge's batch also stays open for the bus's linger ([`pushgate_bus::keyed::Linger`]), so
//! a busy router sends fewer, larger requests while an idle one still sends a batch of one at
//! once (no added latency).
//!
//! Durability is that of a single hand-over: each message already waits in its device's pending
//! queue, and each caller learns its own item's outcome; a failed batch fails every item in it
//! exactly as a failed single request would.

use std::time::Duration;

use bytes::Bytes;
use pushgate_bus::keyed::{KeyedQueues, Linger, Queue};
use pushgate_bus::payloads::{EdgeDeliver, EdgeDeliverItem, EdgeDeliverReply};
use pushgate_bus::{Bus, BusError};
use tokio::sync::oneshot;

/// Most hand-overs in one batch request (bounds the request's size and the edge's time
/// answering it).
const MAX_BATCH: usize = 128;

/// How long an edge's task waits for work before it ends (its queue is removed with it; the
/// next hand-over to that edge starts a new one). Edges come and go, so tasks must not pile up.
const IDLE: Duration = Duration::from_secs(10);

/// Why a hand-over was not taken: the edge did not answer in time (or the request failed
/// otherwise). The caller retries the command, as for an overloaded edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct HandoverFailed {
    pub detail: String,
}

/// One hand-over's outcome: `Ok(true)` the session took it, `Ok(false)` the session (or the
/// edge) is gone, treat the device as offline.
pub type Outcome = Result<bool, HandoverFailed>;

struct Item {
    item: EdgeDeliverItem,
    done: oneshot::Sender<Outcome>,
}

/// The per-edge queues of one router.
pub struct Handover {
    bus: Bus,
    timeout: Duration,
    edges: KeyedQueues<Item>,
}

impl Handover {
    /// `timeout`: how long one batch may take to be answered (`router.edge_timeout_ms`).
    pub fn new(bus: Bus, timeout: Duration) -> Self {
        Handover {
            bus,
            timeout,
            edges: KeyedQueues::new(),
        }
    }

    /// Hands `deliver` to `edge` in that edge's next batch and waits for its outcome. The trace
    /// context of the calling span travels with the item, so the edge's `edge.deliver` span
    /// stays under this router's `router.handle`.
    pub async fn hand_over(&self, edge: &str, deliver: EdgeDeliver) -> Outcome {
        let trace = pushgate_bus::trace::current_map();
        let (done, rx) = oneshot::channel();
        self.enqueue(
            edge,
            Item {
                item: EdgeDeliverItem { deliver, trace },
                done,
            },
        );
        rx.await.unwrap_or_else(|_| {
            Err(HandoverFailed {
                detail: "the edge's hand-over task stopped".into(),
            })
        })
    }

    fn enqueue(&self, edge: &str, item: Item) {
        let (bus, timeout) = (self.bus.clone(), self.timeout);
        self.edges
            .push(edge, item, move |queue| edge_task(bus, timeout, queue));
    }
}

/// Sends the edge's queued hand-overs, one batch at a time, until it has been idle for
/// [`IDLE`]. The queue is unbounded; what bounds it is the router's command concurrency.
async fn edge_task(bus: Bus, timeout: Duration, mut queue: Queue<Item>) {
    let mut linger = Linger::new(bus.batch_linger());
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.next(IDLE).await {
        let until = linger.until(tokio::time::Instant::now());
        batch.push(first);
        queue.fill(&mut batch, MAX_BATCH, until).await;
        let (items, dones): (Vec<EdgeDeliverItem>, Vec<oneshot::Sender<Outcome>>) =
            batch.drain(..).map(|i| (i.item, i.done)).unzip();
        let outcomes = send_batch(&bus, queue.key(), &items, timeout).await;
        linger.settled(tokio::time::Instant::now());
        for (done, outcome) in dones.into_iter().zip(outcomes) {
            // the caller may have gone (its command was cancelled): nothing to tell
            let _ = done.send(outcome);
        }
    }
}

/// One batch request, and each item's outcome. An edge that does not answer on the batch
/// subject at all may be one that predates it: its items are then retried one by one on the
/// single hand-over subject, so routers can be upgraded before edges.
async fn send_batch(
    bus: &Bus,
    edge: &str,
    items: &[EdgeDeliverItem],
    timeout: Duration,
) -> Vec<Outcome> {
    let res = bus
        .request_json(bus.names().edge_deliver_batch(edge), &items, timeout)
        .await;
    if matches!(&res, Err(e) if is_no_responders(e)) {
        let singles = items.iter().map(|i| async move {
            let res = bus
                .request_json(bus.names().edge_deliver(edge), &i.deliver, timeout)
                .await;
            single_outcome(res)
        });
        return futures::future::join_all(singles).await;
    }
    batch_outcomes(items.len(), res)
}

fn is_no_responders(e: &BusError) -> bool {
    matches!(e, BusError::Request { detail, .. } if detail.contains("no responders"))
}

/// The outcome of a single hand-over request, as routers have always read it: no responders
/// means the edge is gone; an unreadable answer counts as "session gone"; any other failure
/// is the edge being too busy to answer.
fn single_outcome(res: Result<Bytes, BusError>) -> Outcome {
    match res {
        Ok(reply) => Ok(serde_json::from_slice::<EdgeDeliverReply>(&reply).ok()
            == Some(EdgeDeliverReply::Accepted)),
        Err(e) if is_no_responders(&e) => Ok(false),
        Err(e) => Err(HandoverFailed {
            detail: e.to_string(),
        }),
    }
}

/// Maps a batch request's result to its `n` items' outcomes, each as [`single_outcome`] reads
/// a single request: a failed request fails every item alike, and an answer that is not one
/// reply per item (unreadable) counts as "session gone" for every item.
fn batch_outcomes(n: usize, res: Result<Bytes, BusError>) -> Vec<Outcome> {
    match res {
        Ok(reply) => match serde_json::from_slice::<Vec<EdgeDeliverReply>>(&reply) {
            Ok(replies) if replies.len() == n => replies
                .into_iter()
                .map(|r| Ok(r == EdgeDeliverReply::Accepted))
                .collect(),
            other => {
                tracing::warn!(
                    items = n,
                    answer = ?other.map(|r| r.len()),
                    "unreadable batch hand-over answer; treating its sessions as gone"
                );
                vec![Ok(false); n]
            }
        },
        Err(e) if is_no_responders(&e) => vec![Ok(false); n],
        Err(e) => {
            let failed = HandoverFailed {
                detail: e.to_string(),
            };
            vec![Err(failed); n]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_error(detail: &str) -> BusError {
        BusError::Request {
            subject: "ns.edge.e1.deliver_batch".into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn a_timed_out_batch_fails_every_item() {
        let out = batch_outcomes(
            3,
            Err(request_error("request timed out: deadline has elapsed")),
        );
        assert_eq!(out.len(), 3);
        for o in out {
            let e = o.expect_err("every item fails");
            assert!(e.detail.contains("timed out"), "{e}");
        }
    }

    #[test]
    fn no_responders_means_every_session_is_gone() {
        let out = batch_outcomes(4, Err(request_error("no responders")));
        assert_eq!(out, vec![Ok(false); 4]);
        assert_eq!(
            single_outcome(Err(request_error("no responders"))),
            Ok(false)
        );
    }

    #[test]
    fn each_item_gets_its_own_reply_in_order() {
        let body = serde_json::to_vec(&[
            EdgeDeliverReply::Accepted,
            EdgeDeliverReply::NoSession,
            EdgeDeliverReply::Accepted,
        ])
        .expect("encodes");
        let out = batch_outcomes(3, Ok(Bytes::from(body)));
        assert_eq!(out, vec![Ok(true), Ok(false), Ok(true)]);
    }

    #[test]
    fn an_answer_of_the_wrong_length_or_unreadable_counts_as_sessions_gone() {
        let body = serde_json::to_vec(&[EdgeDeliverReply::Accepted]).expect("encodes");
        assert_eq!(batch_outcomes(2, Ok(Bytes::from(body))), vec![Ok(false); 2]);
        assert_eq!(
            batch_outcomes(2, Ok(Bytes::from_static(b"nonsense"))),
            vec![Ok(false); 2]
        );
    }
}
