//! The summary of a `setup`, `sessions` or `soak` run: setup times by phase from each
//! call's planned start, failures by cause, media, the window and intervals, the host's
//! noise, and the warnings that qualify the figures.

use std::collections::BTreeMap;
use std::time::Duration;

use super::files;
use super::hist::{self, new_histogram, record};
use super::metric::{CALL_TO_INCOMING, INCOMING_TO_START, MEDIA_LATENCY, PLAN_TO_START, SETUP, START_TO_MEDIA};
use super::Summary;
use crate::calls::{growth, Calls, IntervalSample, Measured};
use crate::error::Error;
use crate::fleet;
use crate::scenario::{Output, Soak};
use crate::sys;

/// The summary of `calls`, from what it measured; `--out` writes it with its histograms.
pub fn summarize(calls: Calls<'_>, options: &fleet::Options, output: &Output, m: &Measured) -> Result<Summary, Error> {
    let load = calls.load();
    let (records, incoming, media, media_latency) = (&m.records, &m.incoming, &m.media, &m.media_latency);
    let (window, sleeper, samples, skipped) = (m.window, &m.sleeper, &m.samples, m.frames_skipped);
    let (t0, calls_done, registered_in, wall, cpu, rss) =
        (m.t0, m.calls_done, m.registered_in, m.wall, m.cpu, m.rss_mb);
    let manager_media = m.manager_media;
    let manager_io = m.manager_io;
    let warmup = match calls {
        Calls::Soak(s) => s.warmup,
        _ => Duration::ZERO,
    };
    let grown = calls.interval().and_then(|_| growth(samples, warmup));
    // Memory per session: RSS with every session up, over the RSS after registration
    // (both sides' client state, the manager's call records, the generator's bookkeeping).
    let per_session_kb = match (window.and_then(|w| w.rss_mb), m.rss_registered_mb) {
        (Some(up), Some(base)) if !records.is_empty() => Some((up - base) * 1024.0 / records.len() as f64),
        _ => None,
    };

    // Histograms, from each call's planned start.
    let (mut setup, mut to_start, mut lateness) = (new_histogram(), new_histogram(), new_histogram());
    let (mut call_incoming, mut incoming_start, mut start_media) = (new_histogram(), new_histogram(), new_histogram());
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let (mut ok, mut late, mut very_late) = (0u64, 0u64, 0u64);
    for r in records {
        let l = r.sent.saturating_duration_since(r.planned);
        record(&mut lateness, l);
        if l > Duration::from_millis(1) {
            late += 1;
        }
        if l > Duration::from_millis(5) {
            very_late += 1;
        }
        match (&r.outcome, r.start, r.flowing) {
            (None, Some(start), Some(flowing)) => {
                ok += 1;
                record(&mut to_start, start - r.planned);
                record(&mut setup, flowing - r.planned);
                record(&mut start_media, flowing - start);
                if let Some(inc) = r.call_id.and_then(|id| incoming.get(&id)) {
                    record(&mut call_incoming, inc.saturating_duration_since(r.sent));
                    record(&mut incoming_start, start.saturating_duration_since(*inc));
                }
            }
            (outcome, _, _) => {
                *failures.entry(outcome.clone().unwrap_or_else(|| "incomplete".into())).or_default() += 1;
            }
        }
    }
    let failed = records.len() as u64 - ok;
    let span = calls_done.saturating_duration_since(t0).as_secs_f64().max(1e-9);
    // Achieved start rate: calls placed over the span from the first to the last placement.
    let first_sent = records.iter().map(|r| r.sent).min();
    let last_sent = records.iter().map(|r| r.sent).max();
    let achieved_rate = match (first_sent, last_sent) {
        (Some(a), Some(b)) if b > a => Some((records.len() - 1) as f64 / (b - a).as_secs_f64()),
        _ => None,
    };
    let cpu_share = cpu / wall.as_secs_f64() / sys::cores() as f64;
    let loss =
        if media.received + media.lost > 0 { media.lost as f64 / (media.received + media.lost) as f64 } else { 0.0 };

    let mut warnings = Vec::new();
    if very_late as f64 > records.len() as f64 * 0.01 {
        warnings.push(format!(
            "the generator fell behind its schedule: {very_late} of {} starts were more than 5 ms late (max {:.1} ms); \
             its own overload may inflate the setup times",
            records.len(),
            hist::max_ms(&lateness).unwrap_or(0.0)
        ));
    }
    if skipped > 0 {
        warnings.push(format!(
            "the generator skipped {skipped} media frames because it fell behind its own media clock; \
             they were never sent, so they are not in the loss figure"
        ));
    }
    if cpu_share > 0.9 {
        warnings.push(format!(
            "the machine's CPU was saturated ({:.0}% of {} cores, generator and embedded manager together)",
            cpu_share * 100.0,
            sys::cores()
        ));
    }
    if let Some((rss, fds, false)) = grown {
        warnings.push(format!(
            "memory or descriptors still grew in the second half of the run: RSS {rss:+.1} MB, descriptors {fds:+}; growth without bound fails the soak"
        ));
    }
    if calls.interval().is_some() && grown.is_none() {
        warnings.push("too few intervals after the warm-up to check memory and descriptor growth".into());
    }
    // Host noise seen by a 1 ms sleeper thread: stalls over 5 ms, and the time they took.
    let stalls_5ms = sys::stalls_over_5ms(sleeper.as_ref());
    if let Some(h) = sleeper.as_ref().filter(|_| stalls_5ms > 0) {
        warnings.push(format!(
            "this process's threads waited more than 5 ms for a CPU {stalls_5ms} times (max {:.1} ms, seen by a 1 ms sleeper thread): \
             latency tails of that size are the host's (or this process saturating the cores), not the system under test",
            hist::max_ms(h).unwrap_or(0.0)
        ));
    }

    let mut text = String::new();
    use std::fmt::Write;
    let where_ = &m.manager;
    let _ = writeln!(
        text,
        "nullpunch loadgen setup: {} calls at {}/s, {where_}, {} callers -> {} callees, {:.1} s of media per call, {} io",
        load.calls,
        load.rate,
        load.callers,
        load.callees,
        load.talk.as_secs_f64(),
        options.io.as_str()
    );
    let _ = writeln!(
        text,
        "registered {} clients in {:.0} ms",
        load.callers + load.callees,
        registered_in.as_secs_f64() * 1000.0
    );
    let _ = writeln!(
        text,
        "calls: {ok} ok, {failed} failed ({:.2}% success); late starts (> 1 ms): {late}, start lateness p99 {:.3} ms, max {:.3} ms",
        if records.is_empty() { 0.0 } else { ok as f64 * 100.0 / records.len() as f64 },
        hist::ms_at(&lateness, 0.99).unwrap_or(0.0),
        hist::max_ms(&lateness).unwrap_or(0.0)
    );
    for (why, n) in &failures {
        let _ = writeln!(text, "  failed: {n} x {why}");
    }
    let _ = writeln!(text, "{}", hist::header());
    let _ = writeln!(text, "{}", hist::line("setup (plan -> 2-way media)", &setup));
    let _ = writeln!(text, "{}", hist::line("  plan -> START", &to_start));
    let _ = writeln!(text, "{}", hist::line("  CALL -> INCOMING", &call_incoming));
    let _ = writeln!(text, "{}", hist::line("  INCOMING -> START", &incoming_start));
    let _ = writeln!(text, "{}", hist::line("  START -> 2-way media", &start_media));
    let _ = writeln!(text, "{}", hist::line("media one-way latency", media_latency));
    if !samples.is_empty() {
        let _ = writeln!(
            text,
            "intervals:     t s   delivered/s      loss  jitter ms   p50 ms   p99 ms   max ms   rss MB    fds  cores"
        );
        for x in samples {
            let _ = writeln!(
                text,
                "           {:>7.1}  {:>12.0}  {:>8.5}  {:>9.3}  {:>7.3}  {:>7.3}  {:>7.3}  {:>7.1}  {:>5}  {:>5.2}",
                x.t_s,
                x.pps,
                x.loss,
                x.jitter_ms.unwrap_or(0.0),
                x.latency_ms[0].unwrap_or(0.0),
                x.latency_ms[1].unwrap_or(0.0),
                x.latency_ms[2].unwrap_or(0.0),
                x.rss_mb.unwrap_or(0.0),
                x.fds.unwrap_or(0),
                x.cores
            );
        }
        if let Some((rss, fds, ok)) = grown {
            let _ = writeln!(
                text,
                "growth in the second half (after a {:.0} s warm-up): RSS {rss:+.1} MB, descriptors {fds:+}: {}",
                warmup.as_secs_f64(),
                if ok { "bounded" } else { "GROWING" }
            );
        }
    }
    let _ = writeln!(
        text,
        "media: {} packets sent, {} delivered, {} lost ({:.4}%); manager saw {} media packets",
        media.sent,
        media.received,
        media.lost,
        loss * 100.0,
        manager_media.map(|n| n.to_string()).unwrap_or_else(|| "? (external)".into())
    );
    if let Some(w) = window {
        let _ = writeln!(
            text,
            "steady state ({} {}sessions, {:.1} s window): {:.0} packets/s delivered, {:.2} cores busy, rss {:.1} MB ({:.2} KiB per session)",
            records.len(),
            if calls.idle() { "idle " } else { "" },
            w.secs,
            w.pps,
            w.cores,
            w.rss_mb.unwrap_or(0.0),
            per_session_kb.unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        text,
        "generator: {:.2} s wall, {:.2} s CPU ({:.0}% of {} cores), rss {:.1} MB",
        wall.as_secs_f64(),
        cpu,
        cpu_share * 100.0,
        sys::cores(),
        rss.unwrap_or(0.0)
    );
    if let Some(h) = &sleeper {
        let _ = writeln!(
            text,
            "host noise ({}): a 1 ms sleeper overslept p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; {} stalls over 5 ms",
            if window.is_some() { "window" } else { "run" },
            hist::ms_at(h, 0.5).unwrap_or(0.0),
            hist::ms_at(h, 0.99).unwrap_or(0.0),
            hist::max_ms(h).unwrap_or(0.0),
            stalls_5ms
        );
    }
    for w in &warnings {
        let _ = writeln!(text, "WARNING: {w}");
    }

    let mut json = serde_json::json!({
        // The soak is the windowed run that samples intervals; summary.json, `report` and
        // `merge` read this name, so it is set here and not patched on stdout afterwards.
        "scenario": calls.name(),
        "sessions": window.map(|_| records.len()),
        "window_s": window.map(|w| (w.secs * 100.0).round() / 100.0),
        "cpu_cores": window.map(|w| (w.cores * 1000.0).round() / 1000.0),
        "idle": calls.idle(),
        "io": options.io.as_str(),
        "source_ips": m.source_ips,
        "rss_per_session_kb": hist::num(per_session_kb),
        "calls": records.len(),
        "calls_ok": ok,
        "calls_failed": failed,
        "failures": failures,
        "late_starts": late,
        "start_lateness_p99_ms": hist::num(hist::ms_at(&lateness, 0.99)),
        "target_rate": load.rate,
        "achieved_rate": hist::num(achieved_rate),
        "setup_p50_ms": hist::num(hist::ms_at(&setup, 0.5)),
        "setup_p90_ms": hist::num(hist::ms_at(&setup, 0.9)),
        "setup_p99_ms": hist::num(hist::ms_at(&setup, 0.99)),
        "setup_p999_ms": hist::num(hist::ms_at(&setup, 0.999)),
        "setup_max_ms": hist::num(hist::max_ms(&setup)),
        "start_p99_ms": hist::num(hist::ms_at(&to_start, 0.99)),
        "pps_delivered": window.map(|w| w.pps).unwrap_or(media.received as f64 / span).round(),
        "packets_sent": media.sent,
        "frames_skipped": skipped,
        "packets_delivered": media.received,
        "loss_ratio": loss,
        // Delivered over sent: also sees packets lost after the last one received (which
        // RFC 3550 loss cannot), but counts packets still in flight at hang-up as missing.
        "delivery_ratio": if media.sent > 0 { Some(media.received as f64 / media.sent as f64) } else { None },
        "latency_p50_ms": hist::num(hist::ms_at(media_latency, 0.5)),
        "latency_p99_ms": hist::num(hist::ms_at(media_latency, 0.99)),
        "manager_media_packets": manager_media,
        "cpu_share": (cpu_share * 1000.0).round() / 1000.0,
        "sleeper_oversleep_p99_ms": hist::num(sleeper.as_ref().and_then(|h| hist::ms_at(h, 0.99))),
        "sleeper_oversleep_max_ms": hist::num(sleeper.as_ref().and_then(hist::max_ms)),
        "sleeper_stalls_over_5ms": stalls_5ms,
        "rss_mb": hist::num(window.and_then(|w| w.rss_mb).or(rss)),
        "warnings": warnings,
        "intervals": (!samples.is_empty()).then(|| samples.iter().map(interval_json).collect::<Vec<_>>()),
        "rss_growth_mb": hist::num(grown.map(|g| g.0)),
        "fd_growth": grown.map(|g| g.1),
        "growth_ok": grown.map(|g| g.2),
    });
    // First connections that waited for a local port (a previous run's TIME_WAITs).
    json["port_waits"] = m.port_waits.into();
    json["manager_io"] = manager_io.into();
    if let Calls::Soak(Soak { churn, .. }) = calls {
        json["churn"] = (*churn).into();
    }
    if let Some(dir) = &output.dir {
        let metrics = [
            (SETUP, &setup),
            (PLAN_TO_START, &to_start),
            (CALL_TO_INCOMING, &call_incoming),
            (INCOMING_TO_START, &incoming_start),
            (START_TO_MEDIA, &start_media),
            (MEDIA_LATENCY, media_latency),
        ];
        let held = window.map_or(0.0, |w| w.secs);
        let title = match calls {
            Calls::Soak(_) => {
                format!("soak, {} calls set up at {}/s, held {:.0} s ({} ok)", load.calls, load.rate, held, ok)
            }
            Calls::Sessions(_) => {
                format!("sessions, {} calls set up at {}/s, held {:.0} s ({} ok)", load.calls, load.rate, held, ok)
            }
            Calls::Setup(_) => format!("call setup, {} calls at {}/s ({} ok)", load.calls, load.rate, ok),
        };
        files::write_run(dir, &json, &metrics, &title).map_err(Error::write(dir))?;
        if !samples.is_empty() {
            files::write_intervals(dir, samples).map_err(Error::write(dir))?;
        }
        let _ = writeln!(text, "results written to {}", dir.display());
    }
    let growth_ok = calls.interval().is_none() || grown.is_some_and(|g| g.2);
    Ok(Summary { json, text, all_ok: failed == 0 && !records.is_empty() && growth_ok })
}

/// One soak interval in the summary JSON.
fn interval_json(x: &IntervalSample) -> serde_json::Value {
    serde_json::json!({
        "t_s": (x.t_s * 10.0).round() / 10.0,
        "pps": x.pps.round(),
        "loss": x.loss,
        "jitter_ms": hist::num(x.jitter_ms),
        "latency_p50_ms": hist::num(x.latency_ms[0]),
        "latency_p99_ms": hist::num(x.latency_ms[1]),
        "latency_max_ms": hist::num(x.latency_ms[2]),
        "rss_mb": hist::num(x.rss_mb),
        "fds": x.fds,
        "cores": (x.cores * 1000.0).round() / 1000.0,
    })
}
