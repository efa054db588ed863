//! The `manager` binary as a user meets it: its log on a pipe, its exit status when the
//! address is taken, and bad flag values refused by name. Every wait is bounded and every
//! child is killed when its guard drops.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn manager(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let child = Command::new(env!("CARGO_BIN_EXE_manager"))
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn manager");
        Proc(child)
    }

    /// Read stdout up to the `listening ADDR` line (bounded); the address.
    fn listening(&mut self) -> String {
        let out = self.0.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).expect("the manager prints `listening ADDR`");
        line.strip_prefix("listening ").unwrap_or_else(|| panic!("first line {line:?}")).to_string()
    }

    /// Wait (bounded) for the exit: (status, stderr bytes).
    fn finish(mut self, limit: Duration) -> (i32, Vec<u8>) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                let mut err = Vec::new();
                self.0.stderr.take().expect("stderr piped").read_to_end(&mut err).unwrap();
                return (st.code().unwrap_or(-1), err);
            }
            assert!(Instant::now() < deadline, "the manager did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn log_lines_on_a_pipe_carry_no_colour_codes() {
    let mut m = Proc::manager(&["--listen", "127.0.0.1:0", "--shards", "1"], &[("RUST_LOG", "info")]);
    m.listening();
    engine::sys::terminate(m.0.id()).expect("SIGTERM");
    let (code, err) = m.finish(Duration::from_secs(10));
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    let text = String::from_utf8_lossy(&err);
    assert!(text.contains("manager listening on tcp and udp"), "an info line was logged: {text}");
    assert!(!err.contains(&0x1b), "no ESC byte in a log written to a pipe: {text:?}");
}

#[test]
fn a_second_manager_on_the_same_port_exits_2_with_the_reason() {
    // A fixed port: free a moment ago; if another process takes it first, try another.
    for _ in 0..20 {
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let mut first = Proc::manager(&["--listen", &addr, "--shards", "1"], &[]);
        let out = first.0.stdout.take().unwrap();
        let mut line = String::new();
        if BufReader::new(out).read_line(&mut line).unwrap_or(0) == 0 {
            continue; // the port was taken in the meantime
        }
        assert_eq!(line.trim(), format!("listening {addr}"));
        let second = Proc::manager(&["--listen", &addr, "--shards", "1"], &[]);
        let (code, err) = second.finish(Duration::from_secs(10));
        let err = String::from_utf8_lossy(&err);
        assert_eq!(code, 2, "a set-up error: {err}");
        assert!(err.contains(&format!("cannot listen on {addr}")) && err.contains("in use"), "{err}");
        return;
    }
    panic!("no free fixed port found");
}

#[test]
fn bad_flag_values_are_refused_by_name_with_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["--shards", "100000"], "--shards"),
        (&["--shards", "-1"], "--shards"),
        (&["--ring-timeout", "0"], "--ring-timeout"),
        (&["--ring-timeout", "nan"], "--ring-timeout"),
        (&["--idle-timeout", "1e12"], "--idle-timeout"),
        (&["--stats-every", "-1"], "--stats-every"),
        (&["--max-connections", "1e12"], "--max-connections"),
        (&["--frames-per-sec", "-1"], "--frames-per-sec"),
        (&["--frames-per-sec", "inf"], "--frames-per-sec"),
        (&["--stun-rate", "NaN"], "--stun-rate"),
        (&["--max-calls-per-conn", "99999999"], "--max-calls-per-conn"),
        (&["--listen", "localhost"], "--listen"),
        (&["--metrics", "1.2.3.4"], "--metrics"),
        (&["--io", "fast"], "--io"),
        (&["token", "--id", "a", "--ttl", "0"], "--ttl"),
        (&["token", "--id", "a", "--ttl", "-1"], "--ttl"),
    ];
    for (args, flag) in cases {
        let (code, err) = Proc::manager(args, &[]).finish(Duration::from_secs(10));
        let err = String::from_utf8_lossy(&err);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: the message names {flag}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
