//! Apps (operator endpoints).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use pushgate_core::credentials::sha256_hex;
use pushgate_core::{App, AppId, WebhookConfig};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::extract::{Admin, ApiJson};
use crate::Ctx;

/// `webhook` in app requests.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookIn {
    pub url: String,
    #[serde(default)]
    pub secret: Option<String>,
}

/// `POST /v1/apps` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    pub name: String,
    #[serde(default)]
    pub webhook: Option<WebhookIn>,
    /// Native push credentials: `apns`, `fcm`, `hms`, `webpush` objects (docs/providers.md).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub providers: Option<Map<String, Value>>,
    /// SMS provider settings (docs/providers.md).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub sms: Option<Value>,
}

/// `PATCH /v1/apps/{id}` body: fields present replace the stored ones; `webhook: null` removes it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchApp {
    #[serde(default)]
    pub name: Option<String>,
    /// `null` removes the webhook.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<WebhookIn>)]
    pub webhook: Option<Option<WebhookIn>>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub providers: Option<Map<String, Value>>,
    /// `null` removes the SMS settings.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<Object>)]
    pub sms: Option<Option<Value>>,
}

/// Distinguishes an absent field from an explicit `null`.
mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// `POST /v1/apps` answer: the only time the API key is shown.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedApp {
    pub app_id: String,
    pub api_key: String,
    pub webhook_secret: Option<String>,
}

fn random_token(prefix: &str) -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(b))
}

const KNOWN_PROVIDERS: [&str; 4] = ["apns", "fcm", "hms", "webpush"];

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.len() > 128 {
        return Err(ApiError::invalid("name", "must be 1-128 characters"));
    }
    Ok(())
}

fn check_providers(p: &Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in p {
        if !KNOWN_PROVIDERS.contains(&k.as_str()) {
            return Err(ApiError::invalid(
                format!("providers.{k}"),
                format!("unknown provider {k:?}; expected one of apns, fcm, hms, webpush"),
            ));
        }
        if !v.is_object() {
            return Err(ApiError::invalid(
                format!("providers.{k}"),
                "must be an object",
            ));
        }
    }
    Ok(())
}

fn webhook_config(w: WebhookIn) -> Result<WebhookConfig, ApiError> {
    let url = w.url.trim().to_string();
    if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() > 2048 {
        return Err(ApiError::invalid(
            "webhook.url",
            "must be an http(s) URL of at most 2048 characters",
        ));
    }
    let secret = match w.secret {
        Some(s) if s.len() < 16 || s.len() > 256 => {
            return Err(ApiError::invalid(
                "webhook.secret",
                "must be 16-256 characters",
            ));
        }
        Some(s) => s,
        None => random_token("whsec_"),
    };
    Ok(WebhookConfig {
        url,
        secret,
        previous_secret: None,
        previous_until: None,
    })
}

/// The webhook as shown: the secret is never shown again.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookView {
    pub url: String,
    /// Always `[redacted]`.
    pub secret: String,
}

/// An app as shown to the operator: secrets redacted.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AppView {
    pub app_id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookView>,
    /// Provider settings with secret fields replaced by `[redacted]`.
    #[schema(value_type = Object)]
    pub providers: Map<String, Value>,
    /// Whether SMS settings are configured.
    pub sms_configured: bool,
    pub created_at: String,
    pub updated_at: String,
}

/// `POST /v1/apps/{app_id}/keys` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RotatedKey {
    pub app_id: String,
    /// The new key; shown only now.
    pub api_key: String,
    /// Until when the previous key keeps working (RFC 3339).
    pub previous_key_valid_until: String,
}

/// The app as shown to the operator: secrets redacted.
fn redacted(app: &App) -> AppView {
    let providers: Map<String, Value> = app
        .providers
        .iter()
        .map(|(k, v)| {
            let fields: Map<String, Value> = v
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(fk, fv)| {
                            let secret = [
                                "key",
                                "secret",
                                "private",
                                "password",
                                "token",
                                "credentials",
                            ]
                            .iter()
                            .any(|s| fk.contains(s));
                            (
                                fk.clone(),
                                if secret {
                                    json!("[redacted]")
                                } else {
                                    fv.clone()
                                },
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            (k.clone(), Value::Object(fields))
        })
        .collect();
    AppView {
        app_id: app.app_id.clone(),
        name: app.name.clone(),
        webhook: app.webhook.as_ref().map(|w| WebhookView {
            url: w.url.clone(),
            secret: "[redacted]".into(),
        }),
        providers,
        sms_configured: app.sms.is_some(),
        created_at: pushgate_core::time::rfc3339(app.created_at),
        updated_at: pushgate_core::time::rfc3339(app.updated_at),
    }
}

/// `POST /v1/apps`
#[utoipa::path(post, path = "/v1/apps", tag = "apps", security(("admin_token" = [])), request_body = CreateApp,
    responses((status = 201, description = "Created; the API key is shown only now", body = CreatedApp), crate::openapi::Problems))]
pub async fn create(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    ApiJson(body): ApiJson<CreateApp>,
) -> Result<(StatusCode, Json<CreatedApp>), ApiError> {
    check_name(&body.name)?;
    let providers = body.providers.unwrap_or_default();
    check_providers(&providers)?;
    let webhook = body.webhook.map(webhook_config).transpose()?;
    let api_key = random_token("pk_");
    let now = pushgate_core::time::now_ms();
    let app = App {
        app_id: AppId::generate().0,
        name: body.name,
        webhook,
        providers,
        sms: body.sms,
        api_key_hash: sha256_hex(api_key.as_bytes()),
        created_at: now,
        updated_at: now,
    };
    ctx.store.create_app(&app).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApp {
            app_id: app.app_id.clone(),
            api_key,
            webhook_secret: app.webhook.as_ref().map(|w| w.secret.clone()),
        }),
    ))
}

async fn load(ctx: &Ctx, app_id: &str) -> Result<App, ApiError> {
    if !AppId::is_well_formed(app_id) {
        return Err(ApiError::NotFound("app"));
    }
    ctx.store
        .app(app_id)
        .await?
        .ok_or(ApiError::NotFound("app"))
}

/// `GET /v1/apps/{app_id}`
#[utoipa::path(get, path = "/v1/apps/{app_id}", tag = "apps", security(("admin_token" = [])), params(("app_id" = String, Path)),
    responses((status = 200, description = "The app, secrets redacted", body = AppView), crate::openapi::Problems))]
pub async fn get(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    Path(app_id): Path<String>,
) -> Result<Json<AppView>, ApiError> {
    Ok(Json(redacted(&load(&ctx, &app_id).await?)))
}

/// `PATCH /v1/apps/{app_id}`. A new webhook secret starts a rotation: for the key grace
/// period both the old and the new signature are sent.
#[utoipa::path(patch, path = "/v1/apps/{app_id}", tag = "apps", security(("admin_token" = [])), params(("app_id" = String, Path)),
    request_body = PatchApp,
    responses((status = 200, description = "Updated, secrets redacted", body = AppView), crate::openapi::Problems))]
pub async fn patch(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    Path(app_id): Path<String>,
    ApiJson(body): ApiJson<PatchApp>,
) -> Result<Json<AppView>, ApiError> {
    let mut app = load(&ctx, &app_id).await?;
    let now = pushgate_core::time::now_ms();
    if let Some(name) = body.name {
        check_name(&name)?;
        app.name = name;
    }
    if let Some(p) = body.providers {
        check_providers(&p)?;
        app.providers = p;
    }
    if let Some(sms) = body.sms {
        app.sms = sms;
    }
    if let Some(w) = body.webhook {
        app.webhook = match w {
            None => None,
            Some(w) => {
                let mut new = webhook_config(w)?;
                if let Some(old) = &app.webhook {
                    if old.secret != new.secret {
                        new.previous_secret = Some(old.secret.clone());
                        new.previous_until =
                            Some(now + (ctx.settings.key_grace_secs as i64) * 1000);
                    } else {
                        new.previous_secret = old.previous_secret.clone();
                        new.previous_until = old.previous_until;
                    }
                }
                Some(new)
            }
        };
    }
    app.updated_at = now;
    ctx.store.put_app(&app).await?;
    Ok(Json(redacted(&app)))
}

/// `POST /v1/apps/{app_id}/keys`: a new API key; the old one keeps working for the grace period.
#[utoipa::path(post, path = "/v1/apps/{app_id}/keys", tag = "apps", security(("admin_token" = [])), params(("app_id" = String, Path)),
    responses((status = 201, description = "A new key; the old one works until previous_key_valid_until", body = RotatedKey), crate::openapi::Problems))]
pub async fn rotate_key(
    _: Admin,
    State(ctx): State<Arc<Ctx>>,
    Path(app_id): Path<String>,
) -> Result<(StatusCode, Json<RotatedKey>), ApiError> {
    let mut app = load(&ctx, &app_id).await?;
    let old = app.api_key_hash.clone();
    let api_key = random_token("pk_");
    app.api_key_hash = sha256_hex(api_key.as_bytes());
    app.updated_at = pushgate_core::time::now_ms();
    let grace = Duration::from_secs(ctx.settings.key_grace_secs);
    ctx.store.rotate_key(&app, &old, grace).await?;
    let until = pushgate_core::time::rfc3339(app.updated_at + grace.as_millis() as i64);
    Ok((
        StatusCode::CREATED,
        Json(RotatedKey {
            app_id: app.app_id,
            api_key,
            previous_key_valid_until: until,
        }),
    ))
}
