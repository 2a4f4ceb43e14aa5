//! Tests of the shard's logic, driven directly (no sockets, no executor).

use super::*;
use crate::protocol::{ChannelType, Connect, DeviceFlag, RecvAck, LENGTH_PREFIX_BYTES};
use crate::protocol::{ConversationAction, ConversationOp};
use crate::protocol::{Encoder, PROTOCOL_VERSION};
use crate::shard::message_ids::ID_EPOCH_UNIX_MS;
use crate::storage::ReadDirection;
use crate::storage::{MemoryStorage, Mutation, Storage};

fn now() -> Now {
    Now {
        monotonic: Millis(1),
        unix_ms: crate::time::unix_now_ms(),
        micros: 1_000,
    }
}

fn frame(packet: &Packet) -> Bytes {
    let mut out = BytesMut::new();
    Encoder::new().encode(packet, &mut out);
    Bytes::copy_from_slice(&out[LENGTH_PREFIX_BYTES..])
}

fn shard(storage: &MemoryStorage, id: u16) -> ShardState {
    let config = crate::config::Config::default();
    let auth = crate::config::AuthConfig {
        mode: crate::config::AuthMode::Off,
        ..crate::config::AuthConfig::default()
    };
    let mut state = ShardState::new(
        ShardId(id),
        2,
        config.limits.clone(),
        config.storage.idempotency_ttl_s * 1000,
        crate::auth::Authenticator::new(&auth),
        storage.open_shard(ShardId(id)).unwrap(),
        Rc::new(Signals::new(2)),
    );
    state.set_retry_policy(config.delivery.retry_policy(), now());
    state
}

/// Hands each shard what the other queued for it, and commits, until
/// both are quiet.
fn pump(shards: &mut [ShardState; 2]) {
    loop {
        let mut moved = false;
        for (from, to) in [(0, 1), (1, 0)] {
            let batch = shards[from].take_outgoing(ShardId(to as u16), usize::MAX);
            moved |= !batch.is_empty();
            for message in batch {
                shards[to].on_remote(message, now());
            }
        }
        for state in shards.iter_mut() {
            state.commit(now());
        }
        if !moved {
            return;
        }
    }
}

fn packets(outbox: &Outbox) -> Vec<Packet> {
    let mut bytes = BytesMut::new();
    outbox.take_into(&mut bytes);
    outbox.wrote(bytes.len());
    let decoder = crate::protocol::FrameDecoder::new(1 << 20);
    let limits = VerifyLimits::for_frame_size(1 << 20);
    let mut out = Vec::new();
    while let Some(f) = decoder.next_frame(&mut bytes).unwrap() {
        out.push(Packet::decode(&f, &limits).unwrap());
    }
    out
}

fn connect(state: &mut ShardState, uid: &str, resume: bool) -> (ConnId, Rc<Outbox>) {
    connect_device(state, uid, "phone", resume)
}

fn connect_device(
    state: &mut ShardState,
    uid: &str,
    device: &str,
    resume: bool,
) -> (ConnId, Rc<Outbox>) {
    let (conn, outbox) = state.accept(now()).unwrap();
    let packet = Packet::Connect(Connect {
        version: PROTOCOL_VERSION,
        uid: uid.to_owned(),
        token: String::new(),
        device_id: device.to_owned(),
        device_flag: DeviceFlag::App,
        client_timestamp_ms: 0,
        resume,
    });
    state.on_frame(conn, &frame(&packet), now());
    (conn, outbox)
}

/// A group of alice and bob, owned by shard 0 of 2, stored as after a
/// restart; its id.
fn group_of_alice_and_bob(storage: &MemoryStorage) -> String {
    let group = (0..)
        .map(|i| format!("g{i}"))
        .find(|id| ChannelKey::group(id).shard(2) == ShardId(0))
        .unwrap();
    let mut members = vec![Uid::new("alice"), Uid::new("bob")];
    members.sort();
    storage
        .open_shard(ShardId(0))
        .unwrap()
        .commit(&[Mutation::PutGroup {
            key: ChannelKey::group(&group),
            members,
            last_seq: Seq(0),
            last_message_id: MessageId(0),
        }])
        .unwrap();
    group
}

/// The frame of a first `Send` to `group`.
fn first_send(group: &str) -> Bytes {
    frame(&Packet::Send(SendPacket {
        client_seq: 1,
        client_msg_no: "m1".into(),
        channel_id: group.to_owned(),
        channel_type: ChannelType::Group,
        flags: 0,
        payload: Bytes::from_static(b"hi"),
    }))
}

/// A group message is in storage before its Deliver reaches a member's
/// shard: a device that resumed in between gets it from storage and
/// acknowledges it; the live copy arriving after must not be written
/// again as if new.
#[test]
fn a_live_copy_of_a_message_already_pushed_from_storage_is_not_written_again() {
    let storage = MemoryStorage::default();
    let group = group_of_alice_and_bob(&storage);
    let key = ChannelKey::group(&group);
    let mut shards = [shard(&storage, 0), shard(&storage, 1)];
    let (alice, alice_out) = connect(&mut shards[0], "alice", false);
    pump(&mut shards);
    assert!(matches!(packets(&alice_out)[..], [Packet::ConnAck(_)]));

    // Alice writes while Bob is offline: stored, nobody to deliver to.
    shards[0].on_frame(alice, &first_send(&group), now());
    pump(&mut shards);
    assert!(matches!(packets(&alice_out)[..], [Packet::SendAck(_)]));

    // Bob resumes on the other shard: the message comes from storage,
    // and he acknowledges it.
    let (bob, bob_out) = connect(&mut shards[1], "bob", true);
    pump(&mut shards);
    let got = packets(&bob_out);
    assert!(
        matches!(&got[..], [Packet::ConnAck(_), Packet::Recv(r)] if r.message_seq == 1),
        "{got:?}"
    );
    let ack = Packet::RecvAck(RecvAck {
        message_id: 0,
        message_seq: 1,
        channel_id: group.clone(),
        channel_type: ChannelType::Group,
        through: true,
    });
    shards[1].on_frame(bob, &frame(&ack), now());

    // The owner's live copy arrives late.
    let message = shards[1]
        .store
        .read_messages(&key, Seq(1), 1, ReadDirection::Up)
        .unwrap()
        .remove(0);
    shards[1].on_remote(
        ShardMsg::Deliver {
            message,
            recipients: std::iter::once(Uid::new("bob")).collect(),
            skip: None,
            read_us: 0,
            durable_us: 0,
        },
        now(),
    );
    let again = packets(&bob_out);
    assert!(again.is_empty(), "pushed twice: {again:?}");
}

/// The sending device reconnects while its send is being committed:
/// the fan-out skips the old connection, and the device on its new one
/// must not get its own message either. Its other members do.
#[test]
fn a_device_that_reconnected_during_its_send_is_not_pushed_its_own_message() {
    let storage = MemoryStorage::default();
    let group = group_of_alice_and_bob(&storage);
    let mut shards = [shard(&storage, 0), shard(&storage, 1)];
    let (alice, _old) = connect(&mut shards[0], "alice", false);
    let (_bob, bob_out) = connect(&mut shards[1], "bob", false);
    pump(&mut shards);
    let _ = packets(&bob_out);
    shards[0].on_frame(alice, &first_send(&group), now());
    // Not committed yet: the phone's connection drops and it is back.
    shards[0].on_closed(alice);
    let (_again, new_out) = connect(&mut shards[0], "alice", false);
    pump(&mut shards);
    let got = packets(&new_out);
    assert!(matches!(got[..], [Packet::ConnAck(_)]), "{got:?}");
    let got = packets(&bob_out);
    assert!(
        matches!(&got[..], [Packet::Recv(r)] if r.message_seq == 1),
        "{got:?}"
    );
}

/// A single shard (everything local, commits on demand).
fn lone_shard(storage: &MemoryStorage) -> ShardState {
    lone_shard_on(storage.open_shard(ShardId(0)).unwrap(), Limits::default())
}

fn lone_shard_on(store: Box<dyn ShardStore>, limits: Limits) -> ShardState {
    let config = crate::config::Config::default();
    let auth = crate::config::AuthConfig {
        mode: crate::config::AuthMode::Off,
        ..crate::config::AuthConfig::default()
    };
    let mut state = ShardState::new(
        ShardId(0),
        1,
        limits,
        config.storage.idempotency_ttl_s * 1000,
        crate::auth::Authenticator::new(&auth),
        store,
        Rc::new(Signals::new(1)),
    );
    state.set_retry_policy(config.delivery.retry_policy(), now());
    state
}

/// A store whose message reads fail while `fail_reads` is set (a disk
/// that errs for a moment).
struct FlakyReads {
    inner: Box<dyn ShardStore>,
    fail_reads: Rc<std::cell::Cell<bool>>,
}

impl ShardStore for FlakyReads {
    fn prepare_commit(&mut self, batch: &[Mutation]) -> Result<CommitJob, StorageError> {
        self.inner.prepare_commit(batch)
    }
    fn find_idempotent(
        &mut self,
        from: &Uid,
        client_msg_no: &str,
        now_unix_ms: u64,
        ttl_ms: u64,
    ) -> Result<Option<crate::storage::IdempotentHit>, StorageError> {
        self.inner
            .find_idempotent(from, client_msg_no, now_unix_ms, ttl_ms)
    }
    fn load_channel(
        &mut self,
        key: &ChannelKey,
    ) -> Result<Option<crate::storage::ChannelRecord>, StorageError> {
        self.inner.load_channel(key)
    }
    fn channel_head(
        &mut self,
        key: &ChannelKey,
    ) -> Result<Option<crate::storage::ChannelHead>, StorageError> {
        self.inner.channel_head(key)
    }
    fn read_messages(
        &mut self,
        key: &ChannelKey,
        from: Seq,
        limit: usize,
        direction: ReadDirection,
    ) -> Result<Vec<Arc<StoredMessage>>, StorageError> {
        if self.fail_reads.get() {
            return Err(StorageError::Io("simulated read failure".into()));
        }
        self.inner.read_messages(key, from, limit, direction)
    }
    fn find_message_id(
        &mut self,
        key: &ChannelKey,
        id: MessageId,
    ) -> Result<Option<Seq>, StorageError> {
        self.inner.find_message_id(key, id)
    }
    fn is_member(&mut self, key: &ChannelKey, uid: &Uid) -> Result<bool, StorageError> {
        self.inner.is_member(key, uid)
    }
    fn conversation(
        &mut self,
        uid: &Uid,
        key: &ChannelKey,
    ) -> Result<Option<ConversationRecord>, StorageError> {
        self.inner.conversation(uid, key)
    }
    fn conversations(
        &mut self,
        uid: &Uid,
    ) -> Result<Vec<(ChannelKey, ConversationRecord)>, StorageError> {
        self.inner.conversations(uid)
    }
    fn list(
        &mut self,
        key: &ChannelKey,
        kind: ListKind,
        limit: usize,
    ) -> Result<Vec<Uid>, StorageError> {
        self.inner.list(key, kind, limit)
    }
    fn list_contains(
        &mut self,
        key: &ChannelKey,
        kind: ListKind,
        uid: &Uid,
    ) -> Result<bool, StorageError> {
        self.inner.list_contains(key, kind, uid)
    }
    fn prepare_device_acks(
        &mut self,
        rows: &[crate::storage::DeviceAck],
        sessions: &[crate::storage::DeviceSession],
    ) -> Result<CommitJob, StorageError> {
        self.inner.prepare_device_acks(rows, sessions)
    }
    fn device_position(
        &mut self,
        uid: &Uid,
        device_id: &str,
        key: &ChannelKey,
    ) -> Result<crate::storage::DevicePosition, StorageError> {
        self.inner.device_position(uid, device_id, key)
    }
    fn device_session(
        &mut self,
        uid: &Uid,
        device_id: &str,
    ) -> Result<Option<crate::storage::SessionRecord>, StorageError> {
        self.inner.device_session(uid, device_id)
    }
    fn ids_issued(&mut self) -> Result<MessageId, StorageError> {
        self.inner.ids_issued()
    }
    fn log_applied(&mut self, partition: u32) -> Result<u64, StorageError> {
        self.inner.log_applied(partition)
    }
    fn user_token(&mut self, uid: &Uid, device_flag: u8) -> Result<Option<String>, StorageError> {
        self.inner.user_token(uid, device_flag)
    }
}

/// Finding 11: a storage error while refilling a device's window from
/// its backlog dropped the backlog until the device reconnected. Now
/// the backlog stays and the next retry tick reads it again.
#[test]
fn a_backlog_read_that_fails_is_read_again_at_the_next_tick() {
    let storage = MemoryStorage::default();
    let fail_reads = Rc::new(std::cell::Cell::new(false));
    let store = Box::new(FlakyReads {
        inner: storage.open_shard(ShardId(0)).unwrap(),
        fail_reads: Rc::clone(&fail_reads),
    });
    let limits = Limits {
        inflight_messages_max: 1,
        ..Limits::default()
    };
    let mut state = lone_shard_on(store, limits);
    let (alice, _alice_out) = connect(&mut state, "alice", false);
    let (bob, bob_out) = connect(&mut state, "bob", true);
    let _ = packets(&bob_out);
    for no in ["m1", "m2", "m3"] {
        state.on_frame(alice, &send_frame("bob", ChannelType::Person, no), now());
    }
    state.commit(now());
    assert_eq!(recv_seqs(packets(&bob_out)), vec![1], "a window of one");
    // The disk errs just as the ack opens the window.
    fail_reads.set(true);
    let ack = Packet::RecvAck(RecvAck {
        message_id: 0,
        message_seq: 1,
        channel_id: "alice".into(),
        channel_type: ChannelType::Person,
        through: true,
    });
    state.on_frame(bob, &frame(&ack), now());
    assert!(recv_seqs(packets(&bob_out)).is_empty());
    fail_reads.set(false);
    state.retry_due(now());
    assert_eq!(
        recv_seqs(packets(&bob_out)),
        vec![2],
        "read again at the next tick"
    );
}

/// A connection cut off for not acknowledging a push (given up after
/// every redelivery) went on being refilled from its backlog: the
/// device's own sends above the push, no longer pending, moved its saved
/// position past it, and its next resume skipped the message it never
/// acknowledged. Now a closing connection is not refilled.
#[test]
fn a_connection_given_up_on_does_not_move_its_position_past_the_push_it_never_acknowledged() {
    let storage = MemoryStorage::default();
    let limits = Limits {
        inflight_messages_max: 1,
        ..Limits::default()
    };
    let mut state = lone_shard_on(storage.open_shard(ShardId(0)).unwrap(), limits);
    let (bob, _bob_out) = connect(&mut state, "bob", false);
    state.on_frame(bob, &send_frame("alice", ChannelType::Person, "b1"), now());
    state.commit(now());
    // Alice's phone sends seqs 2 and 3 (it has them), then goes away.
    let (alice, _alice_out) = connect(&mut state, "alice", false);
    for no in ["a1", "a2"] {
        state.on_frame(alice, &send_frame("bob", ChannelType::Person, no), now());
    }
    state.commit(now());
    state.on_closed(alice);
    // It resumes: seq 1 fills its window of one, its own sends wait.
    let (alice, alice_out) = connect(&mut state, "alice", true);
    assert_eq!(recv_seqs(packets(&alice_out)), vec![1]);
    // It never acknowledges: redelivered until the shard gives up.
    let mut at = now();
    for _ in 0..20 {
        at.monotonic = Millis(at.monotonic.0 + 60_000);
        state.retry_due(at);
    }
    state.on_closed(alice);
    let key = ChannelKey::person(&Uid::new("alice"), &Uid::new("bob"));
    let position = state
        .store
        .device_position(&Uid::new("alice"), "phone", &key)
        .unwrap();
    assert_eq!(position.acked, Seq(0), "seq 1 was never acknowledged");
    let (_alice, alice_out) = connect(&mut state, "alice", true);
    assert_eq!(
        recv_seqs(packets(&alice_out)),
        vec![1],
        "it comes again on resume"
    );
}

fn send_frame(to: &str, channel_type: ChannelType, client_msg_no: &str) -> Bytes {
    frame(&Packet::Send(SendPacket {
        client_seq: 1,
        client_msg_no: client_msg_no.into(),
        channel_id: to.to_owned(),
        channel_type,
        flags: 0,
        payload: Bytes::from_static(b"hi"),
    }))
}

fn group_change(state: &mut ShardState, group: &str, uids: &[&str], change: SetChange) {
    let (tx, _rx) = async_channel::bounded(1);
    let uids = uids.iter().map(|u| (*u).to_owned()).collect();
    state.change_group(group, uids, change, tx, now());
}

/// Finding 1: a removal queued before a member's send takes effect
/// first: the send is refused, and no conversation row comes back for
/// the removed member once both are committed.
#[test]
fn a_member_removed_while_the_removal_is_being_committed_cannot_send_nor_get_a_row_back() {
    let storage = MemoryStorage::default();
    let mut state = lone_shard(&storage);
    group_change(&mut state, "club", &["alice", "bob"], SetChange::Replace);
    state.commit(now());
    let (alice, alice_out) = connect(&mut state, "alice", false);
    let _ = packets(&alice_out);
    state.on_frame(alice, &send_frame("club", ChannelType::Group, "m1"), now());
    state.commit(now());
    group_change(&mut state, "club", &["alice"], SetChange::Remove);
    state.on_frame(alice, &send_frame("club", ChannelType::Group, "m2"), now());
    state.commit(now());
    let acks: Vec<ReasonCode> = packets(&alice_out)
        .into_iter()
        .filter_map(|p| match p {
            Packet::SendAck(ack) => Some(ack.reason),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![ReasonCode::Success, ReasonCode::NotMember]);
    let key = ChannelKey::group("club");
    assert_eq!(
        state.store.conversation(&Uid::new("alice"), &key).unwrap(),
        None
    );
    assert!(state
        .store
        .conversation(&Uid::new("bob"), &key)
        .unwrap()
        .is_some());
}

/// Finding 6: a member added in the same commit batch as the group's
/// first message gets the conversation the first message writes.
#[test]
fn a_member_added_in_the_batch_of_the_groups_first_message_gets_its_conversation() {
    let storage = MemoryStorage::default();
    let mut state = lone_shard(&storage);
    group_change(&mut state, "club", &["alice", "bob"], SetChange::Replace);
    state.commit(now());
    let (alice, _out) = connect(&mut state, "alice", false);
    group_change(&mut state, "club", &["carol"], SetChange::Add);
    state.on_frame(
        alice,
        &send_frame("club", ChannelType::Group, "first"),
        now(),
    );
    state.commit(now());
    let key = ChannelKey::group("club");
    let carol = state.store.conversation(&Uid::new("carol"), &key).unwrap();
    let carol = carol.expect("carol has the conversation");
    assert_eq!(carol.unread(1), 1);
    assert!(carol.visible(1));
}

/// Finding 7: clearing unread (or deleting) right behind one's own send,
/// before it is committed, leaves nothing unread.
#[test]
fn clearing_unread_right_behind_ones_own_uncommitted_send_leaves_nothing_unread() {
    for action in [ConversationAction::ClearUnread, ConversationAction::Delete] {
        let storage = MemoryStorage::default();
        let mut state = lone_shard(&storage);
        let (alice, alice_out) = connect(&mut state, "alice", false);
        let (bob, _bob_out) = connect(&mut state, "bob", false);
        state.on_frame(
            bob,
            &send_frame("alice", ChannelType::Person, "from-bob"),
            now(),
        );
        state.commit(now());
        state.on_frame(
            alice,
            &send_frame("bob", ChannelType::Person, "mine"),
            now(),
        );
        let op = Packet::ConversationOp(ConversationOp {
            request_id: 7,
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            action,
            unread: 0,
        });
        state.on_frame(alice, &frame(&op), now());
        state.commit(now());
        let _ = packets(&alice_out);
        let key = ChannelKey::person(&Uid::new("alice"), &Uid::new("bob"));
        let row = state.store.conversation(&Uid::new("alice"), &key).unwrap();
        assert_eq!(row.unwrap().unread(2), 0, "{action:?}");
    }
}

/// The seqs of the `Recv`s among `packets`.
fn recv_seqs(packets: Vec<Packet>) -> Vec<u64> {
    packets
        .into_iter()
        .filter_map(|p| match p {
            Packet::Recv(r) => Some(r.message_seq),
            _ => None,
        })
        .collect()
}

/// A member added behind a message not stored yet gets a row read and
/// deleted up to the join; clearing or deleting the conversation before
/// the join is stored must not move it below, or the device is pushed
/// what was sent before it joined (seeds 9273, 7658, 7393).
#[test]
fn a_conversation_op_before_ones_join_is_stored_keeps_the_join_floor() {
    for action in [ConversationAction::ClearUnread, ConversationAction::Delete] {
        let storage = MemoryStorage::default();
        let mut state = lone_shard(&storage);
        group_change(&mut state, "club", &["alice", "bob"], SetChange::Replace);
        state.commit(now());
        let (alice, _alice_out) = connect(&mut state, "alice", false);
        let (carol, _carol_out) = connect(&mut state, "carol", false);
        state.on_frame(alice, &send_frame("club", ChannelType::Group, "m1"), now());
        state.commit(now());
        // Seq 2 is handed out, not stored; carol joins after it.
        state.on_frame(alice, &send_frame("club", ChannelType::Group, "m2"), now());
        group_change(&mut state, "club", &["carol"], SetChange::Add);
        let op = Packet::ConversationOp(ConversationOp {
            request_id: 7,
            channel_id: "club".into(),
            channel_type: ChannelType::Group,
            action,
            unread: 0,
        });
        state.on_frame(carol, &frame(&op), now());
        state.commit(now());
        let key = ChannelKey::group("club");
        let row = state.store.conversation(&Uid::new("carol"), &key).unwrap();
        let row = row.expect("carol has a row");
        assert_eq!((row.read_floor, row.deleted_seq), (2, 2), "{action:?}");
        assert_eq!(row.unread(2), 0, "{action:?}");
        // Her device resumes: nothing from before she joined.
        let (_again, out) = connect(&mut state, "carol", true);
        assert_eq!(recv_seqs(packets(&out)), Vec::<u64>::new(), "{action:?}");
    }
}

/// A device behind in a group (its window full, the rest waiting in
/// storage) is removed, then added again before its backlog drains:
/// the backlog must not stretch over what was sent while it was out
/// (seed 7808).
#[test]
fn a_backlog_does_not_span_the_seqs_sent_while_its_member_was_out() {
    let storage = MemoryStorage::default();
    let limits = Limits {
        inflight_messages_max: 1,
        ..Limits::default()
    };
    let mut state = lone_shard_on(storage.open_shard(ShardId(0)).unwrap(), limits);
    group_change(&mut state, "club", &["alice", "bob"], SetChange::Replace);
    state.commit(now());
    let (alice, _alice_out) = connect(&mut state, "alice", false);
    let (bob, bob_out) = connect(&mut state, "bob", false);
    let _ = packets(&bob_out);
    for no in ["m1", "m2"] {
        state.on_frame(alice, &send_frame("club", ChannelType::Group, no), now());
    }
    state.commit(now());
    let mut pushed = recv_seqs(packets(&bob_out));
    assert_eq!(pushed, vec![1], "a window of one: seq 2 waits in storage");
    group_change(&mut state, "club", &["bob"], SetChange::Remove);
    state.commit(now());
    state.on_frame(alice, &send_frame("club", ChannelType::Group, "m3"), now());
    state.commit(now());
    group_change(&mut state, "club", &["bob"], SetChange::Add);
    state.commit(now());
    state.on_frame(alice, &send_frame("club", ChannelType::Group, "m4"), now());
    state.commit(now());
    // Bob acknowledges everything he gets, until nothing more comes.
    for _ in 0..8 {
        let through = *pushed.last().unwrap();
        let ack = Packet::RecvAck(RecvAck {
            message_id: 0,
            message_seq: through,
            channel_id: "club".into(),
            channel_type: ChannelType::Group,
            through: true,
        });
        state.on_frame(bob, &frame(&ack), now());
        state.retry_due(now());
        let more = recv_seqs(packets(&bob_out));
        if more.is_empty() {
            break;
        }
        pushed.extend(more);
    }
    assert!(
        !pushed.contains(&3),
        "seq 3 was sent while bob was out: {pushed:?}"
    );
    assert!(pushed.contains(&4), "{pushed:?}");
}

/// A group deleted, created again and deleted again before the first
/// delete is stored: when the first lands, the second is still being
/// committed and the group must stay gone, not be read back from
/// storage (where the second incarnation still exists) and take sends
/// and changes (seeds 7406, 8016, 8619, 7335).
#[test]
fn a_group_deleted_twice_stays_gone_while_the_second_delete_is_committed() {
    let storage = MemoryStorage::default();
    let mut state = lone_shard(&storage);
    let key = ChannelKey::group("club");
    group_change(&mut state, "club", &["alice", "bob"], SetChange::Replace);
    state.commit(now());
    let (alice, alice_out) = connect(&mut state, "alice", false);
    let _ = packets(&alice_out);
    let (tx, _first) = async_channel::bounded(1);
    state.api(
        ApiRequest::DeleteGroup {
            channel: key.clone(),
        },
        tx,
        now(),
    );
    group_change(&mut state, "club", &["alice", "bob"], SetChange::Replace);
    let (job, in_flight) = state.begin_commit(now()).expect("a batch");
    // While the first delete and the re-creation are written, the group
    // is deleted again.
    let (tx, second) = async_channel::bounded(1);
    state.api(
        ApiRequest::DeleteGroup {
            channel: key.clone(),
        },
        tx,
        now(),
    );
    let result = job();
    state.finish_commit(in_flight, result, now());
    state.on_frame(alice, &send_frame("club", ChannelType::Group, "m1"), now());
    let (tx, list) = async_channel::bounded(1);
    state.change_list(
        key.clone(),
        ListKind::Allow,
        vec!["alice".into()],
        SetChange::Add,
        tx,
    );
    state.commit(now());
    assert!(matches!(second.try_recv(), Ok(ApiResponse::Deleted { .. })));
    let acks: Vec<ReasonCode> = packets(&alice_out)
        .into_iter()
        .filter_map(|p| match p {
            Packet::SendAck(ack) => Some(ack.reason),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![ReasonCode::ChannelMissing]);
    assert!(
        list.try_recv().unwrap().is_err(),
        "a list of a deleted group"
    );
    assert!(state
        .store
        .list(&key, ListKind::Allow, 10)
        .unwrap()
        .is_empty());
}

/// Finding 3: a conversation change stamped with a version is visible
/// only once its batch commits. A sync that answered a later version
/// (committed first, on another shard) while an earlier one was still
/// being committed moved the client past it for good.
#[test]
fn an_incremental_conversation_sync_misses_no_change_committed_after_it() {
    let storage = MemoryStorage::default();
    let on_shard = |shard: u16| {
        let group = (0..)
            .map(|i| format!("g{i}"))
            .find(|id| ChannelKey::group(id).shard(2) == ShardId(shard))
            .unwrap();
        storage
            .open_shard(ShardId(shard))
            .unwrap()
            .commit(&[Mutation::PutGroup {
                key: ChannelKey::group(&group),
                members: vec![Uid::new("alice"), Uid::new("bob")],
                last_seq: Seq(0),
                last_message_id: MessageId(0),
            }])
            .unwrap();
        group
    };
    let (first, second) = (on_shard(0), on_shard(1));
    let mut shards = [shard(&storage, 0), shard(&storage, 1)];
    let versions = VersionFrontier::new(2);
    for state in shards.iter_mut() {
        state.share_versions(Arc::clone(&versions));
    }
    let (alice, _alice_out) = connect(&mut shards[0], "alice", false);
    let (bob, bob_out) = connect(&mut shards[1], "bob", false);
    pump(&mut shards);
    packets(&bob_out);

    // Alice writes to the group shard 0 owns (queued there, not
    // committed yet), then to the one shard 1 owns, which commits first.
    shards[0].on_frame(alice, &send_frame(&first, ChannelType::Group, "m1"), now());
    shards[0].on_frame(alice, &send_frame(&second, ChannelType::Group, "m2"), now());
    for message in shards[0].take_outgoing(ShardId(1), usize::MAX) {
        shards[1].on_remote(message, now());
    }
    shards[1].commit(now());

    let sync = |since_version: u64| {
        frame(&Packet::SyncConversations(SyncConversations {
            request_id: 1,
            since_version,
            limit: 100,
            unread_only: false,
        }))
    };
    let synced = |out: &Outbox| -> Vec<Conversation> {
        packets(out)
            .into_iter()
            .find_map(|p| match p {
                Packet::SyncConversationsResp(r) => Some(r.conversations),
                _ => None,
            })
            .expect("a sync answer")
    };
    shards[1].on_frame(bob, &sync(0), now());
    let early = synced(&bob_out);
    let cursor = early.iter().map(|c| c.version).max().unwrap_or(0);

    pump(&mut shards);
    shards[1].on_frame(bob, &sync(cursor), now());
    let mut seen: Vec<String> = early
        .into_iter()
        .chain(synced(&bob_out))
        .map(|c| c.channel_id)
        .collect();
    seen.sort();
    seen.dedup();
    let mut both = vec![first, second];
    both.sort();
    assert_eq!(seen, both, "a sync from version {cursor} missed a change");
}

#[test]
fn message_ids_grow_and_never_collide_across_shards() {
    let mut a = MessageIdGenerator::new(ShardId(0));
    let mut b = MessageIdGenerator::new(ShardId(1));
    let mut seen = std::collections::HashSet::new();
    let mut last = 0;
    for i in 0..10_000u64 {
        // Many ids in the same millisecond, and a clock that steps back.
        let now = ID_EPOCH_UNIX_MS + 5 + (i / 5000) - (i % 3);
        let id = a.next(now).0;
        assert!(id > last);
        last = id;
        assert!(seen.insert(id));
        assert!(seen.insert(b.next(now).0));
    }
}

/// A send, a conversation change, a recall and a list change that reach
/// the owner while a group's deletion is being committed wait for it: the
/// deletion failed here (a storage error), so the group is still there and
/// they are served as if it had never been asked for (they were refused
/// `channel_missing` at once, though the group went on existing).
#[test]
fn requests_during_a_group_deletion_that_fails_are_served_by_the_group() {
    let storage = MemoryStorage::default();
    let mut state = lone_shard(&storage);
    let key = ChannelKey::group("club");
    group_change(&mut state, "club", &["alice", "bob"], SetChange::Replace);
    let (alice, alice_out) = connect(&mut state, "alice", true);
    state.on_frame(alice, &send_frame("club", ChannelType::Group, "m1"), now());
    state.commit(now());
    let _ = packets(&alice_out);
    let (tx, deleted) = async_channel::bounded(1);
    state.api(
        ApiRequest::DeleteGroup {
            channel: key.clone(),
        },
        tx,
        now(),
    );
    let (job, in_flight) = state.begin_commit(now()).expect("the deletion");
    drop(job);
    // While it is written:
    state.on_frame(alice, &send_frame("club", ChannelType::Group, "m2"), now());
    let op = Packet::ConversationOp(ConversationOp {
        request_id: 7,
        channel_id: "club".into(),
        channel_type: ChannelType::Group,
        action: ConversationAction::ClearUnread,
        unread: 0,
    });
    state.on_frame(alice, &frame(&op), now());
    let recall = Packet::Recall(Recall {
        request_id: 8,
        channel_id: "club".into(),
        channel_type: ChannelType::Group,
        message_id: 0,
        client_msg_no: "m1".into(),
    });
    state.on_frame(alice, &frame(&recall), now());
    let (tx, list) = async_channel::bounded(1);
    state.change_list(
        key.clone(),
        ListKind::Deny,
        vec!["carol".into()],
        SetChange::Add,
        tx,
    );
    assert!(
        packets(&alice_out).is_empty(),
        "nothing is answered before the deletion lands or fails"
    );
    state.finish_commit(in_flight, Err(StorageError::Io("disk".into())), now());
    state.commit(now());
    assert!(matches!(
        deleted.try_recv(),
        Ok(ApiResponse::Failed(ReasonCode::StorageError))
    ));
    let mut acks = Vec::new();
    let mut ops = Vec::new();
    let mut recalls = Vec::new();
    for packet in packets(&alice_out) {
        match packet {
            Packet::SendAck(ack) => acks.push((ack.reason, ack.message_seq)),
            Packet::ConversationOpResp(resp) => ops.push(resp.reason),
            Packet::RecallResp(resp) => recalls.push(resp.reason),
            _ => {}
        }
    }
    assert_eq!(acks, vec![(ReasonCode::Success, 2)]);
    assert_eq!(ops, vec![ReasonCode::Success]);
    assert_eq!(recalls, vec![ReasonCode::Success]);
    assert_eq!(list.try_recv().unwrap().unwrap(), vec!["carol".to_owned()]);
    assert!(state.store.message(&key, Seq(2)).unwrap().is_some());
}

/// Webhooks on, with every event (nothing posts them: they stay in the
/// outbox, where the test reads them).
fn with_webhooks(state: &mut ShardState) {
    let config = crate::config::WebhookConfig {
        url: "http://127.0.0.1:9/hook".into(),
        secret: "s".into(),
        ..crate::config::WebhookConfig::default()
    };
    state.set_webhooks(crate::webhook::WebhookWriter::new(
        &config,
        Arc::new(crate::webhook::WebhookShared::default()),
    ));
}

/// `msg.offline` events in the outbox, as (message's client_msg_no, to_uids).
fn offline_events(storage: &MemoryStorage) -> Vec<(String, Vec<String>)> {
    storage
        .webhook_events(ShardId(0), 0, 1000)
        .unwrap()
        .into_iter()
        .filter(|(_, record)| record.event == crate::webhook::EVENT_OFFLINE)
        .map(|(_, record)| {
            let body: serde_json::Value = serde_json::from_slice(&record.body).unwrap();
            let no = body["client_msg_no"].as_str().unwrap().to_owned();
            let to = body["to_uids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u.as_str().unwrap().to_owned())
                .collect();
            (no, to)
        })
        .collect()
}

/// Finding 5: a user counted online when a message was committed got no
/// `msg.offline` for it, and if their only connection was half-open or
/// stalled it never reached them: nothing caught up. Now, when a user's
/// last connection closes owing them live messages (pushed and not
/// acknowledged), each gets a late `msg.offline` naming them; a message a
/// device acknowledged gets none, and neither does one while another of
/// the user's devices is online.
#[test]
fn a_user_whose_last_connection_closes_owing_messages_gets_a_late_offline_event() {
    let storage = MemoryStorage::default();
    let mut state = lone_shard(&storage);
    with_webhooks(&mut state);
    let (alice_phone, phone_out) = connect_device(&mut state, "alice", "phone", true);
    let (alice_web, web_out) = connect_device(&mut state, "alice", "web", true);
    let (bob, _bob_out) = connect(&mut state, "bob", true);
    for no in ["m1", "m2"] {
        state.on_frame(bob, &send_frame("alice", ChannelType::Person, no), now());
    }
    state.commit(now());
    assert!(offline_events(&storage).is_empty(), "alice was online");
    // The phone acknowledges m1 only; the web tab acknowledges nothing.
    let m1 = packets(&phone_out)
        .into_iter()
        .find_map(|p| match p {
            Packet::Recv(recv) if recv.client_msg_no == "m1" => Some(recv),
            _ => None,
        })
        .expect("m1 pushed to the phone");
    let ack = Packet::RecvAck(RecvAck {
        message_id: m1.message_id,
        channel_id: "bob".into(),
        channel_type: ChannelType::Person,
        message_seq: m1.message_seq,
        through: false,
    });
    state.on_frame(alice_phone, &frame(&ack), now());
    assert_eq!(recv_seqs(packets(&web_out)), vec![1, 2]);
    // The web tab goes while the phone is online: nothing.
    state.on_closed(alice_web);
    state.commit(now());
    assert!(offline_events(&storage).is_empty(), "the phone is online");
    // The phone goes owing m2.
    state.on_closed(alice_phone);
    state.commit(now());
    assert_eq!(
        offline_events(&storage),
        vec![("m2".to_owned(), vec!["alice".to_owned()])]
    );
}

/// Finding 5, a write-stalled connection: what came live and waits behind
/// its full window (not pushed yet) is owed too.
#[test]
fn messages_waiting_behind_a_closing_connections_window_get_a_late_offline_event() {
    let storage = MemoryStorage::default();
    let limits = Limits {
        inflight_messages_max: 1,
        ..Limits::default()
    };
    let mut state = lone_shard_on(storage.open_shard(ShardId(0)).unwrap(), limits);
    with_webhooks(&mut state);
    let (alice, alice_out) = connect(&mut state, "alice", true);
    let (bob, _bob_out) = connect(&mut state, "bob", true);
    for no in ["m1", "m2", "m3"] {
        state.on_frame(bob, &send_frame("alice", ChannelType::Person, no), now());
    }
    state.commit(now());
    assert_eq!(recv_seqs(packets(&alice_out)), vec![1], "a window of one");
    state.close(alice, ReasonCode::SlowConsumer, "stalled", now());
    state.retry_due(now());
    state.on_closed(alice);
    state.commit(now());
    let owed: Vec<String> = offline_events(&storage)
        .into_iter()
        .map(|(no, to)| {
            assert_eq!(to, vec!["alice".to_owned()]);
            no
        })
        .collect();
    assert_eq!(owed, vec!["m1", "m2", "m3"]);
}

/// A moment on the budget's clock (the other fields as `now()`).
fn at_micros(micros: u64) -> Now {
    Now { micros, ..now() }
}

/// The latency budget follows a send across shards: each stage is the
/// time between the events that bound it, on the clock the shards share.
#[test]
fn the_latency_budget_times_each_stage_of_a_send_across_shards() {
    let storage = MemoryStorage::default();
    let group = group_of_alice_and_bob(&storage);
    let mut shards = [shard(&storage, 0), shard(&storage, 1)];
    let (alice, alice_out) = connect(&mut shards[1], "alice", false);
    let (_bob, bob_out) = connect(&mut shards[0], "bob", false);
    pump(&mut shards);
    packets(&alice_out);
    packets(&bob_out);
    shards[1].on_frame(alice, &first_send(&group), at_micros(10_000));
    for message in shards[1].take_outgoing(ShardId(0), usize::MAX) {
        shards[0].on_remote(message, at_micros(10_100));
    }
    let (job, in_flight) = shards[0].begin_commit(at_micros(10_300)).unwrap();
    let result = job();
    shards[0].finish_commit(in_flight, result, at_micros(10_600));
    for message in shards[0].take_outgoing(ShardId(1), usize::MAX) {
        shards[1].on_remote(message, at_micros(10_700));
    }
    assert!(matches!(packets(&alice_out)[..], [Packet::SendAck(_)]));
    assert!(matches!(packets(&bob_out)[..], [Packet::Recv(_)]));
    let mut budget = shards[0].current_stats().budget;
    budget.merge(&shards[1].current_stats().budget);
    let timed: Vec<(&str, u64, u64)> = Stage::ALL
        .iter()
        .filter(|s| !matches!(s, Stage::Flush | Stage::RecvAck))
        .map(|s| {
            (
                s.name(),
                budget.count[*s as usize],
                budget.sum_us[*s as usize],
            )
        })
        .collect();
    assert_eq!(
        timed,
        vec![
            ("route", 1, 100),
            ("queue", 1, 200),
            ("write", 1, 300),
            ("ack_return", 1, 100),
            // Bob's shard is the owner (0); the sender's own shard hears of
            // it too (for her other devices), 100 µs later.
            ("fanout", 2, 100),
            ("send_ack", 1, 700),
            ("delivered", 1, 600),
        ]
    );
}

/// A record another node wrote, followed here: stored once with this
/// node's conversation versions above the writer's ids, pushed to this
/// node's devices of both people except the one that sent it, and a
/// group change in it takes the removed member out of what follows.
#[test]
fn a_followed_record_is_stored_with_versions_above_the_writers_and_pushed_to_local_devices_but_the_senders(
) {
    let storage = MemoryStorage::default();
    let mut shards = [shard(&storage, 0), shard(&storage, 1)];
    let (_bob, bob_out) = connect(&mut shards[0], "bob", false);
    let (_phone, phone_out) = connect_device(&mut shards[1], "alice", "phone", false);
    let (_tablet, tablet_out) = connect_device(&mut shards[1], "alice", "tablet", false);
    pump(&mut shards);
    for outbox in [&bob_out, &phone_out, &tablet_out] {
        packets(outbox);
    }

    // The writer's ids are 10 s ahead of this node's clock.
    let ahead_ms = crate::time::unix_now_ms() - ID_EPOCH_UNIX_MS + 10_000;
    let writer_id = MessageId(ahead_ms << crate::shard::versions::ID_MS_SHIFT);
    let (alice, bob) = (Uid::new("alice"), Uid::new("bob"));
    let chat = ChannelKey::person(&alice, &bob);
    let group = ChannelKey::group("team");
    let message = |id: u64, seq: u64, channel: &ChannelKey, from_device: &str| {
        Mutation::Message(Arc::new(StoredMessage {
            message_id: MessageId(writer_id.0 + id),
            seq: Seq(seq),
            channel: channel.clone(),
            from_uid: alice.clone(),
            from_device: Arc::from(from_device),
            client_msg_no: format!("c{seq}-{}", channel.id()),
            timestamp_ms: 0,
            send_flags: 0,
            payload: Bytes::from_static(b"x"),
            recalled: false,
        }))
    };
    let row = ConversationRecord {
        read_floor: 0,
        deleted_seq: 0,
        own_above_floor: 0,
        version: writer_id.0,
    };
    let record = crate::cluster::record::LogRecord {
        partition: 3,
        writer: crate::cluster::record::Writer { node: 2, epoch: 1 },
        mutations: vec![
            Mutation::PutGroup {
                key: group.clone(),
                members: vec![alice.clone(), bob.clone()],
                last_seq: Seq(0),
                last_message_id: MessageId(0),
            },
            message(1, 1, &chat, "phone"),
            Mutation::Conversation {
                uid: bob.clone(),
                key: chat.clone(),
                record: row,
            },
            message(2, 1, &group, "phone"),
            // Bob leaves the group; what follows is not his.
            Mutation::PutGroup {
                key: group.clone(),
                members: vec![alice.clone()],
                last_seq: Seq(1),
                last_message_id: MessageId(writer_id.0 + 2),
            },
            message(3, 2, &group, "phone"),
            Mutation::IdsIssued(MessageId(writer_id.0 + 3)),
        ],
    };
    shards[0].follow_log(3, 41, &record, false, now()).unwrap();
    pump(&mut shards);

    let seqs = |outbox: &Outbox| -> Vec<(String, u64)> {
        packets(outbox)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Recv(r) => Some((r.channel_id, r.message_seq)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        seqs(&bob_out),
        [("alice".to_string(), 1), ("team".to_string(), 1)]
    );
    assert!(seqs(&phone_out).is_empty(), "the sending device is skipped");
    assert_eq!(
        seqs(&tablet_out),
        [
            ("bob".to_string(), 1),
            ("team".to_string(), 1),
            ("team".to_string(), 2)
        ]
    );
    let mut store = storage.open_shard(ShardId(0)).unwrap();
    assert_eq!(store.log_applied(3).unwrap(), 41);
    let stored = store.conversation(&bob, &chat).unwrap().unwrap();
    assert!(
        stored.version > writer_id.0 + 3,
        "version {} not above the writer's ids",
        stored.version
    );
    assert_eq!(
        store
            .read_messages(&group, Seq(1), 10, ReadDirection::Up)
            .unwrap()
            .len(),
        2
    );
}

/// Two shards of a cluster node that owns every one of 8 partitions, all
/// on shard 1, and the places they share.
fn cluster_node(storage: &MemoryStorage) -> ([ShardState; 2], Arc<crate::key::Places>) {
    let mut shards = [shard(storage, 0), shard(storage, 1)];
    let places = crate::key::Places::new(
        &[crate::key::Place {
            shard: ShardId(1),
            owned: true,
        }; 8],
    );
    for state in shards.iter_mut() {
        state.set_routing(crate::key::Routing::Partitions {
            places: Arc::clone(&places),
        });
    }
    (shards, places)
}

/// The reasons of the `SendAck`s queued for a connection.
fn send_acks(outbox: &Outbox) -> Vec<ReasonCode> {
    packets(outbox)
        .into_iter()
        .filter_map(|p| match p {
            Packet::SendAck(ack) => Some(ack.reason),
            _ => None,
        })
        .collect()
}

#[test]
fn a_shard_that_lets_a_partition_go_refuses_what_was_routed_to_it_and_its_node_forwards_the_rest() {
    let storage = MemoryStorage::default();
    let (mut shards, places) = cluster_node(&storage);
    let (alice, alice_out) = connect(&mut shards[0], "alice", false);
    pump(&mut shards);
    packets(&alice_out);
    let partition = places.partition_of(&ChannelKey::person(&Uid::new("alice"), &Uid::new("bob")));

    // Routed to shard 1 while the node owned the partition; another node
    // takes it over before shard 1 reads it: refused, retryable.
    shards[0].on_frame(alice, &send_frame("bob", ChannelType::Person, "m1"), now());
    shards[1].release_partition(partition, now());
    pump(&mut shards);
    assert_eq!(send_acks(&alice_out), [ReasonCode::ServerBusy]);
    assert!(shards[1].take_forwards().is_empty());

    // The resend goes to the node that owns it now.
    shards[0].on_frame(alice, &send_frame("bob", ChannelType::Person, "m1"), now());
    pump(&mut shards);
    assert!(send_acks(&alice_out).is_empty());
    let forwards = shards[0].take_forwards();
    assert_eq!(forwards.len(), 1);
    assert_eq!(forwards[0].partition, partition);

    // Taken back (caught up and fenced): written here again.
    shards[1].own_partition(partition);
    shards[0].on_frame(alice, &send_frame("bob", ChannelType::Person, "m1"), now());
    pump(&mut shards);
    assert_eq!(send_acks(&alice_out), [ReasonCode::Success]);
    assert!(shards[0].take_forwards().is_empty());
}

#[test]
fn a_node_whose_lease_lapsed_answers_nothing_about_its_partitions_not_even_a_refusal() {
    let storage = MemoryStorage::default();
    let (mut shards, places) = cluster_node(&storage);
    let (alice, alice_out) = connect(&mut shards[0], "alice", false);
    pump(&mut shards);
    packets(&alice_out);

    // Its store knows no group g1, but another node may have taken the
    // partition over and made it: a lapsed node must not say it is missing
    // (a client takes that as final); it refuses, retryable.
    places.set_serving(false);
    shards[0].on_frame(alice, &send_frame("g1", ChannelType::Group, "m1"), now());
    pump(&mut shards);
    assert_eq!(send_acks(&alice_out), [ReasonCode::ServerBusy]);
    assert!(shards[0].take_forwards().is_empty());

    // Renewed (and still owning the partition): answered from its store.
    places.set_serving(true);
    shards[0].on_frame(alice, &send_frame("g1", ChannelType::Group, "m2"), now());
    pump(&mut shards);
    assert_eq!(send_acks(&alice_out), [ReasonCode::ChannelMissing]);
}
