//! The calls scenarios, `setup`, `sessions` and `soak`: open-loop call arrivals at a
//! target rate, each call the full flow (CALL, INCOMING, null packet, PUNCHED, START, media
//! both ways, HANGUP), measured from its *planned* start so a stall in the system shows up
//! as latency instead of silently slowing the generator down (no coordinated omission).
//!
//! Simulated clients are real [`proto::client::Client`]s over their own TCP connection and
//! UDP socket on loopback, on either driver (`fleet`). Call `k` is planned at
//! `t0 + k / rate` and placed by caller `k % callers` to callee
//! `(k + k / callers) % callees` (rotating, so pairs mix even when the counts are equal).
//! `sessions` and `soak` hold their calls through a steady-state window; `soak` also samples
//! intervals and checks for growth.

mod apps;
mod live;
mod measure;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use proto::wire::frame::{CallId, ClientId};

pub use apps::{CallRecord, MediaTotals, NodeMap};
pub use measure::{growth, intervals_after, IntervalSample, WindowStats, GROWTH_INTERVALS};

use crate::error::Error;
use crate::fleet::{self, Carries, Clients, Finished, Fleet, Member, Running, Sources, Spec};
use crate::interrupt;
use crate::scenario::{CallLoad, Output, Sessions, Soak, Window};
use crate::summary::{self, hist::new_histogram, Summary};
use crate::sys;
use crate::target::{Connected, Target};
use apps::{callee_app, caller_app, Inbox, Shared, SimApp};

/// Which calls scenario runs, with its parameters.
#[derive(Debug, Clone, Copy)]
pub enum Calls<'a> {
    /// `setup`: the calls, measured from their planned start to two-way media.
    Setup(&'a CallLoad),
    /// `sessions`: the calls held through a steady-state window.
    Sessions(&'a Sessions),
    /// `soak`: the calls held (or churned) through a long window, sampled at intervals.
    Soak(&'a Soak),
}

impl<'a> Calls<'a> {
    /// The calls.
    pub fn load(self) -> &'a CallLoad {
        match self {
            Calls::Setup(load) => load,
            Calls::Sessions(s) => &s.load,
            Calls::Soak(s) => &s.load,
        }
    }

    /// The steady-state window (`sessions`, `soak`).
    pub fn window(self) -> Option<Window> {
        match self {
            Calls::Setup(_) => None,
            Calls::Sessions(s) => Some(s.window),
            Calls::Soak(s) => Some(s.window),
        }
    }

    /// Sessions held by keepalives alone, with no media (`sessions --idle`).
    pub fn idle(self) -> bool {
        matches!(self, Calls::Sessions(s) if s.idle)
    }

    /// The soak's sampling interval.
    pub fn interval(self) -> Option<Duration> {
        match self {
            Calls::Soak(s) => Some(s.interval),
            _ => None,
        }
    }

    /// The scenario's name in the summary (`scenario`).
    pub fn name(self) -> &'static str {
        match self {
            Calls::Setup(_) => "setup",
            Calls::Sessions(_) => "sessions",
            Calls::Soak(_) => "soak",
        }
    }
}

/// What a calls run measured, for its summary.
pub struct Measured {
    /// Every call, as its caller saw it.
    pub records: Vec<CallRecord>,
    /// When each call's INCOMING reached its callee.
    pub incoming: HashMap<CallId, Instant>,
    /// One-way media latency (inside the window, if there is one).
    pub media_latency: Histogram<u64>,
    /// Media packets of all calls.
    pub media: MediaTotals,
    /// Media frames the clients skipped because they fell behind their media clock.
    pub frames_skipped: u64,
    /// From the start to every client registered.
    pub registered_in: Duration,
    /// The plan's start.
    pub t0: Instant,
    /// When every caller had finished its calls.
    pub calls_done: Instant,
    /// What the steady-state window saw.
    pub window: Option<WindowStats>,
    /// RSS once every client had registered, MiB.
    pub rss_registered_mb: Option<f64>,
    /// RSS at the end (an embedded manager stopped), MiB.
    pub rss_mb: Option<f64>,
    /// The host noise a 1 ms sleeper saw: in the window if there is one, else the whole run.
    pub sleeper: Option<Histogram<u64>>,
    /// The soak's intervals.
    pub samples: Vec<IntervalSample>,
    /// Wall time of the run.
    pub wall: Duration,
    /// CPU seconds of the whole process (generator and embedded manager).
    pub cpu: f64,
    /// "manager ADDR" or "embedded manager on ADDR (IO io)".
    pub manager: String,
    /// Media packets the embedded manager saw (None for an external one).
    pub manager_media: Option<u64>,
    /// The embedded manager's IO (None for an external one).
    pub manager_io: Option<&'static str>,
    /// An embedded cluster's per node counters and failover (`--cluster-nodes`).
    pub cluster: Option<serde_json::Value>,
    /// With `--tls` against the embedded manager: its TLS handshakes (and of those resumed)
    /// once every client had registered, and the process's CPU seconds to that point.
    pub tls: Option<TlsFigures>,
    /// First connections that waited for a free local port.
    pub port_waits: u64,
    /// Source addresses the clients were spread over.
    pub source_ips: usize,
    /// The run was stopped before its end (its summary says `INTERRUPTED: partial results`).
    pub interrupted: bool,
}

/// What the registrations over TLS cost (every client's handshake is in its registration).
#[derive(Debug, Clone, Copy)]
pub struct TlsFigures {
    /// Handshakes the embedded manager completed by the time every client had registered.
    pub handshakes: u64,
    /// Of those, resumed.
    pub resumed: u64,
    /// Handshakes that failed.
    pub failed: u64,
    /// CPU seconds of the whole process (clients and manager) from the start to every
    /// client registered.
    pub register_cpu_s: f64,
}

/// Run `calls` against `target`.
pub fn run(calls: Calls<'_>, target: &Target, options: &fleet::Options, output: &Output) -> Result<Summary, Error> {
    let load = calls.load();
    let clients = load.callers + load.callees;
    check_descriptors(clients)?;
    let sources = Sources::plan(options.bind_ip, clients, options.source_ips)?;
    let live = Arc::new(live::Live::new(output.json, output.live_csv.as_deref())?);
    let manager = target.connect()?;
    let nodes = (manager.managers().addrs().len() > 1).then(|| {
        let kinds = members(load.callers, load.callees);
        let mut map = NodeMap {
            managers: manager.managers().addrs().len(),
            caller_member: vec![0; load.callers],
            callee_member: vec![0; load.callees],
        };
        for (n, &(caller, i)) in kinds.iter().enumerate() {
            if caller {
                map.caller_member[i] = n;
            } else {
                map.callee_member[i] = n;
            }
        }
        map
    });
    let shared =
        Arc::new(Shared::new(calls.window().is_none(), calls.idle(), calls.interval().is_some()).with_nodes(nodes));
    let _metrics = serve_metrics(output, &shared, &manager)?;
    let inboxes: Vec<Arc<Inbox>> =
        (0..load.callers).map(|_| Inbox::new(options.io).map(Arc::new)).collect::<Result<_, _>>()?;
    let cpu0 = engine::sys::cpu_seconds();
    let wall0 = Instant::now();

    let clients_of = Clients::new(manager.addr(), target);
    let mut fleet = start_fleet(load, options, manager.managers(), clients_of, sources.clone(), &shared, &inboxes)?;
    wait_for_registration(&shared, &mut fleet, clients)?;
    let registered_in = wall0.elapsed();
    let tls = match (&target.tls, manager.stats()) {
        (Some(_), Some(s)) => Some(TlsFigures {
            handshakes: s.tls_handshakes.load(Ordering::Relaxed),
            resumed: s.tls_resumed.load(Ordering::Relaxed),
            failed: s.tls_handshake_failed.load(Ordering::Relaxed),
            register_cpu_s: engine::sys::cpu_seconds() - cpu0,
        }),
        _ => None,
    };
    let rss_registered_mb = sys::rss_mb();
    // The whole run's host noise for `setup`; `sessions` and `soak` measure inside their window.
    let run_sleeper = calls.window().is_none().then(sys::Sleeper::start);
    let t0 = Instant::now() + Duration::from_millis(100);
    manager.arm_kill(t0);
    let scheduler = schedule(load, inboxes, shared.clone(), t0)?;
    let watchers = Watchers::start(calls, output, &shared, &live, t0);
    let finished = finish_calls(fleet, &shared, load.callers);
    watchers.done.store(true, Ordering::Relaxed);
    let (finished, calls_done) = finished?;
    let (samples, window) = watchers.join()?;
    let _ = scheduler.join();
    let clients = collect(finished)?;
    let (window, sleeper) = match (window, run_sleeper) {
        (Some((w, s)), _) => (Some(w), s),
        (None, Some(s)) => (None, s.finish()),
        (None, None) => (None, None),
    };
    let wall = wall0.elapsed();
    let cpu = engine::sys::cpu_seconds() - cpu0;
    let manager_media = manager.stats().map(|s| s.udp_media.load(Ordering::Relaxed));
    let (manager_desc, manager_io) = (manager.describe(), manager.io());
    let cluster = manager.cluster_report();
    drop(manager);
    let measured = Measured {
        records: clients.records,
        incoming: std::mem::take(&mut *shared.incoming.lock().unwrap_or_else(|e| e.into_inner())),
        media_latency: clients.latency,
        media: clients.media,
        frames_skipped: clients.skipped,
        registered_in,
        t0,
        calls_done,
        window,
        rss_registered_mb,
        rss_mb: sys::rss_mb(),
        sleeper,
        samples,
        wall,
        cpu,
        manager: manager_desc,
        manager_media,
        manager_io,
        cluster,
        tls,
        port_waits: shared.port_waits.load(Ordering::Relaxed),
        source_ips: sources.len(),
        interrupted: crate::interrupt::interrupted(),
    };
    summary::calls::summarize(calls, options, output, &measured)
}

/// Refuse a run whose clients (two descriptors each, and a margin) exceed RLIMIT_NOFILE,
/// raised as far as allowed.
fn check_descriptors(clients: usize) -> Result<(), Error> {
    let limit = engine::sys::raise_nofile();
    let need = clients as u64 * 2 + 64;
    if limit > 0 && limit < need {
        return Err(Error::Descriptors { clients, need, limit });
    }
    Ok(())
}

/// Serve the generator's live metrics (and the embedded manager's) if asked; the address
/// is printed first.
fn serve_metrics(
    output: &Output,
    shared: &Arc<Shared>,
    manager: &Connected,
) -> Result<Option<manager::metrics::MetricsServer>, Error> {
    let Some(addr) = output.metrics else { return Ok(None) };
    let (sh, mgr) = (shared.clone(), manager.stats().cloned());
    let render = move || measure::render_metrics(&sh, mgr.as_deref());
    let m = manager::metrics::serve(addr, Arc::new(render)).map_err(|source| Error::MetricsServe { addr, source })?;
    // As the manager does: on stdout (on stderr with --json, where stdout holds the summary).
    let line = format!("metrics http://{}/metrics", m.local_addr());
    if output.json {
        eprintln!("{line}");
    } else {
        println!("{line}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
    Ok(Some(m))
}

/// The fleet's members in order: (is a caller, index), interleaved caller 0, callee 0,
/// caller 1, ...
fn members(callers: usize, callees: usize) -> Vec<(bool, usize)> {
    (0..callers.max(callees))
        .flat_map(|i| {
            let c = (i < callers).then_some((true, i));
            let e = (i < callees).then_some((false, i));
            c.into_iter().chain(e)
        })
        .collect()
}

/// Start the callers and callees. Caller `i` is client `i` of the source spread, callee
/// `i` client `callers + i`; they are interleaved (caller 0, callee 0, caller 1, ...) and
/// pairs go round-robin to the ring threads, so every thread carries both kinds.
fn start_fleet(
    load: &CallLoad,
    options: &fleet::Options,
    managers: engine::driver::Managers,
    clients: Clients,
    sources: Sources,
    shared: &Arc<Shared>,
    inboxes: &[Arc<Inbox>],
) -> Result<Running<SimApp>, Error> {
    let (callers, callees) = (load.callers, load.callees);
    let kinds = members(callers, callees);
    // Seeds differ per run: equal seeds give equal STUN transaction ids, and a second run
    // against the same manager within the bindings' 30 s would find its ids taken.
    let salt = engine::entropy::seed();
    let tls = clients.tls();
    let (calls, talk, shared, inboxes) = (load.calls as usize, load.talk, shared.clone(), inboxes.to_vec());
    let count = kinds.len();
    let make = move |n: usize| -> Result<Member<SimApp>, Error> {
        let (caller, i) = kinds[n];
        if caller {
            let (udp, client) = clients.make(
                &format!("caller-{i}"),
                sources.ip(i),
                salt ^ (1_000_000 + i as u64),
                Carries::ManyCalls,
            )?;
            let inbox = inboxes[i].clone();
            let remaining = (calls + callers - 1 - i) / callers;
            let wake = Some(inbox.wake.clone());
            let app = SimApp::Caller(caller_app(shared.clone(), inbox, remaining, talk));
            Ok(Member { client, udp, app, wake })
        } else {
            let (udp, client) =
                clients.make(&format!("callee-{i}"), sources.ip(callers + i), salt ^ i as u64, Carries::ManyCalls)?;
            Ok(Member { client, udp, app: SimApp::Callee(callee_app(shared.clone())), wake: None })
        }
    };
    let spec = Spec {
        io: options.io,
        managers,
        threads: options.threads(),
        #[cfg(target_os = "linux")]
        ring: engine::reactor::ReactorConfig { tick: options.tick, ..Default::default() },
        tls,
    };
    Fleet::build(&spec, count, |n| n / 2, make)?.start(|_| None)
}

/// Wait (up to 30 s) for every client to register. A client that stopped before, or a
/// registration the manager refused, fails the run at once.
fn wait_for_registration(shared: &Shared, fleet: &mut Running<SimApp>, total: usize) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.registered.load(Ordering::Relaxed) < total {
        if interrupt::interrupted() {
            fleet.stop();
            return Err(Error::Interrupted("before the calls began: nothing measured"));
        }
        if let Some(e) = fleet.ended_early() {
            return Err(e);
        }
        if let Some(m) = shared.refused.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(Error::Refused(m));
        }
        if Instant::now() > deadline {
            return Err(Error::RegistrationTimeout { registered: shared.registered.load(Ordering::Relaxed), total });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The open-loop plan, on a thread of its own with a fine timer: call `k` is released at its
/// planned time (`t0 + k / rate` for an even constant rate) to caller `k % callers`, for
/// callee `(k + k / callers) % callees`, with its talk time. With a cap on calls up at once,
/// a call due while the cap is reached waits for one to end; it is still measured from its
/// planned time.
fn schedule(
    load: &CallLoad,
    inboxes: Vec<Arc<Inbox>>,
    shared: Arc<Shared>,
    t0: Instant,
) -> Result<std::thread::JoinHandle<()>, Error> {
    let (callers, callees, cap) = (load.callers, load.callees, load.max_concurrent);
    let plan = load.plan.clone();
    let mut talk = crate::plan::Talk::new(load.talk, load.talk_dist, load.seed);
    let name = "schedule".to_string();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            engine::sys::fine_timer_slack();
            for (k, offset) in plan.offsets().enumerate() {
                let at = t0 + offset;
                // Interrupted: no more calls are placed.
                if !interrupt::sleep_until(at) {
                    break;
                }
                if let Some(cap) = cap {
                    while (k as u64).saturating_sub(shared.ended()) >= cap {
                        if !interrupt::sleep_until(Instant::now() + Duration::from_micros(200)) {
                            return;
                        }
                    }
                }
                // Rotate so every caller meets many callees even when the counts are equal.
                let callee_ix = (k + k / callers) % callees;
                let callee = ClientId::new(format!("callee-{callee_ix}")).expect("valid id");
                inboxes[k % callers].release(at, callee, talk.next());
            }
        })
        .map_err(|source| Error::Thread { name, source })
}

/// The threads that watch a run while it lasts: the soak's interval sampler, the live lines,
/// the progress line, and the steady-state window.
struct Watchers {
    /// Set once the calls have ended.
    done: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<Vec<IntervalSample>>>,
    live: Option<std::thread::JoinHandle<()>>,
    progress: Option<std::thread::JoinHandle<()>>,
    window: Option<std::thread::JoinHandle<(WindowStats, Option<Histogram<u64>>)>>,
}

impl Watchers {
    fn start(calls: Calls<'_>, output: &Output, shared: &Arc<Shared>, live: &Arc<live::Live>, t0: Instant) -> Watchers {
        let done = Arc::new(AtomicBool::new(false));
        let window = calls.window();
        let bar = output.progress.then(|| measure::progress_bar(calls.load().calls));
        live.above(bar.clone());
        let sampler = calls.interval().map(|every| {
            let (shared, done, live) = (shared.clone(), done.clone(), live.clone());
            // Sample until the steady state ends, not through the teardown.
            let until = window.map(|w| t0 + w.offset + w.len);
            std::thread::spawn(move || measure::sampler(&shared, &done, t0, every, until, &live))
        });
        // (A soak's live lines are its intervals.)
        let live = output.live_every.filter(|_| calls.interval().is_none()).map(|every| {
            let (shared, done, live) = (shared.clone(), done.clone(), live.clone());
            std::thread::spawn(move || measure::live_lines(&shared, &done, t0, every, &live))
        });
        let progress = bar.map(|bar| {
            let (shared, done) = (shared.clone(), done.clone());
            let rate = calls.load().rate;
            std::thread::spawn(move || measure::progress_line(&bar, &shared, &done, t0, rate))
        });
        let window = window.map(|w| {
            let shared = shared.clone();
            std::thread::spawn(move || measure::window(&shared, t0, w))
        });
        Watchers { done, sampler, live, progress, window }
    }

    /// Wait for the threads: the intervals, and the window with its host noise.
    #[allow(clippy::type_complexity)]
    fn join(self) -> Result<(Vec<IntervalSample>, Option<(WindowStats, Option<Histogram<u64>>)>), Error> {
        if let Some(p) = self.progress {
            let _ = p.join();
        }
        if let Some(l) = self.live {
            let _ = l.join();
        }
        let samples = match self.sampler {
            Some(t) => t.join().map_err(|_| Error::Panicked("the sampler thread"))?,
            None => Vec::new(),
        };
        let window = match self.window {
            Some(t) => Some(t.join().map_err(|_| Error::Panicked("the window thread"))?),
            None => None,
        };
        Ok((samples, window))
    }
}

/// Wait for every caller to finish its calls, then tell the callees to stop and wait for
/// them. Returns every client and the time the calls were done.
fn finish_calls(
    fleet: Running<SimApp>,
    shared: &Shared,
    callers: usize,
) -> Result<(Vec<Finished<SimApp>>, Instant), Error> {
    while shared.callers_done.load(Ordering::Relaxed) < callers
        && !fleet.all_ended()
        && !fleet.failed()
        && !interrupt::interrupted()
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    let calls_done = Instant::now();
    shared.stop_callees.store(true, Ordering::Relaxed);
    if interrupt::interrupted() {
        // Callers still have calls to place: stop every member (calls up are hung up and
        // reported), and keep what was measured.
        fleet.stop();
    }
    if let Some(e) = fleet.take_failure() {
        fleet.stop();
        let _ = fleet.finish();
        return Err(e);
    }
    Ok((fleet.finish()?, calls_done))
}

/// What the clients saw, added up.
struct Collected {
    records: Vec<CallRecord>,
    latency: Histogram<u64>,
    media: MediaTotals,
    skipped: u64,
}

/// Add up the clients' records, histograms and counts; a client that stopped with an error
/// fails the run.
fn collect(finished: Vec<Finished<SimApp>>) -> Result<Collected, Error> {
    let mut c = Collected { records: Vec::new(), latency: new_histogram(), media: MediaTotals::default(), skipped: 0 };
    let add = |into: &mut Histogram<u64>, h: &Histogram<u64>| {
        into.add(h).map_err(|source| Error::Histogram { what: "media one-way latency".into(), source })
    };
    for f in finished {
        f.result?;
        match f.app {
            SimApp::Caller(a) => {
                c.skipped += a.streams.skipped();
                c.records.extend(a.done_records);
                add(&mut c.latency, &a.latency)?;
                c.media.add(a.media.sent, a.media.received, a.media.lost);
            }
            SimApp::Callee(a) => {
                c.skipped += a.streams.skipped();
                add(&mut c.latency, &a.latency)?;
                c.media.add(a.media.sent, a.media.received, a.media.lost);
            }
        }
    }
    Ok(c)
}
