//! The per-connection protocol state machine, without sockets.
//!
//! A connection moves through named phases: `Handshake` (only `Connect` is
//! allowed, under the handshake timeout), `Joining` (authenticated; its
//! presence is being announced to every shard, and nothing more is read until
//! they all confirm, so that `ConnAck` means "every message committed from
//! now on reaches this device"), `Active`, and `Closing`. [`step`] decides
//! what a packet means in a phase; the shard carries it out.

use crate::ids::{Millis, Uid};
use crate::protocol::{DeviceFlag, Packet, ReasonCode};
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
}

/// What a packet asks the shard to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Check the `Connect` and start joining.
    Authenticate,
    /// Route the `Send` to its channel's owner.
    Send,
    /// Record the delivery acknowledgement.
    RecvAck,
    /// Answer with `Pong`.
    Pong,
    /// Read a range of a channel.
    SyncMessages,
    /// List the user's conversations.
    SyncConversations,
    /// Change one of the user's conversations.
    ConversationOp,
    /// Recall a message.
    Recall,
    /// Nothing to do (a `Pong` from the client).
    Nothing,
    /// The client said goodbye: close without a reply.
    ClientClosed,
    /// Close with this reason.
    Refuse(ReasonCode),
}

/// Decides what `packet` means in `phase`. Packets only the server sends are
/// protocol violations from a client.
pub fn step(phase: Phase, packet: &Packet) -> Step {
    match (phase, packet) {
        (Phase::Closing, _) => Step::Nothing,
        (Phase::Handshake, Packet::Connect(_)) => Step::Authenticate,
        (Phase::Handshake, _) => Step::Refuse(ReasonCode::UnexpectedPacket),
        (_, Packet::Disconnect(_)) => Step::ClientClosed,
        (Phase::Joining { .. }, _) => Step::Refuse(ReasonCode::UnexpectedPacket),
        (Phase::Active, Packet::Send(_)) => Step::Send,
        (Phase::Active, Packet::RecvAck(_)) => Step::RecvAck,
        (Phase::Active, Packet::Ping) => Step::Pong,
        (Phase::Active, Packet::SyncMessages(_)) => Step::SyncMessages,
        (Phase::Active, Packet::SyncConversations(_)) => Step::SyncConversations,
        (Phase::Active, Packet::ConversationOp(_)) => Step::ConversationOp,
        (Phase::Active, Packet::Recall(_)) => Step::Recall,
        (Phase::Active, Packet::Pong) => Step::Nothing,
        (Phase::Active, _) => Step::Refuse(ReasonCode::UnexpectedPacket),
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
    use crate::protocol::{Connect, RecvAck};

    fn connect() -> Packet {
        Packet::Connect(Connect {
            version: 1,
            uid: "u".into(),
            token: String::new(),
            device_id: "d".into(),
            device_flag: DeviceFlag::App,
            client_timestamp_ms: 0,
        })
    }

    #[test]
    fn only_connect_opens_a_session() {
        assert_eq!(step(Phase::Handshake, &connect()), Step::Authenticate);
        assert_eq!(
            step(Phase::Handshake, &Packet::Ping),
            Step::Refuse(ReasonCode::UnexpectedPacket)
        );
        assert_eq!(
            step(
                Phase::Handshake,
                &Packet::RecvAck(RecvAck {
                    message_id: 1,
                    message_seq: 1
                })
            ),
            Step::Refuse(ReasonCode::UnexpectedPacket)
        );
    }

    #[test]
    fn a_second_connect_or_a_server_packet_is_a_violation() {
        assert_eq!(
            step(Phase::Active, &connect()),
            Step::Refuse(ReasonCode::UnexpectedPacket)
        );
        assert_eq!(step(Phase::Active, &Packet::Pong), Step::Nothing);
        assert_eq!(step(Phase::Active, &Packet::Ping), Step::Pong);
        assert_eq!(step(Phase::Closing, &Packet::Ping), Step::Nothing);
    }
}
