//! The storage seam. Shards see storage only through [`ShardStore`]: a
//! batch-oriented interface (one commit per shard tick, so a durable engine
//! can group-commit many messages under one sync). The trait and the
//! in-memory store know nothing of any particular engine; the RocksDB store
//! and its key encodings live in [`rocks`] and [`keys`].
//!
//! A commit has two halves: [`ShardStore::prepare_commit`] checks the batch
//! and builds the write on the shard's thread, and the returned
//! [`CommitJob`] makes it durable, possibly on a blocking thread, so the
//! shard keeps serving while the disk syncs. Only the owner of a channel
//! writes it, so each shard gets its own handle from [`Storage::open_shard`];
//! reads of committed data may come from any shard.

pub mod keys;
mod memory;
pub mod rocks;

pub use memory::MemoryStorage;
pub use rocks::{RocksStorage, SyncPolicy};

use crate::ids::{MessageId, Seq, ShardId, Uid};
use crate::key::ChannelKey;
use bytes::Bytes;
use std::sync::Arc;

/// A committed message, immutable once built. Shared between the owner's
/// store and the shards that deliver it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub message_id: MessageId,
    pub seq: Seq,
    pub channel: ChannelKey,
    pub from_uid: Uid,
    /// The device that sent it; empty for the admin API. A backlog read
    /// back for that same device (a full in-flight window, a resume) skips
    /// it, as the live fan-out skips the sending connection.
    pub from_device: Arc<str>,
    pub client_msg_no: String,
    /// Server time of the commit, Unix milliseconds.
    pub timestamp_ms: i64,
    /// The application flags of the `Send`.
    pub send_flags: u8,
    pub payload: Bytes,
    /// Recalled by its sender or an administrator; the payload is then
    /// empty.
    pub recalled: bool,
}

/// A stored message for tests: id `100 + seq`, sent by `from` from device
/// "phone" as "c{seq}", payload "m{seq}".
#[cfg(test)]
pub(crate) fn test_message(channel: &ChannelKey, seq: u64, from: &str) -> Arc<StoredMessage> {
    Arc::new(StoredMessage {
        message_id: MessageId(100 + seq),
        seq: Seq(seq),
        channel: channel.clone(),
        from_uid: Uid::new(from),
        from_device: Arc::from("phone"),
        client_msg_no: format!("c{seq}"),
        timestamp_ms: 1,
        send_flags: 0,
        payload: Bytes::from(format!("m{seq}")),
        recalled: false,
    })
}

impl StoredMessage {
    /// The recalled form of this message: same place, no payload.
    pub fn recalled(&self) -> StoredMessage {
        StoredMessage {
            payload: Bytes::new(),
            recalled: true,
            ..self.clone()
        }
    }
}

/// One user's conversation in one channel, as its owner shard keeps it.
/// Unread = `last_seq - read_floor - own_above_floor`: the messages above
/// the read position, less the user's own. A conversation is visible while
/// the channel's last seq is above `deleted_seq`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConversationRecord {
    /// Everything at or below this seq counts as read.
    pub read_floor: u64,
    /// The channel's last seq when the user deleted the conversation.
    pub deleted_seq: u64,
    /// The user's own messages above `read_floor`.
    pub own_above_floor: u64,
    /// The version of the user's last change to this row (or of the
    /// message that created it).
    pub version: u64,
}

impl ConversationRecord {
    pub fn unread(&self, last_seq: u64) -> u64 {
        last_seq
            .saturating_sub(self.read_floor)
            .saturating_sub(self.own_above_floor)
    }

    pub fn visible(&self, last_seq: u64) -> bool {
        last_seq > self.deleted_seq
    }
}

/// Which list of a channel (or of a user, for person channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListKind {
    /// When non-empty, only these uids may send.
    Allow,
    /// These uids may never send.
    Deny,
}

impl ListKind {
    pub fn tag(self) -> u8 {
        match self {
            ListKind::Allow => 0,
            ListKind::Deny => 1,
        }
    }
}

/// The key under which a user's own lists (for person channels) are kept:
/// a person-type key holding one uid, which no pair key can equal because
/// uids never contain `@`.
pub fn user_list_key(uid: &Uid) -> ChannelKey {
    ChannelKey::from_parts(crate::protocol::ChannelType::Person, uid.as_str())
}

/// Which way a range read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadDirection {
    /// Seqs `from`, `from + 1`, ...
    Up,
    /// Seqs `from`, `from - 1`, ...
    Down,
}

/// One change in a commit batch.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Append a message at its seq, move the channel's last seq, and
    /// remember its idempotency key.
    Message(Arc<StoredMessage>),
    /// Write one user's conversation row.
    Conversation {
        uid: Uid,
        key: ChannelKey,
        record: ConversationRecord,
    },
    /// Remove one user's conversation row (a member who left a group).
    DeleteConversation { uid: Uid, key: ChannelKey },
    /// Replace a stored message with its recalled form.
    Recall(Arc<StoredMessage>),
    /// Replace an allow or deny list.
    PutList {
        key: ChannelKey,
        kind: ListKind,
        uids: Vec<Uid>,
    },
    /// Append an event to the webhook outbox of `shard`, in the same batch
    /// as the messages it describes. `id` grows within a shard.
    Webhook {
        shard: ShardId,
        id: u64,
        record: Arc<WebhookRecord>,
    },
    /// Delete a group: its members, lists, messages, and the conversation
    /// rows of `members`. Its record stays as a tombstone with the last seq
    /// and message id, so a group created again under the same id continues
    /// the seqs instead of reusing them.
    DeleteGroup {
        key: ChannelKey,
        members: Vec<Uid>,
        last_seq: Seq,
        last_message_id: MessageId,
    },
    /// Every message id (and version) the writing shard has handed out is
    /// at most this: a restart starts its ids above the largest ever
    /// recorded, whatever the clock says.
    IdsIssued(MessageId),
    /// Create or replace a group and its member list. `last_seq` is the
    /// group's last seq once everything before this change is applied.
    PutGroup {
        key: ChannelKey,
        members: Vec<Uid>,
        last_seq: Seq,
        last_message_id: MessageId,
    },
    /// A cluster node has applied its partition's log up to stream sequence
    /// `seq`, in the same batch as what it applied (positions only grow).
    /// Local bookkeeping: never itself carried in a log.
    LogApplied { partition: u32, seq: u64 },
}

/// One event waiting in the webhook outbox: the event name and the JSON
/// body exactly as it will be posted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WebhookRecord {
    pub event: String,
    pub body: Vec<u8>,
    /// When the event was committed, Unix milliseconds.
    pub created_ms: u64,
}

impl WebhookRecord {
    /// What the record counts against `webhook.outbox_max_bytes`.
    pub fn size(&self) -> u64 {
        (self.event.len() + self.body.len() + 24) as u64
    }
}

/// What a client that sends the same `(from_uid, client_msg_no)` again gets
/// back: the original message's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentHit {
    pub channel: ChannelKey,
    pub seq: Seq,
    pub message_id: MessageId,
    /// When the original was committed, Unix milliseconds.
    pub committed_at_ms: i64,
}

/// The durable half of a commit. Returns once the batch is as durable as the
/// sync policy promises; may run on another thread.
pub type CommitJob = Box<dyn FnOnce() -> Result<(), StorageError> + Send>;

/// What the store knows of a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRecord {
    pub last_seq: Seq,
    /// The id of the message at `last_seq` (0 when there is none).
    pub last_message_id: MessageId,
    /// Members of a group; `None` for a person channel or a deleted group.
    pub members: Option<Vec<Uid>>,
    /// A deleted group's tombstone: no members, no messages, only the last
    /// seq and message id it had.
    pub deleted: bool,
}

/// A channel's place, without its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelHead {
    pub last_seq: Seq,
    pub last_message_id: MessageId,
    /// A deleted group's tombstone.
    pub deleted: bool,
}

/// A storage failure. Every variant is retryable from the client's point of
/// view: nothing in the failed batch was stored.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StorageError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("storage is corrupt: {0}")]
    Corrupt(String),
    #[error("storage is closed: the server is shutting down")]
    Closed,
}

/// One shard's view of storage.
pub trait ShardStore {
    /// Checks `batch` and prepares its write; the job applies it, all or
    /// nothing. Batches are applied in the order they were prepared, and the
    /// next is prepared only after the previous job finished.
    fn prepare_commit(&mut self, batch: &[Mutation]) -> Result<CommitJob, StorageError>;

    /// Prepares and runs a commit on the calling thread.
    fn commit(&mut self, batch: &[Mutation]) -> Result<(), StorageError> {
        self.prepare_commit(batch)?()
    }

    /// The message `(from, client_msg_no)` names, if it was committed within
    /// the last `ttl_ms`.
    fn find_idempotent(
        &mut self,
        from: &Uid,
        client_msg_no: &str,
        now_unix_ms: u64,
        ttl_ms: u64,
    ) -> Result<Option<IdempotentHit>, StorageError>;

    /// What is stored about `key`, or `None` for a channel never written.
    fn load_channel(&mut self, key: &ChannelKey) -> Result<Option<ChannelRecord>, StorageError>;

    /// `key`'s last seq and message id, without a group's members (one
    /// point read, for listing a user's conversations), or `None` for a
    /// channel never written.
    fn channel_head(&mut self, key: &ChannelKey) -> Result<Option<ChannelHead>, StorageError>;

    /// Up to `limit` messages of `key` from seq `from` (inclusive) in
    /// `direction`.
    fn read_messages(
        &mut self,
        key: &ChannelKey,
        from: Seq,
        limit: usize,
        direction: ReadDirection,
    ) -> Result<Vec<Arc<StoredMessage>>, StorageError>;

    /// The message at `seq`, if stored.
    fn message(
        &mut self,
        key: &ChannelKey,
        seq: Seq,
    ) -> Result<Option<Arc<StoredMessage>>, StorageError> {
        Ok(self
            .read_messages(key, seq, 1, ReadDirection::Up)?
            .into_iter()
            .find(|m| m.seq == seq))
    }

    /// The seq of the message with `id` in `key`, if stored.
    fn find_message_id(
        &mut self,
        key: &ChannelKey,
        id: MessageId,
    ) -> Result<Option<Seq>, StorageError>;

    /// Whether `uid` is a member of the group `key`.
    fn is_member(&mut self, key: &ChannelKey, uid: &Uid) -> Result<bool, StorageError>;

    /// `uid`'s row in `key`.
    fn conversation(
        &mut self,
        uid: &Uid,
        key: &ChannelKey,
    ) -> Result<Option<ConversationRecord>, StorageError>;

    /// Every conversation row of `uid`.
    fn conversations(
        &mut self,
        uid: &Uid,
    ) -> Result<Vec<(ChannelKey, ConversationRecord)>, StorageError>;

    /// Up to `limit` uids of a list.
    fn list(
        &mut self,
        key: &ChannelKey,
        kind: ListKind,
        limit: usize,
    ) -> Result<Vec<Uid>, StorageError>;

    /// Whether `uid` is on a list.
    fn list_contains(
        &mut self,
        key: &ChannelKey,
        kind: ListKind,
        uid: &Uid,
    ) -> Result<bool, StorageError>;

    /// Records how far devices have got in channels, and their sessions.
    /// Written at once, without a sync of its own (it rides the next one):
    /// losing the last few positions in a power cut only means a few
    /// redeliveries. Both halves of a position only grow, whatever order
    /// writes land in.
    fn prepare_device_acks(
        &mut self,
        rows: &[DeviceAck],
        sessions: &[DeviceSession],
    ) -> Result<CommitJob, StorageError>;

    /// Prepares and writes positions on the calling thread.
    fn save_device_acks(
        &mut self,
        rows: &[DeviceAck],
        sessions: &[DeviceSession],
    ) -> Result<(), StorageError> {
        self.prepare_device_acks(rows, sessions)?()
    }

    /// How far `device_id` of `uid` has got in `key` (zeros: never).
    fn device_position(
        &mut self,
        uid: &Uid,
        device_id: &str,
        key: &ChannelKey,
    ) -> Result<DevicePosition, StorageError>;

    /// The session record of `device_id` of `uid`, if it ever connected.
    fn device_session(
        &mut self,
        uid: &Uid,
        device_id: &str,
    ) -> Result<Option<SessionRecord>, StorageError>;

    /// The largest [`Mutation::IdsIssued`] ever committed (0: none).
    fn ids_issued(&mut self) -> Result<MessageId, StorageError>;

    /// The largest [`Mutation::LogApplied`] of `partition` ever committed
    /// (0: none).
    fn log_applied(&mut self, partition: u32) -> Result<u64, StorageError>;

    /// The token registered for `uid` on devices of `device_flag` through
    /// the admin API, if any.
    fn user_token(&mut self, uid: &Uid, device_flag: u8) -> Result<Option<String>, StorageError>;
}

/// How far one device has got in one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAck {
    pub uid: Uid,
    pub device_id: Arc<str>,
    pub channel: ChannelKey,
    /// Everything at or below it is acknowledged.
    pub seq: Seq,
    /// The highest seq ever pushed to it: anything up to it that comes
    /// again comes flagged as redelivered.
    pub pushed: Seq,
}

/// A stored position: acknowledged through `acked`, pushed up to `pushed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevicePosition {
    pub acked: Seq,
    pub pushed: Seq,
}

impl DevicePosition {
    /// Decodes a stored value: two big-endian u64s (acknowledged, pushed),
    /// or, as first written, only the first.
    pub fn decode(bytes: &[u8]) -> Result<DevicePosition, StorageError> {
        let word = |i: usize| -> Option<u64> {
            bytes
                .get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
        };
        match bytes.len() {
            8 | 16 => {
                let acked = word(0).unwrap_or(0);
                let pushed = word(1).unwrap_or(0).max(acked);
                Ok(DevicePosition {
                    acked: Seq(acked),
                    pushed: Seq(pushed),
                })
            }
            _ => Err(StorageError::Corrupt("device position entry".into())),
        }
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.acked.0.to_be_bytes());
        out[8..].copy_from_slice(&self.pushed.0.to_be_bytes());
        out
    }
}

/// What is kept of a device's sessions: which run of the gateway has one
/// open (none after it closed cleanly), and, once a session was left open
/// by a run that crashed, the id below which messages may have been pushed
/// to it without the push being recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionRecord {
    /// The run (its first message id) with a session open; 0: closed.
    pub open_in_run: MessageId,
    /// Messages with ids below it may have reached the device unrecorded.
    pub unrecorded_below: MessageId,
}

impl SessionRecord {
    pub fn decode(bytes: &[u8]) -> Result<SessionRecord, StorageError> {
        let words: Option<[u8; 16]> = bytes.try_into().ok();
        let words = words.ok_or_else(|| StorageError::Corrupt("device session entry".into()))?;
        let word = |i: usize| {
            let mut b = [0; 8];
            b.copy_from_slice(&words[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        Ok(SessionRecord {
            open_in_run: MessageId(word(0)),
            unrecorded_below: MessageId(word(1)),
        })
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.open_in_run.0.to_be_bytes());
        out[8..].copy_from_slice(&self.unrecorded_below.0.to_be_bytes());
        out
    }
}

/// A write of one device's session record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSession {
    pub uid: Uid,
    pub device_id: Arc<str>,
    pub record: SessionRecord,
}

/// A storage engine: hands every shard its own [`ShardStore`].
pub trait Storage: Send + Sync {
    fn open_shard(&self, shard: ShardId) -> Result<Box<dyn ShardStore>, StorageError>;

    /// Syncs everything written so far to disk (for the `interval` sync
    /// policy). Blocking.
    fn sync_wal(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Whether a commit job waits on the disk (and so should run off the
    /// shard's thread).
    fn commits_block(&self) -> bool {
        false
    }

    /// How often [`Storage::sync_wal`] must be called, if at all.
    fn sync_interval_ms(&self) -> Option<u64> {
        None
    }

    /// Up to `limit` events of `shard`'s webhook outbox with ids above
    /// `after`, oldest first.
    fn webhook_events(
        &self,
        shard: ShardId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, WebhookRecord)>, StorageError>;

    /// Removes a delivered event (not synced: a lost delete means one more
    /// delivery, which receivers drop by id).
    fn delete_webhook_event(&self, shard: ShardId, id: u64) -> Result<(), StorageError>;

    /// The shards that have events in the outbox (also shards of an earlier
    /// run with more shards).
    fn webhook_shards(&self) -> Result<Vec<ShardId>, StorageError>;

    /// Events and bytes in the whole outbox (a scan, for start-up).
    fn webhook_outbox_size(&self) -> Result<(u64, u64), StorageError>;

    /// Registers `token` for `uid` on devices of `device_flag` (replacing
    /// the previous one), durably.
    fn put_user_token(&self, uid: &Uid, device_flag: u8, token: &str) -> Result<(), StorageError>;
}

/// What a shard holds after shutdown: every call fails, and the engine's
/// files are released even if a task still holds the shard's state.
#[derive(Debug, Default)]
pub struct ClosedStore;

impl ShardStore for ClosedStore {
    fn prepare_commit(&mut self, _batch: &[Mutation]) -> Result<CommitJob, StorageError> {
        Err(StorageError::Closed)
    }

    fn find_idempotent(
        &mut self,
        _from: &Uid,
        _client_msg_no: &str,
        _now_unix_ms: u64,
        _ttl_ms: u64,
    ) -> Result<Option<IdempotentHit>, StorageError> {
        Err(StorageError::Closed)
    }

    fn load_channel(&mut self, _key: &ChannelKey) -> Result<Option<ChannelRecord>, StorageError> {
        Err(StorageError::Closed)
    }

    fn channel_head(&mut self, _key: &ChannelKey) -> Result<Option<ChannelHead>, StorageError> {
        Err(StorageError::Closed)
    }

    fn read_messages(
        &mut self,
        _key: &ChannelKey,
        _from: Seq,
        _limit: usize,
        _direction: ReadDirection,
    ) -> Result<Vec<Arc<StoredMessage>>, StorageError> {
        Err(StorageError::Closed)
    }

    fn find_message_id(
        &mut self,
        _key: &ChannelKey,
        _id: MessageId,
    ) -> Result<Option<Seq>, StorageError> {
        Err(StorageError::Closed)
    }

    fn is_member(&mut self, _key: &ChannelKey, _uid: &Uid) -> Result<bool, StorageError> {
        Err(StorageError::Closed)
    }

    fn conversation(
        &mut self,
        _uid: &Uid,
        _key: &ChannelKey,
    ) -> Result<Option<ConversationRecord>, StorageError> {
        Err(StorageError::Closed)
    }

    fn conversations(
        &mut self,
        _uid: &Uid,
    ) -> Result<Vec<(ChannelKey, ConversationRecord)>, StorageError> {
        Err(StorageError::Closed)
    }

    fn list(
        &mut self,
        _key: &ChannelKey,
        _kind: ListKind,
        _limit: usize,
    ) -> Result<Vec<Uid>, StorageError> {
        Err(StorageError::Closed)
    }

    fn list_contains(
        &mut self,
        _key: &ChannelKey,
        _kind: ListKind,
        _uid: &Uid,
    ) -> Result<bool, StorageError> {
        Err(StorageError::Closed)
    }

    fn prepare_device_acks(
        &mut self,
        _rows: &[DeviceAck],
        _sessions: &[DeviceSession],
    ) -> Result<CommitJob, StorageError> {
        Err(StorageError::Closed)
    }

    fn device_position(
        &mut self,
        _uid: &Uid,
        _device_id: &str,
        _key: &ChannelKey,
    ) -> Result<DevicePosition, StorageError> {
        Err(StorageError::Closed)
    }

    fn device_session(
        &mut self,
        _uid: &Uid,
        _device_id: &str,
    ) -> Result<Option<SessionRecord>, StorageError> {
        Err(StorageError::Closed)
    }

    fn ids_issued(&mut self) -> Result<MessageId, StorageError> {
        Err(StorageError::Closed)
    }

    fn log_applied(&mut self, _partition: u32) -> Result<u64, StorageError> {
        Err(StorageError::Closed)
    }

    fn user_token(&mut self, _uid: &Uid, _device_flag: u8) -> Result<Option<String>, StorageError> {
        Err(StorageError::Closed)
    }
}
