//! The null packet: a UDP datagram with an empty data payload, marked as null by its message
//! identifier, sent by the callee to the caller's public address to open the callee's own
//! firewall (the caller's firewall drops it). The same packet, with the keepalive flag,
//! keeps an idle path's conntrack entries alive.
//!
//! ```text
//!  0        1        2        3
//! +--------+--------+--------+--------+
//! | 0x0E   | ver=2  | flags  | 0      |   message id NULL, version, flags, reserved
//! +--------+--------+--------+--------+
//! |            call id (u64)          |
//! +                                   +
//! |                                   |
//! +--------+--------+--------+--------+
//! |            token (u64)            |
//! +                                   +
//! |                                   |
//! +--------+--------+--------+--------+
//! |            counter (u32)          |
//! +--------+--------+--------+--------+
//! |  MAC (16 bytes): HMAC-SHA256 under |
//! |  the call's null key over bytes    |
//! |  0..24, truncated                  |
//! +--------+--------+--------+--------+
//!  (no data payload)
//! ```
//! The counter and MAC (version 2) authenticate the packet: the key is derived from the
//! call's end-to-end secret ([`crate::e2e`]), which the manager never learns, so only the
//! peer can make a null packet that opens the path or teaches an address, and a replayed one
//! (a counter already seen) is refused.
//! flags: bit 0 = keepalive (0 = punch), bit 1 = sent by the caller, bit 2 = a birthday
//! search's probe (or the hard side's punch; see `docs/protocol.md` section 5.5).
//! The first byte 0x0E lies in the range RFC 7983 leaves unassigned (4..=15), so it can
//! never be mistaken for STUN, DTLS, TURN, QUIC or RTP. A zero-length datagram is a bare
//! null packet: it proves nothing about its sender, so the client counts and drops it.

use super::frame::CallId;

/// The message identifier that marks a datagram as a null packet.
pub const NULL_MSG_ID: u8 = 0x0E;
/// Version of the null packet layout (2: with counter and MAC).
pub const NULL_VERSION: u8 = 2;
/// Size of an encoded null packet.
pub const NULL_LEN: usize = 40;
/// Bytes covered by the MAC (everything before it).
pub const NULL_MAC_START: usize = 24;
/// Length of the truncated MAC.
pub const NULL_MAC_LEN: usize = 16;

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
    /// The sender's null packet counter for this call (from 1, one per packet), so a
    /// replayed packet is recognised.
    pub counter: u32,
}

/// The key of a call's null packet MACs (HMAC-SHA256).
pub type NullKey = aws_lc_rs::hmac::Key;

/// A null packet key from its 32 bytes.
pub fn null_key(bytes: &[u8; 32]) -> NullKey {
    aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, bytes)
}

/// The MAC of the null packet in `buf[..NULL_MAC_START]` under `key`.
pub fn null_mac(key: &aws_lc_rs::hmac::Key, buf: &[u8]) -> [u8; NULL_MAC_LEN] {
    let tag = aws_lc_rs::hmac::sign(key, &buf[..NULL_MAC_START]);
    let mut out = [0u8; NULL_MAC_LEN];
    out.copy_from_slice(&tag.as_ref()[..NULL_MAC_LEN]);
    out
}

/// Whether the null packet `buf` (already parsed, [`NULL_LEN`] bytes) carries a valid MAC
/// under `key`. Constant time in the MAC's bytes.
pub fn null_mac_ok(key: &aws_lc_rs::hmac::Key, buf: &[u8]) -> bool {
    buf.len() == NULL_LEN
        && aws_lc_rs::constant_time::verify_slices_are_equal(&null_mac(key, buf), &buf[NULL_MAC_START..NULL_LEN])
            .is_ok()
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
    /// Write the packet into `buf` (at least [`NULL_LEN`] bytes) with its MAC under `key`;
    /// returns its length.
    pub fn emit(&self, key: &aws_lc_rs::hmac::Key, buf: &mut [u8]) -> usize {
        let flags = (self.keepalive as u8 * FLAG_KEEPALIVE)
            | (self.from_caller as u8 * FLAG_FROM_CALLER)
            | (self.probe as u8 * FLAG_PROBE);
        buf[..4].copy_from_slice(&[NULL_MSG_ID, NULL_VERSION, flags, 0]);
        buf[4..12].copy_from_slice(&self.call_id.0.to_be_bytes());
        buf[12..20].copy_from_slice(&self.token.to_be_bytes());
        buf[20..24].copy_from_slice(&self.counter.to_be_bytes());
        let mac = null_mac(key, buf);
        buf[NULL_MAC_START..NULL_LEN].copy_from_slice(&mac);
        NULL_LEN
    }

    /// Parse a tagged null packet (its MAC is checked by [`null_mac_ok`] once the call, and
    /// so the key, is known). A zero-length datagram is a bare null packet; the
    /// demultiplexer reports it without calling this.
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
            counter: u32::from_be_bytes(buf[20..24].try_into().unwrap()),
        })
    }
}

/// A replay window over null packet counters (the last 64, as RFC 3711 section 3.3.2 does
/// for SRTP): a counter is accepted once, and only if it is newer than 64 before the highest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterWindow {
    highest: u32,
    seen: u64,
}

impl CounterWindow {
    /// Whether `ctr` is fresh (not seen, not too old). Does not record it: call
    /// [`CounterWindow::accept`] once the packet is authenticated.
    pub fn fresh(&self, ctr: u32) -> bool {
        if ctr == 0 {
            return false;
        }
        if ctr > self.highest {
            return true;
        }
        let back = self.highest - ctr;
        back < 64 && self.seen & (1u64 << back) == 0
    }

    /// Record `ctr` as seen (after [`CounterWindow::fresh`] and the MAC check).
    pub fn accept(&mut self, ctr: u32) {
        if ctr > self.highest {
            let shift = ctr - self.highest;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = ctr;
        } else {
            let back = self.highest - ctr;
            if back < 64 {
                self.seen |= 1u64 << back;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> aws_lc_rs::hmac::Key {
        aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &[b; 32])
    }

    #[test]
    fn round_trip_and_exact_bytes() {
        let p = NullPacket {
            call_id: CallId(0x0102030405060708),
            token: 0x1112131415161718,
            keepalive: true,
            from_caller: false,
            probe: false,
            counter: 0x21222324,
        };
        let mut buf = [0u8; 48];
        let n = p.emit(&key(1), &mut buf);
        assert_eq!(n, NULL_LEN);
        assert_eq!(&buf[..4], &[0x0E, 2, 1, 0]);
        assert_eq!(&buf[4..12], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&buf[20..24], &[0x21, 0x22, 0x23, 0x24]);
        assert_eq!(NullPacket::parse(&buf[..n]), Ok(p));
        assert!(null_mac_ok(&key(1), &buf[..n]));
        let q = NullPacket { keepalive: false, from_caller: true, ..p };
        q.emit(&key(1), &mut buf);
        assert_eq!(buf[2], 2);
        assert_eq!(NullPacket::parse(&buf[..n]), Ok(q));
        let r = NullPacket { probe: true, ..q };
        r.emit(&key(1), &mut buf);
        assert_eq!(buf[2], 6);
        assert_eq!(NullPacket::parse(&buf[..n]), Ok(r));
    }

    #[test]
    fn the_mac_covers_every_field_and_needs_the_key() {
        let p =
            NullPacket { call_id: CallId(7), token: 9, keepalive: false, from_caller: true, probe: false, counter: 1 };
        let mut buf = [0u8; NULL_LEN];
        p.emit(&key(1), &mut buf);
        assert!(null_mac_ok(&key(1), &buf));
        assert!(!null_mac_ok(&key(2), &buf), "another call's key");
        for i in 0..NULL_LEN {
            let mut b = buf;
            b[i] ^= 0x40;
            assert!(!null_mac_ok(&key(1), &b), "byte {i} flipped");
        }
        assert!(!null_mac_ok(&key(1), &buf[..NULL_LEN - 1]));
    }

    #[test]
    fn counter_window_accepts_each_counter_once() {
        let mut w = CounterWindow::default();
        assert!(!w.fresh(0), "0 is never sent");
        for c in [1, 2, 5, 3] {
            assert!(w.fresh(c));
            w.accept(c);
            assert!(!w.fresh(c), "{c} replayed");
        }
        assert!(w.fresh(4), "a late one inside the window");
        w.accept(200);
        assert!(!w.fresh(136), "older than 64 before the highest");
        assert!(w.fresh(137));
        assert!(!w.fresh(200));
        w.accept(u32::MAX);
        assert!(!w.fresh(u32::MAX));
    }

    #[test]
    fn malformed_null_packets_are_rejected() {
        let mut buf = [0u8; NULL_LEN];
        NullPacket { call_id: CallId(1), token: 2, keepalive: false, from_caller: false, probe: false, counter: 1 }
            .emit(&key(1), &mut buf);
        for n in 0..NULL_LEN {
            assert!(NullPacket::parse(&buf[..n]).is_err());
        }
        let mut long = buf.to_vec();
        long.push(0);
        assert_eq!(NullPacket::parse(&long), Err(NullError::BadLength(NULL_LEN + 1)));
        let mut b = buf;
        b[1] = 1;
        assert_eq!(NullPacket::parse(&b), Err(NullError::BadVersion(1)));
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
