//! Offline sync and the conversation list: the cases other gateways get
//! wrong, each as its users report it.

mod common;

use common::{assert_nothing_arrives, connect_to, TestServer, WAIT};
use ruyi::client::{Client, Delivery};
use ruyi::protocol::{
    ChannelType, Conversation, ConversationAction, ReasonCode, SyncDirection, RECV_FLAG_RECALLED,
};
use std::time::Duration;

async fn conversations(client: &Client, unread_only: bool) -> Vec<Conversation> {
    let response = client
        .sync_conversations(0, 100, unread_only)
        .await
        .unwrap();
    assert_eq!(response.reason, ReasonCode::Success);
    response.conversations
}

async fn person_history(client: &Client, other: &str) -> Vec<(u64, String)> {
    let response = client
        .sync_messages(other, ChannelType::Person, 1, 0, 100, SyncDirection::Up)
        .await
        .unwrap();
    assert_eq!(response.reason, ReasonCode::Success);
    response
        .messages
        .iter()
        .map(|m| {
            (
                m.message_seq,
                String::from_utf8_lossy(&m.payload).into_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn first_message_to_a_fully_offline_user_shows_in_their_conversations_with_unread_1() {
    let server = TestServer::start();
    let (alice, _a) = server.connect("alice").await;
    let ack = alice.send_text("bob", "are you there?").await.unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);

    // Bob was never online; he connects and syncs.
    let (bob, _b) = server.connect("bob").await;
    let list = conversations(&bob, false).await;
    assert_eq!(list.len(), 1);
    let conversation = &list[0];
    assert_eq!(conversation.channel_id, "alice");
    assert_eq!(conversation.channel_type, ChannelType::Person);
    assert_eq!(conversation.unread, 1);
    assert_eq!(conversation.last_message_seq, 1);
    let last = conversation.last_message.as_ref().unwrap();
    assert_eq!(last.message_id, ack.message_id);
    assert_eq!(&last.payload[..], b"are you there?");
    assert_eq!(conversations(&bob, true).await.len(), 1);
    assert_eq!(
        person_history(&bob, "alice").await,
        vec![(1, "are you there?".into())]
    );

    // The sender's own conversation exists too, with nothing unread.
    let mine = conversations(&alice, false).await;
    assert_eq!(mine.len(), 1);
    assert_eq!((mine[0].channel_id.as_str(), mine[0].unread), ("bob", 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_message_to_an_offline_user_survives_kill_9_right_after_its_send_ack() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = common::spawn_gateway(dir.path());
    let (alice, _a) = connect_to(addr, "alice").await;
    let ack = alice.send_text("bob", "before the crash").await.unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);
    child.kill().unwrap(); // SIGKILL, right after the SendAck
    child.wait().unwrap();

    let (mut child, addr) = common::spawn_gateway(dir.path());
    let (bob, _b) = connect_to(addr, "bob").await;
    let list = conversations(&bob, true).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].unread, 1);
    assert_eq!(
        list[0].last_message.as_ref().unwrap().message_id,
        ack.message_id
    );
    assert_eq!(
        person_history(&bob, "alice").await,
        vec![(1, "before the crash".into())]
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn a_deleted_conversation_comes_back_with_only_the_newer_message_when_the_other_side_writes()
{
    let server = TestServer::start();
    let (bob, _b) = server.connect("bob").await;
    for text in ["one", "two", "three"] {
        bob.send_text("alice", text).await.unwrap();
    }
    let (alice, mut alice_in) = server.connect("alice").await;
    assert_eq!(conversations(&alice, false).await[0].unread, 3);

    let deleted = alice
        .conversation_op("bob", ChannelType::Person, ConversationAction::Delete, 0)
        .await
        .unwrap();
    assert_eq!(deleted.reason, ReasonCode::Success);
    assert!(deleted.conversation.unwrap().deleted);
    assert!(conversations(&alice, false).await.is_empty());
    assert!(conversations(&alice, true).await.is_empty());

    let ack = bob.send_text("alice", "four").await.unwrap();
    assert_eq!(ack.message_seq, 4);
    // Deleting never stops delivery.
    let live = alice_in.next_message(WAIT).await.unwrap();
    assert_eq!(live.message_id, ack.message_id);

    let list = conversations(&alice, false).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].channel_id, "bob");
    assert_eq!(
        list[0].unread, 1,
        "only the message after the delete counts"
    );
    assert_eq!(list[0].last_message.as_ref().unwrap().message_seq, 4);
    assert_eq!(conversations(&alice, true).await.len(), 1);
    assert_eq!(
        person_history(&alice, "bob").await,
        vec![(4, "four".into())],
        "only the messages after the delete"
    );
}

#[tokio::test]
async fn clear_and_set_unread_are_exact_and_reach_every_device_of_the_user() {
    let server = TestServer::start();
    let (bob, _b) = server.connect("bob").await;
    let (alice_phone, _ap) = server.connect_device("alice", "phone").await;
    let (_alice_web, mut alice_web_in) = server.connect_device("alice", "web").await;
    for i in 0..3 {
        bob.send_text("alice", &format!("b{i}")).await.unwrap();
    }
    alice_phone.send_text("bob", "mine").await.unwrap();
    bob.send_text("alice", "b3").await.unwrap();
    // 4 from bob, 1 of alice's own: unread 4.
    assert_eq!(conversations(&alice_phone, false).await[0].unread, 4);

    let cleared = alice_phone
        .conversation_op(
            "bob",
            ChannelType::Person,
            ConversationAction::ClearUnread,
            0,
        )
        .await
        .unwrap();
    assert_eq!(cleared.conversation.unwrap().unread, 0);
    assert_eq!(conversations(&alice_phone, false).await[0].unread, 0);
    assert!(conversations(&alice_phone, true).await.is_empty());

    let set = alice_phone
        .conversation_op("bob", ChannelType::Person, ConversationAction::SetUnread, 3)
        .await
        .unwrap();
    assert_eq!(set.reason, ReasonCode::Success);
    assert_eq!(set.conversation.unwrap().unread, 3);
    assert_eq!(conversations(&alice_phone, false).await[0].unread, 3);

    // The web device heard of both changes, in order.
    let mut unread_seen = Vec::new();
    while unread_seen.len() < 2 {
        match alice_web_in.next(WAIT).await.unwrap() {
            Delivery::ConversationUpdate(c) => unread_seen.push(c.unread),
            Delivery::Message(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(unread_seen, vec![0, 3]);

    let missing = alice_phone
        .conversation_op(
            "nobody",
            ChannelType::Person,
            ConversationAction::ClearUnread,
            0,
        )
        .await
        .unwrap();
    assert_eq!(missing.reason, ReasonCode::ConversationMissing);
}

#[tokio::test]
async fn a_recalled_message_syncs_as_recalled_without_payload_and_online_members_hear_of_it() {
    let server = TestServer::start();
    let (alice, mut alice_in) = server.connect("alice").await;
    let first = alice.send_text("bob", "keep me").await.unwrap();
    let oops = alice.send_text("bob", "oops").await.unwrap();
    let (carol, _c) = server.connect("carol").await;
    let carol_msg = carol.send_text("bob", "from carol").await.unwrap();

    // Bob has not synced yet. Alice recalls by client_msg_no.
    let recalled = alice
        .recall("bob", ChannelType::Person, 0, &oops.client_msg_no)
        .await
        .unwrap();
    assert_eq!(recalled.reason, ReasonCode::Success);
    assert_eq!(
        (recalled.message_id, recalled.message_seq),
        (oops.message_id, 2)
    );
    match alice_in.next(WAIT).await.unwrap() {
        Delivery::Recall(event) => {
            assert_eq!(
                (event.message_id, event.channel_id.as_str()),
                (oops.message_id, "bob")
            )
        }
        other => panic!("expected a recall event, got {other:?}"),
    }

    let (bob, _b) = server.connect("bob").await;
    let history = bob
        .sync_messages("alice", ChannelType::Person, 1, 0, 10, SyncDirection::Up)
        .await
        .unwrap();
    assert_eq!(history.messages.len(), 2);
    assert_eq!(history.messages[0].message_id, first.message_id);
    assert_eq!(history.messages[0].flags & RECV_FLAG_RECALLED, 0);
    let gone = &history.messages[1];
    assert_eq!(gone.message_id, oops.message_id);
    assert_ne!(gone.flags & RECV_FLAG_RECALLED, 0);
    assert!(gone.payload.is_empty(), "a recalled message has no payload");
    let list = conversations(&bob, false).await;
    let with_alice = list.iter().find(|c| c.channel_id == "alice").unwrap();
    let last = with_alice.last_message.as_ref().unwrap();
    assert_ne!(
        last.flags & RECV_FLAG_RECALLED,
        0,
        "the conversation shows the marker"
    );

    // Someone else's message, or one that does not exist: clear reasons.
    let not_mine = alice
        .recall("bob", ChannelType::Person, carol_msg.message_id, "")
        .await
        .unwrap();
    assert_eq!(
        not_mine.reason,
        ReasonCode::MessageMissing,
        "not in alice's channel"
    );
    let by_bob = bob
        .recall("alice", ChannelType::Person, first.message_id, "")
        .await
        .unwrap();
    assert_eq!(by_bob.reason, ReasonCode::NotSender);
    let nothing = alice
        .recall("bob", ChannelType::Person, 12345, "")
        .await
        .unwrap();
    assert_eq!(nothing.reason, ReasonCode::MessageMissing);
}

#[tokio::test]
async fn sync_reads_ranges_both_ways_and_refuses_bad_ranges_and_strangers() {
    let server = TestServer::start();
    let control = server.control();
    control
        .create_group("room", &["alice", "bob"])
        .await
        .unwrap();
    let (alice, _a) = server.connect("alice").await;
    for i in 1..=5 {
        alice
            .send_group_text("room", &format!("m{i}"))
            .await
            .unwrap();
    }
    let seqs = |r: &ruyi::protocol::SyncMessagesResp| {
        r.messages.iter().map(|m| m.message_seq).collect::<Vec<_>>()
    };
    let up = alice
        .sync_messages("room", ChannelType::Group, 2, 5, 10, SyncDirection::Up)
        .await
        .unwrap();
    assert_eq!(seqs(&up), vec![2, 3, 4]);
    let down = alice
        .sync_messages("room", ChannelType::Group, 0, 0, 2, SyncDirection::Down)
        .await
        .unwrap();
    assert_eq!(seqs(&down), vec![5, 4]);

    for (start, end, limit, direction) in [
        (0, 0, 10, SyncDirection::Up),
        (5, 3, 10, SyncDirection::Up),
        (1, 0, 0, SyncDirection::Up),
        (1, 0, 1_000_000, SyncDirection::Up),
        (2, 4, 10, SyncDirection::Down),
    ] {
        let bad = alice
            .sync_messages("room", ChannelType::Group, start, end, limit, direction)
            .await
            .unwrap();
        assert_eq!(
            bad.reason,
            ReasonCode::InvalidRange,
            "{start} {end} {limit}"
        );
        assert!(bad.messages.is_empty());
    }
    let (mallory, _m) = server.connect("mallory").await;
    let refused = mallory
        .sync_messages("room", ChannelType::Group, 1, 0, 10, SyncDirection::Up)
        .await
        .unwrap();
    assert_eq!(refused.reason, ReasonCode::NotMember);
    let missing = mallory
        .sync_messages("nowhere", ChannelType::Group, 1, 0, 10, SyncDirection::Up)
        .await
        .unwrap();
    assert_eq!(missing.reason, ReasonCode::ChannelMissing);
}

#[tokio::test]
async fn group_conversations_count_only_others_messages_and_late_joiners_start_at_zero() {
    let server = TestServer::start();
    let control = server.control();
    control
        .create_group("team", &["alice", "bob"])
        .await
        .unwrap();
    let (alice, _a) = server.connect("alice").await;
    let (bob, _b) = server.connect("bob").await;
    alice.send_group_text("team", "a1").await.unwrap();
    bob.send_group_text("team", "b1").await.unwrap();
    alice.send_group_text("team", "a2").await.unwrap();
    assert_eq!(conversations(&alice, false).await[0].unread, 1);
    assert_eq!(conversations(&bob, false).await[0].unread, 2);

    control.add_members("team", &["carol"]).await.unwrap();
    let (carol, mut carol_in) = server.connect("carol").await;
    assert!(
        conversations(&carol, false).await.is_empty(),
        "nothing new since carol joined"
    );
    bob.send_group_text("team", "welcome").await.unwrap();
    carol_in.next_message(WAIT).await.unwrap();
    let list = conversations(&carol, false).await;
    assert_eq!((list.len(), list[0].unread), (1, 1));
    assert_nothing_arrives(&mut carol_in, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn the_first_message_creates_both_conversations_with_the_person_allowlist_on_and_off() {
    use ruyi::server::ListTarget;
    use ruyi::shard::state::SetChange;
    use ruyi::storage::ListKind;
    for allowlist_for_person in [false, true] {
        let server =
            TestServer::start_with(|c| c.policy.allowlist_for_person = allowlist_for_person);
        let (alice, _a) = server.connect("alice").await;
        let ack = alice.send_text("bob", "hello").await.unwrap();
        assert_eq!(ack.reason, ReasonCode::Success, "bob's allow list is empty");
        let (bob, _b) = server.connect("bob").await;
        let list = conversations(&bob, true).await;
        assert_eq!(
            (list.len(), list[0].unread),
            (1, 1),
            "allowlist_for_person = {allowlist_for_person}"
        );
        assert_eq!(conversations(&alice, false).await.len(), 1);

        // Bob allows only carol: that binds alice only when the setting is on.
        server
            .control()
            .change_list(
                ListTarget::User("bob"),
                ListKind::Allow,
                SetChange::Replace,
                &["carol"],
            )
            .await
            .unwrap();
        let again = alice.send_text("bob", "may I?").await.unwrap();
        let expected = if allowlist_for_person {
            ReasonCode::NotAllowed
        } else {
            ReasonCode::Success
        };
        assert_eq!(
            again.reason, expected,
            "allowlist_for_person = {allowlist_for_person}"
        );
        let (carol, _c) = server.connect("carol").await;
        assert_eq!(
            carol.send_text("bob", "hi").await.unwrap().reason,
            ReasonCode::Success
        );
        let list = conversations(&bob, false).await;
        assert!(list
            .iter()
            .any(|c| c.channel_id == "carol" && c.unread == 1));
    }
}

#[tokio::test]
async fn deny_lists_always_block_and_a_group_allow_list_applies_when_not_empty() {
    use ruyi::server::ListTarget;
    use ruyi::shard::state::SetChange;
    use ruyi::storage::ListKind;
    let server = TestServer::start();
    let control = server.control();
    control
        .create_group("club", &["alice", "bob", "carol"])
        .await
        .unwrap();
    let (alice, _a) = server.connect("alice").await;
    let (bob, _b) = server.connect("bob").await;
    let (carol, _c) = server.connect("carol").await;

    control
        .change_list(
            ListTarget::Group("club"),
            ListKind::Deny,
            SetChange::Add,
            &["alice"],
        )
        .await
        .unwrap();
    assert_eq!(
        alice.send_group_text("club", "x").await.unwrap().reason,
        ReasonCode::Denied
    );
    control
        .change_list(
            ListTarget::Group("club"),
            ListKind::Allow,
            SetChange::Replace,
            &["bob"],
        )
        .await
        .unwrap();
    assert_eq!(
        carol.send_group_text("club", "x").await.unwrap().reason,
        ReasonCode::NotAllowed
    );
    let ok = bob.send_group_text("club", "x").await.unwrap();
    assert_eq!(
        (ok.reason, ok.message_seq),
        (ReasonCode::Success, 1),
        "refusals took no seq"
    );
    let cleared = control
        .change_list(
            ListTarget::Group("club"),
            ListKind::Deny,
            SetChange::Remove,
            &["alice"],
        )
        .await
        .unwrap();
    assert!(cleared.is_empty());

    // A person's deny list blocks whatever the allowlist setting.
    control
        .change_list(
            ListTarget::User("bob"),
            ListKind::Deny,
            SetChange::Add,
            &["carol"],
        )
        .await
        .unwrap();
    assert_eq!(
        carol.send_text("bob", "hi").await.unwrap().reason,
        ReasonCode::Denied
    );
    assert_eq!(
        alice.send_text("bob", "hi").await.unwrap().reason,
        ReasonCode::Success
    );
    assert!(
        conversations(&bob, false)
            .await
            .iter()
            .all(|c| c.channel_id != "carol"),
        "a blocked first message creates no conversation"
    );
}
