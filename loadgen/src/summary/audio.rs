//! The summary of an `audio-latency` run: mouth-to-ear percentiles, where the median's
//! milliseconds go, and what the jitter buffer did.

use hdrhistogram::Histogram;

use super::files::Record;
use super::metric::{MOUTH_TO_EAR, TRANSIT};
use super::{Span, Summary};
use crate::audio::Measured;
use crate::error::Error;
use crate::fleet;
use crate::scenario::{Audio, Output};

/// The summary of `a`, from what it measured, and with `--out` the record to write.
pub fn summarize(a: &Audio, options: &fleet::Options, output: &Output, m: &Measured) -> Result<Summary, Error> {
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (m2e, transit, send_late, rx, lookahead_ms) = (&m.m2e, &m.transit, &m.send_late, &m.receiver, m.lookahead_ms);
    let (found, missing) = (m.found, m.missing);
    let p50 = ms(m2e, 0.5);
    // Where the median's milliseconds go: capture of one frame, the codec's lookahead, the
    // frame's trip to the jitter buffer (sender lateness + network + simulated jitter), and
    // the rest: time waiting in the buffer for its tick (decode is under 0.1 ms).
    let buffer_ms = p50 - a.frame_ms as f64 - lookahead_ms - ms(transit, 0.5);
    let span = Span::new(m.started, m.ended, m.interrupted);
    let mut json = serde_json::json!({
        "scenario": "audio-latency",
        "frame_ms": a.frame_ms,
        "loss_pct": a.loss_pct,
        "jitter_ms": a.jitter_ms,
        "seed": a.seed,
        "io": options.io.as_str(),
        "samples": found,
        "missing": missing,
        "m2e_p50_ms": p50,
        "m2e_p90_ms": ms(m2e, 0.9),
        "m2e_p99_ms": ms(m2e, 0.99),
        "m2e_max_ms": m2e.max() as f64 / 1000.0,
        "m2e_min_ms": m2e.min() as f64 / 1000.0,
        "breakdown_ms": {
            "capture_frame": a.frame_ms,
            "codec_lookahead": lookahead_ms,
            "transit_p50": ms(transit, 0.5),
            "sender_late_p50": ms(send_late, 0.5),
            "jitter_buffer_and_tick": buffer_ms,
        },
        "frames_sent": m.frames_sent,
        "dropped_by_model": m.dropped_by_model,
        "played": rx.jitter.played,
        "concealed": rx.jitter.concealed,
        "lost": rx.jitter.lost,
        "late": rx.jitter.late,
        "expands": rx.jitter.expands,
        "accelerates": rx.jitter.accelerates,
        "buffer_target_ms": rx.jitter.target_us as f64 / 1000.0,
        "buffer_delay_ms": rx.jitter.delay_us as f64 / 1000.0,
        "decode_errors": rx.decode_errors,
        "transit_p99_ms": ms(transit, 0.99),
        "sender_late_p99_ms": ms(send_late, 0.99),
        "call": m.call_end,
    });
    let text = format!(
        "audio-latency: {} ms frames, loss {}%, jitter 0-{} ms, {} io\n\
         {}\
         mouth-to-ear: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} chirps found, {} missing)\n\
         where the median goes: capture {} ms + codec lookahead {:.1} ms + transit {:.1} ms (sender late {:.1}) + jitter buffer and tick {:.1} ms\n\
         jitter buffer: played {}, concealed {}, lost {}, late {}, expands {}, accelerates {}, target {:.1} ms, delay {:.1} ms\n",
        a.frame_ms,
        a.loss_pct,
        a.jitter_ms,
        options.io.as_str(),
        span.text(),
        p50,
        ms(m2e, 0.9),
        ms(m2e, 0.99),
        m2e.max() as f64 / 1000.0,
        found,
        missing,
        a.frame_ms,
        lookahead_ms,
        ms(transit, 0.5),
        ms(send_late, 0.5),
        buffer_ms,
        rx.jitter.played,
        rx.jitter.concealed,
        rx.jitter.lost,
        rx.jitter.late,
        rx.jitter.expands,
        rx.jitter.accelerates,
        rx.jitter.target_us as f64 / 1000.0,
        rx.jitter.delay_us as f64 / 1000.0,
    );
    span.set_in(&mut json);
    let record = output.dir.as_deref().map(|dir| {
        let title = format!(
            "mouth-to-ear latency, {} ms frames, loss {}%, jitter 0-{} ms, {} io",
            a.frame_ms,
            a.loss_pct,
            a.jitter_ms,
            options.io.as_str()
        );
        let mut r = Record::new(dir, json.clone(), &title, span.started_at);
        r.histograms = vec![(MOUTH_TO_EAR, m2e.clone()), (TRANSIT, transit.clone())];
        r
    });
    let all_ok = missing * 10 <= found + missing && !m.interrupted;
    Ok(Summary { json, text, all_ok, record })
}
