//! Voice and video over the punched path, judged by tools no one here wrote: espeak-ng
//! speech through two real `peer`s into a WAV, ffmpeg sending Opus into `--rtp-in`, ffmpeg
//! decoding our stream from the SDP `peer --sdp` wrote, tshark's RTP stream analysis of a
//! call, and ffmpeg VP8 video through `--rtp-in` / `--rtp-out`.
//!
//! The tools are installed by the README's test command (scripts/test); a missing tool is a
//! failure, not a skip. Every process is killed when its guard drops; all traffic is on
//! 127.0.0.1.

mod common;

use common::*;

/// Envelope similarity at or above which a received recording counts as the sent speech.
/// Measured: 0.97-0.98 for the same sentence through Opus at 48 kbit/s and the jitter
/// buffer; 0.25-0.35 for a different sentence (docs/running.md, "Voice").
const SAME_SPEECH: f64 = 0.8;

const SENTENCE: &str = "The quick brown fox jumps over the lazy dog. Nullpunch carries voice straight between peers.";
const OTHER: &str = "Seven silver seagulls sat on a sunny rock, singing softly to the sea.";

fn similarity(sent: &str, received: &str) -> (f64, i64) {
    let a = voice::wav::read(sent.as_ref()).unwrap();
    let b = voice::wav::read(received.as_ref()).unwrap();
    assert_eq!(b.rate, 48_000, "{received}");
    voice::signal::envelope_similarity(&a.samples, &b.samples, 2_000)
}

fn media(r: &Value) -> &Value {
    &r["media"]
}

#[test]
fn speech_from_a_wav_file_arrives_as_the_same_speech() {
    let dir = Scratch::new("speech");
    let sent = speech(&dir, "sent", SENTENCE);
    let other = speech(&dir, "other", OTHER);
    let out = dir.path("received.wav");
    let m = start_manager();
    let bob = peer(&m.addr, "bob", &["--audio-out", &format!("wav:{out}"), "listen", "--calls", "1", "--json"]);
    settle();
    let alice =
        peer(&m.addr, "alice", &["--audio-in", &format!("wav:{sent}"), "call", "bob", "--duration", "7", "--json"]);
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    let (a, b) = (json_line(&out_a), json_line(&out_b));
    assert_eq!(media(&a)["sent_kind"], "opus", "{a}");
    let frames = media(&a)["audio_frames_sent"].as_u64().unwrap();
    assert!((330..=352).contains(&frames), "7 s of 20 ms frames: {a}");
    let mb = media(&b);
    assert_eq!(mb["frame_ms_received"], 20, "{b}");
    assert_eq!(mb["decode_errors"], 0, "{b}");
    let played = mb["played"].as_u64().unwrap();
    assert!(played + 5 >= frames, "bob played {played} of {frames} frames: {b}");

    let (same, lag) = similarity(&sent, &out);
    assert!(same >= SAME_SPEECH, "received speech similarity {same:.3} (lag {lag} ms)");
    // The received recording starts with the call: the speech is at most a few frames late.
    assert!((-100..=200).contains(&lag), "lag {lag} ms");
    // The threshold tells speech apart: a different sentence scores below it.
    let (diff, _) = similarity(&other, &out);
    assert!(diff < SAME_SPEECH, "a different sentence scored {diff:.3}");
    m.stop();
}

#[test]
fn opus_sent_by_ffmpeg_into_rtp_in_plays_out_as_the_same_speech() {
    let dir = Scratch::new("ffmpeg-in");
    let sent = speech(&dir, "sent", SENTENCE);
    let out = dir.path("received.wav");
    let port = free_udp_port(true);
    let m = start_manager();
    let bob = peer(&m.addr, "bob", &["--audio-out", &format!("wav:{out}"), "listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer(&m.addr, "alice", &["--rtp-in", &port.to_string(), "call", "bob", "--duration", "9", "--json"]);
    // The call is set up in milliseconds; ffmpeg starts a second later, in real time (-re).
    std::thread::sleep(Duration::from_millis(1000));
    let rtp = format!("rtp://127.0.0.1:{port}");
    let ff = spawn(
        "ffmpeg",
        &[
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-i",
            &sent,
            "-c:a",
            "libopus",
            "-b:a",
            "48k",
            "-application",
            "voip",
            "-frame_duration",
            "20",
            "-payload_type",
            "111",
            "-f",
            "rtp",
            &rtp,
        ],
        "ffmpeg",
    );
    let (code, _, err) = ff.finish(Duration::from_secs(30));
    assert_eq!(code, 0, "ffmpeg: {err}");
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    let (a, b) = (json_line(&out_a), json_line(&out_b));
    assert_eq!(media(&a)["sent_kind"], "forwarded", "{a}");
    let fwd = a["forwarding"]["rtp_in_forwarded"].as_u64().unwrap();
    assert!(fwd >= 250, "5.5 s of 20 ms frames forwarded: {a}");
    assert_eq!(a["forwarding"]["rtp_in_malformed"], 0, "{a}");
    assert_eq!(media(&b)["decode_errors"], 0, "{b}");
    let (same, lag) = similarity(&sent, &out);
    assert!(same >= SAME_SPEECH, "ffmpeg's speech through the call: similarity {same:.3} (lag {lag} ms)");
    m.stop();
}

#[test]
fn ffmpeg_decodes_our_stream_from_the_sdp_we_wrote() {
    let dir = Scratch::new("ffmpeg-sdp");
    let sent = speech(&dir, "sent", SENTENCE);
    let sdp = dir.path("bob.sdp");
    let decoded = dir.path("ffmpeg.wav");
    let port = free_udp_port(true);
    let rtp_out = format!("127.0.0.1:{port}");
    let m = start_manager();
    let bob = peer(&m.addr, "bob", &["--rtp-out", &rtp_out, "--sdp", &sdp, "listen", "--calls", "1", "--json"]);
    wait_file(&sdp, Duration::from_secs(10));
    let text = std::fs::read_to_string(&sdp).unwrap();
    assert!(text.contains(&format!("m=audio {port} RTP/AVP 111\r\n")), "{text}");
    assert!(text.contains("a=rtpmap:111 opus/48000/2\r\n"), "{text}");
    let ff = spawn(
        "ffmpeg",
        &[
            "-hide_banner",
            "-loglevel",
            "error",
            "-protocol_whitelist",
            "file,udp,rtp",
            "-i",
            &sdp,
            "-ar",
            "48000",
            "-ac",
            "1",
            "-y",
            &decoded,
        ],
        "ffmpeg",
    );
    settle();
    let alice =
        peer(&m.addr, "alice", &["--audio-in", &format!("wav:{sent}"), "call", "bob", "--duration", "7", "--json"]);
    let (ca, _, err_a) = alice.finish(Duration::from_secs(30));
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    let b = json_line(&out_b);
    let handed = b["forwarding"]["rtp_out"].as_u64().unwrap();
    assert!(handed >= 330, "bob handed on 7 s of packets: {b}");
    assert_eq!(b["forwarding"]["rtp_out_errors"], 0, "{b}");
    // ffmpeg reads until interrupted, then finishes its file.
    let (_, _, err) = ff.interrupt(Duration::from_secs(20));
    assert!(!err.to_ascii_lowercase().contains("error"), "ffmpeg: {err}");
    let (same, lag) = similarity(&sent, &decoded);
    assert!(same >= SAME_SPEECH, "ffmpeg decoded our stream: similarity {same:.3} (lag {lag} ms)");
    m.stop();
}

/// tshark's `rtp,streams` table: one row per stream with (packets, lost, problems flag).
fn rtp_streams(table: &str) -> Vec<(u64, i64, bool)> {
    table
        .lines()
        .filter(|l| l.contains("RTPType-") || l.contains("opus"))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let pt = cols.iter().position(|c| c.starts_with("RTPType-") || c.contains("opus")).expect("payload column");
            let pkts: u64 = cols[pt + 1].parse().expect("packets");
            let lost: i64 = cols[pt + 2].parse().expect("lost");
            // The last column is "X" when tshark saw sequence errors or wrong timestamps.
            let problem = cols.last() == Some(&"X");
            (pkts, lost, problem)
        })
        .collect()
}

#[test]
fn tshark_sees_both_rtp_streams_of_a_call_with_nothing_lost() {
    let dir = Scratch::new("tshark");
    let cap = dir.path("call.pcapng");
    let (pa, pb) = (free_udp_port(false), free_udp_port(false));
    let filter = format!("udp port {pa} or udp port {pb}");
    let ts = spawn("tshark", &["-i", "lo", "-f", &filter, "-w", &cap], "tshark");
    // tshark says "Capturing on" once the capture runs; give it a bounded moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::path::Path::new(&cap).exists() {
        assert!(Instant::now() < deadline, "tshark did not start capturing");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let m = start_manager();
    let bind_b = format!("127.0.0.1:{pb}");
    let bind_a = format!("127.0.0.1:{pa}");
    let bob = spawn(
        bin("peer").to_str().unwrap(),
        &[
            "--manager",
            &m.addr,
            "--id",
            "bob",
            "--bind",
            &bind_b,
            "--audio-in",
            "tone",
            "listen",
            "--calls",
            "1",
            "--json",
        ],
        "peer",
    );
    settle();
    let alice = spawn(
        bin("peer").to_str().unwrap(),
        &[
            "--manager",
            &m.addr,
            "--id",
            "alice",
            "--bind",
            &bind_a,
            "--audio-in",
            "chirp",
            "call",
            "bob",
            "--duration",
            "4",
            "--json",
        ],
        "peer",
    );
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
    let (cb, _, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    std::thread::sleep(Duration::from_millis(500));
    let (_, _, err) = ts.interrupt(Duration::from_secs(20));
    let table = run("tshark", &["-r", &cap, "-o", "rtp.heuristic_rtp:TRUE", "-q", "-z", "rtp,streams"]);
    let streams = rtp_streams(&table);
    assert_eq!(streams.len(), 2, "one RTP stream each way:\n{table}\n{err}");
    let a = json_line(&out_a);
    for (pkts, lost, problem) in streams {
        assert!(pkts >= 190, "4 s at 50 packets/s: {pkts}\n{table}");
        assert_eq!(lost, 0, "{table}");
        assert!(!problem, "tshark flags sequence or timestamp errors:\n{table}");
    }
    assert_eq!(a["lost"], 0, "{a}");
    m.stop();
}

#[test]
fn vp8_video_from_ffmpeg_crosses_the_punched_path_and_ffmpeg_decodes_it() {
    let dir = Scratch::new("vp8");
    let sdp = dir.path("video.sdp");
    let out_port = free_udp_port(true);
    let in_port = free_udp_port(true);
    let rtp_out = format!("127.0.0.1:{out_port}");
    let m = start_manager();
    let bob = peer(
        &m.addr,
        "bob",
        &[
            "--rtp-out",
            &rtp_out,
            "--sdp",
            &sdp,
            "--rtp-map",
            "VP8/90000",
            "--rtp-pt",
            "96",
            "listen",
            "--calls",
            "1",
            "--json",
        ],
    );
    wait_file(&sdp, Duration::from_secs(10));
    let text = std::fs::read_to_string(&sdp).unwrap();
    assert!(text.contains(&format!("m=video {out_port} RTP/AVP 96\r\n")), "{text}");
    // The player: decode every frame and print one checksum line per frame on stdout.
    let player = spawn(
        "ffmpeg",
        &[
            "-hide_banner",
            "-loglevel",
            "error",
            "-protocol_whitelist",
            "file,udp,rtp",
            "-i",
            &sdp,
            "-f",
            "framecrc",
            "-",
        ],
        "ffmpeg player",
    );
    settle();
    let alice = peer(&m.addr, "alice", &["--rtp-in", &in_port.to_string(), "call", "bob", "--duration", "8", "--json"]);
    std::thread::sleep(Duration::from_millis(1000));
    // 4 s of a 25 fps test pattern, a key frame every second.
    const FRAMES: usize = 100;
    let rtp = format!("rtp://127.0.0.1:{in_port}");
    let sender = spawn(
        "ffmpeg",
        &[
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=320x240:rate=25",
            "-frames:v",
            "100",
            "-c:v",
            "libvpx",
            "-deadline",
            "realtime",
            "-b:v",
            "800k",
            "-g",
            "25",
            "-payload_type",
            "96",
            "-f",
            "rtp",
            &rtp,
        ],
        "ffmpeg sender",
    );
    let (code, _, err) = sender.finish(Duration::from_secs(30));
    assert_eq!(code, 0, "ffmpeg sender: {err}");
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    let (_, frames, err) = player.interrupt(Duration::from_secs(20));
    let decoded = frames.lines().filter(|l| l.starts_with("0,")).count();
    let (a, b) = (json_line(&out_a), json_line(&out_b));
    assert!(
        decoded * 10 >= FRAMES * 9,
        "ffmpeg decoded {decoded} of {FRAMES} frames\nffmpeg: {err}\nalice: {a}\nbob: {b}"
    );
    assert_eq!(a["forwarding"]["rtp_in_forwarded"], b["forwarding"]["rtp_out"], "every forwarded packet was handed on");
    assert_eq!(b["lost"], 0, "{b}");
    m.stop();
}

#[test]
fn bad_input_on_rtp_in_is_counted_and_good_packets_still_cross() {
    let port = free_udp_port(false);
    let m = start_manager();
    let bob = peer(&m.addr, "bob", &["listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer(&m.addr, "alice", &["--rtp-in", &port.to_string(), "call", "bob", "--duration", "3", "--json"]);
    std::thread::sleep(Duration::from_millis(1000));
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = ("127.0.0.1", port);
    s.send_to(b"not rtp at all", to).unwrap(); // first byte 'n': not version 2
    s.send_to(&[0x80, 200, 0, 6, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], to).unwrap(); // RTCP SR
    let mut big = vec![0u8; 3000];
    big[0] = 0x80;
    big[1] = 96;
    s.send_to(&big, to).unwrap(); // RTP, larger than the engine sends
    for seq in 0..20u16 {
        let mut p = vec![0x80, 96];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&(seq as u32 * 3000).to_be_bytes());
        p.extend_from_slice(&[0xAB; 4]);
        p.extend_from_slice(b"payload");
        s.send_to(&p, to).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(20));
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    let (a, b) = (json_line(&out_a), json_line(&out_b));
    let f = &a["forwarding"];
    assert_eq!(f["rtp_in"], 23, "{a}");
    assert_eq!(f["rtp_in_malformed"], 1, "{a}");
    assert_eq!(f["rtp_in_rtcp"], 1, "{a}");
    assert_eq!(f["rtp_in_too_large"], 1, "{a}");
    assert_eq!(f["rtp_in_forwarded"], 20, "{a}");
    assert_eq!(b["received"], 20, "bob got exactly the good packets: {b}");
    assert_eq!(b["lost"], 0, "{b}");
    m.stop();
}

/// The SRTP packets alice sent to bob's port `pb`, as captured in `cap` (UDP payloads of RTP
/// version 2; null packets and STUN left out).
fn captured_rtp(cap: &str, pb: u16) -> Vec<Vec<u8>> {
    let filter = format!("udp.dstport == {pb}");
    // (Read as it comes: the hex of a call is more than a pipe holds.)
    let out = std::process::Command::new("tshark")
        .args(["-r", cap, "-Y", &filter, "-T", "fields", "-e", "udp.payload"])
        .output()
        .expect("tshark -r");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().replace(':', ""))
        .filter(|l| !l.is_empty())
        .map(|l| (0..l.len()).step_by(2).map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap()).collect::<Vec<u8>>())
        .filter(|p| p.len() > 12 && p[0] >> 6 == 2)
        .collect()
}

/// ffmpeg decoding `sdp` while `packets` are sent to `port` (5 ms apart); returns ffmpeg's
/// stderr and the WAV it wrote.
fn ffmpeg_decode(dir: &Scratch, name: &str, sdp: &str, port: u16, packets: &[Vec<u8>]) -> (String, String) {
    let out = dir.path(&format!("{name}.wav"));
    let ff = spawn(
        "ffmpeg",
        &[
            "-hide_banner",
            "-loglevel",
            "error",
            "-protocol_whitelist",
            "file,udp,rtp,srtp,crypto",
            "-i",
            sdp,
            "-ar",
            "48000",
            "-ac",
            "1",
            "-y",
            &out,
        ],
        "ffmpeg",
    );
    std::thread::sleep(Duration::from_secs(1));
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for p in packets {
        s.send_to(p, ("127.0.0.1", port)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (_, _, err) = ff.interrupt(Duration::from_secs(20));
    (err, out)
}

/// A captured AES_CM_128_HMAC_SHA1_80 call decrypts and decodes in ffmpeg through the SDP the
/// callee wrote (RFC 4568 `a=crypto` with the call's key), and the speech matches; with the
/// same SDP less its `a=crypto` line it does not (the capture holds no plain speech).
#[test]
fn ffmpeg_decrypts_a_captured_aes_cm_call_with_the_callees_sdp() {
    let dir = Scratch::new("ffmpeg-srtp");
    let sent = speech(&dir, "sent", SENTENCE);
    let (pa, pb) = (free_udp_port(false), free_udp_port(false));
    let cap = dir.path("call.pcapng");
    let filter = format!("udp port {pb}");
    let ts = spawn("tshark", &["-i", "lo", "-f", &filter, "-w", &cap], "tshark");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::path::Path::new(&cap).exists() {
        assert!(Instant::now() < deadline, "tshark did not start capturing");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let sdp = dir.path("bob.sdp");
    let m = start_manager();
    let suite = ["--srtp-suite", "AES_CM_128_HMAC_SHA1_80"];
    let bob = peer_bound(
        &m.addr,
        "bob",
        &format!("127.0.0.1:{pb}"),
        &[&suite[..], &["--sdp", &sdp, "listen", "--calls", "1", "--json"]].concat(),
    );
    settle();
    let alice = peer_bound(
        &m.addr,
        "alice",
        &format!("127.0.0.1:{pa}"),
        &["--audio-in", &format!("wav:{sent}"), "call", "bob", "--duration", "7", "--json"],
    );
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!(ca, 0, "alice: {err_a}");
    assert_eq!(cb, 0, "bob: {err_b}");
    std::thread::sleep(Duration::from_millis(500));
    ts.interrupt(Duration::from_secs(20));
    let (a, b) = (json_line(&out_a), json_line(&out_b));
    assert_eq!(a["srtp"], "AES_CM_128_HMAC_SHA1_80", "the callee picked from the caller's offer: {a}");
    assert_eq!(b["srtp"], "AES_CM_128_HMAC_SHA1_80", "{b}");

    let text = std::fs::read_to_string(&sdp).unwrap();
    assert!(text.contains(&format!("m=audio {pb} RTP/SAVP 111\r\n")), "{text}");
    let crypto = text
        .lines()
        .find(|l| l.starts_with("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(
        crypto.len(),
        "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:".len() + 40,
        "30 bytes of key and salt: {crypto}"
    );
    let packets = captured_rtp(&cap, pb);
    assert!(packets.len() >= 330, "7 s of 20 ms frames captured: {}", packets.len());

    // Replayed to a port of ffmpeg's own (bob is gone), through bob's SDP.
    let port = free_udp_port(true);
    let replay_sdp = dir.path("replay.sdp");
    std::fs::write(&replay_sdp, text.replace(&format!("m=audio {pb} "), &format!("m=audio {port} "))).unwrap();
    let (err, decoded) = ffmpeg_decode(&dir, "decrypted", &replay_sdp, port, &packets);
    let (same, lag) = similarity(&sent, &decoded);
    assert!(same >= SAME_SPEECH, "ffmpeg decrypted the capture: similarity {same:.3} (lag {lag} ms)\n{err}");

    // Without the key: the same packets are noise to ffmpeg.
    let port = free_udp_port(true);
    let plain_sdp = dir.path("no-crypto.sdp");
    let no_crypto: String = text
        .replace(&format!("m=audio {pb} RTP/SAVP"), &format!("m=audio {port} RTP/AVP"))
        .lines()
        .filter(|l| !l.starts_with("a=crypto"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    std::fs::write(&plain_sdp, no_crypto).unwrap();
    let (err, garbled) = ffmpeg_decode(&dir, "garbled", &plain_sdp, port, &packets);
    let decodes = std::path::Path::new(&garbled).exists()
        && voice::wav::read(garbled.as_ref()).is_ok_and(|w| !w.samples.is_empty());
    if decodes {
        let (same, _) = similarity(&sent, &garbled);
        assert!(same < SAME_SPEECH, "speech recovered without the key: similarity {same:.3}\n{err}");
    }
    m.stop();
}
