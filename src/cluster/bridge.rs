//! The node's side of NATS: one thread running async-nats on a tokio
//! runtime, which the shards (glommio executors) reach through a bounded
//! channel, the way they reach the admin API's control thread.
//!
//! A shard sends one request per tick holding every append of that tick
//! (one per busy partition) and gets every result back at once, so the
//! hand-off between runtimes is paid per tick, not per partition. The
//! thread runs the appends of one request concurrently, except appends to
//! the same subject, which run in order (each expects the one before).

use super::log::{append, AppendError, AppendPolicy, Appended};
use async_nats::jetstream;
use bytes::Bytes;
use std::time::Duration;

/// One append of a tick.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub subject: String,
    pub expected: u64,
    /// Its `Nats-Msg-Id` (see [`super::log::append_id`]).
    pub id: String,
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
}

type Results = Vec<Result<Appended, AppendError>>;

struct Request {
    appends: Vec<AppendRequest>,
    reply: async_channel::Sender<Results>,
}

/// A running NATS thread. Dropping it stops the thread once the requests
/// already sent are answered.
pub struct LogBridge {
    requests: async_channel::Sender<Request>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the thread is started with.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    pub urls: Vec<String>,
    /// The log stream's name (it must exist).
    pub stream: String,
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
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
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
            Ok(Ok(())) => Ok(LogBridge {
                requests,
                thread: Some(thread),
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
            .send(Request { appends, reply })
            .await
            .map_err(|_| BridgeError::Stopped)?;
        answer.recv().await.map_err(|_| BridgeError::Stopped)
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
    ready: std::sync::mpsc::Sender<Result<(), BridgeError>>,
) {
    let urls = config.urls.join(",");
    let connected = tokio::time::timeout(
        config.connect_timeout,
        async_nats::connect(config.urls.clone()),
    )
    .await;
    let client = match connected {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => {
            let _ = ready.send(Err(BridgeError::Connect {
                urls,
                why: error.to_string(),
            }));
            return;
        }
        Err(_) => {
            let _ = ready.send(Err(BridgeError::Connect {
                urls,
                why: format!("no connection within {:?}", config.connect_timeout),
            }));
            return;
        }
    };
    let js = jetstream::new(client);
    let stream =
        match tokio::time::timeout(config.connect_timeout, js.get_stream(&config.stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                let _ = ready.send(Err(BridgeError::Stream {
                    stream: config.stream,
                    why: error.to_string(),
                }));
                return;
            }
            Err(_) => {
                let _ = ready.send(Err(BridgeError::Stream {
                    stream: config.stream,
                    why: format!("no answer within {:?}", config.connect_timeout),
                }));
                return;
            }
        };
    let _ = ready.send(Ok(()));
    let policy = config.policy;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            request = incoming.recv() => {
                let Ok(request) = request else { break };
                let (js, stream) = (js.clone(), stream.clone());
                tasks.spawn(async move {
                    let results = run(&js, &stream, request.appends, &policy).await;
                    let _ = request.reply.send(results).await;
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
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
            for (index, request) in chain {
                let result = append(
                    &js,
                    &stream,
                    &request.subject,
                    request.expected,
                    &request.id,
                    request.payload,
                    &policy,
                )
                .await;
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
