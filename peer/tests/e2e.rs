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
        // Setup: the call's start to two-way media (the first packet from the peer), as
        // loadgen measures it; signalling is its part up to START (caller) or up to the
        // caller's first packet (callee).
        let (setup, signalling) = (r["setup_ms"].as_f64().unwrap(), r["signalling_ms"].as_f64().unwrap());
        assert!(setup < 1000.0, "{who}: {r}");
        assert_eq!(r["setup_ms"], r["first_media_ms"], "{who}: {r}");
        assert!(signalling > 0.0 && signalling <= setup, "{who}: {r}");
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
        let out =
            run(bin("manager").to_str().unwrap(), &["--secret-file", &secret, "token", "--id", who, "--ttl", "600"]);
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
    let url =
        line.strip_prefix("metrics ").unwrap_or_else(|| panic!("expected `metrics URL`, got {line:?}")).to_string();
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
        // Both peers on loopback classify as endpoint-independent: a direct call that worked.
        "nullpunch_manager_calls_by_strategy_total{strategy=\"direct\",outcome=\"hung_up\"} 1\n",
        "nullpunch_manager_calls_by_strategy_total{strategy=\"birthday\",outcome=\"hung_up\"} 0\n",
        "nullpunch_manager_setup_seconds_count 1\n",
        "nullpunch_manager_udp_media_total 0\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    // Anything but GET /metrics is a 404.
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url.replace("/metrics", "/")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    m.stop();
}

/// Send a UDP datagram with a forged source address (raw socket, IP_HDRINCL; needs root).
fn send_spoofed(from: std::net::SocketAddrV4, to: std::net::SocketAddrV4, payload: &[u8]) {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45; // IPv4, 5-word header
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64; // TTL
    p[9] = 17; // UDP
    p[12..16].copy_from_slice(&from.ip().octets());
    p[16..20].copy_from_slice(&to.ip().octets());
    p[20..22].copy_from_slice(&from.port().to_be_bytes());
    p[22..24].copy_from_slice(&to.port().to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    // UDP checksum 0: none (allowed over IPv4); the kernel fills the IP checksum.
    p[28..].copy_from_slice(payload);
    // SAFETY: a raw socket, one sendto of our buffer with a sockaddr_in, then close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket (needs root): {}", std::io::Error::last_os_error());
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = to.port().to_be();
        sa.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(to.ip().octets()) };
        let n = libc::sendto(
            fd,
            p.as_ptr() as *const libc::c_void,
            p.len(),
            0,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(n as usize, p.len(), "spoofed send: {}", std::io::Error::last_os_error());
        libc::close(fd);
    }
}

/// Watch loopback UDP (raw socket; needs root) for an RTP packet from `from` to `to`;
/// returns its SSRC and sequence number: what an on-path observer learns.
fn sniff_rtp(from: u16, to: u16) -> (u32, u16) {
    // SAFETY: a raw UDP socket read with a timeout into our buffer, then closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP);
        assert!(fd >= 0, "raw socket (needs root): {}", std::io::Error::last_os_error());
        let tv = libc::timeval { tv_sec: 1, tv_usec: 0 };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
            if n <= 0 {
                continue;
            }
            let p = &buf[..n as usize];
            let ihl = (p[0] & 0x0F) as usize * 4;
            if p.len() < ihl + 8 + 12 {
                continue;
            }
            let (sp, dp) = (u16::from_be_bytes([p[ihl], p[ihl + 1]]), u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]));
            let rtp = &p[ihl + 8..];
            if sp == from && dp == to && rtp[0] >> 6 == 2 {
                libc::close(fd);
                return (u32::from_be_bytes([rtp[8], rtp[9], rtp[10], rtp[11]]), u16::from_be_bytes([rtp[2], rtp[3]]));
            }
        }
        libc::close(fd);
        panic!("saw no RTP from {from} to {to}");
    }
}

fn v4(a: &str) -> std::net::SocketAddrV4 {
    match a.parse::<std::net::SocketAddr>().unwrap() {
        std::net::SocketAddr::V4(v) => v,
        other => panic!("not IPv4: {other}"),
    }
}

#[test]
fn a_third_host_cannot_inject_into_an_established_call() {
    // Bob and alice on fixed ports, so mallory knows where the call is.
    let (pa, pb) = (free_udp_port(false), free_udp_port(false));
    let (alice_addr, bob_addr) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let m = start_manager();
    let bob = spawn(
        bin("peer").to_str().unwrap(),
        &["--manager", &m.addr, "--id", "bob", "--bind", &bob_addr, "listen", "--calls", "1", "--json"],
        "peer",
    );
    settle();
    let alice = spawn(
        bin("peer").to_str().unwrap(),
        &["--manager", &m.addr, "--id", "alice", "--bind", &alice_addr, "call", "bob", "--duration", "3", "--json"],
        "peer",
    );
    std::thread::sleep(Duration::from_millis(700));
    // Mallory knows both addresses. Off the path she must guess the call's token and SSRCs;
    // on it she has seen one of alice's packets, so she knows alice's SSRC and sequence.
    let (ssrc_seen, seq_seen) = sniff_rtp(pa, pb);
    let mallory = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = proto::rng::Rng::new(42);
    let mut injected = 0;
    for i in 0..300u32 {
        let ssrc = rng.next_u64() as u32;
        let mut rtp = vec![0x80, 111];
        rtp.extend_from_slice(&(i as u16).to_be_bytes());
        rtp.extend_from_slice(&(i * 960).to_be_bytes());
        rtp.extend_from_slice(&ssrc.to_be_bytes());
        rtp.extend_from_slice(&[0x55; 160]);
        // From her own address, and with alice's address forged as the source.
        mallory.send_to(&rtp, &bob_addr).unwrap();
        send_spoofed(v4(&alice_addr), v4(&bob_addr), &rtp);
        // Null packets with guessed call ids and tokens, forged from alice too.
        let mut null = vec![0x0E, 0x01, 0x00, 0x00];
        null.extend_from_slice(&rng.next_u64().to_be_bytes());
        null.extend_from_slice(&rng.next_u64().to_be_bytes());
        send_spoofed(v4(&alice_addr), v4(&bob_addr), &null);
        // With the SSRC she saw, just ahead in sequence, from her own address.
        let mut known = rtp.clone();
        known[2..4].copy_from_slice(&seq_seen.wrapping_add(5 + i as u16).to_be_bytes());
        known[8..12].copy_from_slice(&ssrc_seen.to_be_bytes());
        mallory.send_to(&known, &bob_addr).unwrap();
        injected += 4;
        // Paced (750 packets/s): this is about getting in, not about flooding bob out.
        std::thread::sleep(Duration::from_millis(4));
    }
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(20));
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    let (a, b) = (json_line(&out_a), json_line(&out_b));
    // Bob counted exactly alice's packets: none of mallory's got in. (One that forges alice's
    // address *and* carries the SSRC she saw would: that needs an on-path attacker who can
    // also spoof, which only media encryption stops; docs/architecture.md, Known limits.)
    assert_eq!(b["received"], a["sent"], "{injected} forged packets; alice: {a}\nbob: {b}");
    assert_eq!(b["lost"], 0, "{b}");
    assert_eq!(
        b["nulls_received"].as_u64().unwrap(),
        a["nulls_sent"].as_u64().unwrap(),
        "no forged null accepted: {b}"
    );
    // And the forgeries did reach bob while the call was up (its report, written when the
    // call ended, counts them): every one was refused by a check, none lost on the way.
    let refused = &b["refused"];
    let n = |k: &str| refused[k].as_u64().unwrap_or_else(|| panic!("refused.{k} in {b}"));
    assert!(n("wrong_source") >= 300, "the seen SSRC from mallory's own address: {refused}");
    let total = n("wrong_source") + n("unmatched") + n("malformed") + n("unknown");
    assert!(total >= injected, "{total} refused of {injected} forged: {refused}");
    m.stop();
}

#[test]
fn a_peer_that_vanishes_mid_call_is_detected_by_media_timeout() {
    let m = start_manager();
    let bob = peer(&m.addr, "bob", &["listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer(&m.addr, "alice", &["--media-timeout", "1", "call", "bob", "--duration", "30", "--json"]);
    std::thread::sleep(Duration::from_millis(1500));
    // Bob dies without a word (SIGKILL: no HANGUP).
    let mut bob = bob;
    bob.child.kill().unwrap();
    let t = Instant::now();
    let (code, out, err) = alice.finish(Duration::from_secs(15));
    assert_eq!(code, 1, "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "detected in {:?}", t.elapsed());
    let a = json_line(&out);
    assert_eq!(a["result"], "peer stopped sending", "{a}");
    assert_eq!(a["failed_phase"], "media stopped", "{a}");
    assert!(a["received"].as_u64().unwrap() > 50, "{a}");
    m.stop();
}

#[test]
fn sigterm_ends_a_peers_open_call_with_hangup_shutdown() {
    let m = start_manager();
    let bob = peer(&m.addr, "bob", &["listen", "--json"]);
    settle();
    let alice = peer(&m.addr, "alice", &["call", "bob", "--duration", "30", "--json"]);
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(bob.child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let t = Instant::now();
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(10));
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(10));
    assert!(t.elapsed() < Duration::from_secs(3), "nothing hangs: {:?}", t.elapsed());
    assert_eq!(cb, 0, "bob hung up himself: {err_b}");
    assert_eq!(ca, 1, "{err_a}");
    let (a, b) = (json_line(&out_a), json_line(&out_b));
    assert_eq!(b["result"], "ok", "{b}");
    assert_eq!(a["result"], "remote hangup (Shutdown)", "{a}");
    m.stop();
}

#[test]
fn a_listener_writes_each_calls_audio_to_its_own_wav_file() {
    let dir = Scratch::new("wav-per-call");
    let heard = dir.path("heard.wav");
    let m = start_manager();
    let bob = peer(&m.addr, "bob", &["--audio-out", &format!("wav:{heard}"), "listen", "--calls", "2", "--json"]);
    settle();
    for who in ["alice", "carol"] {
        let caller = peer(&m.addr, who, &["--audio-in", "tone", "call", "bob", "--duration", "1", "--json"]);
        let (code, _, err) = caller.finish(Duration::from_secs(20));
        assert_eq!(code, 0, "{who}: {err}");
    }
    let (code, _, err) = bob.finish(Duration::from_secs(10));
    assert_eq!(code, 0, "bob: {err}");
    // One file per call: heard.wav, then heard-2.wav; each holds about one second of tone.
    for f in ["heard.wav", "heard-2.wav"] {
        let w = voice::wav::read(std::path::Path::new(&dir.path(f))).unwrap_or_else(|e| panic!("{f}: {e}"));
        let secs = w.samples.len() as f64 / w.rate as f64;
        assert!((0.7..1.5).contains(&secs), "{f}: {secs:.2} s of audio");
        let loud = w.samples.iter().filter(|s| s.unsigned_abs() > 1000).count();
        assert!(loud > w.samples.len() / 4, "{f}: the tone is there ({loud} of {} samples)", w.samples.len());
    }
    assert!(!std::path::Path::new(&dir.path("heard-3.wav")).exists());
    m.stop();
}

/// A manager listening on `[::]` (one dual-stack socket per shard and for STUN) serves
/// IPv4 and IPv6 clients alike: two peers reach it at `[::1]` and call each other over
/// IPv6, two more reach the same manager at 127.0.0.1 and call over IPv4. Each learns its
/// public address in its own family (an IPv4 client is not shown IPv4-mapped).
#[test]
fn a_dual_stack_manager_serves_ipv4_and_ipv6_peers() {
    let m = start_manager_on("[::]:0", &[]);
    let port = m.addr.rsplit(':').next().unwrap().to_string();
    let (v6, v4) = (format!("[::1]:{port}"), format!("127.0.0.1:{port}"));
    let bob = peer_bound(&v6, "bob", "[::1]:0", &["listen", "--calls", "1", "--json"]);
    let dave = peer_bound(&v4, "dave", "127.0.0.1:0", &["listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer_bound(&v6, "alice", "[::1]:0", &["call", "bob", "--duration", "1", "--json"]);
    let carol = peer_bound(&v4, "carol", "127.0.0.1:0", &["call", "dave", "--duration", "1", "--json"]);
    for (caller, callee, family) in [(alice, bob, "[::1]:"), (carol, dave, "127.0.0.1:")] {
        let (ca, out_a, err_a) = caller.finish(Duration::from_secs(20));
        let (cb, out_b, err_b) = callee.finish(Duration::from_secs(10));
        assert_eq!(ca, 0, "{family} caller: {err_a}");
        assert_eq!(cb, 0, "{family} callee: {err_b}");
        let (a, b) = (json_line(&out_a), json_line(&out_b));
        assert_eq!(b["received"], a["sent"], "{a}\n{b}");
        for r in [&a, &b] {
            assert!(r["local"].as_str().unwrap().starts_with(family), "{r}");
            assert!(r["peer"].as_str().unwrap().starts_with(family), "{r}");
            assert_eq!(r["local_source"], "stun", "{r}");
        }
    }
    let stats = m.stop();
    assert_eq!(stats["calls_started"], 2, "{stats}");
    assert_eq!(stats["udp_media"], 0, "{stats}");
}

/// `--manager A,B`: bob registers with A; A is killed (SIGKILL); bob registers with B within
/// seconds, says so, and a caller that knows only B reaches him. His call's report names B.
#[test]
fn a_peer_given_two_managers_fails_over_when_the_first_is_killed() {
    let ma = start_manager();
    let mb = start_manager();
    let list = format!("{},{}", ma.addr, mb.addr);
    let bob = peer(&list, "bob", &["listen", "--calls", "1", "--json"]);
    settle();
    let mut ma = ma;
    ma.proc.child.kill().unwrap();
    let killed = Instant::now();
    // Bob moves to B after 50-250 ms; a caller that knows only B finds him registered.
    let mut tries = 0;
    let a = loop {
        tries += 1;
        let alice = peer(&mb.addr, &format!("alice-{tries}"), &["call", "bob", "--duration", "1", "--json"]);
        let (code, out, err) = alice.finish(Duration::from_secs(15));
        let a = json_line(&out);
        if code == 0 || tries == 5 || killed.elapsed() > Duration::from_secs(5) {
            assert_eq!(code, 0, "bob not reachable through B {:?} after A died: {err}", killed.elapsed());
            break a;
        }
        assert!(a["result"].as_str().unwrap().starts_with("unknown callee"), "{a}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(a["result"], "ok", "{a}");
    assert_eq!(a["manager"], mb.addr.as_str(), "{a}");
    let (code, out, err) = bob.finish(Duration::from_secs(10));
    assert_eq!(code, 0, "{err}");
    let b = json_line(&out);
    assert_eq!(b["result"], "ok", "{b}");
    assert_eq!(b["manager"], mb.addr.as_str(), "the report names the manager after the failover: {b}");
    assert!(
        err.contains(&format!("registered with the manager at {} (failed over from {})", mb.addr, ma.addr)),
        "{err}"
    );
    let counters = mb.stop();
    assert!(counters["registrations"].as_u64().unwrap() >= 2, "bob and the caller on B: {counters}");
}
