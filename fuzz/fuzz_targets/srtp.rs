//! Fuzz target `srtp`. The SRTP / SRTCP transform, both suites: unprotecting the input,
//! protecting it and unprotecting it back, and a stream of sequence numbers through a
//! sender and receivers. The harness and the properties it checks: `fuzz/src/srtp.rs`; how
//! to run: docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nullpunch_fuzz::srtp::run(data));
