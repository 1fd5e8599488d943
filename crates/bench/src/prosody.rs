//! `--target prosody`: a Prosody (Debian's `prosody` package) that the bench starts for one run,
//! so the devices' XMPP hop can be compared with Pushgate's edge on the same machine and the
//! same workload.
//!
//! Everything lives in a temporary directory that is removed afterwards: the configuration
//! (c2s with STARTTLS required on a free loopback port, no s2s, no HTTP, internal storage), a
//! certificate for `localhost` made like the suite's development certificates, the data
//! directory, the pid file and the log. The accounts are written straight into the data
//! directory in Prosody's own file format instead of calling `prosodyctl register` once per
//! device, which would take minutes for 100,000 accounts (one Lua start-up each).
//!
//! Prosody runs in the foreground (`-F`) as the bench's child, in its own process group (the
//! terminal's ctrl-c goes to the bench, which still drains and then stops Prosody itself), and
//! is killed if the bench drops it without stopping it.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};

use crate::cli::ProsodyAuth;

/// The virtual host, and the TLS name the devices check.
pub const DOMAIN: &str = "localhost";
/// `password_hash` of hashed accounts: the mechanism the bench's client speaks, and the one
/// Pushgate's edge offers.
pub const PASSWORD_HASH: &str = "SHA-256";
/// Iterations of the hashed accounts' keys: the same as Pushgate's device verifiers (and the
/// lowest Prosody accepts).
pub const SCRAM_ITERATIONS: u32 = pushgate_core::credentials::SCRAM_ITERATIONS;
/// Prosody's storage backend for everything.
pub const STORAGE: &str = "internal";
/// Modules loaded besides the automatic ones (c2s, presence, message, iq, posix): what a
/// mobile client's server has — TLS, SASL, roster, disco, XEP-0198 stream management, pings,
/// client state indication. No carbons, no MAM (each would add work per message that
/// Pushgate's edge does not do).
pub const MODULES_ENABLED: &[&str] = &[
    "roster",
    "saslauth",
    "tls",
    "disco",
    "ping",
    "smacks",
    "csi_simple",
];
/// Automatic modules switched off: no server-to-server, and no offline storage (every
/// recipient is online; a message for a session that is gone shows up as missing).
pub const MODULES_DISABLED: &[&str] = &["s2s", "s2s_auth_certs", "offline"];

/// Time Prosody gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Time Prosody gets to close its sessions and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the bench could not run Prosody.
#[derive(Debug, thiserror::Error)]
pub enum ProsodyError {
    #[error(
        "`prosody` is not installed (not on PATH, not /usr/bin/prosody). Install it with \
         `scripts/bench-prosody.sh --install-only` (Debian's package, its system service kept \
         from starting), or `apt-get install prosody`, or pass --prosody-bin FILE"
    )]
    NotInstalled,
    #[error("{0} is not an executable file")]
    NotExecutable(PathBuf),
}

/// Finds the `prosody` program: `--prosody-bin`, else `prosody` on PATH, else Debian's path
/// (which is not on every user's PATH).
pub fn find_binary(given: Option<&Path>) -> Result<PathBuf, ProsodyError> {
    if let Some(p) = given {
        return if is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(ProsodyError::NotExecutable(p.to_path_buf()))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("prosody"))
                .find(|p| is_executable(p))
        })
        .unwrap_or_default();
    on_path
        .or_else(|| Some(PathBuf::from("/usr/bin/prosody")).filter(|p| is_executable(p)))
        .ok_or(ProsodyError::NotInstalled)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A Lua string literal holding exactly `bytes`: printable ASCII as it is, everything else
/// (quotes, backslashes, control characters, non-ASCII) as a decimal escape, so any path,
/// password or binary salt survives Prosody's loader unchanged.
pub fn lua_string(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 2);
    s.push('"');
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            s.push(char::from(b));
        } else {
            // three digits, so a following digit is not read as part of the escape
            let _ = write!(s, "\\{b:03}");
        }
    }
    s.push('"');
    s
}

/// A host or user name as a file name, the way Prosody's `util.datamanager` encodes it: every
/// byte that is not an ASCII letter or digit becomes `%xx` (lower-case hex).
pub fn path_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02x}");
        }
    }
    out
}

/// Where Prosody's internal storage keeps `user`'s account on `host`.
pub fn account_path(data: &Path, host: &str, user: &str) -> PathBuf {
    data.join(path_encode(host))
        .join("accounts")
        .join(format!("{}.dat", path_encode(user)))
}

/// One account's stored credentials.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// `internal_plain`: the password itself.
    Plain(String),
    /// `internal_hashed`: the SCRAM keys (RFC 5802), so a login costs the server no PBKDF2.
    Hashed {
        salt: Vec<u8>,
        iterations: u32,
        stored_key: [u8; 32],
        server_key: [u8; 32],
    },
}

impl Credentials {
    /// Credentials for `password`. Hashed ones cost one PBKDF2 of `iterations`, so the bench
    /// computes them once and gives every account the same (the server cannot tell).
    pub fn new(auth: ProsodyAuth, password: &str, salt: &[u8], iterations: u32) -> Self {
        match auth {
            ProsodyAuth::Plain => Credentials::Plain(password.to_string()),
            ProsodyAuth::Hashed => {
                let salted = pushgate_core::credentials::salted_password(
                    password.as_bytes(),
                    salt,
                    iterations,
                );
                let client_key = pushgate_core::credentials::hmac_sha256(&salted, b"Client Key");
                Credentials::Hashed {
                    salt: salt.to_vec(),
                    iterations,
                    stored_key: Sha256::digest(client_key).into(),
                    server_key: pushgate_core::credentials::hmac_sha256(&salted, b"Server Key"),
                }
            }
        }
    }

    /// The account file, as Prosody's datamanager writes it (`return <table>;`). The keys are
    /// lower-case hex because `mod_auth_internal_hashed` compares hex strings.
    pub fn account_file(&self) -> String {
        match self {
            Credentials::Plain(p) => {
                format!("return {{\n\t[\"password\"] = {};\n}};\n", lua_string(p.as_bytes()))
            }
            Credentials::Hashed {
                salt,
                iterations,
                stored_key,
                server_key,
            } => format!(
                "return {{\n\t[\"iteration_count\"] = {iterations};\n\t[\"salt\"] = {};\n\t[\"server_key\"] = \"{}\";\n\t[\"stored_key\"] = \"{}\";\n}};\n",
                lua_string(salt),
                hex(server_key),
                hex(stored_key),
            ),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What the configuration file says.
#[derive(Debug, Clone)]
pub struct Settings {
    pub dir: PathBuf,
    pub port: u16,
    pub auth: ProsodyAuth,
    /// Prosody switches to the `prosody` user when started as root, and that user cannot read
    /// the bench's private directory: as root, it is told to stay root.
    pub run_as_root: bool,
    /// TCP_NODELAY on its sockets (`--prosody-nodelay`).
    pub nodelay: bool,
}

impl Settings {
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn tls(&self) -> PathBuf {
        self.dir.join("tls")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("prosody.log")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("prosody.cfg.lua")
    }
}

fn lua_path(p: &Path) -> String {
    lua_string(p.as_os_str().as_encoded_bytes())
}

fn lua_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|m| lua_string(m.as_bytes())).collect();
    format!("{{ {} }}", quoted.join("; "))
}

/// The `prosody.cfg.lua` of a run.
pub fn config_lua(s: &Settings) -> String {
    let tls = s.tls();
    let mut c = String::new();
    c.push_str(
        "-- Written by pushgate-bench for one run (--target prosody); removed with its directory.\n",
    );
    if s.run_as_root {
        c.push_str("run_as_root = true\n");
    }
    let _ = writeln!(c, "pidfile = {}", lua_path(&s.dir.join("prosody.pid")));
    let _ = writeln!(c, "data_path = {}", lua_path(&s.data()));
    let _ = writeln!(c, "certificates = {}", lua_path(&tls));
    let _ = writeln!(c, "log = {{ info = {} }}", lua_path(&s.log()));
    if s.nodelay {
        c.push_str("network_settings = { nagle = false }\n");
    }
    let _ = writeln!(c, "modules_enabled = {}", lua_list(MODULES_ENABLED));
    let _ = writeln!(c, "modules_disabled = {}", lua_list(MODULES_DISABLED));
    let _ = writeln!(c, "c2s_ports = {{ {} }}", s.port);
    c.push_str("c2s_interfaces = { \"127.0.0.1\" }\n");
    c.push_str("c2s_require_encryption = true\n");
    c.push_str("allow_registration = false\n");
    let _ = writeln!(
        c,
        "authentication = {}",
        lua_string(s.auth.provider().as_bytes())
    );
    if s.auth == ProsodyAuth::Hashed {
        let _ = writeln!(
            c,
            "password_hash = {}",
            lua_string(PASSWORD_HASH.as_bytes())
        );
    }
    let _ = writeln!(c, "storage = {}", lua_string(STORAGE.as_bytes()));
    let _ = writeln!(
        c,
        "ssl = {{ certificate = {}; key = {} }}",
        lua_path(&tls.join("server.pem")),
        lua_path(&tls.join("server.key"))
    );
    let _ = writeln!(c, "VirtualHost {}", lua_string(DOMAIN.as_bytes()));
    c
}

/// The temporary directory of a run, removed when dropped (also on errors and panics) unless
/// it is to be kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn create(keep: bool) -> anyhow::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "pushgate-bench-prosody-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        // the account files and the key are secrets of this run only
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", path.display()))?;
        Ok(TempDir { path, keep })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("Prosody's directory is kept: {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A login the bench created.
#[derive(Debug, Clone)]
pub struct Account {
    pub jid: String,
    pub password: String,
}

/// The running Prosody.
pub struct Server {
    // declared before `dir`: dropped (and killed) before the directory goes
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    /// From the log's "Prosody version" line.
    pub version: Option<String>,
    pub auth: ProsodyAuth,
    /// Nagle off (`--prosody-nodelay`).
    pub nodelay: bool,
    /// CA of the server certificate, for the clients.
    pub ca: PathBuf,
    /// Device accounts `bu0 …`, then sender accounts `bs0 …`.
    pub devices: Vec<Account>,
    pub senders: Vec<Account>,
    /// Time spent writing the accounts.
    pub accounts_secs: f64,
    log: PathBuf,
    dir: TempDir,
}

/// The sender accounts' names.
pub fn sender_user(k: u32) -> String {
    format!("bs{k}")
}

/// A free loopback port, to write into the configuration (Prosody has no "port 0").
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("finding a free loopback port for Prosody")?;
    Ok(l.local_addr()?.port())
}

/// The effective user id, from `/proc/self/status` (no libc call needed).
fn effective_uid() -> Option<u32> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex(&b)
}

/// The last `lines` lines of a file, for error messages.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let all: Vec<&str> = s.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

impl Server {
    /// Writes the directory and the accounts, starts Prosody and waits until it listens.
    pub async fn start(
        binary: Option<&Path>,
        auth: ProsodyAuth,
        devices: u32,
        senders: u32,
        nodelay: bool,
        keep_dir: bool,
    ) -> anyhow::Result<Server> {
        let binary = find_binary(binary)?;
        let dir = TempDir::create(keep_dir)?;
        let settings = Settings {
            dir: dir.path.clone(),
            port: free_port()?,
            auth,
            run_as_root: effective_uid() == Some(0),
            nodelay,
        };
        let certs = pushgate_runtime::tls::dev_certs(&settings.tls(), &[DOMAIN])
            .context("creating the certificate for Prosody")?;
        // one password for every account: hashed accounts then cost one PBKDF2 in all
        let password = random_hex(16);
        let salt = random_hex(12).into_bytes();
        let started = Instant::now();
        let data = settings.data();
        let (pw, users) = (password.clone(), devices);
        let written = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let file = Credentials::new(auth, &pw, &salt, SCRAM_ITERATIONS).account_file();
            let dir = account_path(&data, DOMAIN, "x")
                .parent()
                .map(Path::to_path_buf)
                .context("account directory")?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let names = (0..u64::from(users))
                .map(crate::load::user_of)
                .chain((0..senders).map(sender_user));
            for user in names {
                let path = account_path(&data, DOMAIN, &user);
                std::fs::write(&path, &file)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        })
        .await
        .context("the account writer failed")?;
        written?;
        let accounts_secs = started.elapsed().as_secs_f64();
        let config = settings.config();
        std::fs::write(&config, config_lua(&settings))
            .with_context(|| format!("writing {}", config.display()))?;
        let console = settings.dir.join("console.log");
        let out = std::fs::File::create(&console)
            .with_context(|| format!("creating {}", console.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(&binary)
            .arg("--config")
            .arg(&config)
            .arg("-F")
            .current_dir(&settings.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // its own process group: the terminal's ctrl-c must not stop Prosody before the
            // bench has drained and reported
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child
            .id()
            .context("Prosody exited before its pid could be read")?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, settings.port));
        let mut server = Server {
            child,
            pid,
            addr,
            version: None,
            auth,
            nodelay,
            ca: certs.ca,
            devices: (0..u64::from(devices))
                .map(|i| Account {
                    jid: format!("{}@{DOMAIN}", crate::load::user_of(i)),
                    password: password.clone(),
                })
                .collect(),
            senders: (0..senders)
                .map(|k| Account {
                    jid: format!("{}@{DOMAIN}", sender_user(k)),
                    password: password.clone(),
                })
                .collect(),
            accounts_secs,
            log: settings.log(),
            dir,
        };
        if let Err(e) = server.wait_listening(&console).await {
            server.stop().await;
            return Err(e);
        }
        server.version = std::fs::read_to_string(&server.log).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.split("Prosody version ").nth(1))
                .map(|v| v.trim().to_string())
        });
        Ok(server)
    }

    async fn wait_listening(&mut self, console: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "Prosody exited at start ({status}).\n--- {} ---\n{}\n--- {} ---\n{}",
                    console.display(),
                    tail(console, 20),
                    self.log.display(),
                    tail(&self.log, 20)
                );
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "Prosody did not listen on {} within {} s.\n--- {} ---\n{}",
                    self.addr,
                    START_TIMEOUT.as_secs(),
                    self.log.display(),
                    tail(&self.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where the run's files are.
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// Stops Prosody (SIGTERM, so it closes its sessions; SIGKILL after 20 s) and removes the
    /// directory.
    pub async fn stop(mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SIGTERM through kill(1): the workspace forbids unsafe code, so no libc::kill
            let term = Command::new("kill")
                .arg("-TERM")
                .arg(self.pid.to_string())
                .status()
                .await;
            let stopped = match term {
                Ok(s) if s.success() => tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
                    .await
                    .ok(),
                _ => None,
            };
            match stopped {
                Some(Ok(s)) if !s.success() => {
                    eprintln!(
                        "warning: Prosody ended with {s}; last lines of its log:\n{}",
                        tail(&self.log, 10)
                    );
                }
                Some(Ok(_)) => {}
                _ => {
                    eprintln!("warning: Prosody did not stop on SIGTERM: killing it");
                    let _ = self.child.kill().await;
                }
            }
        }
        // `self` drops here: the directory goes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;

    #[test]
    fn lua_strings_escape_everything_but_printable_ascii() {
        assert_eq!(lua_string(b"/tmp/a b"), "\"/tmp/a b\"");
        assert_eq!(lua_string(b"q\"\\"), "\"q\\034\\092\"");
        // a digit after an escape stays a digit
        assert_eq!(lua_string(b"\n1"), "\"\\0101\"");
        assert_eq!(lua_string("é".as_bytes()), "\"\\195\\169\"");
    }

    #[test]
    fn names_are_encoded_like_prosody_datamanager() {
        assert_eq!(path_encode("bu12"), "bu12");
        assert_eq!(path_encode("pg.bench"), "pg%2ebench");
        assert_eq!(path_encode("a_b-c"), "a%5fb%2dc");
        assert_eq!(
            account_path(Path::new("/d"), "localhost", "bu7"),
            PathBuf::from("/d/localhost/accounts/bu7.dat")
        );
    }

    #[test]
    fn plain_account_file() {
        let c = Credentials::new(ProsodyAuth::Plain, "s3cr\"t", b"ignored", 4096);
        assert_eq!(
            c.account_file(),
            "return {\n\t[\"password\"] = \"s3cr\\034t\";\n};\n"
        );
    }

    /// The stored key must verify the client proof of RFC 7677's SCRAM-SHA-256 example, and
    /// the server key must give its server signature: exactly what Prosody checks.
    #[test]
    fn hashed_account_matches_rfc_7677() {
        let salt = STANDARD
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .expect("test vector");
        let c = Credentials::new(ProsodyAuth::Hashed, "pencil", &salt, 4096);
        let Credentials::Hashed {
            stored_key,
            server_key,
            ..
        } = &c
        else {
            panic!("hashed credentials expected");
        };
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,\
            r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,\
            c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let proof = STANDARD
            .decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .expect("test vector");
        let signature =
            pushgate_core::credentials::hmac_sha256(stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        assert_eq!(<[u8; 32]>::from(Sha256::digest(&client_key)), *stored_key);
        let server_signature =
            pushgate_core::credentials::hmac_sha256(server_key, auth_message.as_bytes());
        assert_eq!(
            STANDARD.encode(server_signature),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        let file = c.account_file();
        assert!(file.starts_with("return {\n\t[\"iteration_count\"] = 4096;\n\t[\"salt\"] = \""));
        assert!(file.contains(&format!("[\"stored_key\"] = \"{}\";", hex(stored_key))));
        assert!(file.contains(&format!("[\"server_key\"] = \"{}\";", hex(server_key))));
        assert!(file.ends_with("};\n"));
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
    }

    #[test]
    fn config_has_what_the_run_needs() {
        let s = Settings {
            dir: PathBuf::from("/tmp/pb x"),
            port: 15222,
            auth: ProsodyAuth::Hashed,
            run_as_root: true,
            nodelay: false,
        };
        let c = config_lua(&s);
        for want in [
            "run_as_root = true\n",
            "pidfile = \"/tmp/pb x/prosody.pid\"\n",
            "data_path = \"/tmp/pb x/data\"\n",
            "log = { info = \"/tmp/pb x/prosody.log\" }\n",
            "c2s_ports = { 15222 }\n",
            "c2s_interfaces = { \"127.0.0.1\" }\n",
            "c2s_require_encryption = true\n",
            "authentication = \"internal_hashed\"\n",
            "password_hash = \"SHA-256\"\n",
            "storage = \"internal\"\n",
            "ssl = { certificate = \"/tmp/pb x/tls/server.pem\"; key = \"/tmp/pb x/tls/server.key\" }\n",
            "\"smacks\"",
            "\"ping\"",
            "modules_disabled = { \"s2s\"; \"s2s_auth_certs\"; \"offline\" }\n",
        ] {
            assert!(c.contains(want), "{want:?} missing from\n{c}");
        }
        assert!(c.trim_end().ends_with("VirtualHost \"localhost\""));
        assert!(!c.contains("carbons") && !c.contains("mam") && !c.contains("nagle"));
        let plain = config_lua(&Settings {
            auth: ProsodyAuth::Plain,
            run_as_root: false,
            nodelay: true,
            ..s
        });
        assert!(plain.contains("authentication = \"internal_plain\"\n"));
        assert!(plain.contains("network_settings = { nagle = false }\n"));
        assert!(!plain.contains("password_hash") && !plain.contains("run_as_root"));
    }
}
