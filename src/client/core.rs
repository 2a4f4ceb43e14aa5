//! The SDK's protocol logic without a runtime: bytes in, events out;
//! requests in, bytes out. The tokio adapter in [`super`] and the bench
//! harness (on glommio) both drive it.

use crate::protocol::{
    ChannelType, ConnAck, Connect, Conversation, DecodeError, DeviceFlag, Disconnect, Encoder,
    FrameDecoder, FrameError, Packet, RecallEvent, Recv, RecvAck, SendAck, SendPacket,
    VerifyLimits, PROTOCOL_VERSION,
};
use bytes::{Bytes, BytesMut};

/// What the server told the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    ConnAck(ConnAck),
    SendAck(SendAck),
    Recv(Recv),
    Pong,
    Disconnect(Disconnect),
    /// The answer to a request (sync, conversation change, recall), matched
    /// by its request id.
    Response {
        request_id: u32,
        packet: Packet,
    },
    /// A conversation of this user changed on another device.
    ConversationUpdate(Conversation),
    /// A message of one of the user's channels was recalled.
    Recall(RecallEvent),
}

/// The server broke the protocol (or sent garbage).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the server sent {0}, which only clients send")]
    Unexpected(&'static str),
}

/// Who connects, and how.
#[derive(Debug, Clone)]
pub struct Identity {
    pub uid: String,
    pub token: String,
    pub device_id: String,
    pub device_flag: DeviceFlag,
    /// Ask the server to push what this device has not acknowledged.
    pub resume: bool,
}

/// One message to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub channel_id: String,
    pub channel_type: ChannelType,
    pub client_msg_no: String,
    pub flags: u8,
    pub payload: Bytes,
}

pub struct ClientCore {
    decoder: FrameDecoder,
    verify: VerifyLimits,
    encoder: Encoder,
    input: BytesMut,
    output: BytesMut,
    next_client_seq: u32,
}

impl std::fmt::Debug for ClientCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCore")
            .field("buffered_in", &self.input.len())
            .field("buffered_out", &self.output.len())
            .finish()
    }
}

impl ClientCore {
    /// `frame_size_max_bytes` bounds what the client accepts from the server.
    pub fn new(frame_size_max_bytes: usize) -> ClientCore {
        ClientCore {
            decoder: FrameDecoder::new(frame_size_max_bytes),
            verify: VerifyLimits::for_frame_size(frame_size_max_bytes),
            encoder: Encoder::new(),
            input: BytesMut::new(),
            output: BytesMut::new(),
            next_client_seq: 1,
        }
    }

    pub fn connect(&mut self, identity: &Identity, client_timestamp_ms: i64) {
        let packet = Packet::Connect(Connect {
            version: PROTOCOL_VERSION,
            uid: identity.uid.clone(),
            token: identity.token.clone(),
            device_id: identity.device_id.clone(),
            device_flag: identity.device_flag,
            client_timestamp_ms,
            resume: identity.resume,
        });
        self.encoder.encode(&packet, &mut self.output);
    }

    /// Queues a `Send`; returns its client sequence number, which the
    /// matching `SendAck` carries.
    pub fn send(&mut self, message: Outgoing) -> u32 {
        let client_seq = self.next_client_seq;
        self.next_client_seq = self.next_client_seq.wrapping_add(1).max(1);
        let packet = Packet::Send(SendPacket {
            client_seq,
            client_msg_no: message.client_msg_no,
            channel_id: message.channel_id,
            channel_type: message.channel_type,
            flags: message.flags,
            payload: message.payload,
        });
        self.encoder.encode(&packet, &mut self.output);
        client_seq
    }

    /// Acknowledges one received message.
    pub fn ack(&mut self, message_id: u64, message_seq: u64) {
        let packet = Packet::RecvAck(RecvAck {
            message_id,
            message_seq,
            channel_id: String::new(),
            channel_type: ChannelType::Unknown,
            through: false,
        });
        self.encoder.encode(&packet, &mut self.output);
    }

    /// Acknowledges every message of a channel received on this connection
    /// up to `message_seq` with one frame. Pushes arrive in order on one
    /// connection, so receiving seq N means every earlier push arrived.
    pub fn ack_through(&mut self, channel_id: &str, channel_type: ChannelType, message_seq: u64) {
        let packet = Packet::RecvAck(RecvAck {
            message_id: 0,
            message_seq,
            channel_id: channel_id.to_owned(),
            channel_type,
            through: true,
        });
        self.encoder.encode(&packet, &mut self.output);
    }

    /// Queues a request packet (`SyncMessages`, `SyncConversations`,
    /// `ConversationOp`, `Recall`); its response comes back as
    /// [`Event::Response`] with the same request id.
    pub fn request(&mut self, packet: &Packet) {
        self.encoder.encode(packet, &mut self.output);
    }

    pub fn ping(&mut self) {
        self.encoder.encode(&Packet::Ping, &mut self.output);
    }

    pub fn disconnect(&mut self) {
        let packet = Packet::Disconnect(Disconnect {
            reason: crate::protocol::ReasonCode::Success,
            message: String::new(),
        });
        self.encoder.encode(&packet, &mut self.output);
    }

    /// Bytes waiting to be written. The caller writes them and clears it.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.output
    }

    /// Adds bytes read from the socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// The next event in what was fed, if a whole frame is there.
    pub fn next_event(&mut self) -> Result<Option<Event>, ProtocolError> {
        let Some(frame) = self.decoder.next_frame(&mut self.input)? else {
            return Ok(None);
        };
        let event = match Packet::decode(&frame, &self.verify)? {
            Packet::ConnAck(p) => Event::ConnAck(p),
            Packet::SendAck(p) => Event::SendAck(p),
            Packet::Recv(p) => Event::Recv(p),
            Packet::Pong => Event::Pong,
            Packet::Disconnect(p) => Event::Disconnect(p),
            Packet::ConversationUpdate(c) => Event::ConversationUpdate(c),
            Packet::RecallEvent(e) => Event::Recall(e),
            Packet::SyncMessagesResp(p) => Event::Response {
                request_id: p.request_id,
                packet: Packet::SyncMessagesResp(p),
            },
            Packet::SyncConversationsResp(p) => Event::Response {
                request_id: p.request_id,
                packet: Packet::SyncConversationsResp(p),
            },
            Packet::ConversationOpResp(p) => Event::Response {
                request_id: p.request_id,
                packet: Packet::ConversationOpResp(p),
            },
            Packet::RecallResp(p) => Event::Response {
                request_id: p.request_id,
                packet: Packet::RecallResp(p),
            },
            other => return Err(ProtocolError::Unexpected(other.name())),
        };
        Ok(Some(event))
    }
}
