//! End to end on loopback: the real `manager` binary and two real `peer` processes make a
//! call; both print their JSON reports, and the manager's counters show it never saw media.
//!
//! All processes bind to 127.0.0.1 with port 0 (no fixed ports, so tests can run in
//! parallel); every wait is bounded, and every child is killed when its guard drops.

mod common;

use common::*;

#[test]
fn a_three_second_call_carries_media_both_ways_and_never_touches_the_manager() {
    let m = start_manager();
    let bob = peer(&m.addr, "bob", &["listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer(&m.addr, "alice", &["call", "bob", "--duration", "3", "--json"]);
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(20));
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    let (a, b) = (json_line(&out_a), json_line(&out_b));

    assert_eq!(a["role"], "caller");
    assert_eq!(b["role"], "callee");
    assert_eq!(a["call_id"], b["call_id"]);
    assert_eq!(a["result"], "ok");
    assert_eq!(b["result"], "ok");
    // 3 s at 50 packets/s each way.
    for (who, r) in [("alice", &a), ("bob", &b)] {
        let received = r["received"].as_u64().unwrap();
        assert!((140..=160).contains(&received), "{who} received {received}: {r}");
        assert_eq!(r["lost"], 0, "{who}: {r}");
        assert!(r["sent"].as_u64().unwrap() >= 140, "{who}: {r}");
        assert!(r["setup_ms"].as_f64().unwrap() < 1000.0, "{who}: {r}");
        assert!(r["jitter_ms"].as_f64().unwrap() < 20.0, "{who}: {r}");
    }
    // Each side's view of the other is the other's own public address.
    assert_eq!(a["peer"], b["local"]);
    assert_eq!(b["peer"], a["local"]);
    assert!(b["nulls_sent"].as_u64().unwrap() >= 1, "bob sent the null packet");

    let stats = m.stop();
    assert_eq!(stats["udp_media"], 0, "the manager never saw a media packet: {stats}");
    assert_eq!(stats["udp_non_stun"], 0, "{stats}");
    // At least one each; a reply slower than 250 ms makes a peer ask again.
    assert!(stats["stun_requests"].as_u64().unwrap() >= 2, "both peers discovered their address by STUN: {stats}");
    assert_eq!(stats["calls_started"], 1, "{stats}");
    assert_eq!(stats["calls_ended"], 1, "{stats}");
}

#[test]
fn calling_an_unknown_callee_fails_with_a_clear_message() {
    let m = start_manager();
    let carol = peer(&m.addr, "carol", &["call", "nobody", "--duration", "1"]);
    let (code, _, err) = carol.finish(Duration::from_secs(15));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown callee (never registered)"), "{err}");
    m.stop();
}

#[test]
fn a_callee_that_went_offline_is_reported_as_offline() {
    let m = start_manager();
    let bob = peer(&m.addr, "bob", &["listen", "--duration", "2"]);
    let (code, _, err) = bob.finish(Duration::from_secs(10));
    assert_eq!(code, 0, "{err}");
    let alice = peer(&m.addr, "alice", &["call", "bob", "--duration", "1", "--json"]);
    let (code, out, err) = alice.finish(Duration::from_secs(15));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("offline"), "{err}");
    let r = json_line(&out);
    assert_eq!(r["result"], "unknown callee (offline)");
    assert!(r["failed_phase"].as_str().unwrap().contains("no INCOMING"), "{r}");
    m.stop();
}

#[test]
fn an_unreachable_manager_is_an_error_not_a_hang() {
    // Bind and drop a listener to get a loopback port with nothing behind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let p = peer(&addr, "alice", &["call", "bob"]);
    let (code, _, err) = p.finish(Duration::from_secs(10));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unreachable"), "{err}");
}

#[test]
fn a_second_peer_with_the_same_id_replaces_the_first() {
    let m = start_manager();
    let first = peer(&m.addr, "dup", &["listen", "--duration", "20"]);
    settle();
    let second = peer(&m.addr, "dup", &["listen", "--duration", "1"]);
    let (code, _, err) = first.finish(Duration::from_secs(10));
    assert_eq!(code, 2, "the replaced peer exits with an error: {err}");
    assert!(err.contains("registered by a newer connection"), "{err}");
    let (code, _, err) = second.finish(Duration::from_secs(10));
    assert_eq!(code, 0, "{err}");
    let stats = m.stop();
    assert_eq!(stats["registrations_replaced"], 1, "{stats}");
}
