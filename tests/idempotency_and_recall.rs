//! A client_msg_no names one message of one sender: a resend gets the
//! original back, a reuse for another channel is refused (never answered
//! as stored), and a recall by client_msg_no finds the message even when
//! it is sent right behind the `Send`, before the `SendAck`.

mod common;

use common::{text, TestServer};
use ruyi::client::Client;
use ruyi::protocol::{ChannelType, ReasonCode, Recv, SyncDirection, RECV_FLAG_RECALLED};

/// What `client` reads of its person channel with `other`, from `start`.
async fn synced(client: &Client, other: &str, start: u64) -> Vec<Recv> {
    let response = client
        .sync_messages(other, ChannelType::Person, start, 0, 10, SyncDirection::Up)
        .await
        .unwrap();
    assert_eq!(response.reason, ReasonCode::Success);
    response.messages
}

/// It failed with `message_missing` every time: the recall reached the
/// channel's owner while the send was still waiting for its commit.
#[tokio::test]
async fn a_recall_by_client_msg_no_pipelined_right_behind_its_send_recalls_the_message() {
    let server = TestServer::start();
    let (alice, _a) = server.connect("alice").await;
    let (bob, _b) = server.connect("bob").await;
    for i in 0..10 {
        let no = format!("pipelined-{i}");
        let (sent, recalled) = tokio::join!(
            alice.send(text("bob", &no, "oops")),
            alice.recall("bob", ChannelType::Person, 0, &no)
        );
        let sent = sent.unwrap();
        let recalled = recalled.unwrap();
        assert_eq!(sent.reason, ReasonCode::Success);
        assert_eq!(recalled.reason, ReasonCode::Success, "round {i}");
        assert_eq!(
            (recalled.message_id, recalled.message_seq),
            (sent.message_id, sent.message_seq)
        );
        let stored = synced(&bob, "alice", sent.message_seq).await;
        assert_eq!(stored.len(), 1);
        assert!(stored[0].flags & RECV_FLAG_RECALLED != 0, "stored recalled");
        assert!(stored[0].payload.is_empty());
    }
}

/// It was answered `success` with the first message's id and seq, and the
/// second message was stored nowhere: a silent loss.
#[tokio::test]
async fn a_client_msg_no_reused_for_another_person_is_refused_and_both_conversations_stay_whole() {
    let server = TestServer::start();
    let (alice, _a) = server.connect("alice").await;
    let (bob, _b) = server.connect("bob").await;
    let (carol, _c) = server.connect("carol").await;
    let first = alice.send(text("bob", "same-no", "for bob")).await.unwrap();
    assert_eq!(first.reason, ReasonCode::Success);
    let reused = alice
        .send(text("carol", "same-no", "for carol"))
        .await
        .unwrap();
    assert_eq!(reused.reason, ReasonCode::ClientMsgNoReused);
    assert_eq!((reused.message_id, reused.message_seq), (0, 0));
    // The same reuse while the first is still being committed.
    let (a, b) = tokio::join!(
        alice.send(text("bob", "racing-no", "for bob")),
        alice.send(text("carol", "racing-no", "for carol"))
    );
    assert_eq!(a.unwrap().reason, ReasonCode::Success);
    assert_eq!(b.unwrap().reason, ReasonCode::ClientMsgNoReused);
    // A resend to the right person still gets the original.
    let again = alice.send(text("bob", "same-no", "for bob")).await.unwrap();
    assert_eq!(
        (again.reason, again.message_id, again.message_seq),
        (ReasonCode::Success, first.message_id, first.message_seq)
    );
    let to_bob = synced(&bob, "alice", 1).await;
    assert_eq!(to_bob.len(), 2);
    assert_eq!(&to_bob[0].payload[..], b"for bob");
    let to_carol = synced(&carol, "alice", 1).await;
    assert!(
        to_carol.is_empty(),
        "nothing was stored for carol: {to_carol:?}"
    );
    // Carol's conversation works with a fresh client_msg_no.
    let fresh = alice.send(text("carol", "fresh-no", "hi")).await.unwrap();
    assert_eq!((fresh.reason, fresh.message_seq), (ReasonCode::Success, 1));
}
