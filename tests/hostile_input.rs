//! Malformed, oversized and out-of-order input closes only the offending
//! connection, with the right reason; the server keeps serving everyone else.

mod common;

use common::{connect_packet, token, RawClient, TestServer, WAIT};
use ruyi::protocol::{Packet, ReasonCode};
use std::time::{Duration, Instant};

fn disconnect_reason(packets: &[Packet]) -> Option<ReasonCode> {
    packets.iter().rev().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason),
        _ => None,
    })
}

async fn assert_server_still_delivers(server: &TestServer) {
    let (_bob, mut bob_in) = server.connect("bob").await;
    let (alice, _a) = server.connect("alice").await;
    let ack = alice.send_text("bob", "still alive").await.unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);
    assert_eq!(
        bob_in.next_message(WAIT).await.unwrap().message_id,
        ack.message_id
    );
}

#[tokio::test]
async fn a_malformed_frame_gets_malformed_frame_and_others_never_notice() {
    let server = TestServer::start();
    let (_bob, mut bob_in) = server.connect("bob").await;
    let (alice, _a) = server.connect("alice").await;

    let mut raw = RawClient::connect(server.addr).await;
    raw.send_packet(&connect_packet("eve", &token("eve"))).await;
    assert!(matches!(raw.next_packet().await, Some(Packet::ConnAck(_))));
    // A length prefix of 12 followed by 12 bytes that are no FlatBuffer.
    let mut garbage = 12u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 12]);
    raw.send_raw(&garbage).await;
    let packets = raw.packets_until_closed().await;
    assert_eq!(
        disconnect_reason(&packets),
        Some(ReasonCode::MalformedFrame)
    );

    let ack = alice.send_text("bob", "unaffected").await.unwrap();
    assert_eq!(
        bob_in.next_message(WAIT).await.unwrap().message_id,
        ack.message_id
    );
}

#[tokio::test]
async fn a_length_prefix_of_two_to_the_31_is_refused_before_buffering() {
    let server = TestServer::start();
    let mut raw = RawClient::connect(server.addr).await;
    raw.send_raw(&(1u32 << 31).to_le_bytes()).await;
    let packets = raw.packets_until_closed().await;
    assert_eq!(disconnect_reason(&packets), Some(ReasonCode::FrameTooLarge));
    assert_server_still_delivers(&server).await;
}

#[tokio::test]
async fn a_frame_over_the_limit_after_connect_is_refused_with_frame_too_large() {
    let server = TestServer::start_with(|c| {
        c.limits.frame_size_max_bytes = 4096;
        c.limits.payload_size_max_bytes = 2048;
    });
    let mut raw = RawClient::connect(server.addr).await;
    raw.send_packet(&connect_packet("eve", &token("eve"))).await;
    assert!(matches!(raw.next_packet().await, Some(Packet::ConnAck(_))));
    raw.send_raw(&5000u32.to_le_bytes()).await;
    let packets = raw.packets_until_closed().await;
    assert_eq!(disconnect_reason(&packets), Some(ReasonCode::FrameTooLarge));
}

#[tokio::test]
async fn random_bytes_are_cut_off_and_the_server_keeps_serving() {
    let server = TestServer::start();
    // A fixed pseudo-random stream, so a failure reproduces.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for _ in 0..3 {
        let mut raw = RawClient::connect(server.addr).await;
        let _ = tokio::io::AsyncWriteExt::write_all(&mut raw.stream, &bytes).await;
        let packets = raw.packets_until_closed().await;
        assert!(
            matches!(
                disconnect_reason(&packets),
                Some(ReasonCode::FrameTooLarge | ReasonCode::MalformedFrame)
            ),
            "{packets:?}"
        );
    }
    assert_server_still_delivers(&server).await;
}

#[tokio::test]
async fn a_send_before_connect_or_a_second_connect_is_an_unexpected_packet() {
    let server = TestServer::start();
    let mut raw = RawClient::connect(server.addr).await;
    raw.send_packet(&Packet::Ping).await;
    let packets = raw.packets_until_closed().await;
    assert_eq!(
        disconnect_reason(&packets),
        Some(ReasonCode::UnexpectedPacket)
    );

    let mut raw = RawClient::connect(server.addr).await;
    raw.send_packet(&connect_packet("eve", &token("eve"))).await;
    assert!(matches!(raw.next_packet().await, Some(Packet::ConnAck(_))));
    raw.send_packet(&connect_packet("eve", &token("eve"))).await;
    let packets = raw.packets_until_closed().await;
    assert_eq!(
        disconnect_reason(&packets),
        Some(ReasonCode::UnexpectedPacket)
    );
}

#[tokio::test]
async fn a_connection_that_never_sends_connect_is_closed_at_the_handshake_timeout() {
    let server = TestServer::start_with(|c| c.limits.handshake_timeout_ms = 300);
    let started = Instant::now();
    let mut raw = RawClient::connect(server.addr).await;
    let packets = raw.packets_until_closed().await;
    assert_eq!(
        disconnect_reason(&packets),
        Some(ReasonCode::HandshakeTimeout)
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_idle_timeout_and_pings_keep_one_open() {
    let server = TestServer::start_with(|c| {
        c.limits.idle_timeout_ms = 400;
        c.limits.heartbeat_interval_ms = 100;
    });
    let mut silent = RawClient::connect(server.addr).await;
    // The server last hears from this connection at some point after this.
    let last_sent = Instant::now();
    silent
        .send_packet(&connect_packet("quiet", &token("quiet")))
        .await;
    assert!(matches!(
        silent.next_packet().await,
        Some(Packet::ConnAck(_))
    ));

    // The SDK pings at the interval the server asked for.
    let (talker, mut talker_in) = server.connect("talker").await;
    assert_eq!(talker.conn_ack().heartbeat_interval_ms, 100);

    let packets = silent.packets_until_closed().await;
    assert_eq!(disconnect_reason(&packets), Some(ReasonCode::IdleTimeout));
    assert!(last_sent.elapsed() >= Duration::from_millis(400));

    // Well past the idle timeout, the pinging client is still connected.
    tokio::time::sleep(Duration::from_millis(600)).await;
    common::assert_nothing_arrives(&mut talker_in, Duration::from_millis(10)).await;
    let ack = talker.send_text("quiet", "hello").await.unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);
}

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let server = TestServer::start();
    let mut raw = RawClient::connect(server.addr).await;
    raw.send_packet(&connect_packet("p", &token("p"))).await;
    assert!(matches!(raw.next_packet().await, Some(Packet::ConnAck(_))));
    raw.send_packet(&Packet::Ping).await;
    assert_eq!(raw.next_packet().await, Some(Packet::Pong));
}

#[tokio::test]
async fn frames_sent_right_behind_connect_are_processed_after_conn_ack() {
    let server = TestServer::start();
    let (_bob, mut bob_in) = server.connect("bob").await;
    let mut raw = RawClient::connect(server.addr).await;
    // Connect and a Send in one write, before any ConnAck.
    let mut out = bytes::BytesMut::new();
    let mut encoder = ruyi::protocol::Encoder::new();
    encoder.encode(&connect_packet("alice", &token("alice")), &mut out);
    encoder.encode(
        &Packet::Send(ruyi::protocol::SendPacket {
            client_seq: 7,
            client_msg_no: "pipelined".into(),
            channel_id: "bob".into(),
            channel_type: ruyi::protocol::ChannelType::Person,
            flags: 0,
            payload: bytes::Bytes::from_static(b"early"),
        }),
        &mut out,
    );
    raw.send_raw(&out).await;
    assert!(
        matches!(raw.next_packet().await, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success)
    );
    match raw.next_packet().await {
        Some(Packet::SendAck(ack)) => {
            assert_eq!(ack.client_seq, 7);
            assert_eq!(ack.reason, ReasonCode::Success);
        }
        other => panic!("expected SendAck, got {other:?}"),
    }
    assert_eq!(
        &bob_in.next_message(WAIT).await.unwrap().payload[..],
        b"early"
    );
}

#[tokio::test]
async fn slowloris_one_byte_at_a_time_is_cut_off_at_the_handshake_timeout() {
    let server = TestServer::start_with(|c| c.limits.handshake_timeout_ms = 500);
    let mut out = bytes::BytesMut::new();
    ruyi::protocol::Encoder::new().encode(&connect_packet("slow", &token("slow")), &mut out);
    let started = Instant::now();
    let mut raw = RawClient::connect(server.addr).await;
    // One byte every 100 ms: each arrives well within any read timeout, but
    // the Connect never completes in time.
    for byte in out.iter().take(20) {
        if tokio::io::AsyncWriteExt::write_all(&mut raw.stream, &[*byte])
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let packets = raw.packets_until_closed().await;
    assert_eq!(
        disconnect_reason(&packets),
        Some(ReasonCode::HandshakeTimeout)
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_server_still_delivers(&server).await;
}

/// Opens `n` connections from `source` as fast as possible, then sorts
/// them: the reasons of those the server refused (it says why and closes)
/// and those it holds open.
async fn flood(
    source: &str,
    addr: std::net::SocketAddr,
    n: usize,
) -> (Vec<ReasonCode>, Vec<RawClient>) {
    let mut streams = Vec::new();
    for _ in 0..n {
        streams.push(connect_from(source, addr).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for stream in streams {
        tasks.spawn(async move {
            let mut raw = RawClient::from_stream(stream);
            match tokio::time::timeout(Duration::from_millis(500), raw.next_packet()).await {
                Ok(Some(Packet::Disconnect(d))) => {
                    assert_eq!(raw.next_packet().await, None, "closed after the Disconnect");
                    Err(d.reason)
                }
                Ok(other) => panic!("unexpected {other:?}"),
                Err(_) => Ok(raw),
            }
        });
    }
    let (mut refused, mut held) = (Vec::new(), Vec::new());
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(raw) => held.push(raw),
            Err(reason) => refused.push(reason),
        }
    }
    (refused, held)
}

/// Connects from `source` (a loopback address of our choosing) to `addr`.
async fn connect_from(source: &str, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

#[tokio::test]
async fn a_flood_of_connects_from_one_address_is_cut_off_with_rate_limited_and_others_still_connect(
) {
    // 20 per second over 2 shards: 10 per shard, 20 in a burst each.
    let server = TestServer::start_with(|c| c.limits.accepts_per_ip_per_second = 20);
    // A refused connection is told why and closed at once; an admitted one
    // stays open (silent, until its handshake timeout).
    let (refused, held) = flood("127.0.0.1", server.addr, 150).await;
    assert!(refused.iter().all(|r| *r == ReasonCode::RateLimited));
    let refused = refused.len();
    assert!(refused >= 80, "only {refused} of 150 refused");
    assert!(held.len() >= 20, "the burst is admitted: {}", held.len());

    // A client from another address is not affected.
    let stream = connect_from("127.0.0.2", server.addr).await;
    let mut raw = RawClient::from_stream(stream);
    raw.send_packet(&connect_packet("bob", &token("bob"))).await;
    match raw.next_packet().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.reason, ReasonCode::Success),
        other => panic!("expected ConnAck, got {other:?}"),
    }
    let (status, metrics) = common::api_get(&server.api_url(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!("ruyi_connections_rate_limited_total {refused}\n")),
        "{refused} refused; {}",
        metrics
            .lines()
            .find(|l| l.starts_with("ruyi_connections_rate"))
            .unwrap_or("")
    );
}

#[tokio::test]
async fn unauthenticated_connections_beyond_the_shard_limit_get_server_busy_until_they_go() {
    let server = TestServer::start_with(|c| {
        c.limits.unauthenticated_connections_per_shard_max = 4;
        c.limits.handshake_timeout_ms = 1000;
    });
    // 2 shards × 4: at most 8 silent connections are held at once.
    let (busy, held) = flood("127.0.0.1", server.addr, 30).await;
    assert!(busy.iter().all(|r| *r == ReasonCode::ServerBusy));
    assert!(held.len() <= 8, "{} silent connections held", held.len());
    assert!(busy.len() >= 22);
    // Once they time out, new clients get in again.
    for mut raw in held {
        let packets = raw.packets_until_closed().await;
        assert_eq!(
            disconnect_reason(&packets),
            Some(ReasonCode::HandshakeTimeout)
        );
    }
    assert_server_still_delivers(&server).await;
}

#[tokio::test]
async fn a_client_over_its_frame_rate_is_slowed_down_not_cut_off_and_loses_nothing() {
    let server = TestServer::start_with(|c| c.limits.frames_per_second_per_connection = 50);
    let mut raw = RawClient::connect(server.addr).await;
    raw.send_packet(&connect_packet("eve", &token("eve"))).await;
    assert!(matches!(raw.next_packet().await, Some(Packet::ConnAck(_))));
    // 150 pings at once: the Connect used one frame of the burst of 50,
    // then 50 frames per second.
    let mut pings = bytes::BytesMut::new();
    let mut encoder = ruyi::protocol::Encoder::new();
    for _ in 0..150 {
        encoder.encode(&Packet::Ping, &mut pings);
    }
    raw.send_raw(&pings).await;
    let started = Instant::now();
    let mut pongs = 0;
    while pongs < 150 {
        match raw.next_packet().await {
            Some(Packet::Pong) => pongs += 1,
            other => panic!("expected Pong, got {other:?}"),
        }
        if started.elapsed() < Duration::from_millis(900) {
            assert!(pongs <= 100, "{pongs} pongs within the first second");
        }
    }
    // All of them answered, in about (150 - 49) / 50 = 2 seconds.
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_server_still_delivers(&server).await;
}

#[tokio::test]
async fn a_connect_with_an_unknown_device_flag_is_refused_as_malformed() {
    let server = TestServer::start();
    let mut raw = RawClient::connect(server.addr).await;
    let Packet::Connect(mut connect) = connect_packet("eve", &token("eve")) else {
        unreachable!("connect_packet makes a Connect");
    };
    connect.device_flag = ruyi::protocol::DeviceFlag(7);
    raw.send_packet(&Packet::Connect(connect)).await;
    let packets = raw.packets_until_closed().await;
    assert!(
        matches!(
            packets.first(),
            Some(Packet::ConnAck(ack)) if ack.reason == ReasonCode::MalformedFrame
        ),
        "{packets:?}"
    );
    assert_server_still_delivers(&server).await;
}
