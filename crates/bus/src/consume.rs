//! Running a service's work off a durable consumer: the one loop routers, bridges and
//! sms-fallback share.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{Bus, ConsumerName};

/// Runs `handle` for every message of the durable consumer `name`, at most `concurrency` at a
/// time, until `shutdown`. When NATS goes away (restart, network) the consumer is asked for
/// again every second until it is back; nothing is acked here — `handle` settles each message.
/// Returns once every handler in flight has finished, so a graceful shutdown acks (or naks)
/// what it took and nothing else.
pub async fn consume<F, Fut>(
    bus: &Bus,
    name: ConsumerName,
    concurrency: usize,
    shutdown: CancellationToken,
    handle: F,
) where
    F: Fn(jetstream::Message) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let concurrency = concurrency.max(1);
    let permits = Arc::new(Semaphore::new(concurrency));
    while !shutdown.is_cancelled() {
        let mut messages = match bus.consumer(name).await {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(consumer = name.as_str(), error = %e, "consumer stream failed; retrying");
                    sleep_or_cancel(&shutdown, Duration::from_secs(1)).await;
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(consumer = name.as_str(), error = %e, "consumer unavailable; retrying");
                sleep_or_cancel(&shutdown, Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = messages.next() => n,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(consumer = name.as_str(), error = %e, "consumer error; reconnecting");
                    break;
                }
                None => break,
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let work = handle(msg);
            tokio::spawn(async move {
                work.await;
                drop(permit);
            });
        }
    }
    let _ = permits.acquire_many(concurrency as u32).await;
}

/// Sleeps, or returns early on shutdown.
pub async fn sleep_or_cancel(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// What to do with a JetStream message after handling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ack,
    /// Redeliver after the delay.
    Nak(Duration),
}

/// Acks or naks `msg` as decided. A failed ack only means the server redelivers later, which
/// handlers are idempotent for, so it is logged and not returned.
pub async fn settle(msg: &jetstream::Message, outcome: Settle) {
    let res = match outcome {
        Settle::Ack => msg.ack().await,
        Settle::Nak(delay) => msg.ack_with(jetstream::AckKind::Nak(Some(delay))).await,
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "settling a message failed; it will be redelivered");
    }
}

/// Exponential backoff with jitter: `base · 2^(attempt-1)`, capped at `max`, then scaled into
/// its upper half by `jitter` ∈ [0, 1], so instances retrying after one outage spread out.
pub fn retry_delay(attempt: u64, base_ms: u64, max_ms: u64, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(32) as u32;
    let full = base_ms.saturating_mul(2u64.saturating_pow(exp)).min(max_ms);
    let half = full / 2;
    let extra = ((full - half) as f64 * jitter.clamp(0.0, 1.0)) as u64;
    Duration::from_millis(half + extra)
}

/// A uniform random factor for [`retry_delay`].
pub fn jitter() -> f64 {
    use rand::Rng;
    rand::thread_rng().gen_range(0.0..=1.0)
}
