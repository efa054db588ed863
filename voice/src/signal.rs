//! Test signals and how to find them again after a trip through codec and network.
//!
//! * [`Tone`], [`chirp`], [`Bursts`]: what `peer --audio-in tone|chirp` and
//!   `loadgen audio-latency` send.
//! * [`envelope_similarity`]: does a received recording carry the same speech as the sent
//!   file? Opus keeps the spectral envelope, not the waveform, so the comparison is of
//!   10 ms RMS envelopes (Pearson correlation at the best alignment), which a different
//!   utterance does not match.
//! * [`find_burst`]: where a known burst lies in a recording, by normalized
//!   cross-correlation: the mouth-to-ear measurement.

use crate::SAMPLE_RATE;

/// A sine tone.
#[derive(Debug, Clone)]
pub struct Tone {
    step: f64,
    phase: f64,
    amp: f64,
}

impl Tone {
    /// A tone of `hz` at peak amplitude `amp` (of 32767).
    pub fn new(hz: f64, amp: f64) -> Tone {
        Tone { step: hz * std::f64::consts::TAU / SAMPLE_RATE as f64, phase: 0.0, amp }
    }

    /// The next samples.
    pub fn fill(&mut self, out: &mut [i16]) {
        for s in out {
            *s = (self.phase.sin() * self.amp) as i16;
            self.phase = (self.phase + self.step) % std::f64::consts::TAU;
        }
    }
}

/// A linear chirp from `f0` to `f1` Hz over `len` samples under a Hann window, peak `amp`.
/// Its autocorrelation has one sharp peak, so it is found to within a sample or two.
pub fn chirp(len: usize, f0: f64, f1: f64, amp: f64) -> Vec<i16> {
    let sr = SAMPLE_RATE as f64;
    let dur = len as f64 / sr;
    (0..len)
        .map(|i| {
            let t = i as f64 / sr;
            let phase = std::f64::consts::TAU * (f0 * t + (f1 - f0) * t * t / (2.0 * dur));
            let w = 0.5 - 0.5 * (std::f64::consts::TAU * i as f64 / (len - 1).max(1) as f64).cos();
            (phase.sin() * w * amp) as i16
        })
        .collect()
}

/// The default measurement burst: a 30 ms chirp from 300 Hz to 3.4 kHz (the speech band,
/// where Opus at voice bitrates keeps the waveform best).
pub fn default_burst() -> Vec<i16> {
    chirp(SAMPLE_RATE as usize * 30 / 1000, 300.0, 3_400.0, 16_000.0)
}

/// A burst every `period` samples, silence between (optionally over a faint noise floor so
/// the codec never sees digital silence).
#[derive(Debug, Clone)]
pub struct Bursts {
    burst: Vec<i16>,
    period: usize,
    pos: u64,
    noise: i16,
    rng: u64,
}

impl Bursts {
    /// `burst` at sample 0, `period`, 2 `period`, ...; `noise` is the noise floor's peak.
    pub fn new(burst: Vec<i16>, period: usize, noise: i16) -> Bursts {
        assert!(period >= burst.len() && period > 0, "period shorter than the burst");
        Bursts { burst, period, pos: 0, noise, rng: 0x9E37_79B9_7F4A_7C15 }
    }

    /// Samples produced so far (the position of the next one).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next samples.
    pub fn fill(&mut self, out: &mut [i16]) {
        for s in out {
            let i = (self.pos % self.period as u64) as usize;
            let b = self.burst.get(i).copied().unwrap_or(0) as i32;
            let n = if self.noise > 0 {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                (self.rng % (2 * self.noise as u64 + 1)) as i32 - self.noise as i32
            } else {
                0
            };
            *s = (b + n).clamp(i16::MIN as i32, i16::MAX as i32) as i16;
            self.pos += 1;
        }
    }
}

/// RMS of consecutive windows of `win` samples.
pub fn envelope(samples: &[i16], win: usize) -> Vec<f64> {
    samples
        .chunks(win)
        .map(|c| (c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / c.len() as f64).sqrt())
        .collect()
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 0.0;
    }
    let (a, b) = (&a[..n], &b[..n]);
    let ma = a.iter().sum::<f64>() / n as f64;
    let mb = b.iter().sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (x, y) = (a[i] - ma, b[i] - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    if saa == 0.0 || sbb == 0.0 {
        return 0.0;
    }
    sab / (saa * sbb).sqrt()
}

/// How alike the speech in `received` is to `sent`: the highest Pearson correlation of their
/// 10 ms RMS envelopes over alignments of `received` up to `max_lag_ms` later or earlier
/// than `sent`, over the whole span of `sent` (what `received` lacks counts as silence).
/// Returns (similarity in -1..=1, the lag in ms at which it was found).
pub fn envelope_similarity(sent: &[i16], received: &[i16], max_lag_ms: u32) -> (f64, i64) {
    let win = SAMPLE_RATE as usize / 100;
    let a = envelope(sent, win);
    let b = envelope(received, win);
    let max_lag = (max_lag_ms / 10) as i64;
    let mut best = (f64::MIN, 0i64);
    let mut shifted = vec![0.0; a.len()];
    for lag in -max_lag..=max_lag {
        for (i, v) in shifted.iter_mut().enumerate() {
            let j = i as i64 + lag;
            *v = if j >= 0 && (j as usize) < b.len() { b[j as usize] } else { 0.0 };
        }
        let r = pearson(&a, &shifted);
        if r > best.0 {
            best = (r, lag * 10);
        }
    }
    best
}

/// Where `burst` best matches `hay` starting within `from..to` (sample indexes): the start
/// index and the normalized cross-correlation there (1.0 = identical shape).
pub fn find_burst(hay: &[i16], burst: &[i16], from: usize, to: usize) -> Option<(usize, f64)> {
    let n = burst.len();
    if n == 0 || hay.len() < n {
        return None;
    }
    let to = to.min(hay.len() - n + 1);
    if from >= to {
        return None;
    }
    let b: Vec<f64> = burst.iter().map(|&x| x as f64).collect();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    let h: Vec<f64> = hay[from..to + n - 1].iter().map(|&x| x as f64).collect();
    // Running energy of the window under the burst.
    let mut e: f64 = h[..n].iter().map(|x| x * x).sum();
    let mut best: Option<(usize, f64)> = None;
    for k in 0..(to - from) {
        if k > 0 {
            e += h[k + n - 1] * h[k + n - 1] - h[k - 1] * h[k - 1];
        }
        let dot: f64 = h[k..k + n].iter().zip(&b).map(|(x, y)| x * y).sum();
        let denom = nb * e.max(0.0).sqrt();
        let r = if denom > 0.0 { dot / denom } else { 0.0 };
        if best.is_none_or(|(_, br)| r > br) {
            best = Some((from + k, r));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_found_at_its_sample_under_noise() {
        let burst = default_burst();
        let mut src = Bursts::new(burst.clone(), 24_000, 300);
        let mut rec = vec![0i16; 72_000];
        src.fill(&mut rec);
        // Delay the recording by 1234 samples.
        let mut delayed = vec![0i16; 1234];
        delayed.extend_from_slice(&rec);
        let (at, r) = find_burst(&delayed, &burst, 20_000, 30_000).unwrap();
        assert_eq!(at, 24_000 + 1234);
        assert!(r > 0.95, "{r}");
        // Where there is no burst, the match is poor.
        let (_, r) = find_burst(&delayed, &burst, 2_000, 20_000).unwrap();
        assert!(r < 0.3, "{r}");
    }

    #[test]
    fn envelope_similarity_finds_the_lag_and_tells_signals_apart() {
        // Two "utterances": tone bursts at different rhythms.
        let mk = |on: &[(usize, usize)]| {
            let mut v = vec![0i16; 96_000];
            let mut t = Tone::new(300.0, 9000.0);
            for &(a, b) in on {
                t.fill(&mut v[a..b]);
            }
            v
        };
        let a = mk(&[(4_800, 14_400), (24_000, 28_800), (48_000, 67_200)]);
        let pattern: Vec<(usize, usize)> = (0..20).map(|k| (k * 4_800, k * 4_800 + 2_400)).collect();
        let b = mk(&pattern);
        let mut late = vec![0i16; 4_800]; // 100 ms later
        late.extend_from_slice(&a);
        let (same, lag) = envelope_similarity(&a, &late, 500);
        assert!(same > 0.99, "{same}");
        assert_eq!(lag, 100);
        let (other, _) = envelope_similarity(&a, &b, 500);
        assert!(other < 0.3, "{other}");
    }
}
