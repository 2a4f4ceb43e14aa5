//! A pushed message stays pending until the device acknowledges it: it comes
//! again, flagged and with identical ids, until then, and never after.

mod common;

use common::{assert_nothing_arrives, TestServer, WAIT};
use ruyi::client::{connect, Client, Incoming};
use ruyi::config::Config;
use ruyi::protocol::{ChannelType, ConversationAction, ReasonCode, RECV_FLAG_REDELIVERED};
use std::time::Duration;

/// Retries every 400 ms, without jitter or backoff, so the test is quick
/// (and an ack has ample time to land between two retries).
fn fast_retries(config: &mut Config) {
    config.delivery.retry_interval_ms = 400;
    config.delivery.retry_backoff_percent = 100;
    config.delivery.retry_jitter_percent = 0;
    config.delivery.retry_tick_ms = 10;
    config.delivery.retry_attempts_max = 20;
}

async fn connect_without_acks(server: &TestServer, uid: &str) -> (Client, Incoming) {
    connect(server.addr, server.options(uid).auto_ack(false))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_withheld_ack_brings_the_message_again_flagged_with_identical_ids_and_an_ack_ends_it() {
    let server = TestServer::start_with(fast_retries);
    let (bob, mut bob_in) = connect_without_acks(&server, "bob").await;
    let (alice, _a) = server.connect("alice").await;
    let ack = alice.send_text("bob", "ack me").await.unwrap();

    let first = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!(first.flags & RECV_FLAG_REDELIVERED, 0);
    let again = bob_in.next_message(WAIT).await.unwrap();
    assert_ne!(
        again.flags & RECV_FLAG_REDELIVERED,
        0,
        "flagged as redelivered"
    );
    assert_eq!(
        (again.message_id, again.message_seq, &again.client_msg_no),
        (ack.message_id, ack.message_seq, &ack.client_msg_no),
        "identical ids"
    );
    assert_eq!(again.payload, first.payload);

    bob.ack(again.message_id, again.message_seq).await.unwrap();
    // Five retry intervals: nothing comes again.
    assert_nothing_arrives(&mut bob_in, Duration::from_millis(2000)).await;
    let stats = server.control().stats().await.unwrap();
    assert!(stats.redeliveries >= 1);
}

#[tokio::test]
async fn one_cumulative_ack_completes_a_burst() {
    let server = TestServer::start_with(fast_retries);
    let (bob, mut bob_in) = connect_without_acks(&server, "bob").await;
    let (alice, _a) = server.connect("alice").await;
    for i in 0..5 {
        alice.send_text("bob", &format!("{i}")).await.unwrap();
    }
    let mut last = 0;
    for _ in 0..5 {
        let m = bob_in.next_message(WAIT).await.unwrap();
        assert_eq!(m.flags & RECV_FLAG_REDELIVERED, 0);
        last = m.message_seq;
    }
    bob.ack_through("alice", ChannelType::Person, last)
        .await
        .unwrap();
    assert_nothing_arrives(&mut bob_in, Duration::from_millis(1000)).await;
}

#[tokio::test]
async fn clearing_unread_while_a_retry_is_pending_keeps_unread_at_zero() {
    let server = TestServer::start_with(fast_retries);
    let (bob, mut bob_in) = connect_without_acks(&server, "bob").await;
    let (alice, _a) = server.connect("alice").await;
    alice.send_text("bob", "read me").await.unwrap();
    bob_in.next_message(WAIT).await.unwrap();

    let cleared = bob
        .conversation_op(
            "alice",
            ChannelType::Person,
            ConversationAction::ClearUnread,
            0,
        )
        .await
        .unwrap();
    assert_eq!(cleared.reason, ReasonCode::Success);
    let retry = bob_in.next_message(WAIT).await.unwrap();
    assert_ne!(retry.flags & RECV_FLAG_REDELIVERED, 0);
    let list = bob.sync_conversations(0, 10, false).await.unwrap();
    assert_eq!(
        list.conversations[0].unread, 0,
        "a redelivery never changes unread"
    );
    assert!(bob
        .sync_conversations(0, 10, true)
        .await
        .unwrap()
        .conversations
        .is_empty());
}

#[tokio::test]
async fn the_sdk_acknowledges_and_hides_redeliveries_by_default() {
    let server = TestServer::start_with(fast_retries);
    let (_bob, mut bob_in) = server.connect("bob").await;
    let (alice, _a) = server.connect("alice").await;
    for i in 0..20 {
        alice.send_text("bob", &format!("{i}")).await.unwrap();
    }
    for expected in 1..=20 {
        assert_eq!(
            bob_in.next_message(WAIT).await.unwrap().message_seq,
            expected
        );
    }
    // Whether or not a retry raced an ack, the app sees each message once.
    assert_nothing_arrives(&mut bob_in, Duration::from_millis(800)).await;
}

#[tokio::test]
async fn a_device_that_acked_1_to_5_of_10_gets_exactly_6_to_10_in_order_on_resume() {
    // Default retries (3 s): no redelivery interleaves with the first ten.
    let server = TestServer::start();
    // Only a connection that resumed moves the saved position (one that did
    // not may have missed what came before its first push).
    let (bob, mut bob_in) = connect(
        server.addr,
        server.options("bob").auto_ack(false).resume(true),
    )
    .await
    .unwrap();
    let (alice, _a) = server.connect("alice").await;
    for i in 1..=10 {
        alice.send_text("bob", &format!("m{i}")).await.unwrap();
    }
    for expected in 1..=10 {
        let m = bob_in.next_message(WAIT).await.unwrap();
        assert_eq!(m.message_seq, expected);
    }
    bob.ack_through("alice", ChannelType::Person, 5)
        .await
        .unwrap();
    bob.close().await;
    while !matches!(
        bob_in.recv().await,
        Some(ruyi::client::Delivery::Closed(_)) | None
    ) {}

    // The same device comes back and asks to resume (the SDK default).
    let (_bob, mut bob_in) = connect(server.addr, server.options("bob").resume(true))
        .await
        .unwrap();
    for expected in 6..=10 {
        let m = bob_in.next_message(WAIT).await.unwrap();
        assert_eq!(
            m.message_seq, expected,
            "in order, from the first unacknowledged"
        );
        assert_eq!(&m.payload[..], format!("m{expected}").as_bytes());
    }
    assert_nothing_arrives(&mut bob_in, Duration::from_millis(800)).await;
    // A live message follows the resumed ones.
    alice.send_text("bob", "m11").await.unwrap();
    assert_eq!(bob_in.next_message(WAIT).await.unwrap().message_seq, 11);
}

#[tokio::test]
async fn a_device_that_was_never_online_resumes_from_the_unread_messages() {
    let server = TestServer::start();
    let (alice, _a) = server.connect("alice").await;
    for i in 1..=3 {
        alice.send_text("bob", &format!("m{i}")).await.unwrap();
    }
    let (_bob, mut bob_in) = connect(server.addr, server.options("bob").resume(true))
        .await
        .unwrap();
    for expected in 1..=3 {
        assert_eq!(
            bob_in.next_message(WAIT).await.unwrap().message_seq,
            expected
        );
    }
    assert_nothing_arrives(&mut bob_in, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn beyond_the_in_flight_window_messages_wait_in_storage_and_come_in_order_as_acks_open_it() {
    let server = TestServer::start_with(|c| c.limits.inflight_messages_max = 5);
    let (bob, mut bob_in) = connect_without_acks(&server, "bob").await;
    let (alice, _a) = server.connect("alice").await;
    for i in 1..=20 {
        let ack = alice.send_text("bob", &format!("m{i}")).await.unwrap();
        assert_eq!(
            ack.reason,
            ReasonCode::Success,
            "the sender never waits for bob"
        );
    }
    for round in 0..4u64 {
        for expected in round * 5 + 1..=round * 5 + 5 {
            let m = bob_in.next_message(WAIT).await.unwrap();
            assert_eq!(m.message_seq, expected);
            assert_eq!(m.flags & RECV_FLAG_REDELIVERED, 0);
        }
        assert_nothing_arrives(&mut bob_in, Duration::from_millis(200)).await;
        bob.ack_through("alice", ChannelType::Person, round * 5 + 5)
            .await
            .unwrap();
    }
    assert_nothing_arrives(&mut bob_in, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_with_pushes_in_flight_resume_gives_every_message_once_after_dedup() {
    use std::collections::BTreeSet;
    const MESSAGES: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = common::spawn_gateway(dir.path());
    let options = |uid: &str| {
        ruyi::client::ConnectOptions::new(uid)
            .token(&common::token(uid))
            .resume(true)
    };
    let (_bob, mut bob_in) = connect(addr, options("bob")).await.unwrap();
    let (alice, _a) = connect(addr, options("alice")).await.unwrap();

    // Alice streams; bob receives (and the SDK acks) as they come; the
    // gateway is killed in the middle.
    let sender = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..MESSAGES {
            match alice.send_text("bob", &format!("m{i}")).await {
                Ok(ack) if ack.reason == ReasonCode::Success => acked.push(ack.message_seq),
                _ => break,
            }
        }
        acked
    });
    let mut seen = BTreeSet::new();
    let mut deliveries = 0usize;
    while seen.len() < MESSAGES / 3 {
        let m = bob_in.next_message(WAIT).await.unwrap();
        deliveries += 1;
        seen.insert(m.message_seq);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let acked = sender.await.unwrap();
    // Drain what bob's SDK already had.
    while let Ok(m) = bob_in.next_message(Duration::from_millis(200)).await {
        deliveries += 1;
        seen.insert(m.message_seq);
    }
    let before_restart = seen.clone();

    let (mut child, addr) = common::spawn_gateway(dir.path());
    let (_bob, mut bob_in) = connect(addr, options("bob")).await.unwrap();
    let mut redelivered_after_restart = 0usize;
    while let Ok(m) = bob_in.next_message(Duration::from_millis(1500)).await {
        deliveries += 1;
        if !seen.insert(m.message_seq) {
            redelivered_after_restart += 1;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();

    for seq in &acked {
        assert!(
            seen.contains(seq),
            "acknowledged message {seq} never reached bob"
        );
    }
    // Every seq bob has is 1..=n with no gap: nothing skipped.
    let last = *seen.iter().last().unwrap();
    assert_eq!(seen.len() as u64, last, "no gaps");
    println!(
        "kill -9 with pushes in flight: {} acked sends, {} delivered before the kill, {} delivered in all, {} pushed again after the restart (acks not yet saved at the kill)",
        acked.len(),
        before_restart.len(),
        deliveries,
        redelivered_after_restart
    );
}

#[tokio::test]
async fn a_resuming_device_is_not_pushed_its_own_sends_and_the_users_other_devices_are() {
    let server = TestServer::start();
    let phone = || {
        server
            .options("alice")
            .device("phone", ruyi::protocol::DeviceFlag::App)
            .resume(true)
    };
    let (alice, mut phone_in) = connect(server.addr, phone()).await.unwrap();
    let mut sent = Vec::new();
    for i in 1..=3 {
        sent.push(alice.send_text("bob", &format!("m{i}")).await.unwrap());
    }
    // Not echoed live to the sending device.
    assert_nothing_arrives(&mut phone_in, Duration::from_millis(300)).await;
    alice.close().await;
    while !matches!(
        phone_in.recv().await,
        Some(ruyi::client::Delivery::Closed(_)) | None
    ) {}

    // The phone comes back: its own messages are not pushed to it again.
    let (_alice, mut phone_in) = connect(server.addr, phone()).await.unwrap();
    assert_nothing_arrives(&mut phone_in, Duration::from_millis(500)).await;

    // Her tablet resumes the same conversation and gets them, in order.
    let tablet = server
        .options("alice")
        .device("tablet", ruyi::protocol::DeviceFlag::Web)
        .resume(true);
    let (_tablet, mut tablet_in) = connect(server.addr, tablet).await.unwrap();
    for ack in &sent {
        let m = tablet_in.next_message(WAIT).await.unwrap();
        assert_eq!(
            (m.message_seq, &m.from_uid),
            (ack.message_seq, &"alice".to_owned())
        );
    }
}
