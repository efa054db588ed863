//! `loadgen hostile`: legitimate call setup, first alone and then under attack, against
//! one manager with its production limits.
//!
//! The manager runs in-process (or is an external `manager` process, whose own memory and
//! counters are then reported: `--manager`, `--manager-pid`, `--manager-metrics`) with the limits of the `manager` binary's defaults (frames
//! per second per connection, REGISTER deadline, idle timeout; the STUN rate limit and the
//! per-connection call limit are off because the simulated clients share one address and
//! many calls). The clean run is a normal `setup` run. The attacked run is the same run
//! while other connections:
//!
//! * send random bytes (a fresh connection each time),
//! * send an oversized length prefix,
//! * send half a frame and hold the connection open (until the REGISTER deadline),
//! * hold thousands of connections that send nothing (re-opened as the manager closes them),
//! * flood REGISTER: new connections registering random ids as fast as they are paced, and
//!   connections repeating REGISTER until the frame-rate limit closes them.
//!
//! The result: both runs' calls and setup percentiles, the p99 ratio, what the attackers
//! did and how the manager answered (its counters), and the process's memory before, at
//! most during, and after the attack.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::rng::Rng;
use proto::wire::frame::{ClientId, Frame};

use crate::setup::SetupConfig;
use crate::summary::Summary as SetupOutcome;
use crate::sys;

/// What to run.
#[derive(Debug, Clone)]
pub struct HostileConfig {
    /// The legitimate setup runs (the manager field is ignored: one is started here).
    pub setup: SetupConfig,
    /// Idle connections held during the attack.
    pub idle: usize,
    /// Half-frame connections held during the attack.
    pub half: usize,
    /// New connections per second for each of: random bytes, oversized prefix, REGISTER.
    pub churn_rate: f64,
    /// Record the run here.
    pub out: Option<std::path::PathBuf>,
    /// An external manager (instead of one in this process), its pid (for its memory) and
    /// its metrics URL (for its counters).
    pub external: Option<(SocketAddr, u32, String)>,
}

#[derive(Default)]
struct AttackCounts {
    random: AtomicU64,
    oversized: AtomicU64,
    half: AtomicU64,
    idle: AtomicU64,
    register: AtomicU64,
    repeat_register: AtomicU64,
    connect_failed: AtomicU64,
}

fn connect(addr: SocketAddr, c: &AttackCounts) -> Option<TcpStream> {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
            Some(s)
        }
        Err(_) => {
            c.connect_failed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Read until the manager closes or a short timeout (so the socket does not linger).
fn drain(mut s: TcpStream) {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn paced(stop: &AtomicBool, rate: f64, mut f: impl FnMut(u64)) {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut next = Instant::now();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        f(i);
        i += 1;
        next += period;
        // Sleep in short slices, so a stop is seen within 100 ms whatever the rate.
        loop {
            let now = Instant::now();
            if next <= now || stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
        }
        if next < Instant::now() {
            next = Instant::now();
        }
    }
}

/// Keep `n` connections open, each having sent `hello` once; re-open those the manager
/// closes.
fn hold(addr: SocketAddr, n: usize, hello: &[u8], stop: &AtomicBool, count: &AtomicU64, c: &AttackCounts) {
    let mut conns: Vec<TcpStream> = Vec::with_capacity(n);
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        while conns.len() < n && !stop.load(Ordering::Relaxed) {
            let Some(mut s) = connect(addr, c) else { break };
            let _ = s.write_all(hello);
            let _ = s.set_nonblocking(true);
            count.fetch_add(1, Ordering::Relaxed);
            conns.push(s);
            // Re-opened at up to 1,000 connections/s: the attackers share this machine's
            // two cores with the manager and the legitimate load.
            if conns.len().is_multiple_of(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Drop the ones the manager closed (EOF), keep the rest.
        conns.retain_mut(|s| match s.read(&mut buf) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        });
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Run the calling attacker thread at the lowest CPU priority (nice 19). The attackers
/// stand in for other machines: on this one they share the cores with the manager and the
/// legitimate load, and what is measured is the manager's handling of their traffic, not
/// their own CPU use.
fn lowest_priority() {
    engine::sys::lowest_thread_priority();
}

/// An attacker thread (lowest priority): at `rate` per second, open a connection and hand
/// it to `f` with the counters and the attempt's number.
fn churn(
    addr: SocketAddr,
    stop: &Arc<AtomicBool>,
    counts: &Arc<AttackCounts>,
    rate: f64,
    mut f: impl FnMut(TcpStream, &AttackCounts, u64) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let (stop, counts) = (stop.clone(), counts.clone());
    std::thread::spawn(move || {
        lowest_priority();
        paced(&stop, rate, |i| {
            if let Some(s) = connect(addr, &counts) {
                f(s, &counts, i);
            }
        });
    })
}

fn register_bytes(id: &str) -> Vec<u8> {
    let mut b = Vec::new();
    Frame::Register { id: ClientId::new(id).expect("valid id"), udp_port: 9, max_calls: 1, binding: None, auth: None }
        .encode(&mut b);
    b
}

/// Run the clean and the attacked setup runs.
pub fn run(cfg: HostileConfig) -> Result<SetupOutcome, String> {
    sys::raise_nofile();
    let (mgr, addr) = match &cfg.external {
        Some((addr, _, _)) => (None, *addr),
        None => {
            let mut mc = sys::embedded_manager(cfg.setup.bind_ip, cfg.setup.shards, cfg.setup.io);
            mc.shard.frames_per_sec = 500.0;
            mc.max_connections = 100_000;
            let m = manager::start(mc).map_err(|e| format!("manager: {e}"))?;
            let a = m.local_addr();
            (Some(m), a)
        }
    };
    // The manager's counters and memory: from this process, or from the external one.
    let counters = || -> Result<std::collections::HashMap<String, u64>, String> {
        match (&mgr, &cfg.external) {
            (Some(m), _) => Ok(m.stats().snapshot().into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
            (None, Some((_, _, url))) => sys::manager_counters(url),
            (None, None) => unreachable!("one or the other"),
        }
    };
    let manager_rss = || match &cfg.external {
        Some((_, pid, _)) => sys::rss_of(*pid),
        None => sys::rss_mb(),
    };
    let mut setup = cfg.setup.clone();
    setup.manager = Some(addr);
    setup.progress = false;
    let sub = |name: &str| cfg.out.as_ref().map(|d| d.join(name));

    setup.out = sub("clean");
    let clean = crate::setup::run(setup.clone())?;
    let rss_before = manager_rss().unwrap_or(0.0);
    let before = counters()?;

    // The attack.
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(AttackCounts::default());
    let mut threads = Vec::new();
    let rss_max = Arc::new(AtomicU64::new(rss_before.to_bits()));
    let rate = cfg.churn_rate;
    let mut rng = Rng::new(7);
    let mut junk = vec![0u8; 4096];
    threads.push(churn(addr, &stop, &counts, rate, move |mut s, c, _| {
        rng.fill(&mut junk);
        // Keep the first byte's length prefix small: a malformed frame, not an oversized one
        // (that case has its own attacker).
        junk[0] = 0;
        let _ = s.write_all(&junk);
        c.random.fetch_add(1, Ordering::Relaxed);
        drain(s);
    }));
    threads.push(churn(addr, &stop, &counts, rate, |mut s, c, _| {
        let _ = s.write_all(&[0xFF, 0xFF, 1, 1, 0, 0, 0]);
        c.oversized.fetch_add(1, Ordering::Relaxed);
        drain(s);
    }));
    let tag = engine::entropy::seed() % 1_000_000;
    threads.push(churn(addr, &stop, &counts, rate, move |mut s, c, i| {
        let _ = s.write_all(&register_bytes(&format!("flood-{tag}-{i}")));
        c.register.fetch_add(1, Ordering::Relaxed);
        // Wait for REGISTERED (or anything), then hang up: the next one.
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
    }));
    // REGISTER again and again on one connection, until the frame limit closes it.
    let frame = register_bytes("repeat");
    let burst: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * 2000).collect();
    threads.push(churn(addr, &stop, &counts, 5.0, move |mut s, c, _| {
        let _ = s.write_all(&burst);
        c.repeat_register.fetch_add(1, Ordering::Relaxed);
        drain(s);
    }));
    {
        let (stop, counts) = (stop.clone(), counts.clone());
        let n = cfg.half;
        threads.push(std::thread::spawn(move || {
            lowest_priority();
            // A length prefix of 100 and 10 bytes of body: half a frame, held.
            let mut hello = vec![0u8, 100, 1, 1];
            hello.extend_from_slice(&[0; 8]);
            hold(addr, n, &hello, &stop, &counts.half, &counts);
        }));
    }
    {
        let (stop, counts) = (stop.clone(), counts.clone());
        let n = cfg.idle;
        threads.push(std::thread::spawn(move || {
            lowest_priority();
            hold(addr, n, &[], &stop, &counts.idle, &counts)
        }));
    }
    {
        let (stop, rss_max) = (stop.clone(), rss_max.clone());
        threads.push(std::thread::spawn(move || {
            lowest_priority();
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = sys::rss_mb() {
                    let cur = f64::from_bits(rss_max.load(Ordering::Relaxed));
                    if r > cur {
                        rss_max.store(r.to_bits(), Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }));
    }
    // Let the held connections build up before the legitimate run starts.
    std::thread::sleep(Duration::from_secs(3));
    setup.out = sub("attacked");
    let attacked = crate::setup::run(setup.clone());
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let attacked = attacked?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = manager_rss().unwrap_or(0.0);
    let after = counters()?;
    let get = |m: &std::collections::HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let delta = |k: &str| get(&after, k).saturating_sub(get(&before, k));
    let open_after = get(&after, "connections_accepted").saturating_sub(get(&after, "connections_closed"));
    let memory_of =
        if cfg.external.is_some() { "the manager process" } else { "whole process: manager, generator and attackers" };

    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let (p99_clean, p99_attacked) = (num(&clean.json, "setup_p99_ms"), num(&attacked.json, "setup_p99_ms"));
    let ratio = p99_attacked / p99_clean;
    let failed = num(&clean.json, "calls_failed") + num(&attacked.json, "calls_failed");
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let rss_max = f64::from_bits(rss_max.load(Ordering::Relaxed));
    let json = serde_json::json!({
        "scenario": "hostile",
        "calls_ok": attacked.json["calls_ok"],
        "calls_failed": attacked.json["calls_failed"],
        "late_starts": attacked.json["late_starts"],
        "setup_p50_ms": attacked.json["setup_p50_ms"],
        "setup_p99_ms": p99_attacked,
        "setup_max_ms": attacked.json["setup_max_ms"],
        "clean_calls_ok": clean.json["calls_ok"],
        "clean_calls_failed": clean.json["calls_failed"],
        "clean_setup_p50_ms": clean.json["setup_p50_ms"],
        "clean_setup_p99_ms": p99_clean,
        "p99_ratio": ratio,
        "pps_delivered": attacked.json["pps_delivered"],
        "loss_ratio": attacked.json["loss_ratio"],
        "latency_p99_ms": attacked.json["latency_p99_ms"],
        "rss_mb": rss_after,
        "rss_of": memory_of,
        "rss_before_attack_mb": rss_before,
        "rss_max_during_attack_mb": rss_max,
        "attack": {
            "random_bytes_connections": c(&counts.random),
            "oversized_prefix_connections": c(&counts.oversized),
            "half_frame_connections": c(&counts.half),
            "idle_connections": c(&counts.idle),
            "register_flood_connections": c(&counts.register),
            "repeated_register_connections": c(&counts.repeat_register),
            "connects_failed": c(&counts.connect_failed),
        },
        "manager": {
            "connections_accepted": delta("connections_accepted"),
            "frames_malformed": delta("frames_malformed"),
            "frames_oversized": delta("frames_oversized"),
            "frames_unexpected": delta("frames_unexpected"),
            "connections_timed_out": delta("connections_timed_out"),
            "connections_flooding": delta("connections_flooding"),
            "registrations": delta("registrations"),
            "connections_open_after": open_after,
        },
    });
    let text = format!(
        "hostile: the same setup run clean, then under attack, one manager (production limits)\n\
         clean:    {} ok, {} failed; setup p50 {:.3} ms, p99 {:.3} ms\n\
         attacked: {} ok, {} failed; setup p50 {:.3} ms, p99 {:.3} ms  (p99 ratio {:.2}, limit 2.00)\n\
         attack: {} random-byte, {} oversized-prefix, {} register-flood, {} repeated-register connections; {} half-frame and {} idle connections held\n\
         manager: {} connections, {} malformed, {} oversized, {} timed out, {} closed for flooding, {} registrations; {} open after\n\
         memory ({}): {:.1} MB before, {:.1} MB at most during, {:.1} MB after the attack\n",
        clean.json["calls_ok"],
        clean.json["calls_failed"],
        num(&clean.json, "setup_p50_ms"),
        p99_clean,
        attacked.json["calls_ok"],
        attacked.json["calls_failed"],
        num(&attacked.json, "setup_p50_ms"),
        p99_attacked,
        ratio,
        c(&counts.random),
        c(&counts.oversized),
        c(&counts.register),
        c(&counts.repeat_register),
        c(&counts.half),
        c(&counts.idle),
        delta("connections_accepted"),
        delta("frames_malformed"),
        delta("frames_oversized"),
        delta("connections_timed_out"),
        delta("connections_flooding"),
        delta("registrations"),
        open_after,
        memory_of,
        rss_before,
        rss_max,
        rss_after,
    );
    if let Some(dir) = &cfg.out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let args: Vec<String> = std::env::args().collect();
        let w = |f: &str, s: String| std::fs::write(dir.join(f), s).map_err(|e| format!("{}: {e}", dir.display()));
        w("command.txt", format!("{}\n", args.join(" ")))?;
        w("machine.txt", crate::summary::files::machine())?;
        w("summary.json", format!("{}\n", serde_json::to_string_pretty(&json).unwrap_or_default()))?;
        w("report.txt", text.clone())?;
    }
    if let Some(m) = mgr {
        m.shutdown();
    }
    let all_ok = failed == 0.0 && ratio <= 2.0;
    Ok(SetupOutcome { json, text, all_ok })
}
