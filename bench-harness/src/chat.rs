//! The `chat` scenario: `pairs` one-to-one conversations.

use crate::common::{percentiles, print_latency, unix_us, Gate, ServerProbe, ServerUsage};
use anyhow::bail;
use bytes::Bytes;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use ruyi::client::{ClientCore, Event, Identity, Outgoing};
use ruyi::protocol::{ChannelType, DeviceFlag, ReasonCode};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// Gateway address.
    #[arg(long, default_value = "127.0.0.1:5100")]
    pub server: SocketAddr,
    /// HS256 secret of the gateway, to sign the bench users' tokens (empty
    /// when the gateway runs with auth off).
    #[arg(long, env = "RUYI_AUTH_SECRET", default_value = "")]
    pub secret: String,
    /// Number of conversations (each a sender and a receiver connection).
    #[arg(long, default_value_t = 10)]
    pub pairs: usize,
    /// Sends each sender keeps in flight (1: send, wait for the ack, send).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Payload size in bytes (at least 8: the send time travels in it).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Load-generating executors (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prefix of the bench users' uids, so runs do not share channels.
    #[arg(long, default_value = "bench")]
    pub uid_prefix: String,
    /// The gateway's process id, to report its CPU use and resident memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write every figure as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What one executor measured.
pub(crate) struct Part {
    pub(crate) sent: u64,
    pub(crate) acked: u64,
    pub(crate) failed: u64,
    pub(crate) delivered: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) reordered: u64,
    /// Delivered, but never acknowledged to a sender (or to the wrong
    /// device, e.g. echoed to the sending device).
    pub(crate) unexpected: u64,
    pub(crate) ack_latency_us: Histogram<u64>,
    pub(crate) delivery_latency_us: Histogram<u64>,
    /// When the last SendAck and the last delivery arrived.
    pub(crate) last_ack: Option<Instant>,
    pub(crate) last_delivery: Option<Instant>,
}

/// How long a run took: `duration_s` of sending (the parameter), and from
/// the start to the last SendAck and to the last delivery, which the rates
/// are computed over (a backlog drained after the senders stopped makes
/// `delivering_s` longer than `duration_s`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spans {
    pub(crate) duration_s: f64,
    pub(crate) sending_s: f64,
    pub(crate) delivering_s: f64,
}

impl Spans {
    pub(crate) fn new(duration_s: f64, started: Instant, part: &Part) -> Spans {
        let since = |at: Option<Instant>| {
            at.map_or(duration_s, |at| {
                at.saturating_duration_since(started).as_secs_f64()
            })
            .max(1e-6)
        };
        Spans {
            duration_s,
            sending_s: since(part.last_ack),
            delivering_s: since(part.last_delivery),
        }
    }
}

impl Part {
    pub(crate) fn new() -> Part {
        Part {
            sent: 0,
            acked: 0,
            failed: 0,
            delivered: 0,
            lost: 0,
            duplicated: 0,
            reordered: 0,
            unexpected: 0,
            last_ack: None,
            last_delivery: None,
            ack_latency_us: Histogram::new(3).expect("valid sigfig"),
            delivery_latency_us: Histogram::new(3).expect("valid sigfig"),
        }
    }

    pub(crate) fn add(&mut self, other: &Part) {
        self.sent += other.sent;
        self.acked += other.acked;
        self.failed += other.failed;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.unexpected += other.unexpected;
        self.last_ack = self.last_ack.max(other.last_ack);
        self.last_delivery = self.last_delivery.max(other.last_delivery);
        let _ = self.ack_latency_us.add(&other.ack_latency_us);
        let _ = self.delivery_latency_us.add(&other.delivery_latency_us);
    }
}

pub struct Report {
    args: String,
    target: String,
    spans: Spans,
    total: Part,
    server: ServerUsage,
}

impl Part {
    pub(crate) fn correct(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.reordered == 0 && self.unexpected == 0
    }

    /// The fields every message scenario reports.
    pub(crate) fn to_json(
        &self,
        scenario: &str,
        target: &str,
        spans: &Spans,
        server: &ServerUsage,
    ) -> serde_json::Value {
        serde_json::json!({
            "scenario": scenario,
            "target": target,
            "duration_s": spans.duration_s,
            "sending_s": spans.sending_s,
            "delivering_s": spans.delivering_s,
            "sent": self.sent,
            "acked": self.acked,
            "failed": self.failed,
            "delivered": self.delivered,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "unexpected": self.unexpected,
            "correct": self.correct(),
            "sends_per_s": self.acked as f64 / spans.sending_s,
            "deliveries_per_s": self.delivered as f64 / spans.delivering_s,
            "ack_latency_us": percentiles(&self.ack_latency_us),
            "delivery_latency_us": percentiles(&self.delivery_latency_us),
            "server_rss_bytes": server.rss_bytes,
            "server_cpu_percent": server.cpu_percent,
        })
    }

    pub(crate) fn print_summary(&self, spans: &Spans, server: &ServerUsage) {
        println!(
            "  sent {} acked {} failed {} delivered {} sending for {:.1} s",
            self.sent, self.acked, self.failed, self.delivered, spans.duration_s
        );
        println!(
            "  {:.0} acked sends/s (last SendAck at {:.2} s), {:.0} deliveries/s (last delivery at {:.2} s)",
            self.acked as f64 / spans.sending_s,
            spans.sending_s,
            self.delivered as f64 / spans.delivering_s,
            spans.delivering_s
        );
        print_latency("send->SendAck", &self.ack_latency_us);
        print_latency("send->delivery", &self.delivery_latency_us);
        server.print();
        println!(
            "  correctness: lost {} duplicated {} reordered {} unexpected {} -> {}",
            self.lost,
            self.duplicated,
            self.reordered,
            self.unexpected,
            if self.correct() { "OK" } else { "FAILED" }
        );
    }
}

impl Report {
    pub fn correct(&self) -> bool {
        self.total.correct()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut json = self
            .total
            .to_json("chat", &self.target, &self.spans, &self.server);
        json["args"] = serde_json::Value::from(self.args.clone());
        json
    }

    pub fn print_summary(&self) {
        println!("chat: {} against {}", self.args, self.target);
        self.total.print_summary(&self.spans, &self.server);
    }
}

pub fn run(args: &ChatArgs) -> anyhow::Result<Report> {
    if args.payload_bytes < 8 {
        bail!("--payload-bytes must be at least 8");
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, args.pairs.max(1));
    let duration = Duration::from_secs_f64(args.duration_s);
    let gate = Arc::new(Gate::default());
    let mut handles = Vec::new();
    for thread in 0..threads {
        let pairs: Vec<usize> = (thread..args.pairs).step_by(threads).collect();
        let config = PairConfig {
            server: args.server,
            secret: args.secret.clone(),
            window: args.window.max(1),
            payload_bytes: args.payload_bytes,
            prefix: args.uid_prefix.clone(),
            duration,
        };
        let gate = Arc::clone(&gate);
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("bench-{thread}"))
            .spawn(move || async move { run_pairs(config, pairs, gate).await })
            .map_err(|e| anyhow::anyhow!("starting a load executor: {e}"))?;
        handles.push(handle);
    }
    // Every connection is open: measure the gateway over the sending time.
    gate.open_when_ready(handles.len());
    let started = Instant::now();
    let probe = ServerProbe::start(args.server_pid);
    if !gate.aborted() {
        std::thread::sleep(duration);
    }
    let server = probe.finish();
    let mut total = Part::new();
    for handle in handles {
        let part = handle
            .join()
            .map_err(|e| anyhow::anyhow!("load executor failed: {e}"))??;
        total.add(&part);
    }
    Ok(Report {
        target: format!("ruyi://{}", args.server),
        server,
        args: format!(
            "pairs={} window={} payload_bytes={} duration_s={}",
            args.pairs, args.window, args.payload_bytes, args.duration_s
        ),
        spans: Spans::new(duration.as_secs_f64(), started, &total),
        total,
    })
}

#[derive(Clone)]
pub(crate) struct PairConfig {
    pub(crate) server: SocketAddr,
    pub(crate) secret: String,
    pub(crate) window: usize,
    pub(crate) payload_bytes: usize,
    pub(crate) prefix: String,
    pub(crate) duration: Duration,
}

/// One connection driven by the runtime-free core.
pub(crate) struct Conn {
    stream: TcpStream,
    pub(crate) core: ClientCore,
    buf: Vec<u8>,
}

impl Conn {
    pub(crate) async fn open(config: &PairConfig, uid: &str) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(config.server)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", config.server))?;
        stream
            .set_nodelay(true)
            .map_err(|e| anyhow::anyhow!("setting TCP_NODELAY: {e}"))?;
        let token = if config.secret.is_empty() {
            String::new()
        } else {
            let now_s = ruyi::time::unix_now_ms() / 1000;
            ruyi::auth::issue_token(&config.secret, uid, now_s, 3600)
        };
        let mut conn = Conn {
            stream,
            core: ClientCore::new(4 * 1024 * 1024),
            buf: vec![0u8; 64 * 1024],
        };
        conn.core.connect(
            &Identity {
                uid: uid.to_owned(),
                token,
                device_id: "bench".into(),
                device_flag: DeviceFlag::App,
                resume: false,
            },
            0,
        );
        conn.flush().await?;
        match conn.next_event().await? {
            Event::ConnAck(ack) if ack.reason == ReasonCode::Success => Ok(conn),
            other => bail!("{uid} was refused: {other:?}"),
        }
    }

    pub(crate) async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.core.output().is_empty() {
            self.stream.write_all(self.core.output()).await?;
            self.core.output().clear();
        }
        Ok(())
    }

    /// The next event, reading as needed.
    async fn next_event(&mut self) -> anyhow::Result<Event> {
        loop {
            if let Some(event) = self.core.next_event()? {
                return Ok(event);
            }
            let n = self.stream.read(&mut self.buf).await?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            self.core.feed(&self.buf[..n]);
        }
    }

    /// Every event in what one read brings (waits for at least one read).
    pub(crate) async fn read_events(&mut self, timeout: Duration) -> anyhow::Result<Vec<Event>> {
        let mut events = Vec::new();
        while let Some(event) = self.core.next_event()? {
            events.push(event);
        }
        if !events.is_empty() {
            return Ok(events);
        }
        let read = glommio::timer::timeout(timeout, async {
            Ok(self.stream.read(&mut self.buf).await?)
        })
        .await;
        let n = match read {
            Ok(0) => bail!("the server closed the connection"),
            Ok(n) => n,
            Err(glommio::GlommioError::TimedOut(_)) => return Ok(events),
            Err(error) => bail!("reading: {error}"),
        };
        self.core.feed(&self.buf[..n]);
        while let Some(event) = self.core.next_event()? {
            events.push(event);
        }
        Ok(events)
    }
}

/// What a sender learned: the seqs acknowledged.
struct SenderResult {
    acked_seqs: Vec<u64>,
    part: Part,
}

async fn run_sender(
    config: PairConfig,
    mut conn: Conn,
    receiver: String,
    uid: String,
) -> anyhow::Result<SenderResult> {
    let mut part = Part::new();
    let mut acked_seqs = Vec::new();
    let mut in_flight: HashMap<u32, u64> = HashMap::new();
    let deadline = Instant::now() + config.duration;
    let mut next = 0u64;
    loop {
        while in_flight.len() < config.window && Instant::now() < deadline {
            let mut payload = vec![0u8; config.payload_bytes];
            let sent_at = unix_us();
            payload[..8].copy_from_slice(&sent_at.to_le_bytes());
            let client_seq = conn.core.send(Outgoing {
                channel_id: receiver.clone(),
                channel_type: ChannelType::Person,
                client_msg_no: format!("{uid}-{next}"),
                flags: 0,
                payload: Bytes::from(payload),
            });
            next += 1;
            part.sent += 1;
            in_flight.insert(client_seq, sent_at);
        }
        conn.flush().await?;
        if in_flight.is_empty() {
            break;
        }
        let events = conn.read_events(Duration::from_secs(10)).await?;
        if events.is_empty() {
            // Nothing for 10 s: whatever is in flight is not acknowledged.
            part.failed += in_flight.len() as u64;
            break;
        }
        for event in events {
            if let Event::SendAck(ack) = event {
                let Some(sent_at) = in_flight.remove(&ack.client_seq) else {
                    continue;
                };
                if ack.reason == ReasonCode::Success {
                    part.acked += 1;
                    part.last_ack = Some(Instant::now());
                    acked_seqs.push(ack.message_seq);
                    let _ = part
                        .ack_latency_us
                        .record(unix_us().saturating_sub(sent_at));
                } else {
                    part.failed += 1;
                }
            }
        }
    }
    Ok(SenderResult { acked_seqs, part })
}

/// Receives until `done` says the senders finished and nothing more arrives
/// for the grace period; returns the delivered seqs (in arrival order).
async fn run_receiver(
    mut conn: Conn,
    grace: Duration,
) -> anyhow::Result<(Vec<u64>, Histogram<u64>, Option<Instant>)> {
    let mut seqs = Vec::new();
    let mut latency = Histogram::new(3).expect("valid sigfig");
    let mut last = None;
    loop {
        let events = conn.read_events(grace).await?;
        if events.is_empty() {
            return Ok((seqs, latency, last));
        }
        for event in events {
            if let Event::Recv(recv) = event {
                if recv.payload.len() >= 8 {
                    let mut at = [0u8; 8];
                    at.copy_from_slice(&recv.payload[..8]);
                    let _ = latency.record(unix_us().saturating_sub(u64::from_le_bytes(at)));
                }
                conn.core.ack(recv.message_id, recv.message_seq);
                seqs.push(recv.message_seq);
                last = Some(Instant::now());
            }
        }
        conn.flush().await?;
    }
}

/// Opens both ends of every pair (receivers first).
async fn open_pairs(
    config: &PairConfig,
    pairs: &[usize],
) -> anyhow::Result<(Vec<Conn>, Vec<Conn>)> {
    let mut receivers = Vec::new();
    for &i in pairs {
        receivers.push(Conn::open(config, &format!("{}-r{i}", config.prefix)).await?);
    }
    let mut senders = Vec::new();
    for &i in pairs {
        senders.push(Conn::open(config, &format!("{}-s{i}", config.prefix)).await?);
    }
    Ok((receivers, senders))
}

async fn run_pairs(config: PairConfig, pairs: Vec<usize>, gate: Arc<Gate>) -> anyhow::Result<Part> {
    let opened = open_pairs(&config, &pairs).await;
    gate.arrive(opened.is_ok());
    let (receiver_conns, sender_conns) = opened?;
    if !gate.wait().await {
        bail!("another load executor failed to connect");
    }
    let mut receivers = Vec::new();
    for conn in receiver_conns {
        // A receiver stops once nothing arrived for 3 s; the senders start
        // sending at the same time, so that happens only after they finish.
        let grace = Duration::from_secs(3);
        receivers.push(glommio::spawn_local(async move {
            run_receiver(conn, grace).await
        }));
    }
    let mut senders = Vec::new();
    for (&i, conn) in pairs.iter().zip(sender_conns) {
        let uid = format!("{}-s{i}", config.prefix);
        let receiver = format!("{}-r{i}", config.prefix);
        let config = config.clone();
        senders.push(glommio::spawn_local(run_sender(
            config, conn, receiver, uid,
        )));
    }
    let mut total = Part::new();
    let mut acked_per_pair = Vec::new();
    for sender in senders {
        let result = sender.await?;
        total.add(&result.part);
        acked_per_pair.push(result.acked_seqs);
    }
    for (receiver, acked) in receivers.into_iter().zip(acked_per_pair) {
        let (delivered, latency, last) = receiver.await?;
        total.last_delivery = total.last_delivery.max(last);
        let _ = total.delivery_latency_us.add(&latency);
        total.delivered += delivered.len() as u64;
        // Order and duplicates, as the device saw them. Seqs start after
        // whatever earlier runs left in the channel. A gap is not counted
        // here: the missing seq is `lost` (acknowledged) or was never acked.
        let mut seen = BTreeSet::new();
        let mut highest = None;
        for &seq in &delivered {
            if !seen.insert(seq) {
                total.duplicated += 1;
                continue;
            }
            if highest.is_some_and(|h| seq < h) {
                total.reordered += 1;
            }
            highest = highest.max(Some(seq));
        }
        let acked: HashSet<u64> = acked.into_iter().collect();
        total.lost += acked.iter().filter(|seq| !seen.contains(seq)).count() as u64;
        total.unexpected += seen.iter().filter(|seq| !acked.contains(seq)).count() as u64;
    }
    Ok(total)
}
