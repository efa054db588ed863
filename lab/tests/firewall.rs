//! Direct calls through real stateful firewalls and NATs (netfilter/conntrack in network
//! namespaces), with the real `manager` and `peer` binaries. One test per router pair runs
//! the six checks; the pairs run side by side in separate labs. Each check uses fresh UDP
//! ports, so conntrack state left by one check cannot help the next.
//!
//! Needs root, iproute2, nftables and conntrack (the README's test command installs them).

use std::time::Duration;

use lab::{Host, Lab, Mode, PeerOutput, R1_WAN, R2_WAN};
use serde_json::Value;

/// Give a just-started listener time to register (about a millisecond in the lab).
fn settle() {
    std::thread::sleep(Duration::from_millis(1000));
}

/// Run `peer` in host `h` with its media socket on `port`.
fn peer(lab: &Lab, h: Host, id: &str, port: u16, args: &[&str]) -> lab::Proc {
    lab.peer(h, id, port, args).expect("start peer")
}

fn one(o: &PeerOutput, who: &str) -> Value {
    assert_eq!(o.calls.len(), 1, "{who}: one JSON call report expected; stderr: {}", o.stderr);
    o.calls[0].clone()
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {v}"))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// One call that must succeed: `callee` (in its host, on its port) listens for one call,
/// then `caller` calls it for `secs` seconds. Both exit 0 and every packet the caller sent (but its last, which may be in flight at the hang-up)
/// reached the callee. Returns (caller's report, callee's report).
fn call_ok(lab: &Lab, caller: (Host, u16), callee: (Host, u16), secs: &str) -> (Value, Value) {
    let bob = peer(lab, callee.0, "callee", callee.1, &["listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer(lab, caller.0, "caller", caller.1, &["call", "callee", "--duration", secs, "--json"]);
    let (oa, ob) = (alice.finish(Duration::from_secs(20)), bob.finish(Duration::from_secs(10)));
    let (ca, cb) = (one(&oa, "caller"), one(&ob, "callee"));
    assert_eq!(oa.code, 0, "caller: {ca} {}", oa.stderr);
    assert_eq!(ob.code, 0, "callee: {cb} {}", ob.stderr);
    // Every packet arrived, except that the caller's last one may still be in flight when
    // the HANGUP it sent right after reaches the callee through the manager (both can be
    // ready in one wake-up of the callee, and the frame is read first).
    let (sent, received) = (u(&ca, "sent"), u(&cb, "received"));
    assert!(received <= sent && received + 1 >= sent, "sent {sent}, received {received}: {ca} {cb}");
    assert_eq!(u(&cb, "lost"), 0, "{cb}");
    (ca, cb)
}

/// Fields of a conntrack line (`key=value` tokens, in order; the reply tuple repeats keys).
fn ct_flow<'a>(table: &'a str, want: &[(&str, &str)]) -> Option<&'a str> {
    table.lines().find(|l| want.iter().all(|(k, v)| l.split_whitespace().any(|t| t == format!("{k}={v}"))))
}

fn check_pair(a: Mode, b: Mode) {
    let lab = Lab::up(a, b).expect("lab up");
    let m = lab.start_manager().expect("manager");
    let pair = format!("{}/{}", a.as_str(), b.as_str());

    // ---- Checks 2, 3, 4: a call succeeds; the null packet's path; the addresses used.
    let r1_before = lab.counters(Host::R1).unwrap();
    let bob = peer(&lab, Host::B, "bob", 41001, &["listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer(&lab, Host::A, "alice", 40001, &["call", "bob", "--duration", "3", "--json"]);
    let (oa, ob) = (alice.finish(Duration::from_secs(20)), bob.finish(Duration::from_secs(10)));
    assert_eq!(oa.code, 0, "{pair} caller: {}", oa.stderr);
    assert_eq!(ob.code, 0, "{pair} callee: {}", ob.stderr);
    let (ca, cb) = (one(&oa, "alice"), one(&ob, "bob"));
    // 2: two-way media with no loss.
    for (who, c) in [("alice", &ca), ("bob", &cb)] {
        assert_eq!(s(c, "result"), "ok", "{pair} {who}: {c}");
        assert!(u(c, "received") >= 140, "{pair} {who} received too little: {c}");
        assert_eq!(u(c, "lost"), 0, "{pair} {who}: {c}");
    }
    // 3: the callee's null packet was dropped by the caller's firewall ...
    let r1_after = lab.counters(Host::R1).unwrap();
    let dropped = r1_after.udp_drop - r1_before.udp_drop;
    assert!(dropped >= 1, "{pair}: the caller's router dropped no UDP: the null packet never arrived");
    assert!(dropped <= u(&cb, "nulls_sent"), "{pair}: r1 dropped {dropped} UDP packets, more than bob's null packets");
    // ... and opened the callee's own: its flow towards the caller's public address is in
    // the callee router's conntrack table.
    let a_pub = s(&ca, "local").to_string();
    let (a_ip, a_port) = a_pub.split_once(':').unwrap();
    let ct_r2 = lab.conntrack_udp(Host::R2).unwrap();
    assert!(
        ct_flow(&ct_r2, &[("src", "10.2.0.2"), ("sport", "41001"), ("dst", a_ip), ("dport", a_port)]).is_some(),
        "{pair}: no conntrack entry for bob's flow to {a_pub} on r2:\n{ct_r2}"
    );
    // 4: the public addresses the manager handed out were learned by STUN and are the ones
    // media used (peers accept media only from the announced address; conntrack on the
    // caller's router shows the translated port of the media flow).
    assert_eq!(s(&ca, "local_source"), "stun", "{pair}: {ca}");
    assert_eq!(s(&cb, "local_source"), "stun", "{pair}: {cb}");
    let want_a_ip = if a.is_nat() { R1_WAN } else { "10.1.0.2" };
    let want_b_ip = if b.is_nat() { R2_WAN } else { "10.2.0.2" };
    assert_eq!(a_ip, want_a_ip, "{pair}: alice's public address");
    assert!(s(&cb, "local").starts_with(&format!("{want_b_ip}:")), "{pair}: bob's public address {cb}");
    assert_eq!(s(&cb, "peer"), a_pub, "{pair}: bob sent to where the manager said alice is");
    assert_eq!(s(&ca, "peer"), s(&cb, "local"), "{pair}: alice sent to where the manager said bob is");
    // Both routers keep the port (or do not translate): each side classified itself as
    // endpoint-independent from its mappings towards the manager's three STUN addresses,
    // learned the other's class, and the call went direct.
    for (who, c) in [("alice", &ca), ("bob", &cb)] {
        assert_eq!(s(c, "nat_class"), "endpoint-independent", "{pair} {who}: {c}");
        assert_eq!(s(c, "peer_nat_class"), "endpoint-independent", "{pair} {who}: {c}");
        assert_eq!(s(c, "strategy"), "direct", "{pair} {who}: {c}");
    }
    let b_pub = s(&cb, "local").to_string();
    let (b_ip, b_port) = b_pub.split_once(':').unwrap();
    let ct_r1 = lab.conntrack_udp(Host::R1).unwrap();
    let flow = ct_flow(&ct_r1, &[("src", "10.1.0.2"), ("sport", "40001"), ("dst", b_ip), ("dport", b_port)])
        .unwrap_or_else(|| panic!("{pair}: no conntrack entry for alice's media flow on r1:\n{ct_r1}"));
    // The reply tuple (second half) is addressed to alice's public address.
    let reply: Vec<&str> =
        flow.split_whitespace().filter(|t| t.starts_with("dst=") || t.starts_with("dport=")).collect();
    assert_eq!(reply.get(2), Some(&format!("dst={a_ip}").as_str()), "{pair}: {flow}");
    assert_eq!(reply.get(3), Some(&format!("dport={a_port}").as_str()), "{pair}: {flow}");

    // ---- Check 1: negative control. Without the null packet the callee's firewall drops
    // everything the caller sends.
    let r2_before = lab.counters(Host::R2).unwrap();
    let bob =
        peer(&lab, Host::B, "bob", 41002, &["--setup-timeout", "2", "listen", "--calls", "1", "--no-null", "--json"]);
    settle();
    let alice =
        peer(&lab, Host::A, "alice", 40002, &["--setup-timeout", "2", "call", "bob", "--duration", "4", "--json"]);
    let (oa, ob) = (alice.finish(Duration::from_secs(20)), bob.finish(Duration::from_secs(10)));
    let (ca, cb) = (one(&oa, "alice"), one(&ob, "bob"));
    assert_ne!(oa.code, 0, "{pair}: the call must fail without the null packet: {ca}");
    assert_ne!(ob.code, 0, "{pair}: {cb}");
    assert_eq!(u(&cb, "received"), 0, "{pair}: media reached bob without a window: {cb}");
    assert_eq!(u(&ca, "received"), 0, "{pair}: {ca}");
    assert!(u(&ca, "sent") > 0, "{pair}: alice streamed: {ca}");
    assert!(s(&cb, "failed_phase").contains("no media"), "{pair}: {cb}");
    let r2_after = lab.counters(Host::R2).unwrap();
    assert!(
        r2_after.udp_drop - r2_before.udp_drop >= u(&ca, "sent"),
        "{pair}: bob's router dropped {} UDP packets, alice sent {} RTP packets",
        r2_after.udp_drop - r2_before.udp_drop,
        u(&ca, "sent")
    );

    // ---- Check 5: an idle call keeps its window. Conntrack forgets UDP flows after 3 s;
    // both sides pause media for longer (keepalives every second), the callee 2 s longer
    // than the caller, so without keepalives the caller's first resumed packets would meet a
    // closed window.
    let (sent_a, recv_b, recv_a, sent_b) = idle_call(&lab, 40003, 41003, "1");
    // The whole call ran: 16 s with 10 s (alice) and 12 s (bob) of pause at 50 packets/s,
    // so about 300 and 200 packets.
    assert!(sent_a >= 250 && sent_b >= 150, "{pair}: alice sent {sent_a}, bob {sent_b}: the call ended early");
    assert!(recv_b + 5 >= sent_a, "{pair}: bob got {recv_b} of alice's {sent_a} packets across the pause");
    assert!(recv_a + 5 >= sent_b, "{pair}: alice got {recv_a} of bob's {sent_b} packets across the pause");
    lab.set_udp_timeout(30).unwrap();

    // ---- Check 6: 10% UDP loss on the callee's router during setup: calls still connect
    // (STUN and null packet retries). Without retries about one call in ten would fail,
    // so 30 calls all connecting is a sensitive check.
    lab.set_loss(Host::R2, 10).unwrap();
    let calls = 30;
    let bob = peer(&lab, Host::B, "bob", 41100, &["listen", "--calls", &calls.to_string(), "--json"]);
    // Under loss bob's STUN answers may all be lost: he then registers without a binding
    // after 1 s, so 1 s of settling could let the first call find him offline (seen once).
    std::thread::sleep(Duration::from_millis(3000));
    let mut ok = 0;
    let mut failed = Vec::new();
    for i in 0..calls {
        // A fresh port each time: every call punches a new window. One second of media
        // leaves room for the callee's null re-sends (50, 150, 350, 750 ms after INCOMING):
        // with 0.3 s, three punches lost in a row (0.1% of calls) failed a call.
        let o = peer(&lab, Host::A, "alice", 40100 + i, &["call", "bob", "--duration", "1", "--json"])
            .finish(Duration::from_secs(20));
        if o.code == 0 {
            ok += 1;
        } else {
            eprintln!("{pair}: call {i} under loss failed: {}", o.stderr);
            failed.push(o.calls.first().map(|c| c["call_id"].clone()));
        }
    }
    let ob = bob.finish(Duration::from_secs(20));
    for id in failed.iter().flatten() {
        // Bob's side of each failed call, to tell a lost punch from a lost answer.
        let theirs: Vec<_> = ob.calls.iter().filter(|c| &c["call_id"] == id).collect();
        eprintln!("{pair}: bob's report of call {id}: {theirs:?}");
    }
    assert_eq!(ob.calls.len(), calls as usize, "{pair}: {}", ob.stderr);
    assert_eq!(ok, calls, "{pair}: {ok} of {calls} calls connected under 10% loss");
    assert!(lab.counters(Host::R2).unwrap().udp_loss > 0, "{pair}: the loss rule dropped nothing");
    lab.set_loss(Host::R2, 0).unwrap();

    // Check 2, the manager's side: it never saw a media packet.
    let stats = m.stop().unwrap();
    assert_eq!(stats["calls_no_path"], 0, "{pair}: {stats}");
    assert!(stats["calls_direct"].as_u64().unwrap_or(0) >= 32, "{pair}: {stats}");
    assert_eq!(stats["udp_media"], 0, "{pair}: {stats}");
    assert_eq!(stats["udp_non_stun"], 0, "{pair}: {stats}");
}

/// A call with conntrack UDP timeouts of 3 s and media paused 2..12 s (caller) and
/// 2..14 s (callee) (`--pause START,LENGTH`), with the given keepalive interval. Both sides must end it as a call
/// that worked (exit 0, result ok: some media got through). Returns (alice sent, bob
/// received, alice received, bob sent).
fn idle_call(lab: &Lab, port_a: u16, port_b: u16, keepalive: &str) -> (u64, u64, u64, u64) {
    lab.set_udp_timeout(3).unwrap();
    let bob = peer(
        lab,
        Host::B,
        "bob",
        port_b,
        &["--keepalive", keepalive, "--pause", "2,12", "listen", "--calls", "1", "--json"],
    );
    settle();
    let alice = peer(
        lab,
        Host::A,
        "alice",
        port_a,
        &["--keepalive", keepalive, "--pause", "2,10", "call", "bob", "--duration", "16", "--json"],
    );
    let (oa, ob) = (alice.finish(Duration::from_secs(40)), bob.finish(Duration::from_secs(10)));
    let (ca, cb) = (one(&oa, "alice"), one(&ob, "bob"));
    assert_eq!((oa.code, s(&ca, "result")), (0, "ok"), "alice: {ca}");
    assert_eq!((ob.code, s(&cb, "result")), (0, "ok"), "bob: {cb}");
    (u(&ca, "sent"), u(&cb, "received"), u(&ca, "received"), u(&cb, "sent"))
}

#[test]
fn fw_fw() {
    check_pair(Mode::Fw, Mode::Fw);
}

#[test]
fn fw_nat() {
    check_pair(Mode::Fw, Mode::Nat);
}

#[test]
fn nat_fw() {
    check_pair(Mode::Nat, Mode::Fw);
}

#[test]
fn nat_nat() {
    check_pair(Mode::Nat, Mode::Nat);
}

/// The control for check 5: with keepalives effectively off, the same paused call loses
/// the caller's resumed media until the callee speaks again (about 2 s, 100 packets). This
/// shows the lab's short conntrack timeouts really close idle windows, so check 5 can fail.
#[test]
fn without_keepalives_an_idle_window_closes() {
    let lab = Lab::up(Mode::Nat, Mode::Nat).expect("lab up");
    let m = lab.start_manager().expect("manager");
    let (sent_a, recv_b, _, _) = idle_call(&lab, 40003, 41003, "1000");
    assert!(sent_a >= 250, "alice sent {sent_a}: the call ended early");
    assert!(
        recv_b + 50 <= sent_a,
        "bob got {recv_b} of alice's {sent_a} packets: the window should have closed during the pause"
    );
    m.stop().unwrap();
}

/// One side behind a fully-random NAT, the other easy: the birthday search connects. The
/// hard side opens 256 sockets (256 mappings on its router); the easy side probes random
/// ports of the hard router's address at 100 per second, each probe a conntrack entry on its
/// own router, until one meets a mapping. Two calls per direction (the matrix runs 50), one
/// direction on each driver (`io`: the search sockets are the driver's).
fn birthday_cell(a: Mode, b: Mode, io: &str) {
    let lab = Lab::up(a, b).expect("lab up");
    let m = lab.start_manager().expect("manager");
    let pair = format!("{}/{}", a.as_str(), b.as_str());
    let (easy_router, hard_wan) = if b == Mode::NatRandom { (Host::R1, R2_WAN) } else { (Host::R2, R1_WAN) };
    let mut calls = Vec::new();
    for i in 0..2u16 {
        // Fresh ports on both sides and flushed conntrack tables: the probes of one call
        // must not help the next.
        lab.flush_conntrack().unwrap();
        let bob = peer(&lab, Host::B, "bob", 41001 + i, &["--io", io, "listen", "--calls", "1", "--json"]);
        settle();
        let o = peer(&lab, Host::A, "alice", 40001 + i, &["--io", io, "call", "bob", "--duration", "2", "--json"])
            .finish(Duration::from_secs(45));
        let ca = one(&o, "alice");
        assert_eq!(o.code, 0, "{pair} call {i}: {ca} {}", o.stderr);
        // Every probe the easy side sent left a conntrack entry on its router towards the
        // hard router's address (unreplied entries live 30 s, longer than the call).
        let ct = lab.conntrack_udp(easy_router).unwrap();
        let towards_hard = ct.lines().filter(|l| l.contains(&format!("dst={hard_wan} "))).count();
        let ob = bob.finish(Duration::from_secs(20));
        assert_eq!(ob.code, 0, "{pair} bob: {}", ob.stderr);
        calls.push((ca, towards_hard, one(&ob, "bob")));
    }
    for (ca, towards_hard, cb) in &calls {
        for (who, c) in [("alice", ca), ("bob", cb)] {
            assert_eq!(s(c, "result"), "ok", "{pair} {who}: {c}");
            assert_eq!(s(c, "strategy"), "birthday", "{pair} {who}: {c}");
            assert!(u(c, "received") >= 80, "{pair} {who} received too little: {c}");
        }
        let (easy, hard) = if b == Mode::NatRandom { (ca, cb) } else { (cb, ca) };
        assert_eq!(s(hard, "nat_class"), "random", "{pair}: {hard}");
        assert_eq!(s(easy, "peer_nat_class"), "random", "{pair}: {easy}");
        assert_ne!(s(easy, "nat_class"), "random", "{pair}: {easy}");
        assert_eq!(u(hard, "sockets_opened"), 256, "{pair}: {hard}");
        assert_eq!(u(easy, "sockets_opened"), 0, "{pair}: {easy}");
        let probes = u(easy, "probes_sent");
        assert!(probes >= 1, "{pair}: {easy}");
        assert!(*towards_hard as u64 >= probes, "{pair}: {towards_hard} conntrack entries for {probes} probes");
        // Media went to the port the search found, not the one the manager saw.
        let hard_peer = s(easy, "peer");
        assert!(hard_peer.starts_with(&format!("{hard_wan}:")), "{pair}: {easy}");
        eprintln!(
            "{pair}: two-way media after {:.0} ms, {probes} probes, {towards_hard} conntrack entries on the easy router",
            ca["first_media_ms"].as_f64().unwrap_or(0.0)
        );
        // The hit comes at the easy side's probe rate (100 per second) plus a few round
        // trips: a search that only found its pair at the hard side's 10 s re-send (its
        // first probes lost) would show here.
        let found_ms = easy["first_media_ms"].as_f64().unwrap();
        assert!(found_ms <= probes as f64 * 10.0 + 500.0, "{pair}: {found_ms} ms for {probes} probes");
    }
    let stats = m.stop().unwrap();
    assert_eq!(stats["calls_birthday"], 2, "{pair}: {stats}");
    assert_eq!(stats["calls_by_strategy"]["birthday"]["hung_up"], 2, "{pair}: {stats}");
    assert_eq!(stats["udp_media"], 0, "{pair}: {stats}");
}

#[test]
fn birthday_nat_to_random() {
    birthday_cell(Mode::Nat, Mode::NatRandom, "auto");
}

#[test]
fn birthday_random_to_fw() {
    birthday_cell(Mode::NatRandom, Mode::Fw, "portable");
}

/// Both routers randomise ports and neither offers a mapping: no relay-free path exists.
/// Each side classifies itself as random at registration, and the manager refuses the call
/// at once with the reason instead of letting both sides spray probes; the caller reports it
/// well within 5 s and the manager counts it.
#[test]
fn random_to_random_fails_fast_with_the_reason() {
    let lab = Lab::up(Mode::NatRandom, Mode::NatRandom).expect("lab up");
    let m = lab.start_manager().expect("manager");
    let bob = peer(&lab, Host::B, "bob", 41001, &["listen", "--calls", "1", "--json"]);
    settle();
    let started = std::time::Instant::now();
    let alice = peer(&lab, Host::A, "alice", 40001, &["call", "bob", "--duration", "3", "--json"]);
    let oa = alice.finish(Duration::from_secs(20));
    let took = started.elapsed();
    let ob = bob.finish(Duration::from_millis(100));
    let ca = one(&oa, "alice");
    assert_eq!(oa.code, 1, "alice: {ca} {}", oa.stderr);
    assert!(took < Duration::from_secs(5), "the refusal took {took:?}: {ca}");
    assert!(s(&ca, "result").contains("no relay-free path: both sides randomise ports"), "{ca}");
    assert_eq!(s(&ca, "nat_class"), "random", "{ca}");
    assert_eq!(s(&ca, "peer_nat_class"), "random", "{ca}");
    assert_eq!(s(&ca, "strategy"), "none", "{ca}");
    assert!(s(&ca, "failed_phase").contains("no relay-free path"), "{ca}");
    assert!(
        oa.stderr.contains("no relay-free path: both sides randomise ports and no port mapping"),
        "alice: {}",
        oa.stderr
    );
    assert_eq!(u(&ca, "sent"), 0, "alice sprayed media: {ca}");
    // Bob never heard of the call: no INCOMING, so no null packets and no report.
    assert!(ob.calls.is_empty(), "bob: {:?}", ob.calls);
    let stats = m.stop().unwrap();
    assert_eq!(stats["calls_no_path"], 1, "{stats}");
    assert_eq!(stats["calls_by_strategy"]["none"]["refused"], 1, "{stats}");
    assert_eq!(stats["calls_direct"], 0, "{stats}");
}

/// Two peers behind one NAT (A and C on r1's LAN) reach each other over the LAN: each told
/// the manager its host address, the manager passed it on because both share a public IP,
/// and the media never crosses the router (no hairpin: r1 has no conntrack entry between
/// them). Behind a fully-random NAT too, where the public addresses alone leave no path.
fn same_nat_cell(mode: Mode) {
    let lab = Lab::up(mode, Mode::Fw).expect("lab up");
    let m = lab.start_manager().expect("manager");
    let pair = format!("{}, same NAT", mode.as_str());
    let (ca, cc) = call_ok(&lab, (Host::A, 40001), (Host::C, 41001), "2");
    for (who, c, other_lan) in [("alice", &ca, "10.1.0.3:41001"), ("carol", &cc, "10.1.0.2:40001")] {
        assert_eq!(s(c, "strategy"), "direct", "{pair} {who}: {c}");
        assert_eq!(s(c, "path"), "host", "{pair} {who}: {c}");
        assert!(s(c, "local").starts_with(&format!("{R1_WAN}:")), "{pair} {who}: {c}");
        // Media went to the other's LAN address, not its public one.
        assert_eq!(s(c, "peer"), other_lan, "{pair} {who}: {c}");
    }
    // The router saw at most the punches to the public addresses (a hairpin it drops) and
    // the port mapping requests to itself, never a flow from one peer's address to the other.
    let ct = lab.conntrack_udp(Host::R1).unwrap();
    let peers = ["10.1.0.2", "10.1.0.3"];
    let lan_to_lan = ct.lines().find(|l| {
        let first = |k: &str| l.split_whitespace().find_map(|t| t.strip_prefix(k));
        first("src=").is_some_and(|a| peers.contains(&a)) && first("dst=").is_some_and(|a| peers.contains(&a))
    });
    assert!(lan_to_lan.is_none(), "{pair}: a flow between the two crossed the router:\n{ct}");
    let stats = m.stop().unwrap();
    assert_eq!(stats["calls_same_nat"], 1, "{stats}");
    assert_eq!(stats["calls_no_path"], 0, "{stats}");
    assert_eq!(stats["calls_by_strategy"]["direct"]["hung_up"], 1, "{stats}");
}

#[test]
fn two_peers_behind_one_nat_talk_over_their_lan() {
    same_nat_cell(Mode::Nat);
}

#[test]
fn two_peers_behind_one_random_nat_talk_over_their_lan() {
    same_nat_cell(Mode::NatRandom);
}

/// A NAT behind a NAT (A's LAN behind i1 on a carrier-grade segment behind r1), both
/// keeping ports: the public address is the outer router's, the class endpoint-independent,
/// and the simple punch works through both layers; each router holds the media flow.
#[test]
fn a_double_nat_connects_directly() {
    let lab = Lab::up(Mode::Nat2, Mode::Nat).expect("lab up");
    let m = lab.start_manager().expect("manager");
    let (ca, cb) = call_ok(&lab, (Host::A, 40001), (Host::B, 41001), "2");
    assert!(s(&ca, "local").starts_with(&format!("{R1_WAN}:")), "{ca}");
    for c in [&ca, &cb] {
        assert_eq!(s(c, "strategy"), "direct", "{c}");
        assert_eq!(s(c, "nat_class"), "endpoint-independent", "{c}");
        assert_eq!(s(c, "path"), "public", "{c}");
    }
    let (b_ip, b_port) = s(&cb, "local").split_once(':').unwrap();
    let inner = lab.conntrack_udp(Host::I1).unwrap();
    assert!(
        ct_flow(&inner, &[("src", "10.1.0.2"), ("sport", "40001"), ("dst", b_ip), ("dport", b_port)]).is_some(),
        "no media flow on the inner router:\n{inner}"
    );
    let outer = lab.conntrack_udp(Host::R1).unwrap();
    assert!(
        ct_flow(&outer, &[("src", "100.64.1.2"), ("dst", b_ip), ("dport", b_port)]).is_some(),
        "no media flow on the outer router:\n{outer}"
    );
    let stats = m.stop().unwrap();
    assert_eq!(stats["calls_same_nat"], 0, "{stats}");
}

/// A router that offers port mapping (miniupnpd: PCP, NAT-PMP, UPnP IGD) in front of a
/// fully-random NAT, against another fully-random NAT: without the mapping no relay-free
/// path exists; with it the mapped side is reachable from anywhere, and the call is direct
/// whichever side calls. The peer asks PCP at start-up, registers the mapping as its address
/// (class `mapped`), and deletes it at exit (the router's DNAT chain is empty afterwards).
fn mapping_cell(mapped_calls: bool) {
    let lab = Lab::up(Mode::NatMap, Mode::NatRandom).expect("lab up");
    let m = lab.start_manager().expect("manager");
    let wan = lab.wan(Host::R1);
    let (caller_host, callee_host) = if mapped_calls { (Host::A, Host::B) } else { (Host::B, Host::A) };
    let (caller_port, callee_port) = if mapped_calls { (40001, 41001) } else { (41001, 40001) };
    let (ca, cb) = call_ok(&lab, (caller_host, caller_port), (callee_host, callee_port), "2");
    let (mapped, other) = if mapped_calls { (&ca, &cb) } else { (&cb, &ca) };
    let cell = if mapped_calls { "mapped side calls" } else { "mapped side answers" };
    // The other way too (the callee's last packet may be in flight at hang-up).
    assert!(u(&ca, "received") + 2 >= u(&cb, "sent") && u(&ca, "received") > 0, "{cell}: {ca} {cb}");
    assert_eq!(s(mapped, "port_mapping"), format!("pcp {wan}:40001"), "{cell}: {mapped}");
    assert_eq!(s(mapped, "nat_class"), "mapped", "{cell}: {mapped}");
    assert_eq!(s(mapped, "local_source"), "mapped", "{cell}: {mapped}");
    assert_eq!(s(mapped, "local"), format!("{wan}:40001"), "{cell}: {mapped}");
    assert_eq!(s(other, "nat_class"), "random", "{cell}: {other}");
    assert_eq!(s(other, "peer_nat_class"), "mapped", "{cell}: {other}");
    assert_eq!(s(other, "path"), "mapped", "{cell}: {other}");
    assert_eq!(s(other, "peer"), format!("{wan}:40001"), "{cell}: media went to the mapping: {other}");
    for c in [&ca, &cb] {
        assert_eq!(s(c, "strategy"), "direct", "{cell}: {c}");
        assert_eq!(u(c, "probes_sent"), 0, "{cell}: no search: {c}");
    }
    // The mapping was deleted at exit.
    let dnat =
        lab.cmd(Host::R1, "nft").args(["list", "chain", "inet", "labupnp", "prerouting_miniupnpd"]).output().unwrap();
    let dnat = String::from_utf8_lossy(&dnat.stdout);
    assert!(!dnat.contains("dnat"), "{cell}: the mapping outlived the peer:\n{dnat}");
    let stats = m.stop().unwrap();
    assert_eq!(stats["registrations_mapped"], 1, "{stats}");
    assert_eq!(stats["calls_no_path"], 0, "{stats}");
    assert_eq!(stats["calls_by_strategy"]["direct"]["hung_up"], 1, "{stats}");
}

#[test]
fn a_mapped_peer_calls_through_a_random_nat() {
    mapping_cell(true);
}

#[test]
fn a_mapped_peer_is_reached_through_a_random_nat() {
    mapping_cell(false);
}

/// Both sides behind fully-random NATs on IPv4 (no relay-free IPv4 path), each with an IPv6
/// LAN behind its stateful firewall: the peers (one dual-stack socket each) name their IPv6
/// addresses in REGISTER, the manager passes them on because both have some, and the call is
/// direct over IPv6: the callee's punch opens its ip6 firewall, the caller tries IPv6 first
/// (IPv4 would follow 50 ms later). Without the punch (`--no-null`) the callee's firewall
/// drops everything: the IPv6 window is the punch's, as on IPv4.
#[test]
fn two_random_nats_connect_over_ipv6() {
    let lab = Lab::up(Mode::Dual, Mode::Dual).expect("lab up");
    let m = lab.start_manager().expect("manager");
    let (ca, cb) = call_ok(&lab, (Host::A, 40001), (Host::B, 41001), "2");
    for (who, c, other) in [("alice", &ca, "[2001:db8:2::2]:41001"), ("bob", &cb, "[2001:db8:1::2]:40001")] {
        assert_eq!(s(c, "nat_class"), "random", "{who}: {c}");
        assert_eq!(s(c, "peer_nat_class"), "random", "{who}: {c}");
        assert_eq!(s(c, "strategy"), "direct", "{who}: {c}");
        assert_eq!(s(c, "path"), "ipv6", "{who}: {c}");
        assert_eq!(s(c, "peer"), other, "{who}: {c}");
        assert_eq!(u(c, "probes_sent"), 0, "{who}: no search: {c}");
    }
    // The media flow is in both routers' IPv6 conntrack tables, routed (no translation).
    for r in [Host::R1, Host::R2] {
        let ct = lab.conntrack_udp6(r).unwrap();
        assert!(
            ct_flow(&ct, &[("src", "2001:db8:1::2"), ("dst", "2001:db8:2::2")]).is_some()
                || ct_flow(&ct, &[("src", "2001:db8:2::2"), ("dst", "2001:db8:1::2")]).is_some(),
            "no IPv6 media flow on {r:?}:\n{ct}"
        );
    }
    // Negative control: no punch, no path (IPv4 has none either: the call fails).
    let r2_before = lab.counters(Host::R2).unwrap();
    let bob =
        peer(&lab, Host::B, "bob", 41002, &["--setup-timeout", "2", "listen", "--calls", "1", "--no-null", "--json"]);
    settle();
    let alice =
        peer(&lab, Host::A, "alice", 40002, &["--setup-timeout", "2", "call", "bob", "--duration", "3", "--json"]);
    let (oa, ob) = (alice.finish(Duration::from_secs(20)), bob.finish(Duration::from_secs(10)));
    let (ca, cb) = (one(&oa, "alice"), one(&ob, "bob"));
    assert_ne!(oa.code, 0, "the call must fail without the punch: {ca}");
    assert_eq!(u(&cb, "received"), 0, "media reached bob without a window: {cb}");
    let dropped = lab.counters(Host::R2).unwrap().udp_drop - r2_before.udp_drop;
    assert!(dropped >= u(&ca, "sent"), "bob's firewall dropped {dropped} of alice's {} packets: {ca}", u(&ca, "sent"));
    let stats = m.stop().unwrap();
    assert_eq!(stats["calls_ipv6"], 2, "{stats}");
    assert_eq!(stats["calls_no_path"], 0, "{stats}");
}
