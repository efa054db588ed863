//! # nullpunch manager
//!
//! The rendezvous server: clients keep a TCP connection to it, register their id and UDP
//! address, and ask it to connect calls. It answers STUN binding requests on UDP at the same
//! port so it can hand out public UDP addresses. It never carries media.
//!
//! * [`auth`]: registration tokens (HMAC-SHA256 over id and expiry).
//! * [`core`]: the sans-IO shard logic (directory, calls, routing between shards).
//! * [`metrics`]: Prometheus text exposition and its `GET /metrics` endpoint.
//! * [`server`]: threads, sockets and the STUN responder around it (tokio shards).
//! * `uring` (Linux): io_uring shards, whose connections live in direct descriptors.
//! * [`stun_limit`]: the STUN responder's per-source rate limit.
#![deny(missing_docs)]

pub mod auth;
pub mod bindings;
pub mod core;
pub mod metrics;
pub mod server;
pub mod stats;
pub mod stun_limit;
#[cfg(target_os = "linux")]
pub mod uring;

pub use server::{raise_nofile, start, Io, ManagerConfig, ManagerHandle};
