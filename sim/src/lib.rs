//! # nullpunch sim
//!
//! Deterministic simulation for tests: real [`Client`] state machines and real manager
//! [`Shard`]s, with the manager's real STUN responder ([`proto::shard::stun::respond`]),
//! wired by a simulated network in virtual time. No sockets, threads or sleeps; each step
//! jumps to the earliest pending event or timer, and every run is bounded in steps and in
//! virtual time. In the spirit of quinn-proto's `Pair`: the protocol crates test against it,
//! and so can every feature that changes the client, the shard or the wire.
//!
//! The network ([`Net`]): signalling frames are delivered in order after a fixed delay (TCP),
//! unless a test's filter drops, duplicates or holds them back ([`Sim::to_client_filter`]). Datagrams
//! take a delay plus seeded jitter, may be held back (reordered) or lost at seeded rates, and
//! may be dropped by a test's filter ([`Sim::datagram_filter`]). Every client sits behind a
//! stateful firewall modelled on Linux conntrack: an inbound datagram passes only if the
//! client sent to that remote address within the flow timeout (30 s, refreshed by traffic
//! either way); everything else is dropped and counted.
//!
//! What the clients do is a [`Plan`]: listen (answer, send media back once the caller's
//! arrives), or call someone at a time and talk for a while. Every delivery is written to a
//! trace ([`Sim::trace`]) with its virtual time, so two runs can be compared whole.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::client::{CallHandle, CallReport, Client, ClientConfig, Event, Output as ClientOutput, SocketId};
use proto::media::{MediaSource, SyntheticSource};
use proto::rng::Rng;
use proto::shard::bindings::binding_shard;
use proto::shard::stats::Stats;
use proto::shard::stun::{respond, StunReply};
use proto::shard::stun_limit::StunLimiter;
use proto::shard::{Output, Shard, ShardConfig, ShardInit, ShardMsg};
use proto::wire::frame::{ClientId, Frame};
use proto::wire::stun;

/// The manager's UDP address in the simulation.
pub const MANAGER_UDP: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 1)), 7480);

/// The manager's alternate STUN port in the simulation (named in the main port's answers).
pub const MANAGER_UDP_ALT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 1)), 7481);

/// The wall-clock time (seconds since the Unix epoch) at virtual time zero.
pub const UNIX_START: u64 = 1_800_000_000;

/// The shards' tick period, as the manager's.
pub const TICK: Duration = Duration::from_millis(250);

/// Steps one [`Sim::run_until`] may take before it declares a livelock.
pub const MAX_STEPS: usize = 5_000_000;

#[derive(Debug)]
enum Ev {
    ToManager { client: usize, frame: Frame },
    ToClient { client: usize, frame: Frame },
    ToMute { conn: (u16, u64), frame: Frame },
    Datagram { from: SocketAddr, to: SocketAddr, data: Vec<u8> },
    Shard { to: u16, msg: ShardMsg },
    Closed { client: usize },
}

/// What a simulated client does.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Answer calls; send media back once the caller's media arrives.
    Listen,
    /// Call `callee` at `at` (from the start), stream for `talk`, then hang up.
    Call {
        /// The callee's id.
        callee: String,
        /// When to place the call, from the start of the run.
        at: Duration,
        /// How long to stream before hanging up.
        talk: Duration,
    },
}

impl Plan {
    /// Call `callee` at `at_ms` and talk for `talk_ms`.
    pub fn call(callee: &str, at_ms: u64, talk_ms: u64) -> Plan {
        Plan::Call { callee: callee.into(), at: Duration::from_millis(at_ms), talk: Duration::from_millis(talk_ms) }
    }
}

/// The NAT in front of a simulated client (its firewall filters either way: a datagram from
/// outside passes only from an address the client sent to, to the mapping it used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimNat {
    /// No NAT: the client's address is public.
    None,
    /// One public address for every destination (the local port kept).
    EndpointIndependent,
    /// A new public port per destination, each this step after the last.
    Sequential(i16),
    /// A new public port per destination, drawn at random (seeded).
    Random,
}

/// One simulated client: the real state machine, its address, and its firewall.
pub struct SimClient {
    /// The client state machine.
    pub client: Client,
    /// Its UDP address (local; also public when [`SimClient::nat`] is [`SimNat::None`]).
    pub udp: SocketAddr,
    /// The NAT in front of it.
    pub nat: SimNat,
    /// The NAT's public IP (the client's own IP without NAT).
    pub public_ip: std::net::IpAddr,
    /// The NAT's mappings: (local socket, remote address) -> public address used towards it.
    pub mappings: HashMap<(SocketAddr, SocketAddr), SocketAddr>,
    /// The client's open sockets (the main one, and a birthday search's) -> local address.
    pub sockets: HashMap<SocketId, SocketAddr>,
    /// Sockets the client opened over the run (search sockets).
    pub sockets_opened: u64,
    next_port: u16,
    next_local_port: u16,
    conn: Option<(u16, u64)>,
    plan: Plan,
    placed: bool,
    streams: HashMap<CallHandle, (SyntheticSource, Instant, Option<Instant>)>,
    /// Media is not sent while the virtual time (from the start) is inside this window.
    pub pause: Option<(Duration, Duration)>,
    reports: Vec<CallReport>,
    /// conntrack-like flow table: (local socket, remote address) -> last activity. Each
    /// entry is what a router's conntrack table would hold for the client.
    pub flows: HashMap<(SocketAddr, SocketAddr), Instant>,
    /// Inbound datagrams its firewall dropped.
    pub firewall_drops: u64,
    /// Every event the client emitted, in order.
    pub events: Vec<Event>,
}

/// Knobs of the simulated network.
#[derive(Debug, Clone)]
pub struct Net {
    /// One-way delay of a signalling frame (client to manager or back).
    pub frame_delay: Duration,
    /// One-way delay of a datagram.
    pub udp_delay: Duration,
    /// Extra delay of a datagram, uniform in `0..udp_jitter` (seeded).
    pub udp_jitter: Duration,
    /// Share of datagrams lost on the way (seeded), after the sender's firewall.
    pub udp_loss: f64,
    /// Share of datagrams held back by one more `udp_delay` (seeded), so that later ones
    /// overtake them.
    pub udp_reorder: f64,
    /// How long a firewall keeps a flow open without traffic.
    pub flow_timeout: Duration,
    /// Whether clients sit behind stateful firewalls at all.
    pub firewalls: bool,
}

impl Default for Net {
    fn default() -> Self {
        Net {
            frame_delay: Duration::from_millis(5),
            udp_delay: Duration::from_millis(10),
            udp_jitter: Duration::ZERO,
            udp_loss: 0.0,
            udp_reorder: 0.0,
            flow_timeout: Duration::from_secs(30),
            firewalls: true,
        }
    }
}

/// What becomes of a frame the manager sends to a client ([`Sim::to_client_filter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Delivered after [`Net::frame_delay`].
    Deliver,
    /// Lost.
    Drop,
    /// Delivered twice.
    Duplicate,
    /// Delivered this much later than it would have been (frames sent after it overtake it).
    Delay(Duration),
}

/// Decides the fate of each frame sent to a client.
pub type FrameFilter = Box<dyn FnMut(&Frame) -> Fate>;
/// Return false to drop a datagram (from, to, bytes) before it leaves the sender's network.
pub type DatagramFilter = Box<dyn FnMut(SocketAddr, SocketAddr, &[u8]) -> bool>;
/// Sees each frame a client's connection delivers to the manager (client index, frame);
/// true closes that connection right after the shard has handled the frame.
pub type CloseAfter = Box<dyn FnMut(usize, &Frame) -> bool>;

/// A manager of several shards, its STUN responder, and clients, on one virtual clock.
pub struct Sim {
    /// Virtual time zero.
    pub start: Instant,
    /// Virtual now.
    pub now: Instant,
    rng: Rng,
    net: Net,
    shards: Vec<Shard>,
    /// The manager's counters.
    pub stats: Arc<Stats>,
    stun_limiter: StunLimiter,
    /// The clients, by the index [`Sim::add`] returned.
    pub clients: Vec<SimClient>,
    /// Local socket addresses -> (client, socket).
    by_udp: HashMap<SocketAddr, (usize, SocketId)>,
    /// NAT mappings (public addresses) -> (client, local socket address).
    by_public: HashMap<SocketAddr, (usize, SocketAddr)>,
    by_conn: HashMap<(u16, u64), usize>,
    /// Connections with no client behind them ([`Sim::connect_mute`]).
    mutes: Vec<(u16, u64)>,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    events: HashMap<usize, Ev>,
    seq: u64,
    next_tick: Instant,
    /// The fate of each frame sent to a client (none: every frame is delivered).
    pub to_client_filter: Option<FrameFilter>,
    /// Return false to drop a datagram (from, to, bytes).
    pub datagram_filter: Option<DatagramFilter>,
    /// Close a client's connection right after a frame reached the manager (the client goes
    /// away mid-exchange): the shard is told at once, the client 5 ms later.
    pub close_after: Option<CloseAfter>,
    /// Datagrams lost to [`Net::udp_loss`].
    pub udp_dropped_by_loss: u64,
    /// Datagrams on the manager's UDP port that were not STUN (media would show here).
    pub manager_udp_non_stun: u64,
    /// Every delivery in order: virtual time and the whole event (frame, datagram bytes,
    /// shard message), so two runs can be compared as traces, not as a few aggregates.
    pub trace: Vec<String>,
    /// Every frame that reached a client, with its virtual time (from the start).
    pub to_clients: Vec<(Duration, usize, Frame)>,
    /// Every frame that reached a mute connection ([`Sim::connect_mute`]), with its virtual
    /// time; and when the manager closed it (`None` as the frame).
    pub to_mutes: Vec<(Duration, usize, Option<Frame>)>,
}

impl Sim {
    /// A manager of `shards` shards on network `net`; `seed` decides everything random (the
    /// shards' call ids and tokens, the clients' seeds, loss, jitter and reordering).
    pub fn new(seed: u64, shards: u16, net: Net) -> Sim {
        Sim::with_config(seed, shards, net, ShardConfig::default())
    }

    /// As [`Sim::new`], with the shards' configuration.
    pub fn with_config(seed: u64, shards: u16, net: Net, cfg: ShardConfig) -> Sim {
        let start = Instant::now();
        let stats = Arc::new(Stats::default());
        let rng = Rng::new(seed);
        let mut key_rng = Rng::new(seed ^ 0x746f_6b65_6e5f_6b65);
        let mut token_key = [0u8; 32];
        for c in token_key.chunks_exact_mut(8) {
            c.copy_from_slice(&key_rng.next_u64().to_le_bytes());
        }
        let shards = (0..shards)
            .map(|index| {
                let init = ShardInit { index, n: shards, seed, token_key, unix_secs: UNIX_START, node: 0 };
                Shard::new(init, cfg.clone(), stats.clone())
            })
            .collect();
        Sim {
            start,
            now: start,
            rng,
            net,
            shards,
            stats,
            stun_limiter: StunLimiter::new(0.0, 0.0),
            clients: Vec::new(),
            by_udp: HashMap::new(),
            by_public: HashMap::new(),
            by_conn: HashMap::new(),
            mutes: Vec::new(),
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            next_tick: start,
            to_client_filter: None,
            datagram_filter: None,
            close_after: None,
            udp_dropped_by_loss: 0,
            manager_udp_non_stun: 0,
            trace: Vec::new(),
            to_clients: Vec::new(),
            to_mutes: Vec::new(),
        }
    }

    /// Open a connection to shard `shard` that sends nothing (no client behind it, as an
    /// attacker's or a hung program's); what the manager sends it and when it closes it are
    /// logged in [`Sim::to_mutes`]. Returns its index there.
    pub fn connect_mute(&mut self, shard: u16) -> usize {
        let k = self.mutes.len();
        let peer = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)), 30000 + k as u16);
        let open: usize = self.shards.iter().map(|s| s.open_connections()).sum();
        let conn = self.shards[shard as usize].conn_opened(self.now, peer, open);
        self.mutes.push((shard, conn));
        self.pump_shard(shard);
        k
    }

    /// When the frames that match `pred` reached client `i`, from the start.
    pub fn frame_times(&self, i: usize, pred: impl Fn(&Frame) -> bool) -> Vec<Duration> {
        self.to_clients.iter().filter(|(_, c, f)| *c == i && pred(f)).map(|(t, _, _)| *t).collect()
    }

    /// Add a client `id` that follows `plan`, after `tweak` has adjusted its configuration;
    /// it connects to a shard at once. Returns its index.
    pub fn add(&mut self, id: &str, plan: Plan, tweak: impl FnOnce(&mut ClientConfig)) -> usize {
        self.add_behind(id, SimNat::None, plan, tweak)
    }

    /// As [`Sim::add`], behind a NAT of kind `nat` with a public IP of its own
    /// (198.18.x.y; the client's local address is then 10.x.y.2).
    pub fn add_behind(&mut self, id: &str, nat: SimNat, plan: Plan, tweak: impl FnOnce(&mut ClientConfig)) -> usize {
        let i = self.clients.len();
        let (udp, public_ip): (SocketAddr, std::net::IpAddr) = if nat == SimNat::None {
            let udp: SocketAddr = format!("203.0.113.{}:{}", 1 + i / 200, 40000 + i % 200).parse().unwrap();
            (udp, udp.ip())
        } else {
            let (hi, lo) = (i / 256, i % 256);
            (format!("10.{hi}.{lo}.2:40000").parse().unwrap(), format!("198.18.{hi}.{lo}").parse().unwrap())
        };
        let mut cfg = ClientConfig::new(ClientId::new(id).expect("a valid client id"), udp.port());
        cfg.stun_server = Some(MANAGER_UDP);
        cfg.max_calls = 4;
        tweak(&mut cfg);
        let seed = self.rng.next_u64();
        self.clients.push(SimClient {
            client: Client::new(cfg, seed),
            udp,
            nat,
            public_ip,
            mappings: HashMap::new(),
            sockets: HashMap::from([(SocketId::MAIN, udp)]),
            sockets_opened: 0,
            next_port: 20000,
            next_local_port: 50000,
            conn: None,
            plan,
            placed: false,
            streams: HashMap::new(),
            pause: None,
            reports: Vec::new(),
            flows: HashMap::new(),
            firewall_drops: 0,
            events: Vec::new(),
        });
        self.by_udp.insert(udp, (i, SocketId::MAIN));
        // Connect: the TCP peer address is the client's public IP with an ephemeral port.
        let shard = (i % self.shards.len()) as u16;
        let peer = SocketAddr::new(public_ip, 50000 + i as u16);
        let open: usize = self.shards.iter().map(|s| s.open_connections()).sum();
        let conn = self.shards[shard as usize].conn_opened(self.now, peer, open);
        self.clients[i].conn = Some((shard, conn));
        self.by_conn.insert((shard, conn), i);
        self.clients[i].client.handle_connected(self.now, None);
        self.pump_shard(shard);
        i
    }

    /// The call reports client `i` has received so far.
    pub fn reports(&self, i: usize) -> &[CallReport] {
        &self.clients[i].reports
    }

    /// Calls the shards still hold.
    pub fn owned_calls(&self) -> usize {
        self.shards.iter().map(|s| s.owned_calls()).sum()
    }

    /// STUN bindings the shards still hold.
    pub fn bindings(&self) -> usize {
        self.shards.iter().map(|s| s.bindings()).sum()
    }

    /// The wall-clock time at virtual now.
    pub fn unix_now(&self) -> u64 {
        UNIX_START + self.now.duration_since(self.start).as_secs()
    }

    /// The public source of client `i`'s datagram from local socket `local` to `to` (made on
    /// first use).
    fn map_outbound(&mut self, i: usize, local: SocketAddr, to: SocketAddr) -> SocketAddr {
        let c = &mut self.clients[i];
        if c.nat == SimNat::None {
            return local;
        }
        if let Some(&m) = c.mappings.get(&(local, to)) {
            return m;
        }
        let port = match c.nat {
            SimNat::None => unreachable!("handled above"),
            SimNat::EndpointIndependent => local.port(),
            SimNat::Sequential(step) => {
                c.next_port = c.next_port.wrapping_add_signed(step);
                c.next_port
            }
            SimNat::Random => loop {
                let p = 1024 + self.rng.below(64_512) as u16;
                if !c.mappings.values().any(|m| m.port() == p) {
                    break p;
                }
            },
        };
        let m = SocketAddr::new(c.public_ip, port);
        c.mappings.insert((local, to), m);
        self.by_public.insert(m, (i, local));
        m
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        let key = self.seq as usize;
        self.events.insert(key, ev);
        self.queue.push(Reverse((at, self.seq, key)));
    }

    fn pump_shard(&mut self, s: u16) {
        while let Some(o) = self.shards[s as usize].poll_output() {
            match o {
                Output::Frame { conn, frame } => {
                    if self.mutes.contains(&(s, conn)) {
                        let at = self.now + self.net.frame_delay;
                        self.schedule(at, Ev::ToMute { conn: (s, conn), frame });
                    } else if let Some(&c) = self.by_conn.get(&(s, conn)) {
                        let fate = match self.to_client_filter.as_mut() {
                            Some(f) => f(&frame),
                            None => Fate::Deliver,
                        };
                        let at = self.now + self.net.frame_delay;
                        let (copies, at) = match fate {
                            Fate::Deliver => (1, at),
                            Fate::Drop => (0, at),
                            Fate::Duplicate => (2, at),
                            Fate::Delay(d) => (1, at + d),
                        };
                        for _ in 0..copies {
                            self.schedule(at, Ev::ToClient { client: c, frame: frame.clone() });
                        }
                    }
                }
                Output::Close { conn } => {
                    if let Some(k) = self.mutes.iter().position(|m| *m == (s, conn)) {
                        let at = self.now.duration_since(self.start) + self.net.frame_delay;
                        self.to_mutes.push((at, k, None));
                        self.shards[s as usize].conn_closed(self.now, conn);
                    } else if let Some(c) = self.by_conn.remove(&(s, conn)) {
                        self.clients[c].conn = None;
                        self.schedule(self.now + self.net.frame_delay, Ev::Closed { client: c });
                        self.shards[s as usize].conn_closed(self.now, conn);
                    }
                }
                Output::Shard { to, msg } => self.schedule(self.now, Ev::Shard { to, msg }),
                Output::Cluster(o) => unreachable!("a shard without a node id has no cluster output: {o:?}"),
            }
        }
    }

    fn send_datagram(&mut self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        // The filter drops inside the sender's network, before its firewall sees the packet.
        if let Some(f) = self.datagram_filter.as_mut() {
            if !f(from, to, data) {
                return;
            }
        }
        let mut from = from;
        if let Some(&(i, _)) = self.by_udp.get(&from) {
            // Outbound opens or refreshes the flow in the sender's firewall, and its NAT maps
            // the source.
            self.clients[i].flows.insert((from, to), self.now);
            from = self.map_outbound(i, from, to);
        }
        // Random loss happens on the way, after the sender's firewall.
        if self.net.udp_loss > 0.0 && self.rng.chance(self.net.udp_loss) {
            self.udp_dropped_by_loss += 1;
            return;
        }
        let mut delay = self.net.udp_delay;
        if !self.net.udp_jitter.is_zero() {
            delay += Duration::from_micros(self.rng.below(self.net.udp_jitter.as_micros() as u64));
        }
        if self.net.udp_reorder > 0.0 && self.rng.chance(self.net.udp_reorder) {
            delay += self.net.udp_delay;
        }
        self.schedule(self.now + delay, Ev::Datagram { from, to, data: data.to_vec() });
    }

    /// Drain one client's output and run its application logic.
    fn pump_client(&mut self, i: usize) {
        let mut buf = [0u8; 1500];
        loop {
            match self.clients[i].client.poll_output(&mut buf).expect("1500 bytes hold any control datagram") {
                ClientOutput::Frame(f) => {
                    if self.clients[i].conn.is_some() {
                        self.schedule(self.now + self.net.frame_delay, Ev::ToManager { client: i, frame: f });
                    }
                }
                ClientOutput::Transmit(t) => {
                    // A datagram from a socket already closed is a bug in the client.
                    let from = self.clients[i].sockets[&t.from];
                    self.send_datagram(from, t.to, &buf[..t.len]);
                }
                ClientOutput::OpenSocket(id) => {
                    let c = &mut self.clients[i];
                    let local = SocketAddr::new(c.udp.ip(), c.next_local_port);
                    c.next_local_port = c.next_local_port.checked_add(1).expect("sim: local ports run out");
                    c.sockets_opened += 1;
                    assert!(c.sockets.insert(id, local).is_none(), "socket {id:?} opened twice");
                    self.by_udp.insert(local, (i, id));
                }
                ClientOutput::CloseSocket(id) => {
                    let local = self.clients[i].sockets.remove(&id).expect("a socket closed that was open");
                    self.by_udp.remove(&local);
                }
                ClientOutput::Event(ev) => self.on_event(i, ev),
                ClientOutput::Timeout(_) => break,
            }
        }
    }

    fn on_event(&mut self, i: usize, ev: Event) {
        let now = self.now;
        let c = &mut self.clients[i];
        c.events.push(ev.clone());
        match ev {
            Event::Started { handle, .. } => {
                let Plan::Call { talk, .. } = c.plan else { return };
                c.streams.insert(handle, (SyntheticSource::opus_like(), now, Some(now + talk)));
            }
            Event::MediaFlowing { handle } if c.client.can_send(handle) => {
                c.streams.entry(handle).or_insert((SyntheticSource::opus_like(), now, None));
            }
            Event::Ended(r) => {
                c.streams.remove(&r.handle);
                c.reports.push(*r);
            }
            _ => {}
        }
    }

    fn app_wakeup(&self, i: usize) -> Option<Instant> {
        let c = &self.clients[i];
        // A call is placed once it is due and the client is registered (the REGISTERED that
        // makes it so is an event of its own, after which the app runs again).
        let place = match &c.plan {
            Plan::Call { at, .. } if !c.placed && c.client.is_registered() => Some(self.start + *at),
            _ => None,
        };
        let streams = c.streams.values().map(|(_, next, end)| end.map_or(*next, |e| e.min(*next)));
        streams.chain(place).min()
    }

    fn run_app(&mut self, i: usize) {
        let now = self.now;
        let start = self.start;
        if let Plan::Call { callee, at, .. } = self.clients[i].plan.clone() {
            if !self.clients[i].placed && now >= start + at && self.clients[i].client.is_registered() {
                self.clients[i].placed = true;
                self.clients[i].client.call(now, ClientId::new(callee).expect("a valid callee id")).expect("a call");
            }
        }
        let mut buf = [0u8; 1500];
        let mut payload = [0u8; 256];
        let mut out = Vec::new();
        let mut hang = Vec::new();
        {
            let c = &mut self.clients[i];
            let paused = c.pause.is_some_and(|(a, b)| now >= start + a && now < start + b);
            // In handle order, not the map's, so that runs are reproducible.
            let mut handles: Vec<CallHandle> = c.streams.keys().copied().collect();
            handles.sort_unstable();
            for h in handles {
                let (src, next, end) = c.streams.get_mut(&h).expect("listed above");
                if end.is_some_and(|e| now >= e) {
                    hang.push(h);
                    continue;
                }
                while *next <= now {
                    if !paused {
                        let (len, dur) = src.next_frame(&mut payload);
                        if let Ok(t) = c.client.send_media(now, h, &payload[..len], dur, &mut buf) {
                            out.push((c.sockets[&t.from], t.to, buf[..t.len].to_vec()));
                        }
                    }
                    *next += Duration::from_millis(src.frame_ms() as u64);
                }
            }
            for h in hang {
                c.client.hangup(now, h).expect("a hangup of a live call");
            }
        }
        for (from, to, data) in out {
            self.send_datagram(from, to, &data);
        }
    }

    /// The manager's UDP ports: the real responder decides; on the main port the binding
    /// goes to its shard before the answer leaves, as in the manager.
    fn manager_udp(&mut self, at: SocketAddr, from: SocketAddr, data: &[u8]) {
        let mut out = [0u8; stun::MAX_RESPONSE_LEN];
        let main = at == MANAGER_UDP;
        let other = main.then_some(MANAGER_UDP_ALT);
        match respond(&mut self.stun_limiter, self.now, from, data, other, &mut out) {
            StunReply::Answer { len, txid } => {
                if main {
                    let to = binding_shard(&txid, self.shards.len() as u16);
                    self.schedule(self.now, Ev::Shard { to, msg: ShardMsg::Binding { txid, from } });
                } else {
                    self.stats.inc(&self.stats.stun_alt_requests);
                }
                self.stats.inc(&self.stats.stun_requests);
                self.send_datagram(at, from, &out[..len]);
            }
            StunReply::Dropped(why) => {
                why.count(&self.stats);
                if matches!(why, proto::shard::stun::StunDrop::Media | proto::shard::stun::StunDrop::NotStun) {
                    self.manager_udp_non_stun += 1;
                }
            }
        }
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::ToManager { client, frame } => {
                if let Some((s, conn)) = self.clients[client].conn {
                    let close = self.close_after.as_mut().is_some_and(|f| f(client, &frame));
                    self.shards[s as usize].conn_frame(now, conn, frame);
                    self.pump_shard(s);
                    if close {
                        self.by_conn.remove(&(s, conn));
                        self.clients[client].conn = None;
                        self.shards[s as usize].conn_closed(now, conn);
                        self.pump_shard(s);
                        self.schedule(now + self.net.frame_delay, Ev::Closed { client });
                    }
                }
            }
            Ev::ToMute { conn, frame } => {
                let k = self.mutes.iter().position(|m| *m == conn).expect("mutes are never removed");
                self.to_mutes.push((now.duration_since(self.start), k, Some(frame)));
            }
            Ev::ToClient { client, frame } => {
                self.to_clients.push((now.duration_since(self.start), client, frame.clone()));
                self.clients[client].client.handle_frame(now, frame);
                self.pump_client(client);
            }
            Ev::Closed { client } => {
                self.clients[client].client.handle_disconnected(now);
                self.pump_client(client);
            }
            Ev::Shard { to, msg } => {
                self.shards[to as usize].handle_msg(now, msg);
                self.pump_shard(to);
            }
            Ev::Datagram { from, to, mut data } => {
                if to == MANAGER_UDP || to == MANAGER_UDP_ALT {
                    return self.manager_udp(to, from, &data);
                }
                let (i, local) = match self.by_public.get(&to) {
                    Some(&(i, local)) => (i, local),
                    None => match self.by_udp.get(&to) {
                        Some(&(i, _)) if self.clients[i].nat == SimNat::None => (i, to),
                        _ => return,
                    },
                };
                // A NAT passes a datagram in only on the mapping made towards its source.
                if self.clients[i].nat != SimNat::None && self.clients[i].mappings.get(&(local, from)) != Some(&to) {
                    self.clients[i].firewall_drops += 1;
                    return;
                }
                if self.net.firewalls {
                    let fresh = self.clients[i]
                        .flows
                        .get(&(local, from))
                        .is_some_and(|t| now.duration_since(*t) < self.net.flow_timeout);
                    if !fresh {
                        self.clients[i].firewall_drops += 1;
                        return;
                    }
                }
                self.clients[i].flows.insert((local, from), now);
                // The socket may have been closed since (its mapping outlives it).
                let Some(&(_, sock)) = self.by_udp.get(&local) else {
                    self.clients[i].firewall_drops += 1;
                    return;
                };
                let _ = self.clients[i].client.handle_datagram_on(now, sock, from, &mut data);
                self.pump_client(i);
            }
        }
    }

    /// Run until virtual time `until` (from the start). Bounded in steps ([`MAX_STEPS`]):
    /// a run that cannot get there panics (a livelock).
    pub fn run_until(&mut self, until: Duration) {
        let end = self.start + until;
        for _ in 0..MAX_STEPS {
            // Earliest of: queued event, client timers, app wake-ups, shard tick.
            let mut t = self.next_tick;
            if let Some(Reverse((at, _, _))) = self.queue.peek() {
                t = t.min(*at);
            }
            for i in 0..self.clients.len() {
                if let Some(x) = self.clients[i].client.poll_timeout() {
                    t = t.min(x);
                }
                if let Some(x) = self.app_wakeup(i) {
                    t = t.min(x);
                }
            }
            if t > end {
                self.now = end;
                return;
            }
            self.now = t.max(self.now);
            if let Some(Reverse((at, _, key))) = self.queue.peek().copied() {
                if at <= self.now {
                    self.queue.pop();
                    let ev = self.events.remove(&key).expect("every queued key has its event");
                    self.trace.push(format!("{:?} {ev:?}", at - self.start));
                    self.deliver(ev);
                    continue;
                }
            }
            if self.now >= self.next_tick {
                self.next_tick = self.now + TICK;
                let unix = self.unix_now();
                for s in 0..self.shards.len() {
                    self.shards[s].handle_tick(self.now, unix);
                    self.pump_shard(s as u16);
                }
            }
            for i in 0..self.clients.len() {
                if self.clients[i].client.poll_timeout().is_some_and(|x| x <= self.now) {
                    self.clients[i].client.handle_timeout(self.now);
                }
                if self.app_wakeup(i).is_some_and(|x| x <= self.now) {
                    self.run_app(i);
                }
                self.pump_client(i);
            }
        }
        let tail: Vec<&String> = self.trace.iter().rev().take(5).collect();
        panic!(
            "simulation did not reach {until:?} within the step bound (livelock?); stuck at {:?} after {tail:#?}",
            self.now - self.start
        );
    }
}
