//! What a run measures: one [`Scenario`] with its parameters, checked and in the units the
//! run uses, carried into the run together with its target, how its clients run, and what
//! it prints and writes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Error;
use crate::summary::Summary;
use crate::target::Target;
use crate::{audio, calls, fleet, hostile, register};

/// A run, ready to go.
pub struct Run {
    /// What it measures.
    pub scenario: Scenario,
    /// The manager it points at, and the clients' credentials.
    pub target: Target,
    /// How its simulated clients run.
    pub fleet: fleet::Options,
    /// What it prints and writes.
    pub output: Output,
}

/// What a run prints, serves and writes.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Print only the summary as one JSON object (`--json`).
    pub json: bool,
    /// Record the run in this directory (`--out`).
    pub dir: Option<PathBuf>,
    /// Show a live progress line on stderr.
    pub progress: bool,
    /// Serve live Prometheus metrics here while the run lasts (`--metrics`).
    pub metrics: Option<SocketAddr>,
    /// Pass/fail criteria on the summary (`--threshold`).
    pub thresholds: Vec<crate::threshold::Threshold>,
    /// A live line every this often (`setup`, `sessions`; `soak` has one per interval).
    pub live_every: Option<Duration>,
    /// The live rows also go into this CSV file (`--live-csv`).
    pub live_csv: Option<PathBuf>,
}

/// The scenarios.
#[derive(Debug, Clone)]
pub enum Scenario {
    /// Open-loop call setup at a target rate, latency from each call's planned start.
    Setup(CallLoad),
    /// Concurrent two-way sessions held through a measured steady-state window.
    Sessions(Sessions),
    /// Sessions held (or churned) for a long time, sampled at intervals, with a growth check.
    Soak(Soak),
    /// Clients registered at a ramped rate and held.
    Register(Register),
    /// Mouth-to-ear latency of one voice call.
    AudioLatency(Audio),
    /// The same setup run clean and under attack, against one manager with production limits.
    Hostile(Hostile),
}

/// The calls of a `setup`, `sessions` or `soak` run: call `k` is planned by the `plan` (at
/// `t0 + k / rate` for an even constant rate), placed by caller `k % callers` to callee
/// `(k + k / callers) % callees`.
#[derive(Debug, Clone)]
pub struct CallLoad {
    /// Call arrivals per second (the plan's mean rate).
    pub rate: f64,
    /// Number of calls.
    pub calls: u64,
    /// Media time per call before the caller hangs up (zero: at the first two-way media);
    /// the mean, if `talk_dist` draws it per call.
    pub talk: Duration,
    /// Simulated callers.
    pub callers: usize,
    /// Simulated callees (each answers any number of calls at once).
    pub callees: usize,
    /// When each call is due.
    pub plan: crate::plan::Plan,
    /// How each call's talk time is drawn (seeded with `seed`).
    pub talk_dist: crate::plan::TalkDist,
    /// Seeds the talk times (and Poisson arrivals).
    pub seed: u64,
    /// Calls up at once at most (SIPp's -l): a call due while this many are up waits, and
    /// its wait counts as lateness.
    pub max_concurrent: Option<u64>,
}

impl CallLoad {
    /// `calls` calls evenly at `rate`, each talking `talk`.
    pub fn even(rate: f64, calls: u64, talk: Duration, callers: usize, callees: usize) -> CallLoad {
        CallLoad {
            rate,
            calls,
            talk,
            callers,
            callees,
            plan: crate::plan::Plan::constant(rate, calls, crate::plan::Arrivals::Even),
            talk_dist: crate::plan::TalkDist::Fixed,
            seed: 1,
            max_concurrent: None,
        }
    }
}

/// The steady-state window of a `sessions` or `soak` run, in which delivered packets, CPU
/// and one-way latency are measured.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Its start, from t0.
    pub offset: Duration,
    /// Its length.
    pub len: Duration,
}

/// A `sessions` run.
#[derive(Debug, Clone)]
pub struct Sessions {
    /// The calls, each lasting through the window.
    pub load: CallLoad,
    /// The steady-state window.
    pub window: Window,
    /// Hold the sessions without media, by keepalives alone (memory per session).
    pub idle: bool,
}

/// A `soak` run.
#[derive(Debug, Clone)]
pub struct Soak {
    /// The calls, held through the window or churned.
    pub load: CallLoad,
    /// The steady state.
    pub window: Window,
    /// Sample loss, jitter, latency, packets/s, RSS and descriptors this often.
    pub interval: Duration,
    /// Time from t0 the growth check leaves out.
    pub warmup: Duration,
    /// Calls ended and replaced per second (0: the same sessions throughout).
    pub churn: f64,
}

/// A `register` run.
#[derive(Debug, Clone)]
pub struct Register {
    /// Clients.
    pub clients: usize,
    /// Connects started per second.
    pub rate: f64,
    /// How long to hold every registration once all are in.
    pub hold: Duration,
    /// Client ids are this followed by the client's index.
    pub id_prefix: String,
}

/// An `audio-latency` run.
#[derive(Debug, Clone)]
pub struct Audio {
    /// Opus frame duration, ms.
    pub frame_ms: u32,
    /// Packets dropped on receipt, percent.
    pub loss_pct: f64,
    /// Uniform extra arrival delay 0..this, ms.
    pub jitter_ms: f64,
    /// Length of the measured talk.
    pub duration: Duration,
    /// One chirp every this many ms.
    pub period_ms: u32,
    /// Seed of the loss and jitter model.
    pub seed: u64,
    /// The jitter buffer's minimum delay, ms.
    pub min_delay_ms: f64,
}

/// A `hostile` run.
#[derive(Debug, Clone)]
pub struct Hostile {
    /// The legitimate calls of each of the two setup runs.
    pub load: CallLoad,
    /// The attack during the second.
    pub attack: Attack,
    /// Instead of the two runs: a REGISTER flood of distinct ids (`--register-flood`).
    pub flood: Option<hostile::Flood>,
}

/// The attack of a `hostile` run.
#[derive(Debug, Clone)]
pub struct Attack {
    /// Idle connections held.
    pub idle: usize,
    /// Half-frame connections held.
    pub half: usize,
    /// New connections per second for each of: random bytes, oversized prefix, REGISTER.
    pub churn_rate: f64,
}

/// Run `run` to its summary.
pub fn run(run: &Run) -> Result<Summary, Error> {
    let (target, fleet, output) = (&run.target, &run.fleet, &run.output);
    match &run.scenario {
        Scenario::Setup(load) => calls::run(calls::Calls::Setup(load), target, fleet, output),
        Scenario::Sessions(s) => calls::run(calls::Calls::Sessions(s), target, fleet, output),
        Scenario::Soak(s) => calls::run(calls::Calls::Soak(s), target, fleet, output),
        Scenario::Register(r) => register::run(r, target, fleet, output),
        Scenario::AudioLatency(a) => audio::run(a, target, fleet, output),
        Scenario::Hostile(Hostile { flood: Some(f), .. }) => hostile::flood(f, target, output),
        Scenario::Hostile(h) => hostile::run(h, target, fleet, output),
    }
}
