//! The simulated gateway: the real `ShardState`s of one process on a real
//! store, with everything the runtime does by itself (carrying inbox
//! batches, running commits, flushing positions, sweeping, retrying) turned
//! into steps the simulation chooses. Inboxes deliver FIFO per pair of
//! shards; a commit's durable write and the acknowledgements after it are
//! separate steps, so a crash can fall between them.

use ruyi::auth::Authenticator;
use ruyi::config::{AuthConfig, AuthMode, Config, Limits};
use ruyi::ids::{Millis, ShardId};
use ruyi::shard::message::ShardMsg;
use ruyi::shard::state::{InFlight, Now, ShardState, Signals};
use ruyi::storage::{
    CommitJob, MemoryStorage, RocksStorage, ShardStore, Storage, StorageError, SyncPolicy,
};
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
}

impl World {
    pub fn new(kind: StoreKind, shards: u16, config: Config, now: Now) -> World {
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
                state
            })
            .collect();
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
        for commit in std::mem::take(&mut self.commits) {
            if let (Commit::Begun(job, _), true) = (commit, write_begun) {
                let _ = job();
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
    /// prepared write fail (nothing of it is stored).
    pub fn commit_step(&mut self, i: usize, fail: bool) -> &'static str {
        let now = self.now;
        match std::mem::replace(&mut self.commits[i], Commit::Idle) {
            Commit::Idle => match self.shards[i].begin_commit(now) {
                Some((job, in_flight)) => {
                    self.commits[i] = Commit::Begun(job, in_flight);
                    "begin"
                }
                None => "idle",
            },
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
