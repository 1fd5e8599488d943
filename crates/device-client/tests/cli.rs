//! The `pushgate-device` binary as a user runs it, against the real suite (pushgate-testkit):
//! `listen` prints a JSON line per message and confirms it, `reply` answers and exits 0, and
//! refused credentials exit 2 with a clear message.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use pushgate_testkit::webhook::Receiver;
use pushgate_testkit::TestEnv;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// A store directory removed when the test ends.
struct StoreDir(PathBuf);

impl StoreDir {
    fn new() -> Self {
        StoreDir(std::env::temp_dir().join(format!(
            "pushgate-device-cli-{}",
            uuid::Uuid::new_v4().simple()
        )))
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary with the connection flags for the test suite (password through the
/// environment, as the help recommends).
fn device(
    env: &TestEnv,
    sub: &str,
    jid: &str,
    password: &str,
    dir: &StoreDir,
) -> anyhow::Result<Command> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pushgate-device"));
    c.arg(sub)
        .args(["--jid", jid])
        .args(["--port", &env.xmpp_addr().port().to_string()])
        .arg("--ca")
        .arg(pushgate_testkit::certs()?.ca)
        .arg("--store")
        .arg(dir.0.join("store.redb"))
        .env("PUSHGATE_DEVICE_PASSWORD", password)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(c)
}

async fn send(env: &TestEnv, key: &str, body: Value) -> anyhow::Result<String> {
    let (status, v) = env.send(key, body).await?;
    if status != 202 {
        bail!("send: {status} {v}");
    }
    v["messages"][0]["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no id in {v}"))
}

#[tokio::test]
async fn listen_prints_each_message_as_a_json_line_and_confirms_it() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, pw) = env
        .register_device(&key, "cli", "laptop", json!({"platform": "xmpp"}))
        .await?;
    let dir = StoreDir::new();
    let mut child = device(&env, "listen", &jid, &pw, &dir)?
        .arg("--read")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    // whether or not the listener is connected yet, the message waits for it
    let id = send(
        &env,
        &key,
        json!({"recipients": [{"user_id": "cli"}], "title": "Hi", "text": "from the API",
               "data": {"k": [1, 2]}}),
    )
    .await?;
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("listen printed nothing")??
        .context("listen exited")?;
    let v: Value = serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
    assert_eq!(v["event"], "message", "{v}");
    assert_eq!(v["id"], json!(id));
    assert_eq!(v["title"], "Hi");
    assert_eq!(v["text"], "from the API");
    assert_eq!(v["data"], json!({"k": [1, 2]}));
    assert!(v["received_at"].as_u64().is_some_and(|t| t > 0), "{v}");
    // listen confirmed it and, with --read, marked it read
    let m = env.wait_status(&key, &id, "read").await?;
    let history: Vec<&str> = m["history"]
        .as_array()
        .map(|h| h.iter().filter_map(|e| e["status"].as_str()).collect())
        .unwrap_or_default();
    assert!(history.contains(&"delivered"), "{m}");

    // `reply` from another process while `listen` runs: both open the same store file, and
    // the second login replaces listen's session (stream error `conflict`); listen comes back
    // by itself and goes on printing
    let out = device(&env, "reply", &jid, &pw, &dir)?
        .args([id.as_str(), "thanks"])
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let second = send(
        &env,
        &key,
        json!({"recipients": [{"user_id": "cli"}], "text": "second"}),
    )
    .await?;
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("listen printed nothing after the reply")??
        .context("listen exited")?;
    let v: Value = serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
    assert_eq!(v["id"], json!(second), "{v}");
    assert_eq!(v["data"], Value::Null);
    env.wait_status(&key, &second, "read").await?;
    child.kill().await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn reply_exits_zero_once_the_server_has_it() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let hook = Receiver::start().await?;
    let (_app, key) = env.create_app(Some(&hook.url)).await?;
    let (jid, pw) = env
        .register_device(&key, "cli", "laptop", json!({"platform": "xmpp"}))
        .await?;
    let dir = StoreDir::new();
    let id = send(
        &env,
        &key,
        json!({"recipients": [{"user_id": "cli"}], "text": "coming tonight?"}),
    )
    .await?;
    let out = device(&env, "reply", &jid, &pw, &dir)?
        .args([id.as_str(), "yes, at 8"])
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let events = hook
        .wait_for("the reply", |ev| ev.iter().any(|e| e["event"] == "reply"))
        .await?;
    let reply = events
        .iter()
        .find(|e| e["event"] == "reply")
        .context("reply")?;
    assert_eq!(reply["message_id"], json!(id));
    assert_eq!(reply["text"], "yes, at 8");
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn refused_credentials_exit_2_with_a_clear_message() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, _pw) = env
        .register_device(&key, "cli", "laptop", json!({"platform": "xmpp"}))
        .await?;
    let dir = StoreDir::new();
    for sub in ["listen", "reply"] {
        let mut cmd = device(&env, sub, &jid, "not-the-password", &dir)?;
        if sub == "reply" {
            cmd.args(["some-id", "text"]);
        }
        let out = cmd.output().await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sub}: {stderr}");
        assert!(stderr.contains("authentication failed"), "{sub}: {stderr}");
        assert!(out.stdout.is_empty(), "{sub}");
    }
    env.stop().await;
    Ok(())
}
