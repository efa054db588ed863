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
//!    shared by all the thread's sockets), manager bytes (multishot RECV from the same
//!    buffers), finished connects and sends, wake-ups;
//! 2. feed them to the units' clients and apps, fire the timers that are due (one heap over
//!    all units), and drain what the clients queued: datagrams go into the ring's owned send
//!    slots, frames into one SEND per connection (at most one in flight; frames made
//!    meanwhile wait for it);
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
//! Sockets are *direct descriptors*: each unit's UDP socket and TCP connection live in the
//! ring's file table (entries `2 * unit` and `2 * unit + 1`), not in the process's
//! descriptor table. A socket has a descriptor only while it is set up (options, bind),
//! then it moves into the table and the descriptor is closed; connect, send, receive and
//! cancellation all go through the ring. So a process can hold as many clients as its rings'
//! tables allow (RLIMIT_NOFILE entries per ring, two per unit) rather than half of
//! RLIMIT_NOFILE in all: one thread needs no other event loop and no descriptors.
//! If the manager connection drops, calls with a path go on and the unit reconnects with
//! jittered exponential backoff, as the tokio driver does: both follow
//! [`proto::reconnect`]. Given several managers ([`driver::Managers`]), each unit starts at
//! its own [`Unit::first_manager`] and moves to the next manager in the list when its
//! connection is lost.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::driver::{self, App, Ctx, DriverCounters, DriverError, Managers, Out, MAX_DATAGRAM};
use crate::uring::{Completion, Pending, Ring, Sock};
use proto::client::{Client, SocketId};
use proto::reconnect::{Next, Reconnect, CONNECT_TIMEOUT};
use proto::rng::Rng;
use proto::stream::FrameStream;

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
    /// Its UDP socket (any blocking mode; the ring does the IO). It moves into the ring's
    /// file table when the unit is added, and its descriptor is closed.
    pub udp: std::net::UdpSocket,
    /// The application.
    pub app: A,
    /// Wakes [`App::on_wakeup`] from another thread.
    pub wake: Option<Arc<Wake>>,
    /// Connect to the manager at this time, not at once (to ramp up many clients).
    pub connect_at: Option<Instant>,
    /// Speak TLS to the manager with this configuration (its session cache serves this
    /// unit's reconnects, and every manager of the list).
    pub tls: Option<crate::tls::ClientTls>,
    /// The index in the reactor's managers of the one this unit connects to first (modulo
    /// their number; 0 with one manager): a fleet spreads over the managers by giving unit
    /// `i` the index `i`.
    pub first_manager: usize,
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

// Operation tokens: unit index, connection generation, kind.
const KIND_BITS: u32 = 2;
const GEN_BITS: u32 = 8;
const TK_CONNECT: u32 = 0;
const TK_RECV: u32 = 1;
const TK_SEND: u32 = 2;
const TK_WAKE: u32 = 3;
const MAX_UNITS: usize = (1 << (32 - KIND_BITS - GEN_BITS)) - 1;
const STOP_UNIT: u32 = MAX_UNITS as u32;

fn token(unit: u32, gen: u8, kind: u32) -> u32 {
    (unit << (KIND_BITS + GEN_BITS)) | ((gen as u32) << KIND_BITS) | kind
}

fn untoken(t: u32) -> (u32, u8, u32) {
    (t >> (KIND_BITS + GEN_BITS), ((t >> KIND_BITS) & ((1 << GEN_BITS) - 1)) as u8, t & ((1 << KIND_BITS) - 1))
}

/// A unit's UDP socket in the ring's file table.
fn udp_entry(u: u32) -> u32 {
    2 * u
}

/// A unit's TCP connection in the ring's file table.
fn tcp_entry(u: u32) -> u32 {
    2 * u + 1
}

enum Tcp {
    /// Waiting to connect at the given time.
    Down { retry_at: Instant },
    /// A connect in flight.
    Connecting { deadline: Instant },
    /// Connected; its multishot receive is armed.
    Up,
}

struct Slot<A> {
    client: Client,
    app: A,
    /// The UDP socket's local address (the socket itself is in the ring's file table).
    local: Option<SocketAddr>,
    /// A birthday search's sockets.
    search: crate::search::RingSockets,
    /// Its index in the ring's receiving sockets.
    sock: u32,
    wake: Option<Arc<Wake>>,
    tcp: Tcp,
    gen: u8,
    /// The manager connection's frames (plain or TLS).
    stream: FrameStream,
    tls: Option<crate::tls::ClientTls>,
    /// A TLS handshake has completed on some connection (a later TLS failure is retried).
    secured: bool,
    /// Bytes (frames, TLS records) waiting for the send in flight to complete.
    wbuf: Vec<u8>,
    /// The bytes of the last send (held by the ring while it is in flight, handed back by
    /// its completion) and how many of them went out.
    inflight: Vec<u8>,
    sent: usize,
    sending: bool,
    /// Bytes of the send in flight not yet confirmed sent.
    unsent: usize,
    /// The connection generation the send in flight belongs to.
    send_gen: u8,
    /// The unit finished while its last frames were being sent: close the connection when
    /// that send completes.
    close_after_send: bool,
    counters: DriverCounters,
    /// The manager connection's policy (back-off, the wait for a local port, which manager).
    policy: Reconnect,
    /// The manager of the current connection, or of the last one made or tried.
    manager: SocketAddr,
    /// The manager of the last connection that was made (for counting failovers).
    last_manager: Option<SocketAddr>,
    /// Each manager's last connect error before the first connection worked, by index.
    connect_errors: Vec<Option<io::Error>>,
    /// The deadline this unit has in the timer heap (entries that differ are stale).
    armed_at: Option<Instant>,
    dirty: bool,
    done: Option<Result<(), DriverError>>,
}

/// A completion reaped this turn, other than a datagram: token, result, the data's range in
/// the turn's byte buffer, more to come; a stream send's buffer, handed back.
enum Ev {
    Poll(u32),
    Op(u32, i32),
    Sent(u32, i32, Vec<u8>),
    Stream(u32, i32, u32, u32, bool),
}

/// Run `units` on this thread until every app is done or `stop` is signalled. Returns the
/// units in the order given. Fails only if the ring cannot be set up, or cannot hold the
/// units' sockets (two file-table entries per unit, at most RLIMIT_NOFILE per ring).
pub fn run<A: App>(
    units: Vec<Unit<A>>,
    managers: impl Into<Managers>,
    stop: Option<&Stop>,
    cfg: &ReactorConfig,
) -> Result<Vec<Finished<A>>, DriverError> {
    let mut r = Reactor::new(units.len(), managers, stop, cfg)?;
    for u in units {
        r.add(u)?;
    }
    r.run()
}

/// A reactor being filled with units, on the thread that will run it (the ring belongs to
/// the thread that made it). Each [`Reactor::add`] moves the unit's socket into the ring's
/// file table at once, so a thread can set up many more clients than the process has
/// descriptors for, one socket at a time.
pub struct Reactor<'s, A> {
    ring: Ring,
    cfg: ReactorConfig,
    stop: Option<&'s Stop>,
    stop_wake: Option<Arc<Wake>>,
    capacity: usize,
    slots: Vec<Slot<A>>,
    /// Ring socket index -> (unit, which of its sockets).
    sock_unit: Vec<(u32, SocketId)>,
    heap: BinaryHeap<Reverse<(Instant, u32)>>,
    dirty: Vec<u32>,
    /// File-table entries to empty once the turn's submission is made (their cancellations
    /// are looked up by socket when submitted).
    release: Vec<u32>,
    managers: Managers,
    rng: Rng,
    sbuf: Vec<u8>,
    live: usize,
}

impl<'s, A: App> Reactor<'s, A> {
    /// A reactor for up to `capacity` units, connecting them to `managers` (one address or
    /// a list), stopped by `stop`.
    pub fn new(
        capacity: usize,
        managers: impl Into<Managers>,
        stop: Option<&'s Stop>,
        cfg: &ReactorConfig,
    ) -> Result<Self, DriverError> {
        if capacity > MAX_UNITS - 1 {
            return Err(DriverError::Udp(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many units for one reactor",
            )));
        }
        let entries = (capacity as u32 * 4 + cfg.batch as u32 * 4).clamp(256, 32768).next_power_of_two();
        let mut ring = Ring::multi(entries, cfg.recv_buffers, cfg.recv_buffer_size)
            .map_err(DriverError::Udp)?
            .with_send_slots(cfg.send_slots, MAX_DATAGRAM)
            .map_err(DriverError::Udp)?;
        let table = (2 * capacity).max(2) as u32;
        if let Err(e) = ring.register_table(table) {
            let limit = crate::uring::table_limit().map_or("unknown".to_string(), |n| n.to_string());
            return Err(DriverError::Udp(io::Error::new(
                e.kind(),
                format!(
                    "{capacity} units need a file table of {table} entries in their ring (two per unit), and the kernel \
                     refused it ({e}); a ring's table holds at most RLIMIT_NOFILE ({limit}) entries: spread the units \
                     over more reactor threads"
                ),
            )));
        }
        let stop_wake = match stop {
            Some(s) => {
                let w = s.watch().map_err(DriverError::Udp)?;
                ring.poll(w.fd.as_raw_fd(), libc::POLLIN as u32, token(STOP_UNIT, 0, TK_WAKE))
                    .map_err(DriverError::Udp)?;
                Some(w)
            }
            None => None,
        };
        Ok(Reactor {
            ring,
            cfg: cfg.clone(),
            stop,
            stop_wake,
            capacity,
            slots: Vec::with_capacity(capacity),
            sock_unit: Vec::new(),
            heap: BinaryHeap::new(),
            dirty: Vec::new(),
            release: Vec::new(),
            managers: managers.into(),
            rng: crate::entropy::rng(),
            sbuf: vec![0u8; MAX_DATAGRAM],
            live: 0,
        })
    }

    /// Add a unit: its UDP socket moves into the ring's file table (its descriptor is closed)
    /// and its receive is armed. It connects to the manager when [`Reactor::run`] starts, or
    /// at its `connect_at` (see [`Reactor::set_connect_at`]). Returns its index.
    pub fn add(&mut self, u: Unit<A>) -> Result<usize, DriverError> {
        if self.slots.len() >= self.capacity {
            return Err(DriverError::Udp(io::Error::new(io::ErrorKind::InvalidInput, "the reactor is full")));
        }
        let ix = self.slots.len() as u32;
        if let Some(b) = self.cfg.socket_buffer {
            driver::set_socket_buffers(&u.udp, b);
        }
        if self.cfg.gro {
            crate::uring::enable_gro(u.udp.as_raw_fd());
        }
        let local = u.udp.local_addr().ok();
        self.ring.install(udp_entry(ix), OwnedFd::from(u.udp)).map_err(DriverError::Udp)?;
        let sock = self.ring.add_socket(Sock::Fixed(udp_entry(ix))).map_err(DriverError::Udp)?;
        self.map_socket(sock, ix, SocketId::MAIN);
        if let Some(w) = &u.wake {
            self.ring.poll(w.fd.as_raw_fd(), libc::POLLIN as u32, token(ix, 0, TK_WAKE)).map_err(DriverError::Udp)?;
        }
        let now = Instant::now();
        self.slots.push(Slot {
            client: u.client,
            app: u.app,
            local,
            search: crate::search::RingSockets { ip: local.map(|a| a.ip()), ..Default::default() },
            sock,
            wake: u.wake,
            tcp: Tcp::Down { retry_at: u.connect_at.unwrap_or(now) },
            gen: 0,
            stream: FrameStream::plain(),
            tls: u.tls,
            secured: false,
            wbuf: Vec::new(),
            inflight: Vec::new(),
            sent: 0,
            sending: false,
            unsent: 0,
            send_gen: 0,
            close_after_send: false,
            counters: DriverCounters::default(),
            policy: Reconnect::managers(self.managers.addrs().len(), u.first_manager),
            manager: self.managers.get(u.first_manager),
            last_manager: None,
            connect_errors: Vec::new(),
            armed_at: None,
            dirty: false,
            done: None,
        });
        self.live += 1;
        Ok(ix as usize)
    }

    /// Units added so far.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True if no unit was added.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Connect unit `ix` at `at` instead of the time it was added with (for a plan that
    /// starts once every thread has set up its units).
    pub fn set_connect_at(&mut self, ix: usize, at: Instant) {
        if let Some(s) = self.slots.get_mut(ix) {
            if let Tcp::Down { retry_at } = &mut s.tcp {
                *retry_at = at;
            }
        }
    }

    /// Run the units until every app is done or the stop signal comes. Returns the units in
    /// the order they were added.
    pub fn run(mut self) -> Result<Vec<Finished<A>>, DriverError> {
        let cfg = self.cfg.clone();
        let stop = self.stop;
        let now = Instant::now();
        for ix in 0..self.slots.len() as u32 {
            match self.slots[ix as usize].tcp {
                Tcp::Down { retry_at } if retry_at > now => self.mark(ix), // its timer is armed below
                _ => self.connect(ix, now),
            }
        }
        self.process_dirty(now, false);
        let r = &mut self;
        let mut rx: Vec<(u32, SocketAddr, u32, u32)> = Vec::new();
        let mut rx_bytes: Vec<u8> = Vec::new();
        let mut evs: Vec<Ev> = Vec::new();
        let mut want = 1usize;
        let mut last_timers = Instant::now() - cfg.tick;
        let mut stopping = false;
        loop {
            // 1. Reap.
            rx.clear();
            rx_bytes.clear();
            evs.clear();
            let reaped = {
                let (rx, rx_bytes, evs) = (&mut rx, &mut rx_bytes, &mut evs);
                r.ring.drain_with(|c| match c {
                    Completion::Recv { socket, from: Some(from), data } => {
                        rx.push((socket, from, rx_bytes.len() as u32, data.len() as u32));
                        rx_bytes.extend_from_slice(data);
                    }
                    // (A reactor accepts nothing.)
                    Completion::Recv { .. } | Completion::Accepted { .. } => {}
                    Completion::Poll { token, .. } => evs.push(Ev::Poll(token)),
                    Completion::Op { token, result } => evs.push(Ev::Op(token, result)),
                    Completion::Sent { token, result, data } => evs.push(Ev::Sent(token, result, data)),
                    Completion::Stream { token, result, data, more } => {
                        evs.push(Ev::Stream(token, result, rx_bytes.len() as u32, data.len() as u32, more));
                        rx_bytes.extend_from_slice(data);
                    }
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
                let Some(&(u, id)) = r.sock_unit.get(sock as usize) else { continue };
                if u == u32::MAX {
                    continue;
                }
                let s = &mut r.slots[u as usize];
                if s.done.is_some() {
                    continue;
                }
                s.counters.udp_received += 1;
                let data = &mut rx_bytes[off as usize..(off + len) as usize];
                if let Some(pkt) = s.client.handle_datagram_on(now, id, from, data) {
                    let mut ctx = Ctx {
                        client: &mut s.client,
                        now,
                        out: Out::Ring(&mut r.ring, Sock::Fixed(udp_entry(u)), &mut s.search),
                        buf: &mut r.sbuf,
                        counters: &mut s.counters,
                        manager: s.manager,
                    };
                    s.app.on_media(&mut ctx, pkt);
                }
                r.mark(u);
            }
            // What arrived, not the completions of our own sends: those come during the submit
            // and are counted there (`queued`), and counting them again would make the next
            // wait hold out for completions that are not coming, a tick per manager frame.
            let arrived = evs.iter().filter(|e| !matches!(e, Ev::Sent(..))).count();
            for ev in evs.drain(..) {
                match ev {
                    Ev::Poll(tk) if untoken(tk).0 == STOP_UNIT => stopping = true,
                    Ev::Poll(tk) => r.on_wake(untoken(tk).0, now),
                    Ev::Op(tk, res) => r.on_op(tk, res, now),
                    Ev::Sent(tk, res, data) => {
                        let (u, gen, _) = untoken(tk);
                        if (u as usize) < r.slots.len() {
                            r.on_sent(u, gen, res, data, now);
                        }
                    }
                    Ev::Stream(tk, res, off, len, more) => {
                        r.on_stream(tk, res, &rx_bytes[off as usize..(off + len) as usize], more, now)
                    }
                }
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
            r.release_entries();
            want = (rx.len() + arrived).clamp(1, cfg.batch.max(1));
        }
        tracing::debug!(counters = ?r.ring.counters, "ring thread done");
        // Let the last sends (HANGUPs' frames and datagrams, final media) complete, within a
        // bound.
        let _ = r.ring.submit();
        let end = Instant::now() + Duration::from_millis(500);
        let mut sent = Vec::new();
        while r.ring.in_flight_sends() > 0 && Instant::now() < end {
            let _ = r.ring.submit_and_wait(1, Duration::from_millis(10));
            let _ = r.ring.drain_with(|c| {
                if let Completion::Sent { token, result, data } = c {
                    sent.push((token, result, data))
                }
            });
            // Frames that waited behind a send in flight (the HANGUPs of `hangup_all`) follow it.
            for (tk, res, data) in sent.drain(..) {
                let (u, gen, _) = untoken(tk);
                if (u as usize) < r.slots.len() {
                    r.on_sent(u, gen, res, data, Instant::now());
                }
            }
        }
        // Close every socket now: the manager sees each connection end before `run` returns
        // (a ring's own teardown closes its file table later, in the background).
        r.close_all();
        let Reactor { slots, ring, stop_wake, .. } = self;
        // The ring owns whatever its operations still use, and its drop waits for them.
        drop(ring);
        drop(stop_wake);
        Ok(slots
            .into_iter()
            .map(|s| {
                let counters = s.counters;
                let result = match s.done {
                    Some(Err(e)) => Err(e),
                    _ => Ok(counters),
                };
                Finished { client: s.client, app: s.app, result }
            })
            .collect())
    }

    /// Cancel every unit's operations, each by its token (cancelling by socket, or all at
    /// once, makes the kernel walk the ring's pending operations once per cancelled one),
    /// then close all the sockets; the ring cancels what is left (nothing, normally) and
    /// waits for every operation's completion.
    fn close_all(&mut self) {
        for u in 0..self.slots.len() as u32 {
            let s = &self.slots[u as usize];
            let (gen, send_gen, sending, wake) = (s.gen, s.send_gen, s.sending, s.wake.is_some());
            let tk = match s.tcp {
                Tcp::Up => Some((Pending::Receive, token(u, gen, TK_RECV))),
                Tcp::Connecting { .. } => Some((Pending::Op, token(u, gen, TK_CONNECT))),
                Tcp::Down { .. } => None,
            };
            if let Some((what, tk)) = tk {
                let _ = self.ring.cancel(what, tk);
            }
            if sending {
                let _ = self.ring.cancel(Pending::Send, token(u, send_gen, TK_SEND));
            }
            if wake {
                let _ = self.ring.cancel_poll(token(u, 0, TK_WAKE));
            }
        }
        if self.stop_wake.is_some() {
            let _ = self.ring.cancel_poll(token(STOP_UNIT, 0, TK_WAKE));
        }
        self.ring.close_all(Duration::from_millis(500));
    }

    fn mark(&mut self, u: u32) {
        let s = &mut self.slots[u as usize];
        if !s.dirty {
            s.dirty = true;
            self.dirty.push(u);
        }
    }

    fn on_wake(&mut self, u: u32, now: Instant) {
        let Some(s) = self.slots.get_mut(u as usize) else { return };
        if s.done.is_some() {
            return;
        }
        if let Some(w) = s.wake.clone() {
            w.clear();
            let _ = self.ring.poll(w.fd.as_raw_fd(), libc::POLLIN as u32, token(u, 0, TK_WAKE));
            self.app_wakeup(u, now);
            self.mark(u);
        }
    }

    /// Datagrams on ring socket `sock` belong to unit `u`'s socket `id`.
    fn map_socket(&mut self, sock: u32, u: u32, id: SocketId) {
        if self.sock_unit.len() <= sock as usize {
            self.sock_unit.resize(sock as usize + 1, (u32::MAX, SocketId::MAIN));
        }
        self.sock_unit[sock as usize] = (u, id);
    }

    /// Run unit `u`'s app wake-up; its sends go through the ring.
    fn app_wakeup(&mut self, u: u32, now: Instant) {
        let s = &mut self.slots[u as usize];
        let mut ctx = Ctx {
            client: &mut s.client,
            now,
            out: Out::Ring(&mut self.ring, Sock::Fixed(udp_entry(u)), &mut s.search),
            buf: &mut self.sbuf,
            counters: &mut s.counters,
            manager: s.manager,
        };
        s.app.on_wakeup(&mut ctx);
    }

    /// A connect completed.
    fn on_op(&mut self, tk: u32, res: i32, now: Instant) {
        let (u, gen, kind) = untoken(tk);
        if u as usize >= self.slots.len() {
            return;
        }
        let s = &mut self.slots[u as usize];
        if s.done.is_some() || gen != s.gen || kind != TK_CONNECT {
            return; // an operation of an earlier connection, or a shutdown
        }
        if !matches!(s.tcp, Tcp::Connecting { .. }) {
            return;
        }
        if res < 0 {
            return self.connect_failed(u, now, io::Error::from_raw_os_error(-res));
        }
        driver::count_connect(&mut s.counters, &mut s.last_manager, s.manager);
        s.policy.connected();
        s.connect_errors = Vec::new();
        s.tcp = Tcp::Up;
        s.stream = match driver::new_stream(s.tls.as_ref(), s.manager) {
            Ok(st) => st,
            Err(e) => return self.finish(u, Err(e)),
        };
        // (A TLS stream's ClientHello goes out with the unit's next flush.)
        if s.stream.just_established() {
            driver::established(&mut s.client, &s.stream, &mut s.counters, now, &self.managers, s.manager);
        }
        if let Err(e) = self.ring.recv_stream(Sock::Fixed(tcp_entry(u)), token(u, gen, TK_RECV)) {
            tracing::warn!("arming the manager connection's receive: {e}");
            return self.lost(u, now);
        }
        self.mark(u);
    }

    /// The send in flight completed (of this connection or an earlier one), handing back its
    /// bytes.
    fn on_sent(&mut self, u: u32, gen: u8, res: i32, data: Vec<u8>, now: Instant) {
        let s = &mut self.slots[u as usize];
        s.sending = false;
        s.unsent = 0;
        s.inflight = data;
        if s.done.is_some() {
            // An ended unit's last frames, made while this send was in flight (a HANGUP,
            // say), still go out on its connection; then it closes if it was waiting to.
            let current = gen == s.gen && matches!(s.tcp, Tcp::Up) && res >= 0;
            s.inflight.clear();
            s.sent = 0;
            if current && !s.wbuf.is_empty() {
                std::mem::swap(&mut s.inflight, &mut s.wbuf);
                if self.queue_inflight(u).is_ok() {
                    return;
                }
            }
            let s = &mut self.slots[u as usize];
            if std::mem::take(&mut s.close_after_send) {
                let gen = s.gen;
                self.close_entry(u, gen);
            }
            return;
        }
        let current = gen == s.gen && matches!(s.tcp, Tcp::Up);
        if current && res > 0 {
            s.sent += res as usize;
            if s.sent < s.inflight.len() {
                // MSG_WAITALL sends everything unless the connection fails; a short count
                // without an error is sent on from where it stopped.
                return self.send_inflight(u, now);
            }
        }
        let failed = current && (res < 0 || (res == 0 && s.sent < s.inflight.len()));
        s.inflight.clear();
        s.sent = 0;
        if failed {
            return self.lost(u, now);
        }
        // Frames made while this send was in flight (for this connection or a new one).
        self.flush_tcp(u, now);
        self.mark(u);
    }

    /// Bytes (or the end, or an error) from the manager connection.
    fn on_stream(&mut self, tk: u32, res: i32, data: &[u8], more: bool, now: Instant) {
        let (u, gen, _) = untoken(tk);
        let Some(s) = self.slots.get_mut(u as usize) else { return };
        if s.done.is_some() || gen != s.gen || !matches!(s.tcp, Tcp::Up) {
            return; // a receive of an earlier connection
        }
        if res > 0 {
            if let Err(e) = s.stream.receive(data) {
                s.counters.tls_errors += 1;
                if !s.secured {
                    // Retrying cannot help: say why to the manager (the alert goes out before
                    // the close) and end the unit.
                    s.stream.take_outgoing(&mut s.wbuf);
                    self.flush_tcp(u, now);
                    let addr = self.slots[u as usize].manager;
                    return self.finish(u, Err(DriverError::Tls { addr, source: e }));
                }
                tracing::warn!("manager connection: {e}");
                return self.lost(u, now);
            }
            if s.stream.just_established() {
                s.secured = true;
                driver::established(&mut s.client, &s.stream, &mut s.counters, now, &self.managers, s.manager);
            }
            loop {
                match s.stream.next_frame() {
                    Ok(Some(f)) => s.client.handle_frame(now, f),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("bad frame from manager: {e}");
                        s.counters.frame_errors += 1;
                        return self.lost(u, now);
                    }
                }
            }
        } else if res != -libc::ENOBUFS {
            // The manager closed the connection, or it failed.
            return self.lost(u, now);
        }
        if !more {
            // Ended (no receive buffer was free, or the kernel stopped it): arm it again.
            if let Err(e) = self.ring.recv_stream(Sock::Fixed(tcp_entry(u)), token(u, gen, TK_RECV)) {
                tracing::warn!("re-arming the manager connection's receive: {e}");
                return self.lost(u, now);
            }
        }
        self.mark(u);
    }

    /// Start sending what is waiting, unless a send is in flight (its completion does it).
    fn flush_tcp(&mut self, u: u32, now: Instant) {
        let s = &mut self.slots[u as usize];
        if !matches!(s.tcp, Tcp::Up) {
            // Frames for a manager we are not connected to are dropped: the client re-sends
            // its state (REGISTER) when it reconnects.
            s.wbuf.clear();
            return;
        }
        // (While a send is in flight the ring holds its bytes: `unsent` of them.)
        let in_flight = if s.sending { s.unsent } else { s.inflight.len().saturating_sub(s.sent) };
        if s.wbuf.len() + in_flight > MAX_WRITE_BACKLOG {
            tracing::warn!("manager stopped reading ({} bytes waiting): dropping the connection", s.wbuf.len());
            s.counters.write_stalls += 1;
            return self.lost(u, now);
        }
        if s.sending || s.wbuf.is_empty() {
            return;
        }
        std::mem::swap(&mut s.inflight, &mut s.wbuf);
        s.wbuf.clear();
        s.sent = 0;
        self.send_inflight(u, now);
    }

    fn send_inflight(&mut self, u: u32, now: Instant) {
        if let Err(e) = self.queue_inflight(u) {
            tracing::warn!("queueing a frame to the manager: {e}");
            self.lost(u, now);
        }
    }

    /// Queue the send of `inflight[sent..]` on the unit's current connection. The ring holds
    /// the bytes until the completion hands them back ([`Reactor::on_sent`]); `sending` is set
    /// only once the send is queued.
    fn queue_inflight(&mut self, u: u32) -> io::Result<()> {
        let s = &mut self.slots[u as usize];
        s.send_gen = s.gen;
        let tk = token(u, s.gen, TK_SEND);
        let data = std::mem::take(&mut s.inflight);
        let unsent = data.len().saturating_sub(s.sent);
        match self.ring.send_stream(Sock::Fixed(tcp_entry(u)), data, s.sent, tk) {
            Ok(()) => {
                s.sending = true;
                s.unsent = unsent;
                Ok(())
            }
            Err((e, data)) => {
                s.inflight = data;
                Err(e)
            }
        }
    }

    /// Cancel what connection `gen` of the unit has in flight and empty its table entry
    /// after this turn's submission: the socket closes (the manager sees the end of the
    /// stream) once the cancelled operations are done.
    fn close_entry(&mut self, u: u32, gen: u8) {
        let _ = self.ring.cancel(Pending::Op, token(u, gen, TK_CONNECT));
        let _ = self.ring.cancel(Pending::Receive, token(u, gen, TK_RECV));
        let s = &self.slots[u as usize];
        if s.sending && s.send_gen == gen {
            let _ = self.ring.cancel(Pending::Send, token(u, gen, TK_SEND));
        }
        self.release.push(tcp_entry(u));
    }

    /// Submit what is queued (cancellations find their sockets), then empty the entries of
    /// the connections closed since the last submission.
    fn release_entries(&mut self) {
        if self.release.is_empty() {
            return;
        }
        if self.ring.queued() > 0 {
            if let Err(e) = self.ring.submit() {
                tracing::warn!("submitting before closing connections: {e}");
            }
        }
        for e in std::mem::take(&mut self.release) {
            let _ = self.ring.uninstall(e);
        }
    }

    /// Tear down the connection (cancelling its operations) and schedule a reconnect.
    fn close_tcp(&mut self, u: u32, now: Instant, retry: bool) {
        let s = &mut self.slots[u as usize];
        let old = std::mem::replace(&mut s.tcp, Tcp::Down { retry_at: now });
        let gen = s.gen;
        s.gen = s.gen.wrapping_add(1);
        s.stream = FrameStream::plain();
        s.wbuf.clear();
        if !matches!(old, Tcp::Down { .. }) {
            self.close_entry(u, gen);
        }
        let s = &mut self.slots[u as usize];
        if retry {
            let at = s.policy.lost(now, &mut self.rng);
            s.tcp = Tcp::Down { retry_at: at };
        }
    }

    fn lost(&mut self, u: u32, now: Instant) {
        let s = &mut self.slots[u as usize];
        if matches!(s.tcp, Tcp::Up) {
            s.counters.disconnects += 1;
            s.client.handle_disconnected(now);
        }
        self.close_tcp(u, now, true);
        self.mark(u);
    }

    /// A connect failed: the policy ([`proto::reconnect`]) says whether to try again (a
    /// unit that was connected always does; a first connect only while no local port is
    /// free) or to fail the unit with the reason.
    fn connect_failed(&mut self, u: u32, now: Instant, err: io::Error) {
        self.close_tcp(u, now, false);
        let s = &mut self.slots[u as usize];
        let ix = s.policy.manager();
        let next = s.policy.failed(now, driver::connect_error(&err), &mut self.rng);
        if !s.policy.ever_connected() {
            // Kept for the give-up's message, which names every manager's error.
            if s.connect_errors.len() < s.policy.manager_count() {
                s.connect_errors.resize_with(s.policy.manager_count(), || None);
            }
            s.connect_errors[ix] = Some(err);
        }
        let retry_at = match next {
            Next::Retry(at) => at,
            Next::PortWait(at) => {
                s.counters.port_waits += 1;
                at
            }
            Next::GiveUp(_) => {
                let e = driver::gave_up(&s.policy, &self.managers, s.local, &mut s.connect_errors);
                self.finish(u, Err(e));
                return;
            }
        };
        s.tcp = Tcp::Down { retry_at };
        self.mark(u);
    }

    fn connect(&mut self, u: u32, now: Instant) {
        // If this unit's previous connection was closed this turn, its cancellations must
        // reach the kernel (and its entry be emptied) before the entry holds a new socket.
        if self.release.contains(&tcp_entry(u)) {
            self.release_entries();
        }
        let s = &mut self.slots[u as usize];
        s.policy.connecting(now);
        s.manager = self.managers.get(s.policy.manager());
        let manager = s.manager;
        let source = driver::tcp_source(s.local, manager);
        let fd = match open_tcp(source, manager) {
            Ok(fd) => fd,
            Err(e) => return self.connect_failed(u, now, e),
        };
        if let Err(e) = self.ring.install(tcp_entry(u), fd) {
            return self.connect_failed(u, now, e);
        }
        let s = &mut self.slots[u as usize];
        let tk = token(u, s.gen, TK_CONNECT);
        s.tcp = Tcp::Connecting { deadline: now + CONNECT_TIMEOUT };
        if let Err(e) = self.ring.connect(Sock::Fixed(tcp_entry(u)), manager, tk) {
            return self.connect_failed(u, now, e);
        }
        self.mark(u);
    }

    fn on_timer(&mut self, u: u32, now: Instant) {
        let s = &mut self.slots[u as usize];
        if s.done.is_some() {
            return;
        }
        s.client.handle_timeout(now);
        if s.app.next_wakeup().is_some_and(|t| now >= t) {
            self.app_wakeup(u, now);
        }
        match self.slots[u as usize].tcp {
            Tcp::Down { retry_at } if now >= retry_at => self.connect(u, now),
            Tcp::Connecting { deadline } if now >= deadline => {
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
            let out = Sock::Fixed(udp_entry(u));
            driver::drain(
                &mut s.client,
                &mut s.app,
                Out::Ring(&mut self.ring, out, &mut s.search),
                &mut self.sbuf,
                &mut s.stream,
                &mut s.counters,
                now,
                s.manager,
            );
            // An app wake-up that this turn's events made due (media starting on START, the
            // callee answering the first packet) runs now and leaves with this turn's
            // submission. Wake-ups that came due on their own (armed earlier) wait for the
            // timer pass, which batches them per tick under load.
            let became_due = s.armed_at.is_none_or(|t| t > now) && s.app.next_wakeup().is_some_and(|t| t <= now);
            if became_due {
                self.app_wakeup(u, now);
                let s = &mut self.slots[u as usize];
                driver::drain(
                    &mut s.client,
                    &mut s.app,
                    Out::Ring(&mut self.ring, out, &mut s.search),
                    &mut self.sbuf,
                    &mut s.stream,
                    &mut s.counters,
                    now,
                    s.manager,
                );
            }
            let s = &mut self.slots[u as usize];
            s.stream.take_outgoing(&mut s.wbuf);
            // Search sockets opened during the drain receive from the next reap on.
            let added = std::mem::take(&mut self.slots[u as usize].search.added);
            for (sock, id) in added {
                self.map_socket(sock, u, id);
            }
            if !self.slots[u as usize].wbuf.is_empty() {
                // Datagrams before the frames that follow them: the callee's null packet must
                // be on the wire before its PUNCHED, or the caller's first packet (sent on the
                // START that PUNCHED brings about) can open the caller's firewall ahead of the
                // null, and the null then proves nothing about the path. The frame's SEND is
                // queued behind the datagrams the drain queued, and the kernel issues a
                // submission's entries in order.
                let was_sending = self.slots[u as usize].sending;
                self.flush_tcp(u, now);
                // A frame goes to the kernel at once, with the datagrams queued before it, as
                // a `write` would, not at the end of the turn: under load a turn handles
                // many units, and the manager would get every frame of it late (setup p50
                // +11% at 5,000 calls/s, the same syscalls).
                if !was_sending && self.slots[u as usize].sending {
                    if let Err(e) = self.ring.submit() {
                        tracing::warn!("submitting a frame to the manager: {e}");
                    }
                }
            }
            let s = &mut self.slots[u as usize];
            if stopping {
                // Every unit ends: the ring's end closes all the sockets at once after the
                // last sends. (Cancelling each unit's operations one by one costs the kernel
                // a walk over the ring's pending operations per cancellation.)
                self.retire(u, Ok(()));
                continue;
            }
            if s.app.done() {
                self.finish(u, Ok(()));
                continue;
            }
            let tcp_at = match &s.tcp {
                Tcp::Down { retry_at } => Some(*retry_at),
                Tcp::Connecting { deadline } => Some(*deadline),
                Tcp::Up => None,
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

    /// Mark the unit done (its app told of an error), leaving its sockets as they are.
    fn retire(&mut self, u: u32, result: Result<(), DriverError>) -> bool {
        let s = &mut self.slots[u as usize];
        if s.done.is_some() {
            return false;
        }
        if let Err(e) = &result {
            s.app.on_failed(e);
        }
        s.done = Some(result);
        s.armed_at = None;
        self.live -= 1;
        true
    }

    /// End the unit while the others go on: cancel its operations and close its sockets.
    fn finish(&mut self, u: u32, result: Result<(), DriverError>) {
        if !self.retire(u, result) {
            return;
        }
        let s = &mut self.slots[u as usize];
        if s.wake.is_some() {
            let _ = self.ring.cancel_poll(token(u, 0, TK_WAKE));
        }
        let sock = s.sock;
        s.search.close_all(&mut self.ring);
        let _ = self.ring.remove_socket(sock);
        // The connection closes once its last frames are out (a HANGUP, say): at once if
        // nothing is being sent, else when that send completes. The manager sees the end of
        // the stream either way.
        let s = &mut self.slots[u as usize];
        let gen = s.gen;
        match s.tcp {
            Tcp::Up if s.sending && s.send_gen == gen => s.close_after_send = true,
            Tcp::Up | Tcp::Connecting { .. } => self.close_entry(u, gen),
            Tcp::Down { .. } => {}
        }
        // The UDP socket closes with the turn's submission made (its datagrams queued this
        // turn still go out).
        self.release.push(udp_entry(u));
    }
}

/// A TCP socket set up to connect from `source` (if given), with TCP_NODELAY; the ring
/// connects it once it is in the file table.
fn open_tcp(source: Option<SocketAddr>, manager: SocketAddr) -> io::Result<OwnedFd> {
    let family = if manager.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: creating a socket; ownership passes to OwnedFd at once.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh socket owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a c_int of the stated size.
    unsafe {
        libc::setsockopt(
            raw,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    if let Some(src) = source {
        crate::driver::set_bind_no_port(&fd);
        let (sa, len) = crate::uring::to_sockaddr(src);
        // SAFETY: `sa` holds a sockaddr of `len` bytes.
        if unsafe { libc::bind(raw, &sa as *const _ as *const libc::sockaddr, len) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}
