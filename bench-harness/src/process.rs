//! The server under test when the harness starts it itself
//! (`--server-cmd`), the `--chaos kill:SECONDS` loop, and the measuring
//! of a run from the opening of the gate to the last executor's end.

use crate::common::{CommonArgs, Gate, ServerProbe, ServerUsage};
use crate::live::{Live, Sample};
use anyhow::{bail, Context};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A server process this harness started, restarted after each kill with
/// the same command (and so the same data directory).
pub(crate) struct ServerProcess {
    argv: Vec<String>,
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
    pub(crate) kills: u64,
    /// Longest time from a kill until the server accepted again.
    pub(crate) longest_restart: Duration,
}

impl ServerProcess {
    /// Starts `--server-cmd` when given.
    pub(crate) fn maybe_start(common: &CommonArgs) -> anyhow::Result<Option<ServerProcess>> {
        common
            .server_cmd
            .as_deref()
            .map(|cmd| ServerProcess::start(cmd, common.target.addr()))
            .transpose()
    }

    pub(crate) fn start(cmd: &str, addr: SocketAddr) -> anyhow::Result<ServerProcess> {
        let argv: Vec<String> = cmd.split_whitespace().map(str::to_owned).collect();
        if argv.is_empty() {
            bail!("--server-cmd is empty");
        }
        let log =
            std::env::temp_dir().join(format!("ruyi-bench-server-{}.log", std::process::id()));
        let child = spawn(&argv, &log)?;
        let mut server = ServerProcess {
            argv,
            addr,
            child,
            log,
            kills: 0,
            longest_restart: Duration::ZERO,
        };
        server.wait_ready()?;
        eprintln!(
            "ruyi-bench: started `{cmd}` (pid {}), its output in {}",
            server.pid(),
            server.log.display()
        );
        Ok(server)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the server exited ({status}) before accepting on {}; see {}",
                    self.addr,
                    self.log.display()
                );
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the server did not accept on {} within 60 s; see {}",
                    self.addr,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, then the same command again, waiting until it accepts.
    pub(crate) fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        let killed = Instant::now();
        self.child.kill().context("kill -9 of the server")?;
        self.child.wait().context("reaping the killed server")?;
        self.kills += 1;
        self.child = spawn(&self.argv, &self.log)?;
        self.wait_ready()?;
        self.longest_restart = self.longest_restart.max(killed.elapsed());
        Ok(())
    }
}

fn spawn(argv: &[String], log: &PathBuf) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", argv.join(" ")))
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SIGTERM for a clean shutdown; SIGKILL if it takes too long.
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the main thread saw of a run.
pub(crate) struct Measured {
    pub(crate) measure_from: Instant,
    pub(crate) server: ServerUsage,
    pub(crate) samples: Vec<Sample>,
    pub(crate) kills: u64,
    pub(crate) longest_restart: Duration,
    /// The gateway's latency budget over the measured window (`--metrics`).
    pub(crate) budget: Option<Vec<crate::budget::StageFigures>>,
}

/// Opens the gate once every executor is connected, runs the warm-up and
/// the measured time (killing and restarting the server under `--chaos`),
/// then waits for every executor: their results, in order, or the first
/// error.
pub(crate) fn measure<T: Send + 'static>(
    common: &CommonArgs,
    label: &str,
    gate: &Gate,
    live: &Arc<Live>,
    mut server: Option<&mut ServerProcess>,
    handles: Vec<glommio::ExecutorJoinHandle<anyhow::Result<T>>>,
) -> anyhow::Result<(Vec<T>, Measured)> {
    // Connecting everything may take a while (tens of thousands of
    // connections); an executor that never starts should not hang the run.
    gate.open_when_ready(handles.len(), Duration::from_secs(600))?;
    let started = Instant::now();
    let measure_from = started + Duration::from_secs_f64(common.warmup_s);
    let end = measure_from + Duration::from_secs_f64(common.duration_s);
    live.start_measuring(measure_from);
    let watcher = live.watch(label);
    let pid = server.as_ref().map(|s| s.pid()).or(common.server_pid);
    let mut probe = None;
    let mut next_kill = common.chaos.map(|c| (started + c.kill_every, c.kill_every));
    let mut chaos_error = None;
    let mut budget_before = None;
    while !gate.aborted() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if probe.is_none() && now >= measure_from {
            // Under chaos the pid changes; CPU is not measured then.
            probe = Some(ServerProbe::start(if common.chaos.is_some() {
                None
            } else {
                pid
            }));
            budget_before = scrape_budget(common);
        }
        if let (Some((at, every)), Some(server)) = (next_kill, server.as_deref_mut()) {
            if now >= at {
                eprintln!(
                    "ruyi-bench: chaos: kill -9 of the server (pid {})",
                    server.pid()
                );
                if let Err(error) = server.kill_and_restart() {
                    chaos_error = Some(error);
                    break;
                }
                next_kill = Some((Instant::now() + every, every));
                continue;
            }
        }
        let mut wake = end;
        if probe.is_none() {
            wake = wake.min(measure_from);
        }
        if let Some((at, _)) = next_kill {
            wake = wake.min(at);
        }
        std::thread::sleep(
            wake.saturating_duration_since(now)
                .min(Duration::from_millis(100)),
        );
    }
    let mut usage = probe.map(|p| p.finish()).unwrap_or_default();
    if common.chaos.is_some() {
        // The last process's memory, for what it is worth.
        usage.rss_bytes = server
            .as_ref()
            .and_then(|s| crate::common::resident_bytes(s.pid()));
    }
    let mut results = Vec::with_capacity(handles.len());
    let mut first_error = chaos_error;
    for handle in handles {
        match handle.join() {
            Ok(Ok(result)) => results.push(result),
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(error) => {
                first_error.get_or_insert(anyhow::anyhow!("load executor failed: {error}"));
            }
        }
    }
    let samples = watcher.stop();
    if let Some(error) = first_error {
        return Err(error);
    }
    let budget = budget_before
        .zip(scrape_budget(common))
        .map(|(before, after)| crate::budget::between(&before, &after));
    Ok((
        results,
        Measured {
            measure_from,
            server: usage,
            samples,
            kills: server.as_ref().map_or(0, |s| s.kills),
            longest_restart: server
                .as_ref()
                .map_or(Duration::ZERO, |s| s.longest_restart),
            budget,
        },
    ))
}

/// The gateway's stage histograms now, when `--metrics` names its API (and
/// no chaos restarts it, which would reset them).
fn scrape_budget(common: &CommonArgs) -> Option<crate::budget::Scrape> {
    let api = common.metrics.as_deref()?;
    if common.chaos.is_some() {
        return None;
    }
    match crate::budget::scrape(api, &common.metrics_token) {
        Ok(scrape) => Some(scrape),
        Err(error) => {
            eprintln!("ruyi-bench: reading the latency budget failed: {error:#}");
            None
        }
    }
}
