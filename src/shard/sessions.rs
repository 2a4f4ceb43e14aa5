//! Sessions: this shard's connections, who they are, and what is queued
//! for them. It owns the connection table, the per-user index of local
//! connections, the handshake and accept-rate counts, the outboxes and the
//! encoder that fills them, and the admin API's stand-in connections (whose
//! "packet" goes to a reply channel instead).
//!
//! It knows nothing of channels, storage or other shards: the dispatcher
//! asks it who a connection is and hands it packets to queue.

use super::api::{ApiReply, ApiResponse};
use crate::config::Limits;
use crate::conn::limit::TokenBucket;
use crate::conn::outbox::Outbox;
use crate::conn::session::{Identity, Phase, Session};
use crate::ids::{ConnId, MessageId, ShardId, Uid};
use crate::protocol::{Disconnect, Encoder, Packet, ReasonCode};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// Admin API requests get connection ids from here up: no real connection
/// reaches it (the counter would need 2^47 accepts).
const API_CONN_BASE: u64 = 1 << 47;

pub(super) struct ConnEntry {
    pub session: Session,
    pub outbox: Rc<Outbox>,
    /// Counted in `handshaking` until it authenticates or closes.
    unauthenticated: bool,
    /// Sends, recalls and conversation changes read from it and not
    /// answered yet (`pending_requests_per_connection_max`).
    awaiting: usize,
    /// Its device's session record says it is open (written when the
    /// connection became active, cleared when it closes cleanly).
    pub session_open: bool,
    /// Messages with ids below it may have reached this device on a
    /// connection whose pushes a crash kept from being recorded: pushed
    /// again from storage, they are flagged as redelivered.
    pub unrecorded_below: MessageId,
}

/// What happened to a packet handed to [`Sessions::write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    /// Queued; the connection is within its outbound limit.
    Queued,
    /// Queued, and the connection is now over `outbound_buffer_max_bytes`:
    /// it is a slow consumer.
    OverLimit,
    /// No such connection (it closed), or an API stand-in that got it.
    Elsewhere,
}

/// What a sweep found.
#[derive(Default)]
pub(super) struct Swept {
    /// Past their handshake or idle timeout: to close, with the reason.
    pub expired: SmallVec<[(ConnId, ReasonCode); 8]>,
    /// Stalled for the whole write-stall timeout: to cut off.
    pub stalled: SmallVec<[ConnId; 8]>,
}

pub(super) struct Sessions {
    shard: ShardId,
    conns: FastMap<ConnId, ConnEntry>,
    next_conn: u64,
    /// Connections of each user on this shard.
    local_users: FastMap<Uid, SmallVec<[ConnId; 2]>>,
    /// Connections that have not authenticated yet.
    handshaking: usize,
    /// Accept rate per source address (this shard's share).
    ip_buckets: FastMap<std::net::IpAddr, TokenBucket>,
    /// Admin API requests waiting for the packet a client would get, under
    /// connection ids no real connection has.
    api_waiters: FastMap<ConnId, ApiReply>,
    next_api_conn: u64,
    encoder: Encoder,
    shutting_down: bool,
}

impl Sessions {
    pub fn new(shard: ShardId) -> Sessions {
        Sessions {
            shard,
            conns: FastMap::default(),
            next_conn: 1,
            local_users: FastMap::default(),
            handshaking: 0,
            ip_buckets: FastMap::default(),
            api_waiters: FastMap::default(),
            next_api_conn: API_CONN_BASE,
            encoder: Encoder::new(),
            shutting_down: false,
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn get(&self, conn: ConnId) -> Option<&ConnEntry> {
        self.conns.get(&conn)
    }

    pub fn get_mut(&mut self, conn: ConnId) -> Option<&mut ConnEntry> {
        self.conns.get_mut(&conn)
    }

    pub fn ids(&self) -> Vec<ConnId> {
        self.conns.keys().copied().collect()
    }

    /// Bytes queued for connections and not written yet.
    pub fn outbound_queued_bytes(&self) -> u64 {
        self.conns
            .values()
            .map(|c| c.outbox.unwritten() as u64)
            .sum()
    }

    /// Whether a new connection from `ip` is within `share` accepts a
    /// second (with a burst of twice that).
    pub fn admit_ip(&mut self, ip: std::net::IpAddr, share: u64, now_ms: u64) -> bool {
        let bucket = self
            .ip_buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(share, share * 2, now_ms));
        bucket.try_take_one(now_ms)
    }

    /// Registers a newly accepted connection, or says why not: the shard is
    /// full, has too many connections that have not authenticated, or is
    /// shutting down.
    pub fn accept(
        &mut self,
        limits: &Limits,
        now: crate::ids::Millis,
    ) -> Result<(ConnId, Rc<Outbox>), ReasonCode> {
        if self.shutting_down {
            return Err(ReasonCode::ServerShutdown);
        }
        if self.conns.len() >= limits.connections_per_shard_max {
            return Err(ReasonCode::TooManyConnections);
        }
        if self.handshaking >= limits.unauthenticated_connections_per_shard_max {
            return Err(ReasonCode::ServerBusy);
        }
        self.handshaking += 1;
        let conn = ConnId::new(self.shard, self.next_conn);
        self.next_conn += 1;
        let outbox = Rc::new(Outbox::default());
        self.conns.insert(
            conn,
            ConnEntry {
                session: Session::new(now),
                outbox: Rc::clone(&outbox),
                unauthenticated: true,
                awaiting: 0,
                session_open: false,
                unrecorded_below: MessageId(0),
            },
        );
        Ok((conn, outbox))
    }

    /// Whether `conn` should have frames read from it now: not while it
    /// has more than half its outbound limit unread (a client pipelining
    /// requests is paced by how fast it reads the answers), nor while it has
    /// its maximum of requests waiting for an answer.
    pub fn reads_frames(&self, conn: ConnId, limits: &Limits) -> bool {
        self.conns.get(&conn).is_some_and(|c| {
            c.session.reads_frames()
                && c.outbox.unwritten() <= limits.outbound_buffer_max_bytes / 2
                && c.awaiting < limits.pending_requests_per_connection_max
        })
    }

    /// Forgets `conn` (its task has ended) and returns what it was.
    pub fn remove(&mut self, conn: ConnId) -> Option<ConnEntry> {
        let entry = self.conns.remove(&conn)?;
        if entry.unauthenticated {
            self.handshaking -= 1;
        }
        if let Some(identity) = &entry.session.identity {
            if let Some(list) = self.local_users.get_mut(&identity.uid) {
                list.retain(|c| *c != conn);
                if list.is_empty() {
                    self.local_users.remove(&identity.uid);
                }
            }
        }
        Some(entry)
    }

    /// Starts closing `conn` with `reason`: queues a `Disconnect` and stops
    /// reading. False if it is gone or already closing.
    pub fn start_closing(
        &mut self,
        conn: ConnId,
        reason: ReasonCode,
        detail: &str,
        now: crate::ids::Millis,
    ) -> bool {
        let Some(entry) = self.conns.get_mut(&conn) else {
            return false;
        };
        if entry.session.phase == Phase::Closing {
            return false;
        }
        tracing::debug!(conn = conn.0, reason = %crate::protocol::reason_name(reason), detail, "closing connection");
        entry.session.phase = Phase::Closing;
        entry.session.closing_since = Some(now);
        let packet = Packet::Disconnect(Disconnect {
            reason,
            message: detail.to_owned(),
        });
        let encoder = &mut self.encoder;
        entry.outbox.append(|buf| encoder.encode(&packet, buf));
        entry.outbox.start_closing(reason);
        true
    }

    /// The client said goodbye: flush what is queued and end.
    pub fn client_closed(&mut self, conn: ConnId, now: crate::ids::Millis) {
        if let Some(entry) = self.conns.get_mut(&conn) {
            entry.session.phase = Phase::Closing;
            entry.session.closing_since = Some(now);
            entry.outbox.start_closing(ReasonCode::Success);
        }
    }

    /// Connections past their handshake or idle timeout (to close, with the
    /// reason) and those stalled for the whole write-stall timeout (to cut
    /// off); aborts those that did not finish closing in time, and forgets
    /// accept-rate sources whose budget is whole again.
    pub fn sweep(&mut self, limits: &Limits, now: crate::ids::Millis) -> Swept {
        let mut swept = Swept::default();
        for (conn, entry) in &self.conns {
            let s = &entry.session;
            if !entry.outbox.is_aborted()
                && entry
                    .outbox
                    .stalled_since()
                    .is_some_and(|since| now.saturating_sub(since) >= limits.write_stall_timeout_ms)
            {
                // It has not caught up for the whole timeout: nothing, not
                // even a Disconnect, would get through.
                swept.stalled.push(*conn);
                continue;
            }
            match s.phase {
                Phase::Closing => {
                    let since = s.closing_since.unwrap_or(now);
                    if now.saturating_sub(since) >= limits.close_flush_timeout_ms {
                        entry.outbox.abort();
                    }
                }
                Phase::Handshake | Phase::Joining { .. }
                    if now.saturating_sub(s.accepted_at) >= limits.handshake_timeout_ms =>
                {
                    swept.expired.push((*conn, ReasonCode::HandshakeTimeout));
                }
                Phase::Active if now.saturating_sub(s.last_read_at) >= limits.idle_timeout_ms => {
                    swept.expired.push((*conn, ReasonCode::IdleTimeout));
                }
                _ => entry.outbox.shrink_if_idle(16 * 1024),
            }
        }
        self.ip_buckets.retain(|_, bucket| !bucket.is_full(now.0));
        swept
    }

    /// From now on no connection is accepted; returns every open one.
    pub fn shut_down(&mut self) -> Vec<ConnId> {
        self.shutting_down = true;
        self.ids()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Queues `packet` for `conn` (or hands it to the API request waiting
    /// under that id). An answer to a request frees one of its places.
    pub fn write(&mut self, conn: ConnId, packet: &Packet, outbound_max: usize) -> Written {
        if !self.api_waiters.is_empty() {
            if let Some(reply) = self.api_waiters.remove(&conn) {
                let _ = reply.try_send(ApiResponse::Packet(Box::new(packet.clone())));
                return Written::Elsewhere;
            }
        }
        let Some(entry) = self.conns.get_mut(&conn) else {
            return Written::Elsewhere;
        };
        if matches!(
            packet,
            Packet::SendAck(_) | Packet::RecallResp(_) | Packet::ConversationOpResp(_)
        ) {
            entry.awaiting = entry.awaiting.saturating_sub(1);
        }
        let encoder = &mut self.encoder;
        entry.outbox.append(|buf| encoder.encode(packet, buf));
        if entry.outbox.unwritten() > outbound_max {
            Written::OverLimit
        } else {
            Written::Queued
        }
    }

    /// Queues an encoded frame for `conn`.
    pub fn write_frame(&mut self, conn: ConnId, frame: &[u8], outbound_max: usize) -> Written {
        let Some(entry) = self.conns.get_mut(&conn) else {
            return Written::Elsewhere;
        };
        entry.outbox.append(|buf| buf.extend_from_slice(frame));
        if entry.outbox.unwritten() > outbound_max {
            Written::OverLimit
        } else {
            Written::Queued
        }
    }

    /// The encoder, for frames encoded once and copied to many outboxes.
    pub fn encoder(&mut self) -> &mut Encoder {
        &mut self.encoder
    }

    /// A request that will be answered with one packet was read from
    /// `conn`.
    pub fn awaiting_answer(&mut self, conn: ConnId) {
        if let Some(entry) = self.conns.get_mut(&conn) {
            entry.awaiting += 1;
        }
    }

    /// Cuts `conn` off as a slow consumer: it stops at once, nothing more
    /// is written. False if it is gone or was cut off already.
    pub fn cut_off(&mut self, conn: ConnId) -> bool {
        let Some(entry) = self.conns.get_mut(&conn) else {
            return false;
        };
        if entry.outbox.is_aborted() {
            return false;
        }
        tracing::debug!(
            conn = conn.0,
            unwritten = entry.outbox.unwritten(),
            "outbound buffer limit exceeded: cut off as a slow consumer"
        );
        entry.session.phase = Phase::Closing;
        entry.outbox.start_closing(ReasonCode::SlowConsumer);
        entry.outbox.abort();
        true
    }

    /// `conn` authenticated as `identity`: it joins (waits for every other
    /// shard to apply its presence: `acks_missing`) and is listed under its
    /// user.
    pub fn authenticated(
        &mut self,
        conn: ConnId,
        identity: Identity,
        resume: bool,
        acks_missing: u16,
    ) -> bool {
        let Some(entry) = self.conns.get_mut(&conn) else {
            return false;
        };
        if entry.unauthenticated {
            entry.unauthenticated = false;
            self.handshaking -= 1;
        }
        self.local_users
            .entry(identity.uid.clone())
            .or_default()
            .push(conn);
        entry.session.identity = Some(identity);
        entry.session.resume = resume;
        entry.session.phase = Phase::Joining { acks_missing };
        true
    }

    /// One more shard has applied `conn`'s presence; true when it was the
    /// last one (the connection may become active).
    pub fn presence_acked(&mut self, conn: ConnId) -> bool {
        let Some(entry) = self.conns.get_mut(&conn) else {
            return false;
        };
        if let Phase::Joining { acks_missing } = &mut entry.session.phase {
            *acks_missing -= 1;
            return *acks_missing == 0;
        }
        false
    }

    pub fn identity(&self, conn: ConnId) -> Option<&Identity> {
        self.conns
            .get(&conn)
            .and_then(|e| e.session.identity.as_ref())
    }

    /// The uid and device id of an identified connection.
    pub fn identity_device(&self, conn: ConnId) -> Option<(Uid, Arc<str>)> {
        self.identity(conn)
            .map(|i| (i.uid.clone(), Arc::clone(&i.device_id)))
    }

    pub fn identity_uid(&self, conn: ConnId) -> Option<Uid> {
        self.identity(conn).map(|i| i.uid.clone())
    }

    pub fn is_active(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|e| e.session.phase == Phase::Active)
    }

    /// Whether `conn` asked for what it missed (it resumed).
    pub fn resumed(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|e| e.session.resume)
    }

    /// `uid`'s connections on this shard.
    pub fn local_conns(&self, uid: &Uid) -> SmallVec<[ConnId; 2]> {
        self.local_users.get(uid).cloned().unwrap_or_default()
    }

    /// `uid`'s connections on this shard that match `keep`.
    pub fn conns_where(
        &self,
        uid: &Uid,
        keep: impl Fn(&Identity) -> bool,
    ) -> SmallVec<[ConnId; 2]> {
        let Some(list) = self.local_users.get(uid) else {
            return SmallVec::new();
        };
        list.iter()
            .copied()
            .filter(|c| {
                self.conns
                    .get(c)
                    .and_then(|e| e.session.identity.as_ref())
                    .is_some_and(&keep)
            })
            .collect()
    }

    /// A connection id for an API request whose answer is the packet a
    /// client would get: [`Sessions::write`] hands it to `reply`.
    pub fn api_conn(&mut self, reply: ApiReply) -> ConnId {
        let conn = ConnId::new(self.shard, self.next_api_conn);
        self.next_api_conn += 1;
        self.api_waiters.insert(conn, reply);
        conn
    }
}
