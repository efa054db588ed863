//! # nullpunch engine
//!
//! The IO drivers over the sans-IO core in `proto`; the one crate that touches sockets, the
//! kernel and `unsafe`.
//!
//! * [`addr`]: addresses given on command lines (the manager's `HOST:PORT`), checked and
//!   resolved with errors that say what is wrong.
//! * [`driver`]: the portable driver: tokio over a TCP stream and a `quinn-udp` socket.
//! * `reactor` (Linux): the io_uring client driver: many clients per thread in one ring.
//! * `uring` (Linux): the io_uring layer both the reactor and the manager's shards use.
//! * [`shard`]: what the manager's shard threads share whichever IO runs them, and their
//!   io_uring IO (`shard::uring`, Linux).
//! * [`entropy`]: seeds and unpredictable values drawn from outside the protocol.
//! * [`tls`]: TLS configurations for the manager connection (PEM files, a CA or a pin); the
//!   TLS layer itself is `proto::stream`.
//! * [`sys`]: safe wrappers over the process-level calls the binaries need (limits, CPU time),
//!   and their logger ([`sys::init_logging`]).
//!
//! The protocol's state machines follow one shape: `handle_*` for input, commands that
//! mutate, and `poll_*` for output; after any input, a driver drains the output and then
//! sleeps until the next deadline.
#![deny(missing_docs)]

pub mod addr;
pub mod driver;
pub mod entropy;
#[cfg(target_os = "linux")]
pub mod reactor;
mod search;
pub mod shard;
pub mod sys;
pub mod tls;
#[cfg(target_os = "linux")]
pub mod uring;
