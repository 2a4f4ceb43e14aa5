//! The simulated gateway: the real `ShardState`s of one process on a real
//! store, with everything the runtime does by itself (carrying inbox
//! batches, running commits, flushing positions, sweeping, retrying) turned
//! into steps the simulation chooses. Inboxes deliver FIFO per pair of
//! shards; a commit's durable write and the acknowledgements after it are
//! separate steps, so a crash can fall between them.
//!
//! A `World` is one process. In runs of several cluster nodes each node is
//! a `World` of its own, on its own store, and they share one model log:
//! each owns some partitions (it appends them) and follows the rest
//! (applies what the log holds of them, a record per step).

use super::log::ModelLog;
use super::rng::Rng;
use ruyi::auth::Authenticator;
use ruyi::channel::ChannelKey;
use ruyi::cluster::record::LogRecord;
use ruyi::config::{AuthConfig, AuthMode, Config, Limits};
use ruyi::ids::{Millis, ShardId};
use ruyi::shard::log::{LogBatch, LogWriter, Round};
use ruyi::shard::message::ShardMsg;
use ruyi::shard::state::{InFlight, Now, ShardState, Signals, Unstored};
use ruyi::storage::{
    CommitJob, MemoryStorage, RocksStorage, ShardStore, Storage, StorageError, SyncPolicy,
};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

/// Which store the shards run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Rocks,
    Memory,
}

/// Where one shard's commit pipeline stands.
pub enum Commit {
    Idle,
    /// Being appended to the log (`[cluster]` runs): the batch, its
    /// storage mutations, what waits for it, and the rounds that found its
    /// fate unknown.
    Appending(LogBatch, Vec<ruyi::storage::Mutation>, InFlight, u32),
    /// Stored in the log (whole or in part): being written to the store,
    /// a try per step until it is; the failed tries so far.
    Writing(Vec<ruyi::storage::Mutation>, InFlight, u32),
    /// Prepared: the write has not run.
    Begun(CommitJob, InFlight),
    /// The write ran (or was failed); the shard has not heard yet.
    Written(Result<(), StorageError>, InFlight),
}

pub struct World {
    pub kind: StoreKind,
    pub shards: Vec<ShardState>,
    pub commits: Vec<Commit>,
    /// Position writes handed off by the retry tick and not run yet.
    pub position_jobs: Vec<Vec<CommitJob>>,
    /// `inboxes[from][to]`: batches in flight, oldest first.
    pub inboxes: Vec<Vec<VecDeque<Vec<ShardMsg>>>>,
    pub storage: Arc<dyn Storage>,
    /// A handle for the checks' reads.
    pub reader: Box<dyn ShardStore>,
    memory: Option<MemoryStorage>,
    dir: Option<tempfile::TempDir>,
    pub config: Config,
    pub now: Now,
    /// Incremented by every crash: connections of an earlier generation
    /// are gone.
    pub generation: u64,
    /// The webhook counters of the running process, and the events earlier
    /// processes dropped (outbox full).
    webhooks: Arc<ruyi::webhook::WebhookShared>,
    webhooks_dropped_before: u64,
    /// `[cluster]` runs: the log, and each shard's side of it.
    pub log: Option<LogWorld>,
}

/// How a `[cluster]` node's process is set up: the log it shares with
/// the other nodes, and which of them it is.
pub struct LogSetup {
    /// Percent chance of a fault per append.
    pub faulty: u64,
    /// This node's index (its node id is one more).
    pub node: usize,
    /// How many nodes share the log (partitions are dealt over them).
    pub nodes: usize,
    pub model: Rc<RefCell<ModelLog>>,
    /// Which node holds each partition's claim (the lease service's
    /// answer): a process starts owning the partitions it holds.
    pub claims: Rc<RefCell<Vec<usize>>>,
}

/// Partitions of the simulated cluster.
pub const PARTITIONS: u32 = 8;

/// The log of a `[cluster]` run and each shard's writer.
pub struct LogWorld {
    pub model: Rc<RefCell<ModelLog>>,
    /// This node's id (1-based).
    pub node_id: u32,
    /// Whether other nodes share the log (message ids then carry the
    /// node, as on a real cluster node).
    pub several: bool,
    pub config: ruyi::config::ClusterConfig,
    /// Each partition's place in the running process (whether it owns
    /// it changes with takeovers).
    pub places: Arc<ruyi::key::Places>,
    /// The partition map's places: which shard each partition lives on.
    map_places: Arc<ruyi::key::Places>,
    pub claims: Rc<RefCell<Vec<usize>>>,
    /// Per shard: partitions it is taking over (caught up on, then fenced
    /// by a barrier, before they take writes).
    pub acquiring: Vec<Vec<u32>>,
    pub writers: Vec<LogWriter>,
    /// Each shard's batch stored in the log and being written locally.
    pub written: Vec<Option<LogBatch>>,
    /// The work of that batch the log did not store, refused once the
    /// rest is finished.
    pub unstored: Vec<Option<Unstored>>,
    /// Percent chance of a fault per append.
    pub faulty: u64,
}

/// Rounds of unknown answers after which a shard refuses new sends.
const UNAVAILABLE_AFTER_ROUNDS: u32 = 3;

impl World {
    /// `log`: a `[cluster]` node, committing through the model log.
    pub fn new(
        kind: StoreKind,
        shards: u16,
        config: Config,
        now: Now,
        log: Option<LogSetup>,
    ) -> World {
        let (storage, memory, dir): (Arc<dyn Storage>, _, _) = match kind {
            StoreKind::Rocks => {
                let dir = tempfile::tempdir().expect("temporary directory");
                (Arc::new(open_rocks(dir.path(), &config)), None, Some(dir))
            }
            StoreKind::Memory => {
                let memory = MemoryStorage::default();
                (
                    Arc::new(memory.clone()) as Arc<dyn Storage>,
                    Some(memory),
                    None,
                )
            }
        };
        let reader = storage.open_shard(ShardId(0)).expect("reader");
        let mut world = World {
            kind,
            shards: Vec::new(),
            commits: Vec::new(),
            position_jobs: Vec::new(),
            inboxes: Vec::new(),
            storage,
            reader,
            memory,
            dir,
            config,
            now,
            generation: 0,
            webhooks: Arc::new(ruyi::webhook::WebhookShared::default()),
            webhooks_dropped_before: 0,
            log: log.map(|setup| {
                let config = ruyi::config::ClusterConfig {
                    nats_urls: vec!["nats://simulation.invalid".into()],
                    partitions: PARTITIONS,
                    node_id: setup.node as u32 + 1,
                    ..Default::default()
                };
                let nodes: Vec<_> = (1..=setup.nodes as u32)
                    .map(|node| ruyi::cluster::partition::NodeSpec { node, shards })
                    .collect();
                let map = ruyi::cluster::partition::PartitionMap::new(config.partitions, &nodes)
                    .expect("a partition map");
                LogWorld {
                    model: setup.model,
                    node_id: config.node_id,
                    several: setup.nodes > 1,
                    places: map.places(config.node_id, shards),
                    map_places: map.places(config.node_id, shards),
                    claims: setup.claims,
                    acquiring: Vec::new(),
                    config,
                    writers: Vec::new(),
                    written: Vec::new(),
                    unstored: Vec::new(),
                    faulty: setup.faulty,
                }
            }),
        };
        world.start(shards);
        world
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Starts a fresh process on the store: new shard states, empty
    /// inboxes, nothing in flight.
    fn start(&mut self, shards: u16) {
        // A process owns the partitions whose claims its node holds.
        if let Some(log) = &mut self.log {
            let claims = log.claims.borrow();
            let places: Vec<ruyi::key::Place> = (0..log.config.partitions)
                .map(|p| ruyi::key::Place {
                    shard: log.map_places.get(p).shard,
                    owned: claims[p as usize] + 1 == log.node_id as usize,
                })
                .collect();
            drop(claims);
            log.places = ruyi::key::Places::new(&places);
            log.acquiring = (0..shards).map(|_| Vec::new()).collect();
        }
        let limits: Limits = self.config.limits.clone();
        let run = ruyi::shard::state::first_id_of_run(&mut *self.reader, self.now.unix_ms)
            .expect("read the ids issued");
        let auth = AuthConfig {
            mode: AuthMode::Off,
            ..AuthConfig::default()
        };
        let versions = ruyi::shard::versions::VersionFrontier::new(shards);
        self.webhooks_dropped_before = self.webhooks_dropped();
        self.webhooks = Arc::new(ruyi::webhook::WebhookShared::default());
        self.shards = (0..shards)
            .map(|id| {
                let store = self.storage.open_shard(ShardId(id)).expect("open shard");
                let mut state = ShardState::new(
                    ShardId(id),
                    shards,
                    limits.clone(),
                    self.config.storage.idempotency_ttl_s * 1000,
                    Authenticator::new(&auth),
                    store,
                    Rc::new(Signals::new(shards)),
                );
                state.set_retry_policy(self.config.delivery.retry_policy(), self.now);
                state.start_run(run);
                state.share_versions(std::sync::Arc::clone(&versions));
                state.set_allowlist_for_person(self.config.policy.allowlist_for_person);
                state.set_webhooks(ruyi::webhook::WebhookWriter::new(
                    &webhook_config(),
                    Arc::clone(&self.webhooks),
                ));
                if let Some(log) = &self.log {
                    state.set_routing(ruyi::key::Routing::Partitions {
                        places: Arc::clone(&log.places),
                    });
                    if log.several {
                        state
                            .set_id_tag(ruyi::cluster::partition::id_tag(log.node_id, ShardId(id)));
                    }
                }
                state
            })
            .collect();
        if let Some(log) = &mut self.log {
            log.writers = (0..shards)
                .map(|id| {
                    let mut store = self.storage.open_shard(ShardId(id)).expect("open shard");
                    LogWriter::open(
                        &log.config,
                        &log.places,
                        log.node_id,
                        ShardId(id),
                        run.0,
                        &mut *store,
                    )
                    .expect("log positions")
                })
                .collect();
            log.written = (0..shards).map(|_| None).collect();
            log.unstored = (0..shards).map(|_| None).collect();
        }
        // A cluster node's shards apply what the log holds beyond their
        // stores before they serve.
        if self.log.is_some() {
            for i in 0..usize::from(shards) {
                self.start_on_log(i);
                self.shards[i]
                    .continue_ids_above_store()
                    .expect("read the ids issued");
                let now = self.now;
                self.shards[i].log_caught_up(now);
            }
        }
        let n = usize::from(shards);
        self.commits = (0..n).map(|_| Commit::Idle).collect();
        self.position_jobs = (0..n).map(|_| Vec::new()).collect();
        self.inboxes = (0..n)
            .map(|_| (0..n).map(|_| VecDeque::new()).collect())
            .collect();
    }

    /// kill -9: every shard's memory, inbox and unfinished job is gone;
    /// what reached the store stays. With `write_begun`, commits that were
    /// prepared are written first (the crash falls between a batch's write
    /// and its acknowledgements).
    pub fn crash(&mut self, write_begun: bool) {
        // A batch being appended is gone with the process; what of it the
        // log stored stays there.
        for (i, commit) in std::mem::take(&mut self.commits).into_iter().enumerate() {
            match (commit, write_begun) {
                (Commit::Begun(job, _), true) => {
                    let _ = job();
                }
                (Commit::Writing(mutations, ..), true) => {
                    let _ = self.shards[i]
                        .prepare_write(&mutations)
                        .and_then(|job| job());
                }
                _ => {}
            }
        }
        self.position_jobs.clear();
        let shards = self.shards.len() as u16;
        self.shards.clear();
        self.inboxes.clear();
        if self.kind == StoreKind::Rocks {
            // Close the database before opening it again.
            self.reader = Box::new(ruyi::storage::ClosedStore);
            self.storage = Arc::new(MemoryStorage::default());
            let dir = self.dir.as_ref().expect("rocks has a directory").path();
            self.storage = Arc::new(open_rocks(dir, &self.config));
        } else {
            // The same data, as a new process of an in-memory store would
            // never see it; here it stands for what a durable store keeps.
            self.storage = Arc::new(self.memory.clone().expect("memory store"));
        }
        self.reader = self.storage.open_shard(ShardId(0)).expect("reader");
        self.generation += 1;
        self.start(shards);
    }

    /// Webhook events dropped because the outbox was full, in every process
    /// so far.
    pub fn webhooks_dropped(&self) -> u64 {
        self.webhooks_dropped_before
            + self
                .webhooks
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `uid`'s logged-in connections on every shard: how many, and how many
    /// are active.
    pub fn user_connections(&self, uid: &str) -> (usize, usize) {
        let uid = ruyi::ids::Uid::new(uid);
        self.shards.iter().fold((0, 0), |(held, active), shard| {
            let (h, a) = shard.user_connections(&uid);
            (held + h, active + a)
        })
    }

    /// Whether this node writes `key` (a cluster node forwards the writes
    /// of the partitions other nodes own).
    pub fn owns(&self, key: &ChannelKey) -> bool {
        self.routing().is_none_or(|r| r.serves(key))
    }

    /// Whether this node's lease has lapsed (it answers nothing about its
    /// partitions until it renews).
    pub fn lapsed(&self) -> bool {
        self.log.as_ref().is_some_and(|log| !log.places.serving())
    }

    /// This node's lease lapses: from now on its shards answer nothing
    /// about the partitions they own (retryable refusals only), and other
    /// nodes may take them over.
    pub fn lapse(&mut self) {
        if let Some(log) = &self.log {
            log.places.set_serving(false);
        }
    }

    /// This node renews its lease, as the lease service does: every shard
    /// lets go of every partition it owns or is taking over (between
    /// batches), then the node serves again and takes back, through
    /// catch-up and barrier, the partitions whose claims it still holds.
    /// False (nothing changed) while a shard's batch is under way.
    pub fn renew(&mut self) -> bool {
        let Some(log) = &self.log else {
            return true;
        };
        if self.commits.iter().any(|c| !matches!(c, Commit::Idle)) {
            return false;
        }
        let owned: Vec<(usize, u32)> = (0..log.config.partitions)
            .filter_map(|p| {
                let i = log.places.get(p).shard.index();
                log.writers[i].owns(p).then_some((i, p))
            })
            .collect();
        for (i, partition) in owned {
            self.release(i, partition);
        }
        let log = self.log.as_ref().expect("a log");
        log.places.set_serving(true);
        let held: Vec<u32> = {
            let claims = log.claims.borrow();
            (0..log.config.partitions)
                .filter(|p| claims[*p as usize] + 1 == log.node_id as usize)
                .collect()
        };
        for partition in held {
            self.acquire(partition);
        }
        true
    }

    fn routing(&self) -> Option<ruyi::key::Routing> {
        self.log.as_ref().map(|log| ruyi::key::Routing::Partitions {
            places: Arc::clone(&log.places),
        })
    }

    /// Where the log of `key`'s partition stands now (0 without a log).
    pub fn log_position_of(&self, key: &ChannelKey) -> u64 {
        self.log.as_ref().map_or(0, |log| {
            let partition = ruyi::cluster::partition::partition_of(key, log.config.partitions);
            log.model.borrow().last_of(&log.config.subject(partition))
        })
    }

    /// How far this node has applied the log of `key`'s partition (0
    /// without a log).
    pub fn applied_of(&mut self, key: &ChannelKey) -> u64 {
        let Some(log) = &self.log else {
            return 0;
        };
        let partition = ruyi::cluster::partition::partition_of(key, log.config.partitions);
        let shard = self.owner_of(key);
        self.shards[shard]
            .log_applied(partition)
            .expect("read a log position")
    }

    /// The shard owning `key` (on a cluster node: writing it, or following
    /// it when another node owns it).
    pub fn owner_of(&self, key: &ChannelKey) -> usize {
        match &self.log {
            None => key.shard(self.shards.len() as u16).index(),
            Some(log) => ruyi::key::Routing::Partitions {
                places: Arc::clone(&log.places),
            }
            .shard_of(key)
            .index(),
        }
    }

    pub fn advance(&mut self, by_ms: u64) {
        self.now.monotonic = Millis(self.now.monotonic.0 + by_ms);
        self.now.micros += by_ms * 1000;
        self.now.unix_ms += by_ms;
    }

    /// Moves every batch each shard queued for another into the inbox
    /// between them.
    pub fn collect_outgoing(&mut self) {
        let n = self.shards.len();
        for from in 0..n {
            for to in 0..n {
                if from == to {
                    continue;
                }
                let batch = self.shards[from].take_outgoing(ShardId(to as u16), 64);
                if !batch.is_empty() {
                    self.inboxes[from][to].push_back(batch);
                }
            }
        }
    }

    /// Inbox pairs with batches waiting.
    pub fn busy_inboxes(&self) -> Vec<(usize, usize)> {
        let mut busy = Vec::new();
        for (from, row) in self.inboxes.iter().enumerate() {
            for (to, queue) in row.iter().enumerate() {
                if !queue.is_empty() {
                    busy.push((from, to));
                }
            }
        }
        busy
    }

    /// Delivers the oldest batch from `from` to `to`.
    pub fn deliver(&mut self, from: usize, to: usize) {
        if let Some(batch) = self.inboxes[from][to].pop_front() {
            let now = self.now;
            for message in batch {
                self.shards[to].on_remote(message, now);
            }
        }
    }

    /// Advances shard `i`'s commit pipeline by one stage; `fail` makes a
    /// prepared write fail (nothing of it is stored). In `[cluster]` runs
    /// `draw` seeds the log's faults of the step.
    pub fn commit_step(&mut self, i: usize, fail: bool, draw: u64) -> &'static str {
        if self.log.is_some() {
            return self.log_commit_step(i, fail, draw);
        }
        let now = self.now;
        match std::mem::replace(&mut self.commits[i], Commit::Idle) {
            Commit::Idle => match self.shards[i].begin_commit(now) {
                Some((job, in_flight)) => {
                    self.commits[i] = Commit::Begun(job, in_flight);
                    "begin"
                }
                None => "idle",
            },
            Commit::Appending(..) | Commit::Writing(..) => unreachable!("no log in this run"),
            Commit::Begun(job, in_flight) => {
                let result = if fail {
                    Err(StorageError::Io("simulated write failure".into()))
                } else {
                    job()
                };
                self.commits[i] = Commit::Written(result, in_flight);
                if fail {
                    "write failed"
                } else {
                    "write"
                }
            }
            Commit::Written(result, in_flight) => {
                self.shards[i].finish_commit(in_flight, result, now);
                "finish"
            }
        }
    }

    /// A `[cluster]` shard's commit stage: catch up on the log, begin a
    /// batch, append it (a round at a time), write it, finish it. The log
    /// may first land a proposed append or take another writer's record.
    fn log_commit_step(&mut self, i: usize, fail: bool, draw: u64) -> &'static str {
        let now = self.now;
        let mut rng = Rng::new(draw);
        let log = self.log.as_mut().expect("a log");
        if rng.chance(10) && log.model.borrow_mut().settle_one_proposed(&mut rng) {
            return "log: a proposed append settled";
        }
        if rng.chance(2) {
            let partition = rng.below(u64::from(log.config.partitions)) as u32;
            let subject = log.config.subject(partition);
            log.model.borrow_mut().foreign_append(&subject, partition);
            return "log: another writer appended";
        }
        match std::mem::replace(&mut self.commits[i], Commit::Idle) {
            Commit::Idle => {
                if !log.writers[i].stale().is_empty() {
                    self.catch_up(i);
                    return "catch up";
                }
                if let Some(what) = self.acquire_step(i, rng.next_u64()) {
                    return what;
                }
                let Some((mutations, in_flight)) = self.shards[i].begin_batch(now) else {
                    return "idle";
                };
                let log = self.log.as_mut().expect("a log");
                match log.writers[i].begin(&in_flight, &mutations) {
                    Ok(batch) => {
                        self.commits[i] = Commit::Appending(batch, mutations, in_flight, 0);
                        "begin"
                    }
                    Err(error) => {
                        self.shards[i].finish_commit(in_flight, Err(error), now);
                        "begin refused"
                    }
                }
            }
            Commit::Appending(mut batch, mut mutations, in_flight, rounds) => {
                let requests = log.writers[i].requests(&mut batch);
                let faulty = log.faulty;
                let results = log
                    .model
                    .borrow_mut()
                    .append_all(requests, faulty, &mut rng);
                match log.writers[i].answers(&mut batch, results) {
                    Round::Unknown(_) => {
                        if rounds + 1 >= UNAVAILABLE_AFTER_ROUNDS {
                            self.shards[i].set_log_unavailable(true);
                        }
                        self.commits[i] =
                            Commit::Appending(batch, mutations, in_flight, rounds + 1);
                        "append unknown"
                    }
                    Round::Settled => {
                        self.shards[i].set_log_unavailable(false);
                        if batch.stored_whole() {
                            mutations.extend(batch.positions());
                        } else {
                            let stored = batch.stored_work();
                            let (part, part_in_flight, refused) =
                                self.shards[i].split_stored(in_flight, &stored, now);
                            mutations = part;
                            mutations.extend(batch.positions());
                            log.unstored[i] = Some(refused);
                            log.written[i] = Some(batch);
                            self.commits[i] = Commit::Writing(mutations, part_in_flight, 0);
                            return "appended in part";
                        }
                        log.written[i] = Some(batch);
                        self.commits[i] = Commit::Writing(mutations, in_flight, 0);
                        "appended"
                    }
                }
            }
            Commit::Writing(mutations, in_flight, tries) => {
                let result = if fail {
                    Err(StorageError::Io("simulated write failure".into()))
                } else {
                    self.shards[i]
                        .prepare_write(&mutations)
                        .and_then(|job| job())
                };
                match result {
                    Ok(()) => {
                        self.commits[i] = Commit::Written(Ok(()), in_flight);
                        "write"
                    }
                    Err(_) => {
                        // What the log has is committed: written, however
                        // many tries it takes.
                        if tries + 1 >= UNAVAILABLE_AFTER_ROUNDS {
                            self.shards[i].set_log_unavailable(true);
                        }
                        self.commits[i] = Commit::Writing(mutations, in_flight, tries + 1);
                        "write failed"
                    }
                }
            }
            Commit::Begun(..) => unreachable!("a log run writes in Writing"),
            Commit::Written(result, in_flight) => {
                self.shards[i].set_log_unavailable(false);
                let unstored = log.unstored[i].take();
                if let Some(batch) = log.written[i].take() {
                    match unstored {
                        None => log.writers[i].applied(&batch),
                        Some(_) => log.writers[i].applied_in_part(&batch),
                    }
                }
                self.shards[i].finish_commit(in_flight, result, now);
                if let Some(refused) = unstored {
                    self.catch_up(i);
                    let error = StorageError::Io("not stored in the log".into());
                    self.shards[i].refuse_unstored(refused, &error, now);
                }
                "finish"
            }
        }
    }

    /// Shard `i` catches up on the log and appends its barrier (until the
    /// log takes it whole), as `ShardLog::start` does.
    fn start_on_log(&mut self, i: usize) {
        let mut rng = Rng::new(self.now.micros ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9));
        loop {
            self.catch_up(i);
            let log = self.log.as_mut().expect("a log");
            let barrier = log.writers[i].barrier();
            if self.append_barrier(i, barrier, &mut rng) {
                return;
            }
        }
    }

    /// Appends shard `i`'s barrier (a round at a time until the log
    /// settles it) and stores the positions it reached. True when the log
    /// took it whole; else the partitions another writer came first on are
    /// stale (caught up on before the next try).
    fn append_barrier(&mut self, i: usize, mut barrier: LogBatch, rng: &mut Rng) -> bool {
        let log = self.log.as_mut().expect("a log");
        loop {
            let requests = log.writers[i].requests(&mut barrier);
            if requests.is_empty() {
                break;
            }
            let results = log.model.borrow_mut().append_all(requests, log.faulty, rng);
            let _ = log.writers[i].answers(&mut barrier, results);
        }
        let positions: Vec<ruyi::storage::Mutation> = barrier.positions().collect();
        if !positions.is_empty() {
            self.shards[i]
                .prepare_write(&positions)
                .and_then(|job| job())
                .expect("write the positions");
        }
        let log = self.log.as_mut().expect("a log");
        log.writers[i].applied_in_part(&barrier);
        barrier.stored_whole()
    }

    /// Shard `i` applies what the log holds beyond its position on every
    /// stale partition (the model log always answers): its own node's
    /// records as what its batches would have written, other nodes' as a
    /// follower applies them. A record of the node now holding the claim
    /// (another) means that node took the partition over: this shard lets
    /// it go, as the lease service would tell it to.
    fn catch_up(&mut self, i: usize) {
        let now = self.now;
        let log = self.log.as_mut().expect("a log");
        let mut applied_any = false;
        let mut lost = Vec::new();
        for (partition, from) in log.writers[i].stale() {
            let mut last = from;
            let records = log
                .model
                .borrow()
                .read_after(&log.config.subject(partition), from);
            let claimant = log.claims.borrow()[partition as usize] as u32 + 1;
            for (seq, payload) in records {
                let record = LogRecord::decode(&payload).expect("a record");
                if log.writers[i].is_own(&record.writer) {
                    self.shards[i].apply_log(partition, seq, &record, now)
                } else {
                    if record.writer.node == claimant {
                        lost.push(partition);
                    }
                    self.shards[i].follow_log(partition, seq, &record, false, now)
                }
                .expect("apply a record");
                last = seq;
            }
            applied_any |= last != from;
            log.writers[i].caught_up(partition, last, true);
        }
        if applied_any {
            self.shards[i].log_caught_up(now);
        }
        lost.dedup();
        for partition in lost {
            self.release(i, partition);
        }
    }

    /// Shard `i` begins taking `partition` over (its node now holds the
    /// claim): it stops following it, catches up and appends a barrier,
    /// then takes its writes (in `commit_step`).
    pub fn acquire(&mut self, partition: u32) {
        let Some(log) = &mut self.log else {
            return;
        };
        let i = log.places.get(partition).shard.index();
        if log.acquiring[i].contains(&partition) {
            return;
        }
        let applied = self.shards[i]
            .log_applied(partition)
            .expect("read a log position");
        log.writers[i].acquire(partition, applied);
        log.acquiring[i].push(partition);
    }

    /// Shard `i` lets `partition` go (another node holds its claim): it
    /// takes no more writes there and follows its log. Between batches
    /// only: false while a batch of the shard is under way.
    pub fn release(&mut self, i: usize, partition: u32) -> bool {
        if !matches!(self.commits.get(i), None | Some(Commit::Idle)) {
            return false;
        }
        let now = self.now;
        let log = self.log.as_mut().expect("a log");
        log.writers[i].release(partition);
        log.acquiring[i].retain(|p| *p != partition);
        self.shards[i].release_partition(partition, now);
        true
    }

    /// Shard `i` appends the barrier of the partitions it is taking over,
    /// once caught up on them; when the log takes it whole, they take
    /// writes here. None when it is taking nothing over.
    fn acquire_step(&mut self, i: usize, draw: u64) -> Option<&'static str> {
        let log = self.log.as_mut()?;
        if log.acquiring.get(i).is_none_or(|a| a.is_empty()) {
            return None;
        }
        let partitions = log.acquiring[i].clone();
        let barrier = log.writers[i].barrier_of(&partitions);
        if !self.append_barrier(i, barrier, &mut Rng::new(draw)) {
            // Another writer came first: caught up on again, then tried
            // again.
            return Some("takeover barrier fenced off");
        }
        let log = self.log.as_mut().expect("a log");
        for partition in std::mem::take(&mut log.acquiring[i]) {
            self.shards[i].own_partition(partition);
        }
        Some("took partitions over")
    }

    /// Shard `i` applies the next record (in log order) of the partitions
    /// it follows, as its ordered consumer hands them over. False when it
    /// has nothing to apply.
    pub fn follow_step(&mut self, i: usize) -> bool {
        let now = self.now;
        let Some(log) = &self.log else {
            return false;
        };
        let mut next: Option<(u64, u32, bytes::Bytes)> = None;
        for partition in 0..log.places.len() {
            let place = log.places.get(partition);
            if place.owned || place.shard.index() != i || log.writers[i].owns(partition) {
                continue;
            }
            let applied = self.shards[i]
                .log_applied(partition)
                .expect("read a followed position");
            let first = log
                .model
                .borrow()
                .first_after(&log.config.subject(partition), applied);
            if let Some((seq, payload)) = first {
                if next.as_ref().is_none_or(|(s, ..)| seq < *s) {
                    next = Some((seq, partition, payload));
                }
            }
        }
        let Some((seq, partition, payload)) = next else {
            return false;
        };
        let record = LogRecord::decode(&payload).expect("a record");
        let own = record.writer.node == log.node_id;
        self.shards[i]
            .follow_log(partition, seq, &record, own, now)
            .expect("apply a followed record");
        true
    }

    /// The writes shard `i` queued for other nodes, in the order made.
    pub fn take_forwards(&mut self, i: usize) -> Vec<ruyi::shard::state::Forwarded> {
        self.shards[i].take_forwards()
    }

    /// The retry tick: redeliveries and refills, and the position write it
    /// hands off.
    pub fn retry_tick(&mut self, i: usize) {
        let now = self.now;
        self.shards[i].retry_due(now);
        if let Some(job) = self.shards[i].position_flush() {
            self.position_jobs[i].push(job);
        }
    }

    /// Runs the oldest handed-off position write of shard `i`.
    pub fn run_position_job(&mut self, i: usize) {
        if !self.position_jobs[i].is_empty() {
            let job = self.position_jobs[i].remove(0);
            let _ = job();
        }
    }

    /// Whether anything is queued or in flight inside the gateway.
    pub fn busy(&self) -> bool {
        !self.busy_inboxes().is_empty()
            || self.commits.iter().any(|c| !matches!(c, Commit::Idle))
            || self.position_jobs.iter().any(|j| !j.is_empty())
    }
}

fn open_rocks(dir: &std::path::Path, config: &Config) -> RocksStorage {
    RocksStorage::open(
        dir,
        &ruyi::storage::rocks::RocksOptions {
            sync: SyncPolicy::Never,
            block_cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
            idempotency_ttl_ms: config.storage.idempotency_ttl_s * 1000,
        },
    )
    .expect("open RocksDB")
}

/// Webhooks as the simulation writes them: every message's `msg.notify` and
/// `msg.offline` at commit, checked against the store and the model. (Late
/// `msg.offline` events and `user.onlinestatus` are left out: they add
/// commits of their own, which would change the runs of the seeds kept as
/// regressions.)
fn webhook_config() -> ruyi::config::WebhookConfig {
    ruyi::config::WebhookConfig {
        url: "http://simulation.invalid/hook".into(),
        secret: "simulation".into(),
        events: vec!["msg.notify".into(), "msg.offline".into()],
        late_offline_messages_max: 0,
        ..ruyi::config::WebhookConfig::default()
    }
}
