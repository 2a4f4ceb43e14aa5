//! Answers from committed data: a stored message as a device receives it,
//! a conversation as its user sees it, and conversation lists.

use crate::channel::ChannelKey;
use crate::ids::{MessageId, Seq, Uid};
use crate::protocol::{
    Conversation, Recv, SyncConversations, RECV_FLAG_FROM_SELF, RECV_FLAG_RECALLED,
};
use crate::storage::{ConversationRecord, ShardStore, StorageError, StoredMessage};

/// A stored message as `viewer` receives it in a sync.
pub(super) fn recv_view(message: &StoredMessage, viewer: &Uid) -> Recv {
    let mut flags = 0;
    if message.from_uid == *viewer {
        flags |= RECV_FLAG_FROM_SELF;
    }
    if message.recalled {
        flags |= RECV_FLAG_RECALLED;
    }
    Recv {
        message_id: message.message_id.0,
        message_seq: message.seq.0,
        client_msg_no: message.client_msg_no.clone(),
        from_uid: message.from_uid.as_str().to_owned(),
        channel_id: message.channel.id_seen_by(viewer.as_str()).to_owned(),
        channel_type: message.channel.kind(),
        timestamp_ms: message.timestamp_ms,
        flags,
        send_flags: message.send_flags,
        payload: message.payload.clone(),
    }
}

/// A conversation as `uid` sees it, given the channel's committed state.
pub(super) fn build_conversation(
    store: &mut dyn ShardStore,
    uid: &Uid,
    key: &ChannelKey,
    record: &ConversationRecord,
    last_seq: Seq,
    last_message_id: MessageId,
) -> Option<Conversation> {
    let visible = record.visible(last_seq.0);
    let last_message = if visible {
        store
            .message(key, last_seq)
            .ok()
            .flatten()
            .map(|m| recv_view(&m, uid))
    } else {
        None
    };
    Some(Conversation {
        channel_id: key.id_seen_by(uid.as_str()).to_owned(),
        channel_type: key.kind(),
        unread: if visible {
            record.unread(last_seq.0)
        } else {
            0
        },
        version: record.version.max(last_message_id.0),
        last_message_seq: last_seq.0,
        last_message,
        deleted: !visible,
        read_seq: record.read_floor,
    })
}

/// The conversations of `uid` changed since the request's version and at
/// or below `closed` (changes above it come with a later sync: one below it
/// may still be committing), oldest change first. A full sync (version 0)
/// lists visible conversations only; an incremental one also reports
/// deletions.
pub(super) fn list_conversations(
    store: &mut dyn ShardStore,
    uid: &Uid,
    request: &SyncConversations,
    closed: u64,
    budget_bytes: usize,
) -> Result<(Vec<Conversation>, bool), StorageError> {
    let mut candidates = Vec::new();
    for (key, record) in store.conversations(uid)? {
        let Some(channel) = store.channel_head(&key)? else {
            continue;
        };
        let version = record.version.max(channel.last_message_id.0);
        let visible = record.visible(channel.last_seq.0);
        if version <= request.since_version || version > closed {
            continue;
        }
        if !visible && request.since_version == 0 {
            continue;
        }
        if request.unread_only && (!visible || record.unread(channel.last_seq.0) == 0) {
            continue;
        }
        candidates.push((
            version,
            key,
            record,
            channel.last_seq,
            channel.last_message_id,
        ));
    }
    candidates.sort_by_key(|c| c.0);
    let limit = request.limit as usize;
    let more = candidates.len() > limit;
    let mut out = Vec::new();
    let mut budget = budget_bytes;
    for (_, key, record, last_seq, last_message_id) in candidates.into_iter().take(limit) {
        if let Some(conversation) =
            build_conversation(store, uid, &key, &record, last_seq, last_message_id)
        {
            let cost = 256
                + conversation
                    .last_message
                    .as_ref()
                    .map_or(0, |m| m.payload.len());
            if cost > budget && !out.is_empty() {
                return Ok((out, true));
            }
            budget = budget.saturating_sub(cost);
            out.push(conversation);
        }
    }
    Ok((out, more))
}
