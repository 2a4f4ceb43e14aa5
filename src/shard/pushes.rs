//! Pushes and positions: what this shard's connections were pushed and have
//! not acknowledged (with the retry timers), what waits in storage for them
//! (backlogs, read as their windows open), and the acknowledged positions
//! not saved yet.
//!
//! It decides what a device gets and how it is flagged; it writes nothing
//! itself. The dispatcher tells it who a connection is ([`Device`]), gives
//! it the store to read backlogs and saved positions from, and writes the
//! packets it returns.

use super::reads::recv_view;
use crate::channel::ChannelKey;
use crate::config::Limits;
use crate::delivery::{Known, PendingPushes, RetryPolicy};
use crate::ids::{ConnId, MessageId, Seq, Uid};
use crate::protocol::{Recv, RECV_FLAG_REDELIVERED};
use crate::storage::{DeviceAck, ReadDirection, ShardStore, StoredMessage};
use smallvec::SmallVec;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// A connection's device, as pushes need to know it.
pub(super) struct Device<'a> {
    pub uid: &'a Uid,
    pub device_id: &'a Arc<str>,
    /// It resumed: its acknowledgements move its saved position.
    pub resumed: bool,
    /// Messages with ids below it may have reached it on a connection a
    /// crash kept from being recorded: they come flagged.
    pub unrecorded_below: MessageId,
}

/// What waits in storage for one connection in one channel.
#[derive(Debug, Clone, Copy)]
struct Behind {
    /// The next seq to push.
    next: Seq,
    /// The last seq known to be due.
    last: Seq,
    /// Seqs up to here may have reached the device before (on an earlier
    /// connection): they go out flagged as redelivered.
    flag_through: Seq,
    /// Seqs from here came live (their owner counted the user online at
    /// commit) and did not fit the window; `Seq(u64::MAX)`: none did.
    live_from: Seq,
}

/// No seq of a backlog came live.
const NONE_LIVE: Seq = Seq(u64::MAX);

/// What to do with a live message for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Live {
    /// Nothing: it has it, will get it from its backlog, or a timer will
    /// push it again.
    Skip,
    /// Write it now, flagged as redelivered or not.
    Push { flagged: bool },
}

/// An acknowledgement as pushes read it.
pub(super) enum Ack {
    /// Of one message, by id.
    Message(MessageId),
    /// Of everything of a channel through a seq (`None`: a channel the
    /// connection could not have been pushed, which completes nothing).
    Through(Option<ChannelKey>, Seq),
}

pub(super) struct Pushes {
    /// Pushes not acknowledged yet, with their retry timers.
    pending: PendingPushes,
    /// Acknowledged positions per connection and channel, not saved yet.
    positions: FastMap<ConnId, FastMap<ChannelKey, Seq>>,
    /// Per connection, channels with committed messages it should get but
    /// that did not fit its in-flight window (or came with a resume): the
    /// next seq to push and the last known. Read from storage as
    /// acknowledgements open the window, so memory stays bounded by the
    /// window, not by how far behind a device is.
    backlog: FastMap<ConnId, BTreeMap<ChannelKey, Behind>>,
    inflight_messages_max: usize,
    inflight_bytes_max: usize,
}

impl Pushes {
    pub fn new(limits: &Limits, policy: RetryPolicy, seed: u64, now_ms: u64) -> Pushes {
        Pushes {
            pending: PendingPushes::new(policy, seed, now_ms),
            positions: FastMap::default(),
            backlog: FastMap::default(),
            inflight_messages_max: limits.inflight_messages_max,
            inflight_bytes_max: limits.inflight_bytes_max,
        }
    }

    /// How unacknowledged pushes are retried from now on.
    pub fn set_retry_policy(&mut self, policy: RetryPolicy, seed: u64, now_ms: u64) {
        self.pending = PendingPushes::new(policy, seed, now_ms);
    }

    /// The connection closed: its pushes and backlog go (its positions were
    /// taken before).
    pub fn forget_conn(&mut self, conn: ConnId) {
        self.pending.forget_conn(conn);
        self.backlog.remove(&conn);
    }

    /// `conn` gets nothing more from storage (it is closing).
    pub fn drop_backlog(&mut self, conn: ConnId) {
        self.backlog.remove(&conn);
    }

    pub fn has_backlog(&self, conn: ConnId) -> bool {
        self.backlog.contains_key(&conn)
    }

    /// The connections with something waiting in storage.
    pub fn backlogged(&self) -> SmallVec<[ConnId; 8]> {
        self.backlog.keys().copied().collect()
    }

    /// A resume found `key` acknowledged (or read) through `floor`, with
    /// messages up to `last` stored and those through `pushed` pushed to
    /// the device before: what lies above the floor waits in the backlog,
    /// and a live copy of anything at or below it is not pushed again.
    pub fn resume_channel(
        &mut self,
        conn: ConnId,
        key: ChannelKey,
        floor: Seq,
        last: Seq,
        pushed: Seq,
    ) {
        // A message the owner has stored but not yet fanned out may be at
        // or below the floor: its live copy must not come again (and one
        // pushed before comes flagged).
        self.pending.learn(
            conn,
            &key,
            Known {
                had: floor,
                flag_through: pushed,
            },
        );
        if last <= floor {
            return;
        }
        let behind = self.backlog.entry(conn).or_default();
        let entry = behind.entry(key).or_insert(Behind {
            next: floor.next(),
            last,
            flag_through: pushed,
            live_from: NONE_LIVE,
        });
        entry.next = entry.next.min(floor.next());
        entry.last = entry.last.max(last);
        entry.flag_through = entry.flag_through.max(pushed);
    }

    /// Reads what waits in `conn`'s backlog, channel by channel in seq
    /// order, while its in-flight window has room, and returns what to
    /// write. The device's own sends are skipped (and its position moved
    /// past them when nothing below is outstanding); at most 4 windows'
    /// worth of records are read per call, the retry tick goes on from
    /// there.
    pub fn refill(
        &mut self,
        conn: ConnId,
        device: &Device<'_>,
        store: &mut dyn ShardStore,
        now_us: u64,
    ) -> Vec<Recv> {
        let now_ms = now_us / 1000;
        let mut out = Vec::new();
        let scan_max = 4 * self.inflight_messages_max.max(1);
        let mut scanned = 0;
        loop {
            let (used, _) = self.pending.in_flight(conn);
            let room = self.inflight_messages_max.saturating_sub(used);
            if room == 0 {
                return out;
            }
            let Some((key, behind)) = self
                .backlog
                .get(&conn)
                .and_then(|b| b.iter().next())
                .map(|(k, v)| (k.clone(), *v))
            else {
                self.backlog.remove(&conn);
                return out;
            };
            let Behind {
                next,
                last,
                flag_through,
                live_from,
            } = behind;
            let want = room.min((last.0 - next.0 + 1) as usize);
            let page = match store.read_messages(&key, next, want, ReadDirection::Up) {
                Ok(page) => page,
                Err(error) => {
                    // The backlog stays: the next retry tick reads it again.
                    tracing::warn!(%error, "reading a backlog failed; retrying at the next tick");
                    return out;
                }
            };
            let mut pushed_through = None;
            for message in &page {
                // This device's own send: it has it, and the live fan-out
                // skipped it too.
                let own = message.from_uid == *device.uid
                    && !message.from_device.is_empty()
                    && message.from_device == *device.device_id;
                if own {
                    pushed_through = Some(message.seq);
                    if self
                        .pending
                        .lowest_pending(conn, &key)
                        .is_none_or(|pending| pending > message.seq)
                    {
                        self.advance_position(conn, device.resumed, key.clone(), message.seq);
                    }
                    continue;
                }
                if !self.window_has_room(conn, message.payload.len()) {
                    break;
                }
                let live = message.seq >= live_from;
                if self.pending.track_as(conn, message, now_ms, now_us, live) {
                    let mut recv = recv_view(message, device.uid);
                    if message.seq <= flag_through || message.message_id < device.unrecorded_below {
                        recv.flags |= RECV_FLAG_REDELIVERED;
                    }
                    out.push(recv);
                }
                pushed_through = Some(message.seq);
            }
            let Some(backlog) = self.backlog.get_mut(&conn) else {
                return out;
            };
            match pushed_through {
                Some(seq) if seq < last => {
                    backlog.insert(
                        key,
                        Behind {
                            next: seq.next(),
                            ..behind
                        },
                    );
                }
                // Done with this channel, or nothing left to read there.
                Some(_) => {
                    backlog.remove(&key);
                }
                None if page.is_empty() => {
                    backlog.remove(&key);
                }
                // The window is full by bytes.
                None => return out,
            }
            scanned += page.len();
            if scanned >= scan_max {
                return out;
            }
        }
    }

    /// Decides a live copy of `message` for `conn` (an active connection
    /// of a recipient; `from_self` when it is the sender's). What the
    /// device had of the channel before this connection pushed any of it
    /// is read from its saved position once: a live copy of a message it
    /// acknowledged on an earlier connection is not pushed, one it was
    /// pushed there comes flagged (a resend after a crash pushes a stored
    /// message live again; the device may have got it from a resume that
    /// read it from storage first).
    pub fn live(
        &mut self,
        conn: ConnId,
        device: &Device<'_>,
        message: &Arc<StoredMessage>,
        from_self: bool,
        store: &mut dyn ShardStore,
        now_us: u64,
    ) -> Live {
        let now_ms = now_us / 1000;
        let known = if message.recalled {
            Known::default()
        } else {
            match self.pending.known(conn, &message.channel) {
                Some(known) => known,
                None => self.learn_position(conn, device, &message.channel, store),
            }
        };
        let flagged =
            message.seq <= known.flag_through || message.message_id < device.unrecorded_below;
        // The sending device on a newer connection (it reconnected while
        // its send was being committed) has it already.
        if from_self
            && !message.recalled
            && !message.from_device.is_empty()
            && *device.device_id == message.from_device
        {
            return Live::Skip;
        }
        if message.recalled {
            return Live::Push { flagged };
        }
        // Behind in this channel, or the window is full: it waits in
        // storage, after what is already waiting.
        if let Some(behind) = self
            .backlog
            .get_mut(&conn)
            .and_then(|b| b.get_mut(&message.channel))
        {
            behind.last = behind.last.max(message.seq);
            behind.live_from = behind.live_from.min(message.seq);
            return Live::Skip;
        }
        // Already pushed from storage: a resume or refill read it there
        // before this live copy arrived from the owner's shard (pushes of a
        // channel go out in seq order, so nothing at or below the highest
        // is new).
        if self
            .pending
            .highest_had(conn, &message.channel)
            .is_some_and(|highest| highest >= message.seq)
        {
            return Live::Skip;
        }
        if !self.window_has_room(conn, message.payload.len()) {
            self.backlog.entry(conn).or_default().insert(
                message.channel.clone(),
                Behind {
                    next: message.seq,
                    last: message.seq,
                    flag_through: Seq(0),
                    live_from: message.seq,
                },
            );
            return Live::Skip;
        }
        // A message already waiting for this device's ack is not written
        // again: its timer will.
        if !self.pending.track_as(conn, message, now_ms, now_us, true) {
            return Live::Skip;
        }
        Live::Push { flagged }
    }

    /// Reads what `conn`'s device has of `channel` from its saved position,
    /// once per connection and channel (at its first live push there), and
    /// remembers it. A failed read assumes everything may have been pushed
    /// before: nothing is skipped, everything comes flagged.
    fn learn_position(
        &mut self,
        conn: ConnId,
        device: &Device<'_>,
        channel: &ChannelKey,
        store: &mut dyn ShardStore,
    ) -> Known {
        let known = match store.device_position(device.uid, device.device_id, channel) {
            Ok(position) => Known {
                had: position.acked,
                flag_through: position.pushed,
            },
            Err(error) => {
                tracing::warn!(%error, "reading a device's position failed; its pushes come flagged");
                Known {
                    had: Seq(0),
                    flag_through: Seq(u64::MAX),
                }
            }
        };
        self.pending.learn(conn, channel, known);
        known
    }

    /// What `conn` (closing) was owed live and never acknowledged: its
    /// pushes pending or given up on, then what came live and waits behind
    /// its window (read from storage), at most `max` messages. Its user was
    /// counted online when these were committed, so no `msg.offline` named
    /// them.
    pub fn undelivered(
        &self,
        conn: ConnId,
        store: &mut dyn ShardStore,
        max: usize,
    ) -> Vec<Arc<StoredMessage>> {
        let mut out = self.pending.undelivered(conn);
        out.truncate(max);
        let Some(behind) = self.backlog.get(&conn) else {
            return out;
        };
        for (key, behind) in behind {
            if behind.live_from == NONE_LIVE {
                continue;
            }
            let mut next = behind.next.max(behind.live_from);
            while next <= behind.last && out.len() < max {
                let want = (max - out.len()).min((behind.last.0 - next.0 + 1) as usize);
                let page = match store.read_messages(key, next, want, ReadDirection::Up) {
                    Ok(page) => page,
                    Err(error) => {
                        tracing::warn!(%error, "reading a closing connection's backlog failed");
                        break;
                    }
                };
                let Some(last) = page.last().map(|m| m.seq) else {
                    break;
                };
                out.extend(page.into_iter().filter(|m| m.seq <= behind.last));
                next = last.next();
            }
        }
        out
    }

    /// Whether one more push of `payload_bytes` fits `conn`'s in-flight
    /// window. An empty window always takes one message, however large.
    fn window_has_room(&self, conn: ConnId, payload_bytes: usize) -> bool {
        let (messages, bytes) = self.pending.in_flight(conn);
        messages == 0
            || (messages < self.inflight_messages_max
                && bytes + payload_bytes <= self.inflight_bytes_max)
    }

    /// When each push acknowledged since the last call was first pushed.
    pub fn take_acked_push_times(&mut self) -> Vec<u64> {
        self.pending.take_acked_push_times()
    }

    /// Records an acknowledgement from `conn` (`resumed`: see [`Device`]).
    pub fn ack(&mut self, conn: ConnId, resumed: bool, ack: Ack) {
        match ack {
            Ack::Message(message_id) => {
                if let Some((key, seq)) = self.pending.complete(conn, message_id) {
                    // The device has everything of the channel below the
                    // lowest push still pending there.
                    let through = match self.pending.lowest_pending(conn, &key) {
                        Some(lowest) if lowest <= seq => Seq(lowest.0 - 1),
                        _ => seq,
                    };
                    self.advance_position(conn, resumed, key, through);
                }
            }
            Ack::Through(None, _) => {}
            Ack::Through(Some(key), seq) => {
                // Only what was pushed to this connection counts: an ack for
                // a channel it was never sent (not a member) or beyond what
                // it got must not hide later messages on resume.
                let Some(highest) = self.pending.highest_pushed(conn, &key) else {
                    return;
                };
                let through = Seq(seq.0.min(highest.0));
                self.pending.ack_through(conn, &key, through);
                self.advance_position(conn, resumed, key, through);
            }
        }
    }

    /// Remembers that `conn`'s device has acknowledged `key` through `seq`;
    /// saved with the next flush.
    ///
    /// Only a connection that resumed moves the saved position: one that
    /// did not was pushed live messages only, and its acknowledgements say
    /// nothing of what came before them (a cumulative ack would jump the
    /// position over messages the device never got).
    fn advance_position(&mut self, conn: ConnId, resumed: bool, key: ChannelKey, seq: Seq) {
        if seq.0 == 0 || !resumed {
            return;
        }
        let position = self
            .positions
            .entry(conn)
            .or_default()
            .entry(key)
            .or_default();
        *position = (*position).max(seq);
    }

    /// The positions to save: of every channel acknowledged since the last
    /// time (every connection's, or one closing connection's, `only`); for
    /// a closing one, of every channel it was pushed, so that whatever it
    /// got and did not acknowledge comes flagged on its next resume.
    /// `identity` names a connection's device.
    pub fn take_positions(
        &mut self,
        only: Option<ConnId>,
        identity: impl Fn(ConnId) -> Option<(Uid, Arc<str>)>,
    ) -> Vec<DeviceAck> {
        let conns: SmallVec<[ConnId; 8]> = match only {
            Some(conn) => std::iter::once(conn).collect(),
            None => self.positions.keys().copied().collect(),
        };
        let mut rows = Vec::new();
        for conn in conns {
            let mut channels = self.positions.remove(&conn).unwrap_or_default();
            if only.is_some() {
                for (channel, _) in self.pending.pushed_channels(conn) {
                    channels.entry(channel.clone()).or_insert(Seq(0));
                }
            }
            let Some((uid, device_id)) = identity(conn) else {
                continue;
            };
            for (channel, seq) in channels {
                let pushed = self
                    .pending
                    .highest_pushed(conn, &channel)
                    .unwrap_or(Seq(0))
                    .max(seq);
                rows.push(DeviceAck {
                    uid: uid.clone(),
                    device_id: Arc::clone(&device_id),
                    channel,
                    seq,
                    pushed,
                });
            }
        }
        rows
    }

    /// Pushes whose retry timer fired (to write again, flagged), and
    /// connections that did not acknowledge after every retry.
    pub fn due(
        &mut self,
        now_ms: u64,
        due: &mut Vec<(ConnId, Arc<StoredMessage>)>,
        given_up: &mut Vec<ConnId>,
    ) {
        self.pending.due(now_ms, due, given_up);
    }

    /// A deleted group's messages (through `through`) are gone: none of
    /// them is pushed again.
    pub fn forget_channel(&mut self, channel: &ChannelKey, through: Seq) {
        self.pending.forget_channel(channel, through);
        for behind in self.backlog.values_mut() {
            if let Some(entry) = behind.get_mut(channel) {
                entry.next = entry.next.max(through.next());
                if entry.next > entry.last {
                    behind.remove(channel);
                }
            }
        }
        self.backlog.retain(|_, behind| !behind.is_empty());
    }

    /// Members removed from `channel` (`removed` says whose connection a
    /// connection is): their connections' backlogs there are dropped.
    /// Everything in them was sent while they were members, but a backlog
    /// is a range of seqs read from storage, and a member added again
    /// before it drains would extend it over what was sent while they were
    /// out. Nothing at or below the removal is owed to a removed member,
    /// nor to one added again (they see what follows the join).
    pub fn forget_members_backlog(
        &mut self,
        channel: &ChannelKey,
        removed: impl Fn(ConnId) -> bool,
    ) {
        for (conn, behind) in self.backlog.iter_mut() {
            if removed(*conn) {
                behind.remove(channel);
            }
        }
        self.backlog.retain(|_, behind| !behind.is_empty());
    }
}
