//! Running several ruyi nodes as one cluster on NATS JetStream (issue 15),
//! built in steps. So far: [`log`], the fenced append of a partition's
//! commit batch to its replicated log. Nothing in the single-node server
//! uses this module yet.

pub mod log;
