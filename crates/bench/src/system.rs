//! What the machine allows and what the process uses: open-file limits, ephemeral ports,
//! resident memory, load average (Linux `/proc`).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, Context};

/// Open files a bench process needs besides the sessions: NATS and Redis connections, the
/// HTTP client and the webhook receiver's connections, listeners, the runtime's descriptors.
const FD_OVERHEAD: u64 = 512;

/// Sessions placed on one source address: below the ~28,000 ephemeral ports Linux hands out
/// per address by default, with room for the other connections of the machine.
pub const SESSIONS_PER_SOURCE: u32 = 20_000;

/// Where the sessions' two ends live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The suite runs in this process: both ends of every session are here.
    InProcess,
    /// A running suite (`--api`): only the client ends are here.
    Api,
    /// A Prosody child: only the client ends are here, and Prosody (which inherits this
    /// process's limit) holds the server ends.
    Prosody,
}

/// Open files needed for `sessions` sessions: the client socket, and in-process also the
/// edge's accepted socket; `in_flight` HTTP requests may each hold a connection.
pub fn files_needed(sessions: u32, layout: Layout, in_flight: usize) -> u64 {
    let per_session = if layout == Layout::InProcess { 2 } else { 1 };
    u64::from(sessions) * per_session + FD_OVERHEAD + in_flight as u64
}

/// Raises the soft open-files limit to the hard one and refuses a run that cannot fit, since a
/// run that hits the limit half-way fails with confusing `EMFILE` errors instead.
/// Returns the soft limit now in force.
pub fn ensure_open_files(needed: u64, devices: u32, layout: Layout) -> anyhow::Result<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE
        .get()
        .context("reading the open-files limit")?;
    if needed > hard {
        let in_process = layout == Layout::InProcess;
        let fits = hard.saturating_sub(FD_OVERHEAD + 256) / if in_process { 2 } else { 1 };
        let how = match layout {
            Layout::InProcess => {
                "In-process every session takes two descriptors (the bench's client and the \
                 edge's server side). Run the suite as its own process (`pushgate all`) and \
                 point several bench processes at it with --api … --devices M --device-offset \
                 0, M, 2M, …"
            }
            Layout::Api => {
                "Run several bench processes, each with --devices M and --device-offset 0, M, \
                 2M, …"
            }
            Layout::Prosody => {
                "The bench's Prosody inherits the same limit for its side of the sessions, and \
                 one bench process runs one Prosody: raise the hard limit (as root: ulimit -Hn) \
                 for bigger runs."
            }
        };
        bail!(
            "{devices} sessions need about {needed} open files in this process, but its hard \
             limit (ulimit -Hn) is {hard}; one process fits about {fits} sessions. {how}"
        );
    }
    if soft < hard {
        rlimit::Resource::NOFILE
            .set(hard, hard)
            .context("raising the soft open-files limit to the hard limit")?;
    }
    Ok(hard)
}

/// Size of the ephemeral port range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_ports() -> Option<u32> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().filter_map(|v| v.parse::<u32>().ok());
    let (lo, hi) = (it.next()?, it.next()?);
    hi.checked_sub(lo).map(|d| d + 1)
}

/// The source addresses sessions bind to before connecting: none (the kernel's choice) or
/// 127.0.0.2 … for a loopback target, so more sessions than one address has ports fit.
pub fn source_addresses(
    requested: Option<u32>,
    devices: u32,
    target: IpAddr,
) -> anyhow::Result<Vec<IpAddr>> {
    let k = match requested {
        Some(k) => k,
        None if devices <= SESSIONS_PER_SOURCE || !target.is_loopback() => 0,
        None => devices.div_ceil(SESSIONS_PER_SOURCE),
    };
    if k == 0 {
        if let Some(ports) = ephemeral_ports() {
            if devices > ports.saturating_sub(1000) {
                bail!(
                    "{devices} sessions from one source address exceed its {ports} ephemeral \
                     ports; use --source-ips K (loopback targets) or several machines"
                );
            }
        }
        return Ok(vec![]);
    }
    if !target.is_loopback() || !target.is_ipv4() {
        bail!("--source-ips needs an IPv4 loopback XMPP target (127.0.0.0/8), not {target}");
    }
    if k > 250 {
        bail!("at most 250 source addresses (127.0.0.2 to 127.0.0.251)");
    }
    if let Some(ports) = ephemeral_ports() {
        let per = devices.div_ceil(k);
        if per > ports.saturating_sub(1000) {
            bail!(
                "{per} sessions per source address exceed its {ports} ephemeral ports; \
                 raise --source-ips"
            );
        }
    }
    Ok((0..k)
        .map(|i| {
            // k ≤ 250, so 2 + i fits in one octet
            let last = u8::try_from(2 + i).unwrap_or(u8::MAX);
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
        })
        .collect())
}

/// Resident set size in KiB of this process (`None`) or another one, from `/proc/PID/status`.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let s = std::fs::read_to_string(path).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().filter_map(|v| v.parse::<f64>().ok());
    Some([it.next()?, it.next()?, it.next()?])
}

/// Cores the process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, fixed at 100 by the Linux ABI).
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system, all threads) a process has used: this one (`None`) or another.
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let s = std::fs::read_to_string(path).ok()?;
    // the command name may hold spaces and parentheses: fields start after the last ')'
    let (_, rest) = s.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after ')': state is field 3, utime field 14, stime field 15
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// A process's command name.
pub fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Machine-wide CPU time counters: `(busy, total)` in ticks, from `/proc/stat`.
pub fn machine_cpu() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// CPU use over an interval: this process, watched processes, the machine.
pub struct CpuWatch {
    self_start: Option<f64>,
    watched: Vec<(u32, Option<f64>)>,
    machine_start: Option<(u64, u64)>,
}

/// CPU seconds one process used over the interval.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcessCpu {
    pub pid: u32,
    pub name: String,
    pub core_secs: Option<f64>,
}

/// What [`CpuWatch::finish`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CpuUse {
    pub secs: f64,
    /// CPU seconds of the bench process (in-process: the whole suite as well).
    pub bench_core_secs: Option<f64>,
    pub watched: Vec<ProcessCpu>,
    /// Share of all cores' time the machine was busy (every process, other work included).
    pub machine_busy_share: Option<f64>,
}

impl CpuUse {
    /// `over S s: bench process X core-s, name (pid) Y core-s, …; machine busy Z%`.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let secs = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
        let mut s = format!(
            "over {:.1} s: bench process {} core-s",
            self.secs,
            secs(self.bench_core_secs)
        );
        for w in &self.watched {
            let _ = write!(s, ", {} ({}) {} core-s", w.name, w.pid, secs(w.core_secs));
        }
        if let Some(b) = self.machine_busy_share {
            let _ = write!(s, "; machine busy {:.0}%", b * 100.0);
        }
        s
    }
}

impl CpuWatch {
    /// Starts measuring this process, `pids` and the machine.
    pub fn start(pids: &[u32]) -> Self {
        CpuWatch {
            self_start: cpu_secs(None),
            watched: pids.iter().map(|p| (*p, cpu_secs(Some(*p)))).collect(),
            machine_start: machine_cpu(),
        }
    }

    /// The use since [`CpuWatch::start`], over `secs` seconds.
    pub fn finish(&self, secs: f64) -> CpuUse {
        let diff = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let machine = match (self.machine_start, machine_cpu()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                Some((b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64)
            }
            _ => None,
        };
        CpuUse {
            secs,
            bench_core_secs: diff(self.self_start, cpu_secs(None)),
            watched: self
                .watched
                .iter()
                .map(|(pid, start)| ProcessCpu {
                    pid: *pid,
                    name: process_name(*pid).unwrap_or_else(|| "?".into()),
                    core_secs: diff(*start, cpu_secs(Some(*pid))),
                })
                .collect(),
            machine_busy_share: machine,
        }
    }
}
