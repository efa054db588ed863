//! Deterministic simulation: real [`Client`] state machines and real manager [`Shard`]s,
//! wired by a simulated network in virtual time. No sockets, threads or sleeps; each step
//! jumps to the earliest pending event or timer, and every run is bounded in steps and in
//! virtual time.
//!
//! The network: signalling frames are delivered in order after a fixed delay (TCP), unless a
//! test's filter drops or duplicates them. Datagrams take a delay plus seeded jitter and may
//! be lost at a seeded rate. Every client sits behind a stateful firewall modelled on Linux
//! conntrack: an inbound datagram passes only if the client sent to that remote address
//! within the flow timeout (30 s, refreshed by traffic either way); everything else is
//! dropped and counted.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::client::{CallHandle, CallReport, Client, ClientConfig, EndReason, Event, Output as ClientOutput, Role};
use proto::media::{MediaSource, SyntheticSource};
use proto::rng::Rng;
use proto::shard::bindings::Bindings;
use proto::shard::stats::Stats;
use proto::shard::{Output, Shard, ShardConfig, ShardMsg};
use proto::wire::frame::{ClientId, Frame, HangupReason};
use proto::wire::stun::{self, StunMessage};
use proto::wire::{classify, DatagramKind};

const MANAGER_UDP: &str = "198.51.100.1:7480";

#[derive(Debug)]
enum Ev {
    ToManager { client: usize, frame: Frame },
    ToClient { client: usize, frame: Frame },
    Datagram { from: SocketAddr, to: SocketAddr, data: Vec<u8> },
    Shard { to: u16, msg: ShardMsg },
    Closed { client: usize },
}

/// What a simulated client does.
#[derive(Debug, Clone)]
enum Plan {
    /// Answer calls; send media back once the caller's media arrives.
    Listen,
    /// Call `callee` at `at`, stream for `talk`, then hang up.
    Call { callee: String, at: Duration, talk: Duration },
}

struct SimClient {
    client: Client,
    udp: SocketAddr,
    conn: Option<(u16, u64)>,
    plan: Plan,
    placed: bool,
    streams: HashMap<CallHandle, (SyntheticSource, Instant, Option<Instant>)>,
    /// Media is not sent while `now` is inside this window (a paused call).
    pause: Option<(Duration, Duration)>,
    reports: Vec<CallReport>,
    /// conntrack-like flow table: remote address -> last activity.
    flows: HashMap<SocketAddr, Instant>,
    firewall_drops: u64,
}

/// Knobs of the simulated network.
#[derive(Clone)]
struct Net {
    frame_delay: Duration,
    udp_delay: Duration,
    udp_jitter: Duration,
    udp_loss: f64,
    flow_timeout: Duration,
    firewalls: bool,
}

impl Default for Net {
    fn default() -> Self {
        Net {
            frame_delay: Duration::from_millis(5),
            udp_delay: Duration::from_millis(10),
            udp_jitter: Duration::ZERO,
            udp_loss: 0.0,
            flow_timeout: Duration::from_secs(30),
            firewalls: true,
        }
    }
}

type FrameFilter = Box<dyn FnMut(&Frame) -> u32>;
type DatagramFilter = Box<dyn FnMut(SocketAddr, SocketAddr, &[u8]) -> bool>;

struct Sim {
    start: Instant,
    now: Instant,
    rng: Rng,
    net: Net,
    shards: Vec<Shard>,
    stats: Arc<Stats>,
    bindings: Arc<Bindings>,
    clients: Vec<SimClient>,
    by_udp: HashMap<SocketAddr, usize>,
    by_conn: HashMap<(u16, u64), usize>,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    events: HashMap<usize, Ev>,
    seq: u64,
    next_tick: Instant,
    /// Copies of each frame sent to a client: 0 drops it, 2 duplicates it.
    to_client_filter: Option<FrameFilter>,
    /// Return false to drop a datagram (from, to, bytes).
    datagram_filter: Option<DatagramFilter>,
    udp_dropped_by_loss: u64,
    manager_udp_non_stun: u64,
    /// Every delivery in order: virtual time and the whole event (frame, datagram bytes,
    /// shard message), so two runs can be compared as traces, not as a few aggregates.
    trace: Vec<String>,
}

impl Sim {
    fn new(seed: u64, shards: u16, net: Net) -> Sim {
        let start = Instant::now();
        let stats = Arc::new(Stats::default());
        let bindings = Arc::new(Bindings::default());
        let cfg = ShardConfig::default();
        Sim {
            start,
            now: start,
            rng: Rng::new(seed),
            net,
            shards: (0..shards)
                .map(|i| Shard::new(i, shards, cfg.clone(), bindings.clone(), stats.clone(), seed))
                .collect(),
            stats,
            bindings,
            clients: Vec::new(),
            by_udp: HashMap::new(),
            by_conn: HashMap::new(),
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            next_tick: start,
            to_client_filter: None,
            datagram_filter: None,
            udp_dropped_by_loss: 0,
            manager_udp_non_stun: 0,
            trace: Vec::new(),
        }
    }

    fn add(&mut self, id: &str, plan: Plan, tweak: impl FnOnce(&mut ClientConfig)) -> usize {
        let i = self.clients.len();
        let udp: SocketAddr = format!("203.0.113.{}:{}", 1 + i / 200, 40000 + i % 200).parse().unwrap();
        let mut cfg = ClientConfig::new(ClientId::new(id).unwrap(), udp.port());
        cfg.stun_server = Some(MANAGER_UDP.parse().unwrap());
        cfg.max_calls = 4;
        tweak(&mut cfg);
        let seed = self.rng.next_u64();
        self.clients.push(SimClient {
            client: Client::new(cfg, seed),
            udp,
            conn: None,
            plan,
            placed: false,
            streams: HashMap::new(),
            pause: None,
            reports: Vec::new(),
            flows: HashMap::new(),
            firewall_drops: 0,
        });
        self.by_udp.insert(udp, i);
        // Connect: the TCP peer address is the client's IP with an ephemeral port.
        let shard = (i % self.shards.len()) as u16;
        let peer = SocketAddr::new(udp.ip(), 50000 + i as u16);
        let conn = self.shards[shard as usize].conn_opened(self.now, peer);
        self.clients[i].conn = Some((shard, conn));
        self.by_conn.insert((shard, conn), i);
        self.clients[i].client.handle_connected(self.now);
        self.pump_shard(shard);
        i
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
                    if let Some(&c) = self.by_conn.get(&(s, conn)) {
                        let copies = match self.to_client_filter.as_mut() {
                            Some(f) => f(&frame),
                            None => 1,
                        };
                        for _ in 0..copies {
                            self.schedule(
                                self.now + self.net.frame_delay,
                                Ev::ToClient { client: c, frame: frame.clone() },
                            );
                        }
                    }
                }
                Output::Close { conn } => {
                    if let Some(c) = self.by_conn.remove(&(s, conn)) {
                        self.clients[c].conn = None;
                        self.schedule(self.now + self.net.frame_delay, Ev::Closed { client: c });
                        self.shards[s as usize].conn_closed(self.now, conn);
                    }
                }
                Output::Shard { to, msg } => self.schedule(self.now, Ev::Shard { to, msg }),
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
        if let Some(&i) = self.by_udp.get(&from) {
            // Outbound opens or refreshes the flow in the sender's firewall.
            self.clients[i].flows.insert(to, self.now);
        }
        // Random loss happens on the way, after the sender's firewall.
        if self.net.udp_loss > 0.0 && self.rng.chance(self.net.udp_loss) {
            self.udp_dropped_by_loss += 1;
            return;
        }
        let jitter = if self.net.udp_jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(self.rng.below(self.net.udp_jitter.as_micros() as u64))
        };
        self.schedule(self.now + self.net.udp_delay + jitter, Ev::Datagram { from, to, data: data.to_vec() });
    }

    /// Drain one client's output and run its application logic.
    fn pump_client(&mut self, i: usize) {
        let mut buf = [0u8; 1500];
        loop {
            let mut progressed = false;
            match self.clients[i].client.poll_output(&mut buf).expect("1500 bytes hold any control datagram") {
                ClientOutput::Frame(f) => {
                    progressed = true;
                    if self.clients[i].conn.is_some() {
                        self.schedule(self.now + self.net.frame_delay, Ev::ToManager { client: i, frame: f });
                    }
                }
                ClientOutput::Transmit(t) => {
                    progressed = true;
                    let from = self.clients[i].udp;
                    self.send_datagram(from, t.to, &buf[..t.len]);
                }
                ClientOutput::Event(ev) => {
                    progressed = true;
                    self.on_event(i, ev);
                }
                ClientOutput::Timeout(_) => {}
            }
            if !progressed {
                break;
            }
        }
    }

    fn on_event(&mut self, i: usize, ev: Event) {
        let now = self.now;
        let c = &mut self.clients[i];
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
        let place = match &c.plan {
            Plan::Call { at, .. } if !c.placed => Some(self.start + *at),
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
                self.clients[i].client.call(now, ClientId::new(callee).unwrap()).unwrap();
            }
        }
        let mut buf = [0u8; 1500];
        let mut payload = [0u8; 256];
        let mut out = Vec::new();
        let mut hang = Vec::new();
        {
            let c = &mut self.clients[i];
            let paused = c.pause.is_some_and(|(a, b)| now >= start + a && now < start + b);
            for (&h, (src, next, end)) in c.streams.iter_mut() {
                if end.is_some_and(|e| now >= e) {
                    hang.push(h);
                    continue;
                }
                while *next <= now {
                    if !paused {
                        let (len, dur) = src.next_frame(&mut payload);
                        if let Ok(t) = c.client.send_media(now, h, &payload[..len], dur, &mut buf) {
                            out.push((t.to, buf[..t.len].to_vec()));
                        }
                    }
                    *next += Duration::from_millis(src.frame_ms() as u64);
                }
            }
            for h in hang {
                c.client.hangup(now, h).unwrap();
            }
        }
        let from = self.clients[i].udp;
        for (to, data) in out {
            self.send_datagram(from, to, &data);
        }
    }

    fn manager_udp(&mut self, from: SocketAddr, data: &[u8]) {
        if classify(data) != DatagramKind::Stun {
            self.manager_udp_non_stun += 1;
            return;
        }
        if let Ok(StunMessage::BindingRequest { txid }) = stun::parse(data) {
            self.bindings.insert(txid, from, Instant::now());
            let mut out = [0u8; stun::MAX_RESPONSE_LEN];
            let n = stun::emit_binding_success(&txid, from, &mut out);
            let me: SocketAddr = MANAGER_UDP.parse().unwrap();
            self.send_datagram(me, from, &out[..n]);
        }
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::ToManager { client, frame } => {
                if let Some((s, conn)) = self.clients[client].conn {
                    self.shards[s as usize].conn_frame(now, conn, frame);
                    self.pump_shard(s);
                }
            }
            Ev::ToClient { client, frame } => {
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
            Ev::Datagram { from, to, data } => {
                if to == MANAGER_UDP.parse::<SocketAddr>().unwrap() {
                    return self.manager_udp(from, &data);
                }
                let Some(&i) = self.by_udp.get(&to) else { return };
                if self.net.firewalls {
                    let fresh = self.clients[i]
                        .flows
                        .get(&from)
                        .is_some_and(|t| now.duration_since(*t) < self.net.flow_timeout);
                    if !fresh {
                        self.clients[i].firewall_drops += 1;
                        return;
                    }
                }
                self.clients[i].flows.insert(from, now);
                let _ = self.clients[i].client.handle_datagram(now, from, &data);
                self.pump_client(i);
            }
        }
    }

    /// Run until virtual time `until` (relative to start). Bounded in steps.
    fn run_until(&mut self, until: Duration) {
        let end = self.start + until;
        for _ in 0..5_000_000 {
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
                    let ev = self.events.remove(&key).unwrap();
                    self.trace.push(format!("{:?} {ev:?}", at - self.start));
                    self.deliver(ev);
                    continue;
                }
            }
            if self.now >= self.next_tick {
                self.next_tick = self.now + Duration::from_millis(250);
                for s in 0..self.shards.len() {
                    self.shards[s].handle_tick(self.now);
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
        panic!("simulation did not reach {until:?} within the step bound (livelock?)");
    }

    fn reports(&self, i: usize) -> &[CallReport] {
        &self.clients[i].reports
    }

    fn owned_calls(&self) -> usize {
        self.shards.iter().map(|s| s.owned_calls()).sum()
    }
}

/// How a caller sees a call whose media never came back.
const NO_MEDIA: [EndReason; 2] = [EndReason::NoMedia, EndReason::RemoteHangup(HangupReason::Timeout)];

fn listen() -> Plan {
    Plan::Listen
}

fn call(callee: &str, at_ms: u64, talk_ms: u64) -> Plan {
    Plan::Call { callee: callee.into(), at: Duration::from_millis(at_ms), talk: Duration::from_millis(talk_ms) }
}

fn only(r: &[CallReport]) -> &CallReport {
    assert_eq!(r.len(), 1, "expected exactly one call report, got {r:#?}");
    &r[0]
}

#[test]
fn calls_connect_through_stateful_firewalls_with_two_way_media() {
    let mut sim = Sim::new(1, 3, Net::default());
    let mut pairs = Vec::new();
    for k in 0..10 {
        let b = sim.add(&format!("callee{k}"), listen(), |_| {});
        let a = sim.add(&format!("caller{k}"), call(&format!("callee{k}"), 500 + k * 37, 3000), |_| {});
        pairs.push((a, b));
    }
    sim.run_until(Duration::from_secs(8));
    for (a, b) in pairs {
        let (ra, rb) = (only(sim.reports(a)), only(sim.reports(b)));
        assert_eq!(ra.reason, EndReason::LocalHangup, "{ra:#?}");
        assert_eq!(rb.reason, EndReason::RemoteHangup(HangupReason::Normal), "{rb:#?}");
        assert_eq!((ra.role, rb.role), (Role::Caller, Role::Callee));
        assert_eq!(ra.call_id, rb.call_id);
        // 3 s at 50 packets/s each way; the callee starts when the caller's first packet lands.
        assert!((149..=151).contains(&ra.sent), "caller sent {}", ra.sent);
        assert!(rb.received >= 149 && rb.lost == 0, "{rb:#?}");
        assert!(ra.received >= 148 && ra.lost == 0, "{ra:#?}");
        // The addresses each side used are the public ones the manager learned by STUN.
        assert_eq!(ra.peer, Some(sim.clients[b].udp));
        assert_eq!(rb.peer, Some(sim.clients[a].udp));
        // Setup: CALL -> (5 ms) -> INCOMING (5 ms) -> PUNCHED (5 ms) -> START (5 ms): 20 ms.
        assert_eq!(ra.setup, Some(Duration::from_millis(20)));
        // The callee's null packet was dropped by the caller's firewall (it arrived before
        // the caller had sent anything to the callee).
        assert!(sim.clients[a].firewall_drops >= 1);
    }
    assert_eq!(sim.manager_udp_non_stun, 0, "the manager must never see media");
    assert_eq!(sim.owned_calls(), 0, "every call record is released");
    assert_eq!(sim.stats.calls_started.load(std::sync::atomic::Ordering::Relaxed), 10);
}

#[test]
fn without_the_null_packet_the_callees_firewall_drops_the_media() {
    let mut sim = Sim::new(2, 2, Net::default());
    let b = sim.add("bob", listen(), |c| c.send_null = false);
    let a = sim.add("alice", call("bob", 300, 8000), |_| {});
    sim.run_until(Duration::from_secs(10));
    let (ra, rb) = (only(sim.reports(a)), only(sim.reports(b)));
    assert_eq!(rb.reason, EndReason::NoMedia, "{rb:#?}");
    assert_eq!(rb.received, 0);
    // The callee's timer started first; its HANGUP(Timeout) may reach the caller first.
    assert!(NO_MEDIA.contains(&ra.reason), "{ra:#?}");
    assert_eq!(ra.received, 0);
    assert!(!ra.succeeded() && !rb.succeeded());
    assert!(ra.sent > 0, "the caller did stream");
    assert!(sim.clients[b].firewall_drops >= ra.sent, "bob's firewall dropped every media packet");
    assert_eq!(sim.owned_calls(), 0, "the timed-out call was hung up at the manager");
}

#[test]
fn lost_null_packets_are_retried_until_the_path_opens() {
    let mut sim = Sim::new(3, 2, Net::default());
    let b = sim.add("bob", listen(), |_| {});
    let a = sim.add("alice", call("bob", 300, 2000), |_| {});
    let bob_udp = sim.clients[b].udp;
    let mut dropped = 0;
    // Drop bob's first three null packets before they leave his network.
    sim.datagram_filter = Some(Box::new(move |from, _to, data| {
        if from == bob_udp && classify(data) == DatagramKind::Null && dropped < 3 {
            dropped += 1;
            return false;
        }
        true
    }));
    sim.run_until(Duration::from_secs(6));
    let (ra, rb) = (only(sim.reports(a)), only(sim.reports(b)));
    assert_eq!(ra.reason, EndReason::LocalHangup, "{ra:#?}");
    assert!(rb.nulls_sent >= 4, "bob re-sent the null packet: {}", rb.nulls_sent);
    assert!(rb.received > 50 && ra.received > 50);
    // Setup took longer than the clean 20 ms because media had to wait for a re-send
    // (the re-sends go out at +50, +150, +350 ms).
    assert!(rb.setup.unwrap() > Duration::from_millis(300), "{:?}", rb.setup);
}

#[test]
fn all_null_packets_lost_fails_with_no_media_after_bounded_retries() {
    let mut sim = Sim::new(4, 2, Net::default());
    let b = sim.add("bob", listen(), |_| {});
    let a = sim.add("alice", call("bob", 300, 8000), |_| {});
    let bob_udp = sim.clients[b].udp;
    sim.datagram_filter =
        Some(Box::new(move |from, _to, data| !(from == bob_udp && classify(data) == DatagramKind::Null)));
    sim.run_until(Duration::from_secs(10));
    let (ra, rb) = (only(sim.reports(a)), only(sim.reports(b)));
    assert_eq!(rb.reason, EndReason::NoMedia);
    assert_eq!(rb.nulls_sent, 1 + 6, "one null plus the configured six re-sends, no more");
    assert!(NO_MEDIA.contains(&ra.reason), "{ra:#?}");
}

#[test]
fn a_lost_start_ends_both_sides_cleanly() {
    let mut sim = Sim::new(5, 2, Net::default());
    let b = sim.add("bob", listen(), |_| {});
    let a = sim.add("alice", call("bob", 300, 2000), |_| {});
    sim.to_client_filter = Some(Box::new(|f| if matches!(f, Frame::Start { .. }) { 0 } else { 1 }));
    sim.run_until(Duration::from_secs(12));
    let (ra, rb) = (only(sim.reports(a)), only(sim.reports(b)));
    assert_eq!(ra.reason, EndReason::NoStart, "{ra:#?}");
    assert_eq!(ra.sent, 0);
    assert_eq!(rb.reason, EndReason::NoMedia, "{rb:#?}");
    assert_eq!(sim.owned_calls(), 0, "the callee's HANGUP released the call at the manager");
}

#[test]
fn duplicate_frames_do_not_create_duplicate_calls() {
    let mut sim = Sim::new(6, 2, Net::default());
    let b = sim.add("bob", listen(), |_| {});
    let a = sim.add("alice", call("bob", 300, 2000), |_| {});
    sim.to_client_filter = Some(Box::new(|_| 2)); // every frame to a client arrives twice
    sim.run_until(Duration::from_secs(6));
    let (ra, rb) = (only(sim.reports(a)), only(sim.reports(b)));
    assert_eq!(ra.reason, EndReason::LocalHangup);
    assert_eq!(rb.reason, EndReason::RemoteHangup(HangupReason::Normal));
    assert!(rb.received > 90 && rb.lost == 0 && ra.lost == 0);
    assert!(sim.clients[b].client.counters().frames_unexpected >= 1, "the duplicate INCOMING was noticed");
    assert!(sim.clients[a].client.counters().frames_unexpected >= 1, "the duplicate START was noticed");
    assert_eq!(sim.stats.frames_duplicate.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn a_hangup_overtaking_start_is_handled() {
    // Reorder: hold START back so that the callee's hangup (after its first-media timeout)
    // reaches the caller first; the late START must not resurrect the call.
    let mut sim = Sim::new(7, 1, Net::default());
    let b = sim.add("bob", listen(), |c| c.first_media_timeout = Duration::from_millis(500));
    let a = sim.add("alice", call("bob", 300, 2000), |c| c.start_timeout = Duration::from_millis(400));
    let mut held = 0;
    sim.to_client_filter = Some(Box::new(move |f| {
        if matches!(f, Frame::Start { .. }) && held == 0 {
            held += 1;
            return 0;
        }
        1
    }));
    sim.run_until(Duration::from_secs(5));
    let (ra, rb) = (only(sim.reports(a)), only(sim.reports(b)));
    assert_eq!(ra.reason, EndReason::NoStart);
    assert_eq!(rb.reason, EndReason::NoMedia);
    assert_eq!(sim.owned_calls(), 0);
}

#[test]
fn seeded_lossy_network_connects_every_call_and_reports_loss_consistently() {
    let net = Net { udp_loss: 0.05, udp_jitter: Duration::from_millis(8), ..Net::default() };
    let mut sim = Sim::new(8, 2, net);
    let mut pairs = Vec::new();
    for k in 0..40 {
        let b = sim.add(&format!("b{k}"), listen(), |_| {});
        let a = sim.add(&format!("a{k}"), call(&format!("b{k}"), 400 + k * 13, 4000), |_| {});
        pairs.push((a, b));
    }
    sim.run_until(Duration::from_secs(12));
    let (mut sent, mut received, mut lost) = (0u64, 0u64, 0u64);
    for (a, b) in pairs {
        let (ra, rb) = (only(sim.reports(a)), only(sim.reports(b)));
        assert_eq!(ra.reason, EndReason::LocalHangup, "caller {a}: {ra:#?}");
        assert!(rb.reason.is_success(), "callee {b}: {rb:#?}");
        assert!(ra.jitter_ms > 0.5, "8 ms of arrival jitter shows: {}", ra.jitter_ms);
        sent += ra.sent + rb.sent;
        received += ra.received + rb.received;
        lost += ra.lost + rb.lost;
    }
    let loss = lost as f64 / (received + lost) as f64;
    assert!((0.035..0.065).contains(&loss), "measured loss {loss:.4} for 5% injected");
    assert!(received + lost <= sent);
}

#[test]
fn keepalives_hold_the_firewall_window_open_on_a_paused_call() {
    // Media pauses from 2 s to 70 s: longer than two 30 s flow timeouts.
    let run = |keepalive: Duration| {
        let mut sim = Sim::new(9, 2, Net::default());
        let b = sim.add("bob", listen(), |c| c.keepalive_interval = keepalive);
        let a = sim.add("alice", call("bob", 300, 75_000), |c| c.keepalive_interval = keepalive);
        for i in [a, b] {
            sim.clients[i].pause = Some((Duration::from_secs(2), Duration::from_secs(70)));
        }
        sim.run_until(Duration::from_secs(80));
        let (ra, rb) = (only(sim.reports(a)).clone(), only(sim.reports(b)).clone());
        (ra, rb)
    };
    let (ra, rb) = run(Duration::from_secs(15));
    assert_eq!(ra.reason, EndReason::LocalHangup, "{ra:#?}");
    // Media resumed both ways after the pause: about 2 s + 5 s of packets each way.
    assert!(ra.received > 320 && rb.received > 320, "{} {}", ra.received, rb.received);
    assert!(ra.nulls_sent >= 4, "keepalives were sent: {}", ra.nulls_sent);
    // Without keepalives the flows expire during the pause and resumed media is dropped:
    // both sides eventually give up with PeerGone (media timeout, 35 s).
    let (ra, rb) = run(Duration::from_secs(3600));
    let gone = [EndReason::PeerGone, EndReason::RemoteHangup(HangupReason::PeerGone)];
    assert!(gone.contains(&ra.reason), "{ra:#?}");
    assert!(gone.contains(&rb.reason), "{rb:#?}");
    assert!(ra.received < 120 && rb.received < 120, "nothing after the pause got through");
}

#[test]
fn a_peer_that_vanishes_is_detected_by_media_timeout() {
    let mut sim = Sim::new(10, 2, Net::default());
    let b = sim.add("bob", listen(), |_| {});
    let a = sim.add("alice", call("bob", 300, 120_000), |c| c.media_timeout = Duration::from_secs(5));
    let bob_udp = sim.clients[b].udp;
    // After 3 s bob's packets stop reaching anyone (he vanished).
    let start = sim.start;
    let clock = std::rc::Rc::new(std::cell::Cell::new(start));
    let c2 = clock.clone();
    sim.datagram_filter =
        Some(Box::new(move |from, _, _| !(from == bob_udp && c2.get() > start + Duration::from_secs(3))));
    for _ in 0..100 {
        let t = sim.now + Duration::from_millis(100);
        clock.set(t);
        sim.run_until(t - sim.start);
    }
    let ra = only(sim.reports(a));
    assert_eq!(ra.reason, EndReason::PeerGone, "{ra:#?}");
    let ended_after = ra.duration;
    assert!(ended_after > Duration::from_secs(7) && ended_after < Duration::from_secs(9), "{ended_after:?}");
}

#[test]
fn busy_and_unknown_callees_fail_with_their_reason() {
    let mut sim = Sim::new(11, 2, Net::default());
    let b = sim.add("bob", listen(), |c| c.max_calls = 1);
    let a1 = sim.add("a1", call("bob", 300, 3000), |_| {});
    let a2 = sim.add("a2", call("bob", 400, 3000), |_| {});
    let a3 = sim.add("a3", call("nobody", 300, 3000), |_| {});
    sim.run_until(Duration::from_secs(5));
    assert_eq!(only(sim.reports(a1)).reason, EndReason::LocalHangup);
    assert_eq!(only(sim.reports(a2)).reason, EndReason::Busy);
    assert_eq!(only(sim.reports(a3)).reason, EndReason::Unknown(proto::wire::frame::UnknownReason::NeverRegistered));
    assert_eq!(sim.reports(b).len(), 1);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    // Several callers, two shards, loss and jitter: every frame, datagram and shard message,
    // with its virtual time, must be the same in both runs (HashMap iteration order differs
    // between the two, so any output that depends on it shows up here).
    let run = || {
        let net = Net { udp_loss: 0.1, udp_jitter: Duration::from_millis(5), ..Net::default() };
        let mut sim = Sim::new(42, 2, net);
        let b = sim.add("b", listen(), |_| {});
        let c = sim.add("c", listen(), |_| {});
        let mut callers = Vec::new();
        for (i, callee) in ["b", "c", "b", "c"].iter().enumerate() {
            callers.push(sim.add(&format!("a{i}"), call(callee, 300 + 7 * i as u64, 2000), |_| {}));
        }
        sim.run_until(Duration::from_secs(5));
        let (ra, rb) = (only(sim.reports(callers[0])), &sim.reports(b)[0]);
        let summary = (ra.received, ra.lost, rb.received, rb.lost, ra.setup, sim.udp_dropped_by_loss);
        assert_eq!(sim.reports(c).len(), 2);
        (std::mem::take(&mut sim.trace), summary)
    };
    let (first_trace, first) = run();
    let (second_trace, second) = run();
    assert!(first_trace.len() > 500, "a trace of {} deliveries", first_trace.len());
    if let Some(i) = (0..first_trace.len().min(second_trace.len())).find(|&i| first_trace[i] != second_trace[i]) {
        panic!("the runs differ at delivery {i}:\n  {}\n  {}", first_trace[i], second_trace[i]);
    }
    assert_eq!(first_trace.len(), second_trace.len());
    assert_eq!(first, second);
    assert!(first.5 > 0, "loss was injected");
}
