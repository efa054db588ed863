//! Many managers as one service, in virtual time: real shards and real bridges
//! (`proto::cluster`) of three nodes, joined by an in-memory engine that does what NATS does
//! for them (node inboxes with "no responders", a key-value directory whose revisions only
//! grow, compare-and-swap writes, a watch). The NATS side itself is tested for real in
//! `peer/tests/cluster.rs`; this file pins the decisions: routing, generations, NOT_HERE,
//! nodes gone, the engine down and back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::cluster::{Bridge, BridgeOut, Holder, NodeMsg, FAILOVER_WAIT, HEARTBEAT_EVERY, NODE_TIMEOUT};
use proto::nat::NatClass;
use proto::shard::stats::Stats;
use proto::shard::{Output, Shard, ShardConfig, ShardInit, ShardMsg};
use proto::wire::frame::{CallId, ClientId, ErrorCode, Frame, HangupReason, RejectReason, UnknownReason};

const SHARDS: u16 = 2;

/// A connection: node index, shard, connection id.
type Conn = (usize, u16, u64);

struct Node {
    id: u64,
    shards: Vec<Shard>,
    bridge: Bridge,
    stats: Arc<Stats>,
    /// Running (a killed node answers nothing, and its heartbeats stop).
    alive: bool,
    /// Its directory watch delivers (off: its copy goes stale).
    watching: bool,
}

enum Action {
    Shard(usize, u16, ShardMsg),
    Bridge(usize, BridgeOut),
    Close(Conn),
}

struct World {
    nodes: Vec<Node>,
    kv: BTreeMap<String, Holder>,
    rev: u64,
    /// The engine (NATS) is reachable.
    up: bool,
    t0: Instant,
    now: Instant,
    frames: Vec<(Conn, Frame)>,
    closed: Vec<Conn>,
    /// Messages that crossed between nodes.
    crossed: usize,
    opened: u64,
}

impl World {
    fn new(n: usize) -> World {
        let t0 = Instant::now();
        let nodes = (0..n)
            .map(|i| {
                let id = 0x1000 + i as u64;
                let stats = Arc::new(Stats::default());
                let shards = (0..SHARDS)
                    .map(|index| {
                        let init = ShardInit {
                            index,
                            n: SHARDS,
                            seed: 1 + i as u64,
                            token_key: [9; 32],
                            unix_secs: 1_000_000,
                            node: id,
                        };
                        Shard::new(init, ShardConfig::default(), stats.clone())
                    })
                    .collect();
                let bridge = Bridge::new(id, SHARDS, stats.clone());
                Node { id, shards, bridge, stats, alive: true, watching: true }
            })
            .collect();
        let mut w = World {
            nodes,
            kv: BTreeMap::new(),
            rev: 0,
            up: true,
            t0,
            now: t0,
            frames: Vec::new(),
            closed: Vec::new(),
            crossed: 0,
            opened: 0,
        };
        for i in 0..n {
            w.nodes[i].bridge.on_connection(t0, true);
        }
        w.pump();
        w
    }

    fn index_of(&self, node: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == node)
    }

    /// Deliver everything until every node is quiet.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut actions = Vec::new();
            for (i, n) in self.nodes.iter_mut().enumerate() {
                if !n.alive {
                    continue;
                }
                for (s, shard) in n.shards.iter_mut().enumerate() {
                    while let Some(o) = shard.poll_output() {
                        match o {
                            Output::Frame { conn, frame } => self.frames.push(((i, s as u16, conn), frame)),
                            Output::Close { conn } => actions.push(Action::Close((i, s as u16, conn))),
                            Output::Shard { to, msg } => actions.push(Action::Shard(i, to, msg)),
                            Output::Cluster(o) => n.bridge.from_shard(self.now, o),
                        }
                    }
                }
                while let Some(o) = n.bridge.poll_output() {
                    actions.push(Action::Bridge(i, o));
                }
            }
            if actions.is_empty() {
                return;
            }
            for a in actions {
                self.act(a);
            }
        }
        panic!("the nodes never went quiet");
    }

    fn act(&mut self, a: Action) {
        let now = self.now;
        match a {
            Action::Shard(i, to, msg) => self.nodes[i].shards[to as usize].handle_msg(now, msg),
            Action::Close((i, s, c)) => {
                if self.nodes[i].shards[s as usize].conn_closed(now, c) {
                    self.closed.push((i, s, c));
                }
            }
            Action::Bridge(i, out) => match out {
                BridgeOut::Shard { shard, msg } => self.nodes[i].shards[shard as usize].handle_msg(now, msg),
                BridgeOut::Publish { node, msg } => {
                    if !self.up {
                        return;
                    }
                    // What crosses is bytes.
                    let b = msg.encode().expect("encodes");
                    self.crossed += 1;
                    if let Some(j) = self.index_of(node).filter(|&j| self.nodes[j].alive) {
                        self.nodes[j].bridge.on_node_msg(now, &b);
                    }
                }
                BridgeOut::Request { node, msg, token } => {
                    if !self.up {
                        return;
                    }
                    let b = msg.encode().expect("encodes");
                    self.crossed += 1;
                    match self.index_of(node).filter(|&j| self.nodes[j].alive) {
                        Some(j) => {
                            self.nodes[j].bridge.on_node_msg(now, &b);
                            self.nodes[i].bridge.on_ack(now, token);
                        }
                        None => self.nodes[i].bridge.on_no_responders(now, token),
                    }
                }
                BridgeOut::Write { id, conn, prev } => {
                    if !self.up {
                        self.nodes[i].bridge.on_written(now, &id, conn, None);
                        return;
                    }
                    // Compare-and-swap from what the node believed; on a conflict the IO
                    // reads the entry and writes over it (as `manager::cluster` does).
                    let key = id.as_str().to_string();
                    let current = self.kv.get(&key).copied();
                    let _believed = prev;
                    self.rev += 1;
                    let h = Holder { node: self.nodes[i].id, gen: self.rev };
                    self.kv.insert(key, h);
                    self.nodes[i].bridge.on_written(now, &id, conn, Some((h.gen, current)));
                    self.broadcast(id, Some(h));
                }
                BridgeOut::Delete { id, gen } => {
                    if self.up && self.kv.get(id.as_str()).is_some_and(|h| h.gen == gen) {
                        self.kv.remove(id.as_str());
                        self.broadcast(id, None);
                    }
                }
                BridgeOut::Get { id, token } => {
                    if self.up {
                        let h = self.kv.get(id.as_str()).copied();
                        self.nodes[i].bridge.on_entry(now, token, &id, h);
                    } else {
                        self.nodes[i].bridge.on_entry_failed(now, token);
                    }
                }
                BridgeOut::Heartbeat => {
                    if !self.up {
                        return;
                    }
                    let from = self.nodes[i].id;
                    for n in self.nodes.iter_mut().filter(|n| n.alive) {
                        n.bridge.on_heartbeat(now, from);
                    }
                }
            },
        }
    }

    fn broadcast(&mut self, id: ClientId, h: Option<Holder>) {
        let now = self.now;
        for n in self.nodes.iter_mut().filter(|n| n.alive && n.watching) {
            n.bridge.on_watch(now, id.clone(), h);
        }
    }

    /// Let `d` pass in 100 ms ticks (heartbeats, timeouts).
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(100);
            let now = self.now;
            let unix = 1_000_000 + now.duration_since(self.t0).as_secs();
            for n in self.nodes.iter_mut().filter(|n| n.alive) {
                n.bridge.tick(now);
                for s in n.shards.iter_mut() {
                    s.handle_tick(now, unix);
                }
            }
            self.pump();
        }
    }

    fn register(&mut self, node: usize, id: &str) -> Conn {
        self.opened += 1;
        let shard = (self.opened % SHARDS as u64) as u16;
        let peer: SocketAddr =
            format!("198.51.100.{}:{}", 1 + self.opened % 200, 20_000 + self.opened).parse().unwrap();
        let now = self.now;
        let conn = self.nodes[node].shards[shard as usize].conn_opened(now, peer, 0);
        let f = Frame::Register {
            id: ClientId::new(id).unwrap(),
            udp_port: 5004,
            max_calls: 4,
            binding: None,
            auth: None,
            nat: NatClass::Unknown,
            candidates: Vec::new(),
        };
        self.nodes[node].shards[shard as usize].conn_frame(now, conn, f);
        self.pump();
        let c = (node, shard, conn);
        assert!(self.frames.iter().any(|(k, f)| *k == c && matches!(f, Frame::Registered { .. })), "{id} registered");
        c
    }

    fn send(&mut self, c: Conn, f: Frame) {
        let now = self.now;
        self.nodes[c.0].shards[c.1 as usize].conn_frame(now, c.2, f);
        self.pump();
    }

    /// Frames `c` got since `mark`.
    fn got(&self, c: Conn, mark: usize) -> Vec<Frame> {
        self.frames[mark..].iter().filter(|(k, _)| *k == c).map(|(_, f)| f.clone()).collect()
    }

    fn call(&mut self, from: Conn, callee: &str) {
        self.send(from, Frame::Call { call_ref: 7, callee: ClientId::new(callee).unwrap(), keys: None });
    }

    fn incoming(&self, c: Conn, mark: usize) -> Option<CallId> {
        self.got(c, mark).iter().find_map(|f| match f {
            Frame::Incoming { call_id, .. } => Some(*call_id),
            _ => None,
        })
    }

    fn counter(&self, node: usize, f: impl Fn(&Stats) -> &std::sync::atomic::AtomicU64) -> u64 {
        f(&self.nodes[node].stats).load(Ordering::Relaxed)
    }
}

#[test]
fn a_call_across_nodes_rings_starts_and_hangs_up_and_one_within_a_node_never_leaves_it() {
    let mut w = World::new(3);
    let alice = w.register(0, "alice");
    let bob = w.register(1, "bob");
    let carol = w.register(0, "carol");

    // Within node 0: nothing crosses.
    let (crossed, mark) = (w.crossed, w.frames.len());
    w.call(alice, "carol");
    let call = w.incoming(carol, mark).expect("carol is rung");
    w.send(carol, Frame::Punched { call_id: call, udp_port: 5004, keys: None });
    assert!(w.got(alice, mark).iter().any(|f| matches!(f, Frame::Start { .. })));
    w.send(alice, Frame::Hangup { call_id: call, reason: HangupReason::Normal });
    assert!(w.got(carol, mark).iter().any(|f| matches!(f, Frame::Hangup { .. })));
    assert_eq!(w.crossed, crossed, "a call within one node sent nothing to the engine");

    // Across nodes 0 and 1.
    let mark = w.frames.len();
    w.call(alice, "bob");
    let call = w.incoming(bob, mark).expect("bob, on another node, is rung");
    w.send(bob, Frame::Punched { call_id: call, udp_port: 5004, keys: None });
    let start = w.got(alice, mark).into_iter().find(|f| matches!(f, Frame::Start { .. }));
    assert!(matches!(start, Some(Frame::Start { call_id, .. }) if call_id == call), "alice got START");
    w.send(alice, Frame::Hangup { call_id: call, reason: HangupReason::Normal });
    assert!(
        w.got(bob, mark).iter().any(|f| matches!(f, Frame::Hangup { call_id, .. } if *call_id == call)),
        "alice's hangup reached bob's node"
    );
    assert_eq!(w.counter(0, |s| &s.cluster_calls_out), 1);
    assert_eq!(w.counter(1, |s| &s.cluster_calls_in), 1);
    assert_eq!(w.counter(1, |s| &s.calls_started), 2 - 1, "the owner is the callee's node");
    assert_eq!(w.nodes[1].shards.iter().map(|s| s.owned_calls()).sum::<usize>(), 0, "the call record is gone");

    // Unknown ids are unknown across the cluster; offline ones are offline.
    let mark = w.frames.len();
    w.call(alice, "nobody");
    assert_eq!(w.got(alice, mark), vec![Frame::Unknown { call_ref: 7, reason: UnknownReason::NeverRegistered }]);
    w.send(bob, Frame::Ping { nonce: 1 });
    let now = w.now;
    w.nodes[bob.0].shards[bob.1 as usize].conn_closed(now, bob.2);
    w.pump();
    let mark = w.frames.len();
    w.call(alice, "bob");
    assert_eq!(w.got(alice, mark), vec![Frame::Unknown { call_ref: 7, reason: UnknownReason::Offline }]);
}

#[test]
fn the_newest_registration_wins_across_nodes_and_no_call_reaches_the_old_one() {
    let mut w = World::new(3);
    let alice = w.register(2, "alice");
    let old = w.register(0, "bob");
    // Node 0 learns from node 1's message, not from its watch (which would tell it too).
    w.nodes[0].watching = false;
    let mark = w.frames.len();
    let new = w.register(1, "bob");
    // The old connection is told and closed at once (in virtual time: within the same pump).
    assert!(
        w.got(old, mark).iter().any(|f| matches!(f, Frame::Error { code: ErrorCode::Replaced, .. })),
        "{:?}",
        w.got(old, mark)
    );
    assert!(w.closed.contains(&old), "the old connection is closed");
    assert_eq!(w.counter(0, |s| &s.cluster_replaced), 1);
    let mark = w.frames.len();
    w.call(alice, "bob");
    assert!(w.incoming(new, mark).is_some(), "the new registration is rung");
    assert!(w.incoming(old, mark).is_none());
}

#[test]
fn a_stale_copy_of_the_directory_costs_one_not_here_and_the_retry_finds_the_callee() {
    let mut w = World::new(3);
    let alice = w.register(2, "alice");
    let _old = w.register(0, "bob");
    // Node 2's watch stops: it keeps believing bob is on node 0.
    w.nodes[2].watching = false;
    let new = w.register(1, "bob");
    assert_eq!(w.nodes[2].bridge.holder(&ClientId::new("bob").unwrap()).unwrap().node, w.nodes[0].id);
    let mark = w.frames.len();
    w.call(alice, "bob");
    assert!(w.incoming(new, mark).is_some(), "rung after one retry");
    assert_eq!(w.counter(0, |s| &s.cluster_not_here), 1, "node 0 said NOT_HERE");
    assert_eq!(w.counter(2, |s| &s.cluster_retries), 1);
}

#[test]
fn a_node_that_dies_ends_its_calls_on_the_survivors_and_its_clients_are_offline_until_they_move() {
    let mut w = World::new(3);
    let alice = w.register(0, "alice");
    let bob = w.register(1, "bob");
    w.advance(HEARTBEAT_EVERY * 2);
    let mark = w.frames.len();
    w.call(alice, "bob");
    let call = w.incoming(bob, mark).unwrap();
    w.send(bob, Frame::Punched { call_id: call, udp_port: 5004, keys: None });
    // A second call still ringing when the node dies.
    let dave = w.register(1, "dave");
    let mark = w.frames.len();
    w.call(alice, "dave");
    assert!(w.incoming(dave, mark).is_some());

    w.nodes[1].alive = false;
    let mark = w.frames.len();
    w.advance(NODE_TIMEOUT + Duration::from_millis(500));
    // The call still ringing there fails at once for alice; the started one is left to its
    // direct media.
    assert_eq!(
        w.got(alice, mark),
        vec![Frame::Reject {
            call_ref: 7,
            call_id: w
                .frames
                .iter()
                .rev()
                .find_map(|(k, f)| match f {
                    Frame::Incoming { call_id, .. } if *k == dave => Some(*call_id),
                    _ => None,
                })
                .unwrap(),
            reason: RejectReason::CalleeGone,
            callee_nat: NatClass::Unknown,
        }]
    );
    assert_eq!(w.counter(0, |s| &s.cluster_calls_node_gone), 1);
    assert_eq!(w.counter(0, |s| &s.cluster_nodes_gone), 1, "node 0 saw node 1 go");
    assert_eq!(w.counter(2, |s| &s.cluster_nodes_gone), 1, "node 2 saw node 1 go");

    // A CALL to a client of the gone node waits for it to register elsewhere (its client
    // fails over), and is put through when it does.
    let mark = w.frames.len();
    w.call(alice, "bob");
    assert_eq!(w.got(alice, mark), vec![], "waiting, not refused");
    w.advance(Duration::from_millis(300));
    let bob2 = w.register(2, "bob");
    assert!(w.incoming(bob2, mark).is_some(), "put through once bob registered on node 2");

    // One that does not come back within FAILOVER_WAIT is offline.
    let mark = w.frames.len();
    w.call(alice, "dave");
    assert_eq!(w.got(alice, mark), vec![]);
    w.advance(FAILOVER_WAIT - Duration::from_millis(200));
    assert_eq!(w.got(alice, mark), vec![], "still waiting");
    w.advance(Duration::from_millis(400));
    assert_eq!(w.got(alice, mark), vec![Frame::Unknown { call_ref: 7, reason: UnknownReason::Offline }]);
    assert_eq!(w.counter(0, |s| &s.cluster_no_responders), 0, "a node known gone is not asked");
    assert_eq!(w.counter(0, |s| &s.cluster_nodes_gone), 1, "a node is found gone once");
}

#[test]
fn a_node_heard_again_after_being_found_gone_gets_the_calls_that_waited_for_it() {
    let mut w = World::new(2);
    let alice = w.register(0, "alice");
    let bob = w.register(1, "bob");
    w.advance(HEARTBEAT_EVERY * 2);
    // Node 1 is cut off (its heartbeats stop) but keeps bob.
    w.nodes[1].alive = false;
    w.advance(NODE_TIMEOUT + Duration::from_millis(300));
    assert_eq!(w.counter(0, |s| &s.cluster_nodes_gone), 1);
    let mark = w.frames.len();
    w.call(alice, "bob");
    assert_eq!(w.got(alice, mark), vec![], "waiting for bob to move");
    // It comes back: its next heartbeat releases the call to it.
    w.nodes[1].alive = true;
    w.advance(HEARTBEAT_EVERY * 2);
    assert!(w.incoming(bob, mark).is_some(), "the waiting call reached bob on the node that came back");
}

#[test]
fn with_the_engine_down_calls_across_nodes_fail_at_once_calls_within_a_node_go_on_and_it_heals() {
    let mut w = World::new(2);
    let alice = w.register(0, "alice");
    let carol = w.register(0, "carol");
    let bob = w.register(1, "bob");
    w.up = false;
    let now = w.now;
    for n in &mut w.nodes {
        n.bridge.on_connection(now, false);
    }
    let mark = w.frames.len();
    w.call(alice, "bob");
    assert!(
        matches!(w.got(alice, mark).as_slice(), [Frame::Reject { reason: RejectReason::ClusterDown, .. }]),
        "{:?}",
        w.got(alice, mark)
    );
    assert_eq!(w.counter(0, |s| &s.cluster_unavailable), 1);
    let mark = w.frames.len();
    w.call(alice, "carol");
    assert!(w.incoming(carol, mark).is_some(), "a call within the node goes on");

    // A registration while down is written when the engine is back; the engine lost its
    // directory meanwhile (no storage), and every holder writes its entries again.
    let erin = w.register(1, "erin");
    w.kv.clear();
    w.up = true;
    let now = w.now;
    for n in &mut w.nodes {
        n.bridge.on_connection(now, true);
    }
    w.pump();
    assert_eq!(w.kv.len(), 4, "{:?}", w.kv.keys().collect::<Vec<_>>());
    for (callee, conn) in [("bob", bob), ("erin", erin)] {
        let mark = w.frames.len();
        w.call(alice, callee);
        assert!(w.incoming(conn, mark).is_some(), "{callee} reachable after the heal");
    }
}

#[test]
fn garbage_on_a_node_inbox_is_counted_and_dropped() {
    let mut w = World::new(1);
    let now = w.now;
    for bad in [&b""[..], &[1], &[1, 99], &[2, 1, 0], &[1, 4, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]] {
        w.nodes[0].bridge.on_node_msg(now, bad);
    }
    // A message for a shard the node does not have.
    let m = NodeMsg::Shard {
        shard: 40,
        msg: ShardMsg::PartyGone { call_id: CallId(1), conn: proto::shard::ConnRef { node: 1, shard: 0, id: 1 } },
    };
    w.nodes[0].bridge.on_node_msg(now, &m.encode().unwrap());
    w.pump();
    assert_eq!(w.counter(0, |s| &s.cluster_malformed), 6);
}
