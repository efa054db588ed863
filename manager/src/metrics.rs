//! Prometheus metrics: the text exposition format (version 0.0.4) and a minimal HTTP
//! endpoint that serves it on `GET /metrics`.
//!
//! The server is a plain thread on a std `TcpListener`: one short request at a time, a 2 s
//! read and write deadline, request heads up to 8 KiB, everything else 404 or 400. A scrape
//! every few seconds is all it is for; no HTTP crate is needed for that.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use proto::shard::stats::{LatencyHistogram, Stats};

/// Builds exposition text: `# HELP` and `# TYPE` once per family, then its samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

fn escape_help(s: &str) -> String {
    s.trim().replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n").replace('"', "\\\"")
}

fn labels(l: &[(&str, &str)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = l.iter().map(|(k, v)| format!("{k}=\"{}\"", escape_label(v))).collect();
    format!("{{{}}}", inner.join(","))
}

impl Exposition {
    /// Start a family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, l: &[(&str, &str)], value: f64) -> &mut Self {
        let v = if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 {
            format!("{}", value as i64)
        } else {
            format!("{value}")
        };
        let _ = writeln!(self.out, "{name}{} {v}", labels(l));
        self
    }

    /// A whole counter family with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, "counter", help).sample(name, &[], value as f64)
    }

    /// A whole gauge family with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, "gauge", help).sample(name, &[], value)
    }

    /// A histogram family from cumulative buckets (upper bound in seconds, count), total
    /// count and sum in seconds.
    pub fn histogram(&mut self, name: &str, help: &str, buckets: &[(f64, u64)], count: u64, sum: f64) -> &mut Self {
        self.family(name, "histogram", help);
        for (le, c) in buckets {
            let le = format!("{le}");
            self.sample(&format!("{name}_bucket"), &[("le", &le)], *c as f64);
        }
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], count as f64);
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], count as f64)
    }

    /// A histogram family from a [`LatencyHistogram`] (its microseconds as seconds).
    pub fn latency_histogram(&mut self, name: &str, help: &str, h: &LatencyHistogram) -> &mut Self {
        let (cum, count, sum_us) = h.read();
        let buckets: Vec<(f64, u64)> = cum.iter().map(|&(b, c)| (b as f64 / 1e6, c)).collect();
        self.histogram(name, help, &buckets, count, sum_us as f64 / 1e6)
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// The manager's metrics: every counter as `nullpunch_manager_<name>_total`, every gauge as
/// `nullpunch_manager_<name>` (directory entries and tombstones), plus calls by outcome,
/// dropped frames by reason, open connections, and the setup-time histogram.
pub fn render_manager(stats: &Stats) -> String {
    let mut e = Exposition::default();
    let v: std::collections::HashMap<&str, u64> = stats.snapshot().into_iter().collect();
    for (name, help, value) in stats.described() {
        e.counter(&format!("nullpunch_manager_{name}_total"), help, value);
    }
    e.family("nullpunch_manager_calls_by_outcome_total", "counter", "Calls by how they ended at the manager.");
    for (outcome, key) in [
        ("started", "calls_started"),
        ("unknown", "calls_unknown"),
        ("busy", "calls_busy"),
        ("rejected", "calls_rejected"),
        ("ring_timeout", "calls_ring_timeout"),
    ] {
        e.sample("nullpunch_manager_calls_by_outcome_total", &[("outcome", outcome)], v[key] as f64);
    }
    e.family(
        "nullpunch_manager_calls_by_strategy_total",
        "counter",
        "Calls by NAT traversal strategy (direct, birthday, predict, none) and how they ended at the manager.",
    );
    for (strategy, outcome, n) in stats.by_strategy.read() {
        e.sample(
            "nullpunch_manager_calls_by_strategy_total",
            &[("strategy", strategy), ("outcome", outcome)],
            n as f64,
        );
    }
    e.family("nullpunch_manager_frames_dropped_total", "counter", "Frames refused, by reason.");
    for (reason, key) in [
        ("malformed", "frames_malformed"),
        ("oversized", "frames_oversized"),
        ("unexpected", "frames_unexpected"),
        ("duplicate", "frames_duplicate"),
        ("auth_missing", "auth_missing"),
        ("auth_invalid", "auth_invalid"),
        ("auth_expired", "auth_expired"),
        ("auth_unbound", "auth_unbound"),
    ] {
        e.sample("nullpunch_manager_frames_dropped_total", &[("reason", reason)], v[key] as f64);
    }
    for (name, help, value) in stats.gauges() {
        e.gauge(&format!("nullpunch_manager_{name}"), help, value as f64);
    }
    let open = v["connections_accepted"].saturating_sub(v["connections_closed"]);
    e.gauge("nullpunch_manager_connections_open", "TCP connections open now.", open as f64);
    e.latency_histogram(
        "nullpunch_manager_setup_seconds",
        "CALL to START at the call's owner shard (the manager's part of call setup).",
        &stats.setup_time,
    );
    e.latency_histogram(
        "nullpunch_manager_cluster_rtt_seconds",
        "Cluster: a CALL to another node, from the request on its inbox to that node's acknowledgement.",
        &stats.cluster_rtt,
    );
    e.finish()
}

/// A running metrics endpoint.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serve `render()` as `text/plain; version=0.0.4` on `GET /metrics` at `addr`.
pub fn serve(addr: SocketAddr, render: Arc<dyn Fn() -> String + Send + Sync>) -> io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let thread = std::thread::Builder::new().name("metrics".into()).spawn(move || {
        while !st.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                    let _ = answer(&mut s, &*render);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })?;
    Ok(MetricsServer { addr: local, stop, thread: Some(thread) })
}

fn answer(s: &mut std::net::TcpStream, render: &(dyn Fn() -> String + Send + Sync)) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 8192 {
            return reply(s, "400 Bad Request", "text/plain", "request head too large\n");
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) if path == "/metrics" || path.starts_with("/metrics?") => {
            reply(s, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &render())
        }
        (Some(_), Some(_)) => reply(s, "404 Not Found", "text/plain", "try GET /metrics\n"),
        _ => reply(s, "400 Bad Request", "text/plain", "bad request\n"),
    }
}

fn reply(s: &mut std::net::TcpStream, status: &str, ctype: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

/// Check `text` against the Prometheus text exposition format (0.0.4) as strictly as
/// `promtool check metrics` does for what this crate emits: metric and label names, label
/// value escapes, numeric values, `# TYPE` before a family's samples and only once, a
/// family's samples together, no repeated series, counters named `_total`, and histograms
/// with increasing `le` bounds, non-decreasing cumulative counts, a `+Inf` bucket equal to
/// `_count`, and a `_sum`. Returns every problem found.
pub fn check_exposition(text: &str) -> Result<(), Vec<String>> {
    use std::collections::{HashMap, HashSet};
    let mut errs = Vec::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut seen_series = HashSet::new();
    let mut finished_families: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    /// What a histogram family has shown so far.
    struct Hist {
        last_le: f64,
        last_count: f64,
        inf: Option<f64>,
        count: Option<f64>,
        sum: bool,
    }
    let mut hist: HashMap<String, Hist> = HashMap::new();
    let name_ok = |n: &str| {
        let mut c = n.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    };
    let label_ok = |n: &str| {
        let mut c = n.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
    };
    let parse_value = |v: &str| match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse::<f64>().ok(),
    };
    for (i, line) in text.lines().enumerate() {
        let ln = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut w = rest.trim_start().splitn(3, ' ');
            match (w.next(), w.next(), w.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !name_ok(name) {
                        errs.push(format!("line {ln}: bad metric name {name:?}"));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind.trim()) {
                        errs.push(format!("line {ln}: unknown type {kind:?}"));
                    }
                    if types.insert(name.to_string(), kind.trim().to_string()).is_some() {
                        errs.push(format!("line {ln}: second TYPE for {name}"));
                    }
                    if kind.trim() == "counter" && !name.ends_with("_total") {
                        errs.push(format!("line {ln}: counter {name} should end in _total"));
                    }
                    if let Some(c) = current.replace(name.to_string()) {
                        finished_families.insert(c);
                    }
                }
                (Some("HELP"), Some(name), _) if !name_ok(name) => {
                    errs.push(format!("line {ln}: bad metric name {name:?}"))
                }
                _ => {}
            }
            continue;
        }
        // name{labels} value [timestamp]
        let (name, rest) = match line.find(['{', ' ']) {
            Some(p) => (&line[..p], &line[p..]),
            None => {
                errs.push(format!("line {ln}: no value"));
                continue;
            }
        };
        if !name_ok(name) {
            errs.push(format!("line {ln}: bad metric name {name:?}"));
        }
        let mut label_pairs = Vec::new();
        let rest = if let Some(r) = rest.strip_prefix('{') {
            // Labels: k="v",... with escapes in v.
            let b = r.as_bytes();
            let mut j = 0;
            let mut ok = true;
            loop {
                if j < b.len() && b[j] == b'}' {
                    j += 1;
                    break;
                }
                let k0 = j;
                while j < b.len() && b[j] != b'=' {
                    j += 1;
                }
                let key = &r[k0..j.min(r.len())];
                if !label_ok(key) || j + 1 >= b.len() || b[j + 1] != b'"' {
                    ok = false;
                    break;
                }
                j += 2;
                let mut val = String::new();
                while j < b.len() && b[j] != b'"' {
                    if b[j] == b'\\' {
                        match b.get(j + 1) {
                            Some(b'\\') => val.push('\\'),
                            Some(b'"') => val.push('"'),
                            Some(b'n') => val.push('\n'),
                            _ => ok = false,
                        }
                        j += 2;
                    } else {
                        val.push(b[j] as char);
                        j += 1;
                    }
                }
                if j >= b.len() {
                    ok = false;
                    break;
                }
                j += 1; // closing quote
                label_pairs.push((key.to_string(), val));
                if j < b.len() && b[j] == b',' {
                    j += 1;
                }
            }
            if !ok {
                errs.push(format!("line {ln}: bad labels"));
                continue;
            }
            &r[j..]
        } else {
            rest
        };
        let mut fields = rest.split_whitespace();
        let Some(value) = fields.next().and_then(parse_value) else {
            errs.push(format!("line {ln}: bad value"));
            continue;
        };
        if let Some(ts) = fields.next() {
            if ts.parse::<i64>().is_err() {
                errs.push(format!("line {ln}: bad timestamp"));
            }
        }
        // The family this sample belongs to.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| {
                name.strip_suffix(suf).filter(|f| types.get(*f).is_some_and(|t| t == "histogram" || t == "summary"))
            })
            .unwrap_or(name)
            .to_string();
        if !types.contains_key(&family) {
            errs.push(format!("line {ln}: sample {name} before its TYPE"));
        }
        if current.as_deref() != Some(family.as_str()) || finished_families.contains(&family) {
            errs.push(format!("line {ln}: sample of {family} outside its family's block"));
        }
        let mut key_labels = label_pairs.clone();
        key_labels.sort();
        if !seen_series.insert((name.to_string(), key_labels)) {
            errs.push(format!("line {ln}: repeated series {name}"));
        }
        if types.get(&family).is_some_and(|t| t == "histogram") {
            let h = hist.entry(family.clone()).or_insert(Hist {
                last_le: f64::NEG_INFINITY,
                last_count: 0.0,
                inf: None,
                count: None,
                sum: false,
            });
            if name.ends_with("_bucket") {
                let Some(le) = label_pairs.iter().find(|(k, _)| k == "le").and_then(|(_, v)| parse_value(v)) else {
                    errs.push(format!("line {ln}: bucket without a numeric le"));
                    continue;
                };
                if le <= h.last_le {
                    errs.push(format!("line {ln}: le not increasing"));
                }
                if value < h.last_count {
                    errs.push(format!("line {ln}: bucket counts not cumulative"));
                }
                h.last_le = le;
                h.last_count = value;
                if le.is_infinite() {
                    h.inf = Some(value);
                }
            } else if name.ends_with("_count") {
                h.count = Some(value);
            } else if name.ends_with("_sum") {
                h.sum = true;
            }
        }
    }
    for (f, Hist { inf, count, sum, .. }) in hist {
        match (inf, count) {
            (Some(a), Some(b)) if a == b => {}
            _ => errs.push(format!("histogram {f}: +Inf bucket missing or not equal to _count")),
        }
        if !sum {
            errs.push(format!("histogram {f}: no _sum"));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manager_exposition_is_valid_and_the_checker_catches_mistakes() {
        let stats = Stats::default();
        stats.inc(&stats.registrations);
        stats.setup_time.record(Duration::from_micros(700));
        stats.setup_time.record(Duration::from_secs(9));
        let text = render_manager(&stats);
        check_exposition(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        assert!(text.contains("nullpunch_manager_registrations_total 1\n"), "{text}");
        assert!(text.contains("nullpunch_manager_setup_seconds_bucket{le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("nullpunch_manager_setup_seconds_bucket{le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("nullpunch_manager_setup_seconds_count 2\n"), "{text}");
        assert!(text.contains("# TYPE nullpunch_manager_connections_open gauge\n"), "{text}");

        for bad in [
            "x_total 1\n",                                                          // no TYPE
            "# TYPE a counter\na 1\n",                                              // counter without _total
            "# TYPE a_total counter\na_total{b=\"1} 1\n",                         // unterminated label
            "# TYPE a_total counter\na_total one\n",                                // bad value
            "# TYPE a_total counter\na_total 1\na_total 2\n",                       // repeated series
            "# TYPE a_total counter\n# TYPE b gauge\nb 1\na_total 1\n",             // outside block
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",       // no +Inf
            "# TYPE 1x gauge\n",                                                    // bad name
        ] {
            assert!(check_exposition(bad).is_err(), "accepted: {bad}");
        }
    }
}
