//! Per-app bound on provider calls in flight (`max_in_flight_per_app`).
//!
//! The bridge handles `concurrency` requests at once for all apps together. Without a bound
//! per app, one app whose provider answers slowly (or that sends a burst) would hold every
//! one of those slots and stall all other apps. A request of an app at its bound does not
//! wait for a permit (waiting would hold a slot all the same): it goes back to the bus and is
//! redelivered shortly, freeing its slot for other apps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::clients::lock;

/// Apps tracked before idle ones are forgotten (their semaphores hold no permits out, so
/// forgetting them loses nothing).
const PRUNE_AT: usize = 4096;

/// One semaphore per app.
pub(crate) struct AppLimits {
    per_app: usize,
    apps: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl AppLimits {
    pub(crate) fn new(per_app: usize) -> Self {
        AppLimits {
            per_app,
            apps: Mutex::new(HashMap::new()),
        }
    }

    /// A permit for one provider call of `app_id`, or `None` while the app is at its bound.
    pub(crate) fn try_acquire(&self, app_id: &str) -> Option<OwnedSemaphorePermit> {
        let sem = {
            let mut g = lock(&self.apps);
            if g.len() >= PRUNE_AT && !g.contains_key(app_id) {
                // an outstanding permit holds a reference: only idle apps go
                g.retain(|_, s| Arc::strong_count(s) > 1);
            }
            g.entry(app_id.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_app)))
                .clone()
        };
        sem.try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_app_has_its_own_bound() {
        let l = AppLimits::new(2);
        let a1 = l.try_acquire("a");
        let a2 = l.try_acquire("a");
        assert!(a1.is_some() && a2.is_some());
        assert!(l.try_acquire("a").is_none());
        // another app is not affected by a full one
        assert!(l.try_acquire("b").is_some());
        drop(a1);
        assert!(l.try_acquire("a").is_some());
    }

    #[test]
    fn idle_apps_are_forgotten_busy_ones_kept() {
        let l = AppLimits::new(1);
        let held = l.try_acquire("busy");
        for i in 0..PRUNE_AT {
            let _ = l.try_acquire(&format!("app-{i}"));
        }
        assert!(lock(&l.apps).len() <= PRUNE_AT + 1);
        assert!(lock(&l.apps).contains_key("busy"));
        assert!(l.try_acquire("busy").is_none());
        drop(held);
    }
}
