//! The `mixed` scenario: one-to-one conversations, group fan-out and idle
//! connections against the same server at the same time, each measured
//! and checked as in its own scenario, with their sum.

use crate::chat::{ChatArgs, Conn, PairConfig};
use crate::common::{ApiArgs, CommonArgs, Target};
use crate::group::GroupArgs;
use crate::process::ServerProcess;
use crate::report::Report;
use anyhow::bail;
use glommio::{LocalExecutorBuilder, Placement};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct MixedArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    /// One-to-one conversations.
    #[arg(long, default_value_t = 50)]
    pub(crate) pairs: usize,
    /// Sends each chat sender keeps in flight.
    #[arg(long, default_value_t = 1)]
    pub(crate) chat_window: usize,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Groups.
    #[arg(long, default_value_t = 5)]
    pub(crate) groups: usize,
    /// Members of each group.
    #[arg(long, default_value_t = 100)]
    pub(crate) members: usize,
    #[arg(long, default_value_t = 1)]
    pub(crate) senders_per_group: usize,
    #[arg(long, default_value_t = 50.0)]
    pub(crate) online_percent: f64,
    /// Sends each group sender keeps in flight.
    #[arg(long, default_value_t = 1)]
    pub(crate) group_window: usize,
    #[arg(long, default_value_t = 1)]
    pub(crate) devices_per_user: usize,
    /// Idle connections held open meanwhile (ruyi only).
    #[arg(long, default_value_t = 1000)]
    pub(crate) idle: usize,
}

/// `FILE.svg` -> `FILE-chat.svg`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or("plot".into(), |s| s.to_string_lossy());
    let ext = path
        .extension()
        .map_or("svg".into(), |s| s.to_string_lossy());
    path.with_file_name(format!("{stem}-{suffix}.{ext}"))
}

/// Holds `count` idle connections until `release`.
fn hold_idle(
    common: &CommonArgs,
    addr: std::net::SocketAddr,
    count: usize,
    release: Arc<AtomicBool>,
) -> anyhow::Result<glommio::ExecutorJoinHandle<anyhow::Result<usize>>> {
    let config = PairConfig::new(common, addr, "mixed-idle", 1);
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("bench-idle")
        .spawn(move || async move {
            let mut held = Vec::with_capacity(count);
            for i in 0..count {
                held.push(Conn::open(&config, &format!("{}-{i}", config.prefix)).await?);
            }
            while !release.load(Ordering::SeqCst) {
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            Ok(held.len())
        })
        .map_err(|e| anyhow::anyhow!("starting the idle executor: {e}"))
}

pub fn run(args: &MixedArgs) -> anyhow::Result<bool> {
    let common = &args.common;
    common.check()?;
    if common.chaos.is_some() {
        bail!("--chaos is for chat and group; mixed runs two loads that would both restart the server");
    }
    let mut server = ServerProcess::maybe_start(common)?;
    let prefix = common.prefix("mixed");
    // The server is started here once; the parts measure it by pid. A
    // --rate is the whole run's: each part sends half of it.
    let part_common = |name: &str, threads: usize| CommonArgs {
        uid_prefix: Some(format!("{prefix}-{name}")),
        server_cmd: None,
        server_pid: server.as_ref().map(|s| s.pid()).or(common.server_pid),
        threads: Some(threads),
        rate: common.rate.map(|r| r / 2.0),
        json: None,
        plot: None,
        ..common.clone()
    };
    let threads = common.threads(usize::MAX);
    let chat_threads = threads.div_ceil(2);
    let group_threads = (threads / 2).max(1);
    let chat = ChatArgs {
        common: part_common("chat", chat_threads),
        pairs: args.pairs,
        window: args.chat_window,
        devices_per_user: args.devices_per_user,
    };
    let group = GroupArgs {
        common: part_common("group", group_threads),
        api: args.api.clone(),
        groups: args.groups,
        members: args.members,
        senders_per_group: args.senders_per_group,
        online_percent: args.online_percent,
        window: args.group_window,
        devices_per_user: args.devices_per_user,
    };
    let release = Arc::new(AtomicBool::new(false));
    let idle = match common.target {
        Target::Ruyi(addr) if args.idle > 0 => Some(hold_idle(
            &part_common("idle", 1),
            addr,
            args.idle,
            Arc::clone(&release),
        )?),
        Target::Ruyi(_) | Target::Ws(_) | Target::Wk(_) => None,
        _ if args.idle > 0 => {
            bail!("--idle is for ruyi targets (use the connect scenario for peers)")
        }
        _ => None,
    };
    let (chat_report, group_report) = std::thread::scope(|s| {
        let chat = s.spawn(|| crate::chat::run(&chat));
        let group = s.spawn(|| crate::group::run(&group));
        (
            chat.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the chat part panicked"))),
            group
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the group part panicked"))),
        )
    });
    release.store(true, Ordering::SeqCst);
    let idle_held = match idle {
        Some(handle) => handle
            .join()
            .map_err(|e| anyhow::anyhow!("idle executor failed: {e}"))??,
        None => 0,
    };
    drop(server.take());
    let (chat_report, group_report) = (chat_report?, group_report?);
    println!("mixed: {idle_held} idle connections held throughout");
    chat_report.print_summary();
    group_report.print_summary();
    let correct = chat_report.correct() && group_report.correct();
    let json = combined_json(&chat_report, &group_report, idle_held, correct);
    let mut ok = crate::write_json(common.json.as_deref(), &json);
    if let Some(path) = &common.plot {
        for (report, suffix) in [(&chat_report, "chat"), (&group_report, "group")] {
            let path = with_suffix(path, suffix);
            if let Err(error) = crate::plot::draw(report, &path) {
                eprintln!("ruyi-bench: cannot draw {}: {error:#}", path.display());
                ok = false;
            }
        }
    }
    println!(
        "mixed: {:.0} acked sends/s and {:.0} deliveries/s in all -> {}",
        json["sends_per_s"].as_f64().unwrap_or(0.0),
        json["deliveries_per_s"].as_f64().unwrap_or(0.0),
        if correct { "OK" } else { "FAILED" }
    );
    Ok(ok && correct)
}

/// The parts' own reports, and their sums under the usual field names.
fn combined_json(chat: &Report, group: &Report, idle: usize, correct: bool) -> serde_json::Value {
    let (c, g) = (chat.to_json(), group.to_json());
    let sum = |key: &str| c[key].as_f64().unwrap_or(0.0) + g[key].as_f64().unwrap_or(0.0);
    let count = |key: &str| c[key].as_u64().unwrap_or(0) + g[key].as_u64().unwrap_or(0);
    serde_json::json!({
        "scenario": "mixed",
        "target": chat.target,
        "duration_s": c["duration_s"],
        "sent": count("sent"),
        "acked": count("acked"),
        "failed": count("failed"),
        "delivered": count("delivered"),
        "redelivered": count("redelivered"),
        "lost": count("lost"),
        "duplicated": count("duplicated"),
        "reordered": count("reordered"),
        "unexpected": count("unexpected"),
        "correct": correct,
        "sends_per_s": sum("sends_per_s"),
        "deliveries_per_s": sum("deliveries_per_s"),
        "ack_latency_us": { "chat": c["ack_latency_us"], "group": g["ack_latency_us"] },
        "delivery_latency_us": { "chat": c["delivery_latency_us"], "group": g["delivery_latency_us"] },
        "server_rss_bytes": g["server_rss_bytes"],
        "server_cpu_percent": c["server_cpu_percent"],
        "idle_connections": idle,
        "chat": c,
        "group": g,
    })
}
