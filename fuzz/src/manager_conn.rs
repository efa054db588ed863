//! Target `manager_conn`: the manager's sans-IO shard core (`proto::shard`), driven the
//! way the shard IOs in `engine::shard` drive it, with no sockets and no threads.
//!
//! A [`Sim`] holds [`SHARDS`] shards (sharing one `Stats`, as `manager::bootstrap::start`
//! builds them), a per-shard inbox standing for the channels between shard threads, a
//! virtual clock (with the wall clock the ticks carry), and up to [`MAX_CONNS`] connections,
//! each with its own `FrameDecoder` as in `engine::shard::portable`. Two connections are open
//! at the start, one on each shard.
//!
//! Input: a mode byte, then a script of operations. Mode bit 0 turns on the shard limits
//! ([`LIMITS`]: connections in all, frames per second, calls per connection), bit 1 a
//! registration secret ([`SECRET`]: REGISTER needs a token). Each operation starts with an
//! op byte `b`, whose low 3 bits pick the operation and whose high 5 bits (`x = b >> 3`) pick
//! a connection (index `x % open so far`) or a shard (`x % SHARDS`):
//!
//! | `b & 7` | operation |
//! |---|---|
//! | 0, 1, 2 | bytes from connection `x`: a length byte `n`, then `n` bytes, pushed into its decoder; every whole frame goes to `conn_frame`, a decode error to `conn_error` (then the connection reads no more), as `conn_task` does |
//! | 3 | the clock advances by `next byte * 50 ms` and every shard runs `handle_tick` |
//! | 4 | shard `x` takes the messages queued for it so far (`handle_msg`), and every connection the core asked to close is closed (`conn_closed`) |
//! | 5 | the peer closes connection `x` (`conn_closed`) |
//! | 6 | a new connection is accepted on shard `x` (`conn_opened`) |
//! | 7, `x < 16` | a STUN binding arrives on the UDP port: 12 bytes of transaction id follow; the source is connection `x`'s peer with port 40000 + x (a `ShardMsg::Binding` queued for the binding's shard, as the STUN responder sends it) |
//! | 7, `x >= 16` | signed bytes from connection `x - 16`: as op 0, but every REGISTER decoded carries a token minted with [`SECRET`] for its id (expiring when the frame's own token does, or never), as a client given `manager token` output sends |
//!
//! A connection op for a closed connection, or a truncated op, does nothing. At the end every
//! connection closes and all messages are delivered.
//!
//! Properties checked: no panic; every frame a shard writes goes to a connection that shard
//! still has open, and round-trips through the decoder; every message goes to an existing
//! shard; message delivery settles (no endless ping-pong); once every connection has closed
//! and all messages are delivered, no shard holds a connection or a call record.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::auth::Secret;
use proto::shard::bindings::binding_shard;
use proto::shard::stats::Stats;
use proto::shard::{Output, Shard, ShardConfig, ShardInit, ShardMsg};
use proto::wire::frame::{Frame, FrameDecoder};

use crate::assert_frame_round_trips;

/// Shards in the simulated manager.
pub const SHARDS: u16 = 2;
/// Most connections one input may open (including the first two).
pub const MAX_CONNS: usize = 8;
/// Seed of the shards' generators (fixes call ids) and their token key.
pub const SEED: u64 = 0x5EED;
const TOKEN_KEY: [u8; 32] = [0x5E; 32];
/// The wall clock (seconds since the Unix epoch) at the start of every input.
pub const UNIX_START: u64 = 1_800_000_000;
/// The registration secret of mode bit 1.
pub const SECRET: &[u8] = b"nullpunch-fuzz-secret-0123456789";
/// Mode bit 0: the limits, per shard as `server::start` divides them (connections, frames
/// per second, calls per connection). Small, so an input can reach each.
pub const LIMITS: (usize, f64, usize) = (3, 20.0, 2);
/// Mode bit: limits on.
pub const MODE_LIMITS: u8 = 1;
/// Mode bit: registration secret on.
pub const MODE_SECRET: u8 = 2;
/// Bound on message deliveries when settling.
const MAX_SETTLE: usize = 100_000;

/// Operation codes (`op & 7`).
pub mod op {
    #![allow(missing_docs)]
    pub const BYTES: u8 = 0;
    pub const TICK: u8 = 3;
    pub const DELIVER: u8 = 4;
    pub const CLOSE: u8 = 5;
    pub const OPEN: u8 = 6;
    pub const STUN: u8 = 7;
    /// `x` at or above this in op 7: signed bytes.
    pub const SIGNED_X: u8 = 16;
}

/// Peer address of connection `k`: documentation ranges only (nothing is ever sent).
pub fn peer_addr(k: usize) -> SocketAddr {
    if k % 3 == 2 {
        format!("[2001:db8::{}]:{}", k + 1, 50000 + k).parse().expect("fixed address")
    } else {
        format!("192.0.2.{}:{}", k + 1, 50000 + k).parse().expect("fixed address")
    }
}

#[derive(Debug)]
struct Conn {
    shard: u16,
    id: u64,
    dec: FrameDecoder,
    /// False after a decode error (`conn_task` stops reading).
    reading: bool,
    /// The core asked to close it (Output::Close); `conn_closed` follows at the next delivery.
    closing: bool,
    /// `conn_closed` was called.
    closed: bool,
}

/// The simulated manager. See the module docs.
pub struct Sim {
    start: Instant,
    now: Instant,
    shards: Vec<Shard>,
    inbox: Vec<VecDeque<ShardMsg>>,
    conns: Vec<Conn>,
    secret: Secret,
    /// Every frame written to a connection: (connection index, frame). Used for seeds.
    pub written: Vec<(usize, Frame)>,
    /// Keep `written` (seed generation); off while fuzzing.
    pub record: bool,
}

impl Sim {
    /// A manager in `mode` (see the module docs) with two connections open, one per shard.
    pub fn new(mode: u8) -> Sim {
        let stats = Arc::new(Stats::default());
        let secret = Secret::new(SECRET.to_vec()).expect("long enough");
        let mut cfg = ShardConfig::default();
        if mode & MODE_LIMITS != 0 {
            (cfg.max_connections, cfg.frames_per_sec, cfg.max_calls_per_conn) = LIMITS;
        }
        if mode & MODE_SECRET != 0 {
            cfg.secret = Some(Arc::new(secret.clone()));
        }
        let init =
            |index| ShardInit { index, n: SHARDS, seed: SEED, token_key: TOKEN_KEY, unix_secs: UNIX_START, node: 0 };
        let shards = (0..SHARDS).map(|i| Shard::new(init(i), cfg.clone(), stats.clone())).collect();
        let now = Instant::now();
        let mut sim = Sim {
            start: now,
            now,
            shards,
            inbox: (0..SHARDS).map(|_| VecDeque::new()).collect(),
            conns: Vec::new(),
            secret,
            written: Vec::new(),
            record: false,
        };
        for s in 0..SHARDS {
            sim.open(s);
        }
        sim
    }

    /// Accept a connection on shard `s`; returns its index.
    pub fn open(&mut self, s: u16) -> Option<usize> {
        if self.conns.len() >= MAX_CONNS {
            return None;
        }
        let k = self.conns.len();
        let open = self.shards.iter().map(|s| s.open_connections()).sum();
        let id = self.shards[s as usize].conn_opened(self.now, peer_addr(k), open);
        self.conns.push(Conn { shard: s, id, dec: FrameDecoder::new(), reading: true, closing: false, closed: false });
        self.flush(s);
        Some(k)
    }

    /// Bytes from connection `k`'s peer; with `sign`, REGISTER frames get a valid token.
    pub fn bytes(&mut self, k: usize, data: &[u8], sign: bool) {
        let c = &mut self.conns[k];
        if c.closed || !c.reading {
            return;
        }
        c.dec.push(data);
        let (s, id) = (c.shard, c.id);
        let core = &mut self.shards[s as usize];
        loop {
            match c.dec.next_frame() {
                Ok(Some(Frame::Register { id: cid, udp_port, max_calls, binding, auth, .. })) if sign => {
                    let expiry = auth.map_or(u64::MAX, |t| t.expires_unix);
                    let auth = Some(self.secret.mint(&cid, expiry));
                    core.conn_frame(
                        self.now,
                        id,
                        Frame::Register {
                            id: cid,
                            udp_port,
                            max_calls,
                            binding,
                            auth,
                            nat: proto::nat::NatClass::Unknown,
                            candidates: Vec::new(),
                        },
                    )
                }
                Ok(Some(f)) => core.conn_frame(self.now, id, f),
                Ok(None) => break,
                Err(e) => {
                    core.conn_error(self.now, id, &e);
                    c.reading = false;
                    break;
                }
            }
        }
        self.flush(s);
    }

    /// Advance the clock and run every shard's tick.
    pub fn tick(&mut self, by: Duration) {
        self.now += by;
        let unix = UNIX_START + self.now.duration_since(self.start).as_secs();
        for s in 0..SHARDS {
            self.shards[s as usize].handle_tick(self.now, unix);
            self.flush(s);
        }
    }

    /// Shard `s` handles what is queued for it now; then closes complete.
    pub fn deliver(&mut self, s: u16) {
        let batch: Vec<ShardMsg> = self.inbox[s as usize].drain(..).collect();
        for m in batch {
            self.shards[s as usize].handle_msg(self.now, m);
        }
        self.flush(s);
        self.finish_closes();
    }

    /// The peer closes connection `k`.
    pub fn close(&mut self, k: usize) {
        let c = &mut self.conns[k];
        if c.closed {
            return;
        }
        c.closed = true;
        let s = c.shard;
        self.shards[s as usize].conn_closed(self.now, c.id);
        self.flush(s);
    }

    /// A STUN binding request with `tx` from connection `k`'s host.
    pub fn stun(&mut self, k: usize, tx: [u8; 12]) {
        let mut from = peer_addr(k);
        from.set_port(40000 + k as u16);
        self.inbox[binding_shard(&tx, SHARDS) as usize].push_back(ShardMsg::Binding { txid: tx, from });
    }

    /// Deliver every message until none is left; then no connection or call may remain
    /// once all connections are closed.
    pub fn finish(&mut self) {
        for k in 0..self.conns.len() {
            self.close(k);
        }
        self.settle();
        for (i, s) in self.shards.iter().enumerate() {
            assert_eq!(s.open_connections(), 0, "shard {i} still has connections after all closed");
            assert_eq!(s.owned_calls(), 0, "shard {i} still owns calls after every connection closed");
        }
    }

    /// Deliver messages (and complete closes) until nothing is queued.
    pub fn settle(&mut self) {
        let mut n = 0;
        while self.inbox.iter().any(|q| !q.is_empty()) || self.conns.iter().any(|c| c.closing && !c.closed) {
            for s in 0..SHARDS {
                n += self.inbox[s as usize].len();
                self.deliver(s);
            }
            self.finish_closes();
            assert!(n < MAX_SETTLE, "messages between shards do not settle");
        }
    }

    fn finish_closes(&mut self) {
        for k in 0..self.conns.len() {
            if self.conns[k].closing {
                self.close(k);
            }
        }
    }

    /// Move shard `s`'s output to connections and inboxes, checking it.
    fn flush(&mut self, s: u16) {
        while let Some(o) = self.shards[s as usize].poll_output() {
            match o {
                Output::Frame { conn, frame } => {
                    let k = self
                        .index(s, conn)
                        .unwrap_or_else(|| panic!("shard {s} wrote {frame:?} to unknown conn {conn}"));
                    assert!(!self.conns[k].closed, "shard {s} wrote {frame:?} to closed conn {conn}");
                    assert_frame_round_trips(&frame);
                    if self.record {
                        self.written.push((k, frame));
                    }
                }
                Output::Close { conn } => {
                    let k = self.index(s, conn).unwrap_or_else(|| panic!("shard {s} closed unknown conn {conn}"));
                    self.conns[k].closing = true;
                }
                Output::Shard { to, msg } => {
                    assert!(to < SHARDS, "shard {s} sent {msg:?} to shard {to} of {SHARDS}");
                    self.inbox[to as usize].push_back(msg);
                }
                Output::Cluster(o) => panic!("shard {s} without a node id wrote cluster output {o:?}"),
            }
        }
    }

    fn index(&self, s: u16, conn: u64) -> Option<usize> {
        self.conns.iter().position(|c| c.shard == s && c.id == conn)
    }

    /// Number of connections opened so far.
    pub fn conns(&self) -> usize {
        self.conns.len()
    }
}

/// Run a script (see the module docs; without the mode byte) on `sim`.
pub fn apply(sim: &mut Sim, data: &[u8]) {
    let mut r = data;
    while let Some((&b, rest)) = r.split_first() {
        r = rest;
        let x = (b >> 3) as usize;
        let op = b & 7;
        let signed = op == op::STUN && x >= op::SIGNED_X as usize;
        match op {
            0..=2 | op::STUN if op != op::STUN || signed => {
                let Some((&n, rest)) = r.split_first() else { return };
                let n = (n as usize).min(rest.len());
                let (bytes, rest) = rest.split_at(n);
                r = rest;
                let k = (x % op::SIGNED_X as usize) % sim.conns();
                sim.bytes(k, bytes, signed);
            }
            op::TICK => {
                let Some((&n, rest)) = r.split_first() else { return };
                r = rest;
                sim.tick(Duration::from_millis(50) * u32::from(n));
            }
            op::DELIVER => sim.deliver(x as u16 % SHARDS),
            op::CLOSE => {
                let k = x % sim.conns();
                sim.close(k);
            }
            op::OPEN => {
                sim.open(x as u16 % SHARDS);
            }
            _ => {
                if r.len() < 12 {
                    return;
                }
                let (tx, rest) = r.split_at(12);
                r = rest;
                sim.stun(x % sim.conns(), tx.try_into().expect("12 bytes"));
            }
        }
    }
}

/// Run the target on one input.
pub fn run(data: &[u8]) {
    let Some((&mode, script)) = data.split_first() else { return };
    let mut sim = Sim::new(mode);
    apply(&mut sim, script);
    sim.finish();
}

/// Script builder (for seeds): encodes the mode byte and the operations of the module docs.
pub struct Script(pub Vec<u8>);

impl Script {
    /// A script for a manager in `mode`.
    pub fn new(mode: u8) -> Script {
        Script(vec![mode])
    }
    /// Signed bytes from connection `k` (REGISTER frames get a valid token).
    pub fn signed(&mut self, k: usize, bytes: &[u8]) -> &mut Self {
        for piece in bytes.chunks(255) {
            self.0.push(op::STUN | ((op::SIGNED_X + k as u8) << 3));
            self.0.push(piece.len() as u8);
            self.0.extend_from_slice(piece);
        }
        self
    }
    /// Frame `f` from connection `k`, encoded.
    pub fn frame(&mut self, k: usize, f: &Frame) -> &mut Self {
        let mut b = Vec::new();
        f.encode(&mut b);
        self.raw(k, &b)
    }
    /// Raw bytes from connection `k` (split into pieces of at most 255 bytes).
    pub fn raw(&mut self, k: usize, bytes: &[u8]) -> &mut Self {
        for piece in bytes.chunks(255) {
            self.0.push(op::BYTES | ((k as u8) << 3));
            self.0.push(piece.len() as u8);
            self.0.extend_from_slice(piece);
        }
        self
    }
    /// Advance the clock by `n * 50 ms` and tick.
    pub fn tick(&mut self, n: u8) -> &mut Self {
        self.0.extend_from_slice(&[op::TICK, n]);
        self
    }
    /// Deliver the messages queued for every shard (shard 0 first).
    pub fn deliver(&mut self) -> &mut Self {
        for s in 0..SHARDS as u8 {
            self.0.push(op::DELIVER | (s << 3));
        }
        self
    }
    /// The peer closes connection `k`.
    pub fn close(&mut self, k: usize) -> &mut Self {
        self.0.push(op::CLOSE | ((k as u8) << 3));
        self
    }
    /// Open a connection on shard `s`.
    pub fn open(&mut self, s: u16) -> &mut Self {
        self.0.push(op::OPEN | ((s as u8) << 3));
        self
    }
    /// A STUN binding for `tx` from connection `k`'s host.
    pub fn stun(&mut self, k: usize, tx: [u8; 12]) -> &mut Self {
        self.0.push(op::STUN | ((k as u8) << 3));
        self.0.extend_from_slice(&tx);
        self
    }
}
