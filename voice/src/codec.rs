//! Opus encode and decode (libopus through the `opus` crate): 48 kHz mono, 16-bit samples.

use crate::{frame_samples, SAMPLE_RATE};

/// Frame durations Opus accepts that a voice call uses.
pub const FRAME_MS: [u32; 4] = [10, 20, 40, 60];

/// Largest Opus payload the encoder is allowed to produce (RFC 7587 allows up to 1275 bytes
/// per frame; voice at the default bitrate is far below).
pub const MAX_PAYLOAD: usize = 1275;

/// Default encoder bitrate: wideband-plus speech with room for music-like test signals.
pub const DEFAULT_BITRATE: i32 = 48_000;

/// Codec errors.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A frame size Opus does not take.
    #[error("frame of {0} ms unsupported (10, 20, 40 or 60)")]
    FrameMs(u32),
    /// libopus refused.
    #[error("opus: {0}")]
    Opus(#[from] opus::Error),
}

/// Check a frame duration.
pub fn check_frame_ms(frame_ms: u32) -> Result<(), CodecError> {
    if FRAME_MS.contains(&frame_ms) {
        Ok(())
    } else {
        Err(CodecError::FrameMs(frame_ms))
    }
}

/// An Opus encoder for one stream.
pub struct Encoder {
    inner: opus::Encoder,
    frame: usize,
}

impl Encoder {
    /// A VoIP-tuned mono encoder for `frame_ms` frames at [`DEFAULT_BITRATE`].
    pub fn new(frame_ms: u32) -> Result<Encoder, CodecError> {
        check_frame_ms(frame_ms)?;
        let mut inner = opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)?;
        inner.set_bitrate(opus::Bitrate::Bits(DEFAULT_BITRATE))?;
        Ok(Encoder { inner, frame: frame_samples(frame_ms) })
    }

    /// Samples per frame.
    pub fn frame_samples(&self) -> usize {
        self.frame
    }

    /// The encoder's lookahead in samples (part of the codec's algorithmic delay).
    pub fn lookahead(&mut self) -> usize {
        self.inner.get_lookahead().map(|n| n.max(0) as usize).unwrap_or(0)
    }

    /// Encode one frame (`pcm.len()` must be the frame size) into `out`; returns the payload
    /// length.
    pub fn encode(&mut self, pcm: &[i16], out: &mut [u8]) -> Result<usize, CodecError> {
        debug_assert_eq!(pcm.len(), self.frame);
        let cap = out.len().min(MAX_PAYLOAD);
        Ok(self.inner.encode(pcm, &mut out[..cap])?)
    }
}

/// An Opus decoder for one received stream (mono output; a stereo stream is downmixed by
/// libopus).
pub struct Decoder {
    inner: opus::Decoder,
}

impl Decoder {
    /// A new mono decoder.
    pub fn new() -> Result<Decoder, CodecError> {
        Ok(Decoder { inner: opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)? })
    }

    /// Decode `payload` into `out` (room for the largest frame expected); returns the number
    /// of samples. A corrupt payload is an error, not a panic.
    pub fn decode(&mut self, payload: &[u8], out: &mut [i16]) -> Result<usize, CodecError> {
        if payload.is_empty() {
            return self.conceal(out);
        }
        Ok(self.inner.decode(payload, out, false)?)
    }

    /// Packet-loss concealment: synthesize `out.len()` samples (a multiple of 2.5 ms) that
    /// continue the signal decoded so far.
    pub fn conceal(&mut self, out: &mut [i16]) -> Result<usize, CodecError> {
        Ok(self.inner.decode(&[], out, false)?)
    }

    /// Samples in a payload, from its TOC byte, without decoding.
    pub fn samples_in(&self, payload: &[u8]) -> Option<usize> {
        opus::packet::get_nb_samples(payload, SAMPLE_RATE).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(n: usize, hz: f64) -> Vec<i16> {
        (0..n).map(|i| ((i as f64 * hz * std::f64::consts::TAU / 48_000.0).sin() * 8000.0) as i16).collect()
    }

    #[test]
    fn every_frame_size_round_trips_a_tone() {
        for ms in FRAME_MS {
            let mut e = Encoder::new(ms).unwrap();
            let mut d = Decoder::new().unwrap();
            let n = e.frame_samples();
            let pcm = tone(n * 20, 440.0);
            let mut out = vec![0i16; n];
            let mut payload = [0u8; MAX_PAYLOAD];
            let mut decoded = Vec::new();
            for f in pcm.chunks(n) {
                let len = e.encode(f, &mut payload).unwrap();
                assert!(len > 0 && len < 400, "{ms} ms: {len} bytes");
                assert_eq!(d.samples_in(&payload[..len]), Some(n));
                assert_eq!(d.decode(&payload[..len], &mut out).unwrap(), n);
                decoded.extend_from_slice(&out);
            }
            // After the codec's start-up, the output has the tone's energy.
            let rms = |s: &[i16]| (s.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / s.len() as f64).sqrt();
            let tail = &decoded[decoded.len() / 2..];
            let r = rms(tail) / rms(&pcm[pcm.len() / 2..]);
            assert!((0.7..1.3).contains(&r), "{ms} ms: rms ratio {r}");
        }
    }

    #[test]
    fn bad_frame_sizes_and_corrupt_payloads_are_errors() {
        assert!(matches!(Encoder::new(15), Err(CodecError::FrameMs(15))));
        let mut d = Decoder::new().unwrap();
        let mut out = vec![0i16; 960];
        // A TOC byte announcing a code-3 packet with an impossible frame count.
        assert!(d.decode(&[0x03, 0xFF], &mut out).is_err());
        // Concealment of a 20 ms gap gives 20 ms.
        assert_eq!(d.conceal(&mut out).unwrap(), 960);
    }
}
