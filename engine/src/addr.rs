//! Addresses given on a command line: the manager's `HOST:PORT`, checked and resolved, with
//! an error that says what is wrong with it (the binaries print it after the flag's name).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

/// Why a manager address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Nothing was given.
    #[error("no address given: give HOST:PORT, e.g. localhost:7480")]
    Empty,
    /// A host name or IP without `:PORT`.
    #[error("`{given}` has no port: give HOST:PORT, e.g. {example}")]
    MissingPort {
        /// What was given.
        given: String,
        /// The same host with the default manager port.
        example: String,
    },
    /// `:PORT` without a host.
    #[error("`{given}` has no host: give HOST:PORT, e.g. localhost{given}")]
    MissingHost {
        /// What was given.
        given: String,
    },
    /// The part after the last `:` is not a port number from 1 to 65535.
    #[error("`{given}`: {port} is not a port (1-65535)")]
    BadPort {
        /// What was given.
        given: String,
        /// The part that should have been the port.
        port: String,
    },
    /// The host name did not resolve to any address.
    #[error("cannot resolve `{host}`: {reason}")]
    Unresolvable {
        /// The host name.
        host: String,
        /// The resolver's answer.
        reason: String,
    },
}

/// The manager port the documentation uses, for the examples in [`AddrError`].
const EXAMPLE_PORT: u16 = 7480;

/// Parse and resolve a manager address: `IP:PORT`, `[IPv6]:PORT` or `NAME:PORT`. A name
/// with both IPv4 and IPv6 addresses gives its first IPv4 one: the manager listens on
/// IPv4 by default (`127.0.0.1:7480`), and a peer with `--bind 0.0.0.0:...` can only reach
/// an IPv4 STUN responder (its default dual-stack socket reaches either). Port 0 is refused: nothing can be reached there.
pub fn manager_addr(s: &str) -> Result<SocketAddr, AddrError> {
    let given = s.trim();
    if given.is_empty() {
        return Err(AddrError::Empty);
    }
    let bad_port = |port: &str| AddrError::BadPort { given: given.to_string(), port: port.to_string() };
    if let Ok(a) = given.parse::<SocketAddr>() {
        return if a.port() == 0 { Err(bad_port("0")) } else { Ok(a) };
    }
    let missing_port = |host: &str| {
        let example = if host.contains(':') {
            format!("[{}]:{EXAMPLE_PORT}", host.trim_start_matches('[').trim_end_matches(']'))
        } else {
            format!("{host}:{EXAMPLE_PORT}")
        };
        AddrError::MissingPort { given: given.to_string(), example }
    };
    // A bare IP address, IPv6 ones included (`::1`, `[::1]`).
    if given.parse::<IpAddr>().is_ok() || (given.starts_with('[') && given.ends_with(']')) {
        return Err(missing_port(given));
    }
    let Some((host, port)) = given.rsplit_once(':') else {
        return Err(missing_port(given));
    };
    if host.is_empty() {
        return Err(AddrError::MissingHost { given: given.to_string() });
    }
    if port.is_empty() {
        return Err(missing_port(host));
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => return Err(bad_port(port)),
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let unresolvable = |reason: String| AddrError::Unresolvable { host: host.to_string(), reason };
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs().map_err(|e| unresolvable(e.to_string()))?.collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| unresolvable("no address found".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_and_port_are_taken_as_they_are() {
        assert_eq!(manager_addr("127.0.0.1:7480"), Ok("127.0.0.1:7480".parse().unwrap()));
        assert_eq!(manager_addr(" [::1]:9 "), Ok("[::1]:9".parse().unwrap()));
    }

    #[test]
    fn a_name_resolves_to_an_ipv4_address_when_it_has_one() {
        let a = manager_addr("localhost:7480").unwrap();
        assert_eq!(a, "127.0.0.1:7480".parse().unwrap());
    }

    #[test]
    fn a_missing_port_says_how_to_give_one() {
        let e = manager_addr("localhost").unwrap_err();
        assert_eq!(e.to_string(), "`localhost` has no port: give HOST:PORT, e.g. localhost:7480");
        assert_eq!(
            manager_addr("localhost:").unwrap_err().to_string(),
            "`localhost:` has no port: give HOST:PORT, e.g. localhost:7480"
        );
        assert_eq!(
            manager_addr("10.0.0.1").unwrap_err().to_string(),
            "`10.0.0.1` has no port: give HOST:PORT, e.g. 10.0.0.1:7480"
        );
        for v6 in ["::1", "[::1]"] {
            assert_eq!(
                manager_addr(v6).unwrap_err().to_string(),
                format!("`{v6}` has no port: give HOST:PORT, e.g. [::1]:7480")
            );
        }
    }

    #[test]
    fn a_bad_port_is_named() {
        assert_eq!(
            manager_addr("127.0.0.1:99999").unwrap_err().to_string(),
            "`127.0.0.1:99999`: 99999 is not a port (1-65535)"
        );
        assert_eq!(
            manager_addr("localhost:http").unwrap_err().to_string(),
            "`localhost:http`: http is not a port (1-65535)"
        );
        assert_eq!(manager_addr("127.0.0.1:0").unwrap_err().to_string(), "`127.0.0.1:0`: 0 is not a port (1-65535)");
    }

    #[test]
    fn a_name_that_does_not_resolve_is_named() {
        // `.invalid` is reserved (RFC 2606): it never resolves.
        let e = manager_addr("nosuch.invalid:7480").unwrap_err();
        assert!(matches!(&e, AddrError::Unresolvable { host, .. } if host == "nosuch.invalid"), "{e:?}");
        assert!(e.to_string().starts_with("cannot resolve `nosuch.invalid`"), "{e}");
    }

    #[test]
    fn empty_and_hostless_addresses_are_refused() {
        assert_eq!(manager_addr(""), Err(AddrError::Empty));
        assert_eq!(manager_addr("  "), Err(AddrError::Empty));
        assert_eq!(manager_addr("").unwrap_err().to_string(), "no address given: give HOST:PORT, e.g. localhost:7480");
        assert_eq!(
            manager_addr(":7480").unwrap_err().to_string(),
            "`:7480` has no host: give HOST:PORT, e.g. localhost:7480"
        );
    }
}
