//! # nullpunch manager
//!
//! The rendezvous server: clients keep a TCP connection to it, register their id and UDP
//! address, and ask it to connect calls. It answers STUN binding requests on UDP at the same
//! port so it can hand out public UDP addresses. It never carries media.
//!
//! * [`core`]: the sans-IO shard logic (directory, calls, routing between shards).
//! * [`server`]: threads, sockets and the STUN responder around it.
#![deny(missing_docs)]

pub mod bindings;
pub mod core;
pub mod server;
pub mod stats;

pub use server::{start, ManagerConfig, ManagerHandle};
