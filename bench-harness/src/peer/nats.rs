//! `nats://`: NATS JetStream through `async-nats`, one stream with file
//! storage.
//!
//! The run's stream is `{PREFIX}` (upper case, sanitized) over the subjects
//! `{prefix}.>`, deleted and created again at the start and deleted at the
//! end. A sender publishes to its channel's subject (`{prefix}.r{i}`,
//! `{prefix}.g{g}`) with a `Nats-Msg-Id` and awaits the PubAck (keeping
//! `window` of them outstanding); after a failed or timed-out publish or a
//! reconnection, everything outstanding is sent again, in order, with the
//! same ids, which the stream's duplicate window turns into the originals'
//! acks where it has them. Each receiving device is
//! one connection with a durable pull consumer filtered to its channel's
//! subject, explicit acks, every message acked. Offline group members are
//! durable consumers that are never read: the stream holds each message
//! once, the consumers only their positions.

use super::{
    record_delivery, Backend, Delivery, DeviceLog, EndpointResult, Held, SendingGuard, Shared,
};
use crate::common::unix_us;
use crate::live::Live;
use crate::report::{payload, Part};
use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, Consumer};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::Context;
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Messages a pull request asks for at a time.
const BATCH: usize = 256;
/// How long one attempt waits for its PubAck before it is sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server waits for a device's ack before it delivers again.
/// It is also how long a message the server had sent just before it was
/// killed (and so never reached the device) waits after the restart: under
/// chaos, receivers wait that long (plus the grace) for the last ones.
const ACK_WAIT: Duration = Duration::from_secs(10);

pub(crate) struct Nats {
    addr: SocketAddr,
    /// The subjects' first token (the run's prefix, sanitized).
    root: String,
    stream: String,
}

/// A subject token or stream name: no `.`, `*`, `>`, whitespace or path
/// separators.
fn token(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '.' | '*' | '>' | '/' | '\\' => '_',
            c if c.is_whitespace() => '_',
            c => c,
        })
        .collect()
}

impl Nats {
    pub(crate) fn new(addr: SocketAddr, prefix: &str) -> Nats {
        let root = token(prefix);
        Nats {
            addr,
            stream: root.to_uppercase(),
            root,
        }
    }

    fn subject(&self, shared: &Shared, channel: usize) -> String {
        format!("{}.{}", self.root, shared.plan.channel_name(channel))
    }

    /// A connection; `epoch` counts its connections (1, then one more each
    /// time it is lost, each also counted in `live`).
    async fn connect(
        &self,
        name: &str,
        epoch: Epoch,
        live: Option<Arc<Live>>,
    ) -> anyhow::Result<async_nats::Client> {
        epoch.send_replace(1);
        async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(10))
            .request_timeout(Some(Duration::from_secs(10)))
            .max_reconnects(None)
            .event_callback(move |event| {
                let epoch = Arc::clone(&epoch);
                let live = live.clone();
                async move {
                    if let async_nats::Event::Disconnected = event {
                        epoch.send_modify(|epoch| *epoch += 1);
                        if let Some(live) = live {
                            live.reconnected();
                        }
                    }
                }
            })
            .connect(format!("nats://{}", self.addr))
            .await
            .with_context(|| format!("connecting {name} to nats://{}", self.addr))
    }

    fn context(client: async_nats::Client) -> Context {
        let mut context = async_nats::jetstream::new(client);
        context.set_timeout(ACK_TIMEOUT);
        context
    }

    async fn consumer(
        &self,
        context: &Context,
        shared: &Shared,
        endpoint: &super::Endpoint,
    ) -> anyhow::Result<Consumer<pull::Config>> {
        context
            .create_consumer_on_stream(
                pull::Config {
                    durable_name: Some(token(&endpoint.name)),
                    filter_subject: self.subject(shared, endpoint.channel),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    ..Default::default()
                },
                &self.stream,
            )
            .await
            .with_context(|| format!("creating the durable consumer of {}", endpoint.name))
    }
}

/// A connection's count of connections, watched by its publishes.
type Epoch = Arc<watch::Sender<u32>>;

fn epoch() -> Epoch {
    Arc::new(watch::Sender::new(1))
}

/// A connected endpoint, before the gate opens.
pub(crate) struct Opened {
    index: usize,
    client: async_nats::Client,
    consumer: Option<Consumer<pull::Config>>,
    epoch: Epoch,
}

impl Backend for Nats {
    type Opened = Vec<Opened>;

    fn setup(&self, _shared: &Shared) -> anyhow::Result<()> {
        let runtime = super::runtime()?;
        runtime.block_on(async {
            let client = self.connect("ruyi-bench-setup", epoch(), None).await?;
            let context = Nats::context(client);
            // A stream left by an earlier run with this prefix goes first.
            let _ = context.delete_stream(&self.stream).await;
            context
                .create_stream(StreamConfig {
                    name: self.stream.clone(),
                    subjects: vec![format!("{}.>", self.root)],
                    storage: StorageType::File,
                    num_replicas: 1,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating the stream {}", self.stream))?;
            eprintln!(
                "ruyi-bench: JetStream stream {} (file storage) on {}.> created",
                self.stream, self.root
            );
            anyhow::Ok(())
        })
    }

    async fn open(&self, shared: &Arc<Shared>, thread: usize) -> anyhow::Result<Vec<Opened>> {
        let plan = &shared.plan;
        let mut opened = Vec::with_capacity(plan.per_thread[thread].len());
        for &index in &plan.per_thread[thread] {
            let endpoint = &plan.endpoints[index];
            let epoch = epoch();
            let client = self
                .connect(
                    &endpoint.name,
                    Arc::clone(&epoch),
                    Some(Arc::clone(&shared.live)),
                )
                .await?;
            let consumer = if endpoint.receives {
                let context = Nats::context(client.clone());
                Some(self.consumer(&context, shared, endpoint).await?)
            } else {
                None
            };
            opened.push(Opened {
                index,
                client,
                consumer,
                epoch,
            });
        }
        // Offline members: durable consumers nobody reads.
        if !plan.offline_per_thread[thread].is_empty() {
            let client = self
                .connect(&format!("{}-offline-{thread}", plan.prefix), epoch(), None)
                .await?;
            let context = Nats::context(client);
            for &index in &plan.offline_per_thread[thread] {
                self.consumer(&context, shared, &plan.offline[index])
                    .await?;
            }
        }
        Ok(opened)
    }

    async fn run(
        &self,
        shared: &Arc<Shared>,
        opened: Vec<Opened>,
    ) -> anyhow::Result<Vec<EndpointResult>> {
        let mut tasks = Vec::with_capacity(opened.len());
        for endpoint in opened {
            let shared = Arc::clone(shared);
            let subject = self.subject(&shared, shared.plan.endpoints[endpoint.index].channel);
            let msg_prefix = format!("{}-", self.root);
            tasks.push(tokio::task::spawn_local(run_endpoint(
                shared, endpoint, subject, msg_prefix,
            )));
        }
        super::join_endpoints(tasks).await
    }

    fn cleanup(&self, _shared: &Shared) -> anyhow::Result<()> {
        let runtime = super::runtime()?;
        runtime.block_on(async {
            let client = self.connect("ruyi-bench-cleanup", epoch(), None).await?;
            Nats::context(client)
                .delete_stream(&self.stream)
                .await
                .with_context(|| format!("deleting the stream {}", self.stream))?;
            anyhow::Ok(())
        })
    }

    async fn hold(&self, name: String, _release: Arc<AtomicBool>) -> anyhow::Result<Held> {
        // The client keeps its connection (and answers pings) on its own
        // task until dropped.
        let client = self.connect(&name, epoch(), None).await?;
        Ok(Held::Nats(client))
    }
}

async fn run_endpoint(
    shared: Arc<Shared>,
    opened: Opened,
    subject: String,
    msg_prefix: String,
) -> anyhow::Result<EndpointResult> {
    let Opened {
        index,
        client,
        consumer,
        epoch,
    } = opened;
    let endpoint = &shared.plan.endpoints[index];
    // The device keeps reading while its own sender sends.
    let sending = Rc::new(std::cell::Cell::new(endpoint.sender.is_some()));
    let sender = endpoint.sender.map(|slot| {
        let context = Nats::context(client.clone());
        let guard = SendingGuard(Arc::clone(&shared));
        let sending = Rc::clone(&sending);
        let subject = subject.clone();
        let epoch = Arc::clone(&epoch);
        tokio::task::spawn_local(async move {
            let result = send(guard, context, epoch, subject, slot, msg_prefix).await;
            sending.set(false);
            result
        })
    });
    let received = match consumer {
        Some(consumer) => {
            Some(receive(&shared, endpoint, consumer, &subject, &epoch, &sending).await)
        }
        None => None,
    };
    let (mut part, acked) = match sender {
        Some(task) => task
            .await
            .map_err(|e| anyhow::anyhow!("a sender task failed: {e}"))?,
        None => (Part::new(), Vec::new()),
    };
    let (log, own_skipped) = match received {
        Some(received) => {
            let (receiver_part, log, own) = received?;
            part.add(&receiver_part);
            (log, own)
        }
        None => (DeviceLog::default(), 0),
    };
    // The last acks go out before the connection closes.
    let _ = client.flush().await;
    Ok(EndpointResult {
        endpoint: index,
        part,
        acked,
        log,
        own_skipped,
    })
}

/// A publish waiting for its PubAck, kept whole to go again.
struct Flight {
    sent_at_us: u64,
    body: Bytes,
    /// Which attempt the outstanding ack future is for.
    attempt: u32,
}

type AckFuture = futures_util::future::LocalBoxFuture<
    'static,
    (
        u64,
        u32,
        Result<PublishAck, async_nats::jetstream::context::PublishError>,
    ),
>;

/// Sends one attempt of publish `n` (with its message id); the future of
/// its PubAck, tagged with `n` and the attempt.
async fn publish(
    context: &Context,
    subject: &str,
    msg_prefix: &str,
    n: u64,
    flight: &Flight,
) -> Result<AckFuture, async_nats::jetstream::context::PublishError> {
    let ack = context
        .send_publish(
            subject.to_owned(),
            PublishMessage::build()
                .payload(flight.body.clone())
                .message_id(format!("{msg_prefix}{n}")),
        )
        .await?;
    let attempt = flight.attempt;
    Ok(Box::pin(async move { (n, attempt, ack.await) }))
}

/// A sender: keeps `window` PubAcks outstanding (paced under `--rate`) for
/// the run's time, then waits for the last ones. After a failed publish
/// or a reconnection, everything outstanding goes again, in order, with
/// the same message ids (the stream's duplicate window answers a copy it
/// already has with the original's ack); what gets no ack for `patience`
/// is given up.
async fn send(
    guard: SendingGuard,
    context: Context,
    epoch: Epoch,
    subject: String,
    slot: usize,
    msg_prefix: String,
) -> (Part, Vec<u64>) {
    let shared = Arc::clone(&guard.0);
    let msg_prefix = format!("{msg_prefix}{slot}-");
    let mut part = Part::metered(&shared.live);
    let mut acked = Vec::new();
    let mut flights: BTreeMap<u64, Flight> = BTreeMap::new();
    let mut acks: FuturesUnordered<AckFuture> = FuturesUnordered::new();
    let mut connection = epoch.subscribe();
    connection.mark_unchanged();
    // When to send everything outstanding again.
    let mut resend_at: Option<Instant> = None;
    let started = Instant::now();
    let deadline = started + shared.duration;
    let mut next_due = started + crate::common::stagger(&msg_prefix, shared.interval);
    let mut last_progress = started;
    let mut n = 0u64;
    let timer = shared
        .interval
        .and_then(|_| super::PreciseTimer::new().ok());
    loop {
        let now = Instant::now();
        if resend_at.is_some_and(|at| at <= now) {
            resend_at = None;
            for (&n, flight) in flights.iter_mut() {
                flight.attempt += 1;
                match publish(&context, &subject, &msg_prefix, n, flight).await {
                    Ok(ack) => acks.push(ack),
                    Err(_) => {
                        resend_at = Some(Instant::now() + Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
        let now = Instant::now();
        if !flights.is_empty() && now.saturating_duration_since(last_progress) > shared.patience {
            // No PubAck for that long: what is outstanding is given up.
            part.on_failed(flights.len() as u64);
            flights.clear();
            resend_at = None;
        }
        while flights.len() < shared.window
            && resend_at.is_none()
            && now < deadline
            && shared.interval.is_none_or(|_| next_due <= now)
        {
            // Under --rate a send counts from when it was due.
            let late_us = match shared.interval {
                Some(_) => now.saturating_duration_since(next_due).as_micros() as u64,
                None => 0,
            };
            let sent_at_us = unix_us().saturating_sub(late_us);
            let flight = Flight {
                sent_at_us,
                body: payload(shared.payload_bytes, sent_at_us, super::counter(slot, n)),
                attempt: 0,
            };
            if flights.is_empty() {
                last_progress = now;
            }
            match publish(&context, &subject, &msg_prefix, n, &flight).await {
                Ok(ack) => acks.push(ack),
                Err(_) => resend_at = Some(Instant::now() + Duration::from_millis(100)),
            }
            flights.insert(n, flight);
            part.sent += 1;
            n += 1;
            if let Some(interval) = shared.interval {
                next_due += interval;
            }
        }
        if flights.is_empty() && now >= deadline {
            break;
        }
        let (mut wake, precise) = if now < deadline
            && resend_at.is_none()
            && shared.interval.is_some()
            && flights.len() < shared.window
        {
            (next_due.min(deadline), true)
        } else if now < deadline {
            (deadline, false)
        } else {
            (now + Duration::from_millis(200), false)
        };
        if let Some(at) = resend_at {
            wake = wake.min(at);
        }
        let sleep = async {
            match &timer {
                Some(timer) if precise && timer.sleep_until(wake).await.is_ok() => {}
                _ => tokio::time::sleep_until(wake.into()).await,
            }
        };
        tokio::select! {
            Some((n, attempt, result)) = acks.next(), if !acks.is_empty() => {
                if flights.get(&n).is_some_and(|f| f.attempt == attempt) {
                    match result {
                        Ok(_) => {
                            if let Some(flight) = flights.remove(&n) {
                                last_progress = Instant::now();
                                part.on_ack(flight.sent_at_us);
                                acked.push(super::counter(slot, n));
                            }
                        }
                        Err(_) => {
                            resend_at.get_or_insert(Instant::now() + Duration::from_millis(100));
                        }
                    }
                }
            }
            Ok(()) = connection.changed() => {
                // The connection was lost: whatever was outstanding may
                // never be answered.
                if !flights.is_empty() {
                    resend_at = Some(Instant::now());
                }
            }
            () = sleep => {}
        }
    }
    drop(guard);
    (part, acked)
}

/// A receiving device: reads its durable consumer, acking every message,
/// until every sender is done and nothing arrived for the grace period.
async fn receive(
    shared: &Shared,
    endpoint: &super::Endpoint,
    consumer: Consumer<pull::Config>,
    subject: &str,
    epoch: &Epoch,
    own_sending: &std::cell::Cell<bool>,
) -> anyhow::Result<(Part, DeviceLog, u64)> {
    let mut part = Part::metered(&shared.live);
    let mut log = DeviceLog::default();
    let mut own_skipped = 0u64;
    let pull = || {
        consumer
            .stream()
            .max_messages_per_batch(BATCH)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
    };
    let mut messages = pull().await.context("starting to pull")?;
    let mut last_event = Instant::now();
    let grace = if shared.chaos {
        ACK_WAIT + super::GRACE
    } else {
        super::GRACE
    };
    // First and latest error of the current run of errors.
    let mut errors: Option<(Instant, Instant)> = None;
    loop {
        tokio::select! {
            next = messages.next() => match next {
                Some(Ok(message)) => {
                    errors = None;
                    last_event = Instant::now();
                    if message.subject.as_str() != subject {
                        part.unexpected += 1;
                    } else {
                        let marked = message.info().is_ok_and(|info| info.delivered > 1);
                        let delivery = record_delivery(
                            endpoint,
                            &mut log,
                            &mut part,
                            &message.payload,
                            *epoch.borrow(),
                            marked,
                        );
                        if delivery == Delivery::Own {
                            // A consumer on the group subject gets the
                            // member's own sends too.
                            own_skipped += 1;
                        }
                    }
                    let _ = message.ack().await;
                }
                Some(Err(_)) => {
                    // Missed heartbeats or a failed pull while the server
                    // is away: the stream carries on.
                    let now = Instant::now();
                    let first = match errors {
                        Some((first, latest)) if now - latest < Duration::from_secs(10) => first,
                        _ => now,
                    };
                    if now - first > shared.patience {
                        anyhow::bail!(
                            "{}: pulling has failed for {:?}",
                            endpoint.name,
                            shared.patience
                        );
                    }
                    errors = Some((first, now));
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Ok(again) = pull().await {
                        messages = again;
                    }
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if !own_sending.get()
            && shared.sending.load(Ordering::SeqCst) == 0
            && last_event.elapsed() >= grace
        {
            return Ok((part, log, own_skipped));
        }
    }
}
