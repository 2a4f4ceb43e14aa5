//! ruyi: an instant-messaging gateway, thread-per-core on io_uring.
//!
//! Clients hold long-lived TCP connections and speak a FlatBuffers protocol
//! (`schemas/ruyi.fbs`). Each message a client sends is sequenced by the
//! channel's owner shard, stored, acknowledged, and delivered to every device
//! of every member of the channel, in order.
//!
//! The modules, from the wire inwards:
//!
//! - [`protocol`]: generated FlatBuffers code, length-prefixed framing,
//!   verification with explicit limits, owned packets and reason codes. No
//!   runtime, no storage.
//! - [`conn`]: one connection's life: accept under a limit, the session
//!   phases (handshake, joining, active, closing), and the task that reads
//!   big chunks and writes each tick's frames in one `send`.
//! - [`shard`]: one pinned glommio executor per CPU. A shard owns the
//!   connections it accepted and the channels that hash to it; shards talk
//!   only through bounded SPSC inboxes that carry batches of one typed
//!   message enum. Presence (which user is online on which shard) is
//!   broadcast, so the send path never waits on another shard.
//! - [`key`]: a channel's identity and routing (`shard = hash(channel) %
//!   shards`), below both the channel logic and storage; [`channel`]:
//!   sequencing with no gaps, membership.
//! - [`delivery`]: what a shard pushed to its connections and not yet had
//!   acknowledged: one entry and one timer per (connection, message) on a
//!   hashed timer wheel, retried with backoff until acknowledged.
//! - [`storage`]: the batch-oriented storage seam (one commit per shard
//!   tick), the RocksDB store (the default; key encodings in
//!   `storage::keys`) and the in-memory store.
//! - [`auth`]: HS256 tokens (and constant-time comparison for registered
//!   tokens); [`tls`]: rustls configurations for the listener and the SDK.
//! - [`api`]: the admin HTTP API (axum) and the control-plane thread that
//!   runs it with the [`webhook`] dispatcher; webhook events are written to
//!   a durable outbox in the commit of the message they describe.
//! - [`wkproto`]: WuKongIM's binary protocol (codec, the encryption its SDKs
//!   require, and a per-connection translator to and from ruyi's frames), so
//!   WuKongIM apps connect to the same shards unchanged.
//! - [`cluster`]: the parts of a cluster on NATS JetStream built so far
//!   (the fenced append to a partition's replicated log); not used by the
//!   single-node server yet.
//! - [`client`]: the SDK (a runtime-free protocol core and a tokio adapter)
//!   and the `ruyi client` command line.
//! - [`config`]: the one configuration tree; [`server`]: start and stop;
//!   [`listener`]: one listening socket per address, shared by the shards,
//!   refused when another process listens there.
//! - [`ids`] and [`time`]: id newtypes and injected time.
//! - [`system`]: checks of the machine (`ruyi check-system`).

pub mod api;
pub mod auth;
pub mod channel;
pub mod client;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod ids;
pub mod key;
pub mod listener;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod storage;
pub mod system;
pub mod time;
pub mod tls;
pub mod webhook;
pub mod wkproto;

pub use config::Config;
pub use server::{Control, Server, ServerHandle};
