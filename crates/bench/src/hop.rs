//! `--jetstream-hop N`: how fast this machine carries one persisted JetStream hop.
//!
//! The pipeline's figures depend on the machine far more than on run-to-run noise: the same
//! build and command measured 4,936–5,086 msg/s on one session's 2-core machine and
//! 2,031–2,803 msg/s on another's (docs/benchmarks.md). Issue 8 states its targets against a
//! yardstick, "one persisted JetStream hop (publish, pull, ack) saturates both cores here at
//! about 79,000 msg/s", so a run can record a yardstick of that kind next to its figures, taken
//! on the same machine: a publisher keeps `WINDOW` acknowledged publishes in flight into a fresh
//! file-backed stream while a pull consumer fetches and acks every message, both in this
//! process, with nats-server on the same box. (How the figure was taken is not written
//! down, so comparing with it is approximate; comparing runs of this mode is not.) Nothing of Pushgate runs; the figure is the
//! machine's (and nats-server's), not the product's.

use std::time::Instant;

use anyhow::{bail, Context};
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;

use crate::system::CpuWatch;

/// Publishes awaiting their ack at most (about what the suite's batcher keeps in flight per
/// subject under load, times a few subjects).
const WINDOW: usize = 256;
/// Size of each message: about one status event's JSON.
const MESSAGE_BYTES: usize = 300;
/// Messages asked for per pull request (the consumer keeps pulls in flight).
const FETCH: usize = 256;

/// What one hop run measured.
#[derive(Debug, serde::Serialize)]
pub struct HopResult {
    /// The stream it used (deleted at the end).
    pub stream: String,
    pub messages: u64,
    pub message_bytes: usize,
    pub secs: f64,
    /// Messages published, pulled and acked per second (first publish to last ack).
    pub per_sec: f64,
    pub cpu: crate::system::CpuUse,
}

/// Runs the hop for `n` messages against the NATS server at `url` and prints the result.
pub async fn run(url: &str, n: u64, watch: &[u32]) -> anyhow::Result<HopResult> {
    if n == 0 {
        bail!("--jetstream-hop needs at least one message");
    }
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    let js = jetstream::new(client);
    let name = format!(
        "yardstick{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the yardstick stream")?;
    let result = measure(&js, &stream, &name, n, watch).await;
    // the stream is removed whatever happened, so repeated runs leave nothing behind
    if let Err(e) = js.delete_stream(&name).await {
        eprintln!("pushgate-bench: could not delete stream {name}: {e}");
    }
    let r = result?;
    println!(
        "jetstream hop: {} messages of {} bytes published, pulled and acked in {:.1} s: {:.0} msg/s",
        r.messages, r.message_bytes, r.secs, r.per_sec
    );
    println!("  CPU {}", r.cpu.describe());
    Ok(r)
}

async fn measure(
    js: &jetstream::Context,
    stream: &stream::Stream,
    name: &str,
    n: u64,
    watch: &[u32],
) -> anyhow::Result<HopResult> {
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("hop".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .context("creating the yardstick consumer")?;
    let body = bytes::Bytes::from(vec![b'x'; MESSAGE_BYTES]);
    let subject = format!("{name}.m");
    let cpu = CpuWatch::start(watch);
    let started = Instant::now();

    let publisher = {
        let js = js.clone();
        async move {
            let mut acks = futures::stream::FuturesOrdered::new();
            let ack_of = |fut: jetstream::context::PublishAckFuture| async move { fut.await };
            for _ in 0..n {
                let fut = js
                    .publish(subject.clone(), body.clone())
                    .await
                    .context("publishing")?;
                acks.push_back(ack_of(fut));
                if acks.len() >= WINDOW {
                    if let Some(ack) = acks.next().await {
                        ack.map_err(|e| anyhow::anyhow!("a publish was not acknowledged: {e}"))?;
                    }
                }
            }
            while let Some(ack) = acks.next().await {
                ack.map_err(|e| anyhow::anyhow!("a publish was not acknowledged: {e}"))?;
            }
            anyhow::Ok(())
        }
    };
    let puller = async {
        let mut got = 0u64;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(FETCH)
            .messages()
            .await
            .context("pulling")?;
        while got < n {
            let Some(m) = messages.next().await else {
                bail!("the pull subscription ended after {got} messages");
            };
            let m = m.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
            m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
            got += 1;
        }
        anyhow::Ok(())
    };
    tokio::try_join!(publisher, puller)?;
    let secs = started.elapsed().as_secs_f64();
    Ok(HopResult {
        stream: name.to_string(),
        messages: n,
        message_bytes: MESSAGE_BYTES,
        secs,
        per_sec: n as f64 / secs,
        cpu: cpu.finish(secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the local NATS: every message is published, pulled and acked (the puller only
    /// stops when it has them all), and the stream is gone afterwards, so repeated yardstick
    /// runs leave nothing on a shared server.
    #[tokio::test]
    async fn carries_every_message_and_removes_its_stream() -> anyhow::Result<()> {
        let url = pushgate_testkit::nats_url();
        let r = run(&url, 2_000, &[]).await?;
        assert_eq!(r.messages, 2_000);
        assert!(r.stream.starts_with("yardstick"));
        let js = jetstream::new(async_nats::connect(&url).await?);
        assert!(
            js.get_stream(&r.stream).await.is_err(),
            "stream {} left behind",
            r.stream
        );
        Ok(())
    }

    #[tokio::test]
    async fn refuses_zero_messages() {
        assert!(run(&pushgate_testkit::nats_url(), 0, &[]).await.is_err());
    }
}
