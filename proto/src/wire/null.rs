//! The null packet: a UDP datagram with an empty data payload, marked as null by its message
//! identifier, sent by the callee to the caller's public address to open the callee's own
//! firewall (the caller's firewall drops it). The same packet, with the keepalive flag,
//! keeps an idle path's conntrack entries alive.
//!
//! ```text
//!  0        1        2        3
//! +--------+--------+--------+--------+
//! | 0x0E   | ver=1  | flags  | 0      |   message id NULL, version, flags, reserved
//! +--------+--------+--------+--------+
//! |            call id (u64)          |
//! +                                   +
//! |                                   |
//! +--------+--------+--------+--------+
//! |            token (u64)            |
//! +                                   +
//! |                                   |
//! +--------+--------+--------+--------+
//!  (no data payload)
//! ```
//! flags: bit 0 = keepalive (0 = punch), bit 1 = sent by the caller, bit 2 = a birthday
//! search's probe (or the hard side's punch; see `docs/protocol.md` section 5.5).
//! The first byte 0x0E lies in the range RFC 7983 leaves unassigned (4..=15), so it can
//! never be mistaken for STUN, DTLS, TURN, QUIC or RTP. A zero-length datagram is also
//! accepted as a (bare) null packet.

use super::frame::CallId;

/// The message identifier that marks a datagram as a null packet.
pub const NULL_MSG_ID: u8 = 0x0E;
/// Version of the null packet layout.
pub const NULL_VERSION: u8 = 1;
/// Size of an encoded null packet.
pub const NULL_LEN: usize = 20;

const FLAG_KEEPALIVE: u8 = 0x01;
const FLAG_FROM_CALLER: u8 = 0x02;
const FLAG_PROBE: u8 = 0x04;

/// Errors parsing a null packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NullError {
    /// The datagram does not start with [`NULL_MSG_ID`].
    #[error("not a null packet (first byte 0x{0:02x})")]
    NotNull(u8),
    /// The datagram is not [`NULL_LEN`] bytes long.
    #[error("null packet of {0} bytes, expected {NULL_LEN}")]
    BadLength(usize),
    /// Unsupported version.
    #[error("null packet version {0} unsupported")]
    BadVersion(u8),
    /// Unknown flag bits are set.
    #[error("null packet has unknown flags 0x{0:02x}")]
    BadFlags(u8),
    /// The reserved byte is not zero.
    #[error("null packet reserved byte is 0x{0:02x}, not 0")]
    BadReserved(u8),
}

/// A parsed null packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NullPacket {
    /// The call it belongs to.
    pub call_id: CallId,
    /// The call's token (from INCOMING/START).
    pub token: u64,
    /// Keepalive on an established path (false: the punch at call setup).
    pub keepalive: bool,
    /// Sent by the caller (false: by the callee).
    pub from_caller: bool,
    /// Part of a birthday search (a probe of the easy side, a punch of the hard side's
    /// sockets), not of the direct punch.
    pub probe: bool,
}

/// The token field of a search probe: a tag derived from the call's token and the sender's
/// role (the first 8 bytes of HMAC-SHA256 keyed with the token over
/// `"nullpunch probe v1"` and one byte, 1 for the caller, 0 for the callee). The easy side
/// sprays its probes over thousands of ports of the hard side's public IP, often a NAT shared
/// with strangers: whoever catches one learns that side's tag, not the token, and cannot
/// forge the other side's probes, a confirmation or the RTP (whose SSRCs are token halves).
pub fn probe_tag(token: u64, from_caller: bool) -> u64 {
    use hmac::{Hmac, Mac};
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(&token.to_be_bytes()).expect("HMAC takes any key length");
    m.update(b"nullpunch probe v1");
    m.update(&[from_caller as u8]);
    let out = m.finalize().into_bytes();
    u64::from_be_bytes(out[..8].try_into().expect("32 bytes of output"))
}

impl NullPacket {
    /// Write the packet into `buf` (at least [`NULL_LEN`] bytes); returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        let flags = (self.keepalive as u8 * FLAG_KEEPALIVE)
            | (self.from_caller as u8 * FLAG_FROM_CALLER)
            | (self.probe as u8 * FLAG_PROBE);
        buf[..4].copy_from_slice(&[NULL_MSG_ID, NULL_VERSION, flags, 0]);
        buf[4..12].copy_from_slice(&self.call_id.0.to_be_bytes());
        buf[12..20].copy_from_slice(&self.token.to_be_bytes());
        NULL_LEN
    }

    /// Parse a tagged null packet. (A zero-length datagram is a bare null packet; the
    /// demultiplexer reports it without calling this.)
    pub fn parse(buf: &[u8]) -> Result<NullPacket, NullError> {
        match buf.first() {
            Some(&NULL_MSG_ID) => {}
            Some(&b) => return Err(NullError::NotNull(b)),
            None => return Err(NullError::BadLength(0)),
        }
        if buf.len() != NULL_LEN {
            return Err(NullError::BadLength(buf.len()));
        }
        if buf[1] != NULL_VERSION {
            return Err(NullError::BadVersion(buf[1]));
        }
        let flags = buf[2];
        if flags & !(FLAG_KEEPALIVE | FLAG_FROM_CALLER | FLAG_PROBE) != 0 {
            return Err(NullError::BadFlags(flags));
        }
        if buf[3] != 0 {
            return Err(NullError::BadReserved(buf[3]));
        }
        Ok(NullPacket {
            call_id: CallId(u64::from_be_bytes(buf[4..12].try_into().unwrap())),
            token: u64::from_be_bytes(buf[12..20].try_into().unwrap()),
            keepalive: flags & FLAG_KEEPALIVE != 0,
            from_caller: flags & FLAG_FROM_CALLER != 0,
            probe: flags & FLAG_PROBE != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_exact_bytes() {
        let p = NullPacket {
            call_id: CallId(0x0102030405060708),
            token: 0x1112131415161718,
            keepalive: true,
            from_caller: false,
            probe: false,
        };
        let mut buf = [0u8; 32];
        let n = p.emit(&mut buf);
        assert_eq!(n, NULL_LEN);
        assert_eq!(&buf[..4], &[0x0E, 1, 1, 0]);
        assert_eq!(&buf[4..12], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(NullPacket::parse(&buf[..n]), Ok(p));
        let q = NullPacket { keepalive: false, from_caller: true, ..p };
        q.emit(&mut buf);
        assert_eq!(buf[2], 2);
        assert_eq!(NullPacket::parse(&buf[..n]), Ok(q));
        let r = NullPacket { probe: true, ..q };
        r.emit(&mut buf);
        assert_eq!(buf[2], 6);
        assert_eq!(NullPacket::parse(&buf[..n]), Ok(r));
    }

    #[test]
    fn malformed_null_packets_are_rejected() {
        let mut buf = [0u8; 20];
        NullPacket { call_id: CallId(1), token: 2, keepalive: false, from_caller: false, probe: false }.emit(&mut buf);
        for n in 0..20 {
            assert!(NullPacket::parse(&buf[..n]).is_err());
        }
        let mut long = buf.to_vec();
        long.push(0);
        assert_eq!(NullPacket::parse(&long), Err(NullError::BadLength(21)));
        let mut b = buf;
        b[1] = 2;
        assert_eq!(NullPacket::parse(&b), Err(NullError::BadVersion(2)));
        let mut b = buf;
        b[2] = 0x80;
        assert_eq!(NullPacket::parse(&b), Err(NullError::BadFlags(0x80)));
        let mut b = buf;
        b[3] = 1;
        assert_eq!(NullPacket::parse(&b), Err(NullError::BadReserved(1)));
        let mut b = buf;
        b[0] = 0x80;
        assert_eq!(NullPacket::parse(&b), Err(NullError::NotNull(0x80)));
    }
}
