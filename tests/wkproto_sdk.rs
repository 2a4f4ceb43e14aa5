//! WuKongIM's own JS SDK (`wukongimjssdk` 1.0.4, protocol version 2,
//! unchanged) against ruyi's WKProto WebSocket listener, next to native
//! clients on the same gateway. Each SDK user is a Node process running
//! `tests/wkproto_sdk/agent.mjs` (the SDK is a singleton), driven over its
//! stdin and stdout. The npm packages come from
//! `tests/wkproto_sdk/package-lock.json` (`npm ci --prefix tests/wkproto_sdk`,
//! part of the README's test command).

mod common;

use common::{token, TestServer, WebhookReceiver, WAIT};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

fn sdk_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/wkproto_sdk");
    assert!(
        dir.join("node_modules/wukongimjssdk").exists(),
        "WuKongIM's SDK is not installed: run `npm ci --prefix tests/wkproto_sdk` \
         (the README's test command does)"
    );
    dir
}

/// One SDK user in its own Node process.
struct Agent {
    uid: String,
    child: Child,
    stdin: ChildStdin,
    events: mpsc::Receiver<Value>,
    /// Every event seen, for failure messages.
    seen: Vec<Value>,
}

impl Agent {
    fn start(addr: SocketAddr, uid: &str) -> Agent {
        let mut child = Command::new("node")
            .arg("agent.mjs")
            .current_dir(sdk_dir())
            .env("RUYI_WK_ADDR", format!("ws://{addr}"))
            .env("RUYI_WK_UID", uid)
            .env("RUYI_WK_TOKEN", token(uid))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs (Node 20 is on the machines; see the README)");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(json) = line.strip_prefix("@@ ") {
                    let _ = tx.send(serde_json::from_str(json).unwrap());
                }
            }
        });
        let mut agent = Agent {
            uid: uid.to_owned(),
            child,
            stdin,
            events,
            seen: Vec::new(),
        };
        agent.wait_for("connected", |e| e["event"] == "status" && e["status"] == 1);
        agent
    }

    /// The first event (from now) that `matches`.
    fn wait_for(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    self.seen.push(event.clone());
                    if matches(&event) {
                        return event;
                    }
                }
                Err(_) => panic!(
                    "{}: no {what} within {WAIT:?}; saw {:?}",
                    self.uid, self.seen
                ),
            }
        }
    }

    /// Every event within `quiet`.
    fn events_within(&mut self, quiet: Duration) -> Vec<Value> {
        let deadline = Instant::now() + quiet;
        let mut got = Vec::new();
        while let Ok(event) = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(event.clone());
            got.push(event);
        }
        got
    }

    /// Sends `text` and returns its SENDACK event.
    fn send(&mut self, to: &str, channel_type: u8, text: &str) -> Value {
        self.command(json!({"op": "send", "to": to, "type": channel_type, "text": text}));
        let sent = self.wait_for("sent", |e| e["event"] == "sent");
        let seq = sent["clientSeq"].clone();
        self.wait_for("its sendack", |e| {
            e["event"] == "sendack" && e["clientSeq"] == seq
        })
    }

    fn command(&mut self, command: Value) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn message(&mut self) -> Value {
        self.wait_for("a message", |e| e["event"] == "message")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "exit"}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_wkproto_ws(config: &mut ruyi::Config) {
    config.wkproto.ws_listen = "127.0.0.1:0".into();
}

fn wk_addr(server: &TestServer) -> SocketAddr {
    server.handle().wkproto_ws_addr().unwrap()
}

/// The app's message content as WuKongIM's SDK encodes a text.
fn text_payload(text: &str) -> String {
    json!({"content": text, "type": 1}).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn wukongims_sdk_and_a_native_client_talk_both_ways() {
    let server = TestServer::start_with(with_wkproto_ws);
    let addr = wk_addr(&server);
    let (bob, mut bob_in) = server.connect("bob").await;
    let mut alice = tokio::task::spawn_blocking(move || Agent::start(addr, "alice"))
        .await
        .unwrap();
    let ack = tokio::task::spawn_blocking(move || {
        let ack = alice.send("bob", 1, "hello bob");
        (alice, ack)
    })
    .await
    .unwrap();
    let (mut alice, ack) = ack;
    assert_eq!(ack["reason"], 1, "{ack}");
    let got = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!(got.from_uid, "alice");
    let content: Value = serde_json::from_slice(&got.payload).unwrap();
    assert_eq!(content["content"], "hello bob");
    assert_eq!(got.message_id.to_string(), ack["id"].as_str().unwrap());
    let reply = bob
        .send(common::text("alice", "b1", &text_payload("hi alice")))
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let message = alice.message();
        assert_eq!(message["from"], "bob");
        assert_eq!(message["channel"], "bob");
        assert_eq!(message["text"], "hi alice");
        assert_eq!(message["seq"], reply.message_seq);
        assert_eq!(message["id"], reply.message_id.to_string());
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn wukongims_sdk_users_talk_one_to_one_and_in_a_group_with_native_members() {
    let server = TestServer::start_with(with_wkproto_ws);
    let addr = wk_addr(&server);
    server
        .control()
        .create_group("team", &["alice", "bob", "carol"])
        .await
        .unwrap();
    let (_bob, mut bob_in) = server.connect("bob").await;
    let (alice, carol) = tokio::task::spawn_blocking(move || {
        let mut alice = Agent::start(addr, "alice");
        let mut carol = Agent::start(addr, "carol");
        assert_eq!(alice.send("team", 2, "hello team")["reason"], 1);
        let message = carol.message();
        assert_eq!(
            (
                &message["channel"],
                &message["type"],
                &message["from"],
                &message["text"]
            ),
            (
                &json!("team"),
                &json!(2),
                &json!("alice"),
                &json!("hello team")
            )
        );
        assert_eq!(carol.send("alice", 1, "just you")["reason"], 1);
        let message = alice.message();
        assert_eq!(
            (&message["channel"], &message["from"], &message["text"]),
            (&json!("carol"), &json!("carol"), &json!("just you"))
        );
        (alice, carol)
    })
    .await
    .unwrap();
    let got = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!(
        (got.channel_id.as_str(), got.from_uid.as_str()),
        ("team", "alice")
    );
    drop((alice, carol));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sdks_recvack_is_honoured_so_nothing_comes_back() {
    let server = TestServer::start_with(|c| {
        with_wkproto_ws(c);
        c.delivery.retry_interval_ms = 300;
        c.delivery.retry_tick_ms = 20;
        c.delivery.retry_jitter_percent = 0;
    });
    let addr = wk_addr(&server);
    let mut alice = tokio::task::spawn_blocking(move || Agent::start(addr, "alice"))
        .await
        .unwrap();
    let (bob, _bob_in) = server.connect("bob").await;
    for i in 0..3 {
        bob.send(common::text(
            "alice",
            &format!("b{i}"),
            &text_payload("once"),
        ))
        .await
        .unwrap();
    }
    tokio::task::spawn_blocking(move || {
        for seq in 1..=3 {
            assert_eq!(alice.message()["seq"], seq);
        }
        // Well past the retry interval: no redelivery of what was acked.
        let later = alice.events_within(Duration::from_millis(1500));
        assert!(
            later.iter().all(|e| e["event"] != "message"),
            "redelivered: {later:?}"
        );
    })
    .await
    .unwrap();
}

/// A TCP proxy that, when armed, drops the next bytes from the server
/// and closes the connection (the answer to a SEND is lost).
struct CuttingProxy {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
}

impl CuttingProxy {
    fn start(upstream: SocketAddr) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&armed);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let server = TcpStream::connect(upstream).unwrap();
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(std::net::Shutdown::Both);
                });
                let flag = Arc::clone(&flag);
                std::thread::spawn(move || {
                    let (mut s_read, mut c_write) = (server, client);
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if flag.swap(false, Ordering::SeqCst) {
                                    break;
                                }
                                if c_write.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                    let _ = s_read.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingProxy { addr, armed }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_send_whose_answer_was_lost_is_resent_by_the_sdk_and_stored_once() {
    let server = TestServer::start_with(with_wkproto_ws);
    let proxy = CuttingProxy::start(wk_addr(&server));
    let (_bob, mut bob_in) = server.connect("bob").await;
    let addr = proxy.addr;
    let armed = Arc::clone(&proxy.armed);
    let ack = tokio::task::spawn_blocking(move || {
        let mut alice = Agent::start(addr, "alice");
        // The SENDACK is lost with the connection; the SDK reconnects
        // (after 3 s) and sends the same clientSeq and clientMsgNo again.
        armed.store(true, Ordering::SeqCst);
        let ack = alice.send("bob", 1, "exactly once");
        let reconnects = alice
            .seen
            .iter()
            .filter(|e| e["event"] == "status" && e["status"] == 1)
            .count();
        assert_eq!(reconnects, 2, "connected twice: {:?}", alice.seen);
        ack
    })
    .await
    .unwrap();
    assert_eq!(
        (ack["reason"].clone(), ack["seq"].clone()),
        (json!(1), json!(1))
    );
    let got = bob_in.next_message(WAIT).await.unwrap();
    assert_eq!(got.message_seq, 1);
    common::assert_nothing_arrives(&mut bob_in, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_report_the_sdk_users_messages_and_their_offline_recipients() {
    let receiver = WebhookReceiver::start().await;
    let url = receiver.url.clone();
    let server = TestServer::start_with(move |c| {
        with_wkproto_ws(c);
        c.webhook.url = url;
        c.webhook.secret = "wkproto-hook-secret".into();
        c.webhook.retry_initial_ms = 50;
        c.webhook.retry_max_ms = 500;
    });
    let addr = wk_addr(&server);
    let (alice, ack) = tokio::task::spawn_blocking(move || {
        let mut alice = Agent::start(addr, "alice");
        let ack = alice.send("dave", 1, "are you there?");
        (alice, ack)
    })
    .await
    .unwrap();
    assert_eq!(ack["reason"], 1);
    let id: u64 = ack["id"].as_str().unwrap().parse().unwrap();
    receiver
        .wait_for("msg.offline and msg.notify", |hooks| {
            hooks
                .iter()
                .any(|h| h.event == "msg.offline" && h.json()["message_id"].as_u64() == Some(id))
                && hooks.iter().any(|h| {
                    h.event == "msg.notify"
                        && h.json()
                            .as_array()
                            .is_some_and(|m| m.iter().any(|m| m["message_id"].as_u64() == Some(id)))
                })
        })
        .await;
    let offline: Vec<Value> = receiver
        .events("msg.offline")
        .iter()
        .map(|h| h.json())
        .filter(|b| b["message_id"].as_u64() == Some(id))
        .collect();
    assert_eq!(offline.len(), 1);
    assert_eq!(
        offline[0]["to_uids"],
        json!(["dave"]),
        "the offline user, not the sender"
    );
    assert_eq!(offline[0]["from_uid"], "alice");
    drop(alice);
}
