//! The manager's shard core in virtual time (the `sim` crate: real shards, the real STUN
//! responder, real clients): duplicate and reordered frames, busy and unknown callees, STUN
//! bindings held by one shard and used by a registration on another, admission over all
//! shards, and registration tokens checked against the wall clock the shards are given.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proto::auth::Secret;
use proto::client::{CallReport, EndReason};
use proto::shard::ShardConfig;
use proto::wire::frame::{AddrSource, ClientId, Frame, HangupReason};
use sim::{Net, Plan, Sim};

fn only(r: &[CallReport]) -> &CallReport {
    assert_eq!(r.len(), 1, "expected exactly one call report, got {r:#?}");
    &r[0]
}

#[test]
fn duplicate_frames_do_not_create_duplicate_calls() {
    let mut sim = Sim::new(6, 2, Net::default());
    let b = sim.add("bob", Plan::Listen, |_| {});
    let a = sim.add("alice", Plan::call("bob", 300, 2000), |_| {});
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
    let b = sim.add("bob", Plan::Listen, |c| c.first_media_timeout = Duration::from_millis(500));
    let a = sim.add("alice", Plan::call("bob", 300, 2000), |c| c.start_timeout = Duration::from_millis(400));
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
fn busy_and_unknown_callees_fail_with_their_reason() {
    let mut sim = Sim::new(11, 2, Net::default());
    let b = sim.add("bob", Plan::Listen, |c| c.max_calls = 1);
    let a1 = sim.add("a1", Plan::call("bob", 300, 3000), |_| {});
    let a2 = sim.add("a2", Plan::call("bob", 400, 3000), |_| {});
    let a3 = sim.add("a3", Plan::call("nobody", 300, 3000), |_| {});
    sim.run_until(Duration::from_secs(5));
    assert_eq!(only(sim.reports(a1)).reason, EndReason::LocalHangup);
    assert_eq!(only(sim.reports(a2)).reason, EndReason::Busy);
    assert_eq!(only(sim.reports(a3)).reason, EndReason::Unknown(proto::wire::frame::UnknownReason::NeverRegistered));
    assert_eq!(sim.reports(b).len(), 1);
}

/// Sources of every REGISTERED the clients received.
fn watch_registered(sim: &mut Sim) -> std::rc::Rc<std::cell::RefCell<Vec<AddrSource>>> {
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let s = seen.clone();
    sim.to_client_filter = Some(Box::new(move |f| {
        if let Frame::Registered { source, .. } = f {
            s.borrow_mut().push(*source);
        }
        1
    }));
    seen
}

#[test]
fn a_binding_held_by_one_shard_serves_a_registration_on_another() {
    // Twelve clients on three shards: a client's binding lands on the shard its STUN
    // transaction id picks, its connection on another, its id's home on a third. Every
    // registration must still get the address the STUN request came from, and every
    // binding be used up.
    let mut sim = Sim::new(12, 3, Net::default());
    let seen = watch_registered(&mut sim);
    let ids: Vec<usize> = (0..12).map(|k| sim.add(&format!("c{k}"), Plan::Listen, |_| {})).collect();
    sim.run_until(Duration::from_secs(2));
    assert_eq!(*seen.borrow(), vec![AddrSource::Stun; 12], "every client registered with its STUN binding");
    for &i in &ids {
        assert_eq!(sim.clients[i].client.public_addr(), Some(sim.clients[i].udp));
    }
    assert_eq!(sim.stats.stun_requests.load(Ordering::Relaxed), 12);
    assert_eq!(sim.bindings(), 0, "each binding was taken by its registration");
}

#[test]
fn a_registration_whose_binding_is_unknown_falls_back_to_the_tcp_peer() {
    // The STUN answers never arrive (dropped on their way back), so the client registers
    // without a binding after its STUN attempts: the manager uses the TCP peer's address.
    let mut sim = Sim::new(13, 2, Net::default());
    sim.datagram_filter = Some(Box::new(|from, _, _| from != sim::MANAGER_UDP));
    let seen = watch_registered(&mut sim);
    let a = sim.add("a", Plan::Listen, |_| {});
    sim.run_until(Duration::from_secs(5));
    assert_eq!(*seen.borrow(), vec![AddrSource::TcpPeer]);
    assert_eq!(sim.clients[a].client.public_addr(), Some(sim.clients[a].udp));
    // The answered requests' bindings wait in their shard until they expire.
    assert!(sim.bindings() >= 1);
    sim.run_until(Duration::from_secs(45));
    assert_eq!(sim.bindings(), 0, "expired bindings are purged by the shards' ticks");
}

#[test]
fn admission_counts_the_connections_of_every_shard() {
    let cfg = ShardConfig { max_connections: 4, ..ShardConfig::default() };
    let mut sim = Sim::with_config(14, 3, Net::default(), cfg);
    for k in 0..6 {
        sim.add(&format!("c{k}"), Plan::Listen, |_| {});
    }
    sim.run_until(Duration::from_secs(1));
    assert_eq!(sim.stats.connections_refused.load(Ordering::Relaxed), 2, "4 admitted over 3 shards, 2 refused");
    assert_eq!(sim.stats.registrations.load(Ordering::Relaxed), 4);
}

#[test]
fn registration_tokens_expire_in_the_wall_clock_the_shards_are_given() {
    let secret = Arc::new(Secret::new(vec![7u8; 32]).unwrap());
    let cfg = ShardConfig { secret: Some(secret.clone()), ..ShardConfig::default() };
    let mut sim = Sim::with_config(15, 2, Net::default(), cfg);
    // Valid for the first minute of the run.
    let token = |id: &str| Some(secret.mint(&ClientId::new(id).unwrap(), sim::UNIX_START + 60));
    let early = sim.add("early", Plan::Listen, |c| c.auth = token("early"));
    sim.run_until(Duration::from_secs(61));
    let late = sim.add("late", Plan::Listen, |c| c.auth = token("late"));
    sim.run_until(Duration::from_secs(63));
    assert!(sim.clients[early].client.is_registered());
    assert!(!sim.clients[late].client.is_registered());
    assert_eq!(sim.stats.auth_expired.load(Ordering::Relaxed), 1);
    assert_eq!(sim.stats.registrations.load(Ordering::Relaxed), 1);
}
