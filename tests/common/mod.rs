//! Shared test fixtures: a real server on port 0 with 2 shards, and SDK
//! clients connected to it.
#![allow(dead_code)]

use bytes::BytesMut;
use ruyi::client::{connect, Client, ConnectOptions, Delivery, Incoming};
use ruyi::config::Config;
use ruyi::ids::{ConnId, ShardId};
use ruyi::protocol::{DeviceFlag, Encoder, FrameDecoder, Packet, VerifyLimits};
use ruyi::{Server, ServerHandle};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const SECRET: &str = "integration-test-secret";
/// The admin API token of test servers.
pub const API_TOKEN: &str = "integration-test-api-token";
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    handle: Option<ServerHandle>,
    pub addr: SocketAddr,
    /// The data directory, removed when the server is dropped (unless the
    /// test passed its own).
    _data: Option<tempfile::TempDir>,
}

/// A server on port 0 with 2 shards, token auth, and the RocksDB store
/// (syncing every commit, as in production) in `data_dir`.
pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.shards = 2;
    config.server.data_dir = data_dir.to_owned();
    config.auth.secret = SECRET.into();
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.api.token = API_TOKEN.into();
    config.storage.block_cache_bytes = 8 * 1024 * 1024;
    config.storage.write_buffer_bytes = 4 * 1024 * 1024;
    config
}

impl TestServer {
    pub fn start() -> TestServer {
        TestServer::start_with(|_| {})
    }

    /// Starts a server in a fresh temporary data directory.
    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let data = tempfile::tempdir().unwrap();
        let mut server = TestServer::start_in(data.path(), adjust);
        server._data = Some(data);
        server
    }

    /// Starts a server on the data in `dir` (for restart tests).
    pub fn start_in(dir: &Path, adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = test_config(dir);
        adjust(&mut config);
        let handle = Server::start(config).expect("server starts");
        let addr = handle.local_addr();
        TestServer {
            handle: Some(handle),
            addr,
            _data: None,
        }
    }

    /// The admin API's base URL, `http://127.0.0.1:PORT`.
    pub fn api_url(&self) -> String {
        format!(
            "http://{}",
            self.handle().api_addr().expect("the API is on")
        )
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn control(&self) -> ruyi::Control {
        self.handle().control()
    }

    /// Shuts down and waits for every shard thread.
    pub fn stop(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.stop();
        }
    }

    /// SDK options for `uid`, without resume: tests see only what is pushed
    /// live unless they ask for resume themselves.
    pub fn options(&self, uid: &str) -> ConnectOptions {
        ConnectOptions::new(uid).token(&token(uid)).resume(false)
    }

    pub async fn connect(&self, uid: &str) -> (Client, Incoming) {
        self.connect_device(uid, "phone").await
    }

    pub async fn connect_device(&self, uid: &str, device: &str) -> (Client, Incoming) {
        connect(self.addr, self.options(uid).device(device, DeviceFlag::App))
            .await
            .unwrap_or_else(|e| panic!("{uid}/{device} connects: {e}"))
    }

    /// Connects until the connection lands on `shard` (the shards share one
    /// listening socket and take turns accepting; the session id names the
    /// shard).
    pub async fn connect_on_shard(
        &self,
        uid: &str,
        device: &str,
        shard: ShardId,
    ) -> (Client, Incoming) {
        for _ in 0..200 {
            let (client, mut incoming) = self.connect_device(uid, device).await;
            if ConnId(client.conn_ack().session_id).shard() == shard {
                return (client, incoming);
            }
            client.close().await;
            // Wait until the server has seen the goodbye.
            while let Some(delivery) = incoming.recv().await {
                if matches!(delivery, Delivery::Closed(_)) {
                    break;
                }
            }
        }
        panic!("no connection landed on shard {shard:?} in 200 attempts");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.stop();
        }
    }
}

pub fn token(uid: &str) -> String {
    let now_s = ruyi::time::unix_now_ms() / 1000;
    ruyi::auth::issue_token(SECRET, uid, now_s, 3600)
}

pub fn shard_of(client: &Client) -> ShardId {
    ConnId(client.conn_ack().session_id).shard()
}

/// Asserts that nothing arrives within `quiet`.
pub async fn assert_nothing_arrives(incoming: &mut Incoming, quiet: Duration) {
    if let Ok(Some(delivery)) = tokio::time::timeout(quiet, incoming.recv()).await {
        panic!("expected nothing, got {delivery:?}");
    }
}

/// A raw TCP client that speaks frames by hand, for hostile-input tests.
pub struct RawClient {
    pub stream: TcpStream,
    encoder: Encoder,
    input: BytesMut,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        RawClient::from_stream(TcpStream::connect(addr).await.unwrap())
    }

    pub fn from_stream(stream: TcpStream) -> RawClient {
        RawClient {
            stream,
            encoder: Encoder::new(),
            input: BytesMut::new(),
        }
    }

    pub async fn send_packet(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        self.encoder.encode(packet, &mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next packet from the server, or `None` when it closed the
    /// connection.
    pub async fn next_packet(&mut self) -> Option<Packet> {
        let decoder = FrameDecoder::new(1 << 20);
        let limits = VerifyLimits::for_frame_size(1 << 20);
        let mut buf = [0u8; 4096];
        loop {
            if let Some(frame) = decoder.next_frame(&mut self.input).unwrap() {
                return Some(Packet::decode(&frame, &limits).unwrap());
            }
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut buf))
                .await
                .expect("server answers in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.input.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads until the server closes; returns every packet it sent first.
    pub async fn packets_until_closed(&mut self) -> Vec<Packet> {
        let mut packets = Vec::new();
        while let Some(packet) = self.next_packet().await {
            packets.push(packet);
        }
        packets
    }
}

/// A text message to the person `to`, under `client_msg_no`.
pub fn text(to: &str, client_msg_no: &str, body: &str) -> ruyi::client::Outgoing {
    ruyi::client::Outgoing {
        channel_id: to.into(),
        channel_type: ruyi::protocol::ChannelType::Person,
        client_msg_no: client_msg_no.into(),
        flags: 0,
        payload: bytes::Bytes::copy_from_slice(body.as_bytes()),
    }
}

pub fn connect_packet(uid: &str, token: &str) -> Packet {
    Packet::Connect(ruyi::protocol::Connect {
        version: ruyi::protocol::PROTOCOL_VERSION,
        uid: uid.into(),
        token: token.into(),
        device_id: "raw".into(),
        device_flag: DeviceFlag::App,
        client_timestamp_ms: 0,
        resume: false,
    })
}

/// Starts `ruyi serve` as a child process on port 0 with 2 shards and the
/// RocksDB store in `dir`; returns it and its address (read from the line it
/// prints on stdout). For kill -9 tests.
pub fn spawn_gateway(dir: &Path) -> (std::process::Child, SocketAddr) {
    spawn_gateway_at(dir, "127.0.0.1:0")
}

/// Like [`spawn_gateway`], on a given address (to restart on the same one).
pub fn spawn_gateway_at(dir: &Path, listen: &str) -> (std::process::Child, SocketAddr) {
    let (child, addr, _) = spawn_gateway_with(dir, listen, &[]);
    (child, addr)
}

/// Like [`spawn_gateway_at`] with more arguments for `ruyi serve`; also
/// returns the admin API's address (port 0 unless the arguments say).
pub fn spawn_gateway_with(
    dir: &Path,
    listen: &str,
    extra: &[&str],
) -> (std::process::Child, SocketAddr, SocketAddr) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ruyi"))
        .args([
            "serve",
            "--listen",
            listen,
            "--shards",
            "2",
            "--http",
            "127.0.0.1:0",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .env("RUYI_AUTH_SECRET", SECRET)
        .env("RUYI_API_TOKEN", API_TOKEN)
        .env("RUYI_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ruyi serve starts");
    let stdout = child.stdout.take().unwrap();
    let mut stdout = std::io::BufReader::new(stdout);
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let api = line
        .trim()
        .strip_prefix("ruyi admin api on http://")
        .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
        .parse()
        .unwrap();
    (child, addr, api)
}

/// Connects an SDK client with a token.
pub async fn connect_to(addr: SocketAddr, uid: &str) -> (Client, Incoming) {
    connect(
        addr,
        ConnectOptions::new(uid).token(&token(uid)).resume(false),
    )
    .await
    .unwrap_or_else(|e| panic!("{uid} connects: {e}"))
}

/// Posts `body` to the admin API at `base` with the test token; returns
/// the status and the JSON answer.
pub async fn api_post(base: &str, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("token", API_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, json)
}

/// GETs `path` (with its query) from the admin API with the test token.
pub async fn api_get(base: &str, path: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .header("token", API_TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// One request a [`WebhookReceiver`] got.
#[derive(Debug, Clone)]
pub struct Hook {
    pub event: String,
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: bytes::Bytes,
    /// The status the receiver answered with.
    pub answered: u16,
}

impl Hook {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("webhook bodies are JSON")
    }

    /// Whether the Standard Webhooks signature is valid for `secret` (raw
    /// bytes), computed here independently of the server's code.
    pub fn signed_with(&self, secret: &[u8]) -> bool {
        use base64::Engine;
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{}.{}.", self.id, self.timestamp).as_bytes());
        mac.update(&self.body);
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        self.signature.split(' ').any(|s| s == expected)
    }
}

/// What a [`WebhookReceiver`] saw and how it answers, shared with its
/// handler.
#[derive(Default)]
struct ReceiverState {
    accepted: std::sync::Arc<std::sync::Mutex<Vec<Hook>>>,
    attempts: std::sync::Arc<std::sync::Mutex<Vec<Hook>>>,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    refuse_first: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A real HTTP webhook receiver on loopback that records every request
/// and answers with a status the test can change.
pub struct WebhookReceiver {
    pub url: String,
    /// The requests answered with 200, in arrival order.
    pub hooks: std::sync::Arc<std::sync::Mutex<Vec<Hook>>>,
    /// Every request, refused ones included, in arrival order.
    pub attempts: std::sync::Arc<std::sync::Mutex<Vec<Hook>>>,
    /// The status to answer with.
    pub status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    /// When set, the first request with a given event and body is
    /// answered 500 whatever `status` says, so every event is retried.
    pub refuse_first: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start() -> WebhookReceiver {
        use axum::extract::{Query, State};
        use std::sync::atomic::Ordering;
        type Shared = std::sync::Arc<ReceiverState>;
        async fn receive(
            State(state): State<Shared>,
            Query(query): Query<std::collections::HashMap<String, String>>,
            headers: axum::http::HeaderMap,
            body: bytes::Bytes,
        ) -> axum::http::StatusCode {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let mut hook = Hook {
                event: query.get("event").cloned().unwrap_or_default(),
                id: header("webhook-id"),
                timestamp: header("webhook-timestamp"),
                signature: header("webhook-signature"),
                body,
                answered: state.status.load(Ordering::SeqCst),
            };
            let mut attempts = state.attempts.lock().unwrap();
            // An event is known by what it carries, not by its id, which
            // is what tests check.
            if state.refuse_first.load(Ordering::SeqCst)
                && !attempts
                    .iter()
                    .any(|earlier| earlier.event == hook.event && earlier.body == hook.body)
            {
                hook.answered = 500;
            }
            attempts.push(hook.clone());
            if hook.answered == 200 {
                state.accepted.lock().unwrap().push(hook.clone());
            }
            axum::http::StatusCode::from_u16(hook.answered).unwrap()
        }
        let state = std::sync::Arc::new(ReceiverState::default());
        state.status.store(200, Ordering::SeqCst);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(std::sync::Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        WebhookReceiver {
            url,
            hooks: state.accepted.clone(),
            attempts: state.attempts.clone(),
            status: state.status.clone(),
            refuse_first: state.refuse_first.clone(),
            _task: task,
        }
    }

    /// Every recorded request of `event`.
    pub fn events(&self, event: &str) -> Vec<Hook> {
        self.hooks
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.event == event)
            .cloned()
            .collect()
    }

    /// Waits until `done` holds for the recorded requests (or panics after
    /// `WAIT`).
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Hook]) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT * 3;
        loop {
            if done(&self.hooks.lock().unwrap()) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; got {:?}",
                    self.hooks
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|h| (
                            h.event.clone(),
                            String::from_utf8_lossy(&h.body).into_owned()
                        ))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
