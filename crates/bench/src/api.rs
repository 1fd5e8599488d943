//! The few HTTP API calls the bench makes: create an app, register a device, send messages.

use serde::Deserialize;
use serde_json::json;

/// Why a request failed; [`ApiError::kind`] is the key errors are counted under.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("no answer in time")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("unexpected answer: {0}")]
    Decode(String),
}

impl ApiError {
    /// A short, stable name for error counts.
    pub fn kind(&self) -> String {
        match self {
            ApiError::Status { status, .. } => format!("http-{status}"),
            ApiError::Timeout => "http-timeout".into(),
            ApiError::Connect(_) => "http-connect".into(),
            ApiError::Request(_) => "http-request".into(),
            ApiError::Decode(_) => "http-bad-answer".into(),
        }
    }
}

impl From<reqwest::Error> for ApiError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            ApiError::Timeout
        } else if e.is_connect() {
            ApiError::Connect(e.to_string())
        } else if e.is_decode() {
            ApiError::Decode(e.to_string())
        } else {
            ApiError::Request(e.to_string())
        }
    }
}

/// A device's XMPP login, as registration answers it.
#[derive(Debug, Clone, Deserialize)]
pub struct Login {
    pub jid: String,
    pub password: String,
}

#[derive(Deserialize)]
struct Registered {
    xmpp: Login,
}

#[derive(Deserialize)]
struct AppCreated {
    app_id: String,
    api_key: String,
}

#[derive(Deserialize)]
struct Accepted {
    messages: Vec<AcceptedMessage>,
}

#[derive(Deserialize)]
struct AcceptedMessage {
    id: String,
}

/// The HTTPS API of one suite.
pub struct Api {
    http: reqwest::Client,
    base: String,
}

async fn refused(r: reqwest::Response) -> ApiError {
    let status = r.status().as_u16();
    let mut body = r.text().await.unwrap_or_default();
    body.truncate(300);
    ApiError::Status { status, body }
}

impl Api {
    pub fn new(http: reqwest::Client, base: &str) -> Self {
        Api {
            http,
            base: base.trim_end_matches('/').to_string(),
        }
    }

    /// `POST /v1/apps` with a webhook; returns `(app_id, api_key)`.
    pub async fn create_app(
        &self,
        admin_token: &str,
        webhook_url: &str,
        webhook_secret: &str,
    ) -> Result<(String, String), ApiError> {
        let r = self
            .http
            .post(format!("{}/v1/apps", self.base))
            .bearer_auth(admin_token)
            .json(&json!({
                "name": "pushgate-bench",
                "webhook": {"url": webhook_url, "secret": webhook_secret},
            }))
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            return Err(refused(r).await);
        }
        let a: AppCreated = r.json().await?;
        Ok((a.app_id, a.api_key))
    }

    /// `PUT /v1/users/{user}/devices/{device}` as an XMPP device; returns its login.
    pub async fn register(&self, key: &str, user: &str, device: &str) -> Result<Login, ApiError> {
        let r = self
            .http
            .put(format!("{}/v1/users/{user}/devices/{device}", self.base))
            .bearer_auth(key)
            .json(&json!({"platform": "xmpp"}))
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(refused(r).await);
        }
        Ok(r.json::<Registered>().await?.xmpp)
    }

    /// `POST /v1/messages` with a prepared JSON body; returns the message ids in recipient
    /// order.
    pub async fn send(&self, key: &str, body: String) -> Result<Vec<String>, ApiError> {
        let r = self
            .http
            .post(format!("{}/v1/messages", self.base))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        if r.status().as_u16() != 202 {
            return Err(refused(r).await);
        }
        Ok(r.json::<Accepted>()
            .await?
            .messages
            .into_iter()
            .map(|m| m.id)
            .collect())
    }
}
