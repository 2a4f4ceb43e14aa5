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

    /// Connects until the kernel places the connection on `shard` (each
    /// shard has its own SO_REUSEPORT listener; the session id names the
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
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ruyi"))
        .args(["serve", "--listen", listen, "--shards", "2", "--data-dir"])
        .arg(dir)
        .env("RUYI_AUTH_SECRET", SECRET)
        .env("RUYI_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ruyi serve starts");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
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
