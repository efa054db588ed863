//! io_uring UDP primitives (Linux): the building block of the io_uring driver.
//!
//! * Receive: one multishot RECVMSG (`IORING_RECV_MULTISHOT`) draws a buffer from a
//!   provided buffer ring for every datagram; the completion names the buffer, which is
//!   recycled into the ring as soon as the caller has looked at it. One submission serves
//!   any number of datagrams.
//! * Send: [`Ring::push_send`] queues SEND entries (connected socket, or an explicit
//!   destination); a whole timer tick goes to the kernel in one `io_uring_enter`.
//! * Wait: [`Ring::submit_and_wait`] waits for `want` completions or a deadline, whichever
//!   comes first: on this machine kind, receiver wake-ups are the largest cost per packet,
//!   so batching them matters more than anything else.
//!
//! Nearly all `unsafe` of the engine lives here (the rest: the socket-buffer and eventfd
//! calls in the driver, the manager's shard ring). The invariants:
//! * Everything the kernel reads or writes for an operation is owned by the [`Ring`]
//!   until the operation's last completion is reaped: the receive buffers and their ring,
//!   the multishot `msghdr` (boxed, so its address is stable), the send slots and their
//!   addresses, each connect's address and each stream send's bytes. The one exception is
//!   [`Ring::push_send`], an `unsafe fn` whose caller keeps its buffer.
//! * A receive buffer is readable only between the completion that named it and its return
//!   to the kernel ([`BufRing`] tracks which buffers the kernel holds).
//! * Closing a ring does not end its operations (the kernel cancels them in the background,
//!   later), so dropping a [`Ring`] cancels them and waits for their completions before
//!   it frees their memory, and leaks the memory if they do not all come within a bound.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, types, IoUring};

// A completion's user data: a kind in the top byte, an index below.
const KIND_SHIFT: u32 = 56;
const INDEX_MASK: u64 = (1 << KIND_SHIFT) - 1;
/// A send from an owned slot (index: the slot).
const K_SLOT: u64 = 0;
/// A send queued with [`Ring::push_send`] (caller-owned buffer).
const K_RAW: u64 = 1;
/// The multishot receive of a socket (index: the socket).
const K_RECV: u64 = 2;
/// A readiness poll (index: the caller's token).
const K_POLL: u64 = 3;
/// A cancellation request (its own completion is ignored).
const K_CANCEL: u64 = 4;
/// A connect (index: the caller's token; its address is in `connect_addrs`).
const K_OP: u64 = 5;
/// A send on a stream socket (index: the caller's token; its bytes are in `stream_sends`).
const K_STREAM_SEND: u64 = 6;
/// The multishot receive of a stream socket (index: the caller's token).
const K_STREAM: u64 = 7;
/// An accept into the file table (index: the caller's token).
const K_ACCEPT: u64 = 8;
const BGID: u16 = 0;

const fn tag(kind: u64, index: u64) -> u64 {
    (kind << KIND_SHIFT) | (index & INDEX_MASK)
}

/// `SOL_UDP` socket options (not in the libc crate for every target).
const SOL_UDP: libc::c_int = 17;
const UDP_GRO: libc::c_int = 104;
/// Room for the control messages a receive may carry (one `UDP_GRO` int).
const CONTROL_LEN: usize = 32;

/// Ask the kernel to coalesce a burst of same-size datagrams from one sender into one
/// receive (UDP GRO; on loopback and veth this keeps a sender's GSO burst whole). The ring
/// splits such a receive back into datagrams, so callers see no difference. Returns false if
/// the kernel refused.
pub fn enable_gro(fd: RawFd) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a c_int of the stated size.
    unsafe {
        libc::setsockopt(
            fd,
            SOL_UDP,
            UDP_GRO,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// The most entries one ring's file table may have ([`Ring::register_table`]): the soft
/// RLIMIT_NOFILE, or `None` if it cannot be read.
pub fn table_limit() -> Option<u64> {
    // SAFETY: getrlimit writes the struct we pass.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        (libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0).then_some(r.rlim_cur)
    }
}

/// A socket the ring works on: a descriptor of the process, or a *direct descriptor*, an
/// entry of the ring's own file table ([`Ring::register_table`], [`Ring::install`]),
/// which is not in the process's descriptor table and so not bounded by what is left of
/// RLIMIT_NOFILE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sock {
    /// A file descriptor.
    Fd(RawFd),
    /// An index in the ring's file table.
    Fixed(u32),
}

/// Build an entry with `$t` bound to the ring's form of `$sock` (`types::Fd` or
/// `types::Fixed`, which the opcodes take as different types).
macro_rules! on_sock {
    ($sock:expr, |$t:ident| $body:expr) => {
        match $sock {
            Sock::Fd(fd) => {
                let $t = types::Fd(fd);
                $body
            }
            Sock::Fixed(ix) => {
                let $t = types::Fixed(ix);
                $body
            }
        }
    };
}

/// The kinds of operation a caller's token names, for [`Ring::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// [`Ring::poll`].
    Poll,
    /// [`Ring::connect`].
    Op,
    /// [`Ring::send_stream`].
    Send,
    /// [`Ring::recv_stream`].
    Receive,
    /// [`Ring::accept`].
    Accept,
}

/// One completion reaped by [`Ring::drain_with`].
#[derive(Debug)]
pub enum Completion<'a> {
    /// A datagram arrived on socket `socket` (0 for the socket given at construction,
    /// else the index [`Ring::add_socket`] returned).
    Recv {
        /// The receiving socket's index.
        socket: u32,
        /// The sender (None if the kernel reported no usable address).
        from: Option<SocketAddr>,
        /// The datagram.
        data: &'a [u8],
    },
    /// A poll queued with [`Ring::poll`] fired: `result` is the ready event mask, or a
    /// negative errno (`-ECANCELED` after [`Ring::cancel_poll`]).
    Poll {
        /// The caller's token.
        token: u32,
        /// Events or negative errno.
        result: i32,
    },
    /// A connect ([`Ring::connect`]) completed: `result` is 0 or a negative errno
    /// (`-ECANCELED` after [`Ring::cancel`]).
    Op {
        /// The caller's token.
        token: u32,
        /// Return value or negative errno.
        result: i32,
    },
    /// A stream send ([`Ring::send_stream`]) completed: `result` is the bytes sent or a
    /// negative errno (`-ECANCELED` after [`Ring::cancel`]), and `data` the buffer the
    /// ring held until now, handed back whole.
    Sent {
        /// The caller's token.
        token: u32,
        /// Bytes sent (from the offset the send started at) or a negative errno.
        result: i32,
        /// The buffer given to [`Ring::send_stream`].
        data: Vec<u8>,
    },
    /// An accept ([`Ring::accept`]) completed: `result` is the file-table entry the new
    /// connection was put in, or a negative errno (`-ECANCELED` after [`Ring::cancel`]);
    /// `peer` is its remote address.
    Accepted {
        /// The caller's token.
        token: u32,
        /// The new connection's entry in the file table, or a negative errno.
        result: i32,
        /// The remote address (None on an error, or an address family it cannot read).
        peer: Option<SocketAddr>,
    },
    /// The multishot receive of a stream socket ([`Ring::recv_stream`]) produced: bytes
    /// (`result` > 0, in `data`), the end of the stream (0) or an error (negative errno;
    /// `-ENOBUFS` when every receive buffer was in use). With `more` false the receive has
    /// ended and must be armed again to go on.
    Stream {
        /// The caller's token.
        token: u32,
        /// Bytes received, 0 at the end of the stream, or a negative errno.
        result: i32,
        /// The bytes.
        data: &'a [u8],
        /// The receive is still armed.
        more: bool,
    },
}

struct RecvSocket {
    sock: Sock,
    armed: bool,
    active: bool,
    /// Datagrams taken from it in the current drain round.
    burst: u32,
}

/// Datagrams one run of a multishot receive takes from a socket before the kernel requeues
/// it behind other task work (`MULTISHOT_MAX_RETRY` + 1 on Linux 6.x). With DEFER_TASKRUN a
/// requeued receive runs only at the next `io_uring_enter`, so a socket that yields this
/// many in one drain round probably has more waiting.
const MULTISHOT_RUN: u32 = 32;

/// Extra enters one drain makes to empty sockets that hit [`MULTISHOT_RUN`] (bounding the
/// time a drain keeps the thread from its timers: about 500 datagrams per socket).
const MAX_BACKLOG_ROUNDS: u32 = 16;

/// How a ring is used, which decides its setup flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingMode {
    /// One thread owns the ring and waits on it with [`Ring::submit_and_wait`]: receive
    /// rings defer completion work to the wait (SINGLE_ISSUER + DEFER_TASKRUN), send rings
    /// skip the interrupts (COOP_TASKRUN).
    Dedicated,
    /// The ring is driven from an event loop that may run on several threads and learns of
    /// completions through an eventfd ([`Ring::register_eventfd`]): default flags, so
    /// completions are posted (and the eventfd signalled) as datagrams arrive.
    Shared,
}

/// Counters of a [`Ring`].
#[derive(Debug, Default, Clone, Copy)]
pub struct UringCounters {
    /// Datagrams received.
    pub received: u64,
    /// Sends completed successfully.
    pub sent: u64,
    /// Sends that completed with an error.
    pub send_errors: u64,
    /// Receive completions with an error (other than running out of buffers).
    pub recv_errors: u64,
    /// Times the ring ran out of receive buffers (datagrams then wait in the socket).
    pub no_buffers: u64,
    /// Times the multishot receive had to be re-armed.
    pub rearms: u64,
    /// Receives that carried several coalesced datagrams (UDP GRO).
    pub gro_batches: u64,
    /// `io_uring_enter` calls made.
    pub enters: u64,
    /// Extra enters a drain made because a socket had a backlog (see `drain_with`).
    pub backlog_rounds: u64,
}

/// How long dropping a ring waits for its cancelled operations to complete before it leaks
/// the memory they use rather than free it (see `Drop for Ring`).
pub(crate) const TEARDOWN_BOUND: Duration = Duration::from_secs(1);

/// Rings dropped (or shut down) while operations were still in flight past the bound, whose
/// memory was leaked rather than freed under the kernel.
static LEAKED_TEARDOWNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Rings of this process whose teardown leaked their buffers because operations they had
/// started were still in flight after the bound (the kernel could still have written into
/// them): 0 unless a ring was dropped on a thread that cannot wait on it, or the kernel did
/// not complete a cancelled operation in time.
pub fn leaked_teardowns() -> u64 {
    LEAKED_TEARDOWNS.load(Ordering::Relaxed)
}

/// Count a teardown that leaked, and say so.
pub(crate) fn teardown_leaked(what: &str, ops: usize) {
    LEAKED_TEARDOWNS.fetch_add(1, Ordering::Relaxed);
    tracing::error!("{what}: {ops} io_uring operations still in flight at teardown; their memory is leaked, not freed");
}

/// The memory the kernel reads or writes on behalf of a ring's operations. It is freed only
/// once none of them is in flight, and leaked otherwise (see `Drop for Ring`).
struct KernelMem {
    /// The receive buffers (registered as group BGID).
    bufs: BufRing,
    /// The multishot receives' message header (read by the kernel).
    msghdr: Box<libc::msghdr>,
    /// Owned send slots for [`Ring::send_copy`]: payload bytes and destinations.
    slots: AnonMap,
    slot_addrs: Vec<libc::sockaddr_storage>,
    /// The address of each connect in flight, by token.
    connect_addrs: HashMap<u32, Box<libc::sockaddr_storage>>,
    /// The bytes of each stream send in flight, by token, handed back by its completion.
    stream_sends: HashMap<u32, Vec<u8>>,
    /// The address buffer of each accept in flight, by token (the kernel writes the peer's
    /// address and its length there).
    accept_addrs: HashMap<u32, Box<(libc::sockaddr_storage, libc::socklen_t)>>,
}

/// A UDP socket driven through io_uring. See the module docs.
pub struct Ring {
    /// Closed explicitly in `Drop`, once no operation is left (or after `mem` is leaked).
    ring: std::mem::ManuallyDrop<IoUring>,
    /// Freed in `Drop` only if no operation is left that can touch it; leaked otherwise.
    mem: std::mem::ManuallyDrop<KernelMem>,
    receive: bool,
    fd: RawFd,
    /// Sockets that delivered datagrams in the current drain round.
    touched: Vec<u32>,
    sockets: Vec<RecvSocket>,
    in_flight_sends: usize,
    free_slots: Vec<u16>,
    /// Entries queued or in flight whose last completion has not been reaped (a multishot
    /// receive counts until its final completion, the one without `IORING_CQE_F_MORE`).
    ops: usize,
    queued: usize,
    queued_sends: usize,
    /// Counters.
    pub counters: UringCounters,
}

// SAFETY: the raw pointers (in the msghdr, the mappings) refer to memory owned by this value,
// not shared with any other value; `&mut self` is needed to change it, so one thread at a
// time uses it. The kernel's view does not depend on the thread (a ring moved to a thread
// that cannot enter it fails to submit, and its drop leaks the memory: see `Drop`).
unsafe impl Send for Ring {}

/// Zeroed memory mapped straight from the kernel (anonymous, private): page-aligned, and
/// resident only once touched, so a pool of buffers of which a few are in use costs only
/// those few. (A `Vec` of the same size may come from the allocator's heap, which zeroes
/// it by writing, making the whole pool resident at once.) Unmapped on drop.
pub struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value; access goes through `&self`/`&mut self`.
unsafe impl Send for AnonMap {}

impl AnonMap {
    /// Map `len` bytes (none for 0).
    pub fn new(len: usize) -> io::Result<AnonMap> {
        if len == 0 {
            return Ok(AnonMap { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0 });
        }
        // SAFETY: an anonymous private mapping; checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(AnonMap { ptr: p as *mut u8, len })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the mapping, for the kernel to read or write.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Bytes `off..off + len` (clamped to the mapping). No slice ever covers the whole
    /// mapping: other parts of it may be in the kernel's hands at the same time.
    ///
    /// # Safety
    /// No operation the kernel may still carry out writes into this range while the slice
    /// lives (its completion has been reaped, or it was never handed to the kernel).
    pub unsafe fn range(&self, off: usize, len: usize) -> &[u8] {
        let off = off.min(self.len);
        let len = len.min(self.len - off);
        // SAFETY: `off..off + len` lies inside the mapping (clamped above), which the kernel
        // zero-initialised; the caller guarantees no kernel write to it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    /// Bytes `off..off + len` (clamped to the mapping), to write.
    ///
    /// # Safety
    /// No operation the kernel may still carry out reads or writes this range while the
    /// slice lives.
    pub unsafe fn range_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        let off = off.min(self.len);
        let len = len.min(self.len - off);
        // SAFETY: inside the mapping (clamped above); `&mut self` and the caller's guarantee
        // make this the only access to the range.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: mapped in `new` with this length, unmapped once.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }
}

/// A provided buffer ring (`IORING_REGISTER_PBUF_RING`): `nbufs` buffers of `size` bytes that
/// the kernel takes one at a time for buffer-select receives. Each buffer is either the
/// kernel's (provided, and perhaps being written) or the caller's (a completion named it,
/// [`BufRing::take`]): only the caller's can be read ([`BufRing::get`]) or given back
/// ([`BufRing::provide`]), so no slice ever covers memory the kernel may write, and no buffer
/// is in the kernel's hands twice. The memory is mapped here and unmapped on drop, so a
/// `BufRing` must outlive every operation that selects from it (see [`BufRing::register`]).
pub struct BufRing {
    /// The buffers, written by the kernel (hence not a `Vec` borrowed immutably).
    bufs: AnonMap,
    size: usize,
    nbufs: u16,
    mem: *mut BufRingEntry,
    len: usize,
    tail: u16,
    dirty: bool,
    /// One bit per buffer, set while the kernel holds it (provided, and not yet named by a
    /// completion that was taken).
    with_kernel: Vec<u64>,
}

// SAFETY: the mapping is owned by this value and used by one thread at a time.
unsafe impl Send for BufRing {}

impl BufRing {
    /// Map a ring of `nbufs` entries (a power of two, at most 32768) with every buffer in it.
    /// Register it with [`BufRing::register`] before use.
    pub fn new(nbufs: u16, size: usize) -> io::Result<BufRing> {
        if !nbufs.is_power_of_two() || nbufs > 32768 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "nbufs must be a power of two up to 32768"));
        }
        // A buffer's length is a u32 in the ring, and every buffer's address must lie inside
        // the mapping: a product that wrapped would map less than the buffers' addresses
        // span, and the kernel would write past it.
        let total = (nbufs as usize).checked_mul(size).filter(|_| size > 0 && size <= u32::MAX as usize);
        let Some(total) = total else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a receive buffer must be 1 to 4 GiB long, and all of them fit in the address space",
            ));
        };
        let len = nbufs as usize * std::mem::size_of::<BufRingEntry>();
        // SAFETY: an anonymous private mapping; checked for failure below. mmap gives page
        // alignment, which the buffer ring requires.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mem = mem as *mut BufRingEntry;
        let bufs = match AnonMap::new(total) {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: mapped just above with this length.
                unsafe { libc::munmap(mem as *mut libc::c_void, len) };
                return Err(e);
            }
        };
        let words = (nbufs as usize).div_ceil(64);
        let mut me = BufRing { bufs, size, nbufs, mem, len, tail: 0, dirty: false, with_kernel: vec![0; words] };
        for bid in 0..nbufs {
            me.provide(bid);
        }
        me.publish();
        Ok(me)
    }

    /// Register the ring as buffer group `bgid` of `ring`.
    ///
    /// # Safety
    /// * `self` must outlive every operation of `ring` that selects a buffer from group
    ///   `bgid`: the kernel writes into the buffers and reads the ring memory until each one's
    ///   last completion. Closing `ring` does not end them at once (the kernel tears a closed
    ///   ring down in the background), so reap their completions first, or leak `self`.
    /// * `self` is registered once, with one ring, and [`BufRing::take`] is given only the
    ///   buffer ids of that ring's completions for group `bgid`.
    pub unsafe fn register(&self, ring: &IoUring, bgid: u16) -> io::Result<()> {
        // SAFETY: `mem` is a page-aligned mapping of `nbufs` entries, as the kernel requires;
        // the caller keeps it, and the buffers its entries point at, alive while the kernel
        // may use them.
        unsafe { ring.submitter().register_buf_ring_with_flags(self.mem as u64, self.nbufs, bgid, 0) }
    }

    fn with_kernel(&self, bid: u16) -> bool {
        self.with_kernel[bid as usize / 64] & (1 << (bid % 64)) != 0
    }

    fn set_with_kernel(&mut self, bid: u16, held: bool) {
        let (w, bit) = (bid as usize / 64, 1u64 << (bid % 64));
        if held {
            self.with_kernel[w] |= bit;
        } else {
            self.with_kernel[w] &= !bit;
        }
    }

    /// Take buffer `bid` back from the kernel, as a completion named it
    /// (`IORING_CQE_F_BUFFER`): the kernel has written it and does not touch it again until
    /// it is provided. From now until [`BufRing::provide`], [`BufRing::get`] reads it.
    /// Returns false, and changes nothing, for an id outside the ring or a buffer the kernel
    /// does not hold.
    ///
    /// # Safety
    /// A completion reaped from the ring this buffer ring is registered with, of an operation
    /// that selected from its group, named `bid`; and this is the only `take` for that
    /// completion.
    pub unsafe fn take(&mut self, bid: u16) -> bool {
        if bid >= self.nbufs || !self.with_kernel(bid) {
            return false;
        }
        self.set_with_kernel(bid, false);
        true
    }

    /// The first `len` bytes of buffer `bid` (as the kernel filled them), between its
    /// [`BufRing::take`] and its [`BufRing::provide`]. Empty for an id outside the ring and
    /// for a buffer the kernel holds (it may be writing into it).
    pub fn get(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= self.nbufs || self.with_kernel(bid) {
            return &[];
        }
        // SAFETY: the range is buffer `bid` alone (never the other buffers, which the kernel
        // may be filling). The kernel gave `bid` back (`take`) and gets it again only from
        // `provide(bid)`, which needs `&mut self`, so not while this borrow lives.
        unsafe { self.bufs.range(bid as usize * self.size, len.min(self.size)) }
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.size
    }

    /// Give buffer `bid` back to the kernel (seen by it at the next [`BufRing::publish`]).
    /// Refuses (false) a `bid` outside the ring (its address would lie past the buffers, and
    /// the kernel would write there) and a buffer the kernel already holds (two receives
    /// would write into it, one while its reader reads it; and more entries than the ring
    /// has would overwrite ones the kernel has not consumed).
    pub fn provide(&mut self, bid: u16) -> bool {
        if bid >= self.nbufs || self.with_kernel(bid) {
            return false;
        }
        self.set_with_kernel(bid, true);
        let idx = (self.tail & (self.nbufs - 1)) as usize;
        // SAFETY: idx < nbufs, within the mapping; the buffer address is inside `bufs`
        // (bid < nbufs, and the mapping holds nbufs * size bytes). The entry at the tail is
        // not one the kernel reads: at most nbufs - 1 buffers are with the kernel besides
        // this one, so the published entries (head to tail) do not reach it.
        unsafe {
            let e = &mut *self.mem.add(idx);
            e.set_addr(self.bufs.as_ptr().add(bid as usize * self.size) as u64);
            e.set_len(self.size as u32);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        self.dirty = true;
        true
    }

    /// Make the buffers given back so far visible to the kernel.
    pub fn publish(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        // SAFETY: the tail field lies in the first entry of our mapping; the kernel reads it
        // concurrently, hence the atomic release store.
        unsafe {
            let tail = BufRingEntry::tail(self.mem) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this length and is unmapped once.
        unsafe {
            libc::munmap(self.mem as *mut libc::c_void, self.len);
        }
    }
}

impl Ring {
    /// Drive socket `fd` (which must outlive this value) with a ring of `entries` submission
    /// slots and `nbufs` receive buffers of `buf_size` bytes. `nbufs` must be a power of two
    /// (at most 32768). With `receive == false` no multishot receive is armed (a send-only
    /// ring).
    pub fn new(fd: RawFd, entries: u32, nbufs: u16, buf_size: usize, receive: bool) -> io::Result<Self> {
        Self::with_mode(fd, entries, nbufs, buf_size, receive, RingMode::Dedicated)
    }

    /// Like [`Ring::new`], for the given use (see [`RingMode`]).
    pub fn with_mode(
        fd: RawFd,
        entries: u32,
        nbufs: u16,
        buf_size: usize,
        receive: bool,
        mode: RingMode,
    ) -> io::Result<Self> {
        let mut me = Self::build(fd, entries, nbufs, buf_size, receive, mode)?;
        if receive {
            me.add_socket(Sock::Fd(fd))?;
        }
        Ok(me)
    }

    /// A receive ring for one thread that serves many sockets ([`Ring::add_socket`]),
    /// sends from any of them ([`Ring::send_copy_from`]) and polls other descriptors
    /// ([`Ring::poll`]): the ring of the thread-per-core driver.
    pub fn multi(entries: u32, nbufs: u16, buf_size: usize) -> io::Result<Self> {
        Self::build(-1, entries, nbufs, buf_size, true, RingMode::Dedicated)
    }

    fn build(fd: RawFd, entries: u32, nbufs: u16, buf_size: usize, receive: bool, mode: RingMode) -> io::Result<Self> {
        // One thread submits to each ring. A receive ring defers completion work until the
        // thread waits (DEFER_TASKRUN): no interrupt per datagram, the whole batch is
        // processed at the wait. A send ring, which reaps without waiting, only avoids the
        // interrupts (COOP_TASKRUN).
        let mut b = IoUring::builder();
        // Room for a whole turn's completions: every receive buffer and every send slot
        // can complete in one turn. A full completion queue ends multishot receives.
        let cq = (entries * 8).max(2 * nbufs as u32 + 16384).next_power_of_two().min(65536);
        b.setup_cqsize(cq);
        if mode == RingMode::Dedicated {
            b.setup_single_issuer();
            if receive {
                b.setup_defer_taskrun();
            } else {
                b.setup_coop_taskrun();
            }
        }
        Self::from_builder(&b, fd, entries, nbufs, buf_size, receive)
    }

    /// A ring built by `b` (tests use it for setups the constructors do not make).
    pub(crate) fn from_builder(
        b: &io_uring::Builder,
        fd: RawFd,
        entries: u32,
        nbufs: u16,
        buf_size: usize,
        receive: bool,
    ) -> io::Result<Self> {
        let bufs = BufRing::new(nbufs, buf_size)?;
        let ring = b.build(entries)?;
        // SAFETY: a zeroed msghdr is valid; only the name length is set (the kernel reserves
        // that much room for the source address in each buffer).
        let mut msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msghdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msghdr.msg_controllen = CONTROL_LEN as _;
        let mem = KernelMem {
            bufs,
            msghdr,
            slots: AnonMap::new(0)?,
            slot_addrs: Vec::new(),
            connect_addrs: HashMap::new(),
            stream_sends: HashMap::new(),
            accept_addrs: HashMap::new(),
        };
        let me = Ring {
            ring: std::mem::ManuallyDrop::new(ring),
            mem: std::mem::ManuallyDrop::new(mem),
            receive,
            fd,
            sockets: Vec::new(),
            touched: Vec::new(),
            in_flight_sends: 0,
            free_slots: Vec::new(),
            ops: 0,
            queued: 0,
            queued_sends: 0,
            counters: UringCounters::default(),
        };
        if receive {
            // SAFETY: `bufs` is registered once, with this ring, as group BGID, whose buffer
            // ids `drain_round` alone takes; it lives in `mem`, which `Drop` frees only once
            // no operation that selects from it is left (and leaks otherwise).
            unsafe { me.mem.bufs.register(&me.ring, BGID)? };
        }
        Ok(me)
    }

    /// Start receiving on `sock` (a descriptor must outlive its registration: until
    /// [`Ring::remove_socket`] has completed or the ring is dropped). Its datagrams come
    /// out of [`Ring::drain_with`] with the returned index.
    pub fn add_socket(&mut self, sock: Sock) -> io::Result<u32> {
        if !self.receive {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a send-only ring has no receive buffers"));
        }
        let ix = self.sockets.len() as u32;
        self.sockets.push(RecvSocket { sock, armed: false, active: true, burst: 0 });
        self.arm(ix)?;
        Ok(ix)
    }

    /// Stop receiving on socket `ix` (its pending receive is cancelled; datagrams already
    /// reaped are still delivered).
    pub fn remove_socket(&mut self, ix: u32) -> io::Result<()> {
        let Some(s) = self.sockets.get_mut(ix as usize) else { return Ok(()) };
        s.active = false;
        if s.armed {
            s.armed = false;
            let e = opcode::AsyncCancel::new(tag(K_RECV, ix as u64)).build().user_data(tag(K_CANCEL, 0));
            self.push_entry(&e)?;
        }
        Ok(())
    }

    /// Queue a one-shot readiness poll of `fd` for `events` (`libc::POLLIN` etc.); its
    /// completion comes out of [`Ring::drain_with`] as [`Completion::Poll`] with `token`.
    /// The ring holds a reference to the file until then: cancel before closing `fd`.
    pub fn poll(&mut self, fd: RawFd, events: u32, token: u32) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fd(fd), events).build().user_data(tag(K_POLL, token as u64));
        self.push_entry(&e)
    }

    /// Cancel the poll with `token` (it completes with `-ECANCELED` if it was still armed).
    pub fn cancel_poll(&mut self, token: u32) -> io::Result<()> {
        self.cancel(Pending::Poll, token)
    }

    /// True if a ring of the io_uring driver can be set up here: io_uring not blocked by
    /// seccomp, and a kernel with what the driver uses (SINGLE_ISSUER + DEFER_TASKRUN,
    /// provided buffer rings; Linux 6.1 or later).
    pub fn available() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| Ring::multi(8, 2, 64).is_ok())
    }

    fn arm(&mut self, ix: u32) -> io::Result<()> {
        let msghdr = &*self.mem.msghdr as *const libc::msghdr;
        let e = on_sock!(self.sockets[ix as usize].sock, |t| opcode::RecvMsgMulti::new(t, msghdr, BGID).build())
            .user_data(tag(K_RECV, ix as u64));
        // SAFETY: the msghdr is boxed in `mem` and the buffers it selects are `mem.bufs`;
        // `Drop` frees `mem` only once this receive has posted its last completion.
        unsafe {
            if self.ring.submission().push(&e).is_err() {
                self.ring.submit()?;
                self.ring.submission().push(&e).map_err(|_| io::Error::other("submission queue full"))?;
            }
        }
        self.ops += 1;
        self.sockets[ix as usize].armed = true;
        Ok(())
    }

    /// Queue a send of `buf` on socket `fd` (to `dest`, or to the connected peer if `None`).
    /// Submits first if the queue is full. [`Ring::send_copy`] is the safe form: the ring
    /// owns the bytes.
    ///
    /// # Safety
    /// `buf` (and `dest`) must stay valid, and `buf` unchanged, until the send's completion
    /// has been reaped by [`Ring::drain`] or [`Ring::drain_with`]
    /// ([`Ring::in_flight_sends`] counts it until then). Dropping the ring does not end
    /// the kernel's use of them: its drop waits a bounded time for its operations, and can
    /// keep alive only the memory it owns.
    pub unsafe fn push_send(&mut self, fd: RawFd, buf: &[u8], dest: Option<&libc::sockaddr_storage>) -> io::Result<()> {
        let mut op = opcode::Send::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32);
        if let Some(d) = dest {
            let len = if d.ss_family as i32 == libc::AF_INET6 {
                std::mem::size_of::<libc::sockaddr_in6>()
            } else {
                std::mem::size_of::<libc::sockaddr_in>()
            };
            op = op.dest_addr(d as *const _ as *const libc::sockaddr).dest_addr_len(len as libc::socklen_t);
        }
        let e = op.build().user_data(tag(K_RAW, 0));
        self.push_entry(&e)?;
        self.in_flight_sends += 1;
        self.queued_sends += 1;
        Ok(())
    }

    /// Queue `e`, submitting first if the queue is full; counted in `ops` until its last
    /// completion is reaped.
    fn push_entry(&mut self, e: &io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY: every pointer an entry of this ring carries is to memory in `mem` (receive
        // buffers, the msghdr, send slots and their addresses, connect addresses, stream-send
        // buffers), which `Drop` frees only once no operation is left and leaks otherwise; or
        // to the caller's memory in `push_send`, whose contract keeps it valid until the
        // completion. Descriptors, tokens and cancellations are not memory.
        unsafe {
            if self.ring.submission().push(e).is_err() {
                self.submit()?;
                self.ring.submission().push(e).map_err(|_| io::Error::other("submission queue full"))?;
            }
        }
        self.ops += 1;
        self.queued += 1;
        Ok(())
    }

    /// Give this ring `n` owned send slots of `size` bytes for [`Ring::send_copy`]. Once:
    /// a ring that has slots keeps them (sends from them may be in flight, and the kernel
    /// reads their bytes and addresses until each one completes).
    pub fn with_send_slots(mut self, n: u16, size: usize) -> io::Result<Self> {
        if !self.mem.slot_addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "this ring's send slots are already set"));
        }
        let total = (n as usize)
            .checked_mul(size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "send slots larger than the address space"))?;
        self.mem.slots = AnonMap::new(total)?;
        // SAFETY: a zeroed sockaddr_storage is valid.
        self.mem.slot_addrs = vec![unsafe { std::mem::zeroed() }; n as usize];
        self.free_slots = (0..n).rev().collect();
        Ok(self)
    }

    /// Copy `data` into an owned slot and queue its send to `to` (submitted by the next
    /// [`Ring::submit`] or wait). Returns false, and counts a send error, if every slot is
    /// in flight or `data` is too large for a slot. No allocation.
    pub fn send_copy(&mut self, data: &[u8], to: SocketAddr) -> bool {
        self.send_copy_from(Sock::Fd(self.fd), data, to)
    }

    /// Like [`Ring::send_copy`], from socket `sock` (a descriptor must stay open until the
    /// send completes).
    pub fn send_copy_from(&mut self, sock: Sock, data: &[u8], to: SocketAddr) -> bool {
        let size = if self.mem.slot_addrs.is_empty() { 0 } else { self.mem.slots.len() / self.mem.slot_addrs.len() };
        let slot = match self.free_slots.pop() {
            Some(s) if data.len() <= size => s,
            Some(s) => {
                self.free_slots.push(s);
                self.counters.send_errors += 1;
                return false;
            }
            None => {
                self.counters.send_errors += 1;
                return false;
            }
        };
        let off = slot as usize * size;
        // SAFETY: the slot was free (popped from `free_slots`), so no send in flight reads
        // it; the range is this slot alone, not the slots other sends are reading.
        unsafe { self.mem.slots.range_mut(off, data.len()) }.copy_from_slice(data);
        let (storage, len) = to_sockaddr(to);
        self.mem.slot_addrs[slot as usize] = storage;
        // SAFETY: `off` lies inside the slots mapping (slot < slot count).
        let buf = unsafe { self.mem.slots.as_ptr().add(off) } as *const u8;
        let dest = &self.mem.slot_addrs[slot as usize] as *const _ as *const libc::sockaddr;
        let e = on_sock!(sock, |t| opcode::Send::new(t, buf, data.len() as u32)
            .dest_addr(dest)
            .dest_addr_len(len)
            // A full socket buffer fails the send at once (counted), as a non-blocking
            // sendto would, instead of parking it on a poll: media is never queued.
            .flags(libc::MSG_DONTWAIT)
            .build())
        .user_data(tag(K_SLOT, slot as u64));
        // The slot's bytes and address stay untouched until its completion frees it.
        if self.push_entry(&e).is_err() {
            self.free_slots.push(slot);
            self.counters.send_errors += 1;
            return false;
        }
        self.in_flight_sends += 1;
        self.queued_sends += 1;
        true
    }

    /// Give the ring a file table of `n` empty entries for direct descriptors
    /// ([`Ring::install`]). The kernel allows at most RLIMIT_NOFILE entries per ring.
    pub fn register_table(&mut self, n: u32) -> io::Result<()> {
        self.ring.submitter().register_files_sparse(n)
    }

    /// Move socket `fd` into entry `slot` of the ring's file table (replacing what was
    /// there) and close the descriptor: from then on the socket is [`Sock::Fixed`]`(slot)`,
    /// and costs no descriptor of the process. A socket replaced or removed stays open until
    /// the operations still using it have completed.
    ///
    /// Operations queued but not yet submitted take the entry's socket when they are
    /// submitted: submit before replacing an entry they refer to.
    pub fn install(&mut self, slot: u32, fd: OwnedFd) -> io::Result<()> {
        let n = self.ring.submitter().register_files_update(slot, &[fd.as_raw_fd()])?;
        if n != 1 {
            return Err(io::Error::other(format!("file table entry {slot} was not updated")));
        }
        Ok(())
    }

    /// Empty entry `slot` of the file table (its socket closes once no operation uses it).
    pub fn uninstall(&mut self, slot: u32) -> io::Result<()> {
        self.ring.submitter().register_files_update(slot, &[-1]).map(|_| ())
    }

    /// Queue a connect of stream socket `sock` to `to`; completes as [`Completion::Op`] with
    /// `token` (0 when connected, else a negative errno). The ring keeps the address until
    /// then. Refused if a connect with the same token is in flight.
    pub fn connect(&mut self, sock: Sock, to: SocketAddr, token: u32) -> io::Result<()> {
        if self.mem.connect_addrs.contains_key(&token) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "a connect with this token is in flight"));
        }
        let (storage, len) = to_sockaddr(to);
        let addr = Box::new(storage);
        // The box's contents stay where they are when the box moves into the map, until the
        // completion takes it out (or the ring's teardown, see `Drop`).
        let ptr = &*addr as *const libc::sockaddr_storage as *const libc::sockaddr;
        let e = on_sock!(sock, |t| opcode::Connect::new(t, ptr, len).build()).user_data(tag(K_OP, token as u64));
        self.push_entry(&e)?;
        self.mem.connect_addrs.insert(token, addr);
        Ok(())
    }

    /// Queue a send of `data[from..]` on stream socket `sock`. The ring holds `data` until
    /// the send completes as [`Completion::Sent`] with `token`, which hands it back with the
    /// bytes sent (all of them unless the connection failed: MSG_WAITALL; at most 4 GiB) or a
    /// negative errno. Counted in [`Ring::in_flight_sends`] until then. Refused, with
    /// `data` handed back, if `from` lies past its end, a send with the same token is in
    /// flight, or the submission queue is full.
    pub fn send_stream(
        &mut self,
        sock: Sock,
        data: Vec<u8>,
        from: usize,
        token: u32,
    ) -> Result<(), (io::Error, Vec<u8>)> {
        if from > data.len() {
            return Err((io::Error::new(io::ErrorKind::InvalidInput, "send offset past the end"), data));
        }
        if self.mem.stream_sends.contains_key(&token) {
            return Err((io::Error::new(io::ErrorKind::AlreadyExists, "a send with this token is in flight"), data));
        }
        let rest = &data[from..];
        let (ptr, len) = (rest.as_ptr(), rest.len().min(u32::MAX as usize) as u32);
        // The vector's heap buffer stays where it is when the vector moves into the map, and
        // nothing changes it until the completion takes it out (or the ring's teardown).
        let e =
            on_sock!(sock, |t| opcode::Send::new(t, ptr, len).flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL).build())
                .user_data(tag(K_STREAM_SEND, token as u64));
        if let Err(e) = self.push_entry(&e) {
            return Err((e, data));
        }
        self.mem.stream_sends.insert(token, data);
        self.in_flight_sends += 1;
        self.queued_sends += 1;
        Ok(())
    }

    /// Queue an accept on the listening socket `listener` (a descriptor, which must stay open
    /// until the accept completes or is cancelled) straight into a free entry of the ring's
    /// file table (`IORING_FILE_INDEX_ALLOC`; [`Ring::register_table`] first): the new
    /// connection is [`Sock::Fixed`] from the start and never takes a descriptor of the
    /// process. Completes as [`Completion::Accepted`] with `token`; the ring keeps the
    /// address buffer until then. Refused if an accept with the same token is in flight.
    /// (A full table fails the accept with `-ENFILE` after the kernel took the connection
    /// from the backlog, and the connection is lost: keep a free entry for every accept.)
    pub fn accept(&mut self, listener: RawFd, token: u32) -> io::Result<()> {
        if self.mem.accept_addrs.contains_key(&token) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "an accept with this token is in flight"));
        }
        // SAFETY: a zeroed sockaddr_storage is valid.
        let mut buf = Box::new((unsafe { std::mem::zeroed::<libc::sockaddr_storage>() }, 0));
        buf.1 = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // The box's contents stay where they are when the box moves into the map, until the
        // completion takes it out (or the ring's teardown, see `Drop`).
        let (addr, len) = (&mut buf.0 as *mut _ as *mut libc::sockaddr, &mut buf.1 as *mut libc::socklen_t);
        // (No SOCK_CLOEXEC: a direct descriptor has no descriptor-table entry to close.)
        let e = opcode::Accept::new(types::Fd(listener), addr, len)
            .file_index(Some(types::DestinationSlot::auto_target()))
            .build()
            .user_data(tag(K_ACCEPT, token as u64));
        self.push_entry(&e)?;
        self.mem.accept_addrs.insert(token, buf);
        Ok(())
    }

    /// Arm a multishot receive on stream socket `sock`, drawing from the ring's receive
    /// buffers; what it reads comes out as [`Completion::Stream`] with `token`.
    pub fn recv_stream(&mut self, sock: Sock, token: u32) -> io::Result<()> {
        let e = on_sock!(sock, |t| opcode::RecvMulti::new(t, BGID).build()).user_data(tag(K_STREAM, token as u64));
        self.push_entry(&e)
    }

    /// Cancel the operation of kind `what` queued with `token`, if it is still in flight (it
    /// completes with `-ECANCELED`). Matched by token, not by socket: the cost does not
    /// grow with the operations other sockets have in flight, and the socket's table entry
    /// may be emptied before the cancellation is submitted.
    pub fn cancel(&mut self, what: Pending, token: u32) -> io::Result<()> {
        let kind = match what {
            Pending::Poll => K_POLL,
            Pending::Op => K_OP,
            Pending::Send => K_STREAM_SEND,
            Pending::Receive => K_STREAM,
            Pending::Accept => K_ACCEPT,
        };
        let e = opcode::AsyncCancel::new(tag(kind, token as u64)).build().user_data(tag(K_CANCEL, 0));
        self.push_entry(&e)
    }

    /// Stop receiving on every socket, cancel every operation still in flight and wait up to
    /// `bound` for their completions (whatever they carry is dropped), then empty the file
    /// table: its sockets close now, not when the ring is dropped (the kernel finishes a
    /// ring's teardown in the background, later). The ring receives nothing afterwards.
    /// Returns true if no operation is left.
    pub fn close_all(&mut self, bound: Duration) -> bool {
        let quiet = self.quiesce(bound);
        let _ = self.ring.submitter().unregister_files();
        quiet
    }

    /// Let a ring built disabled (`IORING_SETUP_R_DISABLED`, for tests) take submissions.
    #[cfg(test)]
    pub(crate) fn enable(&mut self) -> io::Result<()> {
        self.ring.submitter().register_enable_rings()
    }

    /// The ring's own descriptor (tests look at the kernel's side of a ring through it).
    #[cfg(test)]
    pub(crate) fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Operations queued or in flight whose last completion has not been reaped.
    pub fn ops_in_flight(&self) -> usize {
        self.ops
    }

    /// Stop every receive, cancel every operation (one `ASYNC_CANCEL` matching any request)
    /// and reap until none is left or `bound` has passed. True if none is left.
    fn quiesce(&mut self, bound: Duration) -> bool {
        for s in &mut self.sockets {
            s.active = false;
        }
        let end = std::time::Instant::now() + bound;
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(tag(K_CANCEL, 0));
        let mut cancelled = false;
        while self.ops > 0 {
            // (The cancellation is retried if the queue was full and could not be submitted.)
            if !cancelled {
                cancelled = self.push_entry(&cancel).is_ok();
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            // A ring that cannot be entered from this thread (SINGLE_ISSUER) fails here.
            let entered = self.submit_and_wait(1, left.min(Duration::from_millis(10)));
            // Completions only count down `ops` here: no socket is active, so none re-arms.
            let reaped = self.drain_round(&mut |_| {});
            if entered.is_err() || reaped.is_err() || left.is_zero() {
                break;
            }
        }
        self.ops == 0
    }

    /// Entries queued since the last submit.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Sends queued since the last submit. On loopback and uncongested sockets a send
    /// completes during the submit itself, so a wait for `queued_sends() + n` completions
    /// waits for about `n` others.
    pub fn queued_sends(&self) -> usize {
        self.queued_sends
    }

    /// Signal `efd` (an eventfd) whenever a completion is posted.
    pub fn register_eventfd(&self, efd: RawFd) -> io::Result<()> {
        self.ring.submitter().register_eventfd(efd)
    }

    /// Hand queued entries to the kernel without waiting.
    pub fn submit(&mut self) -> io::Result<usize> {
        self.counters.enters += 1;
        self.queued = 0;
        self.queued_sends = 0;
        self.ring.submit()
    }

    /// Submit, then wait until `want` completions are ready or `timeout` passes. A timeout is
    /// not an error.
    pub fn submit_and_wait(&mut self, want: usize, timeout: Duration) -> io::Result<usize> {
        self.counters.enters += 1;
        self.queued = 0;
        self.queued_sends = 0;
        let ts = Timespec::from(timeout);
        let args = SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(n) => Ok(n),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Sends queued or in flight and not yet completed.
    pub fn in_flight_sends(&self) -> usize {
        self.in_flight_sends
    }

    /// Reap every ready completion: each received datagram is handed to `on_recv` (source,
    /// payload) and its buffer recycled; send completions are counted. Re-arms the multishot
    /// receive if the kernel ended it. Returns the number of datagrams received.
    pub fn drain(&mut self, mut on_recv: impl FnMut(Option<SocketAddr>, &[u8])) -> io::Result<usize> {
        self.drain_with(|c| {
            if let Completion::Recv { from, data, .. } = c {
                on_recv(from, data)
            }
        })
    }

    /// Reap every ready completion, handing received datagrams (split back apart if the
    /// kernel coalesced them) and fired polls to `on`. Send completions free their slots and
    /// are counted. Re-arms any multishot receive the kernel ended (out of buffers, error).
    /// Returns the number of datagrams received.
    pub fn drain_with(&mut self, mut on: impl FnMut(Completion<'_>)) -> io::Result<usize> {
        let mut got = 0;
        let mut round = 0;
        loop {
            got += self.drain_round(&mut on)?;
            // A socket that gave a whole multishot run has probably more waiting, and the
            // kernel requeued its receive for the next enter. Enter now (without waiting) and
            // take the rest: left to the loop, a backlog built during a stall would come out
            // 33 datagrams per socket per turn, each turn up to a tick apart.
            let mut backlog = false;
            for ix in self.touched.drain(..) {
                let s = &mut self.sockets[ix as usize];
                backlog |= s.burst >= MULTISHOT_RUN;
                s.burst = 0;
            }
            if !backlog || round == MAX_BACKLOG_ROUNDS {
                return Ok(got);
            }
            round += 1;
            self.counters.backlog_rounds += 1;
            self.submit_and_wait(1, Duration::ZERO)?;
        }
    }

    /// Reap the completions that are ready (see [`Ring::drain_with`]), then re-arm.
    fn drain_round(&mut self, on: &mut impl FnMut(Completion<'_>)) -> io::Result<usize> {
        let mut got = 0;
        loop {
            // Take completions in batches so the ring can be touched between them.
            let mut batch: [(u64, i32, u32); 64] = [(0, 0, 0); 64];
            let mut n = 0;
            for cqe in self.ring.completion() {
                batch[n] = (cqe.user_data(), cqe.result(), cqe.flags());
                n += 1;
                if n == batch.len() {
                    break;
                }
            }
            if n == 0 {
                break;
            }
            for &(ud, res, flags) in &batch[..n] {
                let (kind, ix) = (ud >> KIND_SHIFT, ud & INDEX_MASK);
                if !cqueue::more(flags) {
                    // The operation's last completion: the kernel is done with it.
                    self.ops = self.ops.saturating_sub(1);
                }
                // SAFETY: the completion was just reaped from this ring, whose buffer-select
                // operations (the receives) all take from `bufs`, group BGID; its buffer is
                // taken here, once. Every path below gives it back.
                let bid = cqueue::buffer_select(flags).filter(|&b| unsafe { self.mem.bufs.take(b) });
                match kind {
                    K_SLOT | K_RAW => {
                        self.in_flight_sends = self.in_flight_sends.saturating_sub(1);
                        if kind == K_SLOT {
                            self.free_slots.push(ix as u16);
                        }
                        if res < 0 {
                            self.counters.send_errors += 1;
                        } else {
                            self.counters.sent += 1;
                        }
                        continue;
                    }
                    K_POLL => {
                        on(Completion::Poll { token: ix as u32, result: res });
                        continue;
                    }
                    K_OP => {
                        // The kernel is done with the address.
                        self.mem.connect_addrs.remove(&(ix as u32));
                        on(Completion::Op { token: ix as u32, result: res });
                        continue;
                    }
                    K_ACCEPT => {
                        // The kernel is done with the address buffer.
                        let buf = self.mem.accept_addrs.remove(&(ix as u32));
                        let peer = buf.filter(|_| res >= 0).and_then(|b| sockaddr_of(&b.0));
                        on(Completion::Accepted { token: ix as u32, result: res, peer });
                        continue;
                    }
                    K_STREAM_SEND => {
                        self.in_flight_sends = self.in_flight_sends.saturating_sub(1);
                        let data = self.mem.stream_sends.remove(&(ix as u32)).unwrap_or_default();
                        on(Completion::Sent { token: ix as u32, result: res, data });
                        continue;
                    }
                    K_STREAM => {
                        let more = cqueue::more(flags);
                        match (res, bid) {
                            (r, Some(bid)) if r > 0 => {
                                let data = self.mem.bufs.get(bid, r as usize);
                                on(Completion::Stream { token: ix as u32, result: r, data, more });
                            }
                            (r, _) if r > 0 => {
                                self.counters.recv_errors += 1;
                                on(Completion::Stream { token: ix as u32, result: -libc::EIO, data: &[], more });
                            }
                            (r, _) => {
                                if r == -libc::ENOBUFS {
                                    self.counters.no_buffers += 1;
                                }
                                on(Completion::Stream { token: ix as u32, result: r, data: &[], more });
                            }
                        }
                        // (An end of stream or an error may carry a buffer too, on some
                        // kernels: it goes back as well, or the ring would run dry.)
                        if let Some(bid) = bid {
                            self.mem.bufs.provide(bid);
                        }
                        continue;
                    }
                    K_RECV => {}
                    _ => continue,
                }
                let sock = ix as u32;
                if let Some(s) = self.sockets.get_mut(ix as usize) {
                    if s.burst == 0 {
                        self.touched.push(sock);
                    }
                    s.burst += 1;
                }
                if !cqueue::more(flags) {
                    if let Some(s) = self.sockets.get_mut(ix as usize) {
                        s.armed = false;
                    }
                }
                if res < 0 {
                    if res == -libc::ENOBUFS {
                        self.counters.no_buffers += 1;
                    } else if res != -libc::ECANCELED {
                        self.counters.recv_errors += 1;
                    }
                    if let Some(bid) = bid {
                        self.mem.bufs.provide(bid);
                    }
                    continue;
                }
                let Some(bid) = bid else {
                    self.counters.recv_errors += 1;
                    continue;
                };
                let data = self.mem.bufs.get(bid, res as usize);
                let active = self.sockets.get(ix as usize).is_some_and(|s| s.active);
                match RecvMsgOut::parse(data, &self.mem.msghdr) {
                    Ok(out) if !out.is_payload_truncated() && active => {
                        let from = sockaddr(out.name_data());
                        let payload = out.payload_data();
                        match gro_segment(out.control_data()) {
                            Some(seg) if seg > 0 && payload.len() > seg => {
                                self.counters.gro_batches += 1;
                                for d in payload.chunks(seg) {
                                    got += 1;
                                    self.counters.received += 1;
                                    on(Completion::Recv { socket: sock, from, data: d });
                                }
                            }
                            _ => {
                                got += 1;
                                self.counters.received += 1;
                                on(Completion::Recv { socket: sock, from, data: payload });
                            }
                        }
                    }
                    Ok(_) if !active => {}
                    _ => self.counters.recv_errors += 1,
                }
                self.mem.bufs.provide(bid);
            }
        }
        self.mem.bufs.publish();
        if self.receive {
            for ix in 0..self.sockets.len() {
                let s = &self.sockets[ix];
                if s.active && !s.armed {
                    self.counters.rearms += 1;
                    self.arm(ix as u32)?;
                }
            }
        }
        Ok(got)
    }
}

/// The segment size of a GRO-coalesced receive, from its control messages.
fn gro_segment(control: &[u8]) -> Option<usize> {
    // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; } then data, each
    // message padded to the alignment of size_t.
    const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
    const ALIGN: usize = std::mem::size_of::<usize>();
    let mut o = 0;
    while o + HDR <= control.len() {
        let len = usize::from_ne_bytes(control[o..o + ALIGN].try_into().ok()?);
        let level = i32::from_ne_bytes(control[o + ALIGN..o + ALIGN + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[o + ALIGN + 4..o + ALIGN + 8].try_into().ok()?);
        if len < HDR || o + len > control.len() {
            return None;
        }
        if level == SOL_UDP && kind == UDP_GRO && len >= HDR + 4 {
            return Some(i32::from_ne_bytes(control[o + HDR..o + HDR + 4].try_into().ok()?).max(0) as usize);
        }
        o += (len + ALIGN - 1) & !(ALIGN - 1);
    }
    None
}

/// Closing a ring does not end its operations: the kernel cancels them in the background
/// (`io_ring_exit_work`, a work item run after `close` returns), and until each has posted
/// its completion it may still write into the receive buffers and read the send slots, the
/// msghdr and the addresses. So the ring first cancels everything and reaps until every
/// operation has posted its last completion (at most `TEARDOWN_BOUND`, 1 s); only then is that
/// memory freed. If the bound passes (a ring dropped on a thread that cannot enter it, or a
/// kernel that does not complete a cancellation), the memory is leaked instead: a leak is
/// the only safe outcome while the kernel may still use it.
impl Drop for Ring {
    fn drop(&mut self) {
        let quiet = self.quiesce(TEARDOWN_BOUND);
        if !quiet {
            teardown_leaked("io_uring ring", self.ops);
        }
        // SAFETY: `ring` is dropped exactly once, here, and not used afterwards.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.ring) };
        if quiet {
            // SAFETY: `mem` is dropped exactly once, here, and not used afterwards; no
            // operation that could touch it is left (every one has posted its last
            // completion), and the ring that could start one is closed.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.mem) };
        }
    }
}

/// A `SocketAddr` as a `sockaddr_storage` and its length.
pub(crate) fn to_sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed storage is valid; we write a sockaddr_in/in6 into its prefix.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in, sin) };
            (st, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut st as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (st, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// The address in a `sockaddr_storage` the kernel filled.
fn sockaddr_of(st: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: a sockaddr_storage is plain bytes, all initialised (zeroed, then written by
    // the kernel); they are read, as bytes, within its size.
    let b = unsafe {
        std::slice::from_raw_parts(st as *const _ as *const u8, std::mem::size_of::<libc::sockaddr_storage>())
    };
    sockaddr(b)
}

/// A `sockaddr_in`/`sockaddr_in6` as bytes to a `SocketAddr`.
fn sockaddr(b: &[u8]) -> Option<SocketAddr> {
    if b.len() < 2 {
        return None;
    }
    let family = u16::from_ne_bytes([b[0], b[1]]) as i32;
    if family == libc::AF_INET && b.len() >= 8 {
        let port = u16::from_be_bytes([b[2], b[3]]);
        let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
        Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
    } else if family == libc::AF_INET6 && b.len() >= 24 {
        let port = u16::from_be_bytes([b[2], b[3]]);
        let mut o = [0u8; 16];
        o.copy_from_slice(&b[8..24]);
        let ip = Ipv6Addr::from(o);
        // A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6: the core sees them as
        // the IPv4 addresses they are (and sends to those on the same socket).
        match ip.to_ipv4_mapped() {
            Some(v4) => Some(SocketAddr::V4(SocketAddrV4::new(v4, port))),
            None => Some(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))),
        }
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer id outside the ring is refused, both ways: `provide` would point the kernel
    /// past the buffers, and `get` would slice past them.
    #[test]
    fn buffer_ring_refuses_ids_outside_it() {
        let mut r = BufRing::new(8, 64).unwrap();
        assert!(!r.provide(8));
        assert!(!r.provide(u16::MAX));
        // SAFETY: the ring is registered with no io_uring: the kernel holds none of it.
        assert!(unsafe { r.take(7) });
        assert!(r.provide(7));
        assert!(r.get(8, 10).is_empty());
        assert!(r.get(u16::MAX, 10).is_empty());
        // SAFETY: as above.
        assert!(!unsafe { r.take(8) });
        assert!(unsafe { r.take(7) });
        assert_eq!(r.get(7, 1000).len(), 64, "a length is clamped to the buffer");
    }

    /// A buffer is read only between the completion that named it and its return to the
    /// kernel, and returned once: `get` of a buffer the kernel holds would be a slice over
    /// memory a receive may be writing, and a second `provide` would put one buffer in the
    /// kernel's hands twice (two receives writing into it, one while its reader reads it).
    #[test]
    fn buffer_ring_hands_out_only_buffers_the_kernel_gave_back() {
        let mut r = BufRing::new(8, 64).unwrap();
        assert!(r.get(3, 10).is_empty(), "a buffer the kernel holds was handed out");
        assert!(!r.provide(3), "a buffer the kernel holds was provided again");
        // SAFETY: the ring is registered with no io_uring: the kernel holds none of it.
        assert!(unsafe { r.take(3) });
        assert_eq!(r.get(3, 10).len(), 10);
        // SAFETY: as above.
        assert!(!unsafe { r.take(3) }, "taken twice");
        assert!(r.provide(3));
        assert!(r.get(3, 10).is_empty(), "a provided buffer was still handed out");
        assert!(!r.provide(3), "provided twice");
    }

    /// Buffer sizes whose product wraps would map fewer bytes than the buffers' addresses
    /// span (the kernel would write past the mapping); a size the ring's u32 length cannot
    /// hold, or 0, is refused too.
    #[test]
    fn buffer_ring_sizes_past_the_address_space_are_refused() {
        assert!(BufRing::new(2, usize::MAX / 2 + 1).is_err(), "2 buffers of 2^63 bytes");
        assert!(BufRing::new(4, 1 << 33).is_err(), "a buffer longer than a u32");
        assert!(BufRing::new(4, 0).is_err(), "empty buffers");
    }
    use std::os::fd::AsRawFd;

    #[test]
    fn multishot_receive_and_batched_send_on_loopback() {
        if !Ring::available() {
            panic!("io_uring is not available on this kernel; the io_uring engine needs it");
        }
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let mut rring = Ring::new(rx.as_raw_fd(), 256, 64, 2048, true).unwrap();
        let mut tring = Ring::new(tx.as_raw_fd(), 256, 1, 64, false).unwrap();
        let payloads: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_be_bytes().repeat(43)).collect();
        for p in &payloads {
            // SAFETY: `payloads` outlives the sends, which are reaped below.
            unsafe { tring.push_send(tx.as_raw_fd(), p, None).unwrap() };
        }
        tring.submit_and_wait(payloads.len(), Duration::from_secs(2)).unwrap();
        tring.drain(|_, _| {}).unwrap();
        assert_eq!(tring.counters.sent, 200);
        // 200 datagrams through 64 buffers: recycling must keep up.
        let mut seen = Vec::new();
        for _ in 0..100 {
            rring.submit_and_wait(1, Duration::from_millis(50)).unwrap();
            rring
                .drain(|from, p| {
                    assert_eq!(from, Some(tx.local_addr().unwrap()));
                    seen.push(u32::from_be_bytes(p[..4].try_into().unwrap()));
                    assert_eq!(p.len(), 172);
                })
                .unwrap();
            if seen.len() == 200 {
                break;
            }
        }
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        assert_eq!(rring.counters.recv_errors, 0);
    }

    #[test]
    fn owned_send_slots_are_recycled_and_the_eventfd_fires() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut ring = Ring::with_mode(a.as_raw_fd(), 64, 16, 2048, true, RingMode::Shared)
            .unwrap()
            .with_send_slots(4, 256)
            .unwrap();
        // SAFETY: creating an eventfd.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(efd >= 0);
        ring.register_eventfd(efd).unwrap();
        // 4 slots: the fifth send is refused until completions free slots.
        for i in 0..4u8 {
            assert!(ring.send_copy(&[i; 100], b.local_addr().unwrap()));
        }
        assert!(!ring.send_copy(&[9; 100], b.local_addr().unwrap()));
        assert!(!ring.send_copy(&[9; 300], b.local_addr().unwrap()), "larger than a slot");
        ring.submit_and_wait(4, Duration::from_secs(2)).unwrap();
        ring.drain(|_, _| {}).unwrap();
        assert_eq!(ring.counters.sent, 4);
        assert!(ring.send_copy(&[7; 100], b.local_addr().unwrap()), "slots were recycled");
        ring.submit().unwrap();
        let mut buf = [0u8; 512];
        for want in [0u8, 1, 2, 3, 7] {
            let (n, from) = b.recv_from(&mut buf).unwrap();
            assert_eq!((n, buf[0], from), (100, want, a.local_addr().unwrap()));
        }
        // A datagram to the ring's socket posts a completion, which signals the eventfd.
        b.send_to(b"ping", a.local_addr().unwrap()).unwrap();
        let mut v = 0u64;
        let mut signalled = false;
        for _ in 0..200 {
            // SAFETY: reading 8 bytes from our eventfd.
            if unsafe { libc::read(efd, &mut v as *mut u64 as *mut libc::c_void, 8) } == 8 {
                signalled = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(signalled, "the eventfd was not signalled");
        let mut got = Vec::new();
        ring.drain(|from, p| got.push((from, p.to_vec()))).unwrap();
        assert_eq!(got, vec![(Some(b.local_addr().unwrap()), b"ping".to_vec())]);
        // SAFETY: closing our eventfd.
        unsafe { libc::close(efd) };
    }

    /// Send `segments` datagrams of `seg` bytes to `to` as one GSO write (UDP_SEGMENT).
    fn send_gso(fd: RawFd, payload: &[u8], seg: u16, to: SocketAddr) -> isize {
        let (mut addr, alen) = to_sockaddr(to);
        let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: payload.len() };
        let mut control = [0u64; 4];
        // SAFETY: a msghdr pointing at live locals; one cmsg of a u16 fits the 32-byte buffer.
        unsafe {
            let mut m: libc::msghdr = std::mem::zeroed();
            m.msg_name = &mut addr as *mut _ as *mut libc::c_void;
            m.msg_namelen = alen;
            m.msg_iov = &mut iov;
            m.msg_iovlen = 1;
            m.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            m.msg_controllen = libc::CMSG_SPACE(2) as _;
            let c = libc::CMSG_FIRSTHDR(&m);
            (*c).cmsg_level = SOL_UDP;
            (*c).cmsg_type = 103; // UDP_SEGMENT
            (*c).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
            libc::sendmsg(fd, &m, 0)
        }
    }

    /// Enter the ring behind descriptor `fd` without submitting: the kernel runs the work the
    /// ring has pending (a woken receive copies its datagram), as on every enter of the
    /// thread that submits to it.
    fn enter(fd: RawFd) {
        const IORING_ENTER_GETEVENTS: libc::c_uint = 1;
        let none = std::ptr::null::<libc::c_void>();
        // SAFETY: io_uring_enter with nothing to submit, no completion to wait for and no
        // argument (null, size 0) reads and writes no memory of ours.
        unsafe { libc::syscall(libc::SYS_io_uring_enter, fd, 0u32, 0u32, IORING_ENTER_GETEVENTS, none, 0usize) };
    }

    /// Dropping a ring ends its operations before it frees the memory they use. Closing a
    /// ring does not end them: the kernel tears it down in the background, later, and until
    /// then a receive still armed writes into the buffers. A duplicate of the ring's
    /// descriptor holds that moment still: after the drop a datagram comes to the socket the
    /// ring received on, and the ring (through the duplicate) runs what it still has. The
    /// datagram must still be in the socket, not taken by a receive into buffers that are
    /// gone.
    #[test]
    fn dropping_a_ring_ends_its_operations_before_freeing_their_memory() {
        use std::os::fd::FromRawFd;
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_peer, _) = listener.accept().unwrap();
        let mut ring = Ring::multi(64, 16, 2048).unwrap();
        ring.add_socket(Sock::Fd(rx.as_raw_fd())).unwrap();
        // More kinds in flight: a stream receive, a stream send and a connect (refused or
        // not, it completes; the ring holds their memory meanwhile), a poll.
        ring.recv_stream(Sock::Fd(stream.as_raw_fd()), 1).unwrap();
        ring.send_stream(Sock::Fd(stream.as_raw_fd()), vec![7; 64], 0, 2).unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: socket() takes no pointers; the descriptor is owned at once.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fresh = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        ring.connect(Sock::Fd(fresh.as_raw_fd()), other.local_addr().unwrap(), 3).unwrap();
        ring.poll(rx.as_raw_fd(), libc::POLLOUT as u32, 4).unwrap();
        ring.submit().unwrap();
        assert!(ring.ops_in_flight() >= 5);
        // SAFETY: a duplicate of the ring's descriptor, closed below.
        let dup = unsafe { libc::dup(ring.ring.as_raw_fd()) };
        assert!(dup >= 0, "dup: {}", io::Error::last_os_error());
        drop(ring);
        tx.send_to(b"after the drop", rx.local_addr().unwrap()).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(rx.peek_from(&mut buf).unwrap().0, 14, "the datagram arrived");
        enter(dup);
        rx.set_nonblocking(true).unwrap();
        let got = rx.recv_from(&mut buf).map(|(n, _)| n);
        // SAFETY: closing our duplicate.
        unsafe { libc::close(dup) };
        assert_eq!(got.ok(), Some(14), "a receive of the dropped ring took the datagram");
    }

    /// A ring that cannot wait for its operations (dropped on a thread that is not its
    /// submitter: SINGLE_ISSUER refuses the enter) leaks its memory rather than free it
    /// under a receive that is still armed.
    #[test]
    fn a_ring_that_cannot_wait_for_its_operations_leaks_their_memory() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut ring = Ring::multi(8, 2, 64).unwrap();
        ring.add_socket(Sock::Fd(rx.as_raw_fd())).unwrap();
        ring.submit().unwrap();
        let before = leaked_teardowns();
        std::thread::spawn(move || drop(ring)).join().unwrap();
        assert!(leaked_teardowns() > before, "the ring's memory was freed under its receive");
    }

    /// Send slots are set once: replacing them would unmap the bytes and free the addresses
    /// that the sends in flight from them are reading, and hand their slots out again.
    #[test]
    fn send_slots_are_set_once() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let ring = Ring::new(a.as_raw_fd(), 8, 1, 64, false).unwrap();
        let mut ring = ring.with_send_slots(2, 64).unwrap();
        assert!(ring.send_copy(b"queued", a.local_addr().unwrap()));
        assert!(ring.with_send_slots(4, 64).is_err(), "slots replaced under a queued send");
        let ring = Ring::new(a.as_raw_fd(), 8, 1, 64, false).unwrap();
        assert!(ring.with_send_slots(2, usize::MAX).is_err(), "a size that wraps the mapping's length");
    }

    #[test]
    fn gro_coalesced_receives_are_split_back_into_datagrams() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(enable_gro(rx.as_raw_fd()), "UDP_GRO refused");
        let mut ring = Ring::multi(64, 16, 8192).unwrap();
        let ix = ring.add_socket(Sock::Fd(rx.as_raw_fd())).unwrap();
        // 5 segments of 172 bytes and a short last one, in one GSO write: the receive keeps
        // them whole (GRO on), and the ring must hand out 6 datagrams.
        let mut burst = Vec::new();
        for i in 0..5u8 {
            burst.extend_from_slice(&[i; 172]);
        }
        burst.extend_from_slice(&[9u8; 40]);
        let sent = send_gso(tx.as_raw_fd(), &burst, 172, rx.local_addr().unwrap());
        assert_eq!(sent, burst.len() as isize, "GSO send failed: {}", io::Error::last_os_error());
        let mut got = Vec::new();
        for _ in 0..50 {
            ring.submit_and_wait(1, Duration::from_millis(20)).unwrap();
            ring.drain_with(|c| {
                if let Completion::Recv { socket, from, data } = c {
                    assert_eq!((socket, from), (ix, Some(tx.local_addr().unwrap())));
                    got.push((data.len(), data[0]));
                }
            })
            .unwrap();
            if got.len() >= 6 {
                break;
            }
        }
        assert_eq!(got, vec![(172, 0), (172, 1), (172, 2), (172, 3), (172, 4), (40, 9)]);
        assert_eq!(ring.counters.gro_batches, 1, "the burst arrived coalesced");
    }

    #[test]
    fn one_ring_serves_many_sockets_and_polls() {
        let socks: Vec<_> = (0..3).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut ring = Ring::multi(64, 16, 2048).unwrap().with_send_slots(8, 256).unwrap();
        let ixs: Vec<u32> = socks.iter().map(|s| ring.add_socket(Sock::Fd(s.as_raw_fd())).unwrap()).collect();
        // Each socket sends from its own port through the shared ring.
        for (i, s) in socks.iter().enumerate() {
            assert!(ring.send_copy_from(Sock::Fd(s.as_raw_fd()), &[i as u8; 10], peer.local_addr().unwrap()));
        }
        ring.submit().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (n, from) = peer.recv_from(&mut buf).unwrap();
            let i = buf[0] as usize;
            assert_eq!((n, from), (10, socks[i].local_addr().unwrap()));
            seen.push(i);
            // Reply to whichever socket sent it.
            peer.send_to(&[100 + i as u8], from).unwrap();
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2]);
        // A poll on a TCP listener fires when a connection waits.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        ring.poll(l.as_raw_fd(), libc::POLLIN as u32, 77).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut replies, mut polls) = (Vec::new(), Vec::new());
        for _ in 0..50 {
            ring.submit_and_wait(1, Duration::from_millis(20)).unwrap();
            ring.drain_with(|c| match c {
                Completion::Recv { socket, data, .. } => replies.push((socket, data[0])),
                Completion::Poll { token, result } => polls.push((token, result & libc::POLLIN as i32 != 0)),
                other => panic!("unexpected completion {other:?}"),
            })
            .unwrap();
            if replies.len() == 3 && !polls.is_empty() {
                break;
            }
        }
        replies.sort();
        assert_eq!(replies, vec![(ixs[0], 100), (ixs[1], 101), (ixs[2], 102)]);
        assert_eq!(polls, vec![(77, true)]);
        // A removed socket delivers nothing more; the others go on.
        ring.remove_socket(ixs[1]).unwrap();
        ring.submit_and_wait(1, Duration::from_millis(20)).unwrap();
        ring.drain_with(|_| {}).unwrap();
        peer.send_to(b"x", socks[1].local_addr().unwrap()).unwrap();
        peer.send_to(b"y", socks[2].local_addr().unwrap()).unwrap();
        let mut after = Vec::new();
        for _ in 0..10 {
            ring.submit_and_wait(1, Duration::from_millis(20)).unwrap();
            ring.drain_with(|c| {
                if let Completion::Recv { socket, data, .. } = c {
                    after.push((socket, data[0]))
                }
            })
            .unwrap();
        }
        assert_eq!(after, vec![(ixs[2], b'y')]);
    }

    /// A TCP connection that lives only in the ring's file table: its descriptor is closed
    /// once installed, and connect, send, multishot receive, the end of the stream and
    /// cancellation all go through the ring.
    #[test]
    fn a_stream_in_the_file_table_connects_sends_and_receives() {
        use std::io::{Read, Write};
        use std::os::fd::{FromRawFd, OwnedFd};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ring = Ring::multi(64, 16, 2048).unwrap();
        ring.register_table(4).unwrap();
        let connect_stream = |ring: &mut Ring, slot: u32, token: u32, to: SocketAddr| {
            // SAFETY: socket() takes no pointers.
            let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
            // SAFETY: a fresh descriptor, owned from here on.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let inode = |fd: RawFd| {
                // SAFETY: fstat writes into a zeroed stat; a closed number gives -1.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
            };
            let before = inode(raw);
            ring.install(slot, fd).unwrap();
            // The descriptor is closed: only the table holds the socket. (Other tests of
            // this binary may have reused the number since: it must not be this socket.)
            assert!(before.is_some() && inode(raw) != before, "the descriptor was closed");
            ring.connect(Sock::Fixed(slot), to, token).unwrap();
            ring.submit().unwrap();
        };
        let to = listener.local_addr().unwrap();
        connect_stream(&mut ring, 1, 10, to);
        let (mut peer, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // Reap until `done` says so, within a bound.
        // (token, result, bytes, still armed)
        type Event = (u32, i32, Vec<u8>, bool);
        let mut events: Vec<Event> = Vec::new();
        let reap = |ring: &mut Ring, events: &mut Vec<Event>, done: &dyn Fn(&[Event]) -> bool| {
            for _ in 0..100 {
                ring.submit_and_wait(1, Duration::from_millis(20)).unwrap();
                ring.drain_with(|c| match c {
                    Completion::Op { token, result } => events.push((token, result, Vec::new(), false)),
                    Completion::Sent { token, result, data } => events.push((token, result, data, false)),
                    Completion::Stream { token, result, data, more } => {
                        events.push((token, result, data.to_vec(), more))
                    }
                    other => panic!("unexpected completion {other:?}"),
                })
                .unwrap();
                if done(events) {
                    return;
                }
            }
            panic!("not done: {events:?}");
        };
        reap(&mut ring, &mut events, &|e| e.iter().any(|x| x.0 == 10));
        assert_eq!(events[0].1, 0, "connected: {events:?}");
        // Send through the ring; the peer reads it.
        // The ring holds the buffer until the send completes; the caller keeps no copy. It
        // sends from an offset (the rest of a short send).
        let msg = b"hello from the table".to_vec();
        ring.recv_stream(Sock::Fixed(1), 11).unwrap();
        ring.send_stream(Sock::Fixed(1), b"xxhello from the table".to_vec(), 2, 12).unwrap();
        let (e, back) = ring.send_stream(Sock::Fixed(1), b"again".to_vec(), 0, 12).unwrap_err();
        assert_eq!((e.kind(), back), (io::ErrorKind::AlreadyExists, b"again".to_vec()), "one send per token");
        ring.submit().unwrap();
        let mut got = vec![0u8; msg.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
        // The peer writes twice; the multishot receive delivers both, then the end.
        peer.write_all(b"one").unwrap();
        reap(&mut ring, &mut events, &|e| e.iter().any(|x| x.0 == 11));
        peer.write_all(b"two").unwrap();
        drop(peer);
        reap(&mut ring, &mut events, &|e| e.iter().any(|x| x.0 == 11 && x.1 == 0));
        assert!(
            events.iter().any(|x| x.0 == 12 && x.1 == msg.len() as i32 && x.2 == b"xxhello from the table"),
            "the whole send completed and handed its buffer back: {events:?}"
        );
        let bytes: Vec<u8> = events.iter().filter(|x| x.0 == 11 && x.1 > 0).flat_map(|x| x.2.clone()).collect();
        assert_eq!(bytes, b"onetwo");
        assert!(
            events.iter().any(|x| x.0 == 11 && x.1 == 0 && !x.3),
            "the end of the stream ends the receive: {events:?}"
        );
        // A second connection in the other entry: its armed receive is cancelled by token.
        events.clear();
        connect_stream(&mut ring, 3, 20, to);
        let (_peer2, _) = listener.accept().unwrap();
        reap(&mut ring, &mut events, &|e| e.iter().any(|x| x.0 == 20));
        ring.recv_stream(Sock::Fixed(3), 21).unwrap();
        ring.submit().unwrap();
        ring.cancel(Pending::Receive, 21).unwrap();
        reap(&mut ring, &mut events, &|e| e.iter().any(|x| x.0 == 21));
        assert!(events.iter().any(|x| x.0 == 21 && x.1 == -libc::ECANCELED), "{events:?}");
        ring.uninstall(3).unwrap();
    }

    /// A thread that is descheduled while datagrams arrive finds a backlog in its socket.
    /// All of it must come out of the next few waits, with no new arrival: one multishot
    /// run takes 33 datagrams per enter, so without re-entering, 1,000 took 31 waits.
    #[test]
    fn a_backlog_built_up_during_a_stall_drains_without_new_arrivals() {
        for (nbufs, nsock) in [(4096u16, 1usize), (64, 1), (4096, 4), (256, 4)] {
            let rxs: Vec<_> = (0..nsock).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
            let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut ring = Ring::multi(256, nbufs, 2048).unwrap();
            for rx in &rxs {
                crate::driver::set_socket_buffers(rx, 8 << 20);
                ring.add_socket(Sock::Fd(rx.as_raw_fd())).unwrap();
            }
            // The receive is armed and parked on an empty socket.
            for _ in 0..3 {
                ring.submit_and_wait(1, Duration::from_millis(5)).unwrap();
                ring.drain(|_, _| {}).unwrap();
            }
            // The "stall": 1000 datagrams per socket arrive while the thread is not in the ring.
            const N: usize = 1000;
            for i in 0..N as u32 {
                for rx in &rxs {
                    tx.send_to(&i.to_be_bytes().repeat(43), rx.local_addr().unwrap()).unwrap();
                }
            }
            let mut got = 0;
            let mut turns = Vec::new();
            // 1000 per socket is 31 multishot runs; a drain makes up to 17.
            for _ in 0..3 {
                ring.submit_and_wait(1, Duration::from_millis(5)).unwrap();
                let n = ring.drain(|_, _| {}).unwrap();
                turns.push(n);
                got += n;
                if got == N * nsock {
                    break;
                }
            }
            assert_eq!(
                got,
                N * nsock,
                "nbufs {nbufs} sockets {nsock}: datagrams per turn: {turns:?}; counters {:?}",
                ring.counters
            );
        }
    }
}
