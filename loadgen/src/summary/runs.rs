//! Recorded runs read back: `loadgen report DIR` re-prints a run from its files, and
//! `loadgen merge --out DIR RUN...` combines runs (for example from several generator
//! machines against one system) by adding their histograms, never by averaging
//! percentiles. Rates are added only for runs that ran at the same time.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::clock;
use super::files::{self, Record};
use super::hist;
use super::metric::{self, Metric};
use super::{Span, Summary};
use crate::error::Error;

/// Summary fields that are counts: a merge adds them.
const COUNTS: [&str; 12] = [
    "calls",
    "calls_ok",
    "calls_failed",
    "late_starts",
    "packets_sent",
    "packets_delivered",
    "frames_skipped",
    "sessions",
    "clients",
    "registered",
    "held",
    "failed",
];

/// Summary fields that are rates: a merge of runs made at the same time adds them.
const RATES: [&str; 4] = ["pps_delivered", "achieved_rate", "target_rate", "register_rate"];

/// The figures `report` shows on its counts line, where the run has them.
const REPORTED: [&str; 15] = [
    "calls",
    "calls_ok",
    "calls_failed",
    "late_starts",
    "sessions",
    "clients",
    "registered",
    "held",
    "samples",
    "missing",
    "pps_delivered",
    "loss_ratio",
    "cpu_cores",
    "rss_mb",
    "p99_ratio",
];

/// Subdirectories that hold runs of their own (`hostile`'s two setup runs), in report order.
const SUB_RUNS: [&str; 2] = ["clean", "attacked"];

fn summary(dir: &Path) -> Result<Value, Error> {
    let path = dir.join("summary.json");
    let s = std::fs::read_to_string(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
    serde_json::from_str(&s).map_err(|source| Error::Json { path, source })
}

/// The scenario a recorded run measured. Soak runs recorded before the evening of
/// 2026-11-24 name themselves `sessions` in `summary.json`; their intervals tell them apart.
fn scenario_of(v: &Value) -> String {
    match field(v, "scenario") {
        s if s == "sessions" && v["intervals"].is_array() => "soak".into(),
        s => s,
    }
}

/// The recorded metrics of the run in `dir`, in report order.
fn histograms(dir: &Path) -> Result<Vec<(Metric, Histogram<u64>)>, Error> {
    let mut out = Vec::new();
    for m in metric::RECORDED {
        let p = dir.join(format!("{}.hlog", m.stem));
        if p.exists() {
            out.push((m, files::read_hlog(&p)?));
        }
    }
    Ok(out)
}

fn table(hs: &[(Metric, Histogram<u64>)]) -> String {
    let mut t = hist::header();
    for (m, h) in hs {
        t.push('\n');
        t.push_str(&hist::line(m.label, h));
    }
    t
}

fn field(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        x => x.to_string(),
    }
}

/// When the run of summary `v` ran, if it recorded it.
fn span_of(v: &Value) -> Option<Span> {
    let at = |k: &str| v[k].as_str().and_then(clock::parse_rfc3339);
    Some(Span { started_at: at("started_at")?, ended_at: at("ended_at")?, interrupted: v["interrupted"] == true })
}

/// `k v` for each of `keys` the summary `v` has a value for, joined by commas.
fn figures(v: &Value, keys: &[&str]) -> String {
    keys.iter().filter(|k| !v[**k].is_null()).map(|k| format!("{k} {}", field(v, k))).collect::<Vec<_>>().join(", ")
}

/// The run's warnings, one `WARNING:` line each, as the run printed them.
fn warnings(v: &Value) -> String {
    let ws = v["warnings"].as_array().map(Vec::as_slice).unwrap_or_default();
    ws.iter().map(|w| format!("WARNING: {}\n", w.as_str().map_or_else(|| w.to_string(), str::to_string))).collect()
}

/// The text of `loadgen report DIR`: the run's scenario, command, times, figures, the
/// percentile table read back from its `.hlog` files and its warnings; then the runs in
/// its subdirectories (`hostile`'s `clean/` and `attacked/`).
pub fn report(dir: &Path) -> Result<Summary, Error> {
    let v = summary(dir)?;
    let hs = histograms(dir)?;
    let subs: Vec<PathBuf> = SUB_RUNS.iter().map(|s| dir.join(s)).filter(|d| d.join("summary.json").exists()).collect();
    if hs.is_empty() && subs.is_empty() {
        return Err(Error::NoHistograms(dir.to_path_buf()));
    }
    let mut text = format!("{}: scenario {}, io {}\n", dir.display(), scenario_of(&v), field(&v, "io"));
    if let Ok(cmd) = std::fs::read_to_string(dir.join("command.txt")) {
        text.push_str(&format!("command: {}\n", cmd.trim_end()));
    }
    match span_of(&v) {
        Some(span) => text.push_str(&span.text()),
        None if v["interrupted"] == true => text.push_str("INTERRUPTED: partial results\n"),
        None => {}
    }
    let line = figures(&v, &REPORTED);
    if !line.is_empty() {
        text.push_str(&line);
        text.push('\n');
    }
    if !hs.is_empty() {
        text.push_str(&table(&hs));
        text.push('\n');
    }
    text.push_str(&warnings(&v));
    for sub in subs {
        text.push('\n');
        text.push_str(&report(&sub)?.text);
    }
    Ok(Summary { json: v, text, all_ok: true, record: None })
}

/// Merge `runs` into `out`: counts and histograms added, percentiles recomputed from the
/// merged histograms, and rates added if the runs ran at the same time (their measured
/// spans overlap). The merged run is written to `out` once its summary is printed.
pub fn merge(runs: &[PathBuf], out: &Path) -> Result<Summary, Error> {
    if runs.len() < 2 {
        return Err(Error::MergeTooFew);
    }
    distinct(runs, out)?;
    let summaries: Vec<Value> = runs.iter().map(|d| summary(d)).collect::<Result<_, _>>()?;
    let first = scenario_of(&summaries[0]);
    if let Some((d, s)) = runs.iter().zip(&summaries).find(|(_, s)| scenario_of(s) != first) {
        return Err(Error::MergeMixed { dir: d.clone(), scenario: scenario_of(s), first_dir: runs[0].clone(), first });
    }
    // Histograms present in every run, added.
    let mut merged: Vec<(Metric, Histogram<u64>)> = Vec::new();
    let per_run: Vec<_> = runs.iter().map(|d| histograms(d)).collect::<Result<_, _>>()?;
    for m in metric::RECORDED {
        let mut total = hist::new_histogram();
        let mut everywhere = true;
        for hs in &per_run {
            match hs.iter().find(|(s, _)| *s == m) {
                Some((_, h)) => total.add(h).map_err(|source| Error::Histogram { what: m.stem.into(), source })?,
                None => everywhere = false,
            }
        }
        if everywhere {
            merged.push((m, total));
        }
    }
    if merged.is_empty() {
        return Err(Error::MergeNothingShared);
    }
    let mut v = json!({
        "scenario": first,
        "merged_from": runs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
    });
    for k in COUNTS {
        if let Some(sum) = sum(&summaries, k) {
            v[k] = sum;
        }
    }
    let spans: Option<Vec<Span>> = summaries.iter().map(span_of).collect();
    let rates = rates(&summaries, runs, spans.as_deref());
    for (k, sum) in &rates.added {
        v[*k] = sum.clone();
    }
    v["rates_added"] = rates.note.is_none().into();
    v["rates_note"] = rates.note.clone().into();
    v["rates_per_run"] = rates.per_run.clone();
    // Loss from the runs' own counts: lost = ratio / (1 - ratio) x delivered.
    let mut lost = 0.0;
    let mut delivered = 0.0;
    for s in &summaries {
        if let (Some(r), Some(d)) = (s["loss_ratio"].as_f64(), s["packets_delivered"].as_f64()) {
            if r < 1.0 {
                lost += r / (1.0 - r) * d;
            }
            delivered += d;
        }
    }
    v["loss_ratio"] = if delivered + lost > 0.0 { json!(lost / (delivered + lost)) } else { Value::Null };
    let get = |m: Metric| merged.iter().find(|(s, _)| *s == m).map(|(_, h)| h);
    let q = |m: Metric, p: f64| hist::num(get(m).and_then(|h| hist::ms_at(h, p)));
    let mx = |m: Metric| hist::num(get(m).and_then(hist::max_ms));
    v["setup_p50_ms"] = q(metric::SETUP, 0.5);
    v["setup_p90_ms"] = q(metric::SETUP, 0.9);
    v["setup_p99_ms"] = q(metric::SETUP, 0.99);
    v["setup_p999_ms"] = q(metric::SETUP, 0.999);
    v["setup_max_ms"] = mx(metric::SETUP);
    v["start_p99_ms"] = q(metric::PLAN_TO_START, 0.99);
    v["latency_p50_ms"] = q(metric::MEDIA_LATENCY, 0.5);
    v["latency_p99_ms"] = q(metric::MEDIA_LATENCY, 0.99);
    v["jitter_p50_ms"] = q(metric::JITTER, 0.5);
    v["jitter_p99_ms"] = q(metric::JITTER, 0.99);
    v["register_p50_ms"] = q(metric::REGISTER, 0.5);
    v["register_p99_ms"] = q(metric::REGISTER, 0.99);
    v["register_max_ms"] = mx(metric::REGISTER);
    v["m2e_p50_ms"] = q(metric::MOUTH_TO_EAR, 0.5);
    v["m2e_p99_ms"] = q(metric::MOUTH_TO_EAR, 0.99);
    // From the first run's start to the last one's end.
    let span = spans.as_ref().map(|s| Span {
        started_at: s.iter().map(|s| s.started_at).min().expect("two runs or more"),
        ended_at: s.iter().map(|s| s.ended_at).max().expect("two runs or more"),
        interrupted: false,
    });
    let interrupted = summaries.iter().any(|s| s["interrupted"] == true);
    match span {
        Some(span) => Span { interrupted, ..span }.set_in(&mut v),
        None => v["interrupted"] = interrupted.into(),
    }
    let warnings: Vec<String> = runs
        .iter()
        .zip(&summaries)
        .flat_map(|(d, s)| {
            let ws = s["warnings"].as_array().cloned().unwrap_or_default();
            ws.into_iter().map(move |w| format!("{}: {}", d.display(), w.as_str().unwrap_or_default()))
        })
        .collect();
    v["warnings"] = warnings.clone().into();

    let mut text = format!("merged {} {first} runs: {}\n", runs.len(), figures(&v, &COUNTS));
    match span {
        Some(span) => text.push_str(&Span { interrupted, ..span }.text()),
        None if interrupted => text.push_str("INTERRUPTED: partial results\n"),
        None => {}
    }
    text.push_str(&rates.text);
    text.push_str(&table(&merged));
    text.push('\n');
    for w in &warnings {
        text.push_str(&format!("WARNING: {w}\n"));
    }

    let title = format!("{} {first} runs merged", runs.len());
    let mut record = Record::new(out, v.clone(), &title, span.map_or_else(SystemTime::now, |s| s.started_at));
    // The machines of the sources, not of the merging one.
    record.machine = runs
        .iter()
        .map(|d| {
            format!(
                "# {}\n{}",
                d.display(),
                std::fs::read_to_string(d.join("machine.txt")).unwrap_or_else(|_| "unknown\n".into())
            )
        })
        .collect();
    record.histograms = merged;
    Ok(Summary { json: v, text, all_ok: true, record: Some(record) })
}

/// Refuse the same run given twice (it would be counted twice), and `out` that is one of
/// the runs (writing it would overwrite that run).
fn distinct(runs: &[PathBuf], out: &Path) -> Result<(), Error> {
    let canonical: Vec<PathBuf> = runs
        .iter()
        .map(|d| std::fs::canonicalize(d).map_err(|source| Error::Read { path: d.clone(), source }))
        .collect::<Result<_, _>>()?;
    for (i, c) in canonical.iter().enumerate() {
        if let Some(j) = canonical[..i].iter().position(|x| x == c) {
            return Err(Error::MergeSameRun { first: runs[j].clone(), again: runs[i].clone() });
        }
    }
    if let Ok(o) = std::fs::canonicalize(out) {
        if let Some(i) = canonical.iter().position(|c| *c == o) {
            return Err(Error::MergeIntoRun(runs[i].clone()));
        }
    }
    Ok(())
}

/// The sum of field `k` over the summaries, if every one has it (an integer if all are).
fn sum(summaries: &[Value], k: &str) -> Option<Value> {
    let vals: Vec<f64> = summaries.iter().filter_map(|s| s[k].as_f64()).collect();
    (vals.len() == summaries.len()).then(|| {
        let sum: f64 = vals.iter().sum();
        if vals.iter().all(|x| x.fract() == 0.0) {
            json!(sum as u64)
        } else {
            json!(sum)
        }
    })
}

/// The rates of a merge.
struct Rates {
    /// The rates added, if the runs ran at the same time.
    added: Vec<(&'static str, Value)>,
    /// Why they were not added (None: they were).
    note: Option<String>,
    /// Each rate, run by run: `{rate: [run 1, run 2, ...]}`.
    per_run: Value,
    /// The text report's lines.
    text: String,
}

/// Add the runs' rates if their spans overlap: runs one after another each ran at their
/// own rate, and their sum is a rate no system saw.
fn rates(summaries: &[Value], runs: &[PathBuf], spans: Option<&[Span]>) -> Rates {
    let present: Vec<&'static str> = RATES.into_iter().filter(|k| summaries.iter().any(|s| !s[*k].is_null())).collect();
    let mut per_run = json!({});
    for k in &present {
        per_run[*k] = summaries.iter().map(|s| s[*k].clone()).collect::<Vec<_>>().into();
    }
    let note = match spans {
        None => Some("rates not added: a run does not record when it ran (started_at, ended_at)".to_string()),
        Some(spans) => {
            let start = spans.iter().map(|s| s.started_at).max().expect("two runs or more");
            let end = spans.iter().map(|s| s.ended_at).min().expect("two runs or more");
            (start >= end).then(|| "rates not added: the runs do not overlap in time".to_string())
        }
    };
    let mut text = String::new();
    let mut added = Vec::new();
    match &note {
        None => {
            added = present.iter().filter_map(|k| sum(summaries, k).map(|s| (*k, s))).collect();
            let line: Vec<String> = added.iter().map(|(k, s)| format!("{k} {s}")).collect();
            if !line.is_empty() {
                text.push_str(&format!("rates added (the runs overlap in time): {}\n", line.join(", ")));
            }
        }
        Some(_) if present.is_empty() => {}
        Some(note) => {
            text.push_str(note);
            text.push('\n');
            for (d, s) in runs.iter().zip(summaries) {
                text.push_str(&format!("  {}: {}\n", d.display(), figures(s, &present)));
            }
        }
    }
    Rates { added, note, per_run, text }
}
