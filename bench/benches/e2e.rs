//! Criterion benches of a call's end-to-end key exchange (`proto::e2e`), the per-call CPU
//! that SRTP keys add to call setup on the two peers (the manager only relays the shares):
//! `caller_offer` (a key pair and the offer), `callee_answer` (a key pair, the answer and
//! the key derivation: X25519 and HKDF), `caller_derive` (the caller's derivation on START),
//! and `call` (all three, what one call costs both peers together). `call_signed` is the same
//! with Ed25519 identities on both sides (two signatures, two verifications more).
//! Run: `cargo bench -p bench --bench e2e`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use proto::e2e::{self, IdentityKey, KeyGen};
use proto::wire::frame::CallId;

const SUITES: [u8; 2] = [e2e::SUITE_AES_128_GCM, e2e::SUITE_AES_CM_SHA1_80];

fn exchange(c: &mut Criterion) {
    let mut alice = KeyGen::new(&[1; 32]);
    let mut bob = KeyGen::new(&[2; 32]);
    let mut g = c.benchmark_group("e2e");
    g.bench_function("caller_offer", |b| {
        b.iter(|| {
            let eph = alice.ephemeral();
            black_box(e2e::offer(&eph, &SUITES, None))
        })
    });
    let a = alice.ephemeral();
    let offer = e2e::offer(&a, &SUITES, None);
    g.bench_function("callee_answer", |b| {
        b.iter(|| {
            let eph = bob.ephemeral();
            let ans = e2e::answer(&eph, &offer, &SUITES, None).unwrap();
            black_box(
                e2e::derive(&eph, &offer.public, &offer.public, &eph.public, CallId(1), 2, ans.suites[0]).unwrap(),
            )
        })
    });
    let bb = bob.ephemeral();
    let ans = e2e::answer(&bb, &offer, &SUITES, None).unwrap();
    g.bench_function("caller_derive", |b| {
        b.iter(|| black_box(e2e::derive(&a, &ans.public, &a.public, &ans.public, CallId(1), 2, ans.suites[0]).unwrap()))
    });
    let call = |alice: &mut KeyGen, bob: &mut KeyGen, ida: Option<&IdentityKey>, idb: Option<&IdentityKey>| {
        let a = alice.ephemeral();
        let offer = e2e::offer(&a, &SUITES, ida);
        let b = bob.ephemeral();
        e2e::check_identity(&offer, true, None, ida.map(|k| k.public()).as_ref()).unwrap();
        let ans = e2e::answer(&b, &offer, &SUITES, idb).unwrap();
        let kb = e2e::derive(&b, &offer.public, &a.public, &b.public, CallId(1), 2, ans.suites[0]).unwrap();
        e2e::check_identity(&ans, false, Some(&a.public), idb.map(|k| k.public()).as_ref()).unwrap();
        let ka = e2e::derive(&a, &ans.public, &a.public, &b.public, CallId(1), 2, ans.suites[0]).unwrap();
        (ka, kb)
    };
    g.bench_function("call", |b| b.iter(|| black_box(call(&mut alice, &mut bob, None, None))));
    let (ida, idb) = (IdentityKey::from_seed(&[3; 32]), IdentityKey::from_seed(&[4; 32]));
    g.bench_function("call_signed", |b| b.iter(|| black_box(call(&mut alice, &mut bob, Some(&ida), Some(&idb)))));
    g.finish();
}

criterion_group!(benches, exchange);
criterion_main!(benches);
