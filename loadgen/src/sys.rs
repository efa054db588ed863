//! What the load generator measures about itself and the machine.

/// Resident set size of this process in MiB (Linux /proc/self/statm), if readable.
pub fn rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = s.split_whitespace().nth(1)?.parse().ok()?;
    let page = engine::sys::page_size() as f64;
    Some(pages * page / (1024.0 * 1024.0))
}

/// Open file descriptors of this process.
pub fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

pub use engine::sys::{cpu_seconds, fine_timer_slack, raise_nofile, raise_nofile_to};

/// Logical cores available.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A thread that sleeps 1 ms at a time and records by how much each sleep overran, in
/// microseconds: how long a runnable thread of this process waited for a CPU (host
/// preemption, other tenants, or this process saturating the cores). Stops at `stop`.
pub struct Sleeper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<hdrhistogram::Histogram<u64>>>,
}

impl Sleeper {
    /// Start measuring.
    pub fn start() -> Sleeper {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sleeper".into())
            .spawn(move || {
                fine_timer_slack();
                let mut h = crate::summary::hist::new_histogram();
                let tick = std::time::Duration::from_millis(1);
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = std::time::Instant::now();
                    std::thread::sleep(tick);
                    crate::summary::hist::record(&mut h, t.elapsed().saturating_sub(tick));
                }
                h
            })
            .ok();
        Sleeper { stop, thread }
    }

    /// Stop and return the oversleep histogram (None if the thread could not start).
    pub fn finish(mut self) -> Option<hdrhistogram::Histogram<u64>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take()?.join().ok()
    }
}

/// The manager's secret, when `--secret-file` was given: every simulated client then carries
/// a token for its id, and an embedded manager requires them.
pub static SECRET: std::sync::OnceLock<std::sync::Arc<proto::auth::Secret>> = std::sync::OnceLock::new();

/// A day-long token for `id`, if a secret was given.
pub fn token_for(id: &proto::wire::frame::ClientId) -> Option<proto::wire::frame::AuthToken> {
    SECRET.get().map(|s| s.mint(id, proto::auth::unix_now() + 86_400))
}

/// The configuration of an embedded manager on `ip` (port 0): no limits (every simulated
/// client shares one source address, so no per-source STUN limit either), tokens required
/// if a secret was given, and the generator's own IO (`--io portable` makes the whole run
/// portable).
pub fn embedded_manager(ip: std::net::IpAddr, shards: usize, io: engine::driver::Io) -> manager::ManagerConfig {
    manager::ManagerConfig {
        listen: std::net::SocketAddr::new(ip, 0),
        shards,
        io,
        stun_rate: 0.0,
        shard: proto::shard::ShardConfig { secret: SECRET.get().cloned(), ..Default::default() },
        ..Default::default()
    }
}

/// Resident set size of process `pid` in MiB.
pub fn rss_of(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A manager's counters read from its metrics endpoint (`manager --metrics`): every
/// `nullpunch_manager_<name>_total V` line, by name.
pub fn manager_counters(url: &str) -> Result<std::collections::HashMap<String, u64>, String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: expected http://HOST:PORT/metrics"))?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/metrics".into()));
    let mut s = std::net::TcpStream::connect(host).map_err(|e| format!("{url}: {e}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").map_err(|e| format!("{url}: {e}"))?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| format!("{url}: {e}"))?;
    Ok(body
        .lines()
        .filter_map(|l| {
            let (name, v) = l.strip_prefix("nullpunch_manager_")?.split_once(' ')?;
            Some((name.strip_suffix("_total")?.to_string(), v.trim().parse().ok()?))
        })
        .collect())
}

/// Bind a simulated client's UDP socket, explaining a port shortage.
pub fn bind_udp(addr: std::net::SocketAddr) -> Result<std::net::UdpSocket, String> {
    std::net::UdpSocket::bind(addr).map_err(|e| {
        let ip = addr.ip();
        if e.kind() == std::io::ErrorKind::AddrInUse || e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            format!(
                "bind {ip}: {e}: no ephemeral port left on {ip} (ip_local_port_range gives {}); spread the clients over \
                 more addresses with --source-ips N",
                ephemeral_ports()
            )
        } else {
            format!("bind {ip}: {e}")
        }
    })
}

/// Ephemeral ports one local address offers (`net.ipv4.ip_local_port_range`, per network
/// namespace), for UDP and for TCP each.
pub fn ephemeral_ports() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<usize>());
            match (it.next()?, it.next()?) {
                (Ok(lo), Ok(hi)) if hi >= lo => Some(hi - lo + 1),
                _ => None,
            }
        })
        .unwrap_or(28_232)
}

/// The source addresses of the simulated clients. Every client takes one ephemeral UDP port
/// (its media socket) and one ephemeral TCP port (its manager connection) from its address,
/// so one address holds at most as many clients as `ip_local_port_range` has ports, and
/// connects stay cheap only while they find a free port in the even half of it. Past that
/// (with a 10% margin), clients are spread round-robin over consecutive loopback
/// addresses from the given one (127.0.0.1, 127.0.0.2, ...); Linux answers on all of
/// 127.0.0.0/8 without configuration.
#[derive(Debug, Clone)]
pub struct Sources {
    ips: Vec<std::net::IpAddr>,
}

impl Sources {
    /// Addresses for `clients` clients from `base`: `want` of them, or as many as the
    /// ports need when `want` is 0.
    pub fn plan(base: std::net::IpAddr, clients: usize, want: usize) -> Result<Sources, String> {
        // connect() takes the even ports of the range first and leaves the odd ones to
        // bind(); once the even half is used up, every connect scans all of it before it
        // finds an odd port, and the kernel's time per connect climbs steeply (20,000
        // clients on one address of 28,232 ports: p99 19-34 ms instead of 0.9 ms, and twice
        // the CPU). So an address takes at most 90% of half its range.
        let per_ip = (ephemeral_ports() / 2 * 9 / 10).max(1);
        let n = if want > 0 { want } else { clients.div_ceil(per_ip).max(1) };
        if n == 1 {
            return Ok(Sources { ips: vec![base] });
        }
        let std::net::IpAddr::V4(v4) = base else {
            return Err(format!(
                "{clients} clients need {n} source addresses ({per_ip} ephemeral ports each), and only 127.0.0.0/8 has \
                 more than one; use --bind-ip 127.0.0.1"
            ));
        };
        let first = u32::from(v4);
        let last = first
            .checked_add(n as u32 - 1)
            .filter(|&l| v4.is_loopback() && l <= u32::from(std::net::Ipv4Addr::new(127, 255, 255, 254)));
        if last.is_none() {
            return Err(format!(
                "{clients} clients need {n} source addresses ({per_ip} ephemeral ports each) from {base}; spreading works \
                 over 127.0.0.0/8 only"
            ));
        }
        Ok(Sources { ips: (0..n as u32).map(|k| std::net::IpAddr::V4((first + k).into())).collect() })
    }

    /// The address of client `i`.
    pub fn ip(&self, i: usize) -> std::net::IpAddr {
        self.ips[i % self.ips.len()]
    }

    /// How many addresses.
    pub fn len(&self) -> usize {
        self.ips.len()
    }

    /// "127.0.0.1" or "127.0.0.1-127.0.0.4".
    pub fn describe(&self) -> String {
        match (self.ips.first(), self.ips.last()) {
            (Some(a), Some(b)) if a != b => format!("{a}-{b}"),
            (Some(a), _) => a.to_string(),
            _ => String::new(),
        }
    }

    /// Bind client `i`'s UDP socket.
    pub fn bind_udp(&self, i: usize) -> Result<std::net::UdpSocket, String> {
        bind_udp(std::net::SocketAddr::new(self.ip(i), 0))
    }
}
