//! Port mapping requests to the router: PCP (RFC 6887) MAP for UDP, and NAT-PMP (RFC 6886)
//! as the fallback. Both go to the router's port 5351 from the client's UDP socket; the
//! answers come back from there. Only what a client needs: a UDP mapping of one internal
//! port, its renewal (the same request again) and its deletion (lifetime 0).
//!
//! Layouts (big-endian):
//!
//! * PCP MAP request, 60 bytes: `version=2 | opcode=1 | 0:u16 | lifetime:u32 | client
//!   IP:16 | nonce:12 | protocol=17 | 0:3 | internal port:u16 | suggested external port:u16 |
//!   suggested external IP:16`. IPv4 addresses are IPv4-mapped (`::ffff:a.b.c.d`); the
//!   suggested external IP is `::ffff:0.0.0.0` (any IPv4).
//! * PCP MAP response, 60 bytes: `version=2 | 0x81 | 0 | result:u8 | lifetime:u32 |
//!   epoch:u32 | 0:12 | nonce:12 | protocol | 0:3 | internal port | assigned external port |
//!   assigned external IP:16`. Shorter answers with an error result are accepted (a server
//!   that rejects the header may send only the header).
//! * NAT-PMP external address request, 2 bytes: `0 | 0`; response, 12 bytes: `0 | 128 |
//!   result:u16 | epoch:u32 | address:4`.
//! * NAT-PMP UDP mapping request, 12 bytes: `0 | 1 | 0:u16 | internal port | suggested
//!   external port | lifetime:u32`; response, 16 bytes: `0 | 129 | result:u16 | epoch:u32 |
//!   internal port | external port | lifetime:u32`.
//! * A NAT-PMP server that gets a PCP request answers `0 | 0x82 | result=1` (unsupported
//!   version), at least 4 bytes; [`parse`] reads that as [`PortMapReply::UnsupportedVersion`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The port PCP and NAT-PMP servers listen on.
pub const PORT: u16 = 5351;
/// Length of a PCP MAP request and response.
pub const PCP_MAP_LEN: usize = 60;
/// Length of a PCP header (a response without its opcode body).
pub const PCP_HEADER_LEN: usize = 24;
/// Length of a NAT-PMP mapping request.
pub const NATPMP_MAP_LEN: usize = 12;
/// PCP's version number.
pub const PCP_VERSION: u8 = 2;
/// The PCP MAP opcode.
pub const PCP_OP_MAP: u8 = 1;
/// The transport protocol number mapped (UDP).
pub const UDP: u8 = 17;

/// Why a server refused a request (PCP result codes; NAT-PMP's 1-5 are mapped onto them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// PCP 2 / NAT-PMP 2: not authorized (mapping switched off, or this host not allowed).
    NotAuthorized,
    /// PCP 7 / NAT-PMP 3: the router has no external address (its WAN is down).
    NetworkFailure,
    /// PCP 8 / NAT-PMP 4: out of resources.
    NoResources,
    /// PCP 12: the client address in the request is not where it came from (a NAT between).
    AddressMismatch,
    /// Any other code (PCP 3-6, 9-11, 13+; NAT-PMP 5+).
    Other(u16),
}

impl Refusal {
    fn from_pcp(code: u8) -> Refusal {
        match code {
            2 => Refusal::NotAuthorized,
            7 => Refusal::NetworkFailure,
            8 => Refusal::NoResources,
            12 => Refusal::AddressMismatch,
            c => Refusal::Other(u16::from(c)),
        }
    }

    fn from_natpmp(code: u16) -> Refusal {
        match code {
            2 => Refusal::NotAuthorized,
            3 => Refusal::NetworkFailure,
            4 => Refusal::NoResources,
            c => Refusal::Other(c),
        }
    }

    /// What it means, for a person.
    pub fn describe(self) -> String {
        match self {
            Refusal::NotAuthorized => "not authorized (mapping switched off, or this host not allowed)".into(),
            Refusal::NetworkFailure => "the router has no external address".into(),
            Refusal::NoResources => "the router is out of mappings".into(),
            Refusal::AddressMismatch => "address mismatch (another NAT between this host and the router)".into(),
            Refusal::Other(c) => format!("refused with result code {c}"),
        }
    }
}

/// A parsed answer from a PCP or NAT-PMP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortMapReply {
    /// PCP MAP success: `internal` port mapped to `external` for `lifetime` seconds.
    PcpMapped {
        /// The request's nonce (to match it).
        nonce: [u8; 12],
        /// The internal port.
        internal: u16,
        /// The assigned external address.
        external: SocketAddr,
        /// Seconds the mapping lasts.
        lifetime: u32,
    },
    /// A PCP MAP (or header-only) error answer.
    PcpRefused {
        /// The request's nonce, if the answer carried the MAP body.
        nonce: Option<[u8; 12]>,
        /// Why.
        refusal: Refusal,
    },
    /// The server speaks another version (a NAT-PMP server answering PCP, or a PCP server
    /// answering with PCP result 1).
    UnsupportedVersion,
    /// NAT-PMP external address success.
    NatPmpAddress {
        /// The router's external IPv4 address.
        ip: Ipv4Addr,
    },
    /// NAT-PMP UDP mapping success.
    NatPmpMapped {
        /// The internal port.
        internal: u16,
        /// The external port.
        external: u16,
        /// Seconds the mapping lasts.
        lifetime: u32,
    },
    /// A NAT-PMP error answer (to either request).
    NatPmpRefused {
        /// Why.
        refusal: Refusal,
    },
}

/// Why an answer was not understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PortMapError {
    /// Too short for what its header says it is.
    #[error("truncated port mapping answer ({0} bytes)")]
    Truncated(usize),
    /// Not an answer (a request, an unknown version or opcode, a protocol other than UDP).
    #[error("not a PCP or NAT-PMP answer this client asked for")]
    Unexpected,
}

fn v4_mapped(ip: Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

/// Write a PCP MAP request for UDP port `internal` of `client_ip` into `buf` (at least
/// [`PCP_MAP_LEN`] bytes); returns its length. `lifetime` 0 deletes the mapping;
/// `suggested` is the external port asked for (0: any).
pub fn emit_pcp_map(
    buf: &mut [u8],
    client_ip: Ipv4Addr,
    nonce: &[u8; 12],
    internal: u16,
    suggested: u16,
    lifetime: u32,
) -> usize {
    let b = &mut buf[..PCP_MAP_LEN];
    b.fill(0);
    b[0] = PCP_VERSION;
    b[1] = PCP_OP_MAP;
    b[4..8].copy_from_slice(&lifetime.to_be_bytes());
    b[8..24].copy_from_slice(&v4_mapped(client_ip));
    b[24..36].copy_from_slice(nonce);
    b[36] = UDP;
    b[40..42].copy_from_slice(&internal.to_be_bytes());
    b[42..44].copy_from_slice(&suggested.to_be_bytes());
    b[44..60].copy_from_slice(&v4_mapped(Ipv4Addr::UNSPECIFIED));
    PCP_MAP_LEN
}

/// Write a NAT-PMP external address request into `buf`; returns its length (2).
pub fn emit_natpmp_address(buf: &mut [u8]) -> usize {
    buf[..2].copy_from_slice(&[0, 0]);
    2
}

/// Write a NAT-PMP UDP mapping request into `buf` (at least [`NATPMP_MAP_LEN`] bytes);
/// returns its length. `lifetime` 0 (with `suggested` 0) deletes the mapping.
pub fn emit_natpmp_map(buf: &mut [u8], internal: u16, suggested: u16, lifetime: u32) -> usize {
    let b = &mut buf[..NATPMP_MAP_LEN];
    b.fill(0);
    b[1] = 1;
    b[4..6].copy_from_slice(&internal.to_be_bytes());
    b[6..8].copy_from_slice(&suggested.to_be_bytes());
    b[8..12].copy_from_slice(&lifetime.to_be_bytes());
    NATPMP_MAP_LEN
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parse an answer from a PCP or NAT-PMP server. Never panics.
pub fn parse(b: &[u8]) -> Result<PortMapReply, PortMapError> {
    let short = || PortMapError::Truncated(b.len());
    match b.first() {
        Some(&PCP_VERSION) => {
            if b.len() < 4 {
                return Err(short());
            }
            if b[1] != 0x80 | PCP_OP_MAP {
                return Err(PortMapError::Unexpected);
            }
            let result = b[3];
            if result == 1 {
                return Ok(PortMapReply::UnsupportedVersion);
            }
            if result != 0 {
                let nonce = (b.len() >= PCP_MAP_LEN).then(|| b[24..36].try_into().expect("12 bytes"));
                return Ok(PortMapReply::PcpRefused { nonce, refusal: Refusal::from_pcp(result) });
            }
            if b.len() < PCP_MAP_LEN {
                return Err(short());
            }
            if b[36] != UDP {
                return Err(PortMapError::Unexpected);
            }
            let ip: [u8; 16] = b[44..60].try_into().expect("16 bytes");
            let ip = Ipv6Addr::from(ip);
            let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
            Ok(PortMapReply::PcpMapped {
                nonce: b[24..36].try_into().expect("12 bytes"),
                internal: be16(b, 40),
                external: SocketAddr::new(ip, be16(b, 42)),
                lifetime: be32(b, 4),
            })
        }
        Some(0) => {
            if b.len() < 4 {
                return Err(short());
            }
            let result = be16(b, 2);
            match b[1] {
                // A NAT-PMP server's answer to a PCP request (opcode 2 with the reply bit).
                0x82 if result == 1 => Ok(PortMapReply::UnsupportedVersion),
                128 | 129 if result != 0 => Ok(PortMapReply::NatPmpRefused { refusal: Refusal::from_natpmp(result) }),
                128 if b.len() >= 12 => Ok(PortMapReply::NatPmpAddress { ip: Ipv4Addr::new(b[8], b[9], b[10], b[11]) }),
                129 if b.len() >= 16 => Ok(PortMapReply::NatPmpMapped {
                    internal: be16(b, 8),
                    external: be16(b, 10),
                    lifetime: be32(b, 12),
                }),
                128 | 129 => Err(short()),
                _ => Err(PortMapError::Unexpected),
            }
        }
        None => Err(short()),
        Some(_) => Err(PortMapError::Unexpected),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pcp_map_request_has_the_rfc_6887_layout() {
        let mut b = [0xAAu8; 80];
        let n = emit_pcp_map(&mut b, Ipv4Addr::new(10, 1, 0, 2), &[7; 12], 40001, 40001, 3600);
        assert_eq!(n, 60);
        assert_eq!(&b[..8], &[2, 1, 0, 0, 0, 0, 0x0E, 0x10]);
        assert_eq!(&b[8..24], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 10, 1, 0, 2]);
        assert_eq!(&b[24..36], &[7; 12]);
        assert_eq!(&b[36..40], &[17, 0, 0, 0]);
        assert_eq!(&b[40..44], &[0x9C, 0x41, 0x9C, 0x41]);
        assert_eq!(&b[44..60], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0, 0, 0]);
        assert_eq!(b[60], 0xAA, "nothing written past the request");
    }

    #[test]
    fn pcp_answers_parse_to_what_they_say() {
        let mut b = [0u8; 60];
        emit_pcp_map(&mut b, Ipv4Addr::new(10, 1, 0, 2), &[7; 12], 40001, 0, 3600);
        // The server's answer: reply bit, result 0, its lifetime and the assigned address.
        b[1] = 0x81;
        b[4..8].copy_from_slice(&1800u32.to_be_bytes());
        b[42..44].copy_from_slice(&51000u16.to_be_bytes());
        b[44..60].copy_from_slice(&v4_mapped(Ipv4Addr::new(11, 0, 0, 11)));
        assert_eq!(
            parse(&b),
            Ok(PortMapReply::PcpMapped {
                nonce: [7; 12],
                internal: 40001,
                external: "11.0.0.11:51000".parse().unwrap(),
                lifetime: 1800
            })
        );
        b[3] = 12;
        assert_eq!(parse(&b), Ok(PortMapReply::PcpRefused { nonce: Some([7; 12]), refusal: Refusal::AddressMismatch }));
        assert_eq!(parse(&b[..24]), Ok(PortMapReply::PcpRefused { nonce: None, refusal: Refusal::AddressMismatch }));
        b[3] = 1;
        assert_eq!(parse(&b[..24]), Ok(PortMapReply::UnsupportedVersion));
        b[3] = 0;
        assert_eq!(parse(&b[..59]), Err(PortMapError::Truncated(59)));
        b[1] = 1;
        assert_eq!(parse(&b), Err(PortMapError::Unexpected), "a request is not an answer");
    }

    #[test]
    fn natpmp_requests_and_answers_have_the_rfc_6886_layout() {
        let mut b = [0u8; 16];
        assert_eq!(emit_natpmp_address(&mut b), 2);
        assert_eq!(&b[..2], &[0, 0]);
        assert_eq!(emit_natpmp_map(&mut b, 40001, 40001, 7200), 12);
        assert_eq!(&b[..12], &[0, 1, 0, 0, 0x9C, 0x41, 0x9C, 0x41, 0, 0, 0x1C, 0x20]);
        let addr = [0, 128, 0, 0, 0, 0, 0, 9, 11, 0, 0, 11];
        assert_eq!(parse(&addr), Ok(PortMapReply::NatPmpAddress { ip: Ipv4Addr::new(11, 0, 0, 11) }));
        let map = [0, 129, 0, 0, 0, 0, 0, 9, 0x9C, 0x41, 0xC7, 0x38, 0, 0, 0x0E, 0x10];
        assert_eq!(parse(&map), Ok(PortMapReply::NatPmpMapped { internal: 40001, external: 51000, lifetime: 3600 }));
        let refused = [0, 129, 0, 2, 0, 0, 0, 9];
        assert_eq!(parse(&refused), Ok(PortMapReply::NatPmpRefused { refusal: Refusal::NotAuthorized }));
        assert_eq!(parse(&[0, 0x82, 0, 1]), Ok(PortMapReply::UnsupportedVersion));
        assert_eq!(parse(&map[..15]), Err(PortMapError::Truncated(15)));
        assert_eq!(parse(&[0, 1, 0, 0]), Err(PortMapError::Unexpected));
    }

    #[test]
    fn no_input_panics() {
        let mut rng = crate::rng::Rng::new(5);
        for len in 0..80 {
            for _ in 0..200 {
                let mut b = vec![0u8; len];
                rng.fill(&mut b);
                if len > 0 && rng.next_u64().is_multiple_of(2) {
                    b[0] = if rng.next_u64().is_multiple_of(2) { 0 } else { 2 };
                }
                let _ = parse(&b);
            }
        }
    }
}
