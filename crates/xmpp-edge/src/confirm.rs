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

use pushgate_bus::keyed::Batched;
use pushgate_core::time::now_ms;
use pushgate_core::Status;
use pushgate_store::{Change, Store, StoreError, Transition};

/// Most confirmations in one script call (bounds the script's time and its reply).
const MAX_BATCH: usize = 64;

/// One confirmation: the message, its new status, the device.
type Item = (String, Status, String);

/// The edge's confirmation queue.
pub(crate) struct Confirmations {
    batched: Batched<Item, Result<Transition, StoreError>>,
}

impl Confirmations {
    /// `linger`: the bus's batch linger (`common.batch_linger_us`).
    pub(crate) fn new(store: Store, linger: Duration) -> Self {
        let batched = Batched::new(linger, MAX_BATCH, move |items: Vec<Item>| {
            let store = store.clone();
            async move {
                let changes: Vec<Change<'_>> = items
                    .iter()
                    .map(|(message_id, to, device_id)| Change {
                        message_id,
                        to: Some(*to),
                        channel: Some("xmpp"),
                        device_id: Some(device_id),
                        detail: None,
                        command: None,
                    })
                    .collect();
                StoreError::per_item(store.change_many(&changes, now_ms()).await, items.len())
            }
        });
        Confirmations { batched }
    }

    /// Applies `to` (`delivered`, `read`, `sent`) for the message on `device_id`'s XMPP
    /// session, in the next batch: what [`Store::change`] would answer for that change alone.
    pub(crate) async fn apply(
        &self,
        message_id: &str,
        to: Status,
        device_id: &str,
    ) -> Result<Transition, StoreError> {
        self.batched
            .call((message_id.to_string(), to, device_id.to_string()))
            .await
            .unwrap_or_else(|| Err(StoreError::client("the confirmation batch went unanswered")))
    }
}
