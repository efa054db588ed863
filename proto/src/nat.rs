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
}

impl NatClass {
    /// Wire code (REGISTER, INCOMING, START): 0 unknown, 1 endpoint-independent,
    /// 2 sequential, 3 random.
    pub fn code(self) -> u8 {
        match self {
            NatClass::Unknown => 0,
            NatClass::EndpointIndependent => 1,
            NatClass::Sequential { .. } => 2,
            NatClass::Random => 3,
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

    /// Its name in output: `unknown`, `endpoint-independent`, `sequential`, `random`.
    pub fn as_str(self) -> &'static str {
        match self {
            NatClass::Unknown => "unknown",
            NatClass::EndpointIndependent => "endpoint-independent",
            NatClass::Sequential { .. } => "sequential",
            NatClass::Random => "random",
        }
    }

    /// True if a peer reaches this side at the address the manager saw (or is assumed to).
    pub fn is_easy(self) -> bool {
        matches!(self, NatClass::Unknown | NatClass::EndpointIndependent)
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
    /// No relay-free path: both sides randomise ports and neither has a port mapping. The
    /// call is refused at once.
    NoPath,
}

impl Strategy {
    /// Its name in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Direct => "direct",
            Strategy::NoPath => "none",
        }
    }
}

/// The strategy for a call between a caller of class `caller` and a callee of class `callee`.
pub fn strategy(caller: NatClass, callee: NatClass) -> Strategy {
    match (caller, callee) {
        (NatClass::Random, NatClass::Random) => Strategy::NoPath,
        _ => Strategy::Direct,
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
        ] {
            assert_eq!(NatClass::from_wire(c.code(), c.wire_delta()), Some(c));
        }
        assert_eq!(NatClass::from_wire(4, 0), None);
        assert_eq!(NatClass::from_wire(1, 7), None, "a step only where the class has one");
    }

    #[test]
    fn only_random_against_random_has_no_path() {
        use NatClass::*;
        let all = [Unknown, EndpointIndependent, Sequential { delta: 1 }, Random];
        for a in all {
            for b in all {
                let want = if a == Random && b == Random { Strategy::NoPath } else { Strategy::Direct };
                assert_eq!(strategy(a, b), want, "{a} -> {b}");
            }
        }
    }
}
