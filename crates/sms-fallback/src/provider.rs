//! SMS providers: an app's `sms` settings, and the call that hands one SMS to the provider.
//!
//! Three providers exist, chosen by `"provider"` in the app's `sms` JSON:
//!
//! - `"webhook"`: the generic JSON webhook (below).
//! - `"twilio"`: the Twilio Messages REST API, or any provider that speaks it (see
//!   [`crate::twilio`]).
//! - `"kannel"`: a Kannel gateway's `sendsms` interface (see [`crate::kannel`]).
//!
//! Every provider also takes `"max_per_second"` (default [`DEFAULT_MAX_PER_SECOND`]): how many
//! SMS of the app are handed to the provider per second, over all instances (see
//! [`crate::throttle`]).
//!
//! ## Generic webhook
//!
//! ```json
//! {"provider": "webhook", "url": "https://sms.example.com/send", "secret": "…"}
//! ```
//!
//! Pushgate `POST`s `{"message_id", "to", "text", "segments", "encoding"}` signed with
//! `Pushgate-Signature` (see [`crate::signature`]). A 2xx answer (optionally with
//! `{"id": "<provider reference>"}`) means the provider took the SMS.
//!
//! **Contract for the receiving provider: it must deduplicate by `message_id`.** Pushgate
//! retries when it cannot know whether an attempt reached the provider (a timeout, a crash of
//! the sending instance in the middle of the call); only the provider can tell that the retry
//! is the same SMS, and the body always carries the same `message_id` for it.
//!
//! Twilio and Kannel cannot recognise a repeat, so for them an attempt whose outcome is unknown
//! is never repeated (see [`ProviderConfig::deduplicates`] and [`crate::worker`]).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};

use crate::encoding::Encoding;
use crate::kannel::KannelProvider;
use crate::signature;
use crate::twilio::TwilioProvider;

/// The detail of `sms_failed` when the app has no usable SMS provider.
pub const NO_PROVIDER: &str = "no SMS provider configured for this app";

/// The detail of `sms_failed` when the provider says the number cannot receive an SMS; the
/// same text as for a number Pushgate refuses itself, so backends handle one case.
pub const INVALID_NUMBER: &str = "invalid phone number";

/// SMS per second and app when the app's settings do not say.
pub const DEFAULT_MAX_PER_SECOND: u32 = 10;

/// Highest `max_per_second` accepted; far above what any single SMS account is allowed, so a
/// typo (an extra zero or three) is caught instead of silently disabling the limit.
pub const MAX_MAX_PER_SECOND: u32 = 10_000;

/// How much of a provider's answer is read at most: enough for any sensible JSON answer, and
/// a provider streaming an endless body cannot hold a worker.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// How much of a refusal's body goes into the `sms_failed` detail.
const DETAIL_SNIPPET_CHARS: usize = 200;

/// Longest provider reference kept; it ends up in a Redis value and an event detail.
const MAX_REFERENCE_CHARS: usize = 128;

/// Longest `Retry-After` honoured; a provider asking for more is treated as asking for this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The generic webhook provider of one app.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookProvider {
    pub url: Url,
    /// Signs requests to the provider and verifies its delivery reports.
    pub secret: String,
}

/// Hand-written so the secret never ends up in a log line.
impl std::fmt::Debug for WebhookProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookProvider")
            .field("url", &self.url.as_str())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// An app's SMS provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderConfig {
    Webhook(WebhookProvider),
    Twilio(TwilioProvider),
    Kannel(KannelProvider),
}

impl ProviderConfig {
    /// The name used in the app's settings and in logs.
    pub fn name(&self) -> &'static str {
        match self {
            ProviderConfig::Webhook(_) => "webhook",
            ProviderConfig::Twilio(_) => "twilio",
            ProviderConfig::Kannel(_) => "kannel",
        }
    }

    /// Whether the provider recognises a repeated request for the same message. Only then may
    /// an attempt whose outcome is unknown (timeout, crash during the call) be repeated without
    /// risking a second SMS at the handset: the webhook contract requires it, while Twilio's
    /// Messages API and Kannel's `sendsms` create a new SMS for every request.
    pub fn deduplicates(&self) -> bool {
        matches!(self, ProviderConfig::Webhook(_))
    }
}

/// An app's SMS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmsConfig {
    pub provider: ProviderConfig,
    /// SMS of this app handed to the provider per second, over all instances.
    pub max_per_second: u32,
}

/// Why an app's SMS settings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderConfigError {
    #[error("{NO_PROVIDER}")]
    Missing,
    /// A provider this version does not implement; the event detail is the same as for a
    /// missing one (the backend cannot act on the difference), the log names it.
    #[error("{NO_PROVIDER}")]
    Unknown(String),
    #[error("SMS provider settings are invalid: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct RawWebhook {
    url: String,
    secret: String,
}

/// Reads an app's `sms` settings. `allow_http` admits plain `http://` URLs (local stand-ins in
/// tests); otherwise the provider must be reached over HTTPS, because the request carries the
/// text and the recipient's number.
pub fn parse_config(
    sms: Option<&serde_json::Value>,
    allow_http: bool,
) -> Result<SmsConfig, ProviderConfigError> {
    let Some(v) = sms.filter(|v| !v.is_null()) else {
        return Err(ProviderConfigError::Missing);
    };
    let name = v
        .get("provider")
        .and_then(|p| p.as_str())
        .unwrap_or_default();
    let provider = match name {
        "webhook" => {
            let raw: RawWebhook = serde_json::from_value(v.clone())
                .map_err(|e| ProviderConfigError::Invalid(e.to_string()))?;
            let url = provider_url(&raw.url, "url", allow_http)?;
            if raw.secret.is_empty() {
                return Err(ProviderConfigError::Invalid(
                    "secret must not be empty".into(),
                ));
            }
            ProviderConfig::Webhook(WebhookProvider {
                url,
                secret: raw.secret,
            })
        }
        "twilio" => ProviderConfig::Twilio(crate::twilio::parse(v, allow_http)?),
        "kannel" => ProviderConfig::Kannel(crate::kannel::parse(v, allow_http)?),
        "" => return Err(ProviderConfigError::Unknown("(none)".into())),
        other => return Err(ProviderConfigError::Unknown(other.to_string())),
    };
    let max_per_second = match v.get("max_per_second") {
        None | Some(serde_json::Value::Null) => DEFAULT_MAX_PER_SECOND,
        Some(n) => n
            .as_u64()
            .filter(|n| (1..=u64::from(MAX_MAX_PER_SECOND)).contains(n))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                ProviderConfigError::Invalid(format!(
                    "max_per_second must be a whole number from 1 to {MAX_MAX_PER_SECOND}"
                ))
            })?,
    };
    Ok(SmsConfig {
        provider,
        max_per_second,
    })
}

/// Parses a provider URL setting: absolute, with a host, `https://` (or `http://` when
/// `allow_http`), and without user info, which would end up in logs and error messages.
pub(crate) fn provider_url(
    raw: &str,
    field: &str,
    allow_http: bool,
) -> Result<Url, ProviderConfigError> {
    let url = Url::parse(raw).map_err(|e| ProviderConfigError::Invalid(format!("{field}: {e}")))?;
    let scheme_ok = url.scheme() == "https" || (allow_http && url.scheme() == "http");
    if !scheme_ok || url.host_str().is_none() {
        return Err(ProviderConfigError::Invalid(format!(
            "{field} must be an https:// URL"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ProviderConfigError::Invalid(format!(
            "{field} must not carry credentials; use the provider's own settings for them"
        )));
    }
    Ok(url)
}

/// A required, non-empty string setting.
pub(crate) fn required_str(
    v: &serde_json::Value,
    field: &str,
) -> Result<String, ProviderConfigError> {
    match v.get(field) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(serde_json::Value::String(_)) => Err(ProviderConfigError::Invalid(format!(
            "{field} must not be empty"
        ))),
        None | Some(serde_json::Value::Null) => {
            Err(ProviderConfigError::Invalid(format!("{field} is missing")))
        }
        Some(_) => Err(ProviderConfigError::Invalid(format!(
            "{field} must be a string"
        ))),
    }
}

/// An optional string setting; present means non-empty.
pub(crate) fn optional_str(
    v: &serde_json::Value,
    field: &str,
) -> Result<Option<String>, ProviderConfigError> {
    match v.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(_) => required_str(v, field).map(Some),
    }
}

/// The body sent to the provider.
#[derive(Debug, Clone, Serialize)]
pub struct SmsPayload<'a> {
    /// The provider's deduplication key.
    pub message_id: &'a str,
    /// E.164.
    pub to: &'a str,
    pub text: &'a str,
    pub segments: usize,
    pub encoding: Encoding,
}

/// What an attempt needs besides the SMS itself.
#[derive(Debug, Clone, Copy)]
pub struct SendContext<'a> {
    /// Signing time of webhook requests.
    pub now_secs: i64,
    /// Public base URL of the delivery report listener (`sms.public_dlr_base_url`, without a
    /// trailing `/`); without it, Twilio and Kannel are not asked for delivery reports.
    pub dlr_base: Option<&'a str>,
}

/// Why a provider refused an SMS for good; decides the `pushgate_sms_total` result label, so
/// operators can tell an account problem from bad input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Any other refusal.
    Refused,
    /// The provider says the number cannot receive an SMS.
    InvalidNumber,
    /// The provider refused the account credentials: every SMS of the app fails until the
    /// app's settings are fixed.
    Credentials,
}

impl Rejection {
    /// The `result` label of `pushgate_sms_total`.
    pub fn metric(self) -> &'static str {
        match self {
            Rejection::Refused => "rejected",
            Rejection::InvalidNumber => "invalid_phone",
            Rejection::Credentials => "credentials",
        }
    }
}

/// What came of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The provider took the SMS.
    Accepted { reference: Option<String> },
    /// The provider refused it for good.
    Rejected { detail: String, cause: Rejection },
    /// Unknown or temporary: 5xx, 408, 429, timeout, connection failure. Retried.
    Unavailable {
        detail: String,
        retry_after: Option<Duration>,
        /// The request may have reached the provider (it was sent and no answer came back):
        /// repeating it is only safe with a provider that deduplicates.
        maybe_sent: bool,
    },
}

/// Sends one SMS to the app's provider.
pub async fn send(
    client: &reqwest::Client,
    cfg: &ProviderConfig,
    payload: &SmsPayload<'_>,
    ctx: SendContext<'_>,
) -> SendOutcome {
    match cfg {
        ProviderConfig::Webhook(w) => send_webhook(client, w, payload, ctx.now_secs).await,
        ProviderConfig::Twilio(t) => crate::twilio::send(client, t, payload, ctx.dlr_base).await,
        ProviderConfig::Kannel(k) => crate::kannel::send(client, k, payload, ctx.dlr_base).await,
    }
}

async fn send_webhook(
    client: &reqwest::Client,
    w: &WebhookProvider,
    payload: &SmsPayload<'_>,
    now_secs: i64,
) -> SendOutcome {
    let body = match serde_json::to_vec(payload) {
        Ok(b) => b,
        // serialising plain strings and numbers cannot fail; treat it as a refusal rather than
        // retrying something that would fail the same way until the deadline
        Err(e) => {
            return SendOutcome::Rejected {
                detail: format!("cannot encode SMS request: {e}"),
                cause: Rejection::Refused,
            }
        }
    };
    let sig = signature::header_value(&w.secret, now_secs, &body);
    let resp = client
        .post(w.url.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(signature::HEADER, sig)
        .body(body)
        .send()
        .await;
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => return transport_failure(&e),
    };
    let status = resp.status();
    let retry_after = retry_after(resp.headers());
    let body = read_limited(&mut resp).await;
    classify(status, &body, retry_after)
}

/// Maps a webhook provider's answer to an outcome.
fn classify(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> SendOutcome {
    if status.is_success() {
        return SendOutcome::Accepted {
            reference: reference_from(body),
        };
    }
    let detail = format!("HTTP {}{}", status.as_u16(), snippet(body));
    if is_temporary(status) {
        return SendOutcome::Unavailable {
            detail,
            retry_after,
            maybe_sent: false,
        };
    }
    // 4xx, and 3xx: redirects are not followed (the signed POST must reach the configured URL
    // and nothing else), so a moved endpoint is a configuration error the app owner must fix
    SendOutcome::Rejected {
        detail: format!("provider refused the SMS: {detail}"),
        cause: Rejection::Refused,
    }
}

/// 5xx, and 408/429: the provider saying "not now", not "never".
pub(crate) fn is_temporary(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// The provider reference of an acceptance: `{"id": "…"}` (a string or a number). Anything
/// else, including an empty body, is an acceptance without a reference.
fn reference_from(body: &[u8]) -> Option<String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let id = match v.get("id")? {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    clean_reference(id)
}

/// A provider reference fit to be stored and shown: non-empty, bounded, printable.
pub(crate) fn clean_reference(id: String) -> Option<String> {
    let clean = !id.is_empty()
        && id.chars().count() <= MAX_REFERENCE_CHARS
        && !id.chars().any(char::is_control);
    clean.then_some(id)
}

/// `": <first characters of the body>"`, or nothing for an empty body.
pub(crate) fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(DETAIL_SNIPPET_CHARS)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// `Retry-After` in seconds, capped at [`MAX_RETRY_AFTER`]. The HTTP-date form is not read:
/// the providers here send seconds, and a date would need a trusted clock on both sides.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

/// The outcome of a request that got no answer. Only a failed connection proves the provider
/// never saw the request; after a timeout or a broken connection it may have.
pub(crate) fn transport_failure(e: &reqwest::Error) -> SendOutcome {
    let maybe_sent = !e.is_connect();
    let detail = if e.is_connect() {
        format!("cannot connect to provider: {e}")
    } else if e.is_timeout() {
        "provider did not answer in time".into()
    } else {
        format!("provider request failed: {e}")
    };
    SendOutcome::Unavailable {
        detail,
        retry_after: None,
        maybe_sent,
    }
}

/// Reads at most [`MAX_RESPONSE_BYTES`] of the body
/// ([`pushgate_runtime::answers::read_bounded`]).
pub(crate) async fn read_limited(resp: &mut reqwest::Response) -> Vec<u8> {
    pushgate_runtime::answers::read_bounded(resp, MAX_RESPONSE_BYTES).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn provider_of(v: &serde_json::Value, allow_http: bool) -> Option<ProviderConfig> {
        parse_config(Some(v), allow_http).ok().map(|c| c.provider)
    }

    #[test]
    fn webhook_settings_parse() {
        let v =
            json!({"provider": "webhook", "url": "https://sms.example.com/send", "secret": "k"});
        let cfg = parse_config(Some(&v), false);
        assert!(
            matches!(&cfg, Ok(SmsConfig { provider: ProviderConfig::Webhook(w), max_per_second: DEFAULT_MAX_PER_SECOND }) if w.url.as_str() == "https://sms.example.com/send" && w.secret == "k"),
            "{cfg:?}"
        );
        assert!(!format!("{cfg:?}").contains("\"k\""), "secret in Debug");
    }

    #[test]
    fn missing_and_unknown_providers_say_no_provider() {
        assert_eq!(parse_config(None, false), Err(ProviderConfigError::Missing));
        assert_eq!(
            parse_config(Some(&serde_json::Value::Null), false),
            Err(ProviderConfigError::Missing)
        );
        let v = json!({"provider": "carrier-pigeon"});
        let e = parse_config(Some(&v), false);
        assert_eq!(
            e,
            Err(ProviderConfigError::Unknown("carrier-pigeon".into()))
        );
        assert_eq!(e.err().map(|e| e.to_string()).as_deref(), Some(NO_PROVIDER));
        assert!(matches!(
            parse_config(Some(&json!({"url": "x"})), false),
            Err(ProviderConfigError::Unknown(_))
        ));
    }

    #[test]
    fn webhook_needs_https_and_a_secret() {
        let http = json!({"provider": "webhook", "url": "http://127.0.0.1:9/send", "secret": "k"});
        assert!(matches!(
            parse_config(Some(&http), false),
            Err(ProviderConfigError::Invalid(_))
        ));
        assert!(parse_config(Some(&http), true).is_ok());
        let no_secret =
            json!({"provider": "webhook", "url": "https://x.example/send", "secret": ""});
        assert!(matches!(
            parse_config(Some(&no_secret), false),
            Err(ProviderConfigError::Invalid(_))
        ));
        let no_url = json!({"provider": "webhook", "secret": "k"});
        assert!(matches!(
            parse_config(Some(&no_url), false),
            Err(ProviderConfigError::Invalid(_))
        ));
        let bad_url = json!({"provider": "webhook", "url": "not a url", "secret": "k"});
        assert!(matches!(
            parse_config(Some(&bad_url), false),
            Err(ProviderConfigError::Invalid(_))
        ));
        let creds =
            json!({"provider": "webhook", "url": "https://u:p@x.example/send", "secret": "k"});
        assert!(matches!(
            parse_config(Some(&creds), false),
            Err(ProviderConfigError::Invalid(_))
        ));
    }

    #[test]
    fn max_per_second_defaults_and_bounds() {
        let base = json!({"provider": "webhook", "url": "https://x.example/send", "secret": "k"});
        let with = |n: serde_json::Value| {
            let mut v = base.clone();
            v["max_per_second"] = n;
            parse_config(Some(&v), false).map(|c| c.max_per_second)
        };
        assert_eq!(with(serde_json::Value::Null), Ok(DEFAULT_MAX_PER_SECOND));
        assert_eq!(with(json!(1)), Ok(1));
        assert_eq!(with(json!(MAX_MAX_PER_SECOND)), Ok(MAX_MAX_PER_SECOND));
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!("10"),
            json!(MAX_MAX_PER_SECOND + 1),
        ] {
            assert!(
                matches!(with(bad.clone()), Err(ProviderConfigError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_the_webhook_provider_deduplicates() {
        let webhook =
            json!({"provider": "webhook", "url": "https://x.example/send", "secret": "k"});
        let twilio = json!({"provider": "twilio", "account_sid": "AC1", "auth_token": "t", "from": "+15005550006"});
        let kannel = json!({"provider": "kannel", "sendsms_url": "https://k.example/cgi-bin/sendsms", "username": "u", "password": "p", "dlr_secret": "0123456789abcdef"});
        let names: Vec<(&str, bool)> = [webhook, twilio, kannel]
            .iter()
            .filter_map(|v| provider_of(v, false))
            .map(|p| (p.name(), p.deduplicates()))
            .collect();
        assert_eq!(
            names,
            vec![("webhook", true), ("twilio", false), ("kannel", false)]
        );
    }

    #[test]
    fn success_with_and_without_reference() {
        assert_eq!(
            classify(StatusCode::OK, br#"{"id":"SM123"}"#, None),
            SendOutcome::Accepted {
                reference: Some("SM123".into())
            }
        );
        assert_eq!(
            classify(StatusCode::ACCEPTED, br#"{"id":42}"#, None),
            SendOutcome::Accepted {
                reference: Some("42".into())
            }
        );
        assert_eq!(
            classify(StatusCode::NO_CONTENT, b"", None),
            SendOutcome::Accepted { reference: None }
        );
        assert_eq!(
            classify(StatusCode::OK, b"queued", None),
            SendOutcome::Accepted { reference: None }
        );
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(MAX_REFERENCE_CHARS + 1));
        assert_eq!(
            classify(StatusCode::OK, long.as_bytes(), None),
            SendOutcome::Accepted { reference: None }
        );
        assert_eq!(
            classify(StatusCode::OK, br#"{"id":"a\nb"}"#, None),
            SendOutcome::Accepted { reference: None }
        );
    }

    #[test]
    fn client_errors_are_final_with_the_reason() {
        match classify(
            StatusCode::BAD_REQUEST,
            b"{\"error\":\"bad number\"}\n",
            None,
        ) {
            SendOutcome::Rejected { detail, cause } => {
                assert_eq!(
                    detail,
                    "provider refused the SMS: HTTP 400: {\"error\":\"bad number\"}"
                );
                assert_eq!(cause, Rejection::Refused);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(StatusCode::FOUND, b"", None),
            SendOutcome::Rejected { .. }
        ));
        let long = "e".repeat(1000);
        match classify(StatusCode::UNPROCESSABLE_ENTITY, long.as_bytes(), None) {
            SendOutcome::Rejected { detail, .. } => assert!(detail.len() < 260, "{detail}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn server_errors_and_throttling_are_retried() {
        let ra = Some(Duration::from_secs(7));
        assert_eq!(
            classify(StatusCode::SERVICE_UNAVAILABLE, b"", ra),
            SendOutcome::Unavailable {
                detail: "HTTP 503".into(),
                retry_after: ra,
                maybe_sent: false,
            }
        );
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, b"", None),
            SendOutcome::Unavailable { .. }
        ));
        assert!(matches!(
            classify(StatusCode::REQUEST_TIMEOUT, b"", None),
            SendOutcome::Unavailable { .. }
        ));
        assert!(matches!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, b"oops", None),
            SendOutcome::Unavailable { .. }
        ));
    }

    #[test]
    fn retry_after_seconds_are_read_and_capped() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static(" 12 "));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(12)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("999999"));
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn payload_field_names() {
        let p = SmsPayload {
            message_id: "m",
            to: "+41791234567",
            text: "hi",
            segments: 1,
            encoding: Encoding::Gsm7,
        };
        let v = serde_json::to_value(&p).unwrap_or_default();
        assert_eq!(
            v,
            json!({"message_id": "m", "to": "+41791234567", "text": "hi", "segments": 1, "encoding": "GSM-7"})
        );
    }
}
