//! The source addresses of the simulated clients, and binding their sockets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

use crate::error::Error;

/// Bind a simulated client's UDP socket, explaining a port shortage.
pub fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, Error> {
    UdpSocket::bind(addr).map_err(|source| {
        let ip = addr.ip();
        if source.kind() == std::io::ErrorKind::AddrInUse || source.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            Error::NoEphemeralPort { ip, source, ports: ephemeral_ports() }
        } else {
            Error::Bind { ip, source }
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
    ips: Vec<IpAddr>,
}

impl Sources {
    /// Addresses for `clients` clients from `base`: `want` of them, or as many as the
    /// ports need when `want` is 0.
    pub fn plan(base: IpAddr, clients: usize, want: usize) -> Result<Sources, Error> {
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
        let IpAddr::V4(v4) = base else {
            return Err(Error::SourcesNotIpv4 { clients, ips: n, per_ip });
        };
        let first = u32::from(v4);
        let last = first
            .checked_add(n as u32 - 1)
            .filter(|&l| v4.is_loopback() && l <= u32::from(Ipv4Addr::new(127, 255, 255, 254)));
        if last.is_none() {
            return Err(Error::SourcesBeyondLoopback { clients, ips: n, per_ip, base });
        }
        Ok(Sources { ips: (0..n as u32).map(|k| IpAddr::V4((first + k).into())).collect() })
    }

    /// The address of client `i`.
    pub fn ip(&self, i: usize) -> IpAddr {
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
}
