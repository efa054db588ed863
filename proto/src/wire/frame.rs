//! Signalling frames between a client and the manager (over TCP).
//!
//! Every frame is `len:u16 | version:u8 | type:u8 | body`, big-endian, where `len` counts
//! the bytes after the length field (version + type + body, so `len >= 2`) and is at most
//! [`MAX_FRAME_LEN`]. The byte-by-byte layout of every body is in `docs/protocol.md`.
//!
//! Decoding is two-step and never panics: [`Frame::decode`] says whether a whole frame is
//! buffered, rejects an oversized length prefix before the body arrives, and validates the
//! body into a plain [`Frame`] value, rejecting short bodies, trailing bytes, unknown types,
//! bad ids, address families and reason codes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::nat::NatClass;

/// Protocol version carried in every frame.
pub const VERSION: u8 = 1;
/// Largest allowed value of the length prefix (bytes after the prefix).
pub const MAX_FRAME_LEN: usize = 1024;
/// Longest client id in bytes (UTF-8).
pub const MAX_ID_LEN: usize = 64;
/// Longest ERROR message in bytes (UTF-8).
pub const MAX_MESSAGE_LEN: usize = 255;
/// Most candidate addresses one REGISTER, INCOMING or START carries.
pub const MAX_CANDIDATES: usize = 8;

/// Errors found while decoding a frame. A connection that sends one is sent an ERROR and
/// closed, because the byte stream can no longer be trusted to be in sync.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME_LEN`].
    #[error("frame length {len} exceeds the limit of {MAX_FRAME_LEN} bytes")]
    Oversized {
        /// The length prefix that was read.
        len: usize,
    },
    /// The length prefix is below 2 (no room for version and type).
    #[error("frame length {len} is too short for version and type")]
    TooShort {
        /// The length prefix that was read.
        len: usize,
    },
    /// The version byte is not [`VERSION`].
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The type byte names no known frame.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The body ended before a field of the named frame was complete.
    #[error("{frame} body truncated")]
    Truncated {
        /// The frame type being decoded.
        frame: &'static str,
    },
    /// The body had bytes left over after the last field of the named frame.
    #[error("{frame} body has {extra} trailing bytes")]
    TrailingBytes {
        /// The frame type being decoded.
        frame: &'static str,
        /// Number of bytes left over.
        extra: usize,
    },
    /// A client id is empty, too long, not UTF-8, or contains control characters or spaces.
    #[error("invalid client id")]
    BadId,
    /// An address family byte is neither 4 nor 6.
    #[error("invalid address family {0}")]
    BadAddrFamily(u8),
    /// A reason, code or source byte has no defined meaning.
    #[error("invalid {field} value {value}")]
    BadCode {
        /// Which field held the value.
        field: &'static str,
        /// The value found.
        value: u16,
    },
    /// An ERROR message is not valid UTF-8.
    #[error("invalid error message text")]
    BadText,
}

/// A validated client id: 1 to 64 bytes of UTF-8 with no whitespace or control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(String);

impl ClientId {
    /// Validate and wrap an id.
    pub fn new(s: impl Into<String>) -> Result<Self, FrameError> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_ID_LEN || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(FrameError::BadId);
        }
        Ok(ClientId(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A registration token: an expiry (Unix seconds) and an HMAC-SHA256 over the client id and
/// that expiry with the manager's secret. The manager mints and checks it; a client only
/// carries it. Its text form is `EXPIRY.MAC` (decimal, then 64 lowercase hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuthToken {
    /// Not valid after this time, seconds since the Unix epoch.
    pub expires_unix: u64,
    /// HMAC-SHA256(secret, "nullpunch-register-v1" 0x00 len(id) id expiry-u64-BE).
    pub mac: [u8; 32],
}

impl AuthToken {
    /// Parse the text form `EXPIRY.MAC`.
    pub fn parse(s: &str) -> Result<AuthToken, String> {
        let (e, m) = s.trim().split_once('.').ok_or("a token is EXPIRY.MAC (from `manager token`)")?;
        let expires_unix: u64 = e.parse().map_err(|_| format!("token expiry {e:?} is not a number"))?;
        if m.len() != 64 || !m.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("token MAC must be 64 hex digits".into());
        }
        let mut mac = [0u8; 32];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = u8::from_str_radix(&m[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(AuthToken { expires_unix, mac })
    }
}

impl fmt::Display for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.", self.expires_unix)?;
        for b in self.mac {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never log the MAC: it is a bearer credential until it expires.
        write!(f, "AuthToken {{ expires_unix: {}, mac: .. }}", self.expires_unix)
    }
}

/// An address as carried in frames (IPv4 or IPv6 plus UDP port).
pub type Addr = SocketAddr;

/// A call id, assigned by the manager; unique per manager run. The top 16 bits name the
/// manager shard that owns the call's record.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct CallId(pub u64);

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

macro_rules! code_enum {
    ($(#[$m:meta])* $name:ident : $field:literal { $($(#[$vm:meta])* $v:ident = $n:expr,)+ }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        pub enum $name { $($(#[$vm])* $v = $n,)+ }
        impl $name {
            /// The wire value.
            pub fn code(self) -> u8 { self as u8 }
            /// Parse a wire value.
            pub fn from_code(v: u8) -> Result<Self, FrameError> {
                match v { $($n => Ok($name::$v),)+ _ => Err(FrameError::BadCode { field: $field, value: v as u16 }) }
            }
            /// A short lowercase name, for logs and JSON.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => stringify!($v),)+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

code_enum! {
    /// How the manager learned the public UDP address it hands out.
    AddrSource: "addr source" {
        /// From the client's STUN binding request (the address the packet came from).
        Stun = 1,
        /// No binding was found: the TCP peer's IP with the client's local UDP port.
        TcpPeer = 2,
        /// The client's port mapping on its router (REGISTER candidate `mapped`, on the IP
        /// the manager observed).
        Mapped = 3,
    }
}

code_enum! {
    /// What a [`Candidate`] address is.
    CandidateKind: "candidate kind" {
        /// An address of the client's own interface (reaches it from its LAN, for a peer
        /// behind the same NAT).
        Host = 1,
        /// The public address of a port mapping the client holds on its router (PCP,
        /// NAT-PMP or UPnP IGD).
        Mapped = 2,
    }
}

/// An address at which a client may be reached besides the one the manager observed
/// (`docs/protocol.md` section 5.6).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Candidate {
    /// What it is.
    pub kind: CandidateKind,
    /// The address (the client's UDP port on it).
    pub addr: Addr,
}

/// Most SRTP suites a CALL offers.
pub const MAX_SUITES: usize = 4;

/// One party's half of a call's end-to-end key exchange (`docs/protocol.md` section 2.15,
/// `docs/security.md`): sent in CALL (the caller's offer) and PUNCHED (the callee's answer),
/// relayed unchanged by the manager in INCOMING and START. The manager sees only public keys.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct KeyShare {
    /// The sender's X25519 public key for this call (a fresh key pair per call).
    pub public: [u8; 32],
    /// SRTP suite codes (`crate::e2e::SUITE_*`): in CALL the offer, best first (1 to
    /// [`MAX_SUITES`]); in PUNCHED the one the callee picked (exactly one). Codes a party does
    /// not know are relayed and ignored.
    pub suites: Vec<u8>,
    /// The sender's long-term identity: its Ed25519 public key and a signature over this
    /// call's key exchange (optional; a peer that pins the other requires it).
    pub identity: Option<Identity>,
}

/// A long-term identity proof inside a [`KeyShare`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Identity {
    /// Ed25519 public key.
    pub key: [u8; 32],
    /// Ed25519 signature (see `crate::e2e` for what is signed).
    pub sig: [u8; 64],
}

code_enum! {
    /// Why a call was rejected.
    RejectReason: "reject reason" {
        /// The callee declined.
        Declined = 0,
        /// The callee did not answer (PUNCHED) in time.
        Timeout = 1,
        /// The callee disconnected before answering.
        CalleeGone = 2,
        /// A client called itself.
        SelfCall = 3,
        /// The caller is at its concurrent-call limit.
        CallerLimit = 4,
        /// The call_ref is already in use by a pending call of this caller.
        DuplicateRef = 5,
        /// No relay-free path: both sides randomise ports and neither has a port mapping
        /// ([`crate::nat::NO_PATH_REASON`]).
        NoPath = 6,
        /// Sent by the callee: no SRTP suite of the offer is one it accepts.
        NoCommonSuite = 7,
        /// Sent by the callee: the caller's key share is missing or invalid, or not signed
        /// by the identity the callee pins.
        KeyRefused = 8,
        /// Sent by a manager in a cluster: the callee is on another manager, and this one
        /// cannot reach the cluster's engine (NATS) now. Calls within one manager go on.
        ClusterDown = 9,
    }
}

code_enum! {
    /// Why a callee is unknown.
    UnknownReason: "unknown reason" {
        /// No client with that id has registered since the manager started.
        NeverRegistered = 0,
        /// The client registered before but is not connected now.
        Offline = 1,
    }
}

code_enum! {
    /// Why a call ended.
    HangupReason: "hangup reason" {
        /// A party hung up normally.
        Normal = 0,
        /// A timer expired (no START, no media).
        Timeout = 1,
        /// The other party stopped sending (media timeout) or disconnected.
        PeerGone = 2,
        /// The sender is shutting down.
        Shutdown = 3,
        /// A protocol error ended the call.
        Error = 4,
    }
}

code_enum! {
    /// ERROR codes sent by the manager.
    ErrorCode: "error code" {
        /// A frame could not be decoded; the connection is closed.
        Malformed = 1,
        /// A frame's length prefix exceeds the limit; the connection is closed.
        Oversized = 2,
        /// The frame's version is not supported; the connection is closed.
        UnsupportedVersion = 3,
        /// The frame needs a registered connection.
        NotRegistered = 4,
        /// A newer connection registered the same id; this one is closed.
        Replaced = 5,
        /// The frame names a call the manager does not know.
        UnknownCall = 6,
        /// The frame names a call this connection is not a party to.
        NotParty = 7,
        /// The frame is valid but not allowed now (e.g. REGISTER twice).
        Unexpected = 8,
        /// The manager is shutting down; the connection is closed.
        Shutdown = 9,
        /// No REGISTER in time, or the connection was idle too long; it is closed.
        Timeout = 10,
        /// REGISTER without a valid token while the manager requires one (missing, made
        /// for another id, expired, or not signed with the manager's secret).
        Unauthorized = 11,
        /// The manager holds as many connections as it is allowed; this one is closed.
        TooManyConnections = 12,
        /// The connection sent frames faster than its allowance; it is closed.
        RateLimited = 13,
    }
}

/// One signalling frame.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Frame {
    /// Client -> manager: register `id` with its local UDP port. `binding` is the transaction
    /// id of the STUN binding request the client sent to the manager's UDP port, if any.
    Register {
        /// The client's id.
        id: ClientId,
        /// The client's local UDP port.
        udp_port: u16,
        /// How many calls this client takes at once (1 for a voice client); BUSY beyond it.
        max_calls: u16,
        /// STUN transaction id of the client's binding request.
        binding: Option<[u8; 12]>,
        /// Proof that the client may use `id` (required by a manager with a secret).
        auth: Option<AuthToken>,
        /// How the client's NAT maps its UDP socket (measured against the manager's STUN
        /// addresses); [`NatClass::Unknown`] is sent as nothing.
        nat: NatClass,
        /// The client's other addresses: host addresses and a port mapping (at most
        /// [`MAX_CANDIDATES`]; none is sent as nothing).
        candidates: Vec<Candidate>,
    },
    /// Manager -> client: registration accepted; the public UDP address the manager observed.
    Registered {
        /// The public UDP address peers will be told.
        public: Addr,
        /// How the manager learned it.
        source: AddrSource,
    },
    /// Client -> manager: call `callee`. `call_ref` is chosen by the caller and echoed in the
    /// answer (START, REJECT, BUSY, UNKNOWN).
    Call {
        /// Caller-chosen reference.
        call_ref: u32,
        /// Whom to call.
        callee: ClientId,
        /// The caller's key share and SRTP offer (optional trailing).
        keys: Option<Box<KeyShare>>,
    },
    /// Manager -> callee: an incoming call from `caller` at `caller_addr`.
    Incoming {
        /// The call's id.
        call_id: CallId,
        /// Secret shared by the two parties, carried in null packets; RTP SSRCs derive from it.
        token: u64,
        /// Who is calling.
        caller: ClientId,
        /// The caller's public UDP address.
        caller_addr: Addr,
        /// The caller's NAT class (from its REGISTER).
        caller_nat: NatClass,
        /// The caller's other addresses the callee should punch too (optional trailing).
        caller_candidates: Vec<Candidate>,
        /// The caller's key share from CALL, unchanged (optional trailing).
        caller_keys: Option<Box<KeyShare>>,
    },
    /// Callee -> manager: the null packet was sent from `udp_port`.
    Punched {
        /// The call's id.
        call_id: CallId,
        /// The callee's local UDP port.
        udp_port: u16,
        /// The callee's key share and chosen SRTP suite (optional trailing).
        keys: Option<Box<KeyShare>>,
    },
    /// Manager -> caller: the callee's window is open; stream media to `callee_addr`.
    Start {
        /// The caller's reference from CALL.
        call_ref: u32,
        /// The call's id.
        call_id: CallId,
        /// Shared secret (see INCOMING).
        token: u64,
        /// The callee's public UDP address.
        callee_addr: Addr,
        /// The callee's NAT class (from its REGISTER).
        callee_nat: NatClass,
        /// The callee's other addresses the caller should try too (optional trailing).
        callee_candidates: Vec<Candidate>,
        /// The callee's key share from PUNCHED, unchanged (optional trailing).
        callee_keys: Option<Box<KeyShare>>,
    },
    /// Manager -> caller: the call was rejected (or callee -> manager: decline `call_id`).
    Reject {
        /// The caller's reference (0 when sent by a callee).
        call_ref: u32,
        /// The call's id, or 0 if none was assigned.
        call_id: CallId,
        /// Why.
        reason: RejectReason,
        /// With `NoPath`: the callee's NAT class (so the caller can report both sides);
        /// [`NatClass::Unknown`] is sent as nothing (optional trailing field, as in START).
        callee_nat: NatClass,
    },
    /// Manager -> caller: the callee is at its concurrent-call limit.
    Busy {
        /// The caller's reference from CALL.
        call_ref: u32,
    },
    /// Manager -> caller: no such callee online.
    Unknown {
        /// The caller's reference from CALL.
        call_ref: u32,
        /// Never registered, or offline.
        reason: UnknownReason,
    },
    /// Either way: end a call.
    Hangup {
        /// The call's id.
        call_id: CallId,
        /// Why.
        reason: HangupReason,
    },
    /// Either way: liveness probe; answered by PONG with the same nonce.
    Ping {
        /// Echoed in the PONG.
        nonce: u64,
    },
    /// Answer to PING.
    Pong {
        /// The PING's nonce.
        nonce: u64,
    },
    /// Manager -> client: an error; codes marked "closed" are followed by closing the connection.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// Frame type bytes.
pub mod ty {
    #![allow(missing_docs)]
    pub const REGISTER: u8 = 0x01;
    pub const REGISTERED: u8 = 0x02;
    pub const CALL: u8 = 0x03;
    pub const INCOMING: u8 = 0x04;
    pub const PUNCHED: u8 = 0x05;
    pub const START: u8 = 0x06;
    pub const REJECT: u8 = 0x07;
    pub const BUSY: u8 = 0x08;
    pub const UNKNOWN: u8 = 0x09;
    pub const HANGUP: u8 = 0x0A;
    pub const PING: u8 = 0x0B;
    pub const PONG: u8 = 0x0C;
    pub const ERROR: u8 = 0x0D;
}

impl Frame {
    /// The frame's name, as in `docs/protocol.md`.
    pub fn name(&self) -> &'static str {
        type_name(self.type_byte())
    }

    /// The frame's type byte.
    pub fn type_byte(&self) -> u8 {
        match self {
            Frame::Register { .. } => ty::REGISTER,
            Frame::Registered { .. } => ty::REGISTERED,
            Frame::Call { .. } => ty::CALL,
            Frame::Incoming { .. } => ty::INCOMING,
            Frame::Punched { .. } => ty::PUNCHED,
            Frame::Start { .. } => ty::START,
            Frame::Reject { .. } => ty::REJECT,
            Frame::Busy { .. } => ty::BUSY,
            Frame::Unknown { .. } => ty::UNKNOWN,
            Frame::Hangup { .. } => ty::HANGUP,
            Frame::Ping { .. } => ty::PING,
            Frame::Pong { .. } => ty::PONG,
            Frame::Error { .. } => ty::ERROR,
        }
    }

    /// Append the encoded frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0, VERSION, self.type_byte()]);
        match self {
            Frame::Register { id, udp_port, max_calls, binding, auth, nat, candidates } => {
                put_id(out, id);
                out.extend_from_slice(&udp_port.to_be_bytes());
                out.extend_from_slice(&max_calls.to_be_bytes());
                match binding {
                    Some(tx) => {
                        out.push(1);
                        out.extend_from_slice(tx);
                    }
                    None => out.push(0),
                }
                // Optional and last: absent means no token (a REGISTER without one has the
                // same bytes as before tokens existed).
                if let Some(a) = auth {
                    out.push(1);
                    out.extend_from_slice(&a.expires_unix.to_be_bytes());
                    out.extend_from_slice(&a.mac);
                }
                // Then, also optional, tag 2: the NAT class.
                if *nat != NatClass::Unknown {
                    out.push(2);
                    put_nat(out, *nat);
                }
                // Tag 3: candidate addresses.
                if !candidates.is_empty() {
                    out.push(3);
                    put_candidates(out, candidates);
                }
            }
            Frame::Registered { public, source } => {
                put_addr(out, public);
                out.push(source.code());
            }
            Frame::Call { call_ref, callee, keys } => {
                out.extend_from_slice(&call_ref.to_be_bytes());
                put_id(out, callee);
                if let Some(k) = keys {
                    put_keys(out, k);
                }
            }
            Frame::Incoming { call_id, token, caller, caller_addr, caller_nat, caller_candidates, caller_keys } => {
                out.extend_from_slice(&call_id.0.to_be_bytes());
                out.extend_from_slice(&token.to_be_bytes());
                put_id(out, caller);
                put_addr(out, caller_addr);
                put_trailing(out, *caller_nat, caller_candidates, caller_keys.as_deref());
            }
            Frame::Punched { call_id, udp_port, keys } => {
                out.extend_from_slice(&call_id.0.to_be_bytes());
                out.extend_from_slice(&udp_port.to_be_bytes());
                if let Some(k) = keys {
                    put_keys(out, k);
                }
            }
            Frame::Start { call_ref, call_id, token, callee_addr, callee_nat, callee_candidates, callee_keys } => {
                out.extend_from_slice(&call_ref.to_be_bytes());
                out.extend_from_slice(&call_id.0.to_be_bytes());
                out.extend_from_slice(&token.to_be_bytes());
                put_addr(out, callee_addr);
                put_trailing(out, *callee_nat, callee_candidates, callee_keys.as_deref());
            }
            Frame::Reject { call_ref, call_id, reason, callee_nat } => {
                out.extend_from_slice(&call_ref.to_be_bytes());
                out.extend_from_slice(&call_id.0.to_be_bytes());
                out.push(reason.code());
                if *callee_nat != NatClass::Unknown {
                    put_nat(out, *callee_nat);
                }
            }
            Frame::Busy { call_ref } => out.extend_from_slice(&call_ref.to_be_bytes()),
            Frame::Unknown { call_ref, reason } => {
                out.extend_from_slice(&call_ref.to_be_bytes());
                out.push(reason.code());
            }
            Frame::Hangup { call_id, reason } => {
                out.extend_from_slice(&call_id.0.to_be_bytes());
                out.push(reason.code());
            }
            Frame::Ping { nonce } | Frame::Pong { nonce } => out.extend_from_slice(&nonce.to_be_bytes()),
            Frame::Error { code, message } => {
                out.extend_from_slice(&(code.code() as u16).to_be_bytes());
                // Truncate on a char boundary so the frame always decodes.
                let mut end = message.len().min(MAX_MESSAGE_LEN);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                out.push(end as u8);
                out.extend_from_slice(&message.as_bytes()[..end]);
            }
        }
        let len = out.len() - start - 2;
        debug_assert!(len <= MAX_FRAME_LEN);
        out[start..start + 2].copy_from_slice(&(len as u16).to_be_bytes());
    }

    /// Decode one frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` if `buf` does not yet hold a whole frame, or `Ok(Some((frame,
    /// consumed)))`. An oversized or too-short length prefix is reported as soon as the two
    /// prefix bytes are present.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::Oversized { len });
        }
        if len < 2 {
            return Err(FrameError::TooShort { len });
        }
        if buf.len() < 2 + len {
            return Ok(None);
        }
        let frame = Frame::decode_body(&buf[2..2 + len])?;
        Ok(Some((frame, 2 + len)))
    }

    /// Decode `version | type | body` (the bytes counted by the length prefix).
    pub fn decode_body(b: &[u8]) -> Result<Frame, FrameError> {
        if b.len() < 2 {
            return Err(FrameError::TooShort { len: b.len() });
        }
        if b[0] != VERSION {
            return Err(FrameError::UnsupportedVersion(b[0]));
        }
        let t = b[1];
        let name = type_name(t);
        if name == "?" {
            return Err(FrameError::UnknownType(t));
        }
        let mut r = Reader { b: &b[2..], frame: name };
        let frame = match t {
            ty::REGISTER => {
                let id = r.id()?;
                let udp_port = r.u16()?;
                let max_calls = r.u16()?;
                let binding = match r.u8()? {
                    0 => None,
                    1 => Some(r.array::<12>()?),
                    v => return Err(FrameError::BadCode { field: "binding flag", value: v as u16 }),
                };
                // Optional tagged fields, each at most once, in tag order: 1 auth, 2 NAT
                // class, 3 candidates.
                let mut auth = None;
                let mut nat = NatClass::Unknown;
                let mut candidates = Vec::new();
                let mut last_tag = 0;
                while !r.b.is_empty() {
                    let tag = r.u8()?;
                    if tag <= last_tag {
                        return Err(FrameError::BadCode { field: "register field tag", value: tag as u16 });
                    }
                    last_tag = tag;
                    match tag {
                        1 => auth = Some(AuthToken { expires_unix: r.u64()?, mac: r.array::<32>()? }),
                        2 => nat = r.nat_known()?,
                        3 => candidates = r.candidates()?,
                        v => return Err(FrameError::BadCode { field: "register field tag", value: v as u16 }),
                    }
                }
                Frame::Register { id, udp_port, max_calls, binding, auth, nat, candidates }
            }
            ty::REGISTERED => Frame::Registered { public: r.addr()?, source: AddrSource::from_code(r.u8()?)? },
            ty::CALL => Frame::Call { call_ref: r.u32()?, callee: r.id()?, keys: r.keys_opt()? },
            ty::INCOMING => {
                let (call_id, token, caller, caller_addr) = (CallId(r.u64()?), r.u64()?, r.id()?, r.addr()?);
                let (caller_nat, caller_candidates, caller_keys) = r.trailing()?;
                Frame::Incoming { call_id, token, caller, caller_addr, caller_nat, caller_candidates, caller_keys }
            }
            ty::PUNCHED => Frame::Punched { call_id: CallId(r.u64()?), udp_port: r.u16()?, keys: r.keys_opt()? },
            ty::START => {
                let (call_ref, call_id, token, callee_addr) = (r.u32()?, CallId(r.u64()?), r.u64()?, r.addr()?);
                let (callee_nat, callee_candidates, callee_keys) = r.trailing()?;
                Frame::Start { call_ref, call_id, token, callee_addr, callee_nat, callee_candidates, callee_keys }
            }
            ty::REJECT => Frame::Reject {
                call_ref: r.u32()?,
                call_id: CallId(r.u64()?),
                reason: RejectReason::from_code(r.u8()?)?,
                callee_nat: r.nat_opt()?,
            },
            ty::BUSY => Frame::Busy { call_ref: r.u32()? },
            ty::UNKNOWN => Frame::Unknown { call_ref: r.u32()?, reason: UnknownReason::from_code(r.u8()?)? },
            ty::HANGUP => Frame::Hangup { call_id: CallId(r.u64()?), reason: HangupReason::from_code(r.u8()?)? },
            ty::PING => Frame::Ping { nonce: r.u64()? },
            ty::PONG => Frame::Pong { nonce: r.u64()? },
            ty::ERROR => {
                let code = r.u16()?;
                let code = u8::try_from(code)
                    .map_err(|_| FrameError::BadCode { field: "error code", value: code })
                    .and_then(ErrorCode::from_code)?;
                let n = r.u8()? as usize;
                let text = r.take(n)?;
                let message = std::str::from_utf8(text).map_err(|_| FrameError::BadText)?;
                Frame::Error { code, message: message.to_owned() }
            }
            _ => unreachable!("type_name accepted an unknown type"),
        };
        if !r.b.is_empty() {
            return Err(FrameError::TrailingBytes { frame: name, extra: r.b.len() });
        }
        Ok(frame)
    }
}

/// The name of a frame type byte, or "?" if unknown.
pub fn type_name(t: u8) -> &'static str {
    match t {
        ty::REGISTER => "REGISTER",
        ty::REGISTERED => "REGISTERED",
        ty::CALL => "CALL",
        ty::INCOMING => "INCOMING",
        ty::PUNCHED => "PUNCHED",
        ty::START => "START",
        ty::REJECT => "REJECT",
        ty::BUSY => "BUSY",
        ty::UNKNOWN => "UNKNOWN",
        ty::HANGUP => "HANGUP",
        ty::PING => "PING",
        ty::PONG => "PONG",
        ty::ERROR => "ERROR",
        _ => "?",
    }
}

fn put_id(out: &mut Vec<u8>, id: &ClientId) {
    out.push(id.0.len() as u8);
    out.extend_from_slice(id.0.as_bytes());
}

/// A NAT class: code (1 byte) and step (i16).
fn put_nat(out: &mut Vec<u8>, n: NatClass) {
    out.push(n.code());
    out.extend_from_slice(&n.wire_delta().to_be_bytes());
}

/// `n:u8` then `n` times `kind:u8 addr`; at most [`MAX_CANDIDATES`] are written.
fn put_candidates(out: &mut Vec<u8>, c: &[Candidate]) {
    let c = &c[..c.len().min(MAX_CANDIDATES)];
    out.push(c.len() as u8);
    for cand in c {
        out.push(cand.kind.code());
        put_addr(out, &cand.addr);
    }
}

/// The optional tail of INCOMING and START: the peer's NAT class, then its candidates, then
/// its key share. Each part is written only when it or a later one is present: with a key
/// share the class and the candidate count are always written (an unknown class as code 0,
/// no candidates as count 0); without one, no candidates are sent as nothing, and an unknown
/// class with no candidates as nothing at all. So every value has one encoding.
fn put_trailing(out: &mut Vec<u8>, nat: NatClass, candidates: &[Candidate], keys: Option<&KeyShare>) {
    if nat != NatClass::Unknown || !candidates.is_empty() || keys.is_some() {
        put_nat(out, nat);
    }
    if !candidates.is_empty() || keys.is_some() {
        put_candidates(out, candidates);
    }
    if let Some(k) = keys {
        put_keys(out, k);
    }
}

/// A key share: `n:u8` suite codes, the X25519 public key, then an identity flag (0 or 1) and,
/// with 1, the Ed25519 key and signature. At most [`MAX_SUITES`] suites are written.
fn put_keys(out: &mut Vec<u8>, k: &KeyShare) {
    let suites = &k.suites[..k.suites.len().min(MAX_SUITES)];
    out.push(suites.len() as u8);
    out.extend_from_slice(suites);
    out.extend_from_slice(&k.public);
    match &k.identity {
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.key);
            out.extend_from_slice(&id.sig);
        }
        None => out.push(0),
    }
}

fn put_addr(out: &mut Vec<u8>, a: &Addr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
    }
}

/// The tail of INCOMING and START: NAT class, candidates, key share.
type Trailing = (NatClass, Vec<Candidate>, Option<Box<KeyShare>>);

struct Reader<'a> {
    b: &'a [u8],
    frame: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Truncated { frame: self.frame });
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn id(&mut self) -> Result<ClientId, FrameError> {
        let n = self.u8()? as usize;
        let raw = self.take(n)?;
        let s = std::str::from_utf8(raw).map_err(|_| FrameError::BadId)?;
        ClientId::new(s)
    }
    /// A NAT class that is sent (not unknown: unknown is sent as nothing).
    fn nat_known(&mut self) -> Result<NatClass, FrameError> {
        let code = self.u8()?;
        let delta = i16::from_be_bytes(self.array()?);
        match NatClass::from_wire(code, delta) {
            Some(n) if n != NatClass::Unknown => Ok(n),
            _ => Err(FrameError::BadCode { field: "nat class", value: code as u16 }),
        }
    }
    /// A trailing NAT class, absent meaning unknown.
    fn nat_opt(&mut self) -> Result<NatClass, FrameError> {
        if self.b.is_empty() {
            Ok(NatClass::Unknown)
        } else {
            self.nat_known()
        }
    }
    /// A candidate list: 1 to [`MAX_CANDIDATES`] entries (an empty list is sent as nothing).
    fn candidates(&mut self) -> Result<Vec<Candidate>, FrameError> {
        let n = self.u8()?;
        if n == 0 || n as usize > MAX_CANDIDATES {
            return Err(FrameError::BadCode { field: "candidate count", value: n as u16 });
        }
        let mut v = Vec::with_capacity(n as usize);
        for _ in 0..n {
            v.push(Candidate { kind: CandidateKind::from_code(self.u8()?)?, addr: self.addr()? });
        }
        Ok(v)
    }
    /// The tail of INCOMING and START (see `put_trailing`): one encoding per value, so an
    /// unknown class is written only when candidates or a key share follow, and a candidate
    /// count of 0 only when a key share follows.
    fn trailing(&mut self) -> Result<Trailing, FrameError> {
        if self.b.is_empty() {
            return Ok((NatClass::Unknown, Vec::new(), None));
        }
        let code = self.u8()?;
        let delta = i16::from_be_bytes(self.array()?);
        let nat =
            NatClass::from_wire(code, delta).ok_or(FrameError::BadCode { field: "nat class", value: code as u16 })?;
        if self.b.is_empty() {
            // A known class alone; an unknown one is written only for what follows.
            return match nat {
                NatClass::Unknown => Err(FrameError::Truncated { frame: self.frame }),
                _ => Ok((nat, Vec::new(), None)),
            };
        }
        let n = self.u8()?;
        if n as usize > MAX_CANDIDATES {
            return Err(FrameError::BadCode { field: "candidate count", value: n as u16 });
        }
        let mut candidates = Vec::with_capacity(n as usize);
        for _ in 0..n {
            candidates.push(Candidate { kind: CandidateKind::from_code(self.u8()?)?, addr: self.addr()? });
        }
        if n == 0 && self.b.is_empty() {
            // A count of 0 is written only for the key share that follows: it is missing.
            return Err(FrameError::Truncated { frame: self.frame });
        }
        let keys = self.keys_opt()?;
        Ok((nat, candidates, keys))
    }
    /// A key share if any bytes are left (see `put_keys`).
    fn keys_opt(&mut self) -> Result<Option<Box<KeyShare>>, FrameError> {
        if self.b.is_empty() {
            return Ok(None);
        }
        let n = self.u8()?;
        if n == 0 || n as usize > MAX_SUITES {
            return Err(FrameError::BadCode { field: "suite count", value: n as u16 });
        }
        let suites = self.take(n as usize)?.to_vec();
        let public = self.array::<32>()?;
        let identity = match self.u8()? {
            0 => None,
            1 => Some(Identity { key: self.array::<32>()?, sig: self.array::<64>()? }),
            v => return Err(FrameError::BadCode { field: "identity flag", value: v as u16 }),
        };
        Ok(Some(Box::new(KeyShare { public, suites, identity })))
    }
    fn addr(&mut self) -> Result<Addr, FrameError> {
        let fam = self.u8()?;
        let port = self.u16()?;
        let ip = match fam {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            f => return Err(FrameError::BadAddrFamily(f)),
        };
        Ok(SocketAddr::new(ip, port))
    }
}

/// A stream decoder: feed it bytes as they arrive from TCP, take whole frames out.
///
/// It buffers at most one partial frame (at most `2 + MAX_FRAME_LEN` bytes) beyond what the
/// caller has not yet drained, so a peer cannot make it grow without bound.
#[derive(Default, Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 4096 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or the decode error (after
    /// which the stream is out of sync and should be closed).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        match Frame::decode(&self.buf[self.start..])? {
            Some((f, n)) => {
                self.start += n;
                Ok(Some(f))
            }
            None => Ok(None),
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn id(s: &str) -> ClientId {
        ClientId::new(s).unwrap()
    }

    fn share(identity: bool) -> KeyShare {
        KeyShare {
            public: [0x25; 32],
            suites: vec![1, 2],
            identity: identity.then_some(Identity { key: [0x11; 32], sig: [0x22; 64] }),
        }
    }

    /// One of every frame, with IPv4 and IPv6 addresses.
    pub(crate) fn samples() -> Vec<Frame> {
        let v4: Addr = "203.0.113.7:40000".parse().unwrap();
        let v6: Addr = "[2001:db8::1]:5004".parse().unwrap();
        vec![
            Frame::Register {
                id: id("alice"),
                udp_port: 40000,
                max_calls: 1,
                binding: Some([7; 12]),
                auth: None,
                nat: NatClass::Unknown,
                candidates: Vec::new(),
            },
            Frame::Register {
                id: id("b"),
                udp_port: 1,
                max_calls: 500,
                binding: None,
                auth: None,
                nat: NatClass::Unknown,
                candidates: Vec::new(),
            },
            Frame::Register {
                id: id("c"),
                udp_port: 2,
                max_calls: 1,
                binding: None,
                auth: Some(AuthToken { expires_unix: 1_800_000_000, mac: [0xA5; 32] }),
                nat: NatClass::Unknown,
                candidates: Vec::new(),
            },
            Frame::Register {
                id: id("d"),
                udp_port: 3,
                max_calls: 1,
                binding: Some([8; 12]),
                auth: Some(AuthToken { expires_unix: 1_800_000_000, mac: [0x5A; 32] }),
                nat: NatClass::Sequential { delta: -2 },
                candidates: Vec::new(),
            },
            Frame::Register {
                id: id("e"),
                udp_port: 4,
                max_calls: 1,
                binding: None,
                auth: None,
                nat: NatClass::Random,
                candidates: Vec::new(),
            },
            Frame::Incoming {
                call_id: CallId(2),
                token: 1,
                caller: id("e"),
                caller_addr: v4,
                caller_nat: NatClass::EndpointIndependent,
                caller_candidates: Vec::new(),
                caller_keys: None,
            },
            Frame::Start {
                call_ref: 2,
                call_id: CallId(4),
                token: 6,
                callee_addr: v4,
                callee_nat: NatClass::Random,
                callee_candidates: Vec::new(),
                callee_keys: None,
            },
            Frame::Register {
                id: id("f"),
                udp_port: 5,
                max_calls: 1,
                binding: None,
                auth: None,
                nat: NatClass::Mapped,
                candidates: vec![
                    Candidate { kind: CandidateKind::Host, addr: v4 },
                    Candidate { kind: CandidateKind::Host, addr: v6 },
                    Candidate { kind: CandidateKind::Mapped, addr: v4 },
                ],
            },
            Frame::Incoming {
                call_id: CallId(7),
                token: 3,
                caller: id("g"),
                caller_addr: v4,
                caller_nat: NatClass::Unknown,
                caller_candidates: vec![Candidate { kind: CandidateKind::Host, addr: v6 }],
                caller_keys: None,
            },
            Frame::Start {
                call_ref: 3,
                call_id: CallId(7),
                token: 3,
                callee_addr: v6,
                callee_nat: NatClass::Sequential { delta: 2 },
                callee_candidates: vec![Candidate { kind: CandidateKind::Host, addr: v4 }; MAX_CANDIDATES],
                callee_keys: None,
            },
            // Key shares: with and without an identity, after every kind of tail.
            Frame::Call { call_ref: 9, callee: id("bob"), keys: Some(Box::new(share(false))) },
            Frame::Call { call_ref: 10, callee: id("bob"), keys: Some(Box::new(share(true))) },
            Frame::Punched { call_id: CallId(3), udp_port: 5004, keys: Some(Box::new(share(true))) },
            Frame::Incoming {
                call_id: CallId(9),
                token: 4,
                caller: id("k"),
                caller_addr: v4,
                caller_nat: NatClass::Unknown,
                caller_candidates: Vec::new(),
                caller_keys: Some(Box::new(share(false))),
            },
            Frame::Incoming {
                call_id: CallId(9),
                token: 4,
                caller: id("k"),
                caller_addr: v4,
                caller_nat: NatClass::Random,
                caller_candidates: vec![Candidate { kind: CandidateKind::Host, addr: v6 }],
                caller_keys: Some(Box::new(share(true))),
            },
            Frame::Start {
                call_ref: 3,
                call_id: CallId(9),
                token: 4,
                callee_addr: v6,
                callee_nat: NatClass::Sequential { delta: -1 },
                callee_candidates: Vec::new(),
                callee_keys: Some(Box::new(share(false))),
            },
            Frame::Registered { public: v4, source: AddrSource::Stun },
            Frame::Registered { public: v4, source: AddrSource::Mapped },
            Frame::Registered { public: v6, source: AddrSource::TcpPeer },
            Frame::Call { call_ref: 9, callee: id("bob"), keys: None },
            Frame::Incoming {
                call_id: CallId(u64::MAX),
                token: 42,
                caller: id("alice"),
                caller_addr: v4,
                caller_nat: NatClass::Unknown,
                caller_candidates: Vec::new(),
                caller_keys: None,
            },
            Frame::Incoming {
                call_id: CallId(1),
                token: 0,
                caller: id("ü-über"),
                caller_addr: v6,
                caller_nat: NatClass::Unknown,
                caller_candidates: Vec::new(),
                caller_keys: None,
            },
            Frame::Punched { call_id: CallId(3), udp_port: 5004, keys: None },
            Frame::Start {
                call_ref: 1,
                call_id: CallId(3),
                token: 5,
                callee_addr: v6,
                callee_nat: NatClass::Unknown,
                callee_candidates: Vec::new(),
                callee_keys: None,
            },
            Frame::Reject {
                call_ref: 0,
                call_id: CallId(3),
                reason: RejectReason::Timeout,
                callee_nat: NatClass::Unknown,
            },
            Frame::Reject {
                call_ref: 9,
                call_id: CallId(0),
                reason: RejectReason::NoPath,
                callee_nat: NatClass::Random,
            },
            Frame::Busy { call_ref: u32::MAX },
            Frame::Unknown { call_ref: 2, reason: UnknownReason::Offline },
            Frame::Hangup { call_id: CallId(8), reason: HangupReason::PeerGone },
            Frame::Ping { nonce: 1 },
            Frame::Pong { nonce: 2 },
            Frame::Error { code: ErrorCode::Replaced, message: "replaced by a newer registration".into() },
            Frame::Error { code: ErrorCode::Malformed, message: String::new() },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in samples() {
            let mut buf = Vec::new();
            f.encode(&mut buf);
            let (g, n) = Frame::decode(&buf).unwrap().unwrap();
            assert_eq!(g, f);
            assert_eq!(n, buf.len());
            assert_eq!(u16::from_be_bytes([buf[0], buf[1]]) as usize, buf.len() - 2);
            assert_eq!(buf[2], VERSION);
        }
    }

    #[test]
    fn register_bytes_match_the_documented_layout() {
        let f = Frame::Register {
            id: id("ab"),
            udp_port: 0x1234,
            max_calls: 2,
            binding: None,
            auth: None,
            nat: NatClass::Unknown,
            candidates: Vec::new(),
        };
        let mut buf = Vec::new();
        f.encode(&mut buf);
        assert_eq!(buf, [0, 10, 1, 0x01, 2, b'a', b'b', 0x12, 0x34, 0, 2, 0]);
        let f = Frame::Punched { call_id: CallId(0x0102030405060708), udp_port: 80, keys: None };
        buf.clear();
        f.encode(&mut buf);
        assert_eq!(buf, [0, 12, 1, 0x05, 1, 2, 3, 4, 5, 6, 7, 8, 0, 80]);
    }

    #[test]
    fn register_with_a_token_appends_flag_expiry_and_mac() {
        let auth = AuthToken { expires_unix: 0x0102030405060708, mac: [9; 32] };
        let f = Frame::Register {
            id: id("ab"),
            udp_port: 0x1234,
            max_calls: 2,
            binding: None,
            auth: Some(auth),
            nat: NatClass::Unknown,
            candidates: Vec::new(),
        };
        let mut buf = Vec::new();
        f.encode(&mut buf);
        let mut want = vec![0, 51, 1, 0x01, 2, b'a', b'b', 0x12, 0x34, 0, 2, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8];
        want.extend_from_slice(&[9; 32]);
        assert_eq!(buf, want);
        assert_eq!(Frame::decode_body(&buf[2..]).unwrap(), f);
        // An unknown tag is malformed; a tag without the token is truncated.
        let mut bad = buf.clone();
        bad[12] = 4;
        let err = Frame::decode_body(&bad[2..]);
        assert!(matches!(err, Err(FrameError::BadCode { field: "register field tag", value: 4 })), "{err:?}");
        assert!(matches!(Frame::decode_body(&buf[2..14]), Err(FrameError::Truncated { .. })));
        // The text form round-trips; the MAC never shows in Debug.
        let text = auth.to_string();
        assert_eq!(text, format!("72623859790382856.{}", "09".repeat(32)));
        assert_eq!(AuthToken::parse(&text).unwrap(), auth);
        assert!(!format!("{auth:?}").contains("0909"));
        assert!(AuthToken::parse("123").is_err());
        assert!(AuthToken::parse("x.00").is_err());
        assert!(AuthToken::parse(&format!("1.{}", "zz".repeat(32))).is_err());
    }

    #[test]
    fn every_truncation_is_incomplete_or_an_error_never_a_panic() {
        for f in samples() {
            let mut buf = Vec::new();
            f.encode(&mut buf);
            for cut in 0..buf.len() {
                // A short buffer is simply incomplete.
                assert_eq!(Frame::decode(&buf[..cut]), Ok(None), "{f:?} cut at {cut}");
                // A frame whose length prefix claims only the truncated body is malformed.
                if cut >= 4 {
                    let mut short = buf[..cut].to_vec();
                    short[..2].copy_from_slice(&((cut - 2) as u16).to_be_bytes());
                    // REGISTER's token and NAT class, and INCOMING's and START's NAT class,
                    // are optional and last: cut just before one, the frame is valid
                    // without it (and what is left encodes to exactly the cut bytes).
                    if let Ok(Some((g, n))) = Frame::decode(&short) {
                        assert_eq!(n, cut, "{f:?} cut at {cut}");
                        assert!(without_optional_fields(&f).contains(&g), "{f:?} cut at {cut} decoded as {g:?}");
                        continue;
                    }
                    let err = Frame::decode(&short).unwrap_err();
                    assert!(matches!(err, FrameError::Truncated { .. }), "{f:?} cut at {cut}: {err:?}");
                }
            }
        }
    }

    /// `f` and the frames it becomes with trailing optional fields left out.
    fn without_optional_fields(f: &Frame) -> Vec<Frame> {
        let mut out = vec![f.clone()];
        match f.clone() {
            Frame::Register { id, udp_port, max_calls, binding, auth, nat, .. } => {
                out.push(Frame::Register {
                    id: id.clone(),
                    udp_port,
                    max_calls,
                    binding,
                    auth,
                    nat,
                    candidates: Vec::new(),
                });
                out.push(Frame::Register {
                    id: id.clone(),
                    udp_port,
                    max_calls,
                    binding,
                    auth,
                    nat: NatClass::Unknown,
                    candidates: Vec::new(),
                });
                out.push(Frame::Register {
                    id,
                    udp_port,
                    max_calls,
                    binding,
                    auth: None,
                    nat: NatClass::Unknown,
                    candidates: Vec::new(),
                });
            }
            Frame::Call { call_ref, callee, .. } => out.push(Frame::Call { call_ref, callee, keys: None }),
            Frame::Punched { call_id, udp_port, .. } => out.push(Frame::Punched { call_id, udp_port, keys: None }),
            Frame::Incoming { call_id, token, caller, caller_addr, caller_nat, caller_candidates, .. } => out.extend([
                Frame::Incoming {
                    call_id,
                    token,
                    caller: caller.clone(),
                    caller_addr,
                    caller_nat,
                    caller_candidates,
                    caller_keys: None,
                },
                Frame::Incoming {
                    call_id,
                    token,
                    caller: caller.clone(),
                    caller_addr,
                    caller_nat,
                    caller_candidates: Vec::new(),
                    caller_keys: None,
                },
                Frame::Incoming {
                    call_id,
                    token,
                    caller,
                    caller_addr,
                    caller_nat: NatClass::Unknown,
                    caller_candidates: Vec::new(),
                    caller_keys: None,
                },
            ]),
            Frame::Start { call_ref, call_id, token, callee_addr, callee_nat, callee_candidates, .. } => out.extend([
                Frame::Start {
                    call_ref,
                    call_id,
                    token,
                    callee_addr,
                    callee_nat,
                    callee_candidates,
                    callee_keys: None,
                },
                Frame::Start {
                    call_ref,
                    call_id,
                    token,
                    callee_addr,
                    callee_nat,
                    callee_candidates: Vec::new(),
                    callee_keys: None,
                },
                Frame::Start {
                    call_ref,
                    call_id,
                    token,
                    callee_addr,
                    callee_nat: NatClass::Unknown,
                    callee_candidates: Vec::new(),
                    callee_keys: None,
                },
            ]),
            Frame::Reject { call_ref, call_id, reason, .. } => {
                out.push(Frame::Reject { call_ref, call_id, reason, callee_nat: NatClass::Unknown })
            }
            _ => {}
        }
        out
    }

    #[test]
    fn nat_classes_are_tagged_after_the_token_and_checked() {
        let f = Frame::Register {
            id: id("ab"),
            udp_port: 0x1234,
            max_calls: 2,
            binding: None,
            auth: None,
            nat: NatClass::Sequential { delta: -2 },
            candidates: Vec::new(),
        };
        let mut buf = Vec::new();
        f.encode(&mut buf);
        assert_eq!(buf, vec![0, 14, 1, 0x01, 2, b'a', b'b', 0x12, 0x34, 0, 2, 0, 2, 2, 0xFF, 0xFE]);
        assert_eq!(Frame::decode_body(&buf[2..]).unwrap(), f);
        // A class with a step it does not have, an unknown code, and "unknown" sent
        // explicitly (it is sent as nothing) are malformed.
        for (code, delta) in [(1u8, [0, 1]), (5, [0, 0]), (0, [0, 0])] {
            let mut bad = buf.clone();
            bad[13] = code;
            bad[14..16].copy_from_slice(&delta);
            let err = Frame::decode_body(&bad[2..]);
            assert!(matches!(err, Err(FrameError::BadCode { field: "nat class", .. })), "{err:?}");
        }
        // Tags out of order (the NAT class before the token) or repeated are malformed.
        let mut twice = buf.clone();
        twice.extend_from_slice(&[2, 3, 0, 0]);
        let err = Frame::decode_body(&twice[2..]);
        assert!(matches!(err, Err(FrameError::BadCode { field: "register field tag", value: 2 })), "{err:?}");
        let mut swapped = buf[..12].to_vec();
        swapped.extend_from_slice(&[2, 3, 0, 0, 1]);
        swapped.extend_from_slice(&[0; 40]);
        let err = Frame::decode_body(&swapped[2..]);
        assert!(matches!(err, Err(FrameError::BadCode { field: "register field tag", value: 1 })), "{err:?}");
    }

    #[test]
    fn candidate_lists_have_one_encoding_and_are_checked() {
        let v4: Addr = "10.1.0.2:40000".parse().unwrap();
        let host = Candidate { kind: CandidateKind::Host, addr: v4 };
        let start = |nat, c: Vec<Candidate>| Frame::Start {
            call_ref: 1,
            call_id: CallId(2),
            token: 3,
            callee_addr: v4,
            callee_nat: nat,
            callee_candidates: c,
            callee_keys: None,
        };
        let enc = |f: &Frame| {
            let mut b = Vec::new();
            f.encode(&mut b);
            b
        };
        // Candidates after an unknown class: the class is written as code 0.
        let b = enc(&start(NatClass::Unknown, vec![host]));
        let tail = &b[b.len() - 1 - 1 - 7 - 3..];
        assert_eq!(tail, &[0, 0, 0, 1, 1, 4, 0x9c, 0x40, 10, 1, 0, 2]);
        assert_eq!(Frame::decode(&b).unwrap().unwrap().0, start(NatClass::Unknown, vec![host]));
        // Code 0 with nothing after it would be a second encoding of "no class": the
        // candidates it announces are missing.
        let mut b = enc(&start(NatClass::Unknown, vec![]));
        b.extend_from_slice(&[0, 0, 0]);
        b[1] += 3;
        let err = Frame::decode(&b);
        assert!(matches!(err, Err(FrameError::Truncated { .. })), "{err:?}");
        // A count above the limit and an unknown kind are malformed.
        for (count, kind, field) in [(9u8, 1u8, "candidate count"), (1, 7, "candidate kind")] {
            let mut b = enc(&start(NatClass::Random, vec![host]));
            let at = b.len() - 1 - 7 - 1;
            b[at] = count;
            b[at + 1] = kind;
            let err = Frame::decode(&b);
            assert!(matches!(err, Err(FrameError::BadCode { field: f, .. }) if f == field), "{count} {kind}: {err:?}");
        }
        // REGISTER's tag 3 after tag 2, and the limit on what is written.
        let many = vec![host; MAX_CANDIDATES + 3];
        let f = Frame::Register {
            id: ClientId::new("x").unwrap(),
            udp_port: 1,
            max_calls: 1,
            binding: None,
            auth: None,
            nat: NatClass::Random,
            candidates: many,
        };
        let (back, _) = Frame::decode(&enc(&f)).unwrap().unwrap();
        assert!(matches!(back, Frame::Register { candidates, .. } if candidates.len() == MAX_CANDIDATES));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for f in samples() {
            let mut buf = Vec::new();
            f.encode(&mut buf);
            buf.push(0xAA);
            let len = buf.len() - 2;
            buf[..2].copy_from_slice(&(len as u16).to_be_bytes());
            let err = Frame::decode(&buf).unwrap_err();
            match f {
                // After a REGISTER the next byte is read as a field tag.
                Frame::Register { .. } => {
                    assert!(matches!(err, FrameError::BadCode { field: "register field tag", value: 0xAA }), "{err:?}")
                }
                // After a frame's last field, trailing; but after an INCOMING or START
                // without a NAT class, as the start of one, and after a CALL, PUNCHED,
                // INCOMING or START without a key share, as the start of one.
                Frame::Incoming { caller_keys: Some(_), .. }
                | Frame::Start { callee_keys: Some(_), .. }
                | Frame::Call { keys: Some(_), .. }
                | Frame::Punched { keys: Some(_), .. } => {
                    assert!(matches!(err, FrameError::TrailingBytes { extra: 1, .. }), "{f:?}: {err:?}")
                }
                Frame::Call { .. } | Frame::Punched { .. } => {
                    assert!(matches!(err, FrameError::BadCode { field: "suite count", value: 0xAA }), "{err:?}")
                }
                Frame::Incoming { ref caller_candidates, .. } if !caller_candidates.is_empty() => {
                    assert!(matches!(err, FrameError::BadCode { field: "suite count", value: 0xAA }), "{err:?}")
                }
                Frame::Start { ref callee_candidates, .. } if !callee_candidates.is_empty() => {
                    assert!(matches!(err, FrameError::BadCode { field: "suite count", value: 0xAA }), "{err:?}")
                }
                Frame::Incoming { caller_nat: NatClass::Unknown, .. }
                | Frame::Start { callee_nat: NatClass::Unknown, .. }
                | Frame::Reject { callee_nat: NatClass::Unknown, .. } => {
                    assert!(matches!(err, FrameError::Truncated { .. }), "{f:?}: {err:?}")
                }
                // After one with a class but no candidates, as a candidate count.
                Frame::Incoming { ref caller_candidates, .. } if caller_candidates.is_empty() => {
                    assert!(matches!(err, FrameError::BadCode { field: "candidate count", value: 0xAA }), "{err:?}")
                }
                Frame::Start { ref callee_candidates, .. } if callee_candidates.is_empty() => {
                    assert!(matches!(err, FrameError::BadCode { field: "candidate count", value: 0xAA }), "{err:?}")
                }
                _ => assert!(matches!(err, FrameError::TrailingBytes { extra: 1, .. }), "{f:?}: {err:?}"),
            }
        }
    }

    #[test]
    fn bad_headers_are_rejected_with_their_reason() {
        assert_eq!(Frame::decode(&[0x04, 0x01]), Err(FrameError::Oversized { len: 1025 }));
        assert_eq!(Frame::decode(&[0xFF, 0xFF, 1]), Err(FrameError::Oversized { len: 65535 }));
        assert_eq!(Frame::decode(&[0, 1, 1]), Err(FrameError::TooShort { len: 1 }));
        assert_eq!(Frame::decode(&[0, 0]), Err(FrameError::TooShort { len: 0 }));
        assert_eq!(Frame::decode(&[0, 2, 2, ty::PING]), Err(FrameError::UnsupportedVersion(2)));
        assert_eq!(Frame::decode(&[0, 2, 1, 0x7F]), Err(FrameError::UnknownType(0x7F)));
        assert_eq!(Frame::decode(&[0, 2, 1, 0]), Err(FrameError::UnknownType(0)));
    }

    #[test]
    fn bad_fields_are_rejected() {
        // Empty id.
        assert_eq!(Frame::decode(&[0, 7, 1, ty::CALL, 0, 0, 0, 1, 0]), Err(FrameError::BadId));
        // Id with a space, and with invalid UTF-8.
        assert_eq!(Frame::decode(&[0, 9, 1, ty::CALL, 0, 0, 0, 1, 2, b'a', b' ']), Err(FrameError::BadId));
        assert_eq!(Frame::decode(&[0, 8, 1, ty::CALL, 0, 0, 0, 1, 1, 0xFF]), Err(FrameError::BadId));
        // Address family 5.
        let mut b = vec![0, 0, 1, ty::REGISTERED, 5, 0, 80, 1, 2, 3, 4, 1];
        let n = b.len() - 2;
        b[1] = n as u8;
        assert_eq!(Frame::decode(&b), Err(FrameError::BadAddrFamily(5)));
        // Unknown hangup reason.
        let b = [0, 11, 1, ty::HANGUP, 0, 0, 0, 0, 0, 0, 0, 1, 99];
        assert!(matches!(Frame::decode(&b), Err(FrameError::BadCode { field: "hangup reason", value: 99 })));
        // Binding flag 2.
        let b = [0, 9, 1, ty::REGISTER, 1, b'a', 0, 1, 0, 1, 2];
        assert!(matches!(Frame::decode(&b), Err(FrameError::BadCode { field: "binding flag", .. })));
        // Too-long id cannot be built.
        assert_eq!(ClientId::new("x".repeat(65)), Err(FrameError::BadId));
        assert!(ClientId::new("x".repeat(64)).is_ok());
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let f = Frame::Error { code: ErrorCode::Malformed, message: "é".repeat(200) };
        let mut buf = Vec::new();
        f.encode(&mut buf);
        let (g, _) = Frame::decode(&buf).unwrap().unwrap();
        match g {
            Frame::Error { message, .. } => assert_eq!(message, "é".repeat(127)),
            _ => panic!(),
        }
    }

    #[test]
    fn stream_decoder_reassembles_frames_split_anywhere() {
        let mut all = Vec::new();
        for f in samples() {
            f.encode(&mut all);
        }
        let mut rng = Rng::new(1);
        for _ in 0..200 {
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            let mut pos = 0;
            while pos < all.len() {
                let n = (1 + rng.below(40) as usize).min(all.len() - pos);
                dec.push(&all[pos..pos + n]);
                pos += n;
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, samples());
            assert_eq!(dec.pending(), 0);
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng::new(99);
        let mut buf = [0u8; 64];
        let mut frames = 0;
        for _ in 0..200_000 {
            let n = rng.below(64) as usize;
            rng.fill(&mut buf[..n]);
            // Make some of them plausible: right version and a known type.
            if n > 4 && rng.chance(0.5) {
                buf[0] = 0;
                buf[1] = (n - 2) as u8;
                buf[2] = VERSION;
                buf[3] = 1 + rng.below(13) as u8;
            }
            if let Ok(Some(_)) = Frame::decode(&buf[..n]) {
                frames += 1;
            }
        }
        assert!(frames > 0, "some random frames should decode");
    }
}
