//! RTP fixed header (RFC 3550 section 5.1): parse and emit.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! |V=2|P|X|  CC   |M|     PT      |       sequence number         |
//! |                           timestamp                           |
//! |           synchronization source (SSRC) identifier            |
//! ```

/// Size of the fixed RTP header.
pub const HEADER_LEN: usize = 12;
/// Dynamic payload type used for Opus media (RFC 7587 uses a dynamic type).
pub const OPUS_PAYLOAD_TYPE: u8 = 111;
/// Opus RTP clock rate (RFC 7587 section 4.1): always 48 kHz.
pub const OPUS_CLOCK_HZ: u32 = 48_000;

/// Errors parsing RTP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RtpError {
    /// Shorter than the header plus CSRC list and extension it declares.
    #[error("rtp packet truncated")]
    Truncated,
    /// Version field is not 2.
    #[error("rtp version {0} unsupported")]
    BadVersion(u8),
    /// The padding count is zero or larger than the payload.
    #[error("rtp padding invalid")]
    BadPadding,
}

/// An RTP header (the fields nullpunch uses; CSRCs and extensions are skipped on parse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    /// Marker bit.
    pub marker: bool,
    /// Payload type (7 bits).
    pub payload_type: u8,
    /// Sequence number.
    pub seq: u16,
    /// Timestamp in RTP clock units (`_rtp_ts`).
    pub timestamp: u32,
    /// Synchronization source.
    pub ssrc: u32,
}

impl RtpHeader {
    /// Write the 12-byte fixed header (V=2, no padding, extension or CSRC) into `buf`.
    #[inline]
    pub fn emit(&self, buf: &mut [u8]) -> usize {
        buf[0] = 0x80;
        buf[1] = (self.marker as u8) << 7 | (self.payload_type & 0x7F);
        buf[2..4].copy_from_slice(&self.seq.to_be_bytes());
        buf[4..8].copy_from_slice(&self.timestamp.to_be_bytes());
        buf[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        HEADER_LEN
    }

    /// Parse a packet; returns the header and the payload slice (after CSRCs, the header
    /// extension, and without padding).
    pub fn parse(buf: &[u8]) -> Result<(RtpHeader, &[u8]), RtpError> {
        if buf.len() < HEADER_LEN {
            return Err(RtpError::Truncated);
        }
        let v = buf[0] >> 6;
        if v != 2 {
            return Err(RtpError::BadVersion(v));
        }
        let padding = buf[0] & 0x20 != 0;
        let extension = buf[0] & 0x10 != 0;
        let cc = (buf[0] & 0x0F) as usize;
        let mut off = HEADER_LEN + 4 * cc;
        if buf.len() < off {
            return Err(RtpError::Truncated);
        }
        if extension {
            if buf.len() < off + 4 {
                return Err(RtpError::Truncated);
            }
            let words = u16::from_be_bytes([buf[off + 2], buf[off + 3]]) as usize;
            off += 4 + 4 * words;
            if buf.len() < off {
                return Err(RtpError::Truncated);
            }
        }
        let mut end = buf.len();
        if padding {
            let p = buf[end - 1] as usize;
            if p == 0 || p > end - off {
                return Err(RtpError::BadPadding);
            }
            end -= p;
        }
        let h = RtpHeader {
            marker: buf[1] & 0x80 != 0,
            payload_type: buf[1] & 0x7F,
            seq: u16::from_be_bytes([buf[2], buf[3]]),
            timestamp: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            ssrc: u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
        };
        Ok((h, &buf[off..end]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = RtpHeader { marker: true, payload_type: 111, seq: 65535, timestamp: 0xDEADBEEF, ssrc: 7 };
        let mut buf = [0u8; 172];
        let n = h.emit(&mut buf);
        assert_eq!(n, 12);
        assert_eq!(buf[0], 0x80);
        assert_eq!(buf[1], 0x80 | 111);
        let (g, payload) = RtpHeader::parse(&buf).unwrap();
        assert_eq!(g, h);
        assert_eq!(payload.len(), 160);
    }

    #[test]
    fn csrc_extension_and_padding_are_skipped() {
        let mut p = vec![0x80 | 0x20 | 0x10 | 2, 96, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
        p.extend_from_slice(&[1, 1, 1, 1, 2, 2, 2, 2]); // two CSRCs
        p.extend_from_slice(&[0xBE, 0xDE, 0, 1, 9, 9, 9, 9]); // one-word extension
        p.extend_from_slice(b"hello");
        p.extend_from_slice(&[0, 0, 3]); // 3 bytes padding
        let (h, payload) = RtpHeader::parse(&p).unwrap();
        assert_eq!((h.seq, h.timestamp, h.ssrc, h.payload_type), (1, 2, 3, 96));
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn malformed_rtp_is_rejected() {
        assert_eq!(RtpHeader::parse(&[0x80; 11]), Err(RtpError::Truncated));
        assert_eq!(RtpHeader::parse(&[0x40; 12]), Err(RtpError::BadVersion(1)));
        let mut p = [0u8; 12];
        p[0] = 0x80 | 3; // 3 CSRCs declared, none present
        assert_eq!(RtpHeader::parse(&p), Err(RtpError::Truncated));
        p[0] = 0x90; // extension declared, none present
        assert_eq!(RtpHeader::parse(&p), Err(RtpError::Truncated));
        let mut p = [0u8; 14];
        p[0] = 0xA0;
        p[13] = 0; // zero padding count
        assert_eq!(RtpHeader::parse(&p), Err(RtpError::BadPadding));
        p[13] = 9; // more padding than payload
        assert_eq!(RtpHeader::parse(&p), Err(RtpError::BadPadding));
    }
}
