//! `matrix`: N calls per router pair through the firewall lab, for every pair of
//! {fw, nat, nat-random}; prints success rate and CALL-to-two-way-media percentiles per
//! cell, then one JSON line. Cells run three at a time, each in its own lab.

use std::time::Duration;

use hdrhistogram::Histogram;
use lab::{Host, Lab, Mode};

struct Cell {
    a: Mode,
    b: Mode,
    ok: u64,
    calls: u64,
    hist: Histogram<u64>,
    failures: std::collections::BTreeMap<String, u64>,
}

fn run_cell(a: Mode, b: Mode, calls: u16) -> Result<Cell, String> {
    let lab = Lab::up(a, b)?;
    let m = lab.start_manager()?;
    let n = calls.to_string();
    let bob = lab.peer(Host::B, "bob", 41000, &["--setup-timeout", "2", "listen", "--calls", &n, "--json"])?;
    std::thread::sleep(Duration::from_millis(400));
    let mut cell = Cell {
        a,
        b,
        ok: 0,
        calls: calls as u64,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
        failures: Default::default(),
    };
    for i in 0..calls {
        // A fresh caller port per call: each call punches a new window.
        let o = lab
            .peer(Host::A, "alice", 40000 + i, &["--setup-timeout", "2", "call", "bob", "--duration", "0.3", "--json"])?
            .finish(Duration::from_secs(20));
        match o.calls.first() {
            Some(c) if c["result"] == "ok" => {
                cell.ok += 1;
                let us = (c["first_media_ms"].as_f64().unwrap_or(0.0) * 1000.0).max(1.0) as u64;
                cell.hist.record(us.min(60_000_000)).unwrap();
            }
            Some(c) => {
                let why = c["failed_phase"].as_str().unwrap_or("?").to_string();
                *cell.failures.entry(why).or_default() += 1;
            }
            None => *cell.failures.entry(format!("no report (exit {})", o.code)).or_default() += 1,
        }
    }
    let _ = bob.finish(Duration::from_secs(30));
    let stats = m.stop()?;
    if stats["udp_media"] != 0 {
        return Err(format!("the manager saw media: {stats}"));
    }
    Ok(cell)
}

fn main() {
    let mut calls: u16 = 50;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--calls" => calls = args.next().and_then(|v| v.parse().ok()).expect("--calls N"),
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
    let modes = [Mode::Fw, Mode::Nat, Mode::NatRandom];
    let pairs: Vec<(Mode, Mode)> = modes.iter().flat_map(|&a| modes.iter().map(move |&b| (a, b))).collect();
    let mut cells = Vec::new();
    for chunk in pairs.chunks(3) {
        let handles: Vec<_> = chunk.iter().map(|&(a, b)| std::thread::spawn(move || run_cell(a, b, calls))).collect();
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
    println!("CALL -> first two-way media, {calls} calls per cell (caller behind r1, callee behind r2)\n");
    println!(
        "{:<24} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9}  note",
        "caller / callee router", "calls", "ok", "success", "p50 ms", "p99 ms", "max ms"
    );
    let mut json = Vec::new();
    for c in &cells {
        let ms = |q: f64| if c.hist.is_empty() { None } else { Some(c.hist.value_at_quantile(q) as f64 / 1000.0) };
        let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        let random = c.a == Mode::NatRandom || c.b == Mode::NatRandom;
        let note = if random {
            "expected to fail: a fully-random NAT uses a new port towards the peer, not the one the manager saw"
                .to_string()
        } else if c.ok == c.calls {
            String::new()
        } else {
            format!("FAILURES: {:?}", c.failures)
        };
        let max = if c.hist.is_empty() { None } else { Some(c.hist.max() as f64 / 1000.0) };
        println!(
            "{:<24} {:>6} {:>6} {:>8.1}% {:>9} {:>9} {:>9}  {note}",
            format!("{} / {}", c.a.as_str(), c.b.as_str()),
            c.calls,
            c.ok,
            c.ok as f64 * 100.0 / c.calls as f64,
            f(ms(0.5)),
            f(ms(0.99)),
            f(max)
        );
        json.push(serde_json::json!({
            "caller_router": c.a.as_str(), "callee_router": c.b.as_str(), "calls": c.calls, "ok": c.ok,
            "success_ratio": c.ok as f64 / c.calls as f64, "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": max,
            "failures": c.failures, "expected_to_fail": random,
        }));
    }
    println!("\n{}", serde_json::Value::Array(json));
    let bad = cells.iter().any(|c| c.a != Mode::NatRandom && c.b != Mode::NatRandom && c.ok != c.calls);
    std::process::exit(if bad { 1 } else { 0 });
}
