//! The client's policy for its manager connection, the same for every driver: how long a
//! connect may take, what a failed first connect means, and when to try again after the
//! connection is lost. Pure: time and randomness are arguments; the driver does the
//! connecting and reports what happened.
//!
//! * The first connection either works or fails the client at once with the reason
//!   ([`GiveUp::Unreachable`]): a manager that cannot be reached at start is a
//!   configuration error, not something to retry forever. One exception: no local port
//!   free (connect's `EADDRNOTAVAIL`, every ephemeral port of the source address busy
//!   towards the manager, often only for a moment while a previous run's connections leave
//!   TIME_WAIT). Then it waits, up to [`PORT_WAIT`] in all, with a jittered pause from
//!   [`PORT_RETRY`] doubling to [`PORT_RETRY_MAX`], and fails with
//!   [`GiveUp::NoLocalPort`] after that.
//! * Once it has been connected, a lost connection or a failed reconnect is retried after a
//!   jittered back-off from [`BACKOFF_INITIAL`] doubling to [`BACKOFF_MAX`], reset by a
//!   connection that works. Calls with a path go on meanwhile (their media is direct).

use std::time::{Duration, Instant};

use crate::rng::Rng;

/// Limit on one TCP connect to the manager.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause before a reconnect.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest pause between reconnects.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the first connection waits in all for a free local port.
pub const PORT_WAIT: Duration = Duration::from_secs(5);
/// First pause while waiting for a local port.
pub const PORT_RETRY: Duration = Duration::from_millis(100);
/// Longest pause while waiting for a local port.
pub const PORT_RETRY_MAX: Duration = Duration::from_secs(1);

/// Why a connect failed, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// No local port was free (`EADDRNOTAVAIL`).
    NoLocalPort,
    /// Anything else: refused, unreachable, timed out ([`CONNECT_TIMEOUT`]).
    Other,
}

/// What to do after a failed connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Connect again at this time.
    Retry(Instant),
    /// Connect again at this time: a wait for a local port (drivers count these).
    PortWait(Instant),
    /// Stop: the client fails with this reason.
    GiveUp(GiveUp),
}

/// Why the first connection was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The manager could not be reached.
    Unreachable,
    /// No local port came free within [`PORT_WAIT`]; `waited` since the first try.
    NoLocalPort {
        /// Time since the first try.
        waited: Duration,
    },
}

/// The state of one client's manager connection policy.
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Duration,
    port_pause: Duration,
    first_try: Option<Instant>,
    ever_connected: bool,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect { backoff: BACKOFF_INITIAL, port_pause: PORT_RETRY, first_try: None, ever_connected: false }
    }
}

impl Reconnect {
    /// A connect is being made at `now` (the local-port wait counts from the first).
    pub fn connecting(&mut self, now: Instant) {
        self.first_try.get_or_insert(now);
    }

    /// A connect worked: the back-off starts over.
    pub fn connected(&mut self) {
        self.ever_connected = true;
        self.backoff = BACKOFF_INITIAL;
    }

    /// Whether a connection ever worked.
    pub fn ever_connected(&self) -> bool {
        self.ever_connected
    }

    /// The connection was lost at `now`: when to connect again.
    pub fn lost(&mut self, now: Instant, rng: &mut Rng) -> Instant {
        let at = now + jitter(self.backoff, rng);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        at
    }

    /// A connect failed at `now` with `err`: what next.
    pub fn failed(&mut self, now: Instant, err: ConnectError, rng: &mut Rng) -> Next {
        if self.ever_connected {
            return Next::Retry(self.lost(now, rng));
        }
        match err {
            ConnectError::Other => Next::GiveUp(GiveUp::Unreachable),
            ConnectError::NoLocalPort => {
                let waited = now.saturating_duration_since(*self.first_try.get_or_insert(now));
                if waited >= PORT_WAIT {
                    return Next::GiveUp(GiveUp::NoLocalPort { waited });
                }
                let at = now + jitter(self.port_pause, rng);
                self.port_pause = (self.port_pause * 2).min(PORT_RETRY_MAX);
                Next::PortWait(at)
            }
        }
    }
}

/// Uniform in `[d/2, d)`: spreads the reconnects of many clients that lost the manager at
/// once.
pub fn jitter(d: Duration, rng: &mut Rng) -> Duration {
    let half = d.as_micros() as u64 / 2;
    Duration::from_micros(half + rng.below(half.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_connect_that_fails_gives_up_at_once() {
        let (mut r, mut rng, t0) = (Reconnect::default(), Rng::new(1), Instant::now());
        r.connecting(t0);
        assert_eq!(r.failed(t0, ConnectError::Other, &mut rng), Next::GiveUp(GiveUp::Unreachable));
    }

    #[test]
    fn no_local_port_waits_with_growing_pauses_then_gives_up_after_the_port_wait() {
        let (mut r, mut rng, t0) = (Reconnect::default(), Rng::new(2), Instant::now());
        r.connecting(t0);
        let mut now = t0;
        let mut pauses = Vec::new();
        loop {
            match r.failed(now, ConnectError::NoLocalPort, &mut rng) {
                Next::PortWait(at) => {
                    pauses.push(at - now);
                    now = at;
                }
                Next::GiveUp(GiveUp::NoLocalPort { waited }) => {
                    assert!(waited >= PORT_WAIT && waited < PORT_WAIT + PORT_RETRY_MAX, "{waited:?}");
                    break;
                }
                other => panic!("{other:?}"),
            }
            assert!(pauses.len() < 100, "bounded");
        }
        // Jittered in [d/2, d): 50-100 ms, 100-200 ms, ..., capped at 0.5-1 s.
        assert!(pauses[0] >= PORT_RETRY / 2 && pauses[0] < PORT_RETRY, "{pauses:?}");
        assert!(pauses[1] >= PORT_RETRY && pauses[1] < PORT_RETRY * 2, "{pauses:?}");
        assert!(pauses.iter().all(|p| *p < PORT_RETRY_MAX), "{pauses:?}");
        assert!(pauses.len() >= 6, "{pauses:?}");
    }

    #[test]
    fn once_connected_losses_and_failures_back_off_to_the_cap_and_reset_on_success() {
        let (mut r, mut rng, t0) = (Reconnect::default(), Rng::new(3), Instant::now());
        r.connecting(t0);
        r.connected();
        let gaps: Vec<Duration> = (0..8)
            .map(|_| match r.failed(t0, ConnectError::Other, &mut rng) {
                Next::Retry(at) => at - t0,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(gaps[0] >= BACKOFF_INITIAL / 2 && gaps[0] < BACKOFF_INITIAL, "{gaps:?}");
        assert!(gaps[7] >= BACKOFF_MAX / 2 && gaps[7] < BACKOFF_MAX, "{gaps:?}");
        // A port shortage after the first connection is an ordinary failure.
        assert!(matches!(r.failed(t0, ConnectError::NoLocalPort, &mut rng), Next::Retry(_)));
        r.connected();
        let at = r.lost(t0, &mut rng);
        assert!(at - t0 < BACKOFF_INITIAL, "reset after a connection that worked");
    }
}
