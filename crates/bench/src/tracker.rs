//! Bookkeeping of every message: its origin (when its 202 arrived; against Prosody, when a
//! sender wrote it), when and where a device received it, and its end-to-end confirmation (the
//! `delivered` webhook event; against Prosody, the device's receipt back at the sender). The
//! three happen in any order (a device often has the message before the sender has read the
//! 202), so each message has one entry that whichever side comes first creates.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Errors by kind, from every part of the bench.
#[derive(Default)]
pub struct Errors(Mutex<BTreeMap<String, u64>>);

impl Errors {
    /// Counts one error of `kind`.
    pub fn add(&self, kind: impl Into<String>) {
        *lock(&self.0).entry(kind.into()).or_default() += 1;
    }

    /// All counts.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        lock(&self.0).clone()
    }

    /// Total count.
    pub fn total(&self) -> u64 {
        lock(&self.0).values().sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panic elsewhere must not hide the figures gathered so far
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// What confirms a message end to end, besides the device seeing it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Confirm {
    /// The `delivered` event at the bench's webhook receiver (Pushgate).
    #[default]
    Webhook,
    /// The device's XEP-0184 receipt back at the sender (Prosody: no webhooks there).
    Receipt,
}

/// Device index used before a side is known.
const UNKNOWN: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Entry {
    /// The device the message was sent to (local index).
    expected: u32,
    /// The device that received it first.
    received_by: u32,
    /// The 202 (or the sender's write).
    accepted_at: Option<Instant>,
    device_at: Option<Instant>,
    confirmed_at: Option<Instant>,
    device_count: u32,
    confirm_count: u32,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            expected: UNKNOWN,
            received_by: UNKNOWN,
            accepted_at: None,
            device_at: None,
            confirmed_at: None,
            device_count: 0,
            confirm_count: 0,
        }
    }
}

/// Counts of one second of the sending phase (by event time).
#[derive(Default, Clone, Copy)]
struct SecondCounts {
    accepted: u64,
    delivered: u64,
    confirmed: u64,
}

#[derive(Default)]
struct Inner {
    /// Keyed by the message id (a UUID) as a number: 16 bytes instead of a 36-byte string.
    msgs: HashMap<u128, Entry>,
    epoch: Option<Instant>,
    seconds: Vec<SecondCounts>,
    /// Latencies (µs) completed since the last progress line.
    recent_device: Vec<u64>,
    recent_confirm: Vec<u64>,
    /// When the last first-receipt and the last first confirmation arrived.
    last_device_at: Option<Instant>,
    last_confirm_at: Option<Instant>,
}

impl Inner {
    fn second(&mut self, at: Instant) -> &mut SecondCounts {
        let i = self
            .epoch
            .map(|e| at.saturating_duration_since(e).as_secs() as usize)
            .unwrap_or(0);
        if self.seconds.len() <= i {
            self.seconds.resize(i + 1, SecondCounts::default());
        }
        &mut self.seconds[i]
    }
}

/// Live counters for progress lines.
#[derive(Default)]
pub struct Counters {
    /// 202s (Pushgate) or messages written by the senders (Prosody).
    pub accepted: AtomicU64,
    /// First receipt of a message at a device.
    pub delivered: AtomicU64,
    /// First confirmation of a message (webhook `delivered` event, or receipt at the sender).
    pub confirmed: AtomicU64,
    pub device_duplicates: AtomicU64,
    /// HTTP round trips of accepted send requests (µs), for the accept latency.
    http_us: Mutex<Vec<u64>>,
}

/// The tracker shared by senders, device sessions and the webhook receiver.
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<Inner>,
    pub counters: Counters,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Parses a message id (UUID) into the map key.
pub fn key(id: &str) -> Option<u128> {
    uuid::Uuid::parse_str(id).ok().map(|u| u.as_u128())
}

impl Tracker {
    /// Starts the clock of per-second counts (the sending phase).
    pub fn begin(&self) {
        lock(&self.inner).epoch = Some(Instant::now());
    }

    /// The 202 for message `id`, sent to device `expected`, arrived at `at` (against Prosody:
    /// a sender wrote it at `at`).
    pub fn accepted(&self, id: u128, expected: u32, at: Instant) {
        let mut g = lock(&self.inner);
        let e = g.msgs.entry(id).or_default();
        e.expected = expected;
        e.accepted_at = Some(at);
        let (device_at, confirmed_at) = (e.device_at, e.confirmed_at);
        if let Some(d) = device_at {
            g.recent_device
                .push(micros(d.saturating_duration_since(at)));
        }
        if let Some(w) = confirmed_at {
            g.recent_confirm
                .push(micros(w.saturating_duration_since(at)));
        }
        g.second(at).accepted += 1;
        drop(g);
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the HTTP round trip of an accepted request.
    pub fn http_round_trip(&self, d: Duration) {
        lock(&self.counters.http_us).push(micros(d));
    }

    /// Device `device` received message `id` at `at`.
    pub fn device_received(&self, id: u128, device: u32, at: Instant) {
        let mut g = lock(&self.inner);
        let e = g.msgs.entry(id).or_default();
        e.device_count = e.device_count.saturating_add(1);
        if e.device_count > 1 {
            drop(g);
            self.counters
                .device_duplicates
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        e.device_at = Some(at);
        e.received_by = device;
        let accepted_at = e.accepted_at;
        g.last_device_at = Some(at);
        if let Some(a) = accepted_at {
            g.recent_device
                .push(micros(at.saturating_duration_since(a)));
        }
        g.second(at).delivered += 1;
        drop(g);
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// Message `id` was confirmed at `at`: its `delivered` webhook event reached the receiver,
    /// or its receipt reached the sender. Returns whether this was the first confirmation.
    pub fn confirmed(&self, id: u128, at: Instant) -> bool {
        let mut g = lock(&self.inner);
        let e = g.msgs.entry(id).or_default();
        e.confirm_count = e.confirm_count.saturating_add(1);
        if e.confirm_count > 1 {
            return false;
        }
        e.confirmed_at = Some(at);
        let accepted_at = e.accepted_at;
        g.last_confirm_at = Some(at);
        if let Some(a) = accepted_at {
            g.recent_confirm
                .push(micros(at.saturating_duration_since(a)));
        }
        g.second(at).confirmed += 1;
        drop(g);
        self.counters.confirmed.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Latencies (µs) completed since the last call: origin→delivered, origin→confirmed.
    pub fn take_recent(&self) -> (Vec<u64>, Vec<u64>) {
        let mut g = lock(&self.inner);
        (
            std::mem::take(&mut g.recent_device),
            std::mem::take(&mut g.recent_confirm),
        )
    }

    /// Whether every accepted message has reached its device and been confirmed.
    pub fn settled(&self) -> bool {
        let c = &self.counters;
        let accepted = c.accepted.load(Ordering::Relaxed);
        c.delivered.load(Ordering::Relaxed) >= accepted
            && c.confirmed.load(Ordering::Relaxed) >= accepted
            && lock(&self.inner).msgs.values().all(|e| {
                e.accepted_at.is_none() || (e.device_at.is_some() && e.confirmed_at.is_some())
            })
    }

    /// The final analysis.
    pub fn analyse(&self) -> Analysis {
        let g = lock(&self.inner);
        let mut a = Analysis::default();
        let epoch = g.epoch;
        let span = |last: Option<Instant>| match (epoch, last) {
            (Some(e), Some(l)) => Some(l.saturating_duration_since(e).as_secs_f64()),
            _ => None,
        };
        a.device_span_secs = span(g.last_device_at);
        a.confirm_span_secs = span(g.last_confirm_at);
        let mut by_second: BTreeMap<u64, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
        for e in g.msgs.values() {
            if e.device_count > 1 {
                a.reconciliation.duplicated_at_device += 1;
                a.reconciliation.duplicate_copies += u64::from(e.device_count - 1);
            }
            if e.confirm_count > 1 {
                a.reconciliation.duplicate_confirmations += u64::from(e.confirm_count - 1);
            }
            let Some(acc) = e.accepted_at else {
                if e.device_count > 0 {
                    a.reconciliation.received_not_accepted += 1;
                }
                continue;
            };
            a.reconciliation.accepted += 1;
            let sec = epoch
                .map(|ep| acc.saturating_duration_since(ep).as_secs())
                .unwrap_or(0);
            let slot = by_second.entry(sec).or_default();
            match e.device_at {
                Some(d) => {
                    let l = micros(d.saturating_duration_since(acc));
                    if d < acc {
                        a.reconciliation.received_before_202 += 1;
                    }
                    a.device_us.push(l);
                    slot.0.push(l);
                    if e.received_by != e.expected {
                        a.reconciliation.wrong_device += 1;
                    }
                }
                None => a.reconciliation.missing_at_device += 1,
            }
            match e.confirmed_at {
                Some(w) => {
                    let l = micros(w.saturating_duration_since(acc));
                    a.confirm_us.push(l);
                    slot.1.push(l);
                }
                None => a.reconciliation.missing_confirmation += 1,
            }
        }
        a.device_us.sort_unstable();
        a.confirm_us.sort_unstable();
        let n = g
            .seconds
            .len()
            .max(by_second.keys().last().map_or(0, |s| *s as usize + 1));
        for s in 0..n {
            let counts = g.seconds.get(s).copied().unwrap_or_default();
            let (mut d, mut w) = by_second.remove(&(s as u64)).unwrap_or_default();
            d.sort_unstable();
            w.sort_unstable();
            a.per_second.push(SecondStats {
                t: s as u64,
                accepted: counts.accepted,
                delivered: counts.delivered,
                confirmed: counts.confirmed,
                delivered_p50_ms: ms(percentile(&d, 0.50)),
                delivered_p99_ms: ms(percentile(&d, 0.99)),
                confirmed_p50_ms: ms(percentile(&w, 0.50)),
                confirmed_p99_ms: ms(percentile(&w, 0.99)),
            });
        }
        drop(g);
        let mut http = lock(&self.counters.http_us).clone();
        http.sort_unstable();
        a.http_us = http;
        a.reconciliation.ok = a.reconciliation.missing_at_device == 0
            && a.reconciliation.duplicated_at_device == 0
            && a.reconciliation.wrong_device == 0
            && a.reconciliation.missing_confirmation == 0;
        a
    }
}

/// What the run's bookkeeping shows.
#[derive(Default)]
pub struct Analysis {
    /// Sorted accept→delivered latencies (µs).
    pub device_us: Vec<u64>,
    /// Sorted accept→confirmed latencies (µs): webhook event, or receipt at the sender.
    pub confirm_us: Vec<u64>,
    /// Sorted HTTP round trips of accepted requests (µs).
    pub http_us: Vec<u64>,
    pub per_second: Vec<SecondStats>,
    pub reconciliation: Reconciliation,
    /// From the start of sending to the last first-receipt / first confirmation.
    pub device_span_secs: Option<f64>,
    pub confirm_span_secs: Option<f64>,
}

/// One second of the sending phase: counts by event time, latencies of the messages
/// accepted in that second. The report names the fields after the target
/// (`report::PerSecond`).
#[derive(Debug, Clone)]
pub struct SecondStats {
    pub t: u64,
    /// 202s, or messages the senders wrote.
    pub accepted: u64,
    pub delivered: u64,
    /// Webhook `delivered` events, or receipts at the senders.
    pub confirmed: u64,
    pub delivered_p50_ms: Option<f64>,
    pub delivered_p99_ms: Option<f64>,
    pub confirmed_p50_ms: Option<f64>,
    pub confirmed_p99_ms: Option<f64>,
}

/// Did every accepted message arrive exactly once where it should? (Named after the target
/// in the report: `report::ReconciliationReport`.)
#[derive(Debug, Default, Clone)]
pub struct Reconciliation {
    /// Messages whose 202 arrived (or that a sender wrote).
    pub accepted: u64,
    /// Accepted messages no device received.
    pub missing_at_device: u64,
    /// Messages a device received more than once, and the extra copies.
    pub duplicated_at_device: u64,
    pub duplicate_copies: u64,
    /// Accepted messages received by a device other than the one they were sent to.
    pub wrong_device: u64,
    /// Accepted messages without a confirmation (webhook `delivered` event, or receipt at the
    /// sender).
    pub missing_confirmation: u64,
    /// Extra confirmations (webhooks are at-least-once; not a failure).
    pub duplicate_confirmations: u64,
    /// Messages a device received whose request did not answer 202 (a timed-out request whose
    /// messages were committed anyway; not a failure).
    pub received_not_accepted: u64,
    /// Messages the device had before the sender read the 202 (latency counted as 0).
    pub received_before_202: u64,
    /// No accepted message missing, duplicated, misrouted or unconfirmed.
    pub ok: bool,
}

/// The `q` quantile (nearest rank) of sorted values.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Microseconds as milliseconds, rounded to µs.
pub fn ms(us: Option<u64>) -> Option<f64> {
    us.map(|v| v as f64 / 1000.0)
}

/// Percentiles of a latency distribution.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Percentiles {
    /// From sorted µs values.
    pub fn of(sorted: &[u64]) -> Self {
        let mean = if sorted.is_empty() {
            None
        } else {
            Some(sorted.iter().map(|v| *v as f64).sum::<f64>() / sorted.len() as f64 / 1000.0)
        };
        Percentiles {
            count: sorted.len() as u64,
            mean_ms: mean,
            p50_ms: ms(percentile(sorted, 0.50)),
            p95_ms: ms(percentile(sorted, 0.95)),
            p99_ms: ms(percentile(sorted, 0.99)),
            max_ms: ms(sorted.last().copied()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7], 0.01), Some(7));
    }

    #[test]
    fn reconciles_in_any_order() {
        let t = Tracker::default();
        t.begin();
        let now = Instant::now();
        // a: 202 first, then device, then webhook
        t.accepted(1, 0, now);
        t.device_received(1, 0, now + Duration::from_millis(3));
        t.confirmed(1, now + Duration::from_millis(200));
        // b: device before the 202
        t.device_received(2, 1, now);
        t.accepted(2, 1, now + Duration::from_millis(1));
        t.confirmed(2, now + Duration::from_millis(100));
        let a = t.analyse();
        assert!(a.reconciliation.ok, "{:?}", a.reconciliation);
        assert_eq!(a.reconciliation.received_before_202, 1);
        assert_eq!(a.device_us, vec![0, 3000]);
        assert!(t.settled());
        // c: accepted, seen twice, no webhook; d: wrong device
        t.accepted(3, 0, now);
        t.device_received(3, 0, now);
        t.device_received(3, 0, now);
        t.accepted(4, 0, now);
        t.device_received(4, 1, now);
        assert!(t.confirmed(4, now));
        assert!(!t.confirmed(4, now));
        let r = t.analyse().reconciliation;
        assert!(!r.ok);
        assert_eq!(r.duplicated_at_device, 1);
        assert_eq!(r.duplicate_copies, 1);
        assert_eq!(r.missing_confirmation, 1);
        assert_eq!(r.duplicate_confirmations, 1);
        assert_eq!(r.wrong_device, 1);
        assert!(!t.settled());
    }
}
