//! Many managers as one service, for real: `nats-server` (JetStream on) started by the test
//! on free loopback ports, managers started with `--cluster`, and real peers or raw
//! signalling clients. Covers a call across managers, a registration moving between
//! managers, a manager killed (`kill -9`) mid-call, NATS killed and restarted, and a
//! 3-server NATS cluster losing one server. Every process is killed when its test ends.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use proto::nat::NatClass;
use proto::wire::frame::{ClientId, ErrorCode, Frame, FrameDecoder};

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One `nats-server` with JetStream, storing in its own directory.
struct Nats {
    proc: Option<Proc>,
    port: u16,
    args: Vec<String>,
}

impl Nats {
    fn start(dir: &Scratch, name: &str) -> Nats {
        Nats::start_with(dir, name, free_tcp_port(), &[])
    }

    fn start_with(dir: &Scratch, name: &str, port: u16, extra: &[String]) -> Nats {
        let mut args: Vec<String> = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            dir.path(name),
            "--server_name".into(),
            name.into(),
        ];
        args.extend(extra.iter().cloned());
        let mut n = Nats { proc: None, port, args };
        n.restart();
        n
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.proc = Some(spawn("nats-server", &args, "nats-server"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// A cluster manager: its address and node line read.
fn cluster_manager(urls: &str, name: &str, extra: &[&str]) -> Manager {
    let mut args = vec!["--cluster", urls, "--node", name, "--ring-timeout", "3"];
    args.extend_from_slice(extra);
    let m = start_manager_with(&args);
    let node = m.rest.recv_timeout(Duration::from_secs(10)).expect("the node line");
    assert!(node.starts_with("node ") && node.ends_with(name), "{node}");
    m
}

/// A bare signalling client: REGISTER over TCP and read frames.
struct Raw {
    s: TcpStream,
    dec: FrameDecoder,
}

impl Raw {
    fn register(manager: &str, id: &str) -> Raw {
        let s = TcpStream::connect(manager).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut r = Raw { s, dec: FrameDecoder::new() };
        r.send(Frame::Register {
            id: ClientId::new(id).unwrap(),
            udp_port: 5004,
            max_calls: 4,
            binding: None,
            auth: None,
            nat: NatClass::Unknown,
            candidates: Vec::new(),
        });
        let f = r.next(Duration::from_secs(5));
        assert!(matches!(f, Some(Frame::Registered { .. })), "{id} on {manager}: {f:?}");
        r
    }

    fn send(&mut self, f: Frame) {
        let mut b = Vec::new();
        f.encode(&mut b);
        self.s.write_all(&b).unwrap();
    }

    /// The next frame within `limit` (None: none, or the connection closed).
    fn next(&mut self, limit: Duration) -> Option<Frame> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(f) = self.dec.next_frame().unwrap() {
                return Some(f);
            }
            if Instant::now() >= deadline {
                return None;
            }
            let mut buf = [0u8; 4096];
            match self.s.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.dec.push(&buf[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return None,
            }
        }
    }

    /// Whether the manager closed the connection within `limit` (frames before it skipped).
    fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let mut buf = [0u8; 4096];
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// A call from `from` (on `manager`) to `callee` that must end ok, with media both ways.
fn call_ok(manager: &str, from: &str, callee: &str, secs: &str) -> Value {
    let p = peer(manager, from, &["call", callee, "--duration", secs, "--json"]);
    let (code, out, err) = p.finish(Duration::from_secs(30));
    assert_eq!(code, 0, "{from} -> {callee}: {err}");
    let r = json_line(&out);
    assert_eq!(r["result"], "ok", "{r}");
    r
}

#[test]
fn a_call_across_two_managers_carries_media_both_ways_and_calls_within_one_stay_off_nats() {
    let dir = Scratch::new("cluster-call");
    let nats = Nats::start(&dir, "n1");
    let a = cluster_manager(&nats.url(), "a", &[]);
    let b = cluster_manager(&nats.url(), "b", &[]);
    let bob = peer(&b.addr, "bob", &["listen", "--calls", "1", "--json"]);
    let carol = peer(&a.addr, "carol", &["listen", "--calls", "1", "--json"]);
    settle();
    let r = call_ok(&a.addr, "alice", "bob", "2");
    let (code, out, err) = bob.finish(Duration::from_secs(10));
    assert_eq!(code, 0, "bob: {err}");
    let rb = json_line(&out);
    for (who, r) in [("alice", &r), ("bob", &rb)] {
        let received = r["received"].as_u64().unwrap();
        assert!(received >= 90, "{who} received {received}: {r}");
        assert_eq!(r["lost"], 0, "{who}: {r}");
    }
    assert_eq!(r["call_id"], rb["call_id"]);
    call_ok(&a.addr, "dave", "carol", "1");
    let (code, _, err) = carol.finish(Duration::from_secs(10));
    assert_eq!(code, 0, "carol: {err}");
    let (sa, sb) = (a.stop(), b.stop());
    assert_eq!(sa["cluster_calls_out"], 1, "only the call across managers went out: {sa}");
    assert_eq!(sb["cluster_calls_in"], 1, "{sb}");
    assert_eq!(sa["calls_started"], 1, "the call within manager a was a's: {sa}");
    assert_eq!(sb["calls_started"], 1, "the call to bob was owned by bob's manager: {sb}");
    assert_eq!(sa["udp_media"], 0, "{sa}");
    drop(nats);
}

#[test]
fn a_registration_on_another_manager_closes_the_older_connection_within_100_ms() {
    let dir = Scratch::new("cluster-replace");
    let nats = Nats::start(&dir, "n1");
    let a = cluster_manager(&nats.url(), "a", &[]);
    let b = cluster_manager(&nats.url(), "b", &[]);
    let c = cluster_manager(&nats.url(), "c", &[]);
    let mut caller = Raw::register(&c.addr, "carol");
    for round in 0..3 {
        let mut old = Raw::register(&a.addr, "bob");
        // Let the first entry be written and seen everywhere.
        std::thread::sleep(Duration::from_millis(300));
        let mut new = Raw::register(&b.addr, "bob");
        let t0 = Instant::now();
        let f = old.next(Duration::from_secs(2));
        let took = t0.elapsed();
        assert!(matches!(f, Some(Frame::Error { code: ErrorCode::Replaced, .. })), "round {round}: {f:?}");
        assert!(old.closed_within(Duration::from_millis(100)), "round {round}: the old connection stays open");
        assert!(took < Duration::from_millis(100), "round {round}: replaced after {took:?}");
        // A call now rings the new connection, never the old one.
        caller.send(Frame::Call { call_ref: round + 1, callee: ClientId::new("bob").unwrap(), keys: None });
        let f = new.next(Duration::from_secs(2));
        let Some(Frame::Incoming { call_id, .. }) = f else { panic!("round {round}: the new bob was not rung: {f:?}") };
        new.send(Frame::Reject {
            call_ref: 0,
            call_id,
            reason: proto::wire::frame::RejectReason::Declined,
            callee_nat: NatClass::Unknown,
        });
        let f = caller.next(Duration::from_secs(2));
        assert!(matches!(f, Some(Frame::Reject { .. })), "round {round}: {f:?}");
        drop(new);
        std::thread::sleep(Duration::from_millis(100));
    }
    let sa = a.stop();
    assert_eq!(sa["cluster_replaced"], 3, "{sa}");
    drop((b, c, nats));
}

#[test]
fn a_manager_killed_mid_call_leaves_the_media_running_and_new_calls_succeed() {
    let dir = Scratch::new("cluster-kill");
    let nats = Nats::start(&dir, "n1");
    let a = cluster_manager(&nats.url(), "a", &[]);
    let mut b = cluster_manager(&nats.url(), "b", &[]);
    let c = cluster_manager(&nats.url(), "c", &[]);
    // bob's listen ends by itself: with his manager gone, alice's HANGUP cannot reach him
    // (he would wait for his media timeout).
    let bob = peer(&b.addr, "bob", &["listen", "--duration", "9", "--json"]);
    let erin = peer(&c.addr, "erin", &["listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer(&a.addr, "alice", &["call", "bob", "--duration", "5", "--json"]);
    std::thread::sleep(Duration::from_millis(2000));
    // kill -9 bob's manager in the middle of the call.
    b.proc.child.kill().unwrap();
    let _ = b.proc.child.wait();
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(30));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    for (who, r) in [("alice", json_line(&out_a)), ("bob", json_line(&out_b))] {
        assert_eq!(r["result"], "ok", "{who}: {r}");
        assert_eq!(r["lost"], 0, "{who}: {r}");
        let received = r["received"].as_u64().unwrap();
        assert!(received >= 230, "{who}: media went on after the manager died: {r}");
    }
    // New calls succeed, across the survivors.
    call_ok(&a.addr, "frank", "erin", "1");
    let (code, _, err) = erin.finish(Duration::from_secs(10));
    assert_eq!(code, 0, "erin: {err}");
    // bob's manager is gone: calling bob now says so at once.
    let p = peer(&a.addr, "gina", &["call", "bob", "--duration", "1", "--json"]);
    let (code, out, _) = p.finish(Duration::from_secs(15));
    assert_eq!(code, 1);
    assert_eq!(json_line(&out)["result"], "unknown callee (offline)");
    let sa = a.stop();
    assert!(sa["cluster_nodes_gone"].as_u64().unwrap() >= 1, "a saw b go: {sa}");
    drop((c, nats));
}

#[test]
fn with_nats_down_calls_across_managers_fail_at_once_calls_within_one_go_on_and_it_heals() {
    let dir = Scratch::new("cluster-nats-down");
    let mut nats = Nats::start(&dir, "n1");
    let a = cluster_manager(&nats.url(), "a", &[]);
    let b = cluster_manager(&nats.url(), "b", &[]);
    let bob = peer(&b.addr, "bob", &["listen", "--duration", "60", "--json"]);
    let carol = peer(&a.addr, "carol", &["listen", "--duration", "60", "--json"]);
    settle();
    call_ok(&a.addr, "alice", "bob", "1");
    nats.kill();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let p = peer(&a.addr, "alice", &["call", "bob", "--duration", "1", "--json"]);
    let (code, out, err) = p.finish(Duration::from_secs(15));
    let took = t0.elapsed();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ClusterDown"), "the reason is given: {err}");
    assert!(json_line(&out)["result"].as_str().unwrap().contains("ClusterDown"), "{out}");
    assert!(took < Duration::from_secs(1), "failed after {took:?} (peer start included)");
    // Within one manager, calls go on.
    call_ok(&a.addr, "dave", "carol", "1");
    // NATS back (same port, same storage): the cluster heals by itself.
    nats.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = peer(&a.addr, "alice", &["call", "bob", "--duration", "1", "--json"]);
        let (code, out, _) = p.finish(Duration::from_secs(15));
        if code == 0 {
            assert_eq!(json_line(&out)["result"], "ok");
            break;
        }
        assert!(Instant::now() < deadline, "no call across managers 20 s after NATS came back: {out}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let sa = a.stop();
    assert!(sa["cluster_unavailable"].as_u64().unwrap() >= 1, "{sa}");
    drop((b, bob, carol));
}

#[test]
fn a_three_server_nats_cluster_survives_losing_one_server() {
    let dir = Scratch::new("cluster-nats3");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_tcp_port(), free_tcp_port())).collect();
    let routes: Vec<String> = ports.iter().map(|(_, r)| format!("nats://127.0.0.1:{r}")).collect();
    let mut servers: Vec<Nats> = ports
        .iter()
        .enumerate()
        .map(|(i, (p, r))| {
            let extra = vec![
                "--cluster_name".into(),
                "np".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{r}"),
                "--routes".into(),
                routes.join(","),
            ];
            Nats::start_with(&dir, &format!("n{i}"), *p, &extra)
        })
        .collect();
    let urls: Vec<String> = servers.iter().map(Nats::url).collect();
    // a prefers the first server, b the second.
    let a = cluster_manager(&urls.join(","), "a", &["--cluster-replicas", "3"]);
    let b = cluster_manager(
        &[&urls[1], &urls[2], &urls[0]].map(|s| s.as_str()).join(","),
        "b",
        &["--cluster-replicas", "3"],
    );
    let bob = peer(&b.addr, "bob", &["listen", "--duration", "90", "--json"]);
    // The JetStream cluster elects its leaders first: wait until a call goes through.
    let ok = |who: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = peer(&a.addr, who, &["call", "bob", "--duration", "1", "--json"]);
            let (code, out, _) = p.finish(Duration::from_secs(15));
            if code == 0 {
                return json_line(&out);
            }
            assert!(Instant::now() < deadline, "{who}: no call across managers: {out}");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    ok("alice");
    servers[0].kill();
    let t0 = Instant::now();
    let r = ok("alice2");
    assert_eq!(r["result"], "ok");
    assert!(t0.elapsed() < Duration::from_secs(15), "took {:?} to work again", t0.elapsed());
    drop((a, b, bob, servers));
}
