//! Delivery guarantees on the pushing side: every message a shard pushes to
//! one of its connections stays pending, with one retry timer, until that
//! connection acknowledges it.
//!
//! Entries are keyed by (connection, message id), so there is exactly one
//! entry and one timer per key however often the same message is pushed or
//! fanned out again; a second push of a pending message is not written
//! again. Timers live in one per-shard [`wheel::TimerWheel`]; time comes in
//! as an argument. When a timer fires the message is pushed again with the
//! redelivered flag, after a backoff with jitter, up to an attempt limit;
//! then the entry is dropped and the message stays available through sync.
//! An acknowledgement for an unknown or already acknowledged message, or
//! from another connection, completes nothing.

pub mod wheel;

use crate::channel::ChannelKey;
use crate::ids::{ConnId, MessageId, Seq};
use crate::storage::StoredMessage;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use wheel::TimerWheel;

/// How unacknowledged pushes are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the first redelivery.
    pub interval_ms: u64,
    /// Each wait is this percentage of the one before (200: doubling).
    pub backoff_percent: u64,
    /// No wait is longer than this.
    pub interval_max_ms: u64,
    /// Each wait is moved by up to this percentage, either way.
    pub jitter_percent: u64,
    /// Redeliveries before the entry is dropped.
    pub attempts_max: u32,
    /// Resolution of the timer wheel.
    pub tick_ms: u64,
}

type Key = (ConnId, MessageId);

struct Entry {
    message: Arc<StoredMessage>,
    redeliveries: u32,
    /// Pushed live: its owner counted the device's user online when it
    /// committed it (so no `msg.offline` named them for it).
    live: bool,
    /// When it was first pushed (the latency budget's clock, microseconds).
    pushed_us: u64,
}

/// What a device is known to have of a channel, from its saved position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Known {
    /// Acknowledged through here: never pushed again.
    pub had: Seq,
    /// Pushed through here before (maybe seen): pushed again flagged.
    pub flag_through: Seq,
}

/// One shard's pending pushes.
pub struct PendingPushes {
    policy: RetryPolicy,
    wheel: TimerWheel<Key>,
    entries: HashMap<Key, Entry, ahash::RandomState>,
    /// Per connection, its pending messages by channel and seq: for
    /// cumulative acknowledgements and for forgetting a closed connection.
    by_conn: HashMap<ConnId, BTreeMap<(ChannelKey, Seq), MessageId>, ahash::RandomState>,
    /// Payload bytes pending per connection, for its in-flight window.
    conn_bytes: HashMap<ConnId, usize, ahash::RandomState>,
    /// Per connection and channel, the highest seq ever pushed there: a
    /// cumulative ack never counts for more than the device was sent.
    highest: HashMap<ConnId, HashMap<ChannelKey, Seq, ahash::RandomState>, ahash::RandomState>,
    /// Per connection and channel, what its device is known to have from
    /// its saved position (read on resume, or at the first live push).
    known: HashMap<ConnId, HashMap<ChannelKey, Known, ahash::RandomState>, ahash::RandomState>,
    /// Per connection, live pushes given up on after every redelivery:
    /// never acknowledged (see [`PendingPushes::undelivered`]).
    given_up: HashMap<ConnId, Vec<Arc<StoredMessage>>, ahash::RandomState>,
    /// When each push acknowledged since the last
    /// [`PendingPushes::take_acked_push_times`] was first pushed.
    acked_push_times: Vec<u64>,
    jitter_state: u64,
    due: Vec<Key>,
}

impl std::fmt::Debug for PendingPushes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingPushes")
            .field("entries", &self.entries.len())
            .field("timers", &self.wheel.len())
            .finish()
    }
}

impl PendingPushes {
    pub fn new(policy: RetryPolicy, seed: u64, now_ms: u64) -> PendingPushes {
        PendingPushes {
            policy,
            wheel: TimerWheel::new(policy.tick_ms, 1024, now_ms),
            entries: HashMap::default(),
            by_conn: HashMap::default(),
            conn_bytes: HashMap::default(),
            highest: HashMap::default(),
            known: HashMap::default(),
            given_up: HashMap::default(),
            acked_push_times: Vec::new(),
            jitter_state: seed | 1,
            due: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Timers armed; never more than [`PendingPushes::len`].
    pub fn timers(&self) -> usize {
        self.wheel.len()
    }

    pub fn is_pending(&self, conn: ConnId, message_id: MessageId) -> bool {
        self.entries.contains_key(&(conn, message_id))
    }

    /// Records a live push of `message` to `conn` (see
    /// [`PendingPushes::track_as`]).
    pub fn track(&mut self, conn: ConnId, message: &Arc<StoredMessage>, now_ms: u64) -> bool {
        self.track_as(conn, message, now_ms, now_ms * 1000, true)
    }

    /// Records a push of `message` to `conn`, `live` (its owner counted the
    /// user online at its commit) or read from storage. Returns false, and
    /// changes nothing, when it is already pending there: the caller must
    /// not write it again.
    pub fn track_as(
        &mut self,
        conn: ConnId,
        message: &Arc<StoredMessage>,
        now_ms: u64,
        now_us: u64,
        live: bool,
    ) -> bool {
        let key = (conn, message.message_id);
        if self.entries.contains_key(&key) {
            return false;
        }
        let deadline = now_ms + self.wait_ms(0);
        self.wheel.insert(key, deadline);
        self.by_conn
            .entry(conn)
            .or_default()
            .insert((message.channel.clone(), message.seq), message.message_id);
        *self.conn_bytes.entry(conn).or_default() += message.payload.len();
        let highest = self
            .highest
            .entry(conn)
            .or_default()
            .entry(message.channel.clone())
            .or_default();
        *highest = (*highest).max(message.seq);
        self.entries.insert(
            key,
            Entry {
                message: Arc::clone(message),
                redeliveries: 0,
                live,
                pushed_us: now_us,
            },
        );
        true
    }

    /// `conn` acknowledged `message_id`. Returns whether it was pending.
    pub fn ack(&mut self, conn: ConnId, message_id: MessageId) -> bool {
        self.complete(conn, message_id).is_some()
    }

    /// Like [`PendingPushes::ack`], returning the channel and seq completed.
    pub fn complete(&mut self, conn: ConnId, message_id: MessageId) -> Option<(ChannelKey, Seq)> {
        let entry = self.entries.remove(&(conn, message_id))?;
        self.wheel.cancel(&(conn, message_id));
        self.acked_push_times.push(entry.pushed_us);
        if let Some(index) = self.by_conn.get_mut(&conn) {
            index.remove(&(entry.message.channel.clone(), entry.message.seq));
            if index.is_empty() {
                self.by_conn.remove(&conn);
            }
        }
        if let Some(bytes) = self.conn_bytes.get_mut(&conn) {
            *bytes -= entry.message.payload.len();
            if *bytes == 0 && !self.by_conn.contains_key(&conn) {
                self.conn_bytes.remove(&conn);
            }
        }
        Some((entry.message.channel.clone(), entry.message.seq))
    }

    /// When each push acknowledged since the last call was first pushed
    /// (for the latency budget's `recv_ack` stage); emptied.
    pub fn take_acked_push_times(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.acked_push_times)
    }

    /// The lowest seq of `channel` still pending on `conn`.
    pub fn lowest_pending(&self, conn: ConnId, channel: &ChannelKey) -> Option<Seq> {
        self.by_conn
            .get(&conn)?
            .range((channel.clone(), Seq(0))..=(channel.clone(), Seq(u64::MAX)))
            .next()
            .map(|((_, seq), _)| *seq)
    }

    /// `conn` acknowledged everything of `channel` up to `seq`. Returns how
    /// many pending messages that completed.
    pub fn ack_through(&mut self, conn: ConnId, channel: &ChannelKey, seq: Seq) -> usize {
        let Some(index) = self.by_conn.get(&conn) else {
            return 0;
        };
        let ids: Vec<MessageId> = index
            .range((channel.clone(), Seq(0))..=(channel.clone(), seq))
            .map(|(_, id)| *id)
            .collect();
        ids.into_iter().filter(|id| self.ack(conn, *id)).count()
    }

    /// Messages and payload bytes pending on `conn`: its in-flight window.
    pub fn in_flight(&self, conn: ConnId) -> (usize, usize) {
        (
            self.by_conn.get(&conn).map_or(0, BTreeMap::len),
            self.conn_bytes.get(&conn).copied().unwrap_or(0),
        )
    }

    /// The highest seq of `channel` ever pushed to `conn`, if any.
    pub fn highest_pushed(&self, conn: ConnId, channel: &ChannelKey) -> Option<Seq> {
        self.highest.get(&conn)?.get(channel).copied()
    }

    /// Records what `conn`'s device is known to have of `channel` from its
    /// saved position: a live copy at or below `known.had`, committed
    /// before the position was read, is not pushed; one at or below
    /// `known.flag_through` was pushed to the device before and goes out
    /// flagged as redelivered.
    pub fn learn(&mut self, conn: ConnId, channel: &ChannelKey, known: Known) {
        let entry = self
            .known
            .entry(conn)
            .or_default()
            .entry(channel.clone())
            .or_default();
        entry.had = entry.had.max(known.had);
        entry.flag_through = entry.flag_through.max(known.flag_through);
    }

    /// What [`PendingPushes::learn`] recorded for `conn` and `channel`.
    pub fn known(&self, conn: ConnId, channel: &ChannelKey) -> Option<Known> {
        self.known.get(&conn)?.get(channel).copied()
    }

    /// The highest seq of `channel` that `conn`'s device has, pushed here or
    /// known from its saved position.
    pub fn highest_had(&self, conn: ConnId, channel: &ChannelKey) -> Option<Seq> {
        let had = self.known(conn, channel).map(|k| k.had);
        match (self.highest_pushed(conn, channel), had) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Every channel pushed to `conn`, with the highest seq pushed there.
    pub fn pushed_channels(&self, conn: ConnId) -> impl Iterator<Item = (&ChannelKey, Seq)> {
        self.highest
            .get(&conn)
            .into_iter()
            .flat_map(|channels| channels.iter().map(|(key, seq)| (key, *seq)))
    }

    /// Forgets every pending push of `channel` up to `through` (a deleted
    /// group: its messages are gone; a group created again under the same
    /// id continues after them).
    pub fn forget_channel(&mut self, channel: &ChannelKey, through: Seq) {
        // In a fixed order: cancelling reorders the timers in a wheel slot,
        // and the order they fire in must not depend on a hash seed.
        let mut conns: Vec<ConnId> = self.by_conn.keys().copied().collect();
        conns.sort_unstable();
        for conn in conns {
            let ids: Vec<MessageId> = self.by_conn[&conn]
                .range((channel.clone(), Seq(0))..=(channel.clone(), through))
                .map(|(_, id)| *id)
                .collect();
            for id in ids {
                self.ack(conn, id);
            }
        }
        for list in self.given_up.values_mut() {
            list.retain(|m| m.channel != *channel || m.seq > through);
        }
    }

    /// The live pushes to `conn` it never acknowledged: pending now, or
    /// given up on after every redelivery. In seq order per channel, given
    /// up first.
    pub fn undelivered(&self, conn: ConnId) -> Vec<Arc<StoredMessage>> {
        let mut out: Vec<Arc<StoredMessage>> =
            self.given_up.get(&conn).cloned().unwrap_or_default();
        if let Some(index) = self.by_conn.get(&conn) {
            for id in index.values() {
                if let Some(entry) = self.entries.get(&(conn, *id)) {
                    if entry.live {
                        out.push(Arc::clone(&entry.message));
                    }
                }
            }
        }
        out
    }

    /// Forgets everything pending on a closed connection.
    pub fn forget_conn(&mut self, conn: ConnId) {
        self.given_up.remove(&conn);
        self.conn_bytes.remove(&conn);
        self.highest.remove(&conn);
        self.known.remove(&conn);
        let Some(index) = self.by_conn.remove(&conn) else {
            return;
        };
        for id in index.into_values() {
            self.entries.remove(&(conn, id));
            self.wheel.cancel(&(conn, id));
        }
    }

    /// The pushes whose timers fired by `now_ms`, to be written again with
    /// the redelivered flag. Each is rescheduled with backoff, or, once it
    /// has been redelivered `attempts_max` times, dropped and its
    /// connection listed in `given_up` (the caller closes it: a device that
    /// does not acknowledge must not have later acknowledgements move its
    /// position past what it never acknowledged).
    pub fn due(
        &mut self,
        now_ms: u64,
        out: &mut Vec<(ConnId, Arc<StoredMessage>)>,
        given_up: &mut Vec<ConnId>,
    ) {
        let mut due = std::mem::take(&mut self.due);
        self.wheel.advance(now_ms, &mut due);
        // Per connection, in message id order (seq order within a channel):
        // the order of a wheel slot depends on other connections' timers.
        due.sort_unstable();
        for key in due.drain(..) {
            let Some(entry) = self.entries.get_mut(&key) else {
                continue;
            };
            if entry.redeliveries >= self.policy.attempts_max {
                let id = key.1;
                if entry.live {
                    let message = Arc::clone(&entry.message);
                    self.given_up.entry(key.0).or_default().push(message);
                }
                self.ack(key.0, id);
                if !given_up.contains(&key.0) {
                    given_up.push(key.0);
                }
                continue;
            }
            entry.redeliveries += 1;
            let redeliveries = entry.redeliveries;
            out.push((key.0, Arc::clone(&entry.message)));
            let wait = self.wait_ms(redeliveries);
            self.wheel.insert(key, now_ms + wait);
        }
        self.due = due;
    }

    /// The wait before redelivery number `redeliveries + 1`.
    fn wait_ms(&mut self, redeliveries: u32) -> u64 {
        let p = &self.policy;
        let mut wait = p.interval_ms as f64;
        for _ in 0..redeliveries {
            wait = wait * p.backoff_percent as f64 / 100.0;
            if wait >= p.interval_max_ms as f64 {
                break;
            }
        }
        let wait = wait.min(p.interval_max_ms as f64) as u64;
        // xorshift: cheap, deterministic per shard, spreads retries of a
        // burst so they do not come back all at once.
        self.jitter_state ^= self.jitter_state << 13;
        self.jitter_state ^= self.jitter_state >> 7;
        self.jitter_state ^= self.jitter_state << 17;
        let span = wait * p.jitter_percent / 100;
        if span == 0 {
            return wait.max(1);
        }
        let offset = self.jitter_state % (2 * span + 1);
        (wait + offset).saturating_sub(span).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ShardId, Uid};
    use bytes::Bytes;
    use proptest::prelude::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            interval_ms: 1000,
            backoff_percent: 200,
            interval_max_ms: 8000,
            jitter_percent: 0,
            attempts_max: 3,
            tick_ms: 10,
        }
    }

    fn message(seq: u64) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            message_id: MessageId(1000 + seq),
            seq: Seq(seq),
            channel: ChannelKey::group("g"),
            from_uid: Uid::new("a"),
            from_device: Arc::from("d"),
            client_msg_no: format!("m{seq}"),
            timestamp_ms: 0,
            send_flags: 0,
            payload: Bytes::new(),
            recalled: false,
        })
    }

    fn conn(n: u64) -> ConnId {
        ConnId::new(ShardId(0), n)
    }

    #[test]
    fn a_message_pushed_twice_to_one_device_has_one_entry_and_one_timer() {
        let mut pending = PendingPushes::new(policy(), 7, 0);
        let m = message(1);
        assert!(pending.track(conn(1), &m, 0));
        assert!(
            !pending.track(conn(1), &m, 5),
            "the second fan-out path adds nothing"
        );
        assert!(
            pending.track(conn(2), &m, 5),
            "another device is another entry"
        );
        assert_eq!((pending.len(), pending.timers()), (2, 2));
    }

    #[test]
    fn retries_back_off_then_give_up_and_an_ack_stops_them() {
        let mut pending = PendingPushes::new(policy(), 7, 0);
        pending.track(conn(1), &message(1), 0);
        pending.track(conn(1), &message(2), 0);
        let mut out = Vec::new();
        pending.due(999, &mut out, &mut Vec::new());
        assert!(out.is_empty());
        pending.due(1000, &mut out, &mut Vec::new());
        assert_eq!(out.len(), 2);
        assert!(pending.ack(conn(1), MessageId(1002)));
        assert!(
            !pending.ack(conn(1), MessageId(1002)),
            "a second ack is ignored"
        );
        assert!(
            !pending.ack(conn(2), MessageId(1001)),
            "another connection's ack completes nothing"
        );
        out.clear();
        // Redeliveries at +2 s and +4 s after that, then dropped.
        pending.due(2999, &mut out, &mut Vec::new());
        assert!(out.is_empty());
        pending.due(3000, &mut out, &mut Vec::new());
        pending.due(7000, &mut out, &mut Vec::new());
        assert_eq!(out.len(), 2);
        let mut given_up = Vec::new();
        pending.due(100_000, &mut out, &mut given_up);
        assert_eq!(out.len(), 2, "attempts_max = 3 redeliveries, then nothing");
        assert_eq!(given_up, vec![conn(1)], "its connection is reported once");
        assert!(pending.is_empty());
        assert_eq!(pending.timers(), 0);
    }

    #[test]
    fn a_cumulative_ack_completes_the_channel_up_to_its_seq() {
        let mut pending = PendingPushes::new(policy(), 7, 0);
        for seq in 1..=5 {
            pending.track(conn(1), &message(seq), 0);
        }
        assert_eq!(
            pending.ack_through(conn(1), &ChannelKey::group("g"), Seq(3)),
            3
        );
        assert_eq!(
            pending.ack_through(conn(1), &ChannelKey::group("other"), Seq(9)),
            0
        );
        assert_eq!(pending.len(), 2);
        pending.forget_conn(conn(1));
        assert_eq!((pending.len(), pending.timers()), (0, 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8, u8),
        Ack(u8, u8),
        AckThrough(u8, u8),
        Tick(u16),
        Disconnect(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4, 1u8..16).prop_map(|(c, s)| Op::Push(c, s)),
            (0u8..4, 1u8..16).prop_map(|(c, s)| Op::Ack(c, s)),
            (0u8..4, 1u8..16).prop_map(|(c, s)| Op::AckThrough(c, s)),
            (0u16..5000).prop_map(Op::Tick),
            (0u8..4).prop_map(Op::Disconnect),
        ]
    }

    proptest! {
        /// Any sequence of push, ack, cumulative ack, tick and disconnect
        /// leaves no timer for an acknowledged message, never more timers
        /// than pending entries, and never redelivers an acknowledged
        /// message.
        #[test]
        fn no_timer_outlives_its_ack(ops in proptest::collection::vec(op(), 1..300)) {
            let mut pending = PendingPushes::new(RetryPolicy { jitter_percent: 20, ..policy() }, 42, 0);
            let mut acked: std::collections::HashSet<(u8, u8)> = Default::default();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Push(c, s) => {
                        if !acked.contains(&(c, s)) {
                            pending.track(conn(u64::from(c)), &message(u64::from(s)), now);
                        }
                    }
                    Op::Ack(c, s) => {
                        pending.ack(conn(u64::from(c)), MessageId(1000 + u64::from(s)));
                        acked.insert((c, s));
                    }
                    Op::AckThrough(c, s) => {
                        pending.ack_through(conn(u64::from(c)), &ChannelKey::group("g"), Seq(u64::from(s)));
                        for t in 1..=s {
                            acked.insert((c, t));
                        }
                    }
                    Op::Tick(by) => {
                        now += u64::from(by);
                        let mut out = Vec::new();
                        pending.due(now, &mut out, &mut Vec::new());
                        for (c, m) in out {
                            let key = ((c.0 & 0xffff) as u8, m.seq.0 as u8);
                            prop_assert!(!acked.contains(&key), "redelivered an acknowledged message");
                        }
                    }
                    Op::Disconnect(c) => pending.forget_conn(conn(u64::from(c))),
                }
                prop_assert!(pending.timers() <= pending.len());
                for (c, s) in &acked {
                    prop_assert!(!pending.is_pending(conn(u64::from(*c)), MessageId(1000 + u64::from(*s))));
                }
            }
        }
    }
}
