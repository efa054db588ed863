//! # nullpunch voice media
//!
//! What turns the engine's payload-agnostic RTP path into a voice call, and how a voice call
//! is measured. Everything here is pure computation over samples, packets and timestamps
//! (no sockets, threads or clocks), so it is tested in virtual time.
//!
//! * [`codec`]: Opus (RFC 6716 through libopus) for 48 kHz mono speech in 10, 20, 40 or
//!   60 ms frames, with packet-loss concealment.
//! * [`jitter`]: an adaptive jitter buffer: target delay from the measured spread of arrival
//!   delays, frame-sized expand and accelerate steps, late/lost/concealed counters.
//! * [`voice`]: a sender (PCM source -> Opus payloads) and a receiver (RTP -> jitter
//!   buffer -> decoded or concealed PCM), what `peer` and `loadgen audio-latency` run.
//! * [`wav`]: 16-bit PCM WAV files (read, streaming write).
//! * [`signal`]: test signals (tone, chirp bursts, silence), envelope similarity and burst
//!   location by normalized cross-correlation.
//! * [`sdp`]: the SDP (RFC 8866) of a received RTP stream, for ffmpeg or GStreamer.
#![deny(missing_docs)]

pub mod codec;
pub mod jitter;
pub mod sdp;
pub mod signal;
pub mod voice;
pub mod wav;

/// The sample rate of everything here: Opus's native rate and its RTP clock (RFC 7587).
pub const SAMPLE_RATE: u32 = 48_000;

/// Samples (per channel) in a frame of `frame_ms` at 48 kHz.
pub const fn frame_samples(frame_ms: u32) -> usize {
    (SAMPLE_RATE / 1000 * frame_ms) as usize
}
