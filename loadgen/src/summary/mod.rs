//! What a run reports: the summary printed at its end (one JSON object or a text report),
//! built per scenario from what it measured (`calls`, `register`, `audio`, `hostile`); the
//! histograms behind it (`hist`, named in `metric`); the files `--out` records (`files`),
//! which `loadgen report` and `loadgen merge` read back (`runs`); wall-clock times in
//! RFC 3339 (`clock`).
//!
//! A scenario builds its [`Summary`] and, with `--out`, the [`files::Record`] to write; it
//! writes nothing itself. [`Summary::print_then_write`] prints the summary and only then
//! writes the files, so a directory that cannot be written never costs the run's summary.
//!
//! The JSON field names are an interface: `results/`, the tests and the scripts read them.

pub mod audio;
pub mod calls;
pub mod clock;
pub mod files;
pub mod hist;
pub mod hostile;
pub mod metric;
pub mod register;
pub mod runs;

use std::fmt::Write as _;
use std::time::{Instant, SystemTime};

use crate::error::Error;

/// A run's summary, ready to print, and what `--out` records of it.
pub struct Summary {
    /// One JSON object with the summary.
    pub json: serde_json::Value,
    /// The human-readable report.
    pub text: String,
    /// True if the run met its goal (every call succeeded, every client held, ...) and ran
    /// to its end.
    pub all_ok: bool,
    /// The files to write once the summary is printed (`--out`); None without `--out`.
    pub record: Option<files::Record>,
}

impl Summary {
    /// Print the summary on stdout (the JSON object on one line, or the text report), then
    /// write its files, if any. The text report then ends with `results written to DIR`.
    /// A write that fails is returned after the summary is printed.
    pub fn print_then_write(&self, json: bool) -> Result<(), Error> {
        self.emit(json, &mut std::io::stdout().lock())
    }

    /// [`Self::print_then_write`] to `out`.
    fn emit(&self, json: bool, out: &mut impl std::io::Write) -> Result<(), Error> {
        // A closed stdout (`| head`) must not stop the files from being written.
        let _ = if json { writeln!(out, "{}", self.json) } else { write!(out, "{}", self.text) };
        let _ = out.flush();
        if let Some(record) = &self.record {
            record.write()?;
            if !json {
                let _ = writeln!(out, "results written to {}", record.dir.display());
            }
        }
        Ok(())
    }
}

/// When a run was measured, on the wall clock, and whether it ran to its end. Every
/// scenario's summary carries it: `started_at` and `ended_at` (RFC 3339, UTC), and
/// `interrupted`.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    /// The start of what the run measured (the plan's start, the first chirp, ...).
    pub started_at: SystemTime,
    /// Its end.
    pub ended_at: SystemTime,
    /// The run was stopped before its end: the figures cover only part of it.
    pub interrupted: bool,
}

impl Span {
    /// The span from `started` to `ended` on this process's monotonic clock.
    pub fn new(started: Instant, ended: Instant, interrupted: bool) -> Span {
        Span { started_at: clock::wall_clock(started), ended_at: clock::wall_clock(ended), interrupted }
    }

    /// Its lines in the text report: `INTERRUPTED: partial results` if it was, and the times.
    pub fn text(&self) -> String {
        let mut s = String::new();
        if self.interrupted {
            s.push_str("INTERRUPTED: partial results\n");
        }
        let secs = self.ended_at.duration_since(self.started_at).unwrap_or_default().as_secs_f64();
        let _ =
            writeln!(s, "run: {} to {} ({secs:.1} s)", clock::rfc3339(self.started_at), clock::rfc3339(self.ended_at));
        s
    }

    /// Set its fields in the summary JSON `json`.
    pub fn set_in(&self, json: &mut serde_json::Value) {
        json["started_at"] = clock::rfc3339(self.started_at).into();
        json["ended_at"] = clock::rfc3339(self.ended_at).into();
        json["interrupted"] = self.interrupted.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_is_printed_before_a_write_that_fails() {
        let base = std::env::temp_dir().join(format!("np-summary-unwritable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        // A directory under a plain file: no one, root included, can create it.
        std::fs::write(base.join("file"), "").unwrap();
        let dir = base.join("file").join("run");
        let json = serde_json::json!({"scenario": "setup", "calls_ok": 3});
        let record = files::Record::new(&dir, json.clone(), "a run", SystemTime::now());
        let summary = Summary { json, text: "calls: 3 ok\n".into(), all_ok: true, record: Some(record) };
        for as_json in [false, true] {
            let mut out = Vec::new();
            let err = summary.emit(as_json, &mut out).expect_err("the directory cannot be made");
            let printed = String::from_utf8(out).unwrap();
            assert!(matches!(err, Error::Write { .. }), "{err}");
            assert!(err.to_string().contains(&*dir.display().to_string()), "{err}");
            if as_json {
                assert_eq!(printed, "{\"calls_ok\":3,\"scenario\":\"setup\"}\n");
            } else {
                assert_eq!(printed, "calls: 3 ok\n", "printed, and no `results written`");
            }
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_summary_with_a_record_is_printed_then_written() {
        let dir = std::env::temp_dir().join(format!("np-summary-written-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let json = serde_json::json!({"scenario": "setup"});
        let record = files::Record::new(&dir, json.clone(), "a run", SystemTime::now());
        let summary = Summary { json, text: "report\n".into(), all_ok: true, record: Some(record) };
        let mut out = Vec::new();
        summary.emit(false, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), format!("report\nresults written to {}\n", dir.display()));
        assert!(dir.join("summary.json").exists() && dir.join("command.txt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_span_says_when_and_whether_it_was_interrupted() {
        let t = Instant::now();
        let mut span = Span::new(t, t + std::time::Duration::from_secs(2), false);
        let mut json = serde_json::json!({});
        span.set_in(&mut json);
        assert_eq!(json["interrupted"], false);
        let (a, b) = (json["started_at"].as_str().unwrap(), json["ended_at"].as_str().unwrap());
        assert!(a.ends_with('Z') && a < b, "{json}");
        assert!(!span.text().contains("INTERRUPTED") && span.text().contains("(2.0 s)"), "{}", span.text());
        span.interrupted = true;
        assert!(span.text().starts_with("INTERRUPTED: partial results\n"));
    }
}
