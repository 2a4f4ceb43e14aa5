//! A WKProto connection as a byte stream of ruyi frames, so the connection
//! driver runs it unchanged: reads give the ruyi frames the translator made
//! of the client's packets; writes take the ruyi frames of the outbox and
//! send the client WKProto packets.
//!
//! Back-pressure is the socket's: a write is refused (pending) while the
//! packets of the previous one are not all written, so the outbox's limits
//! and the write-stall timeout see a slow WKProto client as they see a slow
//! native one. The client's bytes are read only as fast as the driver
//! takes the translated frames.

use super::translate::{Translator, TranslatorConfig};
use bytes::{Buf, Bytes};
use futures_lite::{AsyncRead, AsyncWrite};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Bytes read from the client per read.
const READ_CHUNK_BYTES: usize = 16 * 1024;

pub struct WkIo<S> {
    inner: S,
    translator: Translator,
    /// Each packet in its own write (one WebSocket message per packet, as
    /// WuKongIM's JS SDK 1.0.4 needs); otherwise all of them in one write.
    one_packet_per_write: bool,
    /// What is being written: one packet, or several joined.
    writing: Bytes,
    read_buf: Vec<u8>,
    /// The client closed its side.
    client_closed: bool,
}

impl<S> WkIo<S> {
    pub fn new(inner: S, config: TranslatorConfig, one_packet_per_write: bool) -> WkIo<S> {
        WkIo {
            inner,
            translator: Translator::new(config),
            one_packet_per_write,
            writing: Bytes::new(),
            read_buf: vec![0; READ_CHUNK_BYTES],
            client_closed: false,
        }
    }

    pub fn translator(&self) -> &Translator {
        &self.translator
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WkIo<S> {
    /// Writes what the translator has for the client; ready when all of
    /// it is written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.writing.is_empty() {
                let packets = self.translator.for_client();
                if packets.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                self.writing = if self.one_packet_per_write || packets.len() == 1 {
                    packets.pop_front().unwrap_or_default()
                } else {
                    let mut joined = Vec::with_capacity(packets.iter().map(Bytes::len).sum());
                    for packet in packets.drain(..) {
                        joined.extend_from_slice(&packet);
                    }
                    Bytes::from(joined)
                };
            }
            match Pin::new(&mut self.inner).poll_write(cx, &self.writing) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    if self.one_packet_per_write && n < self.writing.len() {
                        // A message transport takes a message whole.
                        return Poll::Ready(Err(io::Error::other("a packet was split")));
                    }
                    self.writing.advance(n);
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WkIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            // Answers the translator gave itself (a refused SEND, a
            // SUBACK, a DISCONNECT) go out even when the shard writes
            // nothing.
            if let Poll::Ready(Err(error)) = this.poll_drain(cx) {
                return Poll::Ready(Err(error));
            }
            let ready = this.translator.for_server();
            if !ready.is_empty() {
                let n = ready.len().min(buf.len());
                buf[..n].copy_from_slice(&ready[..n]);
                ready.advance(n);
                return Poll::Ready(Ok(n));
            }
            if this.translator.is_closing() || this.client_closed {
                // The end, once the last packets are out.
                return match this.poll_drain(cx) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(0)),
                    Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
                    Poll::Pending => Poll::Pending,
                };
            }
            if !this.translator.accepts_client_bytes() {
                // CONNECT waits for the shard; its answer wakes this task
                // through the outbox.
                return Poll::Pending;
            }
            match Pin::new(&mut this.inner).poll_read(cx, &mut this.read_buf) {
                Poll::Ready(Ok(0)) => this.client_closed = true,
                Poll::Ready(Ok(n)) => this.translator.client_bytes(&this.read_buf[..n]),
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WkIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Nothing new is taken while the last write is still going out.
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => return Poll::Pending,
        }
        this.translator.server_bytes(buf);
        if let Poll::Ready(Err(error)) = this.poll_drain(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_close(cx),
            other => other,
        }
    }
}
