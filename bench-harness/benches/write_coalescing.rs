//! Write coalescing: the cost of delivering N `Recv` frames to one
//! connection as N writes versus one write, over loopback TCP with glommio.
//!
//! The gateway pays per syscall, not per frame (about 1 us of kernel work per
//! `write` on loopback), so `Outbox` collects every frame a connection gets in
//! one tick and its task writes them with one `send`. This benchmark measures
//! what that buys: a sink on its own executor reads everything and answers one
//! byte per batch; the client writes a batch of real encoded `Recv` frames
//! either frame by frame or all at once, then waits for the answer.
//!
//! Run: `cargo bench --bench write_coalescing` (results under
//! target/criterion).

mod common;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use ruyi::protocol::{encode_recv, Encoder};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One encoded `Recv` with a 32-byte payload, as a chat message would be.
fn recv_frame() -> Vec<u8> {
    let mut encoder = Encoder::new();
    let mut out = BytesMut::new();
    let payload = [b'x'; 32];
    encode_recv(&mut encoder, &common::chat_recv(&payload), &mut out);
    out.to_vec()
}

/// Starts a sink on its own executor (CPU 1 when there is one): it reads
/// `batch_bytes` at a time and answers each batch with one byte.
fn start_sink() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let placement = if cpus > 1 {
        Placement::Fixed(1)
    } else {
        Placement::Unbound
    };
    LocalExecutorBuilder::new(placement)
        .name("sink")
        .spawn(move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let mut stream = listener.accept().await.unwrap();
                glommio::spawn_local(async move {
                    let mut header = [0u8; 8];
                    if stream.read_exact(&mut header).await.is_err() {
                        return;
                    }
                    let batch_bytes = u64::from_le_bytes(header) as usize;
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut pending = 0usize;
                    loop {
                        let n = match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending += n;
                        while pending >= batch_bytes {
                            pending -= batch_bytes;
                            if stream.write_all(&[1]).await.is_err() {
                                return;
                            }
                        }
                    }
                })
                .detach();
            }
        })
        .unwrap();
    rx.recv().unwrap()
}

/// Sends `iters` batches of `frames` frames, coalesced or not; returns the
/// time taken.
fn run_batches(
    addr: SocketAddr,
    frame: &[u8],
    frames: usize,
    coalesced: bool,
    iters: u64,
) -> Duration {
    let frame = frame.to_vec();
    LocalExecutorBuilder::new(Placement::Fixed(0))
        .name("client")
        .spawn(move || async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let batch_bytes = (frame.len() * frames) as u64;
            stream.write_all(&batch_bytes.to_le_bytes()).await.unwrap();
            let batch: Vec<u8> = frame.repeat(frames);
            let mut answer = [0u8; 1];
            let started = Instant::now();
            for _ in 0..iters {
                if coalesced {
                    stream.write_all(&batch).await.unwrap();
                } else {
                    for _ in 0..frames {
                        stream.write_all(&frame).await.unwrap();
                    }
                }
                stream.read_exact(&mut answer).await.unwrap();
            }
            started.elapsed()
        })
        .unwrap()
        .join()
        .unwrap()
}

fn write_coalescing(c: &mut Criterion) {
    let addr = start_sink();
    let frame = recv_frame();
    let mut group = c.benchmark_group("deliver_frames_to_one_connection");
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_secs(1));
    for frames in [1usize, 16, 64] {
        group.throughput(Throughput::Elements(frames as u64));
        group.bench_with_input(
            BenchmarkId::new("one_write_per_frame", frames),
            &frames,
            |b, &n| b.iter_custom(|iters| run_batches(addr, &frame, n, false, iters)),
        );
        group.bench_with_input(
            BenchmarkId::new("one_write_per_batch", frames),
            &frames,
            |b, &n| b.iter_custom(|iters| run_batches(addr, &frame, n, true, iters)),
        );
    }
    group.finish();
}

criterion_group!(benches, write_coalescing);
criterion_main!(benches);
