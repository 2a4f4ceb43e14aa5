//! Costs of the paths between shards, connections and storage, each against
//! a stated baseline so a regression shows as a ratio, not just a number:
//!
//! - cross-shard inbox hop: batches of one `ShardMsg::Deliver` through the
//!   inbox the gateway uses between shards (`shard::mesh::build`: a glommio
//!   `shared_channel` per ordered pair of shards), between two glommio
//!   executors on two threads, set up as the server sets them up (default
//!   `inbox_capacity_batches` and `spin_before_park_us`). "stream": the
//!   producer shard pushes back to back while the consumer shard pops and
//!   drops each batch; time per batch (throughput, the queue rarely idle).
//!   "ping-pong": one batch to the other shard and one back, waiting for
//!   each; time per round trip = two hops (latency, with each side waiting
//!   as an idle shard waits: spinning, then parked). Baseline: the same
//!   batches and the same two-thread protocol through
//!   `std::sync::mpsc::sync_channel` of the same capacity;
//! - channel fan-out to 1,000 members: one `Send` frame to a group of 1,001
//!   members (the sender + 1,000 recipients, each online with one device on
//!   the one shard) through `ShardState::on_frame` and `ShardState::commit`
//!   on `MemoryStorage`, until the `SendAck` and all 1,000 `Recv` frames are
//!   queued in the connections' outboxes (checked). Draining the outboxes
//!   and the devices' acknowledgements (every 16 messages, so in-flight
//!   windows never fill) are outside the timing. Throughput is per
//!   recipient. Baselines: encoding 1,000 `Recv` frames (`encode_recv`), and
//!   copying one encoded frame into 1,000 buffers (the floor: one copy per
//!   outbox);
//! - storage group commit: one commit (`ShardStore::commit`: prepare the
//!   batch, then write it) of N messages with 64-byte payloads appended to
//!   one channel, N = 1, 16, 256, to `RocksStorage` (default storage
//!   settings) with sync off (`SyncPolicy::Never`), and with one WAL fsync
//!   per commit (`SyncPolicy::Always`, the server default) for N = 1 and
//!   256: the fsync amortized over the batch is the point of group commit.
//!   Throughput is per message. Baseline: `MemoryStorage` committing the
//!   same batches. RocksDB lives in a fresh directory under the system temp
//!   dir, removed at the end.
//!
//! Plots are off to keep the whole run near a minute; the figures are in
//! the output and under target/criterion.
//!
//! Run: `cargo bench -p bench-harness --bench shard_paths`.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::channels::shared_channel::{
    ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use ruyi::auth::Authenticator;
use ruyi::channel::ChannelKey;
use ruyi::config::{AuthConfig, AuthMode, Config};
use ruyi::conn::outbox::Outbox;
use ruyi::ids::{ConnId, MessageId, Millis, Seq, ShardId, Uid};
use ruyi::protocol::{
    encode_recv, ChannelType, Connect, DeviceFlag, Encoder, FrameDecoder, Packet, RecvAck,
    RecvFields, SendPacket, VerifyLimits, LENGTH_PREFIX_BYTES, PROTOCOL_VERSION,
};
use ruyi::shard::mesh;
use ruyi::shard::message::{Batch, ShardMsg};
use ruyi::shard::state::{Now, ShardState, Signals};
use ruyi::storage::rocks::RocksOptions;
use ruyi::storage::{
    MemoryStorage, Mutation, RocksStorage, ShardStore, Storage, StoredMessage, SyncPolicy,
};
use std::hint::black_box;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// A committed message as shards pass it around.
fn stored_message(channel: &ChannelKey, seq: u64, payload: &Bytes) -> Arc<StoredMessage> {
    Arc::new(StoredMessage {
        message_id: MessageId(383_070_201_245_077_504 + seq),
        seq: Seq(seq),
        channel: channel.clone(),
        from_uid: Uid::new("alice"),
        from_device: Arc::from("d"),
        client_msg_no: format!("{seq:032x}"),
        timestamp_ms: 1_795_398_253_077,
        send_flags: 0,
        payload: payload.clone(),
        recalled: false,
    })
}

// ---------------------------------------------------------------------------
// 1. Cross-shard inbox hop
// ---------------------------------------------------------------------------

/// The batch a channel's owner sends to the shard of one online member.
fn deliver_batch(message: &Arc<StoredMessage>, recipient: &Uid) -> Batch {
    vec![ShardMsg::Deliver {
        message: Arc::clone(message),
        recipients: std::iter::once(recipient.clone()).collect(),
        skip: None,
        read_us: 0,
        durable_us: 0,
    }]
}

/// The batch the consumer answers (echoes back); every other batch it drops.
fn marker() -> Batch {
    vec![ShardMsg::PresenceAck { conn: ConnId(0) }]
}

fn is_marker(batch: &Batch) -> bool {
    matches!(batch.first(), Some(ShardMsg::PresenceAck { .. }))
}

#[derive(Clone, Copy)]
enum HopRun {
    /// Push `n` batches back to back, then a marker; wait for its echo.
    Stream(u64),
    /// `n` times: push a marker and wait for its echo.
    PingPong(u64),
}

/// Two glommio executors joined by the real inbox mesh of a 2-shard server:
/// shard 0 produces, shard 1 consumes and echoes markers back through its
/// own inbox to shard 0.
struct GlommioHop {
    runs: Option<mpsc::Sender<HopRun>>,
    took: mpsc::Receiver<Duration>,
    threads: Vec<ExecutorJoinHandle<()>>,
}

/// Connects both ends of a shard's pair of inboxes concurrently (a connect
/// waits for its peer), as `shard::runtime::run` does.
async fn connect_pair(
    sender: SharedSender<Batch>,
    receiver: SharedReceiver<Batch>,
) -> (ConnectedSender<Batch>, ConnectedReceiver<Batch>) {
    let sender = glommio::spawn_local(sender.connect());
    let receiver = glommio::spawn_local(receiver.connect());
    (sender.await, receiver.await)
}

fn shard_executor(name: &str, config: &Config) -> LocalExecutorBuilder {
    LocalExecutorBuilder::new(Placement::Unbound)
        .name(name)
        // `ulimit -l` may be small; the inbox needs no I/O buffers.
        .io_memory(512 * 1024)
        .spin_before_park(Duration::from_micros(config.server.spin_before_park_us))
}

impl GlommioHop {
    fn start(config: &Config) -> GlommioHop {
        let mut ends = mesh::build(2, config.server.inbox_capacity_batches);
        let mut one = ends.pop().expect("shard 1");
        let mut zero = ends.pop().expect("shard 0");
        let zero_out = zero.senders[1].take().expect("0 -> 1");
        let zero_in = zero.receivers[1].take().expect("1 -> 0");
        let one_out = one.senders[0].take().expect("1 -> 0");
        let one_in = one.receivers[0].take().expect("0 -> 1");
        let consumer = shard_executor("hop-shard-1", config)
            .spawn(move || async move {
                let (out, inbox) = connect_pair(one_out, one_in).await;
                while let Some(batch) = inbox.recv().await {
                    if is_marker(&batch) {
                        if out.send(batch).await.is_err() {
                            return;
                        }
                    } else {
                        drop(black_box(batch));
                    }
                }
            })
            .expect("start the consumer executor");
        let (runs_tx, runs) = mpsc::channel::<HopRun>();
        let (took_tx, took) = mpsc::channel();
        let producer = shard_executor("hop-shard-0", config)
            .spawn(move || async move {
                let (out, inbox) = connect_pair(zero_out, zero_in).await;
                let message =
                    stored_message(&ChannelKey::group("hop"), 1, &Bytes::from(vec![7; 32]));
                let recipient = Uid::new("bob");
                // Blocking here is fine: this executor has nothing else to do
                // between runs.
                while let Ok(run) = runs.recv() {
                    let started = Instant::now();
                    match run {
                        HopRun::Stream(n) => {
                            for _ in 0..n {
                                out.send(deliver_batch(&message, &recipient)).await.unwrap();
                            }
                            out.send(marker()).await.unwrap();
                            assert!(is_marker(&inbox.recv().await.unwrap()));
                        }
                        HopRun::PingPong(n) => {
                            for _ in 0..n {
                                out.send(marker()).await.unwrap();
                                assert!(is_marker(&inbox.recv().await.unwrap()));
                            }
                        }
                    }
                    took_tx.send(started.elapsed()).unwrap();
                }
            })
            .expect("start the producer executor");
        GlommioHop {
            runs: Some(runs_tx),
            took,
            threads: vec![producer, consumer],
        }
    }

    fn run(&self, run: HopRun) -> Duration {
        self.runs.as_ref().unwrap().send(run).unwrap();
        self.took.recv().unwrap()
    }
}

impl Drop for GlommioHop {
    fn drop(&mut self) {
        // The producer ends, dropping its end of the inbox; the consumer
        // sees it closed and ends too.
        self.runs = None;
        for thread in self.threads.drain(..) {
            thread.join().unwrap();
        }
    }
}

/// The baseline: the same protocol through `std::sync::mpsc` between the
/// bench thread (producer) and one consumer thread.
struct StdHop {
    out: Option<mpsc::SyncSender<Batch>>,
    inbox: mpsc::Receiver<Batch>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StdHop {
    fn start(capacity: usize) -> StdHop {
        let (out, their_inbox) = mpsc::sync_channel::<Batch>(capacity);
        let (their_out, inbox) = mpsc::sync_channel::<Batch>(capacity);
        let thread = std::thread::spawn(move || {
            while let Ok(batch) = their_inbox.recv() {
                if is_marker(&batch) {
                    if their_out.send(batch).is_err() {
                        return;
                    }
                } else {
                    drop(black_box(batch));
                }
            }
        });
        StdHop {
            out: Some(out),
            inbox,
            thread: Some(thread),
        }
    }

    fn run(&self, run: HopRun, message: &Arc<StoredMessage>, recipient: &Uid) -> Duration {
        let out = self.out.as_ref().unwrap();
        let started = Instant::now();
        match run {
            HopRun::Stream(n) => {
                for _ in 0..n {
                    out.send(deliver_batch(message, recipient)).unwrap();
                }
                out.send(marker()).unwrap();
                assert!(is_marker(&self.inbox.recv().unwrap()));
            }
            HopRun::PingPong(n) => {
                for _ in 0..n {
                    out.send(marker()).unwrap();
                    assert!(is_marker(&self.inbox.recv().unwrap()));
                }
            }
        }
        started.elapsed()
    }
}

impl Drop for StdHop {
    fn drop(&mut self) {
        self.out = None;
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

fn inbox_hop(c: &mut Criterion) {
    let config = Config::default();
    let glommio = GlommioHop::start(&config);
    let std_hop = StdHop::start(config.server.inbox_capacity_batches);
    let message = stored_message(&ChannelKey::group("hop"), 1, &Bytes::from(vec![7; 32]));
    let recipient = Uid::new("bob");
    let mut group = c.benchmark_group("cross-shard inbox hop");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(50);
    group.bench_function("baseline: std mpsc, stream, per batch", |b| {
        b.iter_custom(|iters| std_hop.run(HopRun::Stream(iters), &message, &recipient))
    });
    group.bench_function("mesh inbox, stream, per batch", |b| {
        b.iter_custom(|iters| glommio.run(HopRun::Stream(iters)))
    });
    group.bench_function("baseline: std mpsc, ping-pong, per round trip", |b| {
        b.iter_custom(|iters| std_hop.run(HopRun::PingPong(iters), &message, &recipient))
    });
    group.bench_function("mesh inbox, ping-pong, per round trip", |b| {
        b.iter_custom(|iters| glommio.run(HopRun::PingPong(iters)))
    });
    group.finish();
}

// ---------------------------------------------------------------------------
// 2. Channel fan-out to 1,000 members
// ---------------------------------------------------------------------------

const RECIPIENTS: usize = 1_000;
const GROUP_ID: &str = "fanout";
/// Devices acknowledge after this many messages (the window is 256).
const ACK_EVERY: u64 = 16;

/// One frame as the splitter hands it: without its length prefix.
fn frame_of(encoder: &mut Encoder, packet: &Packet) -> Bytes {
    let mut out = BytesMut::new();
    encoder.encode(packet, &mut out);
    Bytes::copy_from_slice(&out[LENGTH_PREFIX_BYTES..])
}

/// One shard (the only one) owning a group of sender + 1,000 recipients,
/// every member online with one device, driven as the runtime drives it but
/// without sockets (as tests/fuzz/src/harness.rs does).
struct FanOut {
    state: ShardState,
    sender: ConnId,
    recipients: Vec<ConnId>,
    outboxes: Vec<Rc<Outbox>>,
    encoder: Encoder,
    scratch: BytesMut,
    payload: Bytes,
    /// Messages sent so far: the group's last seq.
    sent: u64,
    /// Messages the recipients have not acknowledged yet.
    unacked: u64,
}

impl FanOut {
    fn new() -> FanOut {
        let config = Config::default();
        let auth = AuthConfig {
            mode: AuthMode::Off,
            ..AuthConfig::default()
        };
        let storage = MemoryStorage::default();
        let key = ChannelKey::group(GROUP_ID);
        let uids: Vec<Uid> = (0..=RECIPIENTS)
            .map(|i| Uid::new(&format!("member{i:04}")))
            .collect();
        // The group exists in storage, as after a restart.
        let mut members = uids.clone();
        members.sort();
        storage
            .open_shard(ShardId(0))
            .unwrap()
            .commit(&[Mutation::PutGroup {
                key,
                members,
                last_seq: Seq(0),
                last_message_id: MessageId(0),
            }])
            .unwrap();
        let now = now();
        let mut state = ShardState::new(
            ShardId(0),
            1,
            config.limits.clone(),
            config.storage.idempotency_ttl_s * 1000,
            Authenticator::new(&auth),
            storage.open_shard(ShardId(0)).unwrap(),
            Rc::new(Signals::new(1)),
        );
        state.set_retry_policy(config.delivery.retry_policy(), now);
        let mut encoder = Encoder::new();
        let mut conns = Vec::new();
        let mut outboxes = Vec::new();
        for uid in &uids {
            let (conn, outbox) = state.accept(now).unwrap();
            let connect = Packet::Connect(Connect {
                version: PROTOCOL_VERSION,
                uid: uid.as_str().to_owned(),
                token: String::new(),
                device_id: "phone".to_owned(),
                device_flag: DeviceFlag(0),
                client_timestamp_ms: 0,
                resume: false,
            });
            state.on_frame(conn, &frame_of(&mut encoder, &connect), now);
            conns.push(conn);
            outboxes.push(outbox);
        }
        let sender = conns.remove(0);
        let mut fan_out = FanOut {
            state,
            sender,
            recipients: conns,
            outboxes,
            encoder,
            scratch: BytesMut::new(),
            payload: Bytes::from(vec![b'x'; 32]),
            sent: 0,
            unacked: 0,
        };
        fan_out.drain();
        // The first message of a group also writes every member's
        // conversation row: not the steady state.
        fan_out.send(now);
        fan_out.check_first_delivery();
        fan_out.drain();
        fan_out.ack_all(now);
        fan_out
    }

    /// The sender got its `SendAck` and every recipient the `Recv`.
    fn check_first_delivery(&mut self) {
        let decoder = FrameDecoder::new(65536);
        let limits = VerifyLimits::for_frame_size(65536);
        for (i, outbox) in self.outboxes.iter().enumerate() {
            let mut bytes = BytesMut::new();
            outbox.take_into(&mut bytes);
            outbox.wrote(bytes.len());
            let frame = decoder.next_frame(&mut bytes).unwrap().unwrap();
            assert!(bytes.is_empty(), "one frame each");
            match Packet::decode(&frame, &limits).unwrap() {
                Packet::SendAck(ack) if i == 0 => assert_eq!(ack.message_seq, 1),
                Packet::Recv(recv) if i > 0 => assert_eq!(recv.message_seq, 1),
                other => panic!("connection {i} got {}", other.name()),
            }
        }
    }

    /// What the connection tasks do: take everything queued.
    fn drain(&mut self) {
        for outbox in &self.outboxes {
            outbox.take_into(&mut self.scratch);
            outbox.wrote(self.scratch.len());
            self.scratch.clear();
        }
    }

    fn send_frame(&mut self) -> Bytes {
        let n = self.sent + 1;
        frame_of(
            &mut self.encoder,
            &Packet::Send(SendPacket {
                client_seq: n as u32,
                client_msg_no: format!("{n:032x}"),
                channel_id: GROUP_ID.to_owned(),
                channel_type: ChannelType::Group,
                flags: 0,
                payload: self.payload.clone(),
            }),
        )
    }

    /// One `Send` from the sender's connection, committed and fanned out.
    fn send(&mut self, now: Now) -> Duration {
        let frame = self.send_frame();
        let written = self.state.stats.recvs_written;
        let started = Instant::now();
        self.state.on_frame(self.sender, &frame, now);
        self.state.commit(now);
        let took = started.elapsed();
        self.sent += 1;
        self.unacked += 1;
        assert_eq!(
            self.state.stats.recvs_written - written,
            RECIPIENTS as u64,
            "every recipient gets the message at once"
        );
        took
    }

    /// Every recipient's device acknowledges everything so far.
    fn ack_all(&mut self, now: Now) {
        let ack = frame_of(
            &mut self.encoder,
            &Packet::RecvAck(RecvAck {
                message_id: 0,
                message_seq: self.sent,
                channel_id: GROUP_ID.to_owned(),
                channel_type: ChannelType::Group,
                through: true,
            }),
        );
        for conn in &self.recipients {
            self.state.on_frame(*conn, &ack, now);
        }
        if let Some(job) = self.state.position_flush() {
            job().unwrap();
        }
        self.unacked = 0;
    }

    fn run(&mut self, iters: u64) -> Duration {
        let now = now();
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            total += self.send(now);
            self.drain();
            if self.unacked == ACK_EVERY {
                self.ack_all(now);
            }
        }
        total
    }
}

fn now() -> Now {
    Now {
        monotonic: Millis(1),
        unix_ms: ruyi::time::unix_now_ms(),
        micros: 1_000,
    }
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan-out to 1,000 members");
    group.throughput(Throughput::Elements(RECIPIENTS as u64));
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.sample_size(30);

    let payload = [b'x'; 32];
    let mut encoder = Encoder::new();
    let fields = RecvFields {
        message_id: 383_070_201_245_077_504,
        message_seq: 42,
        client_msg_no: "0000000000000000000000000000002a",
        from_uid: "member0000",
        channel_id: GROUP_ID,
        channel_type: ChannelType::Group,
        timestamp_ms: 1_795_398_253_077,
        flags: 0,
        send_flags: 0,
        payload: &payload,
    };
    let mut frame = BytesMut::new();
    encode_recv(&mut encoder, &fields, &mut frame);
    let mut buffers: Vec<BytesMut> = (0..RECIPIENTS)
        .map(|_| BytesMut::with_capacity(4096))
        .collect();
    group.bench_function("baseline: copy one Recv frame into 1,000 buffers", |b| {
        b.iter(|| {
            for buffer in &mut buffers {
                buffer.clear();
                buffer.extend_from_slice(black_box(&frame));
            }
            black_box(&buffers);
        })
    });
    let mut out = BytesMut::with_capacity(RECIPIENTS * frame.len());
    group.bench_function("baseline: encode 1,000 Recv frames", |b| {
        b.iter(|| {
            out.clear();
            for _ in 0..RECIPIENTS {
                encode_recv(&mut encoder, black_box(&fields), &mut out);
            }
            black_box(&out);
        })
    });
    let mut shard = FanOut::new();
    group.bench_function("one Send, committed, Recv queued for 1,000", |b| {
        b.iter_custom(|iters| shard.run(iters))
    });
    group.finish();
}

// ---------------------------------------------------------------------------
// 3. Storage group commit
// ---------------------------------------------------------------------------

/// Builds commit batches of messages appended to one channel, in seq order
/// from where the last batch ended, 64-byte payloads.
struct Batches {
    channel: ChannelKey,
    payload: Bytes,
    next_seq: u64,
}

impl Batches {
    fn new(name: &str) -> Batches {
        Batches {
            channel: ChannelKey::group(name),
            payload: Bytes::from(vec![b'm'; 64]),
            next_seq: 1,
        }
    }

    fn next(&mut self, n: usize) -> Vec<Mutation> {
        (0..n)
            .map(|_| {
                let seq = self.next_seq;
                self.next_seq += 1;
                Mutation::Message(stored_message(&self.channel, seq, &self.payload))
            })
            .collect()
    }
}

/// Times `iters` commits of `n` messages each; only the commits are timed.
fn commit_batches(
    store: &mut dyn ShardStore,
    batches: &mut Batches,
    n: usize,
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let batch = batches.next(n);
        let started = Instant::now();
        store.commit(&batch).unwrap();
        total += started.elapsed();
    }
    total
}

/// A fresh directory under the system temp dir.
fn temp_dir(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir =
        std::env::temp_dir().join(format!("ruyi-bench-{what}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rocks(dir: &std::path::Path, sync: SyncPolicy) -> RocksStorage {
    let options = RocksOptions {
        sync,
        ..Config::default().storage.rocks_options()
    };
    RocksStorage::open(dir, &options).unwrap()
}

fn group_commit(c: &mut Criterion) {
    let root = temp_dir("group-commit");
    let mut group = c.benchmark_group("storage group commit");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(20);

    let rocks_no_sync = rocks(&root.join("no-sync"), SyncPolicy::Never);
    let mut rocks_store = rocks_no_sync.open_shard(ShardId(0)).unwrap();
    let mut rocks_batches = Batches::new("commit-bench");
    for n in [1usize, 16, 256] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(
            BenchmarkId::new("baseline: MemoryStorage", n),
            &n,
            |b, &n| {
                b.iter_custom(|iters| {
                    // A fresh store for every run keeps memory bounded.
                    let mut store = MemoryStorage::default().open_shard(ShardId(0)).unwrap();
                    let mut batches = Batches::new("commit-bench");
                    commit_batches(&mut *store, &mut batches, n, iters)
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("RocksDB, sync off", n), &n, |b, &n| {
            b.iter_custom(|iters| commit_batches(&mut *rocks_store, &mut rocks_batches, n, iters))
        });
    }
    drop(rocks_store);
    drop(rocks_no_sync);

    let rocks_sync = rocks(&root.join("sync"), SyncPolicy::Always);
    let mut rocks_store = rocks_sync.open_shard(ShardId(0)).unwrap();
    let mut rocks_batches = Batches::new("commit-bench");
    group.sample_size(10);
    for n in [1usize, 256] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(
            BenchmarkId::new("RocksDB, fsync per commit", n),
            &n,
            |b, &n| {
                b.iter_custom(|iters| {
                    commit_batches(&mut *rocks_store, &mut rocks_batches, n, iters)
                })
            },
        );
    }
    group.finish();
    drop(rocks_store);
    drop(rocks_sync);
    std::fs::remove_dir_all(&root).unwrap();
}

criterion_group! {
    name = benches;
    // Plots take seconds per benchmark on a small machine.
    config = Criterion::default().without_plots();
    targets = inbox_hop, fan_out, group_commit
}
criterion_main!(benches);
