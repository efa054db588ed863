//! Media sources: what a call sends. The engine is payload-agnostic; a source fills one
//! frame's payload and says how much RTP time it covers.

/// Payload bytes of a 20 ms Opus voice frame at about 64 kbit/s: with the 12-byte RTP header
/// a 172-byte packet, the size the benchmarks use.
pub const OPUS_20MS_PAYLOAD: usize = 160;

/// A pluggable source of media frames (synthetic now; Opus audio and forwarded RTP later).
pub trait MediaSource {
    /// Frame interval in milliseconds (the packet rate is 1000 / this).
    fn frame_ms(&self) -> u32;
    /// Write the next frame's payload into `out`; returns (payload length, duration of the
    /// frame in RTP timestamp units).
    fn next_frame(&mut self, out: &mut [u8]) -> (usize, u32);
}

/// A generated stream: payloads of a fixed size (default: a 20 ms Opus frame), each starting
/// with a frame counter (u64) and the sender's timestamp in microseconds (u64) from a clock
/// the caller supplies, so a receiver in the same process can measure one-way latency.
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    frame_ms: u32,
    payload_len: usize,
    clock_hz: u32,
    counter: u64,
    /// Timestamp (microseconds) to stamp into the next frame; set by the caller before each
    /// `next_frame` when latency is measured.
    pub stamp_us: u64,
}

impl SyntheticSource {
    /// A 50 packets/s stream of 160-byte payloads at a 48 kHz RTP clock.
    pub fn opus_like() -> Self {
        Self::new(20, OPUS_20MS_PAYLOAD, 48_000)
    }

    /// A stream of `payload_len`-byte frames every `frame_ms`, RTP clock `clock_hz`.
    pub fn new(frame_ms: u32, payload_len: usize, clock_hz: u32) -> Self {
        SyntheticSource { frame_ms, payload_len: payload_len.max(16), clock_hz, counter: 0, stamp_us: 0 }
    }

    /// Read back (frame counter, send timestamp in microseconds) from a received payload.
    pub fn parse(payload: &[u8]) -> Option<(u64, u64)> {
        if payload.len() < 16 {
            return None;
        }
        Some((u64::from_be_bytes(payload[..8].try_into().ok()?), u64::from_be_bytes(payload[8..16].try_into().ok()?)))
    }
}

impl MediaSource for SyntheticSource {
    fn frame_ms(&self) -> u32 {
        self.frame_ms
    }

    fn next_frame(&mut self, out: &mut [u8]) -> (usize, u32) {
        let n = self.payload_len.min(out.len());
        out[..8].copy_from_slice(&self.counter.to_be_bytes());
        out[8..16].copy_from_slice(&self.stamp_us.to_be_bytes());
        // A recognisable filler, cheap to write.
        for (i, b) in out[16..n].iter_mut().enumerate() {
            *b = (self.counter as u8).wrapping_add(i as u8);
        }
        self.counter += 1;
        (n, self.clock_hz / 1000 * self.frame_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_frames_carry_counter_and_stamp() {
        let mut s = SyntheticSource::opus_like();
        let mut buf = [0u8; 256];
        s.stamp_us = 1234;
        let (n, dur) = s.next_frame(&mut buf);
        assert_eq!((n, dur), (160, 960));
        assert_eq!(SyntheticSource::parse(&buf[..n]), Some((0, 1234)));
        let (n, _) = s.next_frame(&mut buf);
        assert_eq!(SyntheticSource::parse(&buf[..n]).unwrap().0, 1);
    }
}
