//! The summary of a `setup`, `sessions` or `soak` run: setup times by phase from each
//! call's planned start, failures by cause, media, the window and intervals, the host's
//! noise, and the warnings that qualify the figures.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::files::{self, Record};
use super::hist::{self, new_histogram, record};
use super::metric::{CALL_TO_INCOMING, INCOMING_TO_START, JITTER, MEDIA_LATENCY, PLAN_TO_START, SETUP, START_TO_MEDIA};
use super::{Span, Summary};
use crate::calls::{growth, Calls, IntervalSample, Measured};
use crate::error::Error;
use crate::fleet;
use crate::scenario::{Output, Soak};
use crate::sys;

/// The summary of `calls`, from what it measured, and with `--out` the record to write.
pub fn summarize(calls: Calls<'_>, options: &fleet::Options, output: &Output, m: &Measured) -> Result<Summary, Error> {
    let p = phases(m);
    let f = figures(calls, m, &p);
    let span = Span::new(m.t0, m.calls_done, m.interrupted);
    let warnings = warnings(calls, m, &p, &f);
    let text = text(calls, options, m, &p, &f, &span, &warnings);
    let mut json = json(calls, options, m, &p, &f, warnings);
    span.set_in(&mut json);
    let growth_ok = calls.interval().is_none() || f.grown.is_some_and(|g| g.2);
    let all_ok = p.failed() == 0 && !m.records.is_empty() && growth_ok && !m.interrupted;
    let title = title(calls, options, m, &p);
    let record = output.dir.as_deref().map(|dir| record_of(dir, m, p, &json, &title, &span));
    Ok(Summary { json, text, all_ok, record })
}

/// The calls by phase, each timed from its planned start, and the failures by cause.
struct Phases {
    /// Planned start to two-way media.
    setup: Histogram<u64>,
    /// The same for calls within one manager and across managers (several managers only).
    setup_same_node: Histogram<u64>,
    setup_cross_node: Histogram<u64>,
    /// Planned start to START.
    to_start: Histogram<u64>,
    /// CALL to INCOMING at the callee.
    call_incoming: Histogram<u64>,
    /// INCOMING to START.
    incoming_start: Histogram<u64>,
    /// START to two-way media.
    start_media: Histogram<u64>,
    /// Planned start to CALL: the generator's own lateness.
    lateness: Histogram<u64>,
    /// RFC 3550 jitter J of the media each caller received, one value per call.
    jitter: Histogram<u64>,
    /// Failed calls by cause.
    failures: BTreeMap<String, u64>,
    /// Calls that succeeded.
    ok: u64,
    /// Calls placed more than 1 ms late.
    late: u64,
    /// Calls placed more than 5 ms late.
    very_late: u64,
    /// All calls.
    calls: u64,
}

impl Phases {
    fn failed(&self) -> u64 {
        self.calls - self.ok
    }
}

/// What calls across managers add to setup at quantile `q`: the difference of the two
/// histograms' values there (None unless both have calls).
fn added(same: &Histogram<u64>, cross: &Histogram<u64>, q: f64) -> Option<f64> {
    Some(hist::ms_at(cross, q)? - hist::ms_at(same, q)?)
}

/// Histograms, from each call's planned start.
fn phases(m: &Measured) -> Phases {
    let mut p = Phases {
        setup: new_histogram(),
        setup_same_node: new_histogram(),
        setup_cross_node: new_histogram(),
        to_start: new_histogram(),
        call_incoming: new_histogram(),
        incoming_start: new_histogram(),
        start_media: new_histogram(),
        lateness: new_histogram(),
        jitter: new_histogram(),
        failures: BTreeMap::new(),
        ok: 0,
        late: 0,
        very_late: 0,
        calls: m.records.len() as u64,
    };
    for r in &m.records {
        let l = r.sent.saturating_duration_since(r.planned);
        record(&mut p.lateness, l);
        if l > Duration::from_millis(1) {
            p.late += 1;
        }
        if l > Duration::from_millis(5) {
            p.very_late += 1;
        }
        if let Some(j) = r.jitter_ms.filter(|j| j.is_finite() && *j >= 0.0) {
            record(&mut p.jitter, Duration::from_secs_f64(j / 1000.0));
        }
        match (&r.outcome, r.start, r.flowing) {
            (None, Some(start), Some(flowing)) => {
                p.ok += 1;
                record(&mut p.to_start, start - r.planned);
                record(&mut p.setup, flowing - r.planned);
                match r.cross_node {
                    Some(true) => record(&mut p.setup_cross_node, flowing - r.planned),
                    Some(false) => record(&mut p.setup_same_node, flowing - r.planned),
                    None => {}
                }
                record(&mut p.start_media, flowing - start);
                if let Some(inc) = r.call_id.and_then(|id| m.incoming.get(&id)) {
                    record(&mut p.call_incoming, inc.saturating_duration_since(r.sent));
                    record(&mut p.incoming_start, start.saturating_duration_since(*inc));
                }
            }
            (outcome, _, _) => {
                *p.failures.entry(outcome.clone().unwrap_or_else(|| "incomplete".into())).or_default() += 1;
            }
        }
    }
    p
}

/// The run's derived figures.
struct Figures {
    /// From t0 to the calls' end, seconds.
    span: f64,
    /// Calls placed per second, first to last placement.
    achieved_rate: Option<f64>,
    /// CPU used over the cores available.
    cpu_share: f64,
    /// RFC 3550 loss over all calls.
    loss: f64,
    /// The soak's warm-up.
    warmup: Duration,
    /// The soak's growth: RSS (MB), descriptors, and whether it is bounded.
    grown: Option<(f64, i64, bool)>,
    /// Sessions up at once in the window: the calls, or with churn the calls' rate times
    /// their length.
    sessions: u64,
    /// The RSS growth from registration (no call yet) to the window's end, over the
    /// sessions up: an average per session, KiB. It includes the buffers the first media
    /// filled (fixed, whatever the sessions), so one more session costs less.
    per_session_kb: Option<f64>,
    /// Host stalls over 5 ms seen by the sleeper.
    stalls_5ms: u64,
}

fn figures(calls: Calls<'_>, m: &Measured, p: &Phases) -> Figures {
    let records = &m.records;
    // Achieved start rate: calls placed over the span from the first to the last placement.
    let first_sent = records.iter().map(|r| r.sent).min();
    let last_sent = records.iter().map(|r| r.sent).max();
    let achieved_rate = match (first_sent, last_sent) {
        (Some(a), Some(b)) if b > a => Some((records.len() - 1) as f64 / (b - a).as_secs_f64()),
        _ => None,
    };
    let media = &m.media;
    let warmup = match calls {
        Calls::Soak(s) => s.warmup,
        _ => Duration::ZERO,
    };
    let sessions = match calls {
        Calls::Soak(s) if s.churn > 0.0 => (s.churn * s.load.talk.as_secs_f64()).round() as u64,
        _ => p.calls,
    };
    // Memory per session: the RSS growth from registration to the window's end (both sides'
    // client state, the manager's call records, the generator's bookkeeping, and the
    // receive and send buffers the media touched for the first time) over the sessions.
    let per_session_kb = match (m.window.and_then(|w| w.rss_mb), m.rss_registered_mb) {
        (Some(up), Some(base)) if sessions > 0 => Some((up - base) * 1024.0 / sessions as f64),
        _ => None,
    };
    Figures {
        span: m.calls_done.saturating_duration_since(m.t0).as_secs_f64().max(1e-9),
        achieved_rate,
        cpu_share: m.cpu / m.wall.as_secs_f64() / sys::cores() as f64,
        loss: if media.received + media.lost > 0 {
            media.lost as f64 / (media.received + media.lost) as f64
        } else {
            0.0
        },
        warmup,
        grown: calls.interval().and_then(|_| growth(&m.samples, warmup)),
        sessions,
        per_session_kb,
        // Host noise seen by a 1 ms sleeper thread: stalls over 5 ms.
        stalls_5ms: sys::stalls_over_5ms(m.sleeper.as_ref()),
    }
}

/// What qualifies the figures: the generator's own lateness, skipped frames, a saturated
/// CPU, growth, host stalls.
fn warnings(calls: Calls<'_>, m: &Measured, p: &Phases, f: &Figures) -> Vec<String> {
    let (records, lateness, very_late, skipped) = (&m.records, &p.lateness, p.very_late, m.frames_skipped);
    let (cpu_share, grown, stalls_5ms, sleeper) = (f.cpu_share, f.grown, f.stalls_5ms, &m.sleeper);
    let mut warnings = Vec::new();
    if very_late as f64 > records.len() as f64 * 0.01 {
        warnings.push(format!(
            "the generator fell behind its schedule: {very_late} of {} starts were more than 5 ms late (max {:.1} ms); \
             its own overload may inflate the setup times",
            records.len(),
            hist::max_ms(lateness).unwrap_or(0.0)
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
    if let Some(h) = sleeper.as_ref().filter(|_| stalls_5ms > 0) {
        warnings.push(format!(
            "this process's threads waited more than 5 ms for a CPU {stalls_5ms} times (max {:.1} ms, seen by a 1 ms sleeper thread): \
             latency tails of that size are the host's (or this process saturating the cores), not the system under test",
            hist::max_ms(h).unwrap_or(0.0)
        ));
    }
    warnings
}

/// The text report.
fn text(
    calls: Calls<'_>,
    options: &fleet::Options,
    m: &Measured,
    p: &Phases,
    f: &Figures,
    span: &Span,
    warnings: &[String],
) -> String {
    let load = calls.load();
    let (records, media, media_latency, window, sleeper, samples) =
        (&m.records, &m.media, &m.media_latency, m.window, &m.sleeper, &m.samples);
    let (ok, failed, late, failures, lateness) = (p.ok, p.failed(), p.late, &p.failures, &p.lateness);
    let (setup, to_start, call_incoming) = (&p.setup, &p.to_start, &p.call_incoming);
    let (incoming_start, start_media) = (&p.incoming_start, &p.start_media);
    let (grown, warmup, loss, cpu_share, stalls_5ms) = (f.grown, f.warmup, f.loss, f.cpu_share, f.stalls_5ms);
    let mut text = String::new();
    let where_ = &m.manager;
    let _ = writeln!(
        text,
        "nullpunch loadgen {}: {} calls at {}/s, {where_}, {} callers -> {} callees, {:.1} s of media per call, {} io",
        calls.name(),
        load.calls,
        load.rate,
        load.callers,
        load.callees,
        load.talk.as_secs_f64(),
        options.io.as_str()
    );
    text.push_str(&span.text());
    let _ = writeln!(
        text,
        "registered {} clients in {:.0} ms",
        load.callers + load.callees,
        m.registered_in.as_secs_f64() * 1000.0
    );
    if let Some(t) = &m.tls {
        let secs = m.registered_in.as_secs_f64().max(1e-9);
        let _ = writeln!(
            text,
            "tls: {} handshakes with the embedded manager ({} resumed, {} failed) while registering: {:.0}/s; \
             process CPU to register {:.2} s ({:.3} ms per handshake, both ends)",
            t.handshakes,
            t.resumed,
            t.failed,
            t.handshakes as f64 / secs,
            t.register_cpu_s,
            t.register_cpu_s * 1000.0 / t.handshakes.max(1) as f64
        );
    }
    let _ = writeln!(
        text,
        "calls: {ok} ok, {failed} failed ({:.2}% success); late starts (> 1 ms): {late}, start lateness p99 {:.3} ms, max {:.3} ms",
        if records.is_empty() { 0.0 } else { ok as f64 * 100.0 / records.len() as f64 },
        hist::ms_at(lateness, 0.99).unwrap_or(0.0),
        hist::max_ms(lateness).unwrap_or(0.0)
    );
    for (why, n) in failures {
        let _ = writeln!(text, "  failed: {n} x {why}");
    }
    if let Some(c) = &m.cluster {
        let _ = writeln!(
            text,
            "cluster: {} managers on NATS; calls sent across managers per node {}",
            c["nodes"],
            c["per_node"].as_array().map_or(String::new(), |a| a
                .iter()
                .map(|n| n["cluster_calls_out"].to_string())
                .collect::<Vec<_>>()
                .join("/"))
        );
        if !c["killed_at_s"].is_null() {
            let _ = writeln!(
                text,
                "failover: a manager holding {} clients stopped at {} s; every client connected again after {} s",
                c["killed_node_clients"], c["killed_at_s"], c["failover_s"]
            );
        }
    }
    let _ = writeln!(text, "{}", hist::header());
    let _ = writeln!(text, "{}", hist::line(SETUP.label, setup));
    if p.setup_same_node.len() + p.setup_cross_node.len() > 0 {
        let _ = writeln!(text, "{}", hist::line("  within one manager", &p.setup_same_node));
        let _ = writeln!(text, "{}", hist::line("  across managers", &p.setup_cross_node));
    }
    let _ = writeln!(text, "{}", hist::line(&format!("  {}", PLAN_TO_START.label), to_start));
    let _ = writeln!(text, "{}", hist::line(&format!("  {}", CALL_TO_INCOMING.label), call_incoming));
    let _ = writeln!(text, "{}", hist::line(&format!("  {}", INCOMING_TO_START.label), incoming_start));
    let _ = writeln!(text, "{}", hist::line(&format!("  {}", START_TO_MEDIA.label), start_media));
    let _ = writeln!(text, "{}", hist::line(MEDIA_LATENCY.label, media_latency));
    let _ = writeln!(text, "{}", hist::line(JITTER.label, &p.jitter));
    if !samples.is_empty() {
        let _ = writeln!(
            text,
            "intervals:     t s   delivered/s    loss %  jitter ms   p50 ms   p99 ms   max ms   rss MB    fds  cores"
        );
        for x in samples {
            let _ = writeln!(
                text,
                "           {:>7.1}  {:>12.0}  {:>8.4}  {:>9.3}  {:>7.3}  {:>7.3}  {:>7.3}  {:>7.1}  {:>5}  {:>5.2}",
                x.t_s,
                x.pps,
                files::loss_pct(x),
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
        m.manager_media.map(|n| n.to_string()).unwrap_or_else(|| "? (external)".into())
    );
    if let Some(w) = window {
        let _ = writeln!(
            text,
            "steady state ({} {}sessions, {:.1} s window): {:.0} packets/s delivered, {:.2} cores busy",
            f.sessions,
            if calls.idle() { "idle " } else { "" },
            w.secs,
            w.pps,
            w.cores,
        );
        if let (Some(up), Some(base), Some(per)) = (w.rss_mb, m.rss_registered_mb, f.per_session_kb) {
            let _ = writeln!(
                text,
                "memory: rss {up:.1} MB at the window's end, {base:.1} MB once the clients had registered: \
                 {:+.1} MB, {per:.2} KiB per session on average{}",
                up - base,
                if calls.idle() {
                    ""
                } else {
                    " (with the buffers the first media filled, whatever the sessions: one more session costs less)"
                }
            );
        }
    }
    let _ = writeln!(
        text,
        "generator: {:.2} s wall, {:.2} s CPU ({:.0}% of {} cores), rss {:.1} MB at the end (clients stopped)",
        m.wall.as_secs_f64(),
        m.cpu,
        cpu_share * 100.0,
        sys::cores(),
        m.rss_mb.unwrap_or(0.0)
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
    for w in warnings {
        let _ = writeln!(text, "WARNING: {w}");
    }
    text
}

/// The summary JSON (`--json`, `summary.json`).
fn json(
    calls: Calls<'_>,
    options: &fleet::Options,
    m: &Measured,
    p: &Phases,
    f: &Figures,
    warnings: Vec<String>,
) -> serde_json::Value {
    let load = calls.load();
    let (records, media, media_latency, window, sleeper, samples) =
        (&m.records, &m.media, &m.media_latency, m.window, &m.sleeper, &m.samples);
    let (ok, failed, late, failures, lateness) = (p.ok, p.failed(), p.late, &p.failures, &p.lateness);
    let (setup, to_start) = (&p.setup, &p.to_start);
    let (grown, loss, per_session_kb, cpu_share, stalls_5ms, span) =
        (f.grown, f.loss, f.per_session_kb, f.cpu_share, f.stalls_5ms, f.span);
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
        "start_lateness_p99_ms": hist::num(hist::ms_at(lateness, 0.99)),
        "target_rate": load.rate,
        "achieved_rate": hist::num(f.achieved_rate),
        "setup_p50_ms": hist::num(hist::ms_at(setup, 0.5)),
        "setup_p90_ms": hist::num(hist::ms_at(setup, 0.9)),
        "setup_p99_ms": hist::num(hist::ms_at(setup, 0.99)),
        "setup_p999_ms": hist::num(hist::ms_at(setup, 0.999)),
        "setup_max_ms": hist::num(hist::max_ms(setup)),
        "start_p99_ms": hist::num(hist::ms_at(to_start, 0.99)),
        "pps_delivered": window.map(|w| w.pps).unwrap_or(media.received as f64 / span).round(),
        "packets_sent": media.sent,
        "frames_skipped": m.frames_skipped,
        "packets_delivered": media.received,
        "loss_ratio": loss,
        // Delivered over sent: also sees packets lost after the last one received (which
        // RFC 3550 loss cannot), but counts packets still in flight at hang-up as missing.
        "delivery_ratio": if media.sent > 0 { Some(media.received as f64 / media.sent as f64) } else { None },
        "latency_p50_ms": hist::num(hist::ms_at(media_latency, 0.5)),
        "latency_p99_ms": hist::num(hist::ms_at(media_latency, 0.99)),
        "manager_media_packets": m.manager_media,
        "cpu_share": (cpu_share * 1000.0).round() / 1000.0,
        "sleeper_oversleep_p99_ms": hist::num(sleeper.as_ref().and_then(|h| hist::ms_at(h, 0.99))),
        "sleeper_oversleep_max_ms": hist::num(sleeper.as_ref().and_then(hist::max_ms)),
        "sleeper_stalls_over_5ms": stalls_5ms,
        "rss_mb": hist::num(window.and_then(|w| w.rss_mb).or(m.rss_mb)),
        "warnings": warnings,
        "intervals": (!samples.is_empty()).then(|| samples.iter().map(interval_json).collect::<Vec<_>>()),
        "rss_growth_mb": hist::num(grown.map(|g| g.0)),
        "fd_growth": grown.map(|g| g.1),
        "growth_ok": grown.map(|g| g.2),
    });
    if let (Some(c), Some(o)) = (&m.cluster, json.as_object_mut()) {
        o.insert("cluster".into(), c.clone());
    }
    if p.setup_same_node.len() + p.setup_cross_node.len() > 0 {
        // Several managers (a cluster): calls within one manager and calls across managers,
        // and what the hop between managers adds.
        let more = serde_json::json!({
            "setup_same_node_calls": p.setup_same_node.len(),
            "setup_same_node_p50_ms": hist::num(hist::ms_at(&p.setup_same_node, 0.5)),
            "setup_same_node_p99_ms": hist::num(hist::ms_at(&p.setup_same_node, 0.99)),
            "setup_cross_node_calls": p.setup_cross_node.len(),
            "setup_cross_node_p50_ms": hist::num(hist::ms_at(&p.setup_cross_node, 0.5)),
            "setup_cross_node_p99_ms": hist::num(hist::ms_at(&p.setup_cross_node, 0.99)),
            "cross_node_added_p50_ms": hist::num(added(&p.setup_same_node, &p.setup_cross_node, 0.5)),
            "cross_node_added_p99_ms": hist::num(added(&p.setup_same_node, &p.setup_cross_node, 0.99)),
        });
        if let (Some(o), serde_json::Value::Object(m)) = (json.as_object_mut(), more) {
            o.extend(m);
        }
    }
    if let Some(t) = m.tls {
        let per_s = t.handshakes as f64 / m.registered_in.as_secs_f64().max(1e-9);
        json["tls"] = serde_json::json!({
            "handshakes": t.handshakes,
            "resumed": t.resumed,
            "failed": t.failed,
            "handshakes_per_s": per_s.round(),
            "register_cpu_s": (t.register_cpu_s * 1000.0).round() / 1000.0,
            "register_cpu_ms_per_handshake": (t.register_cpu_s * 1e6 / t.handshakes.max(1) as f64).round() / 1000.0,
        });
    }
    // The generator could not drive the run as planned (starts more than 5 ms late for over
    // 1% of the calls, or media frames skipped): thresholds fail on it.
    json["generator_overloaded"] =
        serde_json::json!(p.very_late as f64 > records.len() as f64 * 0.01 || m.frames_skipped > 0);
    // RFC 3550 jitter J of the media each caller received, over the calls.
    json["jitter_p50_ms"] = hist::num(hist::ms_at(&p.jitter, 0.5));
    json["jitter_p99_ms"] = hist::num(hist::ms_at(&p.jitter, 0.99));
    // The baseline of `rss_per_session_kb`.
    json["rss_registered_mb"] = hist::num(window.and(m.rss_registered_mb));
    // First connections that waited for a local port (a previous run's TIME_WAITs).
    json["port_waits"] = m.port_waits.into();
    json["manager_io"] = m.manager_io.into();
    if let Calls::Soak(Soak { churn, .. }) = calls {
        json["churn"] = (*churn).into();
    }
    json
}

/// The plots' title: the scenario and its parameters.
fn title(calls: Calls<'_>, options: &fleet::Options, m: &Measured, p: &Phases) -> String {
    let (load, io, ok) = (calls.load(), options.io.as_str(), p.ok);
    let held = m.window.map_or(0.0, |w| w.secs);
    match calls {
        Calls::Soak(s) => format!(
            "soak, {} calls set up at {}/s{}, held {held:.0} s, {} s intervals, {io} io ({ok} ok)",
            load.calls,
            load.rate,
            if s.churn > 0.0 { format!(" (churn {}/s)", s.churn) } else { String::new() },
            s.interval.as_secs_f64(),
        ),
        Calls::Sessions(s) => format!(
            "sessions{}, {} calls set up at {}/s, held {held:.0} s, {io} io ({ok} ok)",
            if s.idle { " (idle)" } else { "" },
            load.calls,
            load.rate,
        ),
        Calls::Setup(_) => format!("call setup, {} calls at {}/s, {io} io ({ok} ok)", load.calls, load.rate),
    }
}

/// What `--out` records: the summary, the histograms and their plot, and the soak's
/// intervals.
fn record_of(
    dir: &std::path::Path,
    m: &Measured,
    p: Phases,
    json: &serde_json::Value,
    title: &str,
    span: &Span,
) -> Record {
    let mut r = Record::new(dir, json.clone(), title, span.started_at);
    r.histograms = vec![
        (SETUP, p.setup),
        (PLAN_TO_START, p.to_start),
        (CALL_TO_INCOMING, p.call_incoming),
        (INCOMING_TO_START, p.incoming_start),
        (START_TO_MEDIA, p.start_media),
        (MEDIA_LATENCY, m.media_latency.clone()),
        (JITTER, p.jitter),
    ];
    r.intervals = m.samples.clone();
    r
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::calls::{CallRecord, MediaTotals};
    use crate::scenario::CallLoad;

    /// What a one-call setup run measured, `interrupted` or not.
    fn measured(interrupted: bool) -> Measured {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let call = CallRecord {
            planned: t0,
            sent: t0,
            call_id: None,
            start: Some(at(1)),
            flowing: Some(at(2)),
            talk: Duration::ZERO,
            outcome: None,
            jitter_ms: Some(0.25),
            cross_node: None,
        };
        Measured {
            records: vec![call],
            incoming: Default::default(),
            media_latency: new_histogram(),
            media: MediaTotals::default(),
            frames_skipped: 0,
            registered_in: Duration::from_millis(5),
            t0,
            calls_done: at(1000),
            window: None,
            rss_registered_mb: None,
            rss_mb: None,
            sleeper: None,
            samples: Vec::new(),
            wall: Duration::from_secs(1),
            cpu: 0.1,
            manager: "manager 127.0.0.1:1".into(),
            manager_media: None,
            tls: None,
            manager_io: None,
            cluster: None,
            port_waits: 0,
            source_ips: 1,
            interrupted,
        }
    }

    #[test]
    fn an_interrupted_run_says_so_and_misses_its_goal() {
        let load = CallLoad::even(1.0, 1, Duration::ZERO, 1, 1);
        let options = fleet::Options {
            io: engine::driver::Io::Portable,
            bind_ip: [127, 0, 0, 1].into(),
            source_ips: 0,
            threads: 1,
            tick: Duration::from_micros(250),
        };
        let output = Output::default();
        for interrupted in [false, true] {
            let s = summarize(Calls::Setup(&load), &options, &output, &measured(interrupted)).unwrap();
            assert_eq!(s.json["interrupted"], interrupted, "{}", s.json);
            assert_eq!(s.text.contains("INTERRUPTED: partial results\n"), interrupted, "{}", s.text);
            assert_eq!(s.all_ok, !interrupted, "a partial run did not meet its goal");
            assert!(s.json["started_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{}", s.json);
            assert_eq!(s.json["jitter_p50_ms"], 0.25, "{}", s.json);
        }
    }
}
