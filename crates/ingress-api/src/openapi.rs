//! The OpenAPI 3.1 document, generated from the handlers' annotations and the request and
//! response types, so it cannot drift from the code. Served at `GET /v1/openapi.json`.

use std::collections::BTreeMap;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, Response, ResponseBuilder};
use utoipa::{IntoResponses, Modify, OpenApi, PartialSchema, ToSchema};

/// RFC 9457 problem details, as every 4xx/5xx answer carries.
#[derive(Debug, serde::Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// Stable URI of the kind of problem, `urn:pushgate:problem:<slug>` (docs/api.md).
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The offending field (`recipients[2].user_id`, `ttl`, `Idempotency-Key`), when one is to blame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The error answers every endpoint may give.
pub struct Problems;

impl IntoResponses for Problems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let problem = |desc: &str| -> RefOr<Response> {
            ResponseBuilder::new()
                .description(desc)
                .content(
                    "application/problem+json",
                    ContentBuilder::new()
                        .schema(Some(<Problem as PartialSchema>::schema()))
                        .build(),
                )
                .build()
                .into()
        };
        [
            ("400", "Invalid field, malformed JSON or query"),
            ("401", "Missing or invalid credentials"),
            ("404", "Not found (also for another app's objects)"),
            (
                "409",
                "Conflict: not cancellable, idempotency key reused, concurrent update",
            ),
            ("413", "Request body too large"),
            ("415", "Content type is not application/json"),
            ("431", "Request headers too large"),
            ("422", "Unknown user or device"),
            ("429", "Rate limit exceeded (see Retry-After)"),
            ("503", "A dependency (Redis, NATS) is unavailable"),
        ]
        .into_iter()
        .map(|(code, desc)| (code.to_string(), problem(desc)))
        .collect()
    }
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |desc: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(desc))
                    .build(),
            )
        };
        components.add_security_scheme(
            "api_key",
            bearer("An app's API key: every call is scoped to that app"),
        );
        components.add_security_scheme(
            "admin_token",
            bearer("The operator's admin token from the configuration"),
        );
    }
}

/// The API document.
#[derive(OpenApi)]
#[openapi(
    info(title = "Pushgate API", version = "1", description = "Reliable messages to mobile and web apps. See docs/api.md."),
    paths(
        crate::apps::create,
        crate::apps::get,
        crate::apps::patch,
        crate::apps::rotate_key,
        crate::dead_letters::list,
        crate::dead_letters::replay_all,
        crate::dead_letters::replay,
        crate::devices::register,
        crate::devices::deregister,
        crate::devices::list,
        crate::devices::delete_user,
        crate::messages::send,
        crate::messages::list,
        crate::messages::get,
        crate::messages::cancel,
        crate::sse::stream,
        crate::device_events::report,
    ),
    components(schemas(Problem)),
    modifiers(&Security),
    tags(
        (name = "apps", description = "Operator: apps, their credentials and settings"),
        (name = "devices", description = "Backend: a user's devices"),
        (name = "messages", description = "Backend: sending and tracking messages"),
    )
)]
pub struct ApiDoc;

/// `GET /v1/openapi.json`
pub async fn serve() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_is_openapi_3_1_with_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        assert_eq!(doc["openapi"], "3.1.0");
        for p in [
            "/v1/apps",
            "/v1/apps/{app_id}",
            "/v1/apps/{app_id}/keys",
            "/v1/users/{user_id}/devices/{device_id}",
            "/v1/users/{user_id}/devices",
            "/v1/users/{user_id}",
            "/v1/messages",
            "/v1/messages/{id}",
        ] {
            assert!(doc["paths"][p].is_object(), "{p} missing");
        }
        assert!(doc["components"]["schemas"]["SendRequest"].is_object());
        assert!(doc["paths"]["/v1/messages"]["post"]["responses"]["422"].is_object());
    }
}
