//! A hashed timer wheel: O(1) insert and cancel, one pass over one slot per
//! tick. Timers are data (a key and a deadline), not tasks; time is given by
//! the caller, so a test drives it with any clock it likes.

use std::collections::HashMap;
use std::hash::Hash;

/// Where a timer sits, so cancelling it is a swap-remove.
#[derive(Debug, Clone, Copy)]
struct Position {
    slot: usize,
    index: usize,
}

#[derive(Debug)]
pub struct TimerWheel<K: Copy + Eq + Hash> {
    tick_ms: u64,
    slots: Vec<Vec<(K, u64)>>,
    positions: HashMap<K, Position, ahash::RandomState>,
    /// The last tick processed.
    current_tick: u64,
}

impl<K: Copy + Eq + Hash> TimerWheel<K> {
    /// A wheel of `slots` slots of `tick_ms` each, starting at `now_ms`.
    pub fn new(tick_ms: u64, slots: usize, now_ms: u64) -> TimerWheel<K> {
        assert!(tick_ms > 0 && slots > 0);
        TimerWheel {
            tick_ms,
            slots: (0..slots).map(|_| Vec::new()).collect(),
            positions: HashMap::default(),
            current_tick: now_ms / tick_ms,
        }
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.positions.contains_key(key)
    }

    /// Arms (or re-arms) the timer of `key` to fire at `deadline_ms`. A key
    /// has at most one timer.
    pub fn insert(&mut self, key: K, deadline_ms: u64) {
        self.cancel(&key);
        // Never in the past: the earliest a timer fires is the next tick.
        let deadline_tick = (deadline_ms.div_ceil(self.tick_ms)).max(self.current_tick + 1);
        let slot = (deadline_tick % self.slots.len() as u64) as usize;
        let index = self.slots[slot].len();
        self.slots[slot].push((key, deadline_tick));
        self.positions.insert(key, Position { slot, index });
    }

    /// Disarms the timer of `key`; returns whether there was one.
    pub fn cancel(&mut self, key: &K) -> bool {
        let Some(position) = self.positions.remove(key) else {
            return false;
        };
        let slot = &mut self.slots[position.slot];
        slot.swap_remove(position.index);
        if let Some((moved, _)) = slot.get(position.index) {
            self.positions
                .get_mut(moved)
                .expect("every slot entry has a position")
                .index = position.index;
        }
        true
    }

    /// Advances to `now_ms` and appends every key whose deadline has come
    /// to `due`; those timers are gone.
    pub fn advance(&mut self, now_ms: u64, due: &mut Vec<K>) {
        let target = now_ms / self.tick_ms;
        // A long gap needs at most one pass over every slot.
        let first = self.current_tick + 1;
        let last = target.min(self.current_tick + self.slots.len() as u64);
        for tick in first..=last {
            let slot = (tick % self.slots.len() as u64) as usize;
            let mut index = 0;
            while index < self.slots[slot].len() {
                let (key, deadline_tick) = self.slots[slot][index];
                if deadline_tick <= target {
                    self.cancel(&key);
                    due.push(key);
                } else {
                    index += 1;
                }
            }
        }
        if target > self.current_tick {
            self.current_tick = target;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn fires_at_the_deadline_and_not_before() {
        let mut wheel = TimerWheel::new(10, 8, 0);
        wheel.insert(1u32, 35);
        wheel.insert(2u32, 1000); // beyond one turn of the wheel
        let mut due = Vec::new();
        wheel.advance(30, &mut due);
        assert!(due.is_empty());
        wheel.advance(40, &mut due);
        assert_eq!(due, vec![1]);
        due.clear();
        wheel.advance(990, &mut due);
        assert!(due.is_empty());
        wheel.advance(1000, &mut due);
        assert_eq!(due, vec![2]);
        assert!(wheel.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u16),
        Cancel(u8),
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), 0u16..2000).prop_map(|(k, d)| Op::Insert(k % 32, d)),
            any::<u8>().prop_map(|k| Op::Cancel(k % 32)),
            (0u16..300).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Against a plain map of deadlines: the same keys fire, none early,
        /// none later than one tick, and the wheel never holds a timer the
        /// model does not.
        #[test]
        fn behaves_like_a_map_of_deadlines(ops in proptest::collection::vec(op(), 1..200)) {
            let tick = 10u64;
            let mut wheel = TimerWheel::new(tick, 16, 0);
            let mut model: BTreeMap<u8, u64> = BTreeMap::new();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Insert(key, delay) => {
                        let deadline = now + u64::from(delay);
                        wheel.insert(key, deadline);
                        model.insert(key, deadline);
                    }
                    Op::Cancel(key) => {
                        prop_assert_eq!(wheel.cancel(&key), model.remove(&key).is_some());
                    }
                    Op::Advance(by) => {
                        now += u64::from(by);
                        let mut due = Vec::new();
                        wheel.advance(now, &mut due);
                        for key in &due {
                            let deadline = model.remove(key).expect("fired a timer the model does not have");
                            prop_assert!(deadline <= now, "fired early: deadline {} now {}", deadline, now);
                        }
                        // At most one tick late (a timer armed for the tick
                        // being processed waits for the next one).
                        for deadline in model.values() {
                            prop_assert!(deadline + tick > now - now % tick, "a due timer did not fire");
                        }
                    }
                }
                prop_assert_eq!(wheel.len(), model.len());
            }
        }
    }
}
