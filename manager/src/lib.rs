//! # nullpunch manager
//!
//! The rendezvous server: clients keep a TCP connection to it, register their id and UDP
//! address, and ask it to connect calls. It answers STUN binding requests on UDP at the same
//! port so it can hand out public UDP addresses. It never carries media.
//!
//! Where each job lives:
//! * the shard logic (directory, calls, routing, tokens, the STUN responder's decisions):
//!   sans-IO in `proto::shard`;
//! * the shard threads' IO (tokio, io_uring) and the STUN responder's thread:
//!   `engine::shard`, with the policy both IOs share;
//! * [`bootstrap`]: starting and stopping a manager (threads, listeners, wiring);
//! * [`metrics`]: Prometheus text exposition and its `GET /metrics` endpoint;
//! * [`cluster`]: one node of a cluster of managers on NATS (the decisions are
//!   `proto::cluster`'s).
#![deny(missing_docs)]

pub mod bootstrap;
pub mod cluster;
pub mod metrics;

pub use bootstrap::{raise_nofile, start, AltPort, Io, ManagerConfig, ManagerHandle};
