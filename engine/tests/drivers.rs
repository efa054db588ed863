//! Both IO drivers against a real manager on loopback: the tokio driver
//! ([`engine::driver::run`], portable) and the thread-per-core io_uring driver
//! ([`engine::reactor::run`]). Each test runs once per driver with the same assertions.
//! Every wait is bounded in time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::driver::{self, App, Ctx, DriverCounters, Io, Managers, Streams};
use proto::client::{CallReport, Client, ClientConfig, Event, Received};
use proto::wire::frame::ClientId;

/// What a test sees of a running client, from its own thread.
#[derive(Default)]
struct Progress {
    registrations: AtomicU64,
    call_requests: AtomicU64,
    media_rx: AtomicU64,
    /// Media packets received per call (by local handle).
    per_call: Mutex<std::collections::HashMap<u32, u64>>,
    started: AtomicU64,
    reports: Mutex<Vec<CallReport>>,
    /// The manager of the last registration ([`Ctx::manager`]).
    registered_with: Mutex<Option<SocketAddr>>,
}

/// Places a call to `callee` whenever the test raises `Progress::call_requests` (checked
/// every 10 ms), and at once on registration if `call_on_register`; streams media on every
/// call until stopped.
struct TestApp {
    callee: Option<ClientId>,
    call_on_register: bool,
    placed: u64,
    next_check: Instant,
    streams: Streams,
    p: Arc<Progress>,
}

impl TestApp {
    fn new(callee: Option<&str>, call_on_register: bool, p: Arc<Progress>) -> Self {
        TestApp {
            callee: callee.map(|c| ClientId::new(c).unwrap()),
            call_on_register,
            placed: 0,
            next_check: Instant::now(),
            streams: Streams::new(Instant::now()),
            p,
        }
    }
}

impl App for TestApp {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) {
        match event {
            Event::Registered { .. } => {
                *self.p.registered_with.lock().unwrap() = Some(ctx.manager());
                self.p.registrations.fetch_add(1, Ordering::SeqCst);
                if self.call_on_register && self.placed == 0 {
                    self.p.call_requests.store(1, Ordering::SeqCst);
                    self.on_wakeup(ctx);
                }
            }
            Event::Started { handle, .. } => {
                self.p.started.fetch_add(1, Ordering::SeqCst);
                self.streams.start(handle, ctx.now, None);
            }
            Event::MediaFlowing { handle } => self.streams.start(handle, ctx.now, None),
            Event::Ended(r) => {
                self.streams.stop(r.handle);
                self.p.reports.lock().unwrap().push(*r);
            }
            _ => {}
        }
    }
    fn on_media(&mut self, _ctx: &mut Ctx<'_>, p: Received<'_>) {
        self.p.media_rx.fetch_add(1, Ordering::SeqCst);
        *self.p.per_call.lock().unwrap().entry(p.handle.0).or_default() += 1;
    }
    fn next_wakeup(&self) -> Option<Instant> {
        let check = self.callee.is_some().then_some(self.next_check);
        self.streams.next_wakeup().into_iter().chain(check).min()
    }
    fn on_wakeup(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(c) = &self.callee {
            self.next_check = ctx.now + Duration::from_millis(10);
            while self.placed < self.p.call_requests.load(Ordering::SeqCst) && ctx.client.is_registered() {
                self.placed += 1;
                ctx.client.call(ctx.now, c.clone()).expect("call placed");
            }
        }
        self.streams.run(ctx);
    }
    fn done(&self) -> bool {
        false
    }
}

/// A client running on its own thread with the chosen driver.
struct Running {
    p: Arc<Progress>,
    stop_flag: Arc<AtomicBool>,
    stop: Arc<engine::reactor::Stop>,
    thread: std::thread::JoinHandle<Result<DriverCounters, String>>,
}

impl Running {
    fn stop(self) -> (Result<DriverCounters, String>, Arc<Progress>) {
        self.stop_flag.store(true, Ordering::SeqCst);
        self.stop.stop();
        (self.thread.join().expect("driver thread"), self.p)
    }
}

fn spawn(io: Io, id: &str, manager: SocketAddr, callee: Option<&str>) -> Running {
    spawn_with(io, id, manager, callee, 4)
}

fn spawn_with(io: Io, id: &str, manager: SocketAddr, callee: Option<&str>, max_calls: u16) -> Running {
    spawn_managers(io, id, manager.into(), callee, max_calls)
}

/// A client given `managers` (its STUN server the first of them, as `peer` does).
fn spawn_managers(io: Io, id: &str, managers: Managers, callee: Option<&str>, max_calls: u16) -> Running {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = ClientConfig::new(ClientId::new(id).unwrap(), udp.local_addr().unwrap().port());
    cfg.stun_server = Some(managers.get(0));
    cfg.max_calls = max_calls;
    // Each client its own seed: equal seeds give equal STUN transaction ids, and clients
    // registering at the same moment would then take each other's bindings.
    let client = Client::new(cfg, engine::entropy::seed());
    let p = Arc::new(Progress::default());
    let app = TestApp::new(callee, callee.is_some(), p.clone());
    run_client(io, client, udp, app, managers, p)
}

/// Run `client` with `app` on `udp` on a driver thread of its own, until stopped.
fn run_client(
    io: Io,
    client: Client,
    udp: std::net::UdpSocket,
    app: TestApp,
    managers: Managers,
    p: Arc<Progress>,
) -> Running {
    let stop_flag = Arc::new(AtomicBool::new(false));
    let stop = engine::reactor::Stop::new();
    let (flag, st) = (stop_flag.clone(), stop.clone());
    let thread = std::thread::spawn(move || match io {
        Io::Portable => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let udp = tokio::net::UdpSocket::from_std({
                    udp.set_nonblocking(true).unwrap();
                    udp
                })
                .unwrap();
                let (mut client, mut app) = (client, app);
                let shutdown = async move {
                    while !flag.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                };
                driver::run(&mut client, &udp, managers, &mut app, shutdown).await.map_err(|e| e.to_string())
            })
        }
        Io::Uring => {
            let first_manager = managers.first();
            let unit =
                engine::reactor::Unit { client, udp, app, wake: None, connect_at: None, tls: None, first_manager };
            let mut done = engine::reactor::run(vec![unit], managers, Some(&st), &Default::default())
                .map_err(|e| e.to_string())?;
            done.pop().unwrap().result.map_err(|e| e.to_string())
        }
    });
    Running { p, stop_flag, stop, thread }
}

fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn wait_until(what: &str, limit: Duration, cond: impl FnMut() -> bool) {
    assert!(wait_for(limit, cond), "timed out waiting for {what}");
}

fn manager_on(addr: SocketAddr) -> manager::ManagerHandle {
    manager::start(manager::ManagerConfig { listen: addr, shards: 2, ..Default::default() }).expect("manager starts")
}

fn both(test: fn(Io)) {
    test(Io::Portable);
    test(Io::Uring);
}

/// The manager dies mid-call: media keeps flowing (the path is direct), both clients
/// reconnect and re-register when it comes back, and a new call then works.
fn survives_a_manager_restart(io: Io) {
    let m1 = manager_on("127.0.0.1:0".parse().unwrap());
    let addr = m1.local_addr();
    let bob = spawn(io, "bob", addr, None);
    wait_until("bob registered", Duration::from_secs(5), || bob.p.registrations.load(Ordering::SeqCst) == 1);
    let alice = spawn(io, "alice", addr, Some("bob"));
    wait_until("media both ways", Duration::from_secs(5), || {
        alice.p.media_rx.load(Ordering::SeqCst) > 20 && bob.p.media_rx.load(Ordering::SeqCst) > 20
    });
    m1.shutdown();
    let (a0, b0) = (alice.p.media_rx.load(Ordering::SeqCst), bob.p.media_rx.load(Ordering::SeqCst));
    std::thread::sleep(Duration::from_millis(600));
    let (a1, b1) = (alice.p.media_rx.load(Ordering::SeqCst), bob.p.media_rx.load(Ordering::SeqCst));
    // 600 ms at 50 packets/s: about 30 each way, without a manager.
    assert!(a1 - a0 >= 20 && b1 - b0 >= 20, "{io:?}: media stopped with the manager: alice {a0}->{a1}, bob {b0}->{b1}");
    let _m2 = manager_on(addr);
    wait_until("both re-registered", Duration::from_secs(15), || {
        alice.p.registrations.load(Ordering::SeqCst) == 2 && bob.p.registrations.load(Ordering::SeqCst) == 2
    });
    // A new call is set up through the new manager.
    alice.p.call_requests.store(2, Ordering::SeqCst);
    let ok = wait_for(Duration::from_secs(5), || alice.p.started.load(Ordering::SeqCst) == 2);
    assert!(ok, "{io:?}: the second call did not start: {:?}", alice.p.reports.lock().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let (ra, pa) = alice.stop();
    let (rb, pb) = bob.stop();
    let (ca, cb) = (ra.expect("alice's driver"), rb.expect("bob's driver"));
    assert_eq!((ca.connects, ca.disconnects), (2, 1), "{io:?}: alice {ca:?}");
    assert_eq!((cb.connects, cb.disconnects), (2, 1), "{io:?}: bob {cb:?}");
    let reports = pa.reports.lock().unwrap();
    assert_eq!(reports.len(), 2, "{io:?}: {reports:?}");
    for r in reports.iter() {
        assert!(r.succeeded() && r.received > 5 && r.sent > 5, "{io:?}: {r:?}");
    }
    // The first call lived through the outage: it carried media from before to after.
    // (Alice's count at the end of the outage, `a1`, was all the first call's.)
    let first = reports.iter().max_by_key(|r| r.received).unwrap();
    assert!(first.received >= a1, "{io:?}: alice had {a1} packets of the first call by the outage's end: {first:?}");
    assert_eq!(pb.reports.lock().unwrap().len(), 2, "{io:?}");
}

#[test]
fn a_call_survives_a_manager_restart_and_clients_re_register() {
    both(survives_a_manager_restart);
}

/// The manager is killed in the middle of 100 calls (10 callers with 10 calls each, to 10
/// callees): media keeps flowing in every one of them, all 20 clients re-register within
/// seconds of the manager coming back, and new calls then succeed.
fn survives_a_manager_kill_during_100_calls(io: Io) {
    let m1 = manager_on("127.0.0.1:0".parse().unwrap());
    let addr = m1.local_addr();
    let callees: Vec<Running> = (0..10).map(|i| spawn_with(io, &format!("callee-{i}"), addr, None, 16)).collect();
    wait_until("callees registered", Duration::from_secs(10), || {
        callees.iter().all(|c| c.p.registrations.load(Ordering::SeqCst) == 1)
    });
    let callers: Vec<Running> =
        (0..10).map(|i| spawn_with(io, &format!("caller-{i}"), addr, Some(&format!("callee-{i}")), 16)).collect();
    // Each caller places its first call on registering; then nine more.
    wait_until("callers registered", Duration::from_secs(10), || {
        callers.iter().all(|c| c.p.registrations.load(Ordering::SeqCst) == 1)
    });
    for c in &callers {
        c.p.call_requests.store(10, Ordering::SeqCst);
    }
    let all_flowing =
        |rs: &[Running]| rs.iter().all(|c| c.p.per_call.lock().unwrap().values().filter(|&&n| n > 5).count() == 10);
    let ok = wait_for(Duration::from_secs(15), || all_flowing(&callers) && all_flowing(&callees));
    assert!(
        ok,
        "{io:?}: 100 calls with media both ways: callers started {:?}, per call {:?}; callees {:?}",
        callers.iter().map(|c| c.p.started.load(Ordering::SeqCst)).collect::<Vec<_>>(),
        callers.iter().map(|c| c.p.per_call.lock().unwrap().len()).collect::<Vec<_>>(),
        callees.iter().map(|c| c.p.per_call.lock().unwrap().len()).collect::<Vec<_>>()
    );
    let snapshot = |rs: &[Running]| -> Vec<std::collections::HashMap<u32, u64>> {
        rs.iter().map(|c| c.p.per_call.lock().unwrap().clone()).collect()
    };
    let before = (snapshot(&callers), snapshot(&callees));

    m1.shutdown();
    std::thread::sleep(Duration::from_secs(1));
    let after = (snapshot(&callers), snapshot(&callees));
    // One second without a manager, 50 packets/s: every call kept going, both ways.
    for (side, b, a) in [("caller", &before.0, &after.0), ("callee", &before.1, &after.1)] {
        for (i, (b, a)) in b.iter().zip(a.iter()).enumerate() {
            for (h, n0) in b {
                let n1 = a.get(h).copied().unwrap_or(0);
                // 50 expected; at least 10 shows the call kept flowing (a loaded machine stalls).
                assert!(n1 >= n0 + 10, "{io:?}: {side} {i} call {h}: {n0} -> {n1} packets while the manager was down");
            }
        }
    }
    let restarted = Instant::now();
    let _m2 = manager_on(addr);
    wait_until("all 20 clients re-registered", Duration::from_secs(15), || {
        callers.iter().chain(&callees).all(|c| c.p.registrations.load(Ordering::SeqCst) == 2)
    });
    let took = restarted.elapsed();
    // Backoff doubles from 200 ms to 5 s; the outage was about a second.
    assert!(took < Duration::from_secs(8), "{io:?}: re-registration took {took:?}");
    for c in &callers {
        c.p.call_requests.store(11, Ordering::SeqCst);
    }
    let ok = wait_for(Duration::from_secs(10), || callers.iter().all(|c| c.p.started.load(Ordering::SeqCst) == 11));
    assert!(ok, "{io:?}: not every new call started");
    std::thread::sleep(Duration::from_millis(300));
    for c in callers {
        let (r, p) = c.stop();
        let counters = r.expect("caller's driver");
        assert_eq!((counters.connects, counters.disconnects), (2, 1), "{io:?}: {counters:?}");
        let reports = p.reports.lock().unwrap();
        assert_eq!(reports.len(), 11, "{io:?}");
        assert!(reports.iter().all(|r| r.succeeded()), "{io:?}: {reports:?}");
    }
    for c in callees {
        let (r, p) = c.stop();
        let counters = r.expect("callee's driver");
        assert_eq!((counters.connects, counters.disconnects), (2, 1), "{io:?}: {counters:?}");
        let reports = p.reports.lock().unwrap();
        assert_eq!(reports.len(), 11, "{io:?}: the ten calls through the outage and the one after");
        // Every call carried media; the ones still up when its caller stopped (hung up with
        // reason Shutdown) ended that way, the rest when this callee stopped.
        let shutdown = proto::client::EndReason::RemoteHangup(proto::wire::frame::HangupReason::Shutdown);
        assert!(
            reports.iter().all(|r| (r.succeeded() || r.reason == shutdown) && r.received > 5),
            "{io:?}: {reports:?}"
        );
    }
    eprintln!("{io:?}: all clients re-registered {took:?} after the manager came back");
}

#[test]
fn the_manager_killed_during_100_calls_breaks_none_of_them() {
    both(survives_a_manager_kill_during_100_calls);
}

fn unreachable_manager_is_an_error(io: Io) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let t = Instant::now();
    let r = spawn(io, "lonely", SocketAddr::from(([127, 0, 0, 1], port)), None);
    let res = r.thread.join().unwrap();
    let e = res.expect_err("no manager");
    assert!(e.contains("unreachable"), "{io:?}: {e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{io:?}");
}

#[test]
fn an_unreachable_manager_is_an_error_at_once() {
    both(unreachable_manager_is_an_error);
}

/// Two managers, both clients of a call given the list [A, B] and registered with A. A
/// dies mid-call: the call's media goes on (the path is direct), both clients register
/// with B within 5 s (the next in the list, after a pause of 50-250 ms), and a new call is
/// set up through B.
fn fails_over_to_the_next_manager(io: Io) {
    let ma = manager_on("127.0.0.1:0".parse().unwrap());
    let mb = manager_on("127.0.0.1:0".parse().unwrap());
    let (a, b) = (ma.local_addr(), mb.local_addr());
    let list = Managers::new(vec![a, b], 0);
    let bob = spawn_managers(io, "bob", list.clone(), None, 4);
    wait_until("bob registered", Duration::from_secs(5), || bob.p.registrations.load(Ordering::SeqCst) == 1);
    let alice = spawn_managers(io, "alice", list, Some("bob"), 4);
    wait_until("media both ways", Duration::from_secs(5), || {
        alice.p.media_rx.load(Ordering::SeqCst) > 20 && bob.p.media_rx.load(Ordering::SeqCst) > 20
    });
    for c in [&alice, &bob] {
        assert_eq!(*c.p.registered_with.lock().unwrap(), Some(a), "{io:?}: registered with the first manager");
    }
    let on_b = || mb.stats().registrations.load(Ordering::Relaxed);
    assert_eq!(on_b(), 0, "{io:?}");
    let (a0, b0) = (alice.p.media_rx.load(Ordering::SeqCst), bob.p.media_rx.load(Ordering::SeqCst));
    let killed = Instant::now();
    ma.shutdown();
    let moved =
        |c: &Running| c.p.registrations.load(Ordering::SeqCst) == 2 && *c.p.registered_with.lock().unwrap() == Some(b);
    let ok = wait_for(Duration::from_secs(5), || moved(&alice) && moved(&bob));
    let took = killed.elapsed();
    assert!(
        ok,
        "{io:?}: not both registered with B within 5 s: alice {:?}, bob {:?}",
        alice.p.registered_with.lock().unwrap(),
        bob.p.registered_with.lock().unwrap()
    );
    assert_eq!(on_b(), 2, "{io:?}: B registered both");
    // The call went on meanwhile: at 50 packets/s, some packets each way since the kill.
    wait_until("media after the failover", Duration::from_secs(3), || {
        alice.p.media_rx.load(Ordering::SeqCst) >= a0 + 10 && bob.p.media_rx.load(Ordering::SeqCst) >= b0 + 10
    });
    // A new call is set up through B.
    alice.p.call_requests.store(2, Ordering::SeqCst);
    let ok = wait_for(Duration::from_secs(5), || alice.p.started.load(Ordering::SeqCst) == 2);
    assert!(ok, "{io:?}: the call through B did not start: {:?}", alice.p.reports.lock().unwrap());
    assert!(mb.stats().calls_started.load(Ordering::Relaxed) >= 1, "{io:?}");
    std::thread::sleep(Duration::from_millis(200));
    let (ra, pa) = alice.stop();
    let (rb, _) = bob.stop();
    let (ca, cb) = (ra.expect("alice's driver"), rb.expect("bob's driver"));
    for (who, c) in [("alice", &ca), ("bob", &cb)] {
        assert_eq!((c.connects, c.disconnects, c.failovers), (2, 1, 1), "{io:?}: {who} {c:?}");
    }
    let reports = pa.reports.lock().unwrap();
    assert_eq!(reports.len(), 2, "{io:?}: {reports:?}");
    // The first call lived through the failover: it carried media from before to after.
    let first = reports.iter().max_by_key(|r| r.received).unwrap();
    assert!(first.received > a0 + 10, "{io:?}: {first:?}");
    eprintln!("{io:?}: both clients registered with the second manager {took:?} after the first died");
}

#[test]
fn a_client_given_two_managers_fails_over_when_its_manager_dies() {
    both(fails_over_to_the_next_manager);
}

/// A client whose first connection finds none of its managers fails at once, naming each.
fn no_manager_of_the_list_is_an_error_naming_each(io: Io) {
    let dead = || {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        SocketAddr::from(([127, 0, 0, 1], port))
    };
    let (a, b) = (dead(), dead());
    let t = Instant::now();
    let r = spawn_managers(io, "lonely", Managers::new(vec![a, b], 1), None, 4);
    let e = r.thread.join().unwrap().expect_err("no manager");
    assert!(e.starts_with("no manager could be reached"), "{io:?}: {e}");
    // In the order tried: from the start index, B then A.
    let (ib, ia) = (e.find(&format!("manager {b} unreachable")), e.find(&format!("manager {a} unreachable")));
    assert!(ib.is_some() && ia.is_some() && ib < ia, "{io:?}: {e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{io:?}");
}

#[test]
fn a_client_that_reaches_none_of_its_managers_is_an_error_naming_each() {
    both(no_manager_of_the_list_is_an_error_naming_each);
}

/// The io_uring driver's reason to be: many clients on one thread and one ring. 24 callers
/// call 24 callees; every call carries media both ways; a stop ends every call with HANGUP.
#[test]
fn one_ring_thread_runs_many_clients() {
    let m = manager_on("127.0.0.1:0".parse().unwrap());
    let addr = m.local_addr();
    let n = 24;
    let mut units = Vec::new();
    let mut progress = Vec::new();
    for i in 0..2 * n {
        let (id, callee) = if i < n {
            (format!("callee-{i}"), None)
        } else {
            (format!("caller-{i}"), Some(format!("callee-{}", i - n)))
        };
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut cfg = ClientConfig::new(ClientId::new(id).unwrap(), udp.local_addr().unwrap().port());
        cfg.stun_server = Some(addr);
        let p = Arc::new(Progress::default());
        progress.push(p.clone());
        // Callers call when the test says, once every callee is registered.
        let app = TestApp::new(callee.as_deref(), false, p);
        units.push(engine::reactor::Unit {
            client: Client::new(cfg, i as u64),
            udp,
            app,
            wake: None,
            connect_at: None,
            tls: None,
            first_manager: 0,
        });
    }
    let stop = engine::reactor::Stop::new();
    let st = stop.clone();
    let t = std::thread::spawn(move || engine::reactor::run(units, addr, Some(&st), &Default::default()));
    wait_until("every client registered", Duration::from_secs(10), || {
        progress.iter().all(|p| p.registrations.load(Ordering::SeqCst) == 1)
    });
    for p in &progress[n..] {
        p.call_requests.store(1, Ordering::SeqCst);
    }
    let ok = wait_for(Duration::from_secs(10), || progress.iter().all(|p| p.media_rx.load(Ordering::SeqCst) >= 10));
    let status: Vec<_> = progress
        .iter()
        .map(|p| {
            (p.media_rx.load(Ordering::SeqCst), p.reports.lock().unwrap().iter().map(|r| r.reason).collect::<Vec<_>>())
        })
        .collect();
    assert!(ok, "media did not flow on every call, both ways: {status:?}");
    stop.stop();
    let done = t.join().unwrap().expect("ring set up");
    assert_eq!(done.len(), 2 * n);
    for (i, f) in done.iter().enumerate() {
        let c = f.result.as_ref().expect("no driver error");
        assert_eq!((c.connects, c.disconnects), (1, 0), "unit {i}");
    }
    // Every call ended once on each side; the side that stopped first hung up, the other
    // got its HANGUP (or hung up itself in the same stop).
    for p in &progress {
        let r = p.reports.lock().unwrap();
        assert_eq!(r.len(), 1);
        assert!(r[0].succeeded(), "{:?}", r[0]);
    }
    assert_eq!(m.stats().udp_media.load(Ordering::Relaxed), 0, "the manager never sees media");
}

/// The io_uring driver keeps its clients' sockets in the ring's file table (direct
/// descriptors), each socket moved there as it is added: a thousand registered clients
/// (two thousand sockets) hold no descriptor of the process, and their connections are
/// all open at the manager.
#[test]
fn ring_clients_hold_no_descriptors_of_the_process() {
    // A ring's table holds at most RLIMIT_NOFILE entries, two per client.
    let nofile = manager::raise_nofile() as usize;
    let n = 1000.min(nofile / 2 - 16);
    // The manager on io_uring too (whatever NULLPUNCH_IO says), so that its ends of the
    // connections are not the process's descriptors either.
    let listen = "127.0.0.1:0".parse().unwrap();
    let m = manager::start(manager::ManagerConfig { listen, shards: 2, io: Io::Uring, ..Default::default() })
        .expect("manager starts");
    let addr = m.local_addr();
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = fds();
    let progress: Vec<Arc<Progress>> = (0..n).map(|_| Arc::new(Progress::default())).collect();
    let stop = engine::reactor::Stop::new();
    let (st, ps) = (stop.clone(), progress.clone());
    let t = std::thread::spawn(move || {
        let cfg = engine::reactor::ReactorConfig { recv_buffers: 1024, send_slots: 1024, ..Default::default() };
        let mut r = engine::reactor::Reactor::new(n, addr, Some(&st), &cfg)?;
        for (i, p) in ps.into_iter().enumerate() {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut c = ClientConfig::new(ClientId::new(format!("fd-{i}")).unwrap(), udp.local_addr().unwrap().port());
            c.stun_server = Some(addr);
            let app = TestApp::new(None, false, p);
            r.add(engine::reactor::Unit {
                client: Client::new(c, i as u64),
                udp,
                app,
                wake: None,
                connect_at: None,
                tls: None,
                first_manager: 0,
            })?;
        }
        r.run()
    });
    wait_until("every client registered", Duration::from_secs(30), || {
        progress.iter().all(|p| p.registrations.load(Ordering::SeqCst) == 1)
    });
    let during = fds();
    let s = m.stats();
    let open = s.connections_accepted.load(Ordering::Relaxed) - s.connections_closed.load(Ordering::Relaxed);
    stop.stop();
    let done = t.join().unwrap().expect("ring set up");
    assert_eq!(done.len(), n);
    assert_eq!(open, n as u64, "every client's connection is open at the manager");
    // Other tests of this binary open and close sockets meanwhile: a margin, far below the
    // 2 * n that descriptors would cost.
    assert!(during < before + n / 4, "{n} clients: {before} descriptors before, {during} with all registered");
}

/// A ring's file table holds at most RLIMIT_NOFILE entries (two per unit): a reactor asked
/// for more units than that fails at once and says what to do.
#[test]
fn a_reactor_larger_than_its_file_table_allows_fails_with_the_reason() {
    // Soft limit raised to the hard one first, so no other test raises it meanwhile.
    let nofile = manager::raise_nofile() as usize;
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let r = engine::reactor::Reactor::<TestApp>::new(nofile / 2 + 1, addr, None, &Default::default());
    let e = r.err().expect("a table over RLIMIT_NOFILE is refused").to_string();
    assert!(e.contains("RLIMIT_NOFILE") && e.contains("more reactor threads"), "{e}");
    // Half of it is fine.
    assert!(engine::reactor::Reactor::<TestApp>::new(nofile / 2, addr, None, &Default::default()).is_ok());
}

/// The callee's null packets leave before the PUNCHED frames that follow them. A manager
/// (played by the test) sends a batch of INCOMINGs in one write; when the PUNCHEDs arrive,
/// every one of those calls' null packets must already be in the caller's socket (loopback
/// delivers a datagram within its send). Otherwise the caller's first packet, sent on the
/// START that PUNCHED brings about, can open the caller's firewall ahead of the null.
fn nulls_leave_before_punched(io: Io) {
    use proto::wire::demux::{classify, DatagramKind};
    use proto::wire::frame::{AddrSource, CallId, Frame, FrameDecoder};
    use std::io::{Read, Write};
    const CALLS: u64 = 100;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let caller = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    caller.set_nonblocking(true).unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = ClientConfig::new(ClientId::new("bob").unwrap(), udp.local_addr().unwrap().port());
    cfg.max_calls = CALLS as u16 + 1;
    let client = Client::new(cfg, 7);
    let p = Arc::new(Progress::default());
    let app = TestApp::new(None, false, p.clone());
    let running = run_client(io, client, udp, app, listener.local_addr().unwrap().into(), p.clone());
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (mut dec, mut buf) = (FrameDecoder::new(), vec![0u8; 64 * 1024]);
    let mut next = |conn: &mut std::net::TcpStream| -> Frame {
        loop {
            if let Some(f) = dec.next_frame().unwrap() {
                return f;
            }
            let n = conn.read(&mut buf).expect("a frame from the client within 5 s");
            assert!(n > 0, "the client closed its connection");
            dec.push(&buf[..n]);
        }
    };
    let Frame::Register { .. } = next(&mut conn) else { panic!("REGISTER first") };
    let mut out = Vec::new();
    Frame::Registered { public: udp_addr_of(&conn), source: AddrSource::TcpPeer }.encode(&mut out);
    conn.write_all(&out).unwrap();
    wait_until("registration", Duration::from_secs(5), || p.registrations.load(Ordering::SeqCst) == 1);
    out.clear();
    for i in 1..=CALLS {
        let caller_id = ClientId::new(format!("alice{i}")).unwrap();
        Frame::Incoming {
            call_id: CallId(i),
            token: 1000 + i,
            caller: caller_id,
            caller_addr: caller.local_addr().unwrap(),
            caller_nat: proto::nat::NatClass::Unknown,
            caller_candidates: Vec::new(),
            caller_keys: Some(Box::new(
                proto::e2e::HandPeer::offer(&[i as u8; 32], &[proto::e2e::SUITE_AES_128_GCM]).share().clone(),
            )),
        }
        .encode(&mut out);
    }
    conn.write_all(&out).unwrap();
    let (mut punched, mut nulls, mut worst) = (0u64, 0u64, 0i64);
    let mut dgram = [0u8; 2048];
    while punched < CALLS {
        match next(&mut conn) {
            Frame::Punched { .. } => punched += 1,
            Frame::Ping { .. } => continue,
            other => panic!("unexpected frame {other:?}"),
        }
        while let Ok((n, _)) = caller.recv_from(&mut dgram) {
            if classify(&dgram[..n]) == DatagramKind::Null {
                nulls += 1;
            }
        }
        worst = worst.max(punched as i64 - nulls as i64);
    }
    drop(conn);
    // (The test's manager went away; the driver reconnects to its listener meanwhile.)
    let (r, _) = running.stop();
    r.unwrap_or_else(|e| panic!("{io:?}: the driver failed: {e}"));
    assert_eq!(worst, 0, "{io:?}: PUNCHED frames arrived up to {worst} ahead of their null packets ({nulls} nulls for {punched} PUNCHEDs)");
}

/// The address the test's manager reports to the client: its TCP peer's IP and port.
fn udp_addr_of(conn: &std::net::TcpStream) -> SocketAddr {
    conn.peer_addr().unwrap()
}

#[test]
fn null_packets_leave_before_their_punched_frames() {
    both(nulls_leave_before_punched);
}
