//! The wire protocol: generated FlatBuffers code, length-prefixed framing,
//! verification with explicit limits, owned packet types and reason codes.
//!
//! This module has no runtime and no storage: it turns bytes into [`Packet`]s
//! and packets into bytes, and is shared by the server, the SDK and the bench
//! harness. Every frame on the wire is a 4-byte little-endian length followed
//! by a FlatBuffers `Frame` (see `schemas/ruyi.fbs`).
//!
//! Decoding happens in two steps, each bounded: [`FrameDecoder`] checks the
//! length prefix against `frame_size_max_bytes` *before* buffering the body,
//! then [`Packet::decode`] verifies the FlatBuffer with [`VerifyLimits`]
//! before reading a single field. Payloads are sliced out of the received
//! frame without copying.

#[allow(
    clippy::all,
    clippy::pedantic,
    unsafe_op_in_unsafe_fn,
    mismatched_lifetime_syntaxes,
    unused_imports,
    non_camel_case_types,
    non_snake_case,
    missing_docs
)]
#[rustfmt::skip]
pub mod generated;
mod framing;
mod packets;

pub use framing::{FrameDecoder, FrameError, LENGTH_PREFIX_BYTES};
pub use generated::ruyi::wire;
pub use packets::{
    encode_recv, reason_name, recv_fields, ConnAck, Connect, Conversation, ConversationOp,
    ConversationOpResp, DecodeError, Disconnect, Encoder, Packet, Recall, RecallEvent, RecallResp,
    Recv, RecvAck, RecvFields, SendAck, SendPacket, SyncConversations, SyncConversationsResp,
    SyncMessages, SyncMessagesResp, VerifyLimits,
};
pub use wire::{ChannelType, ConversationAction, DeviceFlag, ReasonCode, SyncDirection};

/// The protocol version this build speaks (the `version` field of `Connect`).
pub const PROTOCOL_VERSION: u16 = 1;

/// `Recv.flags` bit: the message was pushed before and not acknowledged.
pub const RECV_FLAG_REDELIVERED: u8 = 1 << 0;
/// `Recv.flags` bit: the message was sent by the receiving user, from another
/// of their devices.
pub const RECV_FLAG_FROM_SELF: u8 = 1 << 1;
/// `Recv.flags` bit: the message was recalled; its payload is gone.
pub const RECV_FLAG_RECALLED: u8 = 1 << 2;
