//! `ruyi::cluster::log::append`, the fenced append of a partition's batch
//! to its replicated log, against the pinned nats-server as a 3-server
//! JetStream cluster on loopback: one writer's appends follow each other,
//! a stale or competing writer is told it lost the place, and every retry
//! of an append (after a lost acknowledgement, after the duplicate window,
//! after a timeout without a quorum) ends with it stored exactly once.

#[path = "common/nats.rs"]
mod nats;

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use bytes::Bytes;
use nats::{append_settled, r3_stream, stream_leader, NatsCluster, ELECTION};
use ruyi::cluster::log::{append, append_id, AppendError, AppendPolicy, Appended};
use std::time::{Duration, Instant};

async fn log_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &str,
    duplicate_window: Duration,
) -> Result<jetstream::stream::Stream> {
    r3_stream(js, name, &[subjects], duplicate_window).await?;
    Ok(js.get_stream(name).await?)
}

/// Every message stored on `subject`, in order, as (sequence, payload).
async fn messages_on(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<Vec<(u64, String)>> {
    let info = stream.get_info().await?;
    let mut out = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        match stream.get_raw_message(seq).await {
            Ok(message) if message.subject.as_str() == subject => {
                out.push((seq, String::from_utf8_lossy(&message.payload).into_owned()))
            }
            Ok(_) => {}
            Err(error) => bail!("reading {seq}: {error}"),
        }
    }
    Ok(out)
}

async fn append_str(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    subject: &str,
    expected: u64,
    writer: &str,
    payload: &'static str,
) -> Result<Appended, AppendError> {
    append_settled(
        js,
        stream,
        subject,
        expected,
        &append_id(subject, expected, writer),
        Bytes::from_static(payload.as_bytes()),
        &AppendPolicy::default(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writers_appends_follow_each_other_and_a_stale_writer_is_refused() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let js = jetstream::new(cluster.connect_any().await?);
    let stream = log_stream(&js, "LOG1", "log1.>", Duration::from_secs(120)).await?;
    let subject = "log1.7";
    let mut last = 0;
    for payload in ["b1", "b2", "b3"] {
        let appended = append_str(&js, &stream, subject, last, "n1.e1", payload).await?;
        assert!(!appended.earlier, "{appended:?}");
        assert!(appended.seq > last);
        last = appended.seq;
    }
    // Another subject (partition) has its own fence.
    let other = append_str(&js, &stream, "log1.8", 0, "n1.e1", "x").await?;
    assert!(other.seq > last);
    // A writer that saw only the first batch cannot append after it: the
    // place is the second batch's.
    let stored = messages_on(&stream, subject).await?;
    let (first, second) = (stored[0].0, stored[1].0);
    let stale = append_str(&js, &stream, subject, first, "n2.e2", "stale").await;
    assert_eq!(stale, Err(AppendError::Conflict { at: second }));
    // Nor can one that believes the partition is empty.
    let empty = append_str(&js, &stream, subject, 0, "n2.e2", "stale").await;
    assert_eq!(empty, Err(AppendError::Conflict { at: first }));
    // A fence from beyond the subject's end is refused for good.
    let ahead = append_str(&js, &stream, subject, last + 100, "n2.e2", "ahead").await;
    assert!(matches!(ahead, Err(AppendError::Refused(_))), "{ahead:?}");
    let stored: Vec<String> = messages_on(&stream, subject)
        .await?
        .into_iter()
        .map(|(_, payload)| payload)
        .collect();
    assert_eq!(stored, ["b1", "b2", "b3"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_racing_for_one_place_one_stores_and_the_other_is_refused() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let a = jetstream::new(cluster.connect(0).await?);
    let b = jetstream::new(cluster.connect(1).await?);
    let stream_a = log_stream(&a, "LOG2", "log2.>", Duration::from_secs(120)).await?;
    let stream_b = b.get_stream("LOG2").await?;
    let mut expected = 0;
    let (mut wins_a, mut wins_b) = (0, 0);
    for round in 0..30 {
        let subject = "log2.1";
        let (ra, rb) = tokio::join!(
            append_str(&a, &stream_a, subject, expected, "a", "from a"),
            append_str(&b, &stream_b, subject, expected, "b", "from b"),
        );
        let seq = match (ra, rb) {
            (Ok(won), Err(AppendError::Conflict { at })) => {
                wins_a += 1;
                assert_eq!(at, won.seq, "round {round}");
                won.seq
            }
            (Err(AppendError::Conflict { at }), Ok(won)) => {
                wins_b += 1;
                assert_eq!(at, won.seq, "round {round}");
                won.seq
            }
            other => bail!("round {round}: not one winner: {other:?}"),
        };
        expected = seq;
    }
    eprintln!("wins: a {wins_a}, b {wins_b}");
    assert_eq!(messages_on(&stream_a, "log2.1").await?.len(), 30);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_append_is_stored_once_within_and_after_the_duplicate_window() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let js = jetstream::new(cluster.connect_any().await?);
    let window = Duration::from_secs(1);
    let stream = log_stream(&js, "LOG3", "log3.>", window).await?;
    let subject = "log3.2";
    let first = append_str(&js, &stream, subject, 0, "n1.e1", "once").await?;
    // Within the window the stream answers the repeat as a duplicate.
    let again = append_str(&js, &stream, subject, 0, "n1.e1", "once").await?;
    assert_eq!(
        again,
        Appended {
            seq: first.seq,
            earlier: true
        }
    );
    // The same writer appends again after it.
    let next = append_str(&js, &stream, subject, first.seq, "n1.e1", "next").await?;
    // After the window the stream has forgotten the id: a plain repeat is
    // refused by the fence (10071), not acknowledged as a duplicate.
    forgotten(&js, subject, &append_id(subject, 0, "n1.e1"), window).await?;
    // `append` reads back the place it wanted (not the subject's last
    // message, which is now `next`) and finds its own append there.
    let late = append_str(&js, &stream, subject, 0, "n1.e1", "once").await?;
    assert_eq!(
        late,
        Appended {
            seq: first.seq,
            earlier: true
        }
    );
    // Another writer's repeat of that place is a conflict, not a success.
    let other = append_str(&js, &stream, subject, 0, "n2.e2", "once").await;
    assert_eq!(other, Err(AppendError::Conflict { at: first.seq }));
    let stored: Vec<u64> = messages_on(&stream, subject)
        .await?
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(stored, [first.seq, next.seq]);
    Ok(())
}

/// Waits until a publish with `id` expecting 0 on `subject` is refused by
/// the fence (10071) instead of acknowledged as a duplicate: the stream's
/// duplicate window has let go of `id`.
async fn forgotten(
    js: &jetstream::Context,
    subject: &str,
    id: &str,
    window: Duration,
) -> Result<()> {
    tokio::time::sleep(window).await;
    let deadline = Instant::now() + ELECTION;
    loop {
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(Bytes::from_static(b"probe"))
            .expected_last_subject_sequence(0)
            .message_id(id);
        let outcome = match js.send_publish(subject.to_string(), publish).await {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        match outcome {
            Ok(ack) if ack.duplicate => {}
            Ok(ack) => bail!("the probe was stored at {}", ack.sequence),
            Err(error) if error.to_string().contains("10071") => return Ok(()),
            // Busy, no stream leader for a while, no answer: the probe's
            // fence (the subject is not empty) keeps it from ever being
            // stored, so it is simply tried again.
            Err(error)
                if error.to_string().contains("10164")
                    || matches!(
                        error.kind(),
                        PublishErrorKind::StreamNotFound | PublishErrorKind::TimedOut
                    ) => {}
            Err(error) => bail!("probe: {error}"),
        }
        if Instant::now() > deadline {
            bail!("{id} still a duplicate {ELECTION:?} after its window");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_without_a_quorum_is_unknown_and_its_retry_stores_it_exactly_once() -> Result<()>
{
    let mut cluster = NatsCluster::start(3).await?;
    let js = jetstream::new(cluster.connect_any().await?);
    let stream = log_stream(&js, "LOG4", "log4.>", Duration::from_secs(120)).await?;
    let subject = "log4.3";
    let before = append_str(&js, &stream, subject, 0, "n1.e1", "before").await?;
    let leader = stream_leader(&cluster, &js, "LOG4").await?;
    let to_leader = jetstream::new(cluster.connect(leader).await?);
    let leader_stream = to_leader.get_stream("LOG4").await?;
    let (killed, stopped) = ((leader + 1) % 3, (leader + 2) % 3);
    cluster.kill(killed)?;
    cluster.stop(stopped).await?;

    let policy = AppendPolicy {
        ack_timeout: Duration::from_secs(2),
        ..AppendPolicy::default()
    };
    let id = append_id(subject, before.seq, "n1.e1");
    let payload = Bytes::from_static(b"unacked");
    let outcome = append(
        &to_leader,
        &leader_stream,
        subject,
        before.seq,
        &id,
        payload.clone(),
        &policy,
    )
    .await;
    assert!(
        matches!(outcome, Err(AppendError::Unknown(_))),
        "without a quorum: {outcome:?}"
    );
    // Retried while the first attempt is still being proposed (10158 from
    // the server), it stays unknown: never refused, since it may yet land.
    let retried = append(
        &to_leader,
        &leader_stream,
        subject,
        before.seq,
        &id,
        payload.clone(),
        &policy,
    )
    .await;
    eprintln!("retried without a quorum: {retried:?}");
    assert!(
        matches!(retried, Err(AppendError::Unknown(_))),
        "retried without a quorum: {retried:?}"
    );

    cluster.resume(stopped)?;
    cluster.restart(killed).await?;
    for i in 0..3 {
        cluster.wait_ready(i).await?;
    }
    let any = jetstream::new(cluster.connect_any().await?);
    let any_stream = any.get_stream("LOG4").await?;
    // The same append, retried until it is no longer unknown.
    let settled = append_settled(
        &any,
        &any_stream,
        subject,
        before.seq,
        &id,
        payload.clone(),
        &policy,
    )
    .await
    .context("the retried append")?;
    eprintln!("settled after the quorum came back: {settled:?}");
    let stored = messages_on(&any_stream, subject).await?;
    assert_eq!(
        stored,
        [
            (before.seq, "before".to_string()),
            (settled.seq, "unacked".to_string())
        ]
    );
    Ok(())
}

mod end_to_end {
    //! The log step end to end: an owner appends its partition's batches
    //! (records of real storage mutations) and applies each to its own
    //! RocksDB once acknowledged; a second node reads the same log from
    //! its position and applies it to its own RocksDB, stops, and catches
    //! up from where it stopped. Both stores end with the same messages and
    //! conversation rows.

    use super::*;
    use ruyi::cluster::apply::Applier;
    use ruyi::cluster::log::read_next;
    use ruyi::cluster::record::{LogRecord, Writer};
    use ruyi::ids::{MessageId, Seq, ShardId, Uid};
    use ruyi::key::ChannelKey;
    use ruyi::storage::rocks::RocksOptions;
    use ruyi::storage::{
        ConversationRecord, Mutation, ReadDirection, RocksStorage, ShardStore, Storage,
        StoredMessage, SyncPolicy,
    };
    use std::sync::Arc;

    fn store(dir: &std::path::Path) -> Result<RocksStorage> {
        let options = RocksOptions {
            sync: SyncPolicy::Always,
            block_cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
            idempotency_ttl_ms: 60_000,
        };
        Ok(RocksStorage::open(dir, &options)?)
    }

    /// The batch an owner would commit for message `seq` of alice's chat
    /// with bob.
    fn batch(seq: u64) -> Vec<Mutation> {
        let (alice, bob) = (Uid::new("alice"), Uid::new("bob"));
        let chat = ChannelKey::person(&alice, &bob);
        let row = |read_floor| ConversationRecord {
            read_floor,
            deleted_seq: 0,
            own_above_floor: 0,
            version: seq,
        };
        vec![
            Mutation::Message(Arc::new(StoredMessage {
                message_id: MessageId(1000 + seq),
                seq: Seq(seq),
                channel: chat.clone(),
                from_uid: alice.clone(),
                from_device: Arc::from("phone"),
                client_msg_no: format!("c{seq}"),
                timestamp_ms: 1_700_000_000_000,
                send_flags: 0,
                payload: Bytes::from(format!("hello {seq}")),
                recalled: false,
            })),
            Mutation::Conversation {
                uid: alice.clone(),
                key: chat.clone(),
                record: row(seq),
            },
            Mutation::Conversation {
                uid: bob,
                key: chat,
                record: row(0),
            },
        ]
    }

    /// Applies every record of `subject` after `applier`'s position.
    async fn catch_up(
        stream: &jetstream::stream::Stream,
        subject: &str,
        applier: &mut Applier,
        store: &mut dyn ShardStore,
    ) -> Result<usize> {
        let mut applied = 0;
        while let Some((seq, bytes)) =
            read_next(stream, subject, applier.applied(), Duration::from_secs(5)).await?
        {
            let record = LogRecord::decode(&bytes)?;
            if applier.apply(store, seq, &record)? {
                applied += 1;
            }
        }
        Ok(applied)
    }

    fn history(store: &mut dyn ShardStore) -> Result<Vec<String>> {
        let chat = ChannelKey::person(&Uid::new("alice"), &Uid::new("bob"));
        let mut out: Vec<String> = store
            .read_messages(&chat, Seq(1), 100, ReadDirection::Up)?
            .iter()
            .map(|m| format!("{} {} {:?}", m.seq.0, m.message_id.0, m.payload))
            .collect();
        for uid in ["alice", "bob"] {
            out.push(format!(
                "{uid}: {:?}",
                store.conversation(&Uid::new(uid), &chat)?
            ));
        }
        Ok(out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_node_applying_the_log_ends_with_the_owners_history() -> Result<()> {
        let cluster = NatsCluster::start(3).await?;
        let js = jetstream::new(cluster.connect(0).await?);
        let stream = log_stream(&js, "LOG5", "log5.>", Duration::from_secs(120)).await?;
        let subject = "log5.9";
        let writer = Writer { node: 1, epoch: 3 };
        let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
        let owner_storage = store(dirs.0.path())?;
        let mut owner = owner_storage.open_shard(ShardId(0))?;
        let mut owner_log = Applier::open(&mut *owner, 9)?;

        let follower_js = jetstream::new(cluster.connect(1).await?);
        let follower_stream = follower_js.get_stream("LOG5").await?;
        // The follower node: its store (None while it is down) and its
        // position in the partition's log.
        let open_follower = || -> Result<(Box<dyn ShardStore>, Applier)> {
            let mut store = store(dirs.1.path())?.open_shard(ShardId(0))?;
            let applier = Applier::open(&mut *store, 9)?;
            Ok((store, applier))
        };
        let mut follower = Some(open_follower()?);

        for seq in 1..=20u64 {
            let record = LogRecord {
                partition: 9,
                writer,
                mutations: batch(seq),
            };
            let expected = owner_log.applied();
            let id = append_id(subject, expected, "n1.e3");
            let appended = append_settled(
                &js,
                &stream,
                subject,
                expected,
                &id,
                Bytes::from(record.encode()),
                &AppendPolicy::default(),
            )
            .await?;
            // The owner applies its own batch once the log holds it.
            assert!(owner_log.apply(&mut *owner, appended.seq, &record)?);
            if seq == 8 {
                let (store, applier) = follower.as_mut().unwrap();
                assert_eq!(
                    catch_up(&follower_stream, subject, applier, &mut **store).await?,
                    8
                );
                // The follower stops (its store closed) and misses some.
                follower = None;
            }
            if seq == 14 {
                let (_, applier) = follower.insert(open_follower()?);
                // Its position survived; one stream per partition here, so
                // the sequences are consecutive.
                assert_eq!(applier.applied() + 6, owner_log.applied());
            }
        }
        let (follower_store, follower_log) = follower.as_mut().unwrap();
        assert_eq!(
            catch_up(
                &follower_stream,
                subject,
                follower_log,
                &mut **follower_store
            )
            .await?,
            12
        );
        assert_eq!(follower_log.applied(), owner_log.applied());
        // Reading again applies nothing twice.
        assert_eq!(
            catch_up(
                &follower_stream,
                subject,
                follower_log,
                &mut **follower_store
            )
            .await?,
            0
        );
        // A record delivered again (its stream sequence at or below the
        // position, after the reopen) is skipped, and the store unchanged.
        let before = history(&mut **follower_store)?;
        let (seq, bytes) = read_next(&follower_stream, subject, 0, Duration::from_secs(5))
            .await?
            .context("the first record")?;
        let again = LogRecord::decode(&bytes)?;
        assert!(!follower_log.apply(&mut **follower_store, seq, &again)?);
        assert_eq!(history(&mut **follower_store)?, before);
        let owner_history = history(&mut *owner)?;
        assert_eq!(owner_history.len(), 22);
        assert_eq!(history(&mut **follower_store)?, owner_history);
        Ok(())
    }
}

mod bridge {
    //! A shard's way to the log: a glommio executor hands one tick's
    //! appends to the NATS thread and gets every result back at once.

    use super::*;
    use ruyi::cluster::bridge::{AppendRequest, BridgeConfig, BridgeError, LogBridge};

    fn request(subject: &str, expected: u64, payload: &str) -> AppendRequest {
        AppendRequest {
            subject: subject.to_string(),
            expected: Some(expected),
            writer: "n1.e1".to_string(),
            payload: Bytes::from(payload.to_string()),
        }
    }

    /// A runtime for the test's own NATS calls (the bridge has its own
    /// thread) and a 3-server cluster.
    fn started() -> Result<(tokio::runtime::Runtime, NatsCluster)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let cluster = runtime.block_on(NatsCluster::start(3))?;
        Ok((runtime, cluster))
    }

    fn config(urls: Vec<String>, stream: &str) -> BridgeConfig {
        BridgeConfig {
            urls,
            stream: stream.to_string(),
            create: None,
            // A new stream's subject can take a loaded machine more than
            // the default 200 ms to route (answered "no stream found", so
            // nothing stored); a shard would retry the unknown append, and
            // these tests, which make each append once, wait up to 5 s.
            policy: AppendPolicy {
                busy_retries_max: 2500,
                ..AppendPolicy::default()
            },
            queue_max: 16,
            connect_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_shard_appends_each_ticks_batches_through_the_nats_thread() -> Result<()> {
        let (runtime, cluster) = started()?;
        let stream = runtime.block_on(async {
            let js = jetstream::new(cluster.connect_any().await?);
            log_stream(&js, "LOG6", "log6.>", Duration::from_secs(120)).await
        })?;
        let bridge = LogBridge::start(config(cluster.client_urls(), "LOG6"))?;

        // As a shard does, from its glommio executor.
        let (tick1, tick2) = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let first: Vec<AppendRequest> = (0..8)
                    .map(|p| request(&format!("log6.{p}"), 0, &format!("t1 p{p}")))
                    .collect();
                let tick1 = bridge.append_all(first).await?;
                let after = |p: usize| tick1[p].as_ref().map(|a| a.seq).unwrap_or(0);
                // The next tick: partitions 0 and 1 after their first
                // appends, and two that the log answers differently.
                let second = vec![
                    request("log6.0", after(0), "t2 p0"),
                    request("log6.1", after(1), "t2 p1"),
                    // Another writer, behind: partition 2 is taken.
                    AppendRequest {
                        writer: "n2.e2".to_string(),
                        ..request("log6.2", 0, "t2 p2 stale")
                    },
                    // This writer's own first append again (its answer lost,
                    // say): recognised, stored once.
                    request("log6.3", 0, "t1 p3"),
                ];
                let tick2 = bridge.append_all(second).await?;
                drop(bridge);
                Ok::<_, BridgeError>((tick1, tick2))
            })
            .map_err(|e| anyhow::anyhow!("starting the executor: {e}"))?
            .join()
            .map_err(|e| anyhow::anyhow!("the executor: {e}"))??;

        let seqs: Vec<u64> = tick1
            .iter()
            .map(|r| r.as_ref().map(|a| a.seq).map_err(Clone::clone))
            .collect::<Result<_, _>>()?;
        let mut distinct = seqs.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 8, "{seqs:?}");
        assert!(tick2[0]
            .as_ref()
            .is_ok_and(|a| a.seq > seqs[0] && !a.earlier));
        assert!(tick2[1]
            .as_ref()
            .is_ok_and(|a| a.seq > seqs[1] && !a.earlier));
        assert_eq!(tick2[2], Err(AppendError::Conflict { at: seqs[2] }));
        assert_eq!(
            tick2[3],
            Ok(Appended {
                seq: seqs[3],
                earlier: true
            })
        );
        let stored = runtime.block_on(messages_on(&stream, "log6.0"))?;
        assert_eq!(
            stored.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(),
            ["t1 p0", "t2 p0"]
        );
        Ok(())
    }

    #[test]
    fn appends_to_one_subject_in_one_tick_run_in_order() -> Result<()> {
        let (runtime, cluster) = started()?;
        let stream = runtime.block_on(async {
            let js = jetstream::new(cluster.connect_any().await?);
            log_stream(&js, "LOG7", "log7.>", Duration::from_secs(120)).await
        })?;
        let bridge = LogBridge::start(config(cluster.client_urls(), "LOG7"))?;
        // Three appends to one subject in one request: the second expects
        // sequence 1 (one subject in this stream), which holds only if it
        // runs after the first; the third expects whatever the second got.
        let results = runtime.block_on(bridge.append_all(vec![
            request("log7.a", 0, "one"),
            request("log7.a", 1, "two"),
            AppendRequest {
                expected: None,
                ..request("log7.a", 0, "three")
            },
        ]))?;
        let seqs: Vec<u64> = results
            .iter()
            .map(|r| r.as_ref().map(|a| a.seq).map_err(Clone::clone))
            .collect::<Result<_, _>>()?;
        assert_eq!(seqs, [1, 2, 3]);
        let stored = runtime.block_on(messages_on(&stream, "log7.a"))?;
        assert_eq!(
            stored.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(),
            ["one", "two", "three"]
        );
        Ok(())
    }

    #[test]
    fn a_bridge_that_cannot_start_says_why() -> Result<()> {
        let (_runtime, cluster) = started()?;
        let missing = LogBridge::start(config(cluster.client_urls(), "NO_SUCH_STREAM"));
        assert!(
            matches!(missing, Err(BridgeError::Stream { .. })),
            "{:?}",
            missing.err()
        );
        let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let nobody = LogBridge::start(BridgeConfig {
            connect_timeout: Duration::from_secs(3),
            ..config(vec![format!("nats://{free}")], "LOG")
        });
        assert!(
            matches!(nobody, Err(BridgeError::Connect { .. })),
            "{:?}",
            nobody.err()
        );
        Ok(())
    }
}
