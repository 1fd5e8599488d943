//! Per-key work queues, each drained by its own task that ends once idle.
//!
//! Both group commits of the suite have this shape: the per-subject publisher
//! ([`crate::batch`]) and the router's per-edge hand-overs. Whatever is queued for a key while
//! its task is busy goes out together next time; keys come and go (apps, edges), so an idle
//! task removes its queue and ends, and the next item for that key starts a new one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

type Senders<T> = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<T>>>>;

/// The queues of one process (or one component of it).
pub struct KeyedQueues<T> {
    /// Senders are looked up and used under this lock, and an idle task removes its entry
    /// under it after checking its queue is empty, so no item is ever sent to a task that
    /// has ended.
    senders: Senders<T>,
}

impl<T> Default for KeyedQueues<T> {
    fn default() -> Self {
        KeyedQueues {
            senders: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<T: Send + 'static> KeyedQueues<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `item` for `key`; when the key has no live task, spawns `task` with the new
    /// queue (holding `item`).
    pub fn push<F, Fut>(&self, key: &str, item: T, task: F)
    where
        F: FnOnce(Queue<T>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut senders = lock(&self.senders);
        let item = match senders.get(key) {
            Some(tx) => match tx.send(item) {
                Ok(()) => return,
                // the task ended without removing itself (it panicked): start a new one
                Err(mpsc::error::SendError(item)) => item,
            },
            None => item,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // cannot fail: `rx` is alive
        let _ = tx.send(item);
        senders.insert(key.to_string(), tx);
        tokio::spawn(task(Queue {
            key: key.to_string(),
            rx,
            senders: self.senders.clone(),
        }));
    }
}

/// One key's queue, as its task sees it.
pub struct Queue<T> {
    key: String,
    rx: mpsc::UnboundedReceiver<T>,
    senders: Senders<T>,
}

impl<T> Queue<T> {
    /// The key this queue serves.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The next item, waiting up to `idle`. `None`: nothing came for that long, the queue is
    /// removed (the next item for the key starts a new task), and the task must end.
    pub async fn next(&mut self, idle: Duration) -> Option<T> {
        match tokio::time::timeout(idle, self.rx.recv()).await {
            Ok(item) => item,
            Err(_) => {
                let mut senders = lock(&self.senders);
                match self.rx.try_recv() {
                    Ok(item) => Some(item),
                    Err(_) => {
                        // nothing can be sent to `rx` once the entry is gone (see `senders`)
                        senders.remove(&self.key);
                        None
                    }
                }
            }
        }
    }

    /// An item already queued, without waiting.
    pub fn try_next(&mut self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items for one key reach one task in order; an idle task ends and removes its queue,
    /// and the next item starts a new task.
    #[tokio::test]
    async fn one_task_per_key_that_ends_when_idle() {
        let queues: KeyedQueues<u32> = KeyedQueues::new();
        let (out_tx, mut out) = mpsc::unbounded_channel();
        let start = |tx: mpsc::UnboundedSender<(u32, Vec<u32>)>, n: u32| {
            move |mut q: Queue<u32>| async move {
                while let Some(first) = q.next(Duration::from_millis(50)).await {
                    let mut batch = vec![first];
                    while let Some(i) = q.try_next() {
                        batch.push(i);
                    }
                    let _ = tx.send((n, batch));
                }
            }
        };
        for i in 0..3 {
            queues.push("a", i, start(out_tx.clone(), 1));
        }
        assert_eq!(out.recv().await, Some((1, vec![0, 1, 2])));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            lock(&queues.senders).is_empty(),
            "the idle task removed its queue"
        );
        queues.push("a", 7, start(out_tx.clone(), 2));
        assert_eq!(out.recv().await, Some((2, vec![7])));
    }
}
