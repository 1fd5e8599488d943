//! The Twilio-compatible REST provider.
//!
//! ```json
//! {"provider": "twilio", "account_sid": "AC…", "auth_token": "…", "from": "+15005550006"}
//! ```
//!
//! `base_url` (default `https://api.twilio.com`) points it at another provider that speaks the
//! same API; `messaging_service_sid` replaces `from` to let a Twilio Messaging Service pick the
//! sender. One SMS is
//! `POST {base_url}/2010-04-01/Accounts/{account_sid}/Messages.json` with HTTP basic auth
//! `account_sid:auth_token` and the form fields `To`, `From` or `MessagingServiceSid`, `Body`,
//! and `StatusCallback` when `sms.public_dlr_base_url` is set.
//!
//! Answers: 201 is an acceptance with the message `sid` as reference; 400 with error code
//! 21211 or 21614 is an invalid number; 401/403 is a credentials failure (every SMS of the app
//! will fail until its settings are fixed); 408/429/5xx are retried, honouring `Retry-After`;
//! anything else is a refusal with Twilio's code and message as detail.
//!
//! Status callbacks come to `POST /v1/sms/twilio/{message_id}` (see [`crate::dlr`]) and are
//! authenticated with `X-Twilio-Signature` ([`signature`]).

use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use sha1::Sha1;
use subtle::ConstantTimeEq;

use crate::provider::{
    self, optional_str, provider_url, read_limited, required_str, ProviderConfigError, Rejection,
    SendOutcome, SmsPayload,
};

/// Where Twilio's API lives.
pub const DEFAULT_BASE_URL: &str = "https://api.twilio.com";

/// The header of a status callback's signature.
pub const SIGNATURE_HEADER: &str = "X-Twilio-Signature";

/// Twilio error codes meaning the `To` number cannot get an SMS: 21211 "invalid 'To' phone
/// number", 21614 "'To' number is not a valid mobile number".
pub const INVALID_NUMBER_CODES: [i64; 2] = [21211, 21614];

/// Who the SMS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// A phone number or alphanumeric sender id (`From`).
    From(String),
    /// A Messaging Service that picks the sender itself (`MessagingServiceSid`).
    MessagingService(String),
}

/// The Twilio-compatible provider of one app.
#[derive(Clone, PartialEq, Eq)]
pub struct TwilioProvider {
    /// `{base_url}/2010-04-01/Accounts/{account_sid}/Messages.json`.
    pub messages_url: Url,
    pub account_sid: String,
    /// Basic-auth password, and the key of status callback signatures.
    pub auth_token: String,
    pub sender: Sender,
}

/// Hand-written so the auth token never ends up in a log line.
impl std::fmt::Debug for TwilioProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioProvider")
            .field("messages_url", &self.messages_url.as_str())
            .field("account_sid", &self.account_sid)
            .field("auth_token", &"<redacted>")
            .field("sender", &self.sender)
            .finish()
    }
}

/// Reads `{"provider": "twilio", …}`.
pub(crate) fn parse(
    v: &serde_json::Value,
    allow_http: bool,
) -> Result<TwilioProvider, ProviderConfigError> {
    let base = optional_str(v, "base_url")?.unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
    let base = provider_url(&base, "base_url", allow_http)?;
    if base.query().is_some() || base.fragment().is_some() {
        return Err(ProviderConfigError::Invalid(
            "base_url must not have a query or fragment".into(),
        ));
    }
    let account_sid = required_str(v, "account_sid")?;
    // it becomes a path segment; anything but these would need escaping no provider expects
    if !account_sid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ProviderConfigError::Invalid(
            "account_sid may only contain letters, digits, '-' and '_'".into(),
        ));
    }
    let auth_token = required_str(v, "auth_token")?;
    let sender = match (
        optional_str(v, "from")?,
        optional_str(v, "messaging_service_sid")?,
    ) {
        (Some(from), None) => Sender::From(from),
        (None, Some(sid)) => Sender::MessagingService(sid),
        _ => {
            return Err(ProviderConfigError::Invalid(
                "exactly one of from and messaging_service_sid must be set".into(),
            ))
        }
    };
    let mut messages_url = base;
    match messages_url.path_segments_mut() {
        Ok(mut segments) => {
            segments.pop_if_empty().extend([
                "2010-04-01",
                "Accounts",
                account_sid.as_str(),
                "Messages.json",
            ]);
        }
        Err(()) => {
            return Err(ProviderConfigError::Invalid(
                "base_url cannot have a path".into(),
            ))
        }
    }
    Ok(TwilioProvider {
        messages_url,
        account_sid,
        auth_token,
        sender,
    })
}

/// The path of a message's status callback on the delivery report listener.
pub fn callback_path(message_id: &str) -> String {
    format!("/v1/sms/twilio/{message_id}")
}

/// The form body of one SMS.
fn form(t: &TwilioProvider, payload: &SmsPayload<'_>, dlr_base: Option<&str>) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("To", payload.to);
    match &t.sender {
        Sender::From(from) => form.append_pair("From", from),
        Sender::MessagingService(sid) => form.append_pair("MessagingServiceSid", sid),
    };
    form.append_pair("Body", payload.text);
    if let Some(base) = dlr_base {
        form.append_pair(
            "StatusCallback",
            &format!("{base}{}", callback_path(payload.message_id)),
        );
    }
    form.finish()
}

/// Sends one SMS.
pub(crate) async fn send(
    client: &reqwest::Client,
    t: &TwilioProvider,
    payload: &SmsPayload<'_>,
    dlr_base: Option<&str>,
) -> SendOutcome {
    let resp = client
        .post(t.messages_url.clone())
        .basic_auth(&t.account_sid, Some(&t.auth_token))
        .header(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        )
        .body(form(t, payload, dlr_base))
        .send()
        .await;
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => return provider::transport_failure(&e),
    };
    let status = resp.status();
    let retry_after = provider::retry_after(resp.headers());
    let body = read_limited(&mut resp).await;
    classify(status, &body, retry_after)
}

/// Twilio's error body: `{"code": 21211, "message": "…", "more_info": "…", "status": 400}`.
fn error_of(body: &[u8]) -> (Option<i64>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None);
    };
    let code = v.get("code").and_then(serde_json::Value::as_i64);
    let message = v
        .get("message")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string);
    (code, message)
}

/// `"HTTP 400: Twilio error 21606: The From phone number … "`, or the raw body's start when it
/// is not Twilio's JSON.
fn describe(status: StatusCode, body: &[u8]) -> String {
    match error_of(body) {
        (Some(code), Some(message)) => format!(
            "HTTP {}: Twilio error {code}{}",
            status.as_u16(),
            provider::snippet(message.as_bytes())
        ),
        (Some(code), None) => format!("HTTP {}: Twilio error {code}", status.as_u16()),
        _ => format!("HTTP {}{}", status.as_u16(), provider::snippet(body)),
    }
}

/// Maps an answer of the Messages API to an outcome.
fn classify(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<std::time::Duration>,
) -> SendOutcome {
    if status.is_success() {
        let reference = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("sid").and_then(|s| s.as_str()).map(str::to_string))
            .and_then(provider::clean_reference);
        return SendOutcome::Accepted { reference };
    }
    if provider::is_temporary(status) {
        return SendOutcome::Unavailable {
            detail: describe(status, body),
            retry_after,
            maybe_sent: false,
        };
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return SendOutcome::Rejected {
            detail: format!(
                "SMS provider refused the credentials: {}",
                describe(status, body)
            ),
            cause: Rejection::Credentials,
        };
    }
    if status == StatusCode::BAD_REQUEST {
        if let (Some(code), _) = error_of(body) {
            if INVALID_NUMBER_CODES.contains(&code) {
                return SendOutcome::Rejected {
                    detail: provider::INVALID_NUMBER.into(),
                    cause: Rejection::InvalidNumber,
                };
            }
        }
    }
    SendOutcome::Rejected {
        detail: format!("provider refused the SMS: {}", describe(status, body)),
        cause: Rejection::Refused,
    }
}

/// `X-Twilio-Signature` of a request: base64 of HMAC-SHA1, keyed with the auth token, over
/// the full URL Twilio requested followed by every POST parameter as name then value, sorted
/// by name (byte order, i.e. case-sensitive; a name given several times contributes each of
/// its values, sorted). This is Twilio's documented scheme, and what its SDKs' validators do.
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    // HMAC accepts keys of any length, so this cannot fail; an empty signature matches no
    // header (verify refuses empty ones)
    let Ok(mut mac) = <Hmac<Sha1> as Mac>::new_from_slice(auth_token.as_bytes()) else {
        return String::new();
    };
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Checks a status callback's `X-Twilio-Signature` against each URL form Twilio may have
/// signed (see [`signed_urls`]); constant-time, so answer timing does not reveal how much of
/// a guess matched.
pub fn verify(
    auth_token: &str,
    urls: &[String],
    params: &[(String, String)],
    header: Option<&str>,
) -> bool {
    let Some(given) = header.map(str::trim).filter(|h| !h.is_empty()) else {
        return false;
    };
    urls.iter().fold(false, |ok, url| {
        let expected = signature(auth_token, url, params);
        ok | bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
    })
}

/// The URL forms a callback to `{base}{path_and_query}` may be signed over: as given, and with
/// the scheme's default port spelled out when the base has none (Twilio has signed
/// `https://host:443/…` for `https://host/…`; its SDK validators accept both for this reason).
pub fn signed_urls(base: &str, path_and_query: &str) -> Vec<String> {
    let exact = format!("{base}{path_and_query}");
    let mut urls = vec![exact.clone()];
    if let Ok(u) = Url::parse(&exact) {
        if let (None, Some(port), Some(host)) = (u.port(), u.port_or_known_default(), u.host_str())
        {
            // the base carries no query, user info or fragment (settings validation), so it is
            // scheme, host and path; the path and query follow unchanged
            let prefix = format!("{}://{host}", u.scheme());
            if let Some(rest) = exact.strip_prefix(&prefix) {
                urls.push(format!("{prefix}:{port}{rest}"));
            }
        }
    }
    urls
}

/// What a status callback means for the SMS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackOutcome {
    Delivered,
    /// `undelivered` or `failed`, with Twilio's `ErrorCode` if it sent one.
    Failed {
        status: String,
        error_code: Option<String>,
    },
    /// `queued`, `sending`, `sent`, `accepted`, … : progress that adds nothing to the history.
    Progress,
}

/// Reads `MessageStatus` and `ErrorCode` of a status callback.
pub fn callback_outcome(params: &[(String, String)]) -> Option<CallbackOutcome> {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
    };
    let status = get("MessageStatus")?;
    let error_code = get("ErrorCode")
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    Some(match status {
        "delivered" => CallbackOutcome::Delivered,
        "undelivered" | "failed" => CallbackOutcome::Failed {
            status: status.to_string(),
            error_code,
        },
        _ => CallbackOutcome::Progress,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::Encoding;
    use serde_json::json;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn config(v: serde_json::Value) -> Result<TwilioProvider, ProviderConfigError> {
        parse(&v, false)
    }

    #[test]
    fn settings_build_the_messages_url() {
        let t = config(
            json!({"provider": "twilio", "account_sid": "AC123", "auth_token": "s3cr3t-value", "from": "+15005550006"}),
        );
        let t = t.expect("valid settings");
        assert_eq!(
            t.messages_url.as_str(),
            "https://api.twilio.com/2010-04-01/Accounts/AC123/Messages.json"
        );
        assert_eq!(t.sender, Sender::From("+15005550006".into()));
        assert!(
            !format!("{t:?}").contains("s3cr3t-value"),
            "auth token in Debug"
        );
        let t = config(
            json!({"provider": "twilio", "base_url": "https://sms.example.com/api/laml/", "account_sid": "p-1", "auth_token": "tok", "messaging_service_sid": "MG1"}),
        );
        let t = t.expect("valid settings");
        assert_eq!(
            t.messages_url.as_str(),
            "https://sms.example.com/api/laml/2010-04-01/Accounts/p-1/Messages.json"
        );
        assert_eq!(t.sender, Sender::MessagingService("MG1".into()));
    }

    #[test]
    fn settings_are_checked() {
        for bad in [
            json!({"provider": "twilio", "auth_token": "t", "from": "x"}),
            json!({"provider": "twilio", "account_sid": "AC1", "from": "x"}),
            json!({"provider": "twilio", "account_sid": "AC1", "auth_token": "", "from": "x"}),
            json!({"provider": "twilio", "account_sid": "AC/../1", "auth_token": "t", "from": "x"}),
            json!({"provider": "twilio", "account_sid": "AC1", "auth_token": "t"}),
            json!({"provider": "twilio", "account_sid": "AC1", "auth_token": "t", "from": "x", "messaging_service_sid": "MG1"}),
            json!({"provider": "twilio", "base_url": "http://api.example.com", "account_sid": "AC1", "auth_token": "t", "from": "x"}),
            json!({"provider": "twilio", "base_url": "https://api.example.com/?a=1", "account_sid": "AC1", "auth_token": "t", "from": "x"}),
            json!({"provider": "twilio", "account_sid": 7, "auth_token": "t", "from": "x"}),
        ] {
            assert!(
                matches!(config(bad.clone()), Err(ProviderConfigError::Invalid(_))),
                "{bad}"
            );
        }
        let http = json!({"provider": "twilio", "base_url": "http://127.0.0.1:9", "account_sid": "AC1", "auth_token": "t", "from": "x"});
        assert!(parse(&http, true).is_ok());
    }

    #[test]
    fn form_carries_the_fields_twilio_expects() {
        let t = config(json!({"provider": "twilio", "account_sid": "AC1", "auth_token": "t", "from": "+15005550006"}))
            .expect("valid settings");
        let p = SmsPayload {
            message_id: "0190a0a0-0000-7000-8000-000000000000",
            to: "+41791234567",
            text: "Grüße & 1+1",
            segments: 1,
            encoding: Encoding::Gsm7,
        };
        let body = form(&t, &p, Some("https://pg.example.com"));
        let got: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        assert_eq!(
            got,
            pairs(&[
                ("To", "+41791234567"),
                ("From", "+15005550006"),
                ("Body", "Grüße & 1+1"),
                (
                    "StatusCallback",
                    "https://pg.example.com/v1/sms/twilio/0190a0a0-0000-7000-8000-000000000000"
                ),
            ])
        );
        let body = form(&t, &p, None);
        assert!(!body.contains("StatusCallback"), "{body}");
    }

    #[test]
    fn answers_map_to_outcomes() {
        assert_eq!(
            classify(
                StatusCode::CREATED,
                br#"{"sid":"SM0123","status":"queued"}"#,
                None
            ),
            SendOutcome::Accepted {
                reference: Some("SM0123".into())
            }
        );
        assert_eq!(
            classify(StatusCode::CREATED, b"", None),
            SendOutcome::Accepted { reference: None }
        );
        for code in INVALID_NUMBER_CODES {
            let body = json!({"code": code, "message": "The 'To' number +1 is not a valid phone number.", "status": 400}).to_string();
            assert_eq!(
                classify(StatusCode::BAD_REQUEST, body.as_bytes(), None),
                SendOutcome::Rejected {
                    detail: "invalid phone number".into(),
                    cause: Rejection::InvalidNumber
                }
            );
        }
        let body = json!({"code": 21606, "message": "The From phone number is not a valid, SMS-capable inbound phone number", "status": 400}).to_string();
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, body.as_bytes(), None),
            SendOutcome::Rejected {
                detail: "provider refused the SMS: HTTP 400: Twilio error 21606: The From phone number is not a valid, SMS-capable inbound phone number".into(),
                cause: Rejection::Refused
            }
        );
        let body = json!({"code": 20003, "message": "Authenticate", "status": 401}).to_string();
        assert_eq!(
            classify(StatusCode::UNAUTHORIZED, body.as_bytes(), None),
            SendOutcome::Rejected {
                detail: "SMS provider refused the credentials: HTTP 401: Twilio error 20003: Authenticate".into(),
                cause: Rejection::Credentials
            }
        );
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, b"nope", None),
            SendOutcome::Rejected {
                cause: Rejection::Credentials,
                ..
            }
        ));
        let ra = Some(std::time::Duration::from_secs(3));
        assert_eq!(
            classify(
                StatusCode::TOO_MANY_REQUESTS,
                br#"{"code":20429,"message":"Too Many Requests"}"#,
                ra
            ),
            SendOutcome::Unavailable {
                detail: "HTTP 429: Twilio error 20429: Too Many Requests".into(),
                retry_after: ra,
                maybe_sent: false
            }
        );
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, b"<html>", None),
            SendOutcome::Unavailable {
                maybe_sent: false,
                ..
            }
        ));
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, b"", None),
            SendOutcome::Rejected {
                cause: Rejection::Refused,
                ..
            }
        ));
    }

    #[test]
    fn signature_matches_twilios_documented_example() {
        // the example of Twilio's webhook security documentation (also twilio-node's fixture)
        let params = pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]);
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            signature("12345", url, &params),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        // the order the fields arrive in does not matter
        let mut reversed = params.clone();
        reversed.reverse();
        assert_eq!(
            signature("12345", url, &reversed),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        let urls = vec![url.to_string()];
        assert!(verify(
            "12345",
            &urls,
            &params,
            Some("RSOYDt4T1cUTdK1PDd93/VVr8B8=")
        ));
    }

    #[test]
    fn wrong_token_url_params_or_header_fail() {
        let params = pairs(&[("MessageSid", "SM1"), ("MessageStatus", "delivered")]);
        let url = "https://pg.example.com/v1/sms/twilio/m".to_string();
        let good = signature("tok", &url, &params);
        let urls = vec![url.clone()];
        assert!(verify("tok", &urls, &params, Some(&good)));
        assert!(!verify("other", &urls, &params, Some(&good)));
        assert!(!verify(
            "tok",
            &["https://pg.example.com/v1/sms/twilio/n".to_string()],
            &params,
            Some(&good)
        ));
        let tampered = pairs(&[("MessageSid", "SM1"), ("MessageStatus", "failed")]);
        assert!(!verify("tok", &urls, &tampered, Some(&good)));
        let extra = pairs(&[
            ("MessageSid", "SM1"),
            ("MessageStatus", "delivered"),
            ("ErrorCode", ""),
        ]);
        assert!(!verify("tok", &urls, &extra, Some(&good)));
        assert!(!verify("tok", &urls, &params, None));
        assert!(!verify("tok", &urls, &params, Some("")));
        assert!(!verify("tok", &[], &params, Some(&good)));
    }

    #[test]
    fn default_port_form_is_also_accepted() {
        assert_eq!(
            signed_urls("https://pg.example.com", "/v1/sms/twilio/m"),
            vec![
                "https://pg.example.com/v1/sms/twilio/m".to_string(),
                "https://pg.example.com:443/v1/sms/twilio/m".to_string()
            ]
        );
        assert_eq!(
            signed_urls("http://127.0.0.1:9107/pg", "/v1/sms/twilio/m"),
            vec!["http://127.0.0.1:9107/pg/v1/sms/twilio/m".to_string()]
        );
        let params = pairs(&[("MessageStatus", "delivered")]);
        let sig = signature("tok", "https://pg.example.com:443/v1/sms/twilio/m", &params);
        assert!(verify(
            "tok",
            &signed_urls("https://pg.example.com", "/v1/sms/twilio/m"),
            &params,
            Some(&sig)
        ));
    }

    #[test]
    fn callback_statuses() {
        let of = |status: &str, code: Option<&str>| {
            let mut p = vec![
                ("MessageSid".to_string(), "SM1".to_string()),
                ("MessageStatus".to_string(), status.to_string()),
            ];
            if let Some(c) = code {
                p.push(("ErrorCode".to_string(), c.to_string()));
            }
            callback_outcome(&p)
        };
        assert_eq!(of("delivered", None), Some(CallbackOutcome::Delivered));
        assert_eq!(
            of("undelivered", Some("30003")),
            Some(CallbackOutcome::Failed {
                status: "undelivered".into(),
                error_code: Some("30003".into())
            })
        );
        assert_eq!(
            of("failed", Some("")),
            Some(CallbackOutcome::Failed {
                status: "failed".into(),
                error_code: None
            })
        );
        for s in ["queued", "sending", "sent", "accepted", "scheduled", "read"] {
            assert_eq!(of(s, None), Some(CallbackOutcome::Progress), "{s}");
        }
        assert_eq!(callback_outcome(&pairs(&[("MessageSid", "SM1")])), None);
    }
}
