//! The task that drives one connection's socket.
//!
//! It is a single hand-written poll loop rather than separate reader and
//! writer tasks: glommio's stream keeps its pending io_uring poll between
//! calls, so polling read and write from one task costs nothing extra and
//! needs no lock around the stream. Each wake-up writes everything the
//! outbox holds in one `send`, then reads a chunk and parses every complete
//! frame in it.

use crate::conn::limit::TokenBucket;
use crate::conn::outbox::Outbox;
use crate::ids::ConnId;
use crate::protocol::FrameDecoder;
use crate::shard::runtime::Runtime;
use bytes::{Buf, BytesMut};
use futures_lite::{AsyncRead, AsyncWrite};
use std::future::poll_fn;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

/// Why a connection's task ended.
#[derive(Debug)]
pub enum Ended {
    /// The server closed it after flushing (timeout, violation, shutdown).
    Closed,
    /// The server cut it off without flushing.
    Aborted,
    /// The peer closed its side.
    PeerClosed,
    Io(std::io::Error),
}

/// How many read-and-write rounds one wake-up may take before yielding to
/// other connections.
const ROUNDS_PER_WAKEUP: usize = 8;

/// Drives one connection: a plain glommio `TcpStream`, or a TLS stream
/// over one.
pub(crate) async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    runtime: Rc<Runtime>,
    mut stream: S,
    conn: ConnId,
    outbox: Rc<Outbox>,
) {
    let span = tracing::debug_span!("conn", id = conn.0);
    let _enter = span.enter();
    let chunk = runtime.config.limits.read_chunk_bytes;
    let decoder = FrameDecoder::new(runtime.config.limits.frame_size_max_bytes);
    let mut writing = BytesMut::new();
    let mut partial = BytesMut::new();
    // What the client may send: a second's worth in a burst, then the rate.
    let limits = &runtime.config.limits;
    let start = runtime.now().monotonic.0;
    let frame_rate = u64::from(limits.frames_per_second_per_connection);
    let byte_rate = limits.bytes_per_second_per_connection;
    let mut frames = TokenBucket::new(frame_rate, frame_rate, start);
    let mut bytes = TokenBucket::new(byte_rate, byte_rate, start);
    // Set while the client is over its rate: nothing is read until it fires.
    let mut throttle: Option<glommio::timer::Timer> = None;
    let ended = poll_fn(|cx| {
        outbox.register(cx.waker());
        for _ in 0..ROUNDS_PER_WAKEUP {
            if outbox.is_aborted() {
                return Poll::Ready(Ended::Aborted);
            }
            let mut progressed = false;

            // Write: everything queued since the last write goes out at once.
            if writing.is_empty() {
                outbox.take_into(&mut writing);
            }
            while !writing.is_empty() {
                match Pin::new(&mut stream).poll_write(cx, &writing) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ended::PeerClosed),
                    Poll::Ready(Ok(n)) => {
                        writing.advance(n);
                        outbox.wrote(n);
                        if writing.is_empty() {
                            let since = outbox.taken_since_us();
                            if since != 0 {
                                let now = runtime.now().micros;
                                runtime.state.borrow_mut().stats.budget.record(
                                    crate::shard::budget::Stage::Flush,
                                    since,
                                    now,
                                );
                            }
                            // Caught up: only that resets the stall clock,
                            // not a trickle of bytes.
                            outbox.mark_flowing();
                        }
                        progressed = true;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Ended::Io(error)),
                    Poll::Pending => {
                        // The peer is not reading; the sweeper cuts it off
                        // if it has not caught up by the write-stall
                        // timeout.
                        outbox.mark_stalled(runtime.now().monotonic);
                        break;
                    }
                }
            }
            // A TLS stream may hold written bytes as records until flushed
            // (plain TCP flushes at once).
            let flushed = if writing.is_empty() {
                match Pin::new(&mut stream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => true,
                    Poll::Ready(Err(error)) => return Poll::Ready(Ended::Io(error)),
                    Poll::Pending => false,
                }
            } else {
                false
            };
            if outbox.closing().is_some() {
                if flushed && outbox.is_empty() {
                    // A TLS stream sends its close_notify; for TCP this is
                    // the same as dropping it.
                    let _ = Pin::new(&mut stream).poll_close(cx);
                    return Poll::Ready(Ended::Closed);
                }
                if progressed {
                    continue;
                }
                return Poll::Pending;
            }

            // Over its rate, the client is not read (TCP pushes back on
            // it) until the buckets allow again.
            let now_ms = runtime.now().monotonic.0;
            let mut throttled = match throttle.as_mut() {
                Some(timer) => match Pin::new(timer).poll(cx) {
                    Poll::Ready(_) => {
                        throttle = None;
                        false
                    }
                    Poll::Pending => true,
                },
                None => false,
            };
            if !throttled {
                let wait = frames.wait_ms(now_ms).max(bytes.wait_ms(now_ms));
                if wait > 0 {
                    let mut timer = glommio::timer::Timer::new(Duration::from_millis(wait));
                    if Pin::new(&mut timer).poll(cx).is_pending() {
                        throttle = Some(timer);
                        throttled = true;
                    }
                }
            }
            if throttled {
                if progressed {
                    continue;
                }
                return Poll::Pending;
            }

            // Read: one chunk into the shard's scratch buffer, then every
            // complete frame in it.
            let reads_frames = runtime.state.borrow().reads_frames(conn);
            if reads_frames && holds_whole_frame(&decoder, &partial) {
                // Frames that arrived while the session was joining, or
                // that the frame rate held back.
                take_frames(
                    &runtime,
                    conn,
                    &decoder,
                    &mut partial,
                    BytesMut::new(),
                    &mut frames,
                );
                continue;
            }
            if reads_frames && runtime.may_read(&outbox) {
                let mut scratch = runtime.read_scratch.borrow_mut();
                if scratch.len() < chunk {
                    // A fresh zeroed region; earlier regions live on only as
                    // long as frames sliced from them.
                    *scratch = BytesMut::zeroed(chunk * 4);
                }
                match Pin::new(&mut stream).poll_read(cx, &mut scratch[..chunk]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ended::PeerClosed),
                    Poll::Ready(Ok(n)) => {
                        let filled = scratch.split_to(n);
                        drop(scratch);
                        bytes.take(n as u64, now_ms);
                        take_frames(&runtime, conn, &decoder, &mut partial, filled, &mut frames);
                        progressed = true;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Ended::Io(error)),
                    Poll::Pending => {}
                }
            }
            if !progressed {
                return Poll::Pending;
            }
        }
        // Busy connection: let the others run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
    match &ended {
        Ended::Io(error) => tracing::debug!(%error, "connection failed"),
        other => tracing::debug!(?other, "connection ended"),
    }
    drop(stream);
    runtime.state.borrow_mut().on_closed(conn);
    runtime.connection_ended();
}

/// Whether `buf` starts with a whole frame (or with a length that is an
/// error, which also needs handling now).
fn holds_whole_frame(decoder: &FrameDecoder, buf: &[u8]) -> bool {
    match decoder.peek_length(buf) {
        Ok(Some(length)) => buf.len() >= crate::protocol::LENGTH_PREFIX_BYTES + length,
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Hands every complete frame in `partial` + `filled` to the shard, as far
/// as the frame rate allows, and keeps the rest in `partial`. Frames stay
/// unread in `partial` while the session is not taking any (joining,
/// closing) or the rate is used up; nothing more is read meanwhile, so
/// this holds at most one read.
fn take_frames(
    runtime: &Runtime,
    conn: ConnId,
    decoder: &FrameDecoder,
    partial: &mut BytesMut,
    filled: BytesMut,
    frames: &mut TokenBucket,
) {
    let mut buf = if partial.is_empty() {
        filled
    } else {
        partial.extend_from_slice(&filled);
        std::mem::take(partial)
    };
    let now = runtime.now();
    let mut state = runtime.state.borrow_mut();
    while state.reads_frames(conn) && frames.ready(now.monotonic.0) {
        match decoder.next_frame(&mut buf) {
            Ok(Some(frame)) => {
                frames.take(1, now.monotonic.0);
                state.on_frame(conn, &frame, now);
            }
            Ok(None) => break,
            Err(error) => {
                state.on_frame_error(conn, &error, now);
                buf.clear();
                break;
            }
        }
    }
    if !buf.is_empty() {
        // Own the leftover so it never pins the shared scratch region.
        *partial = BytesMut::with_capacity(buf.len().max(256));
        partial.extend_from_slice(&buf);
    }
}
