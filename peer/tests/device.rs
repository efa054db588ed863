//! `--audio device` against a private PulseAudio server with two null sinks: `paplay` feeds
//! alice's microphone (the monitor of sink `mic`), bob plays to sink `spk`, and `parecord`
//! records the speaker from `spk.monitor`. The recording must carry the same speech.
//!
//! The server runs as a child of the test (killed when it ends), with its socket, runtime
//! files and cookie in a scratch directory; the clients find it through PULSE_SERVER.

mod common;

use std::process::{Command, Stdio};

use common::*;

const SENTENCE: &str = "The quick brown fox jumps over the lazy dog. Nullpunch carries voice straight between peers.";

struct Pulse {
    _proc: Proc,
    server: String,
}

fn pulse(dir: &Scratch) -> Pulse {
    let sock = dir.path("native");
    let home = dir.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let child = Command::new("pulseaudio")
        .args([
            "-n",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--use-pid-file=no",
            "--system=false",
            "-L",
            &format!("module-native-protocol-unix socket={sock} auth-anonymous=1"),
            "-L",
            "module-null-sink sink_name=mic rate=48000 channels=1",
            "-L",
            "module-null-sink sink_name=spk rate=48000 channels=1",
        ])
        .env("HOME", &home)
        .env("XDG_RUNTIME_DIR", &home)
        .env("PULSE_RUNTIME_PATH", &home)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pulseaudio could not be started; the README's test command installs it");
    let proc = Proc { child, name: "pulseaudio" };
    wait_file(&sock, Duration::from_secs(20));
    let server = format!("unix:{sock}");
    // Ready when it lists the sinks.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("pactl").args(["list", "short", "sinks"]).env("PULSE_SERVER", &server).output().unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("spk") {
            break;
        }
        assert!(Instant::now() < deadline, "PulseAudio did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    Pulse { _proc: proc, server }
}

fn pulse_peer(p: &Pulse, manager: &str, id: &str, args: &[&str]) -> Proc {
    let child = Command::new(bin("peer"))
        .args(["--manager", manager, "--id", id, "--bind", "127.0.0.1:0"])
        .args(args)
        .env("PULSE_SERVER", &p.server)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peer");
    Proc { child, name: "peer" }
}

/// One run of the device path: the speaker recording's similarity to the sent speech, and
/// what the peers logged.
fn device_call(name: &str) -> (f64, i64, String) {
    let dir = Scratch::new(name);
    let sent = speech(&dir, "sent", SENTENCE);
    let recorded = dir.path("speaker.wav");
    let p = pulse(&dir);
    let m = start_manager();
    let bob = pulse_peer(&p, &m.addr, "bob", &["--audio-out", "device:spk", "listen", "--calls", "1", "--json"]);
    settle();
    let rec = Command::new("parecord")
        .args([
            "--latency-msec=20",
            "-d",
            "spk.monitor",
            "--rate",
            "48000",
            "--channels",
            "1",
            "--format",
            "s16le",
            "--file-format=wav",
            &recorded,
        ])
        .env("PULSE_SERVER", &p.server)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("parecord");
    let rec = Proc { child: rec, name: "parecord" };
    let alice = pulse_peer(
        &p,
        &m.addr,
        "alice",
        &["--audio-in", "device:mic.monitor", "call", "bob", "--duration", "10", "--json"],
    );
    // The microphone opens within a second or two; then speak (with a small latency, so the
    // null sink renders in 20 ms blocks, not in one two-second block).
    std::thread::sleep(Duration::from_millis(2500));
    let st = Command::new("paplay")
        .args(["--latency-msec=20", "-d", "mic", &sent])
        .env("PULSE_SERVER", &p.server)
        .status()
        .expect("paplay");
    assert!(st.success(), "paplay failed");
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    let (_, _, rec_err) = rec.interrupt(Duration::from_secs(10));
    let (a, b) = (json_line(&out_a), json_line(&out_b));
    assert_eq!(a["media"]["sent_kind"], "opus", "{a}");
    assert!(
        a["media"]["audio_frames_sent"].as_u64().unwrap() >= 400,
        "alice sent 10 s of microphone frames: {a}\n{err_a}"
    );
    assert!(b["media"]["played"].as_u64().unwrap() >= 400, "{b}");
    let x = voice::wav::read(sent.as_ref()).unwrap();
    let y = voice::wav::read(recorded.as_ref()).unwrap_or_else(|e| panic!("{e}: {rec_err}"));
    let (same, lag) = voice::signal::envelope_similarity(&x.samples, &y.samples, 8_000);
    m.stop();
    (same, lag, format!("alice: {err_a}\nbob: {err_b}"))
}

#[test]
fn speech_from_the_microphone_comes_out_of_the_far_speaker() {
    let (same, lag, log) = device_call("device");
    eprintln!("speaker recording similarity {same:.3} at lag {lag} ms");
    if same >= 0.8 {
        return;
    }
    // One more try. On the CI machine PulseAudio's record path twice lost about a second of
    // the microphone in a run (the capture counters in the log show it), which this test
    // locally never reproduced; a broken device path fails both tries.
    eprintln!("first try: similarity {same:.3} (lag {lag} ms)\n{log}\n-- trying once more");
    let (same, lag, log) = device_call("device-retry");
    eprintln!("speaker recording similarity {same:.3} at lag {lag} ms");
    assert!(same >= 0.8, "speaker recording similarity {same:.3} (lag {lag} ms)\n{log}");
}
