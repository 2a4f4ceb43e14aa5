//! A cluster node's shard commits through its partitions' replicated log
//! (issue 15): each batch is split by partition into log records, appended
//! with the fence (the last sequence this shard applied), and applied to
//! the shard's own store only once the log holds it; only then is anything
//! acknowledged.
//!
//! The rules that keep it exactly once:
//! - An append whose fate is unknown (no quorum, a lost connection) is
//!   retried, the same bytes with the same `Nats-Msg-Id`, until the log
//!   settles it. Nothing else is appended to its partition meanwhile, and
//!   its sends wait (new sends are refused as `ServerBusy` once the wait
//!   passes `cluster.unavailable_after_ms`).
//! - Every batch gets ids of its own (node, run, shard, batch number), so a
//!   different batch can never be taken for an earlier attempt of this one.
//! - When a batch is not stored whole (another writer holds the place, the
//!   server refused a record, the local write failed), it is refused
//!   (retryable) and its partitions are marked stale: before this shard
//!   appends again, it applies whatever the log holds after its position
//!   (its own records that landed included) and reads its channels again.
//!   A resend of a refused message that did land is answered with it.

use super::commit::InFlight;
use super::runtime::Runtime;
use crate::cluster::apply::catch_up;
use crate::cluster::bridge::{AppendRequest, BridgeError, LogBridge};
use crate::cluster::log::AppendError;
use crate::cluster::partition::partition_of;
use crate::cluster::record::{size_bound, LogRecord, Writer, RECORD_OVERHEAD_BYTES};
use crate::config::ClusterConfig;
use crate::ids::ShardId;
use crate::storage::{Mutation, ShardStore, StorageError};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first pause between retries of an unsettled append.
const RETRY_PAUSE_FIRST: Duration = Duration::from_millis(10);

/// What a shard needs to commit through the log.
#[derive(Clone)]
pub struct ShardLogSetup {
    pub bridge: Arc<LogBridge>,
    /// `owners[p]`: the shard of this node owning partition `p`.
    pub owners: Arc<[ShardId]>,
    pub node: u32,
}

/// One partition's share of a batch: its records, and how far they are
/// stored.
struct PartitionAppend {
    partition: u32,
    records: Vec<Bytes>,
    /// The stream sequences of the records stored so far, in order.
    stored: Vec<u64>,
    /// Why the rest will never be stored (another writer, a refusal).
    failed: Option<AppendError>,
}

/// A shard's side of the log.
pub struct ShardLog {
    bridge: Arc<LogBridge>,
    config: ClusterConfig,
    writer: Writer,
    shard: ShardId,
    partitions: u32,
    /// Batches appended by this run of the shard (part of their ids).
    batches: u64,
    /// The last stream sequence applied, per partition this shard owns.
    applied: BTreeMap<u32, u64>,
    /// Partitions whose log may hold records this shard has not applied.
    stale: BTreeSet<u32>,
}

impl ShardLog {
    /// The shard's log, continuing from the positions its store holds.
    /// `epoch`: this run's (it grows from run to run).
    pub fn open(
        setup: &ShardLogSetup,
        config: &ClusterConfig,
        shard: ShardId,
        epoch: u64,
        store: &mut dyn ShardStore,
    ) -> Result<ShardLog, StorageError> {
        let mut applied = BTreeMap::new();
        for (partition, owner) in setup.owners.iter().enumerate() {
            if *owner == shard {
                let partition = partition as u32;
                applied.insert(partition, store.log_applied(partition)?);
            }
        }
        Ok(ShardLog {
            bridge: Arc::clone(&setup.bridge),
            config: config.clone(),
            writer: Writer {
                node: setup.node,
                epoch,
            },
            shard,
            partitions: setup.owners.len() as u32,
            batches: 0,
            applied,
            stale: BTreeSet::new(),
        })
    }

    /// Splits a batch into records: per partition, in batch order, each
    /// record whole pieces of work (a message with its conversation rows)
    /// within `cluster.record_max_bytes`, each ending with the ids issued.
    /// A piece of work too big for any record is an error.
    fn plan(
        &self,
        in_flight: &InFlight,
        mutations: &[Mutation],
    ) -> Result<Vec<PartitionAppend>, StorageError> {
        let ids = mutations
            .iter()
            .rev()
            .find(|m| matches!(m, Mutation::IdsIssued(_)))
            .cloned();
        let ids_bound = ids.as_ref().map_or(0, size_bound);
        let room = self
            .config
            .record_max_bytes
            .saturating_sub(RECORD_OVERHEAD_BYTES + 5 + ids_bound);
        let mut shares: BTreeMap<u32, Vec<Vec<Mutation>>> = BTreeMap::new();
        let mut current: BTreeMap<u32, usize> = BTreeMap::new();
        for pending in &in_flight.pending {
            let Some(key) = pending.channel() else {
                continue;
            };
            let partition = partition_of(key, self.partitions);
            if !self.applied.contains_key(&partition) {
                return Err(StorageError::Io(format!(
                    "a change of partition {partition} reached shard {}, which does not own it",
                    self.shard.0
                )));
            }
            let mut work = Vec::new();
            pending.mutations(&mut work);
            let size: usize = work.iter().map(size_bound).sum();
            if size > room {
                return Err(StorageError::Io(format!(
                    "a change of about {size} bytes does not fit a log record \
                     (cluster.record_max_bytes = {})",
                    self.config.record_max_bytes
                )));
            }
            let records = shares.entry(partition).or_default();
            let used = current.entry(partition).or_default();
            if records.is_empty() || *used + size > room {
                records.push(Vec::new());
                *used = 0;
            }
            *used += size;
            records.last_mut().expect("pushed above").extend(work);
        }
        Ok(shares
            .into_iter()
            .map(|(partition, records)| PartitionAppend {
                partition,
                records: records
                    .into_iter()
                    .map(|mut mutations| {
                        mutations.extend(ids.clone());
                        let record = LogRecord {
                            partition,
                            writer: self.writer,
                            mutations,
                        };
                        Bytes::from(record.encode())
                    })
                    .collect(),
                stored: Vec::new(),
                failed: None,
            })
            .collect())
    }

    /// This batch's writer tag (see [`crate::cluster::log::append_id`]).
    fn tag(&self) -> String {
        format!(
            "n{}.e{}.s{}.b{}",
            self.writer.node, self.writer.epoch, self.shard.0, self.batches
        )
    }

    /// Appends every record of `plan`, retrying what is not settled until
    /// it is (or the shard shuts down). True when all are stored.
    async fn append(&mut self, runtime: &Runtime, plan: &mut [PartitionAppend]) -> bool {
        self.batches += 1;
        let tag = self.tag();
        let started = Instant::now();
        let mut pause = RETRY_PAUSE_FIRST;
        let unavailable_after = Duration::from_millis(self.config.unavailable_after_ms);
        let mut unavailable = false;
        let settled = loop {
            let mut requests = Vec::new();
            let mut asked = Vec::new();
            for (i, share) in plan.iter().enumerate() {
                if share.failed.is_some() || share.stored.len() == share.records.len() {
                    continue;
                }
                let expected = share
                    .stored
                    .last()
                    .copied()
                    .unwrap_or(self.applied[&share.partition]);
                for (n, payload) in share.records.iter().enumerate().skip(share.stored.len()) {
                    requests.push(AppendRequest {
                        subject: self.config.subject(share.partition),
                        expected: (n == share.stored.len()).then_some(expected),
                        writer: tag.clone(),
                        payload: payload.clone(),
                    });
                    asked.push(i);
                }
            }
            if requests.is_empty() {
                break plan.iter().all(|share| share.failed.is_none());
            }
            let results = match self.bridge.append_all(requests).await {
                Ok(results) => results,
                Err(BridgeError::Stopped) | Err(_) => {
                    tracing::error!("the NATS thread has stopped: nothing more can be committed");
                    for share in plan.iter_mut() {
                        share.failed.get_or_insert(AppendError::Refused(
                            "the NATS thread has stopped".into(),
                        ));
                    }
                    break false;
                }
            };
            let mut unknown = None;
            for (i, result) in asked.into_iter().zip(results) {
                let share = &mut plan[i];
                match result {
                    Ok(appended) if share.failed.is_none() => share.stored.push(appended.seq),
                    Ok(_) => {}
                    // Behind a refused append of its partition: never tried.
                    Err(AppendError::Unknown(_)) if share.failed.is_some() => {}
                    Err(AppendError::Unknown(why)) => unknown = Some(why),
                    Err(error) => {
                        tracing::warn!(partition = share.partition, %error, "the log did not take a commit");
                        share.failed.get_or_insert(error);
                    }
                }
            }
            let Some(why) = unknown else {
                continue;
            };
            if runtime.shutting_down.get() {
                // Given up only at shutdown: the next start applies
                // whatever of it the log holds.
                tracing::warn!(%why, "shutting down with a commit the log has not settled");
                break false;
            }
            if !unavailable && started.elapsed() >= unavailable_after {
                unavailable = true;
                tracing::warn!(%why, waited_ms = started.elapsed().as_millis() as u64, "the log is not answering; refusing new sends until it does");
                runtime.state.borrow_mut().set_log_unavailable(true);
            }
            glommio::timer::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(self.config.retry_pause_max_ms));
        };
        if unavailable {
            tracing::info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "the log answers again"
            );
            runtime.state.borrow_mut().set_log_unavailable(false);
        }
        settled
    }

    /// Applies what the log holds beyond this shard's position on every
    /// stale partition. True when all are caught up; then, if anything was
    /// applied, what was queued meanwhile is refused and channels are read
    /// again.
    async fn catch_up_stale(&mut self, runtime: &Runtime) -> bool {
        let mut applied_any = false;
        let mut all = true;
        for partition in self.stale.clone() {
            let mut last = self.applied[&partition];
            let subject = self.config.subject(partition);
            let result = catch_up(
                &self.bridge,
                &subject,
                last,
                self.config.read_batch_records,
                |seq, record| {
                    if record.writer.node != self.writer.node {
                        tracing::warn!(
                            partition,
                            node = record.writer.node,
                            "applying a record another node wrote to a partition this node owns"
                        );
                    }
                    runtime
                        .state
                        .borrow_mut()
                        .apply_log(partition, seq, record)?;
                    last = seq;
                    Ok(())
                },
            )
            .await;
            if last != self.applied[&partition] {
                applied_any = true;
                self.applied.insert(partition, last);
            }
            match result {
                Ok(_) => {
                    self.stale.remove(&partition);
                }
                Err(error) => {
                    tracing::warn!(partition, %error, "catching up on the log failed; retrying");
                    all = false;
                }
            }
        }
        if applied_any {
            let now = runtime.now();
            runtime.state.borrow_mut().log_caught_up(now);
        }
        all
    }
}

/// The commit loop of a cluster node's shard: like the single node's
/// group commit, with the batch appended to the log before it is applied
/// to the store and acknowledged.
pub(super) async fn commit_loop(runtime: Rc<Runtime>, mut log: ShardLog, offload: bool) {
    let mut pause = RETRY_PAUSE_FIRST;
    loop {
        runtime.signals.commit.wait().await;
        loop {
            if !log.stale.is_empty() {
                if !log.catch_up_stale(&runtime).await {
                    if runtime.shutting_down.get() {
                        return;
                    }
                    runtime.state.borrow_mut().set_log_unavailable(true);
                    glommio::timer::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(log.config.retry_pause_max_ms));
                    continue;
                }
                pause = RETRY_PAUSE_FIRST;
                runtime.state.borrow_mut().set_log_unavailable(false);
            }
            let now = runtime.now();
            let begun = runtime.state.borrow_mut().begin_batch(now);
            let Some((mut mutations, in_flight)) = begun else {
                break;
            };
            runtime.committing.set(true);
            let started = Instant::now();
            let mut plan = match log.plan(&in_flight, &mutations) {
                Ok(plan) => plan,
                Err(error) => {
                    let now = runtime.now();
                    runtime
                        .state
                        .borrow_mut()
                        .finish_commit(in_flight, Err(error), now);
                    runtime.committing.set(false);
                    continue;
                }
            };
            let stored = log.append(&runtime, &mut plan).await;
            if !stored {
                log.stale.extend(plan.iter().map(|share| share.partition));
                // Take in what the log holds before the refusals go out, so
                // a client's retry meets the channels as the log has them.
                if !runtime.shutting_down.get() {
                    log.catch_up_stale(&runtime).await;
                }
                let error = plan
                    .iter()
                    .find_map(|share| share.failed.as_ref())
                    .map_or("the shard is shutting down".to_string(), |e| e.to_string());
                let now = runtime.now();
                runtime.state.borrow_mut().finish_commit(
                    in_flight,
                    Err(StorageError::Io(format!("not stored in the log: {error}"))),
                    now,
                );
                runtime.committing.set(false);
                if runtime.shutting_down.get() {
                    return;
                }
                continue;
            }
            for share in &plan {
                let seq = *share.stored.last().expect("a stored share has records");
                mutations.push(Mutation::LogApplied {
                    partition: share.partition,
                    seq,
                });
            }
            let now = runtime.now();
            let prepared = runtime
                .state
                .borrow_mut()
                .prepare_commit(mutations, in_flight, now);
            let Some((job, in_flight)) = prepared else {
                // Stored in the log, not here: applied from the log later.
                log.stale.extend(plan.iter().map(|share| share.partition));
                runtime.committing.set(false);
                continue;
            };
            let result = if offload {
                glommio::executor().spawn_blocking(job).await
            } else {
                job()
            };
            let took = started.elapsed().as_micros() as u64;
            runtime.committing.set(false);
            match &result {
                Ok(()) => {
                    for share in &plan {
                        log.applied
                            .insert(share.partition, *share.stored.last().expect("stored"));
                    }
                }
                Err(_) => log.stale.extend(plan.iter().map(|share| share.partition)),
            }
            let now = runtime.now();
            let mut state = runtime.state.borrow_mut();
            state.stats.commit_latency.record(took);
            state.finish_commit(in_flight, result, now);
        }
    }
}
