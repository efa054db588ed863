//! Writes the seed corpus, `fuzz/corpus/<target>/<name>`: a few small valid inputs per target,
//! built with the project's own emitters (and, for REGISTER, by hand from docs/protocol.md
//! section 2.3), so the fuzzers start from inputs that reach deep states.
//!
//! Run: `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds` (stable toolchain).
//! The files are committed; re-run after a wire format change and commit the difference.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nullpunch_fuzz::datagram::{
    self, Harness, CALLEE_CALL_ID, CALLEE_TOKEN, CALLER_CALL_ID, CALLER_TOKEN, SEARCH_CALL_ID, SEARCH_TOKEN,
};
use nullpunch_fuzz::manager_conn::{self as mc, Script, Sim, MODE_LIMITS, MODE_SECRET};
use proto::srtp::Suite;
use proto::wire::frame::{
    AddrSource, CallId, ClientId, ErrorCode, Frame, HangupReason, RejectReason, UnknownReason, VERSION,
};
use proto::wire::null::NullPacket;
use proto::wire::rtp::{RtpHeader, OPUS_PAYLOAD_TYPE};
use proto::wire::stun;

fn id(s: &str) -> ClientId {
    ClientId::new(s).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn enc(f: &Frame) -> Vec<u8> {
    let mut b = Vec::new();
    f.encode(&mut b);
    b
}

/// REGISTER by hand (docs/protocol.md 2.3): len | version | 0x01 | id_len id | udp_port |
/// max_calls | binding flag [txid] [| auth flag 1 | expiry u64 | mac 32].
fn register(
    id: &str,
    udp_port: u16,
    max_calls: u16,
    binding: Option<[u8; 12]>,
    auth: Option<(u64, [u8; 32])>,
) -> Vec<u8> {
    let mut b = vec![0, 0, VERSION, 0x01, id.len() as u8];
    b.extend_from_slice(id.as_bytes());
    b.extend_from_slice(&udp_port.to_be_bytes());
    b.extend_from_slice(&max_calls.to_be_bytes());
    match binding {
        Some(tx) => {
            b.push(1);
            b.extend_from_slice(&tx);
        }
        None => b.push(0),
    }
    if let Some((exp, mac)) = auth {
        b.push(1);
        b.extend_from_slice(&exp.to_be_bytes());
        b.extend_from_slice(&mac);
    }
    let len = (b.len() - 2) as u16;
    b[..2].copy_from_slice(&len.to_be_bytes());
    b
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    fs::write(dir.join(name), data).unwrap();
    println!("{} ({} bytes)", dir.join(name).display(), data.len());
}

/// A key share as CALL or PUNCHED carries it.
fn share(identity: bool) -> proto::wire::frame::KeyShare {
    proto::wire::frame::KeyShare {
        public: [0x42; 32],
        suites: vec![1, 2],
        identity: identity.then_some(proto::wire::frame::Identity { key: [7; 32], sig: [8; 64] }),
    }
}

fn frame_decode(dir: &Path) {
    let v4 = addr("203.0.113.7:40000");
    let v6 = addr("[2001:db8::1]:5004");
    let every = [
        Frame::Registered { public: v4, source: AddrSource::Stun },
        Frame::Registered { public: v6, source: AddrSource::TcpPeer },
        Frame::Call { call_ref: 9, callee: id("bob"), keys: None },
        Frame::Call { call_ref: 9, callee: id("bob"), keys: Some(Box::new(share(true))) },
        Frame::Punched { call_id: CallId(3), udp_port: 5004, keys: Some(Box::new(share(false))) },
        Frame::Incoming {
            call_id: CallId(1 << 48 | 6),
            token: 43,
            caller: id("alice"),
            caller_addr: v4,
            caller_nat: proto::nat::NatClass::Random,
            caller_candidates: Vec::new(),
            caller_keys: Some(Box::new(share(false))),
        },
        Frame::Incoming {
            call_id: CallId(1 << 48 | 5),
            token: 42,
            caller: id("alice"),
            caller_addr: v4,
            caller_nat: proto::nat::NatClass::Unknown,
            caller_candidates: Vec::new(),
            caller_keys: None,
        },
        Frame::Punched { call_id: CallId(3), udp_port: 5004, keys: None },
        Frame::Start {
            call_ref: 1,
            call_id: CallId(3),
            token: 5,
            callee_addr: v6,
            callee_nat: proto::nat::NatClass::Unknown,
            callee_candidates: Vec::new(),
            callee_keys: None,
        },
        Frame::Reject {
            call_ref: 0,
            call_id: CallId(3),
            reason: RejectReason::Timeout,
            callee_nat: proto::nat::NatClass::Unknown,
        },
        Frame::Busy { call_ref: 7 },
        Frame::Unknown { call_ref: 2, reason: UnknownReason::Offline },
        Frame::Hangup { call_id: CallId(8), reason: HangupReason::PeerGone },
        Frame::Ping { nonce: 1 },
        Frame::Pong { nonce: 2 },
        Frame::Error { code: ErrorCode::Replaced, message: "replaced by a newer registration".into() },
    ];
    let reg = register("alice", 40000, 1, None, None);
    write(dir, "register", &[&[0][..], &reg].concat());
    let reg_bound = register("ü-bob", 5004, 500, Some([7; 12]), Some((1_800_000_000, [0xA5; 32])));
    write(dir, "register-binding-token", &[&[0][..], &reg_bound].concat());
    let mut all = reg.clone();
    for f in &every {
        all.extend(enc(f));
    }
    write(dir, "every-frame", &[&[0][..], &all].concat());
    // Chunk sizes 5, 1, 0 (an empty push, then one byte), cycling.
    write(dir, "every-frame-chunked", &[&[3, 5, 1, 0][..], &all].concat());
    // Candidates: a REGISTER with host and mapped addresses (tag 3), and INCOMING / START
    // carrying host candidates after an unknown class (written as code 0).
    let host = |a| proto::wire::frame::Candidate { kind: proto::wire::frame::CandidateKind::Host, addr: a };
    let mapped = proto::wire::frame::Candidate { kind: proto::wire::frame::CandidateKind::Mapped, addr: v4 };
    let with_candidates = [
        Frame::Register {
            id: id("carol"),
            udp_port: 40001,
            max_calls: 1,
            binding: Some([9; 12]),
            auth: None,
            nat: proto::nat::NatClass::Mapped,
            candidates: vec![mapped, host(addr("10.1.0.3:40001")), host(v6)],
        },
        Frame::Incoming {
            call_id: CallId(1 << 48 | 6),
            token: 43,
            caller: id("alice"),
            caller_addr: v4,
            caller_nat: proto::nat::NatClass::Unknown,
            caller_candidates: vec![host(addr("10.1.0.2:40000"))],
            caller_keys: None,
        },
        Frame::Start {
            call_ref: 2,
            call_id: CallId(1 << 48 | 6),
            token: 43,
            callee_addr: v4,
            callee_nat: proto::nat::NatClass::Random,
            callee_candidates: vec![host(addr("10.1.0.3:40001")), host(v6)],
            callee_keys: None,
        },
    ];
    write(dir, "candidates", &[&[0][..], &with_candidates.iter().flat_map(enc).collect::<Vec<u8>>()].concat());
    write(dir, "call-then-oversized", &[&[0][..], &enc(&every[2]), &[0x04, 0x01, 1]].concat());
    write(dir, "ping-then-truncated-pong", &[&[1, 3][..], &enc(&every[10]), &enc(&every[11])[..7]].concat());
}

fn datagram(dir: &Path) {
    let h = Harness::new();
    let mut b = [0u8; 64];
    // The callee call's peer (the caller) punches / sends media with the caller SSRC.
    let n = NullPacket {
        call_id: CALLEE_CALL_ID,
        token: CALLEE_TOKEN,
        keepalive: false,
        from_caller: true,
        probe: false,
        counter: 1,
    }
    .emit(&proto::wire::null::null_key(&[0; 32]), &mut b);
    let null_from_caller = b[..n].to_vec();
    write(dir, "null-punch", &null_from_caller);
    let n = NullPacket {
        call_id: CALLER_CALL_ID,
        token: CALLER_TOKEN,
        keepalive: true,
        from_caller: false,
        probe: false,
        counter: 2,
    }
    .emit(&proto::wire::null::null_key(&[0; 32]), &mut b);
    let null_from_callee = b[..n].to_vec();
    let rtp = |ssrc: u32, seq: u16, ts: u32, payload: &[u8]| {
        let mut p = vec![0u8; 12 + payload.len()];
        RtpHeader { marker: seq == 0, payload_type: OPUS_PAYLOAD_TYPE, seq, timestamp: ts, ssrc }.emit(&mut p);
        p[12..].copy_from_slice(payload);
        p
    };
    let caller_ssrc = CALLEE_TOKEN as u32;
    let callee_ssrc = (CALLER_TOKEN >> 32) as u32;
    write(dir, "rtp", &rtp(caller_ssrc, 0, 960, b"opus"));
    let mut ext = vec![0x80 | 0x20 | 0x10 | 2, 96, 0, 1, 0, 0, 0, 2];
    ext.extend_from_slice(&callee_ssrc.to_be_bytes());
    ext.extend_from_slice(&[1, 1, 1, 1, 2, 2, 2, 2]); // two CSRCs
    ext.extend_from_slice(&[0xBE, 0xDE, 0, 1, 9, 9, 9, 9]); // one-word extension
    ext.extend_from_slice(b"hello");
    ext.extend_from_slice(&[0, 0, 3]); // 3 bytes of padding
    write(dir, "rtp-csrc-extension-padding", &ext);
    let n = stun::emit_binding_request(&[9; 12], &mut b);
    write(dir, "stun-binding-request", &b[..n]);
    // The discovering client's own transaction id, from its first request.
    let txid: [u8; 12] = h
        .sent
        .iter()
        .find(|(to, _)| *to == datagram::stun_server())
        .map(|(_, d)| d[8..20].try_into().unwrap())
        .expect("the discovering client sent a binding request");
    let n = stun::emit_binding_success(&txid, addr("192.0.2.10:40010"), &mut b);
    write(dir, "stun-binding-success", &b[..n]);
    let n = stun::emit_binding_success(&txid, addr("[2001:db8::10]:40010"), &mut b);
    write(dir, "stun-binding-success-v6", &b[..n]);
    // With the next STUN address to ask (OTHER-ADDRESS, NAT classification).
    let n = stun::emit_binding_success_with(&txid, addr("192.0.2.10:40010"), Some(addr("198.51.100.1:3479")), &mut b);
    write(dir, "stun-binding-success-other", &b[..n]);
    // The birthday search's hit: the hard side's probe from its IP, then its media.
    // Its token field is the caller's probe tag, not the token.
    let tag = proto::wire::null::probe_tag(SEARCH_TOKEN, true);
    let n = NullPacket {
        call_id: SEARCH_CALL_ID,
        token: tag,
        keepalive: false,
        from_caller: true,
        probe: true,
        counter: 3,
    }
    .emit(&proto::wire::null::null_key(&[0; 32]), &mut b);
    let probe = b[..n].to_vec();
    let search_rtp = rtp(SEARCH_TOKEN as u32, 7, 960, b"found");
    write(dir, "search-hit", &datagram::join(&[&probe, &search_rtp]));
    // A conversation: punches, media both ways, a sequence wrap, a duplicate, RTCP, a bare null.
    let mut seq: Vec<Vec<u8>> = vec![null_from_caller.clone(), null_from_callee.clone()];
    for i in 0..4u16 {
        seq.push(rtp(caller_ssrc, 65534u16.wrapping_add(i), 1000 + 960 * i as u32, b"abc"));
        seq.push(rtp(callee_ssrc, 100 + i, 5000 + 960 * i as u32, b"xyz"));
    }
    seq.push(rtp(caller_ssrc, 1, 1000 + 960 * 3, b"dup"));
    seq.push(vec![0x80, 200, 0, 6, 0, 0, 0, 1]);
    seq.push(Vec::new());
    let parts: Vec<&[u8]> = seq.iter().map(|v| v.as_slice()).collect();
    write(dir, "conversation", &datagram::join(&parts));
}

fn manager_conn(dir: &Path) {
    let (a, b) = (0usize, 1usize);
    let alice = register("alice", 40000, 1, None, None);
    let bob = register("bob", 40001, 1, None, None);
    let call = |callee: &str| enc(&Frame::Call { call_ref: 1, callee: id(callee), keys: Some(Box::new(share(false))) });

    let mut s = Script::new(0);
    s.raw(a, &alice).raw(b, &bob).deliver().deliver().deliver();
    s.frame(a, &Frame::Ping { nonce: 7 });
    write(dir, "register-two", &s.0);

    // A full call: the call id comes from running the script so far.
    let mut s = Script::new(0);
    s.raw(a, &alice).raw(b, &bob).deliver().deliver().deliver();
    s.raw(a, &call("bob")).deliver().deliver().deliver();
    let mut sim = Sim::new(s.0[0]);
    sim.record = true;
    mc::apply(&mut sim, &s.0[1..]);
    let call_id = sim
        .written
        .iter()
        .find_map(|(k, f)| match f {
            Frame::Incoming { call_id, .. } if *k == b => Some(*call_id),
            _ => None,
        })
        .expect("bob got INCOMING");
    let base = s.0.clone();
    s.frame(b, &Frame::Punched { call_id, udp_port: 40001, keys: Some(Box::new(share(false))) })
        .deliver()
        .deliver()
        .deliver();
    s.frame(a, &Frame::Hangup { call_id, reason: HangupReason::Normal }).deliver().deliver().deliver();
    write(dir, "call-hangup", &s.0);

    let mut s = Script(base.clone());
    s.frame(
        b,
        &Frame::Reject {
            call_ref: 0,
            call_id,
            reason: RejectReason::Declined,
            callee_nat: proto::nat::NatClass::Unknown,
        },
    )
    .deliver()
    .deliver()
    .deliver();
    write(dir, "call-declined", &s.0);

    let mut s = Script(base.clone());
    s.tick(100).deliver().deliver().deliver();
    write(dir, "call-ring-timeout", &s.0);

    let mut s = Script(base);
    s.frame(b, &Frame::Punched { call_id, udp_port: 40001, keys: Some(Box::new(share(false))) })
        .deliver()
        .deliver()
        .deliver();
    s.close(b).deliver().deliver().deliver();
    write(dir, "call-callee-gone", &s.0);

    // A STUN binding named by REGISTER; a second connection replaces the registration.
    let mut s = Script::new(0);
    s.stun(a, [3; 12]).raw(a, &register("carol", 40002, 2, Some([3; 12]), None)).deliver().deliver().deliver();
    s.open(1).raw(2, &register("carol", 40003, 2, None, None)).deliver().deliver().deliver();
    s.raw(b, &bob).deliver().deliver().deliver();
    s.raw(b, &call("carol")).deliver().deliver().deliver();
    write(dir, "stun-replace-call", &s.0);

    // Errors: a frame before REGISTER, a manager-to-client frame, an oversized prefix.
    let mut s = Script::new(0);
    s.raw(a, &call("bob")).frame(a, &Frame::Busy { call_ref: 1 }).raw(b, &[0xFF, 0xFF, 1]).deliver().deliver();
    s.tick(250).tick(250);
    write(dir, "errors-and-timeouts", &s.0);

    // Limits: a third and fourth connection on shard 0 (the fourth is refused), a flood of
    // PINGs (over the burst of 40), and a caller at its limit of 2 calls.
    let mut s = Script::new(MODE_LIMITS);
    s.raw(a, &alice).raw(b, &bob).deliver().deliver().deliver();
    s.open(0).open(0).open(0).deliver();
    s.raw(2, &register("carol", 40002, 1, None, None)).deliver().deliver().deliver();
    for callee in ["bob", "carol", "bob"] {
        s.raw(a, &call(callee)).deliver().deliver().deliver();
    }
    let ping = enc(&Frame::Ping { nonce: 1 });
    s.raw(b, &ping.repeat(45)).deliver().deliver();
    write(dir, "limits", &s.0);

    // A secret: an unsigned REGISTER is refused, a signed one (valid token) is accepted, a
    // signed one with an expired token (expiry 1) is refused.
    let mut s = Script::new(MODE_SECRET);
    s.raw(a, &alice).deliver().deliver();
    s.open(0).open(1);
    s.signed(2, &alice).signed(3, &bob).deliver().deliver().deliver();
    s.raw(2, &call("bob")).deliver().deliver().deliver();
    s.open(0).signed(4, &register("dave", 1, 1, None, Some((1, [0; 32])))).deliver().deliver();
    write(dir, "secret", &s.0);
}

/// Router answers: a PCP success; NAT-PMP "unsupported version" then its address and
/// mapping answers; a PCP refusal; a PCP success then its renewal.
fn portmap(dir: &Path) {
    use nullpunch_fuzz::portmap::pcp_success;
    let sep = datagram::SEP;
    let ext = addr("198.51.100.7:40001");
    write(dir, "pcp-success", &pcp_success(ext, 600));
    let natpmp: Vec<Vec<u8>> = vec![
        vec![0, 0x82, 0, 1],
        vec![0, 128, 0, 0, 0, 0, 0, 9, 198, 51, 100, 7],
        vec![0, 129, 0, 0, 0, 0, 0, 9, 0x9C, 0x41, 0x9C, 0x41, 0, 0, 0x0E, 0x10],
    ];
    write(dir, "natpmp-fallback", &natpmp.join(sep));
    let mut refused = pcp_success(ext, 0);
    refused[3] = 2;
    write(dir, "pcp-refused", &refused);
    write(dir, "pcp-renewed", &[pcp_success(ext, 600), pcp_success(ext, 1200)].join(sep));
}

/// Genuine packets under the harness's key: SRTP (plain header; CSRCs and an extension) and
/// SRTCP for each suite, and a stream of sequence numbers across a wrap with a duplicate and
/// a late packet.
fn srtp(dir: &Path) {
    use nullpunch_fuzz::srtp::{master_key, stream_packet, SUITES};
    use proto::srtp::SrtpSender;
    for suite in SUITES {
        let name = if suite == Suite::AeadAes128Gcm { "gcm" } else { "aes-cm" };
        let mut tx = SrtpSender::new(&master_key(suite));
        let mut p = stream_packet(7);
        let len = p.len();
        p.resize(len + 16, 0);
        let n = tx.protect_rtp(&mut p, len).unwrap();
        write(dir, &format!("{name}-rtp"), &p[..n]);
        // V=2 X=1 CC=1, a CSRC, a one-byte-header extension of one word, 20 payload bytes.
        let mut p = vec![0x91, 0x80 | OPUS_PAYLOAD_TYPE, 0, 8, 0, 0, 0x1E, 0, 0x5E, 0xED, 0, 1, 0xC5, 0xC5, 0xC5, 0xC5];
        p.extend_from_slice(&[0xBE, 0xDE, 0, 1, 0x10, 0x7F, 0, 0]);
        p.extend(0..20u8);
        let len = p.len();
        p.resize(len + 16, 0);
        let n = tx.protect_rtp(&mut p, len).unwrap();
        write(dir, &format!("{name}-rtp-csrc-ext"), &p[..n]);
        // An RTCP receiver report with one report block.
        let mut p = vec![0x81, 201, 0, 7, 0x5E, 0xED, 0, 1, 0x5E, 0xED, 0, 2];
        p.extend_from_slice(&[0x02, 0, 0, 3, 0, 1, 0, 9, 0, 0, 0, 40, 0, 0, 0, 0, 0, 0, 0, 0]);
        let len = p.len();
        p.resize(len + 20, 0);
        let n = tx.protect_rtcp(&mut p, len).unwrap();
        write(dir, &format!("{name}-rtcp"), &p[..n]);
    }
    let seqs: [u16; 9] = [65530, 65531, 65533, 65532, 65535, 0, 1, 1, 65534];
    write(dir, "stream-wrap", &seqs.iter().flat_map(|s| s.to_be_bytes()).collect::<Vec<u8>>());
}

/// Messages a node receives: a CALL for "bob" (the harness's registered client), a
/// NOT_HERE, a REPLACE, and a call's deliveries and party changes.
fn node_msg(dir: &Path) {
    use proto::cluster::NodeMsg;
    use proto::shard::{CallReq, ConnRef, ShardMsg, Track};
    let caller = ConnRef { node: 0xB, shard: 1, id: 7 };
    let req = |gen, attempt| {
        Box::new(CallReq {
            caller: id("alice"),
            caller_conn: caller,
            caller_addr: addr("198.51.100.7:4000"),
            caller_nat: proto::nat::NatClass::Unknown,
            caller_hosts: Vec::new(),
            call_ref: 3,
            callee: id("bob"),
            caller_keys: None,
            gen,
            attempt,
        })
    };
    let msgs = [
        ("call", NodeMsg::Call(req(0, 0))),
        ("call-gen", NodeMsg::Call(req(5, 1))),
        ("not-here", NodeMsg::NotHere(req(5, 0))),
        ("replace", NodeMsg::Replace { id: id("bob"), gen: 0 }),
        (
            "deliver-start",
            NodeMsg::Shard {
                shard: 0,
                msg: ShardMsg::Deliver {
                    conn: 1,
                    frame: Some(Frame::Hangup { call_id: CallId(9), reason: HangupReason::Normal }),
                    track: Track::Add(CallId(9), 0xB, 3),
                },
            },
        ),
        (
            "hangup",
            NodeMsg::Shard {
                shard: 1,
                msg: ShardMsg::Hangup { call_id: CallId(9), conn: caller, reason: HangupReason::Normal },
            },
        ),
        (
            "decline",
            NodeMsg::Shard {
                shard: 0,
                msg: ShardMsg::Decline { call_id: CallId(9), conn: caller, reason: RejectReason::Declined },
            },
        ),
        ("party-gone", NodeMsg::Shard { shard: 0, msg: ShardMsg::PartyGone { call_id: CallId(9), conn: caller } }),
    ];
    for (name, m) in msgs {
        write(dir, name, &m.encode().unwrap());
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, make) in [
        ("frame_decode", frame_decode as fn(&Path)),
        ("datagram", datagram),
        ("manager_conn", manager_conn),
        ("portmap", portmap),
        ("srtp", srtp),
        ("node_msg", node_msg),
    ] {
        let dir = root.join(target);
        fs::create_dir_all(&dir).unwrap();
        make(&dir);
    }
}
