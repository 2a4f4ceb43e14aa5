//! The webhook events a commit batch writes with it (so an event exists
//! exactly when what it describes does): one `msg.notify` per
//! `notify_batch_max_messages` messages and recalls, one `msg.offline` per
//! message with offline recipients, one `user.onlinestatus` with the
//! presence transitions since the last commit, and the late `msg.offline`
//! events of users whose last connection closed owing them messages.

use super::commit::{InFlight, Pending};
use crate::ids::{ShardId, Uid};
use crate::storage::{Mutation, StoredMessage, WebhookRecord};
use crate::webhook::{
    notify_body, offline_body, online_status_body, WebhookWriter, EVENT_NOTIFY, EVENT_OFFLINE,
    EVENT_ONLINE_STATUS,
};
use std::sync::Arc;

/// Adds the events of `in_flight` to `mutations`, within the outbox's
/// limit (an event that does not fit is dropped and counted by the
/// writer). `offline_recipients` names a message's recipients with no
/// device online; `next_id` hands out event ids.
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_events(
    writer: &mut WebhookWriter,
    in_flight: &mut InFlight,
    offline_recipients: impl Fn(&StoredMessage) -> Vec<Uid>,
    next_id: impl FnMut() -> u64,
    shard: ShardId,
    unix_ms: u64,
    mutations: &mut Vec<Mutation>,
) {
    in_flight.presence_lines = std::mem::take(&mut writer.presence_lines);
    in_flight.late_offline = std::mem::take(&mut writer.late_offline);
    let mut events: Vec<(&'static str, Vec<u8>)> = Vec::new();
    if writer.notify {
        let messages: Vec<&StoredMessage> = in_flight
            .pending
            .iter()
            .filter_map(|p| match p {
                Pending::Send { message, .. } | Pending::Recall { message, .. } => Some(&**message),
                _ => None,
            })
            .collect();
        for chunk in messages.chunks(writer.batch_max) {
            events.push((EVENT_NOTIFY, notify_body(chunk.iter().copied())));
        }
    }
    if writer.offline {
        // Named as when the batch began, for a part of it written later.
        let saved = std::mem::take(&mut in_flight.offline);
        let mut named = Vec::with_capacity(in_flight.pending.len());
        for (i, p) in in_flight.pending.iter().enumerate() {
            let Pending::Send { message, .. } = p else {
                named.push(Vec::new());
                continue;
            };
            let to_uids = match saved.get(i) {
                Some(to_uids) => to_uids.clone(),
                None => offline_recipients(message),
            };
            if !to_uids.is_empty() {
                events.push((EVENT_OFFLINE, offline_body(message, &to_uids)));
            }
            named.push(to_uids);
        }
        in_flight.offline = named;
    }
    for body in &in_flight.late_offline {
        events.push((EVENT_OFFLINE, body.clone()));
    }
    if !in_flight.presence_lines.is_empty() {
        events.push((
            EVENT_ONLINE_STATUS,
            online_status_body(&in_flight.presence_lines),
        ));
    }
    let (count, bytes) = admit_events(writer, events, next_id, shard, unix_ms, mutations);
    in_flight.webhook_events += count;
    in_flight.webhook_bytes += bytes;
}

/// Admits `events` into the outbox (those over its bound are dropped and
/// counted) as rows of `shard`: returns how many and how many bytes.
fn admit_events(
    writer: &mut WebhookWriter,
    events: Vec<(&'static str, Vec<u8>)>,
    mut next_id: impl FnMut() -> u64,
    shard: ShardId,
    unix_ms: u64,
    mutations: &mut Vec<Mutation>,
) -> (u64, u64) {
    let (mut count, mut bytes) = (0, 0);
    for (event, body) in events {
        let record = WebhookRecord {
            event: event.to_owned(),
            body,
            created_ms: unix_ms,
        };
        if !writer.admit(&record) {
            continue;
        }
        count += 1;
        bytes += record.size();
        mutations.push(Mutation::Webhook {
            shard,
            id: next_id(),
            record: Arc::new(record),
        });
    }
    (count, bytes)
}

/// The events of messages this node wrote that reach the store from the
/// log instead of from their batch (its local write was lost to a crash):
/// `msg.notify` for all, `msg.offline` for sends to the recipients given.
/// Returns the events' count and bytes, admitted into the outbox.
pub(super) fn log_events(
    writer: &mut WebhookWriter,
    messages: &[(&StoredMessage, Vec<Uid>)],
    next_id: impl FnMut() -> u64,
    shard: ShardId,
    unix_ms: u64,
    mutations: &mut Vec<Mutation>,
) -> (u64, u64) {
    let mut events: Vec<(&'static str, Vec<u8>)> = Vec::new();
    if writer.notify && !messages.is_empty() {
        let all: Vec<&StoredMessage> = messages.iter().map(|(m, _)| *m).collect();
        for chunk in all.chunks(writer.batch_max) {
            events.push((EVENT_NOTIFY, notify_body(chunk.iter().copied())));
        }
    }
    if writer.offline {
        for (message, to_uids) in messages {
            if !message.recalled && !to_uids.is_empty() {
                events.push((EVENT_OFFLINE, offline_body(message, to_uids)));
            }
        }
    }
    admit_events(writer, events, next_id, shard, unix_ms, mutations)
}

/// The batch was written: its events may be posted.
pub(super) fn committed(writer: &WebhookWriter, in_flight: &InFlight) {
    if in_flight.webhook_events > 0 {
        writer.committed();
    }
}

/// The batch failed: its events' room in the outbox is given back, and its
/// presence transitions go with the next commit.
pub(super) fn failed(writer: &mut WebhookWriter, in_flight: &mut InFlight) {
    writer.release(in_flight.webhook_events, in_flight.webhook_bytes);
    let mut lines = std::mem::take(&mut in_flight.presence_lines);
    lines.append(&mut writer.presence_lines);
    writer.presence_lines = lines;
    let mut late = std::mem::take(&mut in_flight.late_offline);
    late.append(&mut writer.late_offline);
    writer.late_offline = late;
}

/// Whether events wait for a commit of their own (no other work needs
/// one).
pub(super) fn waiting(writer: &WebhookWriter) -> bool {
    !writer.presence_lines.is_empty() || !writer.late_offline.is_empty()
}

/// Queues a late `msg.offline` naming `uid` for each of `undelivered`
/// (their own messages and recalls left out). Returns whether any was
/// queued.
pub(super) fn queue_late_offline(
    writer: &mut WebhookWriter,
    uid: &Uid,
    undelivered: &[Arc<StoredMessage>],
) -> bool {
    let before = writer.late_offline.len();
    for message in undelivered {
        if message.from_uid == *uid || message.recalled {
            continue;
        }
        writer
            .late_offline
            .push(offline_body(message, std::slice::from_ref(uid)));
    }
    writer.late_offline.len() > before
}
