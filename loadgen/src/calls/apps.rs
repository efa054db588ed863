//! The simulated clients of a calls run: callers place the calls the scheduler releases to
//! them and record what they saw of each; callees answer any number of calls at once. Both
//! send and receive synthetic media and record its one-way latency.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::driver::{App, Ctx, Streams};
use hdrhistogram::Histogram;
use proto::client::{CallHandle, Event, Received};
use proto::media::SyntheticSource;
use proto::wire::frame::{CallId, ClientId};

use crate::error::Error;
use crate::fleet::Wake;
use crate::summary::hist::{new_histogram, record};

/// What a caller saw of one call.
#[derive(Debug, Clone)]
pub struct CallRecord {
    /// Its planned start (`t0 + k / rate`).
    pub planned: Instant,
    /// When the caller placed it (CALL).
    pub sent: Instant,
    /// Its call id, from START.
    pub call_id: Option<CallId>,
    /// START.
    pub start: Option<Instant>,
    /// Two-way media: the first packet from the callee.
    pub flowing: Option<Instant>,
    /// How long it was to talk.
    pub talk: Duration,
    /// Why it failed (None: it succeeded).
    pub outcome: Option<String>,
    /// RFC 3550 interarrival jitter J of the media the caller received, ms, at the call's
    /// end (None: fewer than two packets, J needs two transit times).
    pub jitter_ms: Option<f64>,
    /// With several managers: whether caller and callee started on different ones (a call
    /// across cluster nodes). None with one manager.
    pub cross_node: Option<bool>,
}

/// Which manager each client starts on when there are several (member `n` of the fleet at
/// manager `n % managers`), so that calls within one node and calls across nodes are told
/// apart. A client that failed over is still counted at its first manager.
#[derive(Debug, Clone)]
pub struct NodeMap {
    /// Managers.
    pub managers: usize,
    /// Fleet member index of caller `i`.
    pub caller_member: Vec<usize>,
    /// Fleet member index of callee `j`.
    pub callee_member: Vec<usize>,
}

impl NodeMap {
    /// Whether `caller-i` and `callee-j` start on different managers.
    pub fn cross(&self, caller: &ClientId, callee: &ClientId) -> Option<bool> {
        let i: usize = caller.as_str().strip_prefix("caller-")?.parse().ok()?;
        let j: usize = callee.as_str().strip_prefix("callee-")?.parse().ok()?;
        let m = self.managers.max(1);
        Some(self.caller_member.get(i)? % m != self.callee_member.get(j)? % m)
    }
}

/// Media packets of the calls a client saw end (from their RFC 3550 reports).
#[derive(Default)]
pub struct MediaTotals {
    /// Packets sent.
    pub sent: u64,
    /// Packets received.
    pub received: u64,
    /// Packets lost.
    pub lost: u64,
}

impl MediaTotals {
    /// Add one call's or one client's packets.
    pub fn add(&mut self, sent: u64, received: u64, lost: u64) {
        self.sent += sent;
        self.received += received;
        self.lost += lost;
    }
}

/// Shared between the generator's tasks; touched once per call, never per packet.
pub struct Shared {
    pub epoch: Instant,
    /// Media packets received by all clients (one relaxed add per packet).
    pub rx_packets: AtomicU64,
    /// Record one-way latency now (always, unless a window limits it).
    pub record_latency: AtomicBool,
    /// No media: sessions are held by keepalives alone.
    pub idle: bool,
    pub registered: AtomicUsize,
    /// Callers whose calls have all ended.
    pub callers_done: AtomicUsize,
    /// Media frames sent by all clients.
    pub tx_packets: AtomicU64,
    /// Per-interval measurements (soak runs).
    pub intervals: Option<IntervalRec>,
    /// Calls placed, and calls ended well or not (for the progress line).
    pub placed: AtomicU64,
    pub ended_ok: AtomicU64,
    pub ended_failed: AtomicU64,
    pub stop_callees: AtomicBool,
    pub incoming: Mutex<HashMap<CallId, Instant>>,
    /// Setup times of successful calls (planned start to two-way media), for the metrics
    /// endpoint.
    pub setup_time: proto::shard::stats::LatencyHistogram,
    /// The same, since the last live line (swapped out by the live thread).
    pub live_setup: Mutex<Histogram<u64>>,
    /// The manager refused a registration (ERROR Unauthorized): its message.
    pub refused: Mutex<Option<String>>,
    /// First connections that waited for a free local port (summed at registration).
    pub port_waits: AtomicU64,
    /// With several managers: where each client starts.
    pub nodes: Option<NodeMap>,
}

/// What an interval of a soak run collects, swapped out by the sampler at each interval's end.
pub struct IntervalRec {
    pub latency: Mutex<Histogram<u64>>,
    /// Sum and count of |D|, the RFC 3550 transit-time difference of consecutive packets of
    /// a stream, in microseconds: their mean is what the RFC's jitter J estimates.
    pub jitter_sum_us: AtomicU64,
    pub jitter_n: AtomicU64,
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
pub struct Inbox {
    due: Mutex<VecDeque<(Instant, ClientId, Duration)>>,
    /// Wakes the caller.
    pub wake: Arc<Wake>,
}

impl Inbox {
    /// An empty inbox for a caller on `io`.
    pub fn new(io: engine::driver::Io) -> Result<Inbox, Error> {
        Ok(Inbox { due: Mutex::new(VecDeque::new()), wake: Wake::new(io)? })
    }

    /// Release call to `callee`, planned at `planned`, to talk `talk`, and wake the caller.
    pub fn release(&self, planned: Instant, callee: ClientId, talk: Duration) {
        self.due.lock().unwrap_or_else(|e| e.into_inner()).push_back((planned, callee, talk));
        self.wake.notify();
    }
}

impl Shared {
    /// Calls ended so far, well or not.
    pub fn ended(&self) -> u64 {
        self.ended_ok.load(Ordering::Relaxed) + self.ended_failed.load(Ordering::Relaxed)
    }

    /// Shared state for a run: one-way latency recorded from the start (`record_latency`)
    /// or only once a window opens; sessions `idle` (no media); `sampled` at intervals.
    pub fn new(record_latency: bool, idle: bool, sampled: bool) -> Shared {
        Shared {
            epoch: Instant::now(),
            rx_packets: AtomicU64::new(0),
            record_latency: AtomicBool::new(record_latency),
            idle,
            registered: AtomicUsize::new(0),
            callers_done: AtomicUsize::new(0),
            tx_packets: Default::default(),
            intervals: sampled.then(IntervalRec::default),
            placed: Default::default(),
            ended_ok: Default::default(),
            ended_failed: Default::default(),
            stop_callees: AtomicBool::new(false),
            incoming: Mutex::new(HashMap::new()),
            setup_time: Default::default(),
            live_setup: Mutex::new(new_histogram()),
            refused: Mutex::new(None),
            port_waits: AtomicU64::new(0),
            nodes: None,
        }
    }

    /// The same, telling calls within one manager from calls across managers by `nodes`.
    pub fn with_nodes(mut self, nodes: Option<NodeMap>) -> Shared {
        self.nodes = nodes;
        self
    }

    /// Remember the first registration the manager refused (ERROR Unauthorized).
    fn note_refusal(&self, event: &Event) {
        if let Event::ManagerError { code: proto::wire::frame::ErrorCode::Unauthorized, message } = event {
            self.refused.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| message.clone());
        }
    }

    /// Count a client's first registration (re-registrations after a reconnect are not).
    fn count_registration(&self, counted: &mut bool, counters: &engine::driver::DriverCounters) {
        if !std::mem::replace(counted, true) {
            self.registered.fetch_add(1, Ordering::Relaxed);
            self.port_waits.fetch_add(counters.port_waits, Ordering::Relaxed);
        }
    }
}

/// A caller: places the calls released to it, streams media on each until its talk time
/// is over (or hangs up at the first two-way media), and keeps a record of each call.
pub struct CallerApp {
    pub shared: Arc<Shared>,
    pub inbox: Arc<Inbox>,
    /// Calls not yet released by the scheduler.
    pub remaining: usize,
    pub inflight: HashMap<CallHandle, CallRecord>,
    pub done_records: Vec<CallRecord>,
    pub streams: Streams,
    pub talk: Duration,
    pub latency: Histogram<u64>,
    pub media: MediaTotals,
    pub counted_registration: bool,
    pub counted_done: bool,
    /// Last one-way transit per call (soak jitter).
    pub transit: HashMap<CallHandle, u64>,
}

/// A callee: answers every call, streams media back once the caller's arrives, and hangs
/// up everything once told to stop.
pub struct CalleeApp {
    pub shared: Arc<Shared>,
    pub streams: Streams,
    pub latency: Histogram<u64>,
    pub media: MediaTotals,
    pub counted_registration: bool,
    pub transit: HashMap<CallHandle, u64>,
    pub stopping: bool,
    /// Next check of the stop flag.
    pub next_poll: Instant,
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
                let mut talk = self.talk;
                if let Some(r) = self.inflight.get_mut(&handle) {
                    r.start = Some(ctx.now);
                    r.call_id = Some(call_id);
                    talk = r.talk;
                }
                let end = ctx.now + talk;
                // No talk time: hang up at the first two-way media (in on_media).
                self.streams.start(handle, ctx.now, (!talk.is_zero()).then_some(end));
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
                    r.jitter_ms = (rep.received >= 2).then_some(rep.jitter_ms);
                    let counter = if ok { &self.shared.ended_ok } else { &self.shared.ended_failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let (true, Some(f)) = (ok, r.flowing) {
                        let setup = f.saturating_duration_since(r.planned);
                        self.shared.setup_time.record(setup);
                        record(&mut self.shared.live_setup.lock().unwrap_or_else(|e| e.into_inner()), setup);
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
        let talk = self.inflight.get(&p.handle).map_or(self.talk, |r| r.talk);
        if first && talk.is_zero() {
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
        let due: Vec<(Instant, ClientId, Duration)> =
            self.inbox.due.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        for (planned, callee, talk) in due {
            self.remaining -= 1;
            self.shared.placed.fetch_add(1, Ordering::Relaxed);
            let cross_node = self.shared.nodes.as_ref().and_then(|n| n.cross(&ctx.client.config().id, &callee));
            let mut r = CallRecord {
                planned,
                sent: ctx.now,
                call_id: None,
                start: None,
                flowing: None,
                talk,
                outcome: None,
                jitter_ms: None,
                cross_node,
            };
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
pub enum SimApp {
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
}

/// A caller with `remaining` calls to place, each lasting `talk`.
pub fn caller_app(shared: Arc<Shared>, inbox: Arc<Inbox>, remaining: usize, talk: Duration) -> CallerApp {
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

/// A callee.
pub fn callee_app(shared: Arc<Shared>) -> CalleeApp {
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
