//! The Kannel provider against a real Kannel: Debian's `bearerbox` and `smsbox` with a fake
//! SMSC, and `fakesmsc` (kannel-extras) as the SMSC's far end, all on loopback with a
//! configuration written for each test. The fake SMSC hands every SMS to `fakesmsc`, which
//! prints it (`Got message N: <from to text …>`), and produces Kannel's own delivery reports
//! (type 8 "submitted to SMSC", then type 1 "delivered") for a request with a `dlr-mask`, so
//! the whole path runs: Pushgate → sendsms → bearerbox → SMSC → report → smsbox → `dlr-url`
//! → Pushgate.

use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;

use sms_fallback::kannel::dlr_path;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::*;

const BEARERBOX: &str = "/usr/sbin/bearerbox";
const SMSBOX: &str = "/usr/sbin/smsbox";
/// Where Debian's kannel-extras puts it (`dpkg -L kannel-extras`).
const FAKESMSC: &str = "/usr/lib/kannel/test/fakesmsc";

const USER: &str = "pushgate";
const PASSWORD: &str = "kannel-password-for-tests";
const ADMIN_PASSWORD: &str = "kannel-admin-for-tests";
const DLR_SECRET: &str = "kannel-dlr-secret-for-tests";
const SENDER: &str = "Pushgate";

/// Fails the test, rather than skipping it, when Kannel is missing: a skipped test would
/// look like a passed one.
fn require_kannel() {
    for bin in [BEARERBOX, SMSBOX, FAKESMSC] {
        assert!(
            FsPath::new(bin).exists(),
            "Kannel is not installed ({bin} is missing): run scripts/test.sh, which installs \
             Debian's kannel and kannel-extras packages (or: apt-get install kannel kannel-extras)"
        );
    }
}

/// A running Kannel. Its processes are killed when it is dropped (`kill_on_drop`), also when
/// the test fails; its directory (configuration, logs) is removed then too.
struct Kannel {
    dir: PathBuf,
    admin_port: u16,
    sendsms_port: u16,
    smsc_port: u16,
    children: Vec<Child>,
    /// What `fakesmsc` printed for each SMS it got: `<from> <to> <type> <data>`.
    handset: Arc<Mutex<Vec<String>>>,
}

impl Drop for Kannel {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Kannel {
    /// Picks ports and writes the configuration; nothing runs yet.
    fn configure() -> Kannel {
        require_kannel();
        let dir =
            std::env::temp_dir().join(format!("pushgate-kannel-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the Kannel directory");
        let [admin_port, sendsms_port, smsc_port, boxc_port] = free_ports::<4>();
        let k = Kannel {
            dir,
            admin_port,
            sendsms_port,
            smsc_port,
            children: Vec::new(),
            handset: Arc::default(),
        };
        let d = k.dir.display();
        let conf = format!(
            r#"group = core
admin-port = {admin}
admin-interface = 127.0.0.1
admin-password = {ADMIN_PASSWORD}
smsbox-port = {boxc_port}
smsbox-interface = 127.0.0.1
box-allow-ip = 127.0.0.1
log-file = "{d}/bearerbox.log"
log-level = 0
dlr-storage = internal

group = smsc
smsc = fake
smsc-id = fake
port = {smsc}
our-host = 127.0.0.1
connect-allow-ip = 127.0.0.1

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {boxc_port}
sendsms-port = {sendsms}
sendsms-interface = 127.0.0.1
log-file = "{d}/smsbox.log"
log-level = 0

group = sendsms-user
username = {USER}
password = {PASSWORD}
"#,
            admin = k.admin_port,
            smsc = k.smsc_port,
            sendsms = k.sendsms_port,
        );
        std::fs::write(k.conf(), conf).expect("write kannel.conf");
        k
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("kannel.conf")
    }

    fn sendsms_url(&self) -> String {
        format!("http://127.0.0.1:{}/cgi-bin/sendsms", self.sendsms_port)
    }

    fn spawn(&mut self, bin: &str, args: &[&str], console: &str) {
        let log = std::fs::File::create(self.dir.join(console)).expect("console log");
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        self.children.push(child);
    }

    /// Starts `fakesmsc` connected to the fake SMSC, receiving only (`-m 0`: it sends no
    /// message of its own; the one on the command line is never used), and collects what it
    /// prints for each SMS (`-v 0`: those lines are debug output).
    fn spawn_handset(&mut self) {
        let port = self.smsc_port.to_string();
        let mut child = Command::new(FAKESMSC)
            .args([
                "-H",
                "127.0.0.1",
                "-r",
                &port,
                "-m",
                "0",
                "-v",
                "0",
                "100 200 text unused",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {FAKESMSC}: {e}"));
        let stderr = child.stderr.take().expect("fakesmsc stderr");
        let handset = self.handset.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some((_, rest)) = line.split_once("Got message ") {
                    let got = rest
                        .split_once(": <")
                        .and_then(|(_, m)| m.strip_suffix('>'))
                        .unwrap_or(rest);
                    if let Ok(mut h) = handset.lock() {
                        h.push(got.to_string());
                    }
                }
            }
        });
        self.children.push(child);
    }

    /// Bearerbox's status page, if it answers.
    async fn status(&self) -> Option<String> {
        let url = format!(
            "http://127.0.0.1:{}/status.txt?password={ADMIN_PASSWORD}",
            self.admin_port
        );
        let resp = reqwest::Client::new().get(url).send().await.ok()?;
        resp.text().await.ok()
    }

    /// Starts bearerbox, smsbox and fakesmsc and waits until bearerbox reports both the
    /// smsbox and the fake SMSC link online and the sendsms port answers.
    async fn start(&mut self) {
        pushgate_runtime::tls::install_crypto_provider();
        let conf = self.conf().display().to_string();
        self.spawn(BEARERBOX, &[&conf], "bearerbox.console");
        let give_up = tokio::time::Instant::now() + PATIENCE;
        while self.status().await.is_none() {
            self.assert_alive(give_up, "bearerbox's admin port never answered")
                .await;
        }
        self.spawn(SMSBOX, &[&conf], "smsbox.console");
        self.spawn_handset();
        loop {
            let status = self.status().await.unwrap_or_default();
            let ready = status.contains("smsbox:")
                && status.contains(&format!("FAKE:{} (online", self.smsc_port));
            if ready
                && tokio::net::TcpStream::connect(("127.0.0.1", self.sendsms_port))
                    .await
                    .is_ok()
            {
                return;
            }
            self.assert_alive(give_up, &format!("Kannel did not come up:\n{status}"))
                .await;
        }
    }

    /// Between two readiness checks: fails with the logs when a process died or time is up.
    async fn assert_alive(&mut self, give_up: tokio::time::Instant, what: &str) {
        for c in &mut self.children {
            if let Ok(Some(exit)) = c.try_wait() {
                panic!("a Kannel process exited ({exit}):\n{}", self.logs());
            }
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "{what}\n{}",
            self.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// The ends of Kannel's logs, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for f in [
            "bearerbox.console",
            "bearerbox.log",
            "smsbox.console",
            "smsbox.log",
        ] {
            let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out.push_str(&format!("--- {f}\n{}\n", tail.join("\n")));
        }
        out
    }

    fn handset(&self) -> Vec<String> {
        self.handset.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Waits until fakesmsc got an SMS satisfying `want`.
    async fn wait_handset(&self, want: impl Fn(&str) -> bool) -> String {
        let give_up = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(m) = self.handset().into_iter().find(|m| want(m)) {
                return m;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "fakesmsc never got the SMS; it got {:?}\n{}",
                self.handset(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Env {
    async fn kannel_app(&self, k: &Kannel, password: &str) -> String {
        self.app(Some(json!({
            "provider": "kannel",
            "sendsms_url": k.sendsms_url(),
            "username": USER,
            "password": password,
            "from": SENDER,
            "dlr_secret": DLR_SECRET,
        })))
        .await
    }

    /// Calls the service's Kannel report route as Kannel would.
    async fn kannel_report(&self, path: &str, query: &str) -> (u16, String, Value) {
        pushgate_runtime::tls::install_crypto_provider();
        let resp = reqwest::Client::new()
            .get(format!("http://{}{path}?{query}", self.dlr))
            .send()
            .await
            .expect("Kannel report");
        answer_parts(resp).await
    }
}

/// The text of message data as fakesmsc prints it for UCS-2: the UTF-16BE bytes URL-encoded
/// (`%XX`, space as `+`, Kannel's safe characters as they are).
fn ucs2_printed_text(printed: &str) -> Option<String> {
    let raw = printed.as_bytes();
    let mut bytes = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => bytes.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(raw.get(i + 1..i + 3)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => bytes.push(b),
        }
        i += 1;
    }
    if bytes.len() % 2 != 0 {
        return None;
    }
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    String::from_utf16(&units).ok()
}

/// Waits until the Kannel report route has answered 200 `n` times.
async fn wait_reports(env: &Env, n: u64) {
    let served = || {
        env.metrics
            .http_requests
            .get_or_create(&pushgate_runtime::metrics::HttpLabels {
                route: sms_fallback::dlr::KANNEL_ROUTE.into(),
                status: 200,
            })
            .get()
    };
    let give_up = tokio::time::Instant::now() + PATIENCE;
    while served() < n {
        assert!(
            tokio::time::Instant::now() < give_up,
            "Kannel's reports did not all arrive: {} of {n}",
            served()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kannel_delivers_through_a_real_gateway_and_reports_back() {
    with_env(|env| async move {
        let mut kannel = Kannel::configure();
        kannel.start().await;
        let app = env.kannel_app(&kannel, PASSWORD).await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms")).await;

        let got = kannel.wait_handset(|m| m.contains("+41791234567")).await;
        assert_eq!(got, format!("{SENDER} +41791234567 text Your code is 1234"));
        // Kannel's own reports: "submitted to SMSC" (type 8) changes nothing, "delivered"
        // (type 1) ends it; both are answered 200, in whichever order smsbox sends them. A
        // real Kannel reports within milliseconds, so `sms_sent` is looked for in the history
        env.wait_status(&id, Status::SmsDelivered).await;
        wait_reports(&env, 2).await;
        let s = env.state(&id).await;
        assert_eq!(
            statuses(&s),
            vec![Status::Enqueued, Status::SmsSent, Status::SmsDelivered]
        );
        assert_eq!(
            s.history[1].detail.as_deref(),
            Some(format!("1 segment, GSM-7, ref {id}").as_str())
        );
        assert_eq!(last(&s).channel.as_deref(), Some("sms"));

        // a text beyond GSM-7 goes as UCS-2 (coding=2), and arrives as such
        let id = env
            .message(
                &app,
                Some("user-1"),
                "+41797654321",
                3_600_000,
                Some("Код 1234 ✓"),
            )
            .await;
        let expired = Change {
            message_id: &id,
            to: Some(Status::Expired),
            ..Default::default()
        };
        env.store.change(&expired, now_ms()).await.expect("expire");
        env.request(&app, &id, &format!("{id}.sms")).await;
        let got = kannel.wait_handset(|m| m.contains("+41797654321")).await;
        let data = got
            .strip_prefix(&format!("{SENDER} +41797654321 ucs-2 "))
            .unwrap_or_else(|| panic!("not a UCS-2 SMS from {SENDER}: {got}"));
        assert_eq!(ucs2_printed_text(data).as_deref(), Some("Код 1234 ✓"));
        let s = env.wait_status(&id, Status::SmsDelivered).await;
        assert_eq!(s.history[s.history.len() - 2].status, Status::SmsSent);
        assert_eq!(
            s.history[s.history.len() - 2].detail.as_deref(),
            Some(format!("1 segment, UCS-2, ref {id}").as_str())
        );
        assert_eq!(kannel.handset().len(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kannel_reports_are_authenticated_by_their_path() {
    // Kannel's own reports would race the ones sent here: without a public base URL the
    // service asks Kannel for none, and the reports below are sent as Kannel would
    with_env_using(|s| s.public_dlr_base_url = None, |env| async move {
        let mut kannel = Kannel::configure();
        kannel.start().await;
        let app = env.kannel_app(&kannel, PASSWORD).await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        kannel
            .wait_handset(|m| m.contains("+41791234567"))
            .await;
        env.wait_status(&id, Status::SmsSent).await;

        // a token made with another secret, or for another message, is refused
        let forged = dlr_path("another-secret-of-16+", &id);
        let (code, ct, body) = env.kannel_report(&forged, "type=2&status=").await;
        assert_eq!((code, ct.as_str()), (401, "application/problem+json"), "{body}");
        let other = MessageId::generate().0;
        let theirs = dlr_path(DLR_SECRET, &other);
        let token = theirs.rsplit('/').next().unwrap_or_default();
        let (code, _, _) = env
            .kannel_report(&format!("/v1/sms/kannel/{id}/{token}"), "type=2&status=")
            .await;
        assert_eq!(code, 401);
        assert_eq!(env.state(&id).await.status, Status::SmsSent);

        // progress reports are taken without a trace in the history
        let path = dlr_path(DLR_SECRET, &id);
        for kind in ["4", "8"] {
            let (code, _, body) = env
                .kannel_report(&path, &format!("type={kind}&status=ACK%2F"))
                .await;
            assert_eq!((code, body["status"].as_str()), (200, Some("sms_sent")));
        }
        let (code, _, _) = env.kannel_report(&path, "type=abc").await;
        assert_eq!(code, 400);
        assert_eq!(
            statuses(&env.state(&id).await),
            vec![Status::Enqueued, Status::SmsSent]
        );

        let (code, _, body) = env
            .kannel_report(&path, "type=16&status=NACK%2F0x0000000b%2FInvalid+Destination")
            .await;
        assert_eq!(code, 200, "{body}");
        let s = env.wait_status(&id, Status::SmsFailed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("SMS provider reported failure: rejected by the SMSC (NACK/0x0000000b/Invalid Destination)")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kannel_refusing_the_password_fails_the_sms() {
    with_env(|env| async move {
        let mut kannel = Kannel::configure();
        kannel.start().await;
        let app = env.kannel_app(&kannel, "not-the-password").await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        let s = env.wait_status(&id, Status::SmsFailed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some(
                "SMS provider refused the credentials: HTTP 403: Authorization failed for sendsms"
            )
        );
        assert_eq!(env.count("credentials"), 1);
        assert!(kannel.handset().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kannel_down_is_retried_until_it_is_up() {
    with_env(|env| async move {
        // configured, not started: nothing listens on its sendsms port yet
        let mut kannel = Kannel::configure();
        let app = env.kannel_app(&kannel, PASSWORD).await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        env.wait_count(&["retry"], 2).await;
        assert_eq!(env.state(&id).await.status, Status::Enqueued);
        kannel.start().await;
        kannel.wait_handset(|m| m.contains("+41791234567")).await;
        env.wait_status(&id, Status::SmsDelivered).await;
        assert_eq!(kannel.handset().len(), 1);
    })
    .await;
}
