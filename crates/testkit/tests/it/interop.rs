//! Interop with an XMPP client we did not write: slixmpp (PyPI), started as a subprocess.
//! `scripts/test.sh` installs it into a venv and sets `PUSHGATE_PYTHON`.

use std::process::Stdio;
use std::time::Duration;

use pushgate_testkit::webhook::Receiver;
use pushgate_testkit::TestEnv;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn python() -> String {
    std::env::var("PUSHGATE_PYTHON").unwrap_or_else(|_| "python3".into())
}

async fn next_json(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> anyhow::Result<Value> {
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("slixmpp said nothing for 30 s"))??
        .ok_or_else(|| {
            anyhow::anyhow!("slixmpp exited early (is slixmpp installed? run scripts/test.sh)")
        })?;
    Ok(serde_json::from_str(&line)?)
}

#[tokio::test]
async fn slixmpp_receives_acknowledges_reads_and_replies() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let hook = Receiver::start().await?;
    let (_app, key) = env.create_app(Some(&hook.url)).await?;
    let (jid, password) = env
        .register_device(&key, "erin", "slix", json!({"platform": "xmpp"}))
        .await?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/slixmpp_device.py");
    let ca = pushgate_testkit::certs()?.ca;
    let mut child = Command::new(python())
        .arg(script)
        .arg(&jid)
        .arg(&password)
        .arg("127.0.0.1")
        .arg(env.xmpp_addr().port().to_string())
        .arg(&ca)
        .arg("1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = next_json(&mut lines).await?;
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["mechanism"], "SCRAM-SHA-256", "{ready}");

    let (s, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "erin"}], "text": "Hi slixmpp", "title": "Interop"}),
        )
        .await?;
    assert_eq!(s, 202, "{b}");
    let id = b["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let got = next_json(&mut lines).await?;
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["body"], "Hi slixmpp");
    assert_eq!(got["subject"], "Interop");
    assert_eq!(got["wants_receipt"], true);
    assert_eq!(
        got["sm_enabled"], true,
        "stream management must be enabled: {got}"
    );

    let v = env.wait_status(&key, &id, "read").await?;
    let hist: Vec<&str> = v["history"]
        .as_array()
        .map(|h| h.iter().filter_map(|e| e["status"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(hist, ["enqueued", "sent", "delivered", "read"]);
    let events = hook
        .wait_for("a reply from slixmpp", |ev| {
            ev.iter()
                .any(|e| e["event"] == "reply" && e["message_id"] == id.as_str())
        })
        .await?;
    assert!(events
        .iter()
        .any(|e| e["event"] == "reply" && e["text"] == "ack from slixmpp"));
    let done = next_json(&mut lines).await?;
    assert_eq!(done["done"], true);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await??;
    assert!(status.success(), "slixmpp exited with {status}");
    env.stop().await;
    Ok(())
}
