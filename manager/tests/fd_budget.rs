//! The manager binary under a small RLIMIT_NOFILE: it caps its connections below the limit,
//! answers the rest with ERROR TooManyConnections, and keeps serving metrics (rather than
//! running out of descriptors, when new connections would wait unanswered).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use proto::wire::frame::{ErrorCode, Frame, FrameDecoder};

/// Run the binary under `ulimit -n 80` with `args`, open `total` connections, and check that
/// `held` are kept and the rest refused, in the metrics too; returns its stderr.
fn budget(args: &str, total: usize, held: usize) -> String {
    let bin = env!("CARGO_BIN_EXE_manager");
    let mut child = Command::new("sh")
        .args(["-c", &format!("ulimit -n 80 && exec {bin} --listen 127.0.0.1:0 --metrics 127.0.0.1:0 {args}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines.next().unwrap().unwrap().strip_prefix("listening ").unwrap().to_string();
    let metrics = lines.next().unwrap().unwrap();
    let host = metrics.strip_prefix("metrics http://").unwrap().split_once('/').unwrap().0.to_string();
    let mut conns: Vec<TcpStream> = (0..total).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    // Shards accept concurrently, so which connections are refused is not fixed: give the
    // refusals time to arrive, then look at every connection without blocking.
    std::thread::sleep(Duration::from_millis(1500));
    let mut refused = 0;
    for c in conns.iter_mut() {
        c.set_nonblocking(true).unwrap();
        let mut dec = FrameDecoder::new();
        let mut buf = [0u8; 256];
        if let Ok(n) = c.read(&mut buf) {
            dec.push(&buf[..n]);
            if let Ok(Some(Frame::Error { code: ErrorCode::TooManyConnections, .. })) = dec.next_frame() {
                refused += 1;
            }
        }
    }
    assert_eq!(refused, total - held, "{args}: every connection past the cap is answered with TooManyConnections");
    let mut s = TcpStream::connect(&host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.contains(&format!("nullpunch_manager_connections_refused_total {}\n", total - held)),
        "{args}: {body}"
    );
    assert!(body.contains(&format!("nullpunch_manager_connections_open {held}\n")), "{args}: {body}");
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    err
}

#[test]
fn the_binary_refuses_connections_past_its_descriptor_budget_and_keeps_serving_metrics() {
    // tokio: every connection is a descriptor; 80 less 32 kept for the manager: 48.
    let err = budget("--shards 1 --io portable", 60, 48);
    assert!(err.contains("at most 48 connections: RLIMIT_NOFILE is 80"), "{err}");
}

#[test]
fn io_uring_connections_do_not_use_the_descriptor_table() {
    // io_uring: connections are direct descriptors, so the manager's own descriptors do
    // not count: 80 connections under a limit of 80 (two shards, 80 slots each).
    let err = budget("--shards 2 --io uring", 100, 80);
    assert!(err.contains("at most 80 connections: RLIMIT_NOFILE is 80 (io_uring"), "{err}");
    // One shard keeps slots for the refusals.
    let err = budget("--shards 1 --io uring", 80, 64);
    assert!(err.contains("at most 64 connections"), "{err}");
}
