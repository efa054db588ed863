//! End-to-end tests of the manager: each test starts a real manager in-process (two shards,
//! port 0 on 127.0.0.1) and talks to it over real `TcpStream`s and `UdpSocket`s on
//! 127.0.0.1 only, checking the frames a client sees and the counters an operator sees.
//!
//! Layout: helpers (manager start, [`Client`], ids per home shard, bounded waits), then the
//! tests grouped by topic: STUN and registration, calls, refusals, protocol errors, timers
//! and disconnects, shutdown, UDP counters. Every wait is bounded in count and in time.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use manager::{AltPort, ManagerConfig, ManagerHandle};
use proto::shard::stats::Stats;
use proto::shard::{home_shard, owner_shard, ShardConfig};
use proto::wire::frame::{
    AddrSource, CallId, ClientId, ErrorCode, Frame, FrameDecoder, HangupReason, RejectReason, UnknownReason,
};
use proto::wire::stun::{self, StunMessage};

// ---------------------------------------------------------------------------------- helpers

/// How long a client waits for a frame it expects (or for the close it expects).
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client listens to show that nothing (more) arrives.
const QUIET: Duration = Duration::from_millis(150);
/// Shards of every test manager.
const SHARDS: u16 = 2;
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn manager() -> ManagerHandle {
    manager_with(ShardConfig::default())
}

/// Start a manager with two shards on 127.0.0.1:0.
fn manager_with(shard: ShardConfig) -> ManagerHandle {
    let m = start_on_any_port(ManagerConfig { shards: SHARDS as usize, shard, ..Default::default() });
    assert_eq!(m.shards(), SHARDS as usize);
    assert_eq!(m.local_addr().ip(), LOCALHOST);
    assert_ne!(m.local_addr().port(), 0);
    m
}

/// Start a manager as `cfg` says, on port 0 of its address (127.0.0.1 unless `cfg` names
/// another). The TCP port is picked by the kernel and the UDP socket then binds the same
/// number, which can (rarely) be taken by some other UDP socket: retry a few times then.
fn start_on_any_port(cfg: ManagerConfig) -> ManagerHandle {
    let ip = if cfg.listen.port() == 0 { cfg.listen.ip() } else { LOCALHOST };
    let mut last = None;
    for _ in 0..5 {
        match manager::start(ManagerConfig { listen: SocketAddr::new(ip, 0), ..cfg.clone() }) {
            Ok(m) => return m,
            Err(e) => last = Some(e),
        }
    }
    panic!("manager did not start: {last:?}");
}

fn id(s: &str) -> ClientId {
    ClientId::new(s).unwrap()
}

/// The first id `{prefix}-{i}` whose home shard (among [`SHARDS`]) is `shard`.
fn id_on(prefix: &str, shard: u16) -> ClientId {
    (0..1000)
        .map(|i| id(&format!("{prefix}-{i}")))
        .find(|c| home_shard(c, SHARDS) == shard)
        .expect("some id hashes to every shard")
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Poll `cond` every 5 ms for at most 5 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + IO_TIMEOUT;
    for _ in 0..2000 {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("timed out waiting until {what}");
}

/// Wait until `connections_closed` reaches `n`, then a little longer so that the closing
/// shard's follow-up messages (unregister, party gone) have reached the other shard.
fn wait_closed(stats: &Stats, n: u64) {
    wait_until(&format!("connections_closed == {n}"), || get(&stats.connections_closed) >= n);
    std::thread::sleep(Duration::from_millis(200));
}

/// What a client saw next.
#[derive(Debug)]
enum Next {
    Frame(Frame),
    Closed,
    Timeout,
}

/// A test client: a TCP connection to the manager with a frame decoder.
struct Client {
    name: String,
    stream: TcpStream,
    dec: FrameDecoder,
    closed: bool,
}

impl Client {
    fn connect(m: &ManagerHandle, name: &str) -> Client {
        let stream = TcpStream::connect(m.local_addr()).expect("connect to manager");
        stream.set_nodelay(true).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Client { name: name.to_string(), stream, dec: FrameDecoder::new(), closed: false }
    }

    fn send(&mut self, f: &Frame) {
        let mut buf = Vec::new();
        f.encode(&mut buf);
        self.send_raw(&buf);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap_or_else(|e| panic!("{}: write failed: {e}", self.name));
    }

    /// The next frame, the close of the connection, or nothing within `timeout`.
    fn next(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => return Next::Frame(f),
                Ok(None) => {}
                Err(e) => panic!("{}: the manager sent an undecodable frame: {e}", self.name),
            }
            if self.closed {
                return Next::Closed;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Timeout;
            }
            self.stream.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            match self.stream.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.dec.push(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                // Reset or aborted: closed too.
                Err(_) => self.closed = true,
            }
        }
    }

    /// The next frame; panics if the connection closes or nothing arrives in time.
    #[track_caller]
    fn recv(&mut self) -> Frame {
        match self.next(IO_TIMEOUT) {
            Next::Frame(f) => f,
            other => panic!("{}: expected a frame, got {other:?}", self.name),
        }
    }

    /// The next frame must be ERROR with `code`.
    #[track_caller]
    fn expect_error(&mut self, code: ErrorCode) {
        match self.recv() {
            Frame::Error { code: c, .. } if c == code => {}
            other => panic!("{}: expected ERROR {code:?}, got {other:?}", self.name),
        }
    }

    /// The manager must close the connection with nothing more sent first.
    #[track_caller]
    fn expect_closed(&mut self) {
        match self.next(IO_TIMEOUT) {
            Next::Closed => {}
            other => panic!("{}: expected the connection to be closed, got {other:?}", self.name),
        }
    }

    /// Nothing arrives (and the connection stays open) for a short while.
    #[track_caller]
    fn expect_quiet(&mut self) {
        match self.next(QUIET) {
            Next::Timeout => {}
            other => panic!("{}: expected nothing, got {other:?}", self.name),
        }
    }

    /// PING is answered by PONG with the same nonce: the connection is alive and in sync.
    #[track_caller]
    fn ping(&mut self, nonce: u64) {
        self.send(&Frame::Ping { nonce });
        match self.recv() {
            Frame::Pong { nonce: n } if n == nonce => {}
            other => panic!("{}: expected PONG {nonce}, got {other:?}", self.name),
        }
    }

    /// REGISTER (one call at a time, no STUN binding); returns the announced public address.
    #[track_caller]
    fn register(&mut self, who: &ClientId, udp_port: u16) -> SocketAddr {
        let (public, source) = self.register_with(who, udp_port, 1, None);
        assert_eq!(source, AddrSource::TcpPeer, "{}: no binding was named", self.name);
        assert_eq!(public, SocketAddr::new(LOCALHOST, udp_port), "{}: TCP peer ip + udp_port", self.name);
        public
    }

    #[track_caller]
    fn register_with(
        &mut self,
        who: &ClientId,
        udp_port: u16,
        max_calls: u16,
        binding: Option<[u8; 12]>,
    ) -> (SocketAddr, AddrSource) {
        self.send(&Frame::Register {
            id: who.clone(),
            udp_port,
            max_calls,
            binding,
            auth: None,
            nat: proto::nat::NatClass::Unknown,
            candidates: Vec::new(),
        });
        match self.recv() {
            Frame::Registered { public, source } => (public, source),
            other => panic!("{}: expected REGISTERED, got {other:?}", self.name),
        }
    }

    /// CALL `callee`; returns nothing (the answer comes later).
    fn call(&mut self, call_ref: u32, callee: &ClientId) {
        self.send(&Frame::Call { call_ref, callee: callee.clone(), keys: None });
    }

    /// The next frame must be INCOMING from `caller` at `caller_addr`; returns (call id, token).
    #[track_caller]
    fn expect_incoming(&mut self, caller: &ClientId, caller_addr: SocketAddr) -> (CallId, u64) {
        match self.recv() {
            Frame::Incoming { call_id, token, caller: c, caller_addr: a, .. } => {
                assert_eq!(&c, caller, "{}: INCOMING caller", self.name);
                assert_eq!(a, caller_addr, "{}: INCOMING caller_addr", self.name);
                assert_ne!(call_id, CallId(0), "{}: call id 0 means none", self.name);
                (call_id, token)
            }
            other => panic!("{}: expected INCOMING, got {other:?}", self.name),
        }
    }
}

/// A UDP socket on 127.0.0.1 and the manager's answer to its binding request with `txid`.
fn stun_bind(m: &ManagerHandle, txid: [u8; 12]) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut req = [0u8; stun::REQUEST_LEN];
    let n = stun::emit_binding_request(&txid, &mut req);
    assert_eq!(n, stun::REQUEST_LEN);
    let mut buf = [0u8; 512];
    // UDP: a few attempts, each waiting one second.
    for _ in 0..5 {
        sock.send_to(&req[..n], m.local_addr()).unwrap();
        let Ok((len, from)) = sock.recv_from(&mut buf) else { continue };
        assert_eq!(from, m.local_addr(), "the answer comes from the manager's port");
        match stun::parse(&buf[..len]) {
            Ok(StunMessage::BindingSuccess { txid: t, mapped, .. }) => {
                assert_eq!(t, txid, "same transaction id");
                assert_eq!(mapped, sock.local_addr().unwrap(), "mapped address is the request's source");
                return sock;
            }
            other => panic!("expected a binding success response, got {other:?}"),
        }
    }
    panic!("no STUN answer");
}

/// Ask `to` for a binding from `sock`; (mapped, other).
fn stun_ask(sock: &UdpSocket, to: SocketAddr, txid: [u8; 12]) -> (SocketAddr, Option<SocketAddr>) {
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut req = [0u8; stun::REQUEST_LEN];
    let n = stun::emit_binding_request(&txid, &mut req);
    let mut buf = [0u8; 512];
    for _ in 0..5 {
        sock.send_to(&req[..n], to).unwrap();
        let Ok((len, from)) = sock.recv_from(&mut buf) else { continue };
        assert_eq!(from, to, "the answer comes from the address asked");
        match stun::parse(&buf[..len]) {
            Ok(StunMessage::BindingSuccess { txid: t, mapped, other }) if t == txid => return (mapped, other),
            other => panic!("expected a binding success response, got {other:?}"),
        }
    }
    panic!("no STUN answer from {to}");
}

// ---------------------------------------------------------------- STUN and registration

#[test]
fn each_stun_answer_names_the_next_address_and_alternate_bindings_are_not_kept() {
    // Main port -> alternate IP -> alternate port (the listen port + 1) -> none: a client that
    // asks the main port learns every destination it can compare its mappings towards.
    let m = start_on_any_port(ManagerConfig {
        shards: SHARDS as usize,
        alt_listen: Some("127.0.0.2:0".parse().unwrap()),
        ..Default::default()
    });
    let main = m.local_addr();
    let [alt_port, alt_ip] = m.alt_addrs() else { panic!("two alternates: {:?}", m.alt_addrs()) };
    assert_eq!(*alt_port, SocketAddr::new(main.ip(), main.port() + 1));
    assert_eq!(alt_ip.ip(), "127.0.0.2".parse::<std::net::IpAddr>().unwrap());
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let me = sock.local_addr().unwrap();
    let mut chain = vec![main];
    let mut next = Some(main);
    while let Some(to) = next {
        let (mapped, other) = stun_ask(&sock, to, [chain.len() as u8; 12]);
        assert_eq!(mapped, me, "no NAT on loopback: the mapping is the socket");
        next = other;
        chain.extend(other);
        assert!(chain.len() <= 3, "the chain ends: {chain:?}");
    }
    assert_eq!(chain, vec![main, *alt_ip, *alt_port]);
    assert_eq!(get(&m.stats().stun_requests), 3);
    assert_eq!(get(&m.stats().stun_alt_requests), 2);

    // A binding learnt on an alternate address is not one a REGISTER can name.
    let mut a = Client::connect(&m, "alice");
    let (public, source) = a.register_with(&id("alice"), 9, 1, Some([2; 12]));
    assert_eq!((public, source), (SocketAddr::new(LOCALHOST, 9), AddrSource::TcpPeer));
    m.shutdown();
}

#[test]
fn with_alt_port_off_the_answer_names_no_other_address() {
    let m = start_on_any_port(ManagerConfig { shards: 1, alt_port: AltPort::Off, ..Default::default() });
    assert!(m.alt_addrs().is_empty());
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(stun_ask(&sock, m.local_addr(), [7; 12]), (sock.local_addr().unwrap(), None));
}

#[test]
fn stun_binding_gives_the_public_address_used_by_register() {
    let m = manager();
    let txid = *b"nullpunch-tx";
    let udp = stun_bind(&m, txid);
    let udp_addr = udp.local_addr().unwrap();
    assert!(get(&m.stats().stun_requests) >= 1);

    // REGISTER naming the binding: the public address is the UDP socket's, not udp_port.
    let mut a = Client::connect(&m, "alice");
    let (public, source) = a.register_with(&id("alice"), 9, 1, Some(txid));
    assert_eq!(source, AddrSource::Stun);
    assert_eq!(public, udp_addr);

    // A binding is used once: naming it again falls back to the TCP peer.
    let mut b = Client::connect(&m, "bob");
    let (public, source) = b.register_with(&id("bob"), 9, 1, Some(txid));
    assert_eq!(source, AddrSource::TcpPeer);
    assert_eq!(public, SocketAddr::new(LOCALHOST, 9));

    // REGISTER without a binding: TCP peer ip and the given udp_port.
    let mut c = Client::connect(&m, "carol");
    let (public, source) = c.register_with(&id("carol"), 4242, 1, None);
    assert_eq!(source, AddrSource::TcpPeer);
    assert_eq!(public, SocketAddr::new(LOCALHOST, 4242));

    // An unknown binding also falls back.
    let mut d = Client::connect(&m, "dave");
    let (public, source) = d.register_with(&id("dave"), 5000, 1, Some([0xEE; 12]));
    assert_eq!(source, AddrSource::TcpPeer);
    assert_eq!(public, SocketAddr::new(LOCALHOST, 5000));

    let s = m.stats();
    assert_eq!(get(&s.registrations), 4);
    assert_eq!(get(&s.udp_malformed), 0);
    assert_eq!(get(&s.udp_non_stun), 0);
}

#[test]
fn a_registration_right_after_its_stun_answer_always_finds_the_binding() {
    // The binding travels to its shard's inbox before the answer leaves, and the REGISTER
    // that names it goes through that same inbox (even when it is the connection's own
    // shard), so however the shards' threads are scheduled the binding is there first.
    // 150 clients, each registering the moment it has its answer, with transaction ids
    // spread over both shards.
    let m = manager();
    for k in 0..150u8 {
        let mut txid = [k; 12];
        txid[0] = k.wrapping_mul(37);
        let udp = stun_bind(&m, txid);
        let name = format!("c{k}");
        let mut c = Client::connect(&m, &name);
        let (public, source) = c.register_with(&id(&name), 9, 1, Some(txid));
        assert_eq!((public, source), (udp.local_addr().unwrap(), AddrSource::Stun), "client {k}");
    }
    assert_eq!(get(&m.stats().stun_table_full), 0);
}

#[test]
fn register_twice_on_one_connection_is_unexpected_but_not_fatal() {
    let m = manager();
    let mut a = Client::connect(&m, "alice");
    a.register(&id("alice"), 1000);
    a.send(&Frame::Register {
        id: id("alice2"),
        udp_port: 1001,
        max_calls: 1,
        binding: None,
        auth: None,
        nat: proto::nat::NatClass::Unknown,
        candidates: Vec::new(),
    });
    a.expect_error(ErrorCode::Unexpected);
    a.ping(1);
    // A manager-to-client frame from a client is unexpected too.
    a.send(&Frame::Busy { call_ref: 3 });
    a.expect_error(ErrorCode::Unexpected);
    a.ping(2);
    assert_eq!(get(&m.stats().frames_unexpected), 2);
    assert_eq!(get(&m.stats().registrations), 1);
}

// -------------------------------------------------------------------------------- calls

/// A whole call on a fresh manager: register, CALL, INCOMING, PUNCHED, START, HANGUP.
fn full_call(alice_id: &ClientId, bob_id: &ClientId, bob_hangs_up: bool) {
    let m = manager();
    let mut alice = Client::connect(&m, "alice");
    let mut bob = Client::connect(&m, "bob");
    let alice_pub = alice.register(alice_id, 40001);
    let bob_pub = bob.register(bob_id, 40002);

    alice.call(7, bob_id);
    let (call_id, token) = bob.expect_incoming(alice_id, alice_pub);
    assert_eq!(owner_shard(call_id), home_shard(bob_id, SHARDS), "the callee's home shard owns the call");

    bob.send(&Frame::Punched { call_id, udp_port: bob_pub.port(), keys: None });
    match alice.recv() {
        Frame::Start { call_ref, call_id: c, token: t, callee_addr, .. } => {
            assert_eq!(call_ref, 7);
            assert_eq!(c, call_id);
            assert_eq!(t, token, "START and INCOMING carry the same token");
            assert_eq!(callee_addr, bob_pub);
        }
        other => panic!("alice: expected START, got {other:?}"),
    }
    assert_eq!(get(&m.stats().calls_started), 1);

    // A duplicate PUNCHED is counted and otherwise ignored.
    bob.send(&Frame::Punched { call_id, udp_port: bob_pub.port(), keys: None });
    alice.expect_quiet();
    wait_until("frames_duplicate == 1", || get(&m.stats().frames_duplicate) == 1);

    let (from, to) = if bob_hangs_up { (&mut bob, &mut alice) } else { (&mut alice, &mut bob) };
    from.send(&Frame::Hangup { call_id, reason: HangupReason::Normal });
    match to.recv() {
        Frame::Hangup { call_id: c, reason } => {
            assert_eq!(c, call_id);
            assert_eq!(reason, HangupReason::Normal);
        }
        other => panic!("{}: expected HANGUP, got {other:?}", to.name),
    }
    from.expect_quiet();
    // Both still connected and registered.
    alice.ping(1);
    bob.ping(2);

    let s = m.stats();
    assert_eq!(get(&s.calls_requested), 1);
    assert_eq!(get(&s.calls_started), 1);
    assert_eq!(get(&s.calls_ended), 1);
    assert_eq!(get(&s.calls_rejected), 0);
    assert_eq!(get(&s.hangups_unknown_call), 0);
    assert_eq!(get(&s.frames_malformed), 0);
    assert_eq!(get(&s.frames_unexpected), 0);
}

/// Several runs each, because which shard accepts a connection is the kernel's choice.
#[test]
fn full_call_between_ids_on_different_home_shards() {
    for round in 0..4u16 {
        let alice = id_on(&format!("alice{round}"), round % SHARDS);
        let bob = id_on(&format!("bob{round}"), (round + 1) % SHARDS);
        assert_ne!(home_shard(&alice, SHARDS), home_shard(&bob, SHARDS));
        full_call(&alice, &bob, round % 2 == 1);
    }
}

#[test]
fn full_call_between_ids_on_the_same_home_shard() {
    for round in 0..4u16 {
        let alice = id_on(&format!("alice{round}"), round % SHARDS);
        let bob = id_on(&format!("bob{round}"), round % SHARDS);
        full_call(&alice, &bob, round % 2 == 1);
    }
}

#[test]
fn start_gives_the_stun_address_of_a_callee_registered_with_a_binding() {
    let m = manager();
    let udp = stun_bind(&m, [0x42; 12]);
    let mut alice = Client::connect(&m, "alice");
    let mut bob = Client::connect(&m, "bob");
    let alice_pub = alice.register(&id("alice"), 40001);
    let (bob_pub, source) = bob.register_with(&id("bob"), 9, 1, Some([0x42; 12]));
    assert_eq!((bob_pub, source), (udp.local_addr().unwrap(), AddrSource::Stun));

    alice.call(1, &id("bob"));
    let (call_id, token) = bob.expect_incoming(&id("alice"), alice_pub);
    // The port in PUNCHED is the local one; the STUN-mapped address wins.
    bob.send(&Frame::Punched { call_id, udp_port: 9, keys: None });
    assert_eq!(
        alice.recv(),
        Frame::Start {
            call_ref: 1,
            call_id,
            token,
            callee_addr: bob_pub,
            callee_nat: proto::nat::NatClass::Unknown,
            callee_candidates: Vec::new(),
            callee_keys: None
        }
    );
}

#[test]
fn callee_declines_with_reject() {
    let m = manager();
    let mut alice = Client::connect(&m, "alice");
    let mut bob = Client::connect(&m, "bob");
    let alice_pub = alice.register(&id("alice"), 1);
    bob.register(&id("bob"), 2);
    alice.call(11, &id("bob"));
    let (call_id, _) = bob.expect_incoming(&id("alice"), alice_pub);
    bob.send(&Frame::Reject {
        call_ref: 0,
        call_id,
        reason: RejectReason::Declined,
        callee_nat: proto::nat::NatClass::Unknown,
    });
    assert_eq!(
        alice.recv(),
        Frame::Reject {
            call_ref: 11,
            call_id,
            reason: RejectReason::Declined,
            callee_nat: proto::nat::NatClass::Unknown
        }
    );
    assert_eq!(get(&m.stats().calls_rejected), 1);
    assert_eq!(get(&m.stats().calls_ended), 1);
    // The call is gone: PUNCHED now names an unknown call.
    bob.send(&Frame::Punched { call_id, udp_port: 2, keys: None });
    bob.expect_error(ErrorCode::UnknownCall);
}

// ---------------------------------------------------------------------------- refusals

#[test]
fn call_to_unknown_callee_never_registered_then_offline() {
    let m = manager();
    let mut alice = Client::connect(&m, "alice");
    let alice_pub = alice.register(&id("alice"), 1);

    alice.call(21, &id("nobody"));
    assert_eq!(alice.recv(), Frame::Unknown { call_ref: 21, reason: UnknownReason::NeverRegistered });

    let mut bob = Client::connect(&m, "bob");
    bob.register(&id("bob"), 2);
    // Bob is reachable while connected...
    alice.call(22, &id("bob"));
    let (call_id, _) = bob.expect_incoming(&id("alice"), alice_pub);
    bob.send(&Frame::Reject {
        call_ref: 0,
        call_id,
        reason: RejectReason::Declined,
        callee_nat: proto::nat::NatClass::Unknown,
    });
    assert_eq!(
        alice.recv(),
        Frame::Reject {
            call_ref: 22,
            call_id,
            reason: RejectReason::Declined,
            callee_nat: proto::nat::NatClass::Unknown
        }
    );
    // ...and offline once he disconnects.
    drop(bob);
    wait_closed(m.stats(), 1);
    alice.call(23, &id("bob"));
    assert_eq!(alice.recv(), Frame::Unknown { call_ref: 23, reason: UnknownReason::Offline });

    let s = m.stats();
    assert_eq!(get(&s.calls_unknown), 2);
    assert_eq!(get(&s.calls_requested), 3);
    assert_eq!(get(&s.calls_started), 0);
}

#[test]
fn busy_callee_then_free_again() {
    let m = manager();
    let mut alice = Client::connect(&m, "alice");
    let mut bob = Client::connect(&m, "bob");
    let mut carol = Client::connect(&m, "carol");
    let alice_pub = alice.register(&id("alice"), 1);
    let (_, _) = bob.register_with(&id("bob"), 2, 1, None);
    let carol_pub = carol.register(&id("carol"), 3);

    alice.call(1, &id("bob"));
    let (first, _) = bob.expect_incoming(&id("alice"), alice_pub);
    carol.call(31, &id("bob"));
    assert_eq!(carol.recv(), Frame::Busy { call_ref: 31 });
    bob.expect_quiet();
    assert_eq!(get(&m.stats().calls_busy), 1);

    alice.send(&Frame::Hangup { call_id: first, reason: HangupReason::Normal });
    assert_eq!(bob.recv(), Frame::Hangup { call_id: first, reason: HangupReason::Normal });

    carol.call(32, &id("bob"));
    let (second, _) = bob.expect_incoming(&id("carol"), carol_pub);
    assert_ne!(second, first);
    let s = m.stats();
    assert_eq!(get(&s.calls_busy), 1);
    assert_eq!(get(&s.calls_ended), 1);
    assert_eq!(get(&s.calls_requested), 3);
}

#[test]
fn duplicate_registration_replaces_the_older_connection() {
    let m = manager();
    let mut a = Client::connect(&m, "dup-old");
    a.register(&id("dup"), 1);
    let mut b = Client::connect(&m, "dup-new");
    let b_pub = b.register(&id("dup"), 2);
    assert_eq!(b_pub, SocketAddr::new(LOCALHOST, 2));
    a.expect_error(ErrorCode::Replaced);
    a.expect_closed();

    let mut caller = Client::connect(&m, "caller");
    let caller_pub = caller.register(&id("caller"), 3);
    caller.call(5, &id("dup"));
    let (call_id, token) = b.expect_incoming(&id("caller"), caller_pub);
    b.send(&Frame::Punched { call_id, udp_port: 2, keys: None });
    assert_eq!(
        caller.recv(),
        Frame::Start {
            call_ref: 5,
            call_id,
            token,
            callee_addr: b_pub,
            callee_nat: proto::nat::NatClass::Unknown,
            callee_candidates: Vec::new(),
            callee_keys: None
        }
    );

    let s = m.stats();
    assert_eq!(get(&s.registrations), 3);
    assert_eq!(get(&s.registrations_replaced), 1);
    // The old connection's close must not unregister the new one.
    wait_closed(s, 1);
    let mut again = Client::connect(&m, "caller2");
    again.register(&id("caller2"), 4);
    again.call(6, &id("dup"));
    // dup is registered (max_calls 1, in a call): BUSY, not UNKNOWN.
    assert_eq!(again.recv(), Frame::Busy { call_ref: 6 });
}

// --------------------------------------------------------------------- protocol errors

#[test]
fn unknown_frame_type_is_malformed_and_closes() {
    let m = manager();
    let mut c = Client::connect(&m, "c");
    c.send_raw(&[0x00, 0x02, 0x01, 0x7f]);
    c.expect_error(ErrorCode::Malformed);
    c.expect_closed();
    let s = m.stats();
    assert_eq!(get(&s.frames_malformed), 1);
    assert_eq!(get(&s.frames_oversized), 0);
    wait_closed(s, 1);
}

#[test]
fn unsupported_version_is_reported_and_closes() {
    let m = manager();
    let mut c = Client::connect(&m, "c");
    // A PING with version 2.
    c.send_raw(&[0x00, 0x0a, 0x02, 0x0b, 0, 0, 0, 0, 0, 0, 0, 1]);
    c.expect_error(ErrorCode::UnsupportedVersion);
    c.expect_closed();
    // Counted with the malformed frames.
    assert_eq!(get(&m.stats().frames_malformed), 1);
    assert_eq!(get(&m.stats().frames_oversized), 0);
}

#[test]
fn oversized_length_prefix_is_refused_at_once() {
    let m = manager();
    let mut c = Client::connect(&m, "c");
    let t = Instant::now();
    // Only the prefix: the manager must not wait for 65535 more bytes.
    c.send_raw(&[0xff, 0xff]);
    c.expect_error(ErrorCode::Oversized);
    c.expect_closed();
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    assert_eq!(get(&m.stats().frames_oversized), 1);
    assert_eq!(get(&m.stats().frames_malformed), 0);
}

#[test]
fn a_frame_split_over_many_writes_is_reassembled() {
    let m = manager();
    let mut c = Client::connect(&m, "c");
    let mut ping = Vec::new();
    Frame::Ping { nonce: 0x0102_0304_0506_0708 }.encode(&mut ping);
    for b in &ping {
        c.send_raw(&[*b]);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(c.recv(), Frame::Pong { nonce: 0x0102_0304_0506_0708 });
    // Two frames in one write, the second split in the middle of the next write.
    let mut two = Vec::new();
    Frame::Ping { nonce: 1 }.encode(&mut two);
    Frame::Ping { nonce: 2 }.encode(&mut two);
    let cut = two.len() - 5;
    c.send_raw(&two[..cut]);
    assert_eq!(c.recv(), Frame::Pong { nonce: 1 });
    std::thread::sleep(Duration::from_millis(20));
    c.send_raw(&two[cut..]);
    assert_eq!(c.recv(), Frame::Pong { nonce: 2 });
    assert_eq!(get(&m.stats().frames_malformed), 0);
}

#[test]
fn call_before_register_is_an_error_but_keeps_the_connection() {
    let m = manager();
    let mut c = Client::connect(&m, "c");
    c.call(1, &id("bob"));
    c.expect_error(ErrorCode::NotRegistered);
    c.ping(9);
    c.send(&Frame::Hangup { call_id: CallId(1), reason: HangupReason::Normal });
    c.expect_error(ErrorCode::NotRegistered);
    c.ping(10);
    // It can still register afterwards.
    c.register(&id("late"), 7);
    let s = m.stats();
    assert_eq!(get(&s.frames_unexpected), 2);
    assert_eq!(get(&s.calls_requested), 0);
    assert_eq!(get(&s.connections_closed), 0);
}

#[test]
fn self_call_unknown_call_and_not_party() {
    let m = manager();
    let mut alice = Client::connect(&m, "alice");
    let mut bob = Client::connect(&m, "bob");
    let mut carol = Client::connect(&m, "carol");
    let alice_pub = alice.register(&id("alice"), 1);
    bob.register(&id("bob"), 2);
    carol.register(&id("carol"), 3);

    alice.call(41, &id("alice"));
    assert_eq!(
        alice.recv(),
        Frame::Reject {
            call_ref: 41,
            call_id: CallId(0),
            reason: RejectReason::SelfCall,
            callee_nat: proto::nat::NatClass::Unknown
        }
    );
    assert_eq!(get(&m.stats().calls_rejected), 1);

    // Unknown call ids owned by either shard.
    for owner in 0..SHARDS {
        let call_id = CallId(((owner as u64) << 48) | 0xABCDEF);
        bob.send(&Frame::Punched { call_id, udp_port: 2, keys: None });
        bob.expect_error(ErrorCode::UnknownCall);
    }

    alice.call(42, &id("bob"));
    let (call_id, _) = bob.expect_incoming(&id("alice"), alice_pub);
    // Neither a stranger nor the caller may answer for the callee.
    carol.send(&Frame::Punched { call_id, udp_port: 3, keys: None });
    carol.expect_error(ErrorCode::NotParty);
    alice.send(&Frame::Punched { call_id, udp_port: 1, keys: None });
    alice.expect_error(ErrorCode::NotParty);
    // Nor hang it up.
    carol.send(&Frame::Hangup { call_id, reason: HangupReason::Normal });
    carol.expect_error(ErrorCode::NotParty);
    bob.expect_quiet();
    alice.expect_quiet();
    assert_eq!(get(&m.stats().calls_started), 0);
    // The call is still intact.
    bob.send(&Frame::Punched { call_id, udp_port: 2, keys: None });
    match alice.recv() {
        Frame::Start { call_ref: 42, call_id: c, .. } => assert_eq!(c, call_id),
        other => panic!("alice: expected START, got {other:?}"),
    }
    assert_eq!(get(&m.stats().calls_started), 1);
    for c in [&mut alice, &mut bob, &mut carol] {
        c.ping(0);
    }
}

/// A call id's top 16 bits name the owning shard, and a client can put any value there. For
/// an id naming a shard that does not exist the manager must answer like for any unknown
/// call and keep the connection, not index past its list of shards.
fn call_id_naming_a_missing_shard(frame: Frame, answer: Option<ErrorCode>) {
    let m = manager();
    let mut bob = Client::connect(&m, "bob");
    bob.register(&id("bob"), 2);
    bob.send(&frame);
    if let Some(code) = answer {
        bob.expect_error(code);
    }
    bob.ping(1);
    assert_eq!(get(&m.stats().connections_closed), 0);
    // Ignored, but counted: a HANGUP or REJECT for a call that cannot exist.
    let ignored = if answer.is_none() { 1 } else { 0 };
    assert_eq!(get(&m.stats().hangups_unknown_call), ignored);
    // Bob is still reachable.
    let mut alice = Client::connect(&m, "alice");
    let alice_pub = alice.register(&id("alice"), 1);
    alice.call(1, &id("bob"));
    bob.expect_incoming(&id("alice"), alice_pub);
}

const MISSING_SHARD: CallId = CallId(0xFFFF_0000_0000_0001);

#[test]
fn punched_for_a_call_id_naming_a_missing_shard_is_unknown_call() {
    assert!(owner_shard(MISSING_SHARD) >= SHARDS);
    call_id_naming_a_missing_shard(
        Frame::Punched { call_id: MISSING_SHARD, udp_port: 2, keys: None },
        Some(ErrorCode::UnknownCall),
    );
}

#[test]
fn hangup_for_a_call_id_naming_a_missing_shard_is_ignored() {
    call_id_naming_a_missing_shard(Frame::Hangup { call_id: MISSING_SHARD, reason: HangupReason::Normal }, None);
}

#[test]
fn reject_for_a_call_id_naming_a_missing_shard_is_ignored() {
    call_id_naming_a_missing_shard(
        Frame::Reject {
            call_ref: 0,
            call_id: MISSING_SHARD,
            reason: RejectReason::Declined,
            callee_nat: proto::nat::NatClass::Unknown,
        },
        None,
    );
}

/// Only the callee may decline. A caller that sends REJECT for its own call gets NOT_PARTY;
/// the call goes on, so when the caller then disconnects the callee must learn it at once
/// (HANGUP PeerGone), not at the ring timeout.
#[test]
fn caller_sending_reject_still_ends_the_call_when_it_disconnects() {
    let m = manager_with(ShardConfig { ring_timeout: Duration::from_secs(3), ..ShardConfig::default() });
    let mut alice = Client::connect(&m, "alice");
    let mut bob = Client::connect(&m, "bob");
    let alice_pub = alice.register(&id("alice"), 1);
    bob.register(&id("bob"), 2);
    alice.call(81, &id("bob"));
    let (call_id, _) = bob.expect_incoming(&id("alice"), alice_pub);
    // Let the owner's note that alice is a party reach alice's shard first.
    alice.expect_quiet();
    alice.send(&Frame::Reject {
        call_ref: 0,
        call_id,
        reason: RejectReason::Declined,
        callee_nat: proto::nat::NatClass::Unknown,
    });
    alice.expect_error(ErrorCode::NotParty);
    bob.expect_quiet();
    let t = Instant::now();
    drop(alice);
    match bob.next(Duration::from_millis(1500)) {
        Next::Frame(f) => assert_eq!(f, Frame::Hangup { call_id, reason: HangupReason::PeerGone }),
        other => panic!("bob: expected HANGUP PeerGone soon after the caller left, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_millis(1500));
    assert_eq!(get(&m.stats().calls_ring_timeout), 0);
}

// --------------------------------------------------------------- timers and disconnects

#[test]
fn unanswered_call_times_out_on_both_sides() {
    let m = manager_with(ShardConfig { ring_timeout: Duration::from_millis(500), ..ShardConfig::default() });
    let mut alice = Client::connect(&m, "alice");
    let mut bob = Client::connect(&m, "bob");
    let alice_pub = alice.register(&id("alice"), 1);
    bob.register(&id("bob"), 2);

    let t = Instant::now();
    // (The exact times are pinned down in virtual time: tests/sim.rs. Here: it happens, on
    // the real IO, and no sooner than the ring timeout.)
    alice.call(51, &id("bob"));
    let (call_id, _) = bob.expect_incoming(&id("alice"), alice_pub);
    assert_eq!(
        alice.recv(),
        Frame::Reject {
            call_ref: 51,
            call_id,
            reason: RejectReason::Timeout,
            callee_nat: proto::nat::NatClass::Unknown
        }
    );
    assert!(t.elapsed() >= Duration::from_millis(500), "rejected before the ring timeout: {:?}", t.elapsed());
    assert_eq!(bob.recv(), Frame::Hangup { call_id, reason: HangupReason::Timeout });

    let s = m.stats();
    assert_eq!(get(&s.calls_ring_timeout), 1);
    assert_eq!(get(&s.calls_ended), 1);
    assert_eq!(get(&s.calls_started), 0);
    // A late PUNCHED names a call that no longer exists.
    bob.send(&Frame::Punched { call_id, udp_port: 2, keys: None });
    bob.expect_error(ErrorCode::UnknownCall);
}

#[test]
fn callee_disconnecting_while_ringing_rejects_the_call() {
    let m = manager();
    let mut alice = Client::connect(&m, "alice");
    let mut bob = Client::connect(&m, "bob");
    let alice_pub = alice.register(&id("alice"), 1);
    bob.register(&id("bob"), 2);
    alice.call(61, &id("bob"));
    let (call_id, _) = bob.expect_incoming(&id("alice"), alice_pub);
    drop(bob);
    assert_eq!(
        alice.recv(),
        Frame::Reject {
            call_ref: 61,
            call_id,
            reason: RejectReason::CalleeGone,
            callee_nat: proto::nat::NatClass::Unknown
        }
    );
    let s = m.stats();
    assert_eq!(get(&s.calls_rejected), 1);
    assert_eq!(get(&s.calls_ended), 1);
    alice.ping(1);
}

#[test]
fn caller_disconnecting_while_ringing_hangs_up_the_callee() {
    let m = manager();
    let mut alice = Client::connect(&m, "alice");
    let mut bob = Client::connect(&m, "bob");
    let alice_pub = alice.register(&id("alice"), 1);
    bob.register(&id("bob"), 2);
    alice.call(71, &id("bob"));
    let (call_id, _) = bob.expect_incoming(&id("alice"), alice_pub);
    drop(alice);
    assert_eq!(bob.recv(), Frame::Hangup { call_id, reason: HangupReason::PeerGone });
    assert_eq!(get(&m.stats().calls_ended), 1);
    bob.ping(1);
}

#[test]
fn silent_connections_are_closed_by_the_register_and_idle_timeouts() {
    let m = manager_with(ShardConfig {
        register_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(900),
        ..ShardConfig::default()
    });
    let mut never = Client::connect(&m, "never-registers");
    let mut silent = Client::connect(&m, "silent");
    let mut chatty = Client::connect(&m, "chatty");
    silent.register(&id("silent"), 1);
    chatty.register(&id("chatty"), 2);

    // (Exact times: tests/sim.rs.)
    never.expect_error(ErrorCode::Timeout);
    never.expect_closed();

    // Chatty pings every 150 ms (bounded) and outlives silent's idle timeout.
    let mut silent_gone = false;
    for nonce in 0..20 {
        chatty.ping(nonce);
        if !silent_gone {
            match silent.next(Duration::from_millis(150)) {
                Next::Timeout => continue,
                Next::Frame(Frame::Error { code: ErrorCode::Timeout, .. }) => {
                    silent.expect_closed();
                    silent_gone = true;
                }
                other => panic!("silent: expected an idle ERROR, got {other:?}"),
            }
        } else {
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    assert!(silent_gone, "the silent client was not closed for idleness");
    chatty.ping(99);
    assert_eq!(get(&m.stats().connections_timed_out), 2);
}

// ---------------------------------------------------------------------------- shutdown

#[test]
fn shutdown_sends_error_and_closes_every_connection() {
    let m = manager();
    let stats = m.stats().clone();
    let mut clients: Vec<Client> = Vec::new();
    for (i, shard) in [0u16, 1, 0, 1].into_iter().enumerate() {
        let mut c = Client::connect(&m, &format!("c{i}"));
        c.register(&id_on(&format!("c{i}"), shard), 1000 + i as u16);
        clients.push(c);
    }
    // One that never registered.
    let mut idle = Client::connect(&m, "idle");
    idle.ping(5);
    wait_until("all accepted", || get(&stats.connections_accepted) == 5);

    let t = Instant::now();
    m.shutdown();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");

    for c in clients.iter_mut().chain(std::iter::once(&mut idle)) {
        c.expect_error(ErrorCode::Shutdown);
        c.expect_closed();
    }
    assert_eq!(get(&stats.connections_closed), 5);
}

// ------------------------------------------------------------------------ UDP counters

/// The manager is never on the media path, so end-to-end tests check that `udp_media`
/// stays 0. This shows that the counter does move when media does arrive.
#[test]
fn media_datagram_on_the_manager_port_is_counted() {
    let m = manager();
    let s = m.stats();
    assert_eq!(get(&s.udp_media), 0);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    // RTP version 2, payload type 111, seq 1, timestamp 160, ssrc 0x01020304, 4 bytes payload.
    let rtp = [0x80, 111, 0, 1, 0, 0, 0, 160, 1, 2, 3, 4, 0xde, 0xad, 0xbe, 0xef];
    sock.send_to(&rtp, m.local_addr()).unwrap();
    wait_until("udp_media == 1", || get(&s.udp_media) == 1);
    assert_eq!(get(&s.udp_non_stun), 1);
    assert_eq!(get(&s.stun_requests), 0);
    assert_eq!(get(&s.udp_malformed), 0);
    // No answer to media.
    sock.set_read_timeout(Some(QUIET)).unwrap();
    let mut buf = [0u8; 64];
    assert!(sock.recv_from(&mut buf).is_err(), "the manager answered a media packet");
}

/// A second manager on the same address fails to start with AddrInUse. (The UDP port is
/// claimed before any shard listens, so it never briefly shares the TCP port through
/// SO_REUSEPORT and accepts a client it is about to drop.)
#[test]
fn a_second_manager_cannot_bind_the_same_address() {
    let first =
        start_on_any_port(ManagerConfig { listen: "127.0.0.1:0".parse().unwrap(), shards: 2, ..Default::default() });
    let addr = first.local_addr();
    let second = manager::start(ManagerConfig { listen: addr, shards: 2, ..Default::default() });
    assert!(second.is_err(), "a second manager bound {addr}");
    assert_eq!(second.err().unwrap().kind(), std::io::ErrorKind::AddrInUse);
}

/// A client that sends but never reads: its PONGs fill the socket buffers and the manager's
/// write to it blocks. When the manager then closes the connection (its queue overflows, or
/// it goes idle), it must abort the stuck task after its 2 s close grace and clean up
/// (registration released, `connections_closed` counted). Before the fix the connection
/// stayed open, and registered, forever.
#[test]
fn a_client_that_stops_reading_is_dropped_and_cleaned_up() {
    let m = manager_with(ShardConfig { idle_timeout: Duration::from_secs(1), ..ShardConfig::default() });
    let mut c = Client::connect(&m, "flood");
    let flood = id("flood");
    c.register(&flood, 7);
    c.stream.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    // Small batches with a pause, far below the manager's queue bound: the manager keeps up
    // and writes every PONG, until the socket buffers towards us are full and its write
    // blocks. Only then does it stop reading, and our writes time out.
    let mut pings = Vec::new();
    for nonce in 0..100u64 {
        Frame::Ping { nonce }.encode(&mut pings);
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut blocked = false;
    while Instant::now() < deadline {
        if c.stream.write_all(&pings).is_err() {
            blocked = true; // the manager stopped reading: its write to us is stuck
            break;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    assert!(blocked, "the manager kept reading; the test never filled the sockets");
    // The manager's write to us is stuck. It decides to close the connection either when
    // its queue for us overflows (slow reader) or when it has read nothing for 1 s (idle);
    // either way the close needs the stuck task aborted, after the 2 s grace.
    wait_until("connections_closed == 1", || get(&m.stats().connections_closed) == 1);
    let why = get(&m.stats().connections_slow) + get(&m.stats().connections_timed_out);
    assert!(why >= 1, "closed, but neither as slow nor as idle: {}", m.stats().to_json());
    // The id is free again: a new connection registers it without replacing anyone.
    std::thread::sleep(Duration::from_millis(200));
    let mut d = Client::connect(&m, "again");
    d.register(&flood, 8);
    assert_eq!(get(&m.stats().registrations_replaced), 0);
}

// ------------------------------------------------------------------------ authentication

/// A manager that requires tokens, and its secret.
fn secured() -> (ManagerHandle, std::sync::Arc<proto::auth::Secret>) {
    let secret = std::sync::Arc::new(proto::auth::Secret::new(b"test-secret-0123456789".to_vec()).unwrap());
    let m = manager_with(ShardConfig { secret: Some(secret.clone()), ..ShardConfig::default() });
    (m, secret)
}

fn register_frame(who: &str, auth: Option<proto::wire::frame::AuthToken>) -> Frame {
    Frame::Register {
        id: id(who),
        udp_port: 5000,
        max_calls: 1,
        binding: None,
        auth,
        nat: proto::nat::NatClass::Unknown,
        candidates: Vec::new(),
    }
}

#[test]
fn with_a_secret_only_a_valid_token_for_the_id_registers() {
    let (m, secret) = secured();
    let later = engine::sys::unix_now() + 600;

    // No token: refused and closed.
    let mut a = Client::connect(&m, "no token");
    a.send(&register_frame("alice", None));
    a.expect_error(ErrorCode::Unauthorized);
    a.expect_closed();
    // Bob's token does not make anyone alice.
    let mut b = Client::connect(&m, "bob's token");
    b.send(&register_frame("alice", Some(secret.mint(&id("bob"), later))));
    b.expect_error(ErrorCode::Unauthorized);
    b.expect_closed();
    // Expired.
    let mut c = Client::connect(&m, "expired");
    c.send(&register_frame("alice", Some(secret.mint(&id("alice"), engine::sys::unix_now() - 5))));
    c.expect_error(ErrorCode::Unauthorized);
    c.expect_closed();
    // Minted with another secret, or with the expiry stretched after minting.
    let other = proto::auth::Secret::new(b"some-other-secret-000".to_vec()).unwrap();
    let mut d = Client::connect(&m, "other secret");
    d.send(&register_frame("alice", Some(other.mint(&id("alice"), later))));
    d.expect_error(ErrorCode::Unauthorized);
    d.expect_closed();
    let mut t = secret.mint(&id("alice"), later);
    t.expires_unix += 1_000_000;
    let mut e = Client::connect(&m, "stretched");
    e.send(&register_frame("alice", Some(t)));
    e.expect_error(ErrorCode::Unauthorized);
    e.expect_closed();
    let s = m.stats();
    assert_eq!((get(&s.auth_missing), get(&s.auth_invalid), get(&s.auth_expired)), (1, 3, 1));
    assert_eq!(get(&s.registrations), 0, "nobody registered");

    // The right token registers, and alice can then be called by a registered bob.
    let mut alice = Client::connect(&m, "alice");
    alice.send(&register_frame("alice", Some(secret.mint(&id("alice"), later))));
    assert!(matches!(alice.recv(), Frame::Registered { .. }));
    let mut bob = Client::connect(&m, "bob");
    bob.send(&register_frame("bob", Some(secret.mint(&id("bob"), later))));
    assert!(matches!(bob.recv(), Frame::Registered { .. }));
    bob.call(1, &id("alice"));
    assert!(matches!(alice.recv(), Frame::Incoming { .. }), "alice receives her call");
    assert_eq!(get(&m.stats().registrations), 2);
}

#[test]
fn without_a_secret_any_id_registers() {
    let m = manager();
    let mut a = Client::connect(&m, "open");
    a.send(&register_frame("alice", None));
    assert!(matches!(a.recv(), Frame::Registered { .. }));
    assert_eq!(get(&m.stats().auth_missing), 0);
}

// ------------------------------------------------------------------------- STUN abuse

/// Send `req` from `sock` to the manager `count` times, waiting up to 300 ms after the last
/// for answers; returns how many answers came.
fn stun_burst(sock: &UdpSocket, to: SocketAddr, req: &[u8], count: usize) -> usize {
    for _ in 0..count {
        sock.send_to(req, to).unwrap();
    }
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 128];
    let mut answers = 0;
    while sock.recv_from(&mut buf).is_ok() {
        answers += 1;
    }
    answers
}

#[test]
fn the_stun_responder_answers_at_most_twice_the_request_size() {
    // An IPv6 answer is 44 bytes: a bare 20-byte request would be amplified 2.2 times, so
    // it gets no answer; nullpunch's own 36-byte request does.
    let m = start_on_any_port(ManagerConfig { listen: "[::1]:0".parse().unwrap(), shards: 1, ..Default::default() });
    let sock = UdpSocket::bind("[::1]:0").unwrap();
    let txid = [3u8; 12];
    let mut req = [0u8; stun::REQUEST_LEN];
    let n = stun::emit_binding_request(&txid, &mut req);
    let mut bare = req[..stun::HEADER_LEN].to_vec();
    bare[2..4].copy_from_slice(&0u16.to_be_bytes()); // no attributes
    assert_eq!(stun_burst(&sock, m.local_addr(), &bare, 1), 0, "a 20-byte request gets no 44-byte answer");
    assert_eq!(get(&m.stats().stun_too_small), 1);
    assert_eq!(stun_burst(&sock, m.local_addr(), &req[..n], 1), 1, "a 36-byte request is answered");
    assert_eq!(get(&m.stats().stun_requests), 1);
    // Over IPv4 even a bare request is answered (32 bytes for 20).
    let m4 = manager();
    let s4 = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(stun_burst(&s4, m4.local_addr(), &bare, 1), 1);
}

#[test]
fn the_stun_responder_limits_answers_per_source_address() {
    let m = start_on_any_port(ManagerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        stun_rate: 5.0,
        ..Default::default()
    });
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut req = [0u8; stun::REQUEST_LEN];
    let n = stun::emit_binding_request(&[4u8; 12], &mut req);
    // A burst of 10 (twice the rate) and then 5 per second: 40 requests at once get about 10
    // (a few more if the responder thread is slow to get through them on a loaded machine).
    let answered = stun_burst(&sock, m.local_addr(), &req[..n], 40);
    assert!((10..=15).contains(&answered), "{answered} answers");
    let limited = get(&m.stats().stun_rate_limited) as usize;
    assert_eq!(answered + limited, 40, "every request answered or counted");
    // The same source address, another port: the same bucket (it is the IP that counts).
    let other = UdpSocket::bind("127.0.0.1:0").unwrap();
    let before = get(&m.stats().stun_rate_limited) as usize;
    let same_ip = stun_burst(&other, m.local_addr(), &req[..n], 5);
    assert!(same_ip <= 4, "{same_ip} answers to a second port of the same IP");
    assert_eq!(get(&m.stats().stun_rate_limited) as usize - before, 5 - same_ip);
    // Another source IP has a bucket of its own: its whole burst is answered.
    let elsewhere = UdpSocket::bind("127.0.0.2:0").unwrap();
    assert_eq!(stun_burst(&elsewhere, m.local_addr(), &req[..n], 10), 10, "a fresh source IP is not limited");
}

// ------------------------------------------------------------------------------ limits

#[test]
fn connections_beyond_the_limit_are_refused_with_a_clear_error() {
    let m = start_on_any_port(ManagerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        max_connections: 3,
        ..Default::default()
    });
    let mut held: Vec<Client> = (0..3).map(|i| Client::connect(&m, &format!("c{i}"))).collect();
    for (i, c) in held.iter_mut().enumerate() {
        c.ping(i as u64);
    }
    let mut extra = Client::connect(&m, "extra");
    extra.expect_error(ErrorCode::TooManyConnections);
    extra.expect_closed();
    assert_eq!(get(&m.stats().connections_refused), 1);
    // One leaves: there is room again.
    drop(held.pop());
    wait_until("the closed connection counted", || get(&m.stats().connections_closed) >= 2);
    let mut again = Client::connect(&m, "again");
    again.ping(9);
    for (i, c) in held.iter_mut().enumerate() {
        c.ping(10 + i as u64);
    }
}

#[test]
fn a_connection_flooding_frames_is_closed_and_a_calm_one_is_not() {
    let m = manager_with(ShardConfig { frames_per_sec: 10.0, ..ShardConfig::default() });
    // Calm: 5 frames a second for 2 s.
    let mut calm = Client::connect(&m, "calm");
    for i in 0..10 {
        calm.ping(i);
        std::thread::sleep(Duration::from_millis(200));
    }
    // Flood: 100 PINGs at once. The burst allowance (20) is answered, then ERROR and close.
    let mut flood = Client::connect(&m, "flood");
    // One write: written frame by frame, the later writes could meet the closed connection.
    let mut burst = Vec::new();
    for i in 0..100 {
        Frame::Ping { nonce: i }.encode(&mut burst);
    }
    flood.send_raw(&burst);
    let mut pongs = 0;
    loop {
        match flood.recv() {
            Frame::Pong { .. } => pongs += 1,
            Frame::Error { code: ErrorCode::RateLimited, .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((19..=21).contains(&pongs), "{pongs} PONGs before the limit");
    flood.expect_closed();
    assert_eq!(get(&m.stats().connections_flooding), 1);
    calm.ping(99);
}

#[test]
fn a_caller_at_its_call_limit_gets_caller_limit() {
    let m = manager_with(ShardConfig { max_calls_per_conn: 1, ..ShardConfig::default() });
    let mut alice = Client::connect(&m, "alice");
    alice.register(&id("alice"), 1000);
    let mut bob = Client::connect(&m, "bob");
    bob.register(&id("bob"), 1001);
    let mut carol = Client::connect(&m, "carol");
    carol.register(&id("carol"), 1002);
    alice.call(1, &id("bob"));
    assert!(matches!(bob.recv(), Frame::Incoming { .. }));
    // The call is owned by bob's home shard, which tells alice's connection's shard about it
    // by message: give that a moment (CI once placed the second call first).
    std::thread::sleep(Duration::from_millis(200));
    alice.ping(5);
    alice.call(2, &id("carol"));
    assert_eq!(
        alice.recv(),
        Frame::Reject {
            call_ref: 2,
            call_id: CallId(0),
            reason: RejectReason::CallerLimit,
            callee_nat: proto::nat::NatClass::Unknown
        }
    );
    carol.expect_quiet();
    let s = m.stats();
    assert_eq!((get(&s.calls_caller_limit), get(&s.calls_rejected)), (1, 1));
}
