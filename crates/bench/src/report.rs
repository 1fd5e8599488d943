//! The run's result: JSON for `--out`, and the human summary.
//!
//! One shape for both targets, so runs can be compared side by side: what both measure has
//! the same name; what only Pushgate has (the HTTP API's 202s, webhooks) is `null` against
//! Prosody, and what only the Prosody run has (messages written by XMPP senders, receipts back
//! at them) is left out of Pushgate's JSON, which therefore keeps its earlier form.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::tracker::{Confirm, Percentiles, Reconciliation, SecondStats};

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub struct RunResult {
    pub date: String,
    pub command: String,
    /// Stopped by ctrl-c: the figures cover a partial run.
    pub interrupted: bool,
    /// `pushgate` or `prosody`.
    pub target: &'static str,
    /// Which suite or server, and where.
    pub target_description: String,
    /// `--target prosody`: the server the bench started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prosody: Option<ProsodyInfo>,
    pub host: Host,
    pub config: Config,
    pub sessions: Sessions,
    pub memory: Memory,
    pub throughput: Throughput,
    pub latency: Latency,
    /// CPU use from the start of sending to the end of the drain.
    pub cpu: crate::system::CpuUse,
    /// Webhook events by kind (Pushgate; `null` against Prosody, which has no webhooks).
    pub webhook_events: Option<BTreeMap<String, u64>>,
    pub errors: BTreeMap<String, u64>,
    pub reconciliation: ReconciliationReport,
    pub per_second: Vec<PerSecond>,
}

/// The Prosody a `--target prosody` run started.
#[derive(Debug, Serialize)]
pub struct ProsodyInfo {
    /// From its startup log line.
    pub version: Option<String>,
    pub pid: u32,
    pub address: String,
    /// `internal_hashed` or `internal_plain`.
    pub authentication: &'static str,
    /// `password_hash` (hashed accounts only).
    pub password_hash: Option<&'static str>,
    pub storage: &'static str,
    /// `network_settings = { nagle = false }` (`--prosody-nodelay`); Prosody's default is
    /// Nagle on.
    pub nagle_off: bool,
    pub modules_enabled: Vec<&'static str>,
    pub modules_disabled: Vec<&'static str>,
    /// XMPP sender sessions the messages were spread over.
    pub senders: u32,
}

#[derive(Debug, Serialize)]
pub struct Host {
    pub cores: usize,
    pub load_average_start: Option<[f64; 3]>,
    pub load_average_end: Option<[f64; 3]>,
    pub open_files_limit: u64,
}

#[derive(Debug, Serialize)]
pub struct Config {
    /// `inprocess`, `api` or `prosody`.
    pub mode: &'static str,
    pub devices: u32,
    pub device_offset: u32,
    pub source_addresses: Vec<String>,
    /// Messages per second asked for; `null` for `max`.
    pub rate: Option<f64>,
    pub duration_secs: u64,
    pub batch: u32,
    /// Pushgate: send requests in flight at most; Prosody: messages sent and not yet
    /// receipted at most (`--rate max`), or written and not yet handed to the socket.
    pub concurrency: usize,
    pub connect_concurrency: usize,
    /// `--relogin`: every session logged in a second time, all at once.
    pub relogin: bool,
}

#[derive(Debug, Serialize)]
pub struct Sessions {
    pub requested: u32,
    /// Devices registered over the API (Pushgate) or accounts written (Prosody).
    pub registered: u32,
    /// Sessions that logged in, bound and enabled stream management.
    pub bound: u32,
    pub login_failures: u32,
    /// Sessions still up when the run ended.
    pub held_at_end: u64,
    /// Sessions that ended during the run on the server's or the network's initiative.
    pub dropped: u64,
    /// XEP-0184 receipts the devices wrote.
    pub receipts_sent: u64,
    /// The SASL mechanism every session logged in with.
    pub sasl_mechanism: &'static str,
    /// Registering over the API (Pushgate) or writing the account files (Prosody).
    pub registration_secs: f64,
    pub connect_phase_secs: f64,
    /// Bound sessions per second of the connect phase.
    pub logins_per_sec: f64,
    pub login_time: Percentiles,
    /// `--relogin`: the second login of every bound session, all at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relogin: Option<Relogin>,
    /// Prosody: the senders' sessions (not counted above, connected before the devices).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_sessions: Option<u32>,
}

/// The reconnect storm of `--relogin`: every session closed its stream and logged in again
/// (TLS, SCRAM with the cached keys, bind, stream management), all at once.
#[derive(Debug, Serialize)]
pub struct Relogin {
    /// Sessions bound again (the load phase uses these).
    pub bound: u32,
    pub failures: u32,
    pub phase_secs: f64,
    pub logins_per_sec: f64,
    pub login_time: Percentiles,
    /// When the storm started and the last login ended (wall clock, Unix ms): several bench
    /// processes' phases combine into one rate over their union.
    pub started_unix_ms: u64,
    pub ended_unix_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct Memory {
    /// What the RSS covers: in-process it is the edge and the bench's client sessions (and
    /// the rest of the suite) in one process.
    pub scope: String,
    pub bench_rss_before_kib: Option<u64>,
    pub bench_rss_after_kib: Option<u64>,
    /// Growth of this process's RSS per bound session.
    pub bench_bytes_per_session: Option<f64>,
    /// The XMPP server's own process: `--edge-pid` (running suite), or Prosody.
    pub edge_rss_before_kib: Option<u64>,
    pub edge_rss_after_kib: Option<u64>,
    pub edge_bytes_per_session: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Throughput {
    pub send_secs: f64,
    /// HTTP requests (Pushgate).
    pub requests_ok: Option<u64>,
    pub requests_failed: Option<u64>,
    /// Messages whose 202 arrived (Pushgate).
    pub accepted: Option<u64>,
    pub accepted_per_sec: Option<f64>,
    /// Messages the XMPP senders wrote (Prosody).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_per_sec: Option<f64>,
    /// First receipts at devices, and per second from the start of sending to the last one.
    pub delivered: u64,
    pub delivered_per_sec: f64,
    /// First `delivered` webhook events, per second likewise (Pushgate).
    pub webhook_delivered: Option<u64>,
    pub webhook_per_sec: Option<f64>,
    /// First device receipts back at the senders, per second likewise (Prosody).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipts_at_sender: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipts_per_sec: Option<f64>,
    /// Lowest per-second counts over the full seconds of sending after the first
    /// (sustained rate).
    pub min_accepted_per_sec: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_sent_per_sec: Option<u64>,
    pub min_delivered_per_sec: Option<u64>,
    pub min_webhook_per_sec: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_receipts_per_sec: Option<u64>,
    /// Largest delay behind the fixed-rate schedule.
    pub max_schedule_lag_ms: f64,
    /// Requests of the fixed-rate schedule not sent by the end of the duration (the suite was
    /// slower than the rate; Pushgate).
    pub requests_not_sent: Option<u64>,
    /// Messages of the fixed-rate schedule not sent by the end of the duration (Prosody).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_not_sent: Option<u64>,
    pub drain_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    /// 202 received → message stanza parsed at the device (Pushgate).
    pub accept_to_delivered: Option<Percentiles>,
    /// 202 received → `delivered` event at the webhook receiver (Pushgate).
    pub accept_to_webhook: Option<Percentiles>,
    /// Request sent → 202 received (Pushgate).
    pub http_round_trip: Option<Percentiles>,
    /// Sender about to write the stanza → stanza parsed at the device (Prosody).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_to_delivered: Option<Percentiles>,
    /// Sender about to write the stanza → the device's receipt parsed at the sender (Prosody).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_to_receipt: Option<Percentiles>,
}

/// One second of the sending phase, named after the target.
#[derive(Debug, Clone, Serialize)]
pub struct PerSecond {
    pub t: u64,
    pub accepted: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<u64>,
    pub delivered: u64,
    pub webhook: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipts: Option<u64>,
    /// Of the messages accepted (sent) in this second.
    pub delivered_p50_ms: Option<f64>,
    pub delivered_p99_ms: Option<f64>,
    pub webhook_p50_ms: Option<f64>,
    pub webhook_p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt_p99_ms: Option<f64>,
}

impl PerSecond {
    pub fn new(s: &SecondStats, confirm: Confirm) -> Self {
        let webhook = confirm == Confirm::Webhook;
        let if_webhook = |v: Option<f64>| if webhook { v } else { None };
        let if_receipt = |v: Option<f64>| if webhook { None } else { v };
        PerSecond {
            t: s.t,
            accepted: webhook.then_some(s.accepted),
            sent: (!webhook).then_some(s.accepted),
            delivered: s.delivered,
            webhook: webhook.then_some(s.confirmed),
            receipts: (!webhook).then_some(s.confirmed),
            delivered_p50_ms: s.delivered_p50_ms,
            delivered_p99_ms: s.delivered_p99_ms,
            webhook_p50_ms: if_webhook(s.confirmed_p50_ms),
            webhook_p99_ms: if_webhook(s.confirmed_p99_ms),
            receipt_p50_ms: if_receipt(s.confirmed_p50_ms),
            receipt_p99_ms: if_receipt(s.confirmed_p99_ms),
        }
    }
}

/// Did every accepted (sent) message arrive exactly once where it should, and was it
/// confirmed?
#[derive(Debug, Clone, Serialize)]
pub struct ReconciliationReport {
    /// Messages whose 202 arrived (Pushgate).
    pub accepted: Option<u64>,
    /// Messages the senders wrote (Prosody).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<u64>,
    /// Accepted (sent) messages no device received.
    pub missing_at_device: u64,
    /// Messages a device received more than once, and the extra copies.
    pub duplicated_at_device: u64,
    pub duplicate_copies: u64,
    /// Messages received by a device other than the one they were sent to.
    pub wrong_device: u64,
    /// Accepted messages without a `delivered` webhook event (Pushgate).
    pub missing_webhook_delivered: Option<u64>,
    /// Extra `delivered` webhook events (at-least-once; not a failure; Pushgate).
    pub duplicate_webhook_events: Option<u64>,
    /// Sent messages whose receipt never came back to the sender (Prosody).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing_receipt_at_sender: Option<u64>,
    /// Extra receipts at the senders (Prosody).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_receipts_at_sender: Option<u64>,
    /// Messages a device received whose request did not answer 202 (a timed-out request whose
    /// messages were committed anyway; not a failure; Pushgate).
    pub received_not_accepted: Option<u64>,
    /// Messages a device received that no sender wrote (Prosody).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_not_sent: Option<u64>,
    /// Messages the device had before the sender read the 202 (latency counted as 0;
    /// Pushgate).
    pub received_before_202: Option<u64>,
    /// Nothing missing, duplicated, misrouted or unconfirmed.
    pub ok: bool,
}

impl ReconciliationReport {
    pub fn new(r: &Reconciliation, confirm: Confirm) -> Self {
        let webhook = confirm == Confirm::Webhook;
        let pushgate = |v: u64| webhook.then_some(v);
        let prosody = |v: u64| (!webhook).then_some(v);
        ReconciliationReport {
            accepted: pushgate(r.accepted),
            sent: prosody(r.accepted),
            missing_at_device: r.missing_at_device,
            duplicated_at_device: r.duplicated_at_device,
            duplicate_copies: r.duplicate_copies,
            wrong_device: r.wrong_device,
            missing_webhook_delivered: pushgate(r.missing_confirmation),
            duplicate_webhook_events: pushgate(r.duplicate_confirmations),
            missing_receipt_at_sender: prosody(r.missing_confirmation),
            duplicate_receipts_at_sender: prosody(r.duplicate_confirmations),
            received_not_accepted: pushgate(r.received_not_accepted),
            received_not_sent: prosody(r.received_not_accepted),
            received_before_202: pushgate(r.received_before_202),
            ok: r.ok,
        }
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn line(p: &Percentiles) -> String {
    format!(
        "n={} p50 {} p95 {} p99 {} max {} ms",
        p.count,
        opt_ms(p.p50_ms),
        opt_ms(p.p95_ms),
        opt_ms(p.p99_ms),
        opt_ms(p.max_ms)
    )
}

fn kib(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1} MiB", v as f64 / 1024.0))
}

fn per_session(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1} KiB/session", v / 1024.0))
}

fn count(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn rate(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

impl RunResult {
    fn is_prosody(&self) -> bool {
        self.prosody.is_some()
    }

    /// The human summary printed at the end.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let t = &self.throughput;
        let se = &self.sessions;
        let m = &self.memory;
        let r = &self.reconciliation;
        let _ = writeln!(s, "pushgate-bench result ({})", self.date);
        let _ = writeln!(
            s,
            "  target      {}: {}",
            self.target, self.target_description
        );
        if let Some(p) = &self.prosody {
            let _ = writeln!(
                s,
                "  prosody     version {}, pid {}, {}{}, storage {}, Nagle {}, {} sender sessions",
                p.version.as_deref().unwrap_or("?"),
                p.pid,
                p.authentication,
                p.password_hash
                    .map_or_else(String::new, |h| format!(" ({h})")),
                p.storage,
                if p.nagle_off { "off" } else { "on (default)" },
                p.senders
            );
        }
        let _ = writeln!(
            s,
            "  sessions    {} bound of {} ({} login failures), {} held at end, {} dropped; {}; logins {:.0}/s over {:.1} s; login {}",
            se.bound,
            se.requested,
            se.login_failures,
            se.held_at_end,
            se.dropped,
            se.sasl_mechanism,
            se.logins_per_sec,
            se.connect_phase_secs,
            line(&se.login_time)
        );
        if let Some(r) = &se.relogin {
            let _ = writeln!(
                s,
                "  relogin     {} bound again ({} failures); logins {:.0}/s over {:.1} s (cached SCRAM keys); login {}",
                r.bound,
                r.failures,
                r.logins_per_sec,
                r.phase_secs,
                line(&r.login_time)
            );
        }
        let _ = writeln!(
            s,
            "  memory      bench process {} -> {} ({}); {}",
            kib(m.bench_rss_before_kib),
            kib(m.bench_rss_after_kib),
            per_session(m.bench_bytes_per_session),
            m.scope
        );
        if m.edge_rss_before_kib.is_some() {
            let _ = writeln!(
                s,
                "  {}  {} -> {} ({})",
                if self.is_prosody() {
                    "prosody   "
                } else {
                    "edge      "
                },
                kib(m.edge_rss_before_kib),
                kib(m.edge_rss_after_kib),
                per_session(m.edge_bytes_per_session)
            );
        }
        if self.is_prosody() {
            let _ = writeln!(
                s,
                "  throughput  sent {} ({}/s), delivered {} ({:.0}/s), receipts at senders {} ({}/s) over {:.1} s sending; lowest second after the first: {}/{}/{}; schedule lag max {:.0} ms, {} scheduled messages not sent; drain {:.1} s",
                count(t.sent),
                rate(t.sent_per_sec),
                t.delivered,
                t.delivered_per_sec,
                count(t.receipts_at_sender),
                rate(t.receipts_per_sec),
                t.send_secs,
                count(t.min_sent_per_sec),
                count(t.min_delivered_per_sec),
                count(t.min_receipts_per_sec),
                t.max_schedule_lag_ms,
                count(t.messages_not_sent),
                t.drain_secs
            );
        } else {
            let _ = writeln!(
                s,
                "  throughput  accepted {} ({}/s), delivered {} ({:.0}/s), webhook delivered {} ({}/s) over {:.1} s sending; lowest second after the first: {}/{}/{}; schedule lag max {:.0} ms, {} scheduled requests not sent; drain {:.1} s",
                count(t.accepted),
                rate(t.accepted_per_sec),
                t.delivered,
                t.delivered_per_sec,
                count(t.webhook_delivered),
                rate(t.webhook_per_sec),
                t.send_secs,
                count(t.min_accepted_per_sec),
                count(t.min_delivered_per_sec),
                count(t.min_webhook_per_sec),
                t.max_schedule_lag_ms,
                count(t.requests_not_sent),
                t.drain_secs
            );
        }
        let l = &self.latency;
        let rows = [
            ("accept->delivered", &l.accept_to_delivered),
            ("accept->webhook  ", &l.accept_to_webhook),
            ("HTTP round trip  ", &l.http_round_trip),
            ("send->delivered  ", &l.send_to_delivered),
            ("send->receipt    ", &l.send_to_receipt),
        ];
        for (name, p) in rows {
            if let Some(p) = p {
                let _ = writeln!(s, "  {name}  {}", line(p));
            }
        }
        let _ = writeln!(s, "  CPU                {}", self.cpu.describe());
        if let Some(w) = &self.webhook_events {
            let _ = writeln!(s, "  webhook events     {w:?}");
        }
        let _ = writeln!(s, "  errors             {:?}", self.errors);
        let verdict = if r.ok { "OK" } else { "FAILED" };
        if self.is_prosody() {
            let _ = writeln!(
                s,
                "  reconciliation     {verdict}: sent {}, missing at device {}, duplicated at device {} ({} extra copies), wrong device {}, missing receipts at sender {}, duplicate receipts at sender {}, received but never sent {}",
                count(r.sent),
                r.missing_at_device,
                r.duplicated_at_device,
                r.duplicate_copies,
                r.wrong_device,
                count(r.missing_receipt_at_sender),
                count(r.duplicate_receipts_at_sender),
                count(r.received_not_sent)
            );
        } else {
            let _ = writeln!(
                s,
                "  reconciliation     {verdict}: accepted {}, missing at device {}, duplicated at device {} ({} extra copies), wrong device {}, missing webhook delivered {}, duplicate webhook events {}, received without 202 {}",
                count(r.accepted),
                r.missing_at_device,
                r.duplicated_at_device,
                r.duplicate_copies,
                r.wrong_device,
                count(r.missing_webhook_delivered),
                count(r.duplicate_webhook_events),
                count(r.received_not_accepted)
            );
        }
        s
    }
}
