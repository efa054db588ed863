//! Criterion benches of the per-packet hot paths: datagram demux and RTP parse, RTP header
//! write, the client's receive path for one of 1000 calls sharing a socket (demux, parse,
//! session lookup by SSRC, source check, RFC 3550 statistics), and the statistics update
//! alone. Run: `cargo bench -p bench --bench hot_paths`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use proto::client::{Client, ClientConfig, Output};
use proto::stats::RtpReceiverStats;
use proto::wire::frame::{AddrSource, CallId, ClientId, Frame};
use proto::wire::rtp::RtpHeader;
use proto::wire::{classify, DatagramKind};

fn packet(ssrc: u32, seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 172];
    RtpHeader { marker: false, payload_type: 111, seq, timestamp: seq as u32 * 960, ssrc }.emit(&mut p);
    p
}

fn wire(c: &mut Criterion) {
    let p = packet(7, 1);
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));
    g.bench_function("demux_and_rtp_parse", |b| {
        b.iter(|| {
            let d = black_box(&p[..]);
            match classify(d) {
                DatagramKind::Rtp => RtpHeader::parse(d).map(|(h, pl)| (h.ssrc, pl.len())).ok(),
                _ => None,
            }
        })
    });
    let mut out = [0u8; 172];
    let mut seq = 0u16;
    g.bench_function("rtp_header_write", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            RtpHeader { marker: false, payload_type: 111, seq, timestamp: seq as u32 * 960, ssrc: 9 }
                .emit(black_box(&mut out))
        })
    });
    g.finish();
}

fn session_lookup(c: &mut Criterion) {
    // A callee client with 1000 calls answered on one socket. Plain RTP (both sides agree to
    // `--no-srtp`): this times the demultiplexing and statistics; the SRTP transform has its
    // own benchmark (`benches/srtp.rs`).
    let t0 = Instant::now();
    let mut cfg = ClientConfig::new(ClientId::new("callee").unwrap(), 5000);
    cfg.srtp_suites = vec![proto::e2e::SUITE_NONE];
    let mut client = Client::new(cfg, 1);
    client.handle_connected(t0, None);
    client.handle_frame(t0, Frame::Registered { public: "192.0.2.2:5000".parse().unwrap(), source: AddrSource::Stun });
    let calls = 1000u64;
    let mut peers = Vec::new();
    for i in 0..calls {
        let caller_addr: SocketAddr = format!("192.0.2.{}:{}", 10 + i / 250, 20000 + i).parse().unwrap();
        let token = 0x1000_0000_0000_0000u64 + i * 0x1_0000_0001;
        client.handle_frame(
            t0,
            Frame::Incoming {
                call_id: CallId(i + 1),
                token,
                caller: ClientId::new(format!("c{i}")).unwrap(),
                caller_addr,
                caller_nat: proto::nat::NatClass::Unknown,
                caller_candidates: Vec::new(),
                caller_keys: Some(Box::new(
                    proto::e2e::HandPeer::offer(&[i as u8; 32], &[proto::e2e::SUITE_NONE]).share().clone(),
                )),
            },
        );
        peers.push((caller_addr, token as u32));
    }
    let mut buf = [0u8; 64];
    while !matches!(client.poll_output(&mut buf), Ok(Output::Timeout(_))) {}
    let (from, ssrc) = peers[500];
    let mut seq = 0u16;
    let mut g = c.benchmark_group("client");
    g.throughput(Throughput::Elements(1));
    let mut p = packet(ssrc, 0);
    // What is timed is the accepting path: the packet must be taken as media of call 500.
    assert!(client.handle_datagram(t0, from, &mut p).is_some(), "the benchmark's packet is refused");
    g.bench_function("receive_rtp_1000_calls", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            p[2..4].copy_from_slice(&seq.to_be_bytes());
            let now = t0 + Duration::from_micros(seq as u64 * 20_000);
            client.handle_datagram(now, from, black_box(&mut p)).map(|r| r.payload.len())
        })
    });
    g.finish();
}

fn stats(c: &mut Criterion) {
    let mut s = RtpReceiverStats::new(48_000);
    let mut seq = 0u16;
    let mut g = c.benchmark_group("stats");
    g.throughput(Throughput::Elements(1));
    g.bench_function("rfc3550_update", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            s.on_packet(black_box(seq), seq as u32 * 960, seq as u64 * 20_000);
        })
    });
    g.finish();
}

criterion_group!(benches, wire, session_lookup, stats);
criterion_main!(benches);
