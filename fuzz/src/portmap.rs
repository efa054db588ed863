//! Target `portmap`: answers from a router's PCP / NAT-PMP port (`proto/src/wire/portmap.rs`),
//! through the port mapping state machine (`proto/src/portmap.rs`) and a client that asks
//! for a mapping at start-up (`Client` with `port_mapping`).
//!
//! Input layout: datagrams separated by [`crate::datagram::SEP`], each delivered at
//! `t0 + 50 ms * (index + 1)` (due timers run first) to:
//! * `asking`: a mapper that has just sent its first PCP request (nonce [`NONCE`]);
//! * `mapped`: a mapper that holds a PCP mapping (and so takes renewals' answers);
//! * `client`: a client connected to a manager, waiting for its mapping before REGISTER; the
//!   datagram arrives from the router's address.
//!
//! Properties: `parse` never panics, and a success it returns names the UDP protocol's
//! ports as they are in the bytes; a mapping a mapper holds is the one an answer gave; every
//! request a mapper queues is a well-formed PCP MAP or NAT-PMP request (60, 2 or 12 bytes);
//! after `on_timeout(now)`, `next_timeout()` is later than `now`; the client's frames
//! round-trip, its REGISTER names a mapping only as a `mapped` candidate whose address is the
//! mapping it holds, and it is sent once. Then the timers run for two hours of virtual time
//! (renewals, expiry), bounded in steps.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use proto::client::{Client, ClientConfig, Output};
use proto::portmap::PortMapper;
use proto::wire::frame::{CandidateKind, ClientId, Frame};
use proto::wire::portmap::{self, PortMapReply};

use crate::assert_frame_round_trips;
use crate::datagram::split;

/// The router's PCP / NAT-PMP address (a documentation range: nothing is sent).
pub fn router() -> SocketAddr {
    "192.0.2.1:5351".parse().expect("fixed address")
}
/// The client's own address towards the router.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The internal port mapped.
pub const PORT: u16 = 40001;
/// The nonce of both mappers.
pub const NONCE: [u8; 12] = [0x4E; 12];
/// Virtual time between two datagrams.
pub const STEP: Duration = Duration::from_millis(50);
const MAX_TIMER_STEPS: usize = 10_000;

/// A PCP MAP success for the mappers' request, as a router would answer.
pub fn pcp_success(external: SocketAddr, lifetime: u32) -> Vec<u8> {
    let mut b = [0u8; portmap::PCP_MAP_LEN];
    portmap::emit_pcp_map(&mut b, CLIENT_IP, &NONCE, PORT, PORT, lifetime);
    b[1] = 0x81;
    b[42..44].copy_from_slice(&external.port().to_be_bytes());
    if let std::net::IpAddr::V4(ip) = external.ip() {
        b[44..60].copy_from_slice(&ip.to_ipv6_mapped().octets());
    }
    b.to_vec()
}

fn check_requests(m: &mut PortMapper) {
    for (b, n) in m.take_sends() {
        let ok = match (n, b[0], b[1]) {
            (portmap::PCP_MAP_LEN, 2, 1) => b[36] == portmap::UDP && b[40..42] == PORT.to_be_bytes(),
            (2, 0, 0) => true,
            (portmap::NATPMP_MAP_LEN, 0, 1) => b[4..6] == PORT.to_be_bytes(),
            _ => false,
        };
        assert!(ok, "the mapper queued a malformed request: {:02x?}", &b[..n]);
    }
}

fn run_timers(m: &mut PortMapper, now: Instant) {
    let mut steps = 0;
    while let Some(t) = m.next_timeout().filter(|t| *t <= now) {
        m.on_timeout(t);
        check_requests(m);
        if let Some(next) = m.next_timeout() {
            assert!(next > t, "mapper timer livelock at {t:?}");
        }
        steps += 1;
        assert!(steps < MAX_TIMER_STEPS, "mapper timers never settle");
    }
}

struct ClientSide {
    c: Client,
    registers: usize,
}

impl ClientSide {
    fn drain(&mut self) {
        let mut buf = [0u8; 1500];
        loop {
            match self.c.poll_output(&mut buf).expect("1500 bytes hold any control datagram") {
                Output::Frame(f) => {
                    assert_frame_round_trips(&f);
                    if let Frame::Register { candidates, .. } = &f {
                        self.registers += 1;
                        assert_eq!(self.registers, 1, "REGISTER sent twice on one connection");
                        let mapped: Vec<_> = candidates.iter().filter(|k| k.kind == CandidateKind::Mapped).collect();
                        let held = self.c.port_mapping().map(|(_, e)| e);
                        match mapped[..] {
                            [] => {}
                            [m] => assert_eq!(Some(m.addr), held, "REGISTER names a mapping the client does not hold"),
                            _ => panic!("REGISTER names {} mappings", mapped.len()),
                        }
                    }
                }
                Output::Transmit(t) => assert!(t.len <= portmap::PCP_MAP_LEN, "oversized control datagram"),
                Output::Event(_) => {}
                Output::OpenSocket(s) | Output::CloseSocket(s) => panic!("no search here, yet {s:?}"),
                Output::Timeout(_) => break,
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        let mut steps = 0;
        while let Some(t) = self.c.poll_timeout().filter(|t| *t <= now) {
            self.c.handle_timeout(t);
            self.drain();
            if let Some(next) = self.c.poll_timeout() {
                assert!(next > t, "client timer livelock at {t:?}");
            }
            steps += 1;
            assert!(steps < MAX_TIMER_STEPS, "client timers never settle");
        }
    }
}

/// Run one input.
pub fn run(data: &[u8]) {
    let t0 = Instant::now();
    let mut asking = PortMapper::new(router(), CLIENT_IP, PORT, 3600, NONCE);
    asking.start(t0);
    check_requests(&mut asking);
    let mut mapped = PortMapper::new(router(), CLIENT_IP, PORT, 3600, NONCE);
    mapped.start(t0);
    check_requests(&mut mapped);
    mapped.on_datagram(t0, &pcp_success("198.51.100.7:51000".parse().expect("fixed"), 600));
    assert!(mapped.mapping().is_some(), "the seed answer did not map");
    let mut cfg = ClientConfig::new(ClientId::new("fuzz-map").expect("fixed id"), PORT);
    cfg.port_mapping = Some((router(), CLIENT_IP));
    let mut client = ClientSide { c: Client::new(cfg, 21), registers: 0 };
    client.c.handle_connected(t0, None);
    client.drain();

    let mut now = t0;
    for d in split(data) {
        now += STEP;
        run_timers(&mut asking, now);
        run_timers(&mut mapped, now);
        client.timers(now);
        match portmap::parse(d) {
            Ok(PortMapReply::PcpMapped { internal, external, .. }) if d.len() >= portmap::PCP_MAP_LEN => {
                assert_eq!(internal.to_be_bytes(), d[40..42], "internal port");
                assert_eq!(external.port().to_be_bytes(), d[42..44], "external port");
            }
            Ok(PortMapReply::NatPmpMapped { internal, external, .. }) => {
                assert_eq!((internal.to_be_bytes(), external.to_be_bytes()), ([d[8], d[9]], [d[10], d[11]]));
            }
            _ => {}
        }
        for m in [&mut asking, &mut mapped] {
            let before = m.mapping();
            m.on_datagram(now, d);
            check_requests(m);
            if let (Some((_, e)), true) = (m.mapping(), before != m.mapping()) {
                // A new mapping comes from this answer: its port is in it.
                let p = e.port().to_be_bytes();
                assert!(d.windows(2).any(|w| w == p), "mapping {e} not in the answer {d:02x?}");
            }
        }
        client.c.handle_datagram(now, router(), &mut d.to_vec());
        client.drain();
    }
    // Two hours on: renewals go unanswered, mappings expire, nothing spins.
    let end = now + Duration::from_secs(7200);
    run_timers(&mut asking, end);
    run_timers(&mut mapped, end);
    client.timers(end);
    asking.release();
    mapped.release();
    check_requests(&mut asking);
    check_requests(&mut mapped);
    client.c.release_port_mapping();
    client.drain();
}
