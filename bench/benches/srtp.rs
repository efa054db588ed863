//! Criterion benches of the SRTP transform (`proto::srtp`) on a voice-sized packet: a
//! 172-byte RTP packet (12-byte header, 160-byte payload, 20 ms of G.711 or a large Opus
//! frame), for both suites. `protect` is the sender's cost alone; `protect_unprotect` is a
//! packet's whole trip (the receiver's share is the difference). Each iteration copies the
//! plain packet into the buffer first (a 172-byte copy, a few ns).
//! Run: `cargo bench -p bench --bench srtp`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use proto::srtp::{MasterKey, SrtpReceiver, SrtpSender, Suite};
use proto::wire::rtp::RtpHeader;

const LEN: usize = 172;

fn srtp(c: &mut Criterion) {
    for suite in [Suite::AeadAes128Gcm, Suite::AesCm128HmacSha1_80] {
        let mk = MasterKey { key: [0x5A; 16], salt: [0xC3; 14], suite };
        let mut plain = [0u8; LEN];
        for (i, b) in plain.iter_mut().enumerate() {
            *b = i as u8;
        }
        let mut header = RtpHeader { marker: false, payload_type: 111, seq: 0, timestamp: 0, ssrc: 0x1234_5678 };
        let mut buf = [0u8; LEN + 16];
        let mut g = c.benchmark_group(format!("srtp/{}", suite.name()));
        g.throughput(Throughput::Elements(1));

        let mut tx = SrtpSender::new(&mk);
        g.bench_function("protect", |b| {
            b.iter(|| {
                header.seq = header.seq.wrapping_add(1);
                header.emit(&mut plain);
                buf[..LEN].copy_from_slice(&plain);
                tx.protect_rtp(black_box(&mut buf), LEN).expect("protect")
            })
        });

        let mut tx = SrtpSender::new(&mk);
        let mut rx = SrtpReceiver::new(&mk);
        g.bench_function("protect_unprotect", |b| {
            b.iter(|| {
                header.seq = header.seq.wrapping_add(1);
                header.emit(&mut plain);
                buf[..LEN].copy_from_slice(&plain);
                let n = tx.protect_rtp(&mut buf, LEN).expect("protect");
                rx.unprotect_rtp(black_box(&mut buf[..n])).expect("unprotect")
            })
        });
        g.finish();
    }
}

criterion_group!(benches, srtp);
criterion_main!(benches);
