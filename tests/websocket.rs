//! The WebSocket listener: the binary protocol in binary messages, with the
//! same guarantees and limits as TCP, and the upgrade's own checks (path,
//! origin, timeout). The WebSocket side is a plain RFC 6455 client
//! (tungstenite) that speaks the protocol's frames, next to SDK clients
//! over TCP on the same gateway.

mod common;

use bytes::{Bytes, BytesMut};
use common::{connect_packet, token, TestServer, WAIT};
use ruyi::config::Config;
use ruyi::protocol::{
    ChannelType, Encoder, FrameDecoder, Packet, ReasonCode, SendPacket, VerifyLimits,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

const FRAME_MAX: usize = 64 * 1024;

fn with_ws(config: &mut Config) {
    config.ws.listen = "127.0.0.1:0".into();
    config.ws.path = "/chat".into();
    config.limits.frame_size_max_bytes = FRAME_MAX;
}

fn ws_addr(server: &TestServer) -> SocketAddr {
    server
        .handle()
        .ws_addr()
        .expect("the WebSocket listener is on")
}

/// A blocking WebSocket client that speaks the protocol's frames.
struct WsClient {
    ws: WebSocket<TcpStream>,
    decoder: FrameDecoder,
    received: BytesMut,
}

/// Upgrades on `path`, with `origin` if given.
fn upgrade(
    addr: SocketAddr,
    path: &str,
    origin: Option<&str>,
) -> Result<WsClient, tungstenite::Error> {
    let headers: Vec<(&str, String)> = origin
        .map(|o| ("origin", o.to_owned()))
        .into_iter()
        .collect();
    upgrade_with(addr, path, &headers)
}

/// Upgrades on `path` with these extra request headers.
fn upgrade_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
) -> Result<WsClient, tungstenite::Error> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut request =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}{path}"))?;
    for (name, value) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match tungstenite::client::client(request, stream) {
        Ok((ws, _)) => Ok(WsClient {
            ws,
            decoder: FrameDecoder::new(FRAME_MAX),
            received: BytesMut::new(),
        }),
        Err(tungstenite::HandshakeError::Failure(error)) => Err(error),
        Err(tungstenite::HandshakeError::Interrupted(_)) => unreachable!("a blocking stream"),
    }
}

fn encode(packet: &Packet) -> Bytes {
    let mut out = BytesMut::new();
    Encoder::new().encode(packet, &mut out);
    out.freeze()
}

impl WsClient {
    fn send_bytes(&mut self, bytes: Bytes) {
        self.ws.send(Message::Binary(bytes)).unwrap();
    }

    fn send_packet(&mut self, packet: &Packet) {
        self.send_bytes(encode(packet));
    }

    /// The next packet, read from as many binary messages as it takes.
    fn next_packet(&mut self) -> Option<Packet> {
        loop {
            if let Some(frame) = self.decoder.next_frame(&mut self.received).unwrap() {
                let limits = VerifyLimits::for_frame_size(FRAME_MAX);
                return Some(Packet::decode(&frame, &limits).unwrap());
            }
            match self.ws.read() {
                Ok(Message::Binary(data)) => self.received.extend_from_slice(&data),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(other) => panic!("the server sent {other:?}"),
            }
        }
    }

    /// Connects as `uid` and waits for the ConnAck.
    fn log_in(&mut self, uid: &str) {
        self.send_packet(&connect_packet(uid, &token(uid)));
        match self.next_packet() {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.reason, ReasonCode::Success),
            other => panic!("{uid}: {other:?}"),
        }
    }

    /// Reads until the server closes; its close code, if it sent one.
    fn close_code(&mut self) -> Option<CloseCode> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(Message::Close(frame)) => return frame.map(|f| f.code),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        panic!("the server did not close");
    }
}

fn send_to(to: &str, client_seq: u32, text: &str) -> Packet {
    Packet::Send(SendPacket {
        client_seq,
        client_msg_no: format!("ws-{client_seq}"),
        channel_id: to.to_owned(),
        channel_type: ChannelType::Person,
        flags: 0,
        payload: Bytes::copy_from_slice(text.as_bytes()),
    })
}

#[tokio::test]
async fn a_websocket_client_and_a_tcp_client_talk_through_one_gateway() {
    let server = TestServer::start_with(with_ws);
    let addr = ws_addr(&server);
    let (bob, mut bob_in) = server.connect("bob").await;
    let (ack_tx, ack_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let alice = std::thread::spawn(move || {
        let mut alice = upgrade(addr, "/chat", None).unwrap();
        alice.log_in("alice");
        alice.send_packet(&send_to("bob", 1, "hello from a browser"));
        let ack = match alice.next_packet() {
            Some(Packet::SendAck(ack)) => ack,
            other => panic!("{other:?}"),
        };
        ack_tx.send(ack).unwrap();
        go_rx.recv().unwrap();
        // Bob's answer comes live, over the WebSocket.
        match alice.next_packet() {
            Some(Packet::Recv(recv)) => recv,
            other => panic!("{other:?}"),
        }
    });
    let ack = tokio::task::spawn_blocking(move || ack_rx.recv_timeout(WAIT).unwrap())
        .await
        .unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);
    let got = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!(got.message_id, ack.message_id);
    assert_eq!(&got.payload[..], b"hello from a browser");
    let answer = bob.send_text("alice", "hello from TCP").await.unwrap();
    go_tx.send(()).unwrap();
    let recv = tokio::task::spawn_blocking(move || alice.join().unwrap())
        .await
        .unwrap();
    assert_eq!(recv.message_id, answer.message_id);
    assert_eq!(&recv.payload[..], b"hello from TCP");
    server.stop();
}

#[test]
fn frames_split_across_messages_or_packed_into_one_are_read_as_over_tcp() {
    let server = TestServer::start_with(with_ws);
    let mut alice = upgrade(ws_addr(&server), "/chat", None).unwrap();
    // The Connect in two messages, cut inside its length prefix.
    let connect = encode(&connect_packet("alice", &token("alice")));
    alice.send_bytes(connect.slice(..2));
    alice.send_bytes(connect.slice(2..));
    assert!(matches!(alice.next_packet(), Some(Packet::ConnAck(_))));
    // Two sends in one message.
    let mut both = BytesMut::new();
    both.extend_from_slice(&encode(&send_to("bob", 1, "one")));
    both.extend_from_slice(&encode(&send_to("bob", 2, "two")));
    alice.send_bytes(both.freeze());
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        match alice.next_packet() {
            Some(Packet::SendAck(ack)) => {
                assert_eq!(ack.reason, ReasonCode::Success);
                seqs.push(ack.message_seq);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seqs, vec![1, 2]);
    server.stop();
}

#[test]
fn a_text_message_closes_the_connection_with_1003() {
    let server = TestServer::start_with(with_ws);
    let mut eve = upgrade(ws_addr(&server), "/chat", None).unwrap();
    eve.log_in("eve");
    eve.ws.send(Message::Text("hello".into())).unwrap();
    assert_eq!(eve.close_code(), Some(CloseCode::Unsupported));
    server.stop();
}

#[test]
fn a_message_over_the_frame_limit_closes_the_connection_with_1009() {
    let server = TestServer::start_with(with_ws);
    let mut eve = upgrade(ws_addr(&server), "/chat", None).unwrap();
    eve.log_in("eve");
    eve.send_bytes(Bytes::from(vec![0u8; FRAME_MAX + 64]));
    assert_eq!(eve.close_code(), Some(CloseCode::Size));
    server.stop();
}

#[test]
fn an_upgrade_on_another_path_gets_404_and_from_an_origin_not_listed_403() {
    let server = TestServer::start_with(|c| {
        with_ws(c);
        c.ws.allowed_origins = vec!["https://chat.example.com".into()];
    });
    let addr = ws_addr(&server);
    let status = |result: Result<WsClient, tungstenite::Error>| match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{other}"),
        Ok(_) => 101,
    };
    assert_eq!(
        status(upgrade(
            addr,
            "/elsewhere",
            Some("https://chat.example.com")
        )),
        404
    );
    assert_eq!(
        status(upgrade(addr, "/chat", Some("https://evil.example.net"))),
        403
    );
    assert_eq!(status(upgrade(addr, "/chat", None)), 403);
    let mut alice = upgrade(addr, "/chat", Some("https://chat.example.com")).unwrap();
    alice.log_in("alice");
    server.stop();
}

#[test]
fn an_upgrade_that_does_not_finish_within_the_handshake_timeout_is_closed() {
    let server = TestServer::start_with(|c| {
        with_ws(c);
        c.limits.handshake_timeout_ms = 300;
    });
    let mut slow = TcpStream::connect(ws_addr(&server)).unwrap();
    slow.set_read_timeout(Some(WAIT)).unwrap();
    let started = Instant::now();
    // Half a request line, then nothing.
    slow.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(
        waited >= Duration::from_millis(250) && waited < WAIT,
        "closed after {waited:?}"
    );
    server.stop();
}

#[test]
fn an_unmasked_frame_from_a_client_closes_the_connection() {
    let server = TestServer::start_with(with_ws);
    let mut raw = TcpStream::connect(ws_addr(&server)).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw.write_all(
        b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        raw.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // A binary frame with no mask (RFC 6455: a server must close).
    let connect = encode(&connect_packet("eve", &token("eve")));
    let mut frame = vec![0x82, 126];
    frame.extend_from_slice(&(connect.len() as u16).to_be_bytes());
    frame.extend_from_slice(&connect);
    raw.write_all(&frame).unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    // Whatever the server wrote before closing, it is no ConnAck: at most a
    // close frame (opcode 8).
    assert!(
        rest.is_empty() || rest[0] == 0x88,
        "the server answered {rest:?}"
    );
    server.stop();
}

#[test]
fn a_secure_websocket_client_connects_through_the_tls_settings() {
    use std::sync::Arc;
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, generated.cert.pem()).unwrap();
    std::fs::write(&key_path, generated.key_pair.serialize_pem()).unwrap();
    let server = TestServer::start_with(|c| {
        with_ws(c);
        c.tls.cert_path = cert_path;
        c.tls.key_path = key_path;
    });
    let addr = ws_addr(&server);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(generated.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let request = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "wss://localhost:{}/chat",
        addr.port()
    ))
    .unwrap();
    let (mut ws, _) = tungstenite::client::client(request, rustls::StreamOwned::new(tls, tcp))
        .unwrap_or_else(|e| panic!("wss upgrade: {e}"));
    ws.send(Message::Binary(encode(&connect_packet(
        "alice",
        &token("alice"),
    ))))
    .unwrap();
    let mut received = BytesMut::new();
    let decoder = FrameDecoder::new(FRAME_MAX);
    let frame = loop {
        if let Some(frame) = decoder.next_frame(&mut received).unwrap() {
            break frame;
        }
        match ws.read().unwrap() {
            Message::Binary(data) => received.extend_from_slice(&data),
            other => panic!("{other:?}"),
        }
    };
    let limits = VerifyLimits::for_frame_size(FRAME_MAX);
    assert!(matches!(
        Packet::decode(&frame, &limits).unwrap(),
        Packet::ConnAck(ack) if ack.reason == ReasonCode::Success
    ));
    server.stop();
}

#[test]
fn upgrades_over_the_per_ip_accept_rate_are_answered_429_in_http() {
    let server = TestServer::start_with(|c| {
        with_ws(c);
        c.limits.accepts_per_ip_per_second = 4;
    });
    let addr = ws_addr(&server);
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(match upgrade(addr, "/chat", None) {
            Ok(_) => 101,
            Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
            Err(other) => panic!("{other}"),
        });
    }
    assert!(statuses.contains(&101), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 101 || *s == 429),
        "{statuses:?}"
    );
    server.stop();
}

/// Upgrade statuses for `count` attempts, the `i`th with these headers.
fn statuses(
    addr: SocketAddr,
    count: usize,
    headers: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> Vec<u16> {
    (0..count)
        .map(|i| match upgrade_with(addr, "/chat", &headers(i)) {
            Ok(_) => 101,
            Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
            Err(other) => panic!("{other}"),
        })
        .collect()
}

#[test]
fn behind_a_trusted_proxy_the_per_ip_rate_counts_the_forwarded_client() {
    let server = TestServer::start_with(|c| {
        with_ws(c);
        c.limits.accepts_per_ip_per_second = 4;
        c.ws.trusted_proxies = vec!["127.0.0.1".into()];
    });
    let addr = ws_addr(&server);
    let many = statuses(addr, 40, |i| {
        vec![("x-forwarded-for", format!("203.0.113.{}", i + 1))]
    });
    assert!(many.iter().all(|s| *s == 101), "40 clients: {many:?}");
    let one = statuses(addr, 40, |_| {
        vec![("x-forwarded-for", "198.51.100.9".to_owned())]
    });
    assert!(one.contains(&429), "one client 40 times: {one:?}");
    server.stop();
}

#[test]
fn without_trusted_proxies_a_forwarded_header_changes_nothing() {
    let server = TestServer::start_with(|c| {
        with_ws(c);
        c.limits.accepts_per_ip_per_second = 4;
    });
    let many = statuses(ws_addr(&server), 40, |i| {
        vec![("x-forwarded-for", format!("203.0.113.{}", i + 1))]
    });
    assert!(many.contains(&429), "{many:?}");
    server.stop();
}
