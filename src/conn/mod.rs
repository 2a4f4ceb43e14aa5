//! Connections: from accept to deregistration.
//!
//! The lifecycle, with the real names: the shard's accept loop
//! (`shard::runtime`) takes a socket from the listening socket that every
//! shard shares (see [`crate::listener`]) and registers it with
//! [`ShardState::accept`](crate::shard::state::ShardState::accept) under
//! `connections_per_shard_max`; `driver::drive` then runs one task
//! per connection that reads big chunks, hands every complete frame to the
//! shard, and writes everything queued in the connection's
//! [`outbox::Outbox`] with one `send` per wake-up. The protocol phases
//! (handshake under a timeout, joining, active, closing) are in
//! [`session`]. When the task ends it reports why, and the shard
//! deregisters the connection and tells every other shard it went offline.

pub mod driver;
pub mod limit;
pub mod outbox;
pub mod session;
pub mod ws;
