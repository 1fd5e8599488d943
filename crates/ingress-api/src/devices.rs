//! Devices (backend endpoints).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use pushgate_bus::payloads::EdgeControl;
use pushgate_core::credentials::{device_password, jid_local, scram_credentials, SCRAM_ITERATIONS};
use pushgate_core::ids::validate_external_id;
use pushgate_core::{Device, Platform, TokenState, WebPushSubscription};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::extract::{ApiJson, AppAuth};
use crate::Ctx;

/// `PUT /v1/users/{user_id}/devices/{device_id}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDevice {
    pub platform: Platform,
    #[serde(default)]
    pub push_token: Option<String>,
    #[serde(default)]
    pub webpush: Option<WebPushSubscription>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub locale: Option<String>,
}

/// XMPP login of a device.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct XmppLogin {
    pub jid: String,
    pub password: String,
    pub host: String,
    pub port: u16,
}

/// Registration answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RegisteredDevice {
    pub user_id: String,
    pub device_id: String,
    pub platform: Platform,
    pub xmpp: XmppLogin,
}

/// A device as listed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    pub device_id: String,
    pub platform: Platform,
    /// Connected to an edge now.
    pub online: bool,
    /// Last connection or disconnection (RFC 3339), if ever connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    pub token_state: TokenState,
}

/// `GET /v1/users/{user_id}/devices` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceList {
    pub devices: Vec<DeviceView>,
}

/// Checks a path id, naming the path parameter on failure.
pub fn check_id(field: &str, v: &str) -> Result<(), ApiError> {
    validate_external_id(v).map_err(|e| ApiError::invalid(field, format!("{field} {e}")))
}

/// E.164: `+` then 7 to 15 digits, no leading zero.
pub fn check_phone(field: &str, p: &str) -> Result<(), ApiError> {
    let digits = p.strip_prefix('+').unwrap_or("");
    let ok = (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "must be an E.164 number such as +41791234567",
        ))
    }
}

/// Longest Web Push endpoint accepted (as for webhook URLs); browsers' are about 200-500.
const MAX_ENDPOINT_CHARS: usize = 2048;

/// A Web Push subscription as a browser's `PushSubscription.toJSON()` gives it. Checked here
/// rather than at the first push, where a bad one would only show as a dead token: the
/// endpoint must be an https URL with a host (push services are HTTPS only, RFC 8030 §8, and
/// the bridge sends nowhere else), `p256dh` the base64url of a 65-byte uncompressed P-256
/// public key and `auth` the base64url of a 16-byte secret (RFC 8291 §3).
fn check_webpush(w: &WebPushSubscription) -> Result<(), ApiError> {
    let endpoint_ok = w.endpoint.len() <= MAX_ENDPOINT_CHARS
        && url::Url::parse(&w.endpoint).is_ok_and(|u| u.scheme() == "https" && u.has_host());
    if !endpoint_ok {
        return Err(ApiError::invalid(
            "webpush.endpoint",
            "must be an https URL with a host, at most 2048 characters",
        ));
    }
    let decoded = |v: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(v.trim_end_matches('='))
    };
    if !decoded(&w.p256dh).is_ok_and(|k| k.len() == 65 && k.first() == Some(&0x04)) {
        return Err(ApiError::invalid(
            "webpush.p256dh",
            "must be the base64url of a 65-byte uncompressed P-256 public key",
        ));
    }
    if !decoded(&w.auth).is_ok_and(|a| a.len() == 16) {
        return Err(ApiError::invalid(
            "webpush.auth",
            "must be the base64url of a 16-byte secret",
        ));
    }
    Ok(())
}

fn check_registration(b: &RegisterDevice) -> Result<(), ApiError> {
    if let Some(t) = &b.push_token {
        if t.is_empty() || t.len() > 4096 {
            return Err(ApiError::invalid("push_token", "must be 1-4096 characters"));
        }
    }
    if let Some(w) = &b.webpush {
        check_webpush(w)?;
    }
    match b.platform {
        Platform::Web if b.webpush.is_none() && b.push_token.is_some() => {
            return Err(ApiError::invalid(
                "webpush",
                "web devices register a webpush subscription, not a push_token",
            ));
        }
        Platform::Ios | Platform::Android | Platform::Huawei if b.webpush.is_some() => {
            return Err(ApiError::invalid(
                "webpush",
                "only web devices have a webpush subscription",
            ));
        }
        // refused here rather than accepted and counted as a dead token at the first push
        p if b
            .push_token
            .as_deref()
            .is_some_and(|t| !p.accepts_push_token(t)) =>
        {
            return Err(ApiError::invalid(
                "push_token",
                "an APNs device token is hex (the bytes the app was given, hex-encoded), at most 200 characters",
            ));
        }
        _ => {}
    }
    if let Some(p) = &b.phone {
        check_phone("phone", p)?;
    }
    if let Some(l) = &b.locale {
        if l.is_empty()
            || l.len() > 35
            || !l
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(ApiError::invalid(
                "locale",
                "must be a BCP 47 language tag such as de-CH",
            ));
        }
    }
    Ok(())
}

/// `PUT /v1/users/{user_id}/devices/{device_id}`: registers or updates a device. A device id
/// that belongs to another user of the app moves: its generation (and so its XMPP password)
/// changes, its live session is closed and its pending messages are dropped, so the previous
/// user stops receiving on it at once.
#[utoipa::path(put, path = "/v1/users/{user_id}/devices/{device_id}", tag = "devices", security(("api_key" = [])),
    params(("user_id" = String, Path), ("device_id" = String, Path)), request_body = RegisterDevice,
    responses((status = 201, description = "Registered", body = RegisteredDevice), (status = 200, description = "Updated", body = RegisteredDevice), crate::openapi::Problems))]
pub async fn register(
    auth: AppAuth,
    State(ctx): State<Arc<Ctx>>,
    Path((user_id, device_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<RegisterDevice>,
) -> Result<(StatusCode, Json<RegisteredDevice>), ApiError> {
    let (created, device) = register_device(&ctx, &auth.app_id, user_id, device_id, body).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(device)))
}

/// Registers or updates `device_id` of `user_id` in `app` (see [`register`] for what a move
/// between users does). Answers whether the device is new, which REST shows as 201 vs 200
/// and gRPC as `created`. Shared by both so they validate and store identically.
pub(crate) async fn register_device(
    ctx: &Ctx,
    app: &str,
    user_id: String,
    device_id: String,
    body: RegisterDevice,
) -> Result<(bool, RegisteredDevice), ApiError> {
    check_id("user_id", &user_id)?;
    check_id("device_id", &device_id)?;
    check_registration(&body)?;
    for _attempt in 0..5 {
        let previous = ctx.store.device(app, &device_id).await?;
        let now = pushgate_core::time::now_ms();
        let moved = previous.as_ref().is_some_and(|p| p.user_id != user_id);
        let generation = match &previous {
            Some(p) if moved => p.generation + 1,
            Some(p) => p.generation,
            None => 0,
        };
        let password = device_password(&ctx.common.device_secret, app, &device_id, generation);
        let scram = match &previous {
            Some(p) if !moved => p.scram.clone(),
            _ => {
                let mut salt = [0u8; 16];
                rand::thread_rng().fill_bytes(&mut salt);
                scram_credentials(&password, &salt, SCRAM_ITERATIONS)
            }
        };
        let has_token = body.push_token.is_some() || body.webpush.is_some();
        let token_changed = previous
            .as_ref()
            .is_none_or(|p| p.push_token != body.push_token || p.webpush != body.webpush);
        let token_state = match (&previous, has_token) {
            (_, false) => TokenState::None,
            (Some(p), true) if !token_changed => p.token_state,
            _ => TokenState::Valid,
        };
        let device = Device {
            app_id: app.to_string(),
            device_id: device_id.clone(),
            user_id: user_id.clone(),
            platform: body.platform,
            push_token: body.push_token.clone(),
            webpush: body.webpush.clone(),
            phone: body.phone.clone(),
            locale: body.locale.clone(),
            jid_local: jid_local(app, &device_id),
            generation,
            token_state,
            scram,
            created_at: previous.as_ref().map(|p| p.created_at).unwrap_or(now),
            updated_at: now,
        };
        match ctx.store.put_device(&device, previous.as_ref()).await {
            Ok(()) => {}
            Err(pushgate_store::StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
        if moved {
            ctx.store.clear_pending(app, &device_id).await?;
            kick(ctx, app, &device_id, "device moved to another user").await;
        }
        return Ok((
            previous.is_none(),
            RegisteredDevice {
                user_id,
                device_id,
                platform: device.platform,
                xmpp: XmppLogin {
                    jid: format!("{}@{}", device.jid_local, ctx.common.xmpp_domain),
                    password,
                    host: ctx.settings.public_xmpp_host.clone(),
                    port: ctx.settings.public_xmpp_port,
                },
            },
        ));
    }
    Err(ApiError::Conflict {
        kind: "concurrent-update",
        detail: "the device is being updated concurrently; retry".into(),
    })
}

/// Asks every edge to close the device's session. Best effort by design: a missed signal is
/// covered by the edge re-checking the device generation before each delivery.
async fn kick(ctx: &Ctx, app: &str, device: &str, reason: &str) {
    let ctl = EdgeControl {
        app_id: app.into(),
        device_id: device.into(),
        except_session: None,
        reason: reason.into(),
    };
    if let Err(e) = ctx
        .bus
        .signal_json(ctx.bus.names().edge_control(), &ctl)
        .await
    {
        tracing::warn!(error = %e, "cannot signal edges to close a session");
    }
}

/// `DELETE /v1/users/{user_id}/devices/{device_id}`
#[utoipa::path(delete, path = "/v1/users/{user_id}/devices/{device_id}", tag = "devices", security(("api_key" = [])),
    params(("user_id" = String, Path), ("device_id" = String, Path)),
    responses((status = 204, description = "Deregistered; its session is closed"), crate::openapi::Problems))]
pub async fn deregister(
    auth: AppAuth,
    State(ctx): State<Arc<Ctx>>,
    Path((user_id, device_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    deregister_device(&ctx, &auth.app_id, &user_id, &device_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a user's device and closes its session; a device of another user (or app) is a
/// 404 like a missing one, so a backend cannot remove devices by guessing ids.
pub(crate) async fn deregister_device(
    ctx: &Ctx,
    app: &str,
    user_id: &str,
    device_id: &str,
) -> Result<(), ApiError> {
    check_id("user_id", user_id)?;
    check_id("device_id", device_id)?;
    let dev = ctx.store.device(app, device_id).await?;
    let Some(dev) = dev.filter(|d| d.user_id == user_id) else {
        return Err(ApiError::NotFound("device"));
    };
    ctx.store.delete_device(&dev).await?;
    kick(ctx, app, device_id, "device deregistered").await;
    Ok(())
}

/// `GET /v1/users/{user_id}/devices`
#[utoipa::path(get, path = "/v1/users/{user_id}/devices", tag = "devices", security(("api_key" = [])),
    params(("user_id" = String, Path)),
    responses((status = 200, description = "The user's devices", body = DeviceList), crate::openapi::Problems))]
pub async fn list(
    auth: AppAuth,
    State(ctx): State<Arc<Ctx>>,
    Path(user_id): Path<String>,
) -> Result<Json<DeviceList>, ApiError> {
    Ok(Json(list_devices(&ctx, &auth.app_id, &user_id).await?))
}

/// A user's devices with their presence (shared by REST and gRPC).
pub(crate) async fn list_devices(
    ctx: &Ctx,
    app: &str,
    user_id: &str,
) -> Result<DeviceList, ApiError> {
    check_id("user_id", user_id)?;
    let devices = ctx.store.user_devices(app, user_id).await?;
    let ids: Vec<String> = devices.iter().map(|d| d.device_id.clone()).collect();
    let seen = ctx.store.last_seen(app, &ids).await?;
    let mut out = Vec::with_capacity(devices.len());
    for (d, seen) in devices.iter().zip(seen) {
        let online = ctx.store.presence(app, &d.device_id).await?.is_some();
        out.push(DeviceView {
            device_id: d.device_id.clone(),
            platform: d.platform,
            online,
            last_seen: seen.map(pushgate_core::time::rfc3339),
            token_state: d.token_state,
        });
    }
    Ok(DeviceList { devices: out })
}

/// `DELETE /v1/users/{user_id}`: the user's devices and undelivered messages are erased.
#[utoipa::path(delete, path = "/v1/users/{user_id}", tag = "devices", security(("api_key" = [])),
    params(("user_id" = String, Path)),
    responses((status = 204, description = "Erased"), crate::openapi::Problems))]
pub async fn delete_user(
    auth: AppAuth,
    State(ctx): State<Arc<Ctx>>,
    Path(user_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    erase_user(&ctx, &auth.app_id, &user_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Erases a user's devices (closing their sessions) and undelivered messages (shared by REST
/// and gRPC).
pub(crate) async fn erase_user(ctx: &Ctx, app: &str, user_id: &str) -> Result<(), ApiError> {
    check_id("user_id", user_id)?;
    let devices = ctx.store.user_devices(app, user_id).await?;
    for d in &devices {
        ctx.store.delete_device(d).await?;
        kick(ctx, app, &d.device_id, "user deleted").await;
    }
    crate::messages::erase_undelivered(ctx, app, user_id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(endpoint: &str, p256dh: &str, auth: &str) -> WebPushSubscription {
        WebPushSubscription {
            endpoint: endpoint.into(),
            p256dh: p256dh.into(),
            auth: auth.into(),
        }
    }

    fn field(r: Result<(), ApiError>) -> Option<String> {
        match r {
            Err(ApiError::Invalid { field, .. }) => Some(field),
            Err(e) => Some(format!("other error: {e}")),
            Ok(()) => None,
        }
    }

    /// An iOS device's token is what the bridge can put into an APNs request path: hex.
    #[test]
    fn apns_tokens_are_hex() {
        let reg = |platform: Platform, token: &str| RegisterDevice {
            platform,
            push_token: Some(token.into()),
            webpush: None,
            phone: None,
            locale: None,
        };
        let hex = "a1".repeat(32);
        assert_eq!(field(check_registration(&reg(Platform::Ios, &hex))), None);
        assert_eq!(
            field(check_registration(&reg(Platform::Ios, &hex.to_uppercase()))),
            None
        );
        for bad in ["not-hex", "a1/../b2", &"a".repeat(201)] {
            assert_eq!(
                field(check_registration(&reg(Platform::Ios, bad))).as_deref(),
                Some("push_token"),
                "{bad}"
            );
        }
        // FCM and HMS tokens are not hex, and are not held to it
        let fcm = "dGVzdA:APA91bH-test_token";
        assert_eq!(
            field(check_registration(&reg(Platform::Android, fcm))),
            None
        );
        assert_eq!(field(check_registration(&reg(Platform::Huawei, fcm))), None);
    }

    /// A real browser subscription passes (RFC 8291's example keys); each part that a push
    /// could not use is refused under its own field.
    #[test]
    fn webpush_subscriptions_are_checked_part_by_part() {
        // RFC 8291 Appendix A: the user agent's public key and authentication secret
        let key = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
        let auth = "BTBZMqHH6r4Tts7J_aSIgg";
        let endpoint = "https://push.example.net/push/JzLQ3raZJfFBR0aqvOMsLrt54w4rJUsV";
        assert_eq!(field(check_webpush(&sub(endpoint, key, auth))), None);
        // padded base64url, as some libraries write it
        assert_eq!(
            field(check_webpush(&sub(
                endpoint,
                &format!("{key}="),
                &format!("{auth}==")
            ))),
            None
        );
        for bad in [
            "http://push.example.net/p",
            "https://",
            "push.example.net/p",
            "",
            &format!("https://push.example.net/{}", "a".repeat(2048)),
        ] {
            assert_eq!(
                field(check_webpush(&sub(bad, key, auth))).as_deref(),
                Some("webpush.endpoint"),
                "{bad}"
            );
        }
        for bad in ["", "x", &key[..40], &format!("{key}AA"), "BCVx+sr7/N"] {
            assert_eq!(
                field(check_webpush(&sub(endpoint, bad, auth))).as_deref(),
                Some("webpush.p256dh"),
                "{bad}"
            );
        }
        // a compressed point (0x02 prefix) is not what browsers send, and the bridge needs
        // the uncompressed one
        let compressed = {
            use base64::Engine;
            let mut k = vec![0x02u8];
            k.extend_from_slice(&[7u8; 64]);
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k)
        };
        assert_eq!(
            field(check_webpush(&sub(endpoint, &compressed, auth))).as_deref(),
            Some("webpush.p256dh")
        );
        for bad in [
            "",
            "BTBZMqHH6r4Tts7J_aSI",
            "BTBZMqHH6r4Tts7J_aSIggAA",
            "!!!",
        ] {
            assert_eq!(
                field(check_webpush(&sub(endpoint, key, bad))).as_deref(),
                Some("webpush.auth"),
                "{bad}"
            );
        }
    }
}
