//! Sessions' hand-over checks, run against the store in batches for the whole edge.
//!
//! Before a session writes a handed-over message it asks the store whether the message still
//! waits for the device, with its status and what waits before it, and records `sent` when
//! the message is simply the next one ([`Store::pending_check_send`]). That is a Redis request
//! and a script run per message when each session asks on its own. The router hands an edge
//! many messages at once, so the sessions' checks go through one queue whose task runs what
//! is queued with one [`Store::pending_check_send_many`]. Each session still waits for its own
//! answer and then does exactly what it did after its own check. As in the router's
//! targeting, a batch does not linger for more items: that would only add latency to every
//! delivery.

use std::time::Duration;

use pushgate_bus::keyed::Batched;
use pushgate_core::time::now_ms;
use pushgate_store::session::PendingCheck;
use pushgate_store::{CheckRequest, Store, StoreError};

/// Most checks in one script call (bounds the script's time and its reply).
const MAX_BATCH: usize = 64;

/// The edge's hand-over check queue.
pub(crate) struct Checks {
    batched: Batched<CheckRequest, Result<Option<PendingCheck>, StoreError>>,
}

impl Checks {
    pub(crate) fn new(store: Store) -> Self {
        let batched = Batched::new(
            Duration::ZERO,
            MAX_BATCH,
            move |checks: Vec<CheckRequest>| {
                let store = store.clone();
                async move {
                    StoreError::per_item(
                        store.pending_check_send_many(&checks, now_ms()).await,
                        checks.len(),
                    )
                }
            },
        );
        Checks { batched }
    }

    /// Runs the check in the next batch: what [`Store::pending_check_send`] answers for it
    /// alone, at the batch's instant.
    pub(crate) async fn check(&self, c: CheckRequest) -> Result<Option<PendingCheck>, StoreError> {
        self.batched
            .call(c)
            .await
            .unwrap_or_else(|| Err(StoreError::client("the check batch went unanswered")))
    }
}
