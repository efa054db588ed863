//! Manager counters: relaxed atomics shared by the shards and the UDP responder (no lock).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! stats {
    ($($(#[$m:meta])* $f:ident,)+) => {
        /// Manager counters. All are monotonic except where noted.
        #[derive(Debug, Default)]
        pub struct Stats { $($(#[$m])* pub $f: AtomicU64,)+ }

        impl Stats {
            /// All counters as (name, value), in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($f), self.$f.load(Ordering::Relaxed)),)+]
            }
        }
    };
}

stats! {
    /// TCP connections accepted.
    connections_accepted,
    /// TCP connections closed.
    connections_closed,
    /// Connections closed for missing REGISTER or idleness.
    connections_timed_out,
    /// Connections closed because their outgoing queue overflowed (slow reader).
    connections_slow,
    /// REGISTER frames accepted.
    registrations,
    /// Registrations that replaced an older connection with the same id.
    registrations_replaced,
    /// Frames received.
    frames_in,
    /// Frames sent.
    frames_out,
    /// Frames that failed to decode (connection closed).
    frames_malformed,
    /// Frames whose length prefix exceeded the limit (connection closed).
    frames_oversized,
    /// Valid frames not allowed in the connection's state (answered with ERROR).
    frames_unexpected,
    /// Duplicate PUNCHED frames.
    frames_duplicate,
    /// CALL frames from registered clients.
    calls_requested,
    /// Calls that reached START.
    calls_started,
    /// Call records removed (hangup, reject, timeout, party gone).
    calls_ended,
    /// Calls answered UNKNOWN (never registered or offline).
    calls_unknown,
    /// Calls answered BUSY.
    calls_busy,
    /// Calls rejected (self-call, declined, callee gone).
    calls_rejected,
    /// Calls whose callee did not reply PUNCHED in time.
    calls_ring_timeout,
    /// HANGUP/REJECT for calls no longer known (late or duplicate).
    hangups_unknown_call,
    /// STUN binding requests answered.
    stun_requests,
    /// STUN bindings not remembered because the table was full.
    stun_table_full,
    /// Datagrams on the UDP port that failed to parse as STUN.
    udp_malformed,
    /// Datagrams on the UDP port that were not STUN at all (null, RTP, RTCP, unknown).
    /// The manager is never on the media path, so in a correct deployment this stays 0.
    udp_non_stun,
    /// Of those, RTP or RTCP (media) packets.
    udp_media,
}

impl Stats {
    /// Add one to a counter.
    #[inline]
    pub fn inc(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as a JSON object string.
    pub fn to_json(&self) -> String {
        let body: Vec<String> = self.snapshot().iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    }
}
