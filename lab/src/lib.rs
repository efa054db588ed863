//! Driver for the firewall lab (`lab/lab.sh`): build a topology of network namespaces
//! with real netfilter/conntrack routers, run the real `manager` and `peer` binaries in it,
//! read the routers' counters and conntrack tables, and always tear it down (on drop, also
//! when a test panics).
#![deny(missing_docs)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How a router treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stateful firewall only.
    Fw,
    /// Firewall plus masquerade (port-preserving when it can).
    Nat,
    /// Firewall plus masquerade fully-random (a new port per flow).
    NatRandom,
    /// A double NAT: this router masquerades (as [`Mode::Nat`]) a carrier-grade segment
    /// (100.64.N.0/24) on which a second NAT router (I1 or I2, mode `nat`) serves the LAN.
    Nat2,
    /// As [`Mode::NatRandom`], plus a port-mapping server (miniupnpd: PCP, NAT-PMP, UPnP
    /// IGD) on the LAN side. Its WAN address is [`R1_WAN_MAP`] / [`R2_WAN_MAP`] (miniupnpd
    /// refuses a reserved one).
    NatMap,
    /// Dual stack: [`Mode::NatRandom`] on IPv4, and an IPv6 LAN (2001:db8:N::/64) routed
    /// without NAT through the same stateful firewall. Peers behind it bind `[::]:PORT`
    /// (one dual-stack socket).
    Dual,
}

impl Mode {
    /// The name `lab.sh` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Fw => "fw",
            Mode::Nat => "nat",
            Mode::NatRandom => "nat-random",
            Mode::Nat2 => "nat2",
            Mode::NatMap => "nat-map",
            Mode::Dual => "dual",
        }
    }

    /// True if the router translates addresses.
    pub fn is_nat(self) -> bool {
        self != Mode::Fw
    }
}

/// The manager's address in the lab (TCP and UDP port 80: signalling passes where only web
/// traffic may leave the LAN).
pub const MANAGER: &str = "198.18.0.1:80";
/// The manager's alternate STUN address (a second IP on its host; the alternate port is 81).
pub const MANAGER_ALT: &str = "198.18.0.2:80";
/// Client A's LAN address (behind r1).
pub const A_IP: &str = "10.1.0.2";
/// Client B's LAN address (behind r2).
pub const B_IP: &str = "10.2.0.2";
/// Client C's LAN address: on A's LAN, behind the same router.
pub const C_IP: &str = "10.1.0.3";
/// Router r1's WAN address.
pub const R1_WAN: &str = "198.18.0.11";
/// Router r2's WAN address.
pub const R2_WAN: &str = "198.18.0.12";
/// Router r1's WAN address in mode [`Mode::NatMap`].
pub const R1_WAN_MAP: &str = "11.0.0.11";
/// Router r2's WAN address in mode [`Mode::NatMap`].
pub const R2_WAN_MAP: &str = "11.0.0.12";

/// A host of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The manager's host.
    Mgr,
    /// Router in front of A.
    R1,
    /// Router in front of B.
    R2,
    /// Client A (the caller in the tests).
    A,
    /// Client B (the callee in the tests).
    B,
    /// Client C, on A's LAN (two peers behind one NAT).
    C,
    /// The inner NAT router in front of A's LAN in mode [`Mode::Nat2`].
    I1,
    /// The inner NAT router in front of B's LAN in mode [`Mode::Nat2`].
    I2,
}

impl Host {
    fn name(self) -> &'static str {
        match self {
            Host::Mgr => "mgr",
            Host::R1 => "r1",
            Host::R2 => "r2",
            Host::A => "a",
            Host::B => "b",
            Host::C => "c",
            Host::I1 => "i1",
            Host::I2 => "i2",
        }
    }
}

/// Where the workspace's built binaries are: next to the running test or binary.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    // Test executables live in target/<profile>/deps.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

fn binary(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!("{} is not built: run `cargo build --workspace` (scripts/test does) first", p.display()))
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lab.sh")
}

/// A running lab; torn down when dropped.
pub struct Lab {
    prefix: String,
    /// Router modes (r1, r2).
    pub modes: (Mode, Mode),
}

/// Errors are strings: every one is a setup problem a person must read.
pub type Result<T> = std::result::Result<T, String>;

impl Lab {
    /// Build a lab with a fresh name prefix. Needs root, iproute2 and nftables.
    pub fn up(a: Mode, b: Mode) -> Result<Lab> {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!("np{}x{}-", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        Lab::up_named(&prefix, a, b)
    }

    /// Build a lab with the given prefix (removing any leftover lab of that name first).
    pub fn up_named(prefix: &str, a: Mode, b: Mode) -> Result<Lab> {
        if !engine::sys::is_root() {
            return Err("the firewall lab needs root (network namespaces and nftables)".into());
        }
        let _ = run(Command::new(script()).args(["down", prefix]));
        run(Command::new(script()).args(["up", prefix, a.as_str(), b.as_str()]))?;
        Ok(Lab { prefix: prefix.to_string(), modes: (a, b) })
    }

    /// A router's WAN address (R1 or R2).
    pub fn wan(&self, r: Host) -> &'static str {
        match (r, self.modes) {
            (Host::R1, (Mode::NatMap, _)) => R1_WAN_MAP,
            (Host::R2, (_, Mode::NatMap)) => R2_WAN_MAP,
            (Host::R2, _) => R2_WAN,
            _ => R1_WAN,
        }
    }

    /// The namespace name of a host.
    pub fn ns(&self, h: Host) -> String {
        format!("{}{}", self.prefix, h.name())
    }

    /// A command running `program` inside host `h`.
    pub fn cmd(&self, h: Host, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(h)]).arg(program);
        c
    }

    /// Start the manager on [`MANAGER`] inside the manager's host.
    pub fn start_manager(&self) -> Result<ManagerProc> {
        self.start_manager_with(&[])
    }

    /// Start the manager as [`Lab::start_manager`] does, with more flags (`--tls-cert`, ...).
    pub fn start_manager_with(&self, extra: &[&str]) -> Result<ManagerProc> {
        let mut child = self
            .cmd(Host::Mgr, binary("manager")?)
            .args(["--listen", MANAGER, "--alt-listen", MANAGER_ALT, "--shards", "2"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn manager: {e}"))?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(std::result::Result::ok) {
                let _ = tx.send(line);
            }
        });
        let p = ManagerProc { proc: Proc { child }, lines: rx };
        match p.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.starts_with("listening ") => Ok(p),
            other => Err(format!("manager did not start: {other:?}")),
        }
    }

    /// Start a `peer` in host `h` (A, B or C) with its media socket on the host's address and
    /// `port` (behind a [`Mode::Dual`] router: `[::]:port`, one dual-stack socket).
    pub fn peer(&self, h: Host, id: &str, port: u16, args: &[&str]) -> Result<Proc> {
        let mode = if h == Host::B { self.modes.1 } else { self.modes.0 };
        let bind = match h {
            _ if mode == Mode::Dual && matches!(h, Host::A | Host::B | Host::C) => format!("[::]:{port}"),
            Host::A => format!("{A_IP}:{port}"),
            Host::B => format!("{B_IP}:{port}"),
            Host::C => format!("{C_IP}:{port}"),
            _ => return Err("peers run on A, B or C".into()),
        };
        let child = self
            .cmd(h, binary("peer")?)
            .args(["--manager", MANAGER, "--id", id, "--bind", &bind])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn peer: {e}"))?;
        Ok(Proc { child })
    }

    /// A router's counters: (udp_drop, tcp_drop, udp_loss) in packets.
    pub fn counters(&self, r: Host) -> Result<Counters> {
        let out = run(Command::new(script()).args(["counters", &self.prefix, r.name()]))?;
        let get = |name: &str| -> u64 {
            out.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0)
        };
        Ok(Counters { udp_drop: get("udp_drop "), tcp_drop: get("tcp_drop "), udp_loss: get("udp_loss ") })
    }

    /// The UDP conntrack table of a router (`conntrack -L -p udp`, IPv4).
    pub fn conntrack_udp(&self, r: Host) -> Result<String> {
        let out = self.cmd(r, "conntrack").args(["-L", "-p", "udp"]).output().map_err(|e| format!("conntrack: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The IPv6 UDP conntrack table of a router (`conntrack -L -f ipv6 -p udp`).
    pub fn conntrack_udp6(&self, r: Host) -> Result<String> {
        let out = self
            .cmd(r, "conntrack")
            .args(["-L", "-f", "ipv6", "-p", "udp"])
            .output()
            .map_err(|e| format!("conntrack: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Empty both routers' conntrack tables (each call of a measurement starts cold).
    pub fn flush_conntrack(&self) -> Result<()> {
        for r in [Host::R1, Host::R2] {
            for family in ["ipv4", "ipv6"] {
                let out = self
                    .cmd(r, "conntrack")
                    .args(["-F", "-f", family])
                    .output()
                    .map_err(|e| format!("conntrack -F: {e}"))?;
                if !out.status.success() {
                    return Err(format!("conntrack -F in {}: {}", r.name(), String::from_utf8_lossy(&out.stderr)));
                }
            }
        }
        Ok(())
    }

    /// Drop `pct`% of the UDP a router forwards (0 clears).
    pub fn set_loss(&self, r: Host, pct: u32) -> Result<()> {
        run(Command::new(script()).args(["loss", &self.prefix, r.name(), &pct.to_string()])).map(|_| ())
    }

    /// Set both routers' conntrack UDP timeouts (unreplied and stream) to `secs`.
    pub fn set_udp_timeout(&self, secs: u32) -> Result<()> {
        run(Command::new(script()).args(["udp-timeout", &self.prefix, &secs.to_string()])).map(|_| ())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = run(Command::new(script()).args(["down", &self.prefix]));
    }
}

/// Router counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Unsolicited UDP dropped by the firewall.
    pub udp_drop: u64,
    /// Unsolicited TCP dropped by the firewall.
    pub tcp_drop: u64,
    /// UDP dropped by the injected-loss rule.
    pub udp_loss: u64,
}

fn run(c: &mut Command) -> Result<String> {
    let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{c:?} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A child process, killed when dropped.
pub struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished peer printed.
#[derive(Debug)]
pub struct PeerOutput {
    /// Exit code.
    pub code: i32,
    /// Its JSON call reports.
    pub calls: Vec<Value>,
    /// Its stderr.
    pub stderr: String,
}

impl Proc {
    /// Wait for the process to exit (bounded by `limit`; killed after it).
    pub fn finish(mut self, limit: Duration) -> PeerOutput {
        let deadline = Instant::now() + limit;
        let code = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break -9;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let calls = out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        PeerOutput { code, calls, stderr: err }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Own a process started by the caller (in a lab host, by [`Lab::cmd`]): killed when
    /// dropped.
    pub fn from_child(child: Child) -> Proc {
        Proc { child }
    }
}

/// The manager process.
pub struct ManagerProc {
    proc: Proc,
    lines: mpsc::Receiver<String>,
}

impl ManagerProc {
    /// SIGTERM; returns the counters it prints on exit.
    pub fn stop(self) -> Result<Value> {
        // `ip netns exec` execs the program, so this pid is the manager's.
        let _ = engine::sys::terminate(self.proc.id());
        let line =
            self.lines.recv_timeout(Duration::from_secs(10)).map_err(|_| "manager printed no counters".to_string())?;
        serde_json::from_str(&line).map_err(|e| format!("manager counters {line:?}: {e}"))
    }
}
