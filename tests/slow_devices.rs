//! A device that stops reading does not hold the server's memory or its
//! other users hostage.

mod common;

use bytes::Bytes;
use common::{connect_packet, token, TestServer, WAIT};
use ruyi::client::Outgoing;
use ruyi::protocol::{ChannelType, Packet, ReasonCode};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn a_device_that_stops_reading_is_cut_off_after_the_write_stall_timeout() {
    let server = TestServer::start_with(|c| {
        c.limits.write_stall_timeout_ms = 500;
        c.limits.outbound_buffer_max_bytes = 256 * 1024 * 1024;
        // A window wider than the socket buffers, so the socket is what
        // stops taking bytes.
        c.limits.inflight_bytes_max = 64 * 1024 * 1024;
        c.limits.inflight_messages_max = 1000;
    });
    // Bob connects with a tiny receive buffer and then never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let mut bob = common::RawClient::from_stream(stream);
    bob.send_packet(&connect_packet("bob", &token("bob"))).await;
    assert!(matches!(bob.next_packet().await, Some(Packet::ConnAck(_))));

    let (alice, _a) = server.connect("alice").await;
    for i in 0..120 {
        let ack = alice
            .send(Outgoing {
                channel_id: "bob".into(),
                channel_type: ChannelType::Person,
                client_msg_no: format!("big-{i}"),
                flags: 0,
                payload: Bytes::from(vec![b'x'; 60_000]),
            })
            .await
            .unwrap();
        assert_eq!(ack.reason, ReasonCode::Success, "the sender is not held up");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Bob's connection was cut: reading now drains what the kernel held and
    // then ends, instead of waiting for the rest of the 7 MB.
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0usize;
    loop {
        assert!(
            Instant::now() < deadline,
            "bob's connection was never closed"
        );
        match tokio::time::timeout(Duration::from_secs(2), bob.stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => read += n,
            Err(_) => panic!("bob's connection is still open after {read} bytes"),
        }
    }
    assert!(read < 120 * 60_000, "cut off before everything was written");
    // Alice is unaffected.
    let ack = alice.send_text("carol", "still fine").await.unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_100000_messages_behind_costs_a_window_of_memory_and_gets_all_in_order() {
    const MESSAGES: u64 = 100_000;
    const PAYLOAD: usize = 1000;
    let server = TestServer::start_with(|c| {
        c.storage.sync = ruyi::config::SyncMode::Never;
        // Alice is a bulk loader here (100 MB as fast as possible), not a
        // chat client: her connection is not rate-limited.
        c.limits.bytes_per_second_per_connection = 0;
        c.limits.frames_per_second_per_connection = 0;
    });
    let (alice, _a) = server.connect("alice").await;
    // 100,000 one-kilobyte messages to bob, who is offline: 100 MB if they
    // were buffered per device.
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..MESSAGES {
        let alice = alice.clone();
        sends.spawn(async move {
            alice
                .send(Outgoing {
                    channel_id: "bob".into(),
                    channel_type: ChannelType::Person,
                    client_msg_no: format!("m{i}"),
                    flags: 0,
                    payload: Bytes::from(vec![b'x'; PAYLOAD]),
                })
                .await
        });
        while sends.len() >= 256 {
            let ack = sends.join_next().await.unwrap().unwrap().unwrap();
            assert_eq!(ack.reason, ReasonCode::Success);
        }
    }
    while let Some(ack) = sends.join_next().await {
        assert_eq!(ack.unwrap().unwrap().reason, ReasonCode::Success);
    }
    let baseline = resident_bytes();

    // Bob comes back, resumes and reads at his own pace.
    let (_bob, mut bob_in) = ruyi::client::connect(server.addr, server.options("bob").resume(true))
        .await
        .unwrap();
    let mut peak = baseline;
    for expected in 1..=MESSAGES {
        let m = bob_in.next_message(WAIT).await.unwrap();
        assert_eq!(m.message_seq, expected, "all of them, in order");
        if expected % 5_000 == 0 {
            peak = peak.max(resident_bytes());
            // A slow reader: pause now and then.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let growth = peak.saturating_sub(baseline);
    println!("resident memory: baseline {baseline} bytes, peak growth {growth} bytes while a device caught up on {MESSAGES} messages");
    // The stated bound: the window (256 messages, 1 MiB) plus the SDK's own
    // buffer (4096 messages) plus RocksDB's block cache, far below the
    // 100 MB the backlog would take in memory.
    assert!(growth < 48 * 1024 * 1024, "grew {growth} bytes");
}
