//! Partitions: the unit of ownership in a cluster. A channel belongs to one
//! of a fixed number of partitions, chosen when the cluster is created, and
//! each partition is owned by one (node, shard) at a time; its log is one
//! subject of the replicated stream.
//!
//! The partition hash must give the same answer on every node, whatever
//! its CPU, build or version: it is xxh3-64, a specified hash, of the
//! channel's kind and id. (The shard routing inside one process,
//! [`ChannelKey::shard`], uses ahash, whose output is not promised stable
//! across machines or versions, so it must never decide partitions.)
//!
//! [`PartitionMap`] is the static assignment, the cluster's first step
//! before leases: partitions are dealt round-robin over the nodes in id
//! order, then over each node's shards.

use crate::ids::ShardId;
use crate::key::ChannelKey;

/// The partition of `key` among `partitions` (which must not be 0).
pub fn partition_of(key: &ChannelKey, partitions: u32) -> u32 {
    debug_assert!(partitions > 0);
    let id = key.id().as_bytes();
    let mut bytes = Vec::with_capacity(1 + id.len());
    bytes.push(key.kind().0);
    bytes.extend_from_slice(id);
    let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
    (hash % u64::from(partitions.max(1))) as u32
}

/// The most nodes a cluster's ids tell apart (node ids 1 to 31), and the
/// most shards a cluster node runs: message ids have 10 bits for their
/// issuer (see [`crate::shard::state::MessageIdGenerator`]).
pub const NODE_ID_MAX: u32 = 31;
pub const NODE_SHARDS_MAX: u16 = 32;

/// The 10-bit issuer tag of the ids a cluster node's shard hands out: the
/// node in the top 5 bits, the shard in the low 5, so ids of different
/// nodes never collide.
pub fn id_tag(node: u32, shard: ShardId) -> u16 {
    debug_assert!((1..=NODE_ID_MAX).contains(&node) && shard.0 < NODE_SHARDS_MAX);
    (((node & 31) as u16) << 5) | (shard.0 & 31)
}

/// One node of the cluster as the map sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSpec {
    pub node: u32,
    pub shards: u16,
}

/// The (node, shard) that owns a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner {
    pub node: u32,
    pub shard: ShardId,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("a cluster needs at least one partition")]
    NoPartitions,
    #[error("a cluster needs at least one node")]
    NoNodes,
    #[error("node {0} is listed twice")]
    DuplicateNode(u32),
    #[error("node {0} has no shards")]
    NoShards(u32),
}

/// A static assignment of every partition to a (node, shard).
#[derive(Debug, Clone)]
pub struct PartitionMap {
    owners: Vec<Owner>,
}

impl PartitionMap {
    pub fn new(partitions: u32, nodes: &[NodeSpec]) -> Result<PartitionMap, MapError> {
        if partitions == 0 {
            return Err(MapError::NoPartitions);
        }
        if nodes.is_empty() {
            return Err(MapError::NoNodes);
        }
        let mut nodes = nodes.to_vec();
        nodes.sort_by_key(|n| n.node);
        for pair in nodes.windows(2) {
            if pair[0].node == pair[1].node {
                return Err(MapError::DuplicateNode(pair[0].node));
            }
        }
        if let Some(n) = nodes.iter().find(|n| n.shards == 0) {
            return Err(MapError::NoShards(n.node));
        }
        let count = nodes.len() as u32;
        let owners = (0..partitions)
            .map(|p| {
                let spec = nodes[(p % count) as usize];
                let round = p / count;
                Owner {
                    node: spec.node,
                    shard: ShardId((round % u32::from(spec.shards)) as u16),
                }
            })
            .collect();
        Ok(PartitionMap { owners })
    }

    pub fn partitions(&self) -> u32 {
        self.owners.len() as u32
    }

    /// The owner of `partition` (which must be below [`Self::partitions`]).
    pub fn owner(&self, partition: u32) -> Owner {
        self.owners[partition as usize]
    }

    /// The owner of `key`'s partition.
    pub fn owner_of(&self, key: &ChannelKey) -> (u32, Owner) {
        let partition = partition_of(key, self.partitions());
        (partition, self.owner(partition))
    }

    /// Where each partition lives on `node`, which runs `shards` shards:
    /// the ones it owns on the shard the map names, the ones other nodes
    /// own (it follows their logs) dealt over its shards in turn.
    pub fn places(&self, node: u32, shards: u16) -> std::sync::Arc<crate::key::Places> {
        let mut followed = 0u32;
        let places = self
            .owners
            .iter()
            .map(|owner| {
                if owner.node == node {
                    crate::key::Place {
                        shard: owner.shard,
                        owned: true,
                    }
                } else {
                    followed += 1;
                    crate::key::Place {
                        shard: ShardId(((followed - 1) % u32::from(shards)) as u16),
                        owned: false,
                    }
                }
            })
            .collect::<Vec<_>>();
        crate::key::Places::new(&places)
    }

    /// The partitions `node` owns, in order.
    pub fn partitions_of(&self, node: u32) -> impl Iterator<Item = u32> + '_ {
        (0..self.partitions()).filter(move |&p| self.owners[p as usize].node == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Uid;

    #[test]
    fn the_partition_hash_is_pinned() {
        // xxh3-64 is specified: these hold on every machine and build. A
        // change here moves channels between partitions of a running cluster.
        let alice_bob = ChannelKey::person(&Uid::new("alice"), &Uid::new("bob"));
        let hashes = [
            partition_of(&ChannelKey::group("g"), 1 << 20),
            partition_of(&ChannelKey::group("team-42"), 1 << 20),
            partition_of(&alice_bob, 1 << 20),
        ];
        assert_eq!(hashes, PINNED);
        // Kind is part of the input: a group named like a person channel is
        // another channel.
        let lookalike = ChannelKey::group("alice@bob");
        assert_ne!(
            partition_of(&lookalike, 1 << 20),
            partition_of(&alice_bob, 1 << 20)
        );
    }

    /// The same values come from the reference xxHash library (Python's
    /// `xxhash`: `xxh3_64_intdigest(bytes([kind]) + id) % 2**20`).
    const PINNED: [u32; 3] = [345_973, 864_948, 542_770];

    #[test]
    fn channels_spread_evenly_over_partitions() {
        let partitions = 64;
        let mut counts = vec![0u32; partitions as usize];
        let n = 64_000;
        for i in 0..n {
            counts[partition_of(&ChannelKey::group(&format!("group-{i}")), partitions) as usize] +=
                1;
        }
        let mean = n / partitions;
        for (p, &c) in counts.iter().enumerate() {
            // 1,000 per partition expected; 5 standard deviations is ±160.
            assert!(c.abs_diff(mean) < 160, "partition {p}: {c}");
        }
    }

    #[test]
    fn partitions_are_dealt_evenly_over_nodes_and_their_shards() {
        let nodes = [
            NodeSpec { node: 3, shards: 2 },
            NodeSpec { node: 1, shards: 2 },
            NodeSpec { node: 2, shards: 4 },
        ];
        let map = PartitionMap::new(64, &nodes).unwrap();
        assert_eq!(map.owner(0).node, 1);
        assert_eq!(map.owner(1).node, 2);
        assert_eq!(map.owner(2).node, 3);
        let mut per_node: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
        let mut per_shard: std::collections::BTreeMap<(u32, u16), u32> =
            std::collections::BTreeMap::new();
        for p in 0..64 {
            let owner = map.owner(p);
            *per_node.entry(owner.node).or_insert(0) += 1;
            *per_shard.entry((owner.node, owner.shard.0)).or_insert(0) += 1;
        }
        assert_eq!(per_node.values().copied().collect::<Vec<_>>(), [22, 21, 21]);
        for ((node, shard), count) in &per_shard {
            let shards = nodes.iter().find(|n| n.node == *node).unwrap().shards;
            let share = per_node[node] / u32::from(shards);
            assert!(
                count.abs_diff(share) <= 1,
                "node {node} shard {shard}: {count}"
            );
        }
        assert_eq!(per_shard.len(), 8, "every shard owns some");
        assert_eq!(map.partitions_of(1).count(), 22);
        let key = ChannelKey::group("g");
        assert_eq!(
            map.owner_of(&key),
            (partition_of(&key, 64), map.owner(partition_of(&key, 64)))
        );
    }

    #[test]
    fn a_node_writes_its_partitions_on_the_maps_shard_and_follows_the_rest_dealt_over_its_shards() {
        let nodes = [
            NodeSpec { node: 1, shards: 2 },
            NodeSpec { node: 2, shards: 2 },
        ];
        let map = PartitionMap::new(8, &nodes).expect("a map");
        let places = map.places(2, 2);
        let mut followed_shards = Vec::new();
        for p in 0..places.len() {
            let place = places.get(p);
            let owner = map.owner(p);
            assert_eq!(place.owned, owner.node == 2, "partition {p}");
            if place.owned {
                assert_eq!(place.shard, owner.shard, "partition {p}");
            } else {
                followed_shards.push(place.shard.0);
            }
        }
        assert_eq!(followed_shards, [0, 1, 0, 1]);
    }

    #[test]
    fn a_map_that_cannot_be_made_is_an_error() {
        let one = [NodeSpec { node: 1, shards: 1 }];
        assert_eq!(
            PartitionMap::new(0, &one).unwrap_err(),
            MapError::NoPartitions
        );
        assert_eq!(PartitionMap::new(8, &[]).unwrap_err(), MapError::NoNodes);
        assert_eq!(
            PartitionMap::new(8, &[one[0], one[0]]).unwrap_err(),
            MapError::DuplicateNode(1)
        );
        assert_eq!(
            PartitionMap::new(8, &[NodeSpec { node: 4, shards: 0 }]).unwrap_err(),
            MapError::NoShards(4)
        );
    }
}
