//! `pps`: delivered UDP packets per CPU-second, for four ways of doing socket IO, in one run.
//!
//! `--flows N` connected sender sockets each send 172-byte packets (an RTP header plus a
//! 20 ms Opus frame) at `--pps-per-flow` to one receiver socket, shared by all flows as the
//! engine's sockets are. Sends are paced on 1 ms ticks; each variant has one sender thread
//! and one receiver thread, and the process CPU time (user + system, both threads) is
//! measured over the run. Variants:
//!
//! * `std`: one syscall per packet: `send` per packet, blocking `recv_from` per packet.
//! * `tokio`: tokio `UdpSocket` `send` / `recv_from`, one current-thread runtime per thread.
//! * `portable`: tokio readiness with `quinn-udp` IO: `sendmsg` per packet, `recvmmsg` in
//!   batches of 32 on the receiver.
//! * `uring`: the engine's io_uring primitives: a tick's sends in one submission, multishot
//!   RECVMSG into a provided buffer ring, completion waits batched (64 completions or 1 ms).
//!
//! Prints a table, then one JSON line; writes both to `results/<date>-pps/` (or `--out`).

use std::io::IoSliceMut;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PACKET: usize = 172;

struct Args {
    flows: usize,
    secs: f64,
    pps_per_flow: u64,
    json: bool,
    out: Option<std::path::PathBuf>,
    only: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args { flows: 1000, secs: 5.0, pps_per_flow: 100, json: false, out: None, only: None };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--flows" => a.flows = val().parse().expect("--flows N"),
            "--secs" => a.secs = val().parse().expect("--secs S"),
            "--pps-per-flow" => a.pps_per_flow = val().parse().expect("--pps-per-flow N"),
            "--json" => a.json = true,
            "--out" => a.out = Some(val().into()),
            "--only" => a.only = Some(val()),
            "-h" | "--help" => {
                println!("usage: pps [--flows N] [--secs S] [--pps-per-flow N] [--json] [--out DIR] [--only std|tokio|portable|uring]");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn raise_limits() {
    // SAFETY: plain rlimit and prctl calls on this process.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

fn set_buffers(s: &UdpSocket, bytes: i32) {
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        // SAFETY: setsockopt with a c_int.
        unsafe {
            let p = &bytes as *const i32 as *const libc::c_void;
            if libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, force, p, 4) != 0 {
                libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, plain, p, 4);
            }
        }
    }
}

/// The sockets of one variant: a receiver and `flows` connected senders.
fn sockets(flows: usize) -> (UdpSocket, Vec<UdpSocket>) {
    let rx = UdpSocket::bind("127.0.0.1:0").expect("bind receiver");
    set_buffers(&rx, 8 << 20);
    let to = rx.local_addr().unwrap();
    let senders = (0..flows)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
            s.connect(to).unwrap();
            s
        })
        .collect();
    (rx, senders)
}

/// The send schedule: which flows send in tick `t` (1 ms ticks), spread evenly.
struct Schedule {
    flows: usize,
    per_tick: f64,
    carry: f64,
    next_flow: usize,
}

impl Schedule {
    fn new(flows: usize, pps_per_flow: u64) -> Self {
        Schedule { flows, per_tick: flows as f64 * pps_per_flow as f64 / 1000.0, carry: 0.0, next_flow: 0 }
    }
    /// Flows to send on in the next tick.
    fn tick(&mut self, mut f: impl FnMut(usize)) {
        self.carry += self.per_tick;
        while self.carry >= 1.0 {
            f(self.next_flow);
            self.next_flow = (self.next_flow + 1) % self.flows;
            self.carry -= 1.0;
        }
    }
}

struct Outcome {
    name: &'static str,
    sent: u64,
    received: u64,
    cpu_s: f64,
    wall_s: f64,
}

/// Run a variant: `send` is called once per 1 ms tick until `secs` pass; `recv` runs on its
/// own thread until told to stop (after a 200 ms drain) and returns the packets received.
fn measure<S, R>(name: &'static str, secs: f64, send: S, recv: R) -> Outcome
where
    S: FnOnce(Instant, Arc<AtomicU64>) + Send + 'static,
    R: FnOnce(Arc<AtomicBool>) -> u64 + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let r = {
        let stop = stop.clone();
        std::thread::spawn(move || recv(stop))
    };
    let end = t0 + Duration::from_secs_f64(secs);
    let s = {
        let sent = sent.clone();
        std::thread::spawn(move || send(end, sent))
    };
    s.join().expect("sender");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let received = r.join().expect("receiver");
    Outcome {
        name,
        sent: sent.load(Ordering::Relaxed),
        received,
        cpu_s: cpu_seconds() - cpu0,
        wall_s: t0.elapsed().as_secs_f64(),
    }
}

/// Pace `tick` on 1 ms ticks until `end`.
fn paced(end: Instant, mut tick: impl FnMut()) {
    let mut next = Instant::now();
    while next < end {
        tick();
        next += Duration::from_millis(1);
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
}

fn run_std(a: &Args) -> Outcome {
    let (rx, senders) = sockets(a.flows);
    let (flows, pps) = (a.flows, a.pps_per_flow);
    rx.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    measure(
        "std",
        a.secs,
        move |end, sent| {
            let pkt = [0x80u8; PACKET];
            let mut sched = Schedule::new(flows, pps);
            paced(end, || {
                sched.tick(|i| {
                    if senders[i].send(&pkt).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                })
            });
        },
        move |stop| {
            let mut buf = [0u8; 2048];
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                if rx.recv_from(&mut buf).is_ok() {
                    n += 1;
                }
            }
            n
        },
    )
}

fn run_tokio(a: &Args) -> Outcome {
    let (rx, senders) = sockets(a.flows);
    let (flows, pps) = (a.flows, a.pps_per_flow);
    rx.set_nonblocking(true).unwrap();
    for s in &senders {
        s.set_nonblocking(true).unwrap();
    }
    measure(
        "tokio",
        a.secs,
        move |end, sent| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let socks: Vec<tokio::net::UdpSocket> =
                    senders.into_iter().map(|s| tokio::net::UdpSocket::from_std(s).unwrap()).collect();
                let pkt = [0x80u8; PACKET];
                let mut sched = Schedule::new(flows, pps);
                let mut next = tokio::time::Instant::now();
                let end = tokio::time::Instant::from_std(end);
                while next < end {
                    let mut due = Vec::new();
                    sched.tick(|i| due.push(i));
                    for i in due {
                        if socks[i].send(&pkt).await.is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    next += Duration::from_millis(1);
                    tokio::time::sleep_until(next).await;
                }
            });
        },
        move |stop| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let rx = tokio::net::UdpSocket::from_std(rx).unwrap();
                let mut buf = [0u8; 2048];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), rx.recv_from(&mut buf)).await {
                        n += 1;
                    }
                }
                n
            })
        },
    )
}

fn run_portable(a: &Args) -> Outcome {
    let (rx, senders) = sockets(a.flows);
    let (flows, pps) = (a.flows, a.pps_per_flow);
    rx.set_nonblocking(true).unwrap();
    measure(
        "portable",
        a.secs,
        move |end, sent| {
            let states: Vec<quinn_udp::UdpSocketState> =
                senders.iter().map(|s| quinn_udp::UdpSocketState::new(s.into()).unwrap()).collect();
            let dest = senders[0].peer_addr().unwrap();
            let pkt = [0x80u8; PACKET];
            let mut sched = Schedule::new(flows, pps);
            paced(end, || {
                sched.tick(|i| {
                    let t = quinn_udp::Transmit {
                        destination: dest,
                        ecn: None,
                        contents: &pkt,
                        segment_size: None,
                        src_ip: None,
                    };
                    if states[i].try_send((&senders[i]).into(), &t).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                })
            });
        },
        move |stop| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let state = quinn_udp::UdpSocketState::new((&rx).into()).unwrap();
                let arx = tokio::net::UdpSocket::from_std(rx).unwrap();
                const BATCH: usize = 32;
                let mut storage = vec![[0u8; 2048]; BATCH];
                let mut meta = [quinn_udp::RecvMeta::default(); BATCH];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), arx.readable()).await else {
                        continue;
                    };
                    let mut bufs: Vec<IoSliceMut<'_>> =
                        storage.iter_mut().map(|b| IoSliceMut::new(&mut b[..])).collect();
                    if let Ok(k) =
                        arx.try_io(tokio::io::Interest::READABLE, || state.recv((&arx).into(), &mut bufs, &mut meta))
                    {
                        n += meta[..k].iter().map(|m| (m.len / m.stride.max(1)) as u64).sum::<u64>();
                    }
                }
                n
            })
        },
    )
}

fn run_uring(a: &Args) -> Outcome {
    let (rx, senders) = sockets(a.flows);
    let (flows, pps) = (a.flows, a.pps_per_flow);
    measure(
        "uring",
        a.secs,
        move |end, sent| {
            let fd0 = senders[0].as_raw_fd();
            let mut ring = engine::uring::Ring::new(fd0, 4096, 1, 64, false).expect("io_uring");
            let pkt = [0x80u8; PACKET];
            let mut sched = Schedule::new(flows, pps);
            paced(end, || {
                sched.tick(|i| {
                    // SAFETY: `pkt` lives until the end of this closure's owner, after every
                    // completion is reaped below.
                    let _ = unsafe { ring.push_send(senders[i].as_raw_fd(), &pkt, None) };
                });
                // One submission for the whole tick; reap what has completed.
                let _ = ring.submit();
                let _ = ring.drain(|_, _| {});
            });
            while ring.in_flight_sends() > 0 {
                let _ = ring.submit_and_wait(1, Duration::from_millis(10));
                let _ = ring.drain(|_, _| {});
            }
            sent.fetch_add(ring.counters.sent, Ordering::Relaxed);
        },
        move |stop| {
            let mut ring = engine::uring::Ring::new(rx.as_raw_fd(), 256, 4096, 2048, true).expect("io_uring");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = ring.submit_and_wait(64, Duration::from_millis(1));
                n += ring.drain(|_, _| {}).unwrap_or(0) as u64;
            }
            drop(rx);
            n
        },
    )
}

fn main() {
    let a = parse_args();
    raise_limits();
    type Variant = (&'static str, fn(&Args) -> Outcome);
    let variants: [Variant; 4] =
        [("std", run_std), ("tokio", run_tokio), ("portable", run_portable), ("uring", run_uring)];
    let mut results = Vec::new();
    for (name, f) in variants {
        if a.only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        if !a.json {
            eprintln!("running {name} ...");
        }
        results.push(f(&a));
    }
    let offered = a.flows as f64 * a.pps_per_flow as f64;
    let mut text = format!(
        "{} flows x {} pps = {:.0} packets/s offered, {} bytes, {:.1} s per variant, 1 sender + 1 receiver thread\n\n",
        a.flows, a.pps_per_flow, offered, PACKET, a.secs
    );
    text += &format!(
        "{:<10} {:>12} {:>12} {:>9} {:>10} {:>16} {:>8}\n",
        "variant", "sent", "received", "loss", "cpu s", "pkts per cpu s", "vs std"
    );
    let std_rate = results.iter().find(|r| r.name == "std").map(|r| r.received as f64 / r.cpu_s);
    let mut json = serde_json::Map::new();
    json.insert("flows".into(), a.flows.into());
    json.insert("pps_offered".into(), offered.into());
    json.insert("packet_bytes".into(), PACKET.into());
    json.insert("secs".into(), a.secs.into());
    for r in &results {
        let per_cpu = r.received as f64 / r.cpu_s;
        let loss = 1.0 - r.received as f64 / r.sent.max(1) as f64;
        let ratio = std_rate.map(|s| per_cpu / s);
        text += &format!(
            "{:<10} {:>12} {:>12} {:>8.3}% {:>10.3} {:>16.0} {:>8}\n",
            r.name,
            r.sent,
            r.received,
            loss * 100.0,
            r.cpu_s,
            per_cpu,
            ratio.map(|x| format!("{x:.2}x")).unwrap_or_default()
        );
        json.insert(format!("{}_pkts_per_cpu_s", r.name), per_cpu.round().into());
        json.insert(format!("{}_loss", r.name), loss.into());
        json.insert(format!("{}_cpu_s", r.name), r.cpu_s.into());
        json.insert(format!("{}_wall_s", r.name), r.wall_s.into());
        if let Some(x) = ratio {
            json.insert(format!("{}_vs_std", r.name), ((x * 1000.0).round() / 1000.0).into());
        }
    }
    let json = serde_json::Value::Object(json).to_string();
    print!("{text}");
    println!("{json}");
    let dir = a.out.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let days = secs.div_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!("results/{y:04}-{m:02}-{d:02}-pps").into()
    });
    if std::fs::create_dir_all(&dir).is_ok() {
        let cmd: Vec<String> = std::env::args().collect();
        let _ = std::fs::write(
            dir.join("command.txt"),
            format!("cargo run --release -p bench --bin pps -- {}\n", cmd[1..].join(" ")),
        );
        let _ = std::fs::write(dir.join("pps.txt"), &text);
        let _ = std::fs::write(dir.join("pps.json"), format!("{json}\n"));
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let _ =
            std::fs::write(dir.join("machine.txt"), format!("cores: {cores}\nkernel: {}\ncpu: {cpu}\n", kernel.trim()));
        eprintln!("results written to {}", dir.display());
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}
