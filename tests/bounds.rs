//! What a client can make the gateway hold is bounded, whatever it sends:
//! answers it does not read stop the gateway reading its requests, and a
//! client that does not read at all is cut off as a slow consumer, its
//! queue freed. Checked through the server's own gauges.

mod common;

use bytes::Bytes;
use common::{connect_packet, token, RawClient, TestServer, WAIT};
use ruyi::client::Outgoing;
use ruyi::protocol::{ChannelType, Packet, ReasonCode, SyncDirection, SyncMessages};
use std::time::{Duration, Instant};

/// One client pipelined `SyncMessages` (limit 1000 over a channel of 50 KB
/// messages) and never read: the server's memory grew by more than 1 GiB.
/// Now the server stops reading it at half its outbound limit and cuts it
/// off when it has not caught up for `write_stall_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pipelines_syncs_and_never_reads_is_paced_then_cut_off_within_its_limit() {
    let server = TestServer::start_with(|config| {
        config.limits.write_stall_timeout_ms = 1_000;
    });
    let limits = ruyi::Config::default().limits;
    let (alice, _a) = server.connect("alice").await;
    for i in 0..40 {
        let ack = alice
            .send(Outgoing {
                channel_id: "bob".into(),
                channel_type: ChannelType::Person,
                client_msg_no: format!("big-{i}"),
                flags: 0,
                payload: Bytes::from(vec![b'x'; 50 * 1024]),
            })
            .await
            .unwrap();
        assert_eq!(ack.reason, ReasonCode::Success);
    }

    let mut bob = RawClient::connect(server.addr).await;
    bob.send_packet(&connect_packet("bob", &token("bob"))).await;
    assert!(matches!(bob.next_packet().await, Some(Packet::ConnAck(_))));
    // Write a thousand requests and never read an answer. The writes block
    // once the server stops reading, so they run on their own.
    let writer = tokio::spawn(async move {
        for request_id in 1..=1000 {
            let request = Packet::SyncMessages(SyncMessages {
                request_id,
                channel_id: "alice".into(),
                channel_type: ChannelType::Person,
                start_seq: 1,
                end_seq: 0,
                limit: 1000,
                direction: SyncDirection::Up,
            });
            bob.send_packet(&request).await;
        }
        bob
    });

    let bound = limits.outbound_buffer_max_bytes
        + limits.sync_response_max_bytes
        + limits.frame_size_max_bytes;
    let started = Instant::now();
    let mut most = 0;
    loop {
        let stats = server.control().stats().await.unwrap();
        most = most.max(stats.outbound_queued_bytes as usize);
        assert!(
            most <= bound,
            "{most} bytes queued for one client, over its bound of {bound}"
        );
        if stats.slow_consumers >= 1 && stats.outbound_queued_bytes == 0 {
            // Cut off, and its queue freed.
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "never cut off ({most} bytes queued at most)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.abort();
    // The gateway serves others all along.
    let ack = alice
        .send(Outgoing {
            channel_id: "carol".into(),
            channel_type: ChannelType::Person,
            client_msg_no: "after".into(),
            flags: 0,
            payload: Bytes::from_static(b"still here"),
        })
        .await
        .unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);
}
