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
