//! The thread that answers STUN on the manager's UDP port: IO only. What to answer is
//! [`proto::shard::stun::respond`]; the thread owns the per-source rate limiter it decides
//! with, sends each answered binding to the shard that holds it
//! ([`proto::shard::bindings::binding_shard`]) *before* the answer leaves (so the binding is
//! in that shard's inbox before the client can send the REGISTER that names it), then sends
//! the answer.

use std::net::UdpSocket;
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

/// Answer STUN on `sock` until `stop` is set. `rate`: answers per second per source IP, with
/// bursts of twice that (0: no limit). `shards`: every shard's inbox, by index.
pub fn stun_thread(sock: UdpSocket, shards: Vec<Peer>, stats: Arc<Stats>, stop: Arc<AtomicBool>, rate: f64) {
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
            Ok(x) => x,
            Err(_) => continue, // timeout (to check `stop`) or a transient ICMP error
        };
        match respond(&mut limiter, Instant::now(), from, &buf[..len], &mut out) {
            StunReply::Answer { len, txid } => {
                shards[binding_shard(&txid, n) as usize].send(ShardMsg::Binding { txid, from });
                // Counted before the answer leaves, so whoever holds the answer sees the count.
                stats.inc(&stats.stun_requests);
                let _ = sock.send_to(&out[..len], from);
            }
            StunReply::Dropped(why) => why.count(&stats),
        }
    }
}
