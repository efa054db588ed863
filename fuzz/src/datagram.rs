//! Target `datagram`: UDP datagrams, from the demultiplexer and parsers
//! (`engine/src/wire/{demux,null,rtp,stun}.rs`) up to a client in a call
//! (`engine/src/client.rs`, `Client::handle_datagram`).
//!
//! Input layout: one or more datagrams separated by [`SEP`] (a single datagram needs no
//! separator, so a raw packet is a valid input). Every datagram goes through:
//! 1. the parsers, with these properties: `classify` agrees with every parser that accepts
//!    the datagram; a null packet re-emits to exactly its 20 bytes; an RTP header re-emits
//!    to a fixed header that parses to the same fields, and the payload lies inside the
//!    datagram after the header and CSRCs; a STUN message re-emits to bytes that parse to
//!    the same message (the manager's responder answers a Binding Request with such bytes).
//! 2. two clients, at `t0 + 20 ms * (index + 1)` (due timers run first):
//!    * `calls`: registered, with two calls up: as callee of [`CALLEE_CALL_ID`] (INCOMING
//!      from [`caller_addr`], waiting for the caller's first packet) and as caller of
//!      [`CALLER_CALL_ID`] (START received, peer [`callee_addr`]). Each datagram arrives from
//!      the caller's address, the callee's address, the STUN server and a stranger, in turn.
//!      A third call, as callee of [`SEARCH_CALL_ID`] from a caller behind a random-port NAT,
//!      is a birthday search in progress (this side probes); each datagram also arrives from
//!      [`searcher_addr`] and from another port of its IP (a search may lock onto any).
//!    * `discovering`: connected to a manager with a STUN server configured, waiting for a
//!      Binding Success Response to its transaction id; each datagram arrives from the STUN
//!      server and from a stranger.
//!
//! Client properties: a returned media packet is RTP that parses to the same header and
//! payload; every queued datagram is a valid null packet or STUN Binding Request; every
//! queued frame round-trips; after `handle_timeout(now)`, `poll_timeout()` is later than
//! `now` (no timer livelock). After the last datagram the timers run for two more minutes
//! of virtual time (first-media, keepalive and media timeouts, hangups).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::client::{Client, ClientConfig, Event, Output};
use proto::e2e::{HandPeer, SUITE_AES_128_GCM};
use proto::wire::frame::{AddrSource, CallId, ClientId, Frame};
use proto::wire::null::{NullPacket, NULL_LEN};
use proto::wire::rtp::{RtpHeader, HEADER_LEN as RTP_HEADER_LEN};
use proto::wire::stun::{self, StunMessage, MAX_RESPONSE_LEN};
use proto::wire::{classify, DatagramKind};

use crate::assert_frame_round_trips;

/// Separates datagrams in one input. 0xFF is no known datagram kind's first byte.
pub const SEP: &[u8] = b"\xffDG\xff";
/// Virtual time between two datagrams.
pub const STEP: Duration = Duration::from_millis(20);
/// Call id of the call in which the `calls` client is the callee.
pub const CALLEE_CALL_ID: CallId = CallId(0x0001_0000_0000_0007);
/// Its token (caller SSRC = low half, callee SSRC = high half).
pub const CALLEE_TOKEN: u64 = 0x1122_3344_5566_7788;
/// Call id of the call the `calls` client placed.
pub const CALLER_CALL_ID: CallId = CallId(0x0000_0000_0000_0009);
/// Its token.
pub const CALLER_TOKEN: u64 = 0xA1A2_A3A4_B1B2_B3B4;
/// Call id of the call whose birthday search the `calls` client runs (easy side).
pub const SEARCH_CALL_ID: CallId = CallId(0x0001_0000_0000_000B);
/// Its token.
pub const SEARCH_TOKEN: u64 = 0x5152_5354_6162_6364;
/// Seed of the `calls` client.
pub const CALLS_SEED: u64 = 11;
/// Seed of the `discovering` client (fixes its STUN transaction id).
pub const DISCOVERING_SEED: u64 = 12;

/// Bound on timer steps in one run (the final two minutes need a few hundred).
const MAX_TIMER_STEPS: usize = 10_000;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("fixed address")
}

/// The remote caller (peer of the callee call). Documentation ranges only: nothing is sent.
pub fn caller_addr() -> SocketAddr {
    addr("203.0.113.7:40000")
}
/// The caller behind a random-port NAT (peer of the search call), as the manager saw it.
pub fn searcher_addr() -> SocketAddr {
    addr("203.0.113.8:40000")
}
/// The remote callee (peer of the caller call).
pub fn callee_addr() -> SocketAddr {
    addr("[2001:db8::20]:5004")
}
/// The manager's STUN address.
pub fn stun_server() -> SocketAddr {
    addr("198.51.100.1:3478")
}
/// Someone else.
pub fn stranger() -> SocketAddr {
    addr("192.0.2.99:9999")
}

fn id(s: &str) -> ClientId {
    ClientId::new(s).expect("fixed id")
}

/// The two clients and the virtual clock.
pub struct Harness {
    /// Base of virtual time.
    pub t0: Instant,
    /// Registered, two calls up.
    pub calls: Client,
    /// Waiting for its STUN answer.
    pub discovering: Client,
    /// OTHER-ADDRESS values of the STUN answers delivered so far.
    pub stun_others: Vec<SocketAddr>,
    /// Datagrams the clients queued, with their destination (for seed generation).
    pub sent: Vec<(SocketAddr, Vec<u8>)>,
    /// Events seen: calls whose path became two-way, calls ended, STUN discoveries.
    pub media_flowing: usize,
    /// See `media_flowing`.
    pub ended: usize,
    /// See `media_flowing`.
    pub discovered: usize,
    /// The remote party of each of the three calls (call id, token, peer): each datagram is
    /// also delivered as that peer would send it (a null packet signed with the call's key,
    /// RTP protected with its SRTP key), so the input reaches what lies past the MAC and the
    /// SRTP tag.
    pub peers: Vec<(CallId, u64, HandPeer)>,
}

impl Harness {
    /// Build both clients in their starting states.
    pub fn new() -> Harness {
        let t0 = Instant::now();
        let mut h = Harness {
            t0,
            calls: Client::new(
                // A slow probe rate keeps the search's timer steps few over the final minutes.
                ClientConfig { max_calls: 4, birthday_rate: 10, ..ClientConfig::new(id("fuzz-calls"), 5004) },
                CALLS_SEED,
            ),
            discovering: Client::new(
                ClientConfig { stun_server: Some(stun_server()), ..ClientConfig::new(id("fuzz-stun"), 5005) },
                DISCOVERING_SEED,
            ),
            sent: Vec::new(),
            stun_others: Vec::new(),
            media_flowing: 0,
            ended: 0,
            discovered: 0,
            peers: Vec::new(),
        };
        let alice = HandPeer::offer(&[1; 32], &[SUITE_AES_128_GCM]);
        let carol = HandPeer::offer(&[3; 32], &[SUITE_AES_128_GCM]);
        let c = &mut h.calls;
        c.handle_connected(t0, None);
        c.handle_frame(t0, Frame::Registered { public: addr("192.0.2.10:40010"), source: AddrSource::Stun });
        assert!(c.is_registered(), "REGISTERED did not register the client");
        c.handle_frame(
            t0,
            Frame::Incoming {
                call_id: CALLEE_CALL_ID,
                token: CALLEE_TOKEN,
                caller: id("alice"),
                caller_addr: caller_addr(),
                caller_nat: proto::nat::NatClass::Unknown,
                caller_candidates: Vec::new(),
                caller_keys: Some(Box::new(alice.share().clone())),
            },
        );
        let handle = c.call(t0, id("bob")).expect("registered client can call");
        // The CALL (with this client's offer) and the callee's PUNCHED answer.
        let (mut offer, mut answer) = (None, None);
        let mut buf = [0u8; 1500];
        while let Ok(o) = c.poll_output(&mut buf) {
            match o {
                Output::Frame(Frame::Call { keys, .. }) => offer = keys,
                Output::Frame(Frame::Punched { keys, .. }) => answer = keys,
                Output::Timeout(_) => break,
                _ => {}
            }
        }
        let mut alice = alice;
        alice.complete(&answer.expect("PUNCHED carries the answer"), CALLEE_CALL_ID, CALLEE_TOKEN).expect("keys");
        let bob = HandPeer::answer(
            &[2; 32],
            &offer.expect("CALL carries the offer"),
            &[SUITE_AES_128_GCM],
            CALLER_CALL_ID,
            CALLER_TOKEN,
        )
        .expect("bob answers");
        c.handle_frame(
            t0,
            Frame::Start {
                call_ref: handle.0,
                call_id: CALLER_CALL_ID,
                token: CALLER_TOKEN,
                callee_addr: callee_addr(),
                callee_nat: proto::nat::NatClass::Unknown,
                callee_candidates: Vec::new(),
                callee_keys: Some(Box::new(bob.share().clone())),
            },
        );
        c.handle_frame(
            t0,
            Frame::Incoming {
                call_id: SEARCH_CALL_ID,
                token: SEARCH_TOKEN,
                caller: id("carol"),
                caller_addr: searcher_addr(),
                caller_nat: proto::nat::NatClass::Random,
                caller_candidates: Vec::new(),
                caller_keys: Some(Box::new(carol.share().clone())),
            },
        );
        let mut carol = carol;
        while let Ok(o) = c.poll_output(&mut buf) {
            match o {
                Output::Frame(Frame::Punched { call_id, keys: Some(k), .. }) if call_id == SEARCH_CALL_ID => {
                    carol.complete(&k, SEARCH_CALL_ID, SEARCH_TOKEN).expect("keys")
                }
                Output::Timeout(_) => break,
                _ => {}
            }
        }
        h.peers = vec![
            (CALLEE_CALL_ID, CALLEE_TOKEN, alice),
            (CALLER_CALL_ID, CALLER_TOKEN, bob),
            (SEARCH_CALL_ID, SEARCH_TOKEN, carol),
        ];
        assert_eq!(c.active_calls(), 3, "the three calls should be up");
        h.discovering.handle_connected(t0, None);
        h.drain();
        h
    }

    /// Drain every client's outputs, checking each.
    pub fn drain(&mut self) {
        let mut buf = [0u8; 1500];
        for c in [&mut self.calls, &mut self.discovering] {
            loop {
                match c.poll_output(&mut buf).expect("1500 bytes hold any control datagram") {
                    Output::Frame(f) => {
                        assert_frame_round_trips(&f);
                    }
                    Output::Transmit(t) => {
                        let d = &buf[..t.len];
                        match classify(d) {
                            DatagramKind::Null => {
                                assert_eq!(d.len(), NULL_LEN, "client sent a bare null packet");
                                NullPacket::parse(d).expect("client sent a malformed null packet");
                            }
                            DatagramKind::Stun => {
                                let m = stun::parse(d).expect("client sent malformed STUN");
                                assert!(matches!(m, StunMessage::BindingRequest { .. }), "client sent {m:?}");
                                // The server, or the further address its answer named
                                // (OTHER-ADDRESS: NAT classification), which the input chose.
                                assert!(
                                    t.to == stun_server() || self.stun_others.contains(&t.to),
                                    "STUN request to {} which no answer named",
                                    t.to
                                );
                            }
                            k => panic!("client queued a {k:?} datagram: {d:02x?}"),
                        }
                        self.sent.push((t.to, d.to_vec()));
                    }
                    Output::OpenSocket(s) | Output::CloseSocket(s) => {
                        panic!("a datagram made a direct call open or close socket {s:?}")
                    }
                    Output::Event(e) => match e {
                        Event::Ended(r) => {
                            assert!(r.jitter_ms.is_finite() && r.jitter_ms >= 0.0, "jitter {}", r.jitter_ms);
                            self.ended += 1;
                        }
                        Event::MediaFlowing { .. } => self.media_flowing += 1,
                        Event::Discovered { mapped: Some(_), .. } => self.discovered += 1,
                        _ => {}
                    },
                    Output::Timeout(_) => break,
                }
            }
        }
    }

    /// Run every timer due at or before `now`.
    pub fn run_timers(&mut self, now: Instant) {
        for c in [&mut self.calls, &mut self.discovering] {
            let mut steps = 0;
            while let Some(t) = c.poll_timeout() {
                if t > now {
                    break;
                }
                c.handle_timeout(t);
                let next = c.poll_timeout();
                assert!(next.is_none_or(|n| n > t), "timer livelock: due at {t:?} again after handle_timeout");
                steps += 1;
                assert!(steps < MAX_TIMER_STEPS, "more than {MAX_TIMER_STEPS} timer steps");
            }
        }
        self.drain();
    }

    /// Deliver one datagram at `now` from each source.
    pub fn deliver(&mut self, now: Instant, d: &[u8]) {
        if let Ok(StunMessage::BindingSuccess { other: Some(o), .. }) = stun::parse(d) {
            self.stun_others.push(o);
        }
        // Another port of the searcher's IP, chosen by the datagram itself.
        let other_port = 1024 + (d.iter().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(*b))) % 64_512);
        let searcher_other = SocketAddr::new(searcher_addr().ip(), other_port as u16);
        // As it came, and as the peer whose call it names would send it.
        let mut forms = vec![d.to_vec()];
        match classify(d) {
            DatagramKind::Null if d.len() == NULL_LEN => {
                if let Ok(n) = NullPacket::parse(d) {
                    if let Some((_, _, p)) = self.peers.iter_mut().find(|(id, _, _)| *id == n.call_id) {
                        let mut signed = d.to_vec();
                        p.sign_null(&mut signed);
                        forms.push(signed);
                    }
                }
            }
            DatagramKind::Rtp => {
                if let Ok((h, _)) = RtpHeader::parse(d) {
                    if let Some((_, _, p)) = self.peers.iter_mut().find(|(_, tok, p)| p.ssrc(*tok) == h.ssrc) {
                        let mut sealed = d.to_vec();
                        p.protect(&mut sealed);
                        forms.push(sealed);
                    }
                }
            }
            _ => {}
        }
        let sealed = forms.len() > 1 && classify(d) == DatagramKind::Rtp;
        for (i, form) in forms.iter().enumerate() {
            for from in [caller_addr(), callee_addr(), stun_server(), stranger(), searcher_addr(), searcher_other] {
                let mut b = form.clone();
                if let Some(r) = self.calls.handle_datagram(now, from, &mut b) {
                    // Every call runs SRTP: only the peer's protected form can be media, and
                    // it comes back as the plain packet the peer protected (header, payload,
                    // padding removed as in the plain packet).
                    assert!(sealed && i == 1, "media returned for a packet the peer did not protect");
                    let (h, payload) = RtpHeader::parse(d).expect("the peer protected parsable RTP");
                    assert_eq!(r.header, h, "returned header differs from the one protected");
                    assert_eq!(r.payload, payload, "returned payload differs from the one protected");
                }
            }
        }
        for from in [stun_server(), stranger()] {
            let mut b = d.to_vec();
            let r = self.discovering.handle_datagram(now, from, &mut b);
            assert!(r.is_none(), "a client with no calls returned media");
        }
        self.drain();
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

/// Split an input into datagrams at [`SEP`].
pub fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEP.len()).position(|w| w == SEP) {
        out.push(&rest[..i]);
        rest = &rest[i + SEP.len()..];
    }
    out.push(rest);
    out
}

/// Join datagrams into one input (for seeds).
pub fn join(datagrams: &[&[u8]]) -> Vec<u8> {
    datagrams.join(SEP)
}

/// Check the stateless parsers on one datagram.
pub fn check_parsers(d: &[u8]) {
    let kind = classify(d);
    if d.is_empty() {
        assert_eq!(kind, DatagramKind::Null, "empty datagram");
    }

    if let Ok(p) = NullPacket::parse(d) {
        assert_eq!(kind, DatagramKind::Null, "null packet classified as {kind:?}");
        // Its fields re-emit identically (the MAC depends on the call's key, any key here).
        let mut b = [0u8; NULL_LEN];
        let k = proto::wire::null::null_key(&[0; 32]);
        let n = p.emit(&k, &mut b);
        assert_eq!(
            &b[..proto::wire::null::NULL_MAC_START],
            &d[..proto::wire::null::NULL_MAC_START],
            "null packet re-emits differently"
        );
        assert_eq!(n, d.len());
    }

    if let Ok((h, payload)) = RtpHeader::parse(d) {
        assert!(matches!(kind, DatagramKind::Rtp | DatagramKind::Rtcp), "RTP classified as {kind:?}");
        let start = payload.as_ptr() as usize - d.as_ptr() as usize;
        let csrcs = 4 * usize::from(d[0] & 0x0F);
        assert!(start >= RTP_HEADER_LEN + csrcs && start + payload.len() <= d.len(), "RTP payload outside the packet");
        let mut b = [0u8; RTP_HEADER_LEN];
        h.emit(&mut b);
        assert_eq!(&b[1..], &d[1..RTP_HEADER_LEN], "RTP header fields re-emit differently");
        let (g, rest) = RtpHeader::parse(&b).expect("emitted RTP header does not parse");
        assert_eq!(g, h, "emitted RTP header parses differently");
        assert!(rest.is_empty());
    }

    if let Ok(m) = stun::parse(d) {
        assert_eq!(kind, DatagramKind::Stun, "STUN classified as {kind:?}");
        let mut b = [0u8; MAX_RESPONSE_LEN];
        let n = match m {
            StunMessage::BindingRequest { txid } => {
                // What the manager's responder does with a request: answer with the source.
                let n = stun::emit_binding_success(&txid, stranger(), &mut b);
                let answer = stun::parse(&b[..n]).expect("emitted binding success does not parse");
                assert_eq!(answer, StunMessage::BindingSuccess { txid, mapped: stranger(), other: None });
                stun::emit_binding_request(&txid, &mut b)
            }
            StunMessage::BindingSuccess { txid, mapped, other } => {
                stun::emit_binding_success_with(&txid, mapped, other, &mut b)
            }
        };
        assert_eq!(stun::parse(&b[..n]), Ok(m), "STUN message re-emits differently");
    }
}

/// Run the target on one input.
pub fn run(data: &[u8]) {
    run_harness(data);
}

/// Run the target on one input and return the harness at the end (for tests).
pub fn run_harness(data: &[u8]) -> Harness {
    let datagrams = split(data);
    for d in &datagrams {
        check_parsers(d);
    }
    let mut h = Harness::new();
    let mut now = h.t0;
    for d in &datagrams {
        now += STEP;
        h.run_timers(now);
        h.deliver(now, d);
    }
    h.run_timers(now + Duration::from_secs(120));
    h
}
