//! An adaptive jitter buffer for one received RTP stream of fixed-duration frames.
//!
//! ## Model
//! The receiver plays one frame per *tick*; ticks come at a fixed cadence (the output
//! device's clock), the first one [`JitterConfig::min_delay_us`] plus a margin after the
//! first packet arrived. Each tick plays the next packet in sequence order. A packet is
//! *on time* if it arrived before its tick; one that arrives after is *late* and dropped
//! (its slot was concealed), exactly as a real device that cannot wait would have to.
//!
//! Every arrival gives a *transit* (arrival time minus the packet's RTP time). Over the
//! last [`JitterConfig::window`] arrivals, the smallest transit is the path's *base*, and the
//! spread of the others above it is the jitter that the buffer has to absorb. The *target
//! delay* D is the 95th percentile of that spread plus [`JitterConfig::margin_us`], floored
//! at [`JitterConfig::min_delay_us`] and capped at [`JitterConfig::max_delay_us`].
//! The *current delay* C is how long after base arrival a packet is played; a packet is on
//! time exactly when its own spread is at most C.
//!
//! C moves in whole frames:
//! * **expand**: a tick finds its packet missing and nothing later buffered (it is late,
//!   not lost) while C < D: the tick plays a concealment frame and the packet keeps its
//!   place, so everything from then on plays one frame later (C += one frame);
//! * **accelerate**: C >= D + one frame, no expand for a while, and the packet after the
//!   next is buffered too: the next packet is dropped (C -= one frame).
//!
//! So in a steady state D <= C < D + one frame. A tick whose packet is missing while later
//! ones are buffered conceals a *loss*; if the packet turns up afterwards it is counted
//! *late* instead of lost. After [`JitterConfig::idle_after`] ticks with nothing to play
//! (the sender paused, or the call ended) the buffer goes *idle*: ticks give silence and
//! count nothing, and the next packet starts the playout afresh.
//!
//! Times are microseconds on the caller's monotonic clock; nothing here reads a clock.

use std::collections::{BTreeMap, VecDeque};

/// Tuning of a [`JitterBuffer`].
#[derive(Debug, Clone)]
pub struct JitterConfig {
    /// Duration of one frame (the tick period), milliseconds.
    pub frame_ms: u32,
    /// RTP clock rate (48 kHz for Opus).
    pub clock_hz: u32,
    /// Smallest target delay (µs above base arrival).
    pub min_delay_us: u64,
    /// Largest target delay.
    pub max_delay_us: u64,
    /// Added to the measured 95th-percentile spread.
    pub margin_us: u64,
    /// Arrivals over which base and spread are measured.
    pub window: usize,
    /// Packets held at most; beyond that the newest arrivals are dropped and counted.
    pub capacity: usize,
    /// Ticks in a row with nothing buffered before the buffer goes idle.
    pub idle_after: u32,
    /// Ticks after an expand before an accelerate is allowed.
    pub calm_ticks: u32,
}

impl JitterConfig {
    /// Defaults for `frame_ms` frames: minimum delay 5 ms, margin 2 ms, maximum 300 ms, the
    /// spread measured over the last 2 seconds of arrivals (at least 50), idle after 1 s.
    pub fn new(frame_ms: u32) -> JitterConfig {
        let per_s = (1000 / frame_ms.max(1)).max(1);
        JitterConfig {
            frame_ms,
            clock_hz: 48_000,
            min_delay_us: 5_000,
            max_delay_us: 300_000,
            margin_us: 2_000,
            window: (2 * per_s as usize).max(50),
            capacity: 512,
            idle_after: per_s,
            calm_ticks: per_s,
        }
    }
}

/// What a tick plays.
#[derive(Debug, PartialEq, Eq)]
pub enum Playout {
    /// This packet's payload.
    Packet(Vec<u8>),
    /// Synthesize a frame: the packet is missing (lost, or late and the delay grows).
    Conceal(Conceal),
    /// Nothing is playing (before the first packet, or idle): silence.
    Silence,
}

/// Why a tick conceals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conceal {
    /// The packet is missing and later ones are here: taken as lost.
    Loss,
    /// Nothing is buffered and the delay is below target: wait one frame for it.
    Expand,
}

/// Counters and current state of a [`JitterBuffer`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct JitterStats {
    /// Packets accepted into the buffer.
    pub received: u64,
    /// Frames played from packets.
    pub played: u64,
    /// Frames concealed (`lost` slots plus `expands` plus slots whose packet came late).
    pub concealed: u64,
    /// Slots concealed whose packet never came (before the newest packet received).
    pub lost: u64,
    /// Packets that arrived after their tick (dropped).
    pub late: u64,
    /// Packets received twice.
    pub duplicates: u64,
    /// Frame-sized delay increases.
    pub expands: u64,
    /// Frame-sized delay decreases (a packet dropped to catch up).
    pub accelerates: u64,
    /// Packets dropped because the buffer was full.
    pub overflow: u64,
    /// Times the stream restarted (sequence or timestamp jump, or after idle).
    pub restarts: u64,
    /// Current delay above base arrival, µs (while idle: when the playout stopped).
    pub delay_us: u64,
    /// Target delay, µs.
    pub target_us: u64,
    /// Packets buffered now.
    pub buffered: usize,
}

#[derive(Debug)]
struct Slot {
    arrival_us: u64,
    /// RTP time in µs relative to the stream's first packet.
    ts_us: i64,
    payload: Vec<u8>,
}

/// The buffer. See the module documentation.
#[derive(Debug)]
pub struct JitterBuffer {
    cfg: JitterConfig,
    frame_us: u64,
    slots: BTreeMap<i64, Slot>,
    /// Highest extended sequence number seen, and its raw value.
    highest: Option<(i64, u16)>,
    /// Extended RTP timestamp of the first packet and the last raw value (for unwrapping).
    ts_origin: Option<(i64, u32, i64)>,
    /// Next slot to play and the RTP time (µs) it is expected to carry.
    next: Option<(i64, i64)>,
    /// Tick time of the next slot.
    next_tick_us: Option<u64>,
    /// Tick time minus RTP time, µs: where in time the stream is played.
    play_offset: i64,
    transits: VecDeque<i64>,
    empty_ticks: u32,
    since_expand: u32,
    /// Recently concealed slots (a packet for one of them is late, not a duplicate).
    concealed_slots: VecDeque<i64>,
    /// Recently played slots (a packet for one of them is a duplicate).
    played_slots: VecDeque<i64>,
    /// Concealed and expanded ticks of the current run with nothing buffered.
    run: (u64, u64),
    /// Slots concealed for good whose packet never came and that lie before a packet that
    /// did (so they were lost, not just after the end of the stream).
    lost_committed: u64,
    target_us: u64,
    /// The delay when the playout last stopped (reported while idle).
    last_delay_us: u64,
    stats: JitterStats,
}

impl JitterBuffer {
    /// An empty buffer.
    pub fn new(cfg: JitterConfig) -> JitterBuffer {
        let frame_us = cfg.frame_ms as u64 * 1000;
        let target_us = cfg.min_delay_us.max(cfg.margin_us);
        JitterBuffer {
            cfg,
            frame_us,
            slots: BTreeMap::new(),
            highest: None,
            ts_origin: None,
            next: None,
            next_tick_us: None,
            play_offset: 0,
            transits: VecDeque::new(),
            empty_ticks: 0,
            since_expand: u32::MAX,
            concealed_slots: VecDeque::new(),
            played_slots: VecDeque::new(),
            run: (0, 0),
            lost_committed: 0,
            target_us,
            last_delay_us: 0,
            stats: JitterStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &JitterConfig {
        &self.cfg
    }

    /// When the next tick is due (none before the first packet or while idle).
    pub fn next_tick(&self) -> Option<u64> {
        self.next_tick_us
    }

    /// Counters and state.
    pub fn stats(&self) -> JitterStats {
        let mut s = self.stats.clone();
        s.target_us = self.target_us;
        s.delay_us = if self.next_tick_us.is_some() { self.current_delay().max(0) as u64 } else { self.last_delay_us };
        s.buffered = self.slots.len();
        s.lost = self.lost_committed + self.pending_lost();
        s
    }

    /// Concealed slots still unresolved that lie before the highest packet seen.
    fn pending_lost(&self) -> u64 {
        let h = self.highest.map_or(i64::MIN, |(h, _)| h);
        self.concealed_slots.iter().filter(|&&s| s < h).count() as u64
    }

    fn base(&self) -> i64 {
        self.transits.iter().copied().min().unwrap_or(0)
    }

    fn current_delay(&self) -> i64 {
        if self.next_tick_us.is_none() {
            return 0;
        }
        self.play_offset - self.base()
    }

    fn restart(&mut self) {
        self.lost_committed += self.pending_lost();
        self.played_slots.clear();
        self.highest = None;
        self.ts_origin = None;
        self.stop_playout();
    }

    /// Stop playing until the next packet: ticks stop, what is buffered is dropped.
    fn stop_playout(&mut self) {
        self.last_delay_us = self.current_delay().max(0) as u64;
        self.slots.clear();
        self.next = None;
        self.next_tick_us = None;
        self.transits.clear();
        self.concealed_slots.clear();
        self.empty_ticks = 0;
        self.stats.restarts += 1;
    }

    /// A packet arrived at `arrival_us`.
    pub fn push(&mut self, seq: u16, ts: u32, arrival_us: u64, payload: &[u8]) {
        // Extend the sequence number around the highest seen; a jump of more than 3000
        // packets either way is a new stream (a restarted sender).
        let ext = match self.highest {
            None => seq as i64,
            Some((h, raw)) => {
                let d = seq.wrapping_sub(raw) as i16 as i64;
                if d.abs() > 3000 {
                    self.restart();
                    seq as i64
                } else {
                    h + d
                }
            }
        };
        // Extend the timestamp likewise (relative to the first packet).
        let ts_rel = match self.ts_origin {
            None => {
                self.ts_origin = Some((0, ts, 0));
                0
            }
            Some((_, last_raw, last_rel)) => {
                let d = ts.wrapping_sub(last_raw) as i32 as i64;
                last_rel + d
            }
        };
        if ext > self.highest.map_or(i64::MIN, |(h, _)| h) {
            self.highest = Some((ext, seq));
            self.ts_origin = Some((0, ts, ts_rel));
        }
        let ts_us = ts_rel * 1_000_000 / self.cfg.clock_hz as i64;

        if let Some((next, _)) = self.next {
            if ext < next {
                // Its slot has passed: played already (a duplicate), or concealed (late).
                if self.played_slots.contains(&ext) {
                    self.stats.duplicates += 1;
                } else {
                    if let Some(i) = self.concealed_slots.iter().position(|&s| s == ext) {
                        self.concealed_slots.remove(i);
                    }
                    self.stats.late += 1;
                    self.record_transit(arrival_us as i64 - ts_us);
                }
                return;
            }
        }
        if self.slots.contains_key(&ext) {
            self.stats.duplicates += 1;
            return;
        }
        if self.slots.len() >= self.cfg.capacity {
            self.stats.overflow += 1;
            return;
        }
        self.record_transit(arrival_us as i64 - ts_us);
        self.slots.insert(ext, Slot { arrival_us, ts_us, payload: payload.to_vec() });
        self.stats.received += 1;
        if self.next.is_none() {
            // The first packet (or the first after idle) starts the playout.
            self.next = Some((ext, ts_us));
            let start = arrival_us + self.target_us;
            self.next_tick_us = Some(start);
            self.play_offset = start as i64 - ts_us;
            self.empty_ticks = 0;
        }
    }

    fn record_transit(&mut self, transit: i64) {
        self.transits.push_back(transit);
        while self.transits.len() > self.cfg.window {
            self.transits.pop_front();
        }
        let base = self.base();
        let mut spread: Vec<i64> = self.transits.iter().map(|t| t - base).collect();
        spread.sort_unstable();
        let p95 = spread[(spread.len() * 95 / 100).min(spread.len() - 1)].max(0) as u64;
        self.target_us = (p95 + self.cfg.margin_us).clamp(self.cfg.min_delay_us, self.cfg.max_delay_us);
    }

    /// Play the tick due at [`JitterBuffer::next_tick`] (call when the clock has reached it;
    /// a packet that arrived after that tick time is late even if it is already here).
    pub fn pop(&mut self) -> Playout {
        let (Some(tick), Some((slot, slot_ts))) = (self.next_tick_us, self.next) else {
            return Playout::Silence;
        };
        self.next_tick_us = Some(tick + self.frame_us);
        self.since_expand = self.since_expand.saturating_add(1);
        let delay = self.current_delay();
        let available = |s: &Slot| s.arrival_us <= tick;

        // Packets for this slot or earlier that came after this tick are late: a device
        // could not have played them. Those for this slot get concealed below.
        if let Some(s) = self.slots.get(&slot) {
            if available(s) {
                let next_ready = self.slots.get(&(slot + 1)).is_some_and(available);
                if delay >= (self.target_us + self.frame_us) as i64
                    && next_ready
                    && self.since_expand > self.cfg.calm_ticks
                {
                    // Accelerate: drop this packet and play the next one now.
                    self.slots.remove(&slot);
                    self.stats.accelerates += 1;
                    self.play_offset -= self.frame_us as i64;
                    let s = self.slots.remove(&(slot + 1)).expect("checked");
                    self.mark_played(slot);
                    self.mark_played(slot + 1);
                    self.advance(slot + 2, s.ts_us + self.frame_us as i64);
                    self.stats.played += 1;
                    self.empty_ticks = 0;
                    self.run = (0, 0);
                    return Playout::Packet(s.payload);
                }
                let s = self.slots.remove(&slot).expect("checked");
                self.mark_played(slot);
                self.advance(slot + 1, s.ts_us + self.frame_us as i64);
                self.stats.played += 1;
                self.empty_ticks = 0;
                self.run = (0, 0);
                return Playout::Packet(s.payload);
            }
        }
        // Missing (or not yet arrived at its tick).
        if self.slots.is_empty() {
            self.empty_ticks += 1;
            if self.empty_ticks > self.cfg.idle_after {
                // Nothing for a while: the sender paused or stopped. What this empty run
                // concealed was not playout; start over on the next packet.
                self.stats.concealed -= self.run.0;
                self.stats.expands -= self.run.1;
                self.run = (0, 0);
                self.lost_committed += self.pending_lost();
                self.stop_playout();
                return Playout::Silence;
            }
        } else {
            self.empty_ticks = 0;
            self.run = (0, 0);
        }
        self.stats.concealed += 1;
        self.run.0 += 1;
        if delay < self.target_us as i64 {
            // Below target: take it as late rather than lost and wait a frame for it.
            self.stats.expands += 1;
            self.run.1 += 1;
            self.since_expand = 0;
            self.play_offset += self.frame_us as i64;
            return Playout::Conceal(Conceal::Expand);
        }
        if self.slots.remove(&slot).is_some() {
            // It is here but came after its tick.
            self.stats.late += 1;
        } else {
            self.concealed_slots.push_back(slot);
            if self.concealed_slots.len() > 256 {
                let s = self.concealed_slots.pop_front().expect("non-empty");
                if self.highest.is_some_and(|(h, _)| s < h) {
                    self.lost_committed += 1;
                }
            }
        }
        self.advance(slot + 1, slot_ts + self.frame_us as i64);
        Playout::Conceal(Conceal::Loss)
    }

    fn mark_played(&mut self, slot: i64) {
        self.played_slots.push_back(slot);
        if self.played_slots.len() > 256 {
            self.played_slots.pop_front();
        }
    }

    fn advance(&mut self, slot: i64, ts_us: i64) {
        self.next = Some((slot, ts_us));
        // Anything older than the next slot that is still buffered can never play.
        while let Some((&k, _)) = self.slots.first_key_value() {
            if k >= slot {
                break;
            }
            self.slots.remove(&k);
            self.stats.late += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u64 = 20_000;

    /// Feeds packets of a 20 ms stream with the given network delays (µs; None = lost) and
    /// runs the ticks in time order, as a driver would. Returns the playout.
    fn run(cfg: JitterConfig, delays: &[Option<u64>]) -> (JitterBuffer, Vec<Playout>) {
        let mut jb = JitterBuffer::new(cfg);
        let mut arrivals: Vec<(u64, u16)> =
            delays.iter().enumerate().filter_map(|(i, d)| d.map(|d| (i as u64 * F + F + d, i as u16))).collect();
        arrivals.sort();
        let end = delays.len() as u64 * F + 1_500_000;
        let mut out = Vec::new();
        let mut ai = 0;
        let mut now = 0;
        while now < end {
            // Next event: an arrival or a tick, whichever is first (arrivals first on ties).
            let next_arrival = arrivals.get(ai).map(|a| a.0);
            let next_tick = jb.next_tick();
            let arrival_first = match (next_arrival, next_tick) {
                (Some(a), Some(t)) => a <= t,
                (Some(_), None) => true,
                _ => false,
            };
            match (next_arrival, next_tick) {
                (Some(a), _) if arrival_first => {
                    now = a;
                    let seq = arrivals[ai].1;
                    jb.push(seq.wrapping_add(65_000), (seq as u32) * 960, a, &[seq as u8]);
                    ai += 1;
                }
                (_, Some(t)) => {
                    now = t;
                    out.push(jb.pop());
                }
                _ => break,
            }
        }
        (jb, out)
    }

    fn played(out: &[Playout]) -> Vec<u8> {
        out.iter()
            .filter_map(|p| match p {
                Playout::Packet(v) => Some(v[0]),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn steady_path_plays_everything_at_the_minimum_delay() {
        let delays: Vec<_> = (0..200).map(|_| Some(300)).collect();
        let (jb, out) = run(JitterConfig::new(20), &delays);
        let s = jb.stats();
        assert_eq!(s.played, 200);
        assert_eq!((s.lost, s.late, s.concealed, s.expands, s.accelerates), (0, 0, 0, 0, 0));
        assert_eq!(s.target_us, 5_000, "the floor: no spread measured");
        assert_eq!(played(&out), (0..200).map(|i| i as u8).collect::<Vec<_>>());
        // Then the stream stops: the buffer goes idle and counts nothing more.
        assert!(matches!(out.last(), Some(Playout::Silence)));
        assert_eq!(jb.next_tick(), None);
    }

    #[test]
    fn sequence_numbers_wrap() {
        // The run helper starts at 65000, so 200 packets cross 65535 -> 0.
        let delays: Vec<_> = (0..700).map(|_| Some(100)).collect();
        let (jb, _) = run(JitterConfig::new(20), &delays);
        assert_eq!(jb.stats().played, 700);
        assert_eq!(jb.stats().restarts, 1, "only the idle at the end");
    }

    #[test]
    fn a_lost_packet_is_concealed_once_and_counted_lost() {
        let mut delays: Vec<_> = (0..100).map(|_| Some(300)).collect();
        delays[40] = None;
        delays[41] = None;
        delays[70] = None;
        let (jb, out) = run(JitterConfig::new(20), &delays);
        let s = jb.stats();
        assert_eq!(s.played, 97);
        assert_eq!(s.lost, 3);
        assert_eq!(s.late, 0);
        // Each loss is concealed once; the concealment after the stream's end is not
        // counted (the buffer went idle).
        assert_eq!(s.concealed, 3);
        let conceals = out[..100].iter().filter(|p| matches!(p, Playout::Conceal(Conceal::Loss))).count();
        assert_eq!(conceals, 3);
    }

    #[test]
    fn reordering_within_the_delay_is_played_in_order() {
        // Packet 10 takes 4 ms longer than 11 (still within min delay 5 ms + margin).
        let mut delays: Vec<_> = (0..50).map(|_| Some(500)).collect();
        delays[10] = Some(4_400);
        let (jb, out) = run(JitterConfig::new(20), &delays);
        assert_eq!(played(&out), (0..50).map(|i| i as u8).collect::<Vec<_>>());
        assert_eq!(jb.stats().late, 0);
    }

    #[test]
    fn jitter_raises_the_target_and_late_packets_stop() {
        // Every 5th packet is 30 ms late: the target grows past 30 ms, the current delay
        // follows by expands, and after that nothing is late any more.
        let delays: Vec<_> = (0..400).map(|i| Some(if i % 5 == 0 { 30_500 } else { 500 })).collect();
        let (jb, out) = run(JitterConfig::new(20), &delays);
        let s = jb.stats();
        assert!(s.target_us >= 30_000, "{s:?}");
        assert!(s.expands >= 1 && s.expands <= 3, "{s:?}");
        // Late only while the delay was still growing (first few seconds).
        assert!(s.late <= 5, "{s:?}");
        let tail: Vec<_> = out[200..380].iter().filter(|p| !matches!(p, Playout::Packet(_))).collect();
        assert!(tail.is_empty(), "{tail:?}");
        assert_eq!(s.lost, 0, "every packet arrived: none may count as lost ({s:?})");
    }

    #[test]
    fn calm_after_jitter_brings_the_delay_back_down() {
        // 2 s of bursty jitter, then 8 s calm: the delay must come back under 2 frames.
        let delays: Vec<_> = (0..500).map(|i| Some(if i < 100 && i % 4 == 0 { 45_000 } else { 300 })).collect();
        let (jb, _) = run(JitterConfig::new(20), &delays);
        let s = jb.stats();
        assert!(s.accelerates >= 1, "{s:?}");
        assert!(s.target_us < 10_000, "{s:?}");
        assert!(s.delay_us < s.target_us + F, "{s:?}");
    }

    #[test]
    fn duplicates_and_restarts_are_counted() {
        let mut jb = JitterBuffer::new(JitterConfig::new(20));
        jb.push(10, 0, 0, b"a");
        jb.push(10, 0, 10, b"a");
        assert_eq!(jb.stats().duplicates, 1);
        assert_eq!(jb.pop(), Playout::Packet(b"a".to_vec()));
        // An old packet replayed after it played is a duplicate too.
        jb.push(10, 0, 30_000, b"a");
        assert_eq!(jb.stats().duplicates, 2);
        // A jump of 30000 is a new stream.
        jb.push(30_010, 5_000_000, 40_000, b"b");
        assert_eq!(jb.stats().restarts, 1);
        let t = jb.next_tick().unwrap();
        assert_eq!(t, 40_000 + jb.stats().target_us);
        assert_eq!(jb.pop(), Playout::Packet(b"b".to_vec()));
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        let mut cfg = JitterConfig::new(20);
        cfg.capacity = 4;
        let mut jb = JitterBuffer::new(cfg);
        for i in 0..10u16 {
            jb.push(i, i as u32 * 960, 0, [b'0' + i as u8].as_slice());
        }
        assert_eq!(jb.stats().buffered, 4);
        assert_eq!(jb.stats().overflow, 6);
        // The first four are kept, in order; the six that did not fit are gone.
        for i in 0..4u8 {
            assert_eq!(jb.pop(), Playout::Packet(vec![b'0' + i]));
        }
    }

    #[test]
    fn a_packet_arriving_after_its_tick_is_late_even_if_popped_afterwards() {
        let mut jb = JitterBuffer::new(JitterConfig::new(20));
        jb.push(0, 0, 0, b"0");
        let t0 = jb.next_tick().unwrap();
        assert_eq!(jb.pop(), Playout::Packet(b"0".to_vec()));
        // Packet 1 belongs to tick t0 + 20 ms but arrives 1 ms after it; packet 2 is early.
        jb.push(1, 960, t0 + F + 1_000, b"1");
        jb.push(2, 1920, t0 + F + 1_500, b"2");
        // The driver runs the tick late (after both arrived): slot 1 must still be treated
        // as missing at its tick time.
        assert!(matches!(jb.pop(), Playout::Conceal(_)));
        let s = jb.stats();
        assert_eq!(s.played, 1);
        assert_eq!(s.late + s.expands, 1, "{s:?}");
    }
}
