//! Manager counters: relaxed atomics shared by the shards and the UDP responder (no lock).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! stats {
    ($($(#[doc = $d:literal])* $f:ident,)+) => {
        /// Manager counters. All are monotonic except the gauges ([`Stats::gauges`]).
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[doc = $d])* pub $f: AtomicU64,)+
            /// Gauge: directory entries over all shards (registered ids and tombstones).
            pub directory_entries: AtomicU64,
            /// Gauge: of those, tombstones (ids whose connection closed, kept so that callers
            /// learn `Offline`).
            pub directory_tombstones: AtomicU64,
            /// Gauge: 1 while this node reaches the cluster's engine and its directory (0
            /// when down, or not in a cluster).
            pub cluster_up: AtomicU64,
            /// Gauge: other cluster nodes heard from within the node timeout.
            pub cluster_nodes: AtomicU64,
            /// Gauge: cluster directory entries known to this node (its cache).
            pub cluster_entries: AtomicU64,
            /// CALL to START at the call's owner shard (the manager's share of call setup).
            pub setup_time: LatencyHistogram,
            /// Cluster: round trip of a CALL to another node (request to its inbox, until
            /// that node's acknowledgement).
            pub cluster_rtt: LatencyHistogram,
            /// Calls by strategy and by how they ended at the manager.
            pub by_strategy: StrategyOutcomes,
        }

        impl Stats {
            /// All counters as (name, value), in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($f), self.$f.load(Ordering::Relaxed)),)+]
            }

            /// All counters as (name, help text, value).
            pub fn described(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($f), concat!($($d),*), self.$f.load(Ordering::Relaxed)),)+]
            }
        }
    };
}

/// How a call ended at the manager, for [`StrategyOutcomes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// A party hung up normally (HANGUP `Normal` or `Shutdown`) after START. The manager
    /// does not see media: the peers' reports say whether any flowed.
    HungUp,
    /// A party hung up normally before START (the caller gave up while it rang).
    Cancelled,
    /// A party gave up waiting for the path (HANGUP `Timeout`: no media, or a search that
    /// found no port pair).
    SetupTimeout,
    /// A party's media stopped (HANGUP `PeerGone`).
    MediaStopped,
    /// Another HANGUP reason.
    OtherHangup,
    /// The callee declined (REJECT from the callee).
    Declined,
    /// The callee did not answer (no PUNCHED within the ring timeout).
    RingTimeout,
    /// A party's connection closed while the call was known.
    PartyGone,
    /// Refused before INCOMING: no relay-free path.
    Refused,
}

impl CallOutcome {
    /// Every outcome, in label order.
    pub const ALL: [CallOutcome; 9] = [
        CallOutcome::HungUp,
        CallOutcome::Cancelled,
        CallOutcome::SetupTimeout,
        CallOutcome::MediaStopped,
        CallOutcome::OtherHangup,
        CallOutcome::Declined,
        CallOutcome::RingTimeout,
        CallOutcome::PartyGone,
        CallOutcome::Refused,
    ];

    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::HungUp => "hung_up",
            CallOutcome::Cancelled => "cancelled",
            CallOutcome::SetupTimeout => "setup_timeout",
            CallOutcome::MediaStopped => "media_stopped",
            CallOutcome::OtherHangup => "other_hangup",
            CallOutcome::Declined => "declined",
            CallOutcome::RingTimeout => "ring_timeout",
            CallOutcome::PartyGone => "party_gone",
            CallOutcome::Refused => "refused",
        }
    }
}

/// The strategies, in label order.
pub const STRATEGIES: [crate::nat::Strategy; 4] = [
    crate::nat::Strategy::Direct,
    crate::nat::Strategy::Birthday,
    crate::nat::Strategy::Predict,
    crate::nat::Strategy::NoPath,
];

/// Calls by strategy and outcome: relaxed atomics, written once per call at its end.
#[derive(Debug, Default)]
pub struct StrategyOutcomes {
    counts: [[AtomicU64; CallOutcome::ALL.len()]; STRATEGIES.len()],
}

impl StrategyOutcomes {
    /// Count one call of `strategy` that ended with `outcome`.
    pub fn record(&self, strategy: crate::nat::Strategy, outcome: CallOutcome) {
        let s = STRATEGIES.iter().position(|x| *x == strategy).expect("every strategy is listed");
        let o = CallOutcome::ALL.iter().position(|x| *x == outcome).expect("every outcome is listed");
        self.counts[s][o].fetch_add(1, Ordering::Relaxed);
    }

    /// The count for one pair.
    pub fn get(&self, strategy: crate::nat::Strategy, outcome: CallOutcome) -> u64 {
        let s = STRATEGIES.iter().position(|x| *x == strategy).expect("every strategy is listed");
        let o = CallOutcome::ALL.iter().position(|x| *x == outcome).expect("every outcome is listed");
        self.counts[s][o].load(Ordering::Relaxed)
    }

    /// Every (strategy, outcome, count), in label order.
    pub fn read(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (s, strategy) in STRATEGIES.iter().enumerate() {
            for (o, outcome) in CallOutcome::ALL.iter().enumerate() {
                out.push((strategy.as_str(), outcome.as_str(), self.counts[s][o].load(Ordering::Relaxed)));
            }
        }
        out
    }
}

/// Upper bounds of the setup-time buckets, microseconds.
pub const SETUP_BUCKETS_US: [u64; 12] =
    [250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 4_000_000];

/// A fixed-bucket latency histogram of relaxed atomics (Prometheus style: each bucket
/// counts observations at or below its bound; the last counts everything).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; SETUP_BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    /// Record one observation.
    pub fn record(&self, d: std::time::Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        if let Some(i) = SETUP_BUCKETS_US.iter().position(|&b| us <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// (cumulative count per bucket bound in µs, total count, sum in µs).
    pub fn read(&self) -> (Vec<(u64, u64)>, u64, u64) {
        let mut acc = 0;
        let cum = SETUP_BUCKETS_US
            .iter()
            .zip(&self.buckets)
            .map(|(&b, c)| {
                acc += c.load(Ordering::Relaxed);
                (b, acc)
            })
            .collect();
        (cum, self.count.load(Ordering::Relaxed), self.sum_us.load(Ordering::Relaxed))
    }
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
    /// Connections refused at once: the shard held its maximum (ERROR TooManyConnections).
    connections_refused,
    /// Connections closed for sending frames faster than allowed (ERROR RateLimited).
    connections_flooding,
    /// accept() failures (out of descriptors: RLIMIT_NOFILE; then the shard pauses 20 ms).
    accept_errors,
    /// REGISTER frames accepted.
    registrations,
    /// Registrations that replaced an older connection with the same id.
    registrations_replaced,
    /// Cluster: CALLs sent to the callee's node (another manager).
    cluster_calls_out,
    /// Cluster: CALLs taken from another node for a callee here.
    cluster_calls_in,
    /// Cluster: CALLs from another node for a generation this node no longer holds
    /// (answered NOT_HERE).
    cluster_not_here,
    /// Cluster: CALLs retried after a fresh directory lookup (NOT_HERE or no responders).
    cluster_retries,
    /// Cluster: messages to a node whose inbox had no responders (the node is gone).
    cluster_no_responders,
    /// Cluster: calls to another node refused at once because the cluster engine (NATS)
    /// was unreachable (REJECT ClusterDown).
    cluster_unavailable,
    /// Cluster: connections closed here because their id registered on another node.
    cluster_replaced,
    /// Cluster: nodes found gone (no heartbeat or no responders).
    cluster_nodes_gone,
    /// Cluster: calls ended because the other party's node was gone.
    cluster_calls_node_gone,
    /// Cluster: directory entries written (registrations here, and re-written after the
    /// engine came back).
    cluster_writes,
    /// Cluster: directory writes that failed (engine unreachable; re-written on return).
    cluster_write_failures,
    /// Cluster: messages sent to other nodes.
    cluster_messages_out,
    /// Cluster: NATS messages published to other nodes: the messages for one node in one
    /// turn of the node's bridge go as one batch.
    cluster_publishes,
    /// Cluster: messages received from other nodes.
    cluster_messages_in,
    /// Cluster: messages from other nodes that failed to decode (dropped).
    cluster_malformed,
    /// Directory tombstones forgotten at their age limit (`--tombstone-ttl`): their ids
    /// are now unknown (UNKNOWN NeverRegistered).
    tombstones_expired,
    /// Directory tombstones forgotten, oldest first, to keep within `--max-tombstones`.
    tombstones_evicted,
    /// Registrations that named a port mapping, handed out as the client's address.
    registrations_mapped,
    /// Registrations whose port mapping was on another IP than the one the manager saw (a
    /// mapping on an inner router of a double NAT): ignored, the observed address used.
    registrations_mapping_ignored,
    /// Calls whose INCOMING or START carried the peer's host addresses (both parties
    /// behind one public IP).
    calls_same_nat,
    /// Calls whose two clients both named IPv6 addresses: each got the other's, and the
    /// call is direct (over IPv6 first) whatever their IPv4 NAT classes.
    calls_ipv6,
    /// REGISTERs refused: no token while the manager requires one (connection closed).
    auth_missing,
    /// REGISTERs refused: token not valid for the id (another id, another secret, altered).
    auth_invalid,
    /// REGISTERs refused: token expired.
    auth_expired,
    /// REGISTERs refused on a TLS connection: the token was not bound to that connection
    /// (a raw token, or one bound to another connection: a replayed REGISTER).
    auth_unbound,
    /// TLS handshakes completed (full and resumed).
    tls_handshakes,
    /// Of those, resumed with a session ticket.
    tls_resumed,
    /// TLS handshakes that failed (bad record, no common version or ALPN, alert from the
    /// client: for example, it does not trust the certificate); connection closed.
    tls_handshake_failed,
    /// Plaintext clients on a TLS manager: sent one plaintext ERROR Unauthorized, closed.
    tls_plaintext_refused,
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
    /// Calls put through with the direct strategy (the callee's null packet, then media).
    calls_direct,
    /// Calls put through with the birthday search (one side randomises ports).
    calls_birthday,
    /// Calls put through with port prediction (one side allocates ports sequentially).
    calls_predict,
    /// Calls refused at once with REJECT NoPath: both sides randomise ports and neither has
    /// a port mapping (also counted in `calls_rejected`).
    calls_no_path,
    /// Calls rejected (self-call, declined, callee gone, caller limit).
    calls_rejected,
    /// Of those, because the caller was at its concurrent-call limit (REJECT CallerLimit).
    calls_caller_limit,
    /// Calls whose callee did not reply PUNCHED in time.
    calls_ring_timeout,
    /// HANGUP/REJECT for calls no longer known (late or duplicate).
    hangups_unknown_call,
    /// STUN binding requests answered (on every STUN address).
    stun_requests,
    /// Of those, on the alternate addresses (--alt-port, --alt-listen): NAT classification probes.
    stun_alt_requests,
    /// STUN bindings not remembered because the table was full.
    stun_table_full,
    /// STUN binding requests not answered: their source IP was over its rate.
    stun_rate_limited,
    /// STUN binding requests not answered: the answer would be more than twice their size.
    stun_too_small,
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

    /// Take one from a gauge.
    #[inline]
    pub fn dec(&self, c: &AtomicU64) {
        c.fetch_sub(1, Ordering::Relaxed);
    }

    /// The gauges as (name, help text, value): values now, not totals.
    pub fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "directory_entries",
                "Directory entries over all shards: registered ids and tombstones.",
                self.directory_entries.load(Ordering::Relaxed),
            ),
            (
                "directory_tombstones",
                "Directory tombstones: ids whose connection closed, kept so that callers learn Offline.",
                self.directory_tombstones.load(Ordering::Relaxed),
            ),
            (
                "cluster_up",
                "1 while this node reaches the cluster's engine (NATS) and its directory; 0 when down or not in a cluster.",
                self.cluster_up.load(Ordering::Relaxed),
            ),
            ("cluster_nodes", "Other cluster nodes heard from within the node timeout.", self.cluster_nodes.load(Ordering::Relaxed)),
            ("cluster_entries", "Cluster directory entries known to this node.", self.cluster_entries.load(Ordering::Relaxed)),
        ]
    }

    /// The counters as a JSON object string.
    pub fn to_json(&self) -> String {
        let mut body: Vec<String> = self.snapshot().iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        body.extend(self.gauges().iter().map(|(k, _, v)| format!("\"{k}\":{v}")));
        // "calls_by_strategy": {"birthday": {"hung_up": 2, ...}, ...}, non-zero pairs only.
        let mut by: Vec<String> = Vec::new();
        for s in STRATEGIES {
            let pairs: Vec<String> = CallOutcome::ALL
                .iter()
                .map(|o| (o.as_str(), self.by_strategy.get(s, *o)))
                .filter(|(_, n)| *n > 0)
                .map(|(o, n)| format!("\"{o}\":{n}"))
                .collect();
            if !pairs.is_empty() {
                by.push(format!("\"{}\":{{{}}}", s.as_str(), pairs.join(",")));
            }
        }
        body.push(format!("\"calls_by_strategy\":{{{}}}", by.join(",")));
        format!("{{{}}}", body.join(","))
    }
}
