//! The one typed enum of cross-shard messages. Every payload is owned and
//! `Send`; immutable messages travel as `Arc` so a fan-out to many shards
//! copies nothing.

use crate::channel::ChannelKey;
use crate::ids::{ConnId, Seq, Uid};
use crate::protocol::{Conversation, ConversationOp, Packet, Recall, SendAck, SendPacket};
use crate::storage::StoredMessage;
use smallvec::SmallVec;
use std::sync::Arc;

/// Inboxes carry batches: one queue operation per batch, not per message.
pub type Batch = Vec<ShardMsg>;

#[derive(Debug)]
pub enum ShardMsg {
    /// A client's `Send`, from the shard of its connection to the channel's
    /// owner.
    Send {
        origin: ConnId,
        from: Uid,
        /// The sending device, stored with the message (see
        /// `StoredMessage::from_device`).
        from_device: std::sync::Arc<str>,
        channel: ChannelKey,
        packet: SendPacket,
        /// When its frame was read (the latency budget's clock).
        read_us: u64,
    },
    /// The owner's answer, back to the shard of the sending connection;
    /// for a stored message, when its frame was read and when it became
    /// durable (0: not timed).
    SendAck {
        conn: ConnId,
        ack: SendAck,
        read_us: u64,
        durable_us: u64,
    },
    /// A committed message for the listed members, who are online on the
    /// target shard. `skip` is the connection that sent it.
    Deliver {
        message: Arc<StoredMessage>,
        recipients: SmallVec<[Uid; 4]>,
        skip: Option<ConnId>,
        /// When the sender's frame was read and when the message became
        /// durable, on the budget's clock (0: not timed).
        read_us: u64,
        durable_us: u64,
    },
    /// A device of `uid` came online (or went offline) on `conn.shard()`.
    /// Broadcast to every shard.
    Presence {
        uid: Uid,
        device_id: Arc<str>,
        device_flag: u8,
        conn: ConnId,
        online: bool,
    },
    /// The receiver has applied the `Presence` that brought `conn` online.
    PresenceAck { conn: ConnId },
    /// A user's change to their conversation, to the channel's owner.
    ConversationOp {
        origin: ConnId,
        uid: Uid,
        channel: ChannelKey,
        op: ConversationOp,
    },
    /// A recall, to the channel's owner.
    Recall {
        origin: ConnId,
        uid: Uid,
        channel: ChannelKey,
        recall: Recall,
    },
    /// A response for one connection.
    Reply { conn: ConnId, packet: Box<Packet> },
    /// A group was deleted: its messages are gone, so pushes of them that
    /// wait for acknowledgement (or in a backlog) are dropped. Broadcast by
    /// the owner when the deletion is committed.
    ChannelDeleted { channel: ChannelKey, through: Seq },
    /// Members were removed from a group: what waits in storage for their
    /// connections there (a backlog) is dropped, so that a member added
    /// again is not pushed from it what was sent while they were out.
    /// Broadcast by the owner when the change is committed, after the
    /// messages before it were fanned out.
    MembersRemoved { channel: ChannelKey, uids: Vec<Uid> },
    /// One of `uid`'s conversations changed: tell their devices on the
    /// target shard, except `skip` (which got the response).
    ConversationUpdated {
        uid: Uid,
        skip: ConnId,
        conversation: Box<Conversation>,
    },
}
