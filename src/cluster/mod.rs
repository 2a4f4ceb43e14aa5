//! Running several ruyi nodes as one cluster on NATS JetStream (issue 15),
//! built in steps. So far: [`log`], the fenced append of a partition's
//! commit batch to its replicated log; [`record`], the versioned format of
//! what one append carries; [`apply`], applying a partition's log to a
//! node's own store once per record; [`partition`], which partition a
//! channel belongs to and the static map of partitions to (node, shard);
//! and [`bridge`], the thread running the NATS client that shards hand a
//! tick's appends to; [`lease`], which node owns each partition (leases
//! and claims, and moving partitions when a node dies or returns). A
//! server with `[cluster]` on commits through it
//! (`crate::shard::log`); a single node uses none of it.

pub mod apply;
pub mod bridge;
pub mod forward;
pub mod lease;
pub mod log;
pub mod partition;
pub mod record;
