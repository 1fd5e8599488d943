//! The sender: `POST /v1/messages` to random connected devices' users, at a fixed rate or as
//! fast as accepted, with bounded concurrency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::cli::Rate;
use crate::tracker::{key, Errors, Tracker};

/// What to send.
pub struct Plan {
    pub rate: Rate,
    pub duration: Duration,
    pub batch: u32,
    pub concurrency: usize,
    /// Local indexes of the devices whose sessions are up: only they are sent to, so a device
    /// that failed to log in does not show up as lost messages.
    pub targets: Arc<Vec<u32>>,
    /// Global index of local device 0 (user and device names).
    pub offset: u32,
    pub ttl_secs: u32,
}

/// What the sender did.
#[derive(Default)]
pub struct Sent {
    pub requests_ok: AtomicU64,
    pub requests_failed: AtomicU64,
    /// Largest delay between a request's scheduled time and its start (fixed rate only): the
    /// system fell behind the schedule when this grows.
    pub max_lag_us: AtomicU64,
    /// Requests in flight now.
    pub in_flight: AtomicU64,
    /// Scheduled requests (fixed rate) not sent because the run was over before their turn
    /// came: the suite could not keep up with the rate.
    pub not_sent: AtomicU64,
}

/// User and device names of a global device index.
pub fn user_of(global: u64) -> String {
    format!("bu{global}")
}

/// Device name of a global device index.
pub fn device_of(global: u64) -> String {
    format!("bd{global}")
}

struct Ctx {
    api: Arc<Api>,
    key: Arc<str>,
    plan: Plan,
    tracker: Arc<Tracker>,
    errors: Arc<Errors>,
    sent: Arc<Sent>,
    seq: AtomicU64,
}

/// Sends for `plan.duration` (or until `stop`), then waits for the requests in flight.
pub async fn run(
    api: Arc<Api>,
    key: Arc<str>,
    plan: Plan,
    tracker: Arc<Tracker>,
    errors: Arc<Errors>,
    sent: Arc<Sent>,
    stop: CancellationToken,
) {
    if plan.targets.is_empty() {
        return;
    }
    let ctx = Arc::new(Ctx {
        api,
        key,
        plan,
        tracker,
        errors,
        sent,
        seq: AtomicU64::new(0),
    });
    match ctx.plan.rate {
        Rate::Fixed(r) => fixed_rate(ctx, r, stop).await,
        Rate::Max => as_fast_as_accepted(ctx, stop).await,
    }
}

/// How late past the end of the duration a scheduled request may still start.
const END_GRACE: Duration = Duration::from_millis(100);

/// Open loop: request `i` is due at `start + i × batch / rate`, whatever happened to the ones
/// before, so a slow pipeline shows as lag rather than silently slowing the offered load. When
/// all `concurrency` requests are in flight the next one waits; at the end of the duration
/// the requests still waiting for their turn are not sent (counted in `not_sent`), so the
/// achieved rate is what the suite sustained for that duration.
async fn fixed_rate(ctx: Arc<Ctx>, rate: f64, stop: CancellationToken) {
    let interval = f64::from(ctx.plan.batch) / rate;
    // requests due strictly before the end (the epsilon keeps float noise from adding one)
    let scheduled = (ctx.plan.duration.as_secs_f64() / interval - 1e-9).ceil() as u64;
    let permits = Arc::new(Semaphore::new(ctx.plan.concurrency));
    let mut tasks = JoinSet::new();
    let start = tokio::time::Instant::now();
    let end = start + ctx.plan.duration;
    let mut issued = 0u64;
    while issued < scheduled {
        let due = start + Duration::from_secs_f64(issued as f64 * interval);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.cancelled() => break,
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = tokio::time::sleep_until(end + END_GRACE) => break,
            _ = stop.cancelled() => break,
        };
        let now = tokio::time::Instant::now();
        // a little grace, so timer jitter on the last request does not count as falling behind
        if now >= end + END_GRACE {
            break;
        }
        let lag = u64::try_from(now.saturating_duration_since(due).as_micros()).unwrap_or(u64::MAX);
        ctx.sent.max_lag_us.fetch_max(lag, Ordering::Relaxed);
        let c = ctx.clone();
        tasks.spawn(async move {
            one_request(&c).await;
            drop(permit);
        });
        issued += 1;
        // reap finished tasks so the set stays small on long runs
        while tasks.try_join_next().is_some() {}
    }
    ctx.sent
        .not_sent
        .store(scheduled.saturating_sub(issued), Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
}

/// Closed loop: `concurrency` workers each send their next request when the previous one is
/// answered.
async fn as_fast_as_accepted(ctx: Arc<Ctx>, stop: CancellationToken) {
    let end = Instant::now() + ctx.plan.duration;
    let mut workers = JoinSet::new();
    for _ in 0..ctx.plan.concurrency {
        let c = ctx.clone();
        let stop = stop.clone();
        workers.spawn(async move {
            while Instant::now() < end && !stop.is_cancelled() {
                one_request(&c).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

async fn one_request(ctx: &Ctx) {
    let seq = ctx.seq.fetch_add(1, Ordering::Relaxed);
    let targets = &ctx.plan.targets;
    let recipients: Vec<u32> = {
        let mut rng = rand::thread_rng();
        (0..ctx.plan.batch)
            .filter_map(|_| targets.get(rng.gen_range(0..targets.len())).copied())
            .collect()
    };
    let list: Vec<String> = recipients
        .iter()
        .map(|i| {
            format!(
                "{{\"user_id\":\"{}\"}}",
                user_of(u64::from(ctx.plan.offset) + u64::from(*i))
            )
        })
        .collect();
    let body = format!(
        "{{\"recipients\":[{}],\"text\":\"pushgate-bench message {seq}\",\"ttl\":{}}}",
        list.join(","),
        ctx.plan.ttl_secs
    );
    ctx.sent.in_flight.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let answer = ctx.api.send(&ctx.key, body).await;
    let at = Instant::now();
    ctx.sent.in_flight.fetch_sub(1, Ordering::Relaxed);
    match answer {
        Ok(ids) => {
            ctx.sent.requests_ok.fetch_add(1, Ordering::Relaxed);
            ctx.tracker.http_round_trip(at - t0);
            if ids.len() != recipients.len() {
                ctx.errors.add("answer-with-wrong-message-count");
            }
            for (id, device) in ids.iter().zip(recipients) {
                match key(id) {
                    Some(k) => ctx.tracker.accepted(k, device, at),
                    None => ctx.errors.add("answer-with-malformed-message-id"),
                }
            }
        }
        Err(e) => {
            ctx.sent.requests_failed.fetch_add(1, Ordering::Relaxed);
            ctx.errors.add(e.kind());
        }
    }
}
