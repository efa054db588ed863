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
//!
//! A client may know several managers ([`Reconnect::managers`]: a cluster acting as one
//! service). Then:
//!
//! * The first connection tries them in list order from a given index (a fleet spreads
//!   over the managers by starting client `i` at `i % n`), moving on at once when one
//!   fails, and gives up only when every one failed; [`Reconnect::failures`] then says
//!   which and why, in the order tried. (The wait for a local port is per manager.)
//! * A lost connection or a failed reconnect moves on to the next manager in the list (the
//!   one just lost is likely down), rotating. While some manager has not failed since the
//!   last connection that worked, the pause is short and jittered: uniform in
//!   [[`FAILOVER_MIN`], [`FAILOVER_MAX`]), so the clients of a dead manager are spread
//!   over a fifth of a second and registered elsewhere within seconds. Once every one has
//!   failed, the pause is the back-off above, growing to [`BACKOFF_MAX`].
//! * With one manager (the [`Default`]) this is exactly the policy above.

use std::time::{Duration, Instant};

use crate::rng::Rng;

/// Limit on one TCP connect to the manager.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause before a reconnect.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest pause between reconnects.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Shortest pause before trying another manager after a loss.
pub const FAILOVER_MIN: Duration = Duration::from_millis(50);
/// Longest pause (exclusive) before trying another manager after a loss.
pub const FAILOVER_MAX: Duration = Duration::from_millis(250);
/// How long the first connection waits in all for a free local port (per manager).
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
    /// Managers in the list (at least one).
    managers: usize,
    /// The manager the next (or current) connection goes to.
    current: usize,
    /// Managers that failed since the start or since the last connection that worked.
    failed: usize,
    /// Before the first connection: the managers given up on, in the order tried.
    failures: Vec<(usize, GiveUp)>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect::managers(1, 0)
    }
}

impl Reconnect {
    /// The policy for a client that knows `n` managers (taken as 1 if 0) and tries manager
    /// `start % n` first.
    pub fn managers(n: usize, start: usize) -> Self {
        let n = n.max(1);
        Reconnect {
            backoff: BACKOFF_INITIAL,
            port_pause: PORT_RETRY,
            first_try: None,
            ever_connected: false,
            managers: n,
            current: start % n,
            failed: 0,
            failures: Vec::new(),
        }
    }

    /// The index of the manager to connect to (or connected to).
    pub fn manager(&self) -> usize {
        self.current
    }

    /// The number of managers in the list.
    pub fn manager_count(&self) -> usize {
        self.managers
    }

    /// After [`GiveUp`]: every manager given up on, in the order tried, with why (the last
    /// one's reason is the one [`Next::GiveUp`] carried). Empty once a connection worked.
    pub fn failures(&self) -> &[(usize, GiveUp)] {
        &self.failures
    }

    /// A connect is being made at `now` (the local-port wait counts from the first).
    pub fn connecting(&mut self, now: Instant) {
        self.first_try.get_or_insert(now);
    }

    /// A connect worked: the back-off starts over.
    pub fn connected(&mut self) {
        self.ever_connected = true;
        self.backoff = BACKOFF_INITIAL;
        self.failed = 0;
        self.failures.clear();
    }

    /// Whether a connection ever worked.
    pub fn ever_connected(&self) -> bool {
        self.ever_connected
    }

    /// The connection was lost at `now` (or a reconnect failed): when to connect again,
    /// to [`Reconnect::manager`], the next one in the list.
    pub fn lost(&mut self, now: Instant, rng: &mut Rng) -> Instant {
        self.failed = self.failed.saturating_add(1);
        self.current = (self.current + 1) % self.managers;
        if self.failed < self.managers {
            return now + failover_pause(rng);
        }
        let at = now + jitter(self.backoff, rng);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        at
    }

    /// A connect failed at `now` with `err`: what next.
    pub fn failed(&mut self, now: Instant, err: ConnectError, rng: &mut Rng) -> Next {
        if self.ever_connected {
            return Next::Retry(self.lost(now, rng));
        }
        let why = match err {
            ConnectError::Other => GiveUp::Unreachable,
            ConnectError::NoLocalPort => {
                let waited = now.saturating_duration_since(*self.first_try.get_or_insert(now));
                if waited < PORT_WAIT {
                    let at = now + jitter(self.port_pause, rng);
                    self.port_pause = (self.port_pause * 2).min(PORT_RETRY_MAX);
                    return Next::PortWait(at);
                }
                GiveUp::NoLocalPort { waited }
            }
        };
        // This manager is given up on: the next one, at once, until every one failed.
        self.failures.push((self.current, why));
        self.failed += 1;
        if self.failed >= self.managers {
            return Next::GiveUp(why);
        }
        self.current = (self.current + 1) % self.managers;
        self.first_try = None;
        self.port_pause = PORT_RETRY;
        Next::Retry(now)
    }
}

/// Uniform in `[FAILOVER_MIN, FAILOVER_MAX)`: the pause before trying another manager.
pub fn failover_pause(rng: &mut Rng) -> Duration {
    let span = (FAILOVER_MAX - FAILOVER_MIN).as_micros() as u64;
    FAILOVER_MIN + Duration::from_micros(rng.below(span.max(1)))
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

    /// Drives a fleet-sized policy through a connect that fails for the given managers.
    fn first_connect(r: &mut Reconnect, down: &[usize], now: Instant, rng: &mut Rng) -> Result<usize, GiveUp> {
        r.connecting(now);
        for _ in 0..r.manager_count() {
            let m = r.manager();
            if !down.contains(&m) {
                r.connected();
                return Ok(m);
            }
            match r.failed(now, ConnectError::Other, rng) {
                Next::Retry(at) => assert_eq!(at, now, "the next manager at once"),
                Next::GiveUp(why) => return Err(why),
                other => panic!("{other:?}"),
            }
        }
        panic!("bounded: every manager tried")
    }

    #[test]
    fn a_fleet_spreads_its_first_connections_over_the_managers() {
        let (mut rng, t0) = (Rng::new(4), Instant::now());
        let mut per = [0usize; 3];
        for i in 0..300 {
            let mut r = Reconnect::managers(3, i % 3);
            assert_eq!(r.manager(), i % 3);
            per[first_connect(&mut r, &[], t0, &mut rng).unwrap()] += 1;
        }
        assert_eq!(per, [100, 100, 100]);
        // A start index beyond the list wraps.
        assert_eq!(Reconnect::managers(3, 7).manager(), 1);
        assert_eq!(Reconnect::managers(0, 5).manager_count(), 1);
    }

    #[test]
    fn a_first_connect_tries_the_list_in_order_from_its_start() {
        let (mut rng, t0) = (Rng::new(5), Instant::now());
        let mut r = Reconnect::managers(4, 2);
        assert_eq!(first_connect(&mut r, &[2, 3], t0, &mut rng), Ok(0));
        assert!(r.failures().is_empty(), "forgotten once connected");
        let mut r = Reconnect::managers(4, 3);
        assert_eq!(first_connect(&mut r, &[3, 0, 1], t0, &mut rng), Ok(2));
    }

    #[test]
    fn a_first_connect_gives_up_only_when_every_manager_failed_and_names_them() {
        let (mut rng, t0) = (Rng::new(6), Instant::now());
        let mut r = Reconnect::managers(3, 2);
        assert_eq!(first_connect(&mut r, &[0, 1, 2], t0, &mut rng), Err(GiveUp::Unreachable));
        assert_eq!(r.failures(), &[(2, GiveUp::Unreachable), (0, GiveUp::Unreachable), (1, GiveUp::Unreachable)]);
    }

    #[test]
    fn with_several_managers_the_port_wait_is_per_manager_and_named_in_the_give_up() {
        let (mut r, mut rng, t0) = (Reconnect::managers(2, 0), Rng::new(7), Instant::now());
        r.connecting(t0);
        let mut now = t0;
        // Manager 0: no local port for the whole wait, then manager 1 at once.
        let moved_at = loop {
            match r.failed(now, ConnectError::NoLocalPort, &mut rng) {
                Next::PortWait(at) => now = at,
                Next::Retry(at) => break at,
                other => panic!("{other:?}"),
            }
            assert!(now - t0 < PORT_WAIT * 2, "bounded");
        };
        assert_eq!((moved_at, r.manager()), (now, 1));
        // Manager 1 waits a whole port wait of its own before the give-up.
        r.connecting(now);
        assert!(matches!(r.failed(now, ConnectError::NoLocalPort, &mut rng), Next::PortWait(_)));
        assert_eq!(r.failed(now, ConnectError::Other, &mut rng), Next::GiveUp(GiveUp::Unreachable));
        assert_eq!(r.failures().len(), 2);
        assert!(matches!(r.failures()[0], (0, GiveUp::NoLocalPort { waited }) if waited >= PORT_WAIT));
        assert_eq!(r.failures()[1], (1, GiveUp::Unreachable));
    }

    #[test]
    fn after_a_loss_the_next_manager_is_tried_soon_then_the_back_off_grows_while_all_fail() {
        let (mut r, mut rng, t0) = (Reconnect::managers(3, 1), Rng::new(8), Instant::now());
        assert_eq!(first_connect(&mut r, &[], t0, &mut rng), Ok(1));
        // Manager 1 dies: 2, then 0, each after a short pause.
        let at = r.lost(t0, &mut rng);
        assert_eq!(r.manager(), 2);
        assert!(at - t0 >= FAILOVER_MIN && at - t0 < FAILOVER_MAX, "{:?}", at - t0);
        let Next::Retry(at) = r.failed(t0, ConnectError::Other, &mut rng) else { panic!() };
        assert_eq!(r.manager(), 0);
        assert!(at - t0 >= FAILOVER_MIN && at - t0 < FAILOVER_MAX, "{:?}", at - t0);
        // Every one failed: the back-off as with one manager, still rotating.
        let mut order = Vec::new();
        let gaps: Vec<Duration> = (0..8)
            .map(|_| match r.failed(t0, ConnectError::Other, &mut rng) {
                Next::Retry(at) => {
                    order.push(r.manager());
                    at - t0
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(order, [1, 2, 0, 1, 2, 0, 1, 2]);
        assert!(gaps[0] >= BACKOFF_INITIAL / 2 && gaps[0] < BACKOFF_INITIAL, "{gaps:?}");
        assert!(gaps[1] >= BACKOFF_INITIAL && gaps[1] < BACKOFF_INITIAL * 2, "{gaps:?}");
        assert!(gaps[7] >= BACKOFF_MAX / 2 && gaps[7] < BACKOFF_MAX, "{gaps:?}");
        // A connection that works resets both: the next loss fails over quickly again.
        r.connected();
        let at = r.lost(t0, &mut rng);
        assert!(at - t0 < FAILOVER_MAX, "{:?}", at - t0);
        assert_eq!(r.manager(), 0);
    }

    /// The clients of a dead manager all try another one within [`FAILOVER_MAX`], spread
    /// over the window rather than at one instant.
    #[test]
    fn a_fleet_that_lost_its_manager_fails_over_spread_within_the_window() {
        let (mut rng, t0) = (Rng::new(9), Instant::now());
        let mut buckets = [0usize; 10];
        for i in 0..5000 {
            let mut r = Reconnect::managers(2, 0);
            assert_eq!(first_connect(&mut r, &[], t0, &mut rng), Ok(0), "client {i}");
            let d = r.lost(t0, &mut rng) - t0;
            assert_eq!(r.manager(), 1);
            assert!(d >= FAILOVER_MIN && d < FAILOVER_MAX, "{d:?}");
            buckets[((d - FAILOVER_MIN).as_micros() * 10 / (FAILOVER_MAX - FAILOVER_MIN).as_micros()) as usize] += 1;
        }
        // Uniform: 500 per 20 ms bucket; none empty or holding a crowd.
        assert!(buckets.iter().all(|&b| (350..650).contains(&b)), "{buckets:?}");
    }

    #[test]
    fn with_one_manager_a_loss_backs_off_as_before_and_stays_on_it() {
        let (mut r, mut rng, t0) = (Reconnect::managers(1, 0), Rng::new(10), Instant::now());
        r.connecting(t0);
        r.connected();
        let at = r.lost(t0, &mut rng);
        assert_eq!(r.manager(), 0);
        assert!(at - t0 >= BACKOFF_INITIAL / 2 && at - t0 < BACKOFF_INITIAL, "{:?}", at - t0);
        let Next::Retry(at) = r.failed(t0, ConnectError::Other, &mut rng) else { panic!() };
        assert!(at - t0 >= BACKOFF_INITIAL && at - t0 < BACKOFF_INITIAL * 2, "{:?}", at - t0);
        let mut fresh = Reconnect::managers(1, 3);
        fresh.connecting(t0);
        assert_eq!(fresh.failed(t0, ConnectError::Other, &mut rng), Next::GiveUp(GiveUp::Unreachable));
        assert_eq!(fresh.failures(), &[(0, GiveUp::Unreachable)]);
    }
}
