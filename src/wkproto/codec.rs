//! WKProto packets and their byte layouts, protocol versions 2 to 6.
//!
//! A packet is a fixed header byte (`type << 4 | flags`), an MQTT-style
//! remaining length (7 bits per byte, least significant group first, at
//! most 4 bytes), and a body of big-endian integers, strings with a u16
//! length, and a payload that runs to the end of the packet. PING and
//! PONG are the header byte alone.
//!
//! What depends on the version (the one negotiated at CONNECT):
//!
//! | field | from version |
//! |---|---|
//! | CONNACK's server version byte (header bit 0) | 4 (sent iff the client's version is above 3) |
//! | CONNACK's node id | 4 |
//! | SEND's and RECV's `expire` | 3 |
//! | SEND's stream number, RECV's stream fields (setting bit 0x02) | 2 to 4 only |
//! | message seq as u64 (u32 before) in SENDACK, RECV, RECVACK | 6 |
//! | SENDACK's trailing client_msg_no | 6 |
//!
//! Decoding is total: any byte string gives a packet, "need more bytes",
//! or an error, never a panic, and nothing is allocated beyond the packet's
//! own length (which the caller bounds).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The oldest protocol version served.
pub const VERSION_MIN: u8 = 2;
/// The newest protocol version served; a newer client is answered in it.
pub const VERSION_MAX: u8 = 6;
/// The longest string a u16 length can carry (WuKongIM's codec treats the
/// length as signed).
pub const STRING_MAX_BYTES: usize = i16::MAX as usize;
/// The largest remaining length four varint bytes can express.
pub const REMAINING_LENGTH_MAX: usize = (1 << 28) - 1;

/// Packet type numbers (the high nibble of the header byte).
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const SEND: u8 = 3;
    pub const SENDACK: u8 = 4;
    pub const RECV: u8 = 5;
    pub const RECVACK: u8 = 6;
    pub const PING: u8 = 7;
    pub const PONG: u8 = 8;
    pub const DISCONNECT: u8 = 9;
    pub const SUB: u8 = 10;
    pub const SUBACK: u8 = 11;
}

/// Bits of the setting byte of SEND, RECV and SUB.
pub mod setting {
    pub const RECEIPT: u8 = 0x80;
    pub const NO_ENCRYPT: u8 = 0x10;
    pub const TOPIC: u8 = 0x08;
    pub const STREAM: u8 = 0x02;
}

/// WuKongIM's reason codes (the ones ruyi answers with).
pub mod reason {
    pub const UNKNOWN: u8 = 0;
    pub const SUCCESS: u8 = 1;
    pub const AUTH_FAIL: u8 = 2;
    pub const SUBSCRIBER_NOT_EXIST: u8 = 3;
    pub const IN_BLACKLIST: u8 = 4;
    pub const CHANNEL_NOT_EXIST: u8 = 5;
    pub const PAYLOAD_DECODE_ERROR: u8 = 9;
    pub const NOT_ALLOW_SEND: u8 = 11;
    pub const CONNECT_KICK: u8 = 12;
    pub const NOT_IN_WHITELIST: u8 = 13;
    pub const SYSTEM_ERROR: u8 = 15;
    pub const CHANNEL_ID_ERROR: u8 = 16;
    pub const BAN: u8 = 19;
    pub const CLIENT_KEY_IS_EMPTY: u8 = 21;
    pub const RATE_LIMIT: u8 = 22;
    pub const NOT_SUPPORT_CHANNEL_TYPE: u8 = 23;
    pub const DISBAND: u8 = 24;
    pub const SEND_BAN: u8 = 25;
    pub const PROTOCOL_UPGRADE_REQUIRED: u8 = 27;
    pub const IDEMPOTENCY_CONFLICT: u8 = 28;
}

/// The header flags of every packet but CONNACK.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    pub dup: bool,
    pub sync_once: bool,
    pub red_dot: bool,
    pub no_persist: bool,
}

impl Flags {
    pub fn bits(self) -> u8 {
        u8::from(self.dup) << 3
            | u8::from(self.sync_once) << 2
            | u8::from(self.red_dot) << 1
            | u8::from(self.no_persist)
    }

    pub fn from_bits(bits: u8) -> Flags {
        Flags {
            dup: bits & 0x08 != 0,
            sync_once: bits & 0x04 != 0,
            red_dot: bits & 0x02 != 0,
            no_persist: bits & 0x01 != 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: u8,
    pub device_flag: u8,
    pub device_id: String,
    pub uid: String,
    pub token: String,
    pub client_timestamp_ms: i64,
    /// Base64 of the client's X25519 public key.
    pub client_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Sent (header bit 0) only to clients of version 4 and later.
    pub server_version: Option<u8>,
    pub time_diff_ms: i64,
    pub reason: u8,
    pub server_key: String,
    pub salt: String,
    /// From version 4.
    pub node_id: u64,
}

/// Stream fields of versions 2 to 4 (setting bit 0x02). ruyi never sends
/// them, and a stream SEND is refused; they are decoded so such a packet
/// is read correctly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stream {
    pub flag: u8,
    pub no: String,
    pub id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub flags: Flags,
    pub setting: u8,
    pub client_seq: u32,
    pub client_msg_no: String,
    pub stream_no: Option<String>,
    pub channel_id: String,
    pub channel_type: u8,
    /// Seconds; from version 3.
    pub expire: u32,
    pub msg_key: String,
    pub topic: Option<String>,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendAck {
    pub flags: Flags,
    pub message_id: i64,
    pub client_seq: u32,
    pub message_seq: u64,
    pub reason: u8,
    /// Written from version 6.
    pub client_msg_no: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recv {
    pub flags: Flags,
    pub setting: u8,
    pub msg_key: String,
    pub from_uid: String,
    pub channel_id: String,
    pub channel_type: u8,
    pub expire: u32,
    pub client_msg_no: String,
    pub stream: Option<Stream>,
    pub message_id: i64,
    pub message_seq: u64,
    /// Unix seconds.
    pub timestamp: i32,
    pub topic: Option<String>,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvAck {
    pub flags: Flags,
    pub message_id: i64,
    pub message_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: u8,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sub {
    pub setting: u8,
    pub sub_no: String,
    pub channel_id: String,
    pub channel_type: u8,
    pub action: u8,
    pub param: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub sub_no: String,
    pub channel_id: String,
    pub channel_type: u8,
    pub action: u8,
    pub reason: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Send(Send),
    SendAck(SendAck),
    Recv(Recv),
    RecvAck(RecvAck),
    Ping,
    Pong,
    Disconnect(Disconnect),
    Sub(Sub),
    SubAck(SubAck),
}

impl Packet {
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Send(_) => "SEND",
            Packet::SendAck(_) => "SENDACK",
            Packet::Recv(_) => "RECV",
            Packet::RecvAck(_) => "RECVACK",
            Packet::Ping => "PING",
            Packet::Pong => "PONG",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Sub(_) => "SUB",
            Packet::SubAck(_) => "SUBACK",
        }
    }
}

/// Why bytes are not a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("unknown packet type {0}")]
    UnknownType(u8),
    #[error("remaining length is not a varint of at most 4 bytes")]
    BadLength,
    #[error("packet of {length} bytes is over the limit of {max}")]
    TooLong { length: usize, max: usize },
    #[error("{0} ends before its fields do")]
    Truncated(&'static str),
    #[error("{0} holds a string that is not UTF-8")]
    NotUtf8(&'static str),
    #[error("a string of {0} bytes is longer than WKProto's 32767")]
    StringTooLong(usize),
}

/// Splits a byte stream into packets: `Ok(None)` until a whole packet is
/// buffered. `version` is the negotiated one (ignored for CONNECT, which
/// has one layout); `max_length` bounds the remaining length.
pub fn decode(
    buf: &mut BytesMut,
    version: u8,
    max_length: usize,
) -> Result<Option<Packet>, CodecError> {
    let Some(&header) = buf.first() else {
        return Ok(None);
    };
    let kind = header >> 4;
    if kind == kind::PING || kind == kind::PONG {
        buf.advance(1);
        return Ok(Some(if kind == kind::PING {
            Packet::Ping
        } else {
            Packet::Pong
        }));
    }
    if !(kind::CONNECT..=kind::SUBACK).contains(&kind) {
        return Err(CodecError::UnknownType(kind));
    }
    let Some((length, length_bytes)) = remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    if length > max_length {
        return Err(CodecError::TooLong {
            length,
            max: max_length,
        });
    }
    if buf.len() < 1 + length_bytes + length {
        return Ok(None);
    }
    buf.advance(1 + length_bytes);
    let body = buf.split_to(length).freeze();
    decode_body(header, body, version).map(Some)
}

/// The remaining length and how many bytes it took; `None` when more
/// bytes are needed.
fn remaining_length(bytes: &[u8]) -> Result<Option<(usize, usize)>, CodecError> {
    let mut value = 0usize;
    for (i, &byte) in bytes.iter().enumerate().take(4) {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(CodecError::BadLength)
    } else {
        Ok(None)
    }
}

/// Reads a body's fields in order.
struct Reader {
    body: Bytes,
    what: &'static str,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), CodecError> {
        if self.body.remaining() < n {
            Err(CodecError::Truncated(self.what))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        self.need(1)?;
        Ok(self.body.get_u8())
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        self.need(4)?;
        Ok(self.body.get_u32())
    }

    fn i32(&mut self) -> Result<i32, CodecError> {
        self.need(4)?;
        Ok(self.body.get_i32())
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        self.need(8)?;
        Ok(self.body.get_u64())
    }

    fn i64(&mut self) -> Result<i64, CodecError> {
        self.need(8)?;
        Ok(self.body.get_i64())
    }

    fn seq(&mut self, version: u8) -> Result<u64, CodecError> {
        if version >= 6 {
            self.u64()
        } else {
            self.u32().map(u64::from)
        }
    }

    fn string(&mut self) -> Result<String, CodecError> {
        self.need(2)?;
        let length = usize::from(self.body.get_u16());
        if length > STRING_MAX_BYTES {
            return Err(CodecError::StringTooLong(length));
        }
        self.need(length)?;
        let bytes = self.body.split_to(length);
        String::from_utf8(bytes.to_vec()).map_err(|_| CodecError::NotUtf8(self.what))
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.body)
    }
}

fn decode_body(header: u8, body: Bytes, version: u8) -> Result<Packet, CodecError> {
    let kind = header >> 4;
    let flags = Flags::from_bits(header & 0x0f);
    let mut r = Reader {
        body,
        what: "packet",
    };
    Ok(match kind {
        kind::CONNECT => {
            r.what = "CONNECT";
            Packet::Connect(Connect {
                version: r.u8()?,
                device_flag: r.u8()?,
                device_id: r.string()?,
                uid: r.string()?,
                token: r.string()?,
                client_timestamp_ms: r.i64()?,
                client_key: r.string()?,
            })
        }
        kind::CONNACK => {
            r.what = "CONNACK";
            let server_version = if header & 0x01 != 0 {
                Some(r.u8()?)
            } else {
                None
            };
            let time_diff_ms = r.i64()?;
            let reason = r.u8()?;
            let server_key = r.string()?;
            let salt = r.string()?;
            let node_id = if version >= 4 { r.u64()? } else { 0 };
            Packet::ConnAck(ConnAck {
                server_version,
                time_diff_ms,
                reason,
                server_key,
                salt,
                node_id,
            })
        }
        kind::SEND => {
            r.what = "SEND";
            let setting = r.u8()?;
            let client_seq = r.u32()?;
            let client_msg_no = r.string()?;
            let stream_no = if version < 5 && setting & setting::STREAM != 0 {
                Some(r.string()?)
            } else {
                None
            };
            let channel_id = r.string()?;
            let channel_type = r.u8()?;
            let expire = if version >= 3 { r.u32()? } else { 0 };
            let msg_key = r.string()?;
            let topic = if setting & setting::TOPIC != 0 {
                Some(r.string()?)
            } else {
                None
            };
            Packet::Send(Send {
                flags,
                setting,
                client_seq,
                client_msg_no,
                stream_no,
                channel_id,
                channel_type,
                expire,
                msg_key,
                topic,
                payload: r.rest(),
            })
        }
        kind::SENDACK => {
            r.what = "SENDACK";
            let message_id = r.i64()?;
            let client_seq = r.u32()?;
            let message_seq = r.seq(version)?;
            let reason = r.u8()?;
            let client_msg_no = if version >= 6 && r.body.has_remaining() {
                r.string()?
            } else {
                String::new()
            };
            Packet::SendAck(SendAck {
                flags,
                message_id,
                client_seq,
                message_seq,
                reason,
                client_msg_no,
            })
        }
        kind::RECV => {
            r.what = "RECV";
            let setting = r.u8()?;
            let msg_key = r.string()?;
            let from_uid = r.string()?;
            let channel_id = r.string()?;
            let channel_type = r.u8()?;
            let expire = if version >= 3 { r.u32()? } else { 0 };
            let client_msg_no = r.string()?;
            let stream = if version < 5 && setting & setting::STREAM != 0 {
                Some(Stream {
                    flag: r.u8()?,
                    no: r.string()?,
                    id: r.u64()?,
                })
            } else {
                None
            };
            let message_id = r.i64()?;
            let message_seq = r.seq(version)?;
            let timestamp = r.i32()?;
            let topic = if setting & setting::TOPIC != 0 {
                Some(r.string()?)
            } else {
                None
            };
            Packet::Recv(Recv {
                flags,
                setting,
                msg_key,
                from_uid,
                channel_id,
                channel_type,
                expire,
                client_msg_no,
                stream,
                message_id,
                message_seq,
                timestamp,
                topic,
                payload: r.rest(),
            })
        }
        kind::RECVACK => {
            r.what = "RECVACK";
            Packet::RecvAck(RecvAck {
                flags,
                message_id: r.i64()?,
                message_seq: r.seq(version)?,
            })
        }
        kind::DISCONNECT => {
            r.what = "DISCONNECT";
            Packet::Disconnect(Disconnect {
                reason: r.u8()?,
                message: r.string()?,
            })
        }
        kind::SUB => {
            r.what = "SUB";
            Packet::Sub(Sub {
                setting: r.u8()?,
                sub_no: r.string()?,
                channel_id: r.string()?,
                channel_type: r.u8()?,
                action: r.u8()?,
                param: r.string()?,
            })
        }
        kind::SUBACK => {
            r.what = "SUBACK";
            Packet::SubAck(SubAck {
                sub_no: r.string()?,
                channel_id: r.string()?,
                channel_type: r.u8()?,
                action: r.u8()?,
                reason: r.u8()?,
            })
        }
        other => return Err(CodecError::UnknownType(other)),
    })
}

/// Writes a body's fields in order.
struct Writer {
    body: BytesMut,
}

impl Writer {
    fn string(&mut self, s: &str) -> Result<(), CodecError> {
        if s.len() > STRING_MAX_BYTES {
            return Err(CodecError::StringTooLong(s.len()));
        }
        self.body.put_u16(s.len() as u16);
        self.body.put_slice(s.as_bytes());
        Ok(())
    }

    fn seq(&mut self, version: u8, seq: u64) {
        if version >= 6 {
            self.body.put_u64(seq);
        } else {
            // Versions before 6 carry 32 bits; ruyi never hands out a
            // seq above that to such a client (the translator checks).
            self.body.put_u32(seq as u32);
        }
    }
}

/// Appends `packet` as `version` lays it out. Fails only on a string
/// longer than WKProto can carry.
pub fn encode(packet: &Packet, version: u8, out: &mut BytesMut) -> Result<(), CodecError> {
    let mut w = Writer {
        body: BytesMut::new(),
    };
    let header = match packet {
        Packet::Ping => {
            out.put_u8(kind::PING << 4);
            return Ok(());
        }
        Packet::Pong => {
            out.put_u8(kind::PONG << 4);
            return Ok(());
        }
        Packet::Connect(p) => {
            w.body.put_u8(p.version);
            w.body.put_u8(p.device_flag);
            w.string(&p.device_id)?;
            w.string(&p.uid)?;
            w.string(&p.token)?;
            w.body.put_i64(p.client_timestamp_ms);
            w.string(&p.client_key)?;
            kind::CONNECT << 4
        }
        Packet::ConnAck(p) => {
            if let Some(server_version) = p.server_version {
                w.body.put_u8(server_version);
            }
            w.body.put_i64(p.time_diff_ms);
            w.body.put_u8(p.reason);
            w.string(&p.server_key)?;
            w.string(&p.salt)?;
            if version >= 4 {
                w.body.put_u64(p.node_id);
            }
            kind::CONNACK << 4 | u8::from(p.server_version.is_some())
        }
        Packet::Send(p) => {
            w.body.put_u8(p.setting);
            w.body.put_u32(p.client_seq);
            w.string(&p.client_msg_no)?;
            if version < 5 && p.setting & setting::STREAM != 0 {
                w.string(p.stream_no.as_deref().unwrap_or(""))?;
            }
            w.string(&p.channel_id)?;
            w.body.put_u8(p.channel_type);
            if version >= 3 {
                w.body.put_u32(p.expire);
            }
            w.string(&p.msg_key)?;
            if p.setting & setting::TOPIC != 0 {
                w.string(p.topic.as_deref().unwrap_or(""))?;
            }
            w.body.put_slice(&p.payload);
            kind::SEND << 4 | p.flags.bits()
        }
        Packet::SendAck(p) => {
            w.body.put_i64(p.message_id);
            w.body.put_u32(p.client_seq);
            w.seq(version, p.message_seq);
            w.body.put_u8(p.reason);
            if version >= 6 && !p.client_msg_no.is_empty() {
                w.string(&p.client_msg_no)?;
            }
            kind::SENDACK << 4 | p.flags.bits()
        }
        Packet::Recv(p) => {
            w.body.put_u8(p.setting);
            w.string(&p.msg_key)?;
            w.string(&p.from_uid)?;
            w.string(&p.channel_id)?;
            w.body.put_u8(p.channel_type);
            if version >= 3 {
                w.body.put_u32(p.expire);
            }
            w.string(&p.client_msg_no)?;
            if version < 5 && p.setting & setting::STREAM != 0 {
                let stream = p.stream.clone().unwrap_or_default();
                w.body.put_u8(stream.flag);
                w.string(&stream.no)?;
                w.body.put_u64(stream.id);
            }
            w.body.put_i64(p.message_id);
            w.seq(version, p.message_seq);
            w.body.put_i32(p.timestamp);
            if p.setting & setting::TOPIC != 0 {
                w.string(p.topic.as_deref().unwrap_or(""))?;
            }
            w.body.put_slice(&p.payload);
            kind::RECV << 4 | p.flags.bits()
        }
        Packet::RecvAck(p) => {
            w.body.put_i64(p.message_id);
            w.seq(version, p.message_seq);
            kind::RECVACK << 4 | p.flags.bits()
        }
        Packet::Disconnect(p) => {
            w.body.put_u8(p.reason);
            w.string(&p.message)?;
            kind::DISCONNECT << 4
        }
        Packet::Sub(p) => {
            w.body.put_u8(p.setting);
            w.string(&p.sub_no)?;
            w.string(&p.channel_id)?;
            w.body.put_u8(p.channel_type);
            w.body.put_u8(p.action);
            w.string(&p.param)?;
            kind::SUB << 4
        }
        Packet::SubAck(p) => {
            w.string(&p.sub_no)?;
            w.string(&p.channel_id)?;
            w.body.put_u8(p.channel_type);
            w.body.put_u8(p.action);
            w.body.put_u8(p.reason);
            kind::SUBACK << 4
        }
    };
    if w.body.len() > REMAINING_LENGTH_MAX {
        return Err(CodecError::TooLong {
            length: w.body.len(),
            max: REMAINING_LENGTH_MAX,
        });
    }
    out.put_u8(header);
    let mut length = w.body.len();
    loop {
        let mut byte = (length & 0x7f) as u8;
        length >>= 7;
        if length > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if length == 0 {
            break;
        }
    }
    out.put_slice(&w.body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_all(bytes: &[u8], version: u8) -> Packet {
        let mut buf = BytesMut::from(bytes);
        let packet = decode(&mut buf, version, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty(), "bytes left over");
        packet
    }

    fn encoded(packet: &Packet, version: u8) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(packet, version, &mut out).unwrap();
        out.to_vec()
    }

    // The vectors are WuKongIM's layouts as its JS SDK 1.0.4 writes and
    // accepts them (captured from the SDK running under Node 20).

    #[test]
    fn a_captured_sdk_connect_decodes() {
        let mut bytes = vec![0x10, 0x63, 0x02, 0x01];
        for s in ["39b3d22aee9adcb8e43a799684ebe541W", "u1", "t1"] {
            bytes.extend_from_slice(&(s.len() as u16).to_be_bytes());
            bytes.extend_from_slice(s.as_bytes());
        }
        bytes.extend_from_slice(&hex("000001a22cc5ea7e"));
        let key = "luLbnWfF1I86ORfvcTzecJ5xTBpK3SnDb0b0M/PL/AA=";
        bytes.extend_from_slice(&(key.len() as u16).to_be_bytes());
        bytes.extend_from_slice(key.as_bytes());
        let Packet::Connect(connect) = decode_all(&bytes, 0) else {
            panic!("not a CONNECT");
        };
        assert_eq!(connect.version, 2);
        assert_eq!(connect.device_flag, 1);
        assert_eq!(connect.device_id, "39b3d22aee9adcb8e43a799684ebe541W");
        assert_eq!((connect.uid.as_str(), connect.token.as_str()), ("u1", "t1"));
        assert_eq!(connect.client_timestamp_ms, 0x01a2_2cc5_ea7e);
        assert_eq!(connect.client_key, key);
        assert_eq!(encoded(&Packet::Connect(connect), 2), bytes);
    }

    #[test]
    fn the_sdk_send_vector_decodes_and_encodes_byte_for_byte() {
        let bytes = hex("326100000000010007636d6e303030310002753201002066653564656565623663643737333637623839396265323663363238346262347467415a4d4432307555646f48774d57443172696263355a4365682b526d72414d4648484458626b7134453d");
        let Packet::Send(send) = decode_all(&bytes, 2) else {
            panic!("not a SEND");
        };
        assert!(send.flags.red_dot);
        assert_eq!(send.client_seq, 1);
        assert_eq!(send.client_msg_no, "cmn0001");
        assert_eq!((send.channel_id.as_str(), send.channel_type), ("u2", 1));
        assert_eq!(send.msg_key, "fe5deeeb6cd77367b899be26c6284bb4");
        assert_eq!(
            &send.payload[..],
            b"tgAZMD20uUdoHwMWD1ribc5ZCeh+RmrAMFHHDXbkq4E="
        );
        assert_eq!(encoded(&Packet::Send(send), 2), bytes);
    }

    #[test]
    fn the_sdk_recv_vector_encodes_byte_for_byte() {
        let bytes = hex("527100002065663730373733313264323966313237393734306538366639396337653730310002753200027532010007636d6e30303032112210f47de98115000000076553f10071456a73345649684e7459336872464d78506e4d59656978734f2f734c455a46373359522b4a62353441413d");
        let recv = Recv {
            flags: Flags {
                red_dot: true,
                ..Flags::default()
            },
            setting: 0,
            msg_key: "ef7077312d29f1279740e86f99c7e701".into(),
            from_uid: "u2".into(),
            channel_id: "u2".into(),
            channel_type: 1,
            expire: 0,
            client_msg_no: "cmn0002".into(),
            stream: None,
            message_id: 1234567890123456789,
            message_seq: 7,
            timestamp: 1700000000,
            topic: None,
            payload: Bytes::from_static(b"qEjs4VIhNtY3hrFMxPnMYeixsO/sLEZF73YR+Jb54AA="),
        };
        assert_eq!(encoded(&Packet::Recv(recv.clone()), 2), bytes);
        assert_eq!(decode_all(&bytes, 2), Packet::Recv(recv));
    }

    #[test]
    fn sendack_recvack_and_disconnect_match_wukongims_bytes() {
        let ack = Packet::SendAck(SendAck {
            flags: Flags::default(),
            message_id: 0x112210f47de98115,
            client_seq: 1,
            message_seq: 7,
            reason: 1,
            client_msg_no: String::new(),
        });
        assert_eq!(
            encoded(&ack, 2),
            hex("4011112210f47de98115000000010000000701")
        );
        let recvack = hex("620c112210f47de9811500000007");
        assert_eq!(
            decode_all(&recvack, 2),
            Packet::RecvAck(RecvAck {
                flags: Flags {
                    red_dot: true,
                    ..Flags::default()
                },
                message_id: 0x112210f47de98115,
                message_seq: 7,
            })
        );
        let mut kick = hex("90180c0015");
        kick.extend_from_slice(b"login in other device");
        assert_eq!(
            encoded(
                &Packet::Disconnect(Disconnect {
                    reason: reason::CONNECT_KICK,
                    message: "login in other device".into(),
                }),
                2
            ),
            kick
        );
    }

    #[test]
    fn connack_carries_the_server_version_and_node_id_only_from_version_4() {
        let salt = "abcdef1234567890";
        let key = "B6N8vBQgk8i3VdwbEOhstCY3StFqqFPtC9/AsrhtHHw=";
        let v2 = ConnAck {
            server_version: None,
            time_diff_ms: -15,
            reason: 1,
            server_key: key.into(),
            salt: salt.into(),
            node_id: 0,
        };
        let bytes = encoded(&Packet::ConnAck(v2.clone()), 2);
        assert_eq!(&bytes[..11], &hex("2049fffffffffffffff101"));
        assert_eq!(bytes.len(), 2 + 0x49);
        assert_eq!(decode_all(&bytes, 2), Packet::ConnAck(v2));
        let v5 = ConnAck {
            server_version: Some(5),
            time_diff_ms: 0,
            reason: 1,
            server_key: key.into(),
            salt: salt.into(),
            node_id: 1001,
        };
        let bytes = encoded(&Packet::ConnAck(v5.clone()), 5);
        assert_eq!(&bytes[..3], &hex("215205"));
        assert_eq!(&bytes[bytes.len() - 8..], &1001u64.to_be_bytes());
        assert_eq!(decode_all(&bytes, 5), Packet::ConnAck(v5));
    }

    /// Every packet at every version, as WuKongIM's own Go codecs write
    /// them: the current server's `pkg/protocol/codec` (versions 2 to 6,
    /// WuKongIM/WuKongIM b249d3a) and `WuKongIMGoProto` (2 to 5, 8d39c2d),
    /// which agree byte for byte on 2 to 5. The vectors were printed by a
    /// small Go program that encodes the packets `vector_packet` builds here
    /// with the same field values, and decoded back by the same codecs.
    const GO_CODEC_VECTORS: &[(&str, u8, &str)] = &[
        ("connect", 2, "102b020100056465762d310005616c6963650003746f6b0000018bcfe5687b000c593278705a57353061325635"),
        ("connack", 2, "2029fffffffffffffff101000c63325679646d567961325635001061626364656631323334353637383930"),
        ("send", 2, "332608000000070005636d6e2d370003626f620100026d6b0002743163474635624739685a413d3d"),
        ("send_stream", 2, "301d02000000080005636d6e2d3800027331000267310200026d6b65413d3d"),
        ("sendack", 2, "4011112210f47de98115000000070000000901"),
        ("recv", 2, "5c3b0800026d6b0005616c6963650005616c696365010005636d6e2d37fffffffffffffffb000000096553f1000002743163474635624739685a413d3d"),
        ("recvack", 2, "620c112210f47de9811500000009"),
        ("disconnect", 2, "90180c00156c6f67696e20696e206f7468657220646576696365"),
        ("ping", 2, "70"),
        ("pong", 2, "80"),
        ("sub", 2, "a0130000057375622d3100046c6976650500000170"),
        ("suback", 2, "b01000057375622d3100046c697665050101"),
        ("connect", 3, "102b030100056465762d310005616c6963650003746f6b0000018bcfe5687b000c593278705a57353061325635"),
        ("connack", 3, "2029fffffffffffffff101000c63325679646d567961325635001061626364656631323334353637383930"),
        ("send", 3, "332a08000000070005636d6e2d370003626f62010000003c00026d6b0002743163474635624739685a413d3d"),
        ("send_stream", 3, "302102000000080005636d6e2d380002733100026731020000003c00026d6b65413d3d"),
        ("sendack", 3, "4011112210f47de98115000000070000000901"),
        ("recv", 3, "5c3f0800026d6b0005616c6963650005616c696365010000003c0005636d6e2d37fffffffffffffffb000000096553f1000002743163474635624739685a413d3d"),
        ("recvack", 3, "620c112210f47de9811500000009"),
        ("disconnect", 3, "90180c00156c6f67696e20696e206f7468657220646576696365"),
        ("ping", 3, "70"),
        ("pong", 3, "80"),
        ("sub", 3, "a0130000057375622d3100046c6976650500000170"),
        ("suback", 3, "b01000057375622d3100046c697665050101"),
        ("connect", 4, "102b040100056465762d310005616c6963650003746f6b0000018bcfe5687b000c593278705a57353061325635"),
        ("connack", 4, "213204fffffffffffffff101000c63325679646d56796132563500106162636465663132333435363738393000000000000003e9"),
        ("send", 4, "332a08000000070005636d6e2d370003626f62010000003c00026d6b0002743163474635624739685a413d3d"),
        ("send_stream", 4, "302102000000080005636d6e2d380002733100026731020000003c00026d6b65413d3d"),
        ("sendack", 4, "4011112210f47de98115000000070000000901"),
        ("recv", 4, "5c3f0800026d6b0005616c6963650005616c696365010000003c0005636d6e2d37fffffffffffffffb000000096553f1000002743163474635624739685a413d3d"),
        ("recvack", 4, "620c112210f47de9811500000009"),
        ("disconnect", 4, "90180c00156c6f67696e20696e206f7468657220646576696365"),
        ("ping", 4, "70"),
        ("pong", 4, "80"),
        ("sub", 4, "a0130000057375622d3100046c6976650500000170"),
        ("suback", 4, "b01000057375622d3100046c697665050101"),
        ("connect", 5, "102b050100056465762d310005616c6963650003746f6b0000018bcfe5687b000c593278705a57353061325635"),
        ("connack", 5, "213205fffffffffffffff101000c63325679646d56796132563500106162636465663132333435363738393000000000000003e9"),
        ("send", 5, "332a08000000070005636d6e2d370003626f62010000003c00026d6b0002743163474635624739685a413d3d"),
        ("sendack", 5, "4011112210f47de98115000000070000000901"),
        ("recv", 5, "5c3f0800026d6b0005616c6963650005616c696365010000003c0005636d6e2d37fffffffffffffffb000000096553f1000002743163474635624739685a413d3d"),
        ("recvack", 5, "620c112210f47de9811500000009"),
        ("disconnect", 5, "90180c00156c6f67696e20696e206f7468657220646576696365"),
        ("ping", 5, "70"),
        ("pong", 5, "80"),
        ("sub", 5, "a0130000057375622d3100046c6976650500000170"),
        ("suback", 5, "b01000057375622d3100046c697665050101"),
        ("connect", 6, "102b060100056465762d310005616c6963650003746f6b0000018bcfe5687b000c593278705a57353061325635"),
        ("connack", 6, "213206fffffffffffffff101000c63325679646d56796132563500106162636465663132333435363738393000000000000003e9"),
        ("send", 6, "332a08000000070005636d6e2d370003626f62010000003c00026d6b0002743163474635624739685a413d3d"),
        ("sendack", 6, "4015112210f47de9811500000007000001000000000901"),
        ("recv", 6, "5c430800026d6b0005616c6963650005616c696365010000003c0005636d6e2d37fffffffffffffffb00000100000000096553f1000002743163474635624739685a413d3d"),
        ("recvack", 6, "6210112210f47de981150000010000000009"),
        ("disconnect", 6, "90180c00156c6f67696e20696e206f7468657220646576696365"),
        ("ping", 6, "70"),
        ("pong", 6, "80"),
        ("sub", 6, "a0130000057375622d3100046c6976650500000170"),
        ("suback", 6, "b01000057375622d3100046c697665050101"),
    ];

    fn vector_packet(name: &str, version: u8) -> Packet {
        let seq = if version >= 6 { (1 << 40) + 9 } else { 9 };
        let expire = if version >= 3 { 60 } else { 0 };
        match name {
            "connect" => Packet::Connect(Connect {
                version,
                device_flag: 1,
                device_id: "dev-1".into(),
                uid: "alice".into(),
                token: "tok".into(),
                client_timestamp_ms: 1_700_000_000_123,
                client_key: "Y2xpZW50a2V5".into(),
            }),
            "connack" => Packet::ConnAck(ConnAck {
                server_version: (version > 3).then_some(version),
                time_diff_ms: -15,
                reason: reason::SUCCESS,
                server_key: "c2VydmVya2V5".into(),
                salt: "abcdef1234567890".into(),
                node_id: if version >= 4 { 1001 } else { 0 },
            }),
            "send" => Packet::Send(Send {
                flags: Flags {
                    red_dot: true,
                    no_persist: true,
                    ..Flags::default()
                },
                setting: setting::TOPIC,
                client_seq: 7,
                client_msg_no: "cmn-7".into(),
                stream_no: None,
                channel_id: "bob".into(),
                channel_type: 1,
                expire,
                msg_key: "mk".into(),
                topic: Some("t1".into()),
                payload: Bytes::from_static(b"cGF5bG9hZA=="),
            }),
            "send_stream" => Packet::Send(Send {
                flags: Flags::default(),
                setting: setting::STREAM,
                client_seq: 8,
                client_msg_no: "cmn-8".into(),
                stream_no: Some("s1".into()),
                channel_id: "g1".into(),
                channel_type: 2,
                expire,
                msg_key: "mk".into(),
                topic: None,
                payload: Bytes::from_static(b"eA=="),
            }),
            "sendack" => Packet::SendAck(SendAck {
                flags: Flags::default(),
                message_id: 0x1122_10f4_7de9_8115,
                client_seq: 7,
                message_seq: seq,
                reason: reason::SUCCESS,
                client_msg_no: String::new(),
            }),
            "recv" => Packet::Recv(Recv {
                flags: Flags {
                    dup: true,
                    sync_once: true,
                    ..Flags::default()
                },
                setting: setting::TOPIC,
                msg_key: "mk".into(),
                from_uid: "alice".into(),
                channel_id: "alice".into(),
                channel_type: 1,
                expire,
                client_msg_no: "cmn-7".into(),
                stream: None,
                message_id: -5,
                message_seq: seq,
                timestamp: 1_700_000_000,
                topic: Some("t1".into()),
                payload: Bytes::from_static(b"cGF5bG9hZA=="),
            }),
            "recvack" => Packet::RecvAck(RecvAck {
                flags: Flags {
                    red_dot: true,
                    ..Flags::default()
                },
                message_id: 0x1122_10f4_7de9_8115,
                message_seq: seq,
            }),
            "disconnect" => Packet::Disconnect(Disconnect {
                reason: reason::CONNECT_KICK,
                message: "login in other device".into(),
            }),
            "ping" => Packet::Ping,
            "pong" => Packet::Pong,
            "sub" => Packet::Sub(Sub {
                setting: 0,
                sub_no: "sub-1".into(),
                channel_id: "live".into(),
                channel_type: 5,
                action: 0,
                param: "p".into(),
            }),
            "suback" => Packet::SubAck(SubAck {
                sub_no: "sub-1".into(),
                channel_id: "live".into(),
                channel_type: 5,
                action: 1,
                reason: reason::SUCCESS,
            }),
            other => panic!("no packet named {other}"),
        }
    }

    #[test]
    fn every_packet_of_versions_2_to_6_matches_wukongims_go_codecs() {
        let mut seen = std::collections::BTreeSet::new();
        for &(name, version, bytes) in GO_CODEC_VECTORS {
            let bytes = hex(bytes);
            let packet = vector_packet(name, version);
            assert_eq!(
                encoded(&packet, version),
                bytes,
                "{name} encoded at version {version}"
            );
            assert_eq!(
                decode_all(&bytes, version),
                packet,
                "{name} decoded at version {version}"
            );
            seen.insert((name, version));
        }
        for version in 2..=6 {
            for name in ["connect", "connack", "send", "sendack", "recv", "recvack"] {
                assert!(seen.contains(&(name, version)), "{name} v{version}");
            }
        }
        // The one layout the versions disagree on beyond the fields above: a
        // SEND's stream number is read only before version 5.
        assert!((2..=4).all(|v| seen.contains(&("send_stream", v))));
    }

    #[test]
    fn ping_and_pong_are_one_byte() {
        assert_eq!(encoded(&Packet::Ping, 2), [0x70]);
        assert_eq!(encoded(&Packet::Pong, 2), [0x80]);
        let mut buf = BytesMut::from(&[0x70, 0x70][..]);
        assert_eq!(decode(&mut buf, 2, 100).unwrap(), Some(Packet::Ping));
        assert_eq!(decode(&mut buf, 2, 100).unwrap(), Some(Packet::Ping));
        assert_eq!(decode(&mut buf, 2, 100).unwrap(), None);
    }

    #[test]
    fn the_remaining_length_is_mqtts_varint() {
        let send = |payload: usize| {
            Packet::Send(Send {
                flags: Flags::default(),
                setting: 0,
                client_seq: 1,
                client_msg_no: String::new(),
                stream_no: None,
                channel_id: String::new(),
                channel_type: 1,
                expire: 0,
                msg_key: String::new(),
                topic: None,
                payload: Bytes::from(vec![b'x'; payload]),
            })
        };
        // 12 bytes of fields before the payload at version 2.
        assert_eq!(&encoded(&send(97 - 12), 2)[..2], &[0x30, 0x61]);
        assert_eq!(&encoded(&send(200 - 12), 2)[..3], &[0x30, 0xc8, 0x01]);
        let big = encoded(&send(300_000), 2);
        assert_eq!(decode_all(&big, 2), send(300_000));
    }

    #[test]
    fn fields_appear_and_widen_by_version() {
        let recv = |version: u8| Recv {
            flags: Flags::default(),
            setting: setting::TOPIC,
            msg_key: "k".into(),
            from_uid: "a".into(),
            channel_id: "b".into(),
            channel_type: 2,
            expire: if version >= 3 { 60 } else { 0 },
            client_msg_no: "c".into(),
            stream: None,
            message_id: -5,
            message_seq: if version >= 6 { 1 << 40 } else { 9 },
            timestamp: 1,
            topic: Some("t".into()),
            payload: Bytes::from_static(b"p"),
        };
        let lengths: Vec<usize> = (2..=6)
            .map(|version| {
                let packet = Packet::Recv(recv(version));
                let bytes = encoded(&packet, version);
                assert_eq!(decode_all(&bytes, version), packet, "version {version}");
                bytes.len()
            })
            .collect();
        // +4 for expire at 3, +4 for the u64 seq at 6.
        assert_eq!(lengths[1], lengths[0] + 4);
        assert_eq!(lengths[2], lengths[1]);
        assert_eq!(lengths[3], lengths[2]);
        assert_eq!(lengths[4], lengths[3] + 4);
    }

    #[test]
    fn streams_are_read_only_before_version_5() {
        let send = Send {
            flags: Flags::default(),
            setting: setting::STREAM,
            client_seq: 3,
            client_msg_no: "m".into(),
            stream_no: Some("s1".into()),
            channel_id: "g".into(),
            channel_type: 2,
            expire: 0,
            msg_key: "k".into(),
            topic: None,
            payload: Bytes::from_static(b"x"),
        };
        for version in 2..=4 {
            let bytes = encoded(&Packet::Send(send.clone()), version);
            let Packet::Send(back) = decode_all(&bytes, version) else {
                panic!()
            };
            assert_eq!(back.stream_no.as_deref(), Some("s1"));
        }
        let bytes = encoded(&Packet::Send(send), 5);
        let Packet::Send(back) = decode_all(&bytes, 5) else {
            panic!()
        };
        assert_eq!(back.stream_no, None);
    }

    #[test]
    fn bad_input_is_an_error_or_a_wait_never_a_panic() {
        let decode1 = |bytes: &[u8]| decode(&mut BytesMut::from(bytes), 2, 1000);
        assert_eq!(decode1(&[]), Ok(None));
        assert_eq!(decode1(&[0x30]), Ok(None));
        assert_eq!(decode1(&[0x30, 0x80, 0x80]), Ok(None));
        assert_eq!(
            decode1(&[0x30, 0x80, 0x80, 0x80, 0x80]),
            Err(CodecError::BadLength)
        );
        assert_eq!(decode1(&[0x00, 0x00]), Err(CodecError::UnknownType(0)));
        assert_eq!(decode1(&[0xf0, 0x00]), Err(CodecError::UnknownType(15)));
        assert_eq!(
            decode1(&[0x30, 0xe9, 0x07]),
            Err(CodecError::TooLong {
                length: 1001,
                max: 1000
            })
        );
        assert_eq!(
            decode1(&[0x30, 0x02, 0x00, 0x00]),
            Err(CodecError::Truncated("SEND"))
        );
        assert_eq!(
            decode1(&[0x90, 0x04, 0x01, 0x00, 0x01, 0xff]),
            Err(CodecError::NotUtf8("DISCONNECT"))
        );
        assert_eq!(
            decode1(&[0x90, 0x03, 0x01, 0xff, 0xff]),
            Err(CodecError::StringTooLong(65535))
        );
    }

    #[test]
    fn an_overlong_string_is_refused_at_encode() {
        let packet = Packet::Disconnect(Disconnect {
            reason: 1,
            message: "x".repeat(STRING_MAX_BYTES + 1),
        });
        assert_eq!(
            encode(&packet, 2, &mut BytesMut::new()),
            Err(CodecError::StringTooLong(STRING_MAX_BYTES + 1))
        );
    }
}
