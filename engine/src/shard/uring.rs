//! The manager's io_uring IO (Linux): one ring per shard thread, driving the same sans-IO
//! [`Shard`] as the portable IO, over the engine's one io_uring layer ([`crate::uring::Ring`],
//! which the client reactor uses too). This module holds no `unsafe`: what the kernel reads
//! and writes (receive buffers, send bytes, accept addresses) is owned by the ring until each
//! operation's last completion, and the ring's teardown waits for them.
//!
//! Connections are accepted into the ring's *direct descriptors* (a sparse file table,
//! `IORING_FILE_INDEX_ALLOC`), not into the process's descriptor table: a connection costs
//! no file descriptor, so the manager's capacity is not bounded by RLIMIT_NOFILE less its own
//! descriptors. (The kernel sizes one ring's table up to RLIMIT_NOFILE.)
//!
//! * Accept: [`ACCEPTS`] single-shot accepts in flight on the shard's SO_REUSEPORT listener
//!   (the ring keeps each one's address buffer: the core wants the peer's address), armed
//!   only while the table has a free entry for each.
//! * Receive: one multishot receive per connection, drawing from the ring's provided buffers,
//!   shared by all the shard's connections: an idle connection holds no buffer.
//! * Send: a connection has at most one send in flight (the ring holds its bytes); frames
//!   produced meanwhile wait in its pending buffer (at most `conn_queue` frames, as in the
//!   portable IO, beyond which the connection is dropped as too slow).
//! * Close: queued frames are flushed (for at most [`CLOSE_GRACE`]), the receive and any
//!   send still in flight are cancelled, and once both have completed the connection's entry
//!   is emptied (which closes it) and the core told.
//! * Other shards' messages arrive on an unbounded channel with an eventfd beside it, which
//!   the ring polls; the shard's timers run every [`TICK`] from the wait's timeout.
//! * State follows the queue: a connection is marked receiving or sending, an accept or the
//!   wake-up poll armed, only once its operation was queued; what could not be queued (a
//!   full submission queue the kernel would not take) is tried again on the next turn.
//!
//! One turn: serve the tick and the stop signal, flush the core's output (which starts
//! sends, re-arms receives and advances closes), wait for completions or the next timer,
//! and reap: completions only change state and mark connections; what to submit is decided
//! by the next flush.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::reactor::Wake;
use crate::uring::{Completion, Pending, Ring, Sock};
use proto::stream::FrameStream;
use tokio::sync::mpsc;

use super::{
    AcceptFailures, OpenConns, Peer, ShardStart, ACCEPT_BACKOFF, CLOSE_GRACE, INBOX_BATCH, SHUTDOWN_DRAIN, TICK,
};
use proto::shard::stats::Stats;
use proto::shard::{Output, Shard, ShardMsg};

/// Accepts kept in flight per shard.
const ACCEPTS: usize = 16;
/// Submission queue entries of a shard's ring.
const ENTRIES: u32 = 1024;
/// Receive buffers shared by a shard's connections, and their size. A frame is at most a
/// few hundred bytes; a connection's receive that finds no buffer ends and is re-armed.
const NBUFS: u16 = 1024;
const BUF_SIZE: usize = 2048;

/// The wake-up poll's token (connections' tokens carry a generation of at least 1).
const WAKE: u32 = 0;
/// A connection's token: a generation (12 bits, never 0) and its file-table entry (20 bits:
/// [`table_size`] is at most 2^20). Every operation of a connection has completed before its
/// entry is emptied, so a later connection in the same entry never sees them; the generation
/// is a second guard.
const SLOT_BITS: u32 = 20;

fn token(gen: u32, slot: u32) -> u32 {
    (gen << SLOT_BITS) | slot
}

fn untoken(t: u32) -> (u32, u32) {
    (t >> SLOT_BITS, t & ((1 << SLOT_BITS) - 1))
}

/// True if a manager ring can be set up here (io_uring allowed, sparse file tables and
/// provided buffer rings, SINGLE_ISSUER + DEFER_TASKRUN: Linux 6.1 or later).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| build_ring(4).is_ok())
}

fn build_ring(table: u32) -> io::Result<Ring> {
    let mut r = Ring::multi(ENTRIES, NBUFS, BUF_SIZE)?;
    r.register_table(table)?;
    Ok(r)
}

/// The size of a shard's direct-descriptor table: the soft RLIMIT_NOFILE (the most the
/// kernel allows for one ring).
pub fn table_size() -> u32 {
    crate::uring::table_limit().unwrap_or(1024).clamp(16, 1 << SLOT_BITS) as u32
}

/// A std listener with SO_REUSEPORT (one per shard) and TCP_NODELAY, which accepted
/// connections inherit (a direct descriptor cannot be given socket options by syscall).
pub fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.set_nodelay(true)?;
    s.bind(addr)?;
    let fd = s.into_raw_fd();
    // SAFETY: `fd` is a bound socket we own; ownership passes to the TcpListener at once.
    let l = unsafe { TcpListener::from_raw_fd(fd) };
    // SAFETY: listen on a socket we own.
    if unsafe { libc::listen(l.as_raw_fd(), 4096) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(l)
}

struct Conn {
    id: u64,
    gen: u32,
    /// Its frames, plain or TLS.
    stream: FrameStream,
    /// Frames still read and handed to the core (false after a framing error).
    reading: bool,
    recv_armed: bool,
    /// Bytes being sent (held by the ring while `sending`) and how far.
    inflight: Vec<u8>,
    sent: usize,
    sending: bool,
    /// Frames produced while a send was in flight.
    pending: Vec<u8>,
    pending_frames: usize,
    /// Closing: flush what is queued until this time, then close.
    closing: Option<Instant>,
    /// Closing without flushing (the peer is gone).
    abort: bool,
    cancel_sent: bool,
}

impl Conn {
    /// A connection the core knows as `id`, just accepted: nothing armed, nothing queued.
    fn new(id: u64, gen: u32, stream: FrameStream) -> Conn {
        Conn {
            id,
            gen,
            stream,
            reading: true,
            recv_armed: false,
            inflight: Vec::new(),
            sent: 0,
            sending: false,
            pending: Vec::new(),
            pending_frames: 0,
            closing: None,
            abort: false,
            cancel_sent: false,
        }
    }
}

/// Everything of a shard but its ring: what a completion may change.
struct State {
    core: Shard,
    stats: Arc<Stats>,
    open: Arc<OpenConns>,
    peers: Vec<Peer>,
    /// The cluster bridge, in a cluster.
    cluster: Option<super::ClusterTx>,
    conn_queue: usize,
    /// Connections by file-table entry.
    slots: Vec<Option<Conn>>,
    by_id: HashMap<u64, u32>,
    /// The next connection generation (1..4095).
    next_gen: u32,
    /// Entries with frames to send, a receive to re-arm or a close to advance.
    dirty: Vec<u32>,
    accept_armed: [bool; ACCEPTS],
    /// Accepts to arm at the next flush (a completion cannot submit).
    accepts_due: bool,
    accept_resume: Option<Instant>,
    failures: AcceptFailures,
    /// Entries in the table, and entries taken (accepted, not yet closed). Accepts are armed
    /// only while an entry is free for each: an accept that finds the table full has already
    /// taken the connection from the backlog, and the kernel drops it.
    table: u32,
    used: u32,
    /// The table was full at the last arm (a wait counted once in `accept_errors`).
    table_full: bool,
    listener: TcpListener,
    wake: Arc<Wake>,
    /// The poll of the wake-up eventfd is queued (else it is tried again each turn).
    wake_armed: bool,
    /// The eventfd fired: take the inbox.
    woke: bool,
    stopping: bool,
    /// Connections closed in this flush round.
    closes: usize,
    /// TLS on every connection with this configuration.
    tls: Option<Arc<rustls::ServerConfig>>,
}

struct Io {
    ring: Ring,
    st: State,
}

/// Run one shard on this thread until `stop` turns true (then every connection gets ERROR
/// Shutdown and the thread waits up to [`SHUTDOWN_DRAIN`] for them to close).
pub fn shard_thread(start: ShardStart, wake: Arc<Wake>) {
    let ShardStart { init, addr, cfg, conn_queue, stats, open, mut inbox, peers, stop, ready, tls, cluster } = start;
    let setup = (|| {
        let listener = bind_listener(addr)?;
        let table = table_size();
        let ring = build_ring(table)?;
        Ok::<_, io::Error>((listener, ring, table))
    })();
    let (listener, ring, table) = match setup {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(listener.local_addr());
    let mut st =
        State::new(Shard::new(init, cfg, stats.clone()), stats, open, peers, conn_queue, table, listener, wake);
    st.tls = tls;
    st.cluster = cluster;
    let mut io = Io { ring, st };
    let mut next_tick = Instant::now() + TICK;
    let mut stop_deadline: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if !io.st.stopping && *stop.borrow() {
            io.begin_stop();
            stop_deadline = Some(now + SHUTDOWN_DRAIN);
        }
        if let Some(d) = stop_deadline {
            if now >= d || io.st.core.open_connections() == 0 {
                break;
            }
        }
        if now >= next_tick {
            io.st.core.handle_tick(now, crate::sys::unix_now());
            io.st.check_closing(now);
            next_tick = now + TICK;
        }
        if io.st.accept_resume.is_some_and(|t| now >= t) {
            io.st.accept_resume = None;
            io.st.accepts_due = true;
        }
        io.flush(now);
        let mut until = next_tick;
        if let Some(t) = io.st.accept_resume {
            until = until.min(t);
        }
        if let Some(d) = stop_deadline {
            until = until.min(d);
        }
        io.wait(until.saturating_duration_since(Instant::now()));
        io.reap(&mut inbox);
    }
    // Close what is left now: cancel and reap every operation, then empty the file table,
    // so every connection is closed when the thread ends (a dropped ring's table would be
    // released by the kernel later, in the background).
    io.ring.close_all(crate::uring::TEARDOWN_BOUND);
}

impl State {
    #[allow(clippy::too_many_arguments)]
    fn new(
        core: Shard,
        stats: Arc<Stats>,
        open: Arc<OpenConns>,
        peers: Vec<Peer>,
        conn_queue: usize,
        table: u32,
        listener: TcpListener,
        wake: Arc<Wake>,
    ) -> State {
        State {
            core,
            stats,
            open,
            peers,
            cluster: None,
            conn_queue,
            slots: Vec::new(),
            by_id: HashMap::new(),
            next_gen: 1,
            dirty: Vec::new(),
            accept_armed: [false; ACCEPTS],
            accepts_due: true,
            accept_resume: None,
            failures: AcceptFailures::default(),
            table,
            used: 0,
            table_full: false,
            listener,
            wake,
            wake_armed: false,
            woke: false,
            stopping: false,
            closes: 0,
            tls: None,
        }
    }

    fn conn(&mut self, slot: u32, gen: u32) -> Option<&mut Conn> {
        self.slots.get_mut(slot as usize).and_then(|c| c.as_mut()).filter(|c| c.gen == gen)
    }

    /// One completion: state changes only (a completion cannot submit: the ring is reaping);
    /// what is to be submitted is marked for the next flush.
    fn on_completion(&mut self, now: Instant, c: Completion<'_>) {
        match c {
            Completion::Accepted { token, result, peer } => self.on_accept(now, token as usize, result, peer),
            Completion::Stream { token, result, data, more } => self.on_recv(now, token, result, data, more),
            Completion::Sent { token, result, data } => self.on_send(token, result, data),
            Completion::Poll { token: WAKE, .. } => {
                self.wake_armed = false;
                self.woke = true;
            }
            // (A shard has no UDP sockets, connects or other polls.)
            Completion::Poll { .. } | Completion::Recv { .. } | Completion::Op { .. } => {}
        }
    }

    fn on_accept(&mut self, now: Instant, i: usize, res: i32, peer: Option<SocketAddr>) {
        if let Some(a) = self.accept_armed.get_mut(i) {
            *a = false;
        }
        self.accepts_due = true;
        if res < 0 {
            if res == -libc::ECANCELED || self.stopping {
                return;
            }
            // The shared policy: a pause leaves the pending connections in the backlog; a
            // routine failure re-arms at once.
            let e = io::Error::from_raw_os_error(-res);
            if let Some(pause) = self.failures.failed(&self.stats, now, &e) {
                self.accept_resume.get_or_insert(now + pause);
            }
            return;
        }
        let slot = res as u32;
        self.used += 1;
        let peer = peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let before = self.open.opened();
        let id = self.core.conn_opened(now, peer, before);
        if self.stopping {
            // An accept that completed after the stop began (its cancellation lost the
            // race): this connection gets its ERROR Shutdown too.
            self.core.shutdown();
        }
        let gen = self.next_gen;
        self.next_gen = self.next_gen % ((1 << (32 - SLOT_BITS)) - 1) + 1;
        if self.slots.len() <= slot as usize {
            self.slots.resize_with(slot as usize + 1, || None);
        }
        let stream = match super::server_stream(self.tls.as_ref()) {
            Ok(mut s) => {
                // (A plain stream is ready at once; the core hears only of a TLS handshake.)
                s.just_established();
                s
            }
            Err(e) => {
                // (rustls refused to start a connection: counted, closed by the next flush.)
                self.core.conn_tls_failed(now, id, &e);
                FrameStream::plain()
            }
        };
        self.slots[slot as usize] = Some(Conn::new(id, gen, stream));
        self.by_id.insert(id, slot);
        // Its receive is armed by the next flush.
        self.dirty.push(slot);
    }

    /// A receive completion: bytes (handed to the decoder and the core), the end of the
    /// stream, or an error.
    fn on_recv(&mut self, now: Instant, token: u32, res: i32, data: &[u8], more: bool) {
        let (gen, slot) = untoken(token);
        let Some(c) = self.conn(slot, gen) else { return };
        if !more {
            // Re-armed (or the close advanced) by the next flush.
            c.recv_armed = false;
            self.dirty.push(slot);
        }
        let c = self.slots[slot as usize].as_mut().expect("checked above");
        if res > 0 {
            if c.reading && c.closing.is_none() {
                let id = c.id;
                if let Err(e) = c.stream.receive(data) {
                    // A failed handshake or a plaintext client: its alert or ERROR is
                    // flushed, then the connection closes.
                    c.reading = false;
                    c.stream.take_outgoing(&mut c.pending);
                    self.core.conn_tls_failed(now, id, &e);
                    self.dirty.push(slot);
                    return;
                }
                if c.stream.just_established() {
                    if let Some(b) = c.stream.binding() {
                        self.core.conn_secured(now, id, b, c.stream.is_resumed());
                    }
                }
                loop {
                    let c = self.slots[slot as usize].as_mut().expect("checked above");
                    match c.stream.next_frame() {
                        Ok(Some(f)) => self.core.conn_frame(now, id, f),
                        Ok(None) => break,
                        Err(e) => {
                            c.reading = false;
                            self.core.conn_error(now, id, &e);
                            break;
                        }
                    }
                }
                // Handshake records the receive produced.
                let c = self.slots[slot as usize].as_mut().expect("checked above");
                if c.stream.wants_write() {
                    c.stream.take_outgoing(&mut c.pending);
                    self.dirty.push(slot);
                }
            }
            return;
        }
        match res {
            // Out of receive buffers (the data waits in the socket), or cancelled by our
            // close: the next flush re-arms, or goes on with the close.
            r if r == -libc::ENOBUFS || r == -libc::ECANCELED => {}
            // End of stream, or a reset: the peer is gone.
            _ => self.lost(slot),
        }
    }

    /// A send completed, handing back its bytes.
    fn on_send(&mut self, token: u32, res: i32, data: Vec<u8>) {
        let (gen, slot) = untoken(token);
        let Some(c) = self.conn(slot, gen) else { return };
        c.sending = false;
        c.inflight = data;
        self.dirty.push(slot);
        if res < 0 {
            self.lost(slot);
            return;
        }
        let c = self.slots[slot as usize].as_mut().expect("checked above");
        c.sent += res as usize;
        if c.sent >= c.inflight.len() || c.cancel_sent || c.abort {
            // Sent; or a close gave up on it (its cancellations went out, and a send queued
            // now would never be cancelled: a peer that does not read would hold the
            // connection open for good). Otherwise the next flush sends the rest.
            c.inflight.clear();
            c.sent = 0;
        }
    }

    /// The connection in `slot` is closed (its entry emptied): forget it, tell the core.
    fn closed(&mut self, now: Instant, slot: u32) {
        let Some(c) = self.slots.get_mut(slot as usize).and_then(|c| c.take()) else { return };
        self.by_id.remove(&c.id);
        self.used -= 1;
        self.closes += 1;
        if self.core.conn_closed(now, c.id) {
            self.open.closed();
        }
        if self.table_full {
            self.accepts_due = true;
        }
    }

    /// The peer is gone (end of stream, reset, failed send): close without flushing.
    fn lost(&mut self, slot: u32) {
        if let Some(c) = self.slots.get_mut(slot as usize).and_then(|c| c.as_mut()) {
            c.abort = true;
            c.pending.clear();
            c.closing.get_or_insert(Instant::now());
            self.dirty.push(slot);
        }
    }

    /// Closing connections whose flush took longer than [`CLOSE_GRACE`] (a peer that does
    /// not read): force them on.
    fn check_closing(&mut self, now: Instant) {
        for slot in 0..self.slots.len() as u32 {
            if self.slots[slot as usize].as_ref().is_some_and(|c| c.closing.is_some_and(|d| now >= d)) {
                self.dirty.push(slot);
            }
        }
    }

    /// Move the core's output to connections' pending buffers and to other shards.
    fn take_output(&mut self, now: Instant) {
        while let Some(o) = self.core.poll_output() {
            match o {
                Output::Frame { conn, frame } => {
                    let Some(&slot) = self.by_id.get(&conn) else { continue };
                    let Some(c) = self.slots[slot as usize].as_mut() else { continue };
                    if c.closing.is_some() {
                        continue;
                    }
                    if c.pending_frames >= self.conn_queue {
                        // A reader too slow to drain its queue: flush what it has, then close.
                        self.stats.inc(&self.stats.connections_slow);
                        c.closing = Some(now + CLOSE_GRACE);
                    } else {
                        // (Its bytes are taken when the connection is advanced: the frames
                        // of one flush go out in one TLS record.)
                        c.stream.send_frame(&frame);
                        c.pending_frames += 1;
                    }
                    self.dirty.push(slot);
                }
                Output::Close { conn } => {
                    let Some(&slot) = self.by_id.get(&conn) else { continue };
                    if let Some(c) = self.slots[slot as usize].as_mut() {
                        c.closing.get_or_insert(now + CLOSE_GRACE);
                        self.dirty.push(slot);
                    }
                }
                Output::Shard { to, msg } => {
                    if let Some(p) = self.peers.get(to as usize) {
                        p.send(msg);
                    }
                }
                Output::Cluster(o) => {
                    if let Some(c) = &self.cluster {
                        let _ = c.send(o);
                    }
                }
            }
        }
    }
}

impl Io {
    fn wait(&mut self, timeout: Duration) {
        if let Err(e) = self.ring.submit_and_wait(1, timeout) {
            tracing::warn!("io_uring wait failed: {e}");
        }
    }

    /// Reap every ready completion, then take the inbox if the wake-up fired, and flush.
    fn reap(&mut self, inbox: &mut mpsc::UnboundedReceiver<ShardMsg>) {
        let now = Instant::now();
        let Io { ring, st } = self;
        if let Err(e) = ring.drain_with(|c| st.on_completion(now, c)) {
            tracing::warn!("io_uring reap failed: {e}");
        }
        if std::mem::take(&mut self.st.woke) {
            self.st.wake.clear();
            let mut taken = 0;
            while let Ok(m) = inbox.try_recv() {
                self.st.core.handle_msg(now, m);
                taken += 1;
                if taken % INBOX_BATCH == 0 {
                    self.flush(now);
                }
            }
        }
        self.flush(now);
    }

    /// Move the core's output on, then submit what is due: accepts, the wake-up poll, and
    /// for every marked connection its receive, its sends and its close.
    fn flush(&mut self, now: Instant) {
        self.st.take_output(now);
        if std::mem::take(&mut self.st.accepts_due) {
            for i in 0..ACCEPTS {
                self.arm_accept(i);
            }
        }
        if !self.st.wake_armed {
            self.st.wake_armed = self.ring.poll(self.st.wake.as_raw_fd(), libc::POLLIN as u32, WAKE).is_ok();
        }
        // A close tells the core, whose output (to other shards, or frames to other
        // connections) goes out in the same turn: a few rounds, bounded.
        for _ in 0..8 {
            let mut dirty = std::mem::take(&mut self.st.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            self.st.closes = 0;
            for &slot in &dirty {
                self.advance(now, slot);
            }
            if self.st.closes == 0 {
                break;
            }
            self.st.take_output(now);
        }
    }

    fn arm_accept(&mut self, i: usize) {
        let st = &mut self.st;
        if st.accept_armed[i] || st.stopping || st.accept_resume.is_some() {
            return;
        }
        let armed = st.accept_armed.iter().filter(|a| **a).count() as u32;
        if st.used + armed >= st.table {
            if !std::mem::replace(&mut st.table_full, true) {
                // New connections wait in the listen backlog until an entry frees.
                st.failures.table_full(&st.stats, Instant::now(), st.table);
            }
            return;
        }
        st.table_full = false;
        if self.ring.accept(st.listener.as_raw_fd(), i as u32).is_ok() {
            st.accept_armed[i] = true;
        } else {
            // Not queued: try again shortly.
            st.accept_resume.get_or_insert(Instant::now() + ACCEPT_BACKOFF);
        }
    }

    /// Bring connection `slot` forward: re-arm its receive, start a send, or take its
    /// close a step further (flush, cancel, empty its entry).
    fn advance(&mut self, now: Instant, slot: u32) {
        let Some(c) = self.st.slots.get_mut(slot as usize).and_then(|c| c.as_mut()) else { return };
        let tk = token(c.gen, slot);
        if !c.recv_armed && c.closing.is_none() {
            // Armed only once queued; if not, the next flush tries again.
            c.recv_armed = self.ring.recv_stream(Sock::Fixed(slot), tk).is_ok();
            if !c.recv_armed {
                self.st.dirty.push(slot);
            }
        }
        // No send starts once a close has given up on flushing (past its grace, or its
        // cancellations sent): nothing would cancel it.
        let flushing = c.closing.is_none_or(|d| now < d) && !c.cancel_sent;
        if !c.abort && flushing && c.stream.wants_write() {
            c.stream.take_outgoing(&mut c.pending);
        }
        if !c.sending && !c.abort && flushing {
            if c.inflight.is_empty() && !c.pending.is_empty() {
                std::mem::swap(&mut c.inflight, &mut c.pending);
                c.pending_frames = 0;
                c.sent = 0;
            }
            // New frames, or the rest of a short send, or bytes not queued before.
            if c.sent < c.inflight.len() {
                let data = std::mem::take(&mut c.inflight);
                match self.ring.send_stream(Sock::Fixed(slot), data, c.sent, tk) {
                    Ok(()) => c.sending = true,
                    Err((_, data)) => {
                        c.inflight = data;
                        self.st.dirty.push(slot);
                    }
                }
                return;
            }
        }
        let Some(deadline) = c.closing else { return };
        let flushed = !c.sending && c.pending.is_empty() && c.inflight.is_empty();
        if !flushed && !c.abort && now < deadline {
            return;
        }
        // Stop the receive and any send still in flight, then close. (`recv_armed` and
        // `sending` are set only for operations that were queued, so each ends with a
        // completion that clears it.)
        if (c.recv_armed || c.sending) && !c.cancel_sent {
            let recv_ok = !c.recv_armed || self.ring.cancel(Pending::Receive, tk).is_ok();
            let send_ok = !c.sending || self.ring.cancel(Pending::Send, tk).is_ok();
            if recv_ok && send_ok {
                c.cancel_sent = true;
            } else {
                self.st.dirty.push(slot);
            }
            return;
        }
        if c.recv_armed || c.sending {
            return;
        }
        // Nothing of this connection is in flight: emptying its entry closes it.
        if let Err(e) = self.ring.uninstall(slot) {
            tracing::warn!(slot, "closing a connection's entry: {e}");
            self.st.dirty.push(slot);
            return;
        }
        self.st.closed(now, slot);
    }

    fn begin_stop(&mut self) {
        self.st.stopping = true;
        for i in 0..ACCEPTS {
            if self.st.accept_armed[i] {
                // (Not queued: the ring's end cancels it anyway.)
                let _ = self.ring.cancel(Pending::Accept, i as u32);
            }
        }
        self.st.core.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::shard::{ShardConfig, ShardInit};
    use std::io::Read;
    use std::os::fd::RawFd;

    /// An `Io` around `ring` (whose table has 4 entries), with a core of its own (one shard)
    /// and a listener on loopback.
    fn test_io(ring: Ring) -> Io {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let stats = Arc::new(Stats::default());
        let init = ShardInit { index: 0, n: 1, seed: 1, token_key: [1; 32], unix_secs: 0, node: 0 };
        let core = Shard::new(init, ShardConfig::default(), stats.clone());
        let open = Arc::new(OpenConns::default());
        let st = State::new(core, stats, open, Vec::new(), 64, 4, listener, Wake::new().unwrap());
        Io { ring, st }
    }

    /// A connection in file-table entry `slot` of `io`'s ring, as if accepted (generation 7),
    /// and the peer's end of it.
    fn open_conn(io: &mut Io, slot: u32) -> std::net::TcpStream {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (peer, _) = l.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // The table holds the socket from here; our descriptor closes when `ours` drops.
        io.ring.install(slot, ours.into()).unwrap();
        let st = &mut io.st;
        if st.slots.len() <= slot as usize {
            st.slots.resize_with(slot as usize + 1, || None);
        }
        let id = 100 + slot as u64;
        st.slots[slot as usize] = Some(Conn::new(id, 7, FrameStream::plain()));
        st.by_id.insert(id, slot);
        st.used += 1;
        peer
    }

    fn queue_frame(io: &mut Io, slot: u32, bytes: &[u8]) {
        let c = io.st.slots[slot as usize].as_mut().unwrap();
        c.pending.extend_from_slice(bytes);
        c.pending_frames += 1;
        io.st.dirty.push(slot);
    }

    /// Turns of the shard's loop (flush, wait, reap) until `done`, at most `n`.
    fn turns(io: &mut Io, n: usize, done: impl Fn(&Io) -> bool) -> bool {
        let (_tx, mut inbox) = mpsc::unbounded_channel();
        for _ in 0..n {
            io.flush(Instant::now());
            io.wait(Duration::from_millis(10));
            io.reap(&mut inbox);
            if done(io) {
                return true;
            }
        }
        false
    }

    /// Enter the ring behind descriptor `fd` without submitting: the kernel runs the work the
    /// ring has pending (a woken accept takes its connection), as on every enter of the
    /// thread that submits to it.
    fn enter(fd: RawFd) {
        const IORING_ENTER_GETEVENTS: libc::c_uint = 1;
        let none = std::ptr::null::<libc::c_void>();
        // SAFETY: io_uring_enter with nothing to submit, no completion to wait for and no
        // argument (null, size 0) reads and writes no memory of ours.
        unsafe { libc::syscall(libc::SYS_io_uring_enter, fd, 0u32, 0u32, IORING_ENTER_GETEVENTS, none, 0usize) };
    }

    /// The shard's end ends the ring's operations before it frees what they use: an accept
    /// still in flight when the ring closes would write the next connection's address into
    /// a freed buffer (the kernel tears a closed ring down later, in the background). A
    /// duplicate of the ring's descriptor holds that moment still: a connection made after
    /// the end must wait in the listener's backlog, not be taken by the old accept.
    #[test]
    fn the_shards_end_ends_its_operations_before_freeing_their_memory() {
        let mut io = test_io(build_ring(4).unwrap());
        let listener = io.st.listener.try_clone().unwrap();
        listener.set_nonblocking(true).unwrap();
        // A connection with its receive armed and a send in flight, and the accepts armed.
        let _peer = open_conn(&mut io, 1);
        queue_frame(&mut io, 1, b"frame");
        io.flush(Instant::now());
        let c = io.st.slots[1].as_ref().unwrap();
        assert!(c.recv_armed && c.sending && io.st.accept_armed.iter().any(|a| *a));
        io.ring.submit().unwrap();
        // SAFETY: a duplicate of the ring's descriptor, closed below.
        let dup = unsafe { libc::dup(io.ring.ring_fd()) };
        assert!(dup >= 0, "dup: {}", io::Error::last_os_error());
        drop(io);
        let _late = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut p = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes the one pollfd we pass.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 2000) }, 1, "the connection reached the backlog");
        enter(dup);
        let got = listener.accept();
        // SAFETY: closing our duplicate.
        unsafe { libc::close(dup) };
        assert!(got.is_ok(), "an accept of the ended shard took the connection: {got:?}");
    }

    /// A send that could not be queued (the submission queue full, and the kernel taking no
    /// entries) does not mark its connection as sending: its bytes stay with the connection,
    /// go out once the ring takes entries again, and the connection still closes. Marked
    /// sending, it would wait for a completion that never comes, and never close.
    #[test]
    fn a_send_that_could_not_be_queued_goes_out_later_and_the_connection_closes() {
        // A ring of 4 entries that submits nothing (R_DISABLED) until it is enabled.
        let mut b = io_uring::IoUring::builder();
        b.setup_single_issuer().setup_defer_taskrun().setup_r_disabled();
        let mut ring = Ring::from_builder(&b, -1, 4, NBUFS, BUF_SIZE, true).unwrap();
        ring.register_table(4).unwrap();
        let mut io = test_io(ring);
        let mut peer = open_conn(&mut io, 0);
        for _ in 0..4 {
            // Cancellations of nothing fill the queue.
            io.ring.cancel(Pending::Op, 0).unwrap();
        }
        assert!(io.ring.cancel(Pending::Op, 0).is_err(), "the queue is full");
        queue_frame(&mut io, 0, b"hello");
        io.flush(Instant::now());
        let c = io.st.slots[0].as_ref().unwrap();
        assert!(!c.sending, "marked sending, though the send was not queued");
        assert!(!c.recv_armed, "marked receiving, though the receive was not queued");
        assert_eq!(&c.inflight[c.sent..], b"hello", "the bytes were lost");
        io.ring.enable().unwrap();
        assert!(
            turns(&mut io, 200, |io| io.st.slots[0].as_ref().is_some_and(|c| !c.sending && c.inflight.is_empty())),
            "the send never went out"
        );
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        io.st.slots[0].as_mut().unwrap().closing = Some(Instant::now());
        io.st.dirty.push(0);
        assert!(turns(&mut io, 200, |io| io.st.slots[0].is_none()), "the connection never closed");
        assert_eq!(io.st.core.open_connections(), 0);
    }

    /// A short send that completes after the close has sent its cancellations (it sent part
    /// before the cancellation found it) is not sent on, and frames still queued do not go
    /// out: a send queued then would never be cancelled, and a peer that does not read would
    /// hold the connection open for good.
    #[test]
    fn a_send_completing_after_the_close_gave_up_is_not_sent_on() {
        let mut io = test_io(build_ring(4).unwrap());
        let mut peer = open_conn(&mut io, 0);
        let c = io.st.slots[0].as_mut().unwrap();
        c.closing = Some(Instant::now());
        c.sending = true;
        c.cancel_sent = true;
        c.pending.extend_from_slice(b"late frame");
        c.pending_frames = 1;
        // 10 bytes of 8 MiB went out: the rest would fill the socket of a peer that does
        // not read, and stay in flight.
        io.st.on_send(token(7, 0), 10, vec![1; 8 << 20]);
        assert!(!io.st.slots[0].as_ref().unwrap().sending);
        assert!(turns(&mut io, 200, |io| io.st.slots[0].is_none()), "the connection never closed");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "{} bytes went out after the close gave up", got.len());
    }

    #[test]
    fn tokens_carry_the_generation_and_the_entry() {
        let last_entry = (1 << SLOT_BITS) - 1;
        assert_eq!(untoken(token(4095, last_entry)), (4095, last_entry));
        assert_eq!(untoken(token(1, 0)), (1, 0));
        assert_ne!(token(1, 0), WAKE, "no connection's token is the wake-up's");
        assert!(table_size() <= 1 << SLOT_BITS);
    }
}
