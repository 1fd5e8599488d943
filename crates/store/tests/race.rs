//! The promise the status machine makes under concurrency, against a real Redis: a device
//! receipt and the expiry clock racing for the same message have exactly one winner.

use pushgate_core::{Message, Status};
use pushgate_store::{Change, Store, Transition};

fn redis_url() -> String {
    std::env::var("PUSHGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn message(id: &str, now: i64) -> (Message, Status, String) {
    let m = Message {
        id: id.to_string(),
        app_id: "app_0123456789abcdef0123456789".into(),
        user_id: Some("u".into()),
        device_id: None,
        phone: None,
        foreign_id: None,
        text: "t".into(),
        title: None,
        data: None,
        priority: Default::default(),
        collapse_key: None,
        sms_fallback: None,
        send_at: None,
        created_at: now - 10_000,
        pos: 0,
        // already due: the clock may expire it at once
        expires_at: now - 1,
    };
    let ev = format!(
        r#"{{"app_id":"{}","seq":1,"event":{{"id":"{id}.1","event":"enqueued","at":"x"}}}}"#,
        m.app_id
    );
    (m, Status::Enqueued, ev)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_and_expiry_never_both_win() -> Result<(), Box<dyn std::error::Error>> {
    let ns = format!("r{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let store = Store::connect(&redis_url(), &ns).await?;
    let mut delivered = 0;
    let mut expired = 0;
    for i in 0..300 {
        let id = uuid::Uuid::now_v7().to_string();
        let now = pushgate_core::time::now_ms();
        store.create_messages(&[message(&id, now)]).await?;
        let (a, b) = (store.clone(), store.clone());
        let id2 = id.clone();
        // both sides wait at the barrier and then go at once; who reaches Redis first varies
        let gate = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let (ga, gb) = (gate.clone(), gate);
        let head_start = i % 2 == 0;
        let receipt = tokio::spawn(async move {
            ga.wait().await;
            if head_start {
                tokio::task::yield_now().await;
            }
            let ch = Change {
                message_id: &id2,
                to: Some(Status::Delivered),
                channel: Some("xmpp"),
                device_id: Some("d"),
                ..Default::default()
            };
            a.change(&ch, pushgate_core::time::now_ms()).await
        });
        let clock = tokio::spawn(async move {
            gb.wait().await;
            if !head_start {
                tokio::task::yield_now().await;
            }
            b.expire_due(pushgate_core::time::now_ms(), 1000).await
        });
        let receipt = receipt.await??;
        let expired_events = clock.await??;
        let receipt_won = matches!(receipt, Transition::Applied(_));
        let expiry_won = expired_events.iter().any(|e| e.contains(&id));
        assert!(
            receipt_won != expiry_won,
            "exactly one must win for {id}: receipt {receipt:?}, expiry {expiry_won}"
        );
        let state = store.message_state(&id).await?.ok_or("message vanished")?;
        let statuses: Vec<Status> = state.history.iter().map(|h| h.status).collect();
        assert!(
            !(statuses.contains(&Status::Delivered) && statuses.contains(&Status::Expired)),
            "{statuses:?}"
        );
        if receipt_won {
            delivered += 1;
        } else {
            expired += 1;
        }
    }
    store.delete_namespace().await?;
    println!("receipt won {delivered} times, expiry {expired} times");
    // both outcomes occur, so the race was real
    assert!(
        delivered > 0 && expired > 0,
        "the race never went both ways"
    );
    Ok(())
}
