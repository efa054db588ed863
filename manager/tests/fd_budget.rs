//! The manager binary under a small RLIMIT_NOFILE: it caps its connections below the limit,
//! answers the rest with ERROR TooManyConnections, and keeps serving metrics (rather than
//! running out of descriptors, when new connections would wait unanswered).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use engine::wire::frame::{ErrorCode, Frame, FrameDecoder};

#[test]
fn the_binary_refuses_connections_past_its_descriptor_budget_and_keeps_serving_metrics() {
    let bin = env!("CARGO_BIN_EXE_manager");
    let mut child = Command::new("sh")
        .args(["-c", &format!("ulimit -n 80 && exec {bin} --listen 127.0.0.1:0 --shards 1 --metrics 127.0.0.1:0")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines.next().unwrap().unwrap().strip_prefix("listening ").unwrap().to_string();
    let metrics = lines.next().unwrap().unwrap();
    let host = metrics.strip_prefix("metrics http://").unwrap().split_once('/').unwrap().0.to_string();
    // 80 descriptors less 32 kept: 48 connections.
    let mut conns: Vec<TcpStream> = (0..60).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let mut refused = 0;
    for c in conns.iter_mut().skip(48) {
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut dec = FrameDecoder::new();
        let mut buf = [0u8; 256];
        let n = c.read(&mut buf).unwrap();
        dec.push(&buf[..n]);
        if let Ok(Some(Frame::Error { code: ErrorCode::TooManyConnections, .. })) = dec.next_frame() {
            refused += 1;
        }
    }
    assert_eq!(refused, 12, "every connection past the cap is answered with TooManyConnections");
    let mut s = TcpStream::connect(&host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.contains("nullpunch_manager_connections_refused_total 12"), "{body}");
    assert!(body.contains("nullpunch_manager_connections_open 48"), "{body}");
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("at most 48 connections: RLIMIT_NOFILE is 80"), "{err}");
}
