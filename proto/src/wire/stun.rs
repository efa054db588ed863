//! STUN Binding Request and Binding Success Response (RFC 8489), just enough for public
//! address discovery: the client sends a request to the manager's UDP port; the manager
//! answers with the source address it saw in an XOR-MAPPED-ADDRESS attribute (RFC 8489
//! section 14.2), remembering the transaction id so REGISTER can name the binding.
//!
//! Header (RFC 8489 section 5): type u16 (top two bits 0), length u16 (attributes only,
//! a multiple of 4), magic cookie 0x2112A442, transaction id (96 bits).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The magic cookie (RFC 8489 section 5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Binding Request message type.
pub const BINDING_REQUEST: u16 = 0x0001;
/// Binding Success Response message type.
pub const BINDING_SUCCESS: u16 = 0x0101;
/// XOR-MAPPED-ADDRESS attribute type.
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
/// OTHER-ADDRESS attribute type (RFC 5780 section 7.4): the server's alternate address, to
/// which a client sends Binding Requests to learn how its NAT maps other destinations.
pub const ATTR_OTHER_ADDRESS: u16 = 0x802C;
/// Largest response this module emits (IPv6 XOR-MAPPED-ADDRESS and IPv6 OTHER-ADDRESS).
pub const MAX_RESPONSE_LEN: usize = HEADER_LEN + 4 + 20 + 4 + 20;

/// A STUN transaction id.
pub type TransactionId = [u8; 12];

/// Errors parsing STUN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Shorter than the header, or the length field disagrees with the datagram.
    #[error("stun message has a bad length")]
    BadLength,
    /// The magic cookie is wrong or the top bits of the type are set.
    #[error("not a stun message")]
    NotStun,
    /// A message type other than Binding Request / Binding Success Response.
    #[error("unsupported stun message type 0x{0:04x}")]
    UnsupportedType(u16),
    /// An attribute runs past the end of the message.
    #[error("stun attribute truncated")]
    TruncatedAttribute,
    /// A success response lacks XOR-MAPPED-ADDRESS, or it is malformed.
    #[error("stun response has no valid xor-mapped-address")]
    NoMappedAddress,
    /// A comprehension-required attribute (type below 0x8000) that this module does not know.
    #[error("unknown comprehension-required attribute 0x{0:04x}")]
    UnknownRequiredAttribute(u16),
}

/// A parsed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StunMessage {
    /// A Binding Request.
    BindingRequest {
        /// Transaction id.
        txid: TransactionId,
    },
    /// A Binding Success Response.
    BindingSuccess {
        /// Transaction id of the request it answers.
        txid: TransactionId,
        /// The address the server saw the request come from.
        mapped: SocketAddr,
        /// The server's alternate address (OTHER-ADDRESS), if it has one.
        other: Option<SocketAddr>,
    },
}

/// SOFTWARE attribute type (comprehension-optional, RFC 8489 section 14.14).
pub const ATTR_SOFTWARE: u16 = 0x8022;

/// Length of the Binding Request nullpunch sends: the header plus a SOFTWARE attribute
/// ("nullpunch", padded to 12). The attribute is there for the responder's amplification
/// rule: an answer may be at most twice its request, and an IPv6 answer is 44 bytes.
pub const REQUEST_LEN: usize = HEADER_LEN + 4 + 12;

/// Write a Binding Request ([`REQUEST_LEN`] bytes: header and SOFTWARE "nullpunch") into
/// `buf`; returns its length.
pub fn emit_binding_request(txid: &TransactionId, buf: &mut [u8]) -> usize {
    emit_header(BINDING_REQUEST, (REQUEST_LEN - HEADER_LEN) as u16, txid, buf);
    let a = &mut buf[HEADER_LEN..REQUEST_LEN];
    a[..2].copy_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    a[2..4].copy_from_slice(&9u16.to_be_bytes());
    a[4..13].copy_from_slice(b"nullpunch");
    a[13..16].fill(0);
    REQUEST_LEN
}

/// Write a Binding Success Response carrying `mapped` into `buf` (at least
/// [`MAX_RESPONSE_LEN`] bytes); returns its length (32 for IPv4, 44 for IPv6).
pub fn emit_binding_success(txid: &TransactionId, mapped: SocketAddr, buf: &mut [u8]) -> usize {
    emit_binding_success_with(txid, mapped, None, buf)
}

/// Like [`emit_binding_success`], with an OTHER-ADDRESS attribute naming `other` after the
/// XOR-MAPPED-ADDRESS if given (12 more bytes for IPv4, 24 for IPv6).
pub fn emit_binding_success_with(
    txid: &TransactionId,
    mapped: SocketAddr,
    other: Option<SocketAddr>,
    buf: &mut [u8],
) -> usize {
    let n = emit_mapped(txid, mapped, buf);
    let Some(o) = other else { return n };
    let (fam, octets): (u8, Vec<u8>) = match o.ip() {
        IpAddr::V4(ip) => (1, ip.octets().to_vec()),
        IpAddr::V6(ip) => (2, ip.octets().to_vec()),
    };
    let attr_len = 4 + octets.len();
    let a = &mut buf[n..n + 4 + attr_len];
    a[0..2].copy_from_slice(&ATTR_OTHER_ADDRESS.to_be_bytes());
    a[2..4].copy_from_slice(&(attr_len as u16).to_be_bytes());
    a[4] = 0;
    a[5] = fam;
    a[6..8].copy_from_slice(&o.port().to_be_bytes());
    a[8..8 + octets.len()].copy_from_slice(&octets);
    let total = n + 4 + attr_len;
    buf[2..4].copy_from_slice(&((total - HEADER_LEN) as u16).to_be_bytes());
    total
}

fn emit_mapped(txid: &TransactionId, mapped: SocketAddr, buf: &mut [u8]) -> usize {
    let (fam, addr_len) = match mapped.ip() {
        IpAddr::V4(_) => (1u8, 4usize),
        IpAddr::V6(_) => (2u8, 16usize),
    };
    let attr_len = 4 + addr_len;
    emit_header(BINDING_SUCCESS, (4 + attr_len) as u16, txid, buf);
    let a = &mut buf[HEADER_LEN..];
    a[0..2].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    a[2..4].copy_from_slice(&(attr_len as u16).to_be_bytes());
    a[4] = 0;
    a[5] = fam;
    let xport = mapped.port() ^ (MAGIC_COOKIE >> 16) as u16;
    a[6..8].copy_from_slice(&xport.to_be_bytes());
    let key = xor_key(txid);
    match mapped.ip() {
        IpAddr::V4(ip) => {
            for (i, b) in ip.octets().iter().enumerate() {
                a[8 + i] = b ^ key[i];
            }
        }
        IpAddr::V6(ip) => {
            for (i, b) in ip.octets().iter().enumerate() {
                a[8 + i] = b ^ key[i];
            }
        }
    }
    HEADER_LEN + 4 + attr_len
}

fn emit_header(ty: u16, len: u16, txid: &TransactionId, buf: &mut [u8]) {
    buf[0..2].copy_from_slice(&ty.to_be_bytes());
    buf[2..4].copy_from_slice(&len.to_be_bytes());
    buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    buf[8..20].copy_from_slice(txid);
}

/// The XOR key: magic cookie followed by the transaction id (RFC 8489 section 14.2).
fn xor_key(txid: &TransactionId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    k[4..].copy_from_slice(txid);
    k
}

/// Parse a Binding Request or Binding Success Response.
pub fn parse(buf: &[u8]) -> Result<StunMessage, StunError> {
    if buf.len() < HEADER_LEN {
        return Err(StunError::BadLength);
    }
    let ty = u16::from_be_bytes([buf[0], buf[1]]);
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let cookie = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if ty & 0xC000 != 0 || cookie != MAGIC_COOKIE {
        return Err(StunError::NotStun);
    }
    if !len.is_multiple_of(4) || HEADER_LEN + len != buf.len() {
        return Err(StunError::BadLength);
    }
    let mut txid = [0u8; 12];
    txid.copy_from_slice(&buf[8..20]);
    let mut mapped = None;
    let mut other = None;
    let mut attrs = &buf[HEADER_LEN..];
    while !attrs.is_empty() {
        if attrs.len() < 4 {
            return Err(StunError::TruncatedAttribute);
        }
        let at = u16::from_be_bytes([attrs[0], attrs[1]]);
        let al = u16::from_be_bytes([attrs[2], attrs[3]]) as usize;
        let padded = (al + 3) & !3;
        if attrs.len() < 4 + padded {
            return Err(StunError::TruncatedAttribute);
        }
        let value = &attrs[4..4 + al];
        match at {
            ATTR_XOR_MAPPED_ADDRESS => mapped = Some(parse_xor_mapped(value, &txid)?),
            // Ignored if malformed: it only ever adds a measurement.
            ATTR_OTHER_ADDRESS => other = parse_plain_address(value),
            // Comprehension-optional attributes (0x8000..) are ignored (RFC 8489 section 14).
            a if a >= 0x8000 => {}
            a if ty == BINDING_REQUEST => return Err(StunError::UnknownRequiredAttribute(a)),
            _ => {}
        }
        attrs = &attrs[4 + padded..];
    }
    match ty {
        BINDING_REQUEST => Ok(StunMessage::BindingRequest { txid }),
        BINDING_SUCCESS => {
            Ok(StunMessage::BindingSuccess { txid, mapped: mapped.ok_or(StunError::NoMappedAddress)?, other })
        }
        other => Err(StunError::UnsupportedType(other)),
    }
}

/// A MAPPED-ADDRESS-format value (RFC 8489 section 14.1), as OTHER-ADDRESS carries it.
fn parse_plain_address(v: &[u8]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
    match (v[1], v.len()) {
        (1, 8) => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(v[4], v[5], v[6], v[7])), port)),
        (2, 20) => Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&v[4..20]).ok()?)), port)),
        _ => None,
    }
}

fn parse_xor_mapped(v: &[u8], txid: &TransactionId) -> Result<SocketAddr, StunError> {
    if v.len() < 4 {
        return Err(StunError::NoMappedAddress);
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    let key = xor_key(txid);
    let ip = match (v[1], v.len()) {
        (1, 8) => {
            let mut o = [0u8; 4];
            for i in 0..4 {
                o[i] = v[4 + i] ^ key[i];
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (2, 20) => {
            let mut o = [0u8; 16];
            for i in 0..16 {
                o[i] = v[4 + i] ^ key[i];
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return Err(StunError::NoMappedAddress),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_address_round_trips_for_both_families() {
        let txid = [5u8; 12];
        for (mapped, other) in [("192.0.2.1:40000", "198.51.100.1:7481"), ("[2001:db8::1]:40000", "[2001:db8::9]:7481")]
        {
            let (mapped, other): (SocketAddr, SocketAddr) = (mapped.parse().unwrap(), other.parse().unwrap());
            let mut buf = [0u8; MAX_RESPONSE_LEN];
            let n = emit_binding_success_with(&txid, mapped, Some(other), &mut buf);
            assert_eq!(
                n,
                emit_binding_success(&txid, mapped, &mut [0u8; MAX_RESPONSE_LEN])
                    + 4
                    + if mapped.is_ipv4() { 8 } else { 20 }
            );
            assert_eq!(parse(&buf[..n]), Ok(StunMessage::BindingSuccess { txid, mapped, other: Some(other) }));
        }
    }

    #[test]
    fn rfc5769_ipv4_response_vector_decodes() {
        // RFC 5769 section 2.2 sample response, reduced to header + XOR-MAPPED-ADDRESS
        // (its other attributes are comprehension-optional or integrity ones we skip).
        let txid = [0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae];
        let mut msg = vec![0x01, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
        msg.extend_from_slice(&txid);
        msg.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]);
        let m = parse(&msg).unwrap();
        assert_eq!(m, StunMessage::BindingSuccess { txid, mapped: "192.0.2.1:32853".parse().unwrap(), other: None });
        // And we emit exactly those bytes.
        let mut buf = [0u8; MAX_RESPONSE_LEN];
        let n = emit_binding_success(&txid, "192.0.2.1:32853".parse().unwrap(), &mut buf);
        assert_eq!(&buf[..n], &msg[..]);
    }

    #[test]
    fn rfc5769_ipv6_mapped_address_decodes() {
        // RFC 5769 section 2.3: 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
        let txid = [0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae];
        let mut msg = vec![0x01, 0x01, 0x00, 0x18, 0x21, 0x12, 0xa4, 0x42];
        msg.extend_from_slice(&txid);
        msg.extend_from_slice(&[
            0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25,
            0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
        ]);
        let want: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap();
        assert_eq!(parse(&msg).unwrap(), StunMessage::BindingSuccess { txid, mapped: want, other: None });
        let mut buf = [0u8; MAX_RESPONSE_LEN];
        let n = emit_binding_success(&txid, want, &mut buf);
        assert_eq!(&buf[..n], &msg[..]);
    }

    #[test]
    fn request_round_trips_and_bad_input_is_rejected() {
        let txid = [9u8; 12];
        let mut buf = [0u8; 64];
        let n = emit_binding_request(&txid, &mut buf);
        assert_eq!(n, 36);
        assert_eq!(&buf[20..36], b"\x80\x22\x00\x09nullpunch\x00\x00\x00");
        assert_eq!(parse(&buf[..n]), Ok(StunMessage::BindingRequest { txid }));
        for cut in 0..n {
            assert_eq!(parse(&buf[..cut]), Err(StunError::BadLength));
        }
        // From here on, a bare request (header only, as other clients send).
        buf[2..4].copy_from_slice(&0u16.to_be_bytes());
        let n = HEADER_LEN;
        assert_eq!(parse(&buf[..n]), Ok(StunMessage::BindingRequest { txid }));
        let mut b = buf;
        b[4] = 0;
        assert_eq!(parse(&b[..n]), Err(StunError::NotStun));
        let mut b = buf;
        b[1] = 0x11; // 0x0011: not a binding message
        assert_eq!(parse(&b[..n]), Err(StunError::UnsupportedType(0x0011)));
        // Length field claiming an attribute that is not there.
        let mut b = buf;
        b[3] = 4;
        assert_eq!(parse(&b[..n]), Err(StunError::BadLength));
        // Attribute running past the end.
        let mut b = buf[..n].to_vec();
        b.extend_from_slice(&[0x80, 0x22, 0x00, 0x08, 0, 0, 0, 0]);
        b[3] = 8;
        assert_eq!(parse(&b), Err(StunError::TruncatedAttribute));
        // Unknown comprehension-required attribute in a request.
        let mut b = buf[..n].to_vec();
        b.extend_from_slice(&[0x00, 0x77, 0x00, 0x00]);
        b[3] = 4;
        assert_eq!(parse(&b), Err(StunError::UnknownRequiredAttribute(0x77)));
        // A success response without a mapped address.
        let mut b = buf[..n].to_vec();
        b[1] = 0x01;
        b[0] = 0x01;
        assert_eq!(parse(&b), Err(StunError::NoMappedAddress));
    }
}
