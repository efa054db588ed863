//! The manager's IO: one thread per shard, each with a single-threaded tokio runtime that
//! accepts on its own SO_REUSEPORT listener (the kernel spreads connections over shards) and
//! drives its [`Shard`]; unbounded channels carry [`ShardMsg`]s between shards; one thread
//! answers STUN binding requests on the UDP port with the same number.
//!
//! Each connection's outgoing frames go through a bounded queue; a reader too slow to drain
//! it is disconnected and counted (`connections_slow`) rather than buffered without bound.
//! All connections of a shard share one read buffer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use engine::driver::Io;
use proto::wire::frame::{Frame, FrameDecoder};
use proto::wire::stun::{self, StunMessage};
use proto::wire::{classify, DatagramKind};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};

#[cfg(target_os = "linux")]
use engine::reactor::Wake;
use engine::shard::{Peer, ShardStart, ACCEPT_BACKOFF, CLOSE_GRACE};
use proto::shard::bindings::Bindings;
use proto::shard::stats::Stats;
use proto::shard::{Output, Shard, ShardConfig, ShardMsg};

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
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            listen: "127.0.0.1:7480".parse().unwrap(),
            shards: 0,
            shard: ShardConfig::default(),
            conn_queue: 4096,
            stun_rate: 1000.0,
            max_connections: 0,
            // `auto` (NULLPUNCH_IO if set, so a test suite can force either).
            io: Io::choose("auto").unwrap_or(Io::Portable),
        }
    }
}

/// A running manager.
pub struct ManagerHandle {
    addr: SocketAddr,
    shards: usize,
    stats: Arc<Stats>,
    stop_tx: watch::Sender<bool>,
    stop_udp: Arc<AtomicBool>,
    /// Wake-ups of io_uring shards (they watch `stop_tx` when woken).
    wakes: Vec<Arc<Wake>>,
    io: Io,
    threads: Vec<JoinHandle<()>>,
}

impl ManagerHandle {
    /// The TCP and UDP address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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

/// Start a manager: bind, spawn the shard threads and the STUN responder, return at once.
pub fn start(cfg: ManagerConfig) -> io::Result<ManagerHandle> {
    let n =
        if cfg.shards == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { cfg.shards };
    if n > u16::MAX as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many shards"));
    }
    let stats = Arc::new(Stats::default());
    let bindings = Arc::new(Bindings::default());
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
    let mut handle = ManagerHandle {
        addr: cfg.listen,
        shards: n,
        stats: stats.clone(),
        stop_tx,
        stop_udp: stop_udp.clone(),
        wakes: wakes.clone(),
        io: if uring { Io::Uring } else { Io::Portable },
        threads: Vec::new(),
    };
    // The UDP socket (no SO_REUSEPORT) claims a fixed port first: it is what keeps a second
    // manager from binding the same TCP port through SO_REUSEPORT and silently taking half
    // the connections. With port 0, shard 0 picks the port and UDP follows it.
    let mut udp = if cfg.listen.port() != 0 { Some(StdUdpSocket::bind(cfg.listen)?) } else { None };
    // Shard 0 binds first so that with port 0 the others (and UDP) use the port it got.
    let mut addr = cfg.listen;
    for (i, inbox) in rxs.iter_mut().enumerate() {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let inbox = inbox.take().expect("each inbox used once");
        let peers = txs.clone();
        let (bindings, stats, stop_rx, mut shard_cfg, conn_queue) =
            (bindings.clone(), stats.clone(), stop_rx.clone(), cfg.shard.clone(), cfg.conn_queue);
        shard_cfg.max_connections = cfg.max_connections;
        shard_cfg.token_source = Some(engine::entropy::secure_u64);
        let wake = wakes.get(i).cloned();
        let start = ShardStart {
            index: i as u16,
            n: n as u16,
            addr,
            cfg: shard_cfg,
            conn_queue,
            bindings,
            stats,
            inbox,
            peers,
            stop: stop_rx,
            ready: ready_tx,
            seed,
        };
        let t = std::thread::Builder::new().name(format!("shard-{i}")).spawn(move || match wake {
            #[cfg(target_os = "linux")]
            Some(wake) => engine::shard::uring::shard_thread(start, wake),
            _ => shard_thread(start),
        })?;
        handle.threads.push(t);
        match ready_rx.recv() {
            Ok(Ok(a)) => addr = a,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("shard thread died during start")),
        }
    }
    handle.addr = addr;
    let udp = match udp.take() {
        Some(u) => u,
        None => StdUdpSocket::bind(addr)?,
    };
    udp.set_read_timeout(Some(Duration::from_millis(100)))?;
    // Thousands of clients (re)connecting at once send their Binding Requests in a burst,
    // and one thread answers them: the default buffer (about 208 KiB) drops requests
    // whenever that thread waits for a CPU, and each lost one costs its client a 500 ms
    // retransmission.
    engine::driver::set_socket_buffers(&udp, STUN_RCVBUF);
    let rate = cfg.stun_rate;
    let t = std::thread::Builder::new()
        .name("stun".into())
        .spawn(move || stun_thread(udp, bindings, stats, stop_udp, rate))?;
    handle.threads.push(t);
    Ok(handle)
}

pub use engine::sys::raise_nofile;

/// Receive (and send) buffer of the STUN socket.
const STUN_RCVBUF: usize = 4 << 20;

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

struct ConnHandle {
    tx: mpsc::Sender<Frame>,
    task: tokio::task::AbortHandle,
}

struct ShardIo {
    core: RefCell<Shard>,
    conns: RefCell<HashMap<u64, ConnHandle>>,
    peers: Vec<Peer>,
    rbuf: RefCell<Vec<u8>>,
    stats: Arc<Stats>,
}

impl ShardIo {
    /// Move the core's output to connection queues and other shards.
    fn flush(self: &Rc<Self>) {
        let mut closing = Vec::new();
        {
            let mut core = self.core.borrow_mut();
            while let Some(o) = core.poll_output() {
                match o {
                    Output::Frame { conn, frame } => {
                        let mut conns = self.conns.borrow_mut();
                        if let Some(h) = conns.get(&conn) {
                            if h.tx.try_send(frame).is_err() {
                                // Dropping the sender ends the connection's task, which reports
                                // conn_closed to the core.
                                closing.extend(conns.remove(&conn).map(|h| (conn, h.task)));
                                self.stats.inc(&self.stats.connections_slow);
                            }
                        }
                    }
                    Output::Close { conn } => {
                        closing.extend(self.conns.borrow_mut().remove(&conn).map(|h| (conn, h.task)));
                    }
                    Output::Shard { to, msg } => {
                        if let Some(p) = self.peers.get(to as usize) {
                            p.send(msg);
                        }
                    }
                }
            }
        }
        for (conn, task) in closing {
            let io = self.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(CLOSE_GRACE).await;
                if !task.is_finished() {
                    // Stuck writing to a peer that does not read: abort, and do the clean-up
                    // the task would have done.
                    task.abort();
                    io.core.borrow_mut().conn_closed(Instant::now(), conn);
                    io.flush();
                }
            });
        }
    }
}

fn shard_thread(start: ShardStart) {
    let ShardStart { index, n, addr, cfg, conn_queue, bindings, stats, mut inbox, peers, mut stop, ready, seed } =
        start;
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = match bind_listener(addr) {
            Ok(l) => {
                let _ = ready.send(l.local_addr());
                l
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let io = Rc::new(ShardIo {
            core: RefCell::new(Shard::new(index, n, cfg, bindings.clone(), stats.clone(), seed)),
            conns: RefCell::new(HashMap::new()),
            peers,
            rbuf: RefCell::new(vec![0u8; 64 * 1024]),
            stats,
        });
        {
            let io = io.clone();
            tokio::task::spawn_local(async move {
                while let Some(m) = inbox.recv().await {
                    let now = Instant::now();
                    {
                        let mut core = io.core.borrow_mut();
                        core.handle_msg(now, m);
                        // Take what else is queued before flushing once.
                        for _ in 0..256 {
                            match inbox.try_recv() {
                                Ok(m) => core.handle_msg(now, m),
                                Err(_) => break,
                            }
                        }
                    }
                    io.flush();
                }
            });
        }
        {
            let io = io.clone();
            tokio::task::spawn_local(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                let mut n: u64 = 0;
                loop {
                    tick.tick().await;
                    let now = Instant::now();
                    io.core.borrow_mut().handle_tick(now);
                    io.flush();
                    n += 1;
                    if index == 0 && n.is_multiple_of(40) {
                        bindings.purge(now);
                    }
                }
            });
        }
        let mut last_accept_warning: Option<Instant> = None;
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let (stream, peer) = match r {
                        Ok(c) => c,
                        Err(e) => {
                            accept_failed(&io.stats, &e, &mut last_accept_warning).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let id = io.core.borrow_mut().conn_opened(Instant::now(), peer);
                    let (tx, rx) = mpsc::channel(conn_queue);
                    let task = tokio::task::spawn_local(conn_task(io.clone(), id, stream, rx)).abort_handle();
                    io.conns.borrow_mut().insert(id, ConnHandle { tx, task });
                }
                _ = stop.changed() => break,
            }
        }
        drop(listener);
        io.core.borrow_mut().shutdown();
        io.flush();
        // Give connection tasks a moment to write their ERROR(Shutdown) and close.
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline && io.core.borrow().open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

/// A failed accept: counted, logged at most once a second, and, when the process is out of
/// descriptors or memory, followed by a pause. The pending connection stays in the
/// listener's backlog, so retrying at once would spin on the same error.
async fn accept_failed(stats: &Stats, e: &io::Error, last_warning: &mut Option<Instant>) {
    stats.accept_errors.fetch_add(1, Ordering::Relaxed);
    let resource = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM));
    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
        *last_warning = Some(Instant::now());
        if resource {
            tracing::warn!("accept failed: {e}; new connections wait (RLIMIT_NOFILE or memory exhausted)");
        } else {
            tracing::warn!("accept failed: {e}");
        }
    }
    if resource {
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}

async fn conn_task(io: Rc<ShardIo>, id: u64, stream: TcpStream, mut rx: mpsc::Receiver<Frame>) {
    let (rd, mut wr) = stream.into_split();
    let mut dec = FrameDecoder::new();
    let mut wbuf: Vec<u8> = Vec::new();
    let mut reading = true;
    loop {
        tokio::select! {
            r = rd.readable(), if reading => {
                if r.is_err() {
                    break;
                }
                let res = {
                    let mut buf = io.rbuf.borrow_mut();
                    match rd.try_read(&mut buf) {
                        Ok(0) => Err(()),
                        Ok(n) => {
                            dec.push(&buf[..n]);
                            Ok(())
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                        Err(_) => Err(()),
                    }
                };
                if res.is_err() {
                    break;
                }
                let now = Instant::now();
                {
                    let mut core = io.core.borrow_mut();
                    loop {
                        match dec.next_frame() {
                            Ok(Some(f)) => core.conn_frame(now, id, f),
                            Ok(None) => break,
                            Err(e) => {
                                core.conn_error(now, id, &e);
                                reading = false;
                                break;
                            }
                        }
                    }
                }
                io.flush();
            }
            m = rx.recv() => match m {
                Some(f) => {
                    f.encode(&mut wbuf);
                    while let Ok(f) = rx.try_recv() {
                        f.encode(&mut wbuf);
                    }
                    if wr.write_all(&wbuf).await.is_err() {
                        break;
                    }
                    wbuf.clear();
                }
                // The shard dropped our sender: everything queued was written; close.
                None => break,
            }
        }
    }
    let _ = wr.shutdown().await;
    io.conns.borrow_mut().remove(&id);
    io.core.borrow_mut().conn_closed(Instant::now(), id);
    io.flush();
}

fn stun_thread(sock: StdUdpSocket, bindings: Arc<Bindings>, stats: Arc<Stats>, stop: Arc<AtomicBool>, rate: f64) {
    let mut limiter = proto::shard::stun_limit::StunLimiter::new(rate, 2.0 * rate);
    let mut buf = [0u8; 2048];
    let mut out = [0u8; stun::MAX_RESPONSE_LEN];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(_) => continue, // timeout (to check `stop`) or a transient ICMP error
        };
        let data = &buf[..n];
        match classify(data) {
            DatagramKind::Stun => match stun::parse(data) {
                Ok(StunMessage::BindingRequest { txid }) => {
                    let now = Instant::now();
                    let len = stun::emit_binding_success(&txid, from, &mut out);
                    // No amplifier: an answer is at most twice its request (32 bytes for
                    // IPv4, 44 for IPv6; nullpunch's own requests are 36).
                    if len > 2 * n {
                        stats.inc(&stats.stun_too_small);
                        continue;
                    }
                    if !limiter.allow(from.ip(), now) {
                        stats.inc(&stats.stun_rate_limited);
                        continue;
                    }
                    if !bindings.insert(txid, from, now) {
                        stats.inc(&stats.stun_table_full);
                    }
                    // Counted before the answer leaves, so whoever holds the answer sees the count.
                    stats.inc(&stats.stun_requests);
                    let _ = sock.send_to(&out[..len], from);
                }
                _ => stats.inc(&stats.udp_malformed),
            },
            DatagramKind::Rtp | DatagramKind::Rtcp => {
                stats.inc(&stats.udp_non_stun);
                stats.inc(&stats.udp_media);
            }
            DatagramKind::Null | DatagramKind::Unknown => stats.inc(&stats.udp_non_stun),
        }
    }
}
