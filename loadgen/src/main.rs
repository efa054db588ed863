//! `loadgen`: the nullpunch load generator.

mod output;
mod report;
mod setup;
mod sys;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

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
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open-loop call setup at a target rate: the full flow per call, latency from the
    /// planned start, failures counted by cause.
    Setup(SetupArgs),
}

#[derive(ClapArgs, Debug, Clone)]
struct SetupArgs {
    /// External manager HOST:PORT (default: start one in-process on loopback).
    #[arg(long)]
    manager: Option<String>,
    /// Shards of the embedded manager (0: one per core).
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Call arrivals per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Number of calls (ignored when --duration is given).
    #[arg(long, default_value_t = 300)]
    calls: u64,
    /// Run for this many seconds of arrivals instead of a call count (calls = rate x duration).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of media per call before the caller hangs up.
    #[arg(long, default_value_t = 1.0)]
    talk: f64,
    /// Simulated callers.
    #[arg(long, default_value_t = 50)]
    callers: usize,
    /// Simulated callees (each answers any number of calls at once).
    #[arg(long, default_value_t = 50)]
    callees: usize,
    /// Local IP for the simulated clients (and the embedded manager).
    #[arg(long, default_value = "127.0.0.1")]
    bind_ip: IpAddr,
    /// Generator worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print only the summary as one JSON object (last line of stdout).
    #[arg(long)]
    json: bool,
    /// Write command.txt, machine.txt, summary.json, .hgrm percentile tables and a latency
    /// plot (SVG) into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<std::path::PathBuf>,
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let args = match cli.cmd {
        Some(Cmd::Setup(a)) => a,
        None => SetupArgs::default(),
    };
    if !(args.rate > 0.0) || args.callers == 0 || args.callees == 0 {
        eprintln!("loadgen: --rate, --callers and --callees must be positive");
        return ExitCode::from(2);
    }
    let manager: Option<SocketAddr> = match &args.manager {
        None => None,
        Some(m) => match m.to_socket_addrs().ok().and_then(|mut a| a.next()) {
            Some(a) => Some(a),
            None => {
                eprintln!("loadgen: cannot resolve manager address {m:?}");
                return ExitCode::from(2);
            }
        },
    };
    let calls = match args.duration {
        Some(d) => (d * args.rate).round() as u64,
        None => args.calls,
    };
    let cfg = setup::SetupConfig {
        manager,
        shards: args.shards,
        rate: args.rate,
        calls,
        talk: Duration::from_secs_f64(args.talk),
        callers: args.callers,
        callees: args.callees,
        bind_ip: args.bind_ip,
        threads: args.threads,
        out: args.out.clone(),
    };
    match setup::run(cfg) {
        Ok(out) => {
            if args.json {
                println!("{}", out.json);
            } else {
                print!("{}", out.text);
            }
            if out.all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
    }
}
