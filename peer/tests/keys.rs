//! End-to-end keys with the real binaries: identities (`--identity`, `--peer-key`) and SRTP
//! suite agreement between two `peer`s through a real manager, on loopback.

mod common;

use common::*;

/// The identity public key `peer` printed on stderr (`peer: identity KEY`).
fn identity_of(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("peer: identity "))
        .unwrap_or_else(|| panic!("no identity line in {stderr}"))
        .trim()
        .to_string()
}

#[test]
fn pinned_identities_connect_and_a_wrong_pin_refuses_the_call_before_any_packet() {
    let dir = Scratch::new("keys");
    let (ida, idb) = (dir.path("alice.id"), dir.path("bob.id"));
    let m = start_manager();
    // First calls make the identity files and tell us their keys.
    let bob = peer(&m.addr, "bob", &["--identity", &idb, "listen", "--calls", "1", "--json"]);
    settle();
    let alice = peer(&m.addr, "alice", &["--identity", &ida, "call", "bob", "--duration", "1", "--json"]);
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
    let (cb, out_b, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!((ca, cb), (0, 0), "alice: {err_a}\nbob: {err_b}");
    let (key_a, key_b) = (identity_of(&err_a), identity_of(&err_b));
    let (a, b) = (json_line(&out_a), json_line(&out_b));
    assert_eq!(a["peer_identity"], key_b.as_str(), "{a}");
    assert_eq!(b["peer_identity"], key_a.as_str(), "{b}");
    let mode = std::fs::metadata(&ida).unwrap().permissions();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.mode() & 0o777, 0o600, "the identity file is private");

    // Both pin the other: the call goes through, the same keys (the files are reused).
    let bob = peer(&m.addr, "bob", &["--identity", &idb, "--peer-key", &key_a, "listen", "--calls", "1", "--json"]);
    settle();
    let alice =
        peer(&m.addr, "alice", &["--identity", &ida, "--peer-key", &key_b, "call", "bob", "--duration", "1", "--json"]);
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
    let (cb, _, err_b) = bob.finish(Duration::from_secs(10));
    assert_eq!((ca, cb), (0, 0), "alice: {err_a}\nbob: {err_b}");
    assert_eq!(identity_of(&err_a), key_a);
    let a = json_line(&out_a);
    assert_eq!(a["result"], "ok", "{a}");
    assert!(a["received"].as_u64().unwrap() > 0, "{a}");

    // Alice expects someone else: she refuses bob's answer and sends nothing.
    let bob = peer(&m.addr, "bob", &["--identity", &idb, "listen", "--duration", "6", "--json"]);
    settle();
    let alice =
        peer(&m.addr, "alice", &["--identity", &ida, "--peer-key", &key_a, "call", "bob", "--duration", "1", "--json"]);
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
    assert_ne!(ca, 0, "{err_a}");
    let a = json_line(&out_a);
    assert_eq!(a["result"], "end-to-end key exchange failed (peer identity does not match the pinned key)", "{a}");
    assert_eq!(a["sent"], 0, "{a}");
    assert_eq!(a["refused"]["key_exchange_failed"], 1, "{a}");
    let (_, out_b, _) = bob.finish(Duration::from_secs(20));
    let b = json_line(&out_b);
    assert_eq!(b["received"], 0, "no media reached bob: {b}");

    // Bob pins a key alice's share is not signed with: he declines, she hears why.
    let bob = peer(&m.addr, "bob", &["--peer-key", &key_b, "listen", "--duration", "6", "--json"]);
    settle();
    let alice = peer(&m.addr, "alice", &["--identity", &ida, "call", "bob", "--duration", "1", "--json"]);
    let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
    assert_ne!(ca, 0, "{err_a}");
    assert_eq!(json_line(&out_a)["result"], "rejected (KeyRefused)", "{out_a}");
    drop(bob);
    m.stop();
}

#[test]
fn the_callee_picks_the_suite_and_a_plain_rtp_peer_meets_only_its_like() {
    let m = start_manager();
    for (alice_args, bob_args, want) in [
        (vec![], vec!["--srtp-suite", "AES_CM_128_HMAC_SHA1_80"], Some("AES_CM_128_HMAC_SHA1_80")),
        (vec!["--srtp-suite", "AES_CM_128_HMAC_SHA1_80,AEAD_AES_128_GCM"], vec![], Some("AEAD_AES_128_GCM")),
        (vec!["--no-srtp"], vec!["--no-srtp"], Some("none")),
        (vec!["--no-srtp"], vec![], None),
    ] {
        let bob = peer(&m.addr, "bob", &[&bob_args[..], &["listen", "--duration", "5", "--json"]].concat());
        settle();
        let alice = peer(&m.addr, "alice", &[&alice_args[..], &["call", "bob", "--duration", "1", "--json"]].concat());
        let (ca, out_a, err_a) = alice.finish(Duration::from_secs(30));
        let a = json_line(&out_a);
        match want {
            Some(suite) => {
                assert_eq!(ca, 0, "{alice_args:?} {bob_args:?}: {err_a}");
                assert_eq!(a["srtp"], suite, "{a}");
                assert!(a["received"].as_u64().unwrap() > 0, "{a}");
            }
            None => {
                assert_ne!(ca, 0, "{a}");
                assert_eq!(a["result"], "rejected (NoCommonSuite)", "{a}");
            }
        }
        drop(bob);
        std::thread::sleep(Duration::from_millis(300));
    }
    m.stop();
}
