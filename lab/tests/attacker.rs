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

/// Start tshark in `h` capturing `filter` on `iface` into `file`; returns once the capture
/// runs.
fn capture(lab: &Lab, h: Host, iface: &str, filter: &str, file: &str) -> lab::Proc {
    let _ = std::fs::remove_file(file);
    let child = lab
        .cmd(h, "tshark")
        .args(["-q", "-i", iface, "-f", filter, "-w", file])
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
    let tshark = capture(lab, Host::R1, "any", "udp", &file);
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

/// Python in a lab host: `/usr/bin/python3` where Debian puts it.
fn python(lab: &Lab, h: Host) -> std::process::Command {
    lab.cmd(h, if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" })
}

/// The attacker on the caller's router captures a registration with a TLS manager (a
/// secret: REGISTER carries a token) and sends the client's bytes again, on a new
/// connection: the manager registers nothing (the replayed handshake fails). With a
/// plaintext manager the same attacker reads the REGISTER frame itself; sent again on a
/// TLS connection of its own (a fresh handshake, the frame as captured), it is refused as
/// unbound: the token is only good on the connection it was bound to.
#[test]
fn registrations_captured_on_the_router_cannot_be_replayed() {
    let lab = Lab::up(Mode::Fw, Mode::Fw).expect("lab");
    let dir = std::env::temp_dir().join(format!("nullpunch-attacker-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let (cert, key, secret) = (path("c.pem"), path("k.pem"), path("secret"));
    let st = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=manager", "-addext", "subjectAltName=IP:198.18.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-days", "1", "-keyout", &key, "-out", &cert])
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success());
    std::fs::write(&secret, "a lab secret of more than sixteen bytes\n").unwrap();
    let token = |id: &str| {
        let out = std::process::Command::new(lab::bin_dir().join("manager"))
            .args(["--secret-file", &secret, "token", "--id", id])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let alice_token = token("alice");

    // 1. TLS: the capture is ciphertext; replaying the client's bytes registers nothing.
    let m =
        lab.start_manager_with(&["--tls-cert", &cert, "--tls-key", &key, "--secret-file", &secret]).expect("manager");
    let file = path("tls.pcapng");
    let tshark = capture(&lab, Host::R1, "wan0", "tcp port 80", &file);
    let alice = lab
        .peer(Host::A, "alice", 41_010, &["--tls", "--ca", &cert, "--token", &alice_token, "listen", "--duration", "2"])
        .unwrap();
    let o = alice.finish(Duration::from_secs(20));
    assert_eq!(o.code, 0, "alice: {}", o.stderr);
    let _ = engine::sys::terminate(tshark.id());
    tshark.finish(Duration::from_secs(10));
    let sent = tcp_payload(&file, A_IP, 80);
    assert_eq!(sent.first(), Some(&0x16), "the client's first bytes are a TLS handshake record");
    assert!(!contains(&sent, b"alice"), "the id is not in the clear on a TLS connection");
    let answer = send_to_manager(&lab, &sent, None);
    let counters = m.stop().expect("manager counters");
    assert_eq!(counters["registrations"], 1, "only alice's own registration: {counters}");
    assert!(counters["tls_handshake_failed"].as_u64().unwrap() >= 1, "the replayed handshake failed: {counters}");
    assert!(!answer.is_empty(), "the manager answered the replayed hello, then refused what followed");

    // 2. Plaintext: the attacker reads the REGISTER; on a TLS manager it opens its own TLS
    //    connection and sends the captured frame: refused, `auth_unbound`.
    let m = lab.start_manager_with(&["--secret-file", &secret]).expect("manager");
    let file = path("plain.pcapng");
    let tshark = capture(&lab, Host::R1, "wan0", "tcp port 80", &file);
    let alice = lab.peer(Host::A, "alice", 41_012, &["--token", &alice_token, "listen", "--duration", "2"]).unwrap();
    assert_eq!(alice.finish(Duration::from_secs(20)).code, 0);
    let _ = engine::sys::terminate(tshark.id());
    tshark.finish(Duration::from_secs(10));
    m.stop().expect("manager counters");
    let sent = tcp_payload(&file, A_IP, 80);
    assert!(contains(&sent, b"alice"), "a plaintext REGISTER is readable on the router");
    let register = first_frame_of_type(&sent, 0x01).expect("a REGISTER frame in the capture");
    let m =
        lab.start_manager_with(&["--tls-cert", &cert, "--tls-key", &key, "--secret-file", &secret]).expect("manager");
    send_to_manager(&lab, &register, Some(&cert));
    let counters = m.stop().expect("manager counters");
    assert_eq!(counters["registrations"], 0, "the replayed REGISTER registered: {counters}");
    assert_eq!(counters["auth_unbound"], 1, "refused as a token not bound to this connection: {counters}");
    assert_eq!(counters["tls_handshakes"], 1, "the attacker's own handshake worked: {counters}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The TCP bytes `src` sent to port `dport` in `file`, in sequence order, each segment once.
fn tcp_payload(file: &str, src: &str, dport: u16) -> Vec<u8> {
    let filter = format!("ip.src == {src} && tcp.dstport == {dport} && tcp.len > 0");
    let out = std::process::Command::new("tshark")
        .args(["-r", file, "-Y", &filter, "-T", "fields", "-e", "tcp.seq_raw", "-e", "tcp.payload"])
        .output()
        .expect("tshark -r");
    let mut segs: Vec<(u64, Vec<u8>)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (seq, hex) = l.split_once('\t')?;
            let hex = hex.trim().replace(':', "");
            let bytes = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            Some((seq.trim().parse().ok()?, bytes))
        })
        .collect();
    segs.sort_by_key(|(s, _)| *s);
    segs.dedup_by_key(|(s, _)| *s);
    segs.into_iter().flat_map(|(_, b)| b).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The first signalling frame of type `ty` in a plaintext byte stream (length prefix included).
fn first_frame_of_type(stream: &[u8], ty: u8) -> Option<Vec<u8>> {
    let mut at = 0;
    while at + 4 <= stream.len() {
        let len = u16::from_be_bytes([stream[at], stream[at + 1]]) as usize;
        if stream[at + 3] == ty && at + 2 + len <= stream.len() {
            return Some(stream[at..at + 2 + len].to_vec());
        }
        at += 2 + len;
    }
    None
}

/// Send `bytes` to the manager on a new TCP connection from R1 (over TLS trusting `tls_ca`,
/// if given: a handshake of the attacker's own); returns what came back.
fn send_to_manager(lab: &Lab, bytes: &[u8], tls_ca: Option<&str>) -> Vec<u8> {
    let connect = "socket.create_connection(('198.18.0.1',80),timeout=5)";
    let sock = match tls_ca {
        Some(ca) => format!(
            "c=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n\
             c.minimum_version=ssl.TLSVersion.TLSv1_3\n\
             c.set_alpn_protocols(['nullpunch/1'])\n\
             c.load_verify_locations('{ca}')\n\
             s=c.wrap_socket({connect},server_hostname='198.18.0.1')\n"
        ),
        None => format!("s={connect}\n"),
    };
    let script = format!(
        "import socket,ssl,sys\n\
         {sock}\
         s.sendall(bytes.fromhex(sys.argv[1]))\n\
         d=b''\n\
         try:\n\
         \x20   while True:\n\
         \x20       b=s.recv(4096)\n\
         \x20       if not b: break\n\
         \x20       d+=b\n\
         except Exception: pass\n\
         print(d.hex())\n"
    );
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let out = python(lab, Host::R1).args(["-c", &script, &hex]).output().expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let h = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap()).collect()
}
