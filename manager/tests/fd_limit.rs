//! Descriptor exhaustion, in-process (a test binary of its own, since it lowers this
//! process's RLIMIT_NOFILE): a manager that cannot accept (EMFILE) leaves the connection
//! waiting in the listen backlog, so it must count the failure and pause rather than spin
//! on the same error, and take the waiting connections once descriptors are free.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use manager::ManagerConfig;

mod common;
use common::{cpu_seconds, wait_for};

#[test]
fn out_of_descriptors_the_manager_pauses_counts_and_recovers() {
    engine::sys::limit_nofile(128, true).unwrap();
    // The tokio IO: its connections are descriptors (io_uring's are not; see uring_table.rs).
    let cfg = ManagerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        io: manager::Io::Portable,
        ..Default::default()
    };
    let m = manager::start(cfg).unwrap();
    let stats = m.stats().clone();
    // Clients in this process too: connect until no descriptor is left for another. The
    // kernel completes connections the manager has not accepted into its backlog.
    let mut conns = Vec::new();
    while conns.len() < 200 {
        match TcpStream::connect(m.local_addr()) {
            Ok(c) => conns.push(c),
            Err(_) => break,
        }
    }
    assert!(conns.len() > 20, "only {} connections", conns.len());
    wait_for(&stats, "an accept failure", || stats.accept_errors.load(Ordering::Relaxed) > 0);
    // A second at the limit: an accept loop retrying at once would burn a whole core.
    let (cpu0, t0, e0) = (cpu_seconds(), Instant::now(), stats.accept_errors.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs(1));
    let (cpu, secs) = (cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
    let errors = stats.accept_errors.load(Ordering::Relaxed) - e0;
    assert!(cpu < 0.25 * secs, "{cpu:.2} s of CPU in {secs:.2} s at the descriptor limit");
    assert!(
        errors > 0 && (errors as f64) < 100.0 * secs,
        "{errors} accept errors in {secs:.2} s: paced, about one per 20 ms"
    );
    // Free descriptors (clients hang up, the manager closes its ends): every connection
    // still waiting in the backlog is then taken (there may be none: accept allocates the
    // descriptor before it looks at the backlog, so it fails at the limit either way), and
    // new connections are accepted as before.
    let total = conns.len() as u64;
    conns.clear();
    wait_for(&stats, "the waiting connections to be accepted", || {
        stats.connections_accepted.load(Ordering::Relaxed) == total
    });
    let fresh: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(m.local_addr()).unwrap()).collect();
    wait_for(&stats, "new connections to be accepted", || {
        stats.connections_accepted.load(Ordering::Relaxed) == total + 10
    });
    drop(fresh);
}
