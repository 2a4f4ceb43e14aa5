//! Several ruyi nodes on one replicated log (issue 15): real servers with
//! `[cluster]` on and two nodes listed, against the pinned nats-server as a
//! 3-server JetStream cluster on loopback, talked to through the SDK. Each
//! node owns half of the partitions; a write to a channel the other node
//! owns is forwarded there, and each node follows the other's partitions,
//! storing everything and pushing to its own connections.

mod common;
#[path = "common/nats.rs"]
mod nats;

use anyhow::Result;
use common::{TestServer, WAIT};
use nats::NatsCluster;
use ruyi::client::Client;
use ruyi::cluster::partition::{NodeSpec, PartitionMap};
use ruyi::ids::Uid;
use ruyi::key::ChannelKey;
use ruyi::protocol::{ChannelType, ReasonCode, SyncDirection};
use std::time::{Duration, Instant};

const PARTITIONS: u32 = 8;

/// Starts node `node` of the nodes 1 and 2 (off the async runtime: its
/// start blocks on the log).
async fn start_node(dir: &std::path::Path, nats: &NatsCluster, node: u32) -> TestServer {
    let dir = dir.to_owned();
    let urls = nats.client_urls();
    tokio::task::spawn_blocking(move || {
        TestServer::start_in(&dir, |config| {
            config.cluster.nats_urls = urls;
            config.cluster.node_id = node;
            config.cluster.nodes = vec![1, 2];
            config.cluster.partitions = PARTITIONS;
            config.cluster.ack_timeout_ms = 500;
            config.cluster.retry_pause_max_ms = 200;
            config.cluster.unavailable_after_ms = 300;
            config.cluster.forward_timeout_ms = 1000;
        })
    })
    .await
    .unwrap()
}

async fn stop(server: TestServer) {
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();
}

/// The node owning `key` (the map every node computes alike).
fn owner_of(key: &ChannelKey, shards: u16) -> u32 {
    let nodes = [NodeSpec { node: 1, shards }, NodeSpec { node: 2, shards }];
    let map = PartitionMap::new(PARTITIONS, &nodes).unwrap();
    map.owner_of(key).1.node
}

/// A channel's whole history as `viewer` syncs it from its node: (seq,
/// id, sender, text).
async fn history(
    viewer: &Client,
    channel: &str,
    kind: ChannelType,
) -> Vec<(u64, u64, String, String)> {
    let mut out = Vec::new();
    let mut next = 1;
    loop {
        let page = viewer
            .sync_messages(channel, kind, next, 0, 100, SyncDirection::Up)
            .await
            .unwrap();
        assert_eq!(page.reason, ReasonCode::Success);
        if page.messages.is_empty() {
            return out;
        }
        for m in &page.messages {
            out.push((
                m.message_seq,
                m.message_id,
                m.from_uid.clone(),
                String::from_utf8_lossy(&m.payload).into_owned(),
            ));
            next = m.message_seq + 1;
        }
    }
}

/// `viewer`'s node's history of the channel, once it holds `count`
/// messages (it follows the other node's log a little behind).
async fn history_of(
    viewer: &Client,
    channel: &str,
    kind: ChannelType,
    count: usize,
) -> Vec<(u64, u64, String, String)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = history(viewer, channel, kind).await;
        if got.len() >= count || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_two_nodes_chat_in_order_with_gapless_seqs_and_both_nodes_store_the_same_history(
) -> Result<()> {
    let nats = NatsCluster::start(3).await?;
    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (one, two) = tokio::join!(
        start_node(dirs.0.path(), &nats, 1),
        start_node(dirs.1.path(), &nats, 2)
    );
    // The group is made through node 2's API, wherever it lives.
    let info = two
        .control()
        .create_group("team", &["alice", "bob", "carol"])
        .await
        .unwrap();
    assert_eq!(info.members.len(), 3);

    let (alice, mut alice_in) = one.connect("alice").await;
    let (carol, mut carol_in) = one.connect("carol").await;
    let (bob, mut bob_in) = two.connect("bob").await;
    // Both people write to their chat and to the group from their own
    // node: whichever node owns each channel, one of them is forwarded.
    let mut person_seqs = Vec::new();
    let mut group_seqs = Vec::new();
    for i in 1..=10 {
        let ack = alice.send_text("bob", &format!("a{i}")).await?;
        assert_eq!(ack.reason, ReasonCode::Success, "{ack:?}");
        person_seqs.push(ack.message_seq);
        let ack = bob.send_text("alice", &format!("b{i}")).await?;
        assert_eq!(ack.reason, ReasonCode::Success, "{ack:?}");
        person_seqs.push(ack.message_seq);
        let sender = if i % 2 == 0 { &alice } else { &bob };
        let ack = sender.send_group_text("team", &format!("g{i}")).await?;
        assert_eq!(ack.reason, ReasonCode::Success, "{ack:?}");
        group_seqs.push(ack.message_seq);
    }
    // One sequence per channel, with no gaps, in the order acknowledged.
    assert_eq!(person_seqs, (1..=20).collect::<Vec<u64>>());
    assert_eq!(group_seqs, (1..=10).collect::<Vec<u64>>());

    // Pushed live to each node's own connections, in order, once; a
    // sender's own connection is not pushed its message.
    let mut bob_person = Vec::new();
    let mut bob_group = Vec::new();
    while bob_person.len() < 10 || bob_group.len() < 5 {
        let recv = bob_in.next_message(WAIT).await?;
        assert_ne!(
            recv.from_uid, "bob",
            "bob's own message pushed back: {recv:?}"
        );
        match recv.channel_type {
            ChannelType::Person => bob_person.push(recv.message_seq),
            _ => bob_group.push(recv.message_seq),
        }
    }
    assert_eq!(bob_person, (1..=10).map(|i| 2 * i - 1).collect::<Vec<_>>());
    assert_eq!(bob_group, (1..=5).map(|i| 2 * i).collect::<Vec<_>>());
    let mut alice_seen = Vec::new();
    while alice_seen.len() < 15 {
        let recv = alice_in.next_message(WAIT).await?;
        assert_ne!(recv.from_uid, "alice", "{recv:?}");
        alice_seen.push((recv.channel_type, recv.message_seq));
    }
    let alice_person: Vec<u64> = alice_seen
        .iter()
        .filter(|(kind, _)| *kind == ChannelType::Person)
        .map(|(_, seq)| *seq)
        .collect();
    assert_eq!(alice_person, (1..=10).map(|i| 2 * i).collect::<Vec<_>>());
    let mut carol_group = Vec::new();
    while carol_group.len() < 10 {
        carol_group.push(carol_in.next_message(WAIT).await?.message_seq);
    }
    assert_eq!(carol_group, (1..=10).collect::<Vec<_>>());

    // Both nodes hold the same history of both channels.
    let person_one = history_of(&alice, "bob", ChannelType::Person, 20).await;
    let person_two = history_of(&bob, "alice", ChannelType::Person, 20).await;
    assert_eq!(person_one.len(), 20);
    assert_eq!(person_one, person_two);
    let group_one = history_of(&carol, "team", ChannelType::Group, 10).await;
    let group_two = history_of(&bob, "team", ChannelType::Group, 10).await;
    assert_eq!(group_one.len(), 10);
    assert_eq!(group_one, group_two);
    // Message ids are unique across the nodes.
    let mut ids: Vec<u64> = person_one.iter().chain(&group_one).map(|m| m.1).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 30);

    drop((alice, alice_in, carol, carol_in, bob, bob_in));
    tokio::join!(stop(one), stop(two));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_channel_of_a_node_that_is_down_is_refused_as_retryable_and_lands_once_it_is_back(
) -> Result<()> {
    let nats = NatsCluster::start(3).await?;
    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (one, two) = tokio::join!(
        start_node(dirs.0.path(), &nats, 1),
        start_node(dirs.1.path(), &nats, 2)
    );
    let shards = one.handle().shards();
    // A person on node 1 writing to a chat node 2 owns.
    let alice = Uid::new("alice");
    let peer = (0..)
        .map(|i| format!("peer{i}"))
        .find(|p| owner_of(&ChannelKey::person(&alice, &Uid::new(p)), shards) == 2)
        .unwrap();
    let (sender, _in) = one.connect("alice").await;
    let ack = sender.send_text(&peer, "first").await?;
    assert_eq!((ack.reason, ack.message_seq), (ReasonCode::Success, 1));

    // Node 2 stops: nobody serves its partitions, so the send is refused
    // with a reason the client retries on, and nothing is stored.
    stop(two).await;
    let refused = sender.send_text(&peer, "while down").await?;
    assert_eq!(refused.reason, ReasonCode::ServerBusy, "{refused:?}");

    // Back: the retry (the same client_msg_no) lands once, at the next seq.
    let two = start_node(dirs.1.path(), &nats, 2).await;
    let retried = {
        let deadline = Instant::now() + WAIT;
        loop {
            let ack = sender
                .send(common::text(&peer, &refused.client_msg_no, "while down"))
                .await?;
            if ack.reason != ReasonCode::ServerBusy || Instant::now() > deadline {
                break ack;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(
        (retried.reason, retried.message_seq),
        (ReasonCode::Success, 2)
    );
    let texts: Vec<String> = history_of(&sender, &peer, ChannelType::Person, 2)
        .await
        .into_iter()
        .map(|m| m.3)
        .collect();
    assert_eq!(texts, ["first", "while down"]);
    drop((sender, _in));
    tokio::join!(stop(one), stop(two));
    Ok(())
}
