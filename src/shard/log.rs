//! A cluster node's shard commits through its partitions' replicated log
//! (issue 15): each batch is split by partition into log records, appended
//! with the fence (the last sequence this shard applied), and applied to
//! the shard's own store only once the log holds it; only then is anything
//! acknowledged.
//!
//! The rules that keep it exactly once (each proven by the simulator's
//! runs on a model log, `tests/simulation/log.rs`):
//! - An append whose fate is unknown (no quorum, a lost connection) is
//!   retried, the same bytes with the same `Nats-Msg-Id`, until the log
//!   settles it. Nothing else is appended to its partition meanwhile, and
//!   its sends wait (new sends are refused as `ServerBusy` once the wait
//!   passes `cluster.unavailable_after_ms`).
//! - Every batch gets ids of its own (node, run, shard, batch number), so a
//!   different batch can never be taken for an earlier attempt of this one.
//! - What the log stored is committed: it is written to the store however
//!   many tries that takes, and answered as committed. Of a batch stored
//!   only in part (another writer took a partition's place), the stored
//!   part is written and answered, and only the rest is refused, after the
//!   shard has applied what the log holds on those partitions.
//! - At start a shard applies what the log holds beyond its store (with the
//!   webhook events of the records this node wrote but never wrote here),
//!   then appends a barrier to each of its partitions: once stored, no
//!   append an earlier run left unanswered can land any more.
//! - A record another node wrote is applied as a follower applies it (this
//!   node's conversation versions, pushed to this node's connections).
//! - Taking a partition over ([`LogWriter::acquire`]): the shard that
//!   followed it stops following, catches up, and appends a barrier
//!   ([`LogWriter::barrier_of`]); only once the barrier is stored does the
//!   node take writes there. Every append of the old owner after it fails
//!   its fence, so everything the old owner acknowledged precedes the
//!   barrier and was applied by the new owner before it. The old owner
//!   lets the partition go ([`LogWriter::release`]) between batches, and
//!   refuses (retryable) what was routed to it meanwhile.

use super::commit::InFlight;
use super::runtime::Runtime;
use crate::cluster::apply::catch_up;
use crate::cluster::bridge::{AppendRequest, LogBridge};
use crate::cluster::log::{AppendError, Appended};
use crate::cluster::partition::partition_of;
use crate::cluster::record::{size_bound, LogRecord, Writer, RECORD_OVERHEAD_BYTES};
use crate::config::ClusterConfig;
use crate::ids::ShardId;
use crate::key::Places;
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
    /// Each partition's shard on this node, and whether this node owns it.
    pub places: Arc<Places>,
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

/// For each piece of work of a batch, in order: its share and record.
type Placement = Vec<(usize, usize)>;

/// A batch on its way into the log.
pub struct LogBatch {
    shares: Vec<PartitionAppend>,
    placement: Placement,
    /// Its writer tag (see [`crate::cluster::log::append_id`]).
    tag: String,
    /// Which share each request of the last round was for.
    asked: Vec<usize>,
}

/// How a round of appends ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// Every record is stored, or will never be (see [`LogBatch::failure`]).
    Settled,
    /// Some are not known to be stored: ask again (the same requests).
    Unknown(String),
}

impl LogBatch {
    /// Whether every record is stored.
    pub fn stored_whole(&self) -> bool {
        self.shares
            .iter()
            .all(|share| share.failed.is_none() && share.stored.len() == share.records.len())
    }

    /// Why part of it will never be stored.
    pub fn failure(&self) -> Option<&AppendError> {
        self.shares.iter().find_map(|share| share.failed.as_ref())
    }

    /// The partitions it touches.
    pub fn partitions(&self) -> impl Iterator<Item = u32> + '_ {
        self.shares.iter().map(|share| share.partition)
    }

    /// The positions to store with it once it is stored whole.
    pub fn positions(&self) -> impl Iterator<Item = Mutation> + '_ {
        self.shares.iter().filter_map(|share| {
            share.stored.last().map(|seq| Mutation::LogApplied {
                partition: share.partition,
                seq: *seq,
            })
        })
    }

    /// For each piece of work of the batch, in order: whether the record
    /// holding it is stored.
    pub fn stored_work(&self) -> Vec<bool> {
        self.placement
            .iter()
            .map(|(share, record)| self.shares[*share].stored.len() > *record)
            .collect()
    }
}

/// A shard's side of the log, without I/O: what to append for a batch and
/// what the answers mean, the position of each partition the shard owns,
/// and which partitions must be caught up on before the next append. The
/// runtime drives it over the NATS bridge; the simulator over a model log.
pub struct LogWriter {
    config: ClusterConfig,
    writer: Writer,
    shard: ShardId,
    partitions: u32,
    /// Batches begun by this run of the shard (part of their ids).
    batches: u64,
    /// The last stream sequence applied, per partition this shard owns.
    applied: BTreeMap<u32, u64>,
    /// Partitions whose log may hold records this shard has not applied.
    stale: BTreeSet<u32>,
}

impl LogWriter {
    /// The shard's writer, continuing from the positions its store holds.
    /// `places[p]`: partition `p`'s place on this node; `epoch`: this run's
    /// (it grows from run to run).
    pub fn open(
        config: &ClusterConfig,
        places: &Places,
        node: u32,
        shard: ShardId,
        epoch: u64,
        store: &mut dyn ShardStore,
    ) -> Result<LogWriter, StorageError> {
        let mut applied = BTreeMap::new();
        for partition in 0..places.len() {
            let place = places.get(partition);
            if place.owned && place.shard == shard {
                applied.insert(partition, store.log_applied(partition)?);
            }
        }
        // Caught up on before anything else: the log may hold records an
        // earlier run appended and never wrote here, and other writers'.
        let stale = applied.keys().copied().collect();
        Ok(LogWriter {
            config: config.clone(),
            writer: Writer { node, epoch },
            shard,
            partitions: places.len(),
            batches: 0,
            applied,
            stale,
        })
    }

    /// Begins appending a batch [`ShardState::begin_batch`] took.
    ///
    /// [`ShardState::begin_batch`]: super::state::ShardState::begin_batch
    pub fn begin(
        &mut self,
        in_flight: &InFlight,
        mutations: &[Mutation],
    ) -> Result<LogBatch, StorageError> {
        let (shares, placement) = self.plan(in_flight, mutations)?;
        Ok(LogBatch {
            shares,
            placement,
            tag: self.next_tag(),
            asked: Vec::new(),
        })
    }

    /// A barrier: an empty record on every partition this shard owns. Once
    /// it is stored after everything this shard has applied, no append an
    /// earlier run left unanswered can land any more (its fence no longer
    /// holds), so what the store holds then is final. Appended at start.
    pub fn barrier(&mut self) -> LogBatch {
        let owned: Vec<u32> = self.applied.keys().copied().collect();
        self.barrier_of(&owned)
    }

    /// A barrier on `partitions` (owned by this shard) only: appended by a
    /// takeover once caught up, before the partition takes writes here.
    pub fn barrier_of(&mut self, partitions: &[u32]) -> LogBatch {
        let writer = self.writer;
        let shares = partitions
            .iter()
            .filter(|partition| self.applied.contains_key(partition))
            .map(|partition| PartitionAppend {
                partition: *partition,
                records: vec![Bytes::from(
                    LogRecord {
                        partition: *partition,
                        writer,
                        mutations: Vec::new(),
                    }
                    .encode(),
                )],
                stored: Vec::new(),
                failed: None,
            })
            .collect();
        LogBatch {
            shares,
            placement: Vec::new(),
            tag: self.next_tag(),
            asked: Vec::new(),
        }
    }

    /// The writer tag of the next batch (see
    /// [`crate::cluster::log::append_id`]): this node, run, shard and batch.
    fn next_tag(&mut self) -> String {
        self.batches += 1;
        format!(
            "n{}.e{}.s{}.b{}",
            self.writer.node, self.writer.epoch, self.shard.0, self.batches
        )
    }

    /// The appends of the next round: every record not stored yet of every
    /// partition not failed, each partition's after its last stored one.
    /// Empty when the batch is settled.
    pub fn requests(&self, batch: &mut LogBatch) -> Vec<AppendRequest> {
        let mut requests = Vec::new();
        batch.asked.clear();
        for (i, share) in batch.shares.iter().enumerate() {
            if share.failed.is_some() {
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
                    writer: batch.tag.clone(),
                    payload: payload.clone(),
                });
                batch.asked.push(i);
            }
        }
        requests
    }

    /// Takes the answers to the last round's requests, in order.
    pub fn answers(
        &self,
        batch: &mut LogBatch,
        results: Vec<Result<Appended, AppendError>>,
    ) -> Round {
        let mut unknown = None;
        for (i, result) in batch.asked.iter().zip(results) {
            let share = &mut batch.shares[*i];
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
        match unknown {
            Some(why) => Round::Unknown(why),
            None => Round::Settled,
        }
    }

    /// Fails what is left of `batch` (the log cannot be reached).
    pub fn abandon(&self, batch: &mut LogBatch, why: &str) {
        for share in &mut batch.shares {
            share
                .failed
                .get_or_insert(AppendError::Refused(why.to_string()));
        }
    }

    /// `batch` is stored whole and applied to the store: the positions
    /// move.
    pub fn applied(&mut self, batch: &LogBatch) {
        for share in &batch.shares {
            if let Some(seq) = share.stored.last() {
                self.applied.insert(share.partition, *seq);
            }
        }
    }

    /// `batch` was not applied to the store (not stored whole, or the
    /// local write failed): the log may hold records of it, and of other
    /// writers, that the store does not. Caught up on before the next
    /// append.
    pub fn not_applied(&mut self, batch: &LogBatch) {
        self.stale.extend(batch.partitions());
    }

    /// `batch` was stored in part and its stored records applied to the
    /// store: their positions move, and the partitions whose records were
    /// not stored are caught up on before the next append.
    pub fn applied_in_part(&mut self, batch: &LogBatch) {
        self.applied(batch);
        for share in &batch.shares {
            if share.failed.is_some() || share.stored.len() < share.records.len() {
                self.stale.insert(share.partition);
            }
        }
    }

    /// Partitions to catch up on, with the position to read after.
    pub fn stale(&self) -> Vec<(u32, u64)> {
        self.stale
            .iter()
            .map(|partition| (*partition, self.applied[partition]))
            .collect()
    }

    /// Records of `partition` through `last` are applied to the store;
    /// `complete`: the log held no more.
    pub fn caught_up(&mut self, partition: u32, last: u64, complete: bool) {
        self.applied.insert(partition, last);
        if complete {
            self.stale.remove(&partition);
        }
    }

    /// This shard takes over `partition` (it followed it up to `applied`,
    /// the position its store holds): caught up on, then fenced by a
    /// [`LogWriter::barrier_of`], before it takes writes here. Called
    /// between batches.
    pub fn acquire(&mut self, partition: u32, applied: u64) {
        self.applied.insert(partition, applied);
        self.stale.insert(partition);
    }

    /// This shard no longer owns `partition` (another node took it over):
    /// nothing more is appended to it. Called between batches.
    pub fn release(&mut self, partition: u32) {
        self.applied.remove(&partition);
        self.stale.remove(&partition);
    }

    /// Whether this shard owns `partition`.
    pub fn owns(&self, partition: u32) -> bool {
        self.applied.contains_key(&partition)
    }

    /// Whether a record written by `writer` is this node's.
    pub fn is_own(&self, writer: &Writer) -> bool {
        writer.node == self.writer.node
    }

    /// The subject of `partition`'s log.
    pub fn subject(&self, partition: u32) -> String {
        self.config.subject(partition)
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Splits a batch into records: per partition, in batch order, each
    /// record whole pieces of work (a message with its conversation rows)
    /// within `cluster.record_max_bytes`, each ending with the ids issued.
    /// A piece of work too big for any record is an error.
    fn plan(
        &self,
        in_flight: &InFlight,
        mutations: &[Mutation],
    ) -> Result<(Vec<PartitionAppend>, Placement), StorageError> {
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
        let mut placed: Vec<(u32, usize)> = Vec::with_capacity(in_flight.pending.len());
        for pending in &in_flight.pending {
            let key = pending.channel();
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
            placed.push((partition, records.len() - 1));
        }
        let index: BTreeMap<u32, usize> = shares
            .keys()
            .enumerate()
            .map(|(i, partition)| (*partition, i))
            .collect();
        let placement = placed
            .into_iter()
            .map(|(partition, record)| (index[&partition], record))
            .collect();
        let shares = shares
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
            .collect();
        Ok((shares, placement))
    }
}

/// The shard's side of the log with the NATS bridge it runs over.
pub struct ShardLog {
    bridge: Arc<LogBridge>,
    writer: LogWriter,
    /// Records applied from the log by catching up (not by this shard's
    /// own commits).
    caught_up_records: u64,
}

impl ShardLog {
    /// See [`LogWriter::open`].
    pub fn open(
        setup: &ShardLogSetup,
        config: &ClusterConfig,
        shard: ShardId,
        epoch: u64,
        store: &mut dyn ShardStore,
    ) -> Result<ShardLog, StorageError> {
        Ok(ShardLog {
            bridge: Arc::clone(&setup.bridge),
            writer: LogWriter::open(config, &setup.places, setup.node, shard, epoch, store)?,
            caught_up_records: 0,
        })
    }

    /// Appends every record of `batch`, retrying what is not settled until
    /// it is (or the shard shuts down). True when all are stored.
    async fn append(&mut self, runtime: &Runtime, batch: &mut LogBatch) -> bool {
        let started = Instant::now();
        let mut pause = RETRY_PAUSE_FIRST;
        let config = self.writer.config();
        let unavailable_after = Duration::from_millis(config.unavailable_after_ms);
        let pause_max = Duration::from_millis(config.retry_pause_max_ms);
        let mut unavailable = false;
        loop {
            let requests = self.writer.requests(batch);
            if requests.is_empty() {
                break;
            }
            let round = match self.bridge.append_all(requests).await {
                Ok(results) => self.writer.answers(batch, results),
                Err(error) => {
                    tracing::error!(%error, "nothing more can be committed");
                    self.writer.abandon(batch, &error.to_string());
                    break;
                }
            };
            let Round::Unknown(why) = round else {
                continue;
            };
            if runtime.shutting_down.get() {
                // Given up only at shutdown: the next start applies
                // whatever of it the log holds.
                tracing::warn!(%why, "shutting down with a commit the log has not settled");
                self.writer.abandon(batch, "the shard is shutting down");
                break;
            }
            if !unavailable && started.elapsed() >= unavailable_after {
                unavailable = true;
                tracing::warn!(%why, waited_ms = started.elapsed().as_millis() as u64, "the log is not answering; refusing new sends until it does");
                runtime.state.borrow_mut().set_log_unavailable(true);
            }
            glommio::timer::sleep(pause).await;
            pause = (pause * 2).min(pause_max);
        }
        if unavailable {
            tracing::info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "the log answers again"
            );
            runtime.state.borrow_mut().set_log_unavailable(false);
        }
        batch.stored_whole()
    }

    /// Writes a batch the log has to the store, retrying until it is
    /// written (new sends are refused meanwhile, once the wait passes
    /// `cluster.unavailable_after_ms`). False only when the shard shuts
    /// down first.
    async fn write_local(&self, runtime: &Runtime, mutations: &[Mutation], offload: bool) -> bool {
        let started = Instant::now();
        let config = self.writer.config();
        let unavailable_after = Duration::from_millis(config.unavailable_after_ms);
        let pause_max = Duration::from_millis(config.retry_pause_max_ms);
        let mut pause = RETRY_PAUSE_FIRST;
        let mut unavailable = false;
        loop {
            let prepared = runtime.state.borrow_mut().prepare_write(mutations);
            let result = match prepared {
                Ok(job) if offload => glommio::executor().spawn_blocking(job).await,
                Ok(job) => job(),
                Err(error) => Err(error),
            };
            let Err(error) = result else {
                if unavailable {
                    runtime.state.borrow_mut().set_log_unavailable(false);
                }
                return true;
            };
            tracing::warn!(%error, "writing a commit the log has failed; retrying");
            if runtime.shutting_down.get() {
                return false;
            }
            if !unavailable && started.elapsed() >= unavailable_after {
                unavailable = true;
                runtime.state.borrow_mut().set_log_unavailable(true);
            }
            glommio::timer::sleep(pause).await;
            pause = (pause * 2).min(pause_max);
        }
    }

    /// Before the shard serves: applies what the log holds beyond its
    /// store, then appends a barrier (see [`LogWriter::barrier`]) so that
    /// is final, retrying until the log answers; ids continue above what
    /// the records applied recorded.
    pub(super) async fn start(&mut self, runtime: &Runtime) {
        let started = Instant::now();
        let mut pause = RETRY_PAUSE_FIRST;
        let pause_max = Duration::from_millis(self.writer.config().retry_pause_max_ms);
        loop {
            if !self.catch_up_stale(runtime).await {
                glommio::timer::sleep(pause).await;
                pause = (pause * 2).min(pause_max);
                continue;
            }
            let mut barrier = self.writer.barrier();
            let whole = self.append(runtime, &mut barrier).await;
            let positions: Vec<Mutation> = barrier.positions().collect();
            if !positions.is_empty() && !self.write_local(runtime, &positions, false).await {
                return;
            }
            self.writer.applied_in_part(&barrier);
            if whole || runtime.shutting_down.get() {
                break;
            }
        }
        tracing::info!(
            shard = self.writer.shard.0,
            records = self.caught_up_records,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "caught up on the log"
        );
        let mut state = runtime.state.borrow_mut();
        if let Err(error) = state.continue_ids_above_store() {
            tracing::warn!(%error, "reading the ids the log recorded failed");
        }
        // Channels read while events were made are read again.
        let now = runtime.now();
        state.log_caught_up(now);
    }

    /// Applies what the log holds beyond this shard's position on every
    /// stale partition. True when all are caught up; then, if anything was
    /// applied, what was queued meanwhile is refused and channels are read
    /// again.
    async fn catch_up_stale(&mut self, runtime: &Runtime) -> bool {
        let mut applied_any = false;
        let mut all = true;
        let mut records = 0;
        for (partition, from) in self.writer.stale() {
            let mut last = from;
            let subject = self.writer.subject(partition);
            let writer = &self.writer;
            let result = catch_up(
                &self.bridge,
                &subject,
                from,
                writer.config().read_batch_records,
                |seq, record| {
                    let own = writer.is_own(&record.writer);
                    if !own {
                        tracing::warn!(
                            partition,
                            node = record.writer.node,
                            "applying a record another node wrote to a partition this node owns"
                        );
                    }
                    // Another node's record is new to this node: applied
                    // as a follower applies it (this node's versions, pushed
                    // to its connections).
                    let now = runtime.now();
                    let mut state = runtime.state.borrow_mut();
                    match own {
                        true => state.apply_log(partition, seq, record, now)?,
                        false => state.follow_log(partition, seq, record, false, now)?,
                    }
                    last = seq;
                    records += 1;
                    Ok(())
                },
            )
            .await;
            applied_any |= last != from;
            if let Err(error) = &result {
                tracing::warn!(partition, %error, "catching up on the log failed; retrying");
                all = false;
            }
            self.writer.caught_up(partition, last, result.is_ok());
        }
        self.caught_up_records += records;
        if applied_any {
            let now = runtime.now();
            runtime.state.borrow_mut().log_caught_up(now);
        }
        all
    }
}

/// The commit loop of a cluster node's shard: like the single node's
/// group commit, with the batch appended to the log before it is written
/// to the store and acknowledged. What the log stored is committed: it is
/// written here however long that takes, and answered as committed; only
/// what the log did not store is refused.
pub(super) async fn commit_loop(runtime: Rc<Runtime>, mut log: ShardLog, offload: bool) {
    let mut pause = RETRY_PAUSE_FIRST;
    let pause_max = Duration::from_millis(log.writer.config().retry_pause_max_ms);
    loop {
        runtime.signals.commit.wait().await;
        loop {
            if !log.writer.stale().is_empty() {
                if !log.catch_up_stale(&runtime).await {
                    if runtime.shutting_down.get() {
                        return;
                    }
                    runtime.state.borrow_mut().set_log_unavailable(true);
                    glommio::timer::sleep(pause).await;
                    pause = (pause * 2).min(pause_max);
                    continue;
                }
                pause = RETRY_PAUSE_FIRST;
                runtime.state.borrow_mut().set_log_unavailable(false);
            }
            let now = runtime.now();
            let begun = runtime.state.borrow_mut().begin_batch(now);
            let Some((mut mutations, mut in_flight)) = begun else {
                break;
            };
            runtime.committing.set(true);
            let started = Instant::now();
            let mut batch = match log.writer.begin(&in_flight, &mutations) {
                Ok(batch) => batch,
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
            let whole = log.append(&runtime, &mut batch).await;
            let mut unstored = None;
            if whole {
                mutations.extend(batch.positions());
            } else {
                let now = runtime.now();
                let (part, part_in_flight, refused) =
                    runtime
                        .state
                        .borrow_mut()
                        .split_stored(in_flight, &batch.stored_work(), now);
                mutations = part;
                mutations.extend(batch.positions());
                in_flight = part_in_flight;
                unstored = Some(refused);
            }
            let written = log.write_local(&runtime, &mutations, offload).await;
            let took = started.elapsed().as_micros() as u64;
            runtime.committing.set(false);
            match (written, whole) {
                (true, true) => log.writer.applied(&batch),
                (true, false) => log.writer.applied_in_part(&batch),
                // Shutting down: the next start applies it from the log.
                (false, _) => log.writer.not_applied(&batch),
            }
            let now = runtime.now();
            {
                let mut state = runtime.state.borrow_mut();
                state.stats.commit_latency.record(took);
                let result = match written {
                    true => Ok(()),
                    false => Err(StorageError::Io("shutting down".into())),
                };
                state.finish_commit(in_flight, result, now);
            }
            if let Some(refused) = unstored {
                // Take in what the log holds before the refusals go out, so
                // a client's retry meets the channels as the log has them.
                if !runtime.shutting_down.get() {
                    log.catch_up_stale(&runtime).await;
                }
                let error = StorageError::Io(format!(
                    "not stored in the log: {}",
                    batch
                        .failure()
                        .map_or("not settled".to_string(), |e| e.to_string())
                ));
                let now = runtime.now();
                runtime
                    .state
                    .borrow_mut()
                    .refuse_unstored(refused, &error, now);
            }
            if runtime.shutting_down.get() && !written {
                return;
            }
        }
    }
}
