//! Channels: identity, routing to the owning shard, sequencing and
//! membership.
//!
//! Every channel is owned by exactly one shard, `shard_of(key)`. The owner
//! assigns its message sequence numbers (1, 2, 3, ... with no gaps), holds its
//! member list and plans its fan-out. A person channel between A and B is one
//! log whichever of them sends: its key is the two uids in sorted order, and
//! each of them sees the other's uid as the channel id.

pub use crate::key::{ChannelKey, PERSON_KEY_SEPARATOR};

use crate::ids::{MessageId, Seq, Uid};
use crate::protocol::{ChannelType, ReasonCode};
use crate::storage::ConversationRecord;
use std::collections::HashSet;

/// Limits that ids are checked against.
#[derive(Debug, Clone, Copy)]
pub struct IdLimits {
    pub uid_length_max_bytes: usize,
    pub channel_id_length_max_bytes: usize,
}

/// Checks a uid (or device id): non-empty, within `max` bytes, no control
/// characters and no `@` (reserved for person channel keys).
pub fn valid_uid(uid: &str, max: usize) -> bool {
    !uid.is_empty()
        && uid.len() <= max
        && !uid
            .chars()
            .any(|c| c.is_control() || c == PERSON_KEY_SEPARATOR)
}

/// Resolves the channel a client addressed: `channel_id` as the sender sees
/// it (the other person's uid for a person channel).
pub fn resolve_target(
    sender: &Uid,
    channel_id: &str,
    channel_type: ChannelType,
    limits: &IdLimits,
) -> Result<ChannelKey, ReasonCode> {
    match channel_type {
        ChannelType::Person => {
            if !valid_uid(channel_id, limits.uid_length_max_bytes) || channel_id == sender.as_str()
            {
                return Err(ReasonCode::InvalidChannel);
            }
            Ok(ChannelKey::person(sender, &Uid::new(channel_id)))
        }
        ChannelType::Group => {
            if channel_id.is_empty()
                || channel_id.len() > limits.channel_id_length_max_bytes
                || channel_id.chars().any(char::is_control)
            {
                return Err(ReasonCode::InvalidChannel);
            }
            Ok(ChannelKey::group(channel_id))
        }
        _ => Err(ReasonCode::InvalidChannel),
    }
}

pub type MemberSet = HashSet<Uid, ahash::RandomState>;

/// Who belongs to a channel.
#[derive(Debug, Clone)]
pub enum Members {
    /// The two people of a person channel.
    Person([Uid; 2]),
    Group(MemberSet),
}

impl Members {
    pub fn contains(&self, uid: &Uid) -> bool {
        match self {
            Members::Person(pair) => pair.contains(uid),
            Members::Group(set) => set.contains(uid),
        }
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = &Uid> + '_> {
        match self {
            Members::Person(pair) => Box::new(pair.iter()),
            Members::Group(set) => Box::new(set.iter()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Members::Person(_) => 2,
            Members::Group(set) => set.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A membership change whose place in the channel's order is after `after`,
/// kept until every message at or before it is stored: those messages are
/// fanned out to the members they had.
#[derive(Debug, Clone)]
pub struct MembershipChange {
    pub after: Seq,
    pub added: Vec<Uid>,
    pub removed: Vec<Uid>,
}

/// A channel as its owning shard holds it.
#[derive(Debug, Clone)]
pub struct Channel {
    pub key: ChannelKey,
    /// The last sequence number handed out (committed or in the batch being
    /// committed).
    pub last_seq: Seq,
    /// The last sequence number known to be stored.
    pub committed_seq: Seq,
    /// The id of the message at `committed_seq` (0 when there is none).
    pub last_message_id: MessageId,
    /// The id of the message at `last_seq`, committed or not.
    pub assigned_message_id: MessageId,
    /// Seqs handed out and not yet stored, with their senders: a user's own
    /// messages in flight count as read when they clear their unread.
    pub uncommitted: Vec<(Seq, Uid)>,
    pub members: Members,
    /// A group's allow list (when non-empty, only these may send) and deny
    /// list (these may never send). Person channels use the recipient's
    /// own lists, kept in storage.
    pub allow: MemberSet,
    pub deny: MemberSet,
    /// Conversation rows of this channel's users that the owner has read or
    /// written: the owner is their only writer, so this copy is current.
    pub conversations: std::collections::HashMap<Uid, ConversationRecord, ahash::RandomState>,
    /// When the owner last used it (a counter of the owner's): the least
    /// recently used idle channels are dropped from memory first.
    pub last_used: u64,
    /// Membership changes queued after messages that are not stored yet.
    pub recent_changes: Vec<MembershipChange>,
}

impl Channel {
    /// A person channel that has no messages yet.
    pub fn new_person(key: ChannelKey) -> Channel {
        let (low, high) = key
            .person_pair()
            .expect("new_person is only called with person keys");
        let members = Members::Person([Uid::new(low), Uid::new(high)]);
        Channel {
            key,
            last_seq: Seq(0),
            committed_seq: Seq(0),
            last_message_id: MessageId(0),
            assigned_message_id: MessageId(0),
            uncommitted: Vec::new(),
            members,
            allow: MemberSet::default(),
            deny: MemberSet::default(),
            conversations: Default::default(),
            last_used: 0,
            recent_changes: Vec::new(),
        }
    }

    pub fn new_group(
        key: ChannelKey,
        members: impl IntoIterator<Item = Uid>,
        last_seq: Seq,
    ) -> Channel {
        Channel {
            key,
            last_seq,
            committed_seq: last_seq,
            last_message_id: MessageId(0),
            assigned_message_id: MessageId(0),
            uncommitted: Vec::new(),
            members: Members::Group(members.into_iter().collect()),
            allow: MemberSet::default(),
            deny: MemberSet::default(),
            conversations: Default::default(),
            last_used: 0,
            recent_changes: Vec::new(),
        }
    }

    /// Hands out the next sequence number to a message of `from`, whose id
    /// is `message_id`.
    pub fn assign_seq(&mut self, from: &Uid, message_id: MessageId) -> Seq {
        self.last_seq = self.last_seq.next();
        self.assigned_message_id = message_id;
        self.uncommitted.push((self.last_seq, from.clone()));
        self.last_seq
    }

    /// Gives back the seq just handed out (its message was refused before
    /// it was queued).
    pub fn unassign_last(&mut self) {
        if let Some((seq, _)) = self.uncommitted.pop() {
            debug_assert_eq!(seq, self.last_seq);
            self.last_seq = Seq(seq.0 - 1);
        }
    }

    /// Records that everything up to `seq` is stored; `message_id` is the
    /// message at `seq`.
    pub fn mark_committed(&mut self, seq: Seq, message_id: MessageId) {
        assert!(
            seq <= self.last_seq,
            "{:?}: seq {} committed beyond the last assigned, {}",
            self.key,
            seq.0,
            self.last_seq.0
        );
        if seq > self.committed_seq {
            self.committed_seq = seq;
            self.last_message_id = message_id;
        }
        self.uncommitted.retain(|(s, _)| *s > seq);
        // A change after exactly `committed` is still needed: the message
        // at `committed` is fanned out after this.
        let committed = self.committed_seq;
        self.recent_changes.retain(|c| c.after >= committed);
    }

    /// Records a membership change at its place: after the last seq handed
    /// out.
    pub fn record_change(&mut self, added: Vec<Uid>, removed: Vec<Uid>) {
        if added.is_empty() && removed.is_empty() {
            return;
        }
        if self.last_seq > self.committed_seq {
            self.recent_changes.push(MembershipChange {
                after: self.last_seq,
                added,
                removed,
            });
        }
    }

    /// The members the message at `seq` is for: today's, with the changes
    /// queued after it undone.
    pub fn members_at(&self, seq: Seq) -> Vec<Uid> {
        let mut members: Vec<Uid> = self.members.iter().cloned().collect();
        for change in self.recent_changes.iter().rev() {
            if change.after < seq {
                break;
            }
            members.retain(|uid| !change.added.contains(uid));
            members.extend(change.removed.iter().cloned());
        }
        members.sort();
        members.dedup();
        members
    }

    /// Whether membership changed after `seq` in a way not yet settled.
    pub fn changed_after(&self, seq: Seq) -> bool {
        self.recent_changes.last().is_some_and(|c| c.after >= seq)
    }

    /// Where `uid` has read (or deleted) up to when they clear (or delete)
    /// now: everything stored, and their own messages right after it that
    /// are still being stored; with the number of their own messages above
    /// that (behind someone else's that they have not seen). Never below
    /// `floor`, the row's deletion point: a member who joined behind
    /// messages still being stored sees nothing at or below the join, and a
    /// clear must not bring those messages back.
    pub fn read_point(&self, uid: &Uid, floor: Seq) -> (Seq, u64) {
        let mut point = self.committed_seq.max(floor);
        let mut own_above = 0;
        for (seq, sender) in &self.uncommitted {
            if sender != uid || *seq <= point {
                continue;
            }
            if *seq == point.next() && own_above == 0 {
                point = *seq;
            } else {
                own_above += 1;
            }
        }
        (point, own_above)
    }

    /// `uid`'s own messages handed a seq and not stored yet.
    pub fn own_uncommitted(&self, uid: &Uid) -> u64 {
        self.uncommitted.iter().filter(|(_, u)| u == uid).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn person_channel_is_the_same_from_both_sides() {
        let a = Uid::new("alice");
        let b = Uid::new("bob");
        let key = ChannelKey::person(&a, &b);
        assert_eq!(key, ChannelKey::person(&b, &a));
        assert_eq!(key.id_seen_by("alice"), "bob");
        assert_eq!(key.id_seen_by("bob"), "alice");
        assert_eq!(key.shard(7), ChannelKey::person(&b, &a).shard(7));
    }

    #[test]
    fn routing_spreads_channels_over_every_shard() {
        let mut seen = [0usize; 4];
        for i in 0..1000 {
            seen[ChannelKey::group(&format!("g{i}")).shard(4).index()] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
    }

    /// A seq taken back (its message refused before it was queued) is
    /// handed out again: no gap. (After a failed commit the shard drops the
    /// channel and reads it again from storage: `tests/storage_errors.rs`.)
    #[test]
    fn a_seq_taken_back_is_handed_out_again_with_no_gap() {
        let mut channel = Channel::new_person(ChannelKey::person(&"a".into(), &"b".into()));
        let a = Uid::new("a");
        assert_eq!(channel.assign_seq(&a, MessageId(10)), Seq(1));
        channel.mark_committed(Seq(1), MessageId(10));
        assert_eq!(channel.assign_seq(&a, MessageId(11)), Seq(2));
        assert_eq!(channel.own_uncommitted(&a), 1);
        channel.unassign_last();
        assert_eq!(channel.own_uncommitted(&a), 0);
        assert_eq!(channel.assign_seq(&a, MessageId(12)), Seq(2));
    }

    #[test]
    fn bad_targets_are_refused() {
        let limits = IdLimits {
            uid_length_max_bytes: 8,
            channel_id_length_max_bytes: 8,
        };
        let me = Uid::new("me");
        assert_eq!(
            resolve_target(&me, "me", ChannelType::Person, &limits),
            Err(ReasonCode::InvalidChannel)
        );
        assert_eq!(
            resolve_target(&me, "a@b", ChannelType::Person, &limits),
            Err(ReasonCode::InvalidChannel)
        );
        assert_eq!(
            resolve_target(&me, "123456789", ChannelType::Group, &limits),
            Err(ReasonCode::InvalidChannel)
        );
        assert_eq!(
            resolve_target(&me, "g", ChannelType(9), &limits),
            Err(ReasonCode::InvalidChannel)
        );
        assert!(resolve_target(&me, "you", ChannelType::Person, &limits).is_ok());
    }
}
