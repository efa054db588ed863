//! An embedded cluster (`--cluster-nodes N`): a `nats-server` started for the run on a
//! free loopback port with a scratch JetStream store, and N managers in this process on it
//! (`docs/cluster.md`), the clients spread over them. With `--kill-node-at SECS` the last
//! manager is stopped that long after the calls begin, and the time until every client is
//! connected again (to the others) is the failover time.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::shard::stats::Stats;

use crate::error::Error;
use crate::target::{ClusterPlan, Connected};

/// How long the cluster may take to form (NATS up, every node hearing every other).
const FORM_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a failover is waited for before it is reported as not complete.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// The failover a run timed.
#[derive(Debug, Clone, Copy, Default)]
struct Failover {
    /// Seconds after the calls began that the node was stopped.
    at_s: f64,
    /// Connections it held.
    clients: u64,
    /// Seconds until every client was connected again (None: not within the timeout).
    took_s: Option<f64>,
}

/// The cluster's parts besides the first manager (which `Connected` holds as its embedded
/// one, for the run's counters).
pub struct Embedded {
    /// Managers 1..N (None once stopped).
    others: Arc<Mutex<Vec<Option<manager::ManagerHandle>>>>,
    /// Every manager's counters, node 0 first.
    stats: Vec<Arc<Stats>>,
    nats: Child,
    dir: PathBuf,
    plan: ClusterPlan,
    failover: Arc<Mutex<Option<Failover>>>,
}

fn open(s: &Stats) -> u64 {
    s.connections_accepted.load(Ordering::Relaxed).saturating_sub(s.connections_closed.load(Ordering::Relaxed))
}

/// Start the nats-server and the managers, and wait until they form a cluster.
pub fn start(cfg: &manager::ManagerConfig, plan: ClusterPlan) -> Result<Connected, Error> {
    let dir = std::env::temp_dir().join(format!("nullpunch-loadgen-nats-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::Flags(format!("--cluster-nodes: {}: {e}", dir.display())))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| Error::Flags(format!("--cluster-nodes: no free port for nats-server: {e}")))?
        .port();
    let nats = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::Flags(format!("--cluster-nodes needs nats-server (apt-get install nats-server): {e}")))?;
    let url = format!("nats://127.0.0.1:{port}");
    let mut handles = Vec::with_capacity(plan.nodes);
    let mut guard = Embedded {
        others: Arc::new(Mutex::new(Vec::new())),
        stats: Vec::new(),
        nats,
        dir,
        plan,
        failover: Arc::new(Mutex::new(None)),
    };
    for i in 0..plan.nodes {
        let mut c = cfg.clone();
        c.cluster =
            Some(manager::cluster::ClusterConfig { servers: vec![url.clone()], name: format!("node{i}"), replicas: 1 });
        handles.push(manager::start(c).map_err(Error::ManagerStart)?);
    }
    guard.stats = handles.iter().map(|h| h.stats().clone()).collect();
    let deadline = Instant::now() + FORM_TIMEOUT;
    let formed = |s: &Stats| {
        s.cluster_up.load(Ordering::Relaxed) == 1 && s.cluster_nodes.load(Ordering::Relaxed) as usize + 1 >= plan.nodes
    };
    while !guard.stats.iter().all(|s| formed(s)) {
        if Instant::now() > deadline {
            return Err(Error::Flags(format!(
                "--cluster-nodes: the {} managers did not form a cluster on {url} within {} s",
                plan.nodes,
                FORM_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut it = handles.into_iter();
    let first = it.next().expect("at least two nodes");
    let others: Vec<manager::ManagerHandle> = it.collect();
    let other_addrs = others.iter().map(|h| h.local_addr()).collect();
    *guard.others.lock().unwrap_or_else(|e| e.into_inner()) = others.into_iter().map(Some).collect();
    Ok(Connected {
        addr: first.local_addr(),
        others: other_addrs,
        embedded: Some(first),
        external: None,
        cluster: Some(guard),
    })
}

impl Embedded {
    /// Start the `--kill-node-at` timer from `t0`.
    pub fn arm_kill(&self, t0: Instant) {
        let Some(at) = self.plan.kill_at else { return };
        let (others, stats, failover) = (self.others.clone(), self.stats.clone(), self.failover.clone());
        let spawned = std::thread::Builder::new().name("kill-node".into()).spawn(move || {
            let when = t0 + at;
            std::thread::sleep(when.saturating_duration_since(Instant::now()));
            let total: u64 = stats.iter().map(|s| open(s)).sum();
            let victim = stats.len() - 1;
            let clients = open(&stats[victim]);
            let handle = others.lock().unwrap_or_else(|e| e.into_inner()).last_mut().and_then(Option::take);
            let Some(h) = handle else { return };
            let killed = Instant::now();
            eprintln!(
                "loadgen: stopping manager {} (node {victim}, {clients} clients) to time the failover",
                h.local_addr()
            );
            h.shutdown();
            let survivors = &stats[..victim];
            let mut took = None;
            while killed.elapsed() < FAILOVER_TIMEOUT {
                if survivors.iter().map(|s| open(s)).sum::<u64>() >= total {
                    took = Some(killed.elapsed().as_secs_f64());
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            match took {
                Some(t) => eprintln!("loadgen: every client connected again {t:.3} s after the manager stopped"),
                None => eprintln!(
                    "loadgen: the clients had not all reconnected {} s after the manager stopped",
                    FAILOVER_TIMEOUT.as_secs()
                ),
            }
            let at_s = killed.saturating_duration_since(t0).as_secs_f64();
            *failover.lock().unwrap_or_else(|e| e.into_inner()) = Some(Failover { at_s, clients, took_s: took });
        });
        if let Err(e) = spawned {
            eprintln!("loadgen: --kill-node-at: no timer thread: {e}");
        }
    }

    /// Per node counters, and the failover if one was timed.
    pub fn report(&self) -> serde_json::Value {
        let nodes: Vec<serde_json::Value> = self
            .stats
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                serde_json::json!({
                    "node": i,
                    "registrations": get(&s.registrations),
                    "calls_started": get(&s.calls_started),
                    "cluster_calls_out": get(&s.cluster_calls_out),
                    "cluster_calls_in": get(&s.cluster_calls_in),
                    "cluster_not_here": get(&s.cluster_not_here),
                    "cluster_retries": get(&s.cluster_retries),
                    "cluster_no_responders": get(&s.cluster_no_responders),
                    "cluster_nodes_gone": get(&s.cluster_nodes_gone),
                    "cluster_calls_node_gone": get(&s.cluster_calls_node_gone),
                    "cluster_replaced": get(&s.cluster_replaced),
                })
            })
            .collect();
        let f = *self.failover.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "nodes": self.stats.len(),
            "per_node": nodes,
            "killed_at_s": f.map(|f| (f.at_s * 1000.0).round() / 1000.0),
            "killed_node_clients": f.map(|f| f.clients),
            "failover_s": f.and_then(|f| f.took_s).map(|t| (t * 1000.0).round() / 1000.0),
        })
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        for h in self.others.lock().unwrap_or_else(|e| e.into_inner()).drain(..).flatten() {
            h.shutdown();
        }
        let _ = self.nats.kill();
        let _ = self.nats.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
