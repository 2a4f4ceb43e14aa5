//! One simulated run: devices that connect, send, acknowledge, recall,
//! change and sync conversations and disconnect at random; an operator who
//! changes groups and lists; and faults (crashes, failed writes, clock
//! steps). After every step the model's safety checks run; at settle points
//! (every so often, and at the end) the gateway is drained and every
//! device reconnects, and the liveness checks run: every device has every
//! message it may see, conversation lists and unread counts are the
//! model's, incremental syncs add up to the full one.

use crate::log::ModelLog;
use crate::model::{ConvModel, GroupModel, ListsModel, Model, Sent};
use crate::rng::Rng;
use crate::world::{LogSetup, StoreKind, World};
use bytes::{Bytes, BytesMut};
use ruyi::channel::ChannelKey;
use ruyi::config::Config;
use ruyi::conn::outbox::Outbox;
use ruyi::ids::{ConnId, Millis, Uid};
use ruyi::protocol::{
    ChannelType, Connect, Conversation, ConversationAction, ConversationOp, DeviceFlag, Disconnect,
    Encoder, FrameDecoder, Packet, ReasonCode, Recall, Recv, RecvAck, SendPacket,
    SyncConversations, SyncDirection, SyncMessages, VerifyLimits, LENGTH_PREFIX_BYTES,
    PROTOCOL_VERSION, RECV_FLAG_RECALLED, RECV_FLAG_REDELIVERED,
};
use ruyi::shard::api::{ApiRequest, ApiResponse};
use ruyi::shard::state::{ControlError, GroupInfo, Now, SetChange};
use ruyi::storage::{ListKind, ReadDirection};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::rc::Rc;

/// Set by `replay`: every step is printed as it happens (so a panic's
/// steps are seen too).
pub static ECHO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What a run is made of, all drawn from its seed.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub store: StoreKind,
    pub shards: u16,
    pub steps: usize,
    pub users: usize,
    pub devices_per_user: usize,
    pub groups: usize,
    /// Percent chances per step.
    pub crash_percent: u64,
    pub write_failure_percent: u64,
    /// The operations added after the seeds kept as regressions were found
    /// (`extras.rs`): off, a seed replays as it did then.
    pub extras: bool,
    /// `policy.allowlist_for_person` (with `extras`).
    pub allowlist_for_person: bool,
    /// A `[cluster]` node: commits go through a model log with this percent
    /// chance of a fault per append (see `log.rs`).
    pub log: Option<u64>,
    /// Cluster nodes sharing the log (1 without one): each device always
    /// connects to the same node.
    pub nodes: usize,
}

impl Options {
    pub fn from_seed(seed: u64, store: StoreKind) -> Options {
        let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
        Options {
            seed,
            store,
            shards: 1 + rng.below(4) as u16,
            steps: 400 + rng.index(1200),
            users: 2 + rng.index(6),
            devices_per_user: 1 + rng.index(2),
            groups: 1 + rng.index(3),
            crash_percent: [0, 1, 2][rng.index(3)],
            write_failure_percent: [0, 1, 5][rng.index(3)],
            extras: true,
            allowlist_for_person: rng.chance(50),
            log: None,
            nodes: 1,
        }
    }

    /// The seed's run on a `[cluster]` node: commits go through a model
    /// log with 0, 5 or 20 percent of appends faulty, and another writer
    /// now and then.
    pub fn on_log(mut self) -> Options {
        self.log = Some([0, 5, 20][(self.seed % 3) as usize]);
        self
    }

    /// The seed's run on two or three cluster nodes sharing the model log:
    /// each owns some partitions and follows the others', forwarding its
    /// devices' writes to the owners.
    pub fn on_nodes(self) -> Options {
        let nodes = 2 + (self.seed % 2) as usize;
        Options {
            nodes,
            ..self.on_log()
        }
    }

    /// As the seed ran before `extras` existed.
    pub fn classic(mut self) -> Options {
        self.extras = false;
        self.allowlist_for_person = false;
        self.log = None;
        self.nodes = 1;
        self
    }
}

/// A connection as its client holds it.
struct Link {
    conn: ConnId,
    /// The node and the shard holding the connection.
    node: usize,
    shard: usize,
    outbox: Rc<Outbox>,
    generation: u64,
    active: bool,
    /// Highest seq pushed on this connection without the redelivered flag,
    /// per channel.
    last_unflagged: BTreeMap<ChannelKey, u64>,
    /// Frames written by the client that the gateway has not read yet (it
    /// stops reading a connection that is behind on its answers): the
    /// socket's buffer.
    unread: std::collections::VecDeque<Bytes>,
}

/// How a device acknowledges.
#[derive(Debug, Clone, Copy)]
enum AckStyle {
    Through,
    ById,
    Lazy,
}

struct Device {
    uid: String,
    device_id: String,
    /// The cluster node it connects to.
    node: usize,
    link: Option<Link>,
    next_no: u64,
    /// Sends not answered yet, in order: resent after a reconnect.
    unacked: Vec<String>,
    /// Every send attempt by its client_seq: the client_msg_no, the channel
    /// it went to, and the group's epoch when it went.
    attempts: BTreeMap<u32, Attempt>,
    next_client_seq: u32,
    /// What the app has stored: seq → message id, per channel.
    received: BTreeMap<ChannelKey, BTreeMap<u64, u64>>,
    /// Seqs this device told the gateway it has.
    acked: BTreeMap<ChannelKey, BTreeSet<u64>>,
    /// Received and not acknowledged yet.
    to_ack: Vec<(ChannelKey, u64, u64)>,
    style: AckStyle,
    /// Recalls in flight: request id → (channel, client_msg_no, whether its
    /// send had been acknowledged when the recall went out).
    recalls: BTreeMap<u32, (ChannelKey, String)>,
    /// Conversation operations in flight: request id → (channel, action,
    /// unread asked for, the highest seq from others the device had, the
    /// operation's number, whether another operation of the user there was
    /// unsettled when it was sent).
    conversation_ops: BTreeMap<u32, (ChannelKey, ConversationAction, u64, u64, u64, bool)>,
    /// Conversation syncs in flight: request id → since version.
    conversation_syncs: BTreeMap<u32, u64>,
    /// Responses to conversation syncs, by request id (for settle checks).
    conversation_answers: BTreeMap<u32, (Vec<Conversation>, bool)>,
    /// The app's conversation list, kept by syncs (full, then incremental
    /// from the highest version it got), by channel type and id as seen.
    conversation_view: BTreeMap<(u8, String), Conversation>,
    conversation_cursor: u64,
}

#[derive(Debug, Clone)]
struct Attempt {
    client_msg_no: String,
    channel: ChannelKey,
    /// The group's change counter when the send went out.
    epoch: u64,
    /// The first attempt of its client_msg_no (a resend may be answered
    /// with what was stored under earlier rules).
    first: bool,
    /// The group's deletion counter when the send went out.
    generation: u64,
}

enum ControlWait {
    Group {
        group: String,
        /// Whom the change takes out of the group, if it lands.
        removes: Vec<String>,
        rx: async_channel::Receiver<Result<GroupInfo, ControlError>>,
    },
    List {
        group: String,
        kind: ListKind,
        rx: async_channel::Receiver<Result<Vec<String>, ControlError>>,
    },
    Delete {
        group: String,
        rx: async_channel::Receiver<ApiResponse>,
    },
    // The waits of `extras.rs`.
    PersonList {
        uid: String,
        kind: ListKind,
        rx: async_channel::Receiver<Result<Vec<String>, ControlError>>,
    },
    ApiSend {
        from: String,
        attempt: Attempt,
        rx: async_channel::Receiver<ApiResponse>,
    },
    ApiRecall {
        key: ChannelKey,
        seq: u64,
        /// The group's deletion counter when the recall went out.
        generation: u64,
        rx: async_channel::Receiver<ApiResponse>,
    },
    ApiConversationOp {
        /// The device whose conversation operations it joins.
        d: usize,
        request_id: u32,
        rx: async_channel::Receiver<ApiResponse>,
    },
    ApiChannelInfo {
        group: String,
        epoch: u64,
        rx: async_channel::Receiver<ApiResponse>,
    },
}

/// A write forwarded to the node owning its partition.
struct InForward {
    /// Where it was made: node, shard, that node's process, connection.
    node: usize,
    shard: usize,
    generation: u64,
    conn: ConnId,
    request: ApiRequest,
    /// The owner's answer, once the owner serves it (closed if the owner
    /// crashes first).
    answer: Option<async_channel::Receiver<ApiResponse>>,
}

/// Adds `line` to `trace`, printed at once when replaying.
fn echo(trace: &mut Vec<String>, line: String) {
    if ECHO.load(std::sync::atomic::Ordering::Relaxed) {
        println!("{line}");
    }
    trace.push(line);
}

/// A violated invariant, with the seed and the steps that led to it.
#[derive(Debug)]
pub struct Failure {
    pub seed: u64,
    pub message: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {}: {}", self.seed, self.message)?;
        let skip = self.trace.len().saturating_sub(60);
        if skip > 0 {
            writeln!(f, "  ... {skip} earlier steps")?;
        }
        for line in &self.trace[skip..] {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "replay: RUYI_SIM_SEED={} cargo test --release --test simulation replay -- --exact --nocapture",
            self.seed
        )
    }
}

/// What one run did, for the soak's figures.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub steps: usize,
    pub crashes: usize,
    pub acked_sends: usize,
    pub pushes: usize,
}

pub struct Sim {
    options: Options,
    rng: Rng,
    /// Conversation syncs the devices made on their own (every third is
    /// a full one).
    full_syncs: u64,
    /// One process per cluster node (one in all but the runs on nodes).
    worlds: Vec<World>,
    /// Writes a node forwarded to the owner of their partition: per node
    /// and shard, published and not served yet, in order; then served,
    /// waiting for the owner's answer.
    wire: Vec<Vec<VecDeque<InForward>>>,
    forwarded: Vec<InForward>,
    /// Which node holds each partition's claim (see `nodes.rs`).
    claims: Rc<RefCell<Vec<usize>>>,
    devices: Vec<Device>,
    model: Model,
    controls: Vec<ControlWait>,
    trace: Vec<String>,
    encoder: Encoder,
    decoder: FrameDecoder,
    verify: VerifyLimits,
    next_request: u32,
    summary: Summary,
    /// Connections abandoned by their device (it connected again): drained
    /// and closed, their packets unread.
    zombies: Vec<Link>,
    /// Messages given to group members, to judge once the group's changes
    /// around them are answered: (uid, channel, seq, how it came).
    membership_checks: Vec<(String, ChannelKey, u64, &'static str)>,
    failure: Option<String>,
    /// Per node and shard, the last webhook event read from the outbox.
    webhooks_read: Vec<Vec<u64>>,
    /// Messages a `msg.notify` event named: (channel, seq, id).
    notified: BTreeSet<(ChannelKey, u64, u64)>,
    /// The uids each `msg.offline` event named, by (channel, seq).
    offline_named: BTreeMap<(ChannelKey, u64), BTreeSet<String>>,
    /// Steps taken so far.
    step_no: u64,
    /// Sends made through the API so far (their client_msg_nos).
    next_api_send: u64,
    /// Until this step every write fails, as on a full disk (extras).
    disk_full_until: u64,
}

/// Small limits, so that every bound is reached in a short run.
fn simulation_config(options: &Options) -> Config {
    let mut config = Config::default();
    config.policy.allowlist_for_person = options.allowlist_for_person;
    config.limits.frame_size_max_bytes = 4096;
    config.limits.payload_size_max_bytes = 1024;
    config.limits.sync_response_max_bytes = 4096;
    config.limits.outbound_buffer_max_bytes = 16_384;
    config.limits.pending_requests_per_connection_max = 8;
    config.limits.channels_cached_per_shard_max = 16;
    config.limits.inflight_messages_max = 4;
    config.limits.handshake_timeout_ms = 5_000;
    config.limits.idle_timeout_ms = 60_000;
    config.delivery.retry_interval_ms = 300;
    config.delivery.retry_interval_max_ms = 1_200;
    config.delivery.retry_attempts_max = 3;
    config.delivery.retry_tick_ms = 10;
    config.auth.mode = ruyi::config::AuthMode::Off;
    // RocksDB's compaction drops idempotency keys by the real clock, and
    // the simulated clock is in the past: keys must outlive any run.
    config.storage.idempotency_ttl_s = 100 * 365 * 24 * 3600;
    config.api.enabled = false;
    config
        .validate()
        .expect("the simulation's configuration is valid");
    config
}

impl Sim {
    pub fn new(options: Options) -> Sim {
        let config = simulation_config(&options);
        let now = Now {
            monotonic: Millis(1_000),
            unix_ms: 1_764_000_000_000,
            micros: 1_000_000,
        };
        let log = Rc::new(RefCell::new(ModelLog::default()));
        let claims = Rc::new(RefCell::new(nodes::first_claims(
            options.nodes,
            options.shards,
        )));
        let worlds: Vec<World> = (0..options.nodes)
            .map(|node| {
                World::new(
                    options.store,
                    options.shards,
                    config.clone(),
                    now,
                    options.log.map(|faulty| LogSetup {
                        faulty,
                        node,
                        nodes: options.nodes,
                        model: Rc::clone(&log),
                        claims: Rc::clone(&claims),
                    }),
                )
            })
            .collect();
        let mut devices = Vec::new();
        for u in 0..options.users {
            for d in 0..options.devices_per_user {
                devices.push(Device {
                    uid: format!("u{u}"),
                    device_id: format!("d{d}"),
                    node: (u + d) % options.nodes,
                    link: None,
                    next_no: 0,
                    unacked: Vec::new(),
                    attempts: BTreeMap::new(),
                    next_client_seq: 0,
                    received: BTreeMap::new(),
                    acked: BTreeMap::new(),
                    to_ack: Vec::new(),
                    style: [AckStyle::Through, AckStyle::ById, AckStyle::Lazy][(u + d) % 3],
                    recalls: BTreeMap::new(),
                    conversation_ops: BTreeMap::new(),
                    conversation_syncs: BTreeMap::new(),
                    conversation_answers: BTreeMap::new(),
                    conversation_view: BTreeMap::new(),
                    conversation_cursor: 0,
                });
            }
        }
        let mut model = Model::default();
        for g in 0..options.groups {
            model.groups.insert(format!("g{g}"), GroupModel::default());
        }
        for u in 0..options.users {
            model
                .person_lists
                .insert(format!("u{u}"), ListsModel::default());
        }
        Sim {
            rng: Rng::new(options.seed),
            full_syncs: 0,
            wire: (0..options.nodes)
                .map(|_| (0..options.shards).map(|_| VecDeque::new()).collect())
                .collect(),
            forwarded: Vec::new(),
            claims,
            options,
            worlds,
            devices,
            model,
            controls: Vec::new(),
            trace: Vec::new(),
            encoder: Encoder::new(),
            decoder: FrameDecoder::new(config.limits.frame_size_max_bytes),
            verify: VerifyLimits::for_frame_size(config.limits.frame_size_max_bytes),
            next_request: 1,
            summary: Summary::default(),
            zombies: Vec::new(),
            webhooks_read: Vec::new(),
            notified: BTreeSet::new(),
            offline_named: BTreeMap::new(),
            step_no: 0,
            next_api_send: 0,
            disk_full_until: 0,
            membership_checks: Vec::new(),
            failure: None,
        }
    }

    /// Runs every step and the final settle; the first violation ends it.
    pub fn run(mut self) -> Result<(Summary, Vec<String>), Failure> {
        let settle_every = 150 + self.rng.index(300);
        for step in 0..self.options.steps {
            self.step();
            if step % settle_every == settle_every - 1 {
                self.settle();
            }
            if self.failure.is_some() {
                break;
            }
        }
        if self.failure.is_none() {
            self.settle();
        }
        self.summary.steps = self.options.steps;
        match self.failure.take() {
            None => Ok((self.summary, self.trace)),
            Some(message) => Err(Failure {
                seed: self.options.seed,
                message,
                trace: self.trace,
            }),
        }
    }

    fn note(&mut self, line: String) {
        if ECHO.load(std::sync::atomic::Ordering::Relaxed) {
            println!("{line}");
        }
        self.trace.push(line);
    }

    fn violation(&mut self, message: String) {
        if self.failure.is_none() {
            self.trace.push(format!("VIOLATION: {message}"));
            self.failure = Some(message);
        }
    }

    fn failed(&self) -> bool {
        self.failure.is_some()
    }

    fn request_id(&mut self) -> u32 {
        self.next_request += 1;
        self.next_request
    }

    // ---- one random step --------------------------------------------------

    fn step(&mut self) {
        if self.options.extras && self.rng.chance(5) {
            self.extra_random();
            return self.after_step();
        }
        if self.options.nodes > 1 && self.rng.chance(15) {
            self.between_nodes_random();
            return self.after_step();
        }
        let roll = self.rng.below(100);
        match roll {
            0..=9 => self.connect_random(),
            10..=29 => self.send_random(),
            30..=39 => self.drain_random(),
            40..=49 => self.deliver_random(),
            50..=59 => self.commit_random(),
            60..=64 => self.ack_random(),
            65..=67 => self.recall_random(),
            68..=70 => self.conversation_op_random(),
            71..=72 => self.sync_conversations_random(),
            73..=74 => self.sync_messages_random(),
            75..=77 => self.disconnect_random(),
            78..=81 => self.control_random(),
            82..=86 => {
                let by = [1, 5, 20, 100, 400][self.rng.index(5)];
                self.advance(by);
                self.retry_tick_all();
                self.note(format!("time +{by} ms"));
            }
            87..=89 => {
                let n = self.random_node();
                let i = self.rng.index(self.shard_count());
                self.worlds[n].run_position_job(i);
                self.note(format!("{}shard {i}: position write", self.node_name(n)));
            }
            90..=91 => {
                for world in &mut self.worlds {
                    let now = world.now;
                    for shard in &mut world.shards {
                        shard.sweep(now);
                    }
                }
                self.note("sweep".into());
            }
            92 => {
                // The wall clock steps (NTP): message ids and timestamps
                // must cope.
                let back = self.rng.chance(50);
                let by = 1 + self.rng.below(5_000);
                // On nodes, one node's clock: they disagree from then on.
                let n = self.random_node();
                let clock = &mut self.worlds[n].now.unix_ms;
                if back {
                    *clock -= by;
                } else {
                    *clock += by;
                }
                self.note(format!(
                    "{}wall clock steps {} {by} ms",
                    self.node_name(n),
                    if back { "back" } else { "forward" }
                ));
            }
            _ => {
                if self.rng.chance(self.options.crash_percent * 8) {
                    self.crash();
                } else {
                    self.drain_all();
                }
            }
        }
        self.after_step();
    }

    fn after_step(&mut self) {
        self.collect_all();
        self.poll_controls();
        self.poll_forwards();
        self.check_memory_bounds();
        self.track_presence();
    }

    /// Notes, per user, since when the gateway has certainly known them
    /// offline, or had them online without a break (see `PresenceTrack`).
    fn track_presence(&mut self) {
        self.step_no += 1;
        self.observe_presence();
    }

    /// Updates the `PresenceTrack`s to what the gateway holds now (at the
    /// end of every step, and before every commit begins, since that is
    /// when `msg.offline` is decided).
    fn observe_presence(&mut self) {
        for (node, world) in self.worlds.iter().enumerate() {
            let quiet = world.busy_inboxes().is_empty();
            for u in 0..self.options.users {
                let uid = format!("u{u}");
                let (held, active) = world.user_connections(&uid);
                let track = self.model.presence.entry((node, uid)).or_default();
                if held > 0 {
                    track.offline_since = None;
                } else if quiet && track.offline_since.is_none() {
                    track.offline_since = Some(self.step_no);
                }
                if active == 0 {
                    track.active_since = None;
                } else if track.active_since.is_none() {
                    track.active_since = Some(self.step_no);
                }
            }
        }
    }

    /// What a client can make the gateway hold stays within the limits.
    fn check_memory_bounds(&mut self) {
        let limits = &self.worlds[0].config.limits;
        let channels_max = limits.channels_cached_per_shard_max;
        // One more answer may land past the limit before the cut-off.
        let unwritten_max = limits.outbound_buffer_max_bytes
            + limits.sync_response_max_bytes
            + limits.frame_size_max_bytes;
        let shards = self.worlds.iter().flat_map(|w| w.shards.iter().enumerate());
        for (i, shard) in shards {
            let (held, busy) = (shard.channels_cached(), shard.channels_busy());
            if held > channels_max + busy {
                return self.violation(format!(
                    "shard {i} holds {held} channels ({busy} with work in flight), over channels_cached_per_shard_max = {channels_max}"
                ));
            }
        }
        for d in 0..self.devices.len() {
            if let Some(link) = &self.devices[d].link {
                let unwritten = link.outbox.unwritten();
                if unwritten > unwritten_max && !link.outbox.is_aborted() {
                    return self.violation(format!(
                        "{} has {unwritten} bytes queued, over the outbound limit",
                        self.name(d)
                    ));
                }
            }
        }
    }

    // ---- clients ------------------------------------------------------------

    fn connect_random(&mut self) {
        let d = self.rng.index(self.devices.len());
        let resume = self.rng.chance(75);
        let shard = self.rng.index(self.shard_count());
        self.connect(d, shard, resume);
    }

    fn connect(&mut self, d: usize, shard: usize, resume: bool) {
        if let Some(old) = self.devices[d].link.take() {
            // Connecting again while the old connection lingers (a
            // half-open socket): the gateway must replace it.
            self.zombies.push(old);
            self.forget_requests(d);
        }
        let node = self.devices[d].node;
        let now = self.worlds[node].now;
        let (conn, outbox) = match self.worlds[node].shards[shard].accept(now) {
            Ok(accepted) => accepted,
            Err(reason) => {
                self.note(format!("{}: accept refused {reason:?}", self.name(d)));
                return;
            }
        };
        let packet = Packet::Connect(Connect {
            version: PROTOCOL_VERSION,
            uid: self.devices[d].uid.clone(),
            token: String::new(),
            device_id: self.devices[d].device_id.clone(),
            device_flag: DeviceFlag::App,
            client_timestamp_ms: 0,
            resume,
        });
        self.devices[d].link = Some(Link {
            conn,
            node,
            shard,
            outbox,
            generation: self.worlds[node].generation,
            active: false,
            last_unflagged: BTreeMap::new(),
            unread: std::collections::VecDeque::new(),
        });
        self.note(format!(
            "{}: connect on {}shard {shard} as conn {} resume={resume}",
            self.name(d),
            self.node_name(node),
            conn.0
        ));
        self.write(d, &packet);
    }

    fn name(&self, d: usize) -> String {
        format!("{}/{}", self.devices[d].uid, self.devices[d].device_id)
    }

    /// Writes `packet` from device `d` to its connection; the gateway reads
    /// it when it takes frames from that connection.
    fn write(&mut self, d: usize, packet: &Packet) {
        let mut out = BytesMut::new();
        self.encoder.encode(packet, &mut out);
        let frame = Bytes::copy_from_slice(&out[LENGTH_PREFIX_BYTES..]);
        let Some(link) = &mut self.devices[d].link else {
            return;
        };
        link.unread.push_back(frame);
        self.feed(d);
    }

    /// The gateway reads what device `d` wrote, as far as it takes frames
    /// from the connection now (as the connection task does).
    fn feed(&mut self, d: usize) {
        let Some(link) = &mut self.devices[d].link else {
            return;
        };
        let world = &mut self.worlds[link.node];
        let now = world.now;
        if link.generation != world.generation {
            return;
        }
        let shard = &mut world.shards[link.shard];
        while !link.unread.is_empty() && shard.reads_frames(link.conn) {
            let frame = link.unread.pop_front().expect("not empty");
            shard.on_frame(link.conn, &frame, now);
        }
    }

    /// A device with an active connection, if any.
    fn random_active(&mut self) -> Option<usize> {
        let active = self.active_devices();
        (!active.is_empty()).then(|| *self.rng.pick(&active))
    }

    fn active_devices(&self) -> Vec<usize> {
        (0..self.devices.len())
            .filter(|d| self.devices[*d].link.as_ref().is_some_and(|l| l.active))
            .collect()
    }

    /// A channel `d` may address: `(channel id as d sees it, type, key)`.
    fn random_target(&mut self, d: usize) -> (String, ChannelType, ChannelKey) {
        let uid = self.devices[d].uid.clone();
        if self.rng.chance(50) && !self.model.groups.is_empty() {
            let g = format!("g{}", self.rng.index(self.options.groups));
            let key = ChannelKey::group(&g);
            return (g, ChannelType::Group, key);
        }
        let others: Vec<String> = (0..self.options.users)
            .map(|u| format!("u{u}"))
            .filter(|u| *u != uid)
            .collect();
        let other = self.rng.pick(&others).clone();
        let key = ChannelKey::person(&Uid::new(&uid), &Uid::new(&other));
        (other, ChannelType::Person, key)
    }

    fn send_random(&mut self) {
        let active = self.active_devices();
        if active.is_empty() {
            return self.connect_random();
        }
        let d = *self.rng.pick(&active);
        let (channel_id, channel_type, key) = self.random_target(d);
        let uid = self.devices[d].uid.clone();
        // Now and then a client reuses one of its client_msg_nos for a
        // different message: it must not be answered as stored. (Not on
        // nodes: the node owning the second channel learns of the first
        // message when it applies its record, and until then takes the
        // reuse for a new message; see the README's Cluster.)
        let several = self.worlds.len() > 1;
        let reused = self
            .model
            .sent
            .iter()
            .filter(|((from, _), sent)| {
                *from == uid
                    && sent.channel != key
                    && sent.acked.is_some()
                    && sent.channel.kind() == ChannelType::Person
                    && !several
            })
            .map(|((_, no), _)| no.clone())
            .next();
        let (client_msg_no, fresh) = match reused {
            Some(no) if self.rng.chance(4) => (no, false),
            _ => {
                self.devices[d].next_no += 1;
                (
                    format!("{}-{}", self.devices[d].device_id, self.devices[d].next_no),
                    true,
                )
            }
        };
        let payload = Bytes::from(format!("{uid}:{client_msg_no}:{}", self.rng.below(1000)));
        if fresh {
            self.model.sent.insert(
                (uid.clone(), client_msg_no.clone()),
                Sent {
                    channel: key.clone(),
                    payload: payload.clone(),
                    acked: None,
                    deleted: false,
                    first_step: self.step_no,
                    offline_must: BTreeSet::new(),
                    online_must: BTreeSet::new(),
                },
            );
            self.model.channels.insert(key.clone());
            self.devices[d].unacked.push(client_msg_no.clone());
        }
        self.note(format!(
            "{}: send {client_msg_no} to {key:?}{}",
            self.name(d),
            if fresh { "" } else { " (reused client_msg_no)" }
        ));
        let client_seq = self.attempt(d, &client_msg_no, &key, fresh);
        let packet = Packet::Send(SendPacket {
            client_seq,
            client_msg_no: client_msg_no.clone(),
            channel_id: channel_id.clone(),
            channel_type,
            flags: 0,
            payload,
        });
        self.write(d, &packet);
        if fresh && self.rng.chance(10) {
            // Recalled at once, before the SendAck.
            self.recall(d, key, channel_id, channel_type, 0, client_msg_no);
        }
    }

    fn resend_unacked(&mut self, d: usize) {
        let uid = self.devices[d].uid.clone();
        for client_msg_no in self.devices[d].unacked.clone() {
            let Some(sent) = self.model.sent.get(&(uid.clone(), client_msg_no.clone())) else {
                continue;
            };
            let channel_id = sent.channel.id_seen_by(&uid).to_owned();
            let (key, kind, payload) = (
                sent.channel.clone(),
                sent.channel.kind(),
                sent.payload.clone(),
            );
            let client_seq = self.attempt(d, &client_msg_no, &key, false);
            let packet = Packet::Send(SendPacket {
                client_seq,
                client_msg_no: client_msg_no.clone(),
                channel_id,
                channel_type: kind,
                flags: 0,
                payload,
            });
            self.note(format!("{}: resend {client_msg_no}", self.name(d)));
            self.write(d, &packet);
        }
    }

    /// Records a send attempt of device `d`; returns its client_seq.
    fn attempt(&mut self, d: usize, client_msg_no: &str, key: &ChannelKey, first: bool) -> u32 {
        let (epoch, generation) = match key.kind() {
            ChannelType::Group => self
                .model
                .groups
                .get(key.id())
                .map_or((0, 0), |g| (g.epoch, g.generation)),
            _ => {
                let uid = self.devices[d].uid.clone();
                (self.person_epoch(&uid, key), 0)
            }
        };
        let device = &mut self.devices[d];
        device.next_client_seq += 1;
        device.attempts.insert(
            device.next_client_seq,
            Attempt {
                client_msg_no: client_msg_no.to_owned(),
                channel: key.clone(),
                epoch,
                first,
                generation,
            },
        );
        device.next_client_seq
    }

    fn recall_random(&mut self) {
        let Some(d) = self.random_active() else {
            return;
        };
        let uid = self.devices[d].uid.clone();
        let mine: Vec<(String, Sent)> = self
            .model
            .sent
            .iter()
            .filter(|((from, _), sent)| *from == uid && sent.acked.is_some())
            .map(|((_, no), sent)| (no.clone(), sent.clone()))
            .collect();
        if mine.is_empty() {
            return;
        }
        let (client_msg_no, sent) = self.rng.pick(&mine).clone();
        let by_id = self.rng.chance(50);
        let id = if by_id {
            sent.acked.map_or(0, |a| a.1)
        } else {
            0
        };
        let channel_id = sent.channel.id_seen_by(&uid).to_owned();
        let kind = sent.channel.kind();
        self.recall(d, sent.channel, channel_id, kind, id, client_msg_no);
    }

    fn recall(
        &mut self,
        d: usize,
        key: ChannelKey,
        channel_id: String,
        channel_type: ChannelType,
        message_id: u64,
        client_msg_no: String,
    ) {
        let request_id = self.request_id();
        self.devices[d]
            .recalls
            .insert(request_id, (key.clone(), client_msg_no.clone()));
        self.note(format!(
            "{}: recall {client_msg_no} in {key:?} by {}",
            self.name(d),
            if message_id != 0 {
                "id"
            } else {
                "client_msg_no"
            }
        ));
        let packet = Packet::Recall(Recall {
            request_id,
            channel_id,
            channel_type,
            message_id,
            client_msg_no: if message_id != 0 {
                String::new()
            } else {
                client_msg_no
            },
        });
        self.write(d, &packet);
    }

    fn ack_random(&mut self) {
        let Some(d) = self.random_active() else {
            return;
        };
        let everything = self.rng.chance(30);
        self.ack(d, everything);
    }

    /// Device `d` acknowledges what it received, in its style (`all`:
    /// everything, whatever its style).
    fn ack(&mut self, d: usize, all: bool) {
        let style = if all {
            AckStyle::Through
        } else {
            self.devices[d].style
        };
        let pending = std::mem::take(&mut self.devices[d].to_ack);
        if pending.is_empty() {
            return;
        }
        let mut packets = Vec::new();
        let uid = self.devices[d].uid.clone();
        match style {
            AckStyle::Lazy if !all && !self.rng.chance(20) => {
                self.devices[d].to_ack = pending;
                return;
            }
            AckStyle::ById => {
                for (key, seq, id) in pending {
                    self.devices[d]
                        .acked
                        .entry(key.clone())
                        .or_default()
                        .insert(seq);
                    packets.push(Packet::RecvAck(RecvAck {
                        message_id: id,
                        message_seq: seq,
                        channel_id: key.id_seen_by(&uid).to_owned(),
                        channel_type: key.kind(),
                        through: false,
                    }));
                }
            }
            _ => {
                // Through the highest seq received in each channel, as the
                // SDK does: a connection's pushes of a channel come in seq
                // order, so everything below it was pushed or is not due.
                let mut channels: BTreeMap<ChannelKey, u64> = BTreeMap::new();
                for (key, seq, _) in &pending {
                    let entry = channels.entry(key.clone()).or_default();
                    *entry = (*entry).max(*seq);
                }
                for (key, through) in channels {
                    let acked = self.devices[d].acked.entry(key.clone()).or_default();
                    acked.extend(1..=through);
                    packets.push(Packet::RecvAck(RecvAck {
                        message_id: 0,
                        message_seq: through,
                        channel_id: key.id_seen_by(&uid).to_owned(),
                        channel_type: key.kind(),
                        through: true,
                    }));
                }
            }
        }
        self.note(format!("{}: ack {} packets", self.name(d), packets.len()));
        for packet in packets {
            self.write(d, &packet);
        }
    }

    fn conversation_op_random(&mut self) {
        let Some(d) = self.random_active() else {
            return;
        };
        let channels: Vec<ChannelKey> = self.devices[d].received.keys().cloned().collect();
        if channels.is_empty() {
            return;
        }
        let key = self.rng.pick(&channels).clone();
        let (action, unread) = match self.rng.below(3) {
            0 => (ConversationAction::ClearUnread, 0),
            1 => (ConversationAction::Delete, 0),
            _ => (ConversationAction::SetUnread, self.rng.below(4)),
        };
        let request_id = self.request_id();
        self.register_conversation_op(d, request_id, key.clone(), action, unread);
        self.note(format!(
            "{}: conversation {action:?} {unread} on {key:?}",
            self.name(d)
        ));
        let uid = self.devices[d].uid.clone();
        let packet = Packet::ConversationOp(ConversationOp {
            request_id,
            channel_id: key.id_seen_by(&uid).to_owned(),
            channel_type: key.kind(),
            action,
            unread,
        });
        self.write(d, &packet);
    }

    /// Notes a conversation operation of device `d`'s user (sent by the
    /// device, or through the API on its behalf) before it goes out.
    pub(super) fn register_conversation_op(
        &mut self,
        d: usize,
        request_id: u32,
        key: ChannelKey,
        action: ConversationAction,
        unread: u64,
    ) {
        let uid = self.devices[d].uid.clone();
        let seen = self.devices[d]
            .received
            .get(&key)
            .and_then(|r| {
                r.keys()
                    .rev()
                    .find(|seq| {
                        self.model
                            .places
                            .get(&(key.clone(), **seq))
                            .is_some_and(|(_, from, _)| *from != uid)
                    })
                    .copied()
            })
            .unwrap_or(0);
        let conv = self
            .model
            .conversations
            .entry((uid.clone(), key.clone()))
            .or_default();
        let tangled = conv.in_flight > 0 || conv.lost;
        conv.issued += 1;
        conv.in_flight += 1;
        let number = conv.issued;
        self.devices[d]
            .conversation_ops
            .insert(request_id, (key, action, unread, seen, number, tangled));
    }

    /// The answer to device `d`'s conversation operation `request_id` was
    /// lost: it may have landed, now or later.
    pub(super) fn lose_conversation_op(&mut self, d: usize, request_id: u32) {
        let uid = self.devices[d].uid.clone();
        if let Some((key, ..)) = self.devices[d].conversation_ops.remove(&request_id) {
            Self::lost_op(&mut self.model, uid, key);
        }
    }

    fn lost_op(model: &mut Model, uid: String, key: ChannelKey) {
        // It may still wait in an inbox: uncertain until the shards are
        // drained and a later operation is answered.
        let conv = model.conversations.entry((uid, key)).or_default();
        conv.uncertain = true;
        conv.in_flight = conv.in_flight.saturating_sub(1);
        conv.lost = true;
    }

    fn sync_conversations_random(&mut self) {
        let Some(d) = self.random_active() else {
            return;
        };
        // Every third sync is a full one, the rest go on from the device's
        // highest version (chosen without the random stream, so that seeds
        // found before incremental syncs existed replay as they did).
        self.full_syncs += 1;
        let since = if self.full_syncs % 3 == 0 {
            0
        } else {
            self.devices[d].conversation_cursor
        };
        self.sync_conversations(d, since);
    }

    fn sync_conversations(&mut self, d: usize, since_version: u64) -> u32 {
        let request_id = self.request_id();
        self.devices[d]
            .conversation_syncs
            .insert(request_id, since_version);
        let packet = Packet::SyncConversations(SyncConversations {
            request_id,
            since_version,
            limit: self.worlds[0].config.limits.sync_limit_max,
            unread_only: false,
        });
        self.write(d, &packet);
        request_id
    }

    fn sync_messages_random(&mut self) {
        let Some(d) = self.random_active() else {
            return;
        };
        let (channel_id, channel_type, key) = self.random_target(d);
        let up = self.rng.chance(50);
        let start = self.rng.below(6);
        self.note(format!("{}: sync messages of {key:?}", self.name(d)));
        let packet = Packet::SyncMessages(SyncMessages {
            request_id: self.request_id(),
            channel_id,
            channel_type,
            start_seq: if up { start.max(1) } else { start },
            end_seq: 0,
            limit: 1 + self.rng.below(8) as u32,
            direction: if up {
                SyncDirection::Up
            } else {
                SyncDirection::Down
            },
        });
        self.write(d, &packet);
    }

    fn disconnect_random(&mut self) {
        let connected: Vec<usize> = (0..self.devices.len())
            .filter(|d| self.devices[*d].link.is_some())
            .collect();
        if connected.is_empty() {
            return;
        }
        let d = *self.rng.pick(&connected);
        match self.rng.below(3) {
            0 => {
                self.note(format!("{}: says goodbye", self.name(d)));
                let packet = Packet::Disconnect(Disconnect {
                    reason: ReasonCode::Success,
                    message: String::new(),
                });
                self.write(d, &packet);
                self.drain(d);
            }
            1 => {
                self.note(format!("{}: connection drops", self.name(d)));
                self.drop_link(d);
            }
            _ => {
                // The app dies: what it had not acknowledged is gone with
                // it, as is the connection.
                self.note(format!("{}: app crashes", self.name(d)));
                self.drop_link(d);
                let device = &mut self.devices[d];
                for (key, seqs) in device.received.iter_mut() {
                    let acked = device.acked.get(key);
                    seqs.retain(|seq, _| acked.is_some_and(|a| a.contains(seq)));
                }
                device.to_ack.clear();
                device.conversation_view.clear();
                device.conversation_cursor = 0;
            }
        }
    }

    fn drop_link(&mut self, d: usize) {
        if let Some(link) = self.devices[d].link.take() {
            let world = &mut self.worlds[link.node];
            if link.generation == world.generation {
                world.shards[link.shard].on_closed(link.conn);
            }
        }
        self.forget_requests(d);
    }

    /// Device `d` lost its connection: what it asked and was not answered
    /// may or may not have happened.
    fn forget_requests(&mut self, d: usize) {
        let uid = self.devices[d].uid.clone();
        let device = &mut self.devices[d];
        // Unacknowledged pushes come again after the reconnect.
        device.to_ack.clear();
        device.recalls.clear();
        device.conversation_syncs.clear();
        for (_, (key, ..)) in std::mem::take(&mut device.conversation_ops) {
            Self::lost_op(&mut self.model, uid.clone(), key);
        }
    }

    fn drain_random(&mut self) {
        let connected: Vec<usize> = (0..self.devices.len())
            .filter(|d| self.devices[*d].link.is_some())
            .collect();
        if let Some(&d) = connected.get(self.rng.index(connected.len().max(1))) {
            self.drain(d);
        }
    }

    fn drain_all(&mut self) {
        for d in 0..self.devices.len() {
            self.drain(d);
        }
        let zombies = std::mem::take(&mut self.zombies);
        for link in zombies {
            let mut bytes = BytesMut::new();
            link.outbox.take_into(&mut bytes);
            link.outbox.wrote(bytes.len());
            let world = &mut self.worlds[link.node];
            if link.generation != world.generation {
                continue;
            }
            if link.outbox.closing().is_some() || link.outbox.is_aborted() {
                world.shards[link.shard].on_closed(link.conn);
            } else {
                self.zombies.push(link);
            }
        }
    }

    /// Device `d` reads everything its connection was sent.
    fn drain(&mut self, d: usize) {
        let Some(link) = &self.devices[d].link else {
            return;
        };
        if link.generation != self.worlds[link.node].generation {
            // The gateway crashed under this connection.
            self.devices[d].link = None;
            self.forget_requests(d);
            return;
        }
        let mut bytes = BytesMut::new();
        link.outbox.take_into(&mut bytes);
        link.outbox.wrote(bytes.len());
        link.outbox.mark_flowing();
        let ended = link.outbox.closing().is_some() || link.outbox.is_aborted();
        let mut packets = Vec::new();
        while let Ok(Some(frame)) = self.decoder.next_frame(&mut bytes) {
            match Packet::decode(&frame, &self.verify) {
                Ok(packet) => packets.push(packet),
                Err(error) => self.violation(format!("server sent an undecodable frame: {error}")),
            }
        }
        for packet in packets {
            self.on_packet(d, packet);
        }
        // Reading the answers may let the gateway read more requests.
        self.feed(d);
        if ended {
            if let Some(link) = self.devices[d].link.take() {
                self.worlds[link.node].shards[link.shard].on_closed(link.conn);
                self.note(format!("{}: connection ended", self.name(d)));
                self.forget_requests(d);
            }
        }
    }

    fn on_packet(&mut self, d: usize, packet: Packet) {
        match packet {
            Packet::ConnAck(ack) if ack.reason == ReasonCode::Success => {
                if let Some(link) = &mut self.devices[d].link {
                    link.active = true;
                }
                self.note(format!("{}: connected", self.name(d)));
                self.resend_unacked(d);
            }
            Packet::SendAck(ack) => self.on_send_ack(d, ack),
            Packet::Recv(recv) => self.on_recv(d, recv),
            Packet::RecallResp(resp) => self.on_recall_resp(d, resp),
            Packet::ConversationOpResp(resp) => self.on_conversation_op_resp(d, resp),
            Packet::SyncConversationsResp(resp) => {
                let Some(since) = self.devices[d].conversation_syncs.remove(&resp.request_id)
                else {
                    return;
                };
                if resp.reason != ReasonCode::Success {
                    return;
                }
                let device = &mut self.devices[d];
                if since == 0 {
                    device.conversation_view.clear();
                }
                for c in &resp.conversations {
                    device.conversation_cursor = device.conversation_cursor.max(c.version);
                    device.conversation_view.insert(
                        (
                            u8::from(c.channel_type == ChannelType::Person),
                            c.channel_id.clone(),
                        ),
                        c.clone(),
                    );
                }
                device
                    .conversation_answers
                    .insert(resp.request_id, (resp.conversations, resp.more));
            }
            Packet::SyncMessagesResp(resp) => {
                let uid = self.devices[d].uid.clone();
                let node = self.devices[d].node;
                for recv in resp.messages {
                    self.check_against_store(node, &uid, &recv, "sync");
                }
            }
            Packet::Disconnect(disconnect) => {
                self.note(format!("{}: told {:?}", self.name(d), disconnect.reason));
            }
            _ => {}
        }
    }

    fn on_send_ack(&mut self, d: usize, ack: ruyi::protocol::SendAck) {
        let uid = self.devices[d].uid.clone();
        let no = ack.client_msg_no.clone();
        self.note(format!(
            "{}: SendAck {no} {:?} seq {} id {}",
            self.name(d),
            ack.reason,
            ack.message_seq,
            ack.message_id
        ));
        let retryable = matches!(
            ack.reason,
            ReasonCode::StorageError | ReasonCode::ServerBusy | ReasonCode::ServerShutdown
        );
        if !retryable {
            self.devices[d].unacked.retain(|n| *n != no);
        }
        let Some(attempt) = self.devices[d].attempts.remove(&ack.client_seq) else {
            return self.violation(format!(
                "SendAck for client_seq {}, never sent",
                ack.client_seq
            ));
        };
        let who = self.name(d);
        self.on_answered_send(&who, uid, attempt, ack);
    }

    /// A send of `uid`'s (from `who`, a device or the API) was answered:
    /// judged, and if stored, recorded.
    fn on_answered_send(
        &mut self,
        who: &str,
        uid: String,
        attempt: Attempt,
        ack: ruyi::protocol::SendAck,
    ) {
        let no = ack.client_msg_no.clone();
        self.judge_send_policy(who, &uid, &attempt, ack.reason);
        if ack.reason != ReasonCode::Success {
            return;
        }
        let Some(sent) = self.model.sent.get(&(uid.clone(), no.clone())).cloned() else {
            return self.violation(format!("SendAck success for {no}, never sent"));
        };
        if attempt.channel != sent.channel {
            return self.violation(format!(
                "{uid} reused {no} for {:?} (first sent to {:?}) and was told it is stored: it is not",
                attempt.channel, sent.channel
            ));
        }
        if sent.channel.kind() == ChannelType::Group
            && self
                .model
                .groups
                .get(sent.channel.id())
                .is_some_and(|g| g.generation != attempt.generation)
        {
            // Stored, then deleted with its group before this answer came.
            if let Some(s) = self.model.sent.get_mut(&(uid, no)) {
                s.acked = None;
                s.deleted = true;
            }
            return;
        }
        if let Some(before) = sent.acked {
            if before != (ack.message_seq, ack.message_id) {
                return self.violation(format!(
                    "{uid} {no}: acknowledged at {before:?}, now at ({}, {})",
                    ack.message_seq, ack.message_id
                ));
            }
        }
        // The acknowledged place holds exactly this message.
        let owner = self.writer_of_id(ack.message_id);
        match self.stored_message(&sent.channel, ack.message_seq) {
            Ok(Some(stored)) => {
                let same = stored.message_id.0 == ack.message_id
                    && stored.from_uid.as_str() == uid
                    && stored.client_msg_no == no
                    && (stored.recalled || stored.payload == sent.payload);
                if !same {
                    return self.violation(format!(
                        "{uid} {no} acknowledged at {:?} seq {} id {}, which holds {} {} id {} (a reused client_msg_no answered as stored?)",
                        sent.channel,
                        ack.message_seq,
                        ack.message_id,
                        stored.from_uid,
                        stored.client_msg_no,
                        stored.message_id.0
                    ));
                }
            }
            Ok(None) => {
                if !self.group_deleted(&sent.channel) {
                    return self.violation(format!(
                        "{uid} {no} acknowledged at {:?} seq {} but not stored",
                        sent.channel, ack.message_seq
                    ));
                }
            }
            Err(error) => return self.violation(format!("store read failed: {error}")),
        }
        let place = (sent.channel.clone(), ack.message_seq);
        let this = (ack.message_id, uid.clone(), no.clone());
        if let Some(other) = self.model.places.get(&place) {
            if *other != this && !self.group_deleted(&sent.channel) {
                return self.violation(format!(
                    "{:?} seq {} given to two messages: {other:?} and {this:?}",
                    place.0, place.1
                ));
            }
        }
        self.model.places.insert(place, this);
        // `msg.offline` is decided by the owning node's presence: a user
        // online only on another node is named offline there.
        let since = |step: Option<u64>| step.is_some_and(|s| s <= sent.first_step);
        let of_owner = |(node, uid): &(usize, String)| (*node == owner).then(|| uid.clone());
        let offline_must: BTreeSet<String> = self
            .model
            .presence
            .iter()
            .filter(|(_, t)| since(t.offline_since))
            .filter_map(|(k, _)| of_owner(k))
            .collect();
        let online_must: BTreeSet<String> = self
            .model
            .presence
            .iter()
            .filter(|(_, t)| since(t.active_since))
            .filter_map(|(k, _)| of_owner(k))
            .collect();
        if let Some(s) = self.model.sent.get_mut(&(uid, no)) {
            if s.acked.is_none() {
                self.summary.acked_sends += 1;
                s.offline_must = offline_must;
                s.online_must = online_must;
            }
            s.acked = Some((ack.message_seq, ack.message_id));
            s.deleted = false;
        }
    }

    /// A send to a group whose members and lists did not change around it
    /// was accepted or refused exactly as they say.
    fn judge_send_policy(&mut self, who: &str, uid: &str, attempt: &Attempt, reason: ReasonCode) {
        if !attempt.first {
            return;
        }
        if attempt.channel.kind() == ChannelType::Person {
            return self.judge_person_policy(who, uid, attempt, reason);
        }
        let Some(group) = self.model.groups.get(attempt.channel.id()) else {
            return;
        };
        if group.uncertain || group.in_flight > 0 || group.epoch != attempt.epoch {
            return;
        }
        let expected = if !group.exists {
            ReasonCode::ChannelMissing
        } else if !group.members.contains(uid) {
            ReasonCode::NotMember
        } else if group.deny.contains(uid) {
            ReasonCode::Denied
        } else if !group.allow.is_empty() && !group.allow.contains(uid) {
            ReasonCode::NotAllowed
        } else {
            ReasonCode::Success
        };
        let judged = matches!(
            reason,
            ReasonCode::Success
                | ReasonCode::ChannelMissing
                | ReasonCode::NotMember
                | ReasonCode::Denied
                | ReasonCode::NotAllowed
        );
        if judged && reason != expected {
            let message = format!(
                "{who}'s send {} to {:?} was answered {reason:?}; members {:?}, deny {:?}, allow {:?} say {expected:?}",
                attempt.client_msg_no,
                attempt.channel,
                group.members,
                group.deny,
                group.allow
            );
            self.violation(message);
        }
    }

    /// Every message given to a group member was sent while they were a
    /// member. Judged when no change of the group is waiting for its answer
    /// (or, with `all`, dropped if it can never be judged).
    fn check_memberships(&mut self, all: bool) {
        let checks = std::mem::take(&mut self.membership_checks);
        for (uid, key, seq, what) in checks {
            let Some(group) = self.model.groups.get(key.id()) else {
                continue;
            };
            if group.in_flight > 0 {
                if !all {
                    self.membership_checks.push((uid, key, seq, what));
                }
                continue;
            }
            if group.member_at(&uid, seq) == Some(false) {
                return self.violation(format!(
                    "{uid} got in {what} {key:?} seq {seq}, sent when they were not a member"
                ));
            }
        }
    }

    fn group_deleted(&self, key: &ChannelKey) -> bool {
        key.kind() == ChannelType::Group
            && self
                .model
                .groups
                .get(key.id())
                .is_none_or(|g| !g.exists || g.uncertain || g.in_flight > 0)
    }

    /// The message at `seq` is gone with a deletion of its group: the group
    /// is deleted (or its fate unknown), or `seq` belonged to an incarnation
    /// deleted since.
    fn erased_with_group(&self, key: &ChannelKey, seq: u64) -> bool {
        self.group_deleted(key)
            || (key.kind() == ChannelType::Group
                && self
                    .model
                    .groups
                    .get(key.id())
                    .is_some_and(|g| seq <= g.deleted_through))
    }

    /// A message a device was given matches the store.
    /// What a device connected to `node` was given is what that node
    /// stores.
    fn check_against_store(
        &mut self,
        node: usize,
        uid: &str,
        recv: &Recv,
        what: &'static str,
    ) -> Option<ChannelKey> {
        let key = match recv.channel_type {
            ChannelType::Person => ChannelKey::person(&Uid::new(uid), &Uid::new(&recv.channel_id)),
            _ => ChannelKey::group(&recv.channel_id),
        };
        match self.worlds[node]
            .reader
            .message(&key, ruyi::ids::Seq(recv.message_seq))
        {
            Ok(Some(stored)) => {
                let recalled = recv.flags & RECV_FLAG_RECALLED != 0;
                // A push may precede the recall the store already holds.
                let sent_payload = self
                    .model
                    .sent
                    .get(&(recv.from_uid.clone(), recv.client_msg_no.clone()))
                    .map(|s| s.payload.clone());
                let payload_ok = if recalled {
                    stored.recalled && recv.payload.is_empty()
                } else if stored.recalled {
                    sent_payload.is_some_and(|p| p == recv.payload)
                } else {
                    stored.payload == recv.payload
                };
                let same = stored.message_id.0 == recv.message_id
                    && stored.from_uid.as_str() == recv.from_uid
                    && stored.client_msg_no == recv.client_msg_no
                    && payload_ok;
                if !same {
                    self.violation(format!(
                        "{uid} got in {what} {key:?} seq {} id {} from {} {}, the store holds id {} from {} {}",
                        recv.message_seq,
                        recv.message_id,
                        recv.from_uid,
                        recv.client_msg_no,
                        stored.message_id.0,
                        stored.from_uid,
                        stored.client_msg_no
                    ));
                }
            }
            Ok(None) => {
                if !self.erased_with_group(&key, recv.message_seq) {
                    self.violation(format!(
                        "{uid} got in {what} {key:?} seq {}, which is not stored",
                        recv.message_seq
                    ));
                }
            }
            Err(error) => self.violation(format!("store read failed: {error}")),
        }
        if key.kind() == ChannelType::Group {
            // Judged once the changes around it have been answered.
            self.membership_checks
                .push((uid.to_owned(), key.clone(), recv.message_seq, what));
            self.check_memberships(false);
        }
        Some(key)
    }

    fn on_recv(&mut self, d: usize, recv: Recv) {
        self.summary.pushes += 1;
        let uid = self.devices[d].uid.clone();
        let device_id = self.devices[d].device_id.clone();
        let node = self.devices[d].node;
        let Some(key) = self.check_against_store(node, &uid, &recv, "a push") else {
            return;
        };
        let seq = recv.message_seq;
        let flagged = recv.flags & RECV_FLAG_REDELIVERED != 0;
        self.note(format!(
            "{}: Recv {key:?} seq {seq}{}",
            self.name(d),
            if flagged { " (redelivered)" } else { "" }
        ));
        if let Ok(Some(stored)) = self.worlds[node].reader.message(&key, ruyi::ids::Seq(seq)) {
            if stored.from_uid.as_str() == uid && *stored.from_device == *device_id {
                return self.violation(format!(
                    "{} was pushed its own send {key:?} seq {seq}",
                    self.name(d)
                ));
            }
        }
        if !flagged {
            if self.devices[d]
                .acked
                .get(&key)
                .is_some_and(|a| a.contains(&seq))
            {
                let session = self.worlds[node]
                    .reader
                    .device_session(&Uid::new(&uid), &device_id);
                let position =
                    self.worlds[node]
                        .reader
                        .device_position(&Uid::new(&uid), &device_id, &key);
                return self.violation(format!(
                    "{} was pushed {key:?} seq {seq} (id {}) again without the redelivered flag after acknowledging it (run {:?}, session {session:?}, position {position:?})",
                    self.name(d),
                    recv.message_id,
                    self.worlds[node].shards[0].run()
                ));
            }
            if let Some(link) = &mut self.devices[d].link {
                let last = link.last_unflagged.entry(key.clone()).or_default();
                if seq <= *last {
                    let last = *last;
                    return self.violation(format!(
                        "{} was pushed {key:?} seq {seq} after seq {last} on one connection without the redelivered flag",
                        self.name(d)
                    ));
                }
                *last = seq;
            }
        }
        let device = &mut self.devices[d];
        device
            .received
            .entry(key.clone())
            .or_default()
            .insert(seq, recv.message_id);
        // Everything received is acknowledged, a repeat too (as the SDK
        // does): an acknowledgement may have been lost with a connection.
        device.to_ack.push((key, seq, recv.message_id));
    }

    fn on_recall_resp(&mut self, d: usize, resp: ruyi::protocol::RecallResp) {
        let Some((key, no)) = self.devices[d].recalls.remove(&resp.request_id) else {
            return;
        };
        let uid = self.devices[d].uid.clone();
        self.note(format!(
            "{}: RecallResp {no} {:?}",
            self.name(d),
            resp.reason
        ));
        let sent = self.model.sent.get(&(uid.clone(), no.clone())).cloned();
        match resp.reason {
            ReasonCode::Success => {
                let Some(sent) = sent else {
                    return self.violation(format!("recall of {no}, never sent, succeeded"));
                };
                if sent.channel != key {
                    return self.violation(format!(
                        "recall of {no} in {key:?} succeeded, it was sent to {:?}",
                        sent.channel
                    ));
                }
                match self.stored_message(&key, resp.message_seq) {
                    Ok(Some(stored)) if stored.recalled && stored.client_msg_no == no => {}
                    // Recalled, then erased with its group (which may have
                    // been created again since).
                    Ok(None) if self.erased_with_group(&key, resp.message_seq) => {}
                    other => self.violation(format!(
                        "recall of {no} succeeded at seq {}, the store has {other:?}",
                        resp.message_seq
                    )),
                }
            }
            ReasonCode::MessageMissing => {
                // Allowed only when the send was not stored: refused, or
                // not acknowledged (and so perhaps never stored).
                if let Some(sent) = sent {
                    let erased = sent
                        .acked
                        .is_some_and(|(seq, _)| self.erased_with_group(&key, seq));
                    if sent.acked.is_some() && sent.channel == key && !erased {
                        self.violation(format!(
                            "{uid}'s recall of {no}, acknowledged at {:?}, answered MessageMissing",
                            sent.acked
                        ));
                    }
                }
            }
            _ => {}
        }
    }

    fn on_conversation_op_resp(&mut self, d: usize, resp: ruyi::protocol::ConversationOpResp) {
        let Some((key, action, _unread, seen, number, tangled)) =
            self.devices[d].conversation_ops.remove(&resp.request_id)
        else {
            return;
        };
        let uid = self.devices[d].uid.clone();
        // Operations of the user's devices on one conversation are applied
        // in the order the owner gets them, which is not the order they were
        // sent in (one may wait in an inbox), and their answers come over
        // different connections. An answer says where the row is only when
        // its operation was the only one unsettled from its sending to its
        // answer.
        let conv = self
            .model
            .conversations
            .entry((uid.clone(), key.clone()))
            .or_default();
        conv.in_flight = conv.in_flight.saturating_sub(1);
        let alone = !tangled && number == conv.issued;
        self.note(format!(
            "{}: ConversationOpResp {action:?} on {key:?}: {:?}{}",
            self.name(d),
            resp.reason,
            resp.conversation
                .as_ref()
                .map_or(String::new(), |c| format!(
                    " (read to {}, last seq {}{})",
                    c.read_seq,
                    c.last_message_seq,
                    if c.deleted { ", deleted" } else { "" }
                ))
        ));
        if resp.reason != ReasonCode::Success {
            return;
        }
        let Some(conversation) = resp.conversation else {
            return;
        };
        // Where the gateway put the read position: at least everything the
        // device had been given, at most what was stored by the answer.
        let cut = conversation.read_seq;
        if matches!(
            action,
            ConversationAction::ClearUnread | ConversationAction::Delete
        ) && (cut < seen || cut > conversation.last_message_seq)
        {
            return self.violation(format!(
                "{uid} {action:?} on {key:?} put the read position at {cut}: the device had seen seq {seen}, {} were stored",
                conversation.last_message_seq
            ));
        }
        let entry = self.model.conversations.entry((uid, key)).or_default();
        if !alone {
            entry.uncertain = true;
            return;
        }
        if entry.uncertain && conversation.deleted {
            // An earlier operation's answer was lost, and it was a delete
            // that landed: the conversation is hidden. A delete hides at
            // most what was committed when it ran, and the answer shows the
            // last seq committed now, so the delete hid exactly up to it.
            entry.delete_cut = entry.delete_cut.max(conversation.last_message_seq);
        }
        entry.uncertain = false;
        match action {
            ConversationAction::ClearUnread => entry.read_cut = cut,
            ConversationAction::Delete => {
                entry.read_cut = cut;
                entry.delete_cut = cut;
            }
            _ => {
                // SetUnread: the answer's unread is what the model checks
                // from now on; the read point is where that many messages
                // of others lie above it.
                entry.uncertain = true;
            }
        }
    }

    // ---- the operator -----------------------------------------------------

    fn control_random(&mut self) {
        if self.model.groups.is_empty() {
            return;
        }
        let group = format!("g{}", self.rng.index(self.options.groups));
        let key = ChannelKey::group(&group);
        let Some((node, owner)) = self.owner_of(&key) else {
            return self.note(format!("operator: nobody takes writes to {group} now"));
        };
        let uids: Vec<String> = (0..self.options.users)
            .filter(|_| self.rng.chance(40))
            .map(|u| format!("u{u}"))
            .collect();
        let exists = self.model.groups[&group].exists;
        let roll = self.rng.below(10);
        if !exists || roll < 4 {
            let change = if !exists || roll == 0 {
                SetChange::Replace
            } else if roll < 3 {
                SetChange::Add
            } else {
                SetChange::Remove
            };
            let uids = if change == SetChange::Replace && uids.is_empty() {
                vec!["u0".to_owned(), "u1".to_owned()]
            } else {
                uids
            };
            self.note(format!(
                "operator: {}group {group} {change:?} {uids:?}",
                self.node_name(node)
            ));
            let removes: Vec<String> = match change {
                SetChange::Add => Vec::new(),
                SetChange::Remove => uids.clone(),
                SetChange::Replace => (0..self.options.users)
                    .map(|u| format!("u{u}"))
                    .filter(|u| !uids.contains(u))
                    .collect(),
            };
            let (tx, rx) = async_channel::bounded(1);
            let now = self.worlds[node].now;
            self.worlds[node].shards[owner].change_group(&group, uids, change, tx, now);
            self.controls.push(ControlWait::Group {
                group: group.clone(),
                removes,
                rx,
            });
        } else if roll < 8 {
            let kind = if roll < 6 {
                ListKind::Deny
            } else {
                ListKind::Allow
            };
            let change = if self.rng.chance(60) {
                SetChange::Add
            } else {
                SetChange::Remove
            };
            self.note(format!(
                "operator: {kind:?} list of {group} {change:?} {uids:?}"
            ));
            let (tx, rx) = async_channel::bounded(1);
            self.worlds[node].shards[owner].change_list(key, kind, uids, change, tx);
            self.controls.push(ControlWait::List {
                group: group.clone(),
                kind,
                rx,
            });
        } else if roll == 8 {
            self.note(format!("operator: delete group {group}"));
            let (tx, rx) = async_channel::bounded(1);
            let now = self.worlds[node].now;
            self.worlds[node].shards[owner].api(ApiRequest::DeleteGroup { channel: key }, tx, now);
            self.controls.push(ControlWait::Delete {
                group: group.clone(),
                rx,
            });
        } else {
            return;
        }
        let model = self.model.groups.get_mut(&group).expect("group");
        model.in_flight += 1;
        model.epoch += 1;
    }

    fn poll_controls(&mut self) {
        let waits = std::mem::take(&mut self.controls);
        for wait in waits {
            match wait {
                ControlWait::Group { group, removes, rx } => match rx.try_recv() {
                    Ok(result) => {
                        if let Err(error) = &result {
                            echo(
                                &mut self.trace,
                                format!("operator: group {group} change refused: {error}"),
                            );
                        }
                        let model = self.model.groups.get_mut(&group).expect("group");
                        model.in_flight -= 1;
                        model.epoch += 1;
                        if let Ok(info) = result {
                            if !model.exists {
                                model.deleted_through = model.deleted_through.max(info.last_seq);
                            }
                            let members: BTreeSet<String> = info.members.into_iter().collect();
                            for uid in &members {
                                if !model.members.contains(uid)
                                    || !model.exists
                                    || model.maybe_left.contains(uid)
                                {
                                    model.joined.insert(uid.clone(), info.last_seq);
                                    model.join_guessed.remove(uid);
                                }
                                if model.maybe_left.contains(uid) {
                                    // Whether they left in the lost change
                                    // (and their row is new) is not known.
                                    self.model
                                        .conversations
                                        .entry((uid.clone(), ChannelKey::group(&group)))
                                        .or_default()
                                        .uncertain = true;
                                }
                            }
                            model.joined.retain(|uid, _| members.contains(uid));
                            model.join_guessed.retain(|uid| members.contains(uid));
                            model.exists = true;
                            model.members = members.clone();
                            model.history.push((info.last_seq, members));
                            echo(
                                &mut self.trace,
                                format!(
                                    "operator: group {group} now {:?} after seq {}",
                                    model.members, info.last_seq
                                ),
                            );
                        }
                    }
                    Err(async_channel::TryRecvError::Empty) => self
                        .controls
                        .push(ControlWait::Group { group, removes, rx }),
                    Err(async_channel::TryRecvError::Closed) => {
                        // Whom the lost change took out may have been put
                        // back by a later one: they are members again, but
                        // joined anew (they see only what comes after).
                        self.model
                            .groups
                            .get_mut(&group)
                            .expect("group")
                            .maybe_left
                            .extend(removes);
                        self.uncertain(&group)
                    }
                },
                ControlWait::List { group, kind, rx } => match rx.try_recv() {
                    Ok(result) => {
                        let model = self.model.groups.get_mut(&group).expect("group");
                        model.in_flight -= 1;
                        model.epoch += 1;
                        if let Ok(uids) = result {
                            let set = uids.into_iter().collect();
                            match kind {
                                ListKind::Allow => model.allow = set,
                                ListKind::Deny => model.deny = set,
                            }
                        }
                    }
                    Err(async_channel::TryRecvError::Empty) => {
                        self.controls.push(ControlWait::List { group, kind, rx })
                    }
                    Err(async_channel::TryRecvError::Closed) => self.uncertain(&group),
                },
                wait @ (ControlWait::PersonList { .. }
                | ControlWait::ApiSend { .. }
                | ControlWait::ApiRecall { .. }
                | ControlWait::ApiConversationOp { .. }
                | ControlWait::ApiChannelInfo { .. }) => {
                    if let Some(wait) = self.poll_extra(wait) {
                        self.controls.push(wait);
                    }
                }
                ControlWait::Delete { group, rx } => match rx.try_recv() {
                    Ok(response) => {
                        let model = self.model.groups.get_mut(&group).expect("group");
                        model.in_flight -= 1;
                        model.epoch += 1;
                        if let ApiResponse::Deleted { through } = response {
                            self.forget_deleted_group(&group, through.0);
                            echo(&mut self.trace, format!("operator: group {group} deleted"));
                        }
                    }
                    Err(async_channel::TryRecvError::Empty) => {
                        self.controls.push(ControlWait::Delete { group, rx })
                    }
                    Err(async_channel::TryRecvError::Closed) => {
                        self.model
                            .groups
                            .get_mut(&group)
                            .expect("group")
                            .delete_lost = true;
                        self.uncertain(&group)
                    }
                },
            }
        }
    }

    /// A group change's answer was lost (crash): read the group back.
    fn uncertain(&mut self, group: &str) {
        let model = self.model.groups.get_mut(group).expect("group");
        model.in_flight -= 1;
        model.uncertain = true;
    }

    /// After a crash: every group whose change was lost is read back from
    /// the store.
    fn reload_uncertain_groups(&mut self) {
        let groups: Vec<String> = self
            .model
            .groups
            .iter()
            .filter(|(_, g)| g.uncertain && g.in_flight == 0)
            .map(|(id, _)| id.clone())
            .collect();
        for group in groups {
            let key = ChannelKey::group(&group);
            if self.no_store_has_the_log(&key) {
                continue;
            }
            let owner = self.truth_node(&key);
            let reader = &mut self.worlds[owner].reader;
            let record = reader.load_channel(&key).ok().flatten();
            let deny = reader.list(&key, ListKind::Deny, 1000).unwrap_or_default();
            let allow = reader.list(&key, ListKind::Allow, 1000).unwrap_or_default();
            let delete_lost = std::mem::take(
                &mut self
                    .model
                    .groups
                    .get_mut(&group)
                    .expect("group")
                    .delete_lost,
            );
            let tombstone = record.as_ref().map_or(0, |r| r.last_seq.0);
            let current = record.and_then(|r| r.members.map(|m| (r.last_seq.0, m)));
            self.note(format!(
                "group {group} read back: members {:?}, last seq {tombstone}",
                current.as_ref().map(|(_, m)| m.len())
            ));
            let exists = self.model.groups[&group].exists;
            if exists && (current.is_none() || (delete_lost && self.known_message_gone(&key))) {
                // Deleted in the change whose answer was lost (and maybe
                // created again after it): its messages are gone with it,
                // and every seq below the first one stored now belonged to
                // the deleted incarnation.
                let first_stored = self.worlds[owner]
                    .reader
                    .read_messages(&key, ruyi::ids::Seq(1), 1, ReadDirection::Up)
                    .ok()
                    .and_then(|m| m.first().map(|m| m.seq.0 - 1));
                let through = first_stored.unwrap_or(tombstone);
                self.forget_deleted_group(&group, through);
                let model = self.model.groups.get_mut(&group).expect("group");
                model.deleted_through = model.deleted_through.max(through);
            }
            let model = self.model.groups.get_mut(&group).expect("group");
            if let Some((last, members)) = current {
                if !model.exists {
                    model.deleted_through = model.deleted_through.max(last);
                }
                let members: BTreeSet<String> =
                    members.iter().map(|u| u.as_str().to_owned()).collect();
                // Whoever joined in the lost change sees from about now on
                // (the change's place is not known: their unread is not
                // judged until they next clear it).
                for uid in &members {
                    if !model.members.contains(uid)
                        || !model.exists
                        || model.maybe_left.contains(uid)
                    {
                        model.joined.insert(uid.clone(), last);
                        model.join_guessed.insert(uid.clone());
                        self.model
                            .conversations
                            .entry((uid.clone(), key.clone()))
                            .or_default()
                            .uncertain = true;
                    }
                }
                model.joined.retain(|uid, _| members.contains(uid));
                model.join_guessed.retain(|uid| members.contains(uid));
                model.exists = true;
                model.members = members.clone();
                model.deny = deny.iter().map(|u| u.as_str().to_owned()).collect();
                model.allow = allow.iter().map(|u| u.as_str().to_owned()).collect();
                // Membership at seqs up to the last stored one is unknown:
                // only later messages are judged by it.
                model.history = vec![(last, members)];
            }
            let model = self.model.groups.get_mut(&group).expect("group");
            // History before the last known seq is unknown: messages at or
            // below it are not judged by membership.
            model.uncertain = false;
            model.maybe_left.clear();
            model.epoch += 1;
        }
    }

    /// A group was deleted: its messages, conversations and what devices
    /// hold of it are gone.
    /// `through`: the deleted group's last seq; later seqs belong to the
    /// group created again since (a device may have them already).
    fn forget_deleted_group(&mut self, group: &str, through: u64) {
        let model = self.model.groups.get_mut(group).expect("group");
        model.generation += 1;
        model.exists = false;
        model.members.clear();
        model.joined.clear();
        model.join_guessed.clear();
        model.deny.clear();
        model.allow.clear();
        model.history.clear();
        let key = ChannelKey::group(group);
        self.model
            .places
            .retain(|(k, seq), _| *k != key || *seq > through);
        for sent in self.model.sent.values_mut() {
            if sent.channel == key && sent.acked.is_none_or(|(seq, _)| seq <= through) {
                sent.acked = None;
                sent.deleted = true;
            }
        }
        for device in &mut self.devices {
            if let Some(received) = device.received.get_mut(&key) {
                received.retain(|seq, _| *seq > through);
            }
            if let Some(acked) = device.acked.get_mut(&key) {
                acked.retain(|seq| *seq > through);
            }
            device
                .to_ack
                .retain(|(k, seq, _)| *k != key || *seq > through);
        }
        // The rows go with the group. An operation on one still unanswered,
        // or whose answer was lost, may land on the group created again:
        // that conversation is uncertain until a later one is answered (the
        // deletion counts as an operation in between).
        self.model.conversations.retain(|(_, k), conv| {
            if *k != key {
                return true;
            }
            *conv = ConvModel {
                uncertain: conv.in_flight > 0 || conv.lost,
                issued: conv.issued + 1,
                in_flight: conv.in_flight,
                lost: conv.lost,
                ..ConvModel::default()
            };
            conv.uncertain
        });
    }

    /// Whether a message the model knows was stored in `key` is gone from
    /// the store: the evidence that a delete whose answer was lost landed.
    /// With no message known, nothing could be lost and the group is taken
    /// as not deleted.
    fn known_message_gone(&mut self, key: &ChannelKey) -> bool {
        let known = self
            .model
            .places
            .range((key.clone(), 0)..=(key.clone(), u64::MAX))
            .next()
            .map(|((_, seq), (id, _, _))| (*seq, *id));
        known.is_some_and(|(seq, id)| {
            !matches!(
                self.stored_message(key, seq),
                Ok(Some(stored)) if stored.message_id.0 == id
            )
        })
    }

    // ---- faults -------------------------------------------------------------

    fn deliver_random(&mut self) {
        let busy: Vec<(usize, usize, usize)> = self
            .worlds
            .iter()
            .enumerate()
            .flat_map(|(n, w)| w.busy_inboxes().into_iter().map(move |(f, t)| (n, f, t)))
            .collect();
        if busy.is_empty() {
            return;
        }
        let (n, from, to) = *self.rng.pick(&busy);
        self.note(format!("{}inbox {from} -> {to}", self.node_name(n)));
        self.worlds[n].deliver(from, to);
    }

    fn commit_random(&mut self) {
        let n = self.random_node();
        let i = self.rng.index(self.shard_count());
        let fail = self.rng.chance(self.options.write_failure_percent)
            || self.step_no < self.disk_full_until;
        self.observe_presence();
        let draw = self.log_draw();
        let what = self.worlds[n].commit_step(i, fail, draw);
        if what != "idle" {
            self.note(format!("{}shard {i}: commit {what}", self.node_name(n)));
        }
    }

    /// The seed of a commit step's log faults: drawn only in `[cluster]`
    /// runs, so the others replay as before.
    fn log_draw(&mut self) -> u64 {
        if self.options.log.is_some() {
            self.rng.next_u64()
        } else {
            0
        }
    }

    fn crash(&mut self) {
        let n = self.random_node();
        let write_begun = self.rng.chance(50);
        self.note(format!(
            "{}CRASH (prepared writes {})",
            self.node_name(n),
            if write_begun { "land" } else { "lost" }
        ));
        self.summary.crashes += 1;
        self.worlds[n].crash(write_begun);
        for d in 0..self.devices.len() {
            if self.devices[d].link.as_ref().is_some_and(|l| l.node == n) {
                self.devices[d].link = None;
                self.forget_requests(d);
            }
        }
        self.zombies.retain(|link| link.node != n);
        self.poll_controls();
        self.poll_forwards();
        self.reload_uncertain_groups();
        self.reload_uncertain_lists();
        // Every acknowledged message survived.
        self.check_acknowledged_are_stored();
    }

    // ---- settling and the liveness checks ---------------------------------

    /// Runs everything queued to completion, without faults.
    fn quiesce(&mut self) {
        for _ in 0..10_000 {
            self.collect_all();
            self.drain_all();
            self.collect_all();
            let mut moved = false;
            for n in 0..self.worlds.len() {
                for (from, to) in self.worlds[n].busy_inboxes() {
                    self.worlds[n].deliver(from, to);
                    moved = true;
                }
            }
            moved |= self.renew_all();
            for n in 0..self.worlds.len() {
                for i in 0..self.shard_count() {
                    loop {
                        self.observe_presence();
                        let draw = self.log_draw();
                        let what = self.worlds[n].commit_step(i, false, draw);
                        if what == "idle" {
                            break;
                        }
                        moved = true;
                    }
                    while !self.worlds[n].position_jobs[i].is_empty() {
                        self.worlds[n].run_position_job(i);
                    }
                    while self.worlds[n].follow_step(i) {
                        moved = true;
                    }
                    moved |= self.forward_all(n, i);
                }
            }
            self.poll_controls();
            moved |= self.poll_forwards();
            let outboxes_waiting = self
                .devices
                .iter()
                .any(|d| d.link.as_ref().is_some_and(|l| !l.outbox.is_empty()));
            if !moved
                && !outboxes_waiting
                && self.worlds.iter().all(|w| !w.busy())
                && self.forwarded.is_empty()
            {
                // Every operation whose answer was lost has landed or is
                // gone by now.
                for conv in self.model.conversations.values_mut() {
                    conv.lost = false;
                }
                return;
            }
            if self.failed() {
                return;
            }
        }
        self.violation("the gateway never went quiet".into());
    }

    fn settle(&mut self) {
        self.note("SETTLE".into());
        self.quiesce();
        // Let every retry fire and every window refill.
        for _ in 0..8 {
            self.advance(self.worlds[0].config.delivery.retry_interval_max_ms);
            self.retry_tick_all();
            self.quiesce();
        }
        self.reload_uncertain_groups();
        self.reload_uncertain_lists();
        // Everyone connects with resume and acknowledges everything, until
        // nothing more arrives.
        for d in 0..self.devices.len() {
            // A device that connected without resume is owed nothing from
            // before: every device connects again, with resume.
            if self.devices[d].link.is_some() {
                let goodbye = Packet::Disconnect(Disconnect {
                    reason: ReasonCode::Success,
                    message: String::new(),
                });
                self.write(d, &goodbye);
                self.drain(d);
                self.drop_link(d);
            }
            let shard = self.rng.index(self.shard_count());
            self.connect(d, shard, true);
        }
        // Until nothing new arrives for a few retry ticks in a row (a
        // refill may scan a device's own messages for a tick or two without
        // pushing anything).
        let mut quiet_ticks = 0;
        for _ in 0..200 {
            self.quiesce();
            for d in 0..self.devices.len() {
                self.ack(d, true);
            }
            self.quiesce();
            self.advance(self.worlds[0].config.delivery.retry_tick_ms);
            self.retry_tick_all();
            self.quiesce();
            if self.devices.iter().all(|d| d.to_ack.is_empty()) {
                quiet_ticks += 1;
                if quiet_ticks == 5 {
                    break;
                }
            } else {
                quiet_ticks = 0;
            }
        }
        if self.failed() {
            return;
        }
        self.check_webhooks();
        self.check_memberships(true);
        self.check_acknowledged_are_stored();
        self.check_channels_in_store();
        self.check_nodes_agree();
        self.check_every_device_has_what_it_may_see();
        self.check_conversations();
    }

    /// The webhook events written since the last check describe what is
    /// stored: a `msg.notify` names a stored message (or one a group
    /// deletion erased since), a `msg.offline` too, and its `to_uids` are
    /// members at the message's seq, sorted, each once, never the sender.
    /// Every acknowledged send was named by a `msg.notify` (its event is
    /// written in the commit that stores it).
    fn check_webhooks(&mut self) {
        let shards = self.shard_count();
        self.webhooks_read.resize(self.worlds.len(), Vec::new());
        for n in 0..self.worlds.len() {
            self.webhooks_read[n].resize(shards, 0);
            for shard in 0..shards {
                loop {
                    let after = self.webhooks_read[n][shard];
                    let events = match self.worlds[n].storage.webhook_events(
                        ruyi::ids::ShardId(shard as u16),
                        after,
                        1000,
                    ) {
                        Ok(events) => events,
                        Err(error) => {
                            return self.violation(format!("outbox read failed: {error}"))
                        }
                    };
                    let Some((last, _)) = events.last() else {
                        break;
                    };
                    self.webhooks_read[n][shard] = *last;
                    for (_, record) in events {
                        self.check_webhook_event(&record.event, &record.body);
                        if self.failed() {
                            return;
                        }
                    }
                }
            }
        }
        let acked: Vec<(String, String, Sent)> = self
            .model
            .sent
            .iter()
            .filter(|(_, s)| s.acked.is_some() && !s.deleted)
            .map(|((from, no), s)| (from.clone(), no.clone(), s.clone()))
            .collect();
        for (from, no, sent) in acked {
            let (seq, id) = sent.acked.expect("acked");
            if self.erased_with_group(&sent.channel, seq) {
                continue;
            }
            if !self.notified.contains(&(sent.channel.clone(), seq, id)) {
                return self.violation(format!(
                    "{no}, acknowledged at {:?} seq {seq}, was named by no msg.notify",
                    sent.channel
                ));
            }
            self.check_offline_recipients(&from, &no, &sent, seq);
            if self.failed() {
                return;
            }
        }
    }

    /// `msg.offline` names exactly the recipients with no device that can
    /// take the message: every recipient the gateway knew to be offline
    /// from the send to its answer, and nobody with a connection active
    /// throughout.
    fn check_offline_recipients(&mut self, from: &str, no: &str, sent: &Sent, seq: u64) {
        let empty = BTreeSet::new();
        let named = self
            .offline_named
            .get(&(sent.channel.clone(), seq))
            .unwrap_or(&empty);
        if let Some(online) = named.intersection(&sent.online_must).next() {
            return self.violation(format!(
                "msg.offline for {no} ({:?} seq {seq}) names {online}, online throughout",
                sent.channel
            ));
        }
        if self.worlds.iter().any(|w| w.webhooks_dropped() > 0) {
            return;
        }
        for uid in &sent.offline_must {
            if named.contains(uid) || uid == from {
                continue;
            }
            let recipient = match sent.channel.person_pair() {
                Some((low, high)) => Some(uid == low || uid == high),
                None => self
                    .model
                    .groups
                    .get(sent.channel.id())
                    .and_then(|g| g.member_at(uid, seq)),
            };
            if recipient == Some(true) {
                return self.violation(format!(
                    "msg.offline for {no} ({:?} seq {seq}) leaves out {uid}, offline throughout (it names {named:?})",
                    sent.channel
                ));
            }
        }
    }

    fn check_webhook_event(&mut self, event: &str, body: &[u8]) {
        let json: serde_json::Value = match serde_json::from_slice(body) {
            Ok(json) => json,
            Err(error) => return self.violation(format!("{event} body is not JSON: {error}")),
        };
        let messages: Vec<serde_json::Value> = match (event, json) {
            ("msg.notify", serde_json::Value::Array(messages)) => messages,
            ("msg.offline", message @ serde_json::Value::Object(_)) => vec![message],
            (event, other) => {
                return self.violation(format!("unexpected webhook event {event}: {other}"))
            }
        };
        for message in messages {
            let from = message["from_uid"].as_str().unwrap_or_default().to_owned();
            let channel_id = message["channel_id"].as_str().unwrap_or_default();
            let key = match message["channel_type"].as_u64() {
                Some(1) => ChannelKey::person(&Uid::new(&from), &Uid::new(channel_id)),
                _ => ChannelKey::group(channel_id),
            };
            let seq = message["message_seq"].as_u64().unwrap_or_default();
            let id = message["message_id"].as_u64().unwrap_or_default();
            let revoked = message["revoke"].as_u64() == Some(1);
            let stored = self.stored_message(&key, seq);
            match stored {
                Ok(Some(stored)) if stored.message_id.0 == id => {}
                Ok(None) if self.erased_with_group(&key, seq) => {}
                other => {
                    return self.violation(format!(
                        "{event} names {key:?} seq {seq} id {id}, the store has {other:?}"
                    ))
                }
            }
            if event == "msg.notify" && !revoked {
                self.notified.insert((key.clone(), seq, id));
            }
            if event == "msg.offline" {
                let to: Vec<String> = message["to_uids"]
                    .as_array()
                    .map(|uids| {
                        uids.iter()
                            .map(|u| u.as_str().unwrap_or_default().to_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                let mut sorted = to.clone();
                sorted.sort();
                sorted.dedup();
                if to.is_empty() || sorted != to || to.contains(&from) {
                    return self.violation(format!(
                        "msg.offline for {key:?} seq {seq} from {from} names {to:?}"
                    ));
                }
                self.offline_named
                    .entry((key.clone(), seq))
                    .or_default()
                    .extend(to.iter().cloned());
                if key.kind() == ChannelType::Group {
                    for uid in to {
                        self.membership_checks
                            .push((uid, key.clone(), seq, "msg.offline"));
                    }
                } else if let Some((low, high)) = key.person_pair() {
                    if to.iter().any(|u| u != low && u != high) {
                        return self
                            .violation(format!("msg.offline for {key:?} seq {seq} names {to:?}"));
                    }
                }
            }
        }
    }

    fn check_acknowledged_are_stored(&mut self) {
        let acked: Vec<((String, String), Sent)> = self
            .model
            .sent
            .iter()
            .filter(|(_, s)| s.acked.is_some())
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for ((uid, no), sent) in acked {
            if self.group_deleted(&sent.channel) {
                continue;
            }
            let (seq, id) = sent.acked.expect("acked");
            match self.stored_message(&sent.channel, seq) {
                Ok(Some(stored)) if stored.message_id.0 == id && stored.client_msg_no == no => {}
                other => {
                    return self.violation(format!(
                    "{uid} {no} acknowledged at {:?} seq {seq} id {id}, the store has {other:?}",
                    sent.channel
                ))
                }
            }
        }
    }

    /// Every channel's stored seqs run 1, 2, 3... with no gap, and every
    /// stored message is one a client sent, stored once.
    fn check_channels_in_store(&mut self) {
        let channels: Vec<ChannelKey> = self.model.channels.iter().cloned().collect();
        let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
        for key in channels {
            let owner = self.truth_node(&key);
            let stored = match self.worlds[owner].reader.read_messages(
                &key,
                ruyi::ids::Seq(1),
                100_000,
                ReadDirection::Up,
            ) {
                Ok(stored) => stored,
                Err(error) => return self.violation(format!("store read failed: {error}")),
            };
            let first = stored.first().map_or(1, |m| m.seq.0);
            let deleted_before = key.kind() == ChannelType::Group && first > 1;
            for (i, message) in stored.iter().enumerate() {
                if message.seq.0 != first + i as u64 {
                    let before = &stored[i - 1];
                    return self.violation(format!(
                        "{key:?} has a gap: seq {} where {} was due (seq {} is {}'s {}{}, seq {} is {}'s {}{})",
                        message.seq.0,
                        first + i as u64,
                        before.seq.0,
                        before.from_uid.as_str(),
                        before.client_msg_no,
                        if before.recalled { " recalled" } else { "" },
                        message.seq.0,
                        message.from_uid.as_str(),
                        message.client_msg_no,
                        if message.recalled { " recalled" } else { "" },
                    ));
                }
                let who = (
                    message.from_uid.as_str().to_owned(),
                    message.client_msg_no.clone(),
                );
                if !seen.insert(who.clone()) {
                    return self.violation(format!("{who:?} is stored twice"));
                }
                match self.model.sent.get(&who) {
                    None => {
                        return self.violation(format!(
                            "{key:?} seq {} was never sent: {who:?}",
                            message.seq.0
                        ))
                    }
                    Some(sent) => {
                        if sent.channel != key
                            || (!message.recalled && sent.payload != message.payload)
                        {
                            return self.violation(format!(
                                "{key:?} seq {} holds {who:?}, which was sent to {:?}",
                                message.seq.0, sent.channel
                            ));
                        }
                        if let Some((seq, id)) = sent.acked {
                            if seq != message.seq.0 || id != message.message_id.0 {
                                return self.violation(format!(
                                    "{who:?} acknowledged at seq {seq} id {id}, stored at seq {} id {}",
                                    message.seq.0, message.message_id.0
                                ));
                            }
                        }
                    }
                }
            }
            if first != 1 && !deleted_before {
                return self.violation(format!("{key:?} starts at seq {first}"));
            }
        }
    }

    /// The seq after which `uid` is owed the messages of `key`, or `None`
    /// when they are owed nothing there (not a member, or the model cannot
    /// tell).
    fn owed_floor(&self, uid: &str, key: &ChannelKey) -> Option<u64> {
        let conv = self
            .model
            .conversations
            .get(&(uid.to_owned(), key.clone()))
            .copied()
            .unwrap_or_default();
        if conv.uncertain {
            return None;
        }
        let mut floor = conv.read_cut.max(conv.delete_cut);
        match key.person_pair() {
            Some((low, high)) => {
                if low != uid && high != uid {
                    return None;
                }
            }
            None => {
                let group = self.model.groups.get(key.id())?;
                if !group.exists || group.uncertain || !group.members.contains(uid) {
                    return None;
                }
                floor = floor.max(*group.joined.get(uid)?);
            }
        }
        Some(floor)
    }

    fn check_every_device_has_what_it_may_see(&mut self) {
        let channels: Vec<ChannelKey> = self.model.channels.iter().cloned().collect();
        for key in channels {
            let owner = self.truth_node(&key);
            let stored = self.worlds[owner]
                .reader
                .read_messages(&key, ruyi::ids::Seq(1), 100_000, ReadDirection::Up)
                .unwrap_or_default();
            for d in 0..self.devices.len() {
                let uid = self.devices[d].uid.clone();
                let Some(floor) = self.owed_floor(&uid, &key) else {
                    continue;
                };
                for message in stored.iter().filter(|m| m.seq.0 > floor) {
                    let own = message.from_uid.as_str() == uid
                        && *message.from_device == *self.devices[d].device_id;
                    if own {
                        continue;
                    }
                    let has = self.devices[d]
                        .received
                        .get(&key)
                        .is_some_and(|r| r.contains_key(&message.seq.0));
                    if !has {
                        let uid_ = Uid::new(&uid);
                        let reader = &mut self.worlds[self.devices[d].node].reader;
                        let position =
                            reader.device_position(&uid_, &self.devices[d].device_id, &key);
                        let row = reader.conversation(&uid_, &key);
                        return self.violation(format!(
                            "{} never got {key:?} seq {} (owed after seq {floor}; stored position {position:?}, row {row:?}, acked {:?})",
                            self.name(d),
                            message.seq.0,
                            self.devices[d].acked.get(&key)
                        ));
                    }
                }
            }
        }
    }

    /// Each user's full conversation list, and unread counts, as the model
    /// has them.
    /// The device's list kept by incremental syncs (from the highest
    /// version it got, never again from 0) agrees with a full sync: no
    /// change that committed after an earlier sync was skipped. (Rows that
    /// are gone, a former member's or a deleted group's, are not reported
    /// by an incremental sync: those are not judged.)
    fn check_incremental_view(&mut self, d: usize, uid: &str, full: &[Conversation]) {
        for _ in 0..100 {
            let since = self.devices[d].conversation_cursor;
            let request = self.sync_conversations(d, since);
            self.quiesce();
            let Some((_, more)) = self.devices[d].conversation_answers.remove(&request) else {
                return self.violation(format!("{uid}: no answer to a conversation sync"));
            };
            if !more {
                break;
            }
        }
        let full: BTreeMap<(u8, String), &Conversation> = full
            .iter()
            .map(|c| {
                (
                    (
                        u8::from(c.channel_type == ChannelType::Person),
                        c.channel_id.clone(),
                    ),
                    c,
                )
            })
            .collect();
        let view = self.devices[d].conversation_view.clone();
        for (key, c) in &full {
            match view.get(key) {
                Some(v) if v.version == c.version && !v.deleted => {}
                other => {
                    return self.violation(format!(
                        "{} kept {key:?} as {:?} by incremental syncs (cursor {}); a full sync shows version {} (last seq {}, unread {})",
                        self.name(d),
                        other.map(|v| (v.version, v.last_message_seq, v.unread, v.deleted)),
                        self.devices[d].conversation_cursor,
                        c.version,
                        c.last_message_seq,
                        c.unread
                    ))
                }
            }
        }
        for (key, v) in &view {
            if v.deleted || full.contains_key(key) {
                continue;
            }
            let channel = if key.0 == 1 {
                ChannelKey::person(&Uid::new(uid), &Uid::new(&key.1))
            } else {
                ChannelKey::group(&key.1)
            };
            if matches!(
                self.worlds[self.devices[d].node]
                    .reader
                    .conversation(&Uid::new(uid), &channel),
                Ok(Some(_))
            ) {
                return self.violation(format!(
                    "{} kept {key:?} visible (version {}) by incremental syncs; a full sync does not list it",
                    self.name(d),
                    v.version
                ));
            }
        }
    }

    /// On every node, through a device connected there.
    fn check_conversations(&mut self) {
        let users: Vec<String> = (0..self.options.users).map(|u| format!("u{u}")).collect();
        let nodes = self.worlds.len();
        for (uid, n) in users
            .into_iter()
            .flat_map(|uid| (0..nodes).map(move |n| (uid.clone(), n)))
        {
            let Some(d) = (0..self.devices.len()).find(|d| {
                self.devices[*d].uid == uid
                    && self.devices[*d].node == n
                    && self.devices[*d].link.as_ref().is_some_and(|l| l.active)
            }) else {
                continue;
            };
            let request = self.sync_conversations(d, 0);
            self.quiesce();
            let Some((list, more)) = self.devices[d].conversation_answers.remove(&request) else {
                return self.violation(format!("{uid}: no answer to a conversation sync"));
            };
            if more {
                continue;
            }
            self.check_incremental_view(d, &uid, &list);
            if self.failed() {
                return;
            }
            let got: BTreeMap<ChannelKey, &Conversation> = list
                .iter()
                .map(|c| {
                    let key = match c.channel_type {
                        ChannelType::Person => {
                            ChannelKey::person(&Uid::new(&uid), &Uid::new(&c.channel_id))
                        }
                        _ => ChannelKey::group(&c.channel_id),
                    };
                    (key, c)
                })
                .collect();
            let channels: Vec<ChannelKey> = self.model.channels.iter().cloned().collect();
            for key in channels {
                let stored = self.worlds[n]
                    .reader
                    .read_messages(&key, ruyi::ids::Seq(1), 100_000, ReadDirection::Up)
                    .unwrap_or_default();
                let last = stored.last().map_or(0, |m| m.seq.0);
                let Some(floor) = self.owed_floor(&uid, &key) else {
                    if key.kind() == ChannelType::Group
                        && self.model.groups.get(key.id()).is_some_and(|g| {
                            !g.uncertain
                                && g.in_flight == 0
                                && (!g.exists || !g.members.contains(&uid))
                        })
                        && got.contains_key(&key)
                    {
                        let row = self.worlds[n].reader.conversation(&Uid::new(&uid), &key);
                        return self.violation(format!(
                            "{uid} lists {key:?}, of which they are not a member (row {row:?})"
                        ));
                    }
                    continue;
                };
                let conv = self
                    .model
                    .conversations
                    .get(&(uid.clone(), key.clone()))
                    .copied()
                    .unwrap_or_default();
                let hidden_below = match key.kind() {
                    ChannelType::Group => conv.delete_cut.max(
                        self.model.groups[key.id()]
                            .joined
                            .get(&uid)
                            .copied()
                            .unwrap_or(0),
                    ),
                    _ => conv.delete_cut,
                };
                let visible = last > hidden_below;
                // A join point guessed after a crash (the change's place
                // was lost) does not decide visibility: the real one may
                // lie below it.
                if !visible
                    && last > conv.delete_cut
                    && key.kind() == ChannelType::Group
                    && self.model.groups[key.id()].join_guessed.contains(&uid)
                {
                    continue;
                }
                match (visible, got.get(&key)) {
                    (true, None) => {
                        let row = self.worlds[n].reader.conversation(&Uid::new(&uid), &key);
                        return self.violation(format!(
                            "{uid}'s conversation list lacks {key:?} (last seq {last}, hidden to {hidden_below}; row {row:?})"
                        ));
                    }
                    (false, Some(_)) => {
                        let row = self.worlds[n].reader.conversation(&Uid::new(&uid), &key);
                        return self.violation(format!(
                            "{uid}'s conversation list shows {key:?}, hidden to {hidden_below}, last seq {last} (row {row:?})"
                        ));
                    }
                    (true, Some(c)) => {
                        if c.last_message_seq != last {
                            return self.violation(format!(
                                "{uid}'s {key:?} shows last seq {}, the store {last}",
                                c.last_message_seq
                            ));
                        }
                        let unread = stored
                            .iter()
                            .filter(|m| m.seq.0 > floor && m.from_uid.as_str() != uid)
                            .count() as u64;
                        if c.unread != unread {
                            return self.violation(format!(
                                "{uid}'s {key:?} shows {} unread, the model {unread} (read to {floor})",
                                c.unread
                            ));
                        }
                    }
                    (false, None) => {}
                }
            }
        }
    }
}

/// Runs one seed on `store`. A panic in the gateway (an assertion of its
/// own) is a failure of the seed like any other.
pub fn run_seed(seed: u64, store: StoreKind) -> Result<(Summary, Vec<String>), Failure> {
    run_options(Options::from_seed(seed, store))
}

/// Runs one seed with `options` (for instance `Options::classic`).
pub fn run_options(options: Options) -> Result<(Summary, Vec<String>), Failure> {
    let seed = options.seed;
    let run = std::panic::catch_unwind(|| Sim::new(options).run());
    match run {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Err(Failure {
                seed,
                message: format!("the gateway panicked: {message}"),
                trace: Vec::new(),
            })
        }
    }
}

pub fn describe(summary: &Summary) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{} steps, {} crashes, {} acknowledged sends, {} pushes",
        summary.steps, summary.crashes, summary.acked_sends, summary.pushes
    );
    out
}

// The simulator under the fuzzer: its choices read from an input.
#[path = "input.rs"]
mod input;
// The operations `Options::extras` turns on.
#[path = "extras.rs"]
mod extras;
// What passes between cluster nodes (`Options::nodes`).
#[path = "nodes.rs"]
mod nodes;
pub use input::run_input;
