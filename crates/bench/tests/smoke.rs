//! The bench end to end at a tiny scale: the in-process suite on the real NATS and Redis,
//! a few devices, a second login of every session (`--relogin`), and a reconciliation that
//! must come out clean. It checks the bench's own bookkeeping, not speed: the figures a run
//! prints are only worth recording if this passes.

use std::process::Command;

#[test]
fn small_run_with_relogin_reconciles() {
    let out = std::env::temp_dir().join(format!(
        "pushgate-bench-smoke-{}-{}.json",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let run = Command::new(env!("CARGO_BIN_EXE_pushgate-bench"))
        .args([
            "--devices",
            "12",
            "--rate",
            "20",
            "--duration",
            "2",
            "--relogin",
            "--drain-timeout",
            "60",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("the bench binary runs");
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "bench failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    let text = std::fs::read_to_string(&out).expect("the bench wrote its JSON result");
    let _ = std::fs::remove_file(&out);
    let v: serde_json::Value = serde_json::from_str(&text).expect("the result is JSON");

    assert_eq!(v["config"]["relogin"], true);
    assert_eq!(v["sessions"]["bound"], 12, "{text}");
    let relogin = &v["sessions"]["relogin"];
    assert_eq!(
        relogin["bound"], 12,
        "every session logged in again: {text}"
    );
    assert_eq!(relogin["failures"], 0, "{text}");
    assert_eq!(relogin["login_time"]["count"], 12, "{text}");
    assert!(
        relogin["ended_unix_ms"].as_u64() >= relogin["started_unix_ms"].as_u64(),
        "{text}"
    );
    // the sessions that carried the load are the second logins: what was sent reached them
    let rec = &v["reconciliation"];
    assert_eq!(rec["ok"], true, "{text}");
    assert!(rec["accepted"].as_u64() > Some(0), "{text}");
    assert_eq!(rec["missing_at_device"], 0, "{text}");
    assert_eq!(rec["duplicated_at_device"], 0, "{text}");
    assert_eq!(v["sessions"]["dropped"], 0, "{text}");
    assert_eq!(v["errors"].as_object().map(|e| e.len()), Some(0), "{text}");
}
