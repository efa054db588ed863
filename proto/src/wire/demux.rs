//! Datagram demultiplexing by first byte, in the style of RFC 7983 (updated by RFC 9443):
//!
//! | first byte | kind |
//! |---|---|
//! | (empty datagram) | bare null packet |
//! | 0..=3 | STUN |
//! | 0x0E | null packet (nullpunch; 4..=15 is unassigned in RFC 7983) |
//! | 128..=191 | RTP, or RTCP when the second byte is 192..=223 (RFC 5761 section 4) |
//! | anything else | unknown: dropped and counted |

use super::null::NULL_MSG_ID;

/// What a datagram is, judged by its first bytes only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatagramKind {
    /// A null packet (tagged) or a zero-length datagram (bare).
    Null,
    /// A STUN message.
    Stun,
    /// An RTP packet.
    Rtp,
    /// An RTCP packet (multiplexed with RTP on one port).
    Rtcp,
    /// Anything else.
    Unknown,
}

/// Classify a datagram. O(1), reads at most two bytes.
#[inline]
pub fn classify(buf: &[u8]) -> DatagramKind {
    match buf.first() {
        None => DatagramKind::Null,
        Some(0..=3) => DatagramKind::Stun,
        Some(&NULL_MSG_ID) => DatagramKind::Null,
        Some(128..=191) => match buf.get(1) {
            Some(192..=223) => DatagramKind::Rtcp,
            _ => DatagramKind::Rtp,
        },
        Some(_) => DatagramKind::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{frame::CallId, null::NullPacket, rtp::RtpHeader, stun};

    #[test]
    fn each_format_lands_in_its_class() {
        let mut b = [0u8; 64];
        assert_eq!(classify(&[]), DatagramKind::Null);
        let n =
            NullPacket { call_id: CallId(1), token: 1, keepalive: false, from_caller: false, probe: false, counter: 1 }
                .emit(&super::super::null::null_key(&[0; 32]), &mut b);
        assert_eq!(classify(&b[..n]), DatagramKind::Null);
        let n = stun::emit_binding_request(&[1; 12], &mut b);
        assert_eq!(classify(&b[..n]), DatagramKind::Stun);
        let n = RtpHeader { marker: false, payload_type: 111, seq: 1, timestamp: 1, ssrc: 1 }.emit(&mut b);
        assert_eq!(classify(&b[..n]), DatagramKind::Rtp);
        assert_eq!(classify(&[0x80, 200, 0, 6]), DatagramKind::Rtcp); // RTCP SR
        for first in [4u8, 15, 16, 20, 63, 64, 127, 192, 255] {
            assert_eq!(classify(&[first, 0, 0]), DatagramKind::Unknown, "first byte {first}");
        }
    }
}
