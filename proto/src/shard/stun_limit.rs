//! Per-source rate limit of the STUN responder: a token bucket per source IP, so that the
//! responder cannot be used to send much traffic at a victim whose address an attacker
//! spoofs. The table is bounded; when it is full, idle entries (full buckets) are dropped,
//! and if none is idle a new source is refused until one is.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Sources tracked at most.
pub const MAX_SOURCES: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets per source IP.
#[derive(Debug)]
pub struct StunLimiter {
    rate: f64,
    burst: f64,
    max_sources: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl StunLimiter {
    /// `rate` answers per second per source IP with bursts of `burst`; `rate` 0 = no limit.
    pub fn new(rate: f64, burst: f64) -> StunLimiter {
        StunLimiter { rate, burst: burst.max(1.0), max_sources: MAX_SOURCES, buckets: HashMap::new() }
    }

    /// Like [`StunLimiter::new`] with a smaller table (tests).
    pub fn with_max_sources(mut self, n: usize) -> StunLimiter {
        self.max_sources = n.max(1);
        self
    }

    /// Sources tracked now.
    pub fn sources(&self) -> usize {
        self.buckets.len()
    }

    /// May `ip` get an answer at `now`? Takes a token if so.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let (rate, burst) = (self.rate, self.burst);
        let refill = |b: &mut Bucket| {
            let dt = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens = (b.tokens + dt * rate).min(burst);
            b.last = now;
        };
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.max_sources {
            self.buckets.retain(|_, b| {
                refill(b);
                b.tokens < burst
            });
            if self.buckets.len() >= self.max_sources {
                return false;
            }
        }
        let b = self.buckets.entry(ip).or_insert(Bucket { tokens: burst, last: now });
        refill(b);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut l = StunLimiter::new(10.0, 5.0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!((0..8).filter(|_| l.allow(a, t0)).count(), 5, "the burst");
        assert!(l.allow(b, t0), "another source has its own bucket");
        // 10 per second: one more after 100 ms, three after 300 ms more.
        assert!(l.allow(a, t0 + Duration::from_millis(100)));
        assert!(!l.allow(a, t0 + Duration::from_millis(100)));
        let t = t0 + Duration::from_millis(400);
        assert_eq!((0..5).filter(|_| l.allow(a, t)).count(), 3);
    }

    #[test]
    fn the_table_is_bounded_and_idle_sources_make_room() {
        let t0 = Instant::now();
        let mut l = StunLimiter::new(1.0, 2.0).with_max_sources(3);
        let ip = |i: u8| IpAddr::from([198, 51, 100, i]);
        for i in 0..3 {
            assert!(l.allow(ip(i), t0));
        }
        // Full of busy sources: a new one is refused.
        assert!(!l.allow(ip(9), t0));
        assert_eq!(l.sources(), 3);
        // Two seconds later they are idle (buckets refilled): the idle ones are dropped to
        // make room, and the newcomer is tracked alone.
        assert!(l.allow(ip(9), t0 + Duration::from_secs(2)));
        assert_eq!(l.sources(), 1);
        // Busy sources survive an eviction: ip(0) and ip(1) ask at t1 (the table is full
        // again with ip(9)), and a newcomer 100 ms later evicts only ip(9), the idle one.
        let t1 = t0 + Duration::from_secs(10);
        for i in 0..2 {
            assert!(l.allow(ip(i), t1));
        }
        assert!(l.allow(ip(20), t1 + Duration::from_millis(100)), "room: ip(9) is idle");
        assert_eq!(l.sources(), 3, "ip(0), ip(1) and the newcomer");
        // ip(0) kept its (partly used) bucket: one token left, not a fresh burst of two.
        assert!(l.allow(ip(0), t1 + Duration::from_millis(100)));
        assert!(!l.allow(ip(0), t1 + Duration::from_millis(100)));
        // No limit at rate 0.
        let mut open = StunLimiter::new(0.0, 0.0);
        assert!((0..1000).all(|_| open.allow(ip(1), t0)));
    }
}
