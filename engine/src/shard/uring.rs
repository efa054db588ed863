//! The manager's io_uring IO (Linux): one ring per shard thread, driving the same sans-IO
//! [`Shard`] as the manager's tokio IO.
//!
//! Connections are accepted into the ring's *direct descriptors* (a sparse fixed-file table,
//! `IORING_FILE_INDEX_ALLOC`), not into the process's descriptor table: a connection costs
//! no file descriptor, so the manager's capacity is not bounded by RLIMIT_NOFILE less its own
//! descriptors. (The kernel sizes one ring's table up to RLIMIT_NOFILE.)
//!
//! * Accept: [`ACCEPTS`] single-shot ACCEPTs in flight on the shard's SO_REUSEPORT listener,
//!   each with its own address buffer (the core wants the peer's address).
//! * Receive: one multishot RECV per connection, drawing from a provided buffer ring shared
//!   by all the shard's connections: an idle connection holds no buffer.
//! * Send: a connection has at most one SEND in flight; frames produced meanwhile wait in
//!   its pending buffer (at most `conn_queue` frames, as in the tokio IO, beyond which the
//!   connection is dropped as too slow).
//! * Close: the receive is cancelled, queued frames are flushed (for at most
//!   [`CLOSE_GRACE`]), then the direct descriptor is closed and the core told.
//! * Other shards' messages arrive on an unbounded channel with an eventfd beside it; the
//!   shard's timers run every [`TICK`] from the wait's timeout.
//!
//! The `unsafe` here: what the kernel reads and writes for an operation stays in place until
//! the operation's last completion is reaped: the receive buffers and each send's bytes are
//! held by `Ring`, each accept's address buffer is boxed in `Io`. Closing a ring does not
//! end its operations (the kernel cancels them in the background, later), so the shard's end
//! cancels them all and waits for their completions before that memory is freed, and leaks
//! it if they do not all come within a bound.

use std::collections::HashMap;
use std::io;
use std::mem::ManuallyDrop;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::reactor::Wake;
use crate::uring::{teardown_leaked, BufRing, TEARDOWN_BOUND};
use io_uring::{cqueue, opcode, types, IoUring};
use proto::wire::frame::FrameDecoder;
use tokio::sync::mpsc;

use super::{
    AcceptFailures, OpenConns, Peer, ShardStart, ACCEPT_BACKOFF, CLOSE_GRACE, INBOX_BATCH, SHUTDOWN_DRAIN, TICK,
};
use proto::shard::stats::Stats;
use proto::shard::{Output, Shard, ShardMsg};

/// Accepts kept in flight per shard.
const ACCEPTS: usize = 16;
/// Receive buffers shared by a shard's connections, and their size. A frame is at most a
/// few hundred bytes; a connection's receive that finds no buffer ends and is re-armed.
const NBUFS: u16 = 1024;
const BUF_SIZE: usize = 2048;
const BGID: u16 = 0;

// A completion's user data: kind (8 bits) | generation (24 bits) | slot (32 bits).
const K_ACCEPT: u64 = 1;
const K_RECV: u64 = 2;
const K_SEND: u64 = 3;
const K_CLOSE: u64 = 4;
const K_WAKE: u64 = 5;
const K_CANCEL: u64 = 6;

fn tag(kind: u64, gen: u32, slot: u32) -> u64 {
    (kind << 56) | (((gen & 0xFF_FFFF) as u64) << 32) | slot as u64
}

fn untag(ud: u64) -> (u64, u32, u32) {
    (ud >> 56, ((ud >> 32) & 0xFF_FFFF) as u32, ud as u32)
}

/// True if a manager ring can be set up here (io_uring allowed, sparse file tables and
/// provided buffer rings, SINGLE_ISSUER + DEFER_TASKRUN: Linux 6.1 or later).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| build_ring(4).is_ok())
}

fn build_ring(table: u32) -> io::Result<Ring> {
    let mut b = IoUring::builder();
    b.setup_single_issuer().setup_defer_taskrun().setup_cqsize(16384);
    Ring::new(b.build(1024)?, table)
}

/// The size of a shard's direct-descriptor table: the soft RLIMIT_NOFILE (the most the
/// kernel allows for one ring).
pub fn table_size() -> u32 {
    crate::uring::table_limit().unwrap_or(1024).clamp(16, 1 << 20) as u32
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

struct AcceptBuf {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

struct Conn {
    id: u64,
    gen: u32,
    decoder: FrameDecoder,
    /// Frames still read and handed to the core (false after a framing error).
    reading: bool,
    recv_armed: bool,
    /// Bytes being sent (stable until the SEND completes) and how far.
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
    close_sent: bool,
}

/// The shard's ring and the memory it owns for its operations: the receive buffers and the
/// bytes of each send in flight. Dropping it cancels every operation and waits for their
/// completions before freeing that memory (leaking it past [`TEARDOWN_BOUND`]).
struct Ring {
    ring: IoUring,
    /// Freed in `Drop` only once no operation that selects from it is left.
    bufs: ManuallyDrop<BufRing>,
    /// The bytes of each send in flight, by its user data, handed back by its completion.
    sends: HashMap<u64, Vec<u8>>,
    /// Entries queued or in flight whose last completion has not been reaped.
    ops: usize,
    /// Some operation could not be ended: the memory is leaked, not freed.
    leak: bool,
    last_push_warning: Option<Instant>,
}

impl Ring {
    fn new(ring: IoUring, table: u32) -> io::Result<Ring> {
        ring.submitter().register_files_sparse(table)?;
        let bufs = BufRing::new(NBUFS, BUF_SIZE)?;
        // SAFETY: `bufs` is registered once, with this ring, as group BGID, whose buffer ids
        // only `Io::reap` takes; the Ring frees it only once no operation is left (`Drop`).
        unsafe { bufs.register(&ring, BGID)? };
        Ok(Ring {
            ring,
            bufs: ManuallyDrop::new(bufs),
            sends: HashMap::new(),
            ops: 0,
            leak: false,
            last_push_warning: None,
        })
    }

    /// Queue `e` (submitting first if the queue is full); false if it could not be queued,
    /// and then the operation does not exist: the caller must not wait for its completion.
    ///
    /// # Safety
    /// Whatever memory `e` points at stays valid (and, for what the kernel reads, unchanged)
    /// until the entry's last completion is reaped, or is leaked.
    unsafe fn push(&mut self, e: &io_uring::squeue::Entry) -> bool {
        // SAFETY: the caller keeps the memory `e` points at valid until its completion.
        let queued = unsafe {
            self.ring.submission().push(e).is_ok() || {
                let _ = self.ring.submit();
                self.ring.submission().push(e).is_ok()
            }
        };
        if queued {
            self.ops += 1;
        } else {
            let now = Instant::now();
            if self.last_push_warning.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                self.last_push_warning = Some(now);
                tracing::warn!("io_uring submission queue full and not submitted; the operation is retried later");
            }
        }
        queued
    }

    /// Queue an entry that carries no pointer to memory: a cancellation (by user data), a
    /// close or a poll.
    fn push_plain(&mut self, e: PlainOp) -> bool {
        let e = match e {
            PlainOp::Cancel(ud) => opcode::AsyncCancel::new(ud).build().user_data(tag(K_CANCEL, 0, 0)),
            PlainOp::CancelAll => {
                opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(tag(K_CANCEL, 0, 0))
            }
            PlainOp::Close { slot, ud } => opcode::Close::new(types::Fixed(slot)).build().user_data(ud),
            PlainOp::Poll { fd, ud } => opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(ud),
        };
        // SAFETY: these entries point at no memory (a user data, a file-table slot, a
        // descriptor).
        unsafe { self.push(&e) }
    }

    /// Arm the multishot receive of connection `slot`, drawing from `bufs`.
    fn recv(&mut self, slot: u32, ud: u64) -> bool {
        let e = opcode::RecvMulti::new(types::Fixed(slot), BGID).build().user_data(ud);
        // SAFETY: the buffers it selects are `bufs`, which this Ring frees only once no
        // operation is left (`Drop`).
        unsafe { self.push(&e) }
    }

    /// Send `data[from..]` on connection `slot`; the Ring holds `data` until the completion
    /// (see `Io::reap`). Hands `data` back if the send could not be queued.
    fn send(&mut self, slot: u32, data: Vec<u8>, from: usize, ud: u64) -> Result<(), Vec<u8>> {
        if from >= data.len() || self.sends.contains_key(&ud) {
            return Err(data);
        }
        let rest = &data[from..];
        let e = opcode::Send::new(types::Fixed(slot), rest.as_ptr(), rest.len().min(u32::MAX as usize) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud);
        // SAFETY: `data` moves into `sends` (its heap buffer stays where it is) and leaves it
        // only at this entry's completion, or with the Ring's memory once nothing is left
        // (`Drop`); nothing changes it meanwhile.
        if !unsafe { self.push(&e) } {
            return Err(data);
        }
        self.sends.insert(ud, data);
        Ok(())
    }

    /// Cancel every operation and reap until none is left or `bound` has passed (their
    /// completions are dropped). True if none is left.
    fn quiesce(&mut self, bound: Duration) -> bool {
        let end = Instant::now() + bound;
        let mut cancelled = false;
        while self.ops > 0 {
            if !cancelled {
                cancelled = self.push_plain(PlainOp::CancelAll);
            }
            let left = end.saturating_duration_since(Instant::now());
            let wait = left.min(Duration::from_millis(10));
            let ts = types::Timespec::new().sec(wait.as_secs()).nsec(wait.subsec_nanos());
            let entered = match self.ring.submitter().submit_with_args(1, &types::SubmitArgs::new().timespec(&ts)) {
                Ok(_) => true,
                Err(e) => matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)),
            };
            for cqe in self.ring.completion() {
                if !cqueue::more(cqe.flags()) {
                    self.ops = self.ops.saturating_sub(1);
                }
            }
            if !entered || left.is_zero() {
                break;
            }
        }
        self.ops == 0
    }
}

/// An entry that points at no memory.
enum PlainOp {
    Cancel(u64),
    CancelAll,
    Close { slot: u32, ud: u64 },
    Poll { fd: i32, ud: u64 },
}

impl Drop for Ring {
    fn drop(&mut self) {
        if !self.leak && self.quiesce(TEARDOWN_BOUND) {
            // SAFETY: `bufs` is dropped once, here, and not used afterwards. No operation
            // that selects from it is left, and none is submitted from now on (the ring is
            // closed right after, by its field's drop).
            unsafe { ManuallyDrop::drop(&mut self.bufs) };
        } else {
            if !self.leak {
                teardown_leaked("manager shard ring", self.ops);
            }
            std::mem::forget(std::mem::take(&mut self.sends));
        }
    }
}

struct Io {
    r: Ring,
    core: Shard,
    stats: Arc<Stats>,
    open: Arc<OpenConns>,
    peers: Vec<Peer>,
    conn_queue: usize,
    /// Connections by direct-descriptor slot.
    slots: Vec<Option<Conn>>,
    by_id: HashMap<u64, u32>,
    next_gen: u32,
    /// Slots with frames to send or a close to advance.
    dirty: Vec<u32>,
    /// Each accept's address buffer, which the kernel writes while the ACCEPT is in
    /// flight: boxed so that its address never moves, whatever happens to the vector.
    #[allow(clippy::vec_box)]
    accepts: Vec<Box<AcceptBuf>>,
    accept_armed: Vec<bool>,
    accept_resume: Option<Instant>,
    failures: AcceptFailures,
    /// Direct-descriptor slots in the table, and slots taken (accepted, not yet closed).
    /// Accepts are armed only while a slot is free for each: an accept that finds the table
    /// full has already taken the connection from the backlog, and the kernel drops it.
    table: u32,
    used: u32,
    /// The table was full at the last arm (a wait counted once in `accept_errors`).
    table_full: bool,
    listener: TcpListener,
    wake: Arc<Wake>,
    /// The poll of the wake-up eventfd is queued (else it is retried each turn).
    wake_armed: bool,
    stopping: bool,
}

/// The shard's end: the kernel may still write into the accepts' address buffers (and the
/// Ring's memory) until every operation has completed, so the Ring cancels them all and
/// waits first; if they do not all complete, the address buffers are leaked with the Ring's
/// memory rather than freed.
impl Drop for Io {
    fn drop(&mut self) {
        if !self.r.quiesce(TEARDOWN_BOUND) {
            teardown_leaked("manager shard ring", self.r.ops);
            self.r.leak = true;
            std::mem::forget(std::mem::take(&mut self.accepts));
        }
    }
}

/// Run one shard on this thread until `stop` turns true (then every connection gets ERROR
/// Shutdown and the thread waits up to [`SHUTDOWN_DRAIN`] for them to close).
pub fn shard_thread(start: ShardStart, wake: Arc<Wake>) {
    let ShardStart { init, addr, cfg, conn_queue, stats, open, mut inbox, peers, stop, ready } = start;
    let setup = (|| {
        let listener = bind_listener(addr)?;
        let table = table_size();
        let r = build_ring(table)?;
        Ok::<_, io::Error>((listener, r, table))
    })();
    let (listener, r, table) = match setup {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(listener.local_addr());
    let mut io = Io {
        r,
        core: Shard::new(init, cfg, stats.clone()),
        stats,
        open,
        peers,
        conn_queue,
        slots: Vec::new(),
        by_id: HashMap::new(),
        next_gen: 1,
        dirty: Vec::new(),
        accepts: (0..ACCEPTS)
            .map(|_| {
                // SAFETY: a zeroed sockaddr_storage is valid.
                Box::new(AcceptBuf { addr: unsafe { std::mem::zeroed() }, len: 0 })
            })
            .collect(),
        accept_armed: vec![false; ACCEPTS],
        accept_resume: None,
        failures: AcceptFailures::default(),
        table,
        used: 0,
        table_full: false,
        listener,
        wake,
        wake_armed: false,
        stopping: false,
    };
    for i in 0..ACCEPTS {
        io.arm_accept(i);
    }
    io.arm_wake();
    let mut next_tick = Instant::now() + TICK;
    let mut stop_deadline: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if !io.stopping && *stop.borrow() {
            io.begin_stop();
            stop_deadline = Some(now + SHUTDOWN_DRAIN);
        }
        if let Some(d) = stop_deadline {
            if now >= d || io.core.open_connections() == 0 {
                break;
            }
        }
        if now >= next_tick {
            io.core.handle_tick(now, crate::sys::unix_now());
            io.check_closing(now);
            next_tick = now + TICK;
        }
        if io.accept_resume.is_some_and(|t| now >= t) {
            io.accept_resume = None;
            for i in 0..ACCEPTS {
                io.arm_accept(i);
            }
        }
        if !io.wake_armed {
            io.arm_wake();
        }
        io.flush(now);
        let mut until = next_tick;
        if let Some(t) = io.accept_resume {
            until = until.min(t);
        }
        if let Some(d) = stop_deadline {
            until = until.min(d);
        }
        io.wait(until.saturating_duration_since(Instant::now()));
        io.reap(&mut inbox);
    }
    // Dropping `io` ends the ring's operations, then closes the ring, and with it every
    // direct descriptor (and the connections).
}

impl Io {
    fn arm_accept(&mut self, i: usize) {
        if self.accept_armed[i] || self.stopping || self.accept_resume.is_some() {
            return;
        }
        let armed = self.accept_armed.iter().filter(|a| **a).count() as u32;
        if self.used + armed >= self.table {
            if !std::mem::replace(&mut self.table_full, true) {
                // New connections wait in the listen backlog until a slot frees.
                self.failures.table_full(&self.stats, Instant::now(), self.table);
            }
            return;
        }
        self.table_full = false;
        let b = &mut self.accepts[i];
        b.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let e = opcode::Accept::new(
            types::Fd(self.listener.as_raw_fd()),
            &mut b.addr as *mut _ as *mut libc::sockaddr,
            &mut b.len,
        )
        // (No SOCK_CLOEXEC: a direct descriptor has no descriptor-table entry to close.)
        .file_index(Some(types::DestinationSlot::auto_target()))
        .build()
        .user_data(tag(K_ACCEPT, 0, i as u32));
        // SAFETY: the address buffer is boxed in `accepts`, which is neither changed nor
        // dropped while the accept is in flight: `accept_armed[i]` keeps it from being
        // re-armed until the completion, and `Drop for Io` ends every operation (or leaks
        // the buffers) before they are freed.
        if unsafe { self.r.push(&e) } {
            self.accept_armed[i] = true;
        } else {
            // Not queued: try again shortly (the accepts are re-armed then).
            self.accept_resume.get_or_insert(Instant::now() + ACCEPT_BACKOFF);
        }
    }

    fn arm_wake(&mut self) {
        self.wake_armed = self.r.push_plain(PlainOp::Poll { fd: self.wake_fd(), ud: tag(K_WAKE, 0, 0) });
    }

    fn wake_fd(&self) -> i32 {
        self.wake.as_raw_fd()
    }

    fn arm_recv(&mut self, slot: u32) {
        let Some(c) = self.slots.get_mut(slot as usize).and_then(|c| c.as_mut()) else { return };
        if c.recv_armed || c.closing.is_some() {
            return;
        }
        // Armed only once queued; if not, `advance` tries again.
        c.recv_armed = self.r.recv(slot, tag(K_RECV, c.gen, slot));
        if !c.recv_armed {
            self.dirty.push(slot);
        }
    }

    fn wait(&mut self, timeout: Duration) {
        let ts = types::Timespec::new().sec(timeout.as_secs()).nsec(timeout.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.r.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
            Err(e) => tracing::warn!("io_uring wait failed: {e}"),
        }
    }

    fn reap(&mut self, inbox: &mut mpsc::UnboundedReceiver<ShardMsg>) {
        loop {
            let mut batch: [(u64, i32, u32); 64] = [(0, 0, 0); 64];
            let mut n = 0;
            for cqe in self.r.ring.completion() {
                batch[n] = (cqe.user_data(), cqe.result(), cqe.flags());
                n += 1;
                if n == batch.len() {
                    break;
                }
            }
            if n == 0 {
                break;
            }
            let now = Instant::now();
            for &(ud, res, flags) in &batch[..n] {
                let (kind, gen, slot) = untag(ud);
                if !cqueue::more(flags) {
                    // The operation's last completion: the kernel is done with it.
                    self.r.ops = self.r.ops.saturating_sub(1);
                }
                match kind {
                    K_ACCEPT => self.on_accept(now, slot as usize, res),
                    K_RECV => {
                        // SAFETY: the completion was just reaped from the shard's ring, whose
                        // receives all select from `bufs` (group BGID); its buffer is taken
                        // here, once, and `on_recv` gives it back.
                        let bid = cqueue::buffer_select(flags).filter(|&b| unsafe { self.r.bufs.take(b) });
                        self.on_recv(now, slot, gen, res, bid, cqueue::more(flags))
                    }
                    K_SEND => {
                        let data = self.r.sends.remove(&ud).unwrap_or_default();
                        self.on_send(now, slot, gen, res, data)
                    }
                    K_CLOSE => self.on_closed(now, slot, gen),
                    K_WAKE => {
                        self.wake_armed = false;
                        self.wake.clear();
                        self.arm_wake();
                        let mut taken = 0;
                        while let Ok(m) = inbox.try_recv() {
                            self.core.handle_msg(now, m);
                            taken += 1;
                            if taken % INBOX_BATCH == 0 {
                                self.flush(now);
                            }
                        }
                    }
                    _ => {}
                }
            }
            self.r.bufs.publish();
            self.flush(now);
        }
    }

    fn on_accept(&mut self, now: Instant, i: usize, res: i32) {
        self.accept_armed[i] = false;
        if res < 0 {
            if res == -libc::ECANCELED || self.stopping {
                return;
            }
            self.accept_failed(now, io::Error::from_raw_os_error(-res));
            return;
        }
        let slot = res as u32;
        self.used += 1;
        let peer = {
            let b = &self.accepts[i];
            sockaddr_of(&b.addr).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
        };
        self.arm_accept(i);
        let before = self.open.opened();
        let id = self.core.conn_opened(now, peer, before);
        let gen = self.next_gen;
        self.next_gen = (self.next_gen + 1) & 0xFF_FFFF;
        if self.slots.len() <= slot as usize {
            self.slots.resize_with(slot as usize + 1, || None);
        }
        self.slots[slot as usize] = Some(Conn {
            id,
            gen,
            decoder: FrameDecoder::new(),
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
            close_sent: false,
        });
        self.by_id.insert(id, slot);
        self.arm_recv(slot);
    }

    /// The shared policy ([`AcceptFailures`]): a pause leaves the pending connections in the
    /// backlog; a routine failure re-arms at once.
    fn accept_failed(&mut self, now: Instant, e: io::Error) {
        match self.failures.failed(&self.stats, now, &e) {
            Some(pause) => {
                self.accept_resume.get_or_insert(now + pause);
            }
            None => {
                for i in 0..ACCEPTS {
                    self.arm_accept(i);
                }
            }
        }
    }

    fn conn(&mut self, slot: u32, gen: u32) -> Option<&mut Conn> {
        self.slots.get_mut(slot as usize).and_then(|c| c.as_mut()).filter(|c| c.gen == gen)
    }

    /// A receive completion, with the buffer it named (taken from the kernel).
    fn on_recv(&mut self, now: Instant, slot: u32, gen: u32, res: i32, bid: Option<u16>, more: bool) {
        let Some(c) = self.conn(slot, gen) else {
            if let Some(b) = bid {
                self.r.bufs.provide(b);
            }
            return;
        };
        if !more {
            c.recv_armed = false;
        }
        if res > 0 {
            let Some(b) = bid else {
                // A receive without a buffer cannot happen with buffer select; treat as lost.
                self.lost(slot);
                return;
            };
            let data = self.r.bufs.get(b, res as usize);
            let c = self.slots[slot as usize].as_mut().expect("checked above");
            if c.reading && c.closing.is_none() {
                c.decoder.push(data);
                let id = c.id;
                loop {
                    let c = self.slots[slot as usize].as_mut().expect("checked above");
                    match c.decoder.next_frame() {
                        Ok(Some(f)) => self.core.conn_frame(now, id, f),
                        Ok(None) => break,
                        Err(e) => {
                            c.reading = false;
                            self.core.conn_error(now, id, &e);
                            break;
                        }
                    }
                }
            }
            self.r.bufs.provide(b);
            if !more {
                self.arm_recv(slot);
                // A closing connection waits for its receive to end.
                self.mark(slot);
            }
            return;
        }
        if let Some(b) = bid {
            self.r.bufs.provide(b);
        }
        match res {
            // Out of receive buffers: the data waits in the socket; receive again.
            r if r == -libc::ENOBUFS => {
                if !more {
                    self.arm_recv(slot);
                }
            }
            // Cancelled by our close: the close goes on.
            r if r == -libc::ECANCELED => self.mark(slot),
            // End of stream, or a reset: the peer is gone.
            _ => self.lost(slot),
        }
    }

    /// A send completed, handing back its bytes.
    fn on_send(&mut self, now: Instant, slot: u32, gen: u32, res: i32, data: Vec<u8>) {
        let Some(c) = self.conn(slot, gen) else { return };
        c.sending = false;
        c.inflight = data;
        if res < 0 {
            let _ = now;
            self.lost(slot);
            return;
        }
        c.sent += res as usize;
        if c.sent < c.inflight.len() && !c.cancel_sent && !c.abort {
            // A short write: send the rest.
            self.submit_send(slot);
        } else {
            // Sent; or a close gave up on it (its cancellations went out, and a send queued
            // now would never be cancelled: a peer that does not read would hold the
            // connection open for good).
            c.inflight.clear();
            c.sent = 0;
            self.mark(slot);
        }
    }

    fn on_closed(&mut self, now: Instant, slot: u32, gen: u32) {
        let Some(c) = self.conn(slot, gen) else { return };
        let id = c.id;
        self.slots[slot as usize] = None;
        self.by_id.remove(&id);
        self.used -= 1;
        if self.core.conn_closed(now, id) {
            self.open.closed();
        }
        if self.table_full {
            for i in 0..ACCEPTS {
                self.arm_accept(i);
            }
        }
    }

    /// The peer is gone (end of stream, reset, failed send): close without flushing.
    fn lost(&mut self, slot: u32) {
        if let Some(c) = self.slots.get_mut(slot as usize).and_then(|c| c.as_mut()) {
            c.abort = true;
            c.pending.clear();
            c.closing.get_or_insert(Instant::now());
            self.mark(slot);
        }
    }

    fn mark(&mut self, slot: u32) {
        self.dirty.push(slot);
    }

    /// Send `inflight[sent..]`; the ring holds the bytes until the completion. `sending` is
    /// set only once the send is queued: if it is not, the bytes stay here and `advance`
    /// tries again.
    fn submit_send(&mut self, slot: u32) {
        let Some(c) = self.slots.get_mut(slot as usize).and_then(|c| c.as_mut()) else { return };
        let data = std::mem::take(&mut c.inflight);
        match self.r.send(slot, data, c.sent, tag(K_SEND, c.gen, slot)) {
            Ok(()) => c.sending = true,
            Err(data) => {
                c.inflight = data;
                self.dirty.push(slot);
            }
        }
    }

    /// Move the core's output to connections and other shards, then start sends and
    /// advance closes.
    fn flush(&mut self, now: Instant) {
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
                        frame.encode(&mut c.pending);
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
            }
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &slot in &dirty {
            self.advance(now, slot);
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    fn advance(&mut self, now: Instant, slot: u32) {
        // (A receive whose submission failed is armed again here.)
        self.arm_recv(slot);
        let Some(c) = self.slots.get_mut(slot as usize).and_then(|c| c.as_mut()) else { return };
        // No send starts once a close has given up on flushing (past its grace, or its
        // cancellations sent): nothing would cancel it.
        let flushing = c.closing.is_none_or(|d| now < d) && !c.cancel_sent;
        if !c.sending && !c.abort && flushing {
            if c.inflight.is_empty() && !c.pending.is_empty() {
                std::mem::swap(&mut c.inflight, &mut c.pending);
                c.pending_frames = 0;
                c.sent = 0;
            }
            // New frames, or bytes whose send could not be queued before.
            if c.sent < c.inflight.len() {
                self.submit_send(slot);
                return;
            }
        }
        let Some(deadline) = c.closing else { return };
        let flushed = !c.sending && c.pending.is_empty() && c.inflight.is_empty();
        let gen = c.gen;
        if !flushed && !c.abort && now < deadline {
            return;
        }
        // Stop the receive and any send still in flight, then close. (`recv_armed` and
        // `sending` are set only for operations that were queued, so each of them ends with
        // a completion that clears it.)
        if (c.recv_armed || c.sending) && !c.cancel_sent {
            let (recv, send) = (c.recv_armed, c.sending);
            let recv_ok = !recv || self.r.push_plain(PlainOp::Cancel(tag(K_RECV, gen, slot)));
            let send_ok = !send || self.r.push_plain(PlainOp::Cancel(tag(K_SEND, gen, slot)));
            if recv_ok && send_ok {
                c.cancel_sent = true;
            } else {
                self.dirty.push(slot);
            }
            return;
        }
        if c.recv_armed || c.sending || c.close_sent {
            return;
        }
        c.close_sent = self.r.push_plain(PlainOp::Close { slot, ud: tag(K_CLOSE, gen, slot) });
        if !c.close_sent {
            self.dirty.push(slot);
        }
    }

    /// Closing connections whose flush took longer than [`CLOSE_GRACE`] (a peer that does
    /// not read): force them on.
    fn check_closing(&mut self, now: Instant) {
        for slot in 0..self.slots.len() as u32 {
            if let Some(c) = &self.slots[slot as usize] {
                if c.closing.is_some_and(|d| now >= d) && !c.close_sent {
                    self.dirty.push(slot);
                }
            }
        }
    }

    fn begin_stop(&mut self) {
        self.stopping = true;
        for i in 0..ACCEPTS {
            if self.accept_armed[i] {
                // (Not queued: the ring's end cancels it anyway.)
                self.r.push_plain(PlainOp::Cancel(tag(K_ACCEPT, 0, i as u32)));
            }
        }
        self.core.shutdown();
    }
}

fn sockaddr_of(st: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match st.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(st as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::from((u32::from_be(a.sin_addr.s_addr).to_be_bytes(), u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(st as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::from((a.sin6_addr.s6_addr, u16::from_be(a.sin6_port))))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::shard::{ShardConfig, ShardInit};
    use std::io::Read;
    use std::os::fd::RawFd;

    /// An `Io` around `r`, with a core of its own (one shard) and a listener on loopback.
    fn test_io(r: Ring) -> Io {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let stats = Arc::new(Stats::default());
        let init = ShardInit { index: 0, n: 1, seed: 1, token_key: [1; 32], unix_secs: 0 };
        let core = Shard::new(init, ShardConfig::default(), stats.clone());
        Io {
            r,
            core,
            stats,
            open: Arc::new(OpenConns::default()),
            peers: Vec::new(),
            conn_queue: 64,
            slots: Vec::new(),
            by_id: HashMap::new(),
            next_gen: 1,
            dirty: Vec::new(),
            accepts: (0..ACCEPTS)
                .map(|_| {
                    // SAFETY: a zeroed sockaddr_storage is valid.
                    Box::new(AcceptBuf { addr: unsafe { std::mem::zeroed() }, len: 0 })
                })
                .collect(),
            accept_armed: vec![false; ACCEPTS],
            accept_resume: None,
            failures: AcceptFailures::default(),
            table: 4,
            used: 0,
            table_full: false,
            listener,
            wake: Wake::new().unwrap(),
            wake_armed: false,
            stopping: false,
        }
    }

    /// A connection in file-table entry `slot` of `io`'s ring, as if accepted (generation 7),
    /// and the peer's end of it.
    fn open_conn(io: &mut Io, slot: u32) -> std::net::TcpStream {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (peer, _) = l.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // The table holds the socket from here; our descriptor closes when `ours` drops.
        io.r.ring.submitter().register_files_update(slot, &[ours.as_raw_fd()]).unwrap();
        if io.slots.len() <= slot as usize {
            io.slots.resize_with(slot as usize + 1, || None);
        }
        let id = 100 + slot as u64;
        io.slots[slot as usize] = Some(Conn {
            id,
            gen: 7,
            decoder: FrameDecoder::new(),
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
            close_sent: false,
        });
        io.by_id.insert(id, slot);
        io.used += 1;
        peer
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

    /// The shard's end ends the ring's operations before it frees what they use: an ACCEPT
    /// still in flight when the ring closes would write the next connection's address into
    /// a freed buffer (the kernel tears a closed ring down later, in the background). A
    /// duplicate of the ring's descriptor holds that moment still: a connection made after
    /// the end must wait in the listener's backlog, not be taken by the old accept.
    #[test]
    fn the_shards_end_ends_its_operations_before_freeing_their_memory() {
        let mut io = test_io(build_ring(4).unwrap());
        let listener = io.listener.try_clone().unwrap();
        listener.set_nonblocking(true).unwrap();
        io.arm_accept(0);
        // A connection with its receive armed and a send in flight, too.
        let _peer = open_conn(&mut io, 1);
        io.arm_recv(1);
        let c = io.slots[1].as_mut().unwrap();
        c.pending.extend_from_slice(b"frame");
        c.pending_frames = 1;
        io.mark(1);
        io.flush(Instant::now());
        assert!(io.slots[1].as_ref().unwrap().recv_armed && io.slots[1].as_ref().unwrap().sending);
        io.r.ring.submit().unwrap();
        // SAFETY: a duplicate of the ring's descriptor, closed below.
        let dup = unsafe { libc::dup(io.r.ring.as_raw_fd()) };
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
        let mut b = IoUring::builder();
        b.setup_single_issuer().setup_defer_taskrun().setup_r_disabled();
        let mut io = test_io(Ring::new(b.build(4).unwrap(), 4).unwrap());
        let mut peer = open_conn(&mut io, 0);
        for _ in 0..4 {
            // Cancellations of nothing fill the queue.
            assert!(io.r.push_plain(PlainOp::Cancel(0)));
        }
        let c = io.slots[0].as_mut().unwrap();
        c.pending.extend_from_slice(b"hello");
        c.pending_frames = 1;
        io.mark(0);
        io.flush(Instant::now());
        let c = io.slots[0].as_ref().unwrap();
        assert!(!c.sending, "marked sending, though the send was not queued");
        assert!(!c.recv_armed, "marked receiving, though the receive was not queued");
        assert_eq!(&c.inflight[c.sent..], b"hello", "the bytes were lost");
        io.r.ring.submitter().register_enable_rings().unwrap();
        assert!(
            turns(&mut io, 200, |io| io.slots[0].as_ref().is_some_and(|c| !c.sending && c.inflight.is_empty())),
            "the send never went out"
        );
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        io.slots[0].as_mut().unwrap().closing = Some(Instant::now());
        io.mark(0);
        assert!(turns(&mut io, 200, |io| io.slots[0].is_none()), "the connection never closed");
    }

    /// A short send that completes after the close has sent its cancellations (it sent part
    /// before the cancellation found it) is not sent on, and frames still queued do not go
    /// out: a send queued then would never be cancelled, and a peer that does not read would
    /// hold the connection open for good.
    #[test]
    fn a_send_completing_after_the_close_gave_up_is_not_sent_on() {
        let mut io = test_io(build_ring(4).unwrap());
        let mut peer = open_conn(&mut io, 0);
        let c = io.slots[0].as_mut().unwrap();
        c.closing = Some(Instant::now());
        c.sending = true;
        c.cancel_sent = true;
        c.pending.extend_from_slice(b"late frame");
        c.pending_frames = 1;
        // 10 bytes of 8 MiB went out: the rest would fill the socket of a peer that does
        // not read, and stay in flight.
        io.on_send(Instant::now(), 0, 7, 10, vec![1; 8 << 20]);
        assert!(!io.slots[0].as_ref().unwrap().sending, "the rest was sent after the cancellation");
        assert!(turns(&mut io, 200, |io| io.slots[0].is_none()), "the connection never closed");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "{} bytes went out after the close gave up", got.len());
    }
}
