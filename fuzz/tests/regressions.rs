//! Replays every committed fuzz input through the target bodies under plain `cargo test`
//! (stable toolchain, no libFuzzer): the seed corpus (`corpus/<target>/`) and every crash
//! kept as a regression (`regressions/<target>-<n>.bin`). A crash found by the fuzzer is
//! copied to `regressions/` and stays here once fixed, so it cannot come back unnoticed.
//!
//! Run: `cargo test --manifest-path fuzz/Cargo.toml` (scripts/fuzz does, before fuzzing).

use std::fs;
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = Vec::new();
    if let Ok(rd) = fs::read_dir(root.join("corpus").join(target)) {
        files.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_file()));
    }
    if let Ok(rd) = fs::read_dir(root.join("regressions")) {
        let prefix = format!("{target}-");
        files.extend(rd.flatten().map(|e| e.path()).filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(&prefix) && name.ends_with(".bin")
        }));
    }
    files.sort();
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no committed inputs for {target}");
    for f in &files {
        let data = fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        eprintln!("{target}: {} ({} bytes)", f.display(), data.len());
        run(&data);
    }
}

#[test]
fn frame_decode_inputs() {
    replay("frame_decode", nullpunch_fuzz::frame_decode::run);
}

#[test]
fn datagram_inputs() {
    replay("datagram", nullpunch_fuzz::datagram::run);
}

#[test]
fn manager_conn_inputs() {
    replay("manager_conn", nullpunch_fuzz::manager_conn::run);
}

#[test]
fn node_msg_inputs() {
    replay("node_msg", nullpunch_fuzz::node_msg::run);
}

#[test]
fn portmap_inputs() {
    replay("portmap", nullpunch_fuzz::portmap::run);
}

#[test]
fn srtp_inputs() {
    replay("srtp", nullpunch_fuzz::srtp::run);
}

#[test]
fn null_packet_inputs() {
    replay("null_packet", nullpunch_fuzz::null_packet::run);
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target).join(name);
    fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The harnesses and seeds reach the states they claim (so fuzzing starts deep, not at the
/// door). If a wire change breaks this, re-run `examples/make_seeds.rs`.
#[test]
fn seeds_reach_deep_states() {
    use nullpunch_fuzz::{datagram, manager_conn};

    let h = datagram::Harness::new();
    assert!(h.calls.is_registered());
    assert_eq!(h.calls.active_calls(), 3);
    // Both direct calls become two-way, then end (media timeout) in the final two minutes;
    // the search finds nothing and ends too.
    let h = datagram::run_harness(&seed("datagram", "conversation"));
    assert_eq!((h.media_flowing, h.ended), (2, 3));
    // The hard side's probe locks the search's pair: that call becomes two-way as well.
    let h = datagram::run_harness(&seed("datagram", "search-hit"));
    assert_eq!((h.media_flowing, h.ended), (1, 3));
    let h = datagram::run_harness(&seed("datagram", "stun-binding-success"));
    assert_eq!(h.discovered, 1);

    let replay = |name: &str| {
        let data = seed("manager_conn", name);
        let mut sim = manager_conn::Sim::new(data[0]);
        sim.record = true;
        manager_conn::apply(&mut sim, &data[1..]);
        let written = std::mem::take(&mut sim.written);
        sim.finish();
        move |k: usize, want: &str| written.iter().any(|(c, f)| *c == k && format!("{f:?}").starts_with(want))
    };
    let to = replay("call-hangup");
    assert!(to(0, "Registered") && to(1, "Registered"));
    assert!(to(1, "Incoming") && to(0, "Start") && to(1, "Hangup"));
    assert!(!to(0, "Error") && !to(1, "Error"));
    let to = replay("limits");
    assert!(to(0, "Reject { call_ref: 1, call_id: CallId(0), reason: CallerLimit"));
    assert!(to(1, "Error { code: RateLimited"));
    assert!(to(4, "Error { code: TooManyConnections"));
    let to = replay("secret");
    assert!(to(0, "Error { code: Unauthorized"));
    assert!(to(2, "Registered") && to(3, "Registered") && to(3, "Incoming"));
    assert!(to(4, "Error { code: Unauthorized"));
}

/// The SRTP seeds are genuine packets under the harness's key, so fuzzing starts past the
/// authentication check.
#[test]
fn srtp_seeds_are_genuine() {
    use nullpunch_fuzz::srtp::master_key;
    use proto::srtp::{SrtpReceiver, Suite};
    for (suite, prefix) in [(Suite::AeadAes128Gcm, "gcm"), (Suite::AesCm128HmacSha1_80, "aes-cm")] {
        let mut rtp = seed("srtp", &format!("{prefix}-rtp"));
        assert!(SrtpReceiver::new(&master_key(suite)).unprotect_rtp(&mut rtp).is_ok());
        let mut rtp = seed("srtp", &format!("{prefix}-rtp-csrc-ext"));
        assert!(SrtpReceiver::new(&master_key(suite)).unprotect_rtp(&mut rtp).is_ok());
        let mut rtcp = seed("srtp", &format!("{prefix}-rtcp"));
        assert!(SrtpReceiver::new(&master_key(suite)).unprotect_rtcp(&mut rtcp).is_ok());
    }
}
