//! The command line as a new user meets it: bad values are refused when the command line is
//! read, with the flag's name and no panic; defaults fit small runs; flags are offered only
//! where they do something; a run that could not write its results is refused before it
//! starts.

use std::process::{Command, Output};

mod common;

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen")).args(args).output().expect("run loadgen")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn bad_numbers_are_refused_with_the_flags_name_and_never_a_panic() {
    // (args, the flag the message must name)
    let cases: &[(&[&str], &str)] = &[
        (&["setup", "--talk=-1"], "--talk"),
        (&["setup", "--talk", "nan"], "--talk"),
        (&["setup", "--calls", "0"], "--calls"),
        (&["setup", "--duration=-1"], "--duration"),
        (&["setup", "--duration", "1e12"], "--duration"),
        (&["setup", "--rate", "0"], "--rate"),
        (&["setup", "--rate", "inf"], "--rate"),
        (&["setup", "--callers", "0"], "--callers"),
        (&["sessions", "--sessions", "0"], "--sessions"),
        (&["sessions", "--duration", "0"], "--duration"),
        (&["soak", "--interval", "0.5"], "--interval"),
        (&["soak", "--churn=-3"], "--churn"),
        (&["register", "--clients", "0"], "--clients"),
        (&["register", "--hold=-1"], "--hold"),
        (&["audio-latency", "--loss", "101"], "--loss"),
        (&["audio-latency", "--period-ms", "50"], "--period-ms"),
        (&["hostile", "--attack-rate=-1"], "--attack-rate"),
    ];
    for (args, flag) in cases {
        let o = loadgen(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: exit {:?}\n{err}", o.status.code());
        assert!(err.contains(flag), "{args:?}: the message does not name {flag}:\n{err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: a refused command line printed a summary");
    }
}

#[test]
fn a_setup_smaller_than_the_default_fleet_runs() {
    // 5 calls: the default 50 callers shrink to 5 (a caller with no call would end before
    // the run starts); more callers than calls, asked for, is still refused.
    let (code, v, err) = common::run(&["setup", "--calls", "5", "--rate", "50", "--talk", "0", "--json"]);
    assert_eq!(code, 0, "{v}\n{err}");
    assert_eq!(v["calls_ok"], 5, "{v}");
    let o = loadgen(&["setup", "--calls", "5", "--callers", "6"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--callers (6) is more than the calls to place (5)"), "{}", stderr(&o));
}

#[test]
fn a_soak_too_short_for_its_growth_check_is_refused_before_it_starts() {
    let o = loadgen(&["soak", "--sessions", "200", "--duration", "20", "--interval", "5"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("leaves 2 interval(s) after the warm-up") && err.contains("use --duration 22 or more"),
        "{err}"
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn an_unusable_out_directory_is_refused_before_the_run() {
    let file = std::env::temp_dir().join(format!("loadgen-out-is-a-file-{}", std::process::id()));
    std::fs::write(&file, b"not a directory").unwrap();
    let o = loadgen(&["setup", "--calls", "600", "--rate", "200", "--talk", "0", "--out", file.to_str().unwrap()]);
    let err = stderr(&o);
    let _ = std::fs::remove_file(&file);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--out") && err.contains("is not a directory"), "{err}");
    // Refused at once: no run, so no summary and no progress of one.
    assert!(o.stdout.is_empty(), "{}", String::from_utf8_lossy(&o.stdout));
    // A directory that does not exist yet is made.
    let dir = std::env::temp_dir().join(format!("loadgen-out-new-{}/run", std::process::id()));
    let (code, _, err) =
        common::run(&["setup", "--calls", "5", "--talk", "0", "--json", "--out", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(dir.join("summary.json").is_file());
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn metrics_are_offered_only_where_they_are_served() {
    for scenario in ["register", "audio-latency", "hostile"] {
        let o = loadgen(&[scenario, "--metrics", "127.0.0.1:0"]);
        assert_eq!(o.status.code(), Some(2), "{scenario}");
        assert!(stderr(&o).contains("unexpected argument '--metrics'"), "{scenario}: {}", stderr(&o));
    }
    for scenario in ["setup", "sessions", "soak"] {
        let help = String::from_utf8_lossy(&loadgen(&[scenario, "--help"]).stdout).to_string();
        assert!(help.contains("--metrics <ADDR>"), "{scenario} --help:\n{help}");
    }
}

#[test]
fn hostile_help_shows_its_own_defaults() {
    let help = String::from_utf8_lossy(&loadgen(&["hostile", "--help"]).stdout).to_string();
    let line = |flag: &str| help.lines().find(|l| l.trim_start().starts_with(flag)).unwrap_or_default().to_string();
    assert!(line("--rate").contains("[default: 500]"), "{help}");
    assert!(line("--duration").contains("[default: 10]"), "{help}");
    assert!(line("--talk").contains("[default: 0]"), "{help}");
}

/// Start `loadgen ARGS` and interrupt it (SIGINT) `after` into the run; its exit code, stdout
/// and stderr. Waits at most 30 s for it to end.
fn interrupted_run(args: &[&str], after: std::time::Duration) -> (Option<i32>, String, String) {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start loadgen");
    std::thread::sleep(after);
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill");
    assert!(kill.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?}: still running 30 s after Ctrl-C");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.code(), out, err)
}

#[test]
fn ctrl_c_stops_placing_calls_hangs_up_and_keeps_a_partial_summary() {
    let dir = std::env::temp_dir().join(format!("loadgen-interrupted-{}", std::process::id()));
    let args =
        ["setup", "--rate", "200", "--duration", "20", "--talk", "0.5", "--json", "--out", dir.to_str().unwrap()];
    let (code, out, err) = interrupted_run(&args, std::time::Duration::from_secs(3));
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no summary after Ctrl-C ({e}):\n{out}\n{err}"));
    // About 2.9 s of the 4,000 planned calls were placed; each ended (hung up) and counted.
    let calls = v["calls"].as_u64().unwrap();
    assert!(calls > 100 && calls < 4000, "{v}");
    assert_eq!(v["calls_ok"].as_u64().unwrap() + v["calls_failed"].as_u64().unwrap(), calls, "{v}");
    assert_eq!(v["interrupted"], true, "{v}");
    // The files are written too, marked the same way.
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!((written["calls"].as_u64(), written["interrupted"].as_bool()), (Some(calls), Some(true)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn thresholds_pass_or_fail_the_run_and_name_themselves() {
    // Unreachable: exit 1, and the failed threshold named with its value.
    let o = loadgen(&["setup", "--calls", "100", "--talk", "0", "--threshold", "setup_p99_ms<0.001"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", stderr(&o));
    assert!(out.contains("threshold setup_p99_ms<0.001:") && out.contains("FAILED"), "{out}");
    // Met: exit 0, and the verdicts in the JSON.
    let (code, v, err) = common::run(&[
        "setup",
        "--calls",
        "100",
        "--talk",
        "0",
        "--json",
        "--threshold",
        "setup_p99_ms<5000",
        "--threshold",
        "calls_failed==0",
    ]);
    assert_eq!(code, 0, "{v}\n{err}");
    assert_eq!(v["thresholds"]["passed"], true, "{v}");
    assert_eq!(v["generator_overloaded"], false, "{v}");
    assert_eq!(v["thresholds"]["checks"].as_array().map(|a| a.len()), Some(2), "{v}");
    // A field the summary does not have fails, and the message lists the ones it has.
    let o = loadgen(&["setup", "--calls", "20", "--talk", "0", "--threshold", "setup_p99<10"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1));
    assert!(out.contains("no numeric field `setup_p99`") && out.contains("setup_p99_ms"), "{out}");
    // A malformed expression is refused before the run.
    let o = loadgen(&["setup", "--threshold", "setup_p99_ms"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--threshold"), "{}", stderr(&o));
}

/// Run `loadgen ARGS` with stdout piped, and every stdout line with the time it arrived.
fn lines_as_they_come(args: &[&str]) -> (Option<i32>, Vec<(std::time::Instant, String)>) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start loadgen");
    let out = child.stdout.take().unwrap();
    let lines: Vec<(std::time::Instant, String)> =
        std::io::BufReader::new(out).lines().map_while(Result::ok).map(|l| (std::time::Instant::now(), l)).collect();
    (child.wait().unwrap().code(), lines)
}

/// The live lines' `t=` (seconds from the run's start) and arrival times.
fn live_times(lines: &[(std::time::Instant, String)]) -> Vec<(f64, std::time::Instant)> {
    lines
        .iter()
        .filter_map(|(at, l)| {
            let t = l.strip_prefix("live t=")?.split('s').next()?.trim().parse::<f64>().ok()?;
            Some((t, *at))
        })
        .collect()
}

#[test]
fn a_piped_soak_prints_each_interval_within_a_second_of_its_end() {
    let (code, lines) = lines_as_they_come(&["soak", "--sessions", "100", "--duration", "30", "--interval", "5"]);
    assert_eq!(code, Some(0), "{lines:?}");
    let live = live_times(&lines);
    assert!(live.len() >= 6, "30 s in 5 s intervals: {lines:?}");
    // Each line's arrival, less its interval's end: the same within a second for all (the
    // first may be late by up to a second, so compare with the earliest).
    let offsets: Vec<f64> =
        live.iter().map(|(t, at)| at.duration_since(live[0].1).as_secs_f64() - (t - live[0].0)).collect();
    let earliest = offsets.iter().cloned().fold(f64::INFINITY, f64::min);
    for ((t, _), o) in live.iter().zip(&offsets) {
        assert!(o - earliest < 1.0, "the interval ending at {t} s came {:.2} s late: {offsets:?}", o - earliest);
    }
    // And they came while the run lasted, not with its summary.
    let summary_at = lines.last().unwrap().0;
    assert!(summary_at.duration_since(live[0].1).as_secs_f64() > 20.0, "{lines:?}");
}

#[test]
fn setup_prints_live_lines_and_writes_them_as_csv() {
    let csv = std::env::temp_dir().join(format!("loadgen-live-{}.csv", std::process::id()));
    let args = [
        "setup",
        "--rate",
        "200",
        "--duration",
        "4",
        "--talk",
        "0",
        "--live-every",
        "1",
        "--live-csv",
        csv.to_str().unwrap(),
    ];
    let (code, lines) = lines_as_they_come(&args);
    assert_eq!(code, Some(0));
    let live = live_times(&lines);
    assert!(live.len() >= 3, "{lines:?}");
    let text = std::fs::read_to_string(&csv).unwrap();
    let _ = std::fs::remove_file(&csv);
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows[0], "t_s,placed,rate_per_s,ok,failed,setup_p50_ms,setup_p99_ms,media_pps");
    assert_eq!(rows.len() - 1, live.len(), "one CSV row per live line: {text}");
    let placed: u64 = rows[1..].iter().map(|r| r.split(',').nth(1).unwrap().parse::<u64>().unwrap()).sum();
    assert_eq!(placed, 800, "every call placed is in exactly one row: {text}");
}

#[test]
fn load_shapes_ramp_spread_and_cap_the_calls() {
    // Stages: up to 200/s over 2 s, hold 2 s, down over 2 s: 800 calls, placed as the ramp says.
    let csv = std::env::temp_dir().join(format!("loadgen-stages-{}.csv", std::process::id()));
    let args = [
        "setup",
        "--stages",
        "2s:200,2s:200,2s:0",
        "--talk",
        "0",
        "--live-every",
        "1",
        "--live-csv",
        csv.to_str().unwrap(),
        "--json",
    ];
    let (code, v, err) = common::run(&args);
    let text = std::fs::read_to_string(&csv).unwrap_or_default();
    let _ = std::fs::remove_file(&csv);
    assert_eq!(code, 0, "{v}\n{err}");
    assert_eq!((v["calls"].as_u64(), v["calls_ok"].as_u64()), (Some(800), Some(800)), "{v}");
    let placed: Vec<u64> = text.lines().skip(1).map(|r| r.split(',').nth(1).unwrap().parse().unwrap()).collect();
    // Seconds 1 and 2 ramp (about 50 and 150), 3 and 4 hold (200 each).
    assert!(placed.len() >= 6 && placed[0] < 100 && placed[2] > 180 && placed[3] > 180, "{text}");

    // Poisson arrivals: the same count and mean rate, uneven gaps.
    let (code, v, err) =
        common::run(&["setup", "--rate", "200", "--duration", "3", "--arrivals", "poisson", "--talk", "0", "--json"]);
    assert_eq!(code, 0, "{v}\n{err}");
    assert_eq!(v["calls_ok"], 600, "{v}");
    let rate = v["achieved_rate"].as_f64().unwrap();
    assert!((150.0..250.0).contains(&rate), "{v}");

    // A cap on calls up at once: 400 calls/s of 1 s each need about 400 up; 50 allowed, so
    // calls wait for room and their waits show as lateness (measured from the plan).
    let capped = |cap: &str| {
        let (code, v, err) = common::run(&[
            "setup",
            "--rate",
            "400",
            "--duration",
            "2",
            "--talk",
            "1",
            "--max-concurrent",
            cap,
            "--json",
        ]);
        assert_eq!(code, 0, "{v}\n{err}");
        assert_eq!(v["calls_ok"], 800, "{v}");
        v["start_lateness_p99_ms"].as_f64().unwrap()
    };
    let (tight, loose) = (capped("50"), capped("100000"));
    assert!(tight > 1000.0, "50 at once: the last calls wait seconds, p99 lateness {tight} ms");
    assert!(loose < 100.0, "no real cap: p99 lateness {loose} ms");
}

#[test]
fn a_bad_manager_address_says_what_is_wrong() {
    for (addr, says) in [
        ("127.0.0.1:99999", "99999 is not a port"),
        ("localhost", "has no port: give HOST:PORT"),
        ("nosuch.invalid:7480", "cannot resolve `nosuch.invalid`"),
        // Each address of a list is checked.
        ("127.0.0.1:7480,localhost", "`localhost` has no port"),
    ] {
        let o = loadgen(&["setup", "--manager", addr]);
        assert_eq!(o.status.code(), Some(2), "{addr}");
        assert!(stderr(&o).contains(says), "{addr}: {}", stderr(&o));
    }
}

/// A `manager` process on 127.0.0.1 (the binary `cargo test --workspace` builds next to
/// loadgen), killed when dropped; SIGTERM makes it print its counters.
struct ManagerProc {
    child: std::process::Child,
    addr: String,
    lines: std::sync::mpsc::Receiver<String>,
}

impl ManagerProc {
    fn start() -> ManagerProc {
        use std::io::BufRead;
        let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_loadgen")).with_file_name("manager");
        assert!(bin.exists(), "{} not built; run the tests with `cargo test --workspace`", bin.display());
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--shards", "1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn manager");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let mut m = ManagerProc { child, addr: String::new(), lines };
        let first = m.lines.recv_timeout(std::time::Duration::from_secs(10)).expect("manager prints its address");
        m.addr = first.strip_prefix("listening ").expect("`listening ADDR`").to_string();
        m
    }

    /// SIGTERM, then its counters (its last line).
    fn counters(self) -> serde_json::Value {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) }, 0);
        let line = self.lines.recv_timeout(std::time::Duration::from_secs(10)).expect("counters on SIGTERM");
        serde_json::from_str(&line).expect("counters are JSON")
    }
}

impl Drop for ManagerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--manager A,B`: client i starts at manager i mod 2, so six clients register three with
/// each. (The two managers here are not one service, so no call is placed across them.)
#[test]
fn a_fleet_given_two_managers_spreads_over_them() {
    let (a, b) = (ManagerProc::start(), ManagerProc::start());
    let list = format!("{},{}", a.addr, b.addr);
    let (code, v, err) = common::run(&["register", "--manager", &list, "--clients", "6", "--hold", "0.2", "--json"]);
    assert_eq!(code, 0, "{err}\n{v}");
    let (ca, cb) = (a.counters(), b.counters());
    assert_eq!(ca["registrations"], 3, "{ca}");
    assert_eq!(cb["registrations"], 3, "{cb}");
}
