//! Per-key work queues, each drained by its own task that ends once idle.
//!
//! The suite's group commits have this shape: the per-subject publisher ([`crate::batch`]),
//! the router's per-edge hand-overs, and through [`Batched`] the edge's confirmations and
//! hand-over checks and the router's targeting. Whatever is queued for a key
//! while its task is busy goes out together next time; keys come and go (apps, edges), so an
//! idle task removes its queue and ends, and the next item for that key starts a new one.
//!
//! A busy key also holds its batch open for a short [`Linger`] after the first item. Without
//! it, a batch holds only what queued during the previous send, and at moderate rates that is
//! one item: every fact then costs its own publish, stream message, delivery and ack, and
//! the machine spent as much CPU at 1,500 messages/s as at full load (docs/benchmarks.md,
//! "Results (2026-11-23, fourth session): batch linger"). An idle key still sends at once.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

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

    /// Adds items to `batch` (which holds its first) until it has `max` or is complete: what
    /// is queued, and with a deadline ([`Linger::until`]) what arrives before it.
    pub async fn fill(&mut self, batch: &mut Vec<T>, max: usize, until: Option<Instant>) {
        while batch.len() < max {
            match self.next_in_batch(until).await {
                Some(item) => batch.push(item),
                None => break,
            }
        }
    }

    /// The next item of a batch that may gather items until `until` ([`Linger::until`]): one
    /// already queued, or with a deadline the first to arrive before it; `None` when the batch
    /// is complete. Unlike [`Queue::next`] the queue stays, whatever the outcome.
    pub async fn next_in_batch(&mut self, until: Option<Instant>) -> Option<T> {
        if let Some(item) = self.try_next() {
            return Some(item);
        }
        let deadline = until?;
        // `recv` answers `None` only once every sender is gone, and the map keeps one while
        // the task runs
        tokio::time::timeout_at(deadline, self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

/// How long a key's batch stays open for more items after its first one.
///
/// Only a busy key waits: one whose previous batch was settled (acknowledged, answered) less
/// than the linger before this batch opened. Under load that is every batch, since items
/// queue while the previous one is in flight, and each then gathers what arrives within the
/// linger; a key that was quiet sends its first item at once, so a lone message gains no
/// latency. (Measured from the settling, not the sending: a send under load can take longer
/// than the linger, and a busy key would then look quiet.) `Duration::ZERO` never waits: each
/// batch is what queued during the previous send.
#[derive(Debug, Clone)]
pub struct Linger {
    wait: Duration,
    last_settled: Option<Instant>,
}

impl Linger {
    pub fn new(wait: Duration) -> Self {
        Linger {
            wait,
            last_settled: None,
        }
    }

    /// Until when a batch that opened at `opened` may gather more items; `None`: send it with
    /// what is queued now.
    pub fn until(&self, opened: Instant) -> Option<Instant> {
        let last = self.last_settled?;
        (!self.wait.is_zero() && opened.saturating_duration_since(last) < self.wait)
            .then(|| opened + self.wait)
    }

    /// The previous batch was settled at `at`.
    pub fn settled(&mut self, at: Instant) {
        self.last_settled = Some(at);
    }
}

/// One batch's work: takes the batch's items, answers each, in order.
type RunBatch<T, R> = dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = Vec<R>> + Send>> + Send + Sync;

/// Calls from many tasks answered by one call per batch: the edge's confirmations and the
/// router's targeting each turn many callers' Redis requests into one script call. Each
/// caller waits for its own answer; one task (started on demand, ended when idle) gathers
/// what is queued, and while busy what arrives within the [`Linger`], up to a maximum, and
/// runs the batch.
pub struct Batched<T, R> {
    queues: KeyedQueues<(T, oneshot::Sender<R>)>,
    linger: Duration,
    max: usize,
    run: Arc<RunBatch<T, R>>,
}

/// How long a [`Batched`] task waits for work before it ends.
const BATCHED_IDLE: Duration = Duration::from_secs(10);

impl<T: Send + 'static, R: Send + 'static> Batched<T, R> {
    /// `run` answers a batch's items in their order, one answer each (when it answers another
    /// number, every caller of that batch gets `None` from [`Batched::call`]); at most `max`
    /// items per batch.
    pub fn new<F, Fut>(linger: Duration, max: usize, run: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        Batched {
            queues: KeyedQueues::new(),
            linger,
            max: max.max(1),
            run: Arc::new(move |items| Box::pin(run(items))),
        }
    }

    /// Queues `item` for the next batch and waits for its answer. `None`: the batch went
    /// without answers (a `run` that answered another number of items, or panicked).
    pub async fn call(&self, item: T) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        let (linger, max, run) = (self.linger, self.max, self.run.clone());
        self.queues.push("batched", (item, tx), move |queue| {
            run_batches(queue, linger, max, run)
        });
        rx.await.ok()
    }
}

/// [`Batched`]'s task: a batch at a time until idle.
async fn run_batches<T, R>(
    mut queue: Queue<(T, oneshot::Sender<R>)>,
    linger: Duration,
    max: usize,
    run: Arc<RunBatch<T, R>>,
) {
    let mut linger = Linger::new(linger);
    let mut batch = Vec::with_capacity(max);
    while let Some(first) = queue.next(BATCHED_IDLE).await {
        let until = linger.until(Instant::now());
        batch.push(first);
        queue.fill(&mut batch, max, until).await;
        let (items, callers): (Vec<T>, Vec<oneshot::Sender<R>>) = batch.drain(..).unzip();
        let answers = run(items).await;
        linger.settled(Instant::now());
        if answers.len() != callers.len() {
            // which answer is whose cannot be told: none is given (each caller gets `None`)
            continue;
        }
        for (caller, answer) in callers.into_iter().zip(answers) {
            // the caller may have gone meanwhile (its task was dropped): nothing to tell
            let _ = caller.send(answer);
        }
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

    /// The linger in a real task: a quiet key sends its first item without waiting, a busy
    /// one holds its batch open and gathers what comes meanwhile, and a batch that fills up
    /// goes out then. The linger is an hour, so neither outcome can come from timing: a
    /// batch that waited for it would hang the test (the guard fails it), and one sent
    /// without lingering would hold one item.
    #[tokio::test]
    async fn a_busy_key_lingers_and_a_quiet_one_does_not() {
        const WAIT: Duration = Duration::from_secs(3600);
        const MAX: usize = 2;
        let queues: KeyedQueues<u32> = KeyedQueues::new();
        let (out_tx, mut out) = mpsc::unbounded_channel();
        let task = move |mut q: Queue<u32>| async move {
            let mut linger = Linger::new(WAIT);
            while let Some(first) = q.next(Duration::from_secs(60)).await {
                let until = linger.until(Instant::now());
                let mut batch = vec![first];
                q.fill(&mut batch, MAX, until).await;
                linger.settled(Instant::now());
                let _ = out_tx.send(batch);
            }
        };
        let guard = Duration::from_secs(30);
        queues.push("k", 1, task.clone());
        let first = tokio::time::timeout(guard, out.recv()).await;
        assert_eq!(first, Ok(Some(vec![1])), "a quiet key sends at once");

        // busy now: item 2 opens a batch that waits; 3 comes well after it and still joins
        queues.push("k", 2, task.clone());
        tokio::time::sleep(Duration::from_millis(100)).await;
        queues.push("k", 3, task.clone());
        let second = tokio::time::timeout(guard, out.recv()).await;
        assert_eq!(
            second,
            Ok(Some(vec![2, 3])),
            "full, so sent without the rest of the wait"
        );
    }

    /// Whether a batch lingers depends on how long ago the previous one was settled.
    #[test]
    fn only_a_key_settled_within_the_linger_waits() {
        let wait = Duration::from_millis(2);
        let mut l = Linger::new(wait);
        let t0 = Instant::now();
        assert_eq!(l.until(t0), None, "nothing sent yet");
        l.settled(t0);
        let soon = t0 + Duration::from_millis(1);
        assert_eq!(l.until(soon), Some(soon + wait));
        assert_eq!(l.until(t0 + wait), None, "quiet for the whole linger");
        let mut off = Linger::new(Duration::ZERO);
        off.settled(t0);
        assert_eq!(off.until(t0), None, "no linger never waits");
    }

    /// Callers queued together go in one batch and each gets its own answer; a batch that
    /// answers fewer items than it got answers none, rather than give one caller another's
    /// answer.
    #[tokio::test]
    async fn batched_calls_share_a_run_and_get_their_own_answers() {
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let batched = Arc::new(Batched::new(Duration::ZERO, 3, move |items: Vec<u32>| {
            let seen = seen_tx.clone();
            async move {
                let _ = seen.send(items.clone());
                // answers all but an item 99
                items
                    .into_iter()
                    .filter(|i| *i != 99)
                    .map(|i| i * 10)
                    .collect::<Vec<_>>()
            }
        }));
        // five callers queued before the task runs: batches of at most three, in order
        let calls: Vec<_> = (1..=5)
            .map(|i| {
                let b = batched.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        let mut answers = Vec::new();
        for c in calls {
            answers.push(c.await.ok().flatten());
        }
        assert_eq!(
            answers,
            vec![Some(10), Some(20), Some(30), Some(40), Some(50)]
        );
        let mut batches = Vec::new();
        while let Ok(b) = seen.try_recv() {
            batches.push(b);
        }
        assert!(batches.iter().all(|b| b.len() <= 3), "{batches:?}");
        assert_eq!(batches.concat(), vec![1, 2, 3, 4, 5]);
        assert!(
            batches.len() < 5,
            "some callers shared a batch: {batches:?}"
        );

        let (a, b) = tokio::join!(batched.call(99), batched.call(4));
        assert_eq!((a, b), (None, None), "one batch, one answer short");
        assert_eq!(
            batched.call(4).await,
            Some(40),
            "the next batch is answered"
        );
    }
}
