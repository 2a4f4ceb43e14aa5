//! WuKongIM's protocol (WKProto) on its own listeners, TCP and WebSocket:
//! a WKProto client (built here from ruyi's codec and crypto, the way
//! WuKongIM's SDK behaves) talks to native SDK clients through one gateway,
//! with the same guarantees. The real WuKongIM JS SDK is driven against
//! the gateway in `tests/wkproto_sdk.rs`.

mod common;

use bytes::{Bytes, BytesMut};
use common::{token, TestServer, WAIT};
use ruyi::config::Config;
use ruyi::wkproto::codec::{self, reason, Flags, Packet as Wk};
use ruyi::wkproto::crypto::{Cipher, Handshake};
use ruyi::wkproto::translate::{recv_sign, send_sign};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn with_wkproto(config: &mut Config) {
    config.wkproto.listen = "127.0.0.1:0".into();
    config.wkproto.ws_listen = "127.0.0.1:0".into();
}

/// A blocking WKProto client over TCP or WebSocket.
struct WkClient {
    io: Transport,
    version: u8,
    handshake: Handshake,
    cipher: Option<Cipher>,
    received: BytesMut,
    client_seq: u32,
    /// WebSocket messages read, and packets in them (one each expected).
    messages: Vec<usize>,
}

enum Transport {
    Tcp(TcpStream),
    Ws(Box<tungstenite::WebSocket<TcpStream>>),
}

impl WkClient {
    fn tcp(addr: SocketAddr) -> WkClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        WkClient::over(Transport::Tcp(stream))
    }

    fn ws(addr: SocketAddr, path: &str) -> WkClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (ws, _) = tungstenite::client(format!("ws://{addr}{path}"), stream).unwrap();
        WkClient::over(Transport::Ws(Box::new(ws)))
    }

    fn over(io: Transport) -> WkClient {
        WkClient {
            io,
            version: 2,
            handshake: Handshake::new().unwrap(),
            cipher: None,
            received: BytesMut::new(),
            client_seq: 0,
            messages: Vec::new(),
        }
    }

    fn write(&mut self, packet: &Wk) {
        let mut out = BytesMut::new();
        codec::encode(packet, self.version.min(codec::VERSION_MAX), &mut out).unwrap();
        self.write_raw(&out);
    }

    fn write_raw(&mut self, bytes: &[u8]) {
        match &mut self.io {
            Transport::Tcp(stream) => stream.write_all(bytes).unwrap(),
            Transport::Ws(ws) => ws
                .send(tungstenite::Message::Binary(Bytes::copy_from_slice(bytes)))
                .unwrap(),
        }
    }

    /// The next packet, or `None` when the server closed the connection.
    fn read(&mut self) -> Option<Wk> {
        let deadline = Instant::now() + WAIT;
        loop {
            let version = self.version.min(codec::VERSION_MAX);
            if let Some(packet) = codec::decode(&mut self.received, version, 1 << 20).unwrap() {
                if let Wk::ConnAck(ack) = &packet {
                    if ack.reason == reason::SUCCESS {
                        let salt: [u8; 16] = ack.salt.as_bytes().try_into().unwrap();
                        self.cipher = Some(self.handshake.agree(&ack.server_key, salt).unwrap());
                    }
                }
                return Some(packet);
            }
            assert!(Instant::now() < deadline, "no packet within {WAIT:?}");
            match &mut self.io {
                Transport::Tcp(stream) => {
                    let mut buf = [0u8; 4096];
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => self.received.extend_from_slice(&buf[..n]),
                    }
                }
                Transport::Ws(ws) => match ws.read() {
                    Ok(tungstenite::Message::Binary(data)) => {
                        let mut one = BytesMut::from(&data[..]);
                        let mut count = 0;
                        while codec::decode(&mut one, version, 1 << 20).unwrap().is_some() {
                            count += 1;
                        }
                        self.messages.push(count);
                        self.received.extend_from_slice(&data);
                    }
                    Ok(_) => {}
                    Err(_) => return None,
                },
            }
        }
    }

    /// Reads until a packet that is not a PONG.
    fn read_packet(&mut self) -> Wk {
        loop {
            match self.read() {
                Some(Wk::Pong) => continue,
                Some(packet) => return packet,
                None => panic!("the server closed the connection"),
            }
        }
    }

    fn connect(&mut self, version: u8, uid: &str, token: &str) -> codec::ConnAck {
        self.version = version;
        let device: String = (0..32).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let key = self.handshake.server_key();
        self.write(&Wk::Connect(codec::Connect {
            version,
            device_flag: 1,
            device_id: format!("{device}W"),
            uid: uid.into(),
            token: token.into(),
            client_timestamp_ms: 0,
            client_key: key,
        }));
        match self.read_packet() {
            Wk::ConnAck(ack) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn send(&mut self, to: &str, channel_type: u8, client_msg_no: &str, text: &str) -> u32 {
        self.client_seq += 1;
        self.send_with_seq(
            self.client_seq,
            to,
            channel_type,
            client_msg_no,
            text,
            false,
        );
        self.client_seq
    }

    fn send_with_seq(
        &mut self,
        client_seq: u32,
        to: &str,
        channel_type: u8,
        client_msg_no: &str,
        text: &str,
        bad_key: bool,
    ) {
        let cipher = self.cipher.as_ref().expect("connected");
        let mut send = codec::Send {
            flags: Flags {
                red_dot: true,
                ..Flags::default()
            },
            setting: 0,
            client_seq,
            client_msg_no: client_msg_no.into(),
            stream_no: None,
            channel_id: to.into(),
            channel_type,
            expire: 0,
            msg_key: String::new(),
            topic: None,
            payload: Bytes::from(cipher.seal(text.as_bytes())),
        };
        send.msg_key = if bad_key {
            "0".repeat(32)
        } else {
            cipher.msg_key(&send_sign(&send))
        };
        self.write(&Wk::Send(send));
    }

    fn sendack(&mut self) -> codec::SendAck {
        match self.read_packet() {
            Wk::SendAck(ack) => ack,
            other => panic!("expected SENDACK, got {other:?}"),
        }
    }

    /// The next RECV, its msgKey checked and its payload decrypted.
    fn recv(&mut self) -> (codec::Recv, String) {
        match self.read_packet() {
            Wk::Recv(recv) => {
                let cipher = self.cipher.as_ref().unwrap();
                assert_eq!(cipher.msg_key(&recv_sign(&recv)), recv.msg_key, "msgKey");
                let text = String::from_utf8(cipher.open(&recv.payload).unwrap()).unwrap();
                (recv, text)
            }
            other => panic!("expected RECV, got {other:?}"),
        }
    }

    fn ack(&mut self, recv: &codec::Recv) {
        self.write(&Wk::RecvAck(codec::RecvAck {
            flags: recv.flags,
            message_id: recv.message_id,
            message_seq: recv.message_seq,
        }));
    }

    /// Nothing but PONGs for `quiet`.
    fn assert_quiet(&mut self, quiet: Duration) {
        if let Transport::Tcp(stream) = &mut self.io {
            stream.set_read_timeout(Some(quiet)).unwrap();
            let mut buf = [0u8; 256];
            match stream.read(&mut buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                other => panic!("expected nothing, read {other:?}"),
            }
            stream.set_read_timeout(Some(WAIT)).unwrap();
        }
    }
}

const JSON_HELLO: &str = r#"{"content":"hello","type":1}"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_wkproto_user_and_a_native_user_talk_both_ways() {
    let server = TestServer::start_with(with_wkproto);
    let addr = server.handle().wkproto_addr().unwrap();
    let (bob, mut bob_in) = server.connect("bob").await;
    let alice = tokio::task::spawn_blocking(move || {
        let mut alice = WkClient::tcp(addr);
        let ack = alice.connect(2, "alice", &token("alice"));
        assert_eq!(ack.reason, reason::SUCCESS);
        assert_eq!(ack.server_version, None, "no version byte for a v2 client");
        alice.send("bob", 1, "m1", JSON_HELLO);
        let ack = alice.sendack();
        assert_eq!((ack.reason, ack.message_seq), (reason::SUCCESS, 1));
        alice
    })
    .await
    .unwrap();
    let got = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!(got.from_uid, "alice");
    assert_eq!(
        &got.payload[..],
        JSON_HELLO.as_bytes(),
        "stored as plaintext"
    );
    let reply = r#"{"content":"hi alice","type":1}"#;
    let sent = bob.send(common::text("alice", "b1", reply)).await.unwrap();
    tokio::task::spawn_blocking(move || {
        let mut alice = alice;
        let (recv, text) = alice.recv();
        assert_eq!(text, reply);
        assert_eq!(
            (recv.from_uid.as_str(), recv.channel_id.as_str()),
            ("bob", "bob")
        );
        assert_eq!(recv.message_id as u64, sent.message_id);
        assert_eq!(recv.message_seq, 2);
        assert!(recv.flags.red_dot || !recv.flags.dup);
        alice.ack(&recv);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_version_from_2_to_6_connects_and_sends_in_its_own_layout() {
    let server = TestServer::start_with(with_wkproto);
    let addr = server.handle().wkproto_addr().unwrap();
    let (_bob, mut bob_in) = server.connect("bob").await;
    for version in 2..=6u8 {
        let uid = format!("v{version}");
        let sent = tokio::task::spawn_blocking(move || {
            let mut client = WkClient::tcp(addr);
            let ack = client.connect(version, &uid, &token(&uid));
            assert_eq!(ack.reason, reason::SUCCESS);
            assert_eq!(
                ack.server_version,
                (version > 3).then_some(version),
                "version {version}"
            );
            client.send("bob", 1, &format!("m{version}"), JSON_HELLO);
            client.sendack()
        })
        .await
        .unwrap();
        assert_eq!(sent.reason, reason::SUCCESS, "version {version}");
        let got = bob_in.next_message(WAIT).await.unwrap();
        assert_eq!(got.from_uid, format!("v{version}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_message_reaches_wkproto_and_native_members() {
    let server = TestServer::start_with(with_wkproto);
    let addr = server.handle().wkproto_addr().unwrap();
    server
        .control()
        .create_group("team", &["alice", "bob", "carol"])
        .await
        .unwrap();
    let (_bob, mut bob_in) = server.connect("bob").await;
    let mut carol = tokio::task::spawn_blocking(move || {
        let mut carol = WkClient::tcp(addr);
        carol.connect(5, "carol", &token("carol"));
        carol
    })
    .await
    .unwrap();
    let alice = tokio::task::spawn_blocking(move || {
        let mut alice = WkClient::tcp(addr);
        alice.connect(3, "alice", &token("alice"));
        alice.send("team", 2, "g1", JSON_HELLO);
        assert_eq!(alice.sendack().reason, reason::SUCCESS);
        alice
    })
    .await
    .unwrap();
    let got = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!(
        (got.channel_id.as_str(), got.from_uid.as_str()),
        ("team", "alice")
    );
    tokio::task::spawn_blocking(move || {
        let (recv, text) = carol.recv();
        assert_eq!(text, JSON_HELLO);
        assert_eq!((recv.channel_id.as_str(), recv.channel_type), ("team", 2));
        carol.ack(&recv);
        drop(alice);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recv_not_acknowledged_comes_back_flagged_dup_and_never_after_the_recvack() {
    let server = TestServer::start_with(|c| {
        with_wkproto(c);
        c.delivery.retry_interval_ms = 300;
        c.delivery.retry_tick_ms = 20;
        c.delivery.retry_jitter_percent = 0;
    });
    let addr = server.handle().wkproto_addr().unwrap();
    let mut alice = tokio::task::spawn_blocking(move || {
        let mut alice = WkClient::tcp(addr);
        alice.connect(2, "alice", &token("alice"));
        alice
    })
    .await
    .unwrap();
    let (bob, _bob_in) = server.connect("bob").await;
    bob.send(common::text("alice", "b1", JSON_HELLO))
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let (first, _) = alice.recv();
        assert!(!first.flags.dup, "a first push carries no DUP");
        let (again, text) = alice.recv();
        assert!(again.flags.dup, "a redelivery carries DUP");
        assert_eq!(
            (again.message_id, again.message_seq),
            (first.message_id, first.message_seq)
        );
        assert_eq!(text, JSON_HELLO);
        alice.ack(&again);
        alice.assert_quiet(Duration::from_millis(1200));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_send_with_a_bad_msg_key_is_refused_and_stores_nothing() {
    let server = TestServer::start_with(with_wkproto);
    let addr = server.handle().wkproto_addr().unwrap();
    let (_bob, mut bob_in) = server.connect("bob").await;
    tokio::task::spawn_blocking(move || {
        let mut alice = WkClient::tcp(addr);
        alice.connect(2, "alice", &token("alice"));
        alice.send_with_seq(1, "bob", 1, "bad", JSON_HELLO, true);
        let ack = alice.sendack();
        assert_eq!(
            (ack.client_seq, ack.reason),
            (1, reason::PAYLOAD_DECODE_ERROR)
        );
        // An undecryptable payload is refused the same way.
        alice.write(&Wk::Send(codec::Send {
            flags: Flags::default(),
            setting: 0,
            client_seq: 2,
            client_msg_no: "garbage".into(),
            stream_no: None,
            channel_id: "bob".into(),
            channel_type: 1,
            expire: 0,
            msg_key: "x".into(),
            topic: None,
            payload: Bytes::from_static(b"not base64 at all"),
        }));
        assert_eq!(alice.sendack().reason, reason::PAYLOAD_DECODE_ERROR);
        alice.send("bob", 1, "good", JSON_HELLO);
        let ack = alice.sendack();
        assert_eq!(
            (ack.reason, ack.message_seq),
            (reason::SUCCESS, 1),
            "nothing was stored before"
        );
    })
    .await
    .unwrap();
    let got = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!(got.client_msg_no, "good");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_send_resent_after_a_reconnect_is_stored_once() {
    let server = TestServer::start_with(with_wkproto);
    let addr = server.handle().wkproto_addr().unwrap();
    let (_bob, mut bob_in) = server.connect("bob").await;
    let (first, again) = tokio::task::spawn_blocking(move || {
        let mut alice = WkClient::tcp(addr);
        alice.connect(2, "alice", &token("alice"));
        alice.send_with_seq(1, "bob", 1, "once", JSON_HELLO, false);
        let first = alice.sendack();
        drop(alice);
        // The SDK reconnects with a new key and device id and resends
        // what it holds under the same clientSeq and clientMsgNo.
        let mut alice = WkClient::tcp(addr);
        alice.connect(2, "alice", &token("alice"));
        alice.send_with_seq(1, "bob", 1, "once", JSON_HELLO, false);
        (first, alice.sendack())
    })
    .await
    .unwrap();
    assert_eq!(first.reason, reason::SUCCESS);
    assert_eq!(
        (again.reason, again.message_id, again.message_seq),
        (reason::SUCCESS, first.message_id, first.message_seq)
    );
    bob_in.next_message(WAIT).await.unwrap();
    common::assert_nothing_arrives(&mut bob_in, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_token_gets_a_connack_with_auth_fail_and_the_end() {
    let server = TestServer::start_with(with_wkproto);
    let addr = server.handle().wkproto_addr().unwrap();
    tokio::task::spawn_blocking(move || {
        let mut mallory = WkClient::tcp(addr);
        let ack = mallory.connect(2, "mallory", "not-a-token");
        assert_eq!(ack.reason, reason::AUTH_FAIL);
        assert!(mallory.read().is_none(), "the connection is closed");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_before_connect_gets_a_refusal_not_a_hang() {
    let server = TestServer::start_with(with_wkproto);
    let addr = server.handle().wkproto_addr().unwrap();
    tokio::task::spawn_blocking(move || {
        let mut client = WkClient::tcp(addr);
        client.write_raw(&[0xf0, 0x00, 0x00]);
        let Some(Wk::ConnAck(ack)) = client.read() else {
            panic!("expected a refusing CONNACK");
        };
        assert_eq!(ack.reason, reason::SYSTEM_ERROR);
        assert!(client.read().is_none());
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_websocket_listener_takes_any_path_and_sends_one_packet_per_message() {
    let server = TestServer::start_with(with_wkproto);
    let addr = server.handle().wkproto_ws_addr().unwrap();
    let (bob, _bob_in) = server.connect("bob").await;
    let mut alice = tokio::task::spawn_blocking(move || {
        let mut alice = WkClient::ws(addr, "/any/path");
        assert_eq!(
            alice.connect(2, "alice", &token("alice")).reason,
            reason::SUCCESS
        );
        alice
    })
    .await
    .unwrap();
    for i in 0..5 {
        bob.send(common::text("alice", &format!("b{i}"), JSON_HELLO))
            .await
            .unwrap();
    }
    tokio::task::spawn_blocking(move || {
        for i in 0..5 {
            let (recv, text) = alice.recv();
            assert_eq!((recv.message_seq, text.as_str()), (i + 1, JSON_HELLO));
            alice.ack(&recv);
        }
        assert!(
            alice.messages.iter().all(|&count| count == 1),
            "packets per message: {:?}",
            alice.messages
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn route_answers_where_wukongim_apps_connect() {
    let server = TestServer::start_with(with_wkproto);
    let tcp = server.handle().wkproto_addr().unwrap();
    let ws = server.handle().wkproto_ws_addr().unwrap();
    let base = server.api_url();
    let (status, body) = common::api_get(&base, "/route?uid=alice").await;
    assert_eq!(status, 200, "{body}");
    let route: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        route,
        serde_json::json!({"tcp_addr": tcp.to_string(), "ws_addr": format!("ws://{ws}"), "wss_addr": ""})
    );
    let (_, body) = common::api_get(&base, "/route?uid=alice&intranet=1").await;
    let route: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(route["ws_addr"], "");
    let (status, batch) =
        common::api_post(&base, "/route/batch", serde_json::json!(["alice", "bob"])).await;
    assert_eq!(status, 200);
    assert_eq!(batch[0]["uids"], serde_json::json!(["alice", "bob"]));
    assert_eq!(batch[0]["tcp_addr"], tcp.to_string());
    // Configured public addresses win.
    let server = TestServer::start_with(|c| {
        with_wkproto(c);
        c.wkproto.route_tcp_addr = "im.example.com:5100".into();
        c.wkproto.route_wss_addr = "wss://im.example.com/ws".into();
    });
    let (_, body) = common::api_get(&server.api_url(), "/route").await;
    let route: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(route["tcp_addr"], "im.example.com:5100");
    assert_eq!(route["wss_addr"], "wss://im.example.com/ws");
}
