//! The gRPC API (`package pushgate.v1`), generated from `proto/pushgate/v1/*.proto`.
//!
//! Also carries trace context in gRPC metadata (`traceparent`), so a call is part of the
//! message's trace.

#![allow(clippy::all, missing_docs, unused_qualifications)]

/// Generated messages and services.
pub mod v1 {
    tonic::include_proto!("pushgate.v1");
}
