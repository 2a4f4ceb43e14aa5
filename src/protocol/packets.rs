//! Owned packets: verified decoding out of a received frame, and encoding
//! into an output buffer with a reusable builder.

use super::framing::LENGTH_PREFIX_BYTES;
use super::wire;
use super::{ChannelType, ConversationAction, DeviceFlag, ReasonCode, SyncDirection};
use bytes::{BufMut, Bytes, BytesMut};
use flatbuffers::{FlatBufferBuilder, VerifierOptions, WIPOffset};

/// Limits for FlatBuffers verification of one frame. The defaults bound the
/// work a hostile frame can cause: v1 packets are at most two tables deep.
#[derive(Debug, Clone, Copy)]
pub struct VerifyLimits {
    pub depth_max: usize,
    pub tables_max: usize,
    pub apparent_size_max_bytes: usize,
}

impl VerifyLimits {
    pub fn for_frame_size(frame_size_max_bytes: usize) -> VerifyLimits {
        VerifyLimits {
            depth_max: 8,
            // A table takes at least 4 bytes; responses carry one per
            // message.
            tables_max: (frame_size_max_bytes / 4).max(16),
            apparent_size_max_bytes: frame_size_max_bytes,
        }
    }

    fn options(&self) -> VerifierOptions {
        VerifierOptions {
            max_depth: self.depth_max,
            max_tables: self.tables_max,
            max_apparent_size: self.apparent_size_max_bytes,
            ignore_missing_null_terminator: false,
        }
    }
}

/// Why a frame is not a valid packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame failed verification: {0}")]
    Invalid(String),
    #[error("frame carries no packet or an unknown packet type {0}")]
    UnknownPacket(u8),
    #[error("{packet} is missing required field `{field}`")]
    MissingField {
        packet: &'static str,
        field: &'static str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: u16,
    pub uid: String,
    pub token: String,
    pub device_id: String,
    pub device_flag: DeviceFlag,
    pub client_timestamp_ms: i64,
    pub resume: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    pub reason: ReasonCode,
    pub server_time_ms: i64,
    pub heartbeat_interval_ms: u32,
    pub session_id: u64,
}

/// The `Send` packet (named so it does not shadow the `Send` trait).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendPacket {
    pub client_seq: u32,
    pub client_msg_no: String,
    pub channel_id: String,
    pub channel_type: ChannelType,
    pub flags: u8,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendAck {
    pub client_seq: u32,
    pub client_msg_no: String,
    pub message_id: u64,
    pub message_seq: u64,
    pub reason: ReasonCode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recv {
    pub message_id: u64,
    pub message_seq: u64,
    pub client_msg_no: String,
    pub from_uid: String,
    pub channel_id: String,
    pub channel_type: ChannelType,
    pub timestamp_ms: i64,
    pub flags: u8,
    pub send_flags: u8,
    pub payload: Bytes,
}

/// Acknowledges one pushed message (by id), or with `through` every push of
/// `channel_id` up to `message_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvAck {
    pub message_id: u64,
    pub message_seq: u64,
    pub channel_id: String,
    pub channel_type: ChannelType,
    pub through: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncMessages {
    pub request_id: u32,
    pub channel_id: String,
    pub channel_type: ChannelType,
    pub start_seq: u64,
    pub end_seq: u64,
    pub limit: u32,
    pub direction: SyncDirection,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncMessagesResp {
    pub request_id: u32,
    pub reason: ReasonCode,
    pub messages: Vec<Recv>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub channel_id: String,
    pub channel_type: ChannelType,
    pub unread: u64,
    pub version: u64,
    pub last_message_seq: u64,
    pub last_message: Option<Recv>,
    pub deleted: bool,
    /// Everything at or below this seq counts as read.
    pub read_seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncConversations {
    pub request_id: u32,
    pub since_version: u64,
    pub limit: u32,
    pub unread_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConversationsResp {
    pub request_id: u32,
    pub reason: ReasonCode,
    pub conversations: Vec<Conversation>,
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationOp {
    pub request_id: u32,
    pub channel_id: String,
    pub channel_type: ChannelType,
    pub action: ConversationAction,
    pub unread: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationOpResp {
    pub request_id: u32,
    pub reason: ReasonCode,
    pub conversation: Option<Conversation>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recall {
    pub request_id: u32,
    pub channel_id: String,
    pub channel_type: ChannelType,
    /// Recall this message id, or (when 0) the message sent with
    /// `client_msg_no`.
    pub message_id: u64,
    pub client_msg_no: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecallResp {
    pub request_id: u32,
    pub reason: ReasonCode,
    pub message_id: u64,
    pub message_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecallEvent {
    pub channel_id: String,
    pub channel_type: ChannelType,
    pub message_id: u64,
    pub message_seq: u64,
    pub from_uid: String,
}

/// One decoded packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Send(SendPacket),
    SendAck(SendAck),
    Recv(Recv),
    RecvAck(RecvAck),
    Ping,
    Pong,
    Disconnect(Disconnect),
    SyncMessages(SyncMessages),
    SyncMessagesResp(SyncMessagesResp),
    SyncConversations(SyncConversations),
    SyncConversationsResp(SyncConversationsResp),
    ConversationOp(ConversationOp),
    ConversationOpResp(ConversationOpResp),
    ConversationUpdate(Conversation),
    Recall(Recall),
    RecallResp(RecallResp),
    RecallEvent(RecallEvent),
}

/// Borrowed fields of a `Recv`, so the server can encode a delivery straight
/// from its stored message without building an owned packet first.
#[derive(Debug, Clone, Copy)]
pub struct RecvFields<'a> {
    pub message_id: u64,
    pub message_seq: u64,
    pub client_msg_no: &'a str,
    pub from_uid: &'a str,
    pub channel_id: &'a str,
    pub channel_type: ChannelType,
    pub timestamp_ms: i64,
    pub flags: u8,
    pub send_flags: u8,
    pub payload: &'a [u8],
}

/// The snake_case name of a reason code, as printed by the CLI and logs.
pub fn reason_name(reason: ReasonCode) -> String {
    let Some(name) = reason.variant_name() else {
        return format!("reason_{}", reason.0);
    };
    let mut out = String::with_capacity(name.len() + 4);
    for (i, ch) in name.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

fn required<'a>(
    value: Option<&'a str>,
    packet: &'static str,
    field: &'static str,
) -> Result<&'a str, DecodeError> {
    value.ok_or(DecodeError::MissingField { packet, field })
}

/// Slices `inner` out of `frame` without copying when it lies inside it.
fn slice_payload(frame: &Bytes, inner: &[u8]) -> Bytes {
    if inner.is_empty() {
        Bytes::new()
    } else {
        frame.slice_ref(inner)
    }
}

fn decode_recv(frame: &Bytes, p: wire::Recv<'_>) -> Recv {
    Recv {
        message_id: p.message_id(),
        message_seq: p.message_seq(),
        client_msg_no: p.client_msg_no().unwrap_or_default().to_owned(),
        from_uid: p.from_uid().unwrap_or_default().to_owned(),
        channel_id: p.channel_id().unwrap_or_default().to_owned(),
        channel_type: p.channel_type(),
        timestamp_ms: p.timestamp_ms(),
        flags: p.flags(),
        send_flags: p.send_flags(),
        payload: p
            .payload()
            .map(|v| slice_payload(frame, v.bytes()))
            .unwrap_or_default(),
    }
}

fn decode_conversation(frame: &Bytes, p: wire::Conversation<'_>) -> Conversation {
    Conversation {
        channel_id: p.channel_id().unwrap_or_default().to_owned(),
        channel_type: p.channel_type(),
        unread: p.unread(),
        version: p.version(),
        last_message_seq: p.last_message_seq(),
        last_message: p.last_message().map(|m| decode_recv(frame, m)),
        deleted: p.deleted(),
        read_seq: p.read_seq(),
    }
}

impl Packet {
    /// Verifies `frame` (a frame body without its length prefix) under
    /// `limits` and decodes it. Strings are copied; the payload is a
    /// zero-copy slice of `frame`.
    pub fn decode(frame: &Bytes, limits: &VerifyLimits) -> Result<Packet, DecodeError> {
        let opts = limits.options();
        let root = wire::root_as_frame_with_opts(&opts, frame)
            .map_err(|e| DecodeError::Invalid(e.to_string()))?;
        let kind = root.packet_type();
        let missing = || DecodeError::UnknownPacket(kind.0);
        let packet = match kind {
            wire::Packet::Connect => {
                let p = root.packet_as_connect().ok_or_else(missing)?;
                Packet::Connect(Connect {
                    version: p.version(),
                    uid: required(p.uid(), "Connect", "uid")?.to_owned(),
                    token: p.token().unwrap_or_default().to_owned(),
                    device_id: p.device_id().unwrap_or_default().to_owned(),
                    device_flag: p.device_flag(),
                    client_timestamp_ms: p.client_timestamp_ms(),
                    resume: p.resume(),
                })
            }
            wire::Packet::ConnAck => {
                let p = root.packet_as_conn_ack().ok_or_else(missing)?;
                Packet::ConnAck(ConnAck {
                    reason: p.reason(),
                    server_time_ms: p.server_time_ms(),
                    heartbeat_interval_ms: p.heartbeat_interval_ms(),
                    session_id: p.session_id(),
                })
            }
            wire::Packet::Send => {
                let p = root.packet_as_send().ok_or_else(missing)?;
                Packet::Send(SendPacket {
                    client_seq: p.client_seq(),
                    client_msg_no: p.client_msg_no().unwrap_or_default().to_owned(),
                    channel_id: required(p.channel_id(), "Send", "channel_id")?.to_owned(),
                    channel_type: p.channel_type(),
                    flags: p.flags(),
                    payload: p
                        .payload()
                        .map(|v| slice_payload(frame, v.bytes()))
                        .unwrap_or_default(),
                })
            }
            wire::Packet::SendAck => {
                let p = root.packet_as_send_ack().ok_or_else(missing)?;
                Packet::SendAck(SendAck {
                    client_seq: p.client_seq(),
                    client_msg_no: p.client_msg_no().unwrap_or_default().to_owned(),
                    message_id: p.message_id(),
                    message_seq: p.message_seq(),
                    reason: p.reason(),
                })
            }
            wire::Packet::Recv => {
                let p = root.packet_as_recv().ok_or_else(missing)?;
                Packet::Recv(decode_recv(frame, p))
            }
            wire::Packet::RecvAck => {
                let p = root.packet_as_recv_ack().ok_or_else(missing)?;
                Packet::RecvAck(RecvAck {
                    message_id: p.message_id(),
                    message_seq: p.message_seq(),
                    channel_id: p.channel_id().unwrap_or_default().to_owned(),
                    channel_type: p.channel_type(),
                    through: p.through(),
                })
            }
            wire::Packet::Ping => {
                root.packet_as_ping().ok_or_else(missing)?;
                Packet::Ping
            }
            wire::Packet::Pong => {
                root.packet_as_pong().ok_or_else(missing)?;
                Packet::Pong
            }
            wire::Packet::Disconnect => {
                let p = root.packet_as_disconnect().ok_or_else(missing)?;
                Packet::Disconnect(Disconnect {
                    reason: p.reason(),
                    message: p.message().unwrap_or_default().to_owned(),
                })
            }
            wire::Packet::SyncMessages => {
                let p = root.packet_as_sync_messages().ok_or_else(missing)?;
                Packet::SyncMessages(SyncMessages {
                    request_id: p.request_id(),
                    channel_id: required(p.channel_id(), "SyncMessages", "channel_id")?.to_owned(),
                    channel_type: p.channel_type(),
                    start_seq: p.start_seq(),
                    end_seq: p.end_seq(),
                    limit: p.limit(),
                    direction: p.direction(),
                })
            }
            wire::Packet::SyncMessagesResp => {
                let p = root.packet_as_sync_messages_resp().ok_or_else(missing)?;
                Packet::SyncMessagesResp(SyncMessagesResp {
                    request_id: p.request_id(),
                    reason: p.reason(),
                    messages: p
                        .messages()
                        .map(|v| v.iter().map(|m| decode_recv(frame, m)).collect())
                        .unwrap_or_default(),
                })
            }
            wire::Packet::SyncConversations => {
                let p = root.packet_as_sync_conversations().ok_or_else(missing)?;
                Packet::SyncConversations(SyncConversations {
                    request_id: p.request_id(),
                    since_version: p.since_version(),
                    limit: p.limit(),
                    unread_only: p.unread_only(),
                })
            }
            wire::Packet::SyncConversationsResp => {
                let p = root
                    .packet_as_sync_conversations_resp()
                    .ok_or_else(missing)?;
                Packet::SyncConversationsResp(SyncConversationsResp {
                    request_id: p.request_id(),
                    reason: p.reason(),
                    conversations: p
                        .conversations()
                        .map(|v| v.iter().map(|c| decode_conversation(frame, c)).collect())
                        .unwrap_or_default(),
                    more: p.more(),
                })
            }
            wire::Packet::ConversationOp => {
                let p = root.packet_as_conversation_op().ok_or_else(missing)?;
                Packet::ConversationOp(ConversationOp {
                    request_id: p.request_id(),
                    channel_id: required(p.channel_id(), "ConversationOp", "channel_id")?
                        .to_owned(),
                    channel_type: p.channel_type(),
                    action: p.action(),
                    unread: p.unread(),
                })
            }
            wire::Packet::ConversationOpResp => {
                let p = root.packet_as_conversation_op_resp().ok_or_else(missing)?;
                Packet::ConversationOpResp(ConversationOpResp {
                    request_id: p.request_id(),
                    reason: p.reason(),
                    conversation: p.conversation().map(|c| decode_conversation(frame, c)),
                })
            }
            wire::Packet::ConversationUpdate => {
                let p = root.packet_as_conversation_update().ok_or_else(missing)?;
                let conversation = p.conversation().ok_or(DecodeError::MissingField {
                    packet: "ConversationUpdate",
                    field: "conversation",
                })?;
                Packet::ConversationUpdate(decode_conversation(frame, conversation))
            }
            wire::Packet::Recall => {
                let p = root.packet_as_recall().ok_or_else(missing)?;
                Packet::Recall(Recall {
                    request_id: p.request_id(),
                    channel_id: required(p.channel_id(), "Recall", "channel_id")?.to_owned(),
                    channel_type: p.channel_type(),
                    message_id: p.message_id(),
                    client_msg_no: p.client_msg_no().unwrap_or_default().to_owned(),
                })
            }
            wire::Packet::RecallResp => {
                let p = root.packet_as_recall_resp().ok_or_else(missing)?;
                Packet::RecallResp(RecallResp {
                    request_id: p.request_id(),
                    reason: p.reason(),
                    message_id: p.message_id(),
                    message_seq: p.message_seq(),
                })
            }
            wire::Packet::RecallEvent => {
                let p = root.packet_as_recall_event().ok_or_else(missing)?;
                Packet::RecallEvent(RecallEvent {
                    channel_id: p.channel_id().unwrap_or_default().to_owned(),
                    channel_type: p.channel_type(),
                    message_id: p.message_id(),
                    message_seq: p.message_seq(),
                    from_uid: p.from_uid().unwrap_or_default().to_owned(),
                })
            }
            _ => return Err(missing()),
        };
        Ok(packet)
    }

    /// The packet's name as in the schema, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "Connect",
            Packet::ConnAck(_) => "ConnAck",
            Packet::Send(_) => "Send",
            Packet::SendAck(_) => "SendAck",
            Packet::Recv(_) => "Recv",
            Packet::RecvAck(_) => "RecvAck",
            Packet::Ping => "Ping",
            Packet::Pong => "Pong",
            Packet::Disconnect(_) => "Disconnect",
            Packet::SyncMessages(_) => "SyncMessages",
            Packet::SyncMessagesResp(_) => "SyncMessagesResp",
            Packet::SyncConversations(_) => "SyncConversations",
            Packet::SyncConversationsResp(_) => "SyncConversationsResp",
            Packet::ConversationOp(_) => "ConversationOp",
            Packet::ConversationOpResp(_) => "ConversationOpResp",
            Packet::ConversationUpdate(_) => "ConversationUpdate",
            Packet::Recall(_) => "Recall",
            Packet::RecallResp(_) => "RecallResp",
            Packet::RecallEvent(_) => "RecallEvent",
        }
    }
}

/// Encodes packets into length-prefixed frames, reusing one FlatBuffers
/// builder so that steady-state encoding does not allocate.
pub struct Encoder {
    fbb: FlatBufferBuilder<'static>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").finish_non_exhaustive()
    }
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder {
            fbb: FlatBufferBuilder::with_capacity(1024),
        }
    }

    fn finish(
        &mut self,
        kind: wire::Packet,
        packet: WIPOffset<flatbuffers::UnionWIPOffset>,
        out: &mut BytesMut,
    ) {
        let frame = wire::Frame::create(
            &mut self.fbb,
            &wire::FrameArgs {
                packet_type: kind,
                packet: Some(packet),
            },
        );
        self.fbb.finish(frame, None);
        let data = self.fbb.finished_data();
        out.reserve(LENGTH_PREFIX_BYTES + data.len());
        out.put_u32_le(data.len() as u32);
        out.put_slice(data);
        self.fbb.reset();
    }

    /// Appends `packet` as one length-prefixed frame to `out`.
    pub fn encode(&mut self, packet: &Packet, out: &mut BytesMut) {
        let fbb = &mut self.fbb;
        let (kind, offset) = match packet {
            Packet::Connect(p) => {
                let uid = fbb.create_string(&p.uid);
                let token = fbb.create_string(&p.token);
                let device_id = fbb.create_string(&p.device_id);
                let t = wire::Connect::create(
                    fbb,
                    &wire::ConnectArgs {
                        version: p.version,
                        uid: Some(uid),
                        token: Some(token),
                        device_id: Some(device_id),
                        device_flag: p.device_flag,
                        client_timestamp_ms: p.client_timestamp_ms,
                        resume: p.resume,
                    },
                );
                (wire::Packet::Connect, t.as_union_value())
            }
            Packet::ConnAck(p) => {
                let t = wire::ConnAck::create(
                    fbb,
                    &wire::ConnAckArgs {
                        reason: p.reason,
                        server_time_ms: p.server_time_ms,
                        heartbeat_interval_ms: p.heartbeat_interval_ms,
                        session_id: p.session_id,
                    },
                );
                (wire::Packet::ConnAck, t.as_union_value())
            }
            Packet::Send(p) => {
                let client_msg_no = fbb.create_string(&p.client_msg_no);
                let channel_id = fbb.create_string(&p.channel_id);
                let payload = fbb.create_vector(&p.payload[..]);
                let t = wire::Send::create(
                    fbb,
                    &wire::SendArgs {
                        client_seq: p.client_seq,
                        client_msg_no: Some(client_msg_no),
                        channel_id: Some(channel_id),
                        channel_type: p.channel_type,
                        flags: p.flags,
                        payload: Some(payload),
                    },
                );
                (wire::Packet::Send, t.as_union_value())
            }
            Packet::SendAck(p) => {
                let client_msg_no = fbb.create_string(&p.client_msg_no);
                let t = wire::SendAck::create(
                    fbb,
                    &wire::SendAckArgs {
                        client_seq: p.client_seq,
                        client_msg_no: Some(client_msg_no),
                        message_id: p.message_id,
                        message_seq: p.message_seq,
                        reason: p.reason,
                    },
                );
                (wire::Packet::SendAck, t.as_union_value())
            }
            Packet::Recv(p) => {
                return encode_recv(self, &recv_fields(p), out);
            }
            Packet::RecvAck(p) => {
                let channel_id = fbb.create_string(&p.channel_id);
                let t = wire::RecvAck::create(
                    fbb,
                    &wire::RecvAckArgs {
                        message_id: p.message_id,
                        message_seq: p.message_seq,
                        channel_id: Some(channel_id),
                        channel_type: p.channel_type,
                        through: p.through,
                    },
                );
                (wire::Packet::RecvAck, t.as_union_value())
            }
            Packet::Ping => {
                let t = wire::Ping::create(fbb, &wire::PingArgs {});
                (wire::Packet::Ping, t.as_union_value())
            }
            Packet::Pong => {
                let t = wire::Pong::create(fbb, &wire::PongArgs {});
                (wire::Packet::Pong, t.as_union_value())
            }
            Packet::Disconnect(p) => {
                let message = fbb.create_string(&p.message);
                let t = wire::Disconnect::create(
                    fbb,
                    &wire::DisconnectArgs {
                        reason: p.reason,
                        message: Some(message),
                    },
                );
                (wire::Packet::Disconnect, t.as_union_value())
            }
            Packet::SyncMessages(p) => {
                let channel_id = fbb.create_string(&p.channel_id);
                let t = wire::SyncMessages::create(
                    fbb,
                    &wire::SyncMessagesArgs {
                        request_id: p.request_id,
                        channel_id: Some(channel_id),
                        channel_type: p.channel_type,
                        start_seq: p.start_seq,
                        end_seq: p.end_seq,
                        limit: p.limit,
                        direction: p.direction,
                    },
                );
                (wire::Packet::SyncMessages, t.as_union_value())
            }
            Packet::SyncMessagesResp(p) => {
                let messages: Vec<_> = p
                    .messages
                    .iter()
                    .map(|m| build_recv(fbb, &recv_fields(m)))
                    .collect();
                let messages = fbb.create_vector(&messages);
                let t = wire::SyncMessagesResp::create(
                    fbb,
                    &wire::SyncMessagesRespArgs {
                        request_id: p.request_id,
                        reason: p.reason,
                        messages: Some(messages),
                    },
                );
                (wire::Packet::SyncMessagesResp, t.as_union_value())
            }
            Packet::SyncConversations(p) => {
                let t = wire::SyncConversations::create(
                    fbb,
                    &wire::SyncConversationsArgs {
                        request_id: p.request_id,
                        since_version: p.since_version,
                        limit: p.limit,
                        unread_only: p.unread_only,
                    },
                );
                (wire::Packet::SyncConversations, t.as_union_value())
            }
            Packet::SyncConversationsResp(p) => {
                let conversations: Vec<_> = p
                    .conversations
                    .iter()
                    .map(|c| build_conversation(fbb, c))
                    .collect();
                let conversations = fbb.create_vector(&conversations);
                let t = wire::SyncConversationsResp::create(
                    fbb,
                    &wire::SyncConversationsRespArgs {
                        request_id: p.request_id,
                        reason: p.reason,
                        conversations: Some(conversations),
                        more: p.more,
                    },
                );
                (wire::Packet::SyncConversationsResp, t.as_union_value())
            }
            Packet::ConversationOp(p) => {
                let channel_id = fbb.create_string(&p.channel_id);
                let t = wire::ConversationOp::create(
                    fbb,
                    &wire::ConversationOpArgs {
                        request_id: p.request_id,
                        channel_id: Some(channel_id),
                        channel_type: p.channel_type,
                        action: p.action,
                        unread: p.unread,
                    },
                );
                (wire::Packet::ConversationOp, t.as_union_value())
            }
            Packet::ConversationOpResp(p) => {
                let conversation = p.conversation.as_ref().map(|c| build_conversation(fbb, c));
                let t = wire::ConversationOpResp::create(
                    fbb,
                    &wire::ConversationOpRespArgs {
                        request_id: p.request_id,
                        reason: p.reason,
                        conversation,
                    },
                );
                (wire::Packet::ConversationOpResp, t.as_union_value())
            }
            Packet::ConversationUpdate(c) => {
                let conversation = build_conversation(fbb, c);
                let t = wire::ConversationUpdate::create(
                    fbb,
                    &wire::ConversationUpdateArgs {
                        conversation: Some(conversation),
                    },
                );
                (wire::Packet::ConversationUpdate, t.as_union_value())
            }
            Packet::Recall(p) => {
                let channel_id = fbb.create_string(&p.channel_id);
                let client_msg_no = fbb.create_string(&p.client_msg_no);
                let t = wire::Recall::create(
                    fbb,
                    &wire::RecallArgs {
                        request_id: p.request_id,
                        channel_id: Some(channel_id),
                        channel_type: p.channel_type,
                        message_id: p.message_id,
                        client_msg_no: Some(client_msg_no),
                    },
                );
                (wire::Packet::Recall, t.as_union_value())
            }
            Packet::RecallResp(p) => {
                let t = wire::RecallResp::create(
                    fbb,
                    &wire::RecallRespArgs {
                        request_id: p.request_id,
                        reason: p.reason,
                        message_id: p.message_id,
                        message_seq: p.message_seq,
                    },
                );
                (wire::Packet::RecallResp, t.as_union_value())
            }
            Packet::RecallEvent(p) => {
                let channel_id = fbb.create_string(&p.channel_id);
                let from_uid = fbb.create_string(&p.from_uid);
                let t = wire::RecallEvent::create(
                    fbb,
                    &wire::RecallEventArgs {
                        channel_id: Some(channel_id),
                        channel_type: p.channel_type,
                        message_id: p.message_id,
                        message_seq: p.message_seq,
                        from_uid: Some(from_uid),
                    },
                );
                (wire::Packet::RecallEvent, t.as_union_value())
            }
        };
        self.finish(kind, offset, out);
    }
}

/// The borrowed fields of an owned `Recv`.
pub fn recv_fields(m: &Recv) -> RecvFields<'_> {
    RecvFields {
        message_id: m.message_id,
        message_seq: m.message_seq,
        client_msg_no: &m.client_msg_no,
        from_uid: &m.from_uid,
        channel_id: &m.channel_id,
        channel_type: m.channel_type,
        timestamp_ms: m.timestamp_ms,
        flags: m.flags,
        send_flags: m.send_flags,
        payload: &m.payload,
    }
}

fn build_recv<'b>(
    fbb: &mut FlatBufferBuilder<'b>,
    recv: &RecvFields<'_>,
) -> WIPOffset<wire::Recv<'b>> {
    let client_msg_no = fbb.create_string(recv.client_msg_no);
    let from_uid = fbb.create_string(recv.from_uid);
    let channel_id = fbb.create_string(recv.channel_id);
    let payload = fbb.create_vector(recv.payload);
    wire::Recv::create(
        fbb,
        &wire::RecvArgs {
            message_id: recv.message_id,
            message_seq: recv.message_seq,
            client_msg_no: Some(client_msg_no),
            from_uid: Some(from_uid),
            channel_id: Some(channel_id),
            channel_type: recv.channel_type,
            timestamp_ms: recv.timestamp_ms,
            flags: recv.flags,
            send_flags: recv.send_flags,
            payload: Some(payload),
        },
    )
}

fn build_conversation<'b>(
    fbb: &mut FlatBufferBuilder<'b>,
    c: &Conversation,
) -> WIPOffset<wire::Conversation<'b>> {
    let last_message = c
        .last_message
        .as_ref()
        .map(|m| build_recv(fbb, &recv_fields(m)));
    let channel_id = fbb.create_string(&c.channel_id);
    wire::Conversation::create(
        fbb,
        &wire::ConversationArgs {
            channel_id: Some(channel_id),
            channel_type: c.channel_type,
            unread: c.unread,
            version: c.version,
            last_message_seq: c.last_message_seq,
            last_message,
            deleted: c.deleted,
            read_seq: c.read_seq,
        },
    )
}

/// Appends one `Recv` frame built from borrowed fields to `out`.
pub fn encode_recv(encoder: &mut Encoder, recv: &RecvFields<'_>, out: &mut BytesMut) {
    let t = build_recv(&mut encoder.fbb, recv);
    encoder.finish(wire::Packet::Recv, t.as_union_value(), out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FrameDecoder;

    fn round_trip(packet: Packet) {
        let mut encoder = Encoder::new();
        let mut out = BytesMut::new();
        encoder.encode(&packet, &mut out);
        let decoder = FrameDecoder::new(64 * 1024);
        let frame = decoder.next_frame(&mut out).unwrap().unwrap();
        let decoded = Packet::decode(&frame, &VerifyLimits::for_frame_size(64 * 1024)).unwrap();
        assert_eq!(decoded, packet);
        assert!(out.is_empty());
    }

    #[test]
    fn every_packet_type_round_trips() {
        round_trip(Packet::Connect(Connect {
            version: 1,
            uid: "alice".into(),
            token: "t".into(),
            device_id: "phone".into(),
            device_flag: DeviceFlag::Web,
            client_timestamp_ms: 42,
            resume: true,
        }));
        round_trip(Packet::ConnAck(ConnAck {
            reason: ReasonCode::Success,
            server_time_ms: 7,
            heartbeat_interval_ms: 30_000,
            session_id: 9,
        }));
        round_trip(Packet::Send(SendPacket {
            client_seq: 3,
            client_msg_no: "m1".into(),
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            flags: 1,
            payload: Bytes::from_static(b"hello"),
        }));
        round_trip(Packet::SendAck(SendAck {
            client_seq: 3,
            client_msg_no: "m1".into(),
            message_id: 77,
            message_seq: 1,
            reason: ReasonCode::Success,
        }));
        round_trip(Packet::Recv(Recv {
            message_id: 77,
            message_seq: 1,
            client_msg_no: "m1".into(),
            from_uid: "alice".into(),
            channel_id: "alice".into(),
            channel_type: ChannelType::Person,
            timestamp_ms: 5,
            flags: 2,
            send_flags: 1,
            payload: Bytes::from_static(b"hello"),
        }));
        round_trip(Packet::RecvAck(RecvAck {
            message_id: 77,
            message_seq: 1,
            channel_id: "alice".into(),
            channel_type: ChannelType::Person,
            through: true,
        }));
        round_trip(Packet::Ping);
        round_trip(Packet::Pong);
        round_trip(Packet::Disconnect(Disconnect {
            reason: ReasonCode::IdleTimeout,
            message: "bye".into(),
        }));
        let recv = Recv {
            message_id: 1,
            message_seq: 2,
            client_msg_no: "c".into(),
            from_uid: "a".into(),
            channel_id: "g".into(),
            channel_type: ChannelType::Group,
            timestamp_ms: 3,
            flags: 4,
            send_flags: 0,
            payload: Bytes::new(),
        };
        let conversation = Conversation {
            channel_id: "g".into(),
            channel_type: ChannelType::Group,
            unread: 3,
            version: 99,
            last_message_seq: 2,
            last_message: Some(recv.clone()),
            deleted: false,
            read_seq: 1,
        };
        round_trip(Packet::SyncMessages(SyncMessages {
            request_id: 1,
            channel_id: "g".into(),
            channel_type: ChannelType::Group,
            start_seq: 5,
            end_seq: 0,
            limit: 10,
            direction: SyncDirection::Down,
        }));
        round_trip(Packet::SyncMessagesResp(SyncMessagesResp {
            request_id: 1,
            reason: ReasonCode::Success,
            messages: vec![recv.clone(), recv],
        }));
        round_trip(Packet::SyncConversations(SyncConversations {
            request_id: 2,
            since_version: 7,
            limit: 100,
            unread_only: true,
        }));
        round_trip(Packet::SyncConversationsResp(SyncConversationsResp {
            request_id: 2,
            reason: ReasonCode::Success,
            conversations: vec![conversation.clone()],
            more: true,
        }));
        round_trip(Packet::ConversationOp(ConversationOp {
            request_id: 3,
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            action: ConversationAction::SetUnread,
            unread: 2,
        }));
        round_trip(Packet::ConversationOpResp(ConversationOpResp {
            request_id: 3,
            reason: ReasonCode::Success,
            conversation: Some(conversation.clone()),
        }));
        round_trip(Packet::ConversationUpdate(conversation));
        round_trip(Packet::Recall(Recall {
            request_id: 4,
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            message_id: 0,
            client_msg_no: "m1".into(),
        }));
        round_trip(Packet::RecallResp(RecallResp {
            request_id: 4,
            reason: ReasonCode::NotSender,
            message_id: 0,
            message_seq: 0,
        }));
        round_trip(Packet::RecallEvent(RecallEvent {
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            message_id: 8,
            message_seq: 1,
            from_uid: "alice".into(),
        }));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let limits = VerifyLimits::for_frame_size(1024);
        for body in [
            &b"\x01"[..],
            b"\xff\xff\xff\xff\xff\xff\xff\xff",
            b"12345678901234567890",
        ] {
            assert!(Packet::decode(&Bytes::copy_from_slice(body), &limits).is_err());
        }
    }

    #[test]
    fn reason_names_are_snake_case() {
        assert_eq!(reason_name(ReasonCode::Success), "success");
        assert_eq!(reason_name(ReasonCode::NotMember), "not_member");
        assert_eq!(reason_name(ReasonCode(999)), "reason_999");
    }
}
