//! Live output while a calls run lasts: one line per interval as it ends, and the same rows
//! in a CSV file if asked (`--live-csv`), so a piped or logged run is never silent until its
//! summary. The lines go to stdout, or to stderr with `--json` (stdout then holds only the
//! summary); on a terminal with the progress bar they are printed above it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::Error;

use super::measure::IntervalSample;

/// Where live rows go.
pub struct Live {
    to_stderr: bool,
    bar: Mutex<Option<indicatif::ProgressBar>>,
    csv: Mutex<Option<(PathBuf, std::fs::File)>>,
    header: Mutex<bool>,
}

/// One row of a `setup` or `sessions` run's live output: what happened in the interval.
#[derive(Debug, Clone, Copy)]
pub struct CallsRow {
    /// The interval's end, seconds from the plan's start.
    pub t_s: f64,
    /// Calls placed in the interval.
    pub placed: u64,
    /// Starts per second over the interval.
    pub rate: f64,
    /// Calls that ended well in the interval.
    pub ok: u64,
    /// Calls that failed in the interval.
    pub failed: u64,
    /// Setup time (planned start to two-way media) of the calls that ended well in the
    /// interval: p50, p99, ms.
    pub setup_ms: [Option<f64>; 2],
    /// Media packets delivered per second.
    pub pps: f64,
}

impl Live {
    /// Live rows on stdout (stderr if `json`), and into `csv` if given (made now, so a bad
    /// path is refused before the run).
    pub fn new(json: bool, csv: Option<&Path>) -> Result<Live, Error> {
        let csv = match csv {
            Some(p) => {
                let f = std::fs::File::create(p)
                    .map_err(|e| Error::Flags(format!("--live-csv {}: cannot be written: {e}", p.display())))?;
                Some((p.to_path_buf(), f))
            }
            None => None,
        };
        Ok(Live { to_stderr: json, bar: Mutex::new(None), csv: Mutex::new(csv), header: Mutex::new(false) })
    }

    /// Print above this progress bar while it is shown.
    pub fn above(&self, bar: Option<indicatif::ProgressBar>) {
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = bar;
    }

    fn line(&self, text: &str) {
        let bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match bar.as_ref() {
            Some(b) if !b.is_finished() => b.println(text),
            _ if self.to_stderr => eprintln!("{text}"),
            _ => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }

    fn csv(&self, header: &str, row: &str) {
        let mut csv = self.csv.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((path, f)) = csv.as_mut() {
            let mut started = self.header.lock().unwrap_or_else(|e| e.into_inner());
            let res = if *started {
                writeln!(f, "{row}")
            } else {
                *started = true;
                writeln!(f, "{header}\n{row}")
            };
            if let Err(e) = res.and_then(|_| f.flush()) {
                tracing::warn!("--live-csv {}: {e}; no more rows written", path.display());
                *csv = None;
            }
        }
    }

    /// A `setup` or `sessions` interval.
    pub fn calls(&self, r: &CallsRow) {
        let ms = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        self.line(&format!(
            "live t={:>7.1}s  placed {:>6} ({:>7.1}/s)  ok {:>6}  failed {:>4}  setup p50 {:>6} ms  p99 {:>6} ms  media {:>9.0} pkt/s",
            r.t_s,
            r.placed,
            r.rate,
            r.ok,
            r.failed,
            ms(r.setup_ms[0]),
            ms(r.setup_ms[1]),
            r.pps
        ));
        let csv_ms = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.3}"));
        self.csv(
            "t_s,placed,rate_per_s,ok,failed,setup_p50_ms,setup_p99_ms,media_pps",
            &format!(
                "{:.3},{},{:.3},{},{},{},{},{:.1}",
                r.t_s,
                r.placed,
                r.rate,
                r.ok,
                r.failed,
                csv_ms(r.setup_ms[0]),
                csv_ms(r.setup_ms[1]),
                r.pps
            ),
        );
    }

    /// A `soak` interval.
    pub fn interval(&self, s: &IntervalSample) {
        let ms = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        self.line(&format!(
            "live t={:>7.1}s  delivered {:>9.0}/s  loss {:>7.4}%  jitter {:>6} ms  p50 {:>6} ms  p99 {:>6} ms  rss {:>7} MB  fds {:>5}  cores {:.2}",
            s.t_s,
            s.pps,
            s.loss * 100.0,
            ms(s.jitter_ms),
            ms(s.latency_ms[0]),
            ms(s.latency_ms[1]),
            s.rss_mb.map_or("-".into(), |r| format!("{r:.1}")),
            s.fds.map_or("-".into(), |f| f.to_string()),
            s.cores
        ));
        let csv_opt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.3}"));
        self.csv(
            "t_s,delivered_per_s,loss_pct,jitter_ms,latency_p50_ms,latency_p99_ms,latency_max_ms,rss_mb,fds,cores",
            &format!(
                "{:.3},{:.1},{:.5},{},{},{},{},{},{},{:.3}",
                s.t_s,
                s.pps,
                s.loss * 100.0,
                csv_opt(s.jitter_ms),
                csv_opt(s.latency_ms[0]),
                csv_opt(s.latency_ms[1]),
                csv_opt(s.latency_ms[2]),
                csv_opt(s.rss_mb),
                s.fds.map_or(String::new(), |f| f.to_string()),
                s.cores
            ),
        );
    }
}
