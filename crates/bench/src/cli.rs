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

/// XMPP sender sessions of `--target prosody` unless `--senders` says otherwise: enough to
/// spread the writes, few enough to stay a "backend" rather than a second device population.
pub const DEFAULT_SENDERS: u32 = 4;

/// Which XMPP server the devices connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    /// The Pushgate suite (in-process, or a running one with --api).
    Pushgate,
    /// A Prosody the bench starts itself (Debian's `prosody` package), with the same device
    /// workload and message rate, so the XMPP hop can be compared side by side. The sender is
    /// a few XMPP accounts instead of the HTTP API.
    Prosody,
}

impl TargetKind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Pushgate => "pushgate",
            TargetKind::Prosody => "prosody",
        }
    }
}

/// How the bench's Prosody stores the accounts it writes into its data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProsodyAuth {
    /// `internal_hashed` with SCRAM-SHA-256 keys at 4096 iterations, computed by the bench:
    /// like Pushgate's edge, the server only verifies a proof at login, the client pays the
    /// PBKDF2.
    Hashed,
    /// `internal_plain` (password in the clear): Prosody runs PBKDF2 (10,000 iterations) on
    /// every SCRAM login itself, which makes its logins slower.
    Plain,
}

impl ProsodyAuth {
    /// Prosody's `authentication` provider.
    pub fn provider(self) -> &'static str {
        match self {
            ProsodyAuth::Hashed => "internal_hashed",
            ProsodyAuth::Plain => "internal_plain",
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
///
/// `--target prosody` runs the same device workload against a Prosody the bench starts itself
/// (Debian's package; scripts/bench-prosody.sh installs it), for a side-by-side comparison of
/// the XMPP hop: XMPP sender sessions instead of the HTTP API, the devices' receipts back at
/// the senders instead of webhooks, Prosody's RSS and CPU instead of the edge's.
#[derive(Debug, Parser)]
#[command(name = "pushgate-bench", version)]
pub struct Args {
    /// The XMPP server under test: `pushgate` (the suite) or `prosody` (a local Prosody the
    /// bench starts, for comparison; install it with scripts/bench-prosody.sh or
    /// `apt-get install prosody`).
    #[arg(long, value_enum, default_value = "pushgate")]
    pub target: TargetKind,

    /// `--target prosody`: XMPP sender sessions the messages are spread over (the stand-in
    /// for the HTTP API's senders) [default: 4].
    #[arg(long, value_name = "K")]
    pub senders: Option<u32>,

    /// `--target prosody`: how the accounts are stored (`hashed`: SCRAM-SHA-256 keys, the
    /// server does no PBKDF2; `plain`: the server derives the keys at every login)
    /// [default: hashed].
    #[arg(long, value_enum)]
    pub prosody_auth: Option<ProsodyAuth>,

    /// `--target prosody`: the `prosody` program (default: `prosody` on PATH, then
    /// /usr/bin/prosody).
    #[arg(long, value_name = "FILE")]
    pub prosody_bin: Option<PathBuf>,

    /// `--target prosody`: turn Nagle's algorithm off on Prosody's sockets
    /// (`network_settings = { nagle = false }`), as Pushgate's edge and the bench's clients
    /// have it; Prosody's default leaves it on, which can hold back small writes until the
    /// peer's (delayed) ACK.
    #[arg(long)]
    pub prosody_nodelay: bool,

    /// `--target prosody`: keep Prosody's directory (configuration, log, data) after the run
    /// instead of removing it, to look at its log.
    #[arg(long)]
    pub prosody_keep_dir: bool,

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

    /// After the sessions are up, close every stream and log in again at once (a reconnect
    /// storm, as after an edge restart), and report that phase's logins/s separately. The
    /// devices keep their SCRAM keys from the first login, as SDKs do, so the second login
    /// costs no PBKDF2 on the client side.
    #[arg(long)]
    pub relogin: bool,

    /// `--relogin`, started only once FILE exists: several bench processes then storm at the
    /// same moment (scripts/bench-sessions.sh creates it when every process is connected).
    #[arg(long, value_name = "FILE")]
    pub relogin_when: Option<PathBuf>,

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

    /// In-process: `common.batch_linger_us` of the suite, to compare lingers (default: the
    /// production default, 2000)
    #[arg(long, value_name = "MICROSECONDS")]
    pub batch_linger_us: Option<u64>,

    /// Measure the machine instead of Pushgate: publish N messages into a fresh file-backed
    /// JetStream stream while a pull consumer fetches and acks them, and report messages per
    /// second (issue 8's yardstick, "one persisted JetStream hop"). Uses --nats and
    /// --watch-pid; every other option is ignored.
    #[arg(long, value_name = "N")]
    pub jetstream_hop: Option<u64>,

    /// Send over HTTP/1.1, one keep-alive connection per request in flight, instead of
    /// HTTP/2 streams on one connection (what the client negotiates by default). Backends
    /// use either; the two cost the suite different CPU per request (docs/benchmarks.md).
    #[arg(long)]
    pub http1: bool,

    /// Worker threads of the bench's own clients (devices, sender, webhook receiver), a
    /// runtime apart from the suite's; 0 runs them on the suite's runtime (the default before
    /// 2026-11-23's fifth session).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub client_threads: usize,

    /// Listen address of the local webhook receiver (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub webhook_listen: String,
}

impl Args {
    /// `--senders`, or its default.
    pub fn senders(&self) -> u32 {
        self.senders.unwrap_or(DEFAULT_SENDERS)
    }

    /// `--prosody-auth`, or its default.
    pub fn prosody_auth(&self) -> ProsodyAuth {
        self.prosody_auth.unwrap_or(ProsodyAuth::Hashed)
    }

    /// Whether the sessions log in a second time (`--relogin` or `--relogin-when`).
    pub fn relogin(&self) -> bool {
        self.relogin || self.relogin_when.is_some()
    }

    /// Whether the suite runs in this process.
    pub fn in_process(&self) -> bool {
        self.target == TargetKind::Pushgate && self.api.is_none()
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
        if self.target == TargetKind::Prosody {
            return self.validate_prosody();
        }
        let prosody_only = [
            ("--senders", self.senders.is_some()),
            ("--prosody-auth", self.prosody_auth.is_some()),
            ("--prosody-bin", self.prosody_bin.is_some()),
            ("--prosody-keep-dir", self.prosody_keep_dir),
            ("--prosody-nodelay", self.prosody_nodelay),
        ];
        for (flag, given) in prosody_only {
            if given {
                bail!("{flag} is for --target prosody");
            }
        }
        if self.edge_pid.is_some() && self.in_process() {
            bail!("--edge-pid is for --api mode; in-process the edge is this process");
        }
        Ok(())
    }

    /// `--target prosody` starts its own server and sends over XMPP: the options of the
    /// Pushgate suite have no meaning there, and silently ignoring them would make a run look
    /// like something it is not.
    fn validate_prosody(&self) -> anyhow::Result<()> {
        let pushgate_only = [
            ("--api", self.api.is_some()),
            ("--inprocess", self.inprocess),
            ("--edge-pid", self.edge_pid.is_some()),
            ("--nats", self.nats.is_some()),
            ("--redis", self.redis.is_some()),
            ("--tls-name", self.tls_name.is_some()),
            ("--device-offset", self.device_offset != 0),
        ];
        for (flag, given) in pushgate_only {
            if given {
                bail!("{flag} is for --target pushgate (--target prosody starts its own Prosody)");
            }
        }
        if self.batch != 1 {
            bail!("--batch is for the HTTP API; an XMPP message has one recipient");
        }
        if !(1..=64).contains(&self.senders()) {
            bail!("--senders must be 1 to 64");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &[&str]) -> anyhow::Result<Args> {
        let a =
            Args::try_parse_from(std::iter::once("pushgate-bench").chain(line.iter().copied()))?;
        a.validate()?;
        Ok(a)
    }

    #[test]
    fn prosody_options_belong_to_their_target() {
        let a = args(&["--target", "prosody", "--devices", "10"]).expect("valid");
        assert_eq!(a.senders(), DEFAULT_SENDERS);
        assert_eq!(a.prosody_auth(), ProsodyAuth::Hashed);
        assert!(!a.in_process());
        let a = args(&[
            "--target",
            "prosody",
            "--prosody-auth",
            "plain",
            "--senders",
            "2",
        ])
        .expect("valid");
        assert_eq!((a.senders(), a.prosody_auth()), (2, ProsodyAuth::Plain));
        for bad in [
            &["--target", "prosody", "--batch", "2"][..],
            &["--target", "prosody", "--device-offset", "5"],
            &["--target", "prosody", "--senders", "0"],
            &["--target", "prosody", "--inprocess"],
            &["--senders", "2"],
            &["--prosody-auth", "plain"],
            &["--target", "pushgate", "--prosody-keep-dir"],
        ] {
            assert!(args(bad).is_err(), "{bad:?} accepted");
        }
        assert!(args(&[]).expect("valid").in_process());
    }
}
