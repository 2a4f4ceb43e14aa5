//! Writes to a channel whose partition another node owns go to that node:
//! a client's send, conversation change or recall read on this node's
//! connection, and the admin API's writes made on this node. Each travels
//! as one NATS request on the partition's forward subject
//! (`cluster.forward_prefix.<partition>`), which only the owning node
//! subscribes to (no responders: nobody owns it right now, retryable), and
//! the owner answers with what its own connection or API caller would have
//! got.
//!
//! Order: one node's requests for one partition are published in order on
//! one connection and served in order by the owner (NATS keeps the order of
//! one publisher's messages on a subject), so a client's pipelined sends to
//! a channel are sequenced as it sent them.
//!
//! The format is postcard, with packets as their protocol frames; both
//! sides run the same build within a cluster's rolling upgrade window, and
//! the first byte is a version, refused with an error when unknown.

use super::record::WireKey;
use crate::ids::Uid;
use crate::key::ChannelKey;
use crate::protocol::{Encoder, Packet, ReasonCode, VerifyLimits, LENGTH_PREFIX_BYTES};
use crate::shard::api::{ApiRequest, ApiResponse, ChannelDetails, ControlError, GroupInfo};
use crate::shard::state::SetChange;
use crate::storage::ListKind;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The version of the forward format this build speaks.
pub const FORWARD_VERSION: u8 = 1;

/// A write for the owner of its channel's partition.
#[derive(Debug)]
pub enum Forward {
    /// An admin API request or a client's request, as the owner's shard
    /// serves it (see [`forwardable`]).
    Api(ApiRequest),
    /// A group's members.
    Group {
        group_id: String,
        uids: Vec<String>,
        change: SetChange,
    },
    /// An allow or deny list.
    List {
        key: ChannelKey,
        kind: ListKind,
        uids: Vec<String>,
        change: SetChange,
    },
}

/// The owner's answer to a [`Forward`].
#[derive(Debug)]
pub enum Answer {
    Api(ApiResponse),
    Group(Result<GroupInfo, ControlError>),
    List(Result<Vec<String>, ControlError>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("forward format version {0} is not one this build reads ({FORWARD_VERSION})")]
    UnknownVersion(u8),
    #[error("a forwarded request or answer that does not decode: {0}")]
    Corrupt(String),
    #[error("this request is served where it is made, not forwarded")]
    NotForwardable,
}

/// Whether `request` is a write (or a read of what only the owner knows)
/// that goes to the channel's owner; the rest is served by any node from
/// its own store.
pub fn forwardable(request: &ApiRequest) -> bool {
    matches!(
        request,
        ApiRequest::Send { .. }
            | ApiRequest::ConversationOp { .. }
            | ApiRequest::ClientRecall { .. }
            | ApiRequest::Recall { .. }
            | ApiRequest::ChannelInfo { .. }
            | ApiRequest::DeleteGroup { .. }
    )
}

/// The channel a forwardable request names.
pub fn channel_of(request: &ApiRequest) -> Option<&ChannelKey> {
    match request {
        ApiRequest::Send { channel, .. }
        | ApiRequest::ConversationOp { channel, .. }
        | ApiRequest::ClientRecall { channel, .. }
        | ApiRequest::Recall { channel, .. }
        | ApiRequest::ChannelInfo { channel }
        | ApiRequest::DeleteGroup { channel } => Some(channel),
        _ => None,
    }
}

/// What the client whose request was forwarded is told, from the owner's
/// encoded [`Answer`]: its packet, or the reason it failed (`ServerBusy`,
/// retryable, for an answer this build cannot read).
pub fn client_answer(bytes: &[u8], verify: &VerifyLimits) -> Result<Packet, ReasonCode> {
    match Answer::decode(bytes, verify) {
        Ok(Answer::Api(ApiResponse::Packet(packet))) => Ok(*packet),
        Ok(Answer::Api(ApiResponse::Failed(reason))) => Err(reason),
        Ok(other) => {
            tracing::warn!(?other, "a forwarded write got an answer of another kind");
            Err(ReasonCode::Unknown)
        }
        Err(error) => {
            tracing::warn!(%error, "a forwarded write's answer does not decode");
            Err(ReasonCode::ServerBusy)
        }
    }
}

#[derive(Serialize, Deserialize)]
enum WireForward {
    Send {
        from: String,
        from_device: String,
        system: bool,
        channel: WireKey,
        packet: Vec<u8>,
    },
    ConversationOp {
        uid: String,
        channel: WireKey,
        op: Vec<u8>,
    },
    ClientRecall {
        uid: String,
        channel: WireKey,
        recall: Vec<u8>,
    },
    Recall {
        channel: WireKey,
        message_id: u64,
        message_seq: u64,
    },
    ChannelInfo {
        channel: WireKey,
    },
    DeleteGroup {
        channel: WireKey,
    },
    Group {
        group_id: String,
        uids: Vec<String>,
        change: u8,
    },
    List {
        key: WireKey,
        kind: u8,
        uids: Vec<String>,
        change: u8,
    },
}

#[derive(Serialize, Deserialize)]
enum WireControlError {
    Invalid(String),
    NoSuchGroup(String),
    Storage(String),
    ShuttingDown,
    Unavailable(String),
}

#[derive(Serialize, Deserialize)]
enum WireAnswer {
    Packet(Vec<u8>),
    Failed(u16),
    Channel {
        members: Vec<String>,
        allow: Vec<String>,
        deny: Vec<String>,
        last_seq: u64,
    },
    Deleted(u64),
    Group(Result<(String, Vec<String>, u64), WireControlError>),
    List(Result<Vec<String>, WireControlError>),
}

fn frame(packet: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    Encoder::new().encode(packet, &mut out);
    out[LENGTH_PREFIX_BYTES..].to_vec()
}

fn unframe(bytes: Vec<u8>, limits: &VerifyLimits) -> Result<Packet, ForwardError> {
    Packet::decode(&Bytes::from(bytes), limits).map_err(|e| ForwardError::Corrupt(e.to_string()))
}

fn change_tag(change: SetChange) -> u8 {
    match change {
        SetChange::Replace => 0,
        SetChange::Add => 1,
        SetChange::Remove => 2,
    }
}

fn change_of(tag: u8) -> Result<SetChange, ForwardError> {
    match tag {
        0 => Ok(SetChange::Replace),
        1 => Ok(SetChange::Add),
        2 => Ok(SetChange::Remove),
        other => Err(ForwardError::Corrupt(format!("set change {other}"))),
    }
}

fn kind_of(tag: u8) -> Result<ListKind, ForwardError> {
    [ListKind::Allow, ListKind::Deny]
        .into_iter()
        .find(|kind| kind.tag() == tag)
        .ok_or_else(|| ForwardError::Corrupt(format!("list kind {tag}")))
}

/// A channel key from the wire, with an id storage can key.
fn key_of(wire: WireKey) -> Result<ChannelKey, ForwardError> {
    let key = ChannelKey::from(wire);
    if key.id().len() > super::record::ID_MAX_BYTES {
        return Err(ForwardError::Corrupt(
            "a channel id too long to store".into(),
        ));
    }
    Ok(key)
}

fn with_version<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_extend(value, vec![FORWARD_VERSION])
        .expect("forwards serialize into a Vec without fail")
}

fn without_version<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ForwardError> {
    let (&version, rest) = bytes
        .split_first()
        .ok_or_else(|| ForwardError::Corrupt("empty".into()))?;
    if version != FORWARD_VERSION {
        return Err(ForwardError::UnknownVersion(version));
    }
    postcard::from_bytes(rest).map_err(|e| ForwardError::Corrupt(e.to_string()))
}

/// [`Forward::Api`] of `request`, encoded (without taking it).
pub fn encode_request(request: &ApiRequest) -> Result<Vec<u8>, ForwardError> {
    Ok(with_version(&request_to_wire(request)?))
}

fn request_to_wire(request: &ApiRequest) -> Result<WireForward, ForwardError> {
    Ok(match request {
        ApiRequest::Send {
            from,
            from_device,
            system,
            channel,
            packet,
        } => WireForward::Send {
            from: from.as_str().to_owned(),
            from_device: from_device.to_string(),
            system: *system,
            channel: channel.into(),
            packet: frame(&Packet::Send(packet.clone())),
        },
        ApiRequest::ConversationOp { uid, channel, op } => WireForward::ConversationOp {
            uid: uid.as_str().to_owned(),
            channel: channel.into(),
            op: frame(&Packet::ConversationOp(op.clone())),
        },
        ApiRequest::ClientRecall {
            uid,
            channel,
            recall,
        } => WireForward::ClientRecall {
            uid: uid.as_str().to_owned(),
            channel: channel.into(),
            recall: frame(&Packet::Recall(recall.clone())),
        },
        ApiRequest::Recall {
            channel,
            message_id,
            message_seq,
        } => WireForward::Recall {
            channel: channel.into(),
            message_id: *message_id,
            message_seq: *message_seq,
        },
        ApiRequest::ChannelInfo { channel } => WireForward::ChannelInfo {
            channel: channel.into(),
        },
        ApiRequest::DeleteGroup { channel } => WireForward::DeleteGroup {
            channel: channel.into(),
        },
        _ => return Err(ForwardError::NotForwardable),
    })
}

impl Forward {
    pub fn encode(&self) -> Result<Vec<u8>, ForwardError> {
        let wire = match self {
            Forward::Api(request) => request_to_wire(request)?,
            Forward::Group {
                group_id,
                uids,
                change,
            } => WireForward::Group {
                group_id: group_id.clone(),
                uids: uids.clone(),
                change: change_tag(*change),
            },
            Forward::List {
                key,
                kind,
                uids,
                change,
            } => WireForward::List {
                key: key.into(),
                kind: kind.tag(),
                uids: uids.clone(),
                change: change_tag(*change),
            },
        };
        Ok(with_version(&wire))
    }

    /// Decodes a forward; its packets are verified under `limits`.
    pub fn decode(bytes: &[u8], limits: &VerifyLimits) -> Result<Forward, ForwardError> {
        let wire: WireForward = without_version(bytes)?;
        let wrong = |what: &str| ForwardError::Corrupt(format!("not a {what} packet"));
        Ok(match wire {
            WireForward::Send {
                from,
                from_device,
                system,
                channel,
                packet,
            } => match unframe(packet, limits)? {
                Packet::Send(packet) => Forward::Api(ApiRequest::Send {
                    from: Uid::new(&from),
                    from_device: Arc::from(from_device.as_str()),
                    system,
                    channel: key_of(channel)?,
                    packet,
                }),
                _ => return Err(wrong("Send")),
            },
            WireForward::ConversationOp { uid, channel, op } => match unframe(op, limits)? {
                Packet::ConversationOp(op) => Forward::Api(ApiRequest::ConversationOp {
                    uid: Uid::new(&uid),
                    channel: key_of(channel)?,
                    op,
                }),
                _ => return Err(wrong("ConversationOp")),
            },
            WireForward::ClientRecall {
                uid,
                channel,
                recall,
            } => match unframe(recall, limits)? {
                Packet::Recall(recall) => Forward::Api(ApiRequest::ClientRecall {
                    uid: Uid::new(&uid),
                    channel: key_of(channel)?,
                    recall,
                }),
                _ => return Err(wrong("Recall")),
            },
            WireForward::Recall {
                channel,
                message_id,
                message_seq,
            } => Forward::Api(ApiRequest::Recall {
                channel: key_of(channel)?,
                message_id,
                message_seq,
            }),
            WireForward::ChannelInfo { channel } => Forward::Api(ApiRequest::ChannelInfo {
                channel: key_of(channel)?,
            }),
            WireForward::DeleteGroup { channel } => Forward::Api(ApiRequest::DeleteGroup {
                channel: key_of(channel)?,
            }),
            WireForward::Group {
                group_id,
                uids,
                change,
            } => Forward::Group {
                group_id,
                uids,
                change: change_of(change)?,
            },
            WireForward::List {
                key,
                kind,
                uids,
                change,
            } => Forward::List {
                key: key_of(key)?,
                kind: kind_of(kind)?,
                uids,
                change: change_of(change)?,
            },
        })
    }
}

fn error_to_wire(error: &ControlError) -> WireControlError {
    match error {
        ControlError::Invalid(s) => WireControlError::Invalid(s.clone()),
        ControlError::NoSuchGroup(s) => WireControlError::NoSuchGroup(s.clone()),
        ControlError::Storage(s) => WireControlError::Storage(s.clone()),
        ControlError::ShuttingDown => WireControlError::ShuttingDown,
        ControlError::Unavailable(s) => WireControlError::Unavailable(s.clone()),
    }
}

fn error_from_wire(error: WireControlError) -> ControlError {
    match error {
        WireControlError::Invalid(s) => ControlError::Invalid(s),
        WireControlError::NoSuchGroup(s) => ControlError::NoSuchGroup(s),
        WireControlError::Storage(s) => ControlError::Storage(s),
        WireControlError::ShuttingDown => ControlError::ShuttingDown,
        WireControlError::Unavailable(s) => ControlError::Unavailable(s),
    }
}

fn names(uids: &[Uid]) -> Vec<String> {
    uids.iter().map(|u| u.as_str().to_owned()).collect()
}

fn uids(names: Vec<String>) -> Vec<Uid> {
    names.iter().map(|n| Uid::new(n)).collect()
}

impl Answer {
    pub fn encode(&self) -> Vec<u8> {
        let wire = match self {
            Answer::Api(response) => match response {
                ApiResponse::Packet(packet) => WireAnswer::Packet(frame(packet)),
                ApiResponse::Failed(reason) => WireAnswer::Failed(reason.0),
                ApiResponse::Channel(details) => WireAnswer::Channel {
                    members: names(&details.members),
                    allow: names(&details.allow),
                    deny: names(&details.deny),
                    last_seq: details.last_seq,
                },
                ApiResponse::Deleted { through } => WireAnswer::Deleted(through.0),
                // Not an answer to anything forwardable.
                _ => WireAnswer::Failed(ReasonCode::Unknown.0),
            },
            Answer::Group(result) => WireAnswer::Group(match result {
                Ok(info) => Ok((info.group_id.clone(), info.members.clone(), info.last_seq)),
                Err(error) => Err(error_to_wire(error)),
            }),
            Answer::List(result) => WireAnswer::List(match result {
                Ok(uids) => Ok(uids.clone()),
                Err(error) => Err(error_to_wire(error)),
            }),
        };
        with_version(&wire)
    }

    pub fn decode(bytes: &[u8], limits: &VerifyLimits) -> Result<Answer, ForwardError> {
        let wire: WireAnswer = without_version(bytes)?;
        Ok(match wire {
            WireAnswer::Packet(frame) => {
                Answer::Api(ApiResponse::Packet(Box::new(unframe(frame, limits)?)))
            }
            WireAnswer::Failed(reason) => Answer::Api(ApiResponse::Failed(ReasonCode(reason))),
            WireAnswer::Channel {
                members,
                allow,
                deny,
                last_seq,
            } => Answer::Api(ApiResponse::Channel(ChannelDetails {
                members: uids(members),
                allow: uids(allow),
                deny: uids(deny),
                last_seq,
            })),
            WireAnswer::Deleted(through) => Answer::Api(ApiResponse::Deleted {
                through: crate::ids::Seq(through),
            }),
            WireAnswer::Group(result) => Answer::Group(match result {
                Ok((group_id, members, last_seq)) => Ok(GroupInfo {
                    group_id,
                    members,
                    last_seq,
                }),
                Err(error) => Err(error_from_wire(error)),
            }),
            WireAnswer::List(result) => Answer::List(result.map_err(error_from_wire)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ChannelType, Recall, SendAck, SendPacket};

    fn limits() -> VerifyLimits {
        VerifyLimits::for_frame_size(1 << 20)
    }

    #[test]
    fn a_forwarded_send_and_its_ack_arrive_as_sent() {
        let packet = SendPacket {
            client_seq: 7,
            client_msg_no: "c-1".into(),
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            flags: 2,
            payload: Bytes::from_static(b"hello"),
        };
        let forward = Forward::Api(ApiRequest::Send {
            from: Uid::new("alice"),
            from_device: Arc::from("phone"),
            system: false,
            channel: ChannelKey::person(&Uid::new("alice"), &Uid::new("bob")),
            packet: packet.clone(),
        });
        let bytes = forward.encode().unwrap();
        let Forward::Api(ApiRequest::Send {
            from,
            from_device,
            system,
            channel,
            packet: decoded,
        }) = Forward::decode(&bytes, &limits()).unwrap()
        else {
            panic!("not a send");
        };
        assert_eq!(
            (from.as_str(), &*from_device, system, channel.id()),
            ("alice", "phone", false, "alice@bob")
        );
        assert_eq!(decoded, packet);

        let ack = SendAck {
            client_seq: 7,
            client_msg_no: "c-1".into(),
            message_id: 99,
            message_seq: 4,
            reason: ReasonCode::Success,
        };
        let answer = Answer::Api(ApiResponse::Packet(Box::new(Packet::SendAck(ack.clone()))));
        match Answer::decode(&answer.encode(), &limits()).unwrap() {
            Answer::Api(ApiResponse::Packet(packet)) => assert_eq!(*packet, Packet::SendAck(ack)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn group_changes_and_their_errors_round_trip() {
        let forward = Forward::Group {
            group_id: "g".into(),
            uids: vec!["a".into(), "b".into()],
            change: SetChange::Remove,
        };
        match Forward::decode(&forward.encode().unwrap(), &limits()).unwrap() {
            Forward::Group {
                group_id,
                uids,
                change,
            } => {
                assert_eq!((group_id.as_str(), uids.len()), ("g", 2));
                assert!(matches!(change, SetChange::Remove));
            }
            other => panic!("{other:?}"),
        }
        let answer = Answer::Group(Err(ControlError::NoSuchGroup("g".into())));
        match Answer::decode(&answer.encode(), &limits()).unwrap() {
            Answer::Group(Err(ControlError::NoSuchGroup(id))) => assert_eq!(id, "g"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_is_not_a_forward_is_an_error_not_a_panic() {
        assert!(matches!(
            Forward::decode(&[], &limits()),
            Err(ForwardError::Corrupt(_))
        ));
        assert_eq!(
            Forward::decode(&[9, 0], &limits()).unwrap_err(),
            ForwardError::UnknownVersion(9)
        );
        assert!(Forward::decode(&[FORWARD_VERSION, 200, 1, 2], &limits()).is_err());
        // A recall forward carrying a send packet.
        let wrong = with_version(&WireForward::ClientRecall {
            uid: "a".into(),
            channel: (&ChannelKey::group("g")).into(),
            recall: frame(&Packet::Ping),
        });
        assert!(Forward::decode(&wrong, &limits()).is_err());
        let read = Forward::Api(ApiRequest::Online { uids: Vec::new() });
        assert_eq!(read.encode().unwrap_err(), ForwardError::NotForwardable);
        // Reads stay where they are made.
        assert!(!forwardable(&ApiRequest::Online { uids: Vec::new() }));
        assert!(forwardable(&ApiRequest::ClientRecall {
            uid: Uid::new("a"),
            channel: ChannelKey::group("g"),
            recall: Recall {
                request_id: 1,
                channel_id: "g".into(),
                channel_type: ChannelType::Group,
                message_id: 1,
                client_msg_no: String::new(),
            },
        }));
    }
}
