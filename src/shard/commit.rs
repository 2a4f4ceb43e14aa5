//! The commit pipeline: work queued for the next storage batch, the batch
//! being written, the sends not committed yet (with whoever waits on their
//! `(from_uid, client_msg_no)`), and the ids and conversation versions the
//! work is stamped with.
//!
//! It turns queued work into one batch of storage mutations and says what
//! the batch holds; the dispatcher hands the batch to the store and, when
//! it is durable (or failed), carries each piece's effects out.

use super::api::{ApiReply, GroupReply, ListReply};
use super::channels::Busy;
use super::message_ids::{MessageIdGenerator, ID_EPOCH_UNIX_MS};
use super::versions::{VersionFrontier, ID_MS_SHIFT};
use crate::channel::ChannelKey;
use crate::ids::{ConnId, MessageId, Seq, ShardId, Uid};
use crate::protocol::{ReasonCode, Recall};
use crate::storage::{
    ConversationRecord, IdempotentHit, ListKind, Mutation, ShardStore, StorageError, StoredMessage,
};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::Arc;

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// Work assigned a place in a channel and waiting for the next commit.
pub(super) enum Pending {
    Send {
        origin: ConnId,
        client_seq: u32,
        message: Arc<StoredMessage>,
        /// Conversation rows written in the same batch as the message.
        rows: Vec<(Uid, ConversationRecord)>,
        /// When its frame was read, and when it was queued here (the
        /// latency budget's clock).
        read_us: u64,
        queued_us: u64,
    },
    Group {
        key: ChannelKey,
        members: Vec<Uid>,
        last_seq: Seq,
        last_message_id: MessageId,
        rows: Vec<(Uid, ConversationRecord)>,
        /// Members removed by this change: their conversation rows go.
        removed: Vec<Uid>,
        reply: GroupReply,
    },
    Conversation {
        origin: ConnId,
        request_id: u32,
        uid: Uid,
        key: ChannelKey,
        record: ConversationRecord,
    },
    Recall {
        origin: ConnId,
        request_id: u32,
        message: Arc<StoredMessage>,
    },
    List {
        key: ChannelKey,
        kind: ListKind,
        uids: Vec<Uid>,
        reply: ListReply,
    },
    DeleteGroup {
        key: ChannelKey,
        members: Vec<Uid>,
        /// The group's last seq and message id, kept in its tombstone.
        last_seq: Seq,
        last_message_id: MessageId,
        reply: ApiReply,
    },
}

impl Pending {
    /// The channel the work is for.
    pub fn channel(&self) -> &ChannelKey {
        match self {
            Pending::Send { message, .. } | Pending::Recall { message, .. } => &message.channel,
            Pending::Group { key, .. }
            | Pending::Conversation { key, .. }
            | Pending::List { key, .. }
            | Pending::DeleteGroup { key, .. } => key,
        }
    }

    /// The conversation version the work stamps on what it makes visible
    /// (a message's id is its channel's newest version), if any.
    fn version(&self) -> Option<u64> {
        match self {
            Pending::Send { message, .. } => Some(message.message_id.0),
            Pending::Conversation { record, .. } => Some(record.version),
            Pending::Group { rows, .. } => rows.iter().map(|(_, r)| r.version).min(),
            Pending::Recall { .. } | Pending::List { .. } | Pending::DeleteGroup { .. } => None,
        }
    }

    /// Its storage mutations.
    pub(super) fn mutations(&self, out: &mut Vec<Mutation>) {
        match self {
            Pending::Send { message, rows, .. } => {
                out.push(Mutation::Message(Arc::clone(message)));
                push_rows(out, &message.channel, rows);
            }
            Pending::Group {
                key,
                members,
                last_seq,
                last_message_id,
                rows,
                removed,
                ..
            } => {
                out.push(Mutation::PutGroup {
                    key: key.clone(),
                    members: members.clone(),
                    last_seq: *last_seq,
                    last_message_id: *last_message_id,
                });
                push_rows(out, key, rows);
                for uid in removed {
                    out.push(Mutation::DeleteConversation {
                        uid: uid.clone(),
                        key: key.clone(),
                    });
                }
            }
            Pending::Conversation {
                uid, key, record, ..
            } => out.push(Mutation::Conversation {
                uid: uid.clone(),
                key: key.clone(),
                record: *record,
            }),
            Pending::Recall { message, .. } => out.push(Mutation::Recall(Arc::clone(message))),
            Pending::List {
                key, kind, uids, ..
            } => out.push(Mutation::PutList {
                key: key.clone(),
                kind: *kind,
                uids: uids.clone(),
            }),
            Pending::DeleteGroup {
                key,
                members,
                last_seq,
                last_message_id,
                ..
            } => out.push(Mutation::DeleteGroup {
                key: key.clone(),
                members: members.clone(),
                last_seq: *last_seq,
                last_message_id: *last_message_id,
            }),
        }
    }
}

fn push_rows(mutations: &mut Vec<Mutation>, key: &ChannelKey, rows: &[(Uid, ConversationRecord)]) {
    for (uid, record) in rows {
        mutations.push(Mutation::Conversation {
            uid: uid.clone(),
            key: key.clone(),
            record: *record,
        });
    }
}

/// The lowest conversation version among `pending`.
fn lowest_version<'a>(pending: impl IntoIterator<Item = &'a Pending>) -> Option<u64> {
    pending.into_iter().filter_map(Pending::version).min()
}

/// A batch handed to storage whose durable write has not finished yet.
pub struct InFlight {
    pub(super) pending: Vec<Pending>,
    /// Webhook events written with the batch, and their bytes.
    pub(super) webhook_events: u64,
    pub(super) webhook_bytes: u64,
    /// `user.onlinestatus` lines and late `msg.offline` bodies in the
    /// batch: queued again if it fails.
    pub(super) presence_lines: Vec<String>,
    pub(super) late_offline: Vec<Vec<u8>>,
    /// Each send's offline recipients as its `msg.offline` named them when
    /// the batch began (empty for other work, or when not asked for): a
    /// part of the batch written later names the same.
    pub(super) offline: Vec<Vec<Uid>>,
    /// When the batch was begun (the latency budget's clock).
    pub(super) begun_us: u64,
}

/// A send's `(from_uid, client_msg_no)`.
pub(super) type IdempotencyKey = (Uid, String);

/// A send that is not committed yet, and who waits for it: resends of the
/// same `(from_uid, client_msg_no)` get the same answer when it commits, and
/// recalls by that client_msg_no are served once it is stored.
struct Uncommitted {
    channel: ChannelKey,
    waiters: SmallVec<[(ConnId, u32); 1]>,
    recalls: SmallVec<[(ConnId, Recall); 1]>,
}

/// Who waited for a send that was committed or refused.
#[derive(Default)]
pub(super) struct Waiters {
    /// Resends: their connection and `client_seq`.
    pub sends: SmallVec<[(ConnId, u32); 1]>,
    /// Recalls by its client_msg_no.
    pub recalls: SmallVec<[(ConnId, Recall); 1]>,
}

/// A resend of a send not committed yet.
pub(super) enum Resend {
    /// No such send is waiting for a commit.
    NotWaiting,
    /// It waits with the first; it gets the same answer.
    Joined,
    /// The first was to another channel.
    OtherChannel,
}

pub(super) struct CommitPipeline {
    pending: Vec<Pending>,
    uncommitted: FastMap<IdempotencyKey, Uncommitted>,
    /// Channels of the batch being committed: not evicted meanwhile.
    committing: Vec<ChannelKey>,
    /// A batch is being written; the lowest conversation version in it.
    in_flight: bool,
    in_flight_lowest: Option<u64>,
    ids: MessageIdGenerator,
    /// Ids through these milliseconds are recorded as issued (a sync's
    /// closed version raised every shard's id floor to about now; a restart
    /// must start above it even if the clock went back).
    ids_recorded_ms: u64,
    idempotency_ttl_ms: u64,
    /// The first message id of this run of the process: every id below it
    /// was handed out by an earlier run.
    run: MessageId,
}

impl CommitPipeline {
    pub fn new(shard: ShardId, idempotency_ttl_ms: u64) -> CommitPipeline {
        CommitPipeline {
            pending: Vec::new(),
            uncommitted: FastMap::default(),
            committing: Vec::new(),
            in_flight: false,
            in_flight_lowest: None,
            ids: MessageIdGenerator::new(shard),
            ids_recorded_ms: 0,
            idempotency_ttl_ms,
            run: MessageId(0),
        }
    }

    /// Starts this run: ids continue above `run`.
    pub fn start_run(&mut self, run: MessageId) {
        self.run = run;
        self.ids.continue_from(run);
    }

    pub fn run(&self) -> MessageId {
        self.run
    }

    /// Ids continue above `floor` too (ids a log applied here recorded).
    pub fn continue_above(&mut self, floor: MessageId) {
        self.ids
            .continue_from(MessageId(floor.0 + (1 << ID_MS_SHIFT)));
    }

    pub fn share_versions(&mut self, versions: Arc<VersionFrontier>) {
        self.ids.share_versions(versions);
        self.publish_versions();
    }

    /// See [`MessageIdGenerator::set_tag`].
    pub fn set_id_tag(&mut self, tag: u16) {
        self.ids.set_tag(tag);
    }

    /// A new message id (a conversation version too).
    pub fn next_id(&mut self, unix_ms: u64) -> MessageId {
        self.ids.next(unix_ms)
    }

    /// Queues work for the next batch.
    pub fn queue(&mut self, pending: Pending) {
        self.pending.push(pending);
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The channels with work queued or being committed.
    pub fn busy(&self) -> Busy<'_> {
        self.pending
            .iter()
            .map(Pending::channel)
            .chain(self.committing.iter())
            .collect()
    }

    /// [`CommitPipeline::busy`], owned (asked for only when channels are
    /// evicted).
    pub fn busy_keys(&self) -> Vec<ChannelKey> {
        self.busy().into_iter().cloned().collect()
    }

    /// Publishes this shard's closed conversation version.
    pub fn publish_versions(&mut self) {
        let idle = self.pending.is_empty() && !self.in_flight;
        let lowest = match (self.in_flight_lowest, lowest_version(&self.pending)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.ids.publish(idle, lowest);
    }

    /// The version through which every conversation change of every shard
    /// is visible: a sync answers nothing above it, so a client that syncs
    /// next from the highest version it got misses nothing committed later.
    pub fn closed_version(
        &mut self,
        unix_ms: u64,
        store: &mut dyn ShardStore,
    ) -> Result<u64, StorageError> {
        self.publish_versions();
        let now_ms = unix_ms.saturating_sub(ID_EPOCH_UNIX_MS);
        let closed = self.ids.versions.closed_through(now_ms);
        // Idle shards' id floors were raised to about now: a restart must
        // issue above that too, whatever its clock says. Recorded a second
        // ahead, so at most one write a second.
        let closed_ms = closed >> ID_MS_SHIFT;
        if closed != u64::MAX && closed_ms >= self.ids_recorded_ms {
            let ahead = closed_ms + 1000;
            store.commit(&[Mutation::IdsIssued(MessageId(ahead << ID_MS_SHIFT))])?;
            self.ids_recorded_ms = ahead;
        }
        Ok(closed)
    }

    /// A send of `key` to `channel` again while the first is not committed.
    pub fn resend(
        &mut self,
        key: &IdempotencyKey,
        channel: &ChannelKey,
        origin: ConnId,
        client_seq: u32,
    ) -> Resend {
        let Some(waiting) = self.uncommitted.get_mut(key) else {
            return Resend::NotWaiting;
        };
        if waiting.channel != *channel {
            return Resend::OtherChannel;
        }
        waiting.waiters.push((origin, client_seq));
        Resend::Joined
    }

    /// The send `key` to `channel` is queued: resends and recalls of it
    /// wait for its commit.
    pub fn expect(&mut self, key: IdempotencyKey, channel: ChannelKey) {
        self.uncommitted.insert(
            key,
            Uncommitted {
                channel,
                waiters: SmallVec::new(),
                recalls: SmallVec::new(),
            },
        );
    }

    /// A recall by client_msg_no of a send to `channel` not committed yet
    /// waits for it; otherwise it is given back.
    pub fn wait_recall(
        &mut self,
        key: &IdempotencyKey,
        channel: &ChannelKey,
        origin: ConnId,
        recall: Recall,
    ) -> Option<Recall> {
        match self.uncommitted.get_mut(key) {
            Some(waiting) if waiting.channel == *channel => {
                waiting.recalls.push((origin, recall));
                None
            }
            _ => Some(recall),
        }
    }

    /// The send `key` was committed or refused: who waited for it.
    pub fn take_waiters(&mut self, key: &IdempotencyKey) -> Waiters {
        match self.uncommitted.remove(key) {
            Some(waiting) => Waiters {
                sends: waiting.waiters,
                recalls: waiting.recalls,
            },
            None => Waiters::default(),
        }
    }

    /// The stored message `(from, client_msg_no)` names, if it was
    /// committed within the idempotency window and is still stored (a
    /// deleted group's messages are gone, though their keys linger until
    /// they expire).
    pub fn idempotent_hit(
        &self,
        from: &Uid,
        client_msg_no: &str,
        unix_ms: u64,
        store: &mut dyn ShardStore,
    ) -> Result<Option<IdempotentHit>, StorageError> {
        let Some(hit) =
            store.find_idempotent(from, client_msg_no, unix_ms, self.idempotency_ttl_ms)?
        else {
            return Ok(None);
        };
        let stored = store.message(&hit.channel, hit.seq)?;
        Ok(stored
            .is_some_and(|m| m.message_id == hit.message_id)
            .then_some(hit))
    }

    /// Takes everything queued as the next batch, less the work a group
    /// deletion in it makes moot, which is returned with the reason to
    /// refuse it: sends and recalls queued before the delete (it would
    /// erase them and leave their webhook events describing nothing), and a
    /// recall queued after it of a message it erases (writing it would
    /// bring the message back). Sends queued after it are for the group
    /// created again.
    pub fn take_batch(&mut self) -> (Vec<Pending>, Vec<(Pending, ReasonCode)>) {
        let pending = std::mem::take(&mut self.pending);
        if !pending
            .iter()
            .any(|p| matches!(p, Pending::DeleteGroup { .. }))
        {
            return (pending, Vec::new());
        }
        let mut doomed: Vec<Option<ReasonCode>> = vec![None; pending.len()];
        let mut deleted_later: Vec<ChannelKey> = Vec::new();
        for (i, p) in pending.iter().enumerate().rev() {
            match p {
                Pending::DeleteGroup { key, .. } => deleted_later.push(key.clone()),
                Pending::Send { message, .. } | Pending::Recall { message, .. }
                    if deleted_later.contains(&message.channel) =>
                {
                    doomed[i] = Some(ReasonCode::ChannelMissing);
                }
                _ => {}
            }
        }
        let mut deleted_before: Vec<(&ChannelKey, Seq)> = Vec::new();
        for (i, p) in pending.iter().enumerate() {
            match p {
                Pending::DeleteGroup { key, last_seq, .. } => deleted_before.push((key, *last_seq)),
                Pending::Recall { message, .. }
                    if deleted_before
                        .iter()
                        .any(|(k, through)| **k == message.channel && message.seq <= *through) =>
                {
                    doomed[i] = Some(ReasonCode::MessageMissing);
                }
                _ => {}
            }
        }
        let mut kept = Vec::with_capacity(pending.len());
        let mut refused = Vec::new();
        for (p, doomed) in pending.into_iter().zip(doomed) {
            match doomed {
                Some(reason) => refused.push((p, reason)),
                None => kept.push(p),
            }
        }
        (kept, refused)
    }

    /// Starts writing `pending`: returns its storage mutations. Webhook
    /// events may be added before [`CommitPipeline::seal`].
    pub fn begin(&mut self, pending: Vec<Pending>) -> (InFlight, Vec<Mutation>) {
        let mut mutations: Vec<Mutation> = Vec::with_capacity(pending.len() * 2);
        for p in &pending {
            p.mutations(&mut mutations);
        }
        self.committing = pending.iter().map(Pending::channel).cloned().collect();
        self.in_flight = true;
        self.in_flight_lowest = lowest_version(&pending);
        let in_flight = InFlight {
            pending,
            webhook_events: 0,
            webhook_bytes: 0,
            presence_lines: Vec::new(),
            late_offline: Vec::new(),
            offline: Vec::new(),
            begun_us: 0,
        };
        (in_flight, mutations)
    }

    /// Ends a batch's mutations: every id handed out so far (messages,
    /// versions, webhook events) is recorded with the batch that uses it,
    /// so a restart starts above.
    pub fn seal(&self, mutations: &mut Vec<Mutation>) {
        mutations.push(Mutation::IdsIssued(self.ids.last_issued()));
    }

    /// The batch being written is durable.
    pub fn finished(&mut self) {
        self.committing.clear();
        self.in_flight = false;
        self.in_flight_lowest = None;
    }

    /// The batch being written failed: returns everything queued behind it
    /// (it is refused too: the channels that handed out its places are
    /// read again from storage).
    pub fn failed(&mut self) -> Vec<Pending> {
        self.finished();
        std::mem::take(&mut self.pending)
    }

    /// Whether a deletion of `key` is queued.
    pub fn deletion_queued(&self, key: &ChannelKey) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p, Pending::DeleteGroup { key: k, .. } if k == key))
    }

    /// Takes the recalls queued of messages of `key` through `last_seq`
    /// (a deletion erased them).
    pub fn take_erased_recalls(&mut self, key: &ChannelKey, last_seq: Seq) -> Vec<Pending> {
        let (erased, kept): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| {
                matches!(p, Pending::Recall { message, .. }
                    if message.channel == *key && message.seq <= last_seq)
            });
        self.pending = kept;
        erased
    }
}

/// Buckets (upper bounds, microseconds) of the commit latency histogram.
pub const COMMIT_BUCKETS_US: [u64; 10] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

/// How long durable writes took: a cumulative-style histogram for
/// Prometheus (`counts[i]` = commits within `COMMIT_BUCKETS_US[i]`, not
/// cumulative; the last slot counts the rest).
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitLatency {
    pub counts: [u64; COMMIT_BUCKETS_US.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

impl CommitLatency {
    pub fn record(&mut self, micros: u64) {
        let slot = COMMIT_BUCKETS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(COMMIT_BUCKETS_US.len());
        self.counts[slot] += 1;
        self.sum_us += micros;
        self.count += 1;
    }

    pub fn merge(&mut self, other: &CommitLatency) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
        self.sum_us += other.sum_us;
        self.count += other.count;
    }
}
