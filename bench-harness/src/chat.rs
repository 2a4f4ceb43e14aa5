//! The `chat` scenario: `pairs` one-to-one conversations.

use anyhow::bail;
use bytes::Bytes;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use ruyi::client::{ClientCore, Event, Identity, Outgoing};
use ruyi::protocol::{ChannelType, DeviceFlag, ReasonCode};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// Write every figure as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What one executor measured.
struct Part {
    sent: u64,
    acked: u64,
    failed: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    ack_latency_us: Histogram<u64>,
    delivery_latency_us: Histogram<u64>,
}

impl Part {
    fn new() -> Part {
        Part {
            sent: 0,
            acked: 0,
            failed: 0,
            delivered: 0,
            lost: 0,
            duplicated: 0,
            reordered: 0,
            ack_latency_us: Histogram::new(3).expect("valid sigfig"),
            delivery_latency_us: Histogram::new(3).expect("valid sigfig"),
        }
    }

    fn add(&mut self, other: &Part) {
        self.sent += other.sent;
        self.acked += other.acked;
        self.failed += other.failed;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        let _ = self.ack_latency_us.add(&other.ack_latency_us);
        let _ = self.delivery_latency_us.add(&other.delivery_latency_us);
    }
}

pub struct Report {
    args: String,
    duration_s: f64,
    total: Part,
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

impl Report {
    pub fn correct(&self) -> bool {
        self.total.lost == 0 && self.total.duplicated == 0 && self.total.reordered == 0
    }

    pub fn to_json(&self) -> serde_json::Value {
        let t = &self.total;
        serde_json::json!({
            "scenario": "chat",
            "args": self.args,
            "duration_s": self.duration_s,
            "sent": t.sent,
            "acked": t.acked,
            "failed": t.failed,
            "delivered": t.delivered,
            "lost": t.lost,
            "duplicated": t.duplicated,
            "reordered": t.reordered,
            "sends_per_s": t.acked as f64 / self.duration_s,
            "deliveries_per_s": t.delivered as f64 / self.duration_s,
            "ack_latency_us": percentiles(&t.ack_latency_us),
            "delivery_latency_us": percentiles(&t.delivery_latency_us),
        })
    }

    pub fn print_summary(&self) {
        let t = &self.total;
        let a = &t.ack_latency_us;
        let d = &t.delivery_latency_us;
        println!("chat: {}", self.args);
        println!(
            "  sent {} acked {} failed {} delivered {} in {:.1} s: {:.0} acked sends/s, {:.0} deliveries/s",
            t.sent,
            t.acked,
            t.failed,
            t.delivered,
            self.duration_s,
            t.acked as f64 / self.duration_s,
            t.delivered as f64 / self.duration_s
        );
        println!(
            "  send->SendAck us: p50 {} p90 {} p99 {} p99.9 {} max {}",
            a.value_at_quantile(0.5),
            a.value_at_quantile(0.9),
            a.value_at_quantile(0.99),
            a.value_at_quantile(0.999),
            a.max()
        );
        println!(
            "  send->delivery us: p50 {} p90 {} p99 {} p99.9 {} max {}",
            d.value_at_quantile(0.5),
            d.value_at_quantile(0.9),
            d.value_at_quantile(0.99),
            d.value_at_quantile(0.999),
            d.max()
        );
        println!(
            "  correctness: lost {} duplicated {} reordered {} -> {}",
            t.lost,
            t.duplicated,
            t.reordered,
            if self.correct() { "OK" } else { "FAILED" }
        );
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
    let started = Instant::now();
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
        let handle = LocalExecutorBuilder::new(Placement::Unbound)
            .name(&format!("bench-{thread}"))
            .spawn(move || async move { run_pairs(config, pairs).await })
            .map_err(|e| anyhow::anyhow!("starting a load executor: {e}"))?;
        handles.push(handle);
    }
    let mut total = Part::new();
    for handle in handles {
        let part = handle
            .join()
            .map_err(|e| anyhow::anyhow!("load executor failed: {e}"))??;
        total.add(&part);
    }
    let _ = started;
    Ok(Report {
        args: format!(
            "pairs={} window={} payload_bytes={} duration_s={}",
            args.pairs, args.window, args.payload_bytes, args.duration_s
        ),
        duration_s: duration.as_secs_f64(),
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
    core: ClientCore,
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

    async fn flush(&mut self) -> anyhow::Result<()> {
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
    async fn read_events(&mut self, timeout: Duration) -> anyhow::Result<Vec<Event>> {
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
) -> anyhow::Result<(Vec<u64>, Histogram<u64>)> {
    let mut seqs = Vec::new();
    let mut latency = Histogram::new(3).expect("valid sigfig");
    loop {
        let events = conn.read_events(grace).await?;
        if events.is_empty() {
            return Ok((seqs, latency));
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
            }
        }
        conn.flush().await?;
    }
}

async fn run_pairs(config: PairConfig, pairs: Vec<usize>) -> anyhow::Result<Part> {
    let mut receivers = Vec::new();
    for &i in &pairs {
        let uid = format!("{}-r{i}", config.prefix);
        let conn = Conn::open(&config, &uid).await?;
        // The grace period covers the whole run: a receiver stops only
        // after the senders are done and nothing arrived for 3 s.
        let grace = Duration::from_secs(3);
        receivers.push(glommio::spawn_local(async move {
            run_receiver(conn, grace).await
        }));
    }
    let mut senders = Vec::new();
    for &i in &pairs {
        let uid = format!("{}-s{i}", config.prefix);
        let receiver = format!("{}-r{i}", config.prefix);
        let conn = Conn::open(&config, &uid).await?;
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
        let (delivered, latency) = receiver.await?;
        let _ = total.delivery_latency_us.add(&latency);
        total.delivered += delivered.len() as u64;
        // Order and duplicates, as the device saw them. Seqs start after
        // whatever earlier runs left in the channel.
        let mut seen = BTreeSet::new();
        let mut last = None;
        for &seq in &delivered {
            if !seen.insert(seq) {
                total.duplicated += 1;
                continue;
            }
            if let Some(previous) = last {
                if seq != previous + 1 {
                    total.reordered += 1;
                }
            }
            last = Some(seq);
        }
        total.lost += acked.iter().filter(|seq| !seen.contains(seq)).count() as u64;
    }
    Ok(total)
}
