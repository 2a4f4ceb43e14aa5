//! Peer targets: the `chat`, `group` and `connect` scenarios against an
//! MQTT broker (`mqtt://`, QoS 1, persistent sessions) and NATS JetStream
//! (`nats://`, file storage), with the load shape and the correctness
//! accounting of the ruyi runs. PEERS.md says how to start the peers and
//! what compares to what.
//!
//! The clients are `rumqttc` and `async-nats`, which need tokio. Each load
//! thread is still a glommio executor (so [`measure`] drives the run as it
//! does for ruyi), whose body runs a tokio current-thread runtime with
//! `block_on`: once to connect, and once, after the gate opened, to run.
//!
//! There is no server seq at the peers: every payload carries its sender's
//! slot and counter (see [`counter`]), and each receiving device checks,
//! per sender, that every acknowledged counter arrives exactly once and in
//! increasing order.

mod mqtt;
mod nats;

use crate::chat::ChatArgs;
use crate::classify::{classify, Arrival, Class, Earlier};
use crate::common::{resident_bytes, CommonArgs, Gate, ServerProbe, Target};
use crate::connect::ConnectArgs;
use crate::group::GroupArgs;
use crate::live::Live;
use crate::process::{measure, Measured, ServerProcess};
use crate::report::{read_payload, Part, Report};
use anyhow::bail;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) fn chat(args: &ChatArgs) -> anyhow::Result<Report> {
    let plan = Plan::chat(args);
    let describe = format!(
        "pairs={} devices_per_user={} window={} rate={} payload_bytes={} warmup_s={} duration_s={}{}",
        args.pairs,
        args.devices_per_user,
        args.window,
        args.common
            .rate
            .map_or("max".to_owned(), |r| r.to_string()),
        args.common.payload_bytes,
        args.common.warmup_s,
        args.common.duration_s,
        chaos_suffix(&args.common)
    );
    run_scenario(&args.common, plan, args.window, describe)
}

pub(crate) fn group(args: &GroupArgs) -> anyhow::Result<Report> {
    let plan = Plan::group(args);
    run_scenario(
        &args.common,
        plan,
        args.window,
        crate::group::describe(args),
    )
}

pub(crate) fn connect(args: &ConnectArgs) -> anyhow::Result<serde_json::Value> {
    match args.target {
        Target::Mqtt(addr) => run_connect(args, Arc::new(mqtt::Mqtt::new(addr))),
        Target::Nats(addr) => run_connect(args, Arc::new(nats::Nats::new(addr, "connect"))),
        Target::Ruyi(_) | Target::Ws(_) | Target::Wk(_) => {
            bail!("{} is not a peer target", args.target)
        }
    }
}

fn chaos_suffix(common: &CommonArgs) -> String {
    common.chaos.map_or(String::new(), |c| {
        format!(" chaos=kill:{}", c.kill_every.as_secs_f64())
    })
}

/// Bits of a payload counter that count; the bits above name the sender.
const COUNTER_BITS: u32 = 40;

/// The counter a sender puts in its `n`th payload: its slot in the high
/// bits, so a receiver knows whose message it got without any header.
pub(crate) fn counter(slot: usize, n: u64) -> u64 {
    ((slot as u64) << COUNTER_BITS) | (n & ((1 << COUNTER_BITS) - 1))
}

pub(crate) fn slot_of(counter: u64) -> usize {
    (counter >> COUNTER_BITS) as usize
}

/// A receiver stops once every sender finished and nothing arrived for
/// this long (as the ruyi receivers do).
pub(crate) const GRACE: Duration = Duration::from_secs(3);

/// One client of the run: a device that receives, a sender, or both (a
/// group member's first device).
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    /// MQTT client id; NATS connection name and durable consumer name.
    pub(crate) name: String,
    /// Index of its topic / subject (a pair's receiver, a group).
    pub(crate) channel: usize,
    /// Its sender slot when it sends.
    pub(crate) sender: Option<usize>,
    /// Whether it subscribes and receives its channel.
    pub(crate) receives: bool,
}

/// Who connects where, on which load thread.
pub(crate) struct Plan {
    pub(crate) scenario: &'static str,
    pub(crate) prefix: String,
    /// `r` (a chat receiver's channel) or `g` (a group's).
    channel_kind: char,
    pub(crate) endpoints: Vec<Endpoint>,
    /// Group members that stay offline: their sessions (MQTT) or durable
    /// consumers (NATS) exist, so the server keeps their messages, but
    /// they are never read.
    pub(crate) offline: Vec<Endpoint>,
    /// Indices into `endpoints` (and `offline`), per load thread, in the
    /// order they connect.
    pub(crate) per_thread: Vec<Vec<usize>>,
    pub(crate) offline_per_thread: Vec<Vec<usize>>,
    /// Sender slots per channel.
    pub(crate) senders_by_channel: Vec<Vec<usize>>,
    pub(crate) senders: usize,
    pub(crate) online_devices: usize,
}

impl Plan {
    fn chat(args: &ChatArgs) -> Plan {
        let common = &args.common;
        let prefix = common.prefix("chat");
        let threads = common.threads(args.pairs);
        let mut plan = Plan::empty("chat", prefix, 'r', threads, args.pairs);
        // Per thread, its pairs' receivers first (so nothing sent waits
        // for them), then their senders.
        for thread in 0..threads {
            let pairs: Vec<usize> = (thread..args.pairs).step_by(threads).collect();
            for &i in &pairs {
                for d in 0..args.devices_per_user {
                    plan.add(
                        thread,
                        Endpoint {
                            name: format!("{}-r{i}-d{d}", plan.prefix),
                            channel: i,
                            sender: None,
                            receives: true,
                        },
                    );
                }
            }
            for &i in &pairs {
                plan.add(
                    thread,
                    Endpoint {
                        name: format!("{}-s{i}", plan.prefix),
                        channel: i,
                        sender: Some(i),
                        receives: false,
                    },
                );
            }
        }
        plan.online_devices = args.pairs * args.devices_per_user;
        plan
    }

    fn group(args: &GroupArgs) -> Plan {
        let common = &args.common;
        let prefix = common.prefix("group");
        let online_per_group = crate::group::online_per_group(args);
        let online = args.groups * online_per_group * args.devices_per_user;
        let threads = common.threads(online);
        let mut plan = Plan::empty("group", prefix, 'g', threads, args.groups);
        // Device by device over the threads, so a group's fan-out crosses
        // them, as the ruyi run does.
        let mut k = 0;
        for group in 0..args.groups {
            for member in 0..online_per_group {
                for device in 0..args.devices_per_user {
                    let sender = (member < args.senders_per_group && device == 0)
                        .then_some(group * args.senders_per_group + member);
                    plan.add(
                        k % threads,
                        Endpoint {
                            name: format!("{}-g{group}-m{member}-d{device}", plan.prefix),
                            channel: group,
                            sender,
                            receives: true,
                        },
                    );
                    k += 1;
                }
            }
        }
        // One stored queue per offline member, as the gateway stores per
        // member (not per device).
        let mut k = 0;
        for group in 0..args.groups {
            for member in online_per_group..args.members {
                plan.offline_per_thread[k % threads].push(plan.offline.len());
                plan.offline.push(Endpoint {
                    name: format!("{}-g{group}-m{member}-d0", plan.prefix),
                    channel: group,
                    sender: None,
                    receives: true,
                });
                k += 1;
            }
        }
        plan.online_devices = online;
        plan
    }

    fn empty(
        scenario: &'static str,
        prefix: String,
        channel_kind: char,
        threads: usize,
        channels: usize,
    ) -> Plan {
        Plan {
            scenario,
            prefix,
            channel_kind,
            endpoints: Vec::new(),
            offline: Vec::new(),
            per_thread: vec![Vec::new(); threads],
            offline_per_thread: vec![Vec::new(); threads],
            senders_by_channel: vec![Vec::new(); channels],
            senders: 0,
            online_devices: 0,
        }
    }

    fn add(&mut self, thread: usize, endpoint: Endpoint) {
        if let Some(slot) = endpoint.sender {
            self.senders_by_channel[endpoint.channel].push(slot);
            self.senders = self.senders.max(slot + 1);
        }
        self.per_thread[thread].push(self.endpoints.len());
        self.endpoints.push(endpoint);
    }

    /// The channel's last topic level / subject token: `r3`, `g0`.
    pub(crate) fn channel_name(&self, channel: usize) -> String {
        format!("{}{channel}", self.channel_kind)
    }
}

/// Sleeps to an instant with a timerfd's precision: tokio's timers round up
/// to the next millisecond, which would add 1-2 ms to the latency of every
/// send paced by `--rate` (counted from when it was due).
pub(crate) struct PreciseTimer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl PreciseTimer {
    pub(crate) fn new() -> std::io::Result<PreciseTimer> {
        use std::os::fd::FromRawFd;
        // SAFETY: timerfd_create has no preconditions.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: the timerfd is valid and only closed when the AsyncFd
        // (its owner) is dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)?
        };
        Ok(PreciseTimer { fd })
    }

    /// Reads the expiration count; false when the timer had not expired.
    fn consume(fd: &std::os::fd::OwnedFd) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into an 8-byte buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
        if n >= 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        if error.kind() == std::io::ErrorKind::WouldBlock {
            Ok(false)
        } else {
            Err(error)
        }
    }

    /// Returns at `at` (at once when it passed). May be cancelled.
    pub(crate) async fn sleep_until(&self, at: Instant) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        loop {
            let now = Instant::now();
            if at <= now {
                return Ok(());
            }
            // An expiry left by a cancelled sleep goes first.
            PreciseTimer::consume(self.fd.get_ref())?;
            let left = at - now;
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: left.as_secs() as libc::time_t,
                    tv_nsec: libc::c_long::from(left.subsec_nanos() as i32).max(1),
                },
            };
            // SAFETY: a valid timerfd and a valid itimerspec.
            let set = unsafe {
                libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut())
            };
            if set < 0 {
                return Err(std::io::Error::last_os_error());
            }
            loop {
                let mut ready = self.fd.readable().await?;
                match ready.try_io(|fd| match PreciseTimer::consume(fd.get_ref()) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(std::io::ErrorKind::WouldBlock.into()),
                    Err(error) => Err(error),
                }) {
                    Ok(result) => {
                        result?;
                        break;
                    }
                    Err(_would_block) => continue,
                }
            }
        }
    }
}

/// What every load thread shares.
pub(crate) struct Shared {
    pub(crate) plan: Plan,
    pub(crate) gate: Gate,
    pub(crate) live: Arc<Live>,
    /// Senders not finished yet (sending or waiting for acks), over all
    /// threads.
    pub(crate) sending: AtomicUsize,
    /// Between two sends of one sender under `--rate`.
    pub(crate) interval: Option<Duration>,
    pub(crate) window: usize,
    pub(crate) payload_bytes: usize,
    /// Warm-up plus the measured time.
    pub(crate) duration: Duration,
    /// How long a sender waits for outstanding acks at the end, and an
    /// endpoint for its broker to come back: longer under chaos.
    pub(crate) patience: Duration,
    /// The server is killed and restarted during the run (`--chaos`).
    pub(crate) chaos: bool,
}

/// Counts a sender out of [`Shared::sending`] once, however it ends.
pub(crate) struct SendingGuard(pub(crate) Arc<Shared>);

impl Drop for SendingGuard {
    fn drop(&mut self) {
        self.0.sending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one endpoint measured and saw.
pub(crate) struct EndpointResult {
    pub(crate) endpoint: usize,
    pub(crate) part: Part,
    /// Counters the broker acknowledged to this sender.
    pub(crate) acked: Vec<u64>,
    pub(crate) log: DeviceLog,
    /// Its own messages the device had to read and skip (NATS: a durable
    /// consumer on the group subject also gets the member's own sends).
    pub(crate) own_skipped: u64,
}

/// What one receiving device got, after the client's dedup.
#[derive(Default)]
pub(crate) struct DeviceLog {
    /// Counter -> the connection epoch it first came on.
    seen: HashMap<u64, u32>,
    /// Highest counter per sender slot.
    highest: HashMap<usize, u64>,
}

impl DeviceLog {
    /// A delivery of `counter` on connection `epoch`; `marked` when the
    /// broker flagged it as a redelivery (MQTT DUP, JetStream delivery
    /// count above 1). A counter seen before is removed by the dedup and
    /// counted as [`classify`] says; a new counter below the sender's
    /// highest is reordered. True when the delivery is new.
    ///
    /// The brokers' clients write their acks themselves (rumqttc its
    /// PUBACKs, async-nats its ack publishes) and do not say when one has
    /// left, so no delivery here counts as acknowledged: an unflagged
    /// repeat on a newer connection is `redelivered`.
    pub(crate) fn on_delivery(
        &mut self,
        counter: u64,
        epoch: u32,
        marked: bool,
        part: &mut Part,
    ) -> bool {
        let earlier = self.seen.get(&counter).map(|&epoch| Earlier {
            epoch,
            acknowledged: false,
        });
        let highest = self.highest.get(&slot_of(counter)).copied();
        let arrival = Arrival {
            seq: counter,
            epoch,
            flagged: marked,
        };
        let class = classify(earlier, highest, arrival);
        match class {
            Class::New => {}
            Class::OutOfOrder => part.reordered += 1,
            Class::Redelivered => part.redelivered += 1,
            Class::Duplicated => part.duplicated += 1,
        }
        if class.is_new() {
            let highest = self.highest.entry(slot_of(counter)).or_insert(counter);
            *highest = (*highest).max(counter);
        }
        // The latest copy is the one a repeat is judged against.
        self.seen.insert(counter, epoch);
        class.is_new()
    }

    pub(crate) fn contains(&self, counter: u64) -> bool {
        self.seen.contains_key(&counter)
    }

    pub(crate) fn counters(&self) -> impl Iterator<Item = u64> + '_ {
        self.seen.keys().copied()
    }
}

/// How a delivery was counted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// New, or removed by the dedup (counted in the part either way).
    Counted,
    /// The device's own send (its endpoint's sender slot).
    Own,
    /// Not a bench payload.
    Garbage,
}

/// Reads a delivered payload into the device's log and part.
pub(crate) fn record_delivery(
    endpoint: &Endpoint,
    log: &mut DeviceLog,
    part: &mut Part,
    payload: &[u8],
    epoch: u32,
    marked: bool,
) -> Delivery {
    let Some((sent_at_us, counter)) = read_payload(payload) else {
        part.unexpected += 1;
        return Delivery::Garbage;
    };
    if endpoint.sender == Some(slot_of(counter)) {
        return Delivery::Own;
    }
    if log.on_delivery(counter, epoch, marked, part) {
        part.on_delivery(sent_at_us);
    }
    Delivery::Counted
}

/// Lost and unexpected: every device must have every counter its
/// channel's other senders had acknowledged, and nothing else. Adds every
/// endpoint's part into `total`; returns the deliveries expected.
fn account(plan: &Plan, results: &[EndpointResult], total: &mut Part) -> u64 {
    let mut acked: Vec<HashSet<u64>> = vec![HashSet::new(); plan.senders];
    for result in results {
        if let Some(slot) = plan.endpoints[result.endpoint].sender {
            for &c in &result.acked {
                if !acked[slot].insert(c) {
                    // One send acknowledged twice.
                    total.duplicated += 1;
                }
            }
        }
    }
    let mut expected = 0u64;
    for result in results {
        total.add(&result.part);
        let endpoint = &plan.endpoints[result.endpoint];
        let from: Vec<usize> = plan.senders_by_channel[endpoint.channel]
            .iter()
            .copied()
            .filter(|&slot| Some(slot) != endpoint.sender)
            .collect();
        if endpoint.receives {
            for &slot in &from {
                expected += acked[slot].len() as u64;
                total.lost += acked[slot]
                    .iter()
                    .filter(|&&c| !result.log.contains(c))
                    .count() as u64;
            }
        }
        total.unexpected += result
            .log
            .counters()
            .filter(|&c| {
                let slot = slot_of(c);
                !(from.contains(&slot) && acked.get(slot).is_some_and(|a| a.contains(&c)))
            })
            .count() as u64;
    }
    expected
}

/// A peer: how its endpoints connect and run on a load thread.
pub(crate) trait Backend: Send + Sync + 'static {
    /// The thread's endpoints once connected (and subscribed).
    type Opened: 'static;

    /// On the main thread, before the load threads: e.g. the stream.
    fn setup(&self, shared: &Shared) -> anyhow::Result<()>;

    /// Connects (and subscribes) the thread's endpoints and creates its
    /// offline members' sessions.
    async fn open(&self, shared: &Arc<Shared>, thread: usize) -> anyhow::Result<Self::Opened>;

    /// Runs the thread's endpoints to the end of the run.
    async fn run(
        &self,
        shared: &Arc<Shared>,
        opened: Self::Opened,
    ) -> anyhow::Result<Vec<EndpointResult>>;

    /// On the main thread, after the run: removes what the run left.
    fn cleanup(&self, shared: &Shared) -> anyhow::Result<()>;

    /// Opens one idle connection for `connect`, held until `release`.
    async fn hold(&self, name: String, release: Arc<AtomicBool>) -> anyhow::Result<Held>;
}

/// A held idle connection of `connect`.
pub(crate) enum Held {
    Task(tokio::task::JoinHandle<()>),
    Nats(async_nats::Client),
}

/// A tokio runtime for one thread.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn run_scenario(
    common: &CommonArgs,
    plan: Plan,
    window: usize,
    describe: String,
) -> anyhow::Result<Report> {
    match common.target {
        Target::Mqtt(addr) => run_with(
            common,
            plan,
            window,
            describe,
            Arc::new(mqtt::Mqtt::new(addr)),
        ),
        Target::Nats(addr) => {
            let backend = Arc::new(nats::Nats::new(addr, &plan.prefix));
            run_with(common, plan, window, describe, backend)
        }
        Target::Ruyi(_) | Target::Ws(_) | Target::Wk(_) => {
            bail!("{} is not a peer target", common.target)
        }
    }
}

fn run_with<B: Backend>(
    common: &CommonArgs,
    plan: Plan,
    window: usize,
    describe: String,
    backend: Arc<B>,
) -> anyhow::Result<Report> {
    let mut server = ServerProcess::maybe_start(common)?;
    let live = Live::new();
    let scenario = plan.scenario;
    let threads = plan.per_thread.len();
    let shared = Arc::new(Shared {
        sending: AtomicUsize::new(plan.senders),
        interval: common.send_interval(plan.senders),
        plan,
        gate: Gate::default(),
        live: Arc::clone(&live),
        window: window.max(1),
        payload_bytes: common.payload_bytes,
        duration: Duration::from_secs_f64(common.warmup_s + common.duration_s),
        patience: Duration::from_secs(if common.chaos.is_some() { 60 } else { 10 }),
        chaos: common.chaos.is_some(),
    });
    backend.setup(&shared)?;
    let connecting = Instant::now();
    eprintln!(
        "ruyi-bench: connecting {} clients to {} ({} offline sessions)",
        shared.plan.endpoints.len(),
        common.target,
        shared.plan.offline.len()
    );
    let mut handles = Vec::with_capacity(threads);
    for thread in 0..threads {
        let shared = Arc::clone(&shared);
        let backend = Arc::clone(&backend);
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("bench-{scenario}-{thread}"))
            .spawn(move || async move { load_thread(&*backend, &shared, thread).await })
            .map_err(|e| anyhow::anyhow!("starting a load executor: {e}"))?;
        handles.push(handle);
    }
    let outcome = measure(
        common,
        scenario,
        &shared.gate,
        &live,
        server.as_mut(),
        handles,
    );
    let cleaned = backend.cleanup(&shared);
    let (per_thread, measured) = outcome?;
    if let Err(error) = cleaned {
        eprintln!("ruyi-bench: cleaning up after the run: {error:#}");
    }
    eprintln!(
        "ruyi-bench: run over {:.1} s after connecting",
        connecting.elapsed().as_secs_f64()
    );
    let results: Vec<EndpointResult> = per_thread.into_iter().flatten().collect();
    Ok(report(common, &shared.plan, describe, &results, measured))
}

/// A load thread: a glommio executor running the thread's endpoints on a
/// tokio current-thread runtime.
async fn load_thread<B: Backend>(
    backend: &B,
    shared: &Arc<Shared>,
    thread: usize,
) -> anyhow::Result<Vec<EndpointResult>> {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            shared.gate.arrive(false);
            return Err(error);
        }
    };
    let local = tokio::task::LocalSet::new();
    let opened = local.block_on(&runtime, backend.open(shared, thread));
    shared.gate.arrive(opened.is_ok());
    let opened = opened?;
    if !shared.gate.wait().await {
        bail!("another load executor failed to connect");
    }
    local.block_on(&runtime, backend.run(shared, opened))
}

fn report(
    common: &CommonArgs,
    plan: &Plan,
    describe: String,
    results: &[EndpointResult],
    measured: Measured,
) -> Report {
    let mut total = Part::new();
    let expected = account(plan, results, &mut total);
    let own_skipped: u64 = results.iter().map(|r| r.own_skipped).sum();
    let mut extra = Vec::new();
    if plan.scenario == "group" {
        extra.push(("online_devices".to_owned(), plan.online_devices.into()));
        extra.push(("expected_deliveries".to_owned(), expected.into()));
        extra.push(("offline_sessions".to_owned(), plan.offline.len().into()));
    }
    if own_skipped > 0 {
        extra.push(("own_messages_skipped".to_owned(), own_skipped.into()));
    }
    Report::new(plan.scenario, common, describe, total, measured, extra)
}

/// The `connect` scenario against a peer: the same storm and hold as
/// against ruyi, and the same report.
fn run_connect<B: Backend>(
    args: &ConnectArgs,
    backend: Arc<B>,
) -> anyhow::Result<serde_json::Value> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, args.connections.max(1));
    let rss_before = args.server_pid.and_then(resident_bytes);
    let probe = ServerProbe::start(args.server_pid);
    let release = Arc::new(AtomicBool::new(false));
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<anyhow::Result<usize>>();
    let started = Instant::now();
    let mut handles = Vec::new();
    for thread in 0..threads {
        let ids: Vec<usize> = (thread..args.connections).step_by(threads).collect();
        let prefix = args.uid_prefix.clone();
        let backend = Arc::clone(&backend);
        let release = Arc::clone(&release);
        let opened_tx = opened_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("bench-connect-{thread}"))
            .spawn(move || -> anyhow::Result<Histogram<u64>> {
                let runtime = runtime()?;
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async {
                    let mut setup = Histogram::<u64>::new(3).expect("valid sigfig");
                    let mut held = Vec::with_capacity(ids.len());
                    for id in ids {
                        let at = Instant::now();
                        match backend
                            .hold(format!("{prefix}-{id}"), Arc::clone(&release))
                            .await
                        {
                            Ok(connection) => held.push(connection),
                            Err(error) => {
                                let _ = opened_tx.send(Err(error));
                                return Ok(setup);
                            }
                        }
                        let _ = setup.record(at.elapsed().as_micros() as u64);
                    }
                    let _ = opened_tx.send(Ok(held.len()));
                    while !release.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    for connection in held {
                        match connection {
                            Held::Task(task) => {
                                let _ = task.await;
                            }
                            Held::Nats(client) => drop(client),
                        }
                    }
                    Ok(setup)
                })
            })?;
        handles.push(handle);
    }
    drop(opened_tx);
    let mut opened = 0;
    let mut first_error = None;
    for _ in 0..threads {
        match opened_rx.recv() {
            Ok(Ok(n)) => opened += n,
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(_) => break,
        }
    }
    let setup_s = started.elapsed().as_secs_f64();
    let holding = ServerProbe::start(args.server_pid);
    if first_error.is_none() {
        std::thread::sleep(Duration::from_secs_f64(args.hold_s));
    }
    let rss_held = args.server_pid.and_then(resident_bytes);
    let server = probe.finish();
    let held = holding.finish();
    let duration_s = started.elapsed().as_secs_f64();
    release.store(true, Ordering::SeqCst);
    let mut setup = Histogram::<u64>::new(3).expect("valid sigfig");
    for handle in handles {
        match handle.join() {
            Ok(Ok(part)) => {
                let _ = setup.add(&part);
            }
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow::anyhow!("a connect thread panicked"));
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error.context(format!("after {opened} connections")));
    }
    crate::connect::report(
        args,
        &crate::connect::Measured {
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

/// Waits for every endpoint task of an executor: their results, or the
/// first error.
async fn join_endpoints(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<EndpointResult>>>,
) -> anyhow::Result<Vec<EndpointResult>> {
    let mut results = Vec::with_capacity(tasks.len());
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(result)) => results.push(result),
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(error) => {
                first_error.get_or_insert(anyhow::anyhow!("an endpoint task failed: {error}"));
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(results),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(channel: usize, sender: Option<usize>) -> Endpoint {
        Endpoint {
            name: String::new(),
            channel,
            sender,
            receives: true,
        }
    }

    fn plan(endpoints: Vec<Endpoint>) -> Plan {
        let mut plan = Plan::empty("group", "t".into(), 'g', 1, 2);
        for e in endpoints {
            plan.add(0, e);
        }
        plan
    }

    fn result(endpoint: usize, acked: &[u64], delivered: &[(u64, u32, bool)]) -> EndpointResult {
        let mut part = Part::new();
        let mut log = DeviceLog::default();
        for &(c, epoch, marked) in delivered {
            log.on_delivery(c, epoch, marked, &mut part);
        }
        EndpointResult {
            endpoint,
            part,
            acked: acked.to_vec(),
            log,
            own_skipped: 0,
        }
    }

    #[test]
    fn counters_carry_their_sender() {
        let c = counter(7, 12345);
        assert_eq!(slot_of(c), 7);
        assert_eq!(c & ((1 << COUNTER_BITS) - 1), 12345);
        assert!(counter(0, 5) < counter(0, 6));
    }

    #[test]
    fn a_clean_fan_out_counts_nothing() {
        // Endpoints 0 and 1 send in group 0 (slots 0, 1); 2 only receives.
        let plan = plan(vec![
            endpoint(0, Some(0)),
            endpoint(0, Some(1)),
            endpoint(0, None),
        ]);
        let (a0, a1, b0) = (counter(0, 0), counter(0, 1), counter(1, 0));
        let results = [
            result(0, &[a0, a1], &[(b0, 1, false)]),
            result(1, &[b0], &[(a0, 1, false), (a1, 1, false)]),
            result(2, &[], &[(a0, 1, false), (b0, 1, false), (a1, 1, false)]),
        ];
        let mut total = Part::new();
        assert_eq!(account(&plan, &results, &mut total), 6);
        assert!(total.correct());
    }

    #[test]
    fn each_anomaly_is_counted() {
        let plan = plan(vec![
            endpoint(0, Some(0)),
            endpoint(0, None),
            endpoint(0, None),
        ]);
        let c = |n| counter(0, n);
        let results = [
            result(0, &[c(0), c(1), c(2)], &[]),
            // 1 lost; 9 never acknowledged; 2 before 0 is reordered.
            result(
                1,
                &[],
                &[(c(2), 1, false), (c(0), 1, false), (c(9), 1, false)],
            ),
            // 0 again on the same connection unmarked: duplicated; on a
            // new connection or marked: redelivered, not a violation.
            result(
                2,
                &[],
                &[
                    (c(0), 1, false),
                    (c(1), 1, false),
                    (c(2), 1, false),
                    (c(0), 1, false),
                    (c(1), 2, false),
                    (c(2), 1, true),
                ],
            ),
        ];
        let mut total = Part::new();
        account(&plan, &results, &mut total);
        assert_eq!(
            (
                total.lost,
                total.duplicated,
                total.reordered,
                total.unexpected,
                total.redelivered
            ),
            (1, 1, 1, 1, 2)
        );
    }
}
