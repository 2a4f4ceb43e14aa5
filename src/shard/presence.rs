//! Presence: which users have devices online, on which shards and with
//! which device flags, as this shard knows it. Every shard applies every
//! shard's transitions (they are broadcast), so the send path asks its own
//! copy and never waits on another shard.

use crate::ids::{ShardId, Uid};
use smallvec::SmallVec;
use std::collections::HashMap;

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

#[derive(Default)]
pub(super) struct Presence {
    /// Online connections per user, as counts per shard.
    by_shard: FastMap<Uid, SmallVec<[(ShardId, u32); 2]>>,
    /// Online devices per user, as counts per device flag.
    by_flag: FastMap<Uid, SmallVec<[(u8, u32); 2]>>,
}

impl Presence {
    /// A connection of `uid` on `shard` came online (or went offline).
    pub fn apply(&mut self, uid: &Uid, shard: ShardId, device_flag: u8, online: bool) {
        count(&mut self.by_flag, uid, device_flag, online);
        count(&mut self.by_shard, uid, shard, online);
    }

    /// Whether `uid` has any device online anywhere.
    pub fn is_online(&self, uid: &Uid) -> bool {
        self.by_shard.contains_key(uid)
    }

    /// The shards where `uid` has a connection online.
    pub fn shards(&self, uid: &Uid) -> impl Iterator<Item = ShardId> + '_ {
        self.by_shard
            .get(uid)
            .into_iter()
            .flat_map(|shards| shards.iter().map(|(shard, _)| *shard))
    }

    /// The device flags `uid` is online with, if online.
    pub fn device_flags(&self, uid: &Uid) -> Option<Vec<u8>> {
        let flags = self.by_flag.get(uid)?;
        Some(flags.iter().map(|(flag, _)| *flag).collect())
    }

    /// `uid`'s devices online with `device_flag`, and in all.
    pub fn device_counts(&self, uid: &Uid, device_flag: u8) -> (u32, u32) {
        let devices = self.by_flag.get(uid);
        let with_flag = devices
            .and_then(|d| d.iter().find(|(flag, _)| *flag == device_flag))
            .map_or(0, |(_, count)| *count);
        let total = devices.map_or(0, |d| d.iter().map(|(_, count)| *count).sum());
        (with_flag, total)
    }
}

/// Counts one more (or one fewer) under `uid` and `slot`, dropping what
/// reaches zero.
fn count<T: PartialEq + Copy>(
    map: &mut FastMap<Uid, SmallVec<[(T, u32); 2]>>,
    uid: &Uid,
    slot: T,
    online: bool,
) {
    if online {
        let entry = map.entry(uid.clone()).or_default();
        match entry.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, count)) => *count += 1,
            None => entry.push((slot, 1)),
        }
        return;
    }
    let Some(entry) = map.get_mut(uid) else {
        return;
    };
    if let Some(position) = entry.iter().position(|(s, _)| *s == slot) {
        entry[position].1 -= 1;
        if entry[position].1 == 0 {
            entry.swap_remove(position);
        }
    }
    if entry.is_empty() {
        map.remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_online_while_any_connection_is() {
        let mut presence = Presence::default();
        let alice = Uid::new("alice");
        presence.apply(&alice, ShardId(0), 0, true);
        presence.apply(&alice, ShardId(1), 1, true);
        presence.apply(&alice, ShardId(1), 1, true);
        assert_eq!(presence.device_counts(&alice, 1), (2, 3));
        let mut shards: Vec<ShardId> = presence.shards(&alice).collect();
        shards.sort();
        assert_eq!(shards, vec![ShardId(0), ShardId(1)]);
        presence.apply(&alice, ShardId(0), 0, false);
        presence.apply(&alice, ShardId(1), 1, false);
        assert!(presence.is_online(&alice));
        assert_eq!(presence.device_flags(&alice), Some(vec![1]));
        presence.apply(&alice, ShardId(1), 1, false);
        assert!(!presence.is_online(&alice));
        assert_eq!(presence.device_flags(&alice), None);
        assert_eq!(presence.shards(&alice).count(), 0);
        // An offline transition nobody counted changes nothing.
        presence.apply(&alice, ShardId(0), 0, false);
        assert!(!presence.is_online(&alice));
    }
}
