//! Recorded runs read back: `loadgen report DIR` re-prints a run from its files, and
//! `loadgen merge --out DIR RUN...` combines runs (for example from several generator
//! machines against one system) by adding their histograms, never by averaging
//! percentiles.

use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::files;
use super::hist;
use super::metric::{self, Metric};
use super::Summary;
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

fn summary(dir: &Path) -> Result<Value, Error> {
    let path = dir.join("summary.json");
    let s = std::fs::read_to_string(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
    serde_json::from_str(&s).map_err(|source| Error::Json { path, source })
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

/// The text of `loadgen report DIR`.
pub fn report(dir: &Path) -> Result<Summary, Error> {
    let v = summary(dir)?;
    let hs = histograms(dir)?;
    if hs.is_empty() {
        return Err(Error::NoHistograms(dir.to_path_buf()));
    }
    let mut text = format!("{}: scenario {}, io {}\n", dir.display(), field(&v, "scenario"), field(&v, "io"));
    if let Ok(cmd) = std::fs::read_to_string(dir.join("command.txt")) {
        text.push_str(&format!("command: {}", cmd));
    }
    let mut line = Vec::new();
    for k in [
        "calls",
        "calls_ok",
        "calls_failed",
        "late_starts",
        "registered",
        "held",
        "pps_delivered",
        "loss_ratio",
        "cpu_cores",
        "rss_mb",
    ] {
        if !v[k].is_null() {
            line.push(format!("{k} {}", field(&v, k)));
        }
    }
    text.push_str(&line.join(", "));
    text.push('\n');
    text.push_str(&table(&hs));
    text.push('\n');
    Ok(Summary { json: v, text, all_ok: true })
}

/// Merge `runs` into `out`: counts and rates added, histograms added, percentiles
/// recomputed from the merged histograms.
pub fn merge(runs: &[PathBuf], out: &Path) -> Result<Summary, Error> {
    if runs.len() < 2 {
        return Err(Error::MergeTooFew);
    }
    let summaries: Vec<Value> = runs.iter().map(|d| summary(d)).collect::<Result<_, _>>()?;
    let scenario = summaries[0]["scenario"].clone();
    if let Some((d, s)) = runs.iter().zip(&summaries).find(|(_, s)| s["scenario"] != scenario) {
        return Err(Error::MergeMixed {
            dir: d.clone(),
            scenario: field(s, "scenario"),
            first: field(&summaries[0], "scenario"),
        });
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
    let mut v = json!({ "scenario": scenario, "merged_from": runs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>() });
    for k in COUNTS.iter().chain(RATES.iter()) {
        let vals: Vec<f64> = summaries.iter().filter_map(|s| s[*k].as_f64()).collect();
        if vals.len() == summaries.len() {
            let sum: f64 = vals.iter().sum();
            v[*k] = if vals.iter().all(|x| x.fract() == 0.0) { json!(sum as u64) } else { json!(sum) };
        }
    }
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
    v["register_p50_ms"] = q(metric::REGISTER, 0.5);
    v["register_p99_ms"] = q(metric::REGISTER, 0.99);
    v["register_max_ms"] = mx(metric::REGISTER);
    let metrics: Vec<(Metric, &Histogram<u64>)> = merged.iter().map(|(m, h)| (*m, h)).collect();
    let title = format!("{} runs merged", runs.len());
    files::write_run(out, &v, &metrics, &title).map_err(Error::write(out))?;
    // The machines of the sources, not of the merging one.
    let machines: String = runs
        .iter()
        .map(|d| {
            format!(
                "# {}\n{}",
                d.display(),
                std::fs::read_to_string(d.join("machine.txt")).unwrap_or_else(|_| "unknown\n".into())
            )
        })
        .collect();
    std::fs::write(out.join("machine.txt"), machines).map_err(Error::write(out.join("machine.txt")))?;
    let text = format!(
        "merged {} {} runs into {}: {}\n{}\n",
        runs.len(),
        field(&v, "scenario"),
        out.display(),
        COUNTS
            .iter()
            .filter(|k| !v[**k].is_null())
            .map(|k| format!("{k} {}", field(&v, k)))
            .collect::<Vec<_>>()
            .join(", "),
        table(&merged)
    );
    Ok(Summary { json: v, text, all_ok: true })
}
