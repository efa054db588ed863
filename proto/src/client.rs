//! The client: a sans-IO state machine for one registered endpoint and its calls.
//!
//! It owns no socket, thread or clock. The driver feeds it input (`handle_connected`,
//! `handle_frame`, `handle_datagram`, `handle_timeout`, `handle_disconnected`), issues
//! commands (`call`, `hangup`, `send_media`), and drains output after each step:
//! [`Client::poll_frame`] (to the manager over TCP), [`Client::poll_transmit`] (UDP
//! datagrams), [`Client::poll_event`] (for the application), then sleeps until
//! [`Client::poll_timeout`].
//!
//! ## A call, as caller
//! `call()` sends CALL and waits for START (`start_timeout`). On START the caller sends one
//! null packet (opens its own firewall at once) and is ready for media: the application
//! streams with `send_media`; the first packet from the callee marks the path two-way
//! (`first_media_timeout` bounds the wait).
//!
//! ## A call, as callee
//! On INCOMING the callee sends a null packet to the caller's public address at once (this
//! opens the callee's firewall towards the caller; the caller's firewall drops it), replies
//! PUNCHED, and re-sends the null packet with exponential backoff (`null_retry_initial`,
//! doubling, at most `null_retries` times) until the first packet from the caller arrives,
//! which marks the path two-way. It answers that first packet with one more null packet,
//! so the caller learns the path is two-way even before any media.
//!
//! ## Both
//! On an established path a keepalive null packet goes out whenever nothing was sent for
//! `keepalive_interval` (under 25 s, since Linux conntrack forgets an unreplied UDP flow after
//! 30 s); if nothing arrives for `media_timeout` the call ends with `PeerGone`. Media keeps
//! flowing if the manager connection drops: the path is direct.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::e2e::{self, CallKeys, E2eError, Ephemeral, IdentityKey, KeyGen};
use crate::nat::{self, NatClass, Strategy};
use crate::portmap::{MapEvent, MapProto, PortMapper};
use crate::rng::Rng;
use crate::srtp::{self, SrtpReceiver, SrtpSender};
use crate::stats::RtpReceiverStats;
use crate::wire::frame::{
    AddrSource, AuthToken, CallId, Candidate, CandidateKind, ClientId, ErrorCode, Frame, HangupReason, KeyShare,
    RejectReason, UnknownReason, MAX_CANDIDATES,
};
use crate::wire::null::{null_mac_ok, probe_tag, CounterWindow, NullPacket, NULL_LEN};
use crate::wire::portmap;
use crate::wire::rtp::{RtpHeader, HEADER_LEN as RTP_HEADER_LEN, OPUS_CLOCK_HZ, OPUS_PAYLOAD_TYPE};
use crate::wire::stun::{self, StunMessage, TransactionId};
use crate::wire::{classify, DatagramKind};

/// A local handle for a call, unique within one [`Client`]. For calls this client places it
/// is also the `call_ref` sent in CALL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallHandle(pub u32);

/// Which side of a call this client is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Placed the call.
    Caller,
    /// Received the call.
    Callee,
}

impl Role {
    /// "caller" or "callee".
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Caller => "caller",
            Role::Callee => "callee",
        }
    }
}

/// Timers and limits of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// This client's id.
    pub id: ClientId,
    /// The local UDP port (sent in REGISTER and PUNCHED).
    pub local_udp_port: u16,
    /// Calls this client takes at once; the manager answers BUSY beyond it.
    pub max_calls: u16,
    /// Where to send the STUN binding request (the manager's UDP address); `None` skips
    /// discovery and lets the manager fall back to the TCP peer address.
    pub stun_server: Option<SocketAddr>,
    /// STUN attempts before registering without a binding.
    pub stun_attempts: u32,
    /// Interval between STUN attempts.
    pub stun_interval: Duration,
    /// After discovery, classify the NAT ([`crate::nat`]): ask each further STUN address the
    /// manager's answers name (at most two) and send the class in REGISTER. Registration
    /// waits for those answers: one round trip each. An address that does not answer is
    /// asked twice, each time waiting twice the first answer's round trip plus 10 ms (at
    /// least 20 ms, at most `stun_interval`), and then left out of the class.
    pub nat_probe: bool,
    /// Send the null packet when answering (false: the negative control `--no-null`).
    pub send_null: bool,
    /// Null packet re-sends after the first one, while waiting for the caller's first packet.
    pub null_retries: u32,
    /// First null re-send interval; doubles after each re-send.
    pub null_retry_initial: Duration,
    /// Caller: CALL to START.
    pub start_timeout: Duration,
    /// START (caller) or INCOMING (callee) to the first packet from the peer.
    pub first_media_timeout: Duration,
    /// Send a keepalive null packet when nothing was sent to the peer for this long.
    pub keepalive_interval: Duration,
    /// End the call when nothing arrived from the peer for this long.
    pub media_timeout: Duration,
    /// PING the manager this often.
    pub ping_interval: Duration,
    /// RTP clock rate of the media sent and received.
    pub clock_hz: u32,
    /// RTP payload type sent.
    pub payload_type: u8,
    /// Registration token for a manager that requires one (`manager token`).
    pub auth: Option<AuthToken>,
    /// Birthday search, hard side: sockets opened, each sending a probe to the easy side.
    pub birthday_sockets: u16,
    /// Birthday search, easy side: probes per second to ports of the hard side's IP.
    pub birthday_rate: u32,
    /// Birthday search, easy side: probes per round; then a pause of `birthday_pause`.
    pub birthday_budget: u32,
    /// Birthday search, easy side: the pause between rounds (the routers' conntrack
    /// entries of the round age meanwhile).
    pub birthday_pause: Duration,
    /// A birthday search (START or INCOMING to the first packet from the peer) gives up
    /// after this long; it replaces `first_media_timeout` for such calls.
    pub birthday_timeout: Duration,
    /// Birthday search, hard side: re-send every socket's probe this often, so the NAT
    /// mappings (and the easy side's window for them) stay open while the search runs.
    pub birthday_repunch: Duration,
    /// This client's own addresses with its UDP port (host candidates, sent in REGISTER):
    /// a peer behind the same public IP reaches it there without a hairpin through the
    /// router. At most [`MAX_CANDIDATES`] are sent.
    pub host_candidates: Vec<SocketAddr>,
    /// Ask this router (its address and port 5351) for a port mapping of the UDP port, with
    /// PCP and then NAT-PMP ([`crate::portmap`]), on behalf of this IPv4 address (the
    /// socket's address towards the router). Registration waits for the answer (at most
    /// 600 ms, once); a mapping on the public IP the manager sees is sent in REGISTER and
    /// handed out to peers instead of the observed address.
    pub port_mapping: Option<(SocketAddr, std::net::Ipv4Addr)>,
    /// The lifetime asked for a port mapping (renewed at half of what the router grants).
    pub port_mapping_lifetime: Duration,
    /// SRTP suites ([`crate::e2e`] codes), best first: a caller offers them, a callee picks
    /// the first of them the offer holds. Default AEAD_AES_128_GCM, then
    /// AES_CM_128_HMAC_SHA1_80; `[SUITE_NONE]` (`--no-srtp`) sends plain RTP and only talks
    /// to a peer that allows that too.
    pub srtp_suites: Vec<u8>,
    /// Seeds the per-call X25519 keys ([`KeyGen`]). Drivers fill it from the kernel's
    /// CSPRNG (`engine::entropy::secure_key`); all zeros (the default, for simulations)
    /// derives it from the client's `seed`.
    pub key_seed: [u8; 32],
    /// This client's long-term identity: its key shares are signed with it.
    pub identity: Option<std::sync::Arc<IdentityKey>>,
    /// The peer's identity key this client requires: a call whose key share is not signed
    /// by it is refused (pinning defeats a manager that swaps the key shares).
    pub peer_key: Option<[u8; 32]>,
}

impl ClientConfig {
    /// Defaults for a voice client with the given id and local UDP port.
    pub fn new(id: ClientId, local_udp_port: u16) -> Self {
        ClientConfig {
            id,
            local_udp_port,
            max_calls: 1,
            stun_server: None,
            stun_attempts: 4,
            stun_interval: Duration::from_millis(250),
            nat_probe: true,
            send_null: true,
            null_retries: 6,
            null_retry_initial: Duration::from_millis(50),
            start_timeout: Duration::from_secs(5),
            first_media_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(15),
            media_timeout: Duration::from_secs(35),
            ping_interval: Duration::from_secs(10),
            clock_hz: OPUS_CLOCK_HZ,
            payload_type: OPUS_PAYLOAD_TYPE,
            auth: None,
            birthday_sockets: 256,
            birthday_rate: 100,
            birthday_budget: 2048,
            birthday_pause: Duration::from_secs(5),
            birthday_timeout: Duration::from_secs(30),
            birthday_repunch: Duration::from_secs(10),
            host_candidates: Vec::new(),
            port_mapping: None,
            port_mapping_lifetime: Duration::from_secs(3600),
            srtp_suites: vec![e2e::SUITE_AES_128_GCM, e2e::SUITE_AES_CM_SHA1_80],
            key_seed: [0; 32],
            identity: None,
            peer_key: None,
        }
    }
}

/// Why a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// This side hung up.
    LocalHangup,
    /// The other side (or the manager) sent HANGUP.
    RemoteHangup(HangupReason),
    /// The manager rejected the call (or the callee declined).
    Rejected(RejectReason),
    /// The callee is at its call limit.
    Busy,
    /// The callee is not registered.
    Unknown(UnknownReason),
    /// Caller: no START within `start_timeout`.
    NoStart,
    /// No packet from the peer within `first_media_timeout` after START / INCOMING.
    NoMedia,
    /// The path was up, then nothing arrived for `media_timeout`.
    PeerGone,
    /// The manager connection was lost before the call was set up.
    ManagerLost,
    /// A birthday search ended without finding a port pair (`birthday_timeout`).
    NoPairFound,
    /// The end-to-end key exchange failed: no common SRTP suite, a missing or invalid key
    /// share, or a peer identity other than the pinned one.
    KeyExchange(E2eError),
}

impl EndReason {
    /// True for a call that was set up and then ended normally.
    pub fn is_success(self) -> bool {
        matches!(self, EndReason::LocalHangup | EndReason::RemoteHangup(HangupReason::Normal))
    }

    /// Which phase failed, for humans: "no START", "no media", ...; `None` for success.
    pub fn failed_phase(self) -> Option<&'static str> {
        match self {
            EndReason::LocalHangup | EndReason::RemoteHangup(HangupReason::Normal) => None,
            EndReason::RemoteHangup(_) => Some("hung up by peer"),
            EndReason::Rejected(_) => Some("rejected"),
            EndReason::Busy => Some("busy"),
            EndReason::Unknown(_) => Some("unknown callee"),
            EndReason::NoStart => Some("no START"),
            EndReason::NoMedia => Some("no media"),
            EndReason::PeerGone => Some("media stopped"),
            EndReason::ManagerLost => Some("manager lost"),
            EndReason::NoPairFound => Some("no port pair found"),
            EndReason::KeyExchange(_) => Some("key exchange"),
        }
    }

    /// A short lowercase description.
    pub fn describe(self) -> String {
        match self {
            EndReason::LocalHangup => "hung up".into(),
            EndReason::RemoteHangup(r) => format!("remote hangup ({r})"),
            EndReason::Rejected(RejectReason::NoPath) => format!("rejected ({})", nat::NO_PATH_REASON),
            EndReason::Rejected(r) => format!("rejected ({r})"),
            EndReason::Busy => "callee busy".into(),
            EndReason::Unknown(UnknownReason::NeverRegistered) => "unknown callee (never registered)".into(),
            EndReason::Unknown(UnknownReason::Offline) => "unknown callee (offline)".into(),
            EndReason::NoStart => "no START from the manager".into(),
            EndReason::NoMedia => "no media from the peer".into(),
            EndReason::PeerGone => "peer stopped sending".into(),
            EndReason::ManagerLost => "manager connection lost during setup".into(),
            EndReason::NoPairFound => "the birthday search found no port pair in time".into(),
            EndReason::KeyExchange(e) => format!("end-to-end key exchange failed ({e})"),
        }
    }
}

/// Everything measured about one call, reported when it ends.
#[derive(Debug, Clone)]
pub struct CallReport {
    /// Local handle.
    pub handle: CallHandle,
    /// The manager's call id, if one was assigned.
    pub call_id: Option<CallId>,
    /// Caller or callee.
    pub role: Role,
    /// The peer's client id (callee: the caller; caller: the callee).
    pub peer_id: ClientId,
    /// This client's public UDP address as the manager reported it.
    pub local: Option<SocketAddr>,
    /// The peer's public UDP address.
    pub peer: Option<SocketAddr>,
    /// This client's NAT class, as sent in REGISTER.
    pub nat: NatClass,
    /// The peer's NAT class, as the manager passed it on (INCOMING or START).
    pub peer_nat: NatClass,
    /// How the path was made ([`nat::strategy`] of caller and callee classes; for a call
    /// that never reached INCOMING or START, from this side's class alone).
    pub strategy: Strategy,
    /// Caller: CALL sent to START received. Callee: INCOMING to the first media (RTP)
    /// packet received.
    pub setup: Option<Duration>,
    /// CALL sent (caller) or INCOMING received (callee) to the first media packet received.
    pub first_media: Option<Duration>,
    /// Time from setup complete to the end.
    pub duration: Duration,
    /// RTP packets sent.
    pub sent: u64,
    /// RTP packets received.
    pub received: u64,
    /// RTP packets lost (RFC 3550).
    pub lost: u64,
    /// Interarrival jitter (RFC 3550), milliseconds.
    pub jitter_ms: f64,
    /// Null packets sent (punch and keepalive).
    pub nulls_sent: u64,
    /// Null packets received from the peer.
    pub nulls_received: u64,
    /// Birthday search: probes this side sent (easy side: one per port of the peer's IP
    /// tried; hard side: one per socket and re-send). Each is a conntrack entry on the
    /// routers it leaves through.
    pub probes_sent: u64,
    /// Birthday search, hard side: sockets opened.
    pub sockets_opened: u32,
    /// Birthday search: the pair was found by this side hearing the peer (the other side's
    /// probe or punch arrived) rather than by the peer's confirmation.
    pub found_here: bool,
    /// Addresses of the peer this side sent its setup null packet to (the one the manager
    /// named and the peer's host candidates; 0 for a search, which counts probes).
    pub candidates_tried: u32,
    /// Which of the peer's addresses the media path uses.
    pub path: PathKind,
    /// Why it ended.
    pub reason: EndReason,
    /// The SRTP suite of the call ([`crate::e2e`] code; [`e2e::SUITE_NONE`] for plain RTP
    /// or a call that never agreed keys).
    pub suite: u8,
    /// The peer's identity key, if its key share was signed (verified).
    pub peer_identity: Option<[u8; 32]>,
    /// Packets of this call refused by SRTP: failed authentication or replayed.
    pub media_refused: u64,
    /// The peer's null packets refused: bad MAC or replayed counter.
    pub nulls_refused: u64,
}

impl CallReport {
    /// True if the call was set up, media arrived from the peer, and it ended normally.
    pub fn succeeded(&self) -> bool {
        self.reason.is_success() && self.first_media.is_some()
    }
}

/// Which of the peer's addresses a call's media path uses (`docs/protocol.md` 5.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// No packet came from the peer.
    None,
    /// The public address the manager observed (server-reflexive).
    Public,
    /// The peer's port mapping on its router.
    Mapped,
    /// One of the peer's IPv4 host addresses (both behind one NAT, on one LAN).
    Host,
    /// One of the peer's IPv6 addresses (no NAT: its stateful firewall, opened by its punch).
    Ipv6,
    /// An address the manager did not name: the peer's NAT's port towards this side (a
    /// peer-reflexive address), learnt from the peer's token-checked null packet, or the
    /// pair a birthday search found.
    PeerReflexive,
}

impl PathKind {
    /// Its name in output.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::None => "none",
            PathKind::Public => "public",
            PathKind::Mapped => "mapped",
            PathKind::Host => "host",
            PathKind::Ipv6 => "ipv6",
            PathKind::PeerReflexive => "peer-reflexive",
        }
    }
}

/// Events for the application.
#[derive(Debug, Clone)]
pub enum Event {
    /// The manager accepted the registration.
    Registered {
        /// The public UDP address the manager hands out for this client.
        public: SocketAddr,
        /// How the manager learned it.
        source: AddrSource,
    },
    /// A port mapping was made, renewed, refused or lost ([`crate::portmap`]).
    PortMapping(MapEvent),
    /// STUN discovery (and NAT classification) finished (before REGISTER).
    Discovered {
        /// The mapped address, or `None` if every attempt went unanswered.
        mapped: Option<SocketAddr>,
        /// The NAT class measured (unknown without a second STUN address).
        nat: NatClass,
        /// The mappings towards each STUN address that answered, in the order asked.
        mappings: Vec<SocketAddr>,
    },
    /// An incoming call was answered (null packet sent, PUNCHED replied).
    Incoming {
        /// Local handle.
        handle: CallHandle,
        /// The manager's call id.
        call_id: CallId,
        /// Who calls.
        caller: ClientId,
        /// From where.
        caller_addr: SocketAddr,
    },
    /// Caller: START received; media may be sent now.
    Started {
        /// Local handle.
        handle: CallHandle,
        /// The manager's call id.
        call_id: CallId,
        /// The callee's public address.
        peer: SocketAddr,
    },
    /// A birthday search found its port pair (this side heard the other, or the other's
    /// confirmation arrived). Comes before `Started` (caller) and `MediaFlowing`.
    PairFound {
        /// Local handle.
        handle: CallHandle,
        /// The peer's address on the pair (easy side: the port the search found).
        peer: SocketAddr,
        /// Probes this side had sent.
        probes_sent: u64,
        /// START (caller) or INCOMING (callee) to the hit.
        after: Duration,
    },
    /// The first packet from the peer arrived: the path works both ways from here.
    MediaFlowing {
        /// Local handle.
        handle: CallHandle,
    },
    /// A call ended (successfully or not).
    Ended(Box<CallReport>),
    /// The manager sent an ERROR.
    ManagerError {
        /// Code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// The manager has not answered PINGs for three intervals.
    ManagerUnresponsive,
}

/// One output of [`Client::poll_output`].
#[derive(Debug)]
pub enum Output {
    /// A frame to write to the manager connection.
    Frame(Frame),
    /// A control datagram, written at the start of the caller's buffer.
    Transmit(Transmit),
    /// An event for the application.
    Event(Event),
    /// Open another UDP socket on the main socket's local IP with a port of the system's
    /// choice, and feed what it receives to [`Client::handle_datagram_on`] with this id
    /// (a birthday search). If it cannot be opened, tell [`Client::handle_socket_failed`].
    OpenSocket(SocketId),
    /// Close a socket opened by [`Output::OpenSocket`].
    CloseSocket(SocketId),
    /// Nothing more is queued; call [`Client::handle_timeout`] at this time (`None`: no
    /// timer is armed).
    Timeout(Option<Instant>),
}

/// Room [`Client::poll_output`] needs for the largest control datagram (a STUN request).
pub const MAX_CONTROL_DATAGRAM: usize = SMALL_DATAGRAM;

/// What the client has queued, in wire order.
#[derive(Debug)]
enum Queued {
    Frame(Frame),
    Datagram(SmallDatagram),
    Event(Event),
    Open(SocketId),
    Close(SocketId),
}

/// One of the client's UDP sockets: [`SocketId::MAIN`] is the one registered with the
/// manager; others are opened for a birthday search ([`Output::OpenSocket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(pub u32);

impl SocketId {
    /// The client's own socket.
    pub const MAIN: SocketId = SocketId(0);
}

/// A datagram to send: `len` bytes at the start of the caller's buffer, to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// The socket to send from.
    pub from: SocketId,
    /// Destination.
    pub to: SocketAddr,
    /// Bytes written to the buffer.
    pub len: usize,
}

/// RTP fields of an outgoing media packet (see [`Client::send_rtp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaFields {
    /// Marker bit; `None`: set on the call's first packet only.
    pub marker: Option<bool>,
    /// Payload type (7 bits).
    pub payload_type: u8,
    /// RTP timestamp; `None`: the call's own clock.
    pub timestamp: Option<u32>,
}

/// A media packet received for a call; borrows the driver's receive buffer.
#[derive(Debug)]
pub struct Received<'a> {
    /// The call it belongs to.
    pub handle: CallHandle,
    /// Its RTP header.
    pub header: RtpHeader,
    /// Its payload.
    pub payload: &'a [u8],
}

/// Errors of client commands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The client is not registered with the manager.
    #[error("not registered with the manager")]
    NotRegistered,
    /// No such call (ended or never existed).
    #[error("no call with handle {0:?}")]
    NoSuchCall(CallHandle),
    /// The call has no peer address yet (caller before START).
    #[error("call {0:?} has no path yet")]
    NoPath(CallHandle),
    /// The output buffer is too small for the packet.
    #[error("buffer of {have} bytes too small for a {need}-byte packet")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
}

/// Drop and anomaly counters of a client. Every datagram or frame that is not used is
/// counted in exactly one of these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCounters {
    /// Datagrams whose first byte matched no known kind.
    pub dgram_unknown: u64,
    /// Datagrams of a known kind that failed to parse.
    pub dgram_malformed: u64,
    /// Valid datagrams that belong to no current call (or carry a wrong token).
    pub dgram_unmatched: u64,
    /// Datagrams for a call that came from an address other than the peer's.
    pub dgram_wrong_source: u64,
    /// RTCP packets (accepted, not interpreted yet).
    pub rtcp: u64,
    /// STUN messages that were not the expected binding response.
    pub stun_unexpected: u64,
    /// Frames that were valid but unexpected (duplicates, unknown calls, late answers).
    pub frames_unexpected: u64,
    /// Search sockets the driver could not open ([`Client::handle_socket_failed`]).
    pub sockets_failed: u64,
    /// Birthday searches where two pairs were found at once and this (easy) side moved to
    /// the one the hard side confirmed.
    pub relatched: u64,
    /// Calls whose path latched on an address the manager did not name (the peer's host
    /// address, or its NAT's port towards this side), learnt from the peer's first
    /// token-checked null packet.
    pub latched_elsewhere: u64,
    /// The callee's punches that arrived before START named their call (a LAN or a port
    /// mapping let them in) and set the path at START. While a call waits for START, such
    /// null packets are kept (the last [`EARLY_NULLS`]); on arrival each was counted in
    /// `dgram_unmatched`.
    pub early_nulls: u64,
    /// Null packets (and probes) of a known call whose MAC did not verify under the call's
    /// key, or that came before the keys were agreed, and bare (zero-length) null packets:
    /// dropped; they teach no address.
    pub nulls_unauthenticated: u64,
    /// Null packets with a valid MAC and a counter already seen (a replay): dropped.
    pub nulls_replayed: u64,
    /// RTP of a known call (address and SSRC matched) whose SRTP authentication failed.
    pub media_unauthenticated: u64,
    /// SRTP packets replayed or older than the replay window.
    pub media_replayed: u64,
    /// Calls refused or ended because the end-to-end key exchange failed.
    pub key_exchange_failed: u64,
}

/// Happy Eyeballs (RFC 8305 section 5): the head start IPv6 candidates get before a caller
/// punches the IPv4 addresses.
pub const HAPPY_EYEBALLS_DELAY: Duration = Duration::from_millis(50);

/// How many setup null packets of not-yet-started calls a caller keeps (see
/// [`ClientCounters::early_nulls`]).
pub const EARLY_NULLS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    /// Caller: CALL sent, waiting for START.
    Calling,
    /// Callee: null sent and PUNCHED replied; waiting for the caller's first packet.
    Punching,
    /// Path known; media may flow. `two_way` once a packet from the peer arrived.
    Media,
    /// A birthday search for a port pair is under way (after START or INCOMING).
    Searching,
}

#[derive(Debug)]
struct Call {
    role: Role,
    state: CallState,
    peer_id: ClientId,
    call_id: Option<CallId>,
    token: u64,
    peer_addr: Option<SocketAddr>,
    peer_nat: NatClass,
    created: Instant,
    setup_done: Option<Instant>,
    first_rx: Option<Instant>,
    first_rtp_rx: Option<Instant>,
    /// Phase deadline (START, first media) while setting up.
    deadline: Option<Instant>,
    next_null: Option<Instant>,
    null_interval: Duration,
    null_retries_left: u32,
    last_tx: Instant,
    last_rx: Instant,
    ssrc_tx: u32,
    seq_tx: u16,
    ts_tx: u32,
    sent: u64,
    nulls_sent: u64,
    nulls_rx: u64,
    rx: RtpReceiverStats,
    /// The time of this call's live entry in the timer heap (None: no live entry).
    scheduled: Option<Instant>,
    /// Generation of the live heap entry; older entries are stale.
    timer_gen: u32,
    strategy: Strategy,
    /// The socket this call's datagrams leave from (and must arrive on).
    socket: SocketId,
    search: Option<Box<Search>>,
    probes_sent: u64,
    sockets_opened: u32,
    found_here: bool,
    /// The peer's address the manager named (INCOMING or START).
    named: Option<SocketAddr>,
    /// The peer's other addresses (host candidates: IPv4 ones when behind one public IP,
    /// IPv6 ones when both sides have some).
    candidates: Vec<SocketAddr>,
    candidates_tried: u32,
    /// Caller with IPv6 candidates (Happy Eyeballs, RFC 8305): when to punch the IPv4
    /// addresses if nothing came from the peer over IPv6 by then.
    v4_punch_at: Option<Instant>,
    /// Caller: this call's X25519 key pair, until START.
    eph: Option<Box<(Ephemeral, KeyShare)>>,
    /// The call's keys and SRTP contexts, once agreed (boxed: the key schedules are large).
    crypto: Option<Box<CallCrypto>>,
    /// This side's null packet counter (the last one sent).
    null_tx: u32,
    /// The peer's null packet counters seen.
    null_rx: CounterWindow,
    media_refused: u64,
    nulls_refused: u64,
}

/// A call's agreed keys.
struct CallCrypto {
    keys: CallKeys,
    tx: Option<SrtpSender>,
    rx: Option<SrtpReceiver>,
    peer_identity: Option<[u8; 32]>,
}

impl std::fmt::Debug for CallCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CallCrypto({:?})", self.keys)
    }
}

impl CallCrypto {
    fn new(keys: CallKeys, role: Role, peer_identity: Option<[u8; 32]>) -> CallCrypto {
        let (tx, rx) = match role {
            Role::Caller => (keys.caller_to_callee, keys.callee_to_caller),
            Role::Callee => (keys.callee_to_caller, keys.caller_to_callee),
        };
        let mk = |m: e2e::MasterKeys| {
            srtp::Suite::from_code(keys.suite).map(|suite| srtp::MasterKey { key: m.key, salt: m.salt, suite })
        };
        let (tx, rx) = (mk(tx), mk(rx));
        CallCrypto { tx: tx.as_ref().map(SrtpSender::new), rx: rx.as_ref().map(SrtpReceiver::new), keys, peer_identity }
    }
}

/// A birthday search in progress (see [`Strategy::Birthday`]).
#[derive(Debug)]
struct Search {
    /// Hard side: the sockets opened, each with one NAT mapping towards the easy side.
    sockets: Vec<SocketId>,
    /// Hard side: when to re-send every socket's probe.
    next_repunch: Option<Instant>,
    /// Easy side: the hard side's public IP (its ports are searched).
    peer_ip: std::net::IpAddr,
    /// Easy side: predicted ports to try first (a sequential NAT), in order.
    predicted: VecDeque<u16>,
    /// Easy side: the ports of the peer's IP in a seeded order, each once.
    walk: Option<nat::PortWalk>,
    /// Easy side: when the next probe is due, and probes sent in this round.
    next_probe: Option<Instant>,
    round_sent: u32,
    /// The token field of this side's probes, and the one the peer's must carry
    /// ([`crate::wire::null::probe_tag`]).
    tx_tag: u64,
    rx_tag: u64,
}

impl Call {
    /// The earliest time any of this call's timers is due.
    fn next_deadline(&self, cfg: &ClientConfig) -> Option<Instant> {
        let keepalive = (self.state == CallState::Media).then(|| self.last_tx + cfg.keepalive_interval);
        let silence = self.first_rx.map(|_| self.last_rx + cfg.media_timeout);
        let search = self.search.as_ref().and_then(|s| [s.next_probe, s.next_repunch].into_iter().flatten().min());
        [self.deadline, self.next_null, keepalive, silence, search, self.v4_punch_at].into_iter().flatten().min()
    }

    fn ssrcs(role: Role, token: u64) -> (u32, u32) {
        // The caller's SSRC is the token's low half, the callee's the high half; both sides
        // know the token, so each knows which SSRC to expect.
        let (lo, hi) = (token as u32, (token >> 32) as u32);
        match role {
            Role::Caller => (lo, hi),
            Role::Callee => (hi, lo),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegState {
    Disconnected,
    Discovering {
        attempts: u32,
        next: Instant,
    },
    /// Asking the further STUN address `probe.to` (NAT classification).
    Probing {
        attempts: u32,
        next: Instant,
    },
    Registering,
    Registered,
}

/// The NAT classification in progress: the STUN addresses asked and the mappings they saw.
#[derive(Debug, Clone)]
struct Probe {
    /// The address being asked now.
    to: SocketAddr,
    txid: TransactionId,
    /// Every STUN address asked so far (the main one first).
    asked: Vec<SocketAddr>,
    /// The mapping each answer reported, in the order asked.
    mappings: Vec<SocketAddr>,
    /// How long to wait for each answer.
    wait: Duration,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            to: SocketAddr::from(([0, 0, 0, 0], 0)),
            txid: [0; 12],
            asked: Vec::new(),
            mappings: Vec::new(),
            wait: PROBE_WAIT_MIN,
        }
    }
}

/// STUN addresses a client asks at most: the main port, the alternate IP, the alternate port.
const MAX_STUN_ADDRESSES: usize = 3;

/// Requests to one further STUN address before classifying without it.
const PROBE_ATTEMPTS: u32 = 2;

/// The shortest wait for a further STUN address's answer.
const PROBE_WAIT_MIN: Duration = Duration::from_millis(20);

/// A small control datagram queued for sending (null or STUN): fixed size, no allocation.
#[derive(Debug, Clone, Copy)]
struct SmallDatagram {
    from: SocketId,
    to: SocketAddr,
    len: u8,
    data: [u8; SMALL_DATAGRAM],
}

/// Room for the largest control datagram (a PCP request; a STUN request is 20 bytes, and so
/// is a null packet).
const SMALL_DATAGRAM: usize = {
    let small = if stun::REQUEST_LEN > NULL_LEN { stun::REQUEST_LEN } else { NULL_LEN };
    if portmap::PCP_MAP_LEN > small {
        portmap::PCP_MAP_LEN
    } else {
        small
    }
};

/// The client state machine. See the module docs.
#[derive(Debug)]
pub struct Client {
    cfg: ClientConfig,
    /// The manager connection's TLS exporter value (None on plain TCP): REGISTER's token is
    /// sent bound to it.
    conn_binding: Option<[u8; 32]>,
    rng: Rng,
    reg: RegState,
    txid: TransactionId,
    mapped: Option<SocketAddr>,
    public: Option<SocketAddr>,
    nat: NatClass,
    probe: Probe,
    calls: HashMap<CallHandle, Call>,
    by_call_id: HashMap<CallId, CallHandle>,
    by_ssrc: HashMap<u32, CallHandle>,
    next_handle: u32,
    /// The next search socket id (0 is the main socket).
    next_socket: u32,
    /// Call timers: (due, call, generation). Each live call has one live entry no later than
    /// its true next deadline; sending and receiving only move deadlines later, so the hot
    /// path never touches the heap. An early entry just re-arms when it fires.
    timers: BinaryHeap<Reverse<(Instant, CallHandle, u32)>>,
    /// Everything the client emits, in the order it must leave: frames, control
    /// datagrams and events in one queue, so the core decides wire order (the callee's null
    /// packet is queued before its PUNCHED), not each driver.
    out: VecDeque<Queued>,
    next_ping: Option<Instant>,
    ping_outstanding: Option<(u64, Instant)>,
    unresponsive_reported: bool,
    counters: ClientCounters,
    /// Setup null packets that came before their START (their MAC is checked at START, when
    /// the keys are known): (call, token, source, the packet).
    early: VecDeque<(CallId, u64, SocketAddr, [u8; NULL_LEN])>,
    /// Per-call key pairs.
    keygen: KeyGen,
    /// The port mapping client, if one is configured.
    mapper: Option<PortMapper>,
    /// REGISTER waits for the port mapping's first answer: Some(with the STUN binding).
    register_waiting: Option<bool>,
}

impl Client {
    /// A new, disconnected client. `seed` seeds call-independent randomness (STUN transaction
    /// ids, RTP initial sequence numbers and timestamps). Intervals below 10 ms are raised to
    /// 10 ms: a zero keepalive or ping interval would make the timers fire in a loop.
    pub fn new(mut cfg: ClientConfig, seed: u64) -> Self {
        const FLOOR: Duration = Duration::from_millis(10);
        for d in [
            &mut cfg.keepalive_interval,
            &mut cfg.media_timeout,
            &mut cfg.ping_interval,
            &mut cfg.stun_interval,
            &mut cfg.null_retry_initial,
            &mut cfg.birthday_repunch,
            &mut cfg.birthday_pause,
        ] {
            *d = (*d).max(FLOOR);
        }
        let key_seed = if cfg.key_seed == [0; 32] {
            // A simulation: reproducible keys from the seed.
            let mut r = Rng::new(seed ^ 0x6b65_7973_6565_6421);
            let mut k = [0u8; 32];
            r.fill(&mut k);
            k
        } else {
            cfg.key_seed
        };
        Client {
            keygen: KeyGen::new(&key_seed),
            cfg,
            conn_binding: None,
            rng: Rng::new(seed),
            reg: RegState::Disconnected,
            txid: [0; 12],
            mapped: None,
            public: None,
            nat: NatClass::Unknown,
            probe: Probe::default(),
            calls: HashMap::new(),
            by_call_id: HashMap::new(),
            by_ssrc: HashMap::new(),
            next_handle: 1,
            next_socket: 1,
            timers: BinaryHeap::new(),
            out: VecDeque::new(),
            next_ping: None,
            ping_outstanding: None,
            unresponsive_reported: false,
            counters: ClientCounters::default(),
            early: VecDeque::new(),
            mapper: None,
            register_waiting: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// True once REGISTERED was received on the current connection.
    pub fn is_registered(&self) -> bool {
        self.reg == RegState::Registered
    }

    /// The public UDP address from the last REGISTERED.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.public
    }

    /// This client's NAT class as measured at the last discovery (sent in REGISTER).
    pub fn nat_class(&self) -> NatClass {
        self.nat
    }

    /// Drop and anomaly counters.
    pub fn counters(&self) -> &ClientCounters {
        &self.counters
    }

    /// Number of calls in progress.
    pub fn active_calls(&self) -> usize {
        self.calls.len()
    }

    /// The peer address of a call, once known.
    pub fn peer_addr(&self, handle: CallHandle) -> Option<SocketAddr> {
        self.calls.get(&handle).and_then(|c| c.peer_addr)
    }

    /// The SRTP suite of call `handle` and the master key and salt the peer encrypts with
    /// (what this side decrypts): for an SDP `a=crypto` line (RFC 4568) that lets a local
    /// tool decrypt a capture of the received stream. `None` before the keys are agreed or
    /// for plain RTP.
    pub fn receive_key(&self, handle: CallHandle) -> Option<(u8, e2e::MasterKeys)> {
        let c = self.calls.get(&handle)?;
        let k = &c.crypto.as_ref()?.keys;
        if k.suite == e2e::SUITE_NONE {
            return None;
        }
        Some((
            k.suite,
            match c.role {
                Role::Caller => k.callee_to_caller,
                Role::Callee => k.caller_to_callee,
            },
        ))
    }

    /// True if media can be sent on the call: the caller after START, the callee once the
    /// caller's first packet arrived (before that the caller's firewall would drop it).
    pub fn can_send(&self, handle: CallHandle) -> bool {
        self.calls.get(&handle).is_some_and(|c| c.state == CallState::Media)
    }

    /// Where the STUN binding requests go ([`ClientConfig::stun_server`]).
    pub fn stun_server(&self) -> Option<SocketAddr> {
        self.cfg.stun_server
    }

    /// Send the next discovery's STUN requests to `server`: a driver that moves to another
    /// manager ([`crate::reconnect`]) points the client at that manager's UDP port before
    /// [`Client::handle_connected`], so the manager it registers with learns its binding.
    pub fn set_stun_server(&mut self, server: Option<SocketAddr>) {
        self.cfg.stun_server = server;
    }

    // ---------------------------------------------------------------- inputs

    /// The connection to the manager is up (over TLS: its handshake completed): discover the
    /// public address, then register. `binding` is the TLS connection's exporter value
    /// ([`crate::stream::FrameStream::binding`]; None on plain TCP): the token goes bound to
    /// it ([`crate::auth::bind`]), so a captured REGISTER cannot be replayed elsewhere.
    pub fn handle_connected(&mut self, now: Instant, binding: Option<[u8; 32]>) {
        self.conn_binding = binding;
        if let (None, Some((server, ip))) = (&self.mapper, self.cfg.port_mapping) {
            // Asked once, at the first connection; kept and renewed across reconnections.
            let mut nonce = [0u8; 12];
            self.rng.fill(&mut nonce);
            let life = self.cfg.port_mapping_lifetime.as_secs().min(u64::from(u32::MAX)) as u32;
            let mut m = PortMapper::new(server, ip, self.cfg.local_udp_port, life, nonce);
            m.start(now);
            self.mapper = Some(m);
            self.flush_mapper(None);
        }
        self.ping_outstanding = None;
        self.unresponsive_reported = false;
        self.next_ping = Some(now + self.cfg.ping_interval);
        match self.cfg.stun_server {
            Some(_) if self.cfg.stun_attempts > 0 => {
                self.rng.fill(&mut self.txid);
                self.reg = RegState::Discovering { attempts: 0, next: now };
                self.stun_step(now);
            }
            _ => self.send_register(false),
        }
    }

    /// The TCP connection to the manager was lost. Calls still being set up fail with
    /// [`EndReason::ManagerLost`]; calls with a path keep going (media is direct).
    pub fn handle_disconnected(&mut self, now: Instant) {
        self.reg = RegState::Disconnected;
        self.register_waiting = None;
        self.next_ping = None;
        self.ping_outstanding = None;
        // Frames queued for the lost connection are dropped (a new one registers afresh).
        self.out.retain(|q| !matches!(q, Queued::Frame(_)));
        let mut doomed: Vec<CallHandle> =
            self.calls.iter().filter(|(_, c)| c.state == CallState::Calling).map(|(h, _)| *h).collect();
        // In handle order, not the map's: the events and frames come out the same every run.
        doomed.sort_unstable();
        for h in doomed {
            self.end_call(now, h, EndReason::ManagerLost, None);
        }
    }

    /// A frame arrived from the manager.
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) {
        match frame {
            Frame::Registered { public, source } => {
                if self.reg != RegState::Registering {
                    self.counters.frames_unexpected += 1;
                    return;
                }
                self.reg = RegState::Registered;
                self.public = Some(public);
                self.push_event(Event::Registered { public, source });
            }
            Frame::Incoming { call_id, token, caller, caller_addr, caller_nat, caller_candidates, caller_keys } => {
                self.on_incoming(now, call_id, token, caller, (caller_addr, caller_nat, caller_candidates), caller_keys)
            }
            Frame::Start { call_ref, call_id, token, callee_addr, callee_nat, callee_candidates, callee_keys } => self
                .on_start(
                    now,
                    CallHandle(call_ref),
                    (call_id, token),
                    (callee_addr, callee_nat, callee_candidates),
                    callee_keys,
                ),
            Frame::Reject { call_ref, call_id, reason, callee_nat } => {
                let h = self.caller_pending(call_ref).or_else(|| self.by_call_id.get(&call_id).copied());
                match h {
                    Some(h) => {
                        if let Some(c) = self.calls.get_mut(&h) {
                            if callee_nat != NatClass::Unknown {
                                c.peer_nat = callee_nat;
                            }
                        }
                        self.end_call(now, h, EndReason::Rejected(reason), None)
                    }
                    None => self.counters.frames_unexpected += 1,
                }
            }
            Frame::Busy { call_ref } => match self.caller_pending(call_ref) {
                Some(h) => self.end_call(now, h, EndReason::Busy, None),
                None => self.counters.frames_unexpected += 1,
            },
            Frame::Unknown { call_ref, reason } => match self.caller_pending(call_ref) {
                Some(h) => self.end_call(now, h, EndReason::Unknown(reason), None),
                None => self.counters.frames_unexpected += 1,
            },
            Frame::Hangup { call_id, reason } => match self.by_call_id.get(&call_id).copied() {
                // The peer's search gave up first: the same failure as this side's own.
                Some(h) if reason == HangupReason::Timeout && self.calls[&h].state == CallState::Searching => {
                    self.end_call(now, h, EndReason::NoPairFound, None)
                }
                Some(h) => self.end_call(now, h, EndReason::RemoteHangup(reason), None),
                None => self.counters.frames_unexpected += 1,
            },
            Frame::Ping { nonce } => self.push_frame(Frame::Pong { nonce }),
            Frame::Pong { nonce } => {
                if self.ping_outstanding.is_some_and(|(n, _)| n == nonce) {
                    self.ping_outstanding = None;
                    self.unresponsive_reported = false;
                } else {
                    self.counters.frames_unexpected += 1;
                }
            }
            Frame::Error { code, message } => self.push_event(Event::ManagerError { code, message }),
            Frame::Register { .. } | Frame::Call { .. } | Frame::Punched { .. } => self.counters.frames_unexpected += 1,
        }
    }

    /// A datagram arrived on the client's UDP socket from `from`. Returns the media packet if
    /// it is RTP for a current call, for the application to play or measure.
    ///
    /// `data` is the driver's receive buffer: SRTP is decrypted in place, and the returned
    /// payload borrows the plaintext.
    pub fn handle_datagram<'a>(&mut self, now: Instant, from: SocketAddr, data: &'a mut [u8]) -> Option<Received<'a>> {
        self.handle_datagram_on(now, SocketId::MAIN, from, data)
    }

    /// A datagram arrived on socket `socket` (see [`Output::OpenSocket`]); as
    /// [`Client::handle_datagram`]. Whatever arrives on a search socket other than the
    /// peer's packets for that call is counted and dropped.
    pub fn handle_datagram_on<'a>(
        &mut self,
        now: Instant,
        socket: SocketId,
        from: SocketAddr,
        data: &'a mut [u8],
    ) -> Option<Received<'a>> {
        if socket == SocketId::MAIN && self.mapper.as_ref().is_some_and(|m| m.server() == from) {
            let m = self.mapper.as_mut().expect("checked above");
            let ev = m.on_datagram(now, &*data);
            self.flush_mapper(ev);
            return None;
        }
        if socket != SocketId::MAIN && matches!(classify(data), DatagramKind::Stun | DatagramKind::Rtcp) {
            self.counters.dgram_unmatched += 1;
            return None;
        }
        match classify(data) {
            DatagramKind::Rtp => self.on_rtp(now, socket, from, data),
            DatagramKind::Null => {
                self.on_null(now, socket, from, &*data);
                None
            }
            DatagramKind::Stun => {
                self.on_stun(now, from, &*data);
                None
            }
            DatagramKind::Rtcp => {
                self.counters.rtcp += 1;
                None
            }
            DatagramKind::Unknown => {
                self.counters.dgram_unknown += 1;
                None
            }
        }
    }

    /// Run the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(m) = self.mapper.as_mut() {
            if m.next_timeout().is_some_and(|t| now >= t) {
                let ev = m.on_timeout(now);
                self.flush_mapper(ev);
            }
        }
        match self.reg {
            RegState::Discovering { next, .. } if now >= next => self.stun_step(now),
            RegState::Probing { next, .. } if now >= next => self.probe_step(now),
            _ => {}
        }
        if let Some(t) = self.next_ping {
            if now >= t {
                if let Some((_, sent)) = self.ping_outstanding {
                    if now.duration_since(sent) >= self.cfg.ping_interval * 3 && !self.unresponsive_reported {
                        self.unresponsive_reported = true;
                        self.push_event(Event::ManagerUnresponsive);
                    }
                } else {
                    let nonce = self.rng.next_u64();
                    self.ping_outstanding = Some((nonce, now));
                    self.push_frame(Frame::Ping { nonce });
                }
                self.next_ping = Some(now + self.cfg.ping_interval);
            }
        }
        // Pop the due heap entries (skipping stale ones), then act: acting may end calls.
        let mut due: Vec<CallHandle> = Vec::new();
        while let Some(&Reverse((t, h, gen))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if let Some(c) = self.calls.get_mut(&h) {
                if c.timer_gen == gen {
                    c.scheduled = None;
                    due.push(h);
                }
            }
        }
        for h in due {
            let Some(c) = self.calls.get(&h) else { continue };
            if c.deadline.is_some_and(|d| now >= d) {
                if c.state == CallState::Calling {
                    self.end_call(now, h, EndReason::NoStart, None);
                } else if c.state == CallState::Searching {
                    self.end_call(now, h, EndReason::NoPairFound, Some(HangupReason::Timeout));
                } else {
                    self.end_call(now, h, EndReason::NoMedia, Some(HangupReason::Timeout));
                }
            } else if c.first_rx.is_some() && now.duration_since(c.last_rx) >= self.cfg.media_timeout {
                self.end_call(now, h, EndReason::PeerGone, Some(HangupReason::PeerGone));
            } else {
                self.call_timers(now, h);
                self.schedule(h);
            }
        }
    }

    /// Make sure call `h` has a heap entry no later than its next deadline.
    fn schedule(&mut self, h: CallHandle) {
        let Some(c) = self.calls.get_mut(&h) else { return };
        let Some(next) = c.next_deadline(&self.cfg) else { return };
        if c.scheduled.is_some_and(|s| s <= next) {
            return;
        }
        c.timer_gen = c.timer_gen.wrapping_add(1);
        c.scheduled = Some(next);
        self.timers.push(Reverse((next, h, c.timer_gen)));
    }

    fn call_timers(&mut self, now: Instant, h: CallHandle) {
        let Some(c) = self.calls.get_mut(&h) else { return };
        if c.v4_punch_at.is_some_and(|t| now >= t) {
            c.v4_punch_at = None;
            if c.first_rx.is_none() {
                // No answer over IPv6 yet: the IPv4 addresses too.
                let main = c.peer_addr;
                let v4s: Vec<SocketAddr> =
                    c.named.iter().chain(c.candidates.iter()).filter(|a| a.is_ipv4()).copied().collect();
                for a in v4s {
                    c.peer_addr = Some(a);
                    queue_null(&mut self.out, c, now, false);
                    c.candidates_tried += 1;
                }
                c.peer_addr = main;
            }
        }
        if let Some(t) = c.next_null {
            if now >= t {
                queue_punch(&mut self.out, c, now);
                c.null_retries_left -= 1;
                c.null_interval *= 2;
                c.next_null = (c.null_retries_left > 0).then(|| now + c.null_interval);
            }
        }
        if c.state == CallState::Media && now.duration_since(c.last_tx) >= self.cfg.keepalive_interval {
            queue_null(&mut self.out, c, now, true);
        }
        if c.search.is_some() {
            search_step(&mut self.out, &self.cfg, c, now);
        }
    }

    // ---------------------------------------------------------------- commands

    /// Call `callee`. The outcome arrives as [`Event::Started`] or [`Event::Ended`].
    pub fn call(&mut self, now: Instant, callee: ClientId) -> Result<CallHandle, ClientError> {
        if self.reg != RegState::Registered {
            return Err(ClientError::NotRegistered);
        }
        let h = self.alloc_handle();
        let eph = self.keygen.ephemeral();
        let offer = e2e::offer(&eph, &self.cfg.srtp_suites, self.cfg.identity.as_deref());
        self.push_frame(Frame::Call { call_ref: h.0, callee: callee.clone(), keys: Some(Box::new(offer.clone())) });
        let call = self.new_call(now, Role::Caller, callee, None, 0, None);
        let eph = Some(Box::new((eph, offer)));
        self.calls.insert(h, Call { deadline: Some(now + self.cfg.start_timeout), eph, ..call });
        self.schedule(h);
        Ok(h)
    }

    /// Hang up a call: HANGUP to the manager (if the call has an id) and [`Event::Ended`].
    pub fn hangup(&mut self, now: Instant, handle: CallHandle) -> Result<(), ClientError> {
        if !self.calls.contains_key(&handle) {
            return Err(ClientError::NoSuchCall(handle));
        }
        self.end_call(now, handle, EndReason::LocalHangup, Some(HangupReason::Normal));
        Ok(())
    }

    /// Hang up every call (e.g. at shutdown) with the given reason sent to the peers.
    /// This is the client's exit: a port mapping it holds is deleted too.
    pub fn hangup_all(&mut self, now: Instant) {
        let mut all: Vec<CallHandle> = self.calls.keys().copied().collect();
        all.sort_unstable();
        for h in all {
            self.end_call(now, h, EndReason::LocalHangup, Some(HangupReason::Shutdown));
        }
        self.release_port_mapping();
    }

    /// Delete the port mapping this client holds (at exit; [`Client::hangup_all`] does it
    /// too): one request with lifetime 0 is queued. Nothing if none is held.
    pub fn release_port_mapping(&mut self) {
        if let Some(m) = self.mapper.as_mut() {
            m.release();
            self.flush_mapper(None);
        }
    }

    /// Write one RTP packet carrying `payload` for call `handle` into `out`, advancing the
    /// call's sequence number and its timestamp by `duration_rtp_ts` afterwards. Returns where
    /// to send it. No allocation.
    pub fn send_media(
        &mut self,
        now: Instant,
        handle: CallHandle,
        payload: &[u8],
        duration_rtp_ts: u32,
        out: &mut [u8],
    ) -> Result<Transmit, ClientError> {
        let fields = MediaFields { marker: None, payload_type: self.cfg.payload_type, timestamp: None };
        self.send_rtp(now, handle, fields, payload, duration_rtp_ts, out)
    }

    /// Like [`Client::send_media`], with the RTP fields of a packet being forwarded: its
    /// payload type, marker bit and timestamp (where given) are kept; the SSRC and sequence
    /// number are the call's, so the peer accepts it and counts loss on one sequence.
    pub fn send_rtp(
        &mut self,
        now: Instant,
        handle: CallHandle,
        fields: MediaFields,
        payload: &[u8],
        duration_rtp_ts: u32,
        out: &mut [u8],
    ) -> Result<Transmit, ClientError> {
        let pt = fields.payload_type;
        let c = self.calls.get_mut(&handle).ok_or(ClientError::NoSuchCall(handle))?;
        let to = match (c.state, c.peer_addr) {
            (CallState::Media, Some(a)) => a,
            _ => return Err(ClientError::NoPath(handle)),
        };
        let Some(crypto) = c.crypto.as_mut() else { return Err(ClientError::NoPath(handle)) };
        let plain = RTP_HEADER_LEN + payload.len();
        let tag =
            crypto.tx.as_ref().map_or(0, |_| srtp::Suite::from_code(crypto.keys.suite).map_or(0, |s| s.rtp_overhead()));
        let need = plain + tag;
        if out.len() < need {
            return Err(ClientError::BufferTooSmall { need, have: out.len() });
        }
        let timestamp = fields.timestamp.unwrap_or(c.ts_tx);
        let marker = fields.marker.unwrap_or(c.sent == 0);
        let h = RtpHeader { marker, payload_type: pt & 0x7F, seq: c.seq_tx, timestamp, ssrc: c.ssrc_tx };
        h.emit(out);
        out[RTP_HEADER_LEN..plain].copy_from_slice(payload);
        let need = match crypto.tx.as_mut() {
            Some(tx) => {
                tx.protect_rtp(out, plain).map_err(|_| ClientError::BufferTooSmall { need, have: out.len() })?
            }
            None => plain,
        };
        c.seq_tx = c.seq_tx.wrapping_add(1);
        c.ts_tx = timestamp.wrapping_add(duration_rtp_ts);
        c.sent += 1;
        c.last_tx = now;
        Ok(Transmit { from: c.socket, to, len: need })
    }

    // ---------------------------------------------------------------- outputs

    /// The next output, in the order it must leave: a frame for the manager, a control
    /// datagram (null packet, STUN request) written into `buf`, or an event for the
    /// application; once the queue is empty, [`Output::Timeout`] with the next deadline
    /// (the same as [`Client::poll_timeout`]). Drain rule: after every input or command, call
    /// this until it returns `Timeout`.
    ///
    /// A datagram needs up to [`MAX_CONTROL_DATAGRAM`] bytes of `buf`; a smaller buffer gets
    /// [`ClientError::BufferTooSmall`] and the datagram stays queued.
    pub fn poll_output(&mut self, buf: &mut [u8]) -> Result<Output, ClientError> {
        if let Some(Queued::Datagram(d)) = self.out.front() {
            let n = d.len as usize;
            if buf.len() < n {
                return Err(ClientError::BufferTooSmall { need: n, have: buf.len() });
            }
        }
        Ok(match self.out.pop_front() {
            Some(Queued::Frame(f)) => Output::Frame(f),
            Some(Queued::Event(e)) => Output::Event(e),
            Some(Queued::Datagram(d)) => {
                let n = d.len as usize;
                buf[..n].copy_from_slice(&d.data[..n]);
                Output::Transmit(Transmit { from: d.from, to: d.to, len: n })
            }
            Some(Queued::Open(s)) => Output::OpenSocket(s),
            Some(Queued::Close(s)) => Output::CloseSocket(s),
            None => Output::Timeout(self.poll_timeout()),
        })
    }

    fn push_frame(&mut self, f: Frame) {
        self.out.push_back(Queued::Frame(f));
    }

    fn push_event(&mut self, e: Event) {
        self.out.push_back(Queued::Event(e));
    }

    /// When [`Client::handle_timeout`] should next be called. Takes `&mut self` to drop
    /// timer entries of calls that ended, so the answer is exact.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(&Reverse((_, h, gen))) = self.timers.peek() {
            match self.calls.get(&h) {
                Some(c) if c.timer_gen == gen => break,
                _ => {
                    self.timers.pop();
                }
            }
        }
        let call = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let discovery = match self.reg {
            RegState::Discovering { next, .. } | RegState::Probing { next, .. } => Some(next),
            _ => None,
        };
        let mapper = self.mapper.as_ref().and_then(|m| m.next_timeout());
        [discovery, self.next_ping, call, mapper].into_iter().flatten().min()
    }

    // ---------------------------------------------------------------- internals

    fn alloc_handle(&mut self) -> CallHandle {
        loop {
            let h = CallHandle(self.next_handle);
            self.next_handle = self.next_handle.wrapping_add(1).max(1);
            if !self.calls.contains_key(&h) {
                return h;
            }
        }
    }

    fn new_call(
        &mut self,
        now: Instant,
        role: Role,
        peer_id: ClientId,
        call_id: Option<CallId>,
        token: u64,
        peer_addr: Option<SocketAddr>,
    ) -> Call {
        Call {
            role,
            state: CallState::Calling,
            peer_id,
            call_id,
            token,
            peer_addr,
            peer_nat: NatClass::Unknown,
            created: now,
            setup_done: None,
            first_rx: None,
            first_rtp_rx: None,
            deadline: None,
            next_null: None,
            null_interval: self.cfg.null_retry_initial,
            null_retries_left: 0,
            last_tx: now,
            last_rx: now,
            ssrc_tx: 0,
            seq_tx: self.rng.next_u64() as u16,
            ts_tx: self.rng.next_u64() as u32,
            sent: 0,
            nulls_sent: 0,
            nulls_rx: 0,
            rx: RtpReceiverStats::new(self.cfg.clock_hz),
            scheduled: None,
            timer_gen: 0,
            strategy: Strategy::Direct,
            socket: SocketId::MAIN,
            search: None,
            probes_sent: 0,
            sockets_opened: 0,
            found_here: false,
            named: peer_addr,
            candidates: Vec::new(),
            candidates_tried: 0,
            v4_punch_at: None,
            eph: None,
            crypto: None,
            null_tx: 0,
            null_rx: CounterWindow::default(),
            media_refused: 0,
            nulls_refused: 0,
        }
    }

    fn caller_pending(&self, call_ref: u32) -> Option<CallHandle> {
        let h = CallHandle(call_ref);
        self.calls.get(&h).filter(|c| c.role == Role::Caller && c.state == CallState::Calling).map(|_| h)
    }

    fn stun_step(&mut self, now: Instant) {
        let RegState::Discovering { attempts, .. } = self.reg else { return };
        let Some(server) = self.cfg.stun_server else { return };
        if attempts >= self.cfg.stun_attempts {
            self.nat = NatClass::Unknown;
            self.push_event(Event::Discovered { mapped: None, nat: NatClass::Unknown, mappings: Vec::new() });
            self.send_register(false);
            return;
        }
        let mut d = SmallDatagram { from: SocketId::MAIN, to: server, len: 0, data: [0; SMALL_DATAGRAM] };
        d.len = stun::emit_binding_request(&self.txid, &mut d.data) as u8;
        self.out.push_back(Queued::Datagram(d));
        self.reg = RegState::Discovering { attempts: attempts + 1, next: now + self.cfg.stun_interval };
    }

    fn send_register(&mut self, with_binding: bool) {
        self.reg = RegState::Registering;
        if self.mapper.as_ref().is_some_and(|m| m.asking()) {
            self.register_waiting = Some(with_binding);
            return;
        }
        // With a usable port mapping this client is reachable from anywhere: that is its
        // class from now on (strategies and reports use it; `Discovered` had the measured one).
        if self.usable_mapping().is_some() {
            self.nat = NatClass::Mapped;
        }
        self.push_frame(Frame::Register {
            id: self.cfg.id.clone(),
            udp_port: self.cfg.local_udp_port,
            max_calls: self.cfg.max_calls,
            binding: with_binding.then_some(self.txid),
            auth: self.cfg.auth.map(|t| match &self.conn_binding {
                Some(b) => crate::auth::bind(&t, b),
                None => t,
            }),
            nat: self.nat,
            candidates: self.candidates(),
        });
    }

    /// The port mapping held, if it is on the public IP STUN saw (or STUN saw nothing): a
    /// mapping on another IP is an inner router's of a double NAT, which no peer reaches.
    fn usable_mapping(&self) -> Option<SocketAddr> {
        let (_, ext) = self.mapper.as_ref()?.mapping()?;
        self.mapped.is_none_or(|m| m.ip() == ext.ip()).then_some(ext)
    }

    /// The port mapping held now (and the protocol that made it), usable or not.
    pub fn port_mapping(&self) -> Option<(MapProto, SocketAddr)> {
        self.mapper.as_ref()?.mapping()
    }

    /// Queue the mapper's requests; report `ev`; send a REGISTER that waited for it.
    fn flush_mapper(&mut self, ev: Option<MapEvent>) {
        let Some(m) = self.mapper.as_mut() else { return };
        let server = m.server();
        let sends: Vec<_> = m.take_sends().collect();
        for (b, n) in sends {
            let mut d = SmallDatagram { from: SocketId::MAIN, to: server, len: n as u8, data: [0; SMALL_DATAGRAM] };
            d.data[..n].copy_from_slice(&b[..n]);
            self.out.push_back(Queued::Datagram(d));
        }
        let asking = m.asking();
        if let Some(e) = ev {
            if let MapEvent::Mapped { external, .. } = &e {
                if self.mapped.is_some_and(|m| m.ip() != external.ip()) {
                    let reason = format!(
                        "the mapping {external} is not on the public IP {} (a NAT behind another): not used",
                        self.mapped.map(|m| m.ip().to_string()).unwrap_or_default()
                    );
                    self.push_event(Event::PortMapping(e));
                    self.push_event(Event::PortMapping(MapEvent::Failed { reason }));
                } else {
                    self.push_event(Event::PortMapping(e));
                }
            } else {
                self.push_event(Event::PortMapping(e));
            }
        }
        if !asking && self.reg == RegState::Registering {
            if let Some(with_binding) = self.register_waiting.take() {
                self.send_register(with_binding);
            }
        }
    }

    /// The candidates REGISTER names: the host addresses and a usable port mapping.
    fn candidates(&self) -> Vec<Candidate> {
        let mut v: Vec<Candidate> = Vec::new();
        if let Some(ext) = self.usable_mapping() {
            v.push(Candidate { kind: CandidateKind::Mapped, addr: ext });
        }
        for a in &self.cfg.host_candidates {
            if v.len() < MAX_CANDIDATES && Some(*a) != self.mapped && !v.iter().any(|k| k.addr == *a) {
                v.push(Candidate { kind: CandidateKind::Host, addr: *a });
            }
        }
        v
    }

    fn on_stun(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        match stun::parse(data) {
            Ok(StunMessage::BindingSuccess { txid, mapped, other })
                if txid == self.txid
                    && Some(from) == self.cfg.stun_server
                    && matches!(self.reg, RegState::Discovering { .. }) =>
            {
                let RegState::Discovering { next, .. } = self.reg else { unreachable!("matched above") };
                // The round trip since the last request (`next` is one interval after it).
                let rtt = now.saturating_duration_since(next.checked_sub(self.cfg.stun_interval).unwrap_or(next));
                let wait =
                    (rtt * 2 + PROBE_WAIT_MIN / 2).clamp(PROBE_WAIT_MIN, self.cfg.stun_interval.max(PROBE_WAIT_MIN));
                self.mapped = Some(mapped);
                self.probe = Probe { asked: vec![from], mappings: vec![mapped], wait, ..Probe::default() };
                self.probe_next(now, from, other);
            }
            Ok(StunMessage::BindingSuccess { txid, mapped, other })
                if txid == self.probe.txid && from == self.probe.to && matches!(self.reg, RegState::Probing { .. }) =>
            {
                self.probe.mappings.push(mapped);
                self.probe_next(now, from, other);
            }
            Ok(_) => self.counters.stun_unexpected += 1,
            Err(_) => self.counters.dgram_malformed += 1,
        }
    }

    /// After an answer from `from` that named `other`: ask `other` next if it is new and
    /// there is room, else classify and register.
    fn probe_next(&mut self, now: Instant, from: SocketAddr, other: Option<SocketAddr>) {
        // An unspecified IP (a manager listening on every address) means the IP just asked.
        let other = other.map(|o| if o.ip().is_unspecified() { SocketAddr::new(from.ip(), o.port()) } else { o });
        match other {
            Some(to)
                if self.cfg.nat_probe
                    && self.probe.asked.len() < MAX_STUN_ADDRESSES
                    && !self.probe.asked.contains(&to)
                    && to.is_ipv4() == from.is_ipv4() =>
            {
                self.probe.asked.push(to);
                self.probe.to = to;
                // A transaction id of its own, so an answer is never taken for another's.
                self.probe.txid = self.txid;
                self.probe.txid[11] ^= self.probe.asked.len() as u8;
                self.reg = RegState::Probing { attempts: 0, next: now };
                self.probe_step(now);
            }
            _ => self.finish_discovery(),
        }
    }

    fn probe_step(&mut self, now: Instant) {
        let RegState::Probing { attempts, .. } = self.reg else { return };
        if attempts >= PROBE_ATTEMPTS {
            // This address does not answer: classify with what came.
            return self.finish_discovery();
        }
        let mut d = SmallDatagram { from: SocketId::MAIN, to: self.probe.to, len: 0, data: [0; SMALL_DATAGRAM] };
        d.len = stun::emit_binding_request(&self.probe.txid, &mut d.data) as u8;
        self.out.push_back(Queued::Datagram(d));
        self.reg = RegState::Probing { attempts: attempts + 1, next: now + self.probe.wait };
    }

    fn finish_discovery(&mut self) {
        let mappings = std::mem::take(&mut self.probe.mappings);
        self.nat = nat::classify(&mappings);
        self.push_event(Event::Discovered { mapped: self.mapped, nat: self.nat, mappings });
        self.send_register(true);
    }

    fn on_incoming(
        &mut self,
        now: Instant,
        call_id: CallId,
        token: u64,
        caller: ClientId,
        (caller_addr, caller_nat, caller_candidates): (SocketAddr, NatClass, Vec<Candidate>),
        caller_keys: Option<Box<KeyShare>>,
    ) {
        if self.by_call_id.contains_key(&call_id) {
            // A duplicate INCOMING: the call is already answered.
            self.counters.frames_unexpected += 1;
            return;
        }
        let h = self.alloc_handle();
        let mut c = self.new_call(now, Role::Callee, caller.clone(), Some(call_id), token, Some(caller_addr));
        // The keys first: a call whose keys cannot be agreed is declined before any packet.
        let eph = self.keygen.ephemeral();
        let agreed = caller_keys.ok_or(E2eError::Missing).and_then(|offer| {
            let identity = e2e::check_identity(&offer, true, None, self.cfg.peer_key.as_ref())?;
            let answer = e2e::answer(&eph, &offer, &self.cfg.srtp_suites, self.cfg.identity.as_deref())?;
            let suite = answer.suites[0];
            let keys = e2e::derive(&eph, &offer.public, &offer.public, &eph.public, call_id, token, suite)?;
            Ok((answer, CallCrypto::new(keys, Role::Callee, identity)))
        });
        let answer = match agreed {
            Ok((answer, crypto)) => {
                c.crypto = Some(Box::new(crypto));
                answer
            }
            Err(e) => {
                self.counters.key_exchange_failed += 1;
                let reason =
                    if e == E2eError::NoCommonSuite { RejectReason::NoCommonSuite } else { RejectReason::KeyRefused };
                self.push_frame(Frame::Reject { call_ref: 0, call_id, reason, callee_nat: NatClass::Unknown });
                c.peer_nat = caller_nat;
                self.calls.insert(h, c);
                self.push_event(Event::Incoming { handle: h, call_id, caller, caller_addr });
                self.end_call(now, h, EndReason::KeyExchange(e), None);
                return;
            }
        };
        c.peer_nat = caller_nat;
        c.candidates = other_addrs(caller_addr, &caller_candidates);
        // Host addresses come only when both sides are behind one public IP and named some:
        // the LAN path needs no search (the manager decides the same way).
        c.strategy = if caller_candidates.is_empty() { nat::strategy(caller_nat, self.nat) } else { Strategy::Direct };
        let (tx, rx) = Call::ssrcs(Role::Callee, token);
        c.ssrc_tx = tx;
        c.state = CallState::Punching;
        c.deadline = Some(now + self.cfg.first_media_timeout);
        if c.strategy.searches() {
            // The search's sockets and first probes go out before PUNCHED, so the hard
            // side's mappings exist by the time the caller hears START.
            self.start_search(now, &mut c);
        } else if self.cfg.send_null {
            queue_punch(&mut self.out, &mut c, now);
            c.null_retries_left = self.cfg.null_retries;
            c.next_null = (c.null_retries_left > 0).then(|| now + c.null_interval);
        }
        self.push_frame(Frame::Punched { call_id, udp_port: self.cfg.local_udp_port, keys: Some(Box::new(answer)) });
        self.by_call_id.insert(call_id, h);
        self.by_ssrc.insert(rx, h);
        self.calls.insert(h, c);
        self.schedule(h);
        self.push_event(Event::Incoming { handle: h, call_id, caller, caller_addr });
    }

    fn on_start(
        &mut self,
        now: Instant,
        h: CallHandle,
        (call_id, token): (CallId, u64),
        (callee_addr, callee_nat, callee_candidates): (SocketAddr, NatClass, Vec<Candidate>),
        callee_keys: Option<Box<KeyShare>>,
    ) {
        let pending = self.calls.get(&h).is_some_and(|c| c.role == Role::Caller && c.state == CallState::Calling);
        if !pending {
            if !self.by_call_id.contains_key(&call_id) {
                // START for a call we gave up on (or never placed): end it at the manager.
                self.push_frame(Frame::Hangup { call_id, reason: HangupReason::Timeout });
            }
            self.counters.frames_unexpected += 1;
            return;
        }
        let c = self.calls.get_mut(&h).expect("checked above");
        let (tx, rx) = Call::ssrcs(Role::Caller, token);
        c.call_id = Some(call_id);
        c.token = token;
        let (eph, offer) = *c.eph.take().expect("a calling caller holds its key pair");
        let agreed = callee_keys.ok_or(E2eError::Missing).and_then(|ans| {
            let identity = e2e::check_identity(&ans, false, Some(&eph.public), self.cfg.peer_key.as_ref())?;
            // The answer names one suite, one of the offer.
            let suite = match ans.suites[..] {
                [s] if offer.suites.contains(&s) => s,
                _ => return Err(E2eError::NoCommonSuite),
            };
            let keys = e2e::derive(&eph, &ans.public, &eph.public, &ans.public, call_id, token, suite)?;
            Ok(CallCrypto::new(keys, Role::Caller, identity))
        });
        match agreed {
            Ok(crypto) => c.crypto = Some(Box::new(crypto)),
            Err(e) => {
                self.counters.key_exchange_failed += 1;
                self.by_call_id.insert(call_id, h);
                self.end_call(now, h, EndReason::KeyExchange(e), Some(HangupReason::Error));
                return;
            }
        }
        c.peer_addr = Some(callee_addr);
        c.named = Some(callee_addr);
        c.candidates = other_addrs(callee_addr, &callee_candidates);
        c.peer_nat = callee_nat;
        c.strategy = if callee_candidates.is_empty() { nat::strategy(self.nat, callee_nat) } else { Strategy::Direct };
        c.ssrc_tx = tx;
        c.setup_done = Some(now);
        self.by_call_id.insert(call_id, h);
        self.by_ssrc.insert(rx, h);
        if c.strategy.searches() {
            // Media waits for the pair: `Started` comes when the search finds it.
            let mut c = self.calls.remove(&h).expect("checked above");
            self.start_search(now, &mut c);
            self.calls.insert(h, c);
            self.schedule(h);
            return;
        }
        c.state = CallState::Media;
        c.deadline = Some(now + self.cfg.first_media_timeout);
        // The callee's punch may have come before this START (through a LAN or a port
        // mapping): its source is the path. Else media starts towards the first host
        // candidate (behind one NAT the public address needs a hairpin) or the public one.
        let known = |a: &SocketAddr| a.ip() == callee_addr.ip() || c.candidates.iter().any(|k| k.ip() == a.ip());
        let key = &c.crypto.as_ref().expect("agreed above").keys.null_key;
        let mut early = None;
        for (i, (id, t, a, pkt)) in self.early.iter().enumerate() {
            if *id == call_id && *t == token && known(a) {
                if null_mac_ok(key, pkt) {
                    early = Some(i);
                    break;
                }
                self.counters.nulls_unauthenticated += 1;
                c.nulls_refused += 1;
            }
        }
        if let Some(i) = early {
            let (_, _, from, pkt) = self.early.remove(i).expect("found above");
            let ctr = NullPacket::parse(&pkt).expect("parsed when kept").counter;
            c.null_rx.accept(ctr);
            self.counters.early_nulls += 1;
            if Some(from) != c.named && !c.candidates.contains(&from) {
                self.counters.latched_elsewhere += 1;
            }
            c.peer_addr = Some(from);
            queue_null(&mut self.out, c, now, false);
            c.candidates_tried = 1;
        } else if let Some(&v6) = c.candidates.iter().find(|a| a.is_ipv6()) {
            // Happy Eyeballs (RFC 8305): IPv6 first (no NAT in the way, and the one address
            // both sides can always reach when IPv4 leaves no path), IPv4 50 ms later if
            // nothing has come back by then.
            c.peer_addr = Some(v6);
            let v6s: Vec<SocketAddr> = c.candidates.iter().filter(|a| a.is_ipv6()).copied().collect();
            for a in v6s {
                c.peer_addr = Some(a);
                queue_null(&mut self.out, c, now, false);
            }
            c.peer_addr = Some(v6);
            c.candidates_tried = c.candidates.iter().filter(|a| a.is_ipv6()).count() as u32;
            c.v4_punch_at = Some(now + HAPPY_EYEBALLS_DELAY);
        } else {
            if let Some(&host) = c.candidates.first() {
                c.peer_addr = Some(host);
            }
            // One null packet to each address at once: opens this side's firewall before the
            // first media frame, and tells the callee which of its addresses reach it.
            queue_punch(&mut self.out, c, now);
        }
        let peer = c.peer_addr.unwrap_or(callee_addr);
        self.schedule(h);
        self.push_event(Event::Started { handle: h, call_id, peer });
    }

    /// Start the birthday search of call `c` (not in the map while this runs).
    fn start_search(&mut self, now: Instant, c: &mut Call) {
        c.state = CallState::Searching;
        c.deadline = Some(now + self.cfg.birthday_timeout);
        let peer = c.peer_addr.expect("a searching call knows the peer's public address");
        let mut s = Search {
            sockets: Vec::new(),
            next_repunch: None,
            peer_ip: peer.ip(),
            predicted: VecDeque::new(),
            walk: None,
            next_probe: None,
            round_sent: 0,
            tx_tag: probe_tag(c.token, c.role == Role::Caller),
            rx_tag: probe_tag(c.token, c.role != Role::Caller),
        };
        if c.strategy.opens_sockets(self.nat) {
            for _ in 0..self.cfg.birthday_sockets.max(1) {
                let id = SocketId(self.next_socket);
                self.next_socket = self.next_socket.wrapping_add(1).max(1);
                self.out.push_back(Queued::Open(id));
                s.sockets.push(id);
                queue_probe(&mut self.out, c, s.tx_tag, id, peer, now);
            }
            c.sockets_opened = s.sockets.len() as u32;
            s.next_repunch = Some(now + self.cfg.birthday_repunch);
        } else {
            if let NatClass::Sequential { delta } = c.peer_nat {
                // The hard side's next mappings follow its last one (the manager saw the
                // first of up to three): cover its sockets and a margin for other flows.
                let span = i32::from(self.cfg.birthday_sockets) + PREDICT_MARGIN;
                for k in 1..=span {
                    let p = i32::from(peer.port()) + k * i32::from(delta);
                    if let Ok(p) = u16::try_from(p) {
                        if nat::RANDOM_PORTS.contains(&p) {
                            s.predicted.push_back(p);
                        }
                    }
                }
            }
            s.walk = Some(nat::PortWalk::new(self.rng.next_u64(), self.rng.next_u64()));
            s.next_probe = Some(now);
        }
        c.search = Some(Box::new(s));
        search_step(&mut self.out, &self.cfg, c, now);
    }

    /// A birthday search's socket could not be opened: search with the others.
    pub fn handle_socket_failed(&mut self, now: Instant, socket: SocketId) {
        self.counters.sockets_failed += 1;
        let found = self.calls.iter_mut().find_map(|(h, c)| {
            let s = c.search.as_mut()?;
            let i = s.sockets.iter().position(|x| *x == socket)?;
            s.sockets.remove(i);
            Some((*h, s.sockets.is_empty()))
        });
        if let Some((h, true)) = found {
            self.end_call(now, h, EndReason::NoPairFound, Some(HangupReason::Timeout));
        }
    }

    /// Whether a packet of call `c` from `from` on `socket` finds the search's pair: on one
    /// of the hard side's sockets from the easy side's address, or on the easy side's socket
    /// from any port of the hard side's IP.
    fn search_hit(c: &Call, socket: SocketId, from: SocketAddr) -> bool {
        match &c.search {
            Some(s) if !s.sockets.is_empty() => s.sockets.contains(&socket) && c.peer_addr == Some(from),
            Some(s) => socket == SocketId::MAIN && from.ip() == s.peer_ip,
            None => false,
        }
    }

    /// The search of call `h` found its pair (a packet from the peer arrived on `socket`
    /// from `from`): keep that pair, close the other sockets, confirm at once.
    /// `by_probe`: the packet was the other side's probe (this side found the pair), not its
    /// confirmation or media (the other side found it).
    fn lock_pair(&mut self, now: Instant, h: CallHandle, socket: SocketId, from: SocketAddr, by_probe: bool) {
        let c = self.calls.get_mut(&h).expect("caller checked");
        let Some(s) = c.search.take() else { return };
        if s.sockets.is_empty() {
            c.peer_addr = Some(from);
        } else {
            c.socket = socket;
            for id in s.sockets.iter().filter(|id| **id != socket) {
                self.out.push_back(Queued::Close(*id));
            }
        }
        c.found_here = by_probe;
        c.deadline = Some(now + self.cfg.first_media_timeout);
        let found = Event::PairFound {
            handle: h,
            peer: c.peer_addr.unwrap_or(from),
            probes_sent: c.probes_sent,
            after: now.saturating_duration_since(c.setup_done.unwrap_or(c.created)),
        };
        // The other side may not know yet: tell it from the pair itself.
        queue_null(&mut self.out, c, now, false);
        self.out.push_back(Queued::Event(found));
        if c.role == Role::Caller {
            c.state = CallState::Media;
            let (call_id, peer) = (c.call_id.expect("a searching caller had START"), from);
            let peer = if s.sockets.is_empty() { peer } else { c.peer_addr.unwrap_or(peer) };
            self.push_event(Event::Started { handle: h, call_id, peer });
        } else {
            c.state = CallState::Punching;
        }
    }

    /// A packet (null or RTP) from the peer of call `h`: first one completes the setup.
    fn on_peer_packet(&mut self, now: Instant, h: CallHandle) {
        let c = self.calls.get_mut(&h).expect("caller checked");
        c.last_rx = now;
        if c.first_rx.is_none() {
            c.first_rx = Some(now);
            c.deadline = None;
            c.next_null = None;
            if c.role == Role::Callee {
                c.state = CallState::Media;
                c.setup_done = Some(now);
                // Confirm the path at once with one null packet: the caller's firewall is
                // open now, so it arrives, and the caller learns the path is two-way even
                // before (or without) any media from this side.
                if self.cfg.send_null {
                    queue_null(&mut self.out, c, now, false);
                }
            }
            self.push_event(Event::MediaFlowing { handle: h });
        }
    }

    fn on_rtp<'a>(
        &mut self,
        now: Instant,
        socket: SocketId,
        from: SocketAddr,
        data: &'a mut [u8],
    ) -> Option<Received<'a>> {
        let Ok((header, _)) = RtpHeader::parse(data) else {
            self.counters.dgram_malformed += 1;
            return None;
        };
        let Some(&h) = self.by_ssrc.get(&header.ssrc) else {
            self.counters.dgram_unmatched += 1;
            return None;
        };
        let c = self.calls.get_mut(&h).expect("by_ssrc entries point at live calls");
        // The cheap pre-filter (address and SSRC), which changes nothing yet.
        let searching = c.state == CallState::Searching;
        // Until the first packet, media from another of the peer's known addresses sets
        // the path (its null packet to the guessed one may have been lost).
        let moved = !searching && (c.peer_addr != Some(from) || c.socket != socket);
        let admitted = if searching {
            // Rare (a search's first packet): the hot path takes one lookup.
            Self::search_hit(c, socket, from)
        } else if moved {
            let known = c.named == Some(from) || c.candidates.contains(&from);
            c.first_rx.is_none() && known && c.socket == socket && c.search.is_none()
        } else {
            true
        };
        if !admitted {
            self.counters.dgram_wrong_source += 1;
            return None;
        }
        // The real admission check: SRTP authentication and the replay window.
        let len = match c.crypto.as_mut().map(|k| k.rx.as_mut()) {
            Some(Some(rx)) => match rx.unprotect_rtp(data) {
                Ok(n) => n,
                Err(e) => {
                    c.media_refused += 1;
                    match e {
                        srtp::SrtpError::Replayed | srtp::SrtpError::TooOld => self.counters.media_replayed += 1,
                        _ => self.counters.media_unauthenticated += 1,
                    }
                    return None;
                }
            },
            // Plain RTP, agreed by both sides (`--no-srtp`).
            Some(None) => data.len(),
            None => {
                c.media_refused += 1;
                self.counters.media_unauthenticated += 1;
                return None;
            }
        };
        if searching {
            self.lock_pair(now, h, socket, from, false);
        }
        let c = self.calls.get_mut(&h).expect("by_ssrc entries point at live calls");
        if moved {
            c.peer_addr = Some(from);
        }
        let data: &'a [u8] = &data[..len];
        let Ok((header, payload)) = RtpHeader::parse(data) else {
            self.counters.dgram_malformed += 1;
            return None;
        };
        c.rx.on_packet(header.seq, header.timestamp, micros_since(c.created, now));
        c.first_rtp_rx.get_or_insert(now);
        self.on_peer_packet(now, h);
        Some(Received { handle: h, header, payload })
    }

    fn on_null(&mut self, now: Instant, socket: SocketId, from: SocketAddr, data: &[u8]) {
        // Only a null packet with the call's token (or a probe's tag) and a valid MAC under
        // the call's key, with a counter not seen before, counts: it may lock a search's
        // pair, set or move the path. A bare null proves nothing about who sent it.
        if data.is_empty() {
            self.counters.nulls_unauthenticated += 1;
            return;
        }
        let mut relatch = false;
        let mut by_probe = false;
        let p = match NullPacket::parse(data) {
            Ok(p) => p,
            Err(_) => {
                self.counters.dgram_malformed += 1;
                return;
            }
        };
        let h = match self.by_call_id.get(&p.call_id) {
            Some(&h) => {
                let c = &self.calls[&h];
                // Sent by the peer (an echo of this side's own packet is not), with
                // the token, or for a probe the peer's tag while the search runs.
                let from_peer = p.from_caller == (c.role == Role::Callee);
                let tagged =
                    if p.probe { c.search.as_ref().is_some_and(|s| s.rx_tag == p.token) } else { c.token == p.token };
                if from_peer && tagged {
                    // Only a confirmation may move a found pair: a probe's tag may
                    // be known to whoever caught one.
                    relatch = !p.keepalive && !p.probe;
                    by_probe = p.probe;
                    Some(h)
                } else {
                    None
                }
            }
            None => {
                // A callee's punch before its START: keep it for the START (still
                // counted unmatched: most such packets never match).
                let calling = || self.calls.values().any(|c| c.state == CallState::Calling);
                if !p.from_caller && !p.probe && !p.keepalive && socket == SocketId::MAIN && calling() {
                    if self.early.len() == EARLY_NULLS {
                        self.early.pop_front();
                    }
                    let mut pkt = [0u8; NULL_LEN];
                    pkt.copy_from_slice(data);
                    self.early.push_back((p.call_id, p.token, from, pkt));
                }
                None
            }
        };
        let Some(h) = h else {
            self.counters.dgram_unmatched += 1;
            return;
        };
        {
            let c = self.calls.get_mut(&h).expect("matched above");
            let Some(crypto) = c.crypto.as_ref() else {
                self.counters.nulls_unauthenticated += 1;
                c.nulls_refused += 1;
                return;
            };
            if !null_mac_ok(&crypto.keys.null_key, data) {
                self.counters.nulls_unauthenticated += 1;
                c.nulls_refused += 1;
                return;
            }
            if !c.null_rx.fresh(p.counter) {
                self.counters.nulls_replayed += 1;
                c.nulls_refused += 1;
                return;
            }
        }
        let c = self.calls.get(&h).expect("matched above");
        if c.state == CallState::Searching {
            if !Self::search_hit(c, socket, from) {
                // Until the pair is found, nothing else counts as the peer's.
                self.counters.dgram_wrong_source += 1;
                return;
            }
            self.lock_pair(now, h, socket, from, by_probe);
        }
        let c = self.calls.get_mut(&h).expect("matched above");
        if c.peer_addr != Some(from) || c.socket != socket {
            // Two pairs found at once: the easy side follows the one the hard side
            // confirmed (a token-checked null from another port of the same IP).
            let easy_side_of_search = c.strategy.searches() && c.sockets_opened == 0 && c.search.is_none();
            let same_ip = c.peer_addr.is_some_and(|a| a.ip() == from.ip());
            // Only in the first moments after the pair was found: later, a moved pair is not
            // a race of two hits.
            let fresh = c.first_rx.is_some_and(|t| now.saturating_duration_since(t) < RELATCH_WINDOW);
            // A direct call's first token-checked null from the peer sets the path if it came
            // from one of the peer's host addresses or its public IP (its NAT's port towards
            // this side may differ from the one the manager saw: a peer-reflexive address).
            // (At any port of those IPs.)
            let known =
                c.named.is_some_and(|n| n.ip() == from.ip()) || c.candidates.iter().any(|a| a.ip() == from.ip());
            let first = relatch && known && c.first_rx.is_none() && !c.strategy.searches() && socket == c.socket;
            if relatch && easy_side_of_search && same_ip && fresh && socket == SocketId::MAIN {
                c.peer_addr = Some(from);
                self.counters.relatched += 1;
            } else if first {
                if Some(from) != c.named && !c.candidates.contains(&from) {
                    self.counters.latched_elsewhere += 1;
                }
                c.peer_addr = Some(from);
            } else {
                self.counters.dgram_wrong_source += 1;
                return;
            }
        }
        c.null_rx.accept(p.counter);
        c.nulls_rx += 1;
        self.on_peer_packet(now, h);
    }

    fn end_call(&mut self, now: Instant, h: CallHandle, reason: EndReason, hangup: Option<HangupReason>) {
        let Some(c) = self.calls.remove(&h) else { return };
        if let Some(s) = &c.search {
            for id in &s.sockets {
                self.out.push_back(Queued::Close(*id));
            }
        }
        if c.socket != SocketId::MAIN {
            self.out.push_back(Queued::Close(c.socket));
        }
        if let Some(id) = c.call_id {
            self.by_call_id.remove(&id);
            if let Some(r) = hangup {
                if self.reg == RegState::Registered {
                    self.push_frame(Frame::Hangup { call_id: id, reason: r });
                }
            }
        }
        let (_, rx) = Call::ssrcs(c.role, c.token);
        if self.by_ssrc.get(&rx) == Some(&h) {
            self.by_ssrc.remove(&rx);
        }
        let report = CallReport {
            handle: h,
            call_id: c.call_id,
            role: c.role,
            peer_id: c.peer_id,
            local: self.public,
            peer: c.peer_addr,
            nat: self.nat,
            peer_nat: c.peer_nat,
            strategy: match (c.role, reason) {
                // Refused before either side learnt the other's class.
                (_, EndReason::Rejected(RejectReason::NoPath)) => Strategy::NoPath,
                (Role::Caller, _) if c.state == CallState::Calling => nat::strategy(self.nat, c.peer_nat),
                _ => c.strategy,
            },
            setup: match c.role {
                Role::Caller => c.setup_done.map(|t| t - c.created),
                Role::Callee => c.first_rtp_rx.map(|t| t - c.created),
            },
            first_media: c.first_rtp_rx.map(|t| t - c.created),
            duration: c.setup_done.map(|t| now.saturating_duration_since(t)).unwrap_or_default(),
            sent: c.sent,
            received: c.rx.received(),
            lost: c.rx.lost(),
            jitter_ms: c.rx.jitter_ms(),
            nulls_sent: c.nulls_sent,
            nulls_received: c.nulls_rx,
            probes_sent: c.probes_sent,
            sockets_opened: c.sockets_opened,
            found_here: c.found_here,
            candidates_tried: c.candidates_tried,
            path: match c.peer_addr {
                _ if c.first_rx.is_none() => PathKind::None,
                a if a == c.named && c.peer_nat == NatClass::Mapped => PathKind::Mapped,
                a if a == c.named => PathKind::Public,
                Some(a) if a.is_ipv6() && c.candidates.iter().any(|k| k.ip() == a.ip()) => PathKind::Ipv6,
                Some(a) if c.candidates.contains(&a) => PathKind::Host,
                _ => PathKind::PeerReflexive,
            },
            reason,
            suite: c.crypto.as_ref().map_or(e2e::SUITE_NONE, |k| k.keys.suite),
            peer_identity: c.crypto.as_ref().and_then(|k| k.peer_identity),
            media_refused: c.media_refused,
            nulls_refused: c.nulls_refused,
        };
        self.push_event(Event::Ended(Box::new(report)));
    }
}

fn queue_null(q: &mut VecDeque<Queued>, c: &mut Call, now: Instant, keepalive: bool) {
    let (Some(to), Some(call_id), Some(crypto)) = (c.peer_addr, c.call_id, c.crypto.as_ref()) else { return };
    let mut d = SmallDatagram { from: c.socket, to, len: NULL_LEN as u8, data: [0; SMALL_DATAGRAM] };
    c.null_tx = c.null_tx.wrapping_add(1).max(1);
    let from_caller = c.role == Role::Caller;
    NullPacket { call_id, token: c.token, keepalive, from_caller, probe: false, counter: c.null_tx }
        .emit(&crypto.keys.null_key, &mut d.data);
    q.push_back(Queued::Datagram(d));
    c.nulls_sent += 1;
    c.last_tx = now;
}

/// Queue the setup null of call `c` to the peer's address and, until a packet came from
/// it, to its other addresses too.
fn queue_punch(q: &mut VecDeque<Queued>, c: &mut Call, now: Instant) {
    let main = c.peer_addr;
    queue_null(q, c, now, false);
    let mut tried = 1;
    if c.first_rx.is_none() {
        let others: Vec<SocketAddr> = c.candidates.iter().chain(c.named.iter()).copied().collect();
        for a in others.into_iter().filter(|a| Some(*a) != main) {
            c.peer_addr = Some(a);
            queue_null(q, c, now, false);
            tried += 1;
        }
        c.peer_addr = main;
    }
    c.candidates_tried = c.candidates_tried.max(tried);
}

/// The addresses among `candidates` other than `named`, each once.
fn other_addrs(named: SocketAddr, candidates: &[Candidate]) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = Vec::new();
    for k in candidates.iter().take(MAX_CANDIDATES) {
        if k.addr != named && !v.contains(&k.addr) {
            v.push(k.addr);
        }
    }
    v
}

/// Queue one birthday probe of call `c` (token field `tag`) from socket `from` to `to`.
fn queue_probe(q: &mut VecDeque<Queued>, c: &mut Call, tag: u64, from: SocketId, to: SocketAddr, now: Instant) {
    let (Some(call_id), Some(crypto)) = (c.call_id, c.crypto.as_ref()) else { return };
    let mut d = SmallDatagram { from, to, len: NULL_LEN as u8, data: [0; SMALL_DATAGRAM] };
    c.null_tx = c.null_tx.wrapping_add(1).max(1);
    let from_caller = c.role == Role::Caller;
    NullPacket { call_id, token: tag, keepalive: false, from_caller, probe: true, counter: c.null_tx }
        .emit(&crypto.keys.null_key, &mut d.data);
    q.push_back(Queued::Datagram(d));
    c.probes_sent += 1;
    c.last_tx = now;
}

/// How long after a search found its pair the easy side may still move to the pair the hard
/// side confirmed (two hits at once).
const RELATCH_WINDOW: Duration = Duration::from_secs(2);

/// Probes one timer turn sends at most (a stalled thread does not burst a whole round).
const MAX_PROBES_PER_TURN: u32 = 64;

/// Ports past the hard side's sockets the easy side predicts for a sequential NAT (other
/// flows take ports from it meanwhile).
const PREDICT_MARGIN: i32 = 64;

/// Run the search of call `c` at `now`: the hard side re-sends its sockets' probes when due;
/// the easy side sends the probes due at its rate, pausing after each round's budget.
fn search_step(q: &mut VecDeque<Queued>, cfg: &ClientConfig, c: &mut Call, now: Instant) {
    let Some(mut s) = c.search.take() else { return };
    if let Some(t) = s.next_repunch {
        if now >= t {
            let peer = c.peer_addr.expect("a searching call knows the peer's address");
            for &id in &s.sockets {
                queue_probe(q, c, s.tx_tag, id, peer, now);
            }
            s.next_repunch = Some(now + cfg.birthday_repunch);
        }
    }
    let interval = Duration::from_secs(1) / cfg.birthday_rate.max(1);
    let mut sent = 0;
    while let Some(t) = s.next_probe {
        if t > now || sent >= MAX_PROBES_PER_TURN {
            break;
        }
        if s.round_sent >= cfg.birthday_budget.max(1) {
            s.round_sent = 0;
            s.next_probe = Some(now + cfg.birthday_pause);
            break;
        }
        let port = match s.predicted.pop_front() {
            Some(p) => Some(p),
            None => s.walk.as_mut().and_then(|w| w.next()),
        };
        let Some(port) = port else {
            // Every port was tried: wait for the deadline (or a late answer).
            s.next_probe = None;
            break;
        };
        queue_probe(q, c, s.tx_tag, SocketId::MAIN, SocketAddr::new(s.peer_ip, port), now);
        s.round_sent += 1;
        sent += 1;
        // On the rate's grid, but never owing more than one turn's worth after a stall.
        s.next_probe = Some((t + interval).max(now.checked_sub(interval * MAX_PROBES_PER_TURN).unwrap_or(now)));
    }
    c.search = Some(s);
}

fn micros_since(base: Instant, now: Instant) -> u64 {
    now.saturating_duration_since(base).as_micros() as u64
}
