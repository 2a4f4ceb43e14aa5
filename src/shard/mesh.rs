//! The inbox mesh: for every ordered pair of distinct shards, one bounded
//! SPSC queue. Built on the starting thread and handed out before any
//! executor runs, so shard N's ends are known to be shard N's (glommio's own
//! `channel_mesh` numbers peers by executor id, which races when several
//! servers start in one process).

use super::message::Batch;
use crate::ids::ShardId;
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};

/// One shard's ends of the mesh: `senders[j]` feeds shard j's inbox from
/// this shard, `receivers[j]` is this shard's inbox from shard j. The entry
/// for the shard itself is `None`: local work never goes through a queue.
pub struct MeshEnds {
    pub shard: ShardId,
    pub senders: Vec<Option<SharedSender<Batch>>>,
    pub receivers: Vec<Option<SharedReceiver<Batch>>>,
}

/// Builds the mesh for `shards` shards with `capacity` batches per queue.
pub fn build(shards: u16, capacity: usize) -> Vec<MeshEnds> {
    let n = usize::from(shards);
    let mut ends: Vec<MeshEnds> = (0..shards)
        .map(|i| MeshEnds {
            shard: ShardId(i),
            senders: (0..n).map(|_| None).collect(),
            receivers: (0..n).map(|_| None).collect(),
        })
        .collect();
    for from in 0..n {
        for to in 0..n {
            if from != to {
                let (sender, receiver) = shared_channel::new_bounded(capacity);
                ends[from].senders[to] = Some(sender);
                ends[to].receivers[from] = Some(receiver);
            }
        }
    }
    ends
}
