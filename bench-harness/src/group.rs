//! The `group` scenario: fan-out. `groups` groups of `members` members each
//! are created through the admin HTTP API; `online_percent` of each group's
//! members connect (at least its senders) with `devices_per_user` devices
//! each, `senders_per_group` of them send with a window from their first
//! device, and every online device must receive every acknowledged message
//! of its group exactly once, in seq order (the sending device excepted:
//! the gateway does not echo a send to it; the sender's other devices get
//! it).

use crate::chat::{
    receive, record_push, Conn, DeviceLog, PairConfig, Sender, SendingGuard, Verdict,
};
use crate::common::{http_post, ApiArgs, CommonArgs, Gate};
use crate::live::Live;
use crate::process::{measure, ServerProcess};
use crate::report::{Part, Report};
use anyhow::bail;
use glommio::{LocalExecutorBuilder, Placement};
use ruyi::protocol::ChannelType;
use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct GroupArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Number of groups.
    #[arg(long, default_value_t = 10)]
    pub(crate) groups: usize,
    /// Members of each group.
    #[arg(long, default_value_t = 100)]
    pub(crate) members: usize,
    /// Members of each group that send (they are always online).
    #[arg(long, default_value_t = 1)]
    pub(crate) senders_per_group: usize,
    /// Percentage of each group's members connected (rounded up, at least
    /// the senders); the others are offline members the server still
    /// stores for.
    #[arg(long, default_value_t = 50.0)]
    pub(crate) online_percent: f64,
    /// Sends each sender keeps in flight.
    #[arg(long, default_value_t = 1)]
    pub(crate) window: usize,
    /// Devices of each online member, each receiving every message of the
    /// group (a sender sends from its first device).
    #[arg(long, default_value_t = 1)]
    pub(crate) devices_per_user: usize,
}

/// One online member device.
#[derive(Clone, Copy, Debug)]
struct Member {
    group: usize,
    member: usize,
    device: usize,
    /// Sends from this device.
    sender: bool,
}

/// What one device saw and, for a sender, had acknowledged.
struct MemberResult {
    member: Member,
    acked_seqs: Vec<u64>,
    log: DeviceLog,
    part: Part,
}

struct Shared {
    config: PairConfig,
    gate: Gate,
    live: Arc<Live>,
    /// Senders still sending, over all executors: receivers stop once this
    /// is 0 and nothing arrived for the grace period.
    sending: Arc<AtomicUsize>,
    interval: Option<Duration>,
}

fn uid(prefix: &str, group: usize, member: usize) -> String {
    format!("{prefix}-g{group}-m{member}")
}

fn channel(prefix: &str, group: usize) -> String {
    format!("{prefix}-g{group}")
}

fn create_groups(args: &GroupArgs, prefix: &str) -> anyhow::Result<()> {
    for group in 0..args.groups {
        let subscribers: Vec<String> = (0..args.members).map(|m| uid(prefix, group, m)).collect();
        let body = serde_json::json!({
            "channel_id": channel(prefix, group),
            "channel_type": 2,
            "subscribers": subscribers,
            "reset": 1,
        });
        // A server this harness just started may take a moment to open
        // its admin API.
        let mut attempt = 0;
        let (status, answer) = loop {
            match http_post(
                &args.api.api,
                &args.api.api_token,
                "/channel",
                &body.to_string(),
            ) {
                Ok(answer) => break answer,
                Err(_) if attempt < 50 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(error) => return Err(error.context(format!("creating group {group}"))),
            }
        };
        if status != 200 {
            bail!(
                "creating group {group}: {} answered {status}: {answer}",
                args.api.api
            );
        }
    }
    Ok(())
}

/// Members of each group that are online.
pub(crate) fn online_per_group(args: &GroupArgs) -> usize {
    ((args.members as f64 * args.online_percent / 100.0).ceil() as usize)
        .clamp(args.senders_per_group, args.members)
}

pub(crate) fn check(args: &GroupArgs) -> anyhow::Result<()> {
    args.common.check()?;
    if args.groups == 0 || args.members < 2 || args.devices_per_user == 0 {
        bail!("--groups and --devices-per-user must be at least 1 and --members at least 2");
    }
    if args.senders_per_group == 0 || args.senders_per_group > args.members {
        bail!("--senders-per-group must be between 1 and --members");
    }
    if !(0.0..=100.0).contains(&args.online_percent) {
        bail!("--online-percent must be between 0 and 100");
    }
    Ok(())
}

pub(crate) fn describe(args: &GroupArgs) -> String {
    let c = &args.common;
    format!(
        "groups={} members={} senders_per_group={} online_percent={} ({} online per group) devices_per_user={} window={} rate={} payload_bytes={} warmup_s={} duration_s={}{}",
        args.groups,
        args.members,
        args.senders_per_group,
        args.online_percent,
        online_per_group(args),
        args.devices_per_user,
        args.window,
        c.rate.map_or("max".to_owned(), |r| r.to_string()),
        c.payload_bytes,
        c.warmup_s,
        c.duration_s,
        c.chaos
            .map_or(String::new(), |c| format!(" chaos=kill:{}", c.kill_every.as_secs_f64()))
    )
}

pub fn run(args: &GroupArgs) -> anyhow::Result<Report> {
    check(args)?;
    let Some((server_addr, _)) = args.common.target.ruyi() else {
        return crate::peer::group(args);
    };
    let common: &CommonArgs = &args.common;
    let prefix = common.prefix("group");
    let mut server = ServerProcess::maybe_start(common)?;
    let online_per_group = online_per_group(args);
    let online = args.groups * online_per_group * args.devices_per_user;
    let threads = common.threads(online);

    let created = Instant::now();
    create_groups(args, &prefix)?;
    eprintln!(
        "ruyi-bench: created {} groups of {} in {:.2} s; connecting {online} devices",
        args.groups,
        args.members,
        created.elapsed().as_secs_f64()
    );

    // Online devices, spread over the executors device by device, so a
    // group's fan-out crosses executors (and the gateway's shards).
    let mut per_thread: Vec<Vec<Member>> = vec![Vec::new(); threads];
    let mut k = 0;
    for group in 0..args.groups {
        for member in 0..online_per_group {
            for device in 0..args.devices_per_user {
                per_thread[k % threads].push(Member {
                    group,
                    member,
                    device,
                    sender: member < args.senders_per_group && device == 0,
                });
                k += 1;
            }
        }
    }
    let senders = args.groups * args.senders_per_group;
    let live = Live::new();
    let shared = Arc::new(Shared {
        config: PairConfig::new(common, server_addr, "group", args.window),
        gate: Gate::default(),
        live: Arc::clone(&live),
        sending: Arc::new(AtomicUsize::new(senders)),
        interval: common.send_interval(senders),
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
    let (per_executor, measured) = measure(
        common,
        "group",
        &shared.gate,
        &live,
        server.as_mut(),
        handles,
    )?;
    let results: Vec<MemberResult> = per_executor.into_iter().flatten().collect();
    let mut total = Part::new();
    let expected_deliveries = account(args.groups, &results, &mut total);
    let extra = vec![
        ("online_devices".to_owned(), online.into()),
        ("expected_deliveries".to_owned(), expected_deliveries.into()),
    ];
    Ok(Report::new(
        "group",
        common,
        describe(args),
        total,
        measured,
        extra,
    ))
}

/// Checks what every device received against what the senders had
/// acknowledged, adding every device's part into `total`; returns the
/// deliveries expected (each acknowledged message, once per online device
/// but the one that sent it).
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
        total.add(&result.part);
        let m = result.member;
        let group_acked = &acked[m.group];
        let from_this_device = |from: usize| from == m.member && m.device == 0;
        for seq in result.log.seqs() {
            match group_acked.get(&seq) {
                Some(&from) if !from_this_device(from) => {}
                // Never acknowledged, or its own send echoed back.
                _ => total.unexpected += 1,
            }
        }
        for (&seq, &from) in group_acked {
            if !from_this_device(from) {
                expected_deliveries += 1;
                if !result.log.contains(seq) {
                    total.lost += 1;
                }
            }
        }
    }
    expected_deliveries
}

async fn run_members(
    shared: Arc<Shared>,
    members: Vec<Member>,
) -> anyhow::Result<Vec<MemberResult>> {
    let opened = async {
        let mut conns = Vec::with_capacity(members.len());
        for m in &members {
            let uid = uid(&shared.config.prefix, m.group, m.member);
            conns.push(Conn::open_device(&shared.config, &uid, &format!("d{}", m.device)).await?);
        }
        anyhow::Ok(conns)
    }
    .await;
    shared.gate.arrive(opened.is_ok());
    let conns = opened?;
    if !shared.gate.wait().await {
        bail!("another load executor failed to connect");
    }
    let mut tasks = Vec::with_capacity(conns.len());
    for (member, conn) in members.into_iter().zip(conns) {
        let shared = Arc::clone(&shared);
        tasks.push(glommio::spawn_local(async move {
            run_member(&shared, member, conn).await
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await?);
    }
    Ok(results)
}

/// Sends (when a sender) and receives on one device until the senders are
/// all done and nothing arrived for the grace period.
async fn run_member(
    shared: &Shared,
    member: Member,
    mut conn: Conn,
) -> anyhow::Result<MemberResult> {
    let config = &shared.config;
    let my_uid = uid(&config.prefix, member.group, member.member);
    let group_channel = channel(&config.prefix, member.group);
    let mut part = Part::metered(&shared.live);
    let mut log = DeviceLog::default();
    let mut judge = |recv: &ruyi::protocol::Recv| {
        if recv.channel_type != ChannelType::Group || recv.channel_id != group_channel {
            Verdict::Foreign
        } else if recv.from_uid == my_uid && member.device == 0 {
            Verdict::Own
        } else {
            Verdict::Expected
        }
    };
    let mut acked_seqs = Vec::new();
    if member.sender {
        let _guard = SendingGuard(Some(Arc::clone(&shared.sending)));
        let sender = Sender {
            channel_id: group_channel.clone(),
            channel_type: ChannelType::Group,
            uid: my_uid.clone(),
            interval: shared.interval,
        };
        acked_seqs = sender
            .run(
                config,
                &mut conn,
                &mut part,
                &shared.live,
                |conn, event, part| {
                    if let ruyi::client::Event::Recv(recv) = event {
                        record_push(conn, &mut log, part, &recv, &mut judge);
                    }
                },
            )
            .await?;
    }
    receive(
        config,
        &mut conn,
        &mut log,
        &mut part,
        &shared.live,
        &shared.sending,
        judge,
    )
    .await?;
    Ok(MemberResult {
        member,
        acked_seqs,
        log,
        part,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::AckLedger;

    fn result(group: usize, member: usize, acked: &[u64], delivered: &[u64]) -> MemberResult {
        let mut part = Part::new();
        let mut log = DeviceLog::default();
        for &seq in delivered {
            log.on_push(seq, 1, false, &AckLedger::default(), &mut part);
        }
        MemberResult {
            member: Member {
                group,
                member,
                device: 0,
                sender: !acked.is_empty(),
            },
            acked_seqs: acked.to_vec(),
            log,
            part,
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
