//! The closed version of conversation changes, across shards.
//!
//! A conversation's version is an id from the shard that owns its channel,
//! taken when the change is queued; the change becomes visible when its
//! batch commits, later. An incremental conversation sync answers the
//! changes above the client's version, and the client asks next time from
//! the highest version it was given. If a sync returned version 100 while a
//! change stamped 99 was still being committed (on that shard or another),
//! the client would never see it.
//!
//! So a sync answers only changes at or below the *closed* version: one
//! below which no change can become visible any more. Each shard publishes
//! its own bound in a [`VersionSlot`]:
//!
//! - while it has changes queued or being committed, the lowest of their
//!   versions minus one (`closed`, with `busy` set);
//! - when it has none, `busy` is clear: everything it issued is visible, and
//!   every id it issues later is above its last. A reader may then raise the
//!   shard's id floor to the present (`floor_ms`) and count the shard closed
//!   through it, so an idle shard does not hold syncs back.
//!
//! The shard sets `busy` before it reads the floor to issue an id, and the
//! reader raises the floor before it reads `busy` again (both sequentially
//! consistent): either the reader sees the shard busy and uses its
//! published bound, or the shard's next id is above the raised floor.
//!
//! The slots are plain atomics shared by every shard: reading them costs a
//! sync a few loads per shard, and a shard touches its own only when it goes
//! from idle to busy and when it publishes (once per commit and per sweep).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

/// Bits of a message id below its milliseconds (shard and counter).
pub const ID_MS_SHIFT: u32 = 22;

/// One shard's published bound.
#[derive(Debug, Default)]
pub struct VersionSlot {
    /// The shard has changes queued or being committed, or issued ids since
    /// it last published.
    busy: AtomicBool,
    /// While busy: no change of this shard at or below it is still to
    /// become visible.
    closed: AtomicU64,
    /// Ids the shard issues from now on have at least these milliseconds.
    floor_ms: AtomicU64,
    /// The last id the shard issued, as of its last publication.
    issued: AtomicU64,
}

/// Every shard's slot, shared.
#[derive(Debug)]
pub struct VersionFrontier {
    slots: Box<[VersionSlot]>,
}

impl VersionFrontier {
    pub fn new(shards: u16) -> Arc<VersionFrontier> {
        Arc::new(VersionFrontier {
            slots: (0..shards).map(|_| VersionSlot::default()).collect(),
        })
    }

    pub fn slot(&self, shard: usize) -> &VersionSlot {
        &self.slots[shard]
    }

    /// The version through which every shard's changes are visible, as of
    /// `now_ms` (milliseconds of the id epoch): idle shards are counted
    /// closed through the present, `now_ms` or the highest id any shard
    /// published if that is later (the clock went back); their id floor is
    /// raised past it.
    pub fn closed_through(&self, now_ms: u64) -> u64 {
        let now_ms = self
            .slots
            .iter()
            .map(|slot| slot.issued.load(SeqCst) >> ID_MS_SHIFT)
            .fold(now_ms, u64::max);
        let present = (now_ms << ID_MS_SHIFT) | ((1 << ID_MS_SHIFT) - 1);
        let mut closed = u64::MAX;
        for slot in self.slots.iter() {
            let bound = if slot.busy.load(SeqCst) {
                slot.closed.load(SeqCst)
            } else {
                slot.floor_ms.fetch_max(now_ms + 1, SeqCst);
                if slot.busy.load(SeqCst) {
                    slot.closed.load(SeqCst)
                } else {
                    slot.closed.load(SeqCst).max(present)
                }
            };
            closed = closed.min(bound);
        }
        closed
    }
}

impl VersionSlot {
    /// Called before an id is issued; returns the id floor.
    pub fn issuing(&self, was_busy: bool) -> u64 {
        if !was_busy {
            self.busy.store(true, SeqCst);
        }
        self.floor_ms.load(SeqCst)
    }

    /// The shard has nothing queued or being committed: every change it
    /// made is visible and its later ids are above `last_issued`.
    pub fn publish_idle(&self, last_issued: u64) {
        self.issued.fetch_max(last_issued, SeqCst);
        self.closed.fetch_max(last_issued, SeqCst);
        self.busy.store(false, SeqCst);
    }

    /// The shard has changes queued or being committed, the lowest stamped
    /// `lowest` (or none, then everything through `last_issued` is visible).
    pub fn publish_busy(&self, lowest: Option<u64>, last_issued: u64) {
        let closed = lowest.map_or(last_issued, |v| v.saturating_sub(1));
        self.issued.fetch_max(last_issued, SeqCst);
        self.closed.store(closed, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_shard_holds_the_closed_version_below_its_lowest_change() {
        let frontier = VersionFrontier::new(2);
        frontier.slot(0).issuing(false);
        frontier
            .slot(0)
            .publish_busy(Some(100 << ID_MS_SHIFT), 120 << ID_MS_SHIFT);
        assert_eq!(frontier.closed_through(200), (100 << ID_MS_SHIFT) - 1);
        frontier.slot(0).publish_idle(120 << ID_MS_SHIFT);
        assert_eq!(
            frontier.closed_through(200),
            (200 << ID_MS_SHIFT) | ((1 << ID_MS_SHIFT) - 1)
        );
    }

    #[test]
    fn an_idle_shard_counted_closed_issues_above_it() {
        let frontier = VersionFrontier::new(1);
        let closed = frontier.closed_through(500);
        // The shard's next id: at least the floor's milliseconds.
        let floor_ms = frontier.slot(0).issuing(false);
        assert!(floor_ms << ID_MS_SHIFT > closed);
    }

    #[test]
    fn the_closed_version_never_goes_backwards_on_an_idle_publish() {
        let frontier = VersionFrontier::new(1);
        frontier.slot(0).publish_busy(None, 300);
        frontier.slot(0).publish_idle(200);
        frontier.slot(0).issuing(false);
        assert_eq!(frontier.closed_through(0), 300);
    }
}
