//! Recorded runs as a new user meets them: every scenario's `--out` directory, `loadgen
//! report` and `loadgen merge` on it, the times and flags its summary carries, and its plots.
//!
//! The scenarios are recorded once (short runs, side by side) and shared by the tests; the
//! directories live under the test target's scratch directory and are replaced on the next
//! run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen")).args(args).output().expect("run loadgen")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn summary(dir: &Path) -> Value {
    let path = dir.join("summary.json");
    let s = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&s).unwrap()
}

/// A recorded run: its directory and what it printed.
struct Run {
    dir: PathBuf,
    stdout: String,
}

/// One recorded run of every scenario.
struct Recorded {
    setup: Run,
    sessions: Run,
    idle: Run,
    soak: Run,
    churn: Run,
    register: Run,
    audio: Run,
    hostile: Run,
}

/// Record every scenario once, side by side (text output, `--out`).
fn recorded() -> &'static Recorded {
    static RUNS: OnceLock<Recorded> = OnceLock::new();
    RUNS.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("loadgen-runs");
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let scenarios: [(&str, &[&str]); 8] = [
            (
                "setup",
                &["setup", "--calls", "60", "--rate", "100", "--talk", "0.3", "--callers", "4", "--callees", "4"],
            ),
            ("sessions", &["sessions", "--sessions", "40", "--duration", "1", "--clients", "4"]),
            ("idle", &["sessions", "--sessions", "40", "--duration", "1", "--clients", "4", "--idle"]),
            // The shortest soaks whose growth check has its three intervals after the warm-up.
            ("soak", &["soak", "--sessions", "40", "--duration", "5", "--interval", "1", "--clients", "4"]),
            ("churn", &["soak", "--sessions", "20", "--churn", "10", "--duration", "4", "--interval", "1"]),
            ("register", &["register", "--clients", "50", "--rate", "500", "--hold", "1"]),
            ("audio", &["audio-latency", "--duration", "2", "--period-ms", "400"]),
            (
                "hostile",
                &["hostile", "--duration", "1", "--rate", "50", "--idle", "10", "--half", "5", "--churn-rate", "5"],
            ),
        ];
        let threads: Vec<_> = scenarios
            .into_iter()
            .map(|(name, args)| {
                let dir = base.join(name);
                let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
                args.extend(["--out".to_string(), dir.display().to_string()]);
                std::thread::spawn(move || {
                    let a: Vec<&str> = args.iter().map(String::as_str).collect();
                    let out = loadgen(&a);
                    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
                    // 1: the run missed its goal (a short hostile run on a busy machine may).
                    assert!(matches!(out.status.code(), Some(0 | 1)), "{args:?}: {stdout}\n{stderr}");
                    assert!(dir.join("summary.json").exists(), "{args:?}: {stdout}\n{stderr}");
                    Run { dir, stdout }
                })
            })
            .collect();
        let mut runs = threads.into_iter().map(|t| t.join().expect("a recorded run"));
        let mut next = || runs.next().unwrap();
        Recorded {
            setup: next(),
            sessions: next(),
            idle: next(),
            soak: next(),
            churn: next(),
            register: next(),
            audio: next(),
            hostile: next(),
        }
    })
}

fn all(r: &Recorded) -> [(&str, &Run); 8] {
    [
        ("setup", &r.setup),
        ("sessions", &r.sessions),
        ("sessions", &r.idle),
        ("soak", &r.soak),
        ("soak", &r.churn),
        ("register", &r.register),
        ("audio-latency", &r.audio),
        ("hostile", &r.hostile),
    ]
}

fn report(dir: &Path) -> (Option<i32>, String, String) {
    let out = loadgen(&["report", dir.to_str().unwrap()]);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// A scratch directory for one test's outputs, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("np-runs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn report_reads_back_every_scenarios_recorded_run() {
    let r = recorded();
    let expect = [
        (&r.setup, vec!["setup (plan -> 2-way media)", "media one-way latency"]),
        (&r.sessions, vec!["setup (plan -> 2-way media)"]),
        (&r.soak, vec!["media one-way latency"]),
        (&r.register, vec!["register (plan -> REGISTERED)"]),
        (&r.audio, vec!["mouth-to-ear", "frame end to jitter buffer"]),
        // The hostile run's two setup runs, under it.
        (&r.hostile, vec!["scenario hostile", "clean: scenario setup", "attacked: scenario setup", "setup (plan"]),
    ];
    for (run, labels) in expect {
        let (code, out, err) = report(&run.dir);
        assert_eq!(code, Some(0), "{}: {out}\n{err}", run.dir.display());
        for l in labels {
            assert!(out.contains(l), "{}: no {l:?} in\n{out}", run.dir.display());
        }
    }
}

#[test]
fn every_summary_says_when_the_run_was_measured_and_that_it_was_not_interrupted() {
    for (scenario, run) in all(recorded()) {
        let v = summary(&run.dir);
        assert_eq!(v["scenario"], scenario, "{v}");
        assert_eq!(v["interrupted"], false, "{scenario}: {v}");
        let (a, b) = (v["started_at"].as_str().unwrap_or(""), v["ended_at"].as_str().unwrap_or(""));
        // RFC 3339 in UTC, from this run: 2026-12-08T14:03:07.123Z.
        for t in [a, b] {
            assert!(t.len() == 24 && t.ends_with('Z') && &t[10..11] == "T", "{scenario}: {t:?} in {v}");
        }
        assert!(a < b, "{scenario}: {a} .. {b}");
        // The text report shows them, and no INTERRUPTED line.
        assert!(run.stdout.contains(&format!("run: {a} to {b}")), "{scenario}: {}", run.stdout);
        assert!(!run.stdout.contains("INTERRUPTED"), "{}", run.stdout);
        assert!(run.stdout.contains("results written to"), "{}", run.stdout);
        let (_, out, _) = report(&run.dir);
        assert!(out.contains(&format!("run: {a} to {b}")), "{out}");
    }
}

#[test]
fn report_prints_the_warnings_as_the_run_did() {
    // A recorded soak, with the warnings a run can print (which ones a short run gets
    // depends on the host): `report` prints each as the run did.
    let run = &recorded().soak;
    let s = Scratch::new("warnings");
    let dir = s.0.join("soak");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(&run.dir).unwrap().map(|e| e.unwrap()) {
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let mut v = summary(&dir);
    let warnings = [
        "the machine's CPU was saturated (95% of 2 cores, generator and embedded manager together)",
        "memory or descriptors still grew in the second half of the run: RSS +9.0 MB, descriptors +0",
    ];
    v["warnings"] = serde_json::json!(warnings);
    std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(&v).unwrap()).unwrap();
    let (code, out, err) = report(&dir);
    assert_eq!(code, Some(0), "{err}");
    for w in warnings {
        assert!(out.contains(&format!("WARNING: {w}")), "{out}");
    }
}

#[test]
fn merge_refuses_runs_of_two_scenarios_naming_each_and_the_same_run_twice() {
    let r = recorded();
    let s = Scratch::new("refuse");
    let out = s.0.join("merged");
    let merge = |a: &Path, b: &Path| {
        let o = loadgen(&["merge", "--out", out.to_str().unwrap(), a.to_str().unwrap(), b.to_str().unwrap()]);
        (o.status.code(), text(&o.stderr))
    };
    // A soak recorded before the soak named itself (its summary.json says `sessions`) is a
    // soak all the same: refused beside a sessions run, and named a soak.
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("../results");
    let old_soak = results.join("2026-11-24-soak-1000x600-direct-descriptors");
    assert_eq!(summary(&old_soak)["scenario"], "sessions", "the recorded soak names itself sessions");
    let (code, err) = merge(&r.sessions.dir, &old_soak);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("{} (a soak run)", old_soak.display())), "{err}");
    // The same run twice, however it is spelled, would count twice.
    let again = r.setup.dir.join(".");
    let (code, err) = merge(&r.setup.dir, &again);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("same run"), "{err}");
    // Runs of two scenarios, each named with its own.
    let (code, err) = merge(&r.setup.dir, &r.soak.dir);
    assert_eq!(code, Some(2), "{err}");
    let (setup, soak) = (r.setup.dir.display(), r.soak.dir.display());
    assert!(err.contains(&format!("{soak} (a soak run)")) && err.contains(&format!("{setup} (a setup run)")), "{err}");
    // And a merge into one of its runs would overwrite it.
    let o = loadgen(&[
        "merge",
        "--out",
        r.setup.dir.to_str().unwrap(),
        r.sessions.dir.to_str().unwrap(),
        r.setup.dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("is one of the runs to merge"), "{}", text(&o.stderr));
    assert!(!out.exists(), "nothing written");
}

/// `loadgen setup` with `--out DIR` (60 calls at 100/s), as a child process.
fn setup_run(dir: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["setup", "--calls", "60", "--rate", "100", "--talk", "0", "--callers", "3", "--callees", "3", "--json"])
        .args(["--out", dir.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_ok(c: std::process::Child) {
    let o = c.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}\n{}", text(&o.stdout), text(&o.stderr));
}

#[test]
fn merge_adds_rates_only_for_runs_that_overlap_in_time() {
    let s = Scratch::new("rates");
    let d = |n: &str| s.0.join(n);
    // One after another.
    wait_ok(setup_run(&d("first")));
    wait_ok(setup_run(&d("then")));
    // At the same time.
    let (a, b) = (setup_run(&d("a")), setup_run(&d("b")));
    wait_ok(a);
    wait_ok(b);
    let merge = |out: &str, x: &str, y: &str| {
        let o = loadgen(&["merge", "--out", d(out).to_str().unwrap(), d(x).to_str().unwrap(), d(y).to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        (summary(&d(out)), text(&o.stdout))
    };
    let rate = |n: &str| summary(&d(n))["achieved_rate"].as_f64().unwrap();

    let (v, out) = merge("sequential", "first", "then");
    assert_eq!(v["rates_added"], false, "{v}");
    assert!(v["achieved_rate"].is_null() && v["target_rate"].is_null(), "{v}");
    assert!(out.contains("rates not added: the runs do not overlap in time"), "{out}");
    // Each run's own rate, reported.
    assert_eq!(v["rates_per_run"]["achieved_rate"], serde_json::json!([rate("first"), rate("then")]), "{v}");
    for n in ["first", "then"] {
        assert!(out.contains(&format!("achieved_rate {}", rate(n))), "{out}");
    }
    // Counts and histograms are merged all the same.
    assert_eq!(v["calls"], 120, "{v}");
    let hgrm = std::fs::read_to_string(d("sequential").join("setup.hgrm")).unwrap();
    assert!(hgrm.contains("Total count    =          120"), "{hgrm}");
    // The merged run spans both.
    assert_eq!(v["started_at"], summary(&d("first"))["started_at"]);
    assert_eq!(v["ended_at"], summary(&d("then"))["ended_at"]);

    let (v, out) = merge("overlapping", "a", "b");
    assert_eq!(v["rates_added"], true, "{v}");
    let sum = v["achieved_rate"].as_f64().unwrap();
    assert!((sum - rate("a") - rate("b")).abs() < 0.01, "{v}");
    assert_eq!(v["target_rate"], 200, "{v}");
    assert!(!out.contains("rates not added"), "{out}");
}

#[test]
fn memory_per_session_is_the_growth_since_registration_over_the_sessions_up_at_once() {
    let r = recorded();
    // A churned soak: 20 sessions up at once, 10 replaced per second, 60 calls in all.
    for (run, sessions) in [(&r.churn, 20.0), (&r.sessions, 40.0), (&r.idle, 40.0)] {
        let v = summary(&run.dir);
        let (up, base, per) = (
            v["rss_mb"].as_f64().unwrap(),
            v["rss_registered_mb"].as_f64().unwrap_or_else(|| panic!("no rss_registered_mb: {v}")),
            v["rss_per_session_kb"].as_f64().unwrap(),
        );
        let want = (up - base) * 1024.0 / sessions;
        assert!((per - want).abs() <= 0.01 * want.abs().max(1.0), "{per} KiB, not {want}: {v}");
        // The text says what the figure is.
        assert!(
            run.stdout.contains("once the clients had registered") && run.stdout.contains("per session on average")
        );
        assert!(run.stdout.contains(&format!("steady state ({sessions} ")), "{}", run.stdout);
    }
    assert!(summary(&r.churn.dir)["calls"].as_u64().unwrap() >= 40, "the churn replaced calls");
}

#[test]
fn the_soak_shows_interval_loss_in_percent_in_its_text_csv_and_plot() {
    let run = &recorded().soak;
    let v = summary(&run.dir);
    let loss: Vec<f64> = v["intervals"].as_array().unwrap().iter().map(|x| x["loss"].as_f64().unwrap()).collect();
    let csv = std::fs::read_to_string(run.dir.join("intervals.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|c| *c == "loss_pct").unwrap_or_else(|| panic!("no loss_pct: {header:?}"));
    let pct: Vec<f64> = lines.map(|l| l.split(',').nth(col).unwrap().parse().unwrap()).collect();
    assert_eq!(pct.len(), loss.len());
    for (p, f) in pct.iter().zip(&loss) {
        assert!((p - f * 100.0).abs() < 1e-3, "{p} % against the fraction {f}");
    }
    assert!(run.stdout.contains("    loss %  jitter ms"), "{}", run.stdout);
    let svg = std::fs::read_to_string(run.dir.join("intervals.svg")).unwrap();
    assert!(svg.contains("% of sent"), "the plot in percent too");
}

/// The text elements of an SVG: (x, anchor, font size, text).
fn svg_texts(svg: &str) -> Vec<(f64, String, f64, String)> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let i = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        Some(tag[i..].split('"').next()?.to_string())
    };
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let (tag, rest) = t.split_once('>')?;
            let body = rest.split("</text>").next()?.trim().to_string();
            let x = attr(tag, "x")?.parse().ok()?;
            let size = attr(tag, "font-size")?.parse().ok()?;
            Some((x, attr(tag, "text-anchor").unwrap_or_else(|| "start".into()), size, body))
        })
        .collect()
}

/// The text `want`'s extent on the x axis (a sans-serif glyph is at most 0.6 em wide on
/// average), which must lie within the SVG's width.
fn assert_inside(svg: &str, want: &str) {
    let width: f64 = svg.split("width=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
    let texts = svg_texts(svg);
    let (x, anchor, size, body) =
        texts.iter().find(|t| t.3.contains(want)).unwrap_or_else(|| panic!("no text {want:?}: {texts:?}"));
    let w = body.chars().count() as f64 * size * 0.6;
    let (left, right) = match anchor.as_str() {
        "middle" => (x - w / 2.0, x + w / 2.0),
        "end" => (x - w, *x),
        _ => (*x, x + w),
    };
    assert!(left >= 0.0 && right <= width, "{body:?} spans {left:.0}..{right:.0} of {width}");
}

#[test]
fn plots_keep_their_labels_inside_and_name_the_run() {
    let r = recorded();
    let latency = std::fs::read_to_string(r.setup.dir.join("latency.svg")).unwrap();
    assert_inside(&latency, "99.999%");
    assert_inside(&latency, "call setup, 60 calls at 100/s");
    let intervals = std::fs::read_to_string(r.soak.dir.join("intervals.svg")).unwrap();
    // The scenario and its parameters, as latency.svg has them.
    assert_inside(&intervals, "soak, 40 calls set up at 1000/s, held 5 s, 1 s intervals");
    let churn = std::fs::read_to_string(r.churn.dir.join("intervals.svg")).unwrap();
    assert_inside(&churn, "(churn 10/s)");
}

#[test]
fn setup_sessions_and_soak_report_the_rfc3550_jitter_of_each_call() {
    let r = recorded();
    for run in [&r.setup, &r.sessions, &r.soak] {
        let v = summary(&run.dir);
        let (p50, p99) = (v["jitter_p50_ms"].as_f64(), v["jitter_p99_ms"].as_f64());
        let (p50, p99) = (p50.unwrap_or_else(|| panic!("{v}")), p99.unwrap_or_else(|| panic!("{v}")));
        // Loopback: well under a frame; and one value per call.
        assert!(0.0 < p50 && p50 <= p99 && p99 < 20.0, "{v}");
        assert!(run.stdout.contains("call jitter (RFC 3550 J)"), "{}", run.stdout);
        let hgrm = std::fs::read_to_string(run.dir.join("jitter.hgrm")).unwrap();
        assert_eq!(v["calls_failed"], 0, "{v}");
        let calls = v["calls_ok"].as_u64().unwrap();
        assert!(hgrm.contains(&format!("Total count    = {calls:>12}")), "{calls} calls: {hgrm}");
    }
    // Idle sessions carry no media: no jitter.
    let v = summary(&r.idle.dir);
    assert!(v["jitter_p50_ms"].is_null() && v["jitter_p99_ms"].is_null(), "{v}");
}

#[test]
fn a_register_flood_counts_its_ids_and_samples_the_embedded_managers_directory() {
    let out = loadgen(&["hostile", "--register-flood", "3000", "--flood-sample-every", "1000", "--json"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let v: Value = serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(
        (v["scenario"].as_str(), v["ids"].as_u64(), v["failed"].as_u64()),
        (Some("register-flood"), Some(3000), Some(0))
    );
    assert_eq!(v["registrations"], 3000, "{v}");
    let samples = v["samples"].as_array().unwrap();
    // Before, at 1000, 2000 and 3000, and after.
    assert!(samples.len() >= 4, "{v}");
    let last = samples.last().unwrap();
    // Every id hung up: all 3000 are tombstones (under the default bound of 100,000).
    assert_eq!((last["directory_entries"].as_u64(), last["directory_tombstones"].as_u64()), (Some(3000), Some(3000)));
    assert!(last["vm_rss_kb"].as_u64().unwrap() > 0 && last["vm_hwm_kb"].as_u64().unwrap() > 0, "{v}");
}
