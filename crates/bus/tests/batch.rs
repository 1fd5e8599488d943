//! Group-committed publishes against the NATS (JetStream) on this machine
//! (`PUSHGATE_TEST_NATS_URL`, default `nats://127.0.0.1:4222`); each test has its own
//! namespace and deletes it.

use std::time::Duration;

use futures::StreamExt;
use pushgate_bus::async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use pushgate_bus::{batch, Bus, StreamKind};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn bus() -> Result<Bus, Box<dyn std::error::Error + Send + Sync>> {
    let url =
        std::env::var("PUSHGATE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let ns = format!("bb{}", &uuid_like());
    Ok(Bus::connect(&url, &ns).await?)
}

fn uuid_like() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("{n:016x}")
}

/// Every stream message of `subject`, as (is a batch, its items).
async fn stream_items(
    bus: &Bus,
    subject: String,
) -> Result<Vec<(bool, Vec<String>)>, Box<dyn std::error::Error + Send + Sync>> {
    let stream = bus
        .jetstream()
        .get_stream(bus.names().stream(StreamKind::Events))
        .await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subject,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let total = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    while (out.len() as u64) < total {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await?
            .ok_or("stream ended")??;
        let items = batch::items(msg.headers.as_ref(), &msg.payload)
            .iter()
            .map(|i| String::from_utf8_lossy(i.payload).into_owned())
            .collect();
        out.push((batch::batch_len(msg.headers.as_ref()).is_some(), items));
    }
    Ok(out)
}

/// Items queued while a publish is in flight go out together, in order, as few stream
/// messages; each caller's future resolves once its item is stored. A lone item afterwards is
/// published at once as a plain message, as before batching.
#[tokio::test]
async fn queued_items_are_published_together_in_order() -> TestResult {
    let bus = bus().await?;
    let subject = bus.names().events("app_batch");
    // all queued before the (single-threaded) runtime lets the subject's task run
    let acks: Vec<_> = (0..300)
        .map(|i| {
            bus.enqueue_batched(
                subject.clone(),
                &format!("m{i}.1"),
                format!("{{\"n\":{i}}}").into_bytes().into(),
            )
        })
        .collect();
    for ack in acks {
        ack.await?;
    }
    bus.enqueue_batched(subject.clone(), "last.1", b"{\"n\":300}".to_vec().into())
        .await?;

    let messages = stream_items(&bus, subject).await?;
    let sizes: Vec<usize> = messages.iter().map(|(_, items)| items.len()).collect();
    assert_eq!(sizes, [batch::MAX_ITEMS, batch::MAX_ITEMS, 44, 1]);
    let kinds: Vec<bool> = messages.iter().map(|(b, _)| *b).collect();
    assert_eq!(kinds, [true, true, true, false]);
    let all: Vec<String> = messages.into_iter().flat_map(|(_, items)| items).collect();
    let want: Vec<String> = (0..=300).map(|i| format!("{{\"n\":{i}}}")).collect();
    assert_eq!(all, want);

    bus.delete_namespace().await?;
    Ok(())
}

/// The very same batch published twice (a republish within the duplicate window) is stored
/// once; a batch with other contents is not mistaken for it.
#[tokio::test]
async fn a_republished_batch_is_dropped_as_a_duplicate() -> TestResult {
    let bus = bus().await?;
    let subject = bus.names().events("app_dup");
    for round in 0..3 {
        let ids: Vec<String> = if round < 2 {
            vec!["a.1".into(), "b.1".into()]
        } else {
            vec!["a.1".into(), "c.1".into()]
        };
        let mut headers = pushgate_bus::async_nats::HeaderMap::new();
        headers.insert(batch::BATCH_HEADER, "2");
        let publish = pushgate_bus::async_nats::jetstream::message::PublishMessage::build()
            .payload(ids.join("\n").into_bytes().into())
            .headers(headers)
            .message_id(batch::batch_id(ids.iter().map(String::as_str)));
        bus.jetstream()
            .send_publish(subject.clone(), publish)
            .await?
            .await?;
    }
    let messages = stream_items(&bus, subject).await?;
    let items: Vec<Vec<String>> = messages.into_iter().map(|(_, i)| i).collect();
    assert_eq!(items, [vec!["a.1", "b.1"], vec!["a.1", "c.1"]]);
    bus.delete_namespace().await?;
    Ok(())
}
