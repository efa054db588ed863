//! The io_uring manager's connections live in a table of direct descriptors sized from
//! RLIMIT_NOFILE when the shard starts (a test binary of its own, since it changes this
//! process's limit). When the table is full the shard stops accepting (an accept into a
//! full table would take a connection from the backlog and drop it): the wait is counted,
//! costs no CPU, and the waiting connections are taken once slots free.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use manager::ManagerConfig;

mod common;
use common::{cpu_seconds, wait_for};

#[test]
fn a_full_direct_descriptor_table_pauses_accepts_counts_and_recovers() {
    if !engine::shard::uring::available() {
        panic!("io_uring manager rings cannot be set up on this machine; this test needs them");
    }
    // A 48-slot table, then room for the test's own client sockets.
    engine::sys::limit_nofile(48, false).unwrap();
    let cfg = ManagerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        io: manager::Io::Uring,
        ..Default::default()
    };
    let m = manager::start(cfg).unwrap();
    assert_eq!(m.io(), manager::Io::Uring);
    engine::sys::limit_nofile(4096, false).unwrap();
    let stats = m.stats().clone();
    // More connections than slots: the kernel completes them into the listen backlog.
    let conns: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(m.local_addr()).unwrap()).collect();
    wait_for(&stats, "the table to fill", || stats.connections_accepted.load(Ordering::Relaxed) == 48);
    wait_for(&stats, "the wait to be counted", || stats.accept_errors.load(Ordering::Relaxed) > 0);
    // The process holds fewer descriptors than connections: these are not in its table.
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    assert!(fds < 80 + 48, "{fds} descriptors open: the manager's connections should not be among them");
    let (cpu0, t0, e0) = (cpu_seconds(), Instant::now(), stats.accept_errors.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs(1));
    let (cpu, secs) = (cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
    let errors = stats.accept_errors.load(Ordering::Relaxed) - e0;
    assert!(cpu < 0.25 * secs, "{cpu:.2} s of CPU in {secs:.2} s with a full table");
    assert_eq!(errors, 0, "one wait is counted once, not once per retry");
    assert_eq!(stats.connections_accepted.load(Ordering::Relaxed), 48, "no connection beyond the table");
    assert_eq!(stats.connections_closed.load(Ordering::Relaxed), 0, "no connection dropped");
    // Clients hang up: the manager closes their slots and takes the waiting connections.
    drop(conns);
    wait_for(&stats, "the waiting connections to be accepted", || {
        stats.connections_accepted.load(Ordering::Relaxed) == 80
    });
    wait_for(&stats, "every connection to be closed", || stats.connections_closed.load(Ordering::Relaxed) == 80);
    let fresh: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(m.local_addr()).unwrap()).collect();
    wait_for(&stats, "new connections to be accepted", || stats.connections_accepted.load(Ordering::Relaxed) == 90);
    drop(fresh);
}
