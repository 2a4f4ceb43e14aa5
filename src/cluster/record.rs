//! What one append to a partition's log carries: that partition's share of
//! an owner shard's commit batch (the storage mutations, in order) and who
//! wrote it. Every node applies these records to its own store, so the
//! format is versioned: a node reads every version it knows and refuses the
//! others with an error, never with a panic.
//!
//! Layout: one version byte, then the record in postcard, of wire types of
//! its own (never the storage types' serde forms, which may grow fields),
//! pinned by a test of the exact bytes.
//!
//! Not carried: a node's own bookkeeping ([`Mutation::LogApplied`]) and the
//! writer's webhook outbox rows ([`Mutation::Webhook`]), which are keyed by
//! the writer's shard and must be posted once, by the writer, not by every
//! node that applies the log.

use crate::ids::{MessageId, Seq, Uid};
use crate::key::ChannelKey;
use crate::protocol::ChannelType;
use crate::storage::{ConversationRecord, ListKind, Mutation, StoredMessage};
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

/// The longest uid, channel id, device id or client_msg_no a record may
/// carry: storage keys hold them with a 16-bit length.
pub const ID_MAX_BYTES: usize = u16::MAX as usize;

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
        let (wire, left): (WireRecord, &[u8]) =
            postcard::take_from_bytes(rest).map_err(|e| RecordError::Corrupt(e.to_string()))?;
        if !left.is_empty() {
            return Err(RecordError::Corrupt(format!(
                "{} bytes after the record",
                left.len()
            )));
        }
        wire.check_ids()?;
        Ok(LogRecord {
            partition: wire.partition,
            writer: wire.writer,
            mutations: wire.mutations.into_iter().map(Mutation::from).collect(),
        })
    }
}

/// Bytes a record spends on its version, partition and writer, at most.
pub const RECORD_OVERHEAD_BYTES: usize = 1 + 5 + 5 + 10 + 5;

/// At most how many bytes `mutation` takes in an encoded record (postcard:
/// a varint is at most 10 bytes, a string or byte string's length prefix
/// at most 5). Used to split a commit into records the server takes
/// without encoding it twice.
pub fn size_bound(mutation: &Mutation) -> usize {
    const ID: usize = 5;
    const NUMBER: usize = 10;
    let key = |key: &ChannelKey| 1 + ID + key.id().len();
    let uids = |uids: &[Uid]| ID + uids.iter().map(|u| ID + u.as_str().len()).sum::<usize>();
    let message = |m: &StoredMessage| {
        1 + 4 * NUMBER
            + key(&m.channel)
            + ID
            + m.from_uid.as_str().len()
            + ID
            + m.from_device.len()
            + ID
            + m.client_msg_no.len()
            + 2
            + ID
            + m.payload.len()
    };
    match mutation {
        Mutation::Message(m) | Mutation::Recall(m) => message(m),
        Mutation::Conversation { uid, key: k, .. } => {
            1 + ID + uid.as_str().len() + key(k) + 8 * NUMBER
        }
        Mutation::DeleteConversation { uid, key: k } => 1 + ID + uid.as_str().len() + key(k),
        Mutation::PutList {
            key: k, uids: u, ..
        } => 2 + key(k) + uids(u),
        Mutation::DeleteGroup {
            key: k, members, ..
        }
        | Mutation::PutGroup {
            key: k, members, ..
        } => 1 + key(k) + uids(members) + 2 * NUMBER,
        Mutation::IdsIssued(_) => 1 + NUMBER,
        // Not carried.
        Mutation::Webhook { .. } | Mutation::LogApplied { .. } => 0,
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

impl WireRecord {
    /// Refuses ids storage could not key, so applying a decoded record
    /// never fails on them.
    fn check_ids(&self) -> Result<(), RecordError> {
        let mut ids: Vec<&str> = Vec::new();
        for m in &self.mutations {
            match m {
                WireMutation::Message(message) | WireMutation::Recall(message) => ids.extend([
                    message.channel.id.as_str(),
                    &message.from_uid,
                    &message.from_device,
                    &message.client_msg_no,
                ]),
                WireMutation::Conversation { uid, key, .. }
                | WireMutation::DeleteConversation { uid, key } => {
                    ids.extend([uid.as_str(), key.id.as_str()])
                }
                WireMutation::PutList { key, uids, .. } => {
                    ids.push(&key.id);
                    ids.extend(uids.iter().map(String::as_str));
                }
                WireMutation::DeleteGroup { key, members, .. }
                | WireMutation::PutGroup { key, members, .. } => {
                    ids.push(&key.id);
                    ids.extend(members.iter().map(String::as_str));
                }
                WireMutation::IdsIssued(_) => {}
            }
        }
        match ids.iter().find(|id| id.len() > ID_MAX_BYTES) {
            Some(id) => Err(RecordError::Corrupt(format!(
                "an id of {} bytes (at most {ID_MAX_BYTES})",
                id.len()
            ))),
            None => Ok(()),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct WireConversation {
    read_floor: u64,
    deleted_seq: u64,
    own_above_floor: u64,
    version: u64,
}

impl From<&ConversationRecord> for WireConversation {
    fn from(r: &ConversationRecord) -> Self {
        WireConversation {
            read_floor: r.read_floor,
            deleted_seq: r.deleted_seq,
            own_above_floor: r.own_above_floor,
            version: r.version,
        }
    }
}

impl From<WireConversation> for ConversationRecord {
    fn from(r: WireConversation) -> Self {
        ConversationRecord {
            read_floor: r.read_floor,
            deleted_seq: r.deleted_seq,
            own_above_floor: r.own_above_floor,
            version: r.version,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct WireKey {
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
        record: WireConversation,
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
            record: record.into(),
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
        Mutation::LogApplied { .. } | Mutation::Webhook { .. } => return None,
    })
}

impl From<WireMutation> for Mutation {
    fn from(m: WireMutation) -> Self {
        match m {
            WireMutation::Message(message) => Mutation::Message(message.into()),
            WireMutation::Conversation { uid, key, record } => Mutation::Conversation {
                uid: Uid::new(&uid),
                key: key.into(),
                record: record.into(),
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
    use crate::ids::ShardId;
    use crate::storage::WebhookRecord;
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
            let bound = RECORD_OVERHEAD_BYTES + 5 + record.mutations.iter().map(size_bound).sum::<usize>();
            prop_assert!(bytes.len() <= bound, "{} bytes, bound {}", bytes.len(), bound);
            let back = LogRecord::decode(&bytes).unwrap();
            prop_assert_eq!(back.partition, partition);
            prop_assert_eq!(back.writer, Writer { node, epoch });
            // Webhook outbox rows stay with their writer.
            let carried: Vec<Mutation> = record
                .mutations
                .iter()
                .filter(|m| !matches!(m, Mutation::Webhook { .. }))
                .cloned()
                .collect();
            prop_assert_eq!(shown(&back.mutations), shown(&carried));
        }

        #[test]
        fn any_bytes_decode_to_a_record_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = LogRecord::decode(&bytes);
        }
    }

    /// The format's exact bytes: a change to them needs a new
    /// [`RECORD_VERSION`] (and the old one still read).
    #[test]
    fn the_format_of_version_1_is_pinned() {
        let (alice, bob) = (Uid::new("alice"), Uid::new("bob"));
        let chat = ChannelKey::person(&alice, &bob);
        let record = LogRecord {
            partition: 7,
            writer: Writer { node: 2, epoch: 5 },
            mutations: vec![
                Mutation::Message(Arc::new(StoredMessage {
                    message_id: MessageId(300),
                    seq: Seq(4),
                    channel: chat.clone(),
                    from_uid: alice.clone(),
                    from_device: Arc::from("ph"),
                    client_msg_no: "c1".into(),
                    timestamp_ms: 1_000,
                    send_flags: 1,
                    payload: Bytes::from_static(b"hi"),
                    recalled: false,
                })),
                Mutation::Conversation {
                    uid: bob.clone(),
                    key: chat.clone(),
                    record: ConversationRecord {
                        read_floor: 3,
                        deleted_seq: 0,
                        own_above_floor: 0,
                        version: 9,
                    },
                },
                Mutation::PutList {
                    key: ChannelKey::group("g"),
                    kind: ListKind::Deny,
                    uids: vec![alice],
                },
                Mutation::IdsIssued(MessageId(301)),
            ],
        };
        let hex: String = record.encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, PINNED_V1);
    }

    /// Version byte, partition 7, node 2, epoch 5, four mutations: the
    /// message (variant 0: id 300, seq 4, person key "alice@bob", from
    /// "alice" on "ph", "c1", 1000 ms as zigzag, flags 1, "hi", not
    /// recalled), bob's row (variant 1: 3, 0, 0, 9), the deny list of group
    /// "g" (variant 4) holding alice, ids issued 301 (variant 6).
    const PINNED_V1: &str = "010702050400ac02040109616c69636540626f6205616c696365027068026331d00f01026869000103626f620109616c69636540626f620300000904020167010105616c69636506ad02";

    #[test]
    fn an_id_storage_could_not_key_is_refused() {
        let long = "x".repeat(ID_MAX_BYTES + 1);
        let record = LogRecord {
            partition: 1,
            writer: Writer { node: 1, epoch: 1 },
            mutations: vec![Mutation::DeleteConversation {
                uid: Uid::new(&long),
                key: ChannelKey::group("g"),
            }],
        };
        assert!(matches!(
            LogRecord::decode(&record.encode()),
            Err(RecordError::Corrupt(_))
        ));
        let mut bytes = LogRecord {
            partition: 1,
            writer: Writer { node: 1, epoch: 1 },
            mutations: vec![],
        }
        .encode();
        bytes.push(0);
        assert!(matches!(
            LogRecord::decode(&bytes),
            Err(RecordError::Corrupt(_))
        ));
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
