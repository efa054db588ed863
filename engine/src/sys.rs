//! Small safe wrappers over the process-level system calls the binaries need (limits, CPU
//! time, priorities, signals), so that no crate but this one writes `unsafe`.

/// The kernel's memory page size in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions and reads no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// CPU time (user + system) used by this process so far, in seconds.
pub fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into the struct we pass, which lives on our stack.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn nofile() -> Option<libc::rlimit> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r)
}

fn set_nofile(r: &libc::rlimit) -> bool {
    // SAFETY: setrlimit reads one rlimit from the struct we pass.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, r) == 0 }
}

/// Raise the soft RLIMIT_NOFILE to the hard limit (a manager, or a generator of many
/// clients, needs a descriptor per connection). Returns the soft limit now in force, 0 if
/// it cannot be read.
// rlim_t is u64 on Linux x86-64 but not on every target.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile() -> u64 {
    let Some(mut r) = nofile() else { return 0 };
    if r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        set_nofile(&r);
    }
    nofile().map(|r| r.rlim_cur as u64).unwrap_or(0)
}

/// Raise RLIMIT_NOFILE to at least `want` if allowed (root may raise the hard limit too),
/// else as far as the hard limit. Returns the new soft limit.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile_to(want: u64) -> u64 {
    if let Some(r) = nofile() {
        if (r.rlim_max as u64) < want {
            let up = libc::rlimit { rlim_cur: want as libc::rlim_t, rlim_max: want as libc::rlim_t };
            if set_nofile(&up) {
                return want;
            }
        }
    }
    raise_nofile()
}

/// Set this process's soft RLIMIT_NOFILE to `soft` (at most the hard limit); with
/// `hard_too`, lower the hard limit to it as well (for good: only root may raise it again).
/// Tests use it to run out of descriptors on purpose.
#[allow(clippy::unnecessary_cast)]
pub fn limit_nofile(soft: u64, hard_too: bool) -> std::io::Result<()> {
    let mut r = nofile().ok_or_else(std::io::Error::last_os_error)?;
    r.rlim_cur = (soft as libc::rlim_t).min(r.rlim_max);
    if hard_too {
        r.rlim_max = r.rlim_cur;
    }
    if set_nofile(&r) {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Ask the kernel for 1 us timer slack on the calling thread (default 50 us), so that sleeps
/// of a scheduling thread end close to their deadline.
pub fn fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer argument and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Run the calling thread at the lowest CPU priority (nice 19).
pub fn lowest_thread_priority() {
    // SAFETY: gettid has no arguments; setpriority on this thread's own id takes integers.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// True when the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Send SIGTERM to process `pid` (a child this process started).
pub fn terminate(pid: u32) -> std::io::Result<()> {
    // SAFETY: kill(2) takes integers and touches no memory of ours.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Seconds since the Unix epoch now (wall-clock time, which the protocol core reads only as
/// an argument: registration tokens expire in it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Read a registration secret file ([`proto::auth::Secret::from_file_contents`]: its bytes
/// with one trailing newline removed, at least [`proto::auth::MIN_SECRET`] of them). The
/// error names the file.
pub fn read_secret(path: &std::path::Path) -> Result<proto::auth::Secret, String> {
    let b = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    proto::auth::Secret::from_file_contents(b).map_err(|e| format!("{}: {e}", path.display()))
}

/// The log layer [`init_logging`] installs, for a binary that adds layers of its own: text
/// lines on stderr, filtered by `RUST_LOG` if it is set (else by `default_filter`, e.g.
/// `"warn"` or `"info"`), with ANSI colours only when stderr is a terminal and `NO_COLOR`
/// is unset, so a log redirected to a file or a pipe carries no escape codes.
pub fn log_layer<S>(default_filter: &str) -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(colour).with_filter(filter)
}

/// Install the process's logger: [`log_layer`] alone. Call it once, first thing in `main`.
pub fn init_logging(default_filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry().with(log_layer(default_filter)).init();
}

/// The addresses of this host's interfaces that are up, with `port`: a client's host
/// candidates when its socket is bound to an unspecified address. With `loopback` (the
/// manager is on loopback: a local test) only loopback IPv4 addresses; otherwise the IPv4
/// addresses other than loopback and link-local, and with `v6` (a dual-stack socket) the
/// IPv6 ones other than loopback, link-local (fe80::/10) and IPv4-mapped.
pub fn host_addrs(port: u16, loopback: bool, v6: bool) -> Vec<std::net::SocketAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `ifap` that we free below with freeifaddrs;
    // each node and its `ifa_addr` (checked for null, and for its family, so it points at a
    // sockaddr_in or sockaddr_in6) stay valid until then.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut p = ifap;
        while !p.is_null() {
            let ifa = &*p;
            p = ifa.ifa_next;
            let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
            if !up || ifa.ifa_addr.is_null() {
                continue;
            }
            let ip: std::net::IpAddr = match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    if ip.is_link_local() || ip.is_unspecified() || ip.is_loopback() != loopback {
                        continue;
                    }
                    ip.into()
                }
                libc::AF_INET6 if v6 && !loopback => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
                    if link_local || ip.is_loopback() || ip.is_unspecified() || ip.to_ipv4_mapped().is_some() {
                        continue;
                    }
                    ip.into()
                }
                _ => continue,
            };
            let a = std::net::SocketAddr::new(ip, port);
            if !out.contains(&a) {
                out.push(a);
            }
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// The IPv4 default gateway of the main routing table (from `/proc/net/route`), if any.
pub fn default_gateway_v4() -> Option<std::net::Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    // Columns: Iface Destination Gateway Flags ...; hex, in host (little-endian) byte order.
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 || f[1] != "00000000" {
            return None;
        }
        let gw = u32::from_str_radix(f[2], 16).ok().filter(|g| *g != 0)?;
        Some(std::net::Ipv4Addr::from(u32::from_be(gw)))
    })
}

/// The local IPv4 address this host sends from towards `to` (a UDP socket is connected,
/// which sends nothing, and asked its address).
pub fn source_ip_towards(to: std::net::SocketAddr) -> Option<std::net::Ipv4Addr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(to).ok()?;
    match s.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}
