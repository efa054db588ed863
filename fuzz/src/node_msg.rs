//! Messages between cluster nodes (`proto::cluster::NodeMsg`), as a node receives them from
//! the engine: anything may arrive on a node's inbox subject.
//!
//! Properties:
//! * decoding never panics; a decoded message encodes, and that encoding decodes to the same
//!   message (canonical after one round); a payload splits into its batch's messages (or
//!   fails) without panicking, and the parts re-batch to the same payload;
//! * a node (a real bridge and two real shards with a registered client) takes the message
//!   and everything it leads to without panicking, and stays quiet after a bounded number
//!   of steps (no message loop between its bridge and shards).

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::cluster::{encode_batch, split_batch, Bridge, BridgeOut, NodeMsg};
use proto::nat::NatClass;
use proto::shard::stats::Stats;
use proto::shard::{Output, Shard, ShardConfig, ShardInit};
use proto::wire::frame::{ClientId, Frame};

/// This node's id.
pub const NODE: u64 = 0x0A;
/// Shards of the node.
pub const SHARDS: u16 = 2;

/// Run one input.
pub fn run(data: &[u8]) {
    if let Ok(m) = NodeMsg::decode(data) {
        let b = m.encode().expect("a decoded message encodes");
        let again = NodeMsg::decode(&b).expect("an encoded message decodes");
        assert_eq!(format!("{m:?}"), format!("{again:?}"), "a message changed over one round trip");
    }
    let t0 = Instant::now();
    let stats = Arc::new(Stats::default());
    let mut shards: Vec<Shard> = (0..SHARDS)
        .map(|index| {
            let init = ShardInit { index, n: SHARDS, seed: 3, token_key: [5; 32], unix_secs: 1_000_000, node: NODE };
            Shard::new(init, ShardConfig::default(), stats.clone())
        })
        .collect();
    let mut bridge = Bridge::new(NODE, SHARDS, stats.clone());
    bridge.on_connection(t0, true);
    // A client registered here ("bob", connection 1 of shard 0), so calls can reach it.
    let conn = shards[0].conn_opened(t0, "198.51.100.9:4000".parse().unwrap(), 0);
    shards[0].conn_frame(
        t0,
        conn,
        Frame::Register {
            id: ClientId::new("bob").unwrap(),
            udp_port: 5004,
            max_calls: 4,
            binding: None,
            auth: None,
            nat: NatClass::Unknown,
            candidates: Vec::new(),
        },
    );
    let mut now = t0;
    match split_batch(data) {
        Ok(parts) => {
            if parts.len() != 1 || parts[0].len() != data.len() {
                assert_eq!(encode_batch(parts.iter().copied()), data, "a batch re-batches differently");
            }
            for p in parts {
                bridge.on_node_msg(now, p);
            }
        }
        Err(_) => bridge.on_node_msg(now, &[]),
    }
    for _ in 0..64 {
        let mut quiet = true;
        for s in 0..SHARDS as usize {
            while let Some(o) = shards[s].poll_output() {
                quiet = false;
                match o {
                    Output::Shard { to, msg } => shards[to as usize].handle_msg(now, msg),
                    Output::Cluster(o) => bridge.from_shard(now, o),
                    Output::Frame { .. } | Output::Close { .. } => {}
                }
            }
        }
        while let Some(o) = bridge.poll_output() {
            quiet = false;
            match o {
                BridgeOut::Shard { shard, msg } => {
                    assert!(shard < SHARDS, "the bridge named shard {shard} of {SHARDS}");
                    shards[shard as usize].handle_msg(now, msg);
                }
                BridgeOut::Publish { msg, .. } | BridgeOut::Request { msg, .. } => {
                    let b = msg.encode().expect("what a node sends encodes");
                    NodeMsg::decode(&b).expect("what a node sends decodes");
                }
                _ => {}
            }
        }
        if quiet {
            return;
        }
        now += Duration::from_millis(1);
    }
    panic!("the node did not go quiet after one message");
}
