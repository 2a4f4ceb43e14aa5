//! The in-memory store: the reference implementation of [`ShardStore`], used
//! by unit tests and by servers that keep nothing across restarts. All
//! shards share one map behind a mutex, like the shared RocksDB database; it
//! is for tests and experiments, not for production load.

use super::{
    ChannelRecord, CommitJob, ConversationRecord, DeviceAck, IdempotentHit, ListKind, Mutation,
    ReadDirection, ShardStore, Storage, StorageError, StoredMessage, WebhookRecord,
};
use crate::channel::ChannelKey;
use crate::ids::{MessageId, Seq, ShardId, Uid};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

#[derive(Debug, Default)]
struct MemoryChannel {
    messages: Vec<Arc<StoredMessage>>,
    members: Option<Vec<Uid>>,
    last_seq_override: Option<Seq>,
}

#[derive(Debug, Default)]
struct MemoryData {
    channels: FastMap<ChannelKey, MemoryChannel>,
    idempotency: FastMap<(Uid, String), IdempotentHit>,
    conversations: FastMap<Uid, BTreeMap<ChannelKey, ConversationRecord>>,
    lists: FastMap<(ChannelKey, ListKind), Vec<Uid>>,
    device_acks: FastMap<(Uid, String, ChannelKey), Seq>,
    webhooks: BTreeMap<(u16, u64), WebhookRecord>,
    tokens: FastMap<(Uid, u8), String>,
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
        // Check the whole batch first so that a bad batch changes nothing.
        let mut expected: FastMap<&ChannelKey, u64> = FastMap::default();
        for mutation in batch {
            if let Mutation::Message(message) = mutation {
                let next = expected.entry(&message.channel).or_insert_with(|| {
                    self.channels
                        .get(&message.channel)
                        .map_or(0, |c| c.messages.len() as u64)
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
        }
        for mutation in batch {
            match mutation {
                Mutation::Message(message) => {
                    self.channels
                        .entry(message.channel.clone())
                        .or_default()
                        .messages
                        .push(Arc::clone(message));
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
                    if let Some(slot) = self
                        .channels
                        .get_mut(&message.channel)
                        .and_then(|c| c.messages.get_mut(message.seq.0 as usize - 1))
                    {
                        *slot = Arc::clone(message);
                    }
                }
                Mutation::PutList { key, kind, uids } => {
                    self.lists.insert((key.clone(), *kind), uids.clone());
                }
                Mutation::Conversation { uid, key, record } => {
                    self.conversations
                        .entry(uid.clone())
                        .or_default()
                        .insert(key.clone(), *record);
                }
                Mutation::DeleteConversation { uid, key } => {
                    if let Some(rows) = self.conversations.get_mut(uid) {
                        rows.remove(key);
                    }
                }
                Mutation::Webhook { shard, id, record } => {
                    self.webhooks.insert((shard.0, *id), (**record).clone());
                }
                Mutation::DeleteGroup { key, members } => {
                    self.channels.remove(key);
                    self.lists.remove(&(key.clone(), ListKind::Allow));
                    self.lists.remove(&(key.clone(), ListKind::Deny));
                    for uid in members {
                        if let Some(rows) = self.conversations.get_mut(uid) {
                            rows.remove(key);
                        }
                    }
                }
                Mutation::PutGroup {
                    key,
                    members,
                    last_seq,
                    ..
                } => {
                    let channel = self.channels.entry(key.clone()).or_default();
                    channel.members = Some(members.clone());
                    channel.last_seq_override = Some(*last_seq);
                }
            }
        }
        Ok(())
    }
}

impl ShardStore for MemoryShardStore {
    fn prepare_commit(&mut self, batch: &[Mutation]) -> Result<CommitJob, StorageError> {
        // Memory is as durable as it gets: apply now, nothing left to do.
        self.data().apply(batch)?;
        Ok(Box::new(|| Ok(())))
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
        Ok(self.data().channels.get(key).map(|c| {
            let last = c.messages.last();
            ChannelRecord {
                last_seq: last.map_or(c.last_seq_override.unwrap_or_default(), |m| m.seq),
                last_message_id: last.map_or(MessageId(0), |m| m.message_id),
                members: c.members.clone(),
            }
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
        let Some(channel) = data.channels.get(key) else {
            return Ok(Vec::new());
        };
        let messages = &channel.messages;
        Ok(match direction {
            ReadDirection::Up => {
                let start = from.0.max(1) as usize - 1;
                messages.iter().skip(start).take(limit).cloned().collect()
            }
            ReadDirection::Down => {
                let end = (from.0 as usize).min(messages.len());
                messages[..end].iter().rev().take(limit).cloned().collect()
            }
        })
    }

    fn find_message_id(
        &mut self,
        key: &ChannelKey,
        id: MessageId,
    ) -> Result<Option<Seq>, StorageError> {
        let data = self.data();
        Ok(data
            .channels
            .get(key)
            .and_then(|c| c.messages.iter().find(|m| m.message_id == id))
            .map(|m| m.seq))
    }

    fn is_member(&mut self, key: &ChannelKey, uid: &Uid) -> Result<bool, StorageError> {
        Ok(self
            .data()
            .channels
            .get(key)
            .and_then(|c| c.members.as_ref())
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
            .and_then(|rows| rows.get(key))
            .copied())
    }

    fn conversations(
        &mut self,
        uid: &Uid,
    ) -> Result<Vec<(ChannelKey, ConversationRecord)>, StorageError> {
        Ok(self
            .data()
            .conversations
            .get(uid)
            .map(|rows| rows.iter().map(|(k, r)| (k.clone(), *r)).collect())
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
            .map(|uids| uids.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    fn prepare_device_acks(&mut self, rows: &[DeviceAck]) -> Result<CommitJob, StorageError> {
        let mut data = self.data();
        for row in rows {
            let key = (
                row.uid.clone(),
                row.device_id.to_string(),
                row.channel.clone(),
            );
            let seq = data.device_acks.entry(key).or_default();
            *seq = (*seq).max(row.seq);
        }
        Ok(Box::new(|| Ok(())))
    }

    fn device_ack(
        &mut self,
        uid: &Uid,
        device_id: &str,
        key: &ChannelKey,
    ) -> Result<Seq, StorageError> {
        Ok(self
            .data()
            .device_acks
            .get(&(uid.clone(), device_id.to_owned(), key.clone()))
            .copied()
            .unwrap_or_default())
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
            .is_some_and(|uids| uids.contains(uid)))
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
