//! The manager's shard logic, sans-IO.
//!
//! A manager runs N shards. Each shard owns the connections it accepted and the part of the
//! directory whose client ids hash to it ("home shard"). Calls are owned by the callee's home
//! shard, which holds the callee's busy count; the owner's index is in the top 16 bits of
//! the call id, so any shard can route a call's frames to it. Shards talk only by
//! [`ShardMsg`]; a shard's state is touched by one thread, so there is no lock on this path.
//!
//! Inputs: `conn_opened`, `conn_frame`, `conn_error`, `conn_closed`, `handle_msg`,
//! `handle_tick`. Output: [`Shard::poll_output`] until `None` after every input.
//!
//! Pure: the shard reads no clock (monotonic time comes with every input, wall-clock time
//! with every tick), draws no randomness of its own (its seed and the key behind call tokens
//! are given at start, [`ShardInit`]), reads no shared counter (the manager-wide number of
//! open connections comes with `conn_opened`), and shares no table: its part of the STUN
//! binding table ([`bindings`]) is its own, fed by messages. It only *writes* the manager's
//! counters ([`stats::Stats`], relaxed atomics).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod bindings;
pub mod stats;
pub mod stun;
pub mod stun_limit;

use crate::cluster::ClusterOut;
use crate::nat::{self, NatClass, Strategy};
use crate::rng::Rng;
use crate::wire::frame::{
    AddrSource, CallId, Candidate, CandidateKind, ClientId, ErrorCode, Frame, FrameError, HangupReason, KeyShare,
    RejectReason, UnknownReason,
};

use crate::shard::bindings::{binding_shard, BindingTable, TxId, MAX_BINDINGS, PURGE_EVERY};
use crate::shard::stats::{CallOutcome, Stats};

/// Frames a connection may have refused (ERROR NotRegistered or Unexpected) before it is
/// closed: a client that keeps sending what it may not send is broken or hostile.
pub const MAX_CONN_ERRORS: u32 = 16;

/// Timed-out connections one shard closes per tick at most (the rest wait for the next).
pub const MAX_KICKS_PER_TICK: usize = 128;

/// Death records one shard looks at per tick at most when it expires tombstones (the rest
/// wait for the next tick): a flood that ended one TTL ago is forgotten over a few ticks,
/// not in one stall.
pub const MAX_EXPIRIES_PER_TICK: usize = 8192;

/// Stale death records (of ids that registered again since) a shard lets pile up beyond
/// twice its tombstones before it drops them in one pass (amortized O(1) per death).
const DEATHS_SLACK: usize = 1024;

/// A connection anywhere in the manager (or, in a cluster, anywhere in the service): its
/// node, its shard and its id within that shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    /// The manager (node) that holds the connection: [`ShardInit::node`], 0 for a manager
    /// that is not in a cluster.
    pub node: u64,
    /// The shard that owns the connection.
    pub shard: u16,
    /// Connection id within that shard.
    pub id: u64,
}

/// Timers and limits of a shard.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// A connection must REGISTER within this time.
    pub register_timeout: Duration,
    /// A connection silent for this long is closed (clients PING every 10 s).
    pub idle_timeout: Duration,
    /// A call whose callee has not replied PUNCHED within this time is rejected.
    pub ring_timeout: Duration,
    /// With a secret, REGISTER needs a valid token for its id ([`crate::auth`]); without,
    /// any id may register.
    pub secret: Option<Arc<crate::auth::Secret>>,
    /// Connections the manager holds at most, counted over every shard sharing the stats;
    /// more are refused with ERROR `TooManyConnections` (0: no limit).
    pub max_connections: usize,
    /// Frames per second a connection may send on average, in bursts of twice that; a
    /// connection over it is closed with ERROR `RateLimited` (0: no limit).
    pub frames_per_sec: f64,
    /// Calls a connection may be party to at once; a CALL beyond is rejected with
    /// `CallerLimit` (0: no limit).
    pub max_calls_per_conn: usize,
    /// How long the directory keeps the entry of an id whose connection closed (a
    /// tombstone: a CALL to it is answered UNKNOWN `Offline`). After that the id is
    /// forgotten: UNKNOWN `NeverRegistered`.
    pub tombstone_ttl: Duration,
    /// Tombstones the manager keeps at most, over all shards (each shard keeps its share,
    /// rounded up); past it the oldest are forgotten first. 0: none are kept (an id is
    /// forgotten as soon as its connection closes).
    pub max_tombstones: usize,
}

/// Default [`ShardConfig::tombstone_ttl`]: 10 minutes.
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(600);

/// Default [`ShardConfig::max_tombstones`], over all shards.
pub const DEFAULT_MAX_TOMBSTONES: usize = 100_000;

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            register_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(45),
            // Shorter than the client's START timeout (5 s), so a caller whose callee never
            // answers learns why (REJECT timeout) rather than only timing out.
            ring_timeout: Duration::from_secs(4),
            secret: None,
            max_connections: 0,
            frames_per_sec: 0.0,
            max_calls_per_conn: 0,
            tombstone_ttl: DEFAULT_TOMBSTONE_TTL,
            max_tombstones: DEFAULT_MAX_TOMBSTONES,
        }
    }
}

/// What a shard starts from besides its configuration: its place among the shards and the
/// values it cannot make itself (it reads no clock and draws no randomness).
#[derive(Clone)]
pub struct ShardInit {
    /// This shard's index.
    pub index: u16,
    /// Shards in the manager.
    pub n: u16,
    /// Seeds the shard's generator (the start of its call ids). Reproducible runs pass a
    /// fixed value.
    pub seed: u64,
    /// The key call tokens are derived from (HMAC-SHA256 over the call id). A manager passes
    /// 32 bytes from the kernel's CSPRNG, so a client that sees its own calls' tokens cannot
    /// work out anyone else's; a simulation passes a fixed key.
    pub token_key: [u8; 32],
    /// Seconds since the Unix epoch at start (registration tokens expire in wall-clock
    /// time); [`Shard::handle_tick`] brings it up to date.
    pub unix_secs: u64,
    /// This manager's node id in a cluster ([`crate::cluster`]): random and nonzero, new at
    /// every start. 0: no cluster (every connection and call is this manager's).
    pub node: u64,
}

impl std::fmt::Debug for ShardInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token key stays out of logs.
        f.debug_struct("ShardInit").field("index", &self.index).field("n", &self.n).finish_non_exhaustive()
    }
}

/// What a connection's frame changes in a call owned by another shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// Nothing.
    None,
    /// The connection is now a party to this call, owned by a shard of this node (the
    /// second field), with this call_ref (the caller's; 0 for the callee).
    Add(CallId, u64, u32),
    /// The connection is no longer a party to this call.
    Remove(CallId),
}

/// Messages between shards (and from the STUN responder to a shard).
#[derive(Debug, Clone)]
pub enum ShardMsg {
    /// From the STUN responder to [`binding_shard`]`(txid)`: a Binding Request with `txid`
    /// came from `from` and was answered. Sent before the answer leaves.
    Binding {
        /// The request's transaction id.
        txid: TxId,
        /// Where it came from: the client's public UDP address.
        from: SocketAddr,
    },
    /// To [`binding_shard`]`(binding)`, always through the inbox (never handled inline, so it
    /// queues behind the [`ShardMsg::Binding`] it names): a REGISTER naming a STUN binding.
    /// The binding shard fills in the public address and forwards the registration to the
    /// id's home shard as [`ShardMsg::Register`].
    Resolve {
        /// The binding's transaction id.
        binding: TxId,
        /// Client id.
        id: ClientId,
        /// Its connection.
        conn: ConnRef,
        /// The address to use if the binding is unknown or expired: the TCP peer's IP with
        /// the UDP port the client named.
        fallback: SocketAddr,
        /// Concurrent call limit.
        max_calls: u16,
        /// The client's NAT class.
        nat: NatClass,
        /// Its candidate addresses.
        candidates: Vec<Candidate>,
    },
    /// To the id's home shard: bind `id` to `conn`.
    Register {
        /// Client id.
        id: ClientId,
        /// Its connection.
        conn: ConnRef,
        /// Public UDP address to hand out.
        public: SocketAddr,
        /// How it was learned.
        source: AddrSource,
        /// Concurrent call limit.
        max_calls: u16,
        /// The client's NAT class.
        nat: NatClass,
        /// Its candidate addresses.
        candidates: Vec<Candidate>,
    },
    /// To the home shard (or to the shard resolving the connection's REGISTER, which forwards
    /// it home behind that REGISTER): `conn` (which had registered `id`) closed.
    Unregister {
        /// Client id.
        id: ClientId,
        /// The closed connection.
        conn: ConnRef,
    },
    /// To the callee's home shard: a CALL (boxed: most messages are not CALLs).
    CallReq(Box<CallReq>),
    /// To the call's owner: a party sent PUNCHED.
    Punched {
        /// Call.
        call_id: CallId,
        /// Sender.
        conn: ConnRef,
        /// Callee's local UDP port.
        udp_port: u16,
        /// The callee's key share, relayed unchanged in START.
        keys: Option<Box<KeyShare>>,
    },
    /// To the call's owner: a party sent HANGUP.
    Hangup {
        /// Call.
        call_id: CallId,
        /// Sender.
        conn: ConnRef,
        /// Why.
        reason: HangupReason,
    },
    /// To the call's owner: the callee sent REJECT.
    Decline {
        /// Call.
        call_id: CallId,
        /// Sender.
        conn: ConnRef,
        /// Why.
        reason: RejectReason,
    },
    /// To the call's owner: a party's connection closed.
    PartyGone {
        /// Call.
        call_id: CallId,
        /// The closed connection.
        conn: ConnRef,
    },
    /// To a connection's shard: write `frame` (if any) and update its call set.
    Deliver {
        /// Connection id within the receiving shard.
        conn: u64,
        /// Frame to write.
        frame: Option<Frame>,
        /// Call-set change.
        track: Track,
    },
    /// To a connection's shard: registration accepted (write REGISTERED).
    Registered {
        /// Connection id within the receiving shard.
        conn: u64,
        /// The public address.
        public: SocketAddr,
        /// How it was learned.
        source: AddrSource,
        /// The NAT class the home shard accepted (a `mapped` class without a usable
        /// mapping is taken back).
        nat: NatClass,
    },
    /// To a connection's shard: write ERROR and close the connection.
    Kick {
        /// Connection id within the receiving shard.
        conn: u64,
        /// Error code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// From the cluster bridge to the id's home shard: the directory entry written for
    /// `id` on `conn` has generation `gen` (the engine's revision).
    Generation {
        /// Client id.
        id: ClientId,
        /// The connection the entry was written for.
        conn: ConnRef,
        /// Its generation.
        gen: u64,
    },
    /// From the cluster bridge to the id's home shard: `id` registered on another node,
    /// replacing generation `gen`; close its connection here if it still holds that one.
    Replace {
        /// Client id.
        id: ClientId,
        /// The generation that was replaced.
        gen: u64,
    },
    /// From the cluster bridge to every shard: `node` is gone (no heartbeat, or no
    /// responders on its inbox). Calls with a party there end.
    NodeGone {
        /// The node.
        node: u64,
    },
}

/// A CALL on its way to the callee's home shard, on this node or (in a cluster) another.
#[derive(Debug, Clone)]
pub struct CallReq {
    /// Caller id.
    pub caller: ClientId,
    /// Caller connection.
    pub caller_conn: ConnRef,
    /// Caller's public UDP address.
    pub caller_addr: SocketAddr,
    /// Caller's NAT class.
    pub caller_nat: NatClass,
    /// Caller's host addresses (passed on only to a callee behind the same public IP).
    pub caller_hosts: Vec<Candidate>,
    /// Caller's reference.
    pub call_ref: u32,
    /// Callee id.
    pub callee: ClientId,
    /// The caller's key share, relayed unchanged in INCOMING.
    pub caller_keys: Option<Box<KeyShare>>,
    /// The generation of the callee's entry the caller's node looked up: 0 for a CALL made
    /// on the callee's own node. A home shard that no longer holds that generation answers
    /// NOT_HERE ([`crate::cluster::ClusterOut::NotHere`]).
    pub gen: u64,
    /// Tries so far across nodes (a NOT_HERE is retried once after a fresh lookup).
    pub attempt: u8,
}

/// Output of a shard.
#[derive(Debug, Clone)]
pub enum Output {
    /// Write a frame to one of this shard's connections.
    Frame {
        /// Connection id.
        conn: u64,
        /// Frame.
        frame: Frame,
    },
    /// Close one of this shard's connections (after writing what was queued).
    Close {
        /// Connection id.
        conn: u64,
    },
    /// Send a message to another shard.
    Shard {
        /// Destination shard.
        to: u16,
        /// Message.
        msg: ShardMsg,
    },
    /// To the cluster bridge ([`crate::cluster::Bridge`]): only from a shard with a node id.
    Cluster(crate::cluster::ClusterOut),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ConnState {
    Open,
    Registering(ClientId),
    Registered(ClientId),
}

#[derive(Debug)]
struct Conn {
    peer: SocketAddr,
    state: ConnState,
    public: Option<SocketAddr>,
    /// The NAT class its REGISTER named (after the manager checked a mapping).
    nat: NatClass,
    /// The host candidates its REGISTER named.
    hosts: Vec<Candidate>,
    opened: Instant,
    last_rx: Instant,
    /// The calls it is a party to.
    calls: HashMap<CallId, Party>,
    /// A REGISTER of this connection is being resolved on this shard (the STUN binding's
    /// owner): until REGISTERED, its Unregister must follow the same way (see `conn_closed`).
    resolving: Option<u16>,
    closing: bool,
    /// Frame allowance left (token bucket, refilled at `frames_per_sec`).
    allowance: f64,
    /// Frames refused with an ERROR so far.
    errors: u32,
    /// On TLS, the connection's exporter value ([`Shard::conn_secured`]): its REGISTER's
    /// token must be bound to it ([`crate::auth::bind`]).
    binding: Option<[u8; 32]>,
}

/// A connection's part in a call, as its own shard knows it.
#[derive(Debug, Clone, Copy)]
struct Party {
    /// The node of the call's owner shard.
    node: u64,
    /// The caller's call_ref (0 for the callee).
    call_ref: u32,
    /// START went out to it (the call has a path; its media is direct).
    started: bool,
}

#[derive(Debug)]
struct Entry {
    conn: Option<ConnRef>,
    public: SocketAddr,
    source: AddrSource,
    nat: NatClass,
    /// Host candidates (for callers behind the same public IP).
    hosts: Vec<Candidate>,
    max_calls: u16,
    active_calls: u32,
    /// In a cluster: the generation of the entry in the cluster directory, 0 while it is
    /// being written.
    gen: u64,
    /// While `conn` is None (a tombstone): which death made it one, matching its record in
    /// `Shard::deaths`. 0 for a live entry.
    death: u64,
}

/// A death in the directory: the entry of `id` became a tombstone at `at`. The record is
/// stale (and skipped) if the entry is gone, live again, or a tombstone of a later death.
#[derive(Debug)]
struct Death {
    id: ClientId,
    at: Instant,
    death: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    Ringing { deadline: Instant },
    Started,
}

#[derive(Debug)]
struct CallRec {
    caller_conn: ConnRef,
    call_ref: u32,
    callee: ClientId,
    callee_conn: ConnRef,
    callee_addr: SocketAddr,
    callee_source: AddrSource,
    callee_nat: NatClass,
    /// The callee's host candidates, if the caller is behind the same public IP.
    callee_hosts: Vec<Candidate>,
    /// How the call's path is made (from both classes), for the per-strategy outcomes.
    strategy: Strategy,
    token: u64,
    state: CallState,
    /// When the owner shard took the CALL.
    requested: Instant,
}

/// Which shard is the home of `id` among `n` shards (FNV-1a 64).
pub fn home_shard(id: &ClientId, n: u16) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_str().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % n as u64) as u16
}

/// The shard that owns a call.
pub fn owner_shard(call_id: CallId) -> u16 {
    (call_id.0 >> 48) as u16
}

/// One shard. See the module docs.
#[derive(Debug)]
pub struct Shard {
    index: u16,
    n: u16,
    /// [`ShardInit::node`].
    node: u64,
    cfg: ShardConfig,
    /// This shard's part of the STUN binding table.
    bindings: BindingTable,
    next_purge: Option<Instant>,
    stats: Arc<Stats>,
    token_key: [u8; 32],
    unix_secs: u64,
    next_conn: u64,
    next_call: u64,
    conns: HashMap<u64, Conn>,
    dir: HashMap<ClientId, Entry>,
    /// Entries of `dir` that are tombstones.
    tombstones: usize,
    /// This shard's share of `cfg.max_tombstones`.
    max_tombstones: usize,
    /// Deaths, oldest first: one live record per tombstone, plus stale ones (see [`Death`]),
    /// dropped as they are reached or when they pile up ([`DEATHS_SLACK`]).
    deaths: VecDeque<Death>,
    /// The number of the next death (from 1; 0 marks a live entry).
    next_death: u64,
    calls: HashMap<CallId, CallRec>,
    out: VecDeque<Output>,
    /// The time of the input being handled (messages to this same shard reuse it).
    now: Option<Instant>,
}

impl Shard {
    /// Shard `init.index` of `init.n`, counting into `stats` (shared by every shard and the
    /// STUN responder of one manager).
    pub fn new(init: ShardInit, cfg: ShardConfig, stats: Arc<Stats>) -> Self {
        let ShardInit { index, n, seed, token_key, unix_secs, node } = init;
        let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        // Call ids start at a random point, so a restarted manager does not hand out the ids
        // of calls that are still running between clients (they would take a new INCOMING
        // for a duplicate of the old call). 2^40 starting points, 2^48 ids before a wrap.
        let next_call = 1 + rng.below(1 << 40);
        let max_tombstones = cfg.max_tombstones.div_ceil(n.max(1) as usize);
        Shard {
            index,
            n,
            node,
            cfg,
            bindings: BindingTable::new(MAX_BINDINGS / n.max(1) as usize),
            next_purge: None,
            stats,
            token_key,
            unix_secs,
            next_conn: 1,
            next_call,
            conns: HashMap::new(),
            dir: HashMap::new(),
            tombstones: 0,
            max_tombstones,
            deaths: VecDeque::new(),
            next_death: 1,
            calls: HashMap::new(),
            out: VecDeque::new(),
            now: None,
        }
    }

    /// This shard's index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Connections open on this shard.
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// Directory entries whose home is this shard (live and tombstones).
    pub fn directory_entries(&self) -> usize {
        self.dir.len()
    }

    /// Of those, tombstones (ids whose connection closed).
    pub fn tombstones(&self) -> usize {
        self.tombstones
    }

    /// Death records this shard holds (one per tombstone, plus stale ones not yet dropped).
    pub fn death_records(&self) -> usize {
        self.deaths.len()
    }

    /// Calls owned by this shard.
    pub fn owned_calls(&self) -> usize {
        self.calls.len()
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// STUN bindings this shard holds.
    pub fn bindings(&self) -> usize {
        self.bindings.len()
    }

    /// A connection from `peer` was accepted; returns its id. `open_before` is the number of
    /// connections open in the whole manager before this one (the driver counts them over
    /// all shards), so `max_connections` holds however unevenly the kernel spreads
    /// connections over the shards.
    pub fn conn_opened(&mut self, now: Instant, peer: SocketAddr, open_before: usize) -> u64 {
        self.now = Some(now);
        let id = self.next_conn;
        self.next_conn += 1;
        let full = self.cfg.max_connections > 0 && open_before >= self.cfg.max_connections;
        let allowance = 2.0 * self.cfg.frames_per_sec;
        self.conns.insert(
            id,
            Conn {
                peer,
                state: ConnState::Open,
                public: None,
                nat: NatClass::Unknown,
                hosts: Vec::new(),
                opened: now,
                last_rx: now,
                calls: HashMap::new(),
                resolving: None,
                closing: false,
                allowance,
                errors: 0,
                binding: None,
            },
        );
        self.stats.inc(&self.stats.connections_accepted);
        if full {
            self.stats.inc(&self.stats.connections_refused);
            self.kick(id, ErrorCode::TooManyConnections, "the manager is full; try later".into());
        }
        id
    }

    /// The connection's byte stream failed to decode: ERROR, close, count.
    pub fn conn_error(&mut self, now: Instant, conn: u64, err: &FrameError) {
        self.now = Some(now);
        let code = match err {
            FrameError::Oversized { .. } => {
                self.stats.inc(&self.stats.frames_oversized);
                ErrorCode::Oversized
            }
            FrameError::UnsupportedVersion(_) => {
                self.stats.inc(&self.stats.frames_malformed);
                ErrorCode::UnsupportedVersion
            }
            _ => {
                self.stats.inc(&self.stats.frames_malformed);
                ErrorCode::Malformed
            }
        };
        tracing::debug!(conn, "closing connection: {err}");
        self.kick(conn, code, err.to_string());
    }

    /// The connection's TLS handshake completed (the IO calls this before handing over any
    /// frame of it): its REGISTER must carry a token bound to `binding`, the connection's
    /// exporter value ([`crate::stream::FrameStream::binding`]), so a REGISTER captured
    /// elsewhere cannot be replayed on it.
    pub fn conn_secured(&mut self, now: Instant, conn: u64, binding: [u8; 32], resumed: bool) {
        self.now = Some(now);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.binding = Some(binding);
        self.stats.inc(&self.stats.tls_handshakes);
        if resumed {
            self.stats.inc(&self.stats.tls_resumed);
        }
    }

    /// The connection's TLS layer failed (a failed handshake, a bad record) or refused a
    /// plaintext client: count it and close. The IO writes what the stream still has (a TLS
    /// alert, or the plaintext ERROR) before the close.
    pub fn conn_tls_failed(&mut self, now: Instant, conn: u64, err: &crate::stream::StreamError) {
        self.now = Some(now);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        match err {
            crate::stream::StreamError::Plaintext { .. } => self.stats.inc(&self.stats.tls_plaintext_refused),
            _ if c.binding.is_none() => self.stats.inc(&self.stats.tls_handshake_failed),
            _ => self.stats.inc(&self.stats.frames_malformed),
        }
        tracing::debug!(conn, "closing connection: {err}");
        if !c.closing {
            c.closing = true;
            self.out.push_back(Output::Close { conn });
        }
    }

    /// The connection closed (by the peer, an error, or after [`Output::Close`]). Returns
    /// whether it was open (false for an id already closed), so a driver counting open
    /// connections counts each close once.
    pub fn conn_closed(&mut self, now: Instant, conn: u64) -> bool {
        self.now = Some(now);
        let Some(c) = self.conns.remove(&conn) else { return false };
        self.stats.inc(&self.stats.connections_closed);
        let me = self.conn_ref(conn);
        // In call id order, not the set's: the messages come out the same every run.
        let mut calls: Vec<(CallId, u64)> = c.calls.into_iter().map(|(id, p)| (id, p.node)).collect();
        calls.sort_unstable_by_key(|c| c.0 .0);
        for (call_id, node) in calls {
            self.route_to(node, owner_shard(call_id), ShardMsg::PartyGone { call_id, conn: me });
        }
        match (c.state, c.resolving) {
            // Its Register is on its way through the binding's shard: the Unregister follows
            // it through that shard's inbox (which forwards it home), so it cannot overtake
            // the Register and leave the directory pointing at this closed connection.
            (ConnState::Registering(id), Some(via)) => {
                self.out.push_back(Output::Shard { to: via, msg: ShardMsg::Unregister { id, conn: me } });
            }
            (ConnState::Registering(id) | ConnState::Registered(id), _) => {
                self.route(home_shard(&id, self.n), ShardMsg::Unregister { id, conn: me });
            }
            (ConnState::Open, _) => {}
        }
        true
    }

    /// A frame from one of this shard's connections.
    pub fn conn_frame(&mut self, now: Instant, conn: u64, frame: Frame) {
        self.now = Some(now);
        self.stats.inc(&self.stats.frames_in);
        let me = self.conn_ref(conn);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let since = now.saturating_duration_since(c.last_rx).as_secs_f64();
        c.last_rx = now;
        if c.closing {
            return;
        }
        if self.cfg.frames_per_sec > 0.0 {
            let rate = self.cfg.frames_per_sec;
            c.allowance = (c.allowance + since * rate).min(2.0 * rate) - 1.0;
            if c.allowance < 0.0 {
                self.stats.inc(&self.stats.connections_flooding);
                self.kick(conn, ErrorCode::RateLimited, format!("more than {rate} frames/s"));
                return;
            }
        }
        match frame {
            Frame::Ping { nonce } => self.send(conn, Frame::Pong { nonce }),
            Frame::Pong { .. } => {}
            Frame::Register { id, udp_port, max_calls, binding, auth, nat, candidates } => {
                if c.state != ConnState::Open {
                    self.unexpected(conn, "REGISTER on an already registered connection");
                    return;
                }
                if let Some(secret) = &self.cfg.secret {
                    // On TLS only the token bound to this connection is taken (no replay).
                    if let Err(e) = secret.verify_on(&id, auth.as_ref(), self.unix_secs, c.binding.as_ref()) {
                        let counter = match e {
                            crate::auth::AuthError::Missing => &self.stats.auth_missing,
                            crate::auth::AuthError::Invalid => &self.stats.auth_invalid,
                            crate::auth::AuthError::Expired => &self.stats.auth_expired,
                            crate::auth::AuthError::Unbound => &self.stats.auth_unbound,
                        };
                        self.stats.inc(counter);
                        tracing::debug!(%id, reason = e.message(), "registration refused");
                        self.kick(conn, ErrorCode::Unauthorized, e.message().to_string());
                        return;
                    }
                }
                let fallback = SocketAddr::new(c.peer.ip(), udp_port);
                c.state = ConnState::Registering(id.clone());
                c.nat = nat;
                c.hosts = candidates.iter().filter(|k| k.kind == CandidateKind::Host).copied().collect();
                let home = home_shard(&id, self.n);
                match binding {
                    // This shard holds the binding: use it at once.
                    Some(binding) if binding_shard(&binding, self.n) == self.index && self.bindings.has(&binding) => {
                        let (public, source) = match self.bindings.take(&binding, now) {
                            Some(addr) => (addr, AddrSource::Stun),
                            None => (fallback, AddrSource::TcpPeer),
                        };
                        let msg = ShardMsg::Register { id, conn: me, public, source, max_calls, nat, candidates };
                        self.route(home, msg);
                    }
                    // Through the binding shard's inbox, behind the binding (module docs of
                    // `bindings`), even when that shard is this one: the binding may still
                    // be on its way there.
                    Some(binding) => {
                        let to = binding_shard(&binding, self.n);
                        c.resolving = Some(to);
                        let msg = ShardMsg::Resolve { binding, id, conn: me, fallback, max_calls, nat, candidates };
                        self.out.push_back(Output::Shard { to, msg });
                    }
                    None => {
                        let source = AddrSource::TcpPeer;
                        let msg =
                            ShardMsg::Register { id, conn: me, public: fallback, source, max_calls, nat, candidates };
                        self.route(home, msg);
                    }
                }
            }
            Frame::Call { call_ref, callee, keys } => {
                let ConnState::Registered(caller) = c.state.clone() else {
                    self.not_registered(conn, "CALL");
                    return;
                };
                self.stats.inc(&self.stats.calls_requested);
                if self.cfg.max_calls_per_conn > 0 && c.calls.len() >= self.cfg.max_calls_per_conn {
                    self.stats.inc(&self.stats.calls_rejected);
                    self.stats.inc(&self.stats.calls_caller_limit);
                    self.send(
                        conn,
                        Frame::Reject {
                            call_ref,
                            call_id: CallId(0),
                            reason: RejectReason::CallerLimit,
                            callee_nat: crate::nat::NatClass::Unknown,
                        },
                    );
                    return;
                }
                if caller == callee {
                    self.stats.inc(&self.stats.calls_rejected);
                    self.send(
                        conn,
                        Frame::Reject {
                            call_ref,
                            call_id: CallId(0),
                            reason: RejectReason::SelfCall,
                            callee_nat: crate::nat::NatClass::Unknown,
                        },
                    );
                    return;
                }
                let caller_addr = c.public.expect("registered connections have a public address");
                let (caller_nat, caller_hosts) = (c.nat, c.hosts.clone());
                let home = home_shard(&callee, self.n);
                let msg = ShardMsg::CallReq(Box::new(CallReq {
                    caller,
                    caller_conn: me,
                    caller_addr,
                    caller_nat,
                    caller_hosts,
                    call_ref,
                    callee,
                    caller_keys: keys,
                    gen: 0,
                    attempt: 0,
                }));
                self.route(home, msg);
            }
            Frame::Punched { call_id, udp_port, keys } => {
                if !matches!(c.state, ConnState::Registered(_)) {
                    self.not_registered(conn, "PUNCHED");
                    return;
                }
                if owner_shard(call_id) >= self.n {
                    // A made-up call id naming a shard that does not exist.
                    let f = Frame::Error { code: ErrorCode::UnknownCall, message: format!("no call {call_id}") };
                    self.send(conn, f);
                    return;
                }
                self.route(owner_shard(call_id), ShardMsg::Punched { call_id, conn: me, udp_port, keys });
            }
            Frame::Hangup { call_id, reason } => {
                if !matches!(c.state, ConnState::Registered(_)) {
                    self.not_registered(conn, "HANGUP");
                    return;
                }
                if owner_shard(call_id) >= self.n {
                    self.stats.inc(&self.stats.hangups_unknown_call);
                    return;
                }
                let node = c.calls.remove(&call_id).map_or(self.node, |p| p.node);
                self.route_to(node, owner_shard(call_id), ShardMsg::Hangup { call_id, conn: me, reason });
            }
            Frame::Reject { call_id, reason, .. } => {
                if !matches!(c.state, ConnState::Registered(_)) {
                    self.not_registered(conn, "REJECT");
                    return;
                }
                if owner_shard(call_id) >= self.n {
                    self.stats.inc(&self.stats.hangups_unknown_call);
                    return;
                }
                // The call stays tracked until the owner confirms the sender is the callee.
                let node = c.calls.get(&call_id).map_or(self.node, |p| p.node);
                self.route_to(node, owner_shard(call_id), ShardMsg::Decline { call_id, conn: me, reason });
            }
            other => {
                let name = other.name();
                self.unexpected(conn, &format!("{name} is a manager-to-client frame"));
            }
        }
    }

    /// A message from another shard (or this one).
    pub fn handle_msg(&mut self, now: Instant, msg: ShardMsg) {
        self.now = Some(now);
        match msg {
            ShardMsg::Binding { txid, from } => {
                if !self.bindings.insert(txid, from, now) {
                    self.stats.inc(&self.stats.stun_table_full);
                }
            }
            ShardMsg::Resolve { binding, id, conn, fallback, max_calls, nat, candidates } => {
                let (public, source) = match self.bindings.take(&binding, now) {
                    Some(addr) => (addr, AddrSource::Stun),
                    None => (fallback, AddrSource::TcpPeer),
                };
                let home = home_shard(&id, self.n);
                let msg = ShardMsg::Register { id, conn, public, source, max_calls, nat, candidates };
                self.route(home, msg);
            }
            ShardMsg::Register { id, conn, public, source, max_calls, nat, candidates } => {
                self.stats.inc(&self.stats.registrations);
                // A port mapping is handed out instead of the observed address, if it is on
                // the observed IP: a mapping on another IP is an inner router's (a double
                // NAT), which no peer can reach.
                let (public, source, nat) = match candidates.iter().find(|k| k.kind == CandidateKind::Mapped) {
                    Some(m) if m.addr.ip() == public.ip() => {
                        self.stats.inc(&self.stats.registrations_mapped);
                        (m.addr, AddrSource::Mapped, NatClass::Mapped)
                    }
                    Some(_) => {
                        self.stats.inc(&self.stats.registrations_mapping_ignored);
                        let nat = if nat == NatClass::Mapped { NatClass::Unknown } else { nat };
                        (public, source, nat)
                    }
                    // A class of `mapped` with no mapping to hand out means nothing.
                    None if nat == NatClass::Mapped => (public, source, NatClass::Unknown),
                    None => (public, source, nat),
                };
                let hosts: Vec<Candidate> = candidates.into_iter().filter(|k| k.kind == CandidateKind::Host).collect();
                let entry = match self.dir.entry(id.clone()) {
                    std::collections::hash_map::Entry::Occupied(o) => {
                        let e = o.into_mut();
                        if e.conn.is_none() {
                            // A tombstone comes back to life; its death record is now stale.
                            self.tombstones -= 1;
                            self.stats.dec(&self.stats.directory_tombstones);
                            e.death = 0;
                        }
                        e
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        self.stats.inc(&self.stats.directory_entries);
                        v.insert(Entry {
                            conn: None,
                            public,
                            source,
                            nat,
                            hosts: Vec::new(),
                            max_calls,
                            active_calls: 0,
                            gen: 0,
                            death: 0,
                        })
                    }
                };
                let old = entry.conn.replace(conn);
                entry.public = public;
                entry.source = source;
                entry.nat = nat;
                entry.hosts = hosts;
                entry.max_calls = max_calls;
                entry.gen = 0;
                if self.node != 0 {
                    self.out.push_back(Output::Cluster(ClusterOut::Registered { id: id.clone(), conn }));
                }
                if let Some(old) = old.filter(|o| *o != conn) {
                    self.stats.inc(&self.stats.registrations_replaced);
                    let message = format!("id {id} registered by a newer connection");
                    self.route(old.shard, ShardMsg::Kick { conn: old.id, code: ErrorCode::Replaced, message });
                }
                self.route(conn.shard, ShardMsg::Registered { conn: conn.id, public, source, nat });
            }
            ShardMsg::Unregister { id, conn } => {
                let home = home_shard(&id, self.n);
                if home != self.index {
                    // Sent by way of a binding's shard (`conn_closed`): on to the home shard.
                    self.route(home, ShardMsg::Unregister { id, conn });
                    return;
                }
                if self.dir.get(&id).is_some_and(|e| e.conn == Some(conn)) {
                    self.bury(id, now);
                }
            }
            ShardMsg::CallReq(req) => self.on_call_req(now, req),
            ShardMsg::Punched { call_id, conn, udp_port, keys } => self.on_punched(call_id, conn, udp_port, keys),
            ShardMsg::Hangup { call_id, conn, reason } => {
                let Some(rec) = self.calls.get(&call_id) else {
                    // Late or duplicate hangups are normal (both sides may hang up at once).
                    self.stats.inc(&self.stats.hangups_unknown_call);
                    return;
                };
                let other = if conn == rec.caller_conn {
                    rec.callee_conn
                } else if conn == rec.callee_conn {
                    rec.caller_conn
                } else {
                    self.deliver(conn, Some(not_party(call_id)), Track::None);
                    return;
                };
                let started = rec.state == CallState::Started;
                let outcome = match reason {
                    HangupReason::Normal | HangupReason::Shutdown if started => CallOutcome::HungUp,
                    HangupReason::Normal | HangupReason::Shutdown => CallOutcome::Cancelled,
                    HangupReason::Timeout => CallOutcome::SetupTimeout,
                    HangupReason::PeerGone => CallOutcome::MediaStopped,
                    _ => CallOutcome::OtherHangup,
                };
                self.end_call(call_id, outcome);
                self.deliver(other, Some(Frame::Hangup { call_id, reason }), Track::Remove(call_id));
            }
            ShardMsg::Decline { call_id, conn, reason } => {
                let Some(rec) = self.calls.get(&call_id) else {
                    self.stats.inc(&self.stats.hangups_unknown_call);
                    return;
                };
                if conn != rec.callee_conn {
                    self.deliver(conn, Some(not_party(call_id)), Track::None);
                    return;
                }
                let (caller_conn, call_ref) = (rec.caller_conn, rec.call_ref);
                self.stats.inc(&self.stats.calls_rejected);
                self.end_call(call_id, CallOutcome::Declined);
                self.deliver(conn, None, Track::Remove(call_id));
                self.deliver(
                    caller_conn,
                    Some(Frame::Reject { call_ref, call_id, reason, callee_nat: crate::nat::NatClass::Unknown }),
                    Track::Remove(call_id),
                );
            }
            ShardMsg::PartyGone { call_id, conn } => {
                let Some(rec) = self.calls.get(&call_id) else { return };
                let ringing = matches!(rec.state, CallState::Ringing { .. });
                let (caller_conn, callee_conn, call_ref) = (rec.caller_conn, rec.callee_conn, rec.call_ref);
                if conn != caller_conn && conn != callee_conn {
                    return;
                }
                self.end_call(call_id, CallOutcome::PartyGone);
                // A call still ringing cannot go on: tell the other side. A started call's media
                // is direct and may well continue; the peers decide by media timeout.
                if ringing && conn == callee_conn {
                    self.stats.inc(&self.stats.calls_rejected);
                    let f = Frame::Reject {
                        call_ref,
                        call_id,
                        reason: RejectReason::CalleeGone,
                        callee_nat: crate::nat::NatClass::Unknown,
                    };
                    self.deliver(caller_conn, Some(f), Track::Remove(call_id));
                } else if ringing {
                    let f = Frame::Hangup { call_id, reason: HangupReason::PeerGone };
                    self.deliver(callee_conn, Some(f), Track::Remove(call_id));
                } else {
                    let other = if conn == caller_conn { callee_conn } else { caller_conn };
                    self.deliver(other, None, Track::Remove(call_id));
                }
            }
            ShardMsg::Deliver { conn, frame, track } => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    // The connection is gone: if it was becoming a party, the call must not wait
                    // for it.
                    if let Track::Add(call_id, node, _) = track {
                        let me = self.conn_ref(conn);
                        self.route_to(node, owner_shard(call_id), ShardMsg::PartyGone { call_id, conn: me });
                    }
                    return;
                };
                match track {
                    Track::Add(id, node, call_ref) => {
                        c.calls.insert(id, Party { node, call_ref, started: false });
                    }
                    Track::Remove(id) => {
                        c.calls.remove(&id);
                    }
                    Track::None => {}
                }
                if let Some(f) = frame {
                    if let Frame::Start { call_id, .. } = &f {
                        if let Some(p) = c.calls.get_mut(call_id) {
                            p.started = true;
                        }
                    }
                    self.send(conn, f);
                }
            }
            ShardMsg::Registered { conn, public, source, nat } => {
                let Some(c) = self.conns.get_mut(&conn) else { return };
                if let ConnState::Registering(id) = &c.state {
                    c.state = ConnState::Registered(id.clone());
                    c.resolving = None;
                    c.public = Some(public);
                    c.nat = nat;
                    self.send(conn, Frame::Registered { public, source });
                }
            }
            ShardMsg::Kick { conn, code, message } => self.kick(conn, code, message),
            ShardMsg::Generation { id, conn, gen } => {
                if let Some(e) = self.dir.get_mut(&id).filter(|e| e.conn == Some(conn)) {
                    e.gen = gen;
                }
            }
            ShardMsg::Replace { id, gen } => {
                let Some(e) = self.dir.get(&id) else { return };
                // Only the generation that was replaced: a newer registration here (pending
                // or written) is not closed by an older one elsewhere.
                if e.gen != gen || gen == 0 {
                    return;
                }
                let Some(old) = e.conn else { return };
                if let Some(e) = self.dir.get_mut(&id) {
                    // Written over already: nothing to forget in the cluster directory.
                    e.gen = 0;
                }
                self.stats.inc(&self.stats.registrations_replaced);
                self.stats.inc(&self.stats.cluster_replaced);
                self.bury(id.clone(), now);
                let message = format!("id {id} registered on another manager");
                self.route(old.shard, ShardMsg::Kick { conn: old.id, code: ErrorCode::Replaced, message });
            }
            ShardMsg::NodeGone { node } => self.node_gone(node),
        }
    }

    /// `node` is gone: the calls this shard owns with a party there end as if that party's
    /// connection had closed, and this shard's connections forget calls owned there (a
    /// started call's media is direct and goes on; the clients decide by media timeout).
    fn node_gone(&mut self, node: u64) {
        if node == self.node || node == 0 {
            return;
        }
        let mut gone: Vec<(CallId, ConnRef)> = self
            .calls
            .iter()
            .filter_map(|(id, r)| {
                if r.caller_conn.node == node {
                    Some((*id, r.caller_conn))
                } else if r.callee_conn.node == node {
                    Some((*id, r.callee_conn))
                } else {
                    None
                }
            })
            .collect();
        gone.sort_unstable_by_key(|g| g.0 .0);
        for (call_id, conn) in gone {
            self.stats.inc(&self.stats.cluster_calls_node_gone);
            self.handle_msg(self.now.expect("set by the caller"), ShardMsg::PartyGone { call_id, conn });
        }
        // A caller whose call was still ringing there learns at once (REJECT CalleeGone); a
        // started call's media is direct and goes on.
        let mut ringing: Vec<(u64, CallId, u32)> = Vec::new();
        for (&conn, c) in self.conns.iter_mut() {
            c.calls.retain(|&call_id, p| {
                if p.node != node {
                    return true;
                }
                if !p.started && p.call_ref != 0 {
                    ringing.push((conn, call_id, p.call_ref));
                }
                false
            });
        }
        ringing.sort_unstable();
        for (conn, call_id, call_ref) in ringing {
            self.stats.inc(&self.stats.cluster_calls_node_gone);
            let f =
                Frame::Reject { call_ref, call_id, reason: RejectReason::CalleeGone, callee_nat: NatClass::Unknown };
            self.send(conn, f);
        }
    }

    /// Periodic work: registration and idle deadlines, ringing timeouts, expired STUN
    /// bindings and directory tombstones. Call about every 250 ms, with the wall-clock time (seconds since the Unix
    /// epoch) that registration tokens are checked against.
    pub fn handle_tick(&mut self, now: Instant, unix_secs: u64) {
        self.now = Some(now);
        self.unix_secs = unix_secs;
        if self.next_purge.is_none_or(|t| now >= t) {
            self.next_purge = Some(now + PURGE_EVERY);
            self.bindings.purge(now);
        }
        self.expire_tombstones(now);
        let mut kicks = Vec::new();
        for (&id, c) in self.conns.iter().filter(|(_, c)| !c.closing) {
            match c.state {
                ConnState::Open if now.duration_since(c.opened) >= self.cfg.register_timeout => {
                    kicks.push((id, "no REGISTER in time"));
                }
                ConnState::Registering(_) | ConnState::Registered(_)
                    if now.duration_since(c.last_rx) >= self.cfg.idle_timeout =>
                {
                    kicks.push((id, "idle timeout"));
                }
                _ => {}
            }
        }
        // At most MAX_KICKS_PER_TICK closes per tick: thousands of connections that reached
        // their deadline together (an idle-connection attack) are closed over a few ticks
        // instead of stalling this shard's live calls in one burst. Oldest first, in an order
        // that does not depend on the map's.
        kicks.sort_unstable_by_key(|&(id, _)| id);
        for (id, why) in kicks.into_iter().take(MAX_KICKS_PER_TICK) {
            self.stats.inc(&self.stats.connections_timed_out);
            self.kick(id, ErrorCode::Timeout, why.to_string());
        }
        let mut expired: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, r)| matches!(r.state, CallState::Ringing { deadline } if now >= deadline))
            .map(|(id, _)| *id)
            .collect();
        expired.sort_unstable_by_key(|c| c.0);
        for call_id in expired {
            let rec = self.calls.get(&call_id).expect("collected above");
            let (caller_conn, callee_conn, call_ref) = (rec.caller_conn, rec.callee_conn, rec.call_ref);
            self.stats.inc(&self.stats.calls_ring_timeout);
            self.end_call(call_id, CallOutcome::RingTimeout);
            let f = Frame::Reject {
                call_ref,
                call_id,
                reason: RejectReason::Timeout,
                callee_nat: crate::nat::NatClass::Unknown,
            };
            self.deliver(caller_conn, Some(f), Track::Remove(call_id));
            let f = Frame::Hangup { call_id, reason: HangupReason::Timeout };
            self.deliver(callee_conn, Some(f), Track::Remove(call_id));
        }
    }

    /// Shut down: ERROR(Shutdown) and close every connection.
    pub fn shutdown(&mut self) {
        let mut all: Vec<u64> = self.conns.keys().copied().collect();
        all.sort_unstable();
        for id in all {
            self.kick(id, ErrorCode::Shutdown, "manager shutting down".into());
        }
    }

    // ------------------------------------------------------------------ internals

    /// The connection of `id` (whose entry is here) closed: keep the entry as a tombstone,
    /// so callers learn `Offline` rather than `NeverRegistered`, until it is
    /// `tombstone_ttl` old or one of more than this shard's share of `max_tombstones`
    /// (oldest forgotten first). O(1) amortized: no scan of the directory.
    fn bury(&mut self, id: ClientId, now: Instant) {
        let Some(e) = self.dir.get_mut(&id) else { return };
        let death = self.next_death;
        self.next_death += 1;
        e.conn = None;
        e.death = death;

        self.tombstones += 1;
        self.stats.inc(&self.stats.directory_tombstones);
        self.deaths.push_back(Death { id, at: now, death });
        while self.tombstones > self.max_tombstones {
            // Every tombstone has a live record in `deaths`, so this finds one.
            let Some(d) = self.deaths.pop_front() else { break };
            if self.forget(&d) {
                self.stats.inc(&self.stats.tombstones_evicted);
            }
        }
        if self.deaths.len() > 2 * self.tombstones + DEATHS_SLACK {
            let dir = &self.dir;
            self.deaths.retain(|d| dir.get(&d.id).is_some_and(|e| e.conn.is_none() && e.death == d.death));
        }
    }

    /// Remove the tombstone `d` made, if it is still that tombstone. Returns whether it was.
    fn forget(&mut self, d: &Death) -> bool {
        if !self.dir.get(&d.id).is_some_and(|e| e.conn.is_none() && e.death == d.death) {
            return false;
        }
        if let Some(e) = self.dir.remove(&d.id) {
            if self.node != 0 && e.gen != 0 {
                // The cluster directory forgets the entry too, unless it has moved on since.
                self.out.push_back(Output::Cluster(ClusterOut::Forgotten { id: d.id.clone(), gen: e.gen }));
            }
        }
        self.tombstones -= 1;
        self.stats.dec(&self.stats.directory_tombstones);
        self.stats.dec(&self.stats.directory_entries);
        true
    }

    /// Forget tombstones `tombstone_ttl` old, oldest first, looking at no more than
    /// [`MAX_EXPIRIES_PER_TICK`] death records.
    fn expire_tombstones(&mut self, now: Instant) {
        for _ in 0..MAX_EXPIRIES_PER_TICK {
            match self.deaths.front() {
                Some(d) if now.saturating_duration_since(d.at) >= self.cfg.tombstone_ttl => {}
                _ => return,
            }
            let d = self.deaths.pop_front().expect("looked at above");
            if self.forget(&d) {
                self.stats.inc(&self.stats.tombstones_expired);
            }
        }
    }

    fn on_call_req(&mut self, now: Instant, req: Box<CallReq>) {
        if self.node != 0 {
            // In a cluster: a callee that is not live here may be live on another node.
            let live = self.dir.get(&req.callee).filter(|e| e.conn.is_some());
            match live {
                // A CALL from another node, for a generation this node no longer holds (an
                // entry still being written here is taken: it is the newest).
                Some(e) if req.gen != 0 && e.gen != 0 && e.gen != req.gen => {
                    self.stats.inc(&self.stats.cluster_not_here);
                    self.out.push_back(Output::Cluster(ClusterOut::NotHere { req }));
                    return;
                }
                Some(_) => {}
                // The tombstone of that very generation: the callee is offline, and this node
                // says so at once.
                None if req.gen != 0 && self.dir.get(&req.callee).is_some_and(|e| e.gen == req.gen) => {
                    self.stats.inc(&self.stats.calls_unknown);
                    let f = Frame::Unknown { call_ref: req.call_ref, reason: UnknownReason::Offline };
                    self.deliver(req.caller_conn, Some(f), Track::None);
                    return;
                }
                None if req.gen != 0 => {
                    self.stats.inc(&self.stats.cluster_not_here);
                    self.out.push_back(Output::Cluster(ClusterOut::NotHere { req }));
                    return;
                }
                None => {
                    let reason = match self.dir.get(&req.callee) {
                        Some(_) => UnknownReason::Offline,
                        None => UnknownReason::NeverRegistered,
                    };
                    self.out.push_back(Output::Cluster(ClusterOut::Lookup { req, reason }));
                    return;
                }
            }
        }
        let CallReq {
            caller,
            caller_conn,
            caller_addr,
            caller_nat,
            caller_hosts,
            call_ref,
            callee,
            caller_keys,
            gen: _,
            attempt: _,
        } = *req;
        // Behind one public IP, with IPv4 host addresses on both sides, the two reach each
        // other on their LAN whatever their NAT does (no hairpin through the router needed).
        // With IPv6 addresses on both sides they reach each other over IPv6 (no NAT there,
        // only stateful firewalls, which the punch opens).
        let has = |h: &[Candidate], v6: bool| h.iter().any(|k| k.addr.is_ipv6() == v6);
        let lan = |e: &Entry| e.public.ip() == caller_addr.ip() && has(&e.hosts, false) && has(&caller_hosts, false);
        let six = |e: &Entry| has(&e.hosts, true) && has(&caller_hosts, true);
        let strategy = |e: &Entry| if lan(e) || six(e) { Strategy::Direct } else { nat::strategy(caller_nat, e.nat) };
        let refusal = match self.dir.get(&callee) {
            None => Some(Frame::Unknown { call_ref, reason: UnknownReason::NeverRegistered }),
            Some(e) if e.conn.is_none() => Some(Frame::Unknown { call_ref, reason: UnknownReason::Offline }),
            Some(e) if e.active_calls >= e.max_calls as u32 => Some(Frame::Busy { call_ref }),
            Some(e) if strategy(e) == Strategy::NoPath => {
                Some(Frame::Reject { call_ref, call_id: CallId(0), reason: RejectReason::NoPath, callee_nat: e.nat })
            }
            Some(_) => None,
        };
        if let Some(f) = refusal {
            match f {
                Frame::Busy { .. } => self.stats.inc(&self.stats.calls_busy),
                Frame::Reject { .. } => {
                    self.stats.inc(&self.stats.calls_rejected);
                    self.stats.inc(&self.stats.calls_no_path);
                    self.stats.by_strategy.record(Strategy::NoPath, CallOutcome::Refused);
                }
                _ => self.stats.inc(&self.stats.calls_unknown),
            }
            self.deliver(caller_conn, Some(f), Track::None);
            return;
        }
        let e = self.dir.get(&callee).expect("checked above");
        let (strategy, same_nat, ipv6) = (strategy(e), lan(e), six(e));
        let e = self.dir.get_mut(&callee).expect("checked above");
        self.stats.inc(match strategy {
            Strategy::Birthday => &self.stats.calls_birthday,
            Strategy::Predict => &self.stats.calls_predict,
            _ => &self.stats.calls_direct,
        });
        e.active_calls += 1;
        let callee_conn = e.conn.expect("checked above");
        let (callee_addr, callee_source, callee_nat) = (e.public, e.source, e.nat);
        // Each gets the other's IPv4 host addresses only behind one public IP, its IPv6 ones
        // only when both have some (and both get them, so that both clients compute the same
        // strategy: `docs/protocol.md` 5.6).
        let pass = |h: &[Candidate]| -> Vec<Candidate> {
            h.iter().filter(|k| if k.addr.is_ipv6() { ipv6 } else { same_nat }).copied().collect()
        };
        let (callee_hosts, caller_hosts) = (pass(&e.hosts), pass(&caller_hosts));
        if same_nat {
            self.stats.inc(&self.stats.calls_same_nat);
        }
        if ipv6 {
            self.stats.inc(&self.stats.calls_ipv6);
        }
        let call_id = CallId(((self.index as u64) << 48) | (self.next_call & 0xFFFF_FFFF_FFFF));
        self.next_call += 1;
        let token = call_token(&self.token_key, call_id);
        self.calls.insert(
            call_id,
            CallRec {
                caller_conn,
                call_ref,
                callee: callee.clone(),
                callee_conn,
                callee_addr,
                callee_source,
                callee_nat,
                callee_hosts,
                strategy,
                token,
                state: CallState::Ringing { deadline: now + self.cfg.ring_timeout },
                requested: now,
            },
        );
        self.deliver(caller_conn, None, Track::Add(call_id, self.node, call_ref));
        let f = Frame::Incoming {
            call_id,
            token,
            caller,
            caller_addr,
            caller_nat,
            caller_candidates: caller_hosts,
            caller_keys,
        };
        self.deliver(callee_conn, Some(f), Track::Add(call_id, self.node, 0));
    }

    fn on_punched(&mut self, call_id: CallId, conn: ConnRef, udp_port: u16, keys: Option<Box<KeyShare>>) {
        let Some(rec) = self.calls.get_mut(&call_id) else {
            let f = Frame::Error { code: ErrorCode::UnknownCall, message: format!("no call {call_id}") };
            self.deliver(conn, Some(f), Track::None);
            return;
        };
        if conn != rec.callee_conn {
            self.deliver(conn, Some(not_party(call_id)), Track::None);
            return;
        }
        if rec.state == CallState::Started {
            self.stats.inc(&self.stats.frames_duplicate);
            return;
        }
        rec.state = CallState::Started;
        let mut callee_addr = rec.callee_addr;
        if rec.callee_source == AddrSource::TcpPeer {
            callee_addr.set_port(udp_port);
        }
        let f = Frame::Start {
            call_ref: rec.call_ref,
            call_id,
            token: rec.token,
            callee_addr,
            callee_nat: rec.callee_nat,
            callee_candidates: std::mem::take(&mut rec.callee_hosts),
            callee_keys: keys,
        };
        let caller_conn = rec.caller_conn;
        self.stats.inc(&self.stats.calls_started);
        if let Some(now) = self.now {
            self.stats.setup_time.record(now.saturating_duration_since(rec.requested));
        }
        self.deliver(caller_conn, Some(f), Track::None);
    }

    fn end_call(&mut self, call_id: CallId, outcome: CallOutcome) {
        if let Some(rec) = self.calls.remove(&call_id) {
            self.stats.inc(&self.stats.calls_ended);
            self.stats.by_strategy.record(rec.strategy, outcome);
            if let Some(e) = self.dir.get_mut(&rec.callee) {
                e.active_calls = e.active_calls.saturating_sub(1);
            }
        }
    }

    /// This shard's reference for its connection `conn`.
    fn conn_ref(&self, conn: u64) -> ConnRef {
        ConnRef { node: self.node, shard: self.index, id: conn }
    }

    /// Send `msg` to shard `to` of `node`: this node's shards directly, another's through
    /// the cluster bridge.
    fn route_to(&mut self, node: u64, to: u16, msg: ShardMsg) {
        if node == self.node {
            self.route(to, msg);
        } else {
            self.out.push_back(Output::Cluster(ClusterOut::Send { node, shard: to, msg }));
        }
    }

    fn route(&mut self, to: u16, msg: ShardMsg) {
        if to >= self.n {
            // Only a message from another node can name a shard this node does not have
            // (every local route is to a shard index of this manager): dropped and counted.
            self.stats.inc(&self.stats.cluster_malformed);
            return;
        }
        if to == self.index {
            // Local: handle at once (no queue hop), at the time of the input being handled.
            let now = self.now.expect("route is only called while handling an input");
            self.handle_msg(now, msg);
        } else {
            self.out.push_back(Output::Shard { to, msg });
        }
    }

    fn deliver(&mut self, conn: ConnRef, frame: Option<Frame>, track: Track) {
        self.route_to(conn.node, conn.shard, ShardMsg::Deliver { conn: conn.id, frame, track });
    }

    fn send(&mut self, conn: u64, frame: Frame) {
        self.stats.inc(&self.stats.frames_out);
        self.out.push_back(Output::Frame { conn, frame });
    }

    fn kick(&mut self, conn: u64, code: ErrorCode, message: String) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.closing {
            return;
        }
        // Frames after this are ignored; conn_closed (once the IO closed it) cleans up.
        c.closing = true;
        self.send(conn, Frame::Error { code, message });
        self.out.push_back(Output::Close { conn });
    }

    fn not_registered(&mut self, conn: u64, what: &str) {
        self.stats.inc(&self.stats.frames_unexpected);
        if self.too_many_errors(conn) {
            return;
        }
        let f = Frame::Error { code: ErrorCode::NotRegistered, message: format!("{what} before REGISTERED") };
        self.send(conn, f);
    }

    fn unexpected(&mut self, conn: u64, what: &str) {
        self.stats.inc(&self.stats.frames_unexpected);
        if self.too_many_errors(conn) {
            return;
        }
        self.send(conn, Frame::Error { code: ErrorCode::Unexpected, message: what.to_string() });
    }

    /// Count a refused frame on `conn`; past [`MAX_CONN_ERRORS`] the connection is closed
    /// (ERROR `RateLimited`) rather than answered again and again.
    fn too_many_errors(&mut self, conn: u64) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else { return true };
        c.errors += 1;
        if c.errors > MAX_CONN_ERRORS {
            self.stats.inc(&self.stats.connections_flooding);
            self.kick(conn, ErrorCode::RateLimited, format!("more than {MAX_CONN_ERRORS} refused frames"));
            return true;
        }
        false
    }
}

/// A call's token: the first 64 bits of HMAC-SHA256(key, context || call id). Unpredictable
/// to whoever lacks the key, distinct per call id, and reproducible for a given key.
pub fn call_token(key: &[u8; 32], call_id: CallId) -> u64 {
    use hmac::{Hmac, Mac};
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(b"nullpunch call token v1");
    m.update(&call_id.0.to_be_bytes());
    let out = m.finalize().into_bytes();
    u64::from_be_bytes(out[..8].try_into().expect("32 bytes of output"))
}

fn not_party(call_id: CallId) -> Frame {
    Frame::Error { code: ErrorCode::NotParty, message: format!("not a party to call {call_id}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_tokens_depend_on_the_key_and_the_call_and_nothing_else() {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let (c1, c2) = (CallId(1 << 48 | 5), CallId(1 << 48 | 6));
        assert_eq!(call_token(&k1, c1), call_token(&k1, c1), "reproducible");
        assert_ne!(call_token(&k1, c1), call_token(&k2, c1), "another manager, another token");
        assert_ne!(call_token(&k1, c1), call_token(&k1, c2), "another call, another token");
        // Neighbouring calls' tokens are unrelated: about half their bits differ.
        let differ = (call_token(&k1, c1) ^ call_token(&k1, c2)).count_ones();
        assert!((16..=48).contains(&differ), "{differ} bits differ");
    }
}
