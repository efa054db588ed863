//! The summary of a `hostile` run: both setup runs, the p99 ratio, what the attackers did
//! and how the manager answered, and memory before, during and after the attack.

use std::collections::HashMap;

use super::files::Record;
use super::{Span, Summary};
use crate::error::Error;
use crate::hostile::Measured;
use crate::scenario::Output;

/// The summary of a `hostile` run, from what it measured, and with `--out` the record to
/// write: the summary and `report.txt`, and the two setup runs' records under `clean/` and
/// `attacked/`.
pub fn summarize(output: &Output, mut m: Measured) -> Result<Summary, Error> {
    let runs: Vec<Record> = [m.clean.record.take(), m.attacked.record.take()].into_iter().flatten().collect();
    let interrupted = m.interrupted || [&m.clean, &m.attacked].iter().any(|s| s.json["interrupted"] == true);
    let span = Span::new(m.started, m.ended, interrupted);
    let (clean, attacked, counts, memory_of) = (&m.clean, &m.attacked, &m.attack, m.memory_of);
    let (rss_before, rss_max, rss_after) = (m.rss_before_mb, m.rss_max_mb, m.rss_after_mb);
    let get = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let delta = |k: &str| get(&m.after, k).saturating_sub(get(&m.before, k));
    let open_after = get(&m.after, "connections_accepted").saturating_sub(get(&m.after, "connections_closed"));

    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let (p99_clean, p99_attacked) = (num(&clean.json, "setup_p99_ms"), num(&attacked.json, "setup_p99_ms"));
    let ratio = p99_attacked / p99_clean;
    let failed = num(&clean.json, "calls_failed") + num(&attacked.json, "calls_failed");
    let mut json = serde_json::json!({
        "scenario": "hostile",
        "io": clean.json["io"],
        "calls_ok": attacked.json["calls_ok"],
        "calls_failed": attacked.json["calls_failed"],
        "late_starts": attacked.json["late_starts"],
        "setup_p50_ms": attacked.json["setup_p50_ms"],
        "setup_p99_ms": p99_attacked,
        "setup_max_ms": attacked.json["setup_max_ms"],
        "clean_calls_ok": clean.json["calls_ok"],
        "clean_calls_failed": clean.json["calls_failed"],
        "clean_setup_p50_ms": clean.json["setup_p50_ms"],
        "clean_setup_p99_ms": p99_clean,
        "p99_ratio": ratio,
        "pps_delivered": attacked.json["pps_delivered"],
        "loss_ratio": attacked.json["loss_ratio"],
        "latency_p99_ms": attacked.json["latency_p99_ms"],
        "rss_mb": rss_after,
        "rss_of": memory_of,
        "rss_before_attack_mb": rss_before,
        "rss_max_during_attack_mb": rss_max,
        "attack": {
            "random_bytes_connections": counts.random,
            "oversized_prefix_connections": counts.oversized,
            "half_frame_connections": counts.half,
            "idle_connections": counts.idle,
            "register_flood_connections": counts.register,
            "repeated_register_connections": counts.repeat_register,
            "connects_failed": counts.connect_failed,
        },
        "manager": {
            "connections_accepted": delta("connections_accepted"),
            "frames_malformed": delta("frames_malformed"),
            "frames_oversized": delta("frames_oversized"),
            "frames_unexpected": delta("frames_unexpected"),
            "connections_timed_out": delta("connections_timed_out"),
            "connections_flooding": delta("connections_flooding"),
            "registrations": delta("registrations"),
            "connections_open_after": open_after,
        },
    });
    let text = format!(
        "hostile: the same setup run clean, then under attack, one manager (production limits)\n\
         {}\
         clean:    {} ok, {} failed; setup p50 {:.3} ms, p99 {:.3} ms\n\
         attacked: {} ok, {} failed; setup p50 {:.3} ms, p99 {:.3} ms  (p99 ratio {:.2}, limit 2.00)\n\
         attack: {} random-byte, {} oversized-prefix, {} register-flood, {} repeated-register connections; {} half-frame and {} idle connections held\n\
         manager: {} connections, {} malformed, {} oversized, {} timed out, {} closed for flooding, {} registrations; {} open after\n\
         memory ({}): {:.1} MB before, {:.1} MB at most during, {:.1} MB after the attack\n",
        span.text(),
        clean.json["calls_ok"],
        clean.json["calls_failed"],
        num(&clean.json, "setup_p50_ms"),
        p99_clean,
        attacked.json["calls_ok"],
        attacked.json["calls_failed"],
        num(&attacked.json, "setup_p50_ms"),
        p99_attacked,
        ratio,
        counts.random,
        counts.oversized,
        counts.register,
        counts.repeat_register,
        counts.half,
        counts.idle,
        delta("connections_accepted"),
        delta("frames_malformed"),
        delta("frames_oversized"),
        delta("connections_timed_out"),
        delta("connections_flooding"),
        delta("registrations"),
        open_after,
        memory_of,
        rss_before,
        rss_max,
        rss_after,
    );
    span.set_in(&mut json);
    let record = output.dir.as_deref().map(|dir| {
        let mut r = Record::new(dir, json.clone(), "hostile", span.started_at);
        r.report = Some(text.clone());
        r.runs = runs;
        r
    });
    let all_ok = failed == 0.0 && ratio <= 2.0 && !interrupted;
    Ok(Summary { json, text, all_ok, record })
}
