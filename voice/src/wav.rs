//! 16-bit PCM WAV files (RIFF/WAVE, `fmt ` + `data`): read whole, write streaming.
//!
//! Reading takes mono or multi-channel 16-bit PCM (or WAVE_FORMAT_EXTENSIBLE with PCM) and
//! mixes it down to mono; other chunks are skipped. Writing produces mono 16-bit PCM and
//! patches the sizes when finished, so a file cut short by a crash still holds everything
//! written before the last [`WavWriter::flush`].

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// WAV errors.
#[derive(Debug, thiserror::Error)]
pub enum WavError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// Not a WAV this reader takes.
    #[error("{path}: {what}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
}

/// A decoded WAV: mono samples and their rate.
#[derive(Debug, Clone)]
pub struct Wav {
    /// Sample rate, Hz.
    pub rate: u32,
    /// Mono samples.
    pub samples: Vec<i16>,
}

/// Read `path` (16-bit PCM, any channel count, mixed to mono).
pub fn read(path: &Path) -> Result<Wav, WavError> {
    let p = path.display().to_string();
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| WavError::Io { path: p.clone(), source })?;
    parse(&bytes).map_err(|what| WavError::Format { path: p, what })
}

/// Parse WAV bytes.
pub fn parse(b: &[u8]) -> Result<Wav, String> {
    if b.len() < 12 || &b[..4] != b"RIFF" || &b[8..12] != b"WAVE" {
        return Err("not a RIFF/WAVE file".into());
    }
    let mut off = 12;
    let mut fmt: Option<(u16, u16, u32, u16)> = None;
    while off + 8 <= b.len() {
        let id = &b[off..off + 4];
        let len = u32::from_le_bytes(b[off + 4..off + 8].try_into().unwrap()) as usize;
        let body = off + 8;
        let end = body.saturating_add(len).min(b.len());
        if id == b"fmt " {
            if end - body < 16 {
                return Err("fmt chunk too short".into());
            }
            let f = &b[body..end];
            let mut tag = u16::from_le_bytes([f[0], f[1]]);
            let channels = u16::from_le_bytes([f[2], f[3]]);
            let rate = u32::from_le_bytes([f[4], f[5], f[6], f[7]]);
            let bits = u16::from_le_bytes([f[14], f[15]]);
            if tag == 0xFFFE && f.len() >= 26 {
                // WAVE_FORMAT_EXTENSIBLE: the sub-format GUID starts with the format tag.
                tag = u16::from_le_bytes([f[24], f[25]]);
            }
            fmt = Some((tag, channels, rate, bits));
        } else if id == b"data" {
            let (tag, channels, rate, bits) = fmt.ok_or("data chunk before fmt chunk")?;
            if tag != 1 || bits != 16 {
                return Err(format!("format {tag} with {bits} bits per sample: only 16-bit PCM is read"));
            }
            if channels == 0 {
                return Err("zero channels".into());
            }
            let ch = channels as usize;
            let data = &b[body..end];
            let samples = data
                .chunks_exact(2 * ch)
                .map(|fr| {
                    let sum: i32 = fr.chunks_exact(2).map(|s| i16::from_le_bytes([s[0], s[1]]) as i32).sum();
                    (sum / ch as i32) as i16
                })
                .collect();
            return Ok(Wav { rate, samples });
        }
        off = body + len + (len & 1);
    }
    Err("no data chunk".into())
}

/// Streaming mono 16-bit PCM WAV writer.
pub struct WavWriter {
    out: BufWriter<File>,
    path: String,
    samples: u64,
}

impl WavWriter {
    /// Create `path` for mono 16-bit PCM at `rate`.
    pub fn create(path: &Path, rate: u32) -> Result<WavWriter, WavError> {
        let p = path.display().to_string();
        let f = File::create(path).map_err(|source| WavError::Io { path: p.clone(), source })?;
        let mut w = WavWriter { out: BufWriter::new(f), path: p, samples: 0 };
        let mut h = Vec::with_capacity(44);
        h.extend_from_slice(b"RIFF");
        h.extend_from_slice(&36u32.to_le_bytes());
        h.extend_from_slice(b"WAVEfmt ");
        h.extend_from_slice(&16u32.to_le_bytes());
        h.extend_from_slice(&1u16.to_le_bytes()); // PCM
        h.extend_from_slice(&1u16.to_le_bytes()); // mono
        h.extend_from_slice(&rate.to_le_bytes());
        h.extend_from_slice(&(rate * 2).to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&16u16.to_le_bytes());
        h.extend_from_slice(b"data");
        h.extend_from_slice(&0u32.to_le_bytes());
        w.out.write_all(&h).map_err(|e| w.err(e))?;
        Ok(w)
    }

    fn err(&self, source: io::Error) -> WavError {
        WavError::Io { path: self.path.clone(), source }
    }

    /// Append samples.
    pub fn write(&mut self, samples: &[i16]) -> Result<(), WavError> {
        let mut buf = Vec::with_capacity(samples.len() * 2);
        for s in samples {
            buf.extend_from_slice(&s.to_le_bytes());
        }
        self.out.write_all(&buf).map_err(|e| self.err(e))?;
        self.samples += samples.len() as u64;
        Ok(())
    }

    /// Samples written so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Write the sizes into the header and flush; the file stays valid and open for more.
    pub fn flush(&mut self) -> Result<(), WavError> {
        let data = (self.samples * 2).min(u32::MAX as u64 - 36) as u32;
        let r = (|| {
            self.out.flush()?;
            let f = self.out.get_mut();
            f.seek(SeekFrom::Start(4))?;
            f.write_all(&(36 + data).to_le_bytes())?;
            f.seek(SeekFrom::Start(40))?;
            f.write_all(&data.to_le_bytes())?;
            f.seek(SeekFrom::End(0))?;
            Ok(())
        })();
        r.map_err(|e| self.err(e))
    }

    /// Flush and close.
    pub fn finish(mut self) -> Result<(), WavError> {
        self.flush()
    }
}

/// Write `samples` to `path` in one go.
pub fn write(path: &Path, rate: u32, samples: &[i16]) -> Result<(), WavError> {
    let mut w = WavWriter::create(path, rate)?;
    w.write(samples)?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_stereo_downmix() {
        let dir = std::env::temp_dir().join(format!("voice-wav-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.wav");
        let s: Vec<i16> = (0..1000).map(|i| (i * 7 % 3000 - 1500) as i16).collect();
        write(&p, 48_000, &s).unwrap();
        let w = read(&p).unwrap();
        assert_eq!(w.rate, 48_000);
        assert_eq!(w.samples, s);

        // A stereo file with a LIST chunk before data: mixed down.
        let mut b = Vec::new();
        let frames: [(i16, i16); 3] = [(100, 300), (-100, -300), (0, 2)];
        let data: Vec<u8> = frames.iter().flat_map(|(l, r)| [l.to_le_bytes(), r.to_le_bytes()].concat()).collect();
        b.extend_from_slice(b"RIFF\0\0\0\0WAVEfmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&[1, 0, 2, 0]);
        b.extend_from_slice(&44_100u32.to_le_bytes());
        b.extend_from_slice(&(44_100u32 * 4).to_le_bytes());
        b.extend_from_slice(&[4, 0, 16, 0]);
        b.extend_from_slice(b"LIST\x03\0\0\0abc\0");
        b.extend_from_slice(b"data");
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&data);
        let w = parse(&b).unwrap();
        assert_eq!(w.rate, 44_100);
        assert_eq!(w.samples, vec![200, -200, 1]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(parse(b"RIFX").is_err());
        assert!(parse(b"RIFF\0\0\0\0WAVE").unwrap_err().contains("no data"));
        let mut b = b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0".to_vec();
        b.extend_from_slice(&[3, 0, 1, 0, 0x80, 0xbb, 0, 0, 0, 0, 0, 0, 4, 0, 32, 0]);
        b.extend_from_slice(b"data\0\0\0\0");
        assert!(parse(&b).unwrap_err().contains("only 16-bit PCM"));
    }
}
