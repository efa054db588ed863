//! Fuzz target `datagram`. UDP datagrams: the demultiplexer and parsers, then a client in two calls.
//! The harness and the properties it checks: `fuzz/src/datagram.rs`; how to run: docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nullpunch_fuzz::datagram::run(data));
