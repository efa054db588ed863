//! The port mapping client: asks the router for a UDP mapping of the client's port with PCP
//! (RFC 6887) and falls back to NAT-PMP (RFC 6886), renews it at half its lifetime, and
//! deletes it at exit. Sans-IO like the rest of the core: the [`crate::client::Client`] owns
//! one, feeds it the answers from the router's port 5351 and the time, and sends what it
//! queues from the client's own UDP socket (so the mapping is of that socket's port).
//!
//! Timing: each protocol is asked twice, 150 ms apart ([`ASK_INTERVAL`]: a router is one
//! LAN hop away); a router that answers neither costs registration 600 ms ([`ASK_INTERVAL`]
//! x 4), once, at start-up. A
//! renewal that goes unanswered is retried every [`ASK_INTERVAL`] x 8 until the mapping
//! expires ([`MapEvent::Lost`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::wire::portmap::{self, PortMapReply};

/// Wait between two asks of the same request.
pub const ASK_INTERVAL: Duration = Duration::from_millis(150);
/// Asks per protocol before the next protocol (or giving up).
pub const ASKS: u32 = 2;

/// Which protocol made a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapProto {
    /// Port Control Protocol (RFC 6887).
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886).
    NatPmp,
}

impl MapProto {
    /// Its name in output: `pcp` or `nat-pmp`.
    pub fn as_str(self) -> &'static str {
        match self {
            MapProto::Pcp => "pcp",
            MapProto::NatPmp => "nat-pmp",
        }
    }
}

/// What happened to the mapping (reported as [`crate::client::Event::PortMapping`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapEvent {
    /// A mapping was made (or renewed): `external` reaches the client's UDP port.
    Mapped {
        /// The protocol that made it.
        protocol: MapProto,
        /// The public address of the mapping.
        external: SocketAddr,
        /// How long the router keeps it without renewal.
        lifetime: Duration,
        /// True for a renewal of a mapping made before.
        renewed: bool,
    },
    /// No mapping: the router did not answer either protocol, or refused.
    Failed {
        /// Why, for a person.
        reason: String,
    },
    /// The mapping expired: its renewals went unanswered.
    Lost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not started.
    Idle,
    /// Asking `proto` (ask number `asks`), next ask or give-up at `next`.
    Asking { proto: MapProto, asks: u32, next: Instant },
    /// Holding a mapping; renew at `renew`, gone at `expires`.
    Mapped { renew: Instant, expires: Instant },
    /// Renewing: as `Mapped`, with the next re-ask at `next`.
    Renewing { next: Instant, expires: Instant },
    /// Gave up, or released.
    Done,
}

/// The port mapping state machine of one client socket.
#[derive(Debug)]
pub struct PortMapper {
    server: SocketAddr,
    client_ip: Ipv4Addr,
    internal: u16,
    lifetime: u32,
    nonce: [u8; 12],
    phase: Phase,
    proto: Option<MapProto>,
    external: Option<SocketAddr>,
    /// NAT-PMP answers arrive separately: the external IP, and the port with its lifetime.
    natpmp_ip: Option<Ipv4Addr>,
    natpmp_port: Option<(u16, u32)>,
    sends: Vec<([u8; portmap::PCP_MAP_LEN], usize)>,
    /// Answers not understood or not for this mapping.
    pub bad_answers: u64,
}

impl PortMapper {
    /// A mapper for UDP port `internal` of `client_ip`, asking the router at `server` (its
    /// address, port [`portmap::PORT`]) for `lifetime` (seconds, at least 120). `nonce`
    /// identifies the mapping to a PCP server.
    pub fn new(server: SocketAddr, client_ip: Ipv4Addr, internal: u16, lifetime: u32, nonce: [u8; 12]) -> Self {
        PortMapper {
            server,
            client_ip,
            internal,
            lifetime: lifetime.max(120),
            nonce,
            phase: Phase::Idle,
            proto: None,
            external: None,
            natpmp_ip: None,
            natpmp_port: None,
            sends: Vec::new(),
            bad_answers: 0,
        }
    }

    /// The router's address answers come from.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The mapping held now, and the protocol that made it.
    pub fn mapping(&self) -> Option<(MapProto, SocketAddr)> {
        match (self.phase, self.proto, self.external) {
            (Phase::Mapped { .. } | Phase::Renewing { .. }, Some(p), Some(e)) => Some((p, e)),
            _ => None,
        }
    }

    /// True while the first mapping is being asked for (registration waits for it).
    pub fn asking(&self) -> bool {
        matches!(self.phase, Phase::Idle | Phase::Asking { .. })
    }

    /// Start asking (once; later calls do nothing).
    pub fn start(&mut self, now: Instant) {
        if self.phase == Phase::Idle {
            self.phase = Phase::Asking { proto: MapProto::Pcp, asks: 0, next: now };
            self.on_timeout(now);
        }
    }

    /// When [`PortMapper::on_timeout`] wants to run next.
    pub fn next_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Asking { next, .. } => Some(next),
            Phase::Mapped { renew, .. } => Some(renew),
            Phase::Renewing { next, expires } => Some(next.min(expires)),
            Phase::Idle | Phase::Done => None,
        }
    }

    /// The requests to send now (to [`PortMapper::server`]), oldest first.
    pub fn take_sends(&mut self) -> std::vec::Drain<'_, ([u8; portmap::PCP_MAP_LEN], usize)> {
        self.sends.drain(..)
    }

    fn ask(&mut self, proto: MapProto, lifetime: u32) {
        let mut b = [0u8; portmap::PCP_MAP_LEN];
        let suggested = self.external.map(|e| e.port()).unwrap_or(self.internal);
        match proto {
            MapProto::Pcp => {
                let n = portmap::emit_pcp_map(&mut b, self.client_ip, &self.nonce, self.internal, suggested, lifetime);
                self.sends.push((b, n));
            }
            MapProto::NatPmp => {
                if self.natpmp_ip.is_none() {
                    let n = portmap::emit_natpmp_address(&mut b);
                    self.sends.push((b, n));
                }
                let suggested = if lifetime == 0 { 0 } else { suggested };
                let n = portmap::emit_natpmp_map(&mut b, self.internal, suggested, lifetime);
                self.sends.push((b, n));
            }
        }
    }

    /// Run the timers due at `now`.
    pub fn on_timeout(&mut self, now: Instant) -> Option<MapEvent> {
        match self.phase {
            Phase::Asking { proto, asks, next } if now >= next => {
                if asks < ASKS {
                    self.ask(proto, self.lifetime);
                    self.phase = Phase::Asking { proto, asks: asks + 1, next: now + ASK_INTERVAL };
                    None
                } else if proto == MapProto::Pcp {
                    self.phase = Phase::Asking { proto: MapProto::NatPmp, asks: 0, next: now };
                    self.on_timeout(now)
                } else {
                    self.phase = Phase::Done;
                    Some(MapEvent::Failed { reason: format!("no answer to PCP or NAT-PMP from {}", self.server.ip()) })
                }
            }
            Phase::Mapped { renew, expires } if now >= renew => {
                self.ask(self.proto.expect("mapped"), self.lifetime);
                self.phase = Phase::Renewing { next: now + ASK_INTERVAL * 8, expires };
                None
            }
            Phase::Renewing { expires, .. } if now >= expires => {
                self.phase = Phase::Done;
                self.external = None;
                Some(MapEvent::Lost)
            }
            Phase::Renewing { next, expires } if now >= next => {
                self.ask(self.proto.expect("mapped"), self.lifetime);
                self.phase = Phase::Renewing { next: now + ASK_INTERVAL * 8, expires };
                None
            }
            _ => None,
        }
    }

    /// An answer from the router.
    pub fn on_datagram(&mut self, now: Instant, data: &[u8]) -> Option<MapEvent> {
        let reply = match portmap::parse(data) {
            Ok(r) => r,
            Err(_) => {
                self.bad_answers += 1;
                return None;
            }
        };
        let asking_proto = match self.phase {
            Phase::Asking { proto, .. } => proto,
            Phase::Renewing { .. } | Phase::Mapped { .. } => self.proto.expect("mapped"),
            Phase::Idle | Phase::Done => {
                self.bad_answers += 1;
                return None;
            }
        };
        let renewed = self.external.is_some();
        match reply {
            PortMapReply::PcpMapped { nonce, internal, external, lifetime }
                if nonce == self.nonce && internal == self.internal && asking_proto == MapProto::Pcp =>
            {
                self.proto = Some(MapProto::Pcp);
                self.mapped(now, external, lifetime, renewed)
            }
            PortMapReply::UnsupportedVersion if asking_proto == MapProto::Pcp && !renewed => {
                // A NAT-PMP router: ask it in its own protocol at once.
                self.phase = Phase::Asking { proto: MapProto::NatPmp, asks: 0, next: now };
                self.on_timeout(now)
            }
            PortMapReply::PcpRefused { nonce, refusal }
                if asking_proto == MapProto::Pcp && nonce.is_none_or(|n| n == self.nonce) && !renewed =>
            {
                self.phase = Phase::Done;
                Some(MapEvent::Failed { reason: format!("PCP: {}", refusal.describe()) })
            }
            PortMapReply::NatPmpAddress { ip } if asking_proto == MapProto::NatPmp => {
                self.natpmp_ip = Some(ip);
                self.natpmp_done(now, renewed)
            }
            PortMapReply::NatPmpMapped { internal, external, lifetime }
                if internal == self.internal && asking_proto == MapProto::NatPmp =>
            {
                self.natpmp_port = Some((external, lifetime));
                self.natpmp_done(now, renewed)
            }
            PortMapReply::NatPmpRefused { refusal } if asking_proto == MapProto::NatPmp && !renewed => {
                self.phase = Phase::Done;
                Some(MapEvent::Failed { reason: format!("NAT-PMP: {}", refusal.describe()) })
            }
            _ => {
                self.bad_answers += 1;
                None
            }
        }
    }

    fn natpmp_done(&mut self, now: Instant, renewed: bool) -> Option<MapEvent> {
        let (Some(ip), Some((port, lifetime))) = (self.natpmp_ip, self.natpmp_port.take()) else { return None };
        self.proto = Some(MapProto::NatPmp);
        self.mapped(now, SocketAddr::from((ip, port)), lifetime, renewed)
    }

    fn mapped(&mut self, now: Instant, external: SocketAddr, lifetime: u32, renewed: bool) -> Option<MapEvent> {
        if lifetime == 0 {
            // The answer to a deletion, or a router that keeps nothing.
            self.phase = Phase::Done;
            self.external = None;
            return (!renewed).then(|| MapEvent::Failed { reason: "the router granted a lifetime of 0 s".into() });
        }
        let life = Duration::from_secs(u64::from(lifetime));
        self.external = Some(external);
        self.phase = Phase::Mapped { renew: now + life / 2, expires: now + life };
        Some(MapEvent::Mapped { protocol: self.proto.expect("set by the caller"), external, lifetime: life, renewed })
    }

    /// Delete the mapping (at exit): one request with lifetime 0. Nothing if none is held.
    pub fn release(&mut self) {
        if let Some((proto, _)) = self.mapping() {
            self.ask(proto, 0);
        }
        self.phase = Phase::Done;
        self.external = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapper() -> (PortMapper, Instant) {
        let m = PortMapper::new("10.1.0.1:5351".parse().unwrap(), Ipv4Addr::new(10, 1, 0, 2), 40001, 3600, [3; 12]);
        (m, Instant::now())
    }

    fn pcp_answer(req: &[u8], external: SocketAddr, lifetime: u32) -> Vec<u8> {
        let mut b = req.to_vec();
        b[1] = 0x81;
        b[4..8].copy_from_slice(&lifetime.to_be_bytes());
        b[42..44].copy_from_slice(&external.port().to_be_bytes());
        let std::net::IpAddr::V4(ip) = external.ip() else { panic!() };
        b[44..60].copy_from_slice(&ip.to_ipv6_mapped().octets());
        b
    }

    #[test]
    fn pcp_maps_renews_at_half_the_lifetime_and_releases() {
        let (mut m, t0) = mapper();
        m.start(t0);
        let sends: Vec<_> = m.take_sends().collect();
        assert_eq!(sends.len(), 1);
        let (req, n) = sends[0];
        assert_eq!((n, req[0], req[1]), (60, 2, 1));
        assert!(m.asking());
        let ext: SocketAddr = "11.0.0.11:40001".parse().unwrap();
        let ev = m.on_datagram(t0 + Duration::from_millis(1), &pcp_answer(&req[..n], ext, 600));
        let want = MapEvent::Mapped {
            protocol: MapProto::Pcp,
            external: ext,
            lifetime: Duration::from_secs(600),
            renewed: false,
        };
        assert_eq!(ev, Some(want));
        assert_eq!(m.mapping(), Some((MapProto::Pcp, ext)));
        assert!(!m.asking());
        // Renewal at half the lifetime, asking for the same external port.
        let renew = t0 + Duration::from_millis(1) + Duration::from_secs(300);
        assert_eq!(m.next_timeout(), Some(renew));
        assert_eq!(m.on_timeout(renew), None);
        let (req, n) = m.take_sends().next().unwrap();
        assert_eq!(u16::from_be_bytes([req[42], req[43]]), 40001);
        let ev = m.on_datagram(renew, &pcp_answer(&req[..n], ext, 600));
        assert!(matches!(ev, Some(MapEvent::Mapped { renewed: true, .. })), "{ev:?}");
        // Release: one request with lifetime 0 and the same nonce.
        m.release();
        let (req, n) = m.take_sends().next().unwrap();
        assert_eq!((n, &req[4..8], &req[24..36]), (60, &[0u8, 0, 0, 0][..], &[3u8; 12][..]));
        assert_eq!(m.mapping(), None);
        assert_eq!(m.next_timeout(), None);
    }

    #[test]
    fn a_nat_pmp_router_is_asked_in_its_own_protocol() {
        let (mut m, t0) = mapper();
        m.start(t0);
        m.take_sends().count();
        // The router answers PCP with NAT-PMP's "unsupported version".
        assert_eq!(m.on_datagram(t0, &[0, 0x82, 0, 1]), None);
        let sends: Vec<_> = m.take_sends().map(|(b, n)| b[..n].to_vec()).collect();
        assert_eq!(sends.len(), 2, "the external address, then the mapping");
        assert_eq!(sends[0], vec![0, 0]);
        assert_eq!(sends[1][..2], [0, 1]);
        assert_eq!(m.on_datagram(t0, &[0, 128, 0, 0, 0, 0, 0, 1, 11, 0, 0, 11]), None);
        let ev = m.on_datagram(t0, &[0, 129, 0, 0, 0, 0, 0, 1, 0x9C, 0x41, 0x9C, 0x41, 0, 0, 0x0E, 0x10]);
        assert!(
            matches!(ev, Some(MapEvent::Mapped { protocol: MapProto::NatPmp, external, .. }) if external == "11.0.0.11:40001".parse().unwrap()),
            "{ev:?}"
        );
        m.release();
        let (req, n) = m.take_sends().next().unwrap();
        assert_eq!(&req[..n], &[0, 1, 0, 0, 0x9C, 0x41, 0, 0, 0, 0, 0, 0], "NAT-PMP delete: lifetime 0, port 0");
    }

    #[test]
    fn a_silent_router_costs_four_asks_then_a_clear_failure() {
        let (mut m, t0) = mapper();
        m.start(t0);
        let mut asks = m.take_sends().count();
        let mut t = t0;
        let mut ev = None;
        while let Some(next) = m.next_timeout() {
            t = next;
            ev = m.on_timeout(t);
            asks += m.take_sends().count();
        }
        assert_eq!(t - t0, ASK_INTERVAL * 4);
        assert_eq!(asks, 2 + 2 * 2, "two PCP asks, two NAT-PMP asks of two requests each");
        assert!(matches!(&ev, Some(MapEvent::Failed { reason }) if reason.contains("no answer")), "{ev:?}");
        assert!(!m.asking());
    }

    #[test]
    fn wrong_or_stray_answers_are_counted_and_change_nothing() {
        let (mut m, t0) = mapper();
        m.start(t0);
        let (req, n) = m.take_sends().next().unwrap();
        let mut other = pcp_answer(&req[..n], "11.0.0.11:1".parse().unwrap(), 600);
        other[24] ^= 1; // another mapping's nonce
        assert_eq!(m.on_datagram(t0, &other), None);
        assert_eq!(m.on_datagram(t0, &[9, 9, 9]), None);
        assert_eq!(m.bad_answers, 2);
        assert!(m.asking());
        // A refusal ends it with the reason.
        let mut refused = req[..n].to_vec();
        refused[1] = 0x81;
        refused[3] = 2;
        let ev = m.on_datagram(t0, &refused);
        assert!(matches!(&ev, Some(MapEvent::Failed { reason }) if reason.contains("not authorized")), "{ev:?}");
    }

    #[test]
    fn a_mapping_whose_renewals_go_unanswered_is_lost_at_expiry() {
        let (mut m, t0) = mapper();
        m.start(t0);
        let (req, n) = m.take_sends().next().unwrap();
        m.on_datagram(t0, &pcp_answer(&req[..n], "11.0.0.11:40001".parse().unwrap(), 120));
        let mut t = t0;
        let mut events = Vec::new();
        while let Some(next) = m.next_timeout() {
            t = next;
            events.extend(m.on_timeout(t));
            m.take_sends().count();
        }
        assert_eq!(events, vec![MapEvent::Lost]);
        assert_eq!(t - t0, Duration::from_secs(120));
        assert_eq!(m.mapping(), None);
    }
}
