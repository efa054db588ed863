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

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::driver::{App, Ctx, Streams};
use hdrhistogram::Histogram;
use proto::client::{Event, Received};
use proto::rng::Rng;
use proto::wire::frame::ClientId;
use voice::jitter::{JitterConfig, Playout};
use voice::voice::{Receiver, Sender};

use crate::error::Error;
use crate::fleet::{self, Carries, Clients, Fleet, Member, Spec};
use crate::scenario::{Audio, Output};
use crate::summary::{self, Summary};
use crate::target::Target;

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
    cfg: Audio,
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

/// What an `audio-latency` run measured, for its summary.
pub struct Measured {
    /// Mouth-to-ear latency of every chirp found, µs.
    pub m2e: Histogram<u64>,
    /// Chirps found.
    pub found: u64,
    /// Chirps spoken and not found.
    pub missing: u64,
    /// Frame end to arrival at the jitter buffer, µs.
    pub transit: Histogram<u64>,
    /// Frame end to send, µs.
    pub send_late: Histogram<u64>,
    /// The receiver's statistics.
    pub receiver: voice::voice::ReceiverStats,
    /// The codec's lookahead, ms.
    pub lookahead_ms: f64,
    /// Frames the talker sent.
    pub frames_sent: u64,
    /// Packets the impairment model dropped.
    pub dropped_by_model: u64,
    /// How the call ended.
    pub call_end: Option<String>,
    /// When the caller's capture started.
    pub started: Instant,
    /// When both sides had ended.
    pub ended: Instant,
    /// The run was stopped before its end (its summary says `INTERRUPTED: partial results`).
    pub interrupted: bool,
}

/// Run the measurement.
pub fn run(a: &Audio, target: &Target, options: &fleet::Options, output: &Output) -> Result<Summary, Error> {
    let manager = target.connect()?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let burst = voice::signal::default_burst();
    let period = (a.period_ms as usize) * 48;
    let frames_total = (a.duration.as_secs_f64() * 1000.0 / a.frame_ms as f64).ceil() as u64;
    let tag = engine::entropy::seed() % 1_000_000;
    let (talker_id, listener_id) = (format!("al-talker-{tag}"), format!("al-listener-{tag}"));
    let clients = Clients::new(manager.addr(), target);
    // Member 0 is the listener, member 1 the talker.
    let make = {
        let (shared, burst, a, ip) = (shared.clone(), burst.clone(), a.clone(), options.bind_ip);
        move |i: usize| {
            let id = if i == 0 { &listener_id } else { &talker_id };
            let (udp, client) = clients.make(id, ip, engine::entropy::seed(), Carries::Few)?;
            let app = if i == 0 {
                Side::Listener(Box::new(Listener {
                    rx: None,
                    rng: Rng::new(a.seed),
                    streams: Streams::new(Instant::now()),
                    ts0: None,
                    pcm: Vec::with_capacity(voice::frame_samples(a.frame_ms)),
                    shared: shared.clone(),
                    cfg: a.clone(),
                    done: false,
                }))
            } else {
                let capture = Box::new(voice::signal::Bursts::new(burst.clone(), period, 30));
                Side::Talker(Box::new(Talker {
                    callee: ClientId::new(listener_id.clone()).expect("valid id"),
                    placed: false,
                    sender: Some(Sender::new(a.frame_ms, capture)?),
                    handle: None,
                    next: None,
                    hangup_at: None,
                    frame: Duration::from_millis(a.frame_ms as u64),
                    frames_total,
                    shared: shared.clone(),
                    done: false,
                }))
            };
            Ok(Member { client, udp, app, wake: None })
        }
    };
    let spec = Spec {
        io: options.io,
        managers: manager.managers(),
        threads: 1,
        #[cfg(target_os = "linux")]
        ring: Default::default(),
        tls: target.tls.clone(),
    };
    // The listener registers first.
    let talker_at = Instant::now() + Duration::from_millis(200);
    let fleet = Fleet::build(&spec, 2, |_| 0, make)?.start(move |i| (i == 1).then_some(talker_at))?;
    // Both end with the call; at the latest when the talk and a margin are over.
    let limit = a.duration + Duration::from_secs(20);
    let stopper = fleet.stopper();
    std::thread::spawn(move || {
        // (Interrupted: the call ends now, and what was heard so far is analysed.)
        crate::interrupt::sleep_until(Instant::now() + limit);
        stopper.stop();
    });
    for f in fleet.finish()? {
        f.result?;
    }
    let ended = Instant::now();
    drop(manager);
    let s = std::mem::take(&mut *shared.lock().unwrap());
    let measured = analyse(a, s, &burst, period, ended)?;
    summary::audio::summarize(a, options, output, &measured)
}

/// Find each chirp in the played audio: its mouth-to-ear latency is where it plays minus
/// where it was spoken. The run ended at `ended`.
fn analyse(a: &Audio, s: Shared, burst: &[i16], period: usize, ended: Instant) -> Result<Measured, Error> {
    let (Some(cap), Some(out0)) = (s.capture_start, s.output_start) else {
        return Err(Error::NoAudio(s.call_end.unwrap_or_else(|| "no call".into())));
    };
    let mut m2e = hist();
    let mut found = 0u64;
    let mut missing = 0u64;
    let spoken_samples = s.frames_sent as usize * voice::frame_samples(a.frame_ms);
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
        return Err(Error::NoChirp { sent: missing });
    }
    Ok(Measured {
        m2e,
        found,
        missing,
        transit: s.transit.clone().unwrap_or_else(hist),
        send_late: s.send_late.clone().unwrap_or_else(hist),
        receiver: s.receiver.clone().unwrap_or_default(),
        lookahead_ms: s.lookahead as f64 / 48.0,
        frames_sent: s.frames_sent,
        dropped_by_model: s.dropped_by_model,
        call_end: s.call_end,
        started: cap,
        ended,
        interrupted: crate::interrupt::interrupted(),
    })
}
