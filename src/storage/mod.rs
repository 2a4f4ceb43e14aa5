//! The storage seam. Shards see storage only through [`ShardStore`]: a
//! batch-oriented interface (one [`ShardStore::commit`] per shard tick, so a
//! durable engine can group-commit many messages under one sync). The trait
//! and the in-memory store know nothing of any particular engine.
//!
//! A shard only ever touches the channels it owns, so each shard gets its own
//! handle from [`Storage::open_shard`] and no handle is shared between
//! threads.

mod memory;

pub use memory::MemoryStorage;

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
    /// Append a message at its seq.
    Message(Arc<StoredMessage>),
    /// Create or replace a group and its member list.
    PutGroup { key: ChannelKey, members: Vec<Uid> },
}

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
}

/// One shard's view of storage.
pub trait ShardStore {
    /// Applies every mutation, all or nothing.
    fn commit(&mut self, batch: &[Mutation]) -> Result<(), StorageError>;

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
}
