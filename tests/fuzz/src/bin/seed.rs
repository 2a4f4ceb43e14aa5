//! Writes the seed corpus: valid frames made with ruyi's own encoder, so the
//! fuzzer starts past the framing, the verifier and the handshake.
//!
//! Usage (from tests/fuzz): `cargo fuzz build --fuzz-dir . seed`, then run
//! the built `seed` binary with the corpus directory (default `corpus`).
//! Files are named `seed-*` and overwritten on each run; nothing else in the
//! corpus is touched.

use bytes::{Bytes, BytesMut};
use ruyi::protocol::{
    ChannelType, ConnAck, Connect, Conversation, ConversationAction, ConversationOp,
    ConversationOpResp, DeviceFlag, Disconnect, Encoder, Packet, ReasonCode, Recall, RecallEvent,
    RecallResp, Recv, RecvAck, SendAck, SendPacket, SyncConversations, SyncConversationsResp,
    SyncDirection, SyncMessages, SyncMessagesResp, PROTOCOL_VERSION,
};
use ruyi_fuzz::harness::{op, setup, SECRET};
use std::path::{Path, PathBuf};

fn encode(packet: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    Encoder::new().encode(packet, &mut out);
    out.to_vec()
}

fn connect(uid: &str, device: &str, token: &str, resume: bool) -> Packet {
    Packet::Connect(Connect {
        version: PROTOCOL_VERSION,
        uid: uid.into(),
        token: token.into(),
        device_id: device.into(),
        device_flag: DeviceFlag::App,
        client_timestamp_ms: 1,
        resume,
    })
}

fn send(to: &str, kind: ChannelType, msg_no: &str, payload: &[u8]) -> Packet {
    Packet::Send(SendPacket {
        client_seq: 1,
        client_msg_no: msg_no.into(),
        channel_id: to.into(),
        channel_type: kind,
        flags: 0,
        payload: Bytes::copy_from_slice(payload),
    })
}

fn recv() -> Recv {
    Recv {
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
    }
}

fn conversation() -> Conversation {
    Conversation {
        channel_id: "g1".into(),
        channel_type: ChannelType::Group,
        unread: 3,
        version: 99,
        last_message_seq: 2,
        last_message: Some(recv()),
        deleted: false,
        read_seq: 1,
    }
}

/// One of every packet type.
fn every_packet() -> Vec<Packet> {
    vec![
        connect("alice", "phone", "t", true),
        Packet::ConnAck(ConnAck {
            reason: ReasonCode::Success,
            server_time_ms: 7,
            heartbeat_interval_ms: 30_000,
            session_id: 9,
        }),
        send("bob", ChannelType::Person, "m1", b"hello"),
        Packet::SendAck(SendAck {
            client_seq: 3,
            client_msg_no: "m1".into(),
            message_id: 77,
            message_seq: 1,
            reason: ReasonCode::Success,
        }),
        Packet::Recv(recv()),
        Packet::RecvAck(RecvAck {
            message_id: 77,
            message_seq: 1,
            channel_id: "alice".into(),
            channel_type: ChannelType::Person,
            through: true,
        }),
        Packet::Ping,
        Packet::Pong,
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::IdleTimeout,
            message: "bye".into(),
        }),
        Packet::SyncMessages(SyncMessages {
            request_id: 1,
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            start_seq: 1,
            end_seq: 0,
            limit: 10,
            direction: SyncDirection::Up,
        }),
        Packet::SyncMessagesResp(SyncMessagesResp {
            request_id: 1,
            reason: ReasonCode::Success,
            messages: vec![recv(), recv()],
        }),
        Packet::SyncConversations(SyncConversations {
            request_id: 2,
            since_version: 0,
            limit: 100,
            unread_only: false,
        }),
        Packet::SyncConversationsResp(SyncConversationsResp {
            request_id: 2,
            reason: ReasonCode::Success,
            conversations: vec![conversation()],
            more: true,
        }),
        Packet::ConversationOp(ConversationOp {
            request_id: 3,
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            action: ConversationAction::SetUnread,
            unread: 2,
        }),
        Packet::ConversationOpResp(ConversationOpResp {
            request_id: 3,
            reason: ReasonCode::Success,
            conversation: Some(conversation()),
        }),
        Packet::ConversationUpdate(conversation()),
        Packet::Recall(Recall {
            request_id: 4,
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            message_id: 0,
            client_msg_no: "m1".into(),
        }),
        Packet::RecallResp(RecallResp {
            request_id: 4,
            reason: ReasonCode::NotSender,
            message_id: 0,
            message_seq: 0,
        }),
        Packet::RecallEvent(RecallEvent {
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            message_id: 8,
            message_seq: 1,
            from_uid: "alice".into(),
        }),
    ]
}

/// A raw session program under construction.
struct Program(Vec<u8>);

impl Program {
    fn new(flags: u8) -> Program {
        Program(vec![setup::RAW | flags])
    }
    /// The same program on RocksDB.
    fn on_rocks(&self) -> Vec<u8> {
        let mut data = self.0.clone();
        data[0] |= setup::ROCKS;
        data
    }
    fn op(mut self, code: u8, args: &[u8]) -> Program {
        self.0.push(code);
        self.0.extend_from_slice(args);
        self
    }
    fn bytes(self, conn: u8, bytes: &[u8]) -> Program {
        let len = u16::try_from(bytes.len()).expect("seed frame fits a u16");
        let mut args = vec![conn];
        args.extend_from_slice(&len.to_le_bytes());
        args.extend_from_slice(bytes);
        self.op(op::BYTES, &args)
    }
    fn packet(self, conn: u8, packet: &Packet) -> Program {
        self.bytes(conn, &encode(packet))
    }
    fn advance(self, ms: u16) -> Program {
        self.op(op::ADVANCE, &ms.to_le_bytes())
    }
    fn drain_all(mut self, conns: u8) -> Program {
        for c in 0..conns {
            self = self.op(op::DRAIN, &[c]);
        }
        self
    }
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).expect("create corpus directory");
    std::fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
}

fn main() {
    let root: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("corpus"));
    let packets = every_packet();

    // packet_decode: every packet type, under the default and small limits.
    let dir = root.join("packet_decode");
    for (i, packet) in packets.iter().enumerate() {
        let framed = encode(packet);
        let body = &framed[4..];
        for selector in [4u8, 2] {
            let mut data = vec![selector];
            data.extend_from_slice(body);
            write(
                &dir,
                &format!("{:02}-{}-{selector}", i, packet.name()),
                &data,
            );
        }
    }

    // frame_splitter: a stream of valid frames in odd chunks; an oversized
    // length; an empty frame; a partial frame at the end.
    let dir = root.join("frame_splitter");
    let mut stream = Vec::new();
    for packet in &packets[..6] {
        stream.extend_from_slice(&encode(packet));
    }
    let mut data = vec![255, 3, 1, 7, 3];
    data.extend_from_slice(&stream);
    write(&dir, "valid-stream", &data);
    let mut data = vec![255, 0];
    data.extend_from_slice(&stream);
    data.extend_from_slice(&[200, 0, 0, 0, 1, 2]);
    write(&dir, "partial-tail", &data);
    let mut data = vec![15, 1, 2];
    data.extend_from_slice(&encode(&Packet::Ping));
    data.extend_from_slice(&(1u32 << 31).to_le_bytes());
    write(&dir, "too-large", &data);
    write(
        &dir,
        "empty-frame",
        &[63, 1, 4, 3, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0],
    );

    // session: programs that get past the handshake.
    let dir = root.join("session");
    let token_alice = ruyi::auth::issue_token(
        SECRET,
        "alice",
        ruyi::time::unix_now_ms() / 1000,
        10 * 365 * 24 * 3600,
    );

    // One shard, auth off: alice and bob talk in a person channel.
    let p = Program::new(0)
        .op(op::ACCEPT, &[0])
        .op(op::ACCEPT, &[0])
        .packet(0, &connect("alice", "phone", "", false))
        .packet(1, &connect("bob", "phone", "", false))
        .drain_all(2)
        .packet(0, &send("bob", ChannelType::Person, "m1", b"hello bob"))
        .packet(0, &send("bob", ChannelType::Person, "m2", b"again"))
        .op(op::COMMIT, &[])
        .drain_all(2)
        .op(op::ACK, &[1, 0, 0])
        .op(op::ACK, &[1, 1, 1])
        .packet(
            1,
            &Packet::SyncMessages(SyncMessages {
                request_id: 1,
                channel_id: "alice".into(),
                channel_type: ChannelType::Person,
                start_seq: 1,
                end_seq: 0,
                limit: 10,
                direction: SyncDirection::Up,
            }),
        )
        .packet(
            1,
            &Packet::SyncConversations(SyncConversations {
                request_id: 2,
                since_version: 0,
                limit: 10,
                unread_only: false,
            }),
        )
        .packet(
            1,
            &Packet::RecvAck(RecvAck {
                message_id: 0,
                message_seq: 2,
                channel_id: "alice".into(),
                channel_type: ChannelType::Person,
                through: true,
            }),
        )
        .packet(1, &Packet::Ping)
        .op(op::POSITIONS, &[])
        .drain_all(2)
        .advance(60_000)
        .advance(40_000)
        .op(op::SWEEP, &[])
        .drain_all(2);
    write(&dir, "person-chat", &p.0);
    write(&dir, "person-chat-rocks", &p.on_rocks());

    // Token auth with a real token (valid for ten years), two shards.
    let p = Program::new(setup::TWO_SHARDS | setup::TOKEN_AUTH)
        .op(op::ACCEPT, &[0])
        .op(op::ACCEPT, &[1])
        .packet(0, &connect("alice", "phone", &token_alice, false))
        .op(op::CONNECT, &[1, 1, 0, 0])
        .op(op::PUMP, &[])
        .drain_all(2)
        .op(op::SEND, &[0, 1, 1, 0, 8])
        .op(op::SEND, &[1, 0, 2, 0, 8])
        .op(op::PUMP, &[])
        .op(op::COMMIT, &[])
        .op(op::PUMP, &[])
        .op(op::COMMIT, &[])
        .op(op::PUMP, &[])
        .drain_all(2)
        .op(op::ACK, &[0, 0, 1])
        .op(op::ACK, &[1, 0, 0])
        .op(op::REQUEST, &[0, 3, 1, 0, 0, 0])
        .op(op::PUMP, &[])
        .op(op::COMMIT, &[])
        .op(op::PUMP, &[])
        .drain_all(2);
    write(&dir, "two-shards-token", &p.0);

    // Groups: create one, send to it, sync and change the conversation.
    let p = Program::new(setup::TWO_SHARDS)
        .op(op::GROUP, &[0, 0x07, 0])
        .op(op::COMMIT, &[])
        .op(op::ACCEPT, &[0])
        .op(op::ACCEPT, &[1])
        .op(op::ACCEPT, &[0])
        .op(op::CONNECT, &[0, 0, 0, 0])
        .op(op::CONNECT, &[1, 1, 0, 0])
        .op(op::CONNECT, &[2, 2, 1, 0])
        .op(op::PUMP, &[])
        .drain_all(3)
        .op(op::SEND, &[0, 4, 3, 0, 16])
        .op(op::PUMP, &[])
        .op(op::COMMIT, &[])
        .op(op::PUMP, &[])
        .drain_all(3)
        .op(op::REQUEST, &[1, 0, 4, 0, 0, 10])
        .op(op::REQUEST, &[1, 1, 4, 0, 0, 10])
        .op(op::REQUEST, &[2, 2, 4, 0, 1, 5])
        .op(op::REQUEST, &[0, 3, 4, 0, 0, 0])
        .op(op::PUMP, &[])
        .op(op::COMMIT, &[])
        .op(op::PUMP, &[])
        .drain_all(3)
        .op(op::LIST, &[0x80, 1, 0x02, 1])
        .op(op::COMMIT, &[])
        .op(op::SEND, &[1, 4, 4, 0, 4])
        .op(op::PUMP, &[])
        .op(op::COMMIT, &[])
        .op(op::PUMP, &[])
        .drain_all(3);
    write(&dir, "group", &p.0);

    // Small limits and fast retries: a full window, redeliveries, a stall.
    let mut p = Program::new(setup::SMALL_LIMITS | setup::FAST_RETRY)
        .op(op::ACCEPT, &[0])
        .op(op::ACCEPT, &[0])
        .op(op::CONNECT, &[0, 0, 0, 0])
        .op(op::CONNECT, &[1, 1, 0, 0])
        .drain_all(2);
    for i in 0..8 {
        p = p.op(op::SEND, &[0, 1, i, 0, 40]);
    }
    p = p
        .op(op::COMMIT, &[])
        .drain_all(2)
        .advance(150)
        .op(op::RETRY_DUE, &[])
        .drain_all(2)
        .op(op::ACK, &[1, 0, 1])
        .drain_all(2)
        .op(op::SEND, &[0, 1, 9, 0, 200])
        .op(op::COMMIT, &[])
        .op(op::STALL, &[1])
        .advance(1500)
        .op(op::SWEEP, &[])
        .drain_all(2);
    write(&dir, "small-window", &p.0);

    // Resume: bob misses messages while away, then reconnects with resume.
    let p = Program::new(0)
        .op(op::ACCEPT, &[0])
        .op(op::ACCEPT, &[0])
        .op(op::CONNECT, &[0, 0, 0, 0])
        .op(op::CONNECT, &[1, 1, 0, 0])
        .drain_all(2)
        .op(op::SEND, &[0, 1, 1, 0, 4])
        .op(op::COMMIT, &[])
        .drain_all(2)
        .op(op::ACK, &[1, 0, 0])
        .op(op::PEER_GONE, &[1])
        .op(op::SEND, &[0, 1, 2, 0, 4])
        .op(op::SEND, &[0, 1, 3, 0, 4])
        .op(op::COMMIT, &[])
        .op(op::ACCEPT, &[0])
        .op(op::CONNECT, &[2, 1, 0, 1])
        .drain_all(3)
        .op(op::CONNECT, &[0, 0, 0, 0])
        .drain_all(3);
    write(&dir, "resume", &p.0);

    // A storage failure, then a recall and a kick.
    let p = Program::new(0)
        .op(op::ACCEPT, &[0])
        .op(op::ACCEPT, &[0])
        .op(op::CONNECT, &[0, 0, 0, 0])
        .op(op::CONNECT, &[1, 1, 0, 0])
        .op(op::SEND, &[0, 1, 1, 0, 4])
        .op(op::FAIL_COMMIT, &[0])
        .drain_all(2)
        .op(op::SEND, &[0, 1, 1, 0, 4])
        .op(op::COMMIT, &[])
        .drain_all(2)
        .op(op::REQUEST, &[0, 3, 1, 1, 0, 1])
        .op(op::COMMIT, &[])
        .drain_all(2)
        .op(op::ACCEPT, &[0])
        .op(op::CONNECT, &[2, 0, 0, 0])
        .drain_all(3)
        .op(op::SHUTDOWN, &[0])
        .drain_all(3);
    write(&dir, "fail-recall-kick", &p.0);
    write(&dir, "fail-recall-kick-rocks", &p.on_rocks());

    // Garbage after the handshake, and a handshake timeout.
    let p = Program::new(0)
        .op(op::ACCEPT, &[0])
        .op(op::ACCEPT, &[0])
        .op(op::CONNECT, &[0, 0, 0, 0])
        .bytes(0, &[8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
        .advance(20_000)
        .op(op::SWEEP, &[])
        .drain_all(2);
    write(&dir, "garbage-timeout", &p.0);

    // session, the simulator: its choices are the bytes after the flags.
    // Random bytes make a random run (as a seed of the soak does); a few
    // lengths, on the memory store and on both stores.
    for (name, flags, seed, len) in [
        ("sim-short", 0, 1, 64),
        ("sim-medium", 0, 2, 400),
        ("sim-long", 0, 3, 1500),
        ("sim-long-2", 0, 4, 1500),
        ("sim-rocks", setup::ROCKS, 5, 400),
    ] {
        let mut state: u64 = seed;
        let mut data = vec![flags];
        data.extend((0..len).map(|_| splitmix(&mut state) as u8));
        write(&dir, name, &data);
    }

    println!("seeds written under {}", root.display());
}

/// splitmix64: the seed inputs' random bytes.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
