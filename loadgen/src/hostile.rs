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

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::rng::Rng;
use proto::wire::frame::{ClientId, Frame};

use crate::calls::{self, Calls};
use crate::error::Error;
use crate::fleet;
use crate::scenario::{Attack, Hostile, Output};
use crate::summary::{self, Summary};
use crate::sys;
use crate::target::Target;

/// What the attackers did, counted as they go.
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

/// What the attackers did: connections of each kind.
#[derive(Debug, Clone, Copy)]
pub struct Attacked {
    /// Connections that sent random bytes.
    pub random: u64,
    /// Connections that sent an oversized length prefix.
    pub oversized: u64,
    /// Half-frame connections held (opened in all).
    pub half: u64,
    /// Idle connections held (opened in all).
    pub idle: u64,
    /// REGISTER flood connections.
    pub register: u64,
    /// Connections that repeated REGISTER until closed.
    pub repeat_register: u64,
    /// Connects that failed.
    pub connect_failed: u64,
}

impl AttackCounts {
    fn snapshot(&self) -> Attacked {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Attacked {
            random: c(&self.random),
            oversized: c(&self.oversized),
            half: c(&self.half),
            idle: c(&self.idle),
            register: c(&self.register),
            repeat_register: c(&self.repeat_register),
            connect_failed: c(&self.connect_failed),
        }
    }
}

/// What a `hostile` run measured, for its summary.
pub struct Measured {
    /// The clean setup run.
    pub clean: Summary,
    /// The setup run under attack.
    pub attacked: Summary,
    /// What the attackers did.
    pub attack: Attacked,
    /// The manager's counters before the attack.
    pub before: HashMap<String, u64>,
    /// The manager's counters after it.
    pub after: HashMap<String, u64>,
    /// Whose memory the RSS figures are.
    pub memory_of: &'static str,
    /// RSS before the attack, MiB.
    pub rss_before_mb: f64,
    /// Most RSS seen during the attack, MiB.
    pub rss_max_mb: f64,
    /// RSS after the attack, MiB.
    pub rss_after_mb: f64,
    /// The start of the clean run.
    pub started: Instant,
    /// The end of the attacked run and the memory reading after it.
    pub ended: Instant,
    /// The run was stopped before its end (its summary says `INTERRUPTED: partial results`).
    pub interrupted: bool,
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
    Frame::Register {
        id: ClientId::new(id).expect("valid id"),
        udp_port: 9,
        max_calls: 1,
        binding: None,
        auth: None,
        nat: proto::nat::NatClass::Unknown,
        candidates: Vec::new(),
    }
    .encode(&mut b);
    b
}

/// The attackers of the second run, and a thread that keeps the most RSS seen.
struct Attackers {
    stop: Arc<AtomicBool>,
    counts: Arc<AttackCounts>,
    threads: Vec<std::thread::JoinHandle<()>>,
    rss_max: Arc<AtomicU64>,
}

impl Attackers {
    /// Start attacking the manager at `addr`; `rss_before` is the RSS the maximum starts from.
    fn start(addr: SocketAddr, attack: &Attack, rss_before: f64) -> Attackers {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(AttackCounts::default());
        let mut threads = Vec::new();
        let rss_max = Arc::new(AtomicU64::new(rss_before.to_bits()));
        let rate = attack.churn_rate;
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
            let n = attack.half;
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
            let n = attack.idle;
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
        Attackers { stop, counts, threads, rss_max }
    }

    /// Stop every attacker: what they did, and the most RSS seen.
    fn stop(self) -> (Attacked, f64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (self.counts.snapshot(), f64::from_bits(self.rss_max.load(Ordering::Relaxed)))
    }
}

/// Run the clean and the attacked setup runs.
pub fn run(h: &Hostile, target: &Target, options: &fleet::Options, output: &Output) -> Result<Summary, Error> {
    engine::sys::raise_nofile();
    let manager = target.connect()?;
    let addr = manager.addr();
    // The setup runs point at this manager as at an external one.
    let legitimate = target.running_at(addr);
    let setup_run = |name: &str| {
        let out = Output { dir: output.dir.as_ref().map(|d| d.join(name)), progress: false, ..output.clone() };
        calls::run(Calls::Setup(&h.load), &legitimate, options, &out)
    };

    let started = Instant::now();
    let clean = setup_run("clean")?;
    if crate::interrupt::interrupted() {
        return Err(Error::Interrupted("during the clean run: the comparison needs both runs"));
    }
    let rss_before = manager.process_rss_mb().unwrap_or(0.0);
    let before = manager.counters()?;
    let attackers = Attackers::start(addr, &h.attack, rss_before);
    // Let the held connections build up before the legitimate run starts.
    std::thread::sleep(Duration::from_secs(3));
    let attacked = setup_run("attacked");
    let (attack, rss_max) = attackers.stop();
    let attacked = attacked?;
    if crate::interrupt::interrupted() {
        return Err(Error::Interrupted("during the attacked run: the comparison needs both runs whole"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = manager.process_rss_mb().unwrap_or(0.0);
    let after = manager.counters()?;
    let ended = Instant::now();
    let memory_of =
        if manager.is_embedded() { "whole process: manager, generator and attackers" } else { "the manager process" };
    let measured = Measured {
        clean,
        attacked,
        attack,
        before,
        after,
        memory_of,
        rss_before_mb: rss_before,
        rss_max_mb: rss_max,
        rss_after_mb: rss_after,
        started,
        ended,
        interrupted: crate::interrupt::interrupted(),
    };
    let summary = summary::hostile::summarize(output, measured)?;
    manager.shutdown();
    Ok(summary)
}

/// `hostile --register-flood N`: N distinct new ids, each REGISTERed on a connection of its
/// own that closes as soon as REGISTERED arrives (with a reset, `SO_LINGER` 0, so that no
/// side keeps the port in TIME_WAIT and a million connections fit in one address's
/// ephemeral range). `concurrency` connections at a time, started at `rate` per second at
/// most (0: as fast as they complete). No setup runs: the measure is the manager's memory
/// and directory as the ids pile up, sampled every `sample_every` ids.
#[derive(Debug, Clone)]
pub struct Flood {
    /// Distinct ids to register.
    pub ids: u64,
    /// Connections at a time (one thread each).
    pub concurrency: usize,
    /// Connections started per second at most (0: no pacing).
    pub rate: f64,
    /// A sample every this many ids.
    pub sample_every: u64,
}

/// One reading during a flood.
#[derive(Debug, Clone, Copy)]
struct FloodSample {
    /// Ids whose REGISTER was answered (or failed) so far.
    ids: u64,
    /// Seconds since the flood began.
    secs: f64,
    /// The manager process's VmRSS and VmHWM, KiB.
    rss_kb: Option<u64>,
    hwm_kb: Option<u64>,
    /// The manager's directory entries and tombstones (None for a manager without those
    /// gauges).
    entries: Option<u64>,
    tombstones: Option<u64>,
}

/// `Vm*` fields of /proc/PID/status, KiB.
fn vm_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// Close with a reset rather than a FIN: neither side keeps the port pair in TIME_WAIT.
fn close_with_reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket descriptor and a `linger` of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// Register `id` on a fresh connection and close it at REGISTERED. True if REGISTERED came.
fn register_once(addr: SocketAddr, frame: &[u8]) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return false };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(frame).is_err() {
        close_with_reset(s);
        return false;
    }
    let mut buf = [0u8; 256];
    let mut got = 0;
    let ok = loop {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break false,
            Ok(n) => got += n,
        }
        match Frame::decode(&buf[..got]) {
            Ok(None) if got < buf.len() => {}
            Ok(Some((f, _))) => break matches!(f, Frame::Registered { .. }),
            _ => break false,
        }
    };
    close_with_reset(s);
    ok
}

/// Run a REGISTER flood against the manager of `target`.
pub fn flood(f: &Flood, target: &Target, output: &Output) -> Result<Summary, Error> {
    engine::sys::raise_nofile();
    let manager = target.connect()?;
    let addr = manager.addr();
    let pid = manager.pid();
    let started = Instant::now();
    let wall = std::time::SystemTime::now();
    let read = |ids: u64, t0: Instant| {
        let c = manager.counters().ok();
        FloodSample {
            ids,
            secs: t0.elapsed().as_secs_f64(),
            rss_kb: pid.and_then(|p| vm_kb(p, "VmRSS:")),
            hwm_kb: pid.and_then(|p| vm_kb(p, "VmHWM:")),
            entries: c.as_ref().and_then(|c| c.get("directory_entries").copied()),
            tombstones: c.as_ref().and_then(|c| c.get("directory_tombstones").copied()),
        }
    };
    let before = manager.counters().unwrap_or_default();
    let tag = engine::entropy::seed() % 1_000_000;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut samples = vec![read(0, t0)];
    print_sample(output, &samples[0]);
    let threads: Vec<_> = (0..f.concurrency.max(1))
        .map(|_| {
            let (next, done, failed, ids, rate) = (next.clone(), done.clone(), failed.clone(), f.ids, f.rate);
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ids || crate::interrupt::interrupted() {
                    return;
                }
                if rate > 0.0 {
                    let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                }
                if !register_once(addr, &register_bytes(&format!("flood-{tag}-{i}"))) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    let every = f.sample_every.max(1);
    let mut mark = every;
    while threads.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        let n = done.load(Ordering::Relaxed);
        if n >= mark && mark <= f.ids {
            let s = read(n, t0);
            print_sample(output, &s);
            samples.push(s);
            mark = (n / every + 1) * every;
        }
    }
    for t in threads {
        let _ = t.join();
    }
    let flood_secs = t0.elapsed().as_secs_f64();
    // Let the last closes reach the directory.
    std::thread::sleep(Duration::from_secs(1));
    let last = read(done.load(Ordering::Relaxed), t0);
    print_sample(output, &last);
    samples.push(last);
    let after = manager.counters().unwrap_or_default();
    let delta = |k: &str| after.get(k).copied().unwrap_or(0).saturating_sub(before.get(k).copied().unwrap_or(0));
    let (n, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let interrupted = crate::interrupt::interrupted();
    let mut text = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        text,
        "hostile REGISTER flood: {} ({})",
        manager.describe(),
        if pid.is_some() { "memory of its process" } else { "no pid: no memory" }
    );
    if interrupted {
        let _ = writeln!(text, "INTERRUPTED: partial results");
    }
    let _ = writeln!(
        text,
        "ids {n} ({failed} failed) in {flood_secs:.1} s ({:.0}/s) on {} connections at a time",
        n as f64 / flood_secs.max(1e-9),
        f.concurrency
    );
    let _ = writeln!(
        text,
        "{:>9} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "ids", "secs", "rss_mib", "hwm_mib", "entries", "tombstones"
    );
    let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
    let mib = |v: Option<u64>| v.map(|x| format!("{:.1}", x as f64 / 1024.0)).unwrap_or_else(|| "-".into());
    for s in &samples {
        let _ = writeln!(
            text,
            "{:>9} {:>8.1} {:>10} {:>10} {:>10} {:>10}",
            s.ids,
            s.secs,
            mib(s.rss_kb),
            mib(s.hwm_kb),
            opt(s.entries),
            opt(s.tombstones)
        );
    }
    let _ = writeln!(
        text,
        "manager: registrations +{}, tombstones_evicted +{}, tombstones_expired +{}, connections_refused +{}",
        delta("registrations"),
        delta("tombstones_evicted"),
        delta("tombstones_expired"),
        delta("connections_refused")
    );
    let json_samples: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| {
            serde_json::json!({
                "ids": s.ids, "secs": (s.secs * 100.0).round() / 100.0, "vm_rss_kb": s.rss_kb, "vm_hwm_kb": s.hwm_kb,
                "directory_entries": s.entries, "directory_tombstones": s.tombstones,
            })
        })
        .collect();
    let json = serde_json::json!({
        "scenario": "register-flood",
        "ids": n,
        "failed": failed,
        "concurrency": f.concurrency,
        "rate_limit": f.rate,
        "flood_secs": (flood_secs * 100.0).round() / 100.0,
        "ids_per_sec": (n as f64 / flood_secs.max(1e-9)).round(),
        "manager_pid": pid,
        "registrations": delta("registrations"),
        "tombstones_evicted": delta("tombstones_evicted"),
        "tombstones_expired": delta("tombstones_expired"),
        "connections_refused": delta("connections_refused"),
        "samples": json_samples,
        "started_unix_ms": wall.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        "secs": (started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        "interrupted": interrupted,
    });
    let record = output.dir.as_deref().map(|dir| {
        let title = format!("REGISTER flood, {} ids, {} at a time", f.ids, f.concurrency);
        let mut r = crate::summary::files::Record::new(dir, json.clone(), &title, wall);
        r.report = Some(text.clone());
        r
    });
    manager.shutdown();
    Ok(Summary { json, text, all_ok: failed == 0 && !interrupted, record })
}

/// A sample as a CSV line on stderr while the flood runs (`ids,secs,vm_rss_kb,vm_hwm_kb,
/// directory_entries,directory_tombstones`), unless the summary is JSON only.
fn print_sample(output: &Output, s: &FloodSample) {
    if output.json {
        return;
    }
    let o = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_default();
    eprintln!("flood,{},{:.2},{},{},{},{}", s.ids, s.secs, o(s.rss_kb), o(s.hwm_kb), o(s.entries), o(s.tombstones));
}
