#![recursion_limit = "256"]
//! `peer`: the nullpunch voice client.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use engine::driver::{self, App, Ctx};
use proto::client::{CallReport, Client, ClientConfig, EndReason, Event, Received};
use proto::portmap::MapEvent;
use proto::wire::frame::{ClientId, ErrorCode};

mod device;
mod media;

use media::{AudioIn, AudioOut, Media, MediaConfig, Waker};

/// nullpunch voice client: registers with a manager, then calls or answers, and streams RTP
/// media straight to the other peer through the window its null packet opened.
///
/// Durations are in seconds unless the flag's name says otherwise (`--frame-ms`).
///
/// Exit status: 0 when every call succeeded, 1 when a call failed (the phase that failed is
/// printed on stderr), 2 on a usage or set-up error (a bad flag, a UDP address it cannot
/// bind, a manager it cannot reach or that does not register it within --register-timeout,
/// a refused token).
#[derive(Parser, Debug)]
#[command(version, about, long_about, allow_negative_numbers = true)]
struct Args {
    /// Manager address (TCP signalling; its UDP port with the same number answers STUN). A
    /// name with an IPv4 address resolves to that. Several, comma-separated (managers of one
    /// cluster): the first that answers registers us, and when its connection is lost the
    /// peer moves to the next one in the list within a fraction of a second (calls with a
    /// path go on meanwhile).
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]", value_parser = manager_arg)]
    manager: ManagerArg,
    /// Speak TLS 1.3 to the manager (a manager started with --tls-cert), trusting its
    /// certificate through --ca or --pin (one is required: there are no system roots). The
    /// certificate must name HOST as given in --manager (a DNS name or an IP address; with
    /// several managers, the first one's HOST: every one must present a certificate for it).
    #[arg(long)]
    tls: bool,
    /// With --tls: trust the manager's certificate if it chains to a certificate in this PEM
    /// file (the manager's own certificate will do).
    #[arg(long, value_name = "PEM", requires = "tls", conflicts_with = "pin")]
    ca: Option<std::path::PathBuf>,
    /// With --tls: trust exactly the manager certificate with this SHA-256 fingerprint of
    /// its DER (hex, colons allowed, as `openssl x509 -noout -fingerprint -sha256` prints).
    #[arg(long, value_name = "SHA256", requires = "tls", value_parser = parse_pin)]
    pin: Option<[u8; 32]>,
    /// This client's id (1-64 bytes, no spaces).
    #[arg(long)]
    id: String,
    /// Local UDP address for media. Default: `[::]:0`, one dual-stack socket for IPv4 and
    /// IPv6 (`0.0.0.0:0` where the host has IPv6 off). An IPv4 address limits the peer to
    /// IPv4.
    #[arg(long, value_name = "IP:PORT")]
    bind: Option<SocketAddr>,
    /// Registration token for a manager that requires one (`manager token --id ID`).
    #[arg(long, value_name = "TOKEN", value_parser = proto::wire::frame::AuthToken::parse)]
    token: Option<proto::wire::frame::AuthToken>,
    /// Print one JSON object per finished call on stdout (instead of a human line).
    #[arg(long, global = true)]
    json: bool,
    /// Send a keepalive null packet after this many seconds without sending (keep under the
    /// routers' conntrack UDP timeout; Linux default 30 s).
    #[arg(long, value_name = "SECS", default_value_t = 15.0, global = true, value_parser = seconds, alias = "keepalive-secs")]
    keepalive: f64,
    /// End a call when nothing arrived from the peer for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 35.0, global = true, value_parser = seconds, alias = "media-timeout-secs")]
    media_timeout: f64,
    /// Seconds to wait for START (caller) or for the peer's first packet.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, global = true, value_parser = seconds, alias = "setup-timeout-secs")]
    setup_timeout: f64,
    /// Give up (exit status 2, saying what the address answered) if the manager has not
    /// registered this client within this many seconds of the start. Once registered, later
    /// reconnects wait as long as they need.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, global = true, value_parser = seconds, alias = "register-timeout-secs")]
    register_timeout: f64,
    /// UDP IO: uring (the io_uring driver), portable (tokio + quinn-udp), or auto (uring
    /// where it can be set up, else portable; the NULLPUNCH_IO environment variable
    /// overrides auto).
    #[arg(long, default_value = "auto", global = true, value_parser = ["uring", "portable", "auto"])]
    io: String,
    /// Pause sending media AT seconds into each call for FOR seconds (keepalive null packets
    /// still go out): tests that an idle path stays open through the firewalls.
    #[arg(long, value_name = "AT,FOR", value_parser = parse_pause, global = true, allow_hyphen_values = true)]
    pause: Option<(f64, f64)>,
    /// Audio to send: wav:PATH (48 kHz WAV, then silence), tone (440 Hz), chirp (a 30 ms
    /// chirp every 500 ms), silence, or device[:NAME] (the PulseAudio microphone). Without
    /// it (and without --rtp-in), calls carry synthetic frames.
    #[arg(long, value_name = "SPEC", value_parser = media::parse_audio_in, global = true)]
    audio_in: Option<AudioIn>,
    /// Where received Opus audio is played: wav:PATH (48 kHz mono WAV, one file per call:
    /// PATH for the first, then PATH with -2, -3, ... before its extension) or device[:NAME]
    /// (the PulseAudio speaker).
    #[arg(long, value_name = "SPEC", value_parser = media::parse_audio_out, global = true)]
    audio_out: Option<AudioOut>,
    /// `device`: the sound device both ways (same as --audio-in device --audio-out device).
    #[arg(long, value_name = "device", value_parser = ["device"], global = true)]
    audio: Option<String>,
    /// Opus frame duration, ms: 10, 20, 40 or 60.
    #[arg(long, default_value_t = 20, global = true, value_parser = frame_ms)]
    frame_ms: u32,
    /// Smallest jitter buffer delay, ms, 0 to 1000 (the buffer adds what the measured jitter
    /// needs).
    #[arg(long, default_value_t = 5.0, global = true, value_parser = jitter_ms)]
    jitter_min_ms: f64,
    /// Forward RTP that a local program (ffmpeg, GStreamer) sends to this UDP address (or
    /// port on 127.0.0.1) to the peer through the punched path, instead of our own audio.
    #[arg(long, value_name = "[IP:]PORT", value_parser = parse_local_addr, global = true)]
    rtp_in: Option<SocketAddr>,
    /// Hand every RTP packet received from the peer on to this address (a local player).
    #[arg(long, value_name = "HOST:PORT", global = true)]
    rtp_out: Option<SocketAddr>,
    /// Write an SDP file describing the stream this peer receives (at --rtp-out if given,
    /// else at its media socket), for ffmpeg or GStreamer.
    #[arg(long, value_name = "PATH", global = true)]
    sdp: Option<std::path::PathBuf>,
    /// The received stream's rtpmap in the SDP (encoding/clock[/channels]); `video` media
    /// for video encodings.
    #[arg(long, default_value = "opus/48000/2", global = true)]
    rtp_map: String,
    /// The received stream's payload type in the SDP, and the payload type of our Opus.
    #[arg(long, default_value_t = 111, value_parser = clap::value_parser!(u8).range(0..=127), global = true)]
    rtp_pt: u8,
    /// Birthday search (one side's NAT randomises ports): sockets the hard side opens, one
    /// NAT mapping each, 1 to 1024.
    #[arg(long, value_name = "N", default_value_t = 256, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    birthday_sockets: u16,
    /// Birthday search: probes per second the easy side sends to ports of the hard side's
    /// IP, 1 to 10000 (each is a conntrack entry on both routers it crosses).
    #[arg(long, value_name = "PER_SEC", default_value_t = 100, global = true, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    birthday_rate: u32,
    /// Birthday search: probes per round, after which the easy side pauses 5 s, 1 to 64512.
    #[arg(long, value_name = "N", default_value_t = 2048, global = true, value_parser = clap::value_parser!(u32).range(1..=64_512))]
    birthday_budget: u32,
    /// Birthday search: seconds from START or INCOMING to give up finding a port pair.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, global = true, value_parser = seconds)]
    birthday_timeout: f64,
    /// Do not tell the manager this host's own addresses (host candidates). They are passed
    /// on only to a peer behind the same public IP, which then reaches this one over the
    /// LAN without a hairpin through the router.
    #[arg(long, global = true)]
    no_host_candidates: bool,
    /// Ask the router for a port mapping of the UDP port (PCP, then NAT-PMP): `auto` asks
    /// the default gateway unless the manager is on loopback; an IPv4 address asks that
    /// router; `off` never asks. A mapping is the best address behind any NAT; it is renewed
    /// before it expires and deleted at exit.
    #[arg(long, value_name = "auto|off|IP", default_value = "auto", global = true, value_parser = port_mapping_arg)]
    port_mapping: PortMappingArg,
    /// SRTP suites, best first, comma-separated: AEAD_AES_128_GCM, AES_CM_128_HMAC_SHA1_80.
    /// A caller offers them; a callee takes the first of its list that the offer holds.
    /// Default: both, GCM first.
    #[arg(long, value_name = "NAME[,NAME]", global = true, value_parser = parse_suites)]
    srtp_suite: Option<Suites>,
    /// Plain RTP instead of SRTP, only to measure what SRTP costs: the other peer must run
    /// with --no-srtp too, else the call is refused (no common suite).
    #[arg(long, global = true, conflicts_with = "srtp_suite")]
    no_srtp: bool,
    /// This peer's long-term identity: a file holding a 32-byte Ed25519 seed in base64 (made,
    /// mode 0600, if it does not exist). Key shares are signed with it; its public key is
    /// printed at start (give it to the other side's --peer-key).
    #[arg(long, value_name = "FILE", global = true)]
    identity: Option<std::path::PathBuf>,
    /// Require the other peer's identity (its public key, base64): a call whose key share it
    /// did not sign is refused, so a manager that swaps the keys is caught.
    #[arg(long, value_name = "KEY", global = true, value_parser = parse_peer_key)]
    peer_key: Option<[u8; 32]>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `--manager HOST:PORT[,HOST:PORT...]`: the addresses, and the first one's host as given
/// (the name the managers' TLS certificates must carry).
#[derive(Debug, Clone)]
struct ManagerArg {
    addrs: Vec<SocketAddr>,
    host: String,
}

fn manager_arg(s: &str) -> Result<ManagerArg, engine::addr::AddrError> {
    let mut addrs = Vec::new();
    for part in s.split(',') {
        let a = engine::addr::manager_addr(part)?;
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    let first = s.split(',').next().unwrap_or_default();
    Ok(ManagerArg { addrs, host: engine::tls::host_of(first.trim()).to_string() })
}

/// The managers, comma-separated, for messages.
fn list_addrs(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
}

fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    engine::tls::parse_pin(s).map_err(|e| e.to_string())
}

/// SRTP suite codes, best first.
#[derive(Debug, Clone)]
struct Suites(Vec<u8>);

fn parse_suites(s: &str) -> Result<Suites, String> {
    let mut v = Vec::new();
    for name in s.split(',').map(str::trim) {
        match proto::e2e::suite_from_name(name) {
            Some(proto::e2e::SUITE_NONE) | None => {
                return Err(format!("`{name}`: expected AEAD_AES_128_GCM or AES_CM_128_HMAC_SHA1_80"))
            }
            Some(c) if !v.contains(&c) => v.push(c),
            Some(_) => {}
        }
    }
    Ok(Suites(v))
}

fn parse_peer_key(s: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|e| format!("not base64: {e}"))?;
    b.try_into().map_err(|b: Vec<u8>| format!("{} bytes; an Ed25519 public key is 32", b.len()))
}

/// The identity in `path` (base64 of a 32-byte seed), made if the file does not exist.
fn load_identity(path: &std::path::Path) -> Result<proto::e2e::IdentityKey, String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let seed: [u8; 32] = match std::fs::read_to_string(path) {
        Ok(text) => b64
            .decode(text.trim())
            .map_err(|e| format!("{}: not base64: {e}", path.display()))?
            .try_into()
            .map_err(|b: Vec<u8>| format!("{}: {} bytes; an identity seed is 32", path.display(), b.len()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed = engine::entropy::secure_key();
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            writeln!(f, "{}", b64.encode(seed)).map_err(|e| format!("{}: {e}", path.display()))?;
            seed
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    Ok(proto::e2e::IdentityKey::from_seed(&seed))
}

/// `PORT` (on 127.0.0.1) or `IP:PORT`.
fn parse_local_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| format!("{s:?}: expected PORT or IP:PORT"))
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Register and answer incoming calls: send the null packet, reply PUNCHED, exchange media.
    #[command(allow_negative_numbers = true)]
    Listen {
        /// Exit after this many calls have ended (at least 1).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        calls: Option<u32>,
        /// Exit after this many seconds (open calls are hung up).
        #[arg(long, value_parser = seconds)]
        duration: Option<f64>,
        /// Do not send the null packet (negative control: the caller's media should then be
        /// dropped by this side's firewall).
        #[arg(long)]
        no_null: bool,
    },
    /// Call CALLEE, wait for START, stream media directly to it, then hang up.
    #[command(allow_negative_numbers = true)]
    Call {
        /// The callee's id.
        callee: String,
        /// Seconds of media before hanging up.
        #[arg(long, default_value_t = 10.0, value_parser = seconds)]
        duration: f64,
    },
}

struct PeerApp {
    json: bool,
    /// The managers' addresses, for messages.
    managers: Vec<SocketAddr>,
    /// The manager that registered us last (after a failover, another one of the list).
    registered_with: Option<SocketAddr>,
    /// `--register-timeout`.
    register_timeout: Duration,
    /// Until the first REGISTERED: when to give up waiting for it.
    register_by: Option<Instant>,
    /// A manager ERROR that came before the first REGISTERED.
    refused: Option<String>,
    /// No STUN answer came from the manager's UDP port.
    stun_unanswered: bool,
    /// What the driver last found undecodable on the manager connection.
    bad_frames: BadFrames,
    role_caller: Option<(ClientId, Duration)>,
    /// How the manager learned our public address (from REGISTERED).
    local_source: Option<&'static str>,
    /// The port mapping held (`pcp 11.0.0.11:40001`), or why there is none.
    mapping: Option<String>,
    mapping_error: Option<String>,
    calls_left: Option<u32>,
    deadline: Option<Instant>,
    media: Media,
    done: bool,
    failed: bool,
    fatal: Option<String>,
    /// `--sdp` of an SRTP stream: written at each call's start with its key.
    sdp: Option<(std::path::PathBuf, voice::sdp::SdpStream)>,
}

impl PeerApp {
    /// Why the manager has not registered us, from what the connection saw (`c`: the
    /// driver's counters).
    fn not_registered(&self, c: &driver::DriverCounters) -> String {
        let what = if let Some(e) = &self.refused {
            format!("it answered ERROR {e}")
        } else if c.frame_errors > 0 {
            let detail = match self.bad_frames.last() {
                Some(d) => explain_bad_frame(d),
                None => format!("{} of its replies did not decode", c.frame_errors),
            };
            format!("what it sent is not nullpunch signalling ({detail})")
        } else if c.disconnects > 0 {
            let times = if c.disconnects == 1 { "once".to_string() } else { format!("{} times", c.disconnects) };
            format!("it closed the connection without answering ({times})")
        } else if self.stun_unanswered {
            "it accepted the connection but never answered (nor did anything answer STUN on its UDP port)".to_string()
        } else {
            "it accepted the connection but never answered".to_string()
        };
        let at = match self.managers.as_slice() {
            [one] => format!("the manager at {one}"),
            many => format!("none of the managers at {}", list_addrs(many)),
        };
        format!("{at} did not register us within {} s: {what}", self.register_timeout.as_secs_f64())
    }

    /// `c`: the client's drop counters so far (the process's, over all its calls).
    /// `--sdp` for call `h`: the received SRTP stream with its key (RFC 4568 `a=crypto`), so
    /// a local tool can decrypt a capture of it.
    fn write_sdp(&mut self, client: &Client, h: proto::client::CallHandle) {
        use base64::Engine;
        let Some((path, st)) = &self.sdp else { return };
        let Some((suite, mk)) = client.receive_key(h) else { return };
        let salt = if suite == proto::e2e::SUITE_AES_128_GCM { &mk.salt[..12] } else { &mk.salt[..] };
        let mut key_salt = mk.key.to_vec();
        key_salt.extend_from_slice(salt);
        let inline = base64::engine::general_purpose::STANDARD.encode(&key_salt);
        let st = voice::sdp::SdpStream {
            crypto: Some(format!("{} inline:{inline}", proto::e2e::suite_name(suite))),
            ..st.clone()
        };
        if let Err(e) = std::fs::write(path, st.to_sdp(engine::entropy::seed() >> 1)) {
            eprintln!("peer: --sdp {}: {e}", path.display());
        }
    }

    fn report(&mut self, r: &CallReport, m: Option<media::MediaReport>, c: &proto::client::ClientCounters) {
        let ok = r.succeeded();
        if !ok {
            self.failed = true;
            eprintln!(
                "peer: call {} with {} failed: {} (phase: {}; sent {}, received {})",
                r.call_id.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                r.peer_id,
                r.reason.describe(),
                failed_phase(r),
                r.sent,
                r.received
            );
        }
        if self.json {
            let ms = |d: Option<Duration>| {
                d.map(|d| serde_json::json!(d.as_secs_f64() * 1000.0)).unwrap_or(serde_json::Value::Null)
            };
            let v = serde_json::json!({
                "call_id": r.call_id.map(|c| c.to_string()),
                // The manager this client was registered with when the call ended.
                "manager": self.registered_with.map(|a| a.to_string()),
                "role": r.role.as_str(),
                "peer_id": r.peer_id.as_str(),
                "local": r.local.map(|a| a.to_string()),
                "local_source": self.local_source,
                "port_mapping": self.mapping,
                "port_mapping_error": self.mapping_error,
                "peer": r.peer.map(|a| a.to_string()),
                "nat_class": r.nat.as_str(),
                "nat_step": nat_step(r.nat),
                "peer_nat_class": r.peer_nat.as_str(),
                "peer_nat_step": nat_step(r.peer_nat),
                "strategy": r.strategy.as_str(),
                "probes_sent": r.probes_sent,
                "sockets_opened": r.sockets_opened,
                "pair_found_here": r.found_here,
                "candidates_tried": r.candidates_tried,
                "path": r.path.as_str(),
                // Setup as loadgen measures it: the call's start to two-way media.
                "setup_ms": ms(r.first_media),
                "signalling_ms": ms(r.setup),
                "first_media_ms": ms(r.first_media),
                "duration_ms": r.duration.as_secs_f64() * 1000.0,
                "sent": r.sent,
                "received": r.received,
                "lost": r.lost,
                "jitter_ms": r.jitter_ms,
                "nulls_sent": r.nulls_sent,
                "nulls_received": r.nulls_received,
                "srtp": proto::e2e::suite_name(r.suite),
                "peer_identity": r.peer_identity.map(|k| {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD.encode(k)
                }),
                "media_refused": r.media_refused,
                "nulls_refused": r.nulls_refused,
                "result": if ok { "ok".to_string() } else { r.reason.describe() },
                "failed_phase": if ok { None } else { Some(failed_phase(r)) },
                "media": m.as_ref().map(|m| serde_json::to_value(m).unwrap_or_default()),
                "forwarding": serde_json::to_value(self.media.forward_counters()).unwrap_or_default(),
                // Datagrams this client refused so far (all calls): the admission checks at work.
                "refused": {
                    "wrong_source": c.dgram_wrong_source,
                    "unmatched": c.dgram_unmatched,
                    "malformed": c.dgram_malformed,
                    "unknown": c.dgram_unknown,
                    "nulls_unauthenticated": c.nulls_unauthenticated,
                    "nulls_replayed": c.nulls_replayed,
                    "media_unauthenticated": c.media_unauthenticated,
                    "media_replayed": c.media_replayed,
                    "key_exchange_failed": c.key_exchange_failed,
                },
            });
            println!("{v}");
        } else {
            println!(
                "call {} {} with {} ({} <-> {}; nat {} <-> {}, {}): {}; setup {} ms (signalling {} ms), sent {}, received {}, lost {}, jitter {:.2} ms",
                r.call_id.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                r.role.as_str(),
                r.peer_id,
                r.local.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                r.peer.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                r.nat,
                r.peer_nat,
                r.strategy.as_str(),
                if ok { "ok".to_string() } else { r.reason.describe() },
                r.first_media.map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0)).unwrap_or_else(|| "-".into()),
                r.setup.map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0)).unwrap_or_else(|| "-".into()),
                r.sent,
                r.received,
                r.lost,
                r.jitter_ms
            );
            if r.strategy.searches() {
                println!(
                    "  search: {} probes sent, {} sockets opened, pair found {}",
                    r.probes_sent,
                    r.sockets_opened,
                    if r.found_here { "here" } else { "by the peer" }
                );
            }
            if let Some(m) = m.filter(|m| m.played + m.concealed > 0 || m.sent_kind != "synthetic") {
                println!(
                    "  media: sent {} ({} opus frames); played {}, concealed {}, lost {}, late {}, buffer {:.1} ms (target {:.1}), expands {}, accelerates {}",
                    m.sent_kind, m.audio_frames_sent, m.played, m.concealed, m.lost, m.late, m.buffer_delay_ms, m.buffer_target_ms, m.expands, m.accelerates
                );
            }
        }
    }
}

/// Opus frame duration in ms: 10, 20, 40 or 60.
fn frame_ms(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(ms @ (10 | 20 | 40 | 60)) => Ok(ms),
        _ => Err("expected 10, 20, 40 or 60 (ms)".into()),
    }
}

/// A delay in ms, from 0 to one second.
fn jitter_ms(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1000.0).contains(&v) => Ok(v),
        _ => Err("expected a number of ms from 0 to 1000".into()),
    }
}

/// A duration in seconds: finite, from 10 ms to one day.
fn seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.01..=86_400.0).contains(&v) => Ok(v),
        _ => Err("expected a number of seconds from 0.01 to 86400".into()),
    }
}

fn parse_pause(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s.split_once(',').ok_or("expected AT,FOR (seconds)")?;
    let at: f64 = a.trim().parse().map_err(|_| format!("bad AT {a:?}"))?;
    let dur: f64 = b.trim().parse().map_err(|_| format!("bad FOR {b:?}"))?;
    if !(0.0..=86_400.0).contains(&at) || !(0.0..=86_400.0).contains(&dur) {
        return Err("AT and FOR must be from 0 to 86400 seconds".into());
    }
    Ok((at, dur))
}

/// A sequential NAT's port step, for JSON (null for the other classes).
fn nat_step(n: proto::nat::NatClass) -> Option<i16> {
    match n {
        proto::nat::NatClass::Sequential { delta } => Some(delta),
        _ => None,
    }
}

/// The phase that failed, in the words a person debugging a firewall needs: judged from
/// what was sent and received, whichever side's timer ended the call.
fn failed_phase(r: &CallReport) -> &'static str {
    match r.reason {
        EndReason::NoStart => "no START (the callee never answered, or the manager lost it)",
        EndReason::Unknown(_) => "no INCOMING (callee unknown)",
        EndReason::Busy => "no INCOMING (callee busy)",
        EndReason::Rejected(proto::wire::frame::RejectReason::NoPath) => "no relay-free path (refused before INCOMING)",
        EndReason::Rejected(_) => "rejected",
        EndReason::ManagerLost => "manager lost during setup",
        EndReason::NoPairFound => "no port pair found by the birthday search (--birthday-timeout)",
        _ if r.received == 0 && r.role == proto::client::Role::Callee && r.nulls_sent == 0 => {
            "no media (no null packet was sent: --no-null)"
        }
        _ if r.received == 0 && r.sent > 0 => "media one way only (sent, nothing came back)",
        _ if r.received == 0 => "no media",
        EndReason::PeerGone => "media stopped",
        _ => "hung up",
    }
}

impl App for PeerApp {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) {
        self.event(ctx, event);
        if self.done {
            // Leaving: the port mapping goes with us (its request is sent before the exit).
            ctx.client.release_port_mapping();
        }
    }

    fn on_media(&mut self, ctx: &mut Ctx<'_>, packet: Received<'_>) {
        self.media.on_media(ctx.now, &packet);
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.media.next_wakeup().into_iter().chain(self.deadline).chain(self.register_by).min()
    }

    fn on_wakeup(&mut self, ctx: &mut Ctx<'_>) {
        self.wakeup(ctx);
        if self.done {
            ctx.client.release_port_mapping();
        }
    }

    fn done(&self) -> bool {
        self.done
    }
}

impl PeerApp {
    fn event(&mut self, ctx: &mut Ctx<'_>, event: Event) {
        match event {
            Event::Registered { public, source } => {
                let manager = ctx.manager();
                tracing::info!(%public, %source, %manager, "registered");
                if let Some(before) = self.registered_with.filter(|b| *b != manager) {
                    eprintln!("peer: registered with the manager at {manager} (failed over from {before})");
                }
                self.registered_with = Some(manager);
                self.register_by = None;
                self.local_source = Some(match source {
                    proto::wire::frame::AddrSource::Stun => "stun",
                    proto::wire::frame::AddrSource::TcpPeer => "tcp-peer",
                    proto::wire::frame::AddrSource::Mapped => "mapped",
                });
                if let Some((callee, _)) = &self.role_caller {
                    if ctx.client.active_calls() == 0 && !self.done {
                        if let Err(e) = ctx.client.call(ctx.now, callee.clone()) {
                            self.fatal = Some(format!("cannot call: {e}"));
                            self.done = true;
                        }
                    }
                }
            }
            Event::Started { handle, peer, .. } => {
                tracing::info!(%peer, "START: streaming media to the callee");
                self.write_sdp(ctx.client, handle);
                let dur = self.role_caller.as_ref().map(|(_, d)| *d).unwrap_or_default();
                self.media.start(handle, ctx.now, Some(ctx.now + dur));
            }
            Event::Incoming { handle, caller, caller_addr, .. } => {
                tracing::info!(%caller, %caller_addr, "incoming call: null packet sent, PUNCHED replied");
                self.write_sdp(ctx.client, handle);
            }
            Event::PairFound { handle, peer, probes_sent, after } => tracing::info!(
                call = handle.0,
                %peer,
                probes_sent,
                after_ms = after.as_millis() as u64,
                "birthday search found its port pair"
            ),
            Event::MediaFlowing { handle } => {
                tracing::info!("first packet from the peer: path is two-way");
                self.media.start(handle, ctx.now, None);
            }
            Event::Ended(r) => {
                let m = self.media.end(r.handle);
                self.report(&r, m, ctx.client.counters());
                if self.role_caller.is_some() {
                    self.done = true;
                } else if let Some(n) = self.calls_left.as_mut() {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.done = true;
                    }
                }
            }
            Event::ManagerError { code, message } => {
                eprintln!("peer: manager error {code}: {message}");
                if self.register_by.is_some() {
                    self.refused = Some(format!("{code}: {message}"));
                }
                if code == ErrorCode::Unauthorized {
                    // Retrying with the same token cannot succeed.
                    self.fatal = Some(format!("the manager refused our registration: {message}"));
                    ctx.client.hangup_all(ctx.now);
                    self.done = true;
                } else if (code == ErrorCode::Replaced || (code == ErrorCode::Shutdown && self.managers.len() == 1))
                    && ctx.client.active_calls() == 0
                {
                    // (With several managers, one shutting down is what the others are for.)
                    self.fatal = Some(format!("manager closed the connection: {message}"));
                    self.done = true;
                }
            }
            Event::Discovered { mapped, nat, mappings } => match mapped {
                Some(a) => tracing::info!(mapped = %a, %nat, ?mappings, "public UDP address discovered by STUN"),
                None => {
                    self.stun_unanswered = true;
                    tracing::warn!("no STUN answer from the manager; it will use the TCP peer address")
                }
            },
            Event::ManagerUnresponsive => tracing::warn!("manager does not answer PING"),
            Event::PortMapping(e) => match e {
                MapEvent::Mapped { protocol, external, lifetime, renewed } => {
                    tracing::info!(protocol = protocol.as_str(), %external, ?lifetime, renewed, "port mapping");
                    self.mapping = Some(format!("{} {external}", protocol.as_str()));
                }
                MapEvent::Failed { reason } => {
                    tracing::info!("no port mapping: {reason}");
                    self.mapping_error = Some(reason);
                }
                MapEvent::Lost => {
                    tracing::warn!("port mapping lost: its renewals went unanswered");
                    self.mapping = None;
                    self.mapping_error = Some("lost: renewals unanswered".into());
                }
            },
        }
    }

    fn wakeup(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        if self.register_by.is_some_and(|d| now >= d) {
            self.register_by = None;
            self.fatal = Some(self.not_registered(ctx.counters()));
            ctx.client.hangup_all(now);
            self.done = true;
            return;
        }
        if self.deadline.is_some_and(|d| now >= d) {
            self.deadline = None;
            ctx.client.hangup_all(now);
            self.done = true;
            return;
        }
        self.media.on_wakeup(ctx);
        if let Some(e) = self.media.fatal.take() {
            self.fatal = Some(e);
            ctx.client.hangup_all(now);
            self.done = true;
        }
    }
}

/// What the driver last found undecodable on the manager connection. The drivers tell of
/// such a frame only in their log (`bad frame from manager: ...`, then they reconnect) and
/// their `frame_errors` counter, so this log layer keeps the message for the registration
/// deadline's explanation.
#[derive(Clone, Default)]
struct BadFrames(Arc<Mutex<Option<String>>>);

/// The drivers' log message for a frame that did not decode, up to the error.
const BAD_FRAME_LOG: &str = "bad frame from manager: ";

impl BadFrames {
    fn last(&self) -> Option<String> {
        self.0.lock().expect("bad frame lock").clone()
    }

    /// This as a log layer that sees the engine's warnings, whatever `RUST_LOG` says.
    fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer;
        let warnings = tracing_subscriber::filter::filter_fn(|m| {
            *m.level() == tracing::Level::WARN && m.target().starts_with("engine::")
        });
        self.clone().with_filter(warnings.with_max_level_hint(tracing::Level::WARN))
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for BadFrames {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(Option<String>);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        let mut m = Message(None);
        event.record(&mut m);
        if let Some(error) = m.0.as_deref().and_then(|t| t.strip_prefix(BAD_FRAME_LOG)) {
            *self.0.lock().expect("bad frame lock") = Some(error.to_string());
        }
    }
}

/// A frame error, with the length prefix shown as text when its two bytes are printable:
/// `frame length 18516` is "HT", the start of an HTTP server's answer.
fn explain_bad_frame(error: String) -> String {
    let len =
        error.strip_prefix("frame length ").and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok());
    match len.map(u16::to_be_bytes) {
        Some(b) if b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') => {
            let text = String::from_utf8_lossy(&b);
            let guess = if text == "HT" { ", as an HTTP answer begins" } else { "" };
            format!("{error}; as text those 2 bytes read \"{text}\"{guess}")
        }
        _ => error,
    }
}

/// `--port-mapping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortMappingArg {
    Auto,
    Off,
    Router(std::net::Ipv4Addr),
}

fn port_mapping_arg(s: &str) -> Result<PortMappingArg, String> {
    match s {
        "auto" => Ok(PortMappingArg::Auto),
        "off" => Ok(PortMappingArg::Off),
        ip => ip
            .parse()
            .map(PortMappingArg::Router)
            .map_err(|_| format!("`{ip}` is not auto, off or a router's IPv4 address")),
    }
}

fn main() -> ExitCode {
    let bad_frames = BadFrames::default();
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::registry().with(engine::sys::log_layer("warn")).with(bad_frames.layer()).init();
    }
    let args = Args::parse();
    let id = match ClientId::new(args.id.clone()) {
        Ok(id) => id,
        Err(_) => {
            eprintln!("peer: invalid id {:?} (1-64 bytes, no spaces or control characters)", args.id);
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(run(args, id, bad_frames))
}

async fn run(args: Args, id: ClientId, bad_frames: BadFrames) -> ExitCode {
    let managers = args.manager.addrs.clone();
    let manager = managers[0];
    let tls = if args.tls {
        let trust = match (&args.ca, args.pin) {
            (Some(ca), _) => engine::tls::Trust::Ca(ca.clone()),
            (None, Some(pin)) => engine::tls::Trust::Pin(pin),
            (None, None) => {
                eprintln!(
                    "peer: --tls needs --ca PEM or --pin SHA256 to trust the manager's certificate (there are no \
                     system roots)"
                );
                return ExitCode::from(2);
            }
        };
        match engine::tls::ClientTls::new(&trust, &args.manager.host) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("peer: --tls: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let io = match engine::driver::Io::choose(&args.io) {
        Ok(io) => io,
        Err(e) => {
            eprintln!("peer: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(io = io.as_str(), "udp io");
    let bound = match args.bind {
        Some(a) => tokio::net::UdpSocket::bind(a).await.map_err(|e| (a, e)),
        // Dual stack where the host has IPv6; else IPv4 alone.
        None => match tokio::net::UdpSocket::bind("[::]:0").await {
            Ok(s) => Ok(s),
            Err(_) => tokio::net::UdpSocket::bind("0.0.0.0:0").await.map_err(|e| ("0.0.0.0:0".parse().unwrap(), e)),
        },
    };
    let udp = match bound {
        Ok(s) => s,
        Err((a, e)) => {
            eprintln!("peer: cannot bind UDP {a}: {e}");
            return ExitCode::from(2);
        }
    };
    let local = udp.local_addr().expect("bound socket has an address");
    let mut cfg = ClientConfig::new(id, local.port());
    cfg.key_seed = engine::entropy::secure_key();
    cfg.srtp_suites = match (&args.srtp_suite, args.no_srtp) {
        (_, true) => vec![proto::e2e::SUITE_NONE],
        (Some(s), false) => s.0.clone(),
        (None, false) => cfg.srtp_suites.clone(),
    };
    cfg.peer_key = args.peer_key;
    if let Some(path) = &args.identity {
        match load_identity(path) {
            Ok(k) => {
                use base64::Engine;
                let public = base64::engine::general_purpose::STANDARD.encode(k.public());
                eprintln!("peer: identity {public}");
                cfg.identity = Some(std::sync::Arc::new(k));
            }
            Err(e) => {
                eprintln!("peer: --identity {e}");
                return ExitCode::from(2);
            }
        }
    }
    cfg.stun_server = Some(manager);
    cfg.auth = args.token;
    cfg.keepalive_interval = Duration::from_secs_f64(args.keepalive);
    cfg.media_timeout = Duration::from_secs_f64(args.media_timeout);
    cfg.start_timeout = Duration::from_secs_f64(args.setup_timeout);
    cfg.first_media_timeout = Duration::from_secs_f64(args.setup_timeout);
    cfg.birthday_sockets = args.birthday_sockets;
    cfg.birthday_rate = args.birthday_rate;
    cfg.birthday_budget = args.birthday_budget;
    cfg.birthday_timeout = Duration::from_secs_f64(args.birthday_timeout);
    if !args.no_host_candidates {
        // The bound address, or every interface's if bound to the unspecified one.
        cfg.host_candidates = if local.ip().is_unspecified() {
            engine::sys::host_addrs(local.port(), manager.ip().is_loopback(), local.is_ipv6())
        } else {
            vec![local]
        };
    }
    let router = match args.port_mapping {
        PortMappingArg::Off => None,
        PortMappingArg::Auto if manager.ip().is_loopback() => None,
        PortMappingArg::Auto => engine::sys::default_gateway_v4(),
        PortMappingArg::Router(ip) => Some(ip),
    };
    if let Some(router) = router {
        let server = SocketAddr::from((router, proto::wire::portmap::PORT));
        let me = match local.ip() {
            std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
            _ => engine::sys::source_ip_towards(server),
        };
        match me {
            Some(ip) => cfg.port_mapping = Some((server, ip)),
            None => tracing::warn!(%router, "no local IPv4 address towards the router: no port mapping"),
        }
    }
    let now = Instant::now();
    // The sound device, if asked for; it stays on this thread (cpal streams are not Send).
    let (audio_in, audio_out) = match args.audio.as_deref() {
        Some(_) => (
            Some(args.audio_in.clone().unwrap_or(AudioIn::Device(None))),
            Some(args.audio_out.clone().unwrap_or(AudioOut::Device(None))),
        ),
        None => (args.audio_in.clone(), args.audio_out.clone()),
    };
    let dev_in = match &audio_in {
        Some(AudioIn::Device(n)) => Some(n.as_deref()),
        _ => None,
    };
    let dev_out = match &audio_out {
        Some(AudioOut::Device(n)) => Some(n.as_deref()),
        _ => None,
    };
    #[cfg(target_os = "linux")]
    let ring_wake = match io {
        driver::Io::Uring => Some(engine::reactor::Wake::new().expect("eventfd")),
        _ => None,
    };
    let tokio_wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let waker = match io {
        driver::Io::Portable => Waker::Tokio(tokio_wake.clone()),
        #[cfg(target_os = "linux")]
        driver::Io::Uring => Waker::Ring(ring_wake.clone().expect("created above")),
    };
    let device = if dev_in.is_some() || dev_out.is_some() {
        match device::open(dev_in, dev_out, waker.clone()) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("peer: sound device: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let media_cfg = MediaConfig {
        audio_in,
        audio_out,
        frame_ms: args.frame_ms,
        rtp_in: args.rtp_in,
        rtp_out: args.rtp_out,
        payload_type: args.rtp_pt,
        jitter_min_ms: args.jitter_min_ms,
        pause: args.pause.map(|(a, f)| (Duration::from_secs_f64(a), Duration::from_secs_f64(f))),
    };
    let media = match Media::new(
        media_cfg,
        now,
        Some(waker),
        device.as_ref().and_then(|d| d.capture.clone()),
        device.as_ref().and_then(|d| d.playback.clone()),
    ) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("peer: {e}");
            return ExitCode::from(2);
        }
    };
    let mut sdp = None;
    if let Some(path) = &args.sdp {
        let (addr, port) = match args.rtp_out {
            Some(a) => (a.ip(), a.port()),
            None => (
                if local.ip().is_unspecified() { std::net::Ipv4Addr::LOCALHOST.into() } else { local.ip() },
                local.port(),
            ),
        };
        let mut st = voice::sdp::SdpStream::opus(addr, port, args.rtp_pt, args.frame_ms);
        if args.rtp_map != "opus/48000/2" {
            st.media = voice::sdp::SdpStream::media_for(&args.rtp_map);
            st.rtpmap = args.rtp_map.clone();
            st.fmtp = None;
            st.ptime = None;
        }
        if args.rtp_out.is_some() || args.no_srtp {
            // Plain RTP arrives there: described now.
            if let Err(e) = std::fs::write(path, st.to_sdp(engine::entropy::seed() >> 1)) {
                eprintln!("peer: --sdp {}: {e}", path.display());
                return ExitCode::from(2);
            }
        } else {
            // SRTP arrives at the media socket: described with the call's key once it is
            // agreed (`PeerApp::write_sdp`).
            sdp = Some((path.clone(), st));
        }
    }
    let register_timeout = Duration::from_secs_f64(args.register_timeout);
    let mut app = PeerApp {
        json: args.json,
        managers: managers.clone(),
        registered_with: None,
        register_timeout,
        register_by: Some(now + register_timeout),
        refused: None,
        stun_unanswered: false,
        bad_frames,
        role_caller: None,
        local_source: None,
        mapping: None,
        mapping_error: None,
        calls_left: None,
        deadline: None,
        media,
        done: false,
        failed: false,
        fatal: None,
        sdp,
    };
    match &args.cmd {
        Cmd::Listen { calls, duration, no_null } => {
            cfg.send_null = !no_null;
            app.calls_left = *calls;
            app.deadline = duration.map(|d| now + Duration::from_secs_f64(d));
        }
        Cmd::Call { callee, duration } => {
            let Ok(callee) = ClientId::new(callee.clone()) else {
                eprintln!("peer: invalid callee id {callee:?}");
                return ExitCode::from(2);
            };
            app.role_caller = Some((callee, Duration::from_secs_f64(*duration)));
        }
    }
    let mut client = Client::new(cfg, engine::entropy::seed());
    // Handlers are installed now, before connecting, so an early SIGTERM still ends the
    // calls cleanly.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let shutdown = async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    };
    let (app, result) = match io {
        driver::Io::Portable => {
            let r = driver::run_with_wake(&mut client, &udp, managers, &mut app, shutdown, Some(tokio_wake), tls)
                .await
                .map(|_| ());
            (app, r)
        }
        #[cfg(target_os = "linux")]
        driver::Io::Uring => {
            // The ring driver runs on a thread of its own; this runtime only waits for the
            // signals and relays them.
            let udp = match udp.into_std() {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("peer: {e}");
                    return ExitCode::from(2);
                }
            };
            let stop = engine::reactor::Stop::new();
            let relay = stop.clone();
            let unit =
                engine::reactor::Unit { client, udp, app, wake: ring_wake, connect_at: None, tls, first_manager: 0 };
            let worker = tokio::task::spawn_blocking(move || {
                engine::reactor::run(vec![unit], managers, Some(&relay), &engine::reactor::ReactorConfig::default())
            });
            tokio::pin!(worker);
            let joined = tokio::select! {
                j = &mut worker => j,
                _ = shutdown => {
                    stop.stop();
                    worker.await
                }
            };
            match joined.expect("reactor thread") {
                Ok(mut done) => {
                    let f = done.pop().expect("one unit");
                    (f.app, f.result.map(|_| ()))
                }
                Err(e) => {
                    eprintln!("peer: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let mut app = app;
    let finished = app.media.finish();
    if let Some(d) = &device {
        use std::sync::atomic::Ordering::Relaxed;
        tracing::info!(
            underruns = d.underruns.load(Relaxed),
            captured = d.captured.load(Relaxed),
            capture_dropped = d.capture_dropped.load(Relaxed),
            playback_dropped = app.media.playback_dropped,
            "sound device closed"
        );
    }
    drop(device);
    if let Err(e) = result {
        eprintln!("peer: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = finished {
        eprintln!("peer: {e}");
        return ExitCode::from(2);
    }
    if let Some(msg) = app.fatal {
        eprintln!("peer: {msg}");
        return ExitCode::from(2);
    }
    if app.failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
