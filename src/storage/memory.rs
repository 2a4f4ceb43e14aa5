//! The in-memory store: the reference implementation of [`ShardStore`] used
//! by unit tests and by servers that keep nothing across restarts.

use super::{
    ChannelRecord, CommitJob, IdempotentHit, Mutation, ShardStore, Storage, StorageError,
    StoredMessage,
};
use crate::channel::ChannelKey;
use crate::ids::{Seq, ShardId, Uid};
use std::collections::HashMap;
use std::sync::Arc;

/// Keeps everything in memory; each shard's data is private to that shard.
#[derive(Debug, Default)]
pub struct MemoryStorage;

impl Storage for MemoryStorage {
    fn open_shard(&self, _shard: ShardId) -> Result<Box<dyn ShardStore>, StorageError> {
        Ok(Box::new(MemoryShardStore::default()))
    }
}

#[derive(Debug, Default)]
struct MemoryChannel {
    messages: Vec<Arc<StoredMessage>>,
    members: Option<Vec<Uid>>,
}

/// One shard's in-memory data.
#[derive(Debug, Default)]
pub struct MemoryShardStore {
    channels: HashMap<ChannelKey, MemoryChannel, ahash::RandomState>,
    idempotency: HashMap<(Uid, String), IdempotentHit, ahash::RandomState>,
}

impl ShardStore for MemoryShardStore {
    fn prepare_commit(&mut self, batch: &[Mutation]) -> Result<CommitJob, StorageError> {
        // Memory is as durable as it gets: apply now, nothing left to do.
        self.apply(batch)?;
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
            .idempotency
            .get(&(from.clone(), client_msg_no.to_owned()))
            .filter(|hit| hit.committed_at_ms as u64 + ttl_ms > now_unix_ms)
            .cloned())
    }

    fn load_channel(&mut self, key: &ChannelKey) -> Result<Option<ChannelRecord>, StorageError> {
        Ok(self.channels.get(key).map(|c| ChannelRecord {
            last_seq: Seq(c.messages.len() as u64),
            members: c.members.clone(),
        }))
    }

    fn read_messages(
        &mut self,
        key: &ChannelKey,
        from: Seq,
        limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>, StorageError> {
        let Some(channel) = self.channels.get(key) else {
            return Ok(Vec::new());
        };
        let start = from.0.max(1) as usize - 1;
        Ok(channel
            .messages
            .iter()
            .skip(start)
            .take(limit)
            .cloned()
            .collect())
    }
}

impl MemoryShardStore {
    fn apply(&mut self, batch: &[Mutation]) -> Result<(), StorageError> {
        // Check the whole batch first so that a bad batch changes nothing.
        let mut expected: HashMap<&ChannelKey, u64, ahash::RandomState> = HashMap::default();
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
                Mutation::PutGroup { key, members, .. } => {
                    self.channels.entry(key.clone()).or_default().members = Some(members.clone());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::MessageId;
    use bytes::Bytes;

    fn message(key: &ChannelKey, seq: u64) -> Mutation {
        Mutation::Message(Arc::new(StoredMessage {
            message_id: MessageId(seq * 10),
            seq: Seq(seq),
            channel: key.clone(),
            from_uid: Uid::new("a"),
            client_msg_no: format!("m{seq}"),
            timestamp_ms: 0,
            send_flags: 0,
            payload: Bytes::from_static(b"x"),
        }))
    }

    #[test]
    fn stores_messages_in_seq_order_and_reads_ranges() {
        let mut store = MemoryStorage.open_shard(ShardId(0)).unwrap();
        let key = ChannelKey::group("g");
        store
            .commit(&[message(&key, 1), message(&key, 2), message(&key, 3)])
            .unwrap();
        let read = store.read_messages(&key, Seq(2), 10).unwrap();
        assert_eq!(read.iter().map(|m| m.seq.0).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(store.load_channel(&key).unwrap().unwrap().last_seq, Seq(3));
    }

    #[test]
    fn a_batch_with_a_gap_changes_nothing() {
        let mut store = MemoryStorage.open_shard(ShardId(0)).unwrap();
        let key = ChannelKey::group("g");
        store.commit(&[message(&key, 1)]).unwrap();
        assert!(store.commit(&[message(&key, 2), message(&key, 4)]).is_err());
        assert_eq!(store.load_channel(&key).unwrap().unwrap().last_seq, Seq(1));
    }
}
