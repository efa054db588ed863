//! Start and stop a manager: bind the listeners and the UDP port, start one thread per
//! shard on the chosen IO (`engine::shard::portable` or `engine::shard::uring`) and the STUN
//! responder thread (`engine::shard::stun`), wire their inboxes together, and hand back a
//! [`ManagerHandle`]. The shard logic itself is `proto::shard`; the IO is `engine::shard`.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use engine::driver::Io;
#[cfg(target_os = "linux")]
use engine::reactor::Wake;
use engine::shard::stun::StunSocket;
use engine::shard::{OpenConns, Peer, ShardStart};
use proto::shard::stats::Stats;
use proto::shard::{ShardConfig, ShardInit, ShardMsg};
use tokio::sync::{mpsc, watch};

/// Stand-in where there are no io_uring shards to wake.
#[cfg(not(target_os = "linux"))]
struct Wake;

#[cfg(not(target_os = "linux"))]
impl Wake {
    fn new() -> io::Result<Arc<Wake>> {
        Ok(Arc::new(Wake))
    }
    fn notify(&self) {}
}

/// Manager settings.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// TCP and UDP address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Number of shards (threads); 0 means one per core.
    pub shards: usize,
    /// Per-shard timers.
    pub shard: ShardConfig,
    /// Frames queued for one connection before it is dropped as too slow.
    pub conn_queue: usize,
    /// STUN answers per second per source IP (0: no limit), with bursts of twice that.
    pub stun_rate: f64,
    /// Connections the whole manager holds at most (0: no limit), counted over all shards.
    pub max_connections: usize,
    /// The shards' TCP IO: io_uring (connections in direct descriptors, not in the process's
    /// descriptor table) or tokio. io_uring falls back to tokio where a ring cannot be set up.
    pub io: Io,
    /// A second STUN port on the listen address, so that clients can compare their mappings
    /// towards two destinations (NAT classification).
    pub alt_port: AltPort,
    /// A STUN address on a second IP (RFC 5780's alternate address), if the host has one.
    pub alt_listen: Option<SocketAddr>,
    /// TLS 1.3 on the TCP port with this configuration (`engine::tls::server_config`);
    /// plaintext clients are then refused. None: plain TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// One node of a cluster of managers on NATS (`docs/cluster.md`). None: a manager on
    /// its own.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// The manager's alternate STUN port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AltPort {
    /// None: clients cannot tell an endpoint-independent NAT from one that maps per
    /// destination (they report their class as unknown).
    Off,
    /// The listen port + 1 (the default).
    Next,
    /// This port (0: any free one).
    Port(u16),
}

impl std::str::FromStr for AltPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(AltPort::Off),
            "next" => Ok(AltPort::Next),
            p => p.parse().map(AltPort::Port).map_err(|_| format!("`{s}`: a port number, `next` or `off`")),
        }
    }
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            listen: "127.0.0.1:7480".parse().unwrap(),
            shards: 0,
            shard: ShardConfig::default(),
            conn_queue: engine::shard::CONN_QUEUE,
            stun_rate: 1000.0,
            max_connections: 0,
            // `auto` (NULLPUNCH_IO if set, so a test suite can force either).
            io: Io::choose("auto").unwrap_or(Io::Portable),
            alt_port: AltPort::Next,
            alt_listen: None,
            tls: None,
            cluster: None,
        }
    }
}

/// A running manager.
pub struct ManagerHandle {
    addr: SocketAddr,
    alt_addrs: Vec<SocketAddr>,
    shards: usize,
    stats: Arc<Stats>,
    stop_tx: watch::Sender<bool>,
    stop_udp: Arc<AtomicBool>,
    /// Wake-ups of io_uring shards (they watch `stop_tx` when woken).
    wakes: Vec<Arc<Wake>>,
    io: Io,
    /// In a cluster: this node's id.
    node: Option<u64>,
    threads: Vec<JoinHandle<()>>,
}

impl ManagerHandle {
    /// The TCP and UDP address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The alternate STUN addresses (the alternate port first, then the alternate IP's).
    pub fn alt_addrs(&self) -> &[SocketAddr] {
        &self.alt_addrs
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The shards' TCP IO in use.
    pub fn io(&self) -> Io {
        self.io
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// In a cluster: this node's id (random, new at every start).
    pub fn node(&self) -> Option<u64> {
        self.node
    }

    /// Close every connection (ERROR Shutdown) and join all threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.stop_tx.send(true);
        for w in &self.wakes {
            w.notify();
        }
        self.stop_udp.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ManagerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Attempts a start on port 0 makes at most. Each takes a new port from the kernel for TCP
/// and then binds UDP to the same number, which another socket may hold already.
pub const PORT_0_ATTEMPTS: usize = 16;

/// Start a manager: bind, spawn the shard threads and the STUN responder, return at once.
///
/// With port 0 the first shard's TCP listener takes a free port from the kernel and the
/// other shards and the UDP socket bind the same number. When one of those finds it taken
/// (`AddrInUse`), the start is undone and tried again on a new port, up to
/// [`PORT_0_ATTEMPTS`] times, so no caller needs a retry loop of its own. A fixed port is
/// tried once.
pub fn start(cfg: ManagerConfig) -> io::Result<ManagerHandle> {
    start_with(cfg, &mut |a| UdpSocket::bind(a))
}

/// [`start`] with the UDP bind given (a test makes it fail).
fn start_with(
    cfg: ManagerConfig,
    bind_udp: &mut dyn FnMut(SocketAddr) -> io::Result<UdpSocket>,
) -> io::Result<ManagerHandle> {
    if cfg.listen.port() != 0 {
        return start_once(&cfg, bind_udp);
    }
    for attempt in 1..=PORT_0_ATTEMPTS {
        match start_once(&cfg, bind_udp) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < PORT_0_ATTEMPTS => {
                tracing::debug!(attempt, "port 0: the port the kernel gave TCP is taken for UDP ({e}); trying another");
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "port 0: each of {PORT_0_ATTEMPTS} ports the kernel offered for TCP was taken for UDP: {e}"
                    ),
                ));
            }
            r => return r,
        }
    }
    unreachable!("the last attempt returns")
}

/// One start: on failure everything it started is stopped again (the handle's drop).
fn start_once(
    cfg: &ManagerConfig,
    bind_udp: &mut dyn FnMut(SocketAddr) -> io::Result<UdpSocket>,
) -> io::Result<ManagerHandle> {
    let n =
        if cfg.shards == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { cfg.shards };
    if n > u16::MAX as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{n} shards: at most {}", u16::MAX)));
    }
    let stats = Arc::new(Stats::default());
    let open = Arc::new(OpenConns::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_udp = Arc::new(AtomicBool::new(false));
    #[cfg(target_os = "linux")]
    let uring = cfg.io == Io::Uring && engine::shard::uring::available();
    #[cfg(not(target_os = "linux"))]
    let uring = false;
    if cfg.io != Io::Portable && !uring {
        tracing::warn!("io_uring manager rings cannot be set up here; using the tokio IO");
    }
    let mut txs = Vec::with_capacity(n);
    let mut rxs = Vec::with_capacity(n);
    let mut wakes = Vec::new();
    for _ in 0..n {
        let (tx, rx) = mpsc::unbounded_channel::<ShardMsg>();
        let wake = if uring { Some(Wake::new()?) } else { None };
        wakes.extend(wake.clone());
        #[cfg(target_os = "linux")]
        txs.push(Peer::new(tx, wake));
        #[cfg(not(target_os = "linux"))]
        {
            let _ = wake;
            txs.push(Peer::new(tx));
        }
        rxs.push(Some(rx));
    }
    let seed = engine::entropy::seed();
    let token_key = engine::entropy::key32();
    let mut handle = ManagerHandle {
        addr: cfg.listen,
        alt_addrs: Vec::new(),
        shards: n,
        stats: stats.clone(),
        stop_tx,
        stop_udp: stop_udp.clone(),
        wakes: wakes.clone(),
        io: if uring { Io::Uring } else { Io::Portable },
        node: None,
        threads: Vec::new(),
    };
    // A node id that is new at every start, so a restarted manager is a new node.
    let cfg_node = if cfg.cluster.is_some() { engine::entropy::seed().max(1) } else { 0 };
    let (cluster_tx, cluster_rx) = match cfg.cluster {
        Some(_) => {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    // The UDP socket (no SO_REUSEPORT) claims a fixed port first: it is what keeps a second
    // manager from binding the same TCP port through SO_REUSEPORT and silently taking half
    // the connections. With port 0, shard 0 picks the port and UDP follows it.
    let mut udp = if cfg.listen.port() != 0 { Some(bind_udp(cfg.listen)?) } else { None };
    // Shard 0 binds first so that with port 0 the others (and UDP) use the port it got.
    let mut addr = cfg.listen;
    for (i, inbox) in rxs.iter_mut().enumerate() {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let inbox = inbox.take().expect("each inbox used once");
        let mut shard_cfg = cfg.shard.clone();
        shard_cfg.max_connections = cfg.max_connections;
        let wake = wakes.get(i).cloned();
        let start = ShardStart {
            init: ShardInit {
                index: i as u16,
                n: n as u16,
                seed,
                token_key,
                unix_secs: engine::sys::unix_now(),
                node: cfg_node,
            },
            addr,
            cfg: shard_cfg,
            conn_queue: cfg.conn_queue,
            stats: stats.clone(),
            open: open.clone(),
            inbox,
            peers: txs.clone(),
            stop: stop_rx.clone(),
            ready: ready_tx,
            tls: cfg.tls.clone(),
            cluster: cluster_tx.clone(),
        };
        let t = std::thread::Builder::new().name(format!("shard-{i}")).spawn(move || match wake {
            #[cfg(target_os = "linux")]
            Some(wake) => engine::shard::uring::shard_thread(start, wake),
            _ => engine::shard::portable::shard_thread(start),
        })?;
        handle.threads.push(t);
        match ready_rx.recv() {
            Ok(Ok(a)) => addr = a,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("shard thread died during start")),
        }
    }
    handle.addr = addr;
    if let (Some(c), Some(rx)) = (&cfg.cluster, cluster_rx) {
        let t = crate::cluster::spawn(c.clone(), cfg_node, txs.clone(), rx, stats.clone(), stop_rx.clone())?;
        handle.node = Some(cfg_node);
        handle.threads.push(t);
    }
    let udp = match udp.take() {
        Some(u) => u,
        None => bind_udp(addr)?,
    };
    // The alternate STUN sockets. Each answer names the next address (OTHER-ADDRESS), so a
    // client that asks the main port learns them all: main -> alternate IP -> alternate port.
    let alt_port = match cfg.alt_port {
        AltPort::Off => None,
        AltPort::Port(p) => Some(p),
        AltPort::Next => Some(addr.port().checked_add(1).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "--alt-port next: the listen port is 65535; give a port")
        })?),
    };
    let alt_port_sock = match alt_port {
        Some(p) => Some(bind_alt(SocketAddr::new(addr.ip(), p), "--alt-port")?),
        None => None,
    };
    let alt_ip_sock = match cfg.alt_listen {
        Some(a) => Some(bind_alt(a, "--alt-listen")?),
        None => None,
    };
    let port_addr = alt_port_sock.as_ref().map(|s| s.local_addr()).transpose()?;
    let ip_addr = alt_ip_sock.as_ref().map(|s| s.local_addr()).transpose()?;
    handle.alt_addrs = port_addr.into_iter().chain(ip_addr).collect();
    let rate = cfg.stun_rate;
    let mut sockets = vec![("stun", StunSocket { sock: udp, other: ip_addr.or(port_addr), shards: txs })];
    if let Some(sock) = alt_ip_sock {
        sockets.push(("stun-alt-ip", StunSocket { sock, other: port_addr, shards: Vec::new() }));
    }
    if let Some(sock) = alt_port_sock {
        sockets.push(("stun-alt-port", StunSocket { sock, other: None, shards: Vec::new() }));
    }
    for (name, s) in sockets {
        let (stats, stop) = (stats.clone(), stop_udp.clone());
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || engine::shard::stun::stun_thread(s, stats, stop, rate))?;
        handle.threads.push(t);
    }
    Ok(handle)
}

/// Bind an alternate STUN socket; the error names the flag (with port 0 an `AddrInUse` makes
/// the start try another port, as for the main socket).
fn bind_alt(a: SocketAddr, flag: &str) -> io::Result<UdpSocket> {
    UdpSocket::bind(a).map_err(|e| io::Error::new(e.kind(), format!("{flag}: cannot bind {a}: {e}")))
}

pub use engine::sys::raise_nofile;

#[cfg(test)]
mod tests {
    use super::*;

    fn port_0() -> ManagerConfig {
        ManagerConfig { listen: "127.0.0.1:0".parse().unwrap(), shards: 2, io: Io::Portable, ..Default::default() }
    }

    #[test]
    fn a_port_0_start_takes_a_new_port_when_udp_finds_its_port_taken() {
        let mut tried = Vec::new();
        let h = start_with(port_0(), &mut |a| {
            tried.push(a);
            if tried.len() <= 3 {
                Err(io::ErrorKind::AddrInUse.into())
            } else {
                UdpSocket::bind(a)
            }
        })
        .expect("the fourth port is free");
        assert_eq!(tried.len(), 4, "{tried:?}");
        assert_eq!(h.local_addr(), tried[3]);
        // The manager that started serves TCP on that port; the undone attempts left no
        // listener behind.
        std::net::TcpStream::connect(h.local_addr()).expect("the started manager accepts");
        for a in &tried[..3] {
            if *a != h.local_addr() {
                assert!(std::net::TcpStream::connect(a).is_err(), "attempt on {a} was not undone");
            }
        }
        h.shutdown();
    }

    #[test]
    fn a_port_0_start_gives_up_after_its_attempts_and_a_fixed_port_is_tried_once() {
        let mut n = 0;
        let e = start_with(port_0(), &mut |_| {
            n += 1;
            Err(io::ErrorKind::AddrInUse.into())
        })
        .err()
        .expect("every port taken");
        assert_eq!(n, PORT_0_ATTEMPTS);
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("taken for UDP"), "{e}");

        let fixed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut n = 0;
        let cfg = ManagerConfig { listen: fixed, ..port_0() };
        let e = start_with(cfg, &mut |_| {
            n += 1;
            Err(io::ErrorKind::AddrInUse.into())
        })
        .err()
        .expect("taken");
        assert_eq!((n, e.kind()), (1, io::ErrorKind::AddrInUse));
    }
}
