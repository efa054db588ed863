//! A portable tokio driver: runs one [`Client`] over a TCP connection to the manager and a
//! UDP socket, and hands events and received media to an [`App`].
//!
//! One loop turn: read the clock once, drain the client's output (frames to TCP, control
//! datagrams to UDP, events to the app), then wait for the first of: TCP bytes, a UDP
//! datagram, the client's next timer, or the app's next wake-up. If the manager connection
//! drops, calls with a path keep going and the driver reconnects with jittered exponential
//! backoff (200 ms doubling to 5 s), re-running discovery and registration. A client given
//! several managers ([`Managers`]) moves to the next one in the list instead, after a short
//! jittered pause (50-250 ms), as [`proto::reconnect`] says.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UdpSocket};

use proto::client::{CallHandle, Client, ClientError, Event, Output, Received, SocketId, Transmit};
use proto::reconnect::{ConnectError, GiveUp, Next, Reconnect, CONNECT_TIMEOUT};
use proto::rng::Rng;
use proto::stream::{FrameStream, StreamError};

use crate::tls::ClientTls;

/// Largest datagram the driver receives; longer ones are truncated by the kernel and then
/// rejected by the parsers.
pub const MAX_DATAGRAM: usize = 2048;

/// Ask for `bytes` of kernel receive and send buffer on a UDP socket. The default
/// (about 208 KiB) holds only a few hundred small datagrams, so a socket shared by many
/// sessions overflows at the first scheduling hiccup. Uses SO_RCVBUFFORCE/SO_SNDBUFFORCE
/// when permitted (root), else the capped SO_RCVBUF/SO_SNDBUF. Returns the receive size the
/// kernel granted (it reports twice the request, for bookkeeping).
pub fn set_socket_buffers(udp: &impl std::os::fd::AsRawFd, bytes: usize) -> usize {
    let fd = udp.as_raw_fd();
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    let set = |force: libc::c_int, plain: libc::c_int| {
        // SAFETY: setsockopt with a pointer to a c_int of the stated size.
        unsafe {
            let p = &v as *const libc::c_int as *const libc::c_void;
            let n = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::setsockopt(fd, libc::SOL_SOCKET, force, p, n) != 0 {
                libc::setsockopt(fd, libc::SOL_SOCKET, plain, p, n);
            }
        }
    };
    set(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
    set(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
    let mut got: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes a c_int into `got`.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &mut got as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        );
    }
    got.max(0) as usize
}

/// How a connect error counts for the connection policy ([`proto::reconnect`]): "no local
/// port free right now" (EADDRNOTAVAIL: every ephemeral port of the source address busy
/// towards the manager, often only while a previous run's connections leave TIME_WAIT) or
/// anything else.
pub(crate) fn connect_error(e: &io::Error) -> ConnectError {
    if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
        ConnectError::NoLocalPort
    } else {
        ConnectError::Other
    }
}

/// The client's failure for a first connection the policy gave up on.
pub(crate) fn give_up(why: GiveUp, source: Option<SocketAddr>, manager: SocketAddr, err: io::Error) -> DriverError {
    match why {
        GiveUp::Unreachable => DriverError::ManagerUnreachable { addr: manager, source: err },
        GiveUp::NoLocalPort { waited } => {
            let from = source.map(|s| s.ip().to_string()).unwrap_or_else(|| "this host".into());
            DriverError::NoLocalPort { addr: manager, from, waited }
        }
    }
}

/// The managers a client knows (several managers acting as one service, or just one) and
/// the index of the one it connects to first. The first connection tries them in order from
/// there and fails only when every one failed; a lost connection moves on to the next one
/// ([`proto::reconnect`]). The same TLS configuration serves every one of them (one
/// deployment: one server name or pin). A plain [`SocketAddr`] converts into a list of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Managers {
    addrs: Vec<SocketAddr>,
    first: usize,
}

impl Managers {
    /// `addrs` (at least one: panics on an empty list), trying `addrs[first % len]` first.
    pub fn new(addrs: Vec<SocketAddr>, first: usize) -> Self {
        assert!(!addrs.is_empty(), "a client needs at least one manager");
        let first = first % addrs.len();
        Managers { addrs, first }
    }

    /// The same list, starting at `first` (modulo the length): client `i` of a fleet starts
    /// at `i`, so the fleet spreads over the managers.
    pub fn starting_at(&self, first: usize) -> Self {
        Managers::new(self.addrs.clone(), first)
    }

    /// The addresses, in list order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The index tried first.
    pub fn first(&self) -> usize {
        self.first
    }

    /// The address of manager `ix` (modulo the length).
    pub fn get(&self, ix: usize) -> SocketAddr {
        self.addrs[ix % self.addrs.len()]
    }

    /// A connection policy for this list.
    pub fn policy(&self) -> Reconnect {
        Reconnect::managers(self.addrs.len(), self.first)
    }
}

impl From<SocketAddr> for Managers {
    fn from(a: SocketAddr) -> Self {
        Managers::new(vec![a], 0)
    }
}

impl From<Vec<SocketAddr>> for Managers {
    fn from(addrs: Vec<SocketAddr>) -> Self {
        Managers::new(addrs, 0)
    }
}

/// The client's failure once the policy gave its first connection up: with one manager,
/// that manager's error; with several, every one's ([`DriverError::NoManager`]). `errors`
/// holds each manager's last connect error, by index; `udp` the client's UDP address.
pub(crate) fn gave_up(
    policy: &Reconnect,
    managers: &Managers,
    udp: Option<SocketAddr>,
    errors: &mut [Option<io::Error>],
) -> DriverError {
    let mut failures: Vec<DriverError> = policy
        .failures()
        .iter()
        .map(|&(ix, why)| {
            let addr = managers.get(ix);
            let err = errors.get_mut(ix).and_then(Option::take).unwrap_or_else(|| io::Error::other("connect failed"));
            give_up(why, tcp_source(udp, addr), addr, err)
        })
        .collect();
    if failures.len() == 1 && managers.addrs().len() == 1 {
        return failures.pop().expect("one failure");
    }
    DriverError::NoManager { failures }
}

/// Point the client's STUN requests at manager `addr` when they went to one of the
/// managers (each manager answers STUN on its own UDP port; the one a client registers with
/// must learn its binding), then tell it the connection is up.
fn follow_manager(client: &mut Client, managers: &Managers, addr: SocketAddr) {
    if client.stun_server().is_some_and(|s| s != addr && managers.addrs().contains(&s)) {
        client.set_stun_server(Some(addr));
    }
}

type Connecting = std::pin::Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Buffers per batched receive (one `recvmmsg`).
const RX_BATCH: usize = if quinn_udp::BATCH_SIZE < 32 { quinn_udp::BATCH_SIZE } else { 32 };
/// Bytes per receive buffer: room for a GRO batch of 64 KiB.
const RX_BUF: usize = 64 * 1024;
/// Batched receives per wake-up at most.
const RECV_ROUNDS: usize = 4;

/// Receive buffers of the portable driver, one set per thread (they are used only within a
/// synchronous stretch of a loop turn), so memory does not grow with the number of clients.
struct RxBufs {
    bufs: Vec<u8>,
    meta: [quinn_udp::RecvMeta; RX_BATCH],
}

thread_local! {
    static RX: std::cell::RefCell<RxBufs> = std::cell::RefCell::new(RxBufs {
        bufs: vec![0u8; RX_BATCH * RX_BUF],
        meta: [quinn_udp::RecvMeta::default(); RX_BATCH],
    });
}

/// Which UDP IO a driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// The tokio driver ([`run`]): readiness from tokio, datagrams through `quinn-udp`
    /// (`recvmmsg` batches with GRO, `sendmsg`).
    Portable,
    /// The thread-per-core io_uring driver ([`crate::reactor`]).
    #[cfg(target_os = "linux")]
    Uring,
}

impl Io {
    /// Parse `uring`, `portable` or `auto`. `auto` takes the environment variable
    /// `NULLPUNCH_IO` if set (so a test suite can force a driver), else [`Io::auto`].
    pub fn choose(s: &str) -> Result<Io, String> {
        match s {
            "portable" => Ok(Io::Portable),
            #[cfg(target_os = "linux")]
            "uring" => {
                if crate::uring::Ring::available() {
                    Ok(Io::Uring)
                } else {
                    Err("io_uring is not available here (old kernel or blocked by seccomp); use --io portable or auto"
                        .into())
                }
            }
            "auto" => match std::env::var("NULLPUNCH_IO") {
                Ok(v) if v != "auto" && !v.is_empty() => Io::choose(&v),
                _ => Ok(Io::auto()),
            },
            other => Err(format!("unknown io {other:?} (uring, portable or auto)")),
        }
    }

    /// The default driver: io_uring where a ring with the driver's features can be set up
    /// (Linux with DEFER_TASKRUN and provided buffer rings, not blocked by seccomp), else
    /// portable.
    pub fn auto() -> Io {
        #[cfg(target_os = "linux")]
        if crate::uring::Ring::available() {
            return Io::Uring;
        }
        Io::Portable
    }

    /// "uring" or "portable".
    pub fn as_str(self) -> &'static str {
        match self {
            Io::Portable => "portable",
            #[cfg(target_os = "linux")]
            Io::Uring => "uring",
        }
    }
}

/// Where the app's and the client's datagrams go.
pub(crate) enum Out<'a> {
    Tokio(&'a UdpSocket, &'a quinn_udp::UdpSocketState, &'a mut crate::search::TokioSockets),
    /// The thread's ring, sending from the unit's socket (or its search sockets).
    #[cfg(target_os = "linux")]
    Ring(&'a mut crate::uring::Ring, crate::uring::Sock, &'a mut crate::search::RingSockets),
}

impl Out<'_> {
    pub(crate) fn reborrow(&mut self) -> Out<'_> {
        match self {
            Out::Tokio(u, st, x) => Out::Tokio(u, st, x),
            #[cfg(target_os = "linux")]
            Out::Ring(r, fd, x) => Out::Ring(r, *fd, x),
        }
    }

    /// Open a search socket; false if it could not be.
    fn open(&mut self, id: SocketId) -> bool {
        let r = match self {
            Out::Tokio(_, _, x) => x.open(id),
            #[cfg(target_os = "linux")]
            Out::Ring(r, _, x) => x.open(r, id),
        };
        if let Err(e) = &r {
            tracing::warn!("cannot open a search socket: {e}");
        }
        r.is_ok()
    }

    fn close(&mut self, id: SocketId) {
        match self {
            Out::Tokio(_, _, x) => x.close(id),
            #[cfg(target_os = "linux")]
            Out::Ring(r, _, x) => x.close(r, id),
        }
    }
}

/// Errors that stop the driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The first connection to the manager failed.
    #[error("manager {addr} unreachable: {source}")]
    ManagerUnreachable {
        /// The manager's address.
        addr: SocketAddr,
        /// The connect error.
        source: io::Error,
    },
    /// The first connection to the manager found no free local port for as long as it
    /// waited.
    #[error(
        "no local port free for a connection from {from} to the manager {addr} after {:.1} s: every ephemeral \
         port of that address is in use or in TIME_WAIT towards the manager (net.ipv4.ip_local_port_range); spread \
         the clients over more source addresses or let the TIME_WAITs of an earlier run pass",
        waited.as_secs_f64()
    )]
    NoLocalPort {
        /// The manager's address.
        addr: SocketAddr,
        /// The source address (or "this host" when the kernel chose it).
        from: String,
        /// How long the client tried.
        waited: Duration,
    },
    /// The first connection failed for every manager of the list (several managers), each
    /// for the reason given, in the order tried.
    #[error("no manager could be reached: {}", list_failures(failures))]
    NoManager {
        /// Each manager's failure ([`DriverError::ManagerUnreachable`] or
        /// [`DriverError::NoLocalPort`]).
        failures: Vec<DriverError>,
    },
    /// The UDP socket failed.
    #[error("udp socket error: {0}")]
    Udp(io::Error),
    /// TLS with the manager failed before any connection was secured (its certificate is
    /// not trusted, it does not speak TLS, ...): retrying cannot help.
    #[error("TLS with the manager {addr} failed: {source}")]
    Tls {
        /// The manager's address.
        addr: SocketAddr,
        /// What failed (rustls's text for a TLS error).
        source: StreamError,
    },
}

fn list_failures(failures: &[DriverError]) -> String {
    failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; ")
}

/// Counters kept by the driver itself.
#[derive(Debug, Default, Clone)]
pub struct DriverCounters {
    /// Datagrams sent.
    pub udp_sent: u64,
    /// Datagrams received.
    pub udp_received: u64,
    /// Sends that failed (socket buffer full, unreachable).
    pub udp_send_errors: u64,
    /// Manager connections made (1 + reconnects).
    pub connects: u64,
    /// Manager connections lost.
    pub disconnects: u64,
    /// Connections made to a manager other than the previous connection's (several
    /// managers).
    pub failovers: u64,
    /// Frames that failed to decode (the connection was then dropped).
    pub frame_errors: u64,
    /// Connections dropped because the manager stopped reading while frames piled up.
    pub write_stalls: u64,
    /// First-connection attempts that found no free local port (EADDRNOTAVAIL) and were
    /// tried again (see [`DriverError::NoLocalPort`]).
    pub port_waits: u64,
    /// TLS handshakes completed with the manager.
    pub tls_handshakes: u64,
    /// Of those, resumed (a session ticket from an earlier connection).
    pub tls_resumed: u64,
    /// TLS failures (handshake or record) on a manager connection (it was dropped).
    pub tls_errors: u64,
}

/// A new manager connection's stream: TLS with `tls`, else plain.
pub(crate) fn new_stream(tls: Option<&ClientTls>, manager: SocketAddr) -> Result<FrameStream, DriverError> {
    crate::tls::client_stream(tls).map_err(|source| DriverError::Tls { addr: manager, source })
}

/// What a driver does once a stream to manager `manager` of `managers` became ready for
/// frames (at once on plain TCP, after the handshake on TLS): count it, point the client's
/// STUN at that manager, and tell the client, with the TLS binding.
pub(crate) fn established(
    client: &mut Client,
    stream: &FrameStream,
    counters: &mut DriverCounters,
    now: Instant,
    managers: &Managers,
    manager: SocketAddr,
) {
    if stream.is_tls() {
        counters.tls_handshakes += 1;
        if stream.is_resumed() {
            counters.tls_resumed += 1;
        }
    }
    follow_manager(client, managers, manager);
    client.handle_connected(now, stream.binding());
}

/// A connection to `now_at` was made; count it a failover when the previous one went to
/// another manager.
pub(crate) fn count_connect(counters: &mut DriverCounters, last: &mut Option<SocketAddr>, now_at: SocketAddr) {
    counters.connects += 1;
    if last.is_some_and(|l| l != now_at) {
        counters.failovers += 1;
    }
    *last = Some(now_at);
}

/// What the application sees of the driver during a callback.
pub struct Ctx<'a> {
    /// The client state machine: issue `call`, `hangup`, read state.
    pub client: &'a mut Client,
    /// The time of this loop turn.
    pub now: Instant,
    pub(crate) out: Out<'a>,
    pub(crate) buf: &'a mut [u8],
    pub(crate) counters: &'a mut DriverCounters,
    pub(crate) manager: SocketAddr,
}

impl Ctx<'_> {
    /// Send one RTP packet with `payload` on call `handle`, advancing its RTP clock by
    /// `duration_rtp_ts`. A full socket buffer drops the packet and counts it.
    pub fn send_media(&mut self, handle: CallHandle, payload: &[u8], duration_rtp_ts: u32) -> Result<(), ClientError> {
        let t = self.client.send_media(self.now, handle, payload, duration_rtp_ts, self.buf)?;
        send(&mut self.out, t.from, &self.buf[..t.len], t.to, self.counters);
        Ok(())
    }

    /// Send one RTP packet on call `handle` with forwarded RTP fields (see
    /// [`Client::send_rtp`]).
    pub fn send_rtp(
        &mut self,
        handle: CallHandle,
        fields: proto::client::MediaFields,
        payload: &[u8],
        duration_rtp_ts: u32,
    ) -> Result<(), ClientError> {
        let t = self.client.send_rtp(self.now, handle, fields, payload, duration_rtp_ts, self.buf)?;
        send(&mut self.out, t.from, &self.buf[..t.len], t.to, self.counters);
        Ok(())
    }

    /// Driver counters so far.
    pub fn counters(&self) -> &DriverCounters {
        self.counters
    }

    /// The manager of the client's current connection (while it is down, of the last one
    /// made or tried): after a failover, the one it registers with.
    pub fn manager(&self) -> SocketAddr {
        self.manager
    }
}

/// The application on top of the driver.
pub trait App {
    /// An event from the client.
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event);
    /// A media packet arrived for a call.
    fn on_media(&mut self, ctx: &mut Ctx<'_>, packet: Received<'_>);
    /// When the app next wants [`App::on_wakeup`] (e.g. its media clock).
    fn next_wakeup(&self) -> Option<Instant>;
    /// The app's wake-up time has come.
    fn on_wakeup(&mut self, ctx: &mut Ctx<'_>);
    /// True when the driver should stop (after flushing what the client queued).
    fn done(&self) -> bool;
    /// The driver stopped with `error` (its first connection to the manager failed). Called
    /// once, before the driver returns: an app whose runner hosts many clients on one thread
    /// can report the failure while the others go on.
    fn on_failed(&mut self, _error: &DriverError) {}
}

pub(crate) fn send(out: &mut Out<'_>, from: SocketId, data: &[u8], to: SocketAddr, c: &mut DriverCounters) {
    let ok = match out {
        Out::Tokio(udp, state, search) if from == SocketId::MAIN => {
            // From a dual-stack (IPv6) socket, an IPv4 peer is addressed IPv4-mapped (the
            // main socket's address is known from the start: no system call per datagram).
            let to = match (search.ip, to) {
                (Some(std::net::IpAddr::V6(_)), SocketAddr::V4(v4)) => {
                    SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
                }
                _ => to,
            };
            let t =
                quinn_udp::Transmit { destination: to, ecn: None, contents: data, segment_size: None, src_ip: None };
            state.try_send((*udp).into(), &t).is_ok()
        }
        Out::Tokio(_, _, x) => x.send(from, data, to),
        #[cfg(target_os = "linux")]
        Out::Ring(ring, fd, _) if from == SocketId::MAIN => ring.send_copy_from(*fd, data, to),
        #[cfg(target_os = "linux")]
        Out::Ring(ring, _, x) => x.sock(from).is_some_and(|s| ring.send_copy_from(s, data, to)),
    };
    if ok {
        c.udp_sent += 1;
    } else {
        c.udp_send_errors += 1;
    }
}

/// Run `client` and `app` until the app is done or `shutdown` completes (then every call is
/// hung up and the HANGUPs are flushed). Returns the driver's counters.
/// `managers`: one address, or a list ([`Managers`]).
pub async fn run<A: App>(
    client: &mut Client,
    udp: &UdpSocket,
    managers: impl Into<Managers>,
    app: &mut A,
    shutdown: impl Future<Output = ()>,
) -> Result<DriverCounters, DriverError> {
    run_with_wake(client, udp, managers, app, shutdown, None, None).await
}

/// The source address of a client's manager connection: the IP its UDP socket is bound to,
/// when that is a specific address on the same side of loopback as the manager (a client
/// lives at one address, so many simulated clients spread over 127.0.0.x get their TCP
/// ports from their own addresses, not all from 127.0.0.1). Otherwise the kernel chooses.
pub fn tcp_source(udp: Option<SocketAddr>, manager: SocketAddr) -> Option<SocketAddr> {
    let ip = udp?.ip();
    let same_side = ip.is_loopback() == manager.ip().is_loopback() && ip.is_ipv4() == manager.is_ipv4();
    (!ip.is_unspecified() && same_side).then(|| SocketAddr::new(ip, 0))
}

/// Connect to `manager`, from `source` if given.
async fn connect_from(source: Option<SocketAddr>, manager: SocketAddr) -> io::Result<TcpStream> {
    let Some(src) = source else { return TcpStream::connect(manager).await };
    let sock = if manager.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // Let connect() pick the port, so ports are shared across destinations.
    set_bind_no_port(&sock);
    sock.bind(src)?;
    sock.connect(manager).await
}

/// One connect to the manager, bounded by [`CONNECT_TIMEOUT`].
async fn connect_once(source: Option<SocketAddr>, manager: SocketAddr) -> io::Result<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_from(source, manager)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// The first connection, as the policy says: the managers in order until one answers, an
/// error if none can be reached, a wait while no local port is free. Returns the stream
/// and the manager's address.
async fn first_connect(
    udp: Option<SocketAddr>,
    managers: &Managers,
    policy: &mut Reconnect,
    counters: &mut DriverCounters,
    rng: &mut Rng,
) -> Result<(TcpStream, SocketAddr), DriverError> {
    let mut errors: Vec<Option<io::Error>> = managers.addrs().iter().map(|_| None).collect();
    loop {
        policy.connecting(Instant::now());
        let (ix, manager) = (policy.manager(), managers.get(policy.manager()));
        let e = match connect_once(tcp_source(udp, manager), manager).await {
            Ok(s) => return Ok((s, manager)),
            Err(e) => e,
        };
        let next = policy.failed(Instant::now(), connect_error(&e), rng);
        errors[ix] = Some(e);
        let at = match next {
            Next::PortWait(at) => {
                counters.port_waits += 1;
                at
            }
            Next::Retry(at) => at,
            Next::GiveUp(_) => return Err(gave_up(policy, managers, udp, &mut errors)),
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
    }
}

/// IP_BIND_ADDRESS_NO_PORT: a bind to an address with port 0 leaves the port to connect(),
/// which can then reuse a port that is busy towards other destinations.
pub(crate) fn set_bind_no_port(fd: &impl std::os::fd::AsRawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` for its size; a failure only loses the optimisation.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Like [`run`], and also calls [`App::on_wakeup`] whenever `wake` is notified, and speaks
/// TLS to the manager with `tls` (the client registers once each handshake completed; a TLS
/// failure before the first one succeeded ends the driver with [`DriverError::Tls`]).
/// tokio's timers have millisecond granularity; a load generator that needs finer
/// scheduling keeps its own precise clock thread and wakes the app through this.
pub async fn run_with_wake<A: App>(
    client: &mut Client,
    udp: &UdpSocket,
    managers: impl Into<Managers>,
    app: &mut A,
    shutdown: impl Future<Output = ()>,
    wake: Option<std::sync::Arc<tokio::sync::Notify>>,
    tls: Option<ClientTls>,
) -> Result<DriverCounters, DriverError> {
    let managers: Managers = managers.into();
    let mut counters = DriverCounters::default();
    let mut rng = crate::entropy::rng();
    let mut policy = managers.policy();
    let local = udp.local_addr().ok();
    let (stream, mut manager) = match first_connect(local, &managers, &mut policy, &mut counters, &mut rng).await {
        Ok(s) => s,
        Err(e) => {
            app.on_failed(&e);
            return Err(e);
        }
    };
    let _ = stream.set_nodelay(true);
    let mut last_manager = None;
    count_connect(&mut counters, &mut last_manager, manager);
    policy.connected();
    let (rd, wr) = stream.into_split();
    let mut tcp: Option<(OwnedReadHalf, OwnedWriteHalf)> = Some((rd, wr));
    let mut stream = match new_stream(tls.as_ref(), manager) {
        Ok(s) => s,
        Err(e) => {
            app.on_failed(&e);
            return Err(e);
        }
    };
    // A TLS handshake has completed on some connection (a later TLS failure is retried).
    let mut secured = false;
    if stream.just_established() {
        established(client, &stream, &mut counters, Instant::now(), &managers, manager);
    }

    let mut rbuf = vec![0u8; 16 * 1024];
    let mut wbuf: Vec<u8> = Vec::with_capacity(4096);
    let state = quinn_udp::UdpSocketState::new(udp.into()).map_err(DriverError::Udp)?;
    // A birthday search's sockets, and the buffer they receive into.
    let mut search = crate::search::TokioSockets { ip: udp.local_addr().ok().map(|a| a.ip()), ..Default::default() };
    let mut search_buf = vec![0u8; MAX_DATAGRAM];
    let mut sbuf = vec![0u8; MAX_DATAGRAM];
    let mut next_connect: Option<Instant> = None;
    // A reconnect in flight: its own select branch, so media and timers go on meanwhile.
    let mut connecting: Option<Connecting> = None;
    let mut stopping = false;
    tokio::pin!(shutdown);

    loop {
        let now = Instant::now();
        drain(client, app, Out::Tokio(udp, &state, &mut search), &mut sbuf, &mut stream, &mut counters, now, manager);
        stream.take_outgoing(&mut wbuf);
        if let Some((_, wr)) = tcp.as_mut() {
            if !wbuf.is_empty() {
                let res = wr.write_all(&wbuf).await;
                wbuf.clear();
                if res.is_err() {
                    lost_connection(
                        client,
                        &mut tcp,
                        &mut stream,
                        &mut counters,
                        &mut next_connect,
                        &mut policy,
                        &mut rng,
                    );
                    continue;
                }
            }
        } else {
            wbuf.clear();
        }
        if stopping || app.done() {
            if let Some((_, mut wr)) = tcp.take() {
                let _ = wr.shutdown().await;
            }
            return Ok(counters);
        }
        let deadline = [client.poll_timeout(), app.next_wakeup(), next_connect].into_iter().flatten().min();
        // tokio fires timers on millisecond ticks, so a deadline already passed would still
        // wait for the next tick: run due work at once instead.
        let sleep = async move {
            match deadline {
                Some(d) if d <= Instant::now() => {}
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = async { wake.as_ref().unwrap().notified().await }, if wake.is_some() => {
                let now = Instant::now();
                let mut ctx = Ctx { client: &mut *client, now, out: Out::Tokio(udp, &state, &mut search), buf: &mut sbuf, counters: &mut counters, manager };
                app.on_wakeup(&mut ctx);
            }
            r = async { connecting.as_mut().unwrap().await }, if connecting.is_some() => {
                connecting = None;
                match r {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        count_connect(&mut counters, &mut last_manager, manager);
                        policy.connected();
                        tcp = Some(s.into_split());
                        match new_stream(tls.as_ref(), manager) {
                            Ok(st) => stream = st,
                            Err(e) => {
                                app.on_failed(&e);
                                return Err(e);
                            }
                        }
                        if stream.just_established() {
                            established(client, &stream, &mut counters, Instant::now(), &managers, manager);
                        }
                    }
                    // Once connected, the policy only retries.
                    Err(e) => next_connect = match policy.failed(Instant::now(), connect_error(&e), &mut rng) {
                        Next::Retry(at) | Next::PortWait(at) => Some(at),
                        Next::GiveUp(_) => unreachable!("a client that was connected is never given up"),
                    },
                }
            }
            _ = &mut shutdown, if !stopping => {
                stopping = true;
                client.hangup_all(Instant::now());
            }
            r = async { tcp.as_mut().unwrap().0.read(&mut rbuf).await }, if tcp.is_some() => {
                let now = Instant::now();
                match r {
                    Ok(n) if n > 0 => {
                        if let Err(e) = stream.receive(&rbuf[..n]) {
                            // Say why to the manager (a TLS alert), then drop the connection.
                            stream.take_outgoing(&mut wbuf);
                            if let Some((_, wr)) = tcp.as_mut() {
                                let _ = wr.write_all(&wbuf).await;
                            }
                            wbuf.clear();
                            counters.tls_errors += 1;
                            if !secured {
                                let e = DriverError::Tls { addr: manager, source: e };
                                app.on_failed(&e);
                                return Err(e);
                            }
                            tracing::warn!("manager connection: {e}");
                            lost_connection(client, &mut tcp, &mut stream, &mut counters, &mut next_connect, &mut policy, &mut rng);
                            continue;
                        }
                        if stream.just_established() {
                            secured = true;
                            established(client, &stream, &mut counters, now, &managers, manager);
                        }
                        loop {
                            match stream.next_frame() {
                                Ok(Some(f)) => client.handle_frame(now, f),
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::warn!("bad frame from manager: {e}");
                                    counters.frame_errors += 1;
                                    lost_connection(client, &mut tcp, &mut stream, &mut counters, &mut next_connect, &mut policy, &mut rng);
                                    break;
                                }
                            }
                        }
                    }
                    _ => lost_connection(client, &mut tcp, &mut stream, &mut counters, &mut next_connect, &mut policy, &mut rng),
                }
            }
            r = udp.readable() => {
                let now = Instant::now();
                if let Err(e) = r {
                    return Err(DriverError::Udp(e));
                }
                // One wake-up, then up to RECV_ROUNDS batched receives without waiting:
                // under load most of the cost of a datagram is the wake-up.
                for _ in 0..RECV_ROUNDS {
                    let got = RX.with(|cell| {
                        let mut rx = cell.borrow_mut();
                        let rx = &mut *rx;
                        let mut chunks = rx.bufs.chunks_mut(RX_BUF);
                        let mut slices: [io::IoSliceMut<'_>; RX_BATCH] =
                            std::array::from_fn(|_| io::IoSliceMut::new(chunks.next().expect("RX_BATCH chunks")));
                        let n = udp.try_io(tokio::io::Interest::READABLE, || state.recv(udp.into(), &mut slices, &mut rx.meta))?;
                        for (m, buf) in rx.meta[..n].iter().zip(slices.iter_mut()) {
                            let len = m.len.min(buf.len());
                            let data = &mut buf[..len];
                            // GRO: several datagrams of `stride` bytes in one buffer.
                            for d in data.chunks_mut(m.stride.max(1)) {
                                counters.udp_received += 1;
                                if let Some(pkt) = client.handle_datagram(now, canonical(m.addr), d) {
                                    let mut ctx = Ctx { client: &mut *client, now, out: Out::Tokio(udp, &state, &mut search), buf: &mut sbuf, counters: &mut counters, manager };
                                    app.on_media(&mut ctx, pkt);
                                }
                            }
                        }
                        Ok::<usize, io::Error>(n)
                    });
                    match got {
                        Ok(n) if n == RX_BATCH => continue,
                        Ok(_) => break,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => break,
                        // ICMP errors surface as receive errors on Linux (port unreachable): count, go on.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused || e.kind() == io::ErrorKind::ConnectionReset => {
                            counters.udp_send_errors += 1;
                            break;
                        }
                        Err(e) => return Err(DriverError::Udp(e)),
                    }
                }
            }
            (id, r) = search.recv(&mut search_buf), if !search.socks.is_empty() => {
                let now = Instant::now();
                match r {
                    Ok((n, from)) => {
                        counters.udp_received += 1;
                        if let Some(pkt) = client.handle_datagram_on(now, id, from, &mut search_buf[..n]) {
                            let mut ctx = Ctx { client: &mut *client, now, out: Out::Tokio(udp, &state, &mut search), buf: &mut sbuf, counters: &mut counters, manager };
                            app.on_media(&mut ctx, pkt);
                        }
                    }
                    // ICMP errors and the like on one search socket: count, go on.
                    Err(_) => counters.udp_send_errors += 1,
                }
            }
            _ = sleep => {
                let now = Instant::now();
                client.handle_timeout(now);
                if app.next_wakeup().is_some_and(|t| now >= t) {
                    let mut ctx = Ctx { client: &mut *client, now, out: Out::Tokio(udp, &state, &mut search), buf: &mut sbuf, counters: &mut counters, manager };
                    app.on_wakeup(&mut ctx);
                }
                if next_connect.is_some_and(|t| now >= t) {
                    next_connect = None;
                    policy.connecting(now);
                    manager = managers.get(policy.manager());
                    connecting = Some(Box::pin(connect_once(tcp_source(local, manager), manager)));
                }
            }
        }
    }
}

fn lost_connection(
    client: &mut Client,
    tcp: &mut Option<(OwnedReadHalf, OwnedWriteHalf)>,
    stream: &mut FrameStream,
    counters: &mut DriverCounters,
    next_connect: &mut Option<Instant>,
    policy: &mut Reconnect,
    rng: &mut Rng,
) {
    if tcp.take().is_some() {
        counters.disconnects += 1;
    }
    // Frames queued meanwhile go nowhere (the next connection has a stream of its own).
    *stream = FrameStream::plain();
    client.handle_disconnected(Instant::now());
    *next_connect = Some(policy.lost(Instant::now(), rng));
}

/// Drain the client's output in its order until it is empty: frames go into `stream` (the
/// driver writes its outgoing bytes after the drain), control datagrams are sent at once,
/// events handed to the app (which may queue more). The one drain loop of both drivers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn drain<A: App>(
    client: &mut Client,
    app: &mut A,
    mut out: Out<'_>,
    sbuf: &mut [u8],
    stream: &mut FrameStream,
    counters: &mut DriverCounters,
    now: Instant,
    manager: SocketAddr,
) {
    loop {
        match client.poll_output(sbuf) {
            Ok(Output::Frame(f)) => stream.send_frame(&f),
            Ok(Output::Transmit(Transmit { from, to, len })) => send(&mut out, from, &sbuf[..len], to, counters),
            Ok(Output::OpenSocket(id)) => {
                if !out.open(id) {
                    client.handle_socket_failed(now, id);
                }
            }
            Ok(Output::CloseSocket(id)) => out.close(id),
            Ok(Output::Event(ev)) => {
                let mut ctx = Ctx {
                    client: &mut *client,
                    now,
                    out: out.reborrow(),
                    buf: &mut *sbuf,
                    counters: &mut *counters,
                    manager,
                };
                app.on_event(&mut ctx, ev);
            }
            Ok(Output::Timeout(_)) => break,
            Err(e) => {
                // The send buffer is sized for any packet, so this is a bug; say so, never spin.
                tracing::error!("client output: {e}");
                break;
            }
        }
    }
}

/// Frames a stream sends at once when it finds several due (after a stall of its thread).
const MAX_LATE_FRAMES: u32 = 3;

/// What a stream whose next frame was planned at `next` does at `now` with frames of
/// `frame`: (frames to skip, frames to send now). Frames more than [`MAX_LATE_FRAMES`]
/// behind are skipped (a real-time sender does not burst old audio), the rest are sent, and
/// the stream's next send stays on its own grid (`next` plus whole frames). Re-planning from
/// `now` instead would give every stream that stalled together the same phase, and turn an
/// even spread of sends into one burst per frame for the rest of the run.
pub(crate) fn catch_up(next: Instant, now: Instant, frame: Duration) -> (u32, u32) {
    if next > now || frame.is_zero() {
        return (0, 0);
    }
    let due = (now.duration_since(next).as_nanos() / frame.as_nanos()) as u64 + 1;
    let due = due.min(u32::MAX as u64) as u32;
    let send = due.min(MAX_LATE_FRAMES);
    (due - send, send)
}

/// Paced media streams for an [`App`]: one synthetic 50 packets/s stream per call, each
/// frame stamped with its planned send time (microseconds since `epoch`) so a receiver on
/// the same clock can measure one-way latency. After a stall a stream sends at most three
/// late frames and skips older ones, keeping its phase ([`catch_up`]). Streams wait in a
/// heap by next send time, so a wake-up costs O(log n) per due stream, not a scan of all.
pub struct Streams {
    map: std::collections::HashMap<CallHandle, Stream>,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, CallHandle)>>,
    payload: Vec<u8>,
    epoch: Instant,
    skipped: u64,
    sent: u64,
}

struct Stream {
    source: proto::media::SyntheticSource,
    next_send: Instant,
    hangup_at: Option<Instant>,
    /// No media is sent inside [from, until).
    pause: Option<(Instant, Instant)>,
}

impl Stream {
    fn wake_at(&self) -> Instant {
        self.hangup_at.map_or(self.next_send, |h| h.min(self.next_send))
    }
}

impl Streams {
    /// No streams; send stamps count from `epoch`.
    pub fn new(epoch: Instant) -> Self {
        Streams {
            map: Default::default(),
            heap: Default::default(),
            payload: vec![0u8; 1500],
            epoch,
            skipped: 0,
            sent: 0,
        }
    }

    /// Start streaming on `handle` now (no-op if already streaming); hang up at `hangup_at`.
    pub fn start(&mut self, handle: CallHandle, now: Instant, hangup_at: Option<Instant>) {
        if self.map.contains_key(&handle) {
            return;
        }
        let s = Stream { source: proto::media::SyntheticSource::opus_like(), next_send: now, hangup_at, pause: None };
        self.heap.push(std::cmp::Reverse((s.wake_at(), handle)));
        self.map.insert(handle, s);
    }

    /// Send no media on `handle` from `from` until `until` (the client's keepalives still
    /// flow, so an idle path stays open).
    pub fn pause(&mut self, handle: CallHandle, from: Instant, until: Instant) {
        if let Some(s) = self.map.get_mut(&handle) {
            s.pause = Some((from, until));
        }
    }

    /// Forget `handle` (its call ended). Its heap entry is dropped when it comes up.
    pub fn stop(&mut self, handle: CallHandle) {
        self.map.remove(&handle);
    }

    /// Number of streams.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if there are no streams.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Frames this sender skipped because it fell more than three frames behind (its own
    /// stall, not the network's: they were never sent, so receivers cannot count them lost).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// When [`Streams::run`] next has work (possibly early, for a stream that stopped).
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.heap.peek().map(|std::cmp::Reverse((t, _))| *t)
    }

    /// Frames sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Send the frames that are due and hang up the calls whose time is up. Returns the
    /// number of frames sent.
    pub fn run(&mut self, ctx: &mut Ctx<'_>) -> u64 {
        let sent0 = self.sent;
        let now = ctx.now;
        while let Some(&std::cmp::Reverse((t, h))) = self.heap.peek() {
            if t > now {
                break;
            }
            self.heap.pop();
            let Some(s) = self.map.get_mut(&h) else { continue };
            if s.wake_at() != t {
                continue; // a stale entry; the stream has a later one
            }
            if s.hangup_at.is_some_and(|t| now >= t) {
                self.map.remove(&h);
                let _ = ctx.client.hangup(now, h);
                continue;
            }
            let frame = Duration::from_millis(proto::media::MediaSource::frame_ms(&s.source) as u64);
            let paused = s.pause.is_some_and(|(from, until)| now >= from && now < until);
            if let (true, Some((_, until))) = (paused, s.pause) {
                // Sleep through the pause instead of waking for every frame not sent.
                s.next_send = s.next_send.max(until);
                self.heap.push(std::cmp::Reverse((s.wake_at(), h)));
                continue;
            }
            let (skip, due) = catch_up(s.next_send, now, frame);
            if !paused {
                self.skipped += skip as u64;
            }
            s.next_send += frame * skip;
            for _ in 0..due {
                if !paused {
                    // Stamp the planned send time: a frame sent late carries its lateness
                    // into the measured one-way latency (no coordinated omission).
                    s.source.stamp_us = s.next_send.saturating_duration_since(self.epoch).as_micros() as u64;
                    let (len, dur) = proto::media::MediaSource::next_frame(&mut s.source, &mut self.payload);
                    if ctx.send_media(h, &self.payload[..len], dur).is_ok() {
                        self.sent += 1;
                    }
                }
                s.next_send += frame;
            }
            self.heap.push(std::cmp::Reverse((s.wake_at(), h)));
        }
        self.sent - sent0
    }
}

/// An IPv4-mapped IPv6 address (how a dual-stack socket reports an IPv4 peer) as the IPv4
/// address it is; anything else unchanged.
pub(crate) fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(20);

    #[test]
    fn a_stream_on_time_sends_its_frame_and_nothing_early() {
        let t0 = Instant::now();
        assert_eq!(catch_up(t0 + FRAME, t0, FRAME), (0, 0));
        assert_eq!(catch_up(t0, t0, FRAME), (0, 1));
        assert_eq!(catch_up(t0, t0 + Duration::from_millis(19), FRAME), (0, 1));
        assert_eq!(catch_up(t0, t0 + FRAME, FRAME), (0, 2));
    }

    #[test]
    fn after_a_stall_old_frames_are_skipped_and_the_last_three_sent() {
        let t0 = Instant::now();
        // 150 ms late: frames planned at 0, 20, ..., 140 are due (8); 5 are skipped.
        assert_eq!(catch_up(t0, t0 + Duration::from_millis(150), FRAME), (5, 3));
        assert_eq!(catch_up(t0, t0 + Duration::from_millis(50), FRAME), (0, 3));
    }

    /// Streams started at different times keep their phases through a stall that hits all
    /// of them at once: 1000 streams spread over a 20 ms frame stay spread, rather than all
    /// being re-planned from the moment the stall ended (one burst per frame afterwards).
    #[test]
    fn streams_that_stall_together_keep_their_spread() {
        let t0 = Instant::now();
        let mut next: Vec<Instant> = (0..1000u64).map(|i| t0 + Duration::from_micros(i * 20)).collect();
        let phase = |t: Instant| t.duration_since(t0).as_micros() % FRAME.as_micros();
        let before: Vec<u128> = next.iter().map(|&t| phase(t)).collect();
        let resume = t0 + Duration::from_millis(153);
        for n in next.iter_mut() {
            let (skip, send) = catch_up(*n, resume, FRAME);
            assert!(skip + send >= 7, "every stream was at least 7 frames behind");
            *n += FRAME * (skip + send);
            assert!(*n > resume && *n <= resume + FRAME);
        }
        let after: Vec<u128> = next.iter().map(|&t| phase(t)).collect();
        assert_eq!(before, after);
        // So the next frame's sends are still spread over a whole frame.
        let first = *next.iter().min().unwrap();
        let last = *next.iter().max().unwrap();
        assert!(last.duration_since(first) >= Duration::from_millis(19));
    }
}
