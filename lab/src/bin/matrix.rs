//! `matrix`: N calls per router pair through the firewall lab, for every pair of
//! {fw, nat, nat-random, nat2 (double NAT), nat-map (nat-random with PCP/NAT-PMP/UPnP),
//! dual (nat-random on IPv4, an IPv6 LAN behind the stateful firewall)},
//! plus two peers behind one NAT (nat and nat-random); prints per cell the success rate,
//! CALL-to-two-way-media percentiles, the strategy and path, the search's probes and the
//! routers' conntrack entries, then one JSON line. Cells run three at a time, each in its own
//! lab.
//!
//! Every call starts cold: both routers' conntrack tables are flushed and both peers are
//! new processes on fresh ports, so one call's probes or windows cannot help the next.
//! A cell with a relay-free path (at least one side easy) must connect every call; the
//! random/random cell must fail every call within 5 s with the no-path reason. Anything else
//! is a failure (exit status 1).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use lab::{Host, Lab, Mode};
use serde_json::Value;

/// The longest a refused call (no relay-free path) may take, from the caller's start.
const REFUSAL_LIMIT: Duration = Duration::from_secs(5);

/// Calls per cell from which the p95 bars apply (fewer: the p95 is the slowest call).
const MIN_CALLS_FOR_P95: u64 = 20;

struct Cell {
    a: Mode,
    b: Mode,
    /// The callee runs on C, behind the caller's router (two peers behind one NAT).
    same_nat: bool,
    ok: u64,
    calls: u64,
    /// CALL to two-way media, microseconds.
    hist: Histogram<u64>,
    /// Easy side's probes per call (searches only).
    probes: Histogram<u64>,
    /// UDP conntrack entries on r1 and r2 after each call.
    ct: [Histogram<u64>; 2],
    strategies: BTreeMap<String, u64>,
    /// The caller's path kind per successful call.
    paths: BTreeMap<String, u64>,
    failures: BTreeMap<String, u64>,
    /// The slowest failed call, caller start to exit.
    slowest_failure: Duration,
}

impl Cell {
    fn has_path(&self) -> bool {
        let random = |m: Mode| matches!(m, Mode::NatRandom | Mode::Dual);
        let both_v6 = self.a == Mode::Dual && self.b == Mode::Dual;
        self.same_nat || both_v6 || !(random(self.a) && random(self.b))
    }

    /// The call needs the birthday search: one side randomises IPv4 ports, the other is easy
    /// but has no port mapping, they are not behind one NAT and not both on IPv6.
    fn searches(&self) -> bool {
        let hard = |m: Mode| matches!(m, Mode::NatRandom | Mode::Dual);
        let both_v6 = self.a == Mode::Dual && self.b == Mode::Dual;
        !self.same_nat && !both_v6 && self.a != Mode::NatMap && self.b != Mode::NatMap && hard(self.a) != hard(self.b)
    }

    fn name(&self) -> String {
        if self.same_nat {
            format!("{} / same NAT", self.a.as_str())
        } else {
            format!("{} / {}", self.a.as_str(), self.b.as_str())
        }
    }
}

fn hist(high: u64) -> Histogram<u64> {
    Histogram::new_with_bounds(1, high, 3).expect("histogram bounds")
}

fn run_cell(a: Mode, b: Mode, same_nat: bool, calls: u16) -> Result<Cell, String> {
    let lab = Lab::up(a, b)?;
    let m = lab.start_manager()?;
    let callee_host = if same_nat { Host::C } else { Host::B };
    let mut cell = Cell {
        a,
        b,
        same_nat,
        ok: 0,
        calls: calls as u64,
        hist: hist(120_000_000),
        probes: hist(1_000_000),
        ct: [hist(10_000_000), hist(10_000_000)],
        strategies: BTreeMap::new(),
        paths: BTreeMap::new(),
        failures: BTreeMap::new(),
        slowest_failure: Duration::ZERO,
    };
    for i in 0..calls {
        lab.flush_conntrack()?;
        let bob =
            lab.peer(callee_host, "bob", 41000 + i, &["--setup-timeout", "2", "listen", "--calls", "1", "--json"])?;
        // Registration: discovery, and up to 600 ms for a router that answers no port
        // mapping request.
        std::thread::sleep(Duration::from_millis(1000));
        let started = Instant::now();
        let o = lab
            .peer(Host::A, "alice", 40000 + i, &["--setup-timeout", "2", "call", "bob", "--duration", "0.3", "--json"])?
            .finish(Duration::from_secs(60));
        let took = started.elapsed();
        for (k, r) in [Host::R1, Host::R2].into_iter().enumerate() {
            let n = (lab.conntrack_udp(r)?.lines().count() + lab.conntrack_udp6(r)?.lines().count()) as u64;
            cell.ct[k].record(n.max(1)).map_err(|e| e.to_string())?;
        }
        let ob = bob.finish(Duration::from_millis(if cell.has_path() { 10_000 } else { 100 }));
        match o.calls.first() {
            Some(c) => {
                *cell.strategies.entry(c["strategy"].as_str().unwrap_or("?").to_string()).or_default() += 1;
                if c["result"] == "ok" {
                    cell.ok += 1;
                    *cell.paths.entry(c["path"].as_str().unwrap_or("?").to_string()).or_default() += 1;
                    let us = (c["first_media_ms"].as_f64().unwrap_or(0.0) * 1000.0).max(1.0) as u64;
                    cell.hist.record(us.min(120_000_000)).map_err(|e| e.to_string())?;
                    // The easy side's probes: the side that opened no sockets.
                    let reports: Vec<&Value> = std::iter::once(c).chain(ob.calls.first()).collect();
                    if c["strategy"] == "birthday" || c["strategy"] == "predict" {
                        if let Some(easy) = reports.iter().find(|r| r["sockets_opened"] == 0) {
                            cell.probes.record(easy["probes_sent"].as_u64().unwrap_or(0).max(1)).ok();
                        }
                    }
                } else {
                    let why = c["failed_phase"].as_str().unwrap_or("?").to_string();
                    *cell.failures.entry(why).or_default() += 1;
                    cell.slowest_failure = cell.slowest_failure.max(took);
                }
            }
            None => {
                *cell.failures.entry(format!("no report (exit {})", o.code)).or_default() += 1;
                cell.slowest_failure = cell.slowest_failure.max(took);
            }
        }
    }
    let stats = m.stop()?;
    if stats["udp_media"] != 0 {
        return Err(format!("the manager saw media: {stats}"));
    }
    Ok(cell)
}

/// Whether a cell met its bar, and why not.
fn verdict(c: &Cell) -> Result<(), String> {
    if c.has_path() {
        if c.ok != c.calls {
            return Err(format!("FAILURES: {:?}", c.failures));
        }
        // The acceptance bars: p95 within 15 s where a side randomises (the birthday search
        // at its default rate), within 1 s elsewhere. A p95 needs a sample: with a few calls
        // it is the slowest call, and a search past 15 s (about 1,500 probes) comes once in
        // 400, so the short form checks only that every call connected.
        let bar = if c.searches() { 15_000_000 } else { 1_000_000 };
        let p95 = c.hist.value_at_quantile(0.95);
        if c.calls >= MIN_CALLS_FOR_P95 && p95 > bar {
            return Err(format!("p95 {:.2} s over the {} s bar", p95 as f64 / 1e6, bar / 1_000_000));
        }
        return Ok(());
    }
    let refused = c.failures.iter().filter(|(k, _)| k.starts_with("no relay-free path")).map(|(_, v)| v).sum::<u64>();
    if c.ok > 0 || refused != c.calls {
        return Err(format!("expected every call refused with the no-path reason: {} ok, {:?}", c.ok, c.failures));
    }
    if c.slowest_failure > REFUSAL_LIMIT {
        return Err(format!("a refusal took {:.1} s", c.slowest_failure.as_secs_f64()));
    }
    Ok(())
}

fn main() {
    let mut calls: u16 = 50;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--calls" => {
                calls = args.next().and_then(|v| v.parse().ok()).filter(|n| *n >= 1).unwrap_or_else(|| {
                    eprintln!("matrix: --calls takes a number of calls, at least 1");
                    std::process::exit(2);
                })
            }
            "-h" | "--help" => {
                println!("usage: matrix [--calls N]   (root; default 50 calls per router pair)");
                return;
            }
            other => {
                eprintln!("matrix: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let modes = [Mode::Fw, Mode::Nat, Mode::NatRandom, Mode::Nat2, Mode::NatMap, Mode::Dual];
    let mut pairs: Vec<(Mode, Mode, bool)> =
        modes.iter().flat_map(|&a| modes.iter().map(move |&b| (a, b, false))).collect();
    pairs.push((Mode::Nat, Mode::Fw, true));
    pairs.push((Mode::NatRandom, Mode::Fw, true));
    let mut cells = Vec::new();
    for chunk in pairs.chunks(3) {
        let handles: Vec<_> =
            chunk.iter().map(|&(a, b, same)| std::thread::spawn(move || run_cell(a, b, same, calls))).collect();
        for h in handles {
            match h.join().expect("cell thread") {
                Ok(c) => cells.push(c),
                Err(e) => {
                    eprintln!("matrix: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    println!(
        "CALL -> first two-way media, {calls} calls per cell (caller behind r1, callee behind r2), each call cold"
    );
    println!("(conntrack flushed, fresh peers and ports); probes: the easy side's, per search; ct: UDP conntrack");
    println!("entries on each router after the call\n");
    println!(
        "{:<24} {:>5} {:>5} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}  {:<9} {:<15} note",
        "caller / callee router",
        "calls",
        "ok",
        "success",
        "p50 ms",
        "p95 ms",
        "max ms",
        "probes50",
        "probes95",
        "ct r1 max",
        "ct r2 max",
        "strategy",
        "path"
    );
    let mut json = Vec::new();
    let mut bad = false;
    for c in &cells {
        let ms = |q: f64| if c.hist.is_empty() { None } else { Some(c.hist.value_at_quantile(q) as f64 / 1000.0) };
        let pr = |q: f64| if c.probes.is_empty() { None } else { Some(c.probes.value_at_quantile(q)) };
        let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        let fi = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
        let max = if c.hist.is_empty() { None } else { Some(c.hist.max() as f64 / 1000.0) };
        let strategy = c.strategies.keys().cloned().collect::<Vec<_>>().join(",");
        let path = c.paths.keys().cloned().collect::<Vec<_>>().join(",");
        let v = verdict(c);
        bad |= v.is_err();
        let note = match (&v, c.has_path()) {
            (Err(e), _) => e.clone(),
            (Ok(()), false) => {
                format!("no relay-free path: every call refused, slowest {:.2} s", c.slowest_failure.as_secs_f64())
            }
            (Ok(()), true) => String::new(),
        };
        println!(
            "{:<24} {:>5} {:>5} {:>7.1}% {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}  {:<9} {:<15} {note}",
            c.name(),
            c.calls,
            c.ok,
            c.ok as f64 * 100.0 / c.calls as f64,
            f(ms(0.5)),
            f(ms(0.95)),
            f(max),
            fi(pr(0.5)),
            fi(pr(0.95)),
            c.ct[0].max(),
            c.ct[1].max(),
            strategy,
            path
        );
        json.push(serde_json::json!({
            "caller_router": c.a.as_str(), "callee_router": if c.same_nat { "same-nat" } else { c.b.as_str() },
            "calls": c.calls, "ok": c.ok, "paths": c.paths,
            "success_ratio": c.ok as f64 / c.calls as f64, "p50_ms": ms(0.5), "p95_ms": ms(0.95), "p99_ms": ms(0.99),
            "max_ms": max, "probes_p50": pr(0.5), "probes_p95": pr(0.95), "probes_max": pr(1.0),
            "conntrack_r1_p50": c.ct[0].value_at_quantile(0.5), "conntrack_r1_max": c.ct[0].max(),
            "conntrack_r2_p50": c.ct[1].value_at_quantile(0.5), "conntrack_r2_max": c.ct[1].max(),
            "strategies": c.strategies, "failures": c.failures, "relay_free_path": c.has_path(),
            "slowest_failure_s": c.slowest_failure.as_secs_f64(), "passed": v.is_ok(),
        }));
    }
    println!("\n{}", serde_json::Value::Array(json));
    std::process::exit(if bad { 1 } else { 0 });
}
