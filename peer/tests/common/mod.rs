//! Helpers shared by the process-level tests: the real binaries, bounded waits, children
//! killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
pub use std::time::{Duration, Instant};

pub use serde_json::Value;

pub fn bin(name: &str) -> PathBuf {
    // `peer` is this package's binary; `manager` is built next to it by
    // `cargo test --workspace` (the README's test command).
    let peer = PathBuf::from(env!("CARGO_BIN_EXE_peer"));
    let p = peer.with_file_name(name);
    assert!(p.exists(), "{} not built; run the tests with `cargo test --workspace`", p.display());
    p
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Wait for exit (bounded); returns (status code, stdout, stderr).
    pub fn finish(mut self, limit: Duration) -> (i32, String, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut out = String::new();
                let mut err = String::new();
                if let Some(mut o) = self.child.stdout.take() {
                    o.read_to_string(&mut out).unwrap();
                }
                if let Some(mut e) = self.child.stderr.take() {
                    e.read_to_string(&mut err).unwrap();
                }
                return (st.code().unwrap_or(-1), out, err);
            }
            assert!(Instant::now() < deadline, "{} did not exit within {limit:?}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The manager, with its `listening ADDR` line read and the rest of stdout collected.
pub struct Manager {
    pub proc: Proc,
    pub addr: String,
    pub rest: mpsc::Receiver<String>,
}

pub fn start_manager() -> Manager {
    start_manager_with(&[])
}

/// The manager with extra arguments.
pub fn start_manager_with(extra: &[&str]) -> Manager {
    start_manager_on("127.0.0.1:0", extra)
}

/// The manager listening on `listen`, with extra arguments.
pub fn start_manager_on(listen: &str, extra: &[&str]) -> Manager {
    let mut child = Command::new(bin("manager"))
        .args(["--listen", listen, "--shards", "2"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn manager");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let proc = Proc { child, name: "manager" };
    let first = rx.recv_timeout(Duration::from_secs(10)).expect("manager prints its address");
    let addr = first.strip_prefix("listening ").expect("first line is `listening ADDR`").to_string();
    Manager { proc, addr, rest: rx }
}

impl Manager {
    /// SIGTERM, then the counters it prints as its last line.
    pub fn stop(self) -> Value {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.proc.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM to the manager");
        let line = self.rest.recv_timeout(Duration::from_secs(10)).expect("manager prints its counters on SIGTERM");
        let (code, _, _) = self.proc.finish(Duration::from_secs(10));
        assert_eq!(code, 0, "manager exits cleanly on SIGTERM");
        serde_json::from_str(&line).expect("counters are JSON")
    }
}

pub fn peer(manager: &str, id: &str, args: &[&str]) -> Proc {
    peer_bound(manager, id, "127.0.0.1:0", args)
}

/// `peer` with its media socket on `bind`.
pub fn peer_bound(manager: &str, id: &str, bind: &str, args: &[&str]) -> Proc {
    let child = Command::new(bin("peer"))
        .args(["--manager", manager, "--id", id, "--bind", bind])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peer");
    Proc { child, name: "peer" }
}

pub fn json_line(out: &str) -> Value {
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 1, "one JSON line per call, got: {out}");
    serde_json::from_str(lines[0]).unwrap()
}

/// Give a just-started listener time to register (STUN plus REGISTER take about a
/// millisecond on loopback; this leaves a wide margin on a loaded machine).
pub fn settle() {
    std::thread::sleep(Duration::from_millis(1000));
}

/// Spawn `cmd` with `args` (stdout and stderr piped) as a [`Proc`].
pub fn spawn(cmd: &str, args: &[&str], name: &'static str) -> Proc {
    let child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd} could not be started ({e}); the README's test command installs it"));
    Proc { child, name }
}

impl Proc {
    /// SIGINT (a tool such as ffmpeg or tshark then finishes its output), then
    /// [`Proc::finish`].
    pub fn interrupt(self, limit: Duration) -> (i32, String, String) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        self.finish(limit)
    }
}

/// Run a command to completion (bounded); panics with its stderr if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let p = spawn(cmd, args, "tool");
    let (code, out, err) = p.finish(Duration::from_secs(120));
    assert_eq!(code, 0, "{cmd} {args:?} failed: {err}");
    out
}

/// A scratch directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("nullpunch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    pub fn path(&self, f: &str) -> String {
        self.0.join(f).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Speech: `text` spoken by espeak-ng, resampled by sox to 48 kHz mono 16-bit.
pub fn speech(dir: &Scratch, name: &str, text: &str) -> String {
    let raw = dir.path(&format!("{name}-espeak.wav"));
    let out = dir.path(&format!("{name}.wav"));
    run("espeak-ng", &["-w", &raw, text]);
    run("sox", &[&raw, "-r", "48000", "-c", "1", "-b", "16", &out]);
    out
}

/// A UDP port on 127.0.0.1 that was free a moment ago (and, if `pair`, the next one too:
/// ffmpeg takes RTP on an even port and RTCP on the one after).
pub fn free_udp_port(pair: bool) -> u16 {
    for _ in 0..200 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = s.local_addr().unwrap().port();
        if !pair {
            return p;
        }
        if p.is_multiple_of(2) && p < u16::MAX && std::net::UdpSocket::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free UDP port pair");
}

/// Wait (bounded) until `path` exists.
pub fn wait_file(path: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !std::path::Path::new(path).exists() {
        assert!(Instant::now() < deadline, "{path} did not appear within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
