//! Pure parts of batching and retrying: event order inside a batch, the request body, and the
//! retry delay. Kept free of I/O so they can be tested exactly.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pushgate_core::{BusEvent, Event};
use rand::Rng;
use serde::Serialize;

/// The request body: `{"events":[...]}`. Only the public [`Event`] goes out; the bus envelope
/// (`app_id`, `seq`) is internal routing data.
#[derive(Serialize)]
struct Body<'a> {
    events: &'a [Event],
}

/// Puts a batch's events in the order receivers see them.
///
/// Events keep their arrival order, except that the status events of one message are sorted
/// by `seq` among the positions that message occupies: JetStream redeliveries and the outbox
/// sweeper can reorder a message's events on the bus, and receivers should not have to sort
/// `sent` before `delivered` themselves when both are in the same batch. Replies (`seq` 0) and
/// events without a message id keep their place. An event that appears twice (a redelivery that
/// caught up with its original) is sent once; receivers dedupe by id anyway, but there is no
/// reason to make them.
pub fn order_events(events: Vec<BusEvent>) -> Vec<Event> {
    let mut seen = HashSet::new();
    let mut slots: Vec<Option<BusEvent>> = events
        .into_iter()
        .filter(|e| seen.insert(e.event.id.clone()))
        .map(Some)
        .collect();
    let mut by_message: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, e) in slots.iter().enumerate() {
        if let Some(e) = e {
            if e.seq > 0 {
                if let Some(m) = &e.event.message_id {
                    by_message.entry(m.clone()).or_default().push(i);
                }
            }
        }
    }
    for positions in by_message.values().filter(|p| p.len() > 1) {
        let mut members: Vec<BusEvent> =
            positions.iter().filter_map(|&i| slots[i].take()).collect();
        members.sort_by_key(|e| e.seq);
        for (&i, e) in positions.iter().zip(members) {
            slots[i] = Some(e);
        }
    }
    slots.into_iter().flatten().map(|e| e.event).collect()
}

/// Encodes the request body for already ordered events.
pub fn encode_body(events: &[Event]) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Body { events })
}

/// The delay before retry number `attempt + 1` (0 after the first failure): exponential from
/// `initial`, capped at `max`, with "equal jitter" so that many apps whose receivers failed at
/// the same moment (a shared outage) do not all retry in lockstep. The result is always within
/// `[cap / 2, cap]` where `cap = min(initial * 2^attempt, max)`.
pub fn backoff_delay(attempt: u32, initial: Duration, max: Duration) -> Duration {
    backoff_with_jitter(attempt, initial, max, rand::thread_rng().gen::<f64>())
}

/// [`backoff_delay`] with the random part given (`jitter` in `[0, 1]`).
fn backoff_with_jitter(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let factor = 1u32 << attempt.min(31);
    let cap = initial.saturating_mul(factor).min(max);
    let half = cap / 2;
    half + (cap - half).mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushgate_core::{EventKind, ReplyTag, Status};

    fn status_event(message: &str, seq: u32, status: Status) -> BusEvent {
        BusEvent {
            app_id: "app_1".into(),
            seq,
            event: Event {
                id: format!("{message}.{seq}"),
                event: EventKind::Status(status),
                message_id: Some(message.into()),
                foreign_id: None,
                user_id: None,
                device_id: None,
                channel: None,
                at: "2026-01-01T00:00:00.000Z".into(),
                detail: None,
                text: None,
                data: None,
            },
        }
    }

    fn reply(message: &str, id: &str) -> BusEvent {
        let mut e = status_event(message, 0, Status::Sent);
        e.event.id = id.into();
        e.event.event = EventKind::Reply(ReplyTag::Reply);
        e
    }

    fn ids(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn a_message_events_are_sorted_by_seq_in_place() {
        let batch = vec![
            status_event("a", 3, Status::Delivered),
            status_event("b", 2, Status::Sent),
            status_event("a", 1, Status::Enqueued),
            status_event("b", 1, Status::Enqueued),
            status_event("a", 2, Status::Sent),
        ];
        let out = order_events(batch);
        // "a" held positions 0, 2, 4 and "b" positions 1, 3: each keeps its positions
        assert_eq!(ids(&out), ["a.1", "b.1", "a.2", "b.2", "a.3"]);
    }

    #[test]
    fn replies_and_duplicates() {
        let batch = vec![
            status_event("a", 2, Status::Delivered),
            reply("a", "r1"),
            status_event("a", 1, Status::Sent),
            status_event("a", 2, Status::Delivered),
        ];
        let out = order_events(batch);
        assert_eq!(ids(&out), ["a.1", "r1", "a.2"]);
    }

    #[test]
    fn body_is_the_public_events_only() {
        let events = order_events(vec![status_event("a", 1, Status::Sent)]);
        let body = encode_body(&events).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(v["events"][0]["id"], "a.1");
        assert_eq!(v["events"][0]["event"], "sent");
        assert!(v["events"][0].get("seq").is_none());
        assert!(v["events"][0].get("app_id").is_none());
        assert_eq!(v.as_object().map(|o| o.len()), Some(1));
    }

    #[test]
    fn backoff_grows_and_stays_in_bounds() {
        let initial = Duration::from_millis(500);
        let max = Duration::from_secs(300);
        assert_eq!(
            backoff_with_jitter(0, initial, max, 0.0),
            Duration::from_millis(250)
        );
        assert_eq!(
            backoff_with_jitter(0, initial, max, 1.0),
            Duration::from_millis(500)
        );
        assert_eq!(
            backoff_with_jitter(3, initial, max, 1.0),
            Duration::from_millis(4000)
        );
        assert_eq!(backoff_with_jitter(u32::MAX, initial, max, 1.0), max);
        assert_eq!(backoff_with_jitter(u32::MAX, initial, max, 0.0), max / 2);
        for attempt in 0..64 {
            let cap = initial.saturating_mul(1 << attempt.min(31)).min(max);
            for _ in 0..50 {
                let d = backoff_delay(attempt, initial, max);
                assert!(
                    d >= cap / 2 && d <= cap,
                    "attempt {attempt}: {d:?} not in [{:?}, {cap:?}]",
                    cap / 2
                );
            }
        }
    }
}
