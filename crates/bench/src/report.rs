//! The run's result: JSON for `--out`, and the human summary.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::tracker::{Percentiles, Reconciliation, SecondStats};

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub struct RunResult {
    pub date: String,
    pub command: String,
    /// Stopped by ctrl-c: the figures cover a partial run.
    pub interrupted: bool,
    pub target: String,
    pub host: Host,
    pub config: Config,
    pub sessions: Sessions,
    pub memory: Memory,
    pub throughput: Throughput,
    pub latency: Latency,
    /// CPU use from the start of sending to the end of the drain.
    pub cpu: crate::system::CpuUse,
    pub webhook_events: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub reconciliation: Reconciliation,
    pub per_second: Vec<SecondStats>,
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
    pub mode: &'static str,
    pub devices: u32,
    pub device_offset: u32,
    pub source_addresses: Vec<String>,
    /// Messages per second asked for; `null` for `max`.
    pub rate: Option<f64>,
    pub duration_secs: u64,
    pub batch: u32,
    pub concurrency: usize,
    pub connect_concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct Sessions {
    pub requested: u32,
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
    pub registration_secs: f64,
    pub connect_phase_secs: f64,
    /// Bound sessions per second of the connect phase.
    pub logins_per_sec: f64,
    pub login_time: Percentiles,
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
    /// `--edge-pid` (running suite only).
    pub edge_rss_before_kib: Option<u64>,
    pub edge_rss_after_kib: Option<u64>,
    pub edge_bytes_per_session: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Throughput {
    pub send_secs: f64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub accepted: u64,
    pub accepted_per_sec: f64,
    /// First receipts at devices, and per second from the start of sending to the last one.
    pub delivered: u64,
    pub delivered_per_sec: f64,
    /// First `delivered` webhook events, per second likewise.
    pub webhook_delivered: u64,
    pub webhook_per_sec: f64,
    /// Lowest per-second counts over the full seconds of sending after the first
    /// (sustained rate).
    pub min_accepted_per_sec: Option<u64>,
    pub min_delivered_per_sec: Option<u64>,
    pub min_webhook_per_sec: Option<u64>,
    /// Largest delay behind the fixed-rate schedule.
    pub max_schedule_lag_ms: f64,
    /// Requests of the fixed-rate schedule not sent by the end of the duration (the suite was
    /// slower than the rate).
    pub requests_not_sent: u64,
    pub drain_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    /// 202 received → message stanza parsed at the device.
    pub accept_to_delivered: Percentiles,
    /// 202 received → `delivered` event at the webhook receiver.
    pub accept_to_webhook: Percentiles,
    /// Request sent → 202 received.
    pub http_round_trip: Percentiles,
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

impl RunResult {
    /// The human summary printed at the end.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let t = &self.throughput;
        let se = &self.sessions;
        let m = &self.memory;
        let r = &self.reconciliation;
        let _ = writeln!(s, "pushgate-bench result ({})", self.date);
        let _ = writeln!(s, "  target      {}", self.target);
        let _ = writeln!(
            s,
            "  sessions    {} bound of {} ({} login failures), {} held at end, {} dropped; logins {:.0}/s over {:.1} s; login {}",
            se.bound,
            se.requested,
            se.login_failures,
            se.held_at_end,
            se.dropped,
            se.logins_per_sec,
            se.connect_phase_secs,
            line(&se.login_time)
        );
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
                "  edge        {} -> {} ({})",
                kib(m.edge_rss_before_kib),
                kib(m.edge_rss_after_kib),
                per_session(m.edge_bytes_per_session)
            );
        }
        let _ = writeln!(
            s,
            "  throughput  accepted {} ({:.0}/s), delivered {} ({:.0}/s), webhook delivered {} ({:.0}/s) over {:.1} s sending; lowest second after the first: {}/{}/{}; schedule lag max {:.0} ms, {} scheduled requests not sent; drain {:.1} s",
            t.accepted,
            t.accepted_per_sec,
            t.delivered,
            t.delivered_per_sec,
            t.webhook_delivered,
            t.webhook_per_sec,
            t.send_secs,
            t.min_accepted_per_sec.map_or("-".into(), |v| v.to_string()),
            t.min_delivered_per_sec.map_or("-".into(), |v| v.to_string()),
            t.min_webhook_per_sec.map_or("-".into(), |v| v.to_string()),
            t.max_schedule_lag_ms,
            t.requests_not_sent,
            t.drain_secs
        );
        let _ = writeln!(
            s,
            "  accept->delivered  {}",
            line(&self.latency.accept_to_delivered)
        );
        let _ = writeln!(
            s,
            "  accept->webhook    {}",
            line(&self.latency.accept_to_webhook)
        );
        let _ = writeln!(
            s,
            "  HTTP round trip    {}",
            line(&self.latency.http_round_trip)
        );
        let c = &self.cpu;
        let mut cpu = format!(
            "  CPU                over {:.1} s: bench process {} core-s",
            c.secs,
            c.bench_core_secs
                .map_or_else(|| "-".into(), |v| format!("{v:.1}"))
        );
        for w in &c.watched {
            let _ = write!(
                cpu,
                ", {} ({}) {} core-s",
                w.name,
                w.pid,
                w.core_secs
                    .map_or_else(|| "-".into(), |v| format!("{v:.1}"))
            );
        }
        if let Some(b) = c.machine_busy_share {
            let _ = write!(cpu, "; machine busy {:.0}%", b * 100.0);
        }
        let _ = writeln!(s, "{cpu}");
        let _ = writeln!(s, "  webhook events     {:?}", self.webhook_events);
        let _ = writeln!(s, "  errors             {:?}", self.errors);
        let _ = writeln!(
            s,
            "  reconciliation     {}: accepted {}, missing at device {}, duplicated at device {} ({} extra copies), wrong device {}, missing webhook delivered {}, duplicate webhook events {}, received without 202 {}",
            if r.ok { "OK" } else { "FAILED" },
            r.accepted,
            r.missing_at_device,
            r.duplicated_at_device,
            r.duplicate_copies,
            r.wrong_device,
            r.missing_webhook_delivered,
            r.duplicate_webhook_events,
            r.received_not_accepted
        );
        s
    }
}
