//! Fuzz target `portmap`. Answers from a router's PCP / NAT-PMP port: the parser, the port
//! mapping state machine and a client asking for a mapping. The harness and the properties
//! it checks: `fuzz/src/portmap.rs`; how to run: docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nullpunch_fuzz::portmap::run(data));
