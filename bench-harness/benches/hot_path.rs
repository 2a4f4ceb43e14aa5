//! Per-operation costs on the gateway's hot path, each against a stated
//! baseline so a regression shows as a ratio, not just a number:
//!
//! - frame encode: one `Recv` (32-byte payload) through the encoder, against
//!   copying the same number of bytes;
//! - verify + decode: one `Send` frame through `Packet::decode` (the
//!   FlatBuffers verifier with the configured limits, then owned fields),
//!   against the encode above;
//! - timer wheel: insert + cancel of one retry timer, and a tick over 10,000
//!   armed timers where nothing is due, against a `HashMap` insert + remove.
//!
//! Run: `cargo bench -p bench-harness --bench hot_path`.

mod common;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion};
use ruyi::delivery::wheel::TimerWheel;
use ruyi::protocol::{encode_recv, ChannelType, Encoder, Packet, SendPacket, VerifyLimits};
use std::hint::black_box;

fn frames(c: &mut Criterion) {
    let payload = [b'x'; 32];
    let mut encoder = Encoder::new();
    let mut out = BytesMut::with_capacity(4096);
    encode_recv(&mut encoder, &common::chat_recv(&payload), &mut out);
    let size = out.len();
    let source = vec![7u8; size];
    let mut group = c.benchmark_group("frame");
    group.bench_function("baseline: copy the frame's bytes", |b| {
        b.iter(|| {
            out.clear();
            out.extend_from_slice(black_box(&source));
            black_box(&out);
        })
    });
    group.bench_function("encode Recv", |b| {
        b.iter(|| {
            out.clear();
            encode_recv(
                &mut encoder,
                black_box(&common::chat_recv(&payload)),
                &mut out,
            );
            black_box(&out);
        })
    });
    let mut send = BytesMut::new();
    encoder.encode(
        &Packet::Send(SendPacket {
            client_seq: 7,
            client_msg_no: "74328f29cab872e731d84843c83f9318".into(),
            channel_id: "bob".into(),
            channel_type: ChannelType::Person,
            flags: 0,
            payload: Bytes::from_static(&[b'x'; 32]),
        }),
        &mut send,
    );
    // The frame without its 4-byte length prefix, as the splitter hands it.
    let frame = Bytes::copy_from_slice(&send[4..]);
    let limits = VerifyLimits::for_frame_size(65536);
    group.bench_function("verify + decode Send", |b| {
        b.iter(|| black_box(Packet::decode(black_box(&frame), &limits).unwrap()))
    });
    group.finish();
}

fn timers(c: &mut Criterion) {
    let mut group = c.benchmark_group("timer wheel");
    let mut map = std::collections::HashMap::<u64, u64, ahash::RandomState>::default();
    let mut key = 0u64;
    group.bench_function("baseline: HashMap insert + remove", |b| {
        b.iter(|| {
            key += 1;
            map.insert(key, key);
            black_box(map.remove(&key));
        })
    });
    let mut wheel = TimerWheel::<u64>::new(100, 1024, 0);
    // Retry timers of 10,000 pushes, spread over the wheel, none due
    // during the benchmark.
    for k in 0..10_000u64 {
        wheel.insert(1_000_000 + k, 1_000_000_000_000 + k * 100);
    }
    let mut key = 0u64;
    group.bench_function("insert + cancel (10,000 armed)", |b| {
        b.iter(|| {
            key += 1;
            wheel.insert(key, 3_000);
            black_box(wheel.cancel(&key));
        })
    });
    let mut due = Vec::new();
    let mut now = 0u64;
    group.bench_function("one tick, nothing due (10,000 armed)", |b| {
        b.iter(|| {
            now += 100;
            wheel.advance(black_box(now), &mut due);
            black_box(&due);
        })
    });
    group.finish();
}

criterion_group!(benches, frames, timers);
criterion_main!(benches);
