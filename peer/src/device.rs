//! The sound device through cpal's PulseAudio host: microphone samples into a queue the
//! call's sender reads, the call's played samples from a queue into the speaker. 48 kHz
//! mono 16-bit both ways (PulseAudio converts from whatever the device runs at).
//!
//! cpal streams are not `Send`: a [`Device`] stays on the thread that opened it (peer's main
//! thread), and only the queues travel to the driver.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};

use crate::media::{Pcm, Waker};

/// Samples queued before the speaker starts (30 ms).
const PLAYBACK_CUSHION: usize = 1_440;

/// Open streams and their queues.
pub struct Device {
    _input: Option<cpal::Stream>,
    _output: Option<cpal::Stream>,
    /// Microphone samples, oldest first.
    pub capture: Option<Pcm>,
    /// Samples for the speaker, oldest first.
    pub playback: Option<Pcm>,
    /// Output callbacks that found the queue short (silence was played).
    pub underruns: Arc<AtomicU64>,
    /// Samples the microphone delivered.
    pub captured: Arc<AtomicU64>,
    /// Microphone samples dropped because nobody read them for a second.
    pub capture_dropped: Arc<AtomicU64>,
}

fn pick(
    devices: Vec<cpal::Device>,
    want: Option<&str>,
    what: &str,
    default: Option<cpal::Device>,
) -> Result<cpal::Device, String> {
    let label = |d: &cpal::Device| {
        let id = d.id().map(|i| i.to_string()).unwrap_or_default();
        let name = d.description().map(|x| x.name().to_string()).unwrap_or_default();
        (id, name)
    };
    for d in &devices {
        let (id, name) = label(d);
        tracing::debug!(%id, %name, "{what} device available");
    }
    let chosen = match want {
        None => default.ok_or_else(|| format!("no default {what} device")),
        Some(w) => {
            let wl = w.to_ascii_lowercase();
            let mut names = Vec::new();
            for d in devices {
                let (id, name) = label(&d);
                if id == w
                    || name == w
                    || id.to_ascii_lowercase().contains(&wl)
                    || name.to_ascii_lowercase().contains(&wl)
                {
                    return Ok(d);
                }
                names.push(format!("{id} ({name})"));
            }
            Err(format!("no {what} device matches {w:?}; there are: {}", names.join(", ")))
        }
    }?;
    let (id, name) = label(&chosen);
    tracing::info!(%id, %name, "{what} device");
    Ok(chosen)
}

/// Open the PulseAudio microphone and/or speaker. `input`/`output`: `None` = not wanted,
/// `Some(None)` = the default device, `Some(Some(name))` = the device whose id or name
/// contains `name`.
pub fn open(input: Option<Option<&str>>, output: Option<Option<&str>>, waker: Waker) -> Result<Device, String> {
    let host = cpal::host_from_id(cpal::HostId::PulseAudio)
        .map_err(|e| format!("PulseAudio is not reachable ({e}); --audio device needs a running PulseAudio server"))?;
    // 50 ms capture fragments. PulseAudio's default record fragment can be 2 s (the
    // microphone would arrive in bursts), and cpal's PulseAudio host makes the server's
    // record buffer one fragment long, so a fragment must outlast the longest time this
    // process may go unscheduled: with 10 ms fragments a loaded machine lost a tenth of the
    // microphone's samples, with 50 ms none (peer/tests/device.rs under 3 busy loops).
    let config = cpal::StreamConfig {
        channels: 1,
        sample_rate: voice::SAMPLE_RATE,
        buffer_size: cpal::BufferSize::Fixed(2_400),
    };
    // The speaker gets 30 ms requests (a 60 ms server buffer): with 10 ms the server ran dry
    // on a busy machine, paused the stream, and the call's audio piled up behind it.
    let out_config = cpal::StreamConfig { buffer_size: cpal::BufferSize::Fixed(1_440), ..config };
    let underruns = Arc::new(AtomicU64::new(0));
    let captured = Arc::new(AtomicU64::new(0));
    let capture_dropped = Arc::new(AtomicU64::new(0));
    let mut dev = Device {
        _input: None,
        _output: None,
        capture: None,
        playback: None,
        underruns: underruns.clone(),
        captured: captured.clone(),
        capture_dropped: capture_dropped.clone(),
    };
    if let Some(want) = input {
        let all = host.input_devices().map_err(|e| e.to_string())?.collect();
        let d = pick(all, want, "input", host.default_input_device())?;
        let q: Pcm = Arc::new(Mutex::new(VecDeque::new()));
        let qc = q.clone();
        let stream = d
            .build_input_stream::<i16, _, _>(
                config,
                move |data: &[i16], _| {
                    captured.fetch_add(data.len() as u64, Ordering::Relaxed);
                    let mut q = qc.lock().expect("pcm lock");
                    q.extend(data.iter().copied());
                    // A second at most, if nobody reads.
                    while q.len() > voice::SAMPLE_RATE as usize {
                        q.pop_front();
                        capture_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(q);
                    waker.notify();
                },
                |e| tracing::warn!("microphone: {e}"),
                Some(Duration::from_secs(5)),
            )
            .map_err(|e| format!("microphone: {e}"))?;
        stream.play().map_err(|e| format!("microphone: {e}"))?;
        dev._input = Some(stream);
        dev.capture = Some(q);
    }
    if let Some(want) = output {
        let all = host.output_devices().map_err(|e| e.to_string())?.collect();
        let d = pick(all, want, "output", host.default_output_device())?;
        let q: Pcm = Arc::new(Mutex::new(VecDeque::new()));
        let qc = q.clone();
        let mut primed = false;
        let stream = d
            .build_output_stream::<i16, _, _>(
                out_config,
                move |data: &mut [i16], _| {
                    // Play only from a cushion of 30 ms, so the call's timer and the device's
                    // clock can wander against each other without a gap at every beat;
                    // after an underrun, build the cushion again.
                    let mut q = qc.lock().expect("pcm lock");
                    if !primed && q.len() >= PLAYBACK_CUSHION {
                        primed = true;
                    }
                    if !primed {
                        data.fill(0);
                        return;
                    }
                    let n = data.len().min(q.len());
                    for (d, s) in data.iter_mut().zip(q.drain(..n)) {
                        *d = s;
                    }
                    if n < data.len() {
                        data[n..].fill(0);
                        primed = false;
                        underruns.fetch_add(1, Ordering::Relaxed);
                    }
                },
                |e| tracing::warn!("speaker: {e}"),
                Some(Duration::from_secs(5)),
            )
            .map_err(|e| format!("speaker: {e}"))?;
        stream.play().map_err(|e| format!("speaker: {e}"))?;
        dev._output = Some(stream);
        dev.playback = Some(q);
    }
    Ok(dev)
}
