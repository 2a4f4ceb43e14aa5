//! What a `SendAck` promises survives restarts and kill -9: every
//! acknowledged message is stored once, at its seq, and sequences continue
//! with no gap or reuse. A resend of the same client_msg_no gets the
//! original back.

mod common;

use common::{text, token, TestServer, WAIT};
use ruyi::channel::ChannelKey;
use ruyi::client::{connect, ConnectOptions};
use ruyi::ids::{Seq, ShardId, Uid};
use ruyi::protocol::ReasonCode;
use ruyi::storage::{RocksStorage, Storage, StoredMessage};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Reads a whole channel straight from a stopped server's data directory.
fn stored_messages(dir: &Path, key: &ChannelKey) -> Vec<Arc<StoredMessage>> {
    let storage = RocksStorage::open(dir, &ruyi::Config::default().storage.rocks_options())
        .expect("storage opens");
    let mut store = storage.open_shard(ShardId(0)).unwrap();
    store
        .read_messages(key, Seq(1), usize::MAX, ruyi::storage::ReadDirection::Up)
        .unwrap()
}

#[tokio::test]
async fn sequences_and_groups_continue_after_a_restart_without_gap_or_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |_| {});
    server
        .control()
        .create_group("team", &["alice", "bob"])
        .await
        .unwrap();
    let (alice, _a) = server.connect("alice").await;
    let mut ids = Vec::new();
    for i in 1..=3u64 {
        let ack = alice.send_text("bob", &format!("p{i}")).await.unwrap();
        assert_eq!(ack.message_seq, i);
        ids.push(ack.message_id);
        assert_eq!(
            alice
                .send_group_text("team", "g")
                .await
                .unwrap()
                .message_seq,
            i
        );
    }
    drop(alice);
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();

    let server = TestServer::start_in(dir.path(), |_| {});
    let (alice, _a) = server.connect("alice").await;
    let (_bob, mut bob_in) = server.connect("bob").await;
    let ack = alice.send_text("bob", "after restart").await.unwrap();
    assert_eq!(ack.message_seq, 4);
    assert!(ack.message_id > ids[2], "message ids keep growing");
    assert_eq!(bob_in.next_message(WAIT).await.unwrap().message_seq, 4);
    assert_eq!(
        alice
            .send_group_text("team", "g")
            .await
            .unwrap()
            .message_seq,
        4
    );
    let (mallory, _m) = server.connect("mallory").await;
    assert_eq!(
        mallory.send_group_text("team", "x").await.unwrap().reason,
        ReasonCode::NotMember,
        "membership survives the restart"
    );
    drop((alice, mallory));
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();

    let key = ChannelKey::person(&Uid::new("alice"), &Uid::new("bob"));
    let stored = stored_messages(dir.path(), &key);
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq.0).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(&stored[3].payload[..], b"after restart");
}

#[tokio::test]
async fn resending_a_client_msg_no_returns_the_original_and_stores_one_copy_even_across_a_restart()
{
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |_| {});
    let (_bob, mut bob_in) = server.connect("bob").await;
    let (alice, _a) = server.connect("alice").await;

    let first = alice.send(text("bob", "cmn-1", "once")).await.unwrap();
    assert_eq!(first.reason, ReasonCode::Success);
    // Two resends: one while the first may still be committing, one after.
    let (again, third) = tokio::join!(
        alice.send(text("bob", "cmn-1", "once")),
        alice.send(text("bob", "cmn-1", "once"))
    );
    for ack in [again.unwrap(), third.unwrap()] {
        assert_eq!(ack.reason, ReasonCode::Success);
        assert_eq!(
            (ack.message_id, ack.message_seq),
            (first.message_id, first.message_seq)
        );
    }
    assert_eq!(
        bob_in.next_message(WAIT).await.unwrap().message_id,
        first.message_id
    );
    common::assert_nothing_arrives(&mut bob_in, Duration::from_millis(300)).await;
    drop((alice, _bob));
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();

    let server = TestServer::start_in(dir.path(), |_| {});
    let (alice, _a) = server.connect("alice").await;
    let after_restart = alice.send(text("bob", "cmn-1", "once")).await.unwrap();
    assert_eq!(
        (after_restart.message_id, after_restart.message_seq),
        (first.message_id, first.message_seq)
    );
    let next = alice.send(text("bob", "cmn-2", "new")).await.unwrap();
    assert_eq!(next.message_seq, 2, "the resends took no seq");
    drop(alice);
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();

    let key = ChannelKey::person(&Uid::new("alice"), &Uid::new("bob"));
    let stored = stored_messages(dir.path(), &key);
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].client_msg_no, "cmn-1");
    assert_eq!(stored[1].client_msg_no, "cmn-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_ten_thousand_sends_loses_no_acknowledged_message_and_leaves_no_gap() {
    const SENDERS: usize = 5;
    const PER_SENDER: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = common::spawn_gateway(dir.path());

    // Five senders, each writing to bob in its own channel, pipelining up to
    // 64 sends; every SendAck that arrives is recorded.
    let acked_so_far = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for sender in 0..SENDERS {
        let acked_so_far = Arc::clone(&acked_so_far);
        tasks.push(tokio::spawn(async move {
            let uid = format!("sender{sender}");
            let options = ConnectOptions::new(&uid).token(&token(&uid));
            let (client, _incoming) = connect(addr, options).await.unwrap();
            let mut acked: Vec<(String, u64, u64)> = Vec::new();
            let mut inflight = tokio::task::JoinSet::new();
            for i in 0..PER_SENDER {
                let client = client.clone();
                let cmn = format!("{uid}-{i}");
                inflight.spawn(async move {
                    let result = client.send(text("bob", &cmn, &cmn)).await;
                    (cmn, result)
                });
                while inflight.len() >= 64 {
                    match inflight.join_next().await.unwrap().unwrap() {
                        (cmn, Ok(ack)) if ack.reason == ReasonCode::Success => {
                            acked.push((cmn, ack.message_seq, ack.message_id));
                            acked_so_far.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        _ => return acked,
                    }
                }
            }
            while let Some(joined) = inflight.join_next().await {
                if let (cmn, Ok(ack)) = joined.unwrap() {
                    if ack.reason == ReasonCode::Success {
                        acked.push((cmn, ack.message_seq, ack.message_id));
                    }
                }
            }
            acked
        }));
    }
    // Kill once about a third of the messages has been acknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked_so_far.load(std::sync::atomic::Ordering::Relaxed) < SENDERS * PER_SENDER / 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "sends are not being acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut acked = Vec::new();
    for task in tasks {
        acked.push(task.await.unwrap());
    }
    let total_acked: usize = acked.iter().map(Vec::len).sum();
    assert!(
        total_acked > 0,
        "some sends were acknowledged before the kill"
    );
    assert!(
        total_acked < SENDERS * PER_SENDER,
        "the kill landed during the stream ({total_acked} acked)"
    );

    for (sender, acks) in acked.iter().enumerate() {
        let key = ChannelKey::person(&Uid::new(&format!("sender{sender}")), &Uid::new("bob"));
        let stored = stored_messages(dir.path(), &key);
        // No gaps: 1..=n.
        for (index, message) in stored.iter().enumerate() {
            assert_eq!(message.seq.0, index as u64 + 1, "gap in sender{sender}");
        }
        // Stored exactly once.
        let mut by_cmn: HashMap<&str, &StoredMessage> = HashMap::new();
        for message in &stored {
            assert!(
                by_cmn.insert(&message.client_msg_no, message).is_none(),
                "{} stored twice",
                message.client_msg_no
            );
        }
        // Every acknowledged message is there, at its seq, with its id.
        for (cmn, seq, id) in acks {
            let message = by_cmn
                .get(cmn.as_str())
                .unwrap_or_else(|| panic!("acked {cmn} was lost"));
            assert_eq!((message.seq.0, message.message_id.0), (*seq, *id));
        }
    }

    // Restarted, each channel continues right after what was stored.
    let (mut child, addr) = common::spawn_gateway(dir.path());
    let options = ConnectOptions::new("sender0").token(&token("sender0"));
    let (client, _incoming) = connect(addr, options).await.unwrap();
    let key = ChannelKey::person(&Uid::new("sender0"), &Uid::new("bob"));
    let ack = client.send(text("bob", "after-kill", "x")).await.unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let stored = stored_messages(dir.path(), &key);
    assert_eq!(ack.message_seq, stored.len() as u64);
    assert_eq!(stored.last().unwrap().client_msg_no, "after-kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_sdk_resends_through_a_kill_9_and_every_message_is_stored_once() {
    const MESSAGES: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = common::spawn_gateway(dir.path());
    let options = ConnectOptions::new("alice")
        .token(&token("alice"))
        .reconnect(true);
    let (alice, _a) = connect(addr, options).await.unwrap();
    let acked_so_far = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&acked_so_far);
    let sender = tokio::spawn(async move {
        let mut acks = Vec::new();
        for i in 0..MESSAGES {
            // Each send resolves once stored, across reconnects.
            let ack = alice
                .send(text("bob", &format!("r-{i}"), "x"))
                .await
                .unwrap();
            assert_eq!(ack.reason, ReasonCode::Success);
            acks.push(ack.message_seq);
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        acks
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked_so_far.load(std::sync::atomic::Ordering::Relaxed) < MESSAGES / 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "sends are not being acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut child, _) = common::spawn_gateway_at(dir.path(), &addr.to_string());
    let acks = tokio::time::timeout(Duration::from_secs(60), sender)
        .await
        .expect("the sender finished after the restart")
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    let key = ChannelKey::person(&Uid::new("alice"), &Uid::new("bob"));
    let stored = stored_messages(dir.path(), &key);
    assert_eq!(stored.len(), MESSAGES, "each message stored exactly once");
    for (index, message) in stored.iter().enumerate() {
        assert_eq!(message.seq.0, index as u64 + 1);
        assert_eq!(message.client_msg_no, format!("r-{index}"));
    }
    assert_eq!(acks, (1..=MESSAGES as u64).collect::<Vec<_>>());
}

/// A group's deny list is stored with it: after a restart the denied member
/// is still refused, the API still shows the list, and the next change adds
/// to it rather than replacing it with only the new uids. (It was lost on
/// restart: groups were loaded without their lists.)
#[tokio::test]
async fn a_groups_deny_and_allow_lists_survive_a_restart_and_later_changes_add_to_them() {
    use ruyi::server::ListTarget;
    use ruyi::shard::state::SetChange;
    use ruyi::storage::ListKind;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |_| {});
    let control = server.control();
    control
        .create_group("club", &["alice", "bob", "carol", "dave"])
        .await
        .unwrap();
    control
        .change_list(
            ListTarget::Group("club"),
            ListKind::Deny,
            SetChange::Add,
            &["bob"],
        )
        .await
        .unwrap();
    control
        .change_list(
            ListTarget::Group("club"),
            ListKind::Allow,
            SetChange::Add,
            &["alice", "bob", "carol"],
        )
        .await
        .unwrap();
    let (bob, _b) = server.connect("bob").await;
    let refused = bob.send_group_text("club", "before").await.unwrap();
    assert_eq!(refused.reason, ReasonCode::Denied);
    // The control handle holds the store open: let go of it before the
    // restart.
    drop((bob, control));
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();

    let server = TestServer::start_in(dir.path(), |_| {});
    let (bob, _b) = server.connect("bob").await;
    let refused = bob
        .send_group_text("club", "after a restart")
        .await
        .unwrap();
    assert_eq!(refused.reason, ReasonCode::Denied, "the deny list survived");
    let (dave, _d) = server.connect("dave").await;
    let refused = dave.send_group_text("club", "not allowed").await.unwrap();
    assert_eq!(
        refused.reason,
        ReasonCode::NotAllowed,
        "the allow list survived"
    );
    let (alice, _a) = server.connect("alice").await;
    let sent = alice.send_group_text("club", "hello").await.unwrap();
    assert_eq!(sent.reason, ReasonCode::Success);

    let deny = server
        .control()
        .change_list(
            ListTarget::Group("club"),
            ListKind::Deny,
            SetChange::Add,
            &["carol"],
        )
        .await
        .unwrap();
    assert_eq!(deny, vec!["bob".to_owned(), "carol".to_owned()]);
    let (status, info) = common::api_post(
        &server.api_url(),
        "/channel/info",
        serde_json::json!({"channel_id": "club"}),
    )
    .await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(
        info["data"]["blacklist"],
        serde_json::json!(["bob", "carol"])
    );
    assert_eq!(
        info["data"]["whitelist"],
        serde_json::json!(["alice", "bob", "carol"])
    );
    drop((alice, bob, dave));
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();
}
