//! The gRPC API (`pushgate.v1.MessagingService`, `pushgate.v1.DeviceService`), served on the
//! HTTPS listener beside REST: [`routes`] is merged into the REST router, and HTTP/2 requests
//! for the two service paths reach tonic.
//!
//! Each call authenticates like REST (`authorization: Bearer <API key>` metadata, through the
//! same [`AppAuth`] check and rate limit), converts its message into the REST request type and
//! calls the same function the REST handler calls, so both APIs validate, store and answer
//! alike. Errors become gRPC statuses in one place (`From<ApiError> for Status`). A
//! `traceparent` in the metadata makes the call's span part of the caller's trace.

use std::future::Future;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use futures::StreamExt;
use opentelemetry::propagation::Extractor;
use prost::Message as _;
use pushgate_core::credentials::sha256_hex;
use pushgate_core::event::Event;
use pushgate_core::{Platform, Priority, SmsFallback, Status, TokenState, WebPushSubscription};
use pushgate_proto::v1 as pb;
use pushgate_proto::v1::device_service_server::{DeviceService, DeviceServiceServer};
use pushgate_proto::v1::messaging_service_server::{MessagingService, MessagingServiceServer};
use tonic::metadata::{KeyRef, MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::{Code, Request, Response};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::devices::{self, RegisterDevice};
use crate::error::ApiError;
use crate::extract::AppAuth;
use crate::messages::{self, Idempotency, ListQuery};
use crate::sse::{self, WatchStart};
use crate::Ctx;

/// The gRPC services as axum routes (no fallback, so they merge into the REST router, whose
/// fallback answers everything else). Messages larger than the REST body limit are refused
/// by tonic before decoding, as REST refuses such bodies.
pub fn routes<S>(ctx: Arc<Ctx>) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let limit = ctx.settings.max_body_bytes;
    let messaging = MessagingServiceServer::new(Messaging { ctx: ctx.clone() })
        .max_decoding_message_size(limit);
    let devices = DeviceServiceServer::new(Devices { ctx }).max_decoding_message_size(limit);
    axum::Router::new()
        .route_service(
            &service_path::<MessagingServiceServer<Messaging>>(),
            messaging,
        )
        .route_service(&service_path::<DeviceServiceServer<Devices>>(), devices)
}

/// `/{package.Service}/{*rest}`: every method of one service.
fn service_path<T: NamedService>() -> String {
    format!("/{}/{{*rest}}", T::NAME)
}

impl From<ApiError> for tonic::Status {
    /// The one mapping from API errors to gRPC codes. Field errors carry the field first in
    /// the message (`ttl: must be 1 to …`), as REST's problem `field` does.
    fn from(e: ApiError) -> Self {
        let with_field = |field: &str, detail: &str| format!("{field}: {detail}");
        match e {
            ApiError::Unauthorized => {
                tonic::Status::unauthenticated("missing or invalid credentials")
            }
            ApiError::NotFound(what) => tonic::Status::not_found(format!("{what} not found")),
            ApiError::Invalid { field, detail } => {
                tonic::Status::invalid_argument(with_field(&field, &detail))
            }
            ApiError::MalformedJson {
                field: Some(field),
                detail,
            } => tonic::Status::invalid_argument(with_field(&field, &detail)),
            e @ (ApiError::MalformedJson { field: None, .. }
            | ApiError::TooLarge { .. }
            | ApiError::HeadersTooLarge { .. }
            | ApiError::UnsupportedMediaType) => tonic::Status::invalid_argument(e.to_string()),
            ApiError::UnknownUser { field, detail } => {
                tonic::Status::failed_precondition(with_field(&field, &detail))
            }
            ApiError::Conflict { kind, detail } => {
                let code = match kind {
                    "idempotency-key-reused" => Code::AlreadyExists,
                    "not-cancellable" => Code::FailedPrecondition,
                    // in progress, concurrent update: retrying the same call will do
                    _ => Code::Aborted,
                };
                tonic::Status::new(code, detail)
            }
            e @ ApiError::RateLimited {
                retry_after_secs, ..
            } => {
                let mut s = tonic::Status::resource_exhausted(e.to_string());
                s.metadata_mut()
                    .insert("retry-after", MetadataValue::from(retry_after_secs));
                s
            }
            e @ ApiError::TooManyWatches { .. } => tonic::Status::resource_exhausted(e.to_string()),
            ApiError::Unavailable(d) => {
                tracing::warn!(detail = %d, "dependency unavailable");
                tonic::Status::unavailable(d)
            }
            ApiError::Internal(d) => {
                // never leak internals; the log has them
                tracing::error!(detail = %d, "internal error");
                tonic::Status::internal("an internal error occurred; it has been logged")
            }
        }
    }
}

/// Reads W3C trace context from gRPC metadata (binary `-bin` entries carry none).
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The span of one call, a child of the caller's span when the metadata carries one.
fn call_span(rpc: &'static str, metadata: &MetadataMap) -> tracing::Span {
    let span = tracing::info_span!(
        pushgate_runtime::telemetry::spans::INGRESS_GRPC,
        rpc,
        app_id = tracing::field::Empty
    );
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    let _ = span.set_parent(cx);
    span
}

/// The calling app, by exactly the REST check: the `authorization` metadata entry is handed
/// to [`AppAuth`] as the header it is on the wire.
async fn authenticate(ctx: &Arc<Ctx>, metadata: &MetadataMap) -> Result<String, ApiError> {
    let (mut parts, ()) = http::Request::new(()).into_parts();
    if let Some(v) = metadata.as_ref().get(http::header::AUTHORIZATION) {
        parts.headers.insert(http::header::AUTHORIZATION, v.clone());
    }
    let auth = AppAuth::from_request_parts(&mut parts, ctx).await?;
    tracing::Span::current().record("app_id", auth.app_id.as_str());
    Ok(auth.app_id)
}

/// Runs a unary call: span, authentication, then `f` with the app id and the request.
async fn unary<Req, Resp, F, Fut>(
    ctx: &Arc<Ctx>,
    rpc: &'static str,
    req: Request<Req>,
    f: F,
) -> Result<Response<Resp>, tonic::Status>
where
    F: FnOnce(Arc<Ctx>, String, Req) -> Fut,
    Fut: Future<Output = Result<Resp, ApiError>>,
{
    let span = call_span(rpc, req.metadata());
    async move {
        let app = authenticate(ctx, req.metadata()).await?;
        let out = f(ctx.clone(), app, req.into_inner()).await?;
        Ok(Response::new(out))
    }
    .instrument(span)
    .await
}

/// `pushgate.v1.MessagingService`.
pub struct Messaging {
    ctx: Arc<Ctx>,
}

#[tonic::async_trait]
impl MessagingService for Messaging {
    async fn send(
        &self,
        req: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, tonic::Status> {
        unary(&self.ctx, "Send", req, |ctx, app, mut r| async move {
            let key = r.idempotency_key.take();
            // "the same request" for the key: the message as encoded, without the key itself
            let body_hash = sha256_hex(&r.encode_to_vec());
            let send = send_request(r)?;
            let idem = key
                .map(|k| Idempotency::new("idempotency_key", &k, body_hash))
                .transpose()?;
            let resp = messages::send_message(&ctx, &app, send, idem)
                .await
                .map_err(rename_data_field)?;
            Ok(pb::SendResponse {
                messages: resp
                    .messages
                    .into_iter()
                    .map(|a| pb::AcceptedMessage {
                        id: a.id,
                        recipient: Some(recipient_to_pb(a.recipient)),
                        status: status_to_pb(a.status).into(),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn get_message(
        &self,
        req: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::MessageView>, tonic::Status> {
        unary(&self.ctx, "GetMessage", req, |ctx, app, r| async move {
            let state = messages::load(&ctx, &app, &r.id).await?;
            Ok(message_to_pb(messages::view(&state)))
        })
        .await
    }

    async fn list_messages(
        &self,
        req: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, tonic::Status> {
        unary(&self.ctx, "ListMessages", req, |ctx, app, r| async move {
            use pb::list_messages_request::Filter;
            let (foreign_id, user_id) = match r.filter {
                Some(Filter::ForeignId(f)) => (Some(f), None),
                Some(Filter::UserId(u)) => (None, Some(u)),
                None => {
                    return Err(ApiError::invalid(
                        "filter",
                        "give exactly one of foreign_id or user_id",
                    ))
                }
            };
            let q = ListQuery {
                foreign_id,
                user_id,
                cursor: r.cursor,
                limit: r.limit.map(|l| l as usize),
            };
            let page = messages::list_messages(&ctx, &app, q).await?;
            Ok(pb::ListMessagesResponse {
                messages: page.messages.into_iter().map(message_to_pb).collect(),
                next_cursor: page.next_cursor,
            })
        })
        .await
    }

    async fn cancel_message(
        &self,
        req: Request<pb::CancelMessageRequest>,
    ) -> Result<Response<pb::CancelMessageResponse>, tonic::Status> {
        unary(&self.ctx, "CancelMessage", req, |ctx, app, r| async move {
            let c = messages::cancel_message(&ctx, &app, &r.id).await?;
            Ok(pb::CancelMessageResponse {
                status: status_to_pb(c.status).into(),
            })
        })
        .await
    }

    type WatchEventsStream = futures::stream::BoxStream<'static, Result<pb::Event, tonic::Status>>;

    /// The stream ends with `UNAVAILABLE` if the bus fails, and when the client goes away
    /// (the response is dropped with its consumer).
    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, tonic::Status> {
        let span = call_span("WatchEvents", req.metadata());
        async move {
            use pb::watch_events_request::Start;
            let app = authenticate(&self.ctx, req.metadata()).await?;
            let start = match req.into_inner().start {
                None => WatchStart::New,
                Some(Start::AfterEventId(id)) => WatchStart::after("after_event_id", &id)?,
                Some(Start::Since(t)) => WatchStart::since("since", &t)?,
            };
            let events = sse::watch_events(&self.ctx, &app, start).await?;
            let events = events.map(|r| r.map(event_to_pb).map_err(tonic::Status::from));
            Ok(Response::new(events.boxed()))
        }
        .instrument(span)
        .await
    }
}

/// `pushgate.v1.DeviceService`.
pub struct Devices {
    ctx: Arc<Ctx>,
}

#[tonic::async_trait]
impl DeviceService for Devices {
    async fn register_device(
        &self,
        req: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, tonic::Status> {
        unary(&self.ctx, "RegisterDevice", req, |ctx, app, r| async move {
            let body = RegisterDevice {
                platform: platform_from_pb(r.platform)?,
                push_token: r.push_token,
                webpush: r.webpush.map(|w| WebPushSubscription {
                    endpoint: w.endpoint,
                    p256dh: w.p256dh,
                    auth: w.auth,
                }),
                phone: r.phone,
                locale: r.locale,
            };
            let (created, d) =
                devices::register_device(&ctx, &app, r.user_id, r.device_id, body).await?;
            Ok(pb::RegisterDeviceResponse {
                user_id: d.user_id,
                device_id: d.device_id,
                platform: platform_to_pb(d.platform).into(),
                xmpp: Some(pb::XmppLogin {
                    jid: d.xmpp.jid,
                    password: d.xmpp.password,
                    host: d.xmpp.host,
                    port: d.xmpp.port.into(),
                }),
                created,
            })
        })
        .await
    }

    async fn deregister_device(
        &self,
        req: Request<pb::DeregisterDeviceRequest>,
    ) -> Result<Response<pb::DeregisterDeviceResponse>, tonic::Status> {
        unary(
            &self.ctx,
            "DeregisterDevice",
            req,
            |ctx, app, r| async move {
                devices::deregister_device(&ctx, &app, &r.user_id, &r.device_id).await?;
                Ok(pb::DeregisterDeviceResponse {})
            },
        )
        .await
    }

    async fn list_devices(
        &self,
        req: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, tonic::Status> {
        unary(&self.ctx, "ListDevices", req, |ctx, app, r| async move {
            let list = devices::list_devices(&ctx, &app, &r.user_id).await?;
            Ok(pb::ListDevicesResponse {
                devices: list
                    .devices
                    .into_iter()
                    .map(|d| pb::DeviceView {
                        device_id: d.device_id,
                        platform: platform_to_pb(d.platform).into(),
                        online: d.online,
                        last_seen: d.last_seen,
                        token_state: token_state_name(d.token_state).into(),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn delete_user(
        &self,
        req: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, tonic::Status> {
        unary(&self.ctx, "DeleteUser", req, |ctx, app, r| async move {
            devices::erase_user(&ctx, &app, &r.user_id).await?;
            Ok(pb::DeleteUserResponse {})
        })
        .await
    }
}

/// The REST send request a gRPC one stands for. Only what JSON would have rejected while
/// parsing is checked here (`data_json` must be JSON, `priority` a known value); everything
/// else is left to the shared validation.
fn send_request(r: pb::SendRequest) -> Result<messages::SendRequest, ApiError> {
    let data = r
        .data_json
        .map(|s| {
            serde_json::from_str(&s)
                .map_err(|e| ApiError::invalid("data_json", format!("must be a JSON object: {e}")))
        })
        .transpose()?;
    let priority = r
        .priority
        .map(|p| match p.as_str() {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            _ => Err(ApiError::invalid(
                "priority",
                format!("must be \"high\" or \"normal\", got {p:?}"),
            )),
        })
        .transpose()?;
    Ok(messages::SendRequest {
        recipients: r
            .recipients
            .into_iter()
            .map(|x| messages::Recipient {
                user_id: x.user_id,
                device_id: x.device_id,
                phone: x.phone,
                foreign_id: x.foreign_id,
            })
            .collect(),
        text: r.text,
        title: r.title,
        data,
        priority,
        ttl: r.ttl.map(u64::from),
        collapse_key: r.collapse_key,
        sms_fallback: r.sms_fallback.map(|f| SmsFallback { text: f.text }),
        send_at: r.send_at,
    })
}

/// The shared validation names REST's `data`; a gRPC caller knows the field as `data_json`.
fn rename_data_field(e: ApiError) -> ApiError {
    match e {
        ApiError::Invalid { field, detail } if field == "data" => ApiError::Invalid {
            field: "data_json".into(),
            detail,
        },
        e => e,
    }
}

fn recipient_to_pb(r: messages::Recipient) -> pb::Recipient {
    pb::Recipient {
        user_id: r.user_id,
        device_id: r.device_id,
        phone: r.phone,
        foreign_id: r.foreign_id,
    }
}

fn message_to_pb(v: messages::MessageView) -> pb::MessageView {
    pb::MessageView {
        id: v.id,
        recipient: Some(pb::Recipient {
            user_id: v.user_id,
            device_id: v.device_id,
            phone: v.phone,
            foreign_id: v.foreign_id,
        }),
        status: status_to_pb(v.status).into(),
        channel: v.channel,
        created_at: v.created_at,
        expires_at: v.expires_at,
        history: v
            .history
            .into_iter()
            .map(|h| pb::HistoryEntry {
                status: status_to_pb(h.status).into(),
                at: h.at,
                channel: h.channel,
                device_id: h.device_id,
                detail: h.detail,
            })
            .collect(),
    }
}

fn event_to_pb(e: Event) -> pb::Event {
    pb::Event {
        event: e.event.as_str().to_string(),
        id: e.id,
        message_id: e.message_id,
        foreign_id: e.foreign_id,
        user_id: e.user_id,
        device_id: e.device_id,
        channel: e.channel,
        at: e.at,
        detail: e.detail,
        text: e.text,
        data_json: e.data.map(|d| d.to_string()),
    }
}

fn status_to_pb(s: Status) -> pb::Status {
    match s {
        Status::Scheduled => pb::Status::Scheduled,
        Status::Enqueued => pb::Status::Enqueued,
        Status::Sent => pb::Status::Sent,
        Status::Delivered => pb::Status::Delivered,
        Status::Read => pb::Status::Read,
        Status::Expired => pb::Status::Expired,
        Status::Failed => pb::Status::Failed,
        Status::Cancelled => pb::Status::Cancelled,
        Status::SmsSent => pb::Status::SmsSent,
        Status::SmsDelivered => pb::Status::SmsDelivered,
        Status::SmsFailed => pb::Status::SmsFailed,
    }
}

fn platform_to_pb(p: Platform) -> pb::Platform {
    match p {
        Platform::Ios => pb::Platform::Ios,
        Platform::Android => pb::Platform::Android,
        Platform::Huawei => pb::Platform::Huawei,
        Platform::Web => pb::Platform::Web,
        Platform::Xmpp => pb::Platform::Xmpp,
    }
}

/// A device platform; unset (`PLATFORM_UNSPECIFIED`) is refused like a missing JSON field.
fn platform_from_pb(p: i32) -> Result<Platform, ApiError> {
    match pb::Platform::try_from(p) {
        Ok(pb::Platform::Ios) => Ok(Platform::Ios),
        Ok(pb::Platform::Android) => Ok(Platform::Android),
        Ok(pb::Platform::Huawei) => Ok(Platform::Huawei),
        Ok(pb::Platform::Web) => Ok(Platform::Web),
        Ok(pb::Platform::Xmpp) => Ok(Platform::Xmpp),
        Ok(pb::Platform::Unspecified) | Err(_) => Err(ApiError::invalid(
            "platform",
            "must be one of PLATFORM_IOS, PLATFORM_ANDROID, PLATFORM_HUAWEI, PLATFORM_WEB, PLATFORM_XMPP",
        )),
    }
}

fn token_state_name(t: TokenState) -> &'static str {
    match t {
        TokenState::None => "none",
        TokenState::Valid => "valid",
        TokenState::Invalid => "invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_codes_with_the_field() {
        let s = tonic::Status::from(ApiError::invalid("ttl", "must be 1 to 2592000 seconds"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().starts_with("ttl: "), "{}", s.message());
        let s = tonic::Status::from(ApiError::UnknownUser {
            field: "recipients[0].user_id".into(),
            detail: "no device".into(),
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().starts_with("recipients[0].user_id: "));
        let conflict = |kind| ApiError::Conflict {
            kind,
            detail: String::new(),
        };
        assert_eq!(
            tonic::Status::from(conflict("not-cancellable")).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            tonic::Status::from(conflict("idempotency-key-reused")).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            tonic::Status::from(conflict("idempotency-key-in-progress")).code(),
            Code::Aborted
        );
        let s = tonic::Status::from(ApiError::RateLimited {
            limit: 5,
            retry_after_secs: 1,
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.metadata().get("retry-after").is_some());
        assert_eq!(
            tonic::Status::from(ApiError::Unauthorized).code(),
            Code::Unauthenticated
        );
        assert_eq!(
            tonic::Status::from(ApiError::TooLarge { limit: 1 }).code(),
            Code::InvalidArgument
        );
        let s = tonic::Status::from(ApiError::Internal("secret detail".into()));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"));
    }

    #[test]
    fn send_request_refuses_what_json_parsing_would() {
        let base = pb::SendRequest {
            recipients: vec![pb::Recipient {
                user_id: Some("u1".into()),
                ..Default::default()
            }],
            text: "hi".into(),
            ..Default::default()
        };
        let bad_json = pb::SendRequest {
            data_json: Some("{nope".into()),
            ..base.clone()
        };
        assert!(
            matches!(send_request(bad_json), Err(ApiError::Invalid { field, .. }) if field == "data_json")
        );
        let bad_priority = pb::SendRequest {
            priority: Some("urgent".into()),
            ..base.clone()
        };
        assert!(
            matches!(send_request(bad_priority), Err(ApiError::Invalid { field, .. }) if field == "priority")
        );
        let ok = pb::SendRequest {
            data_json: Some(r#"{"a":1}"#.into()),
            priority: Some("high".into()),
            ttl: Some(60),
            ..base
        };
        let r = send_request(ok).map_err(|e| e.to_string());
        assert!(
            matches!(&r, Ok(r) if r.priority == Some(Priority::High) && r.ttl == Some(60) && r.data.is_some()),
            "{r:?}"
        );
    }

    #[test]
    fn unspecified_platform_is_refused() {
        assert!(platform_from_pb(pb::Platform::Unspecified.into()).is_err());
        assert!(platform_from_pb(99).is_err());
        assert_eq!(
            platform_from_pb(pb::Platform::Web.into()).ok(),
            Some(Platform::Web)
        );
    }
}
