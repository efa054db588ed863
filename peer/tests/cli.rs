//! The `peer` binary as a new user meets it: its log on a pipe, bad flag values, old flag
//! spellings, and an address that is not a manager. Loopback only; every wait is bounded
//! and every child is killed when its guard drops.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;

use common::*;

/// A loopback port with nothing listening on it (a listener bound and dropped).
fn dead_port() -> String {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

#[test]
fn log_lines_on_a_pipe_carry_no_colour_codes() {
    let child = std::process::Command::new(bin("peer"))
        .args(["--manager", &dead_port(), "--id", "alice", "--bind", "127.0.0.1:0", "call", "bob"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (code, _, err) = Proc { child, name: "peer" }.finish(Duration::from_secs(10));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("udp io"), "an info line was logged: {err}");
    assert!(!err.contains('\u{1b}'), "no ESC byte in a log written to a pipe: {err:?}");
}

#[test]
fn bad_flag_values_are_refused_by_name_with_exit_2() {
    let m = dead_port();
    let cases: &[(&[&str], &str)] = &[
        (&["--manager", "localhost", "--id", "a", "listen"], "has no port"),
        (&["--manager", "127.0.0.1:99999", "--id", "a", "listen"], "99999 is not a port"),
        (&["--manager", "nosuch.invalid:7480", "--id", "a", "listen"], "cannot resolve `nosuch.invalid`"),
        (&["--manager", "", "--id", "a", "listen"], "--manager"),
        (&["--manager", &m, "--id", "a", "--keepalive", "0", "listen"], "--keepalive"),
        (&["--manager", &m, "--id", "a", "--media-timeout", "-1", "listen"], "--media-timeout"),
        (&["--manager", &m, "--id", "a", "--setup-timeout", "nan", "listen"], "--setup-timeout"),
        (&["--manager", &m, "--id", "a", "--register-timeout", "1e9", "listen"], "--register-timeout"),
        (&["--manager", &m, "--id", "a", "--frame-ms", "30", "listen"], "--frame-ms"),
        (&["--manager", &m, "--id", "a", "--jitter-min-ms", "-5", "listen"], "--jitter-min-ms"),
        (&["--manager", &m, "--id", "a", "--rtp-pt", "128", "listen"], "--rtp-pt"),
        (&["--manager", &m, "--id", "a", "--pause", "-1,2", "listen"], "--pause"),
        (&["--manager", &m, "--id", "a", "--io", "fast", "listen"], "--io"),
        (&["--manager", &m, "--id", "a", "listen", "--calls", "0"], "--calls"),
        (&["--manager", &m, "--id", "a", "listen", "--duration", "-1"], "--duration"),
        (&["--manager", &m, "--id", "a", "call", "bob", "--duration", "inf"], "--duration"),
    ];
    for (args, want) in cases {
        let (code, _, err) = spawn(bin("peer").to_str().unwrap(), args, "peer").finish(Duration::from_secs(10));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: the message says {want:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn the_old_seconds_flag_spellings_still_work() {
    // Accepted (no usage error): the run gets as far as the missing manager.
    let p = peer(
        &dead_port(),
        "alice",
        &[
            "--setup-timeout-secs",
            "2",
            "--keepalive-secs",
            "3",
            "--media-timeout-secs",
            "4",
            "--register-timeout-secs",
            "5",
            "call",
            "bob",
        ],
    );
    let (code, _, err) = p.finish(Duration::from_secs(10));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unreachable"), "{err}");
}

/// Run a peer against `addr` with a 2 s registration deadline; its exit status and stderr,
/// checked to come at the deadline, not before and not long after.
fn until_the_deadline(addr: &str) -> (i32, String) {
    let t = Instant::now();
    let p = spawn(
        bin("peer").to_str().unwrap(),
        &["--manager", addr, "--id", "alice", "--bind", "127.0.0.1:0", "--register-timeout", "2", "listen"],
        "peer",
    );
    let (code, _, err) = p.finish(Duration::from_secs(10));
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(5), "ended after {took:?}: {err}");
    (code, err)
}

#[test]
fn an_http_server_given_as_the_manager_ends_the_peer_at_the_registration_deadline() {
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = http.local_addr().unwrap().to_string();
    // Answers whatever it is sent as a web server would, and closes.
    std::thread::spawn(move || {
        for mut c in http.incoming().map_while(Result::ok) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = c.read(&mut [0u8; 1024]);
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    let (code, err) = until_the_deadline(&addr);
    assert_eq!(code, 2, "{err}");
    let line = err.lines().find(|l| l.starts_with("peer: the manager at")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(&format!("the manager at {addr} did not register us within 2 s")), "{line}");
    assert!(line.contains("not nullpunch signalling (frame length 18516 exceeds the limit"), "{line}");
    assert!(line.contains("\"HT\""), "{line}");
}

#[test]
fn a_listener_that_never_answers_ends_the_peer_at_the_registration_deadline() {
    // The kernel completes the connection from the listen backlog; nothing ever reads.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let (code, err) = until_the_deadline(&addr);
    assert_eq!(code, 2, "{err}");
    let line = err.lines().find(|l| l.starts_with("peer: the manager at")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(&format!("the manager at {addr} did not register us within 2 s")), "{line}");
    assert!(line.contains("it accepted the connection but never answered"), "{line}");
    drop(silent);
}
