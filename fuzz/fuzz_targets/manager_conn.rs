//! Fuzz target `manager_conn`. The manager's shard core driven by connection byte streams, in virtual time.
//! The harness and the properties it checks: `fuzz/src/manager_conn.rs`; how to run: docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nullpunch_fuzz::manager_conn::run(data));
