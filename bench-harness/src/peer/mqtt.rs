//! `mqtt://`: an MQTT 5 broker (mosquitto) through `rumqttc`, QoS 1 both
//! ways, persistent sessions.
//!
//! Every endpoint is one MQTT client with its own event loop, polled by one
//! task. A sender's publishes come from a second task (the pacer) through
//! the client's request channel; the event loop names the packet id of each
//! publish as it writes it (in request order), and the PUBACK of that id
//! acknowledges it. A receiver subscribes with QoS 1; the event loop
//! answers each delivery with a PUBACK. A group sender's device subscribes
//! with No Local, so the broker does not echo its own sends (the gateway
//! does not either); its other devices get them.
//!
//! Before the gate, each client ends whatever session its id had (so
//! nothing from an earlier run is left) and starts a persistent one (Clean
//! Start off, a session expiry); reconnections resume it (the broker
//! resends what was unacknowledged and what it queued), and the client
//! resends its unacknowledged publishes in the order they were first sent.
//! When the broker lost the session (killed before it saved it), the
//! client subscribes again and publishes again whatever was not
//! acknowledged.

use super::{
    record_delivery, Backend, Delivery, DeviceLog, EndpointResult, Held, SendingGuard, Shared,
};
use crate::common::unix_us;
use crate::report::{payload, read_payload, Part};
use anyhow::{bail, Context};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PubAckReason, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions, Request};
use rumqttc::{NetworkOptions, Outgoing};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Session expiry of the online clients: their sessions outlive a broker
/// restart under chaos, and go a while after the run.
const ONLINE_SESSION_EXPIRY_S: u32 = 600;
/// Offline members' sessions hold their queued messages until the run's
/// cleanup removes them.
const OFFLINE_SESSION_EXPIRY_S: u32 = 3600;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Mqtt {
    addr: SocketAddr,
}

impl Mqtt {
    pub(crate) fn new(addr: SocketAddr) -> Mqtt {
        Mqtt { addr }
    }

    fn options(&self, client_id: &str, window: usize, payload_bytes: usize) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.addr.ip().to_string(), self.addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_start(true);
        options.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        // The largest packet this client takes (rumqttc's default is 10 KiB).
        options.set_max_packet_size(Some(
            u32::try_from((payload_bytes + 4096).max(65536)).unwrap_or(u32::MAX),
        ));
        let window = window.clamp(1, usize::from(u16::MAX - 1));
        options.set_outgoing_inflight_upper_limit(window as u16);
        options.set_request_channel_capacity(window + 16);
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        options
    }
}

/// A topic prefix without MQTT's wildcards.
fn topic_prefix(prefix: &str) -> String {
    prefix.replace(['+', '#'], "_")
}

fn topic(shared: &Shared, channel: usize) -> String {
    format!(
        "{}/{}",
        topic_prefix(&shared.plan.prefix),
        shared.plan.channel_name(channel)
    )
}

fn filter(topic: &str, no_local: bool) -> Filter {
    let mut filter = Filter::new(topic, QoS::AtLeastOnce);
    filter.nolocal = no_local;
    filter
}

/// Polls until `want` says an event is the one awaited; an error or
/// `CONNECT_TIMEOUT` fails.
async fn poll_until(
    eventloop: &mut EventLoop,
    what: &str,
    mut want: impl FnMut(&Event) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .map_err(|_| anyhow::anyhow!("no {what} within {CONNECT_TIMEOUT:?}"))?
            .with_context(|| format!("waiting for {what}"))?;
        if want(&event)? {
            return Ok(());
        }
    }
}

/// Connects with the options as they are; returns once the broker's
/// CONNACK came.
async fn connect(
    options: MqttOptions,
    capacity: usize,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let id = options.client_id();
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    poll_until(&mut eventloop, "CONNACK", |event| {
        Ok(matches!(event, Event::Incoming(Packet::ConnAck(_))))
    })
    .await
    .with_context(|| format!("connecting {id}"))?;
    Ok((client, eventloop))
}

/// Ends whatever session the client id has (Clean Start, no expiry, and
/// DISCONNECT).
async fn end_session(mut options: MqttOptions) -> anyhow::Result<()> {
    options.set_clean_start(true);
    options.set_session_expiry_interval(Some(0));
    let (client, mut eventloop) = connect(options, 16).await?;
    disconnect(&client, &mut eventloop).await
}

/// A new persistent session: ends an earlier one, then connects with Clean
/// Start off and the session expiry given. (Starting it with Clean Start
/// on would do in one connection, but mosquitto 2.0.11 does not persist
/// such a session to disk until the client connects again without it.)
async fn new_session(
    mut options: MqttOptions,
    expiry_s: u32,
    capacity: usize,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    end_session(options.clone()).await?;
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(expiry_s));
    connect(options, capacity).await
}

async fn subscribe(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
    no_local: bool,
) -> anyhow::Result<()> {
    client.subscribe_many([filter(topic, no_local)]).await?;
    poll_until(eventloop, "SUBACK", |event| match event {
        Event::Incoming(Packet::SubAck(ack)) => {
            if ack
                .return_codes
                .iter()
                .all(|code| matches!(code, SubscribeReasonCode::Success(QoS::AtLeastOnce)))
            {
                Ok(true)
            } else {
                bail!("subscribing to {topic}: {:?}", ack.return_codes)
            }
        }
        _ => Ok(false),
    })
    .await
}

/// Sends DISCONNECT (the session stays, with its expiry) and waits until
/// it is written.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) -> anyhow::Result<()> {
    client.disconnect().await?;
    poll_until(eventloop, "DISCONNECT written", |event| {
        Ok(matches!(event, Event::Outgoing(Outgoing::Disconnect)))
    })
    .await
}

/// A connected endpoint, before the gate opens.
pub(crate) struct Opened {
    index: usize,
    client: AsyncClient,
    eventloop: EventLoop,
}

impl Backend for Mqtt {
    type Opened = Vec<Opened>;

    fn setup(&self, _shared: &Shared) -> anyhow::Result<()> {
        Ok(())
    }

    async fn open(&self, shared: &Arc<Shared>, thread: usize) -> anyhow::Result<Vec<Opened>> {
        let plan = &shared.plan;
        let mut opened = Vec::with_capacity(plan.per_thread[thread].len());
        for &index in &plan.per_thread[thread] {
            let endpoint = &plan.endpoints[index];
            let options = self.options(&endpoint.name, shared.window, shared.payload_bytes);
            let (client, mut eventloop) =
                new_session(options, ONLINE_SESSION_EXPIRY_S, shared.window + 16).await?;
            if endpoint.receives {
                subscribe(
                    &client,
                    &mut eventloop,
                    &topic(shared, endpoint.channel),
                    endpoint.sender.is_some(),
                )
                .await
                .with_context(|| format!("subscribing {}", endpoint.name))?;
            }
            opened.push(Opened {
                index,
                client,
                eventloop,
            });
        }
        // Offline members: a persistent session with the subscription,
        // then gone, so the broker queues their messages.
        for &index in &plan.offline_per_thread[thread] {
            let endpoint = &plan.offline[index];
            let options = self.options(&endpoint.name, 1, shared.payload_bytes);
            let (client, mut eventloop) =
                new_session(options, OFFLINE_SESSION_EXPIRY_S, 16).await?;
            subscribe(
                &client,
                &mut eventloop,
                &topic(shared, endpoint.channel),
                false,
            )
            .await
            .with_context(|| format!("subscribing {}", endpoint.name))?;
            disconnect(&client, &mut eventloop).await?;
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
            tasks.push(tokio::task::spawn_local(run_endpoint(shared, endpoint)));
        }
        super::join_endpoints(tasks).await
    }

    fn cleanup(&self, shared: &Shared) -> anyhow::Result<()> {
        // The offline members' sessions still hold what they queued:
        // a clean start with no expiry ends them.
        if shared.plan.offline.is_empty() {
            return Ok(());
        }
        let runtime = super::runtime()?;
        runtime.block_on(async {
            for endpoint in &shared.plan.offline {
                end_session(self.options(&endpoint.name, 1, shared.payload_bytes)).await?;
            }
            anyhow::Ok(())
        })
    }

    async fn hold(&self, name: String, release: Arc<AtomicBool>) -> anyhow::Result<Held> {
        // A clean session that ends with the connection.
        let mut options = self.options(&name, 1, 64);
        options.set_session_expiry_interval(Some(0));
        let (client, mut eventloop) = connect(options, 16).await?;
        // Keep polling (pings) until released, then say goodbye.
        Ok(Held::Task(tokio::task::spawn_local(async move {
            let stopper = {
                let client = client.clone();
                tokio::task::spawn_local(async move {
                    while !release.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let _ = client.disconnect().await;
                })
            };
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(_) if stopper.is_finished() => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })))
    }
}

/// An endpoint's state, shared by its event loop task, its pacer and its
/// stopper.
struct State {
    part: Part,
    log: DeviceLog,
    /// Connections so far (1: the one opened before the gate).
    epoch: u32,
    connected: bool,
    /// Publishes requested that the event loop has not written yet:
    /// (counter, sent_at_us), in request order.
    queued: VecDeque<(u64, u64)>,
    /// Written publishes by packet id, waiting for their PUBACK.
    inflight: HashMap<u16, (u64, u64)>,
    acked: Vec<u64>,
    last_progress: Instant,
    last_event: Instant,
    /// The pacer has not finished (sending, or waiting for acks).
    sending: bool,
    /// The stopper asked for the DISCONNECT.
    stopping: bool,
}

impl State {
    fn in_flight(&self) -> usize {
        self.queued.len() + self.inflight.len()
    }
}

async fn run_endpoint(shared: Arc<Shared>, opened: Opened) -> anyhow::Result<EndpointResult> {
    let Opened {
        index,
        client,
        mut eventloop,
    } = opened;
    let endpoint = shared.plan.endpoints[index].clone();
    let topic: Rc<str> = topic(&shared, endpoint.channel).into();
    let now = Instant::now();
    let state = Rc::new(RefCell::new(State {
        part: Part::metered(&shared.live),
        log: DeviceLog::default(),
        epoch: 1,
        connected: true,
        queued: VecDeque::new(),
        inflight: HashMap::new(),
        acked: Vec::new(),
        last_progress: now,
        last_event: now,
        sending: endpoint.sender.is_some(),
        stopping: false,
    }));
    let wake = Rc::new(Notify::new());
    let pacer = endpoint.sender.map(|slot| {
        tokio::task::spawn_local(pace(
            SendingGuard(Arc::clone(&shared)),
            Rc::clone(&state),
            Rc::clone(&wake),
            client.clone(),
            Rc::clone(&topic),
            slot,
        ))
    });
    let stopper = tokio::task::spawn_local(stop_when_done(
        Arc::clone(&shared),
        Rc::clone(&state),
        client.clone(),
    ));
    let mut backoff = Duration::from_millis(20);
    let mut down_since: Option<Instant> = None;
    let outcome = loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break Ok(()),
            Ok(event) => {
                down_since = None;
                backoff = Duration::from_millis(20);
                on_event(&shared, &endpoint, &topic, &client, &state, &wake, event);
            }
            Err(error) => {
                resend_in_order(&mut eventloop.pending);
                {
                    let mut st = state.borrow_mut();
                    st.connected = false;
                    if st.stopping {
                        break Ok(());
                    }
                }
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() > shared.patience {
                    break Err(anyhow::anyhow!(
                        "{}: no connection to the broker for {:?}: {error}",
                        endpoint.name,
                        shared.patience
                    ));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    };
    stopper.abort();
    if let Some(pacer) = pacer {
        if outcome.is_err() {
            pacer.abort();
        }
        let _ = pacer.await;
    }
    outcome?;
    let mut st = state.borrow_mut();
    Ok(EndpointResult {
        endpoint: index,
        part: std::mem::replace(&mut st.part, Part::new()),
        acked: std::mem::take(&mut st.acked),
        log: std::mem::take(&mut st.log),
        own_skipped: 0,
    })
}

/// rumqttc resends the unacknowledged publishes of a lost connection in
/// packet id order, which is not the order they were sent in once the ids
/// wrapped: puts them back in counter order (the other requests stay
/// where they are).
fn resend_in_order(pending: &mut VecDeque<Request>) {
    let counter = |publish: &Publish| read_payload(&publish.payload).map(|(_, counter)| counter);
    let mut publishes: Vec<Publish> = pending
        .iter()
        .filter_map(|request| match request {
            Request::Publish(publish) => Some(publish.clone()),
            _ => None,
        })
        .collect();
    if publishes.len() < 2 {
        return;
    }
    publishes.sort_by_key(counter);
    let mut sorted = publishes.into_iter();
    for request in pending.iter_mut() {
        if let Request::Publish(publish) = request {
            if let Some(next) = sorted.next() {
                *publish = next;
            }
        }
    }
}

fn on_event(
    shared: &Shared,
    endpoint: &super::Endpoint,
    topic: &str,
    client: &AsyncClient,
    state: &RefCell<State>,
    wake: &Notify,
    event: Event,
) {
    let mut st = state.borrow_mut();
    match event {
        // A resend after a reconnection keeps its packet id; a new publish
        // is the oldest one requested.
        Event::Outgoing(Outgoing::Publish(pkid)) if !st.inflight.contains_key(&pkid) => {
            if let Some(send) = st.queued.pop_front() {
                st.inflight.insert(pkid, send);
            }
        }
        Event::Incoming(Packet::PubAck(ack)) => {
            if let Some((counter, sent_at_us)) = st.inflight.remove(&ack.pkid) {
                st.last_progress = Instant::now();
                if matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ) {
                    st.part.on_ack(sent_at_us);
                    st.acked.push(counter);
                } else {
                    st.part.on_failed(1);
                }
                wake.notify_one();
            }
        }
        Event::Incoming(Packet::Publish(publish)) => {
            st.last_event = Instant::now();
            if !endpoint.receives || publish.topic.as_ref() != topic.as_bytes() {
                st.part.unexpected += 1;
                return;
            }
            let epoch = st.epoch;
            let State { log, part, .. } = &mut *st;
            if record_delivery(endpoint, log, part, &publish.payload, epoch, publish.dup)
                == Delivery::Own
            {
                // No Local should have kept it away.
                part.unexpected += 1;
            }
        }
        Event::Incoming(Packet::ConnAck(connack)) => {
            st.epoch += 1;
            st.connected = true;
            shared.live.reconnected();
            if !connack.session_present {
                // The broker lost the session: subscribe again, and send
                // again what was not acknowledged (same counters).
                if endpoint.receives {
                    let _ = client.try_subscribe_many([filter(topic, endpoint.sender.is_some())]);
                }
                let mut again: Vec<(u64, u64)> =
                    st.inflight.drain().map(|(_, send)| send).collect();
                again.extend(st.queued.drain(..));
                again.sort_unstable();
                for (counter, sent_at_us) in again {
                    let body = payload(shared.payload_bytes, sent_at_us, counter);
                    if client
                        .try_publish(topic, QoS::AtLeastOnce, false, body)
                        .is_ok()
                    {
                        st.queued.push_back((counter, sent_at_us));
                    } else {
                        st.part.on_failed(1);
                    }
                }
            }
            wake.notify_one();
        }
        _ => {}
    }
}

/// A sender: keeps `window` publishes in flight (paced under `--rate`)
/// for the run's time, then waits for the outstanding PUBACKs.
async fn pace(
    guard: SendingGuard,
    state: Rc<RefCell<State>>,
    wake: Rc<Notify>,
    client: AsyncClient,
    topic: Rc<str>,
    slot: usize,
) {
    let shared = Arc::clone(&guard.0);
    let started = Instant::now();
    let deadline = started + shared.duration;
    let mut next_due =
        started + crate::common::stagger(&format!("{topic}/{slot}"), shared.interval);
    let mut n = 0u64;
    state.borrow_mut().last_progress = started;
    let timer = shared
        .interval
        .and_then(|_| super::PreciseTimer::new().ok());
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if shared.interval.is_some() && next_due > now {
            let at = next_due.min(deadline);
            match &timer {
                Some(timer) if timer.sleep_until(at).await.is_ok() => {}
                _ => tokio::time::sleep_until(at.into()).await,
            }
            continue;
        }
        let blocked = {
            let st = state.borrow();
            !st.connected || st.in_flight() >= shared.window
        };
        if blocked {
            let wait = deadline
                .saturating_duration_since(now)
                .min(Duration::from_millis(100));
            let _ = tokio::time::timeout(wait, wake.notified()).await;
            continue;
        }
        // Under --rate a send counts from when it was due.
        let late_us = match shared.interval {
            Some(_) => now.saturating_duration_since(next_due).as_micros() as u64,
            None => 0,
        };
        let sent_at_us = unix_us().saturating_sub(late_us);
        let counter = super::counter(slot, n);
        let body = payload(shared.payload_bytes, sent_at_us, counter);
        let requested = {
            let mut st = state.borrow_mut();
            st.queued.push_back((counter, sent_at_us));
            let requested = client
                .try_publish(&*topic, QoS::AtLeastOnce, false, body)
                .is_ok();
            if requested {
                st.part.sent += 1;
            } else {
                st.queued.pop_back();
            }
            requested
        };
        if requested {
            n += 1;
            if let Some(interval) = shared.interval {
                next_due += interval;
            }
        } else {
            // The request channel is full: the event loop catches up.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // Wait for the outstanding PUBACKs; give up after `patience` without
    // progress.
    loop {
        {
            let mut st = state.borrow_mut();
            let in_flight = st.in_flight();
            if in_flight == 0 {
                break;
            }
            if st.last_progress.elapsed() > shared.patience {
                st.part.on_failed(in_flight as u64);
                st.queued.clear();
                st.inflight.clear();
                break;
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), wake.notified()).await;
    }
    state.borrow_mut().sending = false;
    drop(guard);
}

/// Disconnects the endpoint once every sender is done and nothing arrived
/// for the grace period.
async fn stop_when_done(shared: Arc<Shared>, state: Rc<RefCell<State>>, client: AsyncClient) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let done = {
            let st = state.borrow();
            !st.sending
                && shared.sending.load(Ordering::SeqCst) == 0
                && st.last_event.elapsed() >= super::GRACE
        };
        if done {
            break;
        }
    }
    state.borrow_mut().stopping = true;
    while client.try_disconnect().is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
