//! nullpunch benchmarks: `benches/hot_paths.rs` (criterion, the per-packet paths) and the
//! `pps` binary (delivered packets per CPU-second for four IO styles, in one run).
