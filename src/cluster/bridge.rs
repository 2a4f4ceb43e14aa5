//! The node's side of NATS: one thread running async-nats on a tokio
//! runtime, which the shards (glommio executors) reach through a bounded
//! channel, the way they reach the admin API's control thread.
//!
//! A shard sends one request per tick holding every append of that tick
//! (one per busy partition) and gets every result back at once, so the
//! hand-off between runtimes is paid per tick, not per partition. The
//! thread runs the appends of one request concurrently, except appends to
//! the same subject, which run in order (each expects the one before).
//! Catching up on the log is a request too: a run of records after a
//! position.
//!
//! The thread also carries what crosses nodes: writes forwarded to the node
//! owning their partition ([`LogBridge::forward`], served by
//! [`LogBridge::serve_forwards`]), and the log of the partitions other
//! nodes own, which this node follows ([`LogBridge::follow`]).

use super::lease::{LeaseError, LeaseSpec, OwnerChange};
use super::log::{append, append_id, read_next, AppendError, AppendPolicy, Appended};
use async_nats::jetstream;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One append of a tick.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub subject: String,
    /// The stream sequence the subject's last message must have; `None`:
    /// the sequence the previous append of the same request to the same
    /// subject got (a partition's share of a commit split in several
    /// records). An append whose predecessor was not stored is not tried.
    pub expected: Option<u64>,
    /// Who appends it: its `Nats-Msg-Id` is [`append_id`] of the subject,
    /// the expected sequence and this.
    pub writer: String,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    #[error("connecting to NATS at {urls}: {why}")]
    Connect { urls: String, why: String },
    #[error("the log stream {stream}: {why}")]
    Stream { stream: String, why: String },
    #[error("the NATS thread has stopped")]
    Stopped,
    #[error("subscribing to forwarded requests: {0}")]
    Subscribe(String),
    #[error("{0}")]
    Lease(String),
}

type Results = Vec<Result<Appended, AppendError>>;

/// Why a forwarded request has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unanswered {
    /// No node serves the subject: nobody owns the partition right now.
    #[error("no node owns the partition right now")]
    NoOwner,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the NATS thread has stopped")]
    Stopped,
}

/// The answer to one forwarded request.
pub type ForwardAnswer = Result<Bytes, Unanswered>;

/// Serves one forwarded request: the outer future hands it to whoever
/// serves it (awaited in arrival order, so requests are served in the order
/// they came), the inner one is its answer.
pub type ForwardHandler =
    Arc<dyn Fn(Bytes) -> BoxFuture<'static, BoxFuture<'static, Bytes>> + Send + Sync>;

/// A record of a followed partition's log: its subject, stream sequence
/// and payload.
pub type Followed = (String, u64, Bytes);

/// Records read from a subject: (stream sequence, payload), in order.
pub type Records = Vec<(u64, Bytes)>;

enum Request {
    Append {
        appends: Vec<AppendRequest>,
        reply: async_channel::Sender<Results>,
    },
    Read {
        subject: String,
        after: u64,
        max: usize,
        reply: async_channel::Sender<Result<Records, AppendError>>,
    },
    Forward {
        items: Vec<(String, Bytes)>,
        timeout: Duration,
        answers: Vec<async_channel::Sender<ForwardAnswer>>,
    },
    Serve {
        subjects: Vec<String>,
        handler: ForwardHandler,
        ready: async_channel::Sender<Result<(), String>>,
    },
    Follow {
        subjects: Vec<String>,
        after: u64,
        to: async_channel::Sender<Followed>,
    },
    Join {
        spec: LeaseSpec,
        reply: async_channel::Sender<Result<(BTreeSet<u32>, tokio::time::Instant), LeaseError>>,
    },
    Lead(Box<Leading>),
}

/// What the lease service starts with (see [`LogBridge::lead`]).
pub struct Leading {
    pub spec: LeaseSpec,
    pub places: Arc<crate::key::Places>,
    /// The partitions [`LogBridge::join`] claimed, and until when the
    /// lease it put holds.
    pub owned: BTreeSet<u32>,
    pub until: tokio::time::Instant,
    pub change: OwnerChange,
    /// Per partition, the subject its forwarded writes come on.
    pub forward_subjects: Vec<String>,
}

/// The log stream ruyi creates when it is missing.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Its subjects (`prefix.>`).
    pub subjects: Vec<String>,
    pub replicas: usize,
}

/// A running NATS thread. Dropping it stops the thread once the requests
/// already sent are answered.
pub struct LogBridge {
    requests: async_channel::Sender<Request>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The largest message the NATS server takes.
    max_payload: usize,
}

/// What the thread is started with.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    pub urls: Vec<String>,
    /// The log stream's name.
    pub stream: String,
    /// Create it like this when it is missing; `None`: it must exist.
    pub create: Option<StreamSpec>,
    pub policy: AppendPolicy,
    /// How many requests may wait for the thread: a shard that finds the
    /// channel full waits, which is backpressure on its commits.
    pub queue_max: usize,
    /// How long connecting and looking up the stream may take at start.
    pub connect_timeout: Duration,
}

impl LogBridge {
    /// Starts the thread, connects and finds the stream; returns once it
    /// is ready, or the reason it is not.
    pub fn start(config: BridgeConfig) -> Result<LogBridge, BridgeError> {
        let (requests, incoming) = async_channel::bounded::<Request>(config.queue_max.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize, BridgeError>>();
        let thread = std::thread::Builder::new()
            .name("ruyi-nats".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready_tx.send(Err(BridgeError::Connect {
                            urls: config.urls.join(","),
                            why: format!("no runtime: {error}"),
                        }));
                        return;
                    }
                };
                runtime.block_on(serve(config, incoming, ready_tx));
            })
            .map_err(|error| BridgeError::Connect {
                urls: String::new(),
                why: format!("no thread: {error}"),
            })?;
        match ready_rx.recv() {
            Ok(Ok(max_payload)) => Ok(LogBridge {
                requests,
                thread: Some(thread),
                max_payload,
            }),
            Ok(Err(error)) => {
                let _ = thread.join();
                Err(error)
            }
            Err(_) => {
                let _ = thread.join();
                Err(BridgeError::Stopped)
            }
        }
    }

    /// Appends everything of one tick; the results come in the order of
    /// `appends`. Callable from any executor.
    pub async fn append_all(&self, appends: Vec<AppendRequest>) -> Result<Results, BridgeError> {
        let (reply, answer) = async_channel::bounded(1);
        self.requests
            .send(Request::Append { appends, reply })
            .await
            .map_err(|_| BridgeError::Stopped)?;
        answer.recv().await.map_err(|_| BridgeError::Stopped)
    }

    /// Up to `max` records of `subject` after stream sequence `after`, in
    /// order; fewer (none) when the log holds no more yet.
    pub async fn read_after(
        &self,
        subject: String,
        after: u64,
        max: usize,
    ) -> Result<Result<Records, AppendError>, BridgeError> {
        let (reply, answer) = async_channel::bounded(1);
        self.requests
            .send(Request::Read {
                subject,
                after,
                max,
                reply,
            })
            .await
            .map_err(|_| BridgeError::Stopped)?;
        answer.recv().await.map_err(|_| BridgeError::Stopped)
    }

    /// Sends each `(subject, payload)` as a request, in order (one
    /// subject's requests reach its server in the order given, after those
    /// of earlier calls), and returns at once with where each answer will
    /// come: the answer, no owner, or no answer within `timeout`.
    pub async fn forward(
        &self,
        items: Vec<(String, Bytes)>,
        timeout: Duration,
    ) -> Result<Vec<async_channel::Receiver<ForwardAnswer>>, BridgeError> {
        let (answers, receivers): (Vec<_>, Vec<_>) =
            items.iter().map(|_| async_channel::bounded(1)).unzip();
        self.requests
            .send(Request::Forward {
                items,
                timeout,
                answers,
            })
            .await
            .map_err(|_| BridgeError::Stopped)?;
        Ok(receivers)
    }

    /// Serves requests on `subjects` with `handler`, in the order they
    /// arrive, until the bridge stops; returns once subscribed.
    pub async fn serve_forwards(
        &self,
        subjects: Vec<String>,
        handler: ForwardHandler,
    ) -> Result<(), BridgeError> {
        let (ready, answer) = async_channel::bounded(1);
        self.requests
            .send(Request::Serve {
                subjects,
                handler,
                ready,
            })
            .await
            .map_err(|_| BridgeError::Stopped)?;
        match answer.recv().await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(BridgeError::Subscribe(why)),
            Err(_) => Err(BridgeError::Stopped),
        }
    }

    /// Follows the log of `subjects` from after stream sequence `after`:
    /// every record, in stream order, goes to the returned channel (which
    /// holds at most `capacity`: a follower that falls behind slows the
    /// reading, nothing is dropped). Lost connections and consumers are
    /// recovered from the last record handed over. Stops when the receiver
    /// is dropped.
    pub async fn follow(
        &self,
        subjects: Vec<String>,
        after: u64,
        capacity: usize,
    ) -> Result<async_channel::Receiver<Followed>, BridgeError> {
        let (to, from) = async_channel::bounded(capacity.max(1));
        self.requests
            .send(Request::Follow {
                subjects,
                after,
                to,
            })
            .await
            .map_err(|_| BridgeError::Stopped)?;
        Ok(from)
    }

    /// Joins the cluster's leases (creating their buckets when missing):
    /// puts this node's heartbeat and claims the partitions it holds or
    /// should own now. Returns them, and until when the lease holds.
    pub async fn join(
        &self,
        spec: LeaseSpec,
    ) -> Result<(BTreeSet<u32>, tokio::time::Instant), BridgeError> {
        let (reply, answer) = async_channel::bounded(1);
        self.requests
            .send(Request::Join { spec, reply })
            .await
            .map_err(|_| BridgeError::Stopped)?;
        match answer.recv().await {
            Ok(Ok(joined)) => Ok(joined),
            Ok(Err(error)) => Err(BridgeError::Lease(error.to_string())),
            Err(_) => Err(BridgeError::Stopped),
        }
    }

    /// Starts the lease service ([`super::lease::run`]) after
    /// [`LogBridge::join`], once the shards run: it keeps the lease and
    /// moves partitions, turning the serving of their forwarded writes on
    /// and off with their ownership.
    pub async fn lead(&self, leading: Leading) -> Result<(), BridgeError> {
        self.requests
            .send(Request::Lead(Box::new(leading)))
            .await
            .map_err(|_| BridgeError::Stopped)
    }

    /// The largest message the NATS server it connected to takes.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }
}

impl Drop for LogBridge {
    fn drop(&mut self) {
        self.requests.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    config: BridgeConfig,
    incoming: async_channel::Receiver<Request>,
    ready: std::sync::mpsc::Sender<Result<usize, BridgeError>>,
) {
    let urls = config.urls.join(",");
    // The servers may be starting with this node: connecting is retried
    // until connect_timeout.
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let client = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let why = match tokio::time::timeout(left, async_nats::connect(config.urls.clone())).await {
            Ok(Ok(client)) => break client,
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no connection within {:?}", config.connect_timeout),
        };
        if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
            let _ = ready.send(Err(BridgeError::Connect { urls, why }));
            return;
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    };
    let max_payload = client.server_info().max_payload;
    let js = jetstream::new(client.clone());
    // JetStream may still be electing its leaders: finding (or creating)
    // the stream is retried until connect_timeout too.
    let stream = loop {
        // An attempt made before JetStream has its leaders may get no
        // answer at all: each is bounded, so a later one can succeed.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt = left.min(ATTEMPT_MAX);
        let why = match tokio::time::timeout(attempt, find_stream(&js, &config)).await {
            Ok(Ok(stream)) => break stream,
            Ok(Err(Found::Unusable(why))) => {
                let _ = ready.send(Err(BridgeError::Stream {
                    stream: config.stream,
                    why,
                }));
                return;
            }
            Ok(Err(Found::NotYet(why))) => why,
            Err(_) => format!("no answer within {:?}", config.connect_timeout),
        };
        if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
            let _ = ready.send(Err(BridgeError::Stream {
                stream: config.stream,
                why,
            }));
            return;
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    };
    // Answers to this node's forwarded requests come to one inbox.
    let inbox = client.new_inbox();
    let replies = match client.subscribe(format!("{inbox}.*")).await {
        Ok(replies) => replies,
        Err(error) => {
            let _ = ready.send(Err(BridgeError::Subscribe(error.to_string())));
            return;
        }
    };
    let pending: Pending = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(route_replies(
        client.clone(),
        inbox.clone(),
        replies,
        Arc::clone(&pending),
    ));
    let mut next_forward = 0u64;
    let forwards = ForwardServer::default();
    let mut buckets: Option<super::lease::Buckets> = None;
    let _ = ready.send(Ok(max_payload));
    let policy = config.policy;
    loop {
        tokio::select! {
            request = incoming.recv() => {
                let Ok(request) = request else { break };
                let request = match request {
                    Request::Forward { items, timeout, answers } => {
                        // Published here, not in a task, so that requests
                        // leave in the order they came.
                        let first = next_forward;
                        next_forward += items.len() as u64;
                        let deadline = tokio::time::Instant::now() + timeout;
                        publish_forwards(&client, &inbox, &pending, first, items, answers, deadline).await;
                        tasks.spawn(expire_forwards(Arc::clone(&pending), first, next_forward, timeout));
                        continue;
                    }
                    Request::Serve { subjects, handler, ready } => {
                        let served = forwards.start(&client, handler, &subjects).await;
                        let _ = ready.send(served).await;
                        continue;
                    }
                    Request::Join { spec, reply } => {
                        let joined = match super::lease::buckets(&js, &spec).await {
                            Ok(found) => {
                                let joined = super::lease::join(&found, &spec).await;
                                buckets = Some(found);
                                joined
                            }
                            Err(error) => Err(error),
                        };
                        let _ = reply.send(joined).await;
                        continue;
                    }
                    Request::Lead(leading) => {
                        let Some(buckets) = buckets.clone() else {
                            tracing::error!("the lease service was started before joining");
                            continue;
                        };
                        let Leading { spec, places, owned, until, change, forward_subjects } = *leading;
                        let serve = forwards.switch(client.clone(), forward_subjects);
                        tasks.spawn(super::lease::run(buckets, spec, places, owned, until, change, serve));
                        continue;
                    }
                    Request::Follow { subjects, after, to } => {
                        tasks.spawn(follow(stream.clone(), subjects, after, to));
                        continue;
                    }
                    other => other,
                };
                let (js, stream) = (js.clone(), stream.clone());
                tasks.spawn(async move {
                    match request {
                        Request::Append { appends, reply } => {
                            let results = run(&js, &stream, appends, &policy).await;
                            let _ = reply.send(results).await;
                        }
                        Request::Read { subject, after, max, reply } => {
                            let records = read(&stream, &subject, after, max, &policy).await;
                            let _ = reply.send(records).await;
                        }
                        Request::Forward { .. }
                        | Request::Serve { .. }
                        | Request::Follow { .. }
                        | Request::Join { .. }
                        | Request::Lead(_) => {}
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    // The long-running tasks (replies, served subjects, followers) end
    // with the runtime; what was asked before the bridge stopped is done.
    tasks.abort_all();
    forwards.stop();
    for (_, waiting) in pending.lock().expect("not poisoned").drain() {
        let _ = waiting.answer.try_send(Err(Unanswered::Stopped));
    }
}

/// A forwarded request waiting for its answer.
struct Waiting {
    answer: async_channel::Sender<ForwardAnswer>,
    subject: String,
    payload: Bytes,
    deadline: tokio::time::Instant,
}

/// Forwarded requests waiting for their answer, by number.
type Pending = Arc<Mutex<HashMap<u64, Waiting>>>;

/// The pause before a request nobody served is sent again.
const NO_OWNER_PAUSE: Duration = Duration::from_millis(20);

async fn publish_forwards(
    client: &async_nats::Client,
    inbox: &str,
    pending: &Pending,
    first: u64,
    items: Vec<(String, Bytes)>,
    answers: Vec<async_channel::Sender<ForwardAnswer>>,
    deadline: tokio::time::Instant,
) {
    for (number, ((subject, payload), answer)) in (first..).zip(items.into_iter().zip(answers)) {
        let waiting = Waiting {
            answer,
            subject: subject.clone(),
            payload: payload.clone(),
            deadline,
        };
        pending
            .lock()
            .expect("not poisoned")
            .insert(number, waiting);
        let reply = format!("{inbox}.{number}");
        if let Err(error) = client.publish_with_reply(subject, reply, payload).await {
            tracing::warn!(%error, "forwarding a request failed");
            if let Some(waiting) = pending.lock().expect("not poisoned").remove(&number) {
                let _ = waiting.answer.try_send(Err(Unanswered::Stopped));
            }
        }
    }
}

/// After `timeout`, the requests `first..end` still unanswered get
/// [`Unanswered::Timeout`].
async fn expire_forwards(pending: Pending, first: u64, end: u64, timeout: Duration) {
    tokio::time::sleep(timeout).await;
    let mut pending = pending.lock().expect("not poisoned");
    for number in first..end {
        if let Some(waiting) = pending.remove(&number) {
            let _ = waiting.answer.try_send(Err(Unanswered::Timeout(timeout)));
        }
    }
}

/// Hands each answer on the inbox to the request it answers. A request
/// nobody served (no node subscribes to its partition yet: a node starting,
/// its subscription still spreading over the NATS cluster) was received by
/// nobody, so it is sent again after a pause until its deadline.
async fn route_replies(
    client: async_nats::Client,
    inbox: String,
    mut replies: async_nats::Subscriber,
    pending: Pending,
) {
    while let Some(message) = replies.next().await {
        let Some(number) = message
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let no_owner = message.status == Some(async_nats::StatusCode::NO_RESPONDERS);
        let mut waiting = pending.lock().expect("not poisoned");
        if no_owner {
            let again = waiting
                .get(&number)
                .filter(|w| tokio::time::Instant::now() + NO_OWNER_PAUSE < w.deadline)
                .map(|w| (w.subject.clone(), w.payload.clone()));
            if let Some((subject, payload)) = again {
                let (client, reply) = (client.clone(), format!("{inbox}.{number}"));
                tokio::spawn(async move {
                    tokio::time::sleep(NO_OWNER_PAUSE).await;
                    let _ = client.publish_with_reply(subject, reply, payload).await;
                });
                continue;
            }
        }
        let Some(done) = waiting.remove(&number) else {
            // Answered after its timeout: the caller has moved on.
            continue;
        };
        let result = match no_owner {
            true => Err(Unanswered::NoOwner),
            false => Ok(message.payload),
        };
        let _ = done.answer.try_send(result);
    }
}

/// The subjects whose forwarded requests this node serves, each by a task
/// of its own (a subject's requests are served in arrival order).
#[derive(Clone, Default)]
struct ForwardServer {
    inner: Arc<Mutex<Served>>,
}

#[derive(Default)]
struct Served {
    handler: Option<ForwardHandler>,
    subjects: HashMap<String, tokio::task::AbortHandle>,
}

impl ForwardServer {
    /// Serves `subjects` with `handler` from now on.
    async fn start(
        &self,
        client: &async_nats::Client,
        handler: ForwardHandler,
        subjects: &[String],
    ) -> Result<(), String> {
        self.inner.lock().expect("not poisoned").handler = Some(handler);
        for subject in subjects {
            self.serve(client, subject).await?;
        }
        Ok(())
    }

    /// Serves `subject` (with the handler [`ForwardServer::start`] was
    /// given); nothing when it already does.
    async fn serve(&self, client: &async_nats::Client, subject: &str) -> Result<(), String> {
        let handler = {
            let served = self.inner.lock().expect("not poisoned");
            if served.subjects.contains_key(subject) {
                return Ok(());
            }
            served.handler.clone()
        };
        let Some(handler) = handler else {
            return Err("no handler".into());
        };
        let subscriber = client
            .subscribe(subject.to_string())
            .await
            .map_err(|error| format!("{subject}: {error}"))?;
        let task = tokio::spawn(serve_requests(client.clone(), subscriber, handler));
        let mut served = self.inner.lock().expect("not poisoned");
        if let Some(earlier) = served
            .subjects
            .insert(subject.to_string(), task.abort_handle())
        {
            earlier.abort();
        }
        Ok(())
    }

    /// Stops serving `subject`: its requests find no responders (the
    /// forwarding node retries them until the new owner serves them).
    fn unserve(&self, subject: &str) {
        if let Some(task) = self
            .inner
            .lock()
            .expect("not poisoned")
            .subjects
            .remove(subject)
        {
            task.abort();
        }
    }

    /// What the lease service turns a partition's serving on and off with.
    fn switch(
        &self,
        client: async_nats::Client,
        subjects: Vec<String>,
    ) -> super::lease::ForwardServing {
        let server = self.clone();
        let subjects = Arc::new(subjects);
        Arc::new(move |partition, on| {
            let (server, client, subjects) =
                (server.clone(), client.clone(), Arc::clone(&subjects));
            Box::pin(async move {
                let Some(subject) = subjects.get(partition as usize) else {
                    return;
                };
                match on {
                    true => {
                        if let Err(why) = server.serve(&client, subject).await {
                            tracing::warn!(why, "serving a partition's forwarded writes failed");
                        }
                    }
                    false => server.unserve(subject),
                }
            })
        })
    }

    fn stop(&self) {
        for (_, task) in self.inner.lock().expect("not poisoned").subjects.drain() {
            task.abort();
        }
    }
}

/// Serves forwarded requests in arrival order; each answer is published
/// when it is ready.
async fn serve_requests(
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
    handler: ForwardHandler,
) {
    while let Some(message) = requests.next().await {
        let Some(reply) = message.reply else {
            continue;
        };
        let answer = handler(message.payload).await;
        let client = client.clone();
        tokio::spawn(async move {
            let answer = answer.await;
            if let Err(error) = client.publish(reply, answer).await {
                tracing::warn!(%error, "answering a forwarded request failed");
            }
        });
    }
}

/// The pause before a follower's consumer is made again after an error.
const FOLLOW_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Hands every record of `subjects` after `after` to `to`, in stream
/// order, through an ordered consumer made again (from the last record
/// handed over) whenever it fails.
async fn follow(
    stream: jetstream::stream::Stream,
    subjects: Vec<String>,
    after: u64,
    to: async_channel::Sender<Followed>,
) {
    use jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
    let mut last = after;
    loop {
        let config = OrderedConfig {
            filter_subjects: subjects.clone(),
            deliver_policy: match last {
                0 => DeliverPolicy::All,
                n => DeliverPolicy::ByStartSequence {
                    start_sequence: n + 1,
                },
            },
            ..Default::default()
        };
        let messages = match stream.create_consumer(config).await {
            Ok(consumer) => consumer.messages().await.map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let why = match messages {
            Err(why) => why,
            Ok(mut messages) => loop {
                match messages.next().await {
                    None => break "the consumer ended".to_string(),
                    Some(Err(error)) => break error.to_string(),
                    Some(Ok(message)) => {
                        let Ok(info) = message.info() else {
                            continue;
                        };
                        let seq = info.stream_sequence;
                        if seq <= last {
                            continue;
                        }
                        let record = (
                            message.subject.as_str().to_owned(),
                            seq,
                            message.payload.clone(),
                        );
                        if to.send(record).await.is_err() {
                            return;
                        }
                        last = seq;
                    }
                }
            },
        };
        if to.is_closed() {
            return;
        }
        tracing::warn!(why, last, "following the log failed; starting again");
        tokio::time::sleep(FOLLOW_RETRY_PAUSE).await;
    }
}

/// The log stream, created as `config.create` says when it is missing,
/// once its Raft group has a leader (before that, appends find no one to
/// take them).
async fn find_stream(
    js: &jetstream::Context,
    config: &BridgeConfig,
) -> Result<jetstream::stream::Stream, Found> {
    let mut stream = found_or_created(js, config).await?;
    loop {
        if has_leader(stream.cached_info()) {
            return Ok(stream);
        }
        // The caller bounds the wait.
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream = js
            .get_stream(&config.stream)
            .await
            .map_err(|error| Found::NotYet(error.to_string()))?;
    }
}

/// Whether a stream can take appends: its Raft group has a leader (or it
/// is not replicated).
pub fn has_leader(info: &jetstream::stream::Info) -> bool {
    info.cluster
        .as_ref()
        .is_none_or(|cluster| cluster.leader.is_some())
}

/// Why the log stream cannot be used.
enum Found {
    /// Not yet: retried until connect_timeout.
    NotYet(String),
    /// It is not one ruyi can use (or it is missing and may not be made).
    Unusable(String),
}

/// The pause between attempts to connect and to find the stream at start.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The longest one attempt to find or create the stream may take.
const ATTEMPT_MAX: Duration = Duration::from_secs(1);

/// The log stream as it is, or created as `config.create` says.
async fn found_or_created(
    js: &jetstream::Context,
    config: &BridgeConfig,
) -> Result<jetstream::stream::Stream, Found> {
    let found = js.get_stream(&config.stream).await;
    let missing = |error: &jetstream::context::GetStreamError| {
        matches!(
            error.kind(),
            jetstream::context::GetStreamErrorKind::JetStream(e) if e.error_code().0 == STREAM_NOT_FOUND
        )
    };
    let Some(spec) = &config.create else {
        return found.map_err(|error| match missing(&error) {
            true => Found::Unusable(error.to_string()),
            false => Found::NotYet(error.to_string()),
        });
    };
    match found {
        Ok(stream) => {
            let subjects = &stream.cached_info().config.subjects;
            match spec.subjects.iter().find(|s| !subjects.contains(s)) {
                Some(missing) => Err(Found::Unusable(format!(
                    "it exists but does not take {missing} (its subjects: {subjects:?})"
                ))),
                None => Ok(stream),
            }
        }
        Err(error) if missing(&error) => {
            let created = js
                .create_stream(jetstream::stream::Config {
                    name: config.stream.clone(),
                    subjects: spec.subjects.clone(),
                    num_replicas: spec.replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await;
            created.map_err(|error| Found::NotYet(format!("creating it: {error}")))
        }
        Err(error) => Err(Found::NotYet(error.to_string())),
    }
}

/// JetStream: no such stream.
const STREAM_NOT_FOUND: u64 = 10059;

/// Up to `max` records of `subject` after `after`.
async fn read(
    stream: &jetstream::stream::Stream,
    subject: &str,
    after: u64,
    max: usize,
    policy: &AppendPolicy,
) -> Result<Records, AppendError> {
    let mut records = Vec::new();
    let mut at = after;
    while records.len() < max {
        match read_next(stream, subject, at, policy.ack_timeout).await? {
            Some((seq, payload)) => {
                at = seq;
                records.push((seq, payload));
            }
            None => break,
        }
    }
    Ok(records)
}

/// Runs one tick's appends: each subject's in order, the subjects
/// concurrently.
async fn run(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    appends: Vec<AppendRequest>,
    policy: &AppendPolicy,
) -> Results {
    let mut chains: Vec<(String, Vec<(usize, AppendRequest)>)> = Vec::new();
    for (index, request) in appends.into_iter().enumerate() {
        match chains
            .iter_mut()
            .find(|(subject, _)| *subject == request.subject)
        {
            Some((_, chain)) => chain.push((index, request)),
            None => chains.push((request.subject.clone(), vec![(index, request)])),
        }
    }
    let total = chains.iter().map(|(_, chain)| chain.len()).sum();
    let mut set = tokio::task::JoinSet::new();
    for (_, chain) in chains {
        let (js, stream, policy) = (js.clone(), stream.clone(), *policy);
        set.spawn(async move {
            let mut out = Vec::with_capacity(chain.len());
            let mut previous: Option<Result<u64, AppendError>> = None;
            for (index, request) in chain {
                let expected = match (request.expected, &previous) {
                    (Some(expected), _) => expected,
                    (None, Some(Ok(seq))) => *seq,
                    (None, Some(Err(error))) => {
                        let error = AppendError::Unknown(format!(
                            "not tried: the append before it was not stored ({error})"
                        ));
                        out.push((index, Err(error)));
                        continue;
                    }
                    (None, None) => {
                        let error = AppendError::Refused(
                            "the first append of a subject names no expected sequence".into(),
                        );
                        previous = Some(Err(error.clone()));
                        out.push((index, Err(error)));
                        continue;
                    }
                };
                let id = append_id(&request.subject, expected, &request.writer);
                let result = append(
                    &js,
                    &stream,
                    &request.subject,
                    expected,
                    &id,
                    request.payload,
                    &policy,
                )
                .await;
                previous = Some(result.clone().map(|appended| appended.seq));
                out.push((index, result));
            }
            out
        });
    }
    let mut results: Vec<Option<Result<Appended, AppendError>>> = vec![None; total];
    // A task that panicked or was cancelled leaves its appends unknown.
    while let Some(done) = set.join_next().await {
        if let Ok(chain) = done {
            for (index, result) in chain {
                results[index] = Some(result);
            }
        }
    }
    results
        .into_iter()
        .map(|result| {
            result.unwrap_or_else(|| Err(AppendError::Unknown("the append's task ended".into())))
        })
        .collect()
}
