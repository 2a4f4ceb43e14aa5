//! The code paths the fuzz targets drive, shared with the replay test
//! `tests/fuzz_regressions.rs` (which includes this file with `#[path]`), so
//! a saved input goes through exactly the same calls under `cargo test` as
//! under `cargo fuzz`.
//!
//! Only ruyi's public API is used, plus `bytes` and `async-channel` (both
//! dependencies of ruyi, so an integration test of the root crate can use
//! them too), `tempfile` (a dev-dependency of the root crate) and the
//! deterministic simulator of `tests/simulation`, which the including crate
//! declares at its root as `model`, `rng`, `sim` and `world` (`#[path]`
//! modules, see `src/lib.rs`). No `arbitrary`: inputs are read with the
//! small [`Input`] reader, which returns zeros once the data runs out, or by
//! the simulator's `Rng::from_bytes`.
//!
//! Every function here must not panic on any input; a panic is a bug (in
//! ruyi, or in an invariant asserted here).

#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use ruyi::auth::{issue_token, Authenticator};
use ruyi::channel::ChannelKey;
use ruyi::client::core::{ClientCore, Event};
use ruyi::config::{AuthConfig, AuthMode, Config, DeliveryConfig, Limits};
use ruyi::conn::outbox::Outbox;
use ruyi::ids::{ConnId, Millis, ShardId, Uid};
use ruyi::protocol::{
    encode_recv, reason_name, recv_fields, ChannelType, Connect, ConversationAction,
    ConversationOp, DeviceFlag, Disconnect, Encoder, FrameDecoder, FrameError, Packet, ReasonCode,
    Recall, Recv, RecvAck, SendPacket, SyncConversations, SyncDirection, SyncMessages,
    VerifyLimits, LENGTH_PREFIX_BYTES, PROTOCOL_VERSION, RECV_FLAG_REDELIVERED,
};
use ruyi::shard::state::{Now, SetChange, ShardState, Signals};
use ruyi::storage::rocks::RocksOptions;
use ruyi::storage::{
    user_list_key, ListKind, MemoryStorage, RocksStorage, Storage, StorageError, SyncPolicy,
};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

// ---------------------------------------------------------------------------
// Input reader
// ---------------------------------------------------------------------------

/// Reads structured values off the front of the fuzz input. Past the end it
/// yields zeros and empty slices, so every input is a valid program.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

// ---------------------------------------------------------------------------
// Target 1: frame_splitter
// ---------------------------------------------------------------------------

/// How a stream ended when split into frames.
#[derive(Debug, PartialEq, Eq)]
enum SplitEnd {
    /// No error; these bytes are an incomplete frame.
    Incomplete(Vec<u8>),
    Error(FrameError),
}

/// Input layout: byte 0 picks the maximum frame size (1..=256); byte 1 the
/// number `k` (0..=15) of chunk-size bytes that follow; then `k` chunk sizes
/// (used cyclically, 0 means 1); the rest is the byte stream.
///
/// Splits the stream all at once and chunk by chunk (as the connection task
/// receives it) and checks both give the same frames, the same error, and the
/// same leftover; that every frame is within the limit and not empty; that
/// the frames and leftover add back up to the stream; and that the receive
/// buffer's capacity stays proportional to what was fed, whatever lengths
/// the stream announces.
pub fn frame_splitter(data: &[u8]) {
    let mut input = Input::new(data);
    let max = 1 + usize::from(input.byte());
    let k = usize::from(input.byte() % 16);
    let sizes: Vec<usize> = input
        .take(k)
        .iter()
        .map(|&b| usize::from(b).max(1))
        .collect();
    let stream = input.take(usize::MAX);
    let decoder = FrameDecoder::new(max);

    // All at once.
    let mut whole = BytesMut::from(stream);
    let mut frames_whole = Vec::new();
    let end_whole = loop {
        let peeked = decoder.peek_length(&whole);
        match decoder.next_frame(&mut whole) {
            Ok(Some(frame)) => {
                assert_eq!(peeked, Ok(Some(frame.len())), "peek_length disagrees");
                frames_whole.push(frame);
            }
            Ok(None) => {
                assert!(peeked.is_ok(), "peek_length erred, next_frame did not");
                break SplitEnd::Incomplete(whole.to_vec());
            }
            Err(error) => {
                assert_eq!(peeked, Err(error.clone_error()), "peek_length disagrees");
                break SplitEnd::Error(error);
            }
        }
    };
    for frame in &frames_whole {
        assert!(!frame.is_empty(), "empty frame returned");
        assert!(frame.len() <= max, "frame of {} > limit {max}", frame.len());
    }
    // Frames and leftover add up to the stream, prefix by prefix.
    let mut rebuilt = Vec::with_capacity(stream.len());
    for frame in &frames_whole {
        rebuilt.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        rebuilt.extend_from_slice(frame);
    }
    match &end_whole {
        SplitEnd::Incomplete(rest) => {
            rebuilt.extend_from_slice(rest);
            assert_eq!(rebuilt, stream, "frames + leftover != stream");
        }
        SplitEnd::Error(_) => {
            assert!(
                stream.starts_with(&rebuilt),
                "frames are not a prefix of the stream"
            );
        }
    }

    // Chunk by chunk, taking every whole frame after each chunk.
    let mut buf = BytesMut::new();
    let mut frames_chunked: Vec<Bytes> = Vec::new();
    let mut end_chunked = None;
    let mut offset = 0;
    let mut i = 0;
    'feed: while offset < stream.len() {
        let size = if sizes.is_empty() {
            stream.len()
        } else {
            sizes[i % sizes.len()]
        };
        i += 1;
        let end = (offset + size).min(stream.len());
        buf.extend_from_slice(&stream[offset..end]);
        offset = end;
        loop {
            match decoder.next_frame(&mut buf) {
                Ok(Some(frame)) => frames_chunked.push(frame),
                Ok(None) => break,
                Err(error) => {
                    end_chunked = Some(SplitEnd::Error(error));
                    break 'feed;
                }
            }
        }
        // Memory stays proportional to what was fed, not to what a length
        // prefix announced beyond the limit.
        assert!(
            buf.capacity() <= 4 * (offset + LENGTH_PREFIX_BYTES + max) + 4096,
            "receive buffer grew to {} after {offset} bytes (limit {max})",
            buf.capacity()
        );
    }
    let end_chunked = end_chunked.unwrap_or_else(|| SplitEnd::Incomplete(buf.to_vec()));
    assert_eq!(frames_chunked, frames_whole, "chunked split differs");
    assert_eq!(end_chunked, end_whole, "chunked split ends differently");
}

trait CloneError {
    fn clone_error(&self) -> FrameError;
}

impl CloneError for FrameError {
    fn clone_error(&self) -> FrameError {
        match self {
            FrameError::TooLarge { length, max } => FrameError::TooLarge {
                length: *length,
                max: *max,
            },
            FrameError::Empty => FrameError::Empty,
        }
    }
}

// ---------------------------------------------------------------------------
// Target 2: packet_decode
// ---------------------------------------------------------------------------

const FRAME_SIZES: [usize; 5] = [64, 256, 1024, 4096, 65536];

/// Limits under which any frame the encoder can produce must verify.
fn generous_limits() -> VerifyLimits {
    VerifyLimits {
        depth_max: 64,
        tables_max: 1 << 20,
        apparent_size_max_bytes: 1 << 30,
    }
}

/// Input layout: byte 0 picks the limits (low bits: the frame size from
/// [`FRAME_SIZES`]; bit 7: custom, smaller depth and table counts from bits
/// 3..6); the rest is one frame body (without its length prefix).
///
/// Verifies and decodes it; when it decodes, re-encodes it, checks the
/// encoding decodes to the same packet and encodes to the same bytes again,
/// and that the client SDK's decoder agrees on the framed bytes.
pub fn packet_decode(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let frame_max = FRAME_SIZES[usize::from(selector & 7) % FRAME_SIZES.len()];
    let custom = selector & 0x80 != 0;
    let limits = if custom {
        let n = usize::from((selector >> 3) & 0x0f);
        VerifyLimits {
            depth_max: n,
            tables_max: n * 2,
            apparent_size_max_bytes: frame_max,
        }
    } else {
        VerifyLimits::for_frame_size(frame_max)
    };
    let frame = Bytes::copy_from_slice(body);
    let decoded = Packet::decode(&frame, &limits);
    // Decoding is a pure function of the bytes.
    assert_eq!(
        decoded,
        Packet::decode(&frame, &limits),
        "decode is not deterministic"
    );
    match &decoded {
        Ok(packet) => check_packet_round_trip(packet),
        Err(error) => {
            let _ = error.to_string();
        }
    }

    // The SDK sees the same bytes framed: it must agree on valid or not.
    if !custom && !body.is_empty() && body.len() <= frame_max {
        let mut client = ClientCore::new(frame_max);
        client.feed(&(body.len() as u32).to_le_bytes());
        client.feed(body);
        let event = client.next_event();
        match &decoded {
            Ok(packet) if is_server_packet(packet) => {
                let event = event.expect("client refused a packet that decodes");
                assert!(event.is_some(), "client saw no event for a whole frame");
            }
            _ => assert!(event.is_err(), "client accepted what decode refused"),
        }
        assert!(
            matches!(client.next_event(), Ok(None)),
            "client saw a second frame"
        );
    }
}

fn is_server_packet(packet: &Packet) -> bool {
    matches!(
        packet,
        Packet::ConnAck(_)
            | Packet::SendAck(_)
            | Packet::Recv(_)
            | Packet::Pong
            | Packet::Disconnect(_)
            | Packet::SyncMessagesResp(_)
            | Packet::SyncConversationsResp(_)
            | Packet::ConversationOpResp(_)
            | Packet::ConversationUpdate(_)
            | Packet::RecallResp(_)
            | Packet::RecallEvent(_)
    )
}

/// Encodes `packet`, decodes it again and compares; encodes the result and
/// compares the bytes.
pub fn check_packet_round_trip(packet: &Packet) {
    assert!(!packet.name().is_empty());
    for reason in reasons_of(packet) {
        assert!(!reason_name(reason).is_empty());
    }
    let mut encoder = Encoder::new();
    let mut out = BytesMut::new();
    encoder.encode(packet, &mut out);
    let encoded = out.clone().freeze();
    let frame = FrameDecoder::new(1 << 30)
        .next_frame(&mut out)
        .expect("encoder wrote a bad length prefix")
        .expect("encoder wrote an incomplete frame");
    assert!(out.is_empty(), "encoder wrote more than one frame");
    let again = Packet::decode(&frame, &generous_limits())
        .unwrap_or_else(|e| panic!("re-encoded {} does not decode: {e}", packet.name()));
    assert_eq!(&again, packet, "decode(encode(p)) != p");
    let mut out2 = BytesMut::new();
    encoder.encode(&again, &mut out2);
    assert_eq!(out2.freeze(), encoded, "encoding is not stable");
    if let Packet::Recv(recv) = packet {
        let mut out3 = BytesMut::new();
        encode_recv(&mut encoder, &recv_fields(recv), &mut out3);
        assert_eq!(
            out3.freeze(),
            encoded,
            "encode_recv differs from encode(Recv)"
        );
    }
}

fn reasons_of(packet: &Packet) -> Vec<ReasonCode> {
    match packet {
        Packet::ConnAck(p) => vec![p.reason],
        Packet::SendAck(p) => vec![p.reason],
        Packet::Disconnect(p) => vec![p.reason],
        Packet::SyncMessagesResp(p) => vec![p.reason],
        Packet::SyncConversationsResp(p) => vec![p.reason],
        Packet::ConversationOpResp(p) => vec![p.reason],
        Packet::RecallResp(p) => vec![p.reason],
        _ => Vec::new(),
    }
}

// ---------------------------------------------------------------------------
// Target 3: session
// ---------------------------------------------------------------------------
//
// Two paths, chosen by byte 0 (see [`session`]):
//
// - the simulator (bit 7 clear): `tests/simulation`'s world of real
//   `ShardState`s with its reference model, every choice read from the
//   input; every invariant the seeded soak checks is checked. On the
//   memory store, or with [`setup::ROCKS`] on RocksDB and on the memory
//   store, which must agree step for step;
// - the raw program (bit 7 set, [`setup::RAW`]): hostile bytes, frame
//   errors, token auth, shutdown, stalls and closes that the simulator's
//   well-behaved clients never produce, with every server frame read back
//   by the SDK. Its clients may impersonate anyone, so no model could judge
//   them: its checks are the ones below (no panic, frames the SDK reads,
//   in-order pushes, connection counts).

/// The auth secret used when the input turns token auth on.
pub const SECRET: &str = "fuzz-secret";
/// Uids and devices the helper operations pick from.
pub const UIDS: [&str; 4] = ["alice", "bob", "carol", "dave"];
pub const DEVICES: [&str; 2] = ["phone", "web"];
pub const GROUPS: [&str; 2] = ["g1", "g2"];
const UNIX_BASE_MS: u64 = 1_750_000_000_000;
const CONNS_MAX: usize = 16;
/// What the SDK accepts by default; server output must fit.
const CLIENT_FRAME_MAX: usize = 4 * 1024 * 1024;

/// The operations of the session program. Each is one byte (taken modulo
/// the count) followed by its arguments.
pub mod op {
    /// `shard`: accept a connection on that shard.
    pub const ACCEPT: u8 = 0;
    /// `conn`, `len: u16`, `len` bytes: raw bytes from the client.
    pub const BYTES: u8 = 1;
    /// `ms: u16`: advance the clock.
    pub const ADVANCE: u8 = 2;
    /// Sweep every shard (timeouts).
    pub const SWEEP: u8 = 3;
    /// Commit every shard.
    pub const COMMIT: u8 = 4;
    /// `conn`, `reason`: the server closes the connection.
    pub const CLOSE: u8 = 5;
    /// `conn`: the connection's task ended (peer closed or I/O error).
    pub const PEER_GONE: u8 = 6;
    /// Carry every queued cross-shard batch to its shard.
    pub const PUMP: u8 = 7;
    /// Run due redeliveries on every shard.
    pub const RETRY_DUE: u8 = 8;
    /// `conn`: write out the outbox to the client (and end the task when
    /// the server closed or aborted it, as the connection task does).
    pub const DRAIN: u8 = 9;
    /// `conn`: the socket takes no bytes.
    pub const STALL: u8 = 10;
    /// `shard`: begin a graceful shutdown there.
    pub const SHUTDOWN: u8 = 11;
    /// `group`, `members: bitmask`, `change`: control-plane group change.
    pub const GROUP: u8 = 12;
    /// `target`, `kind`, `uids: bitmask`, `change`: allow/deny list change.
    pub const LIST: u8 = 13;
    /// Write acknowledged positions on every shard.
    pub const POSITIONS: u8 = 14;
    /// `shard`: hand the pending batch to storage and report a failure.
    pub const FAIL_COMMIT: u8 = 15;
    /// `conn`, `which`, `through`: a valid `RecvAck` for a message the
    /// connection received.
    pub const ACK: u8 = 16;
    /// `conn`, `uid`, `device`, `flags`: a valid `Connect`.
    pub const CONNECT: u8 = 17;
    /// `conn`, `target`, `msg_no`, `flags`, `len`: a valid `Send`.
    pub const SEND: u8 = 18;
    /// `conn`, `kind`, then the request's fields: sync, conversation op,
    /// recall, ping, pong or disconnect.
    pub const REQUEST: u8 = 19;
    pub const COUNT: u8 = 20;
}

/// Setup flags, the first byte of a `session` input. [`RAW`] picks the path
/// and [`ROCKS`] the store; the others only apply to a raw program.
///
/// [`RAW`]: setup::RAW
/// [`ROCKS`]: setup::ROCKS
pub mod setup {
    /// Two shards instead of one.
    pub const TWO_SHARDS: u8 = 1 << 0;
    /// Token auth (secret [`super::SECRET`]) instead of auth off.
    pub const TOKEN_AUTH: u8 = 1 << 1;
    /// `policy.allowlist_for_person`.
    pub const ALLOWLIST: u8 = 1 << 2;
    /// Small limits: small frames, windows, timeouts, few connections.
    pub const SMALL_LIMITS: u8 = 1 << 3;
    /// Fast redelivery.
    pub const FAST_RETRY: u8 = 1 << 4;
    /// RocksDB in a temporary directory instead of `MemoryStorage` (the
    /// simulator runs on both and compares).
    pub const ROCKS: u8 = 1 << 5;
    /// The simulator's later operations (`Options::extras`: users' own
    /// lists, the API's requests); simulator inputs only.
    pub const EXTRAS: u8 = 1 << 6;
    /// The raw program rather than the simulator: set in every raw input.
    pub const RAW: u8 = 1 << 7;
}

fn small_limits() -> Limits {
    Limits {
        frame_size_max_bytes: 1024,
        payload_size_max_bytes: 512,
        handshake_timeout_ms: 1000,
        idle_timeout_ms: 5000,
        heartbeat_interval_ms: 1000,
        connections_per_shard_max: 4,
        uid_length_max_bytes: 16,
        device_id_length_max_bytes: 16,
        channel_id_length_max_bytes: 16,
        client_msg_no_length_max_bytes: 16,
        outbound_buffer_max_bytes: 4096,
        write_stall_timeout_ms: 1000,
        inflight_messages_max: 4,
        inflight_bytes_max: 1024,
        group_members_max: 3,
        sync_limit_max: 8,
        sync_response_max_bytes: 1024,
        read_chunk_bytes: 4096,
        close_flush_timeout_ms: 500,
        ..Limits::default()
    }
}

struct Conn {
    id: ConnId,
    shard: usize,
    outbox: Rc<Outbox>,
    /// Bytes received and not yet taken as frames (the driver's `partial`).
    partial: BytesMut,
    client: ClientCore,
    recvs: Vec<Recv>,
    /// Highest seq pushed (not redelivered) per channel as this client sees
    /// it.
    last_pushed: HashMap<(String, u8), u64>,
    ended: bool,
}

struct World {
    shards: Vec<ShardState>,
    conns: Vec<Conn>,
    /// Live connections per shard, as the harness counts them.
    live: Vec<usize>,
    shut_down: Vec<bool>,
    decoder: FrameDecoder,
    encoder: Encoder,
    token_auth: bool,
    /// `RUYI_FUZZ_TRACE` is set: print every operation and client event.
    trace: bool,
    tokens: HashMap<&'static str, String>,
    t: u64,
    group_rx: Vec<
        async_channel::Receiver<
            Result<ruyi::shard::state::GroupInfo, ruyi::shard::state::ControlError>,
        >,
    >,
    list_rx: Vec<async_channel::Receiver<Result<Vec<String>, ruyi::shard::state::ControlError>>>,
    /// The RocksDB directory ([`setup::ROCKS`]); removed after the shards
    /// (declared last, so dropped last).
    dir: Option<tempfile::TempDir>,
}

impl World {
    fn new(flags: u8) -> World {
        let shard_count: u16 = if flags & setup::TWO_SHARDS != 0 { 2 } else { 1 };
        let token_auth = flags & setup::TOKEN_AUTH != 0;
        let mut config = Config {
            auth: AuthConfig {
                mode: if token_auth {
                    AuthMode::Token
                } else {
                    AuthMode::Off
                },
                secret: SECRET.to_owned(),
                leeway_s: 30,
            },
            ..Config::default()
        };
        if flags & setup::SMALL_LIMITS != 0 {
            config.limits = small_limits();
            // Registered tokens must still fit a Connect frame.
            config.api.user_token_length_max_bytes = 256;
        }
        if flags & setup::FAST_RETRY != 0 {
            config.delivery = DeliveryConfig {
                retry_interval_ms: 100,
                retry_interval_max_ms: 400,
                retry_attempts_max: 3,
                retry_tick_ms: 10,
                ..DeliveryConfig::default()
            };
        }
        // The harness only uses limits and delivery settings a server would
        // start with (problems elsewhere in the default configuration, such
        // as unset secrets of other subsystems, do not concern the shard).
        if let Err(error) = config.validate() {
            let error = error.to_string();
            let relevant: Vec<&str> = error
                .split("; ")
                .filter(|p| p.contains("limits.") || p.contains("delivery.") || p.contains("auth."))
                .collect();
            assert!(
                relevant.is_empty(),
                "fuzz harness configuration is invalid: {}",
                relevant.join("; ")
            );
        }
        let (storage, dir): (Arc<dyn Storage>, _) = if flags & setup::ROCKS != 0 {
            let dir = tempfile::tempdir().expect("temporary directory");
            let rocks = RocksStorage::open(
                dir.path(),
                &RocksOptions {
                    sync: SyncPolicy::Never,
                    block_cache_bytes: 1 << 20,
                    write_buffer_bytes: 1 << 20,
                    idempotency_ttl_ms: config.storage.idempotency_ttl_s.saturating_mul(1000),
                },
            )
            .expect("open RocksDB");
            (Arc::new(rocks), Some(dir))
        } else {
            (Arc::new(MemoryStorage::default()), None)
        };
        let now = Now {
            monotonic: Millis(0),
            unix_ms: UNIX_BASE_MS,
            micros: 0,
        };
        let shards = (0..shard_count)
            .map(|i| {
                let store = storage.open_shard(ShardId(i)).expect("the store opens");
                let mut state = ShardState::new(
                    ShardId(i),
                    shard_count,
                    config.limits.clone(),
                    config.storage.idempotency_ttl_s.saturating_mul(1000),
                    Authenticator::new(&config.auth),
                    store,
                    Rc::new(Signals::new(shard_count)),
                );
                state.set_allowlist_for_person(flags & setup::ALLOWLIST != 0);
                state.set_retry_policy(config.delivery.retry_policy(), now);
                state
            })
            .collect();
        World {
            shards,
            conns: Vec::new(),
            live: vec![0; usize::from(shard_count)],
            shut_down: vec![false; usize::from(shard_count)],
            decoder: FrameDecoder::new(config.limits.frame_size_max_bytes),
            encoder: Encoder::new(),
            token_auth,
            trace: std::env::var_os("RUYI_FUZZ_TRACE").is_some(),
            tokens: HashMap::new(),
            t: 0,
            group_rx: Vec::new(),
            list_rx: Vec::new(),
            dir,
        }
    }

    fn now(&self) -> Now {
        Now {
            monotonic: Millis(self.t),
            unix_ms: UNIX_BASE_MS + self.t,
            micros: self.t * 1000,
        }
    }

    fn shard_of(&self, key: &ChannelKey) -> usize {
        key.shard(self.shards.len() as u16).index()
    }

    fn conn_index(&self, b: u8) -> Option<usize> {
        if self.conns.is_empty() {
            None
        } else {
            Some(usize::from(b) % self.conns.len())
        }
    }

    fn accept(&mut self, shard: usize) {
        let now = self.now();
        let accepted = self.shards[shard].accept(now);
        if self.shut_down[shard] {
            assert_eq!(
                accepted.as_ref().err(),
                Some(&ReasonCode::ServerShutdown),
                "a shutting-down shard must refuse with ServerShutdown"
            );
        }
        let Ok((id, outbox)) = accepted else {
            return;
        };
        self.live[shard] += 1;
        if self.conns.len() < CONNS_MAX {
            self.conns.push(Conn {
                id,
                shard,
                outbox,
                partial: BytesMut::new(),
                client: ClientCore::new(CLIENT_FRAME_MAX),
                recvs: Vec::new(),
                last_pushed: HashMap::new(),
                ended: false,
            });
        } else {
            // Untracked: end it at once, as if the peer left.
            self.shards[shard].on_closed(id);
            self.live[shard] -= 1;
        }
    }

    /// Bytes from the client: buffered, then every whole frame taken while
    /// the session reads frames, as the connection task does.
    fn receive(&mut self, i: usize, bytes: &[u8]) {
        let now = self.now();
        let conn = &mut self.conns[i];
        if conn.ended {
            // The task is gone; the shard must ignore frames for it.
            let frame = Bytes::copy_from_slice(bytes);
            self.shards[conn.shard].on_frame(conn.id, &frame, now);
            return;
        }
        conn.partial.extend_from_slice(bytes);
        self.take_frames(i);
    }

    fn take_frames(&mut self, i: usize) {
        let now = self.now();
        let conn = &mut self.conns[i];
        if conn.ended {
            return;
        }
        let state = &mut self.shards[conn.shard];
        while state.reads_frames(conn.id) {
            match self.decoder.next_frame(&mut conn.partial) {
                Ok(Some(frame)) => state.on_frame(conn.id, &frame, now),
                Ok(None) => break,
                Err(error) => {
                    state.on_frame_error(conn.id, &error, now);
                    conn.partial.clear();
                    break;
                }
            }
        }
    }

    fn take_all_frames(&mut self) {
        for i in 0..self.conns.len() {
            if !self.conns[i].partial.is_empty() {
                self.take_frames(i);
            }
        }
    }

    /// The write side of the connection task: everything queued goes to the
    /// client, which must understand it.
    fn drain(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.ended {
            return;
        }
        if conn.outbox.is_aborted() {
            return self.end(i);
        }
        let mut writing = BytesMut::new();
        conn.outbox.take_into(&mut writing);
        conn.outbox.wrote(writing.len());
        let trace = self.trace;
        conn.outbox.mark_flowing();
        conn.client.feed(&writing);
        loop {
            match conn.client.next_event() {
                Ok(Some(event)) => {
                    if trace {
                        eprintln!("  conn {} <- {event:?}", conn.id.0);
                    }
                    check_event(conn, event)
                }
                Ok(None) => break,
                Err(error) => panic!("the client cannot read what the server sent: {error}"),
            }
        }
        if conn.outbox.closing().is_some() && conn.outbox.is_empty() {
            self.end(i);
        }
    }

    fn end(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.ended {
            return;
        }
        conn.ended = true;
        self.shards[conn.shard].on_closed(conn.id);
        self.live[conn.shard] -= 1;
        assert!(
            !self.shards[conn.shard].reads_frames(conn.id),
            "a closed connection still reads frames"
        );
    }

    fn pump(&mut self) {
        let n = self.shards.len();
        if n < 2 {
            return;
        }
        let now = self.now();
        for _round in 0..8 {
            let mut moved = false;
            for from in 0..n {
                for to in 0..n {
                    if from == to {
                        continue;
                    }
                    let batch = self.shards[from].take_outgoing(ShardId(to as u16), 1024);
                    moved |= !batch.is_empty();
                    for message in batch {
                        self.shards[to].on_remote(message, now);
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    fn encode_to(&mut self, i: usize, packet: &Packet) {
        let mut out = BytesMut::new();
        self.encoder.encode(packet, &mut out);
        self.receive(i, &out);
    }

    fn token_for(&mut self, uid: &'static str) -> String {
        self.tokens
            .entry(uid)
            .or_insert_with(|| {
                let now_s = ruyi::time::unix_now_ms() / 1000;
                issue_token(SECRET, uid, now_s, 24 * 3600)
            })
            .clone()
    }

    fn channel_arg(b: u8) -> (String, ChannelType) {
        match b % 8 {
            0..=3 => (UIDS[usize::from(b % 4)].to_owned(), ChannelType::Person),
            4 | 5 => (GROUPS[usize::from(b % 2)].to_owned(), ChannelType::Group),
            6 => (String::new(), ChannelType(b >> 3)),
            _ => (format!("x{}", b >> 3), ChannelType(b >> 5)),
        }
    }

    fn uids_of(mask: u8) -> Vec<String> {
        let mut uids: Vec<String> = (0..4)
            .filter(|bit| mask & (1 << bit) != 0)
            .map(|bit| UIDS[bit].to_owned())
            .collect();
        if mask & 0x10 != 0 {
            uids.push(String::new());
        }
        if mask & 0x20 != 0 {
            uids.push("ev@l".to_owned());
        }
        if mask & 0x40 != 0 {
            uids.push("x".repeat(100));
        }
        uids
    }

    fn change_of(b: u8) -> SetChange {
        match b % 3 {
            0 => SetChange::Replace,
            1 => SetChange::Add,
            _ => SetChange::Remove,
        }
    }

    fn check_counts(&self) {
        for (s, state) in self.shards.iter().enumerate() {
            assert_eq!(
                state.connection_count(),
                self.live[s],
                "shard {s} counts {} connections, the harness {}",
                state.connection_count(),
                self.live[s]
            );
        }
    }

    fn step(&mut self, input: &mut Input<'_>) {
        let code = input.byte() % op::COUNT;
        if self.trace {
            eprintln!("t={} op {code}", self.t);
        }
        let now = self.now();
        match code {
            op::ACCEPT => {
                let shard = usize::from(input.byte()) % self.shards.len();
                self.accept(shard);
            }
            op::BYTES => {
                let c = input.byte();
                let len = usize::from(input.u16());
                let bytes = input.take(len);
                if let Some(i) = self.conn_index(c) {
                    self.receive(i, bytes);
                }
            }
            op::ADVANCE => {
                self.t += u64::from(input.u16());
            }
            op::SWEEP => {
                for state in &mut self.shards {
                    state.sweep(now);
                }
            }
            op::COMMIT => {
                for state in &mut self.shards {
                    state.commit(now);
                }
            }
            op::CLOSE => {
                let c = input.byte();
                let reason = ReasonCode(u16::from(input.byte()));
                if let Some(i) = self.conn_index(c) {
                    let conn = &self.conns[i];
                    self.shards[conn.shard].close(conn.id, reason, "fuzz", now);
                }
            }
            op::PEER_GONE => {
                if let Some(i) = self.conn_index(input.byte()) {
                    self.end(i);
                }
            }
            op::PUMP => self.pump(),
            op::RETRY_DUE => {
                for state in &mut self.shards {
                    state.retry_due(now);
                }
            }
            op::DRAIN => {
                if let Some(i) = self.conn_index(input.byte()) {
                    self.drain(i);
                }
            }
            op::STALL => {
                if let Some(i) = self.conn_index(input.byte()) {
                    let conn = &self.conns[i];
                    if !conn.ended && !conn.outbox.is_empty() {
                        conn.outbox.mark_stalled(now.monotonic);
                    }
                }
            }
            op::SHUTDOWN => {
                let shard = usize::from(input.byte()) % self.shards.len();
                self.shards[shard].begin_shutdown(now);
                self.shut_down[shard] = true;
            }
            op::GROUP => {
                let group = GROUPS[usize::from(input.byte() % 2)];
                let uids = Self::uids_of(input.byte());
                let change = Self::change_of(input.byte());
                let owner = self.shard_of(&ChannelKey::group(group));
                let (tx, rx) = async_channel::bounded(1);
                self.group_rx.push(rx);
                let now = self.now();
                self.shards[owner].change_group(group, uids, change, tx, now);
            }
            op::LIST => {
                let target = input.byte();
                let key = if target & 0x80 != 0 {
                    ChannelKey::group(GROUPS[usize::from(target % 2)])
                } else {
                    user_list_key(&Uid::new(UIDS[usize::from(target % 4)]))
                };
                let kind = if input.byte() % 2 == 0 {
                    ListKind::Allow
                } else {
                    ListKind::Deny
                };
                let uids = Self::uids_of(input.byte());
                let change = Self::change_of(input.byte());
                let owner = self.shard_of(&key);
                let (tx, rx) = async_channel::bounded(1);
                self.list_rx.push(rx);
                self.shards[owner].change_list(key, kind, uids, change, tx);
            }
            op::POSITIONS => {
                for state in &mut self.shards {
                    if let Some(job) = state.position_flush() {
                        let _ = job();
                    }
                }
            }
            op::FAIL_COMMIT => {
                let shard = usize::from(input.byte()) % self.shards.len();
                let state = &mut self.shards[shard];
                if let Some((_job, in_flight)) = state.begin_commit(now) {
                    state.finish_commit(
                        in_flight,
                        Err(StorageError::Io("injected by the fuzzer".into())),
                        now,
                    );
                }
            }
            op::ACK => {
                let c = input.byte();
                let which = usize::from(input.byte());
                let through = input.byte() & 1 != 0;
                if let Some(i) = self.conn_index(c) {
                    let recvs = &self.conns[i].recvs;
                    if !recvs.is_empty() {
                        let r = &recvs[which % recvs.len()];
                        let ack = Packet::RecvAck(RecvAck {
                            message_id: r.message_id,
                            message_seq: r.message_seq,
                            channel_id: r.channel_id.clone(),
                            channel_type: r.channel_type,
                            through,
                        });
                        self.encode_to(i, &ack);
                    }
                }
            }
            op::CONNECT => {
                let c = input.byte();
                let who = input.byte();
                let device = input.byte();
                let flags = input.byte();
                if let Some(i) = self.conn_index(c) {
                    let uid = UIDS[usize::from(who % 4)];
                    let token = if self.token_auth && flags & 0x02 == 0 {
                        self.token_for(uid)
                    } else if flags & 0x04 != 0 {
                        // A token for someone else.
                        self.token_for(UIDS[(usize::from(who) + 1) % 4])
                    } else {
                        String::new()
                    };
                    let packet = Packet::Connect(Connect {
                        version: if flags & 0x08 != 0 {
                            PROTOCOL_VERSION + 1
                        } else {
                            PROTOCOL_VERSION
                        },
                        uid: uid.to_owned(),
                        token,
                        device_id: DEVICES[usize::from(device % 2)].to_owned(),
                        device_flag: DeviceFlag(device >> 1),
                        client_timestamp_ms: 0,
                        resume: flags & 0x01 != 0,
                    });
                    self.encode_to(i, &packet);
                }
            }
            op::SEND => {
                let c = input.byte();
                let (channel_id, channel_type) = Self::channel_arg(input.byte());
                let msg_no = input.byte();
                let flags = input.byte();
                let len = usize::from(input.byte()) * 4;
                if let Some(i) = self.conn_index(c) {
                    let packet = Packet::Send(SendPacket {
                        client_seq: u32::from(msg_no),
                        client_msg_no: if msg_no == 0xff {
                            String::new()
                        } else {
                            format!("m{}", msg_no % 16)
                        },
                        channel_id,
                        channel_type,
                        flags,
                        payload: Bytes::from(vec![msg_no; len]),
                    });
                    self.encode_to(i, &packet);
                }
            }
            op::REQUEST => {
                let c = input.byte();
                let kind = input.byte();
                let (channel_id, channel_type) = Self::channel_arg(input.byte());
                let a = input.byte();
                let b = input.byte();
                let d = input.byte();
                let request_id = u32::from(a);
                let packet = match kind % 7 {
                    0 => Packet::SyncMessages(SyncMessages {
                        request_id,
                        channel_id,
                        channel_type,
                        start_seq: u64::from(a % 16),
                        end_seq: u64::from(b % 16),
                        limit: u32::from(d),
                        direction: SyncDirection(kind >> 3),
                    }),
                    1 => Packet::SyncConversations(SyncConversations {
                        request_id,
                        since_version: u64::from(b),
                        limit: u32::from(d),
                        unread_only: kind & 0x80 != 0,
                    }),
                    2 => Packet::ConversationOp(ConversationOp {
                        request_id,
                        channel_id,
                        channel_type,
                        action: ConversationAction(b % 4),
                        unread: u64::from(d),
                    }),
                    3 => {
                        let message_id = self
                            .conn_index(c)
                            .and_then(|i| {
                                let recvs = &self.conns[i].recvs;
                                (!recvs.is_empty() && b & 1 == 0)
                                    .then(|| recvs[usize::from(d) % recvs.len()].message_id)
                            })
                            .unwrap_or(0);
                        Packet::Recall(Recall {
                            request_id,
                            channel_id,
                            channel_type,
                            message_id,
                            client_msg_no: format!("m{}", d % 16),
                        })
                    }
                    4 => Packet::Ping,
                    5 => Packet::Pong,
                    _ => Packet::Disconnect(Disconnect {
                        reason: ReasonCode::Success,
                        message: String::new(),
                    }),
                };
                if let Some(i) = self.conn_index(c) {
                    self.encode_to(i, &packet);
                }
            }
            _ => unreachable!(),
        }
        // Frames held back while a session was joining are read as soon
        // as it is active, as the connection task does.
        self.take_all_frames();
        self.check_counts();
    }

    /// At the end: deliver everything, write everything out, and end every
    /// connection, as a shutdown would.
    fn finish(&mut self) {
        let now = self.now();
        self.pump();
        for state in &mut self.shards {
            state.commit(now);
        }
        self.pump();
        for i in 0..self.conns.len() {
            self.drain(i);
        }
        for s in 0..self.shards.len() {
            self.shards[s].begin_shutdown(now);
            self.shut_down[s] = true;
        }
        for i in 0..self.conns.len() {
            self.drain(i);
            self.end(i);
        }
        for state in &mut self.shards {
            state.commit(now);
        }
        self.pump();
        self.check_counts();
        for (s, state) in self.shards.iter_mut().enumerate() {
            assert!(
                state.accept(now).is_err(),
                "shard {s} accepts after shutdown"
            );
            state.close_storage();
        }
    }
}

/// Checks one event the client read.
fn check_event(conn: &mut Conn, event: Event) {
    if let Event::Recv(recv) = event {
        if recv.flags & RECV_FLAG_REDELIVERED == 0 {
            let key = (recv.channel_id.clone(), recv.channel_type.0);
            let last = conn.last_pushed.entry(key).or_insert(0);
            assert!(
                recv.message_seq > *last,
                "conn {}: pushed seq {} of {:?} after seq {} (pushes of a channel must be in order, each once)",
                conn.id.0,
                recv.message_seq,
                recv.channel_id,
                *last
            );
            *last = recv.message_seq;
        }
        if conn.recvs.len() < 64 {
            conn.recvs.push(recv);
        }
    }
}

/// Input layout: byte 0 is a set of [`setup`] flags. With [`setup::RAW`]
/// (bit 7) set, the rest is a raw program ([`raw_session`]); with bit 7
/// clear, the rest is the simulator's choices ([`simulated_session`]).
/// [`setup::ROCKS`] (bit 5) adds RocksDB in either; [`setup::EXTRAS`]
/// (bit 6) turns on the simulator's later operations. The empty input runs
/// the simulator with no choices.
pub fn session(data: &[u8]) {
    let (flags, rest) = data.split_first().map_or((0, data), |(f, r)| (*f, r));
    if flags & setup::RAW != 0 {
        raw_session(flags, rest);
    } else {
        simulated_session(flags & setup::ROCKS != 0, flags & setup::EXTRAS != 0, rest);
    }
}

/// `tests/simulation` driven by `choices` (`sim::run_input`, whose module
/// documentation tells how the bytes map to the run's shape and steps):
/// steps until the choices are read, then a settle and every liveness
/// check. On the memory store; with `rocks` also on RocksDB in a temporary
/// directory, and the two runs' steps (every step's line, the answers and
/// pushes the clients saw included) must be the same. A violated invariant
/// panics with the last steps; `RUYI_FUZZ_TRACE` prints every step as it
/// runs.
///
/// Why not RocksDB alone: opening a RocksDB (twelve column families) costs
/// tens of milliseconds, and every simulated crash opens it again, while a
/// simulated step on the memory store costs a few microseconds; under the
/// fuzzer an input with [`setup::ROCKS`] takes about 25 times as long as
/// one without (`tests/fuzz/README.md` has the figures).
pub fn simulated_session(rocks: bool, extras: bool, choices: &[u8]) {
    use crate::world::StoreKind;
    if std::env::var_os("RUYI_FUZZ_TRACE").is_some() {
        crate::sim::ECHO.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let memory = simulate(choices, StoreKind::Memory, extras);
    if rocks {
        let on_rocks = simulate(choices, StoreKind::Rocks, extras);
        if let Some(i) = (0..memory.len().min(on_rocks.len())).find(|i| memory[*i] != on_rocks[*i])
        {
            panic!(
                "the stores part at step line {i}:\n  rocks:  {}\n  memory: {}",
                on_rocks[i], memory[i]
            );
        }
        assert_eq!(
            memory.len(),
            on_rocks.len(),
            "the runs on the two stores differ in length"
        );
    }
}

/// One simulated run on `store`; its trace, or a panic with the violation.
fn simulate(choices: &[u8], store: crate::world::StoreKind, extras: bool) -> Vec<String> {
    match crate::sim::run_input(choices, store, extras) {
        Ok((_, trace)) => trace,
        Err(failure) => {
            let skip = failure.trace.len().saturating_sub(60);
            panic!(
                "the simulation on {store:?} broke an invariant: {}\n  ... {skip} earlier steps\n  {}\n(RUYI_FUZZ_TRACE=1 prints every step)",
                failure.message,
                failure.trace[skip..].join("\n  ")
            );
        }
    }
}

/// The raw program: `flags` is a set of [`setup`] flags, `program` a
/// sequence of [`op`]s. Drives one or two `ShardState`s (over
/// `MemoryStorage`, or RocksDB with [`setup::ROCKS`]) with the program,
/// then ends every connection and shuts the shards down.
pub fn raw_session(flags: u8, program: &[u8]) {
    let mut input = Input::new(program);
    let mut world = World::new(flags);
    let mut steps = 0;
    while !input.is_empty() && steps < 4096 {
        world.step(&mut input);
        steps += 1;
    }
    world.finish();
}

// ---------------------------------------------------------------------------
// wkproto: WuKongIM's protocol, its codec and the per-connection translator
// ---------------------------------------------------------------------------

/// A program of client and server events run through one WKProto
/// translator (with fixed keys, so an input replays exactly), checking what
/// it emits: every packet for the client decodes at the negotiated version,
/// one per element; every RECV's msgKey checks out and its payload decrypts;
/// every frame for the shard is a valid ruyi packet. The raw bytes of each
/// program step also go through the codec alone, whose decoded packets must
/// encode back to what decodes to them again.
///
/// Ops (byte % 7): 0 raw client bytes; 1 a CONNECT (version byte); 2 a SEND
/// made with the session's key (channel type, payload, tamper flag); 3 a
/// RECVACK or PING; 4 a ruyi frame from the shard (ConnAck, Recv, SendAck,
/// Pong, Disconnect, RecallEvent); 5 raw shard bytes; 6 codec round trips
/// of raw bytes at a version.
pub fn wkproto(data: &[u8]) {
    use ruyi::wkproto::codec::{self, Flags, Packet as Wk};
    use ruyi::wkproto::crypto::{Cipher, Handshake};
    use ruyi::wkproto::translate::{recv_sign, send_sign, Translator, TranslatorConfig};
    let mut input = Input::new(data);
    let frame_max = 64 + usize::from(input.byte()) * 64;
    let config = TranslatorConfig {
        frame_size_max_bytes: frame_max,
        node_id: 3,
    };
    let mut t = Translator::with_keys(config, Some(([7; 32], *b"0123456789abcdef")));
    let client = Handshake::from_secret([9; 32]);
    let mut cipher: Option<Cipher> = None;
    // Raw client bytes before the login may hold a CONNECT with a key this
    // harness does not know: RECVs are then decoded but not decrypted.
    let mut raw_before_login = false;
    let mut logged_in = false;
    let mut encoder = Encoder::new();
    let verify = VerifyLimits::for_frame_size(frame_max);
    let mut steps = 0;
    while !input.is_empty() && steps < 64 {
        steps += 1;
        let op = input.byte() % 7;
        let version = t.version();
        let mut client_bytes = BytesMut::new();
        match op {
            0 => {
                let n = usize::from(input.byte());
                client_bytes.extend_from_slice(input.take(n));
                raw_before_login |= !logged_in && n > 0;
            }
            1 => {
                let _ = codec::encode(
                    &Wk::Connect(codec::Connect {
                        version: input.byte() % 9,
                        device_flag: input.byte() % 4,
                        device_id: format!("d{}", input.byte()),
                        uid: format!("u{}", input.byte() % 3),
                        token: "t".into(),
                        client_timestamp_ms: 5,
                        client_key: if input.byte() % 8 == 0 {
                            String::new()
                        } else {
                            client.server_key()
                        },
                    }),
                    2,
                    &mut client_bytes,
                );
            }
            2 => {
                let channel_type = input.byte() % 4;
                let tamper = input.byte() % 5 == 0;
                let n = usize::from(input.byte());
                let plain = input.take(n).to_vec();
                let payload = match &cipher {
                    Some(c) if !tamper => c.seal(&plain),
                    _ => plain.clone(),
                };
                let mut send = codec::Send {
                    flags: Flags::from_bits(input.byte()),
                    setting: input.byte() & 0x1a,
                    client_seq: u32::from(input.u16()),
                    client_msg_no: format!("m{}", input.byte()),
                    stream_no: Some("s".into()),
                    channel_id: format!("u{}", input.byte() % 3),
                    channel_type,
                    expire: 0,
                    msg_key: String::new(),
                    topic: Some("t".into()),
                    payload: Bytes::from(payload),
                };
                if let Some(c) = &cipher {
                    send.msg_key = c.msg_key(&send_sign(&send));
                }
                let _ = codec::encode(&Wk::Send(send), version, &mut client_bytes);
            }
            3 => {
                let packet = if input.byte() % 2 == 0 {
                    Wk::Ping
                } else {
                    Wk::RecvAck(codec::RecvAck {
                        flags: Flags::default(),
                        message_id: i64::from(input.u16()),
                        message_seq: u64::from(input.u16()),
                    })
                };
                let _ = codec::encode(&packet, version, &mut client_bytes);
            }
            4 => {
                let packet = match input.byte() % 6 {
                    0 => Packet::ConnAck(ruyi::protocol::ConnAck {
                        reason: if input.byte() % 4 == 0 {
                            ReasonCode::AuthFailed
                        } else {
                            ReasonCode::Success
                        },
                        server_time_ms: 9,
                        heartbeat_interval_ms: 1000,
                        session_id: 1,
                    }),
                    1 => {
                        let n = usize::from(input.byte());
                        Packet::Recv(Recv {
                            message_id: u64::from(input.u16()) << 40,
                            message_seq: u64::from(input.u16()) << (input.byte() % 40),
                            client_msg_no: "c".into(),
                            from_uid: "u1".into(),
                            channel_id: "g".into(),
                            channel_type: ChannelType::Group,
                            timestamp_ms: i64::from(input.u16()) * 1_000_000,
                            flags: input.byte() & 3,
                            send_flags: input.byte() & 7,
                            payload: Bytes::copy_from_slice(input.take(n)),
                        })
                    }
                    2 => Packet::SendAck(ruyi::protocol::SendAck {
                        client_seq: u32::from(input.u16()),
                        client_msg_no: "m".into(),
                        message_id: 1,
                        message_seq: 1,
                        reason: ReasonCode::Success,
                    }),
                    3 => Packet::Pong,
                    4 => Packet::Disconnect(Disconnect {
                        reason: ReasonCode::Kicked,
                        message: "bye".into(),
                    }),
                    _ => Packet::RecallEvent(ruyi::protocol::RecallEvent {
                        channel_id: "g".into(),
                        channel_type: ChannelType::Group,
                        message_id: 1,
                        message_seq: 1,
                        from_uid: "u1".into(),
                    }),
                };
                let mut out = BytesMut::new();
                encoder.encode(&packet, &mut out);
                t.server_bytes(&out);
            }
            5 => {
                let n = usize::from(input.byte());
                t.server_bytes(input.take(n));
            }
            _ => {
                let v = 2 + input.byte() % 5;
                let n = usize::from(input.byte());
                wkproto_round_trips(input.take(n), v, frame_max);
            }
        }
        if !client_bytes.is_empty() {
            wkproto_round_trips(&client_bytes, version, frame_max);
            // Split where the input says: the translator must not care.
            let split = usize::from(input.byte()).min(client_bytes.len());
            t.client_bytes(&client_bytes[..split]);
            t.client_bytes(&client_bytes[split..]);
        }
        // What the client gets: valid packets, one per element.
        let negotiated = t.version();
        for bytes in t.for_client().drain(..).collect::<Vec<_>>() {
            let mut buf = BytesMut::from(&bytes[..]);
            let packet = codec::decode(&mut buf, negotiated, usize::MAX)
                .expect("the translator's packets decode")
                .expect("whole packets");
            assert!(buf.is_empty(), "one packet per element");
            match packet {
                Wk::ConnAck(ack) if ack.reason == codec::reason::SUCCESS => {
                    // The version byte goes to clients above 3, and says
                    // the negotiated version.
                    let expected = (negotiated > 3).then_some(negotiated);
                    assert_eq!(ack.server_version, expected);
                    assert!(!logged_in, "one successful CONNACK per connection");
                    logged_in = true;
                    let salt: [u8; 16] = ack.salt.as_bytes().try_into().expect("16-byte salt");
                    if !raw_before_login {
                        cipher = Some(client.agree(&ack.server_key, salt).expect("a valid key"));
                    }
                }
                Wk::Recv(recv) => {
                    assert!(logged_in, "RECV only after a successful CONNACK");
                    if let Some(c) = &cipher {
                        assert_eq!(c.msg_key(&recv_sign(&recv)), recv.msg_key, "RECV msgKey");
                        c.open(&recv.payload).expect("RECV payload decrypts");
                    }
                }
                _ => {}
            }
        }
        // What the shard gets: valid ruyi frames.
        let mut to_server = std::mem::take(t.for_server());
        let frames = FrameDecoder::new(usize::MAX >> 1);
        while let Some(frame) = frames.next_frame(&mut to_server).expect("frames split") {
            Packet::decode(&frame, &verify).expect("the translator's frames decode");
        }
        assert!(to_server.is_empty(), "whole frames only");
    }
}

/// Decodes `bytes` as a WKProto stream at `version`; every packet decoded
/// must encode to bytes that decode to the same packet.
fn wkproto_round_trips(bytes: &[u8], version: u8, max: usize) {
    use ruyi::wkproto::codec;
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(packet)) = codec::decode(&mut buf, version, max) {
        let mut out = BytesMut::new();
        codec::encode(&packet, version, &mut out).expect("a decoded packet encodes");
        let again = codec::decode(&mut out, version, usize::MAX)
            .expect("re-encoded decodes")
            .expect("whole");
        assert_eq!(again, packet, "round trip at version {version}");
    }
}
