//! Domain types shared by every Pushgate service.
//!
//! This crate does no I/O. It holds what the services must agree on: identifiers, the stored
//! shape of apps, devices and messages, the status machine with its legal transitions, and the
//! event that is reported to backends. The Redis store enforces the status machine atomically
//! (its Lua scripts are generated from [`status::Status::transition_table`]), so the rules live
//! here once and nowhere else.

pub mod app;
pub mod credentials;
pub mod device;
pub mod event;
pub mod ids;
pub mod message;
pub mod status;
pub mod time;

pub use app::{App, WebhookConfig};
pub use device::{Device, Platform, ScramCredentials, TokenState, WebPushSubscription};
pub use event::{BusEvent, DeadLetter, Event, EventKind, ReplyTag};
pub use ids::{AppId, DeviceId, EventId, MessageId, UserId};
pub use message::{HistoryEntry, Message, MessageState, Priority, SmsFallback};
pub use status::Status;
