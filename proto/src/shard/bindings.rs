//! STUN bindings seen on the manager's UDP port, keyed by transaction id, so that REGISTER
//! (which names the transaction id) gets the public UDP address the request came from.
//!
//! Striped: 64 independently locked maps chosen by the transaction id, so the UDP responder
//! and the shards rarely meet on one lock, and each lock is held for one map operation.
//! Entries expire after [`BINDING_TTL`]; the table holds at most [`MAX_BINDINGS`] entries
//! (further requests are still answered, but not remembered, and counted).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a binding waits for its REGISTER.
pub const BINDING_TTL: Duration = Duration::from_secs(30);
/// Bound on remembered bindings.
pub const MAX_BINDINGS: usize = 1 << 20;
const STRIPES: usize = 64;

/// One stripe of the table: transaction id to the address seen and when.
type Stripe = Mutex<HashMap<[u8; 12], (SocketAddr, Instant)>>;

/// The binding table.
#[derive(Debug)]
pub struct Bindings {
    stripes: Vec<Stripe>,
}

impl Default for Bindings {
    fn default() -> Self {
        Bindings { stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect() }
    }
}

impl Bindings {
    fn stripe(&self, tx: &[u8; 12]) -> &Mutex<HashMap<[u8; 12], (SocketAddr, Instant)>> {
        &self.stripes[tx[0] as usize % STRIPES]
    }

    /// Remember that a binding request with `tx` came from `addr`. Returns false if the table
    /// is full. The first source of a transaction id keeps it while it is fresh: a request
    /// from elsewhere with the same id (someone who saw it go by) cannot move the client's
    /// public address; a retransmission from the same source refreshes it.
    pub fn insert(&self, tx: [u8; 12], addr: SocketAddr, now: Instant) -> bool {
        let mut m = self.stripe(&tx).lock().unwrap_or_else(|e| e.into_inner());
        if let Some((first, t)) = m.get(&tx) {
            if *first != addr && now.saturating_duration_since(*t) < BINDING_TTL {
                return true;
            }
        }
        if m.len() >= MAX_BINDINGS / STRIPES {
            m.retain(|_, (_, t)| now.duration_since(*t) < BINDING_TTL);
            if m.len() >= MAX_BINDINGS / STRIPES {
                return false;
            }
        }
        m.insert(tx, (addr, now));
        true
    }

    /// Take the binding for `tx`, if it is known and fresh at `now`.
    pub fn take(&self, tx: &[u8; 12], now: Instant) -> Option<SocketAddr> {
        let mut m = self.stripe(tx).lock().unwrap_or_else(|e| e.into_inner());
        let (addr, t) = m.remove(tx)?;
        (now.saturating_duration_since(t) < BINDING_TTL).then_some(addr)
    }

    /// Drop expired bindings.
    pub fn purge(&self, now: Instant) {
        for s in &self.stripes {
            s.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, (_, t)| now.duration_since(*t) < BINDING_TTL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_source_of_a_transaction_id_keeps_it() {
        let b = Bindings::default();
        let t0 = Instant::now();
        let (client, thief): (SocketAddr, SocketAddr) =
            ("192.0.2.1:4000".parse().unwrap(), "198.51.100.9:5000".parse().unwrap());
        assert!(b.insert([1; 12], client, t0));
        assert!(b.insert([1; 12], thief, t0 + Duration::from_millis(5)));
        assert_eq!(b.take(&[1; 12], t0 + Duration::from_millis(10)), Some(client));
        // Used once.
        assert_eq!(b.take(&[1; 12], t0 + Duration::from_millis(10)), None);
        // After the first one expired, a new source may take the id.
        assert!(b.insert([2; 12], client, t0));
        assert!(b.insert([2; 12], thief, t0 + BINDING_TTL));
        assert_eq!(b.take(&[2; 12], t0 + BINDING_TTL), Some(thief));
    }
}
