//! The command line: subcommands, flags, defaults and help text, and their conversion into
//! a checked [`Run`] (a scenario, its target, how its clients run, what it writes) or a
//! command on recorded runs.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

use crate::error::Error;
use crate::fleet;
use crate::plan::{Arrivals, Plan, TalkDist};
use crate::scenario::{Attack, Audio, CallLoad, Hostile, Output, Register, Run, Scenario, Sessions, Soak, Window};
use crate::target::{Embedded, External, Limits, Target};

/// nullpunch load generator.
///
/// Drives many simulated clients (real client state machines, real sockets on loopback)
/// against a manager started in-process (the default) or an external one, and reports call
/// setup times as HdrHistogram percentiles measured from each call's planned start.
///
/// With no subcommand it runs a short demo: `setup` with its defaults (300 calls at 100/s,
/// each with 1 s of media both ways).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open-loop call setup at a target rate: the full flow per call, latency from the
    /// planned start, failures counted by cause.
    Setup(SetupArgs),
    /// S concurrent two-way sessions at 50 packets/s each way, held for a measured
    /// steady-state window: delivered packets/s, loss, one-way latency, CPU and RSS.
    Sessions(SessionsArgs),
    /// C clients connect (ramped), discover their address, register, and hold their
    /// connections: registration rate and latency, whether they all hold, memory and file
    /// descriptors per client.
    Register(RegisterArgs),
    /// S concurrent two-way sessions held for a long time (optionally churned), sampled at
    /// intervals: delivered packets/s, loss, jitter, one-way latency, RSS, descriptors, CPU.
    /// Fails if RSS or descriptors grow after the warm-up.
    Soak(SoakArgs),
    /// Mouth-to-ear latency of a voice call, both ends in this process on one clock: a
    /// chirp injected into the caller's captured audio at known times is found by
    /// cross-correlation in the callee's played-out audio (capture frame + encode + network
    /// + jitter buffer + decode), with optional seeded loss and jitter.
    AudioLatency(AudioArgs),
    /// The same `setup` run twice against one in-process manager with production limits:
    /// clean, then while other connections attack it (random bytes, oversized length
    /// prefixes, half frames held open, thousands of idle connections, REGISTER floods).
    /// Reports both runs, the p99 ratio, the attack and the manager's answers, and memory.
    /// Fails if a legitimate call fails or p99 more than doubles.
    Hostile(HostileArgs),
    /// Re-print a recorded run (a directory written with --out) from its files.
    Report {
        /// The run's directory.
        dir: std::path::PathBuf,
        /// Print its summary JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Merge recorded runs of one scenario (for example from several generator machines
    /// driving one system at the same time): counts and rates are added, histograms are
    /// added, and percentiles are computed from the merged histograms, never averaged.
    Merge {
        /// Where to write the merged run.
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// The runs' directories (two or more).
        #[arg(required = true, num_args = 2..)]
        runs: Vec<std::path::PathBuf>,
        /// Print only the merged summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Options every scenario takes.
#[derive(ClapArgs, Debug, Clone)]
struct Common {
    /// External manager HOST:PORT (default: start one in-process on loopback). Several,
    /// comma-separated (managers of one service): client i starts at the (i mod n)-th and
    /// fails over to the next ones when its manager is lost.
    #[arg(long, alias = "managers")]
    manager: Option<String>,
    /// Local IP for the simulated clients (and the embedded manager).
    #[arg(long, default_value = "127.0.0.1")]
    bind_ip: IpAddr,
    /// Spread the simulated clients over this many consecutive loopback addresses from
    /// --bind-ip (0: one, or as many as needed when one address runs out of ephemeral
    /// ports; see docs/running.md).
    #[arg(long, default_value_t = 0)]
    source_ips: usize,
    /// Generator threads (0: one per core): io_uring ring threads, or tokio workers.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// UDP IO of the simulated clients: uring (the thread-per-core io_uring driver),
    /// portable (tokio + quinn-udp), or auto (uring where it can be set up, else portable;
    /// the NULLPUNCH_IO environment variable overrides auto).
    #[arg(long, default_value = "auto")]
    io: String,
    /// Print only the summary as one JSON object (last line of stdout).
    #[arg(long)]
    json: bool,
    /// Write command.txt, machine.txt, summary.json, per metric an .hgrm percentile table
    /// and an .hlog histogram log, and plots (SVG) into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<std::path::PathBuf>,
    /// The manager's secret file: every simulated client registers with a token minted
    /// from it (an external manager started with the same --secret-file), and an embedded
    /// manager requires tokens.
    #[arg(long, value_name = "PATH")]
    secret_file: Option<std::path::PathBuf>,
    /// Pass only if FIELD OP NUMBER holds for the summary (any numeric field, `a.b` for a
    /// nested one; OP one of <, <=, >, >=, ==, !=), e.g. 'setup_p99_ms<10' or
    /// 'loss_ratio<0.0001'. May be given several times. A failed threshold, or a generator
    /// that could not keep to its plan (`generator_overloaded`), makes the exit status 1.
    #[arg(long = "threshold", value_name = "EXPR", value_parser = crate::threshold::parse)]
    thresholds: Vec<crate::threshold::Threshold>,
    /// The one SRTP suite the simulated clients use: AEAD_AES_128_GCM (the default) or
    /// AES_CM_128_HMAC_SHA1_80.
    #[arg(long, value_name = "NAME", value_parser = parse_suite)]
    srtp_suite: Option<u8>,
    /// Plain RTP instead of SRTP: only to measure what SRTP costs.
    #[arg(long, conflicts_with = "srtp_suite")]
    no_srtp: bool,
    /// TLS 1.3 between the clients and the manager: an embedded manager serves it with a
    /// throwaway certificate; an external one (--manager) is trusted through --ca or --pin.
    #[arg(long)]
    tls: bool,
    /// With --tls and --manager: trust the manager's certificate if it chains to a
    /// certificate in this PEM file (it must name the manager's IP address).
    #[arg(long, value_name = "PEM", requires = "tls", conflicts_with = "pin")]
    ca: Option<std::path::PathBuf>,
    /// With --tls and --manager: trust exactly the manager certificate with this SHA-256
    /// fingerprint of its DER (hex, colons allowed).
    #[arg(long, value_name = "SHA256", requires = "tls", value_parser = parse_pin)]
    pin: Option<[u8; 32]>,
    /// Instead of one embedded manager, a cluster of N (2 to 16) on NATS in this process
    /// (docs/cluster.md): a `nats-server` is started on a free loopback port (it must be
    /// installed) and the clients spread over the managers as with several --manager.
    #[arg(long, value_name = "N", conflicts_with = "manager", value_parser = clap::value_parser!(u8).range(2..=16))]
    cluster_nodes: Option<u8>,
    /// With --cluster-nodes: stop the last manager this many seconds after the calls
    /// begin (its clients fail over to the next manager), and report how long until every
    /// client was connected again (`cluster.failover_s`).
    #[arg(long, value_name = "SECS", requires = "cluster_nodes", value_parser = secs_non_negative)]
    kill_node_at: Option<f64>,
}

fn parse_suite(s: &str) -> Result<u8, String> {
    match proto::e2e::suite_from_name(s) {
        Some(proto::e2e::SUITE_NONE) | None => {
            Err(format!("`{s}`: expected AEAD_AES_128_GCM or AES_CM_128_HMAC_SHA1_80"))
        }
        Some(c) => Ok(c),
    }
}

/// Live output, for the calls scenarios (setup, sessions, soak).
#[derive(ClapArgs, Debug, Clone, Default)]
struct MetricsArg {
    /// Serve live Prometheus metrics on http://ADDR/metrics while the run lasts: the
    /// generator's calls, setup times and packets, and the embedded manager's metrics. The
    /// address is printed on stderr (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Also write the live lines as CSV rows into FILE, one per interval as it ends.
    #[arg(long, value_name = "FILE")]
    live_csv: Option<PathBuf>,
}

/// How often `setup` and `sessions` print a live line (`soak` prints one per --interval).
#[derive(ClapArgs, Debug, Clone)]
struct LiveEvery {
    /// Print a line every SECS seconds while the run lasts (calls placed, ended, setup p50 and
    /// p99, media rate), on stdout (on stderr with --json); 0: none.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = secs_non_negative)]
    live_every: f64,
}

#[derive(ClapArgs, Debug)]
struct HostileArgs {
    /// Shards of the embedded manager (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Legitimate call arrivals per second.
    #[arg(long, default_value_t = 500.0, value_parser = rate)]
    rate: f64,
    /// Legitimate calls per run (instead of --duration).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000_000), conflicts_with = "duration")]
    calls: Option<u64>,
    /// Seconds of legitimate arrivals per run (calls = rate x duration).
    #[arg(long, default_value_t = 10.0, value_parser = secs_positive)]
    duration: f64,
    /// Seconds of media per legitimate call (0: hang up at the first two-way media).
    #[arg(long, default_value_t = 0.0, value_parser = secs_non_negative)]
    talk: f64,
    /// Simulated callers (default: 50, or the calls if fewer).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    callers: Option<u64>,
    /// Simulated callees (each answers any number of calls at once).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    callees: u64,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    tick: Tick,
    /// Idle connections held during the attack.
    #[arg(long, default_value_t = 2000)]
    idle: usize,
    /// Half-frame connections held during the attack.
    #[arg(long, default_value_t = 500)]
    half: usize,
    /// New attacking connections per second of each kind (random bytes, oversized prefix,
    /// REGISTER flood).
    #[arg(long, alias = "churn-rate", default_value_t = 50.0, value_parser = rate)]
    attack_rate: f64,
    /// Instead of the two setup runs: register N distinct new ids, each on a connection of
    /// its own closed (with a reset) at REGISTERED, and sample the manager's memory and
    /// directory every --flood-sample-every ids.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    register_flood: Option<u64>,
    /// With --register-flood: connections at a time (one thread each).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    flood_concurrency: u64,
    /// With --register-flood: connections started per second at most (0: as fast as they
    /// complete).
    #[arg(long, value_name = "N", default_value_t = 0.0, value_parser = rate_or_zero)]
    flood_rate: f64,
    /// With --register-flood: a memory and directory sample every N ids.
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    flood_sample_every: u64,
    /// With --manager: the external manager's pid, for its memory.
    #[arg(long, requires = "manager_metrics")]
    manager_pid: Option<u32>,
    /// With --manager: its metrics URL (`manager --metrics`), for its counters.
    #[arg(long, value_name = "URL", requires = "manager_pid")]
    manager_metrics: Option<String>,
}

#[derive(ClapArgs, Debug, Clone)]
struct AudioArgs {
    /// Opus frame duration, ms: 10, 20, 40 or 60.
    #[arg(long, default_value_t = 20)]
    frame_ms: u32,
    /// Packets lost, percent (seeded Bernoulli model applied on receipt).
    #[arg(long, default_value_t = 0.0, value_parser = percent)]
    loss: f64,
    /// Extra arrival delay, uniform 0..this many ms per packet (seeded; packets may reorder).
    #[arg(long, default_value_t = 0.0, value_parser = jitter_ms)]
    jitter_ms: f64,
    /// Seconds of talk.
    #[arg(long, default_value_t = 30.0, value_parser = secs_positive)]
    duration: f64,
    /// One chirp every this many ms (latencies up to this less 40 ms can be told apart).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(200..=10_000))]
    period_ms: u32,
    /// Seed of the loss and jitter model.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The jitter buffer's minimum delay, ms.
    #[arg(long, default_value_t = 5.0, value_parser = jitter_ms)]
    jitter_min_ms: f64,
    #[command(flatten)]
    common: Common,
}

/// The io_uring driver's timer tick.
#[derive(ClapArgs, Debug, Clone)]
struct Tick {
    /// Timer tick of the io_uring driver in microseconds: media frames due within a tick
    /// leave in one submission (each up to a tick late), and a batched receive wait lasts
    /// at most a tick.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..=20_000))]
    tick_us: u64,
}

#[derive(ClapArgs, Debug, Clone)]
struct SoakArgs {
    /// Concurrent sessions, each two-way at 50 packets/s.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    sessions: u64,
    /// Seconds of steady state (after the ramp).
    #[arg(long, default_value_t = 600.0, value_parser = secs_positive)]
    duration: f64,
    /// Seconds per sample (at least 1); the growth check needs 3 samples after the warm-up.
    #[arg(long, default_value_t = 10.0, value_parser = interval_secs)]
    interval: f64,
    /// Calls ended and replaced per second (0: the same sessions throughout). Each call then
    /// lasts sessions / churn seconds, so `sessions` stay up.
    #[arg(long, default_value_t = 0.0, value_parser = rate_or_zero)]
    churn: f64,
    /// Sessions set up per second while ramping up (without churn).
    #[arg(long, default_value_t = 1000.0, value_parser = rate)]
    ramp: f64,
    /// Seconds from the start not used for the growth check (default: the ramp plus one
    /// interval).
    #[arg(long, value_parser = secs_non_negative)]
    warmup: Option<f64>,
    /// Simulated clients on each side (0: two per core).
    #[arg(long, default_value_t = 0)]
    clients: usize,
    /// Shards of the embedded manager (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    metrics: MetricsArg,
    #[command(flatten)]
    tick: Tick,
}

#[derive(ClapArgs, Debug, Clone)]
struct RegisterArgs {
    /// Clients to register.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    clients: u64,
    /// Connects started per second (ramp).
    #[arg(long, default_value_t = 2000.0, value_parser = rate)]
    rate: f64,
    /// Seconds to hold every registration once all are in.
    #[arg(long, default_value_t = 5.0, value_parser = secs_non_negative)]
    hold: f64,
    /// With an external manager: its process id, to report its memory per registration
    /// (RSS before and after, from /proc).
    #[arg(long, requires = "manager")]
    manager_pid: Option<u32>,
    /// Client ids are PREFIX0, PREFIX1, ...: several generator processes against one
    /// manager (each with its own descriptor limit) need distinct prefixes.
    #[arg(long, default_value = "reg-")]
    id_prefix: String,
    /// Shards of the embedded manager (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(ClapArgs, Debug, Clone)]
struct SessionsArgs {
    /// Concurrent sessions (calls), each two-way at 50 packets/s.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    sessions: u64,
    /// Seconds of steady state to measure, once every session is up.
    #[arg(long, default_value_t = 10.0, value_parser = secs_positive)]
    duration: f64,
    /// Simulated clients on each side; their sessions share each client's one UDP socket
    /// (0: two per core, so no single task carries too large a share).
    #[arg(long, default_value_t = 0)]
    clients: usize,
    /// One socket (and one client, with its own TCP connection) per session on each side,
    /// instead of sessions sharing their client's socket: for tests that need a distinct
    /// port per session. Same as --clients equal to --sessions.
    #[arg(long, conflicts_with = "clients")]
    socket_per_session: bool,
    /// Sessions set up per second while ramping up.
    #[arg(long, default_value_t = 1000.0, value_parser = rate)]
    ramp: f64,
    /// Shards of the embedded manager (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Hold the sessions without media, by keepalives alone (measures memory per session).
    #[arg(long)]
    idle: bool,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    metrics: MetricsArg,
    #[command(flatten)]
    live: LiveEvery,
    #[command(flatten)]
    tick: Tick,
}

#[derive(ClapArgs, Debug, Clone)]
struct SetupArgs {
    /// Shards of the embedded manager (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Call arrivals per second.
    #[arg(long, default_value_t = 100.0, value_parser = rate)]
    rate: f64,
    /// Number of calls (ignored when --duration is given).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    calls: u64,
    /// Run for this many seconds of arrivals instead of a call count (calls = rate x duration).
    #[arg(long, value_parser = secs_positive)]
    duration: Option<f64>,
    /// Seconds of media per call before the caller hangs up (0: hang up at the first
    /// two-way media).
    #[arg(long, default_value_t = 1.0, value_parser = secs_non_negative)]
    talk: f64,
    /// Simulated callers (default: 50, or the calls if fewer).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    callers: Option<u64>,
    /// Simulated callees (each answers any number of calls at once).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    callees: u64,
    #[command(flatten)]
    shape: Shape,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    metrics: MetricsArg,
    #[command(flatten)]
    live: LiveEvery,
    #[command(flatten)]
    tick: Tick,
}

/// The shape of a `setup` load beyond a constant even rate.
#[derive(ClapArgs, Debug, Clone)]
struct Shape {
    /// Ramp the arrival rate in stages instead of --rate/--calls/--duration: DURATION:RATE,...
    /// each stage moving linearly from the previous stage's rate (0 at the start) to its
    /// own, e.g. 30s:1000,60s:1000,30s:0 (up, hold, down). Durations as 30, 30s or 2m.
    #[arg(long, value_name = "STAGES", value_parser = crate::plan::parse_stages_arg, conflicts_with_all = ["rate", "calls", "duration"])]
    stages: Option<crate::plan::Stages>,
    /// How arrivals spread at the rate: even (one every 1/rate s) or poisson (exponential
    /// gaps of mean 1/rate, seeded with --seed).
    #[arg(long, value_name = "KIND", default_value = "even", value_parser = ["even", "poisson"])]
    arrivals: String,
    /// How long each call talks, around --talk: fixed, exp (exponential of mean --talk) or
    /// uniform (0 to twice --talk), seeded with --seed.
    #[arg(long, value_name = "KIND", default_value = "fixed", value_parser = ["fixed", "exp", "uniform"])]
    talk_dist: String,
    /// Seed of Poisson arrivals and drawn talk times.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Calls up at once at most (like SIPp's -l): a call due while this many are up waits
    /// for one to end, and the wait counts as lateness (the plan stays open-loop).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    max_concurrent: Option<u64>,
}

impl Default for SetupArgs {
    fn default() -> Self {
        SetupArgs::parse_from(["setup"])
    }
}

impl SetupArgs {
    fn parse_from<I: IntoIterator<Item = &'static str>>(args: I) -> Self {
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            a: SetupArgs,
        }
        W::parse_from(args).a
    }
}

/// What the command line asks for.
pub enum Command {
    /// Run a scenario.
    Run(Box<Run>),
    /// Re-print a recorded run.
    Report {
        /// The run's directory.
        dir: PathBuf,
        /// Print its summary JSON instead.
        json: bool,
    },
    /// Merge recorded runs into `out`.
    Merge {
        /// Where to write the merged run.
        out: PathBuf,
        /// The runs' directories.
        runs: Vec<PathBuf>,
        /// Print only the merged summary as one JSON object.
        json: bool,
    },
}

impl Cli {
    /// The command, its flags checked: the secret file is read first, then each scenario's
    /// flags in the order they are reported.
    pub fn command(self) -> Result<Command, Error> {
        let secret = match self.secret_file() {
            Some(p) => Some(Arc::new(engine::sys::read_secret(&p).map_err(Error::SecretFile)?)),
            None => None,
        };
        let run = match self.cmd {
            None => setup(SetupArgs::default(), secret)?,
            Some(Cmd::Setup(a)) => setup(a, secret)?,
            Some(Cmd::Sessions(a)) => sessions(a, secret)?,
            Some(Cmd::Register(a)) => register(a, secret)?,
            Some(Cmd::Soak(a)) => soak(a, secret)?,
            Some(Cmd::AudioLatency(a)) => audio(a, secret)?,
            Some(Cmd::Hostile(a)) => hostile(a, secret)?,
            Some(Cmd::Report { dir, json }) => return Ok(Command::Report { dir, json }),
            Some(Cmd::Merge { out, runs, json }) => return Ok(Command::Merge { out, runs, json }),
        };
        Ok(Command::Run(Box::new(run)))
    }

    /// The --secret-file of whichever scenario was chosen.
    fn secret_file(&self) -> Option<PathBuf> {
        match &self.cmd {
            Some(Cmd::Setup(a)) => a.common.secret_file.clone(),
            Some(Cmd::Sessions(a)) => a.common.secret_file.clone(),
            Some(Cmd::Register(a)) => a.common.secret_file.clone(),
            Some(Cmd::Soak(a)) => a.common.secret_file.clone(),
            Some(Cmd::AudioLatency(a)) => a.common.secret_file.clone(),
            Some(Cmd::Hostile(a)) => a.common.secret_file.clone(),
            _ => None,
        }
    }
}

type Secret = Option<Arc<proto::auth::Secret>>;

impl Common {
    /// How the clients run, on `io` (already chosen: its errors come in each scenario's
    /// order).
    fn fleet(&self, io: engine::driver::Io, tick: Option<&Tick>) -> fleet::Options {
        fleet::Options {
            io,
            bind_ip: self.bind_ip,
            source_ips: self.source_ips,
            threads: self.threads,
            tick: Duration::from_micros(tick.map_or(250, |t| t.tick_us)),
        }
    }

    /// What the run prints, serves and writes; a live progress line only on a terminal, and
    /// not with --json. `--out` is checked here, before anything runs: a run is not thrown
    /// away at its end because its directory cannot be written.
    fn output(&self, metrics: &MetricsArg, live_every: Option<f64>) -> Result<Output, Error> {
        if let Some(dir) = &self.out {
            check_out(dir)?;
        }
        Ok(Output {
            json: self.json,
            dir: self.out.clone(),
            progress: !self.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            metrics: metrics.metrics,
            thresholds: self.thresholds.clone(),
            live_every: live_every.filter(|s| *s > 0.0).map(Duration::from_secs_f64),
            live_csv: metrics.live_csv.clone(),
        })
    }

    /// The manager: --manager, else one embedded with `shards` shards on the clients' IP
    /// and IO.
    fn target(
        &self,
        external: Option<External>,
        shards: usize,
        io: engine::driver::Io,
        limits: Limits,
        secret: Secret,
    ) -> Result<Target, Error> {
        let cluster = self.cluster_nodes.map(|n| crate::target::ClusterPlan {
            nodes: n as usize,
            kill_at: self.kill_node_at.map(Duration::from_secs_f64),
        });
        let mut t = Target::new(external, Embedded { ip: self.bind_ip, shards, io, limits, cluster }, secret);
        if self.tls {
            let trust = match (&self.ca, self.pin) {
                (Some(ca), _) => Some(engine::tls::Trust::Ca(ca.clone())),
                (None, Some(pin)) => Some(engine::tls::Trust::Pin(pin)),
                (None, None) => None,
            };
            t = t.with_tls(trust)?;
        }
        t.srtp_suites = match (self.no_srtp, self.srtp_suite) {
            (true, _) => vec![proto::e2e::SUITE_NONE],
            (false, Some(s)) => vec![s],
            (false, None) => vec![proto::e2e::SUITE_AES_128_GCM],
        };
        Ok(t)
    }
}

fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    engine::tls::parse_pin(s).map_err(|e| e.to_string())
}

/// `--out DIR` must be a directory this process can write: made if missing, refused if it
/// is a file or cannot take a file.
fn check_out(dir: &std::path::Path) -> Result<(), Error> {
    let bad = |reason: String| Error::Out { path: dir.to_path_buf(), reason };
    if dir.exists() && !dir.is_dir() {
        return Err(bad("exists and is not a directory".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot be made: {e}")))?;
    let probe = dir.join(format!(".loadgen-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| bad(format!("cannot be written: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// An external manager at `addr`, without pid or metrics URL.
fn external(addrs: Option<Vec<SocketAddr>>) -> Option<External> {
    addrs.map(|a| External { addr: a[0], others: a[1..].to_vec(), pid: None, metrics_url: None })
}

/// Callers by default: 50, or as many as the calls if fewer (a caller with no call would
/// end before the run starts).
const DEFAULT_CALLERS: u64 = 50;

/// A calls load, checked: at most one caller per call.
fn call_load(rate: f64, calls: u64, talk: f64, callers: Option<u64>, callees: u64) -> Result<CallLoad, Error> {
    let callers = match callers {
        Some(c) if c > calls => return Err(Error::CallersExceedCalls { callers: c as usize, calls }),
        Some(c) => c,
        None => DEFAULT_CALLERS.min(calls),
    };
    Ok(CallLoad::even(rate, calls, Duration::from_secs_f64(talk), callers as usize, callees as usize))
}

/// `setup`'s load with its shape: stages or a constant rate, even or Poisson arrivals, drawn
/// talk times, a cap on calls up at once.
fn shaped_load(a: &SetupArgs) -> Result<CallLoad, Error> {
    let arrivals = match a.shape.arrivals.as_str() {
        "poisson" => Arrivals::Poisson { seed: a.shape.seed },
        _ => Arrivals::Even,
    };
    let plan = match &a.shape.stages {
        Some(stages) => Plan::stages(stages.0.clone(), arrivals),
        None => Plan::constant(a.rate, a.duration.map_or(a.calls, |d| calls_in(a.rate, d)), arrivals),
    };
    if plan.calls == 0 {
        return Err(Error::Flags("--stages: the stages place no call (every rate is 0)".into()));
    }
    let mut load = call_load(plan.mean_rate(), plan.calls, a.talk, a.callers, a.callees)?;
    load.talk_dist = match a.shape.talk_dist.as_str() {
        "exp" => TalkDist::Exponential,
        "uniform" => TalkDist::Uniform,
        _ => TalkDist::Fixed,
    };
    load.plan = plan;
    load.seed = a.shape.seed;
    load.max_concurrent = a.shape.max_concurrent;
    Ok(load)
}

/// The calls of a run of `rate` arrivals per second for `duration` seconds (at least one).
fn calls_in(rate: f64, duration: f64) -> u64 {
    ((duration * rate).round() as u64).max(1)
}

fn setup(a: SetupArgs, secret: Secret) -> Result<Run, Error> {
    let manager = resolve(&a.common.manager)?;
    let load = shaped_load(&a)?;
    let io = choose_io(&a.common.io)?;
    Ok(Run {
        scenario: Scenario::Setup(load),
        target: a.common.target(external(manager), a.shards, io, Limits::Off, secret)?,
        fleet: a.common.fleet(io, Some(&a.tick)),
        output: a.common.output(&a.metrics, Some(a.live.live_every))?,
    })
}

fn hostile(h: HostileArgs, secret: Secret) -> Result<Run, Error> {
    let manager = resolve(&h.common.manager)?;
    let calls = h.calls.unwrap_or_else(|| calls_in(h.rate, h.duration));
    let load = call_load(h.rate, calls, h.talk, h.callers, h.callees)?;
    let io = choose_io(&h.common.io)?;
    let external = match (manager, h.manager_pid, h.manager_metrics) {
        (None, None, None) => None,
        (Some(a), Some(pid), Some(url)) => {
            Some(External { addr: a[0], others: a[1..].to_vec(), pid: Some(pid), metrics_url: Some(url) })
        }
        _ => return Err(Error::IncompleteExternalManager),
    };
    let attack = Attack { idle: h.idle, half: h.half, churn_rate: h.attack_rate };
    let flood = h.register_flood.map(|ids| crate::hostile::Flood {
        ids,
        concurrency: h.flood_concurrency as usize,
        rate: h.flood_rate,
        sample_every: h.flood_sample_every,
    });
    let mut output = h.common.output(&MetricsArg::default(), None)?;
    // The two setup runs show no progress line: the attack's threads write nothing either.
    output.progress = false;
    Ok(Run {
        scenario: Scenario::Hostile(Hostile { load, attack, flood }),
        target: h.common.target(external, h.shards, io, Limits::Production, secret)?,
        fleet: h.common.fleet(io, Some(&h.tick)),
        output,
    })
}

fn choose_io(s: &str) -> Result<engine::driver::Io, Error> {
    engine::driver::Io::choose(s).map_err(Error::IoChoice)
}

/// `--manager HOST:PORT[,HOST:PORT...]`, each checked and resolved (`engine::addr`: the
/// message says what is wrong: no port, a bad port, a name that does not resolve); a
/// repeated address counts once.
fn resolve(m: &Option<String>) -> Result<Option<Vec<SocketAddr>>, Error> {
    let Some(m) = m else { return Ok(None) };
    let mut addrs = Vec::new();
    for part in m.split(',') {
        let a = engine::addr::manager_addr(part).map_err(|e| Error::Resolve(e.to_string()))?;
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    Ok(Some(addrs))
}

fn sessions(a: SessionsArgs, secret: Secret) -> Result<Run, Error> {
    let clients = match (a.socket_per_session, a.clients) {
        (true, _) => a.sessions as usize,
        (false, 0) => 2 * crate::sys::cores(),
        (false, n) => n,
    };
    let manager = resolve(&a.common.manager)?;
    // Calls ramp up over S / ramp seconds; each lasts that long plus the window plus a
    // margin, so all S sessions overlap during the window.
    let ramp_s = a.sessions as f64 / a.ramp;
    let settle = 1.0;
    let talk = Duration::from_secs_f64(ramp_s + settle + a.duration + settle);
    let load = CallLoad::even(a.ramp, a.sessions, talk, clients, clients);
    let window = Window { offset: Duration::from_secs_f64(ramp_s + settle), len: Duration::from_secs_f64(a.duration) };
    let io = choose_io(&a.common.io)?;
    Ok(Run {
        scenario: Scenario::Sessions(Sessions { load, window, idle: a.idle }),
        target: a.common.target(external(manager), a.shards, io, Limits::Off, secret)?,
        fleet: a.common.fleet(io, Some(&a.tick)),
        output: a.common.output(&a.metrics, Some(a.live.live_every))?,
    })
}

fn register(a: RegisterArgs, secret: Secret) -> Result<Run, Error> {
    let manager = resolve(&a.common.manager)?;
    let io = choose_io(&a.common.io)?;
    let external =
        manager.map(|m| External { addr: m[0], others: m[1..].to_vec(), pid: a.manager_pid, metrics_url: None });
    let scenario = Register {
        clients: a.clients as usize,
        rate: a.rate,
        hold: Duration::from_secs_f64(a.hold),
        id_prefix: a.id_prefix.clone(),
    };
    Ok(Run {
        scenario: Scenario::Register(scenario),
        target: a.common.target(external, a.shards, io, Limits::Off, secret)?,
        fleet: a.common.fleet(io, None),
        output: a.common.output(&MetricsArg::default(), None)?,
    })
}

fn audio(a: AudioArgs, secret: Secret) -> Result<Run, Error> {
    let manager = resolve(&a.common.manager)?;
    let io = choose_io(&a.common.io)?;
    voice::codec::check_frame_ms(a.frame_ms)?;
    let scenario = Audio {
        frame_ms: a.frame_ms,
        loss_pct: a.loss,
        jitter_ms: a.jitter_ms,
        duration: Duration::from_secs_f64(a.duration),
        period_ms: a.period_ms,
        seed: a.seed,
        min_delay_ms: a.jitter_min_ms,
    };
    Ok(Run {
        scenario: Scenario::AudioLatency(scenario),
        // One shard: a call between two clients.
        target: a.common.target(external(manager), 1, io, Limits::Off, secret)?,
        fleet: a.common.fleet(io, None),
        output: a.common.output(&MetricsArg::default(), None)?,
    })
}

fn soak(a: SoakArgs, secret: Secret) -> Result<Run, Error> {
    let manager = resolve(&a.common.manager)?;
    let clients = if a.clients == 0 { 2 * crate::sys::cores() } else { a.clients };
    // Without churn: S sessions ramped in, held through the steady state. With churn R:
    // arrivals at R/s, each call lasting S / R s, so S are up once the first have ended.
    let (rate, calls, talk, ramp_s) = if a.churn > 0.0 {
        let life = a.sessions as f64 / a.churn;
        (a.churn, (a.churn * (life + a.duration)).round() as u64, life, life)
    } else {
        let ramp_s = a.sessions as f64 / a.ramp;
        (a.ramp, a.sessions, ramp_s + 1.0 + a.duration + 1.0, ramp_s + 1.0)
    };
    let warmup = a.warmup.unwrap_or(ramp_s + a.interval);
    // The growth check needs three intervals after the warm-up: refuse now a run that
    // cannot have them, rather than warn after it.
    let end = ramp_s + a.duration;
    let after = crate::calls::intervals_after(end, a.interval, warmup);
    if after < crate::calls::GROWTH_INTERVALS {
        let need = (0..)
            .map(|k| a.duration + k as f64)
            .find(|d| crate::calls::intervals_after(ramp_s + d, a.interval, warmup) >= crate::calls::GROWTH_INTERVALS)
            .unwrap_or(a.duration);
        return Err(Error::Flags(format!(
            "--duration {} with --interval {} leaves {after} interval(s) after the warm-up ({warmup:.1} s); the growth \
             check needs {}: use --duration {need} or more, or a shorter --interval",
            a.duration,
            a.interval,
            crate::calls::GROWTH_INTERVALS
        )));
    }
    let load = CallLoad::even(rate, calls, Duration::from_secs_f64(talk), clients, clients);
    let window = Window { offset: Duration::from_secs_f64(ramp_s), len: Duration::from_secs_f64(a.duration) };
    let io = choose_io(&a.common.io)?;
    let scenario = Soak {
        load,
        window,
        interval: Duration::from_secs_f64(a.interval),
        warmup: Duration::from_secs_f64(warmup),
        churn: a.churn,
    };
    Ok(Run {
        scenario: Scenario::Soak(scenario),
        target: a.common.target(external(manager), a.shards, io, Limits::Off, secret)?,
        fleet: a.common.fleet(io, Some(&a.tick)),
        output: a.common.output(&a.metrics, None)?,
    })
}

// Value parsers: every numeric flag is checked when the command line is read, and clap's
// message names the flag ("invalid value '-1' for '--talk <TALK>': ...").

/// The longest run any duration flag takes: a day.
const MAX_SECS: f64 = 86_400.0;

fn number(s: &str) -> Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !x.is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(x)
}

/// Seconds, more than 0 and at most a day.
fn secs_positive(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if x > 0.0 && x <= MAX_SECS {
        Ok(x)
    } else {
        Err(format!("must be more than 0 and at most {MAX_SECS} seconds"))
    }
}

/// Seconds, 0 to a day.
fn secs_non_negative(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if (0.0..=MAX_SECS).contains(&x) {
        Ok(x)
    } else {
        Err(format!("must be 0 to {MAX_SECS} seconds"))
    }
}

/// A sampling interval: 1 s to a day.
fn interval_secs(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if (1.0..=MAX_SECS).contains(&x) {
        Ok(x)
    } else {
        Err(format!("must be 1 to {MAX_SECS} seconds"))
    }
}

/// A rate per second: more than 0, at most a million.
fn rate(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if x > 0.0 && x <= 1e6 {
        Ok(x)
    } else {
        Err("must be more than 0 and at most 1000000 per second".into())
    }
}

/// A rate per second, or 0 for none.
fn rate_or_zero(s: &str) -> Result<f64, String> {
    if number(s)? == 0.0 {
        return Ok(0.0);
    }
    rate(s)
}

/// A percentage, 0 to 100.
fn percent(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if (0.0..=100.0).contains(&x) {
        Ok(x)
    } else {
        Err("must be 0 to 100 (percent)".into())
    }
}

/// Milliseconds of jitter or buffer delay, 0 to 1000.
fn jitter_ms(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if (0.0..=1000.0).contains(&x) {
        Ok(x)
    } else {
        Err("must be 0 to 1000 ms".into())
    }
}
