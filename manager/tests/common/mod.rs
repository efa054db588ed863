//! Helpers shared by the manager's descriptor-limit tests.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use proto::shard::stats::Stats;

pub use engine::sys::cpu_seconds;

/// Wait up to 5 s for `cond`; on timeout, fail with the manager's connection counters.
pub fn wait_for(stats: &Stats, what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}; accepted {}, closed {}, accept errors {}",
            get(&stats.connections_accepted),
            get(&stats.connections_closed),
            get(&stats.accept_errors)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
