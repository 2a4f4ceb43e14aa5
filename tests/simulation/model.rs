//! The reference model: what the gateway must have done, built from what
//! clients were told (acknowledgements, responses) and from the store,
//! which the checks read directly. It knows the rules (who may see which
//! seq, what a conversation shows, how unread is counted) and none of the
//! implementation.

use bytes::Bytes;
use ruyi::channel::ChannelKey;
use std::collections::{BTreeMap, BTreeSet};

/// One message a client sent (first attempt and resends alike).
#[derive(Debug, Clone)]
pub struct Sent {
    pub channel: ChannelKey,
    pub payload: Bytes,
    /// The place the gateway acknowledged, once it did.
    pub acked: Option<(u64, u64)>,
    /// Its group was deleted (with its messages) after it was sent.
    pub deleted: bool,
    /// The step its first attempt went out at.
    pub first_step: u64,
    /// When it was acknowledged: users the gateway certainly knew to be
    /// offline from before the send to the answer (its `msg.offline` must
    /// name those who are recipients), and users with a connection active
    /// throughout (it must not name them).
    pub offline_must: BTreeSet<String>,
    pub online_must: BTreeSet<String>,
}

/// A user's own allow and deny lists (who may write to them in person).
#[derive(Debug, Clone, Default)]
pub struct ListsModel {
    pub deny: BTreeSet<String>,
    pub allow: BTreeSet<String>,
    /// Changes sent and not answered.
    pub in_flight: usize,
    /// Counts every change and answer (as `GroupModel::epoch`).
    pub epoch: u64,
    /// A change's answer was lost in a crash: read back from the store.
    pub uncertain: bool,
    /// On a `[cluster]` run: where the log of the lists' partition stood
    /// when the last change was answered (or read back).
    pub log_through: u64,
}

/// Where a user's connections stood, as the gateway saw them, at the end
/// of each step so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct PresenceTrack {
    /// The step since which no shard has held a logged-in connection of
    /// the user and every shard has heard so (the inboxes were empty).
    pub offline_since: Option<u64>,
    /// The step since which the user has had an active connection (one
    /// whose presence every shard applied) without a break.
    pub active_since: Option<u64>,
}

/// A group's membership over its seqs: `history[i]` holds from the seq
/// after `cut` on.
#[derive(Debug, Clone, Default)]
pub struct GroupModel {
    pub exists: bool,
    pub members: BTreeSet<String>,
    /// For each current member, the seq after which they see messages.
    pub joined: BTreeMap<String, u64>,
    /// Members whose `joined` is a guess (a change that added them was lost
    /// in a crash and read back): the real join may lie below it.
    pub join_guessed: BTreeSet<String>,
    pub history: Vec<(u64, BTreeSet<String>)>,
    pub deny: BTreeSet<String>,
    pub allow: BTreeSet<String>,
    /// Control changes sent and not answered.
    pub in_flight: usize,
    /// A change's outcome was lost in a crash and has not been read back
    /// from the store: membership checks wait.
    pub uncertain: bool,
    /// Counts every change and answer: a send whose outcome depended on
    /// the lists is judged only if no change happened around it.
    pub epoch: u64,
    /// Counts deletions: a message sent before one is gone with it.
    pub generation: u64,
    /// Seqs up to here belonged to a deleted incarnation of the group: a
    /// copy read before the deletion may still arrive.
    pub deleted_through: u64,
    /// A delete's answer was lost in a crash: when the group is read back,
    /// whether the delete landed is judged by its messages.
    pub delete_lost: bool,
    /// Members a change whose answer was lost would have taken out: a
    /// later change may have put them back, and a member put back joins
    /// anew (sees only what comes after), so while the group is read back
    /// they count as newcomers.
    pub maybe_left: BTreeSet<String>,
}

impl GroupModel {
    /// Whether `uid` was a member for the message at `seq`; `None` when the
    /// model cannot tell.
    pub fn member_at(&self, uid: &str, seq: u64) -> Option<bool> {
        if self.uncertain {
            return None;
        }
        let mut member = None;
        for (cut, members) in &self.history {
            if *cut < seq {
                member = Some(members.contains(uid));
            }
        }
        member
    }
}

/// One user's view of one conversation, as the model tracks it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvModel {
    /// Everything at or below is read.
    pub read_cut: u64,
    /// Deleted up to here: hidden until a later message.
    pub delete_cut: u64,
    /// An operation's answer was lost: no unread check until the next one.
    pub uncertain: bool,
    /// Operations sent by any of the user's devices, numbered in the order
    /// they were sent.
    pub issued: u64,
    /// Operations sent and not answered (nor lost).
    pub in_flight: u32,
    /// An operation's answer was lost and it may still land (the shards
    /// have not been drained since).
    pub lost: bool,
}

#[derive(Default)]
pub struct Model {
    /// `(uid, client_msg_no)` → what was sent.
    pub sent: BTreeMap<(String, String), Sent>,
    /// `(channel, seq)` → `(message id, uid, client_msg_no)` as
    /// acknowledged or stored.
    pub places: BTreeMap<(ChannelKey, u64), (u64, String, String)>,
    pub groups: BTreeMap<String, GroupModel>,
    pub conversations: BTreeMap<(String, ChannelKey), ConvModel>,
    /// Channels anyone wrote to.
    pub channels: BTreeSet<ChannelKey>,
    /// Per uid.
    /// Per (node, uid): presence is known per node.
    pub presence: BTreeMap<(usize, String), PresenceTrack>,
    /// Per uid: their own lists.
    pub person_lists: BTreeMap<String, ListsModel>,
}
