//! Every Redis key Pushgate uses, in one place. All keys start with `{ns}:` so deployments
//! (and tests) sharing one Redis never collide.
//!
//! | key                              | type   | holds                                                      |
//! |----------------------------------|--------|------------------------------------------------------------|
//! | `{ns}:app:{app}`                 | string | app JSON                                                   |
//! | `{ns}:apps`                      | set    | app ids                                                    |
//! | `{ns}:apikey:{sha256(key)}`      | string | app id (a rotated key gets a TTL: its grace period)        |
//! | `{ns}:dev:{app}:{device}`        | string | device JSON                                                |
//! | `{ns}:udevs:{app}:{user}`        | set    | device ids of a user                                       |
//! | `{ns}:jid:{local}`               | string | `{app} {device}` for the XMPP login                        |
//! | `{ns}:seen:{app}:{device}`       | string | last time the device was connected (epoch ms)              |
//! | `{ns}:presence:{app}:{device}`   | string | `{edge}/{session}` of the live XMPP session                |
//! | `{ns}:edge:{edge}`               | string | lease of a live edge instance (PX)                         |
//! | `{ns}:msg:{id}`                  | hash   | message: `body` JSON + `status` `channel` `seq` `app` `trace` … |
//! | `{ns}:msgh:{id}`                 | list   | history entries (JSON)                                     |
//! | `{ns}:pending:{app}:{device}`    | zset   | undelivered message ids of a device, by acceptance time    |
//! | `{ns}:umsg:{app}:{user}`         | zset   | message ids of a user, by creation time                    |
//! | `{ns}:fmsg:{app}:{foreign_id}`   | zset   | message ids with a foreign id, by creation time            |
//! | `{ns}:expiry`                    | zset   | open message ids by `expires_at`                           |
//! | `{ns}:schedule`                  | zset   | scheduled message ids by `send_at`                         |
//! | `{ns}:outbox:cmd`                | zset   | `{id}\|{purpose}` router commands not yet confirmed on NATS |
//! | `{ns}:outbox:evt`                | zset   | event JSON not yet confirmed on NATS                       |
//! | `{ns}:idem:{app}:{sha256(key)}`  | string | idempotency record (24 h)                                  |
//! | `{ns}:rate:{app}:{second}`       | string | request counter for per-app rate limits                    |
//! | `{ns}:lock:{name}`               | string | short leases for singleton loops                           |
//! | `{ns}:sms:{message}`             | string | SMS send record: claim, then provider reference (idempotency) |
//! | `{ns}:push:{message}:{device}`   | string | native push send record (idempotency)                      |
//! | `{ns}:collapse:{app}:{user}:{k}` | string | newest message id with collapse key k                  |
//! | `{ns}:retract:{app}:{device}`    | zset   | message ids to retract on the device's next session        |
//! | `{ns}:smres:{id}`               | string | XEP-0198 resumption state of a dropped session (TTL)       |
//! | `{ns}:authfail:{kind}:{id}`     | string | failed XMPP logins per IP / account in the lockout window  |
//! | `{ns}:dlq:{app}`                 | zset   | dead-lettered webhook batch ids by failure time            |
//! | `{ns}:dlqb:{app}`                | hash   | batch id → dead-letter JSON                                |

/// Key builder for one namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    ns: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        Keys {
            ns: namespace.to_string(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    pub fn app(&self, app: &str) -> String {
        format!("{}:app:{app}", self.ns)
    }
    pub fn apps(&self) -> String {
        format!("{}:apps", self.ns)
    }
    pub fn api_key(&self, key_hash: &str) -> String {
        format!("{}:apikey:{key_hash}", self.ns)
    }
    /// Prefix of device records; scripts append `{app}:{device}`.
    pub fn device_root(&self) -> String {
        format!("{}:dev:", self.ns)
    }
    pub fn device(&self, app: &str, device: &str) -> String {
        format!("{}:dev:{app}:{device}", self.ns)
    }
    pub fn user_devices(&self, app: &str, user: &str) -> String {
        format!("{}:udevs:{app}:{user}", self.ns)
    }
    pub fn jid(&self, local: &str) -> String {
        format!("{}:jid:{local}", self.ns)
    }
    pub fn seen(&self, app: &str, device: &str) -> String {
        format!("{}:seen:{app}:{device}", self.ns)
    }
    /// Prefix of presence records; scripts append `{app}:{device}`.
    pub fn presence_root(&self) -> String {
        format!("{}:presence:", self.ns)
    }
    pub fn presence(&self, app: &str, device: &str) -> String {
        format!("{}:presence:{app}:{device}", self.ns)
    }
    pub fn edge(&self, edge: &str) -> String {
        format!("{}:edge:{edge}", self.ns)
    }
    /// Prefix of message hashes; the store's scripts append the id.
    pub fn msg_prefix(&self) -> String {
        format!("{}:msg:", self.ns)
    }
    pub fn msg(&self, id: &str) -> String {
        format!("{}:msg:{id}", self.ns)
    }
    /// Prefix of history lists; the store's scripts append the id.
    pub fn history_prefix(&self) -> String {
        format!("{}:msgh:", self.ns)
    }
    pub fn history(&self, id: &str) -> String {
        format!("{}:msgh:{id}", self.ns)
    }
    /// Prefix of pending queues; scripts append `{app}:{device}`.
    pub fn pending_root(&self) -> String {
        format!("{}:pending:", self.ns)
    }
    pub fn pending(&self, app: &str, device: &str) -> String {
        format!("{}:pending:{app}:{device}", self.ns)
    }
    pub fn user_messages(&self, app: &str, user: &str) -> String {
        format!("{}:umsg:{app}:{user}", self.ns)
    }
    pub fn foreign_messages(&self, app: &str, foreign_id: &str) -> String {
        format!("{}:fmsg:{app}:{foreign_id}", self.ns)
    }
    pub fn expiry(&self) -> String {
        format!("{}:expiry", self.ns)
    }
    pub fn schedule(&self) -> String {
        format!("{}:schedule", self.ns)
    }
    pub fn outbox_cmd(&self) -> String {
        format!("{}:outbox:cmd", self.ns)
    }
    pub fn outbox_evt(&self) -> String {
        format!("{}:outbox:evt", self.ns)
    }
    pub fn idempotency(&self, app: &str, key_hash: &str) -> String {
        format!("{}:idem:{app}:{key_hash}", self.ns)
    }
    pub fn rate(&self, app: &str, second: i64) -> String {
        format!("{}:rate:{app}:{second}", self.ns)
    }
    /// [`Keys::rate`] split around the app id (`before + app + after`), for a script that
    /// reads the app id from Redis and so builds the key itself.
    pub fn rate_parts(&self, second: i64) -> (String, String) {
        (format!("{}:rate:", self.ns), format!(":{second}"))
    }
    pub fn lock(&self, name: &str) -> String {
        format!("{}:lock:{name}", self.ns)
    }
    pub fn sms_record(&self, message: &str) -> String {
        format!("{}:sms:{message}", self.ns)
    }
    pub fn push_record(&self, message: &str, device: &str) -> String {
        format!("{}:push:{message}:{device}", self.ns)
    }
    pub fn collapse(&self, app: &str, user: &str, key: &str) -> String {
        format!("{}:collapse:{app}:{user}:{key}", self.ns)
    }
    pub fn retractions(&self, app: &str, device: &str) -> String {
        format!("{}:retract:{app}:{device}", self.ns)
    }
    pub fn sm_resume(&self, id: &str) -> String {
        format!("{}:smres:{id}", self.ns)
    }
    pub fn auth_failures(&self, kind: &str, id: &str) -> String {
        format!("{}:authfail:{kind}:{id}", self.ns)
    }
    pub fn dead_letters(&self, app: &str) -> String {
        format!("{}:dlq:{app}", self.ns)
    }
    pub fn dead_letter_bodies(&self, app: &str) -> String {
        format!("{}:dlqb:{app}", self.ns)
    }
    /// Pattern matching every key of the namespace (test cleanup).
    pub fn all_pattern(&self) -> String {
        format!("{}:*", self.ns)
    }
}
