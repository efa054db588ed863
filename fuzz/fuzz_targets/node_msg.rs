//! Fuzz target `node_msg`. A message on a cluster node's inbox: decode, re-encode, and the
//! node (bridge and shards) taking it. The properties: `fuzz/src/node_msg.rs`; how to run:
//! docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nullpunch_fuzz::node_msg::run(data));
