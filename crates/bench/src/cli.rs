//! Command line of `pushgate-bench`.

use std::path::PathBuf;

use anyhow::bail;
use clap::Parser;

/// How fast messages are sent: an open-loop fixed rate (the schedule does not wait for the
/// system, so a slow pipeline shows up as lag and a lower achieved rate), or as fast as the
/// API accepts them with `--concurrency` requests in flight (closed loop).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Messages per second.
    Fixed(f64),
    /// As fast as accepted.
    Max,
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(Rate::Max);
        }
        let r: f64 = s
            .parse()
            .map_err(|_| format!("{s:?} is neither a number of messages per second nor `max`"))?;
        if !(r.is_finite() && r > 0.0) {
            return Err("the rate must be above 0".into());
        }
        Ok(Rate::Fixed(r))
    }
}

impl Rate {
    /// The rate for reports (`None` for `max`).
    pub fn per_sec(self) -> Option<f64> {
        match self {
            Rate::Fixed(r) => Some(r),
            Rate::Max => None,
        }
    }
}

/// End-to-end load bench of Pushgate.
///
/// Registers N devices over the HTTP API, connects each as an XMPP session (STARTTLS,
/// SCRAM-SHA-256, bind, stream management) that answers every message with an XEP-0184
/// receipt, creates an app whose webhook is a local receiver, then sends messages through the
/// HTTP API and measures accepted/s, delivered/s, latencies, sessions, login rate and memory.
/// Ends with a reconciliation: exit code 1 when an accepted message never reached its device
/// or its `delivered` webhook event, or a device saw a message twice.
#[derive(Debug, Parser)]
#[command(name = "pushgate-bench", version)]
pub struct Args {
    /// Start the whole suite in this process against the local NATS and Redis, in a fresh
    /// namespace removed at the end (the default unless --api is given).
    #[arg(long, conflicts_with = "api")]
    pub inprocess: bool,

    /// Base URL of a running suite's HTTPS API, e.g. https://localhost:8443.
    #[arg(long, value_name = "URL", requires_all = ["admin_token", "ca", "xmpp"])]
    pub api: Option<String>,

    /// Admin token of the running suite (creates the bench's app).
    #[arg(long, value_name = "TOKEN")]
    pub admin_token: Option<String>,

    /// PEM file of the CA that signed the running suite's certificates.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// XMPP STARTTLS address of the running suite.
    #[arg(long, value_name = "HOST:PORT")]
    pub xmpp: Option<String>,

    /// TLS server name checked on the XMPP certificate (default: the host of --xmpp;
    /// `localhost` in-process).
    #[arg(long, value_name = "NAME")]
    pub tls_name: Option<String>,

    /// Process id of the running suite's edge: its RSS is read before and after the sessions
    /// connect (--api mode; in-process the edge is this process).
    #[arg(long, value_name = "PID")]
    pub edge_pid: Option<u32>,

    /// Another process whose CPU time over the sending phase is reported (repeatable), e.g.
    /// nats-server and redis-server, to see what limits a run.
    #[arg(long, value_name = "PID")]
    pub watch_pid: Vec<u32>,

    /// Simulated devices (one XMPP session each).
    #[arg(long, default_value_t = 1000)]
    pub devices: u32,

    /// Index of this process's first device, to run several bench processes side by side
    /// (user and device names and source addresses follow the global index).
    #[arg(long, default_value_t = 0)]
    pub device_offset: u32,

    /// Source addresses 127.0.0.2 … 127.0.0.(K+1) the sessions are spread over (loopback
    /// targets only); one address has about 28,000 ephemeral ports. Default: none up to
    /// 20,000 devices, then one per 20,000.
    #[arg(long, value_name = "K")]
    pub source_ips: Option<u32>,

    /// Messages per second, or `max` for as fast as accepted.
    #[arg(long, default_value = "1000", value_name = "R|max")]
    pub rate: Rate,

    /// Length of the sending phase in seconds.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,

    /// Recipients (random devices' users) per request.
    #[arg(long, default_value_t = 1)]
    pub batch: u32,

    /// Send requests in flight at most.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,

    /// XMPP logins in progress at most.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,

    /// Device registrations in flight at most.
    #[arg(long, default_value_t = 32)]
    pub register_concurrency: usize,

    /// Seconds to wait after sending for the last receipts and webhook events.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,

    /// Write the result as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Write a latency plot (CDF and per-second p50/p99) as SVG to this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,

    /// NATS URL in-process (default: $PUSHGATE_TEST_NATS_URL or nats://127.0.0.1:4222).
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,

    /// Redis URL in-process (default: $PUSHGATE_TEST_REDIS_URL or redis://127.0.0.1:6379).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,

    /// Listen address of the local webhook receiver (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub webhook_listen: String,
}

impl Args {
    /// Whether the suite runs in this process.
    pub fn in_process(&self) -> bool {
        self.api.is_none()
    }

    /// Rejects values the run cannot work with, before anything starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.devices == 0 {
            bail!("--devices must be at least 1");
        }
        if self.device_offset.checked_add(self.devices).is_none() {
            bail!("--device-offset plus --devices overflows");
        }
        if !(1..=1000).contains(&self.batch) {
            bail!("--batch must be 1 to 1000 (the API's recipients per request)");
        }
        if self.duration == 0 {
            bail!("--duration must be at least 1 second");
        }
        if self.concurrency == 0 || self.connect_concurrency == 0 || self.register_concurrency == 0
        {
            bail!("concurrency limits must be at least 1");
        }
        if self.source_ips.is_some_and(|k| k > 250) {
            bail!("--source-ips must be at most 250 (127.0.0.2 to 127.0.0.251)");
        }
        if self.edge_pid.is_some() && self.in_process() {
            bail!("--edge-pid is for --api mode; in-process the edge is this process");
        }
        Ok(())
    }
}
