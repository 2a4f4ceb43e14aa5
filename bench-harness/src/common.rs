//! What every scenario shares: the start gate, the server probe (CPU and
//! resident memory from /proc), latency percentiles, and a tiny blocking
//! HTTP client for the admin API.

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub(crate) fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub(crate) fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

pub(crate) fn print_latency(label: &str, h: &Histogram<u64>) {
    println!(
        "  {label} us: p50 {} p90 {} p99 {} p99.9 {} max {}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
}

/// Executors connect everything first, then all start sending together:
/// each `arrive`s (also when connecting failed, so nobody waits forever);
/// the main thread waits for all of them and opens the gate.
#[derive(Default)]
pub(crate) struct Gate {
    ready: AtomicUsize,
    go: AtomicBool,
    abort: AtomicBool,
}

impl Gate {
    pub(crate) fn arrive(&self, ok: bool) {
        if !ok {
            self.abort.store(true, Ordering::SeqCst);
        }
        self.ready.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }

    /// On an executor: waits for the gate to open; false when the run is
    /// aborted.
    pub(crate) async fn wait(&self) -> bool {
        while !self.go.load(Ordering::SeqCst) {
            if self.aborted() {
                return false;
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        !self.aborted()
    }

    /// On the main thread: waits until `executors` arrived, then opens.
    /// An executor that never arrives (its io_uring could not be set up,
    /// say) aborts the run after `patience` instead of hanging it.
    pub(crate) fn open_when_ready(
        &self,
        executors: usize,
        patience: Duration,
    ) -> anyhow::Result<()> {
        let give_up = Instant::now() + patience;
        while self.ready.load(Ordering::SeqCst) < executors {
            if Instant::now() > give_up {
                self.abort.store(true, Ordering::SeqCst);
                bail!(
                    "{} of {executors} load executors were ready after {} s; one did not start \
                     (glommio needs io_uring and locked memory: see `ulimit -l`)",
                    self.ready.load(Ordering::SeqCst),
                    patience.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.go.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The gateway's CPU time and resident memory, read from /proc when it
/// runs on this machine (`--server-pid`).
pub(crate) struct ServerProbe {
    pid: Option<u32>,
    ticks: Option<u64>,
    own_ticks: Option<u64>,
    at: Instant,
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'. The first field there is the 3rd (state); utime is the
    // 14th and stime the 15th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub(crate) fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn clock_ticks_per_second() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(ticks as u64)
}

/// What the probe measured over an interval.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ServerUsage {
    /// 100 = one core busy for the whole interval.
    pub(crate) cpu_percent: Option<f64>,
    pub(crate) rss_bytes: Option<u64>,
    /// This load generator's own CPU over the same interval (100 = one
    /// core): when it nears the cores it has, it is the limit.
    pub(crate) generator_cpu_percent: Option<f64>,
}

impl ServerProbe {
    pub(crate) fn start(pid: Option<u32>) -> ServerProbe {
        if let Some(pid) = pid {
            if cpu_ticks(pid).is_none() {
                eprintln!("ruyi-bench: cannot read /proc/{pid}/stat; server CPU unknown");
            }
        }
        ServerProbe {
            pid,
            ticks: pid.and_then(cpu_ticks),
            own_ticks: cpu_ticks(std::process::id()),
            at: Instant::now(),
        }
    }

    pub(crate) fn finish(&self) -> ServerUsage {
        let elapsed = self.at.elapsed().as_secs_f64();
        let percent = |before: Option<u64>, after: Option<u64>| match (
            before,
            after,
            clock_ticks_per_second(),
        ) {
            (Some(before), Some(after), Some(hz)) if elapsed > 0.0 => {
                Some(after.saturating_sub(before) as f64 / hz as f64 / elapsed * 100.0)
            }
            _ => None,
        };
        let generator_cpu_percent = percent(self.own_ticks, cpu_ticks(std::process::id()));
        let Some(pid) = self.pid else {
            return ServerUsage {
                generator_cpu_percent,
                ..ServerUsage::default()
            };
        };
        ServerUsage {
            cpu_percent: percent(self.ticks, cpu_ticks(pid)),
            rss_bytes: resident_bytes(pid),
            generator_cpu_percent,
        }
    }
}

impl ServerUsage {
    pub(crate) fn print(&self) {
        if let Some(cpu) = self.generator_cpu_percent {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            println!(
                "  load generator: CPU {cpu:.0}% of {cores} cores' {}%",
                cores * 100
            );
        }
        if self.cpu_percent.is_none() && self.rss_bytes.is_none() {
            return;
        }
        let cpu = self
            .cpu_percent
            .map_or("unknown".to_owned(), |c| format!("{c:.0}%"));
        let rss = self.rss_bytes.map_or("unknown".to_owned(), |r| {
            format!("{:.1} MiB", r as f64 / 1048576.0)
        });
        println!("  server: CPU {cpu} (100% = one core), resident memory {rss}");
    }
}

/// A blocking HTTP/1.1 POST of a JSON body to `api` (`http://host:port`,
/// optionally with a base path) + `path`; the status code and body.
pub(crate) fn http_post(
    api: &str,
    token: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    http_request("POST", api, token, path, body)
}

/// A blocking HTTP/1.1 GET of `api` + `path`; the status code and body.
pub(crate) fn http_get(api: &str, token: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_request("GET", api, token, path, "")
}

fn http_request(
    method: &str,
    api: &str,
    token: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let Some(rest) = api.strip_prefix("http://") else {
        bail!("--api must be an http:// URL, not {api}");
    };
    let (authority, base) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {api}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let request = format!(
        "{method} {base}{path} HTTP/1.1\r\nHost: {authority}\r\ntoken: {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading the answer of {api}{path}"))?;
    let response = String::from_utf8_lossy(&response);
    let status: u16 = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{api}{path} answered without an HTTP status line"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    Ok((status, body))
}

/// Where the load goes: `ruyi://ADDR` (the default scheme), `ws://ADDR`,
/// `wk://ADDR`, `mqtt://ADDR` or `nats://ADDR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Ruyi(SocketAddr),
    /// ruyi's WebSocket listener (`ws.listen`, path `/`): the same load
    /// and accounting as `ruyi://`, over WebSocket binary messages.
    Ws(SocketAddr),
    /// ruyi's WKProto listener (`wkproto.listen`): the same load and
    /// accounting in WuKongIM's protocol, through the gateway's translator.
    Wk(SocketAddr),
    Mqtt(SocketAddr),
    Nats(SocketAddr),
}

/// How a harness connection to ruyi carries its frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wire {
    /// ruyi's protocol on the socket.
    Native,
    /// ruyi's protocol in WebSocket binary messages.
    WebSocket,
    /// WuKongIM's protocol, translated by the gateway.
    Wkproto,
}

impl Target {
    pub(crate) fn addr(&self) -> SocketAddr {
        match *self {
            Target::Ruyi(a) | Target::Ws(a) | Target::Wk(a) | Target::Mqtt(a) | Target::Nats(a) => {
                a
            }
        }
    }

    /// The gateway's address and how to speak to it, for ruyi's own
    /// listeners.
    pub(crate) fn ruyi(&self) -> Option<(SocketAddr, Wire)> {
        match *self {
            Target::Ruyi(a) => Some((a, Wire::Native)),
            Target::Ws(a) => Some((a, Wire::WebSocket)),
            Target::Wk(a) => Some((a, Wire::Wkproto)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Ruyi(a) => write!(f, "ruyi://{a}"),
            Target::Ws(a) => write!(f, "ws://{a}"),
            Target::Wk(a) => write!(f, "wk://{a}"),
            Target::Mqtt(a) => write!(f, "mqtt://{a}"),
            Target::Nats(a) => write!(f, "nats://{a}"),
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Target, String> {
        let (scheme, rest) = text.split_once("://").unwrap_or(("ruyi", text));
        let addr = rest
            .trim_end_matches('/')
            .to_socket_addrs()
            .map_err(|e| format!("{rest}: {e}"))?
            .next()
            .ok_or_else(|| format!("{rest} resolves to nothing"))?;
        match scheme {
            "ruyi" => Ok(Target::Ruyi(addr)),
            "ws" => Ok(Target::Ws(addr)),
            "wk" => Ok(Target::Wk(addr)),
            "mqtt" => Ok(Target::Mqtt(addr)),
            "nats" => Ok(Target::Nats(addr)),
            other => Err(format!(
                "unknown scheme {other}://; targets are ruyi://, ws://, wk://, mqtt:// and nats://"
            )),
        }
    }
}

/// `--chaos kill:SECONDS`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Chaos {
    pub(crate) kill_every: Duration,
}

impl std::str::FromStr for Chaos {
    type Err = String;

    fn from_str(text: &str) -> Result<Chaos, String> {
        let seconds = text
            .strip_prefix("kill:")
            .ok_or_else(|| format!("{text}: chaos is `kill:SECONDS`"))?;
        let seconds: f64 = seconds
            .parse()
            .map_err(|_| format!("{text}: `{seconds}` is not a number of seconds"))?;
        if !(0.5..=86_400.0).contains(&seconds) {
            return Err(format!(
                "{text}: kill at most every 0.5 s and at least once a day"
            ));
        }
        Ok(Chaos {
            kill_every: Duration::from_secs_f64(seconds),
        })
    }
}

/// The flags every message scenario (chat, group, mixed) takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Where to send: `ruyi://ADDR` (or just ADDR), `mqtt://ADDR`
    /// (QoS 1, persistent sessions) or `nats://ADDR` (JetStream, file
    /// storage).
    #[arg(
        long = "target",
        alias = "server",
        default_value = "ruyi://127.0.0.1:5100"
    )]
    pub(crate) target: Target,
    /// HS256 secret of the gateway, to sign the bench users' tokens (empty
    /// when the gateway runs with auth off).
    #[arg(long, env = "RUYI_AUTH_SECRET", default_value = "")]
    pub(crate) secret: String,
    /// How long to send, in seconds, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration_s: f64,
    /// Seconds of load before measuring: sends and deliveries in it are
    /// checked for correctness but left out of the rates and latencies.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) warmup_s: f64,
    /// Sends per second over all senders, paced (open loop); without it
    /// every sender sends as fast as its window allows. Latencies count
    /// from when a send was due, so a stalled server is not hidden.
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Payload size in bytes (at least 16: the send time and the sender's
    /// counter travel in it).
    #[arg(long, default_value_t = 64)]
    pub(crate) payload_bytes: usize,
    /// Load-generating executors (default: one per CPU).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Prefix of the bench users' uids and channels, so runs do not share
    /// channels (default: the scenario's name).
    #[arg(long)]
    pub(crate) uid_prefix: Option<String>,
    /// The server's process id, to report its CPU use and resident memory.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Start the server with this command (split at spaces, no quoting)
    /// and stop it at the end; its pid is measured.
    #[arg(long)]
    pub(crate) server_cmd: Option<String>,
    /// `kill:SECONDS`: kill -9 the server (started with --server-cmd) every
    /// SECONDS during the load and start it again; clients reconnect and
    /// resume, and correctness must still hold.
    #[arg(long, requires = "server_cmd")]
    pub(crate) chaos: Option<Chaos>,
    /// Write every figure as JSON here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Draw the latency distributions and throughput over time here (SVG).
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// The gateway's admin API (`http://host:port`): its latency budget
    /// (`ruyi_message_stage_seconds` in `/metrics`) over the measured
    /// window goes into the report.
    #[arg(long)]
    pub(crate) metrics: Option<String>,
    /// The admin API's token, for `--metrics`.
    #[arg(long, env = "RUYI_API_TOKEN", default_value = "")]
    pub(crate) metrics_token: String,
}

impl CommonArgs {
    pub(crate) fn threads(&self, tasks: usize) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .clamp(1, tasks.max(1))
    }

    pub(crate) fn prefix(&self, scenario: &str) -> String {
        self.uid_prefix
            .clone()
            .unwrap_or_else(|| format!("bench-{scenario}"))
    }

    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.payload_bytes < 16 {
            bail!("--payload-bytes must be at least 16");
        }
        // A day at most: beyond that a Duration overflows soon enough.
        let seconds = 0.0..=86_400.0;
        if !(self.duration_s > 0.0 && seconds.contains(&self.duration_s)) {
            bail!("--duration-s must be above 0 and at most 86400");
        }
        if !seconds.contains(&self.warmup_s) {
            bail!("--warmup-s must be between 0 and 86400");
        }
        if self.rate.is_some_and(|r| !(0.001..=1e9).contains(&r)) {
            bail!("--rate must be between 0.001 and 1000000000 sends per second");
        }
        Ok(())
    }

    /// The time between two sends of one of `senders` senders under
    /// `--rate`.
    pub(crate) fn send_interval(&self, senders: usize) -> Option<Duration> {
        self.rate
            .map(|rate| Duration::from_secs_f64(senders.max(1) as f64 / rate))
    }
}

/// Where the gateway's admin HTTP API is, for scenarios that create groups
/// (ruyi only).
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The gateway's admin HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:5001")]
    pub(crate) api: String,
    /// The admin API's token (`[api] token`).
    #[arg(long, env = "RUYI_API_TOKEN", default_value = "")]
    pub(crate) api_token: String,
}

/// Where in its `--rate` interval a sender starts: a fixed point per sender
/// (from its name), so senders do not all send in the same instant.
pub(crate) fn stagger(name: &str, interval: Option<Duration>) -> Duration {
    interval.map_or(Duration::ZERO, |interval| {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(name, &mut hasher);
        interval.mul_f64((std::hash::Hasher::finish(&hasher) % 1000) as f64 / 1000.0)
    })
}
