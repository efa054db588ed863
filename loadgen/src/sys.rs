//! What the load generator measures about itself and the machine.

/// Resident set size of this process in MiB (Linux /proc/self/statm), if readable.
pub fn rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = s.split_whitespace().nth(1)?.parse().ok()?;
    let page = engine::sys::page_size() as f64;
    Some(pages * page / (1024.0 * 1024.0))
}

/// Open file descriptors of this process.
pub fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// Logical cores available.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A thread that sleeps 1 ms at a time and records by how much each sleep overran, in
/// microseconds: how long a runnable thread of this process waited for a CPU (host
/// preemption, other tenants, or this process saturating the cores). Stops at `stop`.
pub struct Sleeper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<hdrhistogram::Histogram<u64>>>,
}

impl Sleeper {
    /// Start measuring.
    pub fn start() -> Sleeper {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sleeper".into())
            .spawn(move || {
                engine::sys::fine_timer_slack();
                let mut h = crate::summary::hist::new_histogram();
                let tick = std::time::Duration::from_millis(1);
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = std::time::Instant::now();
                    std::thread::sleep(tick);
                    crate::summary::hist::record(&mut h, t.elapsed().saturating_sub(tick));
                }
                h
            })
            .ok();
        Sleeper { stop, thread }
    }

    /// Stop and return the oversleep histogram (None if the thread could not start).
    pub fn finish(mut self) -> Option<hdrhistogram::Histogram<u64>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take()?.join().ok()
    }
}

/// Stalls over 5 ms in a [`Sleeper`]'s oversleep histogram: times a runnable thread of this
/// process waited that long for a CPU.
pub fn stalls_over_5ms(oversleep: Option<&hdrhistogram::Histogram<u64>>) -> u64 {
    oversleep.map(|h| h.count_between(5_000, h.max().max(5_000))).unwrap_or(0)
}

/// Resident set size of process `pid` in MiB.
pub fn rss_of(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
