//! A ruyi node on a replicated log (issue 15): a real server with
//! `[cluster]` on, against the pinned nats-server as a 3-server JetStream
//! cluster on loopback, talked to through the SDK. What a `SendAck`
//! promises is in the log before it is sent: a node that lost its whole
//! data directory gets every acknowledged message back from the log, at
//! its seq, and continues without reusing one; without a quorum nothing is
//! acknowledged, new sends are refused as retryable, and the sends that
//! waited are stored once the quorum is back.

mod common;
#[path = "common/nats.rs"]
mod nats;

use anyhow::Result;
use common::{TestServer, WAIT};
use nats::NatsCluster;
use ruyi::client::Client;
use ruyi::config::Config;
use ruyi::protocol::{ChannelType, ReasonCode, SyncDirection};
use std::sync::Arc;
use std::time::Duration;

/// `[cluster]` on, against `urls`, with short waits so outages show fast.
fn clustered(config: &mut Config, urls: Vec<String>) {
    config.cluster.nats_urls = urls;
    config.cluster.partitions = 8;
    config.cluster.ack_timeout_ms = 500;
    config.cluster.retry_pause_max_ms = 200;
    config.cluster.unavailable_after_ms = 300;
}

/// Starts a server off the async runtime (its start blocks on the log).
async fn start_node(dir: &std::path::Path, nats: &NatsCluster) -> TestServer {
    let dir = dir.to_owned();
    let urls = nats.client_urls();
    tokio::task::spawn_blocking(move || {
        TestServer::start_in(&dir, |config| clustered(config, urls))
    })
    .await
    .unwrap()
}

async fn stop(server: TestServer) {
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();
}

/// A channel's whole history as `viewer` syncs it: (seq, id, text).
async fn history(viewer: &Client, channel: &str, kind: ChannelType) -> Vec<(u64, u64, String)> {
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
                String::from_utf8_lossy(&m.payload).into_owned(),
            ));
            next = m.message_seq + 1;
        }
    }
}

/// A person channel's history as (seq, text).
async fn seqs_and_texts(viewer: &Client, channel: &str) -> Vec<(u64, String)> {
    history(viewer, channel, ChannelType::Person)
        .await
        .into_iter()
        .map(|(seq, _, text)| (seq, text))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_data_directory_gets_every_acknowledged_message_back_from_the_log(
) -> Result<()> {
    let nats = NatsCluster::start(3).await?;
    let first_dir = tempfile::tempdir()?;
    let server = start_node(first_dir.path(), &nats).await;
    server
        .control()
        .create_group("team", &["alice", "bob"])
        .await
        .unwrap();
    let (alice, _a) = server.connect("alice").await;
    let (_bob, mut bob_in) = server.connect("bob").await;
    let mut person = Vec::new();
    let mut group = Vec::new();
    for i in 1..=20u64 {
        let ack = alice.send_text("bob", &format!("p{i}")).await?;
        assert_eq!((ack.reason, ack.message_seq), (ReasonCode::Success, i));
        person.push((i, ack.message_id, format!("p{i}")));
        if i % 2 == 0 {
            let ack = alice.send_group_text("team", &format!("g{i}")).await?;
            assert_eq!(ack.reason, ReasonCode::Success);
            group.push((ack.message_seq, ack.message_id, format!("g{i}")));
        }
    }
    // Delivered live as before: the log sits before the acknowledgement,
    // not in place of the push.
    for i in 1..=20u64 {
        loop {
            let recv = bob_in.next_message(WAIT).await?;
            if recv.channel_type == ChannelType::Person {
                assert_eq!(recv.message_seq, i);
                break;
            }
        }
    }
    drop((alice, _a, _bob, bob_in));
    stop(server).await;

    // The stream was created replicated, on its own.
    let js = async_nats::jetstream::new(nats.connect_any().await?);
    let info = js.get_stream("RUYI_LOG").await?.cached_info().clone();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(info.config.subjects, ["ruyi.log.>"]);

    // Another data directory, empty: everything comes from the log.
    let second_dir = tempfile::tempdir()?;
    let server = start_node(second_dir.path(), &nats).await;
    let (bob, _b) = server.connect("bob").await;
    assert_eq!(history(&bob, "alice", ChannelType::Person).await, person);
    assert_eq!(history(&bob, "team", ChannelType::Group).await, group);
    // Seqs continue, message ids keep growing, membership came back too.
    let (alice, _a) = server.connect("alice").await;
    let ack = alice.send_text("bob", "after").await?;
    assert_eq!((ack.reason, ack.message_seq), (ReasonCode::Success, 21));
    assert!(ack.message_id > person[19].1);
    let (mallory, _m) = server.connect("mallory").await;
    assert_eq!(
        mallory.send_group_text("team", "x").await?.reason,
        ReasonCode::NotMember
    );
    drop((alice, _a, mallory, _m, bob, _b));
    stop(server).await;

    // And the first directory, behind by one message, catches up on it.
    let server = start_node(first_dir.path(), &nats).await;
    let (bob, _b) = server.connect("bob").await;
    let got = history(&bob, "alice", ChannelType::Person).await;
    assert_eq!(got.len(), 21);
    assert_eq!(got[20].2, "after");
    drop((bob, _b));
    stop(server).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_nothing_is_acknowledged_and_what_waited_is_stored_once_it_returns(
) -> Result<()> {
    let mut nats = NatsCluster::start(3).await?;
    let dir = tempfile::tempdir()?;
    let server = start_node(dir.path(), &nats).await;
    let (alice, _a) = server.connect("alice").await;
    let alice = Arc::new(alice);
    for i in 1..=3 {
        let ack = alice.send_text("bob", &format!("before {i}")).await?;
        assert_eq!(ack.reason, ReasonCode::Success);
    }

    nats.kill(1)?;
    nats.kill(2)?;
    // The first send waits in a commit the log cannot settle.
    let waiting = {
        let alice = Arc::clone(&alice);
        tokio::spawn(async move { alice.send_text("bob", "waited").await })
    };
    // Once the wait passes cluster.unavailable_after_ms (after the first
    // attempt's ack_timeout_ms), new sends are refused at once as
    // retryable, not queued behind it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        let ack = tokio::time::timeout(WAIT, alice.send_text("bob", "refused"))
            .await
            .expect("answered at once")?;
        assert_eq!(ack.reason, ReasonCode::ServerBusy, "{ack:?}");
    }
    assert!(!waiting.is_finished(), "the waiting send was answered");

    nats.restart(1).await?;
    nats.restart(2).await?;
    let ack = tokio::time::timeout(Duration::from_secs(30), waiting).await???;
    assert_eq!((ack.reason, ack.message_seq), (ReasonCode::Success, 4));
    let ack = alice.send_text("bob", "after").await?;
    assert_eq!((ack.reason, ack.message_seq), (ReasonCode::Success, 5));

    let (bob, _b) = server.connect("bob").await;
    let texts = seqs_and_texts(&bob, "alice").await;
    let expected: Vec<(u64, String)> = ["before 1", "before 2", "before 3", "waited", "after"]
        .iter()
        .enumerate()
        .map(|(i, text)| (i as u64 + 1, text.to_string()))
        .collect();
    assert_eq!(texts, expected, "refused sends are not stored");
    drop((bob, _b, alice, _a));
    stop(server).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_when_its_log_is_unreachable() -> Result<()> {
    let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let dir = tempfile::tempdir()?;
    let mut config = common::test_config(dir.path());
    config.cluster.nats_urls = vec![format!("nats://{free}")];
    config.cluster.connect_timeout_ms = 1000;
    let started = tokio::task::spawn_blocking(move || ruyi::Server::start(config)).await?;
    let error = started.expect_err("no start without the log").to_string();
    assert!(
        error.contains("cluster") && error.contains("NATS"),
        "{error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fenced_by_another_writer_takes_in_its_record_and_never_reuses_its_seq() -> Result<()>
{
    use async_nats::jetstream;
    use ruyi::channel::ChannelKey;
    use ruyi::cluster::log::{append_id, AppendPolicy};
    use ruyi::cluster::partition::partition_of;
    use ruyi::cluster::record::{LogRecord, Writer};
    use ruyi::ids::{MessageId, Seq, Uid};
    use ruyi::storage::{Mutation, StoredMessage};

    let nats = NatsCluster::start(3).await?;
    let dir = tempfile::tempdir()?;
    let server = start_node(dir.path(), &nats).await;
    let (alice, _a) = server.connect("alice").await;
    let mut last_id = 0;
    for i in 1..=2 {
        let ack = alice.send_text("bob", &format!("mine {i}")).await?;
        assert_eq!((ack.reason, ack.message_seq), (ReasonCode::Success, i));
        last_id = ack.message_id;
    }

    // Another writer (node 9, believing it owns the partition) appends
    // seq 3 of the channel after the node's last record.
    let key = ChannelKey::person(&Uid::new("alice"), &Uid::new("bob"));
    let subject = format!("ruyi.log.{}", partition_of(&key, 8));
    let js = jetstream::new(nats.connect_any().await?);
    let stream = js.get_stream("RUYI_LOG").await?;
    let last = stream.get_last_raw_message_by_subject(&subject).await?;
    let record = LogRecord {
        partition: partition_of(&key, 8),
        writer: Writer { node: 9, epoch: 1 },
        mutations: vec![Mutation::Message(Arc::new(StoredMessage {
            message_id: MessageId(last_id + 1000),
            seq: Seq(3),
            channel: key.clone(),
            from_uid: Uid::new("bob"),
            from_device: "elsewhere".into(),
            client_msg_no: "from-node-9".into(),
            timestamp_ms: 0,
            send_flags: 0,
            payload: "theirs".into(),
            recalled: false,
        }))],
    };
    // Through the fenced append, retried while its outcome is unknown (a
    // stream without a leader for a while on a loaded machine).
    nats::append_settled(
        &js,
        &stream,
        &subject,
        last.sequence,
        &append_id(&subject, last.sequence, "n9.e1"),
        record.encode().into(),
        &AppendPolicy::default(),
    )
    .await?;

    // The node's next append expects its own last record: the log refuses
    // it, the send is refused as retryable, and the node takes in the
    // other writer's record before it appends again.
    let ack = alice.send_text("bob", "refused").await?;
    assert_eq!(ack.reason, ReasonCode::StorageError, "{ack:?}");
    let ack = alice.send_text("bob", "mine 4").await?;
    assert_eq!((ack.reason, ack.message_seq), (ReasonCode::Success, 4));

    let (bob, _b) = server.connect("bob").await;
    let texts = seqs_and_texts(&bob, "alice").await;
    assert_eq!(
        texts,
        [(1, "mine 1"), (2, "mine 2"), (3, "theirs"), (4, "mine 4")]
            .map(|(seq, text)| (seq, text.to_string()))
    );
    drop((alice, _a, bob, _b));
    stop(server).await;
    Ok(())
}
