//! The threads that answer STUN on the manager's UDP ports: IO only. What to answer is
//! [`proto::shard::stun::respond`]; each thread owns the per-source rate limiter it decides
//! with. The thread of the main port sends each answered binding to the shard that holds it
//! ([`proto::shard::bindings::binding_shard`]) *before* the answer leaves (so the binding is
//! in that shard's inbox before the client can send the REGISTER that names it), then sends
//! the answer. The threads of the alternate addresses (NAT classification, RFC 5780 in
//! spirit) only answer: a client's peers reach it at its mapping towards the main port.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::shard::bindings::binding_shard;
use proto::shard::stats::Stats;
use proto::shard::stun::{respond, StunReply};
use proto::shard::stun_limit::StunLimiter;
use proto::shard::ShardMsg;
use proto::wire::stun::MAX_RESPONSE_LEN;

use super::Peer;

/// Receive (and send) buffer of the STUN socket. Thousands of clients (re)connecting at
/// once send their Binding Requests in a burst, and one thread answers them: the default
/// buffer (about 208 KiB) drops requests whenever that thread waits for a CPU, and each lost
/// one costs its client a 500 ms retransmission.
pub const STUN_SOCKET_BUFFER: usize = 4 << 20;

/// How often the thread looks at its stop flag while no datagram arrives.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// One STUN socket of the manager and what its answers carry.
pub struct StunSocket {
    /// The bound socket.
    pub sock: UdpSocket,
    /// The next STUN address, named in each answer (OTHER-ADDRESS), if any.
    pub other: Option<SocketAddr>,
    /// Every shard's inbox, by index, for the main port (whose bindings REGISTER names);
    /// empty for an alternate address, whose bindings are not kept.
    pub shards: Vec<Peer>,
}

/// Answer STUN on `s.sock` until `stop` is set. `rate`: answers per second per source IP,
/// with bursts of twice that (0: no limit).
pub fn stun_thread(s: StunSocket, stats: Arc<Stats>, stop: Arc<AtomicBool>, rate: f64) {
    let StunSocket { sock, other, shards } = s;
    if let Err(e) = sock.set_read_timeout(Some(STOP_CHECK)) {
        tracing::error!("stun socket: {e}; not answering STUN");
        return;
    }
    crate::driver::set_socket_buffers(&sock, STUN_SOCKET_BUFFER);
    let mut limiter = StunLimiter::new(rate, 2.0 * rate);
    let n = shards.len() as u16;
    let mut buf = [0u8; 2048];
    let mut out = [0u8; MAX_RESPONSE_LEN];
    while !stop.load(Ordering::Relaxed) {
        let (len, from) = match sock.recv_from(&mut buf) {
            // A dual-stack socket ([::]) reports IPv4 clients IPv4-mapped: their mapped
            // address is the IPv4 one (and the answer goes to it on the same socket).
            Ok((len, from)) => (len, crate::driver::canonical(from)),
            Err(_) => continue, // timeout (to check `stop`) or a transient ICMP error
        };
        match respond(&mut limiter, Instant::now(), from, &buf[..len], other, &mut out) {
            StunReply::Answer { len, txid } => {
                if n > 0 {
                    shards[binding_shard(&txid, n) as usize].send(ShardMsg::Binding { txid, from });
                } else {
                    stats.inc(&stats.stun_alt_requests);
                }
                // Counted before the answer leaves, so whoever holds the answer sees the count.
                stats.inc(&stats.stun_requests);
                let _ = sock.send_to(&out[..len], from);
            }
            StunReply::Dropped(why) => why.count(&stats),
        }
    }
}
