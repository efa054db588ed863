//! What the manager's shard threads share, whichever IO runs them (the tokio IO in the
//! manager, the io_uring IO in [`uring`]): how a shard starts, how shards reach each other,
//! and the timing policy both IOs follow, defined once so the two cannot drift.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::shard::bindings::Bindings;
use proto::shard::stats::Stats;
use proto::shard::{ShardConfig, ShardMsg};
use tokio::sync::{mpsc, watch};

#[cfg(target_os = "linux")]
use crate::reactor::Wake;

#[cfg(target_os = "linux")]
pub mod uring;

/// How long a closing connection may take to flush what was queued for it (an ERROR) before
/// it is dropped. A peer that stops reading would otherwise hold the connection, and with it
/// its registration, forever.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Pause after an accept failed for lack of descriptors or memory.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// A shard's inbox as the other shards see it.
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
    /// This shard's index.
    pub index: u16,
    /// Shards in the manager.
    pub n: u16,
    /// The address to listen on (port 0 for shard 0 alone: the others get its port).
    pub addr: SocketAddr,
    /// The shard core's timers and limits.
    pub cfg: ShardConfig,
    /// Frames queued for one connection at most before it is dropped as too slow.
    pub conn_queue: usize,
    /// The STUN binding table the responder fills.
    pub bindings: Arc<Bindings>,
    /// The manager's counters.
    pub stats: Arc<Stats>,
    /// Messages from the other shards.
    pub inbox: mpsc::UnboundedReceiver<ShardMsg>,
    /// Every shard's inbox, this one's included, by index.
    pub peers: Vec<Peer>,
    /// Turns true when the manager stops.
    pub stop: watch::Receiver<bool>,
    /// Told the bound address, or why the shard could not start.
    pub ready: std::sync::mpsc::Sender<io::Result<SocketAddr>>,
    /// Seeds the shard's generator.
    pub seed: u64,
}
