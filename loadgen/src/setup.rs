//! The `setup` scenario: open-loop call arrivals at a target rate, each call the full flow
//! (CALL, INCOMING, null packet, PUNCHED, START, media both ways, HANGUP), measured from
//! its *planned* start so a stall in the system shows up as latency instead of silently
//! slowing the generator down (no coordinated omission).
//!
//! Simulated clients are tokio tasks, each a real [`Client`] over its own TCP connection and
//! UDP socket on loopback, driven by the same driver the `peer` binary uses. Call `k` is
//! planned at `t0 + k / rate` and placed by caller `k % callers` to callee
//! `(k + k / callers) % callees` (rotating, so pairs mix even when the counts are equal).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::driver::{self, App, Ctx, Streams};
use hdrhistogram::Histogram;
use proto::client::{CallHandle, Client, ClientConfig, Event, Received};
use proto::media::SyntheticSource;
use proto::wire::frame::{CallId, ClientId};

use crate::summary::hist::{self as report, new_histogram, record};
use crate::summary::Summary as SetupOutcome;
use crate::sys;

/// Settings of a `setup` run.
#[derive(Debug, Clone)]
pub struct SetupConfig {
    /// External manager; `None` starts one in-process on loopback.
    pub manager: Option<SocketAddr>,
    /// Shards of the embedded manager (0: one per core).
    pub shards: usize,
    /// Call arrivals per second.
    pub rate: f64,
    /// Number of calls.
    pub calls: u64,
    /// Media time per call before the caller hangs up.
    pub talk: Duration,
    /// Simulated callers.
    pub callers: usize,
    /// Simulated callees.
    pub callees: usize,
    /// Local IP of the simulated clients.
    pub bind_ip: IpAddr,
    /// Source addresses to spread the clients over (0: as many as the ports need).
    pub source_ips: usize,
    /// Worker threads of the generator's runtime (0: one per core).
    pub threads: usize,
    /// Write results (summary, histograms, plot) into this directory.
    pub out: Option<std::path::PathBuf>,
    /// A steady-state measurement window (offset from t0, length): delivered packets, CPU
    /// and one-way latency are measured inside it only (the `sessions` scenario).
    pub window: Option<(Duration, Duration)>,
    /// Hold the sessions without media (keepalives only): the idle-session scenario.
    pub idle: bool,
    /// UDP IO of the simulated clients.
    pub io: driver::Io,
    /// Timer tick of the io_uring driver.
    pub tick: Duration,
    /// Show a live progress line on stderr.
    pub progress: bool,
    /// Soak: sample loss, jitter, latency, packets/s, RSS and descriptors at this interval,
    /// and fail if RSS or descriptors grow after `warmup`.
    pub interval: Option<Duration>,
    /// Soak: time from t0 excluded from the growth check.
    pub warmup: Duration,
    /// Serve live Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
    /// Soak: calls replaced per second (0 for none); `None` outside the soak.
    pub churn: Option<f64>,
}

/// What the measurement window saw.
#[derive(Debug, Clone, Copy)]
struct WindowStats {
    secs: f64,
    pps: f64,
    cores: f64,
    rss_mb: Option<f64>,
}

/// What a caller saw of one call.
#[derive(Debug, Clone)]
struct CallRecord {
    planned: Instant,
    sent: Instant,
    call_id: Option<CallId>,
    start: Option<Instant>,
    flowing: Option<Instant>,
    outcome: Option<String>,
}

#[derive(Default)]
struct MediaTotals {
    sent: u64,
    received: u64,
    lost: u64,
}

impl MediaTotals {
    fn add(&mut self, sent: u64, received: u64, lost: u64) {
        self.sent += sent;
        self.received += received;
        self.lost += lost;
    }
}

/// Shared between the generator's tasks; touched once per call, never per packet.
struct Shared {
    epoch: Instant,
    /// Media packets received by all clients (one relaxed add per packet).
    rx_packets: std::sync::atomic::AtomicU64,
    /// Record one-way latency now (always, unless a window limits it).
    record_latency: AtomicBool,
    /// No media: sessions are held by keepalives alone.
    idle: bool,
    registered: AtomicUsize,
    /// Callers whose calls have all ended.
    callers_done: AtomicUsize,
    /// Media frames sent by all clients.
    tx_packets: std::sync::atomic::AtomicU64,
    /// Per-interval measurements (soak runs).
    intervals: Option<IntervalRec>,
    /// Calls placed, and calls ended well or not (for the progress line).
    placed: std::sync::atomic::AtomicU64,
    ended_ok: std::sync::atomic::AtomicU64,
    ended_failed: std::sync::atomic::AtomicU64,
    stop_callees: AtomicBool,
    incoming: Mutex<HashMap<CallId, Instant>>,
    /// Setup times of successful calls (planned start to two-way media), for the metrics
    /// endpoint.
    setup_time: proto::shard::stats::LatencyHistogram,
    /// The manager refused a registration (ERROR Unauthorized): its message.
    refused: Mutex<Option<String>>,
    /// The first client that stopped with an error (its first connection failed).
    failure: Mutex<Option<String>>,
    /// First connections that waited for a free local port (summed at registration).
    port_waits: AtomicU64,
}

/// What an interval of a soak run collects, swapped out by the sampler at each interval's end.
struct IntervalRec {
    latency: Mutex<Histogram<u64>>,
    /// Sum and count of |D|, the RFC 3550 transit-time difference of consecutive packets of
    /// a stream, in microseconds: their mean is what the RFC's jitter J estimates.
    jitter_sum_us: std::sync::atomic::AtomicU64,
    jitter_n: std::sync::atomic::AtomicU64,
}

impl Default for IntervalRec {
    fn default() -> Self {
        IntervalRec {
            latency: Mutex::new(new_histogram()),
            jitter_sum_us: Default::default(),
            jitter_n: Default::default(),
        }
    }
}

/// Calls the scheduler thread has released to one caller, at their planned time.
#[derive(Default)]
struct Inbox {
    due: Mutex<VecDeque<(Instant, ClientId)>>,
    /// Wakes the caller's task (tokio driver).
    wake: Arc<tokio::sync::Notify>,
    /// Wakes the caller's unit (io_uring driver).
    #[cfg(target_os = "linux")]
    ring_wake: Option<Arc<engine::reactor::Wake>>,
}

impl Inbox {
    fn notify(&self) {
        self.wake.notify_one();
        #[cfg(target_os = "linux")]
        if let Some(w) = &self.ring_wake {
            w.notify();
        }
    }
}

impl Shared {
    /// Remember the first registration the manager refused (ERROR Unauthorized).
    fn note_refusal(&self, event: &Event) {
        if let Event::ManagerError { code: proto::wire::frame::ErrorCode::Unauthorized, message } = event {
            self.refused.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| message.clone());
        }
    }

    /// Remember the first client failure (an io_uring thread hosts many clients and goes on).
    fn note_failure(&self, error: &driver::DriverError) {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| error.to_string());
    }

    /// Count a client's first registration (re-registrations after a reconnect are not).
    fn count_registration(&self, counted: &mut bool, counters: &driver::DriverCounters) {
        if !std::mem::replace(counted, true) {
            self.registered.fetch_add(1, Ordering::Relaxed);
            self.port_waits.fetch_add(counters.port_waits, Ordering::Relaxed);
        }
    }
}

struct CallerApp {
    shared: Arc<Shared>,
    inbox: Arc<Inbox>,
    /// Calls not yet released by the scheduler.
    remaining: usize,
    inflight: HashMap<CallHandle, CallRecord>,
    done_records: Vec<CallRecord>,
    streams: Streams,
    talk: Duration,
    latency: Histogram<u64>,
    media: MediaTotals,
    counted_registration: bool,
    counted_done: bool,
    /// Last one-way transit per call (soak jitter).
    transit: HashMap<CallHandle, u64>,
}

struct CalleeApp {
    shared: Arc<Shared>,
    streams: Streams,
    latency: Histogram<u64>,
    media: MediaTotals,
    counted_registration: bool,
    transit: HashMap<CallHandle, u64>,
    stopping: bool,
    /// Next check of the stop flag.
    next_poll: Instant,
}

fn on_media_common(
    shared: &Shared,
    latency: &mut Histogram<u64>,
    transit: &mut HashMap<CallHandle, u64>,
    now: Instant,
    p: &Received<'_>,
) {
    shared.rx_packets.fetch_add(1, Ordering::Relaxed);
    let Some((_, stamp_us)) = SyntheticSource::parse(p.payload) else { return };
    let now_us = now.duration_since(shared.epoch).as_micros() as u64;
    let one_way = now_us.saturating_sub(stamp_us);
    if let Some(iv) = &shared.intervals {
        record(&mut iv.latency.lock().unwrap_or_else(|e| e.into_inner()), Duration::from_micros(one_way));
        if let Some(last) = transit.insert(p.handle, one_way) {
            iv.jitter_sum_us.fetch_add(one_way.abs_diff(last), Ordering::Relaxed);
            iv.jitter_n.fetch_add(1, Ordering::Relaxed);
        }
    }
    if shared.record_latency.load(Ordering::Relaxed) {
        record(latency, Duration::from_micros(one_way));
    }
}

impl CallerApp {
    /// Count this caller as finished once (the io_uring fleet waits on the count).
    fn check_done(&mut self) {
        if self.done() && !std::mem::replace(&mut self.counted_done, true) {
            self.shared.callers_done.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns true the first time: two-way media, the caller's media reached the callee,
    /// which answered with media.
    fn first_media(&mut self, now: Instant, h: CallHandle) -> bool {
        match self.inflight.get_mut(&h) {
            Some(r) if r.flowing.is_none() => {
                r.flowing = Some(now);
                true
            }
            _ => false,
        }
    }
}

impl App for CallerApp {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) {
        self.shared.note_refusal(&event);
        match event {
            Event::Registered { .. } => self.shared.count_registration(&mut self.counted_registration, ctx.counters()),
            Event::Started { handle, call_id, .. } => {
                if let Some(r) = self.inflight.get_mut(&handle) {
                    r.start = Some(ctx.now);
                    r.call_id = Some(call_id);
                }
                let end = ctx.now + self.talk;
                // No talk time: hang up at the first two-way media (in on_media).
                self.streams.start(handle, ctx.now, (!self.talk.is_zero()).then_some(end));
                if self.shared.idle {
                    self.streams.pause(handle, ctx.now, end);
                }
            }
            Event::MediaFlowing { handle } if self.shared.idle => {
                // Idle sessions carry no media: the path is up at the callee's first packet.
                if let Some(r) = self.inflight.get_mut(&handle) {
                    r.flowing.get_or_insert(ctx.now);
                }
            }
            Event::Ended(rep) => {
                self.transit.remove(&rep.handle);
                self.streams.stop(rep.handle);
                self.media.add(rep.sent, rep.received, rep.lost);
                if let Some(mut r) = self.inflight.remove(&rep.handle) {
                    // Idle sessions carry no media: success is a path that came up (the
                    // callee's packets arrived) and lasted until the planned hang-up.
                    let ok = if self.shared.idle { rep.reason.is_success() } else { rep.succeeded() };
                    r.outcome = (!ok).then(|| rep.reason.describe());
                    let counter = if ok { &self.shared.ended_ok } else { &self.shared.ended_failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let (true, Some(f)) = (ok, r.flowing) {
                        self.shared.setup_time.record(f.saturating_duration_since(r.planned));
                    }
                    if r.outcome.is_none() && r.flowing.is_none() {
                        r.outcome = Some("no packet from the callee".into());
                    }
                    self.done_records.push(r);
                }
            }
            _ => {}
        }
        self.check_done();
    }

    fn on_media(&mut self, ctx: &mut Ctx<'_>, p: Received<'_>) {
        let first = self.first_media(ctx.now, p.handle);
        on_media_common(&self.shared, &mut self.latency, &mut self.transit, ctx.now, &p);
        if first && self.talk.is_zero() {
            self.streams.stop(p.handle);
            let _ = ctx.client.hangup(ctx.now, p.handle);
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.streams.next_wakeup()
    }

    fn on_wakeup(&mut self, ctx: &mut Ctx<'_>) {
        // Calls released by the scheduler; `ctx.now` was read after the wake-up, so a call's
        // lateness includes the time this task took to run.
        let due: Vec<(Instant, ClientId)> =
            self.inbox.due.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        for (planned, callee) in due {
            self.remaining -= 1;
            self.shared.placed.fetch_add(1, Ordering::Relaxed);
            let mut r = CallRecord { planned, sent: ctx.now, call_id: None, start: None, flowing: None, outcome: None };
            match ctx.client.call(ctx.now, callee) {
                Ok(h) => {
                    self.inflight.insert(h, r);
                }
                Err(e) => {
                    self.shared.ended_failed.fetch_add(1, Ordering::Relaxed);
                    r.outcome = Some(format!("not placed: {e}"));
                    self.done_records.push(r);
                }
            }
        }
        let sent = self.streams.run(ctx);
        self.shared.tx_packets.fetch_add(sent, Ordering::Relaxed);
        self.check_done();
    }

    fn done(&self) -> bool {
        self.remaining == 0 && self.inflight.is_empty()
    }
}

impl App for CalleeApp {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) {
        self.shared.note_refusal(&event);
        match event {
            Event::Registered { .. } => self.shared.count_registration(&mut self.counted_registration, ctx.counters()),
            Event::Incoming { call_id, .. } => {
                self.shared.incoming.lock().unwrap_or_else(|e| e.into_inner()).insert(call_id, ctx.now);
            }
            Event::MediaFlowing { handle } if !self.shared.idle => self.streams.start(handle, ctx.now, None),
            Event::Ended(rep) => {
                self.transit.remove(&rep.handle);
                self.streams.stop(rep.handle);
                self.media.add(rep.sent, rep.received, rep.lost);
            }
            _ => {}
        }
    }

    fn on_media(&mut self, ctx: &mut Ctx<'_>, p: Received<'_>) {
        on_media_common(&self.shared, &mut self.latency, &mut self.transit, ctx.now, &p);
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let poll = (!self.stopping).then_some(self.next_poll);
        self.streams.next_wakeup().into_iter().chain(poll).min()
    }

    fn on_wakeup(&mut self, ctx: &mut Ctx<'_>) {
        self.next_poll = ctx.now + Duration::from_millis(50);
        if !self.stopping && self.shared.stop_callees.load(Ordering::Relaxed) {
            self.stopping = true;
            ctx.client.hangup_all(ctx.now);
        }
        let sent = self.streams.run(ctx);
        self.shared.tx_packets.fetch_add(sent, Ordering::Relaxed);
    }

    fn done(&self) -> bool {
        self.stopping && self.streams.is_empty()
    }
}

/// Either kind of simulated client, so one io_uring thread can run both.
enum SimApp {
    Caller(CallerApp),
    Callee(CalleeApp),
}

impl App for SimApp {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) {
        match self {
            SimApp::Caller(a) => a.on_event(ctx, event),
            SimApp::Callee(a) => a.on_event(ctx, event),
        }
    }
    fn on_media(&mut self, ctx: &mut Ctx<'_>, packet: Received<'_>) {
        match self {
            SimApp::Caller(a) => a.on_media(ctx, packet),
            SimApp::Callee(a) => a.on_media(ctx, packet),
        }
    }
    fn next_wakeup(&self) -> Option<Instant> {
        match self {
            SimApp::Caller(a) => a.next_wakeup(),
            SimApp::Callee(a) => a.next_wakeup(),
        }
    }
    fn on_wakeup(&mut self, ctx: &mut Ctx<'_>) {
        match self {
            SimApp::Caller(a) => a.on_wakeup(ctx),
            SimApp::Callee(a) => a.on_wakeup(ctx),
        }
    }
    fn done(&self) -> bool {
        match self {
            SimApp::Caller(a) => a.done(),
            SimApp::Callee(a) => a.done(),
        }
    }
    fn on_failed(&mut self, error: &driver::DriverError) {
        match self {
            SimApp::Caller(a) => a.shared.note_failure(error),
            SimApp::Callee(a) => a.shared.note_failure(error),
        }
    }
}

type CallerOut = (Vec<CallRecord>, Histogram<u64>, MediaTotals, u64);
type CalleeOut = (Histogram<u64>, MediaTotals, u64);

fn caller_app(shared: Arc<Shared>, inbox: Arc<Inbox>, remaining: usize, talk: Duration) -> CallerApp {
    CallerApp {
        streams: Streams::new(shared.epoch),
        shared,
        remaining,
        inbox,
        inflight: HashMap::new(),
        done_records: Vec::new(),
        talk,
        latency: new_histogram(),
        media: MediaTotals::default(),
        counted_registration: false,
        counted_done: false,
        transit: HashMap::new(),
    }
}

fn callee_app(shared: Arc<Shared>) -> CalleeApp {
    CalleeApp {
        streams: Streams::new(shared.epoch),
        shared,
        latency: new_histogram(),
        media: MediaTotals::default(),
        counted_registration: false,
        transit: HashMap::new(),
        stopping: false,
        next_poll: Instant::now(),
    }
}

/// The simulated clients, running.
enum Fleet {
    Tokio {
        callers: Vec<tokio::task::JoinHandle<Result<CallerOut, String>>>,
        callees: Vec<tokio::task::JoinHandle<Result<CalleeOut, String>>>,
    },
    #[cfg(target_os = "linux")]
    Ring {
        threads: Vec<std::thread::JoinHandle<Result<Vec<engine::reactor::Finished<SimApp>>, driver::DriverError>>>,
        callers: usize,
    },
}

impl Fleet {
    /// The error of a client that stopped before the run started, if any.
    async fn early_failure(&mut self) -> Option<String> {
        match self {
            Fleet::Tokio { callers, callees } => match first_finished(callers, "caller").await {
                Some(e) => Some(e),
                None => first_finished(callees, "callee").await,
            },
            #[cfg(target_os = "linux")]
            Fleet::Ring { threads, .. } => {
                let i = threads.iter().position(|t| t.is_finished())?;
                Some(match threads.swap_remove(i).join() {
                    Ok(Ok(units)) => units
                        .into_iter()
                        .find_map(|u| u.result.err().map(|e| e.to_string()))
                        .unwrap_or_else(|| "a generator thread stopped before the run started".into()),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "a generator thread panicked".into(),
                })
            }
        }
    }

    /// Wait for every caller to finish its calls, tell the callees to stop, and collect both.
    async fn finish(self, shared: &Shared) -> Result<(Vec<CallerOut>, Vec<CalleeOut>, Instant), String> {
        let mut outs = Vec::new();
        let mut ins = Vec::new();
        match self {
            Fleet::Tokio { callers, callees } => {
                for t in callers {
                    outs.push(t.await.map_err(|e| e.to_string())??);
                }
                let calls_done = Instant::now();
                shared.stop_callees.store(true, Ordering::Relaxed);
                for t in callees {
                    ins.push(t.await.map_err(|e| e.to_string())??);
                }
                Ok((outs, ins, calls_done))
            }
            #[cfg(target_os = "linux")]
            Fleet::Ring { threads, callers } => {
                while shared.callers_done.load(Ordering::Relaxed) < callers && threads.iter().any(|t| !t.is_finished())
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let calls_done = Instant::now();
                shared.stop_callees.store(true, Ordering::Relaxed);
                for t in threads {
                    let units =
                        t.join().map_err(|_| "a generator thread panicked".to_string())?.map_err(|e| e.to_string())?;
                    for u in units {
                        u.result.map_err(|e| e.to_string())?;
                        match u.app {
                            SimApp::Caller(a) => {
                                let sk = a.streams.skipped();
                                outs.push((a.done_records, a.latency, a.media, sk));
                            }
                            SimApp::Callee(a) => {
                                let sk = a.streams.skipped();
                                ins.push((a.latency, a.media, sk));
                            }
                        }
                    }
                }
                Ok((outs, ins, calls_done))
            }
        }
    }
}

/// The error of the first finished task, taken out of `tasks`, if one has finished.
async fn first_finished<T>(tasks: &mut Vec<tokio::task::JoinHandle<Result<T, String>>>, who: &str) -> Option<String> {
    let i = tasks.iter().position(|t| t.is_finished())?;
    Some(match tasks.swap_remove(i).await {
        Ok(Err(e)) => e,
        Err(e) => e.to_string(),
        Ok(Ok(_)) => format!("a {who} stopped before the run started"),
    })
}

/// Start the simulated clients: tasks on the tokio runtime, or units spread over one
/// io_uring thread per generator thread.
async fn start_fleet(
    cfg: &SetupConfig,
    sources: &sys::Sources,
    shared: &Arc<Shared>,
    inboxes: &[Arc<Inbox>],
    manager_addr: SocketAddr,
    threads: usize,
) -> Result<Fleet, String> {
    // Callers are clients 0.. of the spread, callees follow them.
    let callers = cfg.callers;
    let bind = |caller: bool, i: usize| SocketAddr::new(sources.ip(if caller { i } else { callers + i }), 0);
    // Seeds differ per run: equal seeds give equal STUN transaction ids, and a second run
    // against the same manager within the bindings' 30 s would find its ids taken.
    let salt = engine::entropy::seed();
    let remaining = |i: usize| (cfg.calls as usize + cfg.callers - 1 - i) / cfg.callers;
    match cfg.io {
        driver::Io::Portable => {
            let mut callees = Vec::new();
            for i in 0..cfg.callees {
                let shared = shared.clone();
                let addr = bind(false, i);
                callees.push(tokio::spawn(async move {
                    let (udp, mut client) =
                        new_client(addr, format!("callee-{i}"), manager_addr, salt ^ i as u64).await?;
                    let mut app = callee_app(shared);
                    driver::run(&mut client, &udp, manager_addr, &mut app, std::future::pending())
                        .await
                        .map_err(|e| e.to_string())?;
                    let skipped = app.streams.skipped();
                    Ok::<_, String>((app.latency, app.media, skipped))
                }));
            }
            let mut callers = Vec::new();
            for (i, inbox) in inboxes.iter().cloned().enumerate() {
                let mut app = caller_app(shared.clone(), inbox.clone(), remaining(i), cfg.talk);
                let addr = bind(true, i);
                callers.push(tokio::spawn(async move {
                    let (udp, mut client) =
                        new_client(addr, format!("caller-{i}"), manager_addr, salt ^ (1_000_000 + i as u64)).await?;
                    let wake = Some(inbox.wake.clone());
                    driver::run_with_wake(&mut client, &udp, manager_addr, &mut app, std::future::pending(), wake)
                        .await
                        .map_err(|e| e.to_string())?;
                    let skipped = app.streams.skipped();
                    Ok::<_, String>((app.done_records, app.latency, app.media, skipped))
                }));
            }
            Ok(Fleet::Tokio { callers, callees })
        }
        #[cfg(target_os = "linux")]
        driver::Io::Uring => {
            use engine::reactor::{ReactorConfig, Unit};
            let mut per_thread: Vec<Vec<Unit<SimApp>>> = (0..threads).map(|_| Vec::new()).collect();
            // Callers and callees interleaved, so every thread carries both kinds.
            let kinds = (0..cfg.callers.max(cfg.callees)).flat_map(|i| {
                let c = (i < cfg.callers).then_some((true, i));
                let e = (i < cfg.callees).then_some((false, i));
                c.into_iter().chain(e)
            });
            for (n, (caller, i)) in kinds.enumerate() {
                let (udp, client) = if caller {
                    new_std_client(bind(true, i), format!("caller-{i}"), manager_addr, salt ^ (1_000_000 + i as u64))?
                } else {
                    new_std_client(bind(false, i), format!("callee-{i}"), manager_addr, salt ^ i as u64)?
                };
                let (app, wake) = if caller {
                    let w = inboxes[i].ring_wake.clone();
                    (SimApp::Caller(caller_app(shared.clone(), inboxes[i].clone(), remaining(i), cfg.talk)), w)
                } else {
                    (SimApp::Callee(callee_app(shared.clone())), None)
                };
                // Pairs (caller i, callee i) go to one thread, pairs round-robin: every
                // thread carries callers and callees.
                per_thread[(n / 2) % threads].push(Unit { client, udp, app, wake, connect_at: None });
            }
            let mut handles = Vec::new();
            for (t, units) in per_thread.into_iter().enumerate() {
                if units.is_empty() {
                    continue;
                }
                let rc = ReactorConfig { tick: cfg.tick, ..Default::default() };
                handles.push(
                    std::thread::Builder::new()
                        .name(format!("ring-{t}"))
                        .spawn(move || engine::reactor::run(units, manager_addr, None, &rc))
                        .map_err(|e| format!("thread: {e}"))?,
                );
            }
            Ok(Fleet::Ring { threads: handles, callers: cfg.callers })
        }
    }
}

/// One interval of a soak run.
#[derive(Debug, Clone)]
struct IntervalSample {
    /// End of the interval, seconds from t0.
    t_s: f64,
    secs: f64,
    pps: f64,
    loss: f64,
    jitter_ms: Option<f64>,
    /// One-way latency p50, p99, max (ms).
    latency_ms: [Option<f64>; 3],
    /// The interval's latency histogram, serialized (V2 deflate): a few KiB, where the
    /// histogram itself is hundreds (keeping those made a 10-minute soak grow by 19 MB).
    latency_hist: Vec<u8>,
    rss_mb: Option<f64>,
    fds: Option<usize>,
    cores: f64,
}

impl IntervalSample {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "t_s": (self.t_s * 10.0).round() / 10.0,
            "pps": self.pps.round(),
            "loss": self.loss,
            "jitter_ms": report::num(self.jitter_ms),
            "latency_p50_ms": report::num(self.latency_ms[0]),
            "latency_p99_ms": report::num(self.latency_ms[1]),
            "latency_max_ms": report::num(self.latency_ms[2]),
            "rss_mb": report::num(self.rss_mb),
            "fds": self.fds,
            "cores": (self.cores * 1000.0).round() / 1000.0,
        })
    }
}

/// Sample every `every` from t0 until `until` (or `done`): packets/s delivered, loss (frames sent but not
/// delivered in the interval), jitter (mean RFC 3550 transit difference), one-way latency,
/// RSS, open descriptors and CPU.
fn sampler(
    shared: &Shared,
    done: &AtomicBool,
    t0: Instant,
    every: Duration,
    until: Option<Instant>,
) -> Vec<IntervalSample> {
    let Some(iv) = &shared.intervals else { return Vec::new() };
    if let Some(d) = t0.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
    let mut out = Vec::new();
    let (mut rx0, mut tx0, mut cpu0, mut start) = (
        shared.rx_packets.load(Ordering::Relaxed),
        shared.tx_packets.load(Ordering::Relaxed),
        sys::cpu_seconds(),
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
        let (rx, tx, cpu) =
            (shared.rx_packets.load(Ordering::Relaxed), shared.tx_packets.load(Ordering::Relaxed), sys::cpu_seconds());
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
            latency_ms: [report::ms_at(&latency, 0.5), report::ms_at(&latency, 0.99), report::max_ms(&latency)],
            latency_hist,
            rss_mb: sys::rss_mb(),
            fds: sys::open_fds(),
            cores: (cpu - cpu0) / secs,
        });
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
fn growth(samples: &[IntervalSample], warmup: Duration) -> Option<(f64, i64, bool)> {
    let after: Vec<&IntervalSample> = samples.iter().filter(|s| s.t_s - s.secs >= warmup.as_secs_f64()).collect();
    if after.len() < 3 {
        return None;
    }
    let (first, last) = (after[after.len() / 2], after.last()?);
    let rss = last.rss_mb? - first.rss_mb?;
    let fds = last.fds? as i64 - first.fds? as i64;
    let ok = rss <= (first.rss_mb? * 0.10).max(8.0) && fds <= 16;
    Some((rss, fds, ok))
}

/// Live progress on stderr until every call has ended: elapsed time, calls placed against
/// the plan, the achieved start rate, calls ended well and not.
fn progress_line(shared: &Shared, done: &AtomicBool, t0: Instant, calls: u64, rate: f64) {
    let bar = indicatif::ProgressBar::new(calls);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} calls placed  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
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

/// A simulated client: its UDP socket (with large buffers, since many sessions share it)
/// and a client state machine that discovers its address at the manager and takes any
/// number of calls.
async fn new_client(
    bind: SocketAddr,
    id: String,
    manager: SocketAddr,
    seed: u64,
) -> Result<(tokio::net::UdpSocket, Client), String> {
    let (udp, client) = new_std_client(bind, id, manager, seed)?;
    udp.set_nonblocking(true).map_err(|e| format!("socket: {e}"))?;
    let udp = tokio::net::UdpSocket::from_std(udp).map_err(|e| format!("socket: {e}"))?;
    Ok((udp, client))
}

/// As [`new_client`], with a std socket (the io_uring driver takes these).
fn new_std_client(
    bind: SocketAddr,
    id: String,
    manager: SocketAddr,
    seed: u64,
) -> Result<(std::net::UdpSocket, Client), String> {
    let udp = sys::bind_udp(bind)?;
    driver::set_socket_buffers(&udp, 8 << 20);
    let port = udp.local_addr().map_err(|e| e.to_string())?.port();
    let mut c = ClientConfig::new(ClientId::new(id).map_err(|e| e.to_string())?, port);
    c.stun_server = Some(manager);
    c.max_calls = u16::MAX;
    c.auth = sys::token_for(&c.id);
    Ok((udp, Client::new(c, seed)))
}

/// Run the scenario.
pub fn run(cfg: SetupConfig) -> Result<SetupOutcome, String> {
    let nofile = sys::raise_nofile();
    let clients_needed = (cfg.callers + cfg.callees) as u64 * 2 + 64;
    if nofile > 0 && nofile < clients_needed {
        return Err(format!(
            "{} clients need about {clients_needed} file descriptors; RLIMIT_NOFILE is {nofile}",
            cfg.callers + cfg.callees
        ));
    }
    let sources = sys::Sources::plan(cfg.bind_ip, cfg.callers + cfg.callees, cfg.source_ips)?;
    let embedded = match cfg.manager {
        Some(_) => None,
        None => Some(
            manager::start(sys::embedded_manager(cfg.bind_ip, cfg.shards, cfg.io))
                .map_err(|e| format!("cannot start the embedded manager: {e}"))?,
        ),
    };
    let manager_addr = cfg.manager.unwrap_or_else(|| embedded.as_ref().expect("embedded").local_addr());
    let threads = if cfg.threads == 0 { sys::cores() } else { cfg.threads };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;

    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        rx_packets: std::sync::atomic::AtomicU64::new(0),
        record_latency: AtomicBool::new(cfg.window.is_none()),
        idle: cfg.idle,
        registered: AtomicUsize::new(0),
        callers_done: AtomicUsize::new(0),
        tx_packets: Default::default(),
        intervals: cfg.interval.map(|_| IntervalRec::default()),
        placed: Default::default(),
        ended_ok: Default::default(),
        ended_failed: Default::default(),
        stop_callees: AtomicBool::new(false),
        incoming: Mutex::new(HashMap::new()),
        setup_time: Default::default(),
        refused: Mutex::new(None),
        failure: Mutex::new(None),
        port_waits: AtomicU64::new(0),
    });
    let _metrics = match cfg.metrics {
        Some(addr) => {
            let (sh, mgr) = (shared.clone(), embedded.as_ref().map(|m| m.stats().clone()));
            let render = move || render_metrics(&sh, mgr.as_deref());
            let m = manager::metrics::serve(addr, Arc::new(render)).map_err(|e| format!("--metrics {addr}: {e}"))?;
            eprintln!("metrics http://{}/metrics", m.local_addr());
            Some(m)
        }
        None => None,
    };
    let inboxes: Vec<Arc<Inbox>> = (0..cfg.callers).map(|_| Arc::new(Inbox::default())).collect();
    let cpu0 = sys::cpu_seconds();
    let wall0 = Instant::now();

    let result = rt.block_on(async {
        // Inboxes of io_uring callers get an eventfd to wake their thread.
        #[cfg(target_os = "linux")]
        let inboxes: Vec<Arc<Inbox>> = if cfg.io == driver::Io::Uring {
            let mut v = Vec::new();
            for _ in 0..cfg.callers {
                v.push(Arc::new(Inbox { ring_wake: Some(engine::reactor::Wake::new().map_err(|e| format!("eventfd: {e}"))?), ..Default::default() }));
            }
            v
        } else {
            inboxes
        };
        let mut fleet = start_fleet(&cfg, &sources, &shared, &inboxes, manager_addr, threads).await?;
        // Wait for every client to register, then fix t0 a little ahead.
        let total = cfg.callers + cfg.callees;
        let reg_deadline = Instant::now() + Duration::from_secs(30);
        while shared.registered.load(Ordering::Relaxed) < total {
            // A client that stopped before the run started failed: report its error now.
            if let Some(e) = fleet.early_failure().await {
                return Err(e);
            }
            if let Some(e) = shared.failure.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                return Err(e);
            }
            if let Some(m) = shared.refused.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                return Err(format!(
                    "the manager refused registration ({m}); a manager with --secret-file needs loadgen --secret-file with the same secret"
                ));
            }
            if Instant::now() > reg_deadline {
                return Err(format!(
                    "only {} of {total} clients registered within 30 s",
                    shared.registered.load(Ordering::Relaxed)
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let registered_in = wall0.elapsed();
        let rss_base = sys::rss_mb();
        // The whole run's host noise for `setup`; `sessions` measures inside its window.
        let run_sleeper = cfg.window.is_none().then(sys::Sleeper::start);
        let t0 = Instant::now() + Duration::from_millis(100);
        // Open-loop plan on a thread of its own with a fine timer: call k is released at
        // t0 + k / rate to caller k % callers, for callee (k + k / callers) % callees.
        let (calls, rate, callers, callees) = (cfg.calls, cfg.rate, cfg.callers, cfg.callees);
        let sched_inboxes = inboxes.clone();
        let scheduler = std::thread::Builder::new()
            .name("schedule".into())
            .spawn(move || {
                sys::fine_timer_slack();
                for k in 0..calls {
                    let at = t0 + Duration::from_secs_f64(k as f64 / rate);
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    // Rotate so every caller meets many callees even when the counts are equal.
                    let callee_ix = (k as usize + k as usize / callers) % callees;
                    let callee = ClientId::new(format!("callee-{callee_ix}")).expect("valid id");
                    let inbox = &sched_inboxes[k as usize % callers];
                    inbox.due.lock().unwrap_or_else(|e| e.into_inner()).push_back((at, callee));
                    inbox.notify();
                }
            })
            .map_err(|e| format!("scheduler thread: {e}"))?;
        let progress_done = Arc::new(AtomicBool::new(false));
        let sampler = cfg.interval.map(|every| {
            let (shared, done) = (shared.clone(), progress_done.clone());
            // Sample until the steady state ends, not through the teardown.
            let until = cfg.window.map(|(offset, len)| t0 + offset + len);
            std::thread::spawn(move || sampler(&shared, &done, t0, every, until))
        });
        let progress = cfg.progress.then(|| {
            let (shared, done) = (shared.clone(), progress_done.clone());
            let (calls, rate) = (cfg.calls, cfg.rate);
            std::thread::spawn(move || progress_line(&shared, &done, t0, calls, rate))
        });
        let window = cfg.window.map(|(offset, len)| {
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + offset)).await;
                let (rx0, cpu0, w0) = (shared.rx_packets.load(Ordering::Relaxed), sys::cpu_seconds(), Instant::now());
                shared.record_latency.store(true, Ordering::Relaxed);
                let sleeper = sys::Sleeper::start();
                tokio::time::sleep(len).await;
                shared.record_latency.store(false, Ordering::Relaxed);
                let (rx1, cpu1) = (shared.rx_packets.load(Ordering::Relaxed), sys::cpu_seconds());
                let secs = w0.elapsed().as_secs_f64();
                let sleeper = sleeper.finish();
                (WindowStats { secs, pps: (rx1 - rx0) as f64 / secs, cores: (cpu1 - cpu0) / secs, rss_mb: sys::rss_mb() }, sleeper)
            })
        });
        let mut records = Vec::new();
        let mut latency = new_histogram();
        let mut media = MediaTotals::default();
        let mut skipped = 0u64;
        let finished = fleet.finish(&shared).await;
        progress_done.store(true, Ordering::Relaxed);
        let (outs, ins, calls_done) = finished?;
        if let Some(p) = progress {
            let _ = p.join();
        }
        let samples = match sampler {
            Some(t) => t.join().map_err(|_| "the sampler thread panicked".to_string())?,
            None => Vec::new(),
        };
        let _ = scheduler.join();
        let window = match window {
            Some(w) => Some(w.await.map_err(|e| e.to_string())?),
            None => None,
        };
        for (r, h, m, sk) in outs {
            skipped += sk;
            records.extend(r);
            latency.add(&h).map_err(|e| e.to_string())?;
            media.add(m.sent, m.received, m.lost);
        }
        for (h, m, sk) in ins {
            skipped += sk;
            latency.add(&h).map_err(|e| e.to_string())?;
            media.add(m.sent, m.received, m.lost);
        }
        let (window, sleeper) = match (window, run_sleeper) {
            (Some((w, s)), _) => (Some(w), s),
            (None, Some(s)) => (None, s.finish()),
            (None, None) => (None, None),
        };
        Ok((records, latency, media, registered_in, t0, calls_done, window, rss_base, skipped, sleeper, samples))
    });
    let (records, media_latency, media, registered_in, t0, calls_done, window, rss_base, skipped, sleeper, samples) =
        result?;
    let grown = cfg.interval.and_then(|_| growth(&samples, cfg.warmup));
    // Memory per session: RSS with every session up, over the RSS after registration
    // (both sides' client state, the manager's call records, the generator's bookkeeping).
    let per_session_kb = match (window.and_then(|w| w.rss_mb), rss_base) {
        (Some(up), Some(base)) if !records.is_empty() => Some((up - base) * 1024.0 / records.len() as f64),
        _ => None,
    };
    let wall = wall0.elapsed();
    let cpu = sys::cpu_seconds() - cpu0;
    let manager_stats = embedded.as_ref().map(|m| m.stats().clone());
    let manager_io = embedded.as_ref().map(|m| m.io().as_str());
    drop(embedded);

    // Histograms, from each call's planned start.
    let incoming = shared.incoming.lock().unwrap_or_else(|e| e.into_inner());
    let (mut setup, mut to_start, mut lateness) = (new_histogram(), new_histogram(), new_histogram());
    let (mut call_incoming, mut incoming_start, mut start_media) = (new_histogram(), new_histogram(), new_histogram());
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let (mut ok, mut late, mut very_late) = (0u64, 0u64, 0u64);
    for r in &records {
        let l = r.sent.saturating_duration_since(r.planned);
        record(&mut lateness, l);
        if l > Duration::from_millis(1) {
            late += 1;
        }
        if l > Duration::from_millis(5) {
            very_late += 1;
        }
        match (&r.outcome, r.start, r.flowing) {
            (None, Some(start), Some(flowing)) => {
                ok += 1;
                record(&mut to_start, start - r.planned);
                record(&mut setup, flowing - r.planned);
                record(&mut start_media, flowing - start);
                if let Some(inc) = r.call_id.and_then(|id| incoming.get(&id)) {
                    record(&mut call_incoming, inc.saturating_duration_since(r.sent));
                    record(&mut incoming_start, start.saturating_duration_since(*inc));
                }
            }
            (outcome, _, _) => {
                *failures.entry(outcome.clone().unwrap_or_else(|| "incomplete".into())).or_default() += 1;
            }
        }
    }
    let failed = records.len() as u64 - ok;
    let span = calls_done.saturating_duration_since(t0).as_secs_f64().max(1e-9);
    // Achieved start rate: calls placed over the span from the first to the last placement.
    let first_sent = records.iter().map(|r| r.sent).min();
    let last_sent = records.iter().map(|r| r.sent).max();
    let achieved_rate = match (first_sent, last_sent) {
        (Some(a), Some(b)) if b > a => Some((records.len() - 1) as f64 / (b - a).as_secs_f64()),
        _ => None,
    };
    let cpu_share = cpu / wall.as_secs_f64() / sys::cores() as f64;
    let loss =
        if media.received + media.lost > 0 { media.lost as f64 / (media.received + media.lost) as f64 } else { 0.0 };
    let rss = sys::rss_mb();

    let mut warnings = Vec::new();
    if very_late as f64 > records.len() as f64 * 0.01 {
        warnings.push(format!(
            "the generator fell behind its schedule: {very_late} of {} starts were more than 5 ms late (max {:.1} ms); \
             its own overload may inflate the setup times",
            records.len(),
            report::max_ms(&lateness).unwrap_or(0.0)
        ));
    }
    if skipped > 0 {
        warnings.push(format!(
            "the generator skipped {skipped} media frames because it fell behind its own media clock; \
             they were never sent, so they are not in the loss figure"
        ));
    }
    if cpu_share > 0.9 {
        warnings.push(format!(
            "the machine's CPU was saturated ({:.0}% of {} cores, generator and embedded manager together)",
            cpu_share * 100.0,
            sys::cores()
        ));
    }
    if let Some((rss, fds, false)) = grown {
        warnings.push(format!(
            "memory or descriptors still grew in the second half of the run: RSS {rss:+.1} MB, descriptors {fds:+}; growth without bound fails the soak"
        ));
    }
    if cfg.interval.is_some() && grown.is_none() {
        warnings.push("too few intervals after the warm-up to check memory and descriptor growth".into());
    }
    // Host noise seen by a 1 ms sleeper thread: stalls over 5 ms, and the time they took.
    let stalls_5ms = sleeper.as_ref().map(|h| h.count_between(5_000, h.max().max(5_000))).unwrap_or(0);
    if let Some(h) = sleeper.as_ref().filter(|_| stalls_5ms > 0) {
        warnings.push(format!(
            "this process's threads waited more than 5 ms for a CPU {stalls_5ms} times (max {:.1} ms, seen by a 1 ms sleeper thread): \
             latency tails of that size are the host's (or this process saturating the cores), not the system under test",
            report::max_ms(h).unwrap_or(0.0)
        ));
    }
    let manager_media = manager_stats.as_ref().map(|s| s.udp_media.load(Ordering::Relaxed));

    let mut text = String::new();
    use std::fmt::Write;
    let where_ = match cfg.manager {
        Some(a) => format!("manager {a}"),
        None => format!("embedded manager on {manager_addr} ({} io)", manager_io.unwrap_or("?")),
    };
    let _ = writeln!(
        text,
        "nullpunch loadgen setup: {} calls at {}/s, {where_}, {} callers -> {} callees, {:.1} s of media per call, {} io",
        cfg.calls,
        cfg.rate,
        cfg.callers,
        cfg.callees,
        cfg.talk.as_secs_f64(),
        cfg.io.as_str()
    );
    let _ = writeln!(
        text,
        "registered {} clients in {:.0} ms",
        cfg.callers + cfg.callees,
        registered_in.as_secs_f64() * 1000.0
    );
    let _ = writeln!(
        text,
        "calls: {ok} ok, {failed} failed ({:.2}% success); late starts (> 1 ms): {late}, start lateness p99 {:.3} ms, max {:.3} ms",
        if records.is_empty() { 0.0 } else { ok as f64 * 100.0 / records.len() as f64 },
        report::ms_at(&lateness, 0.99).unwrap_or(0.0),
        report::max_ms(&lateness).unwrap_or(0.0)
    );
    for (why, n) in &failures {
        let _ = writeln!(text, "  failed: {n} x {why}");
    }
    let _ = writeln!(text, "{}", report::header());
    let _ = writeln!(text, "{}", report::line("setup (plan -> 2-way media)", &setup));
    let _ = writeln!(text, "{}", report::line("  plan -> START", &to_start));
    let _ = writeln!(text, "{}", report::line("  CALL -> INCOMING", &call_incoming));
    let _ = writeln!(text, "{}", report::line("  INCOMING -> START", &incoming_start));
    let _ = writeln!(text, "{}", report::line("  START -> 2-way media", &start_media));
    let _ = writeln!(text, "{}", report::line("media one-way latency", &media_latency));
    if !samples.is_empty() {
        let _ = writeln!(
            text,
            "intervals:     t s   delivered/s      loss  jitter ms   p50 ms   p99 ms   max ms   rss MB    fds  cores"
        );
        for x in &samples {
            let _ = writeln!(
                text,
                "           {:>7.1}  {:>12.0}  {:>8.5}  {:>9.3}  {:>7.3}  {:>7.3}  {:>7.3}  {:>7.1}  {:>5}  {:>5.2}",
                x.t_s,
                x.pps,
                x.loss,
                x.jitter_ms.unwrap_or(0.0),
                x.latency_ms[0].unwrap_or(0.0),
                x.latency_ms[1].unwrap_or(0.0),
                x.latency_ms[2].unwrap_or(0.0),
                x.rss_mb.unwrap_or(0.0),
                x.fds.unwrap_or(0),
                x.cores
            );
        }
        if let Some((rss, fds, ok)) = grown {
            let _ = writeln!(
                text,
                "growth in the second half (after a {:.0} s warm-up): RSS {rss:+.1} MB, descriptors {fds:+}: {}",
                cfg.warmup.as_secs_f64(),
                if ok { "bounded" } else { "GROWING" }
            );
        }
    }
    let _ = writeln!(
        text,
        "media: {} packets sent, {} delivered, {} lost ({:.4}%); manager saw {} media packets",
        media.sent,
        media.received,
        media.lost,
        loss * 100.0,
        manager_media.map(|n| n.to_string()).unwrap_or_else(|| "? (external)".into())
    );
    if let Some(w) = window {
        let _ = writeln!(
            text,
            "steady state ({} {}sessions, {:.1} s window): {:.0} packets/s delivered, {:.2} cores busy, rss {:.1} MB ({:.2} KiB per session)",
            records.len(),
            if cfg.idle { "idle " } else { "" },
            w.secs,
            w.pps,
            w.cores,
            w.rss_mb.unwrap_or(0.0),
            per_session_kb.unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        text,
        "generator: {:.2} s wall, {:.2} s CPU ({:.0}% of {} cores), rss {:.1} MB",
        wall.as_secs_f64(),
        cpu,
        cpu_share * 100.0,
        sys::cores(),
        rss.unwrap_or(0.0)
    );
    if let Some(h) = &sleeper {
        let _ = writeln!(
            text,
            "host noise ({}): a 1 ms sleeper overslept p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; {} stalls over 5 ms",
            if window.is_some() { "window" } else { "run" },
            report::ms_at(h, 0.5).unwrap_or(0.0),
            report::ms_at(h, 0.99).unwrap_or(0.0),
            report::max_ms(h).unwrap_or(0.0),
            stalls_5ms
        );
    }
    for w in &warnings {
        let _ = writeln!(text, "WARNING: {w}");
    }

    let mut json = serde_json::json!({
        // The soak is the windowed run that samples intervals; summary.json, `report` and
        // `merge` read this name, so it is set here and not patched on stdout afterwards.
        "scenario": match (window.is_some(), cfg.interval.is_some()) {
            (true, true) => "soak",
            (true, false) => "sessions",
            (false, _) => "setup",
        },
        "sessions": window.map(|_| records.len()),
        "window_s": window.map(|w| (w.secs * 100.0).round() / 100.0),
        "cpu_cores": window.map(|w| (w.cores * 1000.0).round() / 1000.0),
        "idle": cfg.idle,
        "io": cfg.io.as_str(),
        "source_ips": sources.len(),
        "rss_per_session_kb": report::num(per_session_kb),
        "calls": records.len(),
        "calls_ok": ok,
        "calls_failed": failed,
        "failures": failures,
        "late_starts": late,
        "start_lateness_p99_ms": report::num(report::ms_at(&lateness, 0.99)),
        "target_rate": cfg.rate,
        "achieved_rate": report::num(achieved_rate),
        "setup_p50_ms": report::num(report::ms_at(&setup, 0.5)),
        "setup_p90_ms": report::num(report::ms_at(&setup, 0.9)),
        "setup_p99_ms": report::num(report::ms_at(&setup, 0.99)),
        "setup_p999_ms": report::num(report::ms_at(&setup, 0.999)),
        "setup_max_ms": report::num(report::max_ms(&setup)),
        "start_p99_ms": report::num(report::ms_at(&to_start, 0.99)),
        "pps_delivered": window.map(|w| w.pps).unwrap_or(media.received as f64 / span).round(),
        "packets_sent": media.sent,
        "frames_skipped": skipped,
        "packets_delivered": media.received,
        "loss_ratio": loss,
        // Delivered over sent: also sees packets lost after the last one received (which
        // RFC 3550 loss cannot), but counts packets still in flight at hang-up as missing.
        "delivery_ratio": if media.sent > 0 { Some(media.received as f64 / media.sent as f64) } else { None },
        "latency_p50_ms": report::num(report::ms_at(&media_latency, 0.5)),
        "latency_p99_ms": report::num(report::ms_at(&media_latency, 0.99)),
        "manager_media_packets": manager_media,
        "cpu_share": (cpu_share * 1000.0).round() / 1000.0,
        "sleeper_oversleep_p99_ms": report::num(sleeper.as_ref().and_then(|h| report::ms_at(h, 0.99))),
        "sleeper_oversleep_max_ms": report::num(sleeper.as_ref().and_then(report::max_ms)),
        "sleeper_stalls_over_5ms": stalls_5ms,
        "rss_mb": report::num(window.and_then(|w| w.rss_mb).or(rss)),
        "warnings": warnings,
        "intervals": (!samples.is_empty()).then(|| samples.iter().map(IntervalSample::json).collect::<Vec<_>>()),
        "rss_growth_mb": report::num(grown.map(|g| g.0)),
        "fd_growth": grown.map(|g| g.1),
        "growth_ok": grown.map(|g| g.2),
    });
    // First connections that waited for a local port (a previous run's TIME_WAITs).
    json["port_waits"] = shared.port_waits.load(Ordering::Relaxed).into();
    json["manager_io"] = manager_io.into();
    if let Some(churn) = cfg.churn {
        json["churn"] = churn.into();
    }
    if let Some(dir) = &cfg.out {
        let metrics = [
            ("setup", "setup (plan -> 2-way media)", &setup),
            ("plan_to_start", "plan -> START", &to_start),
            ("call_to_incoming", "CALL -> INCOMING", &call_incoming),
            ("incoming_to_start", "INCOMING -> START", &incoming_start),
            ("start_to_media", "START -> 2-way media", &start_media),
            ("media_latency", "media one-way latency", &media_latency),
        ];
        let title = match (window.as_ref(), cfg.interval) {
            (Some(w), Some(_)) => {
                format!("soak, {} calls set up at {}/s, held {:.0} s ({} ok)", cfg.calls, cfg.rate, w.secs, ok)
            }
            (Some(w), None) => {
                format!("sessions, {} calls set up at {}/s, held {:.0} s ({} ok)", cfg.calls, cfg.rate, w.secs, ok)
            }
            (None, _) => format!("call setup, {} calls at {}/s ({} ok)", cfg.calls, cfg.rate, ok),
        };
        crate::summary::files::write_run(dir, &json, &metrics, &title)
            .map_err(|e| format!("writing {}: {e}", dir.display()))?;
        if !samples.is_empty() {
            let rows: Vec<crate::summary::files::IntervalRow> = samples
                .iter()
                .map(|x| crate::summary::files::IntervalRow {
                    t_s: x.t_s,
                    secs: x.secs,
                    pps: x.pps,
                    loss: x.loss,
                    jitter_ms: x.jitter_ms,
                    latency_ms: x.latency_ms,
                    latency_hist: &x.latency_hist,
                    rss_mb: x.rss_mb,
                    fds: x.fds,
                    cores: x.cores,
                })
                .collect();
            crate::summary::files::write_intervals(dir, &rows)
                .map_err(|e| format!("writing {}: {e}", dir.display()))?;
        }
        let _ = writeln!(text, "results written to {}", dir.display());
    }
    let growth_ok = cfg.interval.is_none() || grown.is_some_and(|g| g.2);
    Ok(SetupOutcome { json, text, all_ok: failed == 0 && !records.is_empty() && growth_ok })
}

/// The generator's live metrics, and the embedded manager's after them.
fn render_metrics(sh: &Shared, manager: Option<&proto::shard::stats::Stats>) -> String {
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
