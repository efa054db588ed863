//! Fuzz target `frame_decode`. The signalling frame decoder: one-shot and streaming decoding agree, frames round-trip.
//! The harness and the properties it checks: `fuzz/src/frame_decode.rs`; how to run: docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nullpunch_fuzz::frame_decode::run(data));
