//! NAT classification and the strategy it leads to, end to end in virtual time: real
//! clients ask the manager's main and alternate STUN ports through simulated NATs, classify
//! themselves, tell the manager at REGISTER, and the manager picks each call's strategy from
//! both classes (refusing at once the calls no relay-free path can carry).

use std::sync::atomic::Ordering;
use std::time::Duration;

use proto::client::{EndReason, Role};
use proto::nat::{NatClass, Strategy};
use proto::wire::frame::{Frame, RejectReason};
use sim::{Net, Plan, Sim, SimNat, MANAGER_UDP, MANAGER_UDP_ALT};

#[test]
fn each_client_classifies_its_nat_and_registers_with_the_class() {
    let mut sim = Sim::new(11, 2, Net::default());
    let cases = [
        (SimNat::None, NatClass::EndpointIndependent),
        (SimNat::EndpointIndependent, NatClass::EndpointIndependent),
        (SimNat::Sequential(1), NatClass::Sequential { delta: 1 }),
        (SimNat::Sequential(-3), NatClass::Sequential { delta: -3 }),
        (SimNat::Random, NatClass::Random),
    ];
    let idx: Vec<usize> = cases
        .iter()
        .enumerate()
        .map(|(k, (nat, _))| sim.add_behind(&format!("c{k}"), *nat, Plan::Listen, |_| {}))
        .collect();
    sim.run_until(Duration::from_secs(1));
    for (&i, (nat, want)) in idx.iter().zip(cases) {
        let c = &sim.clients[i];
        assert!(c.client.is_registered(), "{nat:?}");
        assert_eq!(c.client.nat_class(), want, "{nat:?}");
        // Both of the manager's STUN ports were asked, and the public address registered is
        // the mapping towards the main port.
        assert!(nat == SimNat::None || c.mappings.contains_key(&(c.udp, MANAGER_UDP_ALT)), "{nat:?}");
        let main = if nat == SimNat::None { c.udp } else { c.mappings[&(c.udp, MANAGER_UDP)] };
        assert_eq!(c.client.public_addr(), Some(main), "{nat:?}");
    }
    // Registration waited one round trip more than before classification: STUN at 0, its
    // answer at 20 ms, the alternate's at 40 ms, REGISTER there, REGISTERED at 50 ms.
    let registered = sim.frame_times(idx[0], |f| matches!(f, Frame::Registered { .. }));
    assert_eq!(registered, vec![Duration::from_millis(50)]);
    assert_eq!(sim.stats.stun_alt_requests.load(Ordering::Relaxed), 5);
}

#[test]
fn without_an_alternate_answer_the_class_is_unknown_and_registration_waits_little() {
    // The alternate port's answers are lost: the client asks twice (at 20 and 70 ms), waiting
    // 2 x RTT + 10 ms (50 ms) each time, then registers with the class unknown at 120 ms:
    // REGISTERED 10 ms later.
    let mut sim = Sim::new(12, 1, Net::default());
    sim.datagram_filter = Some(Box::new(|from, _, _| from != MANAGER_UDP_ALT));
    let a = sim.add_behind("a", SimNat::Random, Plan::Listen, |_| {});
    sim.run_until(Duration::from_secs(1));
    assert_eq!(sim.clients[a].client.nat_class(), NatClass::Unknown);
    assert_eq!(sim.frame_times(a, |f| matches!(f, Frame::Registered { .. })), vec![Duration::from_millis(130)]);
}

#[test]
fn random_against_random_is_refused_at_once_with_the_reason_and_counted() {
    let mut sim = Sim::new(13, 2, Net::default());
    let b = sim.add_behind("bob", SimNat::Random, Plan::Listen, |_| {});
    let a = sim.add_behind("alice", SimNat::Random, Plan::call("bob", 300, 2000), |_| {});
    sim.run_until(Duration::from_secs(2));
    let ra = &sim.reports(a)[0];
    assert_eq!(ra.reason, EndReason::Rejected(RejectReason::NoPath), "{ra:#?}");
    assert_eq!((ra.nat, ra.peer_nat, ra.strategy), (NatClass::Random, NatClass::Random, Strategy::NoPath));
    // CALL at 300 ms, REJECT 10 ms later: no INCOMING, no probe, nothing sent to bob.
    let rejected = sim.frame_times(a, |f| matches!(f, Frame::Reject { reason: RejectReason::NoPath, .. }));
    assert_eq!(rejected, vec![Duration::from_millis(310)]);
    assert!(sim.reports(b).is_empty());
    assert!(sim.frame_times(b, |f| matches!(f, Frame::Incoming { .. })).is_empty());
    assert_eq!(sim.stats.calls_no_path.load(Ordering::Relaxed), 1);
    assert_eq!(sim.stats.calls_rejected.load(Ordering::Relaxed), 1);
    assert_eq!(sim.stats.calls_direct.load(Ordering::Relaxed), 0);
    assert_eq!(sim.stats.by_strategy.get(Strategy::NoPath, proto::shard::stats::CallOutcome::Refused), 1);
    assert_eq!(sim.owned_calls(), 0);
}

#[test]
fn calls_between_easy_nats_connect_and_each_side_learns_the_others_class() {
    let mut sim = Sim::new(14, 2, Net::default());
    let b = sim.add_behind("bob", SimNat::EndpointIndependent, Plan::Listen, |_| {});
    let a = sim.add_behind("alice", SimNat::Random, Plan::call("bob", 300, 1000), |_| {});
    let c = sim.add_behind("carol", SimNat::EndpointIndependent, Plan::call("bob", 300, 1000), |_| {});
    sim.run_until(Duration::from_secs(40));
    // carol -> bob: both endpoint-independent, direct, two-way media.
    let rc = &sim.reports(c)[0];
    assert!(rc.succeeded(), "{rc:#?}");
    assert_eq!(
        (rc.role, rc.nat, rc.peer_nat, rc.strategy),
        (Role::Caller, NatClass::EndpointIndependent, NatClass::EndpointIndependent, Strategy::Direct)
    );
    // alice (random) -> bob: the manager passes each side the other's class, and both pick
    // the birthday search; bob's report names alice's class.
    let rb: Vec<_> = sim.reports(b).iter().filter(|r| r.peer_id.as_str() == "alice").collect();
    assert_eq!(rb.len(), 1);
    assert_eq!(
        (rb[0].nat, rb[0].peer_nat, rb[0].strategy),
        (NatClass::EndpointIndependent, NatClass::Random, Strategy::Birthday)
    );
    assert_eq!(sim.reports(a)[0].peer_nat, NatClass::EndpointIndependent);
    assert_eq!(sim.reports(a)[0].strategy, Strategy::Birthday);
    assert_eq!(sim.stats.calls_direct.load(Ordering::Relaxed), 1);
    assert_eq!(sim.stats.calls_birthday.load(Ordering::Relaxed), 1);
    let _ = EndReason::LocalHangup;
}
