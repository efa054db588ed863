//! Candidate addresses end to end in virtual time (real clients, the real manager shards):
//! which addresses the manager passes on, and the strategy that follows. IPv4 host addresses
//! go only to a party behind the same public IP; IPv6 addresses whenever both parties have
//! some (the call is then direct whatever the IPv4 NATs); a port mapping on another IP than
//! the observed one is an inner router's and is ignored.

use std::sync::atomic::Ordering;
use std::time::Duration;

use proto::nat::NatClass;
use proto::wire::frame::{AddrSource, Candidate, CandidateKind, Frame};
use sim::{Net, Plan, Sim, SimNat};

fn addr(s: &str) -> std::net::SocketAddr {
    s.parse().unwrap()
}

/// The candidates of the INCOMING client `i` received, and of the START.
fn relayed(sim: &Sim, callee: usize, caller: usize) -> (Vec<Candidate>, Vec<Candidate>) {
    let incoming = sim
        .to_clients
        .iter()
        .find_map(|(_, c, f)| match f {
            Frame::Incoming { caller_candidates, .. } if *c == callee => Some(caller_candidates.clone()),
            _ => None,
        })
        .expect("an INCOMING reached the callee");
    let start = sim
        .to_clients
        .iter()
        .find_map(|(_, c, f)| match f {
            Frame::Start { callee_candidates, .. } if *c == caller => Some(callee_candidates.clone()),
            _ => None,
        })
        .expect("a START reached the caller");
    (incoming, start)
}

#[test]
fn ipv4_host_addresses_stay_home_but_ipv6_ones_travel_when_both_have_them() {
    let mut sim = Sim::new(31, 2, Net::default());
    // Different NATs (different public IPs), each with a LAN address and an IPv6 address.
    let b = sim.add_behind("bob", SimNat::EndpointIndependent, Plan::Listen, |c| {
        c.host_candidates = vec![addr("10.0.1.2:40000"), addr("[2001:db8:2::2]:40000")]
    });
    let a = sim.add_behind("alice", SimNat::EndpointIndependent, Plan::call("bob", 300, 200), |c| {
        c.host_candidates = vec![addr("10.0.0.2:40000"), addr("[2001:db8:1::2]:40000")]
    });
    sim.run_until(Duration::from_secs(3));
    let (to_callee, to_caller) = relayed(&sim, b, a);
    let host = |s: &str| Candidate { kind: CandidateKind::Host, addr: addr(s) };
    assert_eq!(to_callee, vec![host("[2001:db8:1::2]:40000")], "only the IPv6 address crosses NATs");
    assert_eq!(to_caller, vec![host("[2001:db8:2::2]:40000")]);
    assert_eq!(sim.stats.calls_ipv6.load(Ordering::Relaxed), 1);
    assert_eq!(sim.stats.calls_same_nat.load(Ordering::Relaxed), 0);
}

#[test]
fn two_random_nats_with_ipv6_are_direct_and_without_it_refused() {
    for (v6, want_refused) in [(true, 0), (false, 1)] {
        let mut sim = Sim::new(32, 2, Net::default());
        let cands = |s: &str| if v6 { vec![addr(s)] } else { Vec::new() };
        let (cb, ca) = (cands("[2001:db8:2::2]:40000"), cands("[2001:db8:1::2]:40000"));
        let b = sim.add_behind("bob", SimNat::Random, Plan::Listen, move |c| c.host_candidates = cb);
        let a = sim.add_behind("alice", SimNat::Random, Plan::call("bob", 300, 200), move |c| c.host_candidates = ca);
        sim.run_until(Duration::from_secs(3));
        assert_eq!(sim.stats.calls_no_path.load(Ordering::Relaxed), want_refused, "v6 {v6}");
        if v6 {
            // Both classified random, yet the call went ahead as direct (over IPv6; the
            // simulated network has no IPv6 route, so it ends without media here: the lab
            // carries it, lab/tests/firewall.rs).
            assert_eq!(sim.clients[a].client.nat_class(), NatClass::Random);
            let (to_callee, to_caller) = relayed(&sim, b, a);
            assert_eq!((to_callee.len(), to_caller.len()), (1, 1));
            assert_eq!(sim.stats.calls_direct.load(Ordering::Relaxed), 1);
        }
    }
}

#[test]
fn a_port_mapping_on_another_ip_than_the_observed_one_is_ignored() {
    use proto::shard::stats::Stats;
    use proto::shard::{Output, Shard, ShardConfig, ShardInit};
    // One shard, driven by hand: a REGISTER with a mapping on the observed IP is handed out
    // as the client's address (class `mapped`); one on another IP (an inner router's of a
    // double NAT) is not, and the class falls back to unknown.
    let t0 = std::time::Instant::now();
    for (mapped, want_public, want_source) in [
        ("198.51.100.7:40001", "198.51.100.7:40001", AddrSource::Mapped),
        ("100.64.1.2:40001", "198.51.100.7:5004", AddrSource::TcpPeer),
    ] {
        let stats = std::sync::Arc::new(Stats::default());
        let init = ShardInit { index: 0, n: 1, seed: 1, token_key: [0; 32], unix_secs: 0, node: 0 };
        let mut shard = Shard::new(init, ShardConfig::default(), stats.clone());
        let conn = shard.conn_opened(t0, addr("198.51.100.7:50000"), 0);
        let f = Frame::Register {
            id: proto::wire::ClientId::new("m").unwrap(),
            udp_port: 5004,
            max_calls: 1,
            binding: None,
            auth: None,
            nat: NatClass::Mapped,
            candidates: vec![Candidate { kind: CandidateKind::Mapped, addr: addr(mapped) }],
        };
        shard.conn_frame(t0, conn, f);
        let mut got = None;
        let mut pending: Vec<proto::shard::ShardMsg> = Vec::new();
        for _ in 0..8 {
            for msg in pending.drain(..) {
                shard.handle_msg(t0, msg);
            }
            while let Some(o) = shard.poll_output() {
                match o {
                    Output::Frame { frame: Frame::Registered { public, source }, .. } => got = Some((public, source)),
                    Output::Shard { msg, .. } => pending.push(msg),
                    _ => {}
                }
            }
        }
        assert_eq!(got, Some((addr(want_public), want_source)), "{mapped}");
        let ignored = stats.registrations_mapping_ignored.load(Ordering::Relaxed);
        assert_eq!(ignored, u64::from(want_source != AddrSource::Mapped), "{mapped}");
        assert_eq!(stats.registrations_mapped.load(Ordering::Relaxed), u64::from(want_source == AddrSource::Mapped));
    }
}
