//! NAT behaviour: how a client's router maps its UDP socket towards different destinations
//! (RFC 4787 terms, RFC 5780 in spirit), and the traversal strategy two classes leave.
//!
//! A client learns its mapping towards each of the manager's STUN addresses (the main port,
//! the alternate port, and the alternate IP if the manager has one; each answer names the
//! next, see `docs/protocol.md` section 5.3) and [`classify`]s the list:
//!
//! * every mapping the same: [`NatClass::EndpointIndependent`]. A peer reaches the client at
//!   the address the manager saw: the simple punch works (a plain stateful firewall with no
//!   NAT looks the same).
//! * a new port for each destination, each a fixed step Δ after the last:
//!   [`NatClass::Sequential`]. The port a peer will see can be predicted.
//! * a new port for each destination with no pattern (or a different public IP):
//!   [`NatClass::Random`]. Only a port mapping protocol, IPv6 or many tries (the birthday
//!   method, from the other side) can reach it.
//!
//! With one STUN address (the manager's `--alt-port off`) the class stays
//! [`NatClass::Unknown`], treated as endpoint-independent, as before classification existed.

use std::net::SocketAddr;

/// The largest port step (either way) taken as sequential allocation rather than chance:
/// between two probes a busy NAT hands ports to other flows too.
pub const MAX_SEQUENTIAL_STEP: i32 = 64;

/// How a client's NAT maps its UDP socket towards different destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NatClass {
    /// Not measured (the manager has no alternate STUN address, or it did not answer).
    #[default]
    Unknown,
    /// The same public address towards every destination (or no NAT at all).
    EndpointIndependent,
    /// A new public port per destination, each `delta` after the one before.
    Sequential {
        /// The step between consecutive mappings (negative: counting down).
        delta: i16,
    },
    /// A new public port per destination with no pattern, or another public IP.
    Random,
    /// The client holds a port mapping on its router (PCP, NAT-PMP or UPnP IGD): its
    /// mapped address reaches it from anywhere, whatever the NAT does to its own flows.
    Mapped,
}

impl NatClass {
    /// Wire code (REGISTER, INCOMING, START): 0 unknown, 1 endpoint-independent,
    /// 2 sequential, 3 random, 4 mapped.
    pub fn code(self) -> u8 {
        match self {
            NatClass::Unknown => 0,
            NatClass::EndpointIndependent => 1,
            NatClass::Sequential { .. } => 2,
            NatClass::Random => 3,
            NatClass::Mapped => 4,
        }
    }

    /// The class from its wire code and step; `None` for an unknown code, or a step other
    /// than 0 on a class that has none (one class, one encoding).
    pub fn from_wire(code: u8, delta: i16) -> Option<NatClass> {
        Some(match (code, delta) {
            (0, 0) => NatClass::Unknown,
            (1, 0) => NatClass::EndpointIndependent,
            (2, delta) => NatClass::Sequential { delta },
            (3, 0) => NatClass::Random,
            (4, 0) => NatClass::Mapped,
            _ => return None,
        })
    }

    /// The step on the wire (0 unless sequential).
    pub fn wire_delta(self) -> i16 {
        match self {
            NatClass::Sequential { delta } => delta,
            _ => 0,
        }
    }

    /// Its name in output: `unknown`, `endpoint-independent`, `sequential`, `random`,
    /// `mapped`.
    pub fn as_str(self) -> &'static str {
        match self {
            NatClass::Unknown => "unknown",
            NatClass::EndpointIndependent => "endpoint-independent",
            NatClass::Sequential { .. } => "sequential",
            NatClass::Random => "random",
            NatClass::Mapped => "mapped",
        }
    }

    /// True if a peer reaches this side at the address the manager saw (or is assumed to).
    pub fn is_easy(self) -> bool {
        matches!(self, NatClass::Unknown | NatClass::EndpointIndependent | NatClass::Mapped)
    }
}

impl std::fmt::Display for NatClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatClass::Sequential { delta } => write!(f, "sequential({delta:+})"),
            c => f.write_str(c.as_str()),
        }
    }
}

/// Classify a client's NAT from its mappings towards different destinations, in the order
/// the probes were sent (the first towards the manager's main port). Fewer than two:
/// [`NatClass::Unknown`].
pub fn classify(mappings: &[SocketAddr]) -> NatClass {
    if mappings.len() < 2 {
        return NatClass::Unknown;
    }
    if mappings.iter().any(|m| m.ip() != mappings[0].ip()) {
        return NatClass::Random;
    }
    // The distinct ports in the order they were handed out (an address-dependent NAT gives
    // the same port back for a second port of the same IP).
    let mut ports: Vec<u16> = Vec::with_capacity(mappings.len());
    for m in mappings {
        if !ports.contains(&m.port()) {
            ports.push(m.port());
        }
    }
    if ports.len() == 1 {
        return NatClass::EndpointIndependent;
    }
    let steps: Vec<i32> = ports.windows(2).map(|w| i32::from(w[1]) - i32::from(w[0])).collect();
    let first = steps[0];
    if first.abs() <= MAX_SEQUENTIAL_STEP && steps.iter().all(|&s| s == first) {
        NatClass::Sequential { delta: first as i16 }
    } else {
        NatClass::Random
    }
}

/// How a call gets its direct path, chosen by the manager from both sides' classes (and
/// computed the same way by each client, which knows both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The callee's null packet opens its window, the caller's first packet its own: each
    /// side's address is the one the manager saw.
    Direct,
    /// One side randomises ports. It opens many sockets that each send a token-carrying
    /// null packet to the easy side (each gets a random public port); the easy side probes
    /// random ports of its public IP until one probe meets one of those mappings (the
    /// birthday method; see `docs/protocol.md` section 5.5).
    Birthday,
    /// One side allocates ports sequentially: as [`Strategy::Birthday`], with the easy side
    /// probing the predicted ports first.
    Predict,
    /// No relay-free path: both sides randomise ports and neither has a port mapping. The
    /// call is refused at once.
    NoPath,
}

impl Strategy {
    /// Its name in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Direct => "direct",
            Strategy::Birthday => "birthday",
            Strategy::Predict => "predict",
            Strategy::NoPath => "none",
        }
    }
}

/// The strategy for a call between a caller of class `caller` and a callee of class `callee`.
/// Both sides changing ports per destination (random or sequential) leave no practical
/// path: each would have to guess the other's port for a mapping it has not made yet.
///
/// A side with a port mapping is reachable from anywhere at its mapped address, so a call
/// with one is direct whatever the other side's NAT does: the other side's first packet
/// to the mapped address opens its own NAT, and the mapped side answers to where that
/// packet came from (a peer-reflexive address, `docs/protocol.md` section 5.6).
pub fn strategy(caller: NatClass, callee: NatClass) -> Strategy {
    if caller == NatClass::Mapped || callee == NatClass::Mapped {
        return Strategy::Direct;
    }
    match (caller.is_easy(), callee.is_easy()) {
        (true, true) => Strategy::Direct,
        (false, false) => Strategy::NoPath,
        _ if caller == NatClass::Random || callee == NatClass::Random => Strategy::Birthday,
        _ => Strategy::Predict,
    }
}

impl Strategy {
    /// True if the side of class `me` opens the many sockets (it is the hard side).
    pub fn opens_sockets(self, me: NatClass) -> bool {
        matches!(self, Strategy::Birthday | Strategy::Predict) && !me.is_easy()
    }

    /// True for the strategies that search for a port pair.
    pub fn searches(self) -> bool {
        matches!(self, Strategy::Birthday | Strategy::Predict)
    }
}

/// The ports a NAT hands out for new flows when it picks at random (Linux's range without a
/// configured one: 1024..=65535).
pub const RANDOM_PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;

/// The number of ports in [`RANDOM_PORTS`] (R in the birthday formula P ≈ 1 − e^(−N·M/R)).
pub const RANDOM_PORT_COUNT: u32 = 64_512;

/// A walk over [`RANDOM_PORTS`] in a seeded order that visits every port once (without
/// replacement) in O(1) state: port(i) = 1024 + (a·i + b) mod R with `a` coprime to R.
#[derive(Debug, Clone, Copy)]
pub struct PortWalk {
    a: u32,
    b: u32,
    i: u32,
}

impl PortWalk {
    /// A walk from two random numbers.
    pub fn new(r1: u64, r2: u64) -> PortWalk {
        let n = u64::from(RANDOM_PORT_COUNT);
        // R = 2^10 * 3^2 * 7: a multiplier coprime to R is odd and not a multiple of 3 or 7.
        let mut a = (r1 % n) as u32 | 1;
        while a.is_multiple_of(3) || a.is_multiple_of(7) {
            a = (a + 2) % RANDOM_PORT_COUNT;
        }
        PortWalk { a, b: (r2 % n) as u32, i: 0 }
    }

    /// Ports walked so far.
    pub fn walked(&self) -> u32 {
        self.i
    }
}

impl Iterator for PortWalk {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        if self.i >= RANDOM_PORT_COUNT {
            return None;
        }
        let n = u64::from(RANDOM_PORT_COUNT);
        let k = (u64::from(self.a) * u64::from(self.i) + u64::from(self.b)) % n;
        self.i += 1;
        Some(1024 + k as u16)
    }
}

/// What a refused call's REJECT reason means, for people.
pub const NO_PATH_REASON: &str = "no relay-free path: both sides randomise ports and no port mapping";

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ports: &[u16]) -> Vec<SocketAddr> {
        ports.iter().map(|p| SocketAddr::from(([203, 0, 113, 9], *p))).collect()
    }

    #[test]
    fn mappings_classify_as_a_person_reading_them_would() {
        assert_eq!(classify(&at(&[40000])), NatClass::Unknown);
        assert_eq!(classify(&at(&[])), NatClass::Unknown);
        assert_eq!(classify(&at(&[40000, 40000])), NatClass::EndpointIndependent);
        assert_eq!(classify(&at(&[40000, 40000, 40000])), NatClass::EndpointIndependent);
        assert_eq!(classify(&at(&[40000, 40001])), NatClass::Sequential { delta: 1 });
        assert_eq!(classify(&at(&[40000, 40002, 40004])), NatClass::Sequential { delta: 2 });
        assert_eq!(classify(&at(&[40010, 40009, 40008])), NatClass::Sequential { delta: -1 });
        // Address-dependent: the second port of the same IP gets the first IP's mapping back.
        assert_eq!(classify(&at(&[40000, 40001, 40000])), NatClass::Sequential { delta: 1 });
        assert_eq!(classify(&at(&[40000, 51234])), NatClass::Random);
        assert_eq!(classify(&at(&[40000, 40001, 40100])), NatClass::Random, "steps disagree");
        assert_eq!(classify(&at(&[65535, 1024])), NatClass::Random);
        let mut two_ips = at(&[40000, 40000]);
        two_ips[1].set_ip([203, 0, 113, 10].into());
        assert_eq!(classify(&two_ips), NatClass::Random, "another public IP per destination");
    }

    #[test]
    fn classes_round_trip_through_their_wire_codes() {
        for c in [
            NatClass::Unknown,
            NatClass::EndpointIndependent,
            NatClass::Sequential { delta: -3 },
            NatClass::Sequential { delta: 64 },
            NatClass::Random,
            NatClass::Mapped,
        ] {
            assert_eq!(NatClass::from_wire(c.code(), c.wire_delta()), Some(c));
        }
        assert_eq!(NatClass::from_wire(5, 0), None);
        assert_eq!(NatClass::from_wire(4, 1), None);
        assert_eq!(NatClass::from_wire(1, 7), None, "a step only where the class has one");
    }

    #[test]
    fn the_strategy_follows_the_harder_side_and_is_symmetric() {
        use NatClass::*;
        let seq = Sequential { delta: 1 };
        let all = [Unknown, EndpointIndependent, seq, Random, Mapped];
        for a in all {
            for b in all {
                let want = match (a.is_easy(), b.is_easy()) {
                    _ if a == Mapped || b == Mapped => Strategy::Direct,
                    (true, true) => Strategy::Direct,
                    (false, false) => Strategy::NoPath,
                    _ if a == Random || b == Random => Strategy::Birthday,
                    _ => Strategy::Predict,
                };
                assert_eq!(strategy(a, b), want, "{a} -> {b}");
                assert_eq!(strategy(a, b), strategy(b, a), "{a} <-> {b}");
            }
        }
        assert_eq!(strategy(Random, Random), Strategy::NoPath);
        assert_eq!(strategy(Random, seq), Strategy::NoPath);
        assert_eq!(strategy(EndpointIndependent, Random), Strategy::Birthday);
        assert_eq!(strategy(seq, Unknown), Strategy::Predict);
        // A port mapping reaches a side whatever its NAT does.
        assert_eq!(strategy(Mapped, Random), Strategy::Direct);
        assert_eq!(strategy(seq, Mapped), Strategy::Direct);
        assert!(Strategy::Birthday.opens_sockets(Random));
        assert!(!Strategy::Birthday.opens_sockets(EndpointIndependent));
        assert!(!Strategy::Direct.opens_sockets(Random));
    }

    #[test]
    fn a_port_walk_visits_every_random_port_once() {
        for (r1, r2) in [(0, 0), (3, 7), (u64::MAX, 12345), (64_511, 64_512), (21, 5)] {
            let w = PortWalk::new(r1, r2);
            let mut seen = vec![false; 65536];
            let mut n = 0;
            for p in w {
                assert!(RANDOM_PORTS.contains(&p), "{p}");
                assert!(!seen[p as usize], "port {p} twice ({r1}, {r2})");
                seen[p as usize] = true;
                n += 1;
            }
            assert_eq!(n, RANDOM_PORT_COUNT);
        }
        // Two seeds give two different orders.
        let a: Vec<u16> = PortWalk::new(1, 2).take(8).collect();
        let b: Vec<u16> = PortWalk::new(99, 2).take(8).collect();
        assert_ne!(a, b);
    }
}
