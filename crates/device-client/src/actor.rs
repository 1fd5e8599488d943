//! The background task that owns the connection: it reads the server's stream, answers what
//! the protocol requires (pings, `<r/>`), writes what the app asks for, and replaces a lost
//! connection with a new session.
//!
//! One task owns the socket, so writes never interleave and stream-management counters stay
//! exact. Input is parsed by a helper task feeding a channel, because the parser is not
//! cancel-safe and the owner waits on several things at once.
//!
//! Events for the app go through [`Shared`] rather than a channel, because the XEP-0198 `h`
//! we report must stop before the first message the app has not taken yet; the owner needs to
//! see what is still queued. The queue is bounded ([`INBOX_CAP`]): when the app falls behind,
//! the owner stops reading the socket (TCP backpressure) but keeps serving the app's commands.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pushgate_xmpp::{escape, Element, XmlError, XmlEvent, NS_STREAM};
use rand::Rng;
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conn::{
    self, condition, Bound, Resume, Session, Target, Tls, NS_CLIENT, NS_SM, NS_STREAM_ERRORS,
};
use crate::store::Store;
use crate::{now_ms, valid_id, ClientError};

const NS_PING: &str = "urn:xmpp:ping";
const NS_RETRACT: &str = "urn:xmpp:message-retract:1";
const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

/// Events held for the app before the socket is no longer read.
const INBOX_CAP: usize = 256;
/// Silence after which we ping the server (the edge pings idle sessions every 120 s itself).
const IDLE_BEFORE_PING: Duration = Duration::from_secs(150);
/// How long the server has to answer our ping before the connection counts as dead.
const PING_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive check period.
const TICK: Duration = Duration::from_secs(5);
/// Longest write before the connection counts as dead (a stalled peer must not pin us).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `close` waits for the server to acknowledge queued stanzas.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);
/// Reconnect backoff: first delay, and the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// XEP-0184 receipt for a message.
pub(crate) fn receipt(domain: &str, id: &str) -> String {
    format!(
        "<message to='{}' id='{}'><received xmlns='urn:xmpp:receipts' id='{}'/></message>",
        escape(domain),
        uuid::Uuid::new_v4().simple(),
        escape(id)
    )
}

/// XEP-0333 displayed marker for a message.
pub(crate) fn displayed(domain: &str, id: &str) -> String {
    format!(
        "<message to='{}' id='{}'><displayed xmlns='urn:xmpp:chat-markers:0' id='{}'/></message>",
        escape(domain),
        uuid::Uuid::new_v4().simple(),
        escape(id)
    )
}

/// Completion of a request that waits for the server.
type Waiter = oneshot::Sender<Result<(), ClientError>>;

/// What the app asks the background task for.
pub(crate) enum Cmd {
    /// A stanza that must reach the server; `done` (if any) resolves on its XEP-0198 ack.
    Stanza { xml: String, done: Option<Waiter> },
    /// An IQ; `done` resolves with its result or error.
    Iq {
        id: String,
        xml: String,
        done: Waiter,
    },
    /// Test hook: drop the connection like a network failure would; without `resumable`,
    /// also forget the session as if the server's resume window had passed.
    #[cfg(any(test, feature = "test-hooks"))]
    DropConnection {
        resumable: bool,
        done: oneshot::Sender<()>,
    },
    /// Close politely and stop.
    Close { done: oneshot::Sender<()> },
}

/// An event waiting for the app.
pub(crate) enum Pending {
    Message {
        id: String,
        title: Option<String>,
        text: String,
        data_json: Option<String>,
    },
    Retracted {
        id: String,
    },
    Reconnected,
}

/// A queued event with the session and XEP-0198 sequence number of the stanza it came from.
pub(crate) struct Inbound {
    pub event: Pending,
    generation: u64,
    seq: Option<u32>,
}

/// Events waiting for the app, and why the task stopped (once it has).
#[derive(Default)]
pub(crate) struct Inbox {
    pub items: VecDeque<Inbound>,
    pub end: Option<ClientError>,
}

/// State shared by the background task and [`crate::Client`].
#[derive(Default)]
pub(crate) struct Shared {
    inbox: Mutex<Inbox>,
    /// An event was queued or the task stopped.
    pub arrived: Notify,
    /// The app took an event (room in the inbox again).
    pub space: Notify,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inbox> {
        // the lock is never held across a panic-prone call, but a poisoned queue is still
        // better used than dropped
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, item: Inbound) {
        self.lock().items.push_back(item);
        self.arrived.notify_waiters();
    }

    fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// XEP-0198 `h` to report for session `generation` that received `h_in` stanzas: every
    /// stanza up to (not including) the first message of it the app has not taken yet.
    fn handled(&self, generation: u64, h_in: u32) -> u32 {
        self.lock()
            .items
            .iter()
            .filter(|i| i.generation == generation)
            .find_map(|i| i.seq)
            .map(|s| s.wrapping_sub(1))
            .unwrap_or(h_in)
    }
}

/// A stanza to deliver reliably (re-sent on a new session until acknowledged).
struct Outgoing {
    xml: String,
    done: Option<Waiter>,
}

impl Outgoing {
    fn resolve(self, r: Result<(), ClientError>) {
        if let Some(d) = self.done {
            let _ = d.send(r);
        }
    }
}

/// An IQ waiting for its answer (re-sent on a new session until answered).
struct PendingIq {
    id: String,
    xml: String,
    done: Waiter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sm {
    /// Not offered, or refused.
    Off,
    /// `<enable/>` sent: the server counts our stanzas from here.
    Requested,
    /// `<enabled/>` received: we count the server's stanzas from here.
    On,
}

/// Why a session ended.
enum End {
    /// The app closed the client (or dropped it).
    Closed,
    /// The connection is gone; a new session may fix it.
    Lost(ClientError),
}

/// What a dropped stream-management session leaves for its resumption.
struct Carry {
    /// The server's id of the session.
    id: String,
    /// The session's generation and stanzas received, for the `h` we resume with.
    generation: u64,
    h_in: u32,
    /// The `h` of the latest `<resume/>` sent: the server's stanzas are counted on from it.
    resume_h: u32,
    out_seq: u32,
    sent: VecDeque<(u32, Option<Outgoing>)>,
}

/// One live connection.
struct Live {
    writer: WriteHalf<Tls>,
    inbound: mpsc::Receiver<Result<XmlEvent, XmlError>>,
    reader: JoinHandle<()>,
    sm: Sm,
    /// The id the server gave the session for resumption (XEP-0198), if it offers that.
    sm_id: Option<String>,
    /// Stanzas received since `<enabled/>`.
    h_in: u32,
    /// Stanzas sent since `<enable/>`.
    out_seq: u32,
    /// Stanzas sent and not yet acknowledged, with what must be re-sent or resolved.
    sent: VecDeque<(u32, Option<Outgoing>)>,
    /// An `<r/>` is on its way.
    r_outstanding: bool,
    last_input: Instant,
    ping_sent: Option<Instant>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Live {
    fn start(s: Session) -> Self {
        let (tx, rx) = mpsc::channel(8);
        let sm_offered = s.sm_offered;
        let mut reader = s.reader;
        let task = tokio::spawn(async move {
            loop {
                let ev = reader.next().await;
                let stop = ev.is_err();
                if tx.send(ev).await.is_err() || stop {
                    break;
                }
            }
        });
        Live {
            writer: s.writer,
            inbound: rx,
            reader: task,
            sm: if sm_offered { Sm::Requested } else { Sm::Off },
            sm_id: None,
            h_in: 0,
            out_seq: 0,
            sent: VecDeque::new(),
            r_outstanding: false,
            last_input: Instant::now(),
            ping_sent: None,
        }
    }

    async fn write(&mut self, s: &str) -> Result<(), End> {
        let fut = async {
            self.writer.write_all(s.as_bytes()).await?;
            self.writer.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, fut).await {
            Err(_) => Err(End::Lost(ClientError::Network("write timed out".into()))),
            Ok(Err(e)) => Err(End::Lost(ClientError::Network(e.to_string()))),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Writes a stanza the server counts. It is remembered before writing, so if the write
    /// fails it is re-sent on the next session.
    async fn send_counted(&mut self, xml: &str, out: Option<Outgoing>) -> Result<(), End> {
        self.out_seq = self.out_seq.wrapping_add(1);
        self.sent.push_back((self.out_seq, out));
        self.write(xml).await?;
        if self.sm == Sm::Off {
            // nobody will acknowledge it: written is as good as it gets
            if let Some((_, Some(o))) = self.sent.pop_back() {
                o.resolve(Ok(()));
            }
        }
        Ok(())
    }

    /// Asks the server to acknowledge what we sent, unless a request is already on its way.
    async fn request_ack(&mut self) -> Result<(), End> {
        if self.sm == Sm::On && !self.r_outstanding && !self.sent.is_empty() {
            self.write("<r xmlns='urn:xmpp:sm:3'/>").await?;
            self.r_outstanding = true;
        }
        Ok(())
    }

    /// Forgets (and resolves) what the server says it handled: our stanzas up to `h`.
    fn pop_acked(&mut self, h: u32) {
        while let Some((seq, _)) = self.sent.front() {
            if seq.wrapping_sub(h) as i32 > 0 {
                break;
            }
            if let Some((_, Some(o))) = self.sent.pop_front() {
                o.resolve(Ok(()));
            }
        }
    }

    /// The server handled our stanzas up to `h`.
    async fn acked(&mut self, h: u32) -> Result<(), End> {
        self.pop_acked(h);
        self.r_outstanding = false;
        // what was written after our request is covered by the next one
        self.request_ack().await
    }

    /// Whether stanzas carrying something (not just pings) still wait for acknowledgement.
    fn has_unacked_payload(&self) -> bool {
        self.sent.iter().any(|(_, o)| o.is_some())
    }
}

/// The background task.
pub(crate) struct Actor {
    target: Arc<Target>,
    store: Store,
    shared: Arc<Shared>,
    cmds: mpsc::Receiver<Cmd>,
    /// Stanzas to write when connected: queued while offline, or unacknowledged when the
    /// previous connection dropped.
    outbox: VecDeque<Outgoing>,
    /// IQs waiting for an answer.
    iqs: Vec<PendingIq>,
    /// Session counter: events queued by an earlier session do not hold back `h` of this one.
    generation: u64,
    /// Consecutive sessions replaced by another login of the device.
    conflicts: u32,
    /// The dropped session to resume, if it can be.
    carry: Option<Carry>,
    /// `close` callers to tell when everything is done.
    closing: Vec<oneshot::Sender<()>>,
}

impl Actor {
    pub fn new(
        target: Arc<Target>,
        store: Store,
        shared: Arc<Shared>,
        cmds: mpsc::Receiver<Cmd>,
    ) -> Self {
        Actor {
            target,
            store,
            shared,
            cmds,
            outbox: VecDeque::new(),
            iqs: Vec::new(),
            generation: 0,
            conflicts: 0,
            carry: None,
            closing: Vec::new(),
        }
    }

    /// Serves sessions until the app closes the client or a fatal error.
    pub async fn run(mut self, first: Session) {
        let mut session = first;
        let outcome = loop {
            match self.serve(session).await {
                End::Closed => break ClientError::Closed,
                End::Lost(why) => {
                    let conflict = matches!(&why, ClientError::Stream(c) if c == "conflict");
                    self.conflicts = if conflict { self.conflicts + 1 } else { 0 };
                    tracing::warn!(error = %why, "device connection lost; reconnecting");
                    match self.reconnect(conflict).await {
                        Ok(s) => {
                            self.generation += 1;
                            self.shared.push(Inbound {
                                event: Pending::Reconnected,
                                generation: self.generation,
                                seq: None,
                            });
                            session = s;
                        }
                        Err(e) => break e,
                    }
                }
            }
        };
        self.finish(outcome);
    }

    /// Fails whatever still waits and publishes why the client stopped.
    fn finish(mut self, why: ClientError) {
        if why != ClientError::Closed {
            tracing::error!(error = %why, "device client stopped");
        }
        if let Some(c) = self.carry.take() {
            Self::requeue(&mut self.outbox, c.sent);
        }
        self.cmds.close();
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                Cmd::Stanza { done, .. } => {
                    if let Some(d) = done {
                        let _ = d.send(Err(why.clone()));
                    }
                }
                Cmd::Iq { done, .. } => {
                    let _ = done.send(Err(why.clone()));
                }
                #[cfg(any(test, feature = "test-hooks"))]
                Cmd::DropConnection { done, .. } => {
                    let _ = done.send(());
                }
                Cmd::Close { done } => self.closing.push(done),
            }
        }
        for o in self.outbox.drain(..) {
            o.resolve(Err(why.clone()));
        }
        for iq in self.iqs.drain(..) {
            let _ = iq.done.send(Err(why.clone()));
        }
        self.shared.lock().end = Some(why);
        self.shared.arrived.notify_waiters();
        for c in self.closing.drain(..) {
            let _ = c.send(());
        }
    }

    /// Runs one connection. Afterwards, what it could not get acknowledged is kept for a
    /// resumption, or waits in the outbox for the next session.
    async fn serve(&mut self, s: Session) -> End {
        let resumed = match s.bound {
            Bound::Resumed { h } => Some(h),
            Bound::New { ref full_jid } => {
                tracing::debug!(jid = %full_jid, "device session bound");
                None
            }
        };
        let mut live = Live::start(s);
        let carry = self.carry.take();
        let resumed = match (resumed, carry) {
            (Some(h), Some(c)) => {
                // the old stream goes on: its counters, and what the server had not received
                live.sm = Sm::On;
                live.sm_id = Some(c.id);
                live.h_in = c.resume_h;
                live.out_seq = c.out_seq;
                live.sent = c.sent;
                Some(h)
            }
            (_, carry) => {
                if let Some(c) = carry {
                    Self::requeue(&mut self.outbox, c.sent);
                }
                None
            }
        };
        let end = self.serve_live(&mut live, resumed).await;
        let sent = std::mem::take(&mut live.sent);
        match (&end, live.sm, live.sm_id.take()) {
            (End::Lost(_), Sm::On, Some(id)) => {
                self.carry = Some(Carry {
                    id,
                    generation: self.generation,
                    h_in: live.h_in,
                    resume_h: live.h_in,
                    out_seq: live.out_seq,
                    sent,
                });
            }
            _ => Self::requeue(&mut self.outbox, sent),
        }
        end
    }

    /// Puts unacknowledged stanzas back at the front of the outbox, in their order.
    fn requeue(outbox: &mut VecDeque<Outgoing>, sent: VecDeque<(u32, Option<Outgoing>)>) {
        let mut back: VecDeque<Outgoing> = sent.into_iter().filter_map(|(_, o)| o).collect();
        back.append(outbox);
        *outbox = back;
    }

    async fn serve_live(&mut self, live: &mut Live, resumed: Option<u32>) -> End {
        match self.begin(live, resumed).await {
            Ok(()) => {}
            Err(end) => return end,
        }
        let mut tick = tokio::time::interval(TICK);
        loop {
            let full = self.shared.len() >= INBOX_CAP;
            let step = tokio::select! {
                ev = live.inbound.recv(), if !full => self.on_input(live, ev).await,
                cmd = self.cmds.recv() => self.on_command(live, cmd).await,
                _ = self.shared.space.notified(), if full => Ok(()),
                _ = tick.tick() => Self::keepalive(live, &self.target.domain).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Enables stream management (or finishes a resumption) and sends what waited for a
    /// connection.
    async fn begin(&mut self, live: &mut Live, resumed: Option<u32>) -> Result<(), End> {
        if let Some(h) = resumed {
            // the server has our stanzas up to h; the rest goes out again (first, in order),
            // numbered on from h
            live.pop_acked(h);
            Self::requeue(&mut self.outbox, std::mem::take(&mut live.sent));
            live.out_seq = h;
        } else if live.sm == Sm::Requested {
            live.write("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
                .await?;
        }
        let iqs: Vec<String> = self.iqs.iter().map(|q| q.xml.clone()).collect();
        for xml in iqs {
            live.send_counted(&xml, None).await?;
        }
        while let Some(o) = self.outbox.pop_front() {
            let xml = o.xml.clone();
            live.send_counted(&xml, Some(o)).await?;
        }
        live.request_ack().await
    }

    async fn on_command(&mut self, live: &mut Live, cmd: Option<Cmd>) -> Result<(), End> {
        match cmd {
            None => {
                // every Client handle is gone: say goodbye like close() would
                self.close_gracefully(live).await;
                Err(End::Closed)
            }
            Some(Cmd::Stanza { xml, done }) => {
                live.send_counted(
                    &xml,
                    Some(Outgoing {
                        xml: xml.clone(),
                        done,
                    }),
                )
                .await?;
                live.request_ack().await
            }
            Some(Cmd::Iq { id, xml, done }) => {
                self.iqs.push(PendingIq {
                    id,
                    xml: xml.clone(),
                    done,
                });
                live.send_counted(&xml, None).await?;
                live.request_ack().await
            }
            #[cfg(any(test, feature = "test-hooks"))]
            Some(Cmd::DropConnection { resumable, done }) => {
                if !resumable {
                    live.sm_id = None;
                }
                let _ = done.send(());
                Err(End::Lost(ClientError::Network(
                    "connection dropped by the test hook".into(),
                )))
            }
            Some(Cmd::Close { done }) => {
                self.closing.push(done);
                self.close_gracefully(live).await;
                Err(End::Closed)
            }
        }
    }

    /// Flushes, reports what the app took, and ends the stream; errors are ignored since the
    /// client stops either way.
    async fn close_gracefully(&mut self, live: &mut Live) {
        if live.sm == Sm::On {
            let h = self.handled(live);
            let _ = live
                .write(&format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>"))
                .await;
            if live.has_unacked_payload() && live.request_ack().await.is_ok() {
                let _ = tokio::time::timeout(CLOSE_FLUSH, async {
                    while live.has_unacked_payload() {
                        match live.inbound.recv().await {
                            Some(Ok(XmlEvent::Stanza(el))) if el.is("a", NS_SM) => {
                                let h = el.attr("h").and_then(|h| h.parse::<u32>().ok());
                                if let Some(h) = h {
                                    if live.acked(h).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Some(Ok(XmlEvent::Stanza(_))) => {}
                            _ => return,
                        }
                    }
                })
                .await;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = live.writer.write_all(b"</stream:stream>").await;
            let _ = live.writer.shutdown().await;
        })
        .await;
        // what was acknowledged is done; the rest is reported as not sent
        for (_, o) in live.sent.drain(..) {
            if let Some(o) = o {
                o.resolve(Err(ClientError::Closed));
            }
        }
    }

    /// XEP-0198 `h` to report: every stanza up to (not including) the first message the app
    /// has not taken yet.
    fn handled(&self, live: &Live) -> u32 {
        self.shared.handled(self.generation, live.h_in)
    }

    async fn keepalive(live: &mut Live, domain: &str) -> Result<(), End> {
        match live.ping_sent {
            Some(at) if at.elapsed() >= PING_TIMEOUT => Err(End::Lost(ClientError::Network(
                "the server did not answer a ping".into(),
            ))),
            None if live.last_input.elapsed() >= IDLE_BEFORE_PING => {
                let ping = format!(
                    "<iq type='get' id='ping-{}' to='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
                    uuid::Uuid::new_v4().simple(),
                    escape(domain)
                );
                live.send_counted(&ping, None).await?;
                live.ping_sent = Some(Instant::now());
                live.request_ack().await
            }
            _ => Ok(()),
        }
    }

    async fn on_input(
        &mut self,
        live: &mut Live,
        ev: Option<Result<XmlEvent, XmlError>>,
    ) -> Result<(), End> {
        live.last_input = Instant::now();
        live.ping_sent = None;
        match ev {
            None => Err(End::Lost(ClientError::Network("the reader stopped".into()))),
            Some(Err(XmlError::Eof)) => Err(End::Lost(ClientError::Network(
                "the server closed the connection".into(),
            ))),
            Some(Err(XmlError::Io(e))) => Err(End::Lost(ClientError::Network(e.to_string()))),
            Some(Err(e)) => Err(End::Lost(ClientError::Protocol(e.to_string()))),
            Some(Ok(XmlEvent::StreamClose)) => {
                let _ = live.write("</stream:stream>").await;
                Err(End::Lost(ClientError::Network(
                    "the server closed the stream".into(),
                )))
            }
            Some(Ok(XmlEvent::StreamOpen(_))) => Err(End::Lost(ClientError::Protocol(
                "unexpected stream header".into(),
            ))),
            Some(Ok(XmlEvent::Stanza(el))) => self.on_stanza(live, el).await,
        }
    }

    async fn on_stanza(&mut self, live: &mut Live, el: Element) -> Result<(), End> {
        if el.is("error", NS_STREAM) {
            let cond = el
                .children
                .iter()
                .find(|c| c.ns == NS_STREAM_ERRORS && c.name != "text")
                .map(|c| c.name.clone())
                .unwrap_or_else(|| "undefined-condition".into());
            return Err(End::Lost(ClientError::Stream(cond)));
        }
        if el.ns == NS_SM {
            return self.on_sm(live, &el).await;
        }
        if el.ns != NS_CLIENT {
            tracing::debug!(name = %el.name, ns = %el.ns, "ignoring unknown element");
            return Ok(());
        }
        let seq = match (live.sm, el.name.as_str()) {
            (Sm::On, "message" | "iq" | "presence") => {
                live.h_in = live.h_in.wrapping_add(1);
                Some(live.h_in)
            }
            _ => None,
        };
        match el.name.as_str() {
            "iq" => self.on_iq(live, &el).await,
            "message" => self.on_message(live, &el, seq).await,
            _ => Ok(()),
        }
    }

    async fn on_sm(&mut self, live: &mut Live, el: &Element) -> Result<(), End> {
        match el.name.as_str() {
            "enabled" => {
                live.sm = Sm::On;
                let resumable = matches!(el.attr("resume"), Some("true" | "1"));
                live.sm_id = el
                    .attr("id")
                    .filter(|id| resumable && valid_id(id))
                    .map(str::to_string);
                live.request_ack().await
            }
            "failed" if live.sm == Sm::Requested => {
                tracing::warn!("the server refused stream management");
                live.sm = Sm::Off;
                // nothing will be acknowledged: what was written counts as sent
                for (_, o) in live.sent.drain(..) {
                    if let Some(o) = o {
                        o.resolve(Ok(()));
                    }
                }
                Ok(())
            }
            "r" if live.sm == Sm::On => {
                let h = self.handled(live);
                live.write(&format!("<a xmlns='urn:xmpp:sm:3' h='{h}'/>"))
                    .await
            }
            "a" if live.sm == Sm::On => {
                let h = el
                    .attr("h")
                    .and_then(|h| h.parse::<u32>().ok())
                    .ok_or_else(|| {
                        End::Lost(ClientError::Protocol("<a/> without a numeric h".into()))
                    })?;
                live.acked(h).await
            }
            _ => Ok(()),
        }
    }

    async fn on_iq(&mut self, live: &mut Live, el: &Element) -> Result<(), End> {
        let id = el.attr("id").unwrap_or("");
        match el.attr("type").unwrap_or("") {
            "get" | "set" => {
                let to = el
                    .attr("from")
                    .map(|f| format!(" to='{}'", escape(f)))
                    .unwrap_or_default();
                // RFC 6120 §8.2.3: every get/set gets an answer, an error if not understood
                let reply = if el.attr("type") == Some("get") && el.child("ping", NS_PING).is_some()
                {
                    format!("<iq type='result' id='{}'{to}/>", escape(id))
                } else {
                    format!(
                        "<iq type='error' id='{}'{to}><error type='cancel'><service-unavailable xmlns='{NS_STANZAS}'/></error></iq>",
                        escape(id)
                    )
                };
                live.send_counted(&reply, None).await?;
                live.request_ack().await
            }
            kind @ ("result" | "error") => {
                if let Some(pos) = self.iqs.iter().position(|q| q.id == id) {
                    let q = self.iqs.remove(pos);
                    let outcome = if kind == "result" {
                        Ok(())
                    } else {
                        Err(ClientError::Refused(
                            el.child("error", NS_CLIENT)
                                .map(|e| {
                                    e.children
                                        .iter()
                                        .find(|c| c.ns == NS_STANZAS && c.name != "text")
                                        .map(|c| c.name.clone())
                                        .unwrap_or_else(|| condition(e))
                                })
                                .unwrap_or_else(|| "undefined-condition".into()),
                        ))
                    };
                    let _ = q.done.send(outcome);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whether a message claims to come from our server (the only sender devices have).
    fn sent_by_server(&self, el: &Element) -> bool {
        el.attr("from")
            .is_none_or(|f| f.eq_ignore_ascii_case(&self.target.domain))
    }

    async fn on_message(
        &mut self,
        live: &mut Live,
        el: &Element,
        seq: Option<u32>,
    ) -> Result<(), End> {
        if el.attr("type") == Some("error") || !self.sent_by_server(el) {
            tracing::debug!(from = ?el.attr("from"), "ignoring message");
            return Ok(());
        }
        if let Some(r) = el.child("retract", NS_RETRACT) {
            let Some(id) = r.attr("id").filter(|id| valid_id(id)) else {
                return Ok(());
            };
            {
                // a withdrawn message the app has not taken yet is never shown
                let mut inbox = self.shared.lock();
                inbox
                    .items
                    .retain(|i| !matches!(&i.event, Pending::Message { id: m, .. } if m == id));
            }
            self.shared.push(Inbound {
                event: Pending::Retracted { id: id.to_string() },
                generation: self.generation,
                seq,
            });
            return Ok(());
        }
        let (Some(id), Some(body)) = (
            el.attr("id").filter(|id| valid_id(id)),
            el.child("body", NS_CLIENT),
        ) else {
            return Ok(());
        };
        let store = self.store.clone();
        let key = id.to_string();
        let known = tokio::task::spawn_blocking(move || store.get(&key))
            .await
            .map_err(|e| ClientError::Store(e.to_string()))
            .and_then(|r| r);
        match known {
            Ok(Some(seen)) => self.duplicate(live, id, seen).await,
            Ok(None) | Err(_) => {
                if let Err(e) = known {
                    // next_event will hit the same problem and report it to the app
                    tracing::warn!(error = %e, "cannot look up a message in the store");
                }
                self.shared.push(Inbound {
                    event: Pending::Message {
                        id: id.to_string(),
                        title: el.child("subject", NS_CLIENT).map(|s| s.text.clone()),
                        text: body.text.clone(),
                        data_json: el
                            .child("data", "urn:pushgate:data:0")
                            .map(|d| d.text.clone()),
                    },
                    generation: self.generation,
                    seq,
                });
                Ok(())
            }
        }
    }

    /// A message the app already saw: not shown again, but what the app did with it is
    /// confirmed again (the first confirmation may have been lost with a connection), and
    /// one seen from a native push counts as received.
    async fn duplicate(
        &mut self,
        live: &mut Live,
        id: &str,
        seen: crate::MessageState,
    ) -> Result<(), End> {
        let domain = self.target.domain.clone();
        if seen.acked || seen.native_push {
            if !seen.acked {
                let store = self.store.clone();
                let key = id.to_string();
                let res = tokio::task::spawn_blocking(move || {
                    store.update(&key, now_ms(), |r| r.acked = true)
                })
                .await;
                if !matches!(res, Ok(Ok(_))) {
                    tracing::warn!(id, "cannot record an automatic receipt");
                }
            }
            let xml = receipt(&domain, id);
            live.send_counted(
                &xml,
                Some(Outgoing {
                    xml: xml.clone(),
                    done: None,
                }),
            )
            .await?;
        }
        if seen.read {
            let xml = displayed(&domain, id);
            live.send_counted(
                &xml,
                Some(Outgoing {
                    xml: xml.clone(),
                    done: None,
                }),
            )
            .await?;
        }
        live.request_ack().await
    }

    /// Waits, then opens a new session; commands meanwhile are queued for it. `Err` is why
    /// the client must stop (closed, or a fatal error such as refused credentials).
    async fn reconnect(&mut self, conflict: bool) -> Result<Session, ClientError> {
        // replaced by another login of the device: back off longer each time, so two clients
        // sharing credentials settle instead of kicking each other out in a tight loop
        let mut attempt = if conflict {
            2 + self.conflicts.min(8)
        } else {
            0
        };
        let target = self.target.clone();
        loop {
            let sleep = tokio::time::sleep(backoff(attempt));
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = self.cmds.recv() => self.offline(cmd)?,
                }
            }
            // resume with what the app has taken by now (it may have taken more while we
            // waited); the server counts those messages as delivered
            let resume = self.carry.as_ref().map(|c| Resume {
                previd: c.id.clone(),
                h: self.shared.handled(c.generation, c.h_in),
            });
            if let (Some(c), Some(r)) = (self.carry.as_mut(), resume.as_ref()) {
                c.resume_h = r.h;
            }
            let connect = conn::establish(&target, resume);
            tokio::pin!(connect);
            let res = loop {
                tokio::select! {
                    r = &mut connect => break r,
                    cmd = self.cmds.recv() => self.offline(cmd)?,
                }
            };
            match res {
                Ok(s) => {
                    tracing::info!(
                        resumed = matches!(s.bound, Bound::Resumed { .. }),
                        "device reconnected"
                    );
                    return Ok(s);
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "reconnect failed");
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// A command while there is no connection.
    fn offline(&mut self, cmd: Option<Cmd>) -> Result<(), ClientError> {
        match cmd {
            None => Err(ClientError::Closed),
            Some(Cmd::Stanza { xml, done }) => {
                self.outbox.push_back(Outgoing { xml, done });
                Ok(())
            }
            Some(Cmd::Iq { id, xml, done }) => {
                self.iqs.push(PendingIq { id, xml, done });
                Ok(())
            }
            #[cfg(any(test, feature = "test-hooks"))]
            Some(Cmd::DropConnection { resumable, done }) => {
                if !resumable {
                    if let Some(c) = self.carry.take() {
                        Self::requeue(&mut self.outbox, c.sent);
                    }
                }
                let _ = done.send(());
                Ok(())
            }
            Some(Cmd::Close { done }) => {
                self.closing.push(done);
                Err(ClientError::Closed)
            }
        }
    }
}

/// Exponential backoff with ±25 % jitter, so many devices cut off together do not all come
/// back in the same instant.
fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_FIRST.saturating_mul(1u32 << attempt.min(10));
    let capped = base.min(BACKOFF_MAX);
    capped.mul_f64(rand::thread_rng().gen_range(0.75..=1.25))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..20 {
            let d = backoff(attempt);
            let nominal = BACKOFF_FIRST
                .saturating_mul(1u32 << attempt.min(10))
                .min(BACKOFF_MAX);
            assert!(
                d >= nominal.mul_f64(0.75) && d <= nominal.mul_f64(1.25),
                "{attempt}: {d:?}"
            );
        }
        assert!(backoff(30) <= BACKOFF_MAX.mul_f64(1.25));
    }

    fn message(id: &str, generation: u64, seq: Option<u32>) -> Inbound {
        Inbound {
            event: Pending::Message {
                id: id.into(),
                title: None,
                text: "t".into(),
                data_json: None,
            },
            generation,
            seq,
        }
    }

    #[test]
    fn acks_stop_before_the_first_message_the_app_has_not_taken() {
        let shared = Shared::default();
        assert_eq!(
            shared.handled(1, 5),
            5,
            "nothing queued: everything handled"
        );
        shared.push(Inbound {
            event: Pending::Reconnected,
            generation: 1,
            seq: None,
        });
        // from the previous session: does not hold back the current one
        shared.push(message("old", 0, Some(2)));
        shared.push(message("b", 1, Some(4)));
        shared.push(message("c", 1, Some(6)));
        assert_eq!(shared.handled(1, 7), 3);
        assert_eq!(shared.handled(0, 9), 1);
        for _ in 0..3 {
            shared.lock().items.pop_front();
        }
        assert_eq!(shared.handled(1, 7), 5);
        shared.lock().items.pop_front();
        assert_eq!(shared.handled(1, 7), 7);
    }

    #[test]
    fn confirmations_escape_ids() {
        let r = receipt("pushgate.test", "a'b<");
        assert!(r.contains("id='a&apos;b&lt;'"), "{r}");
        assert!(r.contains("xmlns='urn:xmpp:receipts'"));
        let d = displayed("pushgate.test", "m1");
        assert!(
            d.contains("<displayed xmlns='urn:xmpp:chat-markers:0' id='m1'/>"),
            "{d}"
        );
    }
}
