//! A small seeded pseudo-random generator (SplitMix64), and unpredictable 64-bit values
//! from the kernel for what must not be guessed.
//!
//! [`Rng`] serves RTP initial sequence numbers and timestamps, STUN transaction ids,
//! jittered backoff and the seeded lossy network of the simulation tests. It is not a
//! cryptographic generator: one output reveals its state. Written here rather than taken
//! from a crate because it is eight lines and must be reproducible from a seed.
//!
//! [`secure_u64`] reads the kernel's CSPRNG (`getrandom(2)`); the manager draws call tokens
//! from it, since a client that sees its own calls' tokens must not be able to work out
//! anyone else's.

/// SplitMix64 generator (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`; equal seeds give equal sequences.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A generator seeded from the process's address-space layout, the time and a counter.
    pub fn from_entropy() -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = 0u8;
        let addr = &local as *const u8 as u64;
        let c = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut r = Rng(t ^ addr.rotate_left(32) ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value uniformly in `0..n` (`n > 0`), by multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// True with probability `p` (0.0 ..= 1.0).
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_values_differ() {
        let v: std::collections::HashSet<u64> = (0..2000).map(|_| secure_u64()).collect();
        assert_eq!(v.len(), 2000, "64-bit values from the kernel do not repeat");
    }

    #[test]
    fn same_seed_same_sequence_and_bounds_hold() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut hits = 0;
        for _ in 0..10_000 {
            assert!(a.below(10) < 10);
            hits += a.chance(0.25) as u32;
        }
        assert!((2_200..2_800).contains(&hits), "chance(0.25) gave {hits}/10000");
        assert!(!a.chance(0.0));
    }
}

/// 64 unpredictable bits from the kernel's CSPRNG (`getrandom(2)`, buffered per thread).
#[cfg(target_os = "linux")]
pub fn secure_u64() -> u64 {
    use std::cell::RefCell;
    thread_local! {
        static POOL: RefCell<(Vec<u8>, usize)> = RefCell::new((vec![0u8; 4096], 4096));
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.1 + 8 > p.0.len() {
            let mut filled = 0;
            while filled < p.0.len() {
                let rest = &mut p.0[filled..];
                // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
                let n = unsafe { libc::getrandom(rest.as_mut_ptr() as *mut libc::c_void, rest.len(), 0) };
                if n > 0 {
                    filled += n as usize;
                } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                    panic!("getrandom failed: {}", std::io::Error::last_os_error());
                }
            }
            p.1 = 0;
        }
        let i = p.1;
        p.1 += 8;
        u64::from_le_bytes(p.0[i..i + 8].try_into().expect("8 bytes"))
    })
}

/// 64 unpredictable bits (non-Linux: a freshly seeded [`Rng`], which is not a CSPRNG).
#[cfg(not(target_os = "linux"))]
pub fn secure_u64() -> u64 {
    Rng::from_entropy().next_u64()
}
