//! Owned channels: the channels that hash to this shard, held in memory by
//! recency within `channels_cached_per_shard_max` and read back from
//! storage when used again, with their members, allow and deny lists,
//! sequencing, the conversation rows the owner writes, and the groups whose
//! deletion is being committed.
//!
//! It reads storage (the dispatcher hands it the store) and never writes
//! it: what it decides is queued for the commit by the dispatcher.

use super::api::ControlError;
use super::reads::floor_for_unread;
use crate::channel::{Channel, ChannelKey, MemberSet, Members};
use crate::ids::{MessageId, Seq, Uid};
use crate::protocol::{ChannelType, ConversationAction, ConversationOp, ReasonCode};
use crate::storage::{
    user_list_key, ConversationRecord, ListKind, ShardStore, StorageError, StoredMessage,
};
use std::collections::{HashMap, HashSet};

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// Channels with work queued or being committed: never dropped from
/// memory meanwhile.
pub(super) type Busy<'a> = HashSet<&'a ChannelKey, ahash::RandomState>;

pub(super) struct OwnedChannels {
    channels: FastMap<ChannelKey, Channel>,
    /// Counts uses of channels, for evicting the least recently used.
    clock: u64,
    /// Groups deleted in a commit that is not finished: they take no sends.
    /// Their last seq and message id, where a group created again starts.
    deleting: FastMap<ChannelKey, (Seq, MessageId)>,
    cached_max: usize,
    group_members_max: usize,
    /// Channels dropped from memory, counted.
    pub evicted: u64,
}

/// A group's state when its deletion was queued.
pub(super) struct Deleted {
    pub members: Vec<Uid>,
    pub last_seq: Seq,
    pub last_message_id: MessageId,
}

impl OwnedChannels {
    pub fn new(cached_max: usize, group_members_max: usize) -> OwnedChannels {
        OwnedChannels {
            channels: FastMap::default(),
            clock: 0,
            deleting: FastMap::default(),
            cached_max,
            group_members_max,
            evicted: 0,
        }
    }

    /// Channels held in memory.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// Whether more channels are held than `channels_cached_per_shard_max`.
    pub fn over_limit(&self) -> bool {
        self.channels.len() > self.cached_max
    }

    /// Channels held in memory that cannot be dropped now: uncommitted
    /// messages, or work queued or being committed (`busy`).
    pub fn busy_count(&self, busy: &Busy<'_>) -> usize {
        self.channels
            .iter()
            .filter(|(key, channel)| !channel.uncommitted.is_empty() || busy.contains(key))
            .count()
    }

    /// The channel in memory, if it is.
    pub fn get(&self, key: &ChannelKey) -> Option<&Channel> {
        self.channels.get(key)
    }

    /// The channel in memory, if it is.
    pub fn get_mut(&mut self, key: &ChannelKey) -> Option<&mut Channel> {
        self.channels.get_mut(key)
    }

    /// Finds or loads a channel. A person channel exists as soon as someone
    /// writes to it; a group must have been created (and not deleted). A
    /// group comes with its allow and deny lists. `busy` is what may not be
    /// evicted to make room.
    pub fn load(
        &mut self,
        key: &ChannelKey,
        store: &mut dyn ShardStore,
        busy: impl FnOnce() -> Vec<ChannelKey>,
    ) -> Result<Option<&mut Channel>, ReasonCode> {
        if !self.channels.contains_key(key) {
            // A group whose deletion is being committed is gone, unless it
            // was created again since (then it is in memory).
            if !self.deleting.is_empty() && self.deleting.contains_key(key) {
                return Ok(None);
            }
            let storage = |error: StorageError| {
                tracing::warn!(channel = ?key, %error, "loading channel failed");
                ReasonCode::StorageError
            };
            let record = store.load_channel(key).map_err(storage)?;
            let mut channel = match (key.kind(), record) {
                (ChannelType::Person, record) => {
                    let mut channel = Channel::new_person(key.clone());
                    if let Some(record) = record {
                        channel.last_seq = record.last_seq;
                        channel.committed_seq = record.last_seq;
                        channel.last_message_id = record.last_message_id;
                        channel.assigned_message_id = record.last_message_id;
                    }
                    channel
                }
                (_, Some(record)) => match record.members {
                    Some(members) if !record.deleted => {
                        let mut channel = Channel::new_group(key.clone(), members, record.last_seq);
                        channel.last_message_id = record.last_message_id;
                        channel.assigned_message_id = record.last_message_id;
                        channel
                    }
                    _ => return Ok(None),
                },
                (_, None) => return Ok(None),
            };
            if key.kind() == ChannelType::Group {
                for kind in [ListKind::Allow, ListKind::Deny] {
                    let uids = store
                        .list(key, kind, self.group_members_max)
                        .map_err(storage)?;
                    let set = uids.into_iter().collect();
                    match kind {
                        ListKind::Allow => channel.allow = set,
                        ListKind::Deny => channel.deny = set,
                    }
                }
            }
            self.insert(key, channel, busy);
        }
        self.clock += 1;
        let clock = self.clock;
        let channel = self.channels.get_mut(key);
        if let Some(channel) = channel {
            channel.last_used = clock;
            return Ok(Some(channel));
        }
        Ok(None)
    }

    /// Holds `channel` in memory, dropping idle ones beyond the limit.
    pub fn insert(
        &mut self,
        key: &ChannelKey,
        channel: Channel,
        busy: impl FnOnce() -> Vec<ChannelKey>,
    ) {
        self.channels.insert(key.clone(), channel);
        if self.over_limit() {
            let busy = busy();
            let mut set: Busy<'_> = busy.iter().collect();
            set.insert(key);
            self.evict(&set);
        }
    }

    /// Drops the least recently used tenth of the channels held in memory,
    /// of those with nothing uncommitted and not `busy` (their state is all
    /// in storage, read again when next used). Also run when a commit
    /// finishes: channels that were busy when the cache filled up are idle
    /// now.
    pub fn evict(&mut self, busy: &Busy<'_>) {
        let mut idle: Vec<(u64, ChannelKey)> = self
            .channels
            .iter()
            .filter(|(key, channel)| channel.uncommitted.is_empty() && !busy.contains(key))
            .map(|(key, channel)| (channel.last_used, key.clone()))
            .collect();
        let excess = (self.channels.len() - self.cached_max * 9 / 10).min(idle.len());
        if excess == 0 {
            return;
        }
        idle.select_nth_unstable_by_key(excess - 1, |(used, _)| *used);
        for (_, key) in idle.into_iter().take(excess) {
            self.channels.remove(&key);
        }
        self.evicted += excess as u64;
    }

    /// Forgets every channel: what they held (seqs handed out, members and
    /// lists changed, rows) was queued and failed; they are read again from
    /// what is stored.
    pub fn clear(&mut self) {
        self.channels.clear();
    }

    /// Forgets one channel (a cluster node applied another node's change
    /// to it); it is read again from storage when next needed.
    pub fn forget(&mut self, key: &ChannelKey) {
        self.channels.remove(key);
    }

    /// Where a group created under `key` starts: after the last seq of a
    /// deleted group of the same id (its tombstone, or a delete still being
    /// committed), else at 0. Seqs are never reused.
    pub fn group_base(
        &self,
        key: &ChannelKey,
        store: &mut dyn ShardStore,
    ) -> Result<(Seq, MessageId), StorageError> {
        if let Some(base) = self.deleting.get(key) {
            return Ok(*base);
        }
        Ok(store
            .channel_head(key)?
            .map_or((Seq(0), MessageId(0)), |head| {
                (head.last_seq, head.last_message_id)
            }))
    }

    /// A group's deletion is queued: it leaves memory and takes nothing
    /// until the deletion is committed (or fails). Its members and last
    /// place, for the tombstone.
    pub fn start_deleting(
        &mut self,
        key: &ChannelKey,
        store: &mut dyn ShardStore,
        busy: impl FnOnce() -> Vec<ChannelKey>,
    ) -> Result<Option<Deleted>, ReasonCode> {
        let deleted = match self.load(key, store, busy)? {
            None => return Ok(None),
            Some(group) => Deleted {
                members: group.members.iter().cloned().collect(),
                last_seq: group.last_seq,
                last_message_id: group.assigned_message_id,
            },
        };
        self.channels.remove(key);
        self.deleting
            .insert(key.clone(), (deleted.last_seq, deleted.last_message_id));
        Ok(Some(deleted))
    }

    /// A deletion of `key` was committed or failed. Unless another deletion
    /// of it is queued (`again`), it is no longer being deleted.
    pub fn deletion_done(&mut self, key: &ChannelKey, again: bool) {
        if !again {
            self.deleting.remove(key);
        }
    }

    /// Whether `key` is a group whose deletion is being committed (and not
    /// created again since): what asks for it waits for the deletion.
    pub fn waits_for_deletion(&self, key: &ChannelKey) -> bool {
        !self.deleting.is_empty()
            && self.deleting.contains_key(key)
            && !self.channels.contains_key(key)
    }

    /// Whether a group deletion being committed erases the message at
    /// `seq` of `key` (a group created again since keeps its new ones).
    pub fn being_deleted(&self, key: &ChannelKey, seq: Seq) -> bool {
        self.deleting
            .get(key)
            .is_some_and(|(through, _)| seq <= *through)
    }

    /// Calls `each` with every member `message` was for: a membership
    /// change queued after it (and committed with or before it) does not
    /// apply. Nobody if the channel is not in memory.
    pub fn for_each_recipient(&self, message: &StoredMessage, mut each: impl FnMut(&Uid)) {
        let Some(channel) = self.channels.get(&message.channel) else {
            return;
        };
        if channel.changed_after(message.seq) {
            for uid in &channel.members_at(message.seq) {
                each(uid);
            }
        } else {
            for uid in channel.members.iter() {
                each(uid);
            }
        }
    }

    /// The row of `uid` in `key`, from the copy in memory or storage.
    pub fn row(
        &mut self,
        key: &ChannelKey,
        uid: &Uid,
        store: &mut dyn ShardStore,
    ) -> Result<Option<ConversationRecord>, ReasonCode> {
        // A member removed from a group has no row, even before the removal
        // is stored (what storage still holds must not be written back).
        if self
            .channels
            .get(key)
            .is_some_and(|c| !c.members.contains(uid))
        {
            return Ok(None);
        }
        if let Some(record) = self
            .channels
            .get(key)
            .and_then(|c| c.conversations.get(uid))
        {
            return Ok(Some(*record));
        }
        let record = store.conversation(uid, key).map_err(|error| {
            tracing::warn!(%error, "loading a conversation failed");
            ReasonCode::StorageError
        })?;
        if let (Some(record), Some(channel)) = (record, self.channels.get_mut(key)) {
            channel.conversations.insert(uid.clone(), record);
        }
        Ok(record)
    }

    /// The conversation rows a new message at `seq` writes: the sender's
    /// own count, and for a channel's first message a row for every member.
    pub fn rows_for_message(
        &mut self,
        key: &ChannelKey,
        from: &Uid,
        seq: Seq,
        message_id: MessageId,
        store: &mut dyn ShardStore,
    ) -> Result<Vec<(Uid, ConversationRecord)>, ReasonCode> {
        let mut rows = Vec::new();
        if seq == Seq(1) {
            let members: Vec<Uid> = self
                .channels
                .get(key)
                .map(|c| c.members.iter().filter(|u| *u != from).cloned().collect())
                .unwrap_or_default();
            for uid in members {
                let record = ConversationRecord {
                    version: message_id.0,
                    ..ConversationRecord::default()
                };
                rows.push((uid, record));
            }
        }
        let mut own = self.row(key, from, store)?.unwrap_or(ConversationRecord {
            read_floor: seq.0 - 1,
            ..ConversationRecord::default()
        });
        own.own_above_floor += 1;
        own.version = message_id.0;
        rows.push((from.clone(), own));
        self.keep_rows(key, &rows);
        Ok(rows)
    }

    /// Keeps `rows` in the channel's copy (they are queued for the commit).
    pub fn keep_rows(&mut self, key: &ChannelKey, rows: &[(Uid, ConversationRecord)]) {
        if let Some(channel) = self.channels.get_mut(key) {
            for (uid, record) in rows {
                channel.conversations.insert(uid.clone(), *record);
            }
        }
    }
}

/// A group change, applied in memory and ready to be queued.
pub(super) struct GroupChange {
    /// The members after it, sorted.
    pub members: Vec<Uid>,
    /// The place it falls after (members who join see what comes after it).
    pub last_seq: Seq,
    pub last_message_id: MessageId,
    /// Rows for members who join a group that has messages.
    pub rows: Vec<(Uid, ConversationRecord)>,
    /// Members it takes out, sorted: their rows go.
    pub removed: Vec<Uid>,
}

impl OwnedChannels {
    /// Applies a change of `key`'s members now, at its place in the group's
    /// order: sends that reach the owner after it are checked against the
    /// new members. `Replace` creates a group that does not exist (after
    /// the last seq of a deleted one of the same id). `version` stamps the
    /// rows of members who join a group that already has messages.
    pub fn change_group(
        &mut self,
        key: &ChannelKey,
        uids: Vec<Uid>,
        change: SetChange,
        version: impl FnOnce() -> u64,
        store: &mut dyn ShardStore,
        busy: impl Fn() -> Vec<ChannelKey>,
    ) -> Result<GroupChange, ControlError> {
        let current = match self.load(key, store, &busy) {
            Err(_) => return Err(ControlError::Storage("loading group failed".into())),
            Ok(None) => None,
            Ok(Some(channel)) => match &channel.members {
                Members::Group(set) => {
                    Some((set.clone(), channel.last_seq, channel.assigned_message_id))
                }
                Members::Person(_) => unreachable!("group keys never load person channels"),
            },
        };
        let (previous, last_seq, last_message_id) = match (change, current) {
            (SetChange::Replace, None) => match self.group_base(key, store) {
                Ok((seq, id)) => (None, seq, id),
                Err(error) => return Err(ControlError::Storage(error.to_string())),
            },
            (_, None) => return Err(ControlError::NoSuchGroup(key.id().to_owned())),
            (_, Some((set, seq, id))) => (Some(set), seq, id),
        };
        let created = previous.is_none();
        let previous = previous.unwrap_or_default();
        let members = apply_set_change(previous.clone(), uids, change);
        if members.len() > self.group_members_max {
            return Err(ControlError::Invalid(format!(
                "{} members exceeds limits.group_members_max = {}",
                members.len(),
                self.group_members_max
            )));
        }
        // A member who joins a channel that already has messages gets a
        // conversation that is hidden and read up to now: it appears with
        // the next message. (Before the first message there is no row: the
        // first message writes one for every member.)
        let version = version();
        let rows: Vec<(Uid, ConversationRecord)> = if last_seq.0 == 0 {
            Vec::new()
        } else {
            members
                .iter()
                .filter(|uid| !previous.contains(*uid))
                .map(|uid| {
                    let record = ConversationRecord {
                        read_floor: last_seq.0,
                        deleted_seq: last_seq.0,
                        own_above_floor: 0,
                        version,
                    };
                    (uid.clone(), record)
                })
                .collect()
        };
        // A member who leaves loses the conversation: nothing committed
        // after the removal may show in their list, their resume, or an
        // answer to a change of it.
        let mut removed: Vec<Uid> = previous
            .iter()
            .filter(|uid| !members.contains(*uid))
            .cloned()
            .collect();
        removed.sort();
        if created {
            let mut channel = Channel::new_group(key.clone(), members.iter().cloned(), last_seq);
            channel.last_message_id = last_message_id;
            channel.assigned_message_id = last_message_id;
            self.insert(key, channel, &busy);
        }
        if let Some(channel) = self.channels.get_mut(key) {
            let added: Vec<Uid> = members
                .iter()
                .filter(|uid| !previous.contains(*uid))
                .cloned()
                .collect();
            channel.record_change(added, removed.clone());
            channel.members = Members::Group(members.clone());
            for (uid, record) in &rows {
                channel.conversations.insert(uid.clone(), *record);
            }
            for uid in &removed {
                channel.conversations.remove(uid);
            }
        }
        let mut members: Vec<Uid> = members.into_iter().collect();
        members.sort();
        Ok(GroupChange {
            members,
            last_seq,
            last_message_id,
            rows,
            removed,
        })
    }

    /// Applies a change to an allow or deny list now: a group's (`key` is
    /// the group; sends checked after it see the new list) or a user's own,
    /// for person channels (`key` is [`user_list_key`], read from storage).
    /// Returns the list after it, sorted.
    pub fn change_list(
        &mut self,
        key: &ChannelKey,
        kind: ListKind,
        uids: Vec<Uid>,
        change: SetChange,
        store: &mut dyn ShardStore,
        busy: impl FnOnce() -> Vec<ChannelKey>,
    ) -> Result<Vec<Uid>, ControlError> {
        let max = self.group_members_max;
        let current: MemberSet = if key.kind() == ChannelType::Group {
            match self.load(key, store, busy) {
                Err(_) => return Err(ControlError::Storage("loading group failed".into())),
                Ok(None) => return Err(ControlError::NoSuchGroup(key.id().to_owned())),
                Ok(Some(channel)) => match kind {
                    ListKind::Allow => channel.allow.clone(),
                    ListKind::Deny => channel.deny.clone(),
                },
            }
        } else {
            match store.list(key, kind, max) {
                Ok(list) => list.into_iter().collect(),
                Err(error) => return Err(ControlError::Storage(error.to_string())),
            }
        };
        let next = apply_set_change(current, uids, change);
        if next.len() > max {
            return Err(ControlError::Invalid(format!(
                "{} uids exceeds limits.group_members_max = {max}",
                next.len()
            )));
        }
        if let Some(channel) = self.channels.get_mut(key) {
            match kind {
                ListKind::Allow => channel.allow = next.clone(),
                ListKind::Deny => channel.deny = next.clone(),
            }
        }
        let mut uids: Vec<Uid> = next.into_iter().collect();
        uids.sort();
        Ok(uids)
    }
}

impl OwnedChannels {
    /// Applies a user's change to their conversation row in `key` (clear
    /// unread, delete, set an unread count) and returns the row to queue,
    /// stamped with `version`. The user's own messages still being
    /// committed count as read: a clear (or delete) right behind one's own
    /// send must not leave it unread (or bring the conversation back).
    #[allow(clippy::too_many_arguments)]
    pub fn change_conversation(
        &mut self,
        key: &ChannelKey,
        uid: &Uid,
        op: &ConversationOp,
        unread_max: u32,
        version: impl FnOnce() -> u64,
        store: &mut dyn ShardStore,
        busy: impl FnOnce() -> Vec<ChannelKey>,
    ) -> Result<ConversationRecord, ReasonCode> {
        let (last, own_in_flight) = match self.load(key, store, busy)? {
            None => return Err(ReasonCode::ChannelMissing),
            Some(channel) => (channel.committed_seq.0, channel.own_uncommitted(uid)),
        };
        let Some(mut record) = self.row(key, uid, store)? else {
            return Err(ReasonCode::ConversationMissing);
        };
        // Never below the row's deletion point: a member who joined behind
        // messages not stored yet has a row read and deleted up to the join,
        // above everything stored.
        let (point, own_above) = match self.channels.get(key) {
            Some(channel) => {
                let (point, own_above) = channel.read_point(uid, Seq(record.deleted_seq));
                (point.0, own_above)
            }
            None => return Err(ReasonCode::StorageError),
        };
        match op.action {
            ConversationAction::ClearUnread => {
                record.read_floor = point;
                record.own_above_floor = own_above;
            }
            ConversationAction::Delete => {
                record.deleted_seq = point;
                record.read_floor = point;
                record.own_above_floor = own_above;
            }
            ConversationAction::SetUnread => {
                if op.unread > u64::from(unread_max) {
                    return Err(ReasonCode::InvalidRange);
                }
                let (floor, own) =
                    floor_for_unread(store, key, uid, last, op.unread, record.deleted_seq)?;
                record.read_floor = floor;
                record.own_above_floor = own + own_in_flight;
            }
            _ => return Err(ReasonCode::InvalidRange),
        }
        record.version = version();
        if let Some(channel) = self.channels.get_mut(key) {
            channel.conversations.insert(uid.clone(), record);
        }
        Ok(record)
    }
}

/// For a person channel: the recipient's deny list always blocks; their
/// allow list applies when `allowlist_for_person` is on and it is not
/// empty. Read from storage: a user's lists live with the user, not with
/// any one channel.
pub(super) fn person_policy(
    store: &mut dyn ShardStore,
    key: &ChannelKey,
    from: &Uid,
    allowlist_for_person: bool,
) -> Result<(), ReasonCode> {
    let Some((low, high)) = key.person_pair() else {
        return Ok(());
    };
    let recipient = Uid::new(if low == from.as_str() { high } else { low });
    let lists = user_list_key(&recipient);
    let storage = |error: StorageError| {
        tracing::warn!(%error, "reading a user's lists failed");
        ReasonCode::StorageError
    };
    if store
        .list_contains(&lists, ListKind::Deny, from)
        .map_err(storage)?
    {
        return Err(ReasonCode::Denied);
    }
    if allowlist_for_person
        && !store
            .list(&lists, ListKind::Allow, 1)
            .map_err(storage)?
            .is_empty()
        && !store
            .list_contains(&lists, ListKind::Allow, from)
            .map_err(storage)?
    {
        return Err(ReasonCode::NotAllowed);
    }
    Ok(())
}

/// A change to a set of uids (a group's members, an allow or deny list),
/// from the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetChange {
    /// Create the group, or replace its members.
    Replace,
    Add,
    Remove,
}

/// `current` changed by `change` with `uids`.
fn apply_set_change(mut current: MemberSet, uids: Vec<Uid>, change: SetChange) -> MemberSet {
    match change {
        SetChange::Replace => uids.into_iter().collect(),
        SetChange::Add => {
            current.extend(uids);
            current
        }
        SetChange::Remove => {
            for uid in &uids {
                current.remove(uid);
            }
            current
        }
    }
}
