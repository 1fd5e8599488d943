//! Route commands' targeting, applied to the store in batches for the whole router.
//!
//! Every first routing of a message to a user targets the user's devices: one Redis request
//! and one script run per message when done command by command. A router handles many
//! commands at once (a stream message carries a batch of them), so their targeting goes
//! through one queue whose task targets what is queued with one [`Store::target_many`]. Each
//! command still waits for its own outcome and then does exactly what it did after its own
//! targeting: hand over to the live sessions, or request a native push.
//!
//! Unlike the bus's publishes, a batch here does not linger for more items: a script's cost
//! is in its items, not in its request (measured: the same CPU per message with or without
//! batching, docs/benchmarks.md, fifth session), so waiting would only add latency. Under
//! load, what queues while a batch is in Redis makes the next batch.

use std::time::Duration;

use pushgate_bus::keyed::Batched;
use pushgate_core::Message;
use pushgate_store::{Store, StoreError, TargetRequest, Targeted};

/// Most messages in one script call (bounds the script's time and its reply).
const MAX_BATCH: usize = 64;

/// The router's targeting queue.
pub(crate) struct Targeting {
    batched: Batched<TargetRequest, Result<Targeted, StoreError>>,
}

impl Targeting {
    pub(crate) fn new(store: Store) -> Self {
        let batched = Batched::new(
            Duration::ZERO,
            MAX_BATCH,
            move |asked: Vec<TargetRequest>| {
                let store = store.clone();
                async move { StoreError::per_item(store.target_many(&asked).await, asked.len()) }
            },
        );
        Targeting { batched }
    }

    /// Targets `message` at `user`'s devices if it is still open, in the next batch: what
    /// [`Store::target_many`] answers for it alone.
    pub(crate) async fn target(
        &self,
        message: &Message,
        user: &str,
    ) -> Result<Targeted, StoreError> {
        self.batched
            .call(TargetRequest::new(message, user))
            .await
            .unwrap_or_else(|| Err(StoreError::client("the targeting batch went unanswered")))
    }
}
