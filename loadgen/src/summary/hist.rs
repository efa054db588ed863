//! Histogram summaries: percentiles from HdrHistogram (merged, never averaged).

use hdrhistogram::Histogram;

/// A latency histogram in microseconds, 1 us to 1 h, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Record a duration in microseconds (clamped into the histogram's range).
pub fn record(h: &mut Histogram<u64>, d: std::time::Duration) {
    let us = (d.as_micros() as u64).clamp(1, h.high());
    h.record(us).expect("clamped into range");
}

/// Milliseconds at quantile `q`, or None for an empty histogram.
pub fn ms_at(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

/// Largest recorded value in milliseconds.
pub fn max_ms(h: &Histogram<u64>) -> Option<f64> {
    (!h.is_empty()).then(|| h.max() as f64 / 1000.0)
}

/// One line: count, p50, p90, p99, p99.9, max (ms).
pub fn line(name: &str, h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("{name:<30} {:>8}", 0);
    }
    format!(
        "{name:<30} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
        h.len(),
        ms_at(h, 0.50).unwrap(),
        ms_at(h, 0.90).unwrap(),
        ms_at(h, 0.99).unwrap(),
        ms_at(h, 0.999).unwrap(),
        max_ms(h).unwrap()
    )
}

/// The table header matching [`line`].
pub fn header() -> String {
    format!("{:<30} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}", "(ms)", "count", "p50", "p90", "p99", "p99.9", "max")
}

/// A JSON number or null.
pub fn num(v: Option<f64>) -> serde_json::Value {
    match v {
        Some(x) if x.is_finite() => serde_json::json!((x * 1000.0).round() / 1000.0),
        _ => serde_json::Value::Null,
    }
}
