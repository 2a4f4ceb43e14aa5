//! Configuration: one serde tree, defaults on every field, and
//! [`Config::validate`] that checks every value and how the limits relate
//! before the server starts.
//!
//! The committed example `src/config/ruyi.toml` is the complete default
//! configuration with a comment on every setting; `ruyi print-config` prints
//! it and a test checks that it parses back to [`Config::default`].

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The fully commented default configuration.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("config/ruyi.toml");

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub delivery: DeliveryConfig,
    pub policy: PolicyConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub ws: WsConfig,
    pub wkproto: WkprotoConfig,
    pub api: ApiConfig,
    pub webhook: WebhookConfig,
    pub limits: Limits,
    pub cluster: ClusterConfig,
}

/// Running as a node of a cluster on NATS JetStream (`[cluster]`): every
/// commit is appended to a partition's replicated log before it is
/// acknowledged, and the node's store is rebuilt from the log. Off (a
/// single node, nothing of NATS) while `nats_urls` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The NATS servers to connect to (`nats://host:port`); empty: off.
    pub nats_urls: Vec<String>,
    /// This node's id, unique in the cluster, 1 or more.
    pub node_id: u32,
    /// Every node's id; empty: this node alone.
    pub nodes: Vec<u32>,
    /// The number of partitions, fixed when the cluster is created.
    pub partitions: u32,
    /// The JetStream stream holding the log, and its subjects' prefix.
    pub stream: String,
    pub subject_prefix: String,
    /// Create the stream, with this many replicas, when it is missing.
    pub create_stream: bool,
    pub replicas: usize,
    /// How long an append may wait for the stream's acknowledgement before
    /// it is retried.
    pub ack_timeout_ms: u64,
    /// How long a node keeps trying, at start, to connect and to find (or
    /// create) the stream: the NATS servers may be starting with it.
    pub connect_timeout_ms: u64,
    /// The longest pause between retries of an append not known to be
    /// stored (the pauses double from 10 ms).
    pub retry_pause_max_ms: u64,
    /// While a commit has waited this long for the log, new sends are
    /// refused with `ServerBusy` instead of queued behind it.
    pub unavailable_after_ms: u64,
    /// The largest log record; a commit's share of a partition is split
    /// into records of at most this size. At most the NATS servers'
    /// `max_payload` less 4 KiB of headers (checked at start).
    pub record_max_bytes: usize,
    /// How many records one read of the log asks for when catching up.
    pub read_batch_records: usize,
    /// Writes to channels another node owns are forwarded to it as NATS
    /// requests on `forward_prefix.<partition>`, which only the owner
    /// serves. Must not overlap `subject_prefix`.
    pub forward_prefix: String,
    /// How long a forwarded write waits for the owner's answer before it is
    /// refused as retryable (a client's resend is idempotent).
    pub forward_timeout_ms: u64,
    /// Records of the partitions other nodes own that may wait, read from
    /// the log, for a shard to apply them; more slow the reading down.
    pub follow_buffer_records: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats_urls: Vec::new(),
            node_id: 1,
            nodes: Vec::new(),
            partitions: 64,
            stream: "RUYI_LOG".into(),
            subject_prefix: "ruyi.log".into(),
            create_stream: true,
            replicas: 3,
            ack_timeout_ms: 2000,
            connect_timeout_ms: 5000,
            retry_pause_max_ms: 1000,
            unavailable_after_ms: 1000,
            record_max_bytes: 1024 * 1024 - 4096,
            read_batch_records: 256,
            forward_prefix: "ruyi.fwd".into(),
            forward_timeout_ms: 5000,
            follow_buffer_records: 1024,
        }
    }
}

impl ClusterConfig {
    /// Whether this server runs as a node of a cluster.
    pub fn enabled(&self) -> bool {
        !self.nats_urls.is_empty()
    }

    /// Every node's id (this node alone when `nodes` is empty).
    pub fn node_ids(&self) -> Vec<u32> {
        if self.nodes.is_empty() {
            vec![self.node_id]
        } else {
            self.nodes.clone()
        }
    }

    /// The subject of `partition`'s log.
    pub fn subject(&self, partition: u32) -> String {
        format!("{}.{partition}", self.subject_prefix)
    }

    /// The subject writes to `partition` are forwarded on.
    pub fn forward_subject(&self, partition: u32) -> String {
        format!("{}.{partition}", self.forward_prefix)
    }

    /// The partition of a log subject (`subject_prefix.<partition>`).
    pub fn partition_of_subject(&self, subject: &str) -> Option<u32> {
        subject
            .strip_prefix(self.subject_prefix.as_str())?
            .strip_prefix('.')?
            .parse()
            .ok()
            .filter(|p| *p < self.partitions)
    }
}

/// The WebSocket listener (`[ws]`): the binary protocol in WebSocket
/// binary messages, for browsers. Off while `listen` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    pub listen: String,
    pub path: String,
    pub allowed_origins: Vec<String>,
    pub trusted_proxies: Vec<String>,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            listen: String::new(),
            path: "/".into(),
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
        }
    }
}

/// WuKongIM's binary protocol (`[wkproto]`), so WuKongIM apps connect
/// unchanged: a TCP listener and a WebSocket one, each off while empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WkprotoConfig {
    pub listen: String,
    pub ws_listen: String,
    /// The path WebSocket clients upgrade on; empty: any path (as
    /// WuKongIM does).
    pub ws_path: String,
    /// The node id CONNACK reports to clients of version 4 and later.
    pub node_id: u64,
    /// What `GET /route` answers (`host:port`, `ws://…`, `wss://…`);
    /// empty: the listener's own address.
    pub route_tcp_addr: String,
    pub route_ws_addr: String,
    pub route_wss_addr: String,
}

impl Default for WkprotoConfig {
    fn default() -> Self {
        WkprotoConfig {
            listen: String::new(),
            ws_listen: String::new(),
            ws_path: String::new(),
            node_id: 1,
            route_tcp_addr: String::new(),
            route_ws_addr: String::new(),
            route_wss_addr: String::new(),
        }
    }
}

impl WkprotoConfig {
    /// Where the TCP listener binds, when it is on.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }

    /// Where the WebSocket listener binds, when it is on.
    pub fn ws_listen_addr(&self) -> Option<SocketAddr> {
        self.ws_listen.parse().ok()
    }

    /// The WebSocket settings of its listener: `[ws]`'s origins and
    /// proxies, its own path.
    pub fn ws_config(&self, ws: &WsConfig) -> WsConfig {
        WsConfig {
            listen: self.ws_listen.clone(),
            path: self.ws_path.clone(),
            ..ws.clone()
        }
    }
}

impl WsConfig {
    /// Where the listener binds, when it is on (checked by
    /// [`Config::validate`]).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        if self.listen.is_empty() {
            return None;
        }
        self.listen.parse().ok()
    }

    /// Whether `ip` is a reverse proxy whose `X-Forwarded-For` is believed.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies
            .iter()
            .any(|p| p.parse::<std::net::IpAddr>() == Ok(ip))
    }

    /// Whether an upgrade request from a page of `origin` (its `Origin`
    /// header; `None` when it sent none, as non-browser clients do) is
    /// let in.
    pub fn allows_origin(&self, origin: Option<&str>) -> bool {
        if self.allowed_origins.is_empty() {
            return true;
        }
        origin.is_some_and(|origin| {
            self.allowed_origins
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(origin))
        })
    }
}

/// TLS on the client listener (`[tls]`): on when both paths are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_path.as_os_str().is_empty()
    }
}

/// The admin HTTP API (`[api]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub token: String,
    pub open: bool,
    pub body_max_bytes: usize,
    pub request_timeout_ms: u64,
    pub system_uid: String,
    pub user_token_length_max_bytes: usize,
    /// Serve the chat demo at `/demo/` on this listener (no admin token
    /// needed for it; users log in with their own token). Needs the
    /// WebSocket listener (`ws.listen`).
    pub demo: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 5001)),
            token: String::new(),
            open: false,
            body_max_bytes: 1024 * 1024,
            request_timeout_ms: 10_000,
            system_uid: "__system".into(),
            user_token_length_max_bytes: 1024,
            demo: false,
        }
    }
}

/// Webhooks to the business server (`[webhook]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    pub url: String,
    pub events: Vec<String>,
    pub secret: String,
    pub request_timeout_ms: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub concurrency: usize,
    pub notify_batch_max_messages: usize,
    pub outbox_max_bytes: u64,
    pub late_offline_messages_max: usize,
}

/// Every event ruyi can post.
pub const WEBHOOK_EVENTS: [&str; 3] = ["msg.offline", "msg.notify", "user.onlinestatus"];

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            events: WEBHOOK_EVENTS.iter().map(|e| (*e).to_owned()).collect(),
            secret: String::new(),
            request_timeout_ms: 5000,
            retry_initial_ms: 500,
            retry_max_ms: 60_000,
            concurrency: 8,
            notify_batch_max_messages: 100,
            outbox_max_bytes: 4 * 1024 * 1024 * 1024,
            late_offline_messages_max: 100,
        }
    }
}

impl WebhookConfig {
    /// Whether webhooks are on and `event` is one of those to send.
    pub fn wants(&self, event: &str) -> bool {
        !self.url.is_empty() && self.events.iter().any(|e| e == event)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub shards: u16,
    pub pin_shards: bool,
    pub spin_before_park_us: u64,
    pub inbox_capacity_batches: usize,
    pub inbox_batch_max_messages: usize,
    pub outgoing_backlog_max_messages: usize,
    pub shutdown_drain_ms: u64,
    pub listener_release_wait_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageEngine {
    Rocksdb,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    Always,
    Interval,
    Never,
}

/// Which thread makes a commit durable when that blocks on the disk
/// (`sync = "always"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitOn {
    /// The shard's blocking-thread pool: the shard keeps serving its
    /// connections during the sync, at the cost of two thread hand-offs per
    /// commit.
    Pool,
    /// The shard's own thread: no hand-off, and what arrives during the
    /// sync waits for it and joins the next commit.
    Shard,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub engine: StorageEngine,
    pub sync: SyncMode,
    pub commit_on: CommitOn,
    pub sync_interval_ms: u64,
    pub idempotency_ttl_s: u64,
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            engine: StorageEngine::Rocksdb,
            sync: SyncMode::Always,
            commit_on: CommitOn::Shard,
            sync_interval_ms: 100,
            idempotency_ttl_s: 86_400,
            block_cache_bytes: 256 * 1024 * 1024,
            write_buffer_bytes: 64 * 1024 * 1024,
        }
    }
}

impl StorageConfig {
    /// The RocksDB store's settings.
    pub fn rocks_options(&self) -> crate::storage::rocks::RocksOptions {
        use crate::storage::SyncPolicy;
        crate::storage::rocks::RocksOptions {
            sync: match self.sync {
                SyncMode::Always => SyncPolicy::Always,
                SyncMode::Interval => SyncPolicy::Interval {
                    interval_ms: self.sync_interval_ms,
                },
                SyncMode::Never => SyncPolicy::Never,
            },
            block_cache_bytes: self.block_cache_bytes,
            write_buffer_bytes: self.write_buffer_bytes,
            idempotency_ttl_ms: self.idempotency_ttl_s.saturating_mul(1000),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub retry_interval_ms: u64,
    pub retry_backoff_percent: u64,
    pub retry_interval_max_ms: u64,
    pub retry_jitter_percent: u64,
    pub retry_attempts_max: u32,
    pub retry_tick_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            retry_interval_ms: 3000,
            retry_backoff_percent: 200,
            retry_interval_max_ms: 30_000,
            retry_jitter_percent: 20,
            retry_attempts_max: 5,
            retry_tick_ms: 100,
        }
    }
}

impl DeliveryConfig {
    pub fn retry_policy(&self) -> crate::delivery::RetryPolicy {
        crate::delivery::RetryPolicy {
            interval_ms: self.retry_interval_ms,
            backoff_percent: self.retry_backoff_percent,
            interval_max_ms: self.retry_interval_max_ms,
            jitter_percent: self.retry_jitter_percent,
            attempts_max: self.retry_attempts_max,
            tick_ms: self.retry_tick_ms,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub allowlist_for_person: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Token,
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub secret: String,
    pub leeway_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub frame_size_max_bytes: usize,
    pub payload_size_max_bytes: usize,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub heartbeat_interval_ms: u32,
    pub connections_per_shard_max: usize,
    pub unauthenticated_connections_per_shard_max: usize,
    pub accepts_per_ip_per_second: u32,
    pub frames_per_second_per_connection: u32,
    pub bytes_per_second_per_connection: u64,
    pub uid_length_max_bytes: usize,
    pub device_id_length_max_bytes: usize,
    pub channel_id_length_max_bytes: usize,
    pub client_msg_no_length_max_bytes: usize,
    pub outbound_buffer_max_bytes: usize,
    pub pending_requests_per_connection_max: usize,
    pub channels_cached_per_shard_max: usize,
    pub write_stall_timeout_ms: u64,
    pub inflight_messages_max: usize,
    pub inflight_bytes_max: usize,
    pub group_members_max: usize,
    pub sync_limit_max: u32,
    pub sync_response_max_bytes: usize,
    pub read_chunk_bytes: usize,
    pub close_flush_timeout_ms: u64,
    pub listen_backlog: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 5100)),
            data_dir: PathBuf::from("./data"),
            shards: 0,
            pin_shards: true,
            spin_before_park_us: 0,
            inbox_capacity_batches: 256,
            inbox_batch_max_messages: 1024,
            outgoing_backlog_max_messages: 65536,
            shutdown_drain_ms: 2000,
            listener_release_wait_ms: 5000,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Token,
            secret: String::new(),
            leeway_s: 30,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_size_max_bytes: 65536,
            payload_size_max_bytes: 61440,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 90_000,
            heartbeat_interval_ms: 30_000,
            connections_per_shard_max: 500_000,
            unauthenticated_connections_per_shard_max: 10_000,
            accepts_per_ip_per_second: 200,
            frames_per_second_per_connection: 2000,
            bytes_per_second_per_connection: 2 * 1024 * 1024,
            uid_length_max_bytes: 64,
            device_id_length_max_bytes: 64,
            channel_id_length_max_bytes: 64,
            client_msg_no_length_max_bytes: 64,
            outbound_buffer_max_bytes: 4 * 1024 * 1024,
            pending_requests_per_connection_max: 1024,
            channels_cached_per_shard_max: 100_000,
            write_stall_timeout_ms: 30_000,
            inflight_messages_max: 256,
            inflight_bytes_max: 1024 * 1024,
            group_members_max: 10_000,
            sync_limit_max: 1000,
            sync_response_max_bytes: 1024 * 1024,
            read_chunk_bytes: 65536,
            close_flush_timeout_ms: 2000,
            listen_backlog: 1024,
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file; settings it leaves out keep their defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// The number of shards to run: the configured count, or one per
    /// available CPU when it is 0.
    pub fn shard_count(&self) -> u16 {
        if self.server.shards > 0 {
            return self.server.shards;
        }
        std::thread::available_parallelism()
            .map(|n| n.get().min(usize::from(u16::MAX)) as u16)
            .unwrap_or(1)
    }

    /// Checks every value and the relations between limits. Returns all
    /// problems at once, one per line.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };
        let s = &self.server;
        let l = &self.limits;
        let ws = &self.ws;
        let wk = &self.wkproto;
        for (name, value) in [("listen", &wk.listen), ("ws_listen", &wk.ws_listen)] {
            check(
                value.is_empty() || value.parse::<SocketAddr>().is_ok(),
                format!(
                    "wkproto.{name} = {value:?} is not an address (host:port), nor empty (off)"
                ),
            );
        }
        for (name, value, scheme) in [
            ("route_ws_addr", &wk.route_ws_addr, "ws://"),
            ("route_wss_addr", &wk.route_wss_addr, "wss://"),
        ] {
            check(
                value.is_empty() || value.starts_with(scheme),
                format!("wkproto.{name} = {value:?} must start with {scheme} (or be empty)"),
            );
        }
        check(
            wk.ws_path.is_empty()
                || (wk.ws_path.starts_with('/') && !wk.ws_path.contains(['?', '#', ' '])),
            format!(
                "wkproto.ws_path = {:?} must be empty (any path) or a path starting with /",
                wk.ws_path
            ),
        );
        check(
            ws.listen.is_empty() || ws.listen.parse::<SocketAddr>().is_ok(),
            format!(
                "ws.listen = {:?} is not an address (host:port), nor empty (off)",
                ws.listen
            ),
        );
        check(
            ws.trusted_proxies
                .iter()
                .all(|p| p.parse::<std::net::IpAddr>().is_ok()),
            "ws.trusted_proxies must be IP addresses".into(),
        );
        check(
            ws.path.starts_with('/') && !ws.path.contains(['?', '#', ' ']),
            format!("ws.path = {:?} must be a path starting with /", ws.path),
        );
        check(
            ws.allowed_origins
                .iter()
                .all(|o| (o.starts_with("http://") || o.starts_with("https://")) && !o.ends_with('/')),
            "ws.allowed_origins must be origins like \"https://chat.example.com\" (scheme, host, optional port; no path)".into(),
        );
        check(
            s.shards <= 1024,
            format!("server.shards = {} exceeds 1024", s.shards),
        );
        check(
            s.inbox_capacity_batches >= 2,
            "server.inbox_capacity_batches must be at least 2".into(),
        );
        check(
            s.inbox_batch_max_messages >= 1,
            "server.inbox_batch_max_messages must be at least 1".into(),
        );
        check(
            s.outgoing_backlog_max_messages >= s.inbox_batch_max_messages,
            "server.outgoing_backlog_max_messages must be at least server.inbox_batch_max_messages"
                .into(),
        );
        check(
            s.listener_release_wait_ms <= 60_000,
            "server.listener_release_wait_ms must be at most 60000".into(),
        );
        check(
            s.spin_before_park_us <= 10_000,
            "server.spin_before_park_us above 10000 wastes a CPU; use at most 10000".into(),
        );
        let st = &self.storage;
        check(
            (1..=60_000).contains(&st.sync_interval_ms),
            "storage.sync_interval_ms must be between 1 and 60000".into(),
        );
        check(
            st.idempotency_ttl_s >= 60,
            "storage.idempotency_ttl_s must be at least 60".into(),
        );
        check(
            st.block_cache_bytes >= 1024 * 1024,
            "storage.block_cache_bytes must be at least 1 MiB".into(),
        );
        check(
            st.write_buffer_bytes >= 1024 * 1024,
            "storage.write_buffer_bytes must be at least 1 MiB".into(),
        );
        let t = &self.tls;
        check(
            t.cert_path.as_os_str().is_empty() == t.key_path.as_os_str().is_empty(),
            "tls.cert_path and tls.key_path must both be set (TLS on) or both be empty".into(),
        );
        let a = &self.api;
        if a.enabled {
            check(
                !a.token.is_empty() || a.open,
                "api.token is empty: set api.token (or --api-token, or RUYI_API_TOKEN), or \
                 api.open = true on a loopback api.listen, or api.enabled = false"
                    .into(),
            );
            check(
                !a.open || a.listen.ip().is_loopback(),
                format!(
                    "api.open = true is only allowed on a loopback address, not {}",
                    a.listen
                ),
            );
            check(
                a.listen.port() == 0 || !crate::listener::overlaps(a.listen, s.listen),
                format!(
                    "api.listen = {} and server.listen = {} are the same address",
                    a.listen, s.listen
                ),
            );
            check(
                (1024..=64 * 1024 * 1024).contains(&a.body_max_bytes),
                "api.body_max_bytes must be between 1024 and 67108864".into(),
            );
            check(
                a.request_timeout_ms >= 100,
                "api.request_timeout_ms must be at least 100".into(),
            );
            check(
                crate::channel::valid_uid(&a.system_uid, self.limits.uid_length_max_bytes),
                "api.system_uid must be a valid uid".into(),
            );
            // A registered token is sent in a Connect frame, with the uid
            // and the device id.
            let connect_room = self.limits.frame_size_max_bytes.saturating_sub(
                256 + self.limits.uid_length_max_bytes + self.limits.device_id_length_max_bytes,
            );
            check(
                (1..=connect_room).contains(&a.user_token_length_max_bytes),
                format!(
                    "api.user_token_length_max_bytes = {} must be between 1 and what a Connect \
                     frame leaves room for (limits.frame_size_max_bytes - 256 - \
                     limits.uid_length_max_bytes - limits.device_id_length_max_bytes = {connect_room})",
                    a.user_token_length_max_bytes
                ),
            );
        }
        check(
            !a.demo || (a.enabled && !ws.listen.is_empty()),
            "api.demo = true needs the admin API (api.enabled) to serve the page and the \
             WebSocket listener (ws.listen) for it to connect to"
                .into(),
        );
        let w = &self.webhook;
        check(
            w.url.is_empty() || w.url.starts_with("http://") || w.url.starts_with("https://"),
            format!(
                "webhook.url = {:?} must start with http:// or https://",
                w.url
            ),
        );
        for event in &w.events {
            check(
                WEBHOOK_EVENTS.contains(&event.as_str()),
                format!(
                    "webhook.events: unknown event {event:?}; known: {}",
                    WEBHOOK_EVENTS.join(", ")
                ),
            );
        }
        check(
            w.url.is_empty() || !w.secret.is_empty(),
            "webhook.secret must be set when webhook.url is (receivers verify signatures with it)"
                .into(),
        );
        check(
            w.request_timeout_ms >= 100,
            "webhook.request_timeout_ms must be at least 100".into(),
        );
        check(
            w.retry_initial_ms >= 10 && w.retry_initial_ms <= w.retry_max_ms,
            "webhook.retry_initial_ms must be at least 10 and at most webhook.retry_max_ms".into(),
        );
        check(
            (1..=1024).contains(&w.concurrency),
            "webhook.concurrency must be between 1 and 1024".into(),
        );
        check(
            (1..=10_000).contains(&w.notify_batch_max_messages),
            "webhook.notify_batch_max_messages must be between 1 and 10000".into(),
        );
        check(
            w.late_offline_messages_max <= 10_000,
            "webhook.late_offline_messages_max must be at most 10000".into(),
        );
        check(
            w.outbox_max_bytes >= 1024 * 1024,
            "webhook.outbox_max_bytes must be at least 1 MiB".into(),
        );
        let c = &self.cluster;
        if c.enabled() {
            check(
                c.nats_urls
                    .iter()
                    .all(|u| !u.is_empty() && !u.contains(char::is_whitespace)),
                "cluster.nats_urls must be NATS server URLs (nats://host:port)".into(),
            );
            check(
                (1..=crate::cluster::partition::NODE_ID_MAX).contains(&c.node_id),
                format!(
                    "cluster.node_id must be between 1 and {}",
                    crate::cluster::partition::NODE_ID_MAX
                ),
            );
            let nodes = c.node_ids();
            check(
                nodes.contains(&c.node_id),
                format!(
                    "cluster.nodes = {:?} must list this node (cluster.node_id = {})",
                    c.nodes, c.node_id
                ),
            );
            let mut sorted = nodes.clone();
            sorted.sort_unstable();
            sorted.dedup();
            check(
                sorted.len() == nodes.len(),
                "cluster.nodes lists a node twice".into(),
            );
            check(
                (1..=65_536).contains(&c.partitions),
                "cluster.partitions must be between 1 and 65536".into(),
            );
            check(
                !c.stream.is_empty()
                    && c.stream
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-'),
                format!(
                    "cluster.stream = {:?} must be a stream name (letters, digits, _ and -)",
                    c.stream
                ),
            );
            let plain_subject = |s: &str| {
                !s.is_empty()
                    && s.split('.').all(|token| {
                        !token.is_empty()
                            && !token.contains(['*', '>'])
                            && !token.contains(char::is_whitespace)
                    })
            };
            check(
                plain_subject(&c.subject_prefix),
                format!(
                    "cluster.subject_prefix = {:?} must be a subject without wildcards",
                    c.subject_prefix
                ),
            );
            check(
                (1..=5).contains(&c.replicas),
                "cluster.replicas must be between 1 and 5".into(),
            );
            check(
                c.ack_timeout_ms >= 100,
                "cluster.ack_timeout_ms must be at least 100".into(),
            );
            check(
                c.connect_timeout_ms >= 100,
                "cluster.connect_timeout_ms must be at least 100".into(),
            );
            check(
                (10..=60_000).contains(&c.retry_pause_max_ms),
                "cluster.retry_pause_max_ms must be between 10 and 60000".into(),
            );
            check(
                c.unavailable_after_ms >= 10,
                "cluster.unavailable_after_ms must be at least 10".into(),
            );
            let one_message = l.payload_size_max_bytes + 4 * l.uid_length_max_bytes + 1024;
            check(
                c.record_max_bytes >= one_message,
                format!(
                    "cluster.record_max_bytes = {} must hold a message of \
                     limits.payload_size_max_bytes with its rows (at least {one_message})",
                    c.record_max_bytes
                ),
            );
            check(
                (1..=10_000).contains(&c.read_batch_records),
                "cluster.read_batch_records must be between 1 and 10000".into(),
            );
            let overlaps = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}."));
            check(
                plain_subject(&c.forward_prefix)
                    && !overlaps(&c.forward_prefix, &c.subject_prefix)
                    && !overlaps(&c.subject_prefix, &c.forward_prefix),
                format!(
                    "cluster.forward_prefix = {:?} must be a subject without wildcards \
                     that does not overlap cluster.subject_prefix",
                    c.forward_prefix
                ),
            );
            check(
                (100..=600_000).contains(&c.forward_timeout_ms),
                "cluster.forward_timeout_ms must be between 100 and 600000".into(),
            );
            check(
                (1..=1_000_000).contains(&c.follow_buffer_records),
                "cluster.follow_buffer_records must be between 1 and 1000000".into(),
            );
        }
        let d = &self.delivery;
        check(
            (10..=d.retry_interval_ms).contains(&d.retry_tick_ms),
            "delivery.retry_tick_ms must be at least 10 and at most delivery.retry_interval_ms"
                .into(),
        );
        check(
            d.retry_interval_ms <= d.retry_interval_max_ms,
            "delivery.retry_interval_ms must be at most delivery.retry_interval_max_ms".into(),
        );
        check(
            (100..=1000).contains(&d.retry_backoff_percent),
            "delivery.retry_backoff_percent must be between 100 and 1000".into(),
        );
        check(
            d.retry_jitter_percent <= 50,
            "delivery.retry_jitter_percent must be at most 50".into(),
        );
        if self.auth.mode == AuthMode::Token {
            // Without a secret the only tokens are those registered through
            // the admin API, so it must be on.
            check(
                !self.auth.secret.is_empty() || self.api.enabled,
                "auth.mode = \"token\" needs auth.secret (or --auth-secret, or RUYI_AUTH_SECRET) \
                 for signed tokens, or the admin API (api.enabled) for registered tokens; \
                 set auth.mode = \"off\" only for development"
                    .into(),
            );
        }
        check(
            (256..=16 * 1024 * 1024).contains(&l.frame_size_max_bytes),
            format!(
                "limits.frame_size_max_bytes = {} must be between 256 and 16777216",
                l.frame_size_max_bytes
            ),
        );
        let frame_overhead_bytes = 256
            + l.uid_length_max_bytes
            + l.channel_id_length_max_bytes
            + l.client_msg_no_length_max_bytes;
        check(
            l.payload_size_max_bytes + frame_overhead_bytes <= l.frame_size_max_bytes,
            format!(
                "limits.payload_size_max_bytes = {} leaves no room for the other fields of a frame \
                 (at most frame_size_max_bytes - {frame_overhead_bytes} = {})",
                l.payload_size_max_bytes,
                l.frame_size_max_bytes.saturating_sub(frame_overhead_bytes)
            ),
        );
        check(
            l.handshake_timeout_ms >= 100,
            "limits.handshake_timeout_ms must be at least 100".into(),
        );
        check(
            u64::from(l.heartbeat_interval_ms) * 2 <= l.idle_timeout_ms,
            format!(
                "limits.heartbeat_interval_ms = {} must be at most half of limits.idle_timeout_ms = {}",
                l.heartbeat_interval_ms, l.idle_timeout_ms
            ),
        );
        check(
            l.heartbeat_interval_ms >= 100,
            "limits.heartbeat_interval_ms must be at least 100".into(),
        );
        check(
            l.connections_per_shard_max >= 1,
            "limits.connections_per_shard_max must be at least 1".into(),
        );
        check(
            l.unauthenticated_connections_per_shard_max >= 1,
            "limits.unauthenticated_connections_per_shard_max must be at least 1".into(),
        );
        check(
            l.bytes_per_second_per_connection == 0
                || l.bytes_per_second_per_connection >= l.frame_size_max_bytes as u64,
            "limits.bytes_per_second_per_connection must be 0 (unlimited) or at least \
             limits.frame_size_max_bytes"
                .into(),
        );
        for (name, value) in [
            ("uid_length_max_bytes", l.uid_length_max_bytes),
            ("device_id_length_max_bytes", l.device_id_length_max_bytes),
            ("channel_id_length_max_bytes", l.channel_id_length_max_bytes),
            (
                "client_msg_no_length_max_bytes",
                l.client_msg_no_length_max_bytes,
            ),
        ] {
            check(
                (1..=1024).contains(&value),
                format!("limits.{name} = {value} must be between 1 and 1024"),
            );
        }
        check(
            l.outbound_buffer_max_bytes >= l.frame_size_max_bytes * 2,
            "limits.outbound_buffer_max_bytes must hold at least two maximum-size frames".into(),
        );
        check(
            l.outbound_buffer_max_bytes >= 2 * (l.sync_response_max_bytes + l.frame_size_max_bytes),
            "limits.outbound_buffer_max_bytes must be at least twice limits.sync_response_max_bytes \
             + limits.frame_size_max_bytes (a connection stops being read at half of it, and one \
             more answer must fit)"
                .into(),
        );
        check(
            l.pending_requests_per_connection_max >= 1,
            "limits.pending_requests_per_connection_max must be at least 1".into(),
        );
        check(
            l.channels_cached_per_shard_max >= 16,
            "limits.channels_cached_per_shard_max must be at least 16".into(),
        );
        check(
            l.inflight_messages_max >= 1,
            "limits.inflight_messages_max must be at least 1".into(),
        );
        check(
            l.inflight_bytes_max >= l.payload_size_max_bytes,
            "limits.inflight_bytes_max must hold at least one maximum-size payload".into(),
        );
        check(
            l.write_stall_timeout_ms >= 100,
            "limits.write_stall_timeout_ms must be at least 100".into(),
        );
        check(
            l.group_members_max >= 2,
            "limits.group_members_max must be at least 2".into(),
        );
        check(
            l.read_chunk_bytes >= 4096,
            "limits.read_chunk_bytes must be at least 4096".into(),
        );
        check(
            (1..=100_000).contains(&l.sync_limit_max),
            "limits.sync_limit_max must be between 1 and 100000".into(),
        );
        check(
            l.sync_response_max_bytes >= l.frame_size_max_bytes,
            "limits.sync_response_max_bytes must be at least limits.frame_size_max_bytes".into(),
        );
        check(
            l.listen_backlog >= 1,
            "limits.listen_backlog must be at least 1".into(),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_example_is_exactly_the_default() {
        let parsed = Config::parse(DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn default_refuses_the_api_without_a_token_and_token_auth_without_any_source_of_tokens() {
        let err = Config::default().validate().unwrap_err().to_string();
        assert!(err.contains("api.token"), "{err}");
        let mut config = Config::default();
        config.api.token = "t".into();
        // Registered tokens only.
        config.validate().unwrap();
        config.api.enabled = false;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("auth.secret"), "{err}");
        config.auth.secret = "s".into();
        config.validate().unwrap();
    }

    #[test]
    fn an_open_api_is_only_allowed_on_loopback() {
        let mut config = Config::default();
        config.auth.secret = "s".into();
        config.api.open = true;
        config.validate().unwrap();
        config.api.listen = "0.0.0.0:5001".parse().unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("loopback"), "{err}");
    }

    #[test]
    fn the_admin_api_and_the_client_listener_need_different_addresses() {
        let mut config = Config::default();
        config.auth.secret = "s".into();
        config.api.token = "t".into();
        config.api.listen = "127.0.0.1:5100".parse().unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("api.listen"), "{err}");
        config.api.listen = "127.0.0.1:5101".parse().unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn webhooks_need_a_known_event_an_http_url_and_a_secret() {
        let mut config = Config::default();
        config.auth.secret = "s".into();
        config.api.token = "t".into();
        config.webhook.url = "ftp://example".into();
        config.webhook.events = vec!["msg.unknown".into()];
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("webhook.url"), "{err}");
        assert!(err.contains("msg.unknown"), "{err}");
        assert!(err.contains("webhook.secret"), "{err}");
    }

    #[test]
    fn unknown_settings_are_rejected_by_name() {
        let err = Config::parse("[limits]\nframe_size_max = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("frame_size_max"), "{err}");
    }

    #[test]
    fn related_limits_are_checked_together() {
        let mut config = Config::default();
        config.auth.mode = AuthMode::Off;
        config.limits.payload_size_max_bytes = config.limits.frame_size_max_bytes;
        config.limits.heartbeat_interval_ms = 60_000;
        config.api.user_token_length_max_bytes = config.limits.frame_size_max_bytes;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("payload_size_max_bytes"), "{err}");
        assert!(err.contains("heartbeat_interval_ms"), "{err}");
        assert!(err.contains("user_token_length_max_bytes"), "{err}");
    }

    #[test]
    fn a_cluster_needs_this_node_listed_partitions_plain_subjects_and_room_for_a_message() {
        let mut config = Config::default();
        config.auth.secret = "s".into();
        config.api.token = "t".into();
        config.cluster.nats_urls = vec!["nats://127.0.0.1:4222".into()];
        config.validate().unwrap();
        assert_eq!(config.cluster.subject(7), "ruyi.log.7");
        config.cluster.nodes = vec![2, 3];
        config.cluster.partitions = 0;
        config.cluster.subject_prefix = "ruyi.*".into();
        config.cluster.record_max_bytes = 1024;
        let err = config.validate().unwrap_err().to_string();
        for name in [
            "cluster.nodes",
            "cluster.partitions",
            "cluster.subject_prefix",
            "cluster.record_max_bytes",
        ] {
            assert!(err.contains(name), "{name}: {err}");
        }
        // Several nodes, whose ids fit the message ids' node bits, with a
        // forward subject apart from the log's.
        config.cluster = ClusterConfig {
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            nodes: vec![1, 2, 3],
            ..ClusterConfig::default()
        };
        config.validate().unwrap();
        config.cluster.node_id = 32;
        config.cluster.nodes = vec![1, 32];
        config.cluster.forward_prefix = "ruyi.log.fwd".into();
        config.cluster.forward_timeout_ms = 10;
        let err = config.validate().unwrap_err().to_string();
        for name in [
            "cluster.node_id must be between 1 and 31",
            "cluster.forward_prefix",
            "cluster.forward_timeout_ms",
        ] {
            assert!(err.contains(name), "{name}: {err}");
        }
        // Off: nothing of it is checked.
        config.cluster.nats_urls.clear();
        config.validate().unwrap();
    }
}
