//! The Twilio-compatible provider against a stand-in of Twilio's Messages API that checks
//! basic auth and the form fields and answers from a script; status callbacks are posted to
//! the service the way Twilio does, signed by an implementation of Twilio's scheme written
//! here independently of the crate's.

use axum::extract::Path;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sms_fallback::worker::UNKNOWN_OUTCOME_DETAIL;

use super::*;

const SID: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "twilio-auth-token-for-tests";
const FROM: &str = "+15005550006";

/// One request the stand-in received with the right credentials.
#[derive(Debug, Clone)]
struct Got {
    form: Vec<(String, String)>,
    answered: u16,
}

/// Twilio's Messages API, scripted: answers with the queued (status, JSON) pairs, and `201`
/// with a fresh `SM…` sid when the script is empty. Requests with wrong basic auth are
/// answered 401 like Twilio does and counted. While `held`, answers wait (a provider that
/// does not answer in time).
#[derive(Clone, Default)]
struct Twilio {
    script: Arc<Mutex<VecDeque<(u16, Value)>>>,
    got: Arc<Mutex<Vec<Got>>>,
    bad_auth: Arc<Mutex<usize>>,
    held: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Twilio {
    fn script(&self, answers: &[(u16, Value)]) {
        if let Ok(mut s) = self.script.lock() {
            s.extend(answers.iter().cloned());
        }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().map(|g| g.clone()).unwrap_or_default()
    }

    fn bad_auth(&self) -> usize {
        self.bad_auth.lock().map(|n| *n).unwrap_or(usize::MAX)
    }
}

fn sid_of(n: usize) -> String {
    format!("SM{n:032x}")
}

async fn messages(
    State(t): State<Twilio>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{SID}:{TOKEN}"))
    );
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let form_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    if account != SID || auth != expected {
        if let Ok(mut n) = t.bad_auth.lock() {
            *n += 1;
        }
        let body = json!({"code": 20003, "message": "Authenticate", "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401});
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    if !form_type {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(json!({"code": 0, "message": "form expected"})),
        )
            .into_response();
    }
    let mut held = t.held.subscribe();
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let n = match t.got.lock() {
        Ok(mut g) => {
            g.push(Got { form, answered: 0 });
            g.len()
        }
        Err(_) => 0,
    };
    let _ = held.wait_for(|h| !*h).await;
    let (code, answer) = t
        .script
        .lock()
        .ok()
        .and_then(|mut q| q.pop_front())
        .unwrap_or_else(|| (201, json!({"sid": sid_of(n), "status": "queued"})));
    if let Ok(mut g) = t.got.lock() {
        if let Some(last) = g.get_mut(n.saturating_sub(1)) {
            last.answered = code;
        }
    }
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(answer)).into_response()
}

async fn start_twilio() -> (Twilio, SocketAddr, CancellationToken) {
    let t = Twilio::default();
    let app = Router::new()
        .route(
            "/2010-04-01/Accounts/{account}/Messages.json",
            post(messages),
        )
        .with_state(t.clone());
    let (addr, stop) = spawn_server(app).await;
    (t, addr, stop)
}

/// Twilio's signature, written from its documentation: base64(HMAC-SHA1(token, url +
/// name1 + value1 + name2 + value2 …)) with the parameters sorted by name.
fn twilio_signature(token: &str, url: &str, params: &[(&str, &str)]) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut data = url.to_string();
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(token.as_bytes()).expect("HMAC key");
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

impl Env {
    async fn twilio_app(&self, addr: SocketAddr, token: &str, sender: (&str, &str)) -> String {
        let mut sms = json!({
            "provider": "twilio",
            "base_url": format!("http://{addr}"),
            "account_sid": SID,
            "auth_token": token,
        });
        sms[sender.0] = json!(sender.1);
        self.app(Some(sms)).await
    }

    /// Posts a status callback like Twilio does; `signature` is the header value to send.
    async fn twilio_callback(
        &self,
        id: &str,
        params: &[(&str, &str)],
        signature: Option<String>,
    ) -> (u16, String, Value) {
        pushgate_runtime::tls::install_crypto_provider();
        // the serializer is not Send: finish it before anything is awaited
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            for (k, v) in params {
                form.append_pair(k, v);
            }
            form.finish()
        };
        let mut req = reqwest::Client::new()
            .post(self.callback_url(id))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(sig) = signature {
            req = req.header("X-Twilio-Signature", sig);
        }
        answer_parts(req.send().await.expect("status callback")).await
    }

    fn callback_url(&self, id: &str) -> String {
        format!("http://{}/v1/sms/twilio/{id}", self.dlr)
    }
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_sends_a_form_and_a_signed_callback_marks_it_delivered() {
    with_env(|env| async move {
        let (twilio, addr, stop) = start_twilio().await;
        let app = env.twilio_app(addr, TOKEN, ("from", FROM)).await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        let s = env.wait_status(&id, Status::SmsSent).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some(format!("1 segment, GSM-7, ref {}", sid_of(1)).as_str())
        );
        let got = twilio.got();
        assert_eq!(got.len(), 1, "{got:?}");
        let callback = env.callback_url(&id);
        let expected: Vec<(String, String)> = [
            ("To", "+41791234567"),
            ("From", FROM),
            ("Body", "Your code is 1234"),
            ("StatusCallback", callback.as_str()),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got[0].form, expected);
        assert_eq!(twilio.bad_auth(), 0);
        assert_eq!(env.record(&id).await, Some(format!("sent:{}", sid_of(1))));

        let sid = sid_of(1);
        // progress changes nothing and is not an error
        let sent = [("MessageSid", sid.as_str()), ("MessageStatus", "sent")];
        let (code, _, body) = env
            .twilio_callback(&id, &sent, Some(twilio_signature(TOKEN, &callback, &sent)))
            .await;
        assert_eq!((code, body["status"].as_str()), (200, Some("sms_sent")));

        // badly signed callbacks are refused, whatever they claim
        let delivered = [
            ("AccountSid", SID),
            ("MessageSid", sid.as_str()),
            ("MessageStatus", "delivered"),
        ];
        let failed = [
            ("AccountSid", SID),
            ("MessageSid", sid.as_str()),
            ("MessageStatus", "failed"),
        ];
        for (params, sig) in [
            (&delivered, None),
            (
                &delivered,
                Some(twilio_signature("not-the-token", &callback, &delivered)),
            ),
            // signed for another message's URL
            (
                &delivered,
                Some(twilio_signature(
                    TOKEN,
                    &env.callback_url(&MessageId::generate().0),
                    &delivered,
                )),
            ),
            // signed "delivered", sent "failed"
            (
                &failed,
                Some(twilio_signature(TOKEN, &callback, &delivered)),
            ),
        ] {
            let (code, ct, body) = env.twilio_callback(&id, params, sig.clone()).await;
            assert_eq!(code, 401, "{sig:?}: {body}");
            assert_eq!(ct, "application/problem+json");
            assert_eq!(body["type"], "urn:pushgate:problem:unauthorized");
        }
        assert_eq!(env.state(&id).await.status, Status::SmsSent);

        // a correctly signed report about another Twilio message does not apply
        let other = [
            ("MessageSid", "SM99999999999999999999999999999999"),
            ("MessageStatus", "delivered"),
        ];
        let (code, _, _) = env
            .twilio_callback(
                &id,
                &other,
                Some(twilio_signature(TOKEN, &callback, &other)),
            )
            .await;
        assert_eq!(code, 409);

        let (code, _, body) = env
            .twilio_callback(
                &id,
                &delivered,
                Some(twilio_signature(TOKEN, &callback, &delivered)),
            )
            .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], "sms_delivered");
        let s = env.wait_status(&id, Status::SmsDelivered).await;
        assert_eq!(
            statuses(&s),
            vec![Status::Enqueued, Status::SmsSent, Status::SmsDelivered]
        );
        assert_eq!(last(&s).channel.as_deref(), Some("sms"));
        stop.cancel();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_undelivered_callback_fails_the_sms_with_the_error_code() {
    with_env(|env| async move {
        let (twilio, addr, stop) = start_twilio().await;
        let app = env
            .twilio_app(addr, TOKEN, ("messaging_service_sid", "MG0123"))
            .await;
        let id = env
            .message(
                &app,
                Some("user-1"),
                "+41791234567",
                3_600_000,
                Some("Код 1234"),
            )
            .await;
        let expired = Change {
            message_id: &id,
            to: Some(Status::Expired),
            ..Default::default()
        };
        env.store.change(&expired, now_ms()).await.expect("expire");
        env.request(&app, &id, &format!("{id}.sms")).await;
        let s = env.wait_status(&id, Status::SmsSent).await;
        assert!(
            last(&s)
                .detail
                .as_deref()
                .is_some_and(|d| d.starts_with("1 segment, UCS-2, ref SM")),
            "{:?}",
            last(&s)
        );
        let got = twilio.got();
        assert_eq!(got.len(), 1);
        assert_eq!(field(&got[0].form, "MessagingServiceSid"), Some("MG0123"));
        assert_eq!(field(&got[0].form, "From"), None);
        assert_eq!(field(&got[0].form, "Body"), Some("Код 1234"));

        let callback = env.callback_url(&id);
        let sid = sid_of(1);
        let undelivered = [
            ("MessageSid", sid.as_str()),
            ("MessageStatus", "undelivered"),
            ("ErrorCode", "30003"),
        ];
        let (code, _, body) = env
            .twilio_callback(
                &id,
                &undelivered,
                Some(twilio_signature(TOKEN, &callback, &undelivered)),
            )
            .await;
        assert_eq!(code, 200, "{body}");
        let s = env.wait_status(&id, Status::SmsFailed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some("SMS provider reported failure: undelivered (Twilio error 30003)")
        );
        stop.cancel();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_invalid_number_fails_the_sms() {
    with_env(|env| async move {
        let (twilio, addr, stop) = start_twilio().await;
        twilio.script(&[(
            400,
            json!({"code": 21211, "message": "The 'To' number +41791234567 is not a valid phone number.", "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}),
        )]);
        let app = env.twilio_app(addr, TOKEN, ("from", FROM)).await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        let s = env.wait_status(&id, Status::SmsFailed).await;
        assert_eq!(last(&s).detail.as_deref(), Some("invalid phone number"));
        assert_eq!(env.count("invalid_phone"), 1);
        assert_eq!(
            env.record(&id).await.as_deref(),
            Some("rejected:invalid phone number")
        );
        assert_eq!(twilio.got().len(), 1);
        stop.cancel();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_server_error_then_created_sends_one_sms() {
    with_env(|env| async move {
        let (twilio, addr, stop) = start_twilio().await;
        twilio.script(&[(
            500,
            json!({"code": 20500, "message": "Internal Server Error", "status": 500}),
        )]);
        let app = env.twilio_app(addr, TOKEN, ("from", FROM)).await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms")).await;
        let s = env.wait_status(&id, Status::SmsSent).await;
        let got = twilio.got();
        assert_eq!(
            got.iter().map(|g| g.answered).collect::<Vec<_>>(),
            vec![500, 201]
        );
        assert_eq!(got[0].form, got[1].form);
        assert_eq!(env.count("retry"), 1);
        assert_eq!(
            last(&s).detail.as_deref(),
            Some(format!("1 segment, GSM-7, ref {}", sid_of(2)).as_str())
        );
        assert_eq!(
            s.history
                .iter()
                .filter(|h| h.status == Status::SmsSent)
                .count(),
            1
        );
        stop.cancel();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_refused_credentials_fail_the_sms_once() {
    with_env(|env| async move {
        let (twilio, addr, stop) = start_twilio().await;
        let app = env.twilio_app(addr, "a-stale-token", ("from", FROM)).await;
        let id = env
            .message(&app, None, "+41791234567", 3_600_000, None)
            .await;
        env.request(&app, &id, &format!("{id}.sms.a")).await;
        let s = env.wait_status(&id, Status::SmsFailed).await;
        assert_eq!(
            last(&s).detail.as_deref(),
            Some(
                "SMS provider refused the credentials: HTTP 401: Twilio error 20003: Authenticate"
            )
        );
        assert_eq!(env.count("credentials"), 1);
        assert_eq!(twilio.bad_auth(), 1);
        // the refusal is final: a later request for the message does not call Twilio again
        env.request(&app, &id, &format!("{id}.sms.b")).await;
        env.wait_count(&["skipped"], 1).await;
        assert_eq!(twilio.bad_auth(), 1);
        assert!(twilio.got().is_empty());
        stop.cancel();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_attempt_without_answer_is_not_repeated() {
    with_env_using(
        |s| s.provider_timeout_ms = 300,
        |env| async move {
            let (twilio, addr, stop) = start_twilio().await;
            // Twilio takes the request but its answer never arrives in time
            twilio.held.send_replace(true);
            let app = env.twilio_app(addr, TOKEN, ("from", FROM)).await;
            let id = env
                .message(&app, None, "+41791234567", 3_600_000, None)
                .await;
            env.request(&app, &id, &format!("{id}.sms")).await;
            let s = env.wait_status(&id, Status::SmsFailed).await;
            assert_eq!(last(&s).detail.as_deref(), Some(UNKNOWN_OUTCOME_DETAIL));
            assert_eq!(env.count("unknown_outcome"), 1);
            assert_eq!(env.count("retry"), 0);
            assert_eq!(twilio.got().len(), 1);
            twilio.held.send_replace(false);

            // an attempt that died during the call leaves the same doubt behind
            let id = env
                .message(&app, None, "+41791234567", 3_600_000, None)
                .await;
            env.set_record(&id, &format!("sending:sms-dead:{}", now_ms() - 120_000))
                .await;
            env.request(&app, &id, &format!("{id}.sms")).await;
            let s = env.wait_status(&id, Status::SmsFailed).await;
            assert_eq!(last(&s).detail.as_deref(), Some(UNKNOWN_OUTCOME_DETAIL));
            assert_eq!(twilio.got().len(), 1, "Twilio was called again");
            stop.cancel();
        },
    )
    .await;
}
