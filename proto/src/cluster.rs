//! Many managers as one service, sans-IO: the bridge between a manager's shards and the
//! cluster's engine (NATS: node inbox subjects, and the directory in a JetStream key-value
//! bucket). `docs/cluster.md` describes the design; this module decides, the manager's
//! `cluster` module does the IO.
//!
//! * Every manager is a **node** with a random nonzero id, new at every start (a restarted
//!   manager is a new node). Its inbox subject is [`inbox_subject`]; it publishes a
//!   heartbeat on [`HEARTBEAT_SUBJECT`] every [`HEARTBEAT_EVERY`].
//! * The **directory** maps a client id to the node holding its connection; the entry's
//!   revision in the bucket is its **generation**, a fencing token. A REGISTER on a node
//!   writes the entry by compare-and-swap over the revision it last saw; the node it
//!   replaced (if another) is told to close that generation's connection
//!   ([`NodeMsg::Replace`]), so the newest registration wins, as on one manager.
//! * A CALL whose callee is not live on the caller's node ([`ClusterOut::Lookup`]) goes to
//!   the callee's node with the generation the caller's node knows ([`NodeMsg::Call`]). A
//!   node that no longer holds that generation answers NOT_HERE ([`NodeMsg::NotHere`]); the
//!   caller's node looks the entry up afresh and tries once more. No responders on the
//!   node's inbox means the node is gone. After the CALL, the call's frames travel node to
//!   node with the call id ([`NodeMsg::Shard`]). A call whose two parties share a node never
//!   leaves it.
//! * A node whose heartbeat stops for [`NODE_TIMEOUT`] (or whose inbox has no responders)
//!   is **gone**: every shard ends the calls it had with that node's side
//!   ([`ShardMsg::NodeGone`]).
//! * While the engine is unreachable, calls to other nodes are refused at once (REJECT
//!   `ClusterDown`), calls within the node go on, and when it comes back the node writes
//!   every entry it holds again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::nat::NatClass;
use crate::shard::stats::Stats;
use crate::shard::{home_shard, CallReq, ConnRef, ShardMsg, Track};
use crate::wire::frame::{CallId, ClientId, Frame, HangupReason, RejectReason, UnknownReason};

/// Subject every node publishes its heartbeat on.
pub const HEARTBEAT_SUBJECT: &str = "np.hb";
/// Heartbeat period.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// A node not heard from for this long is gone.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(2);
/// A CALL to another node not acknowledged within this time is given up on (counted; the
/// caller's own START timer ends the call).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a CALL whose callee's entry names a node that is gone waits for the callee to
/// register elsewhere (its client fails over within a second or so) before UNKNOWN
/// `Offline`.
pub const FAILOVER_WAIT: Duration = Duration::from_secs(2);
/// CALLs waiting so at most; beyond, they are answered at once.
pub const MAX_WAITING: usize = 10_000;
/// How long a gone node is remembered as gone.
const GONE_MEMORY: Duration = Duration::from_secs(60);
/// How often entries whose write failed are written again.
pub const REWRITE_EVERY: Duration = Duration::from_secs(1);
/// The directory bucket's name.
pub const BUCKET: &str = "np_dir";

/// A node's inbox subject.
pub fn inbox_subject(node: u64) -> String {
    format!("np.node.{node:016x}")
}

/// The subject a node's CALL acknowledgements come back on ([`reply_prefix`] + token).
pub fn reply_subject(node: u64, token: u64) -> String {
    format!("np.reply.{node:016x}.{token}")
}

/// The wildcard a node subscribes to for its acknowledgements.
pub fn reply_prefix(node: u64) -> String {
    format!("np.reply.{node:016x}.*")
}

/// The token of a reply subject made by [`reply_subject`] for `node`.
pub fn reply_token(node: u64, subject: &str) -> Option<u64> {
    subject.strip_prefix(&format!("np.reply.{node:016x}."))?.parse().ok()
}

/// The bucket key of a client id: `i.<id>` when the id is made only of characters a key may
/// hold, else `h.<hex of its bytes>`.
pub fn kv_key(id: &ClientId) -> String {
    let s = id.as_str();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        format!("i.{s}")
    } else {
        let mut k = String::with_capacity(2 + 2 * s.len());
        k.push_str("h.");
        for b in s.bytes() {
            k.push_str(&format!("{b:02x}"));
        }
        k
    }
}

/// The client id of a bucket key ([`kv_key`]'s inverse).
pub fn kv_id(key: &str) -> Option<ClientId> {
    if let Some(s) = key.strip_prefix("i.") {
        return ClientId::new(s).ok();
    }
    let h = key.strip_prefix("h.")?;
    if h.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok()).collect();
    ClientId::new(String::from_utf8(bytes?).ok()?).ok()
}

/// A directory entry's value: the holding node's id in hex, then its name.
pub fn kv_value(node: u64, name: &str) -> Vec<u8> {
    format!("{node:016x} {name}").into_bytes()
}

/// The node id in an entry's value.
pub fn kv_node(value: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(value.get(..16)?).ok()?;
    u64::from_str_radix(s, 16).ok().filter(|&n| n != 0)
}

/// Where the directory says an id is: its node and the entry's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// The node.
    pub node: u64,
    /// The entry's revision.
    pub gen: u64,
}

/// From a shard to its node's bridge.
#[derive(Debug, Clone)]
pub enum ClusterOut {
    /// Send `msg` to shard `shard` of `node` (another node).
    Send {
        /// The node.
        node: u64,
        /// Its shard.
        shard: u16,
        /// The message.
        msg: ShardMsg,
    },
    /// A CALL made on this node whose callee is not live here: find it in the cluster, or
    /// answer UNKNOWN `reason` (what this node knows).
    Lookup {
        /// The CALL.
        req: Box<CallReq>,
        /// This node's answer if no other node has the callee.
        reason: UnknownReason,
    },
    /// A CALL from another node for a generation this node does not hold.
    NotHere {
        /// The CALL.
        req: Box<CallReq>,
    },
    /// `id` registered on `conn` here: write its directory entry.
    Registered {
        /// Client id.
        id: ClientId,
        /// Its connection.
        conn: ConnRef,
    },
    /// The tombstone of `id` (entry generation `gen`) was forgotten here: remove the entry
    /// if it still has that generation.
    Forgotten {
        /// Client id.
        id: ClientId,
        /// The generation.
        gen: u64,
    },
}

/// A message between nodes, on the receiver's [`inbox_subject`].
#[derive(Debug, Clone)]
pub enum NodeMsg {
    /// A CALL for a callee this node holds (to its home shard here).
    Call(Box<CallReq>),
    /// The CALL went to a node that does not hold the callee's generation (to the caller's
    /// node).
    NotHere(Box<CallReq>),
    /// `id` registered on the sender, replacing generation `gen`.
    Replace {
        /// Client id.
        id: ClientId,
        /// The replaced generation.
        gen: u64,
    },
    /// For one shard of the receiver: a call's frames and party changes
    /// ([`ShardMsg::Deliver`], [`ShardMsg::Hangup`], [`ShardMsg::Decline`],
    /// [`ShardMsg::PartyGone`]).
    Shard {
        /// The shard.
        shard: u16,
        /// The message.
        msg: ShardMsg,
    },
}

/// Why a node message did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeMsgError {
    /// Ended early.
    #[error("node message truncated")]
    Truncated,
    /// An unknown version or kind byte, or a field out of range.
    #[error("node message malformed: {0}")]
    Malformed(&'static str),
    /// A shard message that never crosses nodes.
    #[error("shard message {0} does not cross nodes")]
    NotCrossNode(&'static str),
}

const VERSION: u8 = 1;
/// The first byte of a batch: several node messages to one node in one NATS message.
const BATCH: u8 = 0xB1;

/// Several encoded node messages to one node as one payload: `0xB1`, then each message as a
/// u16 length and its bytes. A node reads a payload with [`split_batch`].
pub fn encode_batch<'a>(msgs: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = vec![BATCH];
    for m in msgs {
        let n = u16::try_from(m.len()).expect("a node message is far below 64 KiB");
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

/// The node messages in a payload: a batch ([`encode_batch`]) or one message. Never panics.
pub fn split_batch(payload: &[u8]) -> Result<Vec<&[u8]>, NodeMsgError> {
    if payload.first() != Some(&BATCH) {
        return Ok(vec![payload]);
    }
    let mut out = Vec::new();
    let mut rest = &payload[1..];
    while !rest.is_empty() {
        let n = match rest {
            [a, b, ..] => u16::from_be_bytes([*a, *b]) as usize,
            _ => return Err(NodeMsgError::Truncated),
        };
        let m = rest.get(2..2 + n).ok_or(NodeMsgError::Truncated)?;
        out.push(m);
        rest = &rest[2 + n..];
    }
    Ok(out)
}
const K_CALL: u8 = 1;
const K_NOT_HERE: u8 = 2;
const K_REPLACE: u8 = 3;
const K_DELIVER: u8 = 4;
const K_HANGUP: u8 = 5;
const K_DECLINE: u8 = 6;
const K_PARTY_GONE: u8 = 7;

fn put_conn(out: &mut Vec<u8>, c: &ConnRef) {
    out.extend_from_slice(&c.node.to_be_bytes());
    out.extend_from_slice(&c.shard.to_be_bytes());
    out.extend_from_slice(&c.id.to_be_bytes());
}

fn put_req(out: &mut Vec<u8>, r: &CallReq) {
    put_conn(out, &r.caller_conn);
    out.extend_from_slice(&r.gen.to_be_bytes());
    out.push(r.attempt);
    // The fields that frames already carry travel as those frames.
    Frame::Call { call_ref: r.call_ref, callee: r.callee.clone(), keys: r.caller_keys.clone() }.encode(out);
    Frame::Incoming {
        call_id: CallId(0),
        token: 0,
        caller: r.caller.clone(),
        caller_addr: r.caller_addr,
        caller_nat: r.caller_nat,
        caller_candidates: r.caller_hosts.clone(),
        caller_keys: None,
    }
    .encode(out);
}

impl NodeMsg {
    /// Encode (version, kind, body).
    pub fn encode(&self) -> Result<Vec<u8>, NodeMsgError> {
        let mut out = vec![VERSION];
        match self {
            NodeMsg::Call(r) => {
                out.push(K_CALL);
                put_req(&mut out, r);
            }
            NodeMsg::NotHere(r) => {
                out.push(K_NOT_HERE);
                put_req(&mut out, r);
            }
            NodeMsg::Replace { id, gen } => {
                out.push(K_REPLACE);
                out.extend_from_slice(&gen.to_be_bytes());
                Frame::Call { call_ref: 0, callee: id.clone(), keys: None }.encode(&mut out);
            }
            NodeMsg::Shard { shard, msg } => match msg {
                ShardMsg::Deliver { conn, frame, track } => {
                    out.push(K_DELIVER);
                    out.extend_from_slice(&shard.to_be_bytes());
                    out.extend_from_slice(&conn.to_be_bytes());
                    match track {
                        Track::None => out.push(0),
                        Track::Add(c, node, call_ref) => {
                            out.push(1);
                            out.extend_from_slice(&c.0.to_be_bytes());
                            out.extend_from_slice(&node.to_be_bytes());
                            out.extend_from_slice(&call_ref.to_be_bytes());
                        }
                        Track::Remove(c) => {
                            out.push(2);
                            out.extend_from_slice(&c.0.to_be_bytes());
                        }
                    }
                    match frame {
                        Some(f) => {
                            out.push(1);
                            f.encode(&mut out);
                        }
                        None => out.push(0),
                    }
                }
                ShardMsg::Hangup { call_id, conn, reason } => {
                    out.push(K_HANGUP);
                    out.extend_from_slice(&shard.to_be_bytes());
                    put_conn(&mut out, conn);
                    out.extend_from_slice(&call_id.0.to_be_bytes());
                    out.push(reason.code());
                }
                ShardMsg::Decline { call_id, conn, reason } => {
                    out.push(K_DECLINE);
                    out.extend_from_slice(&shard.to_be_bytes());
                    put_conn(&mut out, conn);
                    out.extend_from_slice(&call_id.0.to_be_bytes());
                    out.push(reason.code());
                }
                ShardMsg::PartyGone { call_id, conn } => {
                    out.push(K_PARTY_GONE);
                    out.extend_from_slice(&shard.to_be_bytes());
                    put_conn(&mut out, conn);
                    out.extend_from_slice(&call_id.0.to_be_bytes());
                }
                other => return Err(NodeMsgError::NotCrossNode(shard_msg_name(other))),
            },
        }
        Ok(out)
    }

    /// Decode what [`NodeMsg::encode`] wrote. Never panics on any input.
    pub fn decode(b: &[u8]) -> Result<NodeMsg, NodeMsgError> {
        let mut r = Reader { b, at: 0 };
        if r.u8()? != VERSION {
            return Err(NodeMsgError::Malformed("version"));
        }
        let msg = match r.u8()? {
            K_CALL => NodeMsg::Call(r.req()?),
            K_NOT_HERE => NodeMsg::NotHere(r.req()?),
            K_REPLACE => {
                let gen = r.u64()?;
                let Frame::Call { callee, .. } = r.frame()? else { return Err(NodeMsgError::Malformed("replace")) };
                NodeMsg::Replace { id: callee, gen }
            }
            K_DELIVER => {
                let shard = r.u16()?;
                let conn = r.u64()?;
                let track = match r.u8()? {
                    0 => Track::None,
                    1 => Track::Add(CallId(r.u64()?), r.u64()?, r.u32()?),
                    2 => Track::Remove(CallId(r.u64()?)),
                    _ => return Err(NodeMsgError::Malformed("track")),
                };
                let frame = match r.u8()? {
                    0 => None,
                    1 => Some(r.frame()?),
                    _ => return Err(NodeMsgError::Malformed("frame flag")),
                };
                NodeMsg::Shard { shard, msg: ShardMsg::Deliver { conn, frame, track } }
            }
            k @ (K_HANGUP | K_DECLINE) => {
                let shard = r.u16()?;
                let conn = r.conn()?;
                let call_id = CallId(r.u64()?);
                let code = r.u8()?;
                let msg = if k == K_HANGUP {
                    let reason = HangupReason::from_code(code).map_err(|_| NodeMsgError::Malformed("reason"))?;
                    ShardMsg::Hangup { call_id, conn, reason }
                } else {
                    let reason = RejectReason::from_code(code).map_err(|_| NodeMsgError::Malformed("reason"))?;
                    ShardMsg::Decline { call_id, conn, reason }
                };
                NodeMsg::Shard { shard, msg }
            }
            K_PARTY_GONE => {
                let shard = r.u16()?;
                let conn = r.conn()?;
                let call_id = CallId(r.u64()?);
                NodeMsg::Shard { shard, msg: ShardMsg::PartyGone { call_id, conn } }
            }
            _ => return Err(NodeMsgError::Malformed("kind")),
        };
        if r.at != b.len() {
            return Err(NodeMsgError::Malformed("trailing bytes"));
        }
        Ok(msg)
    }
}

fn shard_msg_name(m: &ShardMsg) -> &'static str {
    match m {
        ShardMsg::Binding { .. } => "Binding",
        ShardMsg::Resolve { .. } => "Resolve",
        ShardMsg::Register { .. } => "Register",
        ShardMsg::Unregister { .. } => "Unregister",
        ShardMsg::CallReq(_) => "CallReq",
        ShardMsg::Punched { .. } => "Punched",
        ShardMsg::Registered { .. } => "Registered",
        ShardMsg::Kick { .. } => "Kick",
        ShardMsg::Generation { .. } => "Generation",
        ShardMsg::Replace { .. } => "Replace",
        ShardMsg::NodeGone { .. } => "NodeGone",
        ShardMsg::Hangup { .. } => "Hangup",
        ShardMsg::Decline { .. } => "Decline",
        ShardMsg::PartyGone { .. } => "PartyGone",
        ShardMsg::Deliver { .. } => "Deliver",
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], NodeMsgError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or(NodeMsgError::Truncated)?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, NodeMsgError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, NodeMsgError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, NodeMsgError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, NodeMsgError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn conn(&mut self) -> Result<ConnRef, NodeMsgError> {
        Ok(ConnRef { node: self.u64()?, shard: self.u16()?, id: self.u64()? })
    }
    fn frame(&mut self) -> Result<Frame, NodeMsgError> {
        match Frame::decode(&self.b[self.at..]) {
            Ok(Some((f, n))) => {
                self.at += n;
                Ok(f)
            }
            Ok(None) => Err(NodeMsgError::Truncated),
            Err(_) => Err(NodeMsgError::Malformed("frame")),
        }
    }
    fn req(&mut self) -> Result<Box<CallReq>, NodeMsgError> {
        let caller_conn = self.conn()?;
        let gen = self.u64()?;
        let attempt = self.u8()?;
        let Frame::Call { call_ref, callee, keys } = self.frame()? else {
            return Err(NodeMsgError::Malformed("call"));
        };
        let Frame::Incoming { caller, caller_addr, caller_nat, caller_candidates, .. } = self.frame()? else {
            return Err(NodeMsgError::Malformed("caller"));
        };
        Ok(Box::new(CallReq {
            caller,
            caller_conn,
            caller_addr,
            caller_nat,
            caller_hosts: caller_candidates,
            call_ref,
            callee,
            caller_keys: keys,
            gen,
            attempt,
        }))
    }
}

/// What the bridge asks of its IO.
#[derive(Debug, Clone)]
pub enum BridgeOut {
    /// Publish `msg` on `node`'s inbox.
    Publish {
        /// The node.
        node: u64,
        /// The message.
        msg: NodeMsg,
    },
    /// Publish `msg` on `node`'s inbox with the reply subject [`reply_subject`]`(self,
    /// token)`: the node acknowledges at once ([`Bridge::on_ack`]); no responders there is
    /// [`Bridge::on_no_responders`].
    Request {
        /// The node.
        node: u64,
        /// The message (a CALL).
        msg: NodeMsg,
        /// Identifies the request.
        token: u64,
    },
    /// Write `id`'s entry naming this node by compare-and-swap from `prev` (the entry
    /// believed current, None: no entry). On a conflict the IO reads the entry and tries
    /// again (a few times); it reports [`Bridge::on_written`].
    Write {
        /// Client id.
        id: ClientId,
        /// The connection it is written for.
        conn: ConnRef,
        /// The entry believed current.
        prev: Option<Holder>,
    },
    /// Remove `id`'s entry if its generation is still `gen`.
    Delete {
        /// Client id.
        id: ClientId,
        /// The generation.
        gen: u64,
    },
    /// Read `id`'s entry and report [`Bridge::on_entry`] with `token`.
    Get {
        /// Client id.
        id: ClientId,
        /// Identifies the read.
        token: u64,
    },
    /// Publish this node's heartbeat.
    Heartbeat,
    /// Hand `msg` to shard `shard` of this node.
    Shard {
        /// The shard.
        shard: u16,
        /// The message.
        msg: ShardMsg,
    },
}

/// A registration held on this node.
#[derive(Debug)]
struct Local {
    conn: ConnRef,
    /// Its entry's generation, 0 until written.
    gen: u64,
    /// A write is in flight.
    writing: bool,
    /// Another write is needed when that one ends (a newer connection, or the engine came
    /// back).
    dirty: bool,
}

/// A CALL waiting on the engine.
#[derive(Debug)]
enum Pending {
    /// Sent to a node; waiting for its acknowledgement.
    Sent { req: Box<CallReq>, node: u64, at: Instant },
    /// A fresh read of the callee's entry; `reason` answers if there is none.
    Reading { req: Box<CallReq>, reason: UnknownReason },
}

/// One node's bridge. See the module docs.
#[derive(Debug)]
pub struct Bridge {
    node: u64,
    shards: u16,
    stats: Arc<Stats>,
    up: bool,
    /// The directory as this node knows it (from its watch and its own writes).
    cache: HashMap<ClientId, Holder>,
    local: HashMap<ClientId, Local>,
    /// Other nodes and when each was last heard from.
    nodes: HashMap<u64, Instant>,
    /// Nodes found gone, and when.
    gone: HashMap<u64, Instant>,
    /// CALLs whose callee's entry names a gone node, by callee, until it registers
    /// elsewhere or [`FAILOVER_WAIT`] passes.
    waiting: HashMap<ClientId, Vec<(Box<CallReq>, Instant)>>,
    /// CALLs in `waiting`.
    waiting_calls: usize,
    pending: HashMap<u64, Pending>,
    next_token: u64,
    next_heartbeat: Option<Instant>,
    /// When entries whose write failed are tried again.
    next_rewrite: Option<Instant>,
    out: VecDeque<BridgeOut>,
}

impl Bridge {
    /// The bridge of node `node` (nonzero), whose manager has `shards` shards.
    pub fn new(node: u64, shards: u16, stats: Arc<Stats>) -> Bridge {
        assert!(node != 0, "node 0 means no cluster");
        Bridge {
            node,
            shards: shards.max(1),
            stats,
            up: false,
            cache: HashMap::new(),
            local: HashMap::new(),
            nodes: HashMap::new(),
            gone: HashMap::new(),
            waiting: HashMap::new(),
            waiting_calls: 0,
            pending: HashMap::new(),
            next_token: 1,
            next_heartbeat: None,
            next_rewrite: None,
            out: VecDeque::new(),
        }
    }

    /// This node's id.
    pub fn node(&self) -> u64 {
        self.node
    }

    /// Whether the engine is reachable.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Other nodes heard from within [`NODE_TIMEOUT`].
    pub fn live_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Directory entries known to this node.
    pub fn cached_entries(&self) -> usize {
        self.cache.len()
    }

    /// Where the directory says `id` is, as this node knows it.
    pub fn holder(&self, id: &ClientId) -> Option<Holder> {
        self.cache.get(id).copied()
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<BridgeOut> {
        self.out.pop_front()
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn home(&self, id: &ClientId) -> u16 {
        home_shard(id, self.shards)
    }

    /// Answer the caller of `req` with `frame` (through its shard here).
    fn answer(&mut self, req: &CallReq, frame: Frame) {
        let c = req.caller_conn;
        let msg = ShardMsg::Deliver { conn: c.id, frame: Some(frame), track: Track::None };
        if c.node == self.node {
            if c.shard >= self.shards {
                // A CALL from another node naming a caller here on a shard that does not exist.
                self.stats.inc(&self.stats.cluster_malformed);
                return;
            }
            self.out.push_back(BridgeOut::Shard { shard: c.shard, msg });
        } else {
            self.stats.inc(&self.stats.cluster_messages_out);
            self.out.push_back(BridgeOut::Publish { node: c.node, msg: NodeMsg::Shard { shard: c.shard, msg } });
        }
    }

    fn refuse_down(&mut self, req: &CallReq) {
        self.stats.inc(&self.stats.cluster_unavailable);
        self.stats.inc(&self.stats.calls_rejected);
        let f = Frame::Reject {
            call_ref: req.call_ref,
            call_id: CallId(0),
            reason: RejectReason::ClusterDown,
            callee_nat: NatClass::Unknown,
        };
        self.answer(req, f);
    }

    fn unknown(&mut self, req: &CallReq, reason: UnknownReason) {
        self.stats.inc(&self.stats.calls_unknown);
        self.answer(req, Frame::Unknown { call_ref: req.call_ref, reason });
    }

    /// Send `req` to the node the directory names, or answer. A node known gone is not
    /// asked: the CALL waits for the callee to register elsewhere.
    fn route_call(&mut self, now: Instant, mut req: Box<CallReq>, holder: Holder) {
        if self.gone.contains_key(&holder.node) {
            if self.waiting_calls >= MAX_WAITING {
                self.unknown(&req, UnknownReason::Offline);
                return;
            }
            self.waiting_calls += 1;
            self.waiting.entry(req.callee.clone()).or_default().push((req, now + FAILOVER_WAIT));
            return;
        }
        if holder.node == self.node {
            // The directory says here: the home shard decides (by that generation).
            req.gen = holder.gen;
            let shard = self.home(&req.callee);
            self.out.push_back(BridgeOut::Shard { shard, msg: ShardMsg::CallReq(req) });
            return;
        }
        req.gen = holder.gen;
        let token = self.token();
        self.stats.inc(&self.stats.cluster_calls_out);
        self.stats.inc(&self.stats.cluster_messages_out);
        self.out.push_back(BridgeOut::Request { node: holder.node, msg: NodeMsg::Call(req.clone()), token });
        self.pending.insert(token, Pending::Sent { req, node: holder.node, at: now });
    }

    /// Look the callee of `req` up afresh (or answer, after the second try).
    fn retry(&mut self, req: Box<CallReq>, reason: UnknownReason) {
        if !self.up {
            self.refuse_down(&req);
            return;
        }
        let mut req = req;
        if req.attempt >= 1 {
            self.unknown(&req, reason);
            return;
        }
        req.attempt += 1;
        self.stats.inc(&self.stats.cluster_retries);
        let token = self.token();
        self.out.push_back(BridgeOut::Get { id: req.callee.clone(), token });
        self.pending.insert(token, Pending::Reading { req, reason });
    }

    /// Output of one of this node's shards.
    pub fn from_shard(&mut self, now: Instant, o: ClusterOut) {
        match o {
            ClusterOut::Send { node, shard, msg } => {
                if !self.up {
                    // Lost: the parties' own timers end what it belonged to.
                    return;
                }
                self.stats.inc(&self.stats.cluster_messages_out);
                self.out.push_back(BridgeOut::Publish { node, msg: NodeMsg::Shard { shard, msg } });
            }
            ClusterOut::Lookup { req, reason } => {
                if !self.up {
                    self.refuse_down(&req);
                    return;
                }
                match self.cache.get(&req.callee).copied() {
                    // The directory says here, and here it is not live: this node's answer.
                    Some(h) if h.node == self.node => self.unknown(&req, reason),
                    Some(h) => self.route_call(now, req, h),
                    // Not (yet) in this node's copy: read the entry itself.
                    None => {
                        let token = self.token();
                        self.out.push_back(BridgeOut::Get { id: req.callee.clone(), token });
                        self.pending.insert(token, Pending::Reading { req, reason });
                    }
                }
            }
            ClusterOut::NotHere { req } => {
                let origin = req.caller_conn.node;
                if origin == self.node {
                    self.retry(req, UnknownReason::Offline);
                } else if self.up {
                    self.stats.inc(&self.stats.cluster_messages_out);
                    self.out.push_back(BridgeOut::Publish { node: origin, msg: NodeMsg::NotHere(req) });
                }
            }
            ClusterOut::Registered { id, conn } => {
                let l = self.local.entry(id.clone()).or_insert(Local { conn, gen: 0, writing: false, dirty: false });
                l.conn = conn;
                l.gen = 0;
                if l.writing {
                    l.dirty = true;
                } else if self.up {
                    l.writing = true;
                    let prev = self.cache.get(&id).copied();
                    self.out.push_back(BridgeOut::Write { id, conn, prev });
                } else {
                    // Written when the engine is back.
                    l.dirty = true;
                }
            }
            ClusterOut::Forgotten { id, gen } => {
                if self.local.get(&id).is_some_and(|l| l.gen == gen) {
                    self.local.remove(&id);
                }
                if self.up {
                    self.out.push_back(BridgeOut::Delete { id, gen });
                }
            }
        }
    }

    /// A message on this node's inbox.
    pub fn on_node_msg(&mut self, now: Instant, payload: &[u8]) {
        let msg = match NodeMsg::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                self.stats.inc(&self.stats.cluster_malformed);
                tracing::debug!("dropped a node message: {e}");
                return;
            }
        };
        self.stats.inc(&self.stats.cluster_messages_in);
        match msg {
            NodeMsg::Call(req) => {
                self.stats.inc(&self.stats.cluster_calls_in);
                let shard = self.home(&req.callee);
                self.out.push_back(BridgeOut::Shard { shard, msg: ShardMsg::CallReq(req) });
            }
            NodeMsg::NotHere(req) => self.retry(req, UnknownReason::Offline),
            NodeMsg::Replace { id, gen } => {
                if self.local.get(&id).is_some_and(|l| l.gen == gen) {
                    self.local.remove(&id);
                }
                let shard = self.home(&id);
                self.out.push_back(BridgeOut::Shard { shard, msg: ShardMsg::Replace { id, gen } });
            }
            NodeMsg::Shard { shard, msg } => {
                if shard >= self.shards {
                    self.stats.inc(&self.stats.cluster_malformed);
                    return;
                }
                self.out.push_back(BridgeOut::Shard { shard, msg });
            }
        }
        let _ = now;
    }

    /// A CALL request was acknowledged by its node.
    pub fn on_ack(&mut self, now: Instant, token: u64) {
        if let Some(Pending::Sent { at, .. }) = self.pending.remove(&token) {
            self.stats.cluster_rtt.record(now.saturating_duration_since(at));
        }
    }

    /// A CALL request found no responders: its node is gone.
    pub fn on_no_responders(&mut self, now: Instant, token: u64) {
        let Some(Pending::Sent { req, node, .. }) = self.pending.remove(&token) else { return };
        self.stats.inc(&self.stats.cluster_no_responders);
        self.node_gone(now, node);
        self.retry(req, UnknownReason::Offline);
    }

    /// The IO read `token`'s entry: `holder`, or none.
    pub fn on_entry(&mut self, now: Instant, token: u64, id: &ClientId, holder: Option<Holder>) {
        match holder {
            Some(h) => {
                self.cache.insert(id.clone(), h);
            }
            None => {
                self.cache.remove(id);
            }
        }
        let Some(Pending::Reading { req, reason }) = self.pending.remove(&token) else { return };
        match holder {
            // The directory says here, and the home shard here said not live: its answer.
            Some(h) if h.node == self.node && req.attempt == 0 => self.unknown(&req, reason),
            Some(h) => self.route_call(now, req, h),
            None => self.unknown(&req, reason),
        }
    }

    /// A read failed (the engine is unreachable).
    pub fn on_entry_failed(&mut self, _now: Instant, token: u64) {
        if let Some(Pending::Reading { req, .. }) = self.pending.remove(&token) {
            self.refuse_down(&req);
        }
    }

    /// The IO wrote `id`'s entry for `conn`: generation `gen`, replacing `prev` (None: the
    /// write failed, the engine is unreachable; it is written again when it is back).
    pub fn on_written(&mut self, _now: Instant, id: &ClientId, conn: ConnRef, result: Option<(u64, Option<Holder>)>) {
        let Some(l) = self.local.get_mut(id) else { return };
        l.writing = false;
        let Some((gen, prev)) = result else {
            self.stats.inc(&self.stats.cluster_write_failures);
            l.dirty = true;
            return;
        };
        self.stats.inc(&self.stats.cluster_writes);
        self.cache.insert(id.clone(), Holder { node: self.node, gen });
        if let Some(p) = prev.filter(|p| p.node != self.node) {
            self.stats.inc(&self.stats.cluster_messages_out);
            self.out
                .push_back(BridgeOut::Publish { node: p.node, msg: NodeMsg::Replace { id: id.clone(), gen: p.gen } });
        }
        if l.conn != conn || l.dirty {
            // A newer connection registered meanwhile (or the engine came back): write again.
            l.dirty = false;
            l.writing = true;
            let conn = l.conn;
            self.out.push_back(BridgeOut::Write { id: id.clone(), conn, prev: Some(Holder { node: self.node, gen }) });
            return;
        }
        l.gen = gen;
        let shard = self.home(id);
        self.out.push_back(BridgeOut::Shard { shard, msg: ShardMsg::Generation { id: id.clone(), conn, gen } });
    }

    /// The watch on the directory saw `id`'s entry change (None: removed).
    pub fn on_watch(&mut self, now: Instant, id: ClientId, holder: Option<Holder>) {
        if let Some(h) = holder.filter(|h| !self.gone.contains_key(&h.node)) {
            // CALLs waiting for this callee to move off a gone node go on now.
            if let Some(calls) = self.waiting.remove(&id) {
                self.waiting_calls -= calls.len();
                for (req, _) in calls {
                    self.route_call(now, req, h);
                }
            }
        }
        match holder {
            Some(h) => {
                if h.node != self.node {
                    // Written by another node over this node's generation: that connection is
                    // replaced (in case the node's own message was lost).
                    if let Some(l) = self.local.get(&id).filter(|l| l.gen != 0 && l.gen < h.gen && !l.writing) {
                        let gen = l.gen;
                        self.local.remove(&id);
                        let shard = self.home(&id);
                        self.out.push_back(BridgeOut::Shard { shard, msg: ShardMsg::Replace { id: id.clone(), gen } });
                    }
                }
                if self.cache.get(&id).is_none_or(|c| c.gen <= h.gen) {
                    self.cache.insert(id, h);
                }
            }
            None => {
                self.cache.remove(&id);
            }
        }
    }

    /// A heartbeat from `node`.
    pub fn on_heartbeat(&mut self, now: Instant, node: u64) {
        if node != self.node && node != 0 {
            self.nodes.insert(node, now);
            // A node found gone that is heard again (it lost NATS for a while and is back)
            // is alive: the CALLs waiting on its clients go to it.
            if self.gone.remove(&node).is_some() {
                let mut ids: Vec<ClientId> = self
                    .waiting
                    .keys()
                    .filter(|id| self.cache.get(*id).is_some_and(|h| h.node == node))
                    .cloned()
                    .collect();
                ids.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
                for id in ids {
                    let h = self.cache[&id];
                    let calls = self.waiting.remove(&id).unwrap_or_default();
                    self.waiting_calls -= calls.len();
                    for (req, _) in calls {
                        self.route_call(now, req, h);
                    }
                }
            }
        }
    }

    /// The engine connection came up (`true`) or went down.
    pub fn on_connection(&mut self, now: Instant, up: bool) {
        if up == self.up {
            return;
        }
        self.up = up;
        if up {
            // Nothing was heard while down: every node gets a fresh timeout.
            for t in self.nodes.values_mut() {
                *t = now;
            }
            self.next_heartbeat = Some(now);
            // Entries may have been lost (an engine without storage) or written while this
            // node could not see it: write every one again (newest wins, as ever).
            let mut ids: Vec<ClientId> = self.local.keys().cloned().collect();
            ids.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
            for id in ids {
                let l = self.local.get_mut(&id).expect("listed above");
                if l.writing {
                    l.dirty = true;
                    continue;
                }
                self.write_again(id);
            }
        } else {
            // Calls waiting on the engine are refused now, not left to time out.
            let mut waiting: Vec<Box<CallReq>> = self.waiting.drain().flat_map(|(_, c)| c).map(|(r, _)| r).collect();
            self.waiting_calls = 0;
            waiting.sort_unstable_by_key(|r| (r.caller_conn.node, r.caller_conn.shard, r.caller_conn.id, r.call_ref));
            for req in waiting {
                self.refuse_down(&req);
            }
            let mut tokens: Vec<u64> = self.pending.keys().copied().collect();
            tokens.sort_unstable();
            for t in tokens {
                match self.pending.remove(&t) {
                    Some(Pending::Reading { req, .. }) => self.refuse_down(&req),
                    Some(Pending::Sent { .. }) | None => {}
                }
            }
        }
    }

    /// Write the entry of `id` (held here) again, from the entry believed current.
    fn write_again(&mut self, id: ClientId) {
        let Some(l) = self.local.get_mut(&id) else { return };
        l.writing = true;
        l.dirty = false;
        let (conn, gen) = (l.conn, l.gen);
        let prev = self.cache.get(&id).copied().or((gen != 0).then_some(Holder { node: self.node, gen }));
        self.out.push_back(BridgeOut::Write { id, conn, prev });
    }

    fn node_gone(&mut self, now: Instant, node: u64) {
        self.nodes.remove(&node);
        if node == self.node || node == 0 || self.gone.contains_key(&node) {
            return;
        }
        self.gone.insert(node, now);
        self.stats.inc(&self.stats.cluster_nodes_gone);
        tracing::info!(node = format_args!("{node:016x}"), "cluster node gone");
        for shard in 0..self.shards {
            self.out.push_back(BridgeOut::Shard { shard, msg: ShardMsg::NodeGone { node } });
        }
    }

    /// Periodic work (about every 100 ms): heartbeats, nodes gone, requests given up.
    pub fn tick(&mut self, now: Instant) {
        if !self.up {
            return;
        }
        if self.next_heartbeat.is_none_or(|t| now >= t) {
            self.out.push_back(BridgeOut::Heartbeat);
            self.next_heartbeat = Some(now + HEARTBEAT_EVERY);
        }
        let mut gone: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, &t)| now.saturating_duration_since(t) >= NODE_TIMEOUT)
            .map(|(n, _)| *n)
            .collect();
        gone.sort_unstable();
        for n in gone {
            self.node_gone(now, n);
        }
        let mut late: Vec<u64> = self
            .pending
            .iter()
            .filter(
                |(_, p)| matches!(p, Pending::Sent { at, .. } if now.saturating_duration_since(*at) >= REQUEST_TIMEOUT),
            )
            .map(|(t, _)| *t)
            .collect();
        late.sort_unstable();
        for t in late {
            // Unacknowledged: the caller's own START timer ends the call if it went nowhere.
            self.pending.remove(&t);
        }
        self.gone.retain(|_, at| now.saturating_duration_since(*at) < GONE_MEMORY);
        if !self.waiting.is_empty() {
            let mut late: Vec<Box<CallReq>> = Vec::new();
            for calls in self.waiting.values_mut() {
                let (keep, due): (Vec<_>, Vec<_>) = calls.drain(..).partition(|(_, d)| now < *d);
                *calls = keep;
                late.extend(due.into_iter().map(|(r, _)| r));
            }
            self.waiting.retain(|_, c| !c.is_empty());
            self.waiting_calls -= late.len();
            late.sort_unstable_by_key(|r| (r.caller_conn.node, r.caller_conn.shard, r.caller_conn.id, r.call_ref));
            for req in late {
                self.unknown(&req, UnknownReason::Offline);
            }
        }
        if self.next_rewrite.is_none_or(|t| now >= t) {
            // Entries whose write failed (the engine was up but not ready: a JetStream
            // cluster electing its leaders) are tried again, once a second.
            self.next_rewrite = Some(now + REWRITE_EVERY);
            let mut ids: Vec<ClientId> =
                self.local.iter().filter(|(_, l)| l.dirty && !l.writing).map(|(id, _)| id.clone()).collect();
            ids.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
            for id in ids {
                self.write_again(id);
            }
        }
    }

    /// A node's heartbeat payload.
    pub fn heartbeat_payload(&self) -> [u8; 8] {
        self.node.to_be_bytes()
    }
}

/// The node in a heartbeat payload.
pub fn heartbeat_node(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.try_into().ok()?)).filter(|&n| n != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{Candidate, CandidateKind};
    use std::net::SocketAddr;

    fn id(s: &str) -> ClientId {
        ClientId::new(s).unwrap()
    }

    fn req() -> Box<CallReq> {
        Box::new(CallReq {
            caller: id("alice"),
            caller_conn: ConnRef { node: 0xA, shard: 1, id: 77 },
            caller_addr: "198.51.100.7:4000".parse::<SocketAddr>().unwrap(),
            caller_nat: NatClass::Unknown,
            caller_hosts: vec![Candidate { kind: CandidateKind::Host, addr: "10.0.0.7:4000".parse().unwrap() }],
            call_ref: 5,
            callee: id("bob"),
            caller_keys: None,
            gen: 42,
            attempt: 1,
        })
    }

    #[test]
    fn node_messages_round_trip() {
        let msgs = vec![
            NodeMsg::Call(req()),
            NodeMsg::NotHere(req()),
            NodeMsg::Replace { id: id("bob"), gen: 9 },
            NodeMsg::Shard {
                shard: 3,
                msg: ShardMsg::Deliver {
                    conn: 8,
                    frame: Some(Frame::Hangup { call_id: CallId(77), reason: HangupReason::Normal }),
                    track: Track::Add(CallId(77), 0xB, 5),
                },
            },
            NodeMsg::Shard {
                shard: 0,
                msg: ShardMsg::Deliver { conn: 8, frame: None, track: Track::Remove(CallId(1)) },
            },
            NodeMsg::Shard {
                shard: 1,
                msg: ShardMsg::Hangup {
                    call_id: CallId(3),
                    conn: ConnRef { node: 1, shard: 2, id: 3 },
                    reason: HangupReason::PeerGone,
                },
            },
            NodeMsg::Shard {
                shard: 1,
                msg: ShardMsg::Decline {
                    call_id: CallId(3),
                    conn: ConnRef { node: 1, shard: 2, id: 3 },
                    reason: RejectReason::Declined,
                },
            },
            NodeMsg::Shard {
                shard: 1,
                msg: ShardMsg::PartyGone { call_id: CallId(3), conn: ConnRef { node: 1, shard: 2, id: 3 } },
            },
        ];
        for m in msgs {
            let b = m.encode().unwrap();
            let d = NodeMsg::decode(&b).unwrap();
            assert_eq!(format!("{m:?}"), format!("{d:?}"));
            // Every truncation is an error, never a panic.
            for n in 0..b.len() {
                assert!(NodeMsg::decode(&b[..n]).is_err(), "prefix {n} of {m:?}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(NodeMsg::decode(&longer).is_err());
        }
    }

    #[test]
    fn batches_split_into_their_messages() {
        let a = NodeMsg::Replace { id: id("bob"), gen: 9 }.encode().unwrap();
        let b = NodeMsg::Call(req()).encode().unwrap();
        let batch = encode_batch([a.as_slice(), b.as_slice()]);
        assert_eq!(split_batch(&batch).unwrap(), vec![a.as_slice(), b.as_slice()]);
        // One message alone is not a batch.
        assert_eq!(split_batch(&a).unwrap(), vec![a.as_slice()]);
        for n in 1..batch.len() {
            let parts = split_batch(&batch[..n]);
            assert!(parts.is_err() || parts.unwrap().iter().all(|p| p.len() < b.len()), "prefix {n}");
        }
        assert_eq!(split_batch(&[BATCH, 0]), Err(NodeMsgError::Truncated));
    }

    #[test]
    fn local_shard_messages_do_not_cross_nodes() {
        let m = NodeMsg::Shard { shard: 0, msg: ShardMsg::NodeGone { node: 3 } };
        assert_eq!(m.encode().unwrap_err(), NodeMsgError::NotCrossNode("NodeGone"));
    }

    #[test]
    fn keys_map_every_id_and_back() {
        for s in ["alice", "a-b_c", "x.y", "ünï", "a/b:c", "h.41", "i.x"] {
            let k = kv_key(&id(s));
            assert!(k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "{k}");
            assert_eq!(kv_id(&k).unwrap().as_str(), s);
        }
        assert!(kv_id("h.4").is_none());
        assert!(kv_id("zz").is_none());
        assert_eq!(kv_node(&kv_value(0xABC, "n1")), Some(0xABC));
        assert_eq!(kv_node(b"short"), None);
        assert_eq!(reply_token(7, &reply_subject(7, 99)), Some(99));
        assert_eq!(reply_token(8, &reply_subject(7, 99)), None);
        assert_eq!(heartbeat_node(&5u64.to_be_bytes()), Some(5));
        assert_eq!(heartbeat_node(&[1, 2]), None);
    }
}
