//! WebSocket connections: the upgrade (path and origin checked, under the
//! handshake timeout) and [`WsIo`], which presents an upgraded connection
//! as the byte stream the connection driver reads and writes.
//!
//! The wire contract: the payloads of the client's binary messages,
//! concatenated, are exactly the TCP byte stream (length-prefixed frames,
//! which may be split across messages or several to one message); the
//! server sends what one outbox flush holds as one binary message. A text
//! message is refused with close code 1003, a message over the size limit
//! with 1009. Pings are answered by the WebSocket layer and never enter the
//! frame stream.

use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use bytes::{Buf, Bytes};
use futures_lite::{AsyncRead, AsyncWrite, Stream};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The WebSocket layer's settings for one connection: a small read buffer
/// (its 128 KiB default would be allocated per connection), messages no
/// bigger than one frame, and a write buffer bounded by the outbound limit
/// (bytes handed to it have left the outbox's accounting).
pub fn config(frame_size_max_bytes: usize, outbound_buffer_max_bytes: usize) -> WebSocketConfig {
    let message_max = frame_size_max_bytes + crate::protocol::LENGTH_PREFIX_BYTES;
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(outbound_buffer_max_bytes + message_max + 4096)
        .max_message_size(Some(message_max))
        .max_frame_size(Some(message_max))
}

/// Why an upgrade request was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not the configured path: 404.
    WrongPath,
    /// An `Origin` not in `ws.allowed_origins`: 403.
    Origin,
    /// The client a trusted proxy forwards for is over the per-IP accept
    /// rate: 429.
    RateLimited,
}

/// Checks an upgrade request against `ws.path` and `ws.allowed_origins`.
pub fn check_upgrade(ws: &crate::config::WsConfig, request: &Request) -> Result<(), Refusal> {
    if !ws.path.is_empty() && request.uri().path() != ws.path {
        return Err(Refusal::WrongPath);
    }
    let origin = request
        .headers()
        .get("origin")
        .and_then(|value| value.to_str().ok());
    if !ws.allows_origin(origin) {
        return Err(Refusal::Origin);
    }
    Ok(())
}

/// The HTTP answer to a refused upgrade.
pub fn refusal_response(refusal: Refusal) -> ErrorResponse {
    let (status, body) = match refusal {
        Refusal::WrongPath => (404, "no WebSocket endpoint here"),
        Refusal::Origin => (403, "origin not allowed"),
        Refusal::RateLimited => (429, "rate_limited"),
    };
    let mut response = ErrorResponse::new(Some(body.to_owned()));
    *response.status_mut() =
        async_tungstenite::tungstenite::http::StatusCode::from_u16(status).expect("valid status");
    response
}

/// The client a request from the trusted proxy `peer` is for: the nearest
/// address in its `X-Forwarded-For` that is not itself a trusted proxy (the
/// proxy's own when it names none).
pub fn forwarded_client(
    ws: &crate::config::WsConfig,
    request: &Request,
    peer: std::net::IpAddr,
) -> std::net::IpAddr {
    let mut client = peer;
    let hops = request
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<std::net::IpAddr>() else {
            break;
        };
        client = ip;
        if !ws.trusts(ip) {
            break;
        }
    }
    client
}

/// The upgrade's header check, for `accept_hdr_async_with_config`.
pub struct UpgradeCheck<'a> {
    pub ws: &'a crate::config::WsConfig,
    /// Why the request was refused, if it was.
    pub refused: &'a std::cell::Cell<Option<Refusal>>,
    /// For a connection from a trusted proxy: its address, and the per-IP
    /// admission to run on the client it forwards for (the accept skipped
    /// it).
    pub forwarded_by: Option<(std::net::IpAddr, &'a dyn Fn(std::net::IpAddr) -> bool)>,
}

impl async_tungstenite::tungstenite::handshake::server::Callback for UpgradeCheck<'_> {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        let checked = check_upgrade(self.ws, request).and_then(|()| match self.forwarded_by {
            Some((proxy, admit)) if !admit(forwarded_client(self.ws, request, proxy)) => {
                Err(Refusal::RateLimited)
            }
            _ => Ok(()),
        });
        match checked {
            Ok(()) => Ok(response),
            Err(refusal) => {
                self.refused.set(Some(refusal));
                Err(refusal_response(refusal))
            }
        }
    }
}

/// An upgraded connection as a byte stream: reads yield the payloads of
/// binary messages in order, each write sends one binary message.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// What is left of the binary message being read.
    reading: Bytes,
    /// A close frame to send before reads end (a text message, an
    /// oversized one), and whether it went out.
    closing: Option<CloseFrame>,
    closed: bool,
}

impl<S> WsIo<S> {
    pub fn new(ws: WebSocketStream<S>) -> WsIo<S> {
        WsIo {
            ws,
            reading: Bytes::new(),
            closing: None,
            closed: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// Sends the pending close frame; ready when it is written (or cannot
    /// be).
    fn poll_send_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        use futures_sink::Sink;
        if let Some(frame) = self.closing.take() {
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Pending => {
                    self.closing = Some(frame);
                    return Poll::Pending;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {
                    if Pin::new(&mut self.ws)
                        .start_send(Message::Close(Some(frame)))
                        .is_err()
                    {
                        return Poll::Ready(());
                    }
                }
            }
        }
        match Pin::new(&mut self.ws).poll_flush(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.closed {
                // The close frame is (being) sent: the stream has ended.
                return match this.poll_send_close(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => Poll::Ready(Ok(0)),
                };
            }
            if !this.reading.is_empty() {
                let n = buf.len().min(this.reading.len());
                buf[..n].copy_from_slice(&this.reading[..n]);
                this.reading.advance(n);
                return Poll::Ready(Ok(n));
            }
            match Pin::new(&mut this.ws).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                // The peer closed (its close frame is answered by the layer).
                Poll::Ready(None) | Poll::Ready(Some(Ok(Message::Close(_)))) => {
                    return Poll::Ready(Ok(0))
                }
                Poll::Ready(Some(Ok(Message::Binary(data)))) => this.reading = data,
                Poll::Ready(Some(Ok(Message::Text(_)))) => {
                    this.close_with(CloseCode::Unsupported, "binary messages only");
                }
                // Answered (pings) or nothing to do; never part of the
                // frame stream.
                Poll::Ready(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                Poll::Ready(Some(Err(WsError::Capacity(_)))) => {
                    this.close_with(CloseCode::Size, "message too big");
                }
                Poll::Ready(Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed))) => {
                    return Poll::Ready(Ok(0))
                }
                Poll::Ready(Some(Err(WsError::Io(error)))) => return Poll::Ready(Err(error)),
                Poll::Ready(Some(Err(error))) => {
                    // A protocol violation (an unmasked frame, a bad opcode):
                    // the layer has queued its own close.
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, error)));
                }
            }
        }
    }
}

impl<S> WsIo<S> {
    fn close_with(&mut self, code: CloseCode, reason: &'static str) {
        self.closing = Some(CloseFrame {
            code,
            reason: reason.into(),
        });
        self.closed = true;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        use futures_sink::Sink;
        let this = self.get_mut();
        // Ready once what was sent before has reached the socket: the
        // write buffer never holds more than one outbox flush.
        match Pin::new(&mut this.ws).poll_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(ws_io_error(error))),
            Poll::Ready(Ok(())) => {}
        }
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        use futures_sink::Sink;
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_io_error)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        use futures_sink::Sink;
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(ws_io_error)
    }
}

fn ws_io_error(error: WsError) -> io::Error {
    match error {
        WsError::Io(error) => error,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, error)
        }
        other => io::Error::other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WsConfig;

    fn request(path: &str, origin: Option<&str>) -> Request {
        let mut builder = Request::builder().uri(path);
        if let Some(origin) = origin {
            builder = builder.header("origin", origin);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn the_forwarded_client_is_the_nearest_hop_that_is_not_a_trusted_proxy() {
        let ws = WsConfig {
            trusted_proxies: vec!["10.0.0.1".into(), "10.0.0.2".into()],
            ..WsConfig::default()
        };
        let proxy: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let with = |xff: &str| {
            let request = Request::builder()
                .uri("/")
                .header("x-forwarded-for", xff)
                .body(())
                .unwrap();
            forwarded_client(&ws, &request, proxy).to_string()
        };
        assert_eq!(with("203.0.113.7"), "203.0.113.7");
        // A spoofed first entry is skipped: the nearest untrusted hop counts.
        assert_eq!(with("198.51.100.1, 203.0.113.7, 10.0.0.2"), "203.0.113.7");
        assert_eq!(with("garbage"), "10.0.0.1");
        let none = Request::builder().uri("/").body(()).unwrap();
        assert_eq!(forwarded_client(&ws, &none, proxy), proxy);
    }

    #[test]
    fn an_upgrade_is_checked_against_the_path_and_the_allowed_origins() {
        let open = WsConfig::default();
        assert_eq!(check_upgrade(&open, &request("/", None)), Ok(()));
        assert_eq!(
            check_upgrade(&open, &request("/other", None)),
            Err(Refusal::WrongPath)
        );
        let strict = WsConfig {
            path: "/ws".into(),
            allowed_origins: vec!["https://chat.example.com".into()],
            ..WsConfig::default()
        };
        assert_eq!(
            check_upgrade(&strict, &request("/ws", Some("https://chat.example.com"))),
            Ok(())
        );
        assert_eq!(
            check_upgrade(&strict, &request("/ws", Some("https://evil.example.net"))),
            Err(Refusal::Origin)
        );
        assert_eq!(
            check_upgrade(&strict, &request("/ws", None)),
            Err(Refusal::Origin),
            "a page must name its origin when origins are listed"
        );
    }
}
