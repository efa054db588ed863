//! `loadgen audio-latency`: mouth-to-ear latency of a real call, measured on one clock.
//!
//! Two clients in this process (real `Client`s, a real driver, loopback sockets, the
//! in-process manager) set up a call. The caller's "microphone" is a signal with a 30 ms
//! chirp every `--period-ms`, captured in real time: frame k covers
//! [capture start + k F, + (k+1) F) and is encoded and sent when it is complete. The callee
//! plays through the jitter buffer and the decoder into an output timeline whose sample n
//! plays at (first tick + n / 48 kHz), as an ideal sound card fed by the ticks would.
//! Afterwards each chirp is found in the output by normalized cross-correlation; its
//! mouth-to-ear latency is where it plays minus where it was spoken.
//!
//! Impairments are applied on receipt, seeded: `--loss PCT` drops packets (Bernoulli),
//! `--jitter-ms J` delays each packet's arrival at the jitter buffer by a uniform 0..J ms
//! (the buffer sees it only from then on, so packets can also reorder).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::driver::{self, App, Ctx, Io, Streams};
use hdrhistogram::Histogram;
use proto::client::{Client, ClientConfig, Event, Received};
use proto::rng::Rng;
use proto::wire::frame::ClientId;
use voice::jitter::{JitterConfig, Playout};
use voice::voice::{Receiver, Sender};

use crate::summary::files as output;
use crate::summary::Summary as SetupOutcome;

/// What to measure.
#[derive(Debug, Clone)]
pub struct AudioConfig {
    /// Frame duration, ms.
    pub frame_ms: u32,
    /// Packets dropped on receipt, percent.
    pub loss_pct: f64,
    /// Uniform extra arrival delay 0..this, ms.
    pub jitter_ms: f64,
    /// Length of the measured talk, seconds.
    pub duration: Duration,
    /// One chirp every this many ms.
    pub period_ms: u32,
    /// Seed of the loss and jitter model.
    pub seed: u64,
    /// The jitter buffer's minimum delay, ms.
    pub min_delay_ms: f64,
    /// Local IP.
    pub bind_ip: std::net::IpAddr,
    /// External manager (default: in-process).
    pub manager: Option<SocketAddr>,
    /// UDP IO.
    pub io: Io,
    /// Record the run here.
    pub out: Option<std::path::PathBuf>,
}

/// What the two sides share with the analysis.
#[derive(Default)]
struct Shared {
    /// When the caller's capture started (its first frame's first sample).
    capture_start: Option<Instant>,
    /// First output tick (sample 0 of the output timeline).
    output_start: Option<Instant>,
    output: Vec<i16>,
    frames_sent: u64,
    /// Frame end to send, µs (the sender's own lateness).
    send_late: Option<Histogram<u64>>,
    /// Frame end to arrival at the jitter buffer, µs (sender lateness + network + simulated
    /// jitter).
    transit: Option<Histogram<u64>>,
    dropped_by_model: u64,
    receiver: Option<voice::voice::ReceiverStats>,
    lookahead: usize,
    call_ok: Option<bool>,
    call_end: Option<String>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

enum Side {
    Talker(Box<Talker>),
    Listener(Box<Listener>),
}

struct Talker {
    callee: ClientId,
    placed: bool,
    sender: Option<Sender>,
    handle: Option<proto::client::CallHandle>,
    next: Option<Instant>,
    hangup_at: Option<Instant>,
    frame: Duration,
    frames_total: u64,
    shared: Arc<Mutex<Shared>>,
    done: bool,
}

struct Listener {
    rx: Option<Receiver>,
    rng: Rng,
    streams: Streams,
    ts0: Option<u32>,
    pcm: Vec<i16>,
    shared: Arc<Mutex<Shared>>,
    cfg: AudioConfig,
    done: bool,
}

impl App for Side {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) {
        match self {
            Side::Talker(t) => match event {
                Event::Registered { .. } if !t.placed => {
                    t.placed = true;
                    if let Err(e) = ctx.client.call(ctx.now, t.callee.clone()) {
                        t.shared.lock().unwrap().call_end = Some(format!("cannot call: {e}"));
                        t.done = true;
                    }
                }
                Event::Started { handle, .. } => {
                    let mut s = t.shared.lock().unwrap();
                    s.capture_start = Some(ctx.now);
                    t.handle = Some(handle);
                    t.next = Some(ctx.now + t.frame);
                    if let Some(sd) = t.sender.as_mut() {
                        s.lookahead = sd.lookahead();
                    }
                }
                Event::Ended(r) => {
                    let mut s = t.shared.lock().unwrap();
                    s.call_ok = Some(r.succeeded());
                    s.call_end = Some(r.reason.describe());
                    t.done = true;
                }
                _ => {}
            },
            Side::Listener(l) => match event {
                Event::MediaFlowing { handle } => l.streams.start(handle, ctx.now, None),
                Event::Ended(r) => {
                    l.streams.stop(r.handle);
                    let mut s = l.shared.lock().unwrap();
                    s.receiver = l.rx.as_ref().map(|r| r.stats());
                    l.done = true;
                }
                _ => {}
            },
        }
    }

    fn on_media(&mut self, ctx: &mut Ctx<'_>, p: Received<'_>) {
        match self {
            // The callee's media keeps the call two-way; nothing is measured from it.
            Side::Talker(_) => {}
            Side::Listener(l) => {
                let mut s = l.shared.lock().unwrap();
                let Some(cap) = s.capture_start else { return };
                let ts0 = *l.ts0.get_or_insert(p.header.timestamp);
                let frame_end = cap
                    + Duration::from_micros(p.header.timestamp.wrapping_sub(ts0) as u64 * 1_000_000 / 48_000)
                    + Duration::from_millis(l.cfg.frame_ms as u64);
                // The impairment model, seeded: loss, then extra delay before the jitter
                // buffer may see the packet.
                if l.rng.chance(l.cfg.loss_pct / 100.0) {
                    s.dropped_by_model += 1;
                    return;
                }
                let extra = Duration::from_secs_f64(
                    (l.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * l.cfg.jitter_ms / 1000.0,
                );
                let arrival = ctx.now + extra;
                let transit = arrival.saturating_duration_since(frame_end).as_micros() as u64;
                let _ = s.transit.get_or_insert_with(hist).record(transit.max(1));
                let origin = s.capture_start.expect("checked");
                drop(s);
                let rx = l.rx.get_or_insert_with(|| {
                    let mut j = JitterConfig::new(l.cfg.frame_ms);
                    j.min_delay_us = (l.cfg.min_delay_ms * 1000.0) as u64;
                    Receiver::new(proto::wire::rtp::OPUS_PAYLOAD_TYPE, j).expect("opus decoder")
                });
                // The buffer's clock: µs since the capture started (one clock for both).
                let us = arrival.saturating_duration_since(origin).as_micros() as u64;
                rx.on_packet(p.header.payload_type, p.header.seq, p.header.timestamp, us, p.payload);
            }
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        match self {
            Side::Talker(t) => t.next.into_iter().chain(t.hangup_at).min(),
            Side::Listener(l) => {
                let origin = l.shared.lock().unwrap().capture_start;
                let tick =
                    l.rx.as_ref().and_then(|r| r.next_tick()).zip(origin).map(|(us, o)| o + Duration::from_micros(us));
                l.streams.next_wakeup().into_iter().chain(tick).min()
            }
        }
    }

    fn on_wakeup(&mut self, ctx: &mut Ctx<'_>) {
        match self {
            Side::Talker(t) => {
                let (Some(h), Some(sender)) = (t.handle, t.sender.as_mut()) else { return };
                let mut buf = [0u8; voice::codec::MAX_PAYLOAD];
                if t.hangup_at.is_some_and(|h| ctx.now >= h) {
                    t.hangup_at = None;
                    t.handle = None;
                    ctx.client.hangup_all(ctx.now);
                    return;
                }
                while let Some(next) = t.next.filter(|n| *n <= ctx.now) {
                    if sender.frames() >= t.frames_total {
                        // Talked long enough: hang up once the last frames have played and
                        // the listener's buffer has gone idle (so the silence after the
                        // end is not counted as concealment).
                        t.next = None;
                        t.hangup_at = Some(ctx.now + Duration::from_millis(1500));
                        break;
                    }
                    let n = match sender.next_payload(&mut buf) {
                        Ok(n) => n,
                        Err(_) => break,
                    };
                    let late = ctx.now.saturating_duration_since(next).as_micros() as u64;
                    let dur = sender.frame_samples() as u32;
                    let sent = ctx.send_media(h, &buf[..n], dur).is_ok();
                    let mut s = t.shared.lock().unwrap();
                    let _ = s.send_late.get_or_insert_with(hist).record(late.max(1));
                    if sent {
                        s.frames_sent += 1;
                    }
                    t.next = Some(next + t.frame);
                }
            }
            Side::Listener(l) => {
                l.streams.run(ctx);
                let Some(origin) = l.shared.lock().unwrap().capture_start else { return };
                let Some(rx) = l.rx.as_mut() else { return };
                while let Some(t) = rx.next_tick() {
                    let at = origin + Duration::from_micros(t);
                    if at > ctx.now {
                        break;
                    }
                    let p = rx.tick(&mut l.pcm);
                    let mut s = l.shared.lock().unwrap();
                    if s.output_start.is_none() {
                        if matches!(p, Playout::Silence) {
                            continue;
                        }
                        s.output_start = Some(at);
                    }
                    s.output.extend_from_slice(&l.pcm);
                }
            }
        }
    }

    fn done(&self) -> bool {
        match self {
            Side::Talker(t) => t.done,
            Side::Listener(l) => l.done,
        }
    }
}

/// Run the measurement.
pub fn run(cfg: AudioConfig) -> Result<SetupOutcome, String> {
    voice::codec::check_frame_ms(cfg.frame_ms).map_err(|e| e.to_string())?;
    if !(0.0..=100.0).contains(&cfg.loss_pct) || !(0.0..=1000.0).contains(&cfg.jitter_ms) {
        return Err("--loss must be 0..100 and --jitter-ms 0..1000".into());
    }
    if cfg.period_ms < 200 {
        return Err("--period-ms must be at least 200".into());
    }
    let (_mgr, manager) = match cfg.manager {
        Some(m) => (None, m),
        None => {
            let m = manager::start(crate::sys::embedded_manager(cfg.bind_ip, 1, cfg.io))
                .map_err(|e| format!("manager: {e}"))?;
            let a = m.local_addr();
            (Some(m), a)
        }
    };
    let shared = Arc::new(Mutex::new(Shared::default()));
    let burst = voice::signal::default_burst();
    let period = (cfg.period_ms as usize) * 48;
    let frame = voice::frame_samples(cfg.frame_ms);
    let frames_total = (cfg.duration.as_secs_f64() * 1000.0 / cfg.frame_ms as f64).ceil() as u64;
    let tag = engine::entropy::seed() % 1_000_000;
    let caller_id = ClientId::new(format!("al-talker-{tag}")).unwrap();
    let callee_id = ClientId::new(format!("al-listener-{tag}")).unwrap();
    let mk_client = |id: ClientId, udp: &std::net::UdpSocket| {
        let mut c = ClientConfig::new(id, udp.local_addr().unwrap().port());
        c.stun_server = Some(manager);
        c.auth = crate::sys::token_for(&c.id);
        Client::new(c, engine::entropy::seed())
    };
    let udp_t = std::net::UdpSocket::bind((cfg.bind_ip, 0)).map_err(|e| e.to_string())?;
    let udp_l = std::net::UdpSocket::bind((cfg.bind_ip, 0)).map_err(|e| e.to_string())?;
    let client_t = mk_client(caller_id, &udp_t);
    let client_l = mk_client(callee_id.clone(), &udp_l);
    let sender = Sender::new(cfg.frame_ms, Box::new(voice::signal::Bursts::new(burst.clone(), period, 30)))
        .map_err(|e| e.to_string())?;
    let talker = Side::Talker(Box::new(Talker {
        callee: callee_id,
        placed: false,
        sender: Some(sender),
        handle: None,
        next: None,
        hangup_at: None,
        frame: Duration::from_millis(cfg.frame_ms as u64),
        frames_total,
        shared: shared.clone(),
        done: false,
    }));
    let listener = Side::Listener(Box::new(Listener {
        rx: None,
        rng: Rng::new(cfg.seed),
        streams: Streams::new(Instant::now()),
        ts0: None,
        pcm: Vec::with_capacity(frame),
        shared: shared.clone(),
        cfg: cfg.clone(),
        done: false,
    }));
    let limit = cfg.duration + Duration::from_secs(20);
    match cfg.io {
        Io::Portable => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async move {
                udp_t.set_nonblocking(true).map_err(|e| e.to_string())?;
                udp_l.set_nonblocking(true).map_err(|e| e.to_string())?;
                let ut = tokio::net::UdpSocket::from_std(udp_t).map_err(|e| e.to_string())?;
                let ul = tokio::net::UdpSocket::from_std(udp_l).map_err(|e| e.to_string())?;
                let (mut ct, mut cl, mut at, mut al) = (client_t, client_l, talker, listener);
                let listen = driver::run(&mut cl, &ul, manager, &mut al, tokio::time::sleep(limit));
                let talk = async {
                    // The listener registers first.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    driver::run(&mut ct, &ut, manager, &mut at, tokio::time::sleep(limit)).await
                };
                let (a, b) = tokio::join!(listen, talk);
                a.map_err(|e| e.to_string())?;
                b.map_err(|e| e.to_string())?;
                Ok::<(), String>(())
            })?;
        }
        #[cfg(target_os = "linux")]
        Io::Uring => {
            let stop = engine::reactor::Stop::new();
            let st = stop.clone();
            let timer = std::thread::spawn(move || {
                std::thread::sleep(limit);
                st.stop();
            });
            let units = vec![
                engine::reactor::Unit { client: client_l, udp: udp_l, app: listener, wake: None, connect_at: None },
                engine::reactor::Unit {
                    client: client_t,
                    udp: udp_t,
                    app: talker,
                    wake: None,
                    connect_at: Some(Instant::now() + Duration::from_millis(200)),
                },
            ];
            let done =
                engine::reactor::run(units, manager, Some(&stop), &Default::default()).map_err(|e| e.to_string())?;
            for f in done {
                f.result.map_err(|e| e.to_string())?;
            }
            drop(timer);
        }
    }
    let s = std::mem::take(&mut *shared.lock().unwrap());
    analyse(&cfg, s, &burst, period)
}

fn analyse(cfg: &AudioConfig, s: Shared, burst: &[i16], period: usize) -> Result<SetupOutcome, String> {
    let (Some(cap), Some(out0)) = (s.capture_start, s.output_start) else {
        return Err(format!("the call carried no audio ({})", s.call_end.unwrap_or_else(|| "no call".into())));
    };
    let mut m2e = hist();
    let mut found = 0u64;
    let mut missing = 0u64;
    let spoken_samples = s.frames_sent as usize * voice::frame_samples(cfg.frame_ms);
    // Output sample 0 plays this long after capture sample 0.
    let offset_us = out0.saturating_duration_since(cap).as_micros() as i64;
    let mut j = 0usize;
    while j * period + burst.len() <= spoken_samples {
        // Spoken at capture sample j*period; in the output, search from where it would be
        // with zero latency up to just before the next chirp could match.
        let spoken_us = (j * period) as i64 * 1_000_000 / 48_000;
        let from_us = spoken_us - offset_us;
        let from = (from_us.max(0) as usize) * 48 / 1000;
        let to = from + period - burst.len() - 480;
        j += 1;
        match voice::signal::find_burst(&s.output, burst, from, to) {
            Some((at, r)) if r >= 0.5 => {
                let played_us = offset_us + at as i64 * 1_000_000 / 48_000;
                let lat = (played_us - spoken_us).max(1) as u64;
                let _ = m2e.record(lat);
                found += 1;
            }
            _ => missing += 1,
        }
    }
    if found == 0 {
        return Err(format!("no chirp was found in the played audio ({missing} sent)"));
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let transit = s.transit.clone().unwrap_or_else(hist);
    let send_late = s.send_late.clone().unwrap_or_else(hist);
    let rx = s.receiver.clone().unwrap_or_default();
    let lookahead_ms = s.lookahead as f64 / 48.0;
    let p50 = ms(&m2e, 0.5);
    // Where the median's milliseconds go: capture of one frame, the codec's lookahead, the
    // frame's trip to the jitter buffer (sender lateness + network + simulated jitter), and
    // the rest: time waiting in the buffer for its tick (decode is under 0.1 ms).
    let buffer_ms = p50 - cfg.frame_ms as f64 - lookahead_ms - ms(&transit, 0.5);
    let json = serde_json::json!({
        "scenario": "audio-latency",
        "frame_ms": cfg.frame_ms,
        "loss_pct": cfg.loss_pct,
        "jitter_ms": cfg.jitter_ms,
        "seed": cfg.seed,
        "io": cfg.io.as_str(),
        "samples": found,
        "missing": missing,
        "m2e_p50_ms": p50,
        "m2e_p90_ms": ms(&m2e, 0.9),
        "m2e_p99_ms": ms(&m2e, 0.99),
        "m2e_max_ms": m2e.max() as f64 / 1000.0,
        "m2e_min_ms": m2e.min() as f64 / 1000.0,
        "breakdown_ms": {
            "capture_frame": cfg.frame_ms,
            "codec_lookahead": lookahead_ms,
            "transit_p50": ms(&transit, 0.5),
            "sender_late_p50": ms(&send_late, 0.5),
            "jitter_buffer_and_tick": buffer_ms,
        },
        "frames_sent": s.frames_sent,
        "dropped_by_model": s.dropped_by_model,
        "played": rx.jitter.played,
        "concealed": rx.jitter.concealed,
        "lost": rx.jitter.lost,
        "late": rx.jitter.late,
        "expands": rx.jitter.expands,
        "accelerates": rx.jitter.accelerates,
        "buffer_target_ms": rx.jitter.target_us as f64 / 1000.0,
        "buffer_delay_ms": rx.jitter.delay_us as f64 / 1000.0,
        "decode_errors": rx.decode_errors,
        "transit_p99_ms": ms(&transit, 0.99),
        "sender_late_p99_ms": ms(&send_late, 0.99),
        "call": s.call_end,
    });
    let text = format!(
        "audio-latency: {} ms frames, loss {}%, jitter 0-{} ms, {} io\n\
         mouth-to-ear: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} chirps found, {} missing)\n\
         where the median goes: capture {} ms + codec lookahead {:.1} ms + transit {:.1} ms (sender late {:.1}) + jitter buffer and tick {:.1} ms\n\
         jitter buffer: played {}, concealed {}, lost {}, late {}, expands {}, accelerates {}, target {:.1} ms, delay {:.1} ms\n",
        cfg.frame_ms,
        cfg.loss_pct,
        cfg.jitter_ms,
        cfg.io.as_str(),
        p50,
        ms(&m2e, 0.9),
        ms(&m2e, 0.99),
        m2e.max() as f64 / 1000.0,
        found,
        missing,
        cfg.frame_ms,
        lookahead_ms,
        ms(&transit, 0.5),
        ms(&send_late, 0.5),
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
    if let Some(dir) = &cfg.out {
        output::write_run(
            dir,
            &json,
            &[("m2e", "mouth-to-ear", &m2e), ("transit", "frame end to jitter buffer", &transit)],
            &format!(
                "mouth-to-ear latency, {} ms frames, loss {}%, jitter 0-{} ms",
                cfg.frame_ms, cfg.loss_pct, cfg.jitter_ms
            ),
        )
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(SetupOutcome { json, text, all_ok: missing * 10 <= found + missing })
}
