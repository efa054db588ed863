//! What a calls run measures while it lasts, besides its clients' own records: the
//! steady-state window (`sessions`, `soak`), the soak's intervals and its growth check, the
//! live progress line, and the live metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::apps::Shared;
use crate::scenario::Window;
use crate::summary::hist;
use crate::sys;

/// What the measurement window saw.
#[derive(Debug, Clone, Copy)]
pub struct WindowStats {
    /// Its length, seconds.
    pub secs: f64,
    /// Packets delivered per second.
    pub pps: f64,
    /// CPU cores busy.
    pub cores: f64,
    /// RSS at its end, MiB.
    pub rss_mb: Option<f64>,
}

/// Measure `window` from `t0` (on this thread, sleeping until it opens): one-way latency is
/// recorded only inside it, and a 1 ms sleeper measures the host's noise in it.
pub fn window(shared: &Shared, t0: Instant, window: Window) -> (WindowStats, Option<hdrhistogram::Histogram<u64>>) {
    // (Interrupted: the window ends at once, and measures what it had.)
    crate::interrupt::sleep_until(t0 + window.offset);
    let (rx0, cpu0, w0) = (shared.rx_packets.load(Ordering::Relaxed), engine::sys::cpu_seconds(), Instant::now());
    shared.record_latency.store(true, Ordering::Relaxed);
    let sleeper = sys::Sleeper::start();
    crate::interrupt::sleep_until(w0 + window.len);
    shared.record_latency.store(false, Ordering::Relaxed);
    let (rx1, cpu1) = (shared.rx_packets.load(Ordering::Relaxed), engine::sys::cpu_seconds());
    let secs = w0.elapsed().as_secs_f64();
    let sleeper = sleeper.finish();
    let stats =
        WindowStats { secs, pps: (rx1 - rx0) as f64 / secs, cores: (cpu1 - cpu0) / secs, rss_mb: sys::rss_mb() };
    (stats, sleeper)
}

/// Intervals after the warm-up the growth check needs.
pub const GROWTH_INTERVALS: usize = 3;

/// How many of the sampler's intervals of `every` seconds, from 0 to `end` seconds, start
/// at or after `warmup`: the whole ones, and a last piece of at least half an interval (the
/// sampler's rule).
pub fn intervals_after(end: f64, every: f64, warmup: f64) -> usize {
    let mut n = 0;
    let mut start = 0.0;
    while start < end && every > 0.0 {
        let stop = (start + every).min(end);
        let whole = stop - start >= every || stop - start >= every / 2.0;
        if whole && start >= warmup {
            n += 1;
        }
        start = stop;
    }
    n
}

/// One interval of a soak run.
#[derive(Debug, Clone)]
pub struct IntervalSample {
    /// End of the interval, seconds from t0.
    pub t_s: f64,
    /// Its length, seconds.
    pub secs: f64,
    /// Packets delivered per second.
    pub pps: f64,
    /// Frames sent and not delivered in the interval, over frames sent.
    pub loss: f64,
    /// Mean RFC 3550 transit difference, ms.
    pub jitter_ms: Option<f64>,
    /// One-way latency p50, p99, max (ms).
    pub latency_ms: [Option<f64>; 3],
    /// The interval's latency histogram, serialized (V2 deflate): a few KiB, where the
    /// histogram itself is hundreds (keeping those made a 10-minute soak grow by 19 MB).
    pub latency_hist: Vec<u8>,
    /// RSS at its end, MiB.
    pub rss_mb: Option<f64>,
    /// Open descriptors at its end.
    pub fds: Option<usize>,
    /// CPU cores busy.
    pub cores: f64,
}

/// Sample every `every` from t0 until `until` (or `done`): packets/s delivered, loss (frames sent but not
/// delivered in the interval), jitter (mean RFC 3550 transit difference), one-way latency,
/// RSS, open descriptors and CPU.
pub fn sampler(
    shared: &Shared,
    done: &AtomicBool,
    t0: Instant,
    every: Duration,
    until: Option<Instant>,
    live: &super::live::Live,
) -> Vec<IntervalSample> {
    let Some(iv) = &shared.intervals else { return Vec::new() };
    if let Some(d) = t0.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
    let mut out = Vec::new();
    let (mut rx0, mut tx0, mut cpu0, mut start) = (
        shared.rx_packets.load(Ordering::Relaxed),
        shared.tx_packets.load(Ordering::Relaxed),
        engine::sys::cpu_seconds(),
        Instant::now(),
    );
    // Whatever was recorded before t0 (registration) is not an interval's.
    iv.latency.lock().unwrap_or_else(|e| e.into_inner()).reset();
    loop {
        let end = until.map_or(start + every, |u| u.min(start + every));
        while Instant::now() < end && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50).min(end.saturating_duration_since(Instant::now())));
        }
        let now = Instant::now();
        let secs = now.duration_since(start).as_secs_f64();
        let stopping = done.load(Ordering::Relaxed) || until.is_some_and(|u| now >= u);
        if stopping && secs < every.as_secs_f64() / 2.0 {
            break; // a short last piece says little
        }
        let (rx, tx, cpu) = (
            shared.rx_packets.load(Ordering::Relaxed),
            shared.tx_packets.load(Ordering::Relaxed),
            engine::sys::cpu_seconds(),
        );
        let latency = {
            let mut h = iv.latency.lock().unwrap_or_else(|e| e.into_inner());
            let snapshot = h.clone();
            h.reset();
            snapshot
        };
        let mut latency_hist = Vec::new();
        let _ = hdrhistogram::serialization::Serializer::serialize(
            &mut hdrhistogram::serialization::V2DeflateSerializer::new(),
            &latency,
            &mut latency_hist,
        );
        let (jsum, jn) = (iv.jitter_sum_us.swap(0, Ordering::Relaxed), iv.jitter_n.swap(0, Ordering::Relaxed));
        let (sent, got) = (tx - tx0, rx - rx0);
        out.push(IntervalSample {
            t_s: now.duration_since(t0).as_secs_f64(),
            secs,
            pps: got as f64 / secs,
            loss: if sent > 0 { sent.saturating_sub(got) as f64 / sent as f64 } else { 0.0 },
            jitter_ms: (jn > 0).then(|| jsum as f64 / jn as f64 / 1000.0),
            latency_ms: [hist::ms_at(&latency, 0.5), hist::ms_at(&latency, 0.99), hist::max_ms(&latency)],
            latency_hist,
            rss_mb: sys::rss_mb(),
            fds: sys::open_fds(),
            cores: (cpu - cpu0) / secs,
        });
        if let Some(s) = out.last() {
            live.interval(s);
        }
        (rx0, tx0, cpu0, start) = (rx, tx, cpu, now);
        if stopping {
            break;
        }
    }
    out
}

/// Growth of RSS (MB) and descriptors over the second half of the intervals after
/// `warmup` (from the middle one to the last), and whether it is within bounds (RSS: 8 MB or
/// 10%, whichever is larger; descriptors: 16). Allocators and caches settle early and then
/// stay flat; what still grows in the second half grows without bound.
pub fn growth(samples: &[IntervalSample], warmup: Duration) -> Option<(f64, i64, bool)> {
    let after: Vec<&IntervalSample> = samples.iter().filter(|s| s.t_s - s.secs >= warmup.as_secs_f64()).collect();
    if after.len() < GROWTH_INTERVALS {
        return None;
    }
    let (first, last) = (after[after.len() / 2], after.last()?);
    let rss = last.rss_mb? - first.rss_mb?;
    let fds = last.fds? as i64 - first.fds? as i64;
    let ok = rss <= (first.rss_mb? * 0.10).max(8.0) && fds <= 16;
    Some((rss, fds, ok))
}

/// The progress bar of a run of `calls` calls (on stderr).
pub fn progress_bar(calls: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(calls);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} calls placed  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Live progress on stderr until every call has ended: elapsed time, calls placed against
/// the plan, the achieved start rate, calls ended well and not.
pub fn progress_line(bar: &indicatif::ProgressBar, shared: &Shared, done: &AtomicBool, t0: Instant, rate: f64) {
    let calls = bar.length().unwrap_or(u64::MAX);
    loop {
        let placed = shared.placed.load(Ordering::Relaxed);
        let (ok, failed) = (shared.ended_ok.load(Ordering::Relaxed), shared.ended_failed.load(Ordering::Relaxed));
        let secs = Instant::now().saturating_duration_since(t0).as_secs_f64();
        let achieved = if secs > 0.0 { placed as f64 / secs } else { 0.0 };
        bar.set_position(placed);
        bar.set_message(format!("{achieved:.0}/s of {rate}/s, ended ok {ok}, failed {failed}"));
        if ok + failed >= calls || done.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bar.finish_and_clear();
}

/// A live line every `every` until the calls have ended: what happened since the last one.
pub fn live_lines(shared: &Shared, done: &AtomicBool, t0: Instant, every: Duration, live: &super::live::Live) {
    let mut last = (0u64, 0u64, 0u64, shared.rx_packets.load(Ordering::Relaxed), t0);
    crate::interrupt::sleep_until(t0);
    // Whatever was recorded before t0 is not an interval's.
    shared.live_setup.lock().unwrap_or_else(|e| e.into_inner()).reset();
    let mut next = t0 + every;
    loop {
        while Instant::now() < next && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20).min(next.saturating_duration_since(Instant::now())));
        }
        let now = Instant::now();
        let stopping = done.load(Ordering::Relaxed);
        let secs = now.duration_since(last.4).as_secs_f64();
        if stopping && secs < every.as_secs_f64() / 2.0 {
            break;
        }
        let (placed, ok, failed, rx) = (
            shared.placed.load(Ordering::Relaxed),
            shared.ended_ok.load(Ordering::Relaxed),
            shared.ended_failed.load(Ordering::Relaxed),
            shared.rx_packets.load(Ordering::Relaxed),
        );
        let setup = {
            let mut h = shared.live_setup.lock().unwrap_or_else(|e| e.into_inner());
            let quantiles = [hist::ms_at(&h, 0.5), hist::ms_at(&h, 0.99)];
            h.reset();
            quantiles
        };
        live.calls(&super::live::CallsRow {
            t_s: now.duration_since(t0).as_secs_f64(),
            placed: placed - last.0,
            rate: (placed - last.0) as f64 / secs,
            ok: ok - last.1,
            failed: failed - last.2,
            setup_ms: setup,
            pps: (rx - last.3) as f64 / secs,
        });
        last = (placed, ok, failed, rx, now);
        next = now + every;
        if stopping {
            break;
        }
    }
}

/// The generator's live metrics, and the embedded manager's after them.
pub fn render_metrics(sh: &Shared, manager: Option<&proto::shard::stats::Stats>) -> String {
    let mut e = manager::metrics::Exposition::default();
    e.counter(
        "nullpunch_loadgen_calls_placed_total",
        "Calls placed by the simulated callers.",
        sh.placed.load(Ordering::Relaxed),
    );
    e.family("nullpunch_loadgen_calls_total", "counter", "Calls ended, by outcome.");
    e.sample("nullpunch_loadgen_calls_total", &[("outcome", "ok")], sh.ended_ok.load(Ordering::Relaxed) as f64);
    e.sample("nullpunch_loadgen_calls_total", &[("outcome", "failed")], sh.ended_failed.load(Ordering::Relaxed) as f64);
    e.gauge(
        "nullpunch_loadgen_clients_registered",
        "Simulated clients registered.",
        sh.registered.load(Ordering::Relaxed) as f64,
    );
    e.counter(
        "nullpunch_loadgen_media_packets_sent_total",
        "Media frames sent.",
        sh.tx_packets.load(Ordering::Relaxed),
    );
    e.counter(
        "nullpunch_loadgen_media_packets_received_total",
        "Media packets received.",
        sh.rx_packets.load(Ordering::Relaxed),
    );
    e.latency_histogram(
        "nullpunch_loadgen_setup_seconds",
        "Setup time of successful calls: planned start to two-way media.",
        &sh.setup_time,
    );
    let mut text = e.finish();
    if let Some(m) = manager {
        text.push_str(&manager::metrics::render_manager(m));
    }
    text
}
