//! Why a run could not be made or finished. `main` prints an error as `loadgen: {error}`
//! and exits with status 2; a run that finished but missed its goal is not an error (its
//! summary says so, and the exit status is 1).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use proto::wire::frame::ClientId;

/// A run that could not be made or finished.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--secret-file` could not be read or is no usable secret (the message names the path).
    #[error("--secret-file {0}")]
    SecretFile(String),
    /// Flags that do not fit together (the message names them and says what would).
    #[error("{0}")]
    Flags(String),
    /// The run was interrupted where nothing can be reported (before its calls began, or a
    /// comparison with one of its two runs missing); the message says where.
    #[error("interrupted {0}")]
    Interrupted(&'static str),
    /// `--out` cannot hold the run's files: checked before the run starts.
    #[error("--out {}: {reason}", path.display())]
    Out {
        /// The directory asked for.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `setup` was asked for more callers than calls: a caller with no call would end before
    /// the run starts.
    #[error("--callers ({callers}) is more than the calls to place ({calls}); use at most {calls} callers")]
    CallersExceedCalls {
        /// `--callers`.
        callers: usize,
        /// The calls to place.
        calls: u64,
    },
    /// `hostile` against an external manager needs its pid and metrics URL too.
    #[error("an external manager needs all of --manager, --manager-pid and --manager-metrics")]
    IncompleteExternalManager,
    /// `--io` names no driver this machine can run (the driver's own explanation).
    #[error("{0}")]
    IoChoice(String),
    /// `--manager` is no usable address (the message says why).
    #[error("--manager {0}")]
    Resolve(String),
    /// The descriptor limit is too low for the clients.
    #[error("{clients} clients need about {need} file descriptors; RLIMIT_NOFILE is {limit}")]
    Descriptors {
        /// Simulated clients.
        clients: usize,
        /// Descriptors they need.
        need: u64,
        /// The soft RLIMIT_NOFILE in force.
        limit: u64,
    },
    /// On the portable IO, the descriptor limit is too low for `register`'s clients.
    #[error(
        "{clients} clients need about {need} file descriptors ({per} per client{}); RLIMIT_NOFILE is {limit}. Use \
         --io uring (no descriptor per client), or run the manager as its own process and split the clients over \
         several generators with distinct --id-prefix (scripts/register-multi does this), at most {} clients each",
        if *.embedded_end { ", the embedded manager's end included" } else { "" },
        .limit.saturating_sub(64) / 2
    )]
    DescriptorsPerClient {
        /// Simulated clients.
        clients: usize,
        /// Descriptors they need.
        need: u64,
        /// Descriptors per client.
        per: u64,
        /// The embedded manager's end of each connection is counted.
        embedded_end: bool,
        /// The soft RLIMIT_NOFILE in force.
        limit: u64,
    },
    /// On io_uring, `--threads` rings cannot hold `register`'s clients (a ring's file
    /// table holds at most RLIMIT_NOFILE entries, two per client).
    #[error(
        "{clients} clients on {threads} threads need file tables of {entries} entries (two per client); a ring's \
         table holds at most RLIMIT_NOFILE ({limit}): use --threads {need} or more (or 0)"
    )]
    RingTables {
        /// Simulated clients.
        clients: usize,
        /// `--threads`.
        threads: usize,
        /// File-table entries per ring that asks for.
        entries: usize,
        /// The soft RLIMIT_NOFILE in force.
        limit: u64,
        /// Threads that would do.
        need: usize,
    },
    /// The clients need more source addresses than there are, or than IPv6 offers.
    #[error(
        "{clients} clients need {ips} source addresses ({per_ip} ephemeral ports each), and only 127.0.0.0/8 has \
         more than one; use --bind-ip 127.0.0.1"
    )]
    SourcesNotIpv4 {
        /// Simulated clients.
        clients: usize,
        /// Source addresses they need.
        ips: usize,
        /// Clients one address holds.
        per_ip: usize,
    },
    /// The clients need source addresses beyond 127.0.0.0/8.
    #[error(
        "{clients} clients need {ips} source addresses ({per_ip} ephemeral ports each) from {base}; spreading works \
         over 127.0.0.0/8 only"
    )]
    SourcesBeyondLoopback {
        /// Simulated clients.
        clients: usize,
        /// Source addresses they need.
        ips: usize,
        /// Clients one address holds.
        per_ip: usize,
        /// `--bind-ip`.
        base: IpAddr,
    },
    /// A client's UDP socket found no free port on its address.
    #[error(
        "bind {ip}: {source}: no ephemeral port left on {ip} (ip_local_port_range gives {ports}); spread the clients \
         over more addresses with --source-ips N"
    )]
    NoEphemeralPort {
        /// The client's address.
        ip: IpAddr,
        /// The bind error.
        source: std::io::Error,
        /// Ephemeral ports an address offers.
        ports: usize,
    },
    /// A client's UDP socket could not be bound.
    #[error("bind {ip}: {source}")]
    Bind {
        /// The client's address.
        ip: IpAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// A bound socket could not be set up (non-blocking mode, runtime registration, address).
    #[error("socket: {0}")]
    Socket(std::io::Error),
    /// A client id is not a valid id.
    #[error("client id {id:?}: {source}")]
    ClientId {
        /// The id.
        id: String,
        /// Why it is not valid.
        source: proto::wire::frame::FrameError,
    },
    /// The embedded manager did not start.
    #[error("cannot start the embedded manager: {0}")]
    ManagerStart(std::io::Error),
    /// The tokio runtime could not be built.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    /// An eventfd to wake a client on io_uring could not be made.
    #[error("eventfd: {0}")]
    Eventfd(std::io::Error),
    /// A thread could not be started.
    #[error("thread {name}: {source}")]
    Thread {
        /// The thread's name.
        name: String,
        /// The spawn error.
        source: std::io::Error,
    },
    /// A thread of the generator panicked.
    #[error("{0} panicked")]
    Panicked(&'static str),
    /// A client's task ended abnormally (panicked or was cancelled).
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
    /// A client's driver stopped: its first connection failed, or its socket did.
    #[error(transparent)]
    Driver(#[from] engine::driver::DriverError),
    /// A client's driver stopped, as it reported while others go on (an io_uring thread
    /// hosts many clients); the message is the driver's error.
    #[error("{message}")]
    ClientFailed {
        /// The client (None: the generator thread that hosted it).
        id: Option<ClientId>,
        /// The driver's error.
        message: String,
    },
    /// A client stopped, without an error, before the run started.
    #[error("client {0} stopped before the run started")]
    StoppedEarly(ClientId),
    /// The manager refused a registration (ERROR Unauthorized).
    #[error(
        "the manager refused registration ({0}); a manager with --secret-file needs loadgen --secret-file with the \
         same secret"
    )]
    Refused(String),
    /// Not every client registered in time.
    #[error("only {registered} of {total} clients registered within 30 s")]
    RegistrationTimeout {
        /// Clients registered.
        registered: usize,
        /// Clients in the run.
        total: usize,
    },
    /// The live metrics endpoint (`--metrics`) could not be served.
    #[error("--metrics {addr}: {source}")]
    MetricsServe {
        /// The address asked for.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// An external manager's metrics URL is not `http://HOST:PORT/PATH`.
    #[error("{0}: expected http://HOST:PORT/metrics")]
    MetricsUrl(String),
    /// An external manager's metrics could not be fetched.
    #[error("{url}: {source}")]
    MetricsFetch {
        /// The URL.
        url: String,
        /// The error.
        source: std::io::Error,
    },
    /// An external manager's counters were asked for without its metrics URL.
    #[error("the external manager's counters need its metrics URL (--manager-metrics)")]
    NoManagerMetrics,
    /// The Opus codec refused (a frame size it does not take, or libopus).
    #[error(transparent)]
    Codec(#[from] voice::codec::CodecError),
    /// The audio call carried no audio to measure.
    #[error("the call carried no audio ({0})")]
    NoAudio(String),
    /// No chirp was found in the audio the callee played.
    #[error("no chirp was found in the played audio ({sent} sent)")]
    NoChirp {
        /// Chirps spoken.
        sent: u64,
    },
    /// A file of a run could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file of a recorded run could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A recorded run's `summary.json` is not JSON.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A recorded run's `.hlog` file is not a histogram log we can read.
    #[error("{path}: {reason}")]
    BadLog {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Histograms could not be added (they all share one range, so this is a bug).
    #[error("{what}: {source:?}")]
    Histogram {
        /// The metric or file.
        what: String,
        /// The error.
        source: hdrhistogram::AdditionError,
    },
    /// A recorded run has no `.hlog` file to re-read.
    #[error("{0}: no .hlog files (runs recorded before they were written cannot be re-read)")]
    NoHistograms(PathBuf),
    /// `merge` was given fewer than two runs.
    #[error("merge needs at least two runs")]
    MergeTooFew,
    /// `merge` was given runs of different scenarios.
    #[error("cannot merge {dir} (a {scenario} run) with {first_dir} (a {first} run): merge runs of one scenario")]
    MergeMixed {
        /// The run that differs.
        dir: PathBuf,
        /// Its scenario.
        scenario: String,
        /// The first run.
        first_dir: PathBuf,
        /// The first run's scenario.
        first: String,
    },
    /// `merge` was given the same run twice.
    #[error("{again} is the same run as {first}: merge distinct runs (a run given twice would count twice)")]
    MergeSameRun {
        /// The run as first given.
        first: PathBuf,
        /// The same run, given again.
        again: PathBuf,
    },
    /// `merge --out` names one of the runs to merge.
    #[error("--out {0} is one of the runs to merge: write the merged run elsewhere")]
    MergeIntoRun(PathBuf),
    /// The runs to merge have no `.hlog` metric in common.
    #[error("the runs share no .hlog metric")]
    MergeNothingShared,
}

impl Error {
    /// A write error for `path`.
    pub fn write(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Write { path, source }
    }
}
