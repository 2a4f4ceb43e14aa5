//! The `group` scenario: fan-out. `groups` groups of `members` members each
//! are created through the admin HTTP API; `online_percent` of each group's
//! members connect (at least its senders), `senders_per_group` of them send
//! with a window, and every online member's device must receive every
//! acknowledged message of its group exactly once, in seq order (the
//! sending device excepted: the gateway does not echo a send to it).

use crate::chat::{Conn, PairConfig, Part, Spans};
use crate::common::{http_post, unix_us, Gate, ServerProbe, ServerUsage};
use anyhow::{bail, Context};
use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use ruyi::client::{Event, Outgoing};
use ruyi::protocol::{ChannelType, ReasonCode};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct GroupArgs {
    /// Gateway address.
    #[arg(long, default_value = "127.0.0.1:5100")]
    pub server: SocketAddr,
    /// HS256 secret of the gateway, to sign the bench users' tokens (empty
    /// when the gateway runs with auth off).
    #[arg(long, env = "RUYI_AUTH_SECRET", default_value = "")]
    pub secret: String,
    /// The gateway's admin HTTP API, to create the groups.
    #[arg(long, default_value = "http://127.0.0.1:5001")]
    pub api: String,
    /// The admin API's token (`[api] token`).
    #[arg(long, env = "RUYI_API_TOKEN", default_value = "")]
    pub api_token: String,
    /// Number of groups.
    #[arg(long, default_value_t = 10)]
    pub groups: usize,
    /// Members of each group.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Members of each group that send (they are always online).
    #[arg(long, default_value_t = 1)]
    pub senders_per_group: usize,
    /// Percentage of each group's members connected (rounded up, at least
    /// the senders); the others are offline members the gateway still
    /// stores for.
    #[arg(long, default_value_t = 50.0)]
    pub online_percent: f64,
    /// Sends each sender keeps in flight.
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Payload size in bytes (at least 8: the send time travels in it).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Load-generating executors (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prefix of the bench users' uids and the groups' ids.
    #[arg(long, default_value = "bench-group")]
    pub uid_prefix: String,
    /// The gateway's process id, to report its CPU use and resident memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write every figure as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub struct Report {
    args: String,
    target: String,
    spans: Spans,
    online: usize,
    expected_deliveries: u64,
    total: Part,
    server: ServerUsage,
}

impl Report {
    pub fn correct(&self) -> bool {
        self.total.correct()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut json = self
            .total
            .to_json("group", &self.target, &self.spans, &self.server);
        json["args"] = serde_json::Value::from(self.args.clone());
        json["online_connections"] = serde_json::Value::from(self.online);
        json["expected_deliveries"] = serde_json::Value::from(self.expected_deliveries);
        json
    }

    pub fn print_summary(&self) {
        println!("group: {} against {}", self.args, self.target);
        println!(
            "  {} online member devices; {} deliveries expected (acked x online members but the sender)",
            self.online, self.expected_deliveries
        );
        self.total.print_summary(&self.spans, &self.server);
    }
}

/// One online member device.
#[derive(Clone, Copy, Debug)]
struct Member {
    group: usize,
    member: usize,
    sender: bool,
}

/// What one device saw and, for a sender, had acknowledged.
struct MemberResult {
    member: Member,
    acked_seqs: Vec<u64>,
    /// Seqs of its group's messages from other members, in arrival order.
    delivered: Vec<u64>,
}

struct Shared {
    config: PairConfig,
    gate: Gate,
    /// Senders still sending, over all executors: receivers stop once this
    /// is 0 and nothing arrived for the grace period.
    sending: AtomicUsize,
}

fn uid(prefix: &str, group: usize, member: usize) -> String {
    format!("{prefix}-g{group}-m{member}")
}

fn channel(prefix: &str, group: usize) -> String {
    format!("{prefix}-g{group}")
}

fn create_groups(args: &GroupArgs) -> anyhow::Result<()> {
    for group in 0..args.groups {
        let subscribers: Vec<String> = (0..args.members)
            .map(|m| uid(&args.uid_prefix, group, m))
            .collect();
        let body = serde_json::json!({
            "channel_id": channel(&args.uid_prefix, group),
            "channel_type": 2,
            "subscribers": subscribers,
            "reset": 1,
        });
        let (status, answer) = http_post(&args.api, &args.api_token, "/channel", &body.to_string())
            .with_context(|| format!("creating group {group}"))?;
        if status != 200 {
            bail!(
                "creating group {group}: {} answered {status}: {answer}",
                args.api
            );
        }
    }
    Ok(())
}

pub fn run(args: &GroupArgs) -> anyhow::Result<Report> {
    if args.payload_bytes < 8 {
        bail!("--payload-bytes must be at least 8");
    }
    if args.groups == 0 || args.members < 2 {
        bail!("--groups must be at least 1 and --members at least 2");
    }
    if args.senders_per_group == 0 || args.senders_per_group > args.members {
        bail!("--senders-per-group must be between 1 and --members");
    }
    if !(0.0..=100.0).contains(&args.online_percent) {
        bail!("--online-percent must be between 0 and 100");
    }
    let online_per_group = ((args.members as f64 * args.online_percent / 100.0).ceil() as usize)
        .clamp(args.senders_per_group, args.members);
    let online = args.groups * online_per_group;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, online);

    let created = Instant::now();
    create_groups(args)?;
    eprintln!(
        "ruyi-bench: created {} groups of {} in {:.2} s; connecting {online} devices",
        args.groups,
        args.members,
        created.elapsed().as_secs_f64()
    );

    // Online devices, spread over the executors member by member, so a
    // group's fan-out crosses executors (and the gateway's shards).
    let mut per_thread: Vec<Vec<Member>> = vec![Vec::new(); threads];
    let mut k = 0;
    for group in 0..args.groups {
        for member in 0..online_per_group {
            per_thread[k % threads].push(Member {
                group,
                member,
                sender: member < args.senders_per_group,
            });
            k += 1;
        }
    }
    let duration = Duration::from_secs_f64(args.duration_s);
    let shared = Arc::new(Shared {
        config: PairConfig {
            server: args.server,
            secret: args.secret.clone(),
            window: args.window.max(1),
            payload_bytes: args.payload_bytes,
            prefix: args.uid_prefix.clone(),
            duration,
        },
        gate: Gate::default(),
        sending: AtomicUsize::new(args.groups * args.senders_per_group),
    });
    let mut handles = Vec::new();
    for (thread, members) in per_thread.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("bench-group-{thread}"))
            .spawn(move || async move { run_members(shared, members).await })
            .map_err(|e| anyhow::anyhow!("starting a load executor: {e}"))?;
        handles.push(handle);
    }
    shared.gate.open_when_ready(handles.len());
    let started = Instant::now();
    let probe = ServerProbe::start(args.server_pid);
    if !shared.gate.aborted() {
        std::thread::sleep(duration);
    }
    let server = probe.finish();

    let mut total = Part::new();
    let mut results = Vec::new();
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok((part, mut members))) => {
                total.add(&part);
                results.append(&mut members);
            }
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(error) => {
                first_error.get_or_insert(anyhow::anyhow!("load executor failed: {error}"));
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }

    let expected_deliveries = account(args.groups, &results, &mut total);
    Ok(Report {
        args: format!(
            "groups={} members={} senders_per_group={} online_percent={} ({online_per_group} online per group) window={} payload_bytes={} duration_s={}",
            args.groups,
            args.members,
            args.senders_per_group,
            args.online_percent,
            args.window,
            args.payload_bytes,
            args.duration_s
        ),
        target: format!("ruyi://{}", args.server),
        spans: Spans::new(duration.as_secs_f64(), started, &total),
        online,
        expected_deliveries,
        total,
        server,
    })
}

/// Checks what every device received against what the senders had
/// acknowledged, counting into `total`; returns the deliveries expected
/// (each acknowledged message, once per online member but its sender).
fn account(groups: usize, results: &[MemberResult], total: &mut Part) -> u64 {
    // Which member's send each acknowledged seq of each group was.
    let mut acked: Vec<HashMap<u64, usize>> = vec![HashMap::new(); groups];
    for result in results {
        for &seq in &result.acked_seqs {
            if acked[result.member.group]
                .insert(seq, result.member.member)
                .is_some()
            {
                // Two sends acknowledged with one seq.
                total.duplicated += 1;
            }
        }
    }
    let mut expected_deliveries = 0u64;
    for result in results {
        let group_acked = &acked[result.member.group];
        let mut seen = HashSet::with_capacity(result.delivered.len());
        let mut highest = None;
        for &seq in &result.delivered {
            if !seen.insert(seq) {
                total.duplicated += 1;
                continue;
            }
            if highest.is_some_and(|h| seq < h) {
                total.reordered += 1;
            }
            highest = highest.max(Some(seq));
            match group_acked.get(&seq) {
                Some(&from) if from != result.member.member => {}
                // Never acknowledged, or its own send echoed back.
                _ => total.unexpected += 1,
            }
        }
        for (seq, &from) in group_acked {
            if from != result.member.member {
                expected_deliveries += 1;
                if !seen.contains(seq) {
                    total.lost += 1;
                }
            }
        }
    }
    expected_deliveries
}

async fn open_members(config: &PairConfig, members: &[Member]) -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(members.len());
    for m in members {
        conns.push(Conn::open(config, &uid(&config.prefix, m.group, m.member)).await?);
    }
    Ok(conns)
}

async fn run_members(
    shared: Arc<Shared>,
    members: Vec<Member>,
) -> anyhow::Result<(Part, Vec<MemberResult>)> {
    let opened = open_members(&shared.config, &members).await;
    shared.gate.arrive(opened.is_ok());
    let conns = opened?;
    if !shared.gate.wait().await {
        bail!("another load executor failed to connect");
    }
    let mut tasks = Vec::with_capacity(conns.len());
    for (member, conn) in members.into_iter().zip(conns) {
        let shared = Arc::clone(&shared);
        tasks.push(glommio::spawn_local(async move {
            let mut guard = SendingGuard {
                shared: Arc::clone(&shared),
                armed: member.sender,
            };
            run_member(&shared, member, conn, &mut guard).await
        }));
    }
    let mut total = Part::new();
    let mut results = Vec::with_capacity(tasks.len());
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok((part, result)) => {
                total.add(&part);
                results.push(result);
            }
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok((total, results)),
    }
}

/// Counts a sender out of `Shared::sending` once, however its task ends.
struct SendingGuard {
    shared: Arc<Shared>,
    armed: bool,
}

impl SendingGuard {
    fn done(&mut self) {
        if std::mem::take(&mut self.armed) {
            self.shared.sending.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for SendingGuard {
    fn drop(&mut self) {
        self.done();
    }
}

/// Sends (when a sender) and receives on one device until the senders are
/// all done and nothing arrived for the grace period.
async fn run_member(
    shared: &Shared,
    member: Member,
    mut conn: Conn,
    guard: &mut SendingGuard,
) -> anyhow::Result<(Part, MemberResult)> {
    let config = &shared.config;
    let my_uid = uid(&config.prefix, member.group, member.member);
    let group_channel = channel(&config.prefix, member.group);
    let mut part = Part::new();
    let mut result = MemberResult {
        member,
        acked_seqs: Vec::new(),
        delivered: Vec::new(),
    };
    let grace = Duration::from_secs(3);
    let ack_timeout = Duration::from_secs(10);
    let deadline = Instant::now() + config.duration;
    let mut sending = member.sender;
    let mut in_flight: HashMap<u32, u64> = HashMap::new();
    let mut next = 0u64;
    let mut last_progress = Instant::now();
    let mut last_event = Instant::now();
    loop {
        if sending {
            while in_flight.len() < config.window && Instant::now() < deadline {
                let mut payload = vec![0u8; config.payload_bytes];
                let sent_at = unix_us();
                payload[..8].copy_from_slice(&sent_at.to_le_bytes());
                let client_seq = conn.core.send(Outgoing {
                    channel_id: group_channel.clone(),
                    channel_type: ChannelType::Group,
                    client_msg_no: format!("{my_uid}-{next}"),
                    flags: 0,
                    payload: Bytes::from(payload),
                });
                next += 1;
                part.sent += 1;
                in_flight.insert(client_seq, sent_at);
            }
            if !in_flight.is_empty() && last_progress.elapsed() >= ack_timeout {
                // No SendAck for 10 s: whatever is in flight is not acknowledged.
                part.failed += in_flight.len() as u64;
                in_flight.clear();
            }
            if in_flight.is_empty() && Instant::now() >= deadline {
                sending = false;
                guard.done();
            }
        }
        conn.flush().await?;
        let events = conn.read_events(Duration::from_millis(200)).await?;
        if events.is_empty() {
            if !sending
                && shared.sending.load(Ordering::SeqCst) == 0
                && last_event.elapsed() >= grace
            {
                break;
            }
            continue;
        }
        last_event = Instant::now();
        for event in events {
            match event {
                Event::SendAck(ack) => {
                    let Some(sent_at) = in_flight.remove(&ack.client_seq) else {
                        continue;
                    };
                    last_progress = Instant::now();
                    if ack.reason == ReasonCode::Success {
                        part.acked += 1;
                        part.last_ack = Some(Instant::now());
                        result.acked_seqs.push(ack.message_seq);
                        let _ = part
                            .ack_latency_us
                            .record(unix_us().saturating_sub(sent_at));
                    } else {
                        part.failed += 1;
                    }
                }
                Event::Recv(recv) => {
                    conn.core.ack(recv.message_id, recv.message_seq);
                    if recv.channel_type != ChannelType::Group
                        || recv.channel_id != group_channel
                        || recv.from_uid == my_uid
                    {
                        part.unexpected += 1;
                        continue;
                    }
                    if recv.payload.len() >= 8 {
                        let mut at = [0u8; 8];
                        at.copy_from_slice(&recv.payload[..8]);
                        let _ = part
                            .delivery_latency_us
                            .record(unix_us().saturating_sub(u64::from_le_bytes(at)));
                    }
                    part.delivered += 1;
                    part.last_delivery = Some(Instant::now());
                    result.delivered.push(recv.message_seq);
                }
                _ => {}
            }
        }
    }
    Ok((part, result))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(group: usize, member: usize, acked: &[u64], delivered: &[u64]) -> MemberResult {
        MemberResult {
            member: Member {
                group,
                member,
                sender: !acked.is_empty(),
            },
            acked_seqs: acked.to_vec(),
            delivered: delivered.to_vec(),
        }
    }

    fn counts(results: &[MemberResult]) -> (u64, u64, u64, u64, u64) {
        let mut total = Part::new();
        let expected = account(2, results, &mut total);
        (
            expected,
            total.lost,
            total.duplicated,
            total.reordered,
            total.unexpected,
        )
    }

    #[test]
    fn a_clean_fan_out_counts_nothing() {
        // Members 0 and 1 send in group 0; member 2 only receives.
        let results = [
            result(0, 0, &[1, 3], &[2]),
            result(0, 1, &[2], &[1, 3]),
            result(0, 2, &[], &[1, 2, 3]),
            result(1, 0, &[7], &[]),
            result(1, 1, &[], &[7]),
        ];
        assert_eq!(counts(&results), (7, 0, 0, 0, 0));
    }

    #[test]
    fn each_anomaly_is_counted() {
        let results = [
            result(0, 0, &[1, 2, 3], &[]),
            // 2 lost.
            result(0, 1, &[], &[1, 3]),
            // 1 twice, 3 before 2.
            result(0, 2, &[], &[1, 1, 3, 2]),
            // 9 was never acknowledged.
            result(0, 3, &[], &[1, 2, 3, 9]),
            // The sender got its own message back.
            result(1, 0, &[5], &[5]),
            result(1, 1, &[], &[5]),
        ];
        assert_eq!(counts(&results), (10, 1, 1, 1, 2));
    }
}
