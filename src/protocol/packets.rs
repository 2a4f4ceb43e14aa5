//! Owned packets: verified decoding out of a received frame, and encoding
//! into an output buffer with a reusable builder.

use super::framing::LENGTH_PREFIX_BYTES;
use super::wire;
use super::{ChannelType, DeviceFlag, ReasonCode};
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
            tables_max: 16,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvAck {
    pub message_id: u64,
    pub message_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub message: String,
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
                Packet::Recv(Recv {
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
                })
            }
            wire::Packet::RecvAck => {
                let p = root.packet_as_recv_ack().ok_or_else(missing)?;
                Packet::RecvAck(RecvAck {
                    message_id: p.message_id(),
                    message_seq: p.message_seq(),
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
                return encode_recv(
                    self,
                    &RecvFields {
                        message_id: p.message_id,
                        message_seq: p.message_seq,
                        client_msg_no: &p.client_msg_no,
                        from_uid: &p.from_uid,
                        channel_id: &p.channel_id,
                        channel_type: p.channel_type,
                        timestamp_ms: p.timestamp_ms,
                        flags: p.flags,
                        send_flags: p.send_flags,
                        payload: &p.payload,
                    },
                    out,
                );
            }
            Packet::RecvAck(p) => {
                let t = wire::RecvAck::create(
                    fbb,
                    &wire::RecvAckArgs {
                        message_id: p.message_id,
                        message_seq: p.message_seq,
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
        };
        self.finish(kind, offset, out);
    }
}

/// Appends one `Recv` frame built from borrowed fields to `out`.
pub fn encode_recv(encoder: &mut Encoder, recv: &RecvFields<'_>, out: &mut BytesMut) {
    let fbb = &mut encoder.fbb;
    let client_msg_no = fbb.create_string(recv.client_msg_no);
    let from_uid = fbb.create_string(recv.from_uid);
    let channel_id = fbb.create_string(recv.channel_id);
    let payload = fbb.create_vector(recv.payload);
    let t = wire::Recv::create(
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
    );
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
        }));
        round_trip(Packet::Ping);
        round_trip(Packet::Pong);
        round_trip(Packet::Disconnect(Disconnect {
            reason: ReasonCode::IdleTimeout,
            message: "bye".into(),
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
