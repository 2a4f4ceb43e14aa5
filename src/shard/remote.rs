//! What a cluster node's shard does with other nodes' partitions: it
//! forwards its connections' writes to them to the owning node
//! ([`forward_loop`]), and it follows their logs, applying every record to
//! its own store and delivering it to its own connections
//! ([`follow_loop`]).

use super::runtime::Runtime;
use crate::cluster::bridge::{LogBridge, Unanswered};
use crate::cluster::forward::{client_answer, encode_request};
use crate::cluster::record::LogRecord;
use crate::protocol::{Packet, ReasonCode, VerifyLimits};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// The pause before a record the store failed to take is tried again.
const APPLY_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Forwards what the shard queued for other nodes, in the order it was
/// made, and hands each answer to its connection as it comes.
pub(super) async fn forward_loop(runtime: Rc<Runtime>, bridge: Arc<LogBridge>) {
    let cluster = &runtime.config.cluster;
    let timeout = Duration::from_millis(cluster.forward_timeout_ms);
    let verify = VerifyLimits::for_frame_size(runtime.config.limits.frame_size_max_bytes);
    loop {
        runtime.signals.forward.wait().await;
        loop {
            let forwards = runtime.state.borrow_mut().take_forwards();
            if forwards.is_empty() {
                break;
            }
            let mut items = Vec::with_capacity(forwards.len());
            let mut waiting = Vec::with_capacity(forwards.len());
            for forward in forwards {
                match encode_request(&forward.request) {
                    Ok(bytes) => {
                        items.push((
                            cluster.forward_subject(forward.partition),
                            bytes::Bytes::from(bytes),
                        ));
                        waiting.push(forward);
                    }
                    Err(error) => {
                        tracing::error!(%error, "a write could not be forwarded");
                        let now_failed = Err(ReasonCode::Unknown);
                        runtime.state.borrow_mut().forward_answered(
                            forward.conn,
                            &forward.request,
                            now_failed,
                        );
                    }
                }
            }
            let answers = match bridge.forward(items, timeout).await {
                Ok(answers) => answers,
                Err(error) => {
                    tracing::warn!(%error, "forwarding writes failed");
                    let mut state = runtime.state.borrow_mut();
                    for forward in waiting {
                        state.forward_answered(
                            forward.conn,
                            &forward.request,
                            Err(ReasonCode::ServerBusy),
                        );
                    }
                    continue;
                }
            };
            let runtime = Rc::clone(&runtime);
            glommio::spawn_local(async move {
                for (answer, forward) in answers.into_iter().zip(waiting) {
                    let answer = answer.recv().await.unwrap_or(Err(Unanswered::Stopped));
                    let packet = answered(answer, &verify);
                    runtime.state.borrow_mut().forward_answered(
                        forward.conn,
                        &forward.request,
                        packet,
                    );
                }
            })
            .detach();
        }
    }
}

/// The packet a forwarded request's connection gets: the owner's answer,
/// or `ServerBusy` (retryable) when there is none.
fn answered(
    answer: Result<bytes::Bytes, Unanswered>,
    verify: &VerifyLimits,
) -> Result<Packet, ReasonCode> {
    let bytes = answer.map_err(|why| {
        tracing::debug!(%why, "a forwarded write has no answer");
        ReasonCode::ServerBusy
    })?;
    client_answer(&bytes, verify)
}

/// Follows the logs of `partitions` (owned by other nodes, followed by
/// this shard) from the positions its store holds: every record is applied
/// once, in log order, and delivered to this node's connections.
pub(super) async fn follow_loop(
    runtime: Rc<Runtime>,
    bridge: Arc<LogBridge>,
    partitions: Vec<u32>,
) {
    let cluster = &runtime.config.cluster;
    let node = cluster.node_id;
    let mut applied = BTreeMap::new();
    for partition in &partitions {
        let position = runtime.state.borrow_mut().log_applied(*partition);
        match position {
            Ok(seq) => {
                applied.insert(*partition, seq);
            }
            Err(error) => {
                tracing::error!(%error, partition, "reading a followed partition's position failed; not following it");
            }
        }
    }
    let Some(after) = applied.values().min().copied() else {
        return;
    };
    let subjects = applied.keys().map(|p| cluster.subject(*p)).collect();
    let records = match bridge
        .follow(subjects, after, cluster.follow_buffer_records)
        .await
    {
        Ok(records) => records,
        Err(error) => {
            tracing::error!(%error, "following other nodes' partitions failed");
            return;
        }
    };
    while let Ok((subject, seq, payload)) = records.recv().await {
        let Some(partition) = cluster.partition_of_subject(&subject) else {
            continue;
        };
        let Some(at) = applied.get(&partition).copied() else {
            continue;
        };
        if seq <= at {
            continue;
        }
        let record = match LogRecord::decode(&payload) {
            Ok(record) => record,
            Err(error) => {
                // Nothing after it can be applied in order: the partition
                // stops here, loudly, until a build that reads it runs.
                tracing::error!(%error, partition, seq, "a record of a followed partition does not decode; no longer following it");
                applied.remove(&partition);
                continue;
            }
        };
        loop {
            let now = runtime.now();
            let result = runtime.state.borrow_mut().follow_log(
                partition,
                seq,
                &record,
                record.writer.node == node,
                now,
            );
            match result {
                Ok(()) => break,
                Err(error) => {
                    if runtime.shutting_down.get() {
                        return;
                    }
                    tracing::warn!(%error, partition, seq, "applying a followed record failed; retrying");
                    glommio::timer::sleep(APPLY_RETRY_PAUSE).await;
                }
            }
        }
        applied.insert(partition, seq);
    }
}
