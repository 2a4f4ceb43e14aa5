//! The client SDK.
//!
//! [`core::ClientCore`] holds the protocol logic with no runtime, so the
//! bench harness can drive it from glommio. [`Client`] is the tokio adapter
//! most applications use: [`connect`] returns a `Client` for sending (each
//! send resolves to its `SendAck`) and an [`Incoming`] stream of received
//! messages. Received messages are acknowledged automatically unless
//! [`ConnectOptions::auto_ack`] is off. Heartbeats follow the interval the
//! server gives in `ConnAck`.
//!
//! The TypeScript SDK, for browsers and Node over the WebSocket listener,
//! is the npm package in `ts/` beside this module; it keeps the same
//! guarantees, and tests/web.rs runs its tests against a real gateway.

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
    #[error("TLS failed: {0}")]
    Tls(String),
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
    /// When the connection drops (or the server restarts, times it out or
    /// sheds it), connect again with exponential backoff (0.1 s doubling to
    /// 5 s), resume, and send every unacknowledged send again with the same
    /// client_msg_no. Not after a kick or an authentication failure.
    pub reconnect: bool,
    /// How long to wait for the TCP connection and for `ConnAck`.
    pub connect_timeout: Duration,
    /// Largest frame accepted from the server.
    pub frame_size_max_bytes: usize,
    /// Received messages buffered before the client stops reading.
    pub incoming_capacity: usize,
    /// Speak TLS to the server (its listener has `[tls]` set).
    pub tls: Option<TlsOptions>,
}

/// TLS for the SDK: whom to trust and the name the certificate must have.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub config: std::sync::Arc<rustls::ClientConfig>,
    /// A DNS name or an IP address the server's certificate covers.
    pub server_name: String,
}

impl TlsOptions {
    /// Trusts the CA certificates (or the self-signed certificate) in `pem`.
    pub fn with_ca_pem(pem: &[u8], server_name: &str) -> Result<TlsOptions, crate::tls::TlsError> {
        Ok(TlsOptions {
            config: crate::tls::client_config_with_ca(pem)?,
            server_name: server_name.to_owned(),
        })
    }

    /// Trusts the Mozilla root certificates (a server with a public
    /// certificate).
    pub fn with_webpki_roots(server_name: &str) -> Result<TlsOptions, crate::tls::TlsError> {
        Ok(TlsOptions {
            config: crate::tls::client_config_with_webpki_roots()?,
            server_name: server_name.to_owned(),
        })
    }
}

/// The connection under the protocol: TCP, or TLS over TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
type Stream = Box<dyn Io>;

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
            reconnect: false,
            connect_timeout: Duration::from_secs(10),
            frame_size_max_bytes: 4 * 1024 * 1024,
            incoming_capacity: 4096,
            tls: None,
        }
    }

    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = Some(tls);
        self
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

    pub fn reconnect(mut self, on: bool) -> Self {
        self.reconnect = on;
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
    let (stream, core, conn_ack) = open(addr, &options).await?;
    let (commands, command_rx) = mpsc::channel(1024);
    let (incoming, rx) = mpsc::channel(options.incoming_capacity.max(1));
    tokio::spawn(run(
        addr,
        options,
        (stream, core, conn_ack),
        command_rx,
        incoming,
    ));
    let client = Client {
        commands,
        conn_ack,
        next_request_id: Default::default(),
    };
    Ok((client, Incoming { rx }))
}

/// Opens one connection: TCP, `Connect`, `ConnAck`.
async fn open(
    addr: SocketAddr,
    options: &ConnectOptions,
) -> Result<(Stream, ClientCore, ConnAck), ClientError> {
    let timeout = options.connect_timeout;
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ClientError::Timeout(timeout))??;
    tcp.set_nodelay(true)?;
    let mut stream: Stream = match &options.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(tls.server_name.clone())
                .map_err(|e| ClientError::Tls(format!("server name {:?}: {e}", tls.server_name)))?;
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(&tls.config));
            let stream = tokio::time::timeout(timeout, connector.connect(name, tcp))
                .await
                .map_err(|_| ClientError::Timeout(timeout))?
                .map_err(|e| ClientError::Tls(e.to_string()))?;
            Box::new(stream)
        }
    };
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
    Ok((stream, core, conn_ack))
}

async fn read_conn_ack(stream: &mut Stream, core: &mut ClientCore) -> Result<ConnAck, ClientError> {
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

/// A send waiting for its `SendAck`; kept whole so it can be sent again,
/// with the same client_msg_no, after a reconnect.
struct PendingSend {
    message: Outgoing,
    reply: oneshot::Sender<Result<SendAck, ClientError>>,
}

/// What the client remembers across connections.
struct ClientState {
    sends: HashMap<u32, PendingSend>,
    requests: HashMap<u32, oneshot::Sender<Result<Packet, ClientError>>>,
    /// Per channel (id, type): the highest seq handed to the app.
    highest_seen: HashMap<(String, u8), u64>,
}

/// How one connection ended.
enum Ended {
    /// The app closed the client (or dropped it).
    ByClient,
    /// The server or the network ended it; `Some` when the server said why.
    ByServer(Option<Disconnect>),
}

/// Whether a connection that ended this way is worth reconnecting.
fn reconnectable(reason: &Option<Disconnect>) -> bool {
    match reason {
        None => true,
        Some(d) => matches!(
            d.reason,
            ReasonCode::ServerShutdown
                | ReasonCode::IdleTimeout
                | ReasonCode::SlowConsumer
                | ReasonCode::ServerBusy
        ),
    }
}

async fn run(
    addr: SocketAddr,
    options: ConnectOptions,
    first: (Stream, ClientCore, ConnAck),
    mut commands: mpsc::Receiver<Command>,
    incoming: mpsc::Sender<Delivery>,
) {
    let mut state = ClientState {
        sends: HashMap::new(),
        requests: HashMap::new(),
        highest_seen: HashMap::new(),
    };
    let mut connection = Some(first);
    let closed_by = loop {
        let Some((stream, mut core, conn_ack)) = connection.take() else {
            break None;
        };
        let ended = drive(
            stream,
            &mut core,
            &conn_ack,
            &options,
            &mut state,
            &mut commands,
            &incoming,
        )
        .await;
        let reason = match ended {
            Ended::ByClient => break None,
            Ended::ByServer(reason) => reason,
        };
        // Requests in flight are not repeated: their callers retry.
        for (_, waiter) in state.requests.drain() {
            let _ = waiter.send(Err(ClientError::Closed(reason.clone())));
        }
        if !options.reconnect || !reconnectable(&reason) {
            break reason;
        }
        let mut backoff = Duration::from_millis(100);
        connection = loop {
            if incoming.is_closed() {
                break None;
            }
            tokio::time::sleep(backoff).await;
            match open(addr, &options).await {
                Ok(opened) => break Some(opened),
                Err(ClientError::Refused(reason)) if reason != ReasonCode::ServerBusy => {
                    tracing::warn!(reason = %crate::protocol::reason_name(reason), "reconnect refused");
                    break None;
                }
                Err(error) => {
                    tracing::debug!(%error, ?backoff, "reconnect failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let Some((_, core, _)) = connection.as_mut() else {
            break reason;
        };
        // Unacknowledged sends go again with the same client_msg_no: the
        // server answers a resend of a stored message with the original.
        let waiting: Vec<PendingSend> = state.sends.drain().map(|(_, p)| p).collect();
        for pending in waiting {
            let client_seq = core.send(pending.message.clone());
            state.sends.insert(client_seq, pending);
        }
    };
    for (_, pending) in state.sends.drain() {
        let _ = pending
            .reply
            .send(Err(ClientError::Closed(closed_by.clone())));
    }
    for (_, waiter) in state.requests.drain() {
        let _ = waiter.send(Err(ClientError::Closed(closed_by.clone())));
    }
    let _ = incoming.send(Delivery::Closed(closed_by)).await;
}

/// Hands every complete packet the core holds to its waiter or the app,
/// then queues one cumulative ack per channel. `Some` when the connection
/// ended.
async fn take_events(
    core: &mut ClientCore,
    state: &mut ClientState,
    incoming: &mpsc::Sender<Delivery>,
    auto_ack: bool,
    to_ack: &mut HashMap<(String, u8), u64>,
) -> Option<Ended> {
    loop {
        match core.next_event() {
            Ok(None) => break,
            Ok(Some(Event::SendAck(ack))) => {
                if let Some(pending) = state.sends.remove(&ack.client_seq) {
                    let _ = pending.reply.send(Ok(ack));
                }
            }
            Ok(Some(Event::Recv(recv))) => {
                let channel = (recv.channel_id.clone(), recv.channel_type.0);
                let seq = recv.message_seq;
                let seen = state.highest_seen.get(&channel).copied().unwrap_or(0);
                // Pushes of a channel arrive in seq order (also
                // across a resume): a seq at or below one already
                // handed over is a redelivery the app has.
                let duplicate = auto_ack && seq <= seen;
                if !duplicate {
                    state.highest_seen.insert(channel.clone(), seq);
                    if incoming.send(Delivery::Message(recv)).await.is_err() {
                        return Some(Ended::ByClient);
                    }
                }
                if auto_ack {
                    let top = to_ack.entry(channel).or_insert(0);
                    *top = (*top).max(seq);
                }
            }
            Ok(Some(Event::Disconnect(d))) => return Some(Ended::ByServer(Some(d))),
            Ok(Some(Event::Response { request_id, packet })) => {
                if let Some(waiter) = state.requests.remove(&request_id) {
                    let _ = waiter.send(Ok(packet));
                }
            }
            Ok(Some(Event::ConversationUpdate(c))) => {
                if incoming
                    .send(Delivery::ConversationUpdate(c))
                    .await
                    .is_err()
                {
                    return Some(Ended::ByClient);
                }
            }
            Ok(Some(Event::Recall(e))) => {
                if incoming.send(Delivery::Recall(e)).await.is_err() {
                    return Some(Ended::ByClient);
                }
            }
            Ok(Some(Event::Pong | Event::ConnAck(_))) => {}
            Err(error) => {
                tracing::warn!(%error, "server broke the protocol");
                return Some(Ended::ByServer(None));
            }
        }
    }
    for ((channel_id, channel_type), seq) in to_ack.drain() {
        core.ack_through(&channel_id, ChannelType(channel_type), seq);
    }
    None
}

/// Runs one connection until it ends.
async fn drive(
    stream: Stream,
    core: &mut ClientCore,
    conn_ack: &ConnAck,
    options: &ConnectOptions,
    state: &mut ClientState,
    commands: &mut mpsc::Receiver<Command>,
    incoming: &mpsc::Sender<Delivery>,
) -> Ended {
    let auto_ack = options.auto_ack;
    let heartbeat = (options.heartbeat && conn_ack.heartbeat_interval_ms > 0)
        .then(|| Duration::from_millis(u64::from(conn_ack.heartbeat_interval_ms)));
    let (mut reader, mut writer) = tokio::io::split(stream);
    // The highest seq to acknowledge per channel after this read: one
    // cumulative ack per channel per read.
    let mut to_ack: HashMap<(String, u8), u64> = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    let period = heartbeat.unwrap_or(Duration::from_secs(3600));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // Packets that came in the same read as ConnAck (resumed messages).
    if let Some(ended) = take_events(core, state, incoming, auto_ack, &mut to_ack).await {
        return ended;
    }
    // Whatever was queued before this connection (resent sends).
    if !core.output().is_empty() {
        if writer.write_all(core.output()).await.is_err() {
            return Ended::ByServer(None);
        }
        core.output().clear();
    }
    loop {
        tokio::select! {
            read = reader.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return Ended::ByServer(None),
                    Ok(n) => n,
                };
                core.feed(&buf[..n]);
                if let Some(ended) = take_events(core, state, incoming, auto_ack, &mut to_ack).await {
                    return ended;
                }
            }
            command = commands.recv() => match command {
                Some(Command::Send(message, reply)) => {
                    let client_seq = core.send(message.clone());
                    state.sends.insert(client_seq, PendingSend { message, reply });
                }
                Some(Command::Request(packet, request_id, reply)) => {
                    core.request(&packet);
                    state.requests.insert(request_id, reply);
                }
                Some(Command::Ack(id, seq)) => core.ack(id, seq),
                Some(Command::AckThrough(channel_id, channel_type, seq)) => {
                    core.ack_through(&channel_id, channel_type, seq)
                }
                Some(Command::Close) | None => {
                    core.disconnect();
                    let _ = writer.write_all(core.output()).await;
                    core.output().clear();
                    return Ended::ByClient;
                }
            },
            _ = ticker.tick(), if heartbeat.is_some() => core.ping(),
        }
        if !core.output().is_empty() {
            if writer.write_all(core.output()).await.is_err() {
                return Ended::ByServer(None);
            }
            core.output().clear();
        }
    }
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
