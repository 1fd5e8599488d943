//! Cross-service tests: the suite in-process against real NATS and Redis, devices over real
//! XMPP connections. One binary, so the services link once.

mod api;
mod api_more;
mod batched_handover;
mod delivery;
mod device_client;
mod e2e;
mod edge;
mod grpc;
mod handover;
mod interop;
mod native;
mod nats_restart;
mod schemathesis;
mod trace_test;
mod websocket;
