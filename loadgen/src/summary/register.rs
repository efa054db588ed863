//! The summary of a `register` run: registration rate and latency, what held, failures,
//! and memory and descriptors per client.

use std::fmt::Write;

use super::files::Record;
use super::hist;
use super::metric::REGISTER;
use super::{Span, Summary};
use crate::error::Error;
use crate::fleet;
use crate::register::Measured;
use crate::scenario::{Output, Register};

/// The summary of `reg`, from what it measured, and with `--out` the record to write.
pub fn summarize(reg: &Register, options: &fleet::Options, output: &Output, m: &Measured) -> Result<Summary, Error> {
    let (registered, held, failed, latency, sources) = (m.registered, m.held, &m.failed, &m.latency, &m.sources);
    let (rss_up, per_client_kb, manager_per_reg_kb) = (m.rss_up_mb, m.per_client_kb, m.manager_per_registration_kb);
    let (fds_up, disconnects, public_ips, cpu, sleeper) = (m.open_fds, m.disconnects, m.public_ips, m.cpu, &m.sleeper);
    let (manager_conns, manager_io) = (m.manager_connections, m.manager_io);
    let span = m.span.as_secs_f64().max(1e-9);
    let run = Span::new(m.t0, m.ended, m.interrupted);
    let mut warnings = Vec::new();
    if registered + failed.len() < reg.clients {
        warnings.push(format!("only {registered} of {} clients registered within 30 s of the ramp's end", reg.clients));
    }
    if !failed.is_empty() {
        warnings.push(format!("{} clients failed to connect to the manager (first: {})", failed.len(), failed[0]));
    }
    let stalls = crate::sys::stalls_over_5ms(sleeper.as_ref());
    if stalls > 0 {
        warnings.push(format!("this process's threads waited more than 5 ms for a CPU {stalls} times during the hold"));
    }

    let mut text = String::new();
    let where_ = &m.manager;
    let _ = writeln!(
        text,
        "nullpunch loadgen register: {} clients at {}/s from {} source address{} ({}), {where_}, {} io",
        reg.clients,
        reg.rate,
        sources.len(),
        if sources.len() == 1 { "" } else { "es" },
        sources.describe(),
        options.io.as_str()
    );
    text.push_str(&run.text());
    let _ = writeln!(
        text,
        "registered {registered} of {} in {:.2} s ({:.0}/s); {} still registered after {:.0} s held, {} re-registrations, {} disconnects",
        reg.clients,
        span,
        registered as f64 / span,
        held,
        reg.hold.as_secs_f64(),
        m.reregistrations,
        disconnects
    );
    let _ = writeln!(text, "{}", hist::header());
    let _ = writeln!(text, "{}", hist::line("register (plan -> REGISTERED)", latency));
    let _ = writeln!(
        text,
        "memory: rss {:.1} MB with all registered ({:.2} KiB per client, {}){}; {} open fds",
        rss_up.unwrap_or(0.0),
        per_client_kb.unwrap_or(0.0),
        if m.embedded { "both ends in this process" } else { "the clients' side" },
        manager_per_reg_kb.map(|k| format!("; manager {k:.2} KiB per registration")).unwrap_or_default(),
        fds_up.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
    );
    for f in failed.iter().take(3) {
        let _ = writeln!(text, "  failed: {f}");
    }
    for w in &warnings {
        let _ = writeln!(text, "WARNING: {w}");
    }
    let mut json = serde_json::json!({
        "scenario": "register",
        "io": options.io.as_str(),
        "clients": reg.clients,
        "source_ips": sources.len(),
        "public_ips_seen": public_ips,
        // The fields every scenario's JSON carries; a registration run has no calls or media.
        "calls_ok": serde_json::Value::Null,
        "calls_failed": serde_json::Value::Null,
        "late_starts": serde_json::Value::Null,
        "setup_p50_ms": serde_json::Value::Null,
        "setup_p99_ms": serde_json::Value::Null,
        "setup_max_ms": serde_json::Value::Null,
        "pps_delivered": serde_json::Value::Null,
        "loss_ratio": serde_json::Value::Null,
        "latency_p99_ms": serde_json::Value::Null,
        "registered": registered,
        "held": held,
        "failed": failed.len(),
        "reregistrations": m.reregistrations,
        "disconnects": disconnects,
        "port_waits": m.port_waits,
        "register_rate": (registered as f64 / span).round(),
        "register_p50_ms": hist::num(hist::ms_at(latency, 0.5)),
        "register_p99_ms": hist::num(hist::ms_at(latency, 0.99)),
        "register_max_ms": hist::num(hist::max_ms(latency)),
        "rss_mb": hist::num(rss_up),
        "rss_per_client_kb": hist::num(per_client_kb),
        "manager_rss_per_registration_kb": hist::num(manager_per_reg_kb),
        "manager_connections": manager_conns,
        "manager_io": manager_io,
        "open_fds": fds_up,
        "cpu_seconds": (cpu * 100.0).round() / 100.0,
        "sleeper_stalls_over_5ms": stalls,
        "warnings": warnings,
    });
    run.set_in(&mut json);
    let record = output.dir.as_deref().map(|dir| {
        let title = format!("registration, {} clients at {}/s, {} io", reg.clients, reg.rate, options.io.as_str());
        let mut r = Record::new(dir, json.clone(), &title, run.started_at);
        r.histograms = vec![(REGISTER, latency.clone())];
        r
    });
    let all_ok = registered == reg.clients && held == reg.clients && failed.is_empty() && !m.interrupted;
    Ok(Summary { json, text, all_ok, record })
}
