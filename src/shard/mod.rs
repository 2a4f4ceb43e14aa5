//! Shards: one glommio executor pinned to one CPU each, owning the
//! connections it accepted and the channels that hash to it.
//!
//! - [`state::ShardState`] is the shard's logic without I/O: a dispatcher
//!   over components that each own their data (`sessions`, `presence`,
//!   `channels`, `commit`, `pushes`, with `reads`, `login` and `webhooks`);
//!   it calls them, they never call each other.
//! - [`message::ShardMsg`] is the one enum of cross-shard messages.
//! - [`mesh`] builds the inboxes: one bounded single-producer
//!   single-consumer queue (glommio `shared_channel`) per ordered pair of
//!   shards, carrying batches. A full inbox is backpressure.
//! - [`runtime`] runs a shard: its accept loop, one receiver task per inbox,
//!   one flusher task per outgoing inbox, the commit task (group commit: all
//!   sends that arrived in one tick share one storage batch) and the sweeper
//!   for timeouts.

pub mod api;
pub mod budget;
mod channels;
mod commit;
pub mod log;
mod login;
pub mod mesh;
pub mod message;
pub mod message_ids;
pub mod notify;
mod presence;
mod pushes;
mod reads;
mod remote;
pub mod runtime;
mod sessions;
pub mod state;
pub mod versions;
mod webhooks;
