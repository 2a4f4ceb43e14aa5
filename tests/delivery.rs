//! Messages reach every device of every member, in order: one-to-one, groups
//! across shards, several devices per user.

mod common;

use common::{assert_nothing_arrives, shard_of, TestServer, WAIT};
use ruyi::ids::ShardId;
use ruyi::protocol::{ChannelType, ReasonCode, RECV_FLAG_FROM_SELF};
use std::time::Duration;

#[tokio::test]
async fn one_to_one_message_reaches_the_online_recipient_with_its_ack_ids() {
    let server = TestServer::start();
    let (_bob, mut bob_in) = server.connect("bob").await;
    let (alice, _alice_in) = server.connect("alice").await;

    let ack = alice.send_text("bob", "hello bob").await.unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);
    assert_eq!(ack.message_seq, 1);
    assert_ne!(ack.message_id, 0);

    let got = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!(got.message_id, ack.message_id);
    assert_eq!(got.message_seq, 1);
    assert_eq!(got.client_msg_no, ack.client_msg_no);
    assert_eq!(got.from_uid, "alice");
    assert_eq!(
        got.channel_id, "alice",
        "bob sees the other person as the channel"
    );
    assert_eq!(got.channel_type, ChannelType::Person);
    assert_eq!(&got.payload[..], b"hello bob");
    assert_eq!(got.flags, 0);
}

#[tokio::test]
async fn person_channel_is_one_log_whichever_side_sends() {
    let server = TestServer::start();
    let (alice, mut alice_in) = server.connect("alice").await;
    let (bob, mut bob_in) = server.connect("bob").await;

    assert_eq!(alice.send_text("bob", "1").await.unwrap().message_seq, 1);
    assert_eq!(bob.send_text("alice", "2").await.unwrap().message_seq, 2);
    assert_eq!(alice.send_text("bob", "3").await.unwrap().message_seq, 3);

    assert_eq!(bob_in.next_message(WAIT).await.unwrap().message_seq, 1);
    assert_eq!(alice_in.next_message(WAIT).await.unwrap().message_seq, 2);
    assert_eq!(bob_in.next_message(WAIT).await.unwrap().message_seq, 3);
}

#[tokio::test]
async fn group_message_fans_out_to_members_on_every_shard_but_not_to_the_sending_connection() {
    let server = TestServer::start();
    let control = server.control();
    control
        .create_group("team", &["alice", "bob", "carol", "dave"])
        .await
        .unwrap();
    // Members on both shards, whichever shard owns the group.
    let (alice, mut alice_in) = server.connect_on_shard("alice", "phone", ShardId(0)).await;
    let (_bob, mut bob_in) = server.connect_on_shard("bob", "phone", ShardId(1)).await;
    let (_carol, mut carol_in) = server.connect_on_shard("carol", "phone", ShardId(0)).await;
    let (_dave, mut dave_in) = server.connect_on_shard("dave", "phone", ShardId(1)).await;
    assert_eq!(shard_of(&alice), ShardId(0));

    for i in 1..=3u64 {
        let ack = alice
            .send_group_text("team", &format!("m{i}"))
            .await
            .unwrap();
        assert_eq!(ack.reason, ReasonCode::Success);
        assert_eq!(ack.message_seq, i);
    }
    for member in [&mut bob_in, &mut carol_in, &mut dave_in] {
        for i in 1..=3u64 {
            let got = member.next_message(WAIT).await.unwrap();
            assert_eq!(got.message_seq, i);
            assert_eq!(got.channel_id, "team");
            assert_eq!(got.channel_type, ChannelType::Group);
            assert_eq!(got.from_uid, "alice");
        }
    }
    assert_nothing_arrives(&mut alice_in, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn every_device_gets_messages_and_the_senders_other_devices_see_their_own() {
    let server = TestServer::start();
    let (_bob_phone, mut bob_phone_in) = server.connect_device("bob", "phone").await;
    let (_bob_web, mut bob_web_in) = server.connect_device("bob", "web").await;
    let (alice_phone, mut alice_phone_in) = server.connect_device("alice", "phone").await;
    let (_alice_desk, mut alice_desk_in) = server.connect_device("alice", "desktop").await;

    let ack = alice_phone.send_text("bob", "hi").await.unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);

    for inbox in [&mut bob_phone_in, &mut bob_web_in] {
        let got = inbox.next_message(WAIT).await.unwrap();
        assert_eq!(got.message_id, ack.message_id);
        assert_eq!(got.channel_id, "alice");
        assert_eq!(got.flags & RECV_FLAG_FROM_SELF, 0);
    }
    let own = alice_desk_in.next_message(WAIT).await.unwrap();
    assert_eq!(own.message_id, ack.message_id);
    assert_eq!(
        own.channel_id, "bob",
        "alice's other device sees bob as the channel"
    );
    assert_ne!(
        own.flags & RECV_FLAG_FROM_SELF,
        0,
        "flagged as sent by alice"
    );
    assert_nothing_arrives(&mut alice_phone_in, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_thousand_messages_in_one_channel_arrive_in_seq_order_without_gaps() {
    let server = TestServer::start();
    let (_bob, mut bob_in) = server.connect("bob").await;
    let (alice, _alice_in) = server.connect("alice").await;

    // Pipelined: all sends in flight at once, as a busy client would.
    let sends: Vec<_> = (0..1000)
        .map(|i| {
            let alice = alice.clone();
            tokio::spawn(async move { alice.send_text("bob", &format!("{i}")).await })
        })
        .collect();
    let mut seqs = Vec::new();
    for send in sends {
        let ack = send.await.unwrap().unwrap();
        assert_eq!(ack.reason, ReasonCode::Success);
        seqs.push(ack.message_seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=1000).collect::<Vec<u64>>());

    for expected in 1..=1000u64 {
        let got = bob_in.next_message(WAIT).await.unwrap();
        assert_eq!(got.message_seq, expected);
    }
}

#[tokio::test]
async fn non_member_send_is_refused_with_not_member_and_delivers_nothing() {
    let server = TestServer::start();
    server
        .control()
        .create_group("club", &["alice", "bob"])
        .await
        .unwrap();
    let (_bob, mut bob_in) = server.connect("bob").await;
    let (mallory, _m) = server.connect("mallory").await;

    let ack = mallory.send_group_text("club", "let me in").await.unwrap();
    assert_eq!(ack.reason, ReasonCode::NotMember);
    assert_eq!(ack.message_id, 0);
    assert_eq!(ack.message_seq, 0);
    let missing = mallory.send_group_text("nowhere", "hello?").await.unwrap();
    assert_eq!(missing.reason, ReasonCode::ChannelMissing);
    assert_nothing_arrives(&mut bob_in, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn removed_member_receives_nothing_committed_after_removal() {
    let server = TestServer::start();
    let control = server.control();
    control
        .create_group("g", &["alice", "bob", "carol"])
        .await
        .unwrap();
    let (alice, _a) = server.connect("alice").await;
    let (_bob, mut bob_in) = server.connect("bob").await;
    let (_carol, mut carol_in) = server.connect("carol").await;

    alice.send_group_text("g", "before").await.unwrap();
    assert_eq!(bob_in.next_message(WAIT).await.unwrap().message_seq, 1);
    assert_eq!(carol_in.next_message(WAIT).await.unwrap().message_seq, 1);

    let info = control.remove_members("g", &["bob"]).await.unwrap();
    assert_eq!(info.members, vec!["alice".to_string(), "carol".to_string()]);
    let ack = alice.send_group_text("g", "after").await.unwrap();
    assert_eq!(ack.message_seq, 2);
    assert_eq!(carol_in.next_message(WAIT).await.unwrap().message_seq, 2);
    assert_nothing_arrives(&mut bob_in, Duration::from_millis(300)).await;

    let refused = _bob.send_group_text("g", "still here?").await.unwrap();
    assert_eq!(refused.reason, ReasonCode::NotMember);
}

#[tokio::test]
async fn bad_sends_get_a_reason_and_the_connection_stays_usable() {
    let server = TestServer::start_with(|c| c.limits.payload_size_max_bytes = 1024);
    let (alice, _a) = server.connect("alice").await;
    let (_bob, mut bob_in) = server.connect("bob").await;

    let too_big = alice.send_text("bob", &"x".repeat(2000)).await.unwrap();
    assert_eq!(too_big.reason, ReasonCode::PayloadTooLarge);
    let to_self = alice.send_text("alice", "me").await.unwrap();
    assert_eq!(to_self.reason, ReasonCode::InvalidChannel);
    let mut no_id = ruyi::client::Outgoing {
        channel_id: "bob".into(),
        channel_type: ChannelType::Person,
        client_msg_no: String::new(),
        flags: 0,
        payload: bytes::Bytes::from_static(b"x"),
    };
    assert_eq!(
        alice.send(no_id.clone()).await.unwrap().reason,
        ReasonCode::InvalidClientMsgNo
    );
    no_id.client_msg_no = "ok-1".into();
    no_id.channel_type = ChannelType(7);
    assert_eq!(
        alice.send(no_id).await.unwrap().reason,
        ReasonCode::InvalidChannel
    );

    let fine = alice.send_text("bob", "fine").await.unwrap();
    assert_eq!(fine.reason, ReasonCode::Success);
    assert_eq!(fine.message_seq, 1, "refused sends took no seq");
    assert_eq!(
        &bob_in.next_message(WAIT).await.unwrap().payload[..],
        b"fine"
    );
}
