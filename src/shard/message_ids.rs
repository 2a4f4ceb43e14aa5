//! Message ids: unique across shards and restarts, and the conversation
//! versions that sync orders changes by.

use super::versions::{VersionFrontier, VersionSlot, ID_MS_SHIFT};
use crate::ids::{MessageId, ShardId};
use crate::storage::{Mutation, ShardStore, StorageError};
use std::sync::Arc;

/// Hands out message ids unique across shards and restarts: milliseconds
/// since 2024-01-01 in the top 42 bits, the issuer's tag in the next 10 (the
/// shard; on a cluster node, the node and the shard, see
/// [`MessageIdGenerator::set_tag`]), a counter in the low 12. Within a shard ids only grow; a burst of more than 4096
/// messages in one millisecond borrows from the next millisecond.
///
/// It also keeps the shard's [`VersionSlot`] (ids are conversation
/// versions): issuing marks the shard busy and honours the id floor a
/// conversation sync may have raised.
#[derive(Debug)]
pub struct MessageIdGenerator {
    shard: u64,
    /// The 10 bits that tell issuers apart.
    tag: u64,
    last_ms: u64,
    counter: u64,
    pub(super) versions: Arc<VersionFrontier>,
    busy: bool,
}

/// Begins a run of the process that starts at `unix_ms`, and returns its
/// first message id: above every id an earlier run recorded and above every
/// earlier run's first id (recorded here, before anything else), whatever
/// the clock says. So ids never repeat across restarts, no two runs share a
/// first id, and "handed out before this run" is `id < first_id_of_run`.
pub fn first_id_of_run(
    store: &mut dyn ShardStore,
    unix_ms: u64,
) -> Result<MessageId, StorageError> {
    let issued_ms = store.ids_issued()?.0 >> ID_MS_SHIFT;
    let now_ms = unix_ms.saturating_sub(ID_EPOCH_UNIX_MS);
    let run = MessageId(now_ms.max(issued_ms + 1) << ID_MS_SHIFT);
    store.commit(&[Mutation::IdsIssued(run)])?;
    Ok(run)
}

/// Message ids count milliseconds from 2024-01-01.
pub const ID_EPOCH_UNIX_MS: u64 = 1_704_067_200_000;

impl MessageIdGenerator {
    pub fn new(shard: ShardId) -> MessageIdGenerator {
        assert!(shard.0 < 1024, "message ids have 10 bits for the shard");
        MessageIdGenerator {
            shard: u64::from(shard.0),
            tag: u64::from(shard.0),
            last_ms: 0,
            counter: 0,
            versions: VersionFrontier::new(shard.0 + 1),
            busy: false,
        }
    }

    /// Publishes this shard's closed version in `versions` (shared by all
    /// shards) from now on.
    pub fn share_versions(&mut self, versions: Arc<VersionFrontier>) {
        self.versions = versions;
        self.busy = false;
    }

    /// Ids carry `tag` (below 1024) instead of the shard: a cluster node's
    /// shards tag theirs with the node too, so no two nodes' ids collide.
    pub fn set_tag(&mut self, tag: u16) {
        assert!(tag < 1024, "message ids have 10 bits for the issuer");
        self.tag = u64::from(tag);
    }

    fn slot(&self) -> &VersionSlot {
        self.versions.slot(self.shard as usize)
    }

    /// Publishes what this shard may still make visible: nothing when
    /// `idle`, else nothing below `lowest` (the lowest version queued or
    /// being committed).
    pub(super) fn publish(&mut self, idle: bool, lowest: Option<u64>) {
        let last = self.last_issued().0;
        if idle {
            self.slot().publish_idle(last);
            self.busy = false;
        } else {
            self.slot().publish_busy(lowest, last);
        }
    }

    /// The largest id handed out so far (0 before the first).
    pub fn last_issued(&self) -> MessageId {
        MessageId((self.last_ms << ID_MS_SHIFT) | (self.tag << 12) | self.counter)
    }

    /// Hands out ids at or above `first` from now on.
    pub fn continue_from(&mut self, first: MessageId) {
        let ms = first.0 >> ID_MS_SHIFT;
        if ms > self.last_ms {
            self.last_ms = ms;
            self.counter = 0;
        }
    }

    pub fn next(&mut self, unix_ms: u64) -> MessageId {
        let floor_ms = self.slot().issuing(self.busy);
        self.busy = true;
        let ms = unix_ms.saturating_sub(ID_EPOCH_UNIX_MS).max(floor_ms);
        if ms > self.last_ms {
            self.last_ms = ms;
            self.counter = 0;
        } else {
            self.counter += 1;
            if self.counter == 1 << 12 {
                self.last_ms += 1;
                self.counter = 0;
            }
        }
        MessageId((self.last_ms << ID_MS_SHIFT) | (self.tag << 12) | self.counter)
    }
}
