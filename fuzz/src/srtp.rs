//! Target `srtp`: the SRTP / SRTCP transform (`proto/src/srtp.rs`), both suites, under the
//! fixed master key [`master_key`].
//!
//! The input is used four ways, for each suite:
//! 1. as a received SRTP packet and as a received SRTCP packet, each to a fresh receiver:
//!    never a panic, and a success (only a genuine packet, e.g. a seed, can give one) returns
//!    the input's length less the suite's overhead;
//! 2. as a plain RTP packet (its version forced to 2) and as a plain RTCP packet: protect,
//!    then unprotect must give the same bytes back; protect refuses only a header that does
//!    not fit (`TooShort`, `BadHeader`) and then leaves the buffer as it was;
//! 3. as a stream of sequence numbers (big-endian pairs, at most [`MAX_STREAM`]): a sender
//!    protects a small packet for each (refusing indices it has used or left behind, and
//!    only with `Replayed` / `TooOld`); a receiver given the protected packets in the same
//!    order must accept every one (its index estimate and window follow the sender's) and
//!    get its plaintext back; given them all again, in reverse, it must accept none;
//! 4. the same packets, in an order the input picks, to a third receiver: each one is
//!    accepted at most once, with its own plaintext.

use proto::srtp::{MasterKey, SrtpError, SrtpReceiver, SrtpSender, Suite};

/// The suites fuzzed.
pub const SUITES: [Suite; 2] = [Suite::AeadAes128Gcm, Suite::AesCm128HmacSha1_80];
/// The most sequence numbers one input drives (part 3).
pub const MAX_STREAM: usize = 128;
/// The SSRC of the packets of part 3.
pub const SSRC: u32 = 0x5EED_0001;

/// The master key of every sender and receiver here (and of the seeds).
pub fn master_key(suite: Suite) -> MasterKey {
    let mut key = [0u8; 16];
    let mut salt = [0u8; 14];
    for (i, b) in key.iter_mut().enumerate() {
        *b = 0x30 + i as u8;
    }
    for (i, b) in salt.iter_mut().enumerate() {
        *b = 0xB0 + i as u8;
    }
    MasterKey { key, salt, suite }
}

/// The plain RTP packet of part 3 for `seq`: fixed header, 12 payload bytes naming the seq.
pub fn stream_packet(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 111];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(seq as u32 * 960).to_be_bytes());
    p.extend_from_slice(&SSRC.to_be_bytes());
    for i in 0..12u8 {
        p.push((seq as u8) ^ i);
    }
    p
}

/// One input: see the module docs.
pub fn run(data: &[u8]) {
    for suite in SUITES {
        received(suite, data);
        round_trip(suite, data);
        stream(suite, data);
    }
}

fn received(suite: Suite, data: &[u8]) {
    let mk = master_key(suite);
    let mut b = data.to_vec();
    if let Ok(n) = SrtpReceiver::new(&mk).unprotect_rtp(&mut b) {
        assert_eq!(n + suite.rtp_overhead(), data.len(), "{suite:?}: SRTP accepted with a wrong length");
    }
    let mut b = data.to_vec();
    if let Ok(n) = SrtpReceiver::new(&mk).unprotect_rtcp(&mut b) {
        assert_eq!(n + suite.rtcp_overhead(), data.len(), "{suite:?}: SRTCP accepted with a wrong length");
    }
}

fn round_trip(suite: Suite, data: &[u8]) {
    let mk = master_key(suite);
    let mut plain = data.to_vec();
    if let Some(b) = plain.first_mut() {
        *b = (*b & 0x3F) | 0x80;
    }
    for rtcp in [false, true] {
        let overhead = if rtcp { suite.rtcp_overhead() } else { suite.rtp_overhead() };
        let mut buf = plain.clone();
        buf.resize(plain.len() + overhead, 0);
        let before = buf.clone();
        let mut tx = SrtpSender::new(&mk);
        let r = if rtcp { tx.protect_rtcp(&mut buf, plain.len()) } else { tx.protect_rtp(&mut buf, plain.len()) };
        let m = match r {
            Ok(m) => m,
            Err(e) => {
                assert!(matches!(e, SrtpError::TooShort | SrtpError::BadHeader), "{suite:?} rtcp={rtcp}: {e:?}");
                assert_eq!(buf, before, "{suite:?} rtcp={rtcp}: a refused packet was changed");
                continue;
            }
        };
        assert_eq!(m, plain.len() + overhead);
        let mut rx = SrtpReceiver::new(&mk);
        let n = if rtcp { rx.unprotect_rtcp(&mut buf[..m]) } else { rx.unprotect_rtp(&mut buf[..m]) };
        assert_eq!(n, Ok(plain.len()), "{suite:?} rtcp={rtcp}: own packet refused");
        assert_eq!(buf[..plain.len()], plain[..], "{suite:?} rtcp={rtcp}: round trip changed the packet");
    }
}

fn stream(suite: Suite, data: &[u8]) {
    let mk = master_key(suite);
    let mut tx = SrtpSender::new(&mk);
    // (plain, protected) for every packet the sender accepted, in sending order.
    let mut sent: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for pair in data.chunks_exact(2).take(MAX_STREAM) {
        let plain = stream_packet(u16::from_be_bytes([pair[0], pair[1]]));
        let mut buf = plain.clone();
        buf.resize(plain.len() + suite.rtp_overhead(), 0);
        match tx.protect_rtp(&mut buf, plain.len()) {
            Ok(m) => {
                buf.truncate(m);
                sent.push((plain, buf));
            }
            Err(e) => assert!(matches!(e, SrtpError::Replayed | SrtpError::TooOld), "{suite:?}: sender {e:?}"),
        }
    }

    let mut rx = SrtpReceiver::new(&mk);
    for (i, (plain, p)) in sent.iter().enumerate() {
        let mut b = p.clone();
        let r = rx.unprotect_rtp(&mut b);
        assert_eq!(r, Ok(plain.len()), "{suite:?}: in-order packet {i} refused");
        assert_eq!(b[..plain.len()], plain[..]);
    }
    for (i, (_, p)) in sent.iter().enumerate().rev() {
        let r = rx.unprotect_rtp(&mut p.clone());
        assert!(r.is_err(), "{suite:?}: packet {i} accepted twice");
    }

    // Delivery order from the input's bytes: a rotation and a stride over the packets, each
    // index visited twice.
    let n = sent.len();
    if n == 0 {
        return;
    }
    let start = data.first().copied().unwrap_or(0) as usize % n;
    let stride = data.last().copied().unwrap_or(1) as usize;
    let mut rx = SrtpReceiver::new(&mk);
    let mut accepted = vec![false; n];
    for k in 0..2 * n {
        let i = (start + k * stride) % n;
        let (plain, p) = &sent[i];
        let mut b = p.clone();
        if let Ok(len) = rx.unprotect_rtp(&mut b) {
            assert!(!accepted[i], "{suite:?}: packet {i} accepted twice out of order");
            accepted[i] = true;
            assert_eq!(b[..len], plain[..], "{suite:?}: packet {i} decrypted wrong");
        }
    }
}
