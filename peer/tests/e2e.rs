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

#[test]
fn a_manager_with_a_secret_admits_only_peers_with_a_token_for_their_id() {
    let dir = Scratch::new("auth");
    let secret = dir.path("manager.secret");
    std::fs::write(&secret, "a-test-secret-of-more-than-16-bytes\n").unwrap();
    let token = |who: &str| {
        let out = run(bin("manager").to_str().unwrap(), &["--secret-file", &secret, "token", "--id", who, "--ttl", "600"]);
        out.trim().to_string()
    };
    let (bob_token, alice_token) = (token("bob"), token("alice"));
    assert!(bob_token.split_once('.').is_some_and(|(e, m)| e.parse::<u64>().is_ok() && m.len() == 64), "{bob_token}");
    let m = start_manager_with(&["--secret-file", &secret]);

    // Without a token, and with bob's token as mallory: refused, exit 2, a clear message.
    for (who, args) in [("mallory", vec![]), ("mallory", vec!["--token", bob_token.as_str()])] {
        let mut a = vec!["call", "bob", "--duration", "1"];
        a.splice(0..0, args.iter().copied());
        let (code, _, err) = peer(&m.addr, who, &a).finish(Duration::from_secs(15));
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("refused our registration"), "{err}");
    }

    // With their own tokens, bob and alice talk.
    let bob = peer(&m.addr, "bob", &["--token", &bob_token, "listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer(&m.addr, "alice", &["--token", &alice_token, "call", "bob", "--duration", "1", "--json"]);
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(20));
    let (cb, _, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    assert_eq!(json_line(&out_a)["result"], "ok");
    let stats = m.stop();
    assert_eq!(stats["auth_missing"], 1, "{stats}");
    assert_eq!(stats["auth_invalid"], 1, "{stats}");
    assert_eq!(stats["registrations"], 2, "{stats}");
}

#[test]
fn the_managers_metrics_endpoint_serves_valid_prometheus_text() {
    let m = start_manager_with(&["--metrics", "127.0.0.1:0"]);
    let line = m.rest.recv_timeout(Duration::from_secs(10)).expect("the metrics address line");
    let url = line.strip_prefix("metrics ").unwrap_or_else(|| panic!("expected `metrics URL`, got {line:?}")).to_string();
    let bob = peer(&m.addr, "bob", &["listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer(&m.addr, "alice", &["call", "bob", "--duration", "1", "--json"]);
    assert_eq!(alice.finish(Duration::from_secs(20)).0, 0);
    assert_eq!(bob.finish(Duration::from_secs(10)).0, 0);
    // curl, as an operator would; -f fails on an HTTP error status.
    let text = run("curl", &["-sf", "--max-time", "10", &url]);
    manager::metrics::check_exposition(&text).unwrap_or_else(|e| panic!("invalid exposition: {e:?}\n{text}"));
    for want in [
        "nullpunch_manager_registrations_total 2\n",
        "nullpunch_manager_calls_by_outcome_total{outcome=\"started\"} 1\n",
        "nullpunch_manager_setup_seconds_count 1\n",
        "nullpunch_manager_udp_media_total 0\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    // Anything but GET /metrics is a 404.
    let out = std::process::Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url.replace("/metrics", "/")]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    m.stop();
}
