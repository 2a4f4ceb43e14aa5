//! One WKProto connection's translator: WKProto packets from the client
//! become ruyi frames for the shard, and ruyi frames for the client become
//! WKProto packets, so the shard logic, its guarantees, limits and
//! hostile-input rules are the same for both protocols.
//!
//! It is a state machine with no I/O ([`super::io::WkIo`] runs it over a
//! socket or a WebSocket), so it is tested and fuzzed on its own.
//!
//! What it does beyond re-encoding:
//! - CONNECT carries the client's X25519 key; the translator answers the
//!   key agreement in CONNACK and from then on decrypts SEND payloads
//!   (after checking their msgKey) and encrypts RECV payloads. ruyi stores
//!   plaintext, so native and WKProto clients read the same messages.
//! - A SEND whose msgKey or payload does not check out is answered with a
//!   SENDACK carrying WuKongIM's `PayloadDecodeError` here, and never
//!   reaches the shard.
//! - WuKongIM's header flags (red dot, sync once, no persist) travel as
//!   the message's application flags, so a WKProto receiver gets them back;
//!   a redelivery carries DUP.
//! - Packets a client of that version cannot decode are never sent: ruyi
//!   packets with no WKProto counterpart (recall events, conversation
//!   updates) are dropped and counted.

use super::codec::{self, reason, setting, Flags, Packet as Wk};
use super::crypto::{self, Cipher, Handshake};
use crate::protocol::{
    ChannelType, DeviceFlag, Encoder, FrameDecoder, Packet, ReasonCode, VerifyLimits,
    RECV_FLAG_FROM_SELF, RECV_FLAG_REDELIVERED,
};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;

/// The application-flag bits a WKProto SEND's header flags are stored as
/// (and read back from for a WKProto RECV).
pub const APP_FLAG_NO_PERSIST: u8 = 1 << 0;
pub const APP_FLAG_RED_DOT: u8 = 1 << 1;
pub const APP_FLAG_SYNC_ONCE: u8 = 1 << 2;

/// Room left under the frame limit for what the shard's FlatBuffers
/// verifier counts beyond a frame's bytes (alignment padding, string
/// terminators) in the few strings and one vector of a translated frame.
const VERIFY_SLACK_BYTES: usize = 64;

/// What a translator needs to know of the server.
#[derive(Debug, Clone)]
pub struct TranslatorConfig {
    /// The largest WKProto packet and ruyi frame accepted
    /// (`limits.frame_size_max_bytes`).
    pub frame_size_max_bytes: usize,
    /// The node id CONNACK reports from version 4.
    pub node_id: u64,
}

/// How far the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing but CONNECT is accepted.
    AwaitConnect,
    /// CONNECT went to the shard as `Connect`; its `ConnAck` becomes
    /// CONNACK. Nothing else is read meanwhile.
    AwaitConnAck,
    Active,
    /// A DISCONNECT (or a refusing CONNACK) is the last packet; the
    /// connection ends once it is written.
    Closing,
}

/// Counters of what could not be translated.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TranslatorStats {
    /// ruyi packets with no WKProto counterpart, not sent.
    pub dropped_for_client: u64,
    /// SENDs refused here (bad msgKey or payload, stream, channel type).
    pub refused_sends: u64,
}

pub struct Translator {
    config: TranslatorConfig,
    phase: Phase,
    /// The negotiated version (the client's, capped at
    /// [`codec::VERSION_MAX`]).
    version: u8,
    client_version: u8,
    client_timestamp_ms: i64,
    handshake: Option<Handshake>,
    salt: [u8; crypto::SALT_LEN],
    cipher: Option<Cipher>,
    from_client: BytesMut,
    from_server: BytesMut,
    to_server: BytesMut,
    to_client: VecDeque<Bytes>,
    frames: FrameDecoder,
    verify: VerifyLimits,
    encoder: Encoder,
    fixed_keys: Option<([u8; 32], [u8; crypto::SALT_LEN])>,
    pub stats: TranslatorStats,
}

impl Translator {
    pub fn new(config: TranslatorConfig) -> Translator {
        Translator::with_keys(config, None)
    }

    /// A translator whose server key and salt are these instead of random
    /// ones, so a test or a fuzz input replays exactly.
    pub fn with_keys(
        config: TranslatorConfig,
        keys: Option<([u8; 32], [u8; crypto::SALT_LEN])>,
    ) -> Translator {
        Translator {
            fixed_keys: keys,
            frames: FrameDecoder::new(config.frame_size_max_bytes),
            verify: VerifyLimits::for_frame_size(config.frame_size_max_bytes),
            config,
            phase: Phase::AwaitConnect,
            version: codec::VERSION_MIN,
            client_version: 0,
            client_timestamp_ms: 0,
            handshake: None,
            salt: [0; crypto::SALT_LEN],
            cipher: None,
            from_client: BytesMut::new(),
            from_server: BytesMut::new(),
            to_server: BytesMut::new(),
            to_client: VecDeque::new(),
            encoder: Encoder::new(),
            stats: TranslatorStats::default(),
        }
    }

    /// The negotiated protocol version (before CONNECT: the oldest).
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Whether more client bytes may be read now: not while CONNECT waits
    /// for the shard's answer with a packet's worth already buffered.
    pub fn accepts_client_bytes(&self) -> bool {
        match self.phase {
            Phase::AwaitConnect | Phase::Active => true,
            Phase::AwaitConnAck => self.from_client.len() < self.config.frame_size_max_bytes,
            Phase::Closing => false,
        }
    }

    /// Whether the connection is over once `for_client` is written.
    pub fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// ruyi frames for the shard, in order.
    pub fn for_server(&mut self) -> &mut BytesMut {
        &mut self.to_server
    }

    /// WKProto packets for the client, one per element (a WebSocket
    /// carries each in its own message).
    pub fn for_client(&mut self) -> &mut VecDeque<Bytes> {
        &mut self.to_client
    }

    /// Bytes the client sent. Whole packets are translated; a partial one
    /// waits for the rest. A packet that breaks the protocol ends the
    /// connection with a DISCONNECT saying why.
    pub fn client_bytes(&mut self, bytes: &[u8]) {
        if self.phase == Phase::Closing {
            return;
        }
        self.from_client.extend_from_slice(bytes);
        while matches!(self.phase, Phase::AwaitConnect | Phase::Active) {
            let decoded = codec::decode(
                &mut self.from_client,
                self.version,
                self.config.frame_size_max_bytes,
            );
            match decoded {
                Ok(Some(packet)) => self.on_client_packet(packet),
                Ok(None) => break,
                Err(error) => {
                    self.fail(&error);
                    break;
                }
            }
        }
    }

    /// Bytes the shard wrote for the client: whole ruyi frames (a partial
    /// one waits for the rest).
    pub fn server_bytes(&mut self, bytes: &[u8]) {
        self.from_server.extend_from_slice(bytes);
        loop {
            let frame = match self.frames.next_frame(&mut self.from_server) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => {
                    // The shard wrote it: a bug, not the client's doing.
                    tracing::error!(%error, "a ruyi frame for a WKProto client does not split");
                    self.from_server.clear();
                    break;
                }
            };
            match Packet::decode(&frame, &self.verify) {
                Ok(packet) => self.on_server_packet(packet),
                Err(error) => {
                    tracing::error!(%error, "a ruyi frame for a WKProto client does not decode");
                }
            }
        }
    }

    /// Queues `packet` for the shard; false (and nothing queued) when its
    /// frame would be over the frame limit, which a WKProto packet within
    /// that limit can still make (a plaintext payload, the ruyi frame's own
    /// fields on top).
    fn send_to_shard(&mut self, packet: &Packet) -> bool {
        // Encoded in place (no buffer and copy per message), taken back
        // when too big.
        let start = self.to_server.len();
        self.encoder.encode(packet, &mut self.to_server);
        // The shard's verifier counts a frame's "apparent size" (padding and
        // string terminators included) against the same limit, so leave it
        // room.
        let body = self.to_server.len() - start - crate::protocol::LENGTH_PREFIX_BYTES;
        if body + VERIFY_SLACK_BYTES > self.config.frame_size_max_bytes {
            self.to_server.truncate(start);
            return false;
        }
        true
    }

    fn send_to_client(&mut self, packet: &Wk) {
        let mut out = BytesMut::new();
        match codec::encode(packet, self.version, &mut out) {
            Ok(()) => self.to_client.push_back(out.freeze()),
            Err(error) => {
                self.stats.dropped_for_client += 1;
                tracing::warn!(%error, packet = packet.name(), "not sent to a WKProto client");
            }
        }
    }

    /// Ends the connection: a DISCONNECT saying why, then close.
    fn fail(&mut self, error: &dyn std::fmt::Display) {
        tracing::debug!(%error, "WKProto connection refused");
        if self.phase == Phase::AwaitConnect {
            // No version yet: the client waits for a CONNACK.
            self.refuse_connect(reason::SYSTEM_ERROR);
            return;
        }
        self.send_to_client(&Wk::Disconnect(codec::Disconnect {
            reason: reason::SYSTEM_ERROR,
            message: error.to_string(),
        }));
        self.phase = Phase::Closing;
    }

    /// A CONNACK refusing the connection (the SDKs then stop reconnecting),
    /// then close.
    fn refuse_connect(&mut self, code: u8) {
        self.send_to_client(&Wk::ConnAck(codec::ConnAck {
            server_version: (self.client_version > 3).then_some(self.version),
            time_diff_ms: 0,
            reason: code,
            server_key: String::new(),
            salt: String::new(),
            node_id: self.config.node_id,
        }));
        self.phase = Phase::Closing;
    }

    fn on_client_packet(&mut self, packet: Wk) {
        match (self.phase, packet) {
            (Phase::AwaitConnect, Wk::Connect(connect)) => self.on_connect(connect),
            (Phase::AwaitConnect, other) => {
                self.fail(&format!("{} before CONNECT", other.name()));
            }
            (Phase::Active, Wk::Send(send)) => self.on_send(send),
            (Phase::Active, Wk::RecvAck(ack)) => {
                let ack = Packet::RecvAck(crate::protocol::RecvAck {
                    message_id: ack.message_id as u64,
                    message_seq: ack.message_seq,
                    channel_id: String::new(),
                    channel_type: ChannelType::Unknown,
                    through: false,
                });
                if !self.send_to_shard(&ack) {
                    self.fail(&"limits.frame_size_max_bytes is too small for a RECVACK");
                }
            }
            (Phase::Active, Wk::Ping) => {
                if !self.send_to_shard(&Packet::Ping) {
                    self.fail(&"limits.frame_size_max_bytes is too small for a PING");
                }
            }
            (Phase::Active, Wk::Sub(sub)) => {
                // Data-channel subscriptions are WuKongIM's; ruyi's channels
                // deliver to members without one.
                self.send_to_client(&Wk::SubAck(codec::SubAck {
                    sub_no: sub.sub_no,
                    channel_id: sub.channel_id,
                    channel_type: sub.channel_type,
                    action: sub.action,
                    reason: reason::NOT_SUPPORT_CHANNEL_TYPE,
                }));
            }
            (Phase::Active, Wk::Disconnect(_)) => self.phase = Phase::Closing,
            (_, other) => self.fail(&format!("{} is not a client packet here", other.name())),
        }
    }

    fn on_connect(&mut self, connect: codec::Connect) {
        self.client_version = connect.version;
        self.client_timestamp_ms = connect.client_timestamp_ms;
        if connect.version < codec::VERSION_MIN {
            return self.refuse_connect(reason::PROTOCOL_UPGRADE_REQUIRED);
        }
        self.version = connect.version.min(codec::VERSION_MAX);
        if connect.client_key.is_empty() {
            return self.refuse_connect(reason::CLIENT_KEY_IS_EMPTY);
        }
        let keys = match self.fixed_keys {
            Some((secret, salt)) => Ok((Handshake::from_secret(secret), salt)),
            None => Handshake::new().and_then(|h| Ok((h, crypto::new_salt()?))),
        };
        let (handshake, salt) = match keys {
            Ok(keys) => keys,
            Err(error) => {
                tracing::error!(%error, "no randomness for a WKProto key");
                return self.refuse_connect(reason::SYSTEM_ERROR);
            }
        };
        match handshake.agree(&connect.client_key, salt) {
            Ok(cipher) => self.cipher = Some(cipher),
            Err(_) => return self.refuse_connect(reason::AUTH_FAIL),
        }
        self.handshake = Some(handshake);
        self.salt = salt;
        let device_flag = match connect.device_flag {
            1 => DeviceFlag::Web,
            2 => DeviceFlag::Desktop,
            _ => DeviceFlag::App,
        };
        let fits = self.send_to_shard(&Packet::Connect(crate::protocol::Connect {
            version: crate::protocol::PROTOCOL_VERSION,
            uid: connect.uid,
            token: connect.token,
            device_id: connect.device_id,
            device_flag,
            client_timestamp_ms: connect.client_timestamp_ms,
            // The SDKs make up a new device id on every connect: there is
            // nothing to resume. Apps catch up through the HTTP sync.
            resume: false,
        }));
        if !fits {
            // Its uid, token and device id make a login over the frame
            // limit.
            return self.refuse_connect(reason::AUTH_FAIL);
        }
        self.phase = Phase::AwaitConnAck;
    }

    fn refuse_send(&mut self, send: &codec::Send, code: u8) {
        self.stats.refused_sends += 1;
        self.send_to_client(&Wk::SendAck(codec::SendAck {
            flags: Flags::default(),
            message_id: 0,
            client_seq: send.client_seq,
            message_seq: 0,
            reason: code,
            client_msg_no: send.client_msg_no.clone(),
        }));
    }

    fn on_send(&mut self, send: codec::Send) {
        let channel_type = match send.channel_type {
            1 => ChannelType::Person,
            2 => ChannelType::Group,
            _ => return self.refuse_send(&send, reason::NOT_SUPPORT_CHANNEL_TYPE),
        };
        if send.stream_no.is_some() {
            return self.refuse_send(&send, reason::NOT_ALLOW_SEND);
        }
        let payload = if send.setting & setting::NO_ENCRYPT != 0 {
            send.payload.to_vec()
        } else {
            let Some(cipher) = &self.cipher else {
                return self.refuse_send(&send, reason::PAYLOAD_DECODE_ERROR);
            };
            let sign = send_sign(&send);
            if cipher.msg_key(&sign) != send.msg_key {
                return self.refuse_send(&send, reason::PAYLOAD_DECODE_ERROR);
            }
            match cipher.open(&send.payload) {
                Ok(plain) => plain,
                Err(_) => return self.refuse_send(&send, reason::PAYLOAD_DECODE_ERROR),
            }
        };
        let flags = (u8::from(send.flags.no_persist) * APP_FLAG_NO_PERSIST)
            | (u8::from(send.flags.red_dot) * APP_FLAG_RED_DOT)
            | (u8::from(send.flags.sync_once) * APP_FLAG_SYNC_ONCE);
        let packet = Packet::Send(crate::protocol::SendPacket {
            client_seq: send.client_seq,
            client_msg_no: send.client_msg_no.clone(),
            channel_id: send.channel_id.clone(),
            channel_type,
            flags,
            payload: Bytes::from(payload),
        });
        // Too big as a ruyi frame: refused here, as the one message it is,
        // instead of ending the connection at the shard.
        if !self.send_to_shard(&packet) {
            self.refuse_send(&send, reason::PAYLOAD_DECODE_ERROR);
        }
    }

    fn on_server_packet(&mut self, packet: Packet) {
        match packet {
            Packet::ConnAck(ack) => self.on_connack(&ack),
            Packet::SendAck(ack) => {
                if self.phase != Phase::Active {
                    return;
                }
                self.send_to_client(&Wk::SendAck(codec::SendAck {
                    flags: Flags::default(),
                    message_id: ack.message_id as i64,
                    client_seq: ack.client_seq,
                    message_seq: ack.message_seq,
                    reason: wk_reason(ack.reason),
                    client_msg_no: ack.client_msg_no,
                }));
            }
            Packet::Recv(recv) => self.on_recv(recv),
            Packet::Pong => self.send_to_client(&Wk::Pong),
            Packet::Disconnect(disconnect) => {
                if self.phase == Phase::AwaitConnAck {
                    // Refused before the ConnAck (a timeout, a shutdown).
                    return self.refuse_connect(wk_reason(disconnect.reason));
                }
                if self.phase == Phase::Active {
                    self.send_to_client(&Wk::Disconnect(codec::Disconnect {
                        reason: wk_reason(disconnect.reason),
                        message: disconnect.message,
                    }));
                }
                self.phase = Phase::Closing;
            }
            _ => self.stats.dropped_for_client += 1,
        }
    }

    fn on_connack(&mut self, ack: &crate::protocol::ConnAck) {
        if self.phase != Phase::AwaitConnAck {
            return;
        }
        if ack.reason != ReasonCode::Success {
            return self.refuse_connect(wk_reason(ack.reason));
        }
        let Some(handshake) = &self.handshake else {
            return self.refuse_connect(reason::SYSTEM_ERROR);
        };
        let server_key = handshake.server_key();
        self.send_to_client(&Wk::ConnAck(codec::ConnAck {
            server_version: (self.client_version > 3).then_some(self.version),
            time_diff_ms: ack.server_time_ms.saturating_sub(self.client_timestamp_ms),
            reason: reason::SUCCESS,
            server_key,
            salt: String::from_utf8_lossy(&self.salt).into_owned(),
            node_id: self.config.node_id,
        }));
        self.phase = Phase::Active;
        // Packets that arrived behind CONNECT.
        self.client_bytes(&[]);
    }

    fn on_recv(&mut self, recv: crate::protocol::Recv) {
        if self.phase != Phase::Active {
            return;
        }
        if self.version < 6 && recv.message_seq > u64::from(u32::MAX) {
            // Unrepresentable before version 6 (no channel gets there).
            self.stats.dropped_for_client += 1;
            return;
        }
        let Some(cipher) = &self.cipher else {
            return;
        };
        let payload = Bytes::from(cipher.seal(&recv.payload));
        let channel_type = match recv.channel_type {
            ChannelType::Person => 1,
            ChannelType::Group => 2,
            _ => 0,
        };
        let mut packet = codec::Recv {
            flags: Flags {
                dup: recv.flags & RECV_FLAG_REDELIVERED != 0,
                sync_once: recv.send_flags & APP_FLAG_SYNC_ONCE != 0,
                // No badge for one's own message on another device.
                red_dot: recv.send_flags & APP_FLAG_RED_DOT != 0
                    && recv.flags & RECV_FLAG_FROM_SELF == 0,
                no_persist: recv.send_flags & APP_FLAG_NO_PERSIST != 0,
            },
            setting: 0,
            msg_key: String::new(),
            from_uid: recv.from_uid,
            channel_id: recv.channel_id,
            channel_type,
            expire: 0,
            client_msg_no: recv.client_msg_no,
            stream: None,
            message_id: recv.message_id as i64,
            message_seq: recv.message_seq,
            timestamp: (recv.timestamp_ms / 1000).clamp(0, i64::from(i32::MAX)) as i32,
            topic: None,
            payload,
        };
        packet.msg_key = cipher.msg_key(&recv_sign(&packet));
        self.send_to_client(&Wk::Recv(packet));
    }
}

/// SEND's sign string: clientSeq, clientMsgNo, channelID, channelType and
/// the payload as sent (base64 ciphertext), decimal numbers, no separators.
pub fn send_sign(send: &codec::Send) -> Vec<u8> {
    let mut sign = format!(
        "{}{}{}{}",
        send.client_seq, send.client_msg_no, send.channel_id, send.channel_type
    )
    .into_bytes();
    sign.extend_from_slice(&send.payload);
    sign
}

/// RECV's sign string: messageID, messageSeq, clientMsgNo, timestamp,
/// fromUID, channelID, channelType and the payload as sent.
pub fn recv_sign(recv: &codec::Recv) -> Vec<u8> {
    let mut sign = format!(
        "{}{}{}{}{}{}{}",
        recv.message_id,
        recv.message_seq,
        recv.client_msg_no,
        recv.timestamp,
        recv.from_uid,
        recv.channel_id,
        recv.channel_type
    )
    .into_bytes();
    sign.extend_from_slice(&recv.payload);
    sign
}

/// WuKongIM's reason code for a ruyi one.
pub fn wk_reason(code: ReasonCode) -> u8 {
    match code {
        ReasonCode::Success => reason::SUCCESS,
        ReasonCode::AuthFailed | ReasonCode::InvalidUid => reason::AUTH_FAIL,
        ReasonCode::NotMember => reason::SUBSCRIBER_NOT_EXIST,
        ReasonCode::ChannelMissing => reason::CHANNEL_NOT_EXIST,
        ReasonCode::Denied => reason::IN_BLACKLIST,
        ReasonCode::NotAllowed => reason::NOT_IN_WHITELIST,
        ReasonCode::InvalidChannel => reason::CHANNEL_ID_ERROR,
        ReasonCode::Kicked => reason::CONNECT_KICK,
        ReasonCode::RateLimited | ReasonCode::TooManyConnections => reason::RATE_LIMIT,
        ReasonCode::ClientMsgNoReused => reason::IDEMPOTENCY_CONFLICT,
        ReasonCode::PayloadTooLarge => reason::PAYLOAD_DECODE_ERROR,
        _ => reason::SYSTEM_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ConnAck, Recv, RecvAck, SendAck, LENGTH_PREFIX_BYTES};

    /// A client the way WuKongIM's SDK behaves, on the codec and crypto.
    struct Sdk {
        version: u8,
        handshake: Handshake,
        cipher: Option<Cipher>,
        server_version: Option<u8>,
    }

    impl Sdk {
        fn new(version: u8) -> Sdk {
            Sdk {
                version,
                handshake: Handshake::from_secret([5; 32]),
                cipher: None,
                server_version: None,
            }
        }

        fn bytes(&self, packet: &Wk) -> Vec<u8> {
            let mut out = BytesMut::new();
            codec::encode(packet, self.version.min(codec::VERSION_MAX), &mut out).unwrap();
            out.to_vec()
        }

        fn connect(&self) -> Vec<u8> {
            self.bytes(&Wk::Connect(codec::Connect {
                version: self.version,
                device_flag: 1,
                device_id: "abcW".into(),
                uid: "u1".into(),
                token: "t1".into(),
                client_timestamp_ms: 1_000,
                client_key: self.handshake.server_key(),
            }))
        }

        fn send(&self, client_seq: u32, text: &str, tamper: bool) -> Vec<u8> {
            let cipher = self.cipher.as_ref().unwrap();
            let mut send = codec::Send {
                flags: Flags {
                    red_dot: true,
                    ..Flags::default()
                },
                setting: 0,
                client_seq,
                client_msg_no: format!("cmn{client_seq}"),
                stream_no: None,
                channel_id: "u2".into(),
                channel_type: 1,
                expire: 0,
                msg_key: String::new(),
                topic: None,
                payload: Bytes::from(cipher.seal(text.as_bytes())),
            };
            send.msg_key = cipher.msg_key(&send_sign(&send));
            if tamper {
                send.payload = Bytes::from(cipher.seal(b"{\"content\":\"evil\"}"));
            }
            self.bytes(&Wk::Send(send))
        }

        /// Every packet the translator has for the client.
        fn read(&mut self, t: &mut Translator) -> Vec<Wk> {
            let version = self.version.min(codec::VERSION_MAX);
            t.for_client()
                .drain(..)
                .map(|bytes| {
                    let mut buf = BytesMut::from(&bytes[..]);
                    let packet = codec::decode(&mut buf, version, 1 << 20).unwrap().unwrap();
                    assert!(buf.is_empty(), "one packet per element");
                    if let Wk::ConnAck(ack) = &packet {
                        self.server_version = ack.server_version;
                        if ack.reason == reason::SUCCESS {
                            let salt: [u8; 16] = ack.salt.as_bytes().try_into().unwrap();
                            self.cipher =
                                Some(self.handshake.agree(&ack.server_key, salt).unwrap());
                        }
                    }
                    packet
                })
                .collect()
        }
    }

    fn translator() -> Translator {
        Translator::new(TranslatorConfig {
            frame_size_max_bytes: 1 << 16,
            node_id: 7,
        })
    }

    /// The ruyi packets the translator has for the shard.
    fn shard_reads(t: &mut Translator) -> Vec<Packet> {
        let mut buf = std::mem::take(t.for_server());
        let decoder = FrameDecoder::new(1 << 20);
        let mut packets = Vec::new();
        while let Some(frame) = decoder.next_frame(&mut buf).unwrap() {
            packets.push(Packet::decode(&frame, &VerifyLimits::for_frame_size(1 << 20)).unwrap());
        }
        packets
    }

    fn shard_writes(t: &mut Translator, packet: &Packet) {
        let mut out = BytesMut::new();
        Encoder::new().encode(packet, &mut out);
        assert!(out.len() > LENGTH_PREFIX_BYTES);
        t.server_bytes(&out);
    }

    fn connected(version: u8) -> (Translator, Sdk) {
        let mut t = translator();
        let mut sdk = Sdk::new(version);
        t.client_bytes(&sdk.connect());
        let Packet::Connect(connect) = &shard_reads(&mut t)[0] else {
            panic!("no Connect");
        };
        assert_eq!((connect.uid.as_str(), connect.token.as_str()), ("u1", "t1"));
        assert_eq!(connect.device_id, "abcW");
        assert_eq!(connect.device_flag, DeviceFlag::Web);
        assert!(!connect.resume);
        shard_writes(
            &mut t,
            &Packet::ConnAck(ConnAck {
                reason: ReasonCode::Success,
                server_time_ms: 1_500,
                heartbeat_interval_ms: 30_000,
                session_id: 1,
            }),
        );
        let [Wk::ConnAck(ack)] = &sdk.read(&mut t)[..] else {
            panic!("no CONNACK");
        };
        assert_eq!(ack.reason, reason::SUCCESS);
        assert_eq!(ack.time_diff_ms, 500);
        (t, sdk)
    }

    #[test]
    fn connect_becomes_a_ruyi_connect_and_connack_completes_the_key_agreement() {
        let (_, sdk) = connected(2);
        assert_eq!(sdk.server_version, None, "no version byte for a v2 client");
        assert!(sdk.cipher.is_some());
        let (t, sdk) = connected(5);
        assert_eq!(sdk.server_version, Some(5));
        assert_eq!(t.version(), 5);
        let (t, _) = connected(9);
        assert_eq!(
            t.version(),
            codec::VERSION_MAX,
            "a newer client is answered in 6"
        );
    }

    #[test]
    fn a_send_reaches_the_shard_decrypted_with_its_flags() {
        let (mut t, sdk) = connected(3);
        t.client_bytes(&sdk.send(1, r#"{"content":"hello","type":1}"#, false));
        let [Packet::Send(send)] = &shard_reads(&mut t)[..] else {
            panic!("no Send");
        };
        assert_eq!(&send.payload[..], br#"{"content":"hello","type":1}"#);
        assert_eq!((send.client_seq, send.client_msg_no.as_str()), (1, "cmn1"));
        assert_eq!(send.channel_type, ChannelType::Person);
        assert_eq!(send.flags, APP_FLAG_RED_DOT);
    }

    #[test]
    fn a_send_with_a_bad_msg_key_is_refused_here_and_never_reaches_the_shard() {
        let (mut t, mut sdk) = connected(2);
        t.client_bytes(&sdk.send(4, r#"{"content":"hello","type":1}"#, true));
        assert!(shard_reads(&mut t).is_empty());
        let [Wk::SendAck(ack)] = &sdk.read(&mut t)[..] else {
            panic!("no SENDACK");
        };
        assert_eq!(
            (ack.client_seq, ack.reason),
            (4, reason::PAYLOAD_DECODE_ERROR)
        );
        assert_eq!(t.stats.refused_sends, 1);
    }

    #[test]
    fn sendack_and_recv_come_back_in_wkproto_encrypted_and_signed() {
        let (mut t, mut sdk) = connected(2);
        shard_writes(
            &mut t,
            &Packet::SendAck(SendAck {
                client_seq: 1,
                client_msg_no: "cmn1".into(),
                message_id: 99,
                message_seq: 3,
                reason: ReasonCode::Success,
            }),
        );
        shard_writes(
            &mut t,
            &Packet::Recv(Recv {
                message_id: 100,
                message_seq: 4,
                client_msg_no: "x".into(),
                from_uid: "u2".into(),
                channel_id: "u2".into(),
                channel_type: ChannelType::Person,
                timestamp_ms: 1_700_000_000_123,
                flags: RECV_FLAG_REDELIVERED,
                send_flags: APP_FLAG_RED_DOT,
                payload: Bytes::from_static(br#"{"content":"hi","type":1}"#),
            }),
        );
        let packets = sdk.read(&mut t);
        let [Wk::SendAck(ack), Wk::Recv(recv)] = &packets[..] else {
            panic!("{packets:?}");
        };
        assert_eq!((ack.message_id, ack.message_seq, ack.reason), (99, 3, 1));
        assert!(recv.flags.dup, "a redelivery carries DUP");
        assert!(recv.flags.red_dot);
        assert_eq!(recv.timestamp, 1_700_000_000);
        let cipher = sdk.cipher.as_ref().unwrap();
        assert_eq!(cipher.msg_key(&recv_sign(recv)), recv.msg_key);
        assert_eq!(
            cipher.open(&recv.payload).unwrap(),
            br#"{"content":"hi","type":1}"#
        );
        // The client's RECVACK acknowledges that message by id.
        t.client_bytes(&sdk.bytes(&Wk::RecvAck(codec::RecvAck {
            flags: recv.flags,
            message_id: recv.message_id,
            message_seq: recv.message_seq,
        })));
        let [Packet::RecvAck(RecvAck {
            message_id: 100,
            through: false,
            ..
        })] = &shard_reads(&mut t)[..]
        else {
            panic!("no RecvAck");
        };
    }

    #[test]
    fn ones_own_message_from_another_device_shows_no_red_dot() {
        let (mut t, mut sdk) = connected(2);
        shard_writes(
            &mut t,
            &Packet::Recv(Recv {
                message_id: 1,
                message_seq: 1,
                client_msg_no: "x".into(),
                from_uid: "u1".into(),
                channel_id: "u2".into(),
                channel_type: ChannelType::Person,
                timestamp_ms: 0,
                flags: RECV_FLAG_FROM_SELF,
                send_flags: APP_FLAG_RED_DOT,
                payload: Bytes::from_static(b"{}"),
            }),
        );
        let [Wk::Recv(recv)] = &sdk.read(&mut t)[..] else {
            panic!();
        };
        assert!(!recv.flags.red_dot && !recv.flags.dup);
    }

    #[test]
    fn a_send_whose_frame_would_pass_the_frame_limit_is_refused_not_fatal() {
        let (mut t, mut sdk) = connected(2);
        // NoEncrypt: the payload is not shrunk by base64, and the ruyi
        // frame's own fields come on top of it.
        let limit = t.config.frame_size_max_bytes;
        let send = codec::Send {
            flags: Flags::default(),
            setting: setting::NO_ENCRYPT,
            client_seq: 9,
            client_msg_no: "big".into(),
            stream_no: None,
            channel_id: "u2".into(),
            channel_type: 1,
            expire: 0,
            msg_key: String::new(),
            topic: None,
            payload: Bytes::from(vec![b'x'; limit - 40]),
        };
        t.client_bytes(&sdk.bytes(&Wk::Send(send)));
        assert!(
            shard_reads(&mut t).is_empty(),
            "nothing oversized reaches the shard"
        );
        let [Wk::SendAck(ack)] = &sdk.read(&mut t)[..] else {
            panic!("no SENDACK");
        };
        assert_eq!(
            (ack.client_seq, ack.reason),
            (9, reason::PAYLOAD_DECODE_ERROR)
        );
        assert!(!t.is_closing(), "the connection goes on");
        t.client_bytes(&sdk.send(10, "{}", false));
        assert!(matches!(shard_reads(&mut t)[..], [Packet::Send(_)]));
    }

    #[test]
    fn ruyi_packets_without_a_wkproto_counterpart_are_not_sent() {
        let (mut t, mut sdk) = connected(2);
        shard_writes(
            &mut t,
            &Packet::RecallEvent(crate::protocol::RecallEvent {
                channel_id: "u2".into(),
                channel_type: ChannelType::Person,
                message_id: 1,
                message_seq: 1,
                from_uid: "u2".into(),
            }),
        );
        assert!(sdk.read(&mut t).is_empty());
        assert_eq!(t.stats.dropped_for_client, 1);
    }

    #[test]
    fn ping_pong_and_a_kick() {
        let (mut t, mut sdk) = connected(2);
        t.client_bytes(&[0x70]);
        assert!(matches!(shard_reads(&mut t)[..], [Packet::Ping]));
        shard_writes(&mut t, &Packet::Pong);
        shard_writes(
            &mut t,
            &Packet::Disconnect(crate::protocol::Disconnect {
                reason: ReasonCode::Kicked,
                message: "kicked".into(),
            }),
        );
        let packets = sdk.read(&mut t);
        assert!(matches!(
            &packets[..],
            [
                Wk::Pong,
                Wk::Disconnect(codec::Disconnect { reason: 12, .. })
            ]
        ));
        assert!(t.is_closing());
    }

    #[test]
    fn a_refused_login_is_a_connack_with_the_reason_then_the_end() {
        let mut t = translator();
        let mut sdk = Sdk::new(2);
        t.client_bytes(&sdk.connect());
        shard_reads(&mut t);
        shard_writes(
            &mut t,
            &Packet::ConnAck(ConnAck {
                reason: ReasonCode::AuthFailed,
                server_time_ms: 0,
                heartbeat_interval_ms: 0,
                session_id: 0,
            }),
        );
        let [Wk::ConnAck(ack)] = &sdk.read(&mut t)[..] else {
            panic!();
        };
        assert_eq!(ack.reason, reason::AUTH_FAIL);
        assert!(t.is_closing());
    }

    #[test]
    fn protocol_violations_end_the_connection_with_a_reason() {
        // Before CONNECT: a CONNACK refusal.
        let mut t = translator();
        let mut sdk = Sdk::new(2);
        t.client_bytes(&[0x30, 0x00]);
        assert!(matches!(
            &sdk.read(&mut t)[..],
            [Wk::ConnAck(codec::ConnAck { reason: 15, .. })]
        ));
        assert!(t.is_closing() && shard_reads(&mut t).is_empty());
        // After: a DISCONNECT naming the error.
        let (mut t, mut sdk) = connected(2);
        t.client_bytes(&[0xf0, 0x00]);
        let [Wk::Disconnect(d)] = &sdk.read(&mut t)[..] else {
            panic!();
        };
        assert!(
            d.message.contains("unknown packet type 15"),
            "{}",
            d.message
        );
        assert!(t.is_closing());
        // An old client is told to upgrade.
        let mut t = translator();
        let mut sdk = Sdk::new(1);
        t.client_bytes(&sdk.connect());
        let [Wk::ConnAck(ack)] = &sdk.read(&mut t)[..] else {
            panic!();
        };
        assert_eq!(ack.reason, reason::PROTOCOL_UPGRADE_REQUIRED);
    }

    #[test]
    fn packets_split_anywhere_translate_the_same() {
        let (mut whole, sdk) = connected(2);
        let bytes = [
            sdk.send(1, "{\"a\":1}", false),
            sdk.send(2, "{\"b\":2}", false),
        ]
        .concat();
        whole.client_bytes(&bytes);
        let expected = shard_reads(&mut whole);
        assert_eq!(expected.len(), 2);
        for split in 1..bytes.len() {
            let (mut t, _) = connected(2);
            // Same session key: take the cipher of the first translator.
            t.cipher = whole.cipher.clone();
            t.client_bytes(&bytes[..split]);
            t.client_bytes(&bytes[split..]);
            assert_eq!(shard_reads(&mut t), expected, "split at {split}");
        }
    }

    #[test]
    fn packets_pipelined_behind_connect_wait_for_the_connack() {
        let mut t = translator();
        let mut sdk = Sdk::new(2);
        t.client_bytes(&[sdk.connect(), vec![0x70]].concat());
        assert!(matches!(shard_reads(&mut t)[..], [Packet::Connect(_)]));
        shard_writes(
            &mut t,
            &Packet::ConnAck(ConnAck {
                reason: ReasonCode::Success,
                server_time_ms: 0,
                heartbeat_interval_ms: 0,
                session_id: 0,
            }),
        );
        sdk.read(&mut t);
        assert!(matches!(shard_reads(&mut t)[..], [Packet::Ping]));
    }
}
