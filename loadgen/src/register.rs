//! The `register` scenario: C clients connect, discover their address (STUN), register, and
//! hold their connections for a while. It measures how fast the manager takes
//! registrations (each timed from its planned connect time), whether they all hold, and
//! what they cost in memory and file descriptors.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::driver::{self, App, Ctx};
use hdrhistogram::Histogram;
use proto::client::{Client, ClientConfig, Event, Received};
use proto::wire::frame::ClientId;

use crate::summary::hist::{self as report, new_histogram, record};
use crate::summary::Summary as SetupOutcome;
use crate::sys;

/// Settings of a `register` run.
#[derive(Debug, Clone)]
pub struct RegisterConfig {
    /// External manager; `None` starts one in-process on loopback.
    pub manager: Option<SocketAddr>,
    /// Read this process's RSS before and after (an external manager's pid).
    pub manager_pid: Option<u32>,
    /// Client ids are this followed by the client's index.
    pub id_prefix: String,
    /// Shards of the embedded manager (0: one per core).
    pub shards: usize,
    /// Clients.
    pub clients: usize,
    /// Connects started per second.
    pub rate: f64,
    /// Seconds to hold every registration once all are in.
    pub hold: Duration,
    /// Local IP of the clients (the first, if they are spread over several).
    pub bind_ip: IpAddr,
    /// Source addresses to spread the clients over (0: as many as the ports need).
    pub source_ips: usize,
    /// Generator threads (0: one per core).
    pub threads: usize,
    /// UDP IO of the clients.
    pub io: driver::Io,
    /// Write the run here.
    pub out: Option<std::path::PathBuf>,
}

struct Counts {
    registered: AtomicU64,
    /// Clients that stopped with an error (their first connection failed).
    failed: AtomicU64,
    /// First connections that waited for a free local port.
    port_waits: AtomicU64,
    reregistered: AtomicU64,
    /// Plan to first REGISTERED, all clients (one lock per registration; a histogram per
    /// client would cost more memory than the client).
    latency: std::sync::Mutex<Histogram<u64>>,
    /// The distinct public IPs the manager handed out (the clients' source addresses).
    public_ips: std::sync::Mutex<std::collections::HashSet<IpAddr>>,
}

/// One client at the end of a run: its app and its driver's counters, or why it ended.
type Ended = (RegApp, Result<driver::DriverCounters, String>);

/// A client that only registers: it records when its first registration came.
struct RegApp {
    /// Its planned connect time: the plan's start (set once every generator thread has
    /// set up its clients) plus this offset.
    t0: Arc<std::sync::OnceLock<Instant>>,
    offset: Duration,
    counts: Arc<Counts>,
    first: bool,
}

impl App for RegApp {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) {
        if let Event::Registered { public, .. } = event {
            if std::mem::replace(&mut self.first, false) {
                self.counts.public_ips.lock().unwrap_or_else(|e| e.into_inner()).insert(public.ip());
                let planned = *self.t0.get().expect("the plan starts before any client connects") + self.offset;
                let mut h = self.counts.latency.lock().unwrap_or_else(|e| e.into_inner());
                record(&mut h, ctx.now.saturating_duration_since(planned));
                self.counts.registered.fetch_add(1, Ordering::Relaxed);
                self.counts.port_waits.fetch_add(ctx.counters().port_waits, Ordering::Relaxed);
            } else {
                self.counts.reregistered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    fn on_media(&mut self, _ctx: &mut Ctx<'_>, _p: Received<'_>) {}
    fn next_wakeup(&self) -> Option<Instant> {
        None
    }
    fn on_wakeup(&mut self, _ctx: &mut Ctx<'_>) {}
    fn done(&self) -> bool {
        false
    }
    fn on_failed(&mut self, _error: &driver::DriverError) {
        self.counts.failed.fetch_add(1, Ordering::Relaxed);
    }
}

fn client(
    sources: &sys::Sources,
    prefix: &str,
    i: usize,
    manager: SocketAddr,
) -> Result<(std::net::UdpSocket, Client), String> {
    let udp = sources.bind_udp(i)?;
    let port = udp.local_addr().map_err(|e| e.to_string())?.port();
    let id = format!("{prefix}{i}");
    let mut c = ClientConfig::new(ClientId::new(id.clone()).map_err(|e| format!("client id {id:?}: {e}"))?, port);
    c.stun_server = Some(manager);
    c.auth = crate::sys::token_for(&c.id);
    Ok((udp, Client::new(c, engine::entropy::seed() ^ i as u64)))
}

/// Resident set size of process `pid` in MiB.
use crate::sys::rss_of;

/// Run the scenario.
pub fn run(cfg: RegisterConfig) -> Result<SetupOutcome, String> {
    // On the tokio IO a client holds a UDP socket and a TCP connection as descriptors, and an
    // embedded manager on the tokio IO holds the other end as one too. On io_uring both the
    // client's sockets and the manager's ends are direct descriptors, in their rings' file
    // tables, and cost no descriptor of the process: the bound is then RLIMIT_NOFILE entries
    // per ring, two per client, so the clients are spread over enough generator threads.
    let mut threads = if cfg.threads == 0 { sys::cores() } else { cfg.threads };
    if cfg.io == driver::Io::Portable {
        let manager_end = cfg.manager.is_none();
        let per: u64 = if manager_end { 3 } else { 2 };
        let need = cfg.clients as u64 * per + 64;
        let nofile = sys::raise_nofile_to(need);
        if nofile > 0 && nofile < need {
            return Err(format!(
                "{} clients need about {need} file descriptors ({per} per client{}); RLIMIT_NOFILE is {nofile}. Use \
                 --io uring (no descriptor per client), or run the manager as its own process and split the clients \
                 over several generators with distinct --id-prefix (scripts/register-multi does this), at most {} \
                 clients each",
                cfg.clients,
                if manager_end { ", the embedded manager's end included" } else { "" },
                nofile.saturating_sub(64) / 2
            ));
        }
    } else {
        let nofile = sys::raise_nofile();
        if nofile > 0 {
            let per_thread = (nofile / 2).max(1) as usize;
            let need = cfg.clients.div_ceil(per_thread);
            if need > threads {
                if cfg.threads != 0 {
                    return Err(format!(
                        "{} clients on {threads} threads need file tables of {} entries (two per client); a ring's \
                         table holds at most RLIMIT_NOFILE ({nofile}): use --threads {need} or more (or 0)",
                        cfg.clients,
                        2 * cfg.clients.div_ceil(threads)
                    ));
                }
                threads = need;
            }
        }
    }
    let sources = Arc::new(sys::Sources::plan(cfg.bind_ip, cfg.clients, cfg.source_ips)?);
    let rss_before = sys::rss_mb();
    let ext_before = cfg.manager_pid.and_then(rss_of);
    let embedded = match cfg.manager {
        Some(_) => None,
        None => Some(
            manager::start(crate::sys::embedded_manager(cfg.bind_ip, cfg.shards, cfg.io))
                .map_err(|e| format!("cannot start the embedded manager: {e}"))?,
        ),
    };
    let manager_addr = cfg.manager.unwrap_or_else(|| embedded.as_ref().expect("embedded").local_addr());
    let counts = Arc::new(Counts {
        registered: AtomicU64::new(0),
        reregistered: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        port_waits: AtomicU64::new(0),
        latency: std::sync::Mutex::new(new_histogram()),
        public_ips: Default::default(),
    });
    // Every client's socket and state are made before the plan starts: binding thousands of
    // sockets takes a while (longer with other processes on the cores), and a plan that
    // started before it would count that time as registration latency. The plan starts
    // 200 ms after they are all made.
    let plan_t0: Arc<std::sync::OnceLock<Instant>> = Arc::new(std::sync::OnceLock::new());
    let offset = |i: usize| Duration::from_secs_f64(i as f64 / cfg.rate);
    let start_plan = || *plan_t0.get_or_init(|| Instant::now() + Duration::from_millis(200));
    let cpu0: f64;

    // Per client: (final app, driver counters or error). Started per driver below.
    let stop_all: Box<dyn FnOnce() -> Result<Vec<Ended>, String>>;
    match cfg.io {
        #[cfg(target_os = "linux")]
        driver::Io::Uring => {
            use engine::reactor::{Reactor, ReactorConfig, Stop, Unit};
            let stop = Stop::new();
            // Each thread makes its own clients: a socket moves into the thread's ring as
            // soon as it is bound, so the process never holds more than a few descriptors
            // for them. It reports when all are in, then waits for the plan's start.
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize, String>>();
            let mut go = Vec::new();
            let mut handles = Vec::new();
            for t in 0..threads {
                let (st, ready, sources, counts, t0) =
                    (stop.clone(), ready_tx.clone(), sources.clone(), counts.clone(), plan_t0.clone());
                let (go_tx, go_rx) = std::sync::mpsc::channel::<Instant>();
                go.push(go_tx);
                let (prefix, n, clients, rate) = (cfg.id_prefix.clone(), threads, cfg.clients, cfg.rate);
                let mine: Vec<usize> = (t..clients).step_by(n).collect();
                handles.push(
                    std::thread::Builder::new()
                        .name(format!("ring-{t}"))
                        .spawn(move || -> Result<Vec<engine::reactor::Finished<RegApp>>, String> {
                            // Small rings: a registered client has nothing to receive but keepalives.
                            let rc = ReactorConfig { recv_buffers: 1024, send_slots: 1024, ..Default::default() };
                            let built = (|| {
                                let mut r = Reactor::new(mine.len(), manager_addr, Some(&st), &rc)
                                    .map_err(|e| e.to_string())?;
                                for &i in &mine {
                                    let (udp, client) = client(&sources, &prefix, i, manager_addr)?;
                                    let offset = Duration::from_secs_f64(i as f64 / rate);
                                    let app = RegApp { t0: t0.clone(), offset, counts: counts.clone(), first: true };
                                    r.add(Unit { client, udp, app, wake: None, connect_at: None })
                                        .map_err(|e| e.to_string())?;
                                }
                                Ok::<_, String>(r)
                            })();
                            let mut r = match built {
                                Ok(r) => {
                                    let _ = ready.send(Ok(mine.len()));
                                    r
                                }
                                Err(e) => {
                                    let _ = ready.send(Err(e.clone()));
                                    return Err(e);
                                }
                            };
                            let Ok(t0) = go_rx.recv() else { return Ok(Vec::new()) };
                            for (ix, &i) in mine.iter().enumerate() {
                                r.set_connect_at(ix, t0 + Duration::from_secs_f64(i as f64 / rate));
                            }
                            r.run().map_err(|e| e.to_string())
                        })
                        .map_err(|e| format!("thread: {e}"))?,
                );
            }
            drop(ready_tx);
            for _ in 0..threads {
                match ready_rx.recv() {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(format!("setting up the clients: {e}")),
                    Err(_) => return Err("a generator thread ended while setting up its clients".into()),
                }
            }
            let t0 = start_plan();
            cpu0 = sys::cpu_seconds();
            for g in go {
                let _ = g.send(t0);
            }
            stop_all = Box::new(move || {
                stop.stop();
                let mut out = Vec::new();
                for h in handles {
                    let done = h.join().map_err(|_| "a generator thread panicked".to_string())??;
                    out.extend(done.into_iter().map(|f| (f.app, f.result.map_err(|e| e.to_string()))));
                }
                Ok(out)
            });
        }
        driver::Io::Portable => {
            let mut built = Vec::with_capacity(cfg.clients);
            for i in 0..cfg.clients {
                built.push(client(&sources, &cfg.id_prefix, i, manager_addr)?);
            }
            let t0 = start_plan();
            cpu0 = sys::cpu_seconds();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
                .map_err(|e| format!("runtime: {e}"))?;
            let (tx, rx) = tokio::sync::watch::channel(false);
            let mut tasks = Vec::new();
            for (i, (udp, mut client)) in built.into_iter().enumerate() {
                let mut app = RegApp { t0: plan_t0.clone(), offset: offset(i), counts: counts.clone(), first: true };
                let mut rx = rx.clone();
                let at = t0 + offset(i);
                tasks.push(rt.spawn(async move {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                    let r = async {
                        udp.set_nonblocking(true).map_err(|e| e.to_string())?;
                        let udp = tokio::net::UdpSocket::from_std(udp).map_err(|e| e.to_string())?;
                        let shutdown = async move {
                            let _ = rx.wait_for(|v| *v).await;
                        };
                        driver::run(&mut client, &udp, manager_addr, &mut app, shutdown)
                            .await
                            .map_err(|e| e.to_string())
                    }
                    .await;
                    (app, r)
                }));
            }
            stop_all = Box::new(move || {
                let _ = tx.send(true);
                let mut out = Vec::new();
                for t in tasks {
                    out.push(rt.block_on(t).map_err(|e| e.to_string())?);
                }
                Ok(out)
            });
        }
    }

    // Wait for every registration (or a bound), then hold.
    let t0 = start_plan();
    let ramp = Duration::from_secs_f64(cfg.clients as f64 / cfg.rate);
    let deadline = t0 + ramp + Duration::from_secs(30);
    // A client that failed will not register: stop waiting once every client has an outcome.
    let settled = || (counts.registered.load(Ordering::Relaxed) + counts.failed.load(Ordering::Relaxed)) as usize;
    while settled() < cfg.clients && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let all_in = Instant::now();
    let registered = counts.registered.load(Ordering::Relaxed) as usize;
    let rss_up = sys::rss_mb();
    let ext_up = cfg.manager_pid.and_then(rss_of);
    let fds_up = sys::open_fds();
    let manager_conns = embedded.as_ref().map(|m| {
        let s = m.stats();
        s.connections_accepted.load(Ordering::Relaxed) - s.connections_closed.load(Ordering::Relaxed)
    });
    let rereg0 = counts.reregistered.load(Ordering::Relaxed);
    let sleeper = sys::Sleeper::start();
    std::thread::sleep(cfg.hold);
    let sleeper = sleeper.finish();
    let rereg_during_hold = counts.reregistered.load(Ordering::Relaxed) - rereg0;
    // Held: connections the embedded manager still has open, else registrations not redone.
    let held = match embedded.as_ref() {
        Some(m) => {
            let s = m.stats();
            (s.connections_accepted.load(Ordering::Relaxed) - s.connections_closed.load(Ordering::Relaxed)) as usize
        }
        None => registered.saturating_sub(rereg_during_hold as usize),
    }
    .min(registered);
    let cpu = sys::cpu_seconds() - cpu0;
    let results = stop_all()?;
    let embedded_used = embedded.is_some();
    let manager_io = embedded.as_ref().map(|m| m.io().as_str());
    drop(embedded);

    let latency = counts.latency.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut failed: Vec<String> = Vec::new();
    let mut disconnects = 0u64;
    for (_, r) in &results {
        match r {
            Ok(c) => disconnects += c.disconnects,
            Err(e) => failed.push(e.clone()),
        }
    }
    let span = all_in.saturating_duration_since(t0).as_secs_f64().max(1e-9);
    let per_client_kb = match (rss_up, rss_before) {
        (Some(up), Some(b)) if registered > 0 => Some((up - b) * 1024.0 / registered as f64),
        _ => None,
    };
    let manager_per_reg_kb = match (ext_up, ext_before) {
        (Some(up), Some(b)) if registered > 0 => Some((up - b) * 1024.0 / registered as f64),
        _ => None,
    };
    let mut warnings = Vec::new();
    if registered + failed.len() < cfg.clients {
        warnings.push(format!("only {registered} of {} clients registered within 30 s of the ramp's end", cfg.clients));
    }
    if !failed.is_empty() {
        warnings.push(format!("{} clients failed to connect to the manager (first: {})", failed.len(), failed[0]));
    }
    let stalls = sleeper.as_ref().map(|h| h.count_between(5_000, h.max().max(5_000))).unwrap_or(0);
    if stalls > 0 {
        warnings.push(format!("this process's threads waited more than 5 ms for a CPU {stalls} times during the hold"));
    }

    let mut text = String::new();
    use std::fmt::Write;
    let where_ = match cfg.manager {
        Some(a) => format!("manager {a}"),
        None => format!("embedded manager on {manager_addr} ({} io)", manager_io.unwrap_or("?")),
    };
    let public_ips = counts.public_ips.lock().unwrap_or_else(|e| e.into_inner()).len();
    let _ = writeln!(
        text,
        "nullpunch loadgen register: {} clients at {}/s from {} source address{} ({}), {where_}, {} io",
        cfg.clients,
        cfg.rate,
        sources.len(),
        if sources.len() == 1 { "" } else { "es" },
        sources.describe(),
        cfg.io.as_str()
    );
    let _ = writeln!(
        text,
        "registered {registered} of {} in {:.2} s ({:.0}/s); {} still registered after {:.0} s held, {} re-registrations, {} disconnects",
        cfg.clients,
        span,
        registered as f64 / span,
        held,
        cfg.hold.as_secs_f64(),
        rereg_during_hold,
        disconnects
    );
    let _ = writeln!(text, "{}", report::header());
    let _ = writeln!(text, "{}", report::line("register (plan -> REGISTERED)", &latency));
    let _ = writeln!(
        text,
        "memory: rss {:.1} MB with all registered ({:.2} KiB per client, {}){}; {} open fds",
        rss_up.unwrap_or(0.0),
        per_client_kb.unwrap_or(0.0),
        if embedded_used { "both ends in this process" } else { "the clients' side" },
        manager_per_reg_kb.map(|k| format!("; manager {k:.2} KiB per registration")).unwrap_or_default(),
        fds_up.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
    );
    for f in failed.iter().take(3) {
        let _ = writeln!(text, "  failed: {f}");
    }
    for w in &warnings {
        let _ = writeln!(text, "WARNING: {w}");
    }
    let json = serde_json::json!({
        "scenario": "register",
        "io": cfg.io.as_str(),
        "clients": cfg.clients,
        "source_ips": sources.len(),
        "public_ips_seen": public_ips,
        // The fields every scenario's JSON carries; a registration run has no calls or media.
        "calls_ok": serde_json::Value::Null,
        "calls_failed": serde_json::Value::Null,
        "late_starts": serde_json::Value::Null,
        "setup_p50_ms": serde_json::Value::Null,
        "setup_p99_ms": serde_json::Value::Null,
        "setup_max_ms": serde_json::Value::Null,
        "pps_delivered": serde_json::Value::Null,
        "loss_ratio": serde_json::Value::Null,
        "latency_p99_ms": serde_json::Value::Null,
        "registered": registered,
        "held": held,
        "failed": failed.len(),
        "reregistrations": rereg_during_hold,
        "disconnects": disconnects,
        "port_waits": counts.port_waits.load(Ordering::Relaxed),
        "register_rate": (registered as f64 / span).round(),
        "register_p50_ms": report::num(report::ms_at(&latency, 0.5)),
        "register_p99_ms": report::num(report::ms_at(&latency, 0.99)),
        "register_max_ms": report::num(report::max_ms(&latency)),
        "rss_mb": report::num(rss_up),
        "rss_per_client_kb": report::num(per_client_kb),
        "manager_rss_per_registration_kb": report::num(manager_per_reg_kb),
        "manager_connections": manager_conns,
        "manager_io": manager_io,
        "open_fds": fds_up,
        "cpu_seconds": (cpu * 100.0).round() / 100.0,
        "sleeper_stalls_over_5ms": stalls,
        "warnings": warnings,
    });
    if let Some(dir) = &cfg.out {
        let metrics = [("register", "register (plan -> REGISTERED)", &latency)];
        let title = format!("registration, {} clients at {}/s", cfg.clients, cfg.rate);
        crate::summary::files::write_run(dir, &json, &metrics, &title)
            .map_err(|e| format!("writing {}: {e}", dir.display()))?;
        let _ = writeln!(text, "results written to {}", dir.display());
    }
    let all_ok = registered == cfg.clients && held == cfg.clients && failed.is_empty();
    Ok(SetupOutcome { json, text, all_ok })
}
