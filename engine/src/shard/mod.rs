//! The manager's shard threads: the IO around the sans-IO [`proto::shard::Shard`].
//!
//! * [`portable`]: tokio, one current-thread runtime per shard.
//! * `uring` (Linux): one io_uring ring per shard, connections in direct descriptors.
//! * [`stun`]: the thread that answers STUN on the manager's UDP port.
//!
//! What both shard IOs share is defined here once, so they cannot drift: how a shard starts
//! ([`ShardStart`]), how shards reach each other ([`Peer`]), and the policy: the tick, how
//! many inbox messages are taken before the output is flushed, how long a closing connection
//! may flush, what a failed accept does, how long a stopping shard waits for its connections,
//! and the manager-wide count of open connections that admission is decided on.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::shard::stats::Stats;
use proto::shard::{ShardConfig, ShardInit, ShardMsg};
use tokio::sync::{mpsc, watch};

#[cfg(target_os = "linux")]
use crate::reactor::Wake;

pub mod portable;
pub mod stun;
#[cfg(target_os = "linux")]
pub mod uring;

/// The shard's timer period: [`proto::shard::Shard::handle_tick`] runs this often.
pub const TICK: Duration = Duration::from_millis(250);

/// Messages from other shards taken in one go before the output is flushed: enough to
/// batch a burst, few enough that connections' frames are not held back behind it.
pub const INBOX_BATCH: usize = 256;

/// How long a closing connection may take to flush what was queued for it (an ERROR) before
/// it is dropped. A peer that stops reading would otherwise hold the connection, and with it
/// its registration, forever.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Pause after an accept failed with an error that would repeat at once (out of
/// descriptors or memory, for example): the pending connection stays in the listen backlog.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// How long a stopping shard waits for its connections to take their ERROR Shutdown and
/// close.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_millis(500);

/// Frames queued for one connection at most before it is dropped as too slow (the default
/// of the manager's `conn_queue`).
pub const CONN_QUEUE: usize = 4096;

/// Connections open in the whole manager, counted by every shard's IO: the admission input
/// of [`proto::shard::Shard::conn_opened`] (`max_connections` holds however unevenly the
/// kernel spreads connections over the shards).
#[derive(Debug, Default)]
pub struct OpenConns(AtomicUsize);

impl OpenConns {
    /// A connection was accepted; returns how many were open before it.
    pub fn opened(&self) -> usize {
        self.0.fetch_add(1, Ordering::Relaxed)
    }

    /// A connection the core knew closed.
    pub fn closed(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// Open now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a failed accept leads to, the same in both IOs: it is counted in `accept_errors`,
/// logged at most once a second, and unless it is routine (a connection reset before it was
/// accepted, an interrupted call) the accepts pause for [`ACCEPT_BACKOFF`] rather than spin
/// on an error that would repeat.
#[derive(Debug, Default)]
pub struct AcceptFailures {
    last_warning: Option<Instant>,
}

impl AcceptFailures {
    /// Handle one failed accept at `now`; returns how long to pause the accepts, if at all.
    pub fn failed(&mut self, stats: &Stats, now: Instant, e: &io::Error) -> Option<Duration> {
        stats.accept_errors.fetch_add(1, Ordering::Relaxed);
        let resource = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM));
        let routine = matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR | libc::EAGAIN));
        if self.last_warning.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            self.last_warning = Some(now);
            if resource {
                tracing::warn!("accept failed: {e}; new connections wait (descriptors or memory exhausted)");
            } else {
                tracing::warn!("accept failed: {e}");
            }
        }
        (!routine).then_some(ACCEPT_BACKOFF)
    }

    /// Counted and logged like a failed accept: the IO holds as many connections as it can
    /// (an io_uring shard's direct-descriptor table is full), so new ones wait in the backlog.
    pub fn table_full(&mut self, stats: &Stats, now: Instant, table: u32) {
        stats.accept_errors.fetch_add(1, Ordering::Relaxed);
        if self.last_warning.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            self.last_warning = Some(now);
            tracing::warn!("direct descriptor table full ({table} connections, RLIMIT_NOFILE); new connections wait");
        }
    }
}

/// A shard's inbox as the other shards (and the STUN responder) see it.
#[derive(Clone)]
pub struct Peer {
    tx: mpsc::UnboundedSender<ShardMsg>,
    /// Set for an io_uring shard, which sleeps in its ring rather than on the channel.
    #[cfg(target_os = "linux")]
    wake: Option<Arc<Wake>>,
}

impl Peer {
    /// An inbox; `wake` (io_uring shards) is notified after each message.
    #[cfg(target_os = "linux")]
    pub fn new(tx: mpsc::UnboundedSender<ShardMsg>, wake: Option<Arc<Wake>>) -> Peer {
        Peer { tx, wake }
    }

    /// An inbox.
    #[cfg(not(target_os = "linux"))]
    pub fn new(tx: mpsc::UnboundedSender<ShardMsg>) -> Peer {
        Peer { tx }
    }

    /// Send `msg` to the shard (dropped if the shard has ended).
    pub fn send(&self, msg: ShardMsg) {
        if self.tx.send(msg).is_ok() {
            #[cfg(target_os = "linux")]
            if let Some(w) = &self.wake {
                w.notify();
            }
        }
    }
}

/// What a shard thread starts from, whichever IO runs it.
pub struct ShardStart {
    /// The core's place, seed, token key and wall-clock time.
    pub init: ShardInit,
    /// The address to listen on (port 0 for shard 0 alone: the others get its port).
    pub addr: SocketAddr,
    /// The shard core's timers and limits.
    pub cfg: ShardConfig,
    /// Frames queued for one connection at most before it is dropped as too slow.
    pub conn_queue: usize,
    /// The manager's counters.
    pub stats: Arc<Stats>,
    /// Connections open in the whole manager.
    pub open: Arc<OpenConns>,
    /// Messages from the other shards and the STUN responder.
    pub inbox: mpsc::UnboundedReceiver<ShardMsg>,
    /// Every shard's inbox, this one's included, by index.
    pub peers: Vec<Peer>,
    /// Turns true when the manager stops.
    pub stop: watch::Receiver<bool>,
    /// Told the bound address, or why the shard could not start.
    pub ready: std::sync::mpsc::Sender<io::Result<SocketAddr>>,
    /// TLS 1.3 on every connection with this configuration (plaintext clients are refused);
    /// None: plain TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// In a cluster ([`ShardInit::node`] nonzero): the node's bridge, which takes the core's
    /// [`proto::shard::Output::Cluster`].
    pub cluster: Option<ClusterTx>,
}

/// The channel from a node's shards to its cluster bridge.
pub type ClusterTx = mpsc::UnboundedSender<proto::cluster::ClusterOut>;

/// A new connection's stream: the TLS server side with `tls`, else plain.
pub(crate) fn server_stream(
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> Result<proto::stream::FrameStream, proto::stream::StreamError> {
    match tls {
        Some(cfg) => proto::stream::FrameStream::server(cfg.clone()),
        None => Ok(proto::stream::FrameStream::plain()),
    }
}
