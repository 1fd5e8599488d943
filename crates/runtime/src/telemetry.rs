//! Logging and tracing setup, and the helpers that make one message one trace.
//!
//! Logs are JSON lines by default. Spans always carry OpenTelemetry context (even without an
//! exporter) so trace ids travel in NATS headers and gRPC metadata; with
//! `otlp_endpoint` set they are exported over OTLP/gRPC.
//!
//! How a message stays one trace (docs/operations.md, "Tracing"):
//! - the ingress request span continues the caller's `traceparent` ([`http_span`]);
//! - every bus publish carries the current span's context in NATS headers and every consumer
//!   continues it (`pushgate_bus::trace`);
//! - the acceptance span's `traceparent` is stored with the message (`trace` in the message
//!   hash), so work that happens later and outside any request — the stanza write on a
//!   device's session, the device's receipt — continues the message's trace
//!   ([`continue_message_trace`]);
//! - a webhook POST carries events of many messages: its span continues the first event's
//!   trace and links the others ([`parent_and_links`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use pushgate_store::Store;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::TelemetrySettings;
use crate::metrics::{HttpLabels, Metrics};

/// Every span name Pushgate's services use, declared once so that dashboards, trace queries
/// and the trace test (crates/testkit/tests/it/trace_test.rs) agree with the code. The path of
/// one message: `ingress.request` (or `ingress.grpc`) → `ingress.accept` → `router.handle` →
/// `edge.deliver` (hand-over) / `bridge.handle` (native push) / `sms.handle`; then, parented to
/// `ingress.accept` through the stored trace, `edge.write` (stanza written, `sent`) and
/// `edge.receipt` (device confirmed, `delivered`); finally `webhook.deliver`.
pub mod spans {
    /// One REST request to the ingress API; continues the caller's `traceparent` header.
    pub const INGRESS_REQUEST: &str = "ingress.request";
    /// One gRPC call to the ingress API; continues the caller's `traceparent` metadata.
    pub const INGRESS_GRPC: &str = "ingress.grpc";
    /// Accepting messages (validation, the Redis commit point, the first publishes). Its
    /// context is stored with each message it accepts.
    pub const INGRESS_ACCEPT: &str = "ingress.accept";
    /// A router handling one command from the `router` consumer.
    pub const ROUTER_HANDLE: &str = "router.handle";
    /// An edge taking a router's hand-over (core NATS request) for a live session.
    pub const EDGE_DELIVER: &str = "edge.deliver";
    /// An edge writing a message stanza to a device's session (the `sent` transition).
    pub const EDGE_WRITE: &str = "edge.write";
    /// A device confirming a message (XEP-0184 receipt or XEP-0198 ack: `delivered`).
    pub const EDGE_RECEIPT: &str = "edge.receipt";
    /// The native push bridge handling one request from the `bridge` consumer.
    pub const BRIDGE_HANDLE: &str = "bridge.handle";
    /// sms-fallback handling one request from the `sms` consumer.
    pub const SMS_HANDLE: &str = "sms.handle";
    /// One webhook batch POST (each retry is a span of its own).
    pub const WEBHOOK_DELIVER: &str = "webhook.deliver";

    /// All of them, for documentation checks and tests.
    pub const ALL: [&str; 10] = [
        INGRESS_REQUEST,
        INGRESS_GRPC,
        INGRESS_ACCEPT,
        ROUTER_HANDLE,
        EDGE_DELIVER,
        EDGE_WRITE,
        EDGE_RECEIPT,
        BRIDGE_HANDLE,
        SMS_HANDLE,
        WEBHOOK_DELIVER,
    ];
}

/// Whether spans leave the process. Continuing a message's stored trace costs a Redis read,
/// which is only worth paying when someone can see the result.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Keeps the tracer provider alive; flushes spans when dropped.
pub struct Guard {
    provider: SdkTracerProvider,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {0:?}: {1}")]
    Filter(String, String),
    #[error("cannot build the OTLP exporter for {0}: {1}")]
    Exporter(String, String),
}

/// What [`init_with`] lets a caller choose beyond the settings. Deployments use the defaults
/// ([`init`]); tests need spans promptly and logs out of their output.
pub struct InitOptions {
    /// How long finished spans wait before they are exported in a batch. `None`: the SDK's
    /// default (`OTEL_BSP_SCHEDULE_DELAY`, else 5 s).
    pub export_delay: Option<Duration>,
    /// Whether log lines are written (to stdout). Tests that only need spans turn them off,
    /// since a global subscriber would otherwise fill every other test's output.
    pub logs: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            export_delay: None,
            logs: true,
        }
    }
}

/// Builds the tracer provider (with an OTLP exporter when configured).
pub fn tracer_provider(s: &TelemetrySettings) -> Result<SdkTracerProvider, TelemetryError> {
    tracer_provider_with(s, None)
}

/// Like [`tracer_provider`], with the batch export delay chosen by the caller. Must run inside
/// a Tokio runtime that outlives the provider: the gRPC channel's connection lives there.
pub fn tracer_provider_with(
    s: &TelemetrySettings,
    export_delay: Option<Duration>,
) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(s.service_name.clone())
        .build();
    let mut b = SdkTracerProvider::builder().with_resource(resource);
    if let Some(ep) = &s.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(ep.clone())
            .build()
            .map_err(|e| TelemetryError::Exporter(ep.clone(), e.to_string()))?;
        let mut config = BatchConfigBuilder::default();
        if let Some(d) = export_delay {
            config = config.with_scheduled_delay(d);
        }
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(config.build())
            .build();
        b = b.with_span_processor(processor);
    }
    Ok(b.build())
}

/// Installs the global subscriber and propagator. Call once per process.
pub fn init(s: &TelemetrySettings) -> Result<Guard, TelemetryError> {
    init_with(s, InitOptions::default())
}

/// Like [`init`], with export delay and log destination chosen by the caller.
pub fn init_with(s: &TelemetrySettings, opts: InitOptions) -> Result<Guard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let provider = tracer_provider_with(s, opts.export_delay)?;
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("pushgate");
    let directive = std::env::var("RUST_LOG").unwrap_or_else(|_| s.log.clone());
    let filter = EnvFilter::try_new(&directive)
        .map_err(|e| TelemetryError::Filter(directive.clone(), e.to_string()))?;
    // Spans are recorded only for export: without an endpoint the OpenTelemetry layer would
    // still build every span's data (the SDK samples everything by default) only to drop it
    // at the end, a cost on every message. Without it, trace context is not passed on either.
    let otel = s
        .otlp_endpoint
        .is_some()
        .then(|| tracing_opentelemetry::layer().with_tracer(tracer));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let res = if !opts.logs {
        registry.try_init()
    } else if s.log_format == "text" {
        registry.with(tracing_subscriber::fmt::layer()).try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
            .try_init()
    };
    if res.is_err() {
        // a subscriber is already installed (tests start many services in one process)
        tracing::debug!("telemetry already initialised");
    } else if s.otlp_endpoint.is_some() {
        EXPORTING.store(true, Ordering::Release);
    }
    Ok(Guard { provider })
}

/// Whether this process exports spans (telemetry initialised with an OTLP endpoint).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Acquire)
}

/// A W3C trace context carrier over a plain map (`traceparent`, `tracestate`).
struct MapCarrier(HashMap<String, String>);

impl Injector for MapCarrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

impl Extractor for MapCarrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The W3C `traceparent` of `span`, if it has a valid context and a propagator is installed
/// (stored with accepted messages, so later work can join their trace).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = MapCarrier(HashMap::new());
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.0.remove("traceparent")
}

/// The W3C `traceparent` of the current span.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The context a stored `traceparent` describes (invalid when the text is not one).
pub fn context_from_traceparent(traceparent: &str) -> opentelemetry::Context {
    let carrier = MapCarrier(HashMap::from([(
        "traceparent".to_string(),
        traceparent.to_string(),
    )]));
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier))
}

/// Makes `span` (not yet entered) a child of the message's acceptance span, read from the
/// message's stored `traceparent`. Only when spans are exported: otherwise the Redis read
/// would buy nothing. A message without a stored trace (accepted before tracing was stored,
/// or erased) leaves the span a root; so does a Redis error, which is only logged because a
/// trace is never worth failing delivery for.
pub async fn continue_message_trace(span: &tracing::Span, store: &Store, message_id: &str) {
    if !exporting() {
        return;
    }
    match store.message_trace(message_id).await {
        Ok(Some(tp)) => {
            let _ = span.set_parent(context_from_traceparent(&tp));
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, message_id, "cannot read the message's trace"),
    }
}

/// For work done for several messages at once (a webhook batch): the first valid context
/// becomes `span`'s parent, so the span belongs to that message's trace; every other distinct
/// context becomes a link, so each message's trace still leads to it. Call before the span is
/// first entered.
pub fn parent_and_links(
    span: &tracing::Span,
    contexts: impl IntoIterator<Item = opentelemetry::Context>,
) {
    let mut parent_set = false;
    let mut seen = std::collections::HashSet::new();
    for cx in contexts {
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() || !seen.insert((sc.trace_id(), sc.span_id())) {
            continue;
        }
        if parent_set {
            span.add_link(sc);
        } else {
            let _ = span.set_parent(cx);
            parent_set = true;
        }
    }
}

/// W3C trace context from HTTP request headers.
struct HttpExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Whether a request is a gRPC call (those get their span, with the RPC name, from the gRPC
/// layer instead).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Axum middleware (`route_layer(from_fn_with_state(metrics, http_span))`): one span per REST
/// request, a child of the caller's `traceparent` header when it sends one, so a backend's own
/// trace continues into Pushgate; and `pushgate_http_requests_total{route,status}`, by the
/// matched route template so that ids in paths do not multiply the series.
pub async fn http_span(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let span = if is_grpc(req.headers()) {
        tracing::Span::none()
    } else {
        let span = tracing::info_span!(
            spans::INGRESS_REQUEST,
            otel.kind = "server",
            http.request.method = %req.method(),
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
        );
        let cx = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HttpExtractor(req.headers()))
        });
        let _ = span.set_parent(cx);
        span
    };
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.record("http.response.status_code", status);
    metrics
        .http_requests
        .get_or_create(&HttpLabels { route, status })
        .inc();
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_names_are_unique_and_dotted() {
        let mut seen = std::collections::HashSet::new();
        for n in spans::ALL {
            assert!(seen.insert(n), "{n} declared twice");
            assert!(
                n.split_once('.').is_some_and(|(a, b)| !a.is_empty()
                    && !b.is_empty()
                    && n.bytes().all(|c| c.is_ascii_lowercase() || c == b'.')),
                "{n} is not service.operation"
            );
        }
    }

    #[test]
    fn operations_doc_describes_every_span() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations.md");
        let doc = std::fs::read_to_string(&p).unwrap_or_default();
        for n in spans::ALL {
            assert!(
                doc.contains(&format!("| `{n}` |")),
                "docs/operations.md does not describe span {n}"
            );
        }
    }

    #[test]
    fn traceparent_round_trips_through_a_context() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = context_from_traceparent(tp);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(!context_from_traceparent("not a traceparent")
            .span()
            .span_context()
            .is_valid());
    }
}
