//! A partition's commit log on JetStream, fenced by the subject's last
//! sequence.
//!
//! Each partition is one subject of an R3 file stream. Its owner appends a
//! batch with `Nats-Expected-Last-Subject-Sequence` set to the stream
//! sequence of the last batch it knows on that subject, so a second writer
//! (a stale owner, or two nodes that both believe they own the partition)
//! can never append after a batch it has not seen: the log is the fence.
//! Each append also carries a `Nats-Msg-Id` naming the writer and the place
//! (`append_id`), which makes every retry of the same append safe.
//!
//! What the engine does, measured against nats-server 2.12.8 in
//! `tests/cluster_nats.rs`, and what [`append`] makes of it:
//!
//! - A stale expected sequence is refused with error 10071 ("wrong last
//!   sequence: N"). That is a real conflict unless the place this append
//!   wanted is held by this very append, stored by an earlier attempt whose
//!   acknowledgement was lost. The fence means an append expecting E can
//!   only ever be stored as the subject's first message after E, so
//!   [`append`] reads that message back and decides (the subject's last
//!   message would not do: more may have been appended after it since).
//! - A correct conditional publish is sometimes refused with 10164 ("wrong
//!   last sequence", no number) while the previous publish on the subject
//!   is still in process. Nothing was stored: it is retried.
//! - Without a quorum, a publish is neither acknowledged nor refused: it
//!   times out, and may still be stored once the quorum is back. That is
//!   [`AppendError::Unknown`]; the caller retries the same append (same
//!   expected sequence, same id), which ends in one of the answers above.
//! - A repeat of the same `Nats-Msg-Id` within the stream's duplicate
//!   window is acknowledged with the first one's sequence and stores
//!   nothing; while the first one is still being proposed, the repeat is
//!   refused with 10158, and the first may still be stored: unknown.
//! - Only errors no retry can change (no such stream, a message over the
//!   stream's limit, JetStream off) are [`AppendError::Refused`]; every
//!   other error leaves the append [`AppendError::Unknown`], which a retry
//!   of the same append settles.

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use std::time::Duration;

/// JetStream: the subject's last sequence is not the expected one.
pub const WRONG_LAST_SEQUENCE: u64 = 10071;
/// JetStream: "wrong last sequence" while the previous publish on the
/// subject is still in process; nothing stored.
pub const WRONG_LAST_SEQUENCE_BUSY: u64 = 10164;

/// JetStream errors that retrying the same append cannot change: no such
/// stream, a message over the stream's maximum size, JetStream not enabled
/// (for the server or the account), a stream of another name.
const PERMANENT: [u64; 5] = [10059, 10054, 10076, 10039, 10056];

/// How an append is retried and how long it may wait.
#[derive(Debug, Clone, Copy)]
pub struct AppendPolicy {
    /// How long to wait for the stream's acknowledgement of one attempt.
    pub ack_timeout: Duration,
    /// How many times a 10164 (or "no responders" while a stream is being
    /// placed) is retried before the append is given up as unknown.
    pub busy_retries_max: u32,
    /// The pause between those retries.
    pub busy_retry_pause: Duration,
}

impl Default for AppendPolicy {
    fn default() -> Self {
        AppendPolicy {
            ack_timeout: Duration::from_secs(2),
            busy_retries_max: 100,
            busy_retry_pause: Duration::from_millis(2),
        }
    }
}

/// An append the stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Its stream sequence: the expected sequence of the partition's next
    /// append.
    pub seq: u64,
    /// Stored by an earlier attempt of the same append (its acknowledgement
    /// was lost or it landed after a timeout); this attempt stored nothing.
    pub earlier: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The place this append wanted (the subject's first message after
    /// the expected sequence) holds another writer's append, at stream
    /// sequence `at`: this writer is not the partition's owner (or is
    /// behind). Nothing of this append was stored, and it never will be.
    #[error("another writer's append holds the place, at sequence {at}")]
    Conflict { at: u64 },
    /// Not known whether the append was stored (no acknowledgement in time,
    /// the connection lost): retry the same append to find out.
    #[error("not known whether the append was stored: {0}")]
    Unknown(String),
    /// Refused for a reason that retrying the same append cannot change
    /// (no such stream, a message over the stream's limit).
    #[error("the stream refused the append: {0}")]
    Refused(String),
}

/// The `Nats-Msg-Id` of the append `writer` makes after `expected`: unique
/// per writer (a node and its ownership epoch) and place in the log, so the
/// same append always carries the same id and another writer's never does.
pub fn append_id(subject: &str, expected: u64, writer: &str) -> String {
    format!("{subject}:{expected}:{writer}")
}

/// Appends `payload` to `subject` if the subject's last message is at
/// stream sequence `expected` (0: the subject has none), with `id` (see
/// [`append_id`]) as its `Nats-Msg-Id`.
pub async fn append(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    subject: &str,
    expected: u64,
    id: &str,
    payload: Bytes,
    policy: &AppendPolicy,
) -> Result<Appended, AppendError> {
    let mut busy = 0;
    loop {
        let publish = PublishMessage::build()
            .payload(payload.clone())
            .expected_last_subject_sequence(expected)
            .message_id(id);
        let attempt = async {
            match js.send_publish(subject.to_string(), publish).await {
                Ok(ack) => ack.await,
                Err(error) => Err(error),
            }
        };
        let error = match tokio::time::timeout(policy.ack_timeout, attempt).await {
            Err(_) => {
                return Err(AppendError::Unknown(format!(
                    "no acknowledgement within {:?}",
                    policy.ack_timeout
                )))
            }
            Ok(Ok(ack)) => {
                return Ok(Appended {
                    seq: ack.sequence,
                    earlier: ack.duplicate,
                })
            }
            Ok(Err(error)) => error,
        };
        let code = api_error_code(&error);
        let transient = code == Some(WRONG_LAST_SEQUENCE_BUSY)
            || error.kind() == PublishErrorKind::StreamNotFound;
        if transient {
            // Nothing was stored: 10164 is answered before the publish is
            // proposed, and "no responders" means no stream took it.
            if busy >= policy.busy_retries_max {
                return Err(AppendError::Unknown(format!(
                    "still busy after {busy} retries: {error}"
                )));
            }
            busy += 1;
            tokio::time::sleep(policy.busy_retry_pause).await;
            continue;
        }
        return match code {
            Some(WRONG_LAST_SEQUENCE) => {
                resolve_conflict(stream, subject, expected, id, policy.ack_timeout).await
            }
            Some(code) if PERMANENT.contains(&code) => Err(AppendError::Refused(error.to_string())),
            // 10158 (the same id still being proposed), a store failure, no
            // leader right now, a lost connection, an unreadable ack: the
            // append may or may not be stored.
            _ => Err(AppendError::Unknown(error.to_string())),
        };
    }
}

/// After a 10071: the place this append wanted, the subject's first message
/// after `expected`, holds either this append (stored by an earlier attempt)
/// or another writer's.
async fn resolve_conflict(
    stream: &jetstream::stream::Stream,
    subject: &str,
    expected: u64,
    id: &str,
    timeout: Duration,
) -> Result<Appended, AppendError> {
    let request = stream
        .raw_message_builder()
        .sequence(expected + 1)
        .next_by_subject(subject)
        .send();
    let holder = match tokio::time::timeout(timeout, request).await {
        Err(_) => {
            return Err(AppendError::Unknown(
                "reading the message after the expected one timed out".into(),
            ))
        }
        Ok(Ok(message)) => message,
        Ok(Err(error))
            if error.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
        {
            // Refused although nothing follows `expected`: the subject's
            // last message is below it (the expected sequence was never
            // this subject's, or its messages were removed).
            return Err(AppendError::Refused(format!(
                "the fence expected {expected} on {subject}, which holds no message after it"
            )));
        }
        Ok(Err(error)) => {
            return Err(AppendError::Unknown(format!(
                "reading the message after the expected one: {error}"
            )))
        }
    };
    let its_id = holder
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|value| value.as_str());
    if its_id == Some(id) {
        Ok(Appended {
            seq: holder.sequence,
            earlier: true,
        })
    } else {
        Err(AppendError::Conflict {
            at: holder.sequence,
        })
    }
}

/// The first message of `subject` after stream sequence `after`, with its
/// sequence, or `None` when there is none yet: how a node reads a
/// partition's log from its applied position (to apply it, or to catch up
/// before it appends).
pub async fn read_next(
    stream: &jetstream::stream::Stream,
    subject: &str,
    after: u64,
    timeout: Duration,
) -> Result<Option<(u64, Bytes)>, AppendError> {
    let request = stream
        .raw_message_builder()
        .sequence(after + 1)
        .next_by_subject(subject)
        .send();
    match tokio::time::timeout(timeout, request).await {
        Err(_) => Err(AppendError::Unknown(format!(
            "reading {subject} after {after} timed out"
        ))),
        Ok(Ok(message)) => Ok(Some((message.sequence, message.payload))),
        Ok(Err(error))
            if error.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
        {
            Ok(None)
        }
        Ok(Err(error)) => Err(AppendError::Unknown(format!(
            "reading {subject} after {after}: {error}"
        ))),
    }
}

/// The JetStream API error code anywhere in `error`'s source chain.
fn api_error_code(error: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(api) = e.downcast_ref::<jetstream::Error>() {
            return Some(api.error_code().0);
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_id_names_the_place_and_the_writer() {
        assert_eq!(append_id("log.7", 41, "n2.e5"), "log.7:41:n2.e5");
        assert_ne!(
            append_id("log.7", 41, "n2.e5"),
            append_id("log.7", 41, "n3.e6")
        );
        assert_ne!(
            append_id("log.7", 41, "n2.e5"),
            append_id("log.7", 42, "n2.e5")
        );
    }
}
