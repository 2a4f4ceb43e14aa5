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
