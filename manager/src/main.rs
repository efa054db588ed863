//! `manager`: the nullpunch rendezvous server.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use manager::{start, AltPort, ManagerConfig};
use proto::shard::ShardConfig;

/// nullpunch rendezvous server.
///
/// Clients keep a TCP connection to it, register their id and UDP address, and ask it to
/// connect calls; it answers STUN binding requests on the UDP port with the same number, so
/// it can hand out each client's public UDP address. It never carries media: the counter
/// `udp_media` in its statistics counts any media packet that reached it.
///
/// On start it prints `listening ADDR` on stdout (and, with --metrics, `metrics
/// http://ADDR/metrics`); on SIGINT/SIGTERM it closes every connection and prints its
/// counters as one JSON line on stdout.
///
/// Exit status: 0 after a clean stop, 2 on a usage or set-up error (a bad flag, an address
/// in use, an address it cannot bind).
#[derive(Parser, Debug)]
#[command(version, about, long_about, allow_negative_numbers = true)]
struct Args {
    /// TCP and UDP address to listen on (port 0: any free port). `[::]:PORT` listens on
    /// IPv4 and IPv6 alike (one dual-stack socket per shard and for STUN).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:7480", value_parser = listen_addr)]
    listen: SocketAddr,
    /// Shards (threads), 1 to 1024; 0 means one per core.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = shards)]
    shards: usize,
    /// Seconds a callee has to answer (PUNCHED) before the call is rejected (0.01 to 86400).
    #[arg(long, value_name = "SECS", default_value = "4", value_parser = seconds)]
    ring_timeout: Duration,
    /// Seconds of silence after which a connection is closed (clients PING every 10 s; 0.01
    /// to 86400).
    #[arg(long, value_name = "SECS", default_value = "45", value_parser = seconds)]
    idle_timeout: Duration,
    /// Print the counters as JSON on stderr every SECS seconds (0: only at exit; at most
    /// 86400).
    #[arg(long, value_name = "SECS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    stats_every: u64,
    /// Connections the manager holds at most; more are refused with ERROR TooManyConnections
    /// (0: no limit; the process's descriptor limit applies anyway; at most 100000000).
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = count::<100_000_000>)]
    max_connections: usize,
    /// Frames per second one connection may send on average (bursts of twice that); a
    /// connection over it is closed with ERROR RateLimited (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 500.0, value_parser = rate)]
    frames_per_sec: f64,
    /// Calls one connection may be party to at once; a CALL beyond is rejected with
    /// CallerLimit (0: no limit; at most 1000000). A load generator multiplexing many calls
    /// per client may need 0.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = count::<1_000_000>)]
    max_calls_per_conn: usize,
    /// Seconds the directory remembers an id whose connection closed, so that its callers
    /// get UNKNOWN Offline; after that they get UNKNOWN NeverRegistered (0.01 to 86400).
    #[arg(long, value_name = "SECS", default_value = "600", value_parser = seconds)]
    tombstone_ttl: Duration,
    /// Ids whose connection closed the directory remembers at most (the oldest are
    /// forgotten first; 0: none; at most 100000000).
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    max_tombstones: u64,
    /// Serve Prometheus metrics on http://ADDR/metrics (port 0: any free port; the address
    /// is printed on stdout as `metrics http://ADDR/metrics` after the `listening` line).
    #[arg(long, value_name = "IP:PORT", value_parser = listen_addr)]
    metrics: Option<SocketAddr>,
    /// STUN answers per second per source IP (bursts of twice that); 0: no limit. Keep it
    /// high when many clients share one address (a load generator, a large NAT).
    #[arg(long, value_name = "N", default_value_t = 1000.0, value_parser = rate)]
    stun_rate: f64,
    /// A second STUN port on the listen address, for NAT classification: clients compare
    /// their mappings towards both ports (`next`: the listen port + 1; a port, 0 for any
    /// free one; `off`: clients report their NAT class as unknown).
    #[arg(long, value_name = "PORT", default_value = "next", value_parser = alt_port)]
    alt_port: AltPort,
    /// A STUN address on a second IP of this host (RFC 5780's alternate address): clients
    /// then also see whether their NAT maps per destination IP.
    #[arg(long, value_name = "IP:PORT", value_parser = listen_addr)]
    alt_listen: Option<SocketAddr>,
    /// The shards' TCP IO: `uring` (connections in io_uring direct descriptors, which do not
    /// count against the process's descriptor table), `portable` (tokio), or `auto` (uring
    /// where it can be set up; the NULLPUNCH_IO environment variable overrides auto).
    #[arg(long, default_value = "auto", value_parser = ["uring", "portable", "auto"])]
    io: String,
    /// Require a token in every REGISTER, minted with the secret in this file (at least 16
    /// bytes; one trailing newline is ignored). Without it, any client may register any id.
    #[arg(long, value_name = "PATH", global = true)]
    secret_file: Option<std::path::PathBuf>,
    /// Serve TLS 1.3 (ALPN nullpunch/1) on the TCP port with this certificate chain (PEM;
    /// needs --tls-key). Plaintext clients are then refused with one plaintext ERROR, and
    /// registration tokens are bound to each client's TLS connection (no replay).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Be one node of a cluster of managers on NATS (`docs/cluster.md`): any of these NATS
    /// servers (`nats://HOST:PORT`, comma-separated; JetStream on) will do. Clients of any
    /// node reach clients of any other; calls within one node never touch NATS. The node
    /// prints `node ID NAME` on stdout after `listening`.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',', value_parser = nats_url)]
    cluster: Vec<String>,
    /// This node's name in a cluster (logs, metrics, directory values); its identity is a
    /// random id new at every start, so a restarted manager is a new node.
    #[arg(long, value_name = "NAME", default_value = "manager", requires = "cluster", value_parser = node_name)]
    node: String,
    /// Replicas of the cluster directory in NATS (1 to 5): 1 for one NATS server, 3 for a
    /// 3-server NATS cluster that must survive losing one.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "cluster", value_parser = clap::value_parser!(u8).range(1..=5))]
    cluster_replicas: u8,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print a registration token for ID (needs --secret-file), for `peer --token`.
    #[command(allow_negative_numbers = true)]
    Token {
        /// The client id the token is for.
        #[arg(long)]
        id: String,
        /// Seconds it stays valid (1 to 315360000, ten years).
        #[arg(long, value_name = "SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=315_360_000))]
        ttl: u64,
    },
}

/// `IP:PORT` to listen on.
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected IP:PORT (e.g. 0.0.0.0:7480 for every interface, 127.0.0.1:0 for any free port)".into())
}

/// A NATS server URL.
fn nats_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    s.parse::<async_nats::ServerAddr>()
        .map(|_| s.to_string())
        .map_err(|e| format!("`{s}`: expected nats://HOST:PORT ({e})"))
}

/// A node name: 1 to 64 letters, digits, `-` or `_`.
fn node_name(s: &str) -> Result<String, String> {
    let s = s.trim();
    if (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        Ok(s.to_string())
    } else {
        Err("expected 1 to 64 letters, digits, `-` or `_`".into())
    }
}

/// `next`, `off` or a port.
fn alt_port(s: &str) -> Result<AltPort, String> {
    s.trim().parse()
}

/// Shards: 1 to [`MAX_SHARDS`], or 0 for one per core.
fn shards(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= MAX_SHARDS => Ok(n),
        _ => Err(format!("give 1 to {MAX_SHARDS} shards, or 0 for one per core")),
    }
}

/// The most shards `--shards` takes: far more threads than any machine's cores.
const MAX_SHARDS: usize = 1024;

/// A duration in seconds: finite, from 10 ms to one day.
fn seconds(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.01..=86_400.0).contains(&v) => Ok(Duration::from_secs_f64(v)),
        _ => Err("expected a number of seconds from 0.01 to 86400".into()),
    }
}

/// A rate per second: finite and not negative (0: no limit), at most a billion.
fn rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1e9).contains(&v) => Ok(v),
        _ => Err("expected a rate per second from 0 (no limit) to 1000000000".into()),
    }
}

/// A count from 0 (no limit) to `MAX`.
fn count<const MAX: usize>(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= MAX => Ok(n),
        _ => Err(format!("expected a count from 0 (no limit) to {MAX}")),
    }
}

/// Descriptors kept for everything but client connections: listeners, the STUN socket,
/// runtimes, the metrics endpoint and its clients, log output.
const FD_RESERVE: u64 = 32;

/// Direct-descriptor slots an io_uring shard keeps for connections it is refusing.
const SLOT_RESERVE: u64 = 16;

/// `--max-connections`, lowered to what RLIMIT_NOFILE allows (after raising the soft limit
/// to the hard one) less a reserve, so the manager answers connections past its capacity
/// with ERROR TooManyConnections and keeps serving metrics, instead of running out of
/// descriptors (where new connections would wait unanswered in the listen backlog).
///
/// io_uring shards accept into direct descriptors instead: each shard's table holds up to
/// RLIMIT_NOFILE of them (the kernel's bound for one ring) and the manager's own descriptors
/// do not count. The cap is RLIMIT_NOFILE, or less with one shard, whose table must keep
/// [`SLOT_RESERVE`] slots for connections being refused. (With several shards a table
/// overflows only if the kernel put nearly every connection on one shard; its accepts then
/// wait, counted in `accept_errors`.)
fn connection_cap(configured: usize, io: manager::Io, shards: usize) -> usize {
    let nofile = manager::raise_nofile();
    if nofile == 0 {
        return configured;
    }
    let uring = io != manager::Io::Portable;
    let cap = if uring {
        let shards =
            if shards == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { shards };
        nofile.min(shards as u64 * nofile.saturating_sub(SLOT_RESERVE)).max(1) as usize
    } else {
        nofile.saturating_sub(FD_RESERVE).max(1) as usize
    };
    if configured == 0 || configured > cap {
        if uring {
            eprintln!(
                "manager: at most {cap} connections: RLIMIT_NOFILE is {nofile} (io_uring: connections use direct \
                 descriptors, up to RLIMIT_NOFILE per shard, {SLOT_RESERVE} kept for refusals); further connections get \
                 ERROR TooManyConnections"
            );
        } else {
            eprintln!(
                "manager: at most {cap} connections: RLIMIT_NOFILE is {nofile} (less {FD_RESERVE} kept for the manager \
                 itself); further connections get ERROR TooManyConnections"
            );
        }
        return cap;
    }
    configured
}

fn main() {
    engine::sys::init_logging("info");
    let args = Args::parse();
    let secret = match &args.secret_file {
        Some(p) => match engine::sys::read_secret(p) {
            Ok(s) => Some(std::sync::Arc::new(s)),
            Err(e) => {
                eprintln!("manager: --secret-file {e}");
                std::process::exit(2);
            }
        },
        None => None,
    };
    if let Some(Cmd::Token { id, ttl }) = &args.cmd {
        let Some(secret) = &secret else {
            eprintln!("manager token: --secret-file is required");
            std::process::exit(2);
        };
        let Ok(id) = proto::wire::frame::ClientId::new(id.clone()) else {
            eprintln!("manager token: invalid id {id:?} (1-64 bytes, no spaces or control characters)");
            std::process::exit(2);
        };
        println!("{}", secret.mint(&id, engine::sys::unix_now().saturating_add(*ttl)));
        return;
    }
    if secret.is_none() {
        eprintln!(
            "manager: WARNING: running OPEN: no --secret-file, so any client may register as any id \
             (and so receive its calls). Use --secret-file on any network you do not fully trust."
        );
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match engine::tls::server_config_from_pem(cert, key) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("manager: --tls-cert/--tls-key: {e}");
                std::process::exit(2);
            }
        },
        _ => None,
    };
    let io = match manager::Io::choose(&args.io) {
        Ok(io) if io == manager::Io::Portable || engine::shard::uring::available() => io,
        Ok(_) if args.io == "auto" => manager::Io::Portable,
        Ok(_) => {
            eprintln!("manager: --io uring: io_uring manager rings cannot be set up here; use --io portable or auto");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("manager: --io {e}");
            std::process::exit(2);
        }
    };
    let cfg = ManagerConfig {
        io,
        listen: args.listen,
        shards: args.shards,
        shard: ShardConfig {
            ring_timeout: args.ring_timeout,
            idle_timeout: args.idle_timeout,
            secret,
            frames_per_sec: args.frames_per_sec,
            max_calls_per_conn: args.max_calls_per_conn,
            tombstone_ttl: args.tombstone_ttl,
            max_tombstones: args.max_tombstones as usize,
            ..ShardConfig::default()
        },
        stun_rate: args.stun_rate,
        alt_port: args.alt_port,
        alt_listen: args.alt_listen,
        max_connections: connection_cap(args.max_connections, io, args.shards),
        tls,
        cluster: (!args.cluster.is_empty()).then(|| manager::cluster::ClusterConfig {
            servers: args.cluster.clone(),
            name: args.node.clone(),
            replicas: args.cluster_replicas as usize,
        }),
        ..ManagerConfig::default()
    };
    let handle = match start(cfg) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("manager: cannot listen on {}: {e}", args.listen);
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let stats = handle.stats().clone();
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Handlers first, then the announcement: a signal sent as soon as `listening` is
        // printed is never lost.
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        println!("listening {}", handle.local_addr());
        if let Some(node) = handle.node() {
            println!("node {node:016x} {}", args.node);
        }
        let _metrics = match args.metrics {
            Some(addr) => {
                let st = stats.clone();
                match manager::metrics::serve(addr, std::sync::Arc::new(move || manager::metrics::render_manager(&st))) {
                    Ok(m) => {
                        println!("metrics http://{}/metrics", m.local_addr());
                        Some(m)
                    }
                    Err(e) => {
                        eprintln!("manager: cannot serve metrics on {addr}: {e}");
                        std::process::exit(2);
                    }
                }
            }
            None => None,
        };
        tracing::info!(addr = %handle.local_addr(), alt = ?handle.alt_addrs(), shards = handle.shards(), io = handle.io().as_str(), tls = args.tls_cert.is_some(), "manager listening on tcp and udp");
        let mut every = tokio::time::interval(Duration::from_secs(args.stats_every.max(1)));
        every.tick().await;
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                _ = every.tick(), if args.stats_every > 0 => eprintln!("{}", stats.to_json()),
            }
        }
    });
    tracing::info!("shutting down");
    handle.shutdown();
    println!("{}", stats.to_json());
}
