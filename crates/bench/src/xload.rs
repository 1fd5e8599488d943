//! The sender of `--target prosody`: Prosody has no HTTP send API (and `mod_rest` is not
//! packaged), so the "backend" is a few XMPP sessions that send
//! `<message to='bu7@localhost/bench' type='chat'><body/><request xmlns='urn:xmpp:receipts'/>`
//! at the same rate as the HTTP sender sends to Pushgate — open loop at `--rate R`, or closed
//! loop with `--rate max` and at most `--concurrency` messages sent and not yet receipted —
//! and read the devices' receipts that come back.
//!
//! Each sender is two tasks: the reader (receipts, `<r/>`, pings), and the writer (the
//! schedule, plus the reader's answers: a sender that does not answer Prosody's stream
//! management requests promptly would have its session closed when its unacknowledged queue
//! fills). When the writer is behind its schedule it writes every message that is due in one
//! go (at most [`MAX_BURST`]), as any XMPP client with a send buffer does.
//!
//! A message's time is taken just before its write: the start of send→delivered, in the same
//! process and on the same clock as the device's receive time.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pushgate_xmpp::{escape, Element, XmlEvent};
use rand::Rng;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::Rate;
use crate::load::Sent;
use crate::tracker::{key, Errors, Tracker};
use crate::xmpp::{self, Tls, NS_CLIENT, NS_RECEIPTS, NS_SM};

/// Messages written at most in one write when behind the schedule or when the window opens.
const MAX_BURST: usize = 64;
/// How late past the end of the duration a scheduled message may still be written (as in
/// `load`).
const END_GRACE: Duration = Duration::from_millis(100);

/// What to send.
pub struct Plan {
    pub rate: Rate,
    pub duration: Duration,
    /// `--rate max`: messages sent and not yet receipted at most.
    pub window: usize,
    /// Local indexes of the devices whose sessions are up.
    pub targets: Arc<Vec<u32>>,
    /// Full JID of each device, by local index.
    pub jids: Arc<Vec<String>>,
}

/// The full JID a device's session has: account JID plus the resource every bench session
/// binds.
pub fn full_jid(bare: &str) -> String {
    format!("{bare}/{}", xmpp::RESOURCE)
}

/// A message to device `index` with id `id`.
pub fn stanza(to: &str, id: &str, seq: u64) -> String {
    format!(
        "<message to='{}' id='{}' type='chat'><body>pushgate-bench message {seq}</body><request xmlns='urn:xmpp:receipts'/></message>",
        escape(to),
        escape(id)
    )
}

/// Number of messages an open-loop schedule of `rate` has strictly before `duration`: the
/// same count as the HTTP sender's (batch 1).
pub fn scheduled(rate: f64, duration: Duration) -> u64 {
    // the epsilon keeps float noise from adding one
    (duration.as_secs_f64() * rate - 1e-9).ceil().max(0.0) as u64
}

struct Ctx {
    plan: Plan,
    tracker: Arc<Tracker>,
    errors: Arc<Errors>,
    sent: Arc<Sent>,
    senders: u64,
    /// Closed loop: free places in the window.
    window: Semaphore,
}

/// The running senders.
pub struct Senders {
    /// Ends (yields `None`) once every writer has finished its sending phase.
    pub done: mpsc::Receiver<()>,
    /// The sender sessions; they end when `close` is cancelled.
    pub tasks: JoinSet<()>,
}

/// Starts the senders on logged-in connections. Sending stops at the end of the duration or
/// at `stop`; the sessions keep reading receipts (and answering Prosody) until `close`.
pub fn start(
    conns: Vec<xmpp::Conn>,
    plan: Plan,
    tracker: Arc<Tracker>,
    errors: Arc<Errors>,
    sent: Arc<Sent>,
    stop: CancellationToken,
    close: CancellationToken,
) -> Senders {
    let window = plan.window;
    let ctx = Arc::new(Ctx {
        plan,
        tracker,
        errors,
        sent,
        senders: conns.len() as u64,
        window: Semaphore::new(window),
    });
    let (done_tx, done) = mpsc::channel(1);
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    if let Rate::Fixed(r) = ctx.plan.rate {
        ctx.sent.not_sent.store(
            scheduled(r, ctx.plan.duration),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    for (k, conn) in conns.into_iter().enumerate() {
        let parts = conn.into_parts();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        tasks.spawn(read(
            ctx.clone(),
            parts.reader,
            parts.early,
            ctl_tx,
            close.clone(),
        ));
        tasks.spawn(write(
            ctx.clone(),
            k as u64,
            start,
            parts.writer,
            ctl_rx,
            done_tx.clone(),
            stop.clone(),
            close.clone(),
        ));
    }
    Senders { done, tasks }
}

/// Reads what comes back to a sender: receipts (the confirmation of a message), stream
/// management requests and pings (answered through the writer), errors.
async fn read(
    ctx: Arc<Ctx>,
    mut reader: pushgate_xmpp::StanzaReader<ReadHalf<Tls>>,
    early: Vec<Element>,
    ctl: mpsc::UnboundedSender<String>,
    close: CancellationToken,
) {
    let mut h: u32 = 0;
    for e in early {
        on_stanza(&ctx, &e, &ctl, &mut h, false);
    }
    loop {
        let ev = tokio::select! {
            _ = close.cancelled() => return,
            ev = reader.next() => ev,
        };
        match ev {
            Ok(XmlEvent::Stanza(e)) => on_stanza(&ctx, &e, &ctl, &mut h, true),
            Ok(XmlEvent::StreamClose) if close.is_cancelled() => return,
            Ok(XmlEvent::StreamClose) => {
                ctx.errors.add("sender-stream-closed-by-server");
                return;
            }
            Ok(XmlEvent::StreamOpen(_)) => {
                ctx.errors.add("sender-unexpected-stream-header");
                return;
            }
            Err(e) => {
                if !close.is_cancelled() {
                    ctx.errors.add(format!(
                        "sender-ended-{}",
                        xmpp::SessionError::from(e).kind()
                    ));
                }
                return;
            }
        }
    }
}

fn on_stanza(
    ctx: &Ctx,
    e: &Element,
    ctl: &mpsc::UnboundedSender<String>,
    h: &mut u32,
    counted: bool,
) {
    let at = std::time::Instant::now();
    if e.ns == NS_CLIENT && counted {
        *h = h.wrapping_add(1);
    }
    match (e.name.as_str(), e.ns.as_str()) {
        ("message", NS_CLIENT) => {
            if e.attr("type") == Some("error") {
                let cond = e
                    .children
                    .iter()
                    .find(|c| c.name == "error")
                    .and_then(|err| err.children.iter().find(|c| c.name != "text"))
                    .map_or("unknown", |c| c.name.as_str());
                ctx.errors.add(format!("sender-got-message-error-{cond}"));
                return;
            }
            match e
                .child("received", NS_RECEIPTS)
                .and_then(|r| r.attr("id"))
                .map(key)
            {
                Some(Some(k)) => {
                    if ctx.tracker.confirmed(k, at) {
                        ctx.sent.in_flight.fetch_sub(1, Ordering::Relaxed);
                        ctx.window.add_permits(1);
                    }
                }
                Some(None) => ctx.errors.add("sender-got-receipt-with-unknown-id"),
                None => ctx.errors.add("sender-got-message-without-receipt"),
            }
        }
        ("iq", NS_CLIENT) => {
            if let Some(answer) = xmpp::iq_answer(e) {
                let _ = ctl.send(answer);
            }
        }
        ("presence", NS_CLIENT) | ("a", NS_SM) => {}
        ("r", NS_SM) => {
            let _ = ctl.send(format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>"));
        }
        (name, _) => ctx.errors.add(format!("sender-got-unexpected-{name}")),
    }
}

/// What the writer does next.
enum Next {
    /// Write these answers to the server.
    Answer(String),
    /// Write the messages that are due (or that the window lets through).
    Send,
    /// The sending phase is over.
    Done,
}

/// Writes sender `k`'s share of the messages, then only the reader's answers until `close`.
#[allow(clippy::too_many_arguments)]
async fn write(
    ctx: Arc<Ctx>,
    k: u64,
    start: Instant,
    mut w: WriteHalf<Tls>,
    mut ctl: mpsc::UnboundedReceiver<String>,
    done: mpsc::Sender<()>,
    stop: CancellationToken,
    close: CancellationToken,
) {
    let end = start + ctx.plan.duration;
    // open loop: this sender writes the global message numbers k, k + K, k + 2K, …; message
    // n is due at start + n / rate
    let mut next = k;
    let mut sending = true;
    let mut done = Some(done);
    loop {
        let step = if sending {
            let due = match ctx.plan.rate {
                Rate::Fixed(r) => {
                    let due = start + Duration::from_secs_f64(next as f64 / r);
                    if due >= end {
                        None
                    } else {
                        Some(due)
                    }
                }
                Rate::Max => Some(start),
            };
            match due {
                None => Next::Done,
                Some(due) => tokio::select! {
                    biased;
                    a = ctl.recv() => a.map_or(Next::Done, Next::Answer),
                    _ = stop.cancelled() => Next::Done,
                    _ = tokio::time::sleep_until(end + END_GRACE) => Next::Done,
                    _ = tokio::time::sleep_until(due), if matches!(ctx.plan.rate, Rate::Fixed(_)) => Next::Send,
                    p = ctx.window.acquire(), if ctx.plan.rate == Rate::Max => match p {
                        Ok(p) => {
                            p.forget();
                            if Instant::now() >= end { Next::Done } else { Next::Send }
                        }
                        Err(_) => Next::Done,
                    },
                },
            }
        } else {
            tokio::select! {
                a = ctl.recv() => match a {
                    Some(a) => Next::Answer(a),
                    None => break,
                },
                _ = close.cancelled() => break,
            }
        };
        let result = match step {
            Next::Answer(a) => xmpp::write(&mut w, &a).await,
            Next::Done => {
                sending = false;
                // the main task waits for every writer's `done` to drop
                done.take();
                continue;
            }
            Next::Send => {
                let batch = match ctx.plan.rate {
                    Rate::Fixed(r) => due_batch(&ctx, start, end, r, &mut next),
                    Rate::Max => window_batch(&ctx),
                };
                send(&ctx, &mut w, batch).await
            }
        };
        if let Err(e) = result {
            if !close.is_cancelled() {
                ctx.errors.add(format!("sender-write-{}", e.kind()));
            }
            return;
        }
    }
    let _ = xmpp::write(&mut w, "</stream:stream>").await;
    let _ = w.shutdown().await;
}

/// The global numbers of this sender's messages that are due now (at most [`MAX_BURST`]);
/// records the lag behind the schedule.
fn due_batch(ctx: &Ctx, start: Instant, end: Instant, rate: f64, next: &mut u64) -> u64 {
    let now = Instant::now();
    let first_due = start + Duration::from_secs_f64(*next as f64 / rate);
    let lag =
        u64::try_from(now.saturating_duration_since(first_due).as_micros()).unwrap_or(u64::MAX);
    ctx.sent.max_lag_us.fetch_max(lag, Ordering::Relaxed);
    // the first is due (the writer slept until it); then every further one that is due too
    *next += ctx.senders;
    let mut n = 1u64;
    while (n as usize) < MAX_BURST {
        let due = start + Duration::from_secs_f64(*next as f64 / rate);
        if due > now || due >= end {
            break;
        }
        *next += ctx.senders;
        n += 1;
    }
    n
}

/// One message for the window place just taken, plus as many as the window has free now.
fn window_batch(ctx: &Ctx) -> u64 {
    let mut n = 1u64;
    while (n as usize) < MAX_BURST {
        match ctx.window.try_acquire() {
            Ok(p) => {
                p.forget();
                n += 1;
            }
            Err(_) => break,
        }
    }
    n
}

/// Writes `n` messages to random connected devices in one write.
async fn send(ctx: &Ctx, w: &mut WriteHalf<Tls>, n: u64) -> Result<(), xmpp::SessionError> {
    let targets = &ctx.plan.targets;
    if targets.is_empty() {
        return Ok(());
    }
    let mut buf = String::with_capacity(256 * n as usize);
    let mut ids = Vec::with_capacity(n as usize);
    {
        let mut rng = rand::thread_rng();
        for _ in 0..n {
            let Some(device) = targets.get(rng.gen_range(0..targets.len())).copied() else {
                continue;
            };
            let Some(jid) = ctx.plan.jids.get(device as usize) else {
                continue;
            };
            let id = uuid::Uuid::new_v4();
            let seq = ctx.sent.requests_ok.fetch_add(1, Ordering::Relaxed);
            buf.push_str(&stanza(jid, &id.to_string(), seq));
            ids.push((id.as_u128(), device));
        }
    }
    let at = std::time::Instant::now();
    for (id, device) in &ids {
        ctx.tracker.accepted(*id, *device, at);
    }
    let count = ids.len() as u64;
    ctx.sent.in_flight.fetch_add(count, Ordering::Relaxed);
    if let Rate::Fixed(_) = ctx.plan.rate {
        // what was scheduled and is now written is no longer "not sent"
        let _ = ctx
            .sent
            .not_sent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(count))
            });
    }
    let r = xmpp::write(w, &buf).await;
    if r.is_err() {
        ctx.sent.requests_failed.fetch_add(count, Ordering::Relaxed);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_counts_like_the_http_sender() {
        assert_eq!(scheduled(1000.0, Duration::from_secs(30)), 30_000);
        assert_eq!(scheduled(3.0, Duration::from_secs(1)), 3);
        assert_eq!(scheduled(2.5, Duration::from_secs(1)), 3);
    }

    #[test]
    fn stanzas_ask_for_a_receipt_and_escape() {
        let s = stanza("bu1@localhost/bench", "a'b", 7);
        assert_eq!(
            s,
            "<message to='bu1@localhost/bench' id='a&apos;b' type='chat'><body>pushgate-bench message 7</body><request xmlns='urn:xmpp:receipts'/></message>"
        );
        assert_eq!(full_jid("bu1@localhost"), "bu1@localhost/bench");
    }
}
