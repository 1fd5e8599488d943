//! `pushgate all`: every service in one process, for a laptop or a single small host.
//!
//! ```text
//! pushgate all --config pushgate.toml [--dev-certs DIR]
//! pushgate purge --config pushgate.toml --yes
//! ```
//! `--dev-certs DIR` creates (once) a development CA and a certificate for localhost and the
//! XMPP domain in DIR, for the quickstart; production points `tls_cert`/`tls_key` at real ones.
//!
//! `purge` deletes every JetStream stream and Redis key of the configured namespace (all
//! messages, devices, apps and statuses in it). It exists for throw-away installations such as
//! benchmark runs against a shared NATS and Redis; it refuses to run without `--yes`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use pushgate::{Suite, SuiteSettings};
use pushgate_runtime::{service, telemetry, Metrics};

fn arg_value(name: &str) -> Option<String> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
        if let Some(v) = a.strip_prefix(&format!("{name}=")) {
            return Some(v.to_string());
        }
    }
    None
}

pushgate_runtime::global_allocator!();

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cmd = std::env::args().nth(1).unwrap_or_default();
    match cmd.as_str() {
        "all" => {}
        "purge" => return purge().await,
        _ => bail!(
            "usage: pushgate all [--config FILE] [--dev-certs DIR]\n       pushgate purge [--config FILE] --yes"
        ),
    }
    let mut settings: SuiteSettings = pushgate_runtime::load(service::config_path().as_deref())?;
    if let Some(dir) = arg_value("--dev-certs") {
        let names = [
            "localhost",
            "127.0.0.1",
            settings.common.xmpp_domain.as_str(),
        ];
        let certs = pushgate_runtime::tls::dev_certs(&PathBuf::from(&dir), &names)
            .context("creating development certificates")?;
        settings.ingress.tls_cert = certs.cert.clone();
        settings.ingress.tls_key = certs.key.clone();
        settings.edge.tls_cert = certs.cert.clone();
        settings.edge.tls_key = certs.key.clone();
        eprintln!("development CA: {}", certs.ca.display());
    }
    settings.common.validate()?;
    settings.ingress.validate()?;
    let _guard = telemetry::init(&settings.common.telemetry)?;
    let c = &settings.common;
    let (bus, store) = service::connect_backends(c).await?;
    let suite = Suite::start(settings.clone(), bus, store, Metrics::new()).await?;
    print_quickstart(&settings, &suite);
    let stop = service::shutdown_on_signal();
    let token = suite.shutdown_token();
    tokio::spawn(async move {
        stop.cancelled().await;
        token.cancel();
    });
    suite.wait().await;
    Ok(())
}

/// Deletes the namespace's streams and keys (see the module documentation).
async fn purge() -> anyhow::Result<()> {
    let settings: SuiteSettings = pushgate_runtime::load(service::config_path().as_deref())?;
    settings.common.validate()?;
    let c = &settings.common;
    if !std::env::args().any(|a| a == "--yes") {
        bail!(
            "`pushgate purge` deletes every stream and key of namespace {:?} on {} and {}; add --yes to do it",
            c.namespace,
            c.nats_url,
            c.redis_url
        );
    }
    let (bus, store) = service::connect_backends(c).await?;
    bus.delete_namespace()
        .await
        .context("deleting the namespace's streams")?;
    store
        .delete_namespace()
        .await
        .context("deleting the namespace's keys")?;
    eprintln!("namespace {:?} purged", c.namespace);
    Ok(())
}

fn print_quickstart(s: &SuiteSettings, suite: &Suite) {
    let a = &suite.addresses;
    let ca = arg_value("--dev-certs")
        .map(|d| format!("{d}/ca.pem"))
        .unwrap_or_else(|| "<your CA>".into());
    let api = format!("https://localhost:{}", a.api.port());
    println!(
        r#"
Pushgate is up.
  HTTPS API        {api}
  XMPP (STARTTLS)  {xmpp}   domain {domain}
  XMPP (TLS)       {direct}
  XMPP (WebSocket) {websocket}

First message, step by step (another terminal):
  export CA={ca} API={api} ADMIN={admin}
  # 1. an app (keep the api_key it prints)
  curl -s --cacert $CA -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
       -d '{{"name":"demo","webhook":{{"url":"http://127.0.0.1:8099/hook"}}}}' $API/v1/apps
  export KEY=<api_key from above>
  # 2. a device (prints its XMPP jid and password)
  curl -s --cacert $CA -X PUT -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
       -d '{{"platform":"xmpp"}}' $API/v1/users/alice/devices/phone-1
  # 3. connect any XMPP client with that jid/password (STARTTLS, trust $CA), then send:
  curl -s --cacert $CA -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
       -d '{{"recipients":[{{"user_id":"alice"}}],"text":"Hello from Pushgate"}}' $API/v1/messages
  # 4. its status and history
  curl -s --cacert $CA -H "Authorization: Bearer $KEY" $API/v1/messages/<id>
Press Ctrl-C to stop.
"#,
        xmpp = a.xmpp_starttls,
        domain = s.common.xmpp_domain,
        direct = a
            .xmpp_direct_tls
            .map(|d| d.to_string())
            .unwrap_or_else(|| "disabled".into()),
        websocket = a
            .xmpp_websocket
            .map(|w| format!("wss://localhost:{}/xmpp-websocket", w.port()))
            .unwrap_or_else(|| "disabled".into()),
        admin = s.ingress.admin_token,
    );
}
