//! schemathesis (PyPI) against `/v1/openapi.json`: generated requests for every operation must
//! get no server error, and every answer must match the documented status codes, content types
//! and schemas. `scripts/test.sh` installs it and sets `PUSHGATE_PYTHON`.

use std::path::PathBuf;

use pushgate_testkit::{TestEnv, ADMIN_TOKEN};
use serde_json::json;

fn schemathesis() -> PathBuf {
    let py = std::env::var("PUSHGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    PathBuf::from(py).with_file_name("schemathesis")
}

async fn run(env: &TestEnv, token: &str, paths: &str) -> anyhow::Result<()> {
    let ca = pushgate_testkit::certs()?.ca;
    let out = tokio::process::Command::new(schemathesis())
        .arg("run")
        .arg(format!("{}/v1/openapi.json", env.api))
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
        .args(["--max-examples", "25", "--seed", "7", "--workers", "1", "--no-color"])
        .args(["--include-path-regex", paths])
        .arg("--tls-verify")
        .arg(&ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e} (run scripts/test.sh to install it)", schemathesis().display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found problems on {paths}:\n{stdout}\n{stderr}"
    );
    // the summary must show that operations were really exercised ("Tested: N", N > 0)
    let tested = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Tested:")
                .map(|n| n.trim().parse::<u32>().unwrap_or(0))
        })
        .unwrap_or(0);
    assert!(tested > 0, "schemathesis ran nothing on {paths}:\n{stdout}");
    eprintln!("{stdout}");
    Ok(())
}

#[tokio::test]
async fn openapi_document_holds_under_generated_requests() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    env.register_device(&key, "u1", "d1", json!({"platform": "xmpp"}))
        .await?;
    let doc: serde_json::Value = env
        .http
        .get(format!("{}/v1/openapi.json", env.api))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(doc["openapi"], "3.1.0");
    run(&env, &key, "^/v1/(messages|users)").await?;
    run(&env, ADMIN_TOKEN, "^/v1/apps").await?;
    env.stop().await;
    Ok(())
}
