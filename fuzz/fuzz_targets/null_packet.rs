//! Fuzz target `null_packet`. The authenticated null packet: parse, MAC check, re-signing, and
//! the counter window against a model. The properties: `fuzz/src/null_packet.rs`; how to run:
//! docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nullpunch_fuzz::null_packet::run(data));
