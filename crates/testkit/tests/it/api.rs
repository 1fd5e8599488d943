//! The API's answers to bad input and its isolation between apps.

use pushgate_testkit::TestEnv;
use serde_json::{json, Value};

async fn problem(r: reqwest::Response) -> (u16, String, Value) {
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, ct, r.json().await.unwrap_or(Value::Null))
}

/// A body larger than `max_body_bytes` is refused after about the limit has been read, not
/// after all of it: the body here would be 512 MiB (produced lazily, as a backend streaming a
/// huge upload would), and the answer must come while the client has produced only a small
/// part of it. Reading it whole first would hold it all in memory, for any key holder.
#[tokio::test]
async fn an_oversized_message_body_is_refused_before_it_is_read_whole() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const CHUNK: usize = 64 * 1024;
    const TOTAL: usize = 512 * 1024 * 1024;
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let produced = Arc::new(AtomicUsize::new(0));
    let counter = produced.clone();
    let chunks = futures::stream::unfold(0usize, move |sent| {
        let counter = counter.clone();
        async move {
            if sent >= TOTAL {
                return None;
            }
            counter.fetch_add(CHUNK, Ordering::Relaxed);
            Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; CHUNK])),
                sent + CHUNK,
            ))
        }
    });
    let r = env
        .http
        .post(format!("{}/v1/messages", env.api))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await?;
    let (s, _, p) = problem(r).await;
    assert_eq!(s, 413, "{p}");
    assert_eq!(p["type"], "urn:pushgate:problem:payload-too-large");
    // the limit (1 MiB) plus what transport buffers and flow-control windows hold in between
    let read = produced.load(Ordering::Relaxed);
    assert!(
        read < 64 * 1024 * 1024,
        "the client had produced {read} bytes when the 413 came"
    );
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_specific_problems() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    env.register_device(&key, "u1", "d1", json!({"platform": "xmpp"}))
        .await?;
    let url = format!("{}/v1/messages", env.api);

    // wrong key
    let r = env
        .http
        .post(&url)
        .bearer_auth("pk_nope")
        .json(&json!({}))
        .send()
        .await?;
    let (s, ct, p) = problem(r).await;
    assert_eq!((s, ct.as_str()), (401, "application/problem+json"));
    assert_eq!(p["type"], "urn:pushgate:problem:unauthorized");

    // unknown user
    let r = env
        .http
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"recipients": [{"user_id": "ghost"}], "text": "x"}))
        .send()
        .await?;
    let (s, _, p) = problem(r).await;
    assert_eq!(s, 422, "{p}");
    assert_eq!(p["type"], "urn:pushgate:problem:unknown-user");
    assert_eq!(p["field"], "recipients[0].user_id");

    // malformed JSON names where
    let r = env
        .http
        .post(&url)
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(r#"{"recipients": [{"user_id": 5}], "text": "x"}"#)
        .send()
        .await?;
    let (s, _, p) = problem(r).await;
    assert_eq!(s, 400, "{p}");
    assert_eq!(p["type"], "urn:pushgate:problem:malformed-json");
    assert_eq!(p["field"], "recipients[0].user_id");

    // invalid field value
    let r = env
        .http
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"recipients": [{"user_id": "u1"}], "text": "x", "ttl": 0}))
        .send()
        .await?;
    let (s, _, p) = problem(r).await;
    assert_eq!((s, p["field"].as_str()), (400, Some("ttl")), "{p}");

    // unknown field
    let r = env
        .http
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"recipients": [{"user_id": "u1"}], "text": "x", "colour": 1}))
        .send()
        .await?;
    let (s, _, p) = problem(r).await;
    assert_eq!(s, 400, "{p}");
    assert!(p["detail"].as_str().unwrap_or("").contains("colour"), "{p}");

    // oversized body
    let big = "x".repeat(2 * 1024 * 1024);
    let r = env
        .http
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"recipients": [{"user_id": "u1"}], "text": big}))
        .send()
        .await?;
    let (s, _, p) = problem(r).await;
    assert_eq!(s, 413, "{p}");
    assert_eq!(p["type"], "urn:pushgate:problem:payload-too-large");

    // too long a text inside the limit
    let r = env
        .http
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"recipients": [{"user_id": "u1"}], "text": "y".repeat(5000)}))
        .send()
        .await?;
    let (s, _, p) = problem(r).await;
    assert_eq!((s, p["field"].as_str()), (400, Some("text")), "{p}");
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn apps_cannot_see_each_other_and_idempotency_holds() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_a, key_a) = env.create_app(None).await?;
    let (_b, key_b) = env.create_app(None).await?;
    env.register_device(&key_a, "u", "d", json!({"platform": "xmpp"}))
        .await?;
    let body = json!({"recipients": [{"user_id": "u"}], "text": "hello"});
    let url = format!("{}/v1/messages", env.api);
    let send = |k: &str| {
        env.http
            .post(&url)
            .bearer_auth(k)
            .header("idempotency-key", "k-1")
            .json(&body)
            .send()
    };
    let r1: Value = send(&key_a).await?.json().await?;
    let r2: Value = send(&key_a).await?.json().await?;
    assert_eq!(r1, r2, "same key and body → same answer");
    let r3 = env
        .http
        .post(&url)
        .bearer_auth(&key_a)
        .header("idempotency-key", "k-1")
        .json(&json!({"recipients": [{"user_id": "u"}], "text": "other"}))
        .send()
        .await?;
    assert_eq!(r3.status(), 409);
    let id = r1["messages"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (s, _) = env.message(&key_b, &id).await?;
    assert_eq!(s, 404, "another app's message must look missing");
    let (s, _) = env.message(&key_a, &id).await?;
    assert_eq!(s, 200);
    let r = env
        .http
        .get(format!("{}/v1/users/u/devices", env.api))
        .bearer_auth(&key_b)
        .send()
        .await?;
    let v: Value = r.json().await?;
    assert_eq!(v["devices"], json!([]));
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn oversized_headers_get_a_problem_not_a_dropped_connection() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let (_app, key) = env.create_app(None).await?;
    let r = env
        .http
        .get(format!("{}/v1/users/u/devices", env.api))
        .bearer_auth(&key)
        .header("x-padding", "p".repeat(20_000))
        .send()
        .await?;
    let (s, ct, p) = problem(r).await;
    assert_eq!((s, ct.as_str()), (431, "application/problem+json"), "{p}");
    assert_eq!(p["type"], "urn:pushgate:problem:headers-too-large");
    assert_eq!(p["field"], "x-padding");
    env.stop().await;
    Ok(())
}
