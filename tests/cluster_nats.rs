//! The NATS JetStream facts the clustered design relies on, checked against
//! the pinned `nats-server` (tests/cluster/requirements.txt) running as a
//! 3-server cluster on loopback: a partition's commit log is an R3 file
//! stream whose writer is fenced with `Nats-Expected-Last-Subject-Sequence`,
//! publishes are deduplicated by `Nats-Msg-Id`, and partition leases are KV
//! entries with a TTL whose revisions only grow.
//!
//! Each test starts its own cluster, so they are independent and may run in
//! parallel. Run with `cargo test --release --test cluster_nats`.

#[path = "common/nats.rs"]
mod nats;

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, kv, message::PublishMessage as Publish, stream};
use bytes::Bytes;
use nats::{r3_stream, stream_leader, NatsCluster, SyncInterval, ELECTION};
use std::time::{Duration, Instant};

/// JetStream API error: the subject's last sequence is not the expected one
/// ("wrong last sequence: N"); a real conflict.
const WRONG_LAST_SEQUENCE: u64 = 10071;
/// "wrong last sequence" without a number: 2.12 answers this to a correct
/// conditional publish while the previous publish on the subject is still
/// being processed. Nothing was stored; the publish can be retried as is.
const WRONG_LAST_SEQUENCE_CONSTANT: u64 = 10164;

/// What a fenced publish came to.
#[derive(Debug, PartialEq, Eq)]
enum Fenced {
    /// Stored at this stream sequence.
    Stored(u64),
    /// Refused with 10071: the subject's last sequence was not the expected
    /// one. The server's description (with the actual last sequence).
    Conflict(String),
}

/// The JetStream API error anywhere in `err`'s source chain.
fn api_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a jetstream::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(api) = e.downcast_ref::<jetstream::Error>() {
            return Some(api);
        }
        next = e.source();
    }
    None
}

/// Publishes `payload` to `subject` only if the subject's last message is
/// at stream sequence `expected` (0: the subject has none), retrying the
/// transient 10164, and "no responders" for a few seconds: a stream just
/// created or just failed over may not have its interest in the subject
/// known on every server yet, and a message nobody was subscribed to was
/// not stored, so both retries are safe. Returns how many 10164s were
/// retried too.
async fn publish_fenced(
    js: &jetstream::Context,
    subject: &str,
    expected: u64,
    payload: &'static str,
) -> Result<(Fenced, u32)> {
    let mut transient = 0;
    let no_responders_until = Instant::now() + Duration::from_secs(5);
    loop {
        let publish = Publish::build()
            .payload(Bytes::from_static(payload.as_bytes()))
            .expected_last_subject_sequence(expected);
        let result = match js.send_publish(subject.to_string(), publish).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(ack) => return Ok((Fenced::Stored(ack.sequence), transient)),
            Err(e)
                if e.kind() == PublishErrorKind::StreamNotFound
                    && Instant::now() < no_responders_until =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => match api_error(&e).map(|api| (api.error_code().0, api.to_string())) {
                Some((WRONG_LAST_SEQUENCE, message)) => {
                    return Ok((Fenced::Conflict(message), transient))
                }
                Some((WRONG_LAST_SEQUENCE_CONSTANT, _)) if transient < 100 => {
                    transient += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                _ => {
                    return Err(anyhow!(e)).with_context(|| {
                        format!("publish to {subject} expecting {expected} ({transient} 10164s)")
                    })
                }
            },
        }
    }
}

/// Reads stream sequence `seq`, waiting out a leader election.
async fn read(js: &jetstream::Context, name: &str, seq: u64) -> Result<Bytes> {
    let deadline = Instant::now() + ELECTION;
    loop {
        let attempt = async {
            let s = js.get_stream(name).await.map_err(|e| anyhow!(e))?;
            s.get_raw_message(seq).await.map_err(|e| anyhow!(e))
        };
        match attempt.await {
            Ok(m) => return Ok(m.payload),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(format!("reading {name} #{seq}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Server `i`'s own replica of `stream` as its `/jsz` reports it:
/// (messages, last sequence).
async fn replica_state(cluster: &NatsCluster, i: usize, stream: &str) -> Result<(u64, u64)> {
    let jsz = cluster
        .monitor(i, "/jsz?accounts=true&streams=true")
        .await?;
    for account in jsz["account_details"].as_array().into_iter().flatten() {
        for s in account["stream_detail"].as_array().into_iter().flatten() {
            if s["name"] == stream {
                let state = &s["state"];
                return Ok((
                    state["messages"].as_u64().unwrap_or(0),
                    state["last_seq"].as_u64().unwrap_or(0),
                ));
            }
        }
    }
    bail!("{} has no replica of {stream} in /jsz", cluster.name(i))
}

/// The fence the design's partition writer relies on: a publish carrying
/// the subject's true last sequence is stored, one carrying a stale
/// sequence is refused with 10071 and stores nothing, and the fence is per
/// subject (another subject of the same stream has its own sequence).
/// With `sync_interval: always`, so that path is exercised too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_publish_accepts_expected_subject_sequence_and_refuses_stale_one() -> Result<()> {
    let cluster = NatsCluster::start_with(3, SyncInterval::Always).await?;
    let js = jetstream::new(cluster.connect_any().await?);
    r3_stream(&js, "FENCE", &["p.>"], Duration::from_secs(120)).await?;

    let (first, _) = publish_fenced(&js, "p.0", 0, "a").await?;
    assert_eq!(first, Fenced::Stored(1));
    let (second, _) = publish_fenced(&js, "p.0", 1, "b").await?;
    assert_eq!(second, Fenced::Stored(2));
    // A writer that still believes the last sequence is 1 is refused...
    let (stale, _) = publish_fenced(&js, "p.0", 1, "stale").await?;
    let Fenced::Conflict(message) = stale else {
        panic!("a stale expected sequence was accepted: {stale:?}");
    };
    assert!(message.contains("wrong last sequence: 2"), "{message}");
    // ...and so is one expecting an empty subject.
    let (empty, _) = publish_fenced(&js, "p.0", 0, "stale").await?;
    assert!(matches!(empty, Fenced::Conflict(_)), "{empty:?}");
    // Another subject's fence is its own: empty, whatever the stream holds.
    let (other, _) = publish_fenced(&js, "p.1", 0, "c").await?;
    assert_eq!(other, Fenced::Stored(3));
    let (next, _) = publish_fenced(&js, "p.0", 2, "d").await?;
    assert_eq!(next, Fenced::Stored(4));

    // The refused publishes stored nothing.
    let mut s = js.get_stream("FENCE").await?;
    assert_eq!(s.info().await?.state.messages, 4);
    assert_eq!(read(&js, "FENCE", 2).await?, "b");
    Ok(())
}

/// Two writers that both believe they own a partition, on different
/// servers, publishing with the same expected sequence at the same time:
/// in every round exactly one is stored and the other refused, so the log
/// never forks. 100 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_fenced_publishers_exactly_one_wins_each_round() -> Result<()> {
    const ROUNDS: u64 = 100;
    let cluster = NatsCluster::start(3).await?;
    let a = jetstream::new(cluster.connect(1).await?);
    let b = jetstream::new(cluster.connect(2).await?);
    r3_stream(&a, "RACE", &["race.>"], Duration::from_secs(120)).await?;

    let mut last = 0;
    let (mut wins_a, mut transient) = (0, 0);
    for round in 0..ROUNDS {
        let (ra, rb) = tokio::join!(
            publish_fenced(&a, "race.p", last, "a"),
            publish_fenced(&b, "race.p", last, "b"),
        );
        let ((ra, ta), (rb, tb)) = (ra?, rb?);
        transient += ta + tb;
        last = match (ra, rb) {
            (Fenced::Stored(s), Fenced::Conflict(_)) => {
                wins_a += 1;
                s
            }
            (Fenced::Conflict(_), Fenced::Stored(s)) => s,
            other => panic!("round {round} expecting {last}: {other:?}"),
        };
    }
    eprintln!(
        "{ROUNDS} rounds: a won {wins_a}, b won {}; {transient} transient 10164s retried",
        ROUNDS - wins_a
    );
    let mut s = a.get_stream("RACE").await?;
    let state = s.info().await?.state.clone();
    assert_eq!((state.messages, state.last_sequence), (ROUNDS, ROUNDS));
    Ok(())
}

/// Durability of an acknowledgement: messages acknowledged just before the
/// stream's leader is killed with SIGKILL are all readable through another
/// server once a new leader is elected; the two survivors keep accepting
/// fenced publishes; and the killed server, restarted on its store, catches
/// up to hold every message in its own replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_publishes_survive_sigkill_of_the_leader_and_its_restart() -> Result<()> {
    const BEFORE: u64 = 50;
    const DURING: u64 = 10;
    let mut cluster = NatsCluster::start(3).await?;
    let js = jetstream::new(cluster.connect_any().await?);
    r3_stream(&js, "DUR", &["dur.>"], Duration::from_secs(120)).await?;
    let leader = stream_leader(&cluster, &js, "DUR").await?;
    let survivor = (leader + 1) % 3;
    // A request to a stream without a leader goes unanswered until the
    // client's request timeout (10 s by default), so without a shorter one
    // the time to readability below would be that timeout, not the election.
    let via_survivor = jetstream::new(
        async_nats::ConnectOptions::new()
            .ignore_discovered_servers()
            .request_timeout(Some(Duration::from_millis(250)))
            .connect(cluster.client_url(survivor))
            .await?,
    );

    let mut last = 0;
    for _ in 0..BEFORE {
        match publish_fenced(&js, "dur.p", last, "m").await? {
            (Fenced::Stored(s), _) => last = s,
            (other, _) => bail!("unexpected {other:?}"),
        }
    }
    // No pause: the last acknowledgement was just received.
    cluster.kill(leader)?;
    let killed_at = Instant::now();
    for seq in 1..=BEFORE {
        assert_eq!(read(&via_survivor, "DUR", seq).await?, "m", "#{seq}");
    }
    eprintln!(
        "all {BEFORE} readable via {} {:?} after killing leader {}",
        cluster.name(survivor),
        killed_at.elapsed(),
        cluster.name(leader)
    );
    for _ in 0..DURING {
        match publish_fenced(&via_survivor, "dur.p", last, "n").await? {
            (Fenced::Stored(s), _) => last = s,
            (other, _) => bail!("unexpected {other:?}"),
        }
    }
    assert_eq!(last, BEFORE + DURING);

    cluster.restart(leader).await?;
    let deadline = Instant::now() + ELECTION;
    loop {
        let state = replica_state(&cluster, leader, "DUR").await;
        if matches!(state, Ok((m, l)) if m == last && l == last) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "restarted {} did not catch up: {state:?}",
                cluster.name(leader)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Without a quorum nothing is acknowledged: with the stream leader's two
/// followers down (one SIGKILLed, one SIGSTOPped), a publish to the leader
/// times out or fails rather than being acknowledged. Once they are back,
/// the stream accepts a fenced publish again, and the unacknowledged
/// publish is in the log at most once (it may be: an unacknowledged publish
/// is "unknown", not "failed", which a writer must resolve by reading or by
/// re-publishing with the same fence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_without_quorum_is_not_acknowledged() -> Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    let js = jetstream::new(cluster.connect_any().await?);
    r3_stream(&js, "QUORUM", &["q.>"], Duration::from_secs(120)).await?;
    let (first, _) = publish_fenced(&js, "q.p", 0, "before").await?;
    assert_eq!(first, Fenced::Stored(1));
    let leader = stream_leader(&cluster, &js, "QUORUM").await?;
    let mut to_leader = jetstream::new(cluster.connect(leader).await?);
    to_leader.set_timeout(Duration::from_secs(3));
    let (killed, stopped) = ((leader + 1) % 3, (leader + 2) % 3);
    cluster.kill(killed)?;
    cluster.stop(stopped).await?;

    let started = Instant::now();
    let outcome = publish_fenced(&to_leader, "q.p", 1, "unacked").await;
    eprintln!(
        "publish without quorum: {outcome:?} after {:?}",
        started.elapsed()
    );
    assert!(
        outcome.is_err(),
        "acknowledged without a quorum: {outcome:?}"
    );

    cluster.resume(stopped)?;
    cluster.restart(killed).await?;
    for i in 0..3 {
        cluster.wait_ready(i).await?;
    }
    let any = jetstream::new(cluster.connect_any().await?);
    // Re-publishing with the same fence resolves the unknown outcome: stored
    // now (it never landed) or 10071 (it did, at sequence 2).
    let deadline = Instant::now() + ELECTION;
    let retry = loop {
        match publish_fenced(&any, "q.p", 1, "unacked").await {
            Ok((r, _)) => break r,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    eprintln!("re-publish with the same fence after recovery: {retry:?}");
    assert_eq!(read(&any, "QUORUM", 2).await?, "unacked");
    let mut s = any.get_stream("QUORUM").await?;
    assert_eq!(s.info().await?.state.messages, 2, "stored at most once");
    let (after, _) = publish_fenced(&any, "q.p", 2, "after").await?;
    assert_eq!(after, Fenced::Stored(3));
    Ok(())
}

/// `Nats-Msg-Id` deduplication: a second publish with the same id within
/// the duplicate window is acknowledged as a duplicate with the first one's
/// sequence and stores nothing, also when retried through another server
/// after the stream's leader was killed (the window's ids are replicated);
/// and once the window has passed, the same id is stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_id_deduplicates_within_window_and_across_leader_failover() -> Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    let js = jetstream::new(cluster.connect_any().await?);
    let window = Duration::from_secs(1);
    r3_stream(&js, "DEDUP", &["d.>"], window).await?;
    let publish = |js: &jetstream::Context, id: &str, payload: &'static str| {
        let js = js.clone();
        let msg = Publish::build()
            .payload(Bytes::from_static(payload.as_bytes()))
            .message_id(id);
        async move { anyhow::Ok(js.send_publish("d.p", msg).await?.await?) }
    };
    let one = publish(&js, "x", "first").await?;
    assert_eq!((one.sequence, one.duplicate), (1, false));
    let again = publish(&js, "x", "second").await?;
    assert_eq!((again.sequence, again.duplicate), (1, true));
    assert_eq!(publish(&js, "y", "other").await?.sequence, 2);
    assert_eq!(read(&js, "DEDUP", 1).await?, "first");

    // After the window the id is new again. The server forgets ids on a
    // timer, so allow it some lateness.
    let sent = Instant::now();
    tokio::time::sleep(window).await;
    let late = loop {
        let ack = publish(&js, "x", "late").await?;
        if !ack.duplicate {
            break ack;
        }
        if sent.elapsed() > window * 5 {
            bail!(
                "id x still a duplicate {:?} after a {window:?} window",
                sent.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "id forgotten {:?} after its publish ({window:?} window)",
        sent.elapsed()
    );
    assert_eq!(late.sequence, 3);

    // Failover: a 2-minute window, the leader killed right after the ack,
    // the same id retried through a survivor.
    r3_stream(&js, "DEDUP2", &["e.>"], Duration::from_secs(120)).await?;
    let leader = stream_leader(&cluster, &js, "DEDUP2").await?;
    let survivor = jetstream::new(cluster.connect((leader + 1) % 3).await?);
    let msg = || {
        Publish::build()
            .payload(Bytes::from_static(b"z"))
            .message_id("z")
    };
    let first = js.send_publish("e.p", msg()).await?.await?;
    cluster.kill(leader)?;
    let deadline = Instant::now() + ELECTION;
    let retried = loop {
        match async { anyhow::Ok(survivor.send_publish("e.p", msg()).await?.await?) }.await {
            Ok(ack) => break ack,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert!(retried.duplicate, "{retried:?}");
    assert_eq!(retried.sequence, first.sequence);
    Ok(())
}

/// Leases as KV entries with a TTL (`max_age`): `create` of a key that
/// exists fails (one holder at a time), `update` with a stale revision
/// fails (a holder that lost the lease cannot renew it), and once the
/// lease expires unrenewed another holder can `create` it, at a revision
/// higher than every earlier one, so revisions work as fencing epochs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_lease_create_is_exclusive_stale_update_fails_and_expiry_frees_it() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let js_a = jetstream::new(cluster.connect(0).await?);
    let js_b = jetstream::new(cluster.connect(1).await?);
    let ttl = Duration::from_secs(2);
    let config = kv::Config {
        bucket: "leases".to_string(),
        history: 1,
        max_age: ttl,
        num_replicas: 3,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let deadline = Instant::now() + ELECTION;
    let a = loop {
        match js_a.create_key_value(config.clone()).await {
            Ok(kv) => break kv,
            Err(e) if Instant::now() > deadline => return Err(anyhow!(e)),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let b = js_b.get_key_value("leases").await?;
    // Reads of a new bucket are direct gets, answered by every replica once
    // it has subscribed; until then they get "503 no responders" (and so
    // does a `create` of an existing key, which reads the entry to see
    // whether it is a delete marker). Wait until both servers answer.
    for store in [&a, &b] {
        let deadline = Instant::now() + ELECTION;
        while let Err(e) = store.entry("probe").await {
            if Instant::now() > deadline {
                return Err(anyhow!(e)).context("reading the new bucket");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let r1 = a.create("p0", "a".into()).await?;
    let taken = b.create("p0", "b".into()).await;
    assert_eq!(
        taken.as_ref().map_err(|e| e.kind()),
        Err(kv::CreateErrorKind::AlreadyExists),
        "{taken:?}"
    );
    let r2 = a.update("p0", "a".into(), r1).await?;
    assert!(r2 > r1);
    let stale = b.update("p0", "b".into(), r1).await;
    assert_eq!(
        stale.as_ref().map_err(|e| e.kind()),
        Err(kv::UpdateErrorKind::WrongLastRevision),
        "{stale:?}"
    );

    // Not renewed: after the TTL, b may take the lease.
    let renewed = Instant::now();
    let r3 = loop {
        match b.create("p0", "b".into()).await {
            Ok(r) => break r,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                if renewed.elapsed() > ttl * 5 {
                    bail!(
                        "lease not expired {:?} after a {ttl:?} TTL",
                        renewed.elapsed()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow!(e)).context("create after expiry"),
        }
    };
    eprintln!(
        "lease expired {:?} after its last renewal ({ttl:?} TTL)",
        renewed.elapsed()
    );
    assert!(r3 > r2, "revision went backwards: {r3} after {r2}");
    // The old holder's renewal is now refused.
    let late = a.update("p0", "a".into(), r2).await;
    assert_eq!(
        late.as_ref().map_err(|e| e.kind()),
        Err(kv::UpdateErrorKind::WrongLastRevision),
        "{late:?}"
    );
    Ok(())
}
