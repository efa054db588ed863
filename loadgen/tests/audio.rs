//! `loadgen audio-latency`: chirps spoken into a real call are found in the played-out
//! audio, and their mouth-to-ear latency is physically sensible; the seeded loss model
//! drops what it says and the jitter buffer conceals it.

use std::process::Command;

use serde_json::Value;

mod common;

use common::run;

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"))
}

#[test]
fn chirps_are_found_and_their_latency_is_frame_plus_codec_plus_buffer() {
    for frame in ["20", "10"] {
        let (code, v, err) =
            run(&["audio-latency", "--frame-ms", frame, "--duration", "4", "--period-ms", "400", "--json"]);
        assert_eq!(code, 0, "{v}\n{err}");
        let frame_ms: f64 = frame.parse().unwrap();
        assert_eq!(v["scenario"], "audio-latency");
        assert_eq!(f(&v, "frame_ms"), frame_ms);
        assert_eq!(v["missing"], 0, "{v}");
        assert!(f(&v, "samples") >= 9.0, "4 s with a chirp every 400 ms: {v}");
        // Nothing can be heard before its frame is captured and through the codec.
        let floor = frame_ms + f(&v["breakdown_ms"], "codec_lookahead");
        let p50 = f(&v, "m2e_p50_ms");
        assert!(p50 >= floor, "p50 {p50} ms below capture + lookahead {floor} ms: {v}");
        // And on loopback it is not far above (a loaded CI machine may add a frame or two).
        assert!(p50 <= floor + 5.0 * frame_ms + 20.0, "{v}");
        assert_eq!(v["dropped_by_model"], 0);
        assert_eq!(v["decode_errors"], 0);
        assert!(f(&v, "played") >= 4.0 * 1000.0 / frame_ms - 5.0, "{v}");
    }
}

#[test]
fn seeded_loss_is_dropped_concealed_and_the_same_for_the_same_seed() {
    let args = ["audio-latency", "--frame-ms", "20", "--duration", "4", "--loss", "10", "--seed", "7", "--json"];
    let (code, a, err) = run(&args);
    assert_eq!(code, 0, "{a}\n{err}");
    let dropped = f(&a, "dropped_by_model");
    let sent = f(&a, "frames_sent");
    assert!(dropped >= 0.04 * sent && dropped <= 0.2 * sent, "10% of {sent}: {dropped}");
    // Every dropped packet left a gap that the buffer concealed (and counted as lost).
    assert!(f(&a, "lost") >= dropped - 2.0 && f(&a, "lost") <= dropped, "{a}");
    assert!(f(&a, "concealed") >= f(&a, "lost"), "{a}");
    let (_, b, _) = run(&args);
    assert_eq!(a["dropped_by_model"], b["dropped_by_model"], "the same seed drops the same packets");
}

#[test]
fn a_bad_frame_size_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen")).args(["audio-latency", "--frame-ms", "15"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("15 ms unsupported"));
}
