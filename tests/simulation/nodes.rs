//! Runs on several cluster nodes (`Options::nodes`): each node is a
//! process of its own (`World`) on its own store, all sharing the model
//! log. A node owns some partitions and follows the others: a step applies
//! the next record a follower shard has not (as its ordered consumer hands
//! it over), and the writes its devices make to other nodes' channels are
//! forwarded to the owner, as the bridge does, with the faults a NATS
//! request has: nobody serves it before the timeout (the client is told
//! `ServerBusy`, nothing happened), or the owner serves it and the answer
//! is lost (told `ServerBusy`, it may have happened). Crashes hit one node
//! at a time; what its devices forwarded may still be served after it.
//!
//! Checked here: every node stores every channel exactly as its owner
//! does. Checked with the rest of the simulation: what each device is
//! pushed or synced is what its own node stores, it gets every message it
//! may see there, and each node's conversation lists are the model's.

use super::{InForward, Sim};
use ruyi::channel::ChannelKey;
use ruyi::cluster::forward::{channel_of, client_answer, encode_request, Answer, Forward};
use ruyi::ids::{Seq, Uid};
use ruyi::protocol::{Packet, ReasonCode};
use ruyi::shard::api::ApiRequest;
use ruyi::storage::{ListKind, ReadDirection, ShardStore};

/// Percent chances of a forward's faults.
const UNSERVED_PERCENT: u64 = 4;
const ANSWER_LOST_PERCENT: u64 = 4;

impl Sim {
    /// The node index a step acts on: drawn only on several nodes, so that
    /// single-node seeds replay as before.
    pub(super) fn random_node(&mut self) -> usize {
        if self.worlds.len() > 1 {
            self.rng.index(self.worlds.len())
        } else {
            0
        }
    }

    /// How the trace names a node ("" with one).
    pub(super) fn node_name(&self, node: usize) -> String {
        if self.worlds.len() > 1 {
            format!("node {node}: ")
        } else {
            String::new()
        }
    }

    /// Shards per node (every node runs as many).
    pub(super) fn shard_count(&self) -> usize {
        self.worlds[0].shard_count()
    }

    /// The node whose store is furthest along on `key`'s partition: it
    /// holds everything acknowledged there (a writer catches up before it
    /// appends, a follower applies in order).
    pub(super) fn truth_node(&mut self, key: &ChannelKey) -> usize {
        if self.worlds.len() == 1 {
            return 0;
        }
        let claimant = self.claims.borrow()[self.partition_of(key) as usize];
        let mut best = (self.worlds[claimant].applied_of(key), claimant);
        for n in 0..self.worlds.len() {
            let applied = self.worlds[n].applied_of(key);
            if applied > best.0 {
                best = (applied, n);
            }
        }
        best.1
    }

    /// Whether the log holds records of `key`'s partition that no node has
    /// applied yet (an append of a node that crashed before writing it,
    /// while the partition changed hands): what was lost with an answer is
    /// read back only once some node has them (it stays uncertain until).
    pub(super) fn no_store_has_the_log(&mut self, key: &ChannelKey) -> bool {
        if self.worlds.len() == 1 {
            return false;
        }
        let node = self.truth_node(key);
        self.worlds[node].applied_of(key) < self.worlds[node].log_position_of(key)
    }

    /// The node and shard taking writes to `key` now: the claimant once it
    /// took the partition over, else a node that has not let it go yet.
    /// None while nobody takes them (a request finds no owner).
    pub(super) fn owner_of(&self, key: &ChannelKey) -> Option<(usize, usize)> {
        let claimant = self.claims.borrow()[self.partition_of(key) as usize];
        std::iter::once(claimant)
            .chain(0..self.worlds.len())
            .find(|n| self.worlds[*n].owns(key))
            .map(|n| (n, self.worlds[n].owner_of(key)))
    }

    fn partition_of(&self, key: &ChannelKey) -> u32 {
        ruyi::cluster::partition::partition_of(key, crate::world::PARTITIONS)
    }

    /// The node that wrote the message with this id (its id names it).
    pub(super) fn writer_of_id(&self, message_id: u64) -> usize {
        if self.worlds.len() == 1 {
            return 0;
        }
        (((message_id >> 17) & 31) as usize).saturating_sub(1)
    }

    /// The message stored at `seq` of `key` (by the node furthest along on
    /// its partition).
    pub(super) fn stored_message(
        &mut self,
        key: &ChannelKey,
        seq: u64,
    ) -> Result<Option<std::sync::Arc<ruyi::storage::StoredMessage>>, ruyi::storage::StorageError>
    {
        let node = self.truth_node(key);
        self.worlds[node].reader.message(key, Seq(seq))
    }

    /// Time passes on every node alike (their wall clocks may differ).
    pub(super) fn advance(&mut self, by_ms: u64) {
        for world in &mut self.worlds {
            world.advance(by_ms);
        }
    }

    pub(super) fn retry_tick_all(&mut self) {
        for world in &mut self.worlds {
            for i in 0..world.shard_count() {
                world.retry_tick(i);
            }
        }
    }

    pub(super) fn collect_all(&mut self) {
        for world in &mut self.worlds {
            world.collect_outgoing();
        }
    }

    /// A step of what passes between nodes: a follower applies a record,
    /// a shard publishes what it forwards, an owner serves one, a node is
    /// given a partition's claim (it takes the partition over), or a node
    /// learns of claims it lost.
    pub(super) fn between_nodes_random(&mut self) {
        let n = self.random_node();
        let i = self.rng.index(self.shard_count());
        match self.rng.below(6) {
            4 => {
                // A claim moves only once its holder's lease has lapsed
                // (the holder answers nothing from then on), and only to
                // a node whose own lease holds.
                let partition = self.rng.below(u64::from(crate::world::PARTITIONS)) as u32;
                let held = self.claims.borrow()[partition as usize];
                if held == n || self.worlds[n].lapsed() {
                    return;
                }
                if !self.worlds[held].lapsed() {
                    self.worlds[held].lapse();
                    self.note(format!("{}the lease lapses", self.node_name(held)));
                }
                self.claims.borrow_mut()[partition as usize] = n;
                self.note(format!(
                    "{}takes partition {partition} over from node {held}",
                    self.node_name(n)
                ));
                self.worlds[n].acquire(partition);
            }
            5 => {
                if self.worlds[n].lapsed() {
                    self.renew(n);
                } else if self.rng.below(4) == 0 {
                    self.worlds[n].lapse();
                    self.note(format!("{}the lease lapses", self.node_name(n)));
                }
            }

            0 | 1 => {
                if self.worlds[n].follow_step(i) {
                    self.note(format!(
                        "{}shard {i}: applied a followed record",
                        self.node_name(n)
                    ));
                }
            }
            2 => {
                self.publish_forwards(n, i);
            }
            _ => {
                let busy: Vec<(usize, usize)> = (0..self.wire.len())
                    .flat_map(|n| (0..self.wire[n].len()).map(move |i| (n, i)))
                    .filter(|(n, i)| !self.wire[*n][*i].is_empty())
                    .collect();
                if busy.is_empty() {
                    return;
                }
                let (n, i) = *self.rng.pick(&busy);
                let entry = self.wire[n][i].pop_front().expect("not empty");
                let roll = self.rng.below(100);
                if roll < UNSERVED_PERCENT {
                    self.note(format!(
                        "{}shard {i}: a forward found no owner before its timeout",
                        self.node_name(n)
                    ));
                    self.answer_forward(entry, Err(ReasonCode::ServerBusy), false);
                } else {
                    let lost = roll < UNSERVED_PERCENT + ANSWER_LOST_PERCENT;
                    self.serve_forward(entry, lost);
                }
            }
        }
    }

    /// Shard `i` of node `n` publishes what it forwards, in the order
    /// made. True when there was any.
    fn publish_forwards(&mut self, n: usize, i: usize) -> bool {
        let generation = self.worlds[n].generation;
        let taken = self.worlds[n].take_forwards(i);
        let any = !taken.is_empty();
        for forward in taken {
            self.note(format!(
                "{}shard {i}: forwards conn {}'s {}",
                self.node_name(n),
                forward.conn.0,
                request_name(&forward.request)
            ));
            self.wire[n][i].push_back(InForward {
                node: n,
                shard: i,
                generation,
                conn: forward.conn,
                request: forward.request,
                answer: None,
            });
        }
        any
    }

    /// Node `n` renews its lapsed lease (see `World::renew`). True when
    /// it did.
    fn renew(&mut self, n: usize) -> bool {
        let renewed = self.worlds[n].renew();
        if renewed {
            self.note(format!(
                "{}renews its lease, lets its partitions go and takes back those it holds",
                self.node_name(n)
            ));
        }
        renewed
    }

    /// Every node whose lease lapsed renews it. True when any did.
    pub(super) fn renew_all(&mut self) -> bool {
        let mut moved = false;
        for n in 0..self.worlds.len() {
            if self.worlds[n].lapsed() {
                moved |= self.renew(n);
            }
        }
        moved
    }

    /// Publishes and serves everything shard `i` of node `n` forwards,
    /// without faults. True when there was any.
    pub(super) fn forward_all(&mut self, n: usize, i: usize) -> bool {
        let mut moved = self.publish_forwards(n, i) || !self.wire[n][i].is_empty();
        while let Some(entry) = self.wire[n][i].pop_front() {
            self.serve_forward(entry, false);
            moved = true;
        }
        moved
    }

    /// The owner serves a forwarded request, decoded from the bytes the
    /// bridge would carry; `lost`: its answer never comes back.
    fn serve_forward(&mut self, mut entry: InForward, lost: bool) {
        let bytes = match encode_request(&entry.request) {
            Ok(bytes) => bytes,
            Err(error) => return self.violation(format!("a forward does not encode: {error}")),
        };
        let request = match Forward::decode(&bytes, &self.verify) {
            Ok(Forward::Api(request)) => request,
            other => return self.violation(format!("a forward decodes as {other:?}")),
        };
        let Some(key) = channel_of(&request).cloned() else {
            return self.violation(format!("a forwarded {request:?} names no channel"));
        };
        let Some((owner, shard)) = self.owner_of(&key) else {
            self.note(format!(
                "a forwarded {} finds no owner",
                request_name(&request)
            ));
            return self.answer_forward(entry, Err(ReasonCode::ServerBusy), false);
        };
        self.note(format!(
            "{}shard {shard}: serves a forwarded {} from node {}{}",
            self.node_name(owner),
            request_name(&request),
            entry.node,
            if lost { " (its answer is lost)" } else { "" }
        ));
        let (tx, rx) = async_channel::bounded(1);
        let now = self.worlds[owner].now;
        self.worlds[owner].shards[shard].api(request, tx, now);
        if lost {
            return self.answer_forward(entry, Err(ReasonCode::ServerBusy), true);
        }
        entry.answer = Some(rx);
        self.forwarded.push(entry);
    }

    /// Hands the owners' answers that came to their connections; an owner
    /// that crashed answers nothing (told `ServerBusy`, the write may have
    /// happened). True when any came.
    pub(super) fn poll_forwards(&mut self) -> bool {
        let mut moved = false;
        for entry in std::mem::take(&mut self.forwarded) {
            let Some(rx) = &entry.answer else {
                continue;
            };
            match rx.try_recv() {
                Ok(response) => {
                    let bytes = Answer::Api(response).encode();
                    let answer = client_answer(&bytes, &self.verify);
                    self.answer_forward(entry, answer, false);
                    moved = true;
                }
                Err(async_channel::TryRecvError::Empty) => self.forwarded.push(entry),
                Err(async_channel::TryRecvError::Closed) => {
                    self.answer_forward(entry, Err(ReasonCode::ServerBusy), true);
                    moved = true;
                }
            }
        }
        moved
    }

    /// The forwarding node hands `answer` to the connection (if its
    /// process still runs). `uncertain`: the write may have happened, so a
    /// conversation operation's outcome is not known.
    fn answer_forward(
        &mut self,
        entry: InForward,
        answer: Result<Packet, ReasonCode>,
        uncertain: bool,
    ) {
        let world = &mut self.worlds[entry.node];
        if world.generation != entry.generation {
            return;
        }
        if uncertain {
            if let ApiRequest::ConversationOp { op, .. } = &entry.request {
                let device = (0..self.devices.len()).find(|d| {
                    self.devices[*d].link.as_ref().is_some_and(|l| {
                        l.node == entry.node && l.shard == entry.shard && l.conn == entry.conn
                    })
                });
                if let Some(d) = device {
                    self.lose_conversation_op(d, op.request_id);
                }
            }
        }
        self.worlds[entry.node].shards[entry.shard].forward_answered(
            entry.conn,
            &entry.request,
            answer,
        );
    }

    /// Every node stores every channel as its owner does: the same
    /// messages at the same seqs (ids, senders, payloads, recalls), the
    /// same members and lists.
    pub(super) fn check_nodes_agree(&mut self) {
        if self.worlds.len() < 2 {
            return;
        }
        let channels: Vec<ChannelKey> = self.model.channels.iter().cloned().collect();
        let groups = self.model.groups.keys().map(|g| ChannelKey::group(g));
        let lists = self
            .model
            .person_lists
            .keys()
            .map(|u| ruyi::storage::user_list_key(&Uid::new(u)));
        let keys: Vec<ChannelKey> = channels.into_iter().chain(groups).chain(lists).collect();
        for key in keys {
            let owner = self.truth_node(&key);
            let Some(truth) = stored_view(&mut *self.worlds[owner].reader, &key) else {
                return self.violation(format!("node {owner}: reading {key:?} failed"));
            };
            for n in (0..self.worlds.len()).filter(|n| *n != owner) {
                let Some(view) = stored_view(&mut *self.worlds[n].reader, &key) else {
                    return self.violation(format!("node {n}: reading {key:?} failed"));
                };
                if view != truth {
                    return self.violation(format!(
                        "node {n} stores {key:?} as {view:?}; node {owner}, furthest along, as {truth:?}"
                    ));
                }
            }
        }
    }
}

/// What a node stores of a channel, to compare across nodes.
#[derive(Debug, PartialEq, Eq)]
struct StoredView {
    /// (seq, id, sender, client_msg_no, recalled, payload).
    messages: Vec<(u64, u64, String, String, bool, bytes::Bytes)>,
    /// The group's members, sorted (none for a person channel or a
    /// deleted group), and the channel's last seq.
    members: Option<Vec<String>>,
    last_seq: u64,
    deny: Vec<String>,
    allow: Vec<String>,
}

fn stored_view(store: &mut dyn ShardStore, key: &ChannelKey) -> Option<StoredView> {
    let messages = store
        .read_messages(key, Seq(1), 100_000, ReadDirection::Up)
        .ok()?
        .into_iter()
        .map(|m| {
            (
                m.seq.0,
                m.message_id.0,
                m.from_uid.as_str().to_owned(),
                m.client_msg_no.clone(),
                m.recalled,
                m.payload.clone(),
            )
        })
        .collect();
    let record = store.load_channel(key).ok()?;
    let sorted = |uids: Vec<Uid>| {
        let mut uids: Vec<String> = uids.iter().map(|u| u.as_str().to_owned()).collect();
        uids.sort();
        uids
    };
    Some(StoredView {
        messages,
        last_seq: record.as_ref().map_or(0, |r| r.last_seq.0),
        members: record.and_then(|r| r.members).map(sorted),
        deny: sorted(store.list(key, ListKind::Deny, 1000).ok()?),
        allow: sorted(store.list(key, ListKind::Allow, 1000).ok()?),
    })
}

/// A forwarded request, as the trace names it.
fn request_name(request: &ApiRequest) -> String {
    match request {
        ApiRequest::Send { packet, .. } => format!("send {}", packet.client_msg_no),
        ApiRequest::ConversationOp { op, .. } => format!("conversation {:?}", op.action),
        ApiRequest::ClientRecall { recall, .. } => {
            format!("recall of {}", recall.client_msg_no)
        }
        other => format!("{other:?}"),
    }
}

/// Who holds each partition's claim at first: its owner in the partition
/// map (node indexes).
pub(super) fn first_claims(nodes: usize, shards: u16) -> Vec<usize> {
    let specs: Vec<_> = (1..=nodes as u32)
        .map(|node| ruyi::cluster::partition::NodeSpec { node, shards })
        .collect();
    let map = ruyi::cluster::partition::PartitionMap::new(crate::world::PARTITIONS, &specs)
        .expect("a partition map");
    (0..crate::world::PARTITIONS)
        .map(|p| map.owner(p).node as usize - 1)
        .collect()
}
