//! A run's results on disk: `command.txt`, `machine.txt`, `summary.json`, per metric an
//! `.hgrm` percentile table (the HdrHistogram text format, values in milliseconds) and an
//! `.hlog` interval log (the HdrHistogram log format: the full histogram, values in
//! microseconds, which `loadgen report` and `loadgen merge` read back), and `latency.svg`,
//! the percentile curves of all metrics on one plot; a soak's intervals (`intervals.csv`,
//! `intervals.svg`, `media_latency_intervals.hlog`); `hostile`'s `report.txt` and the runs
//! under it. A scenario describes all of it in a [`Record`], written after its summary is
//! printed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use super::metric::Metric;
use crate::calls::IntervalSample;
use crate::error::Error;
use crate::sys;

/// What a run's `--out` directory gets. A scenario builds it with its summary; it is
/// written once the summary is printed ([`super::Summary::print_then_write`]).
pub struct Record {
    /// The directory (created if needed).
    pub dir: PathBuf,
    /// `command.txt`: the command line.
    pub command: String,
    /// `machine.txt`: cores, memory, kernel and CPU model.
    pub machine: String,
    /// `summary.json`: the summary JSON, pretty-printed.
    pub summary: serde_json::Value,
    /// The run's start: the `StartTime` of its `.hlog` files.
    pub started_at: SystemTime,
    /// Per metric an `.hgrm` and an `.hlog` file, and `latency.svg` with them all.
    pub histograms: Vec<(Metric, Histogram<u64>)>,
    /// The plots' title: the scenario and its parameters.
    pub title: String,
    /// The soak's intervals: `intervals.csv`, `intervals.svg` and
    /// `media_latency_intervals.hlog`.
    pub intervals: Vec<IntervalSample>,
    /// `report.txt`: the text report (`hostile`).
    pub report: Option<String>,
    /// Runs recorded in subdirectories of `dir` (`hostile`'s `clean/` and `attacked/`).
    pub runs: Vec<Record>,
}

impl Record {
    /// The record of a run of this process into `dir`: its command line, this machine, the
    /// summary JSON `summary`, and plots titled `title`; no histograms yet.
    pub fn new(dir: &Path, summary: serde_json::Value, title: &str, started_at: SystemTime) -> Record {
        let args: Vec<String> = std::env::args().collect();
        Record {
            dir: dir.to_path_buf(),
            command: shell_words(&args),
            machine: machine(),
            summary,
            started_at,
            histograms: Vec::new(),
            title: title.to_string(),
            intervals: Vec::new(),
            report: None,
            runs: Vec::new(),
        }
    }

    /// Write the files into `dir`, created if needed, and the subdirectories' runs.
    pub fn write(&self) -> Result<(), Error> {
        let dir = &self.dir;
        std::fs::create_dir_all(dir).map_err(Error::write(dir))?;
        let file =
            |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).map_err(Error::write(dir.join(name)));
        file("command.txt", format!("{}\n", self.command.trim_end()).as_bytes())?;
        file("machine.txt", self.machine.as_bytes())?;
        let summary = serde_json::to_string_pretty(&self.summary).expect("a JSON value serializes");
        file("summary.json", format!("{summary}\n").as_bytes())?;
        if let Some(report) = &self.report {
            file("report.txt", report.as_bytes())?;
        }
        for (m, h) in &self.histograms {
            file(&format!("{}.hgrm", m.stem), hgrm(h).as_bytes())?;
            file(&format!("{}.hlog", m.stem), &hlog(m.label, h, self.started_at).map_err(Error::write(dir))?)?;
        }
        if !self.histograms.is_empty() {
            let path = dir.join("latency.svg");
            plot(&path, &self.histograms, &self.title)
                .map_err(|e| Error::write(&path)(std::io::Error::other(e.to_string())))?;
        }
        if !self.intervals.is_empty() {
            write_intervals(dir, &self.intervals, &self.title, self.started_at)?;
        }
        for run in &self.runs {
            run.write()?;
        }
        Ok(())
    }
}

/// The command line, quoted for a shell where an argument needs it.
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,".contains(c)) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Cores, kernel and CPU model of this machine.
pub fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string()))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1048576.0))
        .unwrap_or_default();
    format!("cores: {}\nmemory: {mem}\nkernel: {}\ncpu: {cpu}\n", sys::cores(), kernel.trim())
}

/// The HdrHistogram percentile distribution text format, values in milliseconds.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
    if h.is_empty() {
        return s;
    }
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 { format!("{:>14.2}", 1.0 / (1.0 - q)) } else { String::new() };
        let _ = writeln!(s, "{:>12.3} {:>14.12} {:>10} {inv}", v.value_iterated_to() as f64 / 1000.0, q, total);
    }
    let _ = writeln!(s, "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]", h.mean() / 1000.0, h.stdev() / 1000.0);
    let _ = writeln!(s, "#[Max     = {:>12.3}, Total count    = {:>12}]", h.max() as f64 / 1000.0, h.len());
    let _ = writeln!(s, "#[Buckets = {:>12}, SubBuckets     = {:>12}]", h.buckets(), h.distinct_values());
    s
}

/// The x axis of the percentile plot: 1/(1-percentile) on a log scale, from 0% to 99.999%.
const PERCENTILE_X_MAX: f64 = 100_000.0;

/// Percentile curves: x is 1/(1-percentile) on a log axis (0%, 90%, 99%, 99.9%, 99.99%,
/// 99.999%), y is milliseconds.
fn plot(path: &Path, metrics: &[(Metric, Histogram<u64>)], title: &str) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = metrics.iter().filter(|(_, h)| !h.is_empty()).map(|(_, h)| h.max() as f64 / 1000.0).fold(0.1, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        // The last x label (99.999%) is centred on the axis' end: room for its right half.
        .margin_right(45)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((1.0f64..PERCENTILE_X_MAX).log_scale(), 0.0..ymax * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("milliseconds")
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 1.0 / x);
            // 90% -> 0 decimals, 99.9% -> 1, 99.99% -> 2, ...
            let digits = (-(100.0 - p).max(1e-9).log10()).round().max(0.0) as usize;
            format!("{p:.digits$}%")
        })
        .x_labels(6)
        .draw()?;
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK, RGBColor(230, 140, 0), RGBColor(128, 128, 128)];
    for (i, (m, h)) in metrics.iter().enumerate() {
        if h.is_empty() {
            continue;
        }
        // The last point (the max) is drawn at 1/(1-q) = 2n, as HdrHistogram's plotter does.
        let last_x = (2.0 * h.len() as f64).min(PERCENTILE_X_MAX);
        let pts: Vec<(f64, f64)> = h
            .iter_quantiles(5)
            .map(|v| {
                let q = v.quantile_iterated_to();
                let x = if q < 1.0 { (1.0 / (1.0 - q)).min(last_x) } else { last_x };
                (x, v.value_iterated_to() as f64 / 1000.0)
            })
            .collect();
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(m.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

/// `h` as a one-interval HdrHistogram log (tag: the metric's label, without spaces) that
/// starts at `start`.
fn hlog(label: &str, h: &Histogram<u64>, start: SystemTime) -> std::io::Result<Vec<u8>> {
    use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
    let mut out = Vec::new();
    let mut ser = hdrhistogram::serialization::V2DeflateSerializer::new();
    let mut b = IntervalLogWriterBuilder::new();
    b.add_comment(&format!("nullpunch loadgen: {label} (values in microseconds)"))
        .with_start_time(start)
        .with_max_value_divisor(1000.0);
    let mut w = b.begin_log_with(&mut out, &mut ser)?;
    let tag: String =
        label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    w.write_histogram(h, std::time::Duration::ZERO, std::time::Duration::ZERO, Tag::new(&tag))
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    drop(w);
    Ok(out)
}

/// Every histogram in an HdrHistogram log, added together (a run's `.hlog` file has one).
pub fn read_hlog(path: &Path) -> Result<Histogram<u64>, Error> {
    use base64::Engine as _;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    let bad = |reason: String| Error::BadLog { path: path.to_path_buf(), reason };
    let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    let mut total = super::hist::new_histogram();
    let mut de = hdrhistogram::serialization::Deserializer::new();
    for entry in IntervalLogIterator::new(&bytes) {
        match entry {
            Ok(LogEntry::Interval(ilh)) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(ilh.encoded_histogram())
                    .map_err(|e| bad(format!("bad base64: {e}")))?;
                let h: Histogram<u64> =
                    de.deserialize(&mut std::io::Cursor::new(raw)).map_err(|e| bad(format!("bad histogram: {e:?}")))?;
                total.add(&h).map_err(|source| Error::Histogram { what: path.display().to_string(), source })?;
            }
            Ok(_) => {}
            Err(e) => return Err(bad(format!("bad log line: {e:?}"))),
        }
    }
    Ok(total)
}

/// `intervals.csv` (loss in percent, `loss_pct`), `intervals.svg` (delivered packets/s,
/// loss, latency p50 and p99, CPU, RSS and open descriptors over time, titled `title`) and
/// `media_latency_intervals.hlog` (one histogram per interval, HdrHistogram log format,
/// starting at `start`).
fn write_intervals(dir: &Path, rows: &[IntervalSample], title: &str, start: SystemTime) -> Result<(), Error> {
    let mut csv =
        String::from("t_s,secs,pps,loss_pct,jitter_ms,latency_p50_ms,latency_p99_ms,latency_max_ms,rss_mb,fds,cores\n");
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
    for r in rows {
        let _ = writeln!(
            csv,
            "{:.1},{:.2},{:.0},{:.4},{},{},{},{},{},{},{:.3}",
            r.t_s,
            r.secs,
            r.pps,
            loss_pct(r),
            r.jitter_ms.map(|j| format!("{j:.3}")).unwrap_or_default(),
            ms(r.latency_ms[0]),
            ms(r.latency_ms[1]),
            ms(r.latency_ms[2]),
            r.rss_mb.map(|m| format!("{m:.1}")).unwrap_or_default(),
            r.fds.map(|f| f.to_string()).unwrap_or_default(),
            r.cores
        );
    }
    let path = |name: &str| dir.join(name);
    std::fs::write(path("intervals.csv"), csv).map_err(Error::write(path("intervals.csv")))?;
    let hlog = interval_hlog(rows, start).map_err(Error::write(path("media_latency_intervals.hlog")))?;
    std::fs::write(path("media_latency_intervals.hlog"), hlog)
        .map_err(Error::write(path("media_latency_intervals.hlog")))?;
    plot_intervals(&path("intervals.svg"), rows, title)
        .map_err(|e| Error::write(path("intervals.svg"))(std::io::Error::other(e.to_string())))
}

/// The interval's loss in percent of the frames sent in it: the text report, the CSV and the
/// plot all show this.
pub fn loss_pct(r: &IntervalSample) -> f64 {
    r.loss.max(0.0) * 100.0
}

/// The interval log: each interval's histogram at its start offset.
fn interval_hlog(rows: &[IntervalSample], start: SystemTime) -> std::io::Result<Vec<u8>> {
    use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
    let mut out = Vec::new();
    let mut ser = hdrhistogram::serialization::V2DeflateSerializer::new();
    let mut b = IntervalLogWriterBuilder::new();
    b.add_comment("nullpunch loadgen: media one-way latency per interval (values in microseconds)")
        .with_start_time(start)
        .with_max_value_divisor(1000.0);
    let mut w = b.begin_log_with(&mut out, &mut ser)?;
    let mut de = hdrhistogram::serialization::Deserializer::new();
    for r in rows {
        let h: Histogram<u64> = de
            .deserialize(&mut std::io::Cursor::new(&r.latency_hist))
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let start = std::time::Duration::from_secs_f64((r.t_s - r.secs).max(0.0));
        w.write_histogram(&h, start, std::time::Duration::from_secs_f64(r.secs), Tag::new("media_latency"))
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    }
    drop(w);
    Ok(out)
}

/// One line of an interval plot: its legend, its colour and how to read it from a row.
struct Line {
    name: &'static str,
    color: RGBColor,
    value: fn(&IntervalSample) -> Option<f64>,
}

/// One panel of an interval plot.
struct Panel {
    caption: &'static str,
    lines: &'static [Line],
}

/// What the soak's growth check and loss bound read, panel by panel.
const INTERVAL_PANELS: [Panel; 6] = [
    Panel { caption: "packets/s delivered", lines: &[Line { name: "pps", color: BLUE, value: |r| Some(r.pps) }] },
    Panel {
        caption: "loss: not delivered by the interval's end (in flight included), % of sent",
        lines: &[Line { name: "loss %", color: MAGENTA, value: |r| Some(loss_pct(r)) }],
    },
    Panel {
        caption: "one-way latency, ms",
        lines: &[
            Line { name: "p50", color: GREEN, value: |r| r.latency_ms[0] },
            Line { name: "p99", color: RED, value: |r| r.latency_ms[1] },
        ],
    },
    Panel { caption: "CPU, cores busy", lines: &[Line { name: "cores", color: CYAN, value: |r| Some(r.cores) }] },
    Panel { caption: "RSS, MiB", lines: &[Line { name: "rss", color: BLACK, value: |r| r.rss_mb }] },
    Panel {
        caption: "open file descriptors",
        lines: &[Line { name: "fds", color: BLACK, value: |r| r.fds.map(|n| n as f64) }],
    },
];

fn plot_intervals(path: &Path, rows: &[IntervalSample], title: &str) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 1360)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let areas = root.split_evenly((INTERVAL_PANELS.len(), 1));
    let tmax = rows.iter().map(|r| r.t_s).fold(1.0, f64::max);
    for (area, panel) in areas.iter().zip(INTERVAL_PANELS.iter()) {
        let lines: Vec<(&Line, Vec<(f64, f64)>)> = panel
            .lines
            .iter()
            .map(|l| (l, rows.iter().filter_map(|r| (l.value)(r).map(|v| (r.t_s, v))).collect()))
            .collect();
        let ymax = lines.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.1)).fold(0.0, f64::max).max(1e-3) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(panel.caption, ("sans-serif", 16))
            .margin(10)
            // Room for the right half of the last x label, centred on the axis' end.
            .margin_right(25)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..tmax, 0.0..ymax)?;
        chart.configure_mesh().x_desc("seconds").draw()?;
        for (line, pts) in lines {
            let color = line.color;
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(line.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        if panel.lines.len() > 1 {
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        }
    }
    root.present()?;
    Ok(())
}
