//! What every scenario shares: the start gate, the server probe (CPU and
//! resident memory from /proc), latency percentiles, and a tiny blocking
//! HTTP client for the admin API.

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
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
    pub(crate) fn open_when_ready(&self, executors: usize) {
        while self.ready.load(Ordering::SeqCst) < executors {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.go.store(true, Ordering::SeqCst);
    }
}

/// The gateway's CPU time and resident memory, read from /proc when it
/// runs on this machine (`--server-pid`).
pub(crate) struct ServerProbe {
    pid: Option<u32>,
    ticks: Option<u64>,
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
            at: Instant::now(),
        }
    }

    pub(crate) fn finish(&self) -> ServerUsage {
        let Some(pid) = self.pid else {
            return ServerUsage::default();
        };
        let elapsed = self.at.elapsed().as_secs_f64();
        let cpu_percent = match (self.ticks, cpu_ticks(pid), clock_ticks_per_second()) {
            (Some(before), Some(after), Some(hz)) if elapsed > 0.0 => {
                Some(after.saturating_sub(before) as f64 / hz as f64 / elapsed * 100.0)
            }
            _ => None,
        };
        ServerUsage {
            cpu_percent,
            rss_bytes: resident_bytes(pid),
        }
    }
}

impl ServerUsage {
    pub(crate) fn print(&self) {
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
        "POST {base}{path} HTTP/1.1\r\nHost: {authority}\r\ntoken: {token}\r\n\
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
