//! The in-memory store: the reference implementation of [`ShardStore`], used
//! by unit tests and by servers that keep nothing across restarts. All
//! shards share one map behind a mutex, like the shared RocksDB database; it
//! is for tests and experiments, not for production load.

use super::{
    ChannelHead, ChannelRecord, CommitJob, ConversationRecord, DeviceAck, DevicePosition,
    DeviceSession, IdempotentHit, ListKind, Mutation, ReadDirection, SessionRecord, ShardStore,
    Storage, StorageError, StoredMessage, WebhookRecord,
};
use crate::ids::{MessageId, Seq, ShardId, Uid};
use crate::key::ChannelKey;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// What the store knows of a channel besides its messages (the `channels`
/// record of the RocksDB store).
#[derive(Debug, Clone, Copy, Default)]
struct ChannelMeta {
    last_seq: Seq,
    last_message_id: MessageId,
    is_group: bool,
    deleted: bool,
}

/// The data, kept so that every read returns what the RocksDB store would,
/// in the same order: rows a RocksDB scan returns in key order are kept
/// under the same key encodings here.
#[derive(Debug, Default)]
struct MemoryData {
    meta: FastMap<ChannelKey, ChannelMeta>,
    messages: FastMap<ChannelKey, BTreeMap<u64, Arc<StoredMessage>>>,
    members: FastMap<ChannelKey, Vec<Uid>>,
    idempotency: FastMap<(Uid, String), IdempotentHit>,
    /// Per user, rows by the encoded channel key (the RocksDB scan order).
    conversations: FastMap<Uid, BTreeMap<Vec<u8>, (ChannelKey, ConversationRecord)>>,
    /// Per list, uids by their encoded key (the RocksDB scan order).
    lists: FastMap<(ChannelKey, ListKind), BTreeMap<Vec<u8>, Uid>>,
    device_acks: FastMap<(Uid, String, ChannelKey), DevicePosition>,
    device_sessions: FastMap<(Uid, String), SessionRecord>,
    ids_issued: MessageId,
    /// How far each cluster partition's log was applied.
    log_applied: FastMap<u32, u64>,
    webhooks: BTreeMap<(u16, u64), WebhookRecord>,
    tokens: FastMap<(Uid, u8), String>,
}

/// A uid's place in a RocksDB scan: length first, then bytes.
fn uid_order(uid: &Uid) -> Vec<u8> {
    let mut key = (uid.as_str().len() as u64).to_be_bytes().to_vec();
    key.extend_from_slice(uid.as_str().as_bytes());
    key
}

/// Keeps everything in memory, shared by every shard.
#[derive(Debug, Default, Clone)]
pub struct MemoryStorage {
    data: Arc<Mutex<MemoryData>>,
}

impl MemoryStorage {
    fn data(&self) -> MutexGuard<'_, MemoryData> {
        self.data
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Storage for MemoryStorage {
    fn open_shard(&self, _shard: ShardId) -> Result<Box<dyn ShardStore>, StorageError> {
        Ok(Box::new(MemoryShardStore {
            data: Arc::clone(&self.data),
        }))
    }

    fn webhook_events(
        &self,
        shard: ShardId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, WebhookRecord)>, StorageError> {
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        Ok(self
            .data()
            .webhooks
            .range((shard.0, first)..=(shard.0, u64::MAX))
            .take(limit)
            .map(|((_, id), record)| (*id, record.clone()))
            .collect())
    }

    fn webhook_shards(&self) -> Result<Vec<ShardId>, StorageError> {
        let mut shards: Vec<ShardId> = self
            .data()
            .webhooks
            .keys()
            .map(|(shard, _)| ShardId(*shard))
            .collect();
        shards.dedup();
        Ok(shards)
    }

    fn delete_webhook_event(&self, shard: ShardId, id: u64) -> Result<(), StorageError> {
        self.data().webhooks.remove(&(shard.0, id));
        Ok(())
    }

    fn webhook_outbox_size(&self) -> Result<(u64, u64), StorageError> {
        let data = self.data();
        let bytes = data.webhooks.values().map(WebhookRecord::size).sum();
        Ok((data.webhooks.len() as u64, bytes))
    }

    fn put_user_token(&self, uid: &Uid, device_flag: u8, token: &str) -> Result<(), StorageError> {
        self.data()
            .tokens
            .insert((uid.clone(), device_flag), token.to_owned());
        Ok(())
    }
}

/// One shard's handle on the shared in-memory data.
#[derive(Debug)]
pub struct MemoryShardStore {
    data: Arc<Mutex<MemoryData>>,
}

impl MemoryShardStore {
    fn data(&self) -> MutexGuard<'_, MemoryData> {
        // A panic while holding the lock is a bug elsewhere; the data itself
        // is still consistent (every commit checks before it writes).
        self.data
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl MemoryData {
    fn apply(&mut self, batch: &[Mutation]) -> Result<(), StorageError> {
        // Check the whole batch first so that a bad batch changes nothing:
        // a channel's seqs follow each other (an invariant of the shards,
        // checked here where it costs nothing).
        let mut expected: FastMap<&ChannelKey, u64> = FastMap::default();
        for mutation in batch {
            match mutation {
                Mutation::Message(message) => {
                    let next = expected.entry(&message.channel).or_insert_with(|| {
                        self.meta.get(&message.channel).map_or(0, |m| m.last_seq.0)
                    });
                    *next += 1;
                    if message.seq.0 != *next {
                        return Err(StorageError::Corrupt(format!(
                            "channel {:?}: seq {} does not follow {}",
                            message.channel,
                            message.seq.0,
                            *next - 1
                        )));
                    }
                }
                Mutation::PutGroup { key, last_seq, .. }
                | Mutation::DeleteGroup { key, last_seq, .. } => {
                    expected.insert(key, last_seq.0);
                }
                _ => {}
            }
        }
        for mutation in batch {
            self.apply_one(mutation);
        }
        Ok(())
    }

    fn apply_one(&mut self, mutation: &Mutation) {
        match mutation {
            Mutation::Message(message) => {
                self.messages
                    .entry(message.channel.clone())
                    .or_default()
                    .insert(message.seq.0, Arc::clone(message));
                let meta = self.meta.entry(message.channel.clone()).or_default();
                meta.last_seq = message.seq;
                meta.last_message_id = message.message_id;
                meta.is_group = message.channel.kind() == crate::protocol::ChannelType::Group;
                meta.deleted = false;
                self.idempotency.insert(
                    (message.from_uid.clone(), message.client_msg_no.clone()),
                    IdempotentHit {
                        channel: message.channel.clone(),
                        seq: message.seq,
                        message_id: message.message_id,
                        committed_at_ms: message.timestamp_ms,
                    },
                );
            }
            Mutation::Recall(message) => {
                self.messages
                    .entry(message.channel.clone())
                    .or_default()
                    .insert(message.seq.0, Arc::clone(message));
            }
            Mutation::PutList { key, kind, uids } => {
                let list = uids.iter().map(|u| (uid_order(u), u.clone())).collect();
                self.lists.insert((key.clone(), *kind), list);
            }
            Mutation::Conversation { uid, key, record } => {
                self.conversations
                    .entry(uid.clone())
                    .or_default()
                    .insert(super::keys::channel(key), (key.clone(), *record));
            }
            Mutation::DeleteConversation { uid, key } => {
                if let Some(rows) = self.conversations.get_mut(uid) {
                    rows.remove(&super::keys::channel(key));
                }
            }
            Mutation::Webhook { shard, id, record } => {
                self.webhooks.insert((shard.0, *id), (**record).clone());
            }
            Mutation::IdsIssued(id) => self.ids_issued = self.ids_issued.max(*id),
            Mutation::LogApplied { partition, seq } => {
                let applied = self.log_applied.entry(*partition).or_default();
                *applied = (*applied).max(*seq);
            }
            Mutation::DeleteGroup {
                key,
                members,
                last_seq,
                last_message_id,
            } => {
                self.messages.remove(key);
                self.members.remove(key);
                self.lists.remove(&(key.clone(), ListKind::Allow));
                self.lists.remove(&(key.clone(), ListKind::Deny));
                self.meta.insert(
                    key.clone(),
                    ChannelMeta {
                        last_seq: *last_seq,
                        last_message_id: *last_message_id,
                        is_group: true,
                        deleted: true,
                    },
                );
                let channel = super::keys::channel(key);
                for uid in members {
                    if let Some(rows) = self.conversations.get_mut(uid) {
                        rows.remove(&channel);
                    }
                }
            }
            Mutation::PutGroup {
                key,
                members,
                last_seq,
                last_message_id,
            } => {
                self.members.insert(key.clone(), members.clone());
                self.meta.insert(
                    key.clone(),
                    ChannelMeta {
                        last_seq: *last_seq,
                        last_message_id: *last_message_id,
                        is_group: true,
                        deleted: false,
                    },
                );
            }
        }
    }
}

impl ShardStore for MemoryShardStore {
    fn prepare_commit(&mut self, batch: &[Mutation]) -> Result<CommitJob, StorageError> {
        // Applied when the job runs, as the RocksDB store writes then: a
        // batch whose job never runs (a crash) leaves nothing behind.
        let batch = batch.to_vec();
        let data = Arc::clone(&self.data);
        Ok(Box::new(move || {
            data.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .apply(&batch)
        }))
    }

    fn find_idempotent(
        &mut self,
        from: &Uid,
        client_msg_no: &str,
        now_unix_ms: u64,
        ttl_ms: u64,
    ) -> Result<Option<IdempotentHit>, StorageError> {
        Ok(self
            .data()
            .idempotency
            .get(&(from.clone(), client_msg_no.to_owned()))
            .filter(|hit| (hit.committed_at_ms.max(0) as u64).saturating_add(ttl_ms) > now_unix_ms)
            .cloned())
    }

    fn load_channel(&mut self, key: &ChannelKey) -> Result<Option<ChannelRecord>, StorageError> {
        let data = self.data();
        Ok(data.meta.get(key).map(|meta| ChannelRecord {
            last_seq: meta.last_seq,
            last_message_id: meta.last_message_id,
            members: (meta.is_group && !meta.deleted)
                .then(|| data.members.get(key).cloned().unwrap_or_default()),
            deleted: meta.deleted,
        }))
    }

    fn channel_head(&mut self, key: &ChannelKey) -> Result<Option<ChannelHead>, StorageError> {
        Ok(self.data().meta.get(key).map(|meta| ChannelHead {
            last_seq: meta.last_seq,
            last_message_id: meta.last_message_id,
            deleted: meta.deleted,
        }))
    }

    fn read_messages(
        &mut self,
        key: &ChannelKey,
        from: Seq,
        limit: usize,
        direction: ReadDirection,
    ) -> Result<Vec<Arc<StoredMessage>>, StorageError> {
        let data = self.data();
        let Some(messages) = data.messages.get(key) else {
            return Ok(Vec::new());
        };
        Ok(match direction {
            ReadDirection::Up => messages
                .range(from.0..)
                .take(limit)
                .map(|(_, m)| Arc::clone(m))
                .collect(),
            ReadDirection::Down => messages
                .range(..=from.0)
                .rev()
                .take(limit)
                .map(|(_, m)| Arc::clone(m))
                .collect(),
        })
    }

    fn find_message_id(
        &mut self,
        key: &ChannelKey,
        id: MessageId,
    ) -> Result<Option<Seq>, StorageError> {
        let data = self.data();
        Ok(data
            .messages
            .get(key)
            .and_then(|m| m.values().find(|m| m.message_id == id))
            .map(|m| m.seq))
    }

    fn is_member(&mut self, key: &ChannelKey, uid: &Uid) -> Result<bool, StorageError> {
        Ok(self
            .data()
            .members
            .get(key)
            .is_some_and(|members| members.contains(uid)))
    }

    fn conversation(
        &mut self,
        uid: &Uid,
        key: &ChannelKey,
    ) -> Result<Option<ConversationRecord>, StorageError> {
        Ok(self
            .data()
            .conversations
            .get(uid)
            .and_then(|rows| rows.get(&super::keys::channel(key)))
            .map(|(_, record)| *record))
    }

    fn conversations(
        &mut self,
        uid: &Uid,
    ) -> Result<Vec<(ChannelKey, ConversationRecord)>, StorageError> {
        Ok(self
            .data()
            .conversations
            .get(uid)
            .map(|rows| rows.values().map(|(k, r)| (k.clone(), *r)).collect())
            .unwrap_or_default())
    }

    fn list(
        &mut self,
        key: &ChannelKey,
        kind: ListKind,
        limit: usize,
    ) -> Result<Vec<Uid>, StorageError> {
        Ok(self
            .data()
            .lists
            .get(&(key.clone(), kind))
            .map(|uids| uids.values().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    fn prepare_device_acks(
        &mut self,
        rows: &[DeviceAck],
        sessions: &[DeviceSession],
    ) -> Result<CommitJob, StorageError> {
        let rows = rows.to_vec();
        let sessions = sessions.to_vec();
        let data = Arc::clone(&self.data);
        Ok(Box::new(move || {
            let mut data = data.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for row in rows {
                let key = (row.uid, row.device_id.to_string(), row.channel);
                let position = data.device_acks.entry(key).or_default();
                position.acked = position.acked.max(row.seq);
                position.pushed = position.pushed.max(row.pushed).max(position.acked);
            }
            for session in sessions {
                data.device_sessions
                    .insert((session.uid, session.device_id.to_string()), session.record);
            }
            Ok(())
        }))
    }

    fn device_position(
        &mut self,
        uid: &Uid,
        device_id: &str,
        key: &ChannelKey,
    ) -> Result<DevicePosition, StorageError> {
        Ok(self
            .data()
            .device_acks
            .get(&(uid.clone(), device_id.to_owned(), key.clone()))
            .copied()
            .unwrap_or_default())
    }

    fn device_session(
        &mut self,
        uid: &Uid,
        device_id: &str,
    ) -> Result<Option<SessionRecord>, StorageError> {
        Ok(self
            .data()
            .device_sessions
            .get(&(uid.clone(), device_id.to_owned()))
            .copied())
    }

    fn ids_issued(&mut self) -> Result<MessageId, StorageError> {
        Ok(self.data().ids_issued)
    }

    fn log_applied(&mut self, partition: u32) -> Result<u64, StorageError> {
        Ok(self
            .data()
            .log_applied
            .get(&partition)
            .copied()
            .unwrap_or(0))
    }

    fn user_token(&mut self, uid: &Uid, device_flag: u8) -> Result<Option<String>, StorageError> {
        Ok(self.data().tokens.get(&(uid.clone(), device_flag)).cloned())
    }

    fn list_contains(
        &mut self,
        key: &ChannelKey,
        kind: ListKind,
        uid: &Uid,
    ) -> Result<bool, StorageError> {
        Ok(self
            .data()
            .lists
            .get(&(key.clone(), kind))
            .is_some_and(|uids| uids.contains_key(&uid_order(uid))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(key: &ChannelKey, seq: u64) -> Mutation {
        Mutation::Message(Arc::new(StoredMessage {
            message_id: MessageId(seq * 10),
            seq: Seq(seq),
            channel: key.clone(),
            from_uid: Uid::new("a"),
            from_device: Arc::from("d"),
            client_msg_no: format!("m{seq}"),
            timestamp_ms: 0,
            send_flags: 0,
            payload: Bytes::from_static(b"x"),
            recalled: false,
        }))
    }

    #[test]
    fn stores_messages_in_seq_order_and_reads_ranges_both_ways() {
        let mut store = MemoryStorage::default().open_shard(ShardId(0)).unwrap();
        let key = ChannelKey::group("g");
        store
            .commit(&[message(&key, 1), message(&key, 2), message(&key, 3)])
            .unwrap();
        let up = store
            .read_messages(&key, Seq(2), 10, ReadDirection::Up)
            .unwrap();
        assert_eq!(up.iter().map(|m| m.seq.0).collect::<Vec<_>>(), vec![2, 3]);
        let down = store
            .read_messages(&key, Seq(2), 10, ReadDirection::Down)
            .unwrap();
        assert_eq!(down.iter().map(|m| m.seq.0).collect::<Vec<_>>(), vec![2, 1]);
        let record = store.load_channel(&key).unwrap().unwrap();
        assert_eq!(
            (record.last_seq, record.last_message_id),
            (Seq(3), MessageId(30))
        );
        assert_eq!(
            store.find_message_id(&key, MessageId(20)).unwrap(),
            Some(Seq(2))
        );
    }

    #[test]
    fn a_batch_with_a_gap_changes_nothing() {
        let mut store = MemoryStorage::default().open_shard(ShardId(0)).unwrap();
        let key = ChannelKey::group("g");
        store.commit(&[message(&key, 1)]).unwrap();
        assert!(store.commit(&[message(&key, 2), message(&key, 4)]).is_err());
        assert_eq!(store.load_channel(&key).unwrap().unwrap().last_seq, Seq(1));
    }
}
