//! An attacker on the caller's router: it captures a call (tshark in the router's namespace),
//! looks for plaintext media, and sends captured packets again, and altered ones, to the
//! callee from the caller's own address (spoofed from the router, where the forged packets
//! pass the callee's firewall like the real ones). The callee must drop and count every one,
//! and the call must go on untouched. A control call with `--no-srtp` on both sides shows
//! the checks can fail: its capture holds the plaintext, and its replays are taken.
//!
//! Needs root, iproute2, nftables, tshark and python3 (the README's test command installs
//! them). All traffic stays inside the lab's namespaces.

use std::process::Stdio;
use std::time::{Duration, Instant};

use lab::{Host, Lab, Mode, A_IP, B_IP};
use serde_json::Value;

fn settle() {
    std::thread::sleep(Duration::from_millis(1000));
}

fn u(v: &Value, path: &[&str]) -> u64 {
    let mut x = v;
    for k in path {
        x = &x[*k];
    }
    x.as_u64().unwrap_or_else(|| panic!("{path:?} missing in {v}"))
}

/// Start tshark in `h` capturing UDP into `file`; returns once the capture runs.
fn capture(lab: &Lab, h: Host, file: &str) -> lab::Proc {
    let _ = std::fs::remove_file(file);
    let child = lab
        .cmd(h, "tshark")
        .args(["-q", "-i", "any", "-f", "udp", "-w", file])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tshark");
    let p = lab::Proc::from_child(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::path::Path::new(file).exists() {
        assert!(Instant::now() < deadline, "tshark did not start capturing");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    p
}

/// The distinct UDP payloads from A's port `pa` to B's port `pb` in `file`, in order.
fn payloads(file: &str, pa: u16, pb: u16) -> Vec<Vec<u8>> {
    let filter = format!("ip.src == {A_IP} && udp.srcport == {pa} && ip.dst == {B_IP} && udp.dstport == {pb}");
    let out = std::process::Command::new("tshark")
        .args(["-r", file, "-Y", &filter, "-T", "fields", "-e", "udp.payload"])
        .output()
        .expect("tshark -r");
    let mut seen = std::collections::HashSet::new();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().replace(':', ""))
        .filter(|l| !l.is_empty())
        .map(|l| (0..l.len()).step_by(2).map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap()).collect::<Vec<u8>>())
        // Captured on both of the router's interfaces: each packet once.
        .filter(|p| seen.insert(p.clone()))
        .collect()
}

/// Whether an RTP packet carries the peer's synthetic frame in the clear: a frame counter and
/// timestamp, then bytes counting up by one (`proto::media::SyntheticSource`).
fn plaintext(p: &[u8]) -> bool {
    let payload = &p[12.min(p.len())..];
    payload.len() >= 16 + 32 && (0..32).all(|k| payload[16 + k] == payload[16].wrapping_add(k as u8))
}

/// Send `packets` from the router `h` to B's `pb`, with A's address and port `pa` as their
/// source (IP_TRANSPARENT: the router does not own that address).
fn inject(lab: &Lab, h: Host, pa: u16, pb: u16, packets: &[Vec<u8>]) {
    let hex: Vec<String> = packets.iter().map(|p| p.iter().map(|b| format!("{b:02x}")).collect()).collect();
    let script = format!(
        "import socket,sys,time\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_IP,19,1)\n\
         s.bind(('{A_IP}',{pa}))\n\
         for l in sys.stdin.read().split():\n\
         \x20   s.sendto(bytes.fromhex(l),('{B_IP}',{pb}))\n\
         \x20   time.sleep(0.002)\n"
    );
    let mut child = lab
        .cmd(h, if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" })
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(hex.join("\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "injection failed: {}", String::from_utf8_lossy(&out.stderr));
}

struct Attack {
    /// RTP packets captured, and how many of them carried plaintext media.
    rtp: usize,
    plain: usize,
    /// Packets sent again unchanged: SRTP, null packets.
    replayed_rtp: usize,
    replayed_nulls: usize,
    /// Altered: SRTP with a flipped ciphertext bit, null packets with a new counter and the
    /// old MAC.
    forged_rtp: usize,
    forged_nulls: usize,
    caller: Value,
    callee: Value,
}

/// One call A -> B with the attacker on R1: capture the first 3 s, then inject while the call
/// goes on.
fn attacked_call(lab: &Lab, pa: u16, pb: u16, extra: &[&str]) -> Attack {
    let file = format!("/tmp/nullpunch-attacker-{}-{pa}.pcapng", std::process::id());
    let tshark = capture(lab, Host::R1, &file);
    let bob = lab.peer(Host::B, "callee", pb, &[extra, &["listen", "--calls", "1", "--json"]].concat()).unwrap();
    settle();
    let alice =
        lab.peer(Host::A, "caller", pa, &[extra, &["call", "callee", "--duration", "8", "--json"]].concat()).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let _ = engine::sys::terminate(tshark.id());
    tshark.finish(Duration::from_secs(10));
    let all = payloads(&file, pa, pb);
    let _ = std::fs::remove_file(&file);
    let rtp: Vec<Vec<u8>> = all.iter().filter(|p| p.len() > 12 && p[0] >> 6 == 2).cloned().collect();
    let nulls: Vec<Vec<u8>> = all.iter().filter(|p| p.len() == 40 && p[0] == 0x0E).cloned().collect();
    assert!(rtp.len() >= 100, "the capture holds the call's media: {} RTP of {} packets", rtp.len(), all.len());
    assert!(!nulls.is_empty(), "the capture holds the caller's null packet");
    let plain = rtp.iter().filter(|p| plaintext(p)).count();

    let replay: Vec<Vec<u8>> = rtp.iter().take(50).cloned().collect();
    let forged_rtp: Vec<Vec<u8>> = rtp
        .iter()
        .skip(50)
        .take(20)
        .map(|p| {
            // A sequence number ahead of the stream (fresh, so the replay window lets it
            // through to the tag check) and one flipped bit of ciphertext.
            let mut f = p.clone();
            let seq = u16::from_be_bytes([f[2], f[3]]).wrapping_add(20_000);
            f[2..4].copy_from_slice(&seq.to_be_bytes());
            let last = f.len() - 1;
            f[last - 20] ^= 0x01;
            f
        })
        .collect();
    let forged_nulls: Vec<Vec<u8>> = nulls
        .iter()
        .map(|p| {
            let mut f = p.clone();
            // A counter far ahead (fresh), the old MAC: only the key could make it valid.
            f[20..24].copy_from_slice(&0x7000_0000u32.to_be_bytes());
            f
        })
        .collect();
    inject(lab, Host::R1, pa, pb, &[replay.clone(), forged_rtp.clone(), nulls.clone(), forged_nulls.clone()].concat());

    let (oa, ob) = (alice.finish(Duration::from_secs(20)), bob.finish(Duration::from_secs(10)));
    assert_eq!(oa.code, 0, "caller: {:?} {}", oa.calls, oa.stderr);
    assert_eq!(ob.code, 0, "callee: {:?} {}", ob.calls, ob.stderr);
    Attack {
        rtp: rtp.len(),
        plain,
        replayed_rtp: replay.len(),
        replayed_nulls: nulls.len(),
        forged_rtp: forged_rtp.len(),
        forged_nulls: forged_nulls.len(),
        caller: oa.calls[0].clone(),
        callee: ob.calls[0].clone(),
    }
}

#[test]
fn an_attacker_on_the_router_reads_no_media_and_its_replays_and_forgeries_are_refused() {
    let lab = Lab::up(Mode::Fw, Mode::Fw).expect("lab");
    let m = lab.start_manager().expect("manager");

    let a = attacked_call(&lab, 41_000, 42_000, &[]);
    let (ca, cb) = (&a.caller, &a.callee);
    assert_eq!(cb["srtp"], "AEAD_AES_128_GCM", "{cb}");
    assert_eq!(a.plain, 0, "{} of {} captured packets carry plaintext media", a.plain, a.rtp);
    // Every replayed and forged packet refused and counted; the call untouched by them.
    assert!(u(cb, &["refused", "media_replayed"]) >= a.replayed_rtp as u64, "{cb}");
    assert!(u(cb, &["refused", "media_unauthenticated"]) >= a.forged_rtp as u64, "{cb}");
    assert!(u(cb, &["refused", "nulls_replayed"]) >= a.replayed_nulls as u64, "{cb}");
    assert!(u(cb, &["refused", "nulls_unauthenticated"]) >= a.forged_nulls as u64, "{cb}");
    assert!(u(cb, &["media_refused"]) >= (a.replayed_rtp + a.forged_rtp) as u64, "{cb}");
    // No injected packet counted as media (the last one or two of the caller's may be in
    // flight at its hangup).
    let (sent, received) = (u(ca, &["sent"]), u(cb, &["received"]));
    assert!(received <= sent && received + 3 >= sent, "sent {sent}, received {received}: {ca} {cb}");
    assert_eq!(u(cb, &["lost"]), 0, "{cb}");
    assert_eq!(cb["peer"], format!("{A_IP}:41000"), "the path did not move: {cb}");

    // Control: without SRTP the same attacker reads the media and its replays are taken.
    let c = attacked_call(&lab, 41_002, 42_002, &["--no-srtp"]);
    let cb = &c.callee;
    assert_eq!(cb["srtp"], "none", "{cb}");
    assert!(c.plain * 2 > c.rtp, "plaintext visible without SRTP: {} of {}", c.plain, c.rtp);
    // Nothing refused: every replayed and altered packet was taken as media, and the call's
    // statistics no longer match what the caller sent.
    assert_eq!(u(cb, &["media_refused"]), 0, "{cb}");
    assert_eq!(u(cb, &["refused", "media_replayed"]) + u(cb, &["refused", "media_unauthenticated"]), 0, "{cb}");
    assert_ne!(u(cb, &["received"]), u(&c.caller, &["sent"]), "injected packets counted as media: {cb}");
    // The null packets stay authenticated even without SRTP.
    assert!(u(cb, &["refused", "nulls_unauthenticated"]) >= c.forged_nulls as u64, "{cb}");
    m.stop().expect("manager counters");
}
