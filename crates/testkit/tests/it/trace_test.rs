//! One message is one trace: the spans of every hop, from the backend's request to the webhook
//! POST that reports the delivery, arrive at an OTLP receiver under the backend's trace id,
//! each parented where the design says (docs/operations.md, "Tracing").
//!
//! The receiver is a real OTLP/gRPC `TraceService` in this process; the process's telemetry is
//! initialised once (it is global) with `otlp_endpoint` pointing at it. Other tests of this
//! binary export their spans to it too, so everything here is filtered by this test's own trace
//! id, which the test chooses by sending a `traceparent` header like any traced backend would.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use pushgate_runtime::config::TelemetrySettings;
use pushgate_runtime::telemetry::{self, spans, InitOptions};
use pushgate_testkit::device::TestDevice;
use pushgate_testkit::webhook::Receiver;
use pushgate_testkit::TestEnv;
use serde_json::{json, Value};

/// One exported span, ids in lowercase hex.
#[derive(Debug, Clone)]
struct Collected {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    /// `(trace id, span id)` of each link.
    links: Vec<(String, String)>,
}

/// The OTLP receiver: keeps every span it is sent.
struct Sink {
    spans: Arc<Mutex<Vec<Collected>>>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let got: Vec<Collected> = req
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .map(|s| Collected {
                name: s.name,
                trace_id: hex::encode(&s.trace_id),
                span_id: hex::encode(&s.span_id),
                parent: hex::encode(&s.parent_span_id),
                links: s
                    .links
                    .iter()
                    .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                    .collect(),
            })
            .collect();
        if let Ok(mut all) = self.spans.lock() {
            all.extend(got);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The receiver and the process's telemetry, alive for the rest of the test binary. They run
/// on a runtime of their own: each test's runtime ends with its test, and the exporter's
/// connection and the receiver must outlive any one test.
struct Collector {
    spans: Arc<Mutex<Vec<Collected>>>,
    _runtime: tokio::runtime::Runtime,
    _telemetry: telemetry::Guard,
}

impl Collector {
    /// The spans of one trace so far.
    fn trace(&self, trace_id: &str) -> Vec<Collected> {
        self.spans
            .lock()
            .map(|all| {
                all.iter()
                    .filter(|s| s.trace_id == trace_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the trace's spans satisfy `done` (generous deadline; no timing claim: the
    /// batch exporter sends every 100 ms). On failure, shows what did arrive.
    async fn wait_for(
        &self,
        trace_id: &str,
        done: impl Fn(&[Collected]) -> bool,
    ) -> anyhow::Result<Vec<Collected>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.trace(trace_id);
            if done(&spans) {
                return Ok(spans);
            }
            if tokio::time::Instant::now() > deadline {
                let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
                bail!("trace {trace_id} is incomplete; spans received: {names:?}\n{spans:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Starts the receiver and initialises telemetry against it (on a plain thread, so building
/// and, on failure, dropping the runtime never happens inside a test's runtime).
fn start_collector() -> Result<Collector, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("collector runtime: {e}"))?;
    let spans = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink {
        spans: spans.clone(),
    };
    let guard = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("collector listener: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("collector address: {e}"))?;
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(sink))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
            if let Err(e) = served {
                eprintln!("OTLP test receiver stopped: {e}");
            }
        });
        let settings = TelemetrySettings {
            otlp_endpoint: Some(format!("http://{addr}")),
            service_name: "pushgate-trace-test".into(),
            log: "info".into(),
            ..TelemetrySettings::default()
        };
        telemetry::init_with(
            &settings,
            InitOptions {
                export_delay: Some(Duration::from_millis(100)),
                logs: false,
            },
        )
        .map_err(|e| e.to_string())
    })?;
    if !telemetry::exporting() {
        return Err("another tracing subscriber was installed first".into());
    }
    Ok(Collector {
        spans,
        _runtime: runtime,
        _telemetry: guard,
    })
}

/// The process-wide collector, started by the first test that needs it.
fn collector() -> anyhow::Result<&'static Collector> {
    static COLLECTOR: OnceLock<Result<Collector, String>> = OnceLock::new();
    let c = COLLECTOR.get_or_init(|| {
        std::thread::spawn(start_collector)
            .join()
            .unwrap_or_else(|_| Err("collector start panicked".into()))
    });
    match c {
        Ok(c) => Ok(c),
        Err(e) => bail!("cannot start the OTLP receiver: {e}"),
    }
}

/// The one span named `name`, or an error listing the trace.
fn one<'a>(spans: &'a [Collected], name: &str) -> anyhow::Result<&'a Collected> {
    let found: Vec<&Collected> = spans.iter().filter(|s| s.name == name).collect();
    match found.as_slice() {
        [s] => Ok(s),
        _ => bail!("expected one {name} span, got {}: {spans:#?}", found.len()),
    }
}

/// Waits until the device's session is in the presence record, so the router hands the
/// message over to the edge (rather than the session finding it in its pending queue).
async fn wait_online(env: &TestEnv, app: &str, device: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while env.store.presence(app, device).await?.is_none() {
        if tokio::time::Instant::now() > deadline {
            bail!("device {device} never became online");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn one_message_is_one_trace_from_the_request_to_the_webhook() -> anyhow::Result<()> {
    let collector = collector()?;
    let env = TestEnv::start().await?;
    let hook = Receiver::start().await?;
    let (app, key) = env.create_app(Some(&hook.url)).await?;
    let (jid, password) = env
        .register_device(&key, "tracy", "phone-1", json!({"platform": "xmpp"}))
        .await?;
    let mut dev = TestDevice::connect(env.xmpp_addr(), &jid, &password).await?;
    wait_online(&env, &app, "phone-1").await?;

    // the backend's own trace: Pushgate must continue it
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    let r = env
        .http
        .post(format!("{}/v1/messages", env.api))
        .bearer_auth(&key)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({"recipients": [{"user_id": "tracy"}], "text": "traced"}))
        .send()
        .await?;
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await?;
    let id = body["messages"][0]["id"]
        .as_str()
        .context("no message id")?
        .to_string();

    // the acceptance context is stored with the message, in the caller's trace
    let stored = env
        .store
        .message_trace(&id)
        .await?
        .context("no trace stored with the message")?;
    let prefix = format!("00-{trace_id}-");
    assert!(stored.starts_with(&prefix), "stored trace {stored}");
    let accept_span_id = stored[prefix.len()..]
        .split('-')
        .next()
        .unwrap_or_default()
        .to_string();

    let m = dev.next_message().await?;
    assert_eq!(m.id, id);
    env.wait_status(&key, &id, "sent").await?;
    dev.ack_received(&id).await?;
    env.wait_status(&key, &id, "delivered").await?;
    hook.wait_for("the delivered event", |ev| {
        ev.iter()
            .any(|e| e["message_id"] == id && e["event"] == "delivered")
    })
    .await?;

    let wanted = [
        spans::INGRESS_REQUEST,
        spans::INGRESS_ACCEPT,
        spans::ROUTER_HANDLE,
        spans::EDGE_DELIVER,
        spans::EDGE_WRITE,
        spans::EDGE_RECEIPT,
    ];
    // the POST that carried the `delivered` event: its span continues the receipt's trace
    // (parent when `delivered` is its first event, else a link)
    let reports_receipt = |all: &[Collected], s: &Collected| {
        all.iter()
            .filter(|r| r.name == spans::EDGE_RECEIPT)
            .any(|r| {
                s.parent == r.span_id
                    || s.links
                        .iter()
                        .any(|(t, sp)| *t == r.trace_id && *sp == r.span_id)
            })
    };
    let trace = collector
        .wait_for(&trace_id, |all| {
            wanted.iter().all(|n| all.iter().any(|s| s.name == *n))
                && all
                    .iter()
                    .any(|s| s.name == spans::WEBHOOK_DELIVER && reports_receipt(all, s))
        })
        .await?;

    // the tree: caller → request → accept → router → edge hand-over; the later work on the
    // message hangs off the acceptance span through the stored trace
    let request = one(&trace, spans::INGRESS_REQUEST)?;
    assert_eq!(request.parent, caller_span);
    let accept = one(&trace, spans::INGRESS_ACCEPT)?;
    assert_eq!(accept.parent, request.span_id);
    assert_eq!(accept.span_id, accept_span_id);
    let router = trace
        .iter()
        .find(|s| s.name == spans::ROUTER_HANDLE && s.parent == accept.span_id)
        .context("no router.handle span under ingress.accept")?;
    assert!(
        trace
            .iter()
            .any(|s| s.name == spans::EDGE_DELIVER && s.parent == router.span_id),
        "no edge.deliver span under router.handle: {trace:#?}"
    );
    assert_eq!(one(&trace, spans::EDGE_WRITE)?.parent, accept.span_id);
    assert_eq!(one(&trace, spans::EDGE_RECEIPT)?.parent, accept.span_id);
    assert!(
        trace
            .iter()
            .any(|s| s.name == spans::WEBHOOK_DELIVER && reports_receipt(&trace, s)),
        "no webhook.deliver span for the receipt: {trace:#?}"
    );

    env.stop().await;
    Ok(())
}
