//! Many simulated clients need many ports: every client takes an ephemeral UDP port and an
//! ephemeral TCP port from its address, and one address has only `ip_local_port_range` of
//! each. The generator spreads clients over 127.0.0.x when one address runs short. Checked
//! in a network namespace (created here, always removed) whose port range is cut to 400.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A network namespace with loopback up and a 400-port ephemeral range; deleted on drop
/// (also when a test fails).
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("np-ports-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ok = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip (iproute2) is needed");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ok(&["netns", "add", &name]);
        let ns = Netns(name);
        ok(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ok(&["netns", "exec", &ns.0, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=40000 40399"]);
        ns
    }

    fn loadgen(&self, args: &[&str]) -> (i32, Option<Value>, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_loadgen")])
            .args(args)
            .output()
            .expect("run loadgen");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let v = stdout.lines().last().and_then(|l| serde_json::from_str(l).ok());
        (out.status.code().unwrap_or(-1), v, format!("{stdout}\n{stderr}"))
    }
}

impl Netns {
    /// Run `f` on a thread inside the namespace. Sockets it opens, and threads it starts,
    /// live in the namespace.
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("namespace file");
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in the namespace")
    }

    /// A manager inside the namespace at 127.0.0.1:7000 (outside the ephemeral range).
    fn manager(&self) -> manager::ManagerHandle {
        self.enter(|| {
            let listen: SocketAddr = "127.0.0.1:7000".parse().unwrap();
            manager::start(manager::ManagerConfig { listen, shards: 2, ..Default::default() })
                .expect("manager in the namespace")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn register(ns: &Netns, io: &str, extra: &[&str]) -> (i32, Option<Value>, String) {
    let mut args = vec!["register", "--clients", "500", "--rate", "2000", "--hold", "1", "--io", io, "--json"];
    args.extend_from_slice(extra);
    ns.loadgen(&args)
}

/// 300 calls at 600/s from 300 callers to 300 callees, 0.2 s of media each: 600 clients,
/// four addresses of 180.
fn calls(ns: &Netns, io: &str, extra: &[&str]) -> (i32, Option<Value>, String) {
    let mut args = vec![
        "setup",
        "--calls",
        "300",
        "--rate",
        "600",
        "--talk",
        "0.2",
        "--callers",
        "300",
        "--callees",
        "300",
        "--io",
        io,
        "--json",
    ];
    args.extend_from_slice(extra);
    ns.loadgen(&args)
}

#[test]
fn clients_spread_over_loopback_addresses_when_one_address_runs_out_of_ports() {
    let ns = Netns::new("spread");
    for io in ["uring", "portable"] {
        let (code, v, out) = register(&ns, io, &[]);
        let v = v.unwrap_or_else(|| panic!("{io}: no JSON summary: {out}"));
        assert_eq!(code, 0, "{io}: {out}");
        // 500 clients, 180 per address (the even half of 400 ports, which connect() takes
        // first, less a 10% margin): three addresses.
        assert_eq!(v["source_ips"], 3, "{io}: {v}");
        assert_eq!(v["registered"], 500, "{io}: {v}");
        assert_eq!(v["held"], 500, "{io}: {v}");
        assert_eq!(v["manager_connections"], 500, "{io}: every TCP connection got a port: {v}");
        // The manager saw the clients' media sockets at every address.
        assert_eq!(v["public_ips_seen"], 3, "{io}: {v}");
    }
}

#[test]
fn one_address_for_more_clients_than_it_has_ports_fails_with_the_reason() {
    let ns = Netns::new("short");
    let (code, _, out) = register(&ns, "uring", &["--source-ips", "1"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("no ephemeral port left on 127.0.0.1") && out.contains("--source-ips"), "{out}");
    // Asking for more addresses than needed is fine too.
    let (code, v, out) = register(&ns, "uring", &["--source-ips", "4"]);
    assert_eq!(code, 0, "{out}");
    let v = v.unwrap();
    assert_eq!(
        (v["source_ips"].as_u64(), v["public_ips_seen"].as_u64(), v["registered"].as_u64()),
        (Some(4), Some(4), Some(500)),
        "{v}"
    );
}

#[test]
fn calls_work_between_clients_on_different_addresses() {
    let ns = Netns::new("calls");
    // 600 clients: four addresses (180 each); callers and callees on all.
    for io in ["uring", "portable"] {
        let (code, v, out) = calls(&ns, io, &[]);
        let v = v.unwrap_or_else(|| panic!("{io}: no JSON summary: {out}"));
        assert_eq!(code, 0, "{io}: {out}");
        assert_eq!(v["source_ips"], 4, "{io}: {v}");
        assert_eq!(v["calls_ok"], 300, "{io}: {v}");
        assert_eq!(v["loss_ratio"].as_f64(), Some(0.0), "{io}: {v}");
    }
}

#[test]
fn a_run_right_after_another_waits_for_the_ports_its_predecessor_left_in_time_wait() {
    // 600 clients on two addresses: each run leaves 300 client ports per address in
    // TIME_WAIT towards the manager's fixed port, and the next run needs 300 of the 400
    // again at once. connect() says EADDRNOTAVAIL until loopback's TIME_WAIT reuse allows
    // them (after a second): a wait, not an error.
    let ns = Netns::new("again");
    let _manager = ns.manager();
    for (run, io) in ["uring", "portable", "uring"].into_iter().enumerate() {
        let (code, v, out) = calls(&ns, io, &["--manager", "127.0.0.1:7000", "--source-ips", "2"]);
        let v = v.unwrap_or_else(|| panic!("run {run} ({io}): no JSON summary: {out}"));
        assert_eq!(code, 0, "run {run} ({io}): {out}");
        assert_eq!(v["calls_ok"], 300, "run {run} ({io}): {v}");
        let waits = v["port_waits"].as_u64().unwrap_or_else(|| panic!("run {run}: no port_waits in {v}"));
        eprintln!("run {run} ({io}): {waits} first connections waited for a port");
        if run == 0 {
            assert_eq!(waits, 0, "a fresh namespace has every port free: {v}");
        } else {
            assert!(waits > 0, "run {run} found its predecessor's ports free: the wait was not exercised: {v}");
        }
    }
}

#[test]
fn no_free_port_for_the_manager_connection_fails_after_a_bounded_wait_with_the_reason() {
    let ns = Netns::new("full");
    let _manager = ns.manager();
    // Every ephemeral TCP port of the namespace held by a listener (UDP ports stay free).
    let _held: Vec<TcpListener> =
        ns.enter(|| (40000..40400).map(|p| TcpListener::bind(("127.0.0.1", p)).expect("hold a port")).collect());
    for io in ["uring", "portable"] {
        let t = Instant::now();
        let (code, v, out) = ns.loadgen(&[
            "register",
            "--manager",
            "127.0.0.1:7000",
            "--clients",
            "5",
            "--hold",
            "1",
            "--io",
            io,
            "--json",
        ]);
        let took = t.elapsed();
        assert_ne!(code, 0, "{io}: {out}");
        assert!(
            out.contains("no local port free for a connection from 127.0.0.1 to the manager 127.0.0.1:7000"),
            "{io}: {out}"
        );
        // It waited for a port (5 s), then stopped: no 30 s registration timeout.
        assert!(took >= Duration::from_secs(5) && took < Duration::from_secs(20), "{io}: took {took:?}: {out}");
        let v = v.unwrap_or_else(|| panic!("{io}: no JSON summary: {out}"));
        assert_eq!((v["registered"].as_u64(), v["failed"].as_u64()), (Some(0), Some(5)), "{io}: {v}");
    }
}
