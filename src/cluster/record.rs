//! What one append to a partition's log carries: that partition's share of
//! an owner shard's commit batch (the storage mutations, in order) and who
//! wrote it. Every node applies these records to its own store, so the
//! format is versioned: a node reads every version it knows and refuses the
//! others with an error, never with a panic.
//!
//! Layout: one version byte, then the record in postcard.

use crate::ids::{MessageId, Seq, ShardId, Uid};
use crate::key::ChannelKey;
use crate::protocol::ChannelType;
use crate::storage::{ConversationRecord, ListKind, Mutation, StoredMessage, WebhookRecord};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The version this build writes.
pub const RECORD_VERSION: u8 = 1;

/// Who appended a record: a node, in the ownership epoch it held the
/// partition with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    pub node: u32,
    pub epoch: u64,
}

/// One partition's share of a commit batch.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub partition: u32,
    pub writer: Writer,
    pub mutations: Vec<Mutation>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("an empty log record")]
    Empty,
    #[error("log record version {0} is not one this build reads (it reads {RECORD_VERSION})")]
    UnknownVersion(u8),
    #[error("a log record that does not decode: {0}")]
    Corrupt(String),
}

impl LogRecord {
    pub fn encode(&self) -> Vec<u8> {
        let wire = WireRecord {
            partition: self.partition,
            writer: self.writer,
            mutations: self.mutations.iter().filter_map(to_wire).collect(),
        };
        postcard::to_extend(&wire, vec![RECORD_VERSION])
            .expect("records serialize into a Vec without fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<LogRecord, RecordError> {
        let (&version, rest) = bytes.split_first().ok_or(RecordError::Empty)?;
        if version != RECORD_VERSION {
            return Err(RecordError::UnknownVersion(version));
        }
        let wire: WireRecord =
            postcard::from_bytes(rest).map_err(|e| RecordError::Corrupt(e.to_string()))?;
        Ok(LogRecord {
            partition: wire.partition,
            writer: wire.writer,
            mutations: wire.mutations.into_iter().map(Mutation::from).collect(),
        })
    }
}

// The wire form: owned, plain fields, so the storage types need no serde
// and can change without changing the log's format unnoticed.

#[derive(Serialize, Deserialize)]
struct WireRecord {
    partition: u32,
    writer: Writer,
    mutations: Vec<WireMutation>,
}

#[derive(Serialize, Deserialize)]
struct WireKey {
    kind: u8,
    id: String,
}

impl From<&ChannelKey> for WireKey {
    fn from(key: &ChannelKey) -> Self {
        WireKey {
            kind: key.kind().0,
            id: key.id().to_owned(),
        }
    }
}

impl From<WireKey> for ChannelKey {
    fn from(key: WireKey) -> Self {
        ChannelKey::from_parts(ChannelType(key.kind), &key.id)
    }
}

#[derive(Serialize, Deserialize)]
struct WireMessage {
    message_id: u64,
    seq: u64,
    channel: WireKey,
    from_uid: String,
    from_device: String,
    client_msg_no: String,
    timestamp_ms: i64,
    send_flags: u8,
    payload: Vec<u8>,
    recalled: bool,
}

impl From<&StoredMessage> for WireMessage {
    fn from(m: &StoredMessage) -> Self {
        WireMessage {
            message_id: m.message_id.0,
            seq: m.seq.0,
            channel: WireKey::from(&m.channel),
            from_uid: m.from_uid.as_str().to_owned(),
            from_device: m.from_device.to_string(),
            client_msg_no: m.client_msg_no.clone(),
            timestamp_ms: m.timestamp_ms,
            send_flags: m.send_flags,
            payload: m.payload.to_vec(),
            recalled: m.recalled,
        }
    }
}

impl From<WireMessage> for Arc<StoredMessage> {
    fn from(m: WireMessage) -> Self {
        Arc::new(StoredMessage {
            message_id: MessageId(m.message_id),
            seq: Seq(m.seq),
            channel: m.channel.into(),
            from_uid: Uid::new(&m.from_uid),
            from_device: Arc::from(m.from_device),
            client_msg_no: m.client_msg_no,
            timestamp_ms: m.timestamp_ms,
            send_flags: m.send_flags,
            payload: Bytes::from(m.payload),
            recalled: m.recalled,
        })
    }
}

fn uids_to_wire(uids: &[Uid]) -> Vec<String> {
    uids.iter().map(|u| u.as_str().to_owned()).collect()
}

fn uids_from_wire(uids: Vec<String>) -> Vec<Uid> {
    uids.iter().map(|u| Uid::new(u)).collect()
}

#[derive(Serialize, Deserialize)]
enum WireMutation {
    Message(WireMessage),
    Conversation {
        uid: String,
        key: WireKey,
        record: ConversationRecord,
    },
    DeleteConversation {
        uid: String,
        key: WireKey,
    },
    Recall(WireMessage),
    PutList {
        key: WireKey,
        deny: bool,
        uids: Vec<String>,
    },
    Webhook {
        shard: u16,
        id: u64,
        record: WebhookRecord,
    },
    DeleteGroup {
        key: WireKey,
        members: Vec<String>,
        last_seq: u64,
        last_message_id: u64,
    },
    IdsIssued(u64),
    PutGroup {
        key: WireKey,
        members: Vec<String>,
        last_seq: u64,
        last_message_id: u64,
    },
}

/// The wire form of `m`; `None` for local bookkeeping that no log carries.
fn to_wire(m: &Mutation) -> Option<WireMutation> {
    Some(match m {
        Mutation::Message(message) => WireMutation::Message(WireMessage::from(&**message)),
        Mutation::Conversation { uid, key, record } => WireMutation::Conversation {
            uid: uid.as_str().to_owned(),
            key: key.into(),
            record: *record,
        },
        Mutation::DeleteConversation { uid, key } => WireMutation::DeleteConversation {
            uid: uid.as_str().to_owned(),
            key: key.into(),
        },
        Mutation::Recall(message) => WireMutation::Recall(WireMessage::from(&**message)),
        Mutation::PutList { key, kind, uids } => WireMutation::PutList {
            key: key.into(),
            deny: *kind == ListKind::Deny,
            uids: uids_to_wire(uids),
        },
        Mutation::Webhook { shard, id, record } => WireMutation::Webhook {
            shard: shard.0,
            id: *id,
            record: (**record).clone(),
        },
        Mutation::DeleteGroup {
            key,
            members,
            last_seq,
            last_message_id,
        } => WireMutation::DeleteGroup {
            key: key.into(),
            members: uids_to_wire(members),
            last_seq: last_seq.0,
            last_message_id: last_message_id.0,
        },
        Mutation::IdsIssued(id) => WireMutation::IdsIssued(id.0),
        Mutation::PutGroup {
            key,
            members,
            last_seq,
            last_message_id,
        } => WireMutation::PutGroup {
            key: key.into(),
            members: uids_to_wire(members),
            last_seq: last_seq.0,
            last_message_id: last_message_id.0,
        },
        Mutation::LogApplied { .. } => return None,
    })
}

impl From<WireMutation> for Mutation {
    fn from(m: WireMutation) -> Self {
        match m {
            WireMutation::Message(message) => Mutation::Message(message.into()),
            WireMutation::Conversation { uid, key, record } => Mutation::Conversation {
                uid: Uid::new(&uid),
                key: key.into(),
                record,
            },
            WireMutation::DeleteConversation { uid, key } => Mutation::DeleteConversation {
                uid: Uid::new(&uid),
                key: key.into(),
            },
            WireMutation::Recall(message) => Mutation::Recall(message.into()),
            WireMutation::PutList { key, deny, uids } => Mutation::PutList {
                key: key.into(),
                kind: if deny {
                    ListKind::Deny
                } else {
                    ListKind::Allow
                },
                uids: uids_from_wire(uids),
            },
            WireMutation::Webhook { shard, id, record } => Mutation::Webhook {
                shard: ShardId(shard),
                id,
                record: Arc::new(record),
            },
            WireMutation::DeleteGroup {
                key,
                members,
                last_seq,
                last_message_id,
            } => Mutation::DeleteGroup {
                key: key.into(),
                members: uids_from_wire(members),
                last_seq: Seq(last_seq),
                last_message_id: MessageId(last_message_id),
            },
            WireMutation::IdsIssued(id) => Mutation::IdsIssued(MessageId(id)),
            WireMutation::PutGroup {
                key,
                members,
                last_seq,
                last_message_id,
            } => Mutation::PutGroup {
                key: key.into(),
                members: uids_from_wire(members),
                last_seq: Seq(last_seq),
                last_message_id: MessageId(last_message_id),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = ChannelKey> {
        prop_oneof![
            "[a-z]{1,8}".prop_map(|id| ChannelKey::group(&id)),
            ("[a-m]{1,6}", "[n-z]{1,6}")
                .prop_map(|(a, b)| ChannelKey::person(&Uid::new(&a), &Uid::new(&b))),
        ]
    }

    fn uid() -> impl Strategy<Value = Uid> {
        "[a-z0-9_]{1,10}".prop_map(|u| Uid::new(&u))
    }

    fn message() -> impl Strategy<Value = Arc<StoredMessage>> {
        (
            (any::<u64>(), any::<u64>(), key(), uid(), "[a-z0-9]{0,8}"),
            (
                ".{0,12}",
                any::<i64>(),
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..64),
                any::<bool>(),
            ),
        )
            .prop_map(
                |((id, seq, channel, from_uid, device), (cmn, ts, flags, payload, recalled))| {
                    Arc::new(StoredMessage {
                        message_id: MessageId(id),
                        seq: Seq(seq),
                        channel,
                        from_uid,
                        from_device: Arc::from(device),
                        client_msg_no: cmn,
                        timestamp_ms: ts,
                        send_flags: flags,
                        payload: Bytes::from(payload),
                        recalled,
                    })
                },
            )
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let uids = || proptest::collection::vec(uid(), 0..4);
        prop_oneof![
            message().prop_map(Mutation::Message),
            message().prop_map(Mutation::Recall),
            (uid(), key(), any::<[u64; 4]>()).prop_map(|(uid, key, [a, b, c, d])| {
                Mutation::Conversation {
                    uid,
                    key,
                    record: ConversationRecord {
                        read_floor: a,
                        deleted_seq: b,
                        own_above_floor: c,
                        version: d,
                    },
                }
            }),
            (uid(), key()).prop_map(|(uid, key)| Mutation::DeleteConversation { uid, key }),
            (key(), any::<bool>(), uids()).prop_map(|(key, deny, uids)| Mutation::PutList {
                key,
                kind: if deny {
                    ListKind::Deny
                } else {
                    ListKind::Allow
                },
                uids,
            }),
            (
                any::<u16>(),
                any::<u64>(),
                "[a-z.]{1,12}",
                proptest::collection::vec(any::<u8>(), 0..32),
                any::<u64>()
            )
                .prop_map(|(shard, id, event, body, created_ms)| Mutation::Webhook {
                    shard: ShardId(shard),
                    id,
                    record: Arc::new(WebhookRecord {
                        event,
                        body,
                        created_ms
                    }),
                }),
            (key(), uids(), any::<u64>(), any::<u64>()).prop_map(|(key, members, s, m)| {
                Mutation::DeleteGroup {
                    key,
                    members,
                    last_seq: Seq(s),
                    last_message_id: MessageId(m),
                }
            }),
            any::<u64>().prop_map(|id| Mutation::IdsIssued(MessageId(id))),
            (key(), uids(), any::<u64>(), any::<u64>()).prop_map(|(key, members, s, m)| {
                Mutation::PutGroup {
                    key,
                    members,
                    last_seq: Seq(s),
                    last_message_id: MessageId(m),
                }
            }),
        ]
    }

    /// `Mutation` has no `PartialEq` (messages are shared `Arc`s); its
    /// `Debug` form shows every field.
    fn shown(mutations: &[Mutation]) -> String {
        format!("{mutations:?}")
    }

    proptest! {
        #[test]
        fn a_record_decodes_to_what_was_encoded(
            partition in any::<u32>(),
            node in any::<u32>(),
            epoch in any::<u64>(),
            mutations in proptest::collection::vec(mutation(), 0..12),
        ) {
            let record = LogRecord { partition, writer: Writer { node, epoch }, mutations };
            let bytes = record.encode();
            prop_assert_eq!(bytes[0], RECORD_VERSION);
            let back = LogRecord::decode(&bytes).unwrap();
            prop_assert_eq!(back.partition, partition);
            prop_assert_eq!(back.writer, Writer { node, epoch });
            prop_assert_eq!(shown(&back.mutations), shown(&record.mutations));
        }

        #[test]
        fn any_bytes_decode_to_a_record_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = LogRecord::decode(&bytes);
        }
    }

    #[test]
    fn an_unknown_version_or_a_cut_record_is_an_error() {
        let record = LogRecord {
            partition: 3,
            writer: Writer { node: 1, epoch: 9 },
            mutations: vec![
                Mutation::IdsIssued(MessageId(77)),
                Mutation::LogApplied {
                    partition: 3,
                    seq: 12,
                },
            ],
        };
        let mut bytes = record.encode();
        // A node's own bookkeeping is not carried.
        let back = LogRecord::decode(&bytes).unwrap();
        assert_eq!(shown(&back.mutations), shown(&record.mutations[..1]));
        assert_eq!(LogRecord::decode(&[]).unwrap_err(), RecordError::Empty);
        let cut = &bytes[..bytes.len() - 1];
        assert!(matches!(
            LogRecord::decode(cut),
            Err(RecordError::Corrupt(_))
        ));
        bytes[0] = 2;
        assert_eq!(
            LogRecord::decode(&bytes).unwrap_err(),
            RecordError::UnknownVersion(2)
        );
    }
}
