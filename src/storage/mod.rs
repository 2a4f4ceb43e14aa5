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

use crate::channel::ChannelKey;
use crate::ids::{MessageId, Seq, ShardId, Uid};
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
    pub client_msg_no: String,
    /// Server time of the commit, Unix milliseconds.
    pub timestamp_ms: i64,
    /// The application flags of the `Send`.
    pub send_flags: u8,
    pub payload: Bytes,
}

/// One change in a commit batch.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Append a message at its seq, move the channel's last seq, and
    /// remember its idempotency key.
    Message(Arc<StoredMessage>),
    /// Create or replace a group and its member list. `last_seq` is the
    /// group's last seq once everything before this change is applied.
    PutGroup {
        key: ChannelKey,
        members: Vec<Uid>,
        last_seq: Seq,
    },
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
    /// Members of a group; `None` for a person channel.
    pub members: Option<Vec<Uid>>,
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

    /// Up to `limit` messages of `key` with seq >= `from`, in seq order.
    fn read_messages(
        &mut self,
        key: &ChannelKey,
        from: Seq,
        limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>, StorageError>;
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

    fn read_messages(
        &mut self,
        _key: &ChannelKey,
        _from: Seq,
        _limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>, StorageError> {
        Err(StorageError::Closed)
    }
}
