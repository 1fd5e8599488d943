//! `pushgate-device`: a device on the command line, for trying Pushgate out, scripting and
//! load tests.
//!
//! - `listen` prints every new message (and retraction) as one JSON line on stdout as it
//!   arrives, and acknowledges it (`--read` also marks it read).
//! - `reply` answers a message and exits once the server has acknowledged the reply.
//!
//! Exit status: 0 on success, 2 when the server refuses the credentials, 1 for anything else.
//! Logs go to stderr (`RUST_LOG` to change the level).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pushgate_device::{Client, ClientConfig, ClientError, DeviceEvent, TlsMode};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "pushgate-device",
    version,
    about = "A Pushgate device over XMPP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print each new message as a JSON line and acknowledge it, until interrupted.
    Listen {
        #[command(flatten)]
        conn: Conn,
        /// Also mark each message read.
        #[arg(long)]
        read: bool,
    },
    /// Reply to a message and wait until the server has the reply.
    Reply {
        #[command(flatten)]
        conn: Conn,
        /// The id of the message to answer.
        message_id: String,
        /// The reply text.
        text: String,
    },
}

#[derive(Args)]
struct Conn {
    /// The device's JID from registration.
    #[arg(long)]
    jid: String,
    /// The device's password from registration (default: $PUSHGATE_DEVICE_PASSWORD, which
    /// keeps it out of the process list).
    #[arg(long)]
    password: Option<String>,
    /// Host to connect to.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (default 5222, or 5223 with --direct-tls).
    #[arg(long)]
    port: Option<u16>,
    /// TLS from the first byte instead of STARTTLS.
    #[arg(long)]
    direct_tls: bool,
    /// PEM file with the CA to trust (default: the built-in Mozilla roots).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Local message store (default ~/.pushgate-device/<jid>.redb, or ./pushgate-device.redb
    /// without a home directory).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Resource to bind (default: chosen by the server).
    #[arg(long)]
    resource: Option<String>,
}

impl Conn {
    fn config(self) -> anyhow::Result<ClientConfig> {
        let password = match self.password {
            Some(p) => p,
            None => std::env::var("PUSHGATE_DEVICE_PASSWORD")
                .context("no password: pass --password or set PUSHGATE_DEVICE_PASSWORD")?,
        };
        let store_path = self.store.unwrap_or_else(|| default_store(&self.jid));
        Ok(ClientConfig {
            port: self
                .port
                .unwrap_or(if self.direct_tls { 5223 } else { 5222 }),
            tls: if self.direct_tls {
                TlsMode::DirectTls
            } else {
                TlsMode::Starttls
            },
            jid: self.jid,
            password,
            host: self.host,
            ca_pem_file: self.ca,
            resource: self.resource,
            store_path,
        })
    }
}

/// One store per JID under the home directory, so two devices on one machine do not share
/// (and wrongly dedupe) their messages.
fn default_store(jid: &str) -> PathBuf {
    let name: String = jid
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "@._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home)
            .join(".pushgate-device")
            .join(format!("{name}.redb")),
        None => PathBuf::from("pushgate-device.redb"),
    }
}

/// The JSON line printed for an event (`None`: nothing to print).
fn event_json(ev: &DeviceEvent) -> Option<Value> {
    match ev {
        DeviceEvent::Message {
            id,
            title,
            text,
            data_json,
            received_at,
        } => {
            // the data object as JSON when it parses (it always should), else as its text
            let data = data_json.as_deref().map(|d| {
                serde_json::from_str::<Value>(d).unwrap_or_else(|_| Value::String(d.to_string()))
            });
            Some(json!({
                "event": "message",
                "id": id,
                "title": title,
                "text": text,
                "data": data,
                "received_at": received_at,
            }))
        }
        DeviceEvent::Retracted { id } => Some(json!({"event": "retracted", "id": id})),
        DeviceEvent::Reconnected => None,
    }
}

async fn listen(client: &Client, read: bool) -> anyhow::Result<()> {
    loop {
        let ev = tokio::select! {
            ev = client.next_event() => ev?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        if let Some(line) = event_json(&ev) {
            // stdout is line-buffered, so each message is visible to a pipe at once
            println!("{line}");
        }
        match ev {
            DeviceEvent::Message { id, .. } => {
                client.ack(&id).await?;
                if read {
                    client.mark_read(&id).await?;
                }
            }
            DeviceEvent::Reconnected => eprintln!("pushgate-device: reconnected"),
            DeviceEvent::Retracted { .. } => {}
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Listen { conn, read } => {
            let client = Client::connect(conn.config()?).await?;
            let res = listen(&client, read).await;
            client.close().await?;
            res
        }
        Command::Reply {
            conn,
            message_id,
            text,
        } => {
            let client = Client::connect(conn.config()?).await?;
            let res = client.reply(&message_id, &text).await;
            client.close().await?;
            Ok(res?)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(ClientError::Auth(why)) = e.downcast_ref::<ClientError>() {
                eprintln!(
                    "pushgate-device: authentication failed ({why}): check --jid and --password"
                );
                return ExitCode::from(2);
            }
            eprintln!("pushgate-device: {e:#}");
            ExitCode::FAILURE
        }
    }
}
