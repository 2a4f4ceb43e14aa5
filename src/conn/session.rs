//! The per-connection protocol state machine, without sockets.
//!
//! A connection moves through named phases: `Handshake` (only `Connect` is
//! allowed, under the handshake timeout), `Joining` (authenticated; its
//! presence is being announced to every shard, and nothing more is read until
//! they all confirm, so that `ConnAck` means "every message committed from
//! now on reaches this device"), `Active`, and `Closing`. [`step`] decides
//! what a packet means in a phase; the shard carries it out.

use crate::ids::{Millis, Uid};
use crate::protocol::{
    Connect, ConversationOp, DeviceFlag, Packet, ReasonCode, Recall, RecvAck, SendPacket,
    SyncConversations, SyncMessages,
};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Handshake,
    Joining { acks_missing: u16 },
    Active,
    Closing,
}

/// Who is on the other end, once authenticated.
#[derive(Debug, Clone)]
pub struct Identity {
    pub uid: Uid,
    pub device_id: Arc<str>,
    pub device_flag: DeviceFlag,
}

#[derive(Debug)]
pub struct Session {
    pub phase: Phase,
    pub identity: Option<Identity>,
    pub accepted_at: Millis,
    pub last_read_at: Millis,
    pub closing_since: Option<Millis>,
    /// The client asked for what it missed once connected.
    pub resume: bool,
}

/// What a packet asks the shard to do, with the packet it came in.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Check the `Connect` and start joining.
    Authenticate(Connect),
    /// Route the `Send` to its channel's owner.
    Send(SendPacket),
    /// Record the delivery acknowledgement.
    RecvAck(RecvAck),
    /// Answer with `Pong`.
    Pong,
    /// Read a range of a channel.
    SyncMessages(SyncMessages),
    /// List the user's conversations.
    SyncConversations(SyncConversations),
    /// Change one of the user's conversations.
    ConversationOp(ConversationOp),
    /// Recall a message.
    Recall(Recall),
    /// Nothing to do (a `Pong` from the client, anything while closing).
    Nothing,
    /// The client said goodbye: close without a reply.
    ClientClosed,
    /// Close with this reason; the name of the offending packet.
    Refuse(ReasonCode, &'static str),
}

/// Decides what `packet` means in `phase`. Packets only the server sends are
/// protocol violations from a client.
pub fn step(phase: Phase, packet: Packet) -> Step {
    let unexpected = |packet: &Packet| Step::Refuse(ReasonCode::UnexpectedPacket, packet.name());
    match (phase, packet) {
        (Phase::Closing, _) => Step::Nothing,
        (Phase::Handshake, Packet::Connect(connect)) => Step::Authenticate(connect),
        (Phase::Handshake, other) => unexpected(&other),
        (_, Packet::Disconnect(_)) => Step::ClientClosed,
        (Phase::Joining { .. }, other) => unexpected(&other),
        (Phase::Active, Packet::Send(send)) => Step::Send(send),
        (Phase::Active, Packet::RecvAck(ack)) => Step::RecvAck(ack),
        (Phase::Active, Packet::Ping) => Step::Pong,
        (Phase::Active, Packet::Pong) => Step::Nothing,
        (Phase::Active, Packet::SyncMessages(request)) => Step::SyncMessages(request),
        (Phase::Active, Packet::SyncConversations(request)) => Step::SyncConversations(request),
        (Phase::Active, Packet::ConversationOp(op)) => Step::ConversationOp(op),
        (Phase::Active, Packet::Recall(recall)) => Step::Recall(recall),
        (Phase::Active, other) => unexpected(&other),
    }
}

impl Session {
    pub fn new(now: Millis) -> Session {
        Session {
            phase: Phase::Handshake,
            identity: None,
            accepted_at: now,
            last_read_at: now,
            closing_since: None,
            resume: false,
        }
    }

    /// Whether the shard should take more frames from this connection now.
    pub fn reads_frames(&self) -> bool {
        matches!(self.phase, Phase::Handshake | Phase::Active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect() -> Packet {
        Packet::Connect(crate::protocol::Connect {
            version: 1,
            uid: "u".into(),
            token: String::new(),
            device_id: "d".into(),
            device_flag: DeviceFlag::App,
            client_timestamp_ms: 0,
            resume: false,
        })
    }

    #[test]
    fn only_connect_opens_a_session() {
        assert!(matches!(
            step(Phase::Handshake, connect()),
            Step::Authenticate(_)
        ));
        assert_eq!(
            step(Phase::Handshake, Packet::Ping),
            Step::Refuse(ReasonCode::UnexpectedPacket, "Ping")
        );
        assert_eq!(
            step(
                Phase::Handshake,
                Packet::RecvAck(RecvAck {
                    message_id: 1,
                    message_seq: 1,
                    channel_id: String::new(),
                    channel_type: crate::protocol::ChannelType::Person,
                    through: false,
                })
            ),
            Step::Refuse(ReasonCode::UnexpectedPacket, "RecvAck")
        );
    }

    #[test]
    fn a_second_connect_or_a_server_packet_is_a_violation() {
        assert_eq!(
            step(Phase::Active, connect()),
            Step::Refuse(ReasonCode::UnexpectedPacket, "Connect")
        );
        assert_eq!(step(Phase::Active, Packet::Pong), Step::Nothing);
        assert_eq!(step(Phase::Active, Packet::Ping), Step::Pong);
        assert_eq!(step(Phase::Closing, Packet::Ping), Step::Nothing);
    }
}
