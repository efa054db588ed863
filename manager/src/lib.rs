//! # nullpunch manager
//!
//! The rendezvous server: clients keep a TCP connection to it, register their id and UDP
//! address, and ask it to connect calls. It answers STUN binding requests on UDP at the same
//! port so it can hand out public UDP addresses. It never carries media.
//!
//! The shard logic itself (directory, calls, routing, tokens) is sans-IO in `proto::shard`.
//! * [`metrics`]: Prometheus text exposition and its `GET /metrics` endpoint.
//! * [`server`]: threads, sockets and the STUN responder around it (tokio shards).
//! * The io_uring shards (Linux), whose connections live in direct descriptors, are
//!   `engine::shard::uring`: the manager holds no io_uring code of its own.
#![deny(missing_docs)]

pub mod metrics;
pub mod server;

pub use server::{raise_nofile, start, Io, ManagerConfig, ManagerHandle};
