//! RTP receiver statistics per RFC 3550: extended highest sequence number (appendix A.1),
//! cumulative loss (section 6.4.1, appendix A.3) and interarrival jitter (section 6.4.1,
//! appendix A.8).
//!
//! Units are in the names: `_rtp_ts` is RTP timestamp units (1/clock_hz s), `_us` is
//! microseconds of arrival time.

/// Statistics of one received RTP stream (one SSRC).
#[derive(Debug, Clone)]
pub struct RtpReceiverStats {
    clock_hz: u32,
    started: bool,
    base_seq: u32,
    max_seq: u16,
    cycles: u32,
    received: u64,
    duplicates: u64,
    late: u64,
    /// Previous transit time, in RTP units (arrival_rtp_ts - rtp timestamp), wrapping.
    prev_transit_rtp_ts: Option<i64>,
    /// Jitter estimate J (RFC 3550 A.8), in RTP units, kept in 1/16 units to avoid float.
    jitter_q4: u64,
}

/// A sequence jump larger than this is treated as a restart or stray packet, not as loss
/// (RFC 3550 A.1 MAX_DROPOUT).
const MAX_DROPOUT: u16 = 3000;

impl RtpReceiverStats {
    /// New statistics for a stream with the given RTP clock rate (48000 for Opus).
    pub fn new(clock_hz: u32) -> Self {
        RtpReceiverStats {
            clock_hz,
            started: false,
            base_seq: 0,
            max_seq: 0,
            cycles: 0,
            received: 0,
            duplicates: 0,
            late: 0,
            prev_transit_rtp_ts: None,
            jitter_q4: 0,
        }
    }

    /// Record one packet with sequence `seq` and timestamp `rtp_ts`, arrived at `arrival_us`
    /// (any monotonic clock, microseconds).
    pub fn on_packet(&mut self, seq: u16, rtp_ts: u32, arrival_us: u64) {
        self.received += 1;
        if !self.started {
            self.started = true;
            self.base_seq = seq as u32;
            self.max_seq = seq;
        } else {
            let delta = seq.wrapping_sub(self.max_seq);
            if delta == 0 {
                self.duplicates += 1;
            } else if delta < MAX_DROPOUT {
                if seq < self.max_seq {
                    self.cycles += 1 << 16;
                }
                self.max_seq = seq;
            } else if delta <= u16::MAX - 100 {
                // A very large jump: the source restarted its sequence space. Start over,
                // jitter included (the timestamp base restarts too). RFC 3550 A.1 waits for a
                // second sequential packet first; the streams here come from the one peer
                // the call admits, so the first packet is taken.
                *self = RtpReceiverStats::new(self.clock_hz);
                self.received = 1;
                self.started = true;
                self.base_seq = seq as u32;
                self.max_seq = seq;
                self.prev_transit_rtp_ts = None;
                let arrival_rtp_ts = (arrival_us as u128 * self.clock_hz as u128 / 1_000_000) as u64;
                self.prev_transit_rtp_ts = Some(arrival_rtp_ts as i64 - rtp_ts as i64);
                return;
            } else {
                // Behind max_seq: reordered (or a duplicate of an older packet).
                self.late += 1;
            }
        }
        // Interarrival jitter (A.8): D = (Rj - Ri) - (Sj - Si) in RTP units.
        let arrival_rtp_ts = (arrival_us as u128 * self.clock_hz as u128 / 1_000_000) as u64;
        let transit = arrival_rtp_ts as i64 - rtp_ts as i64;
        if let Some(prev) = self.prev_transit_rtp_ts {
            // Differences are taken modulo 2^32 so timestamp wrap does not look like jitter.
            let d = ((transit - prev) as i32).unsigned_abs() as u64;
            // J += (|D| - J) / 16, in 1/16 units: J16 += |D| - J16/16.
            self.jitter_q4 = self.jitter_q4 + d - (self.jitter_q4 + 8) / 16;
        }
        self.prev_transit_rtp_ts = Some(transit);
    }

    /// Packets received (including duplicates).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Extended highest sequence number received (cycles + max_seq).
    pub fn extended_max_seq(&self) -> u32 {
        self.cycles.wrapping_add(self.max_seq as u32)
    }

    /// Packets expected: extended max - base + 1 (A.3).
    pub fn expected(&self) -> u64 {
        if !self.started {
            return 0;
        }
        self.extended_max_seq().wrapping_sub(self.base_seq) as u64 + 1
    }

    /// Cumulative packets lost: expected - received, not below 0 (RFC 3550 section 6.4.1).
    /// Repeats of the highest sequence number are not counted as received; older
    /// duplicates are (as in the RFC), which can only under-count loss.
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received.saturating_sub(self.duplicates))
    }

    /// Packets that repeated the highest sequence number received so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Packets that arrived behind the highest sequence number (reordered).
    pub fn late(&self) -> u64 {
        self.late
    }

    /// Interarrival jitter in RTP timestamp units.
    pub fn jitter_rtp_ts(&self) -> f64 {
        self.jitter_q4 as f64 / 16.0
    }

    /// Interarrival jitter in milliseconds.
    pub fn jitter_ms(&self) -> f64 {
        self.jitter_rtp_ts() * 1000.0 / self.clock_hz as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_stream_has_no_loss_and_no_jitter() {
        let mut s = RtpReceiverStats::new(48_000);
        for i in 0..100u32 {
            s.on_packet(65_500u16.wrapping_add(i as u16), 1000 + i * 960, 5_000_000 + i as u64 * 20_000);
        }
        assert_eq!(s.received(), 100);
        assert_eq!(s.expected(), 100);
        assert_eq!(s.lost(), 0);
        assert!(s.jitter_ms() < 0.01, "{}", s.jitter_ms());
        assert_eq!(s.extended_max_seq(), 65_500 + 99);
    }

    #[test]
    fn gaps_count_as_loss_and_reordering_does_not() {
        let mut s = RtpReceiverStats::new(48_000);
        let order = [0u16, 1, 2, 4, 3, 6, 7, 9]; // 5 and 8 lost, 3 late
        for (k, &seq) in order.iter().enumerate() {
            s.on_packet(seq, seq as u32 * 960, k as u64 * 20_000);
        }
        assert_eq!(s.expected(), 10);
        assert_eq!(s.lost(), 2);
        assert_eq!(s.late(), 1);
        s.on_packet(9, 9 * 960, 200_000);
        assert_eq!((s.duplicates(), s.lost()), (1, 2));
    }

    #[test]
    fn jitter_converges_to_the_mean_deviation() {
        // Arrival alternates 20 ms early/late by 2 ms: |D| = 4 ms each packet after the first,
        // so J converges to 4 ms (RFC 3550: J tends to the mean |D|).
        let mut s = RtpReceiverStats::new(48_000);
        for i in 0..2000u64 {
            let wobble = if i % 2 == 0 { 0 } else { 4_000 };
            s.on_packet(i as u16, (i * 960) as u32, i * 20_000 + wobble);
        }
        assert!((s.jitter_ms() - 4.0).abs() < 0.1, "jitter {}", s.jitter_ms());
    }

    #[test]
    fn a_sequence_restart_starts_the_statistics_over() {
        let mut s = RtpReceiverStats::new(48_000);
        for _ in 0..3 {
            s.on_packet(0, 0, 0); // two duplicates
        }
        s.on_packet(10_000, 5_000_000, 20_000); // restart with a new timestamp base
        assert_eq!((s.received(), s.lost(), s.duplicates()), (1, 0, 0));
        s.on_packet(10_001, 5_000_960, 40_000);
        assert_eq!(s.lost(), 0);
        assert!(s.jitter_ms() < 0.01, "the restart must not look like jitter: {}", s.jitter_ms());
    }

    #[test]
    fn timestamp_wrap_is_not_jitter() {
        let mut s = RtpReceiverStats::new(48_000);
        let start = u32::MAX - 960 * 10;
        for i in 0..50u32 {
            s.on_packet(i as u16, start.wrapping_add(i * 960), i as u64 * 20_000);
        }
        assert!(s.jitter_ms() < 0.01, "{}", s.jitter_ms());
    }
}
