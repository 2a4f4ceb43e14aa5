//! A channel's key: its identity on the server and the shard that owns it.
//! Below both the channel logic and storage, which both need it.

use crate::ids::{ShardId, Uid};
use crate::protocol::ChannelType;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

/// The character that separates the two uids of a person channel's key. It
/// is not allowed in uids.
pub const PERSON_KEY_SEPARATOR: char = '@';

/// Identifies a channel on the server.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey {
    kind: ChannelType,
    id: Arc<str>,
}

impl fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.0, self.id)
    }
}

impl ChannelKey {
    /// The person channel between `a` and `b` (the same for either order).
    pub fn person(a: &Uid, b: &Uid) -> ChannelKey {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        // Built by hand: `format!` costs more than the send path's other
        // per-message work on the key.
        let mut id = String::with_capacity(low.as_str().len() + 1 + high.as_str().len());
        id.push_str(low.as_str());
        id.push(PERSON_KEY_SEPARATOR);
        id.push_str(high.as_str());
        ChannelKey {
            kind: ChannelType::Person,
            id: Arc::from(id),
        }
    }

    pub fn group(id: &str) -> ChannelKey {
        ChannelKey {
            kind: ChannelType::Group,
            id: Arc::from(id),
        }
    }

    /// Rebuilds a key from its stored parts.
    pub fn from_parts(kind: ChannelType, id: &str) -> ChannelKey {
        ChannelKey {
            kind,
            id: Arc::from(id),
        }
    }

    pub fn kind(&self) -> ChannelType {
        self.kind
    }

    /// The server-side id: the group id, or `low@high` for a person channel.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The two people of a person channel.
    pub fn person_pair(&self) -> Option<(&str, &str)> {
        if self.kind != ChannelType::Person {
            return None;
        }
        self.id.split_once(PERSON_KEY_SEPARATOR)
    }

    /// The channel id as `viewer` sees it: for a person channel, the other
    /// person's uid; for a group, the group id.
    pub fn id_seen_by<'a>(&'a self, viewer: &str) -> &'a str {
        match self.person_pair() {
            Some((low, high)) if low == viewer => high,
            Some((low, _)) => low,
            None => &self.id,
        }
    }

    /// The shard that owns this channel. The hash uses fixed seeds so every
    /// shard, every process and every restart agree.
    pub fn shard(&self, shards: u16) -> ShardId {
        debug_assert!(shards > 0);
        let mut hasher = ROUTING_HASH.build_hasher();
        self.kind.0.hash(&mut hasher);
        self.id.hash(&mut hasher);
        ShardId((hasher.finish() % u64::from(shards)) as u16)
    }
}

/// Which shard of this process owns each channel.
#[derive(Debug, Clone)]
pub enum Routing {
    /// A single node: [`ChannelKey::shard`], a hash over the shards.
    Hash { shards: u16 },
    /// A cluster node: per partition ([`crate::cluster::partition`]), the
    /// shard that owns it here or, when another node owns it, the shard
    /// that follows its log here.
    Partitions { places: std::sync::Arc<Places> },
}

/// Where a write goes (see [`Routing::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// This node's shard that owns the channel.
    Shard(ShardId),
    /// Another node owns this partition: forwarded there.
    Remote(u32),
}

/// Where a partition lives on a cluster node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The shard that writes it (owned) or applies its log (followed).
    pub shard: ShardId,
    /// Whether this node owns it: its writes are made here, not forwarded.
    pub owned: bool,
}

/// Every partition's place on a cluster node, shared by its shards and its
/// control plane. A partition's shard never changes; whether the node owns
/// it does (a takeover), and only that shard changes it: the others read
/// it to choose between handing a write to that shard and forwarding it to
/// another node, and that shard refuses (retryable) a write for a
/// partition it no longer owns.
///
/// Whether the node serves at all is its lease ([`Places::serving`]): once
/// its lease lapses another node may take its partitions over, so from
/// then on it answers nothing about them (not even a refusal, which its
/// store may no longer be current enough to give) until its lease service
/// has let every partition go and taken back those it still holds.
#[derive(Debug)]
pub struct Places {
    shards: Box<[ShardId]>,
    owned: Box<[std::sync::atomic::AtomicBool]>,
    serving: std::sync::atomic::AtomicBool,
}

impl Places {
    pub fn new(places: &[Place]) -> std::sync::Arc<Places> {
        std::sync::Arc::new(Places {
            shards: places.iter().map(|p| p.shard).collect(),
            owned: places
                .iter()
                .map(|p| std::sync::atomic::AtomicBool::new(p.owned))
                .collect(),
            serving: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// How many partitions the cluster has.
    pub fn len(&self) -> u32 {
        self.shards.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// `partition`'s place now.
    pub fn get(&self, partition: u32) -> Place {
        Place {
            shard: self.shards[partition as usize],
            owned: self.owned[partition as usize].load(std::sync::atomic::Ordering::Acquire),
        }
    }

    /// The node now owns `partition`, or no longer does (called by its
    /// shard only).
    pub fn set_owned(&self, partition: u32, owned: bool) {
        self.owned[partition as usize].store(owned, std::sync::atomic::Ordering::Release);
    }

    /// Whether the node's lease holds: false from the moment it may have
    /// lapsed until the lease service has renewed it and let go of what it
    /// no longer holds.
    pub fn serving(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The node's lease lapsed (false) or was renewed (true); called by the
    /// lease service only.
    pub fn set_serving(&self, serving: bool) {
        self.serving
            .store(serving, std::sync::atomic::Ordering::Release);
    }

    /// `key`'s partition.
    pub fn partition_of(&self, key: &ChannelKey) -> u32 {
        crate::cluster::partition::partition_of(key, self.len())
    }
}

impl Routing {
    /// The shard that owns `key` (on a cluster node: that writes it, or
    /// follows it when another node owns it).
    pub fn shard_of(&self, key: &ChannelKey) -> ShardId {
        match self {
            Routing::Hash { shards } => key.shard(*shards),
            Routing::Partitions { places } => places.get(places.partition_of(key)).shard,
        }
    }

    /// Where a write to `key` goes: to the partition's owner on another
    /// node (forwarded), or to this node's shard that owns it. One hash of
    /// the key.
    pub fn route(&self, key: &ChannelKey) -> Route {
        match self {
            Routing::Hash { shards } => Route::Shard(key.shard(*shards)),
            Routing::Partitions { places } => {
                let partition = places.partition_of(key);
                let place = places.get(partition);
                match place.owned {
                    true => Route::Shard(place.shard),
                    false => Route::Remote(partition),
                }
            }
        }
    }

    /// Whether this node takes writes to `key` now: on a cluster node, it
    /// owns the partition and its lease holds.
    pub fn serves(&self, key: &ChannelKey) -> bool {
        match self {
            Routing::Hash { .. } => true,
            Routing::Partitions { places } => {
                places.serving() && places.get(places.partition_of(key)).owned
            }
        }
    }

    /// `key`'s partition when another node owns it (its writes are
    /// forwarded there); `None` when this node does.
    pub fn remote(&self, key: &ChannelKey) -> Option<u32> {
        match self {
            Routing::Hash { .. } => None,
            Routing::Partitions { places } => {
                let partition = places.partition_of(key);
                (!places.get(partition).owned).then_some(partition)
            }
        }
    }
}

static ROUTING_HASH: ahash::RandomState = ahash::RandomState::with_seeds(
    0x7275_7969_5f73_6861,
    0x7264_5f72_6f75_7465,
    0x0123_4567_89ab_cdef,
    0xfedc_ba98_7654_3210,
);
