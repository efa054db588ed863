//! What a run points at, resolved once from the command line: the manager (one to start in
//! this process, with its configuration, or an external one at an address, with its pid
//! and metrics URL when given) and the secret its clients mint registration tokens from.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use proto::auth::Secret;
use proto::wire::frame::{AuthToken, ClientId};

use crate::error::Error;
use crate::sys;

/// The manager a run's clients register with, and their credentials.
#[derive(Clone)]
pub struct Target {
    /// The manager.
    pub manager: Manager,
    /// The manager's secret (`--secret-file`): every client registers with a token minted
    /// from it, and an embedded manager requires tokens.
    pub secret: Option<Arc<Secret>>,
    /// The SRTP suites every simulated client offers and accepts ([`proto::e2e`] codes;
    /// `--no-srtp`: plain RTP).
    pub srtp_suites: Vec<u8>,
    /// TLS to the manager (`--tls`): how the clients trust it. An embedded manager then
    /// serves TLS with a throwaway certificate ([`Target::with_tls`]).
    pub tls: Option<engine::tls::ClientTls>,
}

/// Where the manager is.
#[derive(Clone)]
pub enum Manager {
    /// Start one in this process, with this configuration (with a cluster plan: that many,
    /// on a `nats-server` started for the run).
    Embedded(Box<manager::ManagerConfig>, Option<ClusterPlan>),
    /// One that runs elsewhere.
    External(External),
}

/// A manager that runs elsewhere (`--manager`).
#[derive(Debug, Clone)]
pub struct External {
    /// Its TCP and UDP address.
    pub addr: SocketAddr,
    /// The other managers of the same service (`--manager A,B,C`: B and C), which the
    /// clients spread over (client `i` starts at manager `i % n`) and fail over to.
    pub others: Vec<SocketAddr>,
    /// Its process id, to read its memory from /proc (`--manager-pid`).
    pub pid: Option<u32>,
    /// Its metrics URL (`manager --metrics`), to read its counters (`--manager-metrics`).
    pub metrics_url: Option<String>,
}

/// How an embedded manager is configured beyond its address, shards and IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limits {
    /// No limits: every simulated client shares one source address, so no per-source STUN
    /// limit either.
    Off,
    /// The `manager` binary's limits where they apply to a generator's clients (frames per
    /// second per connection, connections), for `hostile`.
    Production,
}

/// The embedded manager's settings taken from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Embedded {
    /// Its address (port 0): the clients' `--bind-ip`.
    pub ip: std::net::IpAddr,
    /// Shard threads (0: one per core).
    pub shards: usize,
    /// Its IO: the generator's own (`--io portable` makes the whole run portable).
    pub io: engine::driver::Io,
    /// Its limits.
    pub limits: Limits,
    /// Several managers on NATS instead of one (`--cluster-nodes`).
    pub cluster: Option<ClusterPlan>,
}

/// An embedded cluster (`--cluster-nodes`, `--kill-node-at`).
#[derive(Debug, Clone, Copy)]
pub struct ClusterPlan {
    /// Managers.
    pub nodes: usize,
    /// Stop the last one this long after the calls begin.
    pub kill_at: Option<std::time::Duration>,
}

impl Target {
    /// The target: an external manager at `external`, else one embedded as `embedded` says.
    pub fn new(external: Option<External>, embedded: Embedded, secret: Option<Arc<Secret>>) -> Target {
        let manager = match external {
            Some(e) => Manager::External(e),
            None => Manager::Embedded(Box::new(embedded_config(embedded, secret.clone())), embedded.cluster),
        };
        Target {
            manager,
            secret,
            srtp_suites: vec![proto::e2e::SUITE_AES_128_GCM, proto::e2e::SUITE_AES_CM_SHA1_80],
            tls: None,
        }
    }

    /// Speak TLS to the manager. An embedded one gets a throwaway certificate (rcgen: a
    /// P-256 key, the SANs `localhost` and its IP) that the clients trust as their CA; an
    /// external one is trusted as `trust` says (`--ca` or `--pin`, required), its
    /// certificate checked against its IP address.
    pub fn with_tls(mut self, trust: Option<engine::tls::Trust>) -> Result<Target, Error> {
        let tls_err = |e: engine::tls::TlsError| Error::Flags(format!("--tls: {e}"));
        match &mut self.manager {
            Manager::Embedded(cfg, _) => {
                let ip = cfg.listen.ip();
                let ck = rcgen::generate_simple_self_signed(vec![ip.to_string(), "localhost".to_string()])
                    .map_err(|e| Error::Flags(format!("--tls: a throwaway certificate: {e}")))?;
                let cert = ck.cert.der().clone();
                let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
                cfg.tls = Some(engine::tls::server_config(vec![cert.clone()], key).map_err(tls_err)?);
                let trust = engine::tls::Trust::Certs(vec![cert]);
                self.tls = Some(engine::tls::ClientTls::new(&trust, &ip.to_string()).map_err(tls_err)?);
            }
            Manager::External(e) => {
                let Some(trust) = trust else {
                    return Err(Error::Flags(
                        "--tls with --manager needs --ca PEM or --pin SHA256 to trust the manager's certificate \
                         (there are no system roots)"
                            .into(),
                    ));
                };
                self.tls = Some(engine::tls::ClientTls::new(&trust, &e.addr.ip().to_string()).map_err(tls_err)?);
            }
        }
        Ok(self)
    }

    /// The same credentials against a manager already running at `addr` (started by another
    /// step of this run), as an external one.
    pub fn running_at(&self, addr: SocketAddr) -> Target {
        Target {
            manager: Manager::External(External { addr, others: Vec::new(), pid: None, metrics_url: None }),
            secret: self.secret.clone(),
            srtp_suites: self.srtp_suites.clone(),
            tls: self.tls.clone(),
        }
    }

    /// The external manager, if it is one.
    pub fn external(&self) -> Option<&External> {
        match &self.manager {
            Manager::External(e) => Some(e),
            Manager::Embedded(..) => None,
        }
    }

    /// The external manager's RSS in MiB, read from /proc (when its pid was given).
    pub fn external_rss_mb(&self) -> Option<f64> {
        self.external()?.pid.and_then(sys::rss_of)
    }

    /// Start the embedded manager, or take the external one's address.
    pub fn connect(&self) -> Result<Connected, Error> {
        match &self.manager {
            Manager::Embedded(cfg, None) => {
                let m = manager::start((**cfg).clone()).map_err(Error::ManagerStart)?;
                Ok(Connected {
                    addr: m.local_addr(),
                    others: Vec::new(),
                    embedded: Some(m),
                    external: None,
                    cluster: None,
                })
            }
            Manager::Embedded(cfg, Some(plan)) => crate::cluster::start(cfg, *plan),
            Manager::External(e) => Ok(Connected {
                addr: e.addr,
                others: e.others.clone(),
                embedded: None,
                external: Some(e.clone()),
                cluster: None,
            }),
        }
    }
}

/// A day-long registration token for `id` from `secret`.
pub fn token_for(secret: Option<&Secret>, id: &ClientId) -> Option<AuthToken> {
    secret.map(|s| s.mint(id, engine::sys::unix_now() + 86_400))
}

/// The configuration of an embedded manager: on `ip` (port 0), tokens required if a secret
/// was given, the STUN rate limit off (the clients share few addresses), and the limits
/// asked for.
fn embedded_config(e: Embedded, secret: Option<Arc<Secret>>) -> manager::ManagerConfig {
    let mut cfg = manager::ManagerConfig {
        listen: SocketAddr::new(e.ip, 0),
        shards: e.shards,
        io: e.io,
        stun_rate: 0.0,
        shard: proto::shard::ShardConfig { secret, ..Default::default() },
        ..Default::default()
    };
    if e.limits == Limits::Production {
        cfg.shard.frames_per_sec = 500.0;
        cfg.max_connections = 100_000;
    }
    cfg
}

/// The manager of a run, reachable: the embedded one running in this process, or the
/// external one's address. Dropping it stops an embedded manager.
pub struct Connected {
    pub(crate) addr: SocketAddr,
    pub(crate) others: Vec<SocketAddr>,
    pub(crate) embedded: Option<manager::ManagerHandle>,
    pub(crate) external: Option<External>,
    /// An embedded cluster: the other managers, the nats-server, the failover timer.
    pub(crate) cluster: Option<crate::cluster::Embedded>,
}

impl Connected {
    /// The manager's TCP and UDP address (the first of several).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every manager the clients know, the first one first (one, unless `--manager` named
    /// several).
    pub fn managers(&self) -> engine::driver::Managers {
        let mut all = vec![self.addr];
        all.extend(self.others.iter().copied());
        engine::driver::Managers::new(all, 0)
    }

    /// The embedded manager's counters (None for an external one).
    pub fn stats(&self) -> Option<&Arc<proto::shard::stats::Stats>> {
        self.embedded.as_ref().map(|m| m.stats())
    }

    /// The embedded manager's IO, "uring" or "portable" (None for an external one).
    pub fn io(&self) -> Option<&'static str> {
        self.embedded.as_ref().map(|m| m.io().as_str())
    }

    /// True for a manager in this process.
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Connections the embedded manager holds open (None for an external one).
    pub fn open_connections(&self) -> Option<u64> {
        let s = self.stats()?;
        Some(
            s.connections_accepted
                .load(std::sync::atomic::Ordering::Relaxed)
                .wrapping_sub(s.connections_closed.load(std::sync::atomic::Ordering::Relaxed)),
        )
    }

    /// "manager ADDR" or "embedded manager on ADDR (IO io)", for a report's first line.
    pub fn describe(&self) -> String {
        match self.io() {
            None if self.others.is_empty() => format!("manager {}", self.addr),
            None => format!(
                "managers {}",
                self.managers().addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
            ),
            Some(io) if self.cluster.is_some() => format!(
                "embedded cluster of {} managers on NATS ({io} io): {}",
                1 + self.others.len(),
                self.managers().addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
            ),
            Some(io) => format!("embedded manager on {} ({io} io)", self.addr),
        }
    }

    /// The manager's process id: this process for an embedded manager, else the external
    /// one's (when given).
    pub fn pid(&self) -> Option<u32> {
        match &self.external {
            None => Some(std::process::id()),
            Some(e) => e.pid,
        }
    }

    /// The memory of the manager's process in MiB: this process for an embedded manager,
    /// else the external one's (from its pid, when given).
    pub fn process_rss_mb(&self) -> Option<f64> {
        match &self.external {
            None => sys::rss_mb(),
            Some(e) => e.pid.and_then(sys::rss_of),
        }
    }

    /// The manager's counters by name (`registrations`, `frames_malformed`, ...): from this
    /// process, or from the external one's metrics endpoint.
    pub fn counters(&self) -> Result<HashMap<String, u64>, Error> {
        if let Some(m) = &self.embedded {
            let s = m.stats();
            let gauges = s.gauges().into_iter().map(|(k, _, v)| (k, v));
            return Ok(s.snapshot().into_iter().chain(gauges).map(|(k, v)| (k.to_string(), v)).collect());
        }
        match self.external.as_ref().and_then(|e| e.metrics_url.as_deref()) {
            Some(url) => manager_counters(url),
            None => Err(Error::NoManagerMetrics),
        }
    }

    /// With an embedded cluster: start the timer that stops one manager (`--kill-node-at`)
    /// counting from `t0`, the calls' start.
    pub fn arm_kill(&self, t0: std::time::Instant) {
        if let Some(c) = &self.cluster {
            c.arm_kill(t0);
        }
    }

    /// With an embedded cluster: per node counters, and the failover if one was timed.
    pub fn cluster_report(&self) -> Option<serde_json::Value> {
        let c = self.cluster.as_ref()?;
        Some(c.report())
    }

    /// Stop an embedded manager now (dropping does the same).
    pub fn shutdown(self) {
        if let Some(m) = self.embedded {
            m.shutdown();
        }
    }
}

/// A manager's counters read from its metrics endpoint (`manager --metrics`): every
/// `nullpunch_manager_<name>_total V` line, by name.
fn manager_counters(url: &str) -> Result<HashMap<String, u64>, Error> {
    use std::io::{Read, Write};
    let fetch = |source| Error::MetricsFetch { url: url.to_string(), source };
    let rest = url.strip_prefix("http://").ok_or_else(|| Error::MetricsUrl(url.to_string()))?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/metrics".into()));
    let mut s = std::net::TcpStream::connect(host).map_err(fetch)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).map_err(fetch)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").map_err(fetch)?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(fetch)?;
    Ok(body
        .lines()
        .filter_map(|l| {
            let (name, v) = l.strip_prefix("nullpunch_manager_")?.split_once(' ')?;
            let name = match name.strip_suffix("_total") {
                Some(counter) => counter,
                // The directory's gauges.
                None if name.starts_with("directory_") => name,
                None => return None,
            };
            Some((name.to_string(), v.trim().parse().ok()?))
        })
        .collect())
}
