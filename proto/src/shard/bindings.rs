//! STUN bindings seen on the manager's UDP port, keyed by transaction id, so that REGISTER
//! (which names the transaction id) gets the public UDP address the request came from.
//!
//! One owner per entry, no lock: the table is split over the shards by transaction id
//! ([`binding_shard`]), and each shard holds its part as a plain map. The STUN responder
//! sends every answered binding to its shard as a [`ShardMsg::Binding`] *before* the answer
//! leaves; a REGISTER naming a binding travels to the same shard as a [`ShardMsg::Resolve`]
//! through the same inbox, so the binding is always there first (both go through one FIFO
//! queue, and the client can only send REGISTER after it has the answer).
//!
//! Entries expire after [`BINDING_TTL`]; a part holds at most its bound (further bindings
//! are counted in `stun_table_full` and not remembered; their REGISTER falls back to the TCP
//! peer's address). A full part looks for expired entries at most once per
//! [`FULL_PURGE_EVERY`]: a flood of fresh bindings against a full table costs one scan a
//! second, not one per binding.
//!
//! [`ShardMsg::Binding`]: super::ShardMsg::Binding
//! [`ShardMsg::Resolve`]: super::ShardMsg::Resolve

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a binding waits for its REGISTER.
pub const BINDING_TTL: Duration = Duration::from_secs(30);
/// Bound on remembered bindings over the whole manager (each shard holds its share).
pub const MAX_BINDINGS: usize = 1 << 20;
/// How often a shard drops its expired bindings.
pub const PURGE_EVERY: Duration = Duration::from_secs(10);
/// How often a full part of the table looks for expired entries to make room.
pub const FULL_PURGE_EVERY: Duration = Duration::from_secs(1);

/// A STUN transaction id (RFC 8489 §5: 96 bits).
pub type TxId = [u8; 12];

/// The shard that holds the binding of transaction id `tx` among `n` shards. Transaction ids
/// are random (RFC 8489 §5), so their first bytes spread the bindings evenly.
pub fn binding_shard(tx: &TxId, n: u16) -> u16 {
    let x = u64::from_le_bytes(tx[..8].try_into().expect("8 of 12 bytes"));
    (x % n.max(1) as u64) as u16
}

/// One shard's part of the binding table.
#[derive(Debug)]
pub struct BindingTable {
    max: usize,
    map: HashMap<TxId, (SocketAddr, Instant)>,
    /// When a full table last looked for room.
    full_purge: Option<Instant>,
}

impl BindingTable {
    /// A table holding at most `max` bindings.
    pub fn new(max: usize) -> BindingTable {
        BindingTable { max: max.max(1), map: HashMap::new(), full_purge: None }
    }

    /// Bindings held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Remember that a binding request with `tx` came from `addr`. Returns false if the table
    /// is full. The first source of a transaction id keeps it while it is fresh: a request
    /// from elsewhere with the same id (someone who saw it go by) cannot move the client's
    /// public address; a retransmission from the same source refreshes it.
    pub fn insert(&mut self, tx: TxId, addr: SocketAddr, now: Instant) -> bool {
        if let Some((first, t)) = self.map.get(&tx) {
            if *first != addr && now.saturating_duration_since(*t) < BINDING_TTL {
                return true;
            }
        }
        if self.map.len() >= self.max && !self.map.contains_key(&tx) {
            if self.full_purge.is_some_and(|t| now.saturating_duration_since(t) < FULL_PURGE_EVERY) {
                return false;
            }
            self.full_purge = Some(now);
            self.purge(now);
            if self.map.len() >= self.max {
                return false;
            }
        }
        self.map.insert(tx, (addr, now));
        true
    }

    /// Whether a binding for `tx` is held (fresh or not).
    pub fn has(&self, tx: &TxId) -> bool {
        self.map.contains_key(tx)
    }

    /// Take the binding for `tx`, if it is known and fresh at `now`.
    pub fn take(&mut self, tx: &TxId, now: Instant) -> Option<SocketAddr> {
        let (addr, t) = self.map.remove(tx)?;
        (now.saturating_duration_since(t) < BINDING_TTL).then_some(addr)
    }

    /// Drop expired bindings.
    pub fn purge(&mut self, now: Instant) {
        self.map.retain(|_, (_, t)| now.saturating_duration_since(*t) < BINDING_TTL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_source_of_a_transaction_id_keeps_it() {
        let mut b = BindingTable::new(16);
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

    #[test]
    fn a_full_table_refuses_new_ids_until_old_ones_expire() {
        let mut b = BindingTable::new(2);
        let t0 = Instant::now();
        let a: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        assert!(b.insert([1; 12], a, t0));
        assert!(b.insert([2; 12], a, t0));
        assert!(!b.insert([3; 12], a, t0 + Duration::from_secs(1)));
        // A retransmission of a held id still refreshes it.
        assert!(b.insert([2; 12], a, t0 + Duration::from_secs(1)));
        // Once [1] expired there is room again.
        assert!(b.insert([3; 12], a, t0 + BINDING_TTL));
        assert_eq!(b.len(), 2);
        assert_eq!(b.take(&[1; 12], t0 + BINDING_TTL), None);
    }

    #[test]
    fn a_full_table_looks_for_room_at_most_once_a_second() {
        let mut b = BindingTable::new(2);
        let t0 = Instant::now();
        let a: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        assert!(b.insert([1; 12], a, t0));
        assert!(b.insert([2; 12], a, t0 + Duration::from_millis(1200)));
        // Full at 31 s ([1] has expired, [2] not yet): the first newcomer's scan makes room.
        let t = t0 + BINDING_TTL + Duration::from_secs(1);
        assert!(b.insert([3; 12], a, t));
        // Full again, and [2] has expired too, but a scan was made less than a second ago:
        // refused without one.
        let t2 = t + Duration::from_millis(500);
        assert!(!b.insert([4; 12], a, t2));
        assert_eq!(b.len(), 2, "no scan dropped [2]");
        // A second later the scan runs again and finds [2] expired.
        assert!(b.insert([4; 12], a, t + FULL_PURGE_EVERY));
    }

    #[test]
    fn bindings_spread_over_the_shards() {
        let mut counts = [0u32; 3];
        let mut rng = crate::rng::Rng::new(7);
        for _ in 0..3000 {
            let mut tx = [0u8; 12];
            for b in tx.iter_mut() {
                *b = rng.below(256) as u8;
            }
            counts[binding_shard(&tx, 3) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
        assert_eq!(binding_shard(&[9; 12], 1), 0);
    }
}
