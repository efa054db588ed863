//! The bodies of nullpunch's fuzz targets, as plain functions over `&[u8]`.
//!
//! Each target in `fuzz_targets/` is one line that calls a `run` function here, so the same
//! code also runs without libFuzzer: `tests/regressions.rs` replays the seed corpus and
//! every saved crash input (`regressions/`) under `cargo test` on the stable toolchain, and
//! `examples/make_seeds.rs` builds the seed corpus with the same harnesses.
//!
//! Rules every target keeps (docs/fuzzing.md):
//! * pure in-process code: no sockets, threads, clock reads that matter, or files;
//! * deterministic: time is virtual (a fixed base `Instant` plus offsets), every seed fixed;
//! * a panic means a bug, either in the project (a crash to report) or in an invariant
//!   checked here (each `assert!` says which property failed).

pub mod datagram;
pub mod frame_decode;
pub mod manager_conn;
pub mod node_msg;
pub mod null_packet;
pub mod portmap;
pub mod srtp;

use proto::wire::frame::{Frame, MAX_MESSAGE_LEN};

/// Encode `f`, decode the bytes again and require the same frame back, consuming exactly
/// the encoded bytes. Anything the project emits must survive its own decoder. (The one
/// documented loss: an ERROR message longer than 255 bytes is cut on a char boundary.)
pub fn assert_frame_round_trips(f: &Frame) -> Vec<u8> {
    let mut buf = Vec::new();
    f.encode(&mut buf);
    let want = match f {
        Frame::Error { code, message } if message.len() > MAX_MESSAGE_LEN => {
            let mut end = MAX_MESSAGE_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            Frame::Error { code: *code, message: message[..end].to_owned() }
        }
        _ => f.clone(),
    };
    match Frame::decode(&buf) {
        Ok(Some((g, n))) => {
            assert_eq!(n, buf.len(), "decode of an encoded {} consumed {n} of {} bytes", f.name(), buf.len());
            assert_eq!(g, want, "encoded {} decodes to a different frame: {buf:02x?}", f.name());
        }
        other => panic!("encoded {} does not decode: {other:?} from {buf:02x?}", f.name()),
    }
    buf
}
