//! One shard's state and logic, without sockets or executors: its
//! connections, its view of presence, the channels it owns, and the batches
//! it has queued for other shards. The runtime calls in with frames, inbox
//! batches and the time; everything this produces goes to connection
//! [`Outbox`]es, to per-shard outgoing batches, or to storage. Tests drive it
//! directly.

use super::api::{ApiReply, ApiRequest, ApiResponse, ChannelDetails};
use super::budget::{Stage, StageLatency};
use super::channels::{person_policy, GroupChange, OwnedChannels};
pub use super::commit::{CommitLatency, InFlight, COMMIT_BUCKETS_US};
use super::commit::{CommitPipeline, Pending, Resend, Waiters};
use super::login::{check_connect, Refused};
use super::message::ShardMsg;
pub use super::message_ids::{first_id_of_run, MessageIdGenerator};
use super::notify::Notify;
use super::presence::Presence;
use super::pushes::{Ack, Device, Live, Pushes};
use super::sessions::{Sessions, Written};

use super::reads::{
    build_conversation, list_conversations, message_to_recall, recv_view, sync_messages, RecallBy,
};
use super::versions::VersionFrontier;
use super::webhooks;
use crate::auth::Authenticator;
use crate::channel::{resolve_target, valid_uid, Channel, ChannelKey, IdLimits};
use crate::config::Limits;
use crate::conn::outbox::Outbox;
use crate::conn::session::{step, Phase, Step};
use crate::ids::{ConnId, MessageId, Millis, Seq, ShardId, Uid};
use crate::protocol::{
    encode_recv, ConnAck, Conversation, ConversationOp, ConversationOpResp, Packet, ReasonCode,
    Recall, RecallEvent, RecallResp, RecvFields, SendAck, SendPacket, SyncConversations,
    SyncConversationsResp, SyncMessages, SyncMessagesResp, VerifyLimits, RECV_FLAG_FROM_SELF,
    RECV_FLAG_REDELIVERED,
};
use crate::storage::{
    CommitJob, ConversationRecord, ListKind, Mutation, ShardStore, StorageError, StoredMessage,
};
use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// Per shard of this node, the recipients of a delivery there.
type PerShard = SmallVec<[SmallVec<[Uid; 4]>; 8]>;

/// The current time, as the runtime read it.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub monotonic: Millis,
    pub unix_ms: u64,
    /// Monotonic microseconds on a clock every shard shares (the runtime's
    /// [`crate::time::SystemClock::micros`]): `monotonic` in finer steps
    /// (`monotonic` is this divided by 1000), for the latency budget and
    /// the push timers.
    pub micros: u64,
}

/// Wake-ups the state gives its runtime when it queues work.
#[derive(Debug)]
pub struct Signals {
    /// Sends or group changes wait for a commit.
    pub commit: Notify,
    /// Index = target shard: a batch waits to be sent there.
    pub flush: Vec<Notify>,
    /// Writes wait to be forwarded to the cluster nodes owning them.
    pub forward: Notify,
}

impl Signals {
    pub fn new(shards: u16) -> Signals {
        Signals {
            commit: Notify::default(),
            flush: (0..shards).map(|_| Notify::default()).collect(),
            forward: Notify::default(),
        }
    }
}

pub use super::channels::SetChange;

pub use super::api::{ControlError, GroupInfo, GroupReply, ListReply};

/// Counters exported for observability and checked by tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShardStats {
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub messages_committed: u64,
    pub recvs_written: u64,
    pub commit_batches: u64,
    pub redeliveries: u64,
    /// Sends this shard sequenced as a channel's owner (from clients and
    /// the API), accepted or refused.
    pub sends_received: u64,
    /// Connections refused by the per-IP accept rate.
    pub connections_rate_limited: u64,
    /// `RecvAck` frames from this shard's connections.
    pub acks_received: u64,
    /// Idle channels dropped from memory (`channels_cached_per_shard_max`).
    pub channels_evicted: u64,
    /// Connections cut off for not reading what was queued for them.
    pub slow_consumers: u64,
    /// Gauges, filled in by [`ShardState::current_stats`]: bytes queued for
    /// connections and not written yet, and channels held in memory.
    pub outbound_queued_bytes: u64,
    pub channels_cached: usize,
    pub commit_latency: CommitLatency,
    /// The latency budget (see [`super::budget`]).
    pub budget: StageLatency,
}

/// A request that waits for a group's deletion to land or fail.
enum Parked {
    Send {
        origin: ConnId,
        from: Uid,
        from_device: Arc<str>,
        packet: SendPacket,
        checked: bool,
        read_us: u64,
    },
    ConversationOp {
        origin: ConnId,
        uid: Uid,
        op: ConversationOp,
    },
    Recall {
        origin: ConnId,
        uid: Uid,
        recall: Recall,
    },
    Group {
        uids: Vec<String>,
        change: SetChange,
        reply: GroupReply,
    },
    List {
        kind: ListKind,
        uids: Vec<String>,
        change: SetChange,
        reply: ListReply,
    },
    Api(ApiRequest, ApiReply),
}

/// A write a connection of this shard made to a channel another cluster
/// node owns: forwarded there, and answered with what the owner answers.
#[derive(Debug)]
pub struct Forwarded {
    pub conn: ConnId,
    pub partition: u32,
    pub request: ApiRequest,
}

/// Work of a cluster batch the log did not store (see
/// [`ShardState::split_stored`]).
pub struct Unstored(Vec<Pending>);

pub struct ShardState {
    pub id: ShardId,
    shards: u16,
    /// Which shard owns each channel.
    routing: crate::key::Routing,
    /// A cluster node's log has not answered a commit for a while: new
    /// sends are refused (retryable) instead of queued behind it.
    log_unavailable: bool,
    limits: Limits,
    id_limits: IdLimits,
    verify: VerifyLimits,
    auth: Authenticator,
    signals: Rc<Signals>,
    sessions: Sessions,
    presence: Presence,
    channels: OwnedChannels,
    store: Box<dyn ShardStore>,
    pipeline: CommitPipeline,
    allowlist_for_person: bool,
    /// Pushes not acknowledged, backlogs and positions not saved yet.
    pushes: Pushes,
    outgoing: Vec<Vec<ShardMsg>>,
    outgoing_total: usize,
    frame_scratch: BytesMut,
    webhooks: Option<crate::webhook::WebhookWriter>,
    /// Requests for a group whose deletion is being committed, in arrival
    /// order: served when the deletion lands (the group is gone) or fails
    /// (it is not), never answered by a guess before.
    parked: HashMap<ChannelKey, Vec<Parked>, ahash::RandomState>,
    /// The sender of system messages; no client may log in as it.
    system_uid: Option<Uid>,
    /// Writes waiting to be forwarded to the nodes owning them.
    forwards: Vec<Forwarded>,
    pub stats: ShardStats,
}

impl ShardState {
    pub fn new(
        id: ShardId,
        shards: u16,
        limits: Limits,
        idempotency_ttl_ms: u64,
        auth: Authenticator,
        store: Box<dyn ShardStore>,
        signals: Rc<Signals>,
    ) -> ShardState {
        assert!(id.0 < shards);
        assert_eq!(signals.flush.len(), usize::from(shards));
        let pushes = Pushes::new(
            &limits,
            crate::config::DeliveryConfig::default().retry_policy(),
            u64::from(id.0) + 1,
            0,
        );
        let channels = OwnedChannels::new(
            limits.channels_cached_per_shard_max,
            limits.group_members_max,
        );
        ShardState {
            id,
            shards,
            routing: crate::key::Routing::Hash { shards },
            log_unavailable: false,
            id_limits: IdLimits {
                uid_length_max_bytes: limits.uid_length_max_bytes,
                channel_id_length_max_bytes: limits.channel_id_length_max_bytes,
            },
            verify: VerifyLimits::for_frame_size(limits.frame_size_max_bytes),
            limits,
            auth,
            signals,
            sessions: Sessions::new(id),
            presence: Presence::default(),
            channels,
            store,
            pipeline: CommitPipeline::new(id, idempotency_ttl_ms),
            allowlist_for_person: false,
            pushes,
            outgoing: (0..shards).map(|_| Vec::new()).collect(),
            outgoing_total: 0,
            frame_scratch: BytesMut::new(),
            webhooks: None,
            parked: HashMap::default(),
            system_uid: None,
            forwards: Vec::new(),
            stats: ShardStats::default(),
        }
    }

    /// Starts this run of the shard: message ids continue above every id
    /// an earlier run recorded and above `run`, the first id of this run
    /// (from [`first_id_of_run`], the same for every shard of the process).
    pub fn start_run(&mut self, run: MessageId) {
        self.pipeline.start_run(run);
    }

    /// Tags this shard's message ids (and versions and webhook ids) with
    /// `tag` instead of its number: a cluster node's shards include the
    /// node (see [`crate::cluster::partition::id_tag`]).
    pub fn set_id_tag(&mut self, tag: u16) {
        self.pipeline.set_id_tag(tag);
    }

    /// The first message id of this run (see [`ShardState::start_run`]).
    pub fn run(&self) -> MessageId {
        self.pipeline.run()
    }

    /// Routes channels by `routing` instead of the hash over the shards (a
    /// cluster node routes by partition).
    pub fn set_routing(&mut self, routing: crate::key::Routing) {
        self.routing = routing;
    }

    /// Whether new sends are refused because the log is not answering.
    pub fn set_log_unavailable(&mut self, unavailable: bool) {
        self.log_unavailable = unavailable;
    }

    /// Webhook events this shard writes with its commits.
    pub fn set_webhooks(&mut self, writer: Option<crate::webhook::WebhookWriter>) {
        self.webhooks = writer;
    }

    /// Shares the shards' closed conversation versions (see
    /// [`super::versions`]); without it a shard counts only itself.
    pub fn share_versions(&mut self, versions: Arc<VersionFrontier>) {
        self.pipeline.share_versions(versions);
    }

    /// Publishes this shard's closed conversation version.
    fn publish_versions(&mut self) {
        self.pipeline.publish_versions();
    }

    /// The version through which every conversation change of every shard
    /// is visible (see [`CommitPipeline::closed_version`]).
    fn closed_version(&mut self, now: Now) -> Result<u64, StorageError> {
        self.pipeline.closed_version(now.unix_ms, &mut *self.store)
    }

    /// Queues work for the next commit and wakes the committer.
    fn queue(&mut self, pending: Pending) {
        self.pipeline.queue(pending);
        self.signals.commit.notify();
    }

    /// The uid system messages come from; clients may not log in as it.
    pub fn set_system_uid(&mut self, uid: &str) {
        self.system_uid = Some(Uid::new(uid));
    }

    /// Messages queued for other shards and not yet handed to their inboxes.
    pub fn outgoing_depth(&self) -> usize {
        self.outgoing_total
    }

    /// Whether a person channel's recipient's allow list applies (the
    /// `allowlist_for_person` setting).
    pub fn set_allowlist_for_person(&mut self, on: bool) {
        self.allowlist_for_person = on;
    }

    /// How unacknowledged pushes are retried; `now` starts the timers' clock.
    pub fn set_retry_policy(&mut self, policy: crate::delivery::RetryPolicy, now: Now) {
        self.pushes
            .set_retry_policy(policy, u64::from(self.id.0) + 1, now.monotonic.0);
    }

    pub fn connection_count(&self) -> usize {
        self.sessions.len()
    }

    /// `uid`'s logged-in connections on this shard: how many there are, and
    /// how many of them are active (every shard has applied their presence).
    pub fn user_connections(&self, uid: &Uid) -> (usize, usize) {
        let conns = self.sessions.local_conns(uid);
        let active = conns
            .iter()
            .filter(|c| self.sessions.is_active(**c))
            .count();
        (conns.len(), active)
    }

    /// The counters, with the gauges read now.
    pub fn current_stats(&self) -> ShardStats {
        ShardStats {
            outbound_queued_bytes: self.sessions.outbound_queued_bytes(),
            channels_cached: self.channels.len(),
            channels_evicted: self.channels.evicted,
            ..self.stats
        }
    }

    /// Channels held in memory (at most `channels_cached_per_shard_max`,
    /// but for those with work in flight).
    pub fn channels_cached(&self) -> usize {
        self.channels.len()
    }

    /// Channels held in memory that cannot be dropped now: work for them
    /// is queued or being committed.
    pub fn channels_busy(&self) -> usize {
        self.channels.busy_count(&self.pipeline.busy())
    }

    // ---- connection lifecycle -------------------------------------------

    /// Whether a new connection from `ip` is within the accept rate
    /// (`accepts_per_ip_per_second`, this shard's share of it).
    pub fn admit_ip(&mut self, ip: std::net::IpAddr, now: Now) -> bool {
        let rate = u64::from(self.limits.accepts_per_ip_per_second);
        if rate == 0 {
            return true;
        }
        let share = rate.div_ceil(u64::from(self.shards));
        if self.sessions.admit_ip(ip, share, now.monotonic.0) {
            return true;
        }
        self.stats.connections_rate_limited += 1;
        false
    }

    /// Registers a newly accepted connection, or refuses it (with the
    /// reason to tell the client) when the shard is full, has too many
    /// connections that have not authenticated, or is shutting down.
    pub fn accept(&mut self, now: Now) -> Result<(ConnId, Rc<Outbox>), ReasonCode> {
        match self.sessions.accept(&self.limits, now.monotonic) {
            Ok(accepted) => {
                self.stats.connections_accepted += 1;
                Ok(accepted)
            }
            Err(reason) => {
                self.stats.connections_refused += 1;
                Err(reason)
            }
        }
    }

    /// Whether `conn` should have frames read from it now: not while it
    /// has more than half its outbound limit unread (a client pipelining
    /// requests is paced by how fast it reads the answers), nor while it has
    /// its maximum of requests waiting for an answer.
    pub fn reads_frames(&self, conn: ConnId) -> bool {
        self.sessions.reads_frames(conn, &self.limits)
    }

    /// Whether cross-shard batches waiting to be sent are under the limit;
    /// above it, connections stop reading until they drain.
    pub fn outgoing_has_room(&self, backlog_max: usize) -> bool {
        self.outgoing_total < backlog_max
    }

    /// The connection's task has ended: forget it and tell every shard.
    pub fn on_closed(&mut self, conn: ConnId) {
        // Before the device can reconnect (anywhere), what it acknowledged
        // here is saved.
        self.flush_positions(Some(conn));
        let Some(entry) = self.sessions.remove(conn) else {
            return;
        };
        let went_offline = match entry.session.identity {
            Some(identity) if !matches!(entry.session.phase, Phase::Handshake) => {
                let uid = identity.uid.clone();
                self.broadcast_presence(
                    identity.uid,
                    identity.device_id,
                    identity.device_flag.0,
                    conn,
                    false,
                );
                Some(uid).filter(|uid| !self.presence.is_online(uid))
            }
            _ => None,
        };
        // It was its user's last connection: what it was pushed live and
        // never acknowledged gets a late msg.offline naming them.
        if let Some(uid) = went_offline {
            let late_max = self
                .webhooks
                .as_ref()
                .filter(|w| w.offline)
                .map_or(0, |w| w.late_max);
            if late_max > 0 {
                let undelivered = self.pushes.undelivered(conn, &mut *self.store, late_max);
                if let Some(writer) = self.webhooks.as_mut() {
                    if webhooks::queue_late_offline(writer, &uid, &undelivered) {
                        self.signals.commit.notify();
                    }
                }
            }
        }
        self.pushes.forget_conn(conn);
    }

    /// Closes `conn` with `reason`: queues a `Disconnect`, stops reading, and
    /// lets the task flush and end.
    pub fn close(&mut self, conn: ConnId, reason: ReasonCode, detail: &str, now: Now) {
        // Save what it acknowledged now: the same device may be connecting
        // elsewhere (a kick arrives exactly then) and resume from it.
        self.flush_positions(Some(conn));
        self.sessions
            .start_closing(conn, reason, detail, now.monotonic);
    }

    /// Closes connections past their handshake or idle timeout, and cuts off
    /// those that did not finish closing in time.
    pub fn sweep(&mut self, now: Now) {
        // Ids issued with nothing queued since (a refused send's) leave the
        // shard marked busy until it publishes again.
        self.publish_versions();
        let swept = self.sessions.sweep(&self.limits, now.monotonic);
        for (conn, reason) in swept.expired {
            self.close(conn, reason, "timed out", now);
        }
        for conn in swept.stalled {
            self.cut_off_slow_consumer(conn);
        }
    }

    /// Starts a graceful shutdown: refuse new connections, close every open
    /// one with `ServerShutdown`.
    pub fn begin_shutdown(&mut self, now: Now) {
        for conn in self.sessions.shut_down() {
            self.close(
                conn,
                ReasonCode::ServerShutdown,
                "server shutting down",
                now,
            );
        }
    }

    // ---- frames from clients --------------------------------------------

    /// Handles one frame read from `conn`.
    pub fn on_frame(&mut self, conn: ConnId, frame: &Bytes, now: Now) {
        let Some(entry) = self.sessions.get_mut(conn) else {
            return;
        };
        entry.session.last_read_at = now.monotonic;
        let phase = entry.session.phase;
        let packet = match Packet::decode(frame, &self.verify) {
            Ok(packet) => packet,
            Err(error) => {
                self.close(conn, ReasonCode::MalformedFrame, &error.to_string(), now);
                return;
            }
        };
        match step(phase, packet) {
            Step::Authenticate(connect) => self.authenticate(conn, connect, now),
            Step::Send(send) => self.client_send(conn, send, now),
            Step::SyncMessages(request) => self.client_sync_messages(conn, &request),
            Step::SyncConversations(request) => self.client_sync_conversations(conn, &request, now),
            Step::ConversationOp(op) => self.client_conversation_op(conn, op, now),
            Step::Recall(recall) => self.client_recall(conn, recall),
            Step::RecvAck(ack) => self.client_ack(conn, &ack, now),
            Step::Nothing => {}
            Step::Pong => self.write_packet(conn, &Packet::Pong),
            Step::ClientClosed => {
                self.flush_positions(Some(conn));
                self.sessions.client_closed(conn, now.monotonic);
            }
            Step::Refuse(reason, name) => {
                let detail = format!("{name} not allowed here");
                self.close(conn, reason, &detail, now);
            }
        }
    }

    /// The connection sent bytes that are not a frame.
    pub fn on_frame_error(&mut self, conn: ConnId, error: &crate::protocol::FrameError, now: Now) {
        let reason = match error {
            crate::protocol::FrameError::TooLarge { .. } => ReasonCode::FrameTooLarge,
            crate::protocol::FrameError::Empty => ReasonCode::MalformedFrame,
        };
        self.close(conn, reason, &error.to_string(), now);
    }

    fn write_packet(&mut self, conn: ConnId, packet: &Packet) {
        let max = self.limits.outbound_buffer_max_bytes;
        if self.sessions.write(conn, packet, max) == Written::OverLimit {
            self.cut_off_slow_consumer(conn);
        }
    }

    /// A request that will be answered with one packet was read from
    /// `conn`.
    fn awaiting_answer(&mut self, conn: ConnId) {
        self.sessions.awaiting_answer(conn);
    }

    /// `conn` has more unread than `outbound_buffer_max_bytes`: it cannot
    /// keep up. It is cut off at once (what it acknowledged is saved; it
    /// resumes from there), so its queue stops growing.
    fn cut_off_slow_consumer(&mut self, conn: ConnId) {
        self.flush_positions(Some(conn));
        if self.sessions.cut_off(conn) {
            self.stats.slow_consumers += 1;
        }
    }

    fn refuse_connect(&mut self, conn: ConnId, reason: ReasonCode, detail: &str, now: Now) {
        self.write_packet(
            conn,
            &Packet::ConnAck(ConnAck {
                reason,
                server_time_ms: now.unix_ms as i64,
                heartbeat_interval_ms: 0,
                session_id: conn.0,
            }),
        );
        self.close(conn, reason, detail, now);
    }

    fn authenticate(&mut self, conn: ConnId, connect: crate::protocol::Connect, now: Now) {
        let identity = match check_connect(
            &connect,
            &self.limits,
            self.system_uid.as_ref(),
            &self.auth,
            &mut *self.store,
        ) {
            Ok(identity) => identity,
            Err(Refused(reason, detail)) => {
                tracing::debug!(conn = conn.0, uid = %connect.uid, reason = %crate::protocol::reason_name(reason), detail = %detail, "login refused");
                return self.refuse_connect(conn, reason, &detail, now);
            }
        };
        // Another connection of the same device on this shard is replaced.
        self.kick_device(&identity.uid, &identity.device_id, conn, now);
        if !self
            .sessions
            .authenticated(conn, identity.clone(), connect.resume, self.shards - 1)
        {
            return;
        }
        self.broadcast_presence(
            identity.uid,
            identity.device_id,
            identity.device_flag.0,
            conn,
            true,
        );
        if self.shards == 1 {
            self.activate(conn, now);
        }
    }

    fn activate(&mut self, conn: ConnId, now: Now) {
        let heartbeat_interval_ms = self.limits.heartbeat_interval_ms;
        let Some(entry) = self.sessions.get_mut(conn) else {
            return;
        };
        entry.session.phase = Phase::Active;
        let resume = entry.session.resume;
        self.open_device_session(conn);
        self.write_packet(
            conn,
            &Packet::ConnAck(ConnAck {
                reason: ReasonCode::Success,
                server_time_ms: now.unix_ms as i64,
                heartbeat_interval_ms,
                session_id: conn.0,
            }),
        );
        if resume {
            if let Err(error) = self.resume(conn, now) {
                tracing::warn!(conn = conn.0, %error, "resume failed; the client can sync");
            }
        }
    }

    /// Records that `conn`'s device has a session open in this run, and
    /// learns whether its last session was left open by a run that crashed
    /// (then its pushes from before this run were never recorded). Written
    /// on this thread, before anything is pushed, so a crash from here on
    /// finds it.
    fn open_device_session(&mut self, conn: ConnId) {
        let Some((uid, device)) = self.identity_device(conn) else {
            return;
        };
        let previous = match self.store.device_session(&uid, &device) {
            Ok(record) => record.unwrap_or_default(),
            Err(error) => {
                // Not knowing, assume the worst: everything from before this
                // run may have reached it.
                tracing::warn!(%error, "reading a device's session failed");
                crate::storage::SessionRecord {
                    open_in_run: MessageId(1),
                    unrecorded_below: self.pipeline.run(),
                }
            }
        };
        let crashed = previous.open_in_run.0 != 0 && previous.open_in_run != self.pipeline.run();
        tracing::debug!(conn = conn.0, uid = %uid, device = %device, ?previous, run = self.pipeline.run().0, crashed, "device session opens");
        let unrecorded_below = if crashed {
            previous.unrecorded_below.max(self.pipeline.run())
        } else {
            previous.unrecorded_below
        };
        let session = crate::storage::DeviceSession {
            uid,
            device_id: device,
            record: crate::storage::SessionRecord {
                open_in_run: self.pipeline.run(),
                unrecorded_below,
            },
        };
        if let Err(error) = self.store.save_device_acks(&[], &[session]) {
            tracing::warn!(%error, "saving a device's session failed");
        }
        if let Some(entry) = self.sessions.get_mut(conn) {
            entry.session_open = true;
            entry.unrecorded_below = unrecorded_below;
        }
    }

    /// Pushes, channel by channel and in seq order, what this device has not
    /// acknowledged: everything above its acknowledged position (or, for a
    /// channel it never acknowledged, above the user's read position), never
    /// below a deletion. Live messages of a channel come after, because they
    /// are committed later; one already pushed here is not pushed twice.
    /// What it was pushed before, on an earlier connection, comes flagged as
    /// redelivered.
    fn resume(&mut self, conn: ConnId, now: Now) -> Result<(), StorageError> {
        let Some(identity) = self.sessions.identity(conn).cloned() else {
            return Ok(());
        };
        for (key, record) in self.store.conversations(&identity.uid)? {
            let Some(channel) = self.store.channel_head(&key)? else {
                continue;
            };
            let position = self
                .store
                .device_position(&identity.uid, &identity.device_id, &key)?;
            let acked = position.acked.0;
            let floor = if acked == 0 { record.read_floor } else { acked }.max(record.deleted_seq);
            self.pushes
                .resume_channel(conn, key, Seq(floor), channel.last_seq, position.pushed);
        }
        self.refill(conn, now);
        Ok(())
    }

    /// Pushes what waits in `conn`'s backlog while its in-flight window has
    /// room (see [`Pushes::refill`]).
    fn refill(&mut self, conn: ConnId, now: Now) {
        // A closing connection gets nothing more. Its position was saved as
        // it closed, and the pushes it was cut off for (given up after every
        // redelivery) are no longer pending: moving past its own sends above
        // them would jump its position over messages it never acknowledged.
        let recvs = match self.sessions.get(conn) {
            // What waits for it stays until it is gone: its user may be owed
            // a late msg.offline for it.
            Some(entry) if entry.session.phase == Phase::Closing => return,
            Some(entry) if entry.session.phase == Phase::Active => {
                let Some(identity) = entry.session.identity.as_ref() else {
                    self.pushes.drop_backlog(conn);
                    return;
                };
                let device = Device {
                    uid: &identity.uid,
                    device_id: &identity.device_id,
                    resumed: entry.session.resume,
                    unrecorded_below: entry.unrecorded_below,
                };
                self.pushes
                    .refill(conn, &device, &mut *self.store, now.micros)
            }
            _ => {
                self.pushes.drop_backlog(conn);
                return;
            }
        };
        for recv in recvs {
            self.write_packet(conn, &Packet::Recv(recv));
            self.stats.recvs_written += 1;
        }
    }

    fn kick_device(&mut self, uid: &Uid, device_id: &str, except: ConnId, now: Now) {
        let victims = self
            .sessions
            .conns_where(uid, |i| &*i.device_id == device_id);
        for victim in victims.into_iter().filter(|c| *c != except) {
            self.close(
                victim,
                ReasonCode::Kicked,
                "the same device logged in again",
                now,
            );
        }
    }

    fn broadcast_presence(
        &mut self,
        uid: Uid,
        device_id: Arc<str>,
        device_flag: u8,
        conn: ConnId,
        online: bool,
    ) {
        self.presence.apply(&uid, conn.shard(), device_flag, online);
        for shard in 0..self.shards {
            if shard != self.id.0 {
                self.push_outgoing(
                    ShardId(shard),
                    ShardMsg::Presence {
                        uid: uid.clone(),
                        device_id: Arc::clone(&device_id),
                        device_flag,
                        conn,
                        online,
                    },
                );
            }
        }
        self.queue_online_status(&uid, device_flag, conn, online);
    }

    /// Queues a `user.onlinestatus` line for the next commit, in WuKongIM's
    /// format: `uid-device_flag-online-conn_id-device_online_count-total_online_count`
    /// (the counts over every shard, as this shard knows them).
    fn queue_online_status(&mut self, uid: &Uid, device_flag: u8, conn: ConnId, online: bool) {
        let Some(writer) = self.webhooks.as_mut() else {
            return;
        };
        if !writer.online_status {
            return;
        }
        let (device_count, total) = self.presence.device_counts(uid, device_flag);
        writer.presence_lines.push(format!(
            "{uid}-{device_flag}-{}-{}-{device_count}-{total}",
            u8::from(online),
            conn.0
        ));
        self.signals.commit.notify();
    }

    /// Checks a client's `Send` and routes it to the channel's owner.
    fn client_send(&mut self, conn: ConnId, send: SendPacket, now: Now) {
        let Some((uid, device)) = self.identity_device(conn) else {
            return;
        };
        self.awaiting_answer(conn);
        let refusal = if send.payload.len() > self.limits.payload_size_max_bytes {
            Some(ReasonCode::PayloadTooLarge)
        } else if send.client_msg_no.is_empty()
            || send.client_msg_no.len() > self.limits.client_msg_no_length_max_bytes
        {
            Some(ReasonCode::InvalidClientMsgNo)
        } else {
            None
        };
        let channel = match refusal {
            Some(reason) => Err(reason),
            None => resolve_target(&uid, &send.channel_id, send.channel_type, &self.id_limits),
        };
        let channel = match channel {
            Ok(channel) => channel,
            Err(reason) => {
                let ack = failed_ack(&send, reason);
                return self.write_packet(conn, &Packet::SendAck(ack));
            }
        };
        let owner = match self.routing.route(&channel) {
            crate::key::Route::Shard(owner) => owner,
            crate::key::Route::Remote(partition) => {
                let request = ApiRequest::Send {
                    from: uid,
                    from_device: device,
                    system: false,
                    channel,
                    packet: send,
                };
                return self.forward(conn, partition, request);
            }
        };
        if owner == self.id {
            self.owner_send(conn, uid, device, channel, send, true, now.micros, now);
        } else {
            self.push_outgoing(
                owner,
                ShardMsg::Send {
                    origin: conn,
                    from: uid,
                    from_device: device,
                    channel,
                    packet: send,
                    read_us: now.micros,
                },
            );
        }
    }

    // ---- channel ownership ----------------------------------------------

    /// Finds or loads a channel this shard owns (see
    /// [`OwnedChannels::load`]).
    fn channel_mut(&mut self, key: &ChannelKey) -> Result<Option<&mut Channel>, ReasonCode> {
        let pipeline = &self.pipeline;
        self.channels
            .load(key, &mut *self.store, || pipeline.busy_keys())
    }

    /// Queues a change to an allow or deny list: a group's (`key` is the
    /// group) or a user's own, for person channels (`key` is
    /// [`user_list_key`]). `reply` hears the resulting list.
    pub fn change_list(
        &mut self,
        key: ChannelKey,
        kind: ListKind,
        uids: Vec<String>,
        change: SetChange,
        reply: ListReply,
    ) {
        let fail = |reply: ListReply, error: ControlError| {
            let _ = reply.try_send(Err(error));
        };
        if self.sessions.is_shutting_down() {
            return fail(reply, ControlError::ShuttingDown);
        }
        assert_eq!(
            self.routing.shard_of(&key),
            self.id,
            "list change sent to the wrong shard"
        );
        if !self.owns(&key) {
            return fail(
                reply,
                ControlError::Unavailable("another node owns this channel now; retry".into()),
            );
        }
        if self.must_wait(&key) {
            let parked = Parked::List {
                kind,
                uids,
                change,
                reply,
            };
            return self.park(key, parked);
        }
        let uids = match checked_uids(&uids, self.limits.uid_length_max_bytes) {
            Ok(uids) => uids,
            Err(error) => return fail(reply, error),
        };
        let pipeline = &self.pipeline;
        let changed = self
            .channels
            .change_list(&key, kind, uids, change, &mut *self.store, || {
                pipeline.busy_keys()
            });
        let uids = match changed {
            Ok(uids) => uids,
            Err(error) => return fail(reply, error),
        };
        self.queue(Pending::List {
            key,
            kind,
            uids,
            reply,
        });
    }

    /// The owner's half of a send: check membership (unless `checked` is
    /// false: a system message from the admin API), assign the seq and queue
    /// the message for the next commit.
    #[allow(clippy::too_many_arguments)]
    fn owner_send(
        &mut self,
        origin: ConnId,
        from: Uid,
        from_device: Arc<str>,
        key: ChannelKey,
        send: SendPacket,
        checked: bool,
        read_us: u64,
        now: Now,
    ) {
        debug_assert_eq!(self.routing.shard_of(&key), self.id);
        if !self.owns(&key) {
            return self.reply_send_ack(origin, failed_ack(&send, ReasonCode::ServerBusy));
        }
        if self.must_wait(&key) {
            let parked = Parked::Send {
                origin,
                from,
                from_device,
                packet: send,
                checked,
                read_us,
            };
            return self.park(key, parked);
        }
        self.stats.sends_received += 1;
        // The same (from_uid, client_msg_no) again: answer with the original,
        // store and deliver nothing. The same client_msg_no for a message
        // to another channel is refused: answering it with the first
        // message's place would tell the client a message was stored that
        // was not.
        let idempotency_key = (from.clone(), send.client_msg_no.clone());
        match self
            .pipeline
            .resend(&idempotency_key, &key, origin, send.client_seq)
        {
            Resend::NotWaiting => {}
            Resend::Joined => return,
            Resend::OtherChannel => {
                let ack = failed_ack(&send, ReasonCode::ClientMsgNoReused);
                return self.reply_send_ack(origin, ack);
            }
        }
        let hit =
            self.pipeline
                .idempotent_hit(&from, &send.client_msg_no, now.unix_ms, &mut *self.store);
        match hit {
            Ok(None) => {}
            Ok(Some(hit)) if hit.channel != key => {
                let ack = failed_ack(&send, ReasonCode::ClientMsgNoReused);
                return self.reply_send_ack(origin, ack);
            }
            Ok(Some(hit)) => {
                let ack = SendAck {
                    client_seq: send.client_seq,
                    client_msg_no: send.client_msg_no,
                    message_id: hit.message_id.0,
                    message_seq: hit.seq.0,
                    reason: ReasonCode::Success,
                };
                return self.reply_send_ack(origin, ack);
            }
            Err(error) => {
                tracing::warn!(%error, "idempotency lookup failed");
                return self.reply_send_ack(origin, failed_ack(&send, ReasonCode::StorageError));
            }
        }
        // A cluster node whose log has not answered for a while: refused
        // (retryable), not queued behind a commit that is still waiting.
        // Resends of what is stored or waiting were answered above.
        if self.log_unavailable {
            return self.reply_send_ack(origin, failed_ack(&send, ReasonCode::ServerBusy));
        }
        let refusal = match self.channel_mut(&key) {
            Err(reason) => Some(reason),
            Ok(None) => Some(ReasonCode::ChannelMissing),
            Ok(Some(_)) if !checked => None,
            Ok(Some(channel)) if !channel.members.contains(&from) => Some(ReasonCode::NotMember),
            Ok(Some(channel)) if channel.deny.contains(&from) => Some(ReasonCode::Denied),
            Ok(Some(channel)) if !channel.allow.is_empty() && !channel.allow.contains(&from) => {
                Some(ReasonCode::NotAllowed)
            }
            Ok(Some(_)) => {
                person_policy(&mut *self.store, &key, &from, self.allowlist_for_person).err()
            }
        };
        if let Some(reason) = refusal {
            return self.reply_send_ack(origin, failed_ack(&send, reason));
        }
        let message_id = self.pipeline.next_id(now.unix_ms);
        let seq = self
            .channels
            .get_mut(&key)
            .expect("the channel was just loaded")
            .assign_seq(&from, message_id);
        let rows =
            match self
                .channels
                .rows_for_message(&key, &from, seq, message_id, &mut *self.store)
            {
                Ok(rows) => rows,
                Err(reason) => {
                    if let Some(channel) = self.channels.get_mut(&key) {
                        channel.unassign_last();
                    }
                    return self.reply_send_ack(origin, failed_ack(&send, reason));
                }
            };
        let message = Arc::new(StoredMessage {
            message_id,
            seq,
            channel: key.clone(),
            from_uid: from,
            from_device,
            client_msg_no: send.client_msg_no,
            timestamp_ms: now.unix_ms as i64,
            send_flags: send.flags,
            // Copied so that a stored message never pins a whole receive
            // buffer.
            payload: Bytes::copy_from_slice(&send.payload),
            recalled: false,
        });
        self.pipeline.expect(idempotency_key, key);
        self.stats.budget.record(Stage::Route, read_us, now.micros);
        self.queue(Pending::Send {
            origin,
            client_seq: send.client_seq,
            message,
            rows,
            read_us,
            queued_us: now.micros,
        });
    }

    /// Queues a group change for the next commit; `reply` hears the result.
    ///
    /// The change takes its place in the channel's order now, like a
    /// message: sends that reach the owner after it are checked against the
    /// new members, and `GroupInfo::last_seq` is the seq it falls after
    /// (members who join see what comes after it; members who leave see
    /// nothing after it). A failed commit puts the group back as stored.
    pub fn change_group(
        &mut self,
        group_id: &str,
        uids: Vec<String>,
        change: SetChange,
        reply: GroupReply,
        now: Now,
    ) {
        let fail = |reply: GroupReply, error: ControlError| {
            let _ = reply.try_send(Err(error));
        };
        if self.sessions.is_shutting_down() {
            return fail(reply, ControlError::ShuttingDown);
        }
        let key = match resolve_target(
            &Uid::new(""),
            group_id,
            crate::protocol::ChannelType::Group,
            &self.id_limits,
        ) {
            Ok(key) => key,
            Err(_) => {
                return fail(
                    reply,
                    ControlError::Invalid(format!("bad group id {group_id:?}")),
                )
            }
        };
        assert_eq!(
            self.routing.shard_of(&key),
            self.id,
            "group change sent to the wrong shard"
        );
        if !self.owns(&key) {
            return fail(
                reply,
                ControlError::Unavailable("another node owns this channel now; retry".into()),
            );
        }
        if self.must_wait(&key) {
            return self.park(
                key,
                Parked::Group {
                    uids,
                    change,
                    reply,
                },
            );
        }
        let uids = match checked_uids(&uids, self.limits.uid_length_max_bytes) {
            Ok(uids) => uids,
            Err(error) => return fail(reply, error),
        };
        let pipeline = &mut self.pipeline;
        let busy = pipeline.busy_keys();
        let changed = self.channels.change_group(
            &key,
            uids,
            change,
            || pipeline.next_id(now.unix_ms).0,
            &mut *self.store,
            || busy.clone(),
        );
        let GroupChange {
            members,
            last_seq,
            last_message_id,
            rows,
            removed,
        } = match changed {
            Ok(changed) => changed,
            Err(error) => return fail(reply, error),
        };
        self.queue(Pending::Group {
            key,
            members,
            last_seq,
            last_message_id,
            rows,
            removed,
            reply,
        });
    }

    /// Releases the storage handle at the end of a shutdown, after the last
    /// commit.
    pub fn close_storage(&mut self) {
        self.store = Box::new(crate::storage::ClosedStore);
    }

    /// Hands everything pending to storage as one batch. Returns the job
    /// that makes it durable; the runtime runs it (on a blocking thread when
    /// it syncs) and then calls [`ShardState::finish_commit`]. Sends that
    /// arrive meanwhile wait for the next batch.
    pub fn begin_commit(&mut self, now: Now) -> Option<(CommitJob, InFlight)> {
        let (mutations, in_flight) = self.begin_batch(now)?;
        self.prepare_commit(mutations, in_flight, now)
    }

    /// Takes everything pending as one batch: its storage mutations and
    /// what waits for them. [`ShardState::prepare_commit`] (after a cluster
    /// node's append to the log) hands them to storage.
    pub fn begin_batch(&mut self, now: Now) -> Option<(Vec<Mutation>, InFlight)> {
        let events_waiting = self.webhooks.as_ref().is_some_and(webhooks::waiting);
        if self.pipeline.is_empty() && !events_waiting {
            return None;
        }
        let (pending, refused) = self.pipeline.take_batch();
        if !refused.is_empty() {
            for (p, reason) in refused {
                self.refuse_pending(p, reason);
            }
            if pending.is_empty() && !events_waiting {
                return None;
            }
        }
        let (mut in_flight, mut mutations) = self.pipeline.begin(pending);
        in_flight.begun_us = now.micros;
        for p in &in_flight.pending {
            if let Pending::Send { queued_us, .. } = p {
                self.stats
                    .budget
                    .record(Stage::Queue, *queued_us, now.micros);
            }
        }
        self.webhook_mutations(&mut in_flight, &mut mutations, now);
        self.pipeline.seal(&mut mutations);
        self.stats.commit_batches += 1;
        Some((mutations, in_flight))
    }

    /// Hands a batch begun by [`ShardState::begin_batch`] to storage:
    /// returns the job that makes it durable, or `None` when storage
    /// refused it at once (the batch is failed).
    pub fn prepare_commit(
        &mut self,
        mutations: Vec<Mutation>,
        in_flight: InFlight,
        now: Now,
    ) -> Option<(CommitJob, InFlight)> {
        match self.store.prepare_commit(&mutations) {
            Ok(job) => Some((job, in_flight)),
            Err(error) => {
                self.fail_commit(in_flight, &error, now);
                None
            }
        }
    }

    /// The webhook events of a batch, written with it (see
    /// [`webhooks::batch_events`]).
    fn webhook_mutations(
        &mut self,
        in_flight: &mut InFlight,
        mutations: &mut Vec<Mutation>,
        now: Now,
    ) {
        let Some(writer) = self.webhooks.as_mut() else {
            return;
        };
        let (channels, presence, pipeline) = (&self.channels, &self.presence, &mut self.pipeline);
        webhooks::batch_events(
            writer,
            in_flight,
            |message| offline_recipients(channels, presence, message),
            || pipeline.next_id(now.unix_ms).0,
            self.id,
            now.unix_ms,
            mutations,
        );
    }

    /// Answers a queued send or recall that will not be written.
    fn refuse_pending(&mut self, pending: Pending, reason: ReasonCode) {
        match pending {
            Pending::Send {
                origin,
                client_seq,
                message,
                ..
            } => {
                let key = (message.from_uid.clone(), message.client_msg_no.clone());
                let Waiters {
                    sends: waiters,
                    recalls,
                } = self.pipeline.take_waiters(&key);
                for (conn, seq) in std::iter::once((origin, client_seq)).chain(waiters) {
                    let ack = SendAck {
                        client_seq: seq,
                        client_msg_no: message.client_msg_no.clone(),
                        message_id: 0,
                        message_seq: 0,
                        reason,
                    };
                    self.reply_send_ack(conn, ack);
                }
                // Recalls that waited for it: there is nothing to recall
                // (a storage error is worth retrying, after the resend).
                let recall_reason = if reason == ReasonCode::StorageError {
                    reason
                } else {
                    ReasonCode::MessageMissing
                };
                for (conn, recall) in recalls {
                    self.reply_to(conn, recall_failed(&recall, recall_reason));
                }
            }
            Pending::Recall {
                origin, request_id, ..
            } => {
                let response = Packet::RecallResp(RecallResp {
                    request_id,
                    reason,
                    message_id: 0,
                    message_seq: 0,
                });
                self.reply_to(origin, response);
            }
            _ => {}
        }
    }

    /// Acknowledges and fans out a batch whose write succeeded. On a storage
    /// failure nothing is acknowledged as stored: every send of the batch, and
    /// every send queued behind it, fails with `StorageError`, and the
    /// channels take back the sequence numbers they handed out.
    pub fn finish_commit(
        &mut self,
        in_flight: InFlight,
        result: Result<(), StorageError>,
        now: Now,
    ) {
        match result {
            Ok(()) => {
                self.pipeline.finished();
                if let Some(writer) = &self.webhooks {
                    webhooks::committed(writer, &in_flight);
                }
                for p in in_flight.pending {
                    if let Pending::Send { .. } = p {
                        self.stats
                            .budget
                            .record(Stage::Write, in_flight.begun_us, now.micros);
                    }
                    self.committed(p, now);
                }
                if self.channels.over_limit() {
                    self.channels.evict(&self.pipeline.busy());
                }
                self.publish_versions();
            }
            Err(error) => self.fail_commit(in_flight, &error, now),
        }
    }

    /// Prepares and writes everything pending on this thread.
    pub fn commit(&mut self, now: Now) {
        while let Some((job, in_flight)) = self.begin_commit(now) {
            let result = job();
            self.finish_commit(in_flight, result, now);
        }
    }

    /// Applies a record this node wrote to `partition`'s log, stored at
    /// stream sequence `seq`, whose batch never reached the store (a crash
    /// came between the append and the local write), to this shard's store
    /// with the new position, in one batch, with its messages' webhook
    /// events, as the batch would have. (Other nodes' records go through
    /// [`ShardState::follow_log`].)
    pub fn apply_log(
        &mut self,
        partition: u32,
        seq: u64,
        record: &crate::cluster::record::LogRecord,
        now: Now,
    ) -> Result<(), StorageError> {
        let mut batch = Vec::with_capacity(record.mutations.len() + 2);
        batch.extend(record.mutations.iter().cloned());
        batch.push(Mutation::LogApplied { partition, seq });
        let events = if self.webhooks.is_some() {
            self.log_record_events(record, now, &mut batch)
        } else {
            (0, 0)
        };
        let result = self.store.commit(&batch);
        if let Some(writer) = self.webhooks.as_mut() {
            match &result {
                Ok(()) if events.0 > 0 => writer.committed(),
                Ok(()) => {}
                Err(_) => writer.release(events.0, events.1),
            }
        }
        result
    }

    /// The webhook events of a record's messages (see
    /// [`ShardState::apply_log`]): recipients are the channel's members as
    /// stored before the record, or as a group change earlier in the record
    /// sets them; offline is whoever has no connection now.
    fn log_record_events(
        &mut self,
        record: &crate::cluster::record::LogRecord,
        now: Now,
        out: &mut Vec<Mutation>,
    ) -> (u64, u64) {
        let mut set_in_record: HashMap<ChannelKey, Vec<Uid>, ahash::RandomState> =
            HashMap::default();
        let mut messages: Vec<(&StoredMessage, Vec<Uid>)> = Vec::new();
        for mutation in &record.mutations {
            match mutation {
                Mutation::PutGroup { key, members, .. } => {
                    set_in_record.insert(key.clone(), members.clone());
                }
                Mutation::Recall(message) => messages.push((message, Vec::new())),
                Mutation::Message(message) => {
                    let members: Vec<Uid> = match set_in_record.get(&message.channel) {
                        Some(members) => members.clone(),
                        None => match self.channel_mut(&message.channel) {
                            Ok(Some(channel)) => channel.members.iter().cloned().collect(),
                            _ => Vec::new(),
                        },
                    };
                    let mut offline: Vec<Uid> = members
                        .into_iter()
                        .filter(|uid| *uid != message.from_uid && !self.presence.is_online(uid))
                        .collect();
                    offline.sort();
                    offline.dedup();
                    messages.push((message, offline));
                }
                _ => {}
            }
        }
        let Some(writer) = self.webhooks.as_mut() else {
            return (0, 0);
        };
        let pipeline = &mut self.pipeline;
        webhooks::log_events(
            writer,
            &messages,
            || pipeline.next_id(now.unix_ms).0,
            self.id,
            now.unix_ms,
            out,
        )
    }

    /// Applies a record of a partition another node owns (this node
    /// follows its log), stored at stream sequence `seq`, with the new
    /// position, in one batch; then delivers its messages and recalls to
    /// this node's connections, with each group's members as the record
    /// has them at that point, and drops what removed members and deleted
    /// groups leave waiting. Conversation rows get versions of this node,
    /// above the writer's ids (its `IdsIssued` comes with the record), so a
    /// conversation sync here misses nothing whatever the writer's clock.
    /// `own`: this node wrote it in an earlier run and its batch never
    /// reached the store (the node no longer owns the partition): its
    /// webhook events are written with it, as the batch would have (as
    /// [`ShardState::apply_log`] does).
    pub fn follow_log(
        &mut self,
        partition: u32,
        seq: u64,
        record: &crate::cluster::record::LogRecord,
        own: bool,
        now: Now,
    ) -> Result<(), StorageError> {
        // Each channel's members before the record, as stored: memory may
        // hold work of this shard the log has not stored (an owner catching
        // up on another node's records after its own append was fenced off),
        // which must not decide who is pushed.
        let mut members: HashMap<ChannelKey, Vec<Uid>, ahash::RandomState> = HashMap::default();
        for mutation in &record.mutations {
            let key = match mutation {
                Mutation::Message(m) | Mutation::Recall(m) => &m.channel,
                Mutation::PutGroup { key, .. } | Mutation::DeleteGroup { key, .. } => key,
                _ => continue,
            };
            if members.contains_key(key) {
                continue;
            }
            let before = match key.person_pair() {
                Some((a, b)) => vec![Uid::new(a), Uid::new(b)],
                None => self
                    .store
                    .load_channel(key)?
                    .and_then(|record| record.members)
                    .unwrap_or_default(),
            };
            members.insert(key.clone(), before);
        }
        for mutation in &record.mutations {
            if let Mutation::IdsIssued(issued) = mutation {
                self.pipeline.continue_above(*issued);
            }
        }
        let mut batch = Vec::with_capacity(record.mutations.len() + 2);
        for mutation in &record.mutations {
            match mutation {
                Mutation::Conversation {
                    uid,
                    key,
                    record: row,
                } => {
                    let mut row = *row;
                    row.version = self.pipeline.next_id(now.unix_ms).0;
                    batch.push(Mutation::Conversation {
                        uid: uid.clone(),
                        key: key.clone(),
                        record: row,
                    });
                }
                other => batch.push(other.clone()),
            }
        }
        let events = if own && self.webhooks.is_some() {
            self.log_record_events(record, now, &mut batch)
        } else {
            (0, 0)
        };
        self.pipeline.seal(&mut batch);
        batch.push(Mutation::LogApplied { partition, seq });
        let written = self.store.commit(&batch);
        if let Some(writer) = self.webhooks.as_mut() {
            match &written {
                Ok(()) if events.0 > 0 => writer.committed(),
                Ok(()) => {}
                Err(_) => writer.release(events.0, events.1),
            }
        }
        self.publish_versions();
        // What memory held of these channels is older than the store now.
        for mutation in &record.mutations {
            match mutation {
                Mutation::Message(m) | Mutation::Recall(m) => self.channels.forget(&m.channel),
                Mutation::PutGroup { key, .. }
                | Mutation::DeleteGroup { key, .. }
                | Mutation::PutList { key, .. }
                | Mutation::Conversation { key, .. }
                | Mutation::DeleteConversation { key, .. } => self.channels.forget(key),
                _ => {}
            }
        }
        written?;
        for mutation in &record.mutations {
            match mutation {
                Mutation::PutGroup {
                    key,
                    members: after,
                    ..
                } => {
                    let before = members
                        .insert(key.clone(), after.clone())
                        .unwrap_or_default();
                    let removed: Vec<Uid> =
                        before.into_iter().filter(|u| !after.contains(u)).collect();
                    if !removed.is_empty() {
                        self.members_removed(key, &removed);
                    }
                }
                Mutation::DeleteGroup { key, last_seq, .. } => {
                    members.insert(key.clone(), Vec::new());
                    self.channel_deleted(key, *last_seq);
                }
                // The sending device is not pushed its own message: the
                // pushes skip it by its device id (`Pushes::live`), on any
                // connection of any node.
                Mutation::Message(message) | Mutation::Recall(message) => {
                    let mut per_shard: PerShard =
                        (0..self.shards).map(|_| SmallVec::new()).collect();
                    for uid in members.get(&message.channel).into_iter().flatten() {
                        for shard in self.presence.shards(uid) {
                            per_shard[shard.index()].push(uid.clone());
                        }
                    }
                    self.deliver_per_shard(Arc::clone(message), per_shard, None, 0, now);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Members left a group (the change is committed): every shard drops
    /// what waits in storage for their connections there.
    fn members_removed(&mut self, key: &ChannelKey, removed: &[Uid]) {
        let me = self.id;
        for shard in (0..self.shards).map(ShardId).filter(|s| *s != me) {
            let message = ShardMsg::MembersRemoved {
                channel: key.clone(),
                uids: removed.to_vec(),
            };
            self.push_outgoing(shard, message);
        }
        self.forget_members_backlog(key, removed);
    }

    /// A group's deletion is committed: every shard drops its pushes of
    /// the messages through `through`.
    fn channel_deleted(&mut self, key: &ChannelKey, through: Seq) {
        let me = self.id;
        for shard in (0..self.shards).map(ShardId).filter(|s| *s != me) {
            let message = ShardMsg::ChannelDeleted {
                channel: key.clone(),
                through,
            };
            self.push_outgoing(shard, message);
        }
        self.forget_channel(key, through);
    }

    /// Whether this node writes `key` (on a cluster node: owns its
    /// partition now and its lease holds). Checked by the owner before it
    /// answers anything about the channel, refusals included.
    fn owns(&self, key: &ChannelKey) -> bool {
        self.routing.serves(key)
    }

    /// This node takes writes to `partition` from now on (this shard
    /// caught up on its log and fenced it with a barrier).
    pub fn own_partition(&mut self, partition: u32) {
        if let crate::key::Routing::Partitions { places } = &self.routing {
            places.set_owned(partition, true);
        }
    }

    /// Another node took `partition` over: writes to it are forwarded from
    /// now on, and this shard follows its log. What was queued is refused
    /// (retryable) and channels are read again, as after a catch-up.
    /// Called between batches.
    pub fn release_partition(&mut self, partition: u32, now: Now) {
        if let crate::key::Routing::Partitions { places } = &self.routing {
            places.set_owned(partition, false);
        }
        self.log_caught_up(now);
    }

    /// How far this shard's store has applied `partition`'s log.
    pub fn log_applied(&mut self, partition: u32) -> Result<u64, StorageError> {
        self.store.log_applied(partition)
    }

    /// Queues `request` of `conn` for the node owning `partition`.
    fn forward(&mut self, conn: ConnId, partition: u32, request: ApiRequest) {
        self.forwards.push(Forwarded {
            conn,
            partition,
            request,
        });
        self.signals.forward.notify();
    }

    /// The writes waiting to be forwarded, in the order they were made.
    pub fn take_forwards(&mut self) -> Vec<Forwarded> {
        std::mem::take(&mut self.forwards)
    }

    /// The owner's answer to a forwarded `request` of `conn` (or why there
    /// is none: the reason the client is told, retryable) goes to the
    /// connection, as the answer to its own request.
    pub fn forward_answered(
        &mut self,
        conn: ConnId,
        request: &ApiRequest,
        answer: Result<Packet, ReasonCode>,
    ) {
        let packet = match answer {
            Ok(packet) => packet,
            Err(reason) => match request {
                ApiRequest::Send { packet, .. } => Packet::SendAck(failed_ack(packet, reason)),
                ApiRequest::ConversationOp { op, .. } => {
                    Packet::ConversationOpResp(ConversationOpResp {
                        request_id: op.request_id,
                        reason,
                        conversation: None,
                    })
                }
                ApiRequest::ClientRecall { recall, .. } => recall_failed(recall, reason),
                _ => return,
            },
        };
        if self.sessions.get(conn).is_some() {
            self.write_packet(conn, &packet);
        }
    }

    /// The job that writes `mutations` to this shard's store (a cluster
    /// node's batch once the log has it, retried until it is written).
    pub fn prepare_write(&mut self, mutations: &[Mutation]) -> Result<CommitJob, StorageError> {
        self.store.prepare_commit(mutations)
    }

    /// After catching up on the log at start: ids continue above every id
    /// the records applied recorded.
    pub fn continue_ids_above_store(&mut self) -> Result<(), StorageError> {
        let issued = self.store.ids_issued()?;
        self.pipeline.continue_above(issued);
        Ok(())
    }

    /// A cluster batch the log stored only in part: `stored[i]` says
    /// whether the i-th piece of work is in it. The stored part becomes a
    /// batch of its own, with its mutations and webhook events, to be
    /// written and finished as committed (it is: the log has it); the rest
    /// is returned, to be refused with [`ShardState::refuse_unstored`] once
    /// the stored part is finished.
    pub fn split_stored(
        &mut self,
        mut in_flight: InFlight,
        stored: &[bool],
        now: Now,
    ) -> (Vec<Mutation>, InFlight, Unstored) {
        if let Some(writer) = self.webhooks.as_mut() {
            webhooks::failed(writer, &mut in_flight);
        }
        let mut kept = Vec::new();
        let mut kept_offline = Vec::new();
        let mut refused = Vec::new();
        let mut offline = std::mem::take(&mut in_flight.offline).into_iter();
        for (p, stored) in in_flight.pending.into_iter().zip(stored) {
            let named = offline.next();
            if *stored {
                kept.push(p);
                kept_offline.extend(named);
            } else {
                refused.push(p);
            }
        }
        let mut mutations = Vec::new();
        for p in &kept {
            p.mutations(&mut mutations);
        }
        let mut part = InFlight {
            pending: kept,
            webhook_events: 0,
            webhook_bytes: 0,
            presence_lines: Vec::new(),
            late_offline: Vec::new(),
            offline: kept_offline,
            begun_us: in_flight.begun_us,
        };
        self.webhook_mutations(&mut part, &mut mutations, now);
        self.pipeline.seal(&mut mutations);
        (mutations, part, Unstored(refused))
    }

    /// Refuses work of a batch the log did not store (see
    /// [`ShardState::split_stored`]), with everything queued behind it, and
    /// reads channels again.
    pub fn refuse_unstored(&mut self, refused: Unstored, error: &StorageError, now: Now) {
        let queued = self.pipeline.failed();
        self.channels.clear();
        for p in refused.0.into_iter().chain(queued) {
            self.refuse_any(p, error, now);
        }
        self.publish_versions();
    }

    /// The store took records from the log that this shard's memory does
    /// not reflect (another writer's, or its own that a failed commit left
    /// unapplied): what is queued was decided on the old state and is
    /// refused (retryable), and channels are read again from the store.
    pub fn log_caught_up(&mut self, now: Now) {
        let queued = self.pipeline.failed();
        self.channels.clear();
        for p in queued {
            self.refuse_any(p, &StorageError::Io("the log moved on; retry".into()), now);
        }
        self.publish_versions();
    }

    fn fail_commit(&mut self, mut in_flight: InFlight, error: &StorageError, now: Now) {
        let queued = self.pipeline.failed();
        if let Some(writer) = self.webhooks.as_mut() {
            webhooks::failed(writer, &mut in_flight);
        }
        tracing::warn!(%error, batch = in_flight.pending.len(), queued = queued.len(), "commit failed");
        // Channels hold what was queued (seqs handed out, members and lists
        // changed, rows): forget them all and read them again from what
        // is stored. Everything queued is refused below.
        self.channels.clear();
        for p in in_flight.pending.into_iter().chain(queued) {
            self.refuse_any(p, error, now);
        }
        self.publish_versions();
    }

    /// Answers any queued work that will not be written because `error`
    /// (retryable) stopped it.
    fn refuse_any(&mut self, p: Pending, error: &StorageError, now: Now) {
        match p {
            p @ (Pending::Send { .. } | Pending::Recall { .. }) => {
                self.refuse_pending(p, ReasonCode::StorageError)
            }
            Pending::Group { reply, .. } => {
                let _ = reply.try_send(Err(ControlError::Storage(error.to_string())));
            }
            Pending::List { reply, .. } => {
                let _ = reply.try_send(Err(ControlError::Storage(error.to_string())));
            }
            Pending::DeleteGroup { key, reply, .. } => {
                self.channels.deletion_done(&key, false);
                let _ = reply.try_send(ApiResponse::Failed(ReasonCode::StorageError));
                self.serve_parked(&key, now);
            }
            Pending::Conversation {
                origin, request_id, ..
            } => {
                let response = Packet::ConversationOpResp(ConversationOpResp {
                    request_id,
                    reason: ReasonCode::StorageError,
                    conversation: None,
                });
                self.reply_to(origin, response);
            }
        }
    }

    fn committed(&mut self, pending: Pending, now: Now) {
        match pending {
            Pending::Send {
                origin,
                client_seq,
                message,
                read_us,
                ..
            } => {
                self.stats.messages_committed += 1;
                if let Some(channel) = self.channels.get_mut(&message.channel) {
                    channel.mark_committed(message.seq, message.message_id);
                }
                let key = (message.from_uid.clone(), message.client_msg_no.clone());
                let Waiters {
                    sends: waiters,
                    recalls,
                } = self.pipeline.take_waiters(&key);
                for (i, (conn, seq)) in std::iter::once((origin, client_seq))
                    .chain(waiters)
                    .enumerate()
                {
                    let ack = SendAck {
                        client_seq: seq,
                        client_msg_no: message.client_msg_no.clone(),
                        message_id: message.message_id.0,
                        message_seq: message.seq.0,
                        reason: ReasonCode::Success,
                    };
                    // Only the first send's read time is known.
                    let read_us = if i == 0 { read_us } else { 0 };
                    self.reply_send_ack_timed(conn, ack, read_us, now.micros);
                }
                let (from, channel) = (message.from_uid.clone(), message.channel.clone());
                self.fan_out(message, Some(origin), read_us, now);
                // Recalls by client_msg_no that arrived before the commit:
                // now there is something to recall.
                for (conn, recall) in recalls {
                    self.owner_recall(conn, from.clone(), channel.clone(), recall);
                }
            }
            Pending::Group {
                key,
                members,
                last_seq,
                removed,
                reply,
                ..
            } => {
                // A removed member's connections stop reading the group's
                // backlog: it could span seqs sent while they were out, if
                // they are added again before it drains (a backlog is read
                // from storage by seq, whoever the messages were for).
                if !removed.is_empty() {
                    self.members_removed(&key, &removed);
                }
                // The members took effect when the change was queued.
                let info = GroupInfo {
                    group_id: key.id().to_owned(),
                    members: members.iter().map(|u| u.as_str().to_owned()).collect(),
                    last_seq: last_seq.0,
                };
                let _ = reply.try_send(Ok(info));
            }
            Pending::Conversation {
                origin,
                request_id,
                uid,
                key,
                record,
            } => {
                let conversation = self.conversation_view(&uid, &key, &record);
                if let Some(conversation) = &conversation {
                    self.tell_devices(&uid, origin, conversation);
                }
                let response = Packet::ConversationOpResp(ConversationOpResp {
                    request_id,
                    reason: ReasonCode::Success,
                    conversation,
                });
                self.reply_to(origin, response);
            }
            Pending::List { uids, reply, .. } => {
                // The list took effect when the change was queued.
                let _ = reply.try_send(Ok(uids.iter().map(|u| u.as_str().to_owned()).collect()));
            }
            Pending::DeleteGroup {
                key,
                last_seq,
                reply,
                ..
            } => {
                // The channel left memory when the delete was queued; what is
                // there now is a group created again since. If that one's
                // delete is queued too, its entry stays: without it the
                // group would be read back from storage, where it still
                // exists, and take sends and changes until that delete lands.
                let deleted_again = self.pipeline.deletion_queued(&key);
                self.channels.deletion_done(&key, deleted_again);
                self.channel_deleted(&key, last_seq);
                // Recalls queued while it was being committed were of
                // messages it erased: writing them would bring them back.
                for recall in self.pipeline.take_erased_recalls(&key, last_seq) {
                    self.refuse_pending(recall, ReasonCode::MessageMissing);
                }
                let _ = reply.try_send(ApiResponse::Deleted { through: last_seq });
                self.serve_parked(&key, now);
            }
            Pending::Recall {
                origin,
                request_id,
                message,
            } => {
                let response = Packet::RecallResp(RecallResp {
                    request_id,
                    reason: ReasonCode::Success,
                    message_id: message.message_id.0,
                    message_seq: message.seq.0,
                });
                self.reply_to(origin, response);
                // Every online member's devices hear of it, the recalling
                // connection included (it may show the message too).
                self.fan_out(message, None, 0, now);
            }
        }
    }

    /// Whether what names `key` must wait: a deletion of it is being
    /// committed, or requests that came earlier wait for one (they are
    /// served first, in order).
    fn must_wait(&self, key: &ChannelKey) -> bool {
        self.channels.waits_for_deletion(key)
            || (!self.parked.is_empty() && self.parked.contains_key(key))
    }

    /// Holds `request` until the deletion of `key` being committed lands
    /// or fails.
    fn park(&mut self, key: ChannelKey, request: Parked) {
        self.parked.entry(key).or_default().push(request);
    }

    /// A deletion of `key` landed or failed: the requests that waited for
    /// it are served now, in the order they came (they wait again if
    /// another deletion of it is queued).
    fn serve_parked(&mut self, key: &ChannelKey, now: Now) {
        let Some(parked) = self.parked.remove(key) else {
            return;
        };
        for request in parked {
            match request {
                Parked::Send {
                    origin,
                    from,
                    from_device,
                    packet,
                    checked,
                    read_us,
                } => self.owner_send(
                    origin,
                    from,
                    from_device,
                    key.clone(),
                    packet,
                    checked,
                    read_us,
                    now,
                ),
                Parked::ConversationOp { origin, uid, op } => {
                    self.owner_conversation_op(origin, uid, key.clone(), op, now)
                }
                Parked::Recall {
                    origin,
                    uid,
                    recall,
                } => self.owner_recall(origin, uid, key.clone(), recall),
                Parked::Group {
                    uids,
                    change,
                    reply,
                } => self.change_group(key.id(), uids, change, reply, now),
                Parked::List {
                    kind,
                    uids,
                    change,
                    reply,
                } => self.change_list(key.clone(), kind, uids, change, reply),
                Parked::Api(request, reply) => self.api(request, reply, now),
            }
        }
    }

    fn reply_send_ack(&mut self, origin: ConnId, ack: SendAck) {
        self.reply_send_ack_timed(origin, ack, 0, 0);
    }

    /// A stored message's `SendAck` is being queued on its sender's
    /// connection at `now_us` (`read_us` 0: not timed).
    fn record_send_ack_stages(&mut self, read_us: u64, durable_us: u64, now_us: u64) {
        if read_us != 0 {
            self.stats
                .budget
                .record(Stage::AckReturn, durable_us, now_us);
            self.stats.budget.record(Stage::SendAck, read_us, now_us);
        }
    }

    /// [`ShardState::reply_send_ack`] for a stored message: its frame was
    /// read at `read_us`, it became durable at `durable_us` (now, here).
    fn reply_send_ack_timed(
        &mut self,
        origin: ConnId,
        ack: SendAck,
        read_us: u64,
        durable_us: u64,
    ) {
        if origin.shard() == self.id {
            self.record_send_ack_stages(read_us, durable_us, durable_us);
            self.write_packet(origin, &Packet::SendAck(ack));
        } else {
            self.push_outgoing(
                origin.shard(),
                ShardMsg::SendAck {
                    conn: origin,
                    ack,
                    read_us,
                    durable_us,
                },
            );
        }
    }

    /// Sends a committed message to every shard where a member is online.
    fn fan_out(
        &mut self,
        message: Arc<StoredMessage>,
        skip: Option<ConnId>,
        read_us: u64,
        now: Now,
    ) {
        // A group deletion being committed erases it: nobody gets it (the
        // channel in memory may be the group created again since, whose
        // members are not the ones it was sent to).
        if self.channels.being_deleted(&message.channel, message.seq) {
            return;
        }
        let mut per_shard: PerShard = (0..self.shards).map(|_| SmallVec::new()).collect();
        let presence = &self.presence;
        self.channels.for_each_recipient(&message, |uid| {
            for shard in presence.shards(uid) {
                per_shard[shard.index()].push(uid.clone());
            }
        });
        self.deliver_per_shard(message, per_shard, skip, read_us, now);
    }

    /// Hands `message` to every shard for its recipients there.
    fn deliver_per_shard(
        &mut self,
        message: Arc<StoredMessage>,
        per_shard: PerShard,
        skip: Option<ConnId>,
        read_us: u64,
        now: Now,
    ) {
        for (index, recipients) in per_shard.into_iter().enumerate() {
            if recipients.is_empty() {
                continue;
            }
            let shard = ShardId(index as u16);
            if shard == self.id {
                if read_us != 0 {
                    self.stats
                        .budget
                        .record(Stage::Fanout, now.micros, now.micros);
                }
                self.deliver_local(&message, &recipients, skip, read_us, now);
            } else {
                self.push_outgoing(
                    shard,
                    ShardMsg::Deliver {
                        message: Arc::clone(&message),
                        recipients,
                        skip,
                        read_us,
                        durable_us: now.micros,
                    },
                );
            }
        }
    }

    /// Writes `message` to every active connection of `recipients` on this
    /// shard except `skip`. The frame is encoded once per view (the
    /// recipients' and the sender's own other devices') and copied into each
    /// outbox.
    fn deliver_local(
        &mut self,
        message: &Arc<StoredMessage>,
        recipients: &[Uid],
        skip: Option<ConnId>,
        read_us: u64,
        now: Now,
    ) {
        // One encoding per view: (from self, flagged as redelivered).
        let mut frames: [Option<(usize, usize)>; 4] = [None; 4];
        let mut slow: SmallVec<[ConnId; 2]> = SmallVec::new();
        self.frame_scratch.clear();
        for uid in recipients {
            let conns = self.sessions.local_conns(uid);
            let from_self = *uid == message.from_uid;
            for conn in &conns {
                if Some(*conn) == skip {
                    continue;
                }
                let Some(entry) = self.sessions.get(*conn) else {
                    continue;
                };
                if entry.session.phase != Phase::Active {
                    continue;
                }
                let Some(identity) = entry.session.identity.as_ref() else {
                    continue;
                };
                let device = Device {
                    uid: &identity.uid,
                    device_id: &identity.device_id,
                    resumed: entry.session.resume,
                    unrecorded_below: entry.unrecorded_below,
                };
                let live = self.pushes.live(
                    *conn,
                    &device,
                    message,
                    from_self,
                    &mut *self.store,
                    now.micros,
                );
                let Live::Push { flagged } = live else {
                    continue;
                };
                let view = usize::from(from_self) | (usize::from(flagged) << 1);
                let (start, end) = *frames[view].get_or_insert_with(|| {
                    let start = self.frame_scratch.len();
                    if message.recalled {
                        let event = Packet::RecallEvent(RecallEvent {
                            channel_id: message.channel.id_seen_by(uid.as_str()).to_owned(),
                            channel_type: message.channel.kind(),
                            message_id: message.message_id.0,
                            message_seq: message.seq.0,
                            from_uid: message.from_uid.as_str().to_owned(),
                        });
                        self.sessions
                            .encoder()
                            .encode(&event, &mut self.frame_scratch);
                        return (start, self.frame_scratch.len());
                    }
                    let fields = RecvFields {
                        message_id: message.message_id.0,
                        message_seq: message.seq.0,
                        client_msg_no: &message.client_msg_no,
                        from_uid: message.from_uid.as_str(),
                        channel_id: message.channel.id_seen_by(uid.as_str()),
                        channel_type: message.channel.kind(),
                        timestamp_ms: message.timestamp_ms,
                        flags: if from_self { RECV_FLAG_FROM_SELF } else { 0 }
                            | if flagged { RECV_FLAG_REDELIVERED } else { 0 },
                        send_flags: message.send_flags,
                        payload: &message.payload,
                    };
                    encode_recv(self.sessions.encoder(), &fields, &mut self.frame_scratch);
                    (start, self.frame_scratch.len())
                });
                let frame = &self.frame_scratch[start..end];
                let max = self.limits.outbound_buffer_max_bytes;
                self.stats.recvs_written += 1;
                if read_us != 0 {
                    self.stats
                        .budget
                        .record(Stage::Delivered, read_us, now.micros);
                }
                if self.sessions.write_frame(*conn, frame, max) == Written::OverLimit {
                    slow.push(*conn);
                }
            }
        }
        for conn in slow {
            self.cut_off_slow_consumer(conn);
        }
    }

    // ---- the admin API ----------------------------------------------------

    /// A connection id for an API request whose answer is the packet a
    /// client would get: [`ShardState::write_packet`] hands it to `reply`.
    fn api_conn(&mut self, reply: ApiReply) -> ConnId {
        self.sessions.api_conn(reply)
    }

    /// Serves one admin API request; the answer goes to `reply`, now or
    /// after the commit it waits for.
    pub fn api(&mut self, request: ApiRequest, reply: ApiReply, now: Now) {
        let answer = |reply: &ApiReply, response: ApiResponse| {
            let _ = reply.try_send(response);
        };
        if self.sessions.is_shutting_down() {
            return answer(&reply, ApiResponse::Failed(ReasonCode::ServerShutdown));
        }
        // The API checks what it is given; this is the shard's own check of
        // everything that becomes a storage key (a key cannot hold an id of
        // 64 KiB or more, whatever the API accepted).
        if let Err(reason) = request.check_ids(&self.limits) {
            return answer(&reply, ApiResponse::Failed(reason));
        }
        // A write to a partition another node owns now (a takeover since
        // it was routed here): refused, retryable.
        if crate::cluster::forward::forwardable(&request)
            && crate::cluster::forward::channel_of(&request).is_some_and(|key| !self.owns(key))
        {
            return answer(&reply, ApiResponse::Failed(ReasonCode::ServerBusy));
        }
        // What names a group waiting for its deletion waits too (sends and
        // conversation changes wait where a client's do).
        if let ApiRequest::ChannelInfo { channel }
        | ApiRequest::DeleteGroup { channel }
        | ApiRequest::Recall { channel, .. } = &request
        {
            if self.must_wait(channel) {
                let key = channel.clone();
                return self.park(key, Parked::Api(request, reply));
            }
        }
        match request {
            ApiRequest::Send {
                from,
                from_device,
                system,
                channel,
                packet,
            } => {
                let conn = self.api_conn(reply);
                self.owner_send(
                    conn,
                    from,
                    from_device,
                    channel,
                    packet,
                    !system,
                    now.micros,
                    now,
                );
            }
            ApiRequest::ConversationOp { uid, channel, op } => {
                let conn = self.api_conn(reply);
                self.owner_conversation_op(conn, uid, channel, op, now);
            }
            ApiRequest::ClientRecall {
                uid,
                channel,
                recall,
            } => {
                let conn = self.api_conn(reply);
                self.owner_recall(conn, uid, channel, recall);
            }
            ApiRequest::Recall {
                channel,
                message_id,
                message_seq,
            } => self.api_recall(channel, message_id, message_seq, reply),
            ApiRequest::SyncMessages { uid, request } => {
                let synced = self
                    .resolve_for(&uid, &request.channel_id, request.channel_type)
                    .and_then(|key| {
                        sync_messages(&mut *self.store, &self.limits, &uid, &key, &request)
                    });
                let response = match synced {
                    Ok(messages) => ApiResponse::Messages(messages),
                    Err(reason) => ApiResponse::Failed(reason),
                };
                answer(&reply, response);
            }
            ApiRequest::SyncConversations { uid, request } => {
                let listed = self.closed_version(now).and_then(|closed| {
                    list_conversations(
                        &mut *self.store,
                        &uid,
                        &request,
                        closed,
                        self.limits.sync_response_max_bytes,
                    )
                });
                let response = match listed {
                    Ok((conversations, more)) => ApiResponse::Conversations {
                        conversations,
                        more,
                    },
                    Err(error) => {
                        tracing::warn!(%error, "conversation sync failed");
                        ApiResponse::Failed(ReasonCode::StorageError)
                    }
                };
                answer(&reply, response);
            }
            ApiRequest::MessageByClientMsgNo {
                from,
                client_msg_no,
            } => {
                let found = self
                    .store
                    .find_idempotent(&from, &client_msg_no, 0, u64::MAX)
                    .and_then(|hit| match hit {
                        Some(hit) => self.store.message(&hit.channel, hit.seq),
                        None => Ok(None),
                    });
                let response = match found {
                    Ok(message) => ApiResponse::Message(message),
                    Err(_) => ApiResponse::Failed(ReasonCode::StorageError),
                };
                answer(&reply, response);
            }
            ApiRequest::ChannelInfo { channel } => {
                let response = match self.channel_mut(&channel) {
                    Err(reason) => ApiResponse::Failed(reason),
                    Ok(None) => ApiResponse::Failed(ReasonCode::ChannelMissing),
                    Ok(Some(channel)) => {
                        let sorted = |set: &crate::channel::MemberSet| {
                            let mut list: Vec<Uid> = set.iter().cloned().collect();
                            list.sort();
                            list
                        };
                        let mut members: Vec<Uid> = channel.members.iter().cloned().collect();
                        members.sort();
                        ApiResponse::Channel(ChannelDetails {
                            members,
                            allow: sorted(&channel.allow),
                            deny: sorted(&channel.deny),
                            last_seq: channel.committed_seq.0,
                        })
                    }
                };
                answer(&reply, response);
            }
            ApiRequest::DeleteGroup { channel } => {
                let pipeline = &self.pipeline;
                let deleted = self
                    .channels
                    .start_deleting(&channel, &mut *self.store, || pipeline.busy_keys());
                let deleted = match deleted {
                    Err(reason) => return answer(&reply, ApiResponse::Failed(reason)),
                    Ok(None) => {
                        return answer(&reply, ApiResponse::Failed(ReasonCode::ChannelMissing))
                    }
                    Ok(Some(deleted)) => deleted,
                };
                self.queue(Pending::DeleteGroup {
                    key: channel,
                    members: deleted.members,
                    last_seq: deleted.last_seq,
                    last_message_id: deleted.last_message_id,
                    reply,
                });
            }
            ApiRequest::Kick { uid, device_flag } => {
                let victims = self.sessions.conns_where(&uid, |i| {
                    device_flag.is_none_or(|flag| i.device_flag.0 == flag)
                });
                for conn in &victims {
                    self.close(
                        *conn,
                        ReasonCode::Kicked,
                        "logged out by the administrator",
                        now,
                    );
                }
                answer(&reply, ApiResponse::Kicked(victims.len()));
            }
            ApiRequest::Online { uids } => {
                let online = uids
                    .into_iter()
                    .filter_map(|uid| {
                        let flags = self.presence.device_flags(&uid)?;
                        Some((uid, flags))
                    })
                    .collect();
                answer(&reply, ApiResponse::Online(online));
            }
        }
    }

    /// An administrator recalls a message of a channel this shard owns, by
    /// seq or by id, whoever sent it.
    fn api_recall(&mut self, key: ChannelKey, message_id: u64, message_seq: u64, reply: ApiReply) {
        let fail = |reply: ApiReply, reason| {
            let _ = reply.try_send(ApiResponse::Failed(reason));
        };
        let by = if message_seq != 0 {
            RecallBy::Seq(Seq(message_seq))
        } else {
            RecallBy::Id(MessageId(message_id))
        };
        let message = match message_to_recall(&mut *self.store, &key, by) {
            Err(reason) => return fail(reply, reason),
            Ok(message) => message,
        };
        if message_id != 0 && message.message_id.0 != message_id {
            return fail(reply, ReasonCode::MessageMissing);
        }
        let conn = self.api_conn(reply);
        if message.recalled && !self.channels.being_deleted(&key, message.seq) {
            let response = Packet::RecallResp(RecallResp {
                request_id: 0,
                reason: ReasonCode::Success,
                message_id: message.message_id.0,
                message_seq: message.seq.0,
            });
            return self.write_packet(conn, &response);
        }
        self.queue(Pending::Recall {
            origin: conn,
            request_id: 0,
            message: Arc::new(message.recalled()),
        });
    }

    // ---- inboxes --------------------------------------------------------

    /// Handles one message from another shard's inbox.
    pub fn on_remote(&mut self, message: ShardMsg, now: Now) {
        match message {
            ShardMsg::Send {
                origin,
                from,
                from_device,
                channel,
                packet,
                read_us,
            } => self.owner_send(
                origin,
                from,
                from_device,
                channel,
                packet,
                true,
                read_us,
                now,
            ),
            ShardMsg::SendAck {
                conn,
                ack,
                read_us,
                durable_us,
            } => {
                self.record_send_ack_stages(read_us, durable_us, now.micros);
                self.write_packet(conn, &Packet::SendAck(ack))
            }
            ShardMsg::Deliver {
                message,
                recipients,
                skip,
                read_us,
                durable_us,
            } => {
                if read_us != 0 {
                    self.stats
                        .budget
                        .record(Stage::Fanout, durable_us, now.micros);
                }
                self.deliver_local(&message, &recipients, skip, read_us, now)
            }
            ShardMsg::Presence {
                uid,
                device_id,
                device_flag,
                conn,
                online,
            } => {
                self.presence.apply(&uid, conn.shard(), device_flag, online);
                if online {
                    self.kick_device(&uid, &device_id, conn, now);
                    self.push_outgoing(conn.shard(), ShardMsg::PresenceAck { conn });
                }
            }
            ShardMsg::ConversationOp {
                origin,
                uid,
                channel,
                op,
            } => self.owner_conversation_op(origin, uid, channel, op, now),
            ShardMsg::Recall {
                origin,
                uid,
                channel,
                recall,
            } => self.owner_recall(origin, uid, channel, recall),
            ShardMsg::Reply { conn, packet } => self.write_packet(conn, &packet),
            ShardMsg::ConversationUpdated {
                uid,
                skip,
                conversation,
            } => self.update_local_devices(&uid, skip, &conversation),
            ShardMsg::ChannelDeleted { channel, through } => self.forget_channel(&channel, through),
            ShardMsg::MembersRemoved { channel, uids } => {
                self.forget_members_backlog(&channel, &uids)
            }
            ShardMsg::PresenceAck { conn } => {
                if self.sessions.presence_acked(conn) {
                    self.activate(conn, now);
                }
            }
        }
    }

    /// A deleted group's messages (through `through`) are gone: none of
    /// them is pushed again.
    fn forget_channel(&mut self, channel: &ChannelKey, through: Seq) {
        self.pushes.forget_channel(channel, through);
    }

    /// Members removed from `channel`: their connections' backlogs there are
    /// dropped (see [`Pushes::forget_members_backlog`]).
    fn forget_members_backlog(&mut self, channel: &ChannelKey, uids: &[Uid]) {
        let sessions = &self.sessions;
        self.pushes.forget_members_backlog(channel, |conn| {
            sessions
                .identity(conn)
                .is_some_and(|i| uids.contains(&i.uid))
        });
    }

    // ---- acknowledgements and retries ------------------------------------

    fn client_ack(&mut self, conn: ConnId, ack: &crate::protocol::RecvAck, now: Now) {
        self.stats.acks_received += 1;
        self.record_ack(conn, ack, now);
        if self.pushes.has_backlog(conn) {
            self.refill(conn, now);
        }
    }

    fn record_ack(&mut self, conn: ConnId, ack: &crate::protocol::RecvAck, now: Now) {
        let resumed = self.sessions.resumed(conn);
        let ack = if ack.through {
            let Some(uid) = self.identity_uid(conn) else {
                return;
            };
            // A bad channel in an ack completes nothing; it is not worth a
            // disconnect.
            let key = self
                .resolve_for(&uid, &ack.channel_id, ack.channel_type)
                .ok();
            Ack::Through(key, Seq(ack.message_seq))
        } else {
            Ack::Message(MessageId(ack.message_id))
        };
        self.pushes.ack(conn, resumed, ack);
        for pushed_us in self.pushes.take_acked_push_times() {
            self.stats
                .budget
                .record(Stage::RecvAck, pushed_us, now.micros);
        }
    }

    /// Saves the acknowledged positions gathered since the last flush (all
    /// connections', or one connection's when it closes).
    fn flush_positions(&mut self, only: Option<ConnId>) {
        let rows = self.take_positions(only);
        // A connection that is closing: its session ends cleanly here, once
        // (a later flush must not clear the session of a newer connection
        // of the same device).
        let mut sessions = Vec::new();
        if let Some(entry) = only.and_then(|conn| self.sessions.get_mut(conn)) {
            if entry.session_open {
                entry.session_open = false;
                if let Some(identity) = &entry.session.identity {
                    sessions.push(crate::storage::DeviceSession {
                        uid: identity.uid.clone(),
                        device_id: Arc::clone(&identity.device_id),
                        record: crate::storage::SessionRecord {
                            open_in_run: MessageId(0),
                            unrecorded_below: entry.unrecorded_below,
                        },
                    });
                }
            }
        }
        if rows.is_empty() && sessions.is_empty() {
            return;
        }
        if let Err(error) = self.store.save_device_acks(&rows, &sessions) {
            // Not fatal: the device gets those messages again on resume.
            tracing::warn!(%error, rows = rows.len(), "saving acknowledged positions failed");
        }
    }

    /// The write of every position gathered since the last one, for the
    /// runtime to run off this thread (the retry tick batches them).
    pub fn position_flush(&mut self) -> Option<CommitJob> {
        let rows = self.take_positions(None);
        if rows.is_empty() {
            return None;
        }
        match self.store.prepare_device_acks(&rows, &[]) {
            Ok(job) => Some(job),
            Err(error) => {
                tracing::warn!(%error, rows = rows.len(), "saving acknowledged positions failed");
                None
            }
        }
    }

    /// The positions to save (see [`Pushes::take_positions`]).
    fn take_positions(&mut self, only: Option<ConnId>) -> Vec<crate::storage::DeviceAck> {
        let sessions = &self.sessions;
        self.pushes
            .take_positions(only, |conn| sessions.identity_device(conn))
    }

    /// Pushes again every message whose retry timer fired, flagged as
    /// redelivered, with the same ids.
    pub fn retry_due(&mut self, now: Now) {
        let mut due = Vec::new();
        let mut given_up = Vec::new();
        self.pushes.due(now.monotonic.0, &mut due, &mut given_up);
        for conn in given_up {
            self.close(
                conn,
                ReasonCode::SlowConsumer,
                "messages not acknowledged after every redelivery",
                now,
            );
        }
        for (conn, message) in due {
            if !self.sessions.is_active(conn) {
                continue;
            }
            let Some(uid) = self.sessions.identity_uid(conn) else {
                continue;
            };
            let mut recv = recv_view(&message, &uid);
            recv.flags |= RECV_FLAG_REDELIVERED;
            self.write_packet(conn, &Packet::Recv(recv));
            self.stats.redeliveries += 1;
        }
        for conn in self.pushes.backlogged() {
            self.refill(conn, now);
        }
    }

    // ---- conversations, sync and recall -----------------------------------

    /// Sends `packet` to `conn`, wherever it lives.
    fn reply_to(&mut self, conn: ConnId, packet: Packet) {
        if conn.shard() == self.id {
            self.write_packet(conn, &packet);
        } else {
            self.push_outgoing(
                conn.shard(),
                ShardMsg::Reply {
                    conn,
                    packet: Box::new(packet),
                },
            );
        }
    }

    /// The uid and device id of an identified connection.
    fn identity_device(&self, conn: ConnId) -> Option<(Uid, Arc<str>)> {
        self.sessions.identity_device(conn)
    }

    fn identity_uid(&self, conn: ConnId) -> Option<Uid> {
        self.sessions.identity_uid(conn)
    }

    /// A conversation as `uid` sees it, from committed data.
    fn conversation_view(
        &mut self,
        uid: &Uid,
        key: &ChannelKey,
        record: &ConversationRecord,
    ) -> Option<Conversation> {
        let (last_seq, last_message_id) = match self.channels.get(key) {
            Some(channel) => (channel.committed_seq, channel.last_message_id),
            None => {
                let channel = self.store.channel_head(key).ok()??;
                (channel.last_seq, channel.last_message_id)
            }
        };
        build_conversation(
            &mut *self.store,
            uid,
            key,
            record,
            last_seq,
            last_message_id,
        )
    }

    /// Tells every other device of `uid` that a conversation changed.
    fn tell_devices(&mut self, uid: &Uid, skip: ConnId, conversation: &Conversation) {
        let shards: SmallVec<[ShardId; 4]> = self.presence.shards(uid).collect();
        for shard in shards {
            if shard == self.id {
                self.update_local_devices(uid, skip, conversation);
            } else {
                self.push_outgoing(
                    shard,
                    ShardMsg::ConversationUpdated {
                        uid: uid.clone(),
                        skip,
                        conversation: Box::new(conversation.clone()),
                    },
                );
            }
        }
    }

    fn update_local_devices(&mut self, uid: &Uid, skip: ConnId, conversation: &Conversation) {
        let conns = self.sessions.local_conns(uid);
        let packet = Packet::ConversationUpdate(conversation.clone());
        for conn in conns.into_iter().filter(|c| *c != skip) {
            self.write_packet(conn, &packet);
        }
    }

    /// Resolves the channel a request names, or answers with the reason.
    fn resolve_for(
        &self,
        uid: &Uid,
        channel_id: &str,
        channel_type: crate::protocol::ChannelType,
    ) -> Result<ChannelKey, ReasonCode> {
        resolve_target(uid, channel_id, channel_type, &self.id_limits)
    }

    /// Serves `SyncMessages` from committed data, on the connection's shard.
    fn client_sync_messages(&mut self, conn: ConnId, request: &SyncMessages) {
        let Some(uid) = self.identity_uid(conn) else {
            return;
        };
        let result = self
            .resolve_for(&uid, &request.channel_id, request.channel_type)
            .and_then(|key| sync_messages(&mut *self.store, &self.limits, &uid, &key, request));
        let (reason, messages) = match result {
            Ok(messages) => (ReasonCode::Success, messages),
            Err(reason) => (reason, Vec::new()),
        };
        let response = Packet::SyncMessagesResp(SyncMessagesResp {
            request_id: request.request_id,
            reason,
            messages,
        });
        self.write_packet(conn, &response);
    }

    /// Serves `SyncConversations` from committed data, on the connection's
    /// shard.
    fn client_sync_conversations(&mut self, conn: ConnId, request: &SyncConversations, now: Now) {
        let Some(uid) = self.identity_uid(conn) else {
            return;
        };
        let limit = request.limit;
        let response = if limit == 0 || limit > self.limits.sync_limit_max {
            SyncConversationsResp {
                request_id: request.request_id,
                reason: ReasonCode::InvalidRange,
                conversations: Vec::new(),
                more: false,
            }
        } else {
            match self.closed_version(now).and_then(|closed| {
                list_conversations(
                    &mut *self.store,
                    &uid,
                    request,
                    closed,
                    self.limits.sync_response_max_bytes,
                )
            }) {
                Ok((conversations, more)) => SyncConversationsResp {
                    request_id: request.request_id,
                    reason: ReasonCode::Success,
                    conversations,
                    more,
                },
                Err(error) => {
                    tracing::warn!(%error, "conversation sync failed");
                    SyncConversationsResp {
                        request_id: request.request_id,
                        reason: ReasonCode::StorageError,
                        conversations: Vec::new(),
                        more: false,
                    }
                }
            }
        };
        self.write_packet(conn, &Packet::SyncConversationsResp(response));
    }

    fn client_conversation_op(&mut self, conn: ConnId, op: ConversationOp, now: Now) {
        let Some(uid) = self.identity_uid(conn) else {
            return;
        };
        self.awaiting_answer(conn);
        let key = match self.resolve_for(&uid, &op.channel_id, op.channel_type) {
            Ok(key) => key,
            Err(reason) => {
                let response = Packet::ConversationOpResp(ConversationOpResp {
                    request_id: op.request_id,
                    reason,
                    conversation: None,
                });
                return self.write_packet(conn, &response);
            }
        };
        let owner = match self.routing.route(&key) {
            crate::key::Route::Shard(owner) => owner,
            crate::key::Route::Remote(partition) => {
                let request = ApiRequest::ConversationOp {
                    uid,
                    channel: key,
                    op,
                };
                return self.forward(conn, partition, request);
            }
        };
        if owner == self.id {
            self.owner_conversation_op(conn, uid, key, op, now);
        } else {
            self.push_outgoing(
                owner,
                ShardMsg::ConversationOp {
                    origin: conn,
                    uid,
                    channel: key,
                    op,
                },
            );
        }
    }

    /// The owner applies a user's conversation change to its row.
    fn owner_conversation_op(
        &mut self,
        origin: ConnId,
        uid: Uid,
        key: ChannelKey,
        op: ConversationOp,
        now: Now,
    ) {
        if !self.owns(&key) {
            let response = Packet::ConversationOpResp(ConversationOpResp {
                request_id: op.request_id,
                reason: ReasonCode::ServerBusy,
                conversation: None,
            });
            return self.reply_to(origin, response);
        }
        if self.must_wait(&key) {
            return self.park(key, Parked::ConversationOp { origin, uid, op });
        }
        // Loaded here (what may be evicted to make room is asked for only
        // then), so the change below finds it in memory.
        let loaded = self.channel_mut(&key).map(|channel| channel.is_some());
        let pipeline = &mut self.pipeline;
        let changed = match loaded {
            Err(reason) => Err(reason),
            Ok(false) => Err(ReasonCode::ChannelMissing),
            Ok(true) => self.channels.change_conversation(
                &key,
                &uid,
                &op,
                self.limits.sync_limit_max,
                || pipeline.next_id(now.unix_ms).0,
                &mut *self.store,
                Vec::new,
            ),
        };
        let record = match changed {
            Ok(record) => record,
            Err(reason) => {
                let response = Packet::ConversationOpResp(ConversationOpResp {
                    request_id: op.request_id,
                    reason,
                    conversation: None,
                });
                return self.reply_to(origin, response);
            }
        };
        self.queue(Pending::Conversation {
            origin,
            request_id: op.request_id,
            uid,
            key,
            record,
        });
    }

    fn client_recall(&mut self, conn: ConnId, recall: Recall) {
        let Some(uid) = self.identity_uid(conn) else {
            return;
        };
        self.awaiting_answer(conn);
        if recall.message_id == 0
            && (recall.client_msg_no.is_empty()
                || recall.client_msg_no.len() > self.limits.client_msg_no_length_max_bytes)
        {
            return self.write_packet(
                conn,
                &recall_failed(&recall, ReasonCode::InvalidClientMsgNo),
            );
        }
        let key = match self.resolve_for(&uid, &recall.channel_id, recall.channel_type) {
            Ok(key) => key,
            Err(reason) => return self.write_packet(conn, &recall_failed(&recall, reason)),
        };
        let owner = match self.routing.route(&key) {
            crate::key::Route::Shard(owner) => owner,
            crate::key::Route::Remote(partition) => {
                let request = ApiRequest::ClientRecall {
                    uid,
                    channel: key,
                    recall,
                };
                return self.forward(conn, partition, request);
            }
        };
        if owner == self.id {
            self.owner_recall(conn, uid, key, recall);
        } else {
            self.push_outgoing(
                owner,
                ShardMsg::Recall {
                    origin: conn,
                    uid,
                    channel: key,
                    recall,
                },
            );
        }
    }

    /// The owner recalls a message of its channel for its sender. A recall
    /// by client_msg_no of a send that is not committed yet (pipelined right
    /// behind it) waits for the commit.
    fn owner_recall(&mut self, origin: ConnId, uid: Uid, key: ChannelKey, recall: Recall) {
        if !self.owns(&key) {
            return self.reply_to(origin, recall_failed(&recall, ReasonCode::ServerBusy));
        }
        if self.must_wait(&key) {
            return self.park(
                key,
                Parked::Recall {
                    origin,
                    uid,
                    recall,
                },
            );
        }
        let recall = if recall.message_id == 0 {
            let waiting_key = (uid.clone(), recall.client_msg_no.clone());
            match self
                .pipeline
                .wait_recall(&waiting_key, &key, origin, recall)
            {
                None => return,
                Some(recall) => recall,
            }
        } else {
            recall
        };
        let by = if recall.message_id != 0 {
            RecallBy::Id(MessageId(recall.message_id))
        } else {
            RecallBy::ClientMsgNo(&uid, &recall.client_msg_no)
        };
        let message = match message_to_recall(&mut *self.store, &key, by) {
            Err(reason) => return self.reply_to(origin, recall_failed(&recall, reason)),
            Ok(message) => message,
        };
        if message.from_uid != uid {
            return self.reply_to(origin, recall_failed(&recall, ReasonCode::NotSender));
        }
        // A member who left (or was removed) can no longer recall what they
        // sent while a member.
        if key.kind() == crate::protocol::ChannelType::Group {
            let member = match self.channel_mut(&key) {
                Ok(Some(channel)) => channel.members.contains(&uid),
                _ => false,
            };
            if !member {
                return self.reply_to(origin, recall_failed(&recall, ReasonCode::NotMember));
            }
        }
        // Already recalled: answered at once, unless a group deletion being
        // committed erases it (then the answer waits for that deletion).
        if message.recalled && !self.channels.being_deleted(&key, message.seq) {
            let response = Packet::RecallResp(RecallResp {
                request_id: recall.request_id,
                reason: ReasonCode::Success,
                message_id: message.message_id.0,
                message_seq: message.seq.0,
            });
            return self.reply_to(origin, response);
        }
        self.queue(Pending::Recall {
            origin,
            request_id: recall.request_id,
            message: Arc::new(message.recalled()),
        });
    }

    fn push_outgoing(&mut self, shard: ShardId, message: ShardMsg) {
        debug_assert_ne!(shard, self.id, "local work never goes through an inbox");
        let queue = &mut self.outgoing[shard.index()];
        if queue.is_empty() {
            self.signals.flush[shard.index()].notify();
        }
        queue.push(message);
        self.outgoing_total += 1;
    }

    /// Takes up to `max` queued messages for `shard` as one batch.
    pub fn take_outgoing(&mut self, shard: ShardId, max: usize) -> Vec<ShardMsg> {
        let queue = &mut self.outgoing[shard.index()];
        let batch = if queue.len() <= max {
            std::mem::take(queue)
        } else {
            let rest = queue.split_off(max);
            std::mem::replace(queue, rest)
        };
        self.outgoing_total -= batch.len();
        batch
    }
}

/// The recipients of `message` with no device online anywhere (as this
/// shard's presence knows it), sender excluded, each once, sorted.
fn offline_recipients(
    channels: &OwnedChannels,
    presence: &Presence,
    message: &StoredMessage,
) -> Vec<Uid> {
    let mut offline: Vec<Uid> = Vec::new();
    channels.for_each_recipient(message, |uid| {
        if *uid != message.from_uid && !presence.is_online(uid) {
            offline.push(uid.clone());
        }
    });
    offline.sort();
    offline.dedup();
    offline
}

/// The uids of a control request, checked.
fn checked_uids(uids: &[String], max_bytes: usize) -> Result<Vec<Uid>, ControlError> {
    match uids.iter().find(|u| !valid_uid(u, max_bytes)) {
        Some(bad) => Err(ControlError::Invalid(format!("bad uid {bad:?}"))),
        None => Ok(uids.iter().map(|u| Uid::new(u)).collect()),
    }
}

fn recall_failed(recall: &Recall, reason: ReasonCode) -> Packet {
    Packet::RecallResp(RecallResp {
        request_id: recall.request_id,
        reason,
        message_id: 0,
        message_seq: 0,
    })
}

fn failed_ack(send: &SendPacket, reason: ReasonCode) -> SendAck {
    SendAck {
        client_seq: send.client_seq,
        client_msg_no: send.client_msg_no.clone(),
        message_id: 0,
        message_seq: 0,
        reason,
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
