//! The `connect` scenario: a connection storm, then N idle connections held.
//! Reports how long the connections took to set up and, when the gateway is
//! local (`--server-pid`), its resident memory per held connection.

use crate::chat::{Conn, PairConfig};
use crate::common::{resident_bytes, ServerProbe, Target};
use anyhow::bail;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    /// Where to connect: `ruyi://ADDR` (or just ADDR), `mqtt://ADDR`,
    /// `nats://ADDR`.
    #[arg(
        long = "target",
        alias = "server",
        default_value = "ruyi://127.0.0.1:5100"
    )]
    pub(crate) target: Target,
    #[arg(long, env = "RUYI_AUTH_SECRET", default_value = "")]
    pub secret: String,
    /// Connections to open and hold (mind `ulimit -n` on both sides).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// How long to hold them once all are open, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub hold_s: f64,
    /// The gateway's process id, to read its resident memory from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value = "bench-conn")]
    pub uid_prefix: String,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: &ConnectArgs) -> anyhow::Result<serde_json::Value> {
    let Target::Ruyi(server_addr) = args.target else {
        return crate::peer::connect(args);
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, args.connections.max(1));
    let rss_before = args.server_pid.and_then(resident_bytes);
    let probe = ServerProbe::start(args.server_pid);
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<usize>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Arc::new(std::sync::Mutex::new(release_rx));
    let started = Instant::now();
    let mut handles = Vec::new();
    for thread in 0..threads {
        let ids: Vec<usize> = (thread..args.connections).step_by(threads).collect();
        let config = PairConfig {
            wire: crate::common::Wire::Native,
            server: server_addr,
            secret: args.secret.clone(),
            window: 1,
            payload_bytes: 8,
            prefix: args.uid_prefix.clone(),
            duration: Duration::ZERO,
            reconnect: false,
            run_id: 0,
        };
        let opened_tx = opened_tx.clone();
        let release_rx = std::sync::Arc::clone(&release_rx);
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("bench-connect-{thread}"))
            .spawn(move || async move {
                let mut setup = Histogram::<u64>::new(3).expect("valid sigfig");
                let mut held = Vec::with_capacity(ids.len());
                for id in ids {
                    let at = Instant::now();
                    let conn = Conn::open(&config, &format!("{}-{id}", config.prefix)).await?;
                    let _ = setup.record(at.elapsed().as_micros() as u64);
                    held.push(conn);
                }
                let _ = opened_tx.send(held.len());
                // Hold every connection until told to let go.
                loop {
                    let released = release_rx
                        .lock()
                        .map(|rx| rx.try_recv().is_ok())
                        .unwrap_or(true);
                    if released {
                        break;
                    }
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
                drop(held);
                Ok::<_, anyhow::Error>(setup)
            })
            .map_err(|e| anyhow::anyhow!("starting a load executor: {e}"))?;
        handles.push(handle);
    }
    drop(opened_tx);
    let mut opened = 0;
    for _ in 0..threads {
        match opened_rx.recv() {
            Ok(n) => opened += n,
            Err(_) => break,
        }
    }
    let setup_s = started.elapsed().as_secs_f64();
    let holding = ServerProbe::start(args.server_pid);
    std::thread::sleep(Duration::from_secs_f64(args.hold_s));
    let rss_held = args.server_pid.and_then(resident_bytes);
    // CPU over the storm and the hold, and over the hold alone.
    let server = probe.finish();
    let held = holding.finish();
    let duration_s = started.elapsed().as_secs_f64();
    for _ in 0..threads {
        let _ = release_tx.send(());
    }
    let mut setup = Histogram::<u64>::new(3).expect("valid sigfig");
    for handle in handles {
        let part = handle
            .join()
            .map_err(|e| anyhow::anyhow!("load executor failed: {e}"))??;
        let _ = setup.add(&part);
    }
    report(
        args,
        &Measured {
            opened,
            setup_s,
            duration_s,
            setup,
            rss_before,
            rss_held,
            server,
            held,
        },
    )
}

/// What a connect run measured, whatever the target.
pub(crate) struct Measured {
    pub(crate) opened: usize,
    pub(crate) setup_s: f64,
    pub(crate) duration_s: f64,
    pub(crate) setup: Histogram<u64>,
    pub(crate) rss_before: Option<u64>,
    pub(crate) rss_held: Option<u64>,
    pub(crate) server: crate::common::ServerUsage,
    /// Over the hold only: what idle connections cost.
    pub(crate) held: crate::common::ServerUsage,
}

/// Prints the summary and makes the JSON of a connect run (ruyi's or a
/// peer's); an error when not every connection opened.
pub(crate) fn report(args: &ConnectArgs, m: &Measured) -> anyhow::Result<serde_json::Value> {
    let Measured {
        opened,
        setup_s,
        duration_s,
        ref setup,
        rss_before,
        rss_held,
        server,
        held,
    } = *m;
    if opened < args.connections {
        bail!("only {opened} of {} connections opened", args.connections);
    }
    let per_connection = match (rss_before, rss_held) {
        (Some(before), Some(held)) => Some(held.saturating_sub(before) / opened.max(1) as u64),
        _ => None,
    };
    // The fields every scenario has; connect sends no messages.
    let report = serde_json::json!({
        "scenario": "connect",
        "target": args.target.to_string(),
        "duration_s": duration_s,
        "sent": 0,
        "acked": 0,
        "delivered": 0,
        "lost": 0,
        "duplicated": 0,
        "reordered": 0,
        "unexpected": 0,
        "sends_per_s": 0.0,
        "deliveries_per_s": 0.0,
        "ack_latency_us": null,
        "delivery_latency_us": null,
        "server_cpu_percent": server.cpu_percent,
        "server_cpu_percent_idle": held.cpu_percent,
        "connections": opened,
        "setup_s": setup_s,
        "connections_per_s": opened as f64 / setup_s,
        "setup_latency_us": crate::common::percentiles(setup),
        "server_rss_bytes_before": rss_before,
        "server_rss_bytes": rss_held,
        "server_rss_bytes_per_connection": per_connection,
    });
    println!(
        "connect: {opened} connections to {} in {setup_s:.2} s ({:.0}/s), setup p50 {} us p99 {} us",
        args.target,
        opened as f64 / setup_s,
        setup.value_at_quantile(0.5),
        setup.value_at_quantile(0.99)
    );
    if let (Some(before), Some(held), Some(per)) = (rss_before, rss_held, per_connection) {
        println!(
            "  server resident memory: {before} -> {held} bytes, {per} bytes per held connection"
        );
    }
    server.print();
    if let Some(idle) = held.cpu_percent {
        println!("  server CPU while the connections were held idle: {idle:.1}%");
    }
    Ok(report)
}
