//! Many simulated clients need many ports: every client takes an ephemeral UDP port and an
//! ephemeral TCP port from its address, and one address has only `ip_local_port_range` of
//! each. The generator spreads clients over 127.0.0.x when one address runs short. Checked
//! in a network namespace (created here, always removed) whose port range is cut to 400.

use std::process::Command;

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

#[test]
fn clients_spread_over_loopback_addresses_when_one_address_runs_out_of_ports() {
    let ns = Netns::new("spread");
    for io in ["uring", "portable"] {
        let (code, v, out) = register(&ns, io, &[]);
        let v = v.unwrap_or_else(|| panic!("{io}: no JSON summary: {out}"));
        assert_eq!(code, 0, "{io}: {out}");
        // 500 clients, 360 per address (400 ports less a 10% margin): two addresses.
        assert_eq!(v["source_ips"], 2, "{io}: {v}");
        assert_eq!(v["registered"], 500, "{io}: {v}");
        assert_eq!(v["held"], 500, "{io}: {v}");
        assert_eq!(v["manager_connections"], 500, "{io}: every TCP connection got a port: {v}");
        // The manager saw the clients' media sockets at both addresses.
        assert_eq!(v["public_ips_seen"], 2, "{io}: {v}");
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
    assert_eq!((v["source_ips"].as_u64(), v["public_ips_seen"].as_u64(), v["registered"].as_u64()), (Some(4), Some(4), Some(500)), "{v}");
}

#[test]
fn calls_work_between_clients_on_different_addresses() {
    let ns = Netns::new("calls");
    // 600 clients: two addresses; callers and callees on both.
    for io in ["uring", "portable"] {
        let (code, v, out) = ns.loadgen(&[
            "setup", "--calls", "300", "--rate", "600", "--talk", "0.2", "--callers", "300", "--callees", "300", "--io", io, "--json",
        ]);
        let v = v.unwrap_or_else(|| panic!("{io}: no JSON summary: {out}"));
        assert_eq!(code, 0, "{io}: {out}");
        assert_eq!(v["source_ips"], 2, "{io}: {v}");
        assert_eq!(v["calls_ok"], 300, "{io}: {v}");
        assert_eq!(v["loss_ratio"].as_f64(), Some(0.0), "{io}: {v}");
    }
}
