//! `peer`: the nullpunch voice client.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use engine::client::{CallReport, Client, ClientConfig, EndReason, Event, Received};
use engine::driver::{self, App, Ctx, Streams};
use engine::wire::frame::{ClientId, ErrorCode};

/// nullpunch voice client: registers with a manager, then calls or answers, and streams RTP
/// media straight to the other peer through the window its null packet opened.
///
/// Exit status: 0 when every call succeeded, 1 when a call failed (the phase that failed is
/// printed on stderr), 2 on a usage, network or manager error.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Manager address (TCP signalling; its UDP port with the same number answers STUN).
    #[arg(long, value_name = "HOST:PORT")]
    manager: String,
    /// This client's id (1-64 bytes, no spaces).
    #[arg(long)]
    id: String,
    /// Local UDP address for media.
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// Print one JSON object per finished call on stdout (instead of a human line).
    #[arg(long, global = true)]
    json: bool,
    /// Send a keepalive null packet after this many seconds without sending (keep under the
    /// routers' conntrack UDP timeout; Linux default 30 s).
    #[arg(long, default_value_t = 15.0, global = true, value_parser = seconds)]
    keepalive_secs: f64,
    /// End a call when nothing arrived from the peer for this many seconds.
    #[arg(long, default_value_t = 35.0, global = true, value_parser = seconds)]
    media_timeout_secs: f64,
    /// Seconds to wait for START (caller) or for the peer's first packet.
    #[arg(long, default_value_t = 5.0, global = true, value_parser = seconds)]
    setup_timeout_secs: f64,
    /// UDP IO: uring (the io_uring driver), portable (tokio + quinn-udp), or auto
    /// (portable for now, see docs/architecture.md; the NULLPUNCH_IO environment
    /// variable overrides auto).
    #[arg(long, default_value = "auto", global = true)]
    io: String,
    /// Pause sending media AT seconds into each call for FOR seconds (keepalive null packets
    /// still go out): tests that an idle path stays open through the firewalls.
    #[arg(long, value_name = "AT,FOR", value_parser = parse_pause, global = true)]
    pause: Option<(f64, f64)>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Register and answer incoming calls: send the null packet, reply PUNCHED, exchange media.
    Listen {
        /// Exit after this many calls have ended.
        #[arg(long)]
        calls: Option<u32>,
        /// Exit after this many seconds (open calls are hung up).
        #[arg(long, value_parser = seconds)]
        duration: Option<f64>,
        /// Do not send the null packet (negative control: the caller's media should then be
        /// dropped by this side's firewall).
        #[arg(long)]
        no_null: bool,
    },
    /// Call CALLEE, wait for START, stream media directly to it, then hang up.
    Call {
        /// The callee's id.
        callee: String,
        /// Seconds of media before hanging up.
        #[arg(long, default_value_t = 10.0, value_parser = seconds)]
        duration: f64,
    },
}

struct PeerApp {
    json: bool,
    role_caller: Option<(ClientId, Duration)>,
    pause: Option<(Duration, Duration)>,
    /// How the manager learned our public address (from REGISTERED).
    local_source: Option<&'static str>,
    calls_left: Option<u32>,
    deadline: Option<Instant>,
    streams: Streams,
    done: bool,
    failed: bool,
    fatal: Option<String>,
}

impl PeerApp {
    fn start_stream(&mut self, now: Instant, handle: engine::client::CallHandle, hangup_at: Option<Instant>) {
        self.streams.start(handle, now, hangup_at);
        if let Some((at, dur)) = self.pause {
            self.streams.pause(handle, now + at, now + at + dur);
        }
    }

    fn report(&mut self, r: &CallReport) {
        let ok = r.succeeded();
        if !ok {
            self.failed = true;
            eprintln!(
                "peer: call {} with {} failed: {} (phase: {}; sent {}, received {})",
                r.call_id.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                r.peer_id,
                r.reason.describe(),
                failed_phase(r),
                r.sent,
                r.received
            );
        }
        if self.json {
            let ms = |d: Option<Duration>| d.map(|d| serde_json::json!(d.as_secs_f64() * 1000.0)).unwrap_or(serde_json::Value::Null);
            let v = serde_json::json!({
                "call_id": r.call_id.map(|c| c.to_string()),
                "role": r.role.as_str(),
                "peer_id": r.peer_id.as_str(),
                "local": r.local.map(|a| a.to_string()),
                "local_source": self.local_source,
                "peer": r.peer.map(|a| a.to_string()),
                "setup_ms": ms(r.setup),
                "first_media_ms": ms(r.first_media),
                "duration_ms": r.duration.as_secs_f64() * 1000.0,
                "sent": r.sent,
                "received": r.received,
                "lost": r.lost,
                "jitter_ms": r.jitter_ms,
                "nulls_sent": r.nulls_sent,
                "nulls_received": r.nulls_received,
                "result": if ok { "ok".to_string() } else { r.reason.describe() },
                "failed_phase": if ok { None } else { Some(failed_phase(r)) },
            });
            println!("{v}");
        } else {
            println!(
                "call {} {} with {} ({} <-> {}): {}; setup {} ms, sent {}, received {}, lost {}, jitter {:.2} ms",
                r.call_id.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                r.role.as_str(),
                r.peer_id,
                r.local.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                r.peer.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                if ok { "ok".to_string() } else { r.reason.describe() },
                r.setup.map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0)).unwrap_or_else(|| "-".into()),
                r.sent,
                r.received,
                r.lost,
                r.jitter_ms
            );
        }
    }
}

/// A duration in seconds: finite, from 10 ms to one day.
fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.01..=86_400.0).contains(&v) {
        return Err(format!("{v} s is outside 0.01 ..= 86400"));
    }
    Ok(v)
}

fn parse_pause(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s.split_once(',').ok_or("expected AT,FOR (seconds)")?;
    let at: f64 = a.trim().parse().map_err(|_| format!("bad AT {a:?}"))?;
    let dur: f64 = b.trim().parse().map_err(|_| format!("bad FOR {b:?}"))?;
    if !(0.0..=86_400.0).contains(&at) || !(0.0..=86_400.0).contains(&dur) {
        return Err("AT and FOR must be within 0 ..= 86400 seconds".into());
    }
    Ok((at, dur))
}

/// The phase that failed, in the words a person debugging a firewall needs: judged from
/// what was sent and received, whichever side's timer ended the call.
fn failed_phase(r: &CallReport) -> &'static str {
    match r.reason {
        EndReason::NoStart => "no START (the callee never answered, or the manager lost it)",
        EndReason::Unknown(_) => "no INCOMING (callee unknown)",
        EndReason::Busy => "no INCOMING (callee busy)",
        EndReason::Rejected(_) => "rejected",
        EndReason::ManagerLost => "manager lost during setup",
        _ if r.received == 0 && r.role == engine::client::Role::Callee && r.nulls_sent == 0 => {
            "no media (no null packet was sent: --no-null)"
        }
        _ if r.received == 0 && r.sent > 0 => "media one way only (sent, nothing came back)",
        _ if r.received == 0 => "no media",
        EndReason::PeerGone => "media stopped",
        _ => "hung up",
    }
}

impl App for PeerApp {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) {
        match event {
            Event::Registered { public, source } => {
                tracing::info!(%public, %source, "registered");
                self.local_source = Some(match source {
                    engine::wire::frame::AddrSource::Stun => "stun",
                    engine::wire::frame::AddrSource::TcpPeer => "tcp-peer",
                });
                if let Some((callee, _)) = &self.role_caller {
                    if ctx.client.active_calls() == 0 && !self.done {
                        if let Err(e) = ctx.client.call(ctx.now, callee.clone()) {
                            self.fatal = Some(format!("cannot call: {e}"));
                            self.done = true;
                        }
                    }
                }
            }
            Event::Started { handle, peer, .. } => {
                tracing::info!(%peer, "START: streaming media to the callee");
                let dur = self.role_caller.as_ref().map(|(_, d)| *d).unwrap_or_default();
                self.start_stream(ctx.now, handle, Some(ctx.now + dur));
            }
            Event::Incoming { caller, caller_addr, .. } => {
                tracing::info!(%caller, %caller_addr, "incoming call: null packet sent, PUNCHED replied");
            }
            Event::MediaFlowing { handle } => {
                tracing::info!("first packet from the peer: path is two-way");
                self.start_stream(ctx.now, handle, None);
            }
            Event::Ended(r) => {
                self.streams.stop(r.handle);
                self.report(&r);
                if self.role_caller.is_some() {
                    self.done = true;
                } else if let Some(n) = self.calls_left.as_mut() {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.done = true;
                    }
                }
            }
            Event::ManagerError { code, message } => {
                eprintln!("peer: manager error {code}: {message}");
                if matches!(code, ErrorCode::Replaced | ErrorCode::Shutdown) && ctx.client.active_calls() == 0 {
                    self.fatal = Some(format!("manager closed the connection: {message}"));
                    self.done = true;
                }
            }
            Event::Discovered { mapped } => match mapped {
                Some(a) => tracing::info!(mapped = %a, "public UDP address discovered by STUN"),
                None => tracing::warn!("no STUN answer from the manager; it will use the TCP peer address"),
            },
            Event::ManagerUnresponsive => tracing::warn!("manager does not answer PING"),
        }
    }

    fn on_media(&mut self, _ctx: &mut Ctx<'_>, _packet: Received<'_>) {}

    fn next_wakeup(&self) -> Option<Instant> {
        self.streams.next_wakeup().into_iter().chain(self.deadline).min()
    }

    fn on_wakeup(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        if self.deadline.is_some_and(|d| now >= d) {
            self.deadline = None;
            ctx.client.hangup_all(now);
            self.done = true;
            return;
        }
        self.streams.run(ctx);
    }

    fn done(&self) -> bool {
        self.done
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let id = match ClientId::new(args.id.clone()) {
        Ok(id) => id,
        Err(_) => {
            eprintln!("peer: invalid id {:?} (1-64 bytes, no spaces or control characters)", args.id);
            return ExitCode::from(2);
        }
    };
    let manager = match args.manager.to_socket_addrs().ok().and_then(|mut a| a.next()) {
        Some(a) => a,
        None => {
            eprintln!("peer: cannot resolve manager address {:?}", args.manager);
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(run(args, id, manager))
}

async fn run(args: Args, id: ClientId, manager: SocketAddr) -> ExitCode {
    let io = match engine::driver::Io::choose(&args.io) {
        Ok(io) => io,
        Err(e) => {
            eprintln!("peer: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(io = io.as_str(), "udp io");
    let udp = match tokio::net::UdpSocket::bind(args.bind).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("peer: cannot bind UDP {}: {e}", args.bind);
            return ExitCode::from(2);
        }
    };
    let local = udp.local_addr().expect("bound socket has an address");
    let mut cfg = ClientConfig::new(id, local.port());
    cfg.stun_server = Some(manager);
    cfg.keepalive_interval = Duration::from_secs_f64(args.keepalive_secs);
    cfg.media_timeout = Duration::from_secs_f64(args.media_timeout_secs);
    cfg.start_timeout = Duration::from_secs_f64(args.setup_timeout_secs);
    cfg.first_media_timeout = Duration::from_secs_f64(args.setup_timeout_secs);
    let now = Instant::now();
    let mut app = PeerApp {
        json: args.json,
        role_caller: None,
        local_source: None,
        pause: args.pause.map(|(a, f)| (Duration::from_secs_f64(a), Duration::from_secs_f64(f))),
        calls_left: None,
        deadline: None,
        streams: Streams::new(now),
        done: false,
        failed: false,
        fatal: None,
    };
    match &args.cmd {
        Cmd::Listen { calls, duration, no_null } => {
            cfg.send_null = !no_null;
            app.calls_left = *calls;
            app.deadline = duration.map(|d| now + Duration::from_secs_f64(d));
        }
        Cmd::Call { callee, duration } => {
            let Ok(callee) = ClientId::new(callee.clone()) else {
                eprintln!("peer: invalid callee id {callee:?}");
                return ExitCode::from(2);
            };
            app.role_caller = Some((callee, Duration::from_secs_f64(*duration)));
        }
    }
    let mut client = Client::new(cfg, engine::rng::Rng::from_entropy().next_u64());
    // Handlers are installed now, before connecting, so an early SIGTERM still ends the
    // calls cleanly.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let shutdown = async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    };
    let (app, result) = match io {
        driver::Io::Portable => {
            let r = driver::run(&mut client, &udp, manager, &mut app, shutdown).await.map(|_| ());
            (app, r)
        }
        #[cfg(target_os = "linux")]
        driver::Io::Uring => {
            // The ring driver runs on a thread of its own; this runtime only waits for the
            // signals and relays them.
            let udp = match udp.into_std() {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("peer: {e}");
                    return ExitCode::from(2);
                }
            };
            let stop = engine::reactor::Stop::new();
            let relay = stop.clone();
            let unit = engine::reactor::Unit { client, udp, app, wake: None, connect_at: None };
            let worker = tokio::task::spawn_blocking(move || {
                engine::reactor::run(vec![unit], manager, Some(&relay), &engine::reactor::ReactorConfig::default())
            });
            tokio::pin!(worker);
            let joined = tokio::select! {
                j = &mut worker => j,
                _ = shutdown => {
                    stop.stop();
                    worker.await
                }
            };
            match joined.expect("reactor thread") {
                Ok(mut done) => {
                    let f = done.pop().expect("one unit");
                    (f.app, f.result.map(|_| ()))
                }
                Err(e) => {
                    eprintln!("peer: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    if let Err(e) = result {
        eprintln!("peer: {e}");
        return ExitCode::from(2);
    }
    if let Some(msg) = app.fatal {
        eprintln!("peer: {msg}");
        return ExitCode::from(2);
    }
    if app.failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
