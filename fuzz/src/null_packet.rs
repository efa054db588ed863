//! The authenticated null packet (`proto::wire::null`, version 2).
//!
//! The input is read as a null packet and as a list of counters. Properties:
//! * parsing never panics; a parsed packet re-emits (with any key) to the same first 24
//!   bytes, and with the key it was signed with to the same 40;
//! * a packet verifies under at most one of two different keys, and never once one byte of
//!   it is changed;
//! * the counter window accepts a counter at most once, never 0, never one more than 63
//!   below the highest accepted, and always one above the highest (checked against a model
//!   that remembers every accepted counter).

use std::collections::HashSet;

use proto::wire::null::{null_key, null_mac_ok, CounterWindow, NullPacket, NULL_LEN, NULL_MAC_START};

/// Run one input.
pub fn run(data: &[u8]) {
    let k1 = null_key(&[1; 32]);
    let k2 = null_key(&[2; 32]);
    if let Ok(p) = NullPacket::parse(data) {
        let mut b = [0u8; NULL_LEN];
        p.emit(&k1, &mut b);
        assert_eq!(&b[..NULL_MAC_START], &data[..NULL_MAC_START], "a parsed null packet re-emits differently");
        assert!(null_mac_ok(&k1, &b), "a packet signed with a key does not verify under it");
        assert!(!null_mac_ok(&k2, &b), "a packet verifies under two keys");
        let i = usize::from(data.first().copied().unwrap_or(0)) % NULL_LEN;
        let mut c = b;
        c[i] ^= 1 << (data.len() % 8);
        assert!(!null_mac_ok(&k1, &c), "a changed packet (byte {i}) still verifies");
        assert!(!(null_mac_ok(&k1, data) && null_mac_ok(&k2, data)), "the input verifies under two keys");
    }
    // Counters: 4 bytes each.
    let mut w = CounterWindow::default();
    let mut seen: HashSet<u32> = HashSet::new();
    let mut highest = 0u32;
    for c in data.chunks_exact(4) {
        let ctr = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        let fresh = w.fresh(ctr);
        if ctr == 0 || seen.contains(&ctr) || (highest >= 64 && ctr <= highest - 64) {
            assert!(!fresh, "counter {ctr} accepted (highest {highest})");
        }
        if ctr > highest {
            assert!(fresh, "counter {ctr} above the highest {highest} refused");
        }
        if fresh {
            w.accept(ctr);
            seen.insert(ctr);
            highest = highest.max(ctr);
        }
    }
}
