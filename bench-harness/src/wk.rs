//! The `wk://` target: the same load over ruyi's WKProto listener, to
//! measure the translator next to the native protocol.
//!
//! [`WkClientIo`] is the client's half of what the gateway's translator does:
//! the harness's `ClientCore` writes ruyi frames and reads ruyi frames as
//! usual, and this adapter speaks WKProto (version 5, with the encryption
//! WuKongIM's SDKs use) on the socket. A cumulative ack becomes one RECVACK
//! per message it covers, as WKProto has no cumulative ack.

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncWrite};
use ruyi::protocol::{
    ChannelType, ConnAck, Disconnect, Encoder, FrameDecoder, Packet, ReasonCode, Recv, SendAck,
    VerifyLimits, RECV_FLAG_REDELIVERED,
};
use ruyi::wkproto::codec::{self, reason, Flags, Packet as Wk};
use ruyi::wkproto::crypto::{Cipher, Handshake};
use ruyi::wkproto::translate::{recv_sign, send_sign};
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The protocol version the harness speaks.
const VERSION: u8 = 5;
const FRAME_MAX: usize = 4 * 1024 * 1024;

pub(crate) struct WkClientIo<S> {
    inner: S,
    handshake: Handshake,
    cipher: Option<Cipher>,
    /// ruyi frames written by the core, not yet whole.
    from_core: BytesMut,
    /// WKProto bytes for the server, and how much of them is written.
    to_server: BytesMut,
    /// WKProto bytes from the server, not yet whole.
    from_server: BytesMut,
    /// ruyi frames for the core.
    to_core: BytesMut,
    client_msg_nos: HashMap<u32, String>,
    /// Pushes not acknowledged yet, per channel: (message id, seq).
    unacked: HashMap<(String, u8), Vec<(i64, u64)>>,
    frames: FrameDecoder,
    verify: VerifyLimits,
    encoder: Encoder,
    read_buf: Vec<u8>,
}

impl<S> WkClientIo<S> {
    pub(crate) fn new(inner: S) -> io::Result<WkClientIo<S>> {
        Ok(WkClientIo {
            inner,
            handshake: Handshake::new()?,
            cipher: None,
            from_core: BytesMut::new(),
            to_server: BytesMut::new(),
            from_server: BytesMut::new(),
            to_core: BytesMut::new(),
            client_msg_nos: HashMap::new(),
            unacked: HashMap::new(),
            frames: FrameDecoder::new(FRAME_MAX),
            verify: VerifyLimits::for_frame_size(FRAME_MAX),
            encoder: Encoder::new(),
            read_buf: vec![0; 64 * 1024],
        })
    }

    fn wk(&mut self, packet: &Wk) -> io::Result<()> {
        codec::encode(packet, VERSION, &mut self.to_server).map_err(io::Error::other)
    }

    fn core(&mut self, packet: &Packet) {
        self.encoder.encode(packet, &mut self.to_core);
    }

    /// The core's frames, as WKProto packets for the server.
    fn translate_core_frames(&mut self) -> io::Result<()> {
        while let Some(frame) = self
            .frames
            .next_frame(&mut self.from_core)
            .map_err(io::Error::other)?
        {
            let packet = Packet::decode(&frame, &self.verify).map_err(io::Error::other)?;
            match packet {
                Packet::Connect(c) => {
                    let client_key = self.handshake.server_key();
                    self.wk(&Wk::Connect(codec::Connect {
                        version: VERSION,
                        device_flag: 0,
                        device_id: c.device_id,
                        uid: c.uid,
                        token: c.token,
                        client_timestamp_ms: c.client_timestamp_ms,
                        client_key,
                    }))?;
                }
                Packet::Send(s) => {
                    let Some(cipher) = &self.cipher else {
                        return Err(io::Error::other("a send before the CONNACK"));
                    };
                    let mut send = codec::Send {
                        flags: Flags {
                            red_dot: true,
                            ..Flags::default()
                        },
                        setting: 0,
                        client_seq: s.client_seq,
                        client_msg_no: s.client_msg_no.clone(),
                        stream_no: None,
                        channel_id: s.channel_id,
                        channel_type: channel_type(s.channel_type),
                        expire: 0,
                        msg_key: String::new(),
                        topic: None,
                        payload: Bytes::from(cipher.seal(&s.payload)),
                    };
                    send.msg_key = cipher.msg_key(&send_sign(&send));
                    self.client_msg_nos.insert(s.client_seq, s.client_msg_no);
                    self.wk(&Wk::Send(send))?;
                }
                Packet::RecvAck(ack) => {
                    let key = (ack.channel_id.clone(), channel_type(ack.channel_type));
                    let acked: Vec<(i64, u64)> = if ack.through {
                        let pending = self.unacked.entry(key).or_default();
                        let split = pending.partition_point(|&(_, seq)| seq <= ack.message_seq);
                        pending.drain(..split).collect()
                    } else {
                        if let Some(pending) = self.unacked.get_mut(&key) {
                            pending.retain(|&(id, _)| id != ack.message_id as i64);
                        }
                        vec![(ack.message_id as i64, ack.message_seq)]
                    };
                    for (message_id, message_seq) in acked {
                        self.wk(&Wk::RecvAck(codec::RecvAck {
                            flags: Flags::default(),
                            message_id,
                            message_seq,
                        }))?;
                    }
                }
                Packet::Ping => self.wk(&Wk::Ping)?,
                other => {
                    return Err(io::Error::other(format!(
                        "{} has no WKProto counterpart",
                        other.name()
                    )))
                }
            }
        }
        Ok(())
    }

    /// The server's packets, as ruyi frames for the core.
    fn translate_server_packets(&mut self) -> io::Result<()> {
        while let Some(packet) =
            codec::decode(&mut self.from_server, VERSION, FRAME_MAX).map_err(io::Error::other)?
        {
            match packet {
                Wk::ConnAck(ack) => {
                    let success = ack.reason == reason::SUCCESS;
                    if success {
                        let salt: [u8; 16] = ack
                            .salt
                            .as_bytes()
                            .try_into()
                            .map_err(|_| io::Error::other("a salt that is not 16 bytes"))?;
                        self.cipher = Some(
                            self.handshake
                                .agree(&ack.server_key, salt)
                                .map_err(io::Error::other)?,
                        );
                    }
                    self.core(&Packet::ConnAck(ConnAck {
                        reason: if success {
                            ReasonCode::Success
                        } else {
                            ReasonCode::AuthFailed
                        },
                        server_time_ms: 0,
                        heartbeat_interval_ms: 0,
                        session_id: 0,
                    }));
                }
                Wk::SendAck(ack) => {
                    let client_msg_no = self
                        .client_msg_nos
                        .remove(&ack.client_seq)
                        .unwrap_or_default();
                    self.core(&Packet::SendAck(SendAck {
                        client_seq: ack.client_seq,
                        client_msg_no,
                        message_id: ack.message_id as u64,
                        message_seq: ack.message_seq,
                        reason: if ack.reason == reason::SUCCESS {
                            ReasonCode::Success
                        } else {
                            ReasonCode::StorageError
                        },
                    }));
                }
                Wk::Recv(recv) => {
                    let cipher = self
                        .cipher
                        .as_ref()
                        .ok_or_else(|| io::Error::other("a RECV before the CONNACK"))?;
                    if cipher.msg_key(&recv_sign(&recv)) != recv.msg_key {
                        return Err(io::Error::other("a RECV whose msgKey does not check out"));
                    }
                    let payload = cipher.open(&recv.payload).map_err(io::Error::other)?;
                    let key = (recv.channel_id.clone(), recv.channel_type);
                    let pending = self.unacked.entry(key).or_default();
                    if !pending.iter().any(|&(id, _)| id == recv.message_id) {
                        let at = pending.partition_point(|&(_, seq)| seq < recv.message_seq);
                        pending.insert(at, (recv.message_id, recv.message_seq));
                    }
                    self.core(&Packet::Recv(Recv {
                        message_id: recv.message_id as u64,
                        message_seq: recv.message_seq,
                        client_msg_no: recv.client_msg_no,
                        from_uid: recv.from_uid,
                        channel_id: recv.channel_id,
                        channel_type: match recv.channel_type {
                            1 => ChannelType::Person,
                            2 => ChannelType::Group,
                            _ => ChannelType::Unknown,
                        },
                        timestamp_ms: i64::from(recv.timestamp) * 1000,
                        flags: if recv.flags.dup {
                            RECV_FLAG_REDELIVERED
                        } else {
                            0
                        },
                        send_flags: 0,
                        payload: Bytes::from(payload),
                    }));
                }
                Wk::Pong => self.core(&Packet::Pong),
                Wk::Disconnect(d) => self.core(&Packet::Disconnect(Disconnect {
                    reason: ReasonCode::Kicked,
                    message: d.message,
                })),
                // Nothing the harness asks for.
                _ => {}
            }
        }
        Ok(())
    }
}

fn channel_type(kind: ChannelType) -> u8 {
    match kind {
        ChannelType::Person => 1,
        ChannelType::Group => 2,
        _ => 0,
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WkClientIo<S> {
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.to_server.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.to_server) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.to_server.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WkClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if !this.to_core.is_empty() {
                let n = this.to_core.len().min(buf.len());
                buf[..n].copy_from_slice(&this.to_core[..n]);
                this.to_core.advance(n);
                return Poll::Ready(Ok(n));
            }
            match Pin::new(&mut this.inner).poll_read(cx, &mut this.read_buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(n)) => {
                    this.from_server.extend_from_slice(&this.read_buf[..n]);
                    this.translate_server_packets()?;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WkClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other.map(|r| r.map(|()| 0)),
        }
        this.from_core.extend_from_slice(buf);
        this.translate_core_frames()?;
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_close(cx),
            other => other,
        }
    }
}
