//! Starting and stopping a server. [`Server::start`] binds one listening
//! socket per address (refused when another process listens there, see
//! [`crate::listener`]) and hands every shard a descriptor of the client
//! socket, builds the inbox mesh, starts one pinned glommio executor per
//! shard and returns a [`ServerHandle`] once every shard is up. Tests start
//! servers on port 0 and stop them deterministically with
//! [`ServerHandle::shutdown`].

use crate::channel::ChannelKey;
use crate::cluster::forward::{channel_of, forwardable, Answer, Forward};
use crate::config::{AuthMode, Config, StorageEngine};
use crate::ids::ShardId;
use crate::key::Routing;
use crate::listener::{self, ListenError, Role};
use crate::protocol::ReasonCode;
use crate::shard::api::{ApiRequest, ApiResponse};
use crate::shard::mesh;
use crate::shard::runtime::{self, ControlCmd, ShardSetup, Transport};
use crate::shard::state::{CommitLatency, ControlError, GroupInfo, SetChange};
use crate::storage::{ListKind, MemoryStorage, RocksStorage, Storage};
use crate::webhook::WebhookShared;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use glommio::{CpuSet, LocalExecutorBuilder, Placement};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot share the client listener among the shards: {0}")]
    Share(std::io::Error),
    #[error("cannot open storage in {}: {source}", dir.display())]
    Storage {
        dir: std::path::PathBuf,
        source: crate::storage::StorageError,
    },
    #[error("cannot start shard {shard}: {detail}")]
    Shard { shard: u16, detail: String },
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("cannot start the admin API on {addr}: {source}")]
    Api {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Server;

impl Server {
    /// Starts a server with the storage engine its configuration names.
    pub fn start(config: Config) -> Result<ServerHandle, StartError> {
        config.validate()?;
        let storage: Arc<dyn Storage> = match config.storage.engine {
            StorageEngine::Memory => Arc::new(MemoryStorage::default()),
            StorageEngine::Rocksdb => {
                let dir = &config.server.data_dir;
                let started = std::time::Instant::now();
                let store =
                    RocksStorage::open(dir, &config.storage.rocks_options()).map_err(|source| {
                        StartError::Storage {
                            dir: dir.clone(),
                            source,
                        }
                    })?;
                tracing::info!(dir = %dir.display(), elapsed_ms = started.elapsed().as_millis() as u64, "storage opened");
                Arc::new(store)
            }
        };
        Server::start_with_storage(config, storage)
    }

    pub fn start_with_storage(
        config: Config,
        storage: Arc<dyn Storage>,
    ) -> Result<ServerHandle, StartError> {
        config.validate()?;
        if config.auth.mode == AuthMode::Off {
            tracing::warn!("auth.mode = \"off\": any client can connect as any uid");
        }
        let shards = config.shard_count();
        let tls = if config.tls.enabled() {
            Some(crate::tls::server_config(
                &config.tls.cert_path,
                &config.tls.key_path,
            )?)
        } else {
            None
        };
        let backlog = config.limits.listen_backlog;
        let release_wait = Duration::from_millis(config.server.listener_release_wait_ms);
        let (client, addr) =
            listener::bind(Role::Client, config.server.listen, backlog, release_wait)?;
        let listeners = listener::share(client, shards).map_err(StartError::Share)?;
        // The other listeners, when on: each one SO_REUSEPORT socket shared
        // by every shard like the client listener.
        let mut more_listeners: Vec<Vec<(Transport, std::os::fd::OwnedFd)>> =
            (0..shards).map(|_| Vec::new()).collect();
        let mut bound_addr = |role: Role, transport: Transport, at: Option<SocketAddr>| {
            let Some(at) = at else {
                return Ok(None);
            };
            let (socket, bound) = listener::bind(role, at, backlog, release_wait)?;
            let shared = listener::share(socket, shards).map_err(StartError::Share)?;
            for (list, fd) in more_listeners.iter_mut().zip(shared) {
                list.push((transport, fd));
            }
            Ok::<_, StartError>(Some(bound))
        };
        let ws_addr = bound_addr(
            Role::WebSocket,
            Transport::WebSocket,
            config.ws.listen_addr(),
        )?;
        let wkproto_addr = bound_addr(
            Role::Wkproto,
            Transport::WkTcp,
            config.wkproto.listen_addr(),
        )?;
        let wkproto_ws_addr = bound_addr(
            Role::WkprotoWebSocket,
            Transport::WkWebSocket,
            config.wkproto.ws_listen_addr(),
        )?;
        // The API listener is bound before any shard runs too, so a taken
        // address fails the start early.
        let api_listener = if config.api.enabled {
            let (socket, _) =
                listener::bind(Role::AdminApi, config.api.listen, backlog, release_wait)?;
            Some(std::net::TcpListener::from(socket))
        } else {
            None
        };
        let cpus = online_cpus();
        let config = Arc::new(config);
        let webhooks = Arc::new(WebhookShared::default());
        if !config.webhook.url.is_empty() {
            // Counted before any shard can commit a new event, so nothing is
            // counted twice.
            match storage.webhook_outbox_size() {
                Ok((events, bytes)) => {
                    webhooks
                        .outbox_events
                        .store(events, std::sync::atomic::Ordering::Relaxed);
                    webhooks
                        .outbox_bytes
                        .store(bytes, std::sync::atomic::Ordering::Relaxed);
                    if events > 0 {
                        tracing::info!(
                            events,
                            bytes,
                            "webhook events from before the start are waiting"
                        );
                    }
                }
                Err(error) => tracing::error!(%error, "reading the webhook outbox size failed"),
            }
        }
        // A cluster node connects to the log and applies what it holds
        // beyond this store before anything else reads the store.
        let log = match config.cluster.enabled() {
            false => None,
            true => Some(start_log(&config, shards)?),
        };
        let routing = match &log {
            None => Routing::Hash { shards },
            Some(log) => Routing::Partitions {
                places: Arc::clone(&log.places),
            },
        };
        // The first message id of this run, the same for every shard: ids
        // continue above everything an earlier run recorded.
        let run = storage
            .open_shard(crate::ids::ShardId(0))
            .and_then(|mut store| {
                crate::shard::state::first_id_of_run(&mut *store, crate::time::unix_now_ms())
            })
            .map_err(|source| StartError::Storage {
                dir: config.server.data_dir.clone(),
                source,
            })?;
        let meshes = mesh::build(shards, config.server.inbox_capacity_batches);
        let versions = crate::shard::versions::VersionFrontier::new(shards);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut controls = Vec::new();
        let mut threads = Vec::new();
        for ((ends, listener), more_listeners) in
            meshes.into_iter().zip(listeners).zip(more_listeners)
        {
            let index = ends.shard.index();
            let (control_tx, control_rx) = async_channel::bounded(1024);
            controls.push(control_tx);
            let placement = if config.server.pin_shards && !cpus.is_empty() {
                Placement::Fixed(cpus[index % cpus.len()])
            } else {
                Placement::Unbound
            };
            let setup = ShardSetup {
                config: Arc::clone(&config),
                shards,
                mesh: ends,
                listener,
                more_listeners,
                storage: Arc::clone(&storage),
                control: control_rx,
                ready: ready_tx.clone(),
                webhooks: Arc::clone(&webhooks),
                tls: tls.clone(),
                run,
                versions: Arc::clone(&versions),
                log: log.clone(),
            };
            let thread = LocalExecutorBuilder::new(placement)
                .name(&format!("ruyi-shard-{index}"))
                .spin_before_park(Duration::from_micros(config.server.spin_before_park_us))
                .spawn(move || runtime::run(setup))
                .map_err(|e| StartError::Shard {
                    shard: index as u16,
                    detail: e.to_string(),
                })?;
            threads.push(thread);
        }
        drop(ready_tx);
        let mut handle = ServerHandle {
            addr,
            shards,
            routing,
            controls,
            threads,
            api_addr: None,
            ws_addr,
            ws_path: config.ws.path.clone(),
            wkproto_addr,
            wkproto_ws_addr,
            wkproto_ws_path: config.wkproto.ws_path.clone(),
            control_plane: None,
            cluster: None,
        };
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok(Ok(_)) => {}
                Ok(Err(detail)) => {
                    handle.shutdown();
                    return Err(StartError::Shard { shard: 0, detail });
                }
                Err(_) => {
                    return Err(StartError::Shard {
                        shard: 0,
                        detail: "a shard thread exited during start-up".into(),
                    })
                }
            }
        }
        // A cluster node serves the writes other nodes forward to its
        // partitions, and forwards its API's writes to theirs.
        if let Some(log) = &log {
            let link = Arc::new(ClusterLink {
                bridge: Arc::clone(&log.bridge),
                config: config.cluster.clone(),
                verify: crate::protocol::VerifyLimits::for_frame_size(
                    config.limits.frame_size_max_bytes,
                ),
            });
            let subjects = (0..config.cluster.partitions)
                .filter(|p| log.places.get(*p).owned)
                .map(|p| config.cluster.forward_subject(p))
                .collect();
            let handler = forward_handler(handle.control(), link.verify);
            if let Err(error) =
                futures_lite::future::block_on(log.bridge.serve_forwards(subjects, handler))
            {
                handle.shutdown();
                return Err(StartError::Cluster(error.to_string()));
            }
            handle.cluster = Some(link);
        }
        let control = handle.control_with(Arc::clone(&webhooks), Arc::clone(&storage));
        let bound = crate::api::Bound {
            ws_addr,
            wk_routes: wk_routes(&config, wkproto_addr, wkproto_ws_addr),
        };
        match crate::api::ControlPlane::start(
            &config,
            control,
            storage,
            webhooks,
            api_listener,
            bound,
        ) {
            Ok(plane) => {
                handle.api_addr = plane.api_addr();
                handle.control_plane = Some(plane);
            }
            Err(source) => {
                handle.shutdown();
                return Err(StartError::Api {
                    addr: config.api.listen,
                    source,
                });
            }
        }
        tracing::info!(%addr, api = ?handle.api_addr, shards, "ruyi is listening");
        Ok(handle)
    }
}

/// The CPUs this process may run on (its affinity mask, so a systemd
/// `CPUAffinity=` or `taskset` decides where shards go), else every online
/// CPU.
fn online_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let allowed =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
            == 0;
    let mut cpus: Vec<usize> = if allowed {
        (0..libc::CPU_SETSIZE as usize)
            .filter(|cpu| unsafe { libc::CPU_ISSET(*cpu, &set) })
            .collect()
    } else {
        CpuSet::online()
            .map(|set| set.into_iter().map(|location| location.cpu).collect())
            .unwrap_or_default()
    };
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// What `GET /route` answers: the configured public addresses, or else
/// the WKProto listeners' own (`wss://` for the WebSocket one under TLS).
fn wk_routes(
    config: &Config,
    tcp: Option<SocketAddr>,
    ws: Option<SocketAddr>,
) -> crate::api::WkRoutes {
    let wk = &config.wkproto;
    let tls = config.tls.enabled();
    let or = |public: &str, bound: Option<String>| {
        if public.is_empty() {
            bound.unwrap_or_default()
        } else {
            public.to_owned()
        }
    };
    crate::api::WkRoutes {
        tcp_addr: or(&wk.route_tcp_addr, tcp.map(|a| a.to_string())),
        ws_addr: or(
            &wk.route_ws_addr,
            ws.filter(|_| !tls)
                .map(|a| format!("ws://{a}{}", wk.ws_path)),
        ),
        wss_addr: or(
            &wk.route_wss_addr,
            ws.filter(|_| tls)
                .map(|a| format!("wss://{a}{}", wk.ws_path)),
        ),
    }
}

/// Connects a cluster node to its log (creating the stream when asked)
/// and checks that a record fits the server's messages.
fn start_log(config: &Config, shards: u16) -> Result<crate::shard::log::ShardLogSetup, StartError> {
    use crate::cluster::bridge::{BridgeConfig, LogBridge, StreamSpec};
    use crate::cluster::partition::{NodeSpec, PartitionMap, NODE_SHARDS_MAX};
    let c = &config.cluster;
    if shards > NODE_SHARDS_MAX {
        return Err(StartError::Cluster(format!(
            "a cluster node runs at most {NODE_SHARDS_MAX} shards (its message ids \
             name the node and the shard); this one would run {shards}: list at most \
             {NODE_SHARDS_MAX} in server.shards"
        )));
    }
    let bridge = LogBridge::start(BridgeConfig {
        urls: c.nats_urls.clone(),
        stream: c.stream.clone(),
        create: c.create_stream.then(|| StreamSpec {
            subjects: vec![format!("{}.>", c.subject_prefix)],
            replicas: c.replicas,
        }),
        policy: crate::cluster::log::AppendPolicy {
            ack_timeout: Duration::from_millis(c.ack_timeout_ms),
            ..Default::default()
        },
        queue_max: usize::from(shards) * 4,
        connect_timeout: Duration::from_millis(c.connect_timeout_ms),
    })
    .map_err(|error| StartError::Cluster(error.to_string()))?;
    let room = bridge.max_payload().saturating_sub(4096);
    if c.record_max_bytes > room {
        return Err(StartError::Cluster(format!(
            "cluster.record_max_bytes = {} is more than the NATS server takes \
             (max_payload {} less 4096 for headers = {room}); lower it or raise max_payload",
            c.record_max_bytes,
            bridge.max_payload()
        )));
    }
    let nodes: Vec<NodeSpec> = c
        .node_ids()
        .into_iter()
        .map(|node| NodeSpec { node, shards })
        .collect();
    let map = PartitionMap::new(c.partitions, &nodes)
        .map_err(|error| StartError::Cluster(error.to_string()))?;
    let places = map.places(c.node_id, shards);
    // Each shard applies what the log holds beyond its store before it
    // serves (`ShardLog::start`), writing the events of records this node
    // appended and never wrote here.
    Ok(crate::shard::log::ShardLogSetup {
        bridge: Arc::new(bridge),
        places,
        node: c.node_id,
    })
}

/// A running server: its address, its control plane, and its threads.
pub struct ServerHandle {
    addr: SocketAddr,
    shards: u16,
    routing: Routing,
    controls: Vec<async_channel::Sender<ControlCmd>>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
    api_addr: Option<SocketAddr>,
    /// The WebSocket listener's address and upgrade path, when it is on.
    ws_addr: Option<SocketAddr>,
    ws_path: String,
    /// WuKongIM's protocol's listeners, when on, and the WebSocket one's
    /// path (empty: any).
    wkproto_addr: Option<SocketAddr>,
    wkproto_ws_addr: Option<SocketAddr>,
    wkproto_ws_path: String,
    /// The admin API and the webhook dispatcher, on their own thread.
    control_plane: Option<crate::api::ControlPlane>,
    /// A cluster node's way to the other nodes.
    cluster: Option<Arc<ClusterLink>>,
}

/// What [`Control`] needs to forward writes to other cluster nodes.
pub struct ClusterLink {
    bridge: Arc<crate::cluster::bridge::LogBridge>,
    config: crate::config::ClusterConfig,
    verify: crate::protocol::VerifyLimits,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

/// Whose allow or deny list to change.
#[derive(Debug, Clone, Copy)]
pub enum ListTarget<'a> {
    /// A group's: who may send into it.
    Group(&'a str),
    /// A user's own: who may send to them in person channels.
    User(&'a str),
}

/// Sums of every shard's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServerStats {
    pub connections: usize,
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub messages_committed: u64,
    pub recvs_written: u64,
    pub commit_batches: u64,
    pub redeliveries: u64,
    pub sends_received: u64,
    pub acks_received: u64,
    pub connections_rate_limited: u64,
    /// Messages queued for other shards' inboxes, not yet handed over.
    pub inbox_depth: usize,
    pub commit_latency: CommitLatency,
    /// The latency budget, summed over shards.
    pub budget: crate::shard::budget::StageLatency,
    /// Bytes queued for connections and not yet written to their sockets.
    pub outbound_queued_bytes: u64,
    /// Connections cut off because they did not read what was sent to them.
    pub slow_consumers: u64,
    /// Channels held in memory, and idle ones dropped from it.
    pub channels_cached: usize,
    pub channels_evicted: u64,
}

impl ServerHandle {
    /// The address clients connect to (with the real port when bound to 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// The admin HTTP API's address, when it is enabled.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// The WebSocket listener's address (with the real port when bound to
    /// 0), when it is on.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// The path WebSocket clients upgrade on.
    pub fn ws_path(&self) -> &str {
        &self.ws_path
    }

    /// WuKongIM's protocol's TCP listener address, when it is on.
    pub fn wkproto_addr(&self) -> Option<SocketAddr> {
        self.wkproto_addr
    }

    /// WuKongIM's protocol's WebSocket listener address, when it is on.
    pub fn wkproto_ws_addr(&self) -> Option<SocketAddr> {
        self.wkproto_ws_addr
    }

    /// The path of the WKProto WebSocket listener (empty: any).
    pub fn wkproto_ws_path(&self) -> &str {
        &self.wkproto_ws_path
    }

    /// A handle for control requests that can be moved to other threads.
    pub fn control(&self) -> Control {
        match &self.control_plane {
            Some(plane) => plane.control().clone(),
            None => Control {
                shards: self.shards,
                routing: self.routing.clone(),
                controls: self.controls.clone(),
                webhooks: Arc::new(WebhookShared::default()),
                storage: None,
                cluster: self.cluster.clone(),
            },
        }
    }

    fn control_with(&self, webhooks: Arc<WebhookShared>, storage: Arc<dyn Storage>) -> Control {
        Control {
            shards: self.shards,
            routing: self.routing.clone(),
            controls: self.controls.clone(),
            webhooks,
            storage: Some(storage),
            cluster: self.cluster.clone(),
        }
    }

    /// Asks every shard to stop: no new connections, every open one gets a
    /// `Disconnect` with `ServerShutdown` and time to flush.
    pub fn shutdown(&self) {
        if let Some(plane) = &self.control_plane {
            plane.stop();
        }
        for control in &self.controls {
            let _ = control.send_blocking(ControlCmd::Shutdown);
        }
    }

    /// Waits for every shard thread (and the control plane) to finish.
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
        if let Some(plane) = self.control_plane {
            plane.join();
        }
    }

    /// Shuts down and waits.
    pub fn stop(self) {
        self.shutdown();
        self.join();
    }
}

/// Control-plane requests to a running server, usable from any thread or
/// runtime. Group changes are applied by the group's owner shard, stored,
/// and only then confirmed.
#[derive(Clone)]
pub struct Control {
    shards: u16,
    routing: Routing,
    controls: Vec<async_channel::Sender<ControlCmd>>,
    webhooks: Arc<WebhookShared>,
    storage: Option<Arc<dyn Storage>>,
    /// On a cluster node: writes to other nodes' partitions go there.
    cluster: Option<Arc<ClusterLink>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl Control {
    async fn group(
        &self,
        group_id: &str,
        uids: &[&str],
        change: SetChange,
    ) -> Result<GroupInfo, ControlError> {
        let key = ChannelKey::group(group_id);
        if let Some(partition) = self.remote(&key) {
            let forward = Forward::Group {
                group_id: group_id.to_owned(),
                uids: uids.iter().map(|u| (*u).to_owned()).collect(),
                change,
            };
            return match self.forward(partition, forward).await? {
                Answer::Group(result) => result,
                _ => Err(other_answer()),
            };
        }
        let owner = self.routing.shard_of(&key);
        self.ask(owner, |reply| ControlCmd::Group {
            group_id: group_id.to_owned(),
            uids: uids.iter().map(|u| (*u).to_owned()).collect(),
            change,
            reply,
        })
        .await?
    }

    /// `key`'s partition when another node owns it and this node can
    /// forward to it.
    fn remote(&self, key: &ChannelKey) -> Option<u32> {
        self.cluster.as_ref()?;
        self.routing.remote(key)
    }

    /// Sends `forward` to the node owning `partition` and waits for its
    /// answer (at most `cluster.forward_timeout_ms`).
    async fn forward(&self, partition: u32, forward: Forward) -> Result<Answer, ControlError> {
        let Some(link) = &self.cluster else {
            return Err(ControlError::Unavailable("not a cluster node".into()));
        };
        let bytes = forward
            .encode()
            .map_err(|error| ControlError::Invalid(error.to_string()))?;
        let timeout = Duration::from_millis(link.config.forward_timeout_ms);
        let subject = link.config.forward_subject(partition);
        let unavailable = |why: String| ControlError::Unavailable(why);
        let answers = link
            .bridge
            .forward(vec![(subject, bytes.into())], timeout)
            .await
            .map_err(|error| unavailable(error.to_string()))?;
        let answer = match answers.into_iter().next() {
            Some(answer) => answer
                .recv()
                .await
                .map_err(|_| ControlError::ShuttingDown)?,
            None => return Err(ControlError::ShuttingDown),
        };
        let bytes = answer.map_err(|why| unavailable(why.to_string()))?;
        Answer::decode(&bytes, &link.verify).map_err(|error| unavailable(error.to_string()))
    }

    /// Hands `command` to `shard`; the answer comes on the returned
    /// channel.
    async fn submit<T>(
        &self,
        shard: ShardId,
        command: impl FnOnce(async_channel::Sender<T>) -> ControlCmd,
    ) -> Result<async_channel::Receiver<T>, ControlError> {
        let (reply, answer) = async_channel::bounded(1);
        self.controls[shard.index()]
            .send(command(reply))
            .await
            .map_err(|_| ControlError::ShuttingDown)?;
        Ok(answer)
    }

    /// Sends one request to `shard` and waits for its answer.
    async fn ask<T>(
        &self,
        shard: ShardId,
        command: impl FnOnce(async_channel::Sender<T>) -> ControlCmd,
    ) -> Result<T, ControlError> {
        let (reply, answer) = async_channel::bounded(1);
        self.controls[shard.index()]
            .send(command(reply))
            .await
            .map_err(|_| ControlError::ShuttingDown)?;
        answer.recv().await.map_err(|_| ControlError::ShuttingDown)
    }

    /// Creates a group with exactly these members, or replaces the members
    /// of an existing one.
    pub async fn create_group(
        &self,
        group_id: &str,
        members: &[&str],
    ) -> Result<GroupInfo, ControlError> {
        self.group(group_id, members, SetChange::Replace).await
    }

    pub async fn add_members(
        &self,
        group_id: &str,
        members: &[&str],
    ) -> Result<GroupInfo, ControlError> {
        self.group(group_id, members, SetChange::Add).await
    }

    /// Removes members; they receive nothing committed after the removal.
    pub async fn remove_members(
        &self,
        group_id: &str,
        members: &[&str],
    ) -> Result<GroupInfo, ControlError> {
        self.group(group_id, members, SetChange::Remove).await
    }

    /// Changes an allow or deny list: a group's, or a user's own (which
    /// applies to person channels: the deny list always, the allow list when
    /// `policy.allowlist_for_person` is on). Returns the resulting list.
    pub async fn change_list(
        &self,
        target: ListTarget<'_>,
        kind: ListKind,
        change: SetChange,
        uids: &[&str],
    ) -> Result<Vec<String>, ControlError> {
        let key = match target {
            ListTarget::Group(id) => ChannelKey::group(id),
            ListTarget::User(uid) => crate::storage::user_list_key(&crate::ids::Uid::new(uid)),
        };
        if let Some(partition) = self.remote(&key) {
            let forward = Forward::List {
                key,
                kind,
                uids: uids.iter().map(|u| (*u).to_owned()).collect(),
                change,
            };
            return match self.forward(partition, forward).await? {
                Answer::List(result) => result,
                _ => Err(other_answer()),
            };
        }
        let owner = self.routing.shard_of(&key);
        self.ask(owner, |reply| ControlCmd::List {
            key,
            kind,
            uids: uids.iter().map(|u| (*u).to_owned()).collect(),
            change,
            reply,
        })
        .await?
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// The shard that owns `key`.
    pub fn shard_of(&self, key: &ChannelKey) -> ShardId {
        self.routing.shard_of(key)
    }

    /// The webhook outbox's counters.
    pub fn webhooks(&self) -> &WebhookShared {
        &self.webhooks
    }

    /// The storage engine (for the API's direct writes, such as tokens).
    pub fn storage(&self) -> Option<&Arc<dyn Storage>> {
        self.storage.as_ref()
    }

    /// Sends an admin API request to `shard` and waits for the answer.
    pub async fn api(
        &self,
        shard: ShardId,
        request: ApiRequest,
    ) -> Result<ApiResponse, ControlError> {
        self.ask(shard, |reply| ControlCmd::Api { request, reply })
            .await
    }

    /// Sends an admin API request naming `key` to its owner (on a cluster
    /// node, forwarded to the node owning it when it is a write) and waits
    /// for the answer.
    pub async fn api_for(
        &self,
        key: &ChannelKey,
        request: ApiRequest,
    ) -> Result<ApiResponse, ControlError> {
        if let Some(partition) = self.remote(key).filter(|_| forwardable(&request)) {
            return match self.forward(partition, Forward::Api(request)).await? {
                Answer::Api(response) => Ok(response),
                _ => Err(other_answer()),
            };
        }
        self.api(self.routing.shard_of(key), request).await
    }

    /// Serves a write another node forwarded here: hands it to the shard
    /// owning it and returns the answer to come (encoded).
    async fn serve_forward(&self, forward: Forward) -> BoxFuture<'static, Bytes> {
        let ready = |answer: Answer| -> BoxFuture<'static, Bytes> {
            Box::pin(std::future::ready(Bytes::from(answer.encode())))
        };
        match forward {
            Forward::Api(request) => {
                let Some(key) = channel_of(&request) else {
                    return ready(Answer::Api(ApiResponse::Failed(ReasonCode::Unknown)));
                };
                let shard = self.routing.shard_of(key);
                match self
                    .submit(shard, |reply| ControlCmd::Api { request, reply })
                    .await
                {
                    Ok(answer) => Box::pin(async move {
                        let response = answer
                            .recv()
                            .await
                            .unwrap_or(ApiResponse::Failed(ReasonCode::ServerShutdown));
                        Bytes::from(Answer::Api(response).encode())
                    }),
                    Err(_) => ready(Answer::Api(ApiResponse::Failed(ReasonCode::ServerShutdown))),
                }
            }
            Forward::Group {
                group_id,
                uids,
                change,
            } => {
                let shard = self.routing.shard_of(&ChannelKey::group(&group_id));
                let command = |reply| ControlCmd::Group {
                    group_id,
                    uids,
                    change,
                    reply,
                };
                match self.submit(shard, command).await {
                    Ok(answer) => Box::pin(async move {
                        let result = answer
                            .recv()
                            .await
                            .unwrap_or(Err(ControlError::ShuttingDown));
                        Bytes::from(Answer::Group(result).encode())
                    }),
                    Err(error) => ready(Answer::Group(Err(error))),
                }
            }
            Forward::List {
                key,
                kind,
                uids,
                change,
            } => {
                let shard = self.routing.shard_of(&key);
                let command = |reply| ControlCmd::List {
                    key,
                    kind,
                    uids,
                    change,
                    reply,
                };
                match self.submit(shard, command).await {
                    Ok(answer) => Box::pin(async move {
                        let result = answer
                            .recv()
                            .await
                            .unwrap_or(Err(ControlError::ShuttingDown));
                        Bytes::from(Answer::List(result).encode())
                    }),
                    Err(error) => ready(Answer::List(Err(error))),
                }
            }
        }
    }

    /// Every shard's counters, summed.
    pub async fn stats(&self) -> Result<ServerStats, ControlError> {
        let mut total = ServerStats::default();
        for shard in 0..self.shards {
            let (stats, connections, depth) = self
                .ask(ShardId(shard), |reply| ControlCmd::Stats { reply })
                .await?;
            total.connections += connections;
            total.inbox_depth += depth;
            total.sends_received += stats.sends_received;
            total.acks_received += stats.acks_received;
            total.connections_rate_limited += stats.connections_rate_limited;
            total.commit_latency.merge(&stats.commit_latency);
            total.budget.merge(&stats.budget);
            total.connections_accepted += stats.connections_accepted;
            total.connections_refused += stats.connections_refused;
            total.messages_committed += stats.messages_committed;
            total.recvs_written += stats.recvs_written;
            total.commit_batches += stats.commit_batches;
            total.redeliveries += stats.redeliveries;
            total.outbound_queued_bytes += stats.outbound_queued_bytes;
            total.slow_consumers += stats.slow_consumers;
            total.channels_cached += stats.channels_cached;
            total.channels_evicted += stats.channels_evicted;
        }
        Ok(total)
    }
}

fn other_answer() -> ControlError {
    ControlError::Unavailable("the owning node answered with an answer of another kind".into())
}

/// Serves the writes other nodes forward to this node's partitions through
/// `control` (which routes to this node's shards), in arrival order.
fn forward_handler(
    control: Control,
    verify: crate::protocol::VerifyLimits,
) -> crate::cluster::bridge::ForwardHandler {
    Arc::new(move |bytes: Bytes| {
        let control = control.clone();
        // Two steps by design: the outer future hands the write to its shard
        // (awaited in arrival order), the inner one is its answer.
        #[allow(clippy::async_yields_async)]
        Box::pin(async move {
            match Forward::decode(&bytes, &verify) {
                Ok(forward) => control.serve_forward(forward).await,
                Err(error) => {
                    tracing::warn!(%error, "a forwarded write does not decode");
                    let answer = Answer::Api(ApiResponse::Failed(ReasonCode::Unknown));
                    let bytes = Bytes::from(answer.encode());
                    Box::pin(std::future::ready(bytes)) as BoxFuture<'static, Bytes>
                }
            }
        })
    })
}

/// A panic anywhere in the gateway (a broken invariant: no client or API
/// input may reach one) takes the whole process down, after the panic is
/// printed, so that its supervisor restarts it. Left alone, a shard thread
/// that panicked would leave a process that accepts connections and never
/// answers them (their logins wait for that shard's presence ack).
/// `ruyi serve` installs it first thing.
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("ruyi: a thread panicked; stopping the process so it can be restarted");
        std::process::abort();
    }));
}
