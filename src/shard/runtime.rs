//! Runs one shard on its glommio executor: wires the inboxes, starts the
//! shard's tasks, accepts connections, and shuts down gracefully.

use super::mesh::MeshEnds;
use super::message::Batch;
use super::notify::Notify;
use super::state::{GroupReply, Now, SetChange, ShardState, ShardStats, Signals};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::conn;
use crate::conn::outbox::Outbox;
use crate::ids::ShardId;
use crate::protocol::ReasonCode;
use crate::storage::Storage;
use crate::time::{Clock, SystemClock};
use bytes::BytesMut;
use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender};
use glommio::net::TcpListener;
use std::cell::{Cell, RefCell};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// A request from the control plane (the server handle, the signal handler)
/// to one shard. Not on the data path.
#[derive(Debug)]
pub enum ControlCmd {
    /// Change a group this shard owns.
    Group {
        group_id: String,
        uids: Vec<String>,
        change: SetChange,
        reply: GroupReply,
    },
    /// Change an allow or deny list this shard owns.
    List {
        key: crate::channel::ChannelKey,
        kind: crate::storage::ListKind,
        uids: Vec<String>,
        change: SetChange,
        reply: super::state::ListReply,
    },
    /// Report counters: the stats, open connections, and messages queued
    /// for other shards.
    Stats {
        reply: async_channel::Sender<(ShardStats, usize, usize)>,
    },
    /// A request of the admin HTTP API.
    Api {
        request: super::api::ApiRequest,
        reply: super::api::ApiReply,
    },
    /// Stop accepting, close every connection with a `Disconnect`, exit.
    Shutdown,
}

/// Everything a shard needs to start, handed to its thread.
pub struct ShardSetup {
    pub config: Arc<Config>,
    pub shards: u16,
    pub mesh: MeshEnds,
    pub listener: OwnedFd,
    /// This shard's copies of the other listeners that are on (WebSocket,
    /// WKProto), with what their connections speak.
    pub more_listeners: Vec<(Transport, OwnedFd)>,
    pub storage: Arc<dyn Storage>,
    pub control: async_channel::Receiver<ControlCmd>,
    pub ready: std::sync::mpsc::Sender<Result<ShardId, String>>,
    pub webhooks: Arc<crate::webhook::WebhookShared>,
    /// TLS on the listener, when configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The first message id of this run (`state::first_id_of_run`).
    pub run: crate::ids::MessageId,
    /// Every shard's closed conversation version (`super::versions`).
    pub versions: Arc<super::versions::VersionFrontier>,
    /// A cluster node's way to the log (`None`: a single node).
    pub log: Option<super::log::ShardLogSetup>,
}

/// The shard's shared, single-threaded runtime state.
pub(crate) struct Runtime {
    pub(crate) state: RefCell<ShardState>,
    pub(crate) signals: Rc<Signals>,
    pub(crate) config: Arc<Config>,
    clock: SystemClock,
    /// One receive buffer for all of the shard's connections: a read lands
    /// here, whole frames are sliced out, and only a partial frame is copied
    /// into the connection's own buffer. Idle connections hold no buffer.
    pub(crate) read_scratch: RefCell<BytesMut>,
    /// Connections that stopped reading because the outgoing backlog is
    /// full; woken when it drains.
    paused: RefCell<Vec<Rc<Outbox>>>,
    pub(crate) shutting_down: Cell<bool>,
    /// Tells each listener's accept loop to stop (by [`Transport`]; a
    /// [`Notify`] wakes one waiter).
    shutdown: [Notify; 4],
    live_connections: Cell<usize>,
    all_closed: Notify,
    /// A commit's durable write is running.
    pub(crate) committing: Cell<bool>,
    tls: Option<futures_rustls::TlsAcceptor>,
}

impl Runtime {
    pub(crate) fn now(&self) -> Now {
        let micros = self.clock.micros();
        crate::time::set_event_micros(micros);
        Now {
            monotonic: crate::ids::Millis(micros / 1000),
            unix_ms: self.clock.unix_ms(),
            micros,
        }
    }

    /// Whether connections may read: false while the outgoing backlog is
    /// over its limit. A connection told "no" is woken when it drains.
    pub(crate) fn may_read(&self, outbox: &Rc<Outbox>) -> bool {
        let room = self
            .state
            .borrow()
            .outgoing_has_room(self.config.server.outgoing_backlog_max_messages);
        if !room {
            self.paused.borrow_mut().push(Rc::clone(outbox));
        }
        room
    }

    fn wake_paused(&self) {
        let paused = std::mem::take(&mut *self.paused.borrow_mut());
        for outbox in paused {
            outbox.wake();
        }
    }

    pub(crate) fn connection_ended(&self) {
        self.live_connections.set(self.live_connections.get() - 1);
        if self.live_connections.get() == 0 {
            self.all_closed.notify();
        }
    }
}

/// The shard's main future: returns after a graceful shutdown.
pub async fn run(setup: ShardSetup) {
    let ShardSetup {
        config,
        shards,
        mesh,
        listener,
        more_listeners,
        storage,
        control,
        ready,
        webhooks,
        tls,
        run,
        versions,
        log,
    } = setup;
    let shard = mesh.shard;
    let mut store = match storage.open_shard(shard) {
        Ok(store) => store,
        Err(error) => {
            let _ = ready.send(Err(format!(
                "shard {}: opening storage failed: {error}",
                shard.0
            )));
            return;
        }
    };
    let shard_log = match &log {
        None => None,
        Some(setup) => {
            match super::log::ShardLog::open(setup, &config.cluster, shard, run.0, &mut *store) {
                Ok(log) => Some(log),
                Err(error) => {
                    let _ = ready.send(Err(format!(
                        "shard {}: reading the log positions failed: {error}",
                        shard.0
                    )));
                    return;
                }
            }
        }
    };
    let signals = Rc::new(Signals::new(shards));
    let state = ShardState::new(
        shard,
        shards,
        config.limits.clone(),
        config.storage.idempotency_ttl_s.saturating_mul(1000),
        Authenticator::new(&config.auth),
        store,
        Rc::clone(&signals),
    );
    let mut state = state;
    state.start_run(run);
    state.share_versions(versions);
    state.set_allowlist_for_person(config.policy.allowlist_for_person);
    state.set_webhooks(crate::webhook::WebhookWriter::new(
        &config.webhook,
        webhooks,
    ));
    state.set_system_uid(&config.api.system_uid);
    if let Some(setup) = &log {
        state.set_routing(crate::key::Routing::Partitions {
            places: Arc::clone(&setup.places),
        });
        state.set_id_tag(crate::cluster::partition::id_tag(setup.node, shard));
    }
    let clock = SystemClock::new();
    state.set_retry_policy(
        config.delivery.retry_policy(),
        Now {
            monotonic: clock.monotonic(),
            unix_ms: clock.unix_ms(),
            micros: clock.micros(),
        },
    );
    let runtime = Rc::new(Runtime {
        state: RefCell::new(state),
        signals,
        read_scratch: RefCell::new(BytesMut::new()),
        config: Arc::clone(&config),
        clock,
        paused: RefCell::new(Vec::new()),
        shutting_down: Cell::new(false),
        shutdown: Default::default(),
        live_connections: Cell::new(0),
        all_closed: Notify::default(),
        committing: Cell::new(false),
        tls: tls.map(futures_rustls::TlsAcceptor::from),
    });

    // A cluster node's shard catches up on the log before anything can
    // reach it (its inboxes are not connected yet, it does not accept).
    let mut shard_log = shard_log;
    if let Some(log) = shard_log.as_mut() {
        log.start(&runtime).await;
    }

    // Connect both ends of every inbox concurrently: a connect waits for its
    // peer, so doing them one by one could deadlock.
    let mut sender_tasks = Vec::new();
    for (peer, sender) in mesh.senders.into_iter().enumerate() {
        if let Some(sender) = sender {
            sender_tasks.push((peer, glommio::spawn_local(sender.connect())));
        }
    }
    let mut receiver_tasks = Vec::new();
    for (peer, receiver) in mesh.receivers.into_iter().enumerate() {
        if let Some(receiver) = receiver {
            receiver_tasks.push((peer, glommio::spawn_local(receiver.connect())));
        }
    }
    for (peer, task) in sender_tasks {
        let sender = task.await;
        glommio::spawn_local(flush_to(Rc::clone(&runtime), ShardId(peer as u16), sender)).detach();
    }
    for (_, task) in receiver_tasks {
        let receiver = task.await;
        glommio::spawn_local(receive_from(Rc::clone(&runtime), receiver)).detach();
    }
    // A cluster node forwards writes to other nodes' partitions, and
    // follows their logs.
    if let Some(setup) = &log {
        let bridge = Arc::clone(&setup.bridge);
        glommio::spawn_local(super::remote::forward_loop(Rc::clone(&runtime), bridge)).detach();
        let followed: Vec<u32> = (0..setup.places.len())
            .filter(|p| {
                let place = setup.places.get(*p);
                !place.owned && place.shard == shard
            })
            .collect();
        if !followed.is_empty() {
            let bridge = Arc::clone(&setup.bridge);
            glommio::spawn_local(super::remote::follow_loop(
                Rc::clone(&runtime),
                bridge,
                followed,
            ))
            .detach();
        }
    }
    let offload =
        storage.commits_block() && config.storage.commit_on == crate::config::CommitOn::Pool;
    match shard_log {
        None => {
            glommio::spawn_local(commit_loop(Rc::clone(&runtime), offload)).detach();
        }
        Some(log) => {
            glommio::spawn_local(super::log::commit_loop(Rc::clone(&runtime), log, offload))
                .detach();
        }
    }
    if let (0, Some(interval_ms)) = (shard.0, storage.sync_interval_ms()) {
        glommio::spawn_local(sync_loop(
            Rc::clone(&runtime),
            Arc::clone(&storage),
            interval_ms,
        ))
        .detach();
    }
    glommio::spawn_local(sweep_loop(Rc::clone(&runtime))).detach();
    glommio::spawn_local(retry_loop(Rc::clone(&runtime))).detach();
    glommio::spawn_local(control_loop(Rc::clone(&runtime), control)).detach();

    // SAFETY: the descriptor is this shard's own duplicate of the listening
    // TCP socket bound by `listener::bind`; nothing else refers to it.
    let listener_fd = listener.into_raw_fd();
    let listener = unsafe { TcpListener::from_raw_fd(listener_fd) };
    for (transport, fd) in more_listeners {
        let raw = fd.into_raw_fd();
        // SAFETY: this shard's own duplicate of the listening socket bound
        // for `transport`; nothing else refers to it.
        let listener = unsafe { TcpListener::from_raw_fd(raw) };
        let runtime = Rc::clone(&runtime);
        glommio::spawn_local(async move {
            accept_loop(&runtime, &listener, transport).await;
            // SAFETY: `raw` is the listening socket `listener` owns.
            unsafe { libc::shutdown(raw, libc::SHUT_RDWR) };
        })
        .detach();
    }
    let _ = ready.send(Ok(shard));
    tracing::info!(shard = shard.0, cpu = ?current_cpu(), "shard started");
    accept_loop(&runtime, &listener, Transport::Tcp).await;
    // Stop listening now. Closing the descriptor is not enough: the accept
    // that was in flight in io_uring keeps the socket open (and accepting
    // into its backlog) until it completes. The socket is shared by every
    // shard, so the first shard to stop stops it for all of them, as a
    // server-wide shutdown wants.
    // SAFETY: `listener_fd` is the listening socket `listener` still owns.
    unsafe { libc::shutdown(listener_fd, libc::SHUT_RDWR) };
    drop(listener);

    // Graceful shutdown: every connection has been told; give them the
    // drain time to flush, then cut off the rest.
    if runtime.live_connections.get() > 0 {
        let drain = Duration::from_millis(config.server.shutdown_drain_ms);
        let all_closed = runtime.all_closed.wait();
        let expired = glommio::timer::sleep(drain);
        futures_lite::future::or(all_closed, expired).await;
    }
    // Let a commit that is being written finish, then let go of storage so
    // its files are released even though detached tasks still hold the
    // runtime.
    while runtime.committing.get() {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    runtime.state.borrow_mut().close_storage();
    tracing::info!(shard = shard.0, "shard stopped");
}

/// What a listener's connections speak: the binary protocol on the socket
/// or in WebSocket binary messages, or WuKongIM's (WKProto) the same two
/// ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    WebSocket,
    WkTcp,
    WkWebSocket,
}

impl Transport {
    /// Whether it upgrades from HTTP first.
    fn is_websocket(self) -> bool {
        matches!(self, Transport::WebSocket | Transport::WkWebSocket)
    }
}

/// What tells `transport`'s accept loop to stop.
fn shutdown_of(runtime: &Runtime, transport: Transport) -> &Notify {
    &runtime.shutdown[transport as usize]
}

async fn accept_loop(runtime: &Rc<Runtime>, listener: &TcpListener, transport: Transport) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shutdown_of(runtime, transport).wait().await;
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(glommio::GlommioError::IoError(error)))
                if error.raw_os_error() == Some(libc::EINVAL) =>
            {
                // The socket no longer listens: another shard has begun the
                // shutdown and shut it down. This shard's Shutdown is on its
                // way.
                shutdown_of(runtime, transport).wait().await;
                return;
            }
            Some(Err(error)) => {
                // Out of descriptors or memory: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let now = runtime.now();
        let peer = stream.peer_addr().ok().map(|peer| peer.ip());
        // A trusted reverse proxy in front of the WebSocket listener: the
        // client it forwards for is admitted at the upgrade instead.
        let proxy = peer.filter(|ip| transport.is_websocket() && runtime.config.ws.trusts(*ip));
        let admitted = match (peer, proxy) {
            (_, Some(_)) | (None, _) => true,
            (Some(ip), None) => runtime.state.borrow_mut().admit_ip(ip, now),
        };
        let accepted = if admitted {
            runtime.state.borrow_mut().accept(now)
        } else {
            Err(ReasonCode::RateLimited)
        };
        let (conn, outbox) = match accepted {
            Ok(accepted) => accepted,
            Err(reason) => {
                tracing::debug!(reason = %crate::protocol::reason_name(reason), "connection refused");
                glommio::spawn_local(refuse(stream, reason, transport)).detach();
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        runtime
            .live_connections
            .set(runtime.live_connections.get() + 1);
        if transport.is_websocket() {
            glommio::spawn_local(ws_then_drive(
                Rc::clone(runtime),
                runtime.tls.clone(),
                stream,
                proxy,
                conn,
                outbox,
                transport,
            ))
            .detach();
            continue;
        }
        if transport == Transport::WkTcp {
            glommio::spawn_local(wk_tcp_then_drive(
                Rc::clone(runtime),
                runtime.tls.clone(),
                stream,
                conn,
                outbox,
            ))
            .detach();
            continue;
        }
        match runtime.tls.clone() {
            None => {
                glommio::spawn_local(conn::driver::drive(
                    Rc::clone(runtime),
                    stream,
                    conn,
                    outbox,
                ))
                .detach();
            }
            Some(acceptor) => {
                glommio::spawn_local(tls_then_drive(
                    Rc::clone(runtime),
                    acceptor,
                    stream,
                    conn,
                    outbox,
                ))
                .detach();
            }
        }
    }
}

/// The TLS handshake, under the handshake timeout, then the connection.
async fn tls_then_drive(
    runtime: Rc<Runtime>,
    acceptor: futures_rustls::TlsAcceptor,
    stream: glommio::net::TcpStream,
    conn: crate::ids::ConnId,
    outbox: Rc<Outbox>,
) {
    let timeout = Duration::from_millis(runtime.config.limits.handshake_timeout_ms);
    if let Some(tls) = tls_or_close(&runtime, &acceptor, stream, conn, timeout).await {
        conn::driver::drive(runtime, tls, conn, outbox).await
    }
}

/// The TLS handshake of `stream` within `timeout`; when it fails or takes
/// longer, the connection is closed (logged, its session ended) and `None`
/// returned.
async fn tls_or_close(
    runtime: &Runtime,
    acceptor: &futures_rustls::TlsAcceptor,
    stream: glommio::net::TcpStream,
    conn: crate::ids::ConnId,
    timeout: Duration,
) -> Option<futures_rustls::server::TlsStream<glommio::net::TcpStream>> {
    match tls_within(acceptor, stream, timeout).await {
        Some(Ok(tls)) => Some(tls),
        failed => {
            match failed {
                Some(Err(error)) => tracing::debug!(conn = conn.0, %error, "TLS handshake failed"),
                _ => tracing::debug!(conn = conn.0, "TLS handshake timed out"),
            }
            abandon(runtime, conn);
            None
        }
    }
}

/// Ends the session of a connection that never reached its driver.
fn abandon(runtime: &Runtime, conn: crate::ids::ConnId) {
    runtime.state.borrow_mut().on_closed(conn);
    runtime.connection_ended();
}

/// The TLS handshake of `stream`; `None` when it takes longer than
/// `timeout`.
async fn tls_within(
    acceptor: &futures_rustls::TlsAcceptor,
    stream: glommio::net::TcpStream,
    timeout: Duration,
) -> Option<std::io::Result<futures_rustls::server::TlsStream<glommio::net::TcpStream>>> {
    futures_lite::future::or(async { Some(acceptor.accept(stream).await) }, async {
        glommio::timer::sleep(timeout).await;
        None
    })
    .await
}

/// A WebSocket connection: TLS when configured, then the upgrade (path and
/// origin checked), both within the handshake timeout, then the
/// connection.
async fn ws_then_drive(
    runtime: Rc<Runtime>,
    acceptor: Option<futures_rustls::TlsAcceptor>,
    stream: glommio::net::TcpStream,
    proxy: Option<std::net::IpAddr>,
    conn: crate::ids::ConnId,
    outbox: Rc<Outbox>,
    transport: Transport,
) {
    let timeout = Duration::from_millis(runtime.config.limits.handshake_timeout_ms);
    let Some(acceptor) = acceptor else {
        return upgrade_then_drive(runtime, stream, proxy, conn, outbox, timeout, transport).await;
    };
    let started = std::time::Instant::now();
    if let Some(tls) = tls_or_close(&runtime, &acceptor, stream, conn, timeout).await {
        let left = timeout.saturating_sub(started.elapsed());
        upgrade_then_drive(runtime, tls, proxy, conn, outbox, left, transport).await
    }
}

/// The WebSocket upgrade within `timeout`, then the connection driven over
/// it as over a socket (see [`conn::ws::WsIo`]). `proxy`: the trusted
/// reverse proxy it came through, whose forwarded client is admitted by
/// the per-IP rate at the upgrade.
async fn upgrade_then_drive<S>(
    runtime: Rc<Runtime>,
    stream: S,
    proxy: Option<std::net::IpAddr>,
    conn: crate::ids::ConnId,
    outbox: Rc<Outbox>,
    timeout: Duration,
    transport: Transport,
) where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
{
    let refused = Cell::new(None);
    let wk_ws = runtime.config.wkproto.ws_config(&runtime.config.ws);
    let limits = &runtime.config.limits;
    let config = conn::ws::config(
        limits.frame_size_max_bytes,
        limits.outbound_buffer_max_bytes,
    );
    let admit = |ip: std::net::IpAddr| {
        let now = runtime.now();
        runtime.state.borrow_mut().admit_ip(ip, now)
    };
    let check = conn::ws::UpgradeCheck {
        ws: if transport == Transport::WkWebSocket {
            &wk_ws
        } else {
            &runtime.config.ws
        },
        refused: &refused,
        forwarded_by: proxy.map(|ip| (ip, &admit as &dyn Fn(std::net::IpAddr) -> bool)),
    };
    let upgrade = async_tungstenite::accept_hdr_async_with_config(stream, check, Some(config));
    let upgraded = futures_lite::future::or(async { Some(upgrade.await) }, async {
        glommio::timer::sleep(timeout).await;
        None
    })
    .await;
    match upgraded {
        Some(Ok(ws)) if transport == Transport::WkWebSocket => {
            // One WKProto packet per WebSocket message: WuKongIM's JS SDK
            // 1.0.4 mishandles messages holding several.
            let io = crate::wkproto::io::WkIo::new(
                conn::ws::WsIo::new(ws),
                wk_translator_config(&runtime),
                true,
            );
            conn::driver::drive(Rc::clone(&runtime), io, conn, outbox).await
        }
        Some(Ok(ws)) => {
            conn::driver::drive(Rc::clone(&runtime), conn::ws::WsIo::new(ws), conn, outbox).await
        }
        failed => {
            match (failed, refused.get()) {
                (_, Some(refusal)) => {
                    tracing::debug!(conn = conn.0, ?refusal, "WebSocket upgrade refused")
                }
                (Some(Err(error)), None) => {
                    tracing::debug!(conn = conn.0, %error, "WebSocket upgrade failed")
                }
                _ => tracing::debug!(conn = conn.0, "WebSocket upgrade timed out"),
            }
            abandon(&runtime, conn);
        }
    }
}

/// The translator settings of this server's WKProto connections.
fn wk_translator_config(runtime: &Runtime) -> crate::wkproto::translate::TranslatorConfig {
    crate::wkproto::translate::TranslatorConfig {
        frame_size_max_bytes: runtime.config.limits.frame_size_max_bytes,
        node_id: runtime.config.wkproto.node_id,
    }
}

/// A WKProto connection over TCP (TLS first when configured): the
/// connection driver runs over the translator.
async fn wk_tcp_then_drive(
    runtime: Rc<Runtime>,
    acceptor: Option<futures_rustls::TlsAcceptor>,
    stream: glommio::net::TcpStream,
    conn: crate::ids::ConnId,
    outbox: Rc<Outbox>,
) {
    let config = wk_translator_config(&runtime);
    let Some(acceptor) = acceptor else {
        let io = crate::wkproto::io::WkIo::new(stream, config, false);
        return conn::driver::drive(runtime, io, conn, outbox).await;
    };
    let timeout = Duration::from_millis(runtime.config.limits.handshake_timeout_ms);
    if let Some(tls) = tls_or_close(&runtime, &acceptor, stream, conn, timeout).await {
        let io = crate::wkproto::io::WkIo::new(tls, config, false);
        conn::driver::drive(runtime, io, conn, outbox).await
    }
}

/// Tells a refused connection why (one `Disconnect` frame, if the socket
/// takes it within a second) and closes it.
/// A WebSocket client, which has not upgraded yet, is answered in HTTP:
/// 503 with the reason (429 for the accept rate).
async fn refuse(mut stream: glommio::net::TcpStream, reason: ReasonCode, transport: Transport) {
    use futures_lite::AsyncWriteExt;
    let mut frame = BytesMut::new();
    match transport {
        Transport::WkTcp => {
            // A CONNACK with the reason, in the oldest layout every version
            // reads (no version byte, no node id).
            let _ = crate::wkproto::codec::encode(
                &crate::wkproto::codec::Packet::ConnAck(crate::wkproto::codec::ConnAck {
                    server_version: None,
                    time_diff_ms: 0,
                    reason: crate::wkproto::translate::wk_reason(reason),
                    server_key: String::new(),
                    salt: String::new(),
                    node_id: 0,
                }),
                crate::wkproto::codec::VERSION_MIN,
                &mut frame,
            );
        }
        Transport::Tcp => crate::protocol::Encoder::new().encode(
            &crate::protocol::Packet::Disconnect(crate::protocol::Disconnect {
                reason,
                message: crate::protocol::reason_name(reason),
            }),
            &mut frame,
        ),
        Transport::WebSocket | Transport::WkWebSocket => {
            let status = if reason == ReasonCode::RateLimited {
                "429 Too Many Requests"
            } else {
                "503 Service Unavailable"
            };
            let body = crate::protocol::reason_name(reason);
            frame.extend_from_slice(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    }
    let write = async {
        let _ = stream.write_all(&frame).await;
        let _ = stream.close().await;
    };
    let _ = futures_lite::future::or(write, async {
        glommio::timer::sleep(Duration::from_secs(1)).await;
    })
    .await;
}

/// Drains this shard's inbox from one peer, a batch at a time.
async fn receive_from(runtime: Rc<Runtime>, receiver: ConnectedReceiver<Batch>) {
    while let Some(batch) = receiver.recv().await {
        let now = runtime.now();
        let mut state = runtime.state.borrow_mut();
        for message in batch {
            state.on_remote(message, now);
        }
    }
}

/// Sends what this shard queued for `peer`, a batch at a time. Waiting on a
/// full inbox is the backpressure: meanwhile connections stop reading.
async fn flush_to(runtime: Rc<Runtime>, peer: ShardId, sender: ConnectedSender<Batch>) {
    let batch_max = runtime.config.server.inbox_batch_max_messages;
    let mut peer_gone = false;
    loop {
        runtime.signals.flush[peer.index()].wait().await;
        loop {
            let batch = runtime.state.borrow_mut().take_outgoing(peer, batch_max);
            if batch.is_empty() {
                break;
            }
            if !peer_gone && sender.send(batch).await.is_err() {
                // The peer has stopped (shutdown); what was meant for it has
                // no one left to read it.
                peer_gone = true;
            }
        }
        runtime.wake_paused();
    }
}

/// Group commit: everything that arrived while the previous batch was being
/// written is stored in the next batch, with one sync. With `offload` a
/// write that blocks on the disk runs on the executor's blocking thread, so
/// the shard keeps serving meanwhile (`storage.commit_on = "pool"`);
/// without, on the shard's thread.
async fn commit_loop(runtime: Rc<Runtime>, offload: bool) {
    loop {
        runtime.signals.commit.wait().await;
        loop {
            let now = runtime.now();
            let begun = runtime.state.borrow_mut().begin_commit(now);
            let Some((job, in_flight)) = begun else {
                break;
            };
            runtime.committing.set(true);
            let started = std::time::Instant::now();
            let result = if offload {
                glommio::executor().spawn_blocking(job).await
            } else {
                job()
            };
            let took = started.elapsed().as_micros() as u64;
            runtime.committing.set(false);
            let now = runtime.now();
            let failed = result.is_err();
            {
                let mut state = runtime.state.borrow_mut();
                state.stats.commit_latency.record(took);
                state.finish_commit(in_flight, result, now);
            }
            if failed {
                // Storage is failing (a full disk): what waits (presence
                // events put back) is retried at a bounded rate, not in a
                // tight loop.
                glommio::timer::sleep(Duration::from_millis(100)).await;
                runtime.signals.commit.notify();
                break;
            }
        }
    }
}

/// For the `interval` sync policy: syncs the WAL every interval.
async fn sync_loop(runtime: Rc<Runtime>, storage: Arc<dyn Storage>, interval_ms: u64) {
    loop {
        glommio::timer::sleep(Duration::from_millis(interval_ms)).await;
        if runtime.shutting_down.get() {
            return;
        }
        let storage = Arc::clone(&storage);
        if let Err(error) = glommio::executor()
            .spawn_blocking(move || storage.sync_wal())
            .await
        {
            tracing::warn!(%error, "WAL sync failed");
        }
    }
}

async fn sweep_loop(runtime: Rc<Runtime>) {
    let limits = &runtime.config.limits;
    let shortest = limits
        .handshake_timeout_ms
        .min(limits.idle_timeout_ms)
        .min(limits.close_flush_timeout_ms)
        .min(limits.write_stall_timeout_ms);
    let interval = Duration::from_millis((shortest / 4).clamp(10, 1000));
    loop {
        glommio::timer::sleep(interval).await;
        let now = runtime.now();
        runtime.state.borrow_mut().sweep(now);
    }
}

/// One wake-up per retry tick for all of the shard's pending pushes.
async fn retry_loop(runtime: Rc<Runtime>) {
    let tick = Duration::from_millis(runtime.config.delivery.retry_tick_ms);
    loop {
        glommio::timer::sleep(tick).await;
        let now = runtime.now();
        let flush = {
            let mut state = runtime.state.borrow_mut();
            state.retry_due(now);
            state.position_flush()
        };
        // Acknowledged positions, batched per tick, written off this thread.
        if let Some(job) = flush {
            if let Err(error) = glommio::executor().spawn_blocking(job).await {
                tracing::warn!(%error, "saving acknowledged positions failed");
            }
        }
    }
}

async fn control_loop(runtime: Rc<Runtime>, control: async_channel::Receiver<ControlCmd>) {
    while let Ok(command) = control.recv().await {
        match command {
            ControlCmd::Group {
                group_id,
                uids,
                change,
                reply,
            } => {
                let now = runtime.now();
                runtime
                    .state
                    .borrow_mut()
                    .change_group(&group_id, uids, change, reply, now)
            }
            ControlCmd::List {
                key,
                kind,
                uids,
                change,
                reply,
            } => runtime
                .state
                .borrow_mut()
                .change_list(key, kind, uids, change, reply),
            ControlCmd::Stats { reply } => {
                let state = runtime.state.borrow();
                let _ = reply.try_send((
                    state.current_stats(),
                    state.connection_count(),
                    state.outgoing_depth(),
                ));
            }
            ControlCmd::Api { request, reply } => {
                let now = runtime.now();
                runtime.state.borrow_mut().api(request, reply, now);
            }
            ControlCmd::Shutdown => {
                if runtime.shutting_down.replace(true) {
                    continue;
                }
                let now = runtime.now();
                runtime.state.borrow_mut().begin_shutdown(now);
                for notify in &runtime.shutdown {
                    notify.notify();
                }
            }
        }
    }
}

fn current_cpu() -> Option<i32> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    (cpu >= 0).then_some(cpu)
}
