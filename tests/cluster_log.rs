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
use bytes::Bytes;
use nats::{r3_stream, stream_leader, NatsCluster, ELECTION};
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
    append(
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
    // A writer that saw only the first batch cannot append after it.
    let first = messages_on(&stream, subject).await?[0].0;
    let stale = append_str(&js, &stream, subject, first, "n2.e2", "stale").await;
    assert_eq!(stale, Err(AppendError::Conflict { last }));
    // Nor can one that believes the partition is empty.
    let empty = append_str(&js, &stream, subject, 0, "n2.e2", "stale").await;
    assert_eq!(empty, Err(AppendError::Conflict { last }));
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
            (Ok(won), Err(AppendError::Conflict { last })) => {
                wins_a += 1;
                assert_eq!(last, won.seq, "round {round}");
                won.seq
            }
            (Err(AppendError::Conflict { last }), Ok(won)) => {
                wins_b += 1;
                assert_eq!(last, won.seq, "round {round}");
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
    // After it, the fence refuses the repeat and reading back shows it is
    // this writer's own append.
    tokio::time::sleep(window + Duration::from_millis(300)).await;
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
    assert_eq!(other, Err(AppendError::Conflict { last: first.seq }));
    assert_eq!(messages_on(&stream, subject).await?.len(), 1);
    Ok(())
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

    cluster.resume(stopped)?;
    cluster.restart(killed).await?;
    for i in 0..3 {
        cluster.wait_ready(i).await?;
    }
    let any = jetstream::new(cluster.connect_any().await?);
    let any_stream = any.get_stream("LOG4").await?;
    // The same append, retried until it is no longer unknown.
    let deadline = Instant::now() + ELECTION;
    let settled = loop {
        match append(
            &any,
            &any_stream,
            subject,
            before.seq,
            &id,
            payload.clone(),
            &policy,
        )
        .await
        {
            Err(AppendError::Unknown(why)) if Instant::now() < deadline => {
                eprintln!("still unknown: {why}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => break other.context("the retried append")?,
        }
    };
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
