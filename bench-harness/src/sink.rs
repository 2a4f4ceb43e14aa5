//! `ruyi-bench sink`: a null server speaking ruyi's protocol, to measure
//! the load generator's own ceiling. It accepts every Connect, answers
//! every Send with a SendAck (seqs counted per channel, in memory) and
//! pushes it as a Recv to the receiver's connections when they are on the
//! same executor; it stores nothing, checks nothing and never retries. A
//! `chat` run against it is bounded by the harness (and the sink's own
//! small cost), not by a real server.

use bytes::BytesMut;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use ruyi::protocol::{
    encode_recv, ChannelType, ConnAck, Encoder, FrameDecoder, Packet, ReasonCode, RecvFields,
    SendAck, VerifyLimits,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// Where to listen (every executor shares the port).
    #[arg(long, default_value = "127.0.0.1:5100")]
    pub(crate) listen: SocketAddr,
    /// Executors (each accepts on the port; a receiver gets a message only
    /// when it is on the sender's executor, so use 1 for chat).
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
}

/// One executor's connections, by uid.
#[derive(Default)]
struct Hub {
    /// uid -> the write halves' queues of its connections.
    online: HashMap<String, Vec<Rc<RefCell<Outbox>>>>,
    seqs: HashMap<String, u64>,
    next_id: u64,
}

/// Bytes waiting to be written to one connection, and its writer's waker.
#[derive(Default)]
struct Outbox {
    bytes: BytesMut,
    waker: Option<std::task::Waker>,
    closed: bool,
}

impl Outbox {
    fn push(&mut self, frame: &[u8]) {
        self.bytes.extend_from_slice(frame);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

pub fn run(args: &SinkArgs) -> anyhow::Result<()> {
    let mut handles = Vec::new();
    for thread in 0..args.threads.max(1) {
        let listen = args.listen;
        handles.push(
            LocalExecutorBuilder::new(Placement::Unbound)
                .name(&format!("sink-{thread}"))
                .spawn(move || async move { serve(listen).await })
                .map_err(|e| anyhow::anyhow!("starting a sink executor: {e}"))?,
        );
    }
    eprintln!("ruyi-bench sink: listening on {}", args.listen);
    for handle in handles {
        handle
            .join()
            .map_err(|e| anyhow::anyhow!("sink executor failed: {e}"))??;
    }
    Ok(())
}

async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(listen).map_err(|e| anyhow::anyhow!("binding {listen}: {e}"))?;
    let hub = Rc::new(RefCell::new(Hub::default()));
    loop {
        let stream = listener
            .accept()
            .await
            .map_err(|e| anyhow::anyhow!("accepting: {e}"))?;
        let hub = Rc::clone(&hub);
        glommio::spawn_local(async move {
            let _ = connection(stream, hub).await;
        })
        .detach();
    }
}

async fn connection(stream: TcpStream, hub: Rc<RefCell<Hub>>) -> anyhow::Result<()> {
    stream
        .set_nodelay(true)
        .map_err(|e| anyhow::anyhow!("TCP_NODELAY: {e}"))?;
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    let outbox = Rc::new(RefCell::new(Outbox::default()));
    let writing = Rc::clone(&outbox);
    let writer_task = glommio::spawn_local(async move {
        let mut chunk = BytesMut::new();
        loop {
            let closed = std::future::poll_fn(|cx| {
                let mut out = writing.borrow_mut();
                if !out.bytes.is_empty() {
                    chunk = out.bytes.split();
                    std::task::Poll::Ready(false)
                } else if out.closed {
                    std::task::Poll::Ready(true)
                } else {
                    out.waker = Some(cx.waker().clone());
                    std::task::Poll::Pending
                }
            })
            .await;
            if closed || writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let decoder = FrameDecoder::new(1 << 20);
    let limits = VerifyLimits::for_frame_size(1 << 20);
    let mut encoder = Encoder::new();
    let mut input = BytesMut::with_capacity(64 * 1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut frame = BytesMut::new();
    let mut me: Option<String> = None;
    let result = async {
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            input.extend_from_slice(&buf[..n]);
            while let Some(bytes) = decoder.next_frame(&mut input)? {
                match Packet::decode(&bytes, &limits)? {
                    Packet::Connect(connect) => {
                        hub.borrow_mut()
                            .online
                            .entry(connect.uid.clone())
                            .or_default()
                            .push(Rc::clone(&outbox));
                        me = Some(connect.uid);
                        frame.clear();
                        encoder.encode(
                            &Packet::ConnAck(ConnAck {
                                reason: ReasonCode::Success,
                                server_time_ms: ruyi::time::unix_now_ms() as i64,
                                heartbeat_interval_ms: 0,
                                session_id: 0,
                            }),
                            &mut frame,
                        );
                        outbox.borrow_mut().push(&frame);
                    }
                    Packet::Send(send) => {
                        let from = me.clone().unwrap_or_default();
                        let mut hub = hub.borrow_mut();
                        hub.next_id += 1;
                        let message_id = hub.next_id;
                        let seq = {
                            let seq = hub.seqs.entry(send.channel_id.clone()).or_insert(0);
                            *seq += 1;
                            *seq
                        };
                        frame.clear();
                        encoder.encode(
                            &Packet::SendAck(SendAck {
                                client_seq: send.client_seq,
                                client_msg_no: send.client_msg_no.clone(),
                                message_id,
                                message_seq: seq,
                                reason: ReasonCode::Success,
                            }),
                            &mut frame,
                        );
                        outbox.borrow_mut().push(&frame);
                        if send.channel_type == ChannelType::Person {
                            if let Some(receivers) = hub.online.get(&send.channel_id) {
                                frame.clear();
                                encode_recv(
                                    &mut encoder,
                                    &RecvFields {
                                        message_id,
                                        message_seq: seq,
                                        client_msg_no: &send.client_msg_no,
                                        from_uid: &from,
                                        // A person channel is named after the
                                        // other side, as the receiver sees it.
                                        channel_id: &from,
                                        channel_type: ChannelType::Person,
                                        timestamp_ms: ruyi::time::unix_now_ms() as i64,
                                        flags: 0,
                                        send_flags: send.flags,
                                        payload: &send.payload,
                                    },
                                    &mut frame,
                                );
                                for receiver in receivers {
                                    receiver.borrow_mut().push(&frame);
                                }
                            }
                        }
                    }
                    Packet::Ping => {
                        frame.clear();
                        encoder.encode(&Packet::Pong, &mut frame);
                        outbox.borrow_mut().push(&frame);
                    }
                    _ => {}
                }
            }
        }
    }
    .await;
    if let Some(uid) = me {
        let mut hub = hub.borrow_mut();
        if let Some(conns) = hub.online.get_mut(&uid) {
            conns.retain(|c| !Rc::ptr_eq(c, &outbox));
        }
    }
    outbox.borrow_mut().closed = true;
    if let Some(waker) = outbox.borrow_mut().waker.take() {
        waker.wake();
    }
    writer_task.await;
    result
}
