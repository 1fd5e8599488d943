//! Devices' confirmations, applied to the store in batches for the whole edge.
//!
//! Every message a device gets is confirmed by it (an XEP-0184 receipt, a stream-management
//! ack, a read marker), and each confirmation is a status change. Applied one session at a
//! time that is a Redis request and a script run per message. The edge has many sessions
//! confirming at once, so their status changes (the confirmations, and the rarer `sent` a
//! session records after writing a message) go through one queue whose task applies what is
//! queued (and, while busy, what arrives within the bus's batch linger) with one
//! [`Store::change_many`]. Each session still waits for its own outcome and then does exactly
//! what it did after its own change: observe the latency, publish the event, go on reading.

use std::time::Duration;

use pushgate_bus::keyed::{KeyedQueues, Linger, Queue};
use pushgate_core::time::now_ms;
use pushgate_core::Status;
use pushgate_store::{Change, Store, StoreError, Transition};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Most confirmations in one script call (bounds the script's time and its reply).
const MAX_BATCH: usize = 64;

/// How long the queue's task waits for work before it ends (the next confirmation starts a
/// new one).
const IDLE: Duration = Duration::from_secs(10);

/// The edge has one queue: every session's confirmations share it.
const KEY: &str = "confirmations";

struct Item {
    message_id: String,
    to: Status,
    device_id: String,
    done: oneshot::Sender<Result<Transition, StoreError>>,
}

/// The edge's confirmation queue.
pub(crate) struct Confirmations {
    store: Store,
    linger: Duration,
    queue: KeyedQueues<Item>,
}

impl Confirmations {
    /// `linger`: the bus's batch linger (`common.batch_linger_us`).
    pub(crate) fn new(store: Store, linger: Duration) -> Self {
        Confirmations {
            store,
            linger,
            queue: KeyedQueues::new(),
        }
    }

    /// Applies `to` (`delivered`, `read`, `sent`) for the message on `device_id`'s XMPP
    /// session, in the next batch: what [`Store::change`] would answer for that change alone.
    pub(crate) async fn apply(
        &self,
        message_id: &str,
        to: Status,
        device_id: &str,
    ) -> Result<Transition, StoreError> {
        let (done, rx) = oneshot::channel();
        let item = Item {
            message_id: message_id.to_string(),
            to,
            device_id: device_id.to_string(),
            done,
        };
        let (store, linger) = (self.store.clone(), self.linger);
        self.queue
            .push(KEY, item, move |queue| apply_batches(store, linger, queue));
        match rx.await {
            Ok(outcome) => outcome,
            // the task never drops an item unanswered; if it panicked, say so
            Err(_) => Err(StoreError::client("the confirmation task stopped")),
        }
    }
}

/// Applies the queued confirmations a batch at a time until idle for [`IDLE`].
async fn apply_batches(store: Store, linger: Duration, mut queue: Queue<Item>) {
    let mut linger = Linger::new(linger);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.next(IDLE).await {
        let until = linger.until(Instant::now());
        batch.push(first);
        queue.fill(&mut batch, MAX_BATCH, until).await;
        let changes: Vec<Change<'_>> = batch
            .iter()
            .map(|i| Change {
                message_id: &i.message_id,
                to: Some(i.to),
                channel: Some("xmpp"),
                device_id: Some(&i.device_id),
                detail: None,
                command: None,
            })
            .collect();
        let outcomes = store.change_many(&changes, now_ms()).await;
        drop(changes);
        linger.settled(Instant::now());
        match outcomes {
            Ok(outcomes) => {
                for (item, outcome) in batch.drain(..).zip(outcomes) {
                    // the session may have ended meanwhile: nothing to tell
                    let _ = item.done.send(outcome);
                }
            }
            Err(e) => {
                for item in batch.drain(..) {
                    let _ = item.done.send(Err(e.for_another()));
                }
            }
        }
    }
}
