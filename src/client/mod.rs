//! The client SDK.
//!
//! [`core::ClientCore`] holds the protocol logic with no runtime, so the
//! bench harness can drive it from glommio. [`Client`] is the tokio adapter
//! most applications use: [`connect`] returns a `Client` for sending (each
//! send resolves to its `SendAck`) and an [`Incoming`] stream of received
//! messages. Received messages are acknowledged automatically unless
//! [`ConnectOptions::auto_ack`] is off. Heartbeats follow the interval the
//! server gives in `ConnAck`.

pub mod cli;
pub mod core;

pub use self::core::{ClientCore, Event, Identity, Outgoing, ProtocolError};

use crate::protocol::{
    ChannelType, ConnAck, Conversation, ConversationAction, ConversationOp, ConversationOpResp,
    DeviceFlag, Disconnect, Packet, ReasonCode, Recall, RecallEvent, RecallResp, Recv, SendAck,
    SyncConversations, SyncConversationsResp, SyncDirection, SyncMessages, SyncMessagesResp,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Why the client could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server refused the connection: {}", crate::protocol::reason_name(*.0))]
    Refused(ReasonCode),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("expected a message, got {0}")]
    Unexpected(String),
    #[error("the connection is closed{}", .0.as_ref().map(|d| format!(": {}", crate::protocol::reason_name(d.reason))).unwrap_or_default())]
    Closed(Option<Disconnect>),
}

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub uid: String,
    pub token: String,
    pub device_id: String,
    pub device_flag: DeviceFlag,
    /// Acknowledge received messages as soon as they are handed over (one
    /// cumulative ack per channel per read), and drop redeliveries of
    /// messages already handed over. Off: the app acks with
    /// [`Client::ack`] and sees every redelivery.
    pub auto_ack: bool,
    /// Send `Ping` at the interval the server asks for.
    pub heartbeat: bool,
    /// Ask the server to push, once connected, what this device has not
    /// acknowledged yet (per channel, in order, before live messages).
    pub resume: bool,
    /// How long to wait for the TCP connection and for `ConnAck`.
    pub connect_timeout: Duration,
    /// Largest frame accepted from the server.
    pub frame_size_max_bytes: usize,
    /// Received messages buffered before the client stops reading.
    pub incoming_capacity: usize,
}

impl ConnectOptions {
    pub fn new(uid: &str) -> ConnectOptions {
        ConnectOptions {
            uid: uid.to_owned(),
            token: String::new(),
            device_id: "default".to_owned(),
            device_flag: DeviceFlag::App,
            auto_ack: true,
            heartbeat: true,
            resume: true,
            connect_timeout: Duration::from_secs(10),
            frame_size_max_bytes: 4 * 1024 * 1024,
            incoming_capacity: 4096,
        }
    }

    pub fn token(mut self, token: &str) -> Self {
        token.clone_into(&mut self.token);
        self
    }

    pub fn device(mut self, device_id: &str, flag: DeviceFlag) -> Self {
        device_id.clone_into(&mut self.device_id);
        self.device_flag = flag;
        self
    }

    pub fn auto_ack(mut self, on: bool) -> Self {
        self.auto_ack = on;
        self
    }

    pub fn heartbeat(mut self, on: bool) -> Self {
        self.heartbeat = on;
        self
    }

    pub fn resume(mut self, on: bool) -> Self {
        self.resume = on;
        self
    }
}

/// What arrives on [`Incoming`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Message(Recv),
    /// One of this user's conversations changed on another device.
    ConversationUpdate(Conversation),
    /// A message was recalled.
    Recall(RecallEvent),
    /// The connection ended; `Some` when the server said why.
    Closed(Option<Disconnect>),
}

/// Received messages, in the order the server sent them.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Delivery>,
}

impl Incoming {
    /// The next delivery, or `None` after `Closed` was returned.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// The next message, waiting at most `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Result<Recv, ClientError> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Err(_) => Err(ClientError::Timeout(timeout)),
            Ok(Some(Delivery::Message(m))) => Ok(m),
            Ok(Some(Delivery::Closed(d))) => Err(ClientError::Closed(d)),
            Ok(Some(other)) => Err(ClientError::Unexpected(format!("{other:?}"))),
            Ok(None) => Err(ClientError::Closed(None)),
        }
    }

    /// The next delivery of any kind, waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Delivery, ClientError> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Err(_) => Err(ClientError::Timeout(timeout)),
            Ok(Some(delivery)) => Ok(delivery),
            Ok(None) => Err(ClientError::Closed(None)),
        }
    }
}

enum Command {
    Send(Outgoing, oneshot::Sender<Result<SendAck, ClientError>>),
    Request(Packet, u32, oneshot::Sender<Result<Packet, ClientError>>),
    Ack(u64, u64),
    AckThrough(String, ChannelType, u64),
    Close,
}

/// A connected client. Cheap to clone; all clones share one connection.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    conn_ack: ConnAck,
    next_request_id: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

/// Connects, authenticates and starts the connection's task.
pub async fn connect(
    addr: SocketAddr,
    options: ConnectOptions,
) -> Result<(Client, Incoming), ClientError> {
    let timeout = options.connect_timeout;
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ClientError::Timeout(timeout))??;
    stream.set_nodelay(true)?;
    let mut core = ClientCore::new(options.frame_size_max_bytes);
    core.connect(
        &Identity {
            uid: options.uid.clone(),
            token: options.token.clone(),
            device_id: options.device_id.clone(),
            device_flag: options.device_flag,
            resume: options.resume,
        },
        crate::time::unix_now_ms() as i64,
    );
    stream.write_all(core.output()).await?;
    core.output().clear();
    let conn_ack = tokio::time::timeout(timeout, read_conn_ack(&mut stream, &mut core))
        .await
        .map_err(|_| ClientError::Timeout(timeout))??;
    let (commands, command_rx) = mpsc::channel(1024);
    let (incoming, rx) = mpsc::channel(options.incoming_capacity.max(1));
    let heartbeat = (options.heartbeat && conn_ack.heartbeat_interval_ms > 0)
        .then(|| Duration::from_millis(u64::from(conn_ack.heartbeat_interval_ms)));
    tokio::spawn(run(
        stream,
        core,
        command_rx,
        incoming,
        heartbeat,
        options.auto_ack,
    ));
    let client = Client {
        commands,
        conn_ack,
        next_request_id: Default::default(),
    };
    Ok((client, Incoming { rx }))
}

async fn read_conn_ack(
    stream: &mut TcpStream,
    core: &mut ClientCore,
) -> Result<ConnAck, ClientError> {
    let mut buf = vec![0u8; 4096];
    loop {
        if let Some(event) = core.next_event()? {
            return match event {
                Event::ConnAck(ack) if ack.reason == ReasonCode::Success => Ok(ack),
                Event::ConnAck(ack) => Err(ClientError::Refused(ack.reason)),
                Event::Disconnect(d) => Err(ClientError::Refused(d.reason)),
                _ => Err(ProtocolError::Unexpected("a packet before ConnAck").into()),
            };
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(ClientError::Closed(None));
        }
        core.feed(&buf[..n]);
    }
}

async fn run(
    stream: TcpStream,
    mut core: ClientCore,
    mut commands: mpsc::Receiver<Command>,
    incoming: mpsc::Sender<Delivery>,
    heartbeat: Option<Duration>,
    auto_ack: bool,
) {
    let (mut reader, mut writer) = stream.into_split();
    let mut pending: HashMap<u32, oneshot::Sender<Result<SendAck, ClientError>>> = HashMap::new();
    let mut requests: HashMap<u32, oneshot::Sender<Result<Packet, ClientError>>> = HashMap::new();
    // Per channel (id, type): the highest seq handed to the app, and the
    // highest to acknowledge after this read (one cumulative ack per
    // channel per read).
    let mut highest_seen: HashMap<(String, u8), u64> = HashMap::new();
    let mut to_ack: HashMap<(String, u8), u64> = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    let period = heartbeat.unwrap_or(Duration::from_secs(3600));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut closed_by: Option<Disconnect> = None;
    'outer: loop {
        tokio::select! {
            read = reader.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => break 'outer,
                    Ok(n) => n,
                };
                core.feed(&buf[..n]);
                loop {
                    match core.next_event() {
                        Ok(None) => break,
                        Ok(Some(Event::SendAck(ack))) => {
                            if let Some(waiter) = pending.remove(&ack.client_seq) {
                                let _ = waiter.send(Ok(ack));
                            }
                        }
                        Ok(Some(Event::Recv(recv))) => {
                            let channel = (recv.channel_id.clone(), recv.channel_type.0);
                            let seq = recv.message_seq;
                            let seen = highest_seen.get(&channel).copied().unwrap_or(0);
                            // Pushes arrive in order on one connection: a seq
                            // at or below one already handed over is a
                            // redelivery of a message the app has.
                            let duplicate = auto_ack && seq <= seen;
                            if !duplicate {
                                highest_seen.insert(channel.clone(), seq);
                                if incoming.send(Delivery::Message(recv)).await.is_err() {
                                    break 'outer;
                                }
                            }
                            if auto_ack {
                                let top = to_ack.entry(channel).or_insert(0);
                                *top = (*top).max(seq);
                            }
                        }
                        Ok(Some(Event::Disconnect(d))) => {
                            closed_by = Some(d);
                            break 'outer;
                        }
                        Ok(Some(Event::Response { request_id, packet })) => {
                            if let Some(waiter) = requests.remove(&request_id) {
                                let _ = waiter.send(Ok(packet));
                            }
                        }
                        Ok(Some(Event::ConversationUpdate(c))) => {
                            if incoming.send(Delivery::ConversationUpdate(c)).await.is_err() {
                                break 'outer;
                            }
                        }
                        Ok(Some(Event::Recall(e))) => {
                            if incoming.send(Delivery::Recall(e)).await.is_err() {
                                break 'outer;
                            }
                        }
                        Ok(Some(Event::Pong | Event::ConnAck(_))) => {}
                        Err(error) => {
                            tracing::warn!(%error, "server broke the protocol");
                            break 'outer;
                        }
                    }
                }
                for ((channel_id, channel_type), seq) in to_ack.drain() {
                    core.ack_through(&channel_id, ChannelType(channel_type), seq);
                }
            }
            command = commands.recv() => match command {
                Some(Command::Send(message, reply)) => {
                    let client_seq = core.send(message);
                    pending.insert(client_seq, reply);
                }
                Some(Command::Request(packet, request_id, reply)) => {
                    core.request(&packet);
                    requests.insert(request_id, reply);
                }
                Some(Command::Ack(id, seq)) => core.ack(id, seq),
                Some(Command::AckThrough(channel_id, channel_type, seq)) => {
                    core.ack_through(&channel_id, channel_type, seq)
                }
                Some(Command::Close) | None => {
                    core.disconnect();
                    let _ = writer.write_all(core.output()).await;
                    core.output().clear();
                    break 'outer;
                }
            },
            _ = ticker.tick(), if heartbeat.is_some() => core.ping(),
        }
        if !core.output().is_empty() {
            if writer.write_all(core.output()).await.is_err() {
                break;
            }
            core.output().clear();
        }
    }
    for (_, waiter) in pending.drain() {
        let _ = waiter.send(Err(ClientError::Closed(closed_by.clone())));
    }
    for (_, waiter) in requests.drain() {
        let _ = waiter.send(Err(ClientError::Closed(closed_by.clone())));
    }
    let _ = incoming.send(Delivery::Closed(closed_by)).await;
}

impl Client {
    /// What the server said when it accepted the connection.
    pub fn conn_ack(&self) -> &ConnAck {
        &self.conn_ack
    }

    /// Sends a message and waits for its `SendAck`. A refusal is a
    /// `SendAck` with a reason other than `Success`, not an error.
    pub async fn send(&self, message: Outgoing) -> Result<SendAck, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Send(message, reply))
            .await
            .map_err(|_| ClientError::Closed(None))?;
        answer.await.map_err(|_| ClientError::Closed(None))?
    }

    /// Sends `text` to the person `to`.
    pub async fn send_text(&self, to: &str, text: &str) -> Result<SendAck, ClientError> {
        self.send(Outgoing {
            channel_id: to.to_owned(),
            channel_type: ChannelType::Person,
            client_msg_no: new_client_msg_no(),
            flags: 0,
            payload: Bytes::copy_from_slice(text.as_bytes()),
        })
        .await
    }

    /// Sends `text` to the group `group`.
    pub async fn send_group_text(&self, group: &str, text: &str) -> Result<SendAck, ClientError> {
        self.send(Outgoing {
            channel_id: group.to_owned(),
            channel_type: ChannelType::Group,
            client_msg_no: new_client_msg_no(),
            flags: 0,
            payload: Bytes::copy_from_slice(text.as_bytes()),
        })
        .await
    }

    fn request_id(&self) -> u32 {
        self.next_request_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(1)
    }

    async fn request(&self, packet: Packet, request_id: u32) -> Result<Packet, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request(packet, request_id, reply))
            .await
            .map_err(|_| ClientError::Closed(None))?;
        answer.await.map_err(|_| ClientError::Closed(None))?
    }

    /// Messages of a channel by seq range: `start_seq` inclusive, `end_seq`
    /// exclusive (0: open), at most `limit`, up or down.
    pub async fn sync_messages(
        &self,
        channel_id: &str,
        channel_type: ChannelType,
        start_seq: u64,
        end_seq: u64,
        limit: u32,
        direction: SyncDirection,
    ) -> Result<SyncMessagesResp, ClientError> {
        let request_id = self.request_id();
        let packet = Packet::SyncMessages(SyncMessages {
            request_id,
            channel_id: channel_id.to_owned(),
            channel_type,
            start_seq,
            end_seq,
            limit,
            direction,
        });
        match self.request(packet, request_id).await? {
            Packet::SyncMessagesResp(response) => Ok(response),
            other => Err(ClientError::Unexpected(other.name().into())),
        }
    }

    /// The user's conversations changed since `since_version`.
    pub async fn sync_conversations(
        &self,
        since_version: u64,
        limit: u32,
        unread_only: bool,
    ) -> Result<SyncConversationsResp, ClientError> {
        let request_id = self.request_id();
        let packet = Packet::SyncConversations(SyncConversations {
            request_id,
            since_version,
            limit,
            unread_only,
        });
        match self.request(packet, request_id).await? {
            Packet::SyncConversationsResp(response) => Ok(response),
            other => Err(ClientError::Unexpected(other.name().into())),
        }
    }

    /// Clears, sets or deletes one of the user's conversations.
    pub async fn conversation_op(
        &self,
        channel_id: &str,
        channel_type: ChannelType,
        action: ConversationAction,
        unread: u64,
    ) -> Result<ConversationOpResp, ClientError> {
        let request_id = self.request_id();
        let packet = Packet::ConversationOp(ConversationOp {
            request_id,
            channel_id: channel_id.to_owned(),
            channel_type,
            action,
            unread,
        });
        match self.request(packet, request_id).await? {
            Packet::ConversationOpResp(response) => Ok(response),
            other => Err(ClientError::Unexpected(other.name().into())),
        }
    }

    /// Recalls a message this user sent, by id or (with id 0) by
    /// client_msg_no.
    pub async fn recall(
        &self,
        channel_id: &str,
        channel_type: ChannelType,
        message_id: u64,
        client_msg_no: &str,
    ) -> Result<RecallResp, ClientError> {
        let request_id = self.request_id();
        let packet = Packet::Recall(Recall {
            request_id,
            channel_id: channel_id.to_owned(),
            channel_type,
            message_id,
            client_msg_no: client_msg_no.to_owned(),
        });
        match self.request(packet, request_id).await? {
            Packet::RecallResp(response) => Ok(response),
            other => Err(ClientError::Unexpected(other.name().into())),
        }
    }

    /// Acknowledges a received message (when `auto_ack` is off).
    pub async fn ack(&self, message_id: u64, message_seq: u64) -> Result<(), ClientError> {
        self.commands
            .send(Command::Ack(message_id, message_seq))
            .await
            .map_err(|_| ClientError::Closed(None))
    }

    /// Acknowledges every message of a channel received on this connection
    /// up to `message_seq`, with one frame (when `auto_ack` is off).
    pub async fn ack_through(
        &self,
        channel_id: &str,
        channel_type: ChannelType,
        message_seq: u64,
    ) -> Result<(), ClientError> {
        self.commands
            .send(Command::AckThrough(
                channel_id.to_owned(),
                channel_type,
                message_seq,
            ))
            .await
            .map_err(|_| ClientError::Closed(None))
    }

    /// Says goodbye and closes the connection.
    pub async fn close(&self) {
        let _ = self.commands.send(Command::Close).await;
    }
}

/// A client_msg_no unique for all practical purposes: time, process and a
/// counter, hashed into 32 hex digits.
pub fn new_client_msg_no() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let state = ahash::RandomState::new();
    let mut high = state.build_hasher();
    high.write_u64(nanos);
    high.write_u32(std::process::id());
    let mut low = state.build_hasher();
    low.write_u64(count);
    low.write_u64(nanos);
    format!("{:016x}{:016x}", high.finish(), low.finish())
}

/// Shorthand used by tests and tools: the socket address of `text`.
pub fn parse_addr(text: &str) -> Result<SocketAddr, std::io::Error> {
    use std::net::ToSocketAddrs;
    text.to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{text} resolves to no address")))
}
