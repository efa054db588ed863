//! A birthday search's extra UDP sockets ([`proto::client::Output::OpenSocket`]): opened on
//! the client's own IP with ports of the system's choice, one NAT mapping each, and closed
//! when the search finds its pair or the call ends. Both drivers keep them here; each
//! receives on them its own way (the portable driver polls them through tokio, the reactor
//! registers them with its ring).

#[cfg(target_os = "linux")]
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
#[cfg(target_os = "linux")]
use std::time::{Duration, Instant};

use proto::client::SocketId;

/// Open a non-blocking UDP socket on `ip` with a port of the system's choice.
pub(crate) fn open(ip: IpAddr) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::new(ip, 0))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// The portable driver's search sockets.
#[derive(Default)]
pub(crate) struct TokioSockets {
    pub(crate) ip: Option<IpAddr>,
    /// Each socket twice: tokio's for receiving, and a duplicate of its descriptor for
    /// sending at once (tokio's `try_send_to` refuses until its reactor has seen the new
    /// socket writable, which would lose the probes sent as the socket opens).
    pub(crate) socks: Vec<(SocketId, tokio::net::UdpSocket, UdpSocket)>,
}

impl TokioSockets {
    pub(crate) fn open(&mut self, id: SocketId) -> io::Result<()> {
        let ip = self.ip.ok_or_else(|| io::Error::other("the main socket has no local address"))?;
        let s = open(ip)?;
        let tx = s.try_clone()?;
        self.socks.push((id, tokio::net::UdpSocket::from_std(s)?, tx));
        Ok(())
    }

    pub(crate) fn close(&mut self, id: SocketId) {
        self.socks.retain(|(i, _, _)| *i != id);
    }

    pub(crate) fn send(&self, id: SocketId, data: &[u8], to: SocketAddr) -> bool {
        self.socks.iter().find(|(i, _, _)| *i == id).is_some_and(|(_, _, s)| s.send_to(data, to).is_ok())
    }

    /// The next datagram on any of the sockets: (socket, source, length in `buf`).
    pub(crate) async fn recv(&self, buf: &mut [u8]) -> (SocketId, io::Result<(usize, SocketAddr)>) {
        std::future::poll_fn(|cx| {
            for (id, s, _) in &self.socks {
                let mut rb = tokio::io::ReadBuf::new(buf);
                match s.poll_recv_from(cx, &mut rb) {
                    std::task::Poll::Ready(r) => {
                        let n = rb.filled().len();
                        return std::task::Poll::Ready((*id, r.map(|from| (n, crate::driver::canonical(from)))));
                    }
                    std::task::Poll::Pending => continue,
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// How long a closed search socket stays open after its receive was cancelled: the ring
/// may still refer to it until the cancellation completes (microseconds).
#[cfg(target_os = "linux")]
const GRACE: Duration = Duration::from_secs(2);

/// The reactor's search sockets of one unit: each registered with the ring under an index.
#[cfg(target_os = "linux")]
#[derive(Default)]
pub(crate) struct RingSockets {
    pub(crate) ip: Option<IpAddr>,
    pub(crate) socks: HashMap<SocketId, (UdpSocket, u32)>,
    /// Ring indexes registered since the reactor last looked (it maps them to the unit).
    pub(crate) added: Vec<(u32, SocketId)>,
    /// Closed sockets whose receive is being cancelled.
    pub(crate) closed: Vec<(Instant, UdpSocket)>,
}

#[cfg(target_os = "linux")]
impl RingSockets {
    pub(crate) fn open(&mut self, ring: &mut crate::uring::Ring, id: SocketId) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let ip = self.ip.ok_or_else(|| io::Error::other("the main socket has no local address"))?;
        self.prune();
        let s = open(ip)?;
        let ix = ring.add_socket(crate::uring::Sock::Fd(s.as_raw_fd()))?;
        self.added.push((ix, id));
        self.socks.insert(id, (s, ix));
        Ok(())
    }

    pub(crate) fn close(&mut self, ring: &mut crate::uring::Ring, id: SocketId) {
        if let Some((s, ix)) = self.socks.remove(&id) {
            let _ = ring.remove_socket(ix);
            self.closed.push((Instant::now(), s));
        }
        self.prune();
    }

    /// Close the sockets whose grace has passed.
    fn prune(&mut self) {
        let now = Instant::now();
        self.closed.retain(|(t, _)| now.duration_since(*t) < GRACE);
    }

    /// Close every socket (the unit finished).
    pub(crate) fn close_all(&mut self, ring: &mut crate::uring::Ring) {
        let ids: Vec<SocketId> = self.socks.keys().copied().collect();
        for id in ids {
            self.close(ring, id);
        }
    }

    pub(crate) fn sock(&self, id: SocketId) -> Option<crate::uring::Sock> {
        use std::os::fd::AsRawFd;
        self.socks.get(&id).map(|(s, _)| crate::uring::Sock::Fd(s.as_raw_fd()))
    }
}
