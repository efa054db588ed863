//! Recorded runs read back: `loadgen report DIR` re-prints a run from its files, and
//! `loadgen merge --out DIR RUN...` combines runs (for example from several generator
//! machines against one system) by adding their histograms, never by averaging
//! percentiles.

use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::files as output;
use super::hist as report;
use super::Summary;

/// Metrics in report order: file stem and label.
const METRICS: [(&str, &str); 7] = [
    ("setup", "setup (plan -> 2-way media)"),
    ("plan_to_start", "plan -> START"),
    ("call_to_incoming", "CALL -> INCOMING"),
    ("incoming_to_start", "INCOMING -> START"),
    ("start_to_media", "START -> 2-way media"),
    ("media_latency", "media one-way latency"),
    ("register", "register (plan -> REGISTERED)"),
];

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

fn summary(dir: &Path) -> Result<Value, String> {
    let p = dir.join("summary.json");
    let s = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&s).map_err(|e| format!("{}: {e}", p.display()))
}

/// A recorded metric: its file stem, its label and its histogram.
type Metric = (&'static str, &'static str, Histogram<u64>);

fn histograms(dir: &Path) -> Result<Vec<Metric>, String> {
    let mut out = Vec::new();
    for (stem, label) in METRICS {
        let p = dir.join(format!("{stem}.hlog"));
        if p.exists() {
            out.push((stem, label, output::read_hlog(&p)?));
        }
    }
    Ok(out)
}

fn table(hs: &[(&str, &str, Histogram<u64>)]) -> String {
    let mut t = report::header();
    for (_, label, h) in hs {
        t.push('\n');
        t.push_str(&report::line(label, h));
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
pub fn report(dir: &Path) -> Result<Summary, String> {
    let v = summary(dir)?;
    let hs = histograms(dir)?;
    if hs.is_empty() {
        return Err(format!(
            "{}: no .hlog files (runs recorded before they were written cannot be re-read)",
            dir.display()
        ));
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
pub fn merge(runs: &[PathBuf], out: &Path) -> Result<Summary, String> {
    if runs.len() < 2 {
        return Err("merge needs at least two runs".into());
    }
    let summaries: Vec<Value> = runs.iter().map(|d| summary(d)).collect::<Result<_, _>>()?;
    let scenario = summaries[0]["scenario"].clone();
    if let Some((d, _)) = runs.iter().zip(&summaries).find(|(_, s)| s["scenario"] != scenario) {
        return Err(format!(
            "{} is a {} run, the first is a {scenario} run: merge runs of one scenario",
            d.display(),
            field(&summaries[0], "scenario")
        ));
    }
    // Histograms present in every run, added.
    let mut merged: Vec<(&'static str, &'static str, Histogram<u64>)> = Vec::new();
    let per_run: Vec<_> = runs.iter().map(|d| histograms(d)).collect::<Result<_, _>>()?;
    for (stem, label) in METRICS {
        let mut total = report::new_histogram();
        let mut everywhere = true;
        for hs in &per_run {
            match hs.iter().find(|(s, _, _)| *s == stem) {
                Some((_, _, h)) => total.add(h).map_err(|e| format!("{stem}: {e:?}"))?,
                None => everywhere = false,
            }
        }
        if everywhere {
            merged.push((stem, label, total));
        }
    }
    if merged.is_empty() {
        return Err("the runs share no .hlog metric".into());
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
    let get = |stem: &str| merged.iter().find(|(s, _, _)| *s == stem).map(|(_, _, h)| h);
    let q = |stem: &str, p: f64| report::num(get(stem).and_then(|h| report::ms_at(h, p)));
    let mx = |stem: &str| report::num(get(stem).and_then(report::max_ms));
    v["setup_p50_ms"] = q("setup", 0.5);
    v["setup_p90_ms"] = q("setup", 0.9);
    v["setup_p99_ms"] = q("setup", 0.99);
    v["setup_p999_ms"] = q("setup", 0.999);
    v["setup_max_ms"] = mx("setup");
    v["start_p99_ms"] = q("plan_to_start", 0.99);
    v["latency_p50_ms"] = q("media_latency", 0.5);
    v["latency_p99_ms"] = q("media_latency", 0.99);
    v["register_p50_ms"] = q("register", 0.5);
    v["register_p99_ms"] = q("register", 0.99);
    v["register_max_ms"] = mx("register");
    let metrics: Vec<(&str, &str, &Histogram<u64>)> = merged.iter().map(|(s, l, h)| (*s, *l, h)).collect();
    let title = format!("{} runs merged", runs.len());
    output::write_run(out, &v, &metrics, &title).map_err(|e| format!("writing {}: {e}", out.display()))?;
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
    std::fs::write(out.join("machine.txt"), machines).map_err(|e| e.to_string())?;
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
