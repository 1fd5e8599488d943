//! Handling of one [`SmsRequest`]: decide whether an SMS is due, send it at most once, and
//! record the outcome as a status transition.
//!
//! Order of a first attempt: read the send record (a previous attempt may have finished
//! already) → check phone, provider settings and deadline (no provider call is needed to fail
//! those) → claim the record → call the provider → write the final record → apply the
//! transition → ack. A crash anywhere leaves the request unacked, and the redelivery resumes
//! from the record: after `sent:`/`rejected:` it only re-applies the transition, so the
//! provider is never called twice for a settled SMS.
//!
//! A claim left behind by an attempt that died during the provider call (older than
//! [`STALE_CLAIM_MS`]) has an unknown outcome, and so has an attempt that sent its request and
//! got no answer (timeout, broken connection). With the generic webhook provider such an
//! attempt is repeated: that provider is required to deduplicate by `message_id`, which the
//! body always carries (see [`crate::provider`]), so the repeat cannot become a second SMS at
//! the handset. Twilio and Kannel create a new SMS for every request, so with them the SMS is
//! failed instead ([`UNKNOWN_OUTCOME_DETAIL`]): one SMS at most is the promise, and the
//! backend learns that it has to decide. Answers that prove nothing was sent (5xx, 429, a
//! refused connection) are retried with every provider.
//!
//! Before the claim, the app's send rate is checked ([`crate::throttle`]); over the limit the
//! request goes back to JetStream with a short delay, which is not a failure.

use pushgate_bus::{jitter, retry_delay, Settle};
use std::time::Duration;

use pushgate_bus::async_nats::jetstream::{self, AckKind};
use pushgate_bus::payloads::SmsRequest;
use pushgate_core::time::now_ms;
use pushgate_core::Status;
use pushgate_runtime::metrics::ResultLabel;
use pushgate_store::{Change, StoredMessage, Transition};
use tracing::Instrument;

use crate::encoding::{self, SmsShape};
use crate::provider::{self, ProviderConfigError, Rejection, SendContext, SendOutcome, SmsPayload};
use crate::record::{SendRecord, STALE_CLAIM_MS};
use crate::{throttle, Ctx, SmsError};

/// The channel name on SMS status events.
pub const CHANNEL: &str = "sms";

/// How long after `expires_at` an SMS fallback may still be sent: a fallback is itself
/// triggered by the expiry, so it needs its own window for a provider outage.
pub const FALLBACK_GRACE_MS: i64 = 3_600_000;

/// The detail of `sms_failed` when the provider stayed unavailable until the deadline.
pub const DEADLINE_DETAIL: &str = "provider unavailable until deadline";

/// The detail of `sms_failed` when an attempt with a provider that cannot recognise a repeat
/// may or may not have reached it.
pub const UNKNOWN_OUTCOME_DETAIL: &str =
    "outcome unknown: the SMS provider may have taken the SMS but did not confirm it; not sent again, as the provider cannot recognise a repeat";

/// Handles one delivery from the `sms` consumer and settles it.
pub(crate) async fn handle_delivery(ctx: &Ctx, msg: jetstream::Message) {
    let span = tracing::info_span!(
        pushgate_runtime::telemetry::spans::SMS_HANDLE,
        message_id = tracing::field::Empty
    );
    pushgate_bus::trace::set_parent_from(&span, msg.headers.as_ref());
    let req: SmsRequest = match serde_json::from_slice(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            // a payload no instance can read will never become readable: drop it loudly
            tracing::error!(error = %e, "unreadable SMS request; terminating it");
            let _ = msg.ack_with(AckKind::Term).await;
            count(ctx, "unreadable");
            return;
        }
    };
    span.record("message_id", req.message_id.as_str());
    let attempt = pushgate_bus::delivery_count(&msg);
    match handle(ctx, &req, attempt).instrument(span).await {
        Ok(outcome) => pushgate_bus::settle(&msg, outcome).await,
        Err(e) => {
            // Redis or NATS trouble: nothing was decided, try again shortly
            let delay = retry_delay(
                attempt,
                ctx.settings.retry_base_ms,
                ctx.settings.retry_max_ms,
                jitter(),
            );
            tracing::warn!(message_id = %req.message_id, attempt, error = %e, "SMS request failed; will retry");
            count(ctx, "error");
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
        }
    }
}

fn count(ctx: &Ctx, result: &str) {
    ctx.metrics
        .sms
        .get_or_create(&ResultLabel {
            result: result.into(),
        })
        .inc();
}

/// Whether the message is waiting for an SMS: a phone-only message while it is enqueued, or
/// after its expiry (a phone-only message that expired while the provider was down, which is
/// then failed; or a message that asked for the fallback). A message with a user that is
/// still open is never texted: its fallback starts with the expiry.
pub(crate) fn wants_sms(m: &StoredMessage) -> bool {
    let phone_only = m.message.user_id.is_none();
    match m.status {
        Status::Enqueued => phone_only,
        Status::Expired => phone_only || m.message.sms_fallback.is_some(),
        _ => false,
    }
}

/// Until when (epoch ms) the SMS may be sent: the message's `expires_at` for a phone-only
/// message (the SMS is its delivery), one hour later for a fallback.
pub(crate) fn deadline(m: &StoredMessage) -> i64 {
    if m.message.user_id.is_none() {
        m.message.expires_at
    } else {
        m.message.expires_at.saturating_add(FALLBACK_GRACE_MS)
    }
}

/// E.164: `+` then 7 to 15 digits, the first not 0.
pub(crate) fn is_e164(p: &str) -> bool {
    let Some(digits) = p.strip_prefix('+') else {
        return false;
    };
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// `"1 segment, GSM-7, ref SM123"`.
/// The text the SMS carries: the fallback's own text, else the message's.
pub(crate) fn sms_text(m: &StoredMessage) -> &str {
    m.message
        .sms_fallback
        .as_ref()
        .and_then(|f| f.text.as_deref())
        .unwrap_or(&m.message.text)
}

pub(crate) fn sent_detail(shape: &SmsShape, reference: &str) -> String {
    if reference.is_empty() {
        shape.describe()
    } else {
        format!("{}, ref {reference}", shape.describe())
    }
}

/// Applies an SMS status change and publishes its event. A refused change (the message moved
/// on, or this is a repeat) publishes nothing.
pub(crate) async fn transition(
    ctx: &Ctx,
    message_id: &str,
    to: Status,
    detail: &str,
) -> Result<Transition, SmsError> {
    let change = Change {
        message_id,
        to: Some(to),
        channel: Some(CHANNEL),
        device_id: None,
        detail: Some(detail),
        command: None,
    };
    let t = ctx.store.change(&change, now_ms()).await?;
    match &t {
        Transition::Applied(ev) => {
            // the event is durable in the outbox already; if NATS is down the routers'
            // sweeper publishes it later
            if let Err(e) = ctx.outbox.publish_events(std::slice::from_ref(ev)).await {
                tracing::warn!(error = %e, "event publish deferred to the outbox sweeper");
            }
        }
        Transition::Noted => {}
        Transition::Refused(cur) => {
            tracing::debug!(message_id, to = %to, current = ?cur, "SMS transition refused");
        }
    }
    Ok(t)
}

async fn fail(ctx: &Ctx, message_id: &str, detail: &str, result: &str) -> Result<Settle, SmsError> {
    tracing::info!(message_id, detail, "SMS failed");
    // counted before the status changes, so whoever sees the status also sees the count
    count(ctx, result);
    transition(ctx, message_id, Status::SmsFailed, detail).await?;
    Ok(Settle::Ack)
}

/// Records a final refusal, so no later request calls the provider again, then fails the SMS.
async fn reject(
    ctx: &Ctx,
    message_id: &str,
    detail: &str,
    result: &str,
) -> Result<Settle, SmsError> {
    ctx.records
        .finish(
            message_id,
            &SendRecord::Rejected {
                detail: detail.to_string(),
            },
        )
        .await?;
    fail(ctx, message_id, detail, result).await
}

/// Handles one request; `attempt` is the delivery count (1 on first delivery).
pub(crate) async fn handle(ctx: &Ctx, req: &SmsRequest, attempt: u64) -> Result<Settle, SmsError> {
    let Some(m) = ctx.store.message(&req.message_id).await? else {
        // erased or past retention: nothing to send any more
        count(ctx, "skipped");
        return Ok(Settle::Ack);
    };
    if !wants_sms(&m) {
        tracing::debug!(status = %m.status, "message does not wait for an SMS; skipping");
        count(ctx, "skipped");
        return Ok(Settle::Ack);
    }
    let id = m.message.id.as_str();
    let text = sms_text(&m);
    let shape = encoding::shape(text);

    // what earlier attempts left behind
    let previous = ctx.records.read(id).await?;
    match previous.as_deref().map(SendRecord::parse) {
        Some(SendRecord::Sent { reference }) => {
            // the SMS went out; its transition may not have been applied (crash) — apply it
            count(ctx, "already_sent");
            transition(ctx, id, Status::SmsSent, &sent_detail(&shape, &reference)).await?;
            return Ok(Settle::Ack);
        }
        Some(SendRecord::Rejected { detail }) => {
            count(ctx, "already_rejected");
            transition(ctx, id, Status::SmsFailed, &detail).await?;
            return Ok(Settle::Ack);
        }
        Some(SendRecord::Sending { instance, at_ms }) if now_ms() - at_ms < STALE_CLAIM_MS => {
            // another attempt is talking to the provider right now; look again when it is done
            tracing::debug!(holder = %instance, "SMS send in flight elsewhere; deferring");
            count(ctx, "in_flight");
            let wait = retry_delay(
                attempt,
                ctx.settings.retry_base_ms,
                ctx.settings.provider_timeout_ms,
                jitter(),
            );
            return Ok(Settle::Nak(wait));
        }
        _ => {}
    }

    let phone = m.message.phone.as_deref().unwrap_or_default();
    if !is_e164(phone) {
        return fail(ctx, id, "invalid phone number", "invalid_phone").await;
    }
    let app = ctx.store.app(&m.message.app_id).await?;
    let sms = match provider::parse_config(
        app.as_ref().and_then(|a| a.sms.as_ref()),
        ctx.settings.allow_http_providers,
    ) {
        Ok(c) => c,
        Err(e) => {
            if let ProviderConfigError::Unknown(name) = &e {
                tracing::warn!(app_id = %m.message.app_id, provider = %name, "app names an unknown SMS provider");
            }
            return fail(ctx, id, &e.to_string(), "no_provider").await;
        }
    };
    let deadline = deadline(&m);
    if now_ms() >= deadline {
        // a first delivery past the deadline never reached the provider at all
        let detail = if attempt > 1 {
            DEADLINE_DETAIL
        } else {
            "deadline passed before the SMS could be sent"
        };
        return fail(ctx, id, detail, "gave_up").await;
    }

    if let Some(dead) = &previous {
        if !sms.provider.deduplicates() {
            tracing::warn!(
                record = %dead,
                provider = sms.provider.name(),
                "a previous SMS attempt died during the provider call; not sending again (the provider cannot recognise a repeat)"
            );
            let settled = SendRecord::Rejected {
                detail: UNKNOWN_OUTCOME_DETAIL.into(),
            }
            .encode();
            if ctx.records.take_over(id, dead, &settled).await? {
                return fail(ctx, id, UNKNOWN_OUTCOME_DETAIL, "unknown_outcome").await;
            }
            // another attempt changed the record first: let the redelivery read it
            return Ok(Settle::Nak(retry_delay(
                attempt,
                ctx.settings.retry_base_ms,
                ctx.settings.provider_timeout_ms,
                jitter(),
            )));
        }
    }

    if let Some(wait) = throttle::admit(
        &ctx.store,
        &m.message.app_id,
        sms.max_per_second,
        now_ms(),
        jitter(),
    )
    .await?
    {
        tracing::debug!(
            max_per_second = sms.max_per_second,
            retry_in_ms = wait.as_millis() as u64,
            "app's SMS rate reached; deferring"
        );
        count(ctx, "throttled");
        let left = Duration::from_millis(u64::try_from(deadline - now_ms()).unwrap_or(0));
        return Ok(Settle::Nak(wait.min(left)));
    }

    let own = SendRecord::Sending {
        instance: ctx.instance.clone(),
        at_ms: now_ms(),
    }
    .encode();
    let claimed = match &previous {
        None => ctx.records.claim(id, &own).await?,
        Some(dead) => {
            tracing::warn!(
                record = %dead,
                "a previous SMS attempt died during the provider call; sending again (the provider deduplicates by message_id)"
            );
            ctx.records.take_over(id, dead, &own).await?
        }
    };
    if !claimed {
        // another attempt claimed it between our read and our claim
        count(ctx, "in_flight");
        let wait = retry_delay(
            attempt,
            ctx.settings.retry_base_ms,
            ctx.settings.provider_timeout_ms,
            jitter(),
        );
        return Ok(Settle::Nak(wait));
    }

    let payload = SmsPayload {
        message_id: id,
        to: phone,
        text,
        segments: shape.segments,
        encoding: shape.encoding,
    };
    let send_ctx = SendContext {
        now_secs: now_ms() / 1000,
        dlr_base: ctx.settings.dlr_base(),
    };
    let outcome = provider::send(&ctx.client, &sms.provider, &payload, send_ctx).await;
    match outcome {
        SendOutcome::Accepted { reference } => {
            let reference = reference.unwrap_or_default();
            // the record first: from here on no attempt may call the provider again
            ctx.records
                .finish(
                    id,
                    &SendRecord::Sent {
                        reference: reference.clone(),
                    },
                )
                .await?;
            count(ctx, "sent");
            transition(ctx, id, Status::SmsSent, &sent_detail(&shape, &reference)).await?;
            tracing::info!(
                segments = shape.segments,
                encoding = shape.encoding.as_str(),
                reference,
                "SMS sent"
            );
            Ok(Settle::Ack)
        }
        SendOutcome::Rejected { detail, cause } => {
            if cause == Rejection::Credentials {
                tracing::warn!(app_id = %m.message.app_id, provider = sms.provider.name(), %detail, "SMS provider refused the app's credentials");
            }
            reject(ctx, id, &detail, cause.metric()).await
        }
        SendOutcome::Unavailable {
            detail, maybe_sent, ..
        } if maybe_sent && !sms.provider.deduplicates() => {
            tracing::warn!(provider = sms.provider.name(), error = %detail, "SMS attempt without answer; not repeating it");
            reject(ctx, id, UNKNOWN_OUTCOME_DETAIL, "unknown_outcome").await
        }
        SendOutcome::Unavailable {
            detail,
            retry_after,
            ..
        } => {
            ctx.records.release(id, &own).await?;
            let now = now_ms();
            if now >= deadline {
                tracing::warn!(last_error = %detail, "SMS provider unavailable until the deadline");
                return fail(ctx, id, DEADLINE_DETAIL, "gave_up").await;
            }
            let backoff = retry_delay(
                attempt,
                ctx.settings.retry_base_ms,
                ctx.settings.retry_max_ms,
                jitter(),
            );
            // honour the provider's Retry-After, but come back by the deadline to settle it
            let left = Duration::from_millis(u64::try_from(deadline - now).unwrap_or(0));
            let wait = backoff.max(retry_after.unwrap_or_default()).min(left);
            tracing::info!(error = %detail, attempt, retry_in_ms = wait.as_millis() as u64, "SMS provider unavailable; will retry");
            count(ctx, "retry");
            Ok(Settle::Nak(wait))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushgate_core::{Message, Priority, SmsFallback};

    fn stored(user: Option<&str>, status: Status, fallback: bool) -> StoredMessage {
        StoredMessage {
            message: Message {
                id: "0190a0a0-0000-7000-8000-000000000000".into(),
                app_id: "app_0123456789abcdef0123456789".into(),
                user_id: user.map(str::to_string),
                device_id: None,
                phone: Some("+41791234567".into()),
                foreign_id: None,
                text: "hi".into(),
                title: None,
                data: None,
                priority: Priority::Normal,
                collapse_key: None,
                sms_fallback: fallback.then(SmsFallback::default),
                send_at: None,
                created_at: 1_000,
                pos: 0,
                expires_at: 10_000,
            },
            status,
            channel: None,
            targets: vec![],
        }
    }

    #[test]
    fn phone_only_messages_are_texted_while_enqueued() {
        assert!(wants_sms(&stored(None, Status::Enqueued, false)));
        assert!(wants_sms(&stored(None, Status::Expired, false)));
        assert!(!wants_sms(&stored(None, Status::SmsSent, false)));
        assert!(!wants_sms(&stored(None, Status::SmsFailed, false)));
        assert!(!wants_sms(&stored(None, Status::Cancelled, false)));
    }

    #[test]
    fn user_messages_are_texted_only_after_expiry_with_fallback() {
        assert!(!wants_sms(&stored(Some("u"), Status::Enqueued, true)));
        assert!(!wants_sms(&stored(Some("u"), Status::Sent, true)));
        assert!(!wants_sms(&stored(Some("u"), Status::Delivered, true)));
        assert!(!wants_sms(&stored(Some("u"), Status::Expired, false)));
        assert!(wants_sms(&stored(Some("u"), Status::Expired, true)));
    }

    #[test]
    fn fallback_gets_an_hour_beyond_expiry() {
        assert_eq!(deadline(&stored(None, Status::Enqueued, false)), 10_000);
        assert_eq!(
            deadline(&stored(Some("u"), Status::Expired, true)),
            10_000 + FALLBACK_GRACE_MS
        );
    }

    #[test]
    fn e164_numbers() {
        assert!(is_e164("+41791234567"));
        assert!(is_e164("+1234567"));
        assert!(is_e164("+123456789012345"));
        for bad in [
            "",
            "+",
            "41791234567",
            "+0791234567",
            "+123456",
            "+1234567890123456",
            "+41 79 123",
            "+4179abc4567",
        ] {
            assert!(!is_e164(bad), "{bad:?}");
        }
    }

    #[test]
    fn backoff_doubles_caps_and_stays_in_its_upper_half() {
        assert_eq!(
            retry_delay(1, 1000, 300_000, 1.0),
            Duration::from_millis(1000)
        );
        assert_eq!(
            retry_delay(1, 1000, 300_000, 0.0),
            Duration::from_millis(500)
        );
        assert_eq!(
            retry_delay(4, 1000, 300_000, 1.0),
            Duration::from_millis(8000)
        );
        assert_eq!(
            retry_delay(60, 1000, 300_000, 1.0),
            Duration::from_millis(300_000)
        );
        assert_eq!(
            retry_delay(60, 1000, 300_000, 0.0),
            Duration::from_millis(150_000)
        );
        assert_eq!(
            retry_delay(u64::MAX, u64::MAX, 5, 1.0),
            Duration::from_millis(5)
        );
    }

    #[test]
    fn sent_detail_names_the_reference_when_there_is_one() {
        let s = encoding::shape("hi");
        assert_eq!(sent_detail(&s, "SM1"), "1 segment, GSM-7, ref SM1");
        assert_eq!(sent_detail(&s, ""), "1 segment, GSM-7");
    }
}
