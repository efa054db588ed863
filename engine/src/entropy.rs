//! Randomness from outside the protocol: seeds for [`proto::rng::Rng`] and unpredictable
//! values (call tokens) from the kernel's CSPRNG. The protocol crate reads no clock or kernel,
//! so the drivers draw these here and pass them in.

use proto::rng::Rng;

/// A seed that differs between processes and calls: the time, an address of this process's
/// stack (ASLR) and a counter. Not unpredictable; for what must not be guessed use
/// [`secure_u64`].
pub fn seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let local = 0u8;
    let addr = &local as *const u8 as u64;
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    Rng::new(t ^ addr.rotate_left(32) ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

/// A generator seeded with [`seed`].
pub fn rng() -> Rng {
    Rng::new(seed())
}

/// 32 unpredictable bytes from the kernel's CSPRNG: the seed of a client's per-call
/// end-to-end keys (`ClientConfig::key_seed`).
pub fn secure_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    for c in k.chunks_mut(8) {
        c.copy_from_slice(&secure_u64().to_ne_bytes());
    }
    k
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
                // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which is a
                // live, exclusively borrowed buffer of that length.
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

/// 64 bits (non-Linux: a freshly seeded [`Rng`], which is not a CSPRNG).
#[cfg(not(target_os = "linux"))]
pub fn secure_u64() -> u64 {
    rng().next_u64()
}

/// A 32-byte key from the kernel's CSPRNG (the shards' call-token key).
pub fn key32() -> [u8; 32] {
    let mut k = [0u8; 32];
    for c in k.chunks_exact_mut(8) {
        c.copy_from_slice(&secure_u64().to_le_bytes());
    }
    k
}
