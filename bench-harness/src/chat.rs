//! The `chat` scenario: `pairs` one-to-one conversations, and the ruyi
//! connection ([`Conn`]) and per-device accounting ([`DeviceLog`]) the
//! other ruyi scenarios share.

use crate::classify::{classify, AckLedger, Arrival, Class, Earlier};
use crate::common::{unix_us, CommonArgs, Gate};
use crate::live::Live;
use crate::process::{measure, ServerProcess};
use crate::report::{payload, read_payload, Part, Report};
use anyhow::bail;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use ruyi::client::{ClientCore, Event, Identity, Outgoing};
use ruyi::protocol::{ChannelType, DeviceFlag, ReasonCode};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub(crate) common: CommonArgs,
    /// Number of conversations: a sender writing to a receiver.
    #[arg(long, default_value_t = 10)]
    pub(crate) pairs: usize,
    /// Sends each sender keeps in flight (1: send, wait for the ack, send).
    #[arg(long, default_value_t = 1)]
    pub(crate) window: usize,
    /// Devices of each receiver, each connected and each receiving every
    /// message (ruyi: device ids d0, d1, ...; MQTT/NATS: one subscriber
    /// session each).
    #[arg(long, default_value_t = 1)]
    pub(crate) devices_per_user: usize,
}

pub fn run(args: &ChatArgs) -> anyhow::Result<Report> {
    args.common.check()?;
    if args.pairs == 0 || args.devices_per_user == 0 {
        bail!("--pairs and --devices-per-user must be at least 1");
    }
    let Some((server_addr, _)) = args.common.target.ruyi() else {
        return crate::peer::chat(args);
    };
    let mut server = ServerProcess::maybe_start(&args.common)?;
    let common = &args.common;
    let threads = common.threads(args.pairs);
    let live = Live::new();
    let gate = Arc::new(Gate::default());
    let sending = Arc::new(AtomicUsize::new(args.pairs));
    let mut handles = Vec::new();
    for thread in 0..threads {
        let pairs: Vec<usize> = (thread..args.pairs).step_by(threads).collect();
        let config = PairConfig::new(common, server_addr, "chat", args.window);
        let shared = PairShared {
            gate: Arc::clone(&gate),
            live: Arc::clone(&live),
            sending: Arc::clone(&sending),
            interval: common.send_interval(args.pairs),
            devices: args.devices_per_user,
        };
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("bench-{thread}"))
            .spawn(move || async move { run_pairs(config, pairs, shared).await })
            .map_err(|e| anyhow::anyhow!("starting a load executor: {e}"))?;
        handles.push(handle);
    }
    let (parts, measured) = measure(common, "chat", &gate, &live, server.as_mut(), handles)?;
    let mut total = Part::new();
    for part in &parts {
        total.add(part);
    }
    Ok(Report::new(
        "chat",
        common,
        format!(
            "pairs={} devices_per_user={} window={} rate={} payload_bytes={} warmup_s={} duration_s={}{}",
            args.pairs,
            args.devices_per_user,
            args.window,
            common.rate.map_or("max".to_owned(), |r| r.to_string()),
            common.payload_bytes,
            common.warmup_s,
            common.duration_s,
            common
                .chaos
                .map_or(String::new(), |c| format!(" chaos=kill:{}", c.kill_every.as_secs_f64()))
        ),
        total,
        measured,
        Vec::new(),
    ))
}

/// How every connection of a run connects and sends.
#[derive(Clone)]
pub(crate) struct PairConfig {
    pub(crate) server: SocketAddr,
    /// Over the WebSocket listener (`ws://`) rather than TCP.
    pub(crate) wire: crate::common::Wire,
    pub(crate) secret: String,
    pub(crate) window: usize,
    pub(crate) payload_bytes: usize,
    pub(crate) prefix: String,
    /// Warm-up plus the measured time.
    pub(crate) duration: Duration,
    /// Reconnect (and resume) when the server goes away, instead of
    /// failing the run: `--chaos`.
    pub(crate) reconnect: bool,
    /// Part of every client_msg_no, so a run reusing an earlier run's uids
    /// is not answered with that run's messages (the server's idempotency).
    pub(crate) run_id: u64,
}

impl PairConfig {
    pub(crate) fn new(
        common: &CommonArgs,
        server: SocketAddr,
        scenario: &str,
        window: usize,
    ) -> PairConfig {
        PairConfig {
            server,
            wire: common
                .target
                .ruyi()
                .map_or(crate::common::Wire::Native, |(_, wire)| wire),
            secret: common.secret.clone(),
            window: window.max(1),
            payload_bytes: common.payload_bytes,
            prefix: common.prefix(scenario),
            duration: Duration::from_secs_f64(common.warmup_s + common.duration_s),
            reconnect: common.chaos.is_some(),
            run_id: unix_us(),
        }
    }

    /// How long a sender waits for an ack before giving its sends up, and
    /// a receiver for the server after the senders finished: longer under
    /// chaos, where a restart (RocksDB recovery) comes first.
    pub(crate) fn patience(&self) -> Duration {
        Duration::from_secs(if self.reconnect { 60 } else { 10 })
    }
}

/// One connection driven by the runtime-free core; reconnects with
/// `resume` when the run allows it.
pub(crate) struct Conn {
    stream: BenchStream,
    pub(crate) core: ClientCore,
    buf: Vec<u8>,
    server: SocketAddr,
    wire: crate::common::Wire,
    secret: String,
    uid: String,
    device_id: String,
    /// Connections made so far (1 after `open`).
    pub(crate) epoch: u32,
    /// Which of the acks queued on this device's connections were written.
    pub(crate) acks: AckLedger,
}

impl Conn {
    pub(crate) async fn open(config: &PairConfig, uid: &str) -> anyhow::Result<Conn> {
        Conn::open_device(config, uid, "bench").await
    }

    pub(crate) async fn open_device(
        config: &PairConfig,
        uid: &str,
        device_id: &str,
    ) -> anyhow::Result<Conn> {
        let (stream, core) = handshake(
            config.server,
            config.wire,
            &config.secret,
            uid,
            device_id,
            false,
        )
        .await?;
        Ok(Conn {
            stream,
            core,
            buf: vec![0u8; 64 * 1024],
            server: config.server,
            wire: config.wire,
            secret: config.secret.clone(),
            uid: uid.to_owned(),
            device_id: device_id.to_owned(),
            epoch: 1,
            acks: AckLedger::default(),
        })
    }

    /// Connects again with `resume` (the server pushes what this device
    /// has not acknowledged), retrying until `patience` runs out.
    pub(crate) async fn reconnect(&mut self, patience: Duration) -> anyhow::Result<()> {
        let give_up = Instant::now() + patience;
        let mut backoff = Duration::from_millis(20);
        loop {
            let reconnected = handshake(
                self.server,
                self.wire,
                &self.secret,
                &self.uid,
                &self.device_id,
                true,
            )
            .await;
            match reconnected {
                Ok((stream, core)) => {
                    self.stream = stream;
                    // Acks still queued in the old core never left.
                    self.core = core;
                    self.acks.connection_ended();
                    self.epoch += 1;
                    return Ok(());
                }
                Err(error) if Instant::now() > give_up => {
                    bail!("{} could not reconnect: {error:#}", self.uid)
                }
                Err(_) => {
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    pub(crate) async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.core.output().is_empty() {
            self.stream.write_all(self.core.output()).await?;
            self.stream.flush().await?;
            self.core.output().clear();
            self.acks.flushed();
        }
        Ok(())
    }

    /// Every event in what one read brings (waits for at least one read,
    /// until `until` at most).
    pub(crate) async fn read_events(&mut self, until: Instant) -> anyhow::Result<Vec<Event>> {
        let mut events = Vec::new();
        while let Some(event) = self.core.next_event()? {
            events.push(event);
        }
        if !events.is_empty() {
            return Ok(events);
        }
        // The deadline is the executor's pacer, not a timer per read.
        let read = crate::pacer::until(until, self.stream.read(&mut self.buf)).await;
        let n = match read {
            Some(Ok(0)) => bail!("the server closed the connection"),
            Some(Ok(n)) => n,
            None => return Ok(events),
            Some(Err(error)) => bail!("reading: {error}"),
        };
        self.core.feed(&self.buf[..n]);
        while let Some(event) = self.core.next_event()? {
            if let Event::Disconnect(d) = &event {
                bail!("the server disconnected: {:?}", d.reason);
            }
            events.push(event);
        }
        Ok(events)
    }
}

/// A connection to the gateway: a socket, or a WebSocket over one.
pub(crate) enum BenchStream {
    Tcp(TcpStream),
    Ws(Box<ruyi::conn::ws::WsIo<TcpStream>>),
    Wk(Box<crate::wk::WkClientIo<TcpStream>>),
}

impl futures_lite::AsyncRead for BenchStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BenchStream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            BenchStream::Ws(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
            BenchStream::Wk(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl futures_lite::AsyncWrite for BenchStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BenchStream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            BenchStream::Ws(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
            BenchStream::Wk(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            BenchStream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            BenchStream::Ws(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
            BenchStream::Wk(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            BenchStream::Tcp(s) => std::pin::Pin::new(s).poll_close(cx),
            BenchStream::Ws(s) => std::pin::Pin::new(s.as_mut()).poll_close(cx),
            BenchStream::Wk(s) => std::pin::Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

async fn handshake(
    server: SocketAddr,
    wire: crate::common::Wire,
    secret: &str,
    uid: &str,
    device_id: &str,
    resume: bool,
) -> anyhow::Result<(BenchStream, ClientCore)> {
    let tcp = TcpStream::connect(server)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {server}: {e}"))?;
    tcp.set_nodelay(true)
        .map_err(|e| anyhow::anyhow!("setting TCP_NODELAY: {e}"))?;
    let mut stream = if wire == crate::common::Wire::Wkproto {
        BenchStream::Wk(Box::new(crate::wk::WkClientIo::new(tcp)?))
    } else if wire == crate::common::Wire::WebSocket {
        let config = async_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(64 * 1024)
            .write_buffer_size(0);
        let (ws, _) = async_tungstenite::client_async_with_config(
            format!("ws://{server}/"),
            tcp,
            Some(config),
        )
        .await
        .map_err(|e| anyhow::anyhow!("WebSocket upgrade at {server}: {e}"))?;
        BenchStream::Ws(Box::new(ruyi::conn::ws::WsIo::new(ws)))
    } else {
        BenchStream::Tcp(tcp)
    };
    let token = if secret.is_empty() {
        String::new()
    } else {
        let now_s = ruyi::time::unix_now_ms() / 1000;
        ruyi::auth::issue_token(secret, uid, now_s, 3600)
    };
    let mut core = ClientCore::new(4 * 1024 * 1024);
    core.connect(
        &Identity {
            uid: uid.to_owned(),
            token,
            device_id: device_id.to_owned(),
            device_flag: DeviceFlag::App,
            resume,
        },
        0,
    );
    stream.write_all(core.output()).await?;
    stream.flush().await?;
    core.output().clear();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(event) = core.next_event()? {
            return match event {
                Event::ConnAck(ack) if ack.reason == ReasonCode::Success => Ok((stream, core)),
                other => bail!("{uid} was refused: {other:?}"),
            };
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the server closed the connection before ConnAck");
        }
        core.feed(&buf[..n]);
    }
}

/// A send waiting for its SendAck, kept whole to go again after a
/// reconnect (same client_msg_no: the server answers a resend of a stored
/// message with the original's seq).
struct PendingSend {
    outgoing: Outgoing,
    sent_at_us: u64,
}

/// One sender's loop: keeps `window` sends in flight (paced by
/// `interval` when given) until `duration` is over and every send is
/// answered; returns the seqs acknowledged.
pub(crate) struct Sender {
    pub(crate) channel_id: String,
    pub(crate) channel_type: ChannelType,
    pub(crate) uid: String,
    pub(crate) interval: Option<Duration>,
}

impl Sender {
    pub(crate) async fn run(
        self,
        config: &PairConfig,
        conn: &mut Conn,
        part: &mut Part,
        live: &Live,
        mut on_event: impl FnMut(&mut Conn, Event, &mut Part),
    ) -> anyhow::Result<Vec<u64>> {
        let mut acked_seqs = Vec::new();
        let mut pending: BTreeMap<u64, PendingSend> = BTreeMap::new();
        let mut by_client_seq: HashMap<u32, u64> = HashMap::new();
        let started = Instant::now();
        let deadline = started + config.duration;
        // Under --rate each sender starts at its own point of the interval,
        // so the senders do not send in lockstep bursts.
        let mut next_due = started + crate::common::stagger(&self.uid, self.interval);
        let mut counter = 0u64;
        let mut last_progress = Instant::now();
        loop {
            let now = Instant::now();
            while pending.len() < config.window
                && now < deadline
                && self.interval.is_none_or(|_| next_due <= now)
            {
                // Under --rate a send counts from when it was due.
                let sent_at_us = unix_us().saturating_sub(
                    now.saturating_duration_since(next_due).as_micros() as u64
                        * u64::from(self.interval.is_some()),
                );
                let outgoing = Outgoing {
                    channel_id: self.channel_id.clone(),
                    channel_type: self.channel_type,
                    client_msg_no: format!("{}-{}-{counter}", self.uid, config.run_id),
                    flags: 0,
                    payload: payload(config.payload_bytes, sent_at_us, counter),
                };
                by_client_seq.insert(conn.core.send(outgoing.clone()), counter);
                pending.insert(
                    counter,
                    PendingSend {
                        outgoing,
                        sent_at_us,
                    },
                );
                part.sent += 1;
                counter += 1;
                if let Some(interval) = self.interval {
                    next_due += interval;
                }
            }
            if pending.is_empty() {
                if now >= deadline {
                    return Ok(acked_seqs);
                }
                last_progress = now;
            } else if now.saturating_duration_since(last_progress) > config.patience() {
                // No SendAck for that long: what is in flight is given up.
                part.on_failed(pending.len() as u64);
                pending.clear();
                by_client_seq.clear();
                if now >= deadline {
                    return Ok(acked_seqs);
                }
            }
            let wait = if self.interval.is_some() && pending.len() < config.window && now < deadline
            {
                next_due
            } else {
                now + Duration::from_millis(200)
            };
            let events = match conn.flush().await {
                Ok(()) => conn.read_events(wait).await,
                Err(error) => Err(error),
            };
            let events = match events {
                Ok(events) => events,
                Err(error) if config.reconnect => {
                    let _ = error;
                    conn.reconnect(config.patience()).await?;
                    live.reconnected();
                    // Patience counts again from the new connection.
                    last_progress = Instant::now();
                    by_client_seq.clear();
                    for (&counter, send) in &pending {
                        by_client_seq.insert(conn.core.send(send.outgoing.clone()), counter);
                    }
                    continue;
                }
                Err(error) => return Err(error),
            };
            if events.is_empty() {
                part.flush_meter();
            }
            for event in events {
                match event {
                    Event::SendAck(ack) => {
                        let Some(counter) = by_client_seq.remove(&ack.client_seq) else {
                            continue;
                        };
                        let Some(send) = pending.remove(&counter) else {
                            continue;
                        };
                        last_progress = Instant::now();
                        if ack.reason == ReasonCode::Success {
                            part.on_ack(send.sent_at_us);
                            acked_seqs.push(ack.message_seq);
                        } else {
                            part.on_failed(1);
                        }
                    }
                    other => on_event(conn, other, part),
                }
            }
        }
    }
}

/// What one receiving device got, after the client's dedup, with the
/// anomalies counted as they arrive ([`crate::classify`] says how).
#[derive(Default)]
pub(crate) struct DeviceLog {
    /// Seq -> the connection epoch it came on and the [`AckLedger`] mark
    /// taken when its ack was queued (the first copy whose ack was
    /// written, else the latest).
    seen: HashMap<u64, (u32, u64)>,
    highest: Option<u64>,
}

impl DeviceLog {
    /// A push of `seq` on connection `epoch`, `flagged` when the server
    /// marked it as a redelivery; its ack was queued at `mark` of `acks`.
    /// A seq seen before is removed by the client's dedup and counted
    /// `redelivered` or `duplicated` as [`classify`] says. True when it
    /// is new.
    pub(crate) fn on_push(
        &mut self,
        seq: u64,
        epoch: u32,
        flagged: bool,
        acks: &AckLedger,
        part: &mut Part,
    ) -> bool {
        let earlier = self.seen.get(&seq).map(|&(epoch, mark)| Earlier {
            epoch,
            acknowledged: acks.acknowledged(epoch, mark),
        });
        let arrival = Arrival {
            seq,
            epoch,
            flagged,
        };
        let class = classify(earlier, self.highest, arrival);
        match class {
            Class::New => {}
            Class::OutOfOrder => part.reordered += 1,
            Class::Redelivered => part.redelivered += 1,
            Class::Duplicated => part.duplicated += 1,
        }
        if class.is_new() {
            self.highest = self.highest.max(Some(seq));
        }
        // Until an ack of it is written, what counts is the latest copy,
        // whose ack was just queued.
        if earlier.is_none_or(|e| !e.acknowledged) {
            self.seen.insert(seq, (epoch, acks.mark()));
        }
        class.is_new()
    }

    pub(crate) fn contains(&self, seq: u64) -> bool {
        self.seen.contains_key(&seq)
    }

    pub(crate) fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.seen.keys().copied()
    }
}

/// Receives on one device until the senders are done and nothing arrived
/// for the grace period, acknowledging every push.
pub(crate) async fn receive(
    config: &PairConfig,
    conn: &mut Conn,
    log: &mut DeviceLog,
    part: &mut Part,
    live: &Live,
    sending: &AtomicUsize,
    mut judge: impl FnMut(&ruyi::protocol::Recv) -> Verdict,
) -> anyhow::Result<()> {
    let grace = Duration::from_secs(3);
    let mut last_event = Instant::now();
    loop {
        let events = match conn
            .read_events(Instant::now() + Duration::from_millis(200))
            .await
        {
            Ok(events) => events,
            Err(_) if config.reconnect => {
                conn.reconnect(config.patience()).await?;
                live.reconnected();
                continue;
            }
            Err(error) => return Err(error),
        };
        if events.is_empty() {
            part.flush_meter();
            if sending.load(Ordering::SeqCst) == 0 && last_event.elapsed() >= grace {
                return Ok(());
            }
            continue;
        }
        last_event = Instant::now();
        for event in events {
            if let Event::Recv(recv) = event {
                record_push(conn, log, part, &recv, &mut judge);
            }
        }
        if let Err(error) = conn.flush().await {
            if !config.reconnect {
                return Err(error);
            }
            conn.reconnect(config.patience()).await?;
            live.reconnected();
        }
    }
}

/// Whose a push is, as far as one device is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// One this device must receive.
    Expected,
    /// This device's own send pushed back to it, which the gateway
    /// promises never to do (live or from storage): `unexpected`.
    Own,
    /// Another channel, or from someone who does not write here:
    /// `unexpected`.
    Foreign,
}

/// Acknowledges a push and counts it as `judge` says.
pub(crate) fn record_push(
    conn: &mut Conn,
    log: &mut DeviceLog,
    part: &mut Part,
    recv: &ruyi::protocol::Recv,
    judge: &mut impl FnMut(&ruyi::protocol::Recv) -> Verdict,
) {
    conn.core.ack(recv.message_id, recv.message_seq);
    match judge(recv) {
        Verdict::Expected => {}
        Verdict::Own | Verdict::Foreign => {
            part.unexpected += 1;
            return;
        }
    }
    let flagged = recv.flags & ruyi::protocol::RECV_FLAG_REDELIVERED != 0;
    if log.on_push(recv.message_seq, conn.epoch, flagged, &conn.acks, part) {
        let sent_at_us = read_payload(&recv.payload).map_or(unix_us(), |(at, _)| at);
        part.on_delivery(sent_at_us);
    }
}

/// Lost and unexpected, per device: every acknowledged seq must be among
/// the device's, and every one of the device's acknowledged.
pub(crate) fn account_device(acked: &HashSet<u64>, log: &DeviceLog, part: &mut Part) {
    part.lost += acked.iter().filter(|&&seq| !log.contains(seq)).count() as u64;
    part.unexpected += log.seqs().filter(|seq| !acked.contains(seq)).count() as u64;
}

struct PairShared {
    gate: Arc<Gate>,
    live: Arc<Live>,
    /// Senders still sending, over all executors.
    sending: Arc<AtomicUsize>,
    interval: Option<Duration>,
    devices: usize,
}

/// Counts a sender out of the shared count once, however its task ends.
pub(crate) struct SendingGuard(pub(crate) Option<Arc<AtomicUsize>>);

impl Drop for SendingGuard {
    fn drop(&mut self) {
        if let Some(sending) = self.0.take() {
            sending.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

async fn run_pairs(
    config: PairConfig,
    pairs: Vec<usize>,
    shared: PairShared,
) -> anyhow::Result<Part> {
    // Receivers first, so nothing sent is waiting for them.
    let opened = async {
        let mut receivers = Vec::new();
        for &i in &pairs {
            let mut devices = Vec::new();
            for d in 0..shared.devices {
                let uid = format!("{}-r{i}", config.prefix);
                devices.push(Conn::open_device(&config, &uid, &format!("d{d}")).await?);
            }
            receivers.push(devices);
        }
        let mut senders = Vec::new();
        for &i in &pairs {
            senders.push(Conn::open(&config, &format!("{}-s{i}", config.prefix)).await?);
        }
        anyhow::Ok((receivers, senders))
    }
    .await;
    shared.gate.arrive(opened.is_ok());
    let (receiver_conns, sender_conns) = opened?;
    if !shared.gate.wait().await {
        bail!("another load executor failed to connect");
    }
    let config = Arc::new(config);
    let mut receivers = Vec::new();
    for (&i, devices) in pairs.iter().zip(receiver_conns) {
        let mut tasks = Vec::new();
        for mut conn in devices {
            let config = Arc::clone(&config);
            let live = Arc::clone(&shared.live);
            let sending = Arc::clone(&shared.sending);
            let sender_uid = format!("{}-s{i}", config.prefix);
            tasks.push(glommio::spawn_local(async move {
                let mut part = Part::metered(&live);
                let mut log = DeviceLog::default();
                receive(
                    &config,
                    &mut conn,
                    &mut log,
                    &mut part,
                    &live,
                    &sending,
                    |recv| {
                        if recv.channel_type == ChannelType::Person && recv.from_uid == sender_uid {
                            Verdict::Expected
                        } else {
                            Verdict::Foreign
                        }
                    },
                )
                .await?;
                anyhow::Ok((part, log))
            }));
        }
        receivers.push(tasks);
    }
    let mut senders = Vec::new();
    for (&i, mut conn) in pairs.iter().zip(sender_conns) {
        let config = Arc::clone(&config);
        let live = Arc::clone(&shared.live);
        let guard = SendingGuard(Some(Arc::clone(&shared.sending)));
        let uid_of_sender = format!("{}-s{i}", config.prefix);
        let sender = Sender {
            channel_id: format!("{}-r{i}", config.prefix),
            channel_type: ChannelType::Person,
            uid: uid_of_sender.clone(),
            interval: shared.interval,
        };
        senders.push(glommio::spawn_local(async move {
            let _guard = guard;
            let mut part = Part::metered(&live);
            let acked = sender
                .run(&config, &mut conn, &mut part, &live, |conn, event, part| {
                    // A sender gets nothing but its acks (and, after a
                    // resume, its own messages).
                    if let Event::Recv(recv) = event {
                        let mut log = DeviceLog::default();
                        let own = recv.from_uid == uid_of_sender;
                        record_push(conn, &mut log, part, &recv, &mut |_| {
                            if own {
                                Verdict::Own
                            } else {
                                Verdict::Foreign
                            }
                        });
                    } else {
                        part.unexpected += 1;
                    }
                })
                .await?;
            anyhow::Ok((part, acked))
        }));
    }
    let mut total = Part::new();
    let mut acked_per_pair = Vec::new();
    for sender in senders {
        let (part, acked) = sender.await?;
        total.add(&part);
        acked_per_pair.push(acked.into_iter().collect::<HashSet<u64>>());
    }
    for (devices, acked) in receivers.into_iter().zip(acked_per_pair) {
        for device in devices {
            let (mut part, log) = device.await?;
            account_device(&acked, &log, &mut part);
            total.add(&part);
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes `seq` to `log` the way [`record_push`] does: the ack is
    /// queued as it arrives.
    fn push(log: &mut DeviceLog, acks: &AckLedger, part: &mut Part, seq: u64, epoch: u32) {
        log.on_push(seq, epoch, false, acks, part);
    }

    #[test]
    fn after_a_reconnect_an_acknowledged_push_back_unflagged_is_duplicated_an_unacknowledged_one_redelivered(
    ) {
        let (mut log, mut acks, mut part) =
            (DeviceLog::default(), AckLedger::default(), Part::new());
        push(&mut log, &acks, &mut part, 1, 1);
        acks.flushed();
        // 2 arrives; the connection drops before its ack is written.
        push(&mut log, &acks, &mut part, 2, 1);
        acks.connection_ended();
        // Resumed on connection 2: 2 again is allowed, 1 is not.
        push(&mut log, &acks, &mut part, 2, 2);
        push(&mut log, &acks, &mut part, 1, 2);
        assert_eq!((part.redelivered, part.duplicated), (1, 1));
        // 2's ack goes out on connection 2; from then on it is
        // acknowledged too.
        acks.flushed();
        acks.connection_ended();
        push(&mut log, &acks, &mut part, 2, 3);
        assert_eq!((part.redelivered, part.duplicated), (1, 2));
        assert_eq!(part.reordered, 0);
    }
}
