//! Handling of one [`PushRequest`]: find the device and its provider, push at most once, and
//! react to the provider's answer (see the table in [`crate::provider`]).
//!
//! Order of a first attempt: message still open? → device with a usable token? → provider and
//! app credentials for the device's channel? → push record (an earlier attempt may have
//! finished) → a permit of the app's in-flight bound (else back to the bus) → claim → send →
//! write the outcome → apply its consequences → ack. A crash after the claim leaves the
//! request unacked; its redelivery finds the outcome and only re-applies the consequences, or
//! finds the claim of an attempt that died during the provider call. That push may be out,
//! so it is not repeated: it is recorded as unknown.
//!
//! A `channel` push failure fails the message only when the message has no other target
//! device: with several devices, one dead token must not take the message from the others
//! (it still reaches them, or expires and falls back to SMS).

use pushgate_bus::{jitter, retry_delay, Settle};
use std::time::Duration;

use pushgate_bus::async_nats::jetstream::{self, AckKind};
use pushgate_bus::payloads::PushRequest;
use pushgate_core::time::now_ms;
use pushgate_core::{Device, Status, TokenState};
use pushgate_runtime::metrics::ResultLabel;
use pushgate_store::{Change, StoreError, StoredMessage, Transition};
use tracing::Instrument;

use crate::provider::{AppCredentials, Notification, NotificationKind, ProviderError};
use crate::record::{ttl_secs, PushRecord, STALE_CLAIM_MS};
use crate::{BridgeError, Ctx};

/// Attempts at the compare-and-set that marks a token invalid before giving up for now (the
/// request is then retried as a whole).
const TOKEN_WRITE_ATTEMPTS: usize = 8;

/// Handles one delivery from the `bridge` consumer and settles it.
pub(crate) async fn handle_delivery(ctx: &Ctx, msg: jetstream::Message) {
    let span = tracing::info_span!(
        pushgate_runtime::telemetry::spans::BRIDGE_HANDLE,
        message_id = tracing::field::Empty,
        device_id = tracing::field::Empty,
        kind = tracing::field::Empty
    );
    pushgate_bus::trace::set_parent_from(&span, msg.headers.as_ref());
    let parsed = serde_json::from_slice::<PushRequest>(&msg.payload)
        .map_err(|e| e.to_string())
        .and_then(|r| match NotificationKind::parse(&r.kind) {
            Some(k) => Ok((r, k)),
            None => Err(format!("unknown kind {:?}", r.kind)),
        });
    let (req, kind) = match parsed {
        Ok(p) => p,
        Err(e) => {
            // a request no instance can read will never become readable: drop it loudly
            tracing::error!(error = %e, "unreadable push request; terminating it");
            let _ = msg.ack_with(AckKind::Term).await;
            count(ctx, "unreadable");
            return;
        }
    };
    span.record("message_id", req.message_id.as_str());
    span.record("device_id", req.device_id.as_str());
    span.record("kind", kind.as_str());
    let attempt = pushgate_bus::delivery_count(&msg);
    match handle(ctx, &req, kind, attempt).instrument(span).await {
        Ok(outcome) => pushgate_bus::settle(&msg, outcome).await,
        Err(e) => {
            // Redis trouble or a contended device record: nothing was lost, try again shortly
            let delay = retry_delay(
                attempt,
                ctx.settings.retry_base_ms,
                ctx.settings.retry_max_ms,
                jitter(),
            );
            tracing::warn!(message_id = %req.message_id, attempt, error = %e, "push request failed; will retry");
            count(ctx, "error");
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
        }
    }
}

fn count(ctx: &Ctx, result: &str) {
    ctx.metrics
        .native_push
        .get_or_create(&ResultLabel {
            result: result.into(),
        })
        .inc();
}

/// The wait before retrying after a retryable answer: the backoff, at least the provider's
/// `retry_after`, and never past the message's expiry (`left`), so the last retry settles it.
pub(crate) fn retry_wait(
    backoff: Duration,
    retry_after: Option<Duration>,
    left: Duration,
) -> Duration {
    backoff.max(retry_after.unwrap_or_default()).min(left)
}

/// Whether a `channel` failure on `device_id` ends the message: only if no other device was
/// targeted.
pub(crate) fn failure_ends_message(m: &StoredMessage, device_id: &str) -> bool {
    !m.targets.iter().any(|t| t != device_id)
}

/// The record key: the push itself, or its retraction (a separate push with its own record,
/// sent after the original one has settled).
fn record_key(ctx: &Ctx, req: &PushRequest, kind: NotificationKind) -> String {
    match kind {
        NotificationKind::Retract => ctx
            .store
            .keys()
            .push_record(&format!("{}.retract", req.message_id), &req.device_id),
        _ => ctx
            .store
            .keys()
            .push_record(&req.message_id, &req.device_id),
    }
}

async fn transition(
    ctx: &Ctx,
    message_id: &str,
    to: Status,
    channel: &str,
    device_id: &str,
    detail: Option<&str>,
) -> Result<(), BridgeError> {
    let change = Change {
        message_id,
        to: Some(to),
        channel: Some(channel),
        device_id: Some(device_id),
        detail,
        command: None,
    };
    match ctx.store.change(&change, now_ms()).await? {
        Transition::Applied(ev) => {
            // the event is durable in the outbox already; if NATS is down the routers'
            // sweeper publishes it later
            if let Err(e) = ctx.outbox.publish_events(std::slice::from_ref(&ev)).await {
                tracing::warn!(error = %e, "event publish deferred to the outbox sweeper");
            }
        }
        Transition::Noted => {}
        Transition::Refused(cur) => {
            tracing::debug!(message_id, to = %to, current = ?cur, "push transition refused");
        }
    }
    Ok(())
}

/// `sent` on the native channel.
async fn mark_sent(
    ctx: &Ctx,
    m: &StoredMessage,
    channel: &str,
    device_id: &str,
    reference: &str,
) -> Result<(), BridgeError> {
    let detail = (!reference.is_empty()).then(|| format!("ref {reference}"));
    transition(
        ctx,
        &m.message.id,
        Status::Sent,
        channel,
        device_id,
        detail.as_deref(),
    )
    .await
}

/// `failed` for a `channel` push, unless other devices can still get the message.
async fn fail_channel(
    ctx: &Ctx,
    m: &StoredMessage,
    channel: &str,
    device_id: &str,
    detail: &str,
) -> Result<(), BridgeError> {
    if !failure_ends_message(m, device_id) {
        tracing::info!(
            detail,
            "push failed on one of several devices; the message stays open for the others"
        );
        return Ok(());
    }
    transition(
        ctx,
        &m.message.id,
        Status::Failed,
        channel,
        device_id,
        Some(detail),
    )
    .await
}

/// Marks the device's token invalid, unless the device registered a new token since `used`
/// was read (that one is not known to be dead).
async fn invalidate_token(ctx: &Ctx, used: &Device) -> Result<(), BridgeError> {
    for _ in 0..TOKEN_WRITE_ATTEMPTS {
        let Some(current) = ctx.store.device(&used.app_id, &used.device_id).await? else {
            return Ok(());
        };
        if current.push_token != used.push_token || current.webpush != used.webpush {
            return Ok(());
        }
        if current.token_state == TokenState::Invalid {
            return Ok(());
        }
        let mut next = current.clone();
        next.token_state = TokenState::Invalid;
        next.updated_at = now_ms();
        match ctx.store.put_device(&next, Some(&current)).await {
            Ok(()) => {
                tracing::info!(device_id = %used.device_id, "push token marked invalid");
                return Ok(());
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(BridgeError::DeviceContended(
        ctx.store.keys().device(&used.app_id, &used.device_id),
    ))
}

/// Handles one request; `attempt` is the delivery count (1 on first delivery).
pub(crate) async fn handle(
    ctx: &Ctx,
    req: &PushRequest,
    kind: NotificationKind,
    attempt: u64,
) -> Result<Settle, BridgeError> {
    let Some(m) = ctx.store.message(&req.message_id).await? else {
        count(ctx, "skipped");
        return Ok(Settle::Ack);
    };
    if m.message.app_id != req.app_id {
        tracing::warn!(request_app = %req.app_id, message_app = %m.message.app_id, "push request names another app; ignoring it");
        count(ctx, "skipped");
        return Ok(Settle::Ack);
    }
    if kind != NotificationKind::Retract && !matches!(m.status, Status::Enqueued | Status::Sent) {
        // delivered, expired, cancelled…: a push now would only show a stale message
        tracing::debug!(status = %m.status, "message is not open any more; no push");
        count(ctx, "skipped");
        return Ok(Settle::Ack);
    }
    let Some(device) = ctx.store.device(&req.app_id, &req.device_id).await? else {
        tracing::debug!("device no longer registered; no push");
        count(ctx, "skipped");
        return Ok(Settle::Ack);
    };
    let Some(channel) = device.platform.native_channel() else {
        tracing::warn!(platform = ?device.platform, "push request for a device without a native channel; ignoring it");
        count(ctx, "skipped");
        return Ok(Settle::Ack);
    };
    if !device.has_usable_token() {
        tracing::debug!(token_state = ?device.token_state, "device has no usable token; no push");
        count(ctx, "skipped");
        return Ok(Settle::Ack);
    }
    let app = ctx.store.app(&req.app_id).await?;
    let creds = app.as_ref().and_then(|a| {
        a.providers.get(channel).map(|creds| AppCredentials {
            app_id: &a.app_id,
            version: a.updated_at,
            creds,
        })
    });
    let (Some(provider), Some(creds)) = (ctx.providers.get(channel), creds) else {
        let detail = format!("no {channel} provider configured for this app");
        count(ctx, "no_provider");
        match kind {
            NotificationKind::Channel => {
                fail_channel(ctx, &m, channel, &device.device_id, &detail).await?
            }
            NotificationKind::Wakeup | NotificationKind::Retract => {
                tracing::warn!(channel, kind = kind.as_str(), "{detail}; push not sent")
            }
        }
        return Ok(Settle::Ack);
    };

    let key = record_key(ctx, req, kind);
    let ttl = ttl_secs(m.message.expires_at, now_ms());
    match ctx
        .records
        .read(&key)
        .await?
        .as_deref()
        .map(PushRecord::parse)
    {
        None => {}
        Some(PushRecord::Sending { instance, at_ms }) if now_ms() - at_ms < STALE_CLAIM_MS => {
            // another attempt is talking to the provider; look again when it is done
            tracing::debug!(holder = %instance, "push in flight elsewhere; deferring");
            count(ctx, "in_flight");
            return Ok(Settle::Nak(in_flight_wait(ctx, attempt)));
        }
        Some(previous) => {
            settle_previous(ctx, &m, &device, channel, kind, &key, previous, ttl).await?;
            count(ctx, "duplicate");
            return Ok(Settle::Ack);
        }
    }
    if kind != NotificationKind::Retract && now_ms() >= m.message.expires_at {
        // the router's clock expires it; a push now would show a dead message (this is also
        // where retries end whose last wait ran up to the expiry)
        tracing::info!(attempt, "message expired before the push could be sent");
        count(ctx, "expired");
        return Ok(Settle::Ack);
    }

    // taken before the claim, so an app at its bound leaves no claim behind
    let Some(_permit) = ctx.app_limits.try_acquire(&req.app_id) else {
        tracing::debug!("app at its in-flight bound; deferring");
        count(ctx, "app_busy");
        return Ok(Settle::Nak(in_flight_wait(ctx, attempt)));
    };
    let own = PushRecord::Sending {
        instance: ctx.instance.clone(),
        at_ms: now_ms(),
    }
    .encode();
    if !ctx.records.claim(&key, &own, ttl).await? {
        count(ctx, "in_flight");
        return Ok(Settle::Nak(in_flight_wait(ctx, attempt)));
    }
    let notification = Notification::from_message(&m.message, kind);
    let timeout = Duration::from_millis(ctx.settings.send_timeout_ms);
    let answer =
        match tokio::time::timeout(timeout, provider.send(creds, &device, &notification)).await {
            Ok(a) => a,
            Err(_) => Err(ProviderError::Unknown {
                detail: format!("no answer within {} ms", timeout.as_millis()),
            }),
        };
    react(
        ctx, &m, &device, channel, kind, &key, &own, ttl, attempt, answer,
    )
    .await
}

fn in_flight_wait(ctx: &Ctx, attempt: u64) -> Duration {
    retry_delay(
        attempt,
        ctx.settings.retry_base_ms,
        ctx.settings.send_timeout_ms,
        jitter(),
    )
}

/// A later request found an earlier attempt's outcome: re-apply its consequences (the earlier
/// instance may have died before it could), never the push.
#[allow(clippy::too_many_arguments)]
async fn settle_previous(
    ctx: &Ctx,
    m: &StoredMessage,
    device: &Device,
    channel: &str,
    kind: NotificationKind,
    key: &str,
    previous: PushRecord,
    ttl: u64,
) -> Result<(), BridgeError> {
    let is_channel = kind == NotificationKind::Channel;
    match previous {
        PushRecord::Sent { reference } if is_channel => {
            mark_sent(ctx, m, channel, &device.device_id, &reference).await?
        }
        PushRecord::Invalid { detail } => {
            invalidate_token(ctx, device).await?;
            if is_channel {
                fail_channel(ctx, m, channel, &device.device_id, &detail).await?;
            }
        }
        PushRecord::Failed { detail } if is_channel => {
            fail_channel(ctx, m, channel, &device.device_id, &detail).await?
        }
        PushRecord::Sending { instance, at_ms } => {
            // its attempt died during the provider call: the push may be out, so not again
            tracing::warn!(holder = %instance, claimed_at = at_ms, "an earlier push attempt died mid-call; not repeating it");
            let detail = format!("attempt by {instance} interrupted");
            ctx.records
                .finish(key, &PushRecord::Unknown { detail }, ttl)
                .await?;
            count(ctx, "unknown");
        }
        PushRecord::Unreadable(raw) => {
            tracing::warn!(record = %raw, "unreadable push record; treating the push as done");
        }
        PushRecord::Sent { .. } | PushRecord::Failed { .. } | PushRecord::Unknown { .. } => {}
    }
    Ok(())
}

/// Applies the reaction table to a provider's answer.
#[allow(clippy::too_many_arguments)]
async fn react(
    ctx: &Ctx,
    m: &StoredMessage,
    device: &Device,
    channel: &str,
    kind: NotificationKind,
    key: &str,
    own: &str,
    ttl: u64,
    attempt: u64,
    answer: Result<crate::provider::ProviderAccepted, ProviderError>,
) -> Result<Settle, BridgeError> {
    let is_channel = kind == NotificationKind::Channel;
    let device_id = device.device_id.as_str();
    if let Err(e) = &answer {
        // `pushgate_native_push_errors_total{provider,code}`: the class of the provider's answer
        let code = match e {
            ProviderError::InvalidToken { .. } => "invalid_token",
            ProviderError::Retryable { .. } => "retryable",
            ProviderError::Permanent { .. } => "permanent",
            ProviderError::Credentials { .. } => "credentials",
            ProviderError::Unknown { .. } => "unknown",
        };
        ctx.metrics.native_push_error(channel, code);
    }
    match answer {
        Ok(accepted) => {
            let reference = accepted.reference.unwrap_or_default();
            // the record first: from here on no attempt may push again
            ctx.records
                .finish(
                    key,
                    &PushRecord::Sent {
                        reference: reference.clone(),
                    },
                    ttl,
                )
                .await?;
            // counted before the status changes, so whoever sees the status also sees the count
            count(ctx, "ok");
            if is_channel {
                mark_sent(ctx, m, channel, device_id, &reference).await?;
            }
            tracing::info!(channel, reference, "native push accepted");
        }
        Err(ProviderError::InvalidToken { detail }) => {
            let detail = format!("{channel} rejected the push token: {detail}");
            ctx.records
                .finish(
                    key,
                    &PushRecord::Invalid {
                        detail: detail.clone(),
                    },
                    ttl,
                )
                .await?;
            count(ctx, "invalid_token");
            invalidate_token(ctx, device).await?;
            if is_channel {
                fail_channel(ctx, m, channel, device_id, &detail).await?;
            }
        }
        Err(ProviderError::Retryable {
            retry_after,
            detail,
        }) => {
            ctx.records.release(key, own).await?;
            let left = m.message.expires_at - now_ms();
            if left <= 0 {
                // the message's expiry (and its SMS fallback) takes over
                tracing::info!(channel, last_error = %detail, "provider unavailable until the message expired; giving up");
                count(ctx, "gave_up");
                return Ok(Settle::Ack);
            }
            let backoff = retry_delay(
                attempt,
                ctx.settings.retry_base_ms,
                ctx.settings.retry_max_ms,
                jitter(),
            );
            let wait = retry_wait(
                backoff,
                retry_after,
                Duration::from_millis(u64::try_from(left).unwrap_or(0)),
            );
            tracing::info!(channel, error = %detail, attempt, retry_in_ms = wait.as_millis() as u64, "provider unavailable; will retry");
            count(ctx, "retry");
            return Ok(Settle::Nak(wait));
        }
        Err(ProviderError::Permanent { detail }) => {
            let detail = format!("{channel} refused the notification: {detail}");
            ctx.records
                .finish(
                    key,
                    &PushRecord::Failed {
                        detail: detail.clone(),
                    },
                    ttl,
                )
                .await?;
            count(ctx, "permanent");
            if is_channel {
                fail_channel(ctx, m, channel, device_id, &detail).await?;
            } else {
                // a wakeup only hurries things: the message still waits for XMPP or expiry
                tracing::warn!(channel, kind = kind.as_str(), detail, "native push refused");
            }
        }
        Err(e @ ProviderError::Credentials { .. }) => {
            let detail = e.to_string();
            tracing::error!(app_id = %m.message.app_id, channel, detail, "app's native push credentials were rejected");
            ctx.records
                .finish(
                    key,
                    &PushRecord::Failed {
                        detail: detail.clone(),
                    },
                    ttl,
                )
                .await?;
            count(ctx, "credentials");
            if is_channel {
                fail_channel(ctx, m, channel, device_id, &detail).await?;
            }
        }
        Err(ProviderError::Unknown { detail }) => {
            tracing::warn!(
                channel,
                detail,
                "native push outcome unknown; not repeating it"
            );
            ctx.records
                .finish(key, &PushRecord::Unknown { detail }, ttl)
                .await?;
            count(ctx, "unknown");
        }
    }
    Ok(Settle::Ack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushgate_core::{Message, Priority};

    fn stored(targets: &[&str]) -> StoredMessage {
        StoredMessage {
            message: Message {
                id: "0190a0a0-0000-7000-8000-000000000000".into(),
                app_id: "app_0123456789abcdef0123456789".into(),
                user_id: Some("u".into()),
                device_id: None,
                phone: None,
                foreign_id: None,
                text: "hi".into(),
                title: None,
                data: None,
                priority: Priority::Normal,
                collapse_key: None,
                sms_fallback: None,
                send_at: None,
                created_at: 1,
                pos: 0,
                expires_at: 2,
            },
            status: Status::Enqueued,
            channel: None,
            targets: targets.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn a_failure_ends_the_message_only_without_other_targets() {
        assert!(failure_ends_message(&stored(&[]), "a"));
        assert!(failure_ends_message(&stored(&["a"]), "a"));
        assert!(!failure_ends_message(&stored(&["a", "b"]), "a"));
        assert!(!failure_ends_message(&stored(&["b"]), "a"));
    }

    #[test]
    fn retry_wait_honours_retry_after_and_the_expiry() {
        let s = Duration::from_secs;
        assert_eq!(retry_wait(s(2), None, s(100)), s(2));
        assert_eq!(retry_wait(s(2), Some(s(30)), s(100)), s(30));
        assert_eq!(retry_wait(s(2), Some(s(1)), s(100)), s(2));
        assert_eq!(retry_wait(s(60), Some(s(120)), s(10)), s(10));
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
            retry_delay(3, 1000, 300_000, 1.0),
            Duration::from_millis(4000)
        );
        assert_eq!(
            retry_delay(40, 1000, 300_000, 0.0),
            Duration::from_millis(150_000)
        );
        assert_eq!(
            retry_delay(u64::MAX, u64::MAX, 5, 1.0),
            Duration::from_millis(5)
        );
    }
}
