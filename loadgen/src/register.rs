//! The `register` scenario: C clients connect, discover their address (STUN), register, and
//! hold their connections for a while. It measures how fast the manager takes
//! registrations (each timed from its planned connect time), whether they all hold, and
//! what they cost in memory and file descriptors.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use engine::driver::{self, App, Ctx, Io};
use hdrhistogram::Histogram;
use proto::client::{Event, Received};

use crate::error::Error;
use crate::fleet::{self, Carries, Clients, Fleet, Member, Sources, Spec};
use crate::scenario::{Output, Register};
use crate::summary::hist::{new_histogram, record};
use crate::summary::{self, Summary};
use crate::sys;
use crate::target::Target;

/// What every client counts, shared.
struct Counts {
    registered: AtomicU64,
    /// Clients that stopped with an error (their first connection failed).
    failed: AtomicU64,
    /// First connections that waited for a free local port.
    port_waits: AtomicU64,
    reregistered: AtomicU64,
    /// Plan to first REGISTERED, all clients (one lock per registration; a histogram per
    /// client would cost more memory than the client).
    latency: Mutex<Histogram<u64>>,
    /// The distinct public IPs the manager handed out (the clients' source addresses).
    public_ips: Mutex<std::collections::HashSet<IpAddr>>,
}

/// A client that only registers: it records when its first registration came.
struct RegApp {
    /// Its planned connect time: the plan's start (set once every client is set up) plus
    /// this offset.
    t0: Arc<OnceLock<Instant>>,
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

/// What a `register` run measured, for its summary.
pub struct Measured {
    /// Source addresses the clients were spread over.
    pub sources: Sources,
    /// "manager ADDR" or "embedded manager on ADDR (IO io)".
    pub manager: String,
    /// The embedded manager's IO (None for an external one).
    pub manager_io: Option<&'static str>,
    /// True if the manager ran in this process.
    pub embedded: bool,
    /// Plan to first REGISTERED.
    pub latency: Histogram<u64>,
    /// From the plan's start to every client settled (registered or failed).
    pub span: Duration,
    /// Clients registered.
    pub registered: usize,
    /// Registrations still held after the hold.
    pub held: usize,
    /// Why each failed client failed.
    pub failed: Vec<String>,
    /// Re-registrations during the hold.
    pub reregistrations: u64,
    /// Manager connections lost, all clients.
    pub disconnects: u64,
    /// First connections that waited for a free local port.
    pub port_waits: u64,
    /// Distinct public IPs the manager saw.
    pub public_ips: usize,
    /// RSS with every client registered, MiB.
    pub rss_up_mb: Option<f64>,
    /// RSS per registered client, KiB (both ends when the manager is embedded).
    pub per_client_kb: Option<f64>,
    /// The external manager's RSS per registration, KiB (with its pid).
    pub manager_per_registration_kb: Option<f64>,
    /// Connections the embedded manager held with every client registered.
    pub manager_connections: Option<u64>,
    /// Open descriptors with every client registered.
    pub open_fds: Option<usize>,
    /// CPU seconds from the plan's start to the end of the hold.
    pub cpu: f64,
    /// The host noise a 1 ms sleeper saw during the hold.
    pub sleeper: Option<Histogram<u64>>,
    /// The plan's start (the first client's planned connect).
    pub t0: Instant,
    /// The end of the hold.
    pub ended: Instant,
    /// The run was stopped before its end (its summary says `INTERRUPTED: partial results`).
    pub interrupted: bool,
}

/// Run the scenario.
pub fn run(reg: &Register, target: &Target, options: &fleet::Options, output: &Output) -> Result<Summary, Error> {
    let threads = fit_descriptors(reg.clients, options, target)?;
    let sources = Sources::plan(options.bind_ip, reg.clients, options.source_ips)?;
    let rss_before = sys::rss_mb();
    let ext_before = target.external_rss_mb();
    let manager = target.connect()?;
    let counts = Arc::new(Counts {
        registered: AtomicU64::new(0),
        reregistered: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        port_waits: AtomicU64::new(0),
        latency: Mutex::new(new_histogram()),
        public_ips: Default::default(),
    });
    // Every client's socket and state are made before the plan starts: binding thousands of
    // sockets takes a while (longer with other processes on the cores), and a plan that
    // started before it would count that time as registration latency. The plan starts
    // 200 ms after they are all made.
    let plan_t0: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let rate = reg.rate;
    let offset = move |i: usize| Duration::from_secs_f64(i as f64 / rate);
    let spec = Spec {
        io: options.io,
        managers: manager.managers(),
        threads,
        // Small rings: a registered client has nothing to receive but keepalives.
        #[cfg(target_os = "linux")]
        ring: engine::reactor::ReactorConfig { recv_buffers: 1024, send_slots: 1024, ..Default::default() },
        tls: target.tls.clone(),
    };
    let make = {
        let (clients, sources, prefix) = (Clients::new(manager.addr(), target), sources.clone(), reg.id_prefix.clone());
        let (counts, plan_t0) = (counts.clone(), plan_t0.clone());
        move |i: usize| {
            let seed = engine::entropy::seed() ^ i as u64;
            let (udp, client) = clients.make(&format!("{prefix}{i}"), sources.ip(i), seed, Carries::Few)?;
            let app = RegApp { t0: plan_t0.clone(), offset: offset(i), counts: counts.clone(), first: true };
            Ok(Member { client, udp, app, wake: None })
        }
    };
    // Each ring thread makes its own clients (i, i + threads, ...): a socket moves into the
    // thread's ring as soon as it is bound, so the process never holds more than a few
    // descriptors for them.
    let ready = Fleet::build(&spec, reg.clients, |i| i, make)?;
    let t0 = *plan_t0.get_or_init(|| Instant::now() + Duration::from_millis(200));
    let cpu0 = engine::sys::cpu_seconds();
    let fleet = ready.start(move |i| Some(t0 + offset(i)))?;

    // Wait for every registration (or a bound), then hold.
    let ramp = Duration::from_secs_f64(reg.clients as f64 / reg.rate);
    let deadline = t0 + ramp + Duration::from_secs(30);
    // A client that failed will not register: stop waiting once every client has an outcome.
    let settled = || (counts.registered.load(Ordering::Relaxed) + counts.failed.load(Ordering::Relaxed)) as usize;
    while settled() < reg.clients && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let all_in = Instant::now();
    let registered = counts.registered.load(Ordering::Relaxed) as usize;
    let rss_up = sys::rss_mb();
    let ext_up = target.external_rss_mb();
    let fds_up = sys::open_fds();
    let manager_connections = manager.open_connections();
    let rereg0 = counts.reregistered.load(Ordering::Relaxed);
    let sleeper = sys::Sleeper::start();
    // (Interrupted: the hold ends at once.)
    crate::interrupt::sleep_until(Instant::now() + reg.hold);
    let ended = Instant::now();
    let sleeper = sleeper.finish();
    let reregistrations = counts.reregistered.load(Ordering::Relaxed) - rereg0;
    // Held: connections the embedded manager still has open, else registrations not redone.
    let held = match manager.open_connections() {
        Some(open) => open as usize,
        None => registered.saturating_sub(reregistrations as usize),
    }
    .min(registered);
    let cpu = engine::sys::cpu_seconds() - cpu0;
    fleet.stop();
    let finished = fleet.finish()?;
    let (manager_desc, manager_io, embedded) = (manager.describe(), manager.io(), manager.is_embedded());
    drop(manager);

    let mut failed: Vec<String> = Vec::new();
    let mut disconnects = 0u64;
    for f in &finished {
        match &f.result {
            Ok(c) => disconnects += c.disconnects,
            Err(e) => failed.push(e.to_string()),
        }
    }
    let per_registration = |up: Option<f64>, before: Option<f64>| match (up, before) {
        (Some(up), Some(b)) if registered > 0 => Some((up - b) * 1024.0 / registered as f64),
        _ => None,
    };
    let measured = Measured {
        sources,
        manager: manager_desc,
        manager_io,
        embedded,
        latency: counts.latency.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        span: all_in.saturating_duration_since(t0),
        registered,
        held,
        failed,
        reregistrations,
        disconnects,
        port_waits: counts.port_waits.load(Ordering::Relaxed),
        public_ips: counts.public_ips.lock().unwrap_or_else(|e| e.into_inner()).len(),
        rss_up_mb: rss_up,
        per_client_kb: per_registration(rss_up, rss_before),
        manager_per_registration_kb: per_registration(ext_up, ext_before),
        manager_connections,
        open_fds: fds_up,
        cpu,
        sleeper,
        t0,
        ended,
        interrupted: crate::interrupt::interrupted(),
    };
    summary::register::summarize(reg, options, output, &measured)
}

/// The generator threads to run `clients` on, with RLIMIT_NOFILE raised as far as they
/// need; refuses a run that cannot fit.
///
/// On the tokio IO a client holds a UDP socket and a TCP connection as descriptors, and an
/// embedded manager on the tokio IO holds the other end as one too. On io_uring both the
/// client's sockets and the manager's ends are direct descriptors, in their rings' file
/// tables, and cost no descriptor of the process: the bound is then RLIMIT_NOFILE entries
/// per ring, two per client, so the clients are spread over enough generator threads.
fn fit_descriptors(clients: usize, options: &fleet::Options, target: &Target) -> Result<usize, Error> {
    let threads = options.threads();
    match options.io {
        Io::Portable => {
            let embedded_end = target.external().is_none();
            let per: u64 = if embedded_end { 3 } else { 2 };
            let need = clients as u64 * per + 64;
            let limit = engine::sys::raise_nofile_to(need);
            if limit > 0 && limit < need {
                return Err(Error::DescriptorsPerClient { clients, need, per, embedded_end, limit });
            }
            Ok(threads)
        }
        #[cfg(target_os = "linux")]
        Io::Uring => {
            let limit = engine::sys::raise_nofile();
            if limit == 0 {
                return Ok(threads);
            }
            let per_thread = (limit / 2).max(1) as usize;
            let need = clients.div_ceil(per_thread);
            if need <= threads {
                return Ok(threads);
            }
            if options.threads != 0 {
                let entries = 2 * clients.div_ceil(threads);
                return Err(Error::RingTables { clients, threads, entries, limit, need });
            }
            Ok(need)
        }
    }
}
