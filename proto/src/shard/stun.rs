//! The manager's STUN responder as a pure function: one datagram in, a verdict out (an
//! answer to send and the binding to remember, or the reason it was dropped). Its only
//! state is the per-source rate limiter, which the responder's one owner holds; the binding
//! table is held by the shards ([`super::bindings`]). The IO around it (a UDP socket, or the
//! simulated network in tests) sends the answer and routes the binding.

use std::net::SocketAddr;
use std::time::Instant;

use crate::shard::stats::Stats;
use crate::shard::stun_limit::StunLimiter;
use crate::wire::stun::{self, StunMessage, TransactionId};
use crate::wire::{classify, DatagramKind};

/// What the responder does with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StunReply {
    /// Send the first `len` bytes of the output buffer back to the source, after routing the
    /// binding `(txid, source)` to shard [`super::bindings::binding_shard`]`(txid)`.
    Answer {
        /// Bytes of the answer in the output buffer.
        len: usize,
        /// The request's transaction id.
        txid: TransactionId,
    },
    /// Nothing is sent; the reason is counted.
    Dropped(StunDrop),
}

/// Why a datagram on the manager's UDP port got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StunDrop {
    /// A Binding Request whose answer would be more than twice its size (no amplifier).
    TooSmall,
    /// A Binding Request from a source over its rate.
    RateLimited,
    /// STUN that does not parse, or a STUN message other than a Binding Request.
    Malformed,
    /// RTP or RTCP: media, which never belongs on the manager.
    Media,
    /// Not STUN at all (a null packet, or unknown).
    NotStun,
}

impl StunDrop {
    /// Count the drop in the manager's counters.
    pub fn count(self, stats: &Stats) {
        match self {
            StunDrop::TooSmall => stats.inc(&stats.stun_too_small),
            StunDrop::RateLimited => stats.inc(&stats.stun_rate_limited),
            StunDrop::Malformed => stats.inc(&stats.udp_malformed),
            StunDrop::Media => {
                stats.inc(&stats.udp_non_stun);
                stats.inc(&stats.udp_media);
            }
            StunDrop::NotStun => stats.inc(&stats.udp_non_stun),
        }
    }
}

/// Answer one datagram `data` from `from` received at `now`: a Binding Request gets a
/// Binding Success Response (RFC 8489 §6.3.1) carrying `from` in XOR-MAPPED-ADDRESS, and
/// `other` (the next of the manager's STUN addresses, RFC 5780's OTHER-ADDRESS) if given,
/// written into `out`, unless the answer would be more than twice the request (no
/// amplifier: 32 bytes for IPv4, 44 for IPv6, 12 or 24 more with `other`, which is left out
/// where it would make the answer too large; nullpunch's own requests are 36) or the source
/// is over its rate. Everything else is dropped with its reason.
pub fn respond(
    limiter: &mut StunLimiter,
    now: Instant,
    from: SocketAddr,
    data: &[u8],
    other: Option<SocketAddr>,
    out: &mut [u8; stun::MAX_RESPONSE_LEN],
) -> StunReply {
    match classify(data) {
        DatagramKind::Stun => match stun::parse(data) {
            Ok(StunMessage::BindingRequest { txid }) => {
                let mut len = stun::emit_binding_success_with(&txid, from, other, out);
                if len > 2 * data.len() && other.is_some() {
                    len = stun::emit_binding_success(&txid, from, out);
                }
                if len > 2 * data.len() {
                    StunReply::Dropped(StunDrop::TooSmall)
                } else if !limiter.allow(from.ip(), now) {
                    StunReply::Dropped(StunDrop::RateLimited)
                } else {
                    StunReply::Answer { len, txid }
                }
            }
            _ => StunReply::Dropped(StunDrop::Malformed),
        },
        DatagramKind::Rtp | DatagramKind::Rtcp => StunReply::Dropped(StunDrop::Media),
        DatagramKind::Null | DatagramKind::Unknown => StunReply::Dropped(StunDrop::NotStun),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(txid: [u8; 12]) -> Vec<u8> {
        let mut b = [0u8; stun::REQUEST_LEN];
        let n = stun::emit_binding_request(&txid, &mut b);
        b[..n].to_vec()
    }

    #[test]
    fn a_binding_request_is_answered_with_the_source_address() {
        let mut lim = StunLimiter::new(0.0, 0.0);
        let from: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let mut out = [0u8; stun::MAX_RESPONSE_LEN];
        let r = respond(&mut lim, Instant::now(), from, &request([3; 12]), None, &mut out);
        let StunReply::Answer { len, txid } = r else { panic!("{r:?}") };
        assert_eq!(txid, [3; 12]);
        assert_eq!(stun::parse(&out[..len]), Ok(StunMessage::BindingSuccess { txid, mapped: from, other: None }));
    }

    #[test]
    fn the_answer_names_the_other_address_when_there_is_one() {
        let mut lim = StunLimiter::new(0.0, 0.0);
        let mut out = [0u8; stun::MAX_RESPONSE_LEN];
        for (from, other) in [("192.0.2.7:40000", "198.51.100.1:7481"), ("[2001:db8::7]:40000", "[2001:db8::1]:7481")] {
            let (from, other): (SocketAddr, SocketAddr) = (from.parse().unwrap(), other.parse().unwrap());
            // nullpunch's own 36-byte request still gets the longer answer (at most 68 bytes).
            let r = respond(&mut lim, Instant::now(), from, &request([3; 12]), Some(other), &mut out);
            let StunReply::Answer { len, txid } = r else { panic!("{r:?}") };
            assert_eq!(
                stun::parse(&out[..len]),
                Ok(StunMessage::BindingSuccess { txid, mapped: from, other: Some(other) })
            );
        }
    }

    #[test]
    fn small_requests_sources_over_their_rate_and_non_stun_are_dropped() {
        let mut lim = StunLimiter::new(1.0, 1.0);
        let now = Instant::now();
        let v6: SocketAddr = "[2001:db8::1]:40000".parse().unwrap();
        let v4: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let mut out = [0u8; stun::MAX_RESPONSE_LEN];
        // A bare 20-byte header asking for a 44-byte IPv6 answer: more than twice its size.
        let bare = &request([1; 12])[..stun::HEADER_LEN];
        let mut bare = bare.to_vec();
        bare[2..4].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(respond(&mut lim, now, v6, &bare, None, &mut out), StunReply::Dropped(StunDrop::TooSmall));
        assert!(matches!(respond(&mut lim, now, v4, &request([2; 12]), None, &mut out), StunReply::Answer { .. }));
        assert_eq!(
            respond(&mut lim, now, v4, &request([3; 12]), None, &mut out),
            StunReply::Dropped(StunDrop::RateLimited)
        );
        assert_eq!(respond(&mut lim, now, v4, &[0u8; 0], None, &mut out), StunReply::Dropped(StunDrop::NotStun));
        // A bare IPv4 request still gets its 32-byte answer, without the other address.
        let mut lim = StunLimiter::new(0.0, 0.0);
        let bare4 = &bare[..];
        let other = Some("198.51.100.1:7481".parse().unwrap());
        let StunReply::Answer { len, txid } = respond(&mut lim, now, v4, bare4, other, &mut out) else { panic!() };
        assert_eq!(stun::parse(&out[..len]), Ok(StunMessage::BindingSuccess { txid, mapped: v4, other: None }));
        let rtp = [0x80u8, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(respond(&mut lim, now, v4, &rtp, None, &mut out), StunReply::Dropped(StunDrop::Media));
        let mut broken = request([4; 12]);
        broken[3] = 7; // a length that disagrees with the datagram
        assert_eq!(respond(&mut lim, now, v4, &broken, None, &mut out), StunReply::Dropped(StunDrop::Malformed));
    }

    #[test]
    fn each_drop_counts_where_the_manager_reports_it() {
        let stats = Stats::default();
        for d in [StunDrop::TooSmall, StunDrop::RateLimited, StunDrop::Malformed, StunDrop::Media, StunDrop::NotStun] {
            d.count(&stats);
        }
        let get = |name: &str| stats.snapshot().into_iter().find(|(k, _)| *k == name).unwrap().1;
        assert_eq!(
            [
                get("stun_too_small"),
                get("stun_rate_limited"),
                get("udp_malformed"),
                get("udp_non_stun"),
                get("udp_media")
            ],
            [1, 1, 1, 2, 1]
        );
    }
}
