//! A voice call's two halves: [`Sender`] turns captured PCM into Opus payloads, one per
//! frame; [`Receiver`] turns received RTP packets into played PCM through the jitter buffer,
//! decoding or concealing one frame per tick.

use crate::codec::{CodecError, Decoder, Encoder, MAX_PAYLOAD};
use crate::jitter::{Conceal, JitterBuffer, JitterConfig, JitterStats, Playout};
use crate::signal::{Bursts, Tone};
use crate::{frame_samples, SAMPLE_RATE};

/// Where a sender's audio comes from.
pub trait Capture: Send {
    /// Fill `out` with the next captured samples (48 kHz mono).
    fn fill(&mut self, out: &mut [i16]);
}

/// Samples from memory (a WAV file), then silence.
pub struct Samples {
    samples: Vec<i16>,
    pos: usize,
}

impl Samples {
    /// Play `samples` once.
    pub fn new(samples: Vec<i16>) -> Samples {
        Samples { samples, pos: 0 }
    }
}

impl Capture for Samples {
    fn fill(&mut self, out: &mut [i16]) {
        let n = out.len().min(self.samples.len().saturating_sub(self.pos));
        out[..n].copy_from_slice(&self.samples[self.pos..self.pos + n]);
        out[n..].fill(0);
        self.pos += n;
    }
}

impl Capture for Tone {
    fn fill(&mut self, out: &mut [i16]) {
        Tone::fill(self, out)
    }
}

impl Capture for Bursts {
    fn fill(&mut self, out: &mut [i16]) {
        Bursts::fill(self, out)
    }
}

/// Digital silence.
pub struct Silence;

impl Capture for Silence {
    fn fill(&mut self, out: &mut [i16]) {
        out.fill(0);
    }
}

/// Encodes one frame of captured audio per call of [`Sender::next_payload`].
pub struct Sender {
    enc: Encoder,
    capture: Box<dyn Capture>,
    pcm: Vec<i16>,
    frames: u64,
}

impl Sender {
    /// A sender of `frame_ms` frames from `capture`.
    pub fn new(frame_ms: u32, capture: Box<dyn Capture>) -> Result<Sender, CodecError> {
        let enc = Encoder::new(frame_ms)?;
        let pcm = vec![0; enc.frame_samples()];
        Ok(Sender { enc, capture, pcm, frames: 0 })
    }

    /// Samples per frame (the RTP timestamp step).
    pub fn frame_samples(&self) -> usize {
        self.pcm.len()
    }

    /// Frames encoded so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The encoder's lookahead, samples.
    pub fn lookahead(&mut self) -> usize {
        self.enc.lookahead()
    }

    /// Capture and encode the next frame into `out` (at least [`MAX_PAYLOAD`] bytes is
    /// always enough); returns the payload length.
    pub fn next_payload(&mut self, out: &mut [u8]) -> Result<usize, CodecError> {
        self.capture.fill(&mut self.pcm);
        let cap = out.len().min(MAX_PAYLOAD);
        let n = self.enc.encode(&self.pcm, &mut out[..cap])?;
        self.frames += 1;
        Ok(n)
    }
}

/// Counters of a [`Receiver`] beyond its jitter buffer's.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReceiverStats {
    /// The jitter buffer's counters.
    pub jitter: JitterStats,
    /// Payloads libopus refused (concealed instead).
    pub decode_errors: u64,
    /// Packets with another payload type (not decoded).
    pub other_payload_type: u64,
    /// Frames produced (played, concealed or silent).
    pub ticks: u64,
    /// Frame duration in use, ms (learned from the first packet).
    pub frame_ms: u32,
}

/// Jitter buffer plus decoder for one received Opus stream.
pub struct Receiver {
    payload_type: u8,
    jitter_cfg: JitterConfig,
    jb: Option<JitterBuffer>,
    dec: Decoder,
    frame: usize,
    decode_errors: u64,
    other_pt: u64,
    ticks: u64,
}

impl Receiver {
    /// A receiver for payload type `payload_type`. `jitter` is the buffer's tuning; its
    /// frame duration is replaced by the one the first packet carries.
    pub fn new(payload_type: u8, jitter: JitterConfig) -> Result<Receiver, CodecError> {
        let frame = frame_samples(jitter.frame_ms);
        Ok(Receiver {
            payload_type,
            jitter_cfg: jitter,
            jb: None,
            dec: Decoder::new()?,
            frame,
            decode_errors: 0,
            other_pt: 0,
            ticks: 0,
        })
    }

    /// An RTP packet arrived at `arrival_us`.
    pub fn on_packet(&mut self, payload_type: u8, seq: u16, ts: u32, arrival_us: u64, payload: &[u8]) {
        if payload_type != self.payload_type {
            self.other_pt += 1;
            return;
        }
        if self.jb.is_none() {
            // The stream's frame duration, from the first packet's TOC byte.
            if let Some(n) = self.dec.samples_in(payload).filter(|&n| n > 0 && n <= frame_samples(120)) {
                self.frame = n;
                self.jitter_cfg.frame_ms = (n as u32 * 1000 / SAMPLE_RATE).max(1);
            }
            self.jb = Some(JitterBuffer::new(self.jitter_cfg.clone()));
        }
        self.jb.as_mut().expect("set above").push(seq, ts, arrival_us, payload);
    }

    /// When the next frame is due (none before the first packet or while idle).
    pub fn next_tick(&self) -> Option<u64> {
        self.jb.as_ref().and_then(|j| j.next_tick())
    }

    /// Samples per tick.
    pub fn frame_samples(&self) -> usize {
        self.frame
    }

    /// Produce the frame due at [`Receiver::next_tick`] into `out` (resized to one frame).
    /// Returns what the jitter buffer decided.
    pub fn tick(&mut self, out: &mut Vec<i16>) -> Playout {
        out.resize(self.frame, 0);
        self.ticks += 1;
        let Some(jb) = self.jb.as_mut() else {
            out.fill(0);
            return Playout::Silence;
        };
        let p = jb.pop();
        match &p {
            Playout::Packet(payload) => match self.dec.decode(payload, out) {
                Ok(n) if n == self.frame => {}
                Ok(n) => {
                    // A frame of another size: keep the timeline, conceal the rest.
                    self.decode_errors += 1;
                    let m = n.min(self.frame);
                    if self.dec.conceal(&mut out[m..]).is_err() {
                        out[m..].fill(0);
                    }
                }
                Err(_) => {
                    self.decode_errors += 1;
                    if self.dec.conceal(out).is_err() {
                        out.fill(0);
                    }
                }
            },
            Playout::Conceal(Conceal::Loss | Conceal::Expand) => {
                if self.dec.conceal(out).is_err() {
                    out.fill(0);
                }
            }
            Playout::Silence => out.fill(0),
        }
        p
    }

    /// Counters.
    pub fn stats(&self) -> ReceiverStats {
        ReceiverStats {
            jitter: self.jb.as_ref().map(|j| j.stats()).unwrap_or_default(),
            decode_errors: self.decode_errors,
            other_payload_type: self.other_pt,
            ticks: self.ticks,
            frame_ms: (self.frame as u32 * 1000 / SAMPLE_RATE).max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{envelope_similarity, Tone};

    #[test]
    fn sender_to_receiver_in_virtual_time_keeps_the_signal() {
        // A tone with gaps, 20 ms frames, 1 ms network delay, packet 30 lost.
        let mut t = Tone::new(500.0, 9000.0);
        let mut sig = vec![0i16; 96_000];
        t.fill(&mut sig[9_600..38_400]);
        t.fill(&mut sig[57_600..86_400]);
        let mut tx = Sender::new(20, Box::new(Samples::new(sig.clone()))).unwrap();
        let mut rx = Receiver::new(111, JitterConfig::new(10)).unwrap();
        let mut out = Vec::new();
        let mut played = Vec::new();
        let mut buf = [0u8; MAX_PAYLOAD];
        for k in 0..100u64 {
            let n = tx.next_payload(&mut buf).unwrap();
            let sent_at = (k + 1) * 20_000;
            // Ticks due before this arrival.
            while rx.next_tick().is_some_and(|t| t <= sent_at + 1_000) {
                rx.tick(&mut out);
                played.extend_from_slice(&out);
            }
            if k != 30 {
                rx.on_packet(111, k as u16, (k * 960) as u32, sent_at + 1_000, &buf[..n]);
            }
        }
        while rx.next_tick().is_some() && played.len() < sig.len() {
            rx.tick(&mut out);
            played.extend_from_slice(&out);
        }
        let s = rx.stats();
        assert_eq!(s.frame_ms, 20, "learned from the packets, not the 10 ms configured");
        assert_eq!(s.jitter.lost, 1);
        assert_eq!(s.jitter.played, 99);
        assert_eq!(s.decode_errors, 0);
        let (sim, _) = envelope_similarity(&sig, &played, 200);
        assert!(sim > 0.9, "{sim}");
        // Another payload type is not decoded.
        rx.on_packet(96, 200, 0, 3_000_000, &[1, 2, 3]);
        assert_eq!(rx.stats().other_payload_type, 1);
    }
}
