//! `manager`: the nullpunch rendezvous server.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use manager::core::ShardConfig;
use manager::{start, ManagerConfig};

/// nullpunch rendezvous server.
///
/// Clients keep a TCP connection to it, register their id and UDP address, and ask it to
/// connect calls; it answers STUN binding requests on the UDP port with the same number, so
/// it can hand out each client's public UDP address. It never carries media: the counter
/// `udp_media` in its statistics counts any media packet that reached it.
///
/// On start it prints `listening ADDR` on stdout; on SIGINT/SIGTERM it closes every
/// connection and prints its counters as one JSON line on stdout.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// TCP and UDP address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7480")]
    listen: SocketAddr,
    /// Shards (threads); 0 means one per core.
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Seconds a callee has to answer (PUNCHED) before the call is rejected.
    #[arg(long, default_value_t = 4)]
    ring_timeout: u64,
    /// Seconds of silence after which a connection is closed (clients PING every 10 s).
    #[arg(long, default_value_t = 45)]
    idle_timeout: u64,
    /// Print the counters as JSON on stderr every SECS seconds (0: only at exit).
    #[arg(long, default_value_t = 0)]
    stats_every: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = ManagerConfig {
        listen: args.listen,
        shards: args.shards,
        shard: ShardConfig {
            ring_timeout: Duration::from_secs(args.ring_timeout),
            idle_timeout: Duration::from_secs(args.idle_timeout),
            ..ShardConfig::default()
        },
        ..ManagerConfig::default()
    };
    let handle = match start(cfg) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("manager: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
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
        tracing::info!(addr = %handle.local_addr(), shards = handle.shards(), "manager listening on tcp and udp");
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
