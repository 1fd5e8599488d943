//! A NATS restart while idle: the services reconnect and the next message still flows.
//! Runs its own nats-server (same port and store after the restart) so other tests are not
//! disturbed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pushgate_testkit::device::TestDevice;
use pushgate_testkit::TestEnv;
use serde_json::json;

struct Nats {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Nats {
    fn start(port: u16, dir: &std::path::Path) -> anyhow::Result<Nats> {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Nats {
            child,
            port,
            dir: dir.to_path_buf(),
        })
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("nats-server did not start on {}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

#[tokio::test]
async fn services_reconnect_after_a_nats_restart() -> anyhow::Result<()> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("pushgate-nats-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let nats = Nats::start(port, &dir)?;
    nats.wait_ready().await?;
    let url = format!("nats://127.0.0.1:{port}");
    let env = TestEnv::start_on(&url, |_| {}).await?;
    let (_app, key) = env.create_app(None).await?;
    let (jid, password) = env
        .register_device(&key, "dora", "d", json!({"platform": "xmpp"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &password).await?;
    let (_, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "dora"}], "text": "before"}),
        )
        .await?;
    let first = b["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(dev.next_message().await?.id, first);
    dev.ack_received(&first).await?;
    env.wait_status(&key, &first, "delivered").await?;

    drop(nats);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let nats = Nats::start(port, &dir)?;
    nats.wait_ready().await?;

    // the next message flows once the services have reconnected; no message is lost meanwhile
    let (s, b) = env
        .send(
            &key,
            json!({"recipients": [{"user_id": "dora"}], "text": "after"}),
        )
        .await?;
    assert_eq!(s, 202, "{b}");
    let second = b["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let m = dev.next_message().await?;
    assert_eq!(m.id, second);
    dev.ack_received(&second).await?;
    env.wait_status(&key, &second, "delivered").await?;
    env.stop().await;
    let _ = std::fs::remove_dir_all(&nats.dir);
    Ok(())
}

#[tokio::test]
async fn readiness_follows_nats_and_metrics_are_served() -> anyhow::Result<()> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("pushgate-nats-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let nats = Nats::start(port, &dir)?;
    nats.wait_ready().await?;
    let url = format!("nats://127.0.0.1:{port}");
    let ns = pushgate_testkit::unique_namespace();
    let bus = pushgate_bus::Bus::connect(&url, &ns).await?;
    let store = pushgate_store::Store::connect(&pushgate_testkit::redis_url(), &ns).await?;
    let settings = router::RouterSettings {
        ops_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let svc = router::Service::build(
        settings,
        bus.clone(),
        store.clone(),
        pushgate_runtime::Metrics::new(),
    )
    .await?;
    let ops = format!("http://{}", svc.ops_addr());
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(svc.run_until(stop.clone()));
    let http = pushgate_testkit::http_client()?;
    assert_eq!(
        http.get(format!("{ops}/healthz")).send().await?.status(),
        200
    );
    let r = http.get(format!("{ops}/readyz")).send().await?;
    assert_eq!(r.status(), 200);
    assert!(r.text().await?.contains("nats: ok"));
    let metrics = http
        .get(format!("{ops}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("# TYPE pushgate_xmpp_sessions gauge"),
        "{metrics}"
    );
    // NATS goes away: not ready (but alive); it comes back: ready again
    drop(nats);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = http.get(format!("{ops}/readyz")).send().await?;
        if r.status() == 503 {
            assert!(r.text().await?.contains("nats: down"));
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed ready without NATS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        http.get(format!("{ops}/healthz")).send().await?.status(),
        200
    );
    let nats = Nats::start(port, &dir)?;
    nats.wait_ready().await?;
    loop {
        if http.get(format!("{ops}/readyz")).send().await?.status() == 200 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(30),
            "readyz never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let _ = run.await;
    let _ = bus.delete_namespace().await;
    let _ = store.delete_namespace().await;
    let _ = std::fs::remove_dir_all(&nats.dir);
    Ok(())
}
