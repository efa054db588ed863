//! The cluster's IO: runs a node's [`Bridge`] (`proto::cluster`, which decides) over NATS
//! with `async-nats` on a thread of its own (a single-threaded tokio runtime). It owns the
//! NATS connection, the node's inbox, heartbeat and reply subscriptions, the directory
//! bucket (a JetStream key-value store) and its watch, and hands the bridge's shard
//! messages to the shards' inboxes. `docs/cluster.md` has the design.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{Operation, Store};
use async_nats::jetstream::{self, stream};
use async_nats::StatusCode;
use bytes::Bytes;
use engine::shard::Peer;
use futures_util::StreamExt;
use proto::cluster::{self as pc, Bridge, BridgeOut, ClusterOut, Holder};
use proto::shard::stats::Stats;
use proto::shard::ConnRef;
use proto::wire::frame::ClientId;
use tokio::sync::{mpsc, watch};

/// Cluster settings (`manager --cluster`).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS servers (`nats://HOST:PORT`), any of which will do.
    pub servers: Vec<String>,
    /// This node's name (logs, metrics, directory values); its subject is its random id.
    pub name: String,
    /// Replicas of the directory bucket (1 for a single NATS server; 3 for a 3-server NATS
    /// cluster that must survive losing one).
    pub replicas: usize,
}

/// Completions and events from NATS tasks to the loop.
enum Event {
    Connected,
    Disconnected,
    /// The directory bucket is ready on the current connection.
    Store(Box<Store>),
    Watch(ClientId, Option<Holder>),
    Written(ClientId, ConnRef, Option<(u64, Option<Holder>)>),
    Entry(u64, ClientId, Result<Option<Holder>, ()>),
}

/// Start the cluster thread of node `node`.
pub(crate) fn spawn(
    cfg: ClusterConfig,
    node: u64,
    shards: Vec<Peer>,
    rx: mpsc::UnboundedReceiver<ClusterOut>,
    stats: Arc<Stats>,
    stop: watch::Receiver<bool>,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("cluster".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("cluster: no runtime: {e}");
                return;
            }
        };
        rt.block_on(run(cfg, node, shards, rx, stats, stop));
    })
}

fn holder_of(value: &[u8], revision: u64, op: Operation) -> Option<Holder> {
    if op != Operation::Put {
        return None;
    }
    pc::kv_node(value).map(|node| Holder { node, gen: revision })
}

async fn ensure_store(js: &jetstream::Context, replicas: usize) -> Result<Store, async_nats::Error> {
    // The bucket's stream, made the way the key-value API makes it, by hand: the client's
    // own create asks the server for account fields that 2.9 does not send.
    let cfg = stream::Config {
        name: format!("KV_{}", pc::BUCKET),
        subjects: vec![format!("$KV.{}.>", pc::BUCKET)],
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: replicas.max(1),
        storage: stream::StorageType::File,
        ..Default::default()
    };
    js.get_or_create_stream(cfg).await?;
    Ok(js.get_key_value(pc::BUCKET).await?)
}

/// Write `id`'s entry naming this node by compare-and-swap, reading the entry again after a
/// conflict (a few times). Returns the new revision and the entry it replaced.
async fn write(kv: Store, id: &ClientId, value: Bytes, prev: Option<Holder>) -> Option<(u64, Option<Holder>)> {
    let key = pc::kv_key(id);
    let (mut rev, mut holder) = (prev.map_or(0, |h| h.gen), prev);
    for _ in 0..6 {
        match kv.update(&key, value.clone(), rev).await {
            Ok(r) => return Some((r, holder)),
            Err(e) if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                match kv.entry(&key).await {
                    Ok(Some(e)) => {
                        rev = e.revision;
                        holder = holder_of(&e.value, e.revision, e.operation);
                    }
                    Ok(None) => match kv.create(&key, value.clone()).await {
                        Ok(r) => return Some((r, None)),
                        Err(_) => continue,
                    },
                    Err(_) => return None,
                }
            }
            Err(e) => {
                tracing::debug!("cluster: write of {id} failed: {e}");
                return None;
            }
        }
    }
    None
}

/// Reply token of a batch sent as a request -> when, and the CALL tokens it carried.
type Batches = std::collections::HashMap<u64, (Instant, Vec<u64>)>;

/// Send the messages of one turn: one NATS message per destination node, a batch when it
/// has several. A batch with CALLs is one request whose reply token is its first CALL's; its
/// acknowledgement (or "no responders") stands for every CALL in it (`batches`).
async fn send_grouped(
    client: &async_nats::Client,
    node: u64,
    stats: &Stats,
    batches: &mut Batches,
    outgoing: Vec<(u64, Vec<u8>, Option<u64>)>,
) {
    /// One encoded message, and its CALL token if it is a request.
    type Outgoing = (Vec<u8>, Option<u64>);
    let mut groups: Vec<(u64, Vec<Outgoing>)> = Vec::new();
    for (to, b, token) in outgoing {
        match groups.iter_mut().find(|(n, _)| *n == to) {
            Some((_, g)) => g.push((b, token)),
            None => groups.push((to, vec![(b, token)])),
        }
    }
    for (to, mut g) in groups {
        stats.inc(&stats.cluster_publishes);
        let subject = pc::inbox_subject(to);
        let tokens: Vec<u64> = g.iter().filter_map(|(_, t)| *t).collect();
        let payload: Bytes = if g.len() == 1 {
            g.pop().expect("one").0.into()
        } else {
            pc::encode_batch(g.iter().map(|(b, _)| b.as_slice())).into()
        };
        let _ = match tokens.first() {
            None => client.publish(subject, payload).await,
            Some(&first) => {
                if tokens.len() > 1 {
                    batches.insert(first, (Instant::now(), tokens));
                }
                client.publish_with_reply(subject, pc::reply_subject(node, first), payload).await
            }
        };
    }
}

async fn run(
    cfg: ClusterConfig,
    node: u64,
    shards: Vec<Peer>,
    mut rx: mpsc::UnboundedReceiver<ClusterOut>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut bridge = Bridge::new(node, shards.len() as u16, stats.clone());
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    let tx = ev_tx.clone();
    let servers: Vec<async_nats::ServerAddr> = cfg.servers.iter().filter_map(|s| s.parse().ok()).collect();
    let client = async_nats::ConnectOptions::new()
        .name(format!("nullpunch manager {} {node:016x}", cfg.name))
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|n| Duration::from_millis((100 * (1u64 << n.min(4))).min(1000)))
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                match e {
                    async_nats::Event::Connected => {
                        let _ = tx.send(Event::Connected);
                    }
                    async_nats::Event::Disconnected => {
                        let _ = tx.send(Event::Disconnected);
                    }
                    other => tracing::debug!("cluster: {other}"),
                }
            }
        })
        .connect(servers)
        .await;
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cluster: cannot use the NATS servers {:?}: {e}", cfg.servers);
            return;
        }
    };
    let subs = async {
        Ok::<_, async_nats::SubscribeError>((
            client.subscribe(pc::inbox_subject(node)).await?,
            client.subscribe(pc::HEARTBEAT_SUBJECT).await?,
            client.subscribe(pc::reply_prefix(node)).await?,
        ))
    };
    let (mut inbox, mut hb, mut replies) = match subs.await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cluster: cannot subscribe: {e}");
            return;
        }
    };
    let js = jetstream::new(client.clone());
    let value = Bytes::from(pc::kv_value(node, &cfg.name));
    let mut store: Option<Store> = None;
    let mut watcher: Option<tokio::task::JoinHandle<()>> = None;
    let mut batches = Batches::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if client.connection_state() == async_nats::connection::State::Connected {
        let _ = ev_tx.send(Event::Connected);
    }
    tracing::info!(node = format_args!("{node:016x}"), name = %cfg.name, "cluster node started");
    loop {
        let now;
        tokio::select! {
            _ = stop.changed() => break,
            o = rx.recv() => {
                let Some(o) = o else { break };
                now = Instant::now();
                bridge.from_shard(now, o);
                // Take what else is queued in one turn.
                while let Ok(o) = rx.try_recv() {
                    bridge.from_shard(now, o);
                }
            }
            m = inbox.next() => {
                let Some(m) = m else { break };
                now = Instant::now();
                if let Some(reply) = m.reply {
                    // Acknowledge at once: the sender learns the node is there.
                    let _ = client.publish(reply, Bytes::new()).await;
                }
                match pc::split_batch(&m.payload) {
                    Ok(parts) => {
                        for p in parts {
                            bridge.on_node_msg(now, p);
                        }
                    }
                    // Counted as malformed by the bridge.
                    Err(_) => bridge.on_node_msg(now, &[]),
                }
            }
            m = replies.next() => {
                let Some(m) = m else { break };
                now = Instant::now();
                if let Some(token) = pc::reply_token(node, &m.subject) {
                    let tokens = batches.remove(&token).map_or_else(|| vec![token], |(_, t)| t);
                    for t in tokens {
                        if m.status == Some(StatusCode::NO_RESPONDERS) {
                            bridge.on_no_responders(now, t);
                        } else {
                            bridge.on_ack(now, t);
                        }
                    }
                }
            }
            m = hb.next() => {
                let Some(m) = m else { break };
                now = Instant::now();
                if let Some(n) = pc::heartbeat_node(&m.payload) {
                    bridge.on_heartbeat(now, n);
                }
            }
            e = ev_rx.recv() => {
                let Some(e) = e else { break };
                now = Instant::now();
                match e {
                    Event::Connected => {
                        tracing::info!("cluster: connected to NATS");
                        // (Re)make the bucket: a NATS server restarted without its storage
                        // has lost it. The bridge comes up when it is ready.
                        let (js, tx, replicas) = (js.clone(), ev_tx.clone(), cfg.replicas);
                        tokio::spawn(async move {
                            for attempt in 0..50u32 {
                                match ensure_store(&js, replicas).await {
                                    Ok(s) => {
                                        let _ = tx.send(Event::Store(Box::new(s)));
                                        return;
                                    }
                                    Err(e) => {
                                        tracing::warn!("cluster: directory bucket not ready (try {attempt}): {e}");
                                        tokio::time::sleep(Duration::from_millis(200)).await;
                                    }
                                }
                            }
                        });
                    }
                    Event::Disconnected => {
                        tracing::warn!("cluster: NATS connection lost");
                        store = None;
                        if let Some(w) = watcher.take() {
                            w.abort();
                        }
                        bridge.on_connection(now, false);
                    }
                    Event::Store(s) => {
                        let s = *s;
                        let tx = ev_tx.clone();
                        let w = s.clone();
                        if let Some(old) = watcher.take() {
                            old.abort();
                        }
                        watcher = Some(tokio::spawn(async move {
                            let mut watch = match w.watch_with_history(">").await {
                                Ok(w) => w,
                                Err(e) => {
                                    tracing::warn!("cluster: no directory watch: {e}");
                                    return;
                                }
                            };
                            while let Some(Ok(e)) = watch.next().await {
                                if let Some(id) = pc::kv_id(&e.key) {
                                    let _ = tx.send(Event::Watch(id, holder_of(&e.value, e.revision, e.operation)));
                                }
                            }
                        }));
                        store = Some(s);
                        bridge.on_connection(now, true);
                    }
                    Event::Watch(id, h) => bridge.on_watch(now, id, h),
                    Event::Written(id, conn, r) => bridge.on_written(now, &id, conn, r),
                    Event::Entry(token, id, Ok(h)) => bridge.on_entry(now, token, &id, h),
                    Event::Entry(token, _, Err(())) => bridge.on_entry_failed(now, token),
                }
            }
            _ = tick.tick() => {
                now = Instant::now();
                bridge.tick(now);
                // A batch whose reply never came: the bridge has given up on its CALLs too.
                batches.retain(|_, (at, _)| now.saturating_duration_since(*at) < 2 * pc::REQUEST_TIMEOUT);
            }
        }
        // Messages to other nodes, in order, then sent one NATS message per node (a batch
        // when there are several): under load a turn carries many.
        let mut outgoing: Vec<(u64, Vec<u8>, Option<u64>)> = Vec::new();
        while let Some(out) = bridge.poll_output() {
            match out {
                BridgeOut::Shard { shard, msg } => {
                    if let Some(p) = shards.get(shard as usize) {
                        p.send(msg);
                    }
                }
                BridgeOut::Publish { node: to, msg } => match msg.encode() {
                    Ok(b) => outgoing.push((to, b, None)),
                    Err(e) => tracing::warn!("cluster: not sent: {e}"),
                },
                BridgeOut::Request { node: to, msg, token } => match msg.encode() {
                    Ok(b) => outgoing.push((to, b, Some(token))),
                    Err(e) => tracing::warn!("cluster: not sent: {e}"),
                },
                BridgeOut::Heartbeat => {
                    let _ = client
                        .publish(pc::HEARTBEAT_SUBJECT, Bytes::copy_from_slice(&bridge.heartbeat_payload()))
                        .await;
                }
                BridgeOut::Write { id, conn, prev } => {
                    let tx = ev_tx.clone();
                    match store.clone() {
                        Some(kv) => {
                            let value = value.clone();
                            tokio::spawn(async move {
                                let r = write(kv, &id, value, prev).await;
                                let _ = tx.send(Event::Written(id, conn, r));
                            });
                        }
                        None => {
                            let _ = tx.send(Event::Written(id, conn, None));
                        }
                    }
                }
                BridgeOut::Delete { id, gen } => {
                    if let Some(kv) = store.clone() {
                        tokio::spawn(async move {
                            let _ = kv.delete_expect_revision(pc::kv_key(&id), Some(gen)).await;
                        });
                    }
                }
                BridgeOut::Get { id, token } => {
                    let tx = ev_tx.clone();
                    match store.clone() {
                        Some(kv) => {
                            tokio::spawn(async move {
                                let r = match kv.entry(pc::kv_key(&id)).await {
                                    Ok(Some(e)) => Ok(holder_of(&e.value, e.revision, e.operation)),
                                    Ok(None) => Ok(None),
                                    Err(_) => Err(()),
                                };
                                let _ = tx.send(Event::Entry(token, id, r));
                            });
                        }
                        None => {
                            let _ = tx.send(Event::Entry(token, id, Err(())));
                        }
                    }
                }
            }
        }
        send_grouped(&client, node, &stats, &mut batches, outgoing).await;
        stats.cluster_up.store(u64::from(bridge.is_up()), Relaxed);
        stats.cluster_nodes.store(bridge.live_nodes() as u64, Relaxed);
        stats.cluster_entries.store(bridge.cached_entries() as u64, Relaxed);
    }
    if let Some(w) = watcher.take() {
        w.abort();
    }
    stats.cluster_up.store(0, Relaxed);
    let _ = client.flush().await;
}
