//! Requests of the admin HTTP API to a shard, and their answers. The API
//! thread sends each to the shard that owns what it names (a channel's
//! owner, or every shard for a user's connections); the shard answers on the
//! request's own reply channel.

use crate::channel::ChannelKey;
use crate::ids::{Seq, Uid};
use crate::protocol::{Conversation, ConversationOp, Packet, ReasonCode, Recall, Recv, SendPacket};
use crate::storage::StoredMessage;
use std::sync::Arc;

#[derive(Debug)]
pub enum ApiRequest {
    /// A message from `from` (checked like a client's send unless `system`),
    /// to the channel's owner. Answered with the `SendAck` packet after the
    /// commit.
    Send {
        from: Uid,
        /// The sending device (empty: the API itself), stored with it.
        from_device: Arc<str>,
        system: bool,
        channel: ChannelKey,
        packet: SendPacket,
    },
    /// A change to `uid`'s conversation, to the channel's owner. Answered
    /// with the `ConversationOpResp` packet.
    ConversationOp {
        uid: Uid,
        channel: ChannelKey,
        op: ConversationOp,
    },
    /// A user's recall of their own message (a client's `Recall`, forwarded
    /// by the node of its connection), to the channel's owner. Answered
    /// with the `RecallResp` packet.
    ClientRecall {
        uid: Uid,
        channel: ChannelKey,
        recall: Recall,
    },
    /// An administrator's recall, to the channel's owner, by message id or
    /// by seq. Answered with the `RecallResp` packet.
    Recall {
        channel: ChannelKey,
        message_id: u64,
        message_seq: u64,
    },
    /// Messages of a channel as `uid` sees them.
    SyncMessages {
        uid: Uid,
        request: crate::protocol::SyncMessages,
    },
    /// `uid`'s conversations.
    SyncConversations {
        uid: Uid,
        request: crate::protocol::SyncConversations,
    },
    /// The message `(from_uid, client_msg_no)` names.
    MessageByClientMsgNo { from: Uid, client_msg_no: String },
    /// A group's members and lists, from its owner.
    ChannelInfo { channel: ChannelKey },
    /// Delete a group, at its owner.
    DeleteGroup { channel: ChannelKey },
    /// Close `uid`'s connections on this shard (of one device flag, or all).
    Kick { uid: Uid, device_flag: Option<u8> },
    /// Which of `uids` are online, on which device flags (any shard knows).
    Online { uids: Vec<Uid> },
}

/// A group as its owner knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelDetails {
    pub members: Vec<Uid>,
    pub allow: Vec<Uid>,
    pub deny: Vec<Uid>,
    pub last_seq: u64,
}

#[derive(Debug)]
pub enum ApiResponse {
    /// The packet a client would have got.
    Packet(Box<Packet>),
    Failed(ReasonCode),
    Messages(Vec<Recv>),
    Conversations {
        conversations: Vec<Conversation>,
        more: bool,
    },
    Message(Option<Arc<StoredMessage>>),
    Channel(ChannelDetails),
    /// A group was deleted: its messages through `through` are gone (a
    /// group created again under its id continues after it).
    Deleted {
        through: Seq,
    },
    Kicked(usize),
    /// Per uid, the device flags online (each once).
    Online(Vec<(Uid, Vec<u8>)>),
}

pub type ApiReply = async_channel::Sender<ApiResponse>;

/// The result of a group change, after it is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub group_id: String,
    pub members: Vec<String>,
    pub last_seq: u64,
}

/// Why a control request failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("group {0} does not exist")]
    NoSuchGroup(String),
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The cluster node owning the channel could not be reached or did not
    /// answer in time (retryable).
    #[error("the owning node is unavailable: {0}")]
    Unavailable(String),
}

pub type GroupReply = async_channel::Sender<Result<GroupInfo, ControlError>>;
pub type ListReply = async_channel::Sender<Result<Vec<String>, ControlError>>;

impl ApiRequest {
    /// The shard's own check of everything in the request that becomes a
    /// storage key (a key cannot hold an id of 64 KiB or more, whatever the
    /// API accepted).
    pub fn check_ids(&self, limits: &crate::config::Limits) -> Result<(), ReasonCode> {
        let uid = |uid: &Uid| {
            if crate::channel::valid_uid(uid.as_str(), limits.uid_length_max_bytes) {
                Ok(())
            } else {
                Err(ReasonCode::InvalidUid)
            }
        };
        let client_msg_no = |no: &str| {
            if no.len() <= limits.client_msg_no_length_max_bytes {
                Ok(())
            } else {
                Err(ReasonCode::InvalidClientMsgNo)
            }
        };
        match self {
            ApiRequest::Send { from, packet, .. } => {
                uid(from)?;
                client_msg_no(&packet.client_msg_no)
            }
            ApiRequest::ConversationOp { uid: u, .. }
            | ApiRequest::ClientRecall { uid: u, .. }
            | ApiRequest::SyncMessages { uid: u, .. }
            | ApiRequest::SyncConversations { uid: u, .. } => uid(u),
            ApiRequest::MessageByClientMsgNo {
                from,
                client_msg_no: no,
            } => {
                uid(from)?;
                client_msg_no(no)
            }
            _ => Ok(()),
        }
    }
}
