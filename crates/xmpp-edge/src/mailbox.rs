//! A session's command queue (hand-overs from routers, retractions, close requests).
//!
//! It behaves like a bounded `tokio::sync::mpsc` channel with a single receiver, but holds no
//! storage while empty: an mpsc channel allocates a block of 32 slots up front, which for an
//! edge holding tens of thousands of idle sessions is more than a kilobyte per device doing
//! nothing. Here the queue's memory exists only while commands wait, and is released as soon
//! as the session has taken the last one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Why a command was not queued.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError {
    /// The queue holds `capacity` commands already; the caller decides what waits elsewhere.
    #[error("the session's queue is full")]
    Full,
    /// The session has ended.
    #[error("the session has ended")]
    Closed,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    notify: Notify,
    capacity: usize,
}

struct State<T> {
    queue: VecDeque<T>,
    closed: bool,
}

impl<T> Shared<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        // nothing panics while holding the lock; a poisoned lock still holds a valid queue
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side; cheap to clone, held by the session registry.
pub struct Sender<T>(Arc<Shared<T>>);

/// The receiving side, owned by the session task.
pub struct Receiver<T>(Arc<Shared<T>>);

/// A queue that accepts at most `capacity` waiting commands.
pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            closed: false,
        }),
        notify: Notify::new(),
        capacity: capacity.max(1),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender(self.0.clone())
    }
}

impl<T> Sender<T> {
    /// Queues a command without waiting (callers run on shared loops that must never block on
    /// one slow session).
    pub fn try_send(&self, cmd: T) -> Result<(), TrySendError> {
        {
            let mut st = self.0.state();
            if st.closed {
                return Err(TrySendError::Closed);
            }
            if st.queue.len() >= self.0.capacity {
                return Err(TrySendError::Full);
            }
            st.queue.push_back(cmd);
        }
        // a stored permit when the session is not waiting right now: no wake-up is lost
        self.0.notify.notify_one();
        Ok(())
    }
}

impl<T> Receiver<T> {
    /// The next command. Cancel-safe: a command is only taken when this returns it.
    pub async fn recv(&mut self) -> T {
        loop {
            if let Some(cmd) = self.take() {
                return cmd;
            }
            self.0.notify.notified().await;
        }
    }

    fn take(&self) -> Option<T> {
        let mut st = self.0.state();
        let cmd = st.queue.pop_front();
        if st.queue.is_empty() && st.queue.capacity() > 0 {
            st.queue = VecDeque::new();
        }
        cmd
    }

    /// Whether commands are waiting.
    pub fn is_empty(&self) -> bool {
        self.0.state().queue.is_empty()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.closed = true;
        st.queue = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_in_order_and_frees_memory_when_drained() {
        let (tx, mut rx) = bounded::<u32>(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full));
        assert_eq!(rx.recv().await, 1);
        assert_eq!(tx.try_send(3), Ok(()));
        assert_eq!(rx.recv().await, 2);
        assert_eq!(rx.recv().await, 3);
        assert!(rx.is_empty());
        assert_eq!(rx.0.state().queue.capacity(), 0);
        drop(rx);
        assert_eq!(tx.try_send(4), Err(TrySendError::Closed));
    }

    #[tokio::test]
    async fn wakes_a_waiting_receiver() {
        let (tx, mut rx) = bounded::<&'static str>(4);
        let waiter = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        tx.try_send("hello").expect("queued");
        assert_eq!(waiter.await.expect("joined"), "hello");
    }

    #[tokio::test]
    async fn cancelled_receive_loses_nothing() {
        let (tx, mut rx) = bounded::<u32>(4);
        // a receive abandoned before anything arrived (as in a select! that took another branch)
        let abandoned = tokio::time::timeout(std::time::Duration::from_millis(10), rx.recv()).await;
        assert!(abandoned.is_err());
        tx.try_send(7).expect("queued");
        assert_eq!(rx.recv().await, 7);
    }
}
