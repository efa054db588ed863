//! Tests of the sans-IO client state machine, [`proto::client::Client`].
//!
//! Time is an argument: every test fixes `t0` and passes `t0 + n ms`; nothing sleeps. The
//! [`T`] harness drives a client the way the driver does: after each input or command it
//! drains `poll_output` (1500-byte buffer) until `Output::Timeout`, and
//! [`T::run_until`] calls `handle_timeout` at each `poll_timeout` up to a given time,
//! recording what came out and when (milliseconds since `t0`).
//!
//! All timer values asserted here are the `ClientConfig::new` defaults (STUN 4 x 250 ms,
//! null re-sends 6 from 50 ms doubling, start / first-media timeouts 5 s, keepalive 15 s,
//! media timeout 35 s, ping 10 s), as documented in `docs/protocol.md` section 6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use proto::client::{
    CallHandle, CallReport, Client, ClientConfig, ClientCounters, ClientError, EndReason, Event, MediaFields, Output,
    PathKind, Role,
};
use proto::e2e::{self, HandPeer};
use proto::rng::Rng;
use proto::wire::frame::{
    AddrSource, CallId, Candidate, CandidateKind, ClientId, Frame, HangupReason, RejectReason, UnknownReason,
};
use proto::wire::null::NullPacket;
use proto::wire::rtp::{RtpHeader, OPUS_PAYLOAD_TYPE};
use proto::wire::stun::{self, StunMessage, MAX_RESPONSE_LEN};
use proto::wire::{classify, DatagramKind};

// ------------------------------------------------------------------------------ fixtures

const LOCAL_PORT: u16 = 5004;
const CALL_ID: CallId = CallId(0x0001_0000_0000_0001);
const TOKEN: u64 = 0x1122_3344_5566_7788;
/// The caller's SSRC: the token's low half.
const CALLER_SSRC: u32 = TOKEN as u32;
/// The callee's SSRC: the token's high half.
const CALLEE_SSRC: u32 = (TOKEN >> 32) as u32;

fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}

fn id(s: &str) -> ClientId {
    ClientId::new(s).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The manager's UDP (STUN) address.
fn stun_server() -> SocketAddr {
    addr("198.51.100.1:3478")
}

/// This client's public address as REGISTERED reports it.
fn public() -> SocketAddr {
    addr("192.0.2.10:40010")
}

/// The remote caller's public address (when the client under test is the callee).
fn caller_addr() -> SocketAddr {
    addr("203.0.113.7:40000")
}

/// The remote callee's public address (when the client under test is the caller).
fn callee_addr() -> SocketAddr {
    addr("198.51.100.20:5004")
}

fn incoming_frame() -> Frame {
    Frame::Incoming {
        call_id: CALL_ID,
        token: TOKEN,
        caller: id("alice"),
        caller_addr: caller_addr(),
        caller_nat: proto::nat::NatClass::Unknown,
        caller_candidates: Vec::new(),
        caller_keys: None,
    }
}

fn rtp(ssrc: u32, seq: u16, timestamp: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 12 + payload.len()];
    RtpHeader { marker: false, payload_type: OPUS_PAYLOAD_TYPE, seq, timestamp, ssrc }.emit(&mut b);
    b[12..].copy_from_slice(payload);
    b
}

/// A null packet of the peer. Its MAC is made with a placeholder key: [`T::dgram`] signs it
/// with the call's real key (as the peer would) before delivering it.
fn null(call_id: CallId, token: u64, keepalive: bool, from_caller: bool) -> Vec<u8> {
    let mut b = vec![0u8; proto::wire::null::NULL_LEN];
    let key = proto::wire::null::null_key(&[0; 32]);
    NullPacket { call_id, token, keepalive, from_caller, probe: false, counter: 1 }.emit(&key, &mut b);
    b
}

/// A null packet the client sent, its counter left out (0): the tests compare the fields
/// that say what the packet is for.
fn parse_null(d: &[u8]) -> NullPacket {
    let p = NullPacket::parse(d).unwrap_or_else(|e| panic!("expected a null packet, got {d:02x?}: {e}"));
    NullPacket { counter: 0, ..p }
}

/// The reports of every `Event::Ended` among `events`.
fn reports<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<CallReport> {
    events.into_iter().filter_map(|e| if let Event::Ended(r) = e { Some((**r).clone()) } else { None }).collect()
}

// ------------------------------------------------------------------------------ harness

/// What a client emitted in one drain.
#[derive(Debug, Default)]
struct Out {
    frames: Vec<Frame>,
    dgrams: Vec<(SocketAddr, Vec<u8>)>,
    events: Vec<Event>,
}

impl Out {
    fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.dgrams.is_empty() && self.events.is_empty()
    }
}

/// What a client emitted over a stretch of time, each item with the millisecond it came out.
#[derive(Debug, Default)]
struct Log {
    frames: Vec<(u64, Frame)>,
    dgrams: Vec<(u64, SocketAddr, Vec<u8>)>,
    events: Vec<(u64, Event)>,
}

impl Log {
    fn push(&mut self, at: u64, out: Out) {
        self.frames.extend(out.frames.into_iter().map(|f| (at, f)));
        self.dgrams.extend(out.dgrams.into_iter().map(|(to, d)| (at, to, d)));
        self.events.extend(out.events.into_iter().map(|e| (at, e)));
    }

    fn extend(&mut self, other: Log) {
        self.frames.extend(other.frames);
        self.dgrams.extend(other.dgrams);
        self.events.extend(other.events);
    }

    /// Frames other than PING (the ping timer runs through every long test).
    fn call_frames(&self) -> Vec<(u64, Frame)> {
        self.frames.iter().filter(|(_, f)| !matches!(f, Frame::Ping { .. })).cloned().collect()
    }

    /// Events other than `ManagerUnresponsive` (nobody answers the PINGs in long tests).
    fn call_events(&self) -> Vec<(u64, &Event)> {
        self.events.iter().filter(|(_, e)| !matches!(e, Event::ManagerUnresponsive)).map(|(t, e)| (*t, e)).collect()
    }

    /// Every datagram, parsed as a null packet (panics on anything else), with time and
    /// destination.
    fn nulls(&self) -> Vec<(u64, SocketAddr, NullPacket)> {
        self.dgrams.iter().map(|(t, to, d)| (*t, *to, parse_null(d))).collect()
    }

    fn dgram_times(&self) -> Vec<u64> {
        self.dgrams.iter().map(|(t, _, _)| *t).collect()
    }
}

/// A client under test and the instant its clock starts at.
struct T {
    c: Client,
    t0: Instant,
    /// The remote party of each call, played by hand ([`HandPeer`]): it answers the
    /// client's key share, so the test's RTP and null packets can be protected and signed
    /// as the peer would, and the client's packets read. By call id, with the token.
    peers: Vec<(CallId, u64, HandPeer)>,
    /// The key shares of the client's CALLs, by call_ref.
    offers: Vec<(u32, proto::wire::frame::KeyShare)>,
    /// Key shares handed to the client: false leaves INCOMING and START as the test wrote
    /// them (a test of the key exchange itself).
    auto_keys: bool,
}

impl T {
    fn new(cfg: ClientConfig) -> T {
        let t0 = Instant::now();
        T { c: Client::new(cfg, 42), t0, peers: Vec::new(), offers: Vec::new(), auto_keys: true }
    }

    /// The hand peer of the call whose packets carry SSRC `ssrc` (sent by that peer).
    fn peer_by_ssrc(&mut self, ssrc: u32) -> Option<&mut HandPeer> {
        self.peers.iter_mut().find_map(|(_, tok, p)| (p.ssrc(*tok) == ssrc).then_some(p))
    }

    /// A client `bob` with default timers, connected at 0 without STUN and registered
    /// (REGISTER and the Registered event already drained).
    fn registered() -> T {
        let mut t = T::new(ClientConfig::new(id("bob"), LOCAL_PORT));
        t.c.handle_connected(t.at(0), None);
        let out = t.drain();
        assert!(matches!(out.frames[..], [Frame::Register { .. }]), "{out:?}");
        let out = t.frame(0, Frame::Registered { public: public(), source: AddrSource::TcpPeer });
        assert!(matches!(out.events[..], [Event::Registered { .. }]), "{out:?}");
        assert!(t.c.is_registered());
        t
    }

    /// Registered, then INCOMING at 0; returns the handle from `Event::Incoming`. The punch
    /// and PUNCHED are drained.
    fn with_incoming() -> (T, CallHandle) {
        let mut t = T::registered();
        let out = t.frame(0, incoming_frame());
        let h = match out.events[..] {
            [Event::Incoming { handle, .. }] => handle,
            _ => panic!("{out:?}"),
        };
        (t, h)
    }

    /// A callee call with the path up: INCOMING at 0, the caller's first RTP packet at 10 ms.
    fn established_callee() -> (T, CallHandle) {
        let (mut t, h) = T::with_incoming();
        assert!(t.dgram(10, caller_addr(), &rtp(CALLER_SSRC, 1, 0, b"hi")).is_some());
        let out = t.drain();
        assert!(matches!(out.events[..], [Event::MediaFlowing { handle }] if handle == h), "{out:?}");
        (t, h)
    }

    /// Registered, CALL to `carol` at 0, START at `start_ms`; the CALL frame, the caller's
    /// null packet and `Event::Started` are drained.
    fn placed_call(start_ms: u64) -> (T, CallHandle) {
        let mut t = T::registered();
        let h = t.c.call(t.at(0), id("carol")).unwrap();
        t.drain();
        let out = t.frame(
            start_ms,
            Frame::Start {
                call_ref: h.0,
                call_id: CALL_ID,
                token: TOKEN,
                callee_addr: callee_addr(),
                callee_nat: proto::nat::NatClass::Unknown,
                callee_candidates: Vec::new(),
                callee_keys: None,
            },
        );
        assert!(matches!(out.events[..], [Event::Started { .. }]), "{out:?}");
        (t, h)
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn drain(&mut self) -> Out {
        let mut out = Out::default();
        let mut buf = [0u8; 1500];
        loop {
            match self.c.poll_output(&mut buf).expect("1500 bytes hold any control datagram") {
                Output::Frame(f) => {
                    match &f {
                        Frame::Call { call_ref, keys: Some(k), .. } => self.offers.push((*call_ref, (**k).clone())),
                        Frame::Punched { call_id, keys: Some(k), .. } => {
                            if let Some((_, tok, p)) = self.peers.iter_mut().find(|(id, _, _)| id == call_id) {
                                let _ = p.complete(k, *call_id, *tok);
                            }
                        }
                        _ => {}
                    }
                    out.frames.push(f)
                }
                Output::Transmit(tx) => out.dgrams.push((tx.to, buf[..tx.len].to_vec())),
                Output::Event(e) => out.events.push(e),
                Output::OpenSocket(s) | Output::CloseSocket(s) => panic!("a direct call opened or closed {s:?}"),
                Output::Timeout(t) => {
                    assert_eq!(t, self.c.poll_timeout(), "Output::Timeout is the next deadline");
                    break;
                }
            }
        }
        out
    }

    /// Whatever is queued now, as a log entry at `at`.
    fn drain_into_log(&mut self, at: u64) -> Log {
        let mut log = Log::default();
        let out = self.drain();
        log.push(at, out);
        log
    }

    /// Run timers as a driver would: `handle_timeout` at each `poll_timeout` up to and
    /// including `end_ms`, draining after each. Panics if a timer does not move forward (a
    /// driver would spin).
    fn run_until(&mut self, end_ms: u64) -> Log {
        let end = self.at(end_ms);
        let mut log = Log::default();
        let mut last: Option<Instant> = None;
        while let Some(t) = self.c.poll_timeout() {
            if t > end {
                break;
            }
            if let Some(l) = last {
                assert!(t > l, "poll_timeout stuck at {:?} after handle_timeout", l - self.t0);
            }
            self.c.handle_timeout(t);
            last = Some(t);
            let out = self.drain();
            log.push((t - self.t0).as_millis() as u64, out);
        }
        log
    }

    /// When the next timer is due, in ms since t0.
    fn next_timeout(&mut self) -> Option<u64> {
        self.c.poll_timeout().map(|t| (t - self.t0).as_millis() as u64)
    }

    fn frame(&mut self, at: u64, mut f: Frame) -> Out {
        // Play the peer's side of the key exchange (see `peers`).
        match &mut f {
            Frame::Incoming { call_id, token, caller_keys: k @ None, .. } if self.auto_keys => {
                let p = HandPeer::offer(&[7; 32], &[e2e::SUITE_AES_128_GCM, e2e::SUITE_AES_CM_SHA1_80]);
                *k = Some(Box::new(p.share().clone()));
                self.peers.push((*call_id, *token, p));
            }
            Frame::Start { call_ref, call_id, token, callee_keys: k @ None, .. } if self.auto_keys => {
                if let Some((_, _, p)) = self.peers.iter().find(|(id, _, _)| id == call_id) {
                    // Made for a punch that came before this START.
                    *k = Some(Box::new(p.share().clone()));
                } else if let Some((_, offer)) = self.offers.iter().find(|(r, _)| r == call_ref) {
                    let accepted = [e2e::SUITE_AES_128_GCM, e2e::SUITE_AES_CM_SHA1_80, e2e::SUITE_NONE];
                    if let Ok(p) = HandPeer::answer(&[8; 32], offer, &accepted, *call_id, *token) {
                        *k = Some(Box::new(p.share().clone()));
                        self.peers.push((*call_id, *token, p));
                    }
                }
            }
            _ => {}
        }
        self.c.handle_frame(self.at(at), f);
        self.drain()
    }

    /// Deliver a datagram as the peer sends it (RTP protected, a null packet signed with
    /// the call's key); returns the media packet, if the client passed one up.
    fn dgram(&mut self, at: u64, from: SocketAddr, data: &[u8]) -> Option<(CallHandle, RtpHeader, Vec<u8>)> {
        let mut d = data.to_vec();
        match classify(&d) {
            DatagramKind::Rtp => {
                if let Ok((h, _)) = RtpHeader::parse(&d) {
                    if let Some(p) = self.peer_by_ssrc(h.ssrc) {
                        p.protect(&mut d);
                    }
                }
            }
            DatagramKind::Null if d.len() == proto::wire::null::NULL_LEN => {
                if let Ok(n) = NullPacket::parse(&d) {
                    let known = self.peers.iter().any(|(id, _, _)| *id == n.call_id);
                    if let (false, false, Some((_, offer))) = (known, n.from_caller, self.offers.last()) {
                        // The callee's punch before START: the callee has answered already.
                        let accepted = [e2e::SUITE_AES_128_GCM, e2e::SUITE_AES_CM_SHA1_80, e2e::SUITE_NONE];
                        if let Ok(p) = HandPeer::answer(&[8; 32], offer, &accepted, n.call_id, n.token) {
                            self.peers.push((n.call_id, n.token, p));
                        }
                    }
                    if let Some((_, _, p)) = self.peers.iter_mut().find(|(id, _, _)| *id == n.call_id) {
                        p.sign_null(&mut d);
                    }
                }
            }
            _ => {}
        }
        self.raw_dgram(at, from, &mut d)
    }

    /// An RTP packet of the peer protected with its keys, as it leaves the peer (for a
    /// test that replays or tampers with it).
    fn sealed(&mut self, ssrc: u32, seq: u16, timestamp: u32, payload: &[u8]) -> Vec<u8> {
        let mut d = rtp(ssrc, seq, timestamp, payload);
        self.peer_by_ssrc(ssrc).expect("a hand peer sends this SSRC").protect(&mut d);
        d
    }

    /// A null packet of the peer signed with the call's key.
    fn signed_null(&mut self, keepalive: bool, from_caller: bool) -> Vec<u8> {
        let mut d = null(CALL_ID, TOKEN, keepalive, from_caller);
        let (_, _, p) = self.peers.iter_mut().find(|(id, _, _)| *id == CALL_ID).expect("a hand peer for CALL_ID");
        p.sign_null(&mut d);
        d
    }

    /// Deliver a datagram exactly as given.
    fn raw_dgram(&mut self, at: u64, from: SocketAddr, d: &mut [u8]) -> Option<(CallHandle, RtpHeader, Vec<u8>)> {
        let now = self.at(at);
        self.c.handle_datagram(now, from, d).map(|r| (r.handle, r.header, r.payload.to_vec()))
    }

    /// `send_media` into a 1500-byte buffer; returns the destination and the parsed packet.
    fn send(
        &mut self,
        at: u64,
        h: CallHandle,
        payload: &[u8],
        dur: u32,
    ) -> Result<(SocketAddr, RtpHeader, Vec<u8>), ClientError> {
        let mut buf = [0u8; 1500];
        let tx = self.c.send_media(self.at(at), h, payload, dur, &mut buf)?;
        assert_eq!(tx.len, 12 + payload.len() + 16, "RTP header, payload and the GCM tag");
        let n = self.open(&mut buf[..tx.len]);
        let (hdr, p) = RtpHeader::parse(&buf[..n]).expect("valid RTP inside");
        Ok((tx.to, hdr, p.to_vec()))
    }

    /// Read an SRTP packet the client sent as its peer does: decrypt and authenticate it with
    /// the peer's keys (AEAD_AES_128_GCM). Returns the plain length.
    fn open(&mut self, d: &mut [u8]) -> usize {
        let (hdr, _) = RtpHeader::parse(d).expect("the client sends valid RTP headers");
        let p = self
            .peers
            .iter_mut()
            .find(|(_, t, p)| p.ssrc(*t) != hdr.ssrc && (*t as u32 == hdr.ssrc || (*t >> 32) as u32 == hdr.ssrc))
            .map(|(_, _, p)| p)
            .expect("a hand peer for the call");
        p.unprotect(d).expect("the peer's keys open the client's SRTP")
    }
}

// ------------------------------------------------------------------------------ 1. discovery

fn stun_client() -> T {
    let mut cfg = ClientConfig::new(id("bob"), LOCAL_PORT);
    cfg.stun_server = Some(stun_server());
    T::new(cfg)
}

/// The one STUN binding request in `out`, checked for size and destination.
fn binding_request(to: SocketAddr, d: &[u8]) -> [u8; 12] {
    assert_eq!(to, stun_server());
    assert_eq!(d.len(), stun::REQUEST_LEN, "a binding request: header and SOFTWARE");
    match stun::parse(d) {
        Ok(StunMessage::BindingRequest { txid }) => txid,
        other => panic!("not a binding request: {other:?}"),
    }
}

fn binding_success(txid: &[u8; 12], mapped: SocketAddr) -> Vec<u8> {
    let mut b = [0u8; MAX_RESPONSE_LEN];
    let n = stun::emit_binding_success(txid, mapped, &mut b);
    b[..n].to_vec()
}

#[test]
fn unanswered_discovery_retries_four_times_then_registers_without_binding() {
    let mut t = stun_client();
    t.c.handle_connected(t.at(0), None);
    let out = t.drain();
    assert!(out.frames.is_empty() && out.events.is_empty(), "nothing but STUN before discovery ends: {out:?}");
    assert_eq!(out.dgrams.len(), 1);
    let txid = binding_request(out.dgrams[0].0, &out.dgrams[0].1);
    assert!(!t.c.is_registered());

    let log = t.run_until(2_000);
    // Re-sent every 250 ms with the same transaction id: 4 requests in all (0, 250, 500, 750).
    assert_eq!(log.dgram_times(), vec![250, 500, 750]);
    for (_, to, d) in &log.dgrams {
        assert_eq!(binding_request(*to, d), txid);
    }
    // At 1000 ms: give up, report it, register without a binding.
    assert_eq!(
        log.frames,
        vec![(
            1_000,
            Frame::Register {
                id: id("bob"),
                udp_port: LOCAL_PORT,
                max_calls: 1,
                binding: None,
                auth: None,
                nat: proto::nat::NatClass::Unknown,
                candidates: Vec::new()
            }
        )]
    );
    assert!(matches!(log.events[..], [(1_000, Event::Discovered { mapped: None, .. })]), "{:?}", log.events);
    // Only the ping timer is left.
    assert_eq!(t.next_timeout(), Some(10_000));

    // A late answer is no longer wanted: counted, no second REGISTER.
    t.dgram(1_100, stun_server(), &binding_success(&txid, addr("192.0.2.10:40010")));
    assert!(t.drain().is_empty());
    assert_eq!(t.c.counters().stun_unexpected, 1);
}

#[test]
fn answered_discovery_registers_with_the_binding_and_ignores_stray_responses() {
    let mut t = stun_client();
    t.c.handle_connected(t.at(0), None);
    let out = t.drain();
    let txid = binding_request(out.dgrams[0].0, &out.dgrams[0].1);
    let log = t.run_until(300);
    assert_eq!(log.dgram_times(), vec![250], "one re-send before the answer");

    let mapped = addr("192.0.2.10:40010");
    let mut other_txid = txid;
    other_txid[0] ^= 0xFF;
    // A response to another transaction.
    assert!(t.dgram(300, stun_server(), &binding_success(&other_txid, mapped)).is_none());
    // The right transaction, but not from the configured server.
    assert!(t.dgram(300, addr("198.51.100.1:3479"), &binding_success(&txid, mapped)).is_none());
    assert!(t.dgram(300, addr("198.51.100.2:3478"), &binding_success(&txid, mapped)).is_none());
    // A request, not a response.
    let mut req = [0u8; stun::REQUEST_LEN];
    stun::emit_binding_request(&txid, &mut req);
    assert!(t.dgram(300, stun_server(), &req).is_none());
    assert!(t.drain().is_empty(), "stray STUN must not trigger REGISTER");
    assert_eq!(t.c.counters().stun_unexpected, 4);
    // A truncated response is malformed, not unexpected.
    let good = binding_success(&txid, mapped);
    assert!(t.dgram(300, stun_server(), &good[..good.len() - 4]).is_none());
    assert_eq!(t.c.counters().dgram_malformed, 1);
    assert!(t.drain().is_empty());

    // The real answer.
    assert!(t.dgram(310, stun_server(), &good).is_none());
    let out = t.drain();
    assert_eq!(
        out.frames,
        vec![Frame::Register {
            id: id("bob"),
            udp_port: LOCAL_PORT,
            max_calls: 1,
            binding: Some(txid),
            auth: None,
            nat: proto::nat::NatClass::Unknown,
            candidates: Vec::new()
        }]
    );
    assert!(matches!(out.events[..], [Event::Discovered { mapped: Some(m), .. }] if m == mapped), "{out:?}");
    assert!(out.dgrams.is_empty());

    // Discovery is over: no more requests, and a duplicate answer changes nothing.
    let log = t.run_until(2_000);
    assert!(log.dgrams.is_empty() && log.frames.is_empty() && log.events.is_empty(), "{log:?}");
    assert!(t.dgram(2_000, stun_server(), &good).is_none());
    assert!(t.drain().is_empty());
    assert_eq!(t.c.counters().stun_unexpected, 5);

    let out = t.frame(2_010, Frame::Registered { public: mapped, source: AddrSource::Stun });
    assert!(
        matches!(out.events[..], [Event::Registered { public: p, source: AddrSource::Stun }] if p == mapped),
        "{out:?}"
    );
    assert!(t.c.is_registered());
    assert_eq!(t.c.public_addr(), Some(mapped));
}

#[test]
fn without_a_stun_server_register_goes_out_at_once() {
    let mut t = T::new(ClientConfig::new(id("bob"), LOCAL_PORT));
    t.c.handle_connected(t.at(0), None);
    let out = t.drain();
    assert_eq!(
        out.frames,
        vec![Frame::Register {
            id: id("bob"),
            udp_port: LOCAL_PORT,
            max_calls: 1,
            binding: None,
            auth: None,
            nat: proto::nat::NatClass::Unknown,
            candidates: Vec::new()
        }]
    );
    assert!(out.dgrams.is_empty(), "no STUN without a server");
    assert!(out.events.is_empty(), "no Discovered event without discovery: {out:?}");
    assert_eq!(t.next_timeout(), Some(10_000), "only the ping timer");
}

// ------------------------------------------------------------------------------ 2. registration gate

#[test]
fn call_needs_registered_and_sends_call_with_the_handle_as_call_ref() {
    let mut t = T::new(ClientConfig::new(id("bob"), LOCAL_PORT));
    assert_eq!(t.c.call(t.at(0), id("carol")), Err(ClientError::NotRegistered));
    t.c.handle_connected(t.at(0), None);
    t.drain();
    // REGISTER sent, REGISTERED not yet received.
    assert_eq!(t.c.call(t.at(1), id("carol")), Err(ClientError::NotRegistered));
    assert!(t.drain().frames.is_empty(), "a refused call sends nothing");
    assert_eq!(t.c.active_calls(), 0);

    let out = t.frame(2, Frame::Registered { public: public(), source: AddrSource::TcpPeer });
    assert!(
        matches!(out.events[..], [Event::Registered { public: p, source: AddrSource::TcpPeer }] if p == public()),
        "{out:?}"
    );
    assert_eq!(t.c.public_addr(), Some(public()));
    // A second REGISTERED is unexpected.
    assert!(t.frame(3, Frame::Registered { public: public(), source: AddrSource::TcpPeer }).is_empty());
    assert_eq!(t.c.counters().frames_unexpected, 1);

    let h = t.c.call(t.at(10), id("carol")).unwrap();
    assert!(
        matches!(&t.drain().frames[..], [Frame::Call { call_ref, callee, keys: Some(_) }] if *call_ref == h.0 && *callee == id("carol"))
    );
    let h2 = t.c.call(t.at(11), id("dave")).unwrap();
    assert_ne!(h, h2);
    assert!(
        matches!(&t.drain().frames[..], [Frame::Call { call_ref, callee, keys: Some(_) }] if *call_ref == h2.0 && *callee == id("dave"))
    );
    assert_eq!(t.c.active_calls(), 2);
}

// ------------------------------------------------------------------------------ 3./4. callee

#[test]
fn callee_punches_at_once_and_resends_with_backoff_until_no_media() {
    let mut t = T::registered();
    let out = t.frame(0, incoming_frame());
    // The punch, PUNCHED, and the event, all at once.
    assert_eq!(out.dgrams.len(), 1);
    assert_eq!(out.dgrams[0].0, caller_addr());
    assert_eq!(
        parse_null(&out.dgrams[0].1),
        NullPacket { call_id: CALL_ID, token: TOKEN, keepalive: false, from_caller: false, probe: false, counter: 0 }
    );
    assert!(
        matches!(&out.frames[..], [Frame::Punched { call_id: CALL_ID, udp_port: LOCAL_PORT, keys: Some(k) }] if k.suites == [e2e::SUITE_AES_128_GCM]),
        "{out:?}"
    );
    let h = match &out.events[..] {
        [Event::Incoming { handle, call_id, caller, caller_addr: a }] => {
            assert_eq!((*call_id, caller, *a), (CALL_ID, &id("alice"), caller_addr()));
            *handle
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(t.c.peer_addr(h), Some(caller_addr()));
    assert!(!t.c.can_send(h), "the callee waits for the caller's first packet");

    let log = t.run_until(4_999);
    // Six re-sends: 50 ms, doubling.
    assert_eq!(log.dgram_times(), vec![50, 150, 350, 750, 1_550, 3_150]);
    for (_, to, p) in log.nulls() {
        assert_eq!(to, caller_addr());
        assert_eq!(
            p,
            NullPacket {
                call_id: CALL_ID,
                token: TOKEN,
                keepalive: false,
                from_caller: false,
                probe: false,
                counter: 0
            }
        );
    }
    assert!(log.frames.is_empty() && log.events.is_empty(), "{log:?}");
    assert_eq!(t.c.active_calls(), 1);
    assert_eq!(t.next_timeout(), Some(5_000), "after the last re-send only the first-media deadline is left");

    let log = t.run_until(5_000);
    assert!(log.dgrams.is_empty());
    assert_eq!(log.frames, vec![(5_000, Frame::Hangup { call_id: CALL_ID, reason: HangupReason::Timeout })]);
    let r = reports(log.events.iter().map(|(_, e)| e));
    assert_eq!(r.len(), 1, "{:?}", log.events);
    let r = &r[0];
    assert_eq!(r.reason, EndReason::NoMedia);
    assert_eq!((r.handle, r.call_id, r.role), (h, Some(CALL_ID), Role::Callee));
    assert_eq!((&r.peer_id, r.peer, r.local), (&id("alice"), Some(caller_addr()), Some(public())));
    assert_eq!(r.nulls_sent, 7, "the punch and six re-sends");
    assert_eq!((r.sent, r.received, r.nulls_received), (0, 0, 0));
    assert_eq!((r.setup, r.first_media), (None, None));
    assert!(!r.succeeded());
    assert_eq!(t.c.active_calls(), 0);
    assert!(!t.c.can_send(h));

    // Nothing more, ever, for this call.
    let log = t.run_until(9_999);
    assert!(log.dgrams.is_empty() && log.frames.is_empty() && log.events.is_empty(), "{log:?}");
}

#[test]
fn callees_resends_stop_at_the_callers_first_packet_and_media_flows_back() {
    let (mut t, h) = T::with_incoming();
    assert_eq!(t.send(0, h, b"x", 960), Err(ClientError::NoPath(h)));
    assert_eq!(t.run_until(50).dgram_times(), vec![50]);

    let got = t.dgram(100, caller_addr(), &rtp(CALLER_SSRC, 1000, 5000, b"hello"));
    let (rh, hdr, payload) = got.expect("the caller's RTP is passed up");
    assert_eq!(rh, h);
    assert_eq!((hdr.ssrc, hdr.seq, hdr.timestamp), (CALLER_SSRC, 1000, 5000));
    assert_eq!(payload, b"hello");
    let out = t.drain();
    assert!(matches!(out.events[..], [Event::MediaFlowing { handle }] if handle == h), "{out:?}");
    // The callee confirms the path at once with one null packet to the caller.
    assert!(out.frames.is_empty(), "{out:?}");
    assert_eq!(out.dgrams.len(), 1, "{out:?}");
    assert!(t.c.can_send(h));

    // A buffer too small is refused without using a sequence number.
    let mut small = [0u8; 15];
    assert_eq!(
        t.c.send_media(t.at(100), h, b"abcd", 960, &mut small),
        Err(ClientError::BufferTooSmall { need: 32, have: 15 }),
        "12 header bytes, 4 payload bytes and the 16-byte GCM tag"
    );

    // Media back to the caller: SSRC = the token's high half, seq +1, timestamp + duration.
    let mut first: Option<RtpHeader> = None;
    for k in 0..3u16 {
        let (to, hdr, p) = t.send(100 + 20 * k as u64, h, b"abcd", 960).unwrap();
        assert_eq!(to, caller_addr());
        assert_eq!(p, b"abcd");
        assert_eq!(hdr.ssrc, CALLEE_SSRC);
        assert_eq!(hdr.payload_type, OPUS_PAYLOAD_TYPE);
        assert_eq!(hdr.marker, k == 0, "marker on the first packet only");
        let f = *first.get_or_insert(hdr);
        assert_eq!(hdr.seq, f.seq.wrapping_add(k));
        assert_eq!(hdr.timestamp, f.timestamp.wrapping_add(960 * k as u32));
    }

    // A forwarded packet (video from a local program) keeps its payload type, marker and
    // timestamp, and takes the call's SSRC and next sequence number.
    let mut buf = [0u8; 1500];
    let fields = MediaFields { marker: Some(true), payload_type: 96, timestamp: Some(90_000) };
    let tx = t.c.send_rtp(t.at(140), h, fields, b"vp8", 0, &mut buf).unwrap();
    let n = t.open(&mut buf[..tx.len]);
    let (hdr, p) = RtpHeader::parse(&buf[..n]).unwrap();
    let f = first.unwrap();
    assert_eq!(
        (hdr.payload_type, hdr.marker, hdr.timestamp, hdr.ssrc, hdr.seq),
        (96, true, 90_000, CALLEE_SSRC, f.seq.wrapping_add(3))
    );
    assert_eq!(p, b"vp8");
    let fields = MediaFields { marker: Some(false), payload_type: 96, timestamp: Some(90_000) };
    let tx = t.c.send_rtp(t.at(140), h, fields, b"more", 0, &mut buf).unwrap();
    let (hdr, _) = RtpHeader::parse(&buf[..tx.len]).unwrap();
    assert_eq!((hdr.marker, hdr.timestamp, hdr.seq), (false, 90_000, f.seq.wrapping_add(4)), "same frame, next packet");

    // No more null re-sends; the next datagram is the keepalive, 15 s after the last send.
    let log = t.run_until(15_139);
    assert!(log.dgrams.is_empty(), "re-sends must stop once the caller's packet arrived: {:?}", log.dgram_times());
    assert!(log.call_frames().is_empty() && log.call_events().is_empty(), "{log:?}");
    let log = t.run_until(15_140);
    assert_eq!(
        log.nulls(),
        vec![(
            15_140,
            caller_addr(),
            NullPacket {
                call_id: CALL_ID,
                token: TOKEN,
                keepalive: true,
                from_caller: false,
                probe: false,
                counter: 0
            }
        )]
    );

    t.c.hangup(t.at(16_000), h).unwrap();
    let r = reports(&t.drain().events).remove(0);
    assert_eq!(
        (r.sent, r.received, r.lost, r.nulls_sent),
        (5, 1, 0, 4),
        "punch, one re-send, the confirmation, one keepalive"
    );
    assert_eq!(r.first_media, Some(ms(100)));
}

// ------------------------------------------------------------------------------ 5. caller

#[test]
fn caller_sends_one_null_on_start_and_streams_then_no_media_ends_it() {
    let mut t = T::registered();
    let h = t.c.call(t.at(0), id("carol")).unwrap();
    assert!(
        matches!(&t.drain().frames[..], [Frame::Call { call_ref, callee, keys: Some(_) }] if *call_ref == h.0 && *callee == id("carol"))
    );
    assert!(!t.c.can_send(h));
    assert_eq!(t.c.peer_addr(h), None);
    assert_eq!(t.send(100, h, b"x", 960), Err(ClientError::NoPath(h)));

    let out = t.frame(
        200,
        Frame::Start {
            call_ref: h.0,
            call_id: CALL_ID,
            token: TOKEN,
            callee_addr: callee_addr(),
            callee_nat: proto::nat::NatClass::Unknown,
            callee_candidates: Vec::new(),
            callee_keys: None,
        },
    );
    assert!(out.frames.is_empty(), "{out:?}");
    assert!(
        matches!(out.events[..], [Event::Started { handle, call_id: CALL_ID, peer }] if handle == h && peer == callee_addr()),
        "{out:?}"
    );
    assert_eq!(out.dgrams.len(), 1);
    assert_eq!(out.dgrams[0].0, callee_addr());
    assert_eq!(
        parse_null(&out.dgrams[0].1),
        NullPacket { call_id: CALL_ID, token: TOKEN, keepalive: false, from_caller: true, probe: false, counter: 0 }
    );
    assert!(t.c.can_send(h));
    assert_eq!(t.c.peer_addr(h), Some(callee_addr()));

    let (to, hdr, _) = t.send(200, h, b"media", 960).unwrap();
    assert_eq!((to, hdr.ssrc, hdr.marker), (callee_addr(), CALLER_SSRC, true));

    // The caller sends no null re-sends; nothing until the first-media deadline (START + 5 s).
    let log = t.run_until(5_199);
    assert!(log.dgrams.is_empty() && log.frames.is_empty() && log.events.is_empty(), "{log:?}");
    let log = t.run_until(5_200);
    assert_eq!(log.frames, vec![(5_200, Frame::Hangup { call_id: CALL_ID, reason: HangupReason::Timeout })]);
    let r = reports(log.events.iter().map(|(_, e)| e));
    assert_eq!(r.len(), 1, "{:?}", log.events);
    let r = &r[0];
    assert_eq!(r.reason, EndReason::NoMedia);
    assert_eq!((r.handle, r.call_id, r.role, &r.peer_id), (h, Some(CALL_ID), Role::Caller, &id("carol")));
    assert_eq!(r.setup, Some(ms(200)), "CALL to START");
    assert_eq!(r.first_media, None);
    assert_eq!((r.sent, r.nulls_sent, r.received), (1, 1, 0));
    assert_eq!(t.c.active_calls(), 0);
}

#[test]
fn callers_path_is_two_way_at_the_callees_null_packet() {
    let (mut t, h) = T::placed_call(0);
    // A null from the callee, but from the wrong address: counted, ignored.
    assert!(t.dgram(30, addr("198.51.100.21:5004"), &null(CALL_ID, TOKEN, false, false)).is_none());
    assert_eq!(t.c.counters().dgram_wrong_source, 1);
    assert!(t.drain().is_empty());
    // The callee's re-sent punch passes the caller's now-open firewall.
    assert!(t.dgram(50, callee_addr(), &null(CALL_ID, TOKEN, false, false)).is_none());
    let out = t.drain();
    assert!(matches!(out.events[..], [Event::MediaFlowing { handle }] if handle == h), "{out:?}");
    // The callee's media (SSRC = high half) is passed up.
    let (rh, hdr, _) = t.dgram(60, callee_addr(), &rtp(CALLEE_SSRC, 7, 70, b"m")).unwrap();
    assert_eq!((rh, hdr.ssrc), (h, CALLEE_SSRC));
    assert!(t.drain().is_empty(), "MediaFlowing only once");
    // The first-media deadline is gone.
    let log = t.run_until(6_000);
    assert!(log.frames.is_empty() && log.events.is_empty(), "{log:?}");
    assert_eq!(t.c.active_calls(), 1);
}

#[test]
fn start_for_an_unknown_call_ref_is_hung_up_and_a_duplicate_start_ignored() {
    let (mut t, h) = T::placed_call(0);
    let out = t.frame(
        10,
        Frame::Start {
            call_ref: 999,
            call_id: CallId(77),
            token: 5,
            callee_addr: callee_addr(),
            callee_nat: proto::nat::NatClass::Unknown,
            callee_candidates: Vec::new(),
            callee_keys: None,
        },
    );
    assert_eq!(out.frames, vec![Frame::Hangup { call_id: CallId(77), reason: HangupReason::Timeout }]);
    assert!(out.dgrams.is_empty() && out.events.is_empty(), "{out:?}");
    assert_eq!(t.c.counters().frames_unexpected, 1);
    assert_eq!(t.c.active_calls(), 1);

    // The START of the live call again: the call id is known, so no HANGUP either.
    let out = t.frame(
        20,
        Frame::Start {
            call_ref: h.0,
            call_id: CALL_ID,
            token: TOKEN,
            callee_addr: callee_addr(),
            callee_nat: proto::nat::NatClass::Unknown,
            callee_candidates: Vec::new(),
            callee_keys: None,
        },
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(t.c.counters().frames_unexpected, 2);
}

#[test]
fn no_start_within_start_timeout_ends_the_call_without_hangup() {
    let mut t = T::registered();
    let h = t.c.call(t.at(0), id("carol")).unwrap();
    t.drain();
    let log = t.run_until(4_999);
    assert!(log.frames.is_empty() && log.events.is_empty() && log.dgrams.is_empty(), "{log:?}");
    let log = t.run_until(5_000);
    assert!(log.frames.is_empty(), "no call id yet, so no HANGUP: {:?}", log.frames);
    let r = reports(log.events.iter().map(|(_, e)| e));
    assert_eq!(r.len(), 1, "{:?}", log.events);
    assert_eq!((r[0].handle, r[0].reason, r[0].call_id, r[0].setup), (h, EndReason::NoStart, None, None));
    assert_eq!(t.c.active_calls(), 0);

    // The START arrives late: the manager is told to end the call.
    let out = t.frame(
        5_100,
        Frame::Start {
            call_ref: h.0,
            call_id: CALL_ID,
            token: TOKEN,
            callee_addr: callee_addr(),
            callee_nat: proto::nat::NatClass::Unknown,
            callee_candidates: Vec::new(),
            callee_keys: None,
        },
    );
    assert_eq!(out.frames, vec![Frame::Hangup { call_id: CALL_ID, reason: HangupReason::Timeout }]);
    assert!(out.dgrams.is_empty() && out.events.is_empty());
    assert_eq!(t.c.counters().frames_unexpected, 1);
}

#[test]
fn busy_unknown_and_reject_end_pending_calls() {
    let mut t = T::registered();
    let h1 = t.c.call(t.at(0), id("carol")).unwrap();
    let h2 = t.c.call(t.at(0), id("dave")).unwrap();
    let h3 = t.c.call(t.at(0), id("bob")).unwrap();
    t.drain();
    let mut ended = Vec::new();
    for f in [
        Frame::Busy { call_ref: h1.0 },
        Frame::Unknown { call_ref: h2.0, reason: UnknownReason::Offline },
        Frame::Reject {
            call_ref: h3.0,
            call_id: CallId(0),
            reason: RejectReason::SelfCall,
            callee_nat: proto::nat::NatClass::Unknown,
        },
    ] {
        let out = t.frame(10, f);
        assert!(out.frames.is_empty() && out.dgrams.is_empty(), "{out:?}");
        ended.extend(reports(&out.events).into_iter().map(|r| (r.handle, r.reason)));
    }
    assert_eq!(
        ended,
        vec![
            (h1, EndReason::Busy),
            (h2, EndReason::Unknown(UnknownReason::Offline)),
            (h3, EndReason::Rejected(RejectReason::SelfCall)),
        ]
    );
    assert_eq!(t.c.active_calls(), 0);
    assert!(t.frame(20, Frame::Busy { call_ref: h1.0 }).is_empty());
    assert_eq!(t.c.counters().frames_unexpected, 1);
}

// ------------------------------------------------------------------------------ 6. keepalive

#[test]
fn keepalive_after_send_silence_and_peer_gone_after_receive_silence() {
    let (mut t, h) = T::placed_call(0);
    assert!(t.dgram(20, callee_addr(), &rtp(CALLEE_SSRC, 100, 0, b"p")).is_some());
    assert!(matches!(t.drain().events[..], [Event::MediaFlowing { .. }]));

    // The callee sends every 5 s (at 20 + 5000 k ms) until 80 020 ms; this side sends nothing
    // but one media packet at 61 000 ms.
    let mut log = Log::default();
    let mut sent_media = false;
    for k in 1..=16u64 {
        let at = 20 + 5_000 * k;
        if at > 61_000 && !sent_media {
            log.extend(t.run_until(61_000));
            t.send(61_000, h, b"late", 960).unwrap();
            sent_media = true;
        }
        log.extend(t.run_until(at));
        assert!(t.dgram(at, callee_addr(), &rtp(CALLEE_SSRC, 100 + k as u16, 960 * k as u32, b"p")).is_some());
    }
    // The peer's packets kept the call up far beyond media_timeout (35 s).
    log.extend(t.run_until(115_019));
    assert_eq!(t.c.active_calls(), 1);
    assert!(log.call_frames().is_empty() && log.call_events().is_empty(), "{log:?}");

    // A keepalive after every 15 s of sending silence; the media at 61 s reset the clock.
    assert_eq!(log.dgram_times(), vec![15_000, 30_000, 45_000, 60_000, 76_000, 91_000, 106_000]);
    for (_, to, p) in log.nulls() {
        assert_eq!(to, callee_addr());
        assert_eq!(
            p,
            NullPacket { call_id: CALL_ID, token: TOKEN, keepalive: true, from_caller: true, probe: false, counter: 0 }
        );
    }

    // Nothing from the peer since 80 020 ms: PeerGone 35 s later.
    let log = t.run_until(115_020);
    assert!(log.dgrams.is_empty());
    assert_eq!(log.call_frames(), vec![(115_020, Frame::Hangup { call_id: CALL_ID, reason: HangupReason::PeerGone })]);
    let r = reports(log.call_events().into_iter().map(|(_, e)| e));
    assert_eq!(r.len(), 1, "{:?}", log.events);
    assert_eq!(r[0].reason, EndReason::PeerGone);
    assert_eq!((r[0].sent, r[0].received, r[0].nulls_sent), (1, 17, 8), "START null plus 7 keepalives");
    assert_eq!(r[0].duration, ms(115_020));
    assert_eq!(t.c.active_calls(), 0);
}

// ------------------------------------------------------------------------------ 7. bad input

#[test]
fn bad_datagrams_are_counted_and_dropped() {
    let (mut t, h) = T::with_incoming();
    let stranger = addr("203.0.113.99:40000");
    // Right SSRC, wrong source.
    assert!(t.dgram(10, stranger, &rtp(CALLER_SSRC, 1, 1, b"x")).is_none());
    // Unknown SSRC from the right source.
    assert!(t.dgram(10, caller_addr(), &rtp(0xDEAD_BEEF, 1, 1, b"x")).is_none());
    // Truncated RTP (11 of the 12 header bytes).
    assert!(t.dgram(10, caller_addr(), &rtp(CALLER_SSRC, 1, 1, b"")[..11]).is_none());
    // First byte 0x40: no known kind.
    assert!(t.dgram(10, caller_addr(), &[0x40; 20]).is_none());
    // Null packets: wrong token, unknown call id, right packet from the wrong source,
    // truncated.
    assert!(t.dgram(10, caller_addr(), &null(CALL_ID, TOKEN ^ 1, false, true)).is_none());
    assert!(t.dgram(10, caller_addr(), &null(CallId(5), TOKEN, false, true)).is_none());
    assert!(t.dgram(10, stranger, &null(CALL_ID, TOKEN, false, true)).is_none());
    assert!(t.dgram(10, caller_addr(), &null(CALL_ID, TOKEN, false, true)[..5]).is_none());
    // RTCP from the peer: counted, not a packet from the peer.
    assert!(t.dgram(10, caller_addr(), &[0x80, 200, 0, 6, 1, 2, 3, 4]).is_none());
    // A bare null from a stranger.
    assert!(t.dgram(10, stranger, &[]).is_none());

    assert_eq!(
        *t.c.counters(),
        ClientCounters {
            dgram_unknown: 1,
            dgram_malformed: 2,
            dgram_unmatched: 3,
            dgram_wrong_source: 2,
            rtcp: 1,
            stun_unexpected: 0,
            frames_unexpected: 0,
            sockets_failed: 0,
            relatched: 0,
            latched_elsewhere: 0,
            early_nulls: 0,
            key_exchange_failed: 0,
            media_replayed: 0,
            media_unauthenticated: 0,
            nulls_unauthenticated: 1,
            nulls_replayed: 0,
        }
    );
    assert!(t.drain().is_empty(), "none of that is a packet from the peer");
    assert!(!t.c.can_send(h));
    assert_eq!(t.next_timeout(), Some(50), "the punch is still being re-sent");

    // An empty datagram from the caller's address is a bare null packet: it proves nothing
    // about its sender, so it is refused. The caller's signed null opens the path.
    assert!(t.dgram(19, caller_addr(), &[]).is_none());
    assert!(t.drain().is_empty());
    assert_eq!(t.c.counters().nulls_unauthenticated, 2);
    let before = t.c.counters().clone();
    assert!(t.dgram(20, caller_addr(), &null(CALL_ID, TOKEN, false, true)).is_none());
    let out = t.drain();
    assert!(matches!(out.events[..], [Event::MediaFlowing { handle }] if handle == h), "{out:?}");
    assert_eq!(*t.c.counters(), before);
    assert!(t.c.can_send(h));
    let log = t.run_until(6_000);
    assert!(log.dgrams.is_empty() && log.call_events().is_empty(), "re-sends stopped, no NoMedia: {log:?}");

    t.c.hangup(t.at(6_000), h).unwrap();
    let r = reports(&t.drain().events).remove(0);
    assert_eq!((r.nulls_received, r.received, r.first_media), (1, 0, None));
    // After the call: its packets belong to no call.
    assert!(t.dgram(6_001, caller_addr(), &rtp(CALLER_SSRC, 2, 2, b"x")).is_none());
    assert!(t.dgram(6_001, caller_addr(), &null(CALL_ID, TOKEN, false, true)).is_none());
    assert!(t.dgram(6_001, caller_addr(), &[]).is_none());
    assert_eq!(t.c.counters().dgram_unmatched, before.dgram_unmatched + 2);
    assert_eq!(t.c.counters().nulls_unauthenticated, before.nulls_unauthenticated + 1);
}

fn random_addr(rng: &mut Rng) -> SocketAddr {
    let v = rng.next_u64();
    let port = (v >> 8) as u16;
    if v & 7 == 0 {
        let hi = rng.next_u64() as u128;
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(hi << 64 | rng.next_u64() as u128)), port)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from((v >> 32) as u32)), port)
    }
}

#[test]
fn ten_thousand_random_datagrams_neither_panic_nor_disturb_a_call() {
    let (mut t, h) = T::with_incoming();
    let mut rng = Rng::new(0x5EED_0001);
    let mut buf = [0u8; 300];
    let mut log = Log::default();
    for i in 0..10_000u64 {
        let at = 1 + i * 4 / 10; // spread over 4 s, inside the first-media window
        log.extend(t.run_until(at));
        let mut len = rng.below(buf.len() as u64 + 1) as usize;
        let shape = rng.below(6);
        if shape == 2 || shape == 5 {
            len = if rng.chance(0.5) { 20 } else { len };
        }
        let d = &mut buf[..len];
        rng.fill(d);
        // Steer a share of the datagrams deep into each parser.
        match shape {
            1 if len >= 1 => d[0] = 0x80 | (d[0] & 0x3F), // RTP or RTCP
            2 if len >= 1 => d[0] = 0x0E,                 // null
            3 if len >= 20 => {
                // STUN header with a consistent length field; random attributes follow.
                d[0] &= 0x01;
                d[1] = 0x01;
                d[2..4].copy_from_slice(&((len - 20) as u16).to_be_bytes());
                d[4..8].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
                if len >= 24 && rng.chance(0.5) {
                    d[20..22].copy_from_slice(&stun::ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
                }
            }
            4 if len >= 12 => {
                // RTP with the SSRC the call expects.
                d[0] = 0x80 | (d[0] & 0x3F);
                d[1] &= 0x7F;
                d[8..12].copy_from_slice(&CALLER_SSRC.to_be_bytes());
            }
            5 if len == proto::wire::null::NULL_LEN => {
                // A valid null packet of the call.
                d.copy_from_slice(&null(CALL_ID, TOKEN, rng.chance(0.5), rng.chance(0.5)));
            }
            _ => {}
        }
        let mut from = random_addr(&mut rng);
        while from == caller_addr() {
            from = random_addr(&mut rng);
        }
        // As it arrives: an attacker's packets are neither protected nor signed by the peer.
        assert!(t.raw_dgram(at, from, &mut buf[..len].to_vec()).is_none(), "datagram {i} from {from} was passed up");
    }
    log.extend(t.drain_into_log(4_000));

    // Every datagram was counted exactly once, and none of them touched the call.
    let c = t.c.counters().clone();
    let total = c.dgram_unknown
        + c.dgram_malformed
        + c.dgram_unmatched
        + c.dgram_wrong_source
        + c.rtcp
        + c.stun_unexpected
        + c.nulls_unauthenticated
        + c.nulls_replayed
        + c.media_unauthenticated
        + c.media_replayed;
    assert_eq!(total, 10_000, "{c:?}");
    assert_eq!(c.frames_unexpected, 0);
    assert!(c.dgram_unknown > 0 && c.dgram_malformed > 0 && c.dgram_unmatched > 0 && c.dgram_wrong_source > 0);
    assert!(c.rtcp > 0 && c.stun_unexpected > 0, "{c:?}");
    assert!(log.events.is_empty() && log.frames.is_empty(), "{log:?}");
    assert_eq!(log.dgram_times(), vec![50, 150, 350, 750, 1_550, 3_150], "the punch schedule ran undisturbed");
    assert_eq!(t.c.active_calls(), 1);
    assert_eq!(t.c.peer_addr(h), Some(caller_addr()));

    // And the call still works.
    assert!(t.dgram(4_001, caller_addr(), &rtp(CALLER_SSRC, 1, 1, b"real")).is_some());
    assert!(matches!(t.drain().events[..], [Event::MediaFlowing { handle }] if handle == h));
    assert!(t.send(4_002, h, b"back", 960).is_ok());
}

// ------------------------------------------------------------------------------ 8. frames

#[test]
fn duplicate_incoming_is_ignored() {
    let (mut t, _) = T::with_incoming();
    let out = t.frame(10, incoming_frame());
    assert!(out.is_empty(), "no second punch, PUNCHED or event: {out:?}");
    assert_eq!(t.c.counters().frames_unexpected, 1);
    assert_eq!(t.c.active_calls(), 1);
    assert_eq!(t.next_timeout(), Some(50), "the re-send schedule is not restarted");
}

#[test]
fn hangup_from_the_manager_ends_a_known_call_and_is_counted_for_an_unknown_one() {
    let (mut t, h) = T::established_callee();
    let out = t.frame(20, Frame::Hangup { call_id: CallId(99), reason: HangupReason::Normal });
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(t.c.counters().frames_unexpected, 1);
    assert_eq!(t.c.active_calls(), 1);

    let out = t.frame(30, Frame::Hangup { call_id: CALL_ID, reason: HangupReason::Normal });
    assert!(out.frames.is_empty(), "a remote HANGUP is not echoed: {out:?}");
    let r = reports(&out.events);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].handle, r[0].reason), (h, EndReason::RemoteHangup(HangupReason::Normal)));
    assert!(r[0].succeeded());
    assert_eq!(t.c.active_calls(), 0);
}

#[test]
fn ping_is_answered_with_pong() {
    let mut t = T::registered();
    let out = t.frame(5, Frame::Ping { nonce: 0xDEAD_BEEF_0000_0001 });
    assert_eq!(out.frames, vec![Frame::Pong { nonce: 0xDEAD_BEEF_0000_0001 }]);
    assert!(out.dgrams.is_empty() && out.events.is_empty());
    assert_eq!(t.c.counters().frames_unexpected, 0);
}

#[test]
fn pings_every_interval_and_reports_unresponsive_once() {
    let mut t = T::registered();
    let mut nonces = Vec::new();
    // Answered pings at 10, 20 and 30 s.
    for s in 1..=3u64 {
        let log = t.run_until(s * 10_000);
        let n = match &log.frames[..] {
            [(at, Frame::Ping { nonce })] if *at == s * 10_000 => *nonce,
            other => panic!("expected one PING at {} s: {other:?}", s * 10),
        };
        assert!(log.events.is_empty());
        nonces.push(n);
        assert!(t.frame(s * 10_000 + 5, Frame::Pong { nonce: n }).is_empty());
    }
    assert_eq!(t.c.counters().frames_unexpected, 0);
    // The PING at 40 s goes unanswered: no new PING while it is outstanding, and
    // "unresponsive" once, three intervals after it was sent.
    let log = t.run_until(40_000);
    let n4 = match &log.frames[..] {
        [(40_000, Frame::Ping { nonce })] => *nonce,
        other => panic!("{other:?}"),
    };
    nonces.push(n4);
    let log = t.run_until(69_999);
    assert!(log.frames.is_empty() && log.events.is_empty(), "{log:?}");
    let log = t.run_until(70_000);
    assert!(log.frames.is_empty());
    assert!(matches!(log.events[..], [(70_000, Event::ManagerUnresponsive)]), "{:?}", log.events);
    let log = t.run_until(200_000);
    assert!(log.frames.is_empty() && log.events.is_empty(), "reported once, no new PING: {log:?}");

    // A PONG with a stale nonce does not count; the right one restarts the pings.
    assert!(t.frame(200_001, Frame::Pong { nonce: nonces[0] }).is_empty());
    assert_eq!(t.c.counters().frames_unexpected, 1);
    assert!(t.frame(200_002, Frame::Pong { nonce: n4 }).is_empty());
    let log = t.run_until(210_000);
    assert!(matches!(log.frames[..], [(210_000, Frame::Ping { .. })]), "{:?}", log.frames);
    assert!(log.events.is_empty());
}

// ------------------------------------------------------------------------------ 9. disconnect

#[test]
fn disconnect_ends_calls_waiting_for_start_but_established_calls_go_on() {
    let mut t = T::registered();
    let pending = t.c.call(t.at(0), id("carol")).unwrap();
    t.drain();
    assert!(!t.frame(0, incoming_frame()).is_empty());
    let h = match t.dgram(10, caller_addr(), &rtp(CALLER_SSRC, 1, 1, b"x")) {
        Some(r) => r.0,
        None => panic!("the caller's packet must be passed up"),
    };
    assert_ne!(h, pending);
    t.drain();

    // A frame queued for the old connection is dropped with it.
    t.c.handle_frame(t.at(999), Frame::Ping { nonce: 1 });
    t.c.handle_disconnected(t.at(1_000));
    let out = t.drain();
    assert!(out.frames.is_empty(), "nothing is sent for a lost connection: {out:?}");
    let r = reports(&out.events);
    assert_eq!(r.len(), 1, "{out:?}");
    assert_eq!(
        (r[0].handle, r[0].reason, r[0].role, r[0].call_id),
        (pending, EndReason::ManagerLost, Role::Caller, None)
    );
    assert_eq!(out.events.len(), 1);

    assert!(!t.c.is_registered());
    assert_eq!(t.c.call(t.at(1_000), id("carol")), Err(ClientError::NotRegistered));
    assert_eq!(t.c.active_calls(), 1);
    assert!(t.c.can_send(h));
    let (to, hdr, _) = t.send(1_000, h, b"still here", 960).unwrap();
    assert_eq!((to, hdr.ssrc), (caller_addr(), CALLEE_SSRC));

    // The direct path keeps its keepalives without the manager, and no pings go out.
    let log = t.run_until(16_000);
    assert!(log.frames.is_empty() && log.events.is_empty(), "{log:?}");
    assert_eq!(
        log.nulls(),
        vec![(
            16_000,
            caller_addr(),
            NullPacket {
                call_id: CALL_ID,
                token: TOKEN,
                keepalive: true,
                from_caller: false,
                probe: false,
                counter: 0
            }
        )]
    );
    // Media timeout still applies; with no manager there is no HANGUP to send.
    let log = t.run_until(35_010);
    assert!(log.frames.is_empty(), "{log:?}");
    let r = reports(log.events.iter().map(|(_, e)| e));
    assert_eq!((r.len(), r[0].reason), (1, EndReason::PeerGone), "{:?}", log.events);
}

// ------------------------------------------------------------------------------ 10. hangup

#[test]
fn hangup_sends_normal_reports_local_hangup_and_forgets_the_call() {
    let (mut t, h) = T::established_callee();
    t.send(20, h, b"x", 960).unwrap();
    t.c.hangup(t.at(1_010), h).unwrap();
    let out = t.drain();
    assert_eq!(out.frames, vec![Frame::Hangup { call_id: CALL_ID, reason: HangupReason::Normal }]);
    assert!(out.dgrams.is_empty());
    let r = reports(&out.events);
    assert_eq!((r.len(), out.events.len()), (1, 1), "{out:?}");
    let r = &r[0];
    assert_eq!(r.reason, EndReason::LocalHangup);
    assert_eq!((r.handle, r.call_id, r.role, &r.peer_id), (h, Some(CALL_ID), Role::Callee, &id("alice")));
    assert_eq!((r.local, r.peer), (Some(public()), Some(caller_addr())));
    assert_eq!(r.first_media, Some(ms(10)));
    assert_eq!(r.duration, ms(1_000), "from the path coming up to the hangup");
    // Nulls: the punch at INCOMING and the confirmation at the caller's first packet.
    assert_eq!((r.sent, r.received, r.lost, r.nulls_sent, r.nulls_received), (1, 1, 0, 2, 0));
    assert!(r.succeeded());

    assert_eq!(t.c.hangup(t.at(1_020), h), Err(ClientError::NoSuchCall(h)));
    assert_eq!(t.send(1_020, h, b"x", 960), Err(ClientError::NoSuchCall(h)));
    assert!(!t.c.can_send(h));
    assert!(t.drain().is_empty());
    assert_eq!(t.c.active_calls(), 0);
    assert_eq!(t.next_timeout(), Some(10_000), "only the ping timer is left");
}

// ------------------------------------------------------------------------------ reports

/// `CallReport::setup` is documented as "Callee: INCOMING to first packet received" (null or
/// RTP), distinct from `first_media` ("to the first media packet received").
#[test]
fn callee_setup_runs_from_incoming_to_the_first_media_packet() {
    let (mut t, h) = T::with_incoming();
    // The caller's null packet on START arrives first, its media 20 ms later.
    assert!(t.dgram(20, caller_addr(), &null(CALL_ID, TOKEN, false, true)).is_none());
    assert!(t.dgram(40, caller_addr(), &rtp(CALLER_SSRC, 1, 1, b"x")).is_some());
    t.c.hangup(t.at(100), h).unwrap();
    let r = reports(&t.drain().events).remove(0);
    assert_eq!(r.first_media, Some(ms(40)));
    assert_eq!(r.duration, ms(80), "the path came up with the null at 20 ms");
    // The callee's setup_ms is defined as INCOMING to the first media received: a null
    // packet opens the path, but media has not flowed yet.
    assert_eq!(r.setup, Some(ms(40)), "setup ends at the first RTP packet, not the caller's null");
}

/// The callee's output on INCOMING comes out of `poll_output` in wire order: the null packet
/// (which opens the callee's firewall) before PUNCHED (which makes the manager send START,
/// and so the caller's first packet), then the event. The order is the core's, so no
/// driver can reorder it.
#[test]
fn incoming_outputs_leave_in_wire_order_null_before_punched() {
    let mut t = T::registered();
    let mut f = incoming_frame();
    if let Frame::Incoming { caller_keys, .. } = &mut f {
        *caller_keys = Some(Box::new(HandPeer::offer(&[7; 32], &[e2e::SUITE_AES_128_GCM]).share().clone()));
    }
    t.c.handle_frame(t.at(0), f);
    let mut buf = [0u8; 1500];
    let mut kinds = Vec::new();
    loop {
        match t.c.poll_output(&mut buf).unwrap() {
            Output::Transmit(tx) => {
                assert_eq!(tx.to, caller_addr());
                assert_eq!(classify(&buf[..tx.len]), DatagramKind::Null);
                kinds.push("null");
            }
            Output::Frame(Frame::Punched { .. }) => kinds.push("PUNCHED"),
            Output::Frame(f) => panic!("unexpected frame {f:?}"),
            Output::Event(Event::Incoming { .. }) => kinds.push("Incoming"),
            Output::Event(e) => panic!("unexpected event {e:?}"),
            Output::OpenSocket(s) | Output::CloseSocket(s) => panic!("unexpected socket {s:?}"),
            Output::Timeout(t) => {
                assert!(t.is_some(), "the null re-send timer is armed");
                break;
            }
        }
    }
    assert_eq!(kinds, ["null", "PUNCHED", "Incoming"]);
}

/// A buffer too small for the next control datagram is an error, not a panic, and the
/// datagram stays queued for a call with a larger buffer.
#[test]
fn a_small_output_buffer_is_an_error_and_loses_nothing() {
    let mut t = T::registered();
    let mut f = incoming_frame();
    if let Frame::Incoming { caller_keys, .. } = &mut f {
        *caller_keys = Some(Box::new(HandPeer::offer(&[7; 32], &[e2e::SUITE_AES_128_GCM]).share().clone()));
    }
    t.c.handle_frame(t.at(0), f);
    let mut small = [0u8; 4];
    assert_eq!(
        t.c.poll_output(&mut small).unwrap_err(),
        ClientError::BufferTooSmall { need: proto::wire::null::NULL_LEN, have: 4 }
    );
    let mut buf = [0u8; proto::client::MAX_CONTROL_DATAGRAM];
    match t.c.poll_output(&mut buf).unwrap() {
        Output::Transmit(tx) => assert_eq!(classify(&buf[..tx.len]), DatagramKind::Null),
        o => panic!("expected the null packet, got {o:?}"),
    }
}

// ------------------------------------------------------------------------------ 9. candidates

fn host(s: &str) -> Candidate {
    Candidate { kind: CandidateKind::Host, addr: addr(s) }
}

/// START for call `h` from carol at [`callee_addr`], with `candidates` (host kind).
fn start_with(h: CallHandle, class: proto::nat::NatClass, candidates: &[&str]) -> Frame {
    Frame::Start {
        call_ref: h.0,
        call_id: CALL_ID,
        token: TOKEN,
        callee_addr: callee_addr(),
        callee_nat: class,
        callee_candidates: candidates.iter().map(|a| host(a)).collect(),
        callee_keys: None,
    }
}

#[test]
fn register_names_the_host_addresses_once_each() {
    let mut cfg = ClientConfig::new(id("bob"), LOCAL_PORT);
    cfg.host_candidates = vec![addr("10.1.0.3:5004"), addr("[fd00::3]:5004"), addr("10.1.0.3:5004")];
    let mut t = T::new(cfg);
    t.c.handle_connected(t.at(0), None);
    let out = t.drain();
    let want = vec![host("10.1.0.3:5004"), host("[fd00::3]:5004")];
    assert!(matches!(&out.frames[..], [Frame::Register { candidates, .. }] if *candidates == want), "{out:?}");
}

#[test]
fn a_callee_punches_every_caller_address_and_follows_the_one_that_answers() {
    let mut t = T::registered();
    let lan = addr("10.1.0.2:40000");
    let f = Frame::Incoming {
        call_id: CALL_ID,
        token: TOKEN,
        caller: id("alice"),
        caller_addr: caller_addr(),
        caller_nat: proto::nat::NatClass::Unknown,
        caller_candidates: vec![host("10.1.0.2:40000"), host("203.0.113.7:40000")],
        caller_keys: None,
    };
    let out = t.frame(0, f);
    let h = match out.events[..] {
        [Event::Incoming { handle, .. }] => handle,
        _ => panic!("{out:?}"),
    };
    // One null to the public address and one to the host address (the duplicate of the
    // public one is not sent twice), both before PUNCHED.
    let to: Vec<SocketAddr> = out.dgrams.iter().map(|(to, _)| *to).collect();
    assert_eq!(to, vec![caller_addr(), lan]);
    assert!(matches!(out.frames[..], [Frame::Punched { .. }]));
    // The caller's null arrives from its host address: that is the path.
    assert!(t.dgram(5, lan, &null(CALL_ID, TOKEN, false, true)).is_none());
    let out = t.drain();
    assert!(matches!(out.events[..], [Event::MediaFlowing { handle }] if handle == h), "{out:?}");
    assert_eq!(out.dgrams.iter().map(|(to, _)| *to).collect::<Vec<_>>(), vec![lan], "confirmed on that path only");
    assert_eq!(t.c.peer_addr(h), Some(lan));
    // Media from the public address now is someone else's: the path does not move.
    assert!(t.dgram(6, caller_addr(), &rtp(CALLER_SSRC, 1, 0, b"x")).is_none());
    assert!(t.dgram(7, lan, &rtp(CALLER_SSRC, 2, 960, b"x")).is_some());
    assert_eq!(t.c.counters().dgram_wrong_source, 1);
    t.c.hangup(t.at(100), h).unwrap();
    let r = reports(&t.drain().events);
    assert_eq!((r[0].path, r[0].candidates_tried), (PathKind::Host, 2));
}

#[test]
fn a_callees_punch_that_beats_start_sets_the_callers_path_at_once() {
    let mut t = T::registered();
    let h = t.c.call(t.at(0), id("carol")).unwrap();
    t.drain();
    // Behind one NAT: the callee's punch to this side's host address arrives before START.
    let lan = addr("10.1.0.3:5004");
    assert!(t.dgram(3, lan, &null(CALL_ID, TOKEN, false, false)).is_none());
    // One from a stranger with the same call and token is kept too but never matches: it is
    // neither the callee's public IP nor one of its host addresses.
    assert!(t.dgram(3, addr("192.0.2.99:1"), &null(CALL_ID, TOKEN, false, false)).is_none());
    assert_eq!(t.c.counters().dgram_unmatched, 2);
    let out = t.frame(5, start_with(h, proto::nat::NatClass::Unknown, &["10.1.0.3:5004"]));
    assert!(matches!(out.events[..], [Event::Started { peer, .. }] if peer == lan), "{out:?}");
    assert_eq!(t.c.counters().early_nulls, 1);
    assert_eq!(out.dgrams.iter().map(|(to, _)| *to).collect::<Vec<_>>(), vec![lan]);
    let (to, _, _) = t.send(6, h, b"x", 960).unwrap();
    assert_eq!(to, lan);
    assert!(t.dgram(8, lan, &null(CALL_ID, TOKEN, false, false)).is_none());
    t.c.hangup(t.at(100), h).unwrap();
    let r = reports(&t.drain().events);
    assert_eq!((r[0].path, r[0].candidates_tried), (PathKind::Host, 1), "{:?}", r[0]);
}

#[test]
fn without_an_early_punch_the_caller_tries_the_host_address_first_then_latches_what_answers() {
    let mut t = T::registered();
    let h = t.c.call(t.at(0), id("carol")).unwrap();
    t.drain();
    let lan = addr("10.1.0.3:5004");
    let out = t.frame(5, start_with(h, proto::nat::NatClass::Unknown, &["10.1.0.3:5004"]));
    assert!(matches!(out.events[..], [Event::Started { peer, .. }] if peer == lan), "{out:?}");
    assert_eq!(out.dgrams.iter().map(|(to, _)| *to).collect::<Vec<_>>(), vec![lan, callee_addr()]);
    // The callee's NAT answered from another port of its public IP (a peer-reflexive
    // address): that is the path, and media follows it.
    let prflx = SocketAddr::new(callee_addr().ip(), 61000);
    // Not from an unrelated IP, though.
    assert!(t.dgram(7, addr("192.0.2.99:1"), &null(CALL_ID, TOKEN, false, false)).is_none());
    assert_eq!(t.c.counters().dgram_wrong_source, 1);
    assert!(t.dgram(8, prflx, &null(CALL_ID, TOKEN, false, false)).is_none());
    assert_eq!(t.c.counters().latched_elsewhere, 1);
    let (to, _, _) = t.send(9, h, b"x", 960).unwrap();
    assert_eq!(to, prflx);
    t.c.hangup(t.at(100), h).unwrap();
    let r = reports(&t.drain().events);
    assert_eq!((r[0].path, r[0].candidates_tried), (PathKind::PeerReflexive, 2), "{:?}", r[0]);
}

#[test]
fn a_caller_tries_ipv6_first_and_ipv4_fifty_ms_later_only_if_ipv6_stayed_silent() {
    let start = |h: CallHandle| start_with(h, proto::nat::NatClass::Random, &["[2001:db8:2::2]:5004"]);
    let v6 = addr("[2001:db8:2::2]:5004");
    // IPv6 answers within 50 ms: IPv4 is never punched.
    let mut t = T::registered();
    let h = t.c.call(t.at(0), id("carol")).unwrap();
    t.drain();
    let out = t.frame(5, start(h));
    assert!(matches!(out.events[..], [Event::Started { peer, .. }] if peer == v6), "{out:?}");
    assert_eq!(out.dgrams.iter().map(|(to, _)| *to).collect::<Vec<_>>(), vec![v6]);
    assert!(t.dgram(10, v6, &null(CALL_ID, TOKEN, false, false)).is_none());
    let log = t.run_until(200);
    assert!(log.dgrams.iter().all(|(_, to, _)| *to == v6), "{:?}", log.dgrams);
    t.c.hangup(t.at(300), h).unwrap();
    let r = reports(&t.drain().events);
    assert_eq!((r[0].path, r[0].candidates_tried), (PathKind::Ipv6, 1), "{:?}", r[0]);
    // IPv6 silent: at 50 ms the IPv4 address is punched too, and an answer there wins.
    let mut t = T::registered();
    let h = t.c.call(t.at(0), id("carol")).unwrap();
    t.drain();
    t.frame(5, start(h));
    let log = t.run_until(54);
    assert!(log.dgrams.is_empty(), "{:?}", log.dgrams);
    let log = t.run_until(55);
    assert_eq!(log.dgrams.iter().map(|(at, to, _)| (*at, *to)).collect::<Vec<_>>(), vec![(55, callee_addr())]);
    assert!(t.dgram(60, callee_addr(), &null(CALL_ID, TOKEN, false, false)).is_none());
    let (to, _, _) = t.send(61, h, b"x", 960).unwrap();
    assert_eq!(to, callee_addr());
    t.c.hangup(t.at(300), h).unwrap();
    let r = reports(&t.drain().events);
    assert_eq!((r[0].path, r[0].candidates_tried), (PathKind::Public, 2), "{:?}", r[0]);
}

// ------------------------------------------------------------------------------ 12. end-to-end keys

/// SRTP is the admission check for media: a packet with the peer's address and SSRC whose
/// tag does not verify, or one already received, is refused and counted, and never reaches
/// the application or the call's statistics.
#[test]
fn forged_and_replayed_media_is_refused_and_counted() {
    let (mut t, h) = T::established_callee();
    let mut p = t.sealed(CALLER_SSRC, 2, 960, b"voice");
    let replay = p.clone();
    assert!(t.raw_dgram(20, caller_addr(), &mut p).is_some_and(|(_, _, pl)| pl == b"voice"));
    // The same packet again (an on-path attacker's replay): refused.
    assert!(t.raw_dgram(21, caller_addr(), &mut replay.clone()).is_none());
    assert_eq!(t.c.counters().media_replayed, 1);
    // Tampered: one bit of the ciphertext, of the header (authenticated data), of the tag.
    for at in [14, 3, replay.len() - 1] {
        let mut f = t.sealed(CALLER_SSRC, 3 + at as u16, 960, b"voice");
        f[at] ^= 0x01;
        assert!(t.raw_dgram(22, caller_addr(), &mut f).is_none(), "bit flipped at {at}");
    }
    // Forged from scratch: plain RTP with the right address and SSRC.
    assert!(t.raw_dgram(23, caller_addr(), &mut rtp(CALLER_SSRC, 50, 960, b"voice")).is_none());
    assert_eq!(t.c.counters().media_unauthenticated, 4);
    assert!(t.drain().is_empty());
    t.c.hangup(t.at(100), h).unwrap();
    let r = reports(&t.drain().events).remove(0);
    assert_eq!((r.received, r.media_refused), (2, 5), "{r:?}");
    assert_eq!(proto::e2e::suite_name(r.suite), "AEAD_AES_128_GCM");
}

/// A null packet teaches an address only with a valid MAC under the call's key and a fresh
/// counter: a forged one (the token alone is not enough: the manager knows it) or a replayed
/// one from another port of the caller's IP does not move the path; the real one does.
#[test]
fn a_null_without_a_valid_mac_or_with_an_old_counter_teaches_nothing() {
    let (mut t, h) = T::with_incoming();
    t.drain();
    let elsewhere = addr("203.0.113.7:41000");
    // The token and call id right, the MAC made with another key (what a manager could
    // forge): refused, the path stays.
    assert!(t.raw_dgram(5, elsewhere, &mut null(CALL_ID, TOKEN, false, true)).is_none());
    assert_eq!(t.c.counters().nulls_unauthenticated, 1);
    assert_eq!(t.c.peer_addr(h), Some(caller_addr()));
    assert!(t.drain().events.is_empty());
    // The caller's real null from that port (its NAT's port towards us) sets the path...
    let real = t.signed_null(false, true);
    assert!(t.raw_dgram(6, elsewhere, &mut real.clone()).is_none());
    assert_eq!(t.c.peer_addr(h), Some(elsewhere));
    assert!(matches!(t.drain().events[..], [Event::MediaFlowing { .. }]));
    // ... and the same bytes again, from the old address, are a replay: refused.
    assert!(t.raw_dgram(7, caller_addr(), &mut real.clone()).is_none());
    assert!(t.raw_dgram(8, elsewhere, &mut real.clone()).is_none());
    assert_eq!(t.c.counters().nulls_replayed, 2);
    assert_eq!(t.c.peer_addr(h), Some(elsewhere));
    // A newer one is fine (keepalives keep counting).
    let next = t.signed_null(true, true);
    assert!(t.raw_dgram(9, elsewhere, &mut next.clone()).is_none());
    t.c.hangup(t.at(100), h).unwrap();
    let r = reports(&t.drain().events).remove(0);
    assert_eq!((r.nulls_received, r.nulls_refused), (2, 3), "{r:?}");
}

/// The callee declines a call whose keys it cannot agree: no common suite, or a caller
/// identity other than the pinned one (a manager swapping the key shares). Nothing is sent
/// to the caller's address, and the reason reaches both sides.
#[test]
fn a_callee_declines_a_call_whose_keys_it_cannot_agree() {
    use proto::e2e::{E2eError, IdentityKey};
    // No common suite: this callee runs --no-srtp, the caller offers SRTP only.
    let mut cfg = ClientConfig::new(id("bob"), LOCAL_PORT);
    cfg.srtp_suites = vec![e2e::SUITE_NONE];
    let mut t = T::new(cfg);
    t.c.handle_connected(t.at(0), None);
    t.drain();
    t.frame(0, Frame::Registered { public: public(), source: AddrSource::TcpPeer });
    let out = t.frame(1, incoming_frame());
    assert!(out.dgrams.is_empty(), "no punch for a declined call: {out:?}");
    assert!(
        matches!(out.frames[..], [Frame::Reject { call_id: CALL_ID, reason: RejectReason::NoCommonSuite, .. }]),
        "{out:?}"
    );
    let r = reports(&out.events).remove(0);
    assert_eq!(r.reason, EndReason::KeyExchange(E2eError::NoCommonSuite));
    // Pinned caller identity, and an INCOMING whose key share nobody signed (or someone
    // else did): declined.
    let pinned = IdentityKey::from_seed(&[9; 32]);
    let mut cfg = ClientConfig::new(id("bob"), LOCAL_PORT);
    cfg.peer_key = Some(pinned.public());
    let mut t = T::new(cfg);
    t.c.handle_connected(t.at(0), None);
    t.drain();
    t.frame(0, Frame::Registered { public: public(), source: AddrSource::TcpPeer });
    let out = t.frame(1, incoming_frame());
    assert!(out.dgrams.is_empty(), "{out:?}");
    assert!(matches!(out.frames[..], [Frame::Reject { reason: RejectReason::KeyRefused, .. }]), "{out:?}");
    assert_eq!(reports(&out.events)[0].reason, EndReason::KeyExchange(E2eError::WrongIdentity));
    assert_eq!(t.c.counters().key_exchange_failed, 1);
}

/// The caller ends a call whose answer it cannot accept (missing, or a suite it did not
/// offer: a downgrade), with HANGUP, and never sends media.
#[test]
fn a_caller_hangs_up_on_an_answer_it_cannot_accept() {
    use proto::e2e::E2eError;
    for (name, answer) in [
        ("missing", None),
        ("downgraded", Some(Box::new(HandPeer::offer(&[8; 32], &[e2e::SUITE_NONE]).share().clone()))),
    ] {
        let mut t = T::registered();
        t.auto_keys = false;
        let h = t.c.call(t.at(0), id("carol")).unwrap();
        t.drain();
        let mut f = start_with(h, proto::nat::NatClass::Unknown, &[]);
        if let Frame::Start { callee_keys, .. } = &mut f {
            *callee_keys = answer;
        }
        let out = t.frame(5, f);
        assert!(out.dgrams.is_empty(), "{name}: {out:?}");
        assert!(
            matches!(out.frames[..], [Frame::Hangup { call_id: CALL_ID, reason: HangupReason::Error }]),
            "{name}: {out:?}"
        );
        let r = reports(&out.events).remove(0);
        let want = if name == "missing" { E2eError::Missing } else { E2eError::NoCommonSuite };
        assert_eq!(r.reason, EndReason::KeyExchange(want), "{name}");
        assert_eq!(t.c.send_media(t.at(6), h, b"x", 960, &mut [0u8; 1500]), Err(ClientError::NoSuchCall(h)));
    }
}
