//! `manager::start` on port 0 takes the TCP port the kernel gives and binds UDP to the same
//! number. Here a quarter of the ports the kernel could give are held for UDP, so about one
//! start in four finds its UDP port taken; every start must still succeed on its own.
//!
//! bind(2) with port 0 takes odd ports first (Linux), so the held ports are odd ones: every
//! fourth odd port of `ip_local_port_range`. The chance that 50 starts all miss them (the
//! test passing without the retry) is 0.75^50, about 6e-7; the chance that a start with its
//! 16 attempts fails is 0.25^16 per start, about 1e-8 over the run.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use manager::{start, Io, ManagerConfig};

fn port_range() -> (u16, u16) {
    let r = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("ip_local_port_range");
    let mut it = r.split_whitespace().map(|p| p.parse::<u16>().expect("a port"));
    (it.next().expect("low"), it.next().expect("high"))
}

#[test]
fn fifty_port_0_starts_succeed_while_a_quarter_of_the_kernels_ports_are_held_for_udp() {
    engine::sys::raise_nofile();
    let (lo, hi) = port_range();
    let held: Vec<UdpSocket> =
        (lo..=hi).filter(|p| p % 8 == 1).filter_map(|p| UdpSocket::bind(("127.0.0.1", p)).ok()).collect();
    let odd = (lo..=hi).filter(|p| p % 2 == 1).count();
    assert!(held.len() * 5 >= odd, "held {} of {odd} odd ports", held.len());
    let t = Instant::now();
    for i in 0..50 {
        let cfg = ManagerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            shards: 1,
            io: if i % 2 == 0 { Io::Portable } else { ManagerConfig::default().io },
            ..ManagerConfig::default()
        };
        let h = start(cfg).unwrap_or_else(|e| panic!("start {i} on port 0 failed: {e}"));
        assert_ne!(h.local_addr().port(), 0);
        h.shutdown();
    }
    assert!(t.elapsed() < Duration::from_secs(60), "50 starts took {:?}", t.elapsed());
    drop(held);
}
