//! Answers from committed data: a stored message as a device receives it,
//! a conversation as its user sees it, conversation lists, message sync,
//! and the read position an unread count asks for.

use crate::channel::ChannelKey;
use crate::config::Limits;
use crate::ids::{MessageId, Seq, Uid};
use crate::protocol::{
    Conversation, ReasonCode, Recv, SyncConversations, SyncDirection, SyncMessages,
    RECV_FLAG_FROM_SELF, RECV_FLAG_RECALLED,
};
use crate::storage::{ConversationRecord, ReadDirection, ShardStore, StorageError, StoredMessage};

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

/// Messages of `key` as `uid` sees them, for a `SyncMessages` request
/// (checked here: range, limit, membership, the user's deletion point).
pub(super) fn sync_messages(
    store: &mut dyn ShardStore,
    limits: &Limits,
    uid: &Uid,
    key: &ChannelKey,
    request: &SyncMessages,
) -> Result<Vec<Recv>, ReasonCode> {
    let limit = request.limit;
    if limit == 0 || limit > limits.sync_limit_max {
        return Err(ReasonCode::InvalidRange);
    }
    let direction = match request.direction {
        SyncDirection::Up => {
            if request.start_seq == 0
                || (request.end_seq != 0 && request.end_seq <= request.start_seq)
            {
                return Err(ReasonCode::InvalidRange);
            }
            ReadDirection::Up
        }
        SyncDirection::Down => {
            if request.start_seq != 0 && request.end_seq >= request.start_seq {
                return Err(ReasonCode::InvalidRange);
            }
            ReadDirection::Down
        }
        _ => return Err(ReasonCode::InvalidRange),
    };
    let storage = |e: StorageError| {
        tracing::warn!(error = %e, "sync failed");
        ReasonCode::StorageError
    };
    if key.kind() == crate::protocol::ChannelType::Group {
        let record = store.channel_head(key).map_err(storage)?;
        if record.is_none_or(|r| r.deleted) {
            return Err(ReasonCode::ChannelMissing);
        }
        if !store.is_member(key, uid).map_err(storage)? {
            return Err(ReasonCode::NotMember);
        }
    }
    // A user who deleted the conversation sees only what came after.
    let floor = store
        .conversation(uid, key)
        .map_err(storage)?
        .map_or(0, |r| r.deleted_seq);
    let start = match (direction, request.start_seq) {
        (ReadDirection::Up, start) => Seq(start.max(floor + 1)),
        (ReadDirection::Down, 0) => Seq(u64::MAX),
        (ReadDirection::Down, start) => Seq(start),
    };
    let stored = store
        .read_messages(key, start, limit as usize, direction)
        .map_err(storage)?;
    let mut budget = limits.sync_response_max_bytes;
    let mut out = Vec::with_capacity(stored.len());
    for message in stored {
        let seq = message.seq.0;
        let past_end = request.end_seq != 0
            && match direction {
                ReadDirection::Up => seq >= request.end_seq,
                ReadDirection::Down => seq <= request.end_seq,
            };
        if past_end || seq <= floor {
            break;
        }
        let cost = message.payload.len() + 256;
        if cost > budget && !out.is_empty() {
            break;
        }
        budget = budget.saturating_sub(cost);
        out.push(recv_view(&message, uid));
    }
    Ok(out)
}

/// The read position that leaves exactly `unread` messages from others
/// above it (fewer if the conversation has fewer), and the user's own
/// messages above it.
pub(super) fn floor_for_unread(
    store: &mut dyn ShardStore,
    key: &ChannelKey,
    uid: &Uid,
    last: u64,
    unread: u64,
    deleted: u64,
) -> Result<(u64, u64), ReasonCode> {
    if unread == 0 {
        return Ok((last.max(deleted), 0));
    }
    let mut counted = 0;
    let mut own = 0;
    let mut next = last;
    while next > deleted {
        let page = store
            .read_messages(key, Seq(next), 256, ReadDirection::Down)
            .map_err(|_| ReasonCode::StorageError)?;
        if page.is_empty() {
            break;
        }
        for message in page {
            if message.seq.0 <= deleted {
                return Ok((deleted, own));
            }
            if message.from_uid == *uid {
                own += 1;
            } else {
                counted += 1;
                if counted == unread {
                    return Ok((message.seq.0 - 1, own));
                }
            }
            next = message.seq.0 - 1;
        }
    }
    Ok((deleted, own))
}

/// How a recall names its message.
pub(super) enum RecallBy<'a> {
    Id(MessageId),
    Seq(Seq),
    /// The sender's client_msg_no (found only in its channel).
    ClientMsgNo(&'a Uid, &'a str),
}

/// The stored message a recall of `key` names, or why not
/// (`message_missing`, `storage_error`).
pub(super) fn message_to_recall(
    store: &mut dyn ShardStore,
    key: &ChannelKey,
    by: RecallBy<'_>,
) -> Result<std::sync::Arc<StoredMessage>, ReasonCode> {
    let seq = match by {
        RecallBy::Seq(seq) => Ok(Some(seq)),
        RecallBy::Id(id) => store.find_message_id(key, id),
        RecallBy::ClientMsgNo(from, no) => store
            .find_idempotent(from, no, 0, u64::MAX)
            .map(|hit| hit.filter(|h| h.channel == *key).map(|h| h.seq)),
    };
    let message = match seq {
        Ok(Some(seq)) => store.message(key, seq),
        Ok(None) => Ok(None),
        Err(error) => Err(error),
    };
    match message {
        Err(_) => Err(ReasonCode::StorageError),
        Ok(None) => Err(ReasonCode::MessageMissing),
        Ok(Some(message)) => Ok(message),
    }
}
