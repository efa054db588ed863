//! The manager's portable shard IO: one thread per shard, each with a single-threaded tokio
//! runtime that accepts on its own SO_REUSEPORT listener (the kernel spreads connections
//! over the shards) and drives its [`Shard`].
//!
//! Each connection is a task; its outgoing frames go through a bounded queue, and a reader
//! too slow to drain it is disconnected and counted (`connections_slow`) rather than
//! buffered without bound. All connections of a shard share one read buffer. The timing
//! and admission policy is the module parent's, shared with the io_uring IO.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use proto::shard::stats::Stats;
use proto::shard::{Output, Shard};
use proto::wire::frame::Frame;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

use super::{AcceptFailures, OpenConns, Peer, ShardStart, CLOSE_GRACE, INBOX_BATCH, SHUTDOWN_DRAIN, TICK};

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

struct ConnHandle {
    tx: mpsc::Sender<Frame>,
    task: tokio::task::AbortHandle,
}

struct ShardIo {
    core: RefCell<Shard>,
    conns: RefCell<HashMap<u64, ConnHandle>>,
    peers: Vec<Peer>,
    /// The cluster bridge, in a cluster.
    cluster: Option<super::ClusterTx>,
    rbuf: RefCell<Vec<u8>>,
    stats: Arc<Stats>,
    open: Arc<OpenConns>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl ShardIo {
    /// Move the core's output to connection queues and other shards.
    fn flush(self: &Rc<Self>) {
        let mut closing = Vec::new();
        {
            let mut core = self.core.borrow_mut();
            while let Some(o) = core.poll_output() {
                match o {
                    Output::Frame { conn, frame } => {
                        let mut conns = self.conns.borrow_mut();
                        if let Some(h) = conns.get(&conn) {
                            if h.tx.try_send(frame).is_err() {
                                // Dropping the sender ends the connection's task, which reports
                                // conn_closed to the core.
                                closing.extend(conns.remove(&conn).map(|h| (conn, h.task)));
                                self.stats.inc(&self.stats.connections_slow);
                            }
                        }
                    }
                    Output::Close { conn } => {
                        closing.extend(self.conns.borrow_mut().remove(&conn).map(|h| (conn, h.task)));
                    }
                    Output::Shard { to, msg } => {
                        if let Some(p) = self.peers.get(to as usize) {
                            p.send(msg);
                        }
                    }
                    Output::Cluster(o) => {
                        if let Some(c) = &self.cluster {
                            let _ = c.send(o);
                        }
                    }
                }
            }
        }
        for (conn, task) in closing {
            let io = self.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(CLOSE_GRACE).await;
                if !task.is_finished() {
                    // Stuck writing to a peer that does not read: abort, and do the clean-up
                    // the task would have done.
                    task.abort();
                    io.closed(conn);
                }
            });
        }
    }

    /// The connection `id` is gone: tell the core (once) and flush what that produced.
    fn closed(self: &Rc<Self>, id: u64) {
        if self.core.borrow_mut().conn_closed(Instant::now(), id) {
            self.open.closed();
        }
        self.flush();
    }
}

/// Run one shard on this thread until `stop` turns true (then every connection gets ERROR
/// Shutdown and the thread waits up to [`SHUTDOWN_DRAIN`] for them to close).
pub fn shard_thread(start: ShardStart) {
    let ShardStart { init, addr, cfg, conn_queue, stats, open, mut inbox, peers, mut stop, ready, tls, cluster } =
        start;
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = match bind_listener(addr) {
            Ok(l) => {
                let _ = ready.send(l.local_addr());
                l
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let io = Rc::new(ShardIo {
            core: RefCell::new(Shard::new(init, cfg, stats.clone())),
            conns: RefCell::new(HashMap::new()),
            peers,
            cluster,
            rbuf: RefCell::new(vec![0u8; 64 * 1024]),
            stats,
            open,
            tls,
        });
        {
            let io = io.clone();
            tokio::task::spawn_local(async move {
                while let Some(m) = inbox.recv().await {
                    let now = Instant::now();
                    {
                        let mut core = io.core.borrow_mut();
                        core.handle_msg(now, m);
                        // Take what else is queued before flushing once.
                        for _ in 1..INBOX_BATCH {
                            match inbox.try_recv() {
                                Ok(m) => core.handle_msg(now, m),
                                Err(_) => break,
                            }
                        }
                    }
                    io.flush();
                }
            });
        }
        {
            let io = io.clone();
            tokio::task::spawn_local(async move {
                let mut tick = tokio::time::interval(TICK);
                loop {
                    tick.tick().await;
                    io.core.borrow_mut().handle_tick(Instant::now(), crate::sys::unix_now());
                    io.flush();
                }
            });
        }
        let mut failures = AcceptFailures::default();
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let (stream, peer) = match r {
                        Ok(c) => c,
                        Err(e) => {
                            if let Some(pause) = failures.failed(&io.stats, Instant::now(), &e) {
                                tokio::time::sleep(pause).await;
                            }
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let before = io.open.opened();
                    // A dual-stack listener ([::]) reports IPv4 clients IPv4-mapped.
                    let peer = crate::driver::canonical(peer);
                    let id = io.core.borrow_mut().conn_opened(Instant::now(), peer, before);
                    let (tx, rx) = mpsc::channel(conn_queue);
                    let task = tokio::task::spawn_local(conn_task(io.clone(), id, stream, rx)).abort_handle();
                    io.conns.borrow_mut().insert(id, ConnHandle { tx, task });
                    // A refused connection's ERROR goes out now, not at the next tick.
                    io.flush();
                }
                _ = stop.changed() => break,
            }
        }
        drop(listener);
        io.core.borrow_mut().shutdown();
        io.flush();
        // Give connection tasks a moment to write their ERROR(Shutdown) and close.
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        while Instant::now() < deadline && io.core.borrow().open_connections() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
}

async fn conn_task(io: Rc<ShardIo>, id: u64, stream: TcpStream, mut rx: mpsc::Receiver<Frame>) {
    let (rd, mut wr) = stream.into_split();
    let mut wbuf: Vec<u8> = Vec::new();
    let mut fs = match super::server_stream(io.tls.as_ref()) {
        Ok(fs) => fs,
        Err(e) => {
            io.core.borrow_mut().conn_tls_failed(Instant::now(), id, &e);
            io.conns.borrow_mut().remove(&id);
            io.closed(id);
            return;
        }
    };
    // (A plain stream is ready at once; the core needs to hear only of a TLS handshake.)
    fs.just_established();
    let mut reading = true;
    loop {
        tokio::select! {
            r = rd.readable(), if reading => {
                if r.is_err() {
                    break;
                }
                let now = Instant::now();
                let res = {
                    let mut buf = io.rbuf.borrow_mut();
                    match rd.try_read(&mut buf) {
                        Ok(0) => Err(()),
                        Ok(n) => Ok(Some(fs.receive(&buf[..n]))),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                        Err(_) => Err(()),
                    }
                };
                let failed = match res {
                    Err(()) => break,
                    Ok(None) => false,
                    Ok(Some(Ok(()))) => false,
                    Ok(Some(Err(e))) => {
                        // A failed handshake or a plaintext client: its alert or ERROR goes
                        // out below, then the connection closes.
                        io.core.borrow_mut().conn_tls_failed(now, id, &e);
                        true
                    }
                };
                if !failed {
                    let mut core = io.core.borrow_mut();
                    if fs.just_established() {
                        if let Some(b) = fs.binding() {
                            core.conn_secured(now, id, b, fs.is_resumed());
                        }
                    }
                    loop {
                        match fs.next_frame() {
                            Ok(Some(f)) => core.conn_frame(now, id, f),
                            Ok(None) => break,
                            Err(e) => {
                                core.conn_error(now, id, &e);
                                reading = false;
                                break;
                            }
                        }
                    }
                }
                // Handshake records (and anything else the stream has to say).
                fs.take_outgoing(&mut wbuf);
                if !wbuf.is_empty() {
                    if wr.write_all(&wbuf).await.is_err() {
                        break;
                    }
                    wbuf.clear();
                }
                if failed {
                    break;
                }
                io.flush();
            }
            m = rx.recv() => match m {
                Some(f) => {
                    fs.send_frame(&f);
                    while let Ok(f) = rx.try_recv() {
                        fs.send_frame(&f);
                    }
                    fs.take_outgoing(&mut wbuf);
                    if wr.write_all(&wbuf).await.is_err() {
                        break;
                    }
                    wbuf.clear();
                }
                // The shard dropped our sender: everything queued was written; close.
                None => break,
            }
        }
    }
    let _ = wr.shutdown().await;
    io.conns.borrow_mut().remove(&id);
    io.closed(id);
}
