//! The RocksDB store: the embedded default. One database for the whole
//! server (in `server.data_dir`), with the column families and key encodings
//! of [`super::keys`]. Every shard gets a handle to it; each writes only the
//! channels it owns, and a commit is one `WriteBatch` (group commit: many
//! messages, one WAL sync).
//!
//! Durability follows [`SyncPolicy`]: with `Always` (the default) a commit
//! returns only after the WAL holding it is synced to disk, so a `SendAck`
//! means the message survives a crash of the process or the machine.

use super::keys;
use super::{
    ChannelHead, ChannelRecord, CommitJob, ConversationRecord, DeviceAck, DevicePosition,
    DeviceSession, IdempotentHit, ListKind, Mutation, ReadDirection, SessionRecord, ShardStore,
    Storage, StorageError, StoredMessage, WebhookRecord,
};
use crate::ids::{MessageId, Seq, ShardId, Uid};
use crate::key::ChannelKey;
use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode,
    Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// When a commit counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Every commit syncs the WAL before it is acknowledged: nothing
    /// acknowledged is lost, even on power failure.
    Always,
    /// Commits are written to the WAL (so they survive a crash of the
    /// process) and the WAL is synced every `interval_ms`: a power failure
    /// can lose what was acknowledged in the last interval.
    Interval { interval_ms: u64 },
    /// The WAL is written but never synced by ruyi (the OS flushes it when it
    /// likes). Survives a crash of the process, not of the machine. For
    /// benchmarks.
    Never,
}

/// A stored message, as encoded in the `messages` column family.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageRecord {
    pub message_id: u64,
    pub from_uid: String,
    pub client_msg_no: String,
    pub timestamp_ms: i64,
    pub send_flags: u8,
    pub payload: Vec<u8>,
    pub recalled: bool,
    /// Added after the first release of the format: records written
    /// before it end at `recalled` and decode with an empty device
    /// (see [`decode_message_record`]).
    pub from_device: String,
}

/// A message record as written before `from_device` existed.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct MessageRecordV1 {
    message_id: u64,
    from_uid: String,
    client_msg_no: String,
    timestamp_ms: i64,
    send_flags: u8,
    payload: Vec<u8>,
    recalled: bool,
}

/// Decodes a record that gained a trailing field, in either format.
/// postcard is not self-describing: a record written before the field fails
/// to decode as the current format (it runs out of bytes), and then decodes
/// as the first one, which `upgrade` fills in.
fn decode_either<'a, Current: Deserialize<'a>, First: Deserialize<'a>>(
    what: &str,
    bytes: &'a [u8],
    upgrade: impl FnOnce(First) -> Current,
) -> Result<Current, StorageError> {
    if let Ok(record) = postcard::from_bytes::<Current>(bytes) {
        return Ok(record);
    }
    decode(what, bytes).map(upgrade)
}

/// Decodes a message record of either format (one without `from_device`
/// has an empty device).
pub fn decode_message_record(bytes: &[u8]) -> Result<MessageRecord, StorageError> {
    decode_either("message record", bytes, |v1: MessageRecordV1| {
        MessageRecord {
            message_id: v1.message_id,
            from_uid: v1.from_uid,
            client_msg_no: v1.client_msg_no,
            timestamp_ms: v1.timestamp_ms,
            send_flags: v1.send_flags,
            payload: v1.payload,
            recalled: v1.recalled,
            from_device: String::new(),
        }
    })
}

/// What the `channels` column family holds for a channel.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChannelMetaRecord {
    pub last_seq: u64,
    pub last_message_id: u64,
    /// A group that was created (person channels are never "created").
    pub is_group: bool,
    /// Added after the first release of the format: a deleted group's
    /// tombstone, which keeps its last seq so that a group created again
    /// under the same id continues after it (seqs are never reused: clients
    /// and saved positions key on them). Records written before it decode
    /// as not deleted (see [`decode_channel_meta`]).
    pub deleted: bool,
}

/// A channel record as written before `deleted` existed.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct ChannelMetaRecordV1 {
    last_seq: u64,
    last_message_id: u64,
    is_group: bool,
}

/// Decodes a channel record of either format (one without `deleted` is
/// not a tombstone).
pub fn decode_channel_meta(bytes: &[u8]) -> Result<ChannelMetaRecord, StorageError> {
    decode_either("channel record", bytes, |v1: ChannelMetaRecordV1| {
        ChannelMetaRecord {
            last_seq: v1.last_seq,
            last_message_id: v1.last_message_id,
            is_group: v1.is_group,
            deleted: false,
        }
    })
}

/// What the `idempotency` column family holds for `(uid, client_msg_no)`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub channel_kind: u8,
    pub channel_id: String,
    pub seq: u64,
    pub message_id: u64,
    pub committed_at_ms: i64,
}

/// The merge operator of `device_acks` and `meta`: values are big-endian
/// u64s, merged word by word by taking the largest (a shorter value, as
/// first written, has zeros for its missing words).
fn merge_u64s_max(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut out: Vec<u64> = Vec::new();
    for value in existing.into_iter().chain(operands.iter()) {
        for (i, word) in value.chunks_exact(8).enumerate() {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(word);
            let word = u64::from_be_bytes(bytes);
            match out.get_mut(i) {
                Some(slot) => *slot = (*slot).max(word),
                None => out.push(word),
            }
        }
    }
    Some(out.iter().flat_map(|w| w.to_be_bytes()).collect())
}

fn io_error(error: rocksdb::Error) -> StorageError {
    StorageError::Io(error.into_string())
}

#[cfg(test)]
fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("records serialize into a Vec without fail")
}

/// Encodes `value` into `scratch` (cleared first) and returns the bytes, so
/// a batch of records costs no allocation per record.
fn encode_into<'s, T: Serialize>(scratch: &'s mut Vec<u8>, value: &T) -> &'s [u8] {
    scratch.clear();
    *scratch = postcard::to_extend(value, std::mem::take(scratch))
        .expect("records serialize into a Vec without fail");
    scratch
}

/// For each mutation of `batch`, whether the row it puts (a conversation
/// row, or a message's move of its channel's head) is put again by a later
/// mutation of the same batch. The batch is written atomically, so only the
/// last put of a row is ever seen and the earlier ones can be left out: at
/// saturation a batch often holds several messages of one channel, each
/// moving that channel's head and both of its conversation rows.
fn overwritten_later(batch: &[Mutation]) -> Vec<bool> {
    if batch.len() < 2 {
        return Vec::new();
    }
    let mut heads: ahash::AHashSet<&ChannelKey> = ahash::AHashSet::new();
    let mut rows: ahash::AHashSet<(&Uid, &ChannelKey)> = ahash::AHashSet::new();
    let mut overwritten = vec![false; batch.len()];
    for (index, mutation) in batch.iter().enumerate().rev() {
        match mutation {
            Mutation::Message(message) => {
                overwritten[index] = !heads.insert(&message.channel);
            }
            Mutation::PutGroup { key, .. } | Mutation::DeleteGroup { key, .. } => {
                heads.insert(key);
            }
            Mutation::Conversation { uid, key, .. } => {
                overwritten[index] = !rows.insert((uid, key));
            }
            _ => {}
        }
    }
    overwritten
}

fn decode<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

/// Settings of the RocksDB store.
#[derive(Debug, Clone)]
pub struct RocksOptions {
    pub sync: SyncPolicy,
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
    pub idempotency_ttl_ms: u64,
}

/// The RocksDB store, shared by every shard.
pub struct RocksStorage {
    db: Arc<DB>,
    sync: SyncPolicy,
    lists: Arc<ListsWritten>,
}

/// Whether any allow or deny list may have entries. Every one-to-one send
/// asks whether its sender is on the recipient's deny list; while no list
/// has ever been written (most deployments), the answer needs no lookup.
/// Set before the batch that writes a first entry is written, so a reader
/// that finds it unset could not have found an entry either.
#[derive(Debug, Default)]
struct ListsWritten(std::sync::atomic::AtomicBool);

impl ListsWritten {
    fn any(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn mark(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl std::fmt::Debug for RocksStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStorage")
            .field("path", &self.db.path())
            .field("sync", &self.sync)
            .finish()
    }
}

impl RocksStorage {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, options: &RocksOptions) -> Result<RocksStorage, StorageError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::Io(format!("creating {}: {e}", dir.display())))?;
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        db_options.increase_parallelism(cores as i32);
        // RocksDB starts this many threads per column family at every open,
        // even when there are no files to open (16 by default: 208 threads
        // for one start-up here). One per core opens the files as fast.
        db_options.set_max_file_opening_threads(cores.min(16) as i32);
        db_options.set_max_background_jobs(2);
        // Keep the WAL bounded so start-up replays little.
        db_options.set_max_total_wal_size(256 * 1024 * 1024);
        let ttl_ms = options.idempotency_ttl_ms;
        let descriptors = keys::ALL_CFS.iter().map(|name| {
            let mut cf = Options::default();
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            if *name != keys::CF_MESSAGES {
                // Point lookups that mostly miss (idempotency keys, channels
                // never written): a bloom filter answers them from memory.
                table.set_bloom_filter(10.0, false);
            }
            cf.set_block_based_table_factory(&table);
            cf.set_write_buffer_size(options.write_buffer_bytes);
            if *name == keys::CF_IDEMPOTENCY || *name == keys::CF_LISTS {
                // Every send looks up a key here that is almost never there
                // (its idempotency key; the sender on the recipient's deny
                // list): a bloom filter over the memtable answers most of
                // those lookups without searching its skiplist.
                cf.set_memtable_prefix_bloom_ratio(0.05);
                cf.set_memtable_whole_key_filtering(true);
            }
            if *name == keys::CF_MESSAGES {
                cf.set_compression_type(DBCompressionType::Lz4);
            }
            if *name == keys::CF_DEVICE_ACKS || *name == keys::CF_META {
                // Positions and the ids issued only grow: writes merge by
                // taking the larger, so a write that lands late (a periodic
                // flush off the shard's thread racing the flush at close)
                // never moves one back.
                cf.set_merge_operator_associative("u64s_max", merge_u64s_max);
            }
            if *name == keys::CF_IDEMPOTENCY {
                // Expired keys are dropped when compaction meets them.
                cf.set_compaction_filter(
                    "idempotency_ttl",
                    move |_level, _key: &[u8], value: &[u8]| match postcard::from_bytes::<
                        IdempotencyRecord,
                    >(value)
                    {
                        Ok(record)
                            if (record.committed_at_ms.max(0) as u64).saturating_add(ttl_ms)
                                < crate::time::unix_now_ms() =>
                        {
                            rocksdb::CompactionDecision::Remove
                        }
                        _ => rocksdb::CompactionDecision::Keep,
                    },
                );
            }
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&db_options, dir, descriptors).map_err(io_error)?;
        let meta = db
            .cf_handle(keys::CF_META)
            .expect("meta column family exists");
        match db
            .get_cf(meta, keys::META_FORMAT_VERSION)
            .map_err(io_error)?
        {
            None => db
                .put_cf(
                    meta,
                    keys::META_FORMAT_VERSION,
                    keys::FORMAT_VERSION.to_le_bytes(),
                )
                .map_err(io_error)?,
            Some(bytes) if bytes.as_slice() == keys::FORMAT_VERSION.to_le_bytes() => {}
            Some(bytes) => {
                return Err(StorageError::Corrupt(format!(
                    "{} holds data in format {bytes:?}; this build reads format {}",
                    dir.display(),
                    keys::FORMAT_VERSION
                )))
            }
        }
        let lists = ListsWritten::default();
        let cf = db
            .cf_handle(keys::CF_LISTS)
            .expect("every column family is opened");
        if db.iterator_cf(cf, IteratorMode::Start).next().is_some() {
            lists.mark();
        }
        Ok(RocksStorage {
            db: Arc::new(db),
            sync: options.sync,
            lists: Arc::new(lists),
        })
    }
}

impl Storage for RocksStorage {
    fn open_shard(&self, _shard: ShardId) -> Result<Box<dyn ShardStore>, StorageError> {
        Ok(Box::new(RocksShardStore {
            db: Arc::clone(&self.db),
            sync: self.sync,
            lists: Arc::clone(&self.lists),
        }))
    }

    fn sync_wal(&self) -> Result<(), StorageError> {
        self.db.flush_wal(true).map_err(io_error)
    }

    fn commits_block(&self) -> bool {
        self.sync == SyncPolicy::Always
    }

    fn sync_interval_ms(&self) -> Option<u64> {
        match self.sync {
            SyncPolicy::Interval { interval_ms } => Some(interval_ms),
            _ => None,
        }
    }

    fn webhook_events(
        &self,
        shard: ShardId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, WebhookRecord)>, StorageError> {
        let mut out = Vec::new();
        let Some(first) = after.checked_add(1) else {
            return Ok(out);
        };
        let cf = self.cf(keys::CF_WEBHOOKS);
        let start = keys::webhook(shard, first);
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward))
        {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(io_error)?;
            match keys::decode_webhook(&key) {
                Some((owner, id)) if owner == shard => {
                    out.push((id, decode("webhook record", &value)?))
                }
                _ => break,
            }
        }
        Ok(out)
    }

    fn webhook_shards(&self) -> Result<Vec<ShardId>, StorageError> {
        let cf = self.cf(keys::CF_WEBHOOKS);
        let mut shards = Vec::new();
        let mut next = Some(0u16);
        // One seek per shard present: to the first key at or after `next`.
        while let Some(from) = next {
            let start = keys::webhook(ShardId(from), 0);
            let Some(item) = self
                .db
                .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward))
                .next()
            else {
                break;
            };
            let (key, _) = item.map_err(io_error)?;
            let Some((shard, _)) = keys::decode_webhook(&key) else {
                return Err(StorageError::Corrupt("webhook key".into()));
            };
            shards.push(shard);
            next = shard.0.checked_add(1);
        }
        Ok(shards)
    }

    fn delete_webhook_event(&self, shard: ShardId, id: u64) -> Result<(), StorageError> {
        self.db
            .delete_cf(self.cf(keys::CF_WEBHOOKS), keys::webhook(shard, id))
            .map_err(io_error)
    }

    fn webhook_outbox_size(&self) -> Result<(u64, u64), StorageError> {
        let (mut events, mut bytes) = (0, 0);
        for item in self
            .db
            .iterator_cf(self.cf(keys::CF_WEBHOOKS), IteratorMode::Start)
        {
            let (_, value) = item.map_err(io_error)?;
            let record: WebhookRecord = decode("webhook record", &value)?;
            events += 1;
            bytes += record.size();
        }
        Ok((events, bytes))
    }

    fn put_user_token(&self, uid: &Uid, device_flag: u8, token: &str) -> Result<(), StorageError> {
        let mut options = WriteOptions::default();
        options.set_sync(self.sync != SyncPolicy::Never);
        self.db
            .put_cf_opt(
                self.cf(keys::CF_TOKENS),
                keys::token(uid.as_str(), device_flag),
                token.as_bytes(),
                &options,
            )
            .map_err(io_error)
    }
}

impl RocksStorage {
    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is created at open")
    }
}

struct RocksShardStore {
    db: Arc<DB>,
    sync: SyncPolicy,
    lists: Arc<ListsWritten>,
}

impl RocksShardStore {
    /// A `meta` value merged by max (0: never written).
    fn meta_u64(&self, key: &[u8], what: &str) -> Result<u64, StorageError> {
        let Some(bytes) = self
            .db
            .get_pinned_cf(self.cf(keys::CF_META), key)
            .map_err(io_error)?
        else {
            return Ok(0);
        };
        let word: [u8; 8] = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| StorageError::Corrupt(what.into()))?;
        Ok(u64::from_be_bytes(word))
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is created at open")
    }

    /// `key`'s record in `channels` (a tombstone included), if any.
    fn channel_meta(&self, key: &ChannelKey) -> Result<Option<ChannelMetaRecord>, StorageError> {
        self.db
            .get_pinned_cf(self.cf(keys::CF_CHANNELS), keys::channel(key))
            .map_err(io_error)?
            .map(|bytes| decode_channel_meta(&bytes))
            .transpose()
    }
}

impl ShardStore for RocksShardStore {
    fn prepare_commit(&mut self, batch: &[Mutation]) -> Result<CommitJob, StorageError> {
        let mut write = WriteBatch::default();
        let overwritten = overwritten_later(batch);
        // Records are encoded into one buffer; the batch copies each value.
        let mut scratch = Vec::with_capacity(256);
        let messages = self.cf(keys::CF_MESSAGES);
        let channels = self.cf(keys::CF_CHANNELS);
        let members = self.cf(keys::CF_MEMBERS);
        let idempotency = self.cf(keys::CF_IDEMPOTENCY);
        let message_ids = self.cf(keys::CF_MESSAGE_IDS);
        let conversations = self.cf(keys::CF_CONVERSATIONS);
        let lists = self.cf(keys::CF_LISTS);
        let webhooks = self.cf(keys::CF_WEBHOOKS);
        for (index, mutation) in batch.iter().enumerate() {
            let overwritten = overwritten.get(index).copied().unwrap_or(false);
            match mutation {
                Mutation::DeleteConversation { uid, key } => {
                    write.delete_cf(conversations, keys::conversation(uid.as_str(), key));
                }
                Mutation::Webhook { shard, id, record } => {
                    write.put_cf(
                        webhooks,
                        keys::webhook(*shard, *id),
                        encode_into(&mut scratch, &**record),
                    );
                }
                Mutation::IdsIssued(id) => {
                    write.merge_cf(
                        self.cf(keys::CF_META),
                        keys::META_IDS_ISSUED,
                        id.0.to_be_bytes(),
                    );
                }
                Mutation::LogApplied { partition, seq } => {
                    write.merge_cf(
                        self.cf(keys::CF_META),
                        keys::log_applied(*partition),
                        seq.to_be_bytes(),
                    );
                }
                Mutation::DeleteGroup {
                    key,
                    members: uids,
                    last_seq,
                    last_message_id,
                } => {
                    let prefix = keys::channel(key);
                    let mut end = prefix.clone();
                    increment(&mut end);
                    for cf in [messages, members, message_ids, lists] {
                        write.delete_range_cf(cf, &prefix, &end);
                    }
                    let tombstone = ChannelMetaRecord {
                        last_seq: last_seq.0,
                        last_message_id: last_message_id.0,
                        is_group: true,
                        deleted: true,
                    };
                    write.put_cf(channels, &prefix, encode_into(&mut scratch, &tombstone));
                    for uid in uids {
                        write.delete_cf(conversations, keys::conversation(uid.as_str(), key));
                    }
                }
                Mutation::PutList { key, kind, uids } => {
                    let prefix = keys::list(key, kind.tag());
                    let mut end = prefix.clone();
                    increment(&mut end);
                    write.delete_range_cf(lists, &prefix, &end);
                    if !uids.is_empty() {
                        self.lists.mark();
                    }
                    for uid in uids {
                        write.put_cf(lists, keys::list_entry(key, kind.tag(), uid.as_str()), []);
                    }
                }
                Mutation::Recall(message) => {
                    write.put_cf(
                        messages,
                        keys::message(&message.channel, message.seq),
                        encode_into(&mut scratch, &message_record(message)),
                    );
                }
                Mutation::Conversation { .. } if overwritten => {}
                Mutation::Conversation { uid, key, record } => {
                    write.put_cf(
                        conversations,
                        keys::conversation(uid.as_str(), key),
                        encode_into(&mut scratch, record),
                    );
                }
                Mutation::Message(message) => {
                    write.put_cf(
                        messages,
                        keys::message(&message.channel, message.seq),
                        encode_into(&mut scratch, &message_record(message)),
                    );
                    write.put_cf(
                        message_ids,
                        keys::message_id(&message.channel, message.message_id),
                        message.seq.0.to_be_bytes(),
                    );
                    if !overwritten {
                        let meta = ChannelMetaRecord {
                            last_seq: message.seq.0,
                            last_message_id: message.message_id.0,
                            is_group: message.channel.kind() == crate::protocol::ChannelType::Group,
                            deleted: false,
                        };
                        write.put_cf(
                            channels,
                            keys::channel(&message.channel),
                            encode_into(&mut scratch, &meta),
                        );
                    }
                    let key = IdempotencyRecord {
                        channel_kind: message.channel.kind().0,
                        channel_id: message.channel.id().to_owned(),
                        seq: message.seq.0,
                        message_id: message.message_id.0,
                        committed_at_ms: message.timestamp_ms,
                    };
                    write.put_cf(
                        idempotency,
                        keys::idempotency(message.from_uid.as_str(), &message.client_msg_no),
                        encode_into(&mut scratch, &key),
                    );
                }
                Mutation::PutGroup {
                    key,
                    members: uids,
                    last_seq,
                    last_message_id,
                } => {
                    let meta = ChannelMetaRecord {
                        last_seq: last_seq.0,
                        last_message_id: last_message_id.0,
                        is_group: true,
                        deleted: false,
                    };
                    write.put_cf(
                        channels,
                        keys::channel(key),
                        encode_into(&mut scratch, &meta),
                    );
                    let prefix = keys::channel(key);
                    let mut end = prefix.clone();
                    // Every member key of this group sorts below `prefix`
                    // with its last byte incremented (ids are length-prefixed,
                    // so no other channel's keys fall in between).
                    increment(&mut end);
                    write.delete_range_cf(members, &prefix, &end);
                    for uid in uids {
                        write.put_cf(members, keys::member(key, uid.as_str()), []);
                    }
                }
            }
        }
        let db = Arc::clone(&self.db);
        let mut options = WriteOptions::default();
        options.set_sync(self.sync == SyncPolicy::Always);
        Ok(Box::new(move || {
            db.write_opt(write, &options).map_err(io_error)
        }))
    }

    fn find_idempotent(
        &mut self,
        from: &Uid,
        client_msg_no: &str,
        now_unix_ms: u64,
        ttl_ms: u64,
    ) -> Result<Option<IdempotentHit>, StorageError> {
        let key = keys::idempotency(from.as_str(), client_msg_no);
        let Some(bytes) = self
            .db
            .get_pinned_cf(self.cf(keys::CF_IDEMPOTENCY), key)
            .map_err(io_error)?
        else {
            return Ok(None);
        };
        let record: IdempotencyRecord = decode("idempotency record", &bytes)?;
        if (record.committed_at_ms.max(0) as u64).saturating_add(ttl_ms) <= now_unix_ms {
            return Ok(None);
        }
        Ok(Some(IdempotentHit {
            channel: ChannelKey::from_parts(
                crate::protocol::ChannelType(record.channel_kind),
                &record.channel_id,
            ),
            seq: Seq(record.seq),
            message_id: MessageId(record.message_id),
            committed_at_ms: record.committed_at_ms,
        }))
    }

    fn load_channel(&mut self, key: &ChannelKey) -> Result<Option<ChannelRecord>, StorageError> {
        let Some(meta) = self.channel_meta(key)? else {
            return Ok(None);
        };
        let members = if meta.is_group && !meta.deleted {
            let prefix = keys::channel(key);
            let mut uids = Vec::new();
            let iter = self.db.iterator_cf(
                self.cf(keys::CF_MEMBERS),
                IteratorMode::From(&prefix, Direction::Forward),
            );
            for item in iter {
                let (member_key, _) = item.map_err(io_error)?;
                if !member_key.starts_with(&prefix) {
                    break;
                }
                let uid = keys::decode_member(&member_key)
                    .ok_or_else(|| StorageError::Corrupt("member key".into()))?;
                uids.push(Uid::new(&uid));
            }
            Some(uids)
        } else {
            None
        };
        Ok(Some(ChannelRecord {
            last_seq: Seq(meta.last_seq),
            last_message_id: MessageId(meta.last_message_id),
            members,
            deleted: meta.deleted,
        }))
    }

    fn channel_head(&mut self, key: &ChannelKey) -> Result<Option<ChannelHead>, StorageError> {
        Ok(self.channel_meta(key)?.map(|meta| ChannelHead {
            last_seq: Seq(meta.last_seq),
            last_message_id: MessageId(meta.last_message_id),
            deleted: meta.deleted,
        }))
    }

    fn find_message_id(
        &mut self,
        key: &ChannelKey,
        id: MessageId,
    ) -> Result<Option<Seq>, StorageError> {
        let Some(bytes) = self
            .db
            .get_pinned_cf(self.cf(keys::CF_MESSAGE_IDS), keys::message_id(key, id))
            .map_err(io_error)?
        else {
            return Ok(None);
        };
        let seq: [u8; 8] = bytes
            .as_ref()
            .try_into()
            .map_err(|_| StorageError::Corrupt("message id index entry".into()))?;
        Ok(Some(Seq(u64::from_be_bytes(seq))))
    }

    fn is_member(&mut self, key: &ChannelKey, uid: &Uid) -> Result<bool, StorageError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(keys::CF_MEMBERS), keys::member(key, uid.as_str()))
            .map_err(io_error)?
            .is_some())
    }

    fn conversation(
        &mut self,
        uid: &Uid,
        key: &ChannelKey,
    ) -> Result<Option<ConversationRecord>, StorageError> {
        match self
            .db
            .get_pinned_cf(
                self.cf(keys::CF_CONVERSATIONS),
                keys::conversation(uid.as_str(), key),
            )
            .map_err(io_error)?
        {
            Some(bytes) => Ok(Some(decode("conversation record", &bytes)?)),
            None => Ok(None),
        }
    }

    fn conversations(
        &mut self,
        uid: &Uid,
    ) -> Result<Vec<(ChannelKey, ConversationRecord)>, StorageError> {
        let prefix = keys::conversations_of(uid.as_str());
        let iter = self.db.iterator_cf(
            self.cf(keys::CF_CONVERSATIONS),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (key, value) = item.map_err(io_error)?;
            if !key.starts_with(&prefix) {
                break;
            }
            let (_, channel) = keys::decode_conversation(&key)
                .ok_or_else(|| StorageError::Corrupt("conversation key".into()))?;
            out.push((channel, decode("conversation record", &value)?));
        }
        Ok(out)
    }

    fn list(
        &mut self,
        key: &ChannelKey,
        kind: ListKind,
        limit: usize,
    ) -> Result<Vec<Uid>, StorageError> {
        if !self.lists.any() {
            return Ok(Vec::new());
        }
        let prefix = keys::list(key, kind.tag());
        let iter = self.db.iterator_cf(
            self.cf(keys::CF_LISTS),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (entry, _) = item.map_err(io_error)?;
            if !entry.starts_with(&prefix) {
                break;
            }
            let uid = keys::decode_list_entry(&entry)
                .ok_or_else(|| StorageError::Corrupt("list key".into()))?;
            out.push(Uid::new(&uid));
        }
        Ok(out)
    }

    fn prepare_device_acks(
        &mut self,
        rows: &[DeviceAck],
        sessions: &[DeviceSession],
    ) -> Result<CommitJob, StorageError> {
        // Merged with `merge_u64s_max`: a position write that lands after a
        // newer one cannot move it back.
        let cf = self.cf(keys::CF_DEVICE_ACKS);
        let mut write = WriteBatch::default();
        for row in rows {
            let position = DevicePosition {
                acked: row.seq,
                pushed: row.pushed,
            };
            write.merge_cf(
                cf,
                keys::device_ack(row.uid.as_str(), &row.device_id, &row.channel),
                position.encode(),
            );
        }
        let cf = self.cf(keys::CF_DEVICE_SESSIONS);
        for session in sessions {
            write.put_cf(
                cf,
                keys::device_session(session.uid.as_str(), &session.device_id),
                session.record.encode(),
            );
        }
        // Unsynced, but it still queues behind a synced group commit in
        // RocksDB's write path: the job runs off the shard's thread.
        let db = Arc::clone(&self.db);
        Ok(Box::new(move || {
            let mut options = WriteOptions::default();
            options.set_sync(false);
            db.write_opt(write, &options).map_err(io_error)
        }))
    }

    fn device_position(
        &mut self,
        uid: &Uid,
        device_id: &str,
        key: &ChannelKey,
    ) -> Result<DevicePosition, StorageError> {
        match self
            .db
            .get_pinned_cf(
                self.cf(keys::CF_DEVICE_ACKS),
                keys::device_ack(uid.as_str(), device_id, key),
            )
            .map_err(io_error)?
        {
            Some(bytes) => DevicePosition::decode(&bytes),
            None => Ok(DevicePosition::default()),
        }
    }

    fn device_session(
        &mut self,
        uid: &Uid,
        device_id: &str,
    ) -> Result<Option<SessionRecord>, StorageError> {
        match self
            .db
            .get_pinned_cf(
                self.cf(keys::CF_DEVICE_SESSIONS),
                keys::device_session(uid.as_str(), device_id),
            )
            .map_err(io_error)?
        {
            Some(bytes) => Ok(Some(SessionRecord::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn ids_issued(&mut self) -> Result<MessageId, StorageError> {
        self.meta_u64(keys::META_IDS_ISSUED, "ids issued")
            .map(MessageId)
    }

    fn log_applied(&mut self, partition: u32) -> Result<u64, StorageError> {
        self.meta_u64(&keys::log_applied(partition), "log applied")
    }

    fn user_token(&mut self, uid: &Uid, device_flag: u8) -> Result<Option<String>, StorageError> {
        match self
            .db
            .get_pinned_cf(
                self.cf(keys::CF_TOKENS),
                keys::token(uid.as_str(), device_flag),
            )
            .map_err(io_error)?
        {
            Some(bytes) => Ok(Some(
                std::str::from_utf8(&bytes)
                    .map_err(|_| StorageError::Corrupt("token is not UTF-8".into()))?
                    .to_owned(),
            )),
            None => Ok(None),
        }
    }

    fn list_contains(
        &mut self,
        key: &ChannelKey,
        kind: ListKind,
        uid: &Uid,
    ) -> Result<bool, StorageError> {
        if !self.lists.any() {
            return Ok(false);
        }
        Ok(self
            .db
            .get_pinned_cf(
                self.cf(keys::CF_LISTS),
                keys::list_entry(key, kind.tag(), uid.as_str()),
            )
            .map_err(io_error)?
            .is_some())
    }

    fn read_messages(
        &mut self,
        key: &ChannelKey,
        from: Seq,
        limit: usize,
        direction: ReadDirection,
    ) -> Result<Vec<Arc<StoredMessage>>, StorageError> {
        let prefix = keys::channel(key);
        let start = keys::message(key, from);
        let direction = match direction {
            ReadDirection::Up => Direction::Forward,
            ReadDirection::Down => Direction::Reverse,
        };
        let iter = self.db.iterator_cf(
            self.cf(keys::CF_MESSAGES),
            IteratorMode::From(&start, direction),
        );
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (message_key, value) = item.map_err(io_error)?;
            if !message_key.starts_with(&prefix) {
                break;
            }
            let seq = keys::decode_message_seq(&message_key)
                .ok_or_else(|| StorageError::Corrupt("message key".into()))?;
            let record = decode_message_record(&value)?;
            out.push(Arc::new(StoredMessage {
                message_id: MessageId(record.message_id),
                seq,
                channel: key.clone(),
                from_uid: Uid::new(&record.from_uid),
                from_device: Arc::from(record.from_device),
                client_msg_no: record.client_msg_no,
                timestamp_ms: record.timestamp_ms,
                send_flags: record.send_flags,
                payload: Bytes::from(record.payload),
                recalled: record.recalled,
            }));
        }
        Ok(out)
    }
}

fn message_record(message: &StoredMessage) -> MessageRecord {
    MessageRecord {
        message_id: message.message_id.0,
        from_uid: message.from_uid.as_str().to_owned(),
        client_msg_no: message.client_msg_no.clone(),
        timestamp_ms: message.timestamp_ms,
        send_flags: message.send_flags,
        payload: message.payload.to_vec(),
        recalled: message.recalled,
        from_device: message.from_device.to_string(),
    }
}

/// The smallest key greater than every key that starts with `prefix`.
fn increment(prefix: &mut Vec<u8>) {
    while let Some(last) = prefix.last_mut() {
        if *last < u8::MAX {
            *last += 1;
            return;
        }
        prefix.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::test_message;

    #[test]
    fn message_records_of_both_formats_decode() {
        let v1 = MessageRecordV1 {
            message_id: 7,
            from_uid: "alice".into(),
            client_msg_no: "c1".into(),
            timestamp_ms: 1_795_398_253_077,
            send_flags: 1,
            payload: b"hi".to_vec(),
            recalled: false,
        };
        let old = decode_message_record(&encode(&v1)).expect("a first-format record");
        assert_eq!(
            (
                old.message_id,
                old.from_uid.as_str(),
                old.payload.as_slice()
            ),
            (7, "alice", &b"hi"[..])
        );
        assert_eq!(old.from_device, "", "written before devices were stored");

        let new = MessageRecord {
            from_device: "phone".into(),
            ..old
        };
        let back = decode_message_record(&encode(&new)).expect("a current record");
        assert_eq!(back.from_device, "phone");
        assert_eq!(back.client_msg_no, "c1");
        assert!(
            decode_message_record(b"\x07").is_err(),
            "garbage is refused"
        );
    }

    #[test]
    fn channel_records_of_both_formats_decode() {
        let v1 = ChannelMetaRecordV1 {
            last_seq: 9,
            last_message_id: 77,
            is_group: true,
        };
        let old = decode_channel_meta(&encode(&v1)).expect("a first-format record");
        assert_eq!(
            (old.last_seq, old.last_message_id, old.is_group),
            (9, 77, true)
        );
        assert!(!old.deleted, "written before tombstones existed");
        let tombstone = ChannelMetaRecord {
            deleted: true,
            ..old
        };
        let back = decode_channel_meta(&encode(&tombstone)).expect("a current record");
        assert!(back.deleted);
        assert_eq!(back.last_seq, 9);
    }

    /// Finding 8: the periodic position flush runs off the shard's thread
    /// and can land after the flush at close. Whatever order position writes
    /// land in, the stored position is the largest (and a value written
    /// before positions had a pushed half still reads).
    fn test_options() -> RocksOptions {
        RocksOptions {
            sync: SyncPolicy::Never,
            block_cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
            idempotency_ttl_ms: 60_000,
        }
    }

    fn open_temp() -> (tempfile::TempDir, RocksStorage) {
        let dir = tempfile::tempdir().unwrap();
        let storage = RocksStorage::open(dir.path(), &test_options()).unwrap();
        (dir, storage)
    }

    fn row(read_floor: u64, version: u64) -> ConversationRecord {
        ConversationRecord {
            read_floor,
            deleted_seq: 0,
            own_above_floor: 0,
            version,
        }
    }

    #[test]
    fn only_the_last_put_of_a_row_in_a_batch_is_written_and_the_result_is_the_same() {
        let alice = Uid::new("alice");
        let bob = Uid::new("bob");
        let chat = ChannelKey::person(&alice, &bob);
        let group = ChannelKey::group("g");
        let conversation = |uid: &Uid, key: &ChannelKey, record| Mutation::Conversation {
            uid: uid.clone(),
            key: key.clone(),
            record,
        };
        let batch = vec![
            Mutation::Message(test_message(&chat, 1, "alice")),
            conversation(&alice, &chat, row(1, 1)),
            conversation(&bob, &chat, row(0, 1)),
            Mutation::Message(test_message(&group, 1, "alice")),
            Mutation::Message(test_message(&chat, 2, "bob")),
            conversation(&alice, &chat, row(1, 2)),
            Mutation::DeleteConversation {
                uid: bob.clone(),
                key: chat.clone(),
            },
            conversation(&bob, &chat, row(2, 2)),
            Mutation::PutGroup {
                key: group.clone(),
                members: vec![alice.clone()],
                last_seq: Seq(1),
                last_message_id: MessageId(101),
            },
            Mutation::Message(test_message(&chat, 3, "alice")),
        ];
        assert_eq!(
            overwritten_later(&batch),
            [true, true, true, true, true, false, false, false, false, false]
        );
        assert!(overwritten_later(&batch[..1]).is_empty());

        let (_dir, storage) = open_temp();
        let mut store = storage.open_shard(ShardId(0)).unwrap();
        store.commit(&batch).unwrap();
        let head = store.channel_head(&chat).unwrap().unwrap();
        assert_eq!(
            (head.last_seq, head.last_message_id),
            (Seq(3), MessageId(103))
        );
        let group_head = store.channel_head(&group).unwrap().unwrap();
        assert_eq!((group_head.last_seq, group_head.deleted), (Seq(1), false));
        assert_eq!(store.conversation(&alice, &chat).unwrap(), Some(row(1, 2)));
        assert_eq!(store.conversation(&bob, &chat).unwrap(), Some(row(2, 2)));
        // Every message and its idempotency key is written, overwritten heads
        // or not.
        let read = store
            .read_messages(&chat, Seq(1), 10, ReadDirection::Up)
            .unwrap();
        assert_eq!(read.iter().map(|m| m.seq.0).collect::<Vec<_>>(), [1, 2, 3]);
        for (from, seq) in [("alice", 1), ("bob", 2), ("alice", 3)] {
            let hit = store
                .find_idempotent(&Uid::new(from), &format!("c{seq}"), 2, 60_000)
                .unwrap();
            assert!(hit.is_some(), "idempotency key of seq {seq}");
        }
    }

    #[test]
    fn list_lookups_find_entries_written_by_a_batch_and_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let options = test_options();
        let lists = ChannelKey::group("lists-of-bob");
        let alice = Uid::new("alice");
        {
            let storage = RocksStorage::open(dir.path(), &options).unwrap();
            let mut store = storage.open_shard(ShardId(0)).unwrap();
            let mut other = storage.open_shard(ShardId(1)).unwrap();
            assert!(!store.list_contains(&lists, ListKind::Deny, &alice).unwrap());
            let job = store
                .prepare_commit(&[Mutation::PutList {
                    key: lists.clone(),
                    kind: ListKind::Deny,
                    uids: vec![alice.clone()],
                }])
                .unwrap();
            job().unwrap();
            assert!(other.list_contains(&lists, ListKind::Deny, &alice).unwrap());
            assert_eq!(
                other.list(&lists, ListKind::Deny, 10).unwrap(),
                std::slice::from_ref(&alice)
            );
            assert!(!other
                .list_contains(&lists, ListKind::Allow, &alice)
                .unwrap());
        }
        let storage = RocksStorage::open(dir.path(), &options).unwrap();
        let mut store = storage.open_shard(ShardId(0)).unwrap();
        assert!(store.list_contains(&lists, ListKind::Deny, &alice).unwrap());
    }

    #[test]
    fn a_position_write_that_lands_late_never_moves_a_position_back() {
        let dir = tempfile::tempdir().unwrap();
        let options = test_options();
        let storage = RocksStorage::open(dir.path(), &options).unwrap();
        let mut store = storage.open_shard(ShardId(0)).unwrap();
        let key = ChannelKey::group("g");
        let uid = Uid::new("alice");
        let row = |seq: u64, pushed: u64| DeviceAck {
            uid: uid.clone(),
            device_id: Arc::from("phone"),
            channel: key.clone(),
            seq: Seq(seq),
            pushed: Seq(pushed),
        };
        let late = store.prepare_device_acks(&[row(5, 6)], &[]).unwrap();
        store.save_device_acks(&[row(9, 12)], &[]).unwrap();
        late().unwrap();
        let position = store.device_position(&uid, "phone", &key).unwrap();
        assert_eq!((position.acked, position.pushed), (Seq(9), Seq(12)));

        // A first-format value: only the acknowledged seq, 8 bytes.
        let cf = storage.cf(keys::CF_DEVICE_ACKS);
        let old_key = keys::device_ack("bob", "phone", &key);
        storage.db.put_cf(cf, &old_key, 4u64.to_be_bytes()).unwrap();
        let old = store
            .device_position(&Uid::new("bob"), "phone", &key)
            .unwrap();
        assert_eq!((old.acked, old.pushed), (Seq(4), Seq(4)));
        let newer = DeviceAck {
            uid: Uid::new("bob"),
            ..row(3, 7)
        };
        store.save_device_acks(&[newer], &[]).unwrap();
        let merged = store
            .device_position(&Uid::new("bob"), "phone", &key)
            .unwrap();
        assert_eq!((merged.acked, merged.pushed), (Seq(4), Seq(7)));
    }
}
