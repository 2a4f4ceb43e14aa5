//! Every column family of the RocksDB store and the encoding of every key,
//! in one place. Keys sort the way they are scanned: big-endian integers,
//! length-prefixed strings, so that a prefix never matches a longer id by
//! accident.
//!
//! | column family   | key                                   | value                         |
//! |-----------------|---------------------------------------|-------------------------------|
//! | `messages`      | channel · seq (u64 BE)                | [`MessageRecord`]             |
//! | `channels`      | channel                               | [`ChannelMetaRecord`]         |
//! | `members`       | channel · uid                         | empty                         |
//! | `conversations` | uid · channel                         | [`ConversationRecord`]        |
//! | `idempotency`   | uid · client_msg_no                   | [`IdempotencyRecord`]         |
//! | `message_ids`   | channel · message id (u64 BE)         | seq (u64 BE)                  |
//! | `lists`         | channel · kind (u8) · uid             | empty                         |
//! | `device_acks`   | uid · device id · channel             | acknowledged, pushed seq (2 × u64 BE; merged by max) |
//! | `device_sessions` | uid · device id                     | [`SessionRecord`] (2 × u64 BE) |
//! | `webhooks`      | shard (u16 BE) · event id (u64 BE)    | [`WebhookRecord`]             |
//! | `tokens`        | uid · device flag (u8)                | token (UTF-8)                 |
//! | `meta`          | ASCII name                            | format version, ids issued (u64 BE; merged by max) |
//!
//! where `channel` is `kind (u8) · id length (u16 BE) · id bytes` (a user's
//! own lists use a person-type `channel` holding just their uid) and `uid`
//! and `client_msg_no` are `length (u16 BE) · bytes`. Values are postcard
//! encodings of the record structs below; a record gains fields only at the
//! end, with `#[serde(default)]`.
//!
//! [`MessageRecord`]: super::rocks::MessageRecord
//! [`ChannelMetaRecord`]: super::rocks::ChannelMetaRecord
//! [`IdempotencyRecord`]: super::rocks::IdempotencyRecord
//! [`ConversationRecord`]: super::ConversationRecord
//! [`WebhookRecord`]: super::WebhookRecord
//! [`SessionRecord`]: super::SessionRecord

use crate::ids::Seq;
use crate::key::ChannelKey;
use crate::protocol::ChannelType;

pub const CF_MESSAGES: &str = "messages";
pub const CF_CHANNELS: &str = "channels";
pub const CF_MEMBERS: &str = "members";
pub const CF_CONVERSATIONS: &str = "conversations";
pub const CF_IDEMPOTENCY: &str = "idempotency";
pub const CF_MESSAGE_IDS: &str = "message_ids";
pub const CF_LISTS: &str = "lists";
pub const CF_DEVICE_ACKS: &str = "device_acks";
pub const CF_META: &str = "meta";
pub const CF_WEBHOOKS: &str = "webhooks";
pub const CF_TOKENS: &str = "tokens";
pub const CF_DEVICE_SESSIONS: &str = "device_sessions";

pub const ALL_CFS: [&str; 12] = [
    CF_DEVICE_SESSIONS,
    CF_WEBHOOKS,
    CF_TOKENS,
    CF_LISTS,
    CF_DEVICE_ACKS,
    CF_MESSAGES,
    CF_CHANNELS,
    CF_MEMBERS,
    CF_CONVERSATIONS,
    CF_IDEMPOTENCY,
    CF_MESSAGE_IDS,
    CF_META,
];

/// `meta` key holding the largest message id any shard has handed out
/// (merged by max).
pub const META_IDS_ISSUED: &[u8] = b"ids_issued";

/// `meta` key holding how far this node applied partition `partition`'s
/// cluster log (merged by max).
pub fn log_applied(partition: u32) -> Vec<u8> {
    let mut key = b"log_applied/".to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}
/// `meta` key holding the on-disk format version.
pub const META_FORMAT_VERSION: &[u8] = b"format_version";
/// The format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

fn push_str(out: &mut Vec<u8>, text: &str) {
    let len = u16::try_from(text.len()).expect("ids are limited far below 64 KiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Reads a length-prefixed string at the front of `bytes`; returns it and
/// the rest.
fn take_str(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let len = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]) as usize;
    let text = bytes.get(2..2 + len)?;
    Some((std::str::from_utf8(text).ok()?, &bytes[2 + len..]))
}

/// `kind · len · id`: the prefix of everything stored about a channel.
pub fn channel(key: &ChannelKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + key.id().len() + 8);
    out.push(key.kind().0);
    push_str(&mut out, key.id());
    out
}

pub fn decode_channel(bytes: &[u8]) -> Option<(ChannelKey, &[u8])> {
    let kind = ChannelType(*bytes.first()?);
    let (id, rest) = take_str(&bytes[1..])?;
    Some((ChannelKey::from_parts(kind, id), rest))
}

pub fn message(key: &ChannelKey, seq: Seq) -> Vec<u8> {
    let mut out = channel(key);
    out.extend_from_slice(&seq.0.to_be_bytes());
    out
}

pub fn message_id(key: &ChannelKey, id: crate::ids::MessageId) -> Vec<u8> {
    let mut out = channel(key);
    out.extend_from_slice(&id.0.to_be_bytes());
    out
}

pub fn decode_message_seq(bytes: &[u8]) -> Option<Seq> {
    let tail: [u8; 8] = bytes.get(bytes.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(Seq(u64::from_be_bytes(tail)))
}

pub fn member(key: &ChannelKey, uid: &str) -> Vec<u8> {
    let mut out = channel(key);
    push_str(&mut out, uid);
    out
}

/// The prefix of one list: `channel · kind`.
pub fn list(key: &ChannelKey, kind: u8) -> Vec<u8> {
    let mut out = channel(key);
    out.push(kind);
    out
}

pub fn list_entry(key: &ChannelKey, kind: u8, uid: &str) -> Vec<u8> {
    let mut out = list(key, kind);
    push_str(&mut out, uid);
    out
}

pub fn decode_list_entry(bytes: &[u8]) -> Option<String> {
    let (_, rest) = decode_channel(bytes)?;
    let (uid, _) = take_str(rest.get(1..)?)?;
    Some(uid.to_owned())
}

pub fn decode_member(bytes: &[u8]) -> Option<String> {
    let (_, rest) = decode_channel(bytes)?;
    let (uid, _) = take_str(rest)?;
    Some(uid.to_owned())
}

/// The prefix of every conversation of `uid`.
pub fn conversations_of(uid: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + uid.len() + 16);
    push_str(&mut out, uid);
    out
}

pub fn conversation(uid: &str, key: &ChannelKey) -> Vec<u8> {
    let mut out = conversations_of(uid);
    out.extend_from_slice(&channel(key));
    out
}

pub fn decode_conversation(bytes: &[u8]) -> Option<(String, ChannelKey)> {
    let (uid, rest) = take_str(bytes)?;
    let (key, _) = decode_channel(rest)?;
    Some((uid.to_owned(), key))
}

pub fn device_ack(uid: &str, device_id: &str, key: &ChannelKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + uid.len() + device_id.len() + key.id().len());
    push_str(&mut out, uid);
    push_str(&mut out, device_id);
    out.extend_from_slice(&channel(key));
    out
}

pub fn device_session(uid: &str, device_id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + uid.len() + device_id.len());
    push_str(&mut out, uid);
    push_str(&mut out, device_id);
    out
}

pub fn idempotency(uid: &str, client_msg_no: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + uid.len() + client_msg_no.len());
    push_str(&mut out, uid);
    push_str(&mut out, client_msg_no);
    out
}

pub fn webhook(shard: crate::ids::ShardId, id: u64) -> [u8; 10] {
    let mut out = [0u8; 10];
    out[..2].copy_from_slice(&shard.0.to_be_bytes());
    out[2..].copy_from_slice(&id.to_be_bytes());
    out
}

pub fn decode_webhook(bytes: &[u8]) -> Option<(crate::ids::ShardId, u64)> {
    let shard = u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?);
    let id = u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?);
    Some((crate::ids::ShardId(shard), id))
}

pub fn token(uid: &str, device_flag: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + uid.len());
    push_str(&mut out, uid);
    out.push(device_flag);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Uid;

    #[test]
    fn keys_round_trip() {
        let key = ChannelKey::person(&Uid::new("alice"), &Uid::new("bob"));
        let encoded = channel(&key);
        let (decoded, rest) = decode_channel(&encoded).unwrap();
        assert_eq!(decoded, key);
        assert!(rest.is_empty());
        assert_eq!(decode_message_seq(&message(&key, Seq(42))), Some(Seq(42)));
        assert_eq!(
            decode_member(&member(&key, "carol")).as_deref(),
            Some("carol")
        );
        let (uid, conv) = decode_conversation(&conversation("dave", &key)).unwrap();
        assert_eq!((uid.as_str(), conv), ("dave", key));
    }

    #[test]
    fn message_keys_sort_by_seq_and_one_channel_is_not_a_prefix_of_another() {
        let a = ChannelKey::group("g");
        let b = ChannelKey::group("g2");
        assert!(message(&a, Seq(2)) < message(&a, Seq(10)));
        assert!(message(&a, Seq(255)) < message(&a, Seq(256)));
        assert!(!message(&b, Seq(1)).starts_with(&channel(&a)));
        assert!(!conversation("ab", &a).starts_with(&conversations_of("a")));
    }
}
