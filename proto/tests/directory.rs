//! The manager's directory stays bounded, in virtual time: real shards driven by hand (no
//! network), their messages delivered at once. A tombstone (the entry of an id whose
//! connection closed) answers callers UNKNOWN `Offline` until it is `tombstone_ttl` old or
//! one too many for `max_tombstones` (oldest first); then the id is unknown
//! (`NeverRegistered`). An id that registered again is not forgotten by its old death, and a
//! flood of ids that register and close leaves at most `max_tombstones` entries.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::nat::NatClass;
use proto::shard::stats::Stats;
use proto::shard::{Output, Shard, ShardConfig, ShardInit, ShardMsg};
use proto::wire::frame::{ClientId, Frame, UnknownReason};

/// A connection: its shard and its id there.
type Conn = (u16, u64);

/// What a CALL got.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// UNKNOWN with this reason.
    Unknown(UnknownReason),
    /// The callee was rung (INCOMING reached it).
    Rung,
}

/// Shards of one manager, a clock, and the frames they wrote.
struct Manager {
    shards: Vec<Shard>,
    stats: Arc<Stats>,
    t0: Instant,
    now: Instant,
    frames: Vec<(Conn, Frame)>,
    opened: u64,
}

impl Manager {
    fn new(n: u16, cfg: ShardConfig) -> Manager {
        let stats = Arc::new(Stats::default());
        let shards = (0..n)
            .map(|index| {
                let init = ShardInit { index, n, seed: 1, token_key: [7; 32], unix_secs: 1_000_000, node: 0 };
                Shard::new(init, cfg.clone(), stats.clone())
            })
            .collect();
        let t0 = Instant::now();
        Manager { shards, stats, t0, now: t0, frames: Vec::new(), opened: 0 }
    }

    /// Deliver every output until all shards are quiet.
    fn pump(&mut self) {
        loop {
            let mut msgs: Vec<(u16, ShardMsg)> = Vec::new();
            let mut closes: Vec<Conn> = Vec::new();
            for (i, s) in self.shards.iter_mut().enumerate() {
                while let Some(o) = s.poll_output() {
                    match o {
                        Output::Frame { conn, frame } => self.frames.push(((i as u16, conn), frame)),
                        Output::Close { conn } => closes.push((i as u16, conn)),
                        Output::Shard { to, msg } => msgs.push((to, msg)),
                        Output::Cluster(o) => unreachable!("a shard without a node id has no cluster output: {o:?}"),
                    }
                }
            }
            if msgs.is_empty() && closes.is_empty() {
                return;
            }
            for (to, msg) in msgs {
                self.shards[to as usize].handle_msg(self.now, msg);
            }
            for (s, c) in closes {
                self.shards[s as usize].conn_closed(self.now, c);
            }
        }
    }

    /// A new connection that registers `id`; it is REGISTERED.
    fn register(&mut self, id: &str) -> Conn {
        let shard = (self.opened % self.shards.len() as u64) as u16;
        self.opened += 1;
        let peer: SocketAddr =
            format!("198.51.100.{}:{}", 1 + self.opened % 200, 10_000 + self.opened % 50_000).parse().unwrap();
        let conn = self.shards[shard as usize].conn_opened(self.now, peer, 0);
        let f = Frame::Register {
            id: ClientId::new(id).unwrap(),
            udp_port: 5004,
            max_calls: 4,
            binding: None,
            auth: None,
            nat: NatClass::Unknown,
            candidates: Vec::new(),
        };
        self.shards[shard as usize].conn_frame(self.now, conn, f);
        self.pump();
        assert!(
            self.frames.iter().any(|(c, f)| *c == (shard, conn) && matches!(f, Frame::Registered { .. })),
            "{id} registered"
        );
        (shard, conn)
    }

    /// The connection closes (the client hung up).
    fn close(&mut self, (s, c): Conn) {
        assert!(self.shards[s as usize].conn_closed(self.now, c));
        self.pump();
    }

    /// `id` registers on a connection that then closes: a tombstone.
    fn register_and_close(&mut self, id: &str) {
        let c = self.register(id);
        self.close(c);
    }

    /// `from` calls `callee`: UNKNOWN, or rung.
    fn call(&mut self, from: Conn, callee: &str) -> Answer {
        let mark = self.frames.len();
        let f = Frame::Call { call_ref: 9, callee: ClientId::new(callee).unwrap(), keys: None };
        self.shards[from.0 as usize].conn_frame(self.now, from.1, f);
        self.pump();
        let new = &self.frames[mark..];
        if let Some(reason) = new.iter().find_map(|(c, f)| match f {
            Frame::Unknown { reason, .. } if *c == from => Some(*reason),
            _ => None,
        }) {
            return Answer::Unknown(reason);
        }
        assert!(new.iter().any(|(_, f)| matches!(f, Frame::Incoming { .. })), "neither UNKNOWN nor INCOMING: {new:?}");
        Answer::Rung
    }

    /// Let `d` pass, ticking every shard every 250 ms as the manager does.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now = (self.now + Duration::from_millis(250)).min(end);
            let unix = 1_000_000 + self.now.duration_since(self.t0).as_secs();
            for s in &mut self.shards {
                s.handle_tick(self.now, unix);
            }
            self.pump();
        }
    }

    fn entries(&self) -> usize {
        self.shards.iter().map(|s| s.directory_entries()).sum()
    }

    fn tombstones(&self) -> usize {
        self.shards.iter().map(|s| s.tombstones()).sum()
    }

    fn count(&self, c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// The gauges agree with the shards.
    fn check_gauges(&self) {
        assert_eq!(self.count(&self.stats.directory_entries), self.entries() as u64);
        assert_eq!(self.count(&self.stats.directory_tombstones), self.tombstones() as u64);
    }
}

fn config(ttl_secs: u64, max_tombstones: usize) -> ShardConfig {
    ShardConfig {
        tombstone_ttl: Duration::from_secs(ttl_secs),
        max_tombstones,
        // The caller's connection stays open however long the test's clock runs.
        idle_timeout: Duration::from_secs(100_000),
        ..ShardConfig::default()
    }
}

const OFFLINE: Answer = Answer::Unknown(UnknownReason::Offline);
const FORGOTTEN: Answer = Answer::Unknown(UnknownReason::NeverRegistered);

#[test]
fn a_tombstone_answers_offline_until_its_ttl_then_the_id_is_unknown() {
    let mut m = Manager::new(2, config(60, 1000));
    let alice = m.register("alice");
    assert_eq!(m.call(alice, "nobody"), FORGOTTEN);
    m.register_and_close("bob");
    assert_eq!((m.entries(), m.tombstones()), (2, 1));
    assert_eq!(m.call(alice, "bob"), OFFLINE);
    m.advance(Duration::from_secs(59));
    assert_eq!(m.call(alice, "bob"), OFFLINE, "not yet its TTL");
    m.advance(Duration::from_secs(2));
    assert_eq!(m.call(alice, "bob"), FORGOTTEN, "past its TTL, bob is unknown");
    assert_eq!((m.entries(), m.tombstones()), (1, 0), "alice, live, stays");
    assert_eq!(m.count(&m.stats.tombstones_expired), 1);
    assert_eq!(m.count(&m.stats.tombstones_evicted), 0);
    m.check_gauges();
    // A live id is never expired, however long it stays.
    m.advance(Duration::from_secs(600));
    let carol = m.register("carol");
    assert_eq!(m.call(carol, "alice"), Answer::Rung);
}

#[test]
fn past_max_tombstones_the_oldest_is_forgotten_first() {
    let mut m = Manager::new(1, config(600, 3));
    let alice = m.register("alice");
    for id in ["a", "b", "c"] {
        m.register_and_close(id);
        m.advance(Duration::from_secs(1));
    }
    assert_eq!(m.count(&m.stats.tombstones_evicted), 0);
    m.register_and_close("d");
    assert_eq!(m.count(&m.stats.tombstones_evicted), 1);
    assert_eq!(m.call(alice, "a"), FORGOTTEN, "the oldest death goes first");
    for id in ["b", "c", "d"] {
        assert_eq!(m.call(alice, id), OFFLINE, "{id}");
    }
    assert_eq!((m.entries(), m.tombstones()), (4, 3));
    m.check_gauges();
    // Live entries do not count against the bound: they are bounded by the connections.
    let live: Vec<Conn> = (0..10).map(|k| m.register(&format!("live{k}"))).collect();
    assert_eq!(m.tombstones(), 3);
    assert_eq!(m.count(&m.stats.tombstones_evicted), 1);
    for c in live {
        m.close(c);
    }
    assert_eq!(m.tombstones(), 3, "closing them evicts older tombstones instead");
    assert_eq!(m.count(&m.stats.tombstones_evicted), 11);
    m.check_gauges();
}

#[test]
fn an_id_that_registered_again_is_not_forgotten_by_its_old_death() {
    let mut m = Manager::new(1, config(60, 2));
    let alice = m.register("alice");
    // x dies at 0 s (death 1) and comes back at 10 s: death 1's record is now stale.
    m.register_and_close("x");
    m.advance(Duration::from_secs(10));
    let x = m.register("x");
    // Three more deaths: two are over the bound of 2, so two records are taken from the
    // front: x's stale one (skipped: x is live) and a's.
    for id in ["a", "b", "c"] {
        m.register_and_close(id);
    }
    assert_eq!(m.call(alice, "x"), Answer::Rung, "x is live, not evicted by its old death");
    assert_eq!(m.call(alice, "a"), FORGOTTEN);
    assert_eq!(m.call(alice, "b"), OFFLINE);
    assert_eq!(m.count(&m.stats.tombstones_evicted), 1);
    // Nor does its old death expire it: at 61 s the record of death 1 is reached, x is live.
    m.advance(Duration::from_secs(51));
    assert_eq!(m.call(alice, "x"), Answer::Rung);
    // x dies again at 61 s (a new death; b goes, over the bound): its tombstone lives 60 s
    // from then, though the first death was 61 s ago.
    m.close(x);
    assert_eq!(m.call(alice, "x"), OFFLINE);
    assert_eq!(m.count(&m.stats.tombstones_evicted), 2, "a, then b");
    m.advance(Duration::from_secs(59));
    assert_eq!(m.call(alice, "x"), OFFLINE, "59 s after its second death");
    assert_eq!(m.call(alice, "c"), FORGOTTEN, "70 s after its death");
    m.advance(Duration::from_secs(2));
    assert_eq!(m.call(alice, "x"), FORGOTTEN);
    assert_eq!(m.count(&m.stats.tombstones_expired), 2, "c, then x");
    assert_eq!((m.entries(), m.tombstones()), (1, 0));
    m.check_gauges();
}

#[test]
fn an_id_dying_again_is_evicted_by_its_newest_death_not_its_first() {
    let mut m = Manager::new(1, config(600, 2));
    let alice = m.register("alice");
    m.register_and_close("x"); // death 1
    m.register_and_close("y"); // death 2
    m.register_and_close("x"); // death 3: x's record 1 is stale
                               // Over the bound: record 1 (stale) is skipped, y (death 2) goes.
    m.register_and_close("z");
    assert_eq!(m.call(alice, "y"), FORGOTTEN);
    assert_eq!(m.call(alice, "x"), OFFLINE);
    assert_eq!(m.call(alice, "z"), OFFLINE);
    assert_eq!(m.count(&m.stats.tombstones_evicted), 1);
}

#[test]
fn a_flood_of_ids_that_register_and_close_leaves_at_most_max_tombstones() {
    const MAX: usize = 100;
    let mut m = Manager::new(2, config(600, MAX));
    let alice = m.register("alice");
    for k in 0..10 * MAX {
        m.register_and_close(&format!("flood-{k}"));
        // Each shard keeps its share (50): never more than MAX over both, plus alice.
        assert!(m.tombstones() <= MAX, "after {k}: {} tombstones", m.tombstones());
        assert!(m.entries() <= MAX + 1);
    }
    assert_eq!(m.tombstones(), MAX, "both shards full (ids hash to both)");
    assert_eq!(m.count(&m.stats.tombstones_evicted), (9 * MAX) as u64);
    m.check_gauges();
    // The newest are the ones remembered.
    assert_eq!(m.call(alice, &format!("flood-{}", 10 * MAX - 1)), OFFLINE);
    assert_eq!(m.call(alice, "flood-0"), FORGOTTEN);
    // One id registering and closing again and again leaves one tombstone, and its stale
    // death records do not pile up.
    for _ in 0..10_000 {
        m.register_and_close("again");
    }
    assert!(m.tombstones() <= MAX);
    let records: usize = m.shards.iter().map(|s| s.death_records()).sum();
    assert!(records <= 2 * MAX + 2 * 1024 + 2, "{records} death records");
    // Past the TTL everything but alice is forgotten.
    m.advance(Duration::from_secs(601));
    assert_eq!((m.entries(), m.tombstones()), (1, 0));
    let records: usize = m.shards.iter().map(|s| s.death_records()).sum();
    assert_eq!(records, 0);
    m.check_gauges();
}

#[test]
fn with_max_tombstones_zero_an_id_is_forgotten_when_its_connection_closes() {
    let mut m = Manager::new(2, config(600, 0));
    let alice = m.register("alice");
    m.register_and_close("bob");
    assert_eq!(m.call(alice, "bob"), FORGOTTEN);
    assert_eq!((m.entries(), m.tombstones()), (1, 0));
    m.check_gauges();
}
