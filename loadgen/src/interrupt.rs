//! Ctrl-C (SIGINT) and SIGTERM: the first asks the run to stop early and keep what it has
//! measured (no more calls placed, calls up hung up, a partial summary printed and written,
//! marked as interrupted); the second quits at once. A thread of its own waits for the
//! signals, so no driver needs to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Exit status of a run stopped by a signal (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Start watching for SIGINT and SIGTERM (once, at start). Without a handler the process
/// would end at the first Ctrl-C with nothing printed.
pub fn watch() {
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            INTERRUPTED.store(true, Ordering::SeqCst);
            eprintln!(
                "loadgen: interrupted: no more calls placed, the calls up hung up, a partial summary follows \
                 (interrupt again to quit at once)"
            );
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!("loadgen: interrupted twice: quitting without a summary");
            std::process::exit(EXIT_INTERRUPTED as i32);
        });
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch for Ctrl-C: {e}");
    }
}

/// Has the run been asked to stop?
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Sleep until `until`, waking early (within 20 ms) if the run is interrupted. Returns
/// false if it was.
pub fn sleep_until(until: Instant) -> bool {
    loop {
        if interrupted() {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(20)));
    }
}
