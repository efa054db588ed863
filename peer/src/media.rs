//! What a call carries, for `peer`: synthetic frames (the default), Opus voice from a WAV
//! file, a test signal or the sound device, or RTP forwarded from a local program; and on
//! the receiving side a jitter buffer and decoder playing to a WAV file or the sound device,
//! and/or the received RTP handed on to a local player.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::driver::{Ctx, Streams};
use proto::client::{CallHandle, MediaFields, Received};
use proto::wire::rtp::RtpHeader;
use voice::jitter::JitterConfig;
use voice::voice::{Capture, Receiver, Sender};

/// Where the sent audio comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum AudioIn {
    /// A WAV file (48 kHz; mixed to mono), then silence.
    Wav(PathBuf),
    /// A 440 Hz tone.
    Tone,
    /// A 30 ms chirp every 500 ms over a faint noise floor.
    Chirp,
    /// Digital silence.
    Silence,
    /// The sound device's microphone (PulseAudio), by name or the default.
    Device(Option<String>),
}

/// Where received audio goes.
#[derive(Debug, Clone, PartialEq)]
pub enum AudioOut {
    /// WAV files (48 kHz mono), one per call from its first played frame: the path for the
    /// first call, then the path with `-2`, `-3`, ... before its extension ([`numbered`]).
    Wav(PathBuf),
    /// The sound device's speaker (PulseAudio), by name or the default.
    Device(Option<String>),
}

/// Parse `wav:PATH`, `tone`, `chirp`, `silence` or `device[:NAME]`.
pub fn parse_audio_in(s: &str) -> Result<AudioIn, String> {
    match s {
        "tone" => Ok(AudioIn::Tone),
        "chirp" => Ok(AudioIn::Chirp),
        "silence" => Ok(AudioIn::Silence),
        "device" => Ok(AudioIn::Device(None)),
        _ => {
            if let Some(p) = s.strip_prefix("wav:").filter(|p| !p.is_empty()) {
                Ok(AudioIn::Wav(p.into()))
            } else if let Some(n) = s.strip_prefix("device:").filter(|n| !n.is_empty()) {
                Ok(AudioIn::Device(Some(n.into())))
            } else {
                Err(format!("{s:?}: expected wav:PATH, tone, chirp, silence or device[:NAME]"))
            }
        }
    }
}

/// Parse `wav:PATH` or `device[:NAME]`.
pub fn parse_audio_out(s: &str) -> Result<AudioOut, String> {
    if s == "device" {
        return Ok(AudioOut::Device(None));
    }
    if let Some(p) = s.strip_prefix("wav:").filter(|p| !p.is_empty()) {
        Ok(AudioOut::Wav(p.into()))
    } else if let Some(n) = s.strip_prefix("device:").filter(|n| !n.is_empty()) {
        Ok(AudioOut::Device(Some(n.into())))
    } else {
        Err(format!("{s:?}: expected wav:PATH or device[:NAME]"))
    }
}

/// Wakes the driver from another thread (the RTP forwarding thread, the sound device).
#[derive(Clone)]
pub enum Waker {
    /// The portable driver.
    Tokio(Arc<tokio::sync::Notify>),
    /// The io_uring driver.
    #[cfg(target_os = "linux")]
    Ring(Arc<engine::reactor::Wake>),
}

impl Waker {
    pub fn notify(&self) {
        match self {
            Waker::Tokio(n) => n.notify_one(),
            #[cfg(target_os = "linux")]
            Waker::Ring(w) => w.notify(),
        }
    }
}

/// Shared sample queue between the sound device's callbacks and the call.
pub type Pcm = Arc<Mutex<VecDeque<i16>>>;

/// Captured samples from the device, taken a frame at a time. If more than 100 ms pile up
/// (the device's clock runs fast against ours, or it delivered late), the oldest are
/// dropped so the delay stays bounded; if less than a frame is there, the rest is silence.
pub struct DeviceCapture {
    pcm: Pcm,
}

impl DeviceCapture {
    /// Read from `pcm`.
    pub fn new(pcm: Pcm) -> DeviceCapture {
        DeviceCapture { pcm }
    }
}

impl Capture for DeviceCapture {
    fn fill(&mut self, out: &mut [i16]) {
        let mut q = self.pcm.lock().expect("pcm lock");
        while q.len() > out.len() + 4_800 {
            q.pop_front();
        }
        for s in out.iter_mut() {
            *s = q.pop_front().unwrap_or(0);
        }
    }
}

/// What `peer` was asked to do with media.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Audio to send (None: synthetic frames, or forwarded RTP with `rtp_in`).
    pub audio_in: Option<AudioIn>,
    /// Where received Opus is played.
    pub audio_out: Option<AudioOut>,
    /// Frame duration, ms.
    pub frame_ms: u32,
    /// Local address on which RTP to forward to the peer arrives.
    pub rtp_in: Option<SocketAddr>,
    /// Where received RTP is handed on.
    pub rtp_out: Option<SocketAddr>,
    /// Payload type of our Opus stream and of received Opus.
    pub payload_type: u8,
    /// Jitter buffer minimum delay, ms.
    pub jitter_min_ms: f64,
    /// Pause (synthetic media only): from, for.
    pub pause: Option<(Duration, Duration)>,
}

/// Counters of the forwarding thread.
#[derive(Debug, Default)]
pub struct SharedCounters {
    /// RTP packets that arrived on `--rtp-in`.
    pub rtp_in: AtomicU64,
    /// ... dropped because the queue to the call was full.
    pub rtp_in_queue_full: AtomicU64,
}

/// Counters of forwarding, kept by the call's side.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ForwardCounters {
    /// RTP packets that arrived on `--rtp-in`.
    pub rtp_in: u64,
    /// ... dropped because the queue to the call was full.
    pub rtp_in_queue_full: u64,
    /// ... that were not RTP.
    pub rtp_in_malformed: u64,
    /// ... that were RTCP (not forwarded: it describes the local leg).
    pub rtp_in_rtcp: u64,
    /// ... dropped because no call had a path yet.
    pub rtp_in_no_call: u64,
    /// ... dropped because they exceed the largest datagram the engine sends.
    pub rtp_in_too_large: u64,
    /// ... sent to the peer.
    pub rtp_in_forwarded: u64,
    /// RTP packets handed on to `--rtp-out`.
    pub rtp_out: u64,
    /// ... whose send failed.
    pub rtp_out_errors: u64,
}

struct RtpIn {
    queue: Arc<Mutex<VecDeque<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Packets queued from `--rtp-in` at most (a few seconds of video).
const RTP_IN_QUEUE: usize = 8192;

impl RtpIn {
    fn start(sock: UdpSocket, waker: Waker, counters: Arc<SharedCounters>) -> RtpIn {
        let queue: Arc<Mutex<VecDeque<Vec<u8>>>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (q, st) = (queue.clone(), stop.clone());
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
        let thread = std::thread::Builder::new()
            .name("rtp-in".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !st.load(Ordering::Relaxed) {
                    let Ok((n, _)) = sock.recv_from(&mut buf) else { continue };
                    counters.rtp_in.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut q = q.lock().expect("queue lock");
                        if q.len() >= RTP_IN_QUEUE {
                            counters.rtp_in_queue_full.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        q.push_back(buf[..n].to_vec());
                    }
                    waker.notify();
                }
            })
            .expect("spawn rtp-in thread");
        RtpIn { queue, stop, thread: Some(thread) }
    }
}

impl Drop for RtpIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Sink {
    None,
    /// One WAV file per call.
    Wav {
        /// `--audio-out wav:PATH`.
        base: PathBuf,
        /// The first call's file, made at start-up (so a path that cannot be written is an
        /// error at once), until that call takes it.
        first: Option<voice::wav::WavWriter>,
        /// Calls that took a file so far.
        calls: u32,
    },
    Device(Pcm),
}

/// The WAV file of the `k`-th call (from 1): `base` for the first, then `-k` inserted
/// before the extension (`heard.wav`, `heard-2.wav`, `heard-3.wav`; `out` gives `out-2`).
pub fn numbered(base: &Path, k: u32) -> PathBuf {
    if k <= 1 {
        return base.to_path_buf();
    }
    let stem = base.file_stem().unwrap_or_default().to_string_lossy();
    let name = match base.extension() {
        Some(ext) => format!("{stem}-{k}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{k}"),
    };
    base.with_file_name(name)
}

struct CallMedia {
    /// The voice sender and when its next frame is due.
    sender: Option<(Sender, Instant)>,
    /// The sender follows the microphone's clock instead of its own timer.
    device_clocked: bool,
    /// Forwarding: packets go out as they come.
    forwarding: bool,
    hangup_at: Option<Instant>,
    receiver: Option<Receiver>,
    /// This call's WAV file (`--audio-out wav:`).
    wav: Option<voice::wav::WavWriter>,
    frames_sent: u64,
    frames_skipped: u64,
}

/// A call's media summary for its report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct MediaReport {
    /// What was sent: synthetic, opus or forwarded.
    pub sent_kind: &'static str,
    /// Opus frames sent.
    pub audio_frames_sent: u64,
    /// Frames the sender skipped because it fell behind.
    pub audio_frames_skipped: u64,
    /// Jitter buffer and decoder counters (when audio was played).
    pub played: u64,
    /// Frames concealed.
    pub concealed: u64,
    /// Slots whose packet never came.
    pub lost: u64,
    /// Packets that came after their slot.
    pub late: u64,
    /// Delay increases.
    pub expands: u64,
    /// Delay decreases.
    pub accelerates: u64,
    /// Jitter buffer delay at the end, ms.
    pub buffer_delay_ms: f64,
    /// Its target at the end, ms.
    pub buffer_target_ms: f64,
    /// Payloads that did not decode.
    pub decode_errors: u64,
    /// Frame duration received, ms.
    pub frame_ms_received: u32,
}

/// The media side of `peer`.
pub struct Media {
    cfg: MediaConfig,
    epoch: Instant,
    synthetic: Streams,
    calls: HashMap<CallHandle, CallMedia>,
    sink: Sink,
    capture: Option<Pcm>,
    wav_in: Option<Vec<i16>>,
    rtp_in: Option<RtpIn>,
    rtp_out: Option<UdpSocket>,
    shared: Arc<SharedCounters>,
    plain: ForwardCounters,
    pcm: Vec<i16>,
    payload: Vec<u8>,
    last_flush: Instant,
    /// Samples dropped because the speaker fell 200 ms behind.
    pub playback_dropped: u64,
    /// The first error that should end the program (a sink that cannot be written).
    pub fatal: Option<String>,
}

impl Media {
    /// Set up sources and sinks. `capture` and `playback` are the sound device's queues when
    /// a device is in use.
    pub fn new(
        cfg: MediaConfig,
        now: Instant,
        waker: Option<Waker>,
        capture: Option<Pcm>,
        playback: Option<Pcm>,
    ) -> Result<Media, String> {
        voice::codec::check_frame_ms(cfg.frame_ms).map_err(|e| e.to_string())?;
        let wav_in = match &cfg.audio_in {
            Some(AudioIn::Wav(p)) => {
                let w = voice::wav::read(p).map_err(|e| e.to_string())?;
                if w.rate != voice::SAMPLE_RATE {
                    return Err(format!(
                        "{}: {} Hz; --audio-in takes 48000 Hz WAV files (e.g. sox IN -r 48000 OUT)",
                        p.display(),
                        w.rate
                    ));
                }
                Some(w.samples)
            }
            _ => None,
        };
        let sink = match &cfg.audio_out {
            Some(AudioOut::Wav(p)) => Sink::Wav {
                base: p.clone(),
                first: Some(voice::wav::WavWriter::create(p, voice::SAMPLE_RATE).map_err(|e| e.to_string())?),
                calls: 0,
            },
            Some(AudioOut::Device(_)) => Sink::Device(playback.ok_or("no playback device")?),
            None => Sink::None,
        };
        let shared = Arc::new(SharedCounters::default());
        let rtp_in = match cfg.rtp_in {
            Some(addr) => {
                let sock = UdpSocket::bind(addr).map_err(|e| format!("--rtp-in {addr}: {e}"))?;
                let waker = waker.ok_or("--rtp-in needs a driver wake-up")?;
                Some(RtpIn::start(sock, waker, shared.clone()))
            }
            None => None,
        };
        let rtp_out = match cfg.rtp_out {
            Some(to) => {
                let any: SocketAddr =
                    if to.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
                let s = UdpSocket::bind(any).map_err(|e| format!("--rtp-out: {e}"))?;
                s.set_nonblocking(true).map_err(|e| e.to_string())?;
                Some(s)
            }
            None => None,
        };
        Ok(Media {
            cfg,
            epoch: now,
            synthetic: Streams::new(now),
            calls: HashMap::new(),
            sink,
            capture,
            wav_in,
            rtp_in,
            rtp_out,
            shared,
            plain: ForwardCounters::default(),
            pcm: Vec::new(),
            payload: vec![0u8; 1500],
            last_flush: now,
            playback_dropped: 0,
            fatal: None,
        })
    }

    fn us(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn at(&self, us: u64) -> Instant {
        self.epoch + Duration::from_micros(us)
    }

    fn new_receiver(&self) -> Option<Receiver> {
        self.cfg.audio_out.as_ref()?;
        let mut j = JitterConfig::new(self.cfg.frame_ms);
        j.min_delay_us = (self.cfg.jitter_min_ms * 1000.0) as u64;
        Receiver::new(self.cfg.payload_type, j).ok()
    }

    /// The path to the peer is open: start sending on `handle` (no-op if already sending),
    /// hanging up at `hangup_at`.
    pub fn start(&mut self, handle: CallHandle, now: Instant, hangup_at: Option<Instant>) {
        if self.calls.contains_key(&handle) {
            return;
        }
        let sender = match &self.cfg.audio_in {
            None => None,
            Some(a) => {
                let capture: Box<dyn Capture> = match a {
                    AudioIn::Wav(_) => Box::new(voice::voice::Samples::new(self.wav_in.clone().unwrap_or_default())),
                    AudioIn::Tone => Box::new(voice::signal::Tone::new(440.0, 8000.0)),
                    AudioIn::Chirp => Box::new(voice::signal::Bursts::new(voice::signal::default_burst(), 24_000, 30)),
                    AudioIn::Silence => Box::new(voice::voice::Silence),
                    AudioIn::Device(_) => Box::new(DeviceCapture::new(self.capture.clone().expect("device opened"))),
                };
                match Sender::new(self.cfg.frame_ms, capture) {
                    Ok(s) => Some((s, now + Duration::from_millis(self.cfg.frame_ms as u64))),
                    Err(e) => {
                        self.fatal = Some(format!("opus encoder: {e}"));
                        None
                    }
                }
            }
        };
        let forwarding = self.rtp_in.is_some();
        if sender.is_none() && !forwarding {
            self.synthetic.start(handle, now, hangup_at);
            if let Some((at, dur)) = self.cfg.pause {
                self.synthetic.pause(handle, now + at, now + at + dur);
            }
        }
        let receiver = self.new_receiver();
        let wav = match &mut self.sink {
            Sink::Wav { base, first, calls } => {
                *calls += 1;
                match first.take() {
                    Some(w) => Some(w),
                    None => {
                        let path = numbered(base, *calls);
                        match voice::wav::WavWriter::create(&path, voice::SAMPLE_RATE) {
                            Ok(w) => Some(w),
                            Err(e) => {
                                self.fatal.get_or_insert(e.to_string());
                                None
                            }
                        }
                    }
                }
            }
            _ => None,
        };
        let device_clocked = matches!(self.cfg.audio_in, Some(AudioIn::Device(_)));
        self.calls.insert(
            handle,
            CallMedia {
                sender,
                device_clocked,
                forwarding,
                hangup_at,
                receiver,
                wav,
                frames_sent: 0,
                frames_skipped: 0,
            },
        );
    }

    /// The call ended: its media summary.
    pub fn end(&mut self, handle: CallHandle) -> Option<MediaReport> {
        self.synthetic.stop(handle);
        let mut c = self.calls.remove(&handle)?;
        if let Some(w) = c.wav.take() {
            if let Err(e) = w.finish() {
                self.fatal.get_or_insert(e.to_string());
            }
        }
        let mut r = MediaReport {
            sent_kind: if c.forwarding {
                "forwarded"
            } else if c.sender.is_some() {
                "opus"
            } else {
                "synthetic"
            },
            audio_frames_sent: c.frames_sent,
            audio_frames_skipped: c.frames_skipped,
            ..Default::default()
        };
        if let Some(rx) = &c.receiver {
            let s = rx.stats();
            r.played = s.jitter.played;
            r.concealed = s.jitter.concealed;
            r.lost = s.jitter.lost;
            r.late = s.jitter.late;
            r.expands = s.jitter.expands;
            r.accelerates = s.jitter.accelerates;
            r.buffer_delay_ms = s.jitter.delay_us as f64 / 1000.0;
            r.buffer_target_ms = s.jitter.target_us as f64 / 1000.0;
            r.decode_errors = s.decode_errors;
            r.frame_ms_received = s.frame_ms;
        }
        self.flush();
        Some(r)
    }

    /// A media packet arrived.
    pub fn on_media(&mut self, now: Instant, p: &Received<'_>) {
        if let Some(out) = &self.rtp_out {
            // The engine receives at most MAX_DATAGRAM bytes, so header + payload fit.
            let mut pkt = [0u8; engine::driver::MAX_DATAGRAM];
            let n = p.header.emit(&mut pkt);
            let len = (n + p.payload.len()).min(pkt.len());
            pkt[n..len].copy_from_slice(&p.payload[..len - n]);
            match out.send_to(&pkt[..len], self.cfg.rtp_out.expect("set with the socket")) {
                Ok(_) => self.plain.rtp_out += 1,
                Err(_) => self.plain.rtp_out_errors += 1,
            }
        }
        let arrival = self.us(now);
        if let Some(c) = self.calls.get_mut(&p.handle) {
            if let Some(rx) = c.receiver.as_mut() {
                rx.on_packet(p.header.payload_type, p.header.seq, p.header.timestamp, arrival, p.payload);
            }
        }
    }

    /// Forwarding counters so far.
    pub fn forward_counters(&self) -> ForwardCounters {
        let mut c = self.plain.clone();
        c.rtp_in = self.shared.rtp_in.load(Ordering::Relaxed);
        c.rtp_in_queue_full = self.shared.rtp_in_queue_full.load(Ordering::Relaxed);
        c
    }

    /// When the media next needs the driver.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let mut t = self.synthetic.next_wakeup();
        for c in self.calls.values() {
            let cands = [
                c.sender.as_ref().map(|(_, at)| *at),
                c.hangup_at,
                c.receiver.as_ref().and_then(|r| r.next_tick()).map(|us| self.at(us)),
            ];
            for x in cands.into_iter().flatten() {
                t = Some(t.map_or(x, |t: Instant| t.min(x)));
            }
        }
        if self.rtp_in.is_some() || !matches!(self.sink, Sink::None) {
            // Poll the forwarding queue and flush the WAV at least every 250 ms.
            let x = self.last_flush + Duration::from_millis(250);
            t = Some(t.map_or(x, |t| t.min(x)));
        }
        t
    }

    /// Send what is due, play what is due, forward what came in, hang up what is over.
    pub fn on_wakeup(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        self.synthetic.run(ctx);
        let frame = Duration::from_millis(self.cfg.frame_ms as u64);
        let handles: Vec<CallHandle> = self.calls.keys().copied().collect();
        for h in handles {
            let Some(c) = self.calls.get_mut(&h) else { continue };
            if c.hangup_at.is_some_and(|t| now >= t) {
                c.hangup_at = None;
                let _ = ctx.client.hangup(now, h);
                continue;
            }
            if let (Some((sender, next)), Some(q), true) = (c.sender.as_mut(), &self.capture, c.device_clocked) {
                // The microphone's clock drives the sender: a frame goes out as soon as it
                // has been captured (the capture callback wakes the driver).
                let mut budget = 10;
                while budget > 0 && q.lock().expect("pcm lock").len() >= sender.frame_samples() {
                    c.frames_sent += send_frame(sender, ctx, h, &mut self.payload);
                    budget -= 1;
                }
                // A fallback poll, should a wake-up be missed.
                *next = now + frame;
            } else if let Some((sender, next)) = c.sender.as_mut() {
                // One frame per frame time, each sent when its capture is complete. After a
                // stall, up to ten late frames go out at once; beyond that they are skipped
                // (a real-time stream does not replay the past).
                let mut budget = 10;
                while *next <= now && budget > 0 {
                    c.frames_sent += send_frame(sender, ctx, h, &mut self.payload);
                    *next += frame;
                    budget -= 1;
                }
                while *next <= now {
                    // Captured and encoded (the source and codec stay in step), not sent.
                    let _ = sender.next_payload(&mut self.payload);
                    c.frames_skipped += 1;
                    *next += frame;
                }
            }
            if let Some(rx) = c.receiver.as_mut() {
                while let Some(t) = rx.next_tick() {
                    if self.epoch + Duration::from_micros(t) > now {
                        break;
                    }
                    rx.tick(&mut self.pcm);
                    match &mut self.sink {
                        Sink::None => {}
                        Sink::Wav { .. } => {
                            if let Some(Err(e)) = c.wav.as_mut().map(|w| w.write(&self.pcm)) {
                                self.fatal.get_or_insert(e.to_string());
                            }
                        }
                        Sink::Device(q) => {
                            let mut q = q.lock().expect("pcm lock");
                            // Keep at most 200 ms queued for the speaker.
                            while q.len() > 9_600 {
                                q.pop_front();
                                self.playback_dropped += 1;
                            }
                            q.extend(self.pcm.iter().copied());
                        }
                    }
                }
            }
        }
        self.forward(ctx);
        if now.duration_since(self.last_flush) >= Duration::from_millis(250) {
            self.last_flush = now;
            self.flush();
        }
    }

    fn forward(&mut self, ctx: &mut Ctx<'_>) {
        let Some(rtp_in) = &self.rtp_in else { return };
        let packets: Vec<Vec<u8>> = rtp_in.queue.lock().expect("queue lock").drain(..).collect();
        if packets.is_empty() {
            return;
        }
        // Forward to the (first) call with a path.
        let target = self.calls.iter().find(|(_, c)| c.forwarding).map(|(h, _)| *h);
        let mut malformed = 0;
        let mut no_call = 0;
        let mut forwarded = 0;
        for pkt in &packets {
            if proto::wire::demux::classify(pkt) == proto::wire::demux::DatagramKind::Rtcp {
                // RTCP for the local sender's session (ffmpeg sends reports): not forwarded.
                self.plain.rtp_in_rtcp += 1;
                continue;
            }
            let Ok((h, payload)) = RtpHeader::parse(pkt) else {
                malformed += 1;
                continue;
            };
            let Some(handle) = target else {
                no_call += 1;
                continue;
            };
            let fields =
                MediaFields { marker: Some(h.marker), payload_type: h.payload_type, timestamp: Some(h.timestamp) };
            match ctx.send_rtp(handle, fields, payload, 0) {
                Ok(()) => forwarded += 1,
                Err(proto::client::ClientError::BufferTooSmall { .. }) => self.plain.rtp_in_too_large += 1,
                Err(_) => no_call += 1,
            }
        }
        self.plain.rtp_in_malformed += malformed;
        self.plain.rtp_in_no_call += no_call;
        self.plain.rtp_in_forwarded += forwarded;
    }

    fn flush(&mut self) {
        for w in self.calls.values_mut().filter_map(|c| c.wav.as_mut()) {
            if let Err(e) = w.flush() {
                self.fatal.get_or_insert(e.to_string());
            }
        }
    }

    /// Finish the sinks (each WAV header gets its final sizes; with no call, the first
    /// file stays, empty).
    pub fn finish(&mut self) -> Result<(), String> {
        self.rtp_in = None;
        let mut files: Vec<voice::wav::WavWriter> = self.calls.values_mut().filter_map(|c| c.wav.take()).collect();
        if let Sink::Wav { first: Some(w), .. } = std::mem::replace(&mut self.sink, Sink::None) {
            files.push(w);
        }
        for w in files {
            w.finish().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Capture, encode and send one frame on call `h`; 1 if it was sent.
fn send_frame(sender: &mut Sender, ctx: &mut Ctx<'_>, h: CallHandle, payload: &mut [u8]) -> u64 {
    match sender.next_payload(payload) {
        Ok(n) => {
            let dur = sender.frame_samples() as u32;
            ctx.send_media(h, &payload[..n], dur).is_ok() as u64
        }
        Err(e) => {
            tracing::warn!("opus encode: {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::numbered;
    use std::path::Path;

    #[test]
    fn each_call_after_the_first_gets_its_number_before_the_extension() {
        let n = |p: &str, k| numbered(Path::new(p), k).display().to_string();
        assert_eq!(n("heard.wav", 1), "heard.wav");
        assert_eq!(n("heard.wav", 2), "heard-2.wav");
        assert_eq!(n("/tmp/x.y/heard.wav", 3), "/tmp/x.y/heard-3.wav");
        assert_eq!(n("out", 2), "out-2");
        assert_eq!(n("a.b.wav", 10), "a.b-10.wav");
    }
}
