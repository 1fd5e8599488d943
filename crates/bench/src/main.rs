//! `pushgate-bench`: the end-to-end load bench.
//!
//! ```text
//! pushgate-bench [--inprocess] [--devices N] [--rate R|max] [--duration S] [--batch B]
//!                [--out result.json] [--svg latency.svg] …
//! pushgate-bench --api URL --admin-token T --ca FILE --xmpp HOST:PORT [--edge-pid PID] …
//! pushgate-bench --target prosody [--devices N] [--rate R|max] [--senders K] …
//! ```
//!
//! `--target prosody` runs the same device workload against a Prosody the bench starts
//! (`prosody`), with XMPP senders (`xload`) in place of the HTTP API and the devices' receipts
//! back at the senders in place of webhook events, so the XMPP hop can be compared side by
//! side (docs/benchmarks.md, "Pushgate vs Prosody").
//!
//! Phases: create an app whose webhook is the bench's local receiver, register N devices,
//! connect N XMPP sessions (RSS before and after), send for `--duration` seconds, wait for
//! the last receipts and webhook events, reconcile, report. A progress line goes to stderr
//! every second; the summary to stdout. Exit code 0: reconciliation passed; 1: a message was
//! lost, duplicated or misrouted; 2: the run could not be made.
//!
//! Why a program of its own rather than a `cargo bench`: it is pointed at running suites too,
//! runs for minutes with progress, and several of it run side by side (`--device-offset`) when
//! one process cannot hold the sessions.

mod api;
mod cli;
mod hop;
mod load;
mod prosody;
mod report;
mod svg;
mod system;
mod target;
mod tracker;
mod webhook;
mod xload;
mod xmpp;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rand::RngCore;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiError, Login};
use crate::cli::{Args, TargetKind};
use crate::report::RunResult;
use crate::target::{Backend, Target};
use crate::tracker::{percentile, Confirm, Errors, Percentiles, Tracker};

/// Messages live long enough to be delivered in any run, short enough not to linger in a
/// running suite that the bench leaves behind.
const MESSAGE_TTL_SECS: u32 = 3600;
/// Registration retries on 429/503 (a running suite's per-app rate limit).
const REGISTER_ATTEMPTS: u32 = 8;
/// Time for allocations to settle before RSS is read.
const SETTLE: Duration = Duration::from_secs(2);

// The services' allocator: in-process the suite runs inside this binary, and its figures should
// be those of the real binaries (jemalloc changed the suite's CPU per message and its p99
// several-fold, docs/benchmarks.md "Where the CPU goes").
pushgate_runtime::global_allocator!();

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match main_inner(args).await {
        Ok(Outcome::Passed) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Ok(Outcome::Interrupted) => ExitCode::from(2),
        Err(e) => {
            eprintln!("pushgate-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Writes a result as pretty JSON (`--out`).
fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(value)?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

async fn main_inner(args: Args) -> anyhow::Result<Outcome> {
    if let Some(n) = args.jetstream_hop {
        let url = args.nats.clone().unwrap_or_else(pushgate_testkit::nats_url);
        let r = hop::run(&url, n, &args.watch_pid).await?;
        if let Some(path) = &args.out {
            write_json(path, &r)?;
        }
        return Ok(Outcome::Passed);
    }
    args.validate()?;
    let layout = match args.target {
        TargetKind::Prosody => system::Layout::Prosody,
        TargetKind::Pushgate if args.in_process() => system::Layout::InProcess,
        TargetKind::Pushgate => system::Layout::Api,
    };
    // the Prosody senders are sessions of this process too
    let sessions = match args.target {
        TargetKind::Prosody => args.devices.saturating_add(args.senders()),
        TargetKind::Pushgate => args.devices,
    };
    let needed = system::files_needed(sessions, layout, args.concurrency);
    let open_files = system::ensure_open_files(needed, sessions, layout)?;
    let load_start = system::load_average();
    // first ctrl-c: stop sending, still wait for what was accepted and report; second: give
    // up waiting. Installed before the server starts, so an early ctrl-c still ends in
    // `target.close()` (a started Prosody is not left behind).
    let stop = Stop {
        soft: CancellationToken::new(),
        hard: CancellationToken::new(),
    };
    let s = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: sending stops; ctrl-c again to stop waiting for deliveries");
            s.soft.cancel();
        }
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted again: reporting and cleaning up now");
            s.hard.cancel();
        }
    });
    // SIGTERM or SIGHUP (a `timeout`, a closed terminal): stop at once, but still clean up
    let s = stop.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        eprintln!("terminated: stopping now and cleaning up");
        s.soft.cancel();
        s.hard.cancel();
    });
    let target = Arc::new(Target::open(&args).await?);
    let outcome = match clients_runtime(args.client_threads)? {
        // the clients' tasks (devices, sender, webhook receiver, the run itself) on their own
        // thread(s); the suite's, started above, stay on this runtime
        Some(clients) => {
            let (a, t, s) = (Arc::new(args), target.clone(), stop.clone());
            let run = clients.spawn(async move { run(&a, &t, &s, open_files, load_start).await });
            let outcome = run
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("the clients' run ended: {e}")));
            // a runtime must not be dropped where it would block this one
            clients.shutdown_background();
            outcome
        }
        None => run(&args, &target, &stop, open_files, load_start).await,
    };
    match Arc::into_inner(target) {
        Some(target) => target.close().await,
        None => eprintln!("warning: the target is still in use; not cleaned up"),
    }
    match outcome {
        Ok(_) if stop.soft.is_cancelled() => {
            eprintln!("pushgate-bench: interrupted, the figures cover a partial run");
            Ok(Outcome::Interrupted)
        }
        Ok(true) => Ok(Outcome::Passed),
        Ok(false) => Ok(Outcome::Failed),
        Err(e) => Err(e),
    }
}

/// The runtime of the bench's own clients, `threads` worker threads (`None` for 0: they share
/// the suite's runtime).
///
/// In-process, the suite and the clients would otherwise share one scheduler: every client
/// task's wake-up (a device reading its stanza, the sender's next request) competes with the
/// suite's on the same worker threads and moves work between them, which the suite does not
/// pay in a deployment, where its clients are elsewhere. Their own thread keeps the clients'
/// scheduling out of the suite's, as a separate process would, without a second process.
fn clients_runtime(threads: usize) -> anyhow::Result<Option<tokio::runtime::Runtime>> {
    if threads == 0 {
        return Ok(None);
    }
    Ok(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("bench-clients")
            .enable_all()
            .build()
            .context("starting the clients' runtime")?,
    ))
}

/// How a run ended, for the exit code.
enum Outcome {
    Passed,
    Failed,
    Interrupted,
}

/// Interruption: `soft` stops starting new work (registrations, logins, sends); `hard` also
/// stops waiting for the deliveries of what was already accepted.
#[derive(Clone)]
struct Stop {
    soft: CancellationToken,
    hard: CancellationToken,
}

fn stamp(start: Instant) -> String {
    format!("[{:>6.1}s]", start.elapsed().as_secs_f64())
}

/// How messages get in and what confirms them, per target; holds what must live for the run.
enum Setup {
    Pushgate {
        api: Arc<api::Api>,
        api_key: Arc<str>,
        /// Kept alive until the report (dropping it stops the receiver).
        receiver: webhook::Receiver,
    },
    Prosody {
        senders: Vec<prosody::Account>,
        /// Full JID of each device, by local index.
        jids: Arc<Vec<String>>,
        pid: u32,
    },
}

async fn run(
    args: &Args,
    target: &Target,
    stop: &Stop,
    open_files: u64,
    load_start: Option<[f64; 3]>,
) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let kind = target.kind();
    let sources = system::source_addresses(args.source_ips, args.devices, target.xmpp.ip())?;
    let confirm = match kind {
        TargetKind::Pushgate => Confirm::Webhook,
        TargetKind::Prosody => Confirm::Receipt,
    };
    let tracker = Arc::new(Tracker::default());
    let errors = Arc::new(Errors::default());

    // accounts: registered over the API, or already written into Prosody's data directory
    let reg_start = Instant::now();
    let (setup, logins, registration_secs) = match &target.backend {
        Backend::Pushgate {
            api, admin_token, ..
        } => {
            let mut secret = [0u8; 24];
            rand::thread_rng().fill_bytes(&mut secret);
            let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            let receiver = webhook::Receiver::start(
                &args.webhook_listen,
                secret.clone(),
                tracker.clone(),
                errors.clone(),
            )
            .await?;
            let (app_id, api_key) = api
                .create_app(admin_token, &receiver.url, &secret)
                .await
                .context("creating the bench's app")?;
            let api_key: Arc<str> = Arc::from(api_key.as_str());
            eprintln!(
                "{} {}; app {app_id}, webhook {}",
                stamp(t0),
                target.description,
                receiver.url
            );
            let logins = register(args, api, &api_key, &errors, &stop.soft, t0).await;
            let setup = Setup::Pushgate {
                api: api.clone(),
                api_key,
                receiver,
            };
            (setup, logins, reg_start.elapsed().as_secs_f64())
        }
        Backend::Prosody(server) => {
            eprintln!(
                "{} {}; {} device and {} sender accounts written in {:.1} s",
                stamp(t0),
                target.description,
                server.devices.len(),
                server.senders.len(),
                server.accounts_secs
            );
            let logins = server
                .devices
                .iter()
                .map(|a| {
                    Some(Login {
                        jid: a.jid.clone(),
                        password: a.password.clone(),
                    })
                })
                .collect();
            let setup = Setup::Prosody {
                senders: server.senders.clone(),
                jids: Arc::new(
                    server
                        .devices
                        .iter()
                        .map(|a| xload::full_jid(&a.jid))
                        .collect(),
                ),
                pid: server.pid,
            };
            (setup, logins, server.accounts_secs)
        }
    };
    let registered = logins.iter().filter(|l| l.is_some()).count() as u32;
    if stop.soft.is_cancelled() {
        bail!("stopped during registration");
    }
    if registered == 0 {
        bail!("no device could be registered: {:?}", errors.snapshot());
    }

    // sessions
    // not tied to `stop`: after an interrupt the sessions still receive what was accepted
    let sessions_stop = CancellationToken::new();
    let shared = Arc::new(xmpp::Shared {
        addr: target.xmpp,
        tls: tokio_rustls::TlsConnector::from(target.tls.clone()),
        server_name: target.server_name.clone(),
        tracker: tracker.clone(),
        stats: xmpp::SessionStats::default(),
        stop: sessions_stop.clone(),
        relogin: CancellationToken::new(),
    });
    // the Prosody senders log in first, so the RSS growth below is the devices' alone
    let sender_conns = match &setup {
        Setup::Prosody { senders, .. } => connect_senders(&shared, senders).await?,
        Setup::Pushgate { .. } => Vec::new(),
    };
    tokio::time::sleep(SETTLE).await;
    let rss_before = system::rss_kib(None);
    let edge_before = target.edge_pid.and_then(|p| system::rss_kib(Some(p)));
    let connect_start = Instant::now();
    let Connected {
        bound,
        times: login_us,
        mut sessions,
        relogins,
    } = connect(args, &shared, logins, &sources, &errors, &stop.soft, t0).await;
    let connect_secs = connect_start.elapsed().as_secs_f64();
    if stop.soft.is_cancelled() {
        sessions_stop.cancel();
        while sessions.join_next().await.is_some() {}
        bail!("stopped while connecting");
    }
    tokio::time::sleep(SETTLE).await;
    let rss_after = system::rss_kib(None);
    let edge_after = target.edge_pid.and_then(|p| system::rss_kib(Some(p)));
    let bound_count = bound.len() as u32;
    eprintln!(
        "{} {bound_count} sessions bound in {connect_secs:.1} s; RSS {} -> {} KiB{}",
        stamp(t0),
        rss_before.unwrap_or(0),
        rss_after.unwrap_or(0),
        match (kind, edge_before, edge_after) {
            (TargetKind::Prosody, Some(b), Some(a)) => format!("; Prosody RSS {b} -> {a} KiB"),
            _ => String::new(),
        }
    );

    // reconnect storm
    let (bound, relogin) = match relogins {
        Some(rx) => {
            if let Some(go) = &args.relogin_when {
                eprintln!("{} relogin   waiting for {}", stamp(t0), go.display());
                while !go.exists() && !stop.soft.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let expected = bound.len();
            let start = Instant::now();
            let started_unix_ms = unix_ms();
            shared.relogin.cancel();
            let (rebound, times) = collect_logins(
                rx,
                expected,
                ("relogin", "relogin"),
                &shared,
                &errors,
                &stop.soft,
                t0,
            )
            .await;
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "{} {} of {expected} sessions logged in again in {secs:.1} s ({:.0}/s)",
                stamp(t0),
                rebound.len(),
                rebound.len() as f64 / secs.max(1e-9)
            );
            if stop.soft.is_cancelled() {
                sessions_stop.cancel();
                while sessions.join_next().await.is_some() {}
                bail!("stopped while logging in again");
            }
            let relogin = report::Relogin {
                bound: rebound.len() as u32,
                failures: (expected - rebound.len()) as u32,
                phase_secs: secs,
                logins_per_sec: rebound.len() as f64 / secs.max(1e-9),
                login_time: Percentiles::of(&times),
                started_unix_ms,
                ended_unix_ms: unix_ms(),
            };
            (rebound, Some(relogin))
        }
        None => (bound, None),
    };

    // load
    tracker.begin();
    let sent = Arc::new(load::Sent::default());
    let targets = Arc::new(bound);
    let send_start = Instant::now();
    let mut watched = args.watch_pid.clone();
    if let Setup::Prosody { pid, .. } = &setup {
        watched.insert(0, *pid);
    }
    let cpu = system::CpuWatch::start(&watched);
    let mut sender_tasks = None;
    let mut sending: std::pin::Pin<
        Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>,
    > = match &setup {
        Setup::Pushgate { api, api_key, .. } => {
            let plan = load::Plan {
                rate: args.rate,
                duration: Duration::from_secs(args.duration),
                batch: args.batch,
                concurrency: args.concurrency,
                targets: targets.clone(),
                offset: args.device_offset,
                ttl_secs: MESSAGE_TTL_SECS,
            };
            let handle = tokio::spawn(load::run(
                api.clone(),
                api_key.clone(),
                plan,
                tracker.clone(),
                errors.clone(),
                sent.clone(),
                stop.soft.clone(),
            ));
            Box::pin(async move { handle.await.context("the sender failed") })
        }
        Setup::Prosody { jids, .. } => {
            let plan = xload::Plan {
                rate: args.rate,
                duration: Duration::from_secs(args.duration),
                window: args.concurrency,
                targets: targets.clone(),
                jids: jids.clone(),
            };
            let senders = xload::start(
                sender_conns,
                plan,
                tracker.clone(),
                errors.clone(),
                sent.clone(),
                stop.soft.clone(),
                sessions_stop.clone(),
            );
            sender_tasks = Some(senders.tasks);
            let mut done = senders.done;
            Box::pin(async move {
                while done.recv().await.is_some() {}
                Ok(())
            })
        }
    };
    let mut progress = Progress::new(t0, confirm);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            r = &mut sending => {
                r?;
                break;
            }
            _ = tick.tick() => progress.line("send", &tracker, &shared, &sent, &errors),
        }
    }
    let send_secs = send_start.elapsed().as_secs_f64();

    // drain: the last receipts and webhook events
    let drain_start = Instant::now();
    let deadline = drain_start + Duration::from_secs(args.drain_timeout);
    let mut check = tokio::time::interval(Duration::from_millis(100));
    let mut ticks = 0u32;
    while Instant::now() < deadline && !tracker.settled() {
        tokio::select! {
            _ = check.tick() => {
                ticks += 1;
                if ticks % 10 == 0 {
                    progress.line("drain", &tracker, &shared, &sent, &errors);
                }
            }
            _ = stop.hard.cancelled() => break,
        }
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let cpu = cpu.finish(send_start.elapsed().as_secs_f64());
    let held_at_end = shared.stats.live.load(Ordering::Relaxed);
    let dropped = shared.stats.dropped.load(Ordering::Relaxed);
    let load_end = system::load_average();

    // end the sessions before the server stops, so it sees clean closes
    sessions_stop.cancel();
    let closing = async {
        while sessions.join_next().await.is_some() {}
        if let Some(t) = &mut sender_tasks {
            while t.join_next().await.is_some() {}
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), closing)
        .await
        .is_err()
    {
        eprintln!("warning: some sessions did not close within 30 s");
    }

    let analysis = tracker.analyse();
    let mut all_errors = errors.snapshot();
    if let Ok(e) = shared.stats.errors.lock() {
        for (k, v) in e.iter() {
            *all_errors.entry(k.clone()).or_default() += v;
        }
    }
    let delivered = tracker.counters.delivered.load(Ordering::Relaxed);
    let confirmed = tracker.counters.confirmed.load(Ordering::Relaxed);
    let accepted = tracker.counters.accepted.load(Ordering::Relaxed);
    // sustained: the lowest full second of sending, leaving out the first (ramp-up)
    let full_seconds = send_secs.floor() as usize;
    let steady = analysis
        .per_second
        .get(1..full_seconds.min(analysis.per_second.len()))
        .unwrap_or(&[]);
    let min_of = |f: fn(&tracker::SecondStats) -> u64| steady.iter().map(f).min();
    let per_session = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(b), Some(a)) if bound_count > 0 => {
            Some((a as f64 - b as f64) * 1024.0 / f64::from(bound_count))
        }
        _ => None,
    };
    let in_process = target.in_process();
    let pushgate = kind == TargetKind::Pushgate;
    let only_pushgate = |v: u64| pushgate.then_some(v);
    let only_prosody = |v: u64| (!pushgate).then_some(v);
    let accepted_per_sec = accepted as f64 / send_secs.max(1e-9);
    let confirmed_per_sec = analysis
        .confirm_span_secs
        .map_or(0.0, |s| confirmed as f64 / s.max(send_secs));
    let (prosody_info, webhook_events) = match (&setup, &target.backend) {
        (Setup::Prosody { senders, .. }, Backend::Prosody(server)) => (
            Some(report::ProsodyInfo {
                version: server.version.clone(),
                pid: server.pid,
                address: server.addr.to_string(),
                authentication: server.auth.provider(),
                password_hash: (server.auth == cli::ProsodyAuth::Hashed)
                    .then_some(prosody::PASSWORD_HASH),
                storage: prosody::STORAGE,
                nagle_off: server.nodelay,
                modules_enabled: prosody::MODULES_ENABLED.to_vec(),
                modules_disabled: prosody::MODULES_DISABLED.to_vec(),
                senders: senders.len() as u32,
            }),
            None,
        ),
        (Setup::Pushgate { receiver, .. }, _) => (None, Some(receiver.kinds())),
        _ => (None, None),
    };
    let result = RunResult {
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        command: redacted_command(std::env::args()),
        interrupted: stop.soft.is_cancelled(),
        target: kind.name(),
        target_description: target.description.clone(),
        prosody: prosody_info,
        host: report::Host {
            cores: system::cores(),
            load_average_start: load_start,
            load_average_end: load_end,
            open_files_limit: open_files,
        },
        config: report::Config {
            mode: match kind {
                TargetKind::Prosody => "prosody",
                TargetKind::Pushgate if in_process => "inprocess",
                TargetKind::Pushgate => "api",
            },
            devices: args.devices,
            device_offset: args.device_offset,
            source_addresses: sources.iter().map(|a| a.to_string()).collect(),
            rate: args.rate.per_sec(),
            duration_secs: args.duration,
            batch: args.batch,
            concurrency: args.concurrency,
            connect_concurrency: args.connect_concurrency,
            relogin: args.relogin(),
        },
        sessions: report::Sessions {
            requested: args.devices,
            registered,
            bound: bound_count,
            login_failures: registered.saturating_sub(bound_count),
            held_at_end,
            dropped,
            receipts_sent: shared.stats.receipts.load(Ordering::Relaxed),
            sasl_mechanism: xmpp::MECHANISM,
            registration_secs,
            connect_phase_secs: connect_secs,
            logins_per_sec: if connect_secs > 0.0 {
                f64::from(bound_count) / connect_secs
            } else {
                0.0
            },
            login_time: Percentiles::of(&login_us),
            relogin,
            sender_sessions: match &setup {
                Setup::Prosody { senders, .. } => Some(senders.len() as u32),
                Setup::Pushgate { .. } => None,
            },
        },
        memory: report::Memory {
            scope: match kind {
                TargetKind::Prosody => "bench process: client sessions only; edge: the Prosody \
                                        process (its RSS growth over the device logins)"
                    .into(),
                TargetKind::Pushgate if in_process => {
                    "in-process: the RSS growth holds the edge's sessions AND the bench's client \
                     sessions (one process); see --api with --edge-pid for the split"
                        .into()
                }
                TargetKind::Pushgate => {
                    "bench process: client sessions only; edge: --edge-pid process".into()
                }
            },
            bench_rss_before_kib: rss_before,
            bench_rss_after_kib: rss_after,
            bench_bytes_per_session: per_session(rss_before, rss_after),
            edge_rss_before_kib: edge_before,
            edge_rss_after_kib: edge_after,
            edge_bytes_per_session: per_session(edge_before, edge_after),
        },
        throughput: report::Throughput {
            send_secs,
            requests_ok: only_pushgate(sent.requests_ok.load(Ordering::Relaxed)),
            requests_failed: only_pushgate(sent.requests_failed.load(Ordering::Relaxed)),
            accepted: only_pushgate(accepted),
            accepted_per_sec: pushgate.then_some(accepted_per_sec),
            sent: only_prosody(accepted),
            sent_per_sec: (!pushgate).then_some(accepted_per_sec),
            delivered,
            delivered_per_sec: analysis
                .device_span_secs
                .map_or(0.0, |s| delivered as f64 / s.max(send_secs)),
            webhook_delivered: only_pushgate(confirmed),
            webhook_per_sec: pushgate.then_some(confirmed_per_sec),
            receipts_at_sender: only_prosody(confirmed),
            receipts_per_sec: (!pushgate).then_some(confirmed_per_sec),
            min_accepted_per_sec: min_of(|s| s.accepted).filter(|_| pushgate),
            min_sent_per_sec: min_of(|s| s.accepted).filter(|_| !pushgate),
            min_delivered_per_sec: min_of(|s| s.delivered),
            min_webhook_per_sec: min_of(|s| s.confirmed).filter(|_| pushgate),
            min_receipts_per_sec: min_of(|s| s.confirmed).filter(|_| !pushgate),
            max_schedule_lag_ms: sent.max_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
            requests_not_sent: only_pushgate(sent.not_sent.load(Ordering::Relaxed)),
            messages_not_sent: only_prosody(sent.not_sent.load(Ordering::Relaxed)),
            drain_secs,
        },
        latency: report::Latency {
            accept_to_delivered: pushgate.then(|| Percentiles::of(&analysis.device_us)),
            accept_to_webhook: pushgate.then(|| Percentiles::of(&analysis.confirm_us)),
            http_round_trip: pushgate.then(|| Percentiles::of(&analysis.http_us)),
            send_to_delivered: (!pushgate).then(|| Percentiles::of(&analysis.device_us)),
            send_to_receipt: (!pushgate).then(|| Percentiles::of(&analysis.confirm_us)),
        },
        cpu,
        webhook_events,
        errors: all_errors,
        reconciliation: report::ReconciliationReport::new(&analysis.reconciliation, confirm),
        per_second: analysis
            .per_second
            .iter()
            .map(|s| report::PerSecond::new(s, confirm))
            .collect(),
    };
    print!("{}", result.summary());
    if let Some(path) = &args.out {
        write_json(path, &result)?;
        eprintln!("result written to {}", path.display());
    }
    if let Some(path) = &args.svg {
        let title = match kind {
            TargetKind::Pushgate => format!(
                "pushgate-bench: {} devices, {} msg/s for {} s, batch {} ({})",
                args.devices,
                args.rate.per_sec().map_or("max".into(), |r| format!("{r}")),
                args.duration,
                args.batch,
                result.date
            ),
            TargetKind::Prosody => format!(
                "pushgate-bench --target prosody: {} devices, {} msg/s for {} s, {} senders ({})",
                args.devices,
                args.rate.per_sec().map_or("max".into(), |r| format!("{r}")),
                args.duration,
                args.senders(),
                result.date
            ),
        };
        let labels = match kind {
            TargetKind::Pushgate => &svg::Labels::PUSHGATE,
            TargetKind::Prosody => &svg::Labels::PROSODY,
        };
        let doc = svg::render(
            &title,
            labels,
            &analysis.device_us,
            &analysis.confirm_us,
            &analysis.per_second,
        );
        std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("latency plot written to {}", path.display());
    }
    if let Setup::Pushgate { receiver, .. } = &setup {
        eprintln!("{} webhook batches received", receiver.batches());
    }
    Ok(result.reconciliation.ok)
}

/// The command line for the report, with the admin token masked: result files get shared and
/// committed, the token must not travel with them.
fn redacted_command(args: impl Iterator<Item = String>) -> String {
    let mut out = Vec::new();
    let mut mask_next = false;
    for a in args {
        if mask_next {
            out.push("***".to_string());
            mask_next = false;
        } else if a == "--admin-token" {
            out.push(a);
            mask_next = true;
        } else if a.starts_with("--admin-token=") {
            out.push("--admin-token=***".to_string());
        } else {
            out.push(a);
        }
    }
    out.join(" ")
}

/// Logs in the Prosody sender accounts (one session each, the devices' login).
async fn connect_senders(
    shared: &xmpp::Shared,
    accounts: &[prosody::Account],
) -> anyhow::Result<Vec<xmpp::Conn>> {
    let mut conns = Vec::with_capacity(accounts.len());
    for (k, a) in accounts.iter().enumerate() {
        let mut device = xmpp::Device {
            index: u32::try_from(k).unwrap_or(u32::MAX),
            jid: a.jid.clone(),
            password: a.password.clone(),
            source: None,
            keys: None,
        };
        let conn = xmpp::login(shared, &mut device)
            .await
            .with_context(|| format!("logging in the sender {}", a.jid))?;
        conns.push(conn);
    }
    Ok(conns)
}

/// Registers every device (bounded concurrency, retrying the suite's "slow down" answers);
/// `None` where registration failed.
async fn register(
    args: &Args,
    api: &Arc<api::Api>,
    key: &Arc<str>,
    errors: &Arc<Errors>,
    stop: &CancellationToken,
    t0: Instant,
) -> Vec<Option<Login>> {
    let permits = Arc::new(Semaphore::new(args.register_concurrency));
    let mut set = JoinSet::new();
    for i in 0..args.devices {
        let global = u64::from(args.device_offset) + u64::from(i);
        let (api, key, permits) = (api.clone(), key.clone(), permits.clone());
        set.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return (i, Err(ApiError::Request("stopped".into())));
            };
            let (user, device) = (load::user_of(global), load::device_of(global));
            let mut attempt = 1;
            loop {
                match api.register(&key, &user, &device).await {
                    Err(ApiError::Status { status, .. })
                        if (status == 429 || status == 503) && attempt < REGISTER_ATTEMPTS =>
                    {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
                    }
                    r => return (i, r),
                }
            }
        });
    }
    let mut out: Vec<Option<Login>> = vec![None; args.devices as usize];
    let mut done = 0u32;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            r = set.join_next() => match r {
                Some(Ok((i, Ok(login)))) => {
                    done += 1;
                    if let Some(slot) = out.get_mut(i as usize) {
                        *slot = Some(login);
                    }
                }
                Some(Ok((_, Err(e)))) => {
                    done += 1;
                    errors.add(format!("register-{}", e.kind()));
                }
                Some(Err(_)) => {
                    done += 1;
                    errors.add("register-task-failed");
                }
                None => break,
            },
            _ = tick.tick() => eprintln!(
                "{} register  {done}/{} devices, errors {}",
                stamp(t0),
                args.devices,
                errors.total()
            ),
            _ = stop.cancelled() => {
                set.abort_all();
                break;
            }
        }
    }
    out
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The sessions once connected: who is bound, login times, the tasks, and (with
/// `--relogin`) where the second logins are reported.
struct Connected {
    /// Bound devices' local indexes.
    bound: Vec<u32>,
    /// Login times in µs, sorted.
    times: Vec<u64>,
    sessions: JoinSet<()>,
    relogins: Option<mpsc::UnboundedReceiver<xmpp::LoginOutcome>>,
}

/// Starts one session task per registered device and waits until each has logged in or
/// failed.
async fn connect(
    args: &Args,
    shared: &Arc<xmpp::Shared>,
    logins: Vec<Option<Login>>,
    sources: &[std::net::IpAddr],
    errors: &Arc<Errors>,
    stop: &CancellationToken,
    t0: Instant,
) -> Connected {
    let permits = Arc::new(Semaphore::new(args.connect_concurrency));
    let (tx, rx) = mpsc::unbounded_channel();
    let (relogin_tx, relogin_rx) = if args.relogin() {
        let (t, r) = mpsc::unbounded_channel();
        (Some(t), Some(r))
    } else {
        (None, None)
    };
    let mut sessions = JoinSet::new();
    let mut expected = 0usize;
    for (i, login) in logins.into_iter().enumerate() {
        let Some(login) = login else { continue };
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        let global = usize::try_from(args.device_offset).unwrap_or(0) + i;
        let source = if sources.is_empty() {
            None
        } else {
            sources.get(global % sources.len()).copied()
        };
        let device = xmpp::Device {
            index,
            jid: login.jid,
            password: login.password,
            source,
            keys: None,
        };
        sessions.spawn(xmpp::run(
            shared.clone(),
            device,
            permits.clone(),
            tx.clone(),
            relogin_tx.clone(),
        ));
        expected += 1;
    }
    drop(tx);
    drop(relogin_tx);
    let (bound, times) =
        collect_logins(rx, expected, ("connect", "login"), shared, errors, stop, t0).await;
    Connected {
        bound,
        times,
        sessions,
        relogins: relogin_rx,
    }
}

/// Waits for `expected` login outcomes, printing progress once a second (errors counted as
/// `{error_prefix}-{kind}`); returns the bound
/// devices' local indexes and their login times (µs, sorted).
async fn collect_logins(
    mut rx: mpsc::UnboundedReceiver<xmpp::LoginOutcome>,
    expected: usize,
    (phase, error_prefix): (&str, &str),
    shared: &xmpp::Shared,
    errors: &Errors,
    stop: &CancellationToken,
    t0: Instant,
) -> (Vec<u32>, Vec<u64>) {
    let start = Instant::now();
    let mut bound = Vec::with_capacity(expected);
    let mut times = Vec::with_capacity(expected);
    let mut failed = 0usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while bound.len() + failed < expected {
        tokio::select! {
            o = rx.recv() => match o {
                Some((i, Ok(took))) => {
                    bound.push(i);
                    times.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
                }
                Some((_, Err(kind))) => {
                    failed += 1;
                    errors.add(format!("{error_prefix}-{kind}"));
                }
                None => break,
            },
            _ = tick.tick() => {
                let secs = start.elapsed().as_secs_f64();
                eprintln!(
                    "{} {phase:<9} {}/{expected} bound, {failed} failed, {:.0} logins/s, {} live",
                    stamp(t0),
                    bound.len(),
                    bound.len() as f64 / secs.max(1e-9),
                    shared.stats.live.load(Ordering::Relaxed),
                );
            }
            _ = stop.cancelled() => break,
        }
    }
    times.sort_unstable();
    (bound, times)
}

/// The once-a-second progress line of the sending and draining phases.
struct Progress {
    t0: Instant,
    last: Instant,
    prev: (u64, u64, u64),
    /// What the origin and the confirmation are called.
    names: (&'static str, &'static str),
}

impl Progress {
    fn new(t0: Instant, confirm: Confirm) -> Self {
        Progress {
            t0,
            last: Instant::now(),
            prev: (0, 0, 0),
            names: match confirm {
                Confirm::Webhook => ("accepted", "webhook"),
                Confirm::Receipt => ("sent", "receipts"),
            },
        }
    }

    fn line(
        &mut self,
        phase: &str,
        tracker: &Tracker,
        shared: &xmpp::Shared,
        sent: &load::Sent,
        errors: &Errors,
    ) {
        let c = &tracker.counters;
        let now = (
            c.accepted.load(Ordering::Relaxed),
            c.delivered.load(Ordering::Relaxed),
            c.confirmed.load(Ordering::Relaxed),
        );
        let secs = self.last.elapsed().as_secs_f64().max(1e-9);
        self.last = Instant::now();
        let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / secs;
        let (mut d, mut w) = tracker.take_recent();
        d.sort_unstable();
        w.sort_unstable();
        let ms = |v: &[u64], q: f64| {
            percentile(v, q).map_or_else(
                || "-".to_string(),
                |us| format!("{:.1}", us as f64 / 1000.0),
            )
        };
        eprintln!(
            "{} {phase:<8} sessions {}  {o} {} ({:.0}/s)  delivered {} ({:.0}/s)  {c} {} ({:.0}/s)  in flight {}  p50/p99 ms: delivered {}/{} {c} {}/{}  errors {}",
            stamp(self.t0),
            shared.stats.live.load(Ordering::Relaxed),
            now.0,
            rate(now.0, self.prev.0),
            now.1,
            rate(now.1, self.prev.1),
            now.2,
            rate(now.2, self.prev.2),
            sent.in_flight.load(Ordering::Relaxed),
            ms(&d, 0.5),
            ms(&d, 0.99),
            ms(&w, 0.5),
            ms(&w, 0.99),
            errors.total(),
            o = self.names.0,
            c = self.names.1,
        );
        self.prev = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_stays_out_of_reports() {
        let line = |v: &[&str]| redacted_command(v.iter().map(|s| s.to_string()));
        assert_eq!(
            line(&[
                "b",
                "--api",
                "u",
                "--admin-token",
                "adm_x",
                "--devices",
                "5"
            ]),
            "b --api u --admin-token *** --devices 5"
        );
        assert_eq!(line(&["b", "--admin-token=adm_x"]), "b --admin-token=***");
        assert_eq!(line(&["b", "--target", "prosody"]), "b --target prosody");
    }
}
