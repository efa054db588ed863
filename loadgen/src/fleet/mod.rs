//! The simulated clients of a run, on either driver: built (`Clients`, spread over source
//! addresses by `sources`), started on the portable tokio driver (one task per client) or
//! on the io_uring driver (one ring thread per generator thread, each client set up on the
//! thread that runs it), watched, stopped and collected with their apps.
//!
//! A run builds its fleet in two steps: [`Fleet::build`] makes every member (and, on
//! io_uring, its ring thread), then [`Ready::start`] lets them connect, each at its own
//! time if asked. Members end when their apps are done, or when the fleet is stopped;
//! [`Running::finish`] waits for all of them.

pub mod sources;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::driver::{self, App, Ctx, DriverCounters, DriverError, Io};
use proto::auth::Secret;
use proto::client::{Client, ClientConfig, Event, Received};
use proto::wire::frame::ClientId;

use crate::error::Error;
use crate::target::Target;

pub use sources::Sources;

/// How the simulated clients run (`--io`, `--bind-ip`, `--source-ips`, `--threads`,
/// `--tick-us`).
#[derive(Debug, Clone)]
pub struct Options {
    /// UDP IO of the simulated clients.
    pub io: Io,
    /// Local IP of the simulated clients (the first, if they are spread over several).
    pub bind_ip: IpAddr,
    /// Source addresses to spread the clients over (0: as many as the ports need).
    pub source_ips: usize,
    /// Generator threads (0: one per core): io_uring ring threads, or tokio workers.
    pub threads: usize,
    /// Timer tick of the io_uring driver.
    pub tick: Duration,
}

impl Options {
    /// Generator threads, 0 resolved to one per core.
    pub fn threads(&self) -> usize {
        if self.threads == 0 {
            crate::sys::cores()
        } else {
            self.threads
        }
    }
}

/// Makes a run's simulated clients: a UDP socket and a client state machine that discovers
/// its address at the manager and registers, with a token when the target has a secret.
#[derive(Clone)]
pub struct Clients {
    manager: SocketAddr,
    secret: Option<Arc<Secret>>,
    srtp_suites: Vec<u8>,
    tls: Option<engine::tls::ClientTls>,
}

/// What a client carries, which sizes its socket and its call limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    /// A registration, or one call: the defaults.
    Few,
    /// Any number of calls sharing its one socket: 8 MiB socket buffers, no call limit.
    ManyCalls,
}

impl Clients {
    /// Clients of `target`'s manager, now reachable at `manager`.
    pub fn new(manager: SocketAddr, target: &Target) -> Clients {
        Clients {
            manager,
            secret: target.secret.clone(),
            srtp_suites: target.srtp_suites.clone(),
            tls: target.tls.clone(),
        }
    }

    /// The TLS configuration the clients share (each member gets its own session cache).
    pub fn tls(&self) -> Option<engine::tls::ClientTls> {
        self.tls.clone()
    }

    /// Client `id` on a UDP socket bound to `ip` (port 0), its state machine seeded with
    /// `seed`.
    pub fn make(
        &self,
        id: &str,
        ip: IpAddr,
        seed: u64,
        carries: Carries,
    ) -> Result<(std::net::UdpSocket, Client), Error> {
        let udp = sources::bind_udp(SocketAddr::new(ip, 0))?;
        if carries == Carries::ManyCalls {
            driver::set_socket_buffers(&udp, 8 << 20);
        }
        let port = udp.local_addr().map_err(Error::Socket)?.port();
        let id = ClientId::new(id).map_err(|source| Error::ClientId { id: id.to_string(), source })?;
        let mut c = ClientConfig::new(id, port);
        c.stun_server = Some(self.manager);
        if carries == Carries::ManyCalls {
            c.max_calls = u16::MAX;
        }
        c.auth = crate::target::token_for(self.secret.as_deref(), &c.id);
        c.srtp_suites = self.srtp_suites.clone();
        c.key_seed = engine::entropy::secure_key();
        Ok((udp, Client::new(c, seed)))
    }
}

/// One simulated client to run: its socket, its state machine and the app on top.
pub struct Member<A> {
    /// The client state machine.
    pub client: Client,
    /// Its UDP socket.
    pub udp: std::net::UdpSocket,
    /// The application.
    pub app: A,
    /// Wakes the app from another thread.
    pub wake: Option<Arc<Wake>>,
}

/// Wakes a member's app ([`App::on_wakeup`]) from another thread, on whichever driver runs
/// it.
#[derive(Debug, Default)]
pub struct Wake {
    notify: Arc<tokio::sync::Notify>,
    #[cfg(target_os = "linux")]
    ring: Option<Arc<engine::reactor::Wake>>,
}

impl Wake {
    /// A wake-up source for a member on `io`.
    pub fn new(io: Io) -> Result<Arc<Wake>, Error> {
        match io {
            Io::Portable => Ok(Arc::default()),
            #[cfg(target_os = "linux")]
            Io::Uring => Ok(Arc::new(Wake {
                notify: Default::default(),
                ring: Some(engine::reactor::Wake::new().map_err(Error::Eventfd)?),
            })),
        }
    }

    /// Wake the member.
    pub fn notify(&self) {
        self.notify.notify_one();
        #[cfg(target_os = "linux")]
        if let Some(w) = &self.ring {
            w.notify();
        }
    }
}

/// How a fleet runs.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The driver.
    pub io: Io,
    /// The managers the members connect to: member `i` starts at manager `i % n` and fails
    /// over to the next ones.
    pub managers: driver::Managers,
    /// Ring threads (io_uring) or tokio workers (portable).
    pub threads: usize,
    /// Tuning of each ring (io_uring only).
    #[cfg(target_os = "linux")]
    pub ring: engine::reactor::ReactorConfig,
    /// TLS to the manager (each member with a session cache of its own).
    pub tls: Option<engine::tls::ClientTls>,
}

/// A member after it ended.
pub struct Finished<A> {
    /// The client, with its final state.
    pub client: Client,
    /// The application.
    pub app: A,
    /// The member's driver counters, or why it stopped early.
    pub result: Result<DriverCounters, Error>,
}

/// The first member failure any driver reported, while the other members go on.
#[derive(Default)]
struct Failures(Mutex<Option<(Option<ClientId>, String)>>);

impl Failures {
    fn note(&self, id: Option<&ClientId>, error: &dyn std::fmt::Display) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| (id.cloned(), error.to_string()));
    }

    fn take(&self) -> Option<Error> {
        let (id, message) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        Some(Error::ClientFailed { id, message })
    }

    fn any(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

/// A member's app, with its failure reported to the fleet.
struct Tracked<A> {
    app: A,
    id: ClientId,
    failures: Arc<Failures>,
}

impl<A: App> App for Tracked<A> {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) {
        self.app.on_event(ctx, event)
    }
    fn on_media(&mut self, ctx: &mut Ctx<'_>, packet: Received<'_>) {
        self.app.on_media(ctx, packet)
    }
    fn next_wakeup(&self) -> Option<Instant> {
        self.app.next_wakeup()
    }
    fn on_wakeup(&mut self, ctx: &mut Ctx<'_>) {
        self.app.on_wakeup(ctx)
    }
    fn done(&self) -> bool {
        self.app.done()
    }
    fn on_failed(&mut self, error: &DriverError) {
        self.failures.note(Some(&self.id), error);
        self.app.on_failed(error)
    }
}

/// Makes member `i` (on the thread that will run it).
type Make<A> = Arc<dyn Fn(usize) -> Result<Member<A>, Error> + Send + Sync>;
/// When member `i` connects (None: at once).
type ConnectAt = Arc<dyn Fn(usize) -> Option<Instant> + Send + Sync>;

/// Builds fleets.
pub struct Fleet;

impl Fleet {
    /// Make `count` members: member `i` by `make(i)`, on io_uring on ring thread
    /// `place(i) % spec.threads` (which sets up its own members, so the process holds a
    /// socket's descriptor only until its ring takes it), on tokio on this thread. Returns
    /// once every member is made; none has connected yet.
    pub fn build<A: App + Send + 'static>(
        spec: &Spec,
        count: usize,
        place: impl Fn(usize) -> usize,
        make: impl Fn(usize) -> Result<Member<A>, Error> + Send + Sync + 'static,
    ) -> Result<Ready<A>, Error> {
        let failures = Arc::new(Failures::default());
        let make: Make<A> = Arc::new(make);
        match spec.io {
            Io::Portable => {
                // Sized once: a vector grown by doubling leaves its old buffers in the heap,
                // and the run would count them as memory per client.
                let mut members = Vec::with_capacity(count);
                for i in 0..count {
                    members.push(make(i)?);
                }
                Ok(Ready { spec: spec.clone(), failures, drive: ReadyDrive::Tokio(members) })
            }
            #[cfg(target_os = "linux")]
            Io::Uring => {
                let mut per_thread: Vec<Vec<usize>> = vec![Vec::new(); spec.threads.max(1)];
                for i in 0..count {
                    per_thread[place(i) % spec.threads.max(1)].push(i);
                }
                ring::build(spec, per_thread, make, failures)
            }
        }
    }
}

/// A fleet whose members are made and not yet connected.
pub struct Ready<A> {
    spec: Spec,
    failures: Arc<Failures>,
    drive: ReadyDrive<A>,
}

enum ReadyDrive<A> {
    Tokio(Vec<Member<A>>),
    #[cfg(target_os = "linux")]
    Ring(ring::Threads<A>),
}

impl<A: App + Send + 'static> Ready<A> {
    /// Let the members connect: member `i` at `connect_at(i)`, at once where that is None.
    /// On tokio the runtime starts here, after the connect times were chosen (as a run
    /// with a plan has always done: its timer's millisecond ticks count from its start).
    pub fn start(
        self,
        connect_at: impl Fn(usize) -> Option<Instant> + Send + Sync + 'static,
    ) -> Result<Running<A>, Error> {
        let connect_at: ConnectAt = Arc::new(connect_at);
        let Ready { spec, failures, drive } = self;
        Ok(match drive {
            ReadyDrive::Tokio(members) => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(spec.threads)
                    .enable_all()
                    .build()
                    .map_err(Error::Runtime)?;
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                let tasks = members
                    .into_iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let Member { client, udp, app, wake } = m;
                        let app = Tracked { app, id: client.config().id.clone(), failures: failures.clone() };
                        let wake = wake.map(|w| w.notify.clone());
                        let stop = stop_rx.clone();
                        let tls = spec.tls.as_ref().map(|t| t.for_one_client());
                        runtime.spawn(run_task(
                            client,
                            udp,
                            app,
                            wake,
                            spec.managers.starting_at(i),
                            tls,
                            connect_at(i),
                            stop,
                        ))
                    })
                    .collect();
                let stop = Stopper {
                    tokio: Some(Arc::new(stop_tx)),
                    #[cfg(target_os = "linux")]
                    ring: None,
                };
                Running { failures, stop, drive: RunningDrive::Tokio { runtime, tasks } }
            }
            #[cfg(target_os = "linux")]
            ReadyDrive::Ring(threads) => {
                let stop = Stopper { tokio: None, ring: Some(threads.stop.clone()) };
                Running { failures, stop, drive: RunningDrive::Ring(threads.go(connect_at)) }
            }
        })
    }
}

/// One member on the tokio driver: wait for its connect time, run until its app is done or
/// the fleet stops.
///
/// An `async move` block, not an `async fn`: an async fn's body moves each argument into a
/// local of its own, and the task would keep both copies (the client twice: 0.6 KiB more
/// per client, which `register` counts as memory per client).
#[allow(clippy::manual_async_fn)]
#[allow(clippy::too_many_arguments)]
fn run_task<A: App>(
    mut client: Client,
    udp: std::net::UdpSocket,
    mut app: Tracked<A>,
    wake: Option<Arc<tokio::sync::Notify>>,
    managers: driver::Managers,
    tls: Option<engine::tls::ClientTls>,
    connect_at: Option<Instant>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = Finished<A>> {
    async move {
        if let Some(at) = connect_at {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        }
        let result = async {
            udp.set_nonblocking(true).map_err(Error::Socket)?;
            let udp = tokio::net::UdpSocket::from_std(udp).map_err(Error::Socket)?;
            let shutdown = async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            };
            Ok(driver::run_with_wake(&mut client, &udp, managers, &mut app, shutdown, wake, tls).await?)
        }
        .await;
        if let Err(e) = &result {
            // A driver that stopped later than its first connection (its socket failed)
            // does not call on_failed.
            app.failures.note(Some(&app.id), e);
        }
        Finished { client, app: app.app, result }
    }
}

/// Stops a running fleet, from any thread.
#[derive(Clone)]
pub struct Stopper {
    tokio: Option<Arc<tokio::sync::watch::Sender<bool>>>,
    #[cfg(target_os = "linux")]
    ring: Option<Arc<engine::reactor::Stop>>,
}

impl Stopper {
    /// Stop every member: its calls are hung up, the HANGUPs flushed, and it ends.
    pub fn stop(&self) {
        if let Some(tx) = &self.tokio {
            tx.send_replace(true);
        }
        #[cfg(target_os = "linux")]
        if let Some(s) = &self.ring {
            s.stop();
        }
    }
}

/// A fleet whose members are connecting or connected.
pub struct Running<A> {
    failures: Arc<Failures>,
    stop: Stopper,
    drive: RunningDrive<A>,
}

enum RunningDrive<A> {
    Tokio {
        runtime: tokio::runtime::Runtime,
        tasks: Vec<tokio::task::JoinHandle<Finished<A>>>,
    },
    #[cfg(target_os = "linux")]
    Ring(ring::Running<A>),
}

impl<A: App + Send + 'static> Running<A> {
    /// Stops this fleet from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stop.clone()
    }

    /// Stop every member.
    pub fn stop(&self) {
        self.stop.stop()
    }

    /// True once a member has failed (its driver stopped with an error).
    pub fn failed(&self) -> bool {
        self.failures.any()
    }

    /// The first failure of a member, taken.
    pub fn take_failure(&self) -> Option<Error> {
        self.failures.take()
    }

    /// True once every member (on io_uring: every ring thread) has ended.
    pub fn all_ended(&self) -> bool {
        match &self.drive {
            RunningDrive::Tokio { tasks, .. } => tasks.iter().all(|t| t.is_finished()),
            #[cfg(target_os = "linux")]
            RunningDrive::Ring(r) => r.all_ended(),
        }
    }

    /// Why the fleet is already short of a member, if it is: a failure a member reported,
    /// or a member (on io_uring, a ring thread) that ended. Before a run starts no member
    /// should end, so either is the run's error.
    pub fn ended_early(&mut self) -> Option<Error> {
        if let Some(e) = self.failures.take() {
            return Some(e);
        }
        match &mut self.drive {
            RunningDrive::Tokio { runtime, tasks } => {
                let i = tasks.iter().position(|t| t.is_finished())?;
                Some(match runtime.block_on(tasks.swap_remove(i)) {
                    Ok(Finished { result: Err(e), .. }) => e,
                    Ok(Finished { client, .. }) => Error::StoppedEarly(client.config().id.clone()),
                    Err(e) => Error::Task(e),
                })
            }
            #[cfg(target_os = "linux")]
            RunningDrive::Ring(r) => r.ended_early(),
        }
    }

    /// Wait for every member to end, and return them in member order.
    pub fn finish(self) -> Result<Vec<Finished<A>>, Error> {
        match self.drive {
            RunningDrive::Tokio { runtime, tasks } => {
                let mut out = Vec::with_capacity(tasks.len());
                for t in tasks {
                    out.push(runtime.block_on(t)?);
                }
                Ok(out)
            }
            #[cfg(target_os = "linux")]
            RunningDrive::Ring(r) => r.finish(),
        }
    }
}

/// The io_uring side: ring threads that set up their members, wait for the start, and run.
#[cfg(target_os = "linux")]
mod ring {
    use std::sync::mpsc;

    use engine::reactor::{Reactor, Stop, Unit};

    use super::*;

    /// What a ring thread returns: its members (by member index) once they ended.
    type Out<A> = Result<Vec<(usize, Finished<A>)>, Error>;

    /// Ring threads with their members set up, waiting for the start.
    pub(super) struct Threads<A> {
        pub(super) stop: Arc<Stop>,
        go: Vec<mpsc::Sender<ConnectAt>>,
        handles: Vec<std::thread::JoinHandle<Out<A>>>,
    }

    /// Start one ring thread per non-empty list of member indices, each making its own
    /// members; return once all are made (or the first error).
    pub(super) fn build<A: App + Send + 'static>(
        spec: &Spec,
        per_thread: Vec<Vec<usize>>,
        make: Make<A>,
        failures: Arc<Failures>,
    ) -> Result<Ready<A>, Error> {
        let stop = Stop::new();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), Error>>();
        let mut threads = Threads { stop: stop.clone(), go: Vec::new(), handles: Vec::new() };
        for (t, mine) in per_thread.into_iter().enumerate().filter(|(_, m)| !m.is_empty()) {
            let (go_tx, go_rx) = mpsc::channel::<ConnectAt>();
            let (stop, ready, make, failures) = (stop.clone(), ready_tx.clone(), make.clone(), failures.clone());
            let (managers, rc, tls) = (spec.managers.clone(), spec.ring.clone(), spec.tls.clone());
            let name = format!("ring-{t}");
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || -> Out<A> {
                    let built = (|| {
                        let mut r = Reactor::new(mine.len(), managers, Some(&stop), &rc)?;
                        for &i in &mine {
                            let Member { client, udp, app, wake } = make(i)?;
                            let id = client.config().id.clone();
                            let app = Tracked { app, id, failures: failures.clone() };
                            let wake = wake.and_then(|w| w.ring.clone());
                            let tls = tls.as_ref().map(|t| t.for_one_client());
                            r.add(Unit { client, udp, app, wake, connect_at: None, tls, first_manager: i })?;
                        }
                        Ok::<_, Error>(r)
                    })();
                    let mut r = match built {
                        Ok(r) => {
                            let _ = ready.send(Ok(()));
                            r
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return Ok(Vec::new());
                        }
                    };
                    let Ok(connect_at) = go_rx.recv() else { return Ok(Vec::new()) };
                    for (ix, &i) in mine.iter().enumerate() {
                        if let Some(at) = connect_at(i) {
                            r.set_connect_at(ix, at);
                        }
                    }
                    let done = r.run().inspect_err(|e| failures.note(None, e))?;
                    Ok(mine
                        .into_iter()
                        .zip(done)
                        .map(|(i, f)| {
                            let result = f.result.map_err(Error::Driver);
                            (i, Finished { client: f.client, app: f.app.app, result })
                        })
                        .collect())
                })
                .map_err(|source| Error::Thread { name, source })?;
            threads.go.push(go_tx);
            threads.handles.push(handle);
        }
        drop(ready_tx);
        for _ in 0..threads.handles.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Panicked("a generator thread")),
            }
        }
        Ok(Ready { spec: spec.clone(), failures, drive: ReadyDrive::Ring(threads) })
    }

    impl<A> Threads<A> {
        /// Let every thread's members connect.
        pub(super) fn go(self, connect_at: ConnectAt) -> Running<A> {
            for g in self.go {
                let _ = g.send(connect_at.clone());
            }
            Running { handles: self.handles, stop: self.stop }
        }
    }

    /// Ring threads running their members. Dropped before they are finished (a run that
    /// failed), it stops them.
    pub(super) struct Running<A> {
        handles: Vec<std::thread::JoinHandle<Out<A>>>,
        stop: Arc<Stop>,
    }

    impl<A> Drop for Running<A> {
        fn drop(&mut self) {
            if !self.handles.is_empty() {
                self.stop.stop();
            }
        }
    }

    impl<A> Running<A> {
        pub(super) fn all_ended(&self) -> bool {
            self.handles.iter().all(|t| t.is_finished())
        }

        /// A thread that ended: its error, or the first of its members.
        pub(super) fn ended_early(&mut self) -> Option<Error> {
            let i = self.handles.iter().position(|t| t.is_finished())?;
            Some(match self.handles.swap_remove(i).join() {
                Ok(Ok(members)) => {
                    let mut first = None;
                    for (_, f) in members {
                        match f.result {
                            Err(e) => return Some(e),
                            Ok(_) => {
                                first.get_or_insert(f.client.config().id.clone());
                            }
                        }
                    }
                    match first {
                        Some(id) => Error::StoppedEarly(id),
                        None => Error::Panicked("a generator thread"),
                    }
                }
                Ok(Err(e)) => e,
                Err(_) => Error::Panicked("a generator thread"),
            })
        }

        pub(super) fn finish(mut self) -> Result<Vec<Finished<A>>, Error> {
            let mut out = Vec::new();
            for h in std::mem::take(&mut self.handles) {
                out.extend(h.join().map_err(|_| Error::Panicked("a generator thread"))??);
            }
            out.sort_by_key(|(i, _)| *i);
            Ok(out.into_iter().map(|(_, f)| f).collect())
        }
    }
}
