//! # nullpunch engine
//!
//! The protocol core of nullpunch and the IO that drives it.
//!
//! * [`wire`]: byte formats: signalling frames (TCP, client <-> manager), the null packet,
//!   RTP (RFC 3550), STUN binding (RFC 8489), and the datagram demultiplexer (RFC 7983).
//! * [`client`]: the sans-IO client state machine: public-address discovery, registration,
//!   calls as caller and callee (null packet, START, media, keepalive, hangup). Time is an
//!   argument; it owns no socket, thread or clock.
//! * [`stats`]: RFC 3550 receiver statistics (loss, interarrival jitter).
//! * [`driver`]: a tokio driver that runs a [`client::Client`] over a TCP stream and a UDP socket.
//! * `uring` (Linux): io_uring UDP primitives: multishot receive into a provided buffer
//!   ring, batched sends and batched completion waits. All of the engine's `unsafe` is there
//!   and in the socket-buffer helper of the driver.
//!
//! The state machines follow one shape: `handle_*` for input, commands that mutate, and
//! `poll_*` for output. After any input or command, drain `poll_frame`, `poll_transmit`
//! and `poll_event`, then sleep until `poll_timeout`.
#![deny(missing_docs)]

pub mod client;
pub mod driver;
pub mod media;
#[cfg(target_os = "linux")]
pub mod reactor;
pub mod rng;
pub mod stats;
#[cfg(target_os = "linux")]
pub mod uring;
pub mod wire;
