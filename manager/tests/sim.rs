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
use proto::wire::frame::{AddrSource, ClientId, ErrorCode, Frame, HangupReason, RejectReason};
use sim::{Fate, Net, Plan, Sim};

fn only(r: &[CallReport]) -> &CallReport {
    assert_eq!(r.len(), 1, "expected exactly one call report, got {r:#?}");
    &r[0]
}

#[test]
fn duplicate_frames_do_not_create_duplicate_calls() {
    let mut sim = Sim::new(6, 2, Net::default());
    let b = sim.add("bob", Plan::Listen, |_| {});
    let a = sim.add("alice", Plan::call("bob", 300, 2000), |_| {});
    sim.to_client_filter = Some(Box::new(|_| Fate::Duplicate)); // every frame to a client arrives twice
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
    // Reorder: START is held back by a second, so the caller gives up first (start timeout
    // 400 ms, at 0.7 s), the callee's HANGUP (first-media timeout 500 ms, at 0.81 s) reaches
    // it next, and START last (1.32 s). The late START must not resurrect the call: the
    // caller answers it with HANGUP Timeout, which the manager (whose call is over) counts
    // as a hangup of an unknown call.
    let mut sim = Sim::new(7, 1, Net::default());
    let b = sim.add("bob", Plan::Listen, |c| c.first_media_timeout = Duration::from_millis(500));
    let a = sim.add("alice", Plan::call("bob", 300, 2000), |c| c.start_timeout = Duration::from_millis(400));
    let order = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen = order.clone();
    sim.to_client_filter = Some(Box::new(move |f| match f {
        Frame::Start { .. } => {
            seen.borrow_mut().push("START");
            Fate::Delay(Duration::from_secs(1))
        }
        Frame::Hangup { .. } => {
            seen.borrow_mut().push("HANGUP");
            Fate::Deliver
        }
        _ => Fate::Deliver,
    }));
    sim.run_until(Duration::from_secs(5));
    assert_eq!(*order.borrow(), ["START", "HANGUP"], "the manager sent START first");
    let (ra, rb) = (only(sim.reports(a)), only(sim.reports(b)));
    assert_eq!(ra.reason, EndReason::NoStart);
    assert_eq!(ra.sent, 0, "no media for a call given up");
    assert_eq!(rb.reason, EndReason::NoMedia);
    let alice = &sim.clients[a].client;
    assert_eq!(alice.active_calls(), 0, "the late START did not bring the call back");
    assert_eq!(alice.counters().frames_unexpected, 2, "the HANGUP and the late START were unexpected");
    assert_eq!(sim.stats.hangups_unknown_call.load(Ordering::Relaxed), 1, "alice's HANGUP for the late START");
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
        Fate::Deliver
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
    // One request to the main port and one to the alternate (NAT classification) each; only
    // the main port's are bindings.
    assert_eq!(sim.stats.stun_requests.load(Ordering::Relaxed), 24);
    assert_eq!(sim.stats.stun_alt_requests.load(Ordering::Relaxed), 12);
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

// The shard's timers, at exact virtual times. The shards tick every 250 ms from the start, so
// a deadline is noticed at the first tick at or after it; frames take 5 ms to arrive.

#[test]
fn a_connection_that_never_registers_is_closed_at_the_register_timeout() {
    let mut sim = Sim::new(17, 2, Net::default());
    let mute = sim.connect_mute(1);
    sim.run_until(Duration::from_secs(12));
    let log: Vec<_> = sim.to_mutes.iter().filter(|(_, k, _)| *k == mute).collect();
    // ERROR Timeout at the 10 s tick (+5 ms on the way), then the close.
    assert_eq!(log.len(), 2, "{log:?}");
    let error = log.iter().find(|(_, _, f)| f.is_some()).expect("an ERROR");
    assert_eq!(error.0, Duration::from_millis(10_005));
    assert!(matches!(error.2, Some(Frame::Error { code: ErrorCode::Timeout, .. })), "{error:?}");
    assert!(log.iter().any(|(t, _, f)| f.is_none() && *t == Duration::from_millis(10_005)), "closed with it");
    assert_eq!(sim.stats.connections_timed_out.load(Ordering::Relaxed), 1);
}

#[test]
fn a_registered_connection_that_falls_silent_is_closed_at_the_idle_timeout() {
    let mut sim = Sim::new(18, 2, Net::default());
    // No PINGs: after REGISTER the client sends nothing more.
    let a = sim.add("quiet", Plan::Listen, |c| c.ping_interval = Duration::from_secs(3600));
    sim.run_until(Duration::from_secs(50));
    let registered = sim.frame_times(a, |f| matches!(f, Frame::Registered { .. }));
    let kicked = sim.frame_times(a, |f| matches!(f, Frame::Error { code: ErrorCode::Timeout, .. }));
    assert_eq!((registered.len(), kicked.len()), (1, 1), "{:?}", sim.to_clients);
    // REGISTER reached the manager 5 ms before REGISTERED left it, 10 ms before it arrived;
    // the idle deadline is 45 s after that, noticed at the next tick, ERROR 5 ms later.
    let last_rx = registered[0] - Duration::from_millis(10);
    let deadline = last_rx + Duration::from_secs(45);
    let noticed = Duration::from_millis(deadline.as_millis().div_ceil(250) as u64 * 250);
    assert_eq!(kicked[0], noticed + Duration::from_millis(5), "idle deadline {deadline:?}");
    assert_eq!(sim.stats.connections_timed_out.load(Ordering::Relaxed), 1);
}

#[test]
fn a_call_the_callee_never_answers_is_rejected_at_the_ring_timeout() {
    // The callee's INCOMING is lost, so it never sends PUNCHED: after 4 s the manager tells
    // the caller REJECT Timeout (before the caller's own 5 s START timeout) and the callee
    // HANGUP Timeout.
    let mut sim = Sim::new(19, 2, Net::default());
    sim.to_client_filter =
        Some(Box::new(|f| if matches!(f, Frame::Incoming { .. }) { Fate::Drop } else { Fate::Deliver }));
    let b = sim.add("bob", Plan::Listen, |_| {});
    let a = sim.add("alice", Plan::call("bob", 300, 2000), |_| {});
    sim.run_until(Duration::from_secs(8));
    // CALL left alice at 300 ms and reached the manager at 305 ms: ringing until 4.305 s,
    // noticed at the 4.5 s tick, delivered 5 ms later.
    let rejected = sim.frame_times(a, |f| matches!(f, Frame::Reject { reason: RejectReason::Timeout, .. }));
    assert_eq!(rejected, [Duration::from_millis(4_505)]);
    let hung_up = sim.frame_times(b, |f| matches!(f, Frame::Hangup { reason: HangupReason::Timeout, .. }));
    assert_eq!(hung_up, [Duration::from_millis(4_505)]);
    assert_eq!(only(sim.reports(a)).reason, EndReason::Rejected(RejectReason::Timeout));
    assert_eq!(sim.stats.calls_ring_timeout.load(Ordering::Relaxed), 1);
    assert_eq!(sim.owned_calls(), 0);
}

#[test]
fn a_connection_that_closes_while_its_registration_is_resolved_elsewhere_leaves_the_id_offline() {
    // Clients whose connection closes the moment their REGISTER reached the manager. A
    // REGISTER naming a STUN binding travels through the binding's shard before it reaches
    // the id's home; the close's Unregister must not overtake it there, or the directory
    // keeps pointing at the closed connection: a call to the id then rings a dead
    // connection (REJECT CalleeGone) instead of being told the id is offline.
    let mut sim = Sim::new(20, 3, Net::default());
    let elsewhere = std::rc::Rc::new(std::cell::Cell::new(0));
    let seen = elsewhere.clone();
    sim.close_after = Some(Box::new(move |client, f| match f {
        Frame::Register { binding: Some(tx), .. } if client < 12 => {
            // (Shard of the connection: the sim puts client i on shard i % 3.)
            if proto::shard::bindings::binding_shard(tx, 3) != (client % 3) as u16 {
                seen.set(seen.get() + 1);
            }
            true
        }
        _ => false,
    }));
    for k in 0..12 {
        sim.add(&format!("gone{k}"), Plan::Listen, |_| {});
    }
    let callers: Vec<usize> =
        (0..12).map(|k| sim.add(&format!("caller{k}"), Plan::call(&format!("gone{k}"), 2000, 500), |_| {})).collect();
    sim.run_until(Duration::from_secs(4));
    assert!(elsewhere.get() >= 4, "only {} of 12 bindings on another shard: the case is not covered", elsewhere.get());
    for (k, &a) in callers.iter().enumerate() {
        let r = only(sim.reports(a));
        assert_eq!(r.reason, EndReason::Unknown(proto::wire::frame::UnknownReason::Offline), "gone{k}: {r:?}");
    }
    assert_eq!(sim.stats.calls_rejected.load(Ordering::Relaxed), 0);
}
