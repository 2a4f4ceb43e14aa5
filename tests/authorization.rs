//! Authorization: every packet type, tried by a user who is not allowed to
//! use it (never a member, a removed member, on a deny list or off an allow
//! list, a wrong device, a bad or expired token, no session at all), gets a
//! refusal, and nothing of the channel reaches that user.

mod common;

use bytes::Bytes;
use common::{
    api_post, assert_nothing_arrives, connect_packet, token, RawClient, TestServer, SECRET, WAIT,
};
use ruyi::client::{connect, Client, Delivery, Incoming, Outgoing};
use ruyi::ids::ShardId;
use ruyi::protocol::{
    ChannelType, ConnAck, Conversation, ConversationAction, ConversationOp, ConversationOpResp,
    DeviceFlag, Disconnect, Packet, ReasonCode, Recall, RecallEvent, RecallResp, Recv, RecvAck,
    SendAck, SendPacket, SyncConversations, SyncConversationsResp, SyncDirection, SyncMessages,
    SyncMessagesResp, RECV_FLAG_RECALLED, RECV_FLAG_REDELIVERED,
};
use ruyi::server::ListTarget;
use ruyi::shard::state::SetChange;
use ruyi::storage::ListKind;
use serde_json::json;
use std::time::Duration;

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(250);

const ACTIONS: [ConversationAction; 3] = [
    ConversationAction::ClearUnread,
    ConversationAction::SetUnread,
    ConversationAction::Delete,
];

// ---- packets --------------------------------------------------------------

fn sample_recv() -> Recv {
    Recv {
        message_id: 42,
        message_seq: 1,
        client_msg_no: "forged".into(),
        from_uid: "alice".into(),
        channel_id: "club".into(),
        channel_type: ChannelType::Group,
        timestamp_ms: 1,
        flags: 0,
        send_flags: 0,
        payload: Bytes::from_static(b"forged"),
    }
}

fn sample_conversation() -> Conversation {
    Conversation {
        channel_id: "club".into(),
        channel_type: ChannelType::Group,
        unread: 1,
        version: 1,
        last_message_seq: 1,
        last_message: Some(sample_recv()),
        deleted: false,
        read_seq: 0,
    }
}

/// Every packet a client may send once connected (all but `Connect`).
fn client_packets() -> Vec<Packet> {
    vec![
        Packet::Send(SendPacket {
            client_seq: 1,
            client_msg_no: "early".into(),
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            flags: 0,
            payload: Bytes::from_static(b"before connect"),
        }),
        Packet::RecvAck(RecvAck {
            message_id: 42,
            message_seq: 1,
            channel_id: "club".into(),
            channel_type: ChannelType::Group,
            through: true,
        }),
        Packet::Ping,
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::Success,
            message: "bye".into(),
        }),
        Packet::SyncMessages(SyncMessages {
            request_id: 1,
            channel_id: "club".into(),
            channel_type: ChannelType::Group,
            start_seq: 1,
            end_seq: 0,
            limit: 10,
            direction: SyncDirection::Up,
        }),
        Packet::SyncConversations(SyncConversations {
            request_id: 2,
            since_version: 0,
            limit: 10,
            unread_only: false,
        }),
        Packet::ConversationOp(ConversationOp {
            request_id: 3,
            channel_id: "club".into(),
            channel_type: ChannelType::Group,
            action: ConversationAction::ClearUnread,
            unread: 0,
        }),
        Packet::Recall(Recall {
            request_id: 4,
            channel_id: "club".into(),
            channel_type: ChannelType::Group,
            message_id: 42,
            client_msg_no: String::new(),
        }),
    ]
}

/// Every packet only the server sends, except `Pong` (which a client may
/// send and the server ignores).
fn server_packets() -> Vec<Packet> {
    vec![
        Packet::ConnAck(ConnAck {
            reason: ReasonCode::Success,
            server_time_ms: 1,
            heartbeat_interval_ms: 30_000,
            session_id: 1,
        }),
        Packet::SendAck(SendAck {
            client_seq: 1,
            client_msg_no: "forged".into(),
            message_id: 42,
            message_seq: 1,
            reason: ReasonCode::Success,
        }),
        Packet::Recv(sample_recv()),
        Packet::SyncMessagesResp(SyncMessagesResp {
            request_id: 1,
            reason: ReasonCode::Success,
            messages: vec![sample_recv()],
        }),
        Packet::SyncConversationsResp(SyncConversationsResp {
            request_id: 2,
            reason: ReasonCode::Success,
            conversations: vec![sample_conversation()],
            more: false,
        }),
        Packet::ConversationOpResp(ConversationOpResp {
            request_id: 3,
            reason: ReasonCode::Success,
            conversation: Some(sample_conversation()),
        }),
        Packet::ConversationUpdate(sample_conversation()),
        Packet::RecallResp(RecallResp {
            request_id: 4,
            reason: ReasonCode::Success,
            message_id: 42,
            message_seq: 1,
        }),
        Packet::RecallEvent(RecallEvent {
            channel_id: "club".into(),
            channel_type: ChannelType::Group,
            message_id: 42,
            message_seq: 1,
            from_uid: "alice".into(),
        }),
    ]
}

fn connect_as(uid: &str, token: &str, device_flag: DeviceFlag) -> Packet {
    let Packet::Connect(mut connect) = connect_packet(uid, token) else {
        unreachable!()
    };
    connect.device_flag = device_flag;
    Packet::Connect(connect)
}

/// Sends `connect` on a fresh connection and asserts the exact refusal:
/// `ConnAck(auth_failed)`, `Disconnect(auth_failed)`, then the close.
async fn assert_auth_failed(server: &TestServer, what: &str, connect: Packet) {
    let mut raw = RawClient::connect(server.addr).await;
    raw.send_packet(&connect).await;
    match &raw.packets_until_closed().await[..] {
        [Packet::ConnAck(ack), Packet::Disconnect(bye)] => {
            assert_eq!(ack.reason, ReasonCode::AuthFailed, "{what}");
            assert_eq!(ack.heartbeat_interval_ms, 0, "{what}");
            assert_eq!(bye.reason, ReasonCode::AuthFailed, "{what}");
        }
        other => panic!("{what}: expected ConnAck(auth_failed) then Disconnect, got {other:?}"),
    }
}

/// A raw connection logged in as `uid`, past its `ConnAck`.
async fn raw_session(server: &TestServer, uid: &str) -> RawClient {
    let mut raw = RawClient::connect(server.addr).await;
    raw.send_packet(&connect_packet(uid, &token(uid))).await;
    match raw.next_packet().await {
        Some(Packet::ConnAck(ack)) if ack.reason == ReasonCode::Success => raw,
        other => panic!("{uid} should be accepted, got {other:?}"),
    }
}

/// Connects `uid`'s `device` raw, asking to resume, and returns every
/// message pushed until the connection has been quiet for [`QUIET`]. Raw,
/// not the SDK: the SDK leaves frames that arrive in the same read as its
/// `ConnAck` unread until more bytes come.
async fn resumed(server: &TestServer, uid: &str, device: &str) -> Vec<Recv> {
    let Packet::Connect(mut connect) = connect_packet(uid, &token(uid)) else {
        unreachable!()
    };
    connect.device_id = device.into();
    connect.resume = true;
    let mut raw = RawClient::connect(server.addr).await;
    raw.send_packet(&Packet::Connect(connect)).await;
    match raw.next_packet().await {
        Some(Packet::ConnAck(ack)) if ack.reason == ReasonCode::Success => {}
        other => panic!("{uid}/{device} should be accepted, got {other:?}"),
    }
    let mut pushed = Vec::new();
    while let Ok(packet) = tokio::time::timeout(QUIET, raw.next_packet()).await {
        match packet {
            Some(Packet::Recv(recv)) => pushed.push(recv),
            Some(_) => {}
            None => break,
        }
    }
    pushed
}

// ---- SDK helpers ----------------------------------------------------------

fn outgoing(channel_id: &str, channel_type: ChannelType, client_msg_no: &str) -> Outgoing {
    Outgoing {
        channel_id: channel_id.into(),
        channel_type,
        client_msg_no: client_msg_no.into(),
        flags: 0,
        payload: Bytes::copy_from_slice(client_msg_no.as_bytes()),
    }
}

/// Sends and asserts success; returns the ack.
async fn sent(client: &Client, channel_id: &str, ty: ChannelType, client_msg_no: &str) -> SendAck {
    let ack = client
        .send(outgoing(channel_id, ty, client_msg_no))
        .await
        .unwrap();
    assert_eq!(ack.reason, ReasonCode::Success, "{client_msg_no}");
    ack
}

/// A send that must be refused with `reason`, taking no id and no seq.
async fn assert_send_refused(
    client: &Client,
    channel_id: &str,
    ty: ChannelType,
    reason: ReasonCode,
) {
    let ack = client
        .send(outgoing(channel_id, ty, &ruyi::client::new_client_msg_no()))
        .await
        .unwrap();
    assert_eq!(ack.reason, reason, "send to {channel_id}");
    assert_eq!(
        (ack.message_id, ack.message_seq),
        (0, 0),
        "send to {channel_id}"
    );
}

/// Sync up from 1 and down from the top: both refused with `reason`, empty.
async fn assert_sync_refused(
    client: &Client,
    channel_id: &str,
    ty: ChannelType,
    reason: ReasonCode,
) {
    for (start, direction) in [(1, SyncDirection::Up), (0, SyncDirection::Down)] {
        let response = client
            .sync_messages(channel_id, ty, start, 0, 100, direction)
            .await
            .unwrap();
        assert_eq!(response.reason, reason, "sync {channel_id} {direction:?}");
        assert!(
            response.messages.is_empty(),
            "sync {channel_id} {direction:?}"
        );
    }
}

/// Every conversation action on the channel: each refused with one of
/// `reasons`, and no conversation in the answer.
async fn assert_conversation_ops_refused(
    client: &Client,
    channel_id: &str,
    ty: ChannelType,
    reasons: &[ReasonCode],
) {
    for action in ACTIONS {
        let response = client
            .conversation_op(channel_id, ty, action, 1)
            .await
            .unwrap();
        assert!(
            reasons.contains(&response.reason),
            "{action:?} on {channel_id}: got {:?}, expected one of {reasons:?}",
            response.reason
        );
        assert_eq!(response.conversation, None, "{action:?} on {channel_id}");
    }
}

async fn assert_recall_refused(
    client: &Client,
    channel_id: &str,
    ty: ChannelType,
    message_id: u64,
    client_msg_no: &str,
    reasons: &[ReasonCode],
) {
    let response = client
        .recall(channel_id, ty, message_id, client_msg_no)
        .await
        .unwrap();
    assert!(
        reasons.contains(&response.reason),
        "recall {message_id}/{client_msg_no:?} in {channel_id}: got {:?}, expected one of {reasons:?}",
        response.reason
    );
    assert_eq!((response.message_id, response.message_seq), (0, 0));
}

/// The message at `seq` of a channel as `client` reads it.
async fn read_one(client: &Client, channel_id: &str, ty: ChannelType, seq: u64) -> Recv {
    let response = client
        .sync_messages(channel_id, ty, seq, seq + 1, 1, SyncDirection::Up)
        .await
        .unwrap();
    assert_eq!(response.reason, ReasonCode::Success);
    assert_eq!(response.messages.len(), 1, "seq {seq} of {channel_id}");
    response.messages.into_iter().next().unwrap()
}

async fn conversations(client: &Client) -> Vec<Conversation> {
    let response = client.sync_conversations(0, 100, false).await.unwrap();
    assert_eq!(response.reason, ReasonCode::Success);
    response.conversations
}

/// Waits until the SDK reports the connection closed (on its side).
async fn wait_closed(incoming: &mut Incoming) {
    loop {
        match incoming.next(WAIT).await {
            Ok(Delivery::Closed(_)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

// ---- no session -----------------------------------------------------------

#[tokio::test]
async fn every_packet_type_before_connect_is_refused_with_unexpected_packet_and_closed() {
    let server = TestServer::start();
    let (bob, mut bob_in) = server.connect("bob").await;
    for packet in client_packets()
        .into_iter()
        .chain(server_packets())
        .chain([Packet::Pong])
    {
        let name = packet.name();
        let mut raw = RawClient::connect(server.addr).await;
        raw.send_packet(&packet).await;
        match &raw.packets_until_closed().await[..] {
            [Packet::Disconnect(bye)] => {
                assert_eq!(bye.reason, ReasonCode::UnexpectedPacket, "{name}")
            }
            other => panic!("{name} before Connect: expected only Disconnect, got {other:?}"),
        }
    }
    // The Send without a session was never stored nor delivered.
    assert_nothing_arrives(&mut bob_in, QUIET).await;
    assert!(conversations(&bob).await.is_empty());
}

#[tokio::test]
async fn packets_only_the_server_sends_close_a_session_with_unexpected_packet_and_reach_no_one() {
    let server = TestServer::start();
    server
        .control()
        .create_group("club", &["alice", "bob"])
        .await
        .unwrap();
    let (_bob, mut bob_in) = server.connect("bob").await;
    for packet in server_packets() {
        let name = packet.name();
        let mut raw = raw_session(&server, "alice").await;
        raw.send_packet(&packet).await;
        match &raw.packets_until_closed().await[..] {
            [Packet::Disconnect(bye)] => {
                assert_eq!(bye.reason, ReasonCode::UnexpectedPacket, "{name}")
            }
            other => panic!("{name} from a client: expected only Disconnect, got {other:?}"),
        }
    }
    // A forged Recv, RecallEvent or ConversationUpdate went nowhere.
    assert_nothing_arrives(&mut bob_in, QUIET).await;

    // A Pong from a client is tolerated on purpose (session.rs): ignored,
    // and the session goes on.
    let mut raw = raw_session(&server, "alice").await;
    raw.send_packet(&Packet::Pong).await;
    raw.send_packet(&Packet::Ping).await;
    assert_eq!(raw.next_packet().await, Some(Packet::Pong));
}

// ---- connect refusals -----------------------------------------------------

/// base64url without padding, as in JWTs.
fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn connect_is_refused_for_expired_foreign_forged_empty_or_wrong_device_tokens() {
    let server = TestServer::start();
    let now_s = ruyi::time::unix_now_ms() / 1000;
    let claims = json!({"sub": "alice", "exp": now_s + 3600, "iat": now_s});
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let no_exp = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "alice", "iat": now_s}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    // Mallory's valid token with its claims swapped for alice's.
    let mallorys = token("mallory");
    let parts: Vec<&str> = mallorys.split('.').collect();
    let swapped = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims.to_string().as_bytes()),
        parts[2]
    );

    let cases: Vec<(&str, String)> = vec![
        (
            "expired an hour ago",
            ruyi::auth::issue_token(SECRET, "alice", now_s - 3600, 60),
        ),
        ("issued for another uid", token("bob")),
        (
            "signed with another secret",
            ruyi::auth::issue_token("another-secret", "alice", now_s, 3600),
        ),
        ("empty", String::new()),
        ("not a token", "alice".into()),
        ("HS512 instead of HS256", hs512),
        ("without exp", no_exp),
        ("alg none", alg_none),
        ("claims swapped under another signature", swapped),
    ];
    for (what, token) in cases {
        assert_auth_failed(&server, what, connect_as("alice", &token, DeviceFlag::App)).await;
    }

    // A token registered for carol's app devices: only carol, only app.
    let (status, _) = api_post(
        &server.api_url(),
        "/user/token",
        json!({"uid": "carol", "token": "carol-app-token", "device_flag": 0}),
    )
    .await;
    assert_eq!(status, 200);
    let misuses = [
        (
            "registered for app, used on web",
            "carol",
            "carol-app-token",
            DeviceFlag::Web,
        ),
        (
            "registered for app, used on desktop",
            "carol",
            "carol-app-token",
            DeviceFlag::Desktop,
        ),
        (
            "registered for carol, used by dave",
            "dave",
            "carol-app-token",
            DeviceFlag::App,
        ),
        (
            "a prefix of the registered token",
            "carol",
            "carol-app",
            DeviceFlag::App,
        ),
    ];
    for (what, uid, token, flag) in misuses {
        assert_auth_failed(&server, what, connect_as(uid, token, flag)).await;
    }
    // The control: the same token on the right device flag gets in.
    let mut raw = RawClient::connect(server.addr).await;
    raw.send_packet(&connect_as("carol", "carol-app-token", DeviceFlag::App))
        .await;
    assert!(
        matches!(raw.next_packet().await, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success)
    );
}

#[tokio::test]
async fn the_system_uid_can_never_log_in_nor_get_a_registered_token() {
    let server = TestServer::start();
    let system = "__system";
    assert_auth_failed(
        &server,
        "a valid signed token for the system uid",
        connect_as(system, &token(system), DeviceFlag::App),
    )
    .await;
    let (status, _) = api_post(
        &server.api_url(),
        "/user/token",
        json!({"uid": system, "token": "sneaky", "device_flag": 0}),
    )
    .await;
    assert_eq!(status, 400, "the API refuses a token for the system uid");
    assert_auth_failed(
        &server,
        "a token the API refused to register",
        connect_as(system, "sneaky", DeviceFlag::App),
    )
    .await;
    drop(server);

    // With authentication off, and with a system uid of its own.
    let server = TestServer::start_with(|c| {
        c.auth.mode = ruyi::config::AuthMode::Off;
        c.api.system_uid = "ops-bot".into();
    });
    assert_auth_failed(
        &server,
        "the configured system uid with auth off",
        connect_as("ops-bot", "", DeviceFlag::App),
    )
    .await;
    assert_auth_failed(
        &server,
        "the configured system uid with a signed token",
        connect_as("ops-bot", &token("ops-bot"), DeviceFlag::Web),
    )
    .await;
}

// ---- groups: never a member -----------------------------------------------

#[tokio::test]
async fn a_user_who_was_never_a_member_is_refused_every_channel_packet_from_either_shard() {
    let server = TestServer::start();
    server
        .control()
        .create_group("club", &["alice", "bob"])
        .await
        .unwrap();
    let (alice, mut alice_in) = server.connect("alice").await;
    let (_bob, mut bob_in) = server.connect("bob").await;
    let first = sent(&alice, "club", ChannelType::Group, "club-1").await;
    assert_eq!(bob_in.next_message(WAIT).await.unwrap().message_seq, 1);

    // From each shard, so that both the owner's own path and the cross-shard
    // one are tried.
    for shard in [ShardId(0), ShardId(1)] {
        let device = format!("s{}", shard.0);
        let (mallory, mut mallory_in) = server.connect_on_shard("mallory", &device, shard).await;
        let group = ChannelType::Group;
        assert_send_refused(&mallory, "club", group, ReasonCode::NotMember).await;
        assert_sync_refused(&mallory, "club", group, ReasonCode::NotMember).await;
        assert_conversation_ops_refused(
            &mallory,
            "club",
            group,
            &[ReasonCode::NotMember, ReasonCode::ConversationMissing],
        )
        .await;
        assert_recall_refused(
            &mallory,
            "club",
            group,
            first.message_id,
            "",
            &[ReasonCode::NotMember, ReasonCode::NotSender],
        )
        .await;
        assert_recall_refused(
            &mallory,
            "club",
            group,
            0,
            "club-1",
            &[ReasonCode::NotMember, ReasonCode::MessageMissing],
        )
        .await;
        // Acks of the group's message, by id and through any seq: no answer
        // to check, but the session goes on and sees nothing of the group.
        mallory.ack(first.message_id, 1).await.unwrap();
        mallory.ack_through("club", group, 1).await.unwrap();
        mallory.ack_through("club", group, u64::MAX).await.unwrap();
        assert!(
            conversations(&mallory)
                .await
                .iter()
                .all(|c| c.channel_id != "club"),
            "the group is in no conversation list of a non-member"
        );

        // A group that does not exist: channel_missing, never success.
        assert_send_refused(&mallory, "nowhere", group, ReasonCode::ChannelMissing).await;
        assert_sync_refused(&mallory, "nowhere", group, ReasonCode::ChannelMissing).await;
        assert_conversation_ops_refused(&mallory, "nowhere", group, &[ReasonCode::ChannelMissing])
            .await;
        assert_recall_refused(
            &mallory,
            "nowhere",
            group,
            first.message_id,
            "",
            &[ReasonCode::ChannelMissing, ReasonCode::MessageMissing],
        )
        .await;

        // The group's next message reaches its members, not mallory.
        let next = sent(&alice, "club", group, &format!("club-after-{device}")).await;
        assert_eq!(
            bob_in.next_message(WAIT).await.unwrap().message_id,
            next.message_id
        );
        assert_nothing_arrives(&mut mallory_in, QUIET).await;
        mallory.close().await;
    }

    // Nothing mallory did touched the group: no seq was taken, nothing was
    // recalled, no member heard of anything.
    let original = read_one(&alice, "club", ChannelType::Group, 1).await;
    assert_eq!(original.message_id, first.message_id);
    assert_eq!(original.flags & RECV_FLAG_RECALLED, 0);
    assert_eq!(&original.payload[..], b"club-1");
    let last = sent(&alice, "club", ChannelType::Group, "club-last").await;
    assert_eq!(last.message_seq, 4, "refusals took no seq");
    assert_eq!(bob_in.next_message(WAIT).await.unwrap().message_seq, 4);
    assert_nothing_arrives(&mut alice_in, Duration::from_millis(10)).await;
}

#[tokio::test]
async fn a_user_cannot_reach_another_pairs_person_channel_by_any_name() {
    let server = TestServer::start();
    let (alice, _a) = server.connect("alice").await;
    let (bob, mut bob_in) = server.connect("bob").await;
    let (mallory, mut mallory_in) = server.connect("mallory").await;
    let private = sent(&alice, "bob", ChannelType::Person, "for-bob-only").await;
    bob_in.next_message(WAIT).await.unwrap();

    // The server-side key of the pair is not a uid, and as a group it does
    // not exist.
    let person = ChannelType::Person;
    assert_send_refused(&mallory, "alice@bob", person, ReasonCode::InvalidChannel).await;
    assert_sync_refused(&mallory, "alice@bob", person, ReasonCode::InvalidChannel).await;
    assert_conversation_ops_refused(&mallory, "alice@bob", person, &[ReasonCode::InvalidChannel])
        .await;
    assert_recall_refused(
        &mallory,
        "alice@bob",
        person,
        private.message_id,
        "",
        &[ReasonCode::InvalidChannel],
    )
    .await;
    let group = ChannelType::Group;
    assert_sync_refused(&mallory, "alice@bob", group, ReasonCode::ChannelMissing).await;
    assert_send_refused(&mallory, "alice@bob", group, ReasonCode::ChannelMissing).await;
    // Naming alice or bob is mallory's own channel with them: empty.
    for other in ["alice", "bob"] {
        let response = mallory
            .sync_messages(other, person, 1, 0, 100, SyncDirection::Up)
            .await
            .unwrap();
        assert_eq!(response.reason, ReasonCode::Success);
        assert!(
            response.messages.is_empty(),
            "mallory reads nothing of {other}"
        );
        assert_conversation_ops_refused(
            &mallory,
            other,
            person,
            &[ReasonCode::ConversationMissing],
        )
        .await;
        assert_recall_refused(
            &mallory,
            other,
            person,
            private.message_id,
            "",
            &[ReasonCode::MessageMissing],
        )
        .await;
    }
    assert!(conversations(&mallory).await.is_empty());
    assert_nothing_arrives(&mut mallory_in, QUIET).await;
    let kept = read_one(&bob, "alice", person, 1).await;
    assert_eq!(&kept.payload[..], b"for-bob-only");
}

// ---- recall ---------------------------------------------------------------

#[tokio::test]
async fn recalling_someone_elses_message_is_not_sender_in_person_and_group_channels() {
    let server = TestServer::start();
    server
        .control()
        .create_group("club", &["alice", "bob"])
        .await
        .unwrap();
    let (alice, mut alice_in) = server.connect("alice").await;
    let (bob, mut bob_in) = server.connect("bob").await;
    let direct = sent(&alice, "bob", ChannelType::Person, "direct-1").await;
    let grouped = sent(&alice, "club", ChannelType::Group, "group-1").await;
    bob_in.next_message(WAIT).await.unwrap();
    bob_in.next_message(WAIT).await.unwrap();

    for (channel, ty, ack, msg_no) in [
        ("alice", ChannelType::Person, &direct, "direct-1"),
        ("club", ChannelType::Group, &grouped, "group-1"),
    ] {
        assert_recall_refused(
            &bob,
            channel,
            ty,
            ack.message_id,
            "",
            &[ReasonCode::NotSender],
        )
        .await;
        // A client_msg_no names the caller's own message: alice's is not
        // bob's to name.
        assert_recall_refused(&bob, channel, ty, 0, msg_no, &[ReasonCode::MessageMissing]).await;
    }
    // The ids of one channel do not work through another.
    assert_recall_refused(
        &bob,
        "club",
        ChannelType::Group,
        direct.message_id,
        "",
        &[ReasonCode::MessageMissing],
    )
    .await;

    // Nothing was recalled and no one was told.
    assert_nothing_arrives(&mut alice_in, QUIET).await;
    assert_nothing_arrives(&mut bob_in, Duration::from_millis(10)).await;
    for (channel, ty, payload) in [
        ("bob", ChannelType::Person, &b"direct-1"[..]),
        ("club", ChannelType::Group, &b"group-1"[..]),
    ] {
        let message = read_one(&alice, channel, ty, 1).await;
        assert_eq!(message.flags & RECV_FLAG_RECALLED, 0, "{channel}");
        assert_eq!(&message.payload[..], payload);
    }
}

// ---- removed members ------------------------------------------------------

/// A group "club" of alice, bob and carol with one message ("before", seq
/// 1) that everyone received, then bob removed.
struct Removal {
    server: TestServer,
    alice: Client,
    bob: Client,
    bob_in: Incoming,
    carol_in: Incoming,
    before: SendAck,
    bobs_own: SendAck,
    // Kept: dropping a client or its incoming stream closes the connection.
    _alice_in: Incoming,
    _carol: Client,
}

async fn removal() -> Removal {
    let server = TestServer::start();
    let control = server.control();
    control
        .create_group("club", &["alice", "bob", "carol"])
        .await
        .unwrap();
    let (alice, alice_in) = server.connect("alice").await;
    let (bob, mut bob_in) = server.connect("bob").await;
    let (carol, mut carol_in) = server.connect("carol").await;
    let before = sent(&alice, "club", ChannelType::Group, "before").await;
    let bobs_own = sent(&bob, "club", ChannelType::Group, "bobs-own").await;
    assert_eq!(bob_in.next_message(WAIT).await.unwrap().message_seq, 1);
    assert_eq!(carol_in.next_message(WAIT).await.unwrap().message_seq, 1);
    assert_eq!(carol_in.next_message(WAIT).await.unwrap().message_seq, 2);
    let info = control.remove_members("club", &["bob"]).await.unwrap();
    assert_eq!(info.members, vec!["alice".to_string(), "carol".to_string()]);
    Removal {
        server,
        alice,
        bob,
        bob_in,
        carol_in,
        before,
        bobs_own,
        _alice_in: alice_in,
        _carol: carol,
    }
}

#[tokio::test]
async fn a_removed_member_cannot_send_sync_or_recall_others_messages_and_receives_nothing() {
    let mut r = removal().await;
    let group = ChannelType::Group;
    assert_send_refused(&r.bob, "club", group, ReasonCode::NotMember).await;
    assert_sync_refused(&r.bob, "club", group, ReasonCode::NotMember).await;
    assert_recall_refused(
        &r.bob,
        "club",
        group,
        r.before.message_id,
        "",
        &[ReasonCode::NotMember, ReasonCode::NotSender],
    )
    .await;
    r.bob.ack_through("club", group, u64::MAX).await.unwrap();

    let after = sent(&r.alice, "club", group, "after").await;
    assert_eq!(after.message_seq, 3, "bob's refused send took no seq");
    assert_eq!(r.carol_in.next_message(WAIT).await.unwrap().message_seq, 3);
    // Recalling a message after the removal: carol hears of it, bob not.
    let recalled = r
        .alice
        .recall("club", group, after.message_id, "")
        .await
        .unwrap();
    assert_eq!(recalled.reason, ReasonCode::Success);
    match r.carol_in.next(WAIT).await.unwrap() {
        Delivery::Recall(event) => assert_eq!(event.message_id, after.message_id),
        other => panic!("expected carol's RecallEvent, got {other:?}"),
    }
    assert_nothing_arrives(&mut r.bob_in, QUIET).await;
}

#[tokio::test]
async fn a_removed_member_cannot_recall_a_message_they_sent_while_a_member() {
    let mut r = removal().await;
    assert_recall_refused(
        &r.bob,
        "club",
        ChannelType::Group,
        r.bobs_own.message_id,
        "",
        &[ReasonCode::NotMember],
    )
    .await;
    assert_recall_refused(
        &r.bob,
        "club",
        ChannelType::Group,
        0,
        "bobs-own",
        &[ReasonCode::NotMember],
    )
    .await;
    assert_nothing_arrives(&mut r.carol_in, QUIET).await;
    let kept = read_one(&r.alice, "club", ChannelType::Group, 2).await;
    assert_eq!(kept.flags & RECV_FLAG_RECALLED, 0);
}

#[tokio::test]
async fn a_removed_member_cannot_change_the_group_conversation_nor_read_it_through_the_answer() {
    let r = removal().await;
    sent(&r.alice, "club", ChannelType::Group, "secret-after-removal").await;
    for action in ACTIONS {
        let response = r
            .bob
            .conversation_op("club", ChannelType::Group, action, 1)
            .await
            .unwrap();
        if let Some(last) = response
            .conversation
            .as_ref()
            .and_then(|c| c.last_message.as_ref())
        {
            assert_ne!(
                &last.payload[..],
                b"secret-after-removal",
                "{action:?} answered with a message sent after the removal"
            );
        }
        assert!(
            matches!(
                response.reason,
                ReasonCode::NotMember | ReasonCode::ConversationMissing
            ),
            "{action:?}: got {:?}",
            response.reason
        );
        assert_eq!(response.conversation, None, "{action:?}");
    }
}

#[tokio::test]
async fn a_removed_members_conversation_list_shows_nothing_sent_after_the_removal() {
    let r = removal().await;
    sent(&r.alice, "club", ChannelType::Group, "secret-after-removal").await;
    for conversation in conversations(&r.bob).await {
        if conversation.channel_id != "club" {
            continue;
        }
        assert!(
            conversation.last_message_seq <= 2,
            "a seq after the removal is visible: {conversation:?}"
        );
        assert!(
            conversation
                .last_message
                .as_ref()
                .is_none_or(|m| &m.payload[..] != b"secret-after-removal"),
            "the message after the removal is visible: {conversation:?}"
        );
        assert_eq!(conversation.unread, 0, "{conversation:?}");
    }
}

#[tokio::test]
async fn a_removed_member_who_reconnects_with_resume_gets_nothing_sent_after_the_removal() {
    let mut r = removal().await;
    r.bob.close().await;
    wait_closed(&mut r.bob_in).await;
    let after = sent(&r.alice, "club", ChannelType::Group, "secret-after-removal").await;
    // The server saves acknowledged positions when it sees the close.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // On the old device (it acknowledged seq 1) and on a new one (nothing
    // acknowledged: resume starts at the read position).
    for device in ["phone", "tablet"] {
        let seqs: Vec<u64> = resumed(&r.server, "bob", device)
            .await
            .iter()
            .map(|m| m.message_seq)
            .collect();
        assert!(
            seqs.iter().all(|seq| *seq < after.message_seq),
            "{device}: resume pushed seqs {seqs:?}; seq {} was sent after the removal",
            after.message_seq
        );
    }
}

// ---- allow and deny lists -------------------------------------------------

#[tokio::test]
async fn deny_and_allow_lists_refuse_sends_that_take_no_seq_and_reach_no_one() {
    let server = TestServer::start_with(|c| c.policy.allowlist_for_person = true);
    let control = server.control();
    control
        .create_group("club", &["alice", "bob", "carol", "dave"])
        .await
        .unwrap();
    for (kind, uids) in [
        (ListKind::Deny, &["dave"][..]),
        (ListKind::Allow, &["alice", "bob", "dave"][..]),
    ] {
        control
            .change_list(ListTarget::Group("club"), kind, SetChange::Replace, uids)
            .await
            .unwrap();
    }
    let (alice, mut alice_in) = server.connect("alice").await;
    let (bob, mut bob_in) = server.connect("bob").await;
    let (carol, _c) = server.connect("carol").await;
    let (dave, _d) = server.connect("dave").await;
    let group = ChannelType::Group;
    // The deny list wins even over the allow list.
    assert_send_refused(&dave, "club", group, ReasonCode::Denied).await;
    assert_send_refused(&carol, "club", group, ReasonCode::NotAllowed).await;
    assert_nothing_arrives(&mut bob_in, QUIET).await;
    let ok = sent(&alice, "club", group, "allowed").await;
    assert_eq!(ok.message_seq, 1, "refused sends took no seq");
    assert_eq!(bob_in.next_message(WAIT).await.unwrap().message_seq, 1);

    // One-to-one: the recipient's own deny list, and (with the policy on)
    // a non-empty allow list.
    for (kind, uids) in [(ListKind::Deny, &["carol"]), (ListKind::Allow, &["dave"])] {
        control
            .change_list(ListTarget::User("alice"), kind, SetChange::Replace, uids)
            .await
            .unwrap();
    }
    let person = ChannelType::Person;
    assert_send_refused(&carol, "alice", person, ReasonCode::Denied).await;
    assert_send_refused(&bob, "alice", person, ReasonCode::NotAllowed).await;
    assert_nothing_arrives(&mut alice_in, QUIET).await;
    assert!(
        conversations(&alice)
            .await
            .iter()
            .all(|c| c.channel_type != person),
        "a refused first message creates no conversation"
    );
    let ok = sent(&dave, "alice", person, "dave-allowed").await;
    assert_eq!(ok.message_seq, 1);
    assert_eq!(
        alice_in.next_message(WAIT).await.unwrap().message_id,
        ok.message_id
    );
}

// ---- acknowledgements -----------------------------------------------------

#[tokio::test]
async fn acks_from_a_non_member_do_not_complete_a_members_pending_push() {
    let server = TestServer::start_with(|c| {
        c.delivery.retry_interval_ms = 300;
        c.delivery.retry_tick_ms = 20;
    });
    server
        .control()
        .create_group("club", &["alice", "bob"])
        .await
        .unwrap();
    let (alice, _a) = server.connect("alice").await;
    let (bob, mut bob_in) = connect(
        server.addr,
        server
            .options("bob")
            .device("phone", DeviceFlag::App)
            .auto_ack(false),
    )
    .await
    .unwrap();
    // Mallory on bob's device id, so nothing but the uid tells them apart.
    let (mallory, mut mallory_in) = server.connect("mallory").await;
    let ack = sent(&alice, "club", ChannelType::Group, "for-members").await;
    let first = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!(first.message_id, ack.message_id);

    mallory.ack(ack.message_id, ack.message_seq).await.unwrap();
    mallory
        .ack_through("club", ChannelType::Group, ack.message_seq)
        .await
        .unwrap();
    // Bob's push is still pending: it comes again, flagged redelivered.
    let again = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!(again.message_id, ack.message_id);
    assert_ne!(again.flags & RECV_FLAG_REDELIVERED, 0);
    bob.ack(ack.message_id, ack.message_seq).await.unwrap();
    assert_nothing_arrives(&mut mallory_in, QUIET).await;
}

#[tokio::test]
async fn acks_sent_before_joining_a_group_do_not_hide_its_later_messages_from_resume() {
    let server = TestServer::start();
    let control = server.control();
    control.create_group("club", &["alice"]).await.unwrap();
    let (alice, _a) = server.connect("alice").await;
    sent(&alice, "club", ChannelType::Group, "before-joining").await;

    let (mallory, mut mallory_in) = server.connect("mallory").await;
    mallory
        .ack_through("club", ChannelType::Group, 1000)
        .await
        .unwrap();
    mallory.close().await;
    wait_closed(&mut mallory_in).await;
    // The server saves acknowledged positions when it sees the close.
    tokio::time::sleep(Duration::from_millis(100)).await;

    control
        .add_members("club", &["mallory", "trudy"])
        .await
        .unwrap();
    let welcome = sent(&alice, "club", ChannelType::Group, "welcome").await;
    // The control: a late joiner who acked nothing resumes the welcome.
    let trudys: Vec<u64> = resumed(&server, "trudy", "phone")
        .await
        .iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(trudys, vec![welcome.message_id]);
    let ids: Vec<u64> = resumed(&server, "mallory", "phone")
        .await
        .iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(
        ids,
        vec![welcome.message_id],
        "resume after joining pushes the message sent after the join"
    );
}
