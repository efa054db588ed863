//! The thread-per-core io_uring driver (Linux).
//!
//! One thread, one ring, many *units*: a unit is a [`Client`] with its UDP socket, its TCP
//! connection to the manager and its [`App`]. Run one [`run`] per core, each with its share
//! of the units. Sessions share their client's socket (demultiplexed by source address and
//! call token in the client), so "one socket per core shared by many sessions" is a few
//! units per thread with many calls each; "one socket per session" is one unit per session.
//!
//! One loop turn:
//! 1. reap every completion: datagrams (multishot RECVMSG into one provided buffer ring
//!    shared by all the thread's sockets), TCP readiness, wake-ups;
//! 2. feed them to the units' clients and apps, fire the timers that are due (one heap over
//!    all units), and drain what the clients queued: frames are written to TCP (non-blocking,
//!    the rest waits for POLLOUT), datagrams go into the ring's owned send slots;
//! 3. submit everything the turn queued and wait, in one `io_uring_enter`, for either a
//!    batch of completions or the next timer.
//!
//! Batching: the wait asks for as many completions as the last turn reaped (at least one,
//! at most [`ReactorConfig::batch`]), so an idle thread wakes at the first datagram and a
//! loaded one wakes once per batch, or after one tick if the batch is not complete (so a
//! datagram waits at most a tick before it is handled); and timers are served at most once per
//! [`ReactorConfig::tick`], so all the media frames due within a tick go out in one
//! submission. The ring is SINGLE_ISSUER + DEFER_TASKRUN: the kernel does the completion
//! work when the thread waits, not in an interrupt per datagram.
//!
//! The TCP side runs through the same ring (readiness polls, non-blocking reads and writes,
//! non-blocking connect), so one thread needs no other event loop. If the manager
//! connection drops, calls with a path go on and the unit reconnects with jittered
//! exponential backoff (200 ms doubling to 5 s), as the tokio driver does.

use std::collections::BinaryHeap;
use std::cmp::Reverse;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::driver::{self, App, Ctx, DriverCounters, DriverError, Out, MAX_DATAGRAM};
use crate::rng::Rng;
use crate::uring::{Completion, UdpRing};
use crate::wire::frame::FrameDecoder;

/// Limit on one TCP connect to the manager.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames waiting for a manager that stopped reading, beyond which the connection is
/// dropped (and re-made) rather than buffered without bound.
const MAX_WRITE_BACKLOG: usize = 4 << 20;
/// Longest sleep with nothing scheduled (the stop signal wakes the thread anyway).
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Tuning of a reactor thread.
#[derive(Debug, Clone)]
pub struct ReactorConfig {
    /// Timers are served at most once per tick, so the frames due within it leave in one
    /// submission. Adds up to one tick to a frame's send time.
    pub tick: Duration,
    /// Most completions a wait asks for before it returns (it also returns at the next timer).
    pub batch: usize,
    /// Receive buffers shared by the thread's sockets (a power of two).
    pub recv_buffers: u16,
    /// Owned send slots (datagrams queued and not yet completed).
    pub send_slots: u16,
    /// Kernel socket buffer to ask for on each UDP socket (None: leave the default).
    pub socket_buffer: Option<usize>,
    /// Bytes per receive buffer (the largest datagram, or GRO batch, taken whole).
    pub recv_buffer_size: usize,
    /// Turn on UDP GRO on each socket: a burst of same-size datagrams from one sender (a
    /// GSO send) arrives as one receive, split back into datagrams by the ring. Needs
    /// `recv_buffer_size` of 64 KiB, or a coalesced receive is truncated and dropped
    /// (`recv_errors`); off by default, since 50 packets/s audio never coalesces.
    pub gro: bool,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            tick: Duration::from_micros(250),
            batch: 64,
            recv_buffers: 4096,
            send_slots: 4096,
            socket_buffer: None,
            recv_buffer_size: MAX_DATAGRAM,
            gro: false,
        }
    }
}

/// An eventfd another thread uses to wake a unit's app ([`App::on_wakeup`]) or to stop a
/// reactor.
#[derive(Debug)]
pub struct Wake {
    fd: OwnedFd,
}

impl Wake {
    /// A new wake-up source.
    pub fn new() -> io::Result<Arc<Wake>> {
        // SAFETY: creating an eventfd; ownership passes to OwnedFd at once.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        Ok(Arc::new(Wake { fd: unsafe { OwnedFd::from_raw_fd(raw) } }))
    }

    /// Wake the reactor that watches this.
    pub fn notify(&self) {
        let one = 1u64;
        // SAFETY: writing 8 bytes to our eventfd.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
    }

    /// Reset the eventfd after a wake-up was seen.
    pub fn clear(&self) {
        let mut v = 0u64;
        // SAFETY: reading 8 bytes from our non-blocking eventfd.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    }
}

impl AsRawFd for Wake {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Tells reactors to stop: every call is hung up, the HANGUPs flushed, and [`run`] returns.
#[derive(Debug)]
pub struct Stop {
    flag: AtomicBool,
    wakes: std::sync::Mutex<Vec<Arc<Wake>>>,
}

impl Stop {
    /// A stop signal no reactor watches yet.
    pub fn new() -> Arc<Stop> {
        Arc::new(Stop { flag: AtomicBool::new(false), wakes: Default::default() })
    }

    /// Stop every reactor that watches this (and any that starts watching later).
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        for w in self.wakes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            w.notify();
        }
    }

    /// True once [`Stop::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn watch(&self) -> io::Result<Arc<Wake>> {
        let w = Wake::new()?;
        self.wakes.lock().unwrap_or_else(|e| e.into_inner()).push(w.clone());
        if self.is_stopped() {
            w.notify();
        }
        Ok(w)
    }
}

/// What a reactor runs: a client, its UDP socket, and the app on top.
pub struct Unit<A> {
    /// The client state machine.
    pub client: Client,
    /// Its UDP socket (any blocking mode; the ring does the IO).
    pub udp: std::net::UdpSocket,
    /// The application.
    pub app: A,
    /// Wakes [`App::on_wakeup`] from another thread.
    pub wake: Option<Arc<Wake>>,
    /// Connect to the manager at this time, not at once (to ramp up many clients).
    pub connect_at: Option<Instant>,
}

/// A unit after its app is done (or the reactor stopped).
pub struct Finished<A> {
    /// The client, with its final state and counters.
    pub client: Client,
    /// The application.
    pub app: A,
    /// The unit's driver counters, or why it stopped early (its first connection to the
    /// manager failed).
    pub result: Result<DriverCounters, DriverError>,
}

// Poll tokens: unit index, connection generation, kind.
const KIND_BITS: u32 = 2;
const GEN_BITS: u32 = 8;
const TK_READ: u32 = 0; // also the connect's POLLOUT
const TK_WRITE: u32 = 1;
const TK_WAKE: u32 = 2;
const MAX_UNITS: usize = (1 << (32 - KIND_BITS - GEN_BITS)) - 1;
const STOP_UNIT: u32 = MAX_UNITS as u32;

fn token(unit: u32, gen: u8, kind: u32) -> u32 {
    (unit << (KIND_BITS + GEN_BITS)) | ((gen as u32) << KIND_BITS) | kind
}

fn untoken(t: u32) -> (u32, u8, u32) {
    (t >> (KIND_BITS + GEN_BITS), ((t >> KIND_BITS) & ((1 << GEN_BITS) - 1)) as u8, t & ((1 << KIND_BITS) - 1))
}

enum Tcp {
    /// Waiting to connect at the given time.
    Down { retry_at: Instant },
    /// A non-blocking connect in flight (POLLOUT armed).
    Connecting { stream: TcpStream, deadline: Instant },
    /// Connected; POLLIN armed, POLLOUT armed while `write_armed`.
    Up { stream: TcpStream, write_armed: bool },
}

struct Slot<A> {
    client: Client,
    app: A,
    udp: std::net::UdpSocket,
    fd: RawFd,
    /// Its index in the ring's sockets.
    sock: u32,
    wake: Option<Arc<Wake>>,
    tcp: Tcp,
    gen: u8,
    decoder: FrameDecoder,
    wbuf: Vec<u8>,
    counters: DriverCounters,
    backoff: Duration,
    ever_connected: bool,
    /// When the first connection was first tried (the local-port wait counts from it).
    first_try: Option<Instant>,
    /// The next pause while waiting for a local port.
    port_pause: Duration,
    /// The deadline this unit has in the timer heap (entries that differ are stale).
    armed_at: Option<Instant>,
    dirty: bool,
    done: Option<Result<(), DriverError>>,
}

/// Run `units` on this thread until every app is done or `stop` is signalled. Returns the
/// units in the order given. Fails only if the ring cannot be set up.
pub fn run<A: App>(
    units: Vec<Unit<A>>,
    manager: SocketAddr,
    stop: Option<&Stop>,
    cfg: &ReactorConfig,
) -> Result<Vec<Finished<A>>, DriverError> {
    if units.len() > MAX_UNITS - 1 {
        return Err(DriverError::Udp(io::Error::new(io::ErrorKind::InvalidInput, "too many units for one reactor")));
    }
    let entries = (units.len() as u32 * 4 + cfg.batch as u32 * 4).clamp(256, 32768).next_power_of_two();
    let mut ring = UdpRing::multi(entries, cfg.recv_buffers, cfg.recv_buffer_size)
        .map_err(DriverError::Udp)?
        .with_send_slots(cfg.send_slots, MAX_DATAGRAM)
        .map_err(DriverError::Udp)?;
    let stop_wake = match stop {
        Some(s) => {
            let w = s.watch().map_err(DriverError::Udp)?;
            ring.poll(w.fd.as_raw_fd(), libc::POLLIN as u32, token(STOP_UNIT, 0, TK_WAKE)).map_err(DriverError::Udp)?;
            Some(w)
        }
        None => None,
    };
    let mut r = Reactor {
        ring,
        slots: Vec::with_capacity(units.len()),
        sock_unit: Vec::new(),
        heap: BinaryHeap::new(),
        dirty: Vec::new(),
        graveyard: Vec::new(),
        manager,
        rng: Rng::from_entropy(),
        sbuf: vec![0u8; MAX_DATAGRAM],
        rbuf: vec![0u8; 64 * 1024],
        live: 0,
    };
    let now = Instant::now();
    for u in units {
        let fd = u.udp.as_raw_fd();
        if let Some(b) = cfg.socket_buffer {
            driver::set_socket_buffers(&u.udp, b);
        }
        if cfg.gro {
            crate::uring::enable_gro(fd);
        }
        let ix = r.slots.len() as u32;
        let sock = r.ring.add_socket(fd).map_err(DriverError::Udp)?;
        if r.sock_unit.len() <= sock as usize {
            r.sock_unit.resize(sock as usize + 1, u32::MAX);
        }
        r.sock_unit[sock as usize] = ix;
        if let Some(w) = &u.wake {
            r.ring.poll(w.fd.as_raw_fd(), libc::POLLIN as u32, token(ix, 0, TK_WAKE)).map_err(DriverError::Udp)?;
        }
        r.slots.push(Slot {
            client: u.client,
            app: u.app,
            udp: u.udp,
            fd,
            sock,
            wake: u.wake,
            tcp: Tcp::Down { retry_at: u.connect_at.unwrap_or(now) },
            gen: 0,
            decoder: FrameDecoder::new(),
            wbuf: Vec::new(),
            counters: DriverCounters::default(),
            backoff: Duration::from_millis(200),
            ever_connected: false,
            first_try: None,
            port_pause: driver::PORT_RETRY,
            armed_at: None,
            dirty: false,
            done: None,
        });
        r.live += 1;
        if u.connect_at.is_some_and(|t| t > now) {
            r.mark(ix); // its timer (the connect time) is armed with the others below
        } else {
            r.connect(ix, now);
        }
    }

    r.process_dirty(now, false);
    let mut rx: Vec<(u32, SocketAddr, u32, u32)> = Vec::new();
    let mut rx_bytes: Vec<u8> = Vec::new();
    let mut polls: Vec<(u32, i32)> = Vec::new();
    let mut want = 1usize;
    let mut last_timers = Instant::now() - cfg.tick;
    let mut stopping = false;
    loop {
        // 1. Reap.
        rx.clear();
        rx_bytes.clear();
        polls.clear();
        let reaped = {
            let (rx, rx_bytes, polls) = (&mut rx, &mut rx_bytes, &mut polls);
            r.ring.drain_with(|c| match c {
                Completion::Recv { socket, from: Some(from), data } => {
                    rx.push((socket, from, rx_bytes.len() as u32, data.len() as u32));
                    rx_bytes.extend_from_slice(data);
                }
                Completion::Recv { .. } => {}
                Completion::Poll { token, result } => polls.push((token, result)),
            })
        };
        if let Err(e) = reaped {
            // The ring itself failed: nothing more can be received. End every unit.
            tracing::error!("io_uring receive failed: {e}");
            return Err(DriverError::Udp(e));
        }
        let now = Instant::now();
        // 2. Feed.
        for &(sock, from, off, len) in &rx {
            let Some(&u) = r.sock_unit.get(sock as usize) else { continue };
            let s = &mut r.slots[u as usize];
            if s.done.is_some() {
                continue;
            }
            s.counters.udp_received += 1;
            if let Some(pkt) = s.client.handle_datagram(now, from, &rx_bytes[off as usize..(off + len) as usize]) {
                let mut ctx = Ctx {
                    client: &mut s.client,
                    now,
                    out: Out::Ring(&mut r.ring, s.fd),
                    buf: &mut r.sbuf,
                    counters: &mut s.counters,
                };
                s.app.on_media(&mut ctx, pkt);
            }
            r.mark(u);
        }
        for i in 0..polls.len() {
            let (tk, res) = polls[i];
            let (u, gen, kind) = untoken(tk);
            if u == STOP_UNIT {
                stopping = true;
                continue;
            }
            r.on_poll(u, gen, kind, res, now);
        }
        if stopping && stop.is_some_and(|s| s.is_stopped()) {
            for u in 0..r.slots.len() as u32 {
                if r.slots[u as usize].done.is_none() {
                    r.slots[u as usize].client.hangup_all(now);
                    r.mark(u);
                }
            }
            r.process_dirty(now, true);
            break;
        }
        // The tick holds timers back only under load (the last wait asked for a batch):
        // when nearly idle, a timer fires at its deadline.
        let gate = if want > 1 { cfg.tick } else { Duration::ZERO };
        if now >= last_timers + gate {
            last_timers = now;
            while let Some(&Reverse((t, u))) = r.heap.peek() {
                if t > now {
                    break;
                }
                r.heap.pop();
                if r.slots[u as usize].armed_at != Some(t) {
                    continue;
                }
                r.slots[u as usize].armed_at = None;
                r.on_timer(u, now);
            }
        }
        r.process_dirty(now, false);
        if r.live == 0 {
            break;
        }
        // 3. Submit and wait.
        let next = r.heap.peek().map(|Reverse((t, _))| *t);
        let gate = if want > 1 { cfg.tick } else { Duration::ZERO };
        let wake_at = match next {
            Some(t) => t.max(last_timers + gate),
            None => now + IDLE_WAIT,
        };
        // Waiting for more than one completion never holds the first one longer than a tick.
        let wake_at = if want > 1 { wake_at.min(now + cfg.tick) } else { wake_at };
        let queued = r.ring.queued_sends();
        let timeout = wake_at.saturating_duration_since(Instant::now());
        r.ring.submit_and_wait(queued + want, timeout).map_err(DriverError::Udp)?;
        r.graveyard.clear();
        want = (rx.len() + polls.len()).clamp(1, cfg.batch.max(1));
    }
    tracing::debug!(counters = ?r.ring.counters, "ring thread done");
    // Let the last sends (HANGUPs' datagrams, final media) complete, within a bound.
    let _ = r.ring.submit();
    let end = Instant::now() + Duration::from_millis(500);
    while r.ring.in_flight_sends() > 0 && Instant::now() < end {
        let _ = r.ring.submit_and_wait(1, Duration::from_millis(10));
        let _ = r.ring.drain_with(|_| {});
    }
    drop(stop_wake);
    let Reactor { slots, ring, .. } = r;
    // The ring goes first: it holds references to the sockets' files until closed.
    drop(ring);
    Ok(slots
        .into_iter()
        .map(|s| {
            let counters = s.counters;
            let result = match s.done {
                Some(Err(e)) => Err(e),
                _ => Ok(counters),
            };
            drop(s.udp);
            Finished { client: s.client, app: s.app, result }
        })
        .collect())
}

struct Reactor<A> {
    ring: UdpRing,
    slots: Vec<Slot<A>>,
    sock_unit: Vec<u32>,
    heap: BinaryHeap<Reverse<(Instant, u32)>>,
    dirty: Vec<u32>,
    /// Streams closed this turn, kept open until the turn's submission is made (an entry
    /// queued for a descriptor must not find it closed, or reused).
    graveyard: Vec<TcpStream>,
    manager: SocketAddr,
    rng: Rng,
    sbuf: Vec<u8>,
    rbuf: Vec<u8>,
    live: usize,
}

impl<A: App> Reactor<A> {
    fn mark(&mut self, u: u32) {
        let s = &mut self.slots[u as usize];
        if !s.dirty {
            s.dirty = true;
            self.dirty.push(u);
        }
    }

    fn on_poll(&mut self, u: u32, gen: u8, kind: u32, res: i32, now: Instant) {
        let Some(s) = self.slots.get_mut(u as usize) else { return };
        if s.done.is_some() {
            return;
        }
        if kind == TK_WAKE {
            if let Some(w) = s.wake.clone() {
                w.clear();
                let _ = self.ring.poll(w.fd.as_raw_fd(), libc::POLLIN as u32, token(u, 0, TK_WAKE));
                let s = &mut self.slots[u as usize];
                let mut ctx =
                    Ctx { client: &mut s.client, now, out: Out::Ring(&mut self.ring, s.fd), buf: &mut self.sbuf, counters: &mut s.counters };
                s.app.on_wakeup(&mut ctx);
                self.mark(u);
            }
            return;
        }
        if gen != s.gen || res == -libc::ECANCELED {
            return; // a poll of an earlier connection
        }
        match (&mut s.tcp, kind) {
            (Tcp::Connecting { stream, .. }, TK_READ) => {
                let ok = res >= 0 && matches!(stream.take_error(), Ok(None)) && stream.peer_addr().is_ok();
                if ok {
                    let Tcp::Connecting { stream, .. } = std::mem::replace(&mut s.tcp, Tcp::Down { retry_at: now }) else {
                        unreachable!()
                    };
                    let _ = stream.set_nodelay(true);
                    s.counters.connects += 1;
                    s.backoff = Duration::from_millis(200);
                    s.ever_connected = true;
                    let fd = stream.as_raw_fd();
                    s.tcp = Tcp::Up { stream, write_armed: false };
                    s.client.handle_connected(now);
                    let _ = self.ring.poll(fd, libc::POLLIN as u32, token(u, s.gen, TK_READ));
                } else {
                    let err = stream.take_error().ok().flatten().unwrap_or_else(|| io::Error::from_raw_os_error(-res.min(-1)));
                    self.connect_failed(u, now, err);
                }
            }
            (Tcp::Up { .. }, TK_READ) => self.read_tcp(u, now),
            (Tcp::Up { write_armed, .. }, TK_WRITE) => {
                *write_armed = false;
                self.flush_tcp(u, now);
            }
            _ => {}
        }
        self.mark(u);
    }

    fn read_tcp(&mut self, u: u32, now: Instant) {
        let s = &mut self.slots[u as usize];
        let Tcp::Up { stream, .. } = &mut s.tcp else { return };
        // Bounded per turn so one chatty connection cannot starve the others; the poll is
        // re-armed and fires again at once if more is waiting.
        for _ in 0..16 {
            match stream.read(&mut self.rbuf) {
                Ok(0) => return self.lost(u, now),
                Ok(n) => {
                    s.decoder.push(&self.rbuf[..n]);
                    loop {
                        match s.decoder.next_frame() {
                            Ok(Some(f)) => s.client.handle_frame(now, f),
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!("bad frame from manager: {e}");
                                s.counters.frame_errors += 1;
                                return self.lost(u, now);
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.lost(u, now),
            }
        }
        let fd = stream.as_raw_fd();
        let tk = token(u, s.gen, TK_READ);
        if self.ring.poll(fd, libc::POLLIN as u32, tk).is_err() {
            self.lost(u, now);
        }
    }

    fn flush_tcp(&mut self, u: u32, now: Instant) {
        let s = &mut self.slots[u as usize];
        let Tcp::Up { stream, write_armed } = &mut s.tcp else {
            // Frames for a manager we are not connected to are dropped: the client re-sends
            // its state (REGISTER) when it reconnects.
            s.wbuf.clear();
            return;
        };
        if *write_armed {
            return;
        }
        let mut off = 0;
        while off < s.wbuf.len() {
            match stream.write(&s.wbuf[off..]) {
                Ok(0) => return self.lost(u, now),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.lost(u, now),
            }
        }
        s.wbuf.drain(..off);
        if !s.wbuf.is_empty() {
            if s.wbuf.len() > MAX_WRITE_BACKLOG {
                tracing::warn!("manager stopped reading ({} bytes waiting): dropping the connection", s.wbuf.len());
                s.counters.write_stalls += 1;
                return self.lost(u, now);
            }
            *write_armed = true;
            let fd = stream.as_raw_fd();
            let tk = token(u, s.gen, TK_WRITE);
            if self.ring.poll(fd, libc::POLLOUT as u32, tk).is_err() {
                self.lost(u, now);
            }
        }
    }

    /// Tear down the connection (cancelling its polls) and schedule a reconnect.
    fn close_tcp(&mut self, u: u32, now: Instant, retry: bool) {
        let s = &mut self.slots[u as usize];
        let old = std::mem::replace(&mut s.tcp, Tcp::Down { retry_at: now });
        let gen = s.gen;
        s.gen = s.gen.wrapping_add(1);
        s.decoder = FrameDecoder::new();
        s.wbuf.clear();
        let stream = match old {
            Tcp::Down { .. } => None,
            Tcp::Connecting { stream, .. } | Tcp::Up { stream, .. } => Some(stream),
        };
        if let Some(stream) = stream {
            let _ = self.ring.cancel_poll(token(u, gen, TK_READ));
            let _ = self.ring.cancel_poll(token(u, gen, TK_WRITE));
            let _ = stream.shutdown(std::net::Shutdown::Both);
            self.graveyard.push(stream);
        }
        let s = &mut self.slots[u as usize];
        if retry {
            let at = now + driver::jitter(s.backoff, &mut self.rng);
            s.backoff = (s.backoff * 2).min(Duration::from_secs(5));
            s.tcp = Tcp::Down { retry_at: at };
        }
    }

    fn lost(&mut self, u: u32, now: Instant) {
        let s = &mut self.slots[u as usize];
        if matches!(s.tcp, Tcp::Up { .. }) {
            s.counters.disconnects += 1;
            s.client.handle_disconnected(now);
        }
        self.close_tcp(u, now, true);
        self.mark(u);
    }

    fn connect_failed(&mut self, u: u32, now: Instant, err: io::Error) {
        if !self.slots[u as usize].ever_connected {
            if crate::driver::is_port_shortage(&err) {
                let s = &mut self.slots[u as usize];
                let first = *s.first_try.get_or_insert(now);
                if now.saturating_duration_since(first) < crate::driver::PORT_WAIT {
                    // No local port free yet (TIME_WAITs of an earlier run): try again soon.
                    s.counters.port_waits += 1;
                    let pause = driver::jitter(s.port_pause, &mut self.rng);
                    s.port_pause = (s.port_pause * 2).min(Duration::from_secs(1));
                    self.close_tcp(u, now, false);
                    self.slots[u as usize].tcp = Tcp::Down { retry_at: now + pause };
                    self.mark(u);
                    return;
                }
                self.close_tcp(u, now, false);
                let source = crate::driver::tcp_source(self.slots[u as usize].udp.local_addr().ok(), self.manager);
                let e = crate::driver::no_local_port(source, self.manager, now.saturating_duration_since(first));
                self.finish(u, Err(e));
                return;
            }
            // As the tokio driver: a manager unreachable at start is an error, not a retry.
            self.close_tcp(u, now, false);
            let addr = self.manager;
            self.finish(u, Err(DriverError::ManagerUnreachable { addr, source: err }));
            return;
        }
        self.close_tcp(u, now, true);
        self.mark(u);
    }

    fn connect(&mut self, u: u32, now: Instant) {
        let source = crate::driver::tcp_source(self.slots[u as usize].udp.local_addr().ok(), self.manager);
        match start_connect(source, self.manager) {
            Ok(stream) => {
                let fd = stream.as_raw_fd();
                let s = &mut self.slots[u as usize];
                let tk = token(u, s.gen, TK_READ);
                s.tcp = Tcp::Connecting { stream, deadline: now + CONNECT_TIMEOUT };
                if let Err(e) = self.ring.poll(fd, libc::POLLOUT as u32, tk) {
                    self.connect_failed(u, now, e);
                    return;
                }
                self.mark(u);
            }
            Err(e) => self.connect_failed(u, now, e),
        }
    }

    fn on_timer(&mut self, u: u32, now: Instant) {
        let s = &mut self.slots[u as usize];
        if s.done.is_some() {
            return;
        }
        s.client.handle_timeout(now);
        if s.app.next_wakeup().is_some_and(|t| now >= t) {
            let mut ctx =
                Ctx { client: &mut s.client, now, out: Out::Ring(&mut self.ring, s.fd), buf: &mut self.sbuf, counters: &mut s.counters };
            s.app.on_wakeup(&mut ctx);
        }
        match s.tcp {
            Tcp::Down { retry_at } if now >= retry_at => self.connect(u, now),
            Tcp::Connecting { deadline, .. } if now >= deadline => {
                self.connect_failed(u, now, io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
            }
            _ => {}
        }
        self.mark(u);
    }

    /// Drain what the touched units queued, flush their TCP, retire finished ones and
    /// re-arm their timers.
    fn process_dirty(&mut self, now: Instant, stopping: bool) {
        let mut i = 0;
        while i < self.dirty.len() {
            let u = self.dirty[i];
            i += 1;
            let s = &mut self.slots[u as usize];
            s.dirty = false;
            if s.done.is_some() {
                continue;
            }
            let sends_before = self.ring.queued_sends();
            driver::drain(&mut s.client, &mut s.app, Out::Ring(&mut self.ring, s.fd), &mut self.sbuf, &mut s.wbuf, &mut s.counters, now);
            // An app wake-up that this turn's events made due (media starting on START, the
            // callee answering the first packet) runs now and leaves with this turn's
            // submission. Wake-ups that came due on their own (armed earlier) wait for the
            // timer pass, which batches them per tick under load.
            let became_due = s.armed_at.is_none_or(|t| t > now) && s.app.next_wakeup().is_some_and(|t| t <= now);
            if became_due {
                let mut ctx =
                    Ctx { client: &mut s.client, now, out: Out::Ring(&mut self.ring, s.fd), buf: &mut self.sbuf, counters: &mut s.counters };
                s.app.on_wakeup(&mut ctx);
                driver::drain(&mut s.client, &mut s.app, Out::Ring(&mut self.ring, s.fd), &mut self.sbuf, &mut s.wbuf, &mut s.counters, now);
            }
            if !s.wbuf.is_empty() {
                // Datagrams before the frames that follow them: the callee's null packet must
                // be on the wire before its PUNCHED, or the caller's first packet (sent on the
                // START that PUNCHED brings about) can open the caller's firewall ahead of the
                // null, and the null then proves nothing about the path. Queued sends would
                // otherwise wait for the end of the turn, while the TCP write is immediate.
                if self.ring.queued_sends() > sends_before {
                    if let Err(e) = self.ring.submit() {
                        tracing::warn!("submitting datagrams ahead of a manager frame: {e}");
                    }
                }
                self.flush_tcp(u, now);
            }
            let s = &mut self.slots[u as usize];
            if stopping || s.app.done() {
                if let Tcp::Up { stream, .. } = &s.tcp {
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                }
                self.finish(u, Ok(()));
                continue;
            }
            let tcp_at = match &s.tcp {
                Tcp::Down { retry_at } => Some(*retry_at),
                Tcp::Connecting { deadline, .. } => Some(*deadline),
                Tcp::Up { .. } => None,
            };
            let next = [s.client.poll_timeout(), s.app.next_wakeup(), tcp_at].into_iter().flatten().min();
            if next != s.armed_at {
                s.armed_at = next;
                if let Some(t) = next {
                    self.heap.push(Reverse((t, u)));
                }
            }
        }
        self.dirty.clear();
    }

    fn finish(&mut self, u: u32, result: Result<(), DriverError>) {
        let s = &mut self.slots[u as usize];
        if s.done.is_some() {
            return;
        }
        if let Err(e) = &result {
            s.app.on_failed(e);
        }
        s.done = Some(result);
        s.armed_at = None;
        self.live -= 1;
        let gen = s.gen;
        let _ = self.ring.cancel_poll(token(u, gen, TK_READ));
        let _ = self.ring.cancel_poll(token(u, gen, TK_WRITE));
        if s.wake.is_some() {
            let _ = self.ring.cancel_poll(token(u, 0, TK_WAKE));
        }
        let _ = self.ring.remove_socket(s.sock);
    }
}

/// Start a non-blocking TCP connect to `addr`.
fn start_connect(source: Option<SocketAddr>, addr: SocketAddr) -> io::Result<TcpStream> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: creating a socket; ownership passes to TcpStream at once.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh socket owned by nobody else.
    let stream = unsafe { TcpStream::from_raw_fd(raw) };
    if let Some(src) = source {
        crate::driver::set_bind_no_port(&stream);
        let (sa, len) = crate::uring::to_sockaddr(src);
        // SAFETY: `sa` holds a sockaddr of `len` bytes.
        if unsafe { libc::bind(raw, &sa as *const _ as *const libc::sockaddr, len) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (sa, len) = crate::uring::to_sockaddr(addr);
    // SAFETY: `sa` holds a sockaddr of `len` bytes.
    let r = unsafe { libc::connect(raw, &sa as *const _ as *const libc::sockaddr, len) };
    if r == 0 {
        return Ok(stream);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(stream)
    } else {
        Err(e)
    }
}
