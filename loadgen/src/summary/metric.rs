//! The histograms runs record, each under one name: its files are `STEM.hgrm` and
//! `STEM.hlog`, and its label names it in plots and `.hlog` tags. The writers and the
//! readers of recorded runs (`report`, `merge`) use these, so a name is spelled once.

/// A histogram a run records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// File stem.
    pub stem: &'static str,
    /// Label.
    pub label: &'static str,
}

/// Call setup: planned start to two-way media.
pub const SETUP: Metric = Metric { stem: "setup", label: "setup (plan -> 2-way media)" };
/// Planned start to START.
pub const PLAN_TO_START: Metric = Metric { stem: "plan_to_start", label: "plan -> START" };
/// CALL sent to INCOMING at the callee.
pub const CALL_TO_INCOMING: Metric = Metric { stem: "call_to_incoming", label: "CALL -> INCOMING" };
/// INCOMING at the callee to START at the caller.
pub const INCOMING_TO_START: Metric = Metric { stem: "incoming_to_start", label: "INCOMING -> START" };
/// START to two-way media.
pub const START_TO_MEDIA: Metric = Metric { stem: "start_to_media", label: "START -> 2-way media" };
/// One-way media latency.
pub const MEDIA_LATENCY: Metric = Metric { stem: "media_latency", label: "media one-way latency" };
/// RFC 3550 interarrival jitter J of the media a caller received, one value per call (at
/// its end).
pub const JITTER: Metric = Metric { stem: "jitter", label: "call jitter (RFC 3550 J)" };
/// Registration: planned connect to REGISTERED.
pub const REGISTER: Metric = Metric { stem: "register", label: "register (plan -> REGISTERED)" };
/// Mouth-to-ear latency (`audio-latency`).
pub const MOUTH_TO_EAR: Metric = Metric { stem: "m2e", label: "mouth-to-ear" };
/// Audio frame end to arrival at the jitter buffer (`audio-latency`).
pub const TRANSIT: Metric = Metric { stem: "transit", label: "frame end to jitter buffer" };

/// What `report` and `merge` read back, in report order: every metric a scenario records.
pub const RECORDED: [Metric; 10] = [
    SETUP,
    PLAN_TO_START,
    CALL_TO_INCOMING,
    INCOMING_TO_START,
    START_TO_MEDIA,
    MEDIA_LATENCY,
    JITTER,
    REGISTER,
    MOUTH_TO_EAR,
    TRANSIT,
];
