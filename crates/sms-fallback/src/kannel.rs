//! The Kannel provider: an SMS through a Kannel gateway's `sendsms` interface (smsbox).
//!
//! ```json
//! {"provider": "kannel", "sendsms_url": "https://kannel.internal:13013/cgi-bin/sendsms",
//!  "username": "pushgate", "password": "…", "from": "Pushgate", "dlr_secret": "…"}
//! ```
//!
//! One SMS is `GET {sendsms_url}?username&password&to&text&charset=UTF-8` (plus `coding=2`
//! for a text that needs UCS-2, so Kannel converts it to UCS-2 instead of mangling it into
//! GSM-7, and `from` when set; without it Kannel's own default sender applies). When
//! `sms.public_dlr_base_url` is set it also carries `dlr-mask=31` (every report type) and
//! `dlr-url={base}/v1/sms/kannel/{message_id}/{token}?type=%d&status=%A`, which Kannel calls
//! with the report type and the SMSC's status text filled in.
//!
//! Kannel cannot sign what it sends, so the delivery report is authenticated by its path: the
//! token is `hex(HMAC-SHA256(dlr_secret, message_id))` ([`dlr_token`]), known only to Pushgate
//! and the Kannel that got it in the `dlr-url`. A report for another message needs another
//! token, which cannot be derived without the app's `dlr_secret`.
//!
//! Answers: 2xx (`202 0: Accepted for delivery`, or `202 3: Queued for later delivery` while
//! Kannel has no SMSC connection) is an acceptance, with the message id as reference (Kannel
//! names no id of its own); 403 or `Authorization failed` is a credentials failure; other 4xx
//! (`Missing receiver number`, `Sender missing and no global set`, …) a refusal with Kannel's
//! text; 5xx, 408, 429 and refused connections are retried.

use reqwest::{StatusCode, Url};
use subtle::ConstantTimeEq;

use pushgate_core::credentials::hmac_sha256;

use crate::encoding::Encoding;
use crate::provider::{
    self, optional_str, provider_url, read_limited, required_str, ProviderConfigError, Rejection,
    SendOutcome, SmsPayload,
};

/// Report types asked for: 1 delivered to the phone, 2 not delivered to the phone, 4 queued
/// on the SMSC, 8 delivered to the SMSC, 16 not delivered to the SMSC.
pub const DLR_MASK: u32 = 31;

/// Shortest `dlr_secret` accepted: the path token is only as strong as the secret.
pub const MIN_DLR_SECRET_BYTES: usize = 16;

/// What Kannel answers to bad credentials (with 403).
const AUTH_FAILED: &str = "Authorization failed";

/// The Kannel provider of one app.
#[derive(Clone, PartialEq, Eq)]
pub struct KannelProvider {
    pub sendsms_url: Url,
    pub username: String,
    pub password: String,
    /// Sender; Kannel's `default-sender`/`global-sender` when unset.
    pub from: Option<String>,
    /// Key of the delivery report path tokens.
    pub dlr_secret: String,
}

/// Hand-written so the password and the DLR secret never end up in a log line.
impl std::fmt::Debug for KannelProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KannelProvider")
            .field("sendsms_url", &self.sendsms_url.as_str())
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("from", &self.from)
            .field("dlr_secret", &"<redacted>")
            .finish()
    }
}

/// Reads `{"provider": "kannel", …}`.
pub(crate) fn parse(
    v: &serde_json::Value,
    allow_http: bool,
) -> Result<KannelProvider, ProviderConfigError> {
    let url = required_str(v, "sendsms_url")?;
    let sendsms_url = provider_url(&url, "sendsms_url", allow_http)?;
    let username = required_str(v, "username")?;
    let password = required_str(v, "password")?;
    let from = optional_str(v, "from")?;
    let dlr_secret = required_str(v, "dlr_secret")?;
    if dlr_secret.len() < MIN_DLR_SECRET_BYTES {
        return Err(ProviderConfigError::Invalid(format!(
            "dlr_secret must be at least {MIN_DLR_SECRET_BYTES} bytes"
        )));
    }
    Ok(KannelProvider {
        sendsms_url,
        username,
        password,
        from,
        dlr_secret,
    })
}

/// The path token that authenticates Kannel's delivery reports for one message.
pub fn dlr_token(dlr_secret: &str, message_id: &str) -> String {
    hex::encode(hmac_sha256(dlr_secret.as_bytes(), message_id.as_bytes()))
}

/// Whether `token` is the message's path token; constant-time, so answer timing does not
/// reveal how much of a guess matched.
pub fn verify_token(dlr_secret: &str, message_id: &str, token: &str) -> bool {
    let expected = dlr_token(dlr_secret, message_id);
    bool::from(expected.as_bytes().ct_eq(token.as_bytes()))
}

/// The path of a message's delivery reports on the delivery report listener.
pub fn dlr_path(dlr_secret: &str, message_id: &str) -> String {
    format!(
        "/v1/sms/kannel/{message_id}/{}",
        dlr_token(dlr_secret, message_id)
    )
}

/// The `sendsms` URL of one SMS.
fn request_url(k: &KannelProvider, payload: &SmsPayload<'_>, dlr_base: Option<&str>) -> Url {
    let mut url = k.sendsms_url.clone();
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("username", &k.username)
            .append_pair("password", &k.password)
            .append_pair("to", payload.to)
            .append_pair("text", payload.text)
            .append_pair("charset", "UTF-8");
        if payload.encoding == Encoding::Ucs2 {
            q.append_pair("coding", "2");
        }
        if let Some(from) = &k.from {
            q.append_pair("from", from);
        }
        if let Some(base) = dlr_base {
            let dlr_url = format!(
                "{base}{}?type=%d&status=%A",
                dlr_path(&k.dlr_secret, payload.message_id)
            );
            q.append_pair("dlr-mask", &DLR_MASK.to_string())
                .append_pair("dlr-url", &dlr_url);
        }
    }
    url
}

/// Sends one SMS.
pub(crate) async fn send(
    client: &reqwest::Client,
    k: &KannelProvider,
    payload: &SmsPayload<'_>,
    dlr_base: Option<&str>,
) -> SendOutcome {
    let resp = client.get(request_url(k, payload, dlr_base)).send().await;
    let mut resp = match resp {
        // reqwest's error text names the URL, which carries the password: strip it
        Err(e) => return provider::transport_failure(&e.without_url()),
        Ok(r) => r,
    };
    let status = resp.status();
    let retry_after = provider::retry_after(resp.headers());
    let body = read_limited(&mut resp).await;
    classify(status, &body, retry_after, payload.message_id)
}

/// Maps a `sendsms` answer to an outcome.
fn classify(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<std::time::Duration>,
    message_id: &str,
) -> SendOutcome {
    if status.is_success() {
        return SendOutcome::Accepted {
            reference: provider::clean_reference(message_id.to_string()),
        };
    }
    let detail = format!("HTTP {}{}", status.as_u16(), provider::snippet(body));
    if status == StatusCode::FORBIDDEN
        || status == StatusCode::UNAUTHORIZED
        || String::from_utf8_lossy(body).contains(AUTH_FAILED)
    {
        return SendOutcome::Rejected {
            detail: format!("SMS provider refused the credentials: {detail}"),
            cause: Rejection::Credentials,
        };
    }
    if provider::is_temporary(status) {
        return SendOutcome::Unavailable {
            detail,
            retry_after,
            maybe_sent: false,
        };
    }
    SendOutcome::Rejected {
        detail: format!("provider refused the SMS: {detail}"),
        cause: Rejection::Refused,
    }
}

/// What a Kannel delivery report means for the SMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlrOutcome {
    /// Type 1: delivered to the phone.
    Delivered,
    /// Type 2 (not delivered to the phone) or 16 (rejected by the SMSC).
    Failed(&'static str),
    /// Type 4 (buffered on the SMSC) or 8 (submitted to the SMSC): progress that adds nothing
    /// to the history.
    Progress,
}

/// Reads a report's `type`. Kannel sends one bit per report; a combination is read by its
/// most final bit.
pub fn dlr_outcome(kind: u32) -> Option<DlrOutcome> {
    if kind & 1 != 0 {
        Some(DlrOutcome::Delivered)
    } else if kind & 2 != 0 {
        Some(DlrOutcome::Failed("not delivered to the phone"))
    } else if kind & 16 != 0 {
        Some(DlrOutcome::Failed("rejected by the SMSC"))
    } else if kind & (4 | 8) != 0 {
        Some(DlrOutcome::Progress)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "0190a0a0-0000-7000-8000-000000000000";

    fn config() -> KannelProvider {
        let v = json!({"provider": "kannel", "sendsms_url": "http://127.0.0.1:13013/cgi-bin/sendsms", "username": "pg", "password": "p&ss", "from": "Pushgate", "dlr_secret": "0123456789abcdef"});
        parse(&v, true).expect("valid settings")
    }

    fn payload(text: &str, encoding: Encoding) -> SmsPayload<'_> {
        SmsPayload {
            message_id: ID,
            to: "+41791234567",
            text,
            segments: 1,
            encoding,
        }
    }

    fn query(url: &Url) -> Vec<(String, String)> {
        url.query_pairs().into_owned().collect()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn settings_are_checked() {
        let k = config();
        assert_eq!(k.from.as_deref(), Some("Pushgate"));
        let dbg = format!("{k:?}");
        assert!(
            !dbg.contains("p&ss") && !dbg.contains("0123456789abcdef"),
            "{dbg}"
        );
        let ok = json!({"provider": "kannel", "sendsms_url": "https://k.example/cgi-bin/sendsms", "username": "u", "password": "p", "dlr_secret": "0123456789abcdef"});
        assert!(parse(&ok, false).is_ok_and(|k| k.from.is_none()));
        for (field, value) in [
            ("sendsms_url", json!("http://k.example/cgi-bin/sendsms")),
            ("sendsms_url", json!(null)),
            ("username", json!("")),
            ("password", json!(null)),
            ("dlr_secret", json!("short")),
            ("dlr_secret", json!(null)),
            ("from", json!("")),
        ] {
            let mut bad = ok.clone();
            bad[field] = value.clone();
            assert!(
                matches!(parse(&bad, false), Err(ProviderConfigError::Invalid(_))),
                "{field}={value}"
            );
        }
    }

    #[test]
    fn gsm_text_goes_as_utf8_without_coding() {
        let url = request_url(&config(), &payload("Your code: 1234", Encoding::Gsm7), None);
        assert_eq!(
            query(&url),
            vec![
                pair("username", "pg"),
                pair("password", "p&ss"),
                pair("to", "+41791234567"),
                pair("text", "Your code: 1234"),
                pair("charset", "UTF-8"),
                pair("from", "Pushgate"),
            ]
        );
        assert_eq!(url.path(), "/cgi-bin/sendsms");
    }

    #[test]
    fn ucs2_text_asks_for_coding_2_and_dlr_url_carries_the_token() {
        let url = request_url(
            &config(),
            &payload("Привет", Encoding::Ucs2),
            Some("https://pg.example.com"),
        );
        let q = query(&url);
        assert!(q.contains(&pair("coding", "2")), "{q:?}");
        assert!(q.contains(&pair("text", "Привет")), "{q:?}");
        assert!(q.contains(&pair("dlr-mask", "31")), "{q:?}");
        let token = dlr_token("0123456789abcdef", ID);
        assert!(
            q.contains(&pair(
                "dlr-url",
                &format!("https://pg.example.com/v1/sms/kannel/{ID}/{token}?type=%d&status=%A")
            )),
            "{q:?}"
        );
    }

    #[test]
    fn tokens_are_per_message_and_per_secret() {
        let t = dlr_token("0123456789abcdef", ID);
        // Python: hmac.new(b"0123456789abcdef", ID.encode(), hashlib.sha256).hexdigest()
        assert_eq!(
            t,
            "c5f09235d9c30624e2730f96650a6d71f4fba964564219a490ea2117c08f77db"
        );
        assert!(verify_token("0123456789abcdef", ID, &t));
        assert!(!verify_token("0123456789abcdeF", ID, &t));
        assert!(!verify_token(
            "0123456789abcdef",
            "0190a0a0-0000-7000-8000-000000000001",
            &t
        ));
        assert!(!verify_token("0123456789abcdef", ID, &t[..63]));
        assert!(!verify_token("0123456789abcdef", ID, ""));
    }

    #[test]
    fn answers_map_to_outcomes() {
        assert_eq!(
            classify(StatusCode::ACCEPTED, b"0: Accepted for delivery", None, ID),
            SendOutcome::Accepted {
                reference: Some(ID.into())
            }
        );
        assert_eq!(
            classify(
                StatusCode::ACCEPTED,
                b"3: Queued for later delivery",
                None,
                ID
            ),
            SendOutcome::Accepted {
                reference: Some(ID.into())
            }
        );
        assert_eq!(
            classify(
                StatusCode::FORBIDDEN,
                b"Authorization failed for sendsms",
                None,
                ID
            ),
            SendOutcome::Rejected {
                detail: "SMS provider refused the credentials: HTTP 403: Authorization failed for sendsms".into(),
                cause: Rejection::Credentials
            }
        );
        assert!(matches!(
            classify(
                StatusCode::BAD_REQUEST,
                b"Authorization failed for sendsms",
                None,
                ID
            ),
            SendOutcome::Rejected {
                cause: Rejection::Credentials,
                ..
            }
        ));
        assert_eq!(
            classify(
                StatusCode::BAD_REQUEST,
                b"Sender missing and no global set, rejected",
                None,
                ID
            ),
            SendOutcome::Rejected {
                detail:
                    "provider refused the SMS: HTTP 400: Sender missing and no global set, rejected"
                        .into(),
                cause: Rejection::Refused
            }
        );
        assert_eq!(
            classify(
                StatusCode::SERVICE_UNAVAILABLE,
                b"Temporal failure, try again later.",
                None,
                ID
            ),
            SendOutcome::Unavailable {
                detail: "HTTP 503: Temporal failure, try again later.".into(),
                retry_after: None,
                maybe_sent: false
            }
        );
    }

    #[test]
    fn report_types() {
        assert_eq!(dlr_outcome(1), Some(DlrOutcome::Delivered));
        assert!(matches!(dlr_outcome(2), Some(DlrOutcome::Failed(_))));
        assert!(matches!(dlr_outcome(16), Some(DlrOutcome::Failed(_))));
        assert_eq!(dlr_outcome(4), Some(DlrOutcome::Progress));
        assert_eq!(dlr_outcome(8), Some(DlrOutcome::Progress));
        assert_eq!(dlr_outcome(9), Some(DlrOutcome::Delivered));
        assert!(matches!(dlr_outcome(18), Some(DlrOutcome::Failed(_))));
        assert_eq!(dlr_outcome(0), None);
        assert_eq!(dlr_outcome(32), None);
    }
}
