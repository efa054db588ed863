//! # nullpunch proto
//!
//! The sans-IO core of nullpunch: everything that decides, nothing that waits. It owns no
//! socket, thread or clock and has no `unsafe`; time and randomness are arguments. The IO
//! drivers (`engine`) and the manager feed it bytes and timer expiries and send what it
//! returns.
//!
//! * [`wire`]: byte formats: signalling frames (TCP, client <-> manager), the null packet,
//!   RTP (RFC 3550), STUN binding (RFC 8489), and the datagram demultiplexer (RFC 7983).
//! * [`client`]: the client state machine: public-address discovery, registration, calls as
//!   caller and callee (null packet, START, media, keepalive, hangup).
//! * [`shard`]: the manager's shard core: directory, calls, routing between shards, limits.
//! * [`nat`]: NAT classes (how a client's router maps its socket) and the traversal strategy
//!   two classes leave.
//! * [`reconnect`]: the client's policy for its manager connection (timeouts, back-off,
//!   waiting for a local port), which every driver follows.
//! * [`auth`]: registration tokens (HMAC-SHA256 over id and expiry), bound to a TLS
//!   connection when there is one.
//! * [`e2e`]: end-to-end call keys: an X25519 exchange in the signalling frames, HKDF into
//!   SRTP master keys and the null packet key, optional Ed25519 identities.
//! * [`srtp`]: SRTP and SRTCP (RFC 3711, RFC 7714), an in-place transform per SSRC stream
//!   on aws-lc-rs primitives.
//! * [`stream`]: the signalling byte stream, plain or TLS 1.3 (rustls's sans-IO connection),
//!   with the registration binding (a TLS exporter value).
//! * [`stats`]: RFC 3550 receiver statistics (loss, interarrival jitter).
//! * [`media`]: the synthetic media source the load generator sends.
//! * [`rng`]: the seeded generator behind everything random that may be reproducible.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod auth;
pub mod client;
pub mod cluster;
pub mod e2e;
pub mod media;
pub mod nat;
pub mod portmap;
pub mod reconnect;
pub mod rng;
pub mod shard;
pub mod srtp;
pub mod stats;
pub mod stream;
pub mod wire;
